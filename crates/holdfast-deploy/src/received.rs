//! The node role's documents: what the parent (or an import) sent, each
//! verified, kept so that a restart needs no parent, and the ancestors the
//! parent named.

use std::collections::{BTreeMap, BTreeSet};

use crate::DeployError;
use crate::held::{Held, open_signed, received_list};
use crate::metrics::DeployMetrics;
use crate::model::Phase;
use crate::owner::Owner;
use crate::revisions::Revisions;
use crate::store::DeployStore;

/// The documents received from above, and this node's ancestors.
pub(crate) struct Received {
    store: DeployStore,
    events: DeployMetrics,
    docs: BTreeMap<String, Held>,
    /// Nearest first.
    ancestors: Vec<String>,
}

impl Received {
    /// What is stored.
    ///
    /// # Errors
    /// Storage errors.
    pub(crate) fn open(store: DeployStore, events: DeployMetrics) -> Result<Received, DeployError> {
        let mut docs = BTreeMap::new();
        for signed in store.docs(false)? {
            match open_signed(&signed) {
                Ok((doc, _)) => {
                    docs.insert(doc.spec.id.clone(), Held { signed, doc });
                }
                Err(e) => tracing::error!(error = %e, "deploy: a stored deployment does not parse; skipped"),
            }
        }
        let ancestors = store.ancestors()?;
        Ok(Received {
            store,
            events,
            docs,
            ancestors,
        })
    }

    /// A received document.
    pub(crate) fn get(&self, id: &str) -> Option<&Held> {
        self.docs.get(id)
    }

    /// Every received document, by id.
    pub(crate) fn docs(&self) -> impl Iterator<Item = &Held> {
        self.docs.values()
    }

    /// The ids received.
    pub(crate) fn ids(&self) -> impl Iterator<Item = &String> {
        self.docs.keys()
    }

    /// The received documents, for tests to age.
    #[cfg(test)]
    pub(crate) fn docs_mut(&mut self) -> &mut BTreeMap<String, Held> {
        &mut self.docs
    }

    /// This node's ancestors as its parent named them, nearest first.
    pub(crate) fn ancestors(&self) -> &[String] {
        &self.ancestors
    }

    /// What is held under `id` here: received, else owned.
    fn held<'a>(&'a self, owner: &'a Owner, id: &str) -> Option<&'a Held> {
        self.docs.get(id).or_else(|| owner.get(id))
    }

    /// Checks a document from above against the revisions seen.
    ///
    /// # Errors
    /// [`DeployError::Refused`]: older than one held before.
    pub(crate) fn check(&self, candidate: &Held, seen: &Revisions, owner: &Owner) -> Result<(), DeployError> {
        seen.check(candidate, self.held(owner, &candidate.doc.spec.id))
    }

    /// Takes the parent's offer: `ancestors`, and the documents it sends,
    /// each verified already. Never an older revision than one held before:
    /// a parent (or a man in the middle) replaying an old document keeps
    /// the newer one here. Documents from before that it no longer sends
    /// are dropped. Answers whether what is held changed.
    ///
    /// # Errors
    /// Storage errors (nothing changed then).
    pub(crate) fn take_offer(
        &mut self,
        ancestors: Vec<String>,
        offered: BTreeMap<String, Held>,
        seen: &mut Revisions,
        owner: &Owner,
    ) -> Result<bool, DeployError> {
        let mut verified = BTreeMap::new();
        for (id, h) in offered {
            match self.check(&h, seen, owner) {
                Ok(()) => {
                    verified.insert(id, h);
                }
                Err(e) => {
                    self.events.count("refused-rollback");
                    tracing::warn!(deployment = %id, error = %e, "deploy: the parent offered an older revision; keeping the newer one");
                    if let Some(held) = self.docs.get(&id) {
                        verified.insert(id, held.clone());
                    }
                }
            }
        }
        let same = self.ancestors == ancestors
            && self.docs.len() == verified.len()
            && self
                .docs
                .iter()
                .all(|(id, h)| verified.get(id).is_some_and(|v| v.signed == h.signed));
        if same {
            return Ok(false);
        }
        self.store
            .replace_received(&received_list(&verified))
            .and_then(|()| self.store.set_ancestors(&ancestors))?;
        for h in verified.values() {
            seen.note(&h.doc.spec.id, h.doc.revision);
        }
        self.docs = verified;
        self.ancestors = ancestors;
        Ok(true)
    }

    /// Holds an imported document (verified, its components stored),
    /// checked again against the revisions seen.
    ///
    /// # Errors
    /// An older revision, or storage errors.
    pub(crate) fn import(&mut self, candidate: Held, seen: &mut Revisions, owner: &Owner) -> Result<(), DeployError> {
        // Checked again under the lock: an offer may have come meanwhile.
        if let Err(e) = self.check(&candidate, seen, owner) {
            self.events.count("refused-rollback");
            return Err(e);
        }
        let (id, revision) = (candidate.doc.spec.id.clone(), candidate.doc.revision);
        let mut docs = self.docs.clone();
        docs.insert(id.clone(), candidate);
        self.store.replace_received(&received_list(&docs))?;
        self.docs = docs;
        seen.note(&id, revision);
        Ok(())
    }

    /// Components the live received documents need and this node lacks.
    pub(crate) fn missing(&self) -> Vec<String> {
        let mut out = BTreeSet::new();
        for h in self.docs.values() {
            if h.doc.phase == Phase::Withdrawn {
                continue;
            }
            for s in h.doc.spec.components() {
                if !self.store.has_blob(s) {
                    out.insert(s.to_string());
                }
            }
        }
        out.into_iter().collect()
    }
}
