#!/usr/bin/env python3
"""Test origin for the range cache tests.

Serves the files under --root with GET and HEAD, single byte ranges,
strong ETags, Last-Modified and conditional requests (If-None-Match,
If-Modified-Since), and counts what it served. Control endpoints:

  GET  /_stats                 JSON: per path, requests, ranges asked, bytes sent
  POST /_reset                 zero the counters
  POST /_replace?path=/a/b     replace a file with the request body (new ETag)
  POST /_config?throttle=N&delay_ms=M&no_validator=/p&ignore_range=/p&cut_after=B
                               bytes/s per response (0 = unlimited), delay before
                               the response head, paths served without validators
                               or ignoring Range, and closing the next response's
                               connection after B body bytes (once)

It prints "listening <port>" once ready (port 0 picks a free one). With
--tls-cert and --tls-key it serves https.
"""

import argparse
import hashlib
import json
import os
import threading
import time
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

LOCK = threading.Lock()
STATS = {}
CONFIG = {"throttle": 0, "delay_ms": 0, "no_validator": set(), "ignore_range": set(), "cut_after": 0}
VERSIONS = {}
ROOT = "."


def file_state(path):
    """(data, etag, last_modified) of a file, or None."""
    full = os.path.normpath(os.path.join(ROOT, path.lstrip("/")))
    if not full.startswith(os.path.abspath(ROOT)) or not os.path.isfile(full):
        return None
    with open(full, "rb") as f:
        data = f.read()
    version = VERSIONS.get(path, 0)
    etag = '"%s-%d"' % (hashlib.sha1(data).hexdigest()[:16], version)
    mtime = int(os.stat(full).st_mtime)
    return data, etag, formatdate(mtime, usegmt=True)


def record(path, rng, sent):
    with LOCK:
        s = STATS.setdefault(path, {"requests": 0, "ranges": [], "bytes": 0})
        s["requests"] += 1
        s["ranges"].append(rng)
        s["bytes"] += sent


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def reply(self, code, body=b"", headers=()):
        self.send_response(code)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_POST(self):
        url = urlsplit(self.path)
        q = parse_qs(url.query)
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        if url.path == "/_reset":
            with LOCK:
                STATS.clear()
            return self.reply(200, b"ok")
        if url.path == "/_replace":
            path = q["path"][0]
            full = os.path.join(ROOT, path.lstrip("/"))
            with open(full + ".tmp", "wb") as f:
                f.write(body)
            os.replace(full + ".tmp", full)
            VERSIONS[path] = VERSIONS.get(path, 0) + 1
            return self.reply(200, b"ok")
        if url.path == "/_config":
            if "throttle" in q:
                CONFIG["throttle"] = int(q["throttle"][0])
            if "delay_ms" in q:
                CONFIG["delay_ms"] = int(q["delay_ms"][0])
            if "cut_after" in q:
                CONFIG["cut_after"] = int(q["cut_after"][0])
            CONFIG["no_validator"].update(q.get("no_validator", []))
            CONFIG["ignore_range"].update(q.get("ignore_range", []))
            return self.reply(200, b"ok")
        return self.reply(404, b"no such control")

    def do_HEAD(self):
        self.do_GET()

    def do_GET(self):
        url = urlsplit(self.path)
        if url.path == "/_stats":
            with LOCK:
                body = json.dumps(STATS).encode()
            return self.reply(200, body, [("Content-Type", "application/json")])
        path = url.path
        state = file_state(path)
        rng = self.headers.get("Range")
        if CONFIG["delay_ms"]:
            time.sleep(CONFIG["delay_ms"] / 1000)
        if state is None:
            record(path, rng, 0)
            return self.reply(404, b"not found\n", [("Content-Type", "text/plain")])
        data, etag, lm = state
        validators = [] if path in CONFIG["no_validator"] else [("ETag", etag), ("Last-Modified", lm)]
        inm = self.headers.get("If-None-Match")
        if validators and inm is not None and etag in [t.strip() for t in inm.split(",")]:
            record(path, "304", 0)
            self.send_response(304)
            for k, v in validators:
                self.send_header(k, v)
            self.end_headers()
            return
        start, end, code = 0, len(data), 200
        if rng and path not in CONFIG["ignore_range"] and rng.startswith("bytes=") and "," not in rng:
            a, _, b = rng[6:].partition("-")
            if a == "":
                start = max(0, len(data) - int(b))
            else:
                start = int(a)
                if b:
                    end = min(len(data), int(b) + 1)
            if start >= len(data):
                record(path, rng, 0)
                return self.reply(416, b"", [("Content-Range", "bytes */%d" % len(data))])
            code = 206
        self.send_response(code)
        for k, v in validators:
            self.send_header(k, v)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Accept-Ranges", "bytes")
        if code == 206:
            self.send_header("Content-Range", "bytes %d-%d/%d" % (start, end - 1, len(data)))
        self.send_header("Content-Length", str(end - start))
        self.end_headers()
        if self.command == "HEAD":
            record(path, "HEAD", 0)
            return
        sent = 0
        chunk = 64 * 1024
        throttle = CONFIG["throttle"]
        with LOCK:
            cut, CONFIG["cut_after"] = CONFIG["cut_after"], 0
        if cut:
            end = min(end, start + cut)
            self.close_connection = True
        began = time.monotonic()
        try:
            pos = start
            while pos < end:
                n = min(chunk, end - pos)
                self.wfile.write(data[pos:pos + n])
                pos += n
                sent += n
                if throttle:
                    ahead = sent / throttle - (time.monotonic() - began)
                    if ahead > 0:
                        time.sleep(ahead)
        except (BrokenPipeError, ConnectionResetError):
            pass
        record(path, rng, sent)


def main():
    global ROOT
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", required=True)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--tls-cert", help="serve https with this PEM certificate chain")
    ap.add_argument("--tls-key", help="and this PEM private key")
    args = ap.parse_args()
    ROOT = os.path.abspath(args.root)
    # The default listen backlog (5) drops bursts of connections, which then
    # wait a second for a SYN retry; caches open many at once.
    ThreadingHTTPServer.request_queue_size = 256
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    if args.tls_cert:
        import ssl
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(args.tls_cert, args.tls_key)
        server.socket = ctx.wrap_socket(server.socket, server_side=True)
    print("listening %d" % server.server_address[1], flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
