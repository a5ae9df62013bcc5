//! Rollback and replay protection: the highest revision of every
//! deployment id this node has held, kept for good (the store writes it in
//! the same batch as the document), so that no older revision is taken
//! again, not even after a restart.

use std::collections::BTreeMap;

use crate::DeployError;
use crate::held::Held;

/// The highest revision seen by deployment id.
#[derive(Debug, Default)]
pub(crate) struct Revisions {
    seen: BTreeMap<String, u64>,
}

impl Revisions {
    /// What the store recorded, raised to the revisions of `held` (data
    /// directories from before `seen/` existed: what is held was seen).
    pub(crate) fn new<'a>(seen: BTreeMap<String, u64>, held: impl Iterator<Item = &'a Held>) -> Revisions {
        let mut r = Revisions { seen };
        for h in held {
            r.note(&h.doc.spec.id, h.doc.revision);
        }
        r
    }

    /// The highest revision seen of `id` (0: none).
    pub(crate) fn get(&self, id: &str) -> u64 {
        self.seen.get(id).copied().unwrap_or(0)
    }

    /// Records that revision `revision` of `id` was held.
    pub(crate) fn note(&mut self, id: &str, revision: u64) {
        let seen = self.seen.entry(id.to_string()).or_default();
        *seen = (*seen).max(revision);
    }

    /// Refuses a document older than what this node has held of the same
    /// id (as TUF and Uptane do), or another document under a revision
    /// already held (`held`: the document held now under that id). The
    /// same document again is fine: an idempotent import.
    ///
    /// # Errors
    /// [`DeployError::Refused`], saying why.
    pub(crate) fn check(&self, candidate: &Held, held: Option<&Held>) -> Result<(), DeployError> {
        let id = &candidate.doc.spec.id;
        let seen = self.get(id);
        if candidate.doc.revision < seen {
            return Err(DeployError::Refused(format!(
                "revision {} of {id:?} is older than revision {seen} seen here (a replayed or rolled-back document)",
                candidate.doc.revision
            )));
        }
        if let Some(held) = held.filter(|held| held.doc.revision == candidate.doc.revision)
            && held.signed != candidate.signed
        {
            return Err(DeployError::Refused(format!(
                "another document of {id:?} has revision {} already",
                candidate.doc.revision
            )));
        }
        Ok(())
    }
}
