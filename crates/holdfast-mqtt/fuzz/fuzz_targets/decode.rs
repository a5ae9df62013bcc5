//! Feeds arbitrary bytes to `decode` and checks that every packet it
//! accepts survives `encode` → `decode` unchanged.
//!
//! The first input byte picks the connection state: `% 3` = 0 decodes as a
//! fresh connection (`None`: CONNECT first, then the CONNECT's version),
//! 1 as MQTT 3.1.1, 2 as MQTT 5. The rest is decoded packet by packet until
//! more bytes are needed or an error.

#![no_main]

use bytes::BytesMut;
use holdfast_mqtt::{Packet, Version, decode, encode};
use libfuzzer_sys::fuzz_target;

const MAX_SIZE: usize = 1 << 20;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let mut version = match selector % 3 {
        0 => None,
        1 => Some(Version::V311),
        _ => Some(Version::V5),
    };
    let mut buf = BytesMut::from(rest);
    while let Ok(Some(packet)) = decode(&mut buf, version, MAX_SIZE) {
        let v = match (&packet, version) {
            (Packet::Connect(c), None) => c.version,
            (_, Some(v)) => v,
            (p, None) => panic!("decode(None) returned {} instead of CONNECT", p.name()),
        };
        round_trip(&packet, version, v);
        // After CONNECT the connection speaks the CONNECT's version.
        version = Some(v);
    }
});

fn round_trip(packet: &Packet, state: Option<Version>, v: Version) {
    let mut wire = BytesMut::new();
    encode(packet, v, &mut wire);
    let bytes = wire.clone();
    let again = match decode(&mut wire, state, usize::MAX) {
        Ok(Some(p)) => p,
        other => panic!("re-encoded {packet:?} as {v:?} ({bytes:02x?}) does not decode: {other:?}"),
    };
    assert!(wire.is_empty(), "{} bytes left after decoding {bytes:02x?}", wire.len());
    assert_eq!(
        packet, &again,
        "round trip changed the packet (as {v:?}, re-encoded {bytes:02x?})"
    );
}
