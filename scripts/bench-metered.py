#!/usr/bin/env python3
"""Metered links: bytes on the wire and drain under a byte-rate cap.

    python3 scripts/bench-metered.py [--messages 1000000] [--capped 20000] [--no-build]

  wire     --messages IoT Hub-style JSON telemetry messages (about 200 bytes
           each, from a seeded generator: 200 devices, realistic field
           variety) are queued at a child while its upstream is down, then
           drained through tools/link-proxy, which counts the bytes it
           forwards both ways (UDP or TCP payload: QUIC or MQTT, acks
           included, IP headers not). Three upstreams: the QUIC link with
           compressed batches (holdfast-link/2), the QUIC link without
           (upstream.compression = false), and the MQTT bridge to Mosquitto 2.
  capped   --capped of the same messages drained over the compressed link
           with upstream.max_bytes_per_second = 125000 (1 Mbit/s), while a
           device at the child publishes a live message every 200 ms on the
           same lane (outbox.live_first_lanes = [5]). Measured: the drain
           rate (messages and wire bytes per second) and each live message's
           latency from publish to arrival at the root.

Results go to stdout and, as JSON, to target/bench-metered.json.
"""

import argparse
import importlib.util
import json
import os
import random
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
spec = importlib.util.spec_from_file_location("bench_link", os.path.join(HERE, "bench-link.py"))
bl = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bl)

STATUSES = ["ok", "ok", "ok", "ok", "warning", "maintenance", "low-battery"]


def telemetry(n, seed=7):
    """n JSON telemetry payloads, the same for a given seed."""
    rng = random.Random(seed)
    devices = []
    for i in range(200):
        devices.append({
            "id": f"{rng.choice(['north', 'south', 'east', 'west'])}-{i:03d}",
            "lat": round(47 + rng.random(), 5),
            "lon": round(8 + rng.random(), 5),
            "fw": f"{rng.randint(1, 3)}.{rng.randint(0, 9)}.{rng.randint(0, 20)}",
            "t": 18 + rng.random() * 8,
            "h": 30 + rng.random() * 40,
        })
    t0 = 1_764_835_200
    out = []
    for k in range(n):
        d = devices[rng.randrange(len(devices))]
        d["t"] += rng.gauss(0, 0.05)
        d["h"] = min(99.0, max(1.0, d["h"] + rng.gauss(0, 0.2)))
        ts = t0 + k // 50
        body = {
            "deviceId": d["id"],
            "messageId": "%08x-%04x-4%03x-%04x-%012x" % (rng.getrandbits(32), rng.getrandbits(16), rng.getrandbits(12),
                                                          0x8000 | rng.getrandbits(14), rng.getrandbits(48)),
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + ".%03dZ" % rng.randrange(1000),
            "temperature": round(d["t"], 2),
            "humidity": round(d["h"], 1),
            "pressure": round(1013 + rng.gauss(0, 4), 1),
            "battery": rng.randint(5, 100),
            "status": rng.choice(STATUSES),
        }
        out.append((d["id"], json.dumps(body, separators=(",", ":")).encode()))
    return out


def varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def publish_all(port, messages, client_id="bulk", window=2000):
    """Publishes QoS 1 over one raw MQTT 3.1.1 connection, pipelined."""
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    cid = client_id.encode()
    var = b"\x00\x04MQTT\x04\x02\x00\x3c" + struct.pack(">H", len(cid)) + cid
    s.sendall(b"\x10" + varint(len(var)) + var)
    assert s.recv(4)[0] == 0x20
    acked = [0]

    def reader():
        buf = b""
        while acked[0] < len(messages):
            chunk = s.recv(65536)
            if not chunk:
                return
            buf += chunk
            n = len(buf) // 4
            acked[0] += n
            buf = buf[n * 4:]

    t = threading.Thread(target=reader)
    t.start()
    pkid = 0
    batch = []
    for i, (dev, payload) in enumerate(messages):
        while i - acked[0] >= window:
            time.sleep(0.0005)
        pkid = pkid % 65535 + 1
        topic = f"devices/{dev}/messages/events/".encode()
        body = struct.pack(">H", len(topic)) + topic + struct.pack(">H", pkid) + payload
        batch.append(b"\x32" + varint(len(body)) + body)
        if len(batch) >= 200:
            s.sendall(b"".join(batch))
            batch = []
    if batch:
        s.sendall(b"".join(batch))
    t.join(600)
    s.close()


def fill(node, messages):
    publish_all(node.mqtt, messages)
    deadline = time.time() + 120
    while node.queued()[0] < len(messages) and time.time() < deadline:
        time.sleep(0.05)
    return node.queued()


class TcpProxy(bl.Proxy):
    def __init__(self, target):
        self.proc = subprocess.Popen([bl.PROXY, "--tcp", f"127.0.0.1:0={target}"], stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True)
        info = json.loads(self.proc.stdout.readline())
        self.control = info["control"]
        self.tcp = info["tcp"][0]


def proxy_stats(p):
    host, port = p.control.rsplit(":", 1)
    with socket.create_connection((host, int(port))) as s:
        s.sendall(b"stats\n")
        return json.loads(s.makefile().readline())


def metric(node, name):
    import urllib.request
    req = urllib.request.Request(f"http://127.0.0.1:{node.admin}/metrics",
                                 headers={"Authorization": f"Bearer {bl.TOKEN}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return 0.0


OPEN = '[cache]\nenabled = false\n[plugins.auth.config]\nallow_anonymous = true\nanonymous_topics = ["#"]\n'


def quic_wire(work, name, messages, compress):
    work = os.path.join(work, name)
    os.makedirs(work)
    certs = bl.fleet(work, ["root", name])
    link_port = bl.free_port()
    proxy = bl.Proxy(f"127.0.0.1:{link_port}")
    child = bl.Node(work, name, OPEN + bl.fleet_section(certs, name)
                    + f'[upstream]\nkind = "quic"\ncompression = {str(compress).lower()}\n'
                    + f'[upstream.quic]\nparent = "{proxy.udp}"\nparent_id = "root"\n')
    have, nbytes = fill(child, messages)
    root = bl.Node(work, "root", OPEN + bl.fleet_section(certs, "root")
                   + f'[link]\nenabled = true\nlisten = "127.0.0.1:{link_port}"\n'
                   + f'[[identities]]\nid = "{name}"\nkind = "gateway"\nparent = "root"\n')
    up = bl.wait_up(child)
    done = bl.wait_empty(child)
    stats = proxy_stats(proxy)
    out = {"messages": have, "stored_bytes": nbytes, "wire_bytes": stats["forwarded_bytes"],
           "batch_bytes": metric(child, "holdfast_link_batch_bytes_total"),
           "frame_bytes": metric(child, "holdfast_link_wire_bytes_total"), "seconds": done - up}
    child.stop()
    root.stop()
    proxy.stop()
    return out


def bridge_wire(work, messages):
    mq_dir = os.path.join(work, "mosquitto")
    os.makedirs(mq_dir, exist_ok=True)
    port = bl.free_port()
    conf = os.path.join(mq_dir, "mosquitto.conf")
    with open(conf, "w") as f:
        f.write(f"listener {port} 127.0.0.1\nallow_anonymous true\nmax_inflight_messages 1000\nmax_queued_messages 0\n")
    proxy = TcpProxy(f"127.0.0.1:{port}")
    ph, pp = proxy.tcp.rsplit(":", 1)
    node = bl.Node(work, "bridged", OPEN
                   + f'[upstream]\nkind = "mqtt"\n[upstream.mqtt]\nhost = "{ph}"\nport = {pp}\ninflight = 1000\n')
    have, nbytes = fill(node, messages)
    mq = subprocess.Popen(["mosquitto", "-c", conf], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    up = bl.wait_up(node)
    done = bl.wait_empty(node)
    stats = proxy_stats(proxy)
    node.stop()
    mq.terminate()
    mq.wait()
    proxy.stop()
    return {"messages": have, "stored_bytes": nbytes, "wire_bytes": stats["forwarded_bytes"], "seconds": done - up}


def capped(work, messages, cap):
    import paho.mqtt.client as mqtt

    work = os.path.join(work, "capped")
    os.makedirs(work)
    certs = bl.fleet(work, ["root", "gwc"])
    link_port = bl.free_port()
    proxy = bl.Proxy(f"127.0.0.1:{link_port}")
    # Node() opens [outbox]; this line lands in it.
    child = bl.Node(work, "gwc", "live_first_lanes = [5]\n" + OPEN + bl.fleet_section(certs, "gwc")
                    + f'[upstream]\nkind = "quic"\nmax_bytes_per_second = {cap}\n'
                    + f'[upstream.quic]\nparent = "{proxy.udp}"\nparent_id = "root"\n')
    have, _ = fill(child, messages)
    root = bl.Node(work, "root", OPEN + bl.fleet_section(certs, "root")
                   + f'[link]\nenabled = true\nlisten = "127.0.0.1:{link_port}"\n'
                   + '[[identities]]\nid = "gwc"\nkind = "gateway"\nparent = "root"\n')
    latencies = []
    lock = threading.Lock()

    def on_message(_c, _u, msg):
        sent = float(msg.payload.decode())
        with lock:
            latencies.append((time.time() - sent) * 1000)

    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="live-sub")
    sub.on_message = on_message
    sub.connect("127.0.0.1", root.mqtt)
    sub.subscribe("live/#", qos=1)
    sub.loop_start()
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="live-pub")
    pub.connect("127.0.0.1", child.mqtt)
    pub.loop_start()
    up = bl.wait_up(child)
    before = proxy_stats(proxy)["forwarded_bytes"]
    live_sent = 0
    while child.queued()[0] > 0:
        pub.publish("live/alarm", str(time.time()).encode(), qos=1)
        live_sent += 1
        time.sleep(0.2)
    done = time.time()
    wire = proxy_stats(proxy)["forwarded_bytes"] - before
    time.sleep(2)
    sub.loop_stop()
    pub.loop_stop()
    throttled = metric(child, "holdfast_link_throttled_seconds_total")
    child.stop()
    root.stop()
    proxy.stop()
    secs = done - up
    lat = sorted(latencies)
    return {"messages": have, "cap_bytes_per_s": cap, "seconds": secs, "msgs_per_s": have / secs,
            "wire_bytes_per_s": wire / secs, "throttled_seconds": throttled, "live_sent": live_sent,
            "live_received": len(lat),
            "live_latency_ms": {"median": statistics.median(lat) if lat else None,
                                "p95": lat[int(len(lat) * 0.95)] if lat else None, "max": lat[-1] if lat else None}}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=1_000_000)
    ap.add_argument("--capped", type=int, default=20_000)
    ap.add_argument("--cap", type=int, default=125_000)
    ap.add_argument("--no-build", action="store_true")
    a = ap.parse_args()
    if not a.no_build:
        subprocess.run(["cargo", "build", "--release", "-p", "holdfast", "-p", "holdfast-link-proxy"],
                       check=True, cwd=bl.ROOT)
    msgs = telemetry(a.messages)
    sizes = [len(p) for _, p in msgs]
    print(f"{len(msgs)} messages, payload median {statistics.median(sizes):.0f} B, "
          f"total {sum(sizes) / 1e6:.1f} MB", flush=True)
    out = {"payload_bytes": sum(sizes), "payload_median": statistics.median(sizes)}
    keep = os.environ.get("BENCH_KEEP")
    with (tempfile.TemporaryDirectory() if not keep else open(os.devnull)) as tmp:
        work = keep or tmp
        for key, fn in (("quic_compressed", lambda: quic_wire(work, "gwz", msgs, True)),
                        ("quic_plain", lambda: quic_wire(work, "gwp", msgs, False)),
                        ("bridge_mosquitto", lambda: bridge_wire(work, msgs))):
            r = fn()
            out[key] = r
            print(f"  {key:18} wire {r['wire_bytes'] / 1e6:8.1f} MB  ({r['wire_bytes'] / r['messages']:.1f} B/msg, "
                  f"{r['wire_bytes'] / out['payload_bytes']:.3f} of the payloads)  drained in {r['seconds']:.1f} s",
                  flush=True)
        c = capped(work, msgs[:a.capped], a.cap)
        out["capped"] = c
        print(f"  capped at {a.cap} B/s: {c['messages']} messages in {c['seconds']:.1f} s = {c['msgs_per_s']:.0f} msg/s, "
              f"{c['wire_bytes_per_s']:.0f} wire B/s; live {c['live_received']}/{c['live_sent']}, latency ms "
              f"median {c['live_latency_ms']['median']:.0f} p95 {c['live_latency_ms']['p95']:.0f} "
              f"max {c['live_latency_ms']['max']:.0f}", flush=True)
    bl.write_json("bench-metered", out)


if __name__ == "__main__":
    main()
