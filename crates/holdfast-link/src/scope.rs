//! Scope sync: a parent sends each connected child gateway every identity
//! whose parent chain includes that child, so the child can authenticate
//! them with no upstream.
//!
//! On every connection the parent opens one unidirectional stream and
//! sends a full sync (in parts of [`PART_ENTRIES`] identities), then an
//! incremental change each time its registry changes in a way that touches
//! the child's scope. A child that applied a full sync replaces what it held
//! from before; identities it seeded from its own config stay. If the
//! child itself stops being a registered child of this node (disabled,
//! removed, moved), the parent closes the link.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};

use super::wire::{self, Frame, close, scope as part};
use holdfast_metrics::{Metrics, ResultLabels};
use holdfast_registry::{Delta, Registry, Scope};

/// Identities per part of a full sync.
pub const PART_ENTRIES: usize = 1000;
/// Changes arriving this close together go out as one.
const COALESCE: Duration = Duration::from_millis(20);

fn count(metrics: &Metrics, result: &'static str) {
    metrics.registry_syncs.get_or_create(&ResultLabels { result }).inc();
}

async fn send_frame(stream: &mut quinn::SendStream, part: u8, body: Vec<u8>) -> Result<(), String> {
    let mut buf = BytesMut::with_capacity(body.len() + 8);
    Frame::Scope {
        part,
        body: Bytes::from(body),
    }
    .encode(&mut buf)
    .map_err(|e| e.to_string())?;
    stream.write_all(&buf).await.map_err(|e| e.to_string())
}

async fn send_full(stream: &mut quinn::SendStream, scope: &Scope) -> Result<(), String> {
    let entries: Vec<_> = scope.entries.values().collect();
    let mut chunks = entries.chunks(PART_ENTRIES).peekable();
    if chunks.peek().is_none() {
        let body = serde_json::to_vec(scope).map_err(|e| e.to_string())?;
        return send_frame(stream, part::FULL_END, body).await;
    }
    while let Some(chunk) = chunks.next() {
        let last = chunks.peek().is_none();
        let piece = Scope {
            entries: chunk.iter().map(|e| (e.id.clone(), (*e).clone())).collect(),
            cas: if last { scope.cas.clone() } else { Default::default() },
        };
        let body = serde_json::to_vec(&piece).map_err(|e| e.to_string())?;
        send_frame(stream, if last { part::FULL_END } else { part::FULL_PART }, body).await?;
    }
    Ok(())
}

/// Parent side: sends `child` its scope over `conn` until the connection
/// ends. Closes the connection when `child` is no longer a child here.
pub async fn serve(
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    conn: quinn::Connection,
    child: Arc<str>,
    me: String,
) {
    let mut changes = registry.changes();
    changes.borrow_and_update();
    let mut stream = match conn.open_uni().await {
        Ok(s) => s,
        Err(_) => return,
    };
    let mut sent = registry.scope(&child);
    if let Err(e) = send_full(&mut stream, &sent).await {
        tracing::debug!(child = %child, error = %e, "scope sync: the stream failed");
        return;
    }
    count(&metrics, "sent-full");
    tracing::info!(child = %child, identities = sent.entries.len(), "scope sync: full sync sent");
    loop {
        tokio::select! {
            r = changes.changed() => if r.is_err() { return },
            _ = conn.closed() => return,
        }
        tokio::time::sleep(COALESCE).await;
        changes.borrow_and_update();
        if !holdfast_registry::is_child_gateway(&*registry, &child, &me) {
            tracing::warn!(child = %child, "link: the child gateway was disabled, removed or moved; closing its link");
            metrics
                .link_refused
                .get_or_create(&holdfast_metrics::ReasonLabels { reason: "revoked" })
                .inc();
            conn.close(close::REFUSED.into(), b"no longer a registered child of this node");
            return;
        }
        let now = registry.scope(&child);
        let Some(delta) = now.delta_from(&sent) else {
            continue;
        };
        let body = match serde_json::to_vec(&delta) {
            Ok(b) => b,
            Err(_) => return,
        };
        if send_frame(&mut stream, part::DELTA, body).await.is_err() {
            return;
        }
        count(&metrics, "sent-delta");
        tracing::debug!(child = %child, upserts = delta.upserts.len(), removed = delta.removed.len(), "scope sync: change sent");
        sent = now;
    }
}

/// Child side: applies what the parent sends until the connection ends.
pub async fn receive(
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    conn: quinn::Connection,
    parent: String,
    max_frame: usize,
) {
    let mut stream = match conn.accept_uni().await {
        Ok(s) => wire::FramedRecv::new(s, max_frame),
        Err(_) => return,
    };
    let mut pending = Scope::default();
    loop {
        let frame = match stream.next().await {
            Ok(Some(f)) => f,
            Ok(None) | Err(wire::ReadError::Stream(_)) => return,
            Err(wire::ReadError::Wire(e)) => {
                count(&metrics, "failed");
                tracing::warn!(error = %e, "scope sync: malformed frame from the parent");
                conn.close(close::PROTOCOL.into(), b"malformed scope frame");
                return;
            }
        };
        let Frame::Scope { part: p, body } = frame else {
            count(&metrics, "failed");
            conn.close(close::PROTOCOL.into(), b"expected a scope frame");
            return;
        };
        let result = match p {
            part::FULL_PART | part::FULL_END => match serde_json::from_slice::<Scope>(&body) {
                Ok(piece) => {
                    pending.entries.extend(piece.entries);
                    pending.cas.extend(piece.cas);
                    if p == part::FULL_PART {
                        continue;
                    }
                    let full = std::mem::take(&mut pending);
                    let n = full.entries.len();
                    let (r, parent) = (registry.clone(), parent.clone());
                    let applied = tokio::task::spawn_blocking(move || r.apply_full(&parent, full)).await;
                    if let Ok(Ok(changed)) = &applied {
                        tracing::info!(identities = n, changed, "scope sync: full sync applied");
                    }
                    applied.map(|r| r.map(|_| "full"))
                }
                Err(e) => Ok(Err(holdfast_registry::RegistryError::Invalid(e.to_string()))),
            },
            _ => match serde_json::from_slice::<Delta>(&body) {
                Ok(delta) => {
                    let (r, parent) = (registry.clone(), parent.clone());
                    tokio::task::spawn_blocking(move || r.apply_delta(&parent, delta))
                        .await
                        .map(|r| r.map(|_| "delta"))
                }
                Err(e) => Ok(Err(holdfast_registry::RegistryError::Invalid(e.to_string()))),
            },
        };
        match result {
            Ok(Ok(kind)) => {
                count(&metrics, kind);
                metrics.registry_identities.set(registry.len() as i64);
            }
            Ok(Err(e)) => {
                count(&metrics, "failed");
                tracing::error!(error = %e, "scope sync: cannot apply what the parent sent");
                // Reconnecting brings a fresh full sync.
                conn.close(close::PROTOCOL.into(), b"cannot apply scope");
                return;
            }
            Err(_) => return,
        }
    }
}
