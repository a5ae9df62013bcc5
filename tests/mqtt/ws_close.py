#!/usr/bin/env python3
"""The WebSocket closing handshake as paho-mqtt's websocket transport sees it.

Used by tests/e2e_websocket.rs. Connects one client per --client spec, each
publishing QoS 0 and QoS 1 messages every half millisecond or so from its own thread, prints
READY once every client has published, and then waits for the server to end
the connections (the test stops the node). Each client's socket is watched
below paho, in its network thread: a close is clean when nothing there failed
(no "Connection reset by peer", no broken pipe, no TLS EOF without
close_notify: ragged EOFs are not suppressed), the connection ended with an
end of stream, and the client saw the server's reason: for MQTT 3.1.1 the
WebSocket Close frame (paho answers it), for MQTT 5 the DISCONNECT 0x8B
"server shutting down" (paho closes on it). Prints one CLEAN or FAIL line per
client and exits 1 if any failed.

Usage: ws_close.py --client ws:PORT:/path:311 [--client wss:PORT:/path:5 ...] [--ca ca.pem]
"""
import argparse
import ssl
import sys
import threading
import time

import paho.mqtt.client as mqtt

WAIT_READY_S = 15
WAIT_CLOSE_S = 20


class Watched:
    """A socket that records what its network thread saw: errors, the Close
    frame paho answers with, and the end of stream."""

    def __init__(self, sock):
        self._sock = sock
        self.errors = []
        self.answered_close = False
        self.eof = False

    def _record(self, what, err):
        self.errors.append(f"{what}: {type(err).__name__}: {err}")

    def send(self, data, *a):
        # paho answers a Close frame with one send of the whole frame
        # (opcode 8, FIN, unmasked, payload < 126 bytes).
        if len(data) >= 2 and data[0] == 0x88 and len(data) == 2 + (data[1] & 0x7F):
            self.answered_close = True
        try:
            return self._sock.send(data, *a)
        except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise
        except OSError as e:
            self._record("send", e)
            raise

    def recv(self, n, *a):
        try:
            data = self._sock.recv(n, *a)
        except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise
        except OSError as e:
            self._record("recv", e)
            raise
        if not data:
            self.eof = True
        return data

    def __getattr__(self, name):
        return getattr(self._sock, name)


watched_sockets = []
_orig_init = mqtt._WebsocketWrapper.__init__


def _watched_init(self, socket, *a, **kw):
    w = Watched(socket)
    watched_sockets.append(w)
    _orig_init(self, w, *a, **kw)


mqtt._WebsocketWrapper.__init__ = _watched_init


class StrictEofContext(ssl.SSLContext):
    """A TLS end of stream without close_notify is an error, not an EOF."""

    def wrap_socket(self, sock, *a, **kw):
        kw["suppress_ragged_eofs"] = False
        return super().wrap_socket(sock, *a, **kw)


thread_errors = []


def _excepthook(args):
    thread_errors.append(f"{args.thread.name if args.thread else '?'}: {args.exc_type.__name__}: {args.exc_value}")


threading.excepthook = _excepthook


class Device:
    def __init__(self, n, scheme, port, path, protocol, ca):
        self.v5 = protocol == "5"
        self.name = f"wsclose-{n}-{scheme}-{protocol}"
        self.connected = threading.Event()
        self.disconnected = threading.Event()
        self.reason = None
        self.published = 0
        self.log_errors = []
        c = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=self.name,
            transport="websockets",
            protocol=mqtt.MQTTv5 if self.v5 else mqtt.MQTTv311,
        )
        c.ws_set_options(path=path)
        if scheme == "wss":
            ctx = StrictEofContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.load_verify_locations(ca)
            c.tls_set_context(ctx)
        c.on_connect = self.on_connect
        c.on_disconnect = self.on_disconnect
        c.on_log = self.on_log
        self.client = c
        self.host = "localhost" if scheme == "wss" else "127.0.0.1"
        self.port = port
        self.sock = None

    def on_connect(self, client, userdata, flags, reason, props):
        if not reason.is_failure:
            self.connected.set()

    def on_disconnect(self, client, userdata, flags, reason, props):
        self.reason = reason
        self.disconnected.set()
        # No reconnect: the loop thread ends here.
        client.disconnect()

    def on_log(self, client, userdata, level, buf):
        # What paho's network thread reports while the connection ends
        # (not the publishing thread's "not connected" afterwards).
        if level == mqtt.MQTT_LOG_ERR and not self.disconnected.is_set():
            self.log_errors.append(buf)

    def start(self):
        self.client.connect(self.host, self.port, keepalive=30)
        self.sock = watched_sockets[-1]
        self.client.loop_start()
        threading.Thread(target=self.publish, name=f"pub-{self.name}", daemon=True).start()

    def publish(self):
        # Every half millisecond or so: whatever the moment the server
        # closes, the client has just sent something. (Faster, four Python
        # publishers saturate a 2-core machine and starve paho's network
        # thread, which then answers the server's Close after the node's
        # grace: a test of the machine, not of the close.)
        payload = b"p" * 200
        i = 0
        while not self.disconnected.is_set():
            self.client.publish(f"wsclose/{self.name}", payload, qos=i % 2)
            i += 1
            self.published = i
            if i % 2 == 0:
                time.sleep(0.001)

    def verdict(self):
        s = self.sock
        problems = list(thread_errors) + s.errors + self.log_errors
        if not self.disconnected.is_set():
            problems.append("the connection did not end")
        elif self.v5:
            if self.reason is None or self.reason.value != 0x8B:
                problems.append(f"on_disconnect with {self.reason}, not 0x8B server shutting down")
        else:
            if not s.answered_close:
                problems.append("no WebSocket Close frame from the server")
            if not s.eof:
                problems.append("no end of stream after the Close")
        return problems


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--client", action="append", required=True, help="ws|wss:PORT:/path:311|5")
    ap.add_argument("--ca")
    a = ap.parse_args()
    devices = []
    for n, spec in enumerate(a.client):
        scheme, port, path, protocol = spec.split(":", 3)
        devices.append(Device(n, scheme, int(port), path, protocol, a.ca))
    for d in devices:
        d.start()
    deadline = time.monotonic() + WAIT_READY_S
    for d in devices:
        if not d.connected.wait(max(0, deadline - time.monotonic())):
            sys.exit(f"{d.name}: not connected")
    while any(d.published < 100 for d in devices):
        if time.monotonic() > deadline:
            sys.exit("clients did not publish")
        time.sleep(0.01)
    print("READY", flush=True)
    deadline = time.monotonic() + WAIT_CLOSE_S
    for d in devices:
        d.disconnected.wait(max(0, deadline - time.monotonic()))
    failed = False
    for d in devices:
        d.client.loop_stop()
        problems = d.verdict()
        if problems:
            failed = True
            print(f"FAIL {d.name} (published {d.published}): " + "; ".join(problems), flush=True)
        else:
            print(f"CLEAN {d.name} (published {d.published}, {d.reason})", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
