//! The plugin routes, on a view of the node that holds the plugin host only.
//!
//! | method | path | what |
//! |---|---|---|
//! | GET | `/api/v1/plugins` | every slot: version hash, source, loaded-at, calls, traps |
//! | GET | `/api/v1/plugins/history` | loads, swaps and rollbacks |
//! | POST | `/api/v1/plugins/{slot}/swap` | body: the `.wasm` bytes, or JSON `{"wasm_base64": …, "config": {…}}` |
//! | POST | `/api/v1/plugins/{slot}/rollback` | back to the previous version |

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{FromRef, Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use base64::Engine as _;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{ApiError, MAX_PLUGIN_BYTES, Routes};
use crate::state::NodeState;
use holdfast_plugins::{PluginHost, SlotName};

/// What the plugin routes use.
#[derive(Clone)]
pub(crate) struct PluginsApi {
    pub(crate) plugins: Arc<PluginHost>,
}

impl FromRef<Arc<NodeState>> for PluginsApi {
    fn from_ref(node: &Arc<NodeState>) -> Self {
        PluginsApi {
            plugins: node.plugins.clone(),
        }
    }
}

/// The plugin routes, to be nested under `/api/v1`.
pub fn routes() -> Routes {
    Routes::default()
        .get("/plugins", list)
        .get("/plugins/history", history)
        .post("/plugins/{slot}/swap", swap)
        .post("/plugins/{slot}/rollback", rollback)
}

async fn list(State(api): State<PluginsApi>) -> Json<Value> {
    Json(json!({ "plugins": api.plugins.list() }))
}

async fn history(State(api): State<PluginsApi>) -> Json<Value> {
    Json(json!({ "history": api.plugins.history() }))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SwapJson {
    wasm_base64: String,
    config: Option<Value>,
}

/// The component and its plugin config from a swap request: the raw
/// `.wasm` body, or JSON with it in base64.
fn swap_request(headers: &HeaderMap, body: &Bytes) -> Result<(Vec<u8>, Option<String>), ApiError> {
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !is_json {
        return Ok((body.to_vec(), None));
    }
    let req: SwapJson = serde_json::from_slice(body)
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("swap request is not valid JSON: {e}")))?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(req.wasm_base64.as_bytes())
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("wasm_base64 is not base64: {e}")))?;
    let config = match req.config {
        None | Some(Value::Null) => None,
        Some(v @ Value::Object(_)) => Some(v.to_string()),
        Some(_) => {
            return Err(ApiError(
                StatusCode::BAD_REQUEST,
                "config must be a JSON object".to_string(),
            ));
        }
    };
    Ok((bytes, config))
}

async fn swap(
    State(api): State<PluginsApi>,
    Path(slot): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let slot: SlotName = slot.parse()?;
    let (bytes, config) = swap_request(&headers, &body)?;
    if bytes.len() > MAX_PLUGIN_BYTES {
        return Err(ApiError(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("plugin is larger than {MAX_PLUGIN_BYTES} bytes"),
        ));
    }
    let plugins = api.plugins.clone();
    let record = tokio::task::spawn_blocking(move || plugins.swap(slot, &bytes, "admin-api".to_string(), config))
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, format!("swap task failed: {e}")))??;
    Ok(Json(json!(record)))
}

async fn rollback(State(api): State<PluginsApi>, Path(slot): Path<String>) -> Result<Json<Value>, ApiError> {
    let slot: SlotName = slot.parse()?;
    let plugins = api.plugins.clone();
    let record = tokio::task::spawn_blocking(move || plugins.rollback(slot))
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, format!("rollback task failed: {e}")))??;
    Ok(Json(json!(record)))
}
