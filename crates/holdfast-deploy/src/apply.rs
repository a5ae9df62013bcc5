//! The node role's applied state: which deployment wins here, what is in
//! force, and the content this node failed or rolled back and will not
//! apply again. Applying itself is the host's ([`crate::Applier`]); this
//! decides and records.

use std::collections::BTreeMap;

use crate::metrics::DeployMetrics;
use crate::model::{Doc, NodeState, Phase};
use crate::reports::ReportBook;
use crate::store::{Applied, DeployStore};
use crate::{DeployError, Overlay, SlotOverlay};

/// A change of what this node runs, to hand to the applier.
pub(crate) struct Change {
    /// The deployment to run (`None`: the node's own config alone).
    pub(crate) chosen: Option<Doc>,
    /// Its overlay.
    pub(crate) overlay: Option<Overlay>,
    /// What ran before.
    pub(crate) previous: Option<Applied>,
}

/// What this node applied, and the content it refuses.
pub(crate) struct Applying {
    node: String,
    store: DeployStore,
    events: DeployMetrics,
    applied: Option<Applied>,
    /// Reasons by `(deployment, digest)`.
    bad: BTreeMap<(String, String), String>,
}

impl Applying {
    /// What is stored for node `node`.
    ///
    /// # Errors
    /// Storage errors.
    pub(crate) fn open(node: String, store: DeployStore, events: DeployMetrics) -> Result<Applying, DeployError> {
        Ok(Applying {
            node,
            applied: store.applied()?,
            bad: store.bad()?,
            store,
            events,
        })
    }

    /// What is in force.
    pub(crate) fn applied(&self) -> Option<&Applied> {
        self.applied.as_ref()
    }

    /// Content this node will not apply again: deployment, digest, reason.
    pub(crate) fn refused(&self) -> Vec<(String, String, String)> {
        self.bad
            .iter()
            .map(|((i, d), r)| (i.clone(), d.clone(), r.clone()))
            .collect()
    }

    fn is_bad(&self, doc: &Doc) -> bool {
        self.bad.contains_key(&(doc.spec.id.clone(), doc.spec.digest()))
    }

    /// Marks content bad: it is not applied again.
    pub(crate) fn mark_bad(&mut self, deployment: &str, digest: &str, reason: &str) {
        let _ = self.store.put_bad(deployment, digest, reason);
        self.bad
            .insert((deployment.to_string(), digest.to_string()), reason.to_string());
    }

    fn overlay_of(&self, doc: &Doc) -> Overlay {
        Overlay {
            deployment: doc.spec.id.clone(),
            plugins: doc
                .spec
                .plugins
                .iter()
                .map(|(slot, p)| {
                    (
                        slot.clone(),
                        SlotOverlay {
                            file: p.sha256.as_ref().map(|s| self.store.blob_path(s)),
                            sha256: p.sha256.clone(),
                            config: p.config.clone(),
                        },
                    )
                })
                .collect(),
            settings: doc.spec.settings.clone(),
        }
    }

    /// Decides which of the `held` documents this node runs: the released,
    /// unexpired (or running), not refused one with all its components
    /// here, of the highest priority. When that is what runs, keeps this
    /// node's reports true and answers `None`; else the change to apply.
    pub(crate) fn plan(&self, held: &[Doc], reports: &mut ReportBook, now: u64) -> Option<Change> {
        let current = self.applied.as_ref().map(|a| (a.deployment.clone(), a.digest.clone()));
        let running = |d: &Doc| {
            current
                .as_ref()
                .is_some_and(|(id, dg)| *id == d.spec.id && *dg == d.spec.digest())
        };
        let mine: Vec<&Doc> = held.iter().filter(|d| d.nodes.contains(&self.node)).collect();
        let released: Vec<&Doc> = mine
            .iter()
            .copied()
            .filter(|d| d.releases(&self.node) && !self.is_bad(d))
            .collect();
        // An expired document is applied no more; what runs keeps running.
        let (candidates, expired): (Vec<&Doc>, Vec<&Doc>) =
            released.iter().copied().partition(|d| !d.expired(now) || running(d));
        let ready = |d: &Doc| d.spec.components().all(|s| self.store.has_blob(s));
        let chosen = candidates
            .iter()
            .copied()
            .filter(|d| ready(d))
            .max_by(|a, b| {
                (a.spec.priority, a.created_ms, &a.spec.id).cmp(&(b.spec.priority, b.created_ms, &b.spec.id))
            })
            .cloned();
        let wanted = chosen.as_ref().map(|d| (d.spec.id.clone(), d.spec.digest()));
        if current != wanted {
            return Some(Change {
                overlay: chosen.as_ref().map(|d| self.overlay_of(d)),
                chosen,
                previous: self.applied.clone(),
            });
        }
        // Nothing to apply; keep the reports true.
        for d in &candidates {
            if Some(&d.spec.id) == chosen.as_ref().map(|c| &c.spec.id) {
                let versions = self.applied.as_ref().map(|a| a.versions.clone()).unwrap_or_default();
                if d.expired(now) {
                    let why = "the document expired; this node keeps running it until it hears a newer revision";
                    reports.record(d, NodeState::Expired, Some(why.into()), versions);
                } else {
                    reports.record(d, NodeState::Applied, None, versions);
                }
            } else if !ready(d) {
                reports.record(
                    d,
                    NodeState::Pending,
                    Some("fetching components".into()),
                    BTreeMap::new(),
                );
            } else if let Some(c) = &chosen {
                let why = format!("{} applies (priority {})", c.spec.id, c.spec.priority);
                reports.record(d, NodeState::Superseded, Some(why), BTreeMap::new());
            }
        }
        for d in &expired {
            let why = "the document expired before this node applied it";
            reports.record(d, NodeState::Expired, Some(why.into()), BTreeMap::new());
        }
        for d in &mine {
            if d.phase == Phase::Withdrawn
                && reports
                    .mine(&d.spec.id)
                    .is_some_and(|r| r.state == NodeState::Applied || r.state == NodeState::Pending)
            {
                reports.record(
                    d,
                    NodeState::RolledBack,
                    Some("withdrawn by the owner".into()),
                    BTreeMap::new(),
                );
            }
        }
        None
    }

    /// Records that `doc` was applied with `overlay`, the plugin versions
    /// in force `versions`.
    pub(crate) fn applied_now(&mut self, doc: &Doc, overlay: Overlay, versions: BTreeMap<String, String>) -> Applied {
        let applied = Applied {
            deployment: doc.spec.id.clone(),
            digest: doc.spec.digest(),
            revision: doc.revision,
            at_ms: holdfast_model::unix_ms(),
            overlay,
            versions,
        };
        if let Err(e) = self.store.set_applied(Some(&applied)) {
            tracing::error!(error = %e, "deploy: cannot record what was applied");
        }
        self.applied = Some(applied.clone());
        self.events.count("applied");
        tracing::info!(deployment = %doc.spec.id, revision = doc.revision, versions = ?applied.versions, "deploy: applied");
        applied
    }

    /// Records that the node runs its own config alone again.
    pub(crate) fn cleared(&mut self) {
        if let Err(e) = self.store.set_applied(None) {
            tracing::error!(error = %e, "deploy: cannot record what was applied");
        }
        self.applied = None;
        tracing::info!("deploy: back to this node's own config");
    }

    /// Records that `doc` could not be applied: it is not tried again.
    pub(crate) fn failed(&mut self, doc: &Doc, reason: &str, reports: &mut ReportBook) {
        self.events.count("failed");
        tracing::warn!(deployment = %doc.spec.id, %reason, "deploy: cannot apply; keeping what ran before");
        self.mark_bad(&doc.spec.id, &doc.spec.digest(), reason);
        reports.record(doc, NodeState::Failed, Some(reason.to_string()), BTreeMap::new());
    }

    /// Reports the deployment that stopped applying (`previous`), now that
    /// `now` runs.
    pub(crate) fn report_previous(
        &self,
        reports: &mut ReportBook,
        previous: Option<&Applied>,
        held: &[Doc],
        now: Option<&Doc>,
    ) {
        let Some(prev) = previous else { return };
        if now.is_some_and(|d| d.spec.id == prev.deployment) {
            return;
        }
        let Some(doc) = held.iter().find(|d| d.spec.id == prev.deployment) else {
            return;
        };
        if self.is_bad(doc) {
            return;
        }
        let (state, why) = match (&doc.phase, now) {
            (Phase::Withdrawn, _) => (NodeState::RolledBack, "withdrawn by the owner".to_string()),
            (_, Some(d)) => (
                NodeState::Superseded,
                format!("{} applies (priority {})", d.spec.id, d.spec.priority),
            ),
            (_, None) => (NodeState::RolledBack, "no longer released for this node".to_string()),
        };
        reports.record(doc, state, Some(why), BTreeMap::new());
    }
}
