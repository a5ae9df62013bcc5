//! What a connected client sends: PUBLISH (authorized, routed, acknowledged once durable), SUBSCRIBE, UNSUBSCRIBE.

#[allow(unused_imports)]
use super::*;

impl<S: AsyncRead + AsyncWrite + Send + Unpin + 'static> Conn<S> {
    /// Decodes and handles every whole packet in the read buffer.
    pub(crate) fn process(&mut self, session: &Arc<Session>) -> Option<Exit> {
        // Stops early when a publish asked for backpressure; the rest waits.
        while self.paused_until.is_none() {
            let max = self.broker.config.max_packet_size as usize;
            match decode(&mut self.rbuf, Some(self.version), max) {
                Ok(None) => return None,
                Ok(Some(p)) => {
                    if let Some(exit) = self.handle(session, p) {
                        return Some(exit);
                    }
                }
                Err(e) => {
                    self.bad_packet(&e);
                    return Some(Exit::Error(e.reason_code(), e.kind()));
                }
            }
        }
        None
    }

    pub(crate) fn handle(&mut self, session: &Arc<Session>, packet: Packet) -> Option<Exit> {
        match packet {
            Packet::Publish(p) => return self.on_publish(session, p),
            Packet::PubAck(a) => {
                let done = session.lock().take_inflight(a.pkid);
                if let Some(i) = done {
                    self.broker.del_queued(session, i.out.seq);
                    i.out.settle(if a.code < 0x80 {
                        Delivery::Delivered
                    } else {
                        Delivery::Refused(a.code)
                    });
                }
            }
            Packet::PubRec(a) => {
                let mut st = session.lock();
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
                        self.send(&Packet::PubRel(rel));
                    }
                    Some(out) if a.code >= 0x80 => {
                        // The client refused it: the flow ends here.
                        st.take_inflight(a.pkid);
                        drop(st);
                        self.broker.del_queued(session, out.seq);
                        out.settle(Delivery::Refused(a.code));
                    }
                    Some(out) => {
                        drop(st);
                        self.broker.put_released(session, &out, a.pkid);
                        self.send(&Packet::PubRel(Ack::new(a.pkid)));
                    }
                }
            }
            Packet::PubComp(a) => {
                let done = session.lock().take_inflight(a.pkid);
                if let Some(i) = done {
                    self.broker.del_queued(session, i.out.seq);
                    i.out.settle(Delivery::Delivered);
                }
            }
            Packet::PubRel(a) => {
                let known = session.lock().incoming_qos2.remove(&a.pkid);
                let mut comp = Ack::new(a.pkid);
                if !known {
                    comp.code = reason::PACKET_ID_NOT_FOUND;
                }
                self.send(&Packet::PubComp(comp));
            }
            Packet::Subscribe(s) => return self.on_subscribe(session, s),
            Packet::Unsubscribe(u) => self.on_unsubscribe(session, u),
            Packet::PingReq => self.send(&Packet::PingResp),
            Packet::Disconnect(d) => {
                if let Some(e) = d.properties.session_expiry_interval {
                    let mut st = session.lock();
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
                self.bad_packet(&e);
                return Some(Exit::Error(reason::PROTOCOL_ERROR, "protocol-error"));
            }
            Packet::Auth(_) => {
                let e = DecodeError::Protocol("AUTH without enhanced authentication");
                self.bad_packet(&e);
                return Some(Exit::Error(reason::PROTOCOL_ERROR, "protocol-error"));
            }
        }
        None
    }

    pub(crate) fn on_publish(&mut self, session: &Arc<Session>, mut p: Publish) -> Option<Exit> {
        let broker = self.broker.clone();
        broker.counters.received[p.qos as usize].inc();
        let v5 = self.version.is_v5();
        if p.qos != QoS::AtMostOnce {
            let in_flight = self.pending.len() + session.lock().incoming_qos2.len();
            if v5 && in_flight >= usize::from(broker.config.max_inflight) {
                broker.deny_reason("receive-maximum");
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
            broker.deny_reason("topic-invalid");
            return Some(Exit::Error(reason::TOPIC_NAME_INVALID, "topic-name-invalid"));
        }
        if p.qos == QoS::ExactlyOnce {
            if session.lock().incoming_qos2.contains(&p.pkid) {
                // A resend of one already stored: acknowledge again, once.
                self.send(&Packet::PubRec(Ack::new(p.pkid)));
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
            broker.deny_reason("publish-not-authorized");
            self.ack_now(p.pkid, p.qos, if v5 { reason::NOT_AUTHORIZED } else { 0 });
            return None;
        }
        let principal = self.principal.as_ref().map(|p| p.id.clone());
        if broker.dialect.is_request(&p.topic) {
            // Twin and method traffic is answered here, never routed.
            broker
                .dialect
                .device_request(&session.client_id, principal.as_deref(), &p.topic, &p.payload);
            self.ack_now(p.pkid, p.qos, reason::SUCCESS);
            return None;
        }
        let mut msg = received(
            p.topic,
            p.payload,
            p.qos,
            p.retain,
            &p.properties,
            session.client_id.clone(),
        );
        if let Err(e) = broker.dialect.annotate(&mut msg) {
            broker.deny_reason("bad-property-bag");
            tracing::debug!(client = %session.client_id, topic = %msg.topic, error = %e, "publish refused");
            self.ack_now(p.pkid, p.qos, if v5 { reason::PAYLOAD_FORMAT_INVALID } else { 0 });
            return None;
        }
        let msg = Arc::new(msg);
        let Routed {
            waits,
            refusal,
            backlog,
        } = broker.route(&msg, principal.as_deref());
        if backlog > BACKPRESSURE_DEPTH {
            self.paused_until = Some(Instant::now() + BACKPRESSURE_PAUSE);
        }
        if p.qos == QoS::AtMostOnce {
            return None;
        }
        let code = refusal.unwrap_or(reason::SUCCESS);
        if waits.is_empty() && self.pending.is_empty() {
            return self.acknowledge(session, p.pkid, p.qos, code);
        }
        self.pending.push_back(PendingAck {
            pkid: p.pkid,
            qos: p.qos,
            waits,
            code,
        });
        None
    }

    /// Acknowledges a received QoS 1/2 PUBLISH once it is stored.
    pub(crate) fn acknowledge(&mut self, session: &Arc<Session>, pkid: u16, qos: QoS, code: u8) -> Option<Exit> {
        if code >= 0x80 && !self.version.is_v5() {
            // MQTT 3.1.1 cannot refuse a PUBLISH; closing makes the client
            // keep it and try again later.
            self.broker.deny_reason("not-stored");
            return Some(Exit::Error(code, "not-stored"));
        }
        if qos == QoS::ExactlyOnce && code < 0x80 {
            session.lock().incoming_qos2.insert(pkid);
        }
        self.ack_now(pkid, qos, code);
        None
    }

    pub(crate) fn ack_now(&mut self, pkid: u16, qos: QoS, code: u8) {
        let ack = Ack {
            pkid,
            code,
            properties: Properties::default(),
        };
        match qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => self.send(&Packet::PubAck(ack)),
            QoS::ExactlyOnce => self.send(&Packet::PubRec(ack)),
        }
    }

    pub(crate) fn on_subscribe(&mut self, session: &Arc<Session>, s: Subscribe) -> Option<Exit> {
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
                broker.deny_reason("filter-invalid");
                codes.push(reason::TOPIC_FILTER_INVALID);
                continue;
            }
            if shared.is_some() && options.no_local {
                return Some(Exit::Error(reason::PROTOCOL_ERROR, "no-local-on-shared"));
            }
            let exists = session.lock().subs.contains_key(&filter);
            if !exists && session.lock().subs.len() >= cfg.max_subscriptions_per_client {
                broker.deny_reason("subscription-limit");
                codes.push(reason::QUOTA_EXCEEDED);
                continue;
            }
            let inner = match shared {
                Some(Ok((_, f))) => f,
                _ => filter.as_str(),
            };
            if !self.authorized(true, inner) {
                broker.deny_reason("subscribe-not-authorized");
                codes.push(reason::NOT_AUTHORIZED);
                continue;
            }
            broker.index_sub(session, &filter, options, id);
            session.lock().subs.insert(filter.clone(), SubRecord { options, id });
            changed = true;
            codes.push(options.qos as u8);
            let send_retained = shared.is_none()
                && match options.retain_handling {
                    0 => true,
                    1 => !exists,
                    _ => false,
                };
            if send_retained {
                for m in broker.retained_for(&filter) {
                    retained.push((m, options.qos, options.retain_as_published, id));
                }
            }
        }
        if changed {
            broker.save_session(session);
        }
        self.send(&Packet::SubAck(SubAck {
            pkid: s.pkid,
            codes,
            properties: Properties::default(),
        }));
        broker.dialect.client_ready(&session.client_id);
        for (m, qos, _rap, id) in retained {
            let out = Outgoing {
                qos: m.qos.min(qos),
                retain: true,
                sub_ids: id.into_iter().collect(),
                msg: m,
                seq: 0,
                receipt: None,
            };
            broker.enqueue(session, out);
        }
        None
    }

    pub(crate) fn on_unsubscribe(&mut self, session: &Arc<Session>, u: Unsubscribe) {
        let mut codes = Vec::with_capacity(u.filters.len());
        for f in &u.filters {
            let had = session.lock().subs.remove(f).is_some();
            if had {
                self.broker.unindex_sub(&session.client_id, f);
                codes.push(reason::SUCCESS);
            } else {
                codes.push(reason::NO_SUBSCRIPTION_EXISTED);
            }
        }
        self.broker.save_session(session);
        self.send(&Packet::UnsubAck(SubAck {
            pkid: u.pkid,
            codes,
            properties: Properties::default(),
        }));
    }

    /// Asks the auth plugin (or this connection's cache of its answers)
    /// whether the principal may publish (`subscribe` false) or subscribe.
    pub(crate) fn authorized(&mut self, subscribe: bool, topic: &str) -> bool {
        let policy = &self.broker.policy;
        let version = policy.auth_version();
        if self.authz_version.as_ref().is_none_or(|v| !Arc::ptr_eq(v, &version)) {
            // A different auth plugin answers now: forget the old answers.
            self.authz.iter_mut().for_each(HashMap::clear);
            self.authz_version = Some(version);
        }
        let cache = &mut self.authz[usize::from(subscribe)];
        if let Some(&allowed) = cache.get(topic) {
            return allowed;
        }
        let Some(principal) = &self.principal else {
            return false;
        };
        let op = if subscribe {
            Operation::Subscribe
        } else {
            Operation::Publish
        };
        let answer = policy.authorize(principal, op, topic);
        let allowed = match &answer.decision {
            AuthzDecision::Allow => true,
            AuthzDecision::Deny(why) => {
                tracing::debug!(principal = %principal.id, topic, why = %why, subscribe, "denied by the auth plugin");
                false
            }
        };
        if answer.cacheable {
            if cache.len() >= AUTHZ_CACHE {
                cache.clear();
            }
            cache.insert(topic.to_string(), allowed);
        }
        allowed
    }
}
