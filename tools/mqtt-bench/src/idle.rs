//! `--idle-clients N`: open N connected clients that only keep their
//! connection alive, hold them, and report how many made it. For measuring a
//! broker's memory per connection.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use holdfast_mqtt::Packet;
use tokio::io::Interest;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::time::{MissedTickBehavior, interval_at};

use crate::conn::{Conn, Endpoint, KEEP_ALIVE_SECS};
use crate::load::goodbye;

/// Connection attempts in progress at once (keeps the broker's listen
/// backlog from overflowing).
const CONCURRENT_CONNECTS: usize = 128;

#[derive(Debug)]
pub struct IdleReport {
    pub requested: usize,
    pub connected: u64,
    pub failed: u64,
    /// Error message → count, for the failures.
    pub failures: BTreeMap<String, u64>,
    pub connect_secs: f64,
    /// Still connected when the hold ended.
    pub held: u64,
    pub held_secs: f64,
    pub rss_before_kib: Option<u64>,
    pub rss_after_kib: Option<u64>,
}

pub async fn run(ep: Arc<Endpoint>, n: usize, hold: Duration, tag: u16, broker_pid: Option<u32>) -> IdleReport {
    let rss_before_kib = broker_pid.and_then(rss_kib);
    let gate = Arc::new(Semaphore::new(CONCURRENT_CONNECTS));
    let (results_tx, mut results) = mpsc::unbounded_channel::<Result<(), String>>();
    let (stop_tx, stop_rx) = watch::channel(false);
    let dropped = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    let started = Instant::now();
    for k in 0..n {
        let (ep, gate, results_tx, stop, dropped) = (
            ep.clone(),
            gate.clone(),
            results_tx.clone(),
            stop_rx.clone(),
            dropped.clone(),
        );
        tasks.spawn(async move {
            let permit = gate.acquire_owned().await;
            let conn = Conn::connect(&ep, format!("hfbench-{tag:04x}-i{k}")).await;
            drop(permit);
            match conn {
                Ok(c) => {
                    let _ = results_tx.send(Ok(()));
                    hold_open(c, stop, dropped).await;
                }
                Err(e) => {
                    let _ = results_tx.send(Err(format!("{e:#}")));
                }
            }
        });
    }
    drop(results_tx);
    let mut connected = 0;
    let mut failed = 0;
    let mut failures = BTreeMap::new();
    let mut last_note = Instant::now();
    while let Some(r) = results.recv().await {
        match r {
            Ok(()) => connected += 1,
            Err(e) => {
                failed += 1;
                *failures.entry(e).or_insert(0) += 1;
            }
        }
        if last_note.elapsed() >= Duration::from_secs(1) {
            eprintln!("  {connected} connected, {failed} failed of {n}");
            last_note = Instant::now();
        }
        if connected + failed == n as u64 {
            break;
        }
    }
    let connect_secs = started.elapsed().as_secs_f64();
    eprintln!(
        "{connected}/{n} clients connected in {connect_secs:.1} s; holding them for {:.0} s",
        hold.as_secs_f64()
    );
    let hold = if connected == 0 { Duration::ZERO } else { hold };
    // Let the broker settle its allocations before sampling it.
    tokio::time::sleep(hold.min(Duration::from_secs(2))).await;
    let rss_after_kib = broker_pid.and_then(rss_kib);
    tokio::time::sleep(hold.saturating_sub(Duration::from_secs(2))).await;
    let held = connected - dropped.load(Ordering::Relaxed);
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    IdleReport {
        requested: n,
        connected,
        failed,
        failures,
        connect_secs,
        held,
        held_secs: hold.as_secs_f64(),
        rss_before_kib,
        rss_after_kib,
    }
}

/// Keeps one client connected: PINGREQ at half the keep-alive, answers
/// read and dropped, until `stop`.
async fn hold_open(mut c: Conn, mut stop: watch::Receiver<bool>, dropped: Arc<AtomicU64>) {
    let every = Duration::from_secs(u64::from(KEEP_ALIVE_SECS) / 2);
    let mut ping = interval_at(tokio::time::Instant::now() + every, every);
    ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            ready = c.stream.ready(Interest::READABLE) => {
                let open = ready.is_ok() && matches!(c.try_fill(), Ok(true));
                while let Ok(Some(p)) = c.next_packet() {
                    if matches!(p, Packet::Disconnect(_)) {
                        dropped.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                }
                if !open {
                    dropped.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
            _ = ping.tick() => {
                c.send(&Packet::PingReq);
                if c.flush_all().await.is_err() {
                    dropped.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
            _ = stop.changed() => {
                goodbye(&mut c, Duration::from_secs(1)).await;
                return;
            }
        }
    }
}

/// Resident set size of a process, from /proc/PID/status.
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}
