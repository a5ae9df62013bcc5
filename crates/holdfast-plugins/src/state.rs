//! Per-instance store state and the host side of the WIT imports.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cpu_time::ThreadTime;

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use wasmtime::component::{Resource, ResourceTable};
use wasmtime::{ResourceLimiter, UpdateDeadline};
use wasmtime_wasi::p2::pipe::ClosedInputStream;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::SlotName;
use super::bindings::auth::holdfast::gateway::{authn, crypto, identities};
use super::bindings::content::holdfast::gateway::content;
use super::bindings::router::holdfast::gateway::{host, routing, types};
use super::message::MessageRep;
use super::metrics::PluginMetrics;
use super::stdio::Captured;
pub use super::stdio::LOG_MESSAGE_MAX;
use holdfast_model::identity::IdentityDirectory;

/// How often the epoch advances. Deadlines are whole ticks.
pub const EPOCH_TICK: Duration = Duration::from_millis(1);

/// Log records one call may emit before further ones are dropped.
pub const LOG_RECORDS_PER_CALL: u32 = 64;

/// What every instance of every plugin can see of the node.
#[derive(Clone)]
pub struct NodeContext {
    /// `node.id`.
    pub node_id: Arc<str>,
    /// Fixed point for `monotonic-ns`.
    pub started: Instant,
    /// The identities auth plugins verify against.
    pub identities: Arc<dyn IdentityDirectory>,
    /// The plugin runtime's metrics.
    pub metrics: Arc<PluginMetrics>,
}

impl std::fmt::Debug for NodeContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeContext")
            .field("node_id", &self.node_id)
            .finish_non_exhaustive()
    }
}

/// Caps an instance's linear memories and tables, and remembers when a cap was hit.
#[derive(Debug)]
pub struct Limits {
    /// Bytes one linear memory may grow to.
    pub memory_bytes: usize,
    /// Elements one table may grow to.
    pub table_elements: usize,
    /// Set when a growth was refused: the failure that follows is a memory-cap failure.
    pub hit: bool,
    /// Bytes the linear memories grew by during the current call.
    pub grown: usize,
}

impl Limits {
    /// Whether the current call failed because of memory: a growth was
    /// refused, or it was interrupted after growing its memory by at least a
    /// eighth of the cap in this one call. Faulting in fresh pages is slow
    /// (about 0.6 ms a MiB on the 2-core VM the benchmarks ran on), so a
    /// memory bomb under a 64 MiB cap and a 10 ms deadline is interrupted
    /// while still growing (at about 20 MiB), before it reaches the cap.
    pub fn exhausted(&self, interrupted: bool) -> bool {
        self.hit || (interrupted && self.grown.saturating_mul(8) >= self.memory_bytes)
    }
}

impl ResourceLimiter for Limits {
    fn memory_growing(&mut self, current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        if desired > self.memory_bytes {
            self.hit = true;
            return Ok(false);
        }
        self.grown = self.grown.saturating_add(desired.saturating_sub(current));
        Ok(true)
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        if desired > self.table_elements {
            self.hit = true;
            return Ok(false);
        }
        Ok(true)
    }
}

/// Deadline bookkeeping of the call in progress.
///
/// The epoch deadline measures wall time, but a thread the OS has preempted
/// is not running the plugin. When the wall-clock deadline passes, the
/// callback samples the thread's CPU time and checks every tick afterwards.
/// The call is interrupted once it has used another quarter of its deadline
/// in CPU time since the deadline passed. A spinning plugin therefore stops
/// at about 1.25 deadlines, while a short call delayed by preemption is left
/// to finish. A wall-clock backstop of 20 deadlines ends every call.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct DeadlineProbe {
    /// The call's deadline in ticks.
    pub(crate) deadline_ticks: u64,
    /// Set at the first expiry: (wall time, thread CPU time) then.
    expired_at: Option<(Instant, Duration)>,
}

impl DeadlineProbe {
    /// CPU time a call may use after its deadline passed.
    fn grace(&self) -> Duration {
        EPOCH_TICK * (self.deadline_ticks / 4).max(1) as u32
    }

    /// Called when the epoch deadline passes.
    pub(crate) fn on_expiry(&mut self) -> UpdateDeadline {
        let now = Instant::now();
        // Without a CPU clock, assume the plugin is running: interrupt.
        let Ok(cpu) = ThreadTime::try_now().map(|t| t.as_duration()) else {
            return UpdateDeadline::Interrupt;
        };
        match self.expired_at {
            None => {
                self.expired_at = Some((now, cpu));
                UpdateDeadline::Continue(1)
            }
            Some((wall0, cpu0)) => {
                let backstop = EPOCH_TICK * (self.deadline_ticks as u32).saturating_mul(19);
                if cpu.saturating_sub(cpu0) >= self.grace() || now.saturating_duration_since(wall0) >= backstop {
                    UpdateDeadline::Interrupt
                } else {
                    UpdateDeadline::Continue(1)
                }
            }
        }
    }
}

/// The data of one plugin instance's `Store`.
pub struct PluginState {
    pub(crate) node: NodeContext,
    pub(crate) slot: SlotName,
    /// Short hash of the version, for log records.
    pub(crate) version: Arc<str>,
    pub(crate) config_json: Arc<str>,
    pub(crate) table: ResourceTable,
    wasi: WasiCtx,
    /// What the guest wrote to stdout and stderr since the last call.
    pub(crate) output: Captured,
    pub(crate) limits: Limits,
    pub(crate) deadline: DeadlineProbe,
    log_budget: u32,
}

impl PluginState {
    pub(crate) fn new(
        node: NodeContext,
        slot: SlotName,
        version: Arc<str>,
        config_json: Arc<str>,
        memory_bytes: usize,
    ) -> Self {
        let output = Captured::default();
        PluginState {
            node,
            slot,
            version,
            config_json,
            table: ResourceTable::new(),
            // No preopens, sockets, environment or arguments: a plugin
            // computes, the host does I/O. Its stdout and stderr (a Rust
            // guest's panic message) are captured for the log.
            wasi: WasiCtx::builder()
                .stdin(ClosedInputStream)
                .stdout(output.clone())
                .stderr(output.clone())
                .build(),
            output,
            limits: Limits {
                memory_bytes,
                table_elements: 100_000,
                hit: false,
                grown: 0,
            },
            deadline: DeadlineProbe::default(),
            log_budget: LOG_RECORDS_PER_CALL,
        }
    }

    /// Resets per-call state before a call with a deadline of `deadline_ticks`.
    pub(crate) fn begin_call(&mut self, deadline_ticks: u64) {
        self.limits.hit = false;
        self.limits.grown = 0;
        self.log_budget = LOG_RECORDS_PER_CALL;
        self.deadline = DeadlineProbe {
            deadline_ticks,
            expired_at: None,
        };
    }
}

impl WasiView for PluginState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl host::Host for PluginState {
    fn log(&mut self, level: host::Level, message: String) -> wasmtime::Result<()> {
        if self.log_budget == 0 {
            self.node.metrics.log_dropped(self.slot);
            return Ok(());
        }
        self.log_budget -= 1;
        let mut message = message;
        if message.len() > LOG_MESSAGE_MAX {
            let mut cut = LOG_MESSAGE_MAX;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
            message.push_str("…[truncated]");
        }
        let (slot, version) = (self.slot.as_str(), &*self.version);
        match level {
            host::Level::Trace => tracing::trace!(target: "holdfast::plugin", slot, version, "{message}"),
            host::Level::Debug => tracing::debug!(target: "holdfast::plugin", slot, version, "{message}"),
            host::Level::Info => tracing::info!(target: "holdfast::plugin", slot, version, "{message}"),
            host::Level::Warn => tracing::warn!(target: "holdfast::plugin", slot, version, "{message}"),
            host::Level::Error => tracing::error!(target: "holdfast::plugin", slot, version, "{message}"),
        }
        Ok(())
    }

    fn now_unix_ms(&mut self) -> wasmtime::Result<u64> {
        Ok(SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0))
    }

    fn monotonic_ns(&mut self) -> wasmtime::Result<u64> {
        Ok(self.node.started.elapsed().as_nanos() as u64)
    }

    fn node_id(&mut self) -> wasmtime::Result<String> {
        Ok(self.node.node_id.to_string())
    }

    fn config(&mut self) -> wasmtime::Result<String> {
        Ok(self.config_json.to_string())
    }
}

impl types::Host for PluginState {}

impl types::HostMessage for PluginState {
    fn topic(&mut self, m: Resource<MessageRep>) -> wasmtime::Result<String> {
        Ok(self.table.get(&m)?.0.topic.clone())
    }

    fn payload(&mut self, m: Resource<MessageRep>) -> wasmtime::Result<Vec<u8>> {
        Ok(self.table.get(&m)?.0.payload.to_vec())
    }

    fn payload_len(&mut self, m: Resource<MessageRep>) -> wasmtime::Result<u64> {
        Ok(self.table.get(&m)?.0.payload.len() as u64)
    }

    fn qos(&mut self, m: Resource<MessageRep>) -> wasmtime::Result<u8> {
        Ok(self.table.get(&m)?.0.qos)
    }

    fn retain(&mut self, m: Resource<MessageRep>) -> wasmtime::Result<bool> {
        Ok(self.table.get(&m)?.0.retain)
    }

    fn content_type(&mut self, m: Resource<MessageRep>) -> wasmtime::Result<Option<String>> {
        Ok(self.table.get(&m)?.0.content_type.clone())
    }

    fn property(&mut self, m: Resource<MessageRep>, name: String) -> wasmtime::Result<Option<String>> {
        Ok(self
            .table
            .get(&m)?
            .0
            .properties
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.clone()))
    }

    fn properties(&mut self, m: Resource<MessageRep>) -> wasmtime::Result<Vec<(String, String)>> {
        Ok(self.table.get(&m)?.0.properties.clone())
    }

    fn source(&mut self, m: Resource<MessageRep>) -> wasmtime::Result<types::Source> {
        let source = &self.table.get(&m)?.0.source;
        Ok(types::Source {
            client_id: source.client_id.clone(),
            principal: source.principal.clone(),
            path: source.path.clone(),
        })
    }

    fn drop(&mut self, m: Resource<MessageRep>) -> wasmtime::Result<()> {
        // The host owns every message handle; a guest only ever borrows one.
        self.table.delete(m)?;
        Ok(())
    }
}

impl routing::Host for PluginState {}
impl authn::Host for PluginState {}
impl content::Host for PluginState {}

impl crypto::Host for PluginState {
    fn hmac_sha256(&mut self, key: Vec<u8>, data: Vec<u8>) -> wasmtime::Result<Vec<u8>> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&key)?;
        mac.update(&data);
        Ok(mac.finalize().into_bytes().to_vec())
    }

    fn sha256(&mut self, data: Vec<u8>) -> wasmtime::Result<Vec<u8>> {
        Ok(Sha256::digest(&data).to_vec())
    }

    fn constant_time_eq(&mut self, a: Vec<u8>, b: Vec<u8>) -> wasmtime::Result<bool> {
        Ok(a.len() == b.len() && bool::from(a.ct_eq(&b)))
    }
}

impl identities::Host for PluginState {
    fn lookup(&mut self, id: String) -> wasmtime::Result<Option<identities::Identity>> {
        Ok(self.node.identities.lookup(&id).map(crate::convert::identity))
    }

    fn verify_sas(&mut self, id: String, string_to_sign: String, signature: Vec<u8>) -> wasmtime::Result<bool> {
        Ok(self.node.identities.verify_sas(&id, &string_to_sign, &signature))
    }

    fn verify_password(&mut self, id: String, password: Vec<u8>) -> wasmtime::Result<bool> {
        Ok(self.node.identities.verify_password(&id, &password))
    }

    fn verify_thumbprint(&mut self, id: String, thumbprint: String) -> wasmtime::Result<bool> {
        Ok(self.node.identities.verify_thumbprint(&id, &thumbprint))
    }
}

impl super::stdio::HasTable for PluginState {
    fn table(&mut self) -> &mut ResourceTable {
        &mut self.table
    }
}
