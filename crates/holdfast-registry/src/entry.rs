//! What an entry means: its device and module, its scope parent, its JSON and the record the auth policy reads; entries seeded from the config.

#[allow(unused_imports)]
use super::*;

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

/// A directory holding the `[[identities]]` of a validated config.
pub fn directory_from_config(identities: &[IdentityConfig]) -> holdfast_model::MemoryDirectory {
    let dir = holdfast_model::MemoryDirectory::new();
    for entry in identities.iter().filter_map(Entry::from_config) {
        dir.insert(entry.record());
    }
    dir
}
