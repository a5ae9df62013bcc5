//! Routing a received message through the policy, and delivering to sessions and retained messages.

#[allow(unused_imports)]
use super::*;

impl Broker {
    /// Routes a received message through the router plugin and acts on
    /// every action. `principal` is the authenticated identity.
    pub fn route(&self, msg: &Arc<Msg>, principal: Option<&str>) -> Routed {
        let pm = Arc::new(plugin_message(msg, principal));
        let outcome = self.policy.route(pm.clone());
        let mut routed = Routed::default();
        match outcome {
            RouteOutcome::Actions(actions) => {
                if actions.is_empty() {
                    self.drop_reason("no-route");
                }
                // A root delivers what reaches its outbox to local subscribers,
                // except what its router has delivered here already.
                let also_local = actions.iter().any(|a| matches!(a, Action::Local(_)));
                for action in actions {
                    match action {
                        Action::Upstream(u) => {
                            let m = if u.topic.is_some()
                                || u.payload.is_some()
                                || !u.add_properties.is_empty()
                                || also_local
                            {
                                let mut m = (*pm).clone();
                                m.delivered_locally = also_local;
                                if let Some(t) = u.topic {
                                    m.topic = t;
                                }
                                if let Some(p) = u.payload {
                                    m.payload = p.into();
                                }
                                m.properties.extend(u.add_properties);
                                Arc::new(m)
                            } else {
                                pm.clone()
                            };
                            let ttl = u.ttl_seconds.map(|s| Duration::from_secs(u64::from(s)));
                            match self.outbox.submit(u.lane, m, ttl) {
                                Ok(rx) => {
                                    self.counters.routed_upstream.inc();
                                    routed.waits.push(rx);
                                }
                                Err(e) => {
                                    tracing::debug!(error = %e, "outbox refused a message");
                                    routed.refusal = Some(e.mqtt_reason_code());
                                }
                            }
                        }
                        Action::Local(l) => {
                            let changed = l.topic.is_some() || l.payload.is_some() || !l.add_properties.is_empty();
                            let local = if changed {
                                let mut m = (**msg).clone();
                                if let Some(t) = l.topic {
                                    if !topic::valid_name(&t) || t.len() > self.config.max_topic_length {
                                        self.drop_reason("invalid-local-topic");
                                        continue;
                                    }
                                    m.topic = self.dialect.with_bag(t, &m.properties);
                                    if m.topic.len() > self.config.max_topic_length {
                                        self.drop_reason("invalid-local-topic");
                                        continue;
                                    }
                                }
                                if let Some(p) = l.payload.map(bytes::Bytes::from) {
                                    m.payload = p;
                                }
                                // What a plugin adds must still fit MQTT's wire limits.
                                let too_long = |s: &String| s.len() > usize::from(u16::MAX);
                                if m.payload.len() > self.config.max_packet_size as usize
                                    || l.add_properties.iter().any(|(k, v)| too_long(k) || too_long(v))
                                {
                                    self.drop_reason("invalid-local-message");
                                    continue;
                                }
                                m.properties.user_properties.extend(l.add_properties);
                                Arc::new(m)
                            } else {
                                msg.clone()
                            };
                            self.counters.routed_local.inc();
                            routed.backlog = routed.backlog.max(self.deliver(local));
                        }
                        Action::Drop(reason) => {
                            tracing::trace!(%reason, topic = %msg.topic, "router dropped a message");
                            self.drop_reason("router-drop");
                            self.count_router_drop(&reason);
                        }
                    }
                }
            }
            RouteOutcome::DeadLetter(reason) | RouteOutcome::Drop(reason) => {
                tracing::debug!(%reason, topic = %msg.topic, "router failed; message dropped");
                self.drop_reason("router-failure");
            }
        }
        routed
    }

    /// Delivers a message to this node's subscribers (and stores it if it is
    /// retained). Used for the router's `local` action, and by the upstream
    /// link for messages coming down. Returns the deepest queue of a
    /// connected subscriber after the delivery.
    pub fn deliver(&self, msg: Arc<Msg>) -> usize {
        if msg.topic.starts_with("devices/") && self.dialect.forward_down(&msg) {
            return 0;
        }
        if msg.retain {
            self.set_retained(&msg);
        }
        let matches = self
            .subs
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .matches(&msg.topic, msg.publisher.as_deref());
        let mut backlog = 0;
        for m in matches {
            let out = Outgoing {
                qos: msg.qos.min(m.qos),
                retain: msg.retain && m.retain_as_published,
                sub_ids: m.ids,
                msg: msg.clone(),
                seq: 0,
                receipt: None,
            };
            backlog = backlog.max(self.enqueue(&m.session, out));
        }
        backlog
    }

    /// Delivers `msg` to client `client_id` alone (twin and method
    /// traffic): only if it is connected and subscribed to a matching
    /// filter, at the highest QoS of those subscriptions.
    pub fn deliver_to_client(&self, client_id: &str, msg: Arc<Msg>) -> bool {
        let Some((session, qos)) = self.subscribed_client(client_id, &msg.topic) else {
            return false;
        };
        let out = Outgoing {
            qos: msg.qos.min(qos),
            retain: false,
            sub_ids: Vec::new(),
            msg,
            seq: 0,
            receipt: None,
        };
        self.enqueue(&session, out);
        true
    }

    /// Delivers `msg` to client `client_id` alone, as
    /// [`Broker::deliver_to_client`] does, and tells what became of it: the
    /// receiver gets [`Delivery::Delivered`](crate::session::Delivery) once
    /// the client acknowledged it (at QoS 0: once it was written to the
    /// connection), a refusal or "too large" when it cannot go, and is
    /// closed without a verdict when the client does not get it (its
    /// session ended first). The sender keeps the message durable: the
    /// session does not store it.
    ///
    /// # Errors
    /// The client is not connected and subscribed ([`NotTaken::Offline`]),
    /// or its queue is at `mqtt.max_queued_messages`
    /// ([`NotTaken::QueueFull`]; [`Dialect::client_ready`] is called once
    /// it has room again).
    pub fn deliver_with_receipt(
        &self,
        client_id: &str,
        msg: Arc<Msg>,
    ) -> Result<tokio::sync::oneshot::Receiver<crate::session::Delivery>, NotTaken> {
        let Some((session, qos)) = self.subscribed_client(client_id, &msg.topic) else {
            return Err(NotTaken::Offline);
        };
        let (receipt, rx) = crate::session::Receipt::new();
        let out = Outgoing {
            qos: msg.qos.min(qos),
            retain: false,
            sub_ids: Vec::new(),
            msg,
            seq: 0,
            receipt: Some(receipt),
        };
        match self.try_enqueue(&session, out) {
            Ok(_) => Ok(rx),
            Err("queue-full") => Err(NotTaken::QueueFull),
            Err(_) => Err(NotTaken::Offline),
        }
    }

    /// The session of `client_id` if it is connected and subscribed to a
    /// filter matching `topic`, with the highest QoS of those.
    fn subscribed_client(&self, client_id: &str, topic: &str) -> Option<(Arc<Session>, QoS)> {
        let session = self.sessions_lock().get(client_id).cloned()?;
        if !session.is_connected() {
            return None;
        }
        let granted = session
            .lock()
            .subs
            .iter()
            .filter(|(f, _)| topic::matches(f, topic))
            .map(|(_, s)| s.options.qos)
            .max()?;
        Some((session, granted))
    }

    /// Queues a message for a session and wakes its connection. Returns the
    /// queue's depth if the session is connected (0 if not).
    pub(crate) fn enqueue(&self, session: &Arc<Session>, out: Outgoing) -> usize {
        match self.try_enqueue(session, out) {
            Ok(depth) => depth,
            Err(reason) => {
                self.drop_reason(reason);
                0
            }
        }
    }

    /// Queues a message for a session and wakes its connection: the
    /// queue's depth if the session is connected (0 if not), or why it
    /// was not queued (a metric label). A message with a receipt is not
    /// stored with the session (its sender keeps it), and one refused for
    /// a full queue marks the session to tell the dialect when there is
    /// room.
    fn try_enqueue(&self, session: &Arc<Session>, mut out: Outgoing) -> Result<usize, &'static str> {
        let mut st = session.lock();
        if out.qos == QoS::AtMostOnce && !session.is_connected() {
            return Err("offline-qos0");
        }
        if st.queue.len() as u64 >= self.max_queued_messages.load(Ordering::Relaxed) {
            if out.receipt.is_some() {
                st.wants_room = true;
            }
            return Err("queue-full");
        }
        if st.persistent() && out.qos != QoS::AtMostOnce && out.receipt.is_none() {
            out.seq = st.next_seq;
            st.next_seq += 1;
            if let Err(e) = self.persist.put_queued(&session.client_id, &out, None) {
                tracing::error!(error = %e, client = %session.client_id, "cannot store a queued message");
            }
        }
        st.queue.push_back(out);
        let depth = st.queue.len();
        drop(st);
        session.wake.notify_one();
        Ok(if session.is_connected() { depth } else { 0 })
    }

    pub(crate) fn set_retained(&self, msg: &Arc<Msg>) {
        let mut map = self.retained.write().unwrap_or_else(|p| p.into_inner());
        if msg.payload.is_empty() {
            map.remove(&msg.topic);
        } else {
            if map.len() as u64 >= self.max_retained.load(Ordering::Relaxed) && !map.contains_key(&msg.topic) {
                drop(map);
                self.deny_reason("retained-limit");
                return;
            }
            // A copy, so the retained message does not pin a connection's read buffer.
            let mut own = (**msg).clone();
            own.payload = Bytes::copy_from_slice(&msg.payload);
            map.insert(msg.topic.clone(), Arc::new(own));
        }
        self.metrics.mqtt_retained.set(map.len() as i64);
        if let Err(e) = self.persist.put_retained(msg) {
            tracing::error!(error = %e, topic = %msg.topic, "cannot store a retained message");
        }
    }

    /// Retained messages matching `filter`, dropping expired ones.
    pub(crate) fn retained_for(&self, filter: &str) -> Vec<Arc<Msg>> {
        let now = now_ms();
        self.retained
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter(|m| topic::matches(filter, &m.topic) && m.expires_at_ms.is_none_or(|e| e > now))
            .cloned()
            .collect()
    }
}
