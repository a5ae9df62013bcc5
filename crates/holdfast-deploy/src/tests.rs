//! The deployer's decisions with a fake applier: waves and the gate, the
//! halt, automatic rollback, priorities, and what a child is offered.

use std::collections::BTreeMap;
use std::sync::Mutex;

use super::*;
use holdfast_registry::{NewIdentity, Role};

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
        },
        ds,
        Arc::new(registry),
        Arc::new(Metrics::new()),
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
    let mut inner = d.lock();
    d.put_report(&mut inner, r);
}

fn tick(d: &Deployer) {
    d.lock().last_tick_ms = 0;
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
    report(d, "d1", "gw1", NodeState::Applied, Health::default());
    tick(d);
    let v = d.show("d1").unwrap();
    assert_eq!((v.doc.released, v.doc.revision), (3, 2));
    assert_eq!(v.node_states[3].state, "waiting");
    // A failing plugin past the threshold in a healthy-looking report halts too.
    report(d, "d1", "gw2", NodeState::Applied, Health::default());
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
    assert!(d.lock().reports.keys().all(|(dep, _)| dep != "other"));
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
    d.registry
        .add(NewIdentity {
            id: "gw2".into(),
            kind: Some("gateway".into()),
            auth: Some("none".into()),
            ..NewIdentity::default()
        })
        .unwrap();
    tick(d);
    let v = d.show("d1").unwrap();
    assert_eq!(v.doc.nodes, ["gw1", "root", "gw2"]);
    assert_eq!((v.doc.released, v.doc.revision), (3, 2));
    assert_eq!(d.offer_for("gw2").1.len(), 1);
}
