//! What the registry counts: the identities this node can authenticate
//! (`holdfast_registry_identities`) and the scope syncs with children and
//! the parent (`holdfast_registry_syncs_total{result}`).

use holdfast_metrics::{Counter, Family, Gauge, ResultLabels};

/// The registry's metric families.
#[derive(Debug, Clone)]
pub struct RegistryMetrics {
    /// `holdfast_registry_identities`: identities this node can authenticate.
    pub(crate) registry_identities: Gauge,
    /// `holdfast_registry_syncs_total{result}`: scope syncs sent (`sent-full`, `sent-delta`) and applied (`full`, `delta`, `failed`).
    pub(crate) registry_syncs: Family<ResultLabels, Counter>,
}

impl Default for RegistryMetrics {
    /// Families registered nowhere (for tests that do not read them).
    fn default() -> Self {
        Self::new(&holdfast_metrics::Registry::new())
    }
}

impl RegistryMetrics {
    /// Creates the `holdfast_registry_*` families and registers them in `registry`.
    pub fn new(registry: &holdfast_metrics::Registry) -> RegistryMetrics {
        let registry_identities = Gauge::default();
        registry.register(
            "registry_identities",
            "Identities this node can authenticate",
            registry_identities.clone(),
        );
        let registry_syncs = Family::<ResultLabels, Counter>::default();
        registry.register(
            "registry_syncs",
            "Scope syncs sent to children and applied from the parent, by result",
            registry_syncs.clone(),
        );
        RegistryMetrics {
            registry_identities,
            registry_syncs,
        }
    }

    /// Sets the number of identities this node can authenticate.
    pub fn set_identities(&self, n: usize) {
        self.registry_identities.set(n as i64);
    }
}
