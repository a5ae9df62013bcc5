//! What this outbox has stored from each child gateway's lanes, for the
//! link's per-hop idempotence ([`holdfast_model::hop`]): per child and lane,
//! the highest sequence stored of each recent epoch. The writer keeps the
//! table, and writes a child's marks in the same commit as the messages
//! they cover, so a power cut can never keep one without the other.
//!
//! Stored under `from/<lane>/<child>` in `outbox-meta`.

use std::collections::HashMap;
use std::sync::Arc;

use holdfast_model::{HopId, HopMarks};
use holdfast_store::{Space, StoreError};

const PREFIX: &[u8] = b"from/";

/// The marks of one child's lane.
pub(crate) type From = (Arc<str>, u8);

/// A batch of a child's lane to store: each record with its hop id (none
/// from a link that does not carry them: stored as it comes).
#[derive(Debug)]
pub struct FromChild {
    /// The child gateway's node id.
    pub child: Arc<str>,
    /// The lane, in the child's outbox and in this one.
    pub lane: u8,
    /// The encoded records with their hop ids, in the child's order.
    pub records: Vec<(Option<HopId>, Vec<u8>)>,
}

/// What became of a [`FromChild`] batch: all of it is accounted for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stored {
    /// Records stored now.
    pub stored: u64,
    /// Records stored before (sent again after a lost acknowledgement):
    /// not stored again.
    pub duplicates: u64,
}

/// The key of a child lane's marks.
pub(crate) fn key(from: &From) -> Vec<u8> {
    let mut k = PREFIX.to_vec();
    k.extend_from_slice(format!("{}/", from.1).as_bytes());
    k.extend_from_slice(from.0.as_bytes());
    k
}

/// Loads every child lane's marks.
///
/// # Errors
/// Storage errors.
pub(crate) fn load(meta: &Space) -> Result<HashMap<From, HopMarks>, StoreError> {
    let mut out = HashMap::new();
    // Every key from `from/` up to `from0` (the next byte after '/').
    for kv in meta.range(PREFIX.to_vec()..b"from0".to_vec()) {
        let (k, v) = kv?;
        let parsed = std::str::from_utf8(&k[PREFIX.len()..])
            .ok()
            .and_then(|rest| rest.split_once('/'))
            .and_then(|(lane, child)| Some((lane.parse::<u8>().ok()?, child.to_string())));
        match (parsed, HopMarks::decode(&v)) {
            (Some((lane, child)), Some(marks)) => {
                out.insert((Arc::from(child.as_str()), lane), marks);
            }
            _ => tracing::warn!(
                key = %String::from_utf8_lossy(&k),
                "outbox: a damaged record of what a child sent is ignored (its next resend may be stored twice)"
            ),
        }
    }
    Ok(out)
}
