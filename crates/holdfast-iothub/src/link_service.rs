//! The hub's service on the QUIC link (the [`LinkService`] port): twins,
//! direct methods and cloud-to-device messages between a parent and a
//! child gateway. The link opens the stream and frames the messages.
//!
//! The child opens one bidirectional stream after WELCOME and sends SVC
//! frames (JSON bodies, see [`Svc`]) both ways, [`Svc::Hello`] first:
//!
//! - parent → child: the desired properties of every twin in the child's
//!   scope on connect, then each change; calls of direct methods on
//!   identities behind the child; cloud-to-device and module-input
//!   messages for them; acknowledgements of reported patches.
//! - child → parent: each twin's merged pending reported patch, again
//!   until acknowledged; the answers to method calls.
//!
//! A reported patch is acknowledged once the parent has stored it; the
//! child then drops it unless it changed meanwhile, so patches made while
//! the link was down go up once, merged.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use holdfast_model::ports::{BoxFuture, LinkService, ServiceStream, StreamMsg, StreamRecv, StreamSend};
use holdfast_model::{Message, Source};
use serde_json::Value;
use tokio::sync::mpsc;

use crate::service::Svc;
use crate::{Hub, MethodError};

/// How long the child waits for an acknowledgement before sending a
/// reported patch again.
const RESEND: Duration = Duration::from_secs(5);

/// Largest service frame accepted (a full twin is at most 64 KiB).
pub const MAX_SVC_FRAME: usize = 1 << 20;

impl LinkService for Hub {
    fn is_hello(&self, first: &StreamMsg) -> bool {
        matches!(first, StreamMsg::Msg(body) if serde_json::from_slice::<Svc>(body).ok() == Some(Svc::Hello))
    }

    fn max_frame(&self) -> usize {
        MAX_SVC_FRAME
    }

    fn parent_end(self: Arc<Self>, stream: ServiceStream) -> BoxFuture<'static, ()> {
        Box::pin(parent(self, stream))
    }

    fn child_end(self: Arc<Self>, stream: ServiceStream) -> BoxFuture<'static, ()> {
        Box::pin(child(self, stream))
    }
}

/// The next service message of the stream; `None` when the stream ends.
async fn read(recv: &mut dyn StreamRecv) -> Result<Option<Svc>, String> {
    match recv.recv().await? {
        Some(StreamMsg::Msg(body)) => serde_json::from_slice(&body)
            .map(Some)
            .map_err(|e| format!("undecodable service message: {e}")),
        Some(_) => Err("expected a service message".into()),
        None => Ok(None),
    }
}

/// Writes queued messages until the queue or the stream ends.
async fn writer(mut send: Box<dyn StreamSend>, mut rx: mpsc::UnboundedReceiver<Svc>) {
    while let Some(m) = rx.recv().await {
        let Ok(body) = serde_json::to_vec(&m) else { continue };
        if send.send(StreamMsg::Msg(Bytes::from(body))).await.is_err() {
            return;
        }
    }
}

/// Queues the desired properties of every twin in `child`'s scope.
fn send_scope(hub: &Hub, child: &str, tx: &mpsc::UnboundedSender<Svc>) {
    let scope: Vec<String> = hub.registry().scope(child).entries.into_keys().collect();
    for (id, version, desired) in hub.twins.desired_of(scope.iter()) {
        let _ = tx.send(Svc::Desired { id, version, desired });
    }
}

/// The parent's end for the child at the other end, after its hello.
async fn parent(hub: Arc<Hub>, stream: ServiceStream) {
    let ServiceStream { peer, send, mut recv } = stream;
    let child: Arc<str> = Arc::from(peer.peer_id());
    let (tx, rx) = mpsc::unbounded_channel();
    // Subscribe before the snapshot so no change falls between them.
    let mut changes = hub.twins.desired_changes();
    send_scope(&hub, &child, &tx);
    hub.add_downlink(&child, tx.clone(), peer.version() >= 2);
    let write = tokio::spawn(writer(send, rx));
    loop {
        tokio::select! {
            m = read(&mut *recv) => match m {
                Ok(Some(Svc::Reported { id, generation, patch })) => {
                    let in_scope = hub.registry().next_hop(&id) == holdfast_registry::Hop::Child(child.to_string());
                    let (twins, id2) = (hub.twins.clone(), id.clone());
                    let stored = if in_scope {
                        let from = child.clone();
                        tokio::task::spawn_blocking(move || {
                            twins.patch_reported_from(&from, generation, &id2, &Value::Object(patch))
                        })
                        .await
                    } else {
                        Ok(Err(crate::twin::TwinError::NotFound(id.clone())))
                    };
                    match stored {
                        Ok(Ok(_)) => hub.events.count("link-reported"),
                        Ok(Err(e)) => {
                            // Acknowledged anyway: resending cannot make it valid.
                            hub.events.count("link-reported-refused");
                            tracing::warn!(child = %child, twin = %id, error = %e, "link: a child's reported patch was refused");
                        }
                        Err(_) => break,
                    }
                    let _ = tx.send(Svc::ReportedAck { id, generation });
                }
                Ok(Some(Svc::MethodResult { call, result })) => hub.method_answered(&child, call, Ok(result)),
                Ok(Some(Svc::C2dAck { id })) => {
                    let hub = hub.clone();
                    let child = child.clone();
                    // Dequeuing syncs the store.
                    let _ = tokio::task::spawn_blocking(move || hub.c2d_acked(&child, &id)).await;
                }
                Ok(Some(Svc::C2dFeedback { feedback })) => {
                    let hub2 = hub.clone();
                    match tokio::task::spawn_blocking(move || hub2.c2d_feedback_from_child(*feedback)).await {
                        Ok(ack @ Svc::C2dFeedbackAck { .. }) => {
                            let _ = tx.send(ack);
                        }
                        Ok(_) => {}
                        Err(_) => break,
                    }
                }
                Ok(Some(Svc::MethodFailed { call, status, error })) => {
                    let status = if (400..600).contains(&status) { status } else { 502 };
                    hub.method_answered(&child, call, Err(MethodError::Downstream(status, error)));
                }
                Ok(Some(other)) => {
                    tracing::warn!(child = %child, message = ?other, "link: unexpected service message from a child");
                    peer.protocol_error("unexpected service message");
                    break;
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(child = %child, error = %e, "link: malformed service frame from a child");
                    peer.protocol_error("malformed service frame");
                    break;
                }
            },
            c = changes.recv() => match c {
                Ok(change) => {
                    if hub.registry().next_hop(&change.id) == holdfast_registry::Hop::Child(child.to_string()) {
                        let twin = hub.twins.get(&change.id);
                        let _ = tx.send(Svc::Desired { id: change.id, version: twin.desired_version, desired: twin.desired });
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                    // Resend the whole scope; the child applies only what differs.
                    send_scope(&hub, &child, &tx);
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
            },
        }
    }
    hub.remove_downlink(&child, &tx);
    drop(tx);
    write.abort();
}

/// The child's end: says hello, pushes pending reported patches,
/// applies what the parent sends. Returns when the link ends.
async fn child(hub: Arc<Hub>, stream: ServiceStream) {
    let ServiceStream { peer, send, mut recv } = stream;
    let v2 = peer.version() >= 2;
    let (tx, rx) = mpsc::unbounded_channel();
    let _ = tx.send(Svc::Hello);
    if v2 {
        // Feedback waiting to go up goes now, and from now on as it comes.
        hub.set_uplink(tx.clone());
    }
    let write = tokio::spawn(writer(send, rx));
    let mut pending = hub.twins.pending_changes();
    // What went up and is not acknowledged: id → generation.
    let mut sent: HashMap<String, u64> = HashMap::new();
    let mut resend = tokio::time::interval_at(tokio::time::Instant::now() + RESEND, RESEND);
    loop {
        for (id, generation, patch) in hub.twins.pending() {
            if sent.get(&id) != Some(&generation) {
                sent.insert(id.clone(), generation);
                let _ = tx.send(Svc::Reported { id, generation, patch });
            }
        }
        tokio::select! {
            _ = pending.changed() => {}
            // A parent that refused to store (full disk) gets the patch again.
            _ = resend.tick() => sent.clear(),
            m = read(&mut *recv) => match m {
                Ok(Some(Svc::Desired { id, version, desired })) => {
                    let twins = hub.twins.clone();
                    match tokio::task::spawn_blocking(move || twins.set_desired(&id, version, desired)).await {
                        Ok(Ok(Some(_))) => hub.events.count("link-desired"),
                        Ok(Ok(None)) => {}
                        Ok(Err(e)) => tracing::error!(error = %e, "link: cannot store desired properties"),
                        Err(_) => break,
                    }
                }
                Ok(Some(Svc::ReportedAck { id, generation })) => {
                    let twins = hub.twins.clone();
                    let id2 = id.clone();
                    if let Ok(Err(e)) = tokio::task::spawn_blocking(move || twins.acknowledge(&id2, generation)).await {
                        tracing::error!(error = %e, "link: cannot store a reported acknowledgement");
                    }
                    if sent.get(&id) == Some(&generation) {
                        sent.remove(&id);
                    }
                }
                Ok(Some(Svc::Method { call, target, name, payload, timeout_ms })) => {
                    let (hub, tx) = (hub.clone(), tx.clone());
                    tokio::spawn(async move {
                        let answer = match hub.invoke(&target, &name, payload, Duration::from_millis(timeout_ms)).await {
                            Ok(result) => Svc::MethodResult { call, result },
                            Err(e) => Svc::MethodFailed { call, status: e.status(), error: e.to_string() },
                        };
                        let _ = tx.send(answer);
                    });
                }
                Ok(Some(Svc::Message { topic, payload, content_type, properties })) => {
                    use base64::Engine as _;
                    let Ok(payload) = base64::engine::general_purpose::STANDARD.decode(payload) else {
                        peer.protocol_error("malformed message payload");
                        break;
                    };
                    let valid = holdfast_mqtt::topic::valid_name(&topic) && crate::is_inbound(&topic);
                    if !valid {
                        peer.protocol_error("bad message topic");
                        break;
                    }
                    hub.deliver_from_parent(Message {
                        topic,
                        payload: payload.into(),
                        qos: 1,
                        retain: false,
                        content_type,
                        properties,
                        source: Source::default(),
                        origin: None,
                        delivered_locally: false,
                    });
                    hub.events.count("link-c2d");
                }
                Ok(Some(Svc::C2d { message })) => {
                    let hub2 = hub.clone();
                    match tokio::task::spawn_blocking(move || hub2.c2d_from_parent(*message)).await {
                        Ok(ack @ Svc::C2dAck { .. }) => {
                            let _ = tx.send(ack);
                        }
                        Ok(_) => {}
                        Err(_) => break,
                    }
                    hub.events.count("link-c2d");
                }
                Ok(Some(Svc::C2dFeedbackAck { id, outcome })) => {
                    let hub2 = hub.clone();
                    let _ = tokio::task::spawn_blocking(move || hub2.c2d_up_acked(&id, outcome)).await;
                }
                Ok(Some(other)) => {
                    tracing::warn!(message = ?other, "link: unexpected service message from the parent");
                    peer.protocol_error("unexpected service message");
                    break;
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "link: malformed service frame from the parent");
                    peer.protocol_error("malformed service frame");
                    break;
                }
            },
        }
    }
    hub.clear_uplink(&tx);
    drop(tx);
    write.abort();
}
