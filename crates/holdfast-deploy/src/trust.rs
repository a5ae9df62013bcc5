//! Which documents from above a node takes: signed by their owner, under
//! the fleet CA, the owner an ancestor of this node. Holds no state; the
//! check runs without the deployer's lock.

use crate::DeployError;
use crate::held::{Held, open_signed};
use crate::model::{Doc, Signed};
use holdfast_tls::sign::Verifier;

/// Checks documents that come from above (the parent, or an import).
pub(crate) struct Trust {
    node: String,
    verifier: Option<Verifier>,
}

impl Trust {
    /// For node `node`, checking against `verifier` (the fleet CA); without
    /// one, every document is refused.
    pub(crate) fn new(node: String, verifier: Option<Verifier>) -> Trust {
        Trust { node, verifier }
    }

    /// Checks a signed document from above: signed by its owner, the owner
    /// one of `ancestors` (and not this node), its spec valid.
    ///
    /// # Errors
    /// [`DeployError::Refused`] for a signature or an owner not trusted
    /// here; [`DeployError::Invalid`] for a document that does not parse.
    pub(crate) fn verify(&self, signed: &Signed, ancestors: &[String]) -> Result<Doc, DeployError> {
        let (doc, sig) = open_signed(signed)?;
        let verifier = self
            .verifier
            .as_ref()
            .ok_or_else(|| DeployError::Refused("this node has no fleet CA (fleet.ca) to check signatures".into()))?;
        let signer = verifier
            .verify(signed.doc.as_bytes(), &sig)
            .map_err(|e| DeployError::Refused(e.to_string()))?;
        if signer != doc.owner {
            return Err(DeployError::Refused(format!(
                "signed by {signer} but owned by {}",
                doc.owner
            )));
        }
        if doc.owner == self.node || !ancestors.contains(&doc.owner) {
            return Err(DeployError::Refused(format!(
                "owned by {}, which is not an ancestor of {} (a node deploys only to its own subtree)",
                doc.owner, self.node
            )));
        }
        doc.spec.validate()?;
        Ok(doc)
    }

    /// [`Trust::verify`], answering the document as held.
    ///
    /// # Errors
    /// As [`Trust::verify`].
    pub(crate) fn hold(&self, signed: Signed, ancestors: &[String]) -> Result<Held, DeployError> {
        let doc = self.verify(&signed, ancestors)?;
        Ok(Held { signed, doc })
    }
}
