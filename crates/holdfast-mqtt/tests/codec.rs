//! Round trips and malformed-input cases for the codec.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test or benchmark: a panic is its failure

use bytes::{Bytes, BytesMut};
use holdfast_mqtt::*;
use proptest::prelude::*;

fn round_trip(p: &Packet, v: Version) -> Packet {
    let mut b = BytesMut::new();
    encode(p, v, &mut b);
    let n = b.len();
    // Feeding the bytes one at a time yields nothing until the last.
    let mut partial = BytesMut::new();
    for (i, byte) in b.iter().enumerate() {
        partial.extend_from_slice(&[*byte]);
        let got = decode(&mut partial, connected(p, v), 1 << 20).unwrap();
        if i + 1 < n {
            assert!(got.is_none(), "decoded early at byte {i}");
        } else {
            return got.unwrap();
        }
    }
    unreachable!()
}

fn connected(p: &Packet, v: Version) -> Option<Version> {
    if matches!(p, Packet::Connect(_)) { None } else { Some(v) }
}

fn string() -> impl Strategy<Value = String> {
    "[a-z0-9/ ]{0,12}"
}

fn props_v5() -> impl Strategy<Value = Properties> {
    (
        proptest::option::of(any::<u32>()),
        proptest::option::of(string()),
        proptest::collection::vec((string(), string()), 0..3),
        proptest::option::of(1u16..),
    )
        .prop_map(|(exp, ct, up, alias)| Properties {
            message_expiry_interval: exp,
            content_type: ct,
            user_properties: up,
            topic_alias: alias,
            ..Properties::default()
        })
}

proptest! {
    #[test]
    fn publish_round_trips(topic in "[a-z/]{1,20}", payload in proptest::collection::vec(any::<u8>(), 0..300),
                           qos in 0u8..3, retain: bool, pkid in 1u16.., props in props_v5()) {
        let qos = QoS::from_u8(qos).unwrap();
        let mut p = Publish::new(topic, payload, qos, pkid);
        p.retain = retain;
        p.dup = qos != QoS::AtMostOnce && pkid % 2 == 0;
        let v3 = Packet::Publish(p.clone());
        prop_assert_eq!(round_trip(&v3, Version::V311), v3);
        p.properties = props;
        let v5 = Packet::Publish(p);
        prop_assert_eq!(round_trip(&v5, Version::V5), v5);
    }

    #[test]
    fn connect_round_trips(client_id in "[a-zA-Z0-9]{0,23}", clean: bool, keep_alive: u16,
                           user in proptest::option::of(string()), will_qos in 0u8..3, v5: bool, expiry in proptest::option::of(any::<u32>())) {
        let version = if v5 { Version::V5 } else { Version::V311 };
        let c = Connect {
            version,
            client_id,
            clean_start: clean,
            keep_alive,
            password: user.as_ref().map(|u| Bytes::from(u.clone().into_bytes())),
            username: user,
            will: Some(Will { topic: "will/t".into(), payload: Bytes::from_static(b"bye"), qos: QoS::from_u8(will_qos).unwrap(), retain: true,
                properties: if v5 { Properties { will_delay_interval: Some(5), ..Properties::default() } } else { Properties::default() } }),
            properties: if v5 { Properties { session_expiry_interval: expiry, receive_maximum: Some(10), ..Properties::default() } } else { Properties::default() },
        };
        let p = Packet::Connect(Box::new(c));
        prop_assert_eq!(round_trip(&p, version), p);
    }

    #[test]
    fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200), v in 0u8..3) {
        let version = [None, Some(Version::V311), Some(Version::V5)][v as usize];
        let mut b = BytesMut::from(&bytes[..]);
        while let Ok(Some(_)) = decode(&mut b, version.or(Some(Version::V5)).filter(|_| version.is_some()), 1 << 16) {}
    }
}

#[test]
fn every_packet_round_trips_in_both_versions() {
    let ack = Ack {
        pkid: 9,
        code: 0x10,
        properties: Properties {
            reason_string: Some("none".into()),
            ..Properties::default()
        },
    };
    let packets = [
        Packet::ConnAck(ConnAck {
            session_present: true,
            code: 0,
            properties: Properties {
                assigned_client_identifier: Some("x".into()),
                receive_maximum: Some(5),
                ..Properties::default()
            },
        }),
        Packet::PubAck(ack.clone()),
        Packet::PubRec(ack.clone()),
        Packet::PubRel(ack.clone()),
        Packet::PubComp(ack),
        Packet::Subscribe(Subscribe {
            pkid: 3,
            filters: vec![(
                "a/+".into(),
                SubOptions {
                    qos: QoS::ExactlyOnce,
                    no_local: true,
                    retain_as_published: true,
                    retain_handling: 2,
                },
            )],
            properties: Properties {
                subscription_identifiers: vec![77],
                ..Properties::default()
            },
        }),
        Packet::SubAck(SubAck {
            pkid: 3,
            codes: vec![0, 1, 2, 0x87],
            properties: Properties::default(),
        }),
        Packet::Unsubscribe(Unsubscribe {
            pkid: 4,
            filters: vec!["a/b".into(), "c".into()],
            properties: Properties::default(),
        }),
        Packet::UnsubAck(SubAck {
            pkid: 4,
            codes: vec![0, 0x11],
            properties: Properties::default(),
        }),
        Packet::PingReq,
        Packet::PingResp,
        Packet::Disconnect(Disconnect {
            code: 0x04,
            properties: Properties {
                session_expiry_interval: Some(0),
                ..Properties::default()
            },
        }),
        Packet::Auth(Disconnect {
            code: 0x18,
            properties: Properties {
                authentication_method: Some("m".into()),
                ..Properties::default()
            },
        }),
    ];
    for p in &packets {
        assert_eq!(&round_trip(p, Version::V5), p);
    }
    // 3.1.1 forms drop properties and reason codes.
    let mut b = BytesMut::new();
    encode(
        &Packet::PubAck(Ack {
            pkid: 9,
            code: 0x10,
            properties: Properties::default(),
        }),
        Version::V311,
        &mut b,
    );
    assert_eq!(&b[..], &[0x40, 2, 0, 9]);
    let mut b = BytesMut::new();
    encode(
        &Packet::ConnAck(ConnAck {
            session_present: false,
            code: reason::NOT_AUTHORIZED,
            properties: Properties::default(),
        }),
        Version::V311,
        &mut b,
    );
    assert_eq!(&b[..], &[0x20, 2, 0, 5]);
    let mut b = BytesMut::new();
    encode(
        &Packet::UnsubAck(SubAck {
            pkid: 4,
            codes: vec![0],
            properties: Properties::default(),
        }),
        Version::V311,
        &mut b,
    );
    assert_eq!(&b[..], &[0xB0, 2, 0, 4]);
}

fn err(bytes: &[u8], v: Option<Version>) -> DecodeError {
    decode(&mut BytesMut::from(bytes), v, 1 << 20).unwrap_err()
}

#[test]
fn malformed_input_gets_the_right_reason_code() {
    let v5 = Some(Version::V5);
    // Not CONNECT first.
    assert_eq!(err(&[0xC0, 0], None).reason_code(), reason::PROTOCOL_ERROR);
    // Unknown protocol.
    assert_eq!(
        err(&[0x10, 7, 0, 4, b'M', b'Q', b'T', b'X', 4, 2, 0], None).reason_code(),
        reason::UNSUPPORTED_PROTOCOL_VERSION
    );
    assert_eq!(
        err(&[0x10, 10, 0, 4, b'M', b'Q', b'T', b'T', 9, 2, 0, 0, 0, 0], None).reason_code(),
        reason::UNSUPPORTED_PROTOCOL_VERSION
    );
    // Reserved CONNECT flag.
    assert_eq!(
        err(&[0x10, 12, 0, 4, b'M', b'Q', b'T', b'T', 4, 3, 0, 0, 0, 0], None).reason_code(),
        reason::MALFORMED
    );
    // Remaining length of five bytes.
    assert_eq!(
        err(&[0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01], v5).reason_code(),
        reason::MALFORMED
    );
    // PUBLISH QoS 3.
    assert_eq!(err(&[0x36, 3, 0, 1, b'a'], v5).reason_code(), reason::MALFORMED);
    // Wildcard in a topic name.
    assert_eq!(err(&[0x30, 4, 0, 1, b'#', 0], v5).reason_code(), reason::MALFORMED);
    // Invalid UTF-8 topic.
    assert_eq!(err(&[0x30, 4, 0, 1, 0xFF, 0], v5).reason_code(), reason::MALFORMED);
    // PUBREL with wrong flags.
    assert_eq!(err(&[0x60, 2, 0, 1], v5).reason_code(), reason::MALFORMED);
    // Packet id 0 on QoS 1.
    assert_eq!(
        err(&[0x32, 6, 0, 1, b'a', 0, 0, 0], v5).reason_code(),
        reason::PROTOCOL_ERROR
    );
    // Property not allowed in PUBLISH (session expiry).
    assert_eq!(
        err(&[0x30, 9, 0, 1, b'a', 5, 0x11, 0, 0, 0, 1], v5).reason_code(),
        reason::MALFORMED
    );
    // Duplicate property.
    assert_eq!(
        err(&[0x30, 8, 0, 1, b'a', 4, 0x01, 0, 0x01, 0], v5).reason_code(),
        reason::PROTOCOL_ERROR
    );
    // Property length beyond the packet.
    assert_eq!(err(&[0x30, 4, 0, 1, b'a', 9], v5).reason_code(), reason::MALFORMED);
    // Empty SUBSCRIBE.
    assert_eq!(err(&[0x82, 3, 0, 1, 0], v5).reason_code(), reason::PROTOCOL_ERROR);
    // Reserved packet type 0.
    assert_eq!(err(&[0x00, 0], v5).reason_code(), reason::MALFORMED);
    // A second CONNECT.
    assert_eq!(err(&[0x10, 0], v5).reason_code(), reason::PROTOCOL_ERROR);
    // Too large, refused from the header alone.
    let e = decode(&mut BytesMut::from(&[0x30, 0xFF, 0xFF, 0x03][..]), v5, 1024).unwrap_err();
    assert_eq!(e.reason_code(), reason::PACKET_TOO_LARGE);
}

#[test]
fn v311_acks_decode_to_what_they_encode_from() {
    let v3 = Some(Version::V311);
    // Found by the fuzzer: 3.1.1 CONNACK codes map to MQTT 5 reason codes.
    let Some(Packet::ConnAck(a)) = decode(&mut BytesMut::from(&[0x20, 2, 0, 5][..]), v3, 64).unwrap() else {
        panic!()
    };
    assert_eq!(a.code, reason::NOT_AUTHORIZED);
    assert_eq!(err(&[0x20, 2, 0, 6], v3).reason_code(), reason::MALFORMED);
    assert_eq!(err(&[0x90, 3, 0, 1, 5], v3).reason_code(), reason::MALFORMED);
    assert_eq!(err(&[0xB0, 3, 0, 1, 0], v3).reason_code(), reason::MALFORMED);
    for code in [0u8, 1, 2, 0x80] {
        let p = decode(&mut BytesMut::from(&[0x90, 3, 0, 1, code][..]), v3, 64)
            .unwrap()
            .unwrap();
        assert_eq!(round_trip(&p, Version::V311), p);
    }
}

#[test]
fn connect_prefix_names_the_version() {
    let mut b = BytesMut::new();
    let c = Connect {
        version: Version::V5,
        client_id: "c".into(),
        clean_start: true,
        keep_alive: 30,
        username: None,
        password: None,
        will: None,
        properties: Properties::default(),
    };
    encode(&Packet::Connect(Box::new(c)), Version::V5, &mut b);
    assert_eq!(decode_connect_prefix(&b), Some(Version::V5));
    assert_eq!(decode_connect_prefix(&b[..3]), None);
}
