//! Admin API routes of the range cache.
//!
//! | method | path | what |
//! |---|---|---|
//! | GET | `/api/v1/cache` | totals: objects, stored bytes, budget, free space, fills in flight, parent |
//! | GET | `/api/v1/cache/objects?limit=N` | stored objects, largest first (default 100) |
//! | POST | `/api/v1/cache/purge` | `{"key": "…"}`, `{"prefix": "…"}` or `{"all": true}` → `{"objects", "bytes"}` |

use std::collections::HashMap;
use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{FromRef, Query, State};
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{ApiError, Routes, bad_json, limit_param};
use crate::state::NodeState;
use holdfast_cache::Cache;

/// What the range cache's routes use of the node.
#[derive(Clone)]
pub(crate) struct CacheApi {
    /// `None`: the cache is disabled.
    cache: Option<Arc<Cache>>,
}

impl FromRef<Arc<NodeState>> for CacheApi {
    fn from_ref(node: &Arc<NodeState>) -> Self {
        CacheApi {
            cache: node.cache.clone(),
        }
    }
}

pub fn routes() -> Routes {
    Routes::default()
        .get("/cache", stats)
        .get("/cache/objects", objects)
        .post("/cache/purge", purge)
}

fn cache(state: &CacheApi) -> Result<&Arc<Cache>, ApiError> {
    state.cache.as_ref().ok_or_else(|| {
        ApiError(
            StatusCode::NOT_FOUND,
            "the range cache is disabled (cache.enabled)".into(),
        )
    })
}

async fn stats(State(state): State<CacheApi>) -> Result<Json<Value>, ApiError> {
    Ok(Json(json!(cache(&state)?.stats())))
}

async fn objects(
    State(state): State<CacheApi>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let limit = limit_param(&q, 100, 10_000)?;
    Ok(Json(json!({ "objects": cache(&state)?.objects(limit) })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PurgeRequest {
    key: Option<String>,
    prefix: Option<String>,
    #[serde(default)]
    all: bool,
}

async fn purge(State(state): State<CacheApi>, body: Bytes) -> Result<Json<Value>, ApiError> {
    let cache = cache(&state)?;
    let req: PurgeRequest = serde_json::from_slice(&body).map_err(bad_json)?;
    let chosen = usize::from(req.key.is_some()) + usize::from(req.prefix.is_some()) + usize::from(req.all);
    if chosen != 1 {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "give exactly one of key, prefix or all".into(),
        ));
    }
    let (objects, bytes) = cache.purge(req.key.as_deref(), req.prefix.as_deref());
    Ok(Json(json!({ "objects": objects, "bytes": bytes })))
}
