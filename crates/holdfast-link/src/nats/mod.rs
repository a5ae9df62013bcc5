//! JetStream as the top of the tree: the outbox drains into a replicated
//! stream of a NATS cluster, exactly once.
//!
//! Every message is published with `Nats-Msg-Id` set to its `holdfast-id`
//! (the id it got where it entered the tree, stable across resends and
//! restarts), so the stream's de-duplication window drops a copy sent again
//! after a lost acknowledgement, a reconnect, a failover or a restart of this
//! node. A message leaves the outbox only on the stream's publish
//! acknowledgement (with replicas, once a quorum stored it). Publishes are
//! pipelined up to `upstream.nats.inflight`; their acknowledgements are taken
//! in order. Headers carry the message's user properties, content type,
//! lane, path through the tree and topic.
//!
//! Cloud-to-device ([`c2d`]): a durable pull consumer per node whose
//! messages are delivered locally and acknowledged once stored.

pub mod c2d;
pub mod config;
pub mod subject;

use std::collections::VecDeque;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::context::{PublishAckFuture, PublishError, PublishErrorKind};
use async_nats::jetstream::message::PublishMessage;
use async_nats::{Event, HeaderMap};
use futures_util::stream::{FuturesOrdered, StreamExt};
use holdfast_metrics::{ReasonLabels, ResultLabels};
use holdfast_model::ports::LocalDelivery;
use holdfast_model::trace;
use holdfast_outbox::MessageId;
use holdfast_outbox::dead_letter::Reason;
use tokio::sync::{mpsc, watch};

pub use self::config::{NatsC2dConfig, NatsConfig};
use super::reconnect::{Ended, Probe, Upstream, drive, within};
use super::{Ctx, LinkError, PROP_ID, PROP_PATH, origin_id, path_of};

/// Header with the message's lane (0-9).
pub const HEADER_LANE: &str = "holdfast-lane";
/// Header with the message's MQTT topic.
pub const HEADER_TOPIC: &str = "holdfast-topic";
/// Header with the message's expiry, ms since the Unix epoch.
pub const HEADER_EXPIRES: &str = "holdfast-expires-ms";

/// The longest subject sent: the server's control line (`max_control_line`,
/// 4 KiB by default) holds the subject, the reply inbox and the sizes.
const MAX_SUBJECT: usize = 3072;

/// JetStream as [`drive`] runs it.
pub struct Nats {
    /// What every upstream needs.
    pub link: Ctx,
    /// Local delivery for cloud-to-device messages.
    pub local: Option<Arc<dyn LocalDelivery>>,
    /// TLS settings, when TLS is used.
    pub tls: Option<rustls::ClientConfig>,
}

/// Builds the TLS client settings, when `tls = true` or a server is `tls://`.
///
/// # Errors
/// Unusable certificates or keys.
pub fn tls_config(config: crate::config::Sections<'_>) -> Result<Option<rustls::ClientConfig>, LinkError> {
    let n = &config.upstream.nats;
    if !n.tls && !n.urls().iter().any(|u| u.starts_with("tls://")) {
        return Ok(None);
    }
    let Some(ca) = n.ca.as_ref().or(config.fleet.ca.as_ref()) else {
        return Err(LinkError::Tls("upstream.nats.ca is required with TLS".into()));
    };
    Ok(Some(super::client_tls(ca, n.cert.as_deref(), n.key.as_deref())?))
}

/// Runs the JetStream upstream until `stop`.
pub async fn run(nats: Nats, mut stop: watch::Receiver<bool>) {
    drive(&nats, &mut stop).await;
}

/// A connected client.
pub(crate) struct Session {
    js: async_nats::jetstream::Context,
    events: mpsc::UnboundedReceiver<Event>,
    c2d: Option<c2d::Consumer>,
}

impl Upstream for Nats {
    type Session = Session;

    fn ctx(&self) -> &Ctx {
        &self.link
    }

    fn targets(&self) -> Vec<String> {
        self.link.config.nats.targets()
    }

    fn probe(&self) -> Probe {
        Probe::Tcp
    }

    async fn connect(&self, target: &str, _addr: SocketAddr) -> Result<Session, Ended> {
        connect(self, target).await
    }

    async fn serve(&self, session: Session, stop: &mut watch::Receiver<bool>) -> Ended {
        serve(self, session, stop).await
    }
}

async fn connect(ctx: &Nats, target: &str) -> Result<Session, Ended> {
    let m = &ctx.link.metrics;
    let result = |r: &'static str| {
        m.link_connects.get_or_create(&ResultLabels { result: r }).inc();
    };
    let n = &ctx.link.config.nats;
    let targets = n.targets();
    let urls = n.urls();
    let url = targets
        .iter()
        .position(|t| t == target)
        .and_then(|i| urls.get(i))
        .cloned()
        .unwrap_or_else(|| format!("nats://{target}"));
    let timeout = Duration::from_millis(ctx.link.config.connect_timeout_ms);
    let (tx, events) = mpsc::unbounded_channel();
    let mut options = async_nats::ConnectOptions::new()
        .name(n.name.clone().unwrap_or_else(|| ctx.link.node_id.clone()))
        .connection_timeout(timeout)
        // Failover is this node's: one server per connection, the next one
        // after a failure, with the link's back-off and jitter.
        .ignore_discovered_servers()
        .max_reconnects(1)
        .event_callback(move |e| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(e);
            }
        });
    if let Some(path) = &n.credentials {
        options = match options.credentials_file(path).await {
            Ok(o) => o,
            Err(e) => {
                result("refused");
                return Err(Ended::Refused(format!("credentials file {}: {e}", path.display())));
            }
        };
    }
    if let Some(path) = &n.nkey_seed {
        match std::fs::read_to_string(path) {
            Ok(seed) => options = options.nkey(seed.trim().to_string()),
            Err(e) => {
                result("refused");
                return Err(Ended::Refused(format!("NKey seed {}: {e}", path.display())));
            }
        }
    }
    if let (Some(user), Some(pass)) = (&n.username, &n.password) {
        options = options.user_and_password(user.clone(), pass.clone());
    }
    if let Some(token) = &n.token {
        options = options.token(token.clone());
    }
    if let Some(tls) = &ctx.tls {
        options = options.require_tls(true).tls_client_config(tls.clone());
    }
    let no_answer = || format!("no answer from {target}");
    let client = match within(
        timeout + Duration::from_secs(1),
        &result,
        no_answer,
        options.connect(url.as_str()),
    )
    .await?
    {
        Ok(c) => c,
        Err(e) => {
            use async_nats::ConnectErrorKind as K;
            return Err(match e.kind() {
                K::Authentication | K::AuthorizationViolation | K::Tls => {
                    result("refused");
                    Ended::Refused(format!("{target}: {e}"))
                }
                _ => {
                    result("unreachable");
                    Ended::Unreachable(format!("{target}: {e}"))
                }
            });
        }
    };
    let js = async_nats::jetstream::ContextBuilder::new()
        .timeout(Duration::from_millis(n.ack_timeout_ms))
        .max_ack_inflight(n.inflight)
        .backpressure_on_inflight(true)
        .build(client);
    // The stream must exist; its de-duplication window bounds exactly-once.
    let stream = match within(
        timeout,
        &result,
        || "no answer to STREAM.INFO".into(),
        js.get_stream(&n.stream),
    )
    .await?
    {
        Ok(s) => s,
        Err(e) => {
            result("refused");
            return Err(Ended::Refused(format!("stream {:?}: {e}", n.stream)));
        }
    };
    let window = stream.cached_info().config.duplicate_window;
    m.link_dedup_window
        .set(i64::try_from(window.as_secs()).unwrap_or(i64::MAX));
    let ttl = Duration::from_millis(ctx.link.outbox.default_ttl_ms());
    if window < ttl {
        tracing::warn!(
            stream = %n.stream,
            window_s = window.as_secs(),
            ttl_s = ttl.as_secs(),
            "JetStream: the stream's duplicate window is shorter than the outbox's default time-to-live; \
             a message resent after an outage longer than the window could be stored twice"
        );
    }
    let c2d = match (&ctx.local, n.c2d.stream.is_empty()) {
        (Some(local), false) => {
            let made = c2d::Consumer::open(&js, &n.c2d, &ctx.link.node_id, local.clone());
            match within(timeout, &result, || "no answer opening the C2D consumer".into(), made).await? {
                Ok(c) => Some(c),
                Err(e) => {
                    result("refused");
                    return Err(Ended::Refused(e));
                }
            }
        }
        _ => None,
    };
    result("ok");
    tracing::info!(%target, stream = %n.stream, dedup_window_s = window.as_secs(), "JetStream upstream up");
    ctx.link.status.update(|s| s.window = n.inflight);
    Ok(Session { js, events, c2d })
}

type Acked = (
    MessageId,
    Option<trace::Started>,
    Result<async_nats::jetstream::publish::PublishAck, PublishError>,
);

/// What a publish in flight resolves to.
type InFlight = Pin<Box<dyn Future<Output = Acked> + Send>>;

async fn serve(ctx: &Nats, session: Session, stop: &mut watch::Receiver<bool>) -> Ended {
    let Session { js, mut events, c2d } = session;
    let link = &ctx.link;
    let n = &link.config.nats;
    let stall = Duration::from_millis(n.stall_ms);
    let mut work = link.outbox.watch_work();
    let mut pending: FuturesOrdered<InFlight> = FuturesOrdered::new();
    let mut sent_at: VecDeque<tokio::time::Instant> = VecDeque::new();
    let mut idle = false;
    let c2d_run = async {
        match c2d {
            Some(c) => c.run(link).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(c2d_run);
    loop {
        let stalled = sent_at.front().is_some_and(|t| t.elapsed() >= stall);
        let room = n.inflight.saturating_sub(pending.len());
        if room > 0 && !stalled {
            work.borrow_and_update();
            match send_batch(link, &js, room, &mut pending, &mut sent_at).await {
                // All it leased was set aside (expired, too large): lease again.
                Ok(Some(0)) => continue,
                Ok(sent) => idle = sent.is_none(),
                Err(e) => return e,
            }
        }
        let room = n.inflight.saturating_sub(pending.len()) > 0;
        // While stalled, look again when the oldest publish is acknowledged
        // (or times out, which ends the connection).
        tokio::select! {
            Some(first) = pending.next(), if !pending.is_empty() => {
                sent_at.pop_front();
                let mut done = vec![first];
                while let Some(Some(more)) = futures_util::FutureExt::now_or_never(pending.next()) {
                    sent_at.pop_front();
                    done.push(more);
                }
                if let Some(e) = acknowledged(link, done) {
                    return e;
                }
            }
            r = work.changed(), if idle && room && !stalled => if r.is_err() {
                return Ended::Stopped;
            },
            e = events.recv() => match e {
                None | Some(Event::Disconnected) | Some(Event::Closed) => {
                    return Ended::Unreachable("disconnected from the NATS server".into());
                }
                Some(Event::LameDuckMode) => {
                    return Ended::Unreachable("the NATS server is shutting down (lame duck mode)".into());
                }
                Some(Event::ServerError(e)) => {
                    tracing::warn!(error = %e, "NATS server error");
                }
                Some(other) => tracing::debug!(event = %other, "NATS event"),
            },
            e = &mut c2d_run => return e,
            _ = stop.wait_for(|s| *s) => {
                // What is in flight returns to the outbox; sent again at the
                // next start, the stream drops what it already has.
                return Ended::Stopped;
            }
        }
    }
}

/// Leases up to `room` messages and publishes them. `Ok(None)`: the outbox
/// had nothing to send.
async fn send_batch(
    link: &Ctx,
    js: &async_nats::jetstream::Context,
    room: usize,
    pending: &mut FuturesOrdered<InFlight>,
    sent_at: &mut VecDeque<tokio::time::Instant>,
) -> Result<Option<u64>, Ended> {
    let n = &link.config.nats;
    let leased = match link.outbox.lease(room.min(link.config.batch_messages)) {
        Ok(Some(l)) => l,
        Ok(None) => return Ok(None),
        Err(e) => return Err(Ended::Refused(format!("outbox: {e}"))),
    };
    let lane = leased.lane;
    let now = link.outbox.clock_ms();
    let wall = holdfast_model::unix_ms();
    let prefix = subject::prefix(&n.subject_prefix, &link.node_id, lane);
    let mut aside = Vec::new();
    let mut batch = Vec::with_capacity(leased.items.len());
    let mut bytes = 0u64;
    for item in &leased.items {
        let r = &item.record;
        let left = r.ttl_ms.saturating_sub(now.saturating_sub(r.enqueued_clock_ms));
        if left == 0 {
            aside.push((item.id, Reason::Expired, "expired".to_string()));
            continue;
        }
        let msg = &r.message;
        let topic = msg.topic.strip_prefix(n.strip_prefix.as_str()).unwrap_or(&msg.topic);
        let subject = subject::subject_of(&prefix, topic);
        if subject.len() > MAX_SUBJECT {
            // The server would drop the connection over it, again at every resend.
            link.metrics
                .link_refused
                .get_or_create(&ReasonLabels {
                    reason: "subject-too-long",
                })
                .inc();
            aside.push((item.id, Reason::UpstreamRefused, "subject-too-long".to_string()));
            continue;
        }
        let id = origin_id(item).to_string();
        let mut h = HeaderMap::new();
        for (k, v) in &msg.properties {
            h.append(subject::header_name(k), subject::header_value(v));
        }
        if let Some(ct) = &msg.content_type {
            h.insert("Content-Type", subject::header_value(ct));
        }
        h.insert(PROP_ID, id.as_str());
        h.insert(PROP_PATH, subject::header_value(&path_of(msg)));
        h.insert(HEADER_LANE, lane.to_string());
        h.insert(HEADER_TOPIC, subject::header_value(&msg.topic));
        h.insert(HEADER_EXPIRES, wall.saturating_add(left).to_string());
        bytes += (subject.len() + msg.payload.len()) as u64;
        let publish = PublishMessage::build()
            .payload(msg.payload.clone())
            .headers(h)
            .message_id(&id)
            .expected_stream(&n.stream);
        let started = trace::tracer().and_then(|t| {
            trace::TraceContext::of(&msg.properties)
                .filter(|c| c.sampled())
                .map(|c| trace::Started::new(t, c, false))
        });
        batch.push((item.id, subject, publish, started));
    }
    if !aside.is_empty() {
        link.outbox.set_aside(aside);
    }
    let waited = link.rate.take(usize::from(lane), bytes).await;
    if !waited.is_zero() {
        link.metrics.link_throttled_seconds.inc_by(waited.as_secs_f64());
    }
    link.metrics.link_batch_bytes.inc_by(bytes);
    link.metrics.link_wire_bytes.inc_by(bytes);
    let mut sent = 0u64;
    let mut too_large = Vec::new();
    for (id, subject, publish, started) in batch {
        match js.send_publish(subject, publish).await {
            Ok(ack) => {
                pending.push_back(in_flight(id, started, ack));
                sent_at.push_back(tokio::time::Instant::now());
                sent += 1;
            }
            Err(e) if e.kind() == PublishErrorKind::MaxPayloadExceeded => {
                link.metrics
                    .link_refused
                    .get_or_create(&ReasonLabels {
                        reason: "too-large-for-server",
                    })
                    .inc();
                tracing::warn!(%id, "JetStream: message larger than the server's max_payload; dead-lettered");
                too_large.push((id, Reason::UpstreamRefused, "too-large-for-server".to_string()));
            }
            Err(e) => {
                if !too_large.is_empty() {
                    link.outbox.set_aside(too_large);
                }
                count_sent(link, sent);
                return Err(Ended::Unreachable(format!("publish: {e}")));
            }
        }
    }
    if !too_large.is_empty() {
        link.outbox.set_aside(too_large);
    }
    count_sent(link, sent);
    Ok(Some(sent))
}

fn count_sent(link: &Ctx, sent: u64) {
    if sent > 0 {
        link.metrics.link_sent.inc_by(sent);
        link.status.update(|s| s.sent += sent);
    }
}

fn in_flight(id: MessageId, started: Option<trace::Started>, ack: PublishAckFuture) -> InFlight {
    Box::pin(async move { (id, started, ack.await) })
}

/// Takes acknowledgements in order; `Some` ends the connection (what was
/// not acknowledged is sent again).
fn acknowledged(link: &Ctx, done: Vec<Acked>) -> Option<Ended> {
    let mut acked = Vec::with_capacity(done.len());
    let mut refused = Vec::new();
    let mut ended = None;
    let mut duplicates = 0u64;
    for (id, started, r) in done {
        if let (Some(span), Some(t)) = (started, trace::tracer()) {
            let error = r.as_ref().err().map(ToString::to_string);
            let target = link.status.snapshot().target;
            trace::finish_send(t, span, id, "nats", target, error);
        }
        if ended.is_some() {
            continue;
        }
        match r {
            Ok(ack) => {
                duplicates += u64::from(ack.duplicate);
                acked.push(id);
            }
            Err(e) => match refused_for_good(&e) {
                Some(reason) => {
                    link.metrics.link_refused.get_or_create(&ReasonLabels { reason }).inc();
                    tracing::warn!(%id, error = %e, "JetStream refused a message; dead-lettered");
                    refused.push((id, Reason::UpstreamRefused, format!("{reason}: {e}")));
                }
                None => {
                    ended = Some(match e.kind() {
                        PublishErrorKind::TimedOut | PublishErrorKind::BrokenPipe => {
                            Ended::Unreachable(format!("publish acknowledgement: {e}"))
                        }
                        _ => Ended::Refused(format!("publish refused: {e}")),
                    });
                }
            },
        }
    }
    if !refused.is_empty() {
        link.outbox.set_aside(refused);
    }
    if duplicates > 0 {
        link.metrics.link_duplicates.inc_by(duplicates);
    }
    if !acked.is_empty() {
        let n = acked.len() as u64;
        link.outbox.ack_detached(&acked);
        link.metrics.link_acked.inc_by(n);
        link.status.update(|s| s.acked += n);
    }
    ended
}

/// The reason label when JetStream refuses a message for good (it would
/// never be stored); `None` for what may pass later (no leader, a full
/// stream, a timeout).
fn refused_for_good(e: &PublishError) -> Option<&'static str> {
    use async_nats::jetstream::ErrorCode;
    let code = std::error::Error::source(e)
        .and_then(|s| s.downcast_ref::<async_nats::jetstream::Error>())
        .map(async_nats::jetstream::Error::error_code)?;
    if code == ErrorCode::STREAM_MESSAGE_EXCEEDS_MAXIMUM || code == ErrorCode::STREAM_HEADER_EXCEEDS_MAXIMUM {
        Some("too-large-for-stream")
    } else {
        None
    }
}
