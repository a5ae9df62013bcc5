//! End-to-end tests of device-bound messages through real `holdfast`
//! processes: each hop takes a cloud-to-device message once (a resend after
//! a lost acknowledgement is acknowledged, not delivered again), and
//! nothing device-bound skips the durable queue (a module behind an offline
//! gateway, a device that is not connected, a node restart in between).
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test or benchmark: a panic is its failure

mod support;

use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};
use support::client::Client;
use support::fleet::{addr, fleet, fleet_section, listen_section, upstream_section, wait_until};
use support::proxy::Proxy;
use support::{Gateway, free_port};

const ANONYMOUS: &str = "[plugins.auth.config]\nallow_anonymous = true\nanonymous_topics = [\"#\"]\n";

fn identity(id: &str, kind: &str, parent: Option<&str>) -> String {
    let parent = parent.map_or(String::new(), |p| format!("parent = \"{p}\"\n"));
    format!("[[identities]]\nid = \"{id}\"\nkind = \"{kind}\"\n{parent}")
}

/// A root with `identities` (gw1 among them) and gw1 linked to it through a
/// proxy; returns once gw1's link is up and `device` is in its scope.
fn tree(certs: &Path, identities: &str, device: &str) -> (Gateway, Proxy, Gateway) {
    let link = free_port();
    let root = Gateway::start_named(
        "root",
        &format!(
            "{}{}{ANONYMOUS}{}{identities}",
            fleet_section(certs, "root"),
            listen_section(link),
            identity("gw1", "gateway", Some("root")),
        ),
    );
    let proxy = Proxy::start(addr(link));
    let gw1 = Gateway::start_named(
        "gw1",
        &format!(
            "{}{}{ANONYMOUS}",
            fleet_section(certs, "gw1"),
            upstream_section(proxy.udp, "root")
        ),
    );
    wait_until(20, "gw1 up", || up(&gw1));
    wait_until(20, &format!("{device} in gw1's scope"), || {
        gw1.cli(&["device", "show", device]).status.success()
    });
    (root, proxy, gw1)
}

fn up(gw: &Gateway) -> bool {
    gw.api("/api/v1/link")["link"]["state"] == "up"
}

/// Messages queued at `gw` for `id`.
fn queued(gw: &Gateway, id: &str) -> u64 {
    gw.api("/api/v1/c2d")["queues"]
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["device"] == id)
        .map_or(0, |q| q["messages"].as_u64().unwrap())
}

fn events(gw: &Gateway, event: &str) -> f64 {
    gw.metric(&format!("holdfast_iothub_events_total{{event=\"{event}\"}}"))
}

/// A message stored at gw1 and delivered, whose acknowledgement to the root
/// is lost (the proxy drops what gw1 sends): after the cut the root sends it
/// again, gw1 acknowledges it without queuing it, and the device has it once.
#[test]
fn a_c2d_message_whose_ack_is_lost_reaches_the_device_once() {
    let certs = fleet(&["root", "gw1"]);
    let (root, proxy, gw1) = tree(certs.path(), &identity("dev1", "device", Some("gw1")), "dev1");
    let mut dev = Client::connect(gw1.mqtt, "dev1", true).unwrap();
    dev.subscribe("devices/dev1/messages/devicebound/#").unwrap();

    // What gw1 sends is lost from now on; what the root sends arrives.
    proxy.cmd("blackhole-up");
    let (code, body) = root.post("/api/v1/devices/dev1/messages", &json!({"payload": "m1"}));
    assert_eq!(code, 202, "{body}");
    let got = dev
        .recv(Duration::from_secs(15))
        .unwrap()
        .expect("m1 reaches the device");
    assert_eq!(got.payload, "m1");
    wait_until(10, "gw1 to dequeue m1 (the device acknowledged it)", || {
        queued(&gw1, "dev1") == 0
    });
    proxy.cmd("cut");
    wait_until(30, "gw1 to notice the cut", || !up(&gw1));
    assert_eq!(queued(&root, "dev1"), 1, "the root never got gw1's acknowledgement");

    // The link returns: the root sends m1 again; gw1 acknowledges it.
    proxy.cmd("up");
    wait_until(30, "gw1 up again", || up(&gw1));
    wait_until(30, "the root's queue to empty", || queued(&root, "dev1") == 0);
    // The next message is m2: m1 did not come again before it.
    let (code, body) = root.post("/api/v1/devices/dev1/messages", &json!({"payload": "m2"}));
    assert_eq!(code, 202, "{body}");
    let next = dev
        .recv(Duration::from_secs(15))
        .unwrap()
        .expect("m2 reaches the device");
    assert_eq!(next.payload, "m2", "m1 reached the device twice");
    assert!(events(&gw1, "c2d-duplicate") >= 1.0, "{}", gw1.metrics());
    wait_until(20, "the feedback of both at the root", || {
        let fb = root.api("/api/v1/c2d")["feedback"].clone();
        fb.as_array()
            .unwrap()
            .iter()
            .filter(|f| f["outcome"] == "delivered")
            .count()
            == 2
    });
}

/// A module-input message published at the root for a module behind gw1
/// while gw1 is cut off: queued at the root, handed down when gw1 returns,
/// and delivered to the module.
#[test]
fn a_module_input_for_a_module_behind_an_offline_gateway_arrives_after_it_reconnects() {
    let certs = fleet(&["root", "gw1"]);
    let ids = format!(
        "{}{}",
        identity("edge", "device", Some("gw1")),
        identity("edge/filter", "module", None)
    );
    let (root, proxy, gw1) = tree(certs.path(), &ids, "edge/filter");
    let mut module = Client::connect(gw1.mqtt, "edge/filter", true).unwrap();
    module.subscribe("devices/edge/modules/filter/inputs/#").unwrap();
    proxy.cmd("cut");
    wait_until(30, "gw1 down", || !up(&gw1));

    let mut backend = Client::connect(root.mqtt, "backend", true).unwrap();
    let topic = "devices/edge/modules/filter/inputs/in1/unit=C";
    assert!(
        backend.publish_acked(topic, "21.5", Duration::from_secs(10)).unwrap(),
        "acknowledged once queued"
    );
    assert_eq!(queued(&root, "edge/filter"), 1, "{}", root.api("/api/v1/c2d"));
    assert_eq!(events(&root, "c2d-child-offline"), 0.0, "not dropped");

    proxy.cmd("up");
    let got = module
        .recv(Duration::from_secs(30))
        .unwrap()
        .expect("the input after gw1 reconnects");
    assert_eq!((got.topic.as_str(), got.payload.as_str()), (topic, "21.5"));
    wait_until(20, "the root's queue to empty", || queued(&root, "edge/filter") == 0);
}

/// A devicebound message a local client publishes while its device is not
/// connected is acknowledged once stored, survives a crash of the node, and
/// reaches the device when it connects.
#[test]
fn a_devicebound_message_published_here_waits_for_the_device_through_a_restart() {
    let mut gw = Gateway::start(&format!("{ANONYMOUS}{}", identity("dev1", "device", None)));
    let mut backend = Client::connect(gw.mqtt, "backend", true).unwrap();
    let topic = "devices/dev1/messages/devicebound/k=v";
    assert!(
        backend
            .publish_acked(topic, "open the valve", Duration::from_secs(10))
            .unwrap()
    );
    drop(backend);
    let c2d: Value = gw.api("/api/v1/c2d");
    assert_eq!(queued(&gw, "dev1"), 1, "{c2d}");

    gw.crash_restart();
    assert_eq!(queued(&gw, "dev1"), 1, "kept through the crash");
    let mut dev = Client::connect(gw.mqtt, "dev1", true).unwrap();
    dev.subscribe("devices/dev1/messages/devicebound/#").unwrap();
    let got = dev
        .recv(Duration::from_secs(15))
        .unwrap()
        .expect("the message, once connected");
    assert_eq!((got.topic.as_str(), got.payload.as_str()), (topic, "open the valve"));
    wait_until(10, "its delivery recorded", || queued(&gw, "dev1") == 0);
    assert!(dev.recv(Duration::from_millis(500)).unwrap().is_none(), "once");
}
