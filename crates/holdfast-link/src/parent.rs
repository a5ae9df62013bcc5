//! The parent end of the QUIC link: child gateways connect here.
//!
//! A child must present a certificate issued by the fleet CA that names an
//! identity of kind `gateway` whose parent is this node, and its hello must
//! carry the same node id. Each lane stream's batches are stored in this
//! node's outbox, in the same lane, with the child appended to the source
//! path; the cumulative ack for a batch is sent only once all of it is
//! durable here. A root drains its outbox to local subscribers; any other
//! node forwards it further up.

use holdfast_model::trace;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::streams::{self, Kind, QuicPeer, Services};
use super::wire::{self, Frame, WireError, close};
use super::{ChildInfo, LinkError, Status, fleet_material, transport};
use crate::config::Sections;
use holdfast_link_proto::handshake;
use holdfast_link_proto::lane::{Acker, LaneError, ParentLane};
use holdfast_metrics::ReasonLabels;

use crate::LinkMetrics;
use holdfast_model::IdentityDirectory;
use holdfast_model::ports::LinkPeer;
use holdfast_outbox::record::Record;
use holdfast_outbox::{AppendError, FromChild, LANES, Outbox, Stored};

/// What the parent end needs.
pub struct Ctx {
    /// This node's id.
    pub node_id: String,
    /// Where children's messages are stored.
    pub outbox: Arc<Outbox>,
    /// Who may connect: enabled gateways whose parent is this node.
    pub identities: Arc<dyn IdentityDirectory>,
    /// Shared status (connected children).
    pub status: Arc<Status>,
    /// Metrics.
    pub metrics: Arc<LinkMetrics>,
    /// Concurrent children.
    pub max_children: usize,
    /// Largest frame accepted (and largest batch, uncompressed).
    pub max_frame: usize,
    /// Scope sync, twins and deployments for the children.
    pub services: Services,
}

/// Binds the link listener and spawns its accept loop.
///
/// # Errors
/// Unusable certificates, or the address cannot be bound.
pub fn start(
    config: Sections<'_>,
    ctx: Ctx,
    stop: watch::Receiver<bool>,
) -> Result<(SocketAddr, JoinHandle<()>), LinkError> {
    let (roots, chain, key) = fleet_material(config)?;
    let provider = holdfast_tls::provider();
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
        .build()
        .map_err(|e| LinkError::Tls(e.to_string()))?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| LinkError::Tls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| LinkError::Tls(e.to_string()))?;
    tls.alpn_protocols = wire::alpn_up_to(config.link.version);
    // The child decides the keep-alive; this only reaps dead paths.
    let transport = transport(Duration::from_secs(5), Duration::from_secs(30))?;
    // No 0-RTT: a replayed hello must not open a link.
    tls.max_early_data_size = 0;
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).map_err(|e| LinkError::Tls(e.to_string()))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    server.transport_config(Arc::new(transport));
    let addr = config.link.listen;
    let endpoint = quinn::Endpoint::server(server, addr).map_err(|source| LinkError::Bind { addr, source })?;
    let local = endpoint
        .local_addr()
        .map_err(|source| LinkError::Bind { addr, source })?;
    tracing::info!(addr = %local, "link listening for child gateways (quic)");
    Ok((local, tokio::spawn(accept(Arc::new(ctx), endpoint, stop))))
}

async fn accept(ctx: Arc<Ctx>, endpoint: quinn::Endpoint, mut stop: watch::Receiver<bool>) {
    loop {
        let incoming = tokio::select! {
            i = endpoint.accept() => match i { Some(i) => i, None => break },
            _ = stop.wait_for(|s| *s) => break,
        };
        let ctx = ctx.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let addr = incoming.remote_address();
            match incoming.await {
                Ok(conn) => serve(ctx, conn, stop).await,
                Err(e) => {
                    ctx.metrics
                        .link_refused
                        .get_or_create(&ReasonLabels { reason: "handshake" })
                        .inc();
                    tracing::info!(%addr, error = %e, "link: a child's handshake failed");
                }
            }
        });
    }
    endpoint.close(close::SHUTDOWN.into(), b"shutting down");
    let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
}

fn refused(ctx: &Ctx, reason: &'static str) {
    ctx.metrics.link_refused.get_or_create(&ReasonLabels { reason }).inc();
}

async fn serve(ctx: Arc<Ctx>, conn: quinn::Connection, mut stop: watch::Receiver<bool>) {
    let addr = conn.remote_address();
    let cert_id = conn
        .peer_identity()
        .and_then(|i| i.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>().ok())
        .and_then(|chain| chain.first().and_then(|c| holdfast_tls::node_id_of(c)));
    let Some(cert_id) = cert_id else {
        refused(&ctx, "no-identity");
        conn.close(close::REFUSED.into(), b"no node id in the certificate");
        return;
    };
    let (mut send, recv) = match tokio::time::timeout(Duration::from_secs(10), conn.accept_bi()).await {
        Ok(Ok(s)) => s,
        _ => {
            refused(&ctx, "no-hello");
            conn.close(close::PROTOCOL.into(), b"no control stream");
            return;
        }
    };
    let mut control = wire::FramedRecv::new(recv, 4096);
    let hello = match tokio::time::timeout(Duration::from_secs(10), control.next()).await {
        Ok(Ok(Some(f))) => Some(f),
        _ => None,
    };
    let verdict = handshake::judge(
        hello.as_ref(),
        &cert_id,
        &ctx.node_id,
        |id| ctx.identities.is_child_gateway(id, &ctx.node_id),
        |id| ctx.status.has_room_for(id, ctx.max_children),
    );
    let child = match verdict {
        handshake::Verdict::Refuse { child, refusal } => {
            refused(&ctx, refusal.label);
            tracing::warn!(%addr, child = %child, reason = %refusal.reason, "link: child refused");
            let _ = send.write_all(&refusal.encode()).await;
            let _ = send.finish();
            // Let the refusal reach the child before closing.
            let _ = tokio::time::timeout(Duration::from_secs(1), send.stopped()).await;
            conn.close(close::REFUSED.into(), b"refused");
            return;
        }
        handshake::Verdict::Welcome { child, .. } => child,
    };
    let mut buf = BytesMut::new();
    if handshake::welcome(&ctx.node_id).encode(&mut buf).is_err() || send.write_all(&buf).await.is_err() {
        return;
    }
    let child: Arc<str> = Arc::from(child.as_str());
    tracing::info!(%addr, child = %child, "link: child gateway connected");
    ctx.status.update(|s| {
        s.children.insert(
            child.to_string(),
            ChildInfo {
                addr: addr.to_string(),
                since_ms: holdfast_model::unix_ms(),
                received: 0,
                conn_id: conn.stable_id(),
            },
        );
        ctx.metrics.link_children.set(s.children.len() as i64);
    });
    let conn_id = conn.stable_id();
    let peer = QuicPeer::new(conn.clone(), &child, ctx.metrics.clone());
    let sync = ctx
        .services
        .scope
        .clone()
        .map(|scope| tokio::spawn(streams::serve_scope(scope, peer.clone())));
    let mut lanes = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            s = conn.accept_bi() => match s {
                Ok((send, recv)) => {
                    let (ctx, peer, conn, child) = (ctx.clone(), peer.clone(), conn.clone(), child.clone());
                    lanes.spawn(async move { stream(ctx, peer, conn, child, send, recv).await });
                }
                Err(e) => {
                    tracing::info!(child = %child, error = %e, "link: child gateway disconnected");
                    break;
                }
            },
            _ = stop.wait_for(|s| *s) => {
                conn.close(close::SHUTDOWN.into(), b"shutting down");
                break;
            }
        }
    }
    if let Some(sync) = sync {
        sync.abort();
    }
    // Lanes finish what they have stored and exit when the connection is gone.
    while lanes.join_next().await.is_some() {}
    ctx.status.update(|s| {
        // A reconnect may already have replaced this entry.
        if s.children.get(&*child).is_some_and(|c| c.conn_id == conn_id) {
            s.children.remove(&*child);
        }
        ctx.metrics.link_children.set(s.children.len() as i64);
    });
    drop(send);
}

/// A batch being stored: its size, and the outbox's verdict to come.
type Pending = (u64, tokio::sync::oneshot::Receiver<Result<Stored, AppendError>>);

/// A bidirectional stream from the child: a lane, the service stream or
/// the deploy stream, as its first frame says.
async fn stream(
    ctx: Arc<Ctx>,
    peer: Arc<QuicPeer>,
    conn: quinn::Connection,
    child: Arc<str>,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
) {
    let mut frames = wire::FramedRecv::new(recv, ctx.max_frame);
    let first = match frames.next().await {
        Ok(Some(Frame::Lane(l))) if (l as usize) < LANES => return lane(ctx, conn, child, l, send, frames).await,
        Ok(Some(f)) => f,
        _ => return refuse_stream(&ctx, &conn),
    };
    let (kind, service) = match &first {
        Frame::Svc(_) => (Kind::Twins, ctx.services.twins.clone()),
        Frame::Deploy(_) if peer.version() >= 3 => (Kind::Deploy, ctx.services.deploy.clone()),
        _ => (Kind::Twins, None),
    };
    let hello = kind.message(first).ok();
    match (service, hello) {
        (Some(service), Some(hello)) if service.is_hello(&hello) => {
            let max = service.max_frame();
            service.parent_end(streams::bidi(peer, kind, send, frames, max)).await;
        }
        _ => refuse_stream(&ctx, &conn),
    }
}

fn refuse_stream(ctx: &Ctx, conn: &quinn::Connection) {
    refused(ctx, "protocol");
    conn.close(
        close::PROTOCOL.into(),
        b"a stream starts with a lane frame or a service hello",
    );
}

async fn lane(
    ctx: Arc<Ctx>,
    conn: quinn::Connection,
    child: Arc<str>,
    lane: u8,
    mut send: quinn::SendStream,
    mut frames: wire::FramedRecv,
) {
    // Acks go out in order from their own task, so reading continues while
    // earlier batches wait for their sync.
    let (tx, mut rx) = mpsc::channel::<Pending>(64);
    let acker = {
        let (ctx, conn, child) = (ctx.clone(), conn.clone(), child.clone());
        tokio::spawn(async move {
            let mut acks = Acker::default();
            let mut buf = BytesMut::new();
            while let Some((n, verdict)) = rx.recv().await {
                let stored = match verdict.await {
                    Ok(Ok(stored)) => stored,
                    Ok(Err(e)) => {
                        tracing::warn!(child = %child, lane, error = %e, "link: cannot store a child's batch");
                        refused(&ctx, "store");
                        conn.close(close::FULL.into(), b"cannot store now");
                        return;
                    }
                    Err(_) => return,
                };
                if stored.duplicates > 0 {
                    tracing::debug!(child = %child, lane, duplicates = stored.duplicates, "link: a child sent again what is stored here");
                }
                ctx.metrics.link_received.inc_by(stored.stored);
                ctx.status.update(|s| {
                    if let Some(c) = s.children.get_mut(&*child) {
                        c.received += n;
                    }
                });
                buf.clear();
                if acks.stored(n).encode(&mut buf).is_err() || send.write_all(&buf).await.is_err() {
                    return;
                }
            }
        })
    };
    let mut state = ParentLane::new(lane, ctx.max_frame, wire::negotiated(&conn) >= 4);
    loop {
        let frame = match frames.next().await {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(wire::ReadError::Wire(e)) => {
                refused(&ctx, "malformed");
                tracing::warn!(child = %child, error = %e, "link: malformed frame from a child");
                conn.close(close::PROTOCOL.into(), b"malformed frame");
                break;
            }
            Err(wire::ReadError::Stream(_)) => break,
        };
        let received = match state.receive(frame) {
            Ok(Some(r)) => r,
            Ok(None) => continue,
            Err(e @ LaneError::Wire(WireError::WindowTooLarge)) => {
                // Refused before zstd allocates the window.
                refused(&ctx, "zstd-window");
                tracing::warn!(child = %child, lane, error = %e, "link: compressed batch from a child refused");
                conn.close(close::PROTOCOL.into(), b"zstd window over the link's limit");
                break;
            }
            Err(e @ (LaneError::Unexpected(_) | LaneError::Ids(_))) => {
                refused(&ctx, "protocol");
                tracing::warn!(child = %child, lane, error = %e, "link: protocol error from a child");
                conn.close(close::PROTOCOL.into(), b"expected a batch");
                break;
            }
            Err(e) => {
                refused(&ctx, "malformed");
                tracing::warn!(child = %child, error = %e, "link: bad batch from a child");
                conn.close(close::PROTOCOL.into(), b"bad compressed batch");
                break;
            }
        };
        let n = received.records.len() as u64;
        let ids = received.ids.map_or_else(
            || vec![None; received.records.len()],
            |ids| ids.into_iter().map(Some).collect(),
        );
        let mut records = Vec::with_capacity(received.records.len());
        // Traced messages: a receive span each, from the batch's arrival to
        // its append; the stored message hangs under it.
        let arrived_ns = trace::now_ns();
        let mut traced: Vec<(trace::Started, holdfast_model::MessageId)> = Vec::new();
        for (raw, id) in received.records.into_iter().zip(ids) {
            let record = match Record::decode_shared(&raw) {
                Ok(r) if r.message.origin.is_some() => r,
                _ => {
                    refused(&ctx, "malformed");
                    tracing::warn!(child = %child, "link: undecodable message from a child");
                    conn.close(close::PROTOCOL.into(), b"malformed record");
                    return;
                }
            };
            let mut message = record.message;
            {
                let m = Arc::make_mut(&mut message);
                m.source.path.push(child.to_string());
                m.delivered_locally = false;
                if let Some(t) = trace::tracer()
                    && let Some(c) = trace::TraceContext::of(&m.properties).filter(|c| c.sampled())
                {
                    let mut span = trace::Started::new(t, c, false);
                    span.start_ns = arrived_ns;
                    trace::set_parent(&mut m.properties, &c, span.span_id);
                    if let Some(origin) = m.origin {
                        traced.push((span, origin));
                    }
                }
            }
            match ctx
                .outbox
                .encode(lane, message, Some(Duration::from_millis(record.ttl_ms)))
            {
                Ok(value) => records.push((id, value)),
                Err(e) => {
                    tracing::warn!(child = %child, lane, error = %e, "link: a child's message cannot be stored");
                    refused(&ctx, "malformed");
                    conn.close(close::PROTOCOL.into(), b"malformed record");
                    return;
                }
            }
        }
        let batch = FromChild {
            child: child.clone(),
            lane,
            records,
        };
        let pending = match ctx.outbox.submit_from(batch) {
            Ok(rx) => {
                if let Some(t) = trace::tracer() {
                    for (span, origin) in traced {
                        span.finish(
                            t,
                            "receive",
                            trace::SpanKind::Server,
                            vec![
                                ("holdfast.node", trace::AttrValue::Str(t.node.clone())),
                                ("holdfast.child", trace::AttrValue::Str(child.to_string())),
                                ("holdfast.lane", trace::AttrValue::Int(i64::from(lane))),
                                ("holdfast.origin_id", trace::AttrValue::Str(origin.to_string())),
                            ],
                            None,
                        );
                    }
                }
                (n, rx)
            }
            Err(e) => {
                tracing::warn!(child = %child, lane, error = %e, "link: outbox refused a child's batch");
                refused(&ctx, "full");
                conn.close(close::FULL.into(), b"cannot store now");
                return;
            }
        };
        if tx.send(pending).await.is_err() {
            break;
        }
    }
    drop(tx);
    let _ = acker.await;
}
