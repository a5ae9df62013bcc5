#!/usr/bin/env python3
"""The upstream link's benchmarks, each beside its ceiling or peer in one run.

    python3 scripts/bench-link.py [--messages 1000000] [--restores 15] [--quick] [--no-build]

  drain-quic    A child gateway is filled with a backlog of --messages 64-byte
                QoS 1 messages while its parent is down; then the parent (a
                root) starts. Measured: from the link coming up to the child's
                outbox being empty (every message stored, fsynced, at the
                parent and acknowledged). Beside it: the same number of bytes
                over one raw loopback quinn stream (holdfast-link-bench quic).
  drain-bridge  The same backlog drained through the MQTT bridge into
                Mosquitto 2, beside a raw loopback TCP stream of the same bytes.
  restore       A child and a root joined through tools/link-proxy, a device
                publishing to the child every 5 ms and a subscriber at the root.
                The path is cut (mappings forgotten) long enough for the link
                to drop, then restored; measured: restore -> first message at
                the root. With probing on (default) and off (back-off only),
                alternating, --restores times each; medians.

Results go to stdout and, as JSON, to target/bench-link.json.
"""

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REL = os.path.join(ROOT, "target/release")
HOLDFAST = os.path.join(REL, "holdfast")
MQTT_BENCH = os.path.join(REL, "holdfast-mqtt-bench")
LINK_BENCH = os.path.join(REL, "holdfast-link-bench")
PROXY = os.path.join(REL, "holdfast-link-proxy")
TOKEN = "bench-token-0123456789"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def api(port, path):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


class Node:
    """A holdfast process with its own data directory."""

    def __init__(self, work, name, extra, env=None):
        self.name = name
        self.admin, self.mqtt = free_port(), free_port()
        self.dir = os.path.join(work, name)
        os.makedirs(self.dir, exist_ok=True)
        self.config = os.path.join(self.dir, "holdfast.toml")
        with open(self.config, "w") as f:
            f.write(
                f'[node]\nid = "{name}"\ndata_dir = "{self.dir}/data"\n'
                f'[admin]\nlisten = "127.0.0.1:{self.admin}"\ntoken = "{TOKEN}"\n'
                f'[mqtt.tcp]\nlisten = "127.0.0.1:{self.mqtt}"\n'
                f'[outbox]\nmax_messages = 5000000\n{extra}'
                # Several nodes run at once: none takes the cache's port.
                + ('' if '[cache]' in extra else '\n[cache]\nenabled = false\n')
            )
        self.proc = None
        self.start()

    def start(self):
        log = open(os.path.join(self.dir, "node.log"), "a")
        self.proc = subprocess.Popen([HOLDFAST, "run", "--config", self.config], stdout=log, stderr=log)
        deadline = time.time() + 60
        while time.time() < deadline:
            if self.proc.poll() is not None:
                sys.exit(f"{self.name} exited early; see {self.dir}/node.log")
            try:
                api(self.admin, "/api/v1/node")
                return
            except OSError:
                time.sleep(0.05)
        sys.exit(f"{self.name} did not start")

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)

    def queued(self):
        lanes = api(self.admin, "/api/v1/outbox")["lanes"]
        return sum(l["messages"] for l in lanes), sum(l["bytes"] for l in lanes)

    def link(self):
        return api(self.admin, "/api/v1/link")["link"]


def write_json(name, out):
    """Writes the results to target/<name>.json and says where."""
    path = os.path.join(ROOT, f"target/{name}.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=2)
    print(f"wrote {path}")


def fleet(work, ids):
    certs = os.path.join(work, "certs")
    subprocess.run([HOLDFAST, "cert", "ca", "--dir", certs], check=True, stdout=subprocess.DEVNULL)
    for i in ids:
        subprocess.run([HOLDFAST, "cert", "node", i, "--ca-dir", certs], check=True, stdout=subprocess.DEVNULL)
    return certs


def fleet_section(certs, i):
    return f'[fleet]\nca = "{certs}/ca.pem"\ncert = "{certs}/{i}.pem"\nkey = "{certs}/{i}.key"\n'


def fill(node, n):
    """Publishes QoS 1 64-byte messages until the node's outbox holds n."""
    while True:
        have, _ = node.queued()
        if have >= n:
            return have
        left = n - have
        rate = 100_000
        secs = max(0.5, left / rate)
        subprocess.run(
            [MQTT_BENCH, "--port", str(node.mqtt), "--publishers", "16", "--subscribers", "0", "--qos", "1",
             "--payload", "64", "--rate", str(rate), "--duration", f"{secs:.2f}", "--warmup", "0", "--drain", "5",
             "--inflight", "64", "--json"],
            check=True, stdout=subprocess.DEVNULL,
        )


def wait_empty(node, timeout=600):
    deadline = time.time() + timeout
    while time.time() < deadline:
        n, _ = node.queued()
        if n == 0:
            return time.time()
        time.sleep(0.02)
    sys.exit(f"{node.name}'s outbox did not drain")


def wait_up(node, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        l = node.link()
        if l["state"] == "up":
            return l["since_ms"] / 1000.0
        time.sleep(0.01)
    sys.exit(f"{node.name}'s link did not come up: {node.link()}")


def raw(transport, nbytes):
    out = subprocess.run([LINK_BENCH, transport, "--bytes", str(nbytes)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def drain_quic(work, n):
    certs = fleet(work, ["root", "gw1"])
    link_port = free_port()
    child = Node(
        work, "gw1",
        fleet_section(certs, "gw1")
        + f'[upstream]\nkind = "quic"\n[upstream.quic]\nparent = "127.0.0.1:{link_port}"\nparent_id = "root"\n',
    )
    have = fill(child, n)
    _, nbytes = child.queued()
    root = Node(
        work, "root",
        fleet_section(certs, "root")
        + f'[link]\nenabled = true\nlisten = "127.0.0.1:{link_port}"\n'
        + '[[identities]]\nid = "gw1"\nkind = "gateway"\nparent = "root"\n',
    )
    up = wait_up(child)
    done = wait_empty(child)
    secs = done - up
    ceiling = raw("quic", nbytes)
    child.stop()
    root.stop()
    return {"messages": have, "bytes": nbytes, "seconds": secs, "msgs_per_s": have / secs,
            "mb_per_s": nbytes / secs / 1e6, "raw_quic_mb_per_s": ceiling["mb_per_s"],
            "raw_quic_seconds": ceiling["seconds"], "ratio_to_raw": (nbytes / secs / 1e6) / ceiling["mb_per_s"]}


def drain_bridge(work, n):
    mq_dir = os.path.join(work, "mosquitto")
    os.makedirs(mq_dir, exist_ok=True)
    port = free_port()
    conf = os.path.join(mq_dir, "mosquitto.conf")
    with open(conf, "w") as f:
        f.write(f"listener {port} 127.0.0.1\nallow_anonymous true\nmax_inflight_messages 1000\n")
    node = Node(
        work, "bridged",
        f'[upstream]\nkind = "mqtt"\n[upstream.mqtt]\nhost = "127.0.0.1"\nport = {port}\ninflight = 1000\n',
    )
    have = fill(node, n)
    _, nbytes = node.queued()
    mq = subprocess.Popen(["mosquitto", "-c", conf], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    up = wait_up(node)
    window = node.link()["window"]
    done = wait_empty(node)
    secs = done - up
    ceiling = raw("tcp", nbytes)
    node.stop()
    mq.terminate()
    mq.wait()
    return {"messages": have, "bytes": nbytes, "seconds": secs, "msgs_per_s": have / secs, "window": window,
            "mb_per_s": nbytes / secs / 1e6, "raw_tcp_mb_per_s": ceiling["mb_per_s"],
            "ratio_to_raw": (nbytes / secs / 1e6) / ceiling["mb_per_s"]}


class Proxy:
    def __init__(self, target):
        self.proc = subprocess.Popen([PROXY, "--udp", f"127.0.0.1:0={target}"], stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True)
        info = json.loads(self.proc.stdout.readline())
        self.control = info["control"]
        self.udp = info["udp"][0]

    def cmd(self, c):
        host, port = self.control.rsplit(":", 1)
        with socket.create_connection((host, int(port))) as s:
            s.sendall((c + "\n").encode())
            assert s.makefile().readline().strip() == "ok"

    def stop(self):
        self.proc.kill()
        self.proc.wait()


def restore(work, rounds, outage):
    import paho.mqtt.client as mqtt

    certs = fleet(work, ["root", "gw1", "gw2"])
    link_port = free_port()
    root = Node(
        work, "root",
        fleet_section(certs, "root") + f'[link]\nenabled = true\nlisten = "127.0.0.1:{link_port}"\n'
        + '[[identities]]\nid = "gw1"\nkind = "gateway"\nparent = "root"\n'
        + '[[identities]]\nid = "gw2"\nkind = "gateway"\nparent = "root"\n',
    )
    proxies, children = {}, {}
    for gw, probe in (("gw1", 100), ("gw2", 0)):
        p = Proxy(f"127.0.0.1:{link_port}")
        proxies[gw] = p
        children[gw] = Node(
            work, gw,
            fleet_section(certs, gw)
            + f'[upstream]\nkind = "quic"\nprobe_interval_ms = {probe}\n'
            + f'[upstream.quic]\nparent = "{p.udp}"\nparent_id = "root"\n',
        )
        wait_up(children[gw])
    arrivals = {"gw1": [], "gw2": []}
    lock = threading.Lock()

    def on_message(_c, _u, msg):
        gw = msg.topic.split("/")[1]
        with lock:
            arrivals[gw].append(time.time())

    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-consumer")
    sub.on_message = on_message
    sub.connect("127.0.0.1", root.mqtt)
    sub.subscribe("trickle/#", qos=1)
    sub.loop_start()
    stop = threading.Event()

    def trickle(gw, port):
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"dev-{gw}")
        c.connect("127.0.0.1", port)
        c.loop_start()
        while not stop.is_set():
            c.publish(f"trickle/{gw}", b"x", qos=1)
            time.sleep(0.005)
        c.loop_stop()

    threads = [threading.Thread(target=trickle, args=(gw, n.mqtt)) for gw, n in children.items()]
    for t in threads:
        t.start()
    time.sleep(1)
    results = {"gw1": [], "gw2": []}
    for r in range(rounds):
        for gw in ("gw1", "gw2"):
            node, proxy = children[gw], proxies[gw]
            proxy.cmd("cut")
            # Long enough for the link to be declared dead (idle timeout 5 s).
            deadline = time.time() + 30
            while node.link()["state"] == "up" and time.time() < deadline:
                time.sleep(0.05)
            time.sleep(outage)
            t0 = time.time()
            proxy.cmd("up")
            deadline = t0 + 120
            first = None
            while first is None and time.time() < deadline:
                with lock:
                    first = next((a for a in arrivals[gw] if a >= t0), None)
                time.sleep(0.002)
            if first is None:
                sys.exit(f"{gw}: nothing arrived within 120 s of the restore")
            results[gw].append((first - t0) * 1000)
            print(f"  restore {r + 1} {gw} ({'probe' if gw == 'gw1' else 'back-off only'}): {results[gw][-1]:.0f} ms",
                  flush=True)
    stop.set()
    for t in threads:
        t.join()
    sub.loop_stop()
    for n in list(children.values()) + [root]:
        n.stop()
    for p in proxies.values():
        p.stop()
    med = {gw: statistics.median(v) for gw, v in results.items()}
    return {"outage_s_after_link_down": outage, "rounds": rounds, "probe_ms": results["gw1"],
            "backoff_only_ms": results["gw2"], "median_probe_ms": med["gw1"], "median_backoff_only_ms": med["gw2"],
            "ratio": med["gw2"] / med["gw1"] if med["gw1"] else None}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=1_000_000)
    ap.add_argument("--restores", type=int, default=15)
    ap.add_argument("--outage", type=float, default=20.0,
                    help="seconds the path stays cut after the link is declared down")
    ap.add_argument("--quick", action="store_true", help="100k messages, 5 restores, 5 s outages")
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--only", choices=["drain-quic", "drain-bridge", "restore"])
    args = ap.parse_args()
    if args.quick:
        args.messages, args.restores, args.outage = 100_000, 5, 5.0
    if not args.no_build:
        subprocess.run(["cargo", "build", "--release", "-p", "holdfast", "-p", "holdfast-mqtt-bench",
                        "-p", "holdfast-link-bench", "-p", "holdfast-link-proxy"], check=True, cwd=ROOT)
    if not shutil.which("mosquitto"):
        sys.exit("mosquitto is needed (scripts/setup.sh installs it)")
    out = {"machine": {"cpus": os.cpu_count()}}
    work = tempfile.mkdtemp(prefix="holdfast-bench-link-")
    os.chmod(work, 0o777)
    try:
        if args.only in (None, "drain-quic"):
            print(f"drain-quic: filling {args.messages} messages...", flush=True)
            r = drain_quic(os.path.join(work, "q"), args.messages)
            out["drain_quic"] = r
            print(f"drain-quic: {r['messages']} msgs, {r['bytes'] / 1e6:.1f} MB in {r['seconds']:.2f} s = "
                  f"{r['msgs_per_s']:.0f} msg/s, {r['mb_per_s']:.1f} MB/s; raw quinn stream {r['raw_quic_mb_per_s']:.1f} MB/s "
                  f"(link/raw {r['ratio_to_raw']:.2f})", flush=True)
        if args.only in (None, "drain-bridge"):
            print(f"drain-bridge: filling {args.messages} messages...", flush=True)
            r = drain_bridge(os.path.join(work, "b"), args.messages)
            out["drain_bridge"] = r
            print(f"drain-bridge: {r['messages']} msgs in {r['seconds']:.2f} s = {r['msgs_per_s']:.0f} msg/s, "
                  f"{r['mb_per_s']:.1f} MB/s (window {r['window']}); raw TCP {r['raw_tcp_mb_per_s']:.1f} MB/s "
                  f"(bridge/raw {r['ratio_to_raw']:.3f})", flush=True)
        if args.only in (None, "restore"):
            print("restore:", flush=True)
            r = restore(os.path.join(work, "r"), args.restores, args.outage)
            out["restore"] = r
            print(f"restore: median {r['median_probe_ms']:.0f} ms with probing, "
                  f"{r['median_backoff_only_ms']:.0f} ms back-off only (ratio {r['ratio']:.1f})", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write_json("bench-link", out)


if __name__ == "__main__":
    main()
