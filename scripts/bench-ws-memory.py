#!/usr/bin/env python3
"""Memory per idle MQTT connection: over TCP and over WebSockets.

Starts holdfast with `[mqtt.tcp]` and `[mqtt.ws]` on loopback, opens N
connections over one transport (each sends an MQTT 5 CONNECT, over a WebSocket
after its upgrade, and reads its CONNACK; then stays idle), and reads the
broker's RSS before and after. A fresh process for each transport and round;
the figure is the median over the rounds of (RSS after - RSS before) / N.

Standard library only (the clients are raw sockets), so a thousand clients
cost the client side little.

Usage: bench-ws-memory.py [--holdfast target/release/holdfast] [--clients 1000] [--rounds 3]
"""
import argparse
import base64
import os
import resource
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def raise_nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def connect_packet(client_id):
    cid = client_id.encode()
    # MQTT 5: protocol name, level 5, clean start, keep-alive 0, no properties.
    body = b"\x00\x04MQTT\x05\x02\x00\x00\x00" + struct.pack(">H", len(cid)) + cid
    assert len(body) < 128
    return bytes([0x10, len(body)]) + body


def read_exact(s, n):
    out = b""
    while len(out) < n:
        chunk = s.recv(n - len(out))
        if not chunk:
            raise RuntimeError("connection closed")
        out += chunk
    return out


def open_tcp(port, cid):
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(connect_packet(cid))
    head = read_exact(s, 2)
    rest = read_exact(s, head[1])
    if head[0] != 0x20 or rest[1] != 0:
        raise RuntimeError(f"CONNACK refused: {head + rest!r}")
    return s


def open_ws(port, cid):
    s = socket.create_connection(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall(
        (
            f"GET /mqtt HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Protocol: mqtt\r\n\r\n"
        ).encode()
    )
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        head += read_exact(s, 1)
    if not head.startswith(b"HTTP/1.1 101 "):
        raise RuntimeError(f"upgrade refused: {head!r}")
    payload = connect_packet(cid)
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    s.sendall(bytes([0x82, 0x80 | len(payload)]) + mask + masked)
    frame = read_exact(s, 2)
    data = read_exact(s, frame[1] & 0x7F)
    if frame[0] != 0x82 or data[0] != 0x20 or data[3] != 0:
        raise RuntimeError(f"CONNACK refused: {frame + data!r}")
    return s


def start(holdfast, work, tcp, ws):
    conf = os.path.join(work, "holdfast.toml")
    with open(conf, "w") as f:
        f.write(
            f'[node]\nid = "mem"\ndata_dir = "{os.path.join(work, "data")}"\n'
            f'[admin]\nlisten = "127.0.0.1:{free_port()}"\n'
            f'[cache]\nlisten = "127.0.0.1:{free_port()}"\n'
            f'[mqtt.tcp]\nlisten = "127.0.0.1:{tcp}"\n'
            f'[mqtt.ws]\nenabled = true\nlisten = "127.0.0.1:{ws}"\n'
            "[plugins.auth.config]\nallow_anonymous = true\n"
        )
    log = open(os.path.join(work, "holdfast.log"), "a")
    env = dict(os.environ, RUST_LOG="warn")
    proc = subprocess.Popen([holdfast, "run", "--config", conf], stdout=log, stderr=log, env=env,
                            preexec_fn=raise_nofile)
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"holdfast exited: see {log.name}")
        try:
            socket.create_connection(("127.0.0.1", ws), timeout=0.2).close()
            socket.create_connection(("127.0.0.1", tcp), timeout=0.2).close()
            return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    sys.exit("holdfast did not start")


def measure(holdfast, work, transport, clients):
    tcp, ws = free_port(), free_port()
    proc = start(holdfast, work, tcp, ws)
    try:
        time.sleep(2)
        before = rss_kib(proc.pid)
        socks = []
        for i in range(clients):
            cid = f"{transport}-{i}"
            socks.append(open_tcp(tcp, cid) if transport == "tcp" else open_ws(ws, cid))
        time.sleep(2)
        after = rss_kib(proc.pid)
        for s in socks:
            s.close()
        return (after - before) * 1024 / clients
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--holdfast", default=os.path.join(ROOT, "target/release/holdfast"))
    ap.add_argument("--clients", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    raise_nofile()
    work = tempfile.mkdtemp(prefix="bench-ws-memory-")
    try:
        # The first start compiles the plugins; the rounds reuse the cache.
        p = start(a.holdfast, work, free_port(), free_port())
        p.send_signal(signal.SIGTERM)
        p.wait()
        per = {"tcp": [], "websocket": []}
        for r in range(a.rounds):
            for transport in per:
                b = measure(a.holdfast, work, transport, a.clients)
                per[transport].append(b)
                print(f"round {r + 1}: {transport:9} {b:>9.0f} B per idle connection", flush=True)
        t, w = statistics.median(per["tcp"]), statistics.median(per["websocket"])
        print(f"medians over {a.rounds} rounds, {a.clients} clients: TCP {t:.0f} B, WebSocket {w:.0f} B, "
              f"WebSocket / TCP {w / t:.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
