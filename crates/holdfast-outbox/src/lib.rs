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
        let tx = self.tx.lock().unwrap_or_else(|p| p.into_inner());
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

    /// Leases up to `max` messages from the lane the scheduling policy picks
    /// next; `None` when nothing is available.
    ///
    /// # Errors
    /// Storage errors.
    pub fn lease(&self, max: usize) -> Result<Option<LeaseBatch>, OutboxError> {
        let mut st = self.inner.lock();
        st.lease_calls += 1;
        let call = st.lease_calls;
        let waiting: Vec<usize> = (0..LANES).filter(|&l| st.lanes[l].available() > 0).collect();
        let Some(&first) = waiting.first() else {
            return Ok(None);
        };
        let pick = match self.inner.config.scheduling {
            Scheduling::Strict => first,
            Scheduling::Bounded => {
                let limit = u64::from(self.inner.config.starvation_limit);
                // The lane that has waited longest, if it has waited too long.
                waiting
                    .iter()
                    .copied()
                    .filter(|&l| call.saturating_sub(st.lanes[l].last_served) > limit)
                    .min_by_key(|&l| st.lanes[l].last_served)
                    .unwrap_or(first)
            }
        };
        for lane in std::iter::once(pick).chain(waiting.into_iter().filter(|&l| l != pick)) {
            let batch = self
                .inner
                .lease_lane(&mut st, lane as u8, max, self.tx_clone().as_ref())?;
            if !batch.items.is_empty() {
                st.lanes[lane].last_served = call;
                return Ok(Some(batch));
            }
        }
        Ok(None)
    }

    /// Leases up to `max` messages from `lane` only.
    ///
    /// # Errors
    /// Storage errors.
    pub fn lease_lane(&self, lane: u8, max: usize) -> Result<LeaseBatch, OutboxError> {
        if lane as usize >= LANES {
            return Ok(LeaseBatch {
                lane,
                items: Vec::new(),
            });
        }
        let mut st = self.inner.lock();
        self.inner.lease_lane(&mut st, lane, max, self.tx_clone().as_ref())
    }

    fn tx_clone(&self) -> Option<mpsc::Sender<Request>> {
        self.tx.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Acknowledges delivered messages: they are deleted. Unknown or
    /// already-acknowledged ids are ignored. Resolves when the deletion is
    /// committed (buffered: an ack lost in a crash means a redelivery).
    ///
    /// # Errors
    /// Storage errors, or the outbox is closed.
    pub async fn ack(&self, ids: &[MessageId]) -> Result<(), OutboxError> {
        let Some(rx) = self.ack_request(ids)? else {
            return Ok(());
        };
        rx.await.map_err(|_| OutboxError::Closed)?.map_err(OutboxError::Store)
    }

    /// [`Outbox::ack`] for threads outside an async runtime.
    ///
    /// # Errors
    /// As [`Outbox::ack`].
    pub fn ack_blocking(&self, ids: &[MessageId]) -> Result<(), OutboxError> {
        let Some(rx) = self.ack_request(ids)? else {
            return Ok(());
        };
        rx.blocking_recv()
            .map_err(|_| OutboxError::Closed)?
            .map_err(OutboxError::Store)
    }

    /// Acknowledges without waiting for the deletion to commit (as
    /// [`Outbox::ack`], whose commit is buffered anyway). The messages are
    /// claimed at once, so a following [`Outbox::release_all`] does not
    /// hand them out again.
    pub fn ack_detached(&self, ids: &[MessageId]) {
        if let Err(e) = self.ack_request(ids) {
            tracing::debug!(error = %e, "outbox: ack after close");
        }
    }

    fn ack_request(
        &self,
        ids: &[MessageId],
    ) -> Result<Option<tokio::sync::oneshot::Receiver<Result<(), StoreError>>>, OutboxError> {
        let mut items = Vec::with_capacity(ids.len());
        {
            let mut st = self.inner.lock();
            for id in ids
                .iter()
                .filter(|id| id.instance == self.inner.instance && (id.lane as usize) < LANES)
            {
                let lane = &mut st.lanes[id.lane as usize];
                if let Some(claim @ Claim::Leased(size)) = lane.claims.get(&id.seq).copied() {
                    lane.claims.insert(id.seq, Claim::Removing(claim.size()));
                    items.push(Remove {
                        lane: id.lane,
                        seq: id.seq,
                        size,
                        why: Removal::Acked,
                        raw: None,
                    });
                }
            }
        }
        if items.is_empty() {
            return Ok(None);
        }
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.send(Request::Remove {
            items,
            reply: Some(reply),
        })
        .map_err(|_| OutboxError::Closed)?;
        Ok(Some(rx))
    }

    /// Returns some leased messages to their lanes, to be leased again in
    /// order (a sender that leased more than it sends).
    pub fn release(&self, ids: &[MessageId]) {
        let mut st = self.inner.lock();
        for id in ids
            .iter()
            .filter(|id| id.instance == self.inner.instance && (id.lane as usize) < LANES)
        {
            let lane = &mut st.lanes[id.lane as usize];
            if matches!(lane.claims.get(&id.seq), Some(Claim::Leased(_))) {
                lane.claims.remove(&id.seq);
                match &mut lane.live {
                    Some((first_live, live_cursor)) if id.seq >= *first_live => {
                        *live_cursor = (*live_cursor).min(id.seq);
                    }
                    _ => lane.cursor = lane.cursor.min(id.seq),
                }
            }
        }
        drop(st);
        self.inner.work.send_modify(|n| *n += 1);
    }

    /// Returns every leased, unacknowledged message to its lane, to be leased
    /// again in order (call when the link drops).
    pub fn release_all(&self) {
        let mut st = self.inner.lock();
        for lane in st.lanes.iter_mut() {
            let released: Vec<u64> = lane
                .claims
                .iter()
                .filter(|(_, c)| matches!(c, Claim::Leased(_)))
                .map(|(s, _)| *s)
                .collect();
            if let Some(&min) = released.first() {
                for s in &released {
                    lane.claims.remove(s);
                }
                match &mut lane.live {
                    Some((first_live, live_cursor)) => {
                        if min < *first_live {
                            lane.cursor = lane.cursor.min(min);
                        }
                        if let Some(&s) = released.iter().find(|s| **s >= *first_live) {
                            *live_cursor = (*live_cursor).min(s);
                        }
                    }
                    None => lane.cursor = lane.cursor.min(min),
                }
            }
        }
        drop(st);
        self.inner.work.send_modify(|n| *n += 1);
    }

    /// A receiver that changes whenever new messages are stored or leases are
    /// released. A drainer marks it seen, leases, and waits for a change when
    /// it found nothing, so no append is missed.
    pub fn watch_work(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.work.subscribe()
    }

    /// Marks the start of live traffic on live-first lanes: what is queued now
    /// is backlog, delivered after anything newer (call when the link comes up).
    pub fn mark_live(&self) {
        let mut st = self.inner.lock();
        for (i, lane) in st.lanes.iter_mut().enumerate() {
            if self.inner.config.live_first_lanes.contains(&(i as u8)) {
                // Everything queued now is backlog. The backlog cursor already
                // covers the old live range: what it has passed there is claimed.
                lane.live = Some((lane.next_seq, lane.next_seq));
            }
        }
    }

    /// Removes expired messages now (the background sweep does this every
    /// `outbox.expire_interval_ms`); returns how many were found.
    pub fn sweep_expired(&self) -> usize {
        match self.tx_clone() {
            Some(tx) => self.inner.sweep_expired(&tx),
            None => 0,
        }
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
                    .and_then(|(_, v)| Record::decode(&v).ok())
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
        if let Some(stop) = self.stop_sweeper.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = stop.send(());
        }
        if let Some(tx) = self.tx.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = tx.send(Request::SaveClock);
        }
        for t in self.threads.lock().unwrap_or_else(|p| p.into_inner()).drain(..) {
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

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Leases from one lane with the state lock held. Expired and damaged
    /// records met on the way are claimed and handed to the writer.
    fn lease_lane(
        &self,
        st: &mut State,
        lane_no: u8,
        max: usize,
        tx: Option<&mpsc::Sender<Request>>,
    ) -> Result<LeaseBatch, OutboxError> {
        let now = self.clock.at(self.time.now());
        let lane = &mut st.lanes[lane_no as usize];
        let mut items = Vec::new();
        let mut removals = Vec::new();
        // Live-first: live range first, then the backlog.
        let mut ranges = Vec::with_capacity(2);
        match lane.live {
            Some((first_live, live_cursor)) => {
                ranges.push((live_cursor.max(first_live), u64::MAX, true));
                ranges.push((lane.cursor, first_live, false));
            }
            None => ranges.push((lane.cursor, u64::MAX, false)),
        }
        'ranges: for (from, to, is_live) in ranges {
            if from >= to {
                continue;
            }
            for entry in self.data.range(key(lane_no, from)..key(lane_no, to)) {
                let (k, v) = entry?;
                let Some((_, seq)) = parse_key(&k) else { continue };
                let advance = |lane: &mut Lane| {
                    if is_live {
                        if let Some((_, c)) = &mut lane.live {
                            *c = seq + 1;
                        }
                    } else {
                        lane.cursor = seq + 1;
                    }
                };
                if lane.claims.contains_key(&seq) {
                    advance(lane);
                    continue;
                }
                let size = v.len() as u64;
                // The leased record's payload is a slice of the stored bytes.
                let v = bytes::Bytes::from(v);
                match Record::decode_shared(&v) {
                    Ok(record) if now.saturating_sub(record.enqueued_clock_ms) >= record.ttl_ms => {
                        lane.claims.insert(seq, Claim::Removing(size));
                        removals.push(Remove {
                            lane: lane_no,
                            seq,
                            size,
                            why: Removal::Expired,
                            raw: None,
                        });
                    }
                    Ok(record) => {
                        lane.claims.insert(seq, Claim::Leased(size));
                        items.push(Leased {
                            id: MessageId {
                                instance: self.instance,
                                lane: lane_no,
                                seq,
                            },
                            record,
                        });
                    }
                    Err(e) => {
                        tracing::error!(lane = lane_no, seq, "outbox: quarantining a damaged record: {e}");
                        lane.claims.insert(seq, Claim::Removing(size));
                        removals.push(Remove {
                            lane: lane_no,
                            seq,
                            size,
                            why: Removal::Damaged,
                            raw: Some(v.to_vec()),
                        });
                    }
                }
                advance(lane);
                if items.len() >= max {
                    break 'ranges;
                }
            }
        }
        if !removals.is_empty() {
            match tx {
                Some(tx) => {
                    let _ = tx.send(Request::Remove {
                        items: removals,
                        reply: None,
                    });
                }
                None => {
                    for r in removals {
                        lane.claims.remove(&r.seq);
                    }
                }
            }
        }
        Ok(LeaseBatch { lane: lane_no, items })
    }

    /// Claims up to `expire_scan_limit` expired, unclaimed records and sends
    /// them to the writer.
    fn sweep_expired(&self, tx: &mpsc::Sender<Request>) -> usize {
        let now = self.clock.at(self.time.now());
        let mut budget = self.config.expire_scan_limit;
        let mut removals = Vec::new();
        let mut st = self.lock();
        for lane_no in 0..LANES as u8 {
            let lane = &mut st.lanes[lane_no as usize];
            if lane.count == 0 || budget == 0 {
                continue;
            }
            let start = lane.sweep.max(lane.head);
            let mut reached_end = true;
            for entry in self.data.range(key(lane_no, start)..key(lane_no, u64::MAX)) {
                if budget == 0 {
                    reached_end = false;
                    break;
                }
                budget -= 1;
                let Ok((k, v)) = entry else { break };
                let Some((_, seq)) = parse_key(&k) else { continue };
                lane.sweep = seq + 1;
                if lane.claims.contains_key(&seq) {
                    continue;
                }
                if let Ok(r) = Record::decode(&v)
                    && now.saturating_sub(r.enqueued_clock_ms) >= r.ttl_ms
                {
                    lane.claims.insert(seq, Claim::Removing(v.len() as u64));
                    removals.push(Remove {
                        lane: lane_no,
                        seq,
                        size: v.len() as u64,
                        why: Removal::Expired,
                        raw: None,
                    });
                }
            }
            if reached_end {
                lane.sweep = lane.head;
            }
        }
        drop(st);
        let n = removals.len();
        if n > 0
            && tx
                .send(Request::Remove {
                    items: removals,
                    reply: None,
                })
                .is_err()
        {
            return 0;
        }
        n
    }
}

/// Where an append's result goes.
type AppendReply = tokio::sync::oneshot::Sender<Result<MessageId, AppendError>>;

/// What one commit changes, computed before it and applied after it.
struct Pending {
    appends: Vec<(u8, u64, u64, AppendReply)>,
    removes: Vec<Remove>,
    ack_replies: Vec<tokio::sync::oneshot::Sender<Result<(), StoreError>>>,
    lanes: [(u64, u64, u64); LANES],
    touched: [bool; LANES],
}

fn writer_loop(inner: &Inner, rx: mpsc::Receiver<Request>) {
    let window = Duration::from_micros(inner.config.commit_window_us);
    while let Ok(first) = rx.recv() {
        let mut reqs = vec![first];
        if !window.is_zero() {
            let deadline = std::time::Instant::now() + window;
            while reqs.len() < inner.config.max_batch {
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                match rx.recv_timeout(left) {
                    Ok(r) => reqs.push(r),
                    Err(_) => break,
                }
            }
        }
        while reqs.len() < inner.config.max_batch {
            match rx.try_recv() {
                Ok(r) => reqs.push(r),
                Err(_) => break,
            }
        }
        commit(inner, reqs);
    }
}

fn commit(inner: &Inner, reqs: Vec<Request>) {
    let mut batch = inner.store.batch();
    let mut save_clock = false;
    let mut pending = {
        let st = inner.lock();
        let p = Pending {
            appends: Vec::new(),
            removes: Vec::new(),
            ack_replies: Vec::new(),
            lanes: std::array::from_fn(|i| (st.lanes[i].next_seq, st.lanes[i].count, st.lanes[i].bytes)),
            touched: [false; LANES],
        };
        drop(st);
        p
    };
    let free = free_disk(&inner.dir);
    let mut appends = Vec::new();
    for req in reqs {
        match req {
            Request::Append { lane, value, reply } => appends.push((lane, value, reply)),
            Request::Remove { items, reply } => {
                for r in &items {
                    let l = &mut pending.lanes[r.lane as usize];
                    l.1 = l.1.saturating_sub(1);
                    l.2 = l.2.saturating_sub(r.size);
                    pending.touched[r.lane as usize] = true;
                    batch.remove(&inner.data, key(r.lane, r.seq));
                    if let Some(raw) = &r.raw {
                        batch.insert(&inner.quarantine, key(r.lane, r.seq), raw.clone());
                    }
                }
                pending.removes.extend(items);
                if let Some(reply) = reply {
                    pending.ack_replies.push(reply);
                }
            }
            Request::SaveClock => save_clock = true,
        }
    }
    let any_append = !appends.is_empty();
    // One reading of the limits for the whole batch.
    let limits = &inner.limits;
    let (max_messages, max_bytes, min_free, drop_oldest_when_full) = (
        limits.max_messages.load(Ordering::Relaxed),
        limits.max_bytes.load(Ordering::Relaxed),
        limits.min_free_disk_bytes.load(Ordering::Relaxed),
        limits.drop_oldest.load(Ordering::Relaxed),
    );
    for (lane, value, reply) in appends {
        let size = value.len() as u64;
        let c = &inner.counters[lane as usize];
        let total = |p: &Pending| p.lanes.iter().fold((0u64, 0u64), |(n, b), l| (n + l.1, b + l.2));
        if free.is_some_and(|f| f < min_free.saturating_add(size)) {
            c.rejected_disk.inc();
            let _ = reply.send(Err(AppendError::DiskFull));
            continue;
        }
        let fits = |p: &Pending| {
            let (n, b) = total(p);
            n < max_messages && b + size <= max_bytes
        };
        if !fits(&pending) && drop_oldest_when_full {
            drop_oldest(inner, &mut batch, &mut pending, &fits);
        }
        if !fits(&pending) {
            c.rejected_quota.inc();
            let (n, _) = total(&pending);
            let which = if n >= max_messages { "message count" } else { "bytes" };
            let _ = reply.send(Err(AppendError::QuotaExceeded(which)));
            continue;
        }
        let l = &mut pending.lanes[lane as usize];
        let seq = l.0;
        l.0 += 1;
        l.1 += 1;
        l.2 += size;
        pending.touched[lane as usize] = true;
        batch.insert(&inner.data, key(lane, seq), value);
        pending.appends.push((lane, seq, size, reply));
    }
    for lane in 0..LANES {
        if pending.touched[lane] {
            let (next, count, bytes) = pending.lanes[lane];
            batch.insert(
                &inner.meta,
                lane_meta_key(lane as u8),
                encode_lane_meta(next, count, bytes),
            );
        }
    }
    if save_clock {
        batch.insert(
            &inner.meta,
            b"clock".to_vec(),
            inner.clock.save(inner.time.now()).encode(),
        );
    }
    if batch.is_empty() {
        return;
    }
    let durability = if any_append {
        match inner.config.sync {
            SyncMode::Data => Durability::SyncData,
            SyncMode::All => Durability::SyncAll,
        }
    } else {
        Durability::Buffered
    };
    let result = batch.commit(durability);
    inner.metrics.outbox_commits.inc();
    let mut st = inner.lock();
    match result {
        Ok(()) => {
            for (i, lane) in st.lanes.iter_mut().enumerate() {
                (lane.next_seq, lane.count, lane.bytes) = pending.lanes[i];
            }
            for r in &pending.removes {
                let lane = &mut st.lanes[r.lane as usize];
                lane.claims.remove(&r.seq);
                if r.seq == lane.head {
                    // Advance past removed records; the next present one is at or after.
                    lane.head = r.seq + 1;
                }
                let c = &inner.counters[r.lane as usize];
                match r.why {
                    Removal::Acked => c.delivered.inc(),
                    Removal::Expired => c.expired.inc(),
                    Removal::Damaged => c.dropped_damaged.inc(),
                    Removal::Quota => c.dropped_quota.inc(),
                };
            }
            drop(st);
            for (lane, seq, _, reply) in pending.appends {
                inner.counters[lane as usize].enqueued.inc();
                let _ = reply.send(Ok(MessageId {
                    instance: inner.instance,
                    lane,
                    seq,
                }));
            }
            for reply in pending.ack_replies {
                let _ = reply.send(Ok(()));
            }
            if any_append {
                inner.work.send_modify(|n| *n += 1);
            }
        }
        Err(e) => {
            // Nothing was written: undo the claims so the records stay deliverable.
            for r in &pending.removes {
                let lane = &mut st.lanes[r.lane as usize];
                lane.claims.remove(&r.seq);
                lane.cursor = lane.cursor.min(r.seq);
            }
            drop(st);
            tracing::error!("outbox commit failed: {e}");
            for (_, _, _, reply) in pending.appends {
                let _ = reply.send(Err(AppendError::Store(e.clone())));
            }
            for reply in pending.ack_replies {
                let _ = reply.send(Err(e.clone()));
            }
        }
    }
}

/// Claims the oldest unclaimed records of the lowest-priority non-empty lane
/// for removal until `fits`, adding the removals to the batch.
fn drop_oldest(
    inner: &Inner,
    batch: &mut holdfast_store::Batch,
    pending: &mut Pending,
    fits: &dyn Fn(&Pending) -> bool,
) {
    let mut st = inner.lock();
    for lane_no in (0..LANES as u8).rev() {
        if fits(pending) {
            return;
        }
        let head = st.lanes[lane_no as usize].head;
        let victims: Vec<(u64, u64)> = {
            let lane = &st.lanes[lane_no as usize];
            let mut v = Vec::new();
            let mut trial = Pending {
                appends: Vec::new(),
                removes: Vec::new(),
                ack_replies: Vec::new(),
                lanes: pending.lanes,
                touched: pending.touched,
            };
            for entry in inner.data.range(key(lane_no, head)..key(lane_no, u64::MAX)) {
                if fits(&trial) {
                    break;
                }
                let Ok((k, val)) = entry else { break };
                let Some((_, seq)) = parse_key(&k) else { continue };
                if lane.claims.contains_key(&seq) {
                    continue;
                }
                let l = &mut trial.lanes[lane_no as usize];
                l.1 = l.1.saturating_sub(1);
                l.2 = l.2.saturating_sub(val.len() as u64);
                v.push((seq, val.len() as u64));
            }
            v
        };
        for (seq, size) in victims {
            st.lanes[lane_no as usize].claims.insert(seq, Claim::Removing(size));
            let l = &mut pending.lanes[lane_no as usize];
            l.1 = l.1.saturating_sub(1);
            l.2 = l.2.saturating_sub(size);
            pending.touched[lane_no as usize] = true;
            batch.remove(&inner.data, key(lane_no, seq));
            pending.removes.push(Remove {
                lane: lane_no,
                seq,
                size,
                why: Removal::Quota,
                raw: None,
            });
        }
    }
}
