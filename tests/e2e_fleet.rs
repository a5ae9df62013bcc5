//! The fleet view across a three-level tree of separate processes (root ←
//! mid ← leaf, the leaf's path through a UDP proxy that can cut it): every
//! node reaches the root's `GET /api/v1/fleet`, `holdfast fleet` and the
//! status page; a node cut off is shown as not reporting within seconds;
//! a node forgotten below is forgotten above.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test or benchmark: a panic is its failure

mod support;

use std::io::Read as _;
use std::process::Stdio;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{Value, json};
use support::browser::Browser;
use support::client::Client;
use support::fleet::{addr, fleet, fleet_section, listen_section, upstream_section, wait_until};
use support::proxy::Proxy;
use support::{Gateway, free_port, http_get};

/// Each node sends its changes up every second.
const FAST: &str = "[deploy]\nfleet_report_seconds = 1\n";

fn identity(id: &str, parent: &str, labels: &str) -> String {
    format!("[[identities]]\nid = \"{id}\"\nkind = \"gateway\"\nparent = \"{parent}\"\nlabels = {{ {labels} }}\n")
}

/// The ids of a fleet answer, in order.
fn ids(v: &Value) -> Vec<String> {
    v["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["node"].as_str().unwrap().to_string())
        .collect()
}

fn node<'a>(v: &'a Value, id: &str) -> &'a Value {
    v["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node"] == id)
        .unwrap_or_else(|| panic!("no {id} in {v}"))
}

/// The state of `id` in `gw`'s view (`None`: not listed).
fn state_of(gw: &Gateway, id: &str) -> Option<String> {
    let v = gw.api("/api/v1/fleet");
    v["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node"] == id)
        .map(|n| n["state"].as_str().unwrap().to_string())
}

#[test]
fn a_three_level_tree_in_the_api_the_cli_and_the_page_with_a_node_cut_off() {
    let certs = fleet(&["root", "mid", "leaf"]);
    let c = certs.path();
    let (root_link, mid_link) = (free_port(), free_port());
    let root = Gateway::start_named(
        "root",
        &format!(
            "{}{}{FAST}{}",
            fleet_section(c, "root"),
            listen_section(root_link),
            identity("mid", "root", "site = \"north\", tier = \"2\"")
        ),
    );
    let mid = Gateway::start_named(
        "mid",
        &format!(
            "{}{}{}{FAST}{}",
            fleet_section(c, "mid"),
            listen_section(mid_link),
            upstream_section(addr(root_link), "root"),
            identity("leaf", "mid", "site = \"north\"")
        ),
    );
    let cut = Proxy::start(addr(mid_link));
    let leaf = Gateway::start_named(
        "leaf",
        &format!("{}{}{FAST}", fleet_section(c, "leaf"), upstream_section(cut.udp, "mid")),
    );
    let _device = Client::connect(leaf.mqtt, "sensor-1", true).unwrap();

    // Every node reaches the root, in tree order, with what it said.
    wait_until(60, "the root to list the three nodes reporting", || {
        let v = root.api("/api/v1/fleet");
        ids(&v) == ["root", "mid", "leaf"]
            && v["nodes"].as_array().unwrap().iter().all(|n| n["state"] == "ok")
            && node(&v, "leaf")["clients"] == 1
    });
    let v = root.api("/api/v1/fleet");
    assert_eq!(v["summary"], json!({ "nodes": 3, "by_state": { "ok": 3 } }));
    assert_eq!(v["report_seconds"], 1);
    let (r, m, l) = (node(&v, "root"), node(&v, "mid"), node(&v, "leaf"));
    assert_eq!(
        (r["depth"].clone(), m["depth"].clone(), l["depth"].clone()),
        (json!(0), json!(1), json!(2))
    );
    assert_eq!(
        (r["link"].as_str(), m["link"].as_str(), l["link"].as_str()),
        (Some("root"), Some("up"), Some("up"))
    );
    assert_eq!((l["parent"].as_str(), l["via"].as_str()), (Some("mid"), Some("mid")));
    assert_eq!(
        m["labels"],
        json!({ "site": "north", "tier": "2" }),
        "labels from the root's registry"
    );
    assert_eq!(l["version"], env!("CARGO_PKG_VERSION"));
    assert!(l["quota_bytes"].as_u64().unwrap() > 0, "{l}");
    assert!(l["disk_bytes"].as_u64().unwrap() > 0, "{l}");
    let slots: Vec<&str> = l["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["slot"].as_str().unwrap())
        .collect();
    assert!(slots.contains(&"router") && slots.contains(&"auth"), "{l}");
    assert!(l["reporting"].as_bool().unwrap());

    // Filters: subtree, label, state, search; bad ones are refused.
    assert_eq!(ids(&root.api("/api/v1/fleet?subtree=mid")), ["mid", "leaf"]);
    assert_eq!(ids(&root.api("/api/v1/fleet?label=tier=2")), ["mid"]);
    assert_eq!(ids(&root.api("/api/v1/fleet?label=site=north")), ["mid", "leaf"]);
    assert_eq!(ids(&root.api("/api/v1/fleet?q=LEA")), ["leaf"]);
    assert!(ids(&root.api("/api/v1/fleet?state=not-reporting")).is_empty());
    let token = root.token();
    let get = |path: &str| http_get(root.port, path, Some(token.trim())).unwrap();
    let (code, body) = get("/api/v1/fleet?state=asleep");
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("not-reporting"), "{body}");
    assert_eq!(get("/api/v1/fleet?label=site").0, 400);
    assert_eq!(get("/api/v1/fleet?subtree=nowhere").0, 404);
    // The mid gateway sees its own subtree only.
    assert_eq!(ids(&mid.api("/api/v1/fleet")), ["mid", "leaf"]);

    // The CLI: a table in tree order, and a watch that redraws.
    let out = root.cli_ok(&["fleet"]);
    eprintln!("holdfast fleet:\n{out}");
    assert!(out.starts_with("fleet of root: 3 nodes (3 ok)"), "{out}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[1].starts_with("NODE") && lines[1].contains("TO DRAIN"), "{out}");
    assert!(
        lines[2].starts_with("root ") && lines[3].starts_with("  mid ") && lines[4].starts_with("    leaf "),
        "{out}"
    );
    let out = root.cli_ok(&["fleet", "--subtree", "mid", "--state", "ok"]);
    assert!(out.starts_with("fleet of root: 2 nodes (2 ok)"), "{out}");
    let mut watch = root
        .cli_args(&["fleet", "--watch", "1"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(2500));
    watch.kill().unwrap();
    let mut text = String::new();
    watch.stdout.take().unwrap().read_to_string(&mut text).unwrap();
    let _ = watch.wait();
    assert!(text.matches("every 1 s, Ctrl-C to stop").count() >= 2, "{text}");

    // The page: the tree of the three nodes, a colour per state.
    let browser = Browser::start();
    browser.open(&format!("http://127.0.0.1:{}/#token={}", root.port, token.trim()));
    browser.wait_text("fleet-count", "3");
    let rows = || {
        browser.eval(
            "return [...document.querySelectorAll('#fleet-tree tbody tr')].map(r => [r.dataset.node, r.dataset.state, r.cells[0].innerText]);",
        )
    };
    assert_eq!(
        rows(),
        json!([
            ["root", "ok", "root"],
            ["mid", "ok", "  mid"],
            ["leaf", "ok", "    leaf"]
        ])
    );
    let dots = browser.eval("return document.querySelectorAll('#fleet-tree .dot.ok').length;");
    assert_eq!(dots, 3);
    // Search narrows the tree.
    browser.eval("const s = document.getElementById('fleet-search'); s.value = 'lea'; s.dispatchEvent(new Event('input')); return null;");
    browser.wait_text("fleet-count", "1");
    browser.eval("const s = document.getElementById('fleet-search'); s.value = ''; s.dispatchEvent(new Event('input')); return null;");
    browser.wait_text("fleet-count", "3");

    // The leaf is cut off: the root and the page show it within seconds.
    let cut_at = Instant::now();
    cut.cmd("cut");
    wait_until(20, "the root to show the leaf not reporting", || {
        state_of(&root, "leaf").as_deref() == Some("not-reporting")
    });
    let seen_after = cut_at.elapsed();
    let v = root.api("/api/v1/fleet");
    let l = node(&v, "leaf");
    assert!(!l["reporting"].as_bool().unwrap());
    let contact = l["last_contact_ms"].as_u64().unwrap();
    assert!(
        contact <= v["now_ms"].as_u64().unwrap() && contact > v["now_ms"].as_u64().unwrap() - 30_000,
        "{l}"
    );
    assert_eq!(node(&v, "mid")["state"], "ok");
    wait_until(10, "the root's gauge to count the leaf", || {
        root.metric("holdfast_fleet_nodes{state=\"not-reporting\"}") == 1.0
            && root.metric("holdfast_fleet_nodes{state=\"ok\"}") == 2.0
    });
    eprintln!("holdfast fleet, the leaf cut off:\n{}", root.cli_ok(&["fleet"]));
    let deadline = Instant::now() + Duration::from_secs(10);
    while rows()[2][1] != "not-reporting" {
        assert!(Instant::now() < deadline, "the page does not show the cut: {}", rows());
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(browser.text("fleet-tree").contains("the path to the node is cut"));
    let bad = browser.eval("return document.querySelectorAll('#fleet-tree .dot.bad').length;");
    assert_eq!(bad, 1);
    eprintln!("the cut showed at the root after {seen_after:?}");
    // A picture of the page for the operator guide (docs/images/fleet.png is a copy).
    let png = browser.call("GET", &format!("/session/{}/screenshot", browser.session), json!({}));
    let png = base64::engine::general_purpose::STANDARD
        .decode(png.as_str().unwrap())
        .unwrap();
    let shots = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/screenshots");
    std::fs::create_dir_all(&shots).unwrap();
    std::fs::write(shots.join("fleet.png"), png).unwrap();

    // The leaf itself knows it is offline, with what it holds.
    let mut device = Client::connect(leaf.mqtt, "sensor-2", true).unwrap();
    for i in 0..5 {
        assert!(
            device
                .publish_acked("telemetry/x", &i.to_string(), Duration::from_secs(10))
                .unwrap()
        );
    }
    wait_until(20, "the leaf to see itself offline with 5 messages", || {
        let v = leaf.api("/api/v1/fleet");
        let me = node(&v, "leaf");
        me["state"] == "offline" && me["backlog_messages"] == 5
    });
    let out = leaf.cli_ok(&["fleet"]);
    assert!(out.contains("offline"), "{out}");

    // The path is back: the leaf reports again, and its backlog drains.
    cut.cmd("up");
    wait_until(60, "the root to show the leaf reporting and drained", || {
        let v = root.api("/api/v1/fleet");
        let l = node(&v, "leaf");
        l["state"] == "ok" && l["backlog_messages"] == 0
    });

    // The leaf is gone for good: once it stopped reporting, forgetting it
    // at its parent forgets it at the root too.
    drop(device);
    drop(leaf);
    wait_until(20, "the mid gateway to show the leaf not reporting", || {
        state_of(&mid, "leaf").as_deref() == Some("not-reporting")
    });
    let out = mid.cli(&["fleet", "forget", "mid"]);
    assert!(!out.status.success(), "a node that reports is not forgotten");
    mid.cli_ok(&["fleet", "forget", "leaf"]);
    wait_until(20, "the root to forget the leaf", || state_of(&root, "leaf").is_none());
    assert_eq!(ids(&root.api("/api/v1/fleet")), ["root", "mid"]);
}
