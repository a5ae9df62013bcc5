//! Scope sync's data: what a child gateway is sent ([`Scope`]), the
//! incremental change between two scopes ([`Delta`]), and the log a
//! replica keeps of what it received ([`SyncState`]).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::certs::CaEntry;
use crate::entry::Entry;

/// What a child gateway is sent: its scope.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Scope {
    /// Identities by id.
    pub entries: BTreeMap<String, Entry>,
    /// Registered CAs by name.
    pub cas: BTreeMap<String, CaEntry>,
}

/// An incremental scope change.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delta {
    /// Added or changed identities.
    pub upserts: Vec<Entry>,
    /// Ids that left the scope.
    pub removed: Vec<String>,
    /// The CAs, when they changed.
    pub cas: Option<BTreeMap<String, CaEntry>>,
}

impl Scope {
    /// What turns `sent` into `self`, or `None` when nothing changed.
    pub fn delta_from(&self, sent: &Scope) -> Option<Delta> {
        let upserts: Vec<Entry> = self
            .entries
            .values()
            .filter(|e| sent.entries.get(&e.id) != Some(e))
            .cloned()
            .collect();
        let removed: Vec<String> = sent
            .entries
            .keys()
            .filter(|id| !self.entries.contains_key(*id))
            .cloned()
            .collect();
        let cas = (self.cas != sent.cas).then(|| self.cas.clone());
        if upserts.is_empty() && removed.is_empty() && cas.is_none() {
            None
        } else {
            Some(Delta { upserts, removed, cas })
        }
    }
}

/// What a replica last received from its parent.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncState {
    /// The parent it came from.
    pub parent: Option<String>,
    /// When the last full sync completed, ms since the Unix epoch.
    pub full_sync_ms: Option<u64>,
    /// When the last change (full or incremental) was applied.
    pub last_change_ms: Option<u64>,
    /// Full syncs applied.
    pub full_syncs: u64,
    /// Incremental changes applied.
    pub deltas: u64,
}

impl SyncState {
    /// The log after a full sync (`full`) or a delta from `parent` at `now_ms`.
    pub(crate) fn after(&self, parent: &str, full: bool, now_ms: u64) -> SyncState {
        let mut sync = self.clone();
        sync.parent = Some(parent.to_string());
        sync.last_change_ms = Some(now_ms);
        if full {
            sync.full_sync_ms = Some(now_ms);
            sync.full_syncs += 1;
        } else {
            sync.deltas += 1;
        }
        sync
    }
}
