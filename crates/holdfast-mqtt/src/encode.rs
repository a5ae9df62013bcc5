//! Encoding packets.

use bytes::{BufMut, BytesMut};

use crate::props::Properties;
use crate::{Ack, Disconnect, Packet, QoS, SubAck, Version, reason};

pub(crate) fn varint_len(v: usize) -> usize {
    match v {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

pub(crate) fn put_varint(out: &mut BytesMut, mut v: usize) {
    loop {
        let mut b = (v & 0x7F) as u8;
        v >>= 7;
        if v > 0 {
            b |= 0x80;
        }
        out.put_u8(b);
        if v == 0 {
            break;
        }
    }
}

pub(crate) fn put_string(out: &mut BytesMut, s: &str) {
    put_binary(out, s.as_bytes());
}

pub(crate) fn put_binary(out: &mut BytesMut, b: &[u8]) {
    out.put_u16(b.len() as u16);
    out.put_slice(b);
}

fn header(out: &mut BytesMut, first: u8, len: usize) {
    out.reserve(5 + len);
    out.put_u8(first);
    put_varint(out, len);
}

fn props_len(p: &Properties, v: Version) -> usize {
    if v.is_v5() { p.wire_len() } else { 0 }
}

fn put_props(out: &mut BytesMut, p: &Properties, v: Version) {
    if v.is_v5() {
        p.encode(out);
    }
}

fn ack(out: &mut BytesMut, first: u8, a: &Ack, v: Version) {
    // With a reason code the property length is written even when zero:
    // allowed either way (MQTT 5 §3.4.2.2.1), and some clients expect it.
    if v.is_v5() && (a.code != 0 || !a.properties.is_empty()) {
        header(out, first, 3 + a.properties.wire_len());
        out.put_u16(a.pkid);
        out.put_u8(a.code);
        a.properties.encode(out);
    } else {
        header(out, first, 2);
        out.put_u16(a.pkid);
    }
}

fn reason_only(out: &mut BytesMut, first: u8, d: &Disconnect, v: Version) {
    if !v.is_v5() || (d.code == 0 && d.properties.is_empty()) {
        header(out, first, 0);
    } else {
        header(out, first, 1 + d.properties.wire_len());
        out.put_u8(d.code);
        d.properties.encode(out);
    }
}

fn suback(out: &mut BytesMut, first: u8, s: &SubAck, v: Version, codes: bool) {
    let n = if codes { s.codes.len() } else { 0 };
    header(out, first, 2 + props_len(&s.properties, v) + n);
    out.put_u16(s.pkid);
    put_props(out, &s.properties, v);
    if codes {
        for &c in &s.codes {
            out.put_u8(if v.is_v5() { c } else { suback_v3(c) });
        }
    }
}

/// 3.1.1 SUBACK codes are the granted QoS or 0x80.
fn suback_v3(code: u8) -> u8 {
    if code <= reason::GRANTED_QOS_2 { code } else { 0x80 }
}

/// Appends the wire form of `packet` in protocol `v` to `out`. Fields that
/// `v` does not have (properties, reason codes in 3.1.1) are left out.
///
/// The caller keeps fields within their wire limits: strings and binary
/// data at most 65,535 bytes, the packet at most 268,435,455. Everything
/// [`decode`](crate::decode) returns is within them.
pub fn encode(packet: &Packet, v: Version, out: &mut BytesMut) {
    match packet {
        Packet::Connect(c) => {
            let v = c.version;
            let name: &[u8] = if v == Version::V31 { b"MQIsdp" } else { b"MQTT" };
            let mut len = 2 + name.len() + 1 + 1 + 2 + props_len(&c.properties, v) + 2 + c.client_id.len();
            if let Some(w) = &c.will {
                len += props_len(&w.properties, v) + 2 + w.topic.len() + 2 + w.payload.len();
            }
            len += c.username.as_ref().map_or(0, |u| 2 + u.len());
            len += c.password.as_ref().map_or(0, |p| 2 + p.len());
            header(out, 0x10, len);
            put_binary(out, name);
            out.put_u8(v.level());
            let mut flags = 0u8;
            if c.clean_start {
                flags |= 0x02;
            }
            if let Some(w) = &c.will {
                flags |= 0x04 | ((w.qos as u8) << 3);
                if w.retain {
                    flags |= 0x20;
                }
            }
            if c.password.is_some() {
                flags |= 0x40;
            }
            if c.username.is_some() {
                flags |= 0x80;
            }
            out.put_u8(flags);
            out.put_u16(c.keep_alive);
            put_props(out, &c.properties, v);
            put_string(out, &c.client_id);
            if let Some(w) = &c.will {
                put_props(out, &w.properties, v);
                put_string(out, &w.topic);
                put_binary(out, &w.payload);
            }
            if let Some(u) = &c.username {
                put_string(out, u);
            }
            if let Some(p) = &c.password {
                put_binary(out, p);
            }
        }
        Packet::ConnAck(a) => {
            header(out, 0x20, 2 + props_len(&a.properties, v));
            out.put_u8(u8::from(a.session_present));
            out.put_u8(if v.is_v5() { a.code } else { reason::connack_v3(a.code) });
            put_props(out, &a.properties, v);
        }
        Packet::Publish(p) => {
            let pkid_len = if p.qos == QoS::AtMostOnce { 0 } else { 2 };
            let len = 2 + p.topic.len() + pkid_len + props_len(&p.properties, v) + p.payload.len();
            let mut first = 0x30 | ((p.qos as u8) << 1);
            if p.dup {
                first |= 0x08;
            }
            if p.retain {
                first |= 0x01;
            }
            header(out, first, len);
            put_string(out, &p.topic);
            if pkid_len > 0 {
                out.put_u16(p.pkid);
            }
            put_props(out, &p.properties, v);
            out.put_slice(&p.payload);
        }
        Packet::PubAck(a) => ack(out, 0x40, a, v),
        Packet::PubRec(a) => ack(out, 0x50, a, v),
        Packet::PubRel(a) => ack(out, 0x62, a, v),
        Packet::PubComp(a) => ack(out, 0x70, a, v),
        Packet::Subscribe(s) => {
            let filters: usize = s.filters.iter().map(|(f, _)| 2 + f.len() + 1).sum();
            header(out, 0x82, 2 + props_len(&s.properties, v) + filters);
            out.put_u16(s.pkid);
            put_props(out, &s.properties, v);
            for (f, o) in &s.filters {
                put_string(out, f);
                let mut b = o.qos as u8;
                if v.is_v5() {
                    b |= u8::from(o.no_local) << 2 | u8::from(o.retain_as_published) << 3 | o.retain_handling << 4;
                }
                out.put_u8(b);
            }
        }
        Packet::SubAck(s) => suback(out, 0x90, s, v, true),
        Packet::Unsubscribe(u) => {
            let filters: usize = u.filters.iter().map(|f| 2 + f.len()).sum();
            header(out, 0xA2, 2 + props_len(&u.properties, v) + filters);
            out.put_u16(u.pkid);
            put_props(out, &u.properties, v);
            for f in &u.filters {
                put_string(out, f);
            }
        }
        Packet::UnsubAck(s) => suback(out, 0xB0, s, v, v.is_v5()),
        Packet::PingReq => header(out, 0xC0, 0),
        Packet::PingResp => header(out, 0xD0, 0),
        Packet::Disconnect(d) => reason_only(out, 0xE0, d, v),
        Packet::Auth(d) => reason_only(out, 0xF0, d, v),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varint_lengths_match_encoding() {
        for v in [0, 127, 128, 16_383, 16_384, 2_097_151, 2_097_152, 268_435_455] {
            let mut b = BytesMut::new();
            put_varint(&mut b, v);
            assert_eq!(b.len(), varint_len(v), "{v}");
        }
    }
}
