//! Admin API routes of twins, direct methods and cloud-to-device messages.
//!
//! | method | path | what |
//! |---|---|---|
//! | GET | `/api/v1/twins/{id}` | the twin: desired and reported with their versions, a pending upstream patch |
//! | PATCH, POST | `/api/v1/twins/{id}/desired` | merge a JSON patch into the desired properties (the registry's owner only) |
//! | POST | `/api/v1/devices/{id}/methods/{name}` | `{"payload": any JSON, "timeout_s": 30}` → `{"status", "payload"}`; 404 not online, 504 no answer |
//! | POST | `/api/v1/devices/{id}/messages` | cloud-to-device: `{"payload": "text", "properties": {"k": "v"}, "content_type": "…", "ttl_seconds": 3600}` |
//! | GET | `/api/v1/c2d?limit=N` | cloud-to-device queues here and the feedback of messages sent here |
//!
//! A module's id contains `/`: send it URL-encoded (`dev1%2Fmod1`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::{FromRef, Path, State};
use axum::http::StatusCode;
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{ApiError, Routes, bad_json};
use crate::state::NodeState;
use holdfast_iothub::Hub;
use holdfast_iothub::twin::TwinError;
use holdfast_iothub::{DEFAULT_METHOD_TIMEOUT, MethodError};
use holdfast_registry::Registry;

/// An error that knows its HTTP status.
fn with_status(status: u16, e: &impl std::fmt::Display) -> ApiError {
    ApiError(
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        e.to_string(),
    )
}

impl From<TwinError> for ApiError {
    fn from(e: TwinError) -> Self {
        with_status(e.status(), &e)
    }
}

impl From<MethodError> for ApiError {
    fn from(e: MethodError) -> Self {
        with_status(e.status(), &e)
    }
}

/// What the twin, method and message routes use of the node.
#[derive(Clone)]
pub(crate) struct HubApi {
    registry: Arc<Registry>,
    hub: Arc<Hub>,
    /// Whether the MQTT broker runs (cloud-to-device messages need it).
    broker: bool,
}

impl FromRef<Arc<NodeState>> for HubApi {
    fn from_ref(node: &Arc<NodeState>) -> Self {
        HubApi {
            registry: node.registry.clone(),
            hub: node.hub.clone(),
            broker: node.broker.is_some(),
        }
    }
}

/// The routes, to be nested under `/api/v1`.
pub fn routes() -> Routes {
    Routes::default()
        .get("/twins/{id}", show_twin)
        .post("/twins/{id}/desired", patch_desired)
        .patch("/twins/{id}/desired", patch_desired)
        .post("/devices/{id}/methods/{name}", invoke)
        .post("/devices/{id}/messages", send_message)
        .get("/c2d", c2d_status)
}

fn known(state: &HubApi, id: &str) -> Result<(), ApiError> {
    use holdfast_model::identity::IdentityDirectory as _;
    match state.registry.lookup(id) {
        Some(_) => Ok(()),
        None => Err(TwinError::NotFound(id.to_string()).into()),
    }
}

async fn show_twin(State(state): State<HubApi>, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    known(&state, &id)?;
    let t = state.hub.twins.get(&id);
    Ok(Json(json!({
        "id": id,
        "desired": t.desired,
        "desired_version": t.desired_version,
        "reported": t.reported,
        "reported_version": t.reported_version,
        "pending_upstream": t.pending,
        "desired_owner": if state.hub.twins.is_replica() { "parent" } else { "this node" },
    })))
}

async fn patch_desired(
    State(state): State<HubApi>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    known(&state, &id)?;
    let patch: Value = serde_json::from_slice(&body).map_err(bad_json)?;
    let twins = state.hub.twins.clone();
    let id2 = id.clone();
    let version = tokio::task::spawn_blocking(move || twins.patch_desired(&id2, &patch))
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, format!("twin task failed: {e}")))??;
    Ok(Json(json!({ "id": id, "desired_version": version })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct InvokeBody {
    #[serde(default)]
    payload: Value,
    timeout_s: Option<u64>,
}

async fn invoke(
    State(state): State<HubApi>,
    Path((id, name)): Path<(String, String)>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let req: InvokeBody = if body.is_empty() {
        InvokeBody {
            payload: Value::Null,
            timeout_s: None,
        }
    } else {
        serde_json::from_slice(&body).map_err(bad_json)?
    };
    let timeout = req.timeout_s.map_or(DEFAULT_METHOD_TIMEOUT, Duration::from_secs);
    let result = state.hub.invoke(&id, &name, req.payload, timeout).await?;
    Ok(Json(json!({ "status": result.status, "payload": result.payload })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MessageBody {
    payload: String,
    #[serde(default)]
    properties: BTreeMap<String, String>,
    content_type: Option<String>,
    /// Time-to-live, seconds (default `iothub.c2d_default_ttl_seconds`).
    ttl_seconds: Option<u64>,
}

async fn send_message(
    State(state): State<HubApi>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    known(&state, &id)?;
    if id.contains('/') {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "cloud-to-device messages go to devices; route module inputs with the router".into(),
        ));
    }
    let req: MessageBody = serde_json::from_slice(&body).map_err(bad_json)?;
    if !state.broker {
        return Err(ApiError(StatusCode::CONFLICT, "the MQTT broker is disabled".into()));
    }
    let ttl = match req.ttl_seconds {
        Some(0) => {
            return Err(ApiError(
                StatusCode::BAD_REQUEST,
                "ttl_seconds must be at least 1".into(),
            ));
        }
        Some(t) if t > holdfast_iothub::config::MAX_C2D_TTL_SECONDS => {
            return Err(ApiError(
                StatusCode::BAD_REQUEST,
                format!(
                    "ttl_seconds may be at most {}",
                    holdfast_iothub::config::MAX_C2D_TTL_SECONDS
                ),
            ));
        }
        t => t.map(Duration::from_secs),
    };
    let mut properties = holdfast_mqtt::Properties::default();
    properties.user_properties = req.properties.into_iter().collect();
    properties.content_type = req.content_type;
    let topic = holdfast_iothub::with_bag(format!("devices/{id}/messages/devicebound/"), &properties);
    let msg = holdfast_broker::session::Msg {
        topic: topic.clone(),
        payload: Bytes::from(req.payload.into_bytes()),
        qos: holdfast_mqtt::QoS::AtLeastOnce,
        retain: false,
        properties,
        expires_at_ms: None,
        publisher: None,
    };
    let m = state.hub.c2d_message(&id, &msg, ttl);
    let message_id = m.id.clone();
    let hub = state.hub.clone();
    // Queuing syncs the store.
    let sent = tokio::task::spawn_blocking(move || hub.c2d_send(m))
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    match sent {
        Ok(delivered) => Ok((
            StatusCode::ACCEPTED,
            Json(json!({
                "id": message_id,
                "topic": topic,
                "state": if delivered { "delivered" } else { "queued" },
            })),
        )),
        Err(e @ holdfast_iothub::C2dError::NotFound(_)) => Err(ApiError(StatusCode::NOT_FOUND, e.to_string())),
        Err(e @ holdfast_iothub::C2dError::Full(_)) => Err(ApiError(StatusCode::FORBIDDEN, e.to_string())),
        Err(e) => Err(ApiError(StatusCode::SERVICE_UNAVAILABLE, e.to_string())),
    }
}

#[derive(Debug, Deserialize)]
struct Limit {
    limit: Option<usize>,
}

/// Cloud-to-device queues here, and the feedback of messages sent here.
async fn c2d_status(
    State(state): State<HubApi>,
    axum::extract::Query(q): axum::extract::Query<Limit>,
) -> Result<Json<Value>, ApiError> {
    let c2d = state.hub.c2d().clone();
    let limit = q.limit.unwrap_or(100).min(holdfast_iothub::c2d::MAX_FEEDBACK);
    let feedback = tokio::task::spawn_blocking(move || {
        let queues: Vec<Value> = c2d
            .queues()
            .into_iter()
            .map(|(device, n)| json!({ "device": device, "messages": n }))
            .collect();
        c2d.recorded(limit).map(|f| (queues, f))
    })
    .await
    .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let (queues, feedback) = feedback.map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    Ok(Json(json!({ "queues": queues, "feedback": feedback })))
}
