#!/usr/bin/env python3
"""Cloud-to-device queues across an outage, and MQTT over WebSockets beside TCP.

    python3 scripts/bench-offline.py [--devices 20] [--per-device 50] [--messages 20000] [--no-build]

  c2d  A root and a child gateway joined through tools/link-proxy. The link is
       cut; --devices x --per-device cloud-to-device messages are sent at the
       root through the admin API for devices behind the gateway (all queued
       at the root). Measured: the time to send them; from restoring the link
       until the root's queues are empty (every message stored at the
       gateway and acknowledged); then, with every device connecting and
       subscribing at once, until all messages arrived; and until the root
       has a `delivered` feedback record for each.
  ws   One paho-mqtt client publishes --messages QoS 1 messages of 200 bytes
       (100 in flight) to a node, alternately over TCP and over WebSockets
       (`[mqtt.ws]`), 3 rounds each. The client is Python, so this compares the
       two transports under the same client, not the broker's ceiling.

Results go to stdout and, as JSON, to target/bench-offline.json.
"""

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import tempfile
import threading
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
spec = importlib.util.spec_from_file_location("bench_link", os.path.join(HERE, "bench-link.py"))
bl = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bl)

OPEN = '[cache]\nenabled = false\n[plugins.auth.config]\nallow_anonymous = true\nanonymous_topics = ["#"]\n'


def post(node, path, body):
    req = urllib.request.Request(f"http://127.0.0.1:{node.admin}{path}", data=json.dumps(body).encode(),
                                 headers={"Authorization": f"Bearer {bl.TOKEN}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def wait(what, f, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if f():
            return time.time()
        time.sleep(0.01)
    raise SystemExit(f"timed out: {what}")


def c2d(work, devices, per_device):
    import paho.mqtt.client as mqtt

    certs = bl.fleet(work, ["root", "gw1"])
    link_port = bl.free_port()
    ids = "".join(f'[[identities]]\nid = "d{i}"\nkind = "device"\nparent = "gw1"\n' for i in range(devices))
    root = bl.Node(work, "root", OPEN + bl.fleet_section(certs, "root")
                   + f'[iothub]\nc2d_max_queued_per_device = {per_device}\n'
                   + f'[link]\nenabled = true\nlisten = "127.0.0.1:{link_port}"\n'
                   + '[[identities]]\nid = "gw1"\nkind = "gateway"\nparent = "root"\n' + ids)
    proxy = bl.Proxy(f"127.0.0.1:{link_port}")
    gw = bl.Node(work, "gw1", OPEN + bl.fleet_section(certs, "gw1")
                 + f'[iothub]\nc2d_max_queued_per_device = {per_device}\n'
                 + '[upstream]\nkind = "quic"\nprobe_interval_ms = 50\n'
                 + f'[upstream.quic]\nparent = "{proxy.udp}"\nparent_id = "root"\n')
    bl.wait_up(gw)
    wait("the scope at gw1", lambda: subprocess.run([bl.HOLDFAST, "device", "show", f"d{devices - 1}", "--config",
                                                     gw.config], capture_output=True).returncode == 0)
    proxy.cmd("cut")
    wait("gw1 down", lambda: gw.link()["state"] != "up")
    t0 = time.time()
    for k in range(per_device):
        for i in range(devices):
            r = post(root, f"/api/v1/devices/d{i}/messages", {"payload": f"m{k}"})
            assert r["state"] == "queued", r
    sent = time.time() - t0
    n = devices * per_device
    t1 = time.time()
    proxy.cmd("up")
    down = wait("the root's queues to empty", lambda: not bl.api(root.admin, "/api/v1/c2d")["queues"]) - t1
    got = {}
    lock = threading.Lock()
    clients = []

    def on_message(c, userdata, msg):
        with lock:
            got.setdefault(userdata, []).append(msg.payload.decode())

    t2 = time.time()
    for i in range(devices):
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"d{i}", userdata=f"d{i}")
        c.on_message = on_message
        c.connect("127.0.0.1", gw.mqtt)
        c.subscribe(f"devices/d{i}/messages/devicebound/#", qos=1)
        c.loop_start()
        clients.append(c)
    delivered = wait("every message at its device", lambda: sum(len(v) for v in got.values()) >= n) - t2
    feedback = wait("the feedback at the root", lambda: sum(
        1 for f in bl.api(root.admin, f"/api/v1/c2d?limit={n}")["feedback"] if f["outcome"] == "delivered") >= n) - t2
    in_order = all(v == [f"m{k}" for k in range(per_device)] for v in got.values())
    for c in clients:
        c.loop_stop()
    for node in (gw, root):
        node.stop()
    proxy.stop()
    return {"messages": n, "send_s": sent, "sends_per_s": n / sent, "to_gateway_s": down,
            "to_devices_s": delivered, "feedback_at_root_s": feedback, "in_order": in_order}


def ws(work, messages, rounds):
    import paho.mqtt.client as mqtt

    port = bl.free_port()
    node = bl.Node(work, "wsnode", OPEN + f'[mqtt.ws]\nenabled = true\nlisten = "127.0.0.1:{port}"\n')
    payload = b"x" * 200

    def run(transport):
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-{transport}", transport=transport)
        c.max_inflight_messages_set(100)
        if transport == "websockets":
            c.ws_set_options(path="/mqtt")
        done = threading.Event()
        acked = [0]

        def on_publish(_c, _u, _mid, _rc, _p):
            acked[0] += 1
            if acked[0] >= messages:
                done.set()

        c.on_publish = on_publish
        c.connect("127.0.0.1", port if transport == "websockets" else node.mqtt)
        c.loop_start()
        t = time.time()
        for _ in range(messages):
            c.publish("bench/ws", payload, qos=1)
        done.wait(300)
        secs = time.time() - t
        c.disconnect()
        c.loop_stop()
        return messages / secs

    out = {"tcp": [], "websockets": []}
    for _ in range(rounds):
        for t in ("tcp", "websockets"):
            out[t].append(run(t))
    node.stop()
    med = {t: statistics.median(v) for t, v in out.items()}
    return {"messages": messages, "rounds_msgs_per_s": out, "median_tcp": med["tcp"],
            "median_ws": med["websockets"], "ratio_ws_to_tcp": med["websockets"] / med["tcp"]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, default=20)
    ap.add_argument("--per-device", type=int, default=50)
    ap.add_argument("--messages", type=int, default=20_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-build", action="store_true")
    a = ap.parse_args()
    if not a.no_build:
        subprocess.run(["cargo", "build", "--release", "-p", "holdfast", "-p", "holdfast-link-proxy"],
                       check=True, cwd=bl.ROOT)
    out = {}
    with tempfile.TemporaryDirectory() as work:
        os.makedirs(os.path.join(work, "c2d"))
        r = c2d(os.path.join(work, "c2d"), a.devices, a.per_device)
        out["c2d"] = r
        print(f"c2d: {r['messages']} messages queued at the root in {r['send_s']:.1f} s ({r['sends_per_s']:.0f}/s); "
              f"at the gateway {r['to_gateway_s']:.2f} s after the link was restored; at the devices "
              f"{r['to_devices_s']:.2f} s after they connected (in order: {r['in_order']}); all feedback at the root "
              f"after {r['feedback_at_root_s']:.2f} s", flush=True)
        os.makedirs(os.path.join(work, "ws"))
        w = ws(os.path.join(work, "ws"), a.messages, a.rounds)
        out["ws"] = w
        print(f"ws: QoS 1 publishes by one paho client, median msgs/s: tcp {w['median_tcp']:.0f}, websockets "
              f"{w['median_ws']:.0f} (ratio {w['ratio_ws_to_tcp']:.2f}); rounds {w['rounds_msgs_per_s']}", flush=True)
    bl.write_json("bench-offline", out)


if __name__ == "__main__":
    main()
