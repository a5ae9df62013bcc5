//! MQTT 5 properties (§2.2.2).

use bytes::{BufMut, Bytes, BytesMut};

use crate::decode::{DecodeError, Reader};
use crate::encode::{put_binary, put_string, put_varint, varint_len};

/// MQTT 5 properties. Every field is optional; a 3.1.1 packet has none.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Properties {
    /// 0x01 payload format indicator.
    pub payload_format_indicator: Option<u8>,
    /// 0x02 message expiry interval, seconds.
    pub message_expiry_interval: Option<u32>,
    /// 0x03 content type.
    pub content_type: Option<String>,
    /// 0x08 response topic.
    pub response_topic: Option<String>,
    /// 0x09 correlation data.
    pub correlation_data: Option<Bytes>,
    /// 0x0B subscription identifiers (one on SUBSCRIBE, any number on PUBLISH).
    pub subscription_identifiers: Vec<u32>,
    /// 0x11 session expiry interval, seconds.
    pub session_expiry_interval: Option<u32>,
    /// 0x12 assigned client identifier.
    pub assigned_client_identifier: Option<String>,
    /// 0x13 server keep alive, seconds.
    pub server_keep_alive: Option<u16>,
    /// 0x15 authentication method.
    pub authentication_method: Option<String>,
    /// 0x16 authentication data.
    pub authentication_data: Option<Bytes>,
    /// 0x17 request problem information.
    pub request_problem_information: Option<u8>,
    /// 0x18 will delay interval, seconds.
    pub will_delay_interval: Option<u32>,
    /// 0x19 request response information.
    pub request_response_information: Option<u8>,
    /// 0x1A response information.
    pub response_information: Option<String>,
    /// 0x1C server reference.
    pub server_reference: Option<String>,
    /// 0x1F reason string.
    pub reason_string: Option<String>,
    /// 0x21 receive maximum.
    pub receive_maximum: Option<u16>,
    /// 0x22 topic alias maximum.
    pub topic_alias_maximum: Option<u16>,
    /// 0x23 topic alias.
    pub topic_alias: Option<u16>,
    /// 0x24 maximum QoS.
    pub maximum_qos: Option<u8>,
    /// 0x25 retain available.
    pub retain_available: Option<u8>,
    /// 0x26 user properties, in order.
    pub user_properties: Vec<(String, String)>,
    /// 0x27 maximum packet size.
    pub maximum_packet_size: Option<u32>,
    /// 0x28 wildcard subscription available.
    pub wildcard_subscription_available: Option<u8>,
    /// 0x29 subscription identifiers available.
    pub subscription_identifiers_available: Option<u8>,
    /// 0x2A shared subscription available.
    pub shared_subscription_available: Option<u8>,
}

/// Which packet the properties belong to; decides which are allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Scope {
    Connect,
    ConnAck,
    Publish,
    Will,
    Ack,
    Subscribe,
    SubAck,
    Unsubscribe,
    Disconnect,
    Auth,
}

fn allowed(id: u8, scope: Scope) -> bool {
    use Scope::*;
    match id {
        0x01 | 0x02 | 0x03 | 0x08 | 0x09 => matches!(scope, Publish | Will),
        0x0B => matches!(scope, Publish | Subscribe),
        0x11 => matches!(scope, Connect | ConnAck | Disconnect),
        0x12 | 0x13 | 0x24 | 0x25 | 0x28 | 0x29 | 0x2A | 0x1A => scope == ConnAck,
        0x15 | 0x16 => matches!(scope, Connect | ConnAck | Auth),
        0x17 | 0x19 => scope == Connect,
        0x18 => scope == Will,
        0x1C => matches!(scope, ConnAck | Disconnect),
        0x1F => matches!(scope, ConnAck | Ack | SubAck | Disconnect | Auth),
        0x21 | 0x22 | 0x27 => matches!(scope, Connect | ConnAck),
        0x23 => scope == Publish,
        0x26 => true,
        _ => false,
    }
}

fn set<T>(slot: &mut Option<T>, value: T) -> Result<(), DecodeError> {
    if slot.is_some() {
        return Err(DecodeError::Protocol("property appears twice"));
    }
    *slot = Some(value);
    Ok(())
}

fn flag(r: &mut Reader) -> Result<u8, DecodeError> {
    let v = r.u8()?;
    if v > 1 {
        return Err(DecodeError::Protocol("boolean property is not 0 or 1"));
    }
    Ok(v)
}

impl Properties {
    /// Whether no property is set.
    pub fn is_empty(&self) -> bool {
        *self == Properties::default()
    }

    pub(crate) fn decode(r: &mut Reader, scope: Scope) -> Result<Properties, DecodeError> {
        let len = r.varint()? as usize;
        let mut r = r.sub(len)?;
        let mut p = Properties::default();
        while r.remaining() > 0 {
            let id = r.varint()?;
            let id = u8::try_from(id).map_err(|_| DecodeError::Malformed("unknown property identifier"))?;
            if !allowed(id, scope) {
                return Err(DecodeError::Malformed("property not allowed in this packet"));
            }
            match id {
                0x01 => set(&mut p.payload_format_indicator, flag(&mut r)?)?,
                0x02 => set(&mut p.message_expiry_interval, r.u32()?)?,
                0x03 => set(&mut p.content_type, r.string()?)?,
                0x08 => set(&mut p.response_topic, r.string()?)?,
                0x09 => set(&mut p.correlation_data, r.binary()?)?,
                0x0B => {
                    let v = r.varint()?;
                    if v == 0 {
                        return Err(DecodeError::Protocol("subscription identifier 0"));
                    }
                    if scope == Scope::Subscribe && !p.subscription_identifiers.is_empty() {
                        return Err(DecodeError::Protocol("property appears twice"));
                    }
                    p.subscription_identifiers.push(v);
                }
                0x11 => set(&mut p.session_expiry_interval, r.u32()?)?,
                0x12 => set(&mut p.assigned_client_identifier, r.string()?)?,
                0x13 => set(&mut p.server_keep_alive, r.u16()?)?,
                0x15 => set(&mut p.authentication_method, r.string()?)?,
                0x16 => set(&mut p.authentication_data, r.binary()?)?,
                0x17 => set(&mut p.request_problem_information, flag(&mut r)?)?,
                0x18 => set(&mut p.will_delay_interval, r.u32()?)?,
                0x19 => set(&mut p.request_response_information, flag(&mut r)?)?,
                0x1A => set(&mut p.response_information, r.string()?)?,
                0x1C => set(&mut p.server_reference, r.string()?)?,
                0x1F => set(&mut p.reason_string, r.string()?)?,
                0x21 => {
                    let v = r.u16()?;
                    if v == 0 {
                        return Err(DecodeError::Protocol("receive maximum 0"));
                    }
                    set(&mut p.receive_maximum, v)?
                }
                0x22 => set(&mut p.topic_alias_maximum, r.u16()?)?,
                0x23 => set(&mut p.topic_alias, r.u16()?)?,
                0x24 => set(&mut p.maximum_qos, flag(&mut r)?)?,
                0x25 => set(&mut p.retain_available, flag(&mut r)?)?,
                0x26 => {
                    let k = r.string()?;
                    let v = r.string()?;
                    p.user_properties.push((k, v));
                }
                0x27 => {
                    let v = r.u32()?;
                    if v == 0 {
                        return Err(DecodeError::Protocol("maximum packet size 0"));
                    }
                    set(&mut p.maximum_packet_size, v)?
                }
                0x28 => set(&mut p.wildcard_subscription_available, flag(&mut r)?)?,
                0x29 => set(&mut p.subscription_identifiers_available, flag(&mut r)?)?,
                0x2A => set(&mut p.shared_subscription_available, flag(&mut r)?)?,
                _ => return Err(DecodeError::Malformed("unknown property identifier")),
            }
        }
        Ok(p)
    }

    /// The encoded length of the properties, without their length prefix.
    pub(crate) fn body_len(&self) -> usize {
        let s = |v: &Option<String>| v.as_ref().map_or(0, |s| 3 + s.len());
        let b = |v: &Option<Bytes>| v.as_ref().map_or(0, |s| 3 + s.len());
        let n = |v: Option<usize>, w: usize| v.map_or(0, |_| 1 + w);
        n(self.payload_format_indicator.map(|_| 0), 1)
            + n(self.message_expiry_interval.map(|_| 0), 4)
            + s(&self.content_type)
            + s(&self.response_topic)
            + b(&self.correlation_data)
            + self
                .subscription_identifiers
                .iter()
                .map(|&v| 1 + varint_len(v as usize))
                .sum::<usize>()
            + n(self.session_expiry_interval.map(|_| 0), 4)
            + s(&self.assigned_client_identifier)
            + n(self.server_keep_alive.map(|_| 0), 2)
            + s(&self.authentication_method)
            + b(&self.authentication_data)
            + n(self.request_problem_information.map(|_| 0), 1)
            + n(self.will_delay_interval.map(|_| 0), 4)
            + n(self.request_response_information.map(|_| 0), 1)
            + s(&self.response_information)
            + s(&self.server_reference)
            + s(&self.reason_string)
            + n(self.receive_maximum.map(|_| 0), 2)
            + n(self.topic_alias_maximum.map(|_| 0), 2)
            + n(self.topic_alias.map(|_| 0), 2)
            + n(self.maximum_qos.map(|_| 0), 1)
            + n(self.retain_available.map(|_| 0), 1)
            + self
                .user_properties
                .iter()
                .map(|(k, v)| 5 + k.len() + v.len())
                .sum::<usize>()
            + n(self.maximum_packet_size.map(|_| 0), 4)
            + n(self.wildcard_subscription_available.map(|_| 0), 1)
            + n(self.subscription_identifiers_available.map(|_| 0), 1)
            + n(self.shared_subscription_available.map(|_| 0), 1)
    }

    /// The encoded length including the length prefix.
    pub(crate) fn wire_len(&self) -> usize {
        let body = self.body_len();
        varint_len(body) + body
    }

    pub(crate) fn encode(&self, out: &mut BytesMut) {
        put_varint(out, self.body_len());
        let u8p = |out: &mut BytesMut, id: u8, v: Option<u8>| {
            if let Some(v) = v {
                out.put_u8(id);
                out.put_u8(v);
            }
        };
        let u16p = |out: &mut BytesMut, id: u8, v: Option<u16>| {
            if let Some(v) = v {
                out.put_u8(id);
                out.put_u16(v);
            }
        };
        let u32p = |out: &mut BytesMut, id: u8, v: Option<u32>| {
            if let Some(v) = v {
                out.put_u8(id);
                out.put_u32(v);
            }
        };
        let sp = |out: &mut BytesMut, id: u8, v: &Option<String>| {
            if let Some(v) = v {
                out.put_u8(id);
                put_string(out, v);
            }
        };
        let bp = |out: &mut BytesMut, id: u8, v: &Option<Bytes>| {
            if let Some(v) = v {
                out.put_u8(id);
                put_binary(out, v);
            }
        };
        u8p(out, 0x01, self.payload_format_indicator);
        u32p(out, 0x02, self.message_expiry_interval);
        sp(out, 0x03, &self.content_type);
        sp(out, 0x08, &self.response_topic);
        bp(out, 0x09, &self.correlation_data);
        for &v in &self.subscription_identifiers {
            out.put_u8(0x0B);
            put_varint(out, v as usize);
        }
        u32p(out, 0x11, self.session_expiry_interval);
        sp(out, 0x12, &self.assigned_client_identifier);
        u16p(out, 0x13, self.server_keep_alive);
        sp(out, 0x15, &self.authentication_method);
        bp(out, 0x16, &self.authentication_data);
        u8p(out, 0x17, self.request_problem_information);
        u32p(out, 0x18, self.will_delay_interval);
        u8p(out, 0x19, self.request_response_information);
        sp(out, 0x1A, &self.response_information);
        sp(out, 0x1C, &self.server_reference);
        sp(out, 0x1F, &self.reason_string);
        u16p(out, 0x21, self.receive_maximum);
        u16p(out, 0x22, self.topic_alias_maximum);
        u16p(out, 0x23, self.topic_alias);
        u8p(out, 0x24, self.maximum_qos);
        u8p(out, 0x25, self.retain_available);
        for (k, v) in &self.user_properties {
            out.put_u8(0x26);
            put_string(out, k);
            put_string(out, v);
        }
        u32p(out, 0x27, self.maximum_packet_size);
        u8p(out, 0x28, self.wildcard_subscription_available);
        u8p(out, 0x29, self.subscription_identifiers_available);
        u8p(out, 0x2A, self.shared_subscription_available);
    }
}
