//! The owner's rollout gate: whether the next wave of a deployment may be
//! released, judged from the reports of the waves released so far.

use crate::model::{Doc, NodeState};
use crate::reports::ReportBook;

/// What the gate says.
pub(crate) enum Gate {
    /// Not yet: why.
    Wait(String),
    /// The next wave may go.
    Pass,
    /// Stop the rollout: why.
    Halt(String),
}

/// Whether the next wave of `doc` may be released: every node of the
/// released waves applied it, ran it for the soak time, and (when it sets
/// plugins) saw `min_calls` calls to them, unless the rollout releases
/// without traffic; a failed, rolled-back or refused node halts it.
pub(crate) fn gate(reports: &ReportBook, doc: &Doc, now: u64) -> Gate {
    let rollout = &doc.spec.rollout;
    let needs_traffic = !doc.spec.plugins.is_empty() && !rollout.release_without_traffic;
    let mut wait = None;
    for node in &doc.nodes[..doc.released.min(doc.nodes.len())] {
        let Some(r) = reports.get(&doc.spec.id, node) else {
            wait.get_or_insert_with(|| format!("{node} has not reported"));
            continue;
        };
        match r.state {
            NodeState::Failed | NodeState::RolledBack | NodeState::Refused => {
                return Gate::Halt(format!(
                    "{node}: {}: {}",
                    r.state.as_str(),
                    r.reason.clone().unwrap_or_default()
                ));
            }
            NodeState::Superseded => {}
            NodeState::Pending | NodeState::Expired => {
                wait.get_or_insert_with(|| format!("{node} is {}", r.state.as_str()));
            }
            NodeState::Applied => {
                let h = &r.health;
                if h.calls >= rollout.min_calls && h.failures as f64 > rollout.max_failure_rate * h.calls as f64 {
                    return Gate::Halt(format!("{node}: {} of {} plugin calls failed", h.failures, h.calls));
                }
                if needs_traffic && h.calls < rollout.min_calls {
                    wait.get_or_insert_with(|| {
                        format!(
                            "{node} has seen {} of the {} plugin calls min_calls asks for (or set release_without_traffic)",
                            h.calls, rollout.min_calls
                        )
                    });
                } else if r.since_ms + rollout.soak_seconds * 1000 > now {
                    wait.get_or_insert_with(|| format!("{node} is soaking"));
                }
            }
        }
    }
    match wait {
        Some(why) => Gate::Wait(why),
        None => Gate::Pass,
    }
}
