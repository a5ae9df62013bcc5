//! The admin API: HTTP on a loopback address by default, bearer token for
//! everything under `/api/v1`.
//!
//! | method | path | what |
//! |---|---|---|
//! | GET | `/` | the status page (HTML; its script asks for the token) |
//! | GET | `/healthz` | `ok` (no token) |
//! | GET | `/openapi.json` | the OpenAPI 3.1 document of every route here (no token) |
//! | GET | `/metrics` | OpenMetrics text, which Prometheus scrapes (no token unless `admin.metrics_require_token`) |
//! | GET | `/api/v1/status` | everything the status page shows, in one answer |
//! | GET | `/api/v1/node` | node id, version, uptime |
//! | GET | `/api/v1/outbox` | per lane: messages, bytes, in flight, oldest age |
//! | GET | `/api/v1/mqtt` | broker totals: connections, sessions, subscriptions, retained |
//! | GET | `/api/v1/mqtt/clients?limit=N` | connected clients (default 1000) |
//! | GET | `/api/v1/link` | upstream link state, counters, connected child gateways |
//! | GET | `/api/v1/plugins` | every slot: version hash, source, loaded-at, calls, traps |
//! | GET | `/api/v1/plugins/history` | loads, swaps and rollbacks |
//! | POST | `/api/v1/plugins/{slot}/swap` | body: the `.wasm` bytes, or JSON `{"wasm_base64": …, "config": {…}}` |
//! | POST | `/api/v1/plugins/{slot}/rollback` | back to the previous version |
//! | POST | `/api/v1/reload` | re-read the config file: `{"applied", "not_applied", "failed"}`; 422 if it does not load |
//!
//! The device registry's routes are in [`registry`]; twins and methods in
//! [`iothub`]; the range cache's in [`cache`]; fleet deployments' in [`deploy`].

mod cache;
mod deploy;
mod iothub;
mod registry;

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::handler::Handler;
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::MethodRouter;
use axum::{Json, Router};
use base64::Engine as _;
use serde::Deserialize;
use serde_json::json;
use subtle::ConstantTimeEq;

use crate::state::NodeState;
use holdfast_plugins::{PluginError, SlotName};

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

/// A request body that does not parse: 400 with serde's reason.
pub(crate) fn bad_json(e: impl std::fmt::Display) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, format!("request body: {e}"))
}

/// The `limit` query parameter: `default` when absent, at most `max`; 400
/// when it is not a number.
pub(crate) fn limit_param(q: &HashMap<String, String>, default: usize, max: usize) -> Result<usize, ApiError> {
    match q.get("limit") {
        None => Ok(default),
        Some(v) => v.parse::<usize>().map(|n| n.min(max)).map_err(|_| {
            ApiError(
                StatusCode::BAD_REQUEST,
                format!("limit must be a non-negative number, not {v:?}"),
            )
        }),
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

/// A router that records the method and path of every route it is given,
/// so that the OpenAPI document can be checked against what is served.
#[derive(Default)]
pub struct Routes {
    router: Router<Arc<NodeState>>,
    table: Vec<(&'static str, String)>,
}

impl Routes {
    fn add(mut self, method: &'static str, path: &str, route: MethodRouter<Arc<NodeState>>) -> Self {
        self.router = self.router.route(path, route);
        self.table.push((method, path.to_string()));
        self
    }

    /// A GET route.
    pub fn get<H: Handler<T, Arc<NodeState>>, T: 'static>(self, path: &str, h: H) -> Self {
        self.add("GET", path, axum::routing::get(h))
    }

    /// A POST route.
    pub fn post<H: Handler<T, Arc<NodeState>>, T: 'static>(self, path: &str, h: H) -> Self {
        self.add("POST", path, axum::routing::post(h))
    }

    /// A PATCH route.
    pub fn patch<H: Handler<T, Arc<NodeState>>, T: 'static>(self, path: &str, h: H) -> Self {
        self.add("PATCH", path, axum::routing::patch(h))
    }

    /// A DELETE route.
    pub fn delete<H: Handler<T, Arc<NodeState>>, T: 'static>(self, path: &str, h: H) -> Self {
        self.add("DELETE", path, axum::routing::delete(h))
    }

    /// Adds `other`'s routes.
    pub fn merge(mut self, other: Routes) -> Self {
        self.router = self.router.merge(other.router);
        self.table.extend(other.table);
        self
    }
}

/// The routes under `/api/v1`, all behind the bearer token.
fn api_routes() -> Routes {
    Routes::default()
        .get("/status", status)
        .get("/node", node_info)
        .get("/outbox", outbox_stats)
        .get("/mqtt", mqtt_stats)
        .get("/mqtt/clients", mqtt_clients)
        .get("/link", link_status)
        .get("/plugins", plugins_list)
        .get("/plugins/history", plugins_history)
        .post("/plugins/{slot}/swap", plugin_swap)
        .post("/plugins/{slot}/rollback", plugin_rollback)
        .post("/reload", reload)
        .merge(registry::routes())
        .merge(iothub::routes())
        .merge(cache::routes())
        .merge(deploy::routes())
}

/// The routes outside `/api/v1`: no token.
fn public_routes() -> Routes {
    Routes::default()
        .get("/", status_page)
        .get("/healthz", || async { "ok\n" })
        .get("/metrics", metrics)
        .get("/openapi.json", openapi)
}

/// Every route served, as `(method, path)`, for checking the OpenAPI document.
pub fn route_table() -> Vec<(&'static str, String)> {
    let mut table = public_routes().table;
    table.extend(api_routes().table.into_iter().map(|(m, p)| (m, format!("/api/v1{p}"))));
    table
}

/// Builds the router.
pub fn router(state: Arc<NodeState>) -> Router {
    let api = api_routes()
        .router
        .layer(DefaultBodyLimit::max(MAX_PLUGIN_BYTES + MAX_PLUGIN_BYTES / 2))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    public_routes()
        .router
        .nest("/api/v1", api)
        .layer(middleware::from_fn_with_state(state.clone(), count_requests))
        .with_state(state)
}

/// The OpenAPI 3.1 document of this API.
pub const OPENAPI: &str = include_str!("openapi.json");

/// The status page: one HTML file with its style and script inline.
pub const STATUS_PAGE: &str = include_str!("status.html");

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

async fn status_page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
            ),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        STATUS_PAGE,
    )
        .into_response()
}

async fn reload(State(state): State<Arc<NodeState>>) -> Result<Json<serde_json::Value>, ApiError> {
    let s = state.clone();
    let report = tokio::task::spawn_blocking(move || s.reloader.reload())
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(|e| ApiError(StatusCode::UNPROCESSABLE_ENTITY, e))?;
    Ok(Json(json!(report)))
}

/// Serves the admin API on `listener` until `shutdown` resolves.
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

/// 401 with `WWW-Authenticate: Bearer`.
fn unauthorized() -> Response {
    let mut r = ApiError(StatusCode::UNAUTHORIZED, "missing or wrong bearer token".to_string()).into_response();
    r.headers_mut()
        .insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
    r
}

async fn require_token(State(state): State<Arc<NodeState>>, request: Request, next: Next) -> Response {
    if token_ok(&state, request.headers()) {
        next.run(request).await
    } else {
        unauthorized()
    }
}

async fn count_requests(State(state): State<Arc<NodeState>>, request: Request, next: Next) -> Response {
    let response = next.run(request).await;
    state.metrics.admin_request(response.status().as_u16());
    response
}

async fn metrics(State(state): State<Arc<NodeState>>, headers: HeaderMap) -> Response {
    if state.config.admin.metrics_require_token && !token_ok(&state, &headers) {
        return unauthorized();
    }
    // Refresh gauges that are sampled rather than counted.
    let _ = state.plugins.list();
    state.registry_metrics.set_identities(state.registry.len());
    let outbox = state.outbox.clone();
    let _ = tokio::task::spawn_blocking(move || outbox.stats()).await;
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
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

/// The outbox's lanes as the API shows them.
async fn outbox_json(state: &NodeState) -> Result<serde_json::Value, ApiError> {
    let outbox = state.outbox.clone();
    let lanes = tokio::task::spawn_blocking(move || outbox.stats())
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, format!("stats task failed: {e}")))?;
    let (messages, bytes) = lanes.iter().fold((0, 0), |(m, b), s| (m + s.messages, b + s.bytes));
    let oldest = lanes.iter().filter_map(|s| s.oldest_age_ms).max();
    let lanes: Vec<serde_json::Value> = lanes
        .iter()
        .enumerate()
        .map(|(lane, s)| json!({ "lane": lane, "messages": s.messages, "bytes": s.bytes, "in_flight": s.in_flight, "oldest_age_ms": s.oldest_age_ms }))
        .collect();
    Ok(json!({
        "instance": format!("{:016x}", state.outbox.instance()),
        "max_bytes": state.outbox.max_bytes(),
        "messages": messages,
        "bytes": bytes,
        "oldest_age_ms": oldest,
        "lanes": lanes,
    }))
}

async fn outbox_stats(State(state): State<Arc<NodeState>>) -> Result<Json<serde_json::Value>, ApiError> {
    Ok(Json(outbox_json(&state).await?))
}

/// Everything the status page shows, in one answer.
async fn status(State(state): State<Arc<NodeState>>) -> Result<Json<serde_json::Value>, ApiError> {
    let mut history = state.plugins.history();
    let recent: Vec<_> = history.drain(history.len().saturating_sub(10)..).rev().collect();
    Ok(Json(json!({
        "node": {
            "id": state.config.node.id,
            "version": env!("CARGO_PKG_VERSION"),
            "uptime_seconds": state.started.elapsed().as_secs(),
        },
        "link": state.link.snapshot(),
        "outbox": outbox_json(&state).await?,
        "mqtt": {
            "enabled": state.broker.is_some(),
            "stats": state.broker.as_ref().map(|b| b.stats()),
            "clients": state.broker.as_ref().map(|b| b.clients(STATUS_CLIENTS)),
        },
        "plugins": state.plugins.list(),
        "recent_swaps": recent,
        "cache": state.cache.as_ref().map(|c| c.stats()),
        "deploy": state.deploy.local_status(),
    })))
}

/// Clients listed on the status page.
const STATUS_CLIENTS: usize = 50;

async fn mqtt_clients(
    State(state): State<Arc<NodeState>>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let broker = state.broker.as_ref().ok_or_else(|| {
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    #[test]
    fn openapi_documents_every_route_and_nothing_else() {
        let doc: serde_json::Value = serde_json::from_str(OPENAPI).unwrap();
        assert_eq!(doc["openapi"], "3.1.0");
        let mut documented = BTreeSet::new();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                documented.insert((method.to_uppercase(), path.clone()));
                // Every `{param}` of the path is declared as a path parameter.
                for param in path.split('/').filter_map(|s| s.strip_prefix('{')?.strip_suffix('}')) {
                    let declared = op["parameters"]
                        .as_array()
                        .is_some_and(|ps| ps.iter().any(|p| p["name"] == param && p["in"] == "path"));
                    assert!(declared, "{method} {path}: path parameter {param} is not declared");
                }
                // Public routes say so; the rest inherit the bearer requirement.
                let public = !path.starts_with("/api/v1/");
                assert_eq!(op.get("security").is_some(), public, "{method} {path}: security");
            }
        }
        let table = route_table();
        let served: BTreeSet<(String, String)> = table.iter().map(|(m, p)| (m.to_string(), p.clone())).collect();
        assert_eq!(served.len(), table.len(), "a route is registered twice");
        let undocumented: Vec<_> = served.difference(&documented).collect();
        let unserved: Vec<_> = documented.difference(&served).collect();
        assert!(
            undocumented.is_empty(),
            "served but not in openapi.json: {undocumented:?}"
        );
        assert!(unserved.is_empty(), "in openapi.json but not served: {unserved:?}");
    }
}
