//! Decoding packets from received bytes.

use bytes::{Buf, Bytes, BytesMut};

use crate::props::{Properties, Scope};
use crate::{
    Ack, ConnAck, Connect, Disconnect, Packet, Publish, QoS, SubAck, SubOptions, Subscribe, Unsubscribe, Version, Will,
    reason, topic,
};

/// Why bytes could not be decoded. Each maps to the MQTT 5 reason code the
/// connection is closed with ([`DecodeError::reason_code`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The bytes do not follow the packet grammar (0x81).
    #[error("malformed packet: {0}")]
    Malformed(&'static str),
    /// The packet is well-formed but breaks a protocol rule (0x82).
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    /// The packet is larger than the limit (0x95).
    #[error("packet of {size} bytes exceeds the maximum of {max}")]
    TooLarge {
        /// Declared size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// CONNECT asks for a protocol this broker does not speak (0x84).
    #[error("unsupported protocol {name:?} level {level}")]
    UnsupportedVersion {
        /// Protocol name.
        name: String,
        /// Protocol level.
        level: u8,
    },
}

impl DecodeError {
    /// The MQTT 5 reason code for closing the connection.
    pub fn reason_code(&self) -> u8 {
        match self {
            DecodeError::Malformed(_) => reason::MALFORMED,
            DecodeError::Protocol(_) => reason::PROTOCOL_ERROR,
            DecodeError::TooLarge { .. } => reason::PACKET_TOO_LARGE,
            DecodeError::UnsupportedVersion { .. } => reason::UNSUPPORTED_PROTOCOL_VERSION,
        }
    }

    /// A short label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            DecodeError::Malformed(_) => "malformed",
            DecodeError::Protocol(_) => "protocol-error",
            DecodeError::TooLarge { .. } => "too-large",
            DecodeError::UnsupportedVersion { .. } => "unsupported-version",
        }
    }
}

/// A cursor over one packet's bytes.
pub(crate) struct Reader {
    buf: Bytes,
}

const SHORT: DecodeError = DecodeError::Malformed("packet shorter than its contents");

impl Reader {
    pub(crate) fn remaining(&self) -> usize {
        self.buf.len()
    }

    pub(crate) fn u8(&mut self) -> Result<u8, DecodeError> {
        if self.buf.is_empty() {
            return Err(SHORT);
        }
        Ok(self.buf.get_u8())
    }

    pub(crate) fn u16(&mut self) -> Result<u16, DecodeError> {
        if self.buf.len() < 2 {
            return Err(SHORT);
        }
        Ok(self.buf.get_u16())
    }

    pub(crate) fn u32(&mut self) -> Result<u32, DecodeError> {
        if self.buf.len() < 4 {
            return Err(SHORT);
        }
        Ok(self.buf.get_u32())
    }

    pub(crate) fn varint(&mut self) -> Result<u32, DecodeError> {
        let mut value: u32 = 0;
        for i in 0..4 {
            let b = self.u8()?;
            value |= u32::from(b & 0x7F) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(DecodeError::Malformed("variable byte integer longer than 4 bytes"))
    }

    pub(crate) fn take(&mut self, n: usize) -> Result<Bytes, DecodeError> {
        if self.buf.len() < n {
            return Err(SHORT);
        }
        Ok(self.buf.split_to(n))
    }

    pub(crate) fn sub(&mut self, n: usize) -> Result<Reader, DecodeError> {
        Ok(Reader { buf: self.take(n)? })
    }

    pub(crate) fn binary(&mut self) -> Result<Bytes, DecodeError> {
        let n = self.u16()? as usize;
        self.take(n)
    }

    pub(crate) fn string(&mut self) -> Result<String, DecodeError> {
        let raw = self.binary()?;
        let s = std::str::from_utf8(&raw).map_err(|_| DecodeError::Malformed("string is not valid UTF-8"))?;
        if s.contains('\0') {
            return Err(DecodeError::Malformed("string contains U+0000"));
        }
        Ok(s.to_string())
    }

    fn rest(&mut self) -> Bytes {
        std::mem::take(&mut self.buf)
    }
}

/// Reads the fixed header: `(first byte, remaining length, header length)`,
/// or `None` if more bytes are needed.
fn fixed_header(buf: &[u8]) -> Result<Option<(u8, usize, usize)>, DecodeError> {
    if buf.is_empty() {
        return Ok(None);
    }
    let mut len: usize = 0;
    for i in 0..4 {
        let Some(&b) = buf.get(1 + i) else {
            return Ok(None);
        };
        len |= usize::from(b & 0x7F) << (7 * i);
        if b & 0x80 == 0 {
            return Ok(Some((buf[0], len, 2 + i)));
        }
    }
    Err(DecodeError::Malformed("remaining length longer than 4 bytes"))
}

/// Decodes one packet from the front of `buf`, removing its bytes.
///
/// `version` is the connection's protocol once CONNECT has been seen; before
/// that (`None`) only CONNECT is accepted and its own version is used.
/// `max_size` bounds the whole packet; a larger one is refused as soon as
/// its header arrives, before the body is buffered.
///
/// Returns `Ok(None)` when `buf` does not yet hold a whole packet.
///
/// # Errors
/// [`DecodeError`]; the connection should be closed with its reason code.
pub fn decode(buf: &mut BytesMut, version: Option<Version>, max_size: usize) -> Result<Option<Packet>, DecodeError> {
    if version.is_none() && buf.first().is_some_and(|b| b >> 4 != 1) {
        // Refuse a stream that does not start with CONNECT at its first byte.
        return Err(DecodeError::Protocol("first packet is not CONNECT"));
    }
    let Some((first, len, header)) = fixed_header(buf)? else {
        return Ok(None);
    };
    let size = header + len;
    if size > max_size {
        return Err(DecodeError::TooLarge { size, max: max_size });
    }
    if buf.len() < size {
        buf.reserve(size - buf.len());
        return Ok(None);
    }
    let mut frame = buf.split_to(size).freeze();
    frame.advance(header);
    let mut r = Reader { buf: frame };
    let kind = first >> 4;
    let flags = first & 0x0F;
    let version = match (version, kind) {
        (None, 1) => None,
        (None, _) => return Err(DecodeError::Protocol("first packet is not CONNECT")),
        (Some(_), 1) => return Err(DecodeError::Protocol("second CONNECT")),
        (Some(v), _) => Some(v),
    };
    let packet = match version {
        None => decode_connect(&mut r, flags)?,
        Some(v) => decode_packet(&mut r, kind, flags, v)?,
    };
    if r.remaining() != 0 {
        return Err(DecodeError::Malformed("bytes left over after the packet"));
    }
    Ok(Some(packet))
}

/// Peeks at a CONNECT at the front of `buf` and returns its protocol
/// version, so a broker can answer an oversize or broken CONNECT in the
/// client's own protocol. `None` if the bytes do not reach that far.
pub fn decode_connect_prefix(buf: &[u8]) -> Option<Version> {
    let (_, _, header) = fixed_header(buf).ok()??;
    let rest = buf.get(header..)?;
    let name_len = u16::from_be_bytes([*rest.first()?, *rest.get(1)?]) as usize;
    match *rest.get(2 + name_len)? {
        3 => Some(Version::V31),
        4 => Some(Version::V311),
        5 => Some(Version::V5),
        _ => None,
    }
}

fn expect_flags(flags: u8, want: u8) -> Result<(), DecodeError> {
    if flags != want {
        return Err(DecodeError::Malformed("reserved fixed header flags are wrong"));
    }
    Ok(())
}

fn decode_connect(r: &mut Reader, flags: u8) -> Result<Packet, DecodeError> {
    expect_flags(flags, 0)?;
    let name = r.string()?;
    let level = r.u8()?;
    let version = match (name.as_str(), level) {
        ("MQTT", 4) => Version::V311,
        ("MQTT", 5) => Version::V5,
        ("MQIsdp", 3) => Version::V31,
        _ => return Err(DecodeError::UnsupportedVersion { name, level }),
    };
    let cflags = r.u8()?;
    if cflags & 0x01 != 0 {
        return Err(DecodeError::Malformed("CONNECT reserved flag is set"));
    }
    let clean_start = cflags & 0x02 != 0;
    let will_flag = cflags & 0x04 != 0;
    let will_qos = QoS::from_u8((cflags >> 3) & 0x03).ok_or(DecodeError::Malformed("will QoS 3"))?;
    let will_retain = cflags & 0x20 != 0;
    let has_password = cflags & 0x40 != 0;
    let has_username = cflags & 0x80 != 0;
    if !will_flag && (will_qos != QoS::AtMostOnce || will_retain) {
        return Err(DecodeError::Malformed("will QoS or retain set without a will"));
    }
    if !version.is_v5() && has_password && !has_username {
        return Err(DecodeError::Malformed("password without a user name"));
    }
    let keep_alive = r.u16()?;
    let properties = if version.is_v5() {
        Properties::decode(r, Scope::Connect)?
    } else {
        Properties::default()
    };
    let client_id = r.string()?;
    let will = if will_flag {
        let properties = if version.is_v5() {
            Properties::decode(r, Scope::Will)?
        } else {
            Properties::default()
        };
        let topic_name = r.string()?;
        if !topic::valid_name(&topic_name) {
            return Err(DecodeError::Malformed("will topic is not a valid topic name"));
        }
        let payload = r.binary()?;
        Some(Will {
            topic: topic_name,
            payload,
            qos: will_qos,
            retain: will_retain,
            properties,
        })
    } else {
        None
    };
    let username = if has_username { Some(r.string()?) } else { None };
    let password = if has_password { Some(r.binary()?) } else { None };
    Ok(Packet::Connect(Box::new(Connect {
        version,
        client_id,
        clean_start,
        keep_alive,
        username,
        password,
        will,
        properties,
    })))
}

fn decode_ack(r: &mut Reader, v: Version) -> Result<Ack, DecodeError> {
    let pkid = r.u16()?;
    if pkid == 0 {
        return Err(DecodeError::Protocol("packet identifier 0"));
    }
    let mut ack = Ack::new(pkid);
    if v.is_v5() && r.remaining() > 0 {
        ack.code = r.u8()?;
        if r.remaining() > 0 {
            ack.properties = Properties::decode(r, Scope::Ack)?;
        }
    }
    Ok(ack)
}

fn decode_packet(r: &mut Reader, kind: u8, flags: u8, v: Version) -> Result<Packet, DecodeError> {
    let props = |r: &mut Reader, scope| {
        if v.is_v5() {
            Properties::decode(r, scope)
        } else {
            Ok(Properties::default())
        }
    };
    Ok(match kind {
        2 => {
            expect_flags(flags, 0)?;
            let ack_flags = r.u8()?;
            if ack_flags & 0xFE != 0 {
                return Err(DecodeError::Malformed("CONNACK reserved flags are set"));
            }
            let mut code = r.u8()?;
            if !v.is_v5() {
                // 3.1.1 return codes, as the MQTT 5 reason codes they mean.
                code = match code {
                    0 => reason::SUCCESS,
                    1 => reason::UNSUPPORTED_PROTOCOL_VERSION,
                    2 => reason::CLIENT_ID_NOT_VALID,
                    3 => reason::SERVER_UNAVAILABLE,
                    4 => reason::BAD_USERNAME_OR_PASSWORD,
                    5 => reason::NOT_AUTHORIZED,
                    _ => return Err(DecodeError::Malformed("CONNACK return code above 5")),
                };
            }
            Packet::ConnAck(ConnAck {
                session_present: ack_flags & 1 != 0,
                code,
                properties: props(r, Scope::ConnAck)?,
            })
        }
        3 => {
            let qos = QoS::from_u8((flags >> 1) & 0x03).ok_or(DecodeError::Malformed("PUBLISH QoS 3"))?;
            let dup = flags & 0x08 != 0;
            if dup && qos == QoS::AtMostOnce {
                return Err(DecodeError::Malformed("DUP set on a QoS 0 PUBLISH"));
            }
            let topic_name = r.string()?;
            if topic_name.contains(['+', '#']) {
                return Err(DecodeError::Malformed("topic name contains a wildcard"));
            }
            let pkid = if qos == QoS::AtMostOnce {
                0
            } else {
                let id = r.u16()?;
                if id == 0 {
                    return Err(DecodeError::Protocol("packet identifier 0"));
                }
                id
            };
            let properties = props(r, Scope::Publish)?;
            if topic_name.is_empty() && properties.topic_alias.is_none() {
                return Err(DecodeError::Protocol("empty topic name without a topic alias"));
            }
            Packet::Publish(Publish {
                dup,
                qos,
                retain: flags & 0x01 != 0,
                topic: topic_name,
                pkid,
                payload: r.rest(),
                properties,
            })
        }
        4 => {
            expect_flags(flags, 0)?;
            Packet::PubAck(decode_ack(r, v)?)
        }
        5 => {
            expect_flags(flags, 0)?;
            Packet::PubRec(decode_ack(r, v)?)
        }
        6 => {
            expect_flags(flags, 2)?;
            Packet::PubRel(decode_ack(r, v)?)
        }
        7 => {
            expect_flags(flags, 0)?;
            Packet::PubComp(decode_ack(r, v)?)
        }
        8 => {
            expect_flags(flags, 2)?;
            let pkid = r.u16()?;
            if pkid == 0 {
                return Err(DecodeError::Protocol("packet identifier 0"));
            }
            let properties = props(r, Scope::Subscribe)?;
            let mut filters = Vec::new();
            while r.remaining() > 0 {
                let filter = r.string()?;
                let o = r.u8()?;
                let reserved = if v.is_v5() { 0xC0 } else { 0xFC };
                if o & reserved != 0 {
                    return Err(DecodeError::Malformed("subscription options reserved bits are set"));
                }
                let qos = QoS::from_u8(o & 0x03).ok_or(DecodeError::Malformed("subscription QoS 3"))?;
                let retain_handling = (o >> 4) & 0x03;
                if retain_handling == 3 {
                    return Err(DecodeError::Protocol("retain handling 3"));
                }
                filters.push((
                    filter,
                    SubOptions {
                        qos,
                        no_local: o & 0x04 != 0,
                        retain_as_published: o & 0x08 != 0,
                        retain_handling,
                    },
                ));
            }
            if filters.is_empty() {
                return Err(DecodeError::Protocol("SUBSCRIBE without filters"));
            }
            Packet::Subscribe(Subscribe {
                pkid,
                filters,
                properties,
            })
        }
        9 | 11 => {
            expect_flags(flags, 0)?;
            let pkid = r.u16()?;
            let properties = props(r, Scope::SubAck)?;
            let codes = r.rest().to_vec();
            if !v.is_v5() {
                if kind == 11 && !codes.is_empty() {
                    return Err(DecodeError::Malformed(
                        "3.1.1 UNSUBACK carries only a packet identifier",
                    ));
                }
                if kind == 9 && codes.iter().any(|c| !matches!(c, 0 | 1 | 2 | 0x80)) {
                    return Err(DecodeError::Malformed(
                        "3.1.1 SUBACK return code is not 0, 1, 2 or 0x80",
                    ));
                }
            }
            let ack = SubAck {
                pkid,
                codes,
                properties,
            };
            if kind == 9 {
                Packet::SubAck(ack)
            } else {
                Packet::UnsubAck(ack)
            }
        }
        10 => {
            expect_flags(flags, 2)?;
            let pkid = r.u16()?;
            if pkid == 0 {
                return Err(DecodeError::Protocol("packet identifier 0"));
            }
            let properties = props(r, Scope::Unsubscribe)?;
            let mut filters = Vec::new();
            while r.remaining() > 0 {
                filters.push(r.string()?);
            }
            if filters.is_empty() {
                return Err(DecodeError::Protocol("UNSUBSCRIBE without filters"));
            }
            Packet::Unsubscribe(Unsubscribe {
                pkid,
                filters,
                properties,
            })
        }
        12 => {
            expect_flags(flags, 0)?;
            Packet::PingReq
        }
        13 => {
            expect_flags(flags, 0)?;
            Packet::PingResp
        }
        14 | 15 => {
            expect_flags(flags, 0)?;
            if kind == 15 && !v.is_v5() {
                return Err(DecodeError::Malformed("AUTH is an MQTT 5 packet"));
            }
            let mut d = Disconnect::default();
            if v.is_v5() && r.remaining() > 0 {
                d.code = r.u8()?;
                if r.remaining() > 0 {
                    d.properties = Properties::decode(r, if kind == 14 { Scope::Disconnect } else { Scope::Auth })?;
                }
            }
            if kind == 14 {
                Packet::Disconnect(d)
            } else {
                Packet::Auth(d)
            }
        }
        _ => return Err(DecodeError::Malformed("reserved packet type")),
    })
}
