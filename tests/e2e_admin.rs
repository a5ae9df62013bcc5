//! End-to-end tests of the operator surface: the OpenAPI document against
//! the routes a running node serves, the status page in headless Chromium,
//! `holdfast queue wait-empty` while a link comes back, and SIGTERM with
//! publishers running.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test or benchmark: a panic is its failure

mod support;

use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{Value, json};
use support::browser::Browser;
use support::client::Client;
use support::delivery::Consumer;
use support::fleet::{addr, fleet, fleet_section, listen_section, upstream_section, wait_until};
use support::origin::Origin;
use support::{Gateway, free_port, http_get, http_request};

/// A child gateway whose parent (`root` on `link_port`) is not up yet.
fn start_child(certs: &Path, link_port: u16, extra: &str) -> Gateway {
    Gateway::start_named(
        "child",
        &format!(
            "{}{}{extra}",
            fleet_section(certs, "child"),
            upstream_section(addr(link_port), "root")
        ),
    )
}

/// The root on `link_port`, with `child` registered as its gateway.
fn start_root(certs: &Path, link_port: u16) -> Gateway {
    Gateway::start_named(
        "root",
        &format!(
            "{}{}[[identities]]\nid = \"child\"\nkind = \"gateway\"\nparent = \"root\"\n",
            fleet_section(certs, "root"),
            listen_section(link_port)
        ),
    )
}

/// Publishes `n` QoS 1 messages `from..from+n` on `topic`; all must be acknowledged.
fn publish(port: u16, client_id: &str, topic: &str, from: u64, n: u64) {
    let mut c = Client::connect(port, client_id, true).unwrap();
    for seq in from..from + n {
        assert!(
            c.publish_acked(topic, &seq.to_string(), Duration::from_secs(10))
                .unwrap(),
            "publish {seq} was not acknowledged"
        );
    }
}

/// Fetches `path` of the test origin twice through the cache on `port`: a
/// miss, then a hit.
fn fetch_twice(port: u16, path: &str) {
    for _ in 0..2 {
        let st = Command::new("curl")
            .args(["-sf", "-o", "/dev/null", "-H", "Host: origin.test"])
            .arg(format!("http://127.0.0.1:{port}{path}"))
            .status()
            .unwrap();
        assert!(st.success());
    }
}

/// Every operation in `/openapi.json` is served (the router answers it, not
/// with its own 404 or 405), the document is valid OpenAPI 3.1, and every
/// `/api/v1` operation refuses a request without the token. The unit test
/// in `admin` checks the converse: every route is documented.
#[test]
fn openapi_document_matches_the_served_routes() {
    let gw = Gateway::start("");
    let (code, body) = http_get(gw.port, "/openapi.json", None).unwrap();
    assert_eq!(code, 200);
    assert_eq!(body, holdfast::admin::OPENAPI);

    let file = gw.dir.path().join("openapi.json");
    std::fs::write(&file, &body).unwrap();
    let out = Command::new("python3")
        .args(["-m", "openapi_spec_validator"])
        .arg(&file)
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "openapi-spec-validator (pip install openapi-spec-validator; scripts/setup.sh does): {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let token = gw.token();
    let token = token.trim();
    // What the router answers for a route it does not have: the check below
    // tells it from a handler's own 404 (which has a JSON body).
    let (code, text) = http_request(gw.port, "GET", "/api/v1/no-such-route", Some(token), None).unwrap();
    assert_eq!((code, text.as_str()), (404, ""));

    let doc: Value = serde_json::from_str(&body).unwrap();
    let mut operations = 0;
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            operations += 1;
            let target = path
                .replace("{slot}", "router")
                .replace("{id}", "no-such-device")
                .replace("{name}", "no-such-name");
            let method = method.to_uppercase();
            let op = &item[method.to_lowercase()];
            let body = (method != "GET" && method != "DELETE").then_some("{}");
            let (code, text) = http_request(gw.port, &method, &target, Some(token), body).unwrap();
            assert!(
                code != 405 && !(code == 404 && text.is_empty()),
                "{method} {path} is documented but not served: {code} {text:?}"
            );
            assert!(
                op["responses"].get(code.to_string()).is_some(),
                "{method} {path} answered {code}, which the document does not list: {text}"
            );
            if path.starts_with("/api/v1/") {
                let (code, _) = http_request(gw.port, &method, &target, None, body).unwrap();
                assert_eq!(code, 401, "{method} {path} without a token");
            }
        }
    }
    assert!(operations > 30, "{operations}");
}

/// An HTTP request to chromedriver with curl (it keeps connections open
/// whatever the request says): status and body.
/// The status page in headless Chromium shows what a person needs: link
/// state, backlog per lane with the oldest age, connected clients, plugin
/// versions and the latest reconfiguration, the cache's hit ratio and bytes
/// saved; it refreshes itself, drops the token from the address bar, and
/// asks for a token when the one it has is refused.
#[test]
fn status_page_in_headless_chromium() {
    let certs = fleet(&["root", "child"]);
    let origin = Origin::start();
    let object: Vec<u8> = (0..256 * 1024u32).map(|i| (i * 7 % 251) as u8).collect();
    origin.put("/pool/a.bin", &object);
    let link_port = free_port();
    let gw = start_child(
        certs.path(),
        link_port,
        &format!("[plugins.router.config]\ndefault_lane = 5\n{}", origin.sources()),
    );

    // Cache: one miss, one hit of the same 256 KiB.
    fetch_twice(gw.cache, "/pool/a.bin");
    // Clients: one that stays connected, one that publishes 7 messages in
    // lane 5 while the parent is down.
    let _probe = Client::connect(gw.mqtt, "status-probe", true).unwrap();
    publish(gw.mqtt, "publisher", "telemetry/a", 0, 7);
    // A reconfiguration moves new messages to lane 2.
    let config = std::fs::read_to_string(&gw.config).unwrap();
    std::fs::write(&gw.config, config.replace("default_lane = 5", "default_lane = 2")).unwrap();
    let out = gw.cli_ok(&["reload"]);
    assert!(out.contains("plugins.router.config"), "{out}");
    publish(gw.mqtt, "publisher", "telemetry/b", 7, 3);

    let browser = Browser::start();
    let token = gw.token();
    browser.open(&format!("http://127.0.0.1:{}/#token={}", gw.port, token.trim()));
    browser.wait_text("backlog-messages", "10");
    // The token left the address bar and stays in this tab only.
    assert_eq!(browser.eval("return location.hash;"), json!(""));
    assert_eq!(
        browser.eval("return sessionStorage.getItem('holdfast-token');"),
        json!(token.trim())
    );
    assert_eq!(browser.text("node-id"), "child");
    let link = browser.text("link-state");
    assert!(link == "Connecting" || link == "Down", "{link}");
    assert!(
        browser
            .text("link-target")
            .contains(&format!("quic → 127.0.0.1:{link_port}")),
        "{}",
        browser.text("link-target")
    );
    let lanes = browser.text("backlog-lanes");
    let rows: Vec<Vec<&str>> = lanes.lines().map(|l| l.split('\t').collect()).collect();
    assert_eq!(
        rows[0],
        [
            "lane",
            "messages",
            "bytes",
            "in flight",
            "oldest",
            "drain",
            "to drain",
            "state"
        ],
        "{lanes}"
    );
    assert_eq!(rows.len(), 3, "{lanes}");
    assert_eq!((rows[1][0], rows[1][1]), ("2", "3"), "{lanes}");
    assert_eq!((rows[2][0], rows[2][1]), ("5", "7"), "{lanes}");
    assert!(rows[2][4].ends_with(" s"), "oldest age: {lanes}");
    // The parent is down: nothing drains, and that is waiting, not stuck.
    assert_eq!(rows[2][7], "waiting", "{lanes}");
    assert_ne!(browser.text("backlog-oldest"), "–");
    browser.wait_text("clients-count", "1");
    assert!(browser.text("clients-list").contains("status-probe"));
    let plugins = browser.text("plugins-list");
    for slot in ["router", "auth", "content-source"] {
        assert!(plugins.contains(slot), "{plugins}");
    }
    let router = gw.router_version();
    assert!(plugins.contains(&router[..12]), "{plugins}");
    let swaps = browser.text("plugins-swaps");
    assert!(
        swaps.lines().nth(1).is_some_and(|l| l.contains("router\treconfigure")),
        "{swaps}"
    );
    // At 1400 px the plugin tables fit their card (they used to run past its edge).
    browser.call(
        "POST",
        &format!("/session/{}/window/rect", browser.session),
        json!({"width": 1400, "height": 1600}),
    );
    for id in ["plugins", "plugins-list", "plugins-swaps", "backlog", "backlog-lanes"] {
        let v = browser.eval(&format!(
            "const s = document.getElementById('{id}'); return [s.scrollWidth, s.clientWidth];"
        ));
        let (scroll, client) = (v[0].as_u64().unwrap(), v[1].as_u64().unwrap());
        assert!(scroll <= client, "#{id} overflows at 1400 px: {scroll} > {client} px");
    }
    assert_eq!(browser.text("cache-hit-ratio"), "50.0 %");
    assert_eq!(browser.text("cache-saved"), "256.0 KiB");
    assert!(browser.text("cache-detail").contains("1 of 2 requests were hits"));

    // It refreshes itself: new messages and a new client appear without a reload.
    let _second = Client::connect(gw.mqtt, "second-probe", true).unwrap();
    publish(gw.mqtt, "publisher", "telemetry/b", 10, 5);
    browser.wait_text("backlog-messages", "15");
    browser.wait_text("clients-count", "2");
    assert!(browser.text("updated").contains("refreshes every 2 s"));

    // The last hour, drawn from the node's in-memory samples (one every 10 s):
    // once there are two, the rates have a line; the parent is down throughout.
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let lines = browser.eval("return document.querySelectorAll('#chart-traffic polyline').length;");
        if lines.as_u64().unwrap_or(0) >= 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no traffic chart: {}",
            browser.text("history")
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    let history = gw.api("/api/v1/history");
    let samples = history["samples"].as_array().unwrap();
    assert!(samples.len() >= 2, "{history}");
    assert_eq!(history["interval_seconds"], 10);
    assert!(samples.iter().all(|x| x["link_up"] == false), "{history}");
    assert_eq!(samples.last().unwrap()["backlog"], 15, "{history}");
    assert!(browser.text("chart-backlog-now").starts_with("15 messages"));
    let link = browser.text("chart-link-now");
    assert!(link.starts_with("down in "), "{link}");
    let bars = browser.eval("return document.querySelectorAll('#chart-link rect.bad').length;");
    assert!(bars.as_u64().unwrap() >= 2, "{bars}");
    assert!(
        browser
            .eval("return document.querySelectorAll('#chart-backlog polyline').length;")
            .as_u64()
            >= Some(1)
    );
    // A picture of the page for the operator guide (docs/images/status-page.png is a copy).
    let png = browser.call("GET", &format!("/session/{}/screenshot", browser.session), json!({}));
    let png = base64::engine::general_purpose::STANDARD
        .decode(png.as_str().unwrap())
        .unwrap();
    assert!(png.starts_with(b"\x89PNG"));
    let shots = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/screenshots");
    std::fs::create_dir_all(&shots).unwrap();
    std::fs::write(shots.join("status-page.png"), png).unwrap();

    // A wrong token: the page asks for one instead of showing figures.
    browser.open(&format!("http://127.0.0.1:{}/#token=wrong", gw.port));
    browser.wait_text(
        "login-why",
        "The admin token was not accepted. Paste the token from the node's admin.token file.",
    );
    assert_eq!(
        browser.eval("return document.getElementById('main').hidden;"),
        json!(true)
    );
}

/// `holdfast queue` lists the backlog per lane; `queue wait-empty` times
/// out with the count while the parent is down, and follows the drain to
/// zero once it is up, with a progress line.
#[test]
fn queue_wait_empty_follows_the_drain() {
    let certs = fleet(&["root", "child"]);
    let link_port = free_port();
    let mut child = start_child(certs.path(), link_port, "");
    publish(child.mqtt, "meter", "telemetry/m", 0, 200);

    let table = child.cli_ok(&["queue"]);
    assert!(table.starts_with("200 messages"), "{table}");
    let lane5 = table.lines().find(|l| l.starts_with("5 ")).unwrap_or_default();
    assert_eq!(lane5.split_whitespace().nth(1), Some("200"), "{table}");

    // `holdfast status`: the same backlog, the link, clients, plugins, cache.
    let _meter = Client::connect(child.mqtt, "meter-2", true).unwrap();
    let status = child.cli_ok(&["status"]);
    assert!(status.starts_with("node     child  version "), "{status}");
    assert!(status.contains(&format!("quic → 127.0.0.1:{link_port}")), "{status}");
    assert!(status.contains("backlog  200 messages"), "{status}");
    assert!(status.contains("clients  1 connected"), "{status}");
    assert!(status.lines().any(|l| l.starts_with("router ")), "{status}");
    assert!(
        status.contains("cache    hit ratio - (bytes), 0 of 0 requests hits"),
        "{status}"
    );
    let clients = child.cli_ok(&["clients"]);
    assert!(clients.lines().any(|l| l.starts_with("meter-2 ")), "{clients}");
    let v: Value = serde_json::from_str(&child.cli_ok(&["status", "--json"])).unwrap();
    assert_eq!(v["outbox"]["messages"], 200);

    let out = child.cli(&["queue", "wait-empty", "--timeout", "1", "--interval-ms", "100"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("timed out after 1 s with 200 messages"), "{err}");
    assert!(
        err.contains("[------------------------------]   0 %  200 messages"),
        "{err}"
    );

    // The root delivers to whoever is subscribed when messages arrive: the
    // child is held down until the collector has subscribed.
    child.kill();
    let root = start_root(certs.path(), link_port);
    let consumer = Consumer::start(root.mqtt, "collector", "telemetry/#");
    child.respawn();
    let out = child.cli(&["queue", "wait-empty", "--timeout", "60", "--interval-ms", "100"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("outbox empty after"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        err.lines().last().is_some_and(|l| l.contains("100 %  0 messages")),
        "{err}"
    );
    wait_until(30, "the root to deliver 200 messages", || consumer.len() >= 200);
    let json: Value = serde_json::from_str(&child.cli_ok(&["queue", "--json"])).unwrap();
    assert_eq!(json["messages"], 0);
}

/// SIGTERM while four clients publish: the node stops within its bound
/// (`node.shutdown_timeout_ms`, 10 s by default), tells an MQTT 5 client
/// it is shutting down (0x8B), exits 0, and every message it acknowledged
/// reaches the root after a restart.
#[test]
fn sigterm_stops_in_time_and_loses_nothing_acknowledged() {
    let certs = fleet(&["root", "child"]);
    let link_port = free_port();
    let mut child = start_child(certs.path(), link_port, "");
    let acked: Arc<Mutex<Vec<u64>>> = Arc::default();
    let publishers: Vec<_> = (0..4u64)
        .map(|t| {
            let (port, acked) = (child.mqtt, acked.clone());
            std::thread::spawn(move || {
                let Ok(mut c) = Client::connect(port, &format!("pub-{t}"), true) else {
                    return;
                };
                for seq in 0.. {
                    let payload = t * 1_000_000 + seq;
                    match c.publish_acked("telemetry/t", &payload.to_string(), Duration::from_secs(15)) {
                        Ok(true) => acked.lock().unwrap().push(payload),
                        _ => return,
                    }
                }
            })
        })
        .collect();
    let mut watcher = Client::connect(child.mqtt, "watcher", true).unwrap();
    wait_until(20, "publishers to get going", || acked.lock().unwrap().len() >= 400);

    let sent = Instant::now();
    let st = Command::new("kill")
        .args(["-TERM", &child.child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    assert_eq!(watcher.wait_disconnect(Duration::from_secs(10)), Some(0x8B));
    let status = loop {
        if let Some(s) = child.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            sent.elapsed() < Duration::from_secs(15),
            "still running {:?} after SIGTERM",
            sent.elapsed()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let took = sent.elapsed();
    assert!(status.success(), "exit {status}: {}", child.describe());
    for p in publishers {
        p.join().unwrap();
    }
    let log = child.log();
    assert!(log.contains("holdfast node stopped"), "{log}");
    let acked = acked.lock().unwrap().clone();
    eprintln!(
        "SIGTERM: {} messages acknowledged; the node stopped in {took:?}",
        acked.len()
    );

    // The root delivers to whoever is subscribed when messages arrive: the
    // collector subscribes before the child comes back.
    let root = start_root(certs.path(), link_port);
    let consumer = Consumer::start(root.mqtt, "collector", "telemetry/#");
    child.respawn();
    let got = || -> std::collections::HashSet<u64> {
        consumer.messages().iter().map(|m| m.payload.parse().unwrap()).collect()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let got = got();
        let missing: Vec<&u64> = acked.iter().filter(|a| !got.contains(a)).collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {} acknowledged messages missing at the root (e.g. {:?}); {} arrived; the child's outbox: {}\n{}",
            missing.len(),
            acked.len(),
            &missing[..missing.len().min(10)],
            got.len(),
            child.api("/api/v1/outbox"),
            child.describe()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Each publisher's messages arrive in the order it sent them.
    let arrivals: Vec<u64> = consumer.messages().iter().map(|m| m.payload.parse().unwrap()).collect();
    for t in 0..4u64 {
        let mut seen = std::collections::HashSet::new();
        let first: Vec<u64> = arrivals
            .iter()
            .copied()
            .filter(|p| p / 1_000_000 == t && seen.insert(*p))
            .collect();
        assert!(first.windows(2).all(|w| w[0] < w[1]), "publisher {t}: order broken");
    }
}

/// `/metrics` parses as OpenMetrics with the reference parser
/// (prometheus_client), follows Prometheus naming conventions, and covers
/// clients, messages by route and reason, the outbox, the link, plugins and
/// the cache.
#[test]
fn metrics_follow_the_conventions_and_cover_every_subsystem() {
    let certs = fleet(&["root", "child"]);
    let origin = Origin::start();
    origin.put("/pool/m.bin", &[7u8; 4096]);
    let gw = start_child(
        certs.path(),
        free_port(),
        &format!(
            "[plugins.router.config]\ndefault_lane = 5\n[[plugins.router.config.rules]]\nfilter = \"noise/#\"\ndrop = \"noise\"\n{}",
            origin.sources()
        ),
    );
    let _client = Client::connect(gw.mqtt, "metered", true).unwrap();
    publish(gw.mqtt, "publisher", "telemetry/a", 0, 3);
    publish(gw.mqtt, "publisher", "noise/a", 0, 2);
    fetch_twice(gw.cache, "/pool/m.bin");
    wait_until(20, "a failed link attempt", || {
        gw.api("/api/v1/link")["link"]["failures"].as_u64() > Some(0)
    });

    let out = Command::new("curl")
        .args(["-s", "-D", "-"])
        .arg(format!("http://127.0.0.1:{}/metrics", gw.port))
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/openmetrics-text; version=1.0.0"),
        "{head}"
    );
    let file = gw.dir.path().join("metrics.txt");
    std::fs::write(&file, body).unwrap();
    // The reference parser: families with their type, unit and label names.
    let script = r#"
import json, sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
out = {}
for f in text_string_to_metric_families(open(sys.argv[1]).read()):
    labels = sorted({k for s in f.samples for k in s.labels if k not in ("le", "quantile")})
    out[f.name] = {"type": f.type, "unit": f.unit, "labels": labels,
                   "samples": sorted({s.name for s in f.samples})}
print(json.dumps(out))
"#;
    let parsed = Command::new("python3")
        .args(["-c", script])
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        parsed.status.success(),
        "the OpenMetrics parser refused /metrics (pip install prometheus-client; scripts/setup.sh does): {}",
        String::from_utf8_lossy(&parsed.stderr)
    );
    let families: Value = serde_json::from_slice(&parsed.stdout).unwrap();
    let families = families.as_object().unwrap();
    for (name, f) in families {
        assert!(name.starts_with("holdfast_"), "{name}");
        assert!(
            name.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
            "{name}: not snake_case"
        );
        // Base units only: seconds and bytes, never ms or KiB.
        for bad in ["_ms", "_millis", "_kb", "_kib", "_mb", "_minutes"] {
            assert!(!name.contains(bad), "{name}: not a base unit");
        }
        let kind = f["type"].as_str().unwrap();
        if name.contains("duration") || name.contains("_age") {
            assert!(name.ends_with("_seconds"), "{name}: a time must be in seconds");
        }
        match kind {
            "counter" => {
                assert!(!name.ends_with("_total"), "{name}");
                assert!(
                    f["samples"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .any(|s| s == &json!(format!("{name}_total"))),
                    "{name}: counter samples end in _total: {f}"
                );
            }
            "gauge" | "histogram" | "info" => {}
            other => panic!("{name}: unexpected type {other}"),
        }
    }
    // Every subsystem, with the labels a dashboard groups by.
    for (name, kind, labels) in [
        ("holdfast_mqtt_connections", "gauge", &["transport"][..]),
        ("holdfast_mqtt_connects", "counter", &["result"]),
        ("holdfast_mqtt_messages_received", "counter", &["qos"]),
        ("holdfast_mqtt_messages_routed", "counter", &["action"]),
        ("holdfast_mqtt_messages_dropped", "counter", &["reason"]),
        ("holdfast_router_drops", "counter", &["reason"]),
        ("holdfast_outbox_enqueued", "counter", &["lane"]),
        ("holdfast_outbox_delivered", "counter", &["lane"]),
        ("holdfast_outbox_depth_messages", "gauge", &["lane"]),
        ("holdfast_outbox_depth_bytes", "gauge", &["lane"]),
        ("holdfast_outbox_oldest_age_seconds", "gauge", &["lane"]),
        ("holdfast_outbox_dropped", "counter", &["lane", "reason"]),
        ("holdfast_outbox_expired", "counter", &["lane"]),
        ("holdfast_link_up", "gauge", &[]),
        ("holdfast_link_connects", "counter", &["result"]),
        ("holdfast_plugin_calls", "counter", &["slot"]),
        ("holdfast_plugin_call_duration_seconds", "histogram", &["slot"]),
        ("holdfast_plugin_failures", "counter", &["kind", "slot"]),
        ("holdfast_plugin_swaps", "counter", &["result", "slot"]),
        ("holdfast_cache_requests", "counter", &["client", "result", "source"]),
        ("holdfast_cache_bytes", "counter", &["client", "result", "source"]),
        ("holdfast_cache_upstream_bytes", "counter", &["source", "upstream"]),
        ("holdfast_cache_evictions", "counter", &[]),
        ("holdfast_cache_stored_bytes", "gauge", &[]),
    ] {
        let f = families
            .get(name)
            .unwrap_or_else(|| panic!("{name} is missing from /metrics:\n{body}"));
        assert_eq!(f["type"], kind, "{name}");
        assert_eq!(f["labels"], json!(labels), "{name}");
    }
    let sample = |line: &str| gw.metric(line);
    assert_eq!(
        sample("holdfast_mqtt_messages_dropped_total{reason=\"router-drop\"}"),
        2.0
    );
    assert_eq!(sample("holdfast_router_drops_total{reason=\"noise\"}"), 2.0);
    assert_eq!(sample("holdfast_outbox_enqueued_total{lane=\"5\"}"), 3.0);
    assert_eq!(sample("holdfast_outbox_depth_messages{lane=\"5\"}"), 3.0);
    assert_eq!(sample("holdfast_link_up"), 0.0);
    assert_eq!(
        sample("holdfast_cache_bytes_total{source=\"test\",client=\"client\",result=\"hit\"}"),
        4096.0
    );
}
