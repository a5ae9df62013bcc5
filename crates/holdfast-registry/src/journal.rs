//! The registry on disk: one fjall space, `registry`, holding identities
//! under `i/<id>`, CAs under `c/<name>` and the sync log under `s`, each as
//! JSON. A [`Change`] is written in one batch with `fsync` before it is
//! applied in memory.

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;

use holdfast_store::{Durability, Space, Store};

use crate::RegistryError;
use crate::certs::CaEntry;
use crate::entry::Entry;
use crate::sync::SyncState;

const IDENTITY_PREFIX: &[u8] = b"i/";
const CA_PREFIX: &[u8] = b"c/";
const SYNC_KEY: &[u8] = b"s";

/// One durable change to the registry.
#[derive(Default)]
pub(crate) struct Change {
    pub(crate) upserts: Vec<Entry>,
    pub(crate) removals: Vec<String>,
    pub(crate) sync: Option<SyncState>,
    /// The complete new set of CAs, when it changes.
    pub(crate) cas: Option<BTreeMap<String, CaEntry>>,
}

impl Change {
    pub(crate) fn entries(upserts: Vec<Entry>, removals: Vec<String>) -> Change {
        Change {
            upserts,
            removals,
            ..Change::default()
        }
    }

    pub(crate) fn cas(cas: BTreeMap<String, CaEntry>) -> Change {
        Change {
            cas: Some(cas),
            ..Change::default()
        }
    }

    /// True when it changes nothing.
    pub(crate) fn is_empty(&self) -> bool {
        self.upserts.is_empty() && self.removals.is_empty() && self.sync.is_none() && self.cas.is_none()
    }
}

/// What was stored, as read at open.
pub(crate) struct Stored {
    pub(crate) entries: HashMap<String, Entry>,
    pub(crate) cas: BTreeMap<String, CaEntry>,
    pub(crate) sync: SyncState,
}

/// The `registry` space.
pub(crate) struct Journal {
    space: Space,
    store: Store,
}

impl Journal {
    /// Opens the space and reads what it holds; undecodable records are
    /// skipped with an error logged.
    pub(crate) fn open(store: &Store) -> Result<(Journal, Stored), RegistryError> {
        let space = store.space("registry")?;
        let mut entries = HashMap::new();
        for kv in space.range(prefix_range(IDENTITY_PREFIX)) {
            let (_, v) = kv?;
            match serde_json::from_slice::<Entry>(&v) {
                Ok(e) => {
                    entries.insert(e.id.clone(), e);
                }
                Err(e) => tracing::error!(error = %e, "registry: skipping an undecodable identity"),
            }
        }
        let mut cas = BTreeMap::new();
        for kv in space.range(prefix_range(CA_PREFIX)) {
            let (_, v) = kv?;
            match serde_json::from_slice::<CaEntry>(&v) {
                Ok(c) => {
                    cas.insert(c.name.clone(), c);
                }
                Err(e) => tracing::error!(error = %e, "registry: skipping an undecodable CA"),
            }
        }
        let sync = match space.get(SYNC_KEY)? {
            Some(v) => serde_json::from_slice(&v).unwrap_or_default(),
            None => SyncState::default(),
        };
        let journal = Journal {
            space,
            store: store.clone(),
        };
        Ok((journal, Stored { entries, cas, sync }))
    }

    /// Writes `change` in one synced batch; `old_cas` are the CAs stored
    /// now (only those that differ from `change.cas` are written).
    pub(crate) fn write(&self, change: &Change, old_cas: &BTreeMap<String, CaEntry>) -> Result<(), RegistryError> {
        let mut batch = self.store.batch();
        for e in &change.upserts {
            batch.insert(&self.space, id_key(&e.id), to_json(e)?);
        }
        for id in &change.removals {
            batch.remove(&self.space, id_key(id));
        }
        if let Some(s) = &change.sync {
            batch.insert(&self.space, SYNC_KEY.to_vec(), to_json(s)?);
        }
        if let Some(cas) = &change.cas {
            for name in old_cas.keys().filter(|n| !cas.contains_key(*n)) {
                batch.remove(&self.space, ca_key(name));
            }
            for c in cas.values().filter(|c| old_cas.get(&c.name) != Some(*c)) {
                batch.insert(&self.space, ca_key(&c.name), to_json(c)?);
            }
        }
        batch.commit(Durability::SyncAll)?;
        Ok(())
    }
}

fn to_json<T: Serialize>(v: &T) -> Result<Vec<u8>, RegistryError> {
    serde_json::to_vec(v).map_err(|e| RegistryError::Invalid(e.to_string()))
}

fn id_key(id: &str) -> Vec<u8> {
    [IDENTITY_PREFIX, id.as_bytes()].concat()
}

fn ca_key(name: &str) -> Vec<u8> {
    [CA_PREFIX, name.as_bytes()].concat()
}

fn prefix_range(prefix: &[u8]) -> std::ops::Range<Vec<u8>> {
    let mut end = prefix.to_vec();
    if let Some(last) = end.last_mut() {
        *last += 1;
    }
    prefix.to_vec()..end
}
