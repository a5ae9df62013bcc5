//! The identities a node can authenticate, as seen by the auth policy.
//!
//! The registry (root role) and scope sync fill a directory; this module
//! defines the trait the plugin runtime reads through and an in-memory
//! directory. Secrets stay on this side: the plugin asks for verification,
//! never for keys.

use std::collections::HashMap;
use std::sync::RwLock;

use argon2::{Argon2, PasswordHash, PasswordVerifier};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

/// What an identity is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IdentityKind {
    /// A leaf device.
    Device,
    /// A module running on a device (`{device}/{module}`).
    Module,
    /// A child gateway (another holdfast node).
    Gateway,
    /// A plain MQTT user with a username and password.
    User,
}

/// The public part of an identity record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// Registry id: the device id, `{device}/{module}` for a module, or the username.
    pub id: String,
    /// What the identity is.
    pub kind: IdentityKind,
    /// The device id (for a module, the device it runs on).
    pub device_id: String,
    /// The module id, for modules.
    pub module_id: Option<String>,
    /// The id of the parent gateway, if any.
    pub parent: Option<String>,
    /// False when the identity is disabled: it must not be let in.
    pub enabled: bool,
    /// Which credential kinds the identity has: `sas`, `x509-thumbprint`, `x509-ca`, `password`.
    pub credentials: Vec<String>,
}

/// An identity with the secrets needed to verify it.
#[derive(Clone)]
pub struct IdentityRecord {
    /// The public part shown to plugins.
    pub identity: Identity,
    /// Symmetric keys (primary, secondary), raw bytes.
    pub sas_keys: Vec<Vec<u8>>,
    /// Certificate thumbprints, lowercase hex SHA-256.
    pub thumbprints: Vec<String>,
    /// Password hash in PHC format (argon2).
    pub password_hash: Option<String>,
}

impl std::fmt::Debug for IdentityRecord {
    // Never print secrets.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdentityRecord")
            .field("identity", &self.identity)
            .field("sas_keys", &format_args!("[{} redacted]", self.sas_keys.len()))
            .field("thumbprints", &self.thumbprints)
            .field("password_hash", &self.password_hash.as_ref().map(|_| "redacted"))
            .finish()
    }
}

/// Where the auth plugin's `identities` imports are answered from.
pub trait IdentityDirectory: Send + Sync + 'static {
    /// The record for `id`, if known.
    fn get(&self, id: &str) -> Option<IdentityRecord>;

    /// The public part of `id`.
    fn lookup(&self, id: &str) -> Option<Identity> {
        self.get(id).map(|r| r.identity)
    }

    /// True when `signature` is HMAC-SHA256(`string_to_sign`) under one of
    /// the identity's keys; constant-time compare.
    fn verify_sas(&self, id: &str, string_to_sign: &str, signature: &[u8]) -> bool {
        let Some(record) = self.get(id) else { return false };
        if !record.identity.enabled {
            return false;
        }
        // Check every key so timing does not tell which one matched.
        let mut ok = false;
        for key in &record.sas_keys {
            let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(key) else {
                continue;
            };
            mac.update(string_to_sign.as_bytes());
            let expected = mac.finalize().into_bytes();
            ok |= expected.len() == signature.len() && bool::from(expected.as_slice().ct_eq(signature));
        }
        ok
    }

    /// True when `password` matches the stored argon2 hash.
    fn verify_password(&self, id: &str, password: &[u8]) -> bool {
        let Some(record) = self.get(id) else { return false };
        let Some(hash) = record.password_hash.as_deref() else {
            return false;
        };
        match PasswordHash::new(hash) {
            Ok(parsed) => Argon2::default().verify_password(password, &parsed).is_ok(),
            Err(_) => false,
        }
    }

    /// True when `thumbprint` is one of the identity's thumbprints.
    fn verify_thumbprint(&self, id: &str, thumbprint: &str) -> bool {
        self.get(id)
            .is_some_and(|r| thumbprint_listed(&r.thumbprints, &thumbprint.to_ascii_lowercase()))
    }

    /// True when `id` is an enabled gateway whose parent is `me`: the child
    /// gateways a node lets in on its link and syncs the scope of.
    fn is_child_gateway(&self, id: &str, me: &str) -> bool {
        self.lookup(id)
            .is_some_and(|i| i.enabled && i.kind == IdentityKind::Gateway && i.parent.as_deref() == Some(me))
    }
}

/// True when `thumbprint` (lowercase hex) is in `listed`; every entry is
/// compared in constant time.
pub fn thumbprint_listed(listed: &[String], thumbprint: &str) -> bool {
    listed.iter().fold(false, |acc, t| {
        acc | bool::from(t.as_bytes().ct_eq(thumbprint.as_bytes()))
    })
}

/// An in-memory directory.
#[derive(Debug, Default)]
pub struct MemoryDirectory {
    records: RwLock<HashMap<String, IdentityRecord>>,
}

impl MemoryDirectory {
    /// An empty directory.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds or replaces a record.
    pub fn insert(&self, record: IdentityRecord) {
        let mut map = self.records.write().unwrap_or_else(|p| p.into_inner());
        map.insert(record.identity.id.clone(), record);
    }

    /// Number of records.
    pub fn len(&self) -> usize {
        self.records.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl IdentityDirectory for MemoryDirectory {
    fn get(&self, id: &str) -> Option<IdentityRecord> {
        self.records.read().unwrap_or_else(|p| p.into_inner()).get(id).cloned()
    }
}

/// Hashes a password for `password_hash` fields (argon2id, random salt, PHC string).
///
/// # Errors
/// Only if the platform's random source fails.
pub fn hash_password(password: &str) -> Result<String, argon2::password_hash::Error> {
    use argon2::password_hash::{PasswordHasher, SaltString, rand_core::OsRng};
    let salt = SaltString::generate(&mut OsRng);
    Ok(Argon2::default().hash_password(password.as_bytes(), &salt)?.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> IdentityRecord {
        IdentityRecord {
            identity: Identity {
                id: "dev1".into(),
                kind: IdentityKind::Device,
                device_id: "dev1".into(),
                module_id: None,
                parent: None,
                enabled: true,
                credentials: vec!["sas".into(), "password".into()],
            },
            sas_keys: vec![b"primary".to_vec(), b"secondary".to_vec()],
            thumbprints: vec!["ab".repeat(32)],
            password_hash: Some(hash_password("pw").unwrap()),
        }
    }

    #[test]
    fn verifies_with_either_key_password_and_thumbprint() {
        let dir = MemoryDirectory::new();
        dir.insert(record());
        for key in [b"primary".as_slice(), b"secondary"] {
            let mut mac = Hmac::<Sha256>::new_from_slice(key).unwrap();
            mac.update(b"sts");
            let sig = mac.finalize().into_bytes();
            assert!(dir.verify_sas("dev1", "sts", &sig));
            assert!(!dir.verify_sas("dev1", "other", &sig));
        }
        assert!(!dir.verify_sas("nobody", "sts", &[0; 32]));
        assert!(dir.verify_password("dev1", b"pw"));
        assert!(!dir.verify_password("dev1", b"nope"));
        assert!(dir.verify_thumbprint("dev1", &"AB".repeat(32)));
        assert!(!dir.verify_thumbprint("dev1", &"cd".repeat(32)));
        assert!(!format!("{:?}", record()).contains("primary"));
    }
}
