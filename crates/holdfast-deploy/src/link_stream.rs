//! The deployer's service on the QUIC link (`holdfast-link/3`, the
//! [`LinkService`] port): fleet deployments go down, node reports go up,
//! and each component crosses each link once (see [`crate::proto`]). The
//! link opens the stream and frames the messages (DEPLOY) and the
//! component bytes (BLOB).
//!
//! The parent offers the signed deployments that concern the child's
//! subtree, again at every change. The child verifies them, keeps them,
//! and asks for the components it lacks, one at a time; the parent sends
//! them from its own store (it fetched them from its parent before it
//! offered the deployment), checked against their hash when read. The
//! child checks the hash again before it stores them.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use holdfast_model::ports::{BoxFuture, LinkService, ServiceStream, StreamMsg, StreamRecv, StreamSend};
use tokio::sync::mpsc;

use crate::Deployer;
use crate::proto::{self, CHUNK, FEATURES, MAX_FRAME, Msg};

/// How long a child waits before asking again for a component the parent
/// did not have.
const RETRY: Duration = Duration::from_secs(2);

/// Largest frame of the deploy stream.
const MAX_DEPLOY_FRAME: usize = if MAX_FRAME > CHUNK + 16 { MAX_FRAME } else { CHUNK + 16 };

impl LinkService for Deployer {
    fn is_hello(&self, first: &StreamMsg) -> bool {
        matches!(first, StreamMsg::Msg(body) if serde_json::from_slice::<Msg>(body).ok() == Some(Msg::Hello))
    }

    fn max_frame(&self) -> usize {
        MAX_DEPLOY_FRAME
    }

    fn parent_end(self: Arc<Self>, stream: ServiceStream) -> BoxFuture<'static, ()> {
        Box::pin(parent(self, stream))
    }

    fn child_end(self: Arc<Self>, stream: ServiceStream) -> BoxFuture<'static, ()> {
        Box::pin(child(self, stream))
    }
}

fn msg(m: &Msg) -> Option<StreamMsg> {
    Some(StreamMsg::Msg(serde_json::to_vec(m).ok()?.into()))
}

/// The next message of the stream; `None` when it ends.
async fn read(recv: &mut dyn StreamRecv) -> Result<Option<StreamMsg>, String> {
    recv.recv().await
}

async fn writer(mut send: Box<dyn StreamSend>, mut rx: mpsc::Receiver<StreamMsg>) {
    while let Some(m) = rx.recv().await {
        if send.send(m).await.is_err() {
            return;
        }
    }
}

/// The parent's end for the child at the other end, after its hello.
async fn parent(deployer: Arc<Deployer>, stream: ServiceStream) {
    let ServiceStream { peer, send, mut recv } = stream;
    let child: Arc<str> = Arc::from(peer.peer_id());
    let (tx, rx) = mpsc::channel::<StreamMsg>(8);
    let write = tokio::spawn(writer(send, rx));
    let mut changes = deployer.doc_changes();
    let mut last_offer: Option<(Vec<String>, Vec<crate::model::Signed>)> = None;
    let fleet = deployer.fleet().clone();
    let fleet_stream = fleet.attach(&child);
    // However the stream ends (the link may drop this future), what came
    // through it stops reporting.
    let _attached = Attached {
        fleet: fleet.clone(),
        child: child.clone(),
        stream: fleet_stream,
    };
    loop {
        let offer = deployer.offer_for(&child);
        if last_offer.as_ref() != Some(&offer) {
            let m = Msg::Offer {
                ancestors: offer.0.clone(),
                deployments: offer.1.clone(),
                features: FEATURES.iter().map(|f| f.to_string()).collect(),
            };
            let Some(b) = msg(&m) else { break };
            if tx.send(b).await.is_err() {
                break;
            }
            tracing::debug!(child = %child, deployments = offer.1.len(), "deploy: offer sent");
            last_offer = Some(offer);
        }
        tokio::select! {
            r = changes.changed() => if r.is_err() { break },
            f = read(&mut *recv) => match f {
                Ok(Some(StreamMsg::Msg(body))) => match serde_json::from_slice::<Msg>(&body) {
                    Ok(Msg::Fetch { sha256 }) => {
                        let (d, c) = (deployer.clone(), child.clone());
                        let sha = sha256.clone();
                        let bytes = tokio::task::spawn_blocking(move || d.component_for(&c, &sha)).await;
                        match bytes {
                            Ok(Ok(bytes)) => {
                                let head = Msg::Component { sha256: sha256.clone(), size: bytes.len() as u64 };
                                let Some(h) = msg(&head) else { break };
                                if tx.send(h).await.is_err() {
                                    break;
                                }
                                let mut ok = true;
                                for chunk in bytes.chunks(CHUNK) {
                                    if tx.send(StreamMsg::Blob(Bytes::copy_from_slice(chunk))).await.is_err() {
                                        ok = false;
                                        break;
                                    }
                                }
                                if !ok {
                                    break;
                                }
                                deployer.events.component_bytes("sent", bytes.len() as u64);
                                tracing::info!(child = %child, sha256 = %sha256, bytes = bytes.len(), "deploy: component sent");
                            }
                            Ok(Err(e)) => {
                                tracing::warn!(child = %child, sha256 = %sha256, error = %e, "deploy: a child asked for a component this node cannot send");
                                let Some(b) = msg(&Msg::Missing { sha256 }) else { break };
                                if tx.send(b).await.is_err() {
                                    break;
                                }
                            }
                            Err(_) => break,
                        }
                    }
                    Ok(Msg::Reports { reports }) => {
                        let (d, c) = (deployer.clone(), child.clone());
                        if tokio::task::spawn_blocking(move || d.receive_reports(&c, reports)).await.is_err() {
                            break;
                        }
                    }
                    Ok(Msg::Fleet { rows, forgotten }) => {
                        let (f, c) = (fleet.clone(), child.clone());
                        let n = rows.len();
                        if tokio::task::spawn_blocking(move || f.receive(&c, fleet_stream, rows, forgotten)).await.is_err() {
                            break;
                        }
                        tracing::debug!(child = %child, rows = n, "fleet: rows received");
                    }
                    Ok(other) => {
                        tracing::warn!(child = %child, message = ?other, "link: unexpected deploy message from a child");
                        peer.protocol_error("unexpected deploy message");
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(child = %child, error = %e, "link: undecodable deploy message from a child");
                        peer.protocol_error("malformed deploy message");
                        break;
                    }
                },
                Ok(Some(_)) => {
                    peer.protocol_error("a child sends no component bytes");
                    break;
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(child = %child, error = %e, "link: malformed deploy frame from a child");
                    peer.protocol_error("malformed deploy frame");
                    break;
                }
            },
        }
    }
    drop(tx);
    write.abort();
}

/// A child's stream as the fleet view knows it; detached when dropped.
struct Attached {
    fleet: Arc<crate::fleet::Fleet>,
    child: Arc<str>,
    stream: u64,
}

impl Drop for Attached {
    fn drop(&mut self) {
        self.fleet.detach(&self.child, self.stream);
    }
}

/// A component being received.
struct Incoming {
    sha256: String,
    size: usize,
    data: Vec<u8>,
}

/// The child's end: says hello, takes offers and components, sends
/// reports. Returns when the link ends.
async fn child(deployer: Arc<Deployer>, stream: ServiceStream) {
    let ServiceStream { peer, send, mut recv } = stream;
    let parent = peer.peer_id().to_string();
    let (tx, rx) = mpsc::channel::<StreamMsg>(8);
    let write = tokio::spawn(writer(send, rx));
    let Some(hello) = msg(&Msg::Hello) else { return };
    if tx.send(hello).await.is_err() {
        return;
    }
    let mut reports = deployer.report_changes();
    let mut docs = deployer.doc_changes();
    let mut sent_seq = 0u64;
    let fleet = deployer.fleet().clone();
    let mut fleet_changes = fleet.changes();
    // The fleet view's rows sent on this stream, and when more may go.
    let mut fleet_seq = 0u64;
    let mut fleet_at = tokio::time::Instant::now();
    // What the parent understands, from its offers (none until the first).
    let mut parent_features: Vec<String> = Vec::new();
    let mut queue: VecDeque<String> = VecDeque::new();
    let mut incoming: Option<Incoming> = None;
    let mut asked: Option<String> = None;
    let mut retry_at: Option<tokio::time::Instant> = None;
    let max = deployer.max_component_bytes() as usize;
    'outer: loop {
        // Reports not yet sent go up.
        let (seq, fresh) = deployer.reports_since(sent_seq);
        if !fresh.is_empty() {
            let reports = proto::for_parent(fresh, &parent_features);
            let Some(b) = msg(&Msg::Reports { reports }) else {
                break;
            };
            if tx.send(b).await.is_err() {
                break;
            }
        }
        sent_seq = seq;
        // The fleet view's changes, at most once per interval.
        let fleet_on = parent_features.iter().any(|f| f == "fleet");
        if fleet_on && fleet_at <= tokio::time::Instant::now() && fleet.seq() > fleet_seq {
            loop {
                let c = fleet.since(fleet_seq, crate::fleet::MAX_ROWS_PER_MESSAGE);
                let done = c.seq >= fleet.seq();
                if !c.rows.is_empty() || !c.forgotten.is_empty() {
                    let Some(b) = msg(&Msg::Fleet {
                        rows: c.rows,
                        forgotten: c.forgotten,
                    }) else {
                        break 'outer;
                    };
                    if tx.send(b).await.is_err() {
                        break 'outer;
                    }
                }
                fleet_seq = c.seq;
                if done {
                    break;
                }
            }
            fleet_at = tokio::time::Instant::now() + fleet.report_every;
        }
        let fleet_due = async {
            if fleet_on && fleet.seq() > fleet_seq {
                tokio::time::sleep_until(fleet_at).await;
            } else {
                std::future::pending::<()>().await;
            }
        };
        // One fetch at a time.
        if asked.is_none() && retry_at.is_none_or(|t| t <= tokio::time::Instant::now()) {
            retry_at = None;
            while let Some(sha) = queue.pop_front() {
                if deployer.missing_components().contains(&sha) {
                    let Some(b) = msg(&Msg::Fetch { sha256: sha.clone() }) else {
                        break 'outer;
                    };
                    if tx.send(b).await.is_err() {
                        break 'outer;
                    }
                    asked = Some(sha);
                    break;
                }
            }
        }
        let retry = async {
            match retry_at {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = reports.changed() => if r.is_err() { break },
            r = fleet_changes.changed() => if r.is_err() { break },
            () = fleet_due => {}
            // A component found damaged here is fetched again.
            r = docs.changed() => {
                if r.is_err() {
                    break;
                }
                for m in deployer.missing_components() {
                    if !queue.contains(&m) && asked.as_ref() != Some(&m) {
                        queue.push_back(m);
                    }
                }
            }
            () = retry => {
                queue.extend(deployer.missing_components());
            }
            f = read(&mut *recv) => match f {
                Ok(Some(StreamMsg::Msg(body))) => match serde_json::from_slice::<Msg>(&body) {
                    Ok(Msg::Offer { ancestors, deployments, features }) => {
                        if features != parent_features {
                            // Reports sent for a parent of before go again as they are.
                            parent_features = features;
                            sent_seq = 0;
                            fleet_seq = 0;
                        }
                        let (d, p) = (deployer.clone(), parent.clone());
                        match tokio::task::spawn_blocking(move || d.receive_offer(&p, ancestors, deployments)).await {
                            Ok(missing) => {
                                for m in missing {
                                    if !queue.contains(&m) && asked.as_ref() != Some(&m) {
                                        queue.push_back(m);
                                    }
                                }
                            }
                            Err(_) => break,
                        }
                    }
                    Ok(Msg::Component { sha256, size }) => {
                        if asked.as_ref() != Some(&sha256) || incoming.is_some() || size as usize > max {
                            peer.protocol_error("unexpected component");
                            break;
                        }
                        incoming = Some(Incoming { sha256, size: size as usize, data: Vec::with_capacity(size as usize) });
                        if size == 0 {
                            // An empty component: nothing follows (it will not match its hash).
                            incoming = None;
                            asked = None;
                        }
                    }
                    Ok(Msg::Missing { sha256 }) => {
                        tracing::debug!(sha256 = %sha256, "deploy: the parent does not have the component yet");
                        asked = None;
                        retry_at = Some(tokio::time::Instant::now() + RETRY);
                    }
                    Ok(other) => {
                        tracing::warn!(message = ?other, "link: unexpected deploy message from the parent");
                        peer.protocol_error("unexpected deploy message");
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "link: undecodable deploy message from the parent");
                        peer.protocol_error("malformed deploy message");
                        break;
                    }
                },
                Ok(Some(StreamMsg::Blob(data))) => {
                    let Some(inc) = incoming.as_mut() else {
                        peer.protocol_error("component bytes without a component");
                        break;
                    };
                    if inc.data.len() + data.len() > inc.size {
                        peer.protocol_error("more component bytes than announced");
                        break;
                    }
                    inc.data.extend_from_slice(&data);
                    if inc.data.len() == inc.size {
                        let Some(done) = incoming.take() else { break };
                        asked = None;
                        deployer.events.component_bytes("received", done.size as u64);
                        let d = deployer.clone();
                        let sha = done.sha256.clone();
                        match tokio::task::spawn_blocking(move || d.store_component(&sha, &done.data)).await {
                            Ok(Ok(())) => tracing::info!(sha256 = %done.sha256, bytes = done.size, "deploy: component received"),
                            Ok(Err(e)) => {
                                tracing::warn!(sha256 = %done.sha256, error = %e, "deploy: component refused");
                                retry_at = Some(tokio::time::Instant::now() + RETRY);
                            }
                            Err(_) => break,
                        }
                    }
                }
                Ok(Some(_)) => {
                    peer.protocol_error("expected a deploy frame");
                    break;
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "link: malformed deploy frame from the parent");
                    peer.protocol_error("malformed deploy frame");
                    break;
                }
            },
        }
    }
    drop(tx);
    write.abort();
}
