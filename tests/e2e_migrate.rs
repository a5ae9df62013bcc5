//! Migrating from IoT Edge: `holdfast import edge-manifest` on manifests of
//! each edgeHub schema (tests/fixtures/edge), a node running the imported
//! config that routes real MQTT traffic as the manifest says (lanes from
//! priorities, module to module, drop when no route), and `holdfast deploy
//! create --from-edge-manifest` applying the same as a fleet deployment.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test or benchmark: a panic is its failure

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use base64::Engine as _;
use serde_json::Value;
use support::client::Client;
use support::device::Device;
use support::fleet::{addr, fleet, fleet_section, upstream_section, wait_until};
use support::{BIN, Gateway, free_port};

fn manifest(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/edge")
        .join(name)
}

fn key(n: u8) -> String {
    base64::engine::general_purpose::STANDARD.encode([n; 32])
}

/// Identities for the 1.1 manifest's traffic on gateway `gw`: a leaf
/// device, and the gateway's modules `sensor` and `filter`.
fn identities(gw: &str) -> String {
    let mut s = String::new();
    for (i, (id, kind)) in [
        ("dev1", "device"),
        (gw, "device"),
        (&format!("{gw}/sensor"), "module"),
        (&format!("{gw}/filter"), "module"),
    ]
    .iter()
    .enumerate()
    {
        s.push_str(&format!(
            "[[identities]]\nid = {id:?}\nkind = {kind:?}\nsas_primary = {:?}\n",
            key(i as u8 + 1)
        ));
    }
    s
}

fn import(args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .arg("import")
        .arg("edge-manifest")
        .args(args)
        .output()
        .unwrap()
}

/// The messages held in each outbox lane.
fn lanes(gw: &Gateway) -> Vec<(u64, u64)> {
    gw.api("/api/v1/outbox")["lanes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["messages"].as_u64().unwrap() > 0)
        .map(|l| (l["lane"].as_u64().unwrap(), l["messages"].as_u64().unwrap()))
        .collect()
}

#[test]
fn import_prints_the_config_lists_what_it_leaves_out_and_refuses_a_bad_route() {
    for (file, schema, routes) in [
        ("deployment-1.0.json", "1.0", 2),
        ("deployment-1.1.json", "1.1", 4),
        ("deployment-1.2.json", "1.2", 3),
    ] {
        let out = import(&[manifest(file).to_str().unwrap()]);
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        assert!(out.status.success(), "{file}: {stderr}");
        assert!(stdout.contains("[plugins.router.config.routes]"), "{stdout}");
        assert!(
            stderr.starts_with(&format!("edgeHub schema {schema}: {routes} route(s)")),
            "{file}: {stderr}"
        );
        assert!(stderr.contains("not mapped ("), "{stderr}");
        // What it prints is a config `holdfast config check` accepts.
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("holdfast.toml");
        std::fs::write(
            &conf,
            format!("[node]\ndata_dir = {:?}\n{stdout}", dir.path().join("data")),
        )
        .unwrap();
        let check = Command::new(BIN).args(["config", "check"]).arg(&conf).output().unwrap();
        assert!(
            check.status.success(),
            "{file}: {}\n{stdout}",
            String::from_utf8_lossy(&check.stderr)
        );
    }
    // The Connected Cache module's settings.
    let out = import(&[manifest("deployment-1.2.json").to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    for want in [
        "listen = \"0.0.0.0:8081\"",
        "max_size = 75000000000",
        "parent = \"http://10.0.0.4\"",
        "hosts = [\"firmware.contoso.com\", \"10.0.0.9:8000\"]",
        "origin = \"http://10.0.0.9:8000\"",
        "# - $edgeAgent.modules.ConnectedCache.env.CUSTOMER_ID:",
    ] {
        assert!(stdout.contains(want), "{want}: {stdout}");
    }
    // --out writes the file, and will not replace one without --force.
    let dir = tempfile::tempdir().unwrap();
    let out_file = dir.path().join("gw.toml");
    let args = [
        manifest("deployment-1.1.json").to_str().unwrap().to_string(),
        "--out".into(),
        out_file.to_str().unwrap().to_string(),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    assert!(import(&args).status.success());
    assert!(
        std::fs::read_to_string(&out_file)
            .unwrap()
            .contains("alerts = { route = ")
    );
    let again = import(&args);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));
    // --json for scripts.
    let out = Command::new(BIN)
        .args(["--json", "import", "edge-manifest"])
        .arg(manifest("deployment-1.0.json"))
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["settings"]["outbox.default_ttl_seconds"], 7200);
    assert_eq!(v["not_mapped"].as_array().unwrap().len(), 6);
    // A route the route language does not take stops it, naming the route.
    let bad = dir.path().join("bad.json");
    std::fs::write(
        &bad,
        r#"{"modulesContent":{"$edgeHub":{"properties.desired":{"schemaVersion":"1.1","routes":{"twins":"FROM /twinChangeNotifications INTO $upstream"}}}}}"#,
    )
    .unwrap();
    let out = import(&[bad.to_str().unwrap()]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("route \"twins\": column"), "{stderr}");
    assert!(out.stdout.is_empty());
}

#[test]
fn an_imported_manifest_routes_real_traffic_as_it_says() {
    let certs = fleet(&["gw"]);
    let dir = tempfile::tempdir().unwrap();
    let imported = dir.path().join("imported.toml");
    let out = import(&[
        manifest("deployment-1.1.json").to_str().unwrap(),
        "--out",
        imported.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // The parent is never up: what goes upstream stays in its lane.
    let gw = Gateway::start_named(
        "gw",
        &format!(
            "{}{}{}{}",
            fleet_section(certs.path(), "gw"),
            upstream_section(addr(free_port()), "hub"),
            identities("gw"),
            std::fs::read_to_string(&imported).unwrap()
        ),
    );
    let filter = Device::connect(gw.mqtt, "gw/filter", &key(4));
    filter.subscribe(&["devices/gw/modules/filter/inputs/#"]);
    let sensor = Device::connect(gw.mqtt, "gw/sensor", &key(3));
    let dev1 = Device::connect(gw.mqtt, "dev1", &key(1));
    let events = "devices/dev1/messages/events/";

    // "alerts" (priority 0) and "leafTelemetry" (priority 5) both take it: lane 0, once.
    dev1.publish(events, r#"{"machine":{"temperature":95}}"#);
    // Only "leafTelemetry": lane 5.
    dev1.publish(events, r#"{"machine":{"temperature":20}}"#);
    // "jsonFromFilter" (priority 3): the filter's JSON output.
    filter.publish(
        "devices/gw/modules/filter/messages/events/%24.on=alerts&%24.ct=application%2Fjson",
        r#"{"ok":true}"#,
    );
    // "sensorToFilter": module to module, BrokeredEndpoint.
    sensor.publish("devices/gw/modules/sensor/messages/events/%24.on=out1&unit=C", "21.5");
    let (topic, payload) = filter.expect("devices/gw/modules/filter/inputs/in1/");
    assert_eq!(payload, b"21.5", "{topic}");
    // No route takes these: dropped, as IoT Edge does.
    filter.publish(
        "devices/gw/modules/filter/messages/events/%24.on=alerts&%24.ct=text%2Fplain",
        "plain",
    );
    sensor.publish("devices/gw/modules/sensor/messages/events/%24.on=out2", "not routed");

    wait_until(20, "the routed messages in their lanes", || {
        lanes(&gw) == [(0, 1), (3, 1), (5, 1)]
    });
    wait_until(10, "the two dropped", || {
        gw.metric("holdfast_mqtt_messages_dropped_total{reason=\"no-route\"}") == 2.0
    });
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(lanes(&gw), [(0, 1), (3, 1), (5, 1)], "nothing else arrived");
    assert!(filter.try_expect("devices/gw/modules/filter/inputs/", 1).is_none());
}

#[test]
fn deploy_create_from_an_edge_manifest_applies_its_routes_and_settings() {
    let certs = fleet(&["root"]);
    // The owning root, as its own target (`--all`): its routes are the manifest's once applied.
    let root = Gateway::start_named(
        "root",
        &format!("{}{}", fleet_section(certs.path(), "root"), identities("root")),
    );
    let m = manifest("deployment-1.1.json");
    let m = m.to_str().unwrap();
    let out = root
        .cli_args(&[
            "deploy",
            "create",
            "edge",
            "--all",
            "--soak",
            "0",
            "--from-edge-manifest",
            m,
        ])
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.starts_with("created edge: 1 node(s)"), "{stdout}");
    assert!(stderr.contains("not mapped ("), "{stderr}");
    wait_until(30, "the deployment applied at the root", || {
        root.api("/api/v1/deployments/edge")["node_states"][0]["state"] == "applied"
    });
    let applied = root.api("/api/v1/deploy")["applied"].clone();
    assert_eq!(
        applied["overlay"]["settings"]["outbox.default_ttl_seconds"], 604_800,
        "{applied}"
    );
    let routes = &applied["overlay"]["plugins"]["router"]["config"]["routes"];
    assert_eq!(routes["alerts"]["priority"], 0, "{applied}");

    // The router in force is the manifest's: a hot reading goes "upstream"
    // (at a root, to local subscribers of its topic); a message no route takes is dropped.
    let mut backend = Client::connect(root.mqtt, "backend", true).unwrap();
    backend.subscribe("devices/#").unwrap();
    let dev1 = Device::connect(root.mqtt, "dev1", &key(1));
    dev1.publish("devices/dev1/messages/events/", r#"{"machine":{"temperature":95}}"#);
    let got = backend
        .recv(Duration::from_secs(10))
        .unwrap()
        .expect("the routed message");
    assert!(got.topic.starts_with("devices/dev1/messages/events/"), "{}", got.topic);
    let filter = Device::connect(root.mqtt, "root/filter", &key(4));
    filter.publish(
        "devices/root/modules/filter/messages/events/%24.ct=text%2Fplain",
        "plain",
    );
    wait_until(10, "the unrouted message dropped", || {
        root.metric("holdfast_mqtt_messages_dropped_total{reason=\"no-route\"}") == 1.0
    });
    // --plugin-config for the router beside the manifest is refused.
    let cfg = certs.path().join("router.toml");
    std::fs::write(&cfg, "default_lane = 1\n").unwrap();
    let plugin_config = format!("router={}", cfg.display());
    let out = root
        .cli_args(&[
            "deploy",
            "create",
            "edge2",
            "--all",
            "--plugin-config",
            &plugin_config,
            "--from-edge-manifest",
            m,
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("both set the router plugin's config"));
}
