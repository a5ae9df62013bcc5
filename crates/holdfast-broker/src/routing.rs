//! The router: a received message goes through the router policy, and each
//! action is carried out: appended to the outbox (`upstream`), delivered to
//! this node's subscribers and kept if retained (`local`), or counted
//! (`drop`). When the router plugin fails and its policy is `dead-letter`,
//! the message goes to the dead-letter store. Wills are published through
//! it too.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use holdfast_model::policy::{Action, Policy, RouteOutcome};
use holdfast_model::trace::{self, AttrValue, SpanKind, Started, Tracer};
use holdfast_model::{Message, Source};
use holdfast_mqtt::topic;
use holdfast_outbox::Outbox;

use crate::metrics::BrokerMetrics;
use crate::retained::Retained;
use crate::session::{Delivery, Msg, Outgoing, Receipt, Session};
use crate::sessions::Sessions;
use crate::subs::Subscriptions;
use crate::{Dialect, NotTaken, Routed, now_ms};

/// Routes and delivers messages.
pub(crate) struct Router {
    policy: Arc<dyn Policy>,
    outbox: Arc<Outbox>,
    dialect: Arc<dyn Dialect>,
    sessions: Arc<Sessions>,
    subs: Arc<Subscriptions>,
    retained: Arc<Retained>,
    metrics: Arc<BrokerMetrics>,
    /// `mqtt.max_topic_length`: a topic the router plugin sets must fit it.
    max_topic_length: usize,
    /// `mqtt.max_packet_size`: a payload the router plugin sets must fit it.
    max_packet_size: usize,
}

/// What a [`Router`] works with.
pub(crate) struct RouterParts {
    pub(crate) policy: Arc<dyn Policy>,
    pub(crate) outbox: Arc<Outbox>,
    pub(crate) dialect: Arc<dyn Dialect>,
    pub(crate) sessions: Arc<Sessions>,
    pub(crate) subs: Arc<Subscriptions>,
    pub(crate) retained: Arc<Retained>,
    pub(crate) metrics: Arc<BrokerMetrics>,
}

impl Router {
    /// A router over `parts`, within the topic and packet limits of `config`.
    pub(crate) fn new(parts: RouterParts, config: &crate::config::MqttConfig) -> Router {
        let RouterParts {
            policy,
            outbox,
            dialect,
            sessions,
            subs,
            retained,
            metrics,
        } = parts;
        Router {
            policy,
            outbox,
            dialect,
            sessions,
            subs,
            retained,
            metrics,
            max_topic_length: config.max_topic_length,
            max_packet_size: config.max_packet_size as usize,
        }
    }

    /// Routes a received message through the router plugin and acts on
    /// every action. `principal` is the authenticated identity.
    pub(crate) fn route(&self, msg: &Arc<Msg>, principal: Option<&str>) -> Routed {
        let mut pm = plugin_message(msg, principal);
        // A traced message: its receive span, and the store span the stored
        // message hangs under (written into its traceparent for the next hop).
        let mut trace = trace::tracer().and_then(|t| {
            let (ctx, new) = t.context_for(&pm.properties)?;
            let receive = Started::new(t, ctx, new);
            let store = receive.child(t);
            trace::set_parent(&mut pm.properties, &ctx, store.span_id);
            Some(Traced {
                tracer: t,
                receive,
                store: Some(store),
            })
        });
        let pm = Arc::new(pm);
        let route_span = trace.as_ref().map(|t| t.receive.child(t.tracer));
        let outcome = self.policy.route(pm.clone());
        if let (Some(t), Some(span)) = (&trace, route_span) {
            span.finish(
                t.tracer,
                "route",
                SpanKind::Internal,
                vec![("holdfast.route.decision", AttrValue::Str(decision(&outcome)))],
                None,
            );
        }
        let mut routed = Routed::default();
        match outcome {
            RouteOutcome::Actions(actions) => {
                if actions.is_empty() {
                    self.metrics.dropped("no-route");
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
                                    self.metrics.routed_upstream();
                                    if let Some(t) = trace.as_mut()
                                        && let Some(span) = t.store.take()
                                    {
                                        routed.store_span = Some(crate::StoreSpan::new(t.tracer, span, u.lane));
                                    }
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
                                    if !topic::valid_name(&t) || t.len() > self.max_topic_length {
                                        self.metrics.dropped("invalid-local-topic");
                                        continue;
                                    }
                                    m.topic = self.dialect.with_bag(t, &m.properties);
                                    if m.topic.len() > self.max_topic_length {
                                        self.metrics.dropped("invalid-local-topic");
                                        continue;
                                    }
                                }
                                if let Some(p) = l.payload.map(bytes::Bytes::from) {
                                    m.payload = p;
                                }
                                // What a plugin adds must still fit MQTT's wire limits.
                                let too_long = |s: &String| s.len() > usize::from(u16::MAX);
                                if m.payload.len() > self.max_packet_size
                                    || l.add_properties.iter().any(|(k, v)| too_long(k) || too_long(v))
                                {
                                    self.metrics.dropped("invalid-local-message");
                                    continue;
                                }
                                m.properties.user_properties.extend(l.add_properties);
                                Arc::new(m)
                            } else {
                                msg.clone()
                            };
                            self.metrics.routed_local();
                            let deliver = trace.as_ref().map(|t| (t.tracer, t.receive.child(t.tracer)));
                            let topic_name = deliver.as_ref().map(|_| local.topic.clone());
                            let (backlog, stored) = self.deliver_stored(local);
                            if let (Some((tracer, span)), Some(topic_name)) = (deliver, topic_name) {
                                span.finish(
                                    tracer,
                                    "deliver",
                                    SpanKind::Consumer,
                                    vec![("messaging.destination.name", AttrValue::Str(topic_name))],
                                    None,
                                );
                            }
                            routed.backlog = routed.backlog.max(backlog);
                            // A device's message is acknowledged once in its durable queue.
                            routed.waits.extend(stored);
                        }
                        Action::Drop(reason) => {
                            tracing::trace!(%reason, topic = %msg.topic, "router dropped a message");
                            self.metrics.dropped("router-drop");
                            self.metrics.router_drop(&reason);
                        }
                    }
                }
            }
            RouteOutcome::DeadLetter(reason) => {
                // Kept in the dead-letter store; the publisher is
                // acknowledged once it is synced there.
                tracing::debug!(%reason, topic = %msg.topic, "router failed; message dead-lettered");
                match self
                    .outbox
                    .dead_letter(pm, holdfast_outbox::dead_letter::Reason::RouterFailure, reason)
                {
                    Ok(rx) => {
                        if self.outbox.dead_letters().is_none() {
                            self.metrics.dropped("router-failure");
                        }
                        routed.waits.push(rx);
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "outbox refused a dead letter");
                        self.metrics.dropped("router-failure");
                        routed.refusal = Some(e.mqtt_reason_code());
                    }
                }
            }
            RouteOutcome::Drop(reason) => {
                tracing::debug!(%reason, topic = %msg.topic, "router failed; message dropped");
                self.metrics.dropped("router-failure");
            }
        }
        if let Some(t) = trace {
            t.receive.finish(
                t.tracer,
                "receive",
                SpanKind::Server,
                vec![
                    ("messaging.system", AttrValue::Str("mqtt".into())),
                    ("messaging.destination.name", AttrValue::Str(msg.topic.clone())),
                    (
                        "messaging.client_id",
                        AttrValue::Str(msg.publisher.as_deref().unwrap_or("").to_string()),
                    ),
                    ("holdfast.node", AttrValue::Str(t.tracer.node.clone())),
                ],
                routed
                    .refusal
                    .map(|code| format!("refused with reason code 0x{code:02x}")),
            );
        }
        routed
    }

    /// Delivers a message to this node's subscribers (and stores it if it is
    /// retained). Used for the router's `local` action, and by the upstream
    /// link for messages coming down. Returns the deepest queue of a
    /// connected subscriber after the delivery.
    pub(crate) fn deliver(&self, msg: Arc<Msg>) -> usize {
        self.deliver_stored(msg).0
    }

    /// [`Router::deliver`], and what resolves once a message the dialect
    /// took for a device or module is stored in its durable queue.
    pub(crate) fn deliver_stored(&self, msg: Arc<Msg>) -> (usize, Option<crate::Stored>) {
        if msg.topic.starts_with("devices/")
            && let Some(stored) = self.dialect.take_device_bound(&msg)
        {
            return (0, Some(stored));
        }
        (self.deliver_local(msg), None)
    }

    fn deliver_local(&self, msg: Arc<Msg>) -> usize {
        if msg.retain {
            self.retained.set(&msg);
        }
        let matches = self.subs.matches(&msg.topic, msg.publisher.as_deref());
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
            backlog = backlog.max(self.sessions.enqueue(&m.session, out));
        }
        backlog
    }

    /// Delivers `msg` to client `client_id` alone (twin and method
    /// traffic): only if it is connected and subscribed to a matching
    /// filter, at the highest QoS of those subscriptions.
    pub(crate) fn deliver_to_client(&self, client_id: &str, msg: Arc<Msg>) -> bool {
        let Some((session, qos)) = self.sessions.subscribed(client_id, &msg.topic) else {
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
        self.sessions.enqueue(&session, out);
        true
    }

    /// Delivers `msg` to client `client_id` alone, as
    /// [`Router::deliver_to_client`] does, and tells what became of it: the
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
    pub(crate) fn deliver_with_receipt(
        &self,
        client_id: &str,
        msg: Arc<Msg>,
    ) -> Result<tokio::sync::oneshot::Receiver<Delivery>, NotTaken> {
        let Some((session, qos)) = self.sessions.subscribed(client_id, &msg.topic) else {
            return Err(NotTaken::Offline);
        };
        let (receipt, rx) = Receipt::new();
        let out = Outgoing {
            qos: msg.qos.min(qos),
            retain: false,
            sub_ids: Vec::new(),
            msg,
            seq: 0,
            receipt: Some(receipt),
        };
        match self.sessions.try_enqueue(&session, out) {
            Ok(_) => Ok(rx),
            Err("queue-full") => Err(NotTaken::QueueFull),
            Err(_) => Err(NotTaken::Offline),
        }
    }

    /// Publishes a will now, or after `delay_s` seconds unless the client
    /// came back to `session` by then.
    pub(crate) fn publish_will(
        self: &Arc<Self>,
        msg: Msg,
        principal: Option<String>,
        delay_s: u32,
        session: &Arc<Session>,
    ) {
        if delay_s == 0 {
            self.will_now(msg, principal.as_deref());
            return;
        }
        let generation = session.generation.load(Ordering::Acquire);
        let router = Arc::downgrade(self);
        // Held strongly: the session may end (expiry) at the same
        // moment, and its will must still go out.
        let session = session.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(u64::from(delay_s))).await;
            let Some(router) = router.upgrade() else {
                return;
            };
            if session.generation.load(Ordering::Acquire) == generation {
                router.will_now(msg, principal.as_deref());
            }
        });
    }

    fn will_now(&self, msg: Msg, principal: Option<&str>) {
        if msg.expires_at_ms.is_some_and(|e| e <= now_ms()) {
            self.metrics.dropped("expired");
            return;
        }
        tracing::debug!(topic = %msg.topic, "publishing a will");
        // Not waited for: there is no publisher left to acknowledge.
        let _ = self.route(&Arc::new(msg), principal);
    }
}

/// The message the router plugin sees.
/// A message traced here: the tracer, its receive span, and the store span
/// (taken by its first upstream action).
struct Traced {
    tracer: &'static Tracer,
    receive: Started,
    store: Option<Started>,
}

/// What the router decided, for the route span.
fn decision(outcome: &RouteOutcome) -> String {
    match outcome {
        RouteOutcome::Actions(actions) if actions.is_empty() => "no route: dropped".into(),
        RouteOutcome::Actions(actions) => actions
            .iter()
            .map(|a| match a {
                Action::Upstream(u) => match u.ttl_seconds {
                    Some(ttl) => format!("upstream lane {} ttl {ttl} s", u.lane),
                    None => format!("upstream lane {}", u.lane),
                },
                Action::Local(l) => match &l.topic {
                    Some(t) => format!("local {t}"),
                    None => "local".into(),
                },
                Action::Drop(reason) => format!("drop: {reason}"),
            })
            .collect::<Vec<_>>()
            .join("; "),
        RouteOutcome::DeadLetter(reason) => format!("dead-letter: {reason}"),
        RouteOutcome::Drop(reason) => format!("router failed, dropped: {reason}"),
    }
}

fn plugin_message(msg: &Msg, principal: Option<&str>) -> Message {
    Message {
        topic: msg.topic.clone(),
        payload: msg.payload.clone(),
        qos: msg.qos as u8,
        retain: msg.retain,
        content_type: msg.properties.content_type.clone(),
        properties: msg.properties.user_properties.clone(),
        source: Source {
            client_id: msg.publisher.as_deref().unwrap_or("").to_string(),
            principal: principal.map(str::to_string),
            path: Vec::new(),
        },
        origin: None,
        delivered_locally: false,
    }
}
