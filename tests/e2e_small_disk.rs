//! A gateway whose data directory is a 64 MiB tmpfs (an industrial box's
//! small partition), under a two-level tree (root ← gw1 through a link
//! proxy that can cut the link):
//!
//! - (a) a backlog that filled the disk to the outbox's floor drains, and
//!   the disk is given back: publishes are taken again, after a restart too;
//! - (c) a write that finds the disk full (no floor configured) makes the
//!   node unhealthy (`/healthz` 503, a metric, one log line), and freeing
//!   space makes it healthy again by itself, nothing acknowledged lost;
//! - (d) a node started on a full disk takes messages once space is freed,
//!   without a restart or a reload.
//!
//! - (b) with the range cache filling the disk to its own floor, the
//!   outbox still takes messages: the cache gives space back.
//!
//! Mounting a tmpfs needs root (CI runs as root). Without it each test
//! says so on stderr and returns.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: a panic is its failure

mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use support::client::Client;
use support::curl::{curl_host, data};
use support::delivery::Consumer;
use support::fleet::{addr, fleet, fleet_section, listen_section, upstream_section, wait_until};
use support::origin::Origin;
use support::proxy::Proxy;
use support::{Gateway, free_port, http_get};

const MIB: u64 = 1 << 20;

/// Unmounts (lazily: the node may still hold it) on drop.
struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Mounts a tmpfs of `mib` MiB at `dir` (created).
fn mount(dir: &Path, mib: u64) -> bool {
    std::fs::create_dir_all(dir).unwrap();
    std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
        .arg(dir)
        .status()
        .is_ok_and(|s| s.success())
}

fn can_mount() -> bool {
    let dir = tempfile::tempdir().unwrap();
    let ok = mount(dir.path(), 1);
    drop(Mounted(dir.path().to_path_buf()));
    if !ok {
        eprintln!("SKIPPED: cannot mount a tmpfs here (needs root): the small-disk end-to-end test did not run");
    }
    ok
}

fn free(dir: &Path) -> u64 {
    holdfast_store::disk_free(dir).unwrap()
}

/// Fills the file system of `dir` with files under `dir/ballast` until at
/// most `leave` bytes are free.
fn ballast(dir: &Path, leave: u64) -> PathBuf {
    let b = dir.join("ballast");
    std::fs::create_dir_all(&b).unwrap();
    let chunk = vec![1u8; 1 << 20];
    let mut i = 0;
    while free(dir) > leave {
        let n = (free(dir) - leave).min(chunk.len() as u64) as usize;
        if std::fs::write(b.join(i.to_string()), &chunk[..n]).is_err() {
            break;
        }
        i += 1;
    }
    b
}

/// A 16 KiB payload starting with its sequence number.
fn payload(seq: u64) -> String {
    format!("{seq:08} {}", "x".repeat(16 << 10))
}

/// Sequence numbers the root's consumer received.
fn arrived(consumer: &Consumer) -> BTreeSet<u64> {
    consumer
        .messages()
        .iter()
        .filter_map(|m| m.payload.get(..8).and_then(|s| s.parse().ok()))
        .collect()
}

fn healthz(gw: &Gateway) -> u16 {
    http_get(gw.port, "/healthz", None).map_or(0, |(code, _)| code)
}

/// A root, a proxy in front of its link listener, and gw1 on a 64 MiB
/// tmpfs with `outbox` in its config (and `extra` after it).
struct Tree {
    consumer: Consumer,
    _root: Gateway,
    proxy: Proxy,
    gw: Gateway,
    data: PathBuf,
    _mounted: Mounted,
    _certs: tempfile::TempDir,
}

fn tree(outbox: &str) -> Tree {
    tree_with(outbox, "")
}

fn tree_with(outbox: &str, extra: &str) -> Tree {
    let certs = fleet(&["root", "gw1"]);
    let c = certs.path();
    let root_link = free_port();
    let root = Gateway::start_named(
        "root",
        &format!(
            "{}{}[[identities]]\nid = \"gw1\"\nkind = \"gateway\"\nparent = \"root\"\n",
            fleet_section(c, "root"),
            listen_section(root_link),
        ),
    );
    let consumer = Consumer::start(root.mqtt, "backend", "load/#");
    let proxy = Proxy::start(addr(root_link));
    let mut data = None;
    let gw = Gateway::start_prepared(
        "gw1",
        &format!(
            "{}{}[outbox]\n{outbox}{extra}",
            fleet_section(c, "gw1"),
            upstream_section(proxy.udp, "root")
        ),
        |d| {
            assert!(mount(d, 64), "cannot mount the data directory");
            data = Some(d.to_path_buf());
        },
    );
    let data = data.unwrap();
    Tree {
        _root: root,
        consumer,
        proxy,
        gw,
        _mounted: Mounted(data.clone()),
        data,
        _certs: certs,
    }
}

/// Publishes from `first` on until one is refused or `max` are taken; the
/// sequence numbers acknowledged.
fn publish_until_refused(port: u16, first: u64, max: u64) -> Vec<u64> {
    let mut client = Client::connect(port, "dev", true).unwrap();
    let mut acked = Vec::new();
    for seq in first..first + max {
        if !client
            .publish_acked("load/dev", &payload(seq), Duration::from_secs(10))
            .unwrap()
        {
            break;
        }
        acked.push(seq);
    }
    acked
}

/// (a) The backlog fills the disk to the outbox's floor (8 MiB) and is
/// refused with 0x97; once it has drained, the store gives the space back
/// and publishes are taken again, across a restart too. (The journal kept
/// everything written until it reached 64 MB, so free space stayed under
/// the floor for good.)
#[test]
fn a_drained_backlog_gives_the_disk_back() {
    if !can_mount() {
        return;
    }
    let mut t = tree("min_free_disk_bytes = 8388608\n");
    t.proxy.cmd("cut");
    let acked = publish_until_refused(t.gw.mqtt, 0, 10_000);
    assert!(acked.len() > 100, "only {} taken", acked.len());
    assert!(acked.len() < 10_000, "the disk never filled");
    let full = free(&t.data);
    eprintln!(
        "taken before the disk filled: {} ({} MiB free)",
        acked.len(),
        full / MIB
    );
    t.proxy.cmd("up");
    wait_until(180, "the backlog to arrive at the root", || {
        arrived(&t.consumer).len() >= acked.len()
    });
    assert!(acked.iter().all(|s| arrived(&t.consumer).contains(s)));
    let drained = Instant::now();
    // The backlog took about 16 KiB × its length; most of it comes back.
    let backlog = acked.len() as u64 * (16 << 10);
    wait_until(60, "the drained backlog's space to come back", || {
        free(&t.data) > full + backlog / 4 * 3
    });
    eprintln!(
        "space back {} ms after the drain: {} MiB free",
        drained.elapsed().as_millis(),
        free(&t.data) / MIB
    );
    // Taken again (kept queued: the link is cut), and after a restart.
    t.proxy.cmd("cut");
    let again = publish_until_refused(t.gw.mqtt, 100_000, 50);
    assert_eq!(again.len(), 50, "{}", t.gw.describe());
    t.gw.restart();
    let after = publish_until_refused(t.gw.mqtt, 200_000, 50);
    assert_eq!(after.len(), 50, "{}", t.gw.describe());
    t.proxy.cmd("up");
    wait_until(60, "the new messages to arrive", || {
        let got = arrived(&t.consumer);
        again.iter().chain(&after).all(|s| got.contains(s))
    });
}

/// (c) With no floor, a write finds the disk full (another process filled
/// it; the drain's removals and the outbox clock's saves write). The node
/// says so once, `/healthz` answers 503 and the storage gauge is 1;
/// publishes are refused. Once the space is freed it recovers by itself:
/// healthy, publishes taken, and every acknowledged message arrives.
#[test]
fn a_full_disk_makes_the_node_unhealthy_until_space_returns() {
    if !can_mount() {
        return;
    }
    let t = tree("min_free_disk_bytes = 0\n");
    t.proxy.cmd("cut");
    let acked = publish_until_refused(t.gw.mqtt, 0, 100);
    assert_eq!(acked.len(), 100);
    let ballast = ballast(&t.data, 0);
    t.proxy.cmd("up");
    wait_until(60, "/healthz to report the failure", || healthz(&t.gw) == 503);
    assert_eq!(t.gw.metric("holdfast_outbox_storage_failed "), 1.0);
    let mut client = Client::connect(t.gw.mqtt, "dev2", true).unwrap();
    assert!(
        !client
            .publish_acked("load/dev", &payload(500), Duration::from_secs(10))
            .unwrap()
    );
    // Said once, not every second; nobody is told to restart the node.
    std::thread::sleep(Duration::from_secs(3));
    let log = t.gw.log();
    assert_eq!(log.matches("storage failed:").count(), 1, "{log}");
    assert!(!log.contains("restart the node"), "{log}");
    std::fs::remove_dir_all(&ballast).unwrap();
    let freed = Instant::now();
    wait_until(60, "/healthz to be ok again", || healthz(&t.gw) == 200);
    eprintln!("healthy {} ms after the space was freed", freed.elapsed().as_millis());
    assert_eq!(t.gw.metric("holdfast_outbox_storage_failed "), 0.0);
    assert_eq!(t.gw.metric("holdfast_outbox_storage_recoveries_total "), 1.0);
    assert!(t.gw.log().contains("storage recovered"));
    let more = publish_until_refused(t.gw.mqtt, 1000, 10);
    assert_eq!(more.len(), 10, "{}", t.gw.describe());
    wait_until(120, "every acknowledged message to arrive", || {
        let got = arrived(&t.consumer);
        acked.iter().chain(&more).all(|s| got.contains(s))
    });
}

/// (d) Started with 1 MiB free, the node refuses publishes (its share of
/// the disk is 0); freeing space lets them in at once, without a restart
/// or a reload.
#[test]
fn a_node_started_on_a_full_disk_takes_messages_once_space_is_freed() {
    if !can_mount() {
        return;
    }
    let mut t = tree("min_free_disk_bytes = 0\n");
    t.proxy.cmd("cut");
    t.gw.kill();
    let ballast = ballast(&t.data, MIB);
    t.gw.respawn();
    assert!(
        publish_until_refused(t.gw.mqtt, 0, 1).is_empty(),
        "taken on a full disk"
    );
    std::fs::remove_dir_all(&ballast).unwrap();
    let taken = publish_until_refused(t.gw.mqtt, 1, 20);
    assert_eq!(taken.len(), 20, "{}", t.gw.describe());
    assert!(t.gw.metric("holdfast_outbox_max_bytes ") > (16 * MIB) as f64);
}

/// (b) The range cache fills the disk to its own floor (1 MiB free), below
/// the outbox's (8 MiB): the outbox, whose messages cannot be fetched
/// again, still takes them; the cache evicts what the outbox needs. (The
/// cache evicted only for itself, so every publish was refused while it
/// kept its space.)
#[test]
fn the_outbox_has_priority_over_the_cache_for_the_disk() {
    if !can_mount() {
        return;
    }
    let origin = Origin::start();
    let cache_port = free_port();
    let t = tree_with(
        "min_free_disk_bytes = 8388608\n",
        &format!(
            "[cache]\nlisten = \"127.0.0.1:{cache_port}\"\nmin_free = 1048576\n{}",
            origin.sources()
        ),
    );
    t.proxy.cmd("cut");
    let file = data(3, 4 * MIB as usize);
    let mut n = 0;
    while free(&t.data) > 4 * MIB && n < 20 {
        let path = format!("/pool/f{n}.bin");
        origin.put(&path, &file);
        let got = curl_host(cache_port, "origin.test", &path, &[]);
        assert!(got.body == file);
        n += 1;
        let want = n * 4 * MIB;
        let deadline = Instant::now() + Duration::from_secs(10);
        while t.gw.api("/api/v1/cache")["stored_bytes"].as_u64().unwrap() < want && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let cached = t.gw.api("/api/v1/cache")["stored_bytes"].as_u64().unwrap();
    assert!(
        free(&t.data) < 8 * MIB,
        "the cache left {} MiB free",
        free(&t.data) / MIB
    );
    eprintln!("cache holds {} MiB, {} MiB free", cached / MIB, free(&t.data) / MIB);
    // 8 MiB of messages: none refused.
    let acked = publish_until_refused(t.gw.mqtt, 0, 500);
    assert_eq!(acked.len(), 500, "{}", t.gw.describe());
    let left = t.gw.api("/api/v1/cache")["stored_bytes"].as_u64().unwrap();
    assert!(left < cached, "the cache kept {left} of {cached} bytes");
    assert!(t.gw.metric("holdfast_cache_events_total{event=\"yielded-to-outbox\"} ") > 0.0);
    assert!(t.gw.metric("holdfast_outbox_space_given_bytes_total ") > 0.0);
    t.proxy.cmd("up");
    wait_until(120, "the messages to arrive", || {
        let got = arrived(&t.consumer);
        acked.iter().all(|s| got.contains(s))
    });
}
