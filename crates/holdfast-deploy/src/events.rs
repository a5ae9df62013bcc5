//! What the deployer counts: `holdfast_deploy_events_total{event}`.

use std::sync::Arc;

use holdfast_metrics::{EventLabels, Metrics};

/// Counts deployment events; each role holds a clone.
#[derive(Clone)]
pub(crate) struct Events {
    metrics: Arc<Metrics>,
}

impl Events {
    pub(crate) fn new(metrics: Arc<Metrics>) -> Events {
        Events { metrics }
    }

    /// One more `event`.
    pub(crate) fn count(&self, event: &'static str) {
        holdfast_metrics::handle(&self.metrics.deploy_events, &EventLabels { event }).inc();
    }

    /// `n` more component bytes `sent` to child gateways or `received`
    /// from the parent (`holdfast_deploy_component_bytes_total{event}`).
    pub(crate) fn component_bytes(&self, event: &'static str, n: u64) {
        holdfast_metrics::handle(&self.metrics.deploy_component_bytes, &EventLabels { event }).inc_by(n);
    }

    /// How many `event`s were counted.
    #[cfg(test)]
    pub(crate) fn get(&self, event: &'static str) -> u64 {
        holdfast_metrics::handle(&self.metrics.deploy_events, &EventLabels { event }).get()
    }
}
