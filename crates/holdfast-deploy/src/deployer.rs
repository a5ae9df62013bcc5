//! The deployer: one per node, the roles it plays under one lock (the
//! owner's book, the node's received documents, applied state and health
//! watch, the report book, the revisions seen) and the operations that
//! cross them.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use base64::Engine as _;
use tokio::sync::{Notify, watch};

use crate::apply::Applying;
use crate::held::{B64, Held, open_signed};
use crate::metrics::DeployMetrics;
use crate::model::{self, Doc, Health, NodeState, Phase, Report, Signed, Spec};
use crate::owner::{self, Owner};
use crate::received::Received;
use crate::reports::ReportBook;
use crate::revisions::Revisions;
use crate::store::DeployStore;
use crate::trust::Trust;
use crate::view::View;
use crate::watch::{HealthWatch, Observation};
use crate::{Applier, Bundle, DeployError, LocalStatus, Options};
use holdfast_registry::{Hop, Registry};

/// What the deployer keeps under its one lock, by role. An offer, an
/// import or a rollout step reads across roles (a revision seen by either,
/// the reports the gate reads), so they change together.
pub(crate) struct Book {
    /// The deployments this node owns.
    pub(crate) owner: Owner,
    /// The deployments received from above.
    pub(crate) received: Received,
    /// The highest revision seen of each id, owned or received.
    pub(crate) seen: Revisions,
    /// What this node applied, and the content it refuses.
    pub(crate) applying: Applying,
    /// The health watch of what it applied.
    pub(crate) watch: HealthWatch,
    /// Every node's last report.
    pub(crate) reports: ReportBook,
}

impl Book {
    /// Every document held with whether it is owned: owned first, then the
    /// received ones under ids not owned here.
    fn held(&self) -> impl Iterator<Item = (&Held, bool)> {
        self.owner.docs().map(|h| (h, true)).chain(
            self.received
                .docs()
                .filter(|h| !self.owner.owns(&h.doc.spec.id))
                .map(|h| (h, false)),
        )
    }

    /// A document held under `id`, owned first.
    fn find(&self, id: &str) -> Option<&Held> {
        self.owner.get(id).or_else(|| self.received.get(id))
    }

    /// The components the documents held and the applied state need.
    fn needed_components(&self) -> BTreeSet<String> {
        let mut keep: BTreeSet<String> = self
            .owner
            .docs()
            .chain(self.received.docs())
            .flat_map(|h| h.doc.spec.components().map(str::to_string).collect::<Vec<_>>())
            .collect();
        if let Some(a) = self.applying.applied() {
            keep.extend(a.overlay.plugins.values().filter_map(|p| p.sha256.clone()));
        }
        keep
    }

    /// The error for an id that is not a live deployment owned here.
    fn not_owned(&self, id: &str) -> DeployError {
        match self.received.get(id) {
            Some(h) => DeployError::Conflict(format!(
                "deployment {id:?} is owned by {}; change it there",
                h.doc.owner
            )),
            None => DeployError::NotFound(id.to_string()),
        }
    }
}

/// A node's deployments. See the crate docs.
pub struct Deployer {
    node: String,
    parent: Option<String>,
    accept: bool,
    max_component_bytes: u64,
    store: DeployStore,
    pub(crate) registry: Arc<Registry>,
    trust: Trust,
    pub(crate) events: DeployMetrics,
    book: Mutex<Book>,
    docs_changed: watch::Sender<u64>,
    reports_changed: watch::Sender<u64>,
    kick: Notify,
    fleet: Arc<crate::fleet::Fleet>,
}

impl std::fmt::Debug for Deployer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deployer")
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
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
        metrics: DeployMetrics,
    ) -> Result<Deployer, DeployError> {
        let node = options.node_id;
        let events = metrics;
        let reports_changed = watch::channel(0).0;
        let owner = Owner::open(
            node.clone(),
            registry.clone(),
            store.clone(),
            events.clone(),
            options.signer,
            options.expiry_seconds,
        )?;
        let received = Received::open(store.clone(), events.clone())?;
        let seen = Revisions::new(store.seen()?, owner.docs().chain(received.docs()));
        let applying = Applying::open(node.clone(), store.clone(), events.clone())?;
        let watch = HealthWatch::open(store.clone(), applying.applied())?;
        let reports = ReportBook::open(node.clone(), store.clone(), reports_changed.clone())?;
        let fleet = Arc::new(crate::fleet::Fleet::open(
            &node,
            store.clone(),
            Some(registry.clone()),
            options.fleet_report,
        ));
        Ok(Deployer {
            fleet,
            trust: Trust::new(node.clone(), options.verifier),
            node,
            parent: options.parent_id,
            accept: options.accept,
            max_component_bytes: options.max_component_bytes,
            store,
            registry,
            events,
            book: Mutex::new(Book {
                owner,
                received,
                seen,
                applying,
                watch,
                reports,
            }),
            docs_changed: watch::channel(0).0,
            reports_changed,
            kick: Notify::new(),
        })
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Book> {
        holdfast_model::lock(&self.book)
    }

    fn bump_docs(&self) {
        self.docs_changed.send_modify(|v| *v += 1);
        self.kick.notify_one();
    }

    /// What the deployer counts.
    pub fn metrics(&self) -> &DeployMetrics {
        &self.events
    }

    /// The fleet view of this node's subtree.
    pub fn fleet(&self) -> &Arc<crate::fleet::Fleet> {
        &self.fleet
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

    /// The gateways (and this node) a target names, in rollout order:
    /// by id, this node last.
    ///
    /// # Errors
    /// A listed node that is not a gateway known here.
    pub fn resolve(&self, target: &model::Target) -> Result<Vec<String>, DeployError> {
        owner::resolve(&self.registry, &self.node, target)
    }

    /// Creates a deployment owned by this node and starts its rollout.
    ///
    /// # Errors
    /// Invalid spec, unknown components, an id in use, no signing key.
    pub fn create(&self, spec: Spec) -> Result<Doc, DeployError> {
        let spec = owner::prepare(&self.store, spec)?;
        let doc = {
            let book = &mut *self.lock();
            book.owner.create(spec, &mut book.seen, &mut book.reports)?
        };
        self.bump_docs();
        Ok(doc)
    }

    /// Rolls a deployment back everywhere: every node returns to what it
    /// ran before it.
    ///
    /// # Errors
    /// Not owned here, or signing and storage errors.
    pub fn rollback(&self, id: &str) -> Result<Doc, DeployError> {
        let doc = {
            let book = &mut *self.lock();
            book.owner
                .withdraw(id, false, &mut book.seen, &mut book.reports)?
                .ok_or_else(|| book.not_owned(id))?
        };
        tracing::info!(deployment = id, "deploy: rolled back by the operator");
        self.bump_docs();
        Ok(doc)
    }

    /// Deletes a deployment: nodes return to what they ran before it. What
    /// stays is a signed tombstone (a withdrawn, deleted revision) until it
    /// expires, so that no node takes an older revision again.
    ///
    /// # Errors
    /// Not owned here (or deleted already), or signing and storage errors.
    pub fn delete(&self, id: &str) -> Result<(), DeployError> {
        {
            let book = &mut *self.lock();
            book.owner
                .withdraw(id, true, &mut book.seen, &mut book.reports)?
                .ok_or_else(|| book.not_owned(id))?;
        }
        self.bump_docs();
        self.gc_blobs();
        Ok(())
    }

    /// Releases waves and halts rollouts (owner), and follows registry
    /// changes in targets. Called about once a second.
    pub(crate) fn owner_tick(&self) {
        let changed = {
            let book = &mut *self.lock();
            book.owner.tick(&mut book.seen, &mut book.reports)
        };
        if changed {
            self.bump_docs();
        }
    }

    // ------------------------------------------------------ every node

    /// Every deployment this node holds (owned first), with node states.
    pub fn list(&self) -> Vec<View> {
        let book = self.lock();
        book.held()
            .map(|(h, owned)| View::of(&book.reports, h, owned))
            .collect()
    }

    /// One deployment.
    pub fn show(&self, id: &str) -> Option<View> {
        let book = self.lock();
        let owned = book.owner.owns(id);
        book.find(id).map(|h| View::of(&book.reports, h, owned))
    }

    /// This node's own deployment state.
    pub fn local_status(&self) -> LocalStatus {
        let book = self.lock();
        LocalStatus {
            node: self.node.clone(),
            accept: self.accept,
            can_sign: book.owner.can_sign(),
            ancestors: book.received.ancestors().to_vec(),
            applied: book.applying.applied().cloned(),
            refused_content: book.applying.refused(),
        }
    }

    /// What a child gets: this node and its ancestors, and the documents
    /// that concern the child's subtree and whose components are here.
    pub fn offer_for(&self, child: &str) -> (Vec<String>, Vec<Signed>) {
        let book = self.lock();
        let mut ancestors = vec![self.node.clone()];
        ancestors.extend(book.received.ancestors().iter().cloned());
        let docs = self.offered(&book, child).map(|h| h.signed.clone()).collect();
        (ancestors, docs)
    }

    /// The documents that concern `child`'s subtree and can be served.
    fn offered<'a>(&'a self, book: &'a Book, child: &'a str) -> impl Iterator<Item = &'a Held> + 'a {
        let via_child = move |n: &String| n == child || self.registry.next_hop(n) == Hop::Child(child.to_string());
        book.held().map(|(h, _)| h).filter(move |h| {
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
            let book = self.lock();
            self.offered(&book, child)
                .any(|h| h.doc.spec.components().any(|s| s == sha))
        };
        if !offered {
            return Err(DeployError::NotFound(format!("component {sha} for {child}")));
        }
        self.read_component(sha)
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
        // Signatures are checked without the lock.
        let mut verified = BTreeMap::new();
        let mut refusals = Vec::new();
        for signed in docs {
            match self.trust.hold(signed.clone(), &ancestors) {
                Ok(h) => {
                    verified.insert(h.doc.spec.id.clone(), h);
                }
                Err(e) => {
                    self.events.count("refused-signature");
                    tracing::warn!(error = %e, "deploy: a deployment from the parent was refused");
                    if let Ok((doc, _)) = open_signed(&signed) {
                        refusals.push((doc, e.to_string()));
                    }
                }
            }
        }
        let mut guard = self.lock();
        let book = &mut *guard;
        let changed = match book
            .received
            .take_offer(ancestors, verified, &mut book.seen, &book.owner)
        {
            Ok(changed) => changed,
            Err(e) => {
                tracing::error!(error = %e, "deploy: cannot store the parent's deployments");
                return Vec::new();
            }
        };
        if changed {
            // Reports of deployments no longer held go.
            let known: BTreeSet<String> = book
                .owner
                .docs()
                .map(|h| h.doc.spec.id.clone())
                .chain(book.received.ids().cloned())
                .collect();
            book.reports.keep_only(&known);
        }
        for (doc, reason) in refusals {
            if doc.nodes.contains(&self.node) {
                book.reports
                    .record(&doc, NodeState::Refused, Some(reason), BTreeMap::new());
            }
        }
        let missing = book.received.missing();
        drop(guard);
        if changed {
            self.bump_docs();
            self.gc_blobs();
        }
        missing
    }

    /// Components the documents held need and this node lacks.
    pub fn missing_components(&self) -> Vec<String> {
        self.lock().received.missing()
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
            self.events.count("damaged-component");
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
                self.events.count("component-stored");
                self.bump_docs();
                Ok(())
            }
            Err(e @ DeployError::HashMismatch { .. }) => {
                self.events.count("refused-hash");
                let book = &mut *self.lock();
                let docs: Vec<Doc> = book
                    .received
                    .docs()
                    .filter(|h| h.doc.spec.components().any(|s| s == sha) && h.doc.nodes.contains(&self.node))
                    .map(|h| h.doc.clone())
                    .collect();
                for d in docs {
                    book.reports
                        .record(&d, NodeState::Refused, Some(e.to_string()), BTreeMap::new());
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
        let mut keep = self.lock().needed_components();
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
        let book = self.lock();
        book.reports.since(since, |d| !book.owner.owns(d))
    }

    /// Takes reports from child `child` about nodes in its subtree.
    pub fn receive_reports(&self, child: &str, reports: Vec<Report>) {
        let book = &mut *self.lock();
        let (owner, received) = (&book.owner, &book.received);
        book.reports.take(reports, |r| {
            if !owner.owns(&r.deployment) && received.get(&r.deployment).is_none() {
                return false;
            }
            let ok = r.node == child || self.registry.next_hop(&r.node) == Hop::Child(child.to_string());
            if !ok {
                tracing::warn!(child, node = %r.node, "deploy: a child reported about a node outside its subtree; ignored");
            }
            ok
        });
    }

    /// Imports an exported deployment: verified like one from the parent,
    /// components checked against their hashes.
    ///
    /// # Errors
    /// A refused signature, a bad component, storage errors.
    pub fn import(&self, bundle: Bundle) -> Result<Doc, DeployError> {
        let mut ancestors = self.lock().received.ancestors().to_vec();
        if let Some(p) = &self.parent
            && !ancestors.contains(p)
        {
            ancestors.insert(0, p.clone());
        }
        let candidate = match self.trust.hold(bundle.signed.clone(), &ancestors) {
            Ok(h) => h,
            Err(e) => {
                self.events.count("refused-signature");
                return Err(e);
            }
        };
        let doc = candidate.doc.clone();
        if let Some(expires) = doc.expires_ms.filter(|_| doc.expired(holdfast_model::unix_ms())) {
            self.events.count("refused-expired");
            return Err(DeployError::Refused(format!(
                "revision {} of {:?} expired at {} (ms since the Unix epoch); export a fresh one from {}",
                doc.revision, doc.spec.id, expires, doc.owner
            )));
        }
        {
            let book = self.lock();
            if let Err(e) = book.received.check(&candidate, &book.seen, &book.owner) {
                self.events.count("refused-rollback");
                return Err(e);
            }
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
                    self.events.count("refused-hash");
                }
                return Err(e);
            }
        }
        {
            let book = &mut *self.lock();
            book.received.import(candidate, &mut book.seen, &book.owner)?;
        }
        self.events.count("imported");
        self.bump_docs();
        Ok(doc)
    }

    /// An owned or held deployment with its components, for `import`.
    ///
    /// # Errors
    /// Unknown id, or a missing component.
    pub fn export(&self, id: &str) -> Result<Bundle, DeployError> {
        let h = self
            .lock()
            .find(id)
            .cloned()
            .ok_or_else(|| DeployError::NotFound(id.to_string()))?;
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

    /// Decides which deployment this node runs, applies it when that
    /// changed, and reports. Blocking.
    pub(crate) fn evaluate(&self, applier: &dyn Applier) {
        // A failed apply marks its content bad; try again with the rest.
        for _ in 0..4 {
            if !self.evaluate_once(applier) {
                return;
            }
        }
    }

    /// Returns true when it should run again.
    fn evaluate_once(&self, applier: &dyn Applier) -> bool {
        let (held, change) = {
            let book = &mut *self.lock();
            let held: Vec<Doc> = book.held().map(|(h, _)| h.doc.clone()).collect();
            let change = book.applying.plan(&held, &mut book.reports, holdfast_model::unix_ms());
            (held, change)
        };
        let Some(change) = change else { return false };
        // The applier checks that each deployed component is the one in
        // force (except in slots the node pins).
        let result = applier.apply(change.overlay.as_ref());
        let mut guard = self.lock();
        let book = &mut *guard;
        let previous = change.previous.as_ref();
        match (result, change.chosen) {
            (Ok(versions), Some(doc)) => {
                let overlay = change.overlay.clone().unwrap_or_default();
                let applied = book.applying.applied_now(&doc, overlay, versions.clone());
                book.watch.start(&applied, &doc.spec.rollout, applier.counters());
                book.reports.record(&doc, NodeState::Applied, None, versions);
                book.applying
                    .report_previous(&mut book.reports, previous, &held, Some(&doc));
                true
            }
            (Ok(_), None) => {
                book.applying.cleared();
                book.watch.stop(true);
                book.applying.report_previous(&mut book.reports, previous, &held, None);
                true
            }
            (Err(reason), Some(doc)) => {
                book.applying.failed(&doc, &reason, &mut book.reports);
                drop(guard);
                // Put back what ran before (the applier left nothing of the
                // failed one).
                if let Err(e) = applier.apply(previous.map(|a| &a.overlay)) {
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

    /// Watches the deployed plugins; rolls back when they fail past the
    /// deployment's threshold, and sends their health up. Blocking.
    pub(crate) fn watch_health(&self, applier: &dyn Applier) {
        let book = &mut *self.lock();
        let Some(applied) = book.applying.applied().cloned() else {
            return;
        };
        let now = holdfast_model::unix_ms();
        match book.watch.observe(Some(&applied), || applier.counters(), now) {
            Observation::Idle | Observation::Healthy { due: false, .. } => {}
            Observation::Failing {
                calls,
                failures,
                reason,
            } => {
                tracing::warn!(deployment = %applied.deployment, %reason, "deploy: the deployed plugin fails; rolling back");
                self.events.count("rolled-back");
                book.applying.mark_bad(&applied.deployment, &applied.digest, &reason);
                book.watch.stop(true);
                if let Some(doc) = book.find(&applied.deployment).map(|h| h.doc.clone()) {
                    book.reports
                        .record(&doc, NodeState::RolledBack, Some(reason), BTreeMap::new());
                    if let Some(mut rep) = book.reports.mine(&applied.deployment).cloned() {
                        rep.health.calls = calls;
                        rep.health.failures = failures;
                        book.reports.put(rep);
                    }
                }
                self.kick.notify_one();
            }
            Observation::Healthy {
                calls,
                failures,
                due: true,
            } => {
                // Health goes up when it changed, at most every 2 s.
                if let Some(mut rep) = book.reports.mine(&applied.deployment).cloned()
                    && matches!(rep.state, NodeState::Applied | NodeState::Expired)
                {
                    let (link, outbox) = applier.node_health();
                    rep.health = Health {
                        calls,
                        failures,
                        link,
                        outbox_messages: outbox,
                    };
                    rep.at_ms = now;
                    book.reports.put(rep);
                }
            }
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
