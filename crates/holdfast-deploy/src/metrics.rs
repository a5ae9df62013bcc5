//! What the deployer counts: `holdfast_deploy_events_total{event}` and
//! `holdfast_deploy_component_bytes_total{event}`. Each role holds a clone.

use holdfast_metrics::{Counter, EventLabels, Family, Registry, handle};

/// The deployer's metric families; clones count into the same ones.
#[derive(Debug, Clone)]
pub struct DeployMetrics {
    /// `holdfast_deploy_events_total{event}`: deployments created, applied,
    /// failed, rolled back, refused (signature, hash), waves released, halts.
    events: Family<EventLabels, Counter>,
    /// `holdfast_deploy_component_bytes_total{event}`: component bytes
    /// `sent` to child gateways and `received` from the parent.
    component_bytes: Family<EventLabels, Counter>,
}

impl Default for DeployMetrics {
    /// Families registered nowhere (for tests that do not read them).
    fn default() -> Self {
        Self::new(&Registry::new())
    }
}

impl DeployMetrics {
    /// Creates the `holdfast_deploy_*` families and registers them in `registry`.
    pub fn new(registry: &Registry) -> DeployMetrics {
        let events = Family::<EventLabels, Counter>::default();
        registry.register(
            "deploy_events",
            "Fleet deployment events: created, applied, failed, rolled back, refused, waves released, halts",
            events.clone(),
        );
        let component_bytes = Family::<EventLabels, Counter>::default();
        registry.register(
            "deploy_component_bytes",
            "Deployment component bytes sent to child gateways and received from the parent",
            component_bytes.clone(),
        );
        DeployMetrics {
            events,
            component_bytes,
        }
    }

    /// One more `event` (e.g. `refused-component`, counted by the admin API
    /// when it refuses an upload).
    pub fn count(&self, event: &'static str) {
        handle(&self.events, &EventLabels { event }).inc();
    }

    /// `n` more component bytes `sent` to child gateways or `received`
    /// from the parent.
    pub(crate) fn component_bytes(&self, event: &'static str, n: u64) {
        handle(&self.component_bytes, &EventLabels { event }).inc_by(n);
    }

    /// How many `event`s were counted.
    #[cfg(test)]
    pub(crate) fn get(&self, event: &'static str) -> u64 {
        handle(&self.events, &EventLabels { event }).get()
    }
}
