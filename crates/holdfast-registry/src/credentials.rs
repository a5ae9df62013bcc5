//! An identity's credentials: which kinds it has, its keys, and the
//! credentials a new identity gets from what the admin API was sent
//! (generated keys, checked thumbprints, a hashed password).

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::RegistryError;
use crate::edit::NewIdentity;
use crate::entry::Kind;

/// Bytes of a generated symmetric key.
const KEY_BYTES: usize = 32;

/// The credentials of an identity. Keys are base64 in the store and on the
/// wire, as IoT Hub shows them.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Credentials {
    /// Primary symmetric key, base64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sas_primary: Option<String>,
    /// Secondary symmetric key, base64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sas_secondary: Option<String>,
    /// Certificate thumbprints (SHA-256, lowercase hex): primary, secondary.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub thumbprints: Vec<String>,
    /// True when a certificate signed by a registered CA, naming the
    /// identity, is accepted.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub x509_ca: bool,
    /// Argon2 PHC password hash.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_hash: Option<String>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("kinds", &self.kinds())
            .finish_non_exhaustive()
    }
}

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

    /// The credentials of a new identity of `kind`: of the kind `new.auth`
    /// names, or by default `password` for users and when a password is
    /// given, `x509-thumbprint` when thumbprints are, else `sas` (keys
    /// generated when not given).
    pub(crate) fn for_new(kind: Kind, new: &NewIdentity) -> Result<Credentials, RegistryError> {
        let auth = new.auth.clone().unwrap_or_else(|| {
            match (
                kind,
                new.password.is_some() || new.password_hash.is_some(),
                new.thumbprints.is_empty(),
            ) {
                (Kind::User, _, _) | (_, true, _) => "password".to_string(),
                (_, _, false) => "x509-thumbprint".to_string(),
                _ => "sas".to_string(),
            }
        });
        let mut credentials = Credentials::default();
        match auth.as_str() {
            "sas" => {
                let primary = match &new.sas_primary {
                    Some(k) => k.clone(),
                    None => generate_key()?,
                };
                let secondary = match &new.sas_secondary {
                    Some(k) => k.clone(),
                    None => generate_key()?,
                };
                check_key(&primary, "sas_primary")?;
                check_key(&secondary, "sas_secondary")?;
                credentials.sas_primary = Some(primary);
                credentials.sas_secondary = Some(secondary);
            }
            "x509-thumbprint" => {
                if new.thumbprints.is_empty() || new.thumbprints.len() > 2 {
                    return Err(RegistryError::Invalid(
                        "x509-thumbprint needs one or two thumbprints (primary, secondary)".into(),
                    ));
                }
                for t in &new.thumbprints {
                    credentials.thumbprints.push(check_thumbprint(t)?);
                }
            }
            "x509-ca" => credentials.x509_ca = true,
            "password" => {
                credentials.password_hash = Some(match (&new.password, &new.password_hash) {
                    (Some(p), _) => {
                        if p.is_empty() {
                            return Err(RegistryError::Invalid("password is empty".into()));
                        }
                        holdfast_model::identity::hash_password(p)
                            .map_err(|e| RegistryError::Invalid(format!("cannot hash the password: {e}")))?
                    }
                    (None, Some(h)) => {
                        argon2::PasswordHash::new(h)
                            .map_err(|_| RegistryError::Invalid("password_hash is not a PHC hash".into()))?;
                        h.clone()
                    }
                    (None, None) => return Err(RegistryError::Invalid("auth password needs a password".into())),
                });
            }
            "none" => {}
            other => {
                return Err(RegistryError::Invalid(format!(
                    "auth {other:?} is not sas, x509-thumbprint, x509-ca, password or none"
                )));
            }
        }
        Ok(credentials)
    }
}

/// A fresh random symmetric key, base64.
///
/// # Errors
/// [`RegistryError::Invalid`] when the system has no randomness to give.
pub fn generate_key() -> Result<String, RegistryError> {
    let mut raw = [0u8; KEY_BYTES];
    holdfast_model::fill_random(&mut raw).map_err(|e| RegistryError::Invalid(format!("no randomness: {e}")))?;
    Ok(base64::engine::general_purpose::STANDARD.encode(raw))
}

fn check_key(k: &str, what: &str) -> Result<(), RegistryError> {
    match base64::engine::general_purpose::STANDARD.decode(k) {
        Ok(raw) if (16..=64).contains(&raw.len()) => Ok(()),
        Ok(_) => Err(RegistryError::Invalid(format!("{what} must be 16-64 bytes"))),
        Err(_) => Err(RegistryError::Invalid(format!("{what} is not base64"))),
    }
}

fn check_thumbprint(t: &str) -> Result<String, RegistryError> {
    let t = t.to_ascii_lowercase().replace(':', "");
    if t.len() != 64 || !t.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(RegistryError::Invalid(format!(
            "{t:?} is not a SHA-256 thumbprint (64 hex digits)"
        )));
    }
    Ok(t)
}
