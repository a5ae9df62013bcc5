//! The hub made with a fake broker: what devices, child gateways and the
//! parent get, without sockets.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use holdfast_broker::NotTaken;
use holdfast_broker::session::{Delivery, Msg};
use holdfast_model::lock;
use holdfast_mqtt::{Properties, QoS};
use holdfast_registry::{NewIdentity, Registry, Role};
use holdfast_store::Store;
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};

use crate::c2d::{C2d, Outcome};
use crate::clients::Clients;
use crate::service::Svc;
use crate::twin::Twins;
use crate::{Hub, HubParts, MethodError, MethodResult};

/// The broker's clients: who is online, and what each was sent.
#[derive(Default)]
struct Devices {
    online: Mutex<HashSet<String>>,
    sent: Mutex<Vec<(String, String, Bytes)>>,
    receipts: Mutex<Vec<oneshot::Sender<Delivery>>>,
}

impl Devices {
    fn connect(&self, id: &str) {
        lock(&self.online).insert(id.to_string());
    }

    fn sent(&self) -> Vec<(String, String, Bytes)> {
        lock(&self.sent).clone()
    }

    fn record(&self, client_id: &str, msg: &Msg) -> bool {
        if !lock(&self.online).contains(client_id) {
            return false;
        }
        lock(&self.sent).push((client_id.to_string(), msg.topic.clone(), msg.payload.clone()));
        true
    }
}

impl Clients for Devices {
    fn deliver_to_client(&self, client_id: &str, msg: Arc<Msg>) -> bool {
        self.record(client_id, &msg)
    }

    fn deliver_with_receipt(&self, client_id: &str, msg: Arc<Msg>) -> Result<oneshot::Receiver<Delivery>, NotTaken> {
        if !self.record(client_id, &msg) {
            return Err(NotTaken::Offline);
        }
        let (tx, rx) = oneshot::channel();
        lock(&self.receipts).push(tx);
        Ok(rx)
    }

    fn deliver(&self, msg: Arc<Msg>) {
        lock(&self.sent).push(("*".into(), msg.topic.clone(), msg.payload.clone()));
    }
}

struct Node {
    hub: Arc<Hub>,
    devices: Arc<Devices>,
    registry: Arc<Registry>,
    _dir: tempfile::TempDir,
}

/// A root node whose registry holds `d1` (here) and `d9` (with module
/// `d9/m`) behind gateway `gw1`.
fn node() -> Node {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let registry = Arc::new(Registry::open(&store, "root", Role::Owner).unwrap());
    for (id, kind, parent) in [
        ("d1", "device", None),
        ("gw1", "gateway", None),
        ("d9", "device", Some("gw1")),
        ("d9/m", "module", None),
    ] {
        registry
            .add(NewIdentity {
                id: id.into(),
                kind: Some(kind.into()),
                parent: parent.map(str::to_string),
                ..NewIdentity::default()
            })
            .unwrap();
    }
    let devices = Arc::new(Devices::default());
    let clients: Weak<dyn Clients> = Arc::downgrade(&devices) as Weak<dyn Clients>;
    let hub = Hub::new(HubParts {
        twins: Arc::new(Twins::open(&store, false).unwrap()),
        c2d: Arc::new(C2d::open(&store, "root", 50).unwrap()),
        c2d_default_ttl: Duration::from_secs(60),
        registry: registry.clone(),
        metrics: crate::IothubMetrics::default(),
        clients,
    });
    Node {
        hub: Arc::new(hub),
        devices,
        registry,
        _dir: dir,
    }
}

fn devicebound(device: &str) -> Msg {
    Msg {
        topic: format!("devices/{device}/messages/devicebound/"),
        payload: Bytes::from_static(b"open the valve"),
        qos: QoS::AtLeastOnce,
        retain: false,
        properties: Properties::default(),
        expires_at_ms: None,
        publisher: None,
    }
}

/// Waits (with a deadline) until `done` holds.
async fn until(what: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[test]
fn a_device_gets_its_own_twin_and_the_anonymous_none() {
    let n = node();
    n.devices.connect("c1");
    n.hub.device_request("c1", Some("d1"), "$iothub/twin/GET/?$rid=7", b"");
    n.hub
        .device_request("c1", Some("anonymous"), "$iothub/twin/GET/?$rid=8", b"");
    let sent = n.devices.sent();
    assert_eq!(sent.len(), 2, "{sent:?}");
    assert_eq!(sent[0].1, "$iothub/twin/res/200/?$rid=7");
    let twin: Value = serde_json::from_slice(&sent[0].2).unwrap();
    assert_eq!(twin["desired"]["$version"], 1);
    assert_eq!(sent[1].1, "$iothub/twin/res/401/?$rid=8");
}

#[tokio::test]
async fn a_method_call_is_answered_by_the_device_called_only() {
    let n = node();
    let offline = n.hub.invoke("d1", "reboot", json!({}), Duration::from_secs(5)).await;
    assert!(matches!(offline, Err(MethodError::NotOnline(_))), "{offline:?}");
    let unknown = n
        .hub
        .invoke("nobody", "reboot", json!({}), Duration::from_secs(5))
        .await;
    assert!(matches!(unknown, Err(MethodError::NotFound(_))), "{unknown:?}");

    n.devices.connect("d1");
    let hub = n.hub.clone();
    let call = tokio::spawn(async move {
        hub.invoke("d1", "reboot", json!({"delay": 1}), Duration::from_secs(5))
            .await
    });
    until("the call", || !n.devices.sent().is_empty()).await;
    let (client, topic, payload) = n.devices.sent().remove(0);
    assert_eq!(client, "d1");
    let rid = topic
        .strip_prefix("$iothub/methods/POST/reboot/?$rid=")
        .unwrap()
        .to_string();
    assert_eq!(&payload[..], br#"{"delay":1}"#);
    // Another identity cannot answer it.
    n.hub
        .device_request("c2", Some("d2"), &format!("$iothub/methods/res/500/?$rid={rid}"), b"{}");
    n.hub.device_request(
        "d1",
        Some("d1"),
        &format!("$iothub/methods/res/200/?$rid={rid}"),
        br#"{"ok":true}"#,
    );
    let answer = call.await.unwrap().unwrap();
    assert_eq!(
        answer,
        MethodResult {
            status: 200,
            payload: json!({"ok": true})
        }
    );
}

#[tokio::test]
async fn a_method_call_goes_down_to_the_gateway_the_device_is_behind() {
    let n = node();
    let offline = n.hub.invoke("d9", "reboot", json!({}), Duration::from_secs(5)).await;
    assert!(
        matches!(offline, Err(MethodError::GatewayOffline { .. })),
        "{offline:?}"
    );

    let (tx, mut rx) = mpsc::unbounded_channel();
    n.hub.add_downlink("gw1", tx, true);
    let hub = n.hub.clone();
    let call = tokio::spawn(async move { hub.invoke("d9", "reboot", json!(null), Duration::from_secs(5)).await });
    let Some(Svc::Method { call: id, target, .. }) = rx.recv().await else {
        panic!("no method call went down")
    };
    assert_eq!(target, "d9");
    // Only the gateway asked may answer.
    n.hub.method_answered(
        "gw2",
        id,
        Ok(MethodResult {
            status: 500,
            payload: Value::Null,
        }),
    );
    n.hub
        .method_answered("gw1", id, Err(MethodError::Downstream(404, "d9 is offline".into())));
    let answer = call.await.unwrap();
    assert!(matches!(answer, Err(MethodError::Downstream(404, _))), "{answer:?}");
}

#[tokio::test]
async fn c2d_waits_for_the_device_here_and_leaves_the_queue_once_it_has_it() {
    let n = node();
    let m = n.hub.c2d_message("d1", &devicebound("d1"), None);
    let id = m.id.clone();
    assert!(!n.hub.c2d_send(m).unwrap(), "queued, not delivered");
    assert_eq!(n.hub.c2d().queues(), [("d1".to_string(), 1)]);
    assert!(n.devices.sent().is_empty());

    n.devices.connect("d1");
    holdfast_broker::Dialect::client_ready(&*n.hub, "d1");
    until("the hand-over", || lock(&n.devices.receipts).len() == 1).await;
    assert_eq!(n.devices.sent()[0].1, "devices/d1/messages/devicebound/");
    assert_eq!(n.hub.c2d().queues().len(), 1, "queued until the device has it");
    // A second flush does not hand it over again.
    let hub = n.hub.clone();
    tokio::task::spawn_blocking(move || hub.c2d_flush("d1")).await.unwrap();
    assert_eq!(n.devices.sent().len(), 1);

    let _ = lock(&n.devices.receipts).remove(0).send(Delivery::Delivered);
    until("the dequeue", || n.hub.c2d().queues().is_empty()).await;
    let feedback = n.hub.c2d().recorded(10).unwrap();
    assert_eq!(feedback.len(), 1);
    assert_eq!(
        (feedback[0].id.as_str(), feedback[0].outcome),
        (id.as_str(), Outcome::Delivered)
    );
}

#[tokio::test]
async fn c2d_for_a_gateway_stays_queued_until_the_gateway_stored_it() {
    let n = node();
    let m = n.hub.c2d_message("d9", &devicebound("d9"), None);
    let id = m.id.clone();
    assert!(!n.hub.c2d_send(m).unwrap());

    let (tx, mut rx) = mpsc::unbounded_channel();
    n.hub.add_downlink("gw1", tx.clone(), true);
    let Some(Svc::C2d { message }) = rx.recv().await else {
        panic!("nothing went down")
    };
    assert_eq!(message.id, id);
    // The link breaks before the ack: it goes again on the next one.
    n.hub.remove_downlink("gw1", &tx);
    let (tx2, mut rx2) = mpsc::unbounded_channel();
    n.hub.add_downlink("gw1", tx2, true);
    let Some(Svc::C2d { message }) = rx2.recv().await else {
        panic!("nothing went down again")
    };
    assert_eq!(message.id, id);
    n.hub.c2d_acked("gw1", &id);
    assert!(n.hub.c2d().queues().is_empty());
    assert!(n.registry.entry("d9").is_some());
}

#[test]
fn feedback_goes_up_to_the_parent_once_it_is_connected() {
    let n = node();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let gw = Hub::new(HubParts {
        twins: Arc::new(Twins::open(&store, true).unwrap()),
        c2d: Arc::new(C2d::open(&store, "gw1", 1).unwrap()),
        c2d_default_ttl: Duration::from_secs(60),
        registry: n.registry.clone(),
        metrics: crate::IothubMetrics::default(),
        clients: crate::clients::none(),
    });
    // Owned by the root; the gateway's queue for d1 holds one.
    let first = n.hub.c2d_message("d1", &devicebound("d1"), None);
    let second = n.hub.c2d_message("d1", &devicebound("d1"), None);
    assert!(matches!(gw.c2d_from_parent(first), Svc::C2dAck { .. }));
    assert!(matches!(gw.c2d_from_parent(second.clone()), Svc::C2dAck { .. }));
    assert_eq!(gw.c2d().pending_up().len(), 1, "the second was refused: feedback waits");

    let (tx, mut rx) = mpsc::unbounded_channel();
    gw.set_uplink(tx);
    let Ok(Svc::C2dFeedback { feedback }) = rx.try_recv() else {
        panic!("no feedback went up")
    };
    assert_eq!(
        (feedback.id.as_str(), feedback.outcome),
        (second.id.as_str(), Outcome::Rejected)
    );
    gw.c2d_up_acked(&second.id, Outcome::Rejected);
    assert!(gw.c2d().pending_up().is_empty());
}

fn input(device: &str, module: &str) -> Msg {
    Msg {
        topic: format!("devices/{device}/modules/{module}/inputs/in1/"),
        ..devicebound(device)
    }
}

/// A child gateway's hub over the root's registry (`d1` is here), with its
/// own store and devices.
fn gateway(n: &Node, store: &Store) -> (Arc<Hub>, Arc<Devices>) {
    let devices = Arc::new(Devices::default());
    let clients: Weak<dyn Clients> = Arc::downgrade(&devices) as Weak<dyn Clients>;
    let hub = Hub::new(HubParts {
        twins: Arc::new(Twins::open(store, true).unwrap()),
        c2d: Arc::new(C2d::open(store, "gw1", 50).unwrap()),
        c2d_default_ttl: Duration::from_secs(60),
        registry: n.registry.clone(),
        metrics: crate::IothubMetrics::default(),
        clients,
    });
    (Arc::new(hub), devices)
}

#[tokio::test]
async fn a_message_sent_again_after_a_lost_ack_is_acknowledged_not_delivered_twice() {
    let n = node();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let (gw, devices) = gateway(&n, &store);
    devices.connect("d1");
    let m = n.hub.c2d_message("d1", &devicebound("d1"), None);
    let id = m.id.clone();
    let from_parent = |gw: &Arc<Hub>, m| {
        let gw = gw.clone();
        tokio::task::spawn_blocking(move || gw.c2d_from_parent(m))
    };
    assert_eq!(
        from_parent(&gw, m.clone()).await.unwrap(),
        Svc::C2dAck { id: id.clone() }
    );
    until("the hand-over", || lock(&devices.receipts).len() == 1).await;
    let _ = lock(&devices.receipts).remove(0).send(Delivery::Delivered);
    until("the dequeue", || gw.c2d().queues().is_empty()).await;
    // The ack was lost: the parent sends it again, on a new link, and
    // again after the gateway restarted.
    assert_eq!(
        from_parent(&gw, m.clone()).await.unwrap(),
        Svc::C2dAck { id: id.clone() }
    );
    drop(gw);
    let (gw, _) = gateway(&n, &store);
    assert_eq!(from_parent(&gw, m).await.unwrap(), Svc::C2dAck { id });
    assert!(gw.c2d().queues().is_empty(), "not queued again");
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(devices.sent().len(), 1, "the device has it once");
}

#[tokio::test]
async fn a_module_input_for_a_module_behind_an_offline_gateway_waits_for_it() {
    let n = node();
    let stored = holdfast_broker::Dialect::take_device_bound(&*n.hub, &input("d9", "m")).expect("taken");
    assert!(stored.await.unwrap().is_ok(), "stored before it is acknowledged");
    assert_eq!(n.hub.c2d().queues(), [("d9/m".to_string(), 1)]);

    let (tx, mut rx) = mpsc::unbounded_channel();
    n.hub.add_downlink("gw1", tx, true);
    let Some(Svc::C2d { message }) = rx.recv().await else {
        panic!("nothing went down")
    };
    assert_eq!(message.topic, "devices/d9/modules/m/inputs/in1/");
    assert_eq!(message.device, "d9/m");
    n.hub.c2d_acked("gw1", &message.id);
    assert!(n.hub.c2d().queues().is_empty());
}

#[tokio::test]
async fn a_devicebound_message_published_here_waits_for_its_device() {
    let n = node();
    let dialect: &dyn holdfast_broker::Dialect = &*n.hub;
    let unknown = Msg {
        topic: "devices/nobody/messages/devicebound/".into(),
        ..devicebound("nobody")
    };
    assert!(
        dialect.take_device_bound(&unknown).is_none(),
        "not in scope: for subscribers"
    );
    let stored = dialect.take_device_bound(&devicebound("d1")).expect("taken");
    assert!(stored.await.unwrap().is_ok());
    assert_eq!(n.hub.c2d().queues(), [("d1".to_string(), 1)]);
    assert!(n.devices.sent().is_empty());
    n.devices.connect("d1");
    dialect.client_ready("d1");
    until("the hand-over", || lock(&n.devices.receipts).len() == 1).await;
    assert_eq!(n.devices.sent()[0].0, "d1");
}
