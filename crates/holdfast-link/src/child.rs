//! The child end of the QUIC link: connects to the parent, says hello, and
//! drains the outbox, one QUIC stream per lane.
//!
//! Each lane stream carries batches of records; the parent answers with the
//! cumulative count it has stored, and only then are those messages deleted
//! here. At most `upstream.window_messages` are unacknowledged per lane, so
//! many batches are in flight per round trip. Lanes map to QUIC stream
//! priorities (lane 0 highest). When the link drops, unacknowledged messages
//! return to their lanes and are sent again, in order, on the next link.

use holdfast_model::trace;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::sync::watch;

use super::reconnect::{Ended, Probe, Upstream, drive, within};
use super::streams::{self, Kind, QuicPeer};
use super::wire::{self, Frame, close};
use super::{Ctx, LinkError, LinkState, fleet_material, outgoing, transport};
use crate::config::Sections;
use holdfast_link_proto::handshake;
use holdfast_link_proto::lane::ChildLane;
use holdfast_metrics::ResultLabels;
use holdfast_model::ports::LinkPeer;
use holdfast_outbox::LANES;

/// Largest frame the parent may send (acks and refusals are small).
const MAX_DOWN_FRAME: usize = 64 << 10;
/// A batch stops growing at this size (one message may exceed it), well
/// under the parent's `link.max_batch_bytes`.
const MAX_BATCH_BYTES: usize = 1 << 20;

/// Builds the QUIC client endpoint configuration from `[fleet]`.
///
/// # Errors
/// Unusable certificates or keys.
pub fn client_config(config: Sections<'_>) -> Result<quinn::ClientConfig, LinkError> {
    let (roots, chain, key) = fleet_material(config)?;
    let mut tls = rustls::ClientConfig::builder_with_provider(holdfast_tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| LinkError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(|e| LinkError::Tls(e.to_string()))?;
    // The highest version first: a parent that has it picks it.
    tls.alpn_protocols = wire::alpn_up_to(wire::LATEST);
    let q = &config.upstream.quic;
    let transport = transport(
        Duration::from_millis(q.keep_alive_ms),
        Duration::from_millis(q.idle_timeout_ms),
    )?;
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(|e| LinkError::Tls(e.to_string()))?;
    let mut client = quinn::ClientConfig::new(Arc::new(crypto));
    client.transport_config(Arc::new(transport));
    Ok(client)
}

/// The QUIC parent link as [`drive`] runs it.
struct Quic {
    ctx: Arc<Ctx>,
    endpoint: quinn::Endpoint,
}

/// The connection, its control stream (kept open while the link lives),
/// and whether batches are compressed (link/2 was agreed and
/// `upstream.compression` is on).
pub(crate) type Session = (quinn::Connection, quinn::SendStream, bool);

impl Upstream for Quic {
    type Session = Session;

    fn ctx(&self) -> &Ctx {
        &self.ctx
    }

    fn targets(&self) -> Vec<String> {
        vec![self.ctx.config.quic.parent.clone()]
    }

    fn probe(&self) -> Probe {
        Probe::Quic
    }

    async fn connect(&self, _target: &str, addr: SocketAddr) -> Result<Session, Ended> {
        connect(&self.ctx, &self.endpoint, addr).await
    }

    async fn serve(&self, (conn, control, compress): Session, stop: &mut watch::Receiver<bool>) -> Ended {
        let ended = tokio::select! {
            e = drain(&self.ctx, &conn, compress) => e,
            _ = stop.wait_for(|s| *s) => {
                conn.close(close::SHUTDOWN.into(), b"shutting down");
                Ended::Stopped
            }
        };
        drop(control);
        ended
    }
}

/// Runs the link until `stop`.
pub async fn run(ctx: Ctx, client: quinn::ClientConfig, mut stop: watch::Receiver<bool>) {
    let bind: SocketAddr = ([0, 0, 0, 0], 0).into();
    let mut endpoint = match quinn::Endpoint::client(bind) {
        Ok(e) => e,
        Err(e) => {
            tracing::error!(error = %e, "link: cannot open a UDP socket; the upstream link is off");
            ctx.status.set_state(LinkState::Down, Some(e.to_string()));
            return;
        }
    };
    endpoint.set_default_client_config(client);
    let quic = Quic {
        ctx: Arc::new(ctx),
        endpoint,
    };
    drive(&quic, &mut stop).await;
    let was_up = quic.ctx.status.snapshot().state == LinkState::Up;
    quic.endpoint.close(close::SHUTDOWN.into(), b"shutting down");
    // Give the parent the close of a live link; an attempt still
    // handshaking with a parent that does not answer is not waited for.
    if was_up {
        let _ = tokio::time::timeout(Duration::from_secs(1), quic.endpoint.wait_idle()).await;
    }
}

/// One connection attempt: handshake and hello. Returns the connection, its
/// control stream (kept open while the link lives) and the parent's id.
async fn connect(ctx: &Ctx, endpoint: &quinn::Endpoint, addr: SocketAddr) -> Result<Session, Ended> {
    let m = &ctx.metrics;
    let result = |r: &'static str| {
        m.link_connects.get_or_create(&ResultLabels { result: r }).inc();
    };
    let connecting = match endpoint.connect(addr, &ctx.config.quic.parent_id) {
        Ok(c) => c,
        Err(e) => {
            result("error");
            return Err(Ended::Refused(format!("cannot connect: {e}")));
        }
    };
    let timeout = Duration::from_millis(ctx.config.connect_timeout_ms);
    let no_answer = || format!("no answer from {addr} within {} ms", timeout.as_millis());
    let conn = match within(timeout, &result, no_answer, connecting).await? {
        Err(e) => return Err(classify_connect_error(e, &result)),
        Ok(c) => c,
    };
    let (mut send, recv) = match conn.open_bi().await {
        Ok(s) => s,
        Err(e) => {
            result("error");
            return Err(Ended::Unreachable(format!("control stream: {e}")));
        }
    };
    let mut buf = BytesMut::new();
    handshake::hello(&ctx.node_id, ctx.outbox.instance())
        .encode(&mut buf)
        .map_err(|e| {
            result("error");
            Ended::Unreachable(format!("hello: {e}"))
        })?;
    if let Err(e) = send.write_all(&buf).await {
        result("error");
        return Err(Ended::Unreachable(format!("hello: {e}")));
    }
    let no_answer = || "no answer to hello".to_string();
    let mut control = wire::FramedRecv::new(recv, MAX_DOWN_FRAME);
    let answer = match within(timeout, &result, no_answer, control.next()).await? {
        Ok(frame) => handshake::read_answer(frame),
        Err(e) => {
            result("error");
            return Err(Ended::Unreachable(format!("hello: {e}")));
        }
    };
    let parent = match answer {
        Ok(parent) => parent,
        Err(e @ handshake::HelloError::Refused { .. }) => {
            result("refused");
            tracing::error!(error = %e, "link: the parent refused this node");
            return Err(Ended::Refused(e.to_string()));
        }
        Err(e @ handshake::HelloError::Version(_)) => {
            result("refused");
            return Err(Ended::Refused(e.to_string()));
        }
        Err(e) => {
            result("error");
            return Err(Ended::Refused(e.to_string()));
        }
    };
    result("ok");
    let compress = ctx.config.compression && wire::is_v2(&conn);
    tracing::info!(parent = %parent, %addr, rtt_ms = conn.rtt().as_millis() as u64, compress, "link up");
    Ok((conn, send, compress))
}

fn classify_connect_error(e: quinn::ConnectionError, result: &dyn Fn(&'static str)) -> Ended {
    use quinn::ConnectionError as C;
    match e {
        // No answer, or the path reset: the parent may be back any moment.
        C::TimedOut | C::Reset => {
            result("timeout");
            Ended::Unreachable(format!("handshake: {e}"))
        }
        // It answered and refused (TLS alert, wrong name, not registered...):
        // a configuration problem, so back off.
        _ => {
            result("refused");
            tracing::error!(error = %e, "link: the handshake with the parent failed");
            Ended::Refused(format!("handshake: {e}"))
        }
    }
}

/// Drains every lane over `conn` until it fails.
async fn drain(ctx: &Arc<Ctx>, conn: &quinn::Connection, compress: bool) -> Ended {
    let mut lanes = tokio::task::JoinSet::new();
    let peer = QuicPeer::new(conn.clone(), &ctx.config.quic.parent_id, ctx.metrics.clone());
    let services = &ctx.services;
    if let Some(scope) = &services.scope {
        lanes.spawn(streams::receive_scope(scope.clone(), peer.clone()));
    }
    if let Some(twins) = &services.twins {
        lanes.spawn(streams::open(twins.clone(), peer.clone(), Kind::Twins));
    }
    if let Some(deploy) = &services.deploy
        && peer.version() >= 3
    {
        lanes.spawn(streams::open(deploy.clone(), peer.clone(), Kind::Deploy));
    }
    for lane in 0..LANES as u8 {
        let (ctx, conn) = (ctx.clone(), conn.clone());
        lanes.spawn(async move { lane_sender(ctx, conn, lane, compress).await });
    }
    let closed = conn.closed().await;
    lanes.abort_all();
    while lanes.join_next().await.is_some() {}
    use quinn::ConnectionError as C;
    match closed {
        C::ApplicationClosed(a) if a.error_code == close::FULL.into() => {
            Ended::Refused("the parent's outbox is full; retrying later".into())
        }
        C::ApplicationClosed(a) if a.error_code == close::SHUTDOWN.into() => {
            // It will be back: probe for it.
            Ended::Unreachable("the parent is shutting down".into())
        }
        C::ApplicationClosed(a) => Ended::Refused(format!("closed by the parent: {a}")),
        // Closed here by a lane after an error on its stream (shutting down
        // ends `serve` on its own branch): the link comes back, backing off.
        C::LocallyClosed => Ended::Refused("closed after an error on a lane stream".into()),
        e => Ended::Unreachable(e.to_string()),
    }
}

/// Sends one lane. Opens its stream at the first message. Any error closes
/// the connection: the lanes are restarted together on the next link.
async fn lane_sender(ctx: Arc<Ctx>, conn: quinn::Connection, lane: u8, compress: bool) {
    if let Err(e) = lane_loop(&ctx, &conn, lane, compress).await {
        tracing::warn!(lane, error = %e, "link: a lane failed; the connection closes and the link comes back");
        conn.close(close::PROTOCOL.into(), e.as_bytes());
    }
}

async fn lane_loop(ctx: &Arc<Ctx>, conn: &quinn::Connection, lane: u8, compress: bool) -> Result<(), String> {
    // The lane's protocol state: its window, and its zstd context (one per
    // lane stream, on both sides).
    let level = compress.then_some(ctx.config.compression_level);
    let mut state = ChildLane::new(lane, ctx.config.window_messages, level).map_err(|e| e.to_string())?;
    let mut work = ctx.outbox.watch_work();
    let window = ctx.config.window_messages;
    let batch_max = ctx.config.batch_messages;
    // link/4: every batch names its records by hop id.
    let with_ids = wire::negotiated(conn) >= 4;
    let mut stream: Option<(quinn::SendStream, wire::FramedRecv)> = None;
    // Traced messages in flight: their send span, ended by the parent's ack.
    let mut sending = Sending::default();
    loop {
        // Acks that are here already, without waiting (reading is cancel-safe).
        if let Some((_, acks)) = stream.as_mut() {
            loop {
                let frame = tokio::select! {
                    biased;
                    f = acks.next() => f,
                    () = std::future::ready(()) => break,
                };
                take_ack(ctx, &mut state, &mut sending, frame)?;
            }
        }
        let room = state.room();
        if room > 0 {
            work.borrow_and_update();
            let leased = ctx
                .outbox
                .lease_lane(lane, batch_max.min(room))
                .map_err(|e| format!("outbox: {e}"))?;
            if !leased.items.is_empty() {
                let (records, epoch) = batch(ctx, &leased).await;
                if records.is_empty() {
                    continue;
                }
                if stream.is_none() {
                    let (send, recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
                    // Higher value goes first: lane 0 highest.
                    let _ = send.set_priority(i32::from(LANES as u8 - lane));
                    stream = Some((send, wire::FramedRecv::new(recv, MAX_DOWN_FRAME)));
                }
                sending.started(&leased, &records);
                let out = state
                    .send(records, epoch.filter(|_| with_ids))
                    .map_err(|e| e.to_string())?;
                let waited = ctx.rate.take(usize::from(lane), out.wire_bytes).await;
                if !waited.is_zero() {
                    ctx.metrics.link_throttled_seconds.inc_by(waited.as_secs_f64());
                }
                if let Some((send, _)) = stream.as_mut() {
                    let mut chunks = out.frames;
                    send.write_all_chunks(&mut chunks).await.map_err(|e| e.to_string())?;
                }
                ctx.metrics.link_sent.inc_by(out.records);
                ctx.metrics.link_batch_bytes.inc_by(out.raw_bytes);
                ctx.metrics.link_wire_bytes.inc_by(out.wire_bytes);
                ctx.status.update(|s| {
                    s.sent += out.records;
                    s.window = window;
                });
                continue;
            }
        }
        // Wait for an ack, or (with room) for new messages.
        let next_ack = async {
            match stream.as_mut() {
                Some((_, acks)) => acks.next().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            f = next_ack => take_ack(ctx, &mut state, &mut sending, f)?,
            r = work.changed(), if room > 0 => r.map_err(|_| "outbox closed".to_string())?,
        }
    }
}

/// A batch to send: records as `(id, head, payload)`, and their epoch.
type Records = (Vec<(holdfast_model::MessageId, Vec<u8>, bytes::Bytes)>, Option<u64>);

/// The records of a leased batch, as the lane sends them, and the epoch
/// they were stored in: what expired since it was leased is deleted, and
/// what goes over the batch's byte limit or belongs to another epoch goes
/// back for the next batch (a batch is one epoch: one IDS frame).
async fn batch(ctx: &Ctx, leased: &holdfast_outbox::LeaseBatch) -> Records {
    let now = ctx.outbox.clock_ms();
    let mut records = Vec::with_capacity(leased.items.len());
    let mut expired = Vec::new();
    let mut batch_bytes = 0usize;
    let mut unsent = Vec::new();
    // Under a byte-rate cap, batches of a quarter second at most, so
    // the cap paces them instead of letting one large batch through.
    let batch_limit = match ctx.rate.rate() {
        0 => MAX_BATCH_BYTES,
        r => usize::try_from(r / 4)
            .unwrap_or(MAX_BATCH_BYTES)
            .clamp(4096, MAX_BATCH_BYTES),
    };
    let epoch = leased.items.first().map(|i| i.epoch);
    for item in &leased.items {
        if batch_bytes >= batch_limit || Some(item.epoch) != epoch {
            // The rest go in the next batch.
            unsent.push(item.id);
            continue;
        }
        match outgoing(item, now) {
            Some(Ok((head, payload))) => {
                batch_bytes += head.len() + payload.len() + 4;
                records.push((item.id, head, payload));
            }
            // Expired since it was leased, or (impossible for a stored record) unencodable.
            _ => expired.push(item.id),
        }
    }
    if !expired.is_empty() {
        // Nothing to send for these; deleting them is what expiry would do.
        let _ = ctx.outbox.ack(&expired).await;
    }
    if !unsent.is_empty() {
        ctx.outbox.release(&unsent);
    }
    (records, epoch)
}

/// A frame from the parent on a lane stream: an ack frees the window and
/// deletes what it covers, without waiting for the deletion's commit (it is
/// buffered anyway: a message deleted here is stored at the parent).
///
/// # Errors
/// Anything but a valid ack, a malformed frame, or the stream's end.
fn take_ack(
    ctx: &Ctx,
    state: &mut ChildLane,
    sending: &mut Sending,
    frame: Result<Option<Frame>, wire::ReadError>,
) -> Result<(), String> {
    let frame = match frame {
        Ok(Some(f)) => f,
        Ok(None) => return Err("the parent ended a lane stream".into()),
        Err(e) => return Err(e.to_string()),
    };
    let ids = state.receive(frame).map_err(|e| {
        tracing::debug!(error = %e, "link: bad ack");
        e.to_string()
    })?;
    if !ids.is_empty() {
        // Claimed at once (a release after a cut does not hand them out
        // again) and deleted by the outbox's writer, while the lane goes on
        // sending.
        sending.acked(&ids, &ctx.config.quic.parent_id);
        ctx.outbox.ack_detached(&ids);
        ctx.metrics.link_acked.inc_by(ids.len() as u64);
        ctx.status.update(|s| s.acked += ids.len() as u64);
    }
    Ok(())
}

/// The send spans of traced messages in flight on a lane, from the batch
/// that carried them to the parent's ack (spans of a batch the link lost
/// are not recorded: the message is sent again).
#[derive(Default)]
struct Sending(std::collections::HashMap<holdfast_model::MessageId, trace::Started>);

impl Sending {
    /// The traced messages of a batch about to go.
    fn started(
        &mut self,
        leased: &holdfast_outbox::LeaseBatch,
        records: &[(holdfast_model::MessageId, Vec<u8>, bytes::Bytes)],
    ) {
        let Some(t) = trace::tracer() else { return };
        for item in &leased.items {
            if let Some(ctx) = trace::TraceContext::of(&item.record.message.properties).filter(|c| c.sampled())
                && records.iter().any(|(id, _, _)| *id == item.id)
            {
                self.0.insert(item.id, trace::Started::new(t, ctx, false));
            }
        }
    }

    /// The parent acknowledged `ids`: their spans end.
    fn acked(&mut self, ids: &[holdfast_model::MessageId], parent: &str) {
        if self.0.is_empty() {
            return;
        }
        let Some(t) = trace::tracer() else { return };
        for id in ids {
            if let Some(span) = self.0.remove(id) {
                trace::finish_send(t, span, *id, "holdfast.parent", parent.to_string(), None);
            }
        }
    }
}
