//! Deployments as the admin API lists them: the document and the state of
//! every node of its target.

use std::collections::BTreeSet;

use serde::Serialize;

use crate::held::Held;
use crate::model::{Doc, Phase, Report};
use crate::reports::ReportBook;
use crate::rollout::{Gate, gate};

/// A deployment as listed: its document and the state of every node.
#[derive(Debug, Clone, Serialize)]
pub struct View {
    /// The document.
    #[serde(flatten)]
    pub doc: Doc,
    /// Whether this node owns it.
    pub owned: bool,
    /// Every node of the target, in rollout order, with its last report.
    pub node_states: Vec<NodeView>,
    /// At the owner, while rolling: what the next wave waits for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub waiting: Option<String>,
}

/// One node of a deployment's target.
#[derive(Debug, Clone, Serialize)]
pub struct NodeView {
    /// Node id.
    pub node: String,
    /// Released for it.
    pub released: bool,
    /// Its state: its last report's, `pending` when released and not
    /// reported, `waiting` when its wave is not released yet.
    pub state: String,
    /// The last report, if any.
    pub report: Option<Report>,
}

impl View {
    /// The view of `h` with the reports of `reports`.
    pub(crate) fn of(reports: &ReportBook, h: &Held, owned: bool) -> View {
        let d = &h.doc;
        let released: BTreeSet<&String> = d.nodes[..d.released.min(d.nodes.len())].iter().collect();
        let node_states = d
            .nodes
            .iter()
            .map(|n| {
                let report = reports.get(&d.spec.id, n).cloned();
                let rel = released.contains(n);
                let state = match (&report, rel) {
                    (Some(r), _) => r.state.as_str().to_string(),
                    (None, true) => "pending".to_string(),
                    (None, false) => "waiting".to_string(),
                };
                NodeView {
                    node: n.clone(),
                    released: rel,
                    state,
                    report,
                }
            })
            .collect();
        let waiting = match (&d.phase, owned) {
            (Phase::Rolling, true) => match gate(reports, d, holdfast_model::unix_ms()) {
                Gate::Wait(why) => Some(why),
                _ => None,
            },
            _ => None,
        };
        View {
            doc: d.clone(),
            owned,
            node_states,
            waiting,
        }
    }
}
