//! The admin API: HTTP on a loopback address by default, bearer token for
//! everything under `/api/v1`.
//!
//! | method | path | what |
//! |---|---|---|
//! | GET | `/` | the status page (HTML; its script asks for the token) |
//! | GET | `/healthz` | `ok`, or 503 while the store refuses writes (no token) |
//! | GET | `/openapi.json` | the OpenAPI 3.1 document of every route here (no token) |
//! | GET | `/metrics` | OpenMetrics text, which Prometheus scrapes (no token unless `admin.metrics_require_token`) |
//! | POST | `/api/v1/reload` | re-read the config file: `{"applied", "not_applied", "failed"}`; 422 if it does not load |
//!
//! The node's own routes (status, node, outbox, MQTT, link) are in
//! [`node`]; the plugins' in [`plugins`]; the device registry's in
//! [`registry`]; twins and methods in [`iothub`]; the range cache's in
//! [`cache`]; fleet deployments' in [`deploy`]. Every handler takes a narrow
//! view of the node (`axum`'s `FromRef`), never the whole [`NodeState`].

mod cache;
mod deadletter;
mod deploy;
mod fleet;
mod iothub;
mod node;
mod plugins;
mod registry;

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, FromRef, Request, State};
use axum::handler::Handler;
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::MethodRouter;
use axum::{Json, Router};
use serde_json::json;
use subtle::ConstantTimeEq;

use crate::metrics::HostMetrics;
use crate::reload::Reloader;
use crate::state::NodeState;
use holdfast_outbox::Outbox;
use holdfast_plugins::{PluginError, PluginHost};
use holdfast_registry::{Registry, RegistryMetrics};

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
        .post("/reload", reload)
        .merge(node::routes())
        .merge(plugins::routes())
        .merge(registry::routes())
        .merge(iothub::routes())
        .merge(cache::routes())
        .merge(deploy::routes())
        .merge(deadletter::routes())
        .merge(fleet::routes())
}

/// The routes outside `/api/v1`: no token.
fn public_routes() -> Routes {
    Routes::default()
        .get("/", status_page)
        .get("/healthz", healthz)
        .get("/metrics", metrics)
        .get("/openapi.json", openapi)
}

/// What `/healthz` looks at: the outbox, whose store can fail.
#[derive(Clone)]
struct HealthApi(Arc<holdfast_outbox::Outbox>);

impl FromRef<Arc<NodeState>> for HealthApi {
    fn from_ref(node: &Arc<NodeState>) -> Self {
        HealthApi(node.outbox.clone())
    }
}

/// `ok`, or 503 with why while the store refuses writes (it reopens by
/// itself once the disk has room; `holdfast_outbox_storage_failed`).
async fn healthz(State(api): State<HealthApi>) -> Response {
    match api.0.storage_failure() {
        None => "ok\n".into_response(),
        Some(reason) => (StatusCode::SERVICE_UNAVAILABLE, format!("storage failed: {reason}\n")).into_response(),
    }
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
        .route_layer(middleware::from_fn_with_state(Token::from_ref(&state), require_token));
    public_routes()
        .router
        .nest("/api/v1", api)
        .layer(middleware::from_fn_with_state(state.metrics.clone(), count_requests))
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

async fn reload(State(ReloadApi(reloader)): State<ReloadApi>) -> Result<Json<serde_json::Value>, ApiError> {
    let report = tokio::task::spawn_blocking(move || reloader.reload())
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(|e| ApiError(StatusCode::UNPROCESSABLE_ENTITY, e))?;
    Ok(Json(json!(report)))
}

/// The reloader, for `POST /reload`.
#[derive(Clone)]
struct ReloadApi(Arc<Reloader>);

impl FromRef<Arc<NodeState>> for ReloadApi {
    fn from_ref(node: &Arc<NodeState>) -> Self {
        ReloadApi(node.reloader.clone())
    }
}

/// The admin bearer token.
#[derive(Clone)]
struct Token(Arc<str>);

impl FromRef<Arc<NodeState>> for Token {
    fn from_ref(node: &Arc<NodeState>) -> Self {
        Token(Arc::from(node.admin_token.as_str()))
    }
}

/// What `/metrics` reads: the registry, and the gauges it samples first.
#[derive(Clone)]
struct MetricsApi {
    metrics: Arc<HostMetrics>,
    token: Option<Token>,
    plugins: Arc<PluginHost>,
    registry: Arc<Registry>,
    registry_metrics: RegistryMetrics,
    outbox: Arc<Outbox>,
}

impl FromRef<Arc<NodeState>> for MetricsApi {
    fn from_ref(node: &Arc<NodeState>) -> Self {
        MetricsApi {
            metrics: node.metrics.clone(),
            token: node.config.admin.metrics_require_token.then(|| Token::from_ref(node)),
            plugins: node.plugins.clone(),
            registry: node.registry.clone(),
            registry_metrics: node.registry_metrics.clone(),
            outbox: node.outbox.clone(),
        }
    }
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

fn token_ok(expected: &Token, headers: &HeaderMap) -> bool {
    let Some(value) = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let Some(token) = value.strip_prefix("Bearer ") else {
        return false;
    };
    let expected = expected.0.as_bytes();
    token.len() == expected.len() && bool::from(token.as_bytes().ct_eq(expected))
}

/// 401 with `WWW-Authenticate: Bearer`.
fn unauthorized() -> Response {
    let mut r = ApiError(StatusCode::UNAUTHORIZED, "missing or wrong bearer token".to_string()).into_response();
    r.headers_mut()
        .insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
    r
}

async fn require_token(State(token): State<Token>, request: Request, next: Next) -> Response {
    if token_ok(&token, request.headers()) {
        next.run(request).await
    } else {
        unauthorized()
    }
}

async fn count_requests(State(metrics): State<Arc<HostMetrics>>, request: Request, next: Next) -> Response {
    let response = next.run(request).await;
    metrics.admin_request(response.status().as_u16());
    response
}

async fn metrics(State(api): State<MetricsApi>, headers: HeaderMap) -> Response {
    if let Some(token) = &api.token
        && !token_ok(token, &headers)
    {
        return unauthorized();
    }
    // Refresh gauges that are sampled rather than counted.
    let _ = api.plugins.list();
    api.registry_metrics.set_identities(api.registry.len());
    let outbox = api.outbox.clone();
    let _ = tokio::task::spawn_blocking(move || outbox.stats()).await;
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        api.metrics.render(),
    )
        .into_response()
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
