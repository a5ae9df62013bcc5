//! The hub's event counter, `holdfast_iothub_events_total{event}`, shared
//! by its parts.

use std::sync::Arc;

use holdfast_metrics::{EventLabels, Metrics};

/// Counts the dialect's events (twin requests, method calls, cloud-to-device
/// hand-overs) by name.
#[derive(Clone)]
pub(crate) struct Events(Arc<Metrics>);

impl Events {
    /// Events counted into `metrics`.
    pub(crate) fn new(metrics: Arc<Metrics>) -> Events {
        Events(metrics)
    }

    /// One more `what`.
    pub(crate) fn count(&self, what: &'static str) {
        holdfast_metrics::handle(&self.0.iothub_events, &EventLabels { event: what }).inc();
    }
}
