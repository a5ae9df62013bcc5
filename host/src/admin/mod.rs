//! The admin API: HTTP on a loopback address by default, bearer token for
//! everything under `/api/v1`.
//!
//! | method | path | what |
//! |---|---|---|
//! | GET | `/healthz` | `ok` (no token) |
//! | GET | `/metrics` | Prometheus text (no token unless `admin.metrics_require_token`) |
//! | GET | `/api/v1/node` | node id, version, uptime |
//! | GET | `/api/v1/outbox` | per lane: messages, bytes, in flight, oldest age |
//! | GET | `/api/v1/link` | upstream link state, counters, connected child gateways |
//! | GET | `/api/v1/plugins` | every slot: version hash, source, loaded-at, calls, traps |
//! | GET | `/api/v1/plugins/history` | loads, swaps and rollbacks |
//! | POST | `/api/v1/plugins/{slot}/swap` | body: the `.wasm` bytes, or JSON `{"wasm_base64": …, "config": {…}}` |
//! | POST | `/api/v1/plugins/{slot}/rollback` | back to the previous version |
//! | POST | `/api/v1/reload` | re-read the config file: `{"applied", "not_applied", "failed"}`; 422 if it does not load |
//!
//! The device registry's routes are in [`registry`]; twins and methods in
//! [`iothub`]; the range cache's in [`cache`].

mod cache;
mod iothub;
mod registry;

use std::future::Future;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use serde::Deserialize;
use serde_json::json;
use subtle::ConstantTimeEq;

use crate::metrics::StatusLabels;
use crate::node::NodeState;
use crate::plugins::{PluginError, SlotName};

/// Largest plugin upload.
pub const MAX_PLUGIN_BYTES: usize = 64 << 20;

/// An API error: a status and a message, rendered as `{"error": …}`.
#[derive(Debug)]
pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

impl From<PluginError> for ApiError {
    fn from(e: PluginError) -> Self {
        let status = match e {
            PluginError::UnknownSlot(_) => StatusCode::NOT_FOUND,
            PluginError::NoPrevious(_) => StatusCode::CONFLICT,
            PluginError::Engine(_) | PluginError::Read { .. } => StatusCode::INTERNAL_SERVER_ERROR,
            _ => StatusCode::UNPROCESSABLE_ENTITY,
        };
        ApiError(status, e.to_string())
    }
}

/// Builds the router.
pub fn router(state: Arc<NodeState>) -> Router {
    let api = Router::new()
        .route("/node", get(node_info))
        .route("/outbox", get(outbox_stats))
        .route("/mqtt", get(mqtt_stats))
        .route("/link", get(link_status))
        .route("/plugins", get(plugins_list))
        .route("/plugins/history", get(plugins_history))
        .route("/plugins/{slot}/swap", post(plugin_swap))
        .route("/plugins/{slot}/rollback", post(plugin_rollback))
        .route("/reload", post(reload))
        .merge(registry::routes())
        .merge(iothub::routes())
        .merge(cache::routes())
        .layer(DefaultBodyLimit::max(MAX_PLUGIN_BYTES + MAX_PLUGIN_BYTES / 2))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .nest("/api/v1", api)
        .layer(middleware::from_fn_with_state(state.clone(), count_requests))
        .with_state(state)
}

/// Serves the admin API on `listener` until `shutdown` resolves.
async fn reload(State(state): State<Arc<NodeState>>) -> Result<Json<serde_json::Value>, ApiError> {
    let s = state.clone();
    let report = tokio::task::spawn_blocking(move || s.reloader.reload(&s.plugins))
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(|e| ApiError(StatusCode::UNPROCESSABLE_ENTITY, e))?;
    Ok(Json(json!(report)))
}

pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<NodeState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    if let Err(e) = axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
    {
        tracing::error!("admin API stopped: {e}");
    }
}

fn token_ok(state: &NodeState, headers: &HeaderMap) -> bool {
    let Some(value) = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let Some(token) = value.strip_prefix("Bearer ") else {
        return false;
    };
    let expected = state.admin_token.as_bytes();
    token.len() == expected.len() && bool::from(token.as_bytes().ct_eq(expected))
}

async fn require_token(State(state): State<Arc<NodeState>>, request: Request, next: Next) -> Response {
    if token_ok(&state, request.headers()) {
        next.run(request).await
    } else {
        let mut r = ApiError(StatusCode::UNAUTHORIZED, "missing or wrong bearer token".to_string()).into_response();
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
        r
    }
}

async fn count_requests(State(state): State<Arc<NodeState>>, request: Request, next: Next) -> Response {
    let response = next.run(request).await;
    state
        .metrics
        .admin_requests
        .get_or_create(&StatusLabels {
            code: response.status().as_u16(),
        })
        .inc();
    response
}

async fn metrics(State(state): State<Arc<NodeState>>, headers: HeaderMap) -> Response {
    if state.config.admin.metrics_require_token && !token_ok(&state, &headers) {
        return ApiError(StatusCode::UNAUTHORIZED, "missing or wrong bearer token".to_string()).into_response();
    }
    // Refresh gauges that are sampled rather than counted.
    let _ = state.plugins.list();
    state.metrics.registry_identities.set(state.registry.len() as i64);
    let outbox = state.outbox.clone();
    let _ = tokio::task::spawn_blocking(move || outbox.stats()).await;
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        state.metrics.render(),
    )
        .into_response()
}

async fn node_info(State(state): State<Arc<NodeState>>) -> Json<serde_json::Value> {
    Json(json!({
        "id": state.config.node.id,
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_seconds": state.started.elapsed().as_secs(),
        "data_dir": state.config.node.data_dir,
        "mqtt": state.mqtt,
        "link_listen": state.link_listen,
        "upstream": state.link.snapshot().kind,
    }))
}

async fn link_status(State(state): State<Arc<NodeState>>) -> Json<serde_json::Value> {
    Json(json!({
        "link": state.link.snapshot(),
        "listen": state.link_listen,
    }))
}

async fn outbox_stats(State(state): State<Arc<NodeState>>) -> Result<Json<serde_json::Value>, ApiError> {
    let outbox = state.outbox.clone();
    let lanes = tokio::task::spawn_blocking(move || outbox.stats())
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, format!("stats task failed: {e}")))?;
    let lanes: Vec<serde_json::Value> = lanes
        .iter()
        .enumerate()
        .map(|(lane, s)| json!({ "lane": lane, "messages": s.messages, "bytes": s.bytes, "in_flight": s.in_flight, "oldest_age_ms": s.oldest_age_ms }))
        .collect();
    Ok(Json(json!({
        "instance": format!("{:016x}", state.outbox.instance()),
        "max_bytes": state.outbox.max_bytes(),
        "lanes": lanes,
    })))
}

async fn mqtt_stats(State(state): State<Arc<NodeState>>) -> Json<serde_json::Value> {
    Json(json!({
        "enabled": state.broker.is_some(),
        "listeners": state.mqtt,
        "stats": state.broker.as_ref().map(|b| b.stats()),
    }))
}

async fn plugins_list(State(state): State<Arc<NodeState>>) -> Json<serde_json::Value> {
    Json(json!({ "plugins": state.plugins.list() }))
}

async fn plugins_history(State(state): State<Arc<NodeState>>) -> Json<serde_json::Value> {
    Json(json!({ "history": state.plugins.history() }))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SwapJson {
    wasm_base64: String,
    config: Option<serde_json::Value>,
}

async fn plugin_swap(
    State(state): State<Arc<NodeState>>,
    Path(slot): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    let slot: SlotName = slot.parse()?;
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    let (bytes, config) = if is_json {
        let req: SwapJson = serde_json::from_slice(&body)
            .map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("swap request is not valid JSON: {e}")))?;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(req.wasm_base64.as_bytes())
            .map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("wasm_base64 is not base64: {e}")))?;
        let config = match req.config {
            None | Some(serde_json::Value::Null) => None,
            Some(v @ serde_json::Value::Object(_)) => Some(v.to_string()),
            Some(_) => {
                return Err(ApiError(
                    StatusCode::BAD_REQUEST,
                    "config must be a JSON object".to_string(),
                ));
            }
        };
        (bytes, config)
    } else {
        (body.to_vec(), None)
    };
    if bytes.len() > MAX_PLUGIN_BYTES {
        return Err(ApiError(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("plugin is larger than {MAX_PLUGIN_BYTES} bytes"),
        ));
    }
    let plugins = state.plugins.clone();
    let record = tokio::task::spawn_blocking(move || plugins.swap(slot, &bytes, "admin-api".to_string(), config))
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, format!("swap task failed: {e}")))??;
    Ok(Json(json!(record)))
}

async fn plugin_rollback(
    State(state): State<Arc<NodeState>>,
    Path(slot): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let slot: SlotName = slot.parse()?;
    let plugins = state.plugins.clone();
    let record = tokio::task::spawn_blocking(move || plugins.rollback(slot))
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, format!("rollback task failed: {e}")))??;
    Ok(Json(json!(record)))
}
