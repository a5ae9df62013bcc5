//! Changes at the owning node: seeding from the config, adding, changing and removing identities and CAs.

#[allow(unused_imports)]
use super::*;

impl Registry {
    /// Applies `[[identities]]` from the config: adds new ones, updates
    /// those the config still manages, removes those it no longer lists.
    /// Entries changed through the API are left alone.
    ///
    /// # Errors
    /// Storage errors.
    pub fn seed(&self, identities: &[IdentityConfig]) -> Result<usize, RegistryError> {
        let mut inner = self.write();
        let mut upserts = Vec::new();
        let mut listed = HashSet::new();
        for c in identities {
            listed.insert(c.id.as_str());
            let Some(entry) = Entry::from_config(c) else { continue };
            match inner.entries.get(&c.id) {
                None => upserts.push(entry),
                Some(old) if old.origin == Origin::Config => {
                    let same = Entry {
                        updated_ms: old.updated_ms,
                        ..entry.clone()
                    };
                    if &same != old {
                        upserts.push(entry);
                    }
                }
                Some(_) => {}
            }
        }
        let removals: Vec<String> = inner
            .entries
            .values()
            .filter(|e| e.origin == Origin::Config && !listed.contains(e.id.as_str()))
            .map(|e| e.id.clone())
            .collect();
        let n = upserts.len() + removals.len();
        self.commit(&mut inner, Change::entries(upserts, removals))?;
        Ok(n)
    }

    /// Adds an identity (owner only). Returns it with its generated keys.
    ///
    /// # Errors
    /// Invalid values, an existing id, a missing or wrong parent.
    pub fn add(&self, new: NewIdentity) -> Result<Entry, RegistryError> {
        self.owner_only()?;
        let kind = match new.kind.as_deref() {
            None => {
                if new.id.contains('/') {
                    Kind::Module
                } else {
                    Kind::Device
                }
            }
            Some(k) => Kind::parse(k)
                .ok_or_else(|| RegistryError::Invalid(format!("kind {k:?} is not device, module, gateway or user")))?,
        };
        check_id(&new.id, kind)?;
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
                let primary = match new.sas_primary {
                    Some(k) => k,
                    None => generate_key()?,
                };
                let secondary = match new.sas_secondary {
                    Some(k) => k,
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
                credentials.password_hash = Some(match (new.password, new.password_hash) {
                    (Some(p), _) => {
                        if p.is_empty() {
                            return Err(RegistryError::Invalid("password is empty".into()));
                        }
                        holdfast_model::identity::hash_password(&p)
                            .map_err(|e| RegistryError::Invalid(format!("cannot hash the password: {e}")))?
                    }
                    (None, Some(h)) => {
                        argon2::PasswordHash::new(&h)
                            .map_err(|_| RegistryError::Invalid("password_hash is not a PHC hash".into()))?;
                        h
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
        let mut inner = self.write();
        if inner.entries.contains_key(&new.id) {
            return Err(RegistryError::Exists(new.id));
        }
        if let Some(p) = &new.parent {
            check_parent(&inner.entries, &self.node_id, &new.id, p)?;
        }
        if kind == Kind::Module {
            let device = new.id.split('/').next().unwrap_or_default();
            if !inner.entries.contains_key(device) {
                return Err(RegistryError::Invalid(format!(
                    "module {:?}: device {device:?} is not registered",
                    new.id
                )));
            }
        }
        let entry = Entry {
            id: new.id,
            kind,
            parent: new.parent,
            enabled: new.enabled.unwrap_or(true),
            credentials,
            origin: Origin::Api,
            updated_ms: holdfast_model::unix_ms(),
            labels: check_labels(new.labels)?,
        };
        self.commit(&mut inner, Change::entries(vec![entry.clone()], Vec::new()))?;
        Ok(entry)
    }

    pub(crate) fn modify(
        &self,
        id: &str,
        f: impl FnOnce(&HashMap<String, Entry>, &mut Entry) -> Result<(), RegistryError>,
    ) -> Result<Entry, RegistryError> {
        self.owner_only()?;
        let mut inner = self.write();
        let mut entry = inner
            .entries
            .get(id)
            .cloned()
            .ok_or_else(|| RegistryError::NotFound(id.to_string()))?;
        f(&inner.entries, &mut entry)?;
        entry.origin = Origin::Api;
        entry.updated_ms = holdfast_model::unix_ms();
        self.commit(&mut inner, Change::entries(vec![entry.clone()], Vec::new()))?;
        Ok(entry)
    }

    /// Enables or disables an identity.
    ///
    /// # Errors
    /// Unknown id, a replica, storage.
    pub fn set_enabled(&self, id: &str, enabled: bool) -> Result<Entry, RegistryError> {
        self.modify(id, |_, e| {
            e.enabled = enabled;
            Ok(())
        })
    }

    /// Replaces an identity's labels.
    ///
    /// # Errors
    /// Unknown id, a bad label, a replica, storage.
    pub fn set_labels(&self, id: &str, labels: BTreeMap<String, String>) -> Result<Entry, RegistryError> {
        let labels = check_labels(labels)?;
        self.modify(id, |_, e| {
            e.labels = labels;
            Ok(())
        })
    }

    /// Moves an identity under another gateway (or to no parent).
    ///
    /// # Errors
    /// Unknown ids, a parent that is not a gateway, a cycle.
    pub fn set_parent(&self, id: &str, parent: Option<String>) -> Result<Entry, RegistryError> {
        let me = self.node_id.clone();
        self.modify(id, |entries, e| {
            if let Some(p) = &parent {
                check_parent(entries, &me, id, p)?;
            }
            e.parent = parent;
            Ok(())
        })
    }

    /// Replaces symmetric keys with fresh random ones.
    ///
    /// # Errors
    /// Unknown id, an identity without SAS keys.
    pub fn rotate_key(&self, id: &str, which: WhichKey) -> Result<Entry, RegistryError> {
        let primary = generate_key()?;
        let secondary = generate_key()?;
        self.modify(id, |_, e| {
            if e.credentials.sas_primary.is_none() && e.credentials.sas_secondary.is_none() {
                return Err(RegistryError::Conflict(format!("{id} has no symmetric keys to rotate")));
            }
            if matches!(which, WhichKey::Primary | WhichKey::Both) {
                e.credentials.sas_primary = Some(primary);
            }
            if matches!(which, WhichKey::Secondary | WhichKey::Both) {
                e.credentials.sas_secondary = Some(secondary);
            }
            Ok(())
        })
    }

    /// Removes an identity, and the modules of a device.
    ///
    /// # Errors
    /// Unknown id; identities still have it as their parent.
    pub fn remove(&self, id: &str) -> Result<Vec<String>, RegistryError> {
        self.owner_only()?;
        let mut inner = self.write();
        let Some(entry) = inner.entries.get(id) else {
            return Err(RegistryError::NotFound(id.to_string()));
        };
        let mut removed = vec![id.to_string()];
        if entry.kind != Kind::Module {
            let prefix = format!("{id}/");
            removed.extend(
                inner
                    .entries
                    .values()
                    .filter(|e| e.kind == Kind::Module && e.id.starts_with(&prefix))
                    .map(|e| e.id.clone()),
            );
        }
        let mut children: Vec<&str> = inner
            .entries
            .values()
            .filter(|e| e.parent.as_deref() == Some(id) && !removed.contains(&e.id))
            .map(|e| e.id.as_str())
            .collect();
        if !children.is_empty() {
            children.sort_unstable();
            return Err(RegistryError::Conflict(format!(
                "{id} is the parent of {}; move or remove them first",
                children.join(", ")
            )));
        }
        self.commit(&mut inner, Change::entries(Vec::new(), removed.clone()))?;
        Ok(removed)
    }

    /// Registers a CA for `x509-ca` identities.
    ///
    /// # Errors
    /// A bad name, a PEM without exactly one CA certificate, an existing name.
    pub fn add_ca(&self, name: &str, pem: &str) -> Result<CaEntry, RegistryError> {
        self.owner_only()?;
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
        let ca = CaEntry {
            name: name.to_string(),
            pem: pem.to_string(),
            thumbprint: holdfast_tls::describe_cert(cert).0,
            subject: parsed.subject().to_string(),
            origin: Origin::Api,
            added_ms: holdfast_model::unix_ms(),
        };
        let mut inner = self.write();
        if inner.cas.contains_key(name) {
            return Err(RegistryError::Exists(format!("CA {name}")));
        }
        let mut cas = inner.cas.clone();
        cas.insert(name.to_string(), ca.clone());
        self.commit(
            &mut inner,
            Change {
                cas: Some(cas),
                ..Change::default()
            },
        )?;
        Ok(ca)
    }

    /// Removes a CA; identities that relied on it are disconnected.
    ///
    /// # Errors
    /// Unknown name, storage.
    pub fn remove_ca(&self, name: &str) -> Result<(), RegistryError> {
        self.owner_only()?;
        let mut inner = self.write();
        if !inner.cas.contains_key(name) {
            return Err(RegistryError::NotFound(format!("CA {name}")));
        }
        let mut cas = inner.cas.clone();
        cas.remove(name);
        self.commit(
            &mut inner,
            Change {
                cas: Some(cas),
                ..Change::default()
            },
        )
    }
}

/// Labels: at most 32, names of letters, digits, `-`, `_`, `.` and `/` (1
/// to 63 bytes), values of at most 255 bytes.
pub(crate) fn check_labels(labels: BTreeMap<String, String>) -> Result<BTreeMap<String, String>, RegistryError> {
    if labels.len() > 32 {
        return Err(RegistryError::Invalid("at most 32 labels".into()));
    }
    for (k, v) in &labels {
        let name_ok =
            !k.is_empty() && k.len() <= 63 && k.chars().all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c));
        if !name_ok {
            return Err(RegistryError::Invalid(format!(
                "label name {k:?}: 1 to 63 letters, digits, '-', '_', '.' or '/'"
            )));
        }
        if v.len() > 255 || v.chars().any(char::is_control) {
            return Err(RegistryError::Invalid(format!(
                "label {k:?}: the value is longer than 255 bytes or has control characters"
            )));
        }
    }
    Ok(labels)
}
