//! # holdfast-outbox
//!
//! The outbox: a durable store-and-forward queue of upstream-bound messages.
//!
//! - Ten ordered lanes (0 highest priority). Key = lane byte + big-endian
//!   sequence number; the value is a checksummed [`record::Record`].
//! - [`Outbox::append`] returns once the message is synced. One writer
//!   thread makes every change. Appends that arrive while it syncs share the
//!   next sync (group commit), so durability does not cost one fsync per message.
//! - [`Outbox::lease`] hands out batches in order per lane, chosen across lanes
//!   by the scheduling policy. [`Outbox::ack`] deletes them, and
//!   [`Outbox::release_all`] returns unacknowledged leases when the link drops.
//!   After a restart, delivery resumes at the first unacknowledged message.
//! - Messages past their time-to-live are skipped at lease time and swept in
//!   the background. Age is measured on the outbox clock ([`clock`]), which a
//!   restart does not reset and wall-clock jumps do not move.
//! - Byte, count and free-disk limits, with `reject-new` or `drop-oldest`.
//! - A record that fails to decode is moved to the `outbox-quarantine` space
//!   and counted; the rest is delivered.
//!
//! Each stored record is removed by exactly one path (ack, expiry, quarantine
//! or quota drop): whoever removes it first *claims* it under the state lock.
//! That keeps the persisted counters exact.

pub mod clock;
pub mod config;
pub mod record;

mod delivery;
mod lanes;
mod writer;

use self::writer::{AppendReply, writer_loop};

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;

use self::clock::{Clock, Now, Resumed, Saved};
use self::record::{EncodeError, Record};
use crate::config::{OutboxConfig, Scheduling, SyncMode, WhenFull};
use holdfast_metrics::{LaneLabels, LaneReasonLabels, Metrics, handle};
use holdfast_model::Message;
use holdfast_store::{Durability, Space, Store, StoreError};

/// Number of lanes.
pub const LANES: usize = 10;

pub use holdfast_model::MessageId;

/// Why an append was refused.
#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    /// A byte or count limit is reached and the policy is `reject-new`
    /// (MQTT 5 reason code 0x97, quota exceeded).
    #[error("outbox quota exceeded ({0})")]
    QuotaExceeded(&'static str),
    /// The disk's free space is below `outbox.min_free_disk_bytes`.
    #[error("outbox refused: free disk space below the configured minimum")]
    DiskFull,
    /// The lane is not 0-9.
    #[error("lane {0} is not 0-9")]
    BadLane(u8),
    /// The message cannot be stored (a field too long).
    #[error(transparent)]
    Invalid(#[from] EncodeError),
    /// Storage failed; nothing was stored.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The outbox is closed.
    #[error("the outbox is closed")]
    Closed,
}

impl AppendError {
    /// The MQTT 5 reason code a publisher should get.
    pub fn mqtt_reason_code(&self) -> u8 {
        match self {
            AppendError::QuotaExceeded(_) | AppendError::DiskFull => 0x97,
            AppendError::BadLane(_) | AppendError::Invalid(_) => 0x99,
            AppendError::Store(_) | AppendError::Closed => 0x80,
        }
    }
}

/// Errors opening or operating the outbox.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    /// Storage failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The writer thread could not start.
    #[error("cannot start the outbox writer: {0}")]
    Thread(std::io::Error),
    /// The outbox is closed.
    #[error("the outbox is closed")]
    Closed,
}

/// Where the outbox reads the time. Tests substitute a fake.
pub trait TimeSource: Send + Sync + 'static {
    /// The machine's clocks now.
    fn now(&self) -> Now;
}

/// The real clocks.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemTimeSource;

impl TimeSource for SystemTimeSource {
    fn now(&self) -> Now {
        Now::read()
    }
}

/// A leased message.
#[derive(Debug, Clone)]
pub struct Leased {
    /// Its id.
    pub id: MessageId,
    /// The stored record.
    pub record: Record,
}

/// A batch of leased messages from one lane, in order.
#[derive(Debug, Clone)]
pub struct LeaseBatch {
    /// The lane.
    pub lane: u8,
    /// The messages.
    pub items: Vec<Leased>,
}

/// Per-lane figures.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct LaneStats {
    /// Messages queued (including leased ones not yet acknowledged).
    pub messages: u64,
    /// Stored bytes queued.
    pub bytes: u64,
    /// Leased and not yet acknowledged.
    pub in_flight: u64,
    /// Age of the oldest queued message on the outbox clock, ms.
    pub oldest_age_ms: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Claim {
    /// Handed to the link, awaiting ack.
    Leased(u64),
    /// Being removed by the writer; the value is the stored size.
    Removing(u64),
}

impl Claim {
    fn size(self) -> u64 {
        match self {
            Claim::Leased(s) | Claim::Removing(s) => s,
        }
    }
}

#[derive(Debug, Default, Clone)]
struct Lane {
    /// Next sequence number to assign (writer-owned).
    next_seq: u64,
    /// Committed messages in the lane (writer-owned).
    count: u64,
    /// Committed stored bytes (writer-owned).
    bytes: u64,
    /// No record below this sequence exists (a scan start).
    head: u64,
    /// Next sequence to consider for leasing.
    cursor: u64,
    /// Live-first: `(first live sequence, live cursor)`. Sequences from the
    /// first live one on are delivered before the backlog below it.
    live: Option<(u64, u64)>,
    /// Claimed records.
    claims: BTreeMap<u64, Claim>,
    /// The lease call that last served this lane.
    last_served: u64,
    /// Where the background sweep resumes.
    sweep: u64,
}

impl Lane {
    fn available(&self) -> u64 {
        self.count.saturating_sub(self.claims.len() as u64)
    }
}

struct State {
    lanes: [Lane; LANES],
    lease_calls: u64,
}

/// Why the writer removes a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Removal {
    Acked,
    Expired,
    Damaged,
    Quota,
}

struct Remove {
    lane: u8,
    seq: u64,
    size: u64,
    why: Removal,
    /// For damaged records: the raw bytes, kept in quarantine.
    raw: Option<Vec<u8>>,
}

enum Request {
    Append {
        lane: u8,
        value: Vec<u8>,
        reply: AppendReply,
    },
    Remove {
        items: Vec<Remove>,
        reply: Option<tokio::sync::oneshot::Sender<Result<(), StoreError>>>,
    },
    SaveClock,
}

struct LaneCounters {
    enqueued: Counter,
    delivered: Counter,
    expired: Counter,
    dropped_quota: Counter,
    dropped_damaged: Counter,
    rejected_quota: Counter,
    rejected_disk: Counter,
    rejected_invalid: Counter,
}

/// The limits a config reload changes (`Outbox::apply_limits`); the rest
/// of `config` is fixed for the outbox's life.
#[derive(Debug)]
struct Limits {
    default_ttl_ms: AtomicU64,
    max_messages: AtomicU64,
    /// `outbox.max_bytes`, capped by `disk_cap`.
    max_bytes: AtomicU64,
    min_free_disk_bytes: AtomicU64,
    drop_oldest: AtomicBool,
    /// 80 % of the free space when the outbox opened.
    disk_cap: u64,
}

impl Limits {
    fn new(config: &OutboxConfig, disk_cap: u64) -> Limits {
        Limits {
            default_ttl_ms: AtomicU64::new(config.default_ttl_seconds.saturating_mul(1000)),
            max_messages: AtomicU64::new(config.max_messages),
            max_bytes: AtomicU64::new(config.max_bytes.min(disk_cap)),
            min_free_disk_bytes: AtomicU64::new(config.min_free_disk_bytes),
            drop_oldest: AtomicBool::new(config.when_full == WhenFull::DropOldest),
            disk_cap,
        }
    }
}

struct Inner {
    store: Store,
    data: Space,
    meta: Space,
    quarantine: Space,
    config: OutboxConfig,
    limits: Limits,
    dir: PathBuf,
    instance: u64,
    clock: Clock,
    time: Arc<dyn TimeSource>,
    state: Mutex<State>,
    metrics: Arc<Metrics>,
    counters: Vec<LaneCounters>,
    /// Bumped after every commit that stored messages, and when leases are
    /// released: a drainer waiting for work watches it.
    work: tokio::sync::watch::Sender<u64>,
}

/// The outbox.
pub struct Outbox {
    inner: Arc<Inner>,
    tx: Mutex<Option<mpsc::Sender<Request>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    stop_sweeper: Mutex<Option<mpsc::Sender<()>>>,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox")
            .field("dir", &self.inner.dir)
            .finish_non_exhaustive()
    }
}

fn key(lane: u8, seq: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(9);
    k.push(lane);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

fn parse_key(k: &[u8]) -> Option<(u8, u64)> {
    if k.len() != 9 {
        return None;
    }
    let mut seq = [0u8; 8];
    seq.copy_from_slice(&k[1..]);
    Some((k[0], u64::from_be_bytes(seq)))
}

fn lane_meta_key(lane: u8) -> Vec<u8> {
    format!("lane/{lane}").into_bytes()
}

fn encode_lane_meta(next_seq: u64, count: u64, bytes: u64) -> Vec<u8> {
    [next_seq, count, bytes].iter().flat_map(|v| v.to_be_bytes()).collect()
}

fn decode_lane_meta(b: &[u8]) -> Option<(u64, u64, u64)> {
    if b.len() != 24 {
        return None;
    }
    let at = |i: usize| {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[i..i + 8]);
        u64::from_be_bytes(a)
    };
    Some((at(0), at(8), at(16)))
}

/// Free bytes on the file system holding `dir`.
fn free_disk(dir: &Path) -> Option<u64> {
    let s = rustix::fs::statvfs(dir).ok()?;
    Some(s.f_bavail.saturating_mul(s.f_frsize))
}

impl Outbox {
    /// Opens the outbox in `store`, recovering lanes, counters and the clock.
    ///
    /// # Errors
    /// Storage errors, or the writer thread cannot start.
    pub fn open(
        store: &Store,
        dir: &Path,
        config: OutboxConfig,
        metrics: Arc<Metrics>,
        time: Arc<dyn TimeSource>,
    ) -> Result<Outbox, OutboxError> {
        let data = store.space("outbox")?;
        let meta = store.space("outbox-meta")?;
        let quarantine = store.space("outbox-quarantine")?;
        let mut fresh_meta = store.batch();
        let instance = match meta.get(b"instance")? {
            Some(b) if b.len() == 8 => u64::from_be_bytes(b.try_into().unwrap_or([0; 8])),
            _ => {
                let id = holdfast_model::random_u64();
                fresh_meta.insert(&meta, b"instance".to_vec(), id.to_be_bytes().to_vec());
                id
            }
        };
        let now = time.now();
        let saved = meta.get(b"clock")?.and_then(|b| Saved::decode(&b));
        let (base, resumed) = clock::resume(saved, now);
        match resumed {
            Resumed::Rebooted {
                downtime_ms,
                wall_went_back: true,
            } => tracing::warn!(
                downtime_ms,
                "outbox: the wall clock is behind the last save; counting no downtime"
            ),
            Resumed::Rebooted { downtime_ms, .. } if downtime_ms > 7 * 86_400_000 => tracing::warn!(
                downtime_hours = downtime_ms / 3_600_000,
                "outbox: over a week since the last save by the wall clock; messages age accordingly"
            ),
            _ => {}
        }
        let clock = Clock::start(base, now);
        let mut lanes: [Lane; LANES] = Default::default();
        for (i, lane) in lanes.iter_mut().enumerate() {
            let l = i as u8;
            if let Some((next_seq, count, bytes)) = meta.get(&lane_meta_key(l))?.and_then(|b| decode_lane_meta(&b)) {
                lane.next_seq = next_seq;
                lane.count = count;
                lane.bytes = bytes;
            }
            // The first record still present is where delivery resumes.
            let first = data.range(key(l, 0)..key(l, u64::MAX)).next().transpose()?;
            let head = first
                .and_then(|(k, _)| parse_key(&k))
                .map(|(_, s)| s)
                .unwrap_or(lane.next_seq);
            lane.head = head;
            lane.cursor = head;
            lane.sweep = head;
            if config.live_first_lanes.contains(&l) {
                lane.live = Some((lane.next_seq, lane.next_seq));
            }
        }
        if !fresh_meta.is_empty() {
            fresh_meta.commit(Durability::SyncAll)?;
        }
        let free_at_start = free_disk(dir).unwrap_or(u64::MAX);
        let limits = Limits::new(&config, free_at_start / 10 * 8);
        let counters = (0..LANES as u8)
            .map(|lane| {
                let reason = |r: &'static str| LaneReasonLabels { lane, reason: r };
                LaneCounters {
                    enqueued: handle(&metrics.outbox_enqueued, &LaneLabels { lane }),
                    delivered: handle(&metrics.outbox_delivered, &LaneLabels { lane }),
                    expired: handle(&metrics.outbox_expired, &LaneLabels { lane }),
                    dropped_quota: handle(&metrics.outbox_dropped, &reason("quota")),
                    dropped_damaged: handle(&metrics.outbox_dropped, &reason("damaged")),
                    rejected_quota: handle(&metrics.outbox_rejected, &reason("quota")),
                    rejected_disk: handle(&metrics.outbox_rejected, &reason("disk")),
                    rejected_invalid: handle(&metrics.outbox_rejected, &reason("invalid")),
                }
            })
            .collect();
        let inner = Arc::new(Inner {
            store: store.clone(),
            data,
            meta,
            quarantine,
            limits,
            dir: dir.to_path_buf(),
            instance,
            clock,
            time,
            state: Mutex::new(State { lanes, lease_calls: 0 }),
            metrics,
            counters,
            config,
            work: tokio::sync::watch::channel(0).0,
        });
        let (tx, rx) = mpsc::channel();
        let writer_inner = inner.clone();
        let writer = std::thread::Builder::new()
            .name("holdfast-outbox".into())
            .spawn(move || writer_loop(&writer_inner, rx))
            .map_err(OutboxError::Thread)?;
        let (stop_tx, stop_rx) = mpsc::channel::<()>();
        let sweeper_inner = inner.clone();
        let sweeper_tx = tx.clone();
        let interval = Duration::from_millis(inner.config.expire_interval_ms);
        let sweeper = std::thread::Builder::new()
            .name("holdfast-outbox-sweep".into())
            .spawn(move || {
                while let Err(mpsc::RecvTimeoutError::Timeout) = stop_rx.recv_timeout(interval) {
                    sweeper_inner.sweep_expired(&sweeper_tx);
                    if sweeper_tx.send(Request::SaveClock).is_err() {
                        break;
                    }
                }
            })
            .map_err(OutboxError::Thread)?;
        let outbox = Outbox {
            inner,
            tx: Mutex::new(Some(tx)),
            threads: Mutex::new(vec![writer, sweeper]),
            stop_sweeper: Mutex::new(Some(stop_tx)),
        };
        outbox.send(Request::SaveClock).map_err(|_| OutboxError::Closed)?;
        Ok(outbox)
    }

    fn send(&self, req: Request) -> Result<(), AppendError> {
        let tx = holdfast_model::lock(&self.tx);
        tx.as_ref()
            .ok_or(AppendError::Closed)?
            .send(req)
            .map_err(|_| AppendError::Closed)
    }

    /// Queues an append without waiting: the receiver resolves once the
    /// message is durable (or the append failed). An immediate refusal
    /// (quota, disk, invalid message) is returned at once. This lets a
    /// connection keep reading while earlier appends wait for their sync.
    ///
    /// # Errors
    /// As [`Outbox::append`].
    pub fn submit(
        &self,
        lane: u8,
        message: Arc<Message>,
        ttl: Option<Duration>,
    ) -> Result<tokio::sync::oneshot::Receiver<Result<MessageId, AppendError>>, AppendError> {
        let value = self.prepare(lane, message, ttl)?;
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.send(Request::Append { lane, value, reply })?;
        Ok(rx)
    }

    fn prepare(&self, lane: u8, message: Arc<Message>, ttl: Option<Duration>) -> Result<Vec<u8>, AppendError> {
        if lane as usize >= LANES {
            return Err(AppendError::BadLane(lane));
        }
        let now = self.inner.time.now();
        let record = Record {
            enqueued_clock_ms: self.inner.clock.at(now),
            enqueued_wall_ms: now.wall_ms,
            ttl_ms: ttl
                .map(|t| t.as_millis() as u64)
                .unwrap_or_else(|| self.inner.limits.default_ttl_ms.load(Ordering::Relaxed)),
            message,
        };
        record.encode().map_err(|e| {
            self.inner.counters[lane as usize].rejected_invalid.inc();
            AppendError::Invalid(e)
        })
    }

    /// Appends a message to `lane`; resolves once it is durable. `ttl`
    /// overrides the default time-to-live.
    ///
    /// # Errors
    /// Quota, disk, an invalid lane or message, storage failure.
    pub async fn append(
        &self,
        lane: u8,
        message: Arc<Message>,
        ttl: Option<Duration>,
    ) -> Result<MessageId, AppendError> {
        self.submit(lane, message, ttl)?
            .await
            .map_err(|_| AppendError::Closed)?
    }

    /// [`Outbox::append`] for threads outside an async runtime.
    ///
    /// # Errors
    /// As [`Outbox::append`].
    pub fn append_blocking(
        &self,
        lane: u8,
        message: Arc<Message>,
        ttl: Option<Duration>,
    ) -> Result<MessageId, AppendError> {
        self.submit(lane, message, ttl)?
            .blocking_recv()
            .map_err(|_| AppendError::Closed)?
    }

    /// A receiver that changes whenever new messages are stored or leases are
    /// released. A drainer marks it seen, leases, and waits for a change when
    /// it found nothing, so no append is missed.
    pub fn watch_work(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.work.subscribe()
    }

    /// The outbox's stable instance id.
    pub fn instance(&self) -> u64 {
        self.inner.instance
    }

    /// The outbox clock now, ms.
    pub fn clock_ms(&self) -> u64 {
        self.inner.clock.at(self.inner.time.now())
    }

    /// The effective byte limit (the configured one, capped at 80 % of the
    /// disk space free at open).
    pub fn max_bytes(&self) -> u64 {
        self.inner.limits.max_bytes.load(Ordering::Relaxed)
    }

    /// Applies the limits a running outbox can change:
    /// `default_ttl_seconds` (for messages appended from now on),
    /// `max_messages`, `max_bytes` (still capped at 80 % of the free space
    /// at start), `min_free_disk_bytes` and `when_full`. A quota lowered
    /// below what is queued removes nothing by itself. With `reject-new`,
    /// appends are refused until the backlog is under it; with
    /// `drop-oldest`, the next append removes the oldest messages until the
    /// backlog fits. Returns the keys that changed (`max_bytes` noting a cap).
    pub fn apply_limits(&self, new: &OutboxConfig) -> Vec<String> {
        let l = &self.inner.limits;
        let max_bytes = new.max_bytes.min(l.disk_cap);
        let mut changed = holdfast_model::store_limits(&[
            (
                "outbox.default_ttl_seconds",
                &l.default_ttl_ms,
                new.default_ttl_seconds.saturating_mul(1000),
            ),
            ("outbox.max_messages", &l.max_messages, new.max_messages),
            ("outbox.max_bytes", &l.max_bytes, max_bytes),
            (
                "outbox.min_free_disk_bytes",
                &l.min_free_disk_bytes,
                new.min_free_disk_bytes,
            ),
        ]);
        for key in &mut changed {
            if key == "outbox.max_bytes" && max_bytes < new.max_bytes {
                *key = format!("{key} (capped at {max_bytes}: 80 % of the free space at start)");
            }
        }
        let drop_oldest = new.when_full == WhenFull::DropOldest;
        if l.drop_oldest.swap(drop_oldest, Ordering::Relaxed) != drop_oldest {
            changed.push("outbox.when_full".to_string());
        }
        changed
    }

    /// Per-lane figures; also refreshes the depth and age gauges.
    pub fn stats(&self) -> Vec<LaneStats> {
        let now = self.clock_ms();
        let st = self.inner.lock();
        let mut out = Vec::with_capacity(LANES);
        for (i, lane) in st.lanes.iter().enumerate() {
            let oldest_age_ms = if lane.count == 0 {
                None
            } else {
                self.inner
                    .data
                    .range(key(i as u8, lane.head)..key(i as u8, u64::MAX))
                    .next()
                    .and_then(|r| r.ok())
                    .and_then(|(_, v)| Record::decode_shared(&v.into()).ok())
                    .map(|r| now.saturating_sub(r.enqueued_clock_ms))
            };
            let s = LaneStats {
                messages: lane.count,
                bytes: lane.bytes,
                in_flight: lane.claims.values().filter(|c| matches!(c, Claim::Leased(_))).count() as u64,
                oldest_age_ms,
            };
            let labels = LaneLabels { lane: i as u8 };
            let m = &self.inner.metrics;
            m.outbox_depth.get_or_create(&labels).set(s.messages as i64);
            m.outbox_bytes.get_or_create(&labels).set(s.bytes as i64);
            m.outbox_oldest_age
                .get_or_create(&labels)
                .set(s.oldest_age_ms.map(|a| (a / 1000) as i64).unwrap_or(0));
            out.push(s);
        }
        out
    }

    /// Stops the writer after it has committed everything sent so far, saves
    /// the clock and syncs.
    pub fn close(&self) {
        if let Some(stop) = holdfast_model::lock(&self.stop_sweeper).take() {
            let _ = stop.send(());
        }
        if let Some(tx) = holdfast_model::lock(&self.tx).take() {
            let _ = tx.send(Request::SaveClock);
        }
        for t in holdfast_model::lock(&self.threads).drain(..) {
            let _ = t.join();
        }
        if let Err(e) = self.inner.store.persist(Durability::SyncAll) {
            tracing::error!("outbox: final sync failed: {e}");
        }
    }
}

impl Drop for Outbox {
    fn drop(&mut self) {
        self.close();
    }
}
