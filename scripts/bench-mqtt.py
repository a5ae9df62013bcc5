#!/usr/bin/env python3
"""Holdfast's MQTT broker beside Mosquitto 2, measured in one run by the same
load generator (tools/mqtt-bench).

    python3 scripts/bench-mqtt.py [--rounds 3] [--duration 10] [--quick]

Scenarios (each run `--rounds` times, the two brokers alternating; medians
are reported with the Holdfast/Mosquitto ratio):

  upstream-qos1   32 publishers, QoS 1, 256 B, no subscribers. Holdfast routes
                  every message upstream into the durable outbox and sends the
                  PUBACK only after the group commit's fdatasync; Mosquitto
                  acknowledges from memory.
  local-qos0/1    4 publishers -> 1 subscriber through the router's `local`
                  action: throughput at full speed, then latency at a fixed
                  10,000 msg/s.
  idle memory     RSS after start (default plugins loaded), then with 10,000
                  idle connected clients.

Results go to stdout and, as JSON, to target/bench-mqtt.json.
"""

import argparse
import json
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOLDFAST = os.path.join(ROOT, "target/release/holdfast")
BENCH = os.path.join(ROOT, "target/release/holdfast-mqtt-bench")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def raise_nofile(want=0):
    """Raises the open-files limit to the hard limit, and above it to `want` when
    allowed (root): the brokers and the load generator inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if want > hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
            return
        except (ValueError, OSError) as e:
            print(f"warning: cannot raise the open-files limit to {want} ({e}); it stays at {hard}", flush=True)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def wait_port(port, proc, what):
    deadline = time.time() + 60
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"{what} exited early with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"{what} did not start listening on {port}")


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class Broker:
    def __init__(self, name, argv, port, workdir):
        self.name, self.port = name, port
        self.log = open(os.path.join(workdir, f"{name}.log"), "w")
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=self.log, preexec_fn=raise_nofile)
        wait_port(port, self.proc, name)

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def start_mosquitto(workdir):
    port = free_port()
    conf = os.path.join(workdir, "mosquitto.conf")
    with open(conf, "w") as f:
        f.write(
            f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
            # Same socket option Holdfast uses, and a queue that does not drop
            # what a subscriber has not read yet (the defaults are false, 1000).
            "set_tcp_nodelay true\nmax_queued_messages 1000000\n"
        )
    return Broker("mosquitto", ["/usr/sbin/mosquitto", "-c", conf], port, workdir)


def start_holdfast(workdir, name, router, fresh=True):
    port = free_port()
    data = os.path.join(workdir, name + "-data")
    if fresh:
        shutil.rmtree(data, ignore_errors=True)
    conf = os.path.join(workdir, name + ".toml")
    with open(conf, "w") as f:
        f.write(
            f'[node]\nid = "{name}"\ndata_dir = "{data}"\n'
            f'[admin]\nlisten = "127.0.0.1:{free_port()}"\n'
            f'[mqtt.tcp]\nlisten = "127.0.0.1:{port}"\n'
            "[mqtt]\nmax_queued_messages = 1000000\nmax_connections = 1000000\n"
            f"[plugins.router.config]\n{router}\n"
            "[plugins.auth.config]\nallow_anonymous = true\n"
        )
    env = dict(os.environ, RUST_LOG="warn")
    log = open(os.path.join(workdir, f"{name}.log"), "w")
    proc = subprocess.Popen([HOLDFAST, "run", "--config", conf], stdout=log, stderr=log, env=env, preexec_fn=raise_nofile)
    b = Broker.__new__(Broker)
    b.name, b.port, b.proc, b.log = name, port, proc, log
    wait_port(port, proc, name)
    return b


UPSTREAM = "default_lane = 5\ndefault_upstream = true\nlocal_by_default = false"
LOCAL = "default_upstream = false\nlocal_by_default = true"


def bench(port, args):
    out = subprocess.run(
        [BENCH, "--port", str(port), "--json"] + args, capture_output=True, text=True, preexec_fn=raise_nofile
    )
    if out.returncode not in (0, 3):
        sys.exit(f"bench {args} failed ({out.returncode}): {out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def med(xs):
    return statistics.median(xs) if xs else float("nan")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--idle-clients", type=int, default=10000)
    ap.add_argument("--quick", action="store_true", help="1 round, 3 s runs, 1000 idle clients")
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--memory-only", action="store_true", help="only the idle memory measurement")
    a = ap.parse_args()
    if a.quick:
        a.rounds, a.duration, a.idle_clients = 1, 3, 1000
    if not a.no_build:
        subprocess.run(
            ["cargo", "build", "--release", "--locked", "-p", "holdfast", "-p", "holdfast-mqtt-bench"], cwd=ROOT, check=True
        )
    if not os.path.exists("/usr/sbin/mosquitto"):
        sys.exit("Mosquitto is not installed: run scripts/setup.sh")
    raise_nofile(a.idle_clients * 2 + 4096)
    work = tempfile.mkdtemp(prefix="holdfast-bench-")
    dur = ["--duration", str(a.duration), "--warmup", "2"]
    scenarios = {
        "upstream-qos1": (UPSTREAM, ["--publishers", "32", "--subscribers", "0", "--qos", "1", "--payload", "256"] + dur),
        "local-qos0": (LOCAL, ["--publishers", "4", "--subscribers", "1", "--qos", "0", "--payload", "256"] + dur),
        "local-qos1": (LOCAL, ["--publishers", "4", "--subscribers", "1", "--qos", "1", "--payload", "256"] + dur),
        "local-qos0-10k": (LOCAL, ["--publishers", "4", "--subscribers", "1", "--qos", "0", "--payload", "256", "--rate", "10000"] + dur),
        "local-qos1-10k": (LOCAL, ["--publishers", "4", "--subscribers", "1", "--qos", "1", "--payload", "256", "--rate", "10000"] + dur),
    }
    results = {}
    if a.memory_only:
        scenarios = {}
    for name, (router, args) in scenarios.items():
        for peer in ("holdfast", "mosquitto"):
            results[(name, peer)] = []
        for r in range(a.rounds):
            # Alternate which broker goes first, so drift on a shared machine
            # does not favour one.
            order = ("holdfast", "mosquitto") if r % 2 == 0 else ("mosquitto", "holdfast")
            for peer in order:
                b = start_holdfast(work, f"hf-{name}-{r}", router) if peer == "holdfast" else start_mosquitto(work)
                try:
                    res = bench(b.port, args)
                finally:
                    b.stop()
                    shutil.rmtree(os.path.join(work, f"hf-{name}-{r}-data"), ignore_errors=True)
                results[(name, peer)].append(res)
                print(
                    f"{name:16} {peer:9} round {r}: publish {res['publish']['throughput_per_s']:>9.0f}/s"
                    f"  delivered {res['delivered']['per_s']:>9.0f}/s  e2e p99 {res['latency_us'].get('p99', 0):>9.0f} µs"
                    f"  lost {res['loss']['lost']}",
                    flush=True,
                )
    # Idle memory.
    memory = {}
    first_start = None
    for peer in ("holdfast", "mosquitto"):
        if peer == "holdfast":
            # The very first start compiles the plugins (cranelift); every later
            # start loads them from the compiled-artifact cache. Both are shown;
            # the idle figure is the usual, cached one.
            b = start_holdfast(work, "hf-idle", LOCAL)
            time.sleep(2)
            first_start = rss_kib(b.proc.pid)
            b.stop()
            b = start_holdfast(work, "hf-idle", LOCAL, fresh=False)
        else:
            b = start_mosquitto(work)
        try:
            time.sleep(2)
            idle = rss_kib(b.proc.pid)
            # One loopback address has about 28,000 ephemeral ports.
            sources = max(1, -(-a.idle_clients // 25000))
            res = bench(b.port, ["--idle-clients", str(a.idle_clients), "--duration", "5", "--broker-pid", str(b.proc.pid),
                                 "--source-ips", str(sources)])
        finally:
            b.stop()
        before, after = res["broker_rss_before_kib"], res["broker_rss_after_kib"]
        connected = res["connected"]
        per = (after - before) * 1024 / max(1, connected)
        memory[peer] = {"idle_rss_kib": idle, "first_start_rss_kib": first_start if peer == "holdfast" else None,
                        "rss_before_kib": before, "rss_with_clients_kib": after,
                        "clients": a.idle_clients, "connected": connected, "bytes_per_connection": per,
                        "connect_s": res.get("connect_s")}
        if peer == "holdfast":
            print(f"memory holdfast : first start (compiling the plugins) {first_start / 1024:.1f} MiB", flush=True)
        print(f"memory {peer:9}: idle RSS {idle / 1024:.1f} MiB; with {connected}/{a.idle_clients} clients "
              f"{after / 1024:.1f} MiB = {per:.0f} B per connection; all connected in {res.get('connect_s')} s", flush=True)

    print("\nmedians (Holdfast / Mosquitto):")
    summary = {}
    for name in scenarios:
        h, m = results[(name, "holdfast")], results[(name, "mosquitto")]
        row = {}
        for key, get in [
            ("publish_per_s", lambda x: x["publish"]["throughput_per_s"]),
            ("delivered_per_s", lambda x: x["delivered"]["per_s"]),
            ("e2e_p50_us", lambda x: x["latency_us"].get("p50", float("nan"))),
            ("e2e_p99_us", lambda x: x["latency_us"].get("p99", float("nan"))),
            ("ack_p99_us", lambda x: (x["ack_latency_us"] or {}).get("p99", float("nan"))),
            ("lost", lambda x: x["loss"]["lost"]),
        ]:
            hv, mv = med([get(x) for x in h]), med([get(x) for x in m])
            row[key] = {"holdfast": hv, "mosquitto": mv, "ratio": (hv / mv) if mv else float("nan")}
        summary[name] = row
        print(f"  {name}")
        for key, v in row.items():
            print(f"    {key:16} holdfast {v['holdfast']:>11.1f}  mosquitto {v['mosquitto']:>11.1f}  ratio {v['ratio']:.2f}")
    out = {"rounds": a.rounds, "duration_s": a.duration, "scenarios": summary, "memory": memory,
           "raw": {f"{k[0]}/{k[1]}": v for k, v in results.items()}}
    os.makedirs(os.path.join(ROOT, "target"), exist_ok=True)
    with open(os.path.join(ROOT, "target/bench-mqtt.json"), "w") as f:
        json.dump(out, f, indent=1)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
