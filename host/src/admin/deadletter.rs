//! Admin API routes of the dead-letter store: what the node could not route
//! or deliver, kept with why, where and when.
//!
//! | method | path | what |
//! |---|---|---|
//! | GET | `/api/v1/dead-letter` | figures and entries, oldest first (`?after=<id>`, `?limit=`, default 100) |
//! | DELETE | `/api/v1/dead-letter` | purge every entry |
//! | GET | `/api/v1/dead-letter/{id}` | one entry with its payload and properties |
//! | DELETE | `/api/v1/dead-letter/{id}` | purge one entry |
//! | POST | `/api/v1/dead-letter/{id}/replay` | replay it: `{}` to where it was going, `{"to_topic": "t"}` published on `t` |
//! | POST | `/api/v1/dead-letter/replay` | replay every entry (as above) |
//!
//! Replaying to where it was going re-enqueues an entry that came from an
//! outbox lane (expired, refused upstream, dropped by the quota) to that
//! lane, with a fresh time-to-live; one the router failed on is routed
//! again as if it had just been published. With `to_topic`, it is routed
//! as if published on that topic. A replayed entry leaves the store once
//! it is stored or routed again (it may come back as a new entry, if the
//! router fails on it again).

use std::collections::HashMap;
use std::sync::Arc;

use axum::Json;
use axum::extract::{FromRef, Path, Query, State};
use axum::http::StatusCode;
use base64::Engine;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{ApiError, Routes, bad_json, limit_param};
use crate::state::NodeState;
use holdfast_broker::Broker;
use holdfast_outbox::Outbox;
use holdfast_outbox::dead_letter::{DeadLetterError, DeadLetters, Entry};

/// What the dead-letter routes use of the node.
#[derive(Clone)]
pub(crate) struct DeadLetterApi {
    outbox: Arc<Outbox>,
    broker: Option<Arc<Broker>>,
}

impl FromRef<Arc<NodeState>> for DeadLetterApi {
    fn from_ref(node: &Arc<NodeState>) -> Self {
        DeadLetterApi {
            outbox: node.outbox.clone(),
            broker: node.broker.clone(),
        }
    }
}

/// The dead-letter routes, to be nested under `/api/v1`.
pub fn routes() -> Routes {
    Routes::default()
        .get("/dead-letter", list)
        .delete("/dead-letter", purge_all)
        .post("/dead-letter/replay", replay_all)
        .get("/dead-letter/{id}", show)
        .delete("/dead-letter/{id}", purge)
        .post("/dead-letter/{id}/replay", replay)
}

impl From<DeadLetterError> for ApiError {
    fn from(e: DeadLetterError) -> Self {
        ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
    }
}

fn internal(e: impl std::fmt::Display) -> ApiError {
    ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
}

impl DeadLetterApi {
    fn store(&self) -> Result<Arc<DeadLetters>, ApiError> {
        self.outbox
            .dead_letters()
            .cloned()
            .ok_or_else(|| ApiError(StatusCode::CONFLICT, "this node has no dead-letter store".into()))
    }

    /// Runs a store operation off the reactor (reads and syncs).
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&DeadLetters) -> Result<T, ApiError> + Send + 'static,
    ) -> Result<T, ApiError> {
        let store = self.store()?;
        tokio::task::spawn_blocking(move || f(&store))
            .await
            .map_err(|e| internal(format!("dead-letter task failed: {e}")))?
    }
}

fn parse_id(id: &str) -> Result<u64, ApiError> {
    id.parse().map_err(|_| {
        ApiError(
            StatusCode::BAD_REQUEST,
            format!("a dead-letter id is a number, not {id:?}"),
        )
    })
}

fn not_found(id: u64) -> ApiError {
    ApiError(StatusCode::NOT_FOUND, format!("no dead letter {id}"))
}

async fn list(
    State(state): State<DeadLetterApi>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let limit = limit_param(&q, 100, 10_000)?;
    let after = match q.get("after") {
        Some(a) => Some(parse_id(a)?),
        None => None,
    };
    state
        .blocking(move |d| {
            let entries = d.list(after, limit).map_err(internal)?;
            let s = d.stats();
            Ok(Json(json!({
                "messages": s.messages,
                "bytes": s.bytes,
                "max_messages": s.max_messages,
                "max_bytes": s.max_bytes,
                "entries": entries,
            })))
        })
        .await
}

/// An entry as `show` answers it.
fn entry_json(e: &Entry) -> Value {
    let r = &e.letter.record;
    let m = &r.message;
    let mut v = serde_json::to_value(e.summary()).unwrap_or_default();
    let extra = json!({
        "payload": std::str::from_utf8(&m.payload).ok(),
        "payload_base64": base64::engine::general_purpose::STANDARD.encode(&m.payload),
        "content_type": m.content_type,
        "properties": m.properties,
        "qos": m.qos,
        "retain": m.retain,
        "client_id": m.source.client_id,
        "principal": m.source.principal,
        "enqueued_wall_ms": r.enqueued_wall_ms,
        "ttl_ms": r.ttl_ms,
    });
    if let (Some(v), Value::Object(extra)) = (v.as_object_mut(), extra) {
        v.extend(extra);
    }
    v
}

async fn show(State(state): State<DeadLetterApi>, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    let id = parse_id(&id)?;
    let entry = state
        .blocking(move |d| Ok(d.get(id)?))
        .await?
        .ok_or_else(|| not_found(id))?;
    Ok(Json(entry_json(&entry)))
}

async fn purge(State(state): State<DeadLetterApi>, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    let id = parse_id(&id)?;
    let n = state.blocking(move |d| d.purge(&[id]).map_err(internal)).await?;
    if n == 0 {
        return Err(not_found(id));
    }
    tracing::info!(id, "dead-letter: purged");
    Ok(Json(json!({ "purged": n })))
}

async fn purge_all(State(state): State<DeadLetterApi>) -> Result<Json<Value>, ApiError> {
    let n = state.blocking(|d| d.purge_all().map_err(internal)).await?;
    tracing::info!(purged = n, "dead-letter: purged every entry");
    Ok(Json(json!({ "purged": n })))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReplayBody {
    /// Publish it on this topic instead of sending it where it was going.
    to_topic: Option<String>,
}

fn replay_body(body: &[u8]) -> Result<ReplayBody, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(ReplayBody::default());
    }
    let b: ReplayBody = serde_json::from_slice(body).map_err(bad_json)?;
    if let Some(t) = &b.to_topic
        && !holdfast_mqtt::topic::valid_name(t)
    {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!("to_topic {t:?} is not a valid topic name"),
        ));
    }
    Ok(b)
}

async fn replay(
    State(state): State<DeadLetterApi>,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<Value>, ApiError> {
    let id = parse_id(&id)?;
    let body = replay_body(&body)?;
    let entry = state
        .blocking(move |d| Ok(d.get(id)?))
        .await?
        .ok_or_else(|| not_found(id))?;
    let to = replay_entry(&state, &entry, body.to_topic.as_deref()).await?;
    Ok(Json(json!({ "id": id, "replayed_to": to })))
}

async fn replay_all(State(state): State<DeadLetterApi>, body: axum::body::Bytes) -> Result<Json<Value>, ApiError> {
    let body = replay_body(&body)?;
    // The entries there now: what fails again while replaying comes back
    // as a new entry, not replayed in this pass.
    let ids: Vec<u64> = state
        .blocking(|d| d.list(None, usize::MAX).map_err(internal))
        .await?
        .into_iter()
        .map(|s| s.id)
        .collect();
    let (mut replayed, mut failed) = (0u64, Vec::new());
    for id in ids {
        let entry = match state.blocking(move |d| Ok(d.get(id)?)).await {
            Ok(Some(e)) => e,
            Ok(None) => continue,
            Err(e) => {
                failed.push(json!({ "id": id, "error": e.1 }));
                continue;
            }
        };
        match replay_entry(&state, &entry, body.to_topic.as_deref()).await {
            Ok(_) => replayed += 1,
            Err(e) => failed.push(json!({ "id": id, "error": e.1 })),
        }
    }
    Ok(Json(json!({ "replayed": replayed, "failed": failed })))
}

/// Sends `entry` on (see the module doc) and removes it from the store;
/// where it went.
async fn replay_entry(state: &DeadLetterApi, entry: &Entry, to_topic: Option<&str>) -> Result<String, ApiError> {
    let letter = &entry.letter;
    let to = match (to_topic, letter.lane) {
        (None, Some(lane)) => {
            state
                .outbox
                .append(lane, letter.record.message.clone(), None)
                .await
                .map_err(|e| ApiError(StatusCode::SERVICE_UNAVAILABLE, format!("outbox: {e}")))?;
            format!("outbox lane {lane}")
        }
        (topic, _) => {
            let broker = state.broker.as_ref().ok_or_else(|| {
                ApiError(
                    StatusCode::CONFLICT,
                    "the MQTT broker is not running: only entries from an outbox lane can be replayed".into(),
                )
            })?;
            let m = &letter.record.message;
            let mut properties = holdfast_mqtt::Properties::default();
            properties.content_type = m.content_type.clone();
            properties.user_properties = m.properties.clone();
            let topic = topic.unwrap_or(&m.topic).to_string();
            let msg = Arc::new(holdfast_broker::session::Msg {
                topic: topic.clone(),
                payload: m.payload.clone(),
                qos: holdfast_mqtt::QoS::from_u8(m.qos).unwrap_or(holdfast_mqtt::QoS::AtLeastOnce),
                retain: m.retain,
                properties,
                expires_at_ms: None,
                publisher: None,
            });
            let routed = broker.route(&msg, m.source.principal.as_deref());
            if let Some(code) = routed.refusal {
                return Err(ApiError(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("the outbox refused it (reason 0x{code:02x})"),
                ));
            }
            for w in routed.waits {
                match w.await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => return Err(ApiError(StatusCode::SERVICE_UNAVAILABLE, format!("outbox: {e}"))),
                    Err(_) => return Err(ApiError(StatusCode::SERVICE_UNAVAILABLE, "the outbox is closed".into())),
                }
            }
            format!("router, topic {topic}")
        }
    };
    let id = entry.id;
    state.blocking(move |d| d.replayed(id).map_err(internal)).await?;
    tracing::info!(id, to = %to, "dead-letter: replayed");
    Ok(to)
}
