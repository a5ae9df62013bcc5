//! What a deployment is: the operator's spec, the signed document the
//! owning node sends down the tree, and what each node reports back.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::DeployError;

/// Plugin slots a deployment may set.
pub const SLOTS: &[&str] = &["router", "auth", "content-source"];

/// Settings a deployment may set: the node settings that change live
/// (the host applies the same list on a config reload).
pub const SETTINGS: &[&str] = &[
    "log.level",
    "outbox.default_ttl_seconds",
    "outbox.max_messages",
    "outbox.max_bytes",
    "outbox.min_free_disk_bytes",
    "outbox.when_full",
    "dead_letter.max_messages",
    "dead_letter.max_bytes",
    "cache.max_size",
    "cache.min_free",
    "cache.orphan_fill_bytes",
    "mqtt.max_connections",
    "mqtt.max_queued_messages",
    "mqtt.max_retained",
    "upstream.max_bytes_per_second",
];

/// Which nodes a deployment is for. The union of what is given: every
/// gateway (and the owning node) with `all`, the listed node ids, and the
/// gateways carrying every one of `labels`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Target {
    /// Every node in the owner's subtree, the owner included.
    pub all: bool,
    /// Node ids.
    pub nodes: Vec<String>,
    /// Labels a gateway must all carry (registry labels).
    pub labels: BTreeMap<String, String>,
}

impl Target {
    /// True when nothing is targeted.
    pub fn is_empty(&self) -> bool {
        !self.all && self.nodes.is_empty() && self.labels.is_empty()
    }
}

/// One slot's part of a deployment.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginSpec {
    /// The component: SHA-256 of its `.wasm` bytes, hex. Absent: the slot
    /// keeps its component and only its config changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// Its size in bytes (set by the owning node).
    #[serde(default)]
    pub size: u64,
    /// The plugin's config (a JSON object, as the TOML `config` table).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<Value>,
}

/// How a deployment rolls out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Rollout {
    /// Cumulative wave sizes: a count (`"1"`) or a share of the target
    /// (`"10%"`). The last is always the whole target. Default: one wave.
    pub waves: Vec<String>,
    /// How long every node of a wave must have run the deployment healthy
    /// before the next wave is released, seconds.
    pub soak_seconds: u64,
    /// A node rolls back by itself when more than this share of its calls
    /// to a deployed plugin fail (trap, timeout, memory) ...
    pub max_failure_rate: f64,
    /// ... once it has seen at least this many calls, or this many failures.
    pub min_calls: u64,
    /// How long after applying a node watches the deployed plugins,
    /// seconds (longer while it has seen fewer than `min_calls` calls).
    pub watch_seconds: u64,
    /// Release the next wave even when the nodes of the last one saw fewer
    /// than `min_calls` calls to the deployed plugins during their soak.
    /// Default false: a deployment that sets plugins waits for traffic.
    #[serde(skip_serializing_if = "is_false")]
    pub release_without_traffic: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

impl Default for Rollout {
    fn default() -> Self {
        Rollout {
            waves: vec!["100%".into()],
            soak_seconds: 30,
            max_failure_rate: 0.1,
            min_calls: 10,
            watch_seconds: 300,
            release_without_traffic: false,
        }
    }
}

impl Rollout {
    /// The cumulative number of nodes released after each wave, for a
    /// target of `n` nodes.
    ///
    /// # Errors
    /// A wave that is neither a count nor a percentage.
    pub fn boundaries(&self, n: usize) -> Result<Vec<usize>, DeployError> {
        let mut out = Vec::new();
        for w in &self.waves {
            let w = w.trim();
            let k = if let Some(p) = w.strip_suffix('%') {
                let p: f64 = p
                    .trim()
                    .parse()
                    .map_err(|_| DeployError::Invalid(format!("wave {w:?}: not a percentage")))?;
                if !(0.0..=100.0).contains(&p) || p.is_nan() {
                    return Err(DeployError::Invalid(format!("wave {w:?}: 0% to 100%")));
                }
                ((n as f64) * p / 100.0).ceil() as usize
            } else {
                w.parse::<usize>()
                    .map_err(|_| DeployError::Invalid(format!("wave {w:?}: a count or a percentage")))?
            };
            let k = k.clamp(1, n.max(1)).min(n);
            if out.last().is_none_or(|l| k > *l) {
                out.push(k);
            }
        }
        if out.last() != Some(&n) {
            out.push(n);
        }
        Ok(out)
    }
}

/// What an operator creates.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    /// Its id: 1 to 64 letters, digits, `-`, `_` or `.`.
    pub id: String,
    /// Which nodes.
    #[serde(default)]
    pub target: Target,
    /// When several deployments target a node, the highest priority
    /// applies (then the newest).
    #[serde(default)]
    pub priority: i32,
    /// Plugin components and configs by slot.
    #[serde(default)]
    pub plugins: BTreeMap<String, PluginSpec>,
    /// Live settings by dotted key (see [`SETTINGS`]).
    #[serde(default)]
    pub settings: BTreeMap<String, Value>,
    /// Waves and health gates.
    #[serde(default)]
    pub rollout: Rollout,
}

/// True for a valid deployment id.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        && !id.starts_with('.')
}

/// True for a SHA-256 in lower-case hex.
pub fn valid_sha256(s: &str) -> bool {
    s.len() == 64 && s.chars().all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
}

/// The SHA-256 of `bytes`, hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

impl Spec {
    /// Checks everything that does not need the node's state.
    ///
    /// # Errors
    /// The first problem found.
    pub fn validate(&self) -> Result<(), DeployError> {
        let bad = |m: String| Err(DeployError::Invalid(m));
        if !valid_id(&self.id) {
            return bad(format!("id {:?}: 1 to 64 letters, digits, '-', '_' or '.'", self.id));
        }
        if self.target.is_empty() {
            return bad("target: give all, nodes or labels".into());
        }
        if self.plugins.is_empty() && self.settings.is_empty() {
            return bad("a deployment sets at least one plugin or setting".into());
        }
        for (slot, p) in &self.plugins {
            if !SLOTS.contains(&slot.as_str()) {
                return bad(format!("plugins.{slot}: unknown slot (router, auth, content-source)"));
            }
            if let Some(sha) = &p.sha256
                && !valid_sha256(sha)
            {
                return bad(format!("plugins.{slot}.sha256: 64 lower-case hex digits"));
            }
            if p.sha256.is_none() && p.config.is_none() {
                return bad(format!("plugins.{slot}: give a component, a config or both"));
            }
            if let Some(c) = &p.config
                && !c.is_object()
            {
                return bad(format!("plugins.{slot}.config: a JSON object"));
            }
        }
        for (key, value) in &self.settings {
            if !SETTINGS.contains(&key.as_str()) {
                return bad(format!(
                    "settings.{key}: not a setting that changes live ({})",
                    SETTINGS.join(", ")
                ));
            }
            if value.is_null() || value.is_object() || value.is_array() {
                return bad(format!("settings.{key}: a number, a string or a boolean"));
            }
        }
        let r = &self.rollout;
        if r.waves.is_empty() {
            return bad("rollout.waves: at least one wave".into());
        }
        r.boundaries(100)?;
        if !(0.0..=1.0).contains(&r.max_failure_rate) || r.max_failure_rate.is_nan() {
            return bad("rollout.max_failure_rate: 0 to 1".into());
        }
        if r.min_calls == 0 {
            return bad("rollout.min_calls: at least 1".into());
        }
        Ok(())
    }

    /// The components it needs, by hash.
    pub fn components(&self) -> impl Iterator<Item = &str> {
        self.plugins.values().filter_map(|p| p.sha256.as_deref())
    }

    /// A digest of what it sets (not of its rollout state), hex: a node
    /// that rolled a deployment back does not apply the same content again.
    pub fn digest(&self) -> String {
        let body = serde_json::json!({
            "plugins": self.plugins,
            "settings": self.settings,
        });
        sha256_hex(body.to_string().as_bytes())
    }
}

/// Where a rollout stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "kebab-case")]
pub enum Phase {
    /// Waves are being released.
    Rolling,
    /// Every wave is released.
    Complete,
    /// A node failed or rolled back: no further wave is released.
    Halted {
        /// Which node and why.
        reason: String,
    },
    /// Rolled back by the operator: every node returns to what it ran before.
    Withdrawn,
}

/// The document the owning node signs and sends down the tree.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Doc {
    /// What the operator asked for.
    pub spec: Spec,
    /// The node that owns it (and signed it).
    pub owner: String,
    /// Created, ms since the Unix epoch.
    pub created_ms: u64,
    /// Bumped at every change the owner signs (a wave, a halt, a withdrawal).
    pub revision: u64,
    /// The target resolved to node ids, in rollout order.
    pub nodes: Vec<String>,
    /// How many of `nodes` may apply it now.
    pub released: usize,
    /// Where the rollout stands.
    pub phase: Phase,
    /// Last change, ms since the Unix epoch.
    pub updated_ms: u64,
    /// After this time (ms since the Unix epoch) the document is stale: a
    /// node keeps running what it applied from it, reports it `expired`,
    /// and applies or imports it no more. The owner signs a new revision
    /// well before. Absent in documents signed before expiry existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_ms: Option<u64>,
    /// A tombstone: the owner deleted the deployment. The document stays
    /// (withdrawn) until it expires, so that no node takes an older
    /// revision of it again.
    #[serde(default, skip_serializing_if = "is_false")]
    pub deleted: bool,
}

impl Doc {
    /// True when the document is past its expiry at `now_ms`.
    pub fn expired(&self, now_ms: u64) -> bool {
        self.expires_ms.is_some_and(|e| now_ms >= e)
    }

    /// True when `node` may apply it now.
    pub fn releases(&self, node: &str) -> bool {
        self.phase != Phase::Withdrawn
            && self.nodes[..self.released.min(self.nodes.len())]
                .iter()
                .any(|n| n == node)
    }
}

/// A signed document as it travels and is stored: the exact JSON text
/// that was signed, and the signature.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signed {
    /// The [`Doc`] as JSON text.
    pub doc: String,
    /// TLS signature scheme code.
    pub scheme: u16,
    /// The signature, base64.
    pub signature: String,
    /// The signer's certificate chain, base64 DER.
    pub chain: Vec<String>,
}

/// A node's state for one deployment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NodeState {
    /// Released for the node, not applied yet (fetching components, or
    /// the node has not been reached).
    Pending,
    /// In force.
    Applied,
    /// Could not be applied; the node runs what it ran before.
    Failed,
    /// Applied, then undone: by the node (its plugin failed) or by the
    /// operator's rollback.
    RolledBack,
    /// Refused: bad signature, a signer that is not an ancestor, or a
    /// component whose bytes do not match its hash.
    Refused,
    /// A deployment of higher priority applies to the node.
    Superseded,
    /// The document expired before the node heard a newer revision: the
    /// node keeps running what it applied from it, and applies it no more.
    Expired,
}

impl NodeState {
    /// The kebab-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Pending => "pending",
            NodeState::Applied => "applied",
            NodeState::Failed => "failed",
            NodeState::RolledBack => "rolled-back",
            NodeState::Refused => "refused",
            NodeState::Superseded => "superseded",
            NodeState::Expired => "expired",
        }
    }
}

/// How a node is doing, reported with its state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    /// Calls to the deployed plugins since they were applied.
    pub calls: u64,
    /// Of which failed (trap, timeout, memory).
    pub failures: u64,
    /// The node's upstream link state (`up`, `down`, `root`...).
    pub link: String,
    /// Messages in its outbox.
    pub outbox_messages: u64,
}

/// What one node says about one deployment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// The deployment.
    pub deployment: String,
    /// Its revision the node had.
    pub revision: u64,
    /// The node.
    pub node: String,
    /// State.
    pub state: NodeState,
    /// When the state began, ms since the Unix epoch.
    pub since_ms: u64,
    /// When this report was made, ms since the Unix epoch.
    pub at_ms: u64,
    /// Plugin versions in force by slot (SHA-256), when applied.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub versions: BTreeMap<String, String>,
    /// Why it failed, was rolled back, refused or superseded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The node's health.
    #[serde(default)]
    pub health: Health,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waves_are_cumulative_and_end_with_everyone() {
        let r = |w: &[&str]| Rollout {
            waves: w.iter().map(|s| s.to_string()).collect(),
            ..Rollout::default()
        };
        assert_eq!(r(&["1", "10%", "100%"]).boundaries(34).unwrap(), [1, 4, 34]);
        assert_eq!(r(&["1", "10%"]).boundaries(5).unwrap(), [1, 5]);
        assert_eq!(r(&["100%"]).boundaries(3).unwrap(), [3]);
        assert_eq!(r(&["5"]).boundaries(3).unwrap(), [3]);
        assert_eq!(r(&["50%", "1"]).boundaries(10).unwrap(), [5, 10]);
        assert!(r(&["x"]).boundaries(3).is_err());
        assert!(r(&["120%"]).boundaries(3).is_err());
    }

    #[test]
    fn specs_are_checked() {
        let ok: Spec = serde_json::from_value(serde_json::json!({
            "id": "d1", "target": {"all": true},
            "plugins": {"router": {"config": {"routes": []}}},
            "settings": {"outbox.default_ttl_seconds": 60}
        }))
        .unwrap();
        ok.validate().unwrap();
        for (field, value) in [
            ("id", serde_json::json!("bad id")),
            ("target", serde_json::json!({})),
            ("plugins", serde_json::json!({"nope": {"config": {}}})),
            ("plugins", serde_json::json!({"router": {"sha256": "ABC"}})),
            ("settings", serde_json::json!({"node.id": "x"})),
            ("settings", serde_json::json!({"log.level": null})),
            ("rollout", serde_json::json!({"waves": []})),
            ("rollout", serde_json::json!({"max_failure_rate": 2.0})),
        ] {
            let mut v = serde_json::to_value(&ok).unwrap();
            v[field] = value.clone();
            let spec: Result<Spec, _> = serde_json::from_value(v);
            assert!(
                spec.map(|s| s.validate().is_err()).unwrap_or(true),
                "{field} = {value} was accepted"
            );
        }
        // The digest covers what is set, not the rollout.
        let mut other = ok.clone();
        other.rollout.soak_seconds = 1;
        assert_eq!(ok.digest(), other.digest());
        other.settings.insert("log.level".into(), "debug".into());
        assert_ne!(ok.digest(), other.digest());
    }
}
