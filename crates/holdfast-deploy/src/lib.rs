//! # holdfast-deploy
//!
//! Fleet deployments: plugin components, plugin configs and live settings
//! that an owning node (the root, or a gateway for its own subtree) sends
//! down the tree, signed, in waves, with a health gate between waves.
//!
//! - [`model`]: the spec an operator writes, the signed document, reports.
//! - [`store`]: the fjall space `deploy` and the component files.
//! - [`Deployer`]: one per node. At the owner it signs deployments,
//!   resolves their target and releases waves; at every node it verifies
//!   what the parent sends, keeps it (so a restart needs no parent),
//!   applies the deployment that wins through an [`Applier`] (the host's
//!   swap and reload path), watches the deployed plugins and rolls back by
//!   itself when they fail, and reports its state up the tree.
//!
//! The link carries [`proto::Msg`] between a parent and a child
//! (`holdfast-link/3`); this crate does not touch the network.

pub mod config;
pub mod model;
pub mod proto;
pub mod store;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::{Notify, watch};

use holdfast_metrics::{EventLabels, Metrics};
use holdfast_registry::{Hop, Kind, Registry};
use holdfast_tls::sign::{Signature, Signer, Verifier};
use model::{Doc, Health, NodeState, Phase, Report, Signed, Spec};
use store::{Applied, DeployStore, StoredWatch};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// Why a deployment operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    /// Bad input.
    #[error("{0}")]
    Invalid(String),
    /// No such deployment.
    #[error("no deployment {0:?}")]
    NotFound(String),
    /// It exists already, or the node cannot do this.
    #[error("{0}")]
    Conflict(String),
    /// A signature that is missing, wrong, or made by a node that may not
    /// deploy here.
    #[error("refused: {0}")]
    Refused(String),
    /// Component bytes that do not match their hash.
    #[error("component bytes do not match their hash: want {want}, got {got}")]
    HashMismatch {
        /// The hash named.
        want: String,
        /// The hash of the bytes.
        got: String,
    },
    /// Storage.
    #[error("storage: {0}")]
    Store(#[from] holdfast_store::StoreError),
    /// Files.
    #[error("{0}")]
    Io(String),
}

impl From<serde_json::Error> for DeployError {
    fn from(e: serde_json::Error) -> Self {
        DeployError::Invalid(e.to_string())
    }
}

/// One slot's part of what a node applies.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SlotOverlay {
    /// The component file, when the deployment sets one.
    pub file: Option<PathBuf>,
    /// Its SHA-256.
    pub sha256: Option<String>,
    /// The plugin config, when the deployment sets one.
    pub config: Option<Value>,
}

/// What a deployment sets on top of a node's own config.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Overlay {
    /// The deployment.
    pub deployment: String,
    /// By slot.
    pub plugins: BTreeMap<String, SlotOverlay>,
    /// Settings by dotted key.
    pub settings: BTreeMap<String, Value>,
}

/// How a node applies deployments: implemented by the host over its swap
/// and reload path. Called from a blocking thread.
pub trait Applier: Send + Sync {
    /// Runs the node's own config with `overlay` on top (`None`: its own
    /// config alone), and checks that each component it names is the one
    /// in force (unless the node pins that slot). On error the deployer
    /// applies what ran before again. Answers the plugin versions in force
    /// by slot.
    ///
    /// # Errors
    /// Why it could not be applied.
    fn apply(&self, overlay: Option<&Overlay>) -> Result<BTreeMap<String, String>, String>;
    /// Per slot: calls and failed calls of the version in force.
    fn counters(&self) -> BTreeMap<String, (u64, u64)>;
    /// The upstream link's state and the outbox's message count.
    fn node_health(&self) -> (String, u64);
}

/// What a node shows about deployments at `GET /api/v1/deploy`.
#[derive(Debug, Clone, Serialize)]
pub struct LocalStatus {
    /// This node.
    pub node: String,
    /// Whether it takes deployments from its parent.
    pub accept: bool,
    /// Whether it can sign (own) deployments.
    pub can_sign: bool,
    /// Its ancestors, nearest first.
    pub ancestors: Vec<String>,
    /// What is applied.
    pub applied: Option<Applied>,
    /// Content it will not apply again: deployment, digest, reason.
    pub refused_content: Vec<(String, String, String)>,
}

/// A deployment as listed: its document and the state of every node.
#[derive(Debug, Clone, Serialize)]
pub struct View {
    /// The document.
    #[serde(flatten)]
    pub doc: Doc,
    /// Whether this node owns it.
    pub owned: bool,
    /// Every node of the target, in rollout order, with its last report.
    pub node_states: Vec<NodeView>,
    /// At the owner, while rolling: what the next wave waits for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub waiting: Option<String>,
}

/// One node of a deployment's target.
#[derive(Debug, Clone, Serialize)]
pub struct NodeView {
    /// Node id.
    pub node: String,
    /// Released for it.
    pub released: bool,
    /// Its state: its last report's, `pending` when released and not
    /// reported, `waiting` when its wave is not released yet.
    pub state: String,
    /// The last report, if any.
    pub report: Option<Report>,
}

/// An exported deployment with its components, to carry to a node that
/// cannot be reached (`holdfast deploy export` / `import`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Bundle {
    /// The signed document.
    pub signed: Signed,
    /// Components by SHA-256, base64.
    pub components: BTreeMap<String, String>,
}

#[derive(Debug, Clone)]
struct Held {
    signed: Signed,
    doc: Doc,
}

/// The health watch of the applied deployment.
#[derive(Debug, Clone)]
struct Watch {
    /// What is watched, as stored (its counts: those before this process).
    stored: StoredWatch,
    /// The slots' counters when this process began watching.
    baseline: BTreeMap<String, (u64, u64)>,
    last_sent: (u64, u64),
    last_sent_ms: u64,
}

#[derive(Debug, Default)]
struct Inner {
    owned: BTreeMap<String, Held>,
    received: BTreeMap<String, Held>,
    ancestors: Vec<String>,
    reports: BTreeMap<(String, String), (u64, Report)>,
    seq: u64,
    applied: Option<Applied>,
    bad: BTreeMap<(String, String), String>,
    watch: Option<Watch>,
    last_tick_ms: u64,
    /// The registry version targets were last resolved at.
    resolved_at: Option<u64>,
    /// The highest revision held of each deployment id (kept for good).
    seen: BTreeMap<String, u64>,
}

/// What a node needs to take part in deployments.
pub struct Options {
    /// This node's id.
    pub node_id: String,
    /// The configured parent's id, if any.
    pub parent_id: Option<String>,
    /// Signs what this node owns (its fleet key, or `deploy.signing_*`).
    pub signer: Option<Signer>,
    /// Checks what the parent sends (the fleet CA).
    pub verifier: Option<Verifier>,
    /// Take deployments from the parent (`deploy.accept`).
    pub accept: bool,
    /// Largest component accepted, bytes.
    pub max_component_bytes: u64,
    /// How long a document this node signs stays valid, seconds
    /// (`deploy.expiry_seconds`). The owner signs a new revision of every
    /// live deployment when half of it has passed.
    pub expiry_seconds: u64,
}

/// A node's deployments. See the crate docs.
pub struct Deployer {
    node: String,
    parent: Option<String>,
    store: DeployStore,
    registry: Arc<Registry>,
    signer: Option<Signer>,
    verifier: Option<Verifier>,
    accept: bool,
    max_component_bytes: u64,
    expiry_ms: u64,
    metrics: Arc<Metrics>,
    inner: Mutex<Inner>,
    docs_changed: watch::Sender<u64>,
    reports_changed: watch::Sender<u64>,
    kick: Notify,
}

impl std::fmt::Debug for Deployer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deployer")
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

fn now_ms() -> u64 {
    holdfast_model::unix_ms()
}

fn open_signed(signed: &Signed) -> Result<(Doc, Signature), DeployError> {
    let doc: Doc = serde_json::from_str(&signed.doc)?;
    let decode = |s: &str| B64.decode(s).map_err(|e| DeployError::Invalid(format!("base64: {e}")));
    let sig = Signature {
        scheme: signed.scheme,
        signature: decode(&signed.signature)?,
        chain: signed.chain.iter().map(|c| decode(c)).collect::<Result<_, _>>()?,
    };
    Ok((doc, sig))
}

impl Deployer {
    /// Opens what is stored.
    ///
    /// # Errors
    /// Storage errors.
    pub fn open(
        options: Options,
        store: DeployStore,
        registry: Arc<Registry>,
        metrics: Arc<Metrics>,
    ) -> Result<Deployer, DeployError> {
        let mut inner = Inner::default();
        for owned in [true, false] {
            for signed in store.docs(owned)? {
                match open_signed(&signed) {
                    Ok((doc, _)) => {
                        let held = Held {
                            signed: signed.clone(),
                            doc,
                        };
                        let map = if owned { &mut inner.owned } else { &mut inner.received };
                        map.insert(held.doc.spec.id.clone(), held);
                    }
                    Err(e) => tracing::error!(error = %e, "deploy: a stored deployment does not parse; skipped"),
                }
            }
        }
        inner.ancestors = store.ancestors()?;
        for r in store.reports()? {
            inner.seq += 1;
            inner
                .reports
                .insert((r.deployment.clone(), r.node.clone()), (inner.seq, r));
        }
        inner.applied = store.applied()?;
        inner.bad = store.bad()?;
        inner.seen = store.seen()?;
        // Data directories from before `seen/` existed: what is held was seen.
        for h in inner.owned.values().chain(inner.received.values()) {
            let seen = inner.seen.entry(h.doc.spec.id.clone()).or_default();
            *seen = (*seen).max(h.doc.revision);
        }
        // A restarted node goes on watching what it applied, with what it
        // had counted (this process's counters start at zero).
        if let Some(w) = store.watch()? {
            let current = inner
                .applied
                .as_ref()
                .is_some_and(|a| a.deployment == w.deployment && a.digest == w.digest);
            if current {
                tracing::info!(deployment = %w.deployment, calls = w.calls, failures = w.failures,
                    "deploy: watching the applied deployment again");
                inner.watch = Some(Watch {
                    stored: w,
                    baseline: BTreeMap::new(),
                    last_sent: (0, 0),
                    last_sent_ms: 0,
                });
            } else {
                store.set_watch(None, false)?;
            }
        }
        Ok(Deployer {
            node: options.node_id,
            parent: options.parent_id,
            store,
            registry,
            signer: options.signer,
            verifier: options.verifier,
            accept: options.accept,
            max_component_bytes: options.max_component_bytes,
            expiry_ms: options.expiry_seconds.saturating_mul(1000),
            metrics,
            inner: Mutex::new(inner),
            docs_changed: watch::channel(0).0,
            reports_changed: watch::channel(0).0,
            kick: Notify::new(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        holdfast_model::lock(&self.inner)
    }

    fn count(&self, event: &'static str) {
        holdfast_metrics::handle(&self.metrics.deploy_events, &EventLabels { event }).inc();
    }

    fn bump_docs(&self) {
        self.docs_changed.send_modify(|v| *v += 1);
        self.kick.notify_one();
    }

    /// This node's id.
    pub fn node_id(&self) -> &str {
        &self.node
    }

    /// Changes to the documents (children get a new offer).
    pub fn doc_changes(&self) -> watch::Receiver<u64> {
        self.docs_changed.subscribe()
    }

    /// Changes to the reports (the parent gets them).
    pub fn report_changes(&self) -> watch::Receiver<u64> {
        self.reports_changed.subscribe()
    }

    // ---------------------------------------------------------------- owner

    /// Stores a component uploaded to the owning node; answers its hash.
    ///
    /// # Errors
    /// Too large, not a WebAssembly component, or storage errors.
    pub fn put_component(&self, bytes: &[u8]) -> Result<String, DeployError> {
        if bytes.len() as u64 > self.max_component_bytes {
            return Err(DeployError::Invalid(format!(
                "component of {} bytes is larger than deploy.max_component_bytes ({})",
                bytes.len(),
                self.max_component_bytes
            )));
        }
        if !bytes.starts_with(b"\0asm") {
            return Err(DeployError::Invalid(
                "not a WebAssembly binary (no \\0asm header)".into(),
            ));
        }
        let sha = model::sha256_hex(bytes);
        self.store.put_blob(&sha, bytes)?;
        Ok(sha)
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

    /// The gateways (and this node) a target names, in rollout order:
    /// by id, this node last.
    ///
    /// # Errors
    /// A listed node that is not a gateway known here.
    pub fn resolve(&self, target: &model::Target) -> Result<Vec<String>, DeployError> {
        let mut out = BTreeSet::new();
        let gateways: BTreeMap<String, BTreeMap<String, String>> = self
            .registry
            .list()
            .into_iter()
            .filter(|e| e.kind == Kind::Gateway && e.enabled && e.id != self.node)
            .map(|e| (e.id, e.labels))
            .collect();
        for n in &target.nodes {
            if n != &self.node && !gateways.contains_key(n) {
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
        if target.all || target.nodes.contains(&self.node) {
            nodes.push(self.node.clone());
        }
        Ok(nodes)
    }

    /// Creates a deployment owned by this node and starts its rollout.
    ///
    /// # Errors
    /// Invalid spec, unknown components, an id in use, no signing key.
    pub fn create(&self, mut spec: Spec) -> Result<Doc, DeployError> {
        spec.validate()?;
        for (slot, p) in spec.plugins.iter_mut() {
            if let Some(sha) = &p.sha256 {
                let path = self.store.blob_path(sha);
                let meta = std::fs::metadata(&path).map_err(|_| {
                    DeployError::Invalid(format!(
                        "plugins.{slot}: component {sha} is not stored here; upload it first (POST /api/v1/deployments/components)"
                    ))
                })?;
                self.store.read_blob(sha)?;
                p.size = meta.len();
            }
        }
        if self.lock().owned.get(&spec.id).is_some_and(|h| !h.doc.deleted) {
            return Err(DeployError::Conflict(format!("deployment {:?} exists", spec.id)));
        }
        let nodes = self.resolve(&spec.target)?;
        if nodes.is_empty() {
            return Err(DeployError::Invalid("the target matches no node".into()));
        }
        let first = spec.rollout.boundaries(nodes.len())?[0];
        let now = now_ms();
        // An id used before (a deleted deployment's tombstone, or one held
        // from above) goes on from the revision seen: nodes take only newer.
        let revision = self.lock().seen.get(&spec.id).map_or(1, |r| r + 1);
        let doc = Doc {
            owner: self.node.clone(),
            created_ms: now,
            revision,
            expires_ms: Some(now.saturating_add(self.expiry_ms)),
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
        let signed = self.sign(&doc)?;
        self.store.put_owned(&doc.spec.id, &signed, doc.revision, true)?;
        let mut inner = self.lock();
        inner.seen.insert(doc.spec.id.clone(), doc.revision);
        inner.reports.retain(|(d, _), _| d != &doc.spec.id);
        inner.owned.insert(
            doc.spec.id.clone(),
            Held {
                signed,
                doc: doc.clone(),
            },
        );
        drop(inner);
        self.count("created");
        tracing::info!(deployment = %doc.spec.id, nodes = doc.nodes.len(), released = doc.released, "deploy: created");
        self.bump_docs();
        Ok(doc)
    }

    /// Signs a new revision of an owned document, valid for
    /// `deploy.expiry_seconds` from now. `drop_reports`: its reports go
    /// (a deletion).
    fn resign(&self, inner: &mut Inner, mut doc: Doc, drop_reports: bool) -> Result<(), DeployError> {
        let seen = inner.seen.get(&doc.spec.id).copied().unwrap_or(0);
        doc.revision = doc.revision.max(seen) + 1;
        let now = now_ms();
        doc.updated_ms = now;
        doc.expires_ms = Some(now.saturating_add(self.expiry_ms));
        let signed = self.sign(&doc)?;
        self.store
            .put_owned(&doc.spec.id, &signed, doc.revision, drop_reports)?;
        inner.seen.insert(doc.spec.id.clone(), doc.revision);
        if drop_reports {
            inner.reports.retain(|(d, _), _| d != &doc.spec.id);
        }
        inner.owned.insert(doc.spec.id.clone(), Held { signed, doc });
        Ok(())
    }

    /// Rolls a deployment back everywhere: every node returns to what it
    /// ran before it.
    ///
    /// # Errors
    /// Not owned here, or signing and storage errors.
    pub fn rollback(&self, id: &str) -> Result<Doc, DeployError> {
        let mut inner = self.lock();
        let Some(held) = inner.owned.get(id).filter(|h| !h.doc.deleted).cloned() else {
            drop(inner);
            return Err(self.not_owned(id));
        };
        let mut doc = held.doc;
        doc.phase = Phase::Withdrawn;
        self.resign(&mut inner, doc, false)?;
        let doc = inner.owned[id].doc.clone();
        drop(inner);
        self.count("withdrawn");
        tracing::info!(deployment = id, "deploy: rolled back by the operator");
        self.bump_docs();
        Ok(doc)
    }

    /// The error for an id not owned here. Takes the lock: call it without.
    fn not_owned(&self, id: &str) -> DeployError {
        match self.lock().received.get(id) {
            Some(h) => DeployError::Conflict(format!(
                "deployment {id:?} is owned by {}; change it there",
                h.doc.owner
            )),
            None => DeployError::NotFound(id.to_string()),
        }
    }

    /// Deletes a deployment: nodes return to what they ran before it. What
    /// stays is a signed tombstone (a withdrawn, deleted revision) until it
    /// expires, so that no node takes an older revision again.
    ///
    /// # Errors
    /// Not owned here (or deleted already), or signing and storage errors.
    pub fn delete(&self, id: &str) -> Result<(), DeployError> {
        let mut inner = self.lock();
        let Some(held) = inner.owned.get(id).filter(|h| !h.doc.deleted).cloned() else {
            drop(inner);
            return Err(self.not_owned(id));
        };
        let mut doc = held.doc;
        doc.phase = Phase::Withdrawn;
        doc.deleted = true;
        self.resign(&mut inner, doc, true)?;
        drop(inner);
        self.count("deleted");
        self.bump_docs();
        self.gc_blobs();
        Ok(())
    }

    /// Releases waves and halts rollouts (owner), and follows registry
    /// changes in targets. Called about once a second.
    fn owner_tick(&self) {
        let now = now_ms();
        let mut inner = self.lock();
        if now.saturating_sub(inner.last_tick_ms) < 900 {
            return;
        }
        inner.last_tick_ms = now;
        // Targets follow the registry: resolve again only when it changed.
        let version = *self.registry.changes().borrow();
        let registry_changed = inner.resolved_at != Some(version);
        inner.resolved_at = Some(version);
        let docs: Vec<Doc> = inner.owned.values().map(|h| h.doc.clone()).collect();
        let mut changed = false;
        for mut doc in docs {
            if matches!(doc.phase, Phase::Withdrawn) {
                // A tombstone goes once it expired: every older revision
                // has expired by then too.
                if doc.deleted && doc.expired(now) {
                    match self.store.remove_owned(&doc.spec.id) {
                        Ok(()) => {
                            inner.owned.remove(&doc.spec.id);
                            changed = true;
                        }
                        Err(e) => tracing::error!(error = %e, "deploy: cannot remove an expired tombstone"),
                    }
                }
                continue;
            }
            // A live document is signed again when half its validity has
            // passed (and documents signed before expiry existed get one).
            let mut dirty = doc
                .expires_ms
                .is_none_or(|e| e.saturating_sub(now) < self.expiry_ms / 2);
            // Follow the registry: new gateways that match join at the end.
            if let Some(Ok(now_nodes)) = registry_changed.then(|| self.resolve(&doc.spec.target)) {
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
                match gate(&inner, &doc, now) {
                    Gate::Wait(_) => {}
                    Gate::Halt(reason) => {
                        tracing::warn!(deployment = %doc.spec.id, %reason, "deploy: rollout halted");
                        self.count("halted");
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
                        self.count("wave-released");
                        dirty = true;
                    }
                }
            }
            if dirty {
                match self.resign(&mut inner, doc, false) {
                    Ok(()) => changed = true,
                    Err(e) => tracing::error!(error = %e, "deploy: cannot sign a rollout change"),
                }
            }
        }
        drop(inner);
        if changed {
            self.bump_docs();
        }
    }

    // ------------------------------------------------------ every node

    /// Every deployment this node holds (owned first), with node states.
    pub fn list(&self) -> Vec<View> {
        let inner = self.lock();
        let mut out: Vec<View> = inner.owned.values().map(|h| view(&inner, h, true)).collect();
        out.extend(
            inner
                .received
                .values()
                .filter(|h| !inner.owned.contains_key(&h.doc.spec.id))
                .map(|h| view(&inner, h, false)),
        );
        out
    }

    /// One deployment.
    pub fn show(&self, id: &str) -> Option<View> {
        let inner = self.lock();
        inner
            .owned
            .get(id)
            .map(|h| view(&inner, h, true))
            .or_else(|| inner.received.get(id).map(|h| view(&inner, h, false)))
    }

    /// This node's own deployment state.
    pub fn local_status(&self) -> LocalStatus {
        let inner = self.lock();
        LocalStatus {
            node: self.node.clone(),
            accept: self.accept,
            can_sign: self.signer.is_some(),
            ancestors: inner.ancestors.clone(),
            applied: inner.applied.clone(),
            refused_content: inner
                .bad
                .iter()
                .map(|((i, d), r)| (i.clone(), d.clone(), r.clone()))
                .collect(),
        }
    }

    /// What a child gets: this node and its ancestors, and the documents
    /// that concern the child's subtree and whose components are here.
    pub fn offer_for(&self, child: &str) -> (Vec<String>, Vec<Signed>) {
        let inner = self.lock();
        let mut ancestors = vec![self.node.clone()];
        ancestors.extend(inner.ancestors.iter().cloned());
        let docs = self.offered(&inner, child).map(|h| h.signed.clone()).collect();
        (ancestors, docs)
    }

    /// The documents that concern `child`'s subtree and can be served.
    fn offered<'a>(&'a self, inner: &'a Inner, child: &'a str) -> impl Iterator<Item = &'a Held> + 'a {
        let via_child = move |n: &String| n == child || self.registry.next_hop(n) == Hop::Child(child.to_string());
        inner
            .owned
            .values()
            .chain(
                inner
                    .received
                    .values()
                    .filter(|h| !inner.owned.contains_key(&h.doc.spec.id)),
            )
            .filter(move |h| {
                let d = &h.doc;
                let relevant = if d.phase == Phase::Withdrawn {
                    d.nodes.iter().any(via_child)
                } else {
                    d.nodes[..d.released.min(d.nodes.len())].iter().any(via_child)
                };
                let ready = d.phase == Phase::Withdrawn || d.spec.components().all(|s| self.store.has_blob(s));
                relevant && ready
            })
    }

    /// A component for `child`: only one of the deployments it is offered,
    /// checked against its hash.
    ///
    /// # Errors
    /// Not offered to the child, missing or damaged.
    pub fn component_for(&self, child: &str, sha: &str) -> Result<Vec<u8>, DeployError> {
        let offered = {
            let inner = self.lock();
            self.offered(&inner, child)
                .any(|h| h.doc.spec.components().any(|s| s == sha))
        };
        if !offered {
            return Err(DeployError::NotFound(format!("component {sha} for {child}")));
        }
        self.read_component(sha)
    }

    /// Checks a signed document from above: signed by its owner, the owner
    /// an ancestor of this node.
    fn verify(&self, signed: &Signed, ancestors: &[String]) -> Result<Doc, DeployError> {
        let (doc, sig) = open_signed(signed)?;
        let verifier = self
            .verifier
            .as_ref()
            .ok_or_else(|| DeployError::Refused("this node has no fleet CA (fleet.ca) to check signatures".into()))?;
        let signer = verifier
            .verify(signed.doc.as_bytes(), &sig)
            .map_err(|e| DeployError::Refused(e.to_string()))?;
        if signer != doc.owner {
            return Err(DeployError::Refused(format!(
                "signed by {signer} but owned by {}",
                doc.owner
            )));
        }
        if doc.owner == self.node || !ancestors.contains(&doc.owner) {
            return Err(DeployError::Refused(format!(
                "owned by {}, which is not an ancestor of {} (a node deploys only to its own subtree)",
                doc.owner, self.node
            )));
        }
        doc.spec.validate()?;
        Ok(doc)
    }

    /// Takes the parent's offer: the ancestors it names and the documents,
    /// each verified. Documents from before that it no longer sends are
    /// dropped. Answers the components to fetch.
    pub fn receive_offer(&self, parent: &str, ancestors: Vec<String>, docs: Vec<Signed>) -> Vec<String> {
        if !self.accept {
            return Vec::new();
        }
        if ancestors.first().map(String::as_str) != Some(parent) || ancestors.contains(&self.node) {
            tracing::warn!(
                ?ancestors,
                "deploy: the parent's ancestor list is not usable; offer ignored"
            );
            return Vec::new();
        }
        let mut verified = BTreeMap::new();
        let mut refusals = Vec::new();
        for signed in docs {
            match self.verify(&signed, &ancestors) {
                Ok(doc) => {
                    verified.insert(doc.spec.id.clone(), Held { signed, doc });
                }
                Err(e) => {
                    self.count("refused-signature");
                    tracing::warn!(error = %e, "deploy: a deployment from the parent was refused");
                    if let Ok((doc, _)) = open_signed(&signed) {
                        refusals.push((doc, e.to_string()));
                    }
                }
            }
        }
        let mut inner = self.lock();
        // Never an older revision than one held before: a parent (or a man
        // in the middle) replaying an old document keeps the newer one here.
        let offered = std::mem::take(&mut verified);
        for (id, h) in offered {
            match check_revision(&inner, &h) {
                Ok(()) => {
                    verified.insert(id, h);
                }
                Err(e) => {
                    self.count("refused-rollback");
                    tracing::warn!(deployment = %id, error = %e, "deploy: the parent offered an older revision; keeping the newer one");
                    if let Some(held) = inner.received.get(&id) {
                        verified.insert(id, held.clone());
                    }
                }
            }
        }
        let same = inner.ancestors == ancestors
            && inner.received.len() == verified.len()
            && inner
                .received
                .iter()
                .all(|(id, h)| verified.get(id).is_some_and(|v| v.signed == h.signed));
        if !same {
            let list = received_list(&verified);
            if let Err(e) = self
                .store
                .replace_received(&list)
                .and_then(|()| self.store.set_ancestors(&ancestors))
            {
                tracing::error!(error = %e, "deploy: cannot store the parent's deployments");
                return Vec::new();
            }
            for h in verified.values() {
                let seen = inner.seen.entry(h.doc.spec.id.clone()).or_default();
                *seen = (*seen).max(h.doc.revision);
            }
            inner.received = verified;
            inner.ancestors = ancestors;
            // Reports of deployments no longer held go.
            let known: BTreeSet<String> = inner.owned.keys().chain(inner.received.keys()).cloned().collect();
            let stale: Vec<(String, String)> = inner
                .reports
                .keys()
                .filter(|(d, _)| !known.contains(d))
                .cloned()
                .collect();
            for k in &stale {
                inner.reports.remove(k);
            }
            let _ = self.store.remove_reports(&stale);
        }
        for (doc, reason) in refusals {
            if doc.nodes.contains(&self.node) {
                self.report(&mut inner, &doc, NodeState::Refused, Some(reason), BTreeMap::new());
            }
        }
        let missing = self.missing(&inner);
        drop(inner);
        if !same {
            self.bump_docs();
            self.gc_blobs();
        }
        missing
    }

    fn missing(&self, inner: &Inner) -> Vec<String> {
        let mut out = BTreeSet::new();
        for h in inner.received.values() {
            if h.doc.phase == Phase::Withdrawn {
                continue;
            }
            for s in h.doc.spec.components() {
                if !self.store.has_blob(s) {
                    out.insert(s.to_string());
                }
            }
        }
        out.into_iter().collect()
    }

    /// Components the documents held need and this node lacks.
    pub fn missing_components(&self) -> Vec<String> {
        let inner = self.lock();
        self.missing(&inner)
    }

    /// A component's bytes, checked against its hash.
    ///
    /// # Errors
    /// Missing or damaged.
    pub fn read_component(&self, sha: &str) -> Result<Vec<u8>, DeployError> {
        let r = self.store.read_blob(sha);
        if let Err(e @ DeployError::HashMismatch { .. }) = &r {
            // The damaged file is gone: it is fetched again from the parent,
            // and offered on once it is back.
            tracing::error!(sha256 = sha, error = %e, "deploy: a stored component is damaged; fetching it again");
            self.count("damaged-component");
            self.bump_docs();
        }
        r
    }

    /// Stores a component fetched from the parent.
    ///
    /// # Errors
    /// Not needed, too large, or bytes that do not match the hash.
    pub fn store_component(&self, sha: &str, bytes: &[u8]) -> Result<(), DeployError> {
        if bytes.len() as u64 > self.max_component_bytes {
            return Err(DeployError::Invalid(format!(
                "component of {} bytes is too large",
                bytes.len()
            )));
        }
        match self.store.put_blob(sha, bytes) {
            Ok(()) => {
                self.count("component-stored");
                self.bump_docs();
                Ok(())
            }
            Err(e @ DeployError::HashMismatch { .. }) => {
                self.count("refused-hash");
                let inner = &mut *self.lock();
                let docs: Vec<Doc> = inner
                    .received
                    .values()
                    .filter(|h| h.doc.spec.components().any(|s| s == sha) && h.doc.nodes.contains(&self.node))
                    .map(|h| h.doc.clone())
                    .collect();
                for d in docs {
                    self.report(inner, &d, NodeState::Refused, Some(e.to_string()), BTreeMap::new());
                }
                Err(e)
            }
            Err(e) => Err(e),
        }
    }

    /// The largest component accepted.
    pub fn max_component_bytes(&self) -> u64 {
        self.max_component_bytes
    }

    /// Removes components no document and no applied state needs.
    fn gc_blobs(&self) {
        let inner = self.lock();
        let mut keep: BTreeSet<String> = inner
            .owned
            .values()
            .chain(inner.received.values())
            .flat_map(|h| h.doc.spec.components().map(str::to_string).collect::<Vec<_>>())
            .collect();
        if let Some(a) = &inner.applied {
            keep.extend(a.overlay.plugins.values().filter_map(|p| p.sha256.clone()));
        }
        drop(inner);
        // Uploaded components not yet in a deployment stay for a day.
        let day_ago = std::time::SystemTime::now() - Duration::from_secs(86_400);
        if let Ok(dir) = std::fs::read_dir(self.store.blob_path("")) {
            for e in dir.flatten() {
                let recent = e.metadata().and_then(|m| m.modified()).is_ok_and(|t| t > day_ago);
                if recent {
                    keep.insert(e.file_name().to_string_lossy().into_owned());
                }
            }
        }
        self.store.retain_blobs(&keep);
    }

    /// Reports to send up since `since` (a sequence number): every report
    /// of a deployment this node does not own. Answers the new sequence.
    pub fn reports_since(&self, since: u64) -> (u64, Vec<Report>) {
        let inner = self.lock();
        let out = inner
            .reports
            .values()
            .filter(|(seq, r)| *seq > since && !inner.owned.contains_key(&r.deployment))
            .map(|(_, r)| r.clone())
            .collect();
        (inner.seq, out)
    }

    /// Takes reports from child `child` about nodes in its subtree.
    pub fn receive_reports(&self, child: &str, reports: Vec<Report>) {
        let mut inner = self.lock();
        let mut fresh = Vec::new();
        for r in reports {
            if !inner.owned.contains_key(&r.deployment) && !inner.received.contains_key(&r.deployment) {
                continue;
            }
            let ok = r.node == child || self.registry.next_hop(&r.node) == Hop::Child(child.to_string());
            if !ok {
                tracing::warn!(child, node = %r.node, "deploy: a child reported about a node outside its subtree; ignored");
                continue;
            }
            let key = (r.deployment.clone(), r.node.clone());
            if inner.reports.get(&key).is_some_and(|(_, old)| old.at_ms > r.at_ms) {
                continue;
            }
            inner.seq += 1;
            let seq = inner.seq;
            inner.reports.insert(key, (seq, r.clone()));
            fresh.push(r);
        }
        drop(inner);
        if !fresh.is_empty() {
            if let Err(e) = self.store.put_reports(&fresh) {
                tracing::error!(error = %e, "deploy: cannot store reports");
            }
            self.reports_changed.send_modify(|v| *v += 1);
        }
    }

    /// Records this node's state for `doc` (no-op when nothing changed).
    fn report(
        &self,
        inner: &mut Inner,
        doc: &Doc,
        state: NodeState,
        reason: Option<String>,
        versions: BTreeMap<String, String>,
    ) {
        let key = (doc.spec.id.clone(), self.node.clone());
        let now = now_ms();
        let (health, since) = match inner.reports.get(&key) {
            Some((_, old)) if old.state == state && old.reason == reason && old.revision == doc.revision => {
                return;
            }
            Some((_, old)) if old.state == state && old.reason == reason => (old.health.clone(), old.since_ms),
            _ => (Health::default(), now),
        };
        let r = Report {
            deployment: doc.spec.id.clone(),
            revision: doc.revision,
            node: self.node.clone(),
            state,
            since_ms: since,
            at_ms: now,
            versions,
            reason,
            health,
        };
        self.put_report(inner, r);
    }

    fn put_report(&self, inner: &mut Inner, r: Report) {
        inner.seq += 1;
        let seq = inner.seq;
        if let Err(e) = self.store.put_reports(std::slice::from_ref(&r)) {
            tracing::error!(error = %e, "deploy: cannot store a report");
        }
        inner.reports.insert((r.deployment.clone(), r.node.clone()), (seq, r));
        self.reports_changed.send_modify(|v| *v += 1);
    }

    /// Imports an exported deployment: verified like one from the parent,
    /// components checked against their hashes.
    ///
    /// # Errors
    /// A refused signature, a bad component, storage errors.
    pub fn import(&self, bundle: Bundle) -> Result<Doc, DeployError> {
        let mut ancestors = self.lock().ancestors.clone();
        if let Some(p) = &self.parent
            && !ancestors.contains(p)
        {
            ancestors.insert(0, p.clone());
        }
        let doc = match self.verify(&bundle.signed, &ancestors) {
            Ok(d) => d,
            Err(e) => {
                self.count("refused-signature");
                return Err(e);
            }
        };
        if let Some(expires) = doc.expires_ms.filter(|_| doc.expired(now_ms())) {
            self.count("refused-expired");
            return Err(DeployError::Refused(format!(
                "revision {} of {:?} expired at {} (ms since the Unix epoch); export a fresh one from {}",
                doc.revision, doc.spec.id, expires, doc.owner
            )));
        }
        let candidate = Held {
            signed: bundle.signed.clone(),
            doc: doc.clone(),
        };
        if let Err(e) = check_revision(&self.lock(), &candidate) {
            self.count("refused-rollback");
            return Err(e);
        }
        for sha in doc.spec.components() {
            let b64 = bundle
                .components
                .get(sha)
                .ok_or_else(|| DeployError::Invalid(format!("the bundle lacks component {sha}")))?;
            let bytes = B64
                .decode(b64)
                .map_err(|e| DeployError::Invalid(format!("component {sha}: {e}")))?;
            if let Err(e) = self.store.put_blob(sha, &bytes) {
                if matches!(e, DeployError::HashMismatch { .. }) {
                    self.count("refused-hash");
                }
                return Err(e);
            }
        }
        let mut inner = self.lock();
        // Checked again under the lock: an offer may have come meanwhile.
        if let Err(e) = check_revision(&inner, &candidate) {
            self.count("refused-rollback");
            return Err(e);
        }
        let mut received = inner.received.clone();
        received.insert(doc.spec.id.clone(), candidate);
        self.store.replace_received(&received_list(&received))?;
        inner.received = received;
        let seen = inner.seen.entry(doc.spec.id.clone()).or_default();
        *seen = (*seen).max(doc.revision);
        drop(inner);
        self.count("imported");
        self.bump_docs();
        Ok(doc)
    }

    /// An owned or held deployment with its components, for `import`.
    ///
    /// # Errors
    /// Unknown id, or a missing component.
    pub fn export(&self, id: &str) -> Result<Bundle, DeployError> {
        let inner = self.lock();
        let h = inner
            .owned
            .get(id)
            .or_else(|| inner.received.get(id))
            .cloned()
            .ok_or_else(|| DeployError::NotFound(id.to_string()))?;
        drop(inner);
        let mut components = BTreeMap::new();
        for sha in h.doc.spec.components() {
            components.insert(sha.to_string(), B64.encode(self.store.read_blob(sha)?));
        }
        Ok(Bundle {
            signed: h.signed,
            components,
        })
    }

    // ------------------------------------------------------ applying

    fn overlay_of(&self, doc: &Doc) -> Overlay {
        Overlay {
            deployment: doc.spec.id.clone(),
            plugins: doc
                .spec
                .plugins
                .iter()
                .map(|(slot, p)| {
                    (
                        slot.clone(),
                        SlotOverlay {
                            file: p.sha256.as_ref().map(|s| self.store.blob_path(s)),
                            sha256: p.sha256.clone(),
                            config: p.config.clone(),
                        },
                    )
                })
                .collect(),
            settings: doc.spec.settings.clone(),
        }
    }

    /// Decides which deployment this node runs, applies it when that
    /// changed, and reports. Blocking.
    fn evaluate(&self, applier: &dyn Applier) {
        // A failed apply marks its content bad; try again with the rest.
        for _ in 0..4 {
            if !self.evaluate_once(applier) {
                return;
            }
        }
    }

    /// Returns true when it should run again.
    fn evaluate_once(&self, applier: &dyn Applier) -> bool {
        let mut inner = self.lock();
        let held: Vec<Doc> = inner
            .owned
            .values()
            .map(|h| h.doc.clone())
            .chain(
                inner
                    .received
                    .values()
                    .filter(|h| !inner.owned.contains_key(&h.doc.spec.id))
                    .map(|h| h.doc.clone()),
            )
            .collect();
        let now = now_ms();
        let current = inner.applied.as_ref().map(|a| (a.deployment.clone(), a.digest.clone()));
        let running = |d: &Doc| {
            current
                .as_ref()
                .is_some_and(|(id, dg)| *id == d.spec.id && *dg == d.spec.digest())
        };
        let mine: Vec<&Doc> = held.iter().filter(|d| d.nodes.contains(&self.node)).collect();
        let released: Vec<&Doc> = mine
            .iter()
            .copied()
            .filter(|d| d.releases(&self.node) && !inner.bad.contains_key(&(d.spec.id.clone(), d.spec.digest())))
            .collect();
        // An expired document is applied no more; what runs keeps running.
        let (candidates, expired): (Vec<&Doc>, Vec<&Doc>) =
            released.iter().copied().partition(|d| !d.expired(now) || running(d));
        let ready = |d: &Doc| d.spec.components().all(|s| self.store.has_blob(s));
        let chosen = candidates
            .iter()
            .copied()
            .filter(|d| ready(d))
            .max_by(|a, b| {
                (a.spec.priority, a.created_ms, &a.spec.id).cmp(&(b.spec.priority, b.created_ms, &b.spec.id))
            })
            .cloned();
        let wanted = chosen.as_ref().map(|d| (d.spec.id.clone(), d.spec.digest()));
        if current == wanted {
            // Nothing to apply; keep the reports true.
            for d in &candidates {
                if Some(&d.spec.id) == chosen.as_ref().map(|c| &c.spec.id) {
                    let versions = inner.applied.as_ref().map(|a| a.versions.clone()).unwrap_or_default();
                    if d.expired(now) {
                        let why = "the document expired; this node keeps running it until it hears a newer revision";
                        self.report(&mut inner, d, NodeState::Expired, Some(why.into()), versions);
                    } else {
                        self.report(&mut inner, d, NodeState::Applied, None, versions);
                    }
                } else if !ready(d) {
                    self.report(
                        &mut inner,
                        d,
                        NodeState::Pending,
                        Some("fetching components".into()),
                        BTreeMap::new(),
                    );
                } else if let Some(c) = &chosen {
                    let why = format!("{} applies (priority {})", c.spec.id, c.spec.priority);
                    self.report(&mut inner, d, NodeState::Superseded, Some(why), BTreeMap::new());
                }
            }
            for d in &expired {
                let why = "the document expired before this node applied it";
                self.report(&mut inner, d, NodeState::Expired, Some(why.into()), BTreeMap::new());
            }
            for d in &mine {
                if d.phase == Phase::Withdrawn
                    && inner
                        .reports
                        .get(&(d.spec.id.clone(), self.node.clone()))
                        .is_some_and(|(_, r)| r.state == NodeState::Applied || r.state == NodeState::Pending)
                {
                    self.report(
                        &mut inner,
                        d,
                        NodeState::RolledBack,
                        Some("withdrawn by the owner".into()),
                        BTreeMap::new(),
                    );
                }
            }
            return false;
        }
        let previous = inner.applied.clone();
        drop(inner);
        let overlay = chosen.as_ref().map(|d| self.overlay_of(d));
        // The applier checks that each deployed component is the one in
        // force (except in slots the node pins).
        let result = applier.apply(overlay.as_ref());
        let mut inner = self.lock();
        match (result, chosen) {
            (Ok(versions), Some(doc)) => {
                let applied = Applied {
                    deployment: doc.spec.id.clone(),
                    digest: doc.spec.digest(),
                    revision: doc.revision,
                    at_ms: now_ms(),
                    overlay: overlay.unwrap_or_default(),
                    versions: versions.clone(),
                };
                if let Err(e) = self.store.set_applied(Some(&applied)) {
                    tracing::error!(error = %e, "deploy: cannot record what was applied");
                }
                inner.applied = Some(applied.clone());
                let slots: Vec<String> = applied.overlay.plugins.keys().cloned().collect();
                let stored = (!slots.is_empty()).then(|| StoredWatch {
                    deployment: applied.deployment.clone(),
                    digest: applied.digest.clone(),
                    slots,
                    until_ms: now_ms() + doc.spec.rollout.watch_seconds * 1000,
                    rollout: doc.spec.rollout.clone(),
                    calls: 0,
                    failures: 0,
                });
                if let Err(e) = self.store.set_watch(stored.as_ref(), true) {
                    tracing::error!(error = %e, "deploy: cannot record the health watch");
                }
                inner.watch = stored.map(|stored| Watch {
                    stored,
                    baseline: applier.counters(),
                    last_sent: (0, 0),
                    last_sent_ms: 0,
                });
                self.count("applied");
                tracing::info!(deployment = %doc.spec.id, revision = doc.revision, ?versions, "deploy: applied");
                self.report(&mut inner, &doc, NodeState::Applied, None, versions);
                self.report_previous(&mut inner, previous.as_ref(), &held, Some(&doc));
                true
            }
            (Ok(_), None) => {
                if let Err(e) = self.store.set_applied(None) {
                    tracing::error!(error = %e, "deploy: cannot record what was applied");
                }
                inner.applied = None;
                inner.watch = None;
                if let Err(e) = self.store.set_watch(None, true) {
                    tracing::error!(error = %e, "deploy: cannot record the health watch");
                }
                tracing::info!("deploy: back to this node's own config");
                self.report_previous(&mut inner, previous.as_ref(), &held, None);
                true
            }
            (Err(reason), Some(doc)) => {
                self.count("failed");
                tracing::warn!(deployment = %doc.spec.id, %reason, "deploy: cannot apply; keeping what ran before");
                let _ = self.store.put_bad(&doc.spec.id, &doc.spec.digest(), &reason);
                inner
                    .bad
                    .insert((doc.spec.id.clone(), doc.spec.digest()), reason.clone());
                self.report(&mut inner, &doc, NodeState::Failed, Some(reason), BTreeMap::new());
                drop(inner);
                // Put back what ran before (the applier left nothing of the failed one).
                if let Err(e) = applier.apply(previous.as_ref().map(|a| &a.overlay)) {
                    tracing::error!(error = %e, "deploy: restoring the previous state failed");
                }
                true
            }
            (Err(reason), None) => {
                tracing::error!(%reason, "deploy: cannot return to this node's own config");
                false
            }
        }
    }

    /// The report of the deployment that stopped applying.
    fn report_previous(&self, inner: &mut Inner, previous: Option<&Applied>, held: &[Doc], now: Option<&Doc>) {
        let Some(prev) = previous else { return };
        if now.is_some_and(|d| d.spec.id == prev.deployment) {
            return;
        }
        let Some(doc) = held.iter().find(|d| d.spec.id == prev.deployment) else {
            return;
        };
        if inner.bad.contains_key(&(doc.spec.id.clone(), doc.spec.digest())) {
            return;
        }
        let (state, why) = match (&doc.phase, now) {
            (Phase::Withdrawn, _) => (NodeState::RolledBack, "withdrawn by the owner".to_string()),
            (_, Some(d)) => (
                NodeState::Superseded,
                format!("{} applies (priority {})", d.spec.id, d.spec.priority),
            ),
            (_, None) => (NodeState::RolledBack, "no longer released for this node".to_string()),
        };
        self.report(inner, doc, state, Some(why), BTreeMap::new());
    }

    /// Watches the deployed plugins; rolls back when they fail past the
    /// deployment's threshold. The counts are kept in the store with the
    /// health reports, so a restarted node goes on from them. Blocking.
    fn watch_health(&self, applier: &dyn Applier) {
        let mut inner = self.lock();
        let Some(w) = inner.watch.clone() else { return };
        let Some(applied) = inner.applied.clone() else { return };
        if applied.deployment != w.stored.deployment || applied.digest != w.stored.digest {
            inner.watch = None;
            drop(inner);
            let _ = self.store.set_watch(None, false);
            return;
        }
        let now = now_ms();
        let counters = applier.counters();
        let (mut calls, mut failures) = (w.stored.calls, w.stored.failures);
        for slot in &w.stored.slots {
            let (c, f) = counters.get(slot).copied().unwrap_or_default();
            let (c0, f0) = w.baseline.get(slot).copied().unwrap_or_default();
            calls += c.saturating_sub(c0);
            failures += f.saturating_sub(f0);
        }
        let r = &w.stored.rollout;
        let failing = calls >= r.min_calls && failures as f64 > r.max_failure_rate * calls as f64;
        let key = (applied.deployment.clone(), self.node.clone());
        let doc = inner
            .owned
            .get(&applied.deployment)
            .or_else(|| inner.received.get(&applied.deployment))
            .map(|h| h.doc.clone());
        if failing {
            let reason = format!(
                "{} of {calls} calls to {} failed (trap, timeout or memory) since it was applied",
                failures,
                w.stored.slots.join(", ")
            );
            tracing::warn!(deployment = %applied.deployment, %reason, "deploy: the deployed plugin fails; rolling back");
            self.count("rolled-back");
            let _ = self.store.put_bad(&applied.deployment, &applied.digest, &reason);
            let _ = self.store.set_watch(None, true);
            inner
                .bad
                .insert((applied.deployment.clone(), applied.digest.clone()), reason.clone());
            inner.watch = None;
            if let Some(doc) = doc {
                self.report(&mut inner, &doc, NodeState::RolledBack, Some(reason), BTreeMap::new());
                if let Some((_, rep)) = inner.reports.get(&key).cloned() {
                    let mut rep = rep;
                    rep.health.calls = calls;
                    rep.health.failures = failures;
                    self.put_report(&mut inner, rep);
                }
            }
            drop(inner);
            self.kick.notify_one();
            return;
        }
        // Health goes up when it changed, at most every 2 s; the counts
        // are stored with it.
        if (calls, failures) != w.last_sent && now.saturating_sub(w.last_sent_ms) >= 2000 {
            if let Some((_, rep)) = inner.reports.get(&key).cloned()
                && matches!(rep.state, NodeState::Applied | NodeState::Expired)
            {
                let (link, outbox) = applier.node_health();
                let mut rep = rep;
                rep.health = Health {
                    calls,
                    failures,
                    link,
                    outbox_messages: outbox,
                };
                rep.at_ms = now;
                self.put_report(&mut inner, rep);
            }
            let snapshot = StoredWatch {
                calls,
                failures,
                ..w.stored.clone()
            };
            if let Err(e) = self.store.set_watch(Some(&snapshot), false) {
                tracing::error!(error = %e, "deploy: cannot record the health watch");
            }
            if let Some(w) = inner.watch.as_mut() {
                w.last_sent = (calls, failures);
                w.last_sent_ms = now;
            }
        }
        // The watch lasts watch_seconds, and on while fewer than min_calls
        // calls were seen (a plugin that fails on its first calls an hour
        // later is still rolled back).
        if now >= w.stored.until_ms && (calls >= r.min_calls || r.release_without_traffic) {
            inner.watch = None;
            drop(inner);
            let _ = self.store.set_watch(None, false);
        }
    }

    /// Applies, watches and (at an owner) rolls out until `stop`.
    pub async fn run(self: Arc<Self>, applier: Arc<dyn Applier>, mut stop: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = self.kick.notified() => {}
                _ = tick.tick() => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            let (me, a) = (self.clone(), applier.clone());
            let done = tokio::task::spawn_blocking(move || {
                me.owner_tick();
                me.evaluate(&*a);
                me.watch_health(&*a);
            })
            .await;
            if let Err(e) = done {
                tracing::error!(error = %e, "deploy: the apply task failed");
            }
        }
    }
}

/// The documents to store as received, with their revisions.
fn received_list(held: &BTreeMap<String, Held>) -> Vec<(String, Signed, u64)> {
    held.iter()
        .map(|(id, h)| (id.clone(), h.signed.clone(), h.doc.revision))
        .collect()
}

/// Refuses a document older than what this node has held of the same id
/// (rollback and replay protection, as TUF and Uptane do), or another
/// document under a revision already held (the same document again is
/// fine: an idempotent import).
fn check_revision(inner: &Inner, h: &Held) -> Result<(), DeployError> {
    let id = &h.doc.spec.id;
    let seen = inner.seen.get(id).copied().unwrap_or(0);
    if h.doc.revision < seen {
        return Err(DeployError::Refused(format!(
            "revision {} of {id:?} is older than revision {seen} seen here (a replayed or rolled-back document)",
            h.doc.revision
        )));
    }
    let held = inner.received.get(id).or_else(|| inner.owned.get(id));
    if let Some(held) = held.filter(|held| held.doc.revision == h.doc.revision)
        && held.signed != h.signed
    {
        return Err(DeployError::Refused(format!(
            "another document of {id:?} has revision {} already",
            h.doc.revision
        )));
    }
    Ok(())
}

enum Gate {
    /// Not yet: why.
    Wait(String),
    Pass,
    Halt(String),
}

/// Whether the next wave of `doc` may be released: every node of the
/// released waves applied it, ran it for the soak time, and (when it sets
/// plugins) saw `min_calls` calls to them, unless the rollout releases
/// without traffic; a failed, rolled-back or refused node halts it.
fn gate(inner: &Inner, doc: &Doc, now: u64) -> Gate {
    let rollout = &doc.spec.rollout;
    let needs_traffic = !doc.spec.plugins.is_empty() && !rollout.release_without_traffic;
    let mut wait = None;
    for node in &doc.nodes[..doc.released.min(doc.nodes.len())] {
        let Some((_, r)) = inner.reports.get(&(doc.spec.id.clone(), node.clone())) else {
            wait.get_or_insert_with(|| format!("{node} has not reported"));
            continue;
        };
        match r.state {
            NodeState::Failed | NodeState::RolledBack | NodeState::Refused => {
                return Gate::Halt(format!(
                    "{node}: {}: {}",
                    r.state.as_str(),
                    r.reason.clone().unwrap_or_default()
                ));
            }
            NodeState::Superseded => {}
            NodeState::Pending | NodeState::Expired => {
                wait.get_or_insert_with(|| format!("{node} is {}", r.state.as_str()));
            }
            NodeState::Applied => {
                let h = &r.health;
                if h.calls >= rollout.min_calls && h.failures as f64 > rollout.max_failure_rate * h.calls as f64 {
                    return Gate::Halt(format!("{node}: {} of {} plugin calls failed", h.failures, h.calls));
                }
                if needs_traffic && h.calls < rollout.min_calls {
                    wait.get_or_insert_with(|| {
                        format!(
                            "{node} has seen {} of the {} plugin calls min_calls asks for (or set release_without_traffic)",
                            h.calls, rollout.min_calls
                        )
                    });
                } else if r.since_ms + rollout.soak_seconds * 1000 > now {
                    wait.get_or_insert_with(|| format!("{node} is soaking"));
                }
            }
        }
    }
    match wait {
        Some(why) => Gate::Wait(why),
        None => Gate::Pass,
    }
}

fn view(inner: &Inner, h: &Held, owned: bool) -> View {
    let d = &h.doc;
    let released: BTreeSet<&String> = d.nodes[..d.released.min(d.nodes.len())].iter().collect();
    let node_states = d
        .nodes
        .iter()
        .map(|n| {
            let report = inner
                .reports
                .get(&(d.spec.id.clone(), n.clone()))
                .map(|(_, r)| r.clone());
            let rel = released.contains(n);
            let state = match (&report, rel) {
                (Some(r), _) => r.state.as_str().to_string(),
                (None, true) => "pending".to_string(),
                (None, false) => "waiting".to_string(),
            };
            NodeView {
                node: n.clone(),
                released: rel,
                state,
                report,
            }
        })
        .collect();
    let waiting = match (&d.phase, owned) {
        (Phase::Rolling, true) => match gate(inner, d, now_ms()) {
            Gate::Wait(why) => Some(why),
            _ => None,
        },
        _ => None,
    };
    View {
        doc: d.clone(),
        owned,
        node_states,
        waiting,
    }
}

#[cfg(test)]
mod tests;
