//! What the owning node is asked to change: a new identity
//! ([`NewIdentity`]) turned into a checked entry, which keys a rotation
//! replaces ([`WhichKey`]), and the rules for labels.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::RegistryError;
use crate::credentials::Credentials;
use crate::entry::{Entry, Kind, Origin, check_id};

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

impl NewIdentity {
    /// The entry it asks for, its id and credentials checked (keys
    /// generated where needed). Its labels are checked by
    /// [`check_labels`] once the table accepted the entry.
    pub(crate) fn to_entry(&self) -> Result<Entry, RegistryError> {
        let kind = match self.kind.as_deref() {
            None => {
                if self.id.contains('/') {
                    Kind::Module
                } else {
                    Kind::Device
                }
            }
            Some(k) => Kind::parse(k)
                .ok_or_else(|| RegistryError::Invalid(format!("kind {k:?} is not device, module, gateway or user")))?,
        };
        check_id(&self.id, kind)?;
        let credentials = Credentials::for_new(kind, self)?;
        Ok(Entry {
            id: self.id.clone(),
            kind,
            parent: self.parent.clone(),
            enabled: self.enabled.unwrap_or(true),
            credentials,
            origin: Origin::Api,
            updated_ms: holdfast_model::unix_ms(),
            labels: self.labels.clone(),
        })
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

impl WhichKey {
    /// Puts fresh keys into `e`'s credentials; refused for an identity
    /// without symmetric keys.
    pub(crate) fn rotate(self, e: &mut Entry, primary: String, secondary: String) -> Result<(), RegistryError> {
        if e.credentials.sas_primary.is_none() && e.credentials.sas_secondary.is_none() {
            return Err(RegistryError::Conflict(format!(
                "{} has no symmetric keys to rotate",
                e.id
            )));
        }
        if matches!(self, WhichKey::Primary | WhichKey::Both) {
            e.credentials.sas_primary = Some(primary);
        }
        if matches!(self, WhichKey::Secondary | WhichKey::Both) {
            e.credentials.sas_secondary = Some(secondary);
        }
        Ok(())
    }
}

/// Labels: at most 32, names of letters, digits, `-`, `_`, `.` and `/` (1
/// to 63 bytes), values of at most 255 bytes.
pub(crate) fn check_labels(labels: BTreeMap<String, String>) -> Result<BTreeMap<String, String>, RegistryError> {
    if labels.len() > 32 {
        return Err(RegistryError::Invalid("at most 32 labels".into()));
    }
    for (k, v) in &labels {
        let name_ok =
            !k.is_empty() && k.len() <= 63 && k.chars().all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c));
        if !name_ok {
            return Err(RegistryError::Invalid(format!(
                "label name {k:?}: 1 to 63 letters, digits, '-', '_', '.' or '/'"
            )));
        }
        if v.len() > 255 || v.chars().any(char::is_control) {
            return Err(RegistryError::Invalid(format!(
                "label {k:?}: the value is longer than 255 bytes or has control characters"
            )));
        }
    }
    Ok(labels)
}
