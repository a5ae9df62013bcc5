//! `[deploy]`: how a node takes part in fleet deployments.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::model::{SETTINGS, SLOTS};

/// `[deploy]`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeployConfig {
    /// Apply deployments from the parent. Default true.
    pub accept: bool,
    /// Keys deployments never change here, because the operator pinned
    /// them in this file: a setting (`outbox.when_full`), a slot
    /// (`plugins.router`: its component and config), a slot's component
    /// (`plugins.router.file`) or config (`plugins.router.config`), or a
    /// whole section (`outbox`, `plugins`). Default none.
    pub pinned: Vec<String>,
    /// Certificate to sign this node's deployments with. Default `fleet.cert`.
    pub signing_cert: Option<PathBuf>,
    /// Its key. Default `fleet.key`.
    pub signing_key: Option<PathBuf>,
    /// Largest component accepted, bytes. Default 64 MiB.
    pub max_component_bytes: u64,
    /// How long a deployment document this node signs stays valid,
    /// seconds. The node signs a new revision of each live deployment when
    /// half of it has passed; a node that hears nothing newer by then
    /// reports the deployment `expired` (and keeps running it), and refuses
    /// to import it. Default 2592000 (30 days); at least 60.
    pub expiry_seconds: u64,
    /// How often at most this node sends the fleet view's changes to its
    /// parent, seconds (1-3600). Default 5. Restart-only.
    pub fleet_report_seconds: u64,
}

impl Default for DeployConfig {
    fn default() -> Self {
        DeployConfig {
            accept: true,
            pinned: Vec::new(),
            signing_cert: None,
            signing_key: None,
            max_component_bytes: 64 << 20,
            expiry_seconds: 30 * 86_400,
            fleet_report_seconds: 5,
        }
    }
}

/// Every key a deployment can set, as pins name them.
pub fn deployable_keys() -> Vec<String> {
    let mut keys: Vec<String> = SETTINGS.iter().map(|s| s.to_string()).collect();
    for slot in SLOTS {
        keys.push(format!("plugins.{slot}.file"));
        keys.push(format!("plugins.{slot}.config"));
    }
    keys
}

/// True when `pin` covers `key` (the key itself or a section above it).
pub fn pin_covers(pin: &str, key: &str) -> bool {
    key == pin || key.strip_prefix(pin).is_some_and(|rest| rest.starts_with('.'))
}

impl DeployConfig {
    /// Checks values that types alone cannot.
    ///
    /// # Errors
    /// `(key, reason)` of the first bad value.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let keys = deployable_keys();
        for p in &self.pinned {
            if !keys.iter().any(|k| pin_covers(p, k)) {
                return Err((
                    "deploy.pinned".into(),
                    format!("{p:?} is not a key deployments set (see docs/deployments.md)"),
                ));
            }
        }
        if self.signing_cert.is_some() != self.signing_key.is_some() {
            return Err((
                "deploy.signing_cert".into(),
                "signing_cert and signing_key go together".into(),
            ));
        }
        if self.max_component_bytes < 1024 {
            return Err(("deploy.max_component_bytes".into(), "must be at least 1024".into()));
        }
        if !(1..=3600).contains(&self.fleet_report_seconds) {
            return Err(("deploy.fleet_report_seconds".into(), "must be 1-3600".into()));
        }
        if self.expiry_seconds < 60 {
            return Err(("deploy.expiry_seconds".into(), "must be at least 60".into()));
        }
        Ok(())
    }

    /// True when deployments may not change `key`.
    pub fn is_pinned(&self, key: &str) -> bool {
        self.pinned.iter().any(|p| pin_covers(p, key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_cover_keys_and_sections() {
        let c = DeployConfig {
            pinned: vec!["outbox".into(), "plugins.router".into(), "log.level".into()],
            ..DeployConfig::default()
        };
        c.validate().unwrap();
        assert!(c.is_pinned("outbox.when_full"));
        assert!(c.is_pinned("plugins.router.file"));
        assert!(c.is_pinned("plugins.router.config"));
        assert!(!c.is_pinned("plugins.auth.config"));
        assert!(!c.is_pinned("outboxes.x"));
        assert!(c.is_pinned("log.level"));
        let bad = DeployConfig {
            pinned: vec!["node.id".into()],
            ..DeployConfig::default()
        };
        assert!(bad.validate().is_err());
    }
}
