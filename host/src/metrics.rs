//! The node's metrics registry and what the host itself counts: admin API
//! requests (`holdfast_admin_requests_total{code}`) and the build-info
//! gauge (`holdfast_build_info{version}`). Every crate registers its own
//! families in [`HostMetrics::registry`] when the node is composed; the
//! admin listener serves [`HostMetrics::render`] at `/metrics`.

use holdfast_metrics::{Counter, Family, Gauge, Registry, handle};

/// Labels of admin requests: `code`, the HTTP status code.
type StatusLabels = [(&'static str, u16); 1];

/// Labels of the build-info gauge: `version`, the crate version.
type BuildLabels = [(&'static str, String); 1];

/// The node's one registry, and the host's own families in it.
#[derive(Debug)]
pub struct HostMetrics {
    registry: Registry,
    /// `holdfast_admin_requests_total{code}`
    admin_requests: Family<StatusLabels, Counter>,
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
        HostMetrics {
            registry,
            admin_requests,
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

    /// Every registered family in the text exposition format.
    pub fn render(&self) -> String {
        self.registry.render()
    }
}
