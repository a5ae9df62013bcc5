//! End-to-end tests of the device registry, scope sync and offline
//! authentication: real `holdfast` processes, devices connecting with IoT
//! Hub SAS tokens over MQTT, the CLI changing the registry.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test or benchmark: a panic is its failure

mod support;

use std::time::{Duration, Instant};

use support::client::Client;
use support::fleet::{addr, fleet, fleet_section, listen_section, upstream_section, wait_until};
use support::sas::{in_an_hour, sas, username};
use support::{Gateway, free_port};

const AUTH_WASM: &str = holdfast_plugins::artifacts::AUTH_WASM;

/// Connects as `device` with a SAS token made from `key`; the CONNACK code on refusal.
fn connect(port: u16, device: &str, key: &str) -> Result<Client, u8> {
    connect_with(
        port,
        device,
        &username(device),
        sas(device, key, in_an_hour()).as_bytes(),
    )
}

fn connect_with(port: u16, client_id: &str, user: &str, password: &[u8]) -> Result<Client, u8> {
    Client::connect_as(port, client_id, true, Some(user), Some(password)).unwrap()
}

/// `holdfast device add … --json`; returns the primary and secondary keys.
fn add(gw: &Gateway, args: &[&str]) -> (String, String) {
    gw.add_identity(args)
}

fn device_ids(gw: &Gateway) -> Vec<String> {
    gw.api("/api/v1/devices")["identities"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["id"].as_str().unwrap().to_string())
        .collect()
}

/// Runs `f` (a registry change) and returns how long until `client` was disconnected, with the code.
fn disconnected_after(client: &mut Client, f: impl FnOnce()) -> (Duration, Option<u8>) {
    let start = Instant::now();
    f();
    let code = client.wait_disconnect(Duration::from_secs(10));
    (start.elapsed(), code)
}

#[test]
fn sas_tokens_revocation_back_off_and_auth_plugin_swap() {
    let gw = Gateway::start_named(
        "hub",
        "[mqtt]\nauth_backoff_after_failures = 3\nauth_backoff_initial_ms = 50\nauth_backoff_max_ms = 400\n",
    );
    let (k1, k1b) = add(&gw, &["dev1"]);
    let (k2, _) = add(&gw, &["dev2"]);
    let port = gw.mqtt;

    // Valid, and confined to its own topics.
    let mut c1 = connect(port, "dev1", &k1).unwrap_or_else(|c| panic!("refused 0x{c:02x}\n{}", gw.describe()));
    assert!(
        c1.publish_acked("devices/dev1/messages/events/", "hello", Duration::from_secs(5))
            .unwrap()
    );
    assert!(
        !c1.publish_acked("devices/dev2/messages/events/", "spoof", Duration::from_secs(5))
            .unwrap()
    );
    drop(c1);

    // Refusals, each with its reason code.
    let expired = sas("dev1", &k1, 1_000_000_000);
    assert_eq!(
        connect_with(port, "dev1", &username("dev1"), expired.as_bytes()).err(),
        Some(0x87),
        "expired"
    );
    assert_eq!(connect(port, "dev1", &k2).err(), Some(0x87), "wrong key");
    let other = sas("dev2", &k2, in_an_hour());
    assert_eq!(
        connect_with(port, "dev1", &username("dev1"), other.as_bytes()).err(),
        Some(0x87),
        "other device's token"
    );
    assert_eq!(connect(port, "ghost", &k1).err(), Some(0x87), "not registered");
    assert_eq!(
        connect_with(
            port,
            "dev1",
            &username("dev1"),
            b"SharedAccessSignature sr=x&sig=%%%&se=1"
        )
        .err(),
        Some(0x86),
        "malformed token"
    );
    assert!(
        connect_with(port, "dev1", &username("dev1"), &[0xff, 0x00, 0xfe, 0x80]).is_err(),
        "binary garbage"
    );
    assert_eq!(
        connect_with(port, "dev1", &"u".repeat(5000), b"p").err(),
        Some(0x86),
        "oversize username"
    );
    // Seven failures in a row: the source is being slowed down, and it says so.
    assert!(gw.metric("holdfast_mqtt_auth_delayed_total") >= 1.0, "{}", gw.metrics());
    assert!(gw.metric("holdfast_mqtt_connects_total{result=\"not-authorized\"}") >= 4.0);
    assert!(gw.log().contains("slowing this source down"), "{}", gw.describe());

    // A broken request to the registry API is refused with a reason, not a crash.
    let url = format!("http://127.0.0.1:{}/api/v1/devices", gw.port);
    let auth = format!("Bearer {}", gw.token().trim());
    for body in [
        &b"\xff{not json"[..],
        br#"{"id":"x","colour":"red"}"#,
        br#"{"id":"","kind":"device"}"#,
    ] {
        let r = ureq::post(&url).header("Authorization", &auth).send(body);
        assert!(matches!(r, Err(ureq::Error::StatusCode(400))), "{r:?}");
    }
    assert_eq!(device_ids(&gw), ["dev1", "dev2"]);

    // Revocation while connected: disable, rotate, remove.
    let mut c1 = connect(port, "dev1", &k1).unwrap();
    let (took, code) = disconnected_after(&mut c1, || {
        gw.cli_ok(&["device", "disable", "dev1"]);
    });
    assert_eq!(code, Some(0x87), "disable disconnects");
    println!(
        "disabled device disconnected {} ms after `holdfast device disable` started",
        took.as_millis()
    );
    assert_eq!(connect(port, "dev1", &k1).err(), Some(0x87), "disabled");
    gw.cli_ok(&["device", "enable", "dev1"]);
    let mut c1 = connect(port, "dev1", &k1).unwrap();
    let mut new_primary = String::new();
    let (took, code) = disconnected_after(&mut c1, || {
        let v: serde_json::Value =
            serde_json::from_str(&gw.cli_ok(&["device", "rotate-key", "dev1", "--which", "primary", "--json"]))
                .unwrap();
        new_primary = v["sas_primary"].as_str().unwrap().to_string();
    });
    assert!(code.is_some(), "rotation disconnects");
    println!(
        "rotated device disconnected {} ms after `holdfast device rotate-key` started",
        took.as_millis()
    );
    assert_eq!(connect(port, "dev1", &k1).err(), Some(0x87), "old primary key");
    assert!(connect(port, "dev1", &k1b).is_ok(), "the secondary key was kept");
    let mut c1 = connect(port, "dev1", &new_primary).unwrap();
    let (_, code) = disconnected_after(&mut c1, || {
        gw.cli_ok(&["device", "rm", "dev1"]);
    });
    assert!(code.is_some(), "removal disconnects");
    assert_eq!(connect(port, "dev1", &new_primary).err(), Some(0x87), "removed");
    assert!(gw.metric("holdfast_mqtt_revoked_total") >= 3.0);

    // Swapping the auth plugin keeps connected clients; the new policy applies.
    let mut c2 = connect(port, "dev2", &k2).unwrap();
    assert!(
        c2.publish_acked("devices/dev2/secret", "before", Duration::from_secs(5))
            .unwrap()
    );
    let plugin_config = gw.dir.path().join("auth.json");
    std::fs::write(
        &plugin_config,
        r#"{"rules":[{"effect":"deny","operations":["publish"],"filter":"devices/{device_id}/secret"}]}"#,
    )
    .unwrap();
    gw.cli_ok(&[
        "plugin",
        "swap",
        "auth",
        AUTH_WASM,
        "--plugin-config",
        plugin_config.to_str().unwrap(),
    ]);
    assert!(
        c2.publish_acked("devices/dev2/messages/events/", "still here", Duration::from_secs(5))
            .unwrap()
    );
    assert!(
        !c2.publish_acked("devices/dev2/secret", "after", Duration::from_secs(5))
            .unwrap()
    );
    assert!(
        connect(port, "dev2", &k2).is_ok(),
        "new connections use the swapped plugin"
    );
    gw.stop();
}

#[test]
fn offline_authentication_after_one_sync() {
    let certs = fleet(&["root", "gw1"]);
    let link = free_port();
    let mut root = Gateway::start_named(
        "root",
        &format!("{}{}", fleet_section(certs.path(), "root"), listen_section(link)),
    );
    add(&root, &["gw1", "--kind", "gateway", "--parent", "root"]);
    let (k1, _) = add(&root, &["dev1", "--parent", "gw1"]);
    let (k9, _) = add(&root, &["dev9"]);
    let mut gw1 = Gateway::start_named(
        "gw1",
        &format!(
            "{}{}",
            fleet_section(certs.path(), "gw1"),
            upstream_section(addr(link), "root")
        ),
    );
    wait_until(20, "gw1 to sync dev1", || device_ids(&gw1) == ["dev1"]);
    let summary = gw1.api("/api/v1/registry");
    assert_eq!(summary["role"], "replica");
    assert!(summary["sync"]["full_syncs"].as_u64().unwrap() >= 1, "{summary}");

    // Incremental changes while the link is up.
    let start = Instant::now();
    let (k2, _) = add(&root, &["dev2", "--parent", "gw1"]);
    wait_until(10, "dev2 to reach gw1", || {
        device_ids(&gw1).contains(&"dev2".to_string())
    });
    println!("a new device reached the child in {} ms", start.elapsed().as_millis());
    let mut c1 = connect(gw1.mqtt, "dev1", &k1).unwrap_or_else(|c| panic!("0x{c:02x}\n{}", gw1.describe()));
    let (took, code) = disconnected_after(&mut c1, || {
        root.cli_ok(&["device", "disable", "dev1"]);
    });
    assert_eq!(code, Some(0x87), "disabled at the root, disconnected at the child");
    println!(
        "disabled at the root, disconnected at the child after {} ms",
        took.as_millis()
    );
    root.cli_ok(&["device", "enable", "dev1"]);
    wait_until(10, "dev1 to be enabled on gw1", || {
        gw1.api("/api/v1/devices/dev1")["enabled"] == true
    });

    // Keys are stored for the owner only.
    for entry in walk(&gw1.dir.path().join("data")) {
        let mode = std::os::unix::fs::MetadataExt::mode(&std::fs::metadata(&entry).unwrap());
        assert_eq!(mode & 0o077, 0, "{} is mode {:o}", entry.display(), mode & 0o777);
    }

    // A persistent subscriber at the root, for what arrives later.
    let mut sub = Client::connect(root.mqtt, "watcher", false).unwrap();
    sub.subscribe("devices/#").unwrap();
    drop(sub);

    // The upstream goes away; the child restarts; devices come and go.
    let syncs = gw1.api("/api/v1/registry")["sync"]["full_syncs"].as_u64().unwrap();
    root.kill();
    gw1.crash_restart();
    let mut c1 = connect(gw1.mqtt, "dev1", &k1).unwrap_or_else(|c| panic!("offline: 0x{c:02x}\n{}", gw1.describe()));
    assert!(
        c1.publish_acked("devices/dev1/messages/events/", "offline-1", Duration::from_secs(5))
            .unwrap()
    );
    drop(c1);
    let mut c1 = connect(gw1.mqtt, "dev1", &k1).unwrap();
    assert!(
        c1.publish_acked("devices/dev1/messages/events/", "offline-2", Duration::from_secs(5))
            .unwrap()
    );
    assert!(connect(gw1.mqtt, "dev2", &k2).is_ok());
    assert_eq!(connect(gw1.mqtt, "dev9", &k9).err(), Some(0x87), "outside gw1's scope");
    assert!(gw1.log().contains("is not in this node's scope"), "{}", gw1.describe());

    // The link returns: the messages reach the root.
    root.respawn();
    let mut sub = Client::connect(root.mqtt, "watcher", false).unwrap();
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while got.len() < 2 && Instant::now() < deadline {
        if let Some(m) = sub.recv(Duration::from_millis(500)).unwrap() {
            got.push(m.payload);
        }
    }
    assert_eq!(got, ["offline-1", "offline-2"], "{}", root.describe());
    wait_until(10, "a fresh full sync", || {
        gw1.api("/api/v1/registry")["sync"]["full_syncs"].as_u64().unwrap() > syncs
    });
    gw1.stop();
    root.stop();
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        }
        out.push(p);
    }
    out
}

#[test]
fn scope_sync_through_three_levels() {
    let certs = fleet(&["root", "gw2", "gw1"]);
    let (root_link, gw2_link) = (free_port(), free_port());
    let root = Gateway::start_named(
        "root",
        &format!("{}{}", fleet_section(certs.path(), "root"), listen_section(root_link)),
    );
    add(&root, &["gw2", "--kind", "gateway", "--parent", "root"]);
    add(&root, &["gw1", "--kind", "gateway", "--parent", "gw2"]);
    let (k1, _) = add(&root, &["dev1", "--parent", "gw1"]);
    let (k2, _) = add(&root, &["dev2", "--parent", "gw2"]);
    let gw2 = Gateway::start_named(
        "gw2",
        &format!(
            "{}{}{}",
            fleet_section(certs.path(), "gw2"),
            listen_section(gw2_link),
            upstream_section(addr(root_link), "root")
        ),
    );
    let gw1 = Gateway::start_named(
        "gw1",
        &format!(
            "{}{}",
            fleet_section(certs.path(), "gw1"),
            upstream_section(addr(gw2_link), "gw2")
        ),
    );
    wait_until(20, "gw2's scope", || device_ids(&gw2) == ["dev1", "dev2", "gw1"]);
    wait_until(20, "gw1's scope", || device_ids(&gw1) == ["dev1"]);
    assert!(connect(gw2.mqtt, "dev2", &k2).is_ok());
    assert_eq!(
        connect(gw1.mqtt, "dev2", &k2).err(),
        Some(0x87),
        "dev2 belongs to gw2, not gw1"
    );

    // A change at the root crosses both levels.
    let start = Instant::now();
    add(&root, &["dev3", "--parent", "gw1"]);
    wait_until(10, "dev3 at gw1", || device_ids(&gw1).contains(&"dev3".to_string()));
    println!("a new device crossed two levels in {} ms", start.elapsed().as_millis());

    // Moving dev1 out of gw1's scope disconnects it there.
    let mut c1 = connect(gw1.mqtt, "dev1", &k1).unwrap();
    let (took, code) = disconnected_after(&mut c1, || {
        root.cli_ok(&["device", "set-parent", "dev1", "gw2"]);
    });
    assert!(code.is_some(), "moved away: disconnected at gw1");
    println!(
        "moved at the root, disconnected two levels down after {} ms",
        took.as_millis()
    );
    wait_until(10, "dev1 to leave gw1", || device_ids(&gw1) == ["dev3"]);
    assert!(connect(gw2.mqtt, "dev1", &k1).is_ok(), "dev1 now authenticates at gw2");

    // A disabled child gateway loses its link.
    root.cli_ok(&["device", "disable", "gw1"]);
    wait_until(10, "gw2 to drop gw1", || {
        gw2.api("/api/v1/link")["link"]["children"]
            .as_object()
            .is_some_and(|c| c.is_empty())
    });
    assert!(
        gw2.metric("holdfast_link_refused_total{reason=\"revoked\"}") >= 1.0,
        "{}",
        gw2.metrics()
    );
    let refused = gw1.api("/api/v1/link")["link"]["last_error"].to_string();
    assert!(refused.contains("not") || refused.contains("closed"), "{refused}");
    // Replicas refuse local changes.
    let out = gw1.cli(&["device", "add", "x"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("replica"));
    gw1.stop();
    gw2.stop();
    root.stop();
}
