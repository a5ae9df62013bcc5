//! A running node: builds every subsystem from the config, serves the admin
//! API, and stops cleanly when told to.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use base64::Engine as _;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::admin;
use crate::config::Config;
use crate::metrics::HostMetrics;
use crate::reload::{Live, Reloader};
pub use crate::state::NodeState;
use holdfast_broker::{Broker, listen};
use holdfast_cache::Cache;
use holdfast_deploy::store::DeployStore;
use holdfast_deploy::{Deployer, Overlay};
use holdfast_iothub::clients::Clients;
use holdfast_iothub::twin::Twins;
use holdfast_iothub::{Hub, HubParts};
use holdfast_link::LinkMetrics;
use holdfast_outbox::dead_letter::{DeadLetterMetrics, DeadLetters};
use holdfast_outbox::{Outbox, SystemTimeSource};
use holdfast_plugins::{NodeContext, PluginError, PluginHost, PluginMetrics, watch::watch_folder};
use holdfast_registry::{Registry, RegistryMetrics, Role};
use holdfast_store::Store;

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The data directory could not be prepared.
    #[error("data directory {path}: {source}")]
    DataDir {
        /// The directory or file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A plugin did not load.
    #[error(transparent)]
    Plugin(#[from] PluginError),
    /// The store or the outbox did not open.
    #[error("outbox: {0}")]
    Outbox(#[from] holdfast_outbox::OutboxError),
    /// An MQTT listener could not start.
    #[error(transparent)]
    Listen(#[from] listen::ListenError),
    /// The registry did not open.
    #[error("registry: {0}")]
    Registry(#[from] holdfast_registry::RegistryError),
    /// The upstream link or the link listener could not start.
    #[error(transparent)]
    Link(#[from] holdfast_link::LinkError),
    /// The broker's storage did not open.
    #[error("broker storage: {0}")]
    BrokerStore(#[from] holdfast_store::StoreError),
    /// The admin listener could not bind.
    #[error("admin API cannot listen on {addr}: {source}")]
    AdminBind {
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The range cache did not open.
    #[error(transparent)]
    Cache(#[from] holdfast_cache::CacheError),
    /// The deployment store did not open.
    #[error("deployments: {0}")]
    Deploy(String),
    /// The range cache's listener could not bind.
    #[error("range cache cannot listen on {addr}: {source}")]
    CacheBind {
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// Logs how long one phase of the start took (debug level, `start phase`)
/// and starts timing the next.
fn phase(name: &'static str, mark: &mut Instant) {
    tracing::debug!(phase = name, ms = mark.elapsed().as_millis() as u64, "start phase");
    *mark = Instant::now();
}

/// A started node.
#[derive(Debug)]
pub struct Node {
    state: Arc<NodeState>,
    admin_addr: Option<SocketAddr>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Node {
    /// Starts every subsystem described by `config`.
    ///
    /// # Errors
    /// The data directory, a plugin or the admin listener fails.
    pub async fn start(config: Config) -> Result<Node, StartError> {
        let file_config = config.clone();
        let base_level = config.log.level.clone();
        let started = Instant::now();
        let data_dir = config.node.data_dir.clone();
        create_private_dir(&data_dir)?;
        // One registry; each crate registers its own families in it.
        let metrics = Arc::new(HostMetrics::new());
        let registry_metrics = RegistryMetrics::new(metrics.registry());
        let store_dir = data_dir.join("store");
        let blob_dir = data_dir.join("deploy").join("components");
        let outbox_metrics = Arc::new(holdfast_outbox::OutboxMetrics::new(metrics.registry()));
        let dead_letter_metrics = DeadLetterMetrics::new(metrics.registry());
        let role = match config.upstream.kind {
            crate::config::UpstreamKind::Quic => Role::Replica {
                parent: config.upstream.quic.parent_id.clone(),
            },
            _ => Role::Owner,
        };
        crate::trace_export::install(&config.node.id, &config.trace);
        let seeds = config.identities.clone();
        let node_id = config.node.id.clone();
        let replica = matches!(role, Role::Replica { .. });
        let cache_dir = config.cache_dir();
        let cache_metrics = Arc::new(holdfast_cache::CacheMetrics::new(metrics.registry()));
        let cache_node = config.node.id.clone();
        let base = config.clone();
        #[allow(clippy::type_complexity)]
        let (store, outbox, registry, twins, cache, deploy_store, overlay, config) = tokio::task::spawn_blocking(
            move || -> Result<(Store, Outbox, Registry, Twins, Option<Cache>, DeployStore, Option<Overlay>, Config), StartError> {
                let mut mark = Instant::now();
                let store = Store::open(&store_dir).map_err(holdfast_outbox::OutboxError::from)?;
                phase("store", &mut mark);
                // The deployment applied last is in force from the start.
                let deploy_store = DeployStore::open(&store, &blob_dir).map_err(|e| StartError::Deploy(e.to_string()))?;
                phase("deploy-store", &mut mark);
                let mut overlay = deploy_store.startup_overlay();
                let config = match crate::reload::compose(&base, overlay.as_ref()) {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::error!(error = %e, "deploy: the applied deployment does not fit this config; starting without it");
                        overlay = None;
                        base
                    }
                };
                if let Some(o) = &overlay {
                    tracing::info!(deployment = %o.deployment, "deploy: starting with the deployment applied last");
                }
                let dead = DeadLetters::open(&store, &config.dead_letter, dead_letter_metrics)
                    .map_err(holdfast_outbox::OutboxError::from)?;
                let outbox = Outbox::open_with(
                    &store,
                    &store_dir,
                    config.outbox.clone(),
                    outbox_metrics,
                    Arc::new(SystemTimeSource),
                    Some(Arc::new(dead)),
                )?;
                phase("outbox", &mut mark);
                let registry = Registry::open(&store, &node_id, role)?;
                let seeded = registry.seed(&seeds)?;
                if seeded > 0 {
                    tracing::info!(changed = seeded, "registry: applied [[identities]] from the config");
                }
                phase("registry", &mut mark);
                let twins = Twins::open(&store, replica).map_err(holdfast_outbox::OutboxError::from)?;
                phase("twins", &mut mark);
                let cache = if config.cache.enabled {
                    Some(Cache::open(
                        &config.cache,
                        cache_dir,
                        &store,
                        &cache_node,
                        cache_metrics,
                    )?)
                } else {
                    None
                };
                phase("range-cache", &mut mark);
                Ok((store, outbox, registry, twins, cache, deploy_store, overlay, config))
            },
        )
        .await
        .map_err(|e| PluginError::Engine(format!("store open task failed: {e}")))??;
        if config.log.level != base_level
            && let Err(e) = crate::logging::set_level(&config.log.level)
        {
            tracing::debug!(error = %e, "deploy: log.level of the deployment not applied");
        }
        let mut mark = Instant::now();
        let registry = Arc::new(registry);
        registry_metrics.set_identities(registry.len());
        let deployer = Arc::new(
            Deployer::open(
                holdfast_deploy::Options {
                    node_id: config.node.id.clone(),
                    parent_id: matches!(config.upstream.kind, crate::config::UpstreamKind::Quic)
                        .then(|| config.upstream.quic.parent_id.clone()),
                    signer: crate::deploy::signer(&config),
                    verifier: crate::deploy::verifier(&config),
                    accept: config.deploy.accept,
                    max_component_bytes: config.deploy.max_component_bytes,
                    expiry_seconds: config.deploy.expiry_seconds,
                    fleet_report: std::time::Duration::from_secs(config.deploy.fleet_report_seconds),
                },
                deploy_store,
                registry.clone(),
                holdfast_deploy::DeployMetrics::new(metrics.registry()),
            )
            .map_err(|e| StartError::Deploy(e.to_string()))?,
        );
        // The hub is made with the broker's clients (inside `Broker::open`,
        // which holds it as its dialect), or with none on a node without one.
        let hub_parts = {
            let (store, node, cap) = (
                store.clone(),
                config.node.id.clone(),
                config.iothub.c2d_max_queued_per_device,
            );
            let c2d = tokio::task::spawn_blocking(move || holdfast_iothub::c2d::C2d::open(&store, &node, cap))
                .await
                .map_err(|e| PluginError::Engine(format!("c2d open task failed: {e}")))?
                .map_err(holdfast_outbox::OutboxError::from)?;
            let (twins, c2d, registry) = (Arc::new(twins), Arc::new(c2d), registry.clone());
            let metrics = holdfast_iothub::IothubMetrics::new(metrics.registry());
            let c2d_default_ttl = Duration::from_secs(config.iothub.c2d_default_ttl_seconds);
            move |clients: std::sync::Weak<dyn Clients>| HubParts {
                twins,
                c2d,
                c2d_default_ttl,
                registry,
                metrics: metrics.clone(),
                clients,
            }
        };
        phase("deployer+c2d", &mut mark);
        let context = NodeContext {
            node_id: config.node.id.as_str().into(),
            started,
            identities: registry.clone(),
            metrics: Arc::new(PluginMetrics::new(metrics.registry())),
        };
        let (plugin_config, plugin_cache) = (config.plugins.clone(), config.plugin_cache_dir());
        let plugins = tokio::task::spawn_blocking(move || PluginHost::new(&plugin_config, Some(plugin_cache), context))
            .await
            .map_err(|e| PluginError::Engine(format!("plugin loader task failed: {e}")))??;
        let plugins = Arc::new(plugins);
        phase("plugins", &mut mark);
        // Compiling plugins (on a cold artifact cache) leaves megabytes of freed
        // compiler memory in the allocator; give it back to the OS.
        release_freed_memory();
        let outbox = Arc::new(outbox);
        let (stop, stopped) = watch::channel(false);
        let mut tasks = Vec::new();
        let mut bound = listen::Bound::default();
        let (broker, hub) = if config.mqtt.enabled {
            let (broker, hub) = {
                let (mqtt, plugins, outbox, metrics, registry, stopped) = (
                    config.mqtt.clone(),
                    plugins.clone(),
                    outbox.clone(),
                    Arc::new(holdfast_broker::BrokerMetrics::new(metrics.registry())),
                    registry.clone(),
                    stopped.clone(),
                );
                let parts = holdfast_broker::Parts {
                    policy: plugins,
                    outbox,
                    metrics,
                    registry,
                };
                let store = store.clone();
                tokio::task::spawn_blocking(move || {
                    Broker::open(mqtt, parts, &store, stopped, |broker| {
                        Arc::new(Hub::new(hub_parts(broker)))
                    })
                })
                .await
                .map_err(|e| PluginError::Engine(format!("broker open task failed: {e}")))??
            };
            phase("broker", &mut mark);
            let (b, listeners) = listen::start(&broker, stopped.clone()).await?;
            phase("mqtt-listeners", &mut mark);
            bound = b;
            tasks.extend(listeners);
            tasks.push(tokio::spawn(broker.clone().sync_task()));
            tasks.push(tokio::spawn(broker.clone().revocation_task()));
            tasks.push(tokio::spawn(hub.clone().desired_task(stopped.clone())));
            tasks.push(tokio::spawn(hub.clone().c2d_task(stopped.clone())));
            (Some(broker), hub)
        } else {
            (None, Arc::new(Hub::new(hub_parts(holdfast_iothub::clients::none()))))
        };
        let link = Arc::new(holdfast_link::Status::new(config.link_sections()));
        tasks.push(tokio::spawn(watch_lanes(
            outbox.clone(),
            link.clone(),
            Duration::from_secs(config.outbox.stuck_after_seconds),
            stopped.clone(),
        )));
        let link_metrics = Arc::new(LinkMetrics::new(metrics.registry()));
        let link_rate = Arc::new(holdfast_link::rate::RateLimit::new(
            config.upstream.max_bytes_per_second,
        ));
        let link_listen = start_link(
            &config,
            &outbox,
            &broker,
            &hub,
            &link,
            &link_metrics,
            &registry_metrics,
            &link_rate,
            &deployer,
            &stopped,
            &mut tasks,
        )?;
        phase("link", &mut mark);
        let cache = match cache {
            Some(cache) => {
                let cache = Arc::new(cache);
                // The outbox has priority for the disk: the cache gives space back.
                outbox.add_space_donor(Arc::new(CacheDonor(cache.clone())));
                let tls_config = holdfast_cache::http::tls_config(&config.cache)?;
                let (listener, bound) = bind(config.cache.listen, |addr, source| StartError::CacheBind {
                    addr,
                    source,
                })
                .await?;
                cache.set_listen(bound.to_string());
                let tls = match (config.cache.tls_listen, tls_config) {
                    (Some(addr), Some(tls_config)) => {
                        let (l, bound) = bind(addr, |addr, source| StartError::CacheBind { addr, source }).await?;
                        tracing::info!(addr = %bound, "range cache listening (https)");
                        Some((l, tls_config))
                    }
                    _ => None,
                };
                tasks.push(tokio::spawn(holdfast_cache::http::serve(
                    cache.clone(),
                    plugins.clone(),
                    holdfast_cache::http::Listeners { plain: listener, tls },
                    wait_for(stopped.clone()),
                )));
                tracing::info!(addr = %bound, "range cache listening");
                Some(cache)
            }
            None => None,
        };
        let admin_token = match &config.admin.token {
            Some(t) => t.clone(),
            None => load_or_create_token(&data_dir.join("admin.token"))?,
        };
        let live = Live {
            plugins: plugins.clone(),
            broker: broker.clone(),
            outbox: outbox.clone(),
            cache: cache.clone(),
            link_rate: link_rate.clone(),
        };
        let reloader = Arc::new(Reloader::new(file_config, overlay, config.clone(), live));
        let applier = crate::deploy::NodeApplier::new(reloader.clone(), plugins.clone(), link.clone(), outbox.clone());
        let state = Arc::new(NodeState {
            reloader,
            config: Arc::new(config),
            plugins,
            metrics,
            registry,
            registry_metrics,
            hub,
            outbox,
            broker,
            mqtt: bound,
            link,
            link_listen,
            link_rate,
            started_at: SystemTime::now(),
            started,
            admin_token,
            cache,
            deploy: deployer.clone(),
            history: Arc::new(crate::history::History::default()),
            store: store.clone(),
        });
        tasks.push(tokio::spawn(deployer.run(Arc::new(applier), stopped.clone())));
        tasks.push(tokio::spawn(crate::history::sample_task(
            state.clone(),
            stopped.clone(),
        )));
        tasks.push(tokio::spawn(crate::fleet::sample_task(
            axum::extract::FromRef::from_ref(&state),
            stopped.clone(),
        )));
        if state.config.trace.enabled {
            tasks.push(tokio::spawn(crate::trace_export::export_task(
                state.config.trace.clone(),
                state.metrics.clone(),
                state.link.clone(),
                stopped.clone(),
            )));
        }
        let mut admin_addr = None;
        if state.config.admin.enabled {
            let (listener, bound) = bind(state.config.admin.listen, |addr, source| StartError::AdminBind {
                addr,
                source,
            })
            .await?;
            admin_addr = Some(bound);
            tasks.push(tokio::spawn(admin::serve(
                listener,
                state.clone(),
                wait_for(stopped.clone()),
            )));
            tracing::info!(addr = %bound, "admin API listening");
        }
        phase("admin", &mut mark);
        if let Some(dir) = state.config.plugins.watch_dir.clone() {
            let interval = Duration::from_millis(state.config.plugins.watch_interval_ms);
            tasks.push(tokio::spawn(watch_folder(
                state.plugins.clone(),
                dir,
                interval,
                wait_for(stopped.clone()),
            )));
        }
        tracing::info!(
            node = %state.config.node.id,
            data_dir = %data_dir.display(),
            startup_ms = started.elapsed().as_millis() as u64,
            "holdfast node started"
        );
        Ok(Node {
            state,
            admin_addr,
            stop,
            tasks,
        })
    }

    /// The shared state.
    pub fn state(&self) -> &Arc<NodeState> {
        &self.state
    }

    /// Where the admin API listens, if enabled.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// Stops the node: the listeners stop accepting, connections wait (at
    /// most 5 s or `node.shutdown_timeout_ms`, the shorter) for the writes
    /// they started and send their acknowledgements, tasks end. After
    /// `node.shutdown_timeout_ms` the tasks still running are aborted; then
    /// the broker's sessions and the outbox are synced (not cut short). An
    /// append is acknowledged only after it is durable, so nothing
    /// acknowledged depends on the wait.
    pub async fn shutdown(self) {
        let started = Instant::now();
        let limit = Duration::from_millis(self.state.config.node.shutdown_timeout_ms);
        let deadline = tokio::time::Instant::now() + limit;
        if let Some(broker) = &self.state.broker {
            // Connections finish their appends within the limit too.
            broker.set_shutdown_wait(limit.min(Duration::from_secs(5)));
        }
        let _ = self.stop.send(true);
        let mut tasks = self.tasks;
        for t in &mut tasks {
            if tokio::time::timeout_at(deadline, t).await.is_err() {
                break;
            }
        }
        let running = tasks.iter().filter(|t| !t.is_finished()).count();
        if running > 0 {
            tracing::warn!(
                running,
                "shutdown: tasks still running at the time limit; stopping them"
            );
            for t in &tasks {
                t.abort();
            }
        }
        if let Some(broker) = &self.state.broker {
            while broker.connections() > 0 && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let left = broker.connections();
            if left > 0 {
                tracing::warn!(connections = left, "shutdown: connections still open at the time limit");
            }
            let b = broker.clone();
            if let Ok(Err(e)) = tokio::task::spawn_blocking(move || b.sync()).await {
                tracing::error!(error = %e, "shutdown: syncing MQTT sessions failed");
            }
        }
        // Commit what the writer holds, save the outbox clock, sync.
        let outbox = self.state.outbox.clone();
        let _ = tokio::task::spawn_blocking(move || outbox.close()).await;
        tracing::info!(
            elapsed_ms = started.elapsed().as_millis() as u64,
            "holdfast node stopped"
        );
    }
}

/// Reloads the config file on every SIGHUP (a failed reload is logged and
/// changes nothing).
async fn reload_on_sighup(state: Arc<NodeState>) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut hup = match signal(SignalKind::hangup()) {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!("cannot listen for SIGHUP: {e}");
                return;
            }
        };
        while hup.recv().await.is_some() {
            let s = state.clone();
            match tokio::task::spawn_blocking(move || s.reloader.reload()).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::warn!("SIGHUP: config not reloaded: {e}"),
                Err(e) => tracing::warn!("SIGHUP: reload task failed: {e}"),
            }
        }
    }
    #[cfg(not(unix))]
    let _ = state;
}

/// Binds a TCP listener; `wrap` names the listener in the error.
async fn bind(
    addr: SocketAddr,
    wrap: fn(SocketAddr, std::io::Error) -> StartError,
) -> Result<(tokio::net::TcpListener, SocketAddr), StartError> {
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| wrap(addr, e))?;
    let bound = listener.local_addr().map_err(|e| wrap(addr, e))?;
    Ok((listener, bound))
}

/// Starts the link listener (if enabled) and the outbox's drainer: the QUIC
/// link, the MQTT bridge, or the root's local delivery.
#[allow(clippy::too_many_arguments)]
fn start_link(
    config: &Config,
    outbox: &Arc<Outbox>,
    broker: &Option<Arc<Broker>>,
    hub: &Arc<Hub>,
    status: &Arc<holdfast_link::Status>,
    metrics: &Arc<LinkMetrics>,
    registry_metrics: &RegistryMetrics,
    rate: &Arc<holdfast_link::rate::RateLimit>,
    deployer: &Arc<Deployer>,
    stopped: &watch::Receiver<bool>,
    tasks: &mut Vec<JoinHandle<()>>,
) -> Result<Option<SocketAddr>, StartError> {
    use crate::config::UpstreamKind;
    use holdfast_link::{Services, bridge, child, nats, parent, root};
    use holdfast_model::ports::{LinkService, LocalDelivery};
    // The services the link carries, each run by its own crate.
    let scope: Arc<dyn LinkService> = Arc::new(holdfast_registry::ScopeSync::new(
        hub.registry().clone(),
        registry_metrics.clone(),
        config.node.id.clone(),
    ));
    let twins: Arc<dyn LinkService> = hub.clone();
    let deploy: Arc<dyn LinkService> = deployer.clone();
    let mut listen = None;
    if config.link.enabled {
        let ctx = parent::Ctx {
            node_id: config.node.id.clone(),
            outbox: outbox.clone(),
            identities: hub.registry().clone(),
            status: status.clone(),
            metrics: metrics.clone(),
            max_children: config.link.max_children,
            max_frame: config.link.max_batch_bytes as usize,
            services: Services {
                scope: Some(scope.clone()),
                twins: Some(twins.clone()),
                deploy: Some(deploy.clone()),
            },
        };
        let (addr, task) = parent::start(config.link_sections(), ctx, stopped.clone())?;
        listen = Some(addr);
        tasks.push(task);
    }
    let stop = stopped.clone();
    let quic = matches!(config.upstream.kind, UpstreamKind::Quic);
    let ctx = holdfast_link::Ctx {
        node_id: config.node.id.clone(),
        config: config.upstream.clone(),
        outbox: outbox.clone(),
        status: status.clone(),
        metrics: metrics.clone(),
        services: Services {
            scope: quic.then_some(scope),
            twins: quic.then_some(twins),
            deploy: (quic && config.deploy.accept).then_some(deploy),
        },
        rate: rate.clone(),
    };
    let local = broker.clone().map(|b| b as Arc<dyn LocalDelivery>);
    match config.upstream.kind {
        UpstreamKind::None => {
            tracing::info!("no upstream: root role, the outbox drains to local subscribers");
            tasks.push(tokio::spawn(root::run(
                outbox.clone(),
                local,
                metrics.clone(),
                config.upstream.batch_messages,
                stop,
            )));
        }
        UpstreamKind::Quic => {
            let client = child::client_config(config.link_sections())?;
            tracing::info!(parent = %config.upstream.quic.parent, parent_id = %config.upstream.quic.parent_id, "upstream: QUIC link to the parent");
            tasks.push(tokio::spawn(child::run(ctx, client, stop)));
        }
        UpstreamKind::Mqtt => {
            let bridge = bridge::Bridge {
                link: ctx,
                local,
                tls: bridge::tls_connector(config.link_sections())?,
            };
            tracing::info!(brokers = %config.upstream.mqtt.targets().join(","), "upstream: MQTT bridge");
            tasks.push(tokio::spawn(bridge::run(bridge, stop)));
        }
        UpstreamKind::Nats => {
            let upstream = nats::Nats {
                link: ctx,
                local,
                tls: nats::tls_config(config.link_sections())?,
            };
            tracing::info!(servers = %config.upstream.nats.servers.join(","), stream = %config.upstream.nats.stream, "upstream: NATS JetStream");
            tasks.push(tokio::spawn(nats::run(upstream, stop)));
        }
    }
    Ok(listen)
}

/// Runs a node until `shutdown` resolves, then stops it; `force` resolving
/// during the stop (a second SIGTERM or Ctrl-C) ends the wait at once. What
/// was acknowledged is durable either way.
///
/// # Errors
/// The node cannot start.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()>,
    force: impl Future<Output = ()>,
) -> Result<(), StartError> {
    let node = Node::start(config).await?;
    let reloads = tokio::spawn(reload_on_sighup(node.state().clone()));
    shutdown.await;
    reloads.abort();
    tracing::info!("shutting down (again to stop at once)");
    tokio::select! {
        () = node.shutdown() => {}
        () = force => tracing::warn!("second signal: stopping without waiting"),
    }
    Ok(())
}

/// Returns memory the allocator holds but no longer uses to the OS.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn release_freed_memory() {
    // SAFETY: malloc_trim only releases free memory at the allocator's
    // discretion; it has no preconditions and touches no live allocation.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn release_freed_memory() {}

/// How often the outbox's lanes are sampled for their drain rate and whether
/// they are stuck.
const LANE_WATCH_INTERVAL: Duration = Duration::from_secs(5);

/// Samples the outbox's lanes every [`LANE_WATCH_INTERVAL`] until the node
/// stops ([`Outbox::watch_lanes`]). The lanes could drain during an interval
/// when the link is up at its end, connected during it (a parent that closes
/// the link when it is full), or this node is a root.
async fn watch_lanes(
    outbox: Arc<Outbox>,
    link: Arc<holdfast_link::Status>,
    stuck_after: Duration,
    stopped: watch::Receiver<bool>,
) {
    let start = Instant::now();
    let connects = Arc::new(AtomicU64::new(link.snapshot().connects));
    every(LANE_WATCH_INTERVAL, stopped, move || {
        let status = link.snapshot();
        let reconnected = connects.swap(status.connects, Ordering::Relaxed) != status.connects;
        let now_ms = u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX);
        outbox.watch_lanes(now_ms, status.is_up() || reconnected, stuck_after);
    })
    .await;
}

/// Runs `sample` on a blocking thread every `interval`, the first time at
/// once, until the node stops (the lane watch, the status page's history).
pub(crate) async fn every(
    interval: Duration,
    mut stopped: watch::Receiver<bool>,
    sample: impl Fn() + Clone + Send + 'static,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stopped.wait_for(|s| *s) => return,
        }
        if tokio::task::spawn_blocking(sample.clone()).await.is_err() {
            return;
        }
    }
}

async fn wait_for(mut stopped: watch::Receiver<bool>) {
    let _ = stopped.wait_for(|s| *s).await;
}

fn create_private_dir(dir: &Path) -> Result<(), StartError> {
    let err = |source| StartError::DataDir {
        path: dir.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(err)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(err)?;
    }
    Ok(())
}

/// The range cache as the outbox's donor of disk space: its content can be
/// fetched again, the outbox's messages cannot.
struct CacheDonor(Arc<Cache>);

impl holdfast_outbox::SpaceDonor for CacheDonor {
    fn give_space(&self, bytes: u64) -> u64 {
        self.0.give_space(bytes)
    }
}

/// Reads the admin token file, or creates it with a random token, readable
/// by the owner only.
fn load_or_create_token(path: &Path) -> Result<String, StartError> {
    let err = |source| StartError::DataDir {
        path: path.to_path_buf(),
        source,
    };
    match std::fs::read_to_string(path) {
        Ok(t) if t.trim().len() >= 16 => return Ok(t.trim().to_string()),
        Ok(_) => tracing::warn!(path = %path.display(), "admin token file is too short; writing a new token"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    let mut raw = [0u8; 32];
    holdfast_model::fill_random(&mut raw).map_err(err)?;
    let token = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path).map_err(err)?;
    std::io::Write::write_all(&mut file, token.as_bytes()).map_err(err)?;
    tracing::info!(path = %path.display(), "generated admin token");
    Ok(token)
}
