//! One identity: what it is ([`Kind`]), where it came from ([`Origin`]),
//! its device and module, its scope parent, the JSON the admin API shows,
//! the record the auth policy reads; ids and the entries seeded from the
//! config (`[[identities]]`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use holdfast_model::identity::IdentityRecord;
use holdfast_model::{Identity, IdentityKind};

use crate::RegistryError;
use crate::credentials::Credentials;

/// Longest identity id (IoT Hub's device id limit).
pub const MAX_ID_LEN: usize = 128;

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

impl Entry {
    /// The device id and module id of the identity.
    pub fn device_and_module(&self) -> (String, Option<String>) {
        match (self.kind, self.id.split_once('/')) {
            (Kind::Module, Some((d, m))) => (d.to_string(), Some(m.to_string())),
            _ => (self.id.clone(), None),
        }
    }

    /// The parent for scope: the explicit parent, else a module's device.
    pub fn scope_parent(&self) -> Option<String> {
        match (&self.parent, self.kind) {
            (Some(p), _) => Some(p.clone()),
            (None, Kind::Module) => Some(self.device_and_module().0),
            (None, _) => None,
        }
    }

    /// An `[[identities]]` entry of the config (`None` for an unknown kind,
    /// which config validation refuses).
    pub fn from_config(c: &IdentityConfig) -> Option<Entry> {
        Some(Entry {
            id: c.id.clone(),
            kind: Kind::parse(&c.kind)?,
            parent: c.parent.clone(),
            enabled: c.enabled,
            credentials: Credentials {
                sas_primary: c.sas_primary.clone(),
                sas_secondary: c.sas_secondary.clone(),
                thumbprints: c.thumbprints.iter().map(|t| t.to_ascii_lowercase()).collect(),
                x509_ca: c.x509_ca,
                password_hash: c.password_hash.clone(),
            },
            origin: Origin::Config,
            updated_ms: holdfast_model::unix_ms(),
            labels: c.labels.clone(),
        })
    }

    /// The JSON shown by the admin API; secrets only when asked for.
    pub fn to_json(&self, secrets: bool) -> serde_json::Value {
        let c = &self.credentials;
        let mut v = serde_json::json!({
            "id": self.id,
            "kind": self.kind,
            "parent": self.parent,
            "enabled": self.enabled,
            "credentials": c.kinds(),
            "thumbprints": c.thumbprints,
            "origin": self.origin,
            "updated_ms": self.updated_ms,
            "labels": self.labels,
        });
        if secrets {
            v["sas_primary"] = serde_json::json!(c.sas_primary);
            v["sas_secondary"] = serde_json::json!(c.sas_secondary);
        }
        v
    }

    /// What the auth plugin's lookups see, with the secrets to verify against.
    pub fn record(&self) -> IdentityRecord {
        let (device_id, module_id) = self.device_and_module();
        IdentityRecord {
            identity: Identity {
                id: self.id.clone(),
                kind: self.kind.wit(),
                device_id,
                module_id,
                parent: self.parent.clone(),
                enabled: self.enabled,
                credentials: self.credentials.kinds(),
            },
            sas_keys: self.credentials.keys(),
            thumbprints: self.credentials.thumbprints.clone(),
            password_hash: self.credentials.password_hash.clone(),
        }
    }

    /// True when a connection authenticated as the old entry must be
    /// dropped once it becomes `new` (`None`: removed).
    pub(crate) fn revokes(&self, new: Option<&Entry>) -> bool {
        match new {
            None => true,
            Some(n) => !n.enabled || n.credentials != self.credentials || n.kind != self.kind,
        }
    }
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

/// A directory holding the `[[identities]]` of a validated config.
pub fn directory_from_config(identities: &[IdentityConfig]) -> holdfast_model::MemoryDirectory {
    let dir = holdfast_model::MemoryDirectory::new();
    for entry in identities.iter().filter_map(Entry::from_config) {
        dir.insert(entry.record());
    }
    dir
}

/// Characters allowed in an id part besides ASCII letters and digits (IoT
/// Hub's set, minus those with a meaning in topics or URLs).
const ID_EXTRA: &[char] = &['-', '.', '_', ':', '@', '$', '!', '(', ')', '*', ',', '=', '\''];

/// Checks one part of an id (or a CA name): not empty, letters, digits and
/// [`ID_EXTRA`] only.
pub(crate) fn check_part(part: &str, what: &str) -> Result<(), RegistryError> {
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
