//! End-to-end tests of fleet deployments: several `holdfast` processes
//! joined by QUIC links (through the fault-injection link proxy), a
//! deployment created at the owning node with the CLI, components fetched
//! once per link, applied through the swap path, rolled back by a node
//! whose new plugin traps, and refused when tampered with.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test or benchmark: a panic is its failure

mod support;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use support::client::Client;
use support::delivery::Consumer;
use support::fleet::{addr, fleet, fleet_section, listen_section, upstream_section, wait_until};
use support::proxy::Proxy;
use support::{Gateway, free_port};

const TEST_ROUTER: &str = holdfast_plugins::artifacts::TEST_ROUTER_WASM;

fn gateway(id: &str, parent: &str, labels: &str) -> String {
    format!("[[identities]]\nid = \"{id}\"\nkind = \"gateway\"\nparent = \"{parent}\"\nlabels = {{ {labels} }}\n")
}

fn sha256_of(path: &str) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(std::fs::read(path).unwrap()))
}

/// The state of `node` in deployment `id` as the owning node shows it.
fn state_at(owner: &Gateway, id: &str, node: &str) -> String {
    let v = owner.api(&format!("/api/v1/deployments/{id}"));
    v["node_states"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node"] == node)
        .map(|n| n["state"].as_str().unwrap().to_string())
        .unwrap_or_else(|| panic!("{node} is not in the target of {id}: {v}"))
}

fn component_bytes(gw: &Gateway, event: &str) -> f64 {
    gw.metric(&format!("holdfast_deploy_component_bytes_total{{event=\"{event}\"}}"))
}

/// Publishes QoS 1 messages `0, 1, 2…` on `topic` until stopped; the
/// acknowledged sequence numbers.
struct Publisher {
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<u64>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Publisher {
    fn start(port: u16, client_id: &str, topic: &'static str) -> Publisher {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(Mutex::new(Vec::new()));
        let (s, a) = (stop.clone(), acked.clone());
        let mut client = Client::connect(port, client_id, true).unwrap();
        let thread = std::thread::spawn(move || {
            let mut i = 0u64;
            while !s.load(Ordering::Relaxed) {
                if client
                    .publish_acked(topic, &i.to_string(), Duration::from_secs(10))
                    .unwrap()
                {
                    a.lock().unwrap().push(i);
                }
                i += 1;
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        Publisher {
            stop,
            acked,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> Vec<u64> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        self.acked.lock().unwrap().clone()
    }
}

#[test]
fn a_new_router_reaches_every_node_of_a_three_level_tree() {
    let certs = fleet(&["root", "gw1", "gw2", "gw3"]);
    let c = certs.path();
    let (root_link, gw1_link) = (free_port(), free_port());
    let root = Gateway::start_named(
        "root",
        &format!(
            "{}{}{}{}{}",
            fleet_section(c, "root"),
            listen_section(root_link),
            gateway("gw1", "root", ""),
            gateway("gw2", "gw1", ""),
            gateway("gw3", "gw1", "")
        ),
    );
    let p1 = Proxy::start(addr(root_link));
    let gw1 = Gateway::start_named(
        "gw1",
        &format!(
            "{}{}{}",
            fleet_section(c, "gw1"),
            listen_section(gw1_link),
            upstream_section(p1.udp, "root")
        ),
    );
    let p2 = Proxy::start(addr(gw1_link));
    let mut gw2 = Gateway::start_named(
        "gw2",
        &format!("{}{}", fleet_section(c, "gw2"), upstream_section(p2.udp, "gw1")),
    );
    // gw3 pins its outbox settings: deployments leave them alone. Its
    // max_bytes is set below any disk's cap (the default, 10 GiB, is capped
    // by the free space, which moves between restarts).
    let mut gw3 = Gateway::start_named(
        "gw3",
        &format!(
            "{}{}[outbox]\nmax_bytes = 20000000\n[deploy]\npinned = [\"outbox\"]\n",
            fleet_section(c, "gw3"),
            upstream_section(addr(gw1_link), "gw1")
        ),
    );
    for gw in [&gw1, &gw2, &gw3] {
        wait_until(30, "the tree's links up", || {
            gw.api("/api/v1/link")["link"]["state"] == "up"
        });
    }
    let embedded = root.router_version();
    let max_bytes_before = gw3.api("/api/v1/outbox")["max_bytes"].as_u64().unwrap();
    assert_eq!(max_bytes_before, 20_000_000);
    // gw3 is offline for the whole rollout.
    gw3.kill();

    // QoS 1 traffic from a device on gw1 to the root through every swap.
    let consumer = Consumer::start(root.mqtt, "backend", "payload/#");
    let publisher = Publisher::start(gw1.mqtt, "dev1", "payload/t");
    std::thread::sleep(Duration::from_millis(500));

    let config = c.join("router.toml");
    std::fs::write(&config, "tag = \"v2\"\n").unwrap();
    let out = root.cli_ok(&[
        "deploy",
        "create",
        "d1",
        "--all",
        "--plugin",
        &format!("router={TEST_ROUTER}"),
        "--plugin-config",
        &format!("router={}", config.display()),
        "--set",
        "outbox.max_bytes=50000000",
    ]);
    assert!(out.starts_with("created d1: 4 node(s), 4 released"), "{out}");
    let sha = sha256_of(TEST_ROUTER);
    let size = std::fs::metadata(TEST_ROUTER).unwrap().len() as f64;

    for node in ["root", "gw1", "gw2"] {
        wait_until(60, &format!("d1 applied at {node}"), || {
            state_at(&root, "d1", node) == "applied"
        });
    }
    for gw in [&root, &gw1, &gw2] {
        assert_eq!(gw.router_version(), sha, "{}", gw.describe());
        assert_eq!(gw.api("/api/v1/outbox")["max_bytes"], 50_000_000);
    }
    // The offline node is shown as not reached.
    assert_eq!(state_at(&root, "d1", "gw3"), "pending");
    let show = root.cli_ok(&["deploy", "show", "d1"]);
    assert!(show.contains("gw3") && show.contains("pending"), "{show}");

    // gw2 restarts mid-rollout with its parent out of reach: it starts with
    // the deployment it applied.
    p2.cmd("cut");
    gw2.crash_restart();
    assert_eq!(gw2.router_version(), sha, "gw2 restarted without its parent");
    assert_eq!(gw2.api("/api/v1/deploy")["applied"]["deployment"], "d1");
    p2.cmd("up");

    // gw3 comes back and catches up; its pinned setting stays.
    gw3.respawn();
    wait_until(60, "d1 applied at gw3", || state_at(&root, "d1", "gw3") == "applied");
    assert_eq!(gw3.router_version(), sha);
    assert_eq!(
        gw3.api("/api/v1/outbox")["max_bytes"].as_u64().unwrap(),
        max_bytes_before
    );
    wait_until(30, "gw2 back up", || gw2.api("/api/v1/link")["link"]["state"] == "up");

    // The component crossed each link once: root → gw1, gw1 → gw2, gw1 → gw3.
    assert_eq!(component_bytes(&root, "sent"), size);
    assert_eq!(component_bytes(&gw1, "received"), size);
    assert_eq!(component_bytes(&gw1, "sent"), 2.0 * size);
    assert_eq!(component_bytes(&gw3, "received"), size);

    // Traffic flowed through every swap: nothing lost, nothing twice.
    let acked = publisher.finish();
    assert!(acked.len() > 100, "only {} messages acknowledged", acked.len());
    wait_until(30, "every acknowledged message at the root", || {
        let got: HashSet<u64> = consumer.messages().iter().map(|m| m.payload.parse().unwrap()).collect();
        acked.iter().all(|a| got.contains(a))
    });
    std::thread::sleep(Duration::from_millis(500));
    let got: Vec<u64> = consumer.messages().iter().map(|m| m.payload.parse().unwrap()).collect();
    let unique: HashSet<u64> = got.iter().copied().collect();
    assert_eq!(unique.len(), got.len(), "duplicates arrived");

    // Rolled back by the operator: every node returns to its own router.
    root.cli_ok(&["deploy", "rollback", "d1"]);
    for gw in [&root, &gw1, &gw2, &gw3] {
        wait_until(30, "the embedded router back", || gw.router_version() == embedded);
    }
    for node in ["root", "gw1", "gw2", "gw3"] {
        wait_until(30, "rolled-back reported", || {
            state_at(&root, "d1", node) == "rolled-back"
        });
    }
    assert_eq!(
        gw3.api("/api/v1/outbox")["max_bytes"].as_u64().unwrap(),
        max_bytes_before
    );
    drop(consumer);
}

#[test]
fn a_trapping_router_is_rolled_back_on_the_first_wave_and_goes_no_further() {
    let certs = fleet(&["root", "gwa", "gwb", "gwc", "gwd"]);
    let c = certs.path();
    let root_link = free_port();
    let root = Gateway::start_named(
        "root",
        &format!(
            "{}{}{}{}{}{}",
            fleet_section(c, "root"),
            listen_section(root_link),
            gateway("gwa", "root", "site = \"north\""),
            gateway("gwb", "root", "site = \"north\""),
            gateway("gwc", "root", "site = \"north\""),
            gateway("gwd", "root", "site = \"south\"")
        ),
    );
    let start = |id: &str| {
        Gateway::start_named(
            id,
            &format!("{}{}", fleet_section(c, id), upstream_section(addr(root_link), "root")),
        )
    };
    let (gwa, gwb, gwc) = (start("gwa"), start("gwb"), start("gwc"));
    for gw in [&gwa, &gwb, &gwc] {
        wait_until(30, "links up", || gw.api("/api/v1/link")["link"]["state"] == "up");
    }
    let embedded = gwa.router_version();
    let out = root.cli_ok(&[
        "deploy",
        "create",
        "canary",
        "--label",
        "site=north",
        "--plugin",
        &format!("router={TEST_ROUTER}"),
        "--waves",
        "1,100%",
        "--soak",
        "60",
        "--min-calls",
        "5",
        "--max-failure-rate",
        "0.2",
    ]);
    assert!(out.starts_with("created canary: 3 node(s), 1 released"), "{out}");
    wait_until(60, "canary applied at gwa", || {
        state_at(&root, "canary", "gwa") == "applied"
    });
    assert_eq!(state_at(&root, "canary", "gwb"), "waiting");
    // Real traffic that the new router traps on.
    let mut device = Client::connect(gwa.mqtt, "dev-a", true).unwrap();
    for i in 0..20 {
        let _ = device.publish_acked("hostile/trap", &i.to_string(), Duration::from_secs(2));
    }
    wait_until(30, "gwa rolled back", || {
        state_at(&root, "canary", "gwa") == "rolled-back"
    });
    wait_until(10, "the rollout halted", || {
        root.api("/api/v1/deployments/canary")["phase"]["state"] == "halted"
    });
    let v = root.api("/api/v1/deployments/canary");
    assert!(v["phase"]["reason"].as_str().unwrap().contains("gwa"), "{v}");
    assert_eq!(gwa.router_version(), embedded, "gwa runs its own router again");
    let status = gwa.api("/api/v1/deploy");
    assert!(status["applied"].is_null(), "{status}");
    assert_eq!(status["refused_content"][0][0], "canary", "{status}");
    // The halted rollout reached no one else.
    std::thread::sleep(Duration::from_secs(2));
    for gw in [&gwb, &gwc] {
        assert_eq!(gw.router_version(), embedded);
        assert_eq!(component_bytes(gw, "received"), 0.0);
    }
    assert_eq!(state_at(&root, "canary", "gwb"), "waiting");
    assert_eq!(state_at(&root, "canary", "gwc"), "waiting");
    assert!(root.metric("holdfast_deploy_events_total{event=\"halted\"}") >= 1.0);
    assert!(gwa.metric("holdfast_deploy_events_total{event=\"rolled-back\"}") >= 1.0);
    // gwd (another label) was never in the target.
    assert_eq!(v["nodes"], serde_json::json!(["gwa", "gwb", "gwc"]));
}

#[test]
fn tampered_unsigned_and_upward_deployments_are_refused() {
    let certs = fleet(&["root", "gw1", "gw2"]);
    let c = certs.path();
    let (root_link, gw1_link) = (free_port(), free_port());
    let root = Gateway::start_named(
        "root",
        &format!(
            "{}{}{}{}",
            fleet_section(c, "root"),
            listen_section(root_link),
            gateway("gw1", "root", ""),
            gateway("gw2", "gw1", "")
        ),
    );
    let gw1 = Gateway::start_named(
        "gw1",
        &format!(
            "{}{}{}",
            fleet_section(c, "gw1"),
            listen_section(gw1_link),
            upstream_section(addr(root_link), "root")
        ),
    );
    wait_until(30, "link up", || gw1.api("/api/v1/link")["link"]["state"] == "up");
    // An unknown component is refused at create.
    let (code, body) = root.post(
        "/api/v1/deployments",
        &serde_json::json!({"id": "x", "target": {"all": true}, "plugins": {"router": {"sha256": "0".repeat(64)}}}),
    );
    assert_eq!(code, 400, "{body}");
    root.cli_ok(&[
        "deploy",
        "create",
        "d1",
        "--node",
        "gw1",
        "--plugin",
        &format!("router={TEST_ROUTER}"),
    ]);
    wait_until(60, "d1 applied at gw1", || state_at(&root, "d1", "gw1") == "applied");
    let out = c.join("d1.json");
    root.cli_ok(&["deploy", "export", "d1", "--out", out.to_str().unwrap()]);
    let bundle: serde_json::Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();

    let import = |gw: &Gateway, b: &serde_json::Value| gw.post("/api/v1/deployments/import", b);
    // The genuine bundle imports.
    let (code, body) = import(&gw1, &bundle);
    assert_eq!(code, 201, "{body}");
    // A component whose bytes were changed.
    let sha = sha256_of(TEST_ROUTER);
    let size = std::fs::metadata(TEST_ROUTER).unwrap().len() as f64;
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut bytes = b64.decode(bundle["components"][&sha].as_str().unwrap()).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    let mut tampered = bundle.clone();
    tampered["components"][&sha] = b64.encode(&bytes).into();
    let (code, body) = import(&gw1, &tampered);
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("do not match their hash"), "{body}");
    // A document changed after signing.
    let mut edited = bundle.clone();
    let doc = edited["signed"]["doc"]
        .as_str()
        .unwrap()
        .replace("\"priority\":0", "\"priority\":99");
    edited["signed"]["doc"] = doc.into();
    let (code, body) = import(&gw1, &edited);
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("signature does not match"), "{body}");
    // No signer certificate.
    let mut unsigned = bundle.clone();
    unsigned["signed"]["chain"] = serde_json::json!([]);
    let (code, body) = import(&gw1, &unsigned);
    assert_eq!(code, 403, "{body}");

    // On the link: gw1's stored copy of the component is damaged on disk.
    // gw1 finds it when gw2 asks for it, fetches it again from the root, and
    // gw2 gets good bytes.
    let stored = gw1.dir.path().join("data/deploy/components").join(&sha);
    let mut file = std::fs::read(&stored).unwrap();
    file[mid] ^= 0xff;
    std::fs::write(&stored, &file).unwrap();
    root.cli_ok(&[
        "deploy",
        "create",
        "d2",
        "--node",
        "gw2",
        "--plugin",
        &format!("router={TEST_ROUTER}"),
    ]);
    let gw2 = Gateway::start_named(
        "gw2",
        &format!("{}{}", fleet_section(c, "gw2"), upstream_section(addr(gw1_link), "gw1")),
    );
    wait_until(60, "d2 applied at gw2", || state_at(&root, "d2", "gw2") == "applied");
    assert_eq!(gw2.router_version(), sha);
    assert!(gw1.metric("holdfast_deploy_events_total{event=\"damaged-component\"}") >= 1.0);
    assert_eq!(component_bytes(&gw1, "received"), 2.0 * size, "fetched again once");
    assert_eq!(component_bytes(&gw2, "received"), size);
    assert_eq!(std::fs::read(&stored).unwrap(), std::fs::read(TEST_ROUTER).unwrap());

    // A gateway owns deployments for its own subtree: gw1 deploys to gw2,
    // above the root's d2; the reports stay at gw1.
    gw1.cli_ok(&[
        "deploy",
        "create",
        "sub",
        "--node",
        "gw2",
        "--priority",
        "5",
        "--set",
        "log.level=debug",
    ]);
    wait_until(30, "sub applied at gw2", || state_at(&gw1, "sub", "gw2") == "applied");
    wait_until(30, "d2 superseded at gw2", || {
        state_at(&root, "d2", "gw2") == "superseded"
    });
    assert_eq!(
        gw2.api("/api/v1/deploy")["ancestors"],
        serde_json::json!(["gw1", "root"])
    );
    // A child cannot deploy upward: the root refuses gw1's deployment.
    let sub = c.join("sub.json");
    gw1.cli_ok(&["deploy", "export", "sub", "--out", sub.to_str().unwrap()]);
    let sub: serde_json::Value = serde_json::from_slice(&std::fs::read(&sub).unwrap()).unwrap();
    let (code, body) = import(&root, &sub);
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("not an ancestor"), "{body}");
    // Nor can it change the root's deployments.
    let (code, body) = gw1.post("/api/v1/deployments/d1/rollback", &serde_json::json!({}));
    assert_eq!(code, 409, "{body}");
    assert!(gw1.metric("holdfast_deploy_events_total{event=\"refused-hash\"}") >= 1.0);
    assert!(gw1.metric("holdfast_deploy_events_total{event=\"refused-signature\"}") >= 2.0);
    assert!(root.metric("holdfast_deploy_events_total{event=\"refused-signature\"}") >= 1.0);
}

/// A parent that offers only link/2 (as a node before deployments) keeps
/// its child's link working; the child gets no deployments from it.
#[test]
fn a_link2_parent_keeps_its_child_and_sends_no_deployments() {
    let certs = fleet(&["root", "gw1"]);
    let c = certs.path();
    let root_link = free_port();
    let root = Gateway::start_named(
        "root",
        &format!(
            "{}{}version = 2\n{}",
            fleet_section(c, "root"),
            listen_section(root_link),
            gateway("gw1", "root", "")
        ),
    );
    let gw1 = Gateway::start_named(
        "gw1",
        &format!(
            "{}{}",
            fleet_section(c, "gw1"),
            upstream_section(addr(root_link), "root")
        ),
    );
    wait_until(30, "link up", || gw1.api("/api/v1/link")["link"]["state"] == "up");
    let consumer = Consumer::start(root.mqtt, "backend", "site/#");
    root.cli_ok(&[
        "deploy",
        "create",
        "d1",
        "--node",
        "gw1",
        "--set",
        "outbox.max_bytes=50000000",
    ]);
    let mut device = Client::connect(gw1.mqtt, "dev1", true).unwrap();
    for i in 0..20 {
        assert!(
            device
                .publish_acked("site/a", &i.to_string(), Duration::from_secs(5))
                .unwrap()
        );
    }
    wait_until(20, "20 messages at the root", || consumer.len() >= 20);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(state_at(&root, "d1", "gw1"), "pending");
    assert!(gw1.api("/api/v1/deploy")["applied"].is_null());
    assert_ne!(gw1.api("/api/v1/outbox")["max_bytes"], 50_000_000);
    assert_eq!(gw1.api("/api/v1/link")["link"]["state"], "up");
}

/// A root and one gateway, `gwa`, linked to it: the certificates' directory
/// (kept while the nodes run), the root, the gateway.
fn root_and_gwa() -> (tempfile::TempDir, Gateway, Gateway) {
    let certs = fleet(&["root", "gwa"]);
    let c = certs.path();
    let root_link = free_port();
    let root = Gateway::start_named(
        "root",
        &format!(
            "{}{}{}",
            fleet_section(c, "root"),
            listen_section(root_link),
            gateway("gwa", "root", "")
        ),
    );
    let gwa = Gateway::start_named(
        "gwa",
        &format!(
            "{}{}",
            fleet_section(c, "gwa"),
            upstream_section(addr(root_link), "root")
        ),
    );
    wait_until(30, "link up", || gwa.api("/api/v1/link")["link"]["state"] == "up");
    (certs, root, gwa)
}

/// Issue 28.1: an attacker holding the bundle of revision 1 of a deployment
/// that the owner has since rolled back cannot apply it at a gateway: not
/// while the gateway is linked, not after a restart with the owner gone
/// (air-gapped).
#[test]
fn an_old_bundle_is_refused_after_the_owner_rolled_it_back() {
    let (certs, root, mut gwa) = root_and_gwa();
    let embedded = gwa.router_version();
    root.cli_ok(&[
        "deploy",
        "create",
        "d1",
        "--node",
        "gwa",
        "--plugin",
        &format!("router={TEST_ROUTER}"),
    ]);
    wait_until(60, "d1 applied at gwa", || state_at(&root, "d1", "gwa") == "applied");
    let old = certs.path().join("d1-rev1.json");
    root.cli_ok(&["deploy", "export", "d1", "--out", old.to_str().unwrap()]);
    root.cli_ok(&["deploy", "rollback", "d1"]);
    wait_until(30, "gwa back on its own router", || gwa.router_version() == embedded);
    assert_eq!(gwa.api("/api/v1/deployments/d1")["revision"], 2);

    // The replay: refused with the reason, nothing applied.
    let out = gwa.cli(&["deploy", "import", old.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "revision 1 was imported again");
    assert!(err.contains("older than revision 2") && err.contains("403"), "{err}");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(gwa.router_version(), embedded);
    assert!(gwa.metric("holdfast_deploy_events_total{event=\"refused-rollback\"}") >= 1.0);

    // Air-gapped: the owner is gone and the gateway restarted.
    root.stop();
    gwa.crash_restart();
    let out = gwa.cli(&["deploy", "import", old.to_str().unwrap()]);
    assert!(!out.status.success(), "revision 1 was imported after a restart");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(gwa.router_version(), embedded);
    assert!(gwa.api("/api/v1/deploy")["applied"].is_null());
}

/// Issue 28.2: a node restarted (SIGKILL) while it watches a deployed
/// plugin goes on watching with what it had counted, rolls back when the
/// plugin traps, and the owner sees the failures.
#[test]
fn automatic_rollback_goes_on_after_a_crash_and_the_owner_sees_the_failures() {
    let (_certs, root, mut gwa) = root_and_gwa();
    let embedded = gwa.router_version();
    root.cli_ok(&[
        "deploy",
        "create",
        "trappy",
        "--node",
        "gwa",
        "--plugin",
        &format!("router={TEST_ROUTER}"),
        "--watch",
        "300",
        "--min-calls",
        "10",
        "--max-failure-rate",
        "0.2",
    ]);
    wait_until(60, "applied at gwa", || state_at(&root, "trappy", "gwa") == "applied");
    let failures_at_root = || {
        root.api("/api/v1/deployments/trappy")["node_states"][0]["report"]["health"]["failures"]
            .as_u64()
            .unwrap_or(0)
    };
    // Six traps: under min_calls, no decision yet; the owner hears of them.
    let mut device = Client::connect(gwa.mqtt, "dev-a", true).unwrap();
    for i in 0..6 {
        let _ = device.publish_acked("hostile/trap", &i.to_string(), Duration::from_secs(2));
    }
    wait_until(30, "the owner sees 6 failures", || failures_at_root() >= 6);
    assert_eq!(state_at(&root, "trappy", "gwa"), "applied");
    drop(device);
    // Kill -9 and back: the watch goes on from 6.
    gwa.crash_restart();
    wait_until(30, "link up again", || gwa.api("/api/v1/link")["link"]["state"] == "up");
    assert_ne!(gwa.router_version(), embedded, "the deployment is still in force");
    let mut device = Client::connect(gwa.mqtt, "dev-a", true).unwrap();
    for i in 0..4 {
        let _ = device.publish_acked("hostile/trap", &i.to_string(), Duration::from_secs(2));
    }
    wait_until(30, "rolled back at gwa", || {
        state_at(&root, "trappy", "gwa") == "rolled-back"
    });
    assert_eq!(gwa.router_version(), embedded);
    let r = &root.api("/api/v1/deployments/trappy")["node_states"][0]["report"];
    // What was counted before the crash counts: 4 traps alone are under min_calls.
    assert!(r["health"]["failures"].as_u64().unwrap() >= 10, "{r}");
    assert!(r["reason"].as_str().unwrap().contains("failed"), "{r}");
}

/// POSTs raw bytes to the admin API: status and body.
fn post_bytes(gw: &Gateway, path: &str, bytes: &[u8]) -> (u16, String) {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", gw.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/wasm\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        gw.token().trim(),
        bytes.len()
    )
    .unwrap();
    s.write_all(bytes).unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let code = resp.split(' ').nth(1).unwrap().parse().unwrap();
    (code, resp.split_once("\r\n\r\n").unwrap().1.to_string())
}

#[test]
fn only_plugin_components_of_the_right_world_are_stored_and_offered() {
    use sha2::Digest as _;
    let certs = fleet(&["root"]);
    let root = Gateway::start_named("root", &fleet_section(certs.path(), "root"));
    let components = root.dir.path().join("data").join("deploy").join("components");
    let refused = || root.metric("holdfast_deploy_events_total{event=\"refused-component\"}");
    let stored = |bytes: &[u8]| components.join(hex::encode(sha2::Sha256::digest(bytes))).exists();

    // Not plugins: a component header then garbage, a core module, and a
    // valid component of no world (the empty one).
    for (bytes, says) in [
        (
            &b"\0asm\x0d\0\x01\0not a component at all"[..],
            "not a valid plugin component",
        ),
        (&b"\0asm\x01\0\0\0"[..], "core wasm module, not a component"),
        (&b"\0asm\x0d\0\x01\0"[..], "implements none of the plugin worlds"),
    ] {
        let (status, body) = post_bytes(&root, "/api/v1/deployments/components", bytes);
        assert_eq!(status, 422, "{bytes:?}: {body}");
        assert!(body.contains(says), "{bytes:?}: {body}");
        assert!(!stored(bytes), "{bytes:?} was stored");
    }
    assert_eq!(refused(), 3.0);

    // A real plugin: stored, with the world it implements.
    let auth = std::fs::read(holdfast_plugins::artifacts::AUTH_WASM).unwrap();
    let (status, body) = post_bytes(&root, "/api/v1/deployments/components", &auth);
    assert_eq!(status, 201, "{body}");
    let up: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(up["worlds"], serde_json::json!(["auth"]), "{up}");
    assert!(stored(&auth));

    // ... but offered only for its own slot: as the router it is refused,
    // through the CLI as an operator would, and no deployment is made.
    let auth_path = root.dir.path().join("auth.wasm");
    std::fs::write(&auth_path, &auth).unwrap();
    let out = root.cli(&[
        "deploy",
        "create",
        "wrong",
        "--all",
        "--plugin",
        &format!("router={}", auth_path.display()),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("plugins.router") && stderr.contains("does not implement the router world"),
        "{stderr}"
    );
    assert_eq!(refused(), 4.0);
    assert_eq!(root.api("/api/v1/deployments")["deployments"], serde_json::json!([]));

    // The right world for the slot: created and applied here.
    let out = root.cli_ok(&[
        "deploy",
        "create",
        "right",
        "--all",
        "--plugin",
        &format!("router={TEST_ROUTER}"),
    ]);
    assert!(out.starts_with("created right"), "{out}");
    wait_until(30, "the router applied", || {
        state_at(&root, "right", "root") == "applied"
    });
    assert_eq!(root.router_version(), sha256_of(TEST_ROUTER));
    assert_eq!(refused(), 4.0);
}
