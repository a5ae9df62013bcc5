//! Scope sync: the next hop towards an identity, a gateway's scope, and how a replica applies what its parent sends.

#[allow(unused_imports)]
use super::*;

impl Registry {
    /// Where traffic for identity `id` goes from this node: to a client
    /// connected here, or down to the child gateway on its parent chain.
    pub fn next_hop(&self, id: &str) -> Hop {
        let inner = self.read();
        let Some(mut cur) = inner.entries.get(id) else {
            return Hop::Unknown;
        };
        let mut hop = None;
        // Bounded: parent cycles are refused, but a replica trusts its parent.
        for _ in 0..64 {
            match cur.scope_parent() {
                Some(p) if p != self.node_id => match inner.entries.get(&p) {
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

    /// Every identity whose parent chain includes `gateway`, and the CAs.
    pub fn scope(&self, gateway: &str) -> Scope {
        let inner = self.read();
        let mut children: HashMap<String, Vec<&Entry>> = HashMap::new();
        for e in inner.entries.values() {
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
        let cas = inner
            .cas
            .values()
            .map(|c| {
                let mut c = c.clone();
                c.origin = Origin::Synced;
                (c.name.clone(), c)
            })
            .collect();
        Scope { entries: out, cas }
    }

    /// Replaces the synced part of a replica with `scope` (a full sync).
    /// Returns how many entries changed.
    ///
    /// # Errors
    /// Storage errors.
    pub fn apply_full(&self, parent: &str, scope: Scope) -> Result<usize, RegistryError> {
        let mut inner = self.write();
        let removals: Vec<String> = inner
            .entries
            .values()
            .filter(|e| e.origin == Origin::Synced && !scope.entries.contains_key(&e.id))
            .map(|e| e.id.clone())
            .collect();
        let upserts = changed(&inner, scope.entries.into_values());
        self.apply_synced(&mut inner, parent, true, upserts, removals, Some(scope.cas))
    }

    /// Applies an incremental change from the parent.
    ///
    /// # Errors
    /// Storage errors.
    pub fn apply_delta(&self, parent: &str, delta: Delta) -> Result<usize, RegistryError> {
        let mut inner = self.write();
        let removals: Vec<String> = delta
            .removed
            .into_iter()
            .filter(|id| inner.entries.get(id).is_some_and(|e| e.origin == Origin::Synced))
            .collect();
        let upserts = changed(&inner, delta.upserts.into_iter());
        self.apply_synced(&mut inner, parent, false, upserts, removals, delta.cas)
    }

    /// Commits what the parent sent, with the sync bookkeeping; returns how
    /// many identities changed.
    pub(crate) fn apply_synced(
        &self,
        inner: &mut Inner,
        parent: &str,
        full: bool,
        upserts: Vec<Entry>,
        removals: Vec<String>,
        cas: Option<BTreeMap<String, CaEntry>>,
    ) -> Result<usize, RegistryError> {
        let n = upserts.len() + removals.len();
        let now = holdfast_model::unix_ms();
        let mut sync = inner.sync.clone();
        sync.parent = Some(parent.to_string());
        sync.last_change_ms = Some(now);
        if full {
            sync.full_sync_ms = Some(now);
            sync.full_syncs += 1;
        } else {
            sync.deltas += 1;
        }
        let cas = cas.map(|cas| with_synced_cas(inner, cas));
        self.commit(
            inner,
            Change {
                upserts,
                removals,
                sync: Some(sync),
                cas,
            },
        )?;
        Ok(n)
    }
}

/// The CAs of `inner` with the synced ones replaced by `synced`.
pub(crate) fn with_synced_cas(inner: &Inner, synced: BTreeMap<String, CaEntry>) -> BTreeMap<String, CaEntry> {
    let mut cas: BTreeMap<String, CaEntry> = inner
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

/// Entries of `incoming` that differ from what `inner` holds, marked synced.
pub(crate) fn changed(inner: &Inner, incoming: impl Iterator<Item = Entry>) -> Vec<Entry> {
    incoming
        .map(|mut e| {
            e.origin = Origin::Synced;
            e
        })
        .filter(|e| inner.entries.get(&e.id) != Some(e))
        .collect()
}
