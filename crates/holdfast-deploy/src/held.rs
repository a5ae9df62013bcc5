//! A signed document as a node holds it: the bytes as signed, and what
//! they say.

use std::collections::BTreeMap;

use base64::Engine as _;

use crate::DeployError;
use crate::model::{Doc, Signed};
use holdfast_tls::sign::Signature;

/// Signatures, chains and exported components travel as standard base64.
pub(crate) const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// A held document: as signed (what is stored and passed on) and parsed.
#[derive(Debug, Clone)]
pub(crate) struct Held {
    pub(crate) signed: Signed,
    pub(crate) doc: Doc,
}

/// Parses a signed document and its signature (not checked here).
///
/// # Errors
/// A document or signature that does not parse.
pub(crate) fn open_signed(signed: &Signed) -> Result<(Doc, Signature), DeployError> {
    let doc: Doc = serde_json::from_str(&signed.doc)?;
    let decode = |s: &str| B64.decode(s).map_err(|e| DeployError::Invalid(format!("base64: {e}")));
    let sig = Signature {
        scheme: signed.scheme,
        signature: decode(&signed.signature)?,
        chain: signed.chain.iter().map(|c| decode(c)).collect::<Result<_, _>>()?,
    };
    Ok((doc, sig))
}

/// The documents to store as received, with their revisions.
pub(crate) fn received_list(held: &BTreeMap<String, Held>) -> Vec<(String, Signed, u64)> {
    held.iter()
        .map(|(id, h)| (id.clone(), h.signed.clone(), h.doc.revision))
        .collect()
}
