//! End to end: the dead-letter store of a real node. A message the router
//! plugin traps on (policy `dead-letter`) and one whose time-to-live runs
//! out in the outbox are kept with their reason, topic, properties and lane,
//! across a restart; they are listed, shown and replayed through the CLI and
//! the admin API and reach a subscriber; purge empties the store; the
//! metrics count all of it.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: a panic is its failure

use std::process::Command;
use std::time::{Duration, Instant};

mod support;

use support::Gateway;
use support::client::Client;

const TEST_ROUTER: &str = holdfast_plugins::artifacts::TEST_ROUTER_WASM;

/// An MQTT bridge to a port nobody listens on: what the router sends to
/// lane 5 (`ttl/#`, with a time-to-live of a second) stays there and
/// expires; everything else is delivered locally only.
const CONFIG: &str = "\
[plugins.router.config]
default_upstream = false
local_by_default = true
[[plugins.router.config.rules]]
filter = \"ttl/#\"
upstream_lane = 5
ttl_seconds = 1
[outbox]
expire_interval_ms = 100
[dead_letter]
max_messages = 1000
[upstream]
kind = \"mqtt\"
[upstream.mqtt]
host = \"127.0.0.1\"
";

/// QoS 1 with MQTT 5 properties through mosquitto_pub, which waits for the PUBACK.
fn publish_with_properties(gw: &Gateway, topic: &str, payload: &str) {
    let out = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &gw.mqtt.to_string(), "-V", "mqttv5", "-q", "1"])
        .args(["-t", topic, "-m", payload])
        .args(["-D", "publish", "content-type", "application/json"])
        .args(["-D", "publish", "user-property", "site", "north"])
        .output()
        .expect("mosquitto_pub is not installed: run scripts/setup.sh");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

fn entries(gw: &Gateway) -> Vec<serde_json::Value> {
    gw.api("/api/v1/dead-letter")["entries"].as_array().unwrap().clone()
}

fn wait_for_entries(gw: &Gateway, n: usize) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let e = entries(gw);
        if e.len() >= n {
            return e;
        }
        assert!(
            Instant::now() < deadline,
            "{n} dead letters did not arrive: {e:?}\n{}",
            gw.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn id_of(entries: &[serde_json::Value], reason: &str) -> u64 {
    entries
        .iter()
        .find(|e| e["reason"] == reason)
        .and_then(|e| e["id"].as_u64())
        .unwrap_or_else(|| panic!("no {reason} entry in {entries:?}"))
}

#[test]
fn trapped_and_expired_messages_are_kept_listed_replayed_and_purged() {
    let mut gw = Gateway::start(&format!("{CONFIG}port = {}\n", support::free_port()));

    // A message with no upstream to take it expires in lane 5.
    publish_with_properties(&gw, "ttl/reading", "{\"t\":1}");
    let e = wait_for_entries(&gw, 1);
    assert_eq!(
        (e[0]["reason"].as_str(), e[0]["lane"].as_u64()),
        (Some("expired"), Some(5))
    );

    // The hostile router traps on hostile/trap; the publisher still gets its PUBACK.
    let out = gw.cli_ok(&["plugin", "swap", "router", TEST_ROUTER]);
    assert!(out.starts_with("swapped router"), "{out}");
    publish_with_properties(&gw, "hostile/trap", "{\"t\":2}");
    publish_with_properties(&gw, "hostile/trap", "{\"t\":3}");
    let e = wait_for_entries(&gw, 3);
    let trapped: Vec<&serde_json::Value> = e.iter().filter(|e| e["reason"] == "router-failure").collect();
    assert_eq!(trapped.len(), 2, "{e:?}");
    assert_eq!(trapped[0]["detail"], "router-failure:trap");
    assert!(trapped[0]["lane"].is_null());

    // Counted, by reason.
    for (reason, n) in [("router-failure", 2.0), ("expired", 1.0)] {
        let line = format!("holdfast_dead_letter_total{{reason=\"{reason}\"}}");
        assert_eq!(gw.metric(&line), n, "{line}\n{}", gw.metrics());
    }
    assert_eq!(gw.metric("holdfast_dead_letter_messages"), 3.0);

    // Durable: the same entries after a restart (with the default router
    // back, so that a replay routes).
    let out = gw.cli_ok(&["plugin", "rollback", "router"]);
    assert!(out.contains("rolled back"), "{out}");
    gw.restart();
    let e = entries(&gw);
    assert_eq!(e.len(), 3, "{e:?}");
    let (expired, trap) = (id_of(&e, "expired"), id_of(&e, "router-failure"));

    // The CLI lists and shows them with what they carried.
    let list = gw.cli_ok(&["dead-letter", "list"]);
    assert!(list.starts_with("3 dead letters"), "{list}");
    assert!(
        list.contains("router-failure:trap") && list.contains("ttl/reading"),
        "{list}"
    );
    let show = gw.cli_ok(&["dead-letter", "show", &trap.to_string()]);
    for want in [
        "hostile/trap",
        "router-failure",
        "application/json",
        "site=north",
        "{\"t\":2}",
    ] {
        assert!(show.contains(want), "{want} not in:\n{show}");
    }
    let v = gw.api(&format!("/api/v1/dead-letter/{expired}"));
    assert_eq!(v["topic"], "ttl/reading");
    assert_eq!(v["content_type"], "application/json");
    assert_eq!(v["properties"], serde_json::json!([["site", "north"]]));
    assert_eq!(v["payload"], "{\"t\":1}");
    assert!(v["at_ms"].as_u64().unwrap() > 1_600_000_000_000);

    // Replayed, they reach a subscriber: the trapped one routed again as
    // published (through the CLI), the expired one to a topic (the API).
    let mut sub = Client::connect(gw.mqtt, "dl-sub", true).unwrap();
    sub.subscribe("hostile/#").unwrap();
    sub.subscribe("replayed/#").unwrap();
    let out = gw.cli_ok(&["dead-letter", "replay", &trap.to_string()]);
    assert!(out.contains("replayed") && out.contains("router"), "{out}");
    let m = sub
        .recv(Duration::from_secs(10))
        .unwrap()
        .expect("the replayed message");
    assert_eq!((m.topic.as_str(), m.payload.as_str()), ("hostile/trap", "{\"t\":2}"));
    assert_eq!(m.prop("site"), Some("north"));
    let (code, body) = gw.post(
        &format!("/api/v1/dead-letter/{expired}/replay"),
        &serde_json::json!({ "to_topic": "replayed/ttl" }),
    );
    assert_eq!(code, 200, "{body}");
    let m = sub
        .recv(Duration::from_secs(10))
        .unwrap()
        .expect("the replayed message");
    assert_eq!((m.topic.as_str(), m.payload.as_str()), ("replayed/ttl", "{\"t\":1}"));
    assert_eq!(m.prop("site"), Some("north"));
    // A replayed entry is gone; an unknown one is a 404.
    let e = entries(&gw);
    assert_eq!(e.len(), 1, "{e:?}");
    let (code, _) = gw.post(&format!("/api/v1/dead-letter/{trap}/replay"), &serde_json::json!({}));
    assert_eq!(code, 404);

    // Counted (the counters since this start).
    assert_eq!(gw.metric("holdfast_dead_letter_replayed_total"), 2.0);
    assert_eq!(gw.metric("holdfast_dead_letter_messages"), 1.0);

    // Purged: one by id, then all.
    let last = e[0]["id"].as_u64().unwrap();
    let out = gw.cli_ok(&["dead-letter", "purge", &last.to_string()]);
    assert_eq!(out.trim(), "purged 1");
    publish_with_properties(&gw, "ttl/late", "x");
    wait_for_entries(&gw, 1);
    let out = gw.cli_ok(&["dead-letter", "purge", "--all"]);
    assert_eq!(out.trim(), "purged 1");
    assert!(entries(&gw).is_empty());
    assert_eq!(gw.metric("holdfast_dead_letter_messages"), 0.0);
    gw.stop();
}
