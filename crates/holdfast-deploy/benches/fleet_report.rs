//! What the fleet view costs on the link and at the root with 1,000
//! simulated nodes: 10 gateways under the root, 99 leaf gateways under
//! each. Prints figures; asserts nothing.
//!
//! Run: `cargo bench -p holdfast-deploy --bench fleet_report` (`-- --quick`
//! for 2 simulated minutes instead of 10).
//!
//! Method: the mid gateways and the root are real fleet tables
//! ([`Fleet`], each on its own fjall store, writing its rows as a node
//! does); the leaves are simulated, each making its own row once per
//! report interval (5 s, the default) and sending it when it changed. Every
//! message crosses as the link carries it: a `Msg::Fleet` JSON body,
//! encoded by the sender and decoded by the receiver. Bytes are the DEPLOY
//! frame bodies (the link adds 5 bytes of framing per message, and QUIC
//! its own). The root's CPU is the thread CPU time spent decoding and
//! applying what the 10 gateways send. The peer, side by side in the same
//! run: each gateway sending its whole table every interval (a periodic
//! heartbeat, what a design without change tracking sends). Three cases,
//! each for the same simulated time:
//! - busy: every node's backlog and clients change every interval (the
//!   worst case: every row changes every time it may be sent);
//! - idle: nothing changes after the first report (the steady state of a
//!   quiet fleet: nothing is sent);
//! - cuts: busy, and once a minute one gateway's 99 leaves are cut off
//!   and come back.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test or benchmark: a panic is its failure

use std::time::Duration;

use cpu_time::ThreadTime;
use holdfast_deploy::fleet::{Fleet, FleetEntry, FleetLane, FleetPlugin, FleetRow, MAX_ROWS_PER_MESSAGE};
use holdfast_deploy::proto::Msg;
use holdfast_deploy::store::DeployStore;
use holdfast_store::Store;

const MIDS: usize = 10;
const LEAVES_PER_MID: usize = 99;
const INTERVAL_S: u64 = 5;

fn open(dir: &std::path::Path, node: &str) -> Fleet {
    let store = Store::open(&dir.join(node)).unwrap();
    let ds = DeployStore::open(&store, &dir.join(format!("{node}-components"))).unwrap();
    Fleet::open(node, ds, None, Duration::from_secs(INTERVAL_S))
}

/// A node's own row at interval `t`; `busy` makes its figures move.
fn entry(node: &str, parent: &str, t: u64, busy: bool) -> FleetEntry {
    let k = if busy { t } else { 0 };
    FleetEntry {
        node: node.into(),
        parent: Some(parent.into()),
        version: "0.1.0".into(),
        link: "up".into(),
        link_since_ms: 1_765_000_000_000,
        lanes: vec![FleetLane {
            lane: 3,
            messages: 100 + k * 37 % 1000,
            bytes: (100 + k * 37 % 1000) * 240,
            oldest_ms: Some(1_765_000_000_000 + k * 5000),
            drain_per_s: 40 + k % 7,
            time_to_drain_s: Some(3 + k % 11),
            stuck: false,
        }],
        c2d_queued: k % 3,
        clients: 200 + k % 13,
        plugins: ["router", "auth", "content-source"]
            .iter()
            .map(|s| FleetPlugin {
                slot: s.to_string(),
                version: "4a385bf8071e".into(),
                failures: 0,
            })
            .collect(),
        deployment: Some("site-routes@3".into()),
        disk_bytes: 48 << 20,
        outbox_bytes: (100 + k * 37 % 1000) * 240,
        quota_bytes: 10 << 30,
        labels: [("site".to_string(), format!("s{}", node.len() % 7))].into(),
    }
}

fn encode(m: &Msg) -> Vec<u8> {
    serde_json::to_vec(m).unwrap()
}

#[derive(Default)]
struct Figures {
    leaf_bytes: u64,
    leaf_messages: u64,
    up_bytes: u64,
    up_messages: u64,
    naive_bytes: u64,
    root_cpu: Duration,
    mid_cpu: Duration,
}

fn run(case: &str, minutes: u64) -> Figures {
    let dir = tempfile::tempdir().unwrap();
    let root = open(dir.path(), "root");
    let mids: Vec<Fleet> = (0..MIDS).map(|m| open(dir.path(), &format!("gw{m:02}"))).collect();
    let mut up_streams: Vec<u64> = (0..MIDS).map(|m| root.attach(&format!("gw{m:02}"))).collect();
    let mut leaf_streams: Vec<Vec<u64>> = mids
        .iter()
        .enumerate()
        .map(|(m, f)| {
            (0..LEAVES_PER_MID)
                .map(|l| f.attach(&format!("gw{m:02}-{l:02}")))
                .collect()
        })
        .collect();
    let mut sent_up = [0u64; MIDS];
    let mut last_leaf: Vec<Vec<Option<FleetEntry>>> = vec![vec![None; LEAVES_PER_MID]; MIDS];
    let mut f = Figures::default();
    let busy = case != "idle";
    let intervals = minutes * 60 / INTERVAL_S;
    for t in 0..intervals {
        // Once a minute, gateway 0's leaves are cut off, and come back at the next interval.
        let cut = case == "cuts" && t % (60 / INTERVAL_S) == 1;
        for (m, mid) in mids.iter().enumerate() {
            let gw = format!("gw{m:02}");
            let cpu = ThreadTime::now();
            if cut && m == 0 {
                for (l, s) in leaf_streams[m].iter_mut().enumerate() {
                    let leaf = format!("{gw}-{l:02}");
                    mid.detach(&leaf, *s);
                    *s = mid.attach(&leaf);
                    last_leaf[m][l] = None; // a new stream: the leaf sends all again
                }
            }
            mid.set_own(entry(&gw, "root", t, busy));
            f.mid_cpu += cpu.elapsed();
            for l in 0..LEAVES_PER_MID {
                let leaf = format!("{gw}-{l:02}");
                let e = entry(&leaf, &gw, t, busy);
                if last_leaf[m][l].as_ref() == Some(&e) {
                    continue;
                }
                last_leaf[m][l] = Some(e.clone());
                let body = encode(&Msg::Fleet {
                    rows: vec![FleetRow {
                        entry: e,
                        reporting: true,
                        since_ms: 1_765_000_000_000,
                    }],
                    forgotten: vec![],
                });
                f.leaf_bytes += body.len() as u64;
                f.leaf_messages += 1;
                let cpu = ThreadTime::now();
                if let Msg::Fleet { rows, forgotten } = serde_json::from_slice(&body).unwrap() {
                    mid.receive(&leaf, leaf_streams[m][l], rows, forgotten);
                }
                f.mid_cpu += cpu.elapsed();
            }
            // The peer: every row every interval, as a periodic heartbeat would send.
            let all: Vec<FleetRow> = mid.rows().into_iter().map(|(r, _)| r).collect();
            f.naive_bytes += encode(&Msg::Fleet {
                rows: all,
                forgotten: vec![],
            })
            .len() as u64;
            // The gateway's message to the root: what changed since the last.
            loop {
                let cpu = ThreadTime::now();
                let c = mid.since(sent_up[m], MAX_ROWS_PER_MESSAGE);
                let done = c.seq >= mid.seq();
                sent_up[m] = c.seq;
                let body = (!c.rows.is_empty() || !c.forgotten.is_empty()).then(|| {
                    encode(&Msg::Fleet {
                        rows: c.rows,
                        forgotten: c.forgotten,
                    })
                });
                f.mid_cpu += cpu.elapsed();
                if let Some(body) = body {
                    f.up_bytes += body.len() as u64;
                    f.up_messages += 1;
                    let cpu = ThreadTime::now();
                    if let Msg::Fleet { rows, forgotten } = serde_json::from_slice(&body).unwrap() {
                        root.receive(&gw, up_streams[m], rows, forgotten);
                    }
                    f.root_cpu += cpu.elapsed();
                }
                if done {
                    break;
                }
            }
        }
    }
    // Every node reached the root.
    assert_eq!(root.rows().len(), MIDS * (LEAVES_PER_MID + 1));
    up_streams.clear();
    f
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let minutes = if quick { 2 } else { 10 };
    let nodes = (MIDS * (LEAVES_PER_MID + 1)) as f64;
    println!(
        "fleet reporting: {} nodes ({MIDS} gateways × {LEAVES_PER_MID} leaves), a report interval of {INTERVAL_S} s, {minutes} simulated minutes",
        MIDS * (LEAVES_PER_MID + 1)
    );
    println!(
        "{:<6} {:>16} {:>16} {:>14} {:>16} {:>16} {:>18} {:>6}",
        "case",
        "B/node/min leaf",
        "B/node/min root",
        "msgs/min root",
        "root CPU ms/min",
        "gw CPU ms/min",
        "peer B/node/min",
        "ratio"
    );
    for case in ["busy", "idle", "cuts"] {
        let f = run(case, minutes);
        let per_min = |v: f64| v / minutes as f64;
        println!(
            "{case:<6} {:>16.0} {:>16.0} {:>14.0} {:>16.1} {:>16.1} {:>18.0} {:>6.2}",
            per_min(f.leaf_bytes as f64) / (MIDS * LEAVES_PER_MID) as f64,
            per_min(f.up_bytes as f64) / nodes,
            per_min(f.up_messages as f64),
            per_min(f.root_cpu.as_secs_f64() * 1000.0),
            per_min(f.mid_cpu.as_secs_f64() * 1000.0) / MIDS as f64,
            per_min(f.naive_bytes as f64) / nodes,
            f.up_bytes as f64 / f.naive_bytes as f64,
        );
        let _ = f.leaf_messages;
    }
    println!(
        "(B/node/min leaf: what one leaf sends its gateway; root: what reaches the root per node of the fleet;\n root CPU: decoding and applying the gateways' messages, of 60,000 ms per minute of one core;\n peer: every gateway sending its whole table every interval, a periodic heartbeat; ratio: ours / peer)"
    );
}
