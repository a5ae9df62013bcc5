//! What the plugin runtime counts: calls, failures, swaps, rollbacks, warm
//! instances and dropped log records, per slot (`holdfast_plugin_*`).

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};

use super::SlotName;
use holdfast_metrics::{Registry, handle};

/// Labels carrying a plugin slot.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SlotLabels {
    /// `router`, `auth` or `content-source`.
    slot: String,
}

/// Why a plugin call failed.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum FailureKind {
    /// The epoch deadline interrupted it.
    Timeout,
    /// It hit the memory cap.
    Memory,
    /// It trapped (panic, unreachable, bad access).
    Trap,
    /// No instance could be created or initialised for it.
    Unavailable,
}

impl serde::Serialize for FailureKind {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl FailureKind {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Timeout => "timeout",
            FailureKind::Memory => "memory",
            FailureKind::Trap => "trap",
            FailureKind::Unavailable => "unavailable",
        }
    }
}

impl EncodeLabelValue for FailureKind {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        use std::fmt::Write as _;
        encoder.write_str(self.as_str())
    }
}

/// Labels of plugin failures.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FailureLabels {
    slot: String,
    kind: FailureKind,
}

/// Result of a swap attempt.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
enum SwapResult {
    /// Switched.
    Ok,
    /// Rejected; the old version stayed active.
    Rejected,
}

impl EncodeLabelValue for SwapResult {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        use std::fmt::Write as _;
        encoder.write_str(match self {
            SwapResult::Ok => "ok",
            SwapResult::Rejected => "rejected",
        })
    }
}

/// Labels of compiled-plugin cache lookups.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CompiledCacheLabels {
    /// `hit`, `compiled` or `damaged`.
    result: String,
}

/// Labels of swaps.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SwapLabels {
    slot: String,
    result: SwapResult,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn call_histogram() -> Histogram {
    // 500 ns .. ~16 s.
    Histogram::new(exponential_buckets(5e-7, 4.0, 13))
}

/// The plugin runtime's metric families, registered once per node and
/// shared by every slot (each takes its own handles, [`SlotMetrics`]).
#[derive(Debug)]
pub struct PluginMetrics {
    /// `holdfast_plugin_calls_total{slot}`
    calls: Family<SlotLabels, Counter>,
    /// `holdfast_plugin_failures_total{slot,kind}`
    failures: Family<FailureLabels, Counter>,
    /// `holdfast_plugin_call_duration_seconds{slot}`
    call_duration: HistogramFamily<SlotLabels>,
    /// `holdfast_plugin_swaps_total{slot,result}`
    swaps: Family<SwapLabels, Counter>,
    /// `holdfast_plugin_rollbacks_total{slot}`
    rollbacks: Family<SlotLabels, Counter>,
    /// `holdfast_plugin_swap_duration_seconds{slot}`
    swap_duration: HistogramFamily<SlotLabels>,
    /// `holdfast_plugin_idle_instances{slot}`
    idle_instances: Family<SlotLabels, Gauge>,
    /// `holdfast_plugin_log_records_dropped_total{slot}`
    logs_dropped: Family<SlotLabels, Counter>,
    /// `holdfast_plugin_compiled_cache_total{result}`
    compiled_cache: Family<CompiledCacheLabels, Counter>,
}

impl Default for PluginMetrics {
    /// Families registered nowhere (for tests that do not read them).
    fn default() -> Self {
        Self::new(&Registry::new())
    }
}

impl PluginMetrics {
    /// Creates the `holdfast_plugin_*` families and registers them in `registry`.
    pub fn new(registry: &Registry) -> PluginMetrics {
        let calls = Family::<SlotLabels, Counter>::default();
        registry.register("plugin_calls", "Plugin calls made, by slot", calls.clone());
        let failures = Family::<FailureLabels, Counter>::default();
        registry.register(
            "plugin_failures",
            "Plugin calls that failed (timeout, memory cap, trap, no instance); the slot's failure policy applied",
            failures.clone(),
        );
        let call_duration: HistogramFamily<SlotLabels> = Family::new_with_constructor(call_histogram);
        registry.register(
            "plugin_call_duration_seconds",
            "Duration of plugin calls including instance checkout (one call in 16 is sampled)",
            call_duration.clone(),
        );
        let swaps = Family::<SwapLabels, Counter>::default();
        registry.register("plugin_swaps", "Plugin swap attempts, by result", swaps.clone());
        let rollbacks = Family::<SlotLabels, Counter>::default();
        registry.register("plugin_rollbacks", "Plugin rollbacks", rollbacks.clone());
        let swap_duration: HistogramFamily<SlotLabels> = Family::new_with_constructor(call_histogram);
        registry.register(
            "plugin_swap_duration_seconds",
            "Time from receiving new plugin bytes to the atomic switch (compile, instantiate, init)",
            swap_duration.clone(),
        );
        let idle_instances = Family::<SlotLabels, Gauge>::default();
        registry.register(
            "plugin_idle_instances",
            "Warm plugin instances waiting in the pool",
            idle_instances.clone(),
        );
        let logs_dropped = Family::<SlotLabels, Counter>::default();
        registry.register(
            "plugin_log_records_dropped",
            "Plugin log records dropped by the per-call limit",
            logs_dropped.clone(),
        );
        let compiled_cache = Family::<CompiledCacheLabels, Counter>::default();
        registry.register(
            "plugin_compiled_cache",
            "Component loads by the compiled-plugin cache's answer: hit (loaded), compiled (no usable entry), damaged (an entry refused, removed and rebuilt)",
            compiled_cache.clone(),
        );
        PluginMetrics {
            compiled_cache,
            calls,
            failures,
            call_duration,
            swaps,
            rollbacks,
            swap_duration,
            idle_instances,
            logs_dropped,
        }
    }

    /// A log record of a plugin in `slot` dropped by the per-call limit.
    pub(crate) fn log_dropped(&self, slot: SlotName) {
        handle(
            &self.logs_dropped,
            &SlotLabels {
                slot: slot.as_str().to_string(),
            },
        )
        .inc();
    }
}

/// The compiled-plugin cache's counters.
#[derive(Debug, Clone, Default)]
pub(crate) struct CompiledCacheMetrics {
    pub(crate) hit: Counter,
    pub(crate) compiled: Counter,
    pub(crate) damaged: Counter,
}

impl CompiledCacheMetrics {
    /// Takes the handles from `m`'s family.
    pub(crate) fn new(m: &PluginMetrics) -> Self {
        let result = |r: &str| handle(&m.compiled_cache, &CompiledCacheLabels { result: r.to_string() });
        CompiledCacheMetrics {
            hit: result("hit"),
            compiled: result("compiled"),
            damaged: result("damaged"),
        }
    }
}

/// Hot-path metric handles for a slot.
pub(crate) struct SlotMetrics {
    pub(crate) calls: Counter,
    pub(crate) duration: Histogram,
    pub(crate) idle: Gauge,
    pub(crate) timeouts: Counter,
    pub(crate) memory: Counter,
    pub(crate) traps: Counter,
    pub(crate) unavailable: Counter,
    pub(crate) swaps_ok: Counter,
    pub(crate) swaps_rejected: Counter,
    pub(crate) rollbacks: Counter,
    pub(crate) swap_duration: Histogram,
}

impl SlotMetrics {
    /// Takes `slot`'s handles from the families.
    pub(crate) fn new(m: &PluginMetrics, slot: SlotName) -> Self {
        let labels = SlotLabels {
            slot: slot.as_str().to_string(),
        };
        let failure = |kind| {
            handle(
                &m.failures,
                &FailureLabels {
                    slot: slot.as_str().to_string(),
                    kind,
                },
            )
        };
        let swaps = |result| {
            handle(
                &m.swaps,
                &SwapLabels {
                    slot: slot.as_str().to_string(),
                    result,
                },
            )
        };
        SlotMetrics {
            calls: handle(&m.calls, &labels),
            duration: handle(&m.call_duration, &labels),
            idle: handle(&m.idle_instances, &labels),
            timeouts: failure(FailureKind::Timeout),
            memory: failure(FailureKind::Memory),
            traps: failure(FailureKind::Trap),
            unavailable: failure(FailureKind::Unavailable),
            swaps_ok: swaps(SwapResult::Ok),
            swaps_rejected: swaps(SwapResult::Rejected),
            rollbacks: handle(&m.rollbacks, &labels),
            swap_duration: handle(&m.swap_duration, &labels),
        }
    }
}
