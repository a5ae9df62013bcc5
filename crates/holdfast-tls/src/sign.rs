//! Signing documents with a node's fleet key, and verifying them against
//! the fleet CA.
//!
//! A signature carries the signer's certificate chain. Verifying checks
//! that the chain leads to a fleet root, that the certificate is valid now
//! and issued for TLS client authentication (every fleet node certificate
//! is), and that its key made the signature; it answers with the node id
//! the certificate names. The schemes are those TLS 1.3 allows (ECDSA,
//! Ed25519, RSA-PSS), so any key `holdfast cert` or another fleet CA
//! issues can sign.

use std::path::Path;
use std::sync::Arc;

use rustls::SignatureScheme;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};

/// Why a signature could not be made or was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignError {
    /// The key or certificate cannot be used.
    #[error("signing key: {0}")]
    Key(String),
    /// No signer certificate came with the signature.
    #[error("the signature carries no certificate")]
    NoCertificate,
    /// The certificate does not chain to the fleet CA, or is not valid now.
    #[error("the signer's certificate is not trusted: {0}")]
    Untrusted(String),
    /// The certificate names no node.
    #[error("the signer's certificate names no node")]
    NoNodeId,
    /// A scheme this node does not verify.
    #[error("signature scheme {0:#06x} is not supported")]
    Scheme(u16),
    /// The signature does not match the content.
    #[error("the signature does not match the content")]
    Mismatch,
}

/// What a signer produced: the scheme, the signature and the signer's chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signature {
    /// TLS signature scheme code.
    pub scheme: u16,
    /// The signature.
    pub signature: Vec<u8>,
    /// The signer's certificate, then its issuers (DER).
    pub chain: Vec<Vec<u8>>,
}

const SCHEMES: &[SignatureScheme] = &[
    SignatureScheme::ECDSA_NISTP256_SHA256,
    SignatureScheme::ECDSA_NISTP384_SHA384,
    SignatureScheme::ED25519,
    SignatureScheme::RSA_PSS_SHA256,
];

/// A key that signs, with its certificate chain.
pub struct Signer {
    key: Arc<dyn rustls::sign::SigningKey>,
    chain: Vec<CertificateDer<'static>>,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("node", &self.node_id())
            .finish_non_exhaustive()
    }
}

impl Signer {
    /// The key in `key` with the chain in `cert` (PEM files).
    ///
    /// # Errors
    /// Unreadable files, or a key rustls cannot sign with.
    pub fn load(cert: &Path, key: &Path) -> Result<Signer, SignError> {
        let chain = crate::load_certs(cert).map_err(|e| SignError::Key(e.to_string()))?;
        let key = crate::load_key(key).map_err(|e| SignError::Key(e.to_string()))?;
        Signer::new(chain, key)
    }

    /// A signer from loaded material.
    ///
    /// # Errors
    /// A key rustls cannot sign with.
    pub fn new(chain: Vec<CertificateDer<'static>>, key: PrivateKeyDer<'static>) -> Result<Signer, SignError> {
        let key = crate::provider()
            .key_provider
            .load_private_key(key)
            .map_err(|e| SignError::Key(e.to_string()))?;
        if chain.is_empty() {
            return Err(SignError::NoCertificate);
        }
        Ok(Signer { key, chain })
    }

    /// The node id the signer's certificate names.
    pub fn node_id(&self) -> Option<String> {
        self.chain.first().and_then(|c| crate::node_id_of(c))
    }

    /// Signs `message`.
    ///
    /// # Errors
    /// The key supports none of the TLS 1.3 schemes, or signing fails.
    pub fn sign(&self, message: &[u8]) -> Result<Signature, SignError> {
        let signer = self
            .key
            .choose_scheme(SCHEMES)
            .ok_or_else(|| SignError::Key("the key supports no TLS 1.3 signature scheme".into()))?;
        let scheme = u16::from(signer.scheme());
        let signature = signer.sign(message).map_err(|e| SignError::Key(e.to_string()))?;
        Ok(Signature {
            scheme,
            signature,
            chain: self.chain.iter().map(|c| c.to_vec()).collect(),
        })
    }
}

/// Verifies signatures against a set of trusted roots (the fleet CA).
#[derive(Debug, Clone)]
pub struct Verifier {
    roots: Arc<rustls::RootCertStore>,
}

impl Verifier {
    /// Trusts `roots`.
    pub fn new(roots: Arc<rustls::RootCertStore>) -> Verifier {
        Verifier { roots }
    }

    /// Checks `sig` over `message`; answers with the node id of the signer.
    ///
    /// # Errors
    /// See [`SignError`].
    pub fn verify(&self, message: &[u8], sig: &Signature) -> Result<String, SignError> {
        let (end, rest) = sig.chain.split_first().ok_or(SignError::NoCertificate)?;
        let end = CertificateDer::from(end.as_slice());
        let intermediates: Vec<CertificateDer<'_>> = rest.iter().map(|c| CertificateDer::from(c.as_slice())).collect();
        let cert = webpki::EndEntityCert::try_from(&end).map_err(|e| SignError::Untrusted(format!("{e:?}")))?;
        let provider = crate::provider();
        let algs = provider.signature_verification_algorithms;
        cert.verify_for_usage(
            algs.all,
            &self.roots.roots,
            &intermediates,
            UnixTime::now(),
            webpki::KeyUsage::client_auth(),
            None,
            None,
        )
        .map_err(|e| SignError::Untrusted(format!("{e:?}")))?;
        let scheme = SignatureScheme::from(sig.scheme);
        if !SCHEMES.contains(&scheme) {
            return Err(SignError::Scheme(sig.scheme));
        }
        let candidates = algs
            .mapping
            .iter()
            .find(|(s, _)| *s == scheme)
            .map(|(_, a)| *a)
            .ok_or(SignError::Scheme(sig.scheme))?;
        if !candidates
            .iter()
            .any(|alg| cert.verify_signature(*alg, message, &sig.signature).is_ok())
        {
            return Err(SignError::Mismatch);
        }
        crate::node_id_of(&end).ok_or(SignError::NoNodeId)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_key_signs_and_the_fleet_ca_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, _) = crate::issue::ca(dir.path(), "Test fleet", 30, false).unwrap();
        let (cert, key) = crate::issue::node(dir.path(), dir.path(), "root", 30, false).unwrap();
        let signer = Signer::load(&cert, &key).unwrap();
        assert_eq!(signer.node_id().as_deref(), Some("root"));
        let sig = signer.sign(b"deployment body").unwrap();
        let verifier = Verifier::new(crate::load_roots(&ca).unwrap());
        assert_eq!(verifier.verify(b"deployment body", &sig).unwrap(), "root");
        // Another body, a flipped bit, no chain, another CA: refused.
        assert_eq!(verifier.verify(b"deployment bodY", &sig), Err(SignError::Mismatch));
        let mut bad = sig.clone();
        bad.signature[10] ^= 1;
        assert_eq!(verifier.verify(b"deployment body", &bad), Err(SignError::Mismatch));
        let mut none = sig.clone();
        none.chain.clear();
        assert_eq!(
            verifier.verify(b"deployment body", &none),
            Err(SignError::NoCertificate)
        );
        let other = tempfile::tempdir().unwrap();
        let (other_ca, _) = crate::issue::ca(other.path(), "Other fleet", 30, false).unwrap();
        let (c2, k2) = crate::issue::node(other.path(), other.path(), "root", 30, false).unwrap();
        let foreign = Signer::load(&c2, &k2).unwrap().sign(b"deployment body").unwrap();
        assert!(matches!(
            verifier.verify(b"deployment body", &foreign),
            Err(SignError::Untrusted(_))
        ));
        assert!(
            Verifier::new(crate::load_roots(&other_ca).unwrap())
                .verify(b"deployment body", &foreign)
                .is_ok()
        );
    }
}
