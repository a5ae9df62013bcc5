//! The service stream of the QUIC link: twins, direct methods and
//! cloud-to-device messages between a parent and a child gateway.
//!
//! The child opens one bidirectional stream after WELCOME and sends SVC
//! frames (JSON bodies, see [`Svc`]) both ways:
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

use bytes::BytesMut;
use serde_json::Value;
use tokio::sync::mpsc;

use super::wire::{self, Frame, close};
pub use holdfast_iothub::service::Svc;
use holdfast_iothub::{Hub, MethodError};
use holdfast_metrics::{EventLabels, Metrics};

/// How long the child waits for an acknowledgement before sending a
/// reported patch again.
const RESEND: Duration = Duration::from_secs(5);

/// Largest service frame accepted (a full twin is at most 64 KiB).
pub const MAX_SVC_FRAME: usize = 1 << 20;

/// A service message as a SVC frame.
fn frame(svc: &Svc) -> Result<BytesMut, String> {
    let body = serde_json::to_vec(svc).map_err(|e| e.to_string())?;
    let mut buf = BytesMut::new();
    Frame::Svc(body.into()).encode(&mut buf).map_err(|e| e.to_string())?;
    Ok(buf)
}

fn count(metrics: &Metrics, reason: &'static str) {
    holdfast_metrics::handle(&metrics.iothub_events, &EventLabels { event: reason }).inc();
}

/// The next SVC message of the stream; `None` when the stream ends.
/// Cancel-safe ([`wire::FramedRecv`]).
async fn read(frames: &mut wire::FramedRecv) -> Result<Option<Svc>, String> {
    match frames.next().await {
        Ok(Some(Frame::Svc(body))) => serde_json::from_slice(&body)
            .map(Some)
            .map_err(|e| format!("undecodable service message: {e}")),
        Ok(Some(other)) => Err(format!("expected a service frame, got {}", other.name())),
        Ok(None) | Err(wire::ReadError::Stream(_)) => Ok(None),
        Err(wire::ReadError::Wire(e)) => Err(e.to_string()),
    }
}

/// Writes queued messages until the queue or the stream ends.
async fn writer(mut send: quinn::SendStream, mut rx: mpsc::UnboundedReceiver<Svc>) {
    while let Some(m) = rx.recv().await {
        let Ok(buf) = frame(&m) else { continue };
        if send.write_all(&buf).await.is_err() {
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

/// The parent's end for child `child`, after the child's hello.
pub async fn parent(
    hub: Arc<Hub>,
    metrics: Arc<Metrics>,
    conn: quinn::Connection,
    child: Arc<str>,
    send: quinn::SendStream,
    mut frames: wire::FramedRecv,
) {
    frames.set_max(MAX_SVC_FRAME);
    let (tx, rx) = mpsc::unbounded_channel();
    // Subscribe before the snapshot so no change falls between them.
    let mut changes = hub.twins.desired_changes();
    send_scope(&hub, &child, &tx);
    hub.add_downlink(&child, tx.clone(), super::wire::is_v2(&conn));
    let write = tokio::spawn(writer(send, rx));
    loop {
        tokio::select! {
            m = read(&mut frames) => match m {
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
                        Ok(Err(holdfast_iothub::twin::TwinError::NotFound(id.clone())))
                    };
                    match stored {
                        Ok(Ok(_)) => count(&metrics, "link-reported"),
                        Ok(Err(e)) => {
                            // Acknowledged anyway: resending cannot make it valid.
                            count(&metrics, "link-reported-refused");
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
                    conn.close(close::PROTOCOL.into(), b"unexpected service message");
                    break;
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(child = %child, error = %e, "link: malformed service frame from a child");
                    conn.close(close::PROTOCOL.into(), b"malformed service frame");
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

/// The child's end: opens the stream, pushes pending reported patches,
/// applies what the parent sends. Returns when the link ends.
pub async fn child(hub: Arc<Hub>, metrics: Arc<Metrics>, conn: quinn::Connection, v2: bool) {
    let Ok((send, recv)) = conn.open_bi().await else {
        return;
    };
    let mut frames = wire::FramedRecv::new(recv, MAX_SVC_FRAME);
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
            m = read(&mut frames) => match m {
                Ok(Some(Svc::Desired { id, version, desired })) => {
                    let twins = hub.twins.clone();
                    match tokio::task::spawn_blocking(move || twins.set_desired(&id, version, desired)).await {
                        Ok(Ok(Some(_))) => count(&metrics, "link-desired"),
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
                        conn.close(close::PROTOCOL.into(), b"malformed message payload");
                        break;
                    };
                    let valid = holdfast_mqtt::topic::valid_name(&topic) && holdfast_iothub::is_inbound(&topic);
                    if !valid {
                        conn.close(close::PROTOCOL.into(), b"bad message topic");
                        break;
                    }
                    let props = holdfast_mqtt::Properties {
                        content_type,
                        user_properties: properties,
                        ..Default::default()
                    };
                    hub.deliver_from_parent(holdfast_broker::session::Msg {
                        topic,
                        payload: payload.into(),
                        qos: holdfast_mqtt::QoS::AtLeastOnce,
                        retain: false,
                        properties: props,
                        expires_at_ms: None,
                        publisher: None,
                    });
                    count(&metrics, "link-c2d");
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
                    count(&metrics, "link-c2d");
                }
                Ok(Some(Svc::C2dFeedbackAck { id, outcome })) => {
                    let hub2 = hub.clone();
                    let _ = tokio::task::spawn_blocking(move || hub2.c2d_up_acked(&id, outcome)).await;
                }
                Ok(Some(other)) => {
                    tracing::warn!(message = ?other, "link: unexpected service message from the parent");
                    conn.close(close::PROTOCOL.into(), b"unexpected service message");
                    break;
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "link: malformed service frame from the parent");
                    conn.close(close::PROTOCOL.into(), b"malformed service frame");
                    break;
                }
            },
        }
    }
    hub.clear_uplink(&tx);
    drop(tx);
    write.abort();
}
