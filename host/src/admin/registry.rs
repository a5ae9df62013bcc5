//! Admin API routes of the device registry.
//!
//! | method | path | what |
//! |---|---|---|
//! | GET | `/api/v1/registry` | role (owner or replica), counts, last scope sync |
//! | GET | `/api/v1/devices` | identities (`?kind=`, `?parent=`), no secrets |
//! | POST | `/api/v1/devices` | add: `{"id", "kind", "parent", "auth", …}`; answers with the keys |
//! | GET | `/api/v1/devices/{id}` | one identity; `?keys=true` includes the symmetric keys |
//! | DELETE | `/api/v1/devices/{id}` | remove (a device's modules go with it) |
//! | POST | `/api/v1/devices/{id}/parent` | `{"parent": "gw1"}` or `{"parent": null}` |
//! | POST | `/api/v1/devices/{id}/labels` | `{"labels": {"site": "north"}}`: replaces the labels deployments target |
//! | POST | `/api/v1/devices/{id}/rotate-key` | `{"which": "primary" \| "secondary" \| "both"}`; answers with the keys |
//! | POST | `/api/v1/devices/{id}/disable`, `/enable` | |
//! | GET, POST | `/api/v1/registry/cas` | registered CAs; add `{"name", "pem"}` |
//! | DELETE | `/api/v1/registry/cas/{name}` | remove a CA |
//!
//! A module's id contains `/`: send it URL-encoded (`dev1%2Fmod1`).

use std::collections::HashMap;
use std::sync::Arc;

use axum::Json;
use axum::extract::{FromRef, Path, Query, State};
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{ApiError, Routes, bad_json};
use crate::state::NodeState;
use holdfast_registry::{NewIdentity, Registry, RegistryError, RegistryMetrics, WhichKey};

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> Self {
        let status = match e {
            RegistryError::NotFound(_) => StatusCode::NOT_FOUND,
            RegistryError::Exists(_) | RegistryError::Conflict(_) | RegistryError::Replica(_) => StatusCode::CONFLICT,
            RegistryError::Invalid(_) => StatusCode::BAD_REQUEST,
            RegistryError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(status, e.to_string())
    }
}

/// What the registry's routes use of the node.
#[derive(Clone)]
pub(crate) struct RegistryApi {
    registry: Arc<Registry>,
    metrics: RegistryMetrics,
}

impl FromRef<Arc<NodeState>> for RegistryApi {
    fn from_ref(node: &Arc<NodeState>) -> Self {
        RegistryApi {
            registry: node.registry.clone(),
            metrics: node.registry_metrics.clone(),
        }
    }
}

/// The registry's routes, to be nested under `/api/v1`.
pub fn routes() -> Routes {
    Routes::default()
        .get("/registry", summary)
        .get("/registry/cas", list_cas)
        .post("/registry/cas", add_ca)
        .delete("/registry/cas/{name}", remove_ca)
        .get("/devices", list)
        .post("/devices", add)
        .get("/devices/{id}", show)
        .delete("/devices/{id}", remove)
        .post("/devices/{id}/parent", set_parent)
        .post("/devices/{id}/labels", set_labels)
        .post("/devices/{id}/rotate-key", rotate_key)
        .post("/devices/{id}/disable", disable)
        .post("/devices/{id}/enable", enable)
}

/// Runs a registry change off the reactor (it syncs to disk).
async fn blocking<T: Send + 'static>(
    state: &RegistryApi,
    f: impl FnOnce(&Registry) -> Result<T, RegistryError> + Send + 'static,
) -> Result<T, ApiError> {
    let registry = state.registry.clone();
    let out = tokio::task::spawn_blocking(move || f(&registry))
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, format!("registry task failed: {e}")))??;
    state.metrics.set_identities(state.registry.len());
    Ok(out)
}

async fn summary(State(state): State<RegistryApi>) -> Json<Value> {
    Json(state.registry.summary())
}

async fn list(State(state): State<RegistryApi>, Query(q): Query<HashMap<String, String>>) -> Json<Value> {
    let items: Vec<Value> = state
        .registry
        .list()
        .iter()
        .filter(|e| q.get("parent").is_none_or(|p| e.parent.as_deref() == Some(p.as_str())))
        .map(|e| e.to_json(false))
        .filter(|v| q.get("kind").is_none_or(|k| v["kind"] == *k))
        .collect();
    Json(json!({ "identities": items }))
}

async fn show(
    State(state): State<RegistryApi>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let entry = state.registry.entry(&id).ok_or(RegistryError::NotFound(id))?;
    let keys = q.get("keys").is_some_and(|v| v == "true" || v == "1");
    Ok(Json(entry.to_json(keys)))
}

async fn add(State(state): State<RegistryApi>, body: axum::body::Bytes) -> Result<(StatusCode, Json<Value>), ApiError> {
    let new: NewIdentity = serde_json::from_slice(&body).map_err(bad_json)?;
    let entry = blocking(&state, move |r| r.add(new)).await?;
    tracing::info!(id = %entry.id, kind = ?entry.kind, parent = ?entry.parent, "registry: identity added");
    Ok((StatusCode::CREATED, Json(entry.to_json(true))))
}

async fn remove(State(state): State<RegistryApi>, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    let removed = blocking(&state, move |r| r.remove(&id)).await?;
    tracing::info!(ids = ?removed, "registry: identities removed");
    Ok(Json(json!({ "removed": removed })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ParentBody {
    parent: Option<String>,
}

async fn set_parent(
    State(state): State<RegistryApi>,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<Value>, ApiError> {
    let b: ParentBody = serde_json::from_slice(&body).map_err(bad_json)?;
    let entry = blocking(&state, move |r| r.set_parent(&id, b.parent)).await?;
    tracing::info!(id = %entry.id, parent = ?entry.parent, "registry: parent changed");
    Ok(Json(entry.to_json(false)))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RotateBody {
    #[serde(default = "both")]
    which: WhichKey,
}

fn both() -> WhichKey {
    WhichKey::Both
}

async fn rotate_key(
    State(state): State<RegistryApi>,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<Value>, ApiError> {
    let b: RotateBody = if body.is_empty() {
        RotateBody { which: WhichKey::Both }
    } else {
        serde_json::from_slice(&body).map_err(bad_json)?
    };
    let entry = blocking(&state, move |r| r.rotate_key(&id, b.which)).await?;
    tracing::info!(id = %entry.id, which = ?b.which, "registry: key rotated");
    Ok(Json(entry.to_json(true)))
}

async fn disable(State(state): State<RegistryApi>, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    let entry = blocking(&state, move |r| r.set_enabled(&id, false)).await?;
    tracing::info!(id = %entry.id, "registry: identity disabled");
    Ok(Json(entry.to_json(false)))
}

async fn enable(State(state): State<RegistryApi>, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    let entry = blocking(&state, move |r| r.set_enabled(&id, true)).await?;
    tracing::info!(id = %entry.id, "registry: identity enabled");
    Ok(Json(entry.to_json(false)))
}

async fn list_cas(State(state): State<RegistryApi>) -> Json<Value> {
    let cas: Vec<Value> = state
        .registry
        .cas()
        .iter()
        .map(|c| json!({ "name": c.name, "subject": c.subject, "thumbprint": c.thumbprint, "origin": c.origin, "added_ms": c.added_ms }))
        .collect();
    Json(json!({ "cas": cas }))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CaBody {
    name: String,
    pem: String,
}

async fn add_ca(
    State(state): State<RegistryApi>,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let b: CaBody = serde_json::from_slice(&body).map_err(bad_json)?;
    let ca = blocking(&state, move |r| r.add_ca(&b.name, &b.pem)).await?;
    tracing::info!(name = %ca.name, subject = %ca.subject, "registry: CA added");
    Ok((
        StatusCode::CREATED,
        Json(json!({ "name": ca.name, "subject": ca.subject, "thumbprint": ca.thumbprint })),
    ))
}

async fn remove_ca(State(state): State<RegistryApi>, Path(name): Path<String>) -> Result<Json<Value>, ApiError> {
    let n = name.clone();
    blocking(&state, move |r| r.remove_ca(&n)).await?;
    tracing::info!(%name, "registry: CA removed");
    Ok(Json(json!({ "removed": name })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LabelsBody {
    labels: std::collections::BTreeMap<String, String>,
}

async fn set_labels(
    State(state): State<RegistryApi>,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<Value>, ApiError> {
    let b: LabelsBody = serde_json::from_slice(&body).map_err(bad_json)?;
    let entry = blocking(&state, move |r| r.set_labels(&id, b.labels)).await?;
    tracing::info!(id = %entry.id, labels = ?entry.labels, "registry: labels set");
    Ok(Json(entry.to_json(false)))
}
