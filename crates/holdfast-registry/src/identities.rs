//! The identity table: every entry by id, and what follows from their
//! parent links: the next hop towards an identity, a gateway's scope, the
//! checks a new parent must pass, what a removal takes along.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

use crate::RegistryError;
use crate::entry::{Entry, IdentityConfig, Kind, Origin};

/// Where traffic for an identity goes from this node ([`crate::Registry::next_hop`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hop {
    /// The identity connects to this node.
    Here,
    /// Behind this child gateway.
    Child(String),
    /// Not in this node's registry.
    Unknown,
}

/// Every identity by id; `me` is this node's id (a parent that needs no entry).
pub(crate) struct Identities {
    me: String,
    entries: HashMap<String, Entry>,
}

impl Identities {
    pub(crate) fn new(me: &str, entries: HashMap<String, Entry>) -> Identities {
        Identities {
            me: me.to_string(),
            entries,
        }
    }

    pub(crate) fn get(&self, id: &str) -> Option<&Entry> {
        self.entries.get(id)
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// Every entry, sorted by id.
    pub(crate) fn list(&self) -> Vec<Entry> {
        let mut v: Vec<Entry> = self.entries.values().cloned().collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }

    /// How many identities of each kind (`devices`, `modules`, …).
    pub(crate) fn kinds(&self) -> BTreeMap<&'static str, usize> {
        let mut kinds = BTreeMap::new();
        for e in self.entries.values() {
            let k = match e.kind {
                Kind::Device => "devices",
                Kind::Module => "modules",
                Kind::Gateway => "gateways",
                Kind::User => "users",
            };
            *kinds.entry(k).or_default() += 1;
        }
        kinds
    }

    /// Where traffic for identity `id` goes from this node.
    pub(crate) fn next_hop(&self, id: &str) -> Hop {
        let Some(mut cur) = self.entries.get(id) else {
            return Hop::Unknown;
        };
        let mut hop = None;
        // Bounded: parent cycles are refused, but a replica trusts its parent.
        for _ in 0..64 {
            match cur.scope_parent() {
                Some(p) if p != self.me => match self.entries.get(&p) {
                    Some(e) => {
                        if e.kind == Kind::Gateway {
                            hop = Some(p);
                        }
                        cur = e;
                    }
                    None => break,
                },
                _ => break,
            }
        }
        hop.map_or(Hop::Here, Hop::Child)
    }

    /// Every identity whose parent chain includes `gateway`, marked synced.
    pub(crate) fn below(&self, gateway: &str) -> BTreeMap<String, Entry> {
        let mut children: HashMap<String, Vec<&Entry>> = HashMap::new();
        for e in self.entries.values() {
            if let Some(p) = e.scope_parent() {
                children.entry(p).or_default().push(e);
            }
        }
        let mut out = BTreeMap::new();
        let mut queue = VecDeque::from([gateway.to_string()]);
        let mut seen = HashSet::from([gateway.to_string()]);
        while let Some(id) = queue.pop_front() {
            for c in children.get(&id).into_iter().flatten() {
                if seen.insert(c.id.clone()) {
                    queue.push_back(c.id.clone());
                    let mut synced = (*c).clone();
                    synced.origin = Origin::Synced;
                    out.insert(c.id.clone(), synced);
                }
            }
        }
        out
    }

    /// Checks that `id` may have `parent`: this node, or a registered
    /// gateway that is not below `id`.
    pub(crate) fn check_parent(&self, id: &str, parent: &str) -> Result<(), RegistryError> {
        if parent == self.me {
            return Ok(());
        }
        let Some(p) = self.entries.get(parent) else {
            return Err(RegistryError::Invalid(format!("parent {parent:?} is not registered")));
        };
        if p.kind != Kind::Gateway {
            return Err(RegistryError::Invalid(format!("parent {parent:?} is not a gateway")));
        }
        // Walk up from the parent: meeting `id` would close a cycle.
        let mut at = Some(parent.to_string());
        let mut steps = 0;
        while let Some(cur) = at {
            if cur == id {
                return Err(RegistryError::Conflict(format!(
                    "{id} cannot be under {parent}: {parent} is below {id}"
                )));
            }
            steps += 1;
            if steps > 64 {
                break;
            }
            at = self.entries.get(&cur).and_then(Entry::scope_parent);
        }
        Ok(())
    }

    /// Checks that `entry` may be added: a new id, a valid parent, and for
    /// a module a registered device.
    pub(crate) fn check_new(&self, entry: &Entry) -> Result<(), RegistryError> {
        if self.entries.contains_key(&entry.id) {
            return Err(RegistryError::Exists(entry.id.clone()));
        }
        if let Some(p) = &entry.parent {
            self.check_parent(&entry.id, p)?;
        }
        if entry.kind == Kind::Module {
            let device = entry.id.split('/').next().unwrap_or_default();
            if !self.entries.contains_key(device) {
                return Err(RegistryError::Invalid(format!(
                    "module {:?}: device {device:?} is not registered",
                    entry.id
                )));
            }
        }
        Ok(())
    }

    /// The ids removing `id` removes (a device takes its modules along);
    /// refused while other identities have it as their parent.
    pub(crate) fn removal(&self, id: &str) -> Result<Vec<String>, RegistryError> {
        let Some(entry) = self.entries.get(id) else {
            return Err(RegistryError::NotFound(id.to_string()));
        };
        let mut removed = vec![id.to_string()];
        if entry.kind != Kind::Module {
            let prefix = format!("{id}/");
            removed.extend(
                self.entries
                    .values()
                    .filter(|e| e.kind == Kind::Module && e.id.starts_with(&prefix))
                    .map(|e| e.id.clone()),
            );
        }
        let mut children: Vec<&str> = self
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
        Ok(removed)
    }

    /// What `[[identities]]` changes: new ones and those the config still
    /// manages that differ (upserts), those it no longer lists (removals).
    /// Entries changed through the API are left alone.
    pub(crate) fn seeded(&self, identities: &[IdentityConfig]) -> (Vec<Entry>, Vec<String>) {
        let mut upserts = Vec::new();
        let mut listed = HashSet::new();
        for c in identities {
            listed.insert(c.id.as_str());
            let Some(entry) = Entry::from_config(c) else { continue };
            match self.entries.get(&c.id) {
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
        let removals: Vec<String> = self
            .entries
            .values()
            .filter(|e| e.origin == Origin::Config && !listed.contains(e.id.as_str()))
            .map(|e| e.id.clone())
            .collect();
        (upserts, removals)
    }

    /// Entries of `incoming` that differ from what is held, marked synced.
    pub(crate) fn changed(&self, incoming: impl Iterator<Item = Entry>) -> Vec<Entry> {
        incoming
            .map(|mut e| {
                e.origin = Origin::Synced;
                e
            })
            .filter(|e| self.entries.get(&e.id) != Some(e))
            .collect()
    }

    /// Synced entries for which `keep` is false.
    pub(crate) fn synced_except(&self, keep: impl Fn(&str) -> bool) -> Vec<String> {
        self.entries
            .values()
            .filter(|e| e.origin == Origin::Synced && !keep(&e.id))
            .map(|e| e.id.clone())
            .collect()
    }

    /// True when `id` is held and came from the parent.
    pub(crate) fn is_synced(&self, id: &str) -> bool {
        self.entries.get(id).is_some_and(|e| e.origin == Origin::Synced)
    }

    /// Ids of the identities that accept CA-signed certificates.
    pub(crate) fn ca_signed_ids(&self) -> impl Iterator<Item = String> + '_ {
        self.entries
            .values()
            .filter(|e| e.credentials.x509_ca)
            .map(|e| e.id.clone())
    }

    /// Applies stored upserts and removals; returns the ids whose
    /// connections must be dropped.
    pub(crate) fn apply(&mut self, upserts: Vec<Entry>, removals: Vec<String>) -> Vec<String> {
        let mut revoked = Vec::new();
        for e in upserts {
            if self.entries.get(&e.id).is_some_and(|old| old.revokes(Some(&e))) {
                revoked.push(e.id.clone());
            }
            self.entries.insert(e.id.clone(), e);
        }
        for id in removals {
            if self.entries.remove(&id).is_some() {
                revoked.push(id);
            }
        }
        revoked
    }
}
