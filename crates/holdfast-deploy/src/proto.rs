//! The deployment messages of the link (`holdfast-link/3`), JSON in DEPLOY
//! frames on the deploy stream the child opens. Component bytes follow a
//! [`Msg::Component`] as raw BLOB frames.
//!
//! - parent → child: [`Msg::Offer`] on connect and at every change: this
//!   node and its ancestors, and every signed deployment that concerns the
//!   child's subtree; then the components the child asks for.
//! - child → parent: [`Msg::Hello`] first; [`Msg::Fetch`] for each missing
//!   component, one at a time; [`Msg::Reports`] with its own and its
//!   subtree's states, all of them on connect, then each change;
//!   [`Msg::Fleet`] with the fleet view's rows (to a parent that announces
//!   the `fleet` feature), all of them on connect, then what changed, at
//!   most once per `deploy.fleet_report_seconds`.

use serde::{Deserialize, Serialize};

use crate::model::{NodeState, Report, Signed};

/// What this version understands beyond `holdfast-link/3` as first
/// released, said in [`Msg::Offer`]: `expired`, the [`NodeState::Expired`]
/// state in reports (a parent that does not say it gets such reports as
/// `applied` (or `pending`) with the reason `expired: …`); `fleet`, the
/// [`Msg::Fleet`] message (a parent that does not say it gets none).
pub const FEATURES: &[&str] = &["expired", "fleet"];

/// Largest DEPLOY frame.
pub const MAX_FRAME: usize = 4 << 20;
/// Component bytes per BLOB frame.
pub const CHUNK: usize = 256 << 10;

/// A deployment message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum Msg {
    /// Child → parent: the first message.
    Hello,
    /// Parent → child: what concerns the child's subtree.
    Offer {
        /// The parent, then its ancestors.
        ancestors: Vec<String>,
        /// Signed deployments.
        deployments: Vec<Signed>,
        /// What the parent understands (see [`FEATURES`]); absent from
        /// parents of before.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        features: Vec<String>,
    },
    /// Child → parent: send this component.
    Fetch {
        /// Its SHA-256.
        sha256: String,
    },
    /// Parent → child: the component follows in BLOB frames.
    Component {
        /// Its SHA-256.
        sha256: String,
        /// Its size, bytes.
        size: u64,
    },
    /// Parent → child: the component is not here (yet); ask again later.
    Missing {
        /// Its SHA-256.
        sha256: String,
    },
    /// Child → parent: node states.
    Reports {
        /// Reports.
        reports: Vec<Report>,
    },
    /// Child → parent: rows of the fleet view that changed (`fleet`
    /// feature), and nodes an operator removed from it.
    Fleet {
        /// Rows.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        rows: Vec<crate::fleet::FleetRow>,
        /// Nodes forgotten.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        forgotten: Vec<String>,
    },
}

/// Reports as a parent understands them: for one that does not know the
/// `expired` state, an expired deployment the node still runs is `applied`
/// and one it never applied `pending`, with the reason `expired: …`.
pub fn for_parent(mut reports: Vec<Report>, parent_features: &[String]) -> Vec<Report> {
    if parent_features.iter().any(|f| f == "expired") {
        return reports;
    }
    for r in &mut reports {
        if r.state == NodeState::Expired {
            r.state = if r.versions.is_empty() {
                NodeState::Pending
            } else {
                NodeState::Applied
            };
            r.reason = Some(format!("expired: {}", r.reason.take().unwrap_or_default()));
        }
    }
    reports
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_parent_of_before_reads_offers_and_gets_no_expired_state() {
        // An offer with features parses as the same message without them.
        let offer = Msg::Offer {
            ancestors: vec!["root".into()],
            deployments: vec![],
            features: FEATURES.iter().map(|f| f.to_string()).collect(),
        };
        let text = serde_json::to_string(&offer).unwrap();
        let old: Msg = serde_json::from_str(r#"{"type":"offer","ancestors":["root"],"deployments":[]}"#).unwrap();
        assert!(matches!(old, Msg::Offer { ref features, .. } if features.is_empty()));
        assert!(text.contains("\"features\":[\"expired\",\"fleet\"]"));
        let r = Report {
            deployment: "d1".into(),
            revision: 1,
            node: "gw1".into(),
            state: NodeState::Expired,
            since_ms: 0,
            at_ms: 0,
            versions: [("router".to_string(), "abc".to_string())].into(),
            reason: Some("the document expired".into()),
            health: Default::default(),
        };
        let old = for_parent(vec![r.clone()], &[]);
        assert_eq!(old[0].state, NodeState::Applied);
        assert_eq!(old[0].reason.as_deref(), Some("expired: the document expired"));
        assert!(!serde_json::to_string(&old).unwrap().contains("\"expired\""));
        let new = for_parent(vec![r], &["expired".to_string()]);
        assert_eq!(new[0].state, NodeState::Expired);
    }
}
