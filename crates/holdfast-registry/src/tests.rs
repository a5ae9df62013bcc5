use super::*;

fn open(dir: &std::path::Path, role: Role) -> Registry {
    let store = Store::open(dir).unwrap();
    Registry::open(&store, "root", role).unwrap()
}

fn new(id: &str, kind: &str, parent: Option<&str>) -> NewIdentity {
    NewIdentity {
        id: id.into(),
        kind: Some(kind.into()),
        parent: parent.map(str::to_string),
        ..NewIdentity::default()
    }
}

fn tree(r: &Registry) {
    r.add(new("gw2", "gateway", None)).unwrap();
    r.add(new("gw1", "gateway", Some("gw2"))).unwrap();
    r.add(new("dev1", "device", Some("gw1"))).unwrap();
    r.add(new("dev1/temp", "module", None)).unwrap();
    r.add(new("dev2", "device", Some("gw2"))).unwrap();
    r.add(new("lonely", "device", None)).unwrap();
}

#[test]
fn scope_follows_parent_chains() {
    let dir = tempfile::tempdir().unwrap();
    let r = open(dir.path(), Role::Owner);
    tree(&r);
    let ids = |g: &str| r.scope(g).entries.keys().cloned().collect::<Vec<_>>();
    assert_eq!(ids("gw1"), ["dev1", "dev1/temp"]);
    assert_eq!(ids("gw2"), ["dev1", "dev1/temp", "dev2", "gw1"]);
    assert!(ids("dev2").is_empty());
    let e = r.entry("dev1").unwrap();
    assert_eq!(e.credentials.kinds(), ["sas"]);
    assert!(r.scope("gw1").entries["dev1"].origin == Origin::Synced);
}

#[test]
fn parents_must_be_gateways_without_cycles() {
    let dir = tempfile::tempdir().unwrap();
    let r = open(dir.path(), Role::Owner);
    tree(&r);
    assert!(matches!(
        r.add(new("x", "device", Some("dev1"))),
        Err(RegistryError::Invalid(_))
    ));
    assert!(matches!(
        r.add(new("x", "device", Some("nope"))),
        Err(RegistryError::Invalid(_))
    ));
    assert!(matches!(
        r.set_parent("gw2", Some("gw1".into())),
        Err(RegistryError::Conflict(_))
    ));
    assert!(matches!(
        r.add(new("dev1", "device", None)),
        Err(RegistryError::Exists(_))
    ));
    assert!(matches!(
        r.add(new("a/b/c", "module", None)),
        Err(RegistryError::Invalid(_))
    ));
    assert!(matches!(
        r.add(new("ghost/m", "module", None)),
        Err(RegistryError::Invalid(_))
    ));
    assert!(matches!(
        r.add(new("has#hash", "device", None)),
        Err(RegistryError::Invalid(_))
    ));
    assert!(matches!(r.remove("gw1"), Err(RegistryError::Conflict(_))));
    // Moving dev1 takes its module with it.
    r.set_parent("dev1", Some("gw2".into())).unwrap();
    assert!(r.scope("gw1").entries.is_empty());
    assert_eq!(r.remove("dev1").unwrap(), ["dev1", "dev1/temp"]);
}

#[test]
fn credential_changes_are_revocations_and_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let r = open(dir.path(), Role::Owner);
        tree(&r);
        let mut revoked = r.revocations();
        let before = r.entry("dev2").unwrap();
        let after = r.rotate_key("dev2", WhichKey::Primary).unwrap();
        assert_ne!(before.credentials.sas_primary, after.credentials.sas_primary);
        assert_eq!(before.credentials.sas_secondary, after.credentials.sas_secondary);
        assert_eq!(*revoked.try_recv().unwrap(), ["dev2"]);
        r.set_parent("dev2", None).unwrap();
        assert!(revoked.try_recv().is_err(), "moving is not a revocation");
        r.set_enabled("dev2", false).unwrap();
        assert_eq!(*revoked.try_recv().unwrap(), ["dev2"]);
    }
    let r = open(dir.path(), Role::Owner);
    assert_eq!(r.len(), 6);
    assert!(!r.entry("dev2").unwrap().enabled);
    assert!(
        !format!("{:?}", r.entry("dev1").unwrap())
            .contains(r.entry("dev1").unwrap().credentials.sas_primary.as_deref().unwrap())
    );
}

#[test]
fn replicas_apply_full_and_delta_and_refuse_local_changes() {
    let dir = tempfile::tempdir().unwrap();
    let owner = open(dir.path(), Role::Owner);
    tree(&owner);
    let dir2 = tempfile::tempdir().unwrap();
    let replica = open(dir2.path(), Role::Replica { parent: "gw2".into() });
    let mut sent = owner.scope("gw1");
    assert_eq!(replica.apply_full("gw2", sent.clone()).unwrap(), 2);
    assert!(!replica.verify_sas("dev1", "x", &[0; 32]));
    assert!(matches!(
        replica.add(new("z", "device", None)),
        Err(RegistryError::Replica(_))
    ));
    // Disable dev1, add dev3 under gw1, move the module's device away.
    owner.set_enabled("dev1", false).unwrap();
    owner.add(new("dev3", "device", Some("gw1"))).unwrap();
    let now = owner.scope("gw1");
    let delta = now.delta_from(&sent).unwrap();
    assert_eq!(delta.upserts.len(), 2);
    let mut revoked = replica.revocations();
    replica.apply_delta("gw2", delta).unwrap();
    assert_eq!(*revoked.try_recv().unwrap(), ["dev1"]);
    assert!(now.delta_from(&now).is_none());
    sent = now;
    owner.set_parent("dev1", Some("gw2".into())).unwrap();
    let delta = owner.scope("gw1").delta_from(&sent).unwrap();
    assert_eq!(delta.removed, ["dev1", "dev1/temp"]);
    replica.apply_delta("gw2", delta).unwrap();
    assert_eq!(
        replica.list().iter().map(|e| e.id.as_str()).collect::<Vec<_>>(),
        ["dev3"]
    );
    // A full sync removes what the scope no longer has, keeps local seeds.
    replica
        .seed(&[IdentityConfig {
            id: "tool".into(),
            kind: "user".into(),
            parent: None,
            enabled: true,
            sas_primary: None,
            sas_secondary: None,
            thumbprints: Vec::new(),
            password_hash: Some(holdfast_model::identity::hash_password("pw").unwrap()),
            x509_ca: false,
            labels: Default::default(),
        }])
        .unwrap();
    replica.apply_full("gw2", Scope::default()).unwrap();
    assert_eq!(
        replica.list().iter().map(|e| e.id.as_str()).collect::<Vec<_>>(),
        ["tool"]
    );
    assert_eq!(replica.sync_state().full_syncs, 2);
}

#[test]
fn config_seeds_are_managed_by_the_config_until_the_api_changes_them() {
    let dir = tempfile::tempdir().unwrap();
    let r = open(dir.path(), Role::Owner);
    let seed = |id: &str, enabled: bool| IdentityConfig {
        id: id.into(),
        kind: "device".into(),
        parent: None,
        enabled,
        sas_primary: Some("MDEyMzQ1Njc4OWFiY2RlZg==".into()),
        sas_secondary: None,
        thumbprints: Vec::new(),
        password_hash: None,
        x509_ca: false,
        labels: Default::default(),
    };
    assert_eq!(r.seed(&[seed("a", true), seed("b", true)]).unwrap(), 2);
    assert_eq!(r.seed(&[seed("a", true), seed("b", true)]).unwrap(), 0);
    r.set_enabled("b", false).unwrap();
    assert_eq!(r.seed(&[seed("a", false)]).unwrap(), 1);
    assert!(!r.entry("a").unwrap().enabled);
    assert!(r.entry("b").is_some(), "the API owns b now");
    assert_eq!(r.seed(&[]).unwrap(), 1);
    assert!(r.entry("a").is_none());
}

#[derive(Debug, Clone)]
enum Op {
    Add(u8, u8, Option<u8>),
    SetParent(u8, Option<u8>),
    Disable(u8),
    Rotate(u8),
    Remove(u8),
}

fn op() -> impl proptest::strategy::Strategy<Value = Op> {
    use proptest::prelude::*;
    prop_oneof![
        // Parents are mostly gateways (0-3), now and then a device (refused).
        3 => (0u8..8, 0u8..3, proptest::option::of(0u8..5)).prop_map(|(a, k, p)| Op::Add(a, k, p)),
        2 => (0u8..8, proptest::option::of(0u8..5)).prop_map(|(a, p)| Op::SetParent(a, p)),
        1 => (0u8..8).prop_map(Op::Disable),
        1 => (0u8..8).prop_map(Op::Rotate),
        1 => (0u8..8).prop_map(Op::Remove),
    ]
}

fn name(n: u8) -> String {
    // A few gateways, the rest devices; g0 is the child being synced.
    if n < 4 { format!("g{n}") } else { format!("d{n}") }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]
    /// Whatever the owner goes through, a replica fed a full sync and
    /// then only deltas holds exactly the child's scope, and the
    /// parent chains never form a cycle.
    #[test]
    fn a_replica_fed_deltas_always_equals_the_scope(ops in proptest::collection::vec(op(), 1..60)) {
        let dir = tempfile::tempdir().unwrap();
        let owner = open(&dir.path().join("owner"), Role::Owner);
        let replica = open(&dir.path().join("replica"), Role::Replica { parent: "root".into() });
        owner.add(new("g0", "gateway", Some("root"))).unwrap();
        let mut sent = owner.scope("g0");
        replica.apply_full("root", sent.clone()).unwrap();
        for op in ops {
            // Errors are part of the model: a refused change changes nothing.
            let _ = match op {
                Op::Add(a, k, p) => {
                    let kind = if a < 4 { "gateway" } else { ["device", "device", "module"][k as usize] };
                    let id = if kind == "module" { format!("{}/m", name(a)) } else { name(a) };
                    owner.add(new(&id, kind, p.map(name).as_deref())).map(|_| ())
                }
                Op::SetParent(a, p) => owner.set_parent(&name(a), p.map(name)).map(|_| ()),
                Op::Disable(a) => owner.set_enabled(&name(a), false).map(|_| ()),
                Op::Rotate(a) => owner.rotate_key(&name(a), WhichKey::Both).map(|_| ()),
                Op::Remove(a) => owner.remove(&name(a)).map(|_| ()),
            };
            let now = owner.scope("g0");
            if let Some(delta) = now.delta_from(&sent) {
                replica.apply_delta("root", delta).unwrap();
            }
            sent = now;
            let want: Vec<Entry> = sent.entries.values().cloned().collect();
            proptest::prop_assert_eq!(replica.list(), want);
            for e in owner.list() {
                let mut at = e.scope_parent();
                let mut steps = 0;
                while let Some(p) = at {
                    proptest::prop_assert!(p != e.id, "cycle through {}", e.id);
                    steps += 1;
                    proptest::prop_assert!(steps < 64);
                    at = owner.entry(&p).and_then(|x| x.scope_parent());
                }
            }
        }
    }
}

#[test]
fn labels_are_checked_stored_and_left_out_when_empty() {
    let dir = tempfile::tempdir().unwrap();
    let r = open(dir.path(), Role::Owner);
    let gw = r
        .add(NewIdentity {
            id: "gw1".into(),
            kind: Some("gateway".into()),
            auth: Some("none".into()),
            ..NewIdentity::default()
        })
        .unwrap();
    // An entry without labels serialises as before labels existed.
    assert!(serde_json::to_value(&gw).unwrap().get("labels").is_none());
    let labels: BTreeMap<String, String> = [("site".to_string(), "north".to_string())].into();
    let e = r.set_labels("gw1", labels.clone()).unwrap();
    assert_eq!(e.labels, labels);
    assert_eq!(r.entry("gw1").unwrap().labels, labels);
    for bad in ["", "a b", &"x".repeat(64)] {
        let l: BTreeMap<String, String> = [(bad.to_string(), "v".to_string())].into();
        assert!(
            matches!(r.set_labels("gw1", l), Err(RegistryError::Invalid(_))),
            "{bad:?}"
        );
    }
    drop(r);
    let r = open(dir.path(), Role::Owner);
    assert_eq!(r.entry("gw1").unwrap().labels, labels, "labels survive a restart");
}
