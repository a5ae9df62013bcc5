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
//! - With a [`dead_letter::DeadLetters`] store ([`Outbox::open_with`]),
//!   expired records, records dropped by `drop-oldest` and records the
//!   upstream refused ([`Outbox::set_aside`]) move there in the commit that
//!   removes them; [`Outbox::dead_letter`] keeps a message that never
//!   reached a lane (the router failed).
//!
//! Each stored record is removed by exactly one path (ack, expiry, quarantine
//! or quota drop): whoever removes it first *claims* it under the state lock.
//! That keeps the persisted counters exact.
//!
//! Inside, each part owns its state: `lane` is one lane's decisions as pure
//! state (time an input), `lanes` the ten lanes under one lock and the store
//! reads that feed them, `writer` the thread that commits every change,
//! `limits` the quotas a reload changes, `layout` the keys on disk; the
//! [`Outbox`] wires them and is what callers use.

pub mod clock;
pub mod config;
pub mod dead_letter;
pub mod record;

pub use watch::LaneHealth;

mod epochs;
mod lane;
mod lanes;
mod layout;
mod limits;
mod metrics;
mod received;
mod watch;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;

use self::clock::{Clock, Now, Resumed, Saved};
use self::dead_letter::{DeadLetter, DeadLetters, Reason};
use self::epochs::Epochs;
use self::lane::Remove;
use self::lanes::Lanes;
use self::limits::Limits;
pub use self::metrics::OutboxMetrics;
pub use self::received::{FromChild, Stored};
use self::record::{EncodeError, Record};
use self::writer::{Request, Storage, Writer};
use crate::config::OutboxConfig;
use holdfast_model::Message;
use holdfast_store::{Durability, Store, StoreError};

/// Number of lanes.
pub const LANES: usize = 10;

/// The lane of the id [`Outbox::dead_letter`] answers with (its sequence
/// is the dead letter's id).
pub const DEAD_LETTER_LANE: u8 = u8::MAX;

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

/// Something holding disk space it can give up when the outbox needs it:
/// the range cache, whose content can be fetched again (the outbox's
/// cannot). The outbox has priority over it for the disk.
pub trait SpaceDonor: Send + Sync + 'static {
    /// Frees about `bytes` of disk (more or less as it can); returns how
    /// many it freed. Called from the outbox's writer thread: it may block
    /// briefly on file deletions, not on the network.
    fn give_space(&self, bytes: u64) -> u64;
}

/// The donors an outbox asks, shared with its writer.
pub(crate) type SpaceDonors = Arc<Mutex<Vec<Arc<dyn SpaceDonor>>>>;

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
    /// The epoch it was stored in (its hop id upstream is this epoch and
    /// `id.seq`, see [`holdfast_model::hop`]).
    pub epoch: u64,
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

/// The outbox clock and where it reads the time, for whoever needs a reading.
#[derive(Clone)]
pub(crate) struct OutboxTime {
    clock: Clock,
    source: Arc<dyn TimeSource>,
}

impl OutboxTime {
    /// The machine's clocks and the outbox clock (ms) now.
    fn read(&self) -> (Now, u64) {
        let now = self.source.now();
        (now, self.clock.at(now))
    }

    /// The outbox clock now, ms.
    pub(crate) fn now_ms(&self) -> u64 {
        self.read().1
    }

    /// What to save so the clock resumes correctly.
    pub(crate) fn save(&self) -> Saved {
        self.clock.save(self.source.now())
    }
}

/// The outbox: appends go to its writer thread, leases and acknowledgements
/// to its [`Lanes`], and a sweeper thread removes expired messages.
pub struct Outbox {
    lanes: Arc<Lanes>,
    epochs: Epochs,
    limits: Arc<Limits>,
    time: OutboxTime,
    store: Store,
    dir: PathBuf,
    metrics: Arc<OutboxMetrics>,
    dead: Option<Arc<DeadLetters>>,
    donors: SpaceDonors,
    /// Appends refused as invalid, per lane.
    rejected_invalid: Vec<Counter>,
    tx: Mutex<Option<mpsc::Sender<Request>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    stop_sweeper: Mutex<Option<mpsc::Sender<()>>>,
    /// The stuck-and-slow watch over the lanes ([`Outbox::watch_lanes`]).
    watch: Mutex<watch::LaneWatch>,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox").field("dir", &self.dir).finish_non_exhaustive()
    }
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
        metrics: Arc<OutboxMetrics>,
        time: Arc<dyn TimeSource>,
    ) -> Result<Outbox, OutboxError> {
        Outbox::open_with(store, dir, config, metrics, time, None)
    }

    /// [`Outbox::open`] with a dead-letter store: what expires, what
    /// `drop-oldest` removes and what the upstream refuses goes there, in
    /// the same commit that removes it from its lane. `dead` should be in
    /// the same `store`.
    ///
    /// # Errors
    /// As [`Outbox::open`].
    pub fn open_with(
        store: &Store,
        dir: &Path,
        config: OutboxConfig,
        metrics: Arc<OutboxMetrics>,
        time: Arc<dyn TimeSource>,
        dead: Option<Arc<DeadLetters>>,
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
        let time = OutboxTime {
            clock: Clock::start(base, now),
            source: time,
        };
        let lanes = Arc::new(Lanes::open(data.clone(), &meta, instance, &config)?);
        // A new epoch for what is stored from now on, durable before any append.
        let epochs = Epochs::open(&meta, lanes.heads(), &mut fresh_meta)?;
        fresh_meta.commit(Durability::SyncAll)?;
        let received = received::load(&meta)?;
        let limits = Arc::new(Limits::new(&config, store.sizing().headroom()));
        metrics.watch_store(store);
        let donors = SpaceDonors::default();
        let writer = Writer::new(
            Storage {
                store: store.clone(),
                data,
                meta,
                quarantine,
                received,
                dead: dead.clone(),
                donors: donors.clone(),
            },
            lanes.clone(),
            limits.clone(),
            time.clone(),
            dir,
            &config,
            &metrics,
        );
        let (tx, rx) = mpsc::channel();
        let writer = std::thread::Builder::new()
            .name("holdfast-outbox".into())
            .spawn(move || writer.run(rx))
            .map_err(OutboxError::Thread)?;
        let (stop_tx, stop_rx) = mpsc::channel::<()>();
        let (sweep_lanes, sweep_time, sweep_tx) = (lanes.clone(), time.clone(), tx.clone());
        let interval = Duration::from_millis(config.expire_interval_ms);
        let sweeper = std::thread::Builder::new()
            .name("holdfast-outbox-sweep".into())
            .spawn(move || {
                while let Err(mpsc::RecvTimeoutError::Timeout) = stop_rx.recv_timeout(interval) {
                    sweep(&sweep_lanes, &sweep_time, &sweep_tx);
                    if sweep_tx.send(Request::SaveClock).is_err() {
                        break;
                    }
                }
            })
            .map_err(OutboxError::Thread)?;
        let rejected_invalid = (0..LANES as u8).map(|lane| metrics.rejected_invalid(lane)).collect();
        let outbox = Outbox {
            lanes,
            epochs,
            limits,
            time,
            store: store.clone(),
            dir: dir.to_path_buf(),
            metrics,
            dead,
            donors,
            rejected_invalid,
            tx: Mutex::new(Some(tx)),
            threads: Mutex::new(vec![writer, sweeper]),
            stop_sweeper: Mutex::new(Some(stop_tx)),
            watch: Mutex::new(watch::LaneWatch::default()),
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

    /// `message` encoded as a record of `lane` stored now, with `ttl` (or
    /// the default time-to-live): what [`Outbox::submit_from`] takes.
    ///
    /// # Errors
    /// An invalid lane or message (counted).
    pub fn encode(&self, lane: u8, message: Arc<Message>, ttl: Option<Duration>) -> Result<Vec<u8>, AppendError> {
        self.prepare(lane, message, ttl)
    }

    fn prepare(&self, lane: u8, message: Arc<Message>, ttl: Option<Duration>) -> Result<Vec<u8>, AppendError> {
        if lane as usize >= LANES {
            return Err(AppendError::BadLane(lane));
        }
        let (now, clock_ms) = self.time.read();
        let record = Record {
            enqueued_clock_ms: clock_ms,
            enqueued_wall_ms: now.wall_ms,
            ttl_ms: ttl
                .map(|t| t.as_millis() as u64)
                .unwrap_or_else(|| self.limits.default_ttl_ms()),
            message,
        };
        record.encode().map_err(|e| {
            self.rejected_invalid[lane as usize].inc();
            AppendError::Invalid(e)
        })
    }

    /// Queues a batch a child gateway sent: the receiver resolves once all
    /// of it is accounted for, durable (what was stored before, by hop id,
    /// is left out and counted as a duplicate), or refused as a whole
    /// (quota, disk). The records are stored as they come: the caller has
    /// stamped them for this node (path, time-to-live).
    ///
    /// # Errors
    /// The outbox is closed.
    pub fn submit_from(
        &self,
        batch: FromChild,
    ) -> Result<tokio::sync::oneshot::Receiver<Result<Stored, AppendError>>, AppendError> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.send(Request::AppendFrom { batch, reply })?;
        Ok(rx)
    }

    /// The dead-letter store, when the outbox has one.
    pub fn dead_letters(&self) -> Option<&Arc<DeadLetters>> {
        self.dead.as_ref()
    }

    /// Keeps `message`, which never reached a lane, in the dead-letter
    /// store: the receiver resolves once it is synced (its id is the
    /// sequence of a [`DEAD_LETTER_LANE`] id). Without a store, it resolves
    /// at once and the message is gone.
    ///
    /// # Errors
    /// The outbox is closed.
    pub fn dead_letter(
        &self,
        message: Arc<Message>,
        reason: Reason,
        detail: String,
    ) -> Result<tokio::sync::oneshot::Receiver<Result<MessageId, AppendError>>, AppendError> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        let letter = DeadLetter::of_message(message, reason, detail, self.time.read().0.wall_ms);
        self.send(Request::DeadLetter { letter, reply })?;
        Ok(rx)
    }

    /// Removes leased messages the upstream will never take (refused for
    /// good, or expired before sending), moving them to the dead-letter
    /// store in the same commit, each with its reason and detail; without
    /// a store they are removed. Does not wait for the commit (buffered,
    /// as an acknowledgement is).
    pub fn set_aside(&self, items: Vec<(MessageId, Reason, String)>) {
        let mut claimed = Vec::with_capacity(items.len());
        for (id, reason, detail) in items {
            for r in self.lanes.claim_leased(&[id], lane::Removal::SetAside) {
                claimed.push((r, reason, detail.clone()));
            }
        }
        if claimed.is_empty() {
            return;
        }
        if let Err(e) = self.send(Request::SetAside { items: claimed }) {
            tracing::debug!(error = %e, "outbox: set aside after close");
        }
    }

    /// The epoch messages stored now get ([`holdfast_model::hop`]).
    pub fn epoch(&self) -> u64 {
        self.epochs.current()
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
        self.lanes.watch_work()
    }

    /// The outbox's stable instance id.
    pub fn instance(&self) -> u64 {
        self.lanes.instance()
    }

    /// The time-to-live of a message whose route sets none, ms.
    pub fn default_ttl_ms(&self) -> u64 {
        self.limits.default_ttl_ms()
    }

    /// The outbox clock now, ms.
    pub fn clock_ms(&self) -> u64 {
        self.time.now_ms()
    }

    /// The effective byte limit now: the configured one, or the outbox's
    /// share of the disk if smaller (80 % of the free space and what the
    /// outbox holds, less what the store needs beyond its data), which
    /// follows the free space at every commit.
    pub fn max_bytes(&self) -> u64 {
        let stored = self.lanes.totals().iter().map(|l| l.2).sum();
        self.limits.max_bytes(limits::free_disk(&self.dir), stored)
    }

    /// Adds a donor of disk space: when an append needs room (below
    /// `min_free_disk_bytes`, or past the disk's share of the quota), the
    /// outbox asks its donors before refusing.
    pub fn add_space_donor(&self, donor: Arc<dyn SpaceDonor>) {
        holdfast_model::lock(&self.donors).push(donor);
    }

    /// Why the store refuses writes, while it does: a write or sync failed
    /// (a full disk) and the store has not reopened yet, which it does by
    /// itself once there is room. Appends fail meanwhile; nothing stored
    /// before is lost.
    pub fn storage_failure(&self) -> Option<String> {
        self.store.failure()
    }

    /// Applies the limits a running outbox can change:
    /// `default_ttl_seconds` (for messages appended from now on),
    /// `max_messages`, `max_bytes` (the disk's share still applies),
    /// `min_free_disk_bytes` and `when_full`. A quota lowered
    /// below what is queued removes nothing by itself. With `reject-new`,
    /// appends are refused until the backlog is under it; with
    /// `drop-oldest`, the next append removes the oldest messages until the
    /// backlog fits. Returns the keys that changed.
    pub fn apply_limits(&self, new: &OutboxConfig) -> Vec<String> {
        self.limits.apply(new)
    }

    /// Per-lane figures; also refreshes the depth and age gauges.
    pub fn stats(&self) -> Vec<LaneStats> {
        let stats = self.lanes.stats(self.clock_ms());
        for (i, s) in stats.iter().enumerate() {
            self.metrics.set_depth(i as u8, s);
        }
        self.metrics.set_max_bytes(self.max_bytes());
        stats
    }

    /// Leases up to `max` messages from the lane the scheduling policy picks
    /// next; `None` when nothing is available.
    ///
    /// # Errors
    /// Storage errors.
    pub fn lease(&self, max: usize) -> Result<Option<LeaseBatch>, OutboxError> {
        let mut removed = Vec::new();
        let leased = self.lanes.lease(max, self.clock_ms(), &mut removed);
        self.remove(removed);
        leased.map(|b| b.map(|b| self.with_epochs(b)))
    }

    fn with_epochs(&self, mut batch: LeaseBatch) -> LeaseBatch {
        for item in &mut batch.items {
            item.epoch = self.epochs.of(item.id.lane, item.id.seq);
        }
        batch
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
        let mut removed = Vec::new();
        let leased = self.lanes.lease_lane(lane, max, self.clock_ms(), &mut removed);
        self.remove(removed);
        leased.map(|b| self.with_epochs(b))
    }

    /// Hands records claimed for removal (expired or damaged, met by a
    /// lease) to the writer; once it is gone, their claims are dropped.
    fn remove(&self, items: Vec<Remove>) {
        if items.is_empty() {
            return;
        }
        let tx = holdfast_model::lock(&self.tx).clone();
        let unsent = match tx {
            Some(tx) => match tx.send(Request::Remove { items, reply: None }) {
                Ok(()) => return,
                Err(mpsc::SendError(Request::Remove { items, .. })) => items,
                Err(_) => return,
            },
            None => items,
        };
        self.lanes.unclaim(&unsent);
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
        let items = self.lanes.claim_acked(ids);
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
        self.lanes.release(ids);
    }

    /// Returns every leased, unacknowledged message to its lane, to be leased
    /// again in order (call when the link drops).
    pub fn release_all(&self) {
        self.lanes.release_all();
    }

    /// Marks the start of live traffic on live-first lanes: what is queued now
    /// is backlog, delivered after anything newer (call when the link comes up).
    pub fn mark_live(&self) {
        self.lanes.mark_live();
    }

    /// Removes expired messages now (the background sweep does this every
    /// `outbox.expire_interval_ms`); returns how many were found.
    pub fn sweep_expired(&self) -> usize {
        match holdfast_model::lock(&self.tx).clone() {
            Some(tx) => sweep(&self.lanes, &self.time, &tx),
            None => 0,
        }
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
        if let Err(e) = self.store.persist(Durability::SyncAll) {
            tracing::error!("outbox: final sync failed: {e}");
        }
    }
}

impl Drop for Outbox {
    fn drop(&mut self) {
        self.close();
    }
}

/// Claims expired records and hands them to the writer; how many.
fn sweep(lanes: &Lanes, time: &OutboxTime, tx: &mpsc::Sender<Request>) -> usize {
    let removals = lanes.sweep(time.now_ms());
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
