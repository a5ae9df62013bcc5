//! The deployer's decisions with a fake applier: waves and the gate, the
//! halt, automatic rollback, priorities, and what a child is offered.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use crate::model::{Health, NodeState, Phase, Report, Spec};
use crate::store::DeployStore;
use crate::{Applier, DeployError, Deployer, Options, Overlay};
use holdfast_registry::{NewIdentity, Registry, Role};
use holdfast_tls::sign::{Signer, Verifier};

fn now_ms() -> u64 {
    holdfast_model::unix_ms()
}

/// Records what it was asked to apply; its counters are set by the test.
#[derive(Default)]
struct Fake {
    applied: Mutex<Vec<Option<String>>>,
    counters: Mutex<BTreeMap<String, (u64, u64)>>,
    fail_with: Mutex<Option<String>>,
}

impl Applier for Fake {
    fn apply(&self, overlay: Option<&Overlay>) -> Result<BTreeMap<String, String>, String> {
        if let Some(e) = self.fail_with.lock().unwrap().clone()
            && overlay.is_some()
        {
            return Err(e);
        }
        self.applied.lock().unwrap().push(overlay.map(|o| o.deployment.clone()));
        let mut versions = BTreeMap::from([("router".to_string(), "embedded".to_string())]);
        for (slot, s) in overlay.iter().flat_map(|o| o.plugins.iter()) {
            if let Some(sha) = &s.sha256 {
                versions.insert(slot.clone(), sha.clone());
            }
        }
        Ok(versions)
    }
    fn counters(&self) -> BTreeMap<String, (u64, u64)> {
        self.counters.lock().unwrap().clone()
    }
    fn node_health(&self) -> (String, u64) {
        ("up".into(), 0)
    }
}

struct Owner {
    _dir: tempfile::TempDir,
    deployer: Deployer,
}

fn owner(gateways: &[&str]) -> Owner {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    holdfast_tls::issue::ca(&certs, "Test fleet", 30, false).unwrap();
    let (cert, key) = holdfast_tls::issue::node(&certs, &certs, "root", 30, false).unwrap();
    let store = holdfast_store::Store::open(&dir.path().join("store")).unwrap();
    let registry = Registry::open(&store, "root", Role::Owner).unwrap();
    for g in gateways {
        registry
            .add(NewIdentity {
                id: g.to_string(),
                kind: Some("gateway".into()),
                auth: Some("none".into()),
                ..NewIdentity::default()
            })
            .unwrap();
    }
    let ds = DeployStore::open(&store, &dir.path().join("components")).unwrap();
    let deployer = Deployer::open(
        Options {
            node_id: "root".into(),
            parent_id: None,
            signer: Some(Signer::load(&cert, &key).unwrap()),
            verifier: Some(Verifier::new(holdfast_tls::load_roots(&certs.join("ca.pem")).unwrap())),
            accept: true,
            max_component_bytes: 1 << 20,
            expiry_seconds: 30 * 86_400,
            fleet_report: std::time::Duration::from_secs(1),
        },
        ds,
        Arc::new(registry),
        crate::DeployMetrics::default(),
    )
    .unwrap();
    Owner { _dir: dir, deployer }
}

fn spec(v: serde_json::Value) -> Spec {
    serde_json::from_value(v).unwrap()
}

fn report(d: &Deployer, id: &str, node: &str, state: NodeState, health: Health) {
    let r = Report {
        deployment: id.into(),
        revision: 1,
        node: node.into(),
        state,
        since_ms: 0,
        at_ms: now_ms(),
        versions: BTreeMap::new(),
        reason: Some("test".into()),
        health,
    };
    d.lock().reports.put(r);
}

fn tick(d: &Deployer) {
    d.lock().owner.tick_now();
    d.owner_tick();
}

#[test]
fn waves_open_when_the_gate_passes_and_halt_on_a_rollback() {
    let o = owner(&["gw1", "gw2", "gw3", "gw4"]);
    let d = &o.deployer;
    let sha = d.put_component(b"\0asm\x0d\0\x01\0component").unwrap();
    let doc = d
        .create(spec(serde_json::json!({
            "id": "d1", "target": {"all": true},
            "plugins": {"router": {"sha256": sha}},
            "rollout": {"waves": ["1", "50%", "100%"], "soak_seconds": 0}
        })))
        .unwrap();
    // By id, the owner last.
    assert_eq!(doc.nodes, ["gw1", "gw2", "gw3", "gw4", "root"]);
    assert_eq!(doc.released, 1);
    // No report yet: the gate waits.
    tick(d);
    assert_eq!(d.show("d1").unwrap().doc.released, 1);
    let seen_calls = Health {
        calls: 10,
        ..Health::default()
    };
    report(d, "d1", "gw1", NodeState::Applied, seen_calls.clone());
    tick(d);
    let v = d.show("d1").unwrap();
    assert_eq!((v.doc.released, v.doc.revision), (3, 2));
    assert_eq!(v.node_states[3].state, "waiting");
    // A failing plugin past the threshold in a healthy-looking report halts too.
    report(d, "d1", "gw2", NodeState::Applied, seen_calls);
    let sick = Health {
        calls: 100,
        failures: 50,
        ..Health::default()
    };
    report(d, "d1", "gw3", NodeState::Applied, sick);
    tick(d);
    let v = d.show("d1").unwrap();
    assert!(
        matches!(&v.doc.phase, Phase::Halted { reason } if reason.contains("gw3")),
        "{:?}",
        v.doc.phase
    );
    assert_eq!(v.doc.released, 3, "a halted rollout releases no one else");
    // The signed document the children get says so.
    let (ancestors, docs) = d.offer_for("gw1");
    assert_eq!(ancestors, ["root"]);
    assert!(docs[0].doc.contains("halted"));
    // gw4 is not released: it is not offered the deployment.
    assert!(d.offer_for("gw4").1.is_empty());
}

#[test]
fn a_node_rolls_back_a_failing_plugin_and_does_not_apply_it_again() {
    let o = owner(&[]);
    let d = &o.deployer;
    let fake = Fake::default();
    let sha = d.put_component(b"\0asm\x0d\0\x01\0router").unwrap();
    d.create(spec(serde_json::json!({
        "id": "d1", "target": {"nodes": ["root"]},
        "plugins": {"router": {"sha256": sha}},
        "rollout": {"min_calls": 10, "max_failure_rate": 0.2}
    })))
    .unwrap();
    d.evaluate(&fake);
    assert_eq!(*fake.applied.lock().unwrap(), [Some("d1".to_string())]);
    assert_eq!(d.local_status().applied.unwrap().versions["router"], sha);
    // 9 calls, all failed: under min_calls, no decision yet.
    fake.counters.lock().unwrap().insert("router".into(), (9, 9));
    d.watch_health(&fake);
    assert!(d.local_status().applied.is_some());
    fake.counters.lock().unwrap().insert("router".into(), (20, 9));
    d.watch_health(&fake);
    assert_eq!(d.local_status().refused_content.len(), 1, "d1 is marked bad");
    d.evaluate(&fake);
    assert_eq!(*fake.applied.lock().unwrap(), [Some("d1".to_string()), None]);
    let v = d.show("d1").unwrap();
    assert_eq!(v.node_states[0].state, "rolled-back");
    assert!(
        v.node_states[0]
            .report
            .as_ref()
            .unwrap()
            .reason
            .as_ref()
            .unwrap()
            .contains("9 of 20")
    );
    // It stays rolled back.
    d.evaluate(&fake);
    assert_eq!(fake.applied.lock().unwrap().len(), 2);
}

#[test]
fn the_highest_priority_applies_and_a_failed_apply_is_reported() {
    let o = owner(&[]);
    let d = &o.deployer;
    let fake = Fake::default();
    let low = serde_json::json!({"id": "low", "priority": 1, "target": {"nodes": ["root"]}, "settings": {"log.level": "debug"}});
    let high = serde_json::json!({"id": "high", "priority": 5, "target": {"nodes": ["root"]}, "settings": {"log.level": "warn"}});
    d.create(spec(low)).unwrap();
    d.create(spec(high)).unwrap();
    d.evaluate(&fake);
    assert_eq!(d.local_status().applied.unwrap().deployment, "high");
    let states: Vec<String> = d.list().iter().map(|v| v.node_states[0].state.clone()).collect();
    assert_eq!(states, ["applied", "superseded"], "high, then low");
    // Deleting the winner brings the other in.
    d.delete("high").unwrap();
    d.evaluate(&fake);
    assert_eq!(d.local_status().applied.unwrap().deployment, "low");
    // One that cannot be applied is reported failed; the previous stays.
    *fake.fail_with.lock().unwrap() = Some("cannot".into());
    d.create(spec(serde_json::json!({"id": "bad", "priority": 9, "target": {"nodes": ["root"]}, "settings": {"log.level": "error"}})))
        .unwrap();
    d.evaluate(&fake);
    assert_eq!(d.local_status().applied.unwrap().deployment, "low");
    assert_eq!(d.show("bad").unwrap().node_states[0].state, "failed");
    // Ids, targets and unknown components are checked.
    assert!(
        d.create(spec(
            serde_json::json!({"id": "low", "target": {"all": true}, "settings": {"log.level": "x"}})
        ))
        .is_err()
    );
    assert!(
        d.create(spec(
            serde_json::json!({"id": "n", "target": {"nodes": ["gw9"]}, "settings": {"log.level": "x"}})
        ))
        .is_err()
    );
    assert!(
        d.create(spec(
            serde_json::json!({"id": "c", "target": {"all": true}, "plugins": {"router": {"sha256": "0".repeat(64)}}})
        ))
        .is_err()
    );
}

#[test]
fn unknown_ids_are_not_found_and_components_go_only_where_offered() {
    let o = owner(&["gw1", "gw2"]);
    let d = &o.deployer;
    assert!(matches!(d.rollback("nope"), Err(DeployError::NotFound(_))));
    assert!(matches!(d.delete("nope"), Err(DeployError::NotFound(_))));
    let sha = d.put_component(b"\0asm\x0d\0\x01\0only-gw1").unwrap();
    d.create(spec(serde_json::json!({
        "id": "d1", "target": {"nodes": ["gw1"]}, "plugins": {"router": {"sha256": sha}}
    })))
    .unwrap();
    assert!(d.component_for("gw1", &sha).is_ok());
    assert!(matches!(d.component_for("gw2", &sha), Err(DeployError::NotFound(_))));
    // A child's report about a deployment this node does not hold is dropped.
    d.receive_reports(
        "gw2",
        vec![Report {
            deployment: "other".into(),
            revision: 1,
            node: "gw2".into(),
            state: NodeState::Applied,
            since_ms: 0,
            at_ms: 1,
            versions: BTreeMap::new(),
            reason: None,
            health: Health::default(),
        }],
    );
    assert!(d.lock().reports.deployments().all(|dep| dep != "other"));
}

#[test]
fn a_gateway_registered_later_joins_a_complete_rollout() {
    let o = owner(&["gw1"]);
    let d = &o.deployer;
    let doc = d
        .create(spec(
            serde_json::json!({"id": "d1", "target": {"all": true}, "settings": {"log.level": "info"}}),
        ))
        .unwrap();
    assert_eq!((doc.nodes.len(), doc.released, doc.phase), (2, 2, Phase::Complete));
    tick(d);
    assert_eq!(d.show("d1").unwrap().doc.revision, 1, "nothing changed");
    add_gateway(d, "gw2");
    tick(d);
    let v = d.show("d1").unwrap();
    assert_eq!(v.doc.nodes, ["gw1", "root", "gw2"]);
    assert_eq!((v.doc.released, v.doc.revision), (3, 2));
    assert_eq!(d.offer_for("gw2").1.len(), 1);
}

/// A node of a test fleet whose store lives in `dir` (reopened by a
/// second call: a restart). The fleet CA is made once in `certs`.
fn open_node(
    dir: &std::path::Path,
    certs: &std::path::Path,
    id: &str,
    parent: Option<&str>,
    expiry_seconds: u64,
) -> Deployer {
    if !certs.join("ca.pem").exists() {
        holdfast_tls::issue::ca(certs, "Test fleet", 30, false).unwrap();
    }
    let (cert, key) = (certs.join(format!("{id}.pem")), certs.join(format!("{id}.key")));
    if !cert.exists() {
        holdfast_tls::issue::node(certs, certs, id, 30, false).unwrap();
    }
    let store = holdfast_store::Store::open(&dir.join("store")).unwrap();
    let role = match parent {
        Some(p) => Role::Replica { parent: p.into() },
        None => Role::Owner,
    };
    let registry = Registry::open(&store, id, role).unwrap();
    let ds = DeployStore::open(&store, &dir.join("components")).unwrap();
    Deployer::open(
        Options {
            node_id: id.into(),
            parent_id: parent.map(str::to_string),
            signer: Some(Signer::load(&cert, &key).unwrap()),
            verifier: Some(Verifier::new(holdfast_tls::load_roots(&certs.join("ca.pem")).unwrap())),
            accept: true,
            max_component_bytes: 1 << 20,
            expiry_seconds,
            fleet_report: std::time::Duration::from_secs(1),
        },
        ds,
        Arc::new(registry),
        crate::DeployMetrics::default(),
    )
    .unwrap()
}

/// Registers `id` as a gateway at `d`'s node.
fn add_gateway(d: &Deployer, id: &str) {
    d.registry
        .add(NewIdentity {
            id: id.into(),
            kind: Some("gateway".into()),
            auth: Some("none".into()),
            ..NewIdentity::default()
        })
        .unwrap();
}

fn events(d: &Deployer, event: &'static str) -> u64 {
    d.events.get(event)
}

#[test]
fn an_old_revision_is_never_taken_again_not_even_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    let root = open_node(&dir.path().join("root"), &certs, "root", None, 86_400);
    add_gateway(&root, "gw1");
    let sha = root.put_component(b"\0asm\x0d\0\x01\0replayed").unwrap();
    root.create(spec(serde_json::json!({
        "id": "d1", "target": {"nodes": ["gw1"]}, "plugins": {"router": {"sha256": sha}}
    })))
    .unwrap();
    let rev1 = root.export("d1").unwrap();
    root.rollback("d1").unwrap();
    let rev2 = root.export("d1").unwrap();
    assert!(rev2.signed.doc.contains("\"revision\":2"));

    let gw_dir = dir.path().join("gw1");
    let gw = open_node(&gw_dir, &certs, "gw1", Some("root"), 86_400);
    let fake = Fake::default();
    // The withdrawal arrives first (by the link or an import) ...
    gw.import(rev2.clone()).unwrap();
    // ... then the attacker's copy of revision 1: refused, nothing applied.
    let err = gw.import(rev1.clone()).unwrap_err();
    assert!(
        matches!(err, DeployError::Refused(ref m) if m.contains("older than revision 2")),
        "{err}"
    );
    assert_eq!(events(&gw, "refused-rollback"), 1);
    gw.evaluate(&fake);
    assert!(
        fake.applied.lock().unwrap().iter().all(Option::is_none),
        "nothing applied"
    );
    // The same document again is fine (an idempotent import).
    gw.import(rev2.clone()).unwrap();
    // A parent offering revision 1 does not replace revision 2 either.
    let missing = gw.receive_offer("root", vec!["root".into()], vec![rev1.signed.clone()]);
    assert!(missing.is_empty(), "revision 1's component is not fetched: {missing:?}");
    assert_eq!(gw.show("d1").unwrap().doc.revision, 2);
    // Across a restart, and after the owner stopped offering it at all.
    gw.receive_offer("root", vec!["root".into()], vec![]);
    assert!(gw.show("d1").is_none());
    drop(gw);
    let gw = open_node(&gw_dir, &certs, "gw1", Some("root"), 86_400);
    assert!(gw.import(rev1.clone()).is_err(), "revision 1 after a restart");
    gw.receive_offer("root", vec!["root".into()], vec![rev1.signed.clone()]);
    assert!(gw.show("d1").is_none(), "revision 1 from the parent after a restart");
    gw.evaluate(&fake);
    assert!(fake.applied.lock().unwrap().iter().all(Option::is_none));
}

#[test]
fn a_deleted_deployment_leaves_a_signed_tombstone_that_expires() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    let root = open_node(&dir.path().join("root"), &certs, "root", None, 3_600);
    add_gateway(&root, "gw1");
    root.create(spec(serde_json::json!({
        "id": "d1", "target": {"nodes": ["gw1"]}, "settings": {"log.level": "debug"}
    })))
    .unwrap();
    let rev1 = root.export("d1").unwrap();
    let gw = open_node(&dir.path().join("gw1"), &certs, "gw1", Some("root"), 3_600);
    let fake = Fake::default();
    gw.receive_offer("root", vec!["root".into()], root.offer_for("gw1").1);
    gw.evaluate(&fake);
    assert_eq!(gw.local_status().applied.unwrap().deployment, "d1");
    root.delete("d1").unwrap();
    assert!(
        matches!(root.delete("d1"), Err(DeployError::NotFound(_))),
        "deleted once"
    );
    // The tombstone is signed and offered: gw1 returns to its own config.
    let v = root.show("d1").unwrap();
    assert!(v.doc.deleted && v.doc.phase == Phase::Withdrawn && v.doc.revision == 2);
    let offer = root.offer_for("gw1").1;
    assert_eq!(offer.len(), 1);
    gw.receive_offer("root", vec!["root".into()], offer);
    gw.evaluate(&fake);
    assert!(gw.local_status().applied.is_none());
    assert!(gw.import(rev1).is_err(), "the deleted revision 1 is not taken again");
    // Created again under the same id: it goes on from the tombstone.
    let again = root
        .create(spec(serde_json::json!({
            "id": "d1", "target": {"nodes": ["gw1"]}, "settings": {"log.level": "warn"}
        })))
        .unwrap();
    assert_eq!(again.revision, 3);
    gw.receive_offer("root", vec!["root".into()], root.offer_for("gw1").1);
    gw.evaluate(&fake);
    assert_eq!(gw.local_status().applied.unwrap().revision, 3);
    // An expired tombstone goes at the owner; the revision seen stays.
    root.delete("d1").unwrap();
    root.lock().owner.docs_mut().get_mut("d1").unwrap().doc.expires_ms = Some(1);
    tick(&root);
    assert!(root.show("d1").is_none());
    assert_eq!(root.lock().seen.get("d1"), 4);
}

#[test]
fn documents_expire_are_signed_again_before_and_stale_imports_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    // An owner whose documents are valid for no time at all.
    let stale_owner = open_node(&dir.path().join("root"), &certs, "root", None, 0);
    add_gateway(&stale_owner, "gw1");
    stale_owner
        .create(spec(serde_json::json!({
            "id": "d1", "target": {"nodes": ["gw1"]}, "settings": {"log.level": "debug"}
        })))
        .unwrap();
    let stale = stale_owner.export("d1").unwrap();
    let gw = open_node(&dir.path().join("gw1"), &certs, "gw1", Some("root"), 3_600);
    let err = gw.import(stale.clone()).unwrap_err();
    assert!(err.to_string().contains("expired"), "{err}");
    assert_eq!(events(&gw, "refused-expired"), 1);
    // From the parent it is held (and its revision seen) but not applied.
    let fake = Fake::default();
    gw.receive_offer("root", vec!["root".into()], vec![stale.signed.clone()]);
    gw.evaluate(&fake);
    assert!(fake.applied.lock().unwrap().is_empty());
    assert_eq!(gw.show("d1").unwrap().node_states[0].state, "expired");
    drop(stale_owner);

    // A fresh document is applied; once it expires the node keeps running
    // it and says so.
    let owner = open_node(&dir.path().join("root2"), &certs, "root", None, 3_600);
    add_gateway(&owner, "gw2");
    let doc = owner
        .create(spec(serde_json::json!({
            "id": "d2", "target": {"nodes": ["gw2"]}, "settings": {"log.level": "warn"}
        })))
        .unwrap();
    let expires = doc.expires_ms.unwrap();
    assert!(expires > now_ms() + 3_500_000 && expires <= now_ms() + 3_600_000);
    let gw2 = open_node(&dir.path().join("gw2"), &certs, "gw2", Some("root"), 3_600);
    gw2.receive_offer("root", vec!["root".into()], owner.offer_for("gw2").1);
    gw2.evaluate(&fake);
    assert_eq!(gw2.local_status().applied.unwrap().deployment, "d2");
    gw2.lock().received.docs_mut().get_mut("d2").unwrap().doc.expires_ms = Some(1);
    gw2.evaluate(&fake);
    assert_eq!(gw2.local_status().applied.unwrap().deployment, "d2", "still running");
    let r = gw2.show("d2").unwrap().node_states[0].report.clone().unwrap();
    assert_eq!(r.state, NodeState::Expired);
    assert_eq!(r.versions.get("router").map(String::as_str), Some("embedded"));
    // The owner signs a new revision when less than half the time is left.
    tick(&owner);
    assert_eq!(owner.show("d2").unwrap().doc.revision, 1, "fresh: nothing to sign");
    owner.lock().owner.docs_mut().get_mut("d2").unwrap().doc.expires_ms = Some(now_ms() + 1_000_000);
    tick(&owner);
    let v = owner.show("d2").unwrap();
    assert_eq!(v.doc.revision, 2);
    assert!(v.doc.expires_ms.unwrap() > now_ms() + 3_500_000);
    // The node hears it and is applied again, without applying anew.
    gw2.receive_offer("root", vec!["root".into()], owner.offer_for("gw2").1);
    let applies = fake.applied.lock().unwrap().len();
    gw2.evaluate(&fake);
    assert_eq!(fake.applied.lock().unwrap().len(), applies);
    assert_eq!(gw2.show("d2").unwrap().node_states[0].state, "applied");
}

#[test]
fn the_health_watch_survives_a_restart_with_what_it_counted() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    let node_dir = dir.path().join("root");
    let d = open_node(&node_dir, &certs, "root", None, 3_600);
    let sha = d.put_component(b"\0asm\x0d\0\x01\0traps").unwrap();
    d.create(spec(serde_json::json!({
        "id": "d1", "target": {"nodes": ["root"]},
        "plugins": {"router": {"sha256": sha}},
        "rollout": {"min_calls": 10, "max_failure_rate": 0.2, "watch_seconds": 300}
    })))
    .unwrap();
    let fake = Fake::default();
    d.evaluate(&fake);
    fake.counters.lock().unwrap().insert("router".into(), (6, 6));
    d.watch_health(&fake);
    assert!(d.local_status().applied.is_some(), "6 calls: under min_calls");
    assert_eq!(
        d.show("d1").unwrap().node_states[0]
            .report
            .as_ref()
            .unwrap()
            .health
            .failures,
        6
    );
    // SIGKILL: the process's counters start again from zero.
    drop(d);
    let d = open_node(&node_dir, &certs, "root", None, 3_600);
    let fake = Fake::default();
    d.evaluate(&fake);
    assert!(
        fake.applied.lock().unwrap().is_empty(),
        "what was applied stays, unapplied again"
    );
    fake.counters.lock().unwrap().insert("router".into(), (5, 5));
    d.watch_health(&fake);
    assert_eq!(
        d.local_status().refused_content.len(),
        1,
        "6 + 5 of 11 failed: rolled back"
    );
    let r = d.show("d1").unwrap().node_states[0].report.clone().unwrap();
    assert_eq!(
        (r.state, r.health.calls, r.health.failures),
        (NodeState::RolledBack, 11, 11)
    );
    d.evaluate(&fake);
    assert_eq!(*fake.applied.lock().unwrap(), [None]);
}

#[test]
fn a_wave_waits_for_min_calls_unless_released_without_traffic() {
    let o = owner(&["gw1", "gw2"]);
    let d = &o.deployer;
    let sha = d.put_component(b"\0asm\x0d\0\x01\0quiet").unwrap();
    let mk = |id: &str, without: bool| {
        d.create(spec(serde_json::json!({
            "id": id, "target": {"nodes": ["gw1", "gw2"]},
            "plugins": {"router": {"sha256": sha}},
            "rollout": {"waves": ["1", "100%"], "soak_seconds": 0, "min_calls": 5, "release_without_traffic": without}
        })))
        .unwrap()
    };
    mk("quiet", false);
    report(d, "quiet", "gw1", NodeState::Applied, Health::default());
    tick(d);
    let v = d.show("quiet").unwrap();
    assert_eq!(v.doc.released, 1, "a canary with no calls releases nobody");
    assert!(v.waiting.as_deref().unwrap().contains("0 of the 5"), "{:?}", v.waiting);
    let busy = Health {
        calls: 5,
        ..Health::default()
    };
    report(d, "quiet", "gw1", NodeState::Applied, busy);
    tick(d);
    assert_eq!(d.show("quiet").unwrap().doc.released, 2);
    // Said explicitly: released on no traffic.
    let doc = mk("loud", true);
    assert!(d.export("loud").unwrap().signed.doc.contains("release_without_traffic"));
    assert_eq!(doc.released, 1);
    report(d, "loud", "gw1", NodeState::Applied, Health::default());
    tick(d);
    assert_eq!(d.show("loud").unwrap().doc.released, 2);
}
