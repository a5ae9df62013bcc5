//! Power cuts across a two-level tree: a device publishes QoS 1 to a gateway
//! whose data directory loses, at each cut, everything not yet fsynced or
//! fdatasynced (the LD_PRELOAD harness in tools/powercut, then SIGKILL), at
//! random moments: with its link to the root up, with a backlog (the link
//! black-holed for up to a second before the cut), and while it recovers. Counted at the root, by payload sequence
//! number and `holdfast-id`: acknowledged messages lost, reordered and
//! duplicated. With the sync disabled through the harness, the same run must
//! lose acknowledged messages: proof the test can fail.
//!
//! `POWERCUT_CUTS=<n>` (default 10) runs more cuts, `POWERCUT_SEED=<n>`
//! repeats a run, `POWERCUT_LINK_VERSION=3` pins the root to link/3 (then
//! duplicates are printed, not asserted): docs/durability.md.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test or benchmark: a panic is its failure

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::client::Client;
use support::delivery::Consumer;
use support::fleet::{addr, fleet, fleet_section, listen_section, upstream_section};
use support::powercut::{Harness, Tally, tally};
use support::proxy::Proxy;
use support::{Gateway, free_port};

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// xorshift64*: the cut moments, repeatable from the printed seed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n.max(1)
    }
}

struct Outcome {
    tally: Tally,
    acked: usize,
    received: usize,
    cuts: usize,
    /// Batches the root's outbox left out as already stored (link/4).
    root_dropped_resends: f64,
}

/// Runs the cut loop: `cuts` power cuts of the gateway under steady load.
fn run(cuts: usize, link_version: Option<u8>, nosync: bool) -> Outcome {
    let seed = env_or("POWERCUT_SEED", {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap();
        t.as_nanos() as u64 | 1
    });
    eprintln!("POWERCUT_SEED={seed} cuts={cuts} link_version={link_version:?} nosync={nosync}");
    let mut rng = Rng(seed);
    let harness = Harness::get();
    let state = tempfile::tempdir().unwrap();

    let certs = fleet(&["root", "gw1"]);
    let c = certs.path();
    let root_link = free_port();
    let version = link_version.map(|v| format!("version = {v}\n")).unwrap_or_default();
    let root = Gateway::start_named(
        "root",
        &format!(
            "{}{}{version}[[identities]]\nid = \"gw1\"\nkind = \"gateway\"\nparent = \"root\"\n",
            fleet_section(c, "root"),
            listen_section(root_link),
        ),
    );
    let consumer = Consumer::start(root.mqtt, "backend", "load/#");
    // 20 ms each way: acknowledged messages are always on their way up.
    let proxy = Proxy::start(addr(root_link));
    proxy.cmd("delay 20");
    let mut gw = Gateway::start_with_env(
        "gw1",
        &format!("{}{}", fleet_section(c, "gw1"), upstream_section(proxy.udp, "root")),
        |data| harness.env(data, state.path(), nosync),
    );
    let data = gw.data_dir();
    // A gateway that has run before: what its first start wrote is on disk
    // (fjall does not fsync `keyspaces/` after creating a keyspace there, a
    // first-start-only gap the harness would otherwise turn into a wiped store).
    gw.kill();
    std::fs::remove_dir_all(state.path()).unwrap();
    gw.respawn();

    // Steady load: one device, QoS 1, reconnecting while the gateway is down.
    let acked = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (acked, stop, port) = (acked.clone(), stop.clone(), gw.mqtt);
        std::thread::spawn(move || {
            let mut seq = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let Ok(mut device) = Client::connect(port, "sensor-1", true) else {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                };
                while !stop.load(Ordering::Relaxed) {
                    let ok = device.publish_acked("load/sensor-1", &seq.to_string(), Duration::from_secs(5));
                    seq += 1;
                    match ok {
                        Ok(true) => acked.lock().unwrap().push(seq - 1),
                        Ok(false) => {}
                        Err(_) => break,
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        })
    };

    let cut = |gw: &mut Gateway| {
        gw.kill();
        let summary = harness.restore(&data, state.path());
        eprintln!("cut: {summary}");
    };
    let mut done = 0;
    while done < cuts {
        std::thread::sleep(Duration::from_millis(300 + rng.below(1200)));
        // Every other cut comes with a backlog: the link black-holed for a while.
        let backlog = done % 2 == 1;
        if backlog {
            proxy.cmd("blackhole");
            std::thread::sleep(Duration::from_millis(300 + rng.below(700)));
        }
        cut(&mut gw);
        done += 1;
        if backlog {
            proxy.cmd("up");
        }
        // Every third cut, cut again while the gateway is recovering.
        if done % 3 == 2 && done < cuts {
            gw.respawn_unready();
            std::thread::sleep(Duration::from_millis(rng.below(400)));
            cut(&mut gw);
            done += 1;
        }
        gw.respawn();
    }
    std::thread::sleep(Duration::from_millis(1000));
    stop.store(true, Ordering::Relaxed);
    load.join().unwrap();
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() > cuts * 50, "too little load: {} acknowledged", acked.len());

    // Wait for everything acknowledged at the root, or for the gateway's
    // outbox to stay empty (what is lost never comes).
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut empty_since = None;
    loop {
        let got = consumer.messages();
        if tally(&acked, &got).lost == 0 {
            break;
        }
        let empty = gw.api("/api/v1/outbox")["lanes"]
            .as_array()
            .unwrap()
            .iter()
            .all(|l| l["messages"] == 0);
        match (empty, empty_since) {
            (true, None) => empty_since = Some(Instant::now()),
            (true, Some(t)) if t.elapsed() > Duration::from_secs(3) => break,
            (false, _) => empty_since = None,
            _ => {}
        }
        assert!(
            Instant::now() < deadline,
            "the gateway's outbox did not drain\n{}",
            gw.describe()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Late duplicates of a resent window.
    std::thread::sleep(Duration::from_millis(1000));
    let got = consumer.messages();
    let outcome = Outcome {
        tally: tally(&acked, &got),
        acked: acked.len(),
        received: got.len(),
        cuts,
        root_dropped_resends: root.metric("holdfast_outbox_duplicates_total{lane=\"5\"}"),
    };
    eprintln!(
        "powercut: cuts={} acknowledged={} received={} lost={} duplicated={} reordered={} \
         id_mismatch={} duplicates_per_cut={:.1} lost_per_cut={:.1} root_left_out={}",
        outcome.cuts,
        outcome.acked,
        outcome.received,
        outcome.tally.lost,
        outcome.tally.duplicated,
        outcome.tally.reordered,
        outcome.tally.id_mismatch,
        outcome.tally.duplicated as f64 / cuts as f64,
        outcome.tally.lost as f64 / cuts as f64,
        outcome.root_dropped_resends,
    );
    outcome
}

#[test]
fn acknowledged_messages_survive_power_cuts_once_and_in_order() {
    let link_version = std::env::var("POWERCUT_LINK_VERSION").ok().and_then(|v| v.parse().ok());
    let o = run(env_or("POWERCUT_CUTS", 10), link_version, false);
    assert_eq!(o.tally.lost, 0, "acknowledged messages lost");
    assert_eq!(o.tally.reordered, 0, "first arrivals out of publish order");
    assert_eq!(o.tally.id_mismatch, 0, "a duplicate with another holdfast-id");
    if link_version.is_none_or(|v| v >= 4) {
        assert_eq!(o.tally.duplicated, 0, "duplicates at the root over link/4");
    }
}

/// The harness can fail: with fsync and fdatasync turned into no-ops under
/// the gateway's data directory, a cut loses what was acknowledged.
#[test]
fn without_sync_a_power_cut_loses_acknowledged_messages() {
    let o = run(3, None, true);
    assert!(
        o.tally.lost > 0,
        "nothing acknowledged was lost with the sync disabled: the harness does not cut power"
    );
}
