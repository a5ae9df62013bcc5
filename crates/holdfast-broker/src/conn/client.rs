//! One client's protocol once its CONNECT is accepted, without the socket:
//! packets it sends come in (PUBLISH authorized, routed and acknowledged
//! once durable; SUBSCRIBE, UNSUBSCRIBE, the QoS 1/2 flows, DISCONNECT),
//! and what goes back is encoded into its [`Outbound`].

use std::collections::VecDeque;
use std::future::poll_fn;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::BytesMut;
use holdfast_model::policy::Principal;
use holdfast_mqtt::{
    Ack, DecodeError, Packet, Properties, Publish, QoS, SubAck, Subscribe, Unsubscribe, Version, decode, reason, topic,
};
use tokio::time::{Duration, Instant};

use super::acks::PendingAck;
use super::authz::Authz;
use super::outbound::Outbound;
use super::{Exit, bad_packet};
use crate::session::{Delivery, Msg, Outgoing, Session, SubRecord};
use crate::{Broker, Routed};

/// A publisher whose message lands in a connected subscriber's queue deeper
/// than this pauses reading for [`BACKPRESSURE_PAUSE`], so a fast publisher
/// cannot outrun a slow subscriber into ever-growing queues.
const BACKPRESSURE_DEPTH: usize = 256;
const BACKPRESSURE_PAUSE: Duration = Duration::from_millis(1);

/// An accepted client: its session, principal and per-connection state.
pub(super) struct Client {
    broker: Arc<Broker>,
    pub(super) session: Arc<Session>,
    pub(super) principal: Principal,
    pub(super) version: Version,
    /// For logs.
    peer: SocketAddr,
    /// What goes back to it.
    pub(super) outbound: Outbound,
    /// Received QoS 1/2 PUBLISHes waiting for their appends, in order.
    pub(super) pending: VecDeque<PendingAck>,
    /// Topic aliases it set, grown on use.
    aliases: Vec<Option<String>>,
    authz: Authz,
    /// Reading is paused until then (backpressure from slow subscribers).
    pub(super) paused_until: Option<Instant>,
}

/// What a [`Client`] starts with, from its CONNECT.
pub(super) struct Accepted {
    pub(super) session: Arc<Session>,
    pub(super) principal: Principal,
    pub(super) version: Version,
    pub(super) peer: SocketAddr,
    pub(super) outbound: Outbound,
    /// The answers the will's authorization cached.
    pub(super) authz: Authz,
}

impl Client {
    /// The client of an accepted CONNECT.
    pub(super) fn new(broker: Arc<Broker>, a: Accepted) -> Client {
        Client {
            broker,
            session: a.session,
            principal: a.principal,
            version: a.version,
            peer: a.peer,
            outbound: a.outbound,
            pending: VecDeque::new(),
            aliases: Vec::new(),
            authz: a.authz,
            paused_until: None,
        }
    }

    /// Whether reading should go on: not paused, and not too many
    /// acknowledgements waiting.
    pub(super) fn reading(&self) -> bool {
        self.paused_until.is_none() && self.pending.len() < usize::from(self.broker.config().max_inflight) * 4
    }

    /// Decodes and handles every whole packet in the read buffer.
    pub(super) fn process(&mut self, rbuf: &mut BytesMut) -> Option<Exit> {
        // Stops early when a publish asked for backpressure; the rest waits.
        while self.paused_until.is_none() {
            let max = self.broker.config.max_packet_size as usize;
            match decode(rbuf, Some(self.version), max) {
                Ok(None) => return None,
                Ok(Some(p)) => {
                    if let Some(exit) = self.handle(p) {
                        return Some(exit);
                    }
                }
                Err(e) => {
                    bad_packet(&self.broker, self.peer, &e);
                    return Some(Exit::Error(e.reason_code(), e.kind()));
                }
            }
        }
        None
    }

    pub(super) fn handle(&mut self, packet: Packet) -> Option<Exit> {
        match packet {
            Packet::Publish(p) => return self.on_publish(p),
            Packet::PubAck(a) => {
                let done = self.session.lock().take_inflight(a.pkid);
                if let Some(i) = done {
                    self.broker.sessions.del_queued(&self.session, i.out.seq);
                    i.out.settle(if a.code < 0x80 {
                        Delivery::Delivered
                    } else {
                        Delivery::Refused(a.code)
                    });
                }
            }
            Packet::PubRec(a) => {
                let mut st = self.session.lock();
                let found = st.inflight.iter_mut().find(|i| i.pkid == a.pkid).map(|i| {
                    if a.code < 0x80 {
                        i.released = true;
                    }
                    i.out.clone()
                });
                match found {
                    None => {
                        drop(st);
                        let mut rel = Ack::new(a.pkid);
                        rel.code = reason::PACKET_ID_NOT_FOUND;
                        self.outbound.send(&Packet::PubRel(rel));
                    }
                    Some(out) if a.code >= 0x80 => {
                        // The client refused it: the flow ends here.
                        st.take_inflight(a.pkid);
                        drop(st);
                        self.broker.sessions.del_queued(&self.session, out.seq);
                        out.settle(Delivery::Refused(a.code));
                    }
                    Some(out) => {
                        drop(st);
                        self.broker.sessions.put_released(&self.session, &out, a.pkid);
                        self.outbound.send(&Packet::PubRel(Ack::new(a.pkid)));
                    }
                }
            }
            Packet::PubComp(a) => {
                let done = self.session.lock().take_inflight(a.pkid);
                if let Some(i) = done {
                    self.broker.sessions.del_queued(&self.session, i.out.seq);
                    i.out.settle(Delivery::Delivered);
                }
            }
            Packet::PubRel(a) => {
                let known = self.session.lock().incoming_qos2.remove(&a.pkid);
                let mut comp = Ack::new(a.pkid);
                if !known {
                    comp.code = reason::PACKET_ID_NOT_FOUND;
                }
                self.outbound.send(&Packet::PubComp(comp));
            }
            Packet::Subscribe(s) => return self.on_subscribe(s),
            Packet::Unsubscribe(u) => self.on_unsubscribe(u),
            Packet::PingReq => self.outbound.send(&Packet::PingResp),
            Packet::Disconnect(d) => {
                if let Some(e) = d.properties.session_expiry_interval {
                    let mut st = self.session.lock();
                    if st.expiry_s == 0 && e > 0 {
                        drop(st);
                        return Some(Exit::Error(reason::PROTOCOL_ERROR, "protocol-error"));
                    }
                    st.expiry_s = e.min(self.broker.config.max_session_expiry_seconds);
                }
                return Some(if d.code == reason::DISCONNECT_WITH_WILL {
                    Exit::Unclean("disconnect-with-will")
                } else {
                    Exit::Clean
                });
            }
            Packet::Connect(_) | Packet::ConnAck(_) | Packet::SubAck(_) | Packet::UnsubAck(_) | Packet::PingResp => {
                let e = DecodeError::Protocol("a client sent a server-only packet");
                bad_packet(&self.broker, self.peer, &e);
                return Some(Exit::Error(reason::PROTOCOL_ERROR, "protocol-error"));
            }
            Packet::Auth(_) => {
                let e = DecodeError::Protocol("AUTH without enhanced authentication");
                bad_packet(&self.broker, self.peer, &e);
                return Some(Exit::Error(reason::PROTOCOL_ERROR, "protocol-error"));
            }
        }
        None
    }

    pub(super) fn on_publish(&mut self, mut p: Publish) -> Option<Exit> {
        let broker = self.broker.clone();
        broker.metrics.received(p.qos);
        let v5 = self.version.is_v5();
        if p.qos != QoS::AtMostOnce {
            let in_flight = self.pending.len() + self.session.lock().incoming_qos2.len();
            if v5 && in_flight >= usize::from(broker.config.max_inflight) {
                broker.metrics.denied("receive-maximum");
                return Some(Exit::Error(
                    reason::RECEIVE_MAXIMUM_EXCEEDED,
                    "receive-maximum-exceeded",
                ));
            }
        }
        if let Some(alias) = p.properties.topic_alias.take() {
            let slot = usize::from(alias);
            if alias == 0 || alias > broker.config.topic_alias_maximum {
                return Some(Exit::Error(reason::TOPIC_ALIAS_INVALID, "topic-alias-invalid"));
            }
            if self.aliases.len() < slot {
                // Grown on use, so connections without aliases pay nothing.
                self.aliases.resize(slot, None);
            }
            if p.topic.is_empty() {
                match &self.aliases[slot - 1] {
                    Some(t) => p.topic = t.clone(),
                    None => return Some(Exit::Error(reason::PROTOCOL_ERROR, "unknown-topic-alias")),
                }
            } else {
                self.aliases[slot - 1] = Some(p.topic.clone());
            }
        }
        if p.topic.len() > broker.config.max_topic_length || !topic::valid_name(&p.topic) {
            broker.metrics.denied("topic-invalid");
            return Some(Exit::Error(reason::TOPIC_NAME_INVALID, "topic-name-invalid"));
        }
        if p.qos == QoS::ExactlyOnce {
            if self.session.lock().incoming_qos2.contains(&p.pkid) {
                // A resend of one already stored: acknowledge again, once.
                self.outbound.send(&Packet::PubRec(Ack::new(p.pkid)));
                return None;
            }
            if self
                .pending
                .iter()
                .any(|a| a.pkid == p.pkid && a.qos == QoS::ExactlyOnce)
            {
                return None;
            }
        }
        if !self.authorized(false, &p.topic) {
            broker.metrics.denied("publish-not-authorized");
            self.outbound
                .ack(p.pkid, p.qos, if v5 { reason::NOT_AUTHORIZED } else { 0 });
            return None;
        }
        let principal = Some(self.principal.id.clone());
        if broker.dialect.is_request(&p.topic) {
            // Twin and method traffic is answered here, never routed.
            broker
                .dialect
                .device_request(&self.session.client_id, principal.as_deref(), &p.topic, &p.payload);
            self.outbound.ack(p.pkid, p.qos, reason::SUCCESS);
            return None;
        }
        let mut msg = Msg::received(
            p.topic,
            p.payload,
            p.qos,
            p.retain,
            &p.properties,
            self.session.client_id.clone(),
        );
        if let Err(e) = broker.dialect.annotate(&mut msg) {
            broker.metrics.denied("bad-property-bag");
            tracing::debug!(client = %self.session.client_id, topic = %msg.topic, error = %e, "publish refused");
            self.outbound
                .ack(p.pkid, p.qos, if v5 { reason::PAYLOAD_FORMAT_INVALID } else { 0 });
            return None;
        }
        let msg = Arc::new(msg);
        let Routed {
            waits,
            refusal,
            backlog,
            store_span,
        } = broker.router.route(&msg, principal.as_deref());
        if backlog > BACKPRESSURE_DEPTH {
            self.paused_until = Some(Instant::now() + BACKPRESSURE_PAUSE);
        }
        if p.qos == QoS::AtMostOnce {
            return None;
        }
        let code = refusal.unwrap_or(reason::SUCCESS);
        if waits.is_empty() && self.pending.is_empty() {
            return self.acknowledge(p.pkid, p.qos, code);
        }
        self.pending.push_back(PendingAck {
            pkid: p.pkid,
            qos: p.qos,
            waits,
            code,
            span: store_span,
        });
        None
    }

    /// Acknowledges a received QoS 1/2 PUBLISH once it is stored.
    pub(super) fn acknowledge(&mut self, pkid: u16, qos: QoS, code: u8) -> Option<Exit> {
        if code >= 0x80 && !self.version.is_v5() {
            // MQTT 3.1.1 cannot refuse a PUBLISH; closing makes the client
            // keep it and try again later.
            self.broker.metrics.denied("not-stored");
            return Some(Exit::Error(code, "not-stored"));
        }
        if qos == QoS::ExactlyOnce && code < 0x80 {
            self.session.lock().incoming_qos2.insert(pkid);
        }
        self.outbound.ack(pkid, qos, code);
        None
    }

    pub(super) fn on_subscribe(&mut self, s: Subscribe) -> Option<Exit> {
        let broker = self.broker.clone();
        let cfg = &broker.config;
        let id = s.properties.subscription_identifiers.first().copied();
        let mut codes = Vec::with_capacity(s.filters.len());
        let mut retained: Vec<(Arc<Msg>, QoS, bool, Option<u32>)> = Vec::new();
        let mut changed = false;
        for (filter, options) in s.filters {
            let shared = topic::parse_shared(&filter);
            let valid = filter.len() <= cfg.max_topic_length
                && match shared {
                    Some(Ok(_)) => true,
                    Some(Err(())) => false,
                    None => topic::valid_filter(&filter),
                };
            if !valid {
                broker.metrics.denied("filter-invalid");
                codes.push(reason::TOPIC_FILTER_INVALID);
                continue;
            }
            if shared.is_some() && options.no_local {
                return Some(Exit::Error(reason::PROTOCOL_ERROR, "no-local-on-shared"));
            }
            let exists = self.session.lock().subs.contains_key(&filter);
            if !exists && self.session.lock().subs.len() >= cfg.max_subscriptions_per_client {
                broker.metrics.denied("subscription-limit");
                codes.push(reason::QUOTA_EXCEEDED);
                continue;
            }
            let inner = match shared {
                Some(Ok((_, f))) => f,
                _ => filter.as_str(),
            };
            if !self.authorized(true, inner) {
                broker.metrics.denied("subscribe-not-authorized");
                codes.push(reason::NOT_AUTHORIZED);
                continue;
            }
            broker.subs.add(&self.session, &filter, options, id);
            self.session
                .lock()
                .subs
                .insert(filter.clone(), SubRecord { options, id });
            changed = true;
            codes.push(options.qos as u8);
            let send_retained = shared.is_none()
                && match options.retain_handling {
                    0 => true,
                    1 => !exists,
                    _ => false,
                };
            if send_retained {
                for m in broker.retained.matching(&filter) {
                    retained.push((m, options.qos, options.retain_as_published, id));
                }
            }
        }
        if changed {
            broker.sessions.save(&self.session);
        }
        self.outbound.send(&Packet::SubAck(SubAck {
            pkid: s.pkid,
            codes,
            properties: Properties::default(),
        }));
        broker.dialect.client_ready(&self.session.client_id);
        for (m, qos, _rap, id) in retained {
            let out = Outgoing {
                qos: m.qos.min(qos),
                retain: true,
                sub_ids: id.into_iter().collect(),
                msg: m,
                seq: 0,
                receipt: None,
            };
            broker.sessions.enqueue(&self.session, out);
        }
        None
    }

    pub(super) fn on_unsubscribe(&mut self, u: Unsubscribe) {
        let mut codes = Vec::with_capacity(u.filters.len());
        for f in &u.filters {
            let had = self.session.lock().subs.remove(f).is_some();
            if had {
                self.broker.subs.remove(&self.session.client_id, f);
                codes.push(reason::SUCCESS);
            } else {
                codes.push(reason::NO_SUBSCRIPTION_EXISTED);
            }
        }
        self.broker.sessions.save(&self.session);
        self.outbound.send(&Packet::UnsubAck(SubAck {
            pkid: u.pkid,
            codes,
            properties: Properties::default(),
        }));
    }

    /// Whether the principal may publish (`subscribe` false) or subscribe
    /// to `topic`.
    fn authorized(&mut self, subscribe: bool, topic: &str) -> bool {
        self.authz
            .allowed(&*self.broker.policy, &self.principal, subscribe, topic)
    }

    /// The acknowledgement at the front of `pending` is ready with `code`:
    /// it goes, and every one behind it that is ready too, in order, so
    /// they leave in one write.
    pub(super) fn acknowledge_ready(&mut self, code: u8) -> Option<Exit> {
        if let Some(p) = self.pending.pop_front()
            && let Some(exit) = self.acknowledge(p.pkid, p.qos, code)
        {
            return Some(exit);
        }
        while let Some(code) = self.pending.front_mut().and_then(PendingAck::try_ready) {
            if let Some(p) = self.pending.pop_front()
                && let Some(exit) = self.acknowledge(p.pkid, p.qos, code)
            {
                return Some(exit);
            }
        }
        None
    }

    /// On shutdown: waits (until `deadline`) for the appends this
    /// connection already handed to the outbox, and acknowledges them, so
    /// a client is not left to resend what was stored. The exit then sends
    /// DISCONNECT (0x8B, server shutting down).
    pub(super) async fn finish_in_flight(&mut self, deadline: Instant) -> Exit {
        while let Some(front) = self.pending.front_mut() {
            let Ok(code) = tokio::time::timeout_at(deadline, poll_fn(|cx| front.poll(cx))).await else {
                tracing::debug!(peer = %self.peer, unacknowledged = self.pending.len(), "shutdown: appends still waiting at the limit");
                break;
            };
            if let Some(p) = self.pending.pop_front()
                && let Some(exit) = self.acknowledge(p.pkid, p.qos, code)
            {
                return exit;
            }
        }
        Exit::Shutdown
    }
}
