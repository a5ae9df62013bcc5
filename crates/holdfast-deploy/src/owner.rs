//! The owner role: the deployments this node signs (its book of owned
//! documents), their rollout in waves through the gate, and their
//! revisions, signed again before they expire.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use base64::Engine as _;

use crate::DeployError;
use crate::held::{B64, Held, open_signed};
use crate::metrics::DeployMetrics;
use crate::model::{self, Doc, Phase, Signed, Spec};
use crate::reports::ReportBook;
use crate::revisions::Revisions;
use crate::rollout::{Gate, gate};
use crate::store::DeployStore;
use holdfast_registry::{Kind, Registry};
use holdfast_tls::sign::Signer;

/// The deployments this node owns, and how it signs and rolls them out.
pub(crate) struct Owner {
    node: String,
    registry: Arc<Registry>,
    store: DeployStore,
    events: DeployMetrics,
    signer: Option<Signer>,
    /// How long a signed revision stays valid.
    expiry_ms: u64,
    docs: BTreeMap<String, Held>,
    /// When the rollout was last looked at.
    last_tick_ms: u64,
    /// The registry version targets were last resolved at.
    resolved_at: Option<u64>,
}

/// Checks a spec and the components it names (stored here, intact), and
/// fills in their sizes. Reads the components: call it without the lock.
///
/// # Errors
/// An invalid spec or a component not stored here.
pub(crate) fn prepare(store: &DeployStore, mut spec: Spec) -> Result<Spec, DeployError> {
    spec.validate()?;
    for (slot, p) in spec.plugins.iter_mut() {
        if let Some(sha) = &p.sha256 {
            let path = store.blob_path(sha);
            let meta = std::fs::metadata(&path).map_err(|_| {
                DeployError::Invalid(format!(
                    "plugins.{slot}: component {sha} is not stored here; upload it first (POST /api/v1/deployments/components)"
                ))
            })?;
            store.read_blob(sha)?;
            p.size = meta.len();
        }
    }
    Ok(spec)
}

/// The gateways (and `me`) a target names, in rollout order: by id, `me`
/// last.
///
/// # Errors
/// A listed node that is not a gateway known here.
pub(crate) fn resolve(registry: &Registry, me: &str, target: &model::Target) -> Result<Vec<String>, DeployError> {
    let mut out = BTreeSet::new();
    let gateways: BTreeMap<String, BTreeMap<String, String>> = registry
        .list()
        .into_iter()
        .filter(|e| e.kind == Kind::Gateway && e.enabled && e.id != me)
        .map(|e| (e.id, e.labels))
        .collect();
    for n in &target.nodes {
        if n != me && !gateways.contains_key(n) {
            return Err(DeployError::Invalid(format!(
                "target node {n:?} is not an enabled gateway in this node's registry"
            )));
        }
    }
    for (id, labels) in &gateways {
        let by_labels = !target.labels.is_empty() && target.labels.iter().all(|(k, v)| labels.get(k) == Some(v));
        if target.all || target.nodes.contains(id) || by_labels {
            out.insert(id.clone());
        }
    }
    let mut nodes: Vec<String> = out.into_iter().collect();
    if target.all || target.nodes.iter().any(|n| n == me) {
        nodes.push(me.to_string());
    }
    Ok(nodes)
}

impl Owner {
    /// The owned documents stored for node `node`.
    ///
    /// # Errors
    /// Storage errors.
    pub(crate) fn open(
        node: String,
        registry: Arc<Registry>,
        store: DeployStore,
        events: DeployMetrics,
        signer: Option<Signer>,
        expiry_seconds: u64,
    ) -> Result<Owner, DeployError> {
        let mut docs = BTreeMap::new();
        for signed in store.docs(true)? {
            match open_signed(&signed) {
                Ok((doc, _)) => {
                    docs.insert(doc.spec.id.clone(), Held { signed, doc });
                }
                Err(e) => tracing::error!(error = %e, "deploy: a stored deployment does not parse; skipped"),
            }
        }
        Ok(Owner {
            node,
            registry,
            store,
            events,
            signer,
            expiry_ms: expiry_seconds.saturating_mul(1000),
            docs,
            last_tick_ms: 0,
            resolved_at: None,
        })
    }

    /// Whether this node can sign (own) deployments.
    pub(crate) fn can_sign(&self) -> bool {
        self.signer.is_some()
    }

    /// An owned document (a tombstone too).
    pub(crate) fn get(&self, id: &str) -> Option<&Held> {
        self.docs.get(id)
    }

    /// Whether this node owns `id`.
    pub(crate) fn owns(&self, id: &str) -> bool {
        self.docs.contains_key(id)
    }

    /// Every owned document, by id.
    pub(crate) fn docs(&self) -> impl Iterator<Item = &Held> {
        self.docs.values()
    }

    /// The owned documents, for tests to age.
    #[cfg(test)]
    pub(crate) fn docs_mut(&mut self) -> &mut BTreeMap<String, Held> {
        &mut self.docs
    }

    /// Makes the next [`Owner::tick`] run whenever it is called.
    #[cfg(test)]
    pub(crate) fn tick_now(&mut self) {
        self.last_tick_ms = 0;
    }

    fn sign(&self, doc: &Doc) -> Result<Signed, DeployError> {
        let signer = self.signer.as_ref().ok_or_else(|| {
            DeployError::Conflict(
                "this node has no signing key: set fleet.cert and fleet.key, or deploy.signing_cert and deploy.signing_key"
                    .into(),
            )
        })?;
        let text = serde_json::to_string(doc)?;
        let sig = signer
            .sign(text.as_bytes())
            .map_err(|e| DeployError::Conflict(e.to_string()))?;
        Ok(Signed {
            doc: text,
            scheme: sig.scheme,
            signature: B64.encode(&sig.signature),
            chain: sig.chain.iter().map(|c| B64.encode(c)).collect(),
        })
    }

    /// Creates a deployment of `spec` (checked by [`prepare`]) and releases
    /// its first wave.
    ///
    /// # Errors
    /// An id in use, a target that matches no node, no signing key.
    pub(crate) fn create(
        &mut self,
        spec: Spec,
        seen: &mut Revisions,
        reports: &mut ReportBook,
    ) -> Result<Doc, DeployError> {
        if self.docs.get(&spec.id).is_some_and(|h| !h.doc.deleted) {
            return Err(DeployError::Conflict(format!("deployment {:?} exists", spec.id)));
        }
        let nodes = resolve(&self.registry, &self.node, &spec.target)?;
        if nodes.is_empty() {
            return Err(DeployError::Invalid("the target matches no node".into()));
        }
        let first = spec.rollout.boundaries(nodes.len())?[0];
        let now = holdfast_model::unix_ms();
        let doc = Doc {
            owner: self.node.clone(),
            created_ms: now,
            // Numbered, dated and given its expiry when signed: one past any
            // revision seen of the id (a deleted deployment's tombstone, or
            // one held from above), so nodes take it as newer.
            revision: 0,
            expires_ms: None,
            deleted: false,
            released: first,
            phase: if first >= nodes.len() {
                Phase::Complete
            } else {
                Phase::Rolling
            },
            nodes,
            updated_ms: now,
            spec,
        };
        // Reports of an earlier deployment under this id go.
        let doc = self.resign(doc, true, seen, reports)?;
        self.events.count("created");
        tracing::info!(deployment = %doc.spec.id, nodes = doc.nodes.len(), released = doc.released, "deploy: created");
        Ok(doc)
    }

    /// Withdraws a live owned deployment: every node returns to what it ran
    /// before it. `delete`: what stays is a signed tombstone (a withdrawn,
    /// deleted revision) until it expires, so that no node takes an older
    /// revision again; its reports go. Answers `None` when `id` is not a
    /// live deployment owned here.
    ///
    /// # Errors
    /// Signing and storage errors.
    pub(crate) fn withdraw(
        &mut self,
        id: &str,
        delete: bool,
        seen: &mut Revisions,
        reports: &mut ReportBook,
    ) -> Result<Option<Doc>, DeployError> {
        let Some(held) = self.docs.get(id).filter(|h| !h.doc.deleted) else {
            return Ok(None);
        };
        let mut doc = held.doc.clone();
        doc.phase = Phase::Withdrawn;
        doc.deleted = delete;
        let doc = self.resign(doc, delete, seen, reports)?;
        self.events.count(if delete { "deleted" } else { "withdrawn" });
        Ok(Some(doc))
    }

    /// Signs a new revision of an owned document (one past its own and any
    /// seen), valid for the expiry from now, stores and holds it.
    /// `drop_reports`: its reports go (a deletion, or a new deployment).
    fn resign(
        &mut self,
        mut doc: Doc,
        drop_reports: bool,
        seen: &mut Revisions,
        reports: &mut ReportBook,
    ) -> Result<Doc, DeployError> {
        doc.revision = doc.revision.max(seen.get(&doc.spec.id)) + 1;
        let now = holdfast_model::unix_ms();
        doc.updated_ms = now;
        doc.expires_ms = Some(now.saturating_add(self.expiry_ms));
        let signed = self.sign(&doc)?;
        self.store
            .put_owned(&doc.spec.id, &signed, doc.revision, drop_reports)?;
        seen.note(&doc.spec.id, doc.revision);
        if drop_reports {
            reports.forget(&doc.spec.id);
        }
        self.docs.insert(
            doc.spec.id.clone(),
            Held {
                signed,
                doc: doc.clone(),
            },
        );
        Ok(doc)
    }

    /// Releases waves and halts rollouts, follows registry changes in
    /// targets, signs documents again before they expire and drops expired
    /// tombstones. Runs at most about once a second; answers whether a
    /// document changed.
    pub(crate) fn tick(&mut self, seen: &mut Revisions, reports: &mut ReportBook) -> bool {
        let now = holdfast_model::unix_ms();
        if now.saturating_sub(self.last_tick_ms) < 900 {
            return false;
        }
        self.last_tick_ms = now;
        // Targets follow the registry: resolve again only when it changed.
        let version = *self.registry.changes().borrow();
        let registry_changed = self.resolved_at != Some(version);
        self.resolved_at = Some(version);
        let docs: Vec<Doc> = self.docs.values().map(|h| h.doc.clone()).collect();
        let mut changed = false;
        for doc in docs {
            if matches!(doc.phase, Phase::Withdrawn) {
                // A tombstone goes once it expired: every older revision
                // has expired by then too.
                if doc.deleted && doc.expired(now) {
                    match self.store.remove_owned(&doc.spec.id) {
                        Ok(()) => {
                            self.docs.remove(&doc.spec.id);
                            changed = true;
                        }
                        Err(e) => tracing::error!(error = %e, "deploy: cannot remove an expired tombstone"),
                    }
                }
                continue;
            }
            if let Some(doc) = self.advance(doc, registry_changed, reports, now) {
                match self.resign(doc, false, seen, reports) {
                    Ok(_) => changed = true,
                    Err(e) => tracing::error!(error = %e, "deploy: cannot sign a rollout change"),
                }
            }
        }
        changed
    }

    /// What a live document becomes now: `None` when it stays as signed.
    fn advance(&self, mut doc: Doc, registry_changed: bool, reports: &ReportBook, now: u64) -> Option<Doc> {
        // A live document is signed again when half its validity has
        // passed (and documents signed before expiry existed get one).
        let mut dirty = doc
            .expires_ms
            .is_none_or(|e| e.saturating_sub(now) < self.expiry_ms / 2);
        // Follow the registry: new gateways that match join at the end.
        if let Some(Ok(now_nodes)) = registry_changed.then(|| resolve(&self.registry, &self.node, &doc.spec.target)) {
            let released: Vec<String> = doc.nodes[..doc.released.min(doc.nodes.len())].to_vec();
            let mut nodes: Vec<String> = doc.nodes.iter().filter(|n| now_nodes.contains(n)).cloned().collect();
            for n in &now_nodes {
                if !nodes.contains(n) {
                    nodes.push(n.clone());
                }
            }
            if nodes != doc.nodes {
                doc.released = nodes.iter().filter(|n| released.contains(n)).count();
                if doc.phase == Phase::Complete {
                    doc.released = nodes.len();
                }
                doc.nodes = nodes;
                dirty = true;
            }
        }
        if doc.phase == Phase::Rolling {
            match gate(reports, &doc, now) {
                Gate::Wait(_) => {}
                Gate::Halt(reason) => {
                    tracing::warn!(deployment = %doc.spec.id, %reason, "deploy: rollout halted");
                    self.events.count("halted");
                    doc.phase = Phase::Halted { reason };
                    dirty = true;
                }
                Gate::Pass => {
                    let bounds = doc.spec.rollout.boundaries(doc.nodes.len()).unwrap_or_default();
                    let next = bounds
                        .into_iter()
                        .find(|b| *b > doc.released)
                        .unwrap_or(doc.nodes.len());
                    doc.released = next;
                    if next >= doc.nodes.len() {
                        doc.phase = Phase::Complete;
                    }
                    tracing::info!(deployment = %doc.spec.id, released = next, of = doc.nodes.len(), "deploy: next wave released");
                    self.events.count("wave-released");
                    dirty = true;
                }
            }
        }
        dirty.then_some(doc)
    }
}
