//! The MQTT bridge: drains the outbox to any MQTT broker (Mosquitto, EMQX,
//! HiveMQ, a cloud hub), and optionally brings remote topics down to local
//! subscribers.
//!
//! Messages go out as QoS 1 PUBLISH packets with an in-flight window of
//! `upstream.mqtt.inflight`, capped by the receive maximum the broker
//! announces (MQTT 5). A message is deleted from the outbox only when its
//! PUBACK arrives; after a reconnect everything unacknowledged is sent
//! again, in order. MQTT 5 publishes carry the message's id and path as the
//! user properties `holdfast-id` and `holdfast-path`, and what remains of its
//! time-to-live as the message expiry interval.
//!
//! The client is built on the `holdfast-mqtt` codec so that every PUBACK can
//! be matched to the outbox message it acknowledges.

use holdfast_model::trace;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use holdfast_mqtt::{Ack, Connect, Packet, Properties, Publish, QoS, SubOptions, Subscribe, Version};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;

use super::reconnect::{Ended, Probe, Upstream, drive, within};
use super::{Ctx, LinkError, PROP_ID, PROP_PATH, origin_id, path_of};
use crate::config::{BridgeConfig, BridgeProtocol, Sections};
use holdfast_metrics::{ReasonLabels, ResultLabels};
use holdfast_model::ports::{BoxFuture, LocalDelivery, LocalMessage, ReplyProperties};
use holdfast_model::{Message, Source};
use holdfast_outbox::MessageId;
use holdfast_outbox::dead_letter::Reason;

/// Largest packet accepted from the broker.
const MAX_INBOUND: usize = 16 << 20;

/// The bridge as [`drive`] runs it.
pub struct Bridge {
    /// What every upstream needs.
    pub link: Ctx,
    /// Local delivery for `in` mappings.
    pub local: Option<Arc<dyn LocalDelivery>>,
    /// TLS, when configured.
    pub tls: Option<tokio_rustls::TlsConnector>,
}

/// Builds the TLS connector of the bridge, if `tls = true`.
///
/// # Errors
/// Unusable certificates or keys, or a bad server name.
pub fn tls_connector(config: Sections<'_>) -> Result<Option<tokio_rustls::TlsConnector>, LinkError> {
    let b = &config.upstream.mqtt;
    if !b.tls {
        return Ok(None);
    }
    let Some(ca) = b.ca.as_ref().or(config.fleet.ca.as_ref()) else {
        return Err(LinkError::Tls("upstream.mqtt.ca is required with tls = true".into()));
    };
    let tls = super::client_tls(ca, b.cert.as_deref(), b.key.as_deref())?;
    // Every server's name must be usable before the first attempt.
    for target in b.targets() {
        server_name(b, &target)?;
    }
    Ok(Some(tokio_rustls::TlsConnector::from(Arc::new(tls))))
}

/// The name expected in the certificate of the broker at `target`
/// (`host:port`): `server_name`, else its host.
fn server_name(b: &BridgeConfig, target: &str) -> Result<rustls::pki_types::ServerName<'static>, LinkError> {
    let name = b.server_name.clone().unwrap_or_else(|| host_of(target).to_string());
    rustls::pki_types::ServerName::try_from(name.clone())
        .map_err(|_| LinkError::Tls(format!("{name:?} is not a valid TLS server name")))
}

/// The host of `host:port` (`[v6]:port` without its brackets).
pub(crate) fn host_of(target: &str) -> &str {
    let host = target.rsplit_once(':').map_or(target, |(h, _)| h);
    host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host)
}

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// Maps a local topic to the broker's namespace.
pub fn map_out(b: &BridgeConfig, topic: &str) -> String {
    let rest = topic.strip_prefix(b.strip_prefix.as_str()).unwrap_or(topic);
    format!("{}{}", b.add_prefix, rest)
}

impl Upstream for Bridge {
    type Session = Session;

    fn ctx(&self) -> &Ctx {
        &self.link
    }

    fn targets(&self) -> Vec<String> {
        self.link.config.mqtt.targets()
    }

    fn failback(&self) -> bool {
        !self.link.config.mqtt.round_robin
    }

    fn probe(&self) -> Probe {
        Probe::Tcp
    }

    async fn connect(&self, target: &str, addr: SocketAddr) -> Result<Session, Ended> {
        connect(self, target, addr).await
    }

    async fn serve(&self, session: Session, stop: &mut watch::Receiver<bool>) -> Ended {
        session.run(self, stop).await
    }
}

/// Runs the bridge until `stop`.
pub async fn run(bridge: Bridge, mut stop: watch::Receiver<bool>) {
    drive(&bridge, &mut stop).await;
}

async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

pub(crate) struct Session {
    stream: Box<dyn Stream>,
    version: Version,
    window: usize,
    max_packet: usize,
    rbuf: BytesMut,
}

async fn connect(ctx: &Bridge, target: &str, addr: SocketAddr) -> Result<Session, Ended> {
    let m = &ctx.link.metrics;
    let result = |r: &'static str| {
        m.link_connects.get_or_create(&ResultLabels { result: r }).inc();
    };
    let b = &ctx.link.config.mqtt;
    let timeout = Duration::from_millis(ctx.link.config.connect_timeout_ms);
    let no_answer = || format!("no answer from {addr}");
    let tcp = match within(timeout, &result, no_answer, tokio::net::TcpStream::connect(addr)).await? {
        Ok(s) => s,
        Err(e) => {
            result("unreachable");
            return Err(Ended::Unreachable(format!("cannot connect to {addr}: {e}")));
        }
    };
    let _ = tcp.set_nodelay(true);
    let mut stream: Box<dyn Stream> = match &ctx.tls {
        None => Box::new(tcp),
        Some(connector) => {
            let name = match server_name(b, target) {
                Ok(n) => n,
                Err(e) => {
                    result("tls");
                    return Err(Ended::Refused(e.to_string()));
                }
            };
            let timed_out = || "TLS handshake timed out".to_string();
            match within(timeout, &result, timed_out, connector.connect(name, tcp)).await? {
                Ok(s) => Box::new(s),
                Err(e) => {
                    result("tls");
                    return Err(Ended::Refused(format!("TLS: {e}")));
                }
            }
        }
    };
    let version = match b.protocol {
        BridgeProtocol::V311 => Version::V311,
        BridgeProtocol::V5 => Version::V5,
    };
    let mut properties = Properties::default();
    if version.is_v5() {
        properties.receive_maximum = Some(b.inflight.max(1));
        properties.maximum_packet_size = Some(MAX_INBOUND as u32);
        if !b.clean_start {
            properties.session_expiry_interval = Some(604_800);
        }
    }
    let connect = Connect {
        version,
        client_id: b.client_id.clone().unwrap_or_else(|| ctx.link.node_id.clone()),
        clean_start: b.clean_start,
        keep_alive: b.keep_alive_seconds,
        username: b.username.clone(),
        password: b.password.clone().map(Bytes::from),
        will: None,
        properties,
    };
    let mut out = BytesMut::new();
    holdfast_mqtt::encode(&Packet::Connect(Box::new(connect)), version, &mut out);
    if let Err(e) = stream.write_all(&out).await {
        result("unreachable");
        return Err(Ended::Unreachable(format!("CONNECT: {e}")));
    }
    let mut rbuf = BytesMut::with_capacity(8192);
    let connack = within(timeout, &result, || "no CONNACK".to_string(), async {
        loop {
            match holdfast_mqtt::decode(&mut rbuf, Some(version), MAX_INBOUND) {
                Ok(Some(p)) => return Ok(p),
                Ok(None) => {}
                Err(e) => return Err(format!("bad packet from the broker: {e}")),
            }
            match stream.read_buf(&mut rbuf).await {
                Ok(0) => return Err("the broker closed the connection".to_string()),
                Ok(_) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
    })
    .await?;
    let ack = match connack {
        Ok(Packet::ConnAck(a)) => a,
        Ok(other) => {
            result("error");
            return Err(Ended::Refused(format!("expected CONNACK, got {other:?}")));
        }
        Err(e) => {
            result("error");
            return Err(Ended::Unreachable(e));
        }
    };
    if ack.code >= 0x80 {
        result("refused");
        tracing::error!(code = ack.code, "bridge: the broker refused the connection");
        return Err(Ended::Refused(format!(
            "the broker refused the connection (reason 0x{:02x})",
            ack.code
        )));
    }
    let window = usize::from(b.inflight)
        .min(usize::from(ack.properties.receive_maximum.unwrap_or(u16::MAX)))
        .min(ctx.link.config.window_messages.max(1));
    let max_packet = ack
        .properties
        .maximum_packet_size
        .map(|m| m as usize)
        .unwrap_or(268_435_460);
    let mut session = Session {
        stream,
        version,
        window,
        max_packet,
        rbuf,
    };
    if !b.inbound.is_empty() {
        let sub = Subscribe {
            pkid: 1,
            filters: b
                .inbound
                .iter()
                .map(|r| {
                    let qos = if r.qos == Some(0) {
                        QoS::AtMostOnce
                    } else {
                        QoS::AtLeastOnce
                    };
                    (
                        r.filter.clone(),
                        SubOptions {
                            qos,
                            ..SubOptions::default()
                        },
                    )
                })
                .collect(),
            properties: Properties::default(),
        };
        out.clear();
        holdfast_mqtt::encode(&Packet::Subscribe(sub), version, &mut out);
        if let Err(e) = session.stream.write_all(&out).await {
            result("unreachable");
            return Err(Ended::Unreachable(format!("SUBSCRIBE: {e}")));
        }
    }
    result("ok");
    tracing::info!(%target, %addr, window, "bridge up");
    ctx.link.status.update(|s| s.window = window);
    Ok(session)
}

impl Session {
    async fn run(mut self, ctx: &Bridge, stop: &mut watch::Receiver<bool>) -> Ended {
        let b = &ctx.link.config.mqtt;
        let mut work = ctx.link.outbox.watch_work();
        let mut inflight: HashMap<u16, MessageId> = HashMap::new();
        // Traced messages in flight: their send span, ended by the PUBACK.
        let mut traced: HashMap<u16, trace::Started> = HashMap::new();
        let mut next_pkid: u16 = 1;
        let mut out = BytesMut::with_capacity(64 << 10);
        let keep_alive = Duration::from_secs(u64::from(b.keep_alive_seconds.max(1)));
        let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + keep_alive, keep_alive);
        let mut last_heard = tokio::time::Instant::now();
        let mut idle = false;
        // The lane of the last batch, for the rate cap's priority.
        let mut lane = 0u8;
        loop {
            // Fill the window.
            out.clear();
            let room = self.window.saturating_sub(inflight.len());
            if room > 0 {
                work.borrow_and_update();
                let leased = match ctx.link.outbox.lease(room.min(ctx.link.config.batch_messages)) {
                    Ok(l) => l,
                    Err(e) => return Ended::Refused(format!("outbox: {e}")),
                };
                idle = leased.is_none();
                lane = leased.as_ref().map_or(lane, |l| l.lane);
                let now = ctx.link.outbox.clock_ms();
                let mut sent = 0u64;
                // Expired, or larger than the broker takes: to the dead-letter store.
                let mut aside = Vec::new();
                for item in leased.iter().flat_map(|l| l.items.iter()) {
                    let r = &item.record;
                    let left = r.ttl_ms.saturating_sub(now.saturating_sub(r.enqueued_clock_ms));
                    if left == 0 {
                        aside.push((item.id, Reason::Expired, "expired".to_string()));
                        continue;
                    }
                    let msg = &r.message;
                    while inflight.contains_key(&next_pkid) || next_pkid == 0 {
                        next_pkid = next_pkid.wrapping_add(1);
                    }
                    let mut p = Publish::new(map_out(b, &msg.topic), msg.payload.clone(), QoS::AtLeastOnce, next_pkid);
                    p.retain = msg.retain;
                    if self.version.is_v5() {
                        p.properties.content_type = msg.content_type.clone();
                        p.properties.user_properties = msg.properties.clone();
                        p.properties
                            .user_properties
                            .push((PROP_ID.into(), origin_id(item).to_string()));
                        p.properties.user_properties.push((PROP_PATH.into(), path_of(msg)));
                        p.properties.message_expiry_interval =
                            Some(left.div_ceil(1000).min(u64::from(u32::MAX)) as u32);
                    }
                    let before = out.len();
                    holdfast_mqtt::encode(&Packet::Publish(p), self.version, &mut out);
                    if out.len() - before > self.max_packet {
                        out.truncate(before);
                        ctx.link
                            .metrics
                            .link_refused
                            .get_or_create(&ReasonLabels {
                                reason: "too-large-for-broker",
                            })
                            .inc();
                        tracing::warn!(topic = %msg.topic, "bridge: message larger than the broker accepts; dead-lettered");
                        aside.push((item.id, Reason::UpstreamRefused, "too-large-for-broker".to_string()));
                        continue;
                    }
                    inflight.insert(next_pkid, item.id);
                    if let Some(t) = trace::tracer()
                        && let Some(c) = trace::TraceContext::of(&msg.properties).filter(|c| c.sampled())
                    {
                        traced.insert(next_pkid, trace::Started::new(t, c, false));
                    }
                    next_pkid = next_pkid.wrapping_add(1);
                    sent += 1;
                }
                if !aside.is_empty() {
                    ctx.link.outbox.set_aside(aside);
                }
                if sent > 0 {
                    ctx.link.metrics.link_sent.inc_by(sent);
                    ctx.link.status.update(|s| s.sent += sent);
                }
            }
            if !out.is_empty() {
                let waited = ctx.link.rate.take(usize::from(lane), out.len() as u64).await;
                if !waited.is_zero() {
                    ctx.link.metrics.link_throttled_seconds.inc_by(waited.as_secs_f64());
                }
                ctx.link.metrics.link_batch_bytes.inc_by(out.len() as u64);
                ctx.link.metrics.link_wire_bytes.inc_by(out.len() as u64);
                if let Err(e) = self.stream.write_all(&out).await {
                    return Ended::Unreachable(format!("write: {e}"));
                }
            }
            let can_send = inflight.len() < self.window;
            tokio::select! {
                r = self.stream.read_buf(&mut self.rbuf) => match r {
                    Ok(0) => return Ended::Unreachable("the broker closed the connection".into()),
                    Ok(_) => {
                        last_heard = tokio::time::Instant::now();
                        if let Some(e) = self.handle_input(ctx, &mut inflight, &mut traced).await {
                            return e;
                        }
                    }
                    Err(e) => return Ended::Unreachable(format!("read: {e}")),
                },
                r = work.changed(), if can_send && idle => if r.is_err() {
                    return Ended::Stopped;
                },
                _ = ping.tick() => {
                    if last_heard.elapsed() > keep_alive * 3 / 2 + keep_alive {
                        return Ended::Unreachable("the broker stopped answering (keep-alive)".into());
                    }
                    out.clear();
                    holdfast_mqtt::encode(&Packet::PingReq, self.version, &mut out);
                    if let Err(e) = self.stream.write_all(&out).await {
                        return Ended::Unreachable(format!("write: {e}"));
                    }
                }
                _ = stopped(stop) => {
                    out.clear();
                    holdfast_mqtt::encode(&Packet::Disconnect(Default::default()), self.version, &mut out);
                    let _ = self.stream.write_all(&out).await;
                    let _ = self.stream.shutdown().await;
                    return Ended::Stopped;
                }
            }
        }
    }

    /// Handles what the broker sent; `Some` ends the session.
    async fn handle_input(
        &mut self,
        ctx: &Bridge,
        inflight: &mut HashMap<u16, MessageId>,
        traced: &mut HashMap<u16, trace::Started>,
    ) -> Option<Ended> {
        let mut acked = Vec::new();
        let mut refused = Vec::new();
        let mut replies = BytesMut::new();
        let result = loop {
            let packet = match holdfast_mqtt::decode(&mut self.rbuf, Some(self.version), MAX_INBOUND) {
                Ok(Some(p)) => p,
                Ok(None) => break None,
                Err(e) => break Some(Ended::Unreachable(format!("bad packet from the broker: {e}"))),
            };
            match packet {
                Packet::PubAck(a) => {
                    let Some(id) = inflight.remove(&a.pkid) else { continue };
                    if let (Some(span), Some(t)) = (traced.remove(&a.pkid), trace::tracer()) {
                        let error = (a.code >= 0x80).then(|| format!("PUBACK 0x{:02x}", a.code));
                        let target = ctx.link.status.snapshot().target;
                        trace::finish_send(t, span, id, "holdfast.broker", target, error);
                    }
                    match a.code {
                        c if c < 0x80 => acked.push(id),
                        0x97 => {
                            // Quota exceeded: keep it, and try again later.
                            break Some(Ended::Refused("the broker's quota is exceeded".into()));
                        }
                        c => {
                            // Refused for good (not authorized, bad topic...): it would never pass.
                            tracing::warn!(code = c, "bridge: the broker refused a message; dead-lettered");
                            ctx.link
                                .metrics
                                .link_refused
                                .get_or_create(&ReasonLabels {
                                    reason: "broker-refused",
                                })
                                .inc();
                            refused.push((id, Reason::UpstreamRefused, format!("broker-refused:0x{c:02x}")));
                        }
                    }
                }
                Packet::Publish(p) => {
                    // Acknowledged once stored where it must be (a message
                    // for a device: in its durable queue).
                    let mut ack = Ack::new(p.pkid);
                    if let Some(stored) = self.deliver_in(ctx, &p)
                        && let Err(code) = stored.await
                    {
                        tracing::warn!(topic = %p.topic, code, "bridge: an `in` message for a device was not queued");
                        ctx.link
                            .metrics
                            .link_refused
                            .get_or_create(&ReasonLabels {
                                reason: "in-not-queued",
                            })
                            .inc();
                        // MQTT 3.1.1 cannot refuse: acknowledged, counted.
                        if self.version.is_v5() {
                            ack.code = code;
                        }
                    }
                    if p.qos == QoS::AtLeastOnce {
                        holdfast_mqtt::encode(&Packet::PubAck(ack), self.version, &mut replies);
                    } else if p.qos == QoS::ExactlyOnce {
                        holdfast_mqtt::encode(&Packet::PubRec(ack), self.version, &mut replies);
                    }
                }
                Packet::PubRel(a) => {
                    holdfast_mqtt::encode(&Packet::PubComp(Ack::new(a.pkid)), self.version, &mut replies);
                }
                Packet::SubAck(s) => {
                    if s.codes.iter().any(|c| *c >= 0x80) {
                        tracing::warn!(codes = ?s.codes, "bridge: the broker refused an `in` subscription");
                    }
                }
                Packet::PingResp => {}
                Packet::Disconnect(d) => {
                    break Some(Ended::Refused(format!(
                        "the broker disconnected the bridge (reason 0x{:02x})",
                        d.code
                    )));
                }
                other => {
                    tracing::debug!(packet = ?other, "bridge: ignoring an unexpected packet");
                }
            }
        };
        if !refused.is_empty() {
            ctx.link.outbox.set_aside(refused);
        }
        if !acked.is_empty() {
            let n = acked.len() as u64;
            ctx.link.outbox.ack_detached(&acked);
            ctx.link.metrics.link_acked.inc_by(n);
            ctx.link.status.update(|s| s.acked += n);
        }
        if !replies.is_empty()
            && let Err(e) = self.stream.write_all(&replies).await
        {
            return Some(Ended::Unreachable(format!("write: {e}")));
        }
        result
    }

    /// An `in` mapping's message, delivered to local subscribers (one for a
    /// device or module goes through its durable queue); what it returns
    /// resolves once it is stored.
    fn deliver_in(&self, ctx: &Bridge, p: &Publish) -> Option<BoxFuture<'static, Result<usize, u8>>> {
        let b = &ctx.link.config.mqtt;
        let rule = b
            .inbound
            .iter()
            .find(|r| holdfast_mqtt::topic::matches(&r.filter, &p.topic))?;
        let rest = p.topic.strip_prefix(rule.strip_prefix.as_str()).unwrap_or(&p.topic);
        let topic = format!("{}{}", rule.add_prefix, rest);
        if !holdfast_mqtt::topic::valid_name(&topic) {
            ctx.link
                .metrics
                .link_refused
                .get_or_create(&ReasonLabels { reason: "bad-in-topic" })
                .inc();
            return None;
        }
        let local = ctx.local.as_ref()?;
        let p2 = &p.properties;
        let expires_at_ms = p2
            .message_expiry_interval
            .map(|s| holdfast_model::unix_ms() + u64::from(s) * 1000);
        let stored = local.deliver_stored(LocalMessage {
            message: Message {
                topic,
                payload: p.payload.clone(),
                qos: p.qos.min(QoS::AtLeastOnce) as u8,
                retain: p.retain,
                content_type: p2.content_type.clone(),
                properties: p2.user_properties.clone(),
                source: Source::default(),
                origin: None,
                delivered_locally: false,
            },
            expires_at_ms,
            publisher: None,
            reply: ReplyProperties {
                payload_format_indicator: p2.payload_format_indicator,
                response_topic: p2.response_topic.clone(),
                correlation_data: p2.correlation_data.clone(),
            },
        });
        ctx.link
            .metrics
            .link_root
            .get_or_create(&ResultLabels { result: "bridged-in" })
            .inc();
        Some(stored)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_are_mapped_by_prefix() {
        let b = BridgeConfig {
            strip_prefix: "site/".into(),
            add_prefix: "fleet/gw1/".into(),
            ..BridgeConfig::default()
        };
        assert_eq!(map_out(&b, "site/line1/temp"), "fleet/gw1/line1/temp");
        assert_eq!(map_out(&b, "other/x"), "fleet/gw1/other/x");
        assert_eq!(map_out(&BridgeConfig::default(), "a/b"), "a/b");
    }
}
