#!/usr/bin/env python3
"""An IoT Hub device as the SDKs build it, on paho-mqtt (MQTT 3.1.1, SAS token).

Used by tests/e2e_iothub.rs. Usage: paho_device.py PORT DEVICE_ID KEY_BASE64

Sends telemetry with a property bag, reads its twin, patches reported
properties, then prints READY, answers one direct method and waits for one
desired-property patch. Each step prints one line; any failure exits 1.
"""
import base64
import hashlib
import hmac
import json
import queue
import sys
import time
import urllib.parse

import paho.mqtt.client as mqtt

HUB = "hub.example"


def sas(device, key_b64, expiry):
    sr = urllib.parse.quote(f"{HUB}/devices/{device}", safe="")
    sig = hmac.new(base64.b64decode(key_b64), f"{sr}\n{expiry}".encode(), hashlib.sha256).digest()
    sig = urllib.parse.quote(base64.b64encode(sig).decode(), safe="")
    return f"SharedAccessSignature sr={sr}&sig={sig}&se={expiry}"


def main():
    port, device, key = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    inbox = queue.Queue()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=device, protocol=mqtt.MQTTv311)
    client.username_pw_set(f"{HUB}/{device}/?api-version=2021-04-12", sas(device, key, int(time.time()) + 3600))
    client.on_message = lambda c, u, m: inbox.put((m.topic, m.payload))
    connected = queue.Queue()
    client.on_connect = lambda c, u, f, rc, p: connected.put(rc)
    client.connect("127.0.0.1", port, keepalive=30)
    client.loop_start()
    rc = connected.get(timeout=10)
    if rc != 0:
        print(f"refused {rc}", flush=True)
        sys.exit(1)
    for f in ("$iothub/twin/res/#", "$iothub/twin/PATCH/properties/desired/#", "$iothub/methods/POST/#"):
        client.subscribe(f, qos=1)

    def expect(prefix, timeout=15):
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                topic, payload = inbox.get(timeout=max(0.05, deadline - time.time()))
            except queue.Empty:
                break
            if topic.startswith(prefix):
                return topic, payload
        print(f"nothing on {prefix}", flush=True)
        sys.exit(1)

    bag = urllib.parse.urlencode({"$.ct": "application/json", "$.ce": "utf-8", "source": "paho"})
    client.publish(f"devices/{device}/messages/events/{bag}", json.dumps({"t": 1}), qos=1).wait_for_publish(10)
    print("telemetry sent", flush=True)

    time.sleep(0.2)  # the subscriptions are acknowledged by now on loopback
    client.publish("$iothub/twin/GET/?$rid=1", b"", qos=1)
    topic, payload = expect("$iothub/twin/res/")
    doc = json.loads(payload)
    print(f"twin {topic.split('/')[3]} desired={doc['desired']['$version']} reported={doc['reported']['$version']}", flush=True)

    client.publish("$iothub/twin/PATCH/properties/reported/?$rid=2", json.dumps({"client": "paho"}), qos=1)
    topic, _ = expect("$iothub/twin/res/")
    print(f"patched {topic}", flush=True)

    print("READY", flush=True)
    topic, payload = expect("$iothub/methods/POST/", 30)
    name, query = topic[len("$iothub/methods/POST/"):].split("/?", 1)
    rid = urllib.parse.parse_qs(query)["$rid"][0]
    client.publish(f"$iothub/methods/res/200/?$rid={rid}", json.dumps({"from": "paho", "method": name, "got": json.loads(payload)}), qos=1)
    print(f"answered {name}", flush=True)

    topic, payload = expect("$iothub/twin/PATCH/properties/desired/", 30)
    print(f"desired {topic.split('$version=')[1]} {json.dumps(json.loads(payload), sort_keys=True)}", flush=True)
    client.loop_stop()
    client.disconnect()


if __name__ == "__main__":
    main()
