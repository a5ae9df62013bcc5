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
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde_json::{Value, json};

use super::{ApiError, Routes, bad_json};
use crate::node::NodeState;
use holdfast_deploy::{Bundle, DeployError, Deployer, model::Spec};

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
    state: &NodeState,
    f: impl FnOnce(&Deployer) -> Result<T, DeployError> + Send + 'static,
) -> Result<T, ApiError> {
    let d = state.deploy.clone();
    Ok(tokio::task::spawn_blocking(move || f(&d))
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, format!("deploy task failed: {e}")))??)
}

async fn local(State(state): State<Arc<NodeState>>) -> Json<Value> {
    let mut v = json!(state.deploy.local_status());
    v["pinned"] = json!(state.config.deploy.pinned);
    Json(v)
}

async fn list(State(state): State<Arc<NodeState>>) -> Json<Value> {
    Json(json!({ "deployments": state.deploy.list() }))
}

async fn show(State(state): State<Arc<NodeState>>, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    let view = state
        .deploy
        .show(&id)
        .ok_or_else(|| ApiError::from(DeployError::NotFound(id)))?;
    Ok(Json(json!(view)))
}

async fn create(State(state): State<Arc<NodeState>>, body: Bytes) -> Result<(StatusCode, Json<Value>), ApiError> {
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
    let doc = blocking(&state, move |d| d.create(spec)).await?;
    Ok((StatusCode::CREATED, Json(json!(doc))))
}

async fn upload(State(state): State<Arc<NodeState>>, body: Bytes) -> Result<(StatusCode, Json<Value>), ApiError> {
    let size = body.len();
    let sha = blocking(&state, move |d| d.put_component(&body)).await?;
    Ok((StatusCode::CREATED, Json(json!({ "sha256": sha, "size": size }))))
}

async fn rollback(State(state): State<Arc<NodeState>>, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    let doc = blocking(&state, move |d| d.rollback(&id)).await?;
    Ok(Json(json!(doc)))
}

async fn delete(State(state): State<Arc<NodeState>>, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    let id2 = id.clone();
    blocking(&state, move |d| d.delete(&id2)).await?;
    Ok(Json(json!({ "deleted": id })))
}

async fn export(State(state): State<Arc<NodeState>>, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    let bundle = blocking(&state, move |d| d.export(&id)).await?;
    Ok(Json(json!(bundle)))
}

async fn import(State(state): State<Arc<NodeState>>, body: Bytes) -> Result<(StatusCode, Json<Value>), ApiError> {
    let bundle: Bundle = serde_json::from_slice(&body).map_err(bad_json)?;
    let doc = blocking(&state, move |d| d.import(bundle)).await?;
    Ok((StatusCode::CREATED, Json(json!(doc))))
}
