//! How the outbox lays its records out in the store: one key per record
//! (lane byte + big-endian sequence number) in the `outbox` space, and per
//! lane `(next sequence, count, bytes)` under `lane/<n>` in `outbox-meta`.

/// The key of record `seq` in `lane`.
pub(crate) fn key(lane: u8, seq: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(9);
    k.push(lane);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// The lane and sequence number of a record key.
pub(crate) fn parse_key(k: &[u8]) -> Option<(u8, u64)> {
    if k.len() != 9 {
        return None;
    }
    let mut seq = [0u8; 8];
    seq.copy_from_slice(&k[1..]);
    Some((k[0], u64::from_be_bytes(seq)))
}

/// The key of a lane's counters in `outbox-meta`.
pub(crate) fn lane_meta_key(lane: u8) -> Vec<u8> {
    format!("lane/{lane}").into_bytes()
}

/// A lane's counters as stored.
pub(crate) fn encode_lane_meta(next_seq: u64, count: u64, bytes: u64) -> Vec<u8> {
    [next_seq, count, bytes].iter().flat_map(|v| v.to_be_bytes()).collect()
}

/// Reads what [`encode_lane_meta`] wrote.
pub(crate) fn decode_lane_meta(b: &[u8]) -> Option<(u64, u64, u64)> {
    if b.len() != 24 {
        return None;
    }
    let at = |i: usize| {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[i..i + 8]);
        u64::from_be_bytes(a)
    };
    Some((at(0), at(8), at(16)))
}
