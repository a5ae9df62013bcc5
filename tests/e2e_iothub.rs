//! End-to-end tests of the IoT Hub device dialect: devices and modules
//! speak it over MQTT 3.1.1 with a real client library (rumqttc), as the
//! IoT Hub device SDKs do, against real `holdfast` processes; the CLI and
//! the admin API act as the cloud side.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test or benchmark: a panic is its failure

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{Value, json};
use support::client::Client;
use support::device::Device;
use support::fleet::{addr, fleet, fleet_section, listen_section, upstream_section, wait_until};
use support::proxy::Proxy;
use support::sas::{in_an_hour, sas, username};
use support::{Gateway, free_port};

/// A device answering direct methods from its own thread until dropped:
/// `slow` is never answered, `fail` answers 500, anything else 200 with
/// the payload echoed.
struct Responder {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Responder {
    fn start(port: u16, id: &str, key: &str) -> Responder {
        let d = Device::connect(port, id, key);
        d.subscribe(&["$iothub/methods/POST/#"]);
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let Some((topic, payload)) = d.try_expect("$iothub/methods/POST/", 1) else {
                    continue;
                };
                let rest = topic.trim_start_matches("$iothub/methods/POST/");
                let (name, query) = rest.split_once("/?").unwrap();
                let rid = query.trim_start_matches("$rid=");
                let (status, body) = match name {
                    "slow" => continue,
                    "fail" => (500, json!({"error": "it broke"})),
                    _ => (
                        200,
                        json!({ "device": d.id, "method": name, "echo": serde_json::from_slice::<Value>(&payload).unwrap_or(Value::Null) }),
                    ),
                };
                d.publish(&format!("$iothub/methods/res/{status}/?$rid={rid}"), body.to_string());
            }
        });
        Responder {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn key(n: u8) -> String {
    base64::engine::general_purpose::STANDARD.encode([n; 32])
}

fn identity(id: &str, kind: &str, n: u8) -> String {
    format!(
        "[[identities]]\nid = {id:?}\nkind = {kind:?}\nsas_primary = {:?}\n",
        key(n)
    )
}

/// The query parameter `name` of a `…/?a=b&c=d` topic.
fn param(topic: &str, name: &str) -> Option<String> {
    let q = topic.split_once('?')?.1;
    q.split('&')
        .find_map(|kv| kv.strip_prefix(&format!("{name}=")).map(str::to_string))
}

/// The decoded property bag after `prefix`.
fn bag(topic: &str, prefix: &str) -> Vec<(String, String)> {
    holdfast_sdk::iothub::parse_bag(topic.trim_start_matches(prefix)).unwrap()
}

fn has(pairs: &[(String, String)], k: &str, v: &str) -> bool {
    pairs.iter().any(|(a, b)| a == k && b == v)
}

const ROUTES: &str = r#"
[plugins.router.config.routes]
hot = "FROM /messages/* WHERE temperature > 30 AND $contentType = 'application/json' AND $body.level = 'high' INTO topic('alerts/hot')"
filter = "FROM /messages/modules/sensor/outputs/out1 INTO BrokeredEndpoint(\"/modules/filter/inputs/in1\")"
"#;

#[test]
fn telemetry_routes_twins_and_methods_on_one_node() {
    let mut ids = String::new();
    for (i, (id, kind)) in [
        ("dev1", "device"),
        ("dev2", "device"),
        ("dev3", "device"),
        ("edge", "device"),
        ("edge/sensor", "module"),
        ("edge/filter", "module"),
    ]
    .iter()
    .enumerate()
    {
        ids.push_str(&identity(id, kind, i as u8 + 1));
    }
    let gw = Gateway::start(&format!("{ids}{ROUTES}"));

    // Telemetry with a property bag, routed by a condition on it and on the body.
    let mut watcher = Client::connect(gw.mqtt, "watcher", true).unwrap();
    watcher.subscribe("alerts/#").unwrap();
    let dev1 = Device::connect(gw.mqtt, "dev1", &key(1));
    let events = "devices/dev1/messages/events/";
    dev1.publish(
        &format!("{events}%24.ct=application%2Fjson&%24.ce=utf-8&%24.mid=cold&temperature=20"),
        r#"{"level":"high"}"#,
    );
    dev1.publish(
        &format!("{events}%24.ct=application%2Fjson&%24.mid=low&temperature=35"),
        r#"{"level":"low"}"#,
    );
    dev1.publish(
        &format!("{events}%24.ct=application%2Fjson&%24.ce=utf-8&%24.mid=hot-1&temperature=35&site=Plant%207"),
        r#"{"level":"high"}"#,
    );
    let got = watcher.recv(Duration::from_secs(10)).unwrap().expect("the hot message");
    assert_eq!(got.topic, "alerts/hot");
    assert_eq!(
        got.prop("$.mid"),
        Some("hot-1"),
        "only the message matching every condition"
    );
    assert_eq!(got.prop("site"), Some("Plant 7"));
    assert_eq!(got.prop("$.cdid"), Some("dev1"));
    dev1.publish(&format!("{events}%zz=1"), "bad bag");
    wait_until(10, "the bad property bag to be counted", || {
        gw.metric("holdfast_mqtt_denied_total{reason=\"bad-property-bag\"}") >= 1.0
    });

    // Module output → module input, in both output forms.
    let filter = Device::connect(gw.mqtt, "edge/filter", &key(6));
    filter.subscribe(&["devices/edge/modules/filter/inputs/#"]);
    let sensor = Device::connect(gw.mqtt, "edge/sensor", &key(5));
    sensor.publish("devices/edge/modules/sensor/messages/events/%24.on=out1&unit=C", "21.5");
    let (topic, payload) = filter.expect("devices/edge/modules/filter/inputs/in1/");
    assert_eq!(payload, b"21.5");
    let props = bag(&topic, "devices/edge/modules/filter/inputs/in1/");
    assert!(
        has(&props, "unit", "C") && has(&props, "$.on", "out1") && has(&props, "$.cmid", "sensor"),
        "{props:?}"
    );
    sensor.publish("devices/edge/modules/sensor/outputs/out1/n=2", "x");
    let (topic, _) = filter.expect("devices/edge/modules/filter/inputs/in1/");
    assert!(has(&bag(&topic, "devices/edge/modules/filter/inputs/in1/"), "n", "2"));
    sensor.publish("devices/edge/modules/sensor/outputs/out2", "not routed to the filter");

    // Twins: get, reported patch, limits, desired patch from the admin side.
    dev1.subscribe(&["$iothub/twin/res/#", "$iothub/twin/PATCH/properties/desired/#"]);
    dev1.publish("$iothub/twin/GET/?$rid=1", "");
    let (topic, doc) = dev1.expect_json("$iothub/twin/res/");
    assert!(topic.starts_with("$iothub/twin/res/200/?$rid=1"), "{topic}");
    assert_eq!(doc, json!({"desired": {"$version": 1}, "reported": {"$version": 1}}));
    dev1.publish(
        "$iothub/twin/PATCH/properties/reported/?$rid=2",
        r#"{"firmware":"1.2","net":{"rssi":-70}}"#,
    );
    // A GET right behind the patch sees it: answers come in request order.
    dev1.publish("$iothub/twin/GET/?$rid=21", "");
    let (topic, _) = dev1.expect("$iothub/twin/res/");
    assert_eq!(topic, "$iothub/twin/res/204/?$rid=2&$version=2");
    let (topic, doc) = dev1.expect_json("$iothub/twin/res/");
    assert!(topic.starts_with("$iothub/twin/res/200/?$rid=21"), "{topic}");
    assert_eq!(doc["reported"]["$version"], 2, "{doc}");
    let deep = (0..12).fold(json!(1), |v, _| json!({ "x": v }));
    dev1.publish("$iothub/twin/PATCH/properties/reported/?$rid=3", deep.to_string());
    let (topic, err) = dev1.expect_json("$iothub/twin/res/");
    assert_eq!(topic, "$iothub/twin/res/400/?$rid=3", "{err}");
    assert!(err["error"].as_str().unwrap().contains("deeper than 10"), "{err}");
    dev1.publish("$iothub/twin/PATCH/properties/reported/?$rid=4", "not json");
    assert!(
        dev1.expect("$iothub/twin/res/")
            .0
            .starts_with("$iothub/twin/res/400/?$rid=4")
    );
    gw.cli_ok(&["twin", "set-desired", "dev1", r#"{"mode":"eco","fan":{"speed":2}}"#]);
    let (topic, patch) = dev1.expect_json("$iothub/twin/PATCH/properties/desired/");
    assert_eq!(topic, "$iothub/twin/PATCH/properties/desired/?$version=2");
    assert_eq!(patch, json!({"mode": "eco", "fan": {"speed": 2}, "$version": 2}));
    gw.cli_ok(&["twin", "set-desired", "dev1", r#"{"fan":{"speed":null}}"#]);
    let (_, patch) = dev1.expect_json("$iothub/twin/PATCH/properties/desired/");
    assert_eq!(patch, json!({"fan": {"speed": null}, "$version": 3}));
    let twin: Value = serde_json::from_str(&gw.cli_ok(&["twin", "show", "dev1", "--json"])).unwrap();
    assert_eq!(twin["reported"], json!({"firmware": "1.2", "net": {"rssi": -70}}));
    assert_eq!(
        (twin["reported_version"].as_u64(), twin["desired_version"].as_u64()),
        (Some(2), Some(3))
    );
    let shown = gw.cli_ok(&["twin", "show", "dev1"]);
    assert!(
        shown.contains("reported (version 2)") && shown.contains("\"firmware\": \"1.2\""),
        "{shown}"
    );
    let bad = gw.cli(&["twin", "set-desired", "dev1", r#"{"a.b":1}"#]);
    assert!(String::from_utf8_lossy(&bad.stderr).contains("HTTP 400"));

    // Direct methods: from the CLI, from another device, timeouts, offline targets.
    let responder = Responder::start(gw.mqtt, "dev2", &key(2));
    let out: Value =
        serde_json::from_str(&gw.cli_ok(&["method", "invoke", "dev2", "reboot", r#"{"delay":1}"#, "--json"])).unwrap();
    assert_eq!(
        out,
        json!({"status": 200, "payload": {"device": "dev2", "method": "reboot", "echo": {"delay": 1}}})
    );
    let text = gw.cli_ok(&["method", "invoke", "dev2", "fail"]);
    assert!(text.starts_with("status 500"), "{text}");
    let start = Instant::now();
    let slow = gw.cli(&["method", "invoke", "dev2", "slow", "--timeout", "1"]);
    let err = String::from_utf8_lossy(&slow.stderr);
    assert!(
        err.contains("did not answer slow within 1000 ms") && err.contains("HTTP 504"),
        "{err}"
    );
    assert!(start.elapsed() < Duration::from_secs(10));
    let offline = gw.cli(&["method", "invoke", "dev3", "reboot"]);
    assert!(String::from_utf8_lossy(&offline.stderr).contains("dev3 is not online"));
    let unknown = gw.cli(&["method", "invoke", "nobody", "reboot"]);
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("HTTP 404"));

    dev1.subscribe(&["$holdfast/methods/res/#"]);
    dev1.publish("$holdfast/methods/POST/dev2/ping/?$rid=42", r#"{"n":7}"#);
    let (topic, answer) = dev1.expect_json("$holdfast/methods/res/");
    assert_eq!(topic, "$holdfast/methods/res/200/?$rid=42");
    assert_eq!(answer["echo"], json!({"n": 7}));
    dev1.publish("$holdfast/methods/POST/dev3/ping/?$rid=43", "{}");
    let (topic, answer) = dev1.expect_json("$holdfast/methods/res/");
    assert_eq!(topic, "$holdfast/methods/res/404/?$rid=43", "{answer}");

    // A device cannot answer a call made to another device.
    let dev3 = Device::connect(gw.mqtt, "dev3", &key(3));
    dev3.subscribe(&["$iothub/methods/POST/#"]);
    let caller = std::thread::spawn({
        let mut cli = gw.cli_args(&["method", "invoke", "dev3", "who", "--timeout", "3"]);
        move || cli.output().unwrap()
    });
    let (topic, _) = dev3.expect("$iothub/methods/POST/who/");
    let rid = param(&topic, "$rid").unwrap();
    dev1.publish(&format!("$iothub/methods/res/200/?$rid={rid}"), r#"{"forged":true}"#);
    std::thread::sleep(Duration::from_millis(300));
    dev3.publish(&format!("$iothub/methods/res/201/?$rid={rid}"), r#"{"real":true}"#);
    let out = caller.join().unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("status 201"),
        "{out:?}"
    );

    // Cloud-to-device through the admin API, with its property bag.
    dev1.subscribe(&["devices/dev1/messages/devicebound/#"]);
    let (code, body) = gw.post(
        "/api/v1/devices/dev1/messages",
        &json!({"payload": "hello", "properties": {"kind": "greeting"}}),
    );
    assert_eq!(code, 202, "{body}");
    let (topic, payload) = dev1.expect("devices/dev1/messages/devicebound/");
    assert_eq!(payload, b"hello");
    assert!(has(
        &bag(&topic, "devices/dev1/messages/devicebound/"),
        "kind",
        "greeting"
    ));
    // And through the CLI.
    let out = gw.cli_ok(&["device", "send", "dev1", "again", "--property", "kind=cli"]);
    assert!(
        out.starts_with("sent to dev1 on devices/dev1/messages/devicebound/"),
        "{out}"
    );
    let (topic, payload) = dev1.expect("devices/dev1/messages/devicebound/");
    assert_eq!(payload, b"again");
    assert!(has(&bag(&topic, "devices/dev1/messages/devicebound/"), "kind", "cli"));

    // Routes change at runtime by a plugin swap with new routes; clients stay connected.
    let routes = gw.dir.path().join("routes.toml");
    std::fs::write(
        &routes,
        "[routes]\nhot = \"FROM /messages/* WHERE temperature > 40 INTO topic('alerts/hotter')\"\n",
    )
    .unwrap();
    let broken = gw.dir.path().join("broken.toml");
    std::fs::write(
        &broken,
        "[routes]\nhot = \"FROM /messages/* WHERE temperature > INTO $upstream\"\n",
    )
    .unwrap();
    let refused = gw.cli(&[
        "plugin",
        "swap",
        "router",
        "embedded",
        "--plugin-config",
        broken.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains("routes.hot: column 38: expected a value, found keyword INTO"),
        "{err}"
    );
    let connects = gw.metric("holdfast_mqtt_connects_total{result=\"ok\"}");
    gw.cli_ok(&[
        "plugin",
        "swap",
        "router",
        "embedded",
        "--plugin-config",
        routes.to_str().unwrap(),
    ]);
    dev1.publish(&format!("{events}temperature=35"), "{}");
    dev1.publish(&format!("{events}temperature=45&%24.mid=after-swap"), "{}");
    let got = watcher
        .recv(Duration::from_secs(10))
        .unwrap()
        .expect("routed by the new table");
    assert_eq!(
        (got.topic.as_str(), got.prop("$.mid")),
        ("alerts/hotter", Some("after-swap"))
    );
    // The same connections carry on.
    dev1.publish("$iothub/twin/GET/?$rid=9", "");
    assert!(dev1.expect("$iothub/twin/res/200/?$rid=9").0.contains("$rid=9"));
    assert_eq!(gw.metric("holdfast_mqtt_connects_total{result=\"ok\"}"), connects);
    drop(responder);
}

/// Registers an identity at `gw`; its primary SAS key.
fn add(gw: &Gateway, args: &[&str]) -> String {
    gw.add_identity(args).0
}

fn twin(gw: &Gateway, id: &str) -> Value {
    gw.api(&format!("/api/v1/twins/{id}"))
}

#[test]
fn twins_and_methods_across_a_cut_link() {
    let certs = fleet(&["root", "gw1"]);
    let link = free_port();
    let root = Gateway::start_named(
        "root",
        &format!("{}{}", fleet_section(certs.path(), "root"), listen_section(link)),
    );
    add(&root, &["gw1", "--kind", "gateway", "--parent", "root"]);
    let k1 = add(&root, &["dev1", "--parent", "gw1"]);
    let k2 = add(&root, &["dev2", "--parent", "gw1"]);
    add(&root, &["dev3", "--parent", "gw1"]);
    let proxy = Proxy::start(addr(link));
    let gw1 = Gateway::start_named(
        "gw1",
        &format!(
            "{}{}",
            fleet_section(certs.path(), "gw1"),
            upstream_section(proxy.udp, "root")
        ),
    );
    wait_until(20, "gw1 to sync its scope", || {
        support::http_get(gw1.port, "/api/v1/devices/dev2", Some(gw1.token().trim())).is_some_and(|(c, _)| c == 200)
    });
    let dev1 = Device::connect(gw1.mqtt, "dev1", &k1);
    dev1.subscribe(&[
        "$iothub/twin/res/#",
        "$iothub/twin/PATCH/properties/desired/#",
        "$holdfast/methods/res/#",
        "devices/dev1/messages/devicebound/#",
    ]);
    let responder = Responder::start(gw1.mqtt, "dev2", &k2);

    // Online: desired down, reported up, a method and a C2D message from the root.
    root.cli_ok(&["twin", "set-desired", "dev1", r#"{"a":1}"#]);
    let (topic, patch) = dev1.expect_json("$iothub/twin/PATCH/properties/desired/");
    assert_eq!(
        (topic.as_str(), patch),
        (
            "$iothub/twin/PATCH/properties/desired/?$version=2",
            json!({"a": 1, "$version": 2})
        )
    );
    dev1.publish("$iothub/twin/PATCH/properties/reported/?$rid=1", r#"{"r":1}"#);
    dev1.expect("$iothub/twin/res/204/");
    wait_until(10, "the reported patch to reach the root", || {
        twin(&root, "dev1")["reported"] == json!({"r": 1})
    });
    let out: Value = serde_json::from_str(&root.cli_ok(&["method", "invoke", "dev2", "status", "--json"])).unwrap();
    assert_eq!(out["status"], 200, "a method from upstream, through gw1: {out}");
    assert_eq!(out["payload"]["device"], "dev2");
    let absent = root.cli(&["method", "invoke", "dev3", "status"]);
    let err = String::from_utf8_lossy(&absent.stderr);
    assert!(
        err.contains("dev3 is not online") && err.contains("HTTP 404"),
        "gw1's answer, passed up: {err}"
    );
    let (code, _) = root.post("/api/v1/devices/dev1/messages", &json!({"payload": "from the cloud"}));
    assert_eq!(code, 202);
    assert_eq!(dev1.expect("devices/dev1/messages/devicebound/").1, b"from the cloud");
    let rep_version = twin(&root, "dev1")["reported_version"].as_u64().unwrap();

    // The link is cut.
    proxy.cmd("cut");
    wait_until(20, "gw1 to notice the cut", || {
        gw1.api("/api/v1/link")["link"]["state"] != "up"
    });

    // Offline at gw1: reported patches merge locally; methods between local devices work.
    dev1.publish("$iothub/twin/PATCH/properties/reported/?$rid=2", r#"{"r":2,"x":1}"#);
    assert_eq!(
        dev1.expect("$iothub/twin/res/").0,
        "$iothub/twin/res/204/?$rid=2&$version=3"
    );
    dev1.publish(
        "$iothub/twin/PATCH/properties/reported/?$rid=3",
        r#"{"x":null,"y":{"z":3}}"#,
    );
    assert_eq!(
        dev1.expect("$iothub/twin/res/").0,
        "$iothub/twin/res/204/?$rid=3&$version=4"
    );
    assert_eq!(
        twin(&gw1, "dev1")["pending_upstream"],
        json!({"r": 2, "x": null, "y": {"z": 3}})
    );
    dev1.publish("$holdfast/methods/POST/dev2/ping/?$rid=7", r#"{"offline":true}"#);
    let (topic, answer) = dev1.expect_json("$holdfast/methods/res/");
    assert_eq!(topic, "$holdfast/methods/res/200/?$rid=7");
    assert_eq!(
        answer["echo"],
        json!({"offline": true}),
        "device to device while offline"
    );
    // A method from the root cannot reach gw1 now.
    let unreachable = root.cli(&["method", "invoke", "dev2", "status", "--timeout", "2"]);
    assert!(!unreachable.status.success());

    // Meanwhile the desired properties change twice at the root.
    root.cli_ok(&["twin", "set-desired", "dev1", r#"{"a":2,"b":{"c":1}}"#]);
    root.cli_ok(&["twin", "set-desired", "dev1", r#"{"a":null}"#]);
    assert_eq!(
        twin(&root, "dev1")["reported"],
        json!({"r": 1}),
        "nothing went up while cut"
    );
    assert!(dev1.try_expect("$iothub/twin/PATCH/properties/desired/", 1).is_none());

    // The link returns: one desired diff down, one merged reported patch up.
    let reconnected = Instant::now();
    proxy.cmd("up");
    let (topic, patch) = dev1.expect_json("$iothub/twin/PATCH/properties/desired/");
    println!(
        "desired diff reached the device {} ms after the link returned",
        reconnected.elapsed().as_millis()
    );
    assert_eq!(topic, "$iothub/twin/PATCH/properties/desired/?$version=4");
    assert_eq!(patch, json!({"a": null, "b": {"c": 1}, "$version": 4}));
    wait_until(15, "the merged patch to reach the root", || {
        twin(&root, "dev1")["reported"] == json!({"r": 2, "y": {"z": 3}})
    });
    println!(
        "merged reported patch reached the root {} ms after the link returned",
        reconnected.elapsed().as_millis()
    );
    assert!(
        dev1.try_expect("$iothub/twin/PATCH/properties/desired/", 1).is_none(),
        "one diff, not one patch per change"
    );
    assert_eq!(
        twin(&root, "dev1")["reported_version"].as_u64().unwrap(),
        rep_version + 1,
        "pushed up once"
    );
    wait_until(10, "gw1 to drop the acknowledged patch", || {
        twin(&gw1, "dev1")["pending_upstream"].is_null()
    });
    let out: Value = serde_json::from_str(&root.cli_ok(&["method", "invoke", "dev2", "status", "--json"])).unwrap();
    assert_eq!(out["status"], 200, "methods from upstream work again: {out}");
    drop(responder);
}

/// The same dialect from another client library: paho-mqtt in Python, MQTT 3.1.1.
#[test]
fn a_paho_device_speaks_the_dialect() {
    use std::io::{BufRead, BufReader};
    let gw = Gateway::start(&identity("pump-7", "device", 9));
    let mut watcher = Client::connect(gw.mqtt, "watcher", true).unwrap();
    watcher.subscribe("devices/#").unwrap();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/iothub/paho_device.py");
    let mut child = std::process::Command::new("python3")
        .arg(&script)
        .args([&gw.mqtt.to_string(), "pump-7", &key(9)])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3 with paho-mqtt (scripts/setup.sh installs it)");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut next = || lines.next().expect("the script ended early").unwrap();
    assert_eq!(next(), "telemetry sent");
    let got = watcher.recv(Duration::from_secs(10)).unwrap().expect("the telemetry");
    assert!(
        got.topic.starts_with("devices/pump-7/messages/events/"),
        "{}",
        got.topic
    );
    assert_eq!(got.prop("source"), Some("paho"));
    assert_eq!(got.prop("$.ct"), Some("application/json"));
    assert_eq!(next(), "twin 200 desired=1 reported=1");
    assert_eq!(next(), "patched $iothub/twin/res/204/?$rid=2&$version=2");
    assert_eq!(next(), "READY");
    let out: Value =
        serde_json::from_str(&gw.cli_ok(&["method", "invoke", "pump-7", "reboot", r#"{"now":true}"#, "--json"]))
            .unwrap();
    assert_eq!(
        out,
        json!({"status": 200, "payload": {"from": "paho", "method": "reboot", "got": {"now": true}}})
    );
    assert_eq!(next(), "answered reboot");
    gw.cli_ok(&["twin", "set-desired", "pump-7", r#"{"interval":30}"#]);
    assert_eq!(next(), r#"desired 2 {"$version": 2, "interval": 30}"#);
    assert!(child.wait().unwrap().success());
    assert_eq!(twin(&gw, "pump-7")["reported"], json!({"client": "paho"}));
}

/// A device on a raw MQTT 5 connection that acknowledges only when told,
/// with its own receive maximum and Maximum Packet Size.
struct RawDevice {
    stream: std::net::TcpStream,
    buf: bytes::BytesMut,
}

impl RawDevice {
    fn connect(port: u16, id: &str, key: &str, receive_max: u16, max_packet: u32) -> RawDevice {
        use holdfast_mqtt as codec;
        let stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let mut d = RawDevice {
            stream,
            buf: bytes::BytesMut::new(),
        };
        let properties = codec::Properties {
            receive_maximum: Some(receive_max),
            maximum_packet_size: Some(max_packet),
            ..Default::default()
        };
        d.send(&codec::Packet::Connect(Box::new(codec::Connect {
            version: codec::Version::V5,
            client_id: id.into(),
            clean_start: true,
            keep_alive: 60,
            username: Some(username(id)),
            password: Some(bytes::Bytes::from(sas(id, key, in_an_hour()))),
            will: None,
            properties,
        })));
        match d.next(Duration::from_secs(10)) {
            Some(codec::Packet::ConnAck(a)) if a.code == 0 => d,
            other => panic!("{id}: no CONNACK: {other:?}"),
        }
    }

    fn send(&mut self, p: &holdfast_mqtt::Packet) {
        use std::io::Write as _;
        let mut out = bytes::BytesMut::new();
        holdfast_mqtt::encode(p, holdfast_mqtt::Version::V5, &mut out);
        self.stream.write_all(&out).unwrap();
    }

    /// The next packet within `timeout`.
    fn next(&mut self, timeout: Duration) -> Option<holdfast_mqtt::Packet> {
        use std::io::Read as _;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(p) = holdfast_mqtt::decode(&mut self.buf, Some(holdfast_mqtt::Version::V5), 1 << 24).unwrap() {
                return Some(p);
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            self.stream
                .set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .unwrap();
            let mut chunk = [0u8; 4096];
            match self.stream.read(&mut chunk) {
                Ok(0) => panic!("the broker closed the connection"),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                    return None;
                }
                Err(e) => panic!("{e}"),
            }
        }
    }

    /// Subscribes at QoS 1 and waits for the SUBACK.
    fn subscribe(&mut self, filter: &str) {
        use holdfast_mqtt as codec;
        self.send(&codec::Packet::Subscribe(codec::Subscribe {
            pkid: 1,
            filters: vec![(
                filter.into(),
                codec::SubOptions {
                    qos: codec::QoS::AtLeastOnce,
                    ..codec::SubOptions::default()
                },
            )],
            properties: codec::Properties::default(),
        }));
        match self.next(Duration::from_secs(10)) {
            Some(codec::Packet::SubAck(a)) => assert_eq!(a.codes, [1]),
            other => panic!("no SUBACK: {other:?}"),
        }
    }

    /// The next PUBLISH within `timeout`, not acknowledged.
    fn publish(&mut self, timeout: Duration) -> Option<holdfast_mqtt::Publish> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            if let holdfast_mqtt::Packet::Publish(p) = self.next(left)? {
                return Some(p);
            }
        }
    }

    fn ack(&mut self, pkid: u16) {
        self.send(&holdfast_mqtt::Packet::PubAck(holdfast_mqtt::Ack::new(pkid)));
    }
}

/// Issue 28, item 3: a cloud-to-device message leaves the durable queue
/// only when the device has it (its PUBACK), not when the broker was handed
/// it: one that finds the device's session queue full waits and goes once
/// there is room; one larger than the device's Maximum Packet Size is
/// `rejected` with that reason, and the next goes.
#[test]
fn c2d_leaves_the_queue_only_when_the_device_has_it() {
    let gw = Gateway::start(&format!(
        "[mqtt]\nmax_queued_messages = 2\n{}{}",
        identity("dev1", "device", 1),
        identity("dev2", "device", 2)
    ));
    let c2d = || gw.api("/api/v1/c2d");
    let queued = |device: &str| -> u64 {
        c2d()["queues"]
            .as_array()
            .unwrap()
            .iter()
            .find(|q| q["device"] == device)
            .map_or(0, |q| q["messages"].as_u64().unwrap())
    };
    let feedback = |id: &str| -> Option<Value> {
        c2d()["feedback"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["id"] == id)
            .cloned()
    };
    let send = |device: &str, payload: &str| -> String {
        let (code, body) = gw.post(
            &format!("/api/v1/devices/{device}/messages"),
            &json!({ "payload": payload }),
        );
        assert_eq!(code, 202, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            v["state"], "queued",
            "nothing is delivered before the device acknowledges it: {v}"
        );
        v["id"].as_str().unwrap().to_string()
    };

    // One message in flight (receive maximum 1), two in the session queue
    // (mqtt.max_queued_messages), the fourth finds the queue full.
    let mut dev1 = RawDevice::connect(gw.mqtt, "dev1", &key(1), 1, 1 << 20);
    dev1.subscribe("devices/dev1/messages/devicebound/#");
    let ids: Vec<String> = (1..=4).map(|i| send("dev1", &format!("m{i}"))).collect();
    let first = dev1.publish(Duration::from_secs(10)).expect("m1 reaches the device");
    assert_eq!(&first.payload[..], b"m1");
    assert_eq!(queued("dev1"), 4, "{}", c2d());
    for id in &ids {
        assert_eq!(feedback(id), None, "no feedback before the device has it: {}", c2d());
    }
    assert_eq!(
        gw.metric("holdfast_mqtt_messages_dropped_total{reason=\"queue-full\"}"),
        0.0,
        "{}",
        gw.metrics()
    );
    // Acknowledged one by one, each goes in order, the fourth included.
    dev1.ack(first.pkid);
    for i in 2..=4 {
        let p = dev1
            .publish(Duration::from_secs(10))
            .unwrap_or_else(|| panic!("m{i} never came: {}", c2d()));
        assert_eq!(String::from_utf8_lossy(&p.payload), format!("m{i}"));
        dev1.ack(p.pkid);
    }
    wait_until(10, "four delivered", || {
        ids.iter()
            .all(|id| feedback(id).is_some_and(|f| f["outcome"] == "delivered"))
    });
    assert_eq!(queued("dev1"), 0);
    assert!(
        dev1.publish(Duration::from_millis(300)).is_none(),
        "each message goes once"
    );

    // A device that accepts packets of at most 128 bytes.
    let mut dev2 = RawDevice::connect(gw.mqtt, "dev2", &key(2), 10, 128);
    dev2.subscribe("devices/dev2/messages/devicebound/#");
    let big = send("dev2", &"x".repeat(300));
    wait_until(10, "the large message rejected", || feedback(&big).is_some());
    let f = feedback(&big).unwrap();
    assert_eq!(f["outcome"], "rejected", "{f}");
    let reason = f["reason"].as_str().unwrap();
    assert!(reason.contains("Maximum Packet Size is 128 bytes"), "{reason}");
    let small = send("dev2", "fits");
    let p = dev2.publish(Duration::from_secs(10)).expect("the small one goes");
    assert_eq!(&p.payload[..], b"fits");
    assert_eq!(feedback(&small), None, "not delivered before the PUBACK");
    dev2.ack(p.pkid);
    wait_until(10, "the small one delivered", || {
        feedback(&small).is_some_and(|f| f["outcome"] == "delivered")
    });
    assert_eq!(queued("dev2"), 0);
    gw.stop();
}
