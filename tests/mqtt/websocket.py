#!/usr/bin/env python3
"""MQTT over WebSockets with paho-mqtt's websocket transport.

Used by tests/e2e_mqtt.rs. Connects over ws:// or wss:// on PATH, subscribes
to ws/<id>/#, publishes 20 QoS 1 messages (one of 200 KB) to itself, and
checks it gets each once, in order. Prints PASS.

Usage: websocket.py --port N --path /mqtt [--protocol 311|5] [--ca ca.pem]
"""
import argparse
import sys
import threading

import paho.mqtt.client as mqtt


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--path", default="/mqtt")
    ap.add_argument("--protocol", default="311")
    ap.add_argument("--ca")
    a = ap.parse_args()
    v5 = a.protocol == "5"
    cid = f"ws-{a.protocol}-{'tls' if a.ca else 'plain'}"
    c = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=cid,
        transport="websockets",
        protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
    )
    c.ws_set_options(path=a.path)
    if a.ca:
        c.tls_set(ca_certs=a.ca)
    subscribed = threading.Event()
    done = threading.Event()
    got = []
    want = [f"m{i}".encode() for i in range(19)] + [b"x" * 200_000]

    def on_subscribe(client, userdata, mid, reasons, props):
        subscribed.set()

    def on_message(client, userdata, msg):
        got.append(msg.payload)
        if len(got) >= len(want):
            done.set()

    c.on_subscribe = on_subscribe
    c.on_message = on_message
    c.connect("localhost" if a.ca else "127.0.0.1", a.port, keepalive=30)
    c.loop_start()
    c.subscribe(f"ws/{cid}/#", qos=1)
    if not subscribed.wait(10):
        sys.exit("no SUBACK")
    for p in want:
        c.publish(f"ws/{cid}/t", p, qos=1).wait_for_publish(10)
    if not done.wait(20):
        sys.exit(f"got {len(got)} of {len(want)} messages")
    c.disconnect()
    c.loop_stop()
    if got != want:
        sys.exit("messages out of order or changed")
    print("PASS")


if __name__ == "__main__":
    main()
