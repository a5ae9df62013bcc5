//! # holdfast-tls
//!
//! TLS material shared by the MQTT listeners, the QUIC link and the bridge:
//! PEM loading, and the fleet certificates `holdfast cert` issues (rcgen).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// A certificate or key file that could not be used.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}")]
pub struct PemError {
    /// The file.
    pub path: PathBuf,
    /// What is wrong.
    pub message: String,
}

fn pem_err(path: &Path, e: impl std::fmt::Display) -> PemError {
    PemError {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

/// Every certificate in a PEM file (at least one).
///
/// # Errors
/// Unreadable file, bad PEM, or no certificate.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, PemError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem_err(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_err(path, e))?;
    if certs.is_empty() {
        return Err(pem_err(path, "no certificate in the file"));
    }
    Ok(certs)
}

/// The private key in a PEM file.
///
/// # Errors
/// Unreadable file or no key.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, PemError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| pem_err(path, e))
}

/// A root store holding every certificate of a PEM file.
///
/// # Errors
/// As [`load_certs`], or a certificate that cannot be a trust anchor.
pub fn load_roots(path: &Path) -> Result<Arc<rustls::RootCertStore>, PemError> {
    let mut roots = rustls::RootCertStore::empty();
    for c in load_certs(path)? {
        roots.add(c).map_err(|e| pem_err(path, e))?;
    }
    Ok(Arc::new(roots))
}

/// The crypto provider every TLS configuration uses.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The node id a fleet certificate was issued for: its first DNS subject
/// alternative name, else its common name.
pub fn node_id_of(der: &[u8]) -> Option<String> {
    cert_names(der).into_iter().next()
}

/// The names a certificate is issued for: its DNS subject alternative names,
/// then its subject common names. Empty if it does not parse.
pub fn cert_names(der: &[u8]) -> Vec<String> {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(d) = n {
                out.push((*d).to_string());
            }
        }
    }
    out.extend(
        cert.subject()
            .iter_common_name()
            .filter_map(|cn| cn.as_str().ok().map(str::to_string)),
    );
    out
}

/// Fleet certificate issuance for `holdfast cert`.
/// SHA-256 thumbprint (lowercase hex) and common name of a client certificate.
pub fn describe_cert(der: &[u8]) -> (String, Option<String>) {
    let thumbprint = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(der));
    let cn = x509_parser::parse_x509_certificate(der).ok().and_then(|(_, cert)| {
        cert.subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_string)
    });
    (thumbprint, cn)
}

pub mod sign;

pub mod issue {
    use std::path::{Path, PathBuf};

    use rcgen::{
        BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
        KeyUsagePurpose,
    };

    /// What went wrong issuing a certificate.
    #[derive(Debug, thiserror::Error)]
    pub enum IssueError {
        /// A file could not be read or written.
        #[error("{path}: {source}")]
        Io {
            /// The file.
            path: PathBuf,
            /// The I/O error.
            source: std::io::Error,
        },
        /// rcgen refused.
        #[error("certificate: {0}")]
        Rcgen(#[from] rcgen::Error),
        /// The file would be overwritten and `--force` was not given.
        #[error("{0} exists (use --force to replace it)")]
        Exists(PathBuf),
        /// The node id cannot be a certificate name.
        #[error("{0:?} is not usable as a node id in a certificate (letters, digits, '-', '.')")]
        BadName(String),
    }

    fn io(path: &Path) -> impl FnOnce(std::io::Error) -> IssueError + '_ {
        move |source| IssueError::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    fn validity(days: u32) -> (time::OffsetDateTime, time::OffsetDateTime) {
        let now = time::OffsetDateTime::now_utc() - time::Duration::minutes(5);
        (now, now + time::Duration::days(i64::from(days)))
    }

    /// Writes `text` to `path`, readable by the owner only when `secret`.
    fn write(path: &Path, text: &str, secret: bool, force: bool) -> Result<(), IssueError> {
        if path.exists() && !force {
            return Err(IssueError::Exists(path.to_path_buf()));
        }
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        if secret {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let _ = secret;
        let mut f = options.open(path).map_err(io(path))?;
        std::io::Write::write_all(&mut f, text.as_bytes()).map_err(io(path))?;
        f.sync_all().map_err(io(path))?;
        Ok(())
    }

    /// Creates a fleet CA in `dir`: `ca.pem` and `ca.key` (mode 0600).
    /// Returns the two paths.
    ///
    /// # Errors
    /// The files exist (without `force`), or cannot be written.
    pub fn ca(dir: &Path, name: &str, days: u32, force: bool) -> Result<(PathBuf, PathBuf), IssueError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        dn.push(DnType::OrganizationName, "Holdfast fleet");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        (params.not_before, params.not_after) = validity(days);
        let cert = params.self_signed(&key)?;
        let (cert_path, key_path) = (dir.join("ca.pem"), dir.join("ca.key"));
        if cert_path.exists() && !force {
            return Err(IssueError::Exists(cert_path));
        }
        write(&key_path, &key.serialize_pem(), true, force)?;
        write(&cert_path, &cert.pem(), false, force)?;
        Ok((cert_path, key_path))
    }

    /// Issues a node certificate for `node_id`, signed by the CA in
    /// `ca_dir`, into `out_dir`: `<node_id>.pem` (certificate, then the CA)
    /// and `<node_id>.key` (mode 0600). It names the node as DNS subject
    /// alternative name and common name, and is good for both ends of a
    /// link (server and client authentication).
    ///
    /// # Errors
    /// Missing or unreadable CA, a bad name, or files that exist.
    pub fn node(
        ca_dir: &Path,
        out_dir: &Path,
        node_id: &str,
        days: u32,
        force: bool,
    ) -> Result<(PathBuf, PathBuf), IssueError> {
        if node_id.is_empty()
            || node_id.len() > 63
            || !node_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
            || rustls::pki_types::ServerName::try_from(node_id).is_err()
        {
            return Err(IssueError::BadName(node_id.to_string()));
        }
        let ca_cert_path = ca_dir.join("ca.pem");
        let ca_key_path = ca_dir.join("ca.key");
        let ca_pem = std::fs::read_to_string(&ca_cert_path).map_err(io(&ca_cert_path))?;
        let ca_key = KeyPair::from_pem(&std::fs::read_to_string(&ca_key_path).map_err(io(&ca_key_path))?)?;
        let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key)?;
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(vec![node_id.to_string()])?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, node_id);
        params.distinguished_name = dn;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        (params.not_before, params.not_after) = validity(days);
        let cert = params.signed_by(&key, &issuer)?;
        std::fs::create_dir_all(out_dir).map_err(io(out_dir))?;
        let (cert_path, key_path) = (
            out_dir.join(format!("{node_id}.pem")),
            out_dir.join(format!("{node_id}.key")),
        );
        if cert_path.exists() && !force {
            return Err(IssueError::Exists(cert_path));
        }
        write(&key_path, &key.serialize_pem(), true, force)?;
        write(&cert_path, &format!("{}{}", cert.pem(), ca_pem), false, force)?;
        Ok((cert_path, key_path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_node_certificates_name_the_node_and_chain_to_the_ca() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, ca_key) = issue::ca(dir.path(), "Test fleet", 30, false).unwrap();
        assert!(matches!(
            issue::ca(dir.path(), "Test fleet", 30, false),
            Err(issue::IssueError::Exists(_))
        ));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&ca_key).unwrap().permissions().mode() & 0o777, 0o600);
        }
        let (cert, key) = issue::node(dir.path(), dir.path(), "gw-1", 30, false).unwrap();
        let chain = load_certs(&cert).unwrap();
        assert_eq!(chain.len(), 2);
        assert_eq!(node_id_of(&chain[0]).as_deref(), Some("gw-1"));
        load_key(&key).unwrap();
        // The chain verifies against the CA as a server named gw-1.
        let roots = load_roots(&ca).unwrap();
        use rustls::client::danger::ServerCertVerifier as _;
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider())
            .build()
            .unwrap();
        let name = rustls::pki_types::ServerName::try_from("gw-1").unwrap();
        let now = rustls::pki_types::UnixTime::now();
        verifier
            .verify_server_cert(&chain[0], &chain[1..], &name, &[], now)
            .unwrap();
        let other = rustls::pki_types::ServerName::try_from("gw-2").unwrap();
        assert!(verifier.verify_server_cert(&chain[0], &[], &other, &[], now).is_err());
        assert!(matches!(
            issue::node(dir.path(), dir.path(), "bad name", 30, false),
            Err(issue::IssueError::BadName(_))
        ));
    }
}
