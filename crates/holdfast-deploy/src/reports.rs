//! The report book: the latest report of every node about every deployment
//! held here (this node's own, and those its children send up), numbered
//! so that the link sends up only what is new.

use std::collections::{BTreeMap, BTreeSet};

use tokio::sync::watch;

use crate::DeployError;
use crate::model::{Doc, Health, NodeState, Report};
use crate::store::DeployStore;

/// Reports by `(deployment, node)`, each with the sequence number it was
/// recorded under. Every change is stored and announced.
pub(crate) struct ReportBook {
    node: String,
    store: DeployStore,
    entries: BTreeMap<(String, String), (u64, Report)>,
    seq: u64,
    changed: watch::Sender<u64>,
}

impl ReportBook {
    /// The reports stored for node `node`; changes are announced on
    /// `changed`.
    ///
    /// # Errors
    /// Storage errors.
    pub(crate) fn open(node: String, store: DeployStore, changed: watch::Sender<u64>) -> Result<Self, DeployError> {
        let mut book = ReportBook {
            node,
            store,
            entries: BTreeMap::new(),
            seq: 0,
            changed,
        };
        for r in book.store.reports()? {
            book.seq += 1;
            book.entries
                .insert((r.deployment.clone(), r.node.clone()), (book.seq, r));
        }
        Ok(book)
    }

    /// The last report of `node` about `deployment`.
    pub(crate) fn get(&self, deployment: &str, node: &str) -> Option<&Report> {
        self.entries
            .get(&(deployment.to_string(), node.to_string()))
            .map(|(_, r)| r)
    }

    /// This node's last report about `deployment`.
    pub(crate) fn mine(&self, deployment: &str) -> Option<&Report> {
        self.get(deployment, &self.node)
    }

    /// Records `r` (stored, numbered, announced).
    pub(crate) fn put(&mut self, r: Report) {
        self.seq += 1;
        if let Err(e) = self.store.put_reports(std::slice::from_ref(&r)) {
            tracing::error!(error = %e, "deploy: cannot store a report");
        }
        self.entries
            .insert((r.deployment.clone(), r.node.clone()), (self.seq, r));
        self.changed.send_modify(|v| *v += 1);
    }

    /// Records this node's state for `doc` (no-op when nothing changed).
    pub(crate) fn record(
        &mut self,
        doc: &Doc,
        state: NodeState,
        reason: Option<String>,
        versions: BTreeMap<String, String>,
    ) {
        let now = holdfast_model::unix_ms();
        let (health, since) = match self.mine(&doc.spec.id) {
            Some(old) if old.state == state && old.reason == reason && old.revision == doc.revision => {
                return;
            }
            Some(old) if old.state == state && old.reason == reason => (old.health.clone(), old.since_ms),
            _ => (Health::default(), now),
        };
        let r = Report {
            deployment: doc.spec.id.clone(),
            revision: doc.revision,
            node: self.node.clone(),
            state,
            since_ms: since,
            at_ms: now,
            versions,
            reason,
            health,
        };
        self.put(r);
    }

    /// Forgets every report of `deployment` (the store drops them with the
    /// document).
    pub(crate) fn forget(&mut self, deployment: &str) {
        self.entries.retain(|(d, _), _| d != deployment);
    }

    /// Drops (and unstores) the reports of deployments not in `known`.
    pub(crate) fn keep_only(&mut self, known: &BTreeSet<String>) {
        let stale: Vec<(String, String)> = self
            .entries
            .keys()
            .filter(|(d, _)| !known.contains(d))
            .cloned()
            .collect();
        for k in &stale {
            self.entries.remove(k);
        }
        let _ = self.store.remove_reports(&stale);
    }

    /// Reports recorded after sequence `since` whose deployment `send_up`
    /// accepts; answers the current sequence with them.
    pub(crate) fn since(&self, since: u64, send_up: impl Fn(&str) -> bool) -> (u64, Vec<Report>) {
        let out = self
            .entries
            .values()
            .filter(|(seq, r)| *seq > since && send_up(&r.deployment))
            .map(|(_, r)| r.clone())
            .collect();
        (self.seq, out)
    }

    /// Takes reports from below: each one `accept` lets through and that is
    /// not older than the one held is recorded; stored in one batch.
    pub(crate) fn take(&mut self, reports: Vec<Report>, accept: impl Fn(&Report) -> bool) {
        let mut fresh = Vec::new();
        for r in reports {
            if !accept(&r) {
                continue;
            }
            let key = (r.deployment.clone(), r.node.clone());
            if self.entries.get(&key).is_some_and(|(_, old)| old.at_ms > r.at_ms) {
                continue;
            }
            self.seq += 1;
            self.entries.insert(key, (self.seq, r.clone()));
            fresh.push(r);
        }
        if !fresh.is_empty() {
            if let Err(e) = self.store.put_reports(&fresh) {
                tracing::error!(error = %e, "deploy: cannot store reports");
            }
            self.changed.send_modify(|v| *v += 1);
        }
    }

    /// The deployments reported about.
    #[cfg(test)]
    pub(crate) fn deployments(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(|(d, _)| d.as_str())
    }
}
