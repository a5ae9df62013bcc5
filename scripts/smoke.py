#!/usr/bin/env python3
"""Smoke test of one holdfast binary, for a build of another architecture run under
qemu-user (or of this machine's, with no runner).

    python3 scripts/smoke.py --binary target/release/holdfast
    python3 scripts/smoke.py --binary target/aarch64-unknown-linux-gnu/release/holdfast \\
        --runner "qemu-aarch64-static -L /usr/aarch64-linux-gnu"

It starts the node on its own config (first start: the plugins are compiled for the
binary's architecture), then checks, with the binary under test for every CLI call:
  1. an MQTT QoS 1 round trip (publish, PUBACK, delivery to a subscriber);
  2. a plugin swap: the router is swapped for the example alert router, the node answers
     with the new version, it is rolled back, and a QoS 1 round trip works again;
  3. the range cache serving a byte range of an object from a local origin (a miss that
     fills, then a hit), compared byte for byte.
It prints the binary's size, the time to start and the node's idle RSS (under qemu-user,
the emulator's RSS: the translated code and qemu itself are in it), and exits non-zero
on the first failure.
"""

import argparse
import hashlib
import http.server
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import paho.mqtt.client as mqtt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fail(msg, log=None):
    print(f"FAIL: {msg}", flush=True)
    if log and os.path.exists(log):
        with open(log, errors="replace") as f:
            tail = f.read()[-4000:]
        print("--- node log (tail) ---\n" + tail, flush=True)
    sys.exit(1)


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def qos1_round_trip(port, topic, payload, timeout=30):
    """Subscribes at QoS 1, publishes at QoS 1, waits for the PUBACK and the delivery."""
    got = threading.Event()
    subscribed = threading.Event()
    received = []

    def on_message(_c, _u, msg):
        received.append((msg.topic, msg.payload, msg.qos))
        got.set()

    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="smoke-sub", protocol=mqtt.MQTTv5)
    sub.on_message = on_message
    sub.on_subscribe = lambda *_a: subscribed.set()
    sub.connect("127.0.0.1", port)
    sub.loop_start()
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="smoke-pub", protocol=mqtt.MQTTv5)
    try:
        r, _mid = sub.subscribe(topic, qos=1)
        if r != mqtt.MQTT_ERR_SUCCESS:
            raise RuntimeError(f"subscribe: {mqtt.error_string(r)}")
        # Wait for the SUBACK (under qemu the auth plugin's ACL check can take a while).
        if not subscribed.wait(timeout):
            raise RuntimeError("no SUBACK")
        pub.connect("127.0.0.1", port)
        pub.loop_start()
        info = pub.publish(topic, payload, qos=1)
        info.wait_for_publish(timeout)
        if not info.is_published():
            raise RuntimeError("no PUBACK")
        if not got.wait(timeout):
            raise RuntimeError("the subscriber got nothing")
        t, p, q = received[0]
        if (t, p, q) != (topic, payload, 1):
            raise RuntimeError(f"delivered {t!r} {p!r} at QoS {q}, expected {topic!r} {payload!r} at QoS 1")
    finally:
        for c in (pub, sub):
            c.disconnect()
            c.loop_stop()


class Origin(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *a):
        pass


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--binary", required=True)
    ap.add_argument("--runner", default="", help='e.g. "qemu-aarch64-static -L /usr/aarch64-linux-gnu"')
    ap.add_argument("--plugin", default=None,
                    help="component to swap in (default: the example alert router built by the last cargo build)")
    ap.add_argument("--max-instances", type=int, default=None,
                    help="plugins.max_instances (default: 8 with --runner, else the node's default)")
    ap.add_argument("--deadline-ms", type=int, default=None,
                    help="plugins.*.deadline_ms (default: 1000 with --runner, else the node's default)")
    ap.add_argument("--start-timeout", type=float, default=600)
    a = ap.parse_args()

    runner = shlex.split(a.runner)
    if a.max_instances is None and runner:
        a.max_instances = 8
    if a.deadline_ms is None and runner:
        a.deadline_ms = 1000
    binary = os.path.abspath(a.binary)
    plugin = a.plugin or os.path.join(ROOT, "target/wasm-plugins/wasm32-wasip2/plugin/holdfast_example_alert_router.wasm")
    if not os.path.exists(plugin):
        fail(f"{plugin} not found: build the workspace first, or pass --plugin")
    work = tempfile.mkdtemp(prefix="holdfast-smoke-")
    log = os.path.join(work, "node.log")
    proc = None
    origin = None
    try:
        # The origin: a 1 MiB object under /pool/, served by Python's HTTP server.
        pool = os.path.join(work, "www", "pool")
        os.makedirs(pool)
        body = hashlib.sha256(b"smoke").digest() * (1 << 15)
        with open(os.path.join(pool, "t.bin"), "wb") as f:
            f.write(body)
        origin = http.server.ThreadingHTTPServer(
            ("127.0.0.1", 0), lambda *x: Origin(*x, directory=os.path.join(work, "www")))
        threading.Thread(target=origin.serve_forever, daemon=True).start()

        mqtt_port, cache_port, admin_port = free_port(), free_port(), free_port()
        conf = os.path.join(work, "holdfast.toml")
        # Under qemu-user a debug build runs tens of times slower than native: a plugin
        # call's 10 ms deadline would interrupt ordinary calls (the CI machine saw the
        # auth and router calls time out), so emulated runs give each call a second.
        slot = f"deadline_ms = {a.deadline_ms}\n" if a.deadline_ms else ""
        with open(conf, "w") as f:
            f.write(
                f'[node]\nid = "smoke"\ndata_dir = "{work}/data"\n'
                f'[admin]\nlisten = "127.0.0.1:{admin_port}"\n'
                f'[mqtt.tcp]\nlisten = "127.0.0.1:{mqtt_port}"\n'
                f'[cache]\nlisten = "127.0.0.1:{cache_port}"\n'
                # Under qemu-user the pool's reserved address space costs real memory (qemu
                # tracks the guest's pages): reserve for 8 instances instead of 128.
                + (f"[plugins]\nmax_instances = {a.max_instances}\n" if a.max_instances else "")
                + f"[plugins.router]\n{slot}"
                + "[plugins.router.config]\ndefault_upstream = false\nlocal_by_default = true\n"
                + f"[plugins.auth]\n{slot}"
                + "[plugins.auth.config]\nallow_anonymous = true\n"
                + f"[plugins.content-source]\n{slot}"
                + '[[plugins.content-source.config.sources]]\nname = "smoke"\nhosts = ["origin.test"]\n'
                f'origin = "http://127.0.0.1:{origin.server_address[1]}"\nimmutable = ["/pool/**"]\nother = "deny"\n'
            )

        def cli(*args, check=True):
            r = subprocess.run(runner + [binary, "--config", conf, *args], capture_output=True, text=True, timeout=300)
            if check and r.returncode != 0:
                fail(f"holdfast {' '.join(args)} exited {r.returncode}: {r.stderr.strip()}", log)
            return r

        print(f"binary   {binary}: {os.path.getsize(binary) / 1e6:.1f} MB"
              + (f", run with {a.runner}" if a.runner else ""), flush=True)
        v = cli("--version")
        print(f"version  {v.stdout.strip()}", flush=True)

        started = time.monotonic()
        logf = open(log, "w")
        proc = subprocess.Popen(runner + [binary, "run", "--config", conf], stdout=logf, stderr=logf,
                                env=dict(os.environ, RUST_LOG="info"))
        deadline = started + a.start_timeout
        while True:
            if proc.poll() is not None:
                fail(f"the node exited with {proc.returncode} while starting", log)
            try:
                with socket.create_connection(("127.0.0.1", mqtt_port), timeout=0.5):
                    pass
                with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/healthz", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                fail(f"the node did not answer within {a.start_timeout:.0f} s", log)
            time.sleep(0.5)
        print(f"start    {time.monotonic() - started:.1f} s to healthy (first start: plugins compiled)", flush=True)
        time.sleep(3)
        print(f"idle RSS {rss_kib(proc.pid) / 1024:.1f} MiB" + (" (of the qemu-user process)" if runner else ""),
              flush=True)

        try:
            qos1_round_trip(mqtt_port, "smoke/one", b"hello from the smoke test")
        except Exception as e:  # noqa: BLE001 - reported as the test's failure
            fail(f"QoS 1 round trip: {e}", log)
        print("ok       MQTT QoS 1 round trip", flush=True)

        before = json.loads(cli("--json", "plugin", "list").stdout)
        t0 = time.monotonic()
        # The alert router has its own config (examples/alert-router/README.md).
        swap_conf = os.path.join(work, "alert-router.toml")
        with open(swap_conf, "w") as f:
            f.write("default_lane = 5\n")
        cli("plugin", "swap", "router", plugin, "--plugin-config", swap_conf)
        swap_s = time.monotonic() - t0
        after = json.loads(cli("--json", "plugin", "list").stdout)

        def router_version(listing):
            slots = listing if isinstance(listing, list) else listing.get("slots", listing.get("plugins", []))
            for s in slots:
                if s.get("slot") == "router":
                    v = s.get("version") or s.get("hash") or s.get("version_hash")
                    if not v:
                        fail(f"the router slot shows no version: {s}", log)
                    return v
            fail(f"no router slot in {listing}", log)

        if router_version(before) == router_version(after):
            fail(f"the router's version did not change: {router_version(after)}", log)
        cli("plugin", "rollback", "router")
        back = json.loads(cli("--json", "plugin", "list").stdout)
        if router_version(back) != router_version(before):
            fail(f"after the rollback the router is {router_version(back)}, not {router_version(before)}", log)
        try:
            qos1_round_trip(mqtt_port, "smoke/two", b"after the swap")
        except Exception as e:  # noqa: BLE001
            fail(f"QoS 1 round trip after the swap and rollback: {e}", log)
        print(f"ok       plugin swap ({swap_s:.1f} s, compiled for this architecture), rollback, QoS 1 again",
              flush=True)

        for what in ("miss", "hit"):
            req = urllib.request.Request(f"http://127.0.0.1:{cache_port}/pool/t.bin",
                                         headers={"Host": "origin.test", "Range": "bytes=1000-66535"})
            with urllib.request.urlopen(req, timeout=120) as r:
                got, status, cr = r.read(), r.status, r.headers.get("Content-Range")
            if status != 206 or got != body[1000:66536] or cr != f"bytes 1000-66535/{len(body)}":
                fail(f"range ({what}): status {status}, Content-Range {cr}, {len(got)} bytes, "
                     f"{'equal' if got == body[1000:66536] else 'different'}", log)
        print("ok       range cache: 206 with the right bytes, miss then hit", flush=True)
        print("PASS", flush=True)
    finally:
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
        if origin is not None:
            origin.shutdown()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
