//! Certificates presented on the listeners and CA-signed identities.

#[allow(unused_imports)]
use super::*;

impl Registry {
    /// Remembers the certificate chain a TLS client presented, so that
    /// `verify_thumbprint` can check an `x509-ca` identity's certificate
    /// against the registered CAs.
    pub fn presented(&self, thumbprint: &str, chain: Vec<CertificateDer<'static>>) {
        let mut p = self.presented.lock().unwrap_or_else(|e| e.into_inner());
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

    /// True when the certificate with `thumbprint`, presented on TLS, chains
    /// to a registered CA and names `id` (common name or DNS name).
    pub(crate) fn ca_signed(&self, id: &str, thumbprint: &str) -> bool {
        let Some(verifier) = self.read().ca_verifier.clone() else {
            return false;
        };
        let chain = {
            let p = self.presented.lock().unwrap_or_else(|e| e.into_inner());
            p.0.get(thumbprint).cloned()
        };
        let Some((end, intermediates)) = chain.as_ref().and_then(|c| c.split_first()) else {
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
}

pub(crate) fn build_ca_verifier(
    cas: &BTreeMap<String, CaEntry>,
) -> Option<Arc<dyn rustls::server::danger::ClientCertVerifier>> {
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
