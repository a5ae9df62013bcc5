//! What Holdfast's metrics share: the one [`Registry`] the node's
//! `/metrics` endpoint renders, the label sets more than one crate uses
//! ([`ResultLabels`], [`ReasonLabels`], [`EventLabels`]) and [`handle`].
//!
//! It holds no metric of its own: each crate owns a metrics struct of its
//! families (`PluginMetrics`, `OutboxMetrics`, `BrokerMetrics`, `CacheMetrics`,
//! `LinkMetrics`, `RegistryMetrics`, `IothubMetrics`, `DeployMetrics`, the
//! host's `HostMetrics`) whose constructor registers them here, and the
//! label types only it uses. Hot paths hold cloned handles (an `Arc` to the
//! atomic) instead of looking labels up per event.
//!
//! ```
//! use holdfast_metrics::{Counter, Family, Registry, ResultLabels, handle};
//!
//! let registry = Registry::new();
//! let connects = Family::<ResultLabels, Counter>::default();
//! registry.register("example_connects", "Connection attempts, by result", connects.clone());
//! handle(&connects, &ResultLabels { result: "accepted" }).inc();
//! assert!(registry.render().contains("holdfast_example_connects_total{result=\"accepted\"} 1"));
//! ```

use std::sync::Mutex;

use prometheus_client::encoding::EncodeLabelSet;
pub use prometheus_client::metrics::counter::Counter;
pub use prometheus_client::metrics::family::Family;
pub use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Metric;

/// Labels of events counted by outcome.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// `accepted`, or why not.
    pub result: &'static str,
}

/// Labels of events counted by reason.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// Why.
    pub reason: &'static str,
}

/// Labels of events counted by kind.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EventLabels {
    /// What happened.
    pub event: &'static str,
}

/// The node's one metric registry: every crate registers its own families
/// here (each crate's metrics struct takes a `&Registry` in its
/// constructor), and the admin listener serves [`Registry::render`] at
/// `/metrics`. Names get the `holdfast_` prefix.
pub struct Registry {
    inner: Mutex<prometheus_client::registry::Registry>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").finish_non_exhaustive()
    }
}

impl Default for Registry {
    fn default() -> Self {
        Self::new()
    }
}

impl Registry {
    /// An empty registry whose metric names start with `holdfast_`.
    pub fn new() -> Registry {
        Registry {
            inner: Mutex::new(prometheus_client::registry::Registry::with_prefix("holdfast")),
        }
    }

    /// Registers `metric` (a counter, gauge, histogram or family of them,
    /// whose clones share its value) as `holdfast_<name>` with `help`.
    pub fn register(&self, name: &str, help: &str, metric: impl Metric) {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .register(name, help, metric);
    }

    /// Renders every registered family in the text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let registry = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        out
    }
}

/// The metric for `labels` in `family`, as an owned handle.
///
/// `Family::get_or_create` returns a read guard. Taking a second metric from
/// the same family while one is alive (e.g. two in one struct literal)
/// deadlocks when the second must be created. This drops the guard before
/// returning.
pub fn handle<L, M, C>(family: &Family<L, M, C>, labels: &L) -> M
where
    L: Clone + std::hash::Hash + Eq,
    M: Clone,
    C: prometheus_client::metrics::family::MetricConstructor<M>,
{
    family.get_or_create(labels).clone()
}
