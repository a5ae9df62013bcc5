//! Admin API routes of fleet deployments.
//!
//! | method | path | what |
//! |---|---|---|
//! | GET | `/api/v1/deploy` | this node: what is applied, its ancestors, content it refused |
//! | GET | `/api/v1/deployments` | deployments owned here and received from the parent, with node states |
//! | POST | `/api/v1/deployments` | create (owning node): a deployment spec (JSON) |
//! | POST | `/api/v1/deployments/components` | body: `.wasm` bytes → `{"sha256", "size"}` |
//! | GET | `/api/v1/deployments/{id}` | one deployment and every node of its target |
//! | POST | `/api/v1/deployments/{id}/rollback` | every node returns to what it ran before |
//! | DELETE | `/api/v1/deployments/{id}` | remove it (nodes return to what they ran before) |
//! | GET | `/api/v1/deployments/{id}/export` | the signed deployment with its components |
//! | POST | `/api/v1/deployments/import` | an exported deployment, verified like one from the parent |

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{FromRef, Path, State};
use axum::http::StatusCode;
use serde_json::{Value, json};

use super::{ApiError, Routes, bad_json};
use crate::config::Config;
use crate::state::NodeState;
use holdfast_deploy::{Bundle, DeployError, Deployer, model::Spec};
use holdfast_plugins::PluginHost;
use holdfast_plugins::SlotName;

impl From<DeployError> for ApiError {
    fn from(e: DeployError) -> Self {
        let status = match e {
            DeployError::Invalid(_) | DeployError::HashMismatch { .. } => StatusCode::BAD_REQUEST,
            DeployError::NotFound(_) => StatusCode::NOT_FOUND,
            DeployError::Conflict(_) => StatusCode::CONFLICT,
            DeployError::Refused(_) => StatusCode::FORBIDDEN,
            DeployError::Store(_) | DeployError::Io(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(status, e.to_string())
    }
}

/// What the deployment routes use of the node.
#[derive(Clone)]
pub(crate) struct DeployApi {
    deploy: Arc<Deployer>,
    /// Checks components against their slots' worlds.
    plugins: Arc<PluginHost>,
    /// The config the node started with (deployed settings are checked on it).
    config: Arc<Config>,
}

impl FromRef<Arc<NodeState>> for DeployApi {
    fn from_ref(node: &Arc<NodeState>) -> Self {
        DeployApi {
            deploy: node.deploy.clone(),
            plugins: node.plugins.clone(),
            config: node.config.clone(),
        }
    }
}

pub fn routes() -> Routes {
    Routes::default()
        .get("/deploy", local)
        .get("/deployments", list)
        .post("/deployments", create)
        .post("/deployments/components", upload)
        .post("/deployments/import", import)
        .get("/deployments/{id}", show)
        .delete("/deployments/{id}", delete)
        .post("/deployments/{id}/rollback", rollback)
        .get("/deployments/{id}/export", export)
}

/// Runs a deployment operation off the reactor (it syncs to disk).
async fn blocking<T: Send + 'static>(
    state: &DeployApi,
    f: impl FnOnce(&Deployer) -> Result<T, DeployError> + Send + 'static,
) -> Result<T, ApiError> {
    let d = state.deploy.clone();
    Ok(tokio::task::spawn_blocking(move || f(&d))
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, format!("deploy task failed: {e}")))??)
}

async fn local(State(state): State<DeployApi>) -> Json<Value> {
    let mut v = json!(state.deploy.local_status());
    v["pinned"] = json!(state.config.deploy.pinned);
    Json(v)
}

async fn list(State(state): State<DeployApi>) -> Json<Value> {
    Json(json!({ "deployments": state.deploy.list() }))
}

async fn show(State(state): State<DeployApi>, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    let view = state
        .deploy
        .show(&id)
        .ok_or_else(|| ApiError::from(DeployError::NotFound(id)))?;
    Ok(Json(json!(view)))
}

/// Checks that `bytes` is a plugin component implementing the world of
/// `slot`, or of some slot when `slot` is `None`, before it is stored or
/// offered to any node: not one that every node would fail to load. A
/// refusal is a 422, counted in `holdfast_deploy_events_total{event="refused-component"}`.
/// Compiles the component: call it off the reactor.
fn check_component(state: &DeployApi, bytes: &[u8], slot: Option<SlotName>) -> Result<Vec<SlotName>, ApiError> {
    state.plugins.check_component(bytes, slot).map_err(|e| {
        let e = ApiError::from(e);
        if e.0 == StatusCode::UNPROCESSABLE_ENTITY {
            state.deploy.metrics().count("refused-component");
            tracing::warn!(error = %e.1, "deploy: component refused");
        }
        e
    })
}

/// Checks each component a spec sets against its slot's world. A slot or
/// component the deployer does not know is left to it to refuse.
fn check_spec_components<'a>(
    state: &DeployApi,
    plugins: impl Iterator<Item = (&'a String, &'a Option<String>)>,
    bytes_of: impl Fn(&str) -> Option<Vec<u8>>,
) -> Result<(), ApiError> {
    for (slot, sha) in plugins {
        let (Ok(slot_name), Some(sha)) = (slot.parse::<SlotName>(), sha) else {
            continue;
        };
        if let Some(bytes) = bytes_of(sha) {
            check_component(state, &bytes, Some(slot_name))
                .map_err(|ApiError(status, msg)| ApiError(status, format!("plugins.{slot}: component {sha}: {msg}")))?;
        }
    }
    Ok(())
}

/// Runs `f` with the node's state off the reactor (it compiles components
/// and syncs to disk).
async fn blocking_state<T: Send + 'static>(
    state: &DeployApi,
    f: impl FnOnce(&DeployApi) -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    let state = state.clone();
    tokio::task::spawn_blocking(move || f(&state))
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, format!("deploy task failed: {e}")))?
}

async fn create(State(state): State<DeployApi>, body: Bytes) -> Result<(StatusCode, Json<Value>), ApiError> {
    let spec: Spec = serde_json::from_slice(&body).map_err(bad_json)?;
    // The settings must make a valid config here (the nodes check again).
    let probe = holdfast_deploy::Overlay {
        deployment: spec.id.clone(),
        plugins: spec
            .plugins
            .iter()
            .map(|(slot, p)| {
                let s = holdfast_deploy::SlotOverlay {
                    config: p.config.clone(),
                    ..Default::default()
                };
                (slot.clone(), s)
            })
            .collect(),
        settings: spec.settings.clone(),
    };
    crate::reload::compose(&state.config, Some(&probe)).map_err(|e| ApiError(StatusCode::BAD_REQUEST, e))?;
    // A component is offered only for a slot whose world it implements.
    let doc = blocking_state(&state, move |state| {
        let slots = spec.plugins.iter().map(|(slot, p)| (slot, &p.sha256));
        check_spec_components(state, slots, |sha| state.deploy.read_component(sha).ok())?;
        Ok(state.deploy.create(spec)?)
    })
    .await?;
    Ok((StatusCode::CREATED, Json(json!(doc))))
}

async fn upload(State(state): State<DeployApi>, body: Bytes) -> Result<(StatusCode, Json<Value>), ApiError> {
    let size = body.len();
    // Only a plugin component of a known world is stored (after the size
    // check: nothing too large to store is compiled).
    let (sha, worlds) = blocking_state(&state, move |state| {
        if size as u64 > state.deploy.max_component_bytes() {
            return Ok(state.deploy.put_component(&body).map(|sha| (sha, Vec::new()))?);
        }
        let worlds = check_component(state, &body, None)?;
        Ok((state.deploy.put_component(&body)?, worlds))
    })
    .await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({ "sha256": sha, "size": size, "worlds": worlds })),
    ))
}

async fn rollback(State(state): State<DeployApi>, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    let doc = blocking(&state, move |d| d.rollback(&id)).await?;
    Ok(Json(json!(doc)))
}

async fn delete(State(state): State<DeployApi>, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    let id2 = id.clone();
    blocking(&state, move |d| d.delete(&id2)).await?;
    Ok(Json(json!({ "deleted": id })))
}

async fn export(State(state): State<DeployApi>, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    let bundle = blocking(&state, move |d| d.export(&id)).await?;
    Ok(Json(json!(bundle)))
}

async fn import(State(state): State<DeployApi>, body: Bytes) -> Result<(StatusCode, Json<Value>), ApiError> {
    let bundle: Bundle = serde_json::from_slice(&body).map_err(bad_json)?;
    let doc = blocking_state(&state, move |state| {
        // The components must be plugins of their slots' worlds, as at
        // upload. What is missing, unreadable or does not match its hash
        // the deployer refuses as such.
        if let Ok(doc) = serde_json::from_str::<holdfast_deploy::model::Doc>(&bundle.signed.doc) {
            use base64::Engine as _;
            let slots = doc.spec.plugins.iter().map(|(slot, p)| (slot, &p.sha256));
            check_spec_components(state, slots, |sha| {
                let b64 = bundle.components.get(sha)?;
                let bytes = base64::engine::general_purpose::STANDARD.decode(b64).ok()?;
                (holdfast_deploy::model::sha256_hex(&bytes) == sha).then_some(bytes)
            })?;
        }
        Ok(state.deploy.import(bundle)?)
    })
    .await?;
    Ok((StatusCode::CREATED, Json(json!(doc))))
}
