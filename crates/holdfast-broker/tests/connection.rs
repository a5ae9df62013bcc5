//! The broker's connection state machine, driven over an in-memory stream
//! (`tokio::io::duplex`): no sockets, no WebAssembly runtime (the policy is
//! written in Rust here) and no timers (nothing in these tests sleeps or
//! waits for a timeout; every step waits for the broker's answer).

// Helpers outside `#[test]` functions unwrap too (clippy.toml allows it in tests only).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use bytes::BytesMut;
use holdfast_broker::conn::{Peer, serve};
use holdfast_broker::{Broker, Dialect, Parts};
use holdfast_model::Message;
use holdfast_model::policy::{
    Action, Authorized, AuthzDecision, ConnectInfo, LocalAction, Operation, Policy, Principal, Refusal, RefusalCode,
    RouteOutcome, Transport,
};
use holdfast_mqtt::{Connect, Packet, Properties, Publish, QoS, SubOptions, Subscribe, Version, reason};
use holdfast_outbox::{Outbox, SystemTimeSource};
use holdfast_registry::{Registry, Role};
use holdfast_store::Store;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::sync::watch;

/// Everything goes to local subscribers; `bad` is refused; `secret/#` is denied.
struct LocalPolicy;

impl Policy for LocalPolicy {
    fn route(&self, _msg: Arc<Message>) -> RouteOutcome {
        RouteOutcome::Actions(vec![Action::Local(LocalAction {
            topic: None,
            payload: None,
            add_properties: vec![],
        })])
    }

    fn authenticate(&self, info: &ConnectInfo) -> Result<Principal, Refusal> {
        if info.username.as_deref() == Some("bad") {
            return Err(Refusal {
                code: RefusalCode::BadCredentials,
                reason: "test".into(),
            });
        }
        Ok(Principal {
            id: info.client_id.clone(),
            device_id: None,
            module_id: None,
            attributes: vec![],
        })
    }

    fn authorize(&self, _who: &Principal, _op: Operation, topic: &str) -> Authorized {
        let decision = if topic.starts_with("secret/") {
            AuthzDecision::Deny("secret".into())
        } else {
            AuthzDecision::Allow
        };
        Authorized {
            decision,
            cacheable: true,
        }
    }

    fn auth_version(&self) -> Arc<str> {
        Arc::from("test")
    }
}

struct NoDialect;

impl Dialect for NoDialect {
    fn is_request(&self, _topic: &str) -> bool {
        false
    }
    fn device_request(&self, _: &str, _: Option<&str>, _: &str, _: &[u8]) {}
    fn annotate(&self, _msg: &mut holdfast_broker::session::Msg) -> Result<(), String> {
        Ok(())
    }
    fn with_bag(&self, topic: String, _props: &Properties) -> String {
        topic
    }
    fn forward_down(&self, _msg: &holdfast_broker::session::Msg) -> bool {
        false
    }
}

struct Node {
    broker: Arc<Broker>,
    _stop: watch::Sender<bool>,
    _dir: tempfile::TempDir,
}

fn node() -> Node {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("store")).unwrap();
    let outbox = Outbox::open(
        &store,
        dir.path(),
        holdfast_outbox::config::OutboxConfig::default(),
        Arc::new(holdfast_outbox::OutboxMetrics::default()),
        Arc::new(SystemTimeSource),
    )
    .unwrap();
    let registry = Registry::open(&store, "test", Role::Owner).unwrap();
    let (stop, stopped) = watch::channel(false);
    let parts = Parts {
        policy: Arc::new(LocalPolicy),
        outbox: Arc::new(outbox),
        metrics: Arc::new(holdfast_broker::BrokerMetrics::default()),
        registry: Arc::new(registry),
    };
    let (broker, _) = Broker::open(
        holdfast_broker::config::MqttConfig::default(),
        parts,
        &store,
        stopped,
        |_| Arc::new(NoDialect),
    )
    .unwrap();
    Node {
        broker,
        _stop: stop,
        _dir: dir,
    }
}

/// A client on one end of an in-memory pipe; the broker serves the other.
struct Client {
    io: DuplexStream,
    buf: BytesMut,
    version: Version,
}

impl Client {
    fn open(node: &Node, version: Version) -> Client {
        let (client, server) = tokio::io::duplex(64 << 10);
        let peer = Peer {
            addr: "127.0.0.1:1".parse().unwrap(),
            transport: Transport::Tcp,
            cert_thumbprint: None,
            cert_common_name: None,
        };
        tokio::spawn(serve(node.broker.clone(), server, peer));
        Client {
            io: client,
            buf: BytesMut::new(),
            version,
        }
    }

    async fn send(&mut self, p: Packet) {
        let mut out = BytesMut::new();
        holdfast_mqtt::encode(&p, self.version, &mut out);
        self.io.write_all(&out).await.unwrap();
    }

    /// The next packet, or `None` when the broker closed the stream.
    async fn recv(&mut self) -> Option<Packet> {
        loop {
            if let Some(p) = holdfast_mqtt::decode(&mut self.buf, Some(self.version), 1 << 20).unwrap() {
                return Some(p);
            }
            if self.io.read_buf(&mut self.buf).await.unwrap() == 0 {
                return None;
            }
        }
    }

    async fn connect(&mut self, id: &str, username: Option<&str>) -> u8 {
        self.send(Packet::Connect(Box::new(Connect {
            version: self.version,
            client_id: id.into(),
            clean_start: true,
            keep_alive: 0,
            username: username.map(str::to_string),
            password: None,
            will: None,
            properties: Properties::default(),
        })))
        .await;
        match self.recv().await {
            Some(Packet::ConnAck(a)) => a.code,
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    async fn subscribe(&mut self, filter: &str) -> Vec<u8> {
        self.send(Packet::Subscribe(Subscribe {
            pkid: 1,
            filters: vec![(
                filter.into(),
                SubOptions {
                    qos: QoS::AtLeastOnce,
                    ..SubOptions::default()
                },
            )],
            properties: Properties::default(),
        }))
        .await;
        match self.recv().await {
            Some(Packet::SubAck(a)) => a.codes,
            other => panic!("expected SUBACK, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn connect_subscribe_publish_and_deliver() {
    let node = node();
    let mut sub = Client::open(&node, Version::V5);
    assert_eq!(sub.connect("sub", None).await, reason::SUCCESS);
    assert_eq!(sub.subscribe("site/#").await, vec![1]);

    let mut publisher = Client::open(&node, Version::V311);
    assert_eq!(publisher.connect("pub", None).await, 0);
    publisher
        .send(Packet::Publish(Publish::new(
            "site/a",
            &b"one"[..],
            QoS::AtLeastOnce,
            7,
        )))
        .await;
    match publisher.recv().await {
        Some(Packet::PubAck(a)) => assert_eq!(a.pkid, 7),
        other => panic!("expected PUBACK, got {other:?}"),
    }
    match sub.recv().await {
        Some(Packet::Publish(p)) => {
            assert_eq!(p.topic, "site/a");
            assert_eq!(&p.payload[..], b"one");
            assert_eq!(p.qos, QoS::AtLeastOnce);
        }
        other => panic!("expected PUBLISH, got {other:?}"),
    }
}

#[tokio::test]
async fn refused_credentials_get_the_reason_code_and_the_stream_ends() {
    let node = node();
    let mut c = Client::open(&node, Version::V5);
    assert_eq!(c.connect("x", Some("bad")).await, reason::BAD_USERNAME_OR_PASSWORD);
    assert!(c.recv().await.is_none(), "the broker closes after the refusal");
}

#[tokio::test]
async fn a_denied_subscription_gets_not_authorized() {
    let node = node();
    let mut c = Client::open(&node, Version::V5);
    assert_eq!(c.connect("c", None).await, reason::SUCCESS);
    assert_eq!(c.subscribe("secret/x").await, vec![reason::NOT_AUTHORIZED]);
}

#[tokio::test]
async fn a_malformed_packet_ends_the_connection_with_a_reason() {
    let node = node();
    let mut c = Client::open(&node, Version::V5);
    assert_eq!(c.connect("c", None).await, reason::SUCCESS);
    // A whole PUBLISH packet whose topic length (9) runs past its body (3 bytes).
    c.io.write_all(&[0x30, 0x03, 0x00, 0x09, b'a']).await.unwrap();
    match c.recv().await {
        Some(Packet::Disconnect(d)) => assert_eq!(d.code, reason::MALFORMED),
        other => panic!("expected DISCONNECT, got {other:?}"),
    }
    assert!(c.recv().await.is_none(), "the broker closes after the DISCONNECT");
}
