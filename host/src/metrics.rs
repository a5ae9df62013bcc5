//! The node's metrics registry and what the host itself counts: admin API
//! requests (`holdfast_admin_requests_total{code}`) and the build-info
//! gauge (`holdfast_build_info{version}`), and the fleet view's nodes by
//! state (`holdfast_fleet_nodes{state}`). Every crate registers its own
//! families in [`HostMetrics::registry`] when the node is composed; the
//! admin listener serves [`HostMetrics::render`] at `/metrics`.

use holdfast_metrics::{Counter, Family, Gauge, Registry, handle};

/// Labels of admin requests: `code`, the HTTP status code.
type StatusLabels = [(&'static str, u16); 1];

/// Labels of the build-info gauge: `version`, the crate version.
type BuildLabels = [(&'static str, String); 1];

/// Labels of the fleet gauge: `state`.
type StateLabels = [(&'static str, &'static str); 1];

/// The node's one registry, and the host's own families in it.
#[derive(Debug)]
pub struct HostMetrics {
    registry: Registry,
    /// `holdfast_admin_requests_total{code}`
    admin_requests: Family<StatusLabels, Counter>,
    /// `holdfast_fleet_nodes{state}`
    fleet_nodes: Family<StateLabels, Gauge>,
}

impl Default for HostMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl HostMetrics {
    /// A new registry holding the host's families (and the build info).
    pub fn new() -> HostMetrics {
        let registry = Registry::new();
        let admin_requests = Family::<StatusLabels, Counter>::default();
        registry.register(
            "admin_requests",
            "Admin API requests, by status code",
            admin_requests.clone(),
        );
        let build_info = Family::<BuildLabels, Gauge>::default();
        handle(&build_info, &[("version", env!("CARGO_PKG_VERSION").to_string())]).set(1);
        registry.register("build_info", "Holdfast build information", build_info);
        let fleet_nodes = Family::<StateLabels, Gauge>::default();
        registry.register(
            "fleet_nodes",
            "Nodes of this node's fleet view (itself and its subtree), by state",
            fleet_nodes.clone(),
        );
        HostMetrics {
            registry,
            admin_requests,
            fleet_nodes,
        }
    }

    /// Where each crate registers its families.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// One admin API request answered with `code`.
    pub fn admin_request(&self, code: u16) {
        handle(&self.admin_requests, &[("code", code)]).inc();
    }

    /// The nodes of the fleet view in `state`.
    pub fn set_fleet_nodes(&self, state: &'static str, n: u64) {
        handle(&self.fleet_nodes, &[("state", state)]).set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// Every registered family in the text exposition format.
    pub fn render(&self) -> String {
        self.registry.render()
    }
}
