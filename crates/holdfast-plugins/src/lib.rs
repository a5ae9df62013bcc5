//! # holdfast-plugins
//!
//! The plugin runtime: sandboxed WebAssembly components behind the WIT
//! contract `holdfast:gateway@0.1.0`, one slot per plugin kind.
//!
//! - One wasmtime [`Engine`](wasmtime::Engine) with the pooling allocator;
//!   compiled components are cached on disk by wasm hash and engine version.
//! - Each slot keeps a pool of warm instances of its active version. A call
//!   runs under an epoch deadline and a memory cap; an instance that traps,
//!   times out or hits the cap is discarded and the slot's failure policy
//!   answers instead ([`Failure`]). Other slots are unaffected.
//! - [`PluginHost::swap`] compiles, type-checks, instantiates and runs
//!   `init` before an atomic switch; any failure leaves the old version
//!   active. The previous version is kept for [`PluginHost::rollback`].
//!
//! Only this crate touches wasmtime. The WIT types stay inside it: the
//! rest of the node passes and receives `holdfast-model` types, converted
//! here at the edge.

pub mod bindings;
pub mod config;
mod convert;
mod embedded;
mod engine;
mod fallback;
pub mod message;
mod metrics;
mod slot;
mod state;
mod stdio;
pub mod watch;

use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use wasmtime::component::Resource;

pub use self::embedded::{artifacts, embedded_plugin};
pub use self::engine::Runtime;
pub use self::message::MessageRep;
pub use self::metrics::{FailureKind, PluginMetrics};
use self::slot::{AuthKind, ContentKind, Kind, RouterKind, Slot, SlotLimits};
pub use self::slot::{Failure, SlotStatus, SwapRecord};
pub use self::state::{LOG_MESSAGE_MAX, LOG_RECORDS_PER_CALL, NodeContext};
use crate::config::{ContentFailurePolicy, PluginsConfig, RouterFailurePolicy, SlotConfig};
pub use holdfast_model::Message;
pub use holdfast_model::policy::{
    Action, Authorized, AuthzDecision, ConnectInfo, LocalAction, Operation, Policy, Principal, Refusal, RefusalCode,
    RouteOutcome, Transport, UpstreamAction,
};
pub use holdfast_model::{CachePlan, ContentClass, ContentDecision, ContentPolicy, RequestHead};

/// A plugin slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SlotName {
    /// Decides where messages go.
    Router,
    /// Decides who connects and what they may do.
    Auth,
    /// Decides what the range cache serves.
    ContentSource,
}

impl SlotName {
    /// Every slot.
    pub const ALL: [SlotName; 3] = [SlotName::Router, SlotName::Auth, SlotName::ContentSource];

    /// The slot's name as used in config, CLI and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            SlotName::Router => "router",
            SlotName::Auth => "auth",
            SlotName::ContentSource => "content-source",
        }
    }
}

impl std::fmt::Display for SlotName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for SlotName {
    type Err = PluginError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SlotName::ALL
            .into_iter()
            .find(|n| n.as_str() == s)
            .ok_or_else(|| PluginError::UnknownSlot(s.to_string()))
    }
}

/// Errors loading, swapping or rolling back plugins.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    /// No such slot.
    #[error("unknown plugin slot {0:?} (expected router, auth or content-source)")]
    UnknownSlot(String),
    /// The bytes are not a valid WebAssembly component.
    #[error("not a valid plugin component: {0}")]
    InvalidComponent(String),
    /// The component does not implement the slot's world.
    #[error("component does not implement the {slot} world of holdfast:gateway@0.1.0: {detail}")]
    WrongWorld {
        /// The slot.
        slot: SlotName,
        /// What wasmtime found missing or mismatched.
        detail: String,
    },
    /// The component implements none of the plugin worlds
    /// ([`PluginHost::check_component`] with no slot named).
    #[error(
        "component implements none of the plugin worlds of holdfast:gateway@0.1.0 (router, auth, content-source): {0}"
    )]
    NoWorld(String),
    /// `init` returned an error or the instance could not be created.
    #[error("plugin init failed: {0}")]
    InitFailed(String),
    /// `init` trapped, timed out or hit the memory cap.
    #[error("plugin init trapped: {0}")]
    InitTrapped(String),
    /// Rollback with nothing to roll back to.
    #[error("slot {0} has no previous version to roll back to")]
    NoPrevious(SlotName),
    /// A plugin file could not be read.
    #[error("cannot read plugin file {path}: {source}")]
    Read {
        /// The file.
        path: std::path::PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The engine could not be set up.
    #[error("plugin engine: {0}")]
    Engine(String),
}

/// The answer of a plugin call: the version that answered, the value after
/// the failure policy, and the failure if there was one.
#[derive(Debug, Clone)]
pub struct Answer<T> {
    /// Hash of the version that answered.
    pub version: Arc<str>,
    /// The value (the policy's value when the call failed).
    pub value: T,
    /// Set when the call failed and the policy answered.
    pub failure: Option<Failure>,
}

impl<T> Answer<T> {
    /// The plugin's value, or on failure the policy's value for it.
    fn new(version: Arc<str>, result: Result<T, Failure>, policy: impl FnOnce(&Failure) -> T) -> Self {
        match result {
            Ok(value) => Answer {
                version,
                value,
                failure: None,
            },
            Err(failure) => Answer {
                version,
                value: policy(&failure),
                failure: Some(failure),
            },
        }
    }
}

/// The loaded plugins of a node.
pub struct PluginHost {
    runtime: Arc<Runtime>,
    router: Slot<RouterKind>,
    auth: Slot<AuthKind>,
    content: Slot<ContentKind>,
    router_policy: RouterFailurePolicy,
    content_policy: ContentFailurePolicy,
    /// The origins the content-source slot's config names (for its failure
    /// policy), parsed from the config they were read from.
    content_origins: std::sync::Mutex<(Arc<str>, Arc<fallback::Origins>)>,
}

impl std::fmt::Debug for PluginHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginHost")
            .field("router", &self.router)
            .field("auth", &self.auth)
            .field("content", &self.content)
            .finish_non_exhaustive()
    }
}

fn limits<P>(c: &SlotConfig<P>) -> SlotLimits {
    SlotLimits {
        deadline_ms: c.deadline_ms,
        memory_bytes: (c.memory_mib as usize) << 20,
        pool_size: c.pool_size,
    }
}

/// Loads a slot's first version: the configured file, or the embedded default.
fn load_slot<K: Kind, P>(
    runtime: &Arc<Runtime>,
    node: &NodeContext,
    c: &SlotConfig<P>,
) -> Result<Slot<K>, PluginError> {
    let (bytes, source) = match &c.file {
        Some(path) => (
            std::fs::read(path).map_err(|source| PluginError::Read {
                path: path.clone(),
                source,
            })?,
            path.display().to_string(),
        ),
        None => (embedded_plugin(K::SLOT).to_vec(), "embedded".to_string()),
    };
    Slot::load(
        runtime.clone(),
        node.clone(),
        limits(c),
        &bytes,
        source,
        c.config_json().into(),
    )
}

impl PluginHost {
    /// Loads every slot from the config: the configured file, or the
    /// embedded default plugin.
    ///
    /// # Errors
    /// The engine cannot be built, or a slot's plugin does not load.
    pub fn new(p: &PluginsConfig, cache_dir: Option<PathBuf>, node: NodeContext) -> Result<Self, PluginError> {
        let max_memory = [p.router.memory_mib, p.auth.memory_mib, p.content_source.memory_mib]
            .into_iter()
            .max()
            .unwrap_or(64) as usize;
        let runtime = Arc::new(Runtime::new(p.max_instances, max_memory << 20, cache_dir)?.with_metrics(&node.metrics));
        let router = load_slot(&runtime, &node, &p.router)?;
        let auth = load_slot(&runtime, &node, &p.auth)?;
        let content = load_slot(&runtime, &node, &p.content_source)?;
        let config = content.config_json();
        let origins = Arc::new(fallback::Origins::from_config(&config));
        Ok(PluginHost {
            runtime,
            router,
            auth,
            content,
            router_policy: p.router.on_failure,
            content_policy: p.content_source.on_failure,
            content_origins: std::sync::Mutex::new((config, origins)),
        })
    }

    /// Checks, without running it, that `bytes` is a plugin component: it
    /// is compiled (through the compiled-component cache, so loading it
    /// later costs no second compilation) and type-checked against the
    /// world of `slot`, or of every slot when `slot` is `None`. Answers the
    /// slots whose world it implements, never none.
    ///
    /// # Errors
    /// Not a component ([`PluginError::InvalidComponent`]: not wasm, a core
    /// module, a malformed component); not of `slot`'s world
    /// ([`PluginError::WrongWorld`]); with no slot named, of no plugin world
    /// ([`PluginError::NoWorld`]).
    pub fn check_component(&self, bytes: &[u8], slot: Option<SlotName>) -> Result<Vec<SlotName>, PluginError> {
        use sha2::Digest as _;
        let hash = hex::encode(sha2::Sha256::digest(bytes));
        let component = self.runtime.compile(bytes, &hash)?;
        let check = |s: SlotName| match s {
            SlotName::Router => slot::pre_of::<RouterKind>(&self.runtime, &component).map(drop),
            SlotName::Auth => slot::pre_of::<AuthKind>(&self.runtime, &component).map(drop),
            SlotName::ContentSource => slot::pre_of::<ContentKind>(&self.runtime, &component).map(drop),
        };
        if let Some(s) = slot {
            return check(s).map(|()| vec![s]);
        }
        let mut fits = Vec::new();
        let mut why = Vec::new();
        for s in SlotName::ALL {
            match check(s) {
                Ok(()) => fits.push(s),
                Err(PluginError::WrongWorld { slot, detail }) => {
                    why.push(format!("{slot}: {}", detail.lines().next().unwrap_or_default()));
                }
                Err(e) => return Err(e),
            }
        }
        if fits.is_empty() {
            return Err(PluginError::NoWorld(why.join("; ")));
        }
        Ok(fits)
    }

    /// Routes one message.
    pub fn route(&self, msg: Arc<Message>) -> Answer<RouteOutcome> {
        let (version, result) = self.router.call(|b, store| {
            let shared = msg.clone();
            let handle = store.data_mut().table.push(MessageRep(msg))?;
            let borrow = Resource::<MessageRep>::new_borrow(handle.rep());
            let result = b.call_route(&mut *store, &shared.topic, borrow);
            // Remove the handle whatever happened; the message stays with the caller.
            store.data_mut().table.delete(handle)?;
            result
        });
        let result = result.map(|actions| RouteOutcome::Actions(actions.into_iter().map(convert::action).collect()));
        Answer::new(version, result, |failure| {
            let reason = format!("router-failure:{}", failure.kind.as_str());
            match self.router_policy {
                RouterFailurePolicy::DeadLetter => RouteOutcome::DeadLetter(reason),
                RouterFailurePolicy::Drop => RouteOutcome::Drop(reason),
            }
        })
    }

    /// Decides a CONNECT. A failed call refuses it (policy `deny`).
    pub fn authenticate(&self, info: &ConnectInfo) -> Answer<Result<Principal, Refusal>> {
        let wit_info = convert::connect_info(info);
        let (version, result) = self.auth.call(|b, store| b.call_authenticate(store, &wit_info));
        let result = result.map(|r| r.map(convert::principal).map_err(convert::refusal));
        Answer::new(version, result, |failure| {
            Err(Refusal {
                code: RefusalCode::NotAuthorized,
                reason: format!("auth plugin failed ({failure}); policy deny"),
            })
        })
    }

    /// Decides a PUBLISH or SUBSCRIBE. A failed call denies it.
    pub fn authorize(&self, who: &Principal, op: Operation, topic: &str) -> Answer<AuthzDecision> {
        let wit_who = convert::principal_to_wit(who);
        let wit_op = convert::operation(op);
        let (version, result) = self
            .auth
            .call(|b, store| b.call_authorize(store, &wit_who, wit_op, topic));
        let result = result.map(convert::decision);
        Answer::new(version, result, |failure| {
            AuthzDecision::Deny(format!("auth plugin failed ({failure}); policy deny"))
        })
    }

    /// Classifies an HTTP request for the range cache. A failed call passes
    /// the request through uncached only to the origin the slot's config
    /// names for its host, and refuses it otherwise (or always, with policy
    /// `deny`): a failure never widens what the cache reaches.
    pub fn classify(&self, request: &RequestHead) -> Answer<ContentDecision> {
        let wit_request = convert::request_head(request);
        let (version, result) = self.content.call(|b, store| b.call_classify(store, &wit_request));
        let result = result.map(convert::content_decision);
        Answer::new(version, result, |failure| {
            fallback::decide(self.content_policy, &self.content_origins(), request, failure)
        })
    }

    /// The origins the active content-source config names; parsed again
    /// only when a swap, reconfiguration or rollback changed the config.
    fn content_origins(&self) -> Arc<fallback::Origins> {
        let config = self.content.config_json();
        let mut cached = holdfast_model::lock(&self.content_origins);
        if !Arc::ptr_eq(&cached.0, &config) {
            *cached = (config.clone(), Arc::new(fallback::Origins::from_config(&config)));
        }
        cached.1.clone()
    }

    /// Re-initialises the plugin running in `slot` with a new config (a new
    /// version with the same hash; the old one is kept for rollback).
    ///
    /// # Errors
    /// See [`PluginError`]; the old version stays active.
    pub fn reconfigure(&self, slot: SlotName, config_json: String) -> Result<SwapRecord, PluginError> {
        let config = Arc::<str>::from(config_json);
        match slot {
            SlotName::Router => self.router.reconfigure(config),
            SlotName::Auth => self.auth.reconfigure(config),
            SlotName::ContentSource => self.content.reconfigure(config),
        }
    }

    /// Swaps the plugin in `slot` for `bytes`. `config_json` replaces the
    /// plugin's config; `None` keeps the current one.
    ///
    /// # Errors
    /// See [`PluginError`]; the old version stays active.
    pub fn swap(
        &self,
        slot: SlotName,
        bytes: &[u8],
        source: String,
        config_json: Option<String>,
    ) -> Result<SwapRecord, PluginError> {
        let config = config_json.map(Arc::<str>::from);
        match slot {
            SlotName::Router => self.router.swap(bytes, source, config),
            SlotName::Auth => self.auth.swap(bytes, source, config),
            SlotName::ContentSource => self.content.swap(bytes, source, config),
        }
    }

    /// Rolls `slot` back to its previous version.
    ///
    /// # Errors
    /// Nothing to roll back to, or the previous version no longer initialises.
    pub fn rollback(&self, slot: SlotName) -> Result<SwapRecord, PluginError> {
        match slot {
            SlotName::Router => self.router.rollback(),
            SlotName::Auth => self.auth.rollback(),
            SlotName::ContentSource => self.content.rollback(),
        }
    }

    /// Status of every slot.
    pub fn list(&self) -> Vec<SlotStatus> {
        vec![self.router.status(), self.auth.status(), self.content.status()]
    }

    /// The hash of the active version in `slot`.
    pub fn version(&self, slot: SlotName) -> Arc<str> {
        match slot {
            SlotName::Router => self.router.version(),
            SlotName::Auth => self.auth.version(),
            SlotName::ContentSource => self.content.version(),
        }
    }

    /// Every load, swap and rollback of every slot, oldest first.
    pub fn history(&self) -> Vec<SwapRecord> {
        let mut all: Vec<SwapRecord> = [self.router.history(), self.auth.history(), self.content.history()].concat();
        all.sort_by_key(|r| r.at_unix_ms);
        all
    }

    /// Compiled-artifact cache hits and misses since start.
    pub fn cache_stats(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (
            self.runtime.cache_hits.load(Relaxed),
            self.runtime.cache_misses.load(Relaxed),
        )
    }
}

impl ContentPolicy for PluginHost {
    fn classify(&self, head: &RequestHead) -> ContentDecision {
        PluginHost::classify(self, head).value
    }
}

impl Policy for PluginHost {
    fn route(&self, msg: Arc<Message>) -> RouteOutcome {
        PluginHost::route(self, msg).value
    }

    fn authenticate(&self, info: &ConnectInfo) -> Result<Principal, Refusal> {
        PluginHost::authenticate(self, info).value
    }

    fn authorize(&self, who: &Principal, op: Operation, topic: &str) -> Authorized {
        let answer = PluginHost::authorize(self, who, op, topic);
        Authorized {
            decision: answer.value,
            cacheable: answer.failure.is_none(),
        }
    }

    fn auth_version(&self) -> Arc<str> {
        self.version(SlotName::Auth)
    }
}
