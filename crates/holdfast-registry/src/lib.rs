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
//! disconnects).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, RwLock};

use base64::Engine as _;
use rustls::pki_types::{CertificateDer, UnixTime};
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, watch};

use holdfast_model::identity::{IdentityDirectory, IdentityRecord};
use holdfast_model::{Identity, IdentityKind};
use holdfast_store::{Durability, Space, Store, StoreError};

mod certs;
mod credentials;
mod edit;
mod entry;
mod sync;

pub use self::entry::directory_from_config;

use self::certs::build_ca_verifier;

/// True when `id` is an enabled gateway whose parent is `me`: the child
/// gateways a node lets in on its link and syncs the scope of.
pub fn is_child_gateway(identities: &dyn IdentityDirectory, id: &str, me: &str) -> bool {
    identities
        .lookup(id)
        .is_some_and(|i| i.enabled && i.kind == IdentityKind::Gateway && i.parent.as_deref() == Some(me))
}

/// Longest identity id (IoT Hub's device id limit).
pub const MAX_ID_LEN: usize = 128;
/// How many client certificates presented on TLS are remembered for
/// registered-CA checks.
const PRESENTED_CERTS: usize = 4096;
/// Bytes of a generated symmetric key.
const KEY_BYTES: usize = 32;

const IDENTITY_PREFIX: &[u8] = b"i/";
const CA_PREFIX: &[u8] = b"c/";
const SYNC_KEY: &[u8] = b"s";

/// What an identity is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A leaf device.
    Device,
    /// A module on a device: id `{device}/{module}`.
    Module,
    /// A child gateway (another Holdfast node).
    Gateway,
    /// A plain MQTT user (username and password).
    User,
}

impl Kind {
    /// Parses `device`, `module`, `gateway` or `user`.
    pub fn parse(s: &str) -> Option<Kind> {
        Some(match s {
            "device" => Kind::Device,
            "module" => Kind::Module,
            "gateway" => Kind::Gateway,
            "user" => Kind::User,
            _ => return None,
        })
    }

    fn wit(self) -> IdentityKind {
        match self {
            Kind::Device => IdentityKind::Device,
            Kind::Module => IdentityKind::Module,
            Kind::Gateway => IdentityKind::Gateway,
            Kind::User => IdentityKind::User,
        }
    }
}

/// Where an entry came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    /// `[[identities]]` in this node's config: the config manages it.
    Config,
    /// The admin API or the CLI on this node.
    Api,
    /// Scope sync from the parent.
    Synced,
}

/// The credentials of an identity. Keys are base64 in the store and on the
/// wire, as IoT Hub shows them.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Credentials {
    /// Primary symmetric key, base64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sas_primary: Option<String>,
    /// Secondary symmetric key, base64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sas_secondary: Option<String>,
    /// Certificate thumbprints (SHA-256, lowercase hex): primary, secondary.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub thumbprints: Vec<String>,
    /// True when a certificate signed by a registered CA, naming the
    /// identity, is accepted.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub x509_ca: bool,
    /// Argon2 PHC password hash.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_hash: Option<String>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("kinds", &self.kinds())
            .finish_non_exhaustive()
    }
}

/// One identity in the registry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Device id, `{device}/{module}`, gateway node id, or username.
    pub id: String,
    /// What it is.
    pub kind: Kind,
    /// The parent gateway. A module without one belongs to its device.
    #[serde(default)]
    pub parent: Option<String>,
    /// Disabled identities are refused.
    pub enabled: bool,
    /// Credentials.
    #[serde(default)]
    pub credentials: Credentials,
    /// Where it came from.
    pub origin: Origin,
    /// Last change, ms since the Unix epoch.
    #[serde(default)]
    pub updated_ms: u64,
    /// Labels (`site = "north"`) that fleet deployments target. Left out
    /// of the stored and synced JSON when empty, as before labels existed.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// `[[identities]]`: an identity seeded from the config.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityConfig {
    /// Device id, `{device}/{module}` for a module, gateway id, or username.
    pub id: String,
    /// `device`, `module`, `gateway` or `user`. Default `device`.
    #[serde(default = "default_kind")]
    pub kind: String,
    /// Parent gateway id.
    pub parent: Option<String>,
    /// Default true.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Primary symmetric key, base64.
    pub sas_primary: Option<String>,
    /// Secondary symmetric key, base64.
    pub sas_secondary: Option<String>,
    /// Certificate thumbprints (SHA-256, hex).
    #[serde(default)]
    pub thumbprints: Vec<String>,
    /// Argon2 PHC hash (`holdfast passwd` prints one).
    pub password_hash: Option<String>,
    /// Accept a certificate signed by a registered CA that names this identity.
    #[serde(default)]
    pub x509_ca: bool,
    /// Labels for fleet deployments (`labels = { site = "north" }`).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

fn default_kind() -> String {
    "device".to_string()
}

fn yes() -> bool {
    true
}

/// A CA that device certificates may be signed by.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaEntry {
    /// Name.
    pub name: String,
    /// The CA certificate, PEM.
    pub pem: String,
    /// SHA-256 thumbprint of the certificate.
    pub thumbprint: String,
    /// Subject, for people.
    pub subject: String,
    /// Where it came from.
    pub origin: Origin,
    /// When it was added, ms since the Unix epoch.
    pub added_ms: u64,
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

/// An identity to add; every field but `id` may be left out.
#[derive(Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NewIdentity {
    /// Id.
    pub id: String,
    /// `device` (default), `module`, `gateway` or `user`.
    pub kind: Option<String>,
    /// Parent gateway.
    pub parent: Option<String>,
    /// Default true.
    pub enabled: Option<bool>,
    /// `sas` (default for devices and modules), `x509-thumbprint`, `x509-ca`, `password` (default for users), `none`.
    pub auth: Option<String>,
    /// Primary key, base64; generated for `sas` when absent.
    pub sas_primary: Option<String>,
    /// Secondary key, base64; generated for `sas` when absent.
    pub sas_secondary: Option<String>,
    /// Thumbprints for `x509-thumbprint`.
    pub thumbprints: Vec<String>,
    /// Password for `password` (stored hashed).
    pub password: Option<String>,
    /// A PHC hash instead of a password.
    pub password_hash: Option<String>,
    /// Labels for fleet deployments.
    pub labels: BTreeMap<String, String>,
}

impl std::fmt::Debug for NewIdentity {
    // Never print keys or passwords.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewIdentity")
            .field("id", &self.id)
            .field("kind", &self.kind)
            .field("parent", &self.parent)
            .field("auth", &self.auth)
            .finish_non_exhaustive()
    }
}

/// Which key `rotate_key` replaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WhichKey {
    /// The primary key.
    Primary,
    /// The secondary key.
    Secondary,
    /// Both.
    Both,
}

struct Inner {
    entries: HashMap<String, Entry>,
    cas: BTreeMap<String, CaEntry>,
    sync: SyncState,
    /// Verifies device certificates against the registered CAs; rebuilt when they change.
    ca_verifier: Option<Arc<dyn rustls::server::danger::ClientCertVerifier>>,
}

/// The registry (see the module docs).
pub struct Registry {
    node_id: String,
    space: Space,
    store: Store,
    role: Role,
    inner: RwLock<Inner>,
    changes: watch::Sender<u64>,
    revocations: broadcast::Sender<Arc<Vec<String>>>,
    presented: Mutex<Presented>,
}

/// Client certificate chains by thumbprint, and their arrival order.
type Presented = (HashMap<String, Vec<CertificateDer<'static>>>, VecDeque<String>);

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("role", &self.role)
            .field("entries", &self.len())
            .finish_non_exhaustive()
    }
}

fn to_json<T: Serialize>(v: &T) -> Result<Vec<u8>, RegistryError> {
    serde_json::to_vec(v).map_err(|e| RegistryError::Invalid(e.to_string()))
}

/// One durable change to the registry.
#[derive(Default)]
struct Change {
    upserts: Vec<Entry>,
    removals: Vec<String>,
    sync: Option<SyncState>,
    /// The complete new set of CAs, when it changes.
    cas: Option<BTreeMap<String, CaEntry>>,
}

impl Change {
    fn entries(upserts: Vec<Entry>, removals: Vec<String>) -> Change {
        Change {
            upserts,
            removals,
            ..Change::default()
        }
    }
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

/// Characters allowed in an id part besides ASCII letters and digits (IoT
/// Hub's set, minus those with a meaning in topics or URLs).
const ID_EXTRA: &[char] = &['-', '.', '_', ':', '@', '$', '!', '(', ')', '*', ',', '=', '\''];

fn check_part(part: &str, what: &str) -> Result<(), RegistryError> {
    if part.is_empty() {
        return Err(RegistryError::Invalid(format!("{what} is empty")));
    }
    if let Some(c) = part
        .chars()
        .find(|c| !c.is_ascii_alphanumeric() && !ID_EXTRA.contains(c))
    {
        return Err(RegistryError::Invalid(format!("{what} {part:?} contains {c:?}")));
    }
    Ok(())
}

/// Checks an id for its kind.
///
/// # Errors
/// [`RegistryError::Invalid`] naming the problem.
pub fn check_id(id: &str, kind: Kind) -> Result<(), RegistryError> {
    if id.len() > MAX_ID_LEN {
        return Err(RegistryError::Invalid(format!(
            "id is longer than {MAX_ID_LEN} characters"
        )));
    }
    match kind {
        Kind::Module => {
            let Some((d, m)) = id.split_once('/') else {
                return Err(RegistryError::Invalid(format!(
                    "module id {id:?} must be {{device}}/{{module}}"
                )));
            };
            check_part(d, "device id")?;
            check_part(m, "module id")
        }
        Kind::Gateway => {
            check_part(id, "gateway id")?;
            if id.len() > 63 || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.') {
                return Err(RegistryError::Invalid(format!(
                    "gateway id {id:?} is a node id named in a certificate: at most 63 letters, digits, '-' or '.'"
                )));
            }
            Ok(())
        }
        Kind::Device | Kind::User => check_part(id, "id"),
    }
}

fn check_key(k: &str, what: &str) -> Result<(), RegistryError> {
    match base64::engine::general_purpose::STANDARD.decode(k) {
        Ok(raw) if (16..=64).contains(&raw.len()) => Ok(()),
        Ok(_) => Err(RegistryError::Invalid(format!("{what} must be 16-64 bytes"))),
        Err(_) => Err(RegistryError::Invalid(format!("{what} is not base64"))),
    }
}

fn check_thumbprint(t: &str) -> Result<String, RegistryError> {
    let t = t.to_ascii_lowercase().replace(':', "");
    if t.len() != 64 || !t.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(RegistryError::Invalid(format!(
            "{t:?} is not a SHA-256 thumbprint (64 hex digits)"
        )));
    }
    Ok(t)
}

/// A fresh random symmetric key, base64.
pub fn generate_key() -> Result<String, RegistryError> {
    let mut raw = [0u8; KEY_BYTES];
    holdfast_model::fill_random(&mut raw).map_err(|e| RegistryError::Invalid(format!("no randomness: {e}")))?;
    Ok(base64::engine::general_purpose::STANDARD.encode(raw))
}

impl Registry {
    /// Opens the registry in `store`, for node `node_id` in `role`. A
    /// gateway whose parent is `node_id` is a child of this node.
    ///
    /// # Errors
    /// Storage errors, or stored entries that do not decode.
    pub fn open(store: &Store, node_id: &str, role: Role) -> Result<Registry, RegistryError> {
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
        let ca_verifier = build_ca_verifier(&cas);
        Ok(Registry {
            node_id: node_id.to_string(),
            space,
            store: store.clone(),
            role,
            inner: RwLock::new(Inner {
                entries,
                cas,
                sync,
                ca_verifier,
            }),
            changes: watch::channel(0).0,
            revocations: broadcast::channel(256).0,
            presented: Mutex::new((HashMap::new(), VecDeque::new())),
        })
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|p| p.into_inner())
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
        self.read().entries.len()
    }

    /// True when there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// One entry.
    pub fn entry(&self, id: &str) -> Option<Entry> {
        self.read().entries.get(id).cloned()
    }

    /// Every entry, sorted by id.
    pub fn list(&self) -> Vec<Entry> {
        let mut v: Vec<Entry> = self.read().entries.values().cloned().collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }

    /// Registered CAs.
    pub fn cas(&self) -> Vec<CaEntry> {
        self.read().cas.values().cloned().collect()
    }

    /// What the replica last received.
    pub fn sync_state(&self) -> SyncState {
        self.read().sync.clone()
    }

    fn owner_only(&self) -> Result<(), RegistryError> {
        match &self.role {
            Role::Owner => Ok(()),
            Role::Replica { parent } => Err(RegistryError::Replica(parent.clone())),
        }
    }

    /// Writes a change durably in one batch, then updates memory and
    /// announces it. The caller holds the write lock.
    fn commit(&self, inner: &mut Inner, change: Change) -> Result<(), RegistryError> {
        let Change {
            upserts,
            removals,
            sync,
            cas,
        } = change;
        let cas = cas.filter(|c| *c != inner.cas);
        if upserts.is_empty() && removals.is_empty() && sync.is_none() && cas.is_none() {
            return Ok(());
        }
        let mut batch = self.store.batch();
        for e in &upserts {
            batch.insert(&self.space, id_key(&e.id), to_json(e)?);
        }
        for id in &removals {
            batch.remove(&self.space, id_key(id));
        }
        if let Some(s) = &sync {
            batch.insert(&self.space, SYNC_KEY.to_vec(), to_json(s)?);
        }
        if let Some(cas) = &cas {
            for name in inner.cas.keys().filter(|n| !cas.contains_key(*n)) {
                batch.remove(&self.space, ca_key(name));
            }
            for c in cas.values().filter(|c| inner.cas.get(&c.name) != Some(*c)) {
                batch.insert(&self.space, ca_key(&c.name), to_json(c)?);
            }
        }
        batch.commit(Durability::SyncAll)?;
        let mut revoked = Vec::new();
        if let Some(cas) = cas {
            // Identities that relied on a CA that is gone lose their connections.
            if inner.cas.keys().any(|n| !cas.contains_key(n)) {
                revoked.extend(
                    inner
                        .entries
                        .values()
                        .filter(|e| e.credentials.x509_ca)
                        .map(|e| e.id.clone()),
                );
            }
            inner.ca_verifier = build_ca_verifier(&cas);
            inner.cas = cas;
        }
        for e in upserts {
            if inner.entries.get(&e.id).is_some_and(|old| old.revokes(Some(&e))) {
                revoked.push(e.id.clone());
            }
            inner.entries.insert(e.id.clone(), e);
        }
        for id in removals {
            if inner.entries.remove(&id).is_some() {
                revoked.push(id);
            }
        }
        if let Some(s) = sync {
            inner.sync = s;
        }
        self.changes.send_modify(|n| *n += 1);
        revoked.sort_unstable();
        revoked.dedup();
        if !revoked.is_empty() {
            tracing::info!(ids = ?revoked, "registry: credentials revoked or changed");
            let _ = self.revocations.send(Arc::new(revoked));
        }
        Ok(())
    }

    /// The registry's summary for the admin API.
    pub fn summary(&self) -> serde_json::Value {
        let inner = self.read();
        let mut kinds: BTreeMap<&str, usize> = BTreeMap::new();
        for e in inner.entries.values() {
            let k = match e.kind {
                Kind::Device => "devices",
                Kind::Module => "modules",
                Kind::Gateway => "gateways",
                Kind::User => "users",
            };
            *kinds.entry(k).or_default() += 1;
        }
        let (role, parent) = match &self.role {
            Role::Owner => ("owner", None),
            Role::Replica { parent } => ("replica", Some(parent.clone())),
        };
        serde_json::json!({
            "role": role,
            "parent": parent,
            "identities": inner.entries.len(),
            "kinds": kinds,
            "cas": inner.cas.len(),
            "sync": inner.sync,
        })
    }
}

impl IdentityDirectory for Registry {
    fn get(&self, id: &str) -> Option<IdentityRecord> {
        self.read().entries.get(id).map(Entry::record)
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

/// Where traffic for an identity goes from this node ([`Registry::next_hop`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hop {
    /// The identity connects to this node.
    Here,
    /// Behind this child gateway.
    Child(String),
    /// Not in this node's registry.
    Unknown,
}

/// What a child gateway is sent: its scope.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Scope {
    /// Identities by id.
    pub entries: BTreeMap<String, Entry>,
    /// Registered CAs by name.
    pub cas: BTreeMap<String, CaEntry>,
}

fn check_parent(entries: &HashMap<String, Entry>, me: &str, id: &str, parent: &str) -> Result<(), RegistryError> {
    if parent == me {
        return Ok(());
    }
    let Some(p) = entries.get(parent) else {
        return Err(RegistryError::Invalid(format!("parent {parent:?} is not registered")));
    };
    if p.kind != Kind::Gateway {
        return Err(RegistryError::Invalid(format!("parent {parent:?} is not a gateway")));
    }
    // Walk up from the parent: meeting `id` would close a cycle.
    let mut at = Some(parent.to_string());
    let mut steps = 0;
    while let Some(cur) = at {
        if cur == id {
            return Err(RegistryError::Conflict(format!(
                "{id} cannot be under {parent}: {parent} is below {id}"
            )));
        }
        steps += 1;
        if steps > 64 {
            break;
        }
        at = entries.get(&cur).and_then(Entry::scope_parent);
    }
    Ok(())
}

#[cfg(test)]
mod tests;
