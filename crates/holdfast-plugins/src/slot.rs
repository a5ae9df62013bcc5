//! A plugin slot: the active version, the previous one kept for rollback,
//! a pool of warm instances per version, the swap history, and the call
//! path with deadlines, memory caps and failure classification.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use arc_swap::ArcSwap;
use serde::Serialize;
use sha2::{Digest, Sha256};
use wasmtime::component::{Component, InstancePre};
use wasmtime::{Store, Trap};

use super::bindings;
use super::engine::Runtime;
use super::metrics::{FailureKind, SlotMetrics};
use super::state::EPOCH_TICK;
use super::state::{NodeContext, PluginState};
use super::{PluginError, SlotName};

/// Swap records kept per slot.
const HISTORY_LEN: usize = 100;

/// One call in this many is timed for the latency histogram.
pub const LATENCY_SAMPLE: u64 = 16;

/// How a plugin kind's generated bindings are instantiated and initialised.
pub trait Kind: Send + Sync + 'static {
    /// The slot this kind fills.
    const SLOT: SlotName;
    /// Pre-instantiated, type-checked component.
    type Pre: Clone + Send + Sync + 'static;
    /// An instance's exports.
    type Bindings: Send + 'static;
    /// Type-checks the component's exports against the world.
    fn pre(pre: InstancePre<PluginState>) -> wasmtime::Result<Self::Pre>;
    /// Instantiates.
    fn instantiate(pre: &Self::Pre, store: &mut Store<PluginState>) -> wasmtime::Result<Self::Bindings>;
    /// Calls the export `init`.
    fn init(b: &Self::Bindings, store: &mut Store<PluginState>, config: &str) -> wasmtime::Result<Result<(), String>>;
}

/// Declares a world's kind: the generated `*Pre` and bindings differ only in name.
macro_rules! world_kind {
    ($(#[$doc:meta])* $kind:ident, $slot:expr, $module:ident :: $pre:ident, $bindings:ident) => {
        $(#[$doc])*
        #[derive(Debug)]
        pub struct $kind;
        impl Kind for $kind {
            const SLOT: SlotName = $slot;
            type Pre = bindings::$module::$pre<PluginState>;
            type Bindings = bindings::$module::$bindings;
            fn pre(pre: InstancePre<PluginState>) -> wasmtime::Result<Self::Pre> {
                bindings::$module::$pre::new(pre)
            }
            fn instantiate(pre: &Self::Pre, store: &mut Store<PluginState>) -> wasmtime::Result<Self::Bindings> {
                pre.instantiate(store)
            }
            fn init(
                b: &Self::Bindings,
                store: &mut Store<PluginState>,
                config: &str,
            ) -> wasmtime::Result<Result<(), String>> {
                b.call_init(store, config)
            }
        }
    };
}

world_kind!(
    /// The router world.
    RouterKind, SlotName::Router, router::RouterPre, Router
);
world_kind!(
    /// The auth world.
    AuthKind, SlotName::Auth, auth::AuthPre, Auth
);
world_kind!(
    /// The content-source world.
    ContentKind, SlotName::ContentSource, content::ContentSourcePre, ContentSource
);

/// Per-slot limits.
#[derive(Debug, Clone, Copy)]
pub struct SlotLimits {
    /// Deadline of one call, ms.
    pub deadline_ms: u64,
    /// Linear-memory cap, bytes.
    pub memory_bytes: usize,
    /// Idle instances kept.
    pub pool_size: usize,
}

impl SlotLimits {
    fn deadline_ticks(&self) -> u64 {
        self.deadline_ms.div_ceil(EPOCH_TICK.as_millis() as u64).max(1)
    }
    /// `init` may do setup work: it gets ten call deadlines, at least one second.
    fn init_ticks(&self) -> u64 {
        (self.deadline_ticks() * 10).max(1000 / EPOCH_TICK.as_millis() as u64)
    }
}

/// A failed plugin call. The slot's failure policy decides what the caller gets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Failure {
    /// What went wrong.
    pub kind: FailureKind,
    /// Details for the log.
    pub message: String,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.kind.as_str(), self.message)
    }
}

/// One recorded load, swap or rollback.
#[derive(Debug, Clone, Serialize)]
pub struct SwapRecord {
    /// When, ms since the Unix epoch.
    pub at_unix_ms: u64,
    /// Slot.
    pub slot: SlotName,
    /// `load`, `swap` or `rollback`.
    pub action: &'static str,
    /// Version hash replaced (none for the first load).
    pub old: Option<String>,
    /// Version hash now active.
    pub new: String,
    /// Where the bytes came from: `embedded`, a path, or `admin-api`.
    pub source: String,
    /// Time from receiving the bytes to the switch, ms.
    pub duration_ms: f64,
}

/// What `plugin list` shows for a slot.
#[derive(Debug, Clone, Serialize)]
pub struct SlotStatus {
    /// Slot.
    pub slot: SlotName,
    /// Active version: the SHA-256 of its wasm, hex.
    pub version: String,
    /// Where it came from.
    pub source: String,
    /// When it became active, ms since the Unix epoch.
    pub loaded_at_unix_ms: u64,
    /// Calls answered by this version.
    pub calls: u64,
    /// Calls of this version that failed (all kinds).
    pub traps: u64,
    /// Of which deadline interruptions.
    pub timeouts: u64,
    /// Of which memory-cap failures.
    pub memory_failures: u64,
    /// The version kept for rollback.
    pub previous: Option<String>,
    /// Warm idle instances.
    pub idle_instances: usize,
    /// Call deadline, ms.
    pub deadline_ms: u64,
    /// Memory cap, MiB.
    pub memory_mib: u64,
}

struct Instance<K: Kind> {
    store: Store<PluginState>,
    bindings: K::Bindings,
}

/// One loaded version of a plugin.
pub struct Version<K: Kind> {
    hash: Arc<str>,
    source: String,
    loaded_at_unix_ms: u64,
    config_json: Arc<str>,
    pre: K::Pre,
    idle: Mutex<Vec<Instance<K>>>,
    calls: AtomicU64,
    failures: AtomicU64,
    timeouts: AtomicU64,
    memory_failures: AtomicU64,
}

impl<K: Kind> Version<K> {
    /// A version not yet warmed up, loaded now, with zeroed counters.
    fn new(hash: Arc<str>, source: String, config_json: Arc<str>, pre: K::Pre) -> Self {
        Version {
            hash,
            source,
            loaded_at_unix_ms: holdfast_model::unix_ms(),
            config_json,
            pre,
            idle: Mutex::new(Vec::new()),
            calls: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            timeouts: AtomicU64::new(0),
            memory_failures: AtomicU64::new(0),
        }
    }
}

/// Turns a call error into a failure, using what the store saw.
fn classify(error: &wasmtime::Error, state: &PluginState) -> Failure {
    // A memory bomb ends in a trap (the guest's allocator gives up at the
    // cap) or in the deadline while it is still growing: either way memory
    // is the cause (see `Limits::exhausted`).
    let interrupted = matches!(error.downcast_ref::<Trap>(), Some(Trap::Interrupt));
    let kind = if state.limits.exhausted(interrupted) {
        FailureKind::Memory
    } else if interrupted {
        FailureKind::Timeout
    } else {
        FailureKind::Trap
    };
    Failure {
        kind,
        message: format!("{error:#}"),
    }
}

/// Runs one call into an instance. An error is classified; a panic that
/// unwinds out of the call (a host import that failed in a way wasmtime does
/// not turn into a trap) is caught and counted as a trap, so no caller is
/// ever unwound. Either way the instance must be discarded. What the guest
/// wrote to stdout or stderr is logged, and is part of the failure's message.
fn guarded<R>(
    store: &mut Store<PluginState>,
    f: impl FnOnce(&mut Store<PluginState>) -> wasmtime::Result<R>,
) -> Result<R, Failure> {
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&mut *store)));
    let state = store.data();
    let output = state.output.take();
    let result = match outcome {
        Ok(Ok(value)) => {
            if let Some(text) = &output {
                tracing::info!(
                    target: "holdfast::plugin",
                    slot = state.slot.as_str(),
                    version = &*state.version,
                    "plugin output: {text}"
                );
            }
            return Ok(value);
        }
        Ok(Err(e)) => classify(&e, state),
        Err(panic) => {
            let what = holdfast_model::panic_message(&*panic);
            Failure {
                kind: if state.limits.hit {
                    FailureKind::Memory
                } else {
                    FailureKind::Trap
                },
                message: format!("the call panicked in the host: {what}"),
            }
        }
    };
    let mut failure = result;
    if let Some(text) = output {
        failure.message = format!("{}; plugin output: {text}", failure.message);
    }
    Err(failure)
}

/// A plugin slot.
pub struct Slot<K: Kind> {
    runtime: Arc<Runtime>,
    node: NodeContext,
    limits: SlotLimits,
    current: ArcSwap<Version<K>>,
    previous: Mutex<Option<Arc<Version<K>>>>,
    /// Serialises swaps and rollbacks; calls never take it.
    swap_lock: Mutex<()>,
    history: Mutex<VecDeque<SwapRecord>>,
    metrics: SlotMetrics,
}

impl<K: Kind> std::fmt::Debug for Slot<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slot")
            .field("slot", &K::SLOT)
            .field("version", &self.current.load().hash)
            .finish_non_exhaustive()
    }
}

impl<K: Kind> Slot<K> {
    /// Loads the first version.
    ///
    /// # Errors
    /// As for [`Slot::swap`].
    pub fn load(
        runtime: Arc<Runtime>,
        node: NodeContext,
        limits: SlotLimits,
        bytes: &[u8],
        source: String,
        config_json: Arc<str>,
    ) -> Result<Self, PluginError> {
        let metrics = SlotMetrics::new(&node.metrics, K::SLOT);
        let started = Instant::now();
        let version = build_version::<K>(&runtime, &node, &limits, bytes, source.clone(), config_json)?;
        let record = SwapRecord {
            at_unix_ms: holdfast_model::unix_ms(),
            slot: K::SLOT,
            action: "load",
            old: None,
            new: version.hash.to_string(),
            source,
            duration_ms: started.elapsed().as_secs_f64() * 1e3,
        };
        metrics.idle.set(1);
        Ok(Slot {
            runtime,
            node,
            limits,
            current: ArcSwap::from_pointee(version),
            previous: Mutex::new(None),
            swap_lock: Mutex::new(()),
            history: Mutex::new(VecDeque::from([record])),
            metrics,
        })
    }

    /// Calls into the active version. Returns the hash of the version that
    /// answered and the result, or the failure after which the instance was
    /// discarded (a fresh one is created for the next call).
    pub fn call<R>(
        &self,
        f: impl FnOnce(&K::Bindings, &mut Store<PluginState>) -> wasmtime::Result<R>,
    ) -> (Arc<str>, Result<R, Failure>) {
        let version = self.current.load();
        self.metrics.calls.inc();
        let n = version.calls.fetch_add(1, Ordering::Relaxed);
        // The latency histogram samples one call in LATENCY_SAMPLE: reading
        // the clock twice on every call would cost more than the metric is worth.
        let started = n.is_multiple_of(LATENCY_SAMPLE).then(Instant::now);
        let result = self.call_version(&version, f);
        if let Err(failure) = &result {
            version.failures.fetch_add(1, Ordering::Relaxed);
            match failure.kind {
                FailureKind::Timeout => {
                    version.timeouts.fetch_add(1, Ordering::Relaxed);
                    self.metrics.timeouts.inc();
                }
                FailureKind::Memory => {
                    version.memory_failures.fetch_add(1, Ordering::Relaxed);
                    self.metrics.memory.inc();
                }
                FailureKind::Trap => {
                    self.metrics.traps.inc();
                }
                FailureKind::Unavailable => {
                    self.metrics.unavailable.inc();
                }
            };
            tracing::warn!(
                slot = K::SLOT.as_str(),
                version = &version.hash[..12],
                "plugin call failed, instance discarded: {failure}"
            );
        }
        if let Some(started) = started {
            self.metrics.duration.observe(started.elapsed().as_secs_f64());
        }
        (version.hash.clone(), result)
    }

    fn call_version<R>(
        &self,
        version: &Version<K>,
        f: impl FnOnce(&K::Bindings, &mut Store<PluginState>) -> wasmtime::Result<R>,
    ) -> Result<R, Failure> {
        let popped = holdfast_model::lock(&version.idle).pop();
        let mut instance = match popped {
            Some(i) => i,
            None => new_instance::<K>(&self.runtime, &self.node, &self.limits, version)?,
        };
        let ticks = self.limits.deadline_ticks();
        instance.store.data_mut().begin_call(ticks);
        instance.store.set_epoch_deadline(ticks);
        let Instance { store, bindings } = &mut instance;
        match guarded(store, |store| f(bindings, store)) {
            Ok(value) => {
                let mut idle = holdfast_model::lock(&version.idle);
                if idle.len() < self.limits.pool_size {
                    idle.push(instance);
                }
                Ok(value)
            }
            // The instance is dropped here: its memory goes back to the pool.
            Err(failure) => Err(failure),
        }
    }

    /// Builds a version from `bytes` and switches to it atomically. Calls in
    /// flight finish on the old version; every call that starts after this
    /// returns sees the new one. On any error the old version stays active.
    ///
    /// # Errors
    /// Not a component, a component of another world, `init` failed or trapped.
    pub fn swap(&self, bytes: &[u8], source: String, config_json: Option<Arc<str>>) -> Result<SwapRecord, PluginError> {
        let _guard = holdfast_model::lock(&self.swap_lock);
        let started = Instant::now();
        let config_json = config_json.unwrap_or_else(|| self.current.load().config_json.clone());
        let built = build_version::<K>(
            &self.runtime,
            &self.node,
            &self.limits,
            bytes,
            source.clone(),
            config_json,
        );
        let version = self.accept(built, "plugin swap rejected, old version stays active")?;
        Ok(self.install(version, started, source, "swap"))
    }

    /// A built version, or the error counted and logged (the old version
    /// stays active).
    fn accept(&self, built: Result<Version<K>, PluginError>, what: &str) -> Result<Arc<Version<K>>, PluginError> {
        built.map(Arc::new).map_err(|e| {
            self.metrics.swaps_rejected.inc();
            tracing::warn!(slot = K::SLOT.as_str(), "{what}: {e}");
            e
        })
    }

    /// Runs the current component again with a new plugin config: a new
    /// version (same hash) whose instances are initialised with
    /// `config_json`, switched to like a swap. The old one is kept for
    /// rollback.
    ///
    /// # Errors
    /// `init` refused the config or trapped; the old version stays active.
    pub fn reconfigure(&self, config_json: Arc<str>) -> Result<SwapRecord, PluginError> {
        let _guard = holdfast_model::lock(&self.swap_lock);
        let started = Instant::now();
        let current = self.current.load_full();
        let version = Version::new(
            current.hash.clone(),
            current.source.clone(),
            config_json,
            current.pre.clone(),
        );
        let built = warm_up(&self.runtime, &self.node, &self.limits, version);
        let version = self.accept(built, "plugin config rejected, old config stays active")?;
        let source = current.source.clone();
        Ok(self.install(version, started, source, "reconfigure"))
    }

    /// Switches to `version`, keeping the current one for rollback.
    fn install(&self, version: Arc<Version<K>>, started: Instant, source: String, action: &'static str) -> SwapRecord {
        let new_hash = version.hash.to_string();
        let old = self.current.swap(version);
        let duration = started.elapsed();
        // Keep the old version for rollback, without its warm instances.
        holdfast_model::lock(&old.idle).clear();
        let old_hash = old.hash.to_string();
        *holdfast_model::lock(&self.previous) = Some(old);
        self.metrics.swaps_ok.inc();
        self.metrics.swap_duration.observe(duration.as_secs_f64());
        let record = SwapRecord {
            at_unix_ms: holdfast_model::unix_ms(),
            slot: K::SLOT,
            action,
            old: Some(old_hash),
            new: new_hash,
            source,
            duration_ms: duration.as_secs_f64() * 1e3,
        };
        self.record(record.clone());
        tracing::info!(
            slot = K::SLOT.as_str(),
            old = record.old.as_deref().map(|h| &h[..12]),
            new = &record.new[..12],
            duration_ms = record.duration_ms,
            "plugin swapped"
        );
        record
    }

    /// Switches back to the previous version; the current one becomes the previous.
    ///
    /// # Errors
    /// No previous version, or it no longer initialises.
    pub fn rollback(&self) -> Result<SwapRecord, PluginError> {
        let _guard = holdfast_model::lock(&self.swap_lock);
        let started = Instant::now();
        let mut previous = holdfast_model::lock(&self.previous);
        let target = previous.clone().ok_or(PluginError::NoPrevious(K::SLOT))?;
        // Warm one instance first so a broken rollback leaves things as they are.
        let warm = new_instance::<K>(&self.runtime, &self.node, &self.limits, &target)
            .map_err(|f| PluginError::InitFailed(f.to_string()))?;
        holdfast_model::lock(&target.idle).push(warm);
        let old = self.current.swap(target.clone());
        holdfast_model::lock(&old.idle).clear();
        let record = SwapRecord {
            at_unix_ms: holdfast_model::unix_ms(),
            slot: K::SLOT,
            action: "rollback",
            old: Some(old.hash.to_string()),
            new: target.hash.to_string(),
            source: target.source.clone(),
            duration_ms: started.elapsed().as_secs_f64() * 1e3,
        };
        *previous = Some(old);
        self.metrics.rollbacks.inc();
        self.record(record.clone());
        tracing::info!(slot = K::SLOT.as_str(), new = &record.new[..12], "plugin rolled back");
        Ok(record)
    }

    fn record(&self, record: SwapRecord) {
        let mut h = holdfast_model::lock(&self.history);
        if h.len() == HISTORY_LEN {
            h.pop_front();
        }
        h.push_back(record);
    }

    /// Loads, swaps and rollbacks, oldest first.
    pub fn history(&self) -> Vec<SwapRecord> {
        self.history
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect()
    }

    /// The hash of the active version.
    pub fn version(&self) -> Arc<str> {
        self.current.load().hash.clone()
    }

    /// The plugin config (JSON) of the active version.
    pub fn config_json(&self) -> Arc<str> {
        self.current.load().config_json.clone()
    }

    /// The slot's status.
    pub fn status(&self) -> SlotStatus {
        let v = self.current.load();
        let idle = holdfast_model::lock(&v.idle).len();
        self.metrics.idle.set(idle as i64);
        SlotStatus {
            slot: K::SLOT,
            version: v.hash.to_string(),
            source: v.source.clone(),
            loaded_at_unix_ms: v.loaded_at_unix_ms,
            calls: v.calls.load(Ordering::Relaxed),
            traps: v.failures.load(Ordering::Relaxed),
            timeouts: v.timeouts.load(Ordering::Relaxed),
            memory_failures: v.memory_failures.load(Ordering::Relaxed),
            previous: self
                .previous
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_ref()
                .map(|p| p.hash.to_string()),
            idle_instances: idle,
            deadline_ms: self.limits.deadline_ms,
            memory_mib: (self.limits.memory_bytes >> 20) as u64,
        }
    }
}

/// Compiles, type-checks against the world, instantiates one instance and
/// runs its `init`. The warm instance goes into the version's pool.
fn build_version<K: Kind>(
    runtime: &Runtime,
    node: &NodeContext,
    limits: &SlotLimits,
    bytes: &[u8],
    source: String,
    config_json: Arc<str>,
) -> Result<Version<K>, PluginError> {
    let hash: Arc<str> = hex::encode(Sha256::digest(bytes)).into();
    let component = runtime.compile(bytes, &hash)?;
    let pre = pre_of::<K>(runtime, &component)?;
    warm_up(runtime, node, limits, Version::new(hash, source, config_json, pre))
}

/// Type-checks a compiled component against `K`'s world (its imports
/// against what the host provides, its exports against what the world
/// requires) without instantiating it.
pub(crate) fn pre_of<K: Kind>(runtime: &Runtime, component: &Component) -> Result<K::Pre, PluginError> {
    runtime
        .linker(K::SLOT)
        .instantiate_pre(component)
        .and_then(K::pre)
        .map_err(|e| PluginError::WrongWorld {
            slot: K::SLOT,
            detail: format!("{e:#}"),
        })
}

/// Creates a version's first instance (running `init` with its config).
fn warm_up<K: Kind>(
    runtime: &Runtime,
    node: &NodeContext,
    limits: &SlotLimits,
    version: Version<K>,
) -> Result<Version<K>, PluginError> {
    let first = new_instance::<K>(runtime, node, limits, &version).map_err(|f| match f.kind {
        FailureKind::Unavailable => PluginError::InitFailed(f.message),
        _ => PluginError::InitTrapped(f.to_string()),
    })?;
    holdfast_model::lock(&version.idle).push(first);
    Ok(version)
}

/// Instantiates a version and runs `init`. An `init` that returns an error
/// is `Unavailable`; one that traps is classified like any call.
fn new_instance<K: Kind>(
    runtime: &Runtime,
    node: &NodeContext,
    limits: &SlotLimits,
    version: &Version<K>,
) -> Result<Instance<K>, Failure> {
    let short: Arc<str> = version.hash[..12].into();
    let state = PluginState::new(
        node.clone(),
        K::SLOT,
        short,
        version.config_json.clone(),
        limits.memory_bytes,
    );
    let mut store = Store::new(&runtime.engine, state);
    store.limiter(|s| &mut s.limits);
    store.epoch_deadline_callback(|mut ctx| Ok(ctx.data_mut().deadline.on_expiry()));
    store.data_mut().begin_call(limits.init_ticks());
    store.set_epoch_deadline(limits.init_ticks());
    let bindings = guarded(&mut store, |store| K::instantiate(&version.pre, store)).map_err(|mut f| {
        if f.kind == FailureKind::Trap {
            f.kind = FailureKind::Unavailable;
            f.message = format!("cannot instantiate: {}", f.message);
        }
        f
    })?;
    let config = version.config_json.clone();
    match guarded(&mut store, |store| K::init(&bindings, store, &config)) {
        Ok(Ok(())) => Ok(Instance { store, bindings }),
        Ok(Err(message)) => Err(Failure {
            kind: FailureKind::Unavailable,
            message: format!("init returned an error: {message}"),
        }),
        Err(mut f) => {
            f.message = format!("init trapped: {}", f.message);
            Err(f)
        }
    }
}
