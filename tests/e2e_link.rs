//! End-to-end tests of the upstream link: several `holdfast` processes
//! joined by QUIC links, the fault-injection link proxy between them, and
//! the MQTT bridge to a real Mosquitto.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test or benchmark: a panic is its failure

mod support;

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::client::Client;
use support::delivery::{Consumer, check_delivery};
use support::fleet::{addr, fleet, fleet_section, listen_section, upstream_section, wait_until};
use support::mosquitto::Mosquitto;
use support::proxy::Proxy;
use support::{Gateway, free_port};

fn child_identity(id: &str, parent: &str) -> String {
    format!("[[identities]]\nid = \"{id}\"\nkind = \"gateway\"\nparent = \"{parent}\"\n")
}

/// A root listening for children on `link_port`, with `child` registered.
fn start_root(certs: &Path, link_port: u16, child: &str) -> Gateway {
    Gateway::start_named(
        "root",
        &format!(
            "{}{}{}",
            fleet_section(certs, "root"),
            listen_section(link_port),
            child_identity(child, "root")
        ),
    )
}

#[test]
fn two_levels_with_certificates_and_refusals() {
    let certs = fleet(&["root", "gw1", "gw9"]);
    let c = certs.path();
    let root_link = free_port();
    let root = start_root(c, root_link, "gw1");
    let consumer = Consumer::start(root.mqtt, "backend", "site/#");
    let gw1 = Gateway::start_named(
        "gw1",
        &format!(
            "{}{}",
            fleet_section(c, "gw1"),
            upstream_section(addr(root_link), "root")
        ),
    );
    let mut device = Client::connect(gw1.mqtt, "dev1", true).unwrap();
    let acked: Vec<u64> = (0..200)
        .filter(|i| {
            device
                .publish_acked("site/line1", &i.to_string(), Duration::from_secs(5))
                .unwrap()
        })
        .collect();
    assert_eq!(acked.len(), 200);
    wait_until(20, "200 messages at the root", || consumer.len() >= 200);
    let got = consumer.messages();
    assert_eq!(check_delivery(&acked, &got), 0, "no duplicates on a healthy link");
    assert_eq!(got[0].prop("holdfast-path"), Some("dev1/gw1"));
    assert_eq!(got[0].topic, "site/line1");
    // The child's outbox is empty once acked; the root's status lists the child.
    wait_until(10, "gw1's outbox to drain", || {
        gw1.api("/api/v1/outbox")["lanes"][5]["messages"] == 0
    });
    let status = root.cli_ok(&["link", "status"]);
    assert!(status.contains("gw1"), "{status}");
    let link = gw1.api("/api/v1/link");
    assert_eq!(link["link"]["state"], "up", "{link}");
    assert!(link["link"]["acked"].as_u64().unwrap() >= 200);

    // A node with a fleet certificate that the root does not know as its child.
    let gw9 = Gateway::start_named(
        "gw9",
        &format!(
            "{}{}",
            fleet_section(c, "gw9"),
            upstream_section(addr(root_link), "root")
        ),
    );
    wait_until(15, "gw9 refused", || {
        gw9.api("/api/v1/link")["link"]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("not a registered child"))
    });
    assert!(root.metric("holdfast_link_refused_total{reason=\"not-a-child\"}") >= 1.0);
    // A node whose certificate comes from another CA fails the handshake.
    let other = fleet(&["gw1"]);
    let rogue = Gateway::start_named(
        "gw1",
        &format!(
            "{}{}",
            fleet_section(other.path(), "gw1"),
            upstream_section(addr(root_link), "root")
        ),
    );
    wait_until(15, "the rogue refused", || {
        root.metric("holdfast_link_refused_total{reason=\"handshake\"}") >= 1.0
    });
    assert_ne!(rogue.api("/api/v1/link")["link"]["state"], "up");
    drop(rogue);
    drop(gw9);
    drop(consumer);
}

#[test]
fn three_levels_survive_cuts_kills_and_long_outages() {
    let certs = fleet(&["root", "gw2", "gw1"]);
    let c = certs.path();
    let (root_link, gw2_link) = (free_port(), free_port());
    let root = start_root(c, root_link, "gw2");
    let p2 = Proxy::start(addr(root_link));
    let mut gw2 = Gateway::start_named(
        "gw2",
        &format!(
            "{}{}{}{}",
            fleet_section(c, "gw2"),
            listen_section(gw2_link),
            upstream_section(p2.udp, "root"),
            child_identity("gw1", "gw2")
        ),
    );
    let p1 = Proxy::start(addr(gw2_link));
    let gw1 = Gateway::start_named(
        "gw1",
        &format!("{}{}", fleet_section(c, "gw1"), upstream_section(p1.udp, "gw2")),
    );
    let consumer = Consumer::start(root.mqtt, "backend", "load/#");

    // Steady load: one device publishing QoS 1 to gw1, one message every 2 ms.
    let acked = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (acked, stop, port) = (acked.clone(), stop.clone(), gw1.mqtt);
        std::thread::spawn(move || {
            let mut device = Client::connect(port, "sensor-1", true).unwrap();
            let mut seq = 0u64;
            while !stop.load(Ordering::Relaxed) {
                if device
                    .publish_acked("load/sensor-1", &seq.to_string(), Duration::from_secs(5))
                    .unwrap()
                {
                    acked.lock().unwrap().push(seq);
                }
                seq += 1;
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };
    let pause = |ms| std::thread::sleep(Duration::from_millis(ms));
    pause(1500);
    // 1. The gw1 → gw2 path is cut (and forgotten), then restored. The cut
    // outlasts QUIC's handshake retransmissions, so the probe finds it first.
    p1.cmd("cut");
    pause(4000);
    p1.cmd("up");
    pause(1500);
    // 1b. gw2 stores what gw1 sends but its acks are lost: once the link is
    // back, gw1 sends those batches again and gw2 must store them only once.
    p1.cmd("blackhole-down");
    pause(2500);
    p1.cmd("up");
    wait_until(15, "gw2 to take what gw1 sent again only once", || {
        gw2.metric("holdfast_outbox_duplicates_total{lane=\"5\"}") > 0.0
    });
    pause(1000);
    // 2. The gw2 → root path is black-holed, then restored.
    p2.cmd("blackhole");
    pause(2500);
    p2.cmd("up");
    pause(1500);
    // 3. A slow path (50 ms each way) that also flaps: 400 ms up, 400 ms down.
    p1.cmd("delay 50");
    p1.cmd("flap 400 400");
    pause(3000);
    p1.cmd("up");
    p1.cmd("delay 0");
    pause(1000);
    // 4. The middle node dies (SIGKILL) and comes back (its counters start again).
    let gw2_duplicates = gw2.metric("holdfast_outbox_duplicates_total{lane=\"5\"}");
    gw2.kill();
    pause(1000);
    gw2.respawn();
    pause(1500);
    // 5. The upstream is down for longer than the load lasts.
    p2.cmd("cut");
    pause(1000);
    stop.store(true, Ordering::Relaxed);
    load.join().unwrap();
    let acked = acked.lock().unwrap().clone();
    pause(1500);
    let before = consumer.len();
    assert!(before < acked.len(), "the root got everything while its link was cut");
    p2.cmd("up");
    let last = *acked.last().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !consumer.messages().iter().any(|m| m.payload == last.to_string()) {
        if std::time::Instant::now() > deadline {
            let tail = |gw: &Gateway| {
                let log = gw.log();
                let lines: Vec<&str> = log.lines().collect();
                lines[lines.len().saturating_sub(40)..].join("\n")
            };
            panic!(
                "timed out waiting for every acknowledged message at the root ({} of {} there)\n\
                 gw1 link: {}\ngw1 outbox: {}\ngw2 link: {}\ngw2 outbox: {}\n\
                 --- gw1 ---\n{}\n--- gw2 ---\n{}\n--- root ---\n{}",
                consumer.len(),
                acked.len(),
                gw1.api("/api/v1/link"),
                gw1.api("/api/v1/outbox"),
                gw2.api("/api/v1/link"),
                gw2.api("/api/v1/outbox"),
                tail(&gw1),
                tail(&gw2),
                tail(&root)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    pause(500);
    let got = consumer.messages();
    let dups = check_delivery(&acked, &got);
    eprintln!(
        "published and acknowledged {}, received {} ({} duplicates)",
        acked.len(),
        got.len(),
        dups
    );
    // link/4: every hop stores what it was sent again only once, through
    // cuts, a black hole, flapping and the middle node's SIGKILL.
    assert_eq!(dups, 0, "duplicates at the root");
    assert!(
        gw2_duplicates
            + gw2.metric("holdfast_outbox_duplicates_total{lane=\"5\"}")
            + root.metric("holdfast_outbox_duplicates_total{lane=\"5\"}")
            > 0.0,
        "no batch was sent again: the test did not exercise idempotence"
    );
    assert!(got.iter().all(|m| m.prop("holdfast-path") == Some("sensor-1/gw1/gw2")));
    // The restore was noticed by probing, not by waiting out a back-off.
    assert!(
        gw1.metric("holdfast_link_wakeups_total{reason=\"probe\"}") >= 1.0,
        "{}",
        gw1.metrics()
    );
    for gw in [&gw1, &gw2] {
        wait_until(10, "outboxes to drain", || {
            gw.api("/api/v1/outbox")["lanes"]
                .as_array()
                .unwrap()
                .iter()
                .all(|l| l["messages"] == 0)
        });
    }
}

#[test]
fn bridge_to_mosquitto_with_mapping_outage_and_cloud_to_device() {
    let dir = tempfile::tempdir().unwrap();
    let mut mosquitto = Mosquitto::start(dir.path());
    let gw = Gateway::start_named(
        "gw1",
        &format!(
            "[upstream]\nkind = \"mqtt\"\nprobe_interval_ms = 50\nbackoff_max_ms = 2000\n\
             [upstream.mqtt]\nhost = \"127.0.0.1\"\nport = {}\nadd_prefix = \"fleet/gw1/\"\n\
             [[upstream.mqtt.in]]\nfilter = \"cmd/gw1/#\"\nstrip_prefix = \"cmd/gw1/\"\nadd_prefix = \"cmd/\"\n",
            mosquitto.port
        ),
    );
    let cloud = Consumer::start(mosquitto.port, "cloud", "fleet/#");
    wait_until(10, "the bridge", || gw.api("/api/v1/link")["link"]["state"] == "up");
    // The broker's receive maximum (max_inflight_messages 10) caps the window.
    let window = gw.api("/api/v1/link")["link"]["window"].as_u64().unwrap();
    assert!(window <= 10, "window {window}");

    let mut device = Client::connect(gw.mqtt, "dev1", true).unwrap();
    let mut acked = Vec::new();
    for i in 0..300u64 {
        if device
            .publish_acked("tele/dev1", &i.to_string(), Duration::from_secs(5))
            .unwrap()
        {
            acked.push(i);
        }
    }
    wait_until(20, "300 messages at Mosquitto", || cloud.len() >= 300);
    let got = cloud.messages();
    assert_eq!(got[0].topic, "fleet/gw1/tele/dev1");
    assert_eq!(got[0].prop("holdfast-path"), Some("dev1"));
    drop(cloud);

    // Mosquitto goes away; messages queue; it comes back and gets them all.
    mosquitto.stop();
    for i in 300..500u64 {
        if device
            .publish_acked("tele/dev1", &i.to_string(), Duration::from_secs(5))
            .unwrap()
        {
            acked.push(i);
        }
    }
    assert_eq!(acked.len(), 500, "the gateway acknowledges while the broker is down");
    wait_until(10, "the bridge to notice", || {
        gw.api("/api/v1/link")["link"]["state"] != "up"
    });
    mosquitto.spawn();
    let cloud = Consumer::start(mosquitto.port, "cloud", "fleet/#");
    wait_until(30, "the backlog at Mosquitto", || {
        cloud.messages().iter().any(|m| m.payload == "499")
    });
    let mut all = got;
    all.extend(cloud.messages());
    check_delivery(&acked, &all);
    // The last PUBACKs may still be on their way back.
    wait_until(10, "500 PUBACKs", || {
        gw.metric("holdfast_link_messages_acked_total") >= 500.0
    });

    // Cloud to device: a command published at Mosquitto reaches a local subscriber.
    let mut local = Client::connect(gw.mqtt, "dev2", true).unwrap();
    local.subscribe("cmd/#").unwrap();
    let out = Command::new("mosquitto_pub")
        .args([
            "-p",
            &mosquitto.port.to_string(),
            "-t",
            "cmd/gw1/reboot",
            "-m",
            "now",
            "-q",
            "1",
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    let m = local.recv(Duration::from_secs(10)).unwrap().expect("the command");
    assert_eq!((m.topic.as_str(), m.payload.as_str()), ("cmd/reboot", "now"));
}

/// A data directory written by a binary built before the crate restructure
/// (`tests/fixtures/make-compat-data.sh` made the fixture) opens with this
/// one: the queued outbox drains in order, the persistent session, the
/// retained message, the registry and the range cache's blocks are all there.
#[test]
fn data_written_before_the_restructure_opens_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let mosquitto = Mosquitto::start(dir.path());
    let cloud = Consumer::start(mosquitto.port, "cloud", "site/#");
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/compat-data.tar.gz");
    let unpacked = tempfile::tempdir().unwrap();
    let status = Command::new("tar")
        .arg("-xzf")
        .arg(&fixture)
        .arg("-C")
        .arg(unpacked.path())
        .status()
        .unwrap();
    assert!(status.success());
    let cache_port = free_port();
    // The origin is gone: the cached object must come from the old blocks.
    let dead = free_port();
    let gw = Gateway::start_prepared(
        "compat",
        &format!(
            "[upstream]\nkind = \"mqtt\"\nprobe_interval_ms = 50\n[upstream.mqtt]\nhost = \"127.0.0.1\"\nport = {}\n\
             [cache]\nlisten = \"127.0.0.1:{cache_port}\"\nblock_size = 65536\n\
             [[plugins.content-source.config.sources]]\nname = \"test\"\nhosts = [\"origin.test\"]\n\
             origin = \"http://127.0.0.1:{dead}\"\nimmutable = [\"/pool/**\"]\nother = \"deny\"\nttl_seconds = 1\n",
            mosquitto.port
        ),
        |data| {
            let status = Command::new("cp")
                .arg("-a")
                .arg(unpacked.path().join("data"))
                .arg(data)
                .status()
                .unwrap();
            assert!(status.success());
        },
    );
    let in_order: Vec<String> = (0..50).map(|i| format!("m{i}")).collect();
    let of = |got: Vec<support::client::Received>| -> Vec<String> {
        got.into_iter()
            .filter(|m| m.topic == "site/m")
            .map(|m| m.payload)
            .collect()
    };

    // The outbox drains to the bridge's broker, in order, once each.
    wait_until(20, "the old outbox at Mosquitto", || of(cloud.messages()).len() >= 50);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(of(cloud.messages()), in_order);

    // The persistent session kept its subscription and its queue.
    let mut sub = Client::connect(gw.mqtt, "compat-sub", false).unwrap();
    let mut queued = Vec::new();
    while let Some(m) = sub.recv(Duration::from_secs(3)).unwrap() {
        queued.push(m);
        if queued.len() == 51 {
            break;
        }
    }
    assert!(queued.iter().any(|m| m.topic == "site/retained" && m.payload == "kept"));
    assert_eq!(of(queued), in_order);

    // The retained message.
    let mut fresh = Client::connect(gw.mqtt, "fresh", true).unwrap();
    fresh.subscribe("site/retained").unwrap();
    let retained = fresh
        .recv(Duration::from_secs(5))
        .unwrap()
        .expect("the retained message");
    assert_eq!(retained.payload, "kept");

    // The registry, keys included.
    let shown = gw.cli_ok(&["device", "show", "compat-dev", "--keys", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&shown).unwrap();
    let text = v.to_string();
    assert!(text.contains(&base64_of(b"compat-primary-key-0123456789ab")), "{text}");

    // The range cache: the whole object from the old blocks, the origin down.
    let out = Command::new("curl")
        .args(["-sf", "--max-time", "20", "-H", "Host: origin.test"])
        .arg(format!("http://127.0.0.1:{cache_port}/pool/compat.bin"))
        .output()
        .unwrap();
    assert!(out.status.success(), "cache answered {:?}", out.status);
    assert_eq!(out.stdout, std::fs::read(unpacked.path().join("compat.bin")).unwrap());
    gw.stop();
}

fn base64_of(b: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(b)
}

/// Compressed batches (`holdfast-link/2`) when both ends offer them, plain
/// ones when either does not, and a byte-rate cap changed live by a reload.
#[test]
fn compressed_batches_negotiated_and_a_live_byte_rate_cap() {
    let certs = fleet(&["root", "gw1", "gw2"]);
    let c = certs.path();
    let root_link = free_port();
    let mut root = Gateway::start_named(
        "root",
        &format!(
            "{}{}{}{}",
            fleet_section(c, "root"),
            listen_section(root_link),
            child_identity("gw1", "root"),
            child_identity("gw2", "root")
        ),
    );
    let consumer = Consumer::start(root.mqtt, "backend", "site/#");
    let child = |id: &str, extra: &str| {
        Gateway::start_named(
            id,
            &format!(
                "{}{}",
                fleet_section(c, id),
                upstream_section(addr(root_link), "root").replace("[upstream]\n", &format!("[upstream]\n{extra}"))
            ),
        )
    };
    let gw1 = child("gw1", "");
    let gw2 = child("gw2", "compression = false\n");
    // IoT Hub-style JSON telemetry.
    let json = |i: u32| {
        format!(
            r#"{{"deviceId":"sensor-{}","temperature":{}.{},"humidity":{},"status":"ok","seq":{i}}}"#,
            i % 5,
            18 + i % 11,
            i % 10,
            35 + i % 40
        )
    };
    let send = |gw: &Gateway, dev: &str, range: std::ops::Range<u32>| {
        let mut d = Client::connect(gw.mqtt, dev, true).unwrap();
        for i in range {
            assert!(d.publish_acked("site/t", &json(i), Duration::from_secs(5)).unwrap());
        }
    };
    let bytes = |gw: &Gateway| {
        (
            gw.metric("holdfast_link_batch_bytes_total"),
            gw.metric("holdfast_link_wire_bytes_total"),
        )
    };
    send(&gw1, "d1", 0..500);
    send(&gw2, "d2", 0..500);
    wait_until(30, "1000 messages at the root", || consumer.len() >= 1000);
    let (raw1, wire1) = bytes(&gw1);
    let (raw2, wire2) = bytes(&gw2);
    assert!(raw1 > 0.0 && wire1 * 2.0 < raw1, "gw1 compresses: {wire1} of {raw1}");
    assert!(wire2 >= raw2, "gw2 sends plain batches: {wire2} of {raw2}");

    // A parent that offers only link/1 (as an older one does): plain.
    drop(consumer);
    let text = std::fs::read_to_string(&root.config).unwrap();
    std::fs::write(&root.config, text.replace("[link]\n", "[link]\nversion = 1\n")).unwrap();
    root.restart();
    let consumer = Consumer::start(root.mqtt, "backend-2", "site/#");
    wait_until(20, "gw1 back up", || gw1.api("/api/v1/link")["link"]["state"] == "up");
    let (raw_before, wire_before) = bytes(&gw1);
    send(&gw1, "d1", 500..700);
    wait_until(30, "200 more at the root", || consumer.len() >= 200);
    let (raw_after, wire_after) = bytes(&gw1);
    assert!(
        wire_after - wire_before >= raw_after - raw_before,
        "plain against a link/1 parent"
    );

    // The cap: 8 KB/s, set by a reload; 60 messages of 1 KB then take
    // several seconds and the senders wait; lifting it lets the rest go.
    let text = std::fs::read_to_string(&gw2.config).unwrap();
    std::fs::write(
        &gw2.config,
        text.replace("[upstream]\n", "[upstream]\nmax_bytes_per_second = 8000\n"),
    )
    .unwrap();
    let report = gw2.cli_ok(&["reload"]);
    assert!(report.contains("upstream.max_bytes_per_second"), "{report}");
    let payload = "x".repeat(1000);
    let mut d = Client::connect(gw2.mqtt, "d2-cap", true).unwrap();
    for _ in 0..60 {
        assert!(d.publish_acked("site/big", &payload, Duration::from_secs(5)).unwrap());
    }
    let waited = || gw2.metric("holdfast_link_throttled_seconds_total");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while waited() < 2.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the capped sender never waited 2 s: {}",
            gw2.metrics()
                .lines()
                .filter(|l| l.starts_with("holdfast_link"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let before_lift = consumer.len();
    assert!(before_lift < 200 + 60, "the cap holds messages back");
    std::fs::write(&gw2.config, text).unwrap();
    gw2.cli_ok(&["reload"]);
    wait_until(20, "the rest after lifting the cap", || consumer.len() >= 260);
    drop(consumer);
}

/// Cloud-to-device messages for a device behind a gateway that is cut off:
/// queued at the root, handed down when the link is back, kept by the
/// gateway through a crash, delivered in order when the device connects;
/// feedback (delivered, expired, rejected) at the root; a method call
/// fails at once with "gateway offline".
#[test]
fn cloud_to_device_waits_for_a_cut_gateway_and_a_restart() {
    let certs = fleet(&["root", "gw1"]);
    let c = certs.path();
    let root_link = free_port();
    let root = Gateway::start_named(
        "root",
        &format!(
            "{}{}{}[iothub]\nc2d_max_queued_per_device = 4\n\
             [[identities]]\nid = \"dev1\"\nkind = \"device\"\nparent = \"gw1\"\n\
             [[identities]]\nid = \"dev2\"\nkind = \"device\"\nparent = \"gw1\"\n",
            fleet_section(c, "root"),
            listen_section(root_link),
            child_identity("gw1", "root"),
        ),
    );
    let proxy = Proxy::start(addr(root_link));
    let mut gw1 = Gateway::start_named(
        "gw1",
        &format!(
            "{}{}[plugins.auth.config]\nallow_anonymous = true\nanonymous_topics = [\"#\"]\n",
            fleet_section(c, "gw1"),
            upstream_section(proxy.udp, "root")
        ),
    );
    let up = |gw: &Gateway| gw.api("/api/v1/link")["link"]["state"] == "up";
    wait_until(20, "gw1 up", || up(&gw1));
    // The device's identity reaches gw1 by scope sync.
    wait_until(20, "dev1 in gw1's scope", || {
        gw1.cli(&["device", "show", "dev1"]).status.success()
    });
    proxy.cmd("cut");
    wait_until(20, "gw1 down", || !up(&gw1));

    let send = |id: &str, text: &str, ttl: Option<u64>| {
        let mut body = serde_json::json!({ "payload": text });
        if let Some(t) = ttl {
            body["ttl_seconds"] = t.into();
        }
        root.post(&format!("/api/v1/devices/{id}/messages"), &body)
    };
    let mut ids = Vec::new();
    for i in 0..3 {
        let (code, body) = send("dev1", &format!("c2d-{i}"), None);
        assert_eq!(code, 202, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["state"], "queued", "{v}");
        ids.push(v["id"].as_str().unwrap().to_string());
    }
    // A fourth that expires while it waits; dev1's queue holds 4, so a
    // fifth is refused.
    let (code, body) = send("dev1", "short-lived", Some(1));
    assert_eq!(code, 202, "{body}");
    let (code, body) = send("dev1", "one too many", None);
    assert_eq!(code, 403, "{body}");
    // A method call fails at once, with the reason.
    let started = std::time::Instant::now();
    let (code, body) = root.post("/api/v1/devices/dev1/methods/reboot", &serde_json::json!({}));
    assert_eq!(code, 404, "{body}");
    assert!(body.contains("gateway offline"), "{body}");
    assert!(started.elapsed() < Duration::from_secs(5));
    std::thread::sleep(Duration::from_millis(1500));
    let c2d = root.api("/api/v1/c2d");
    assert_eq!(c2d["queues"][0]["device"], "dev1", "{c2d}");
    assert_eq!(c2d["queues"][0]["messages"], 3, "the short-lived one expired: {c2d}");

    // The link is back: the messages go down and gw1 keeps them.
    proxy.cmd("up");
    wait_until(30, "the root's queue to empty", || {
        root.api("/api/v1/c2d")["queues"]
            .as_array()
            .is_some_and(|q| q.is_empty())
    });
    wait_until(10, "gw1 to hold them", || {
        gw1.api("/api/v1/c2d")["queues"][0]["messages"] == 3
    });
    // A crash does not lose them.
    gw1.crash_restart();
    assert_eq!(gw1.api("/api/v1/c2d")["queues"][0]["messages"], 3);
    wait_until(20, "gw1 up again", || up(&gw1));

    // The device connects and subscribes: all three, in order, once.
    let mut dev = Client::connect(gw1.mqtt, "dev1", true).unwrap();
    dev.subscribe("devices/dev1/messages/devicebound/#").unwrap();
    let mut got = Vec::new();
    while let Some(m) = dev.recv(Duration::from_secs(5)).unwrap() {
        got.push(m.payload);
        if got.len() == 3 {
            break;
        }
    }
    assert_eq!(got, ["c2d-0", "c2d-1", "c2d-2"]);
    assert!(dev.recv(Duration::from_millis(500)).unwrap().is_none(), "no duplicates");

    // Feedback at the root: three delivered at gw1, one expired, one rejected.
    wait_until(20, "the feedback at the root", || {
        root.api("/api/v1/c2d")["feedback"]
            .as_array()
            .is_some_and(|f| f.iter().filter(|r| r["outcome"] == "delivered").count() == 3)
    });
    let fb = root.api("/api/v1/c2d")["feedback"].clone();
    let of = |outcome: &str| {
        fb.as_array()
            .unwrap()
            .iter()
            .filter(|r| r["outcome"] == outcome)
            .cloned()
            .collect::<Vec<_>>()
    };
    let delivered = of("delivered");
    for id in &ids {
        assert!(
            delivered.iter().any(|r| r["id"] == id.as_str() && r["node"] == "gw1"),
            "{id} delivered at gw1: {fb}"
        );
    }
    assert_eq!(of("expired").len(), 1, "{fb}");
    assert_eq!(of("rejected").len(), 1, "{fb}");
    let shown = root.cli_ok(&["device", "c2d"]);
    assert!(shown.contains("delivered") && shown.contains("gw1"), "{shown}");
}

/// A hostile child: the real parent binary, a child speaking the link by
/// hand with a fleet certificate, and a ZBATCH whose zstd frame header
/// declares a 128 MiB window (zstd's default decoder limit, what a child
/// could make its parent hold on every lane stream). The same batch with
/// the window the link allows is stored and acknowledged.
#[test]
fn a_child_declaring_a_huge_zstd_window_is_refused() {
    use bytes::{Bytes, BytesMut};
    use holdfast_link::config::{FleetConfig, LinkConfig, Sections, UpstreamConfig};
    use holdfast_link::wire::{self, Frame};
    use holdfast_model::{Message, MessageId};
    use holdfast_outbox::record::Record;

    let certs = fleet(&["root", "gw1"]);
    let c = certs.path();
    let root_link = free_port();
    let root = start_root(c, root_link, "gw1");
    let consumer = Consumer::start(root.mqtt, "backend", "site/#");
    let fleet_config = FleetConfig {
        ca: Some(c.join("ca.pem")),
        cert: Some(c.join("gw1.pem")),
        key: Some(c.join("gw1.key")),
    };
    let client = holdfast_link::child::client_config(Sections {
        fleet: &fleet_config,
        link: &LinkConfig::default(),
        upstream: &UpstreamConfig::default(),
    })
    .unwrap();
    // One message of lane `lane`, compressed on a fresh stream context
    // whose frame declares a window of 2^`window_log` bytes.
    let zbatch = |lane: u8, window_log: u8| {
        let mut message = Message::new("site/zstd", format!("lane {lane}"), "dev1");
        message.origin = Some(MessageId {
            instance: 7,
            lane,
            seq: 1,
        });
        let record = Record {
            enqueued_clock_ms: 0,
            enqueued_wall_ms: 0,
            ttl_ms: 60_000,
            message: std::sync::Arc::new(message),
        };
        let records = [(record.encode().unwrap(), Bytes::new())];
        let frame = wire::Compressor::new(3).unwrap().zbatch(&records).unwrap();
        let Frame::ZBatch { count, raw_len, data } = frame else {
            panic!("{frame:?}")
        };
        // zstd magic, a frame header without a content size, then the
        // window descriptor: exponent 10 + (byte >> 3).
        assert_eq!(data[..5], [0x28, 0xb5, 0x2f, 0xfd, 0x00]);
        let mut data = data.to_vec();
        data[5] = (window_log - 10) << 3;
        let mut out = BytesMut::new();
        Frame::Lane(lane).encode(&mut out).unwrap();
        // link/4: the batch's hop ids go first.
        Frame::Ids(wire::BatchIds {
            epoch: 7,
            seqs: vec![1],
        })
        .encode(&mut out)
        .unwrap();
        Frame::ZBatch {
            count,
            raw_len,
            data: Bytes::from(data),
        }
        .encode(&mut out)
        .unwrap();
        out.freeze()
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let (acked, closed) = rt.block_on(async {
        let mut endpoint = quinn::Endpoint::client(addr(0)).unwrap();
        endpoint.set_default_client_config(client);
        let conn = endpoint.connect(addr(root_link), "root").unwrap().await.unwrap();
        let (mut control, control_recv) = conn.open_bi().await.unwrap();
        let mut hello = BytesMut::new();
        Frame::Hello {
            version: wire::VERSION,
            node_id: "gw1".into(),
            instance: 7,
        }
        .encode(&mut hello)
        .unwrap();
        control.write_all(&hello).await.unwrap();
        let welcome = wire::FramedRecv::new(control_recv, 1 << 16).next().await.unwrap();
        assert!(matches!(welcome, Some(Frame::Welcome { .. })), "{welcome:?}");
        assert_eq!(
            wire::negotiated(&conn),
            4,
            "this test speaks link/4 (IDS before each batch)"
        );
        // The window the link allows: stored and acknowledged.
        let (mut send, recv) = conn.open_bi().await.unwrap();
        send.write_all(&zbatch(1, wire::ZSTD_WINDOW_LOG as u8)).await.unwrap();
        let acked = wire::FramedRecv::new(recv, 1 << 16).next().await.unwrap();
        // 128 MiB: refused, and the connection closed.
        let (mut send, _recv) = conn.open_bi().await.unwrap();
        send.write_all(&zbatch(2, 27)).await.unwrap();
        let closed = tokio::time::timeout(Duration::from_secs(10), conn.closed()).await;
        (acked, closed)
    });
    assert_eq!(acked, Some(Frame::Ack(1)));
    match closed {
        Ok(quinn::ConnectionError::ApplicationClosed(close)) => {
            assert_eq!(close.error_code, quinn::VarInt::from(wire::close::PROTOCOL));
            assert!(
                String::from_utf8_lossy(&close.reason).contains("zstd window"),
                "{close:?}"
            );
        }
        other => panic!("the parent did not close the connection: {other:?}"),
    }
    assert_eq!(root.metric("holdfast_link_refused_total{reason=\"zstd-window\"}"), 1.0);
    // Only the honest batch was stored and delivered.
    wait_until(10, "the honest message at the root", || consumer.len() >= 1);
    assert_eq!(root.metric("holdfast_link_messages_received_total"), 1.0);
    let got = consumer.messages();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].payload, "lane 1");
    drop(consumer);
}

/// A parent whose outbox is full (its own upstream is not there yet) cannot take
/// more: the child's lane stops moving while its link keeps connecting, and is
/// reported stuck (API, metrics, log, `holdfast queue`). Once the parent drains
/// into a root that appears, the lane moves again.
#[test]
fn a_lane_a_full_parent_cannot_take_is_reported_stuck_and_moves_again() {
    let certs = fleet(&["root", "gw2", "gw1"]);
    let c = certs.path();
    let (root_link, gw2_link) = (free_port(), free_port());
    let gw2 = Gateway::start_named(
        "gw2",
        &format!(
            "{}{}{}{}[outbox]\nmax_messages = 3\n",
            fleet_section(c, "gw2"),
            listen_section(gw2_link),
            upstream_section(addr(root_link), "root"),
            child_identity("gw1", "gw2")
        ),
    );
    // Batches of 2: the parent takes one, and the next would pass its quota.
    let gw1 = Gateway::start_named(
        "gw1",
        &format!(
            "{}{}[outbox]\nstuck_after_seconds = 3\n",
            fleet_section(c, "gw1"),
            upstream_section(addr(gw2_link), "gw2").replace("[upstream]\n", "[upstream]\nbatch_messages = 2\n")
        ),
    );
    let mut device = Client::connect(gw1.mqtt, "dev1", true).unwrap();
    for i in 0..8 {
        assert!(
            device
                .publish_acked("site/line1", &i.to_string(), Duration::from_secs(5))
                .unwrap()
        );
    }
    let lane = |gw: &Gateway| gw.api("/api/v1/outbox")["lanes"][5].clone();
    wait_until(60, "gw1's lane 5 to be reported stuck", || lane(&gw1)["stuck"] == true);
    let l = lane(&gw1);
    assert!(l["messages"].as_u64().unwrap() >= 5, "{l}");
    assert!(l["still_ms"].as_u64().unwrap() >= 3000, "{l}");
    // What drained before the parent filled still shows in the smoothed rate.
    assert!(l["drain_per_s"].as_f64().unwrap() < 1.0, "{l}");
    assert_eq!(gw1.api("/api/v1/outbox")["stuck_lanes"], serde_json::json!([5]));
    let parent = lane(&gw2)["messages"].as_u64().unwrap();
    assert!(
        (1..=3).contains(&parent),
        "the parent holds what it could take: {parent}"
    );
    assert_eq!(gw1.metric("holdfast_outbox_stuck{lane=\"5\"}"), 1.0);
    assert_eq!(gw1.metric("holdfast_outbox_stuck_episodes_total{lane=\"5\"}"), 1.0);
    let queue = gw1.cli_ok(&["queue"]);
    assert!(queue.contains("STUCK for"), "{queue}");
    assert!(gw1.log().contains("outbox lane stuck"), "{}", gw1.describe());
    // A full parent is retried with back-off (at most 2 s here), not as fast as
    // handshakes go.
    let connects = |gw: &Gateway| gw.api("/api/v1/link")["link"]["connects"].as_u64().unwrap();
    let before = connects(&gw1);
    std::thread::sleep(Duration::from_secs(5));
    let during = connects(&gw1) - before;
    assert!(during <= 10, "{during} connections in 5 s to a full parent");

    // The root appears: the parent drains into it, takes the rest, and the lane moves.
    let root = start_root(c, root_link, "gw2");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let l = lane(&gw1);
        if l["messages"] == 0 && l["stuck"] == false {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "gw1's lane 5 did not drain: {l}\ngw1 link: {}\ngw2 link: {}\ngw2 lane: {}\n{}\n{}\n{}",
            gw1.api("/api/v1/link"),
            gw2.api("/api/v1/link"),
            lane(&gw2),
            gw1.describe(),
            gw2.describe(),
            root.describe()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    wait_until(30, "gw2's outbox to drain", || lane(&gw2)["messages"] == 0);
    assert_eq!(gw1.metric("holdfast_outbox_stuck{lane=\"5\"}"), 0.0);
    assert!(gw1.log().contains("outbox lane moves again"), "{}", gw1.describe());
    drop(root);
}
