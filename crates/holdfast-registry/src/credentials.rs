//! Credential kinds and keys of an entry.

#[allow(unused_imports)]
use super::*;

impl Credentials {
    /// The credential kinds present: `sas`, `x509-thumbprint`, `x509-ca`, `password`.
    pub fn kinds(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.sas_primary.is_some() || self.sas_secondary.is_some() {
            out.push("sas".to_string());
        }
        if !self.thumbprints.is_empty() {
            out.push("x509-thumbprint".to_string());
        }
        if self.x509_ca {
            out.push("x509-ca".to_string());
        }
        if self.password_hash.is_some() {
            out.push("password".to_string());
        }
        out
    }

    pub(crate) fn keys(&self) -> Vec<Vec<u8>> {
        let b64 = base64::engine::general_purpose::STANDARD;
        [&self.sas_primary, &self.sas_secondary]
            .into_iter()
            .flatten()
            .filter_map(|k| b64.decode(k).ok())
            .collect()
    }
}
