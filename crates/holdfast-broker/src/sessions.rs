//! The session registry: every session by client id, as connections attach
//! (taking over or resuming) and detach, sessions expire, and messages are
//! queued for them. Persistent sessions are kept in the store as they change.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use holdfast_mqtt::QoS;
use tokio::time::Instant;

use crate::metrics::BrokerMetrics;
use crate::persist::{LoadedSession, Persist, SessionRecord};
use crate::session::{Inflight, Outgoing, Session};
use crate::subs::Subscriptions;
use crate::{ClientInfo, now_ms};

/// The sessions by client id.
pub(crate) struct Sessions {
    map: Mutex<HashMap<Arc<str>, Arc<Session>>>,
    /// Where a session's subscriptions are indexed.
    subs: Arc<Subscriptions>,
    persist: Arc<Persist>,
    metrics: Arc<BrokerMetrics>,
    /// `mqtt.max_queued_messages` (a reload changes it).
    pub(crate) max_queued: AtomicU64,
}

impl Sessions {
    /// An empty registry.
    pub(crate) fn new(
        subs: Arc<Subscriptions>,
        persist: Arc<Persist>,
        metrics: Arc<BrokerMetrics>,
        max_queued: usize,
    ) -> Arc<Sessions> {
        Arc::new(Sessions {
            map: Mutex::new(HashMap::new()),
            subs,
            persist,
            metrics,
            max_queued: AtomicU64::new(max_queued as u64),
        })
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<Arc<str>, Arc<Session>>> {
        holdfast_model::lock(&self.map)
    }

    /// Sessions kept.
    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }

    /// Takes back the persistent sessions loaded from the store: those
    /// expired while the node was down are deleted, the others wait for
    /// their client until their expiry. Returns how many were restored.
    pub(crate) fn restore(self: &Arc<Self>, loaded: Vec<LoadedSession>) -> usize {
        let now = now_ms();
        let mut restored = 0;
        for s in loaded {
            let r = &s.record;
            let since = r.disconnected_at_ms.unwrap_or(now);
            if since.saturating_add(u64::from(r.expiry_s) * 1000) <= now {
                if let Err(e) = self.persist.delete_session(&s.client_id) {
                    tracing::warn!(error = %e, "cannot delete an expired session");
                }
                continue;
            }
            let id: Arc<str> = s.client_id.as_str().into();
            let session = Arc::new(Session::new(id.clone(), r.expiry_s, r.version()));
            {
                let mut st = session.lock();
                st.disconnected_at_ms = Some(since);
                for (filter, sub) in r.sub_records() {
                    self.subs.add(&session, &filter, sub.options, sub.id);
                    st.subs.insert(filter, sub);
                }
                for (out, released) in s.queue {
                    st.next_seq = st.next_seq.max(out.seq + 1);
                    match released {
                        // The client has it; PUBREL goes again on reconnect.
                        Some(pkid) => st.inflight.push_back(Inflight {
                            pkid,
                            out,
                            released: true,
                        }),
                        None => st.queue.push_back(out),
                    }
                }
            }
            let remaining = (since + u64::from(r.expiry_s) * 1000).saturating_sub(now);
            self.schedule_expiry(&session, Duration::from_millis(remaining));
            self.lock().insert(id, session);
            restored += 1;
        }
        self.metrics.set_sessions(restored);
        restored
    }

    /// Attaches connection `conn_id` to the session of `client_id`, taking
    /// it over from another connection if need be. Returns the session and
    /// whether it was resumed; `None` if the old connection would not let go.
    pub(crate) async fn attach(
        &self,
        client_id: &Arc<str>,
        clean_start: bool,
        expiry_s: u32,
        conn_id: u64,
    ) -> Option<(Arc<Session>, bool)> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let existing = self.lock().get(client_id).cloned();
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
            let mut map = self.lock();
            let current = map.get(client_id).cloned();
            if current.as_ref().is_some_and(|s| s.is_connected()) {
                continue;
            }
            let (session, present) = match current {
                Some(s) if !clean_start => (s, true),
                other => {
                    if let Some(old) = other {
                        drop(map);
                        self.end(&old);
                        map = self.lock();
                    }
                    let s = Arc::new(Session::new(client_id.clone(), expiry_s, holdfast_mqtt::Version::V5));
                    map.insert(client_id.clone(), s.clone());
                    (s, false)
                }
            };
            self.metrics.set_sessions(map.len());
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
                self.save(&session);
            }
            return Some((session, present));
        }
    }

    /// Detaches connection `conn_id` from `session`: a non-persistent
    /// session ends, a persistent one waits for its expiry. Returns the
    /// session's expiry interval (seconds), or `None` if another connection
    /// holds the session now.
    pub(crate) fn detach(self: &Arc<Self>, session: &Arc<Session>, conn_id: u64) -> Option<u32> {
        let expiry_s = {
            let mut st = session.lock();
            if st.conn_id != conn_id {
                return None;
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
            self.end(session);
        } else {
            self.save(session);
            self.schedule_expiry(session, Duration::from_secs(u64::from(expiry_s)));
        }
        Some(expiry_s)
    }

    /// Ends a session: its subscriptions and stored state go.
    fn end(&self, session: &Arc<Session>) {
        {
            let mut map = self.lock();
            if map.get(&session.client_id).is_some_and(|s| Arc::ptr_eq(s, session)) {
                map.remove(&session.client_id);
            }
            self.metrics.set_sessions(map.len());
        }
        let (filters, persistent) = {
            let mut st = session.lock();
            let filters: Vec<String> = st.subs.drain().map(|(f, _)| f).collect();
            st.queue.clear();
            st.inflight.clear();
            (filters, st.persistent())
        };
        for f in filters {
            self.subs.remove(&session.client_id, &f);
        }
        if persistent && let Err(e) = self.persist.delete_session(&session.client_id) {
            tracing::error!(error = %e, client = %session.client_id, "cannot delete a session");
        }
    }

    /// Ends `session` after `delay` unless a connection attaches first.
    fn schedule_expiry(self: &Arc<Self>, session: &Arc<Session>, delay: Duration) {
        let generation = session.generation.load(Ordering::Acquire);
        let sessions = Arc::downgrade(self);
        let session = Arc::downgrade(session);
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let (Some(sessions), Some(session)) = (sessions.upgrade(), session.upgrade()) else {
                return;
            };
            if session.generation.load(Ordering::Acquire) == generation && !session.is_connected() {
                tracing::debug!(client = %session.client_id, "session expired");
                sessions.end(&session);
            }
        });
    }

    /// Stores a persistent session's subscriptions and expiry.
    pub(crate) fn save(&self, session: &Session) {
        let record = {
            let st = session.lock();
            if !st.persistent() {
                return;
            }
            SessionRecord::of(&st)
        };
        if let Err(e) = self.persist.save_session(&session.client_id, &record) {
            tracing::error!(error = %e, client = %session.client_id, "cannot store a session");
        }
    }

    /// Removes the stored copy of a delivered message (`seq` 0: none).
    pub(crate) fn del_queued(&self, session: &Session, seq: u64) {
        if seq != 0
            && let Err(e) = self.persist.del_queued(&session.client_id, seq)
        {
            tracing::error!(error = %e, client = %session.client_id, "cannot remove a delivered message");
        }
    }

    /// Stores that a QoS 2 message was received by the client (PUBREC).
    pub(crate) fn put_released(&self, session: &Session, out: &Outgoing, pkid: u16) {
        if out.seq != 0
            && let Err(e) = self.persist.put_queued(&session.client_id, out, Some(pkid))
        {
            tracing::error!(error = %e, client = %session.client_id, "cannot store a released message");
        }
    }

    /// Queues a message for a session and wakes its connection. Returns the
    /// queue's depth if the session is connected (0 if not).
    pub(crate) fn enqueue(&self, session: &Arc<Session>, out: Outgoing) -> usize {
        match self.try_enqueue(session, out) {
            Ok(depth) => depth,
            Err(reason) => {
                self.metrics.dropped(reason);
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
    pub(crate) fn try_enqueue(&self, session: &Arc<Session>, mut out: Outgoing) -> Result<usize, &'static str> {
        let mut st = session.lock();
        if out.qos == QoS::AtMostOnce && !session.is_connected() {
            return Err("offline-qos0");
        }
        if st.queue.len() as u64 >= self.max_queued.load(Ordering::Relaxed) {
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

    /// The session of `client_id` if it is connected and subscribed to a
    /// filter matching `topic`, with the highest QoS of those.
    pub(crate) fn subscribed(&self, client_id: &str, topic: &str) -> Option<(Arc<Session>, QoS)> {
        let session = self.lock().get(client_id).cloned()?;
        if !session.is_connected() {
            return None;
        }
        let granted = session
            .lock()
            .subs
            .iter()
            .filter(|(f, _)| holdfast_mqtt::topic::matches(f, topic))
            .map(|(_, s)| s.options.qos)
            .max()?;
        Some((session, granted))
    }

    /// Connected clients, by client id, at most `limit` of them. Only those
    /// listed have their session locked.
    pub(crate) fn clients(&self, limit: usize) -> Vec<ClientInfo> {
        let mut connected: Vec<Arc<Session>> = self.lock().values().filter(|s| s.is_connected()).cloned().collect();
        if connected.len() > limit {
            connected.select_nth_unstable_by(limit, |a, b| a.client_id.cmp(&b.client_id));
            connected.truncate(limit);
        }
        connected.sort_unstable_by(|a, b| a.client_id.cmp(&b.client_id));
        connected
            .iter()
            .map(|s| {
                let st = s.lock();
                ClientInfo {
                    client_id: s.client_id.to_string(),
                    protocol: match st.version {
                        holdfast_mqtt::Version::V31 => "3.1",
                        holdfast_mqtt::Version::V311 => "3.1.1",
                        holdfast_mqtt::Version::V5 => "5",
                    },
                    subscriptions: st.subs.len(),
                    queued: st.queue.len(),
                    in_flight: st.inflight.len(),
                    persistent: st.expiry_s > 0,
                }
            })
            .collect()
    }
}
