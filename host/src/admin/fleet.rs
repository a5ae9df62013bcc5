//! Admin API routes of the fleet view: every node of this node's subtree as
//! it last reported (see `crate::fleet`).
//!
//! | method | path | what |
//! |---|---|---|
//! | GET | `/api/v1/fleet?state=S,…&label=K=V&subtree=ID&q=TEXT` | the nodes in tree order, with a count per state |
//! | DELETE | `/api/v1/fleet/{node}` | forget a node that stopped reporting (decommissioned or moved) |

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use serde_json::{Value, json};
use std::collections::HashMap;

use super::{ApiError, Routes};
use crate::fleet::{Filter, FleetSources};

/// States a filter may name.
const STATES: &[&str] = &["ok", "warning", "stuck", "offline", "not-reporting", "unknown"];

/// The fleet routes, to be nested under `/api/v1`.
pub fn routes() -> Routes {
    Routes::default().get("/fleet", list).delete("/fleet/{node}", forget)
}

/// The filter of a query: `state` (comma-separated, repeatable), `label`
/// (`key=value`, comma-separated), `subtree`, `q`.
fn filter(q: &HashMap<String, String>) -> Result<Filter, ApiError> {
    let bad = |m: String| ApiError(StatusCode::BAD_REQUEST, m);
    let mut f = Filter::default();
    for s in q
        .get("state")
        .into_iter()
        .flat_map(|v| v.split(','))
        .filter(|s| !s.is_empty())
    {
        if !STATES.contains(&s) {
            return Err(bad(format!("state {s:?}: expected one of {}", STATES.join(", "))));
        }
        f.states.insert(s.to_string());
    }
    for l in q
        .get("label")
        .into_iter()
        .flat_map(|v| v.split(','))
        .filter(|s| !s.is_empty())
    {
        let Some((k, v)) = l.split_once('=') else {
            return Err(bad(format!("label {l:?}: expected key=value")));
        };
        f.labels.insert(k.to_string(), v.to_string());
    }
    f.subtree = q.get("subtree").filter(|s| !s.is_empty()).cloned();
    f.search = q.get("q").filter(|s| !s.is_empty()).cloned();
    Ok(f)
}

async fn list(
    State(node): State<FleetSources>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let f = filter(&q)?;
    if let Some(s) = &f.subtree
        && !node.fleet().rows().iter().any(|(r, _)| &r.entry.node == s)
        && s != node.node_id()
    {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("no node {s:?} in this node's fleet view"),
        ));
    }
    tokio::task::spawn_blocking(move || Json(crate::fleet::view(&node, &f)))
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, format!("fleet task failed: {e}")))
}

async fn forget(State(node): State<FleetSources>, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    node.fleet().forget(&id)?;
    tracing::info!(node = %id, "fleet: a node that stopped reporting was forgotten");
    Ok(Json(json!({ "forgotten": id })))
}
