#!/usr/bin/env python3
"""Restart-to-ready after a SIGKILL, with a large outbox backlog.

    python3 scripts/bench-restart.py [--backlog-mb 1024] [--payload 4096] [--rounds 5] [--no-build]
                                     [--modes warm,cold,torn,empty] [--holdfast PATH]

A node whose upstream is a QUIC parent nobody listens on is filled over MQTT
(QoS 1, --payload bytes per message) until its outbox holds --backlog-mb MB.
Then, per round: the node runs with publishers still sending, is killed with
SIGKILL in the middle of that load (unflushed journal, writes in flight), and
is started again. Measured: from spawning the process to the first TCP MQTT
CONNECT answered by a CONNACK (return code 0), polled every 5 ms with a raw
socket; and to the admin API answering. Modes, alternating within a round:

  warm     the compiled-plugin cache as the killed node left it
  cold     the compiled-plugin cache directory deleted before the start
  torn     every cache entry cut to half its length before the start (what an
           unsynced cache looked like after a power cut): found damaged,
           removed and rebuilt
  empty    warm cache, a second node with an empty outbox, killed idle (the
           baseline)

The node's own start-phase log lines ("start phase", debug level for the
host's phases, the store and outbox) are collected from its log and summed by
phase. Results go to stdout and, as JSON, to target/bench-restart.json.
"""

import argparse
import importlib.util
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
spec = importlib.util.spec_from_file_location("bench_link", os.path.join(HERE, "bench-link.py"))
bl = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bl)

CONNECT = bytes([0x10, 0x13, 0x00, 0x04]) + b"MQTT" + bytes([0x04, 0x02, 0x00, 0x3C, 0x00, 0x07]) + b"restart"


def connack(port):
    """True when a TCP MQTT 3.1.1 CONNECT on `port` gets CONNACK code 0."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            s.sendall(CONNECT)
            got = b""
            while len(got) < 4:
                chunk = s.recv(4 - len(got))
                if not chunk:
                    return False
                got += chunk
            return got[0] == 0x20 and got[3] == 0
    except OSError:
        return False


def admin_up(node):
    try:
        bl.api(node.admin, "/api/v1/node")
        return True
    except OSError:
        return False


class Restartable(bl.Node):
    """A bench-link Node that can be killed and timed back to ready."""

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def timed_start(self):
        """Spawns the node; returns (s to CONNACK, s to admin API)."""
        log = open(os.path.join(self.dir, "node.log"), "a")
        log.write("=== timed start ===\n")
        log.flush()
        t0 = time.monotonic()
        self.proc = subprocess.Popen([bl.HOLDFAST, "run", "--config", self.config], stdout=log, stderr=log)
        ready = admin = None
        deadline = t0 + 120
        while time.monotonic() < deadline and (ready is None or admin is None):
            if self.proc.poll() is not None:
                sys.exit(f"{self.name} exited; see {self.dir}/node.log")
            if ready is None and connack(self.mqtt):
                ready = time.monotonic() - t0
            if admin is None and admin_up(self):
                admin = time.monotonic() - t0
            time.sleep(0.005)
        if ready is None or admin is None:
            sys.exit(f"{self.name} not ready in 120 s")
        return ready, admin

    def cache_dir(self):
        return os.path.join(self.dir, "data", "plugin-cache")


def publish(node, secs, payload, publishers=8, rate=100_000):
    return subprocess.Popen(
        [bl.MQTT_BENCH, "--port", str(node.mqtt), "--publishers", str(publishers), "--subscribers", "0",
         "--qos", "1", "--payload", str(payload), "--rate", str(rate), "--duration", f"{secs:.2f}",
         "--warmup", "0", "--drain", "5", "--inflight", "64", "--json"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


def fill(node, target_bytes, payload):
    """Publishes until the outbox holds target_bytes."""
    t0 = time.time()
    while True:
        n, b = node.queued()
        if b >= target_bytes:
            print(f"  filled: {n:,} messages, {b / 1e6:,.0f} MB in {time.time() - t0:.0f} s", flush=True)
            return n, b
        # Short bursts: the fill rate is 30-150 MB/s depending on the disk.
        secs = max(0.5, min(3.0, (target_bytes - b) / 150e6))
        publish(node, secs, payload, publishers=16).wait()


def kill_under_load(node, payload):
    """Publishes (4 clients, 2,000 messages/s in all) and SIGKILLs the node in
    the middle of it: appends in flight, a journal not yet flushed."""
    load = publish(node, 2.0, payload, publishers=4, rate=2000)
    time.sleep(1.0)
    node.kill()
    load.wait()


def prepare(node, mode):
    cache = node.cache_dir()
    if mode == "cold":
        shutil.rmtree(cache, ignore_errors=True)
    elif mode == "torn":
        for name in os.listdir(cache):
            path = os.path.join(cache, name)
            with open(path, "r+b") as f:
                f.truncate(os.path.getsize(path) // 2)


PHASE = re.compile(r'start phase.*?phase="?([\w:-]+)"?.*?\bms=(\d+)')


def phases(node):
    """Per-phase durations logged by the last start, if any."""
    with open(os.path.join(node.dir, "node.log"), errors="replace") as f:
        text = f.read()
    last = text.rsplit("=== timed start ===", 1)[-1]
    out = {}
    for m in PHASE.finditer(re.sub(r"\x1b\[[0-9;]*m", "", last)):
        out[m.group(1)] = out.get(m.group(1), 0) + int(m.group(2))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--backlog-mb", type=int, default=1024)
    ap.add_argument("--payload", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--modes", default="warm,cold,torn,empty")
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the data directories")
    ap.add_argument("--holdfast", help="the holdfast binary to measure (default: target/release/holdfast)")
    a = ap.parse_args()
    if a.holdfast:
        bl.HOLDFAST = os.path.abspath(a.holdfast)
        a.no_build = True
    if not a.no_build:
        subprocess.run(["cargo", "build", "--release", "-p", "holdfast", "-p", "holdfast-mqtt-bench"],
                       cwd=bl.ROOT, check=True)
    modes = a.modes.split(",")
    work = tempfile.mkdtemp(prefix="holdfast-bench-restart-", dir=os.environ.get("HOLDFAST_BENCH_DIR"))
    certs = bl.fleet(work, ["gw1", "idle"])
    dead_parent = bl.free_port()  # nobody listens here
    extra = lambda i: (bl.fleet_section(certs, i)
                       + f'[upstream]\nkind = "quic"\n[upstream.quic]\nparent = "127.0.0.1:{dead_parent}"\n'
                       + 'parent_id = "root"\n[log]\nlevel = "info,holdfast=debug"\n'
                       # The range cache on, as by default, on a port of its own.
                       + f'[cache]\nlisten = "127.0.0.1:{bl.free_port()}"\n')
    node = Restartable(work, "gw1", extra("gw1"))
    print(f"filling {a.backlog_mb} MB of {a.payload}-byte messages ...", flush=True)
    messages, nbytes = fill(node, a.backlog_mb * 1_000_000, a.payload)
    idle = Restartable(work, "idle", extra("idle")) if "empty" in modes else None
    results = {m: [] for m in modes}
    try:
        for r in range(a.rounds):
            for mode in modes:
                target = idle if mode == "empty" else node
                if mode == "empty":
                    target.kill()  # idle: nothing queued, nothing in flight
                else:
                    kill_under_load(target, a.payload)
                prepare(target, mode)
                ready, admin = target.timed_start()
                ph = phases(target)
                results[mode].append({"connack_s": ready, "admin_s": admin, "phases_ms": ph})
                print(f"  round {r + 1} {mode:5}: CONNACK {ready * 1000:7.0f} ms, admin {admin * 1000:7.0f} ms  {ph}",
                      flush=True)
        after, after_bytes = node.queued()
    finally:
        node.stop()
        if idle:
            idle.stop()
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)

    print(f"\nbacklog: {messages:,} messages, {nbytes / 1e6:,.0f} MB at the first kill; "
          f"{after:,} messages, {after_bytes / 1e6:,.0f} MB at the end")
    print(f"{'mode':6} {'CONNACK median':>15} {'min':>7} {'max':>7} {'admin median':>13}   rounds (ms)")
    summary = {}
    for mode in modes:
        c = [x["connack_s"] * 1000 for x in results[mode]]
        ad = [x["admin_s"] * 1000 for x in results[mode]]
        summary[mode] = {"connack_median_ms": statistics.median(c), "connack_min_ms": min(c),
                         "connack_max_ms": max(c), "admin_median_ms": statistics.median(ad)}
        print(f"{mode:6} {statistics.median(c):12.0f} ms {min(c):5.0f} {max(c):7.0f} {statistics.median(ad):10.0f} ms"
              f"   {', '.join(f'{x:.0f}' for x in c)}")
    if "warm" in summary and "cold" in summary:
        print(f"cold / warm (median CONNACK): {summary['cold']['connack_median_ms'] / summary['warm']['connack_median_ms']:.2f}")
    bl.write_json("bench-restart", {"backlog_messages": messages, "backlog_bytes": nbytes, "payload": a.payload,
                                    "rounds": results, "summary": summary})


if __name__ == "__main__":
    main()
