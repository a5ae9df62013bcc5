//! The CA store (the CAs device certificates may be signed by, and the
//! verifier built from them) and the certificate chains clients presented
//! on TLS, which `x509-ca` identities are checked against.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::ClientCertVerifier;
use serde::{Deserialize, Serialize};

use crate::RegistryError;
use crate::entry::{Origin, check_part};

/// How many client certificates presented on TLS are remembered for
/// registered-CA checks.
const PRESENTED_CERTS: usize = 4096;

/// A CA that device certificates may be signed by.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaEntry {
    /// Name.
    pub name: String,
    /// The CA certificate, PEM.
    pub pem: String,
    /// SHA-256 thumbprint of the certificate.
    pub thumbprint: String,
    /// Subject, for people.
    pub subject: String,
    /// Where it came from.
    pub origin: Origin,
    /// When it was added, ms since the Unix epoch.
    pub added_ms: u64,
}

impl CaEntry {
    /// A CA added through the API: `pem` must hold exactly one CA
    /// certificate.
    pub(crate) fn parse(name: &str, pem: &str) -> Result<CaEntry, RegistryError> {
        check_part(name, "CA name")?;
        let certs: Vec<CertificateDer<'static>> = rustls::pki_types::pem::PemObject::pem_slice_iter(pem.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(|e| RegistryError::Invalid(format!("not a PEM certificate: {e}")))?;
        let [cert] = certs.as_slice() else {
            return Err(RegistryError::Invalid(format!(
                "expected one certificate, found {}",
                certs.len()
            )));
        };
        let (_, parsed) = x509_parser::parse_x509_certificate(cert)
            .map_err(|e| RegistryError::Invalid(format!("not an X.509 certificate: {e}")))?;
        if !parsed.is_ca() {
            return Err(RegistryError::Invalid(
                "the certificate is not a CA (basicConstraints)".into(),
            ));
        }
        Ok(CaEntry {
            name: name.to_string(),
            pem: pem.to_string(),
            thumbprint: holdfast_tls::describe_cert(cert).0,
            subject: parsed.subject().to_string(),
            origin: Origin::Api,
            added_ms: holdfast_model::unix_ms(),
        })
    }
}

/// The registered CAs by name, and a verifier of client certificates
/// against them (rebuilt whenever they change).
pub(crate) struct CaStore {
    cas: BTreeMap<String, CaEntry>,
    verifier: Option<Arc<dyn ClientCertVerifier>>,
}

impl CaStore {
    pub(crate) fn new(cas: BTreeMap<String, CaEntry>) -> CaStore {
        let verifier = build_verifier(&cas);
        CaStore { cas, verifier }
    }

    /// The CAs by name.
    pub(crate) fn all(&self) -> &BTreeMap<String, CaEntry> {
        &self.cas
    }

    /// The CAs with `ca` added.
    pub(crate) fn with(&self, ca: CaEntry) -> Result<BTreeMap<String, CaEntry>, RegistryError> {
        if self.cas.contains_key(&ca.name) {
            return Err(RegistryError::Exists(format!("CA {}", ca.name)));
        }
        let mut cas = self.cas.clone();
        cas.insert(ca.name.clone(), ca);
        Ok(cas)
    }

    /// The CAs without `name`.
    pub(crate) fn without(&self, name: &str) -> Result<BTreeMap<String, CaEntry>, RegistryError> {
        if !self.cas.contains_key(name) {
            return Err(RegistryError::NotFound(format!("CA {name}")));
        }
        let mut cas = self.cas.clone();
        cas.remove(name);
        Ok(cas)
    }

    /// The CAs with the synced ones replaced by `synced` (a replica's own
    /// CAs stay).
    pub(crate) fn with_synced(&self, synced: BTreeMap<String, CaEntry>) -> BTreeMap<String, CaEntry> {
        let mut cas: BTreeMap<String, CaEntry> = self
            .cas
            .iter()
            .filter(|(_, c)| c.origin != Origin::Synced)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        cas.extend(synced.into_iter().map(|(k, mut c)| {
            c.origin = Origin::Synced;
            (k, c)
        }));
        cas
    }

    /// Replaces the set (already stored). True when a CA was removed: the
    /// identities that relied on it lose their connections.
    pub(crate) fn replace(&mut self, cas: BTreeMap<String, CaEntry>) -> bool {
        let removed = self.cas.keys().any(|n| !cas.contains_key(n));
        self.verifier = build_verifier(&cas);
        self.cas = cas;
        removed
    }

    /// The verifier, when there are CAs.
    pub(crate) fn verifier(&self) -> Option<Arc<dyn ClientCertVerifier>> {
        self.verifier.clone()
    }
}

/// True when `chain` (end entity first) chains to a CA `verifier` trusts
/// and names `id` (common name or DNS name).
pub(crate) fn signed_for(verifier: &dyn ClientCertVerifier, chain: &[CertificateDer<'static>], id: &str) -> bool {
    let Some((end, intermediates)) = chain.split_first() else {
        return false;
    };
    if verifier
        .verify_client_cert(end, intermediates, UnixTime::now())
        .is_err()
    {
        return false;
    }
    holdfast_tls::cert_names(end).iter().any(|n| n == id)
}

fn build_verifier(cas: &BTreeMap<String, CaEntry>) -> Option<Arc<dyn ClientCertVerifier>> {
    if cas.is_empty() {
        return None;
    }
    let mut roots = rustls::RootCertStore::empty();
    for ca in cas.values() {
        for cert in rustls::pki_types::pem::PemObject::pem_slice_iter(ca.pem.as_bytes()).flatten() {
            let _ = roots.add(cert);
        }
    }
    rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), holdfast_tls::provider())
        .build()
        .map_err(|e| tracing::warn!(error = %e, "registry: cannot build the CA verifier"))
        .ok()
}

/// The certificate chains clients presented on TLS, by thumbprint: the
/// last [`PRESENTED_CERTS`] of them.
#[derive(Default)]
pub(crate) struct Presented {
    chains: Mutex<Chains>,
}

/// Chains by thumbprint, and their arrival order.
type Chains = (HashMap<String, Vec<CertificateDer<'static>>>, VecDeque<String>);

impl Presented {
    /// Remembers a chain, forgetting the oldest beyond the limit.
    pub(crate) fn remember(&self, thumbprint: &str, chain: Vec<CertificateDer<'static>>) {
        let mut p = self.chains.lock().unwrap_or_else(|e| e.into_inner());
        let (map, order) = &mut *p;
        if map.insert(thumbprint.to_string(), chain).is_none() {
            order.push_back(thumbprint.to_string());
            while order.len() > PRESENTED_CERTS {
                if let Some(old) = order.pop_front() {
                    map.remove(&old);
                }
            }
        }
    }

    /// The chain presented with `thumbprint`.
    pub(crate) fn chain(&self, thumbprint: &str) -> Option<Vec<CertificateDer<'static>>> {
        let p = self.chains.lock().unwrap_or_else(|e| e.into_inner());
        p.0.get(thumbprint).cloned()
    }
}
