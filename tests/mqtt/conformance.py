#!/usr/bin/env python3
"""MQTT 3.1.1 / MQTT 5.0 broker conformance tests.

Usage:
    python3 tests/mqtt/conformance.py --host 127.0.0.1 --port 1883
        [--only NAME[,NAME...]] [--list] [--username U --password P]
        [--time-scale F] [--verbose]

Runs a set of named cases against a running broker and prints one line per case,
``PASS name (N ms)`` or ``FAIL name: reason``; informational lines start with
two spaces and ``note``. The exit status is 1 if any case failed, 2 on a usage
error or when the broker cannot be reached.

The cases test the OASIS standards (MQTT 3.1.1 and MQTT 5.0), not the behaviour
of one broker; where a standard leaves a choice to the server, every allowed
choice is accepted. Normative statement ids such as [MQTT-3.3.1-9] are quoted in
the checks. Every case uses its own client ids (``cf<run><seq>``, alphanumeric and
at most 23 characters, so every conforming server must accept them) and its own
topic prefix (``cf/<run>/<case>/...``), clears the retained messages and the
persistent sessions it created, and so can be re-run against the same broker.

Needs python3 >= 3.8 and paho-mqtt >= 2.0. Cases that paho cannot express
(unacknowledged in-flight messages, malformed packets, unclean closes, exact
reason codes and flags) use the small raw-socket client below.
"""

import argparse
import functools
import random
import socket
import struct
import sys
import threading
import time
import traceback
from collections import deque

try:
    import paho.mqtt.client as mqtt
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties
    from paho.mqtt.subscribeoptions import SubscribeOptions
except ImportError:  # pragma: no cover
    print("conformance.py needs paho-mqtt >= 2.0 (pip install paho-mqtt)", file=sys.stderr)
    sys.exit(2)

V3 = 4  # protocol level of MQTT 3.1.1
V5 = 5  # protocol level of MQTT 5.0


def vname(v):
    return "v5" if v == V5 else "v3"


class Fail(Exception):
    """A conformance check failed."""


class Closed(Fail):
    """The broker closed the connection."""


def check(cond, msg):
    if not cond:
        raise Fail(msg)


def eq(actual, expected, what):
    if actual != expected:
        raise Fail(f"{what}: expected {expected!r}, got {actual!r}")


def short(b, n=40):
    r = repr(b)
    return r if len(r) <= n else r[:n] + "..."


# --------------------------------------------------------------------------
# Wire encoding / decoding (raw-socket client)
# --------------------------------------------------------------------------

PROPS = {
    0x01: ("payload_format_indicator", "u8"),
    0x02: ("message_expiry_interval", "u32"),
    0x03: ("content_type", "str"),
    0x08: ("response_topic", "str"),
    0x09: ("correlation_data", "bin"),
    0x0B: ("subscription_identifier", "var"),
    0x11: ("session_expiry_interval", "u32"),
    0x12: ("assigned_client_identifier", "str"),
    0x13: ("server_keep_alive", "u16"),
    0x15: ("authentication_method", "str"),
    0x16: ("authentication_data", "bin"),
    0x17: ("request_problem_information", "u8"),
    0x18: ("will_delay_interval", "u32"),
    0x19: ("request_response_information", "u8"),
    0x1A: ("response_information", "str"),
    0x1C: ("server_reference", "str"),
    0x1F: ("reason_string", "str"),
    0x21: ("receive_maximum", "u16"),
    0x22: ("topic_alias_maximum", "u16"),
    0x23: ("topic_alias", "u16"),
    0x24: ("maximum_qos", "u8"),
    0x25: ("retain_available", "u8"),
    0x26: ("user_property", "pair"),
    0x27: ("maximum_packet_size", "u32"),
    0x28: ("wildcard_subscription_available", "u8"),
    0x29: ("subscription_identifier_available", "u8"),
    0x2A: ("shared_subscription_available", "u8"),
}
PROP_IDS = {name: (pid, typ) for pid, (name, typ) in PROPS.items()}
MULTI = {"user_property", "subscription_identifier"}  # may occur more than once

TYPES = {1: "CONNECT", 2: "CONNACK", 3: "PUBLISH", 4: "PUBACK", 5: "PUBREC", 6: "PUBREL",
         7: "PUBCOMP", 8: "SUBSCRIBE", 9: "SUBACK", 10: "UNSUBSCRIBE", 11: "UNSUBACK",
         12: "PINGREQ", 13: "PINGRESP", 14: "DISCONNECT", 15: "AUTH"}


def enc_varint(n):
    out = bytearray()
    while True:
        b = n % 128
        n //= 128
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def enc_str(s):
    b = s.encode("utf-8") if isinstance(s, str) else bytes(s)
    return struct.pack("!H", len(b)) + b


enc_bin = enc_str


def enc_prop_value(typ, v):
    if typ == "u8":
        return bytes([v])
    if typ == "u16":
        return struct.pack("!H", v)
    if typ == "u32":
        return struct.pack("!I", v)
    if typ == "var":
        return enc_varint(v)
    if typ in ("str", "bin"):
        return enc_str(v)
    if typ == "pair":
        return enc_str(v[0]) + enc_str(v[1])
    raise ValueError(typ)


def enc_props(props):
    """Encode a property dict (names as in PROPS; user_property is a list of pairs)."""
    out = bytearray()
    for name, val in (props or {}).items():
        pid, typ = PROP_IDS[name]
        vals = val if (name in MULTI and isinstance(val, list)) else [val]
        for v in vals:
            out += enc_varint(pid) + enc_prop_value(typ, v)
    return enc_varint(len(out)) + bytes(out)


def fixed(b0, body):
    return bytes([b0]) + enc_varint(len(body)) + bytes(body)


class Reader:
    def __init__(self, data):
        self.d = data
        self.i = 0

    def left(self):
        return len(self.d) - self.i

    def take(self, n):
        if self.i + n > len(self.d):
            raise Fail(f"broker sent a truncated packet ({self.d!r})")
        b = self.d[self.i:self.i + n]
        self.i += n
        return b

    def u8(self):
        return self.take(1)[0]

    def u16(self):
        return struct.unpack("!H", self.take(2))[0]

    def u32(self):
        return struct.unpack("!I", self.take(4))[0]

    def var(self):
        n, mult = 0, 1
        for _ in range(4):
            b = self.u8()
            n += (b & 0x7F) * mult
            mult *= 128
            if not b & 0x80:
                return n
        raise Fail("broker sent a malformed variable byte integer")

    def bin(self):
        return self.take(self.u16())

    def str(self):
        return self.bin().decode("utf-8", errors="replace")

    def rest(self):
        return self.take(self.left())

    def props(self):
        end = self.var() + self.i
        out = {}
        while self.i < end:
            pid = self.var()
            if pid not in PROPS:
                raise Fail(f"broker sent unknown property id 0x{pid:02x}")
            name, typ = PROPS[pid]
            if typ == "pair":
                v = (self.str(), self.str())
            elif typ == "str":
                v = self.str()
            else:
                v = getattr(self, typ)()
            if name in MULTI:
                out.setdefault(name, []).append(v)
            else:
                check(name not in out, f"broker sent property {name} twice")
                out[name] = v
        return out


class Packet:
    def __init__(self, ptype, flags, size):
        self.type = ptype
        self.flags = flags
        self.size = size  # total bytes on the wire
        self.props = {}
        self.t = time.monotonic()

    def __repr__(self):
        keys = [k for k in ("rc", "pid", "topic", "qos", "dup", "retain", "codes", "session_present")
                if hasattr(self, k)]
        parts = [f"{k}={getattr(self, k)!r}" for k in keys]
        if hasattr(self, "payload"):
            parts.append("payload=" + short(self.payload))
        if self.props:
            parts.append(f"props={self.props!r}")
        return f"{self.type}({', '.join(parts)})"


def decode(v, b0, body, size):
    t = b0 >> 4
    p = Packet(TYPES.get(t, f"RESERVED{t}"), b0 & 0x0F, size)
    r = Reader(body)
    if t == 2:  # CONNACK
        p.session_present = r.u8() & 1
        p.rc = r.u8()
        if v == V5 and r.left():
            p.props = r.props()
    elif t == 3:  # PUBLISH
        p.dup = (b0 >> 3) & 1
        p.qos = (b0 >> 1) & 3
        p.retain = b0 & 1
        p.topic = r.str()
        p.pid = r.u16() if p.qos else None
        if v == V5:
            p.props = r.props()
        p.payload = r.rest()
    elif t in (4, 5, 6, 7):  # PUBACK PUBREC PUBREL PUBCOMP
        p.pid = r.u16()
        p.rc = r.u8() if (v == V5 and r.left()) else 0
        if v == V5 and r.left():
            p.props = r.props()
    elif t == 9:  # SUBACK
        p.pid = r.u16()
        if v == V5:
            p.props = r.props()
        p.codes = list(r.rest())
    elif t == 11:  # UNSUBACK
        p.pid = r.u16()
        if v == V5:
            p.props = r.props()
        p.codes = list(r.rest())
    elif t in (14, 15):  # DISCONNECT AUTH
        p.rc = r.u8() if r.left() else 0
        if r.left():
            p.props = r.props()
    return p


def opts(qos, nl=0, rap=0, rh=0):
    """MQTT 5 subscription options byte."""
    return qos | (nl << 2) | (rap << 3) | (rh << 4)


_DEFAULT = object()


class Raw:
    """A minimal synchronous MQTT client speaking raw bytes over a socket.

    Packets are only read when a method that waits is called. With auto_ack set,
    incoming QoS 1/2 PUBLISHes and PUBRELs are acknowledged as they are read.
    Packets read while waiting for something else are kept in ``inbox``.
    """

    def __init__(self, ctx, version, cid=None):
        self.ctx, self.v = ctx, version
        self.cid = ctx.cid() if cid is None else cid
        self.sock = socket.create_connection((ctx.host, ctx.port), timeout=ctx.W)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()
        self.inbox = deque()
        self.log = []  # every packet received, in order
        self.closed = False
        self.auto_ack = False
        self._pid = 0
        self.connack = None
        ctx.track(self)

    # -- low level -----------------------------------------------------------
    def next_pid(self):
        self._pid = self._pid % 65535 + 1
        return self._pid

    def send(self, data):
        try:
            self.sock.sendall(data)
        except OSError as e:
            self.closed = True
            raise Closed(f"connection closed by broker (send failed: {e})")

    def _fill(self, deadline):
        rem = deadline - time.monotonic()
        if rem <= 0:
            return False
        self.sock.settimeout(rem)
        try:
            data = self.sock.recv(65536)
        except socket.timeout:
            return False
        except OSError:
            data = b""
        if not data:
            self.closed = True
            return True
        self.buf += data
        return True

    def _parse(self):
        buf = self.buf
        if len(buf) < 2:
            return None
        rl, mult, i = 0, 1, 1
        while True:
            if i >= len(buf):
                return None
            b = buf[i]
            rl += (b & 0x7F) * mult
            mult *= 128
            i += 1
            if not b & 0x80:
                break
            if i > 4:
                raise Fail("broker sent a malformed remaining length")
        if len(buf) < i + rl:
            return None
        b0, body = buf[0], bytes(buf[i:i + rl])
        del buf[:i + rl]
        return decode(self.v, b0, body, i + rl)

    def _auto(self, p):
        if not self.auto_ack or self.closed:
            return
        try:
            if p.type == "PUBLISH" and p.qos == 1:
                self.ack("PUBACK", p.pid)
            elif p.type == "PUBLISH" and p.qos == 2:
                self.ack("PUBREC", p.pid)
            elif p.type == "PUBREL":
                self.ack("PUBCOMP", p.pid)
        except Closed:
            pass

    def _next(self, deadline):
        """Next packet from the socket, None on timeout; raises Closed on EOF."""
        while True:
            p = self._parse()
            if p is not None:
                self.log.append(p)
                self._auto(p)
                return p
            if self.closed:
                raise Closed("connection closed by broker")
            if not self._fill(deadline):
                return None

    def recv(self, timeout):
        if self.inbox:
            return self.inbox.popleft()
        return self._next(time.monotonic() + timeout)

    def expect(self, ptype, timeout=None, pred=None, what=None):
        """Wait for a packet of type ptype (and matching pred); keep others in inbox."""
        timeout = self.ctx.W if timeout is None else timeout
        what = what or ptype

        def match(p):
            return p.type == ptype and (pred is None or pred(p))

        for i, p in enumerate(self.inbox):
            if match(p):
                del self.inbox[i]
                return p
        deadline = time.monotonic() + timeout
        while True:
            try:
                p = self._next(deadline)
            except Closed:
                raise Closed(f"connection closed by broker while waiting for {what} "
                             f"(received before: {list(self.inbox)[-5:]})")
            if p is None:
                raise Fail(f"timed out after {timeout:.1f}s waiting for {what} "
                           f"(received meanwhile: {list(self.inbox)[-5:]})")
            if match(p):
                return p
            self.inbox.append(p)

    def collect(self, duration, stop=None):
        """All packets arriving within duration (plus those in inbox); tolerates close.

        stop(packets) -> True ends the collection early."""
        out = list(self.inbox)
        self.inbox.clear()
        deadline = time.monotonic() + duration
        while not (stop and stop(out)):
            try:
                p = self._next(deadline)
            except Closed:
                break
            if p is None:
                break
            out.append(p)
        return out

    def publishes(self, n, timeout=None, pred=None):
        """Wait until n PUBLISH packets (matching pred) have arrived; returns them."""
        timeout = self.ctx.W if timeout is None else timeout

        def ok(p):
            return p.type == "PUBLISH" and (pred is None or pred(p))

        pkts = self.collect(timeout, stop=lambda ps: sum(ok(p) for p in ps) >= n)
        got = [p for p in pkts if ok(p)]
        self.inbox.extend(p for p in pkts if not ok(p))
        if len(got) < n:
            raise Fail(f"expected {n} PUBLISH packets within {timeout:.1f}s, got {len(got)}: "
                       f"{got[:6]}" + (" (connection closed)" if self.closed else ""))
        return got

    def wait_closed(self, timeout):
        """Read until the broker closes the connection; returns (closed, packets)."""
        pkts = self.collect(timeout)
        if not self.closed:
            return False, pkts
        return True, pkts

    # -- packets -------------------------------------------------------------
    def connect_packet(self, clean=True, keepalive=60, will=None, props=None, username=_DEFAULT,
                       password=_DEFAULT, proto_name="MQTT", level=None, flags=None,
                       raw_props=None):
        user = self.ctx.username if username is _DEFAULT else username
        pw = self.ctx.password if password is _DEFAULT else password
        f = 0x02 if clean else 0
        if will:
            f |= 0x04 | (will.get("qos", 0) << 3) | (0x20 if will.get("retain") else 0)
        if user is not None:
            f |= 0x80
            if pw is not None:
                f |= 0x40
        if flags is not None:
            f = flags
        vh = enc_str(proto_name) + bytes([level or self.v, f]) + struct.pack("!H", keepalive)
        if self.v == V5:
            vh += raw_props if raw_props is not None else enc_props(props)
        pl = enc_str(self.cid)
        if will:
            if self.v == V5:
                pl += enc_props(will.get("props"))
            pl += enc_str(will["topic"]) + enc_bin(will.get("payload", b""))
        if f & 0x80:
            pl += enc_str(user)
        if f & 0x40:
            pl += enc_bin(pw.encode() if isinstance(pw, str) else pw)
        return fixed(0x10, vh + pl)

    def connect(self, ok=True, **kw):
        """Send CONNECT and wait for CONNACK; with ok=True the CONNACK must be a success."""
        self.send(self.connect_packet(**kw))
        self.connack = ca = self.expect("CONNACK")
        if ok:
            check(ca.rc == 0, f"CONNACK refused the connection: code 0x{ca.rc:02x} {ca.props}")
        return ca

    def publish(self, topic, payload=b"", qos=0, retain=False, dup=False, pid=None, props=None):
        if qos and pid is None:
            pid = self.next_pid()
        b0 = 0x30 | (int(dup) << 3) | (qos << 1) | int(retain)
        body = enc_str(topic) + (struct.pack("!H", pid) if qos else b"")
        if self.v == V5:
            body += enc_props(props)
        self.send(fixed(b0, body + bytes(payload)))
        return pid

    def publish_sync(self, topic, payload=b"", qos=0, retain=False, props=None):
        """Publish and complete the QoS 1/2 flow; returns the final ack (or None)."""
        pid = self.publish(topic, payload, qos, retain, props=props)
        if qos == 1:
            return self.expect("PUBACK", pred=lambda p: p.pid == pid)
        if qos == 2:
            rec = self.expect("PUBREC", pred=lambda p: p.pid == pid)
            if rec.rc >= 0x80:
                return rec
            self.ack("PUBREL", pid)
            return self.expect("PUBCOMP", pred=lambda p: p.pid == pid)
        return None

    def publish_many(self, msgs, window=20):
        """Publish [(topic, payload, qos)] in order, pipelined, with at most `window`
        QoS 1/2 flows open (never more than the server's Receive Maximum)."""
        if self.v == V5 and self.connack is not None:
            window = min(window, self.connack.props.get("receive_maximum", 65535))
        pending = set()
        for topic, payload, qos in msgs:
            while len(pending) >= window:
                self._pump(pending)
            pid = self.publish(topic, payload, qos)
            if qos:
                pending.add(pid)
        while pending:
            self._pump(pending)

    def _pump(self, pending):
        p = self.recv(self.ctx.W)
        check(p is not None, f"no acknowledgement within {self.ctx.W:.1f}s "
                             f"({len(pending)} publishes outstanding)")
        if p.type in ("PUBACK", "PUBCOMP") or (p.type == "PUBREC" and p.rc >= 0x80):
            check(p.rc < 0x80, f"{p.type} with error code 0x{p.rc:02x}")
            pending.discard(p.pid)
        elif p.type == "PUBREC":
            self.ack("PUBREL", p.pid)

    def ack(self, ptype, pid, rc=None):
        b0 = {"PUBACK": 0x40, "PUBREC": 0x50, "PUBREL": 0x62, "PUBCOMP": 0x70}[ptype]
        body = struct.pack("!H", pid)
        if self.v == V5 and rc:
            body += bytes([rc])
        self.send(fixed(b0, body))

    def subscribe(self, subs, props=None):
        """subs: list of (filter, options byte) or filter strings; returns the SUBACK."""
        pid = self.next_pid()
        body = struct.pack("!H", pid)
        if self.v == V5:
            body += enc_props(props)
        for s in subs:
            flt, o = (s, 0) if isinstance(s, str) else s
            body += enc_str(flt) + bytes([o])
        self.send(fixed(0x82, body))
        return self.expect("SUBACK", pred=lambda p: p.pid == pid)

    def unsubscribe(self, filters):
        pid = self.next_pid()
        body = struct.pack("!H", pid) + (b"\x00" if self.v == V5 else b"")
        for f in filters:
            body += enc_str(f)
        self.send(fixed(0xA2, body))
        return self.expect("UNSUBACK", pred=lambda p: p.pid == pid)

    def ping(self):
        self.send(b"\xc0\x00")
        return self.expect("PINGRESP")

    def disconnect(self, rc=0, props=None):
        """Send DISCONNECT, half-close, and wait (briefly) for the broker to close."""
        body = b""
        if self.v == V5 and (rc or props):
            body = bytes([rc]) + enc_props(props)
        self.send(fixed(0xE0, body))
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        self.wait_closed(self.ctx.W)
        self.abort()

    def abort(self):
        """Close the socket without DISCONNECT (an unclean close)."""
        try:
            self.sock.close()
        except OSError:
            pass
        self.closed = True

    def close(self):  # cleanup: leave without triggering a will
        if not self.closed:
            try:
                self.sock.sendall(b"\xe0\x00")
            except OSError:
                pass
        self.abort()


# --------------------------------------------------------------------------
# paho wrapper (synchronous helpers on top of the threaded client)
# --------------------------------------------------------------------------

def camel(name):
    return "".join("QoS" if w == "qos" else w.capitalize() for w in name.split("_"))


def to_paho(ptype, d):
    if not d:
        return None
    p = Properties(ptype)
    for k, val in d.items():
        setattr(p, camel(k), val)
    return p


def from_paho(p):
    out = {}
    if p is None:
        return out
    for _, (name, _t) in PROPS.items():
        if hasattr(p, camel(name)):
            out[name] = getattr(p, camel(name))
    return out


class Msg:
    def __init__(self, m):
        self.topic = m.topic
        self.payload = m.payload
        self.qos = m.qos
        self.retain = bool(m.retain)
        self.dup = bool(m.dup)
        self.props = from_paho(getattr(m, "properties", None))
        self.t = time.monotonic()

    def __repr__(self):
        return (f"Msg({self.topic!r}, {short(self.payload)}, qos={self.qos}, "
                f"retain={int(self.retain)}{', ' + repr(self.props) if self.props else ''})")


class Paho:
    def __init__(self, ctx, version, cid=None, clean=True, session_expiry=None, keepalive=30,
                 will=None, props=None):
        self.ctx, self.v = ctx, version
        self.cid = cid or ctx.cid()
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.cid,
                             protocol=mqtt.MQTTv5 if version == V5 else mqtt.MQTTv311,
                             clean_session=None if version == V5 else clean,
                             reconnect_on_failure=False)
        self.cond = threading.Condition()
        self.msgs = []
        self.connack = None
        self.acks = {}
        self.closed = False
        self.c.on_connect = self._on_connect
        self.c.on_message = self._on_message
        self.c.on_subscribe = self._on_ack
        self.c.on_unsubscribe = self._on_ack
        self.c.on_disconnect = self._on_disconnect
        if ctx.username is not None:
            self.c.username_pw_set(ctx.username, ctx.password)
        if will:
            self.c.will_set(will["topic"], will.get("payload"), will.get("qos", 0),
                            will.get("retain", False),
                            properties=to_paho(PacketTypes.WILLMESSAGE, will.get("props"))
                            if version == V5 else None)
        kw = {}
        if version == V5:
            cp = dict(props or {})
            if session_expiry is not None:
                cp["session_expiry_interval"] = session_expiry
            kw = {"clean_start": clean, "properties": to_paho(PacketTypes.CONNECT, cp)}
        ctx.track(self)
        self.c.connect(ctx.host, ctx.port, keepalive, **kw)
        self.c.loop_start()
        with self.cond:
            self.cond.wait_for(lambda: self.connack is not None or self.closed, ctx.W)
        check(self.connack is not None, f"paho client {self.cid}: no CONNACK")
        check(self.connack[1] == 0, f"paho client {self.cid}: CONNACK code {self.connack[1]:#x}")

    def _on_connect(self, c, ud, flags, rc, props):
        with self.cond:
            self.connack = (int(flags.session_present), rc.value, from_paho(props))
            self.cond.notify_all()

    def _on_message(self, c, ud, m):
        with self.cond:
            self.msgs.append(Msg(m))
            self.cond.notify_all()

    def _on_ack(self, c, ud, mid, rcs, props):
        with self.cond:
            self.acks[mid] = [r.value for r in rcs]
            self.cond.notify_all()

    def _on_disconnect(self, c, ud, flags, rc, props):
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    def _wait_ack(self, mid, what):
        with self.cond:
            ok = self.cond.wait_for(lambda: mid in self.acks, self.ctx.W)
        check(ok, f"paho client {self.cid}: no {what} within {self.ctx.W:.1f}s")
        return self.acks.pop(mid)

    def subscribe(self, flt, qos=0, nl=False, rap=False, rh=0, sub_id=None):
        """Subscribe and wait for the SUBACK; returns the list of reason codes."""
        if self.v == V5:
            so = SubscribeOptions(qos=qos, noLocal=nl, retainAsPublished=rap, retainHandling=rh)
            pr = to_paho(PacketTypes.SUBSCRIBE, {"subscription_identifier": sub_id}
                         if sub_id else None)
            rc, mid = self.c.subscribe(flt, options=so, properties=pr)
        else:
            rc, mid = self.c.subscribe(flt, qos)
        check(rc == 0, f"paho subscribe failed locally: {rc}")
        return self._wait_ack(mid, "SUBACK")

    def publish(self, topic, payload=b"", qos=0, retain=False, props=None, wait=True):
        info = self.c.publish(topic, payload, qos, retain,
                              properties=to_paho(PacketTypes.PUBLISH, props)
                              if self.v == V5 else None)
        if wait:
            self.wait_published(info)
        return info

    def wait_published(self, info):
        info.wait_for_publish(self.ctx.W)
        check(info.is_published(), f"paho client {self.cid}: publish not acknowledged "
                                   f"within {self.ctx.W:.1f}s")

    def got(self, pred=None):
        with self.cond:
            return [m for m in self.msgs if pred is None or pred(m)]

    def wait(self, n, pred=None, timeout=None):
        """Wait until n messages (matching pred) have arrived; returns all matching ones."""
        timeout = self.ctx.W if timeout is None else timeout
        with self.cond:
            self.cond.wait_for(lambda: len([m for m in self.msgs
                                            if pred is None or pred(m)]) >= n, timeout)
        got = self.got(pred)
        check(len(got) >= n, f"client {self.cid}: expected {n} messages within {timeout:.1f}s, "
                             f"got {len(got)}: {got[:6]}")
        return got

    def disconnect(self, props=None):
        if not self.closed:
            self.c.disconnect(properties=to_paho(PacketTypes.DISCONNECT, props)
                              if self.v == V5 else None)
        with self.cond:
            self.cond.wait_for(lambda: self.closed, self.ctx.W)
        self.c.loop_stop()

    def close(self):
        try:
            self.disconnect()
        except Exception:
            self.c.loop_stop()


# --------------------------------------------------------------------------
# Test context and registry
# --------------------------------------------------------------------------

class Ctx:
    def __init__(self, args):
        self.host, self.port = args.host, args.port
        self.username, self.password = args.username, args.password
        self.scale = args.time_scale
        self.run = "%06x" % random.SystemRandom().getrandbits(24)
        self.seq = 0
        self.case = None
        self._clients, self._retained, self._sessions = [], [], []

    @property
    def W(self):  # upper bound for anything we wait for
        return 3.0 * self.scale

    @property
    def QUIET(self):  # how long we watch for something that must not happen
        return 0.4 * self.scale

    def cid(self):
        self.seq += 1
        return f"cf{self.run}{self.seq:04d}"

    def t(self, *parts):
        return "/".join(("cf", self.run, self.case) + parts)

    def note(self, msg):
        print(f"  note {self.case}: {msg}", flush=True)

    def track(self, client):
        self._clients.append(client)

    def retained(self, topic):
        self._retained.append(topic)
        return topic

    def session(self, cid, version):
        self._sessions.append((cid, version))
        return cid

    def raw(self, version, cid=None):
        return Raw(self, version, cid)

    def paho(self, version, **kw):
        return Paho(self, version, **kw)

    def begin(self, name):
        self.case = name
        self._clients, self._retained, self._sessions = [], [], []

    def cleanup(self):
        errors = []
        for c in reversed(self._clients):
            try:
                c.close()
            except Exception as e:  # pragma: no cover
                errors.append(f"closing client: {e}")
        self._clients = []
        try:
            if self._retained:
                r = Raw(self, V3)
                r.connect()
                for topic in dict.fromkeys(self._retained):
                    r.publish_sync(topic, b"", 1, retain=True)
                r.disconnect()
            for cid, v in self._sessions:
                r = Raw(self, v, cid)
                r.connect(clean=True)  # v5: no Session Expiry Interval -> ends at disconnect
                r.disconnect()
        except Exception as e:
            errors.append(f"cleanup: {e}")
        for c in self._clients:
            c.close()
        self._clients = []
        return errors


CASES = []


def case(name, versions=None):
    def deco(fn):
        doc = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
        if versions:
            for v in versions:
                CASES.append((f"{name}_{vname(v)}", functools.partial(fn, v=v), doc))
        else:
            CASES.append((name, fn, doc))
        return fn
    return deco


def all_publishes(c, quiet):
    """Every PUBLISH a raw client has received, after watching for quiet more seconds."""
    c.collect(quiet)
    c.inbox.clear()
    return [p for p in c.log if p.type == "PUBLISH"]


def no_extra(msgs, what):
    check(not msgs, f"{what}: {msgs[:5]}")


# --------------------------------------------------------------------------
# Cases: QoS
# --------------------------------------------------------------------------

@case("qos_matrix", (V3, V5))
def t_qos_matrix(ctx, v):
    """QoS 0/1/2 publishes to QoS 0/1/2 subscribers: delivered QoS = min(pub, sub), payload intact."""
    topic = ctx.t("m")
    subs = {}
    for sq in (0, 1, 2):
        s = ctx.paho(v)
        eq(s.subscribe(topic, sq), [sq], f"SUBACK granted QoS for a QoS {sq} subscription")
        subs[sq] = s
    pub = ctx.paho(v)
    payloads = {pq: bytes([pq]) + bytes(range(256)) + b"\x00\xff end" for pq in (0, 1, 2)}
    big = bytes([9]) + bytes(range(255, -1, -1)) * 274  # > 16383: 3-byte remaining length
    for pq in (0, 1, 2):
        pub.publish(topic, payloads[pq], pq)
    pub.publish(topic, big, 1)
    for sq, s in subs.items():
        got = s.wait(4)
        time.sleep(0.05)
        got = s.got()
        eq(len(got), 4, f"number of messages delivered to the QoS {sq} subscriber")
        by = {m.payload[:1]: m for m in got}
        for pq in (0, 1, 2):
            m = by.get(bytes([pq]))
            check(m is not None, f"QoS {pq} publish not delivered to the QoS {sq} subscriber")
            check(m.payload == payloads[pq], f"payload of QoS {pq} publish altered")
            eq(m.qos, min(pq, sq), f"delivered QoS for publish QoS {pq} / subscription QoS {sq}")
            eq(m.topic, topic, "topic")
            check(not m.retain, "retain flag set on a non-retained message")
        m = by.get(bytes([9]))
        check(m is not None and m.payload == big,
              f"70000-byte payload not delivered intact to the QoS {sq} subscriber")
        eq(m.qos, min(1, sq), "delivered QoS of the large message")


@case("qos_burst", (V3, V5))
def t_qos_burst(ctx, v):
    """100 QoS 1 and 100 QoS 2 messages: each arrives exactly once, in order (QoS 0: at most once)."""
    # Ordered topics: [MQTT-4.6.0-6] (3.1.1) / [MQTT-4.6.0-5] (5.0).
    # Mosquitto 2.0.11 fails this intermittently (about every other run) for the QoS 2
    # subscriber: once its outgoing inflight window (max_inflight_messages, 20) is full it
    # sometimes sends queued messages out of order (its own log shows later-queued
    # message ids going out first). With max_inflight_messages 0 it passes reliably;
    # Mosquitto 2.0.13 lists "various fixes around inflight quota management".
    N = 100
    t1, t2 = ctx.t("q1"), ctx.t("q2")
    subs = {}
    for sq in (0, 1, 2):
        s = ctx.paho(v)
        eq(s.subscribe(ctx.t("+"), sq), [sq], "SUBACK granted QoS")
        subs[sq] = s
    # A raw publisher keeps strict send order while pipelining (paho's own queue can
    # reorder when publish() races its network thread).
    pub = ctx.raw(v)
    pub.connect()
    pub.publish_many([(t, str(i).encode(), q) for i in range(N) for t, q in ((t1, 1), (t2, 2))])
    for sq in (1, 2):
        s = subs[sq]
        s.wait(2 * N, timeout=ctx.W * 2)
        time.sleep(ctx.QUIET)
        for topic, pq in ((t1, 1), (t2, 2)):
            ms = s.got(lambda m: m.topic == topic)
            seq = [int(m.payload) for m in ms]
            if seq != list(range(N)):
                dups = len(seq) - len(set(seq))
                raise Fail(f"QoS {sq} subscriber, QoS {pq} publishes: expected 0..{N - 1} exactly "
                           f"once in order, got {len(seq)} messages ({dups} duplicates), "
                           f"first out of place at index "
                           f"{next((i for i, x in enumerate(seq) if x != i), len(seq))}")
            check(all(m.qos == min(pq, sq) for m in ms),
                  f"QoS {sq} subscriber: wrong delivered QoS for QoS {pq} publishes")
    # QoS 0 delivery is "at most once": loss is allowed, duplicates and reordering are not.
    s = subs[0]
    try:
        s.wait(2 * N, timeout=1.0 * ctx.scale)
    except Fail:
        pass
    for topic in (t1, t2):
        seq = [int(m.payload) for m in s.got(lambda m: m.topic == topic)]
        check(seq == sorted(set(seq)), f"QoS 0 subscriber got duplicates or reordering: {seq[:20]}")
        check(all(m.qos == 0 for m in s.got()), "QoS 0 subscriber got a message at QoS > 0")
        if len(seq) < N:
            ctx.note(f"QoS 0 subscriber received {len(seq)}/{N} on {topic} (loss is allowed)")


@case("cross_protocol")
def t_cross_protocol(ctx):
    """3.1.1 publisher -> 5.0 subscriber and 5.0 publisher (with properties) -> 3.1.1 subscriber."""
    s3, s5 = ctx.paho(V3), ctx.paho(V5)
    s3.subscribe(ctx.t("from5"), 2)
    s5.subscribe(ctx.t("from3"), 2)
    p3, p5 = ctx.paho(V3), ctx.paho(V5)
    p3.publish(ctx.t("from3"), b"hello from 3", 2)
    p5.publish(ctx.t("from5"), b"hello from 5", 2,
               props={"user_property": [("k", "v")], "content_type": "text/plain"})
    m = s5.wait(1)[0]
    eq((m.payload, m.qos), (b"hello from 3", 2), "v5 subscriber: payload, QoS")
    check(not m.props.get("user_property"), f"unexpected properties {m.props}")
    m = s3.wait(1)[0]
    eq((m.payload, m.qos), (b"hello from 5", 2), "v3 subscriber: payload, QoS")


@case("qos2_duplicate", (V3, V5))
def t_qos2_duplicate(ctx, v):
    """A re-sent (DUP) QoS 2 PUBLISH with the same packet id is delivered only once."""
    topic = ctx.t("d")
    s = ctx.paho(v)
    s.subscribe(topic, 2)
    p = ctx.raw(v)
    p.connect()
    pid = 7
    p.publish(topic, b"first", 2, pid=pid)
    p.expect("PUBREC", pred=lambda x: x.pid == pid)
    p.publish(topic, b"first", 2, pid=pid, dup=True)
    rec = p.expect("PUBREC", pred=lambda x: x.pid == pid, what="PUBREC for the DUP re-send")
    check(rec.rc < 0x80, f"PUBREC for the re-send has error code 0x{rec.rc:02x}")
    p.ack("PUBREL", pid)
    p.expect("PUBCOMP", pred=lambda x: x.pid == pid)
    # After PUBCOMP the packet id is free again: a new message with it is a new message.
    eq(p.publish_sync(topic, b"second", 2).type, "PUBCOMP", "QoS 2 flow")
    s.wait(2)
    time.sleep(ctx.QUIET)
    eq([m.payload for m in s.got()], [b"first", b"second"], "messages delivered")


@case("redelivery", (V3, V5))
def t_redelivery(ctx, v):
    """Unacknowledged QoS 1 PUBLISH and QoS 2 PUBREL are re-sent (DUP=1, same id) on session resume."""
    cid = ctx.session(ctx.cid(), v)
    sp = {"session_expiry_interval": 300} if v == V5 else None
    r = ctx.raw(v, cid)
    r.connect(clean=False, props=sp)
    eq(r.subscribe([(ctx.t("#"), 2)]).codes, [2], "SUBACK")
    pub = ctx.paho(v)
    pub.publish(ctx.t("one"), b"m1", 1)
    pub.publish(ctx.t("two"), b"m2", 2)
    p1 = r.expect("PUBLISH", pred=lambda p: p.payload == b"m1")
    p2 = r.expect("PUBLISH", pred=lambda p: p.payload == b"m2")
    eq((p1.qos, p2.qos), (1, 2), "delivered QoS")
    r.ack("PUBREC", p2.pid)
    r.expect("PUBREL", pred=lambda p: p.pid == p2.pid)
    r.abort()  # neither PUBACK for m1 nor PUBCOMP for m2
    r2 = ctx.raw(v, cid)
    ca = r2.connect(clean=False, props=sp)
    eq(ca.session_present, 1, "CONNACK session present")
    rp1 = r2.expect("PUBLISH", pred=lambda p: p.payload == b"m1", what="re-sent QoS 1 PUBLISH")
    eq(rp1.pid, p1.pid, "packet id of the re-sent PUBLISH")
    eq(rp1.dup, 1, "DUP flag of the re-sent PUBLISH [MQTT-3.3.1-1]")
    eq(rp1.qos, 1, "QoS of the re-sent PUBLISH")
    r2.expect("PUBREL", pred=lambda p: p.pid == p2.pid, what="re-sent PUBREL [MQTT-4.4.0-1]")
    r2.ack("PUBACK", rp1.pid)
    r2.ack("PUBCOMP", p2.pid)
    extra = [p for p in r2.collect(ctx.QUIET) if p.type == "PUBLISH"]
    no_extra(extra, "PUBLISH re-sent although it was acknowledged (m2 had been PUBRECed)")
    r2.disconnect()


# --------------------------------------------------------------------------
# Cases: retained messages, wills, sessions, takeover
# --------------------------------------------------------------------------

@case("retained", (V3, V5))
def t_retained(ctx, v):
    """Retained messages: set, replace, clear with empty payload, delivery to wildcard subscribers."""
    r1 = ctx.retained(ctx.t("r1"))
    pub = ctx.paho(v)
    live = ctx.paho(v)
    live.subscribe(r1, 1)
    pub.publish(r1, b"v1", 1, retain=True)
    m = live.wait(1)[0]
    check(not m.retain, "retain flag must be 0 on delivery to an already existing subscription "
                        "[MQTT-3.3.1-9 / MQTT-3.3.1-12]")
    n = ctx.paho(v)
    n.subscribe(r1, 2)
    m = n.wait(1)[0]
    eq((m.payload, m.retain, m.qos), (b"v1", True, 1),
       "retained message on subscribe: payload, retain flag, QoS = min(retained QoS, sub QoS)")
    n0 = ctx.paho(v)
    n0.subscribe(r1, 0)
    m = n0.wait(1)[0]
    eq((m.payload, m.retain, m.qos), (b"v1", True, 0), "retained message to a QoS 0 subscriber")

    pub.publish(r1, b"v2", 1, retain=True)
    n2 = ctx.paho(v)
    n2.subscribe(r1, 1)
    n2.wait(1)
    time.sleep(ctx.QUIET)
    eq([m.payload for m in n2.got()], [b"v2"], "retained messages after replacing")

    pub.publish(r1, b"", 1, retain=True)
    n3 = ctx.paho(v)
    n3.subscribe(r1, 1)
    time.sleep(ctx.QUIET)
    no_extra(n3.got(), "retained message still delivered after it was cleared with an empty payload")

    wt = {ctx.t("w", "a"): b"A", ctx.t("w", "b"): b"B", ctx.t("w", "c", "d"): b"CD"}
    for topic, pl in wt.items():
        pub.publish(ctx.retained(topic), pl, 1, retain=True)
    for flt, exp in ((ctx.t("w", "#"), wt),
                     (ctx.t("w", "+"), {k: x for k, x in wt.items() if x in (b"A", b"B")})):
        s = ctx.paho(v)
        s.subscribe(flt, 1)
        s.wait(len(exp))
        time.sleep(ctx.QUIET)
        got = s.got()
        eq(sorted((m.topic, m.payload) for m in got), sorted(exp.items()),
           f"retained messages for {flt}")
        check(all(m.retain for m in got), "retain flag missing on a retained message")

    if v == V5:
        # MQTT 5 [MQTT-3.3.1-5]: a QoS 0 retained message MUST be stored as well
        # (3.1.1 only says SHOULD, so that is not checked there).
        z = ctx.retained(ctx.t("z"))
        pub.publish(z, b"zero", 0, retain=True)
        time.sleep(0.1)  # QoS 0 gives no acknowledgement to wait for
        s = ctx.paho(v)
        s.subscribe(z, 1)
        m = s.wait(1)[0]
        eq((m.payload, m.qos, m.retain), (b"zero", 0, True), "QoS 0 retained message")


@case("will", (V3, V5))
def t_will(ctx, v):
    """Will published on unclean close (also as retained), not on normal DISCONNECT."""
    w = ctx.paho(v)
    w.subscribe(ctx.t("#"), 1)
    a = ctx.raw(v)
    a.connect(will={"topic": ctx.t("a"), "payload": b"gone-a", "qos": 1})
    d = ctx.raw(v)
    d.connect(will={"topic": ctx.retained(ctx.t("d")), "payload": b"gone-d", "qos": 1,
                    "retain": True})
    b = ctx.raw(v)
    b.connect(will={"topic": ctx.t("b"), "payload": b"gone-b", "qos": 1})
    expected = {ctx.t("a"): b"gone-a", ctx.t("d"): b"gone-d"}
    c = None
    if v == V5:
        c = ctx.raw(v)
        c.connect(will={"topic": ctx.t("c"), "payload": b"gone-c", "qos": 1,
                        "props": {"content_type": "text/plain", "payload_format_indicator": 1,
                                  "user_property": [("k", "v"), ("k", "w")]}})
        expected[ctx.t("c")] = b"gone-c"
    a.abort()
    d.abort()
    b.disconnect()
    if c:
        c.disconnect(rc=0x04)  # Disconnect with Will Message
    w.wait(len(expected))
    time.sleep(ctx.QUIET)
    got = w.got()
    check(not [m for m in got if m.topic == ctx.t("b")],
          "will published although the client sent DISCONNECT [MQTT-3.1.2-10]")
    eq(sorted((m.topic, m.payload) for m in got), sorted(expected.items()), "wills published")
    for m in got:
        eq(m.qos, 1, f"QoS of will {m.topic}")
        check(not m.retain, "retain flag must be 0 on delivery to an existing subscription")
        if m.topic == ctx.t("c"):
            eq(m.props.get("content_type"), "text/plain", "will Content Type")
            eq(m.props.get("payload_format_indicator"), 1, "will Payload Format Indicator")
            eq(m.props.get("user_property"), [("k", "v"), ("k", "w")], "will User Properties")
    n = ctx.paho(v)
    n.subscribe(ctx.t("d"), 1)
    m = n.wait(1)[0]
    eq((m.payload, m.retain), (b"gone-d", True), "retained will for a new subscriber")


@case("will_delay_v5")
def t_will_delay(ctx):
    """Will Delay Interval: will held back for the delay; resumed session cancels it; session end sends it."""
    delay = 2
    w = ctx.paho(V5)
    w.subscribe(ctx.t("#"), 1)
    se = {"session_expiry_interval": 30}
    clients = {}
    for name, sess, wd in (("a", 30, delay), ("b", 30, delay), ("c", 1, 30)):
        cid = ctx.session(ctx.cid(), V5)
        r = ctx.raw(V5, cid)
        r.connect(props={"session_expiry_interval": sess},
                  will={"topic": ctx.t(name), "payload": name.encode(), "qos": 1,
                        "props": {"will_delay_interval": wd}})
        clients[name] = (r, cid)
    dropped = {}
    for name in ("a", "c", "b"):
        clients[name][0].abort()
        dropped[name] = time.monotonic()
    time.sleep(0.2)
    b2 = ctx.raw(V5, clients["b"][1])
    eq(b2.connect(clean=False, props=se).session_present, 1, "session present on resume")
    # a: will after `delay` s; c: session (1 s) ends before its 30 s will delay -> will then.
    got = w.wait(2, pred=lambda m: m.topic in (ctx.t("a"), ctx.t("c")), timeout=delay + ctx.W)
    for m in got:
        name = m.topic.rsplit("/", 1)[1]
        waited = m.t - dropped[name]
        lo = delay if name == "a" else 1
        check(waited >= lo - 0.2, f"will of client {name} published {waited:.2f}s after the "
                                  f"connection closed, before its {lo}s delay/session expiry")
    end = dropped["b"] + delay + 1.5
    time.sleep(max(0.0, end - time.monotonic()))
    no_extra(w.got(lambda m: m.topic == ctx.t("b")),
             "will published although the session was resumed within the Will Delay Interval")
    b2.disconnect()


@case("takeover", (V3, V5))
def t_takeover(ctx, v):
    """A second connection with the same client id takes over: the first is disconnected."""
    cid = ctx.cid()
    a = ctx.raw(v, cid)
    a.connect()
    b = ctx.raw(v, cid)
    b.auto_ack = True
    b.connect()
    closed, pkts = a.wait_closed(ctx.W)
    check(closed, "first connection still open after a second CONNECT with the same client id "
                  "[MQTT-3.1.4-2]")
    discs = [p for p in pkts if p.type == "DISCONNECT"]
    if v == V5:
        if discs:
            eq(discs[0].rc, 0x8E, "DISCONNECT reason code to the taken-over client")
        else:
            ctx.note("first connection closed without DISCONNECT 0x8E (allowed)")
    else:
        check(not discs, "DISCONNECT sent to an MQTT 3.1.1 client")
    eq(b.subscribe([(ctx.t("x"), 1)]).codes, [1], "SUBACK on the new connection")
    b.publish_sync(ctx.t("x"), b"still here", 1)
    eq(b.expect("PUBLISH").payload, b"still here", "own message on the new connection")
    time.sleep(ctx.QUIET)
    b.ping()


@case("session", (V3, V5))
def t_session(ctx, v):
    """Persistent session: messages queued while offline are delivered on resume (session present=1)."""
    cid = ctx.session(ctx.cid(), v)
    sp = {"session_expiry_interval": 300} if v == V5 else None
    topic = ctx.t("s")
    s = ctx.raw(v, cid)
    eq(s.connect(clean=False, props=sp).session_present, 0, "session present for a new session")
    eq(s.subscribe([(topic, 1)]).codes, [1], "SUBACK")
    s.disconnect()
    pub = ctx.paho(v)
    for i in range(5):
        pub.publish(topic, str(i).encode(), 1)
    pub.publish(topic, b"q2", 2)
    pub.publish(topic, b"q0", 0)  # the server MAY queue QoS 0 messages too; not checked
    s2 = ctx.raw(v, cid)
    s2.auto_ack = True
    eq(s2.connect(clean=False, props=sp).session_present, 1, "CONNACK session present on resume")
    got = s2.publishes(6, pred=lambda p: p.qos > 0)
    eq([p.payload for p in got], [b"0", b"1", b"2", b"3", b"4", b"q2"], "queued messages, in order")
    check(all(p.qos == 1 for p in got), "queued messages must be delivered at the subscription QoS 1")
    pub.publish(topic, b"live", 1)
    s2.expect("PUBLISH", pred=lambda p: p.payload == b"live", what="live message after resume")
    if v == V5:
        s2.disconnect(props={"session_expiry_interval": 0})  # ends the session
        s3 = ctx.raw(v, cid)
        eq(s3.connect(clean=False, props=sp).session_present, 0,
           "session present after DISCONNECT with Session Expiry Interval 0")
    else:
        s2.disconnect()
        s3 = ctx.raw(v, cid)
        eq(s3.connect(clean=True).session_present, 0,
           "session present with CleanSession=1 [MQTT-3.2.2-1]")
        s3.disconnect()
        s3 = ctx.raw(v, cid)
        eq(s3.connect(clean=False).session_present, 0,
           "session present after the session was discarded by CleanSession=1")
    s3.auto_ack = True
    pub.publish(topic, b"after", 1)
    extra = [p for p in s3.collect(ctx.QUIET) if p.type == "PUBLISH"]
    no_extra(extra, "message delivered to a subscription of a discarded session")


# --------------------------------------------------------------------------
# Cases: topic matching
# --------------------------------------------------------------------------

@case("wildcards", (V3, V5))
def t_wildcards(ctx, v):
    """'+' and '#' matching (incl. empty levels and parent of '#'); '$' topics not matched by wildcards."""
    P = ctx.t()
    D = f"$test/{ctx.run}/{ctx.case}"
    T = {k: f"{P}{k}" for k in ("", "/a", "/a/b", "/a/b/c", "/b/c", "/a/x/c", "/", "//c", "/a/")}
    allp = set(T.values())

    def sel(*ks):
        return {T[k] for k in ks}

    dollar = {f"{D}/a", f"{D}/y/z"}
    filters = {
        P + "/a": sel("/a"),
        P + "/+": sel("/a", "/"),
        P + "/#": allp,                        # '#' also matches the parent level P
        P + "/a/#": sel("/a", "/a/b", "/a/b/c", "/a/x/c", "/a/"),
        P + "/+/c": sel("/b/c", "//c"),
        P + "/a/+/c": sel("/a/b/c", "/a/x/c"),
        P + "/+/+": sel("/a/b", "/b/c", "//c", "/a/"),
        P + "/a/+": sel("/a/b", "/a/"),
        P + "/+/#": allp - {P},
        "#": allp,                             # but no '$' topics [MQTT-4.7.2-1]
        "+/#": allp,
        f"+/{ctx.run}/{ctx.case}/a": sel("/a"),  # must not match D/a
        "$test/#": dollar,
        f"$test/{ctx.run}/+/a": {f"{D}/a"},
    }
    subs = {}
    for flt in filters:
        s = ctx.paho(v)
        eq(s.subscribe(flt, 1), [1], f"SUBACK for {flt}")
        subs[flt] = s
    pub = ctx.paho(v)
    for topic in list(T.values()) + sorted(dollar):
        pub.publish(topic, topic.encode(), 1)

    def ours(m):
        return m.topic in allp or m.topic in dollar

    for flt, exp in filters.items():
        subs[flt].wait(len(exp), pred=ours)
    time.sleep(ctx.QUIET)
    for flt, exp in filters.items():
        got = subs[flt].got(ours)
        eq(sorted(m.topic for m in got), sorted(exp), f"topics delivered for filter {flt!r}")
        check(all(m.payload == m.topic.encode() for m in got), "payload mismatch")
        if flt in ("#", "+/#"):
            bad = [m.topic for m in subs[flt].got() if m.topic.startswith("$")]
            check(not bad, f"filter {flt!r} matched '$' topics {bad[:3]} [MQTT-4.7.2-1]")


# --------------------------------------------------------------------------
# Cases: MQTT 5 features
# --------------------------------------------------------------------------

@case("topic_alias_v5")
def t_topic_alias(ctx):
    """Client-to-broker topic aliases; subscribers receive full topics; invalid aliases are rejected."""
    s = ctx.raw(V5)
    s.auto_ack = True
    s.connect()
    s.subscribe([(ctx.t("#"), 1)])
    p = ctx.raw(V5)
    ca = p.connect()
    tam = ca.props.get("topic_alias_maximum", 0)
    check(tam >= 1, "broker's CONNACK announces no Topic Alias Maximum (0): topic aliases "
                    "cannot be tested")
    x, y = ctx.t("x"), ctx.t("y")
    for topic, pl, qos in ((x, b"1", 1), ("", b"2", 1), ("", b"2b", 0), (y, b"3", 1), ("", b"4", 2)):
        p.publish_sync(topic, pl, qos, props={"topic_alias": 1})
    got = s.publishes(5)
    eq(sorted((m.payload, m.topic) for m in got),
       [(b"1", x), (b"2", x), (b"2b", x), (b"3", y), (b"4", y)],
       "topics delivered for aliased publishes")
    check(all("topic_alias" not in m.props for m in got),
          "broker sent a Topic Alias to a client that allowed none (Topic Alias Maximum 0)")
    cases = [("alias-only PUBLISH with an alias never set", "", 1)]
    if tam < 65535:
        cases.append((f"Topic Alias {tam + 1} > Topic Alias Maximum {tam}", x, tam + 1))
    cases.append(("Topic Alias 0", x, 0))
    for what, topic, alias in cases:
        q = ctx.raw(V5)
        q.connect()
        q.publish(topic, b"bad", 0, props={"topic_alias": alias})
        closed, pkts = q.wait_closed(ctx.W)
        check(closed, f"{what}: connection not closed (protocol error)")
        for d in (p for p in pkts if p.type == "DISCONNECT"):
            check(d.rc >= 0x80, f"{what}: DISCONNECT with non-error code 0x{d.rc:02x}")
    time.sleep(0.1)
    no_extra([m for m in s.collect(ctx.QUIET) if m.type == "PUBLISH"],
             "message with an invalid topic alias was delivered")


@case("receive_maximum_v5")
def t_receive_maximum(ctx):
    """Client Receive Maximum 2: never more than 2 unacknowledged QoS 1/2 PUBLISHes in flight to it."""
    # Mosquitto 2.0.11 violates this: after the first PUBACK it sends two more PUBLISHes
    # (3 in flight). Known 2.0.11 quota bug (mosquitto issue #2301), fixed in 2.0.13.
    RM, N1 = 2, 5
    r = ctx.raw(V5)
    r.connect(props={"receive_maximum": RM})
    r.subscribe([(ctx.t("q"), 2)])
    pub = ctx.paho(V5)
    for i in range(N1):
        pub.publish(ctx.t("q"), f"{i}".encode(), 1)
    quiet = 0.25 * ctx.scale
    received, inflight, maxin = [], [], 0
    while len(received) < N1 or inflight:
        p = r.recv(quiet if inflight else ctx.W)
        if p is None:
            check(inflight, f"no PUBLISH for {ctx.W:.1f}s although nothing is in flight "
                            f"(got {len(received)}/{N1})")
            r.ack("PUBACK", inflight.pop(0))
            continue
        if p.type != "PUBLISH":
            continue
        received.append(p.payload)
        inflight.append(p.pid)
        maxin = max(maxin, len(inflight))
        check(len(inflight) <= RM, f"{len(inflight)} unacknowledged QoS 1 PUBLISHes in flight; "
                                   f"client Receive Maximum is {RM} [MQTT-3.3.4-9]")
    eq(received, [str(i).encode() for i in range(N1)], "messages received")
    if maxin < RM:
        ctx.note(f"broker kept at most {maxin} message(s) in flight (Receive Maximum {RM})")
    # QoS 2: a message stays in flight until PUBCOMP, not just PUBREC.
    for i in range(3):
        pub.publish(ctx.t("q"), f"x{i}".encode(), 2)
    a = r.expect("PUBLISH")
    b = r.expect("PUBLISH")
    eq((a.payload, b.payload, a.qos), (b"x0", b"x1", 2), "first two QoS 2 messages")
    no_extra([p for p in r.collect(quiet) if p.type == "PUBLISH"],
             f"third QoS 2 PUBLISH sent while {RM} are unacknowledged")
    r.ack("PUBREC", a.pid)
    r.expect("PUBREL", pred=lambda p: p.pid == a.pid)
    no_extra([p for p in r.collect(quiet) if p.type == "PUBLISH"],
             "PUBLISH sent after PUBREC but before PUBCOMP, exceeding Receive Maximum")
    r.ack("PUBCOMP", a.pid)
    c = r.expect("PUBLISH", what="third QoS 2 PUBLISH after PUBCOMP")
    eq(c.payload, b"x2", "third message")
    for m in (b, c):
        r.ack("PUBREC", m.pid)
        r.expect("PUBREL", pred=lambda p, m=m: p.pid == m.pid)
        r.ack("PUBCOMP", m.pid)
    r.ping()


@case("max_packet_size_v5")
def t_max_packet_size(ctx):
    """Client Maximum Packet Size: broker sends nothing bigger; too-big messages are dropped for it."""
    MPS = 256
    r = ctx.raw(V5)
    r.auto_ack = True
    r.connect(props={"maximum_packet_size": MPS})
    r.subscribe([(ctx.t("#"), 1)])
    pub = ctx.paho(V5)
    pub.publish(ctx.t("big"), b"B" * 1000, 1)
    pub.publish(ctx.t("props"), b"p", 1, props={"user_property": [("k", "v" * 400)]})
    pub.publish(ctx.t("small"), b"s", 1)
    r.expect("PUBLISH", pred=lambda p: p.topic == ctx.t("small"))
    r.collect(ctx.QUIET)
    too_big = [p for p in r.log if p.size > MPS]
    check(not too_big, f"broker sent packets larger than Maximum Packet Size {MPS}: "
                       f"{[(p.type, p.size) for p in too_big]} [MQTT-3.1.2-24]")
    r.ping()  # still connected


@case("message_expiry_v5")
def t_message_expiry(ctx):
    """Message Expiry Interval: expired retained/queued messages dropped; forwarded expiry decremented."""
    pub = ctx.paho(V5)
    rs, rl = ctx.retained(ctx.t("r", "short")), ctx.retained(ctx.t("r", "long"))
    pub.publish(rs, b"rs", 1, retain=True, props={"message_expiry_interval": 1})
    pub.publish(rl, b"rl", 1, retain=True, props={"message_expiry_interval": 60})
    cid = ctx.session(ctx.cid(), V5)
    sp = {"session_expiry_interval": 300}
    s = ctx.raw(V5, cid)
    s.connect(clean=False, props=sp)
    s.subscribe([(ctx.t("q", "#"), 1)])
    s.disconnect()
    t0 = time.monotonic()
    pub.publish(ctx.t("q", "short"), b"qs", 1, props={"message_expiry_interval": 1})
    pub.publish(ctx.t("q", "long"), b"ql", 1, props={"message_expiry_interval": 60})
    pub.publish(ctx.t("q", "none"), b"qn", 1)
    live = ctx.raw(V5)
    live.auto_ack = True
    live.connect()
    live.subscribe([(ctx.t("live"), 1)])
    pub.publish(ctx.t("live"), b"lv", 1, props={"message_expiry_interval": 60})
    m = live.expect("PUBLISH")
    e = m.props.get("message_expiry_interval")
    check(e is not None and 0 < e <= 60, f"live message: Message Expiry Interval {e}, expected 1..60")
    time.sleep(max(0.0, t0 + 2.2 - time.monotonic()))
    n = ctx.raw(V5)
    n.auto_ack = True
    n.connect()
    n.subscribe([(ctx.t("r", "#"), 1)])
    n.publishes(1)
    got = all_publishes(n, ctx.QUIET)
    eq(sorted(p.payload for p in got), [b"rl"], "retained messages after 2 s (1 s one expired)")
    e = got[-1].props.get("message_expiry_interval")
    check(e is not None and 1 <= e <= 58,
          f"retained message stored with expiry 60 s, sent >2 s later with expiry {e} "
          f"(must be decremented by the time waited) [MQTT-3.3.2-6]")
    s2 = ctx.raw(V5, cid)
    s2.auto_ack = True
    eq(s2.connect(clean=False, props=sp).session_present, 1, "session present")
    s2.publishes(2)
    got = all_publishes(s2, ctx.QUIET)
    eq(sorted(p.payload for p in got), [b"ql", b"qn"], "queued messages after 2 s (1 s one expired)")
    for p in got:
        e = p.props.get("message_expiry_interval")
        if p.payload == b"qn":
            check(e is None, f"Message Expiry Interval {e} added to a message without one")
        else:
            check(e is not None and 1 <= e <= 58, f"queued message with expiry 60 s delivered "
                                                  f">2 s later with expiry {e}")
    s2.disconnect()


@case("user_properties_v5")
def t_user_properties(ctx):
    """User Properties forwarded unchanged, in order, duplicates kept (live and retained)."""
    ups = [("a", "1"), ("b", "2"), ("a", "3"), ("ключ", "значение ✓"), ("", ""), ("a", "1")]
    s = ctx.raw(V5)
    s.auto_ack = True
    s.connect()
    s.subscribe([(ctx.t("#"), 1)])
    p = ctx.raw(V5)
    p.connect()
    p.publish_sync(ctx.retained(ctx.t("u")), b"x", 1, retain=True, props={"user_property": ups})
    m = s.expect("PUBLISH")
    eq(m.props.get("user_property"), ups, "User Properties of the forwarded message [MQTT-3.3.2-18]")
    n = ctx.raw(V5)
    n.auto_ack = True
    n.connect()
    n.subscribe([(ctx.t("u"), 1)])
    m = n.expect("PUBLISH")
    eq(m.props.get("user_property"), ups, "User Properties of the retained message")


@case("request_response_v5")
def t_request_response(ctx):
    """Content Type, Response Topic, Correlation Data, Payload Format Indicator forwarded unchanged."""
    req, srv = ctx.raw(V5), ctx.raw(V5)
    for c, t in ((req, "resp"), (srv, "req")):
        c.auto_ack = True
        c.connect()
        c.subscribe([(ctx.t(t), 1)])
    props = {"content_type": "application/json; charset=utf-8", "response_topic": ctx.t("resp"),
             "correlation_data": b"\x00\x01\xfe\xff", "payload_format_indicator": 1}
    req.publish_sync(ctx.t("req"), b'{"q": 1}', 1, props=props)
    m = srv.expect("PUBLISH")
    for k, val in props.items():
        eq(m.props.get(k), val, f"forwarded {k}")
    srv.publish_sync(m.props["response_topic"], b'{"a": 1}', 1,
                     props={"correlation_data": m.props["correlation_data"]})
    r = req.expect("PUBLISH")
    eq((r.topic, r.payload, r.props.get("correlation_data")),
       (ctx.t("resp"), b'{"a": 1}', props["correlation_data"]), "response")


@case("assigned_client_id_v5")
def t_assigned_client_id(ctx):
    """Empty client id in MQTT 5: CONNACK carries an Assigned Client Identifier, unique per client."""
    ids = []
    clients = []
    for _ in range(2):
        r = ctx.raw(V5, cid="")
        ca = r.connect()
        aid = ca.props.get("assigned_client_identifier")
        check(aid, f"CONNACK without Assigned Client Identifier for an empty client id: {ca}")
        ids.append(aid)
        clients.append(r)
    check(ids[0] != ids[1], f"same client identifier assigned twice: {ids[0]!r}")
    for r in clients:
        r.ping()


@case("empty_client_id_v3")
def t_empty_client_id_v3(ctx):
    """Empty client id in 3.1.1: accepted with CleanSession=1, refused (0x02) with CleanSession=0."""
    a = ctx.raw(V3, cid="")
    a.connect(clean=True)
    a.ping()
    b = ctx.raw(V3, cid="")
    ca = b.connect(ok=False, clean=False)
    eq(ca.rc, 0x02, "CONNACK code for empty client id with CleanSession=0 [MQTT-3.1.3-8]")
    closed, _ = b.wait_closed(ctx.W)
    check(closed, "connection not closed after refusing CONNACK [MQTT-3.2.2-5]")


@case("server_keep_alive_v5")
def t_server_keep_alive(ctx):
    """Record Server Keep Alive and the other CONNACK capabilities (informational; honours them)."""
    for ka in (60, 0):
        r = ctx.raw(V5)
        ca = r.connect(keepalive=ka)
        ska = ca.props.get("server_keep_alive")
        ctx.note(f"keep alive {ka} -> Server Keep Alive {ska if ska is not None else 'absent'}")
        if ka == 60:
            caps = {k: val for k, val in ca.props.items() if k != "assigned_client_identifier"}
            ctx.note(f"CONNACK properties: {caps}")
        # A client must use the server's value; a ping right away is always within it.
        r.ping()
        r.disconnect()


@case("no_local_v5")
def t_no_local(ctx):
    """No Local: own messages not delivered to a No Local subscription, other clients' are."""
    a = ctx.raw(V5)
    a.auto_ack = True
    a.connect()
    a.subscribe([(ctx.t("nl"), opts(1, nl=1)), (ctx.t("l"), opts(1))])
    b = ctx.paho(V5)
    b.subscribe(ctx.t("nl"), 1)
    a.publish_sync(ctx.t("nl"), b"a-nl", 1)
    a.publish_sync(ctx.t("l"), b"a-l", 1)
    b.publish(ctx.t("nl"), b"b-nl", 1)
    a.publishes(2)
    got = all_publishes(a, ctx.QUIET)
    eq(sorted(p.payload for p in got), [b"a-l", b"b-nl"],
       "messages delivered to the No Local client [MQTT-3.8.3-3]")
    b.wait(2)
    eq(sorted(m.payload for m in b.got()), [b"a-nl", b"b-nl"], "messages delivered to the other client")


@case("retain_as_published_v5")
def t_retain_as_published(ctx):
    """Retain As Published: live retained messages keep RETAIN=1 only with RAP=1."""
    s = ctx.raw(V5)
    s.auto_ack = True
    s.connect()
    s.subscribe([(ctx.t("rap1"), opts(1, rap=1)), (ctx.t("rap0"), opts(1, rap=0))])
    pub = ctx.paho(V5)
    for t in ("rap1", "rap0"):
        pub.publish(ctx.retained(ctx.t(t)), t.encode(), 1, retain=True)
    got = {p.topic: p for p in s.publishes(2)}
    eq(got[ctx.t("rap1")].retain, 1, "RETAIN flag with Retain As Published = 1 [MQTT-3.3.1-13]")
    eq(got[ctx.t("rap0")].retain, 0, "RETAIN flag with Retain As Published = 0 [MQTT-3.3.1-12]")
    n = ctx.raw(V5)
    n.auto_ack = True
    n.connect()
    n.subscribe([(ctx.t("rap0"), opts(1, rap=0))])
    eq(n.expect("PUBLISH").retain, 1, "RETAIN flag of a retained message sent on subscribe (RAP=0)")


@case("retain_handling_v5")
def t_retain_handling(ctx):
    """Retain Handling 0: on every subscribe; 1: only for a new subscription; 2: never."""
    topic = ctx.retained(ctx.t("rh"))
    pub = ctx.paho(V5)
    pub.publish(topic, b"kept", 1, retain=True)
    counts = {}
    for rh in (0, 1, 2):
        c = ctx.raw(V5)
        c.auto_ack = True
        c.connect()
        c.subscribe([(topic, opts(1, rh=rh))])
        c.subscribe([(topic, opts(1, rh=rh))])  # the same subscription again
        pkts = c.collect(ctx.QUIET)
        counts[rh] = len([p for p in pkts if p.type == "PUBLISH" and p.payload == b"kept"])
    eq(counts, {0: 2, 1: 1, 2: 0}, "retained deliveries for two identical subscribes per Retain "
                                   "Handling value [MQTT-3.3.1-9/10/11]")


@case("subscription_identifiers_v5")
def t_subscription_identifiers(ctx):
    """Delivered PUBLISHes carry the Subscription Identifiers of the matching subscriptions."""
    r = ctx.raw(V5)
    r.auto_ack = True
    ca = r.connect()
    check(ca.props.get("subscription_identifier_available", 1) == 1,
          "broker announces Subscription Identifiers are not available")
    MAXID = 268435455
    for flt, sid in ((ctx.t("a", "#"), 1), (ctx.t("+", "b"), 2), (ctx.t("big"), MAXID)):
        eq(r.subscribe([(flt, 1)], props={"subscription_identifier": sid}).codes, [1], "SUBACK")
    r.subscribe([(ctx.t("none"), 1)])
    pub = ctx.paho(V5)

    def deliver(topic, n_max):
        pub.publish(topic, topic.encode(), 1)
        got = r.publishes(1, pred=lambda p: p.topic == topic)
        got += [p for p in r.collect(ctx.QUIET) if p.type == "PUBLISH" and p.topic == topic]
        check(len(got) <= n_max, f"{topic}: {len(got)} copies delivered")
        return got

    # Overlapping subscriptions: one copy carrying both ids, or one copy per subscription.
    got = deliver(ctx.t("a", "b"), 2)
    ids = sorted(i for p in got for i in p.props.get("subscription_identifier", []))
    eq(ids, [1, 2], f"subscription identifiers for a topic matching two subscriptions ({got})")
    got = deliver(ctx.t("a", "c"), 1)
    eq(got[0].props.get("subscription_identifier"), [1], "subscription identifier")
    got = deliver(ctx.t("big"), 1)
    eq(got[0].props.get("subscription_identifier"), [MAXID], "maximum subscription identifier")
    got = deliver(ctx.t("none"), 1)
    check("subscription_identifier" not in got[0].props,
          "subscription identifier on a message for a subscription without one")
    r.subscribe([(ctx.t("a", "#"), 1)], props={"subscription_identifier": 5})  # replaces id 1
    got = deliver(ctx.t("a", "c"), 1)
    eq(got[0].props.get("subscription_identifier"), [5], "identifier after re-subscribing")


@case("shared_subscriptions_v5")
def t_shared_subscriptions(ctx):
    """$share/group/filter: each message goes to exactly one member; both members get some."""
    N = 20
    topic = ctx.t("s")
    members = []
    for _ in range(2):
        m = ctx.paho(V5)
        check(m.connack[2].get("shared_subscription_available", 1) == 1,
              "broker announces Shared Subscriptions are not available")
        eq(m.subscribe(f"$share/g{ctx.run}/{topic}", 1), [1], "SUBACK for the shared subscription")
        members.append(m)
    plain = ctx.paho(V5)
    plain.subscribe(topic, 1)
    pub = ctx.paho(V5)
    for i in range(N):
        pub.publish(topic, str(i).encode(), 1)
    plain.wait(N)
    deadline = time.monotonic() + ctx.W
    while sum(len(m.got()) for m in members) < N and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(ctx.QUIET)
    seqs = [[int(x.payload) for x in m.got()] for m in members]
    every = sorted(seqs[0] + seqs[1])
    eq(every, list(range(N)), "messages across the shared subscription (each exactly once)")
    check(seqs[0] and seqs[1], f"one member received all messages: {[len(s) for s in seqs]}")
    eq(sorted(int(x.payload) for x in plain.got()), list(range(N)), "non-shared subscriber")


@case("reason_codes", (V3, V5))
def t_reason_codes(ctx, v):
    """SUBACK grants the requested QoS; invalid filters fail; v5 UNSUBACK 0x11 for unknown filters."""
    r = ctx.raw(v)
    r.connect()
    sa = r.subscribe([(ctx.t("q0"), 0), (ctx.t("q1"), 1), (ctx.t("q2"), 2)])
    eq(sa.codes, [0, 1, 2], "SUBACK return codes, in order [MQTT-3.9.3-1]")
    ua = r.unsubscribe([ctx.t("q1"), ctx.t("never")])
    if v == V5:
        eq(ua.codes, [0x00, 0x11], "UNSUBACK reason codes (Success, No subscription existed)")
    else:
        eq(ua.codes, [], "3.1.1 UNSUBACK has no payload")
    r.ping()
    if v == V5:
        r.publish(ctx.t("nobody"), b"x", 1)
        ack = r.expect("PUBACK")
        check(ack.rc in (0x00, 0x10), f"PUBACK code 0x{ack.rc:02x} for a message without "
                                      f"subscribers (expected 0x00 or 0x10)")
    for bad in (ctx.t("a", "#", "b"), ctx.t("a+")):
        c = ctx.raw(v)
        c.connect()
        pid = c.next_pid()
        body = struct.pack("!H", pid) + (b"\x00" if v == V5 else b"") + enc_str(bad) + b"\x01"
        c.send(fixed(0x82, body))
        pkts = c.collect(ctx.W, stop=lambda ps: any(p.type == "SUBACK" for p in ps))
        sub = [p for p in pkts if p.type == "SUBACK"]
        if sub:
            check(sub[0].codes and sub[0].codes[0] >= 0x80,
                  f"invalid topic filter {bad!r} granted: SUBACK {sub[0].codes}")
        else:
            check(c.closed, f"no SUBACK for invalid topic filter {bad!r} and connection not closed")


# --------------------------------------------------------------------------
# Cases: protocol violations, keep alive
# --------------------------------------------------------------------------

def expect_closed(ctx, c, what, connected=True):
    """The broker must close the connection. Allowed before that: after CONNACK (connected)
    a v5 DISCONNECT with an error code; before CONNACK a refusing CONNACK."""
    closed, pkts = c.wait_closed(ctx.W)
    check(closed, f"{what}: connection not closed within {ctx.W:.1f}s (got {pkts[:3]})")
    for p in pkts:
        if p.type == "DISCONNECT" and c.v == V3:
            raise Fail(f"{what}: DISCONNECT sent to an MQTT 3.1.1 client")
        if p.type == "DISCONNECT" and not connected:
            raise Fail(f"{what}: DISCONNECT sent before a CONNACK [MQTT-3.14.0-1]")
        if p.type == "DISCONNECT":
            check(p.rc >= 0x80, f"{what}: DISCONNECT with non-error code 0x{p.rc:02x}")
        elif p.type == "CONNACK" and not connected:
            check(p.rc != 0, f"{what}: CONNACK accepted the connection")
        else:
            raise Fail(f"{what}: broker answered with {p}")
    return pkts


def roundtrip(ctx, v):
    s = ctx.paho(v)
    s.subscribe(ctx.t("ok"), 1)
    ctx.paho(v).publish(ctx.t("ok"), b"ok", 1)
    eq(s.wait(1)[0].payload, b"ok", "normal client after the violations")


@case("malformed", (V3, V5))
def t_malformed(ctx, v):
    """Malformed packets / protocol errors after CONNECT close the connection; others unaffected."""
    p5 = b"\x00" if v == V5 else b""
    topic = ctx.t("m")
    bad = [
        ("reserved packet type 0", b"\x00\x00"),
        ("packet type 15 with flags 0xF", b"\xff\x04garb"),
        ("PUBLISH with QoS 3", fixed(0x36, enc_str(topic) + b"\x00\x01" + p5 + b"x")),
        ("PUBLISH QoS 1 with packet id 0", fixed(0x32, enc_str(topic) + b"\x00\x00" + p5 + b"x")),
        ("PUBLISH topic containing '+'", fixed(0x30, enc_str(ctx.t("+")) + p5 + b"x")),
        ("PUBLISH topic containing '#'", fixed(0x30, enc_str(ctx.t("#")) + p5 + b"x")),
        ("PUBLISH topic with invalid UTF-8", fixed(0x30, enc_str(b"cf/\xc0\x80") + p5 + b"x")),
        ("PUBLISH topic length beyond packet", fixed(0x30, b"\x00\x50cf/x")),
        ("SUBSCRIBE with reserved flags 0000", fixed(0x80, b"\x00\x01" + p5 + enc_str(topic) + b"\x01")),
        ("SUBSCRIBE without topic filters", fixed(0x82, b"\x00\x01" + p5)),
        ("remaining length of 5 bytes", b"\x30\xff\xff\xff\xff\x7f"),
        ("second CONNECT", None),
    ]
    for what, data in bad:
        c = ctx.raw(v)
        c.connect()
        c.send(c.connect_packet() if data is None else data)
        expect_closed(ctx, c, what)
    roundtrip(ctx, v)


@case("connect_first")
def t_connect_first(ctx):
    """A first packet other than CONNECT makes the broker close the connection [MQTT-3.1.0-1]."""
    firsts = [
        ("PINGREQ", b"\xc0\x00"),
        ("PUBLISH", fixed(0x30, enc_str(ctx.t("x")) + b"x")),
        ("SUBSCRIBE", fixed(0x82, b"\x00\x01" + enc_str(ctx.t("x")) + b"\x00")),
        # 'G' 'E' reads as a packet of type 4 with remaining length 69: send enough bytes
        # that even a server which reads whole packets before validating them sees one.
        ("HTTP request", b"GET / HTTP/1.1\r\nHost: example.com\r\nUser-Agent: conformance\r\n"
                         b"Accept: */*\r\nConnection: close\r\n\r\n"),
    ]
    assert len(firsts[-1][1]) >= 2 + 69
    for what, data in firsts:
        c = ctx.raw(V3)
        c.send(data)
        expect_closed(ctx, c, f"{what} as first packet", connected=False)
    roundtrip(ctx, V3)


@case("bad_connect", (V3, V5))
def t_bad_connect(ctx, v):
    """Invalid CONNECT packets are refused (closed, no successful CONNACK)."""
    will = {"topic": ctx.t("w"), "payload": b"w"}
    bad = [
        ("reserved connect flag set [MQTT-3.1.2-3]", {"flags": 0x03}),
        ("will QoS 3 [MQTT-3.1.2-14]", {"will": will, "flags": 0x02 | 0x04 | 0x18}),
        ("will QoS 1 without will flag [MQTT-3.1.2-13]", {"flags": 0x02 | 0x08}),
        ("will retain without will flag [MQTT-3.1.2-15]", {"flags": 0x02 | 0x20}),
    ]
    if v == V3:
        bad += [
            ("password flag without user name flag [MQTT-3.1.2-22]", {"flags": 0x02 | 0x40,
                                                                      "password": "pw"}),
            ("unsupported protocol level 9 [MQTT-3.1.2-2]", {"level": 9}),
        ]
    else:
        bad += [
            ("protocol name 'MQTX'", {"proto_name": "MQTX"}),
            ("Receive Maximum 0", {"props": {"receive_maximum": 0}}),
            ("Maximum Packet Size 0", {"props": {"maximum_packet_size": 0}}),
            ("Session Expiry Interval twice", {"raw_props": b"\x0a\x11\x00\x00\x00\x0a"
                                                            b"\x11\x00\x00\x00\x0a"}),
        ]
    for what, kw in bad:
        c = ctx.raw(v)
        if ctx.username is not None and "flags" in kw and "password" not in kw:
            kw["flags"] |= 0xC0  # keep the credentials in the packet
        c.send(c.connect_packet(**kw))
        pkts = expect_closed(ctx, c, what, connected=False)
        if kw.get("level") == 9:
            ca = [p for p in pkts if p.type == "CONNACK"]
            check(ca and ca[0].rc == 0x01, f"{what}: expected CONNACK 0x01 before close, got {ca}")
    roundtrip(ctx, v)


@case("keep_alive", (V3, V5))
def t_keep_alive(ctx, v):
    """Keep alive 1 s: silent client closed within 1.5x (+slack) and its will sent; pinging client kept."""
    # [MQTT-3.1.2-24]: the server MUST close the connection after 1.5 x Keep Alive without
    # a control packet. Mosquitto 2.0.11 checks keep alives only every ~5 s and closes a
    # keep-alive-1 client after about 5.5 s, so it fails this case (limit here: 3 s).
    KA, LIMIT = 1, 3.0
    w = ctx.paho(v)
    w.subscribe(ctx.t("#"), 1)
    a = ctx.raw(v)
    a.connect(keepalive=KA, will={"topic": ctx.t("will"), "payload": b"timed out", "qos": 1})
    t0 = time.monotonic()
    b = ctx.raw(v)
    b.connect(keepalive=KA)
    closed_at, pkts, next_ping = None, [], t0 + 0.5
    while time.monotonic() < t0 + LIMIT * ctx.scale:
        if closed_at is None:
            try:
                p = a.recv(0.05)
                if p is not None:
                    pkts.append(p)
            except Closed:
                closed_at = time.monotonic()
        else:
            time.sleep(0.05)
        if time.monotonic() >= next_ping:
            b.ping()
            next_ping += 0.5
        if closed_at is not None and time.monotonic() > t0 + 2.5:
            break
    b.ping()  # the pinging client must still be connected
    check(closed_at is not None, f"silent client with keep alive {KA}s still connected after "
                                 f"{LIMIT * ctx.scale:.1f}s [MQTT-3.1.2-24]")
    el = closed_at - t0
    check(el >= 0.9 * KA, f"silent client closed after {el:.2f}s, before its keep alive {KA}s")
    for p in pkts:
        check(p.type == "DISCONNECT" and p.rc >= 0x80, f"unexpected packet to the silent client: {p}")
    m = w.wait(1, timeout=ctx.W)[0]
    eq(m.payload, b"timed out", "will of the timed-out client")
    ctx.note(f"silent client closed after {el:.2f}s")


# --------------------------------------------------------------------------
# Runner
# --------------------------------------------------------------------------

def main(argv=None):
    ap = argparse.ArgumentParser(description="MQTT 3.1.1/5.0 broker conformance tests")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=1883)
    ap.add_argument("--only", help="comma-separated case names to run")
    ap.add_argument("--list", action="store_true", help="list the cases and exit")
    ap.add_argument("--username")
    ap.add_argument("--password")
    ap.add_argument("--time-scale", type=float, default=1.0,
                    help="multiply the wait timeouts (for slow brokers/machines); default 1")
    ap.add_argument("--verbose", action="store_true", help="print tracebacks of failures")
    args = ap.parse_args(argv)
    if args.password is not None and args.username is None:
        ap.error("--password needs --username")

    if args.list:
        for name, _, doc in CASES:
            print(f"{name:32} {doc}")
        return 0
    selected = CASES
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        known = {n for n, _, _ in CASES}
        unknown = [n for n in names if n not in known]
        if unknown:
            ap.error(f"unknown case(s): {', '.join(unknown)} (see --list)")
        selected = [c for c in CASES if c[0] in names]
    try:
        socket.create_connection((args.host, args.port), timeout=3).close()
    except OSError as e:
        print(f"cannot connect to {args.host}:{args.port}: {e}", file=sys.stderr)
        return 2

    ctx = Ctx(args)
    failed = []
    start = time.monotonic()
    for name, fn, _ in selected:
        ctx.begin(name)
        t0 = time.monotonic()
        err = None
        try:
            fn(ctx)
        except Fail as e:
            err = str(e)
        except Exception as e:  # a bug in the case or an unexpected broker reaction
            err = f"{type(e).__name__}: {e}"
        if err and args.verbose:
            traceback.print_exc()
        cleanup_errors = ctx.cleanup()
        if err is None and cleanup_errors:
            err = "; ".join(cleanup_errors)
        ms = (time.monotonic() - t0) * 1000
        if err is None:
            print(f"PASS {name} ({ms:.0f} ms)", flush=True)
        else:
            failed.append(name)
            print(f"FAIL {name}: {err}", flush=True)
    total = time.monotonic() - start
    print(f"{len(selected) - len(failed)}/{len(selected)} passed in {total:.1f}s (run id {ctx.run})",
          flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
