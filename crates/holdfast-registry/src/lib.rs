//! # holdfast-registry
//!
//! The device registry: devices, modules, child gateways and users, each with
//! at most one parent, their credentials, and the CAs device certificates
//! may be signed by.
//!
//! A node whose upstream is not a Holdfast parent (`upstream.kind` `none` or
//! `mqtt`) **owns** its registry: the admin API and the CLI change it, and
//! `[[identities]]` in the config seed it. A node with a QUIC parent keeps a
//! **replica** of its scope (every identity whose parent chain includes it),
//! filled by scope sync over the link; it can still seed local identities
//! from its own config (a plain MQTT user for a local tool, say).
//!
//! Everything lives in one fjall space, `registry`, written with `fsync`
//! before a change is acknowledged, and in a map in memory that the auth
//! plugin's lookups read. Secrets never leave this module except to the
//! scope sync of a child gateway over mutual TLS, and in API answers that
//! ask for them.
//!
//! Changes are announced two ways: [`Registry::changes`] (a counter every
//! scope-sync task watches) and [`Registry::revocations`] (the ids whose
//! credentials changed, were disabled or removed, which the broker
//!
//! The parts, each a type with its own state: [`identities`](Identities)
//! (the identity table and its parent links), the CA store and the chains
//! clients presented (`certs`), the journal on disk (`journal`), and the
//! sync log (`sync`). [`Registry`] holds them under one lock, writes every
//! change through the journal before applying it, and announces it.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use rustls::pki_types::CertificateDer;
use tokio::sync::{broadcast, watch};

use holdfast_model::identity::{IdentityDirectory, IdentityRecord};
use holdfast_store::{Store, StoreError};

mod certs;
mod credentials;
mod edit;
mod entry;
mod identities;
mod journal;
mod metrics;
pub mod scope_sync;
mod sync;

pub use self::certs::CaEntry;
pub use self::credentials::{Credentials, generate_key};
pub use self::edit::{NewIdentity, WhichKey};
pub use self::entry::{Entry, IdentityConfig, Kind, MAX_ID_LEN, Origin, check_id, directory_from_config};
pub use self::identities::Hop;
pub use self::metrics::RegistryMetrics;
pub use self::scope_sync::ScopeSync;
pub use self::sync::{Delta, Scope, SyncState};

use self::certs::{CaStore, Presented};
use self::edit::check_labels;
use self::identities::Identities;
use self::journal::{Change, Journal};

/// Who decides about the registry's content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// This node owns it.
    Owner,
    /// A replica of the scope this node's parent sends.
    Replica {
        /// The parent's node id.
        parent: String,
    },
}

/// Registry errors, each mapped to an HTTP status by the admin API.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// No such identity or CA.
    #[error("{0} is not registered")]
    NotFound(String),
    /// It exists already.
    #[error("{0} is already registered")]
    Exists(String),
    /// A value is not acceptable.
    #[error("{0}")]
    Invalid(String),
    /// The change conflicts with other entries.
    #[error("{0}")]
    Conflict(String),
    /// This node holds a replica; the registry is changed at the root.
    #[error("this node's registry is a replica synced from {0}; change identities on the root")]
    Replica(String),
    /// Storage failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What the registry holds in memory, changed only by [`Registry::commit`].
struct State {
    identities: Identities,
    cas: CaStore,
    sync: SyncState,
}

impl State {
    /// Applies a change already stored; returns the ids whose connections
    /// must be dropped, sorted and without repeats.
    fn apply(&mut self, change: Change) -> Vec<String> {
        let mut revoked = Vec::new();
        if let Some(cas) = change.cas {
            // Identities that relied on a CA that is gone lose their connections.
            if self.cas.replace(cas) {
                revoked.extend(self.identities.ca_signed_ids());
            }
        }
        revoked.extend(self.identities.apply(change.upserts, change.removals));
        if let Some(s) = change.sync {
            self.sync = s;
        }
        revoked.sort_unstable();
        revoked.dedup();
        revoked
    }
}

/// The registry (see the module docs).
pub struct Registry {
    role: Role,
    journal: Journal,
    state: RwLock<State>,
    presented: Presented,
    changes: watch::Sender<u64>,
    revocations: broadcast::Sender<Arc<Vec<String>>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("role", &self.role)
            .field("entries", &self.len())
            .finish_non_exhaustive()
    }
}

impl Registry {
    /// Opens the registry in `store`, for node `node_id` in `role`. A
    /// gateway whose parent is `node_id` is a child of this node.
    ///
    /// # Errors
    /// Storage errors, or stored entries that do not decode.
    pub fn open(store: &Store, node_id: &str, role: Role) -> Result<Registry, RegistryError> {
        let (journal, stored) = Journal::open(store)?;
        Ok(Registry {
            role,
            journal,
            state: RwLock::new(State {
                identities: Identities::new(node_id, stored.entries),
                cas: CaStore::new(stored.cas),
                sync: stored.sync,
            }),
            presented: Presented::default(),
            changes: watch::channel(0).0,
            revocations: broadcast::channel(256).0,
        })
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Who owns the content.
    pub fn role(&self) -> &Role {
        &self.role
    }

    /// A receiver that sees a new value after every change.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// A receiver of the ids whose connections must be dropped.
    pub fn revocations(&self) -> broadcast::Receiver<Arc<Vec<String>>> {
        self.revocations.subscribe()
    }

    /// Number of identities.
    pub fn len(&self) -> usize {
        self.read().identities.len()
    }

    /// True when there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// One entry.
    pub fn entry(&self, id: &str) -> Option<Entry> {
        self.read().identities.get(id).cloned()
    }

    /// Every entry, sorted by id.
    pub fn list(&self) -> Vec<Entry> {
        self.read().identities.list()
    }

    /// Registered CAs.
    pub fn cas(&self) -> Vec<CaEntry> {
        self.read().cas.all().values().cloned().collect()
    }

    /// What the replica last received.
    pub fn sync_state(&self) -> SyncState {
        self.read().sync.clone()
    }

    /// Where traffic for identity `id` goes from this node: to a client
    /// connected here, or down to the child gateway on its parent chain.
    pub fn next_hop(&self, id: &str) -> Hop {
        self.read().identities.next_hop(id)
    }

    /// Every identity whose parent chain includes `gateway`, and the CAs.
    pub fn scope(&self, gateway: &str) -> Scope {
        let state = self.read();
        let cas = state
            .cas
            .all()
            .values()
            .map(|c| {
                let mut c = c.clone();
                c.origin = Origin::Synced;
                (c.name.clone(), c)
            })
            .collect();
        Scope {
            entries: state.identities.below(gateway),
            cas,
        }
    }

    /// The registry's summary for the admin API.
    pub fn summary(&self) -> serde_json::Value {
        let state = self.read();
        let (role, parent) = match &self.role {
            Role::Owner => ("owner", None),
            Role::Replica { parent } => ("replica", Some(parent.clone())),
        };
        serde_json::json!({
            "role": role,
            "parent": parent,
            "identities": state.identities.len(),
            "kinds": state.identities.kinds(),
            "cas": state.cas.all().len(),
            "sync": state.sync,
        })
    }

    /// Remembers the certificate chain a TLS client presented, so that
    /// `verify_thumbprint` can check an `x509-ca` identity's certificate
    /// against the registered CAs.
    pub fn presented(&self, thumbprint: &str, chain: Vec<CertificateDer<'static>>) {
        self.presented.remember(thumbprint, chain);
    }

    /// True when the certificate with `thumbprint`, presented on TLS, chains
    /// to a registered CA and names `id` (common name or DNS name).
    fn ca_signed(&self, id: &str, thumbprint: &str) -> bool {
        let Some(verifier) = self.read().cas.verifier() else {
            return false;
        };
        self.presented
            .chain(thumbprint)
            .is_some_and(|chain| certs::signed_for(verifier.as_ref(), &chain, id))
    }

    fn owner_only(&self) -> Result<(), RegistryError> {
        match &self.role {
            Role::Owner => Ok(()),
            Role::Replica { parent } => Err(RegistryError::Replica(parent.clone())),
        }
    }

    /// Writes a change durably in one batch, then updates memory and
    /// announces it. The caller holds the write lock.
    fn commit(&self, state: &mut State, mut change: Change) -> Result<(), RegistryError> {
        change.cas = change.cas.filter(|c| c != state.cas.all());
        if change.is_empty() {
            return Ok(());
        }
        self.journal.write(&change, state.cas.all())?;
        let revoked = state.apply(change);
        self.changes.send_modify(|n| *n += 1);
        if !revoked.is_empty() {
            tracing::info!(ids = ?revoked, "registry: credentials revoked or changed");
            let _ = self.revocations.send(Arc::new(revoked));
        }
        Ok(())
    }

    /// Applies `[[identities]]` from the config: adds new ones, updates
    /// those the config still manages, removes those it no longer lists.
    /// Entries changed through the API are left alone.
    ///
    /// # Errors
    /// Storage errors.
    pub fn seed(&self, identities: &[IdentityConfig]) -> Result<usize, RegistryError> {
        let mut state = self.write();
        let (upserts, removals) = state.identities.seeded(identities);
        let n = upserts.len() + removals.len();
        self.commit(&mut state, Change::entries(upserts, removals))?;
        Ok(n)
    }

    /// Adds an identity (owner only). Returns it with its generated keys.
    ///
    /// # Errors
    /// Invalid values, an existing id, a missing or wrong parent.
    pub fn add(&self, new: NewIdentity) -> Result<Entry, RegistryError> {
        self.owner_only()?;
        let mut entry = new.to_entry()?;
        let mut state = self.write();
        state.identities.check_new(&entry)?;
        entry.labels = check_labels(entry.labels)?;
        self.commit(&mut state, Change::entries(vec![entry.clone()], Vec::new()))?;
        Ok(entry)
    }

    /// Changes one entry with `f` (owner only), which may refuse.
    fn modify(
        &self,
        id: &str,
        f: impl FnOnce(&Identities, &mut Entry) -> Result<(), RegistryError>,
    ) -> Result<Entry, RegistryError> {
        self.owner_only()?;
        let mut state = self.write();
        let mut entry = state
            .identities
            .get(id)
            .cloned()
            .ok_or_else(|| RegistryError::NotFound(id.to_string()))?;
        f(&state.identities, &mut entry)?;
        entry.origin = Origin::Api;
        entry.updated_ms = holdfast_model::unix_ms();
        self.commit(&mut state, Change::entries(vec![entry.clone()], Vec::new()))?;
        Ok(entry)
    }

    /// Enables or disables an identity.
    ///
    /// # Errors
    /// Unknown id, a replica, storage.
    pub fn set_enabled(&self, id: &str, enabled: bool) -> Result<Entry, RegistryError> {
        self.modify(id, |_, e| {
            e.enabled = enabled;
            Ok(())
        })
    }

    /// Replaces an identity's labels.
    ///
    /// # Errors
    /// Unknown id, a bad label, a replica, storage.
    pub fn set_labels(&self, id: &str, labels: BTreeMap<String, String>) -> Result<Entry, RegistryError> {
        let labels = check_labels(labels)?;
        self.modify(id, |_, e| {
            e.labels = labels;
            Ok(())
        })
    }

    /// Moves an identity under another gateway (or to no parent).
    ///
    /// # Errors
    /// Unknown ids, a parent that is not a gateway, a cycle.
    pub fn set_parent(&self, id: &str, parent: Option<String>) -> Result<Entry, RegistryError> {
        self.modify(id, |identities, e| {
            if let Some(p) = &parent {
                identities.check_parent(id, p)?;
            }
            e.parent = parent;
            Ok(())
        })
    }

    /// Replaces symmetric keys with fresh random ones.
    ///
    /// # Errors
    /// Unknown id, an identity without SAS keys.
    pub fn rotate_key(&self, id: &str, which: WhichKey) -> Result<Entry, RegistryError> {
        let primary = generate_key()?;
        let secondary = generate_key()?;
        self.modify(id, |_, e| which.rotate(e, primary, secondary))
    }

    /// Removes an identity, and the modules of a device.
    ///
    /// # Errors
    /// Unknown id; identities still have it as their parent.
    pub fn remove(&self, id: &str) -> Result<Vec<String>, RegistryError> {
        self.owner_only()?;
        let mut state = self.write();
        let removed = state.identities.removal(id)?;
        self.commit(&mut state, Change::entries(Vec::new(), removed.clone()))?;
        Ok(removed)
    }

    /// Registers a CA for `x509-ca` identities.
    ///
    /// # Errors
    /// A bad name, a PEM without exactly one CA certificate, an existing name.
    pub fn add_ca(&self, name: &str, pem: &str) -> Result<CaEntry, RegistryError> {
        self.owner_only()?;
        let ca = CaEntry::parse(name, pem)?;
        let mut state = self.write();
        let cas = state.cas.with(ca.clone())?;
        self.commit(&mut state, Change::cas(cas))?;
        Ok(ca)
    }

    /// Removes a CA; identities that relied on it are disconnected.
    ///
    /// # Errors
    /// Unknown name, storage.
    pub fn remove_ca(&self, name: &str) -> Result<(), RegistryError> {
        self.owner_only()?;
        let mut state = self.write();
        let cas = state.cas.without(name)?;
        self.commit(&mut state, Change::cas(cas))
    }

    /// Replaces the synced part of a replica with `scope` (a full sync).
    /// Returns how many entries changed.
    ///
    /// # Errors
    /// Storage errors.
    pub fn apply_full(&self, parent: &str, scope: Scope) -> Result<usize, RegistryError> {
        let mut state = self.write();
        let removals = state.identities.synced_except(|id| scope.entries.contains_key(id));
        let upserts = state.identities.changed(scope.entries.into_values());
        self.apply_synced(&mut state, parent, true, upserts, removals, Some(scope.cas))
    }

    /// Applies an incremental change from the parent.
    ///
    /// # Errors
    /// Storage errors.
    pub fn apply_delta(&self, parent: &str, delta: Delta) -> Result<usize, RegistryError> {
        let mut state = self.write();
        let removals: Vec<String> = delta
            .removed
            .into_iter()
            .filter(|id| state.identities.is_synced(id))
            .collect();
        let upserts = state.identities.changed(delta.upserts.into_iter());
        self.apply_synced(&mut state, parent, false, upserts, removals, delta.cas)
    }

    /// Commits what the parent sent, with the sync log; returns how many
    /// identities changed.
    fn apply_synced(
        &self,
        state: &mut State,
        parent: &str,
        full: bool,
        upserts: Vec<Entry>,
        removals: Vec<String>,
        cas: Option<BTreeMap<String, CaEntry>>,
    ) -> Result<usize, RegistryError> {
        let n = upserts.len() + removals.len();
        let sync = state.sync.after(parent, full, holdfast_model::unix_ms());
        let cas = cas.map(|cas| state.cas.with_synced(cas));
        self.commit(
            state,
            Change {
                upserts,
                removals,
                sync: Some(sync),
                cas,
            },
        )?;
        Ok(n)
    }
}

impl IdentityDirectory for Registry {
    fn get(&self, id: &str) -> Option<IdentityRecord> {
        self.read().identities.get(id).map(Entry::record)
    }

    fn verify_thumbprint(&self, id: &str, thumbprint: &str) -> bool {
        let Some(entry) = self.entry(id) else { return false };
        if !entry.enabled {
            return false;
        }
        let tp = thumbprint.to_ascii_lowercase();
        holdfast_model::identity::thumbprint_listed(&entry.credentials.thumbprints, &tp)
            || (entry.credentials.x509_ca && self.ca_signed(id, &tp))
    }
}

#[cfg(test)]
mod tests;
