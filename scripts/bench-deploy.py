#!/usr/bin/env python3
"""Fleet deployment benchmark: one root, 3 gateways, 30 leaf gateways, each a
holdfast process on this machine, joined by QUIC links.

    python3 scripts/bench-deploy.py [--gateways 3] [--leaves 10] [--runs 3]
                                    [--size 1048576] [--no-build]

For each run a new router component of --size bytes (the test router padded
with a custom section, so every run has its own hash) is uploaded to the root
and a deployment of it to every node (`all`, one wave) is created. Measured:

  seconds     from the create request to every node of the tree reporting
              "applied" at the root (the owning node's view);
  link bytes  component bytes each node sent to its children and received
              from its parent (holdfast_deploy_component_bytes_total): the
              component must cross each link once;

  distributed from the create request to the component stored at every node;

Every node compiles the component itself (its own artifact cache), as it
would on its own machine; here 34 nodes share 2 cores, so the compiles
queue. Beside it, in the same run, the peer is what an operator does without
deployments: the same component swapped into every node's router slot, one
node after another, through each node's admin API (POST /plugins/router/swap
from one machine) -- timed, with the bytes it uploads.

Results go to stdout and, as JSON, to target/bench-deploy.json.
"""

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOLDFAST = os.path.join(ROOT, "target/release/holdfast")
TEST_ROUTER = os.path.join(ROOT, "target/wasm-plugins/wasm32-wasip2/plugin/holdfast_test_router.wasm")
TOKEN = "bench-token-0123456789"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(port, path, body=None, method=None, ctype="application/json", timeout=60):
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data=data, method=method,
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": ctype},
    )
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def metric(port, line):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        for l in r.read().decode().splitlines():
            if l.startswith(line + " "):
                return float(l.split()[-1])
    return 0.0


class Node:
    def __init__(self, work, name, extra):
        self.name = name
        self.admin = free_port()
        self.dir = os.path.join(work, name)
        os.makedirs(self.dir, exist_ok=True)
        self.config = os.path.join(self.dir, "holdfast.toml")
        with open(self.config, "w") as f:
            f.write(
                f'[node]\nid = "{name}"\ndata_dir = "{self.dir}/data"\n'
                f'[admin]\nlisten = "127.0.0.1:{self.admin}"\ntoken = "{TOKEN}"\n'
                # Each node compiles for itself, as on its own machine.
                f'[mqtt]\nenabled = false\n[cache]\nenabled = false\n{extra}'
            )
        log = open(os.path.join(self.dir, "node.log"), "a")
        self.proc = subprocess.Popen([HOLDFAST, "run", "--config", self.config], stdout=log, stderr=log)

    def wait_ready(self):
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                sys.exit(f"{self.name} exited early; see {self.dir}/node.log")
            try:
                request(self.admin, "/api/v1/node")
                return
            except OSError:
                time.sleep(0.05)
        sys.exit(f"{self.name} did not start")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)


def padded(size, tag):
    """The test router with a custom section making it exactly `size` bytes."""
    base = open(TEST_ROUTER, "rb").read()
    name = f"holdfast-bench-padding-{tag}".encode()

    def leb(n):
        out = bytearray()
        while True:
            b = n & 0x7F
            n >>= 7
            out.append(b | (0x80 if n else 0))
            if not n:
                return bytes(out)

    # Section: id 0, LEB size, LEB name length, name, payload.
    for fill in range(max(0, size - len(base) - 64), size):
        body_len = len(leb(len(name))) + len(name) + fill
        total = len(base) + 1 + len(leb(body_len)) + body_len
        if total == size:
            body = leb(len(name)) + name + bytes((i * 7 + len(tag)) & 0xFF for i in range(fill))
            return base + b"\x00" + leb(body_len) + body
    sys.exit(f"cannot pad to {size} bytes")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gateways", type=int, default=3)
    ap.add_argument("--leaves", type=int, default=10, help="leaf gateways per gateway")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--size", type=int, default=1 << 20)
    ap.add_argument("--no-build", action="store_true")
    a = ap.parse_args()
    if not a.no_build:
        subprocess.run(["cargo", "build", "--release", "-p", "holdfast"], cwd=ROOT, check=True)
    work = tempfile.mkdtemp(prefix="holdfast-bench-deploy-")
    gws = [f"g{i + 1}" for i in range(a.gateways)]
    leaves = {g: [f"{g}-l{j + 1}" for j in range(a.leaves)] for g in gws}
    everyone = ["root"] + gws + [l for g in gws for l in leaves[g]]
    certs = os.path.join(work, "certs")
    subprocess.run([HOLDFAST, "cert", "ca", "--dir", certs], check=True, stdout=subprocess.DEVNULL)
    for n in everyone:
        subprocess.run([HOLDFAST, "cert", "node", n, "--ca-dir", certs], check=True, stdout=subprocess.DEVNULL)

    def fleet(n):
        return f'[fleet]\nca = "{certs}/ca.pem"\ncert = "{certs}/{n}.pem"\nkey = "{certs}/{n}.key"\n'

    def upstream(port, parent):
        return (f'[upstream]\nkind = "quic"\n[upstream.quic]\nparent = "127.0.0.1:{port}"\n'
                f'parent_id = "{parent}"\n')

    links = {n: free_port() for n in ["root"] + gws}
    idents = "".join(
        f'[[identities]]\nid = "{g}"\nkind = "gateway"\nparent = "root"\n' for g in gws
    ) + "".join(
        f'[[identities]]\nid = "{l}"\nkind = "gateway"\nparent = "{g}"\n' for g in gws for l in leaves[g]
    )
    nodes = {}
    started = time.time()
    nodes["root"] = Node(work, "root", fleet("root") + f'[link]\nenabled = true\nlisten = "127.0.0.1:{links["root"]}"\n' + idents)
    nodes["root"].wait_ready()
    for g in gws:
        nodes[g] = Node(work, g, fleet(g) + f'[link]\nenabled = true\nlisten = "127.0.0.1:{links[g]}"\n'
                        + upstream(links["root"], "root"))
    for g in gws:
        nodes[g].wait_ready()
    for g in gws:
        for l in leaves[g]:
            nodes[l] = Node(work, l, fleet(l) + upstream(links[g], g))
    for n in nodes.values():
        n.wait_ready()
    deadline = time.time() + 120
    for n in everyone[1:]:
        while request(nodes[n].admin, "/api/v1/link")["link"]["state"] != "up":
            if time.time() > deadline:
                sys.exit(f"{n}'s link did not come up")
            time.sleep(0.05)
    print(f"{len(everyone)} nodes up in {time.time() - started:.1f} s ({work})")

    runs = []
    try:
        for r in range(a.runs):
            blob = padded(a.size, f"run{r}")
            before = {n: (metric(nodes[n].admin, 'holdfast_deploy_component_bytes_total{event="sent"}'),
                          metric(nodes[n].admin, 'holdfast_deploy_component_bytes_total{event="received"}'))
                      for n in everyone}
            t_up = time.time()
            up = request(nodes["root"].admin, "/api/v1/deployments/components", blob, ctype="application/wasm")
            t0 = time.time()
            request(nodes["root"].admin, "/api/v1/deployments", {
                "id": f"bench{r}", "priority": r, "target": {"all": True},
                "plugins": {"router": {"sha256": up["sha256"]}},
            })
            waiting = set(everyone[1:])
            distributed = None
            while True:
                for n in list(waiting):
                    got = metric(nodes[n].admin, 'holdfast_deploy_component_bytes_total{event="received"}')
                    if got - before[n][1] >= a.size:
                        waiting.discard(n)
                if not waiting and distributed is None:
                    distributed = time.time() - t0
                v = request(nodes["root"].admin, f"/api/v1/deployments/bench{r}")
                states = [s["state"] for s in v["node_states"]]
                if all(s == "applied" for s in states):
                    break
                bad = [s for s in v["node_states"] if s["state"] in ("failed", "refused", "rolled-back")]
                if bad:
                    sys.exit(f"run {r}: {bad}")
                if time.time() - t0 > 300:
                    sys.exit(f"run {r}: not applied everywhere after 300 s: {states}")
                time.sleep(0.05)
            secs = time.time() - t0
            delta = {}
            for n in everyone:
                s = metric(nodes[n].admin, 'holdfast_deploy_component_bytes_total{event="sent"}') - before[n][0]
                rcv = metric(nodes[n].admin, 'holdfast_deploy_component_bytes_total{event="received"}') - before[n][1]
                delta[n] = (s, rcv)
            link_bytes = sum(rcv for _, rcv in delta.values())
            per_link = sorted({rcv / a.size for n, (_, rcv) in delta.items() if n != "root"})
            root_sent = delta["root"][0] / a.size
            gw_sent = sorted({delta[g][0] / a.size for g in gws})
            # Peer: the same component swapped into every node by its admin API.
            blob2 = padded(a.size, f"peer{r}")
            p0 = time.time()
            for n in everyone:
                request(nodes[n].admin, "/api/v1/plugins/router/swap", blob2, ctype="application/wasm")
            peer_secs = time.time() - p0
            run = {"run": r, "seconds": secs, "distributed_seconds": distributed, "upload_seconds": t0 - t_up, "nodes": len(everyone),
                   "links": len(everyone) - 1, "component_bytes": a.size, "link_bytes": link_bytes,
                   "copies_per_link": per_link, "root_sent_copies": root_sent, "gateway_sent_copies": gw_sent,
                   "peer_admin_swap_seconds": peer_secs, "peer_admin_bytes": a.size * len(everyone),
                   "ratio_time_to_peer": secs / peer_secs}
            runs.append(run)
            print(f"run {r}: component at every node after {distributed:.2f} s; "
                  f"applied on {len(everyone)} nodes in {secs:.2f} s "
                  f"(upload {t0 - t_up:.2f} s); link bytes {link_bytes:.0f} = {link_bytes / a.size:.2f} copies "
                  f"over {len(everyone) - 1} links; each link carried {per_link} copies; root sent {root_sent:.0f}, "
                  f"gateways sent {gw_sent}; peer (admin swap on each node in turn) {peer_secs:.2f} s, "
                  f"{a.size * len(everyone)} bytes uploaded")
    finally:
        for n in reversed(everyone):
            nodes[n].stop()
    med = {k: statistics.median(r[k] for r in runs)
           for k in ("seconds", "distributed_seconds", "peer_admin_swap_seconds", "ratio_time_to_peer", "link_bytes")}
    print(f"median: component everywhere after {med['distributed_seconds']:.2f} s, "
          f"applied everywhere in {med['seconds']:.2f} s; peer {med['peer_admin_swap_seconds']:.2f} s; "
          f"ratio {med['ratio_time_to_peer']:.2f}; link bytes {med['link_bytes']:.0f}")
    out = {"runs": runs, "median": med}
    path = os.path.join(ROOT, "target/bench-deploy.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
