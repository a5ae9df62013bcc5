//! What the hub counts, `holdfast_iothub_events_total{event}`: twin
//! requests, method calls and answers, cloud-to-device hand-overs and the
//! twin and method traffic on the link. Each part holds a clone.

use holdfast_metrics::{Counter, EventLabels, Family, Registry, handle};

/// The dialect's metric family; clones count into the same one.
#[derive(Debug, Clone)]
pub struct IothubMetrics {
    /// `holdfast_iothub_events_total{event}`
    events: Family<EventLabels, Counter>,
}

impl Default for IothubMetrics {
    /// A family registered nowhere (for tests that do not read it).
    fn default() -> Self {
        Self::new(&Registry::new())
    }
}

impl IothubMetrics {
    /// Creates `holdfast_iothub_events_total` and registers it in `registry`.
    pub fn new(registry: &Registry) -> IothubMetrics {
        let events = Family::<EventLabels, Counter>::default();
        registry.register(
            "iothub_events",
            "IoT Hub dialect events: twin requests, method calls and answers, cloud-to-device and link traffic",
            events.clone(),
        );
        IothubMetrics { events }
    }

    /// One more `what`.
    pub(crate) fn count(&self, what: &'static str) {
        handle(&self.events, &EventLabels { event: what }).inc();
    }
}
