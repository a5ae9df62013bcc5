#!/usr/bin/env python3
"""What tracing costs per message: the durable ingest of scripts/bench-mqtt.py
(32 publishers, QoS 1, 256 B, every message routed upstream into the outbox,
PUBACK after the group commit's fdatasync) against one node, three ways:

  off        [trace] enabled = false (the default): the hooks read one atomic.
  on, 0 %    [trace] enabled, no message traced: no traceparent, sample_ratio 0.
  on, 1 %    [trace] enabled, one message in a hundred traced (sample_ratio 0.01).
  on, 100 %  [trace] enabled, every message traced (sample_ratio 1): receive,
             route, store spans per message, exported over OTLP/HTTP to a
             local sink that reads and discards each request (the sink, a Python
             server on the same 2 cores, takes CPU from the node).
  100 %, away  every message traced, the endpoint refusing connections: the cost
             of recording alone (the export backs off; the ring drops the oldest).
  no hooks   with --baseline BINARY: a build without the trace hooks, to show
             what `off` costs.

    python3 scripts/bench-trace.py [--rounds 3] [--duration 10] [--quick]

The three alternate in each round; medians and the ratio to `off` are printed.
The node's own counters say how many spans were exported and how many the
bounded ring dropped (the sink, a Python server, is slower than the node).
"""

import argparse
import http.server
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("bench_mqtt", os.path.join(ROOT, "scripts/bench-mqtt.py"))
bm = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bm)


class Sink(http.server.BaseHTTPRequestHandler):
    requests = 0
    bytes = 0

    def do_POST(self):  # noqa: N802 - the handler's name
        n = int(self.headers.get("content-length", "0"))
        self.rfile.read(n)
        Sink.requests += 1
        Sink.bytes += n
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *_):
        pass


def start(workdir, name, trace, binary=None):
    port, admin = bm.free_port(), bm.free_port()
    data = os.path.join(workdir, name + "-data")
    conf = os.path.join(workdir, name + ".toml")
    with open(conf, "w") as f:
        f.write(
            f'[node]\nid = "{name}"\ndata_dir = "{data}"\n'
            f'[admin]\nlisten = "127.0.0.1:{admin}"\nmetrics_require_token = false\n'
            f'[mqtt.tcp]\nlisten = "127.0.0.1:{port}"\n'
            "[mqtt]\nmax_queued_messages = 1000000\nmax_connections = 1000000\n"
            f"[plugins.router.config]\n{bm.UPSTREAM}\n"
            "[plugins.auth.config]\nallow_anonymous = true\n"
            + trace
        )
    log = open(os.path.join(workdir, name + ".log"), "w")
    proc = subprocess.Popen([binary or bm.HOLDFAST, "run", "--config", conf], stdout=log, stderr=log,
                            env=dict(os.environ, RUST_LOG="warn"), preexec_fn=bm.raise_nofile)
    b = bm.Broker.__new__(bm.Broker)
    b.name, b.port, b.proc, b.log = name, port, proc, log
    bm.wait_port(port, proc, name)
    b.admin = admin
    return b


def metric(admin, name):
    text = urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5).read().decode()
    m = re.search(r"^" + re.escape(name) + r" (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--quick", action="store_true", help="1 round of 3 s")
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--baseline", metavar="BINARY",
                    help="also run this holdfast binary (e.g. a release build of the commit before the trace hooks), "
                         "with no [trace] section: the cost of the hooks when tracing is off")
    a = ap.parse_args()
    if a.quick:
        a.rounds, a.duration = 1, 3
    if not a.no_build:
        subprocess.run(["cargo", "build", "--release", "-p", "holdfast", "-p", "holdfast-mqtt-bench"],
                       cwd=ROOT, check=True)
    bm.raise_nofile()
    sink = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Sink)
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{sink.server_address[1]}/v1/traces"
    on = f'[trace]\nenabled = true\nendpoint = "{endpoint}"\n'
    away = f'[trace]\nenabled = true\nendpoint = "http://127.0.0.1:{bm.free_port()}/v1/traces"\n'
    cases = [
        ("off", ""),
    ] + ([("no hooks", "")] if a.baseline else []) + [
        ("on, 0 %", on + "sample_ratio = 0.0\n"),
        ("on, 1 %", on + "sample_ratio = 0.01\n"),
        ("on, 100 %", on + "sample_ratio = 1.0\nmax_spans = 100000\n"),
        # Recording alone: nothing listens there, so nothing is encoded or sent
        # after the first refused attempt (the ring fills and drops the oldest).
        ("100 %, away", away + "sample_ratio = 1.0\nmax_spans = 100000\n"),
    ]
    rates = {c: [] for c, _ in cases}
    spans = {c: [] for c, _ in cases}
    with tempfile.TemporaryDirectory() as work:
        for r in range(a.rounds):
            for i, (case, trace) in enumerate(cases):
                node = start(work, f"n{r}{i}", trace, a.baseline if case == "no hooks" else None)
                try:
                    res = bm.bench(node.port, ["--publishers", "32", "--subscribers", "0", "--qos", "1",
                                               "--payload", "256", "--duration", str(a.duration), "--warmup", "2"])
                    time.sleep(2)
                    exported = metric(node.admin, 'holdfast_trace_spans_total{result="exported"}') if trace else 0
                    dropped = metric(node.admin, 'holdfast_trace_spans_total{result="dropped"}') if trace else 0
                finally:
                    node.stop()
                rates[case].append(res["publish"]["throughput_per_s"])
                spans[case].append((exported, dropped))
                print(f"round {r}: {case:<10} {res['publish']['throughput_per_s']:>10,.0f} msg/s"
                      + (f"  spans exported {exported:,.0f}, dropped {dropped:,.0f}" if trace else ""), flush=True)
    base = bm.med(rates["off"])
    print(f"\ndurable ingest, QoS 1 routed upstream, median of {a.rounds} round(s) of {a.duration} s")
    for case, _ in cases:
        m = bm.med(rates[case])
        print(f"  {case:<10} {m:>10,.0f} msg/s   ratio to off {m / base:.3f}")
    print(f"  the sink took {Sink.requests:,} requests, {Sink.bytes / 1e6:,.1f} MB")


if __name__ == "__main__":
    sys.exit(main())
