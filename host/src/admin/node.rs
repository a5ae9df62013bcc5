//! The node's own routes: who it is, its outbox, its broker, its link, and
//! the status page's one answer. Each handler takes the narrow view of the
//! node it reads.
//!
//! | method | path | what |
//! |---|---|---|
//! | GET | `/api/v1/status` | everything the status page shows, in one answer |
//! | GET | `/api/v1/node` | node id, version, uptime |
//! | GET | `/api/v1/outbox` | per lane: messages, bytes, in flight, oldest age |
//! | GET | `/api/v1/mqtt` | broker totals: connections, sessions, subscriptions, retained |
//! | GET | `/api/v1/mqtt/clients?limit=N` | connected clients (default 1000) |
//! | GET | `/api/v1/link` | upstream link state, counters, connected child gateways |

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use axum::Json;
use axum::extract::{FromRef, Query, State};
use axum::http::StatusCode;
use serde_json::{Value, json};

use super::plugins::PluginsApi;
use super::{ApiError, Routes, limit_param};
use crate::state::NodeState;
use holdfast_broker::{Broker, listen};
use holdfast_cache::Cache;
use holdfast_deploy::Deployer;
use holdfast_link::Status;
use holdfast_outbox::Outbox;

/// Who the node is and how long it has run.
#[derive(Clone)]
pub(crate) struct NodeApi {
    id: String,
    data_dir: PathBuf,
    started: Instant,
    mqtt: listen::Bound,
    link: LinkApi,
}

impl FromRef<Arc<NodeState>> for NodeApi {
    fn from_ref(node: &Arc<NodeState>) -> Self {
        NodeApi {
            id: node.config.node.id.clone(),
            data_dir: node.config.node.data_dir.clone(),
            started: node.started,
            mqtt: node.mqtt,
            link: LinkApi::from_ref(node),
        }
    }
}

/// The outbox.
#[derive(Clone)]
pub(crate) struct OutboxApi(Arc<Outbox>);

impl FromRef<Arc<NodeState>> for OutboxApi {
    fn from_ref(node: &Arc<NodeState>) -> Self {
        OutboxApi(node.outbox.clone())
    }
}

/// The broker, when enabled, and where it listens.
#[derive(Clone)]
pub(crate) struct MqttApi {
    broker: Option<Arc<Broker>>,
    bound: listen::Bound,
}

impl FromRef<Arc<NodeState>> for MqttApi {
    fn from_ref(node: &Arc<NodeState>) -> Self {
        MqttApi {
            broker: node.broker.clone(),
            bound: node.mqtt,
        }
    }
}

/// The upstream link's status and the children's listener.
#[derive(Clone)]
pub(crate) struct LinkApi {
    status: Arc<Status>,
    listen: Option<SocketAddr>,
}

impl FromRef<Arc<NodeState>> for LinkApi {
    fn from_ref(node: &Arc<NodeState>) -> Self {
        LinkApi {
            status: node.link.clone(),
            listen: node.link_listen,
        }
    }
}

/// What the status page shows: the views above, the plugins, the cache
/// and the deployments.
#[derive(Clone)]
pub(crate) struct StatusApi {
    node: NodeApi,
    outbox: OutboxApi,
    mqtt: MqttApi,
    plugins: PluginsApi,
    cache: Option<Arc<Cache>>,
    deploy: Arc<Deployer>,
}

impl FromRef<Arc<NodeState>> for StatusApi {
    fn from_ref(node: &Arc<NodeState>) -> Self {
        StatusApi {
            node: NodeApi::from_ref(node),
            outbox: OutboxApi::from_ref(node),
            mqtt: MqttApi::from_ref(node),
            plugins: PluginsApi::from_ref(node),
            cache: node.cache.clone(),
            deploy: node.deploy.clone(),
        }
    }
}

/// The node's routes, to be nested under `/api/v1`.
pub fn routes() -> Routes {
    Routes::default()
        .get("/status", status)
        .get("/node", node_info)
        .get("/outbox", outbox_stats)
        .get("/mqtt", mqtt_stats)
        .get("/mqtt/clients", mqtt_clients)
        .get("/link", link_status)
        .get("/history", history)
}

/// The node's last hour: a sample every 10 s (the status page's charts).
async fn history(State(HistoryApi(history)): State<HistoryApi>) -> Json<Value> {
    Json(json!({
        "interval_seconds": crate::history::INTERVAL.as_secs(),
        "capacity": crate::history::CAPACITY,
        "samples": history.samples(),
    }))
}

/// What `/history` reads.
#[derive(Clone)]
struct HistoryApi(Arc<crate::history::History>);

impl FromRef<Arc<NodeState>> for HistoryApi {
    fn from_ref(node: &Arc<NodeState>) -> Self {
        HistoryApi(node.history.clone())
    }
}

async fn node_info(State(api): State<NodeApi>) -> Json<Value> {
    Json(json!({
        "id": api.id,
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_seconds": api.started.elapsed().as_secs(),
        "data_dir": api.data_dir,
        "mqtt": api.mqtt,
        "link_listen": api.link.listen,
        "upstream": api.link.status.snapshot().kind,
    }))
}

async fn link_status(State(api): State<LinkApi>) -> Json<Value> {
    Json(json!({
        "link": api.status.snapshot(),
        "listen": api.listen,
    }))
}

/// The outbox's lanes as the API shows them.
async fn outbox_json(outbox: &Arc<Outbox>) -> Result<Value, ApiError> {
    let o = outbox.clone();
    let lanes = tokio::task::spawn_blocking(move || o.stats())
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, format!("stats task failed: {e}")))?;
    let (messages, bytes) = lanes.iter().fold((0, 0), |(m, b), s| (m + s.messages, b + s.bytes));
    let oldest = lanes.iter().filter_map(|s| s.oldest_age_ms).max();
    let health = outbox.lane_health();
    let stuck: Vec<usize> = (0..lanes.len())
        .filter(|&l| health.get(l).is_some_and(|h| h.stuck))
        .collect();
    let lanes: Vec<Value> = lanes
        .iter()
        .enumerate()
        .map(|(lane, s)| {
            let h = health.get(lane).copied().unwrap_or_default();
            json!({
                "lane": lane,
                "messages": s.messages,
                "bytes": s.bytes,
                "in_flight": s.in_flight,
                "oldest_age_ms": s.oldest_age_ms,
                "drain_per_s": h.drain_per_s,
                "time_to_drain_s": h.time_to_drain_s,
                "stuck": h.stuck,
                "still_ms": h.still_ms,
            })
        })
        .collect();
    Ok(json!({
        "stuck_lanes": stuck,
        "instance": format!("{:016x}", outbox.instance()),
        "max_bytes": outbox.max_bytes(),
        "messages": messages,
        "bytes": bytes,
        "oldest_age_ms": oldest,
        "lanes": lanes,
    }))
}

async fn outbox_stats(State(OutboxApi(outbox)): State<OutboxApi>) -> Result<Json<Value>, ApiError> {
    Ok(Json(outbox_json(&outbox).await?))
}

/// Clients listed on the status page.
const STATUS_CLIENTS: usize = 50;

/// Everything the status page shows, in one answer.
async fn status(State(api): State<StatusApi>) -> Result<Json<Value>, ApiError> {
    let plugins = &api.plugins.plugins;
    let mut history = plugins.history();
    let recent: Vec<_> = history.drain(history.len().saturating_sub(10)..).rev().collect();
    let broker = api.mqtt.broker.as_ref();
    Ok(Json(json!({
        "node": {
            "id": api.node.id,
            "version": env!("CARGO_PKG_VERSION"),
            "uptime_seconds": api.node.started.elapsed().as_secs(),
        },
        "link": api.node.link.status.snapshot(),
        "outbox": outbox_json(&api.outbox.0).await?,
        "mqtt": {
            "enabled": broker.is_some(),
            "stats": broker.map(|b| b.stats()),
            "clients": broker.map(|b| b.clients(STATUS_CLIENTS)),
        },
        "plugins": plugins.list(),
        "recent_swaps": recent,
        "cache": api.cache.as_ref().map(|c| c.stats()),
        "deploy": api.deploy.local_status(),
    })))
}

async fn mqtt_clients(
    State(api): State<MqttApi>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let broker = api.broker.as_ref().ok_or_else(|| {
        ApiError(
            StatusCode::NOT_FOUND,
            "the MQTT broker is disabled (mqtt.enabled)".into(),
        )
    })?;
    let limit = limit_param(&q, 1000, 100_000)?;
    Ok(Json(json!({
        "connections": broker.connections(),
        "clients": broker.clients(limit),
    })))
}

async fn mqtt_stats(State(api): State<MqttApi>) -> Json<Value> {
    Json(json!({
        "enabled": api.broker.is_some(),
        "listeners": api.bound,
        "stats": api.broker.as_ref().map(|b| b.stats()),
    }))
}
