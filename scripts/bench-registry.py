#!/usr/bin/env python3
"""Scope sync and revocation figures: a root and a child gateway as separate processes.

    python3 scripts/bench-registry.py [--sizes 1000,10000,50000] [--rounds 20] [--no-build]

  full-sync   The root is seeded with N devices under gw1 ([[identities]]).
              Measured: gw1's link coming up -> gw1's replica holding all N
              (received, applied in one fsynced batch). Beside it: the same
              number of bytes as the scope listed as JSON (without keys) over a raw loopback quinn stream
              (holdfast-link-bench quic).
  change      With N devices in the registry, one device is added at the root
              through the admin API; measured: the API call starting -> the
              device answering on gw1's admin API. --rounds times; median.
  revoke      A device connected to gw1 with a SAS token (MQTT 3.1.1 over a
              raw socket); it is disabled at the root; measured: the API call
              starting -> gw1 closing the device's socket. --rounds times; median.

Results go to stdout and, as JSON, to target/bench-registry.json.
"""

import argparse
import base64
import hashlib
import hmac
import importlib.util
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("bench_link", os.path.join(ROOT, "scripts/bench-link.py"))
link = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(link)

KEY = base64.b64encode(b"k" * 32).decode()
HUB = "bench.example"


def call(port, method, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data=data, method=method,
        headers={"Authorization": f"Bearer {link.TOKEN}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def has(port, path):
    try:
        link.api(port, path)
        return True
    except urllib.error.HTTPError:
        return False


def wait(what, f, timeout=120, step=0.005):
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = f()
        if v:
            return v
        time.sleep(step)
    sys.exit(f"timed out waiting for {what}")


def seeds(n):
    out = ['[[identities]]\nid = "gw1"\nkind = "gateway"\nparent = "root"\n']
    for i in range(n):
        out.append(f'[[identities]]\nid = "dev{i}"\nparent = "gw1"\nsas_primary = "{KEY}"\n')
    return "".join(out)


def sas_connect(port, device):
    """An MQTT 3.1.1 CONNECT with an IoT Hub SAS token; returns the socket after CONNACK 0."""
    sr = urllib.parse.quote(f"{HUB}/devices/{device}", safe="")
    expiry = int(time.time()) + 3600
    sig = hmac.new(base64.b64decode(KEY), f"{sr}\n{expiry}".encode(), hashlib.sha256).digest()
    password = f"SharedAccessSignature sr={sr}&sig={urllib.parse.quote(base64.b64encode(sig).decode(), safe='')}&se={expiry}"
    user = f"{HUB}/{device}/?api-version=2021-04-12"

    def s(x):
        b = x.encode()
        return len(b).to_bytes(2, "big") + b

    body = s("MQTT") + bytes([4, 0b11000010]) + (60).to_bytes(2, "big") + s(device) + s(user) + s(password)
    rem, enc = len(body), b""
    while True:
        byte, rem = rem % 128, rem // 128
        enc += bytes([byte | (0x80 if rem else 0)])
        if not rem:
            break
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"\x10" + enc + body)
    ack = sock.recv(4)
    if ack[:2] != b"\x20\x02" or ack[3] != 0:
        sys.exit(f"CONNACK {ack!r}")
    return sock


def run(work, n, rounds):
    certs = link.fleet(work, ["root", "gw1"])
    port = link.free_port()
    root = link.Node(work, "root", link.fleet_section(certs, "root")
                     + f'[link]\nenabled = true\nlisten = "127.0.0.1:{port}"\n' + seeds(n))
    gw1 = link.Node(work, "gw1", link.fleet_section(certs, "gw1")
                    + f'[upstream]\nkind = "quic"\n[upstream.quic]\nparent = "127.0.0.1:{port}"\nparent_id = "root"\n')
    try:
        up = link.wait_up(gw1)
        wait("the full sync", lambda: link.api(gw1.admin, "/api/v1/registry")["identities"] >= n)
        synced = time.time()
        full_ms = (synced - up) * 1000
        scope_bytes = len(json.dumps(call(root.admin, "GET", "/api/v1/devices?parent=gw1")).encode())
        raw = link.raw("quic", scope_bytes)
        changes = []
        for r in range(rounds):
            t0 = time.time()
            call(root.admin, "POST", "/api/v1/devices", {"id": f"new{r}", "parent": "gw1", "sas_primary": KEY, "sas_secondary": KEY})
            wait("the new device at gw1", lambda: has(gw1.admin, f"/api/v1/devices/new{r}"), step=0.002)
            changes.append((time.time() - t0) * 1000)
        revokes = []
        for r in range(rounds):
            sock = sas_connect(gw1.mqtt, "dev0")
            t0 = time.time()
            call(root.admin, "POST", "/api/v1/devices/dev0/disable")
            sock.settimeout(10)
            if sock.recv(16) != b"":
                sys.exit("expected the gateway to close the socket")
            revokes.append((time.time() - t0) * 1000)
            sock.close()
            call(root.admin, "POST", "/api/v1/devices/dev0/enable")
            wait("dev0 enabled at gw1", lambda: link.api(gw1.admin, "/api/v1/devices/dev0")["enabled"], step=0.002)
        return {
            "identities": n,
            "full_sync_ms": full_ms,
            "scope_json_bytes": scope_bytes,
            "raw_quic_mb_per_s": raw["mb_per_s"],
            "raw_quic_ms": raw["seconds"] * 1000,
            "change_ms": changes,
            "median_change_ms": statistics.median(changes),
            "revoke_ms": revokes,
            "median_revoke_ms": statistics.median(revokes),
        }
    finally:
        gw1.stop()
        root.stop()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1000,10000,50000")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--no-build", action="store_true")
    args = ap.parse_args()
    if not args.no_build:
        subprocess.run(["cargo", "build", "--release", "-p", "holdfast", "-p", "holdfast-link-bench"], check=True, cwd=ROOT)
    out = {"machine": {"cpus": os.cpu_count()}, "runs": []}
    work = tempfile.mkdtemp(prefix="holdfast-bench-registry-")
    try:
        for n in [int(s) for s in args.sizes.split(",")]:
            r = run(os.path.join(work, str(n)), n, args.rounds)
            out["runs"].append(r)
            print(f"{n} identities: full sync {r['full_sync_ms']:.0f} ms ({r['scope_json_bytes'] / 1e6:.2f} MB listed as JSON; "
                  f"the same bytes over a raw quinn stream: {r['raw_quic_ms']:.1f} ms); one change reaches the child in "
                  f"{r['median_change_ms']:.1f} ms median; disable -> device disconnected at the child in "
                  f"{r['median_revoke_ms']:.1f} ms median ({args.rounds} rounds)", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    link.write_json("bench-registry", out)


if __name__ == "__main__":
    main()
