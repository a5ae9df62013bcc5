//! Cloud-to-device from JetStream: a durable pull consumer per node.
//!
//! The consumer (`upstream.nats.c2d.consumer`, created if missing) takes
//! the subjects under `upstream.nats.c2d.subject_prefix` from the stream
//! `upstream.nats.c2d.stream`. A message's subject after the prefix is its
//! local topic (see [`super::subject`]); its headers become user properties.
//! It is acknowledged only once stored here (a message for a device or
//! module goes through its durable queue), so a node that dies before that
//! gets it again. A full queue or a local failure asks for redelivery later;
//! a message that can never be delivered (a bad topic, refused) is
//! terminated and counted.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::AckKind;
use async_nats::jetstream::consumer::{AckPolicy, pull};
use futures_util::StreamExt;
use holdfast_metrics::ResultLabels;
use holdfast_model::ports::{LocalDelivery, LocalMessage, ReplyProperties};
use holdfast_model::{Message, Source};

use super::NatsC2dConfig;
use super::subject;
use crate::Ctx;
use crate::reconnect::Ended;

/// How long a full device queue waits before the message comes again.
const RETRY_FULL: Duration = Duration::from_secs(5);

/// Pull requests expire after this, and are renewed.
const PULL_EXPIRES: Duration = Duration::from_secs(10);
/// The server's heartbeat while a pull request waits: two missed mean the
/// request was lost (a consumer leader changing), and it is sent again.
const PULL_HEARTBEAT: Duration = Duration::from_secs(2);

async fn pull_stream(
    consumer: &async_nats::jetstream::consumer::PullConsumer,
) -> Result<pull::Stream, async_nats::jetstream::consumer::StreamError> {
    consumer
        .stream()
        .expires(PULL_EXPIRES)
        .heartbeat(PULL_HEARTBEAT)
        .messages()
        .await
}

/// The consumer of one connection.
pub(crate) struct Consumer {
    consumer: async_nats::jetstream::consumer::PullConsumer,
    messages: pull::Stream,
    prefix: String,
    add_prefix: String,
    local: Arc<dyn LocalDelivery>,
}

impl Consumer {
    /// Creates or binds the durable consumer and starts pulling.
    pub(crate) async fn open(
        js: &async_nats::jetstream::Context,
        config: &NatsC2dConfig,
        node: &str,
        local: Arc<dyn LocalDelivery>,
    ) -> Result<Consumer, String> {
        let stream = js
            .get_stream(&config.stream)
            .await
            .map_err(|e| format!("C2D stream {:?}: {e}", config.stream))?;
        let prefix = subject::prefix(&config.subject_prefix, node, 0);
        let mut name_token = String::new();
        subject::push_token(&mut name_token, node);
        // A consumer name cannot hold '.': the escaped node id has none.
        let durable = config.consumer.replace("{node}", &name_token.replace('%', "_"));
        let consumer = stream
            .get_or_create_consumer(
                &durable,
                pull::Config {
                    durable_name: Some(durable.clone()),
                    filter_subject: format!("{prefix}.>"),
                    ack_policy: AckPolicy::Explicit,
                    ack_wait: Duration::from_secs(30),
                    max_ack_pending: config.max_ack_pending,
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| format!("C2D consumer {durable:?}: {e}"))?;
        let messages = pull_stream(&consumer)
            .await
            .map_err(|e| format!("C2D consumer {durable:?}: {e}"))?;
        tracing::info!(stream = %config.stream, consumer = %durable, subjects = %format!("{prefix}.>"), "JetStream C2D consumer bound");
        Ok(Consumer {
            consumer,
            messages,
            prefix,
            add_prefix: config.add_prefix.clone(),
            local,
        })
    }

    /// Delivers what the consumer hands out until the connection ends.
    pub(crate) async fn run(mut self, link: &Ctx) -> Ended {
        let count = |result: &'static str| {
            link.metrics.link_c2d.get_or_create(&ResultLabels { result }).inc();
        };
        while let Some(next) = self.messages.next().await {
            let m = match next {
                Ok(m) => m,
                Err(e) => {
                    // A failed pull request (no consumer leader yet, after a
                    // cluster restart), missed heartbeats: pull afresh.
                    tracing::warn!(error = %e, "JetStream C2D consumer; pulling again");
                    count("consumer-error");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    self.messages = match pull_stream(&self.consumer).await {
                        Ok(m) => m,
                        Err(e) => return Ended::Unreachable(format!("C2D consumer: {e}")),
                    };
                    continue;
                }
            };
            let Some(local) = self.to_local(&m.message) else {
                tracing::warn!(subject = %m.subject, "JetStream C2D: the subject is no valid local topic; terminated");
                count("bad-topic");
                if let Err(e) = m.ack_with(AckKind::Term).await {
                    return Ended::Unreachable(format!("C2D ack: {e}"));
                }
                continue;
            };
            let topic = local.message.topic.clone();
            let ack = match self.local.deliver_stored(local).await {
                Ok(_) => {
                    count("stored");
                    m.double_ack().await
                }
                // A full queue (0x97), or a failure here (0x80: the store's
                // I/O, a shutdown): it comes again later.
                Err(0x97 | 0x80) => {
                    count("retried");
                    m.ack_with(AckKind::Nak(Some(RETRY_FULL))).await
                }
                Err(code) => {
                    tracing::warn!(%topic, code, "JetStream C2D: refused locally; terminated");
                    count("refused");
                    m.ack_with(AckKind::Term).await
                }
            };
            if let Err(e) = ack {
                return Ended::Unreachable(format!("C2D ack: {e}"));
            }
        }
        Ended::Unreachable("the C2D consumer ended".into())
    }

    /// The local message of `m`; `None` when its subject gives no valid topic.
    fn to_local(&self, m: &async_nats::Message) -> Option<LocalMessage> {
        let rest = m
            .subject
            .as_str()
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix('.')?;
        let topic = format!("{}{}", self.add_prefix, subject::topic_of(rest)?);
        if !holdfast_mqtt::topic::valid_name(&topic) {
            return None;
        }
        let mut properties = Vec::new();
        let mut content_type = None;
        let mut expires_at_ms = None;
        if let Some(h) = &m.headers {
            let mut names: Vec<_> = h.iter().collect();
            names.sort_by(|a, b| AsRef::<str>::as_ref(a.0).cmp(b.0.as_ref()));
            for (name, values) in names {
                let name: &str = name.as_ref();
                if name.starts_with("Nats-") {
                    continue;
                }
                for v in values {
                    match name {
                        "Content-Type" => content_type = Some(v.as_str().to_string()),
                        super::HEADER_EXPIRES => expires_at_ms = v.as_str().parse().ok(),
                        _ => properties.push((name.to_string(), v.as_str().to_string())),
                    }
                }
            }
        }
        Some(LocalMessage {
            message: Message {
                topic,
                payload: m.payload.clone(),
                qos: 1,
                retain: false,
                content_type,
                properties,
                source: Source::default(),
                origin: None,
                delivered_locally: false,
            },
            expires_at_ms,
            publisher: None,
            reply: ReplyProperties::default(),
        })
    }
}
