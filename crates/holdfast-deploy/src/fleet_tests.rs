use std::time::Duration;

use super::*;
use holdfast_store::Store;

fn open(dir: &std::path::Path, node: &str) -> Fleet {
    let store = Store::open(&dir.join("store")).unwrap();
    let ds = DeployStore::open(&store, &dir.join("components")).unwrap();
    Fleet::open(node, ds, None, Duration::from_secs(1))
}

fn entry(node: &str, parent: Option<&str>, messages: u64) -> FleetEntry {
    FleetEntry {
        node: node.into(),
        parent: parent.map(str::to_string),
        version: "0.1.0".into(),
        link: if parent.is_some() { "up" } else { "root" }.into(),
        lanes: (messages > 0)
            .then(|| FleetLane {
                lane: 3,
                messages,
                bytes: messages * 10,
                ..FleetLane::default()
            })
            .into_iter()
            .collect(),
        quota_bytes: 1000,
        ..FleetEntry::default()
    }
}

fn row(f: &Fleet, node: &str) -> FleetRow {
    f.rows().into_iter().find(|(r, _)| r.entry.node == node).unwrap().0
}

#[test]
fn rows_go_up_once_per_change_and_a_cut_marks_the_subtree_not_reporting() {
    let dir = tempfile::tempdir().unwrap();
    let (mid, root) = (
        open(&dir.path().join("mid"), "mid"),
        open(&dir.path().join("root"), "root"),
    );
    // The mid gateway's own row, and a leaf's row that came to it.
    mid.set_own(entry("mid", Some("root"), 0));
    let s = mid.attach("leaf");
    mid.receive(
        "leaf",
        s,
        vec![FleetRow {
            entry: entry("leaf", Some("mid"), 5),
            reporting: true,
            since_ms: 1,
        }],
        vec![],
    );
    let c = mid.since(0, 100);
    assert_eq!(c.rows.len(), 2);
    // The same entry again is no change: nothing more goes up.
    mid.set_own(entry("mid", Some("root"), 0));
    assert!(mid.since(c.seq, 100).rows.is_empty());

    let up = root.attach("mid");
    root.receive("mid", up, c.rows, c.forgotten);
    assert_eq!(row(&root, "leaf").entry.lanes[0].messages, 5);
    assert_eq!(row(&root, "leaf").state().0, FleetState::Ok);
    // Rows naming the receiving node itself are not taken from a child.
    root.receive(
        "mid",
        up,
        vec![FleetRow {
            entry: entry("root", None, 9),
            reporting: true,
            since_ms: 1,
        }],
        vec![],
    );
    assert!(root.rows().iter().all(|(r, _)| r.entry.node != "root"));

    // The leaf is cut off from mid: its row stops reporting at mid, and
    // that change goes up like any other.
    mid.detach("leaf", s);
    let c2 = mid.since(c.seq, 100);
    assert_eq!(c2.rows.len(), 1);
    assert!(!c2.rows[0].reporting);
    root.receive("mid", up, c2.rows, c2.forgotten);
    let (state, why) = row(&root, "leaf").state();
    assert_eq!(state, FleetState::NotReporting, "{why:?}");
    assert!(row(&root, "mid").reporting);

    // Mid is cut off from the root: everything through it stops reporting.
    root.detach("mid", up);
    assert!(root.rows().iter().all(|(r, _)| !r.reporting));
    // A removal by the operator is refused while a node reports, and goes
    // up once it does not.
    mid.set_own(entry("mid", Some("root"), 0));
    assert!(matches!(mid.forget("mid"), Err(crate::DeployError::Conflict(_))));
    assert!(matches!(mid.forget("nobody"), Err(crate::DeployError::NotFound(_))));
    let before = mid.seq();
    mid.forget("leaf").unwrap();
    let c3 = mid.since(before, 100);
    assert_eq!(c3.forgotten, ["leaf"]);
    let up2 = root.attach("mid");
    root.receive("mid", up2, mid.since(0, 100).rows, c3.forgotten);
    assert!(root.rows().iter().all(|(r, _)| r.entry.node != "leaf"));
    assert!(row(&root, "mid").reporting);
}

#[test]
fn an_old_stream_ending_late_does_not_cut_its_successor() {
    let dir = tempfile::tempdir().unwrap();
    let root = open(dir.path(), "root");
    let old = root.attach("gw");
    let new = root.attach("gw");
    root.receive(
        "gw",
        old,
        vec![FleetRow {
            entry: entry("gw", Some("root"), 1),
            reporting: true,
            since_ms: 1,
        }],
        vec![],
    );
    assert!(root.rows().is_empty(), "rows on a superseded stream are ignored");
    root.receive(
        "gw",
        new,
        vec![FleetRow {
            entry: entry("gw", Some("root"), 1),
            reporting: true,
            since_ms: 1,
        }],
        vec![],
    );
    root.detach("gw", old);
    assert!(row(&root, "gw").reporting);
    root.detach("gw", new);
    assert!(!row(&root, "gw").reporting);
}

#[test]
fn a_restarted_node_still_lists_what_it_cannot_hear() {
    let dir = tempfile::tempdir().unwrap();
    {
        let root = open(dir.path(), "root");
        root.set_own(entry("root", None, 0));
        let s = root.attach("gw");
        root.receive(
            "gw",
            s,
            vec![FleetRow {
                entry: entry("gw", Some("root"), 7),
                reporting: true,
                since_ms: 1,
            }],
            vec![],
        );
    }
    let root = open(dir.path(), "root");
    let gw = row(&root, "gw");
    assert!(!gw.reporting);
    assert!(gw.since_ms > 1);
    assert_eq!(gw.entry.lanes[0].messages, 7);
    // Its own row is made again by the host, not read back.
    assert!(root.rows().iter().all(|(r, _)| r.entry.node != "root"));
}

#[test]
fn a_large_subtree_goes_up_in_bounded_messages() {
    let dir = tempfile::tempdir().unwrap();
    let mid = open(dir.path(), "mid");
    let s = mid.attach("c");
    let rows: Vec<FleetRow> = (0..25)
        .map(|i| FleetRow {
            entry: entry(&format!("n{i:02}"), Some("c"), 1),
            reporting: true,
            since_ms: 1,
        })
        .collect();
    mid.receive("c", s, rows, vec![]);
    let mut seq = 0;
    let mut sizes = Vec::new();
    loop {
        let c = mid.since(seq, 10);
        if c.rows.is_empty() {
            break;
        }
        sizes.push(c.rows.len());
        seq = c.seq;
    }
    assert_eq!(sizes, [10, 10, 5]);
}

#[test]
fn states_say_why() {
    let mut r = FleetRow {
        entry: entry("gw", Some("root"), 1),
        reporting: true,
        since_ms: 1,
    };
    assert_eq!(r.state().0, FleetState::Ok);
    r.entry.outbox_bytes = 950;
    let (s, why) = r.state();
    assert_eq!(s, FleetState::Warning);
    assert_eq!(why, ["the outbox is 95% full"]);
    r.entry.lanes[0].stuck = true;
    assert_eq!(r.state(), (FleetState::Stuck, vec!["lane 3 is stuck".to_string()]));
    r.entry.link = "down".into();
    assert_eq!(r.state().0, FleetState::Offline);
    r.reporting = false;
    assert_eq!(r.state().0, FleetState::NotReporting);
}
