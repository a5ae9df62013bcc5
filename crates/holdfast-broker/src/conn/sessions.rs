//! Sessions of the broker as connections attach and detach, and wills.

#[allow(unused_imports)]
use super::*;

impl Broker {
    /// Attaches connection `conn_id` to the session of `client_id`, taking
    /// it over from another connection if need be. Returns the session and
    /// whether it was resumed; `None` if the old connection would not let go.
    pub(crate) async fn attach(
        self: &Arc<Self>,
        client_id: &Arc<str>,
        clean_start: bool,
        expiry_s: u32,
        conn_id: u64,
    ) -> Option<(Arc<Session>, bool)> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let existing = self.sessions_lock().get(client_id).cloned();
            if let Some(s) = &existing
                && s.is_connected()
            {
                // Session takeover: ask the current connection to leave.
                s.kick_pending.store(true, Ordering::Release);
                s.kick.notify_one();
                if Instant::now() >= deadline {
                    return None;
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
                continue;
            }
            let mut map = self.sessions_lock();
            let current = map.get(client_id).cloned();
            if current.as_ref().is_some_and(|s| s.is_connected()) {
                continue;
            }
            let (session, present) = match current {
                Some(s) if !clean_start => (s, true),
                other => {
                    if let Some(old) = other {
                        drop(map);
                        self.end_session(&old);
                        map = self.sessions_lock();
                    }
                    let s = Arc::new(Session::new(client_id.clone(), expiry_s, holdfast_mqtt::Version::V5));
                    map.insert(client_id.clone(), s.clone());
                    (s, false)
                }
            };
            self.metrics.mqtt_sessions.set(map.len() as i64);
            session.generation.fetch_add(1, Ordering::AcqRel);
            session.set_connected(true);
            session.kick_pending.store(false, Ordering::Release);
            drop(map);
            let was_persistent = {
                let mut st = session.lock();
                let was = st.persistent();
                st.conn_id = conn_id;
                st.expiry_s = expiry_s;
                st.disconnected_at_ms = None;
                was
            };
            if was_persistent && expiry_s == 0 {
                // Resumed as a non-persistent session: its stored copy goes.
                if let Err(e) = self.persist.delete_session(client_id) {
                    tracing::error!(error = %e, "cannot delete a session");
                }
            } else {
                self.save_session(&session);
            }
            return Some((session, present));
        }
    }

    /// Detaches connection `conn_id` from `session`: a non-persistent
    /// session ends, a persistent one waits for its expiry. The will is
    /// published now, or after its delay unless the client comes back.
    pub(crate) fn detach(
        self: &Arc<Self>,
        session: &Arc<Session>,
        conn_id: u64,
        will: Option<(Msg, u32)>,
        principal: Option<String>,
    ) {
        let expiry_s = {
            let mut st = session.lock();
            if st.conn_id != conn_id {
                return;
            }
            st.conn_id = 0;
            st.disconnected_at_ms = Some(now_ms());
            // QoS 0 messages are not kept for an offline client.
            st.queue.retain(|o| o.qos != QoS::AtMostOnce);
            st.expiry_s
        };
        session.set_connected(false);
        // A takeover may be waiting for this connection to let go.
        session.wake.notify_one();
        if expiry_s == 0 {
            self.end_session(session);
        } else {
            self.save_session(session);
            self.schedule_expiry(session, Duration::from_secs(u64::from(expiry_s)));
        }
        if let Some((msg, delay_s)) = will {
            let delay = delay_s.min(expiry_s);
            if delay == 0 {
                self.publish_will(msg, principal.as_deref());
            } else {
                let generation = session.generation.load(Ordering::Acquire);
                let broker = Arc::downgrade(self);
                // Held strongly: the session may end (expiry) at the same
                // moment, and its will must still go out.
                let session = session.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_secs(u64::from(delay))).await;
                    let Some(broker) = broker.upgrade() else {
                        return;
                    };
                    if session.generation.load(Ordering::Acquire) == generation {
                        broker.publish_will(msg, principal.as_deref());
                    }
                });
            }
        }
    }

    pub(crate) fn publish_will(&self, msg: Msg, principal: Option<&str>) {
        if msg.expires_at_ms.is_some_and(|e| e <= now_ms()) {
            self.drop_reason("expired");
            return;
        }
        tracing::debug!(topic = %msg.topic, "publishing a will");
        // Not waited for: there is no publisher left to acknowledge.
        let _ = self.route(&Arc::new(msg), principal);
    }
}

/// A message as a client sent it (PUBLISH or will): expiry made absolute,
/// only the properties that travel to subscribers kept.
pub(crate) fn received(
    topic: String,
    payload: bytes::Bytes,
    qos: QoS,
    retain: bool,
    p: &Properties,
    publisher: Arc<str>,
) -> Msg {
    Msg {
        expires_at_ms: p.message_expiry_interval.map(|s| now_ms() + u64::from(s) * 1000),
        properties: pass_through(p),
        topic,
        payload,
        qos,
        retain,
        publisher: Some(publisher),
    }
}

/// The MQTT 5 properties that travel with a message to its subscribers.
pub(crate) fn pass_through(p: &Properties) -> Properties {
    Properties {
        payload_format_indicator: p.payload_format_indicator,
        content_type: p.content_type.clone(),
        response_topic: p.response_topic.clone(),
        correlation_data: p.correlation_data.clone(),
        user_properties: p.user_properties.clone(),
        ..Properties::default()
    }
}
