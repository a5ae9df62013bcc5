//! What a running node shares: the handle of every subsystem, made once by
//! [`crate::node::Node::start`]. The admin API's route modules each take a
//! narrow view of it (`axum`'s `FromRef`): the registry's routes the
//! registry, the deployment routes the deployer, and so on; the reloader
//! and the deployment applier are given the parts they change.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use crate::config::Config;
use crate::metrics::HostMetrics;
use crate::reload::Reloader;
use holdfast_broker::{Broker, listen};
use holdfast_cache::Cache;
use holdfast_deploy::Deployer;
use holdfast_iothub::Hub;
use holdfast_link::Status;
use holdfast_link::rate::RateLimit;
use holdfast_outbox::Outbox;
use holdfast_plugins::PluginHost;
use holdfast_registry::{Registry, RegistryMetrics};

/// What the admin API and other subsystems share.
pub struct NodeState {
    /// The configuration the node started with.
    pub config: Arc<Config>,
    /// Loaded plugins.
    pub plugins: Arc<PluginHost>,
    /// The metric registry served at `/metrics`, and the host's own families.
    pub metrics: Arc<HostMetrics>,
    /// The device registry (owned, or a replica of this node's scope).
    pub registry: Arc<Registry>,
    /// The registry's gauge of identities, refreshed after admin changes.
    pub registry_metrics: RegistryMetrics,
    /// Twins, direct methods and cloud-to-device messages.
    pub hub: Arc<Hub>,
    /// The durable queue of upstream-bound messages.
    pub outbox: Arc<Outbox>,
    /// The MQTT broker, when enabled.
    pub broker: Option<Arc<Broker>>,
    /// Where the MQTT listeners are bound.
    pub mqtt: listen::Bound,
    /// The upstream link and connected children.
    pub link: Arc<Status>,
    /// Where the link listener for child gateways is bound.
    pub link_listen: Option<SocketAddr>,
    /// The upstream byte-rate cap (`upstream.max_bytes_per_second`).
    pub link_rate: Arc<RateLimit>,
    /// When the node started.
    pub started_at: SystemTime,
    /// Monotonic start.
    pub started: Instant,
    /// The admin bearer token.
    pub admin_token: String,
    /// The range cache, when enabled.
    pub cache: Option<Arc<Cache>>,
    /// Re-reads the config file (SIGHUP, `holdfast reload`) and applies
    /// deployments over it.
    pub reloader: Arc<Reloader>,
    /// Fleet deployments.
    pub deploy: Arc<Deployer>,
    /// The last hour, sampled for the status page's charts.
    pub history: Arc<crate::history::History>,
    /// The node's store (its size on disk goes into the fleet view).
    pub store: holdfast_store::Store,
}

impl std::fmt::Debug for NodeState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeState")
            .field("node", &self.config.node.id)
            .finish_non_exhaustive()
    }
}
