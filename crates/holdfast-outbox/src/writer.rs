//! The writer thread: every change to the stored outbox goes through it, and
//! appends that arrive while it syncs share the next sync (group commit).
//! It owns the batch, the quotas' enforcement, the lane counters as stored
//! and the durability of each commit; the lanes learn the outcome after the
//! commit ([`Lanes::committed`]).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, mpsc};
use std::time::Duration;

use holdfast_store::{Batch, Durability, Space, Store, StoreError};
use prometheus_client::metrics::counter::Counter;

use crate::config::{OutboxConfig, SyncMode};
use crate::dead_letter::{DeadLetter, DeadLetters, Reason};
use crate::lane::{Removal, Remove};
use crate::lanes::{Lanes, Totals};
use crate::layout::{encode_lane_meta, key, lane_meta_key};
use crate::limits::{Limits, Quota, free_disk, free_needed};
use crate::metrics::{LaneCounters, OutboxMetrics};
use crate::received::{self, From, FromChild, Stored};
use crate::record::Record;
use crate::{AppendError, LANES, MessageId, OutboxTime, SpaceDonors};
use holdfast_model::HopMarks;

/// Where an append's result goes.
pub(crate) type AppendReply = tokio::sync::oneshot::Sender<Result<MessageId, AppendError>>;
/// Where a child batch's result goes.
pub(crate) type FromReply = tokio::sync::oneshot::Sender<Result<Stored, AppendError>>;

/// What the writer is asked to do.
pub(crate) enum Request {
    /// Store an encoded record at the end of `lane`.
    Append {
        lane: u8,
        value: Vec<u8>,
        reply: AppendReply,
    },
    /// Store what a child gateway sent, all of it or none, leaving out what
    /// was stored before (by hop id); its marks go in the same commit.
    AppendFrom { batch: FromChild, reply: FromReply },
    /// Remove claimed records (acknowledged, expired, damaged).
    Remove {
        items: Vec<Remove>,
        reply: Option<tokio::sync::oneshot::Sender<Result<(), StoreError>>>,
    },
    /// Move claimed records to the dead-letter store, each with its reason
    /// and detail, in one commit.
    SetAside { items: Vec<(Remove, Reason, String)> },
    /// Keep a message that never reached the outbox in the dead-letter
    /// store (synced before the reply).
    DeadLetter { letter: DeadLetter, reply: AppendReply },
    /// Save the outbox clock.
    SaveClock,
}

/// What one commit changes, computed before it and applied after it.
struct Pending {
    appends: Vec<(u8, u64, u64, AppendReply)>,
    /// Child batches stored: their replies, and the marks to keep once
    /// the commit is durable.
    from: Vec<(FromReply, Stored, u8)>,
    marks: HashMap<From, HopMarks>,
    removes: Vec<Remove>,
    ack_replies: Vec<tokio::sync::oneshot::Sender<Result<(), StoreError>>>,
    lanes: Totals,
    touched: [bool; LANES],
    /// What goes to the dead-letter store in this commit.
    dead: Vec<DeadLetter>,
    /// Replies to [`Request::DeadLetter`], with the index of the letter.
    dead_replies: Vec<(usize, AppendReply)>,
}

impl Pending {
    /// Messages and bytes stored across lanes.
    fn total(&self) -> (u64, u64) {
        self.lanes.iter().fold((0u64, 0u64), |(n, b), l| (n + l.1, b + l.2))
    }

    /// Takes a removal off its lane's counters and into the batch.
    fn remove(&mut self, writer: &Writer, batch: &mut Batch, r: Remove) {
        let l = &mut self.lanes[r.lane as usize];
        l.1 = l.1.saturating_sub(1);
        l.2 = l.2.saturating_sub(r.size);
        self.touched[r.lane as usize] = true;
        batch.remove(&writer.data, key(r.lane, r.seq));
        if let Some(raw) = &r.raw {
            batch.insert(&writer.quarantine, key(r.lane, r.seq), raw.clone());
        }
        let aside = match r.why {
            Removal::Expired => Some((Reason::Expired, "expired".to_string())),
            Removal::Quota => Some((Reason::Quota, "outbox full (drop-oldest)".to_string())),
            _ => None,
        };
        if let Some((reason, detail)) = aside {
            self.set_aside(writer, &r, reason, detail);
        }
        self.removes.push(r);
    }

    /// The stored record `r` goes to the dead-letter store in this commit
    /// (when the outbox has one).
    fn set_aside(&mut self, writer: &Writer, r: &Remove, reason: Reason, detail: String) {
        if writer.dead.is_none() {
            return;
        }
        let record = match writer.data.get(&key(r.lane, r.seq)) {
            Ok(Some(v)) => Record::decode(&v),
            Ok(None) => return,
            Err(e) => {
                tracing::error!(
                    lane = r.lane,
                    seq = r.seq,
                    "outbox: cannot read a record to dead-letter: {e}"
                );
                return;
            }
        };
        match record {
            Ok(record) => self.dead.push(DeadLetter {
                reason,
                detail,
                lane: Some(r.lane),
                at_ms: writer.time.read().0.wall_ms,
                record,
            }),
            Err(e) => tracing::error!(
                lane = r.lane,
                seq = r.seq,
                "outbox: a record to dead-letter is damaged: {e}"
            ),
        }
    }
}

/// The writer and everything it writes with.
pub(crate) struct Writer {
    store: Store,
    data: Space,
    meta: Space,
    quarantine: Space,
    lanes: Arc<Lanes>,
    limits: Arc<Limits>,
    time: OutboxTime,
    /// Where the free disk space is measured.
    dir: PathBuf,
    instance: u64,
    commit_window: Duration,
    max_batch: usize,
    sync: SyncMode,
    counters: Vec<LaneCounters>,
    commits: Counter,
    /// What was stored from each child's lanes (durable with the records).
    received: std::cell::RefCell<HashMap<From, HopMarks>>,
    /// Where expired, dropped and refused records go, if anywhere.
    dead: Option<Arc<DeadLetters>>,
    /// Who gives disk space back when an append needs it (the range cache).
    donors: SpaceDonors,
    /// Bytes removed since the outbox's space was last compacted.
    removed_since_compact: std::cell::Cell<u64>,
    /// Bytes the donors gave.
    space_given: Counter,
}

/// The store and the spaces the outbox keeps its records in.
pub(crate) struct Storage {
    pub(crate) store: Store,
    pub(crate) data: Space,
    pub(crate) meta: Space,
    pub(crate) quarantine: Space,
    /// What was stored from each child's lanes, as loaded.
    pub(crate) received: HashMap<From, HopMarks>,
    /// The dead-letter store, written in the outbox's commits.
    pub(crate) dead: Option<Arc<DeadLetters>>,
    /// Who gives disk space back when an append needs it.
    pub(crate) donors: SpaceDonors,
}

impl Writer {
    /// A writer of the records in `storage`, whose state is `lanes`; the
    /// free space is measured under `dir`.
    pub(crate) fn new(
        storage: Storage,
        lanes: Arc<Lanes>,
        limits: Arc<Limits>,
        time: OutboxTime,
        dir: &Path,
        config: &OutboxConfig,
        metrics: &OutboxMetrics,
    ) -> Writer {
        Writer {
            store: storage.store,
            data: storage.data,
            meta: storage.meta,
            quarantine: storage.quarantine,
            instance: lanes.instance(),
            lanes,
            limits,
            time,
            dir: dir.to_path_buf(),
            commit_window: Duration::from_micros(config.commit_window_us),
            max_batch: config.max_batch,
            sync: config.sync,
            counters: (0..LANES as u8).map(|l| metrics.lane(l)).collect(),
            commits: metrics.commits(),
            received: std::cell::RefCell::new(storage.received),
            dead: storage.dead,
            donors: storage.donors,
            removed_since_compact: std::cell::Cell::new(0),
            space_given: metrics.space_given(),
        }
    }

    /// Commits what `rx` brings, in batches, until every sender is gone.
    pub(crate) fn run(self, rx: mpsc::Receiver<Request>) {
        while let Ok(first) = rx.recv() {
            let mut reqs = vec![first];
            if !self.commit_window.is_zero() {
                let deadline = std::time::Instant::now() + self.commit_window;
                while reqs.len() < self.max_batch {
                    let left = deadline.saturating_duration_since(std::time::Instant::now());
                    match rx.recv_timeout(left) {
                        Ok(r) => reqs.push(r),
                        Err(_) => break,
                    }
                }
            }
            while reqs.len() < self.max_batch {
                match rx.try_recv() {
                    Ok(r) => reqs.push(r),
                    Err(_) => break,
                }
            }
            self.commit(reqs);
        }
    }

    fn commit(&self, reqs: Vec<Request>) {
        let mut batch = self.store.batch();
        let mut save_clock = false;
        let mut pending = Pending {
            appends: Vec::new(),
            from: Vec::new(),
            marks: HashMap::new(),
            removes: Vec::new(),
            ack_replies: Vec::new(),
            lanes: self.lanes.totals(),
            touched: [false; LANES],
            dead: Vec::new(),
            dead_replies: Vec::new(),
        };
        let mut free = free_disk(&self.dir);
        let mut appends = Vec::new();
        let mut from = Vec::new();
        for req in reqs {
            match req {
                Request::Append { lane, value, reply } => appends.push((lane, value, reply)),
                Request::AppendFrom { batch, reply } => from.push((batch, reply)),
                Request::Remove { items, reply } => {
                    for r in items {
                        pending.remove(self, &mut batch, r);
                    }
                    if let Some(reply) = reply {
                        pending.ack_replies.push(reply);
                    }
                }
                Request::SetAside { items } => {
                    for (r, reason, detail) in items {
                        pending.set_aside(self, &r, reason, detail);
                        pending.remove(self, &mut batch, r);
                    }
                }
                Request::DeadLetter { letter, reply } => {
                    pending.dead_replies.push((pending.dead.len(), reply));
                    pending.dead.push(letter);
                }
                Request::SaveClock => save_clock = true,
            }
        }
        // A publisher is acknowledged after its dead letter is synced.
        let any_append = !appends.is_empty() || !from.is_empty() || !pending.dead_replies.is_empty();
        // One reading of the limits for the whole batch (again after space
        // was given back).
        let stored_at_start = pending.total().1;
        let mut quota = self.limits.quota(free, stored_at_start);
        for (child_batch, reply) in from {
            let size: u64 = child_batch.records.iter().map(|(_, v)| v.len() as u64).sum();
            self.make_room(&mut free, &mut quota, stored_at_start, pending.total().1 + size);
            self.append_from(&mut pending, &mut batch, free, &quota, child_batch, reply);
        }
        for (lane, value, reply) in appends {
            let size = value.len() as u64;
            let c = &self.counters[lane as usize];
            self.make_room(&mut free, &mut quota, stored_at_start, pending.total().1 + size);
            if free.is_some_and(|f| f < quota.min_free_disk_bytes.saturating_add(size)) {
                c.rejected_disk.inc();
                let _ = reply.send(Err(AppendError::DiskFull));
                continue;
            }
            let fits = |lanes: &Totals| {
                let (n, b) = lanes.iter().fold((0u64, 0u64), |(n, b), l| (n + l.1, b + l.2));
                n < quota.max_messages && b + size <= quota.max_bytes
            };
            if !fits(&pending.lanes) && quota.drop_oldest {
                for r in self.lanes.claim_oldest(&pending.lanes, &fits) {
                    pending.remove(self, &mut batch, r);
                }
            }
            if !fits(&pending.lanes) {
                c.rejected_quota.inc();
                let (n, _) = pending.total();
                let which = if n >= quota.max_messages {
                    "message count"
                } else {
                    "bytes"
                };
                let _ = reply.send(Err(AppendError::QuotaExceeded(which)));
                continue;
            }
            let l = &mut pending.lanes[lane as usize];
            let seq = l.0;
            l.0 += 1;
            l.1 += 1;
            l.2 += size;
            pending.touched[lane as usize] = true;
            batch.insert(&self.data, key(lane, seq), value);
            pending.appends.push((lane, seq, size, reply));
        }
        for lane in 0..LANES {
            if pending.touched[lane] {
                let (next, count, bytes) = pending.lanes[lane];
                batch.insert(
                    &self.meta,
                    lane_meta_key(lane as u8),
                    encode_lane_meta(next, count, bytes),
                );
            }
        }
        if save_clock {
            batch.insert(&self.meta, b"clock".to_vec(), self.time.save().encode());
        }
        // The dead letters go in the same commit as the removals that made
        // them; the store stays locked until it is done.
        let staged = match &self.dead {
            Some(dl) if !pending.dead.is_empty() => Some(dl.stage(&mut batch, std::mem::take(&mut pending.dead))),
            _ => None,
        };
        let dead_ids = staged.as_ref().map(|s| s.ids.clone()).unwrap_or_default();
        if batch.is_empty() {
            // Nothing to write: child batches here were all stored before.
            for (reply, stored, lane) in pending.from {
                self.counters[lane as usize].duplicates.inc_by(stored.duplicates);
                let _ = reply.send(Ok(stored));
            }
            // No dead-letter store: the message was dropped (and counted by the caller).
            for (_, reply) in pending.dead_replies {
                let _ = reply.send(Ok(MessageId {
                    instance: self.instance,
                    lane: crate::DEAD_LETTER_LANE,
                    seq: 0,
                }));
            }
            return;
        }
        let durability = if any_append {
            match self.sync {
                SyncMode::Data => Durability::SyncData,
                SyncMode::All => Durability::SyncAll,
            }
        } else {
            Durability::Buffered
        };
        let result = batch.commit(durability);
        if let Some(staged) = staged {
            staged.done(result.is_ok());
        }
        self.commits.inc();
        match result {
            Ok(()) => {
                self.lanes.committed(&pending.lanes, &pending.removes, any_append);
                self.compact_when_drained(&pending);
                for r in &pending.removes {
                    let c = &self.counters[r.lane as usize];
                    match r.why {
                        Removal::Acked => c.delivered.inc(),
                        Removal::Expired => c.expired.inc(),
                        Removal::Damaged => c.dropped_damaged.inc(),
                        Removal::Quota => c.dropped_quota.inc(),
                        Removal::SetAside => 0,
                    };
                }
                for (lane, seq, _, reply) in pending.appends {
                    self.counters[lane as usize].enqueued.inc();
                    let _ = reply.send(Ok(MessageId {
                        instance: self.instance,
                        lane,
                        seq,
                    }));
                }
                for reply in pending.ack_replies {
                    let _ = reply.send(Ok(()));
                }
                for (i, reply) in pending.dead_replies {
                    // Not kept (no store, or larger than its quota): counted there.
                    let seq = dead_ids.get(i).copied().flatten().unwrap_or(0);
                    let _ = reply.send(Ok(MessageId {
                        instance: self.instance,
                        lane: crate::DEAD_LETTER_LANE,
                        seq,
                    }));
                }
                self.received.borrow_mut().extend(pending.marks);
                for (reply, stored, lane) in pending.from {
                    let c = &self.counters[lane as usize];
                    c.enqueued.inc_by(stored.stored);
                    c.duplicates.inc_by(stored.duplicates);
                    let _ = reply.send(Ok(stored));
                }
            }
            Err(e) => {
                // Nothing was written: undo the claims so the records stay deliverable.
                self.lanes.commit_failed(&pending.removes);
                if self.store.failure().is_some() {
                    // The store said so once, and reopens by itself.
                    tracing::debug!("outbox commit failed: {e}");
                } else {
                    tracing::error!("outbox commit failed: {e}");
                }
                for (_, _, _, reply) in pending.appends {
                    let _ = reply.send(Err(AppendError::Store(e.clone())));
                }
                for reply in pending.ack_replies {
                    let _ = reply.send(Err(e.clone()));
                }
                for (_, reply) in pending.dead_replies {
                    let _ = reply.send(Err(AppendError::Store(e.clone())));
                }
                for (reply, _, _) in pending.from {
                    let _ = reply.send(Err(AppendError::Store(e.clone())));
                }
            }
        }
    }

    /// Before an append of `size` bytes that would leave the disk below
    /// `min_free_disk_bytes` or pass the disk's share of the byte quota
    /// (but not `max_bytes`), asks the donors (the range cache, whose
    /// content can be fetched again) for the space; re-reads the free
    /// space and the quota if they gave some. `total` is what the outbox
    /// would hold with the append.
    fn make_room(&self, free: &mut Option<u64>, quota: &mut Quota, stored_at_start: u64, total: u64) {
        let Some(f) = *free else {
            return;
        };
        let size = total.saturating_sub(stored_at_start);
        let floor = quota.min_free_disk_bytes.saturating_add(size).saturating_sub(f);
        let share = if total > quota.max_bytes && total <= self.limits.configured_max_bytes() {
            free_needed(stored_at_start, size, self.limits.headroom()).saturating_sub(f)
        } else {
            0
        };
        let need = floor.max(share);
        if need == 0 {
            return;
        }
        let donors = holdfast_model::lock(&self.donors).clone();
        let mut given = 0;
        for donor in donors {
            if given >= need {
                break;
            }
            given += donor.give_space(need - given);
        }
        if given > 0 {
            self.space_given.inc_by(given);
            tracing::debug!(need, given, "outbox: space given back for an append");
            *free = free_disk(&self.dir);
            *quota = self.limits.quota(*free, stored_at_start);
        }
    }

    /// After a commit that left the outbox empty, with enough removed since
    /// the last time, compacts its space so what the drained messages took
    /// goes back to the file system (a small disk needs it back).
    fn compact_when_drained(&self, pending: &Pending) {
        let removed: u64 = pending.removes.iter().map(|r| r.size).sum();
        let since = self.removed_since_compact.get() + removed;
        self.removed_since_compact.set(since);
        let (n, _) = pending.total();
        if n == 0 && since > 0 && since >= self.store.sizing().table_bytes {
            self.removed_since_compact.set(0);
            self.store.compact_later(&self.data);
        }
    }

    /// A child's batch into this commit: the records not stored before
    /// (by hop id, against the marks as they will be after this commit),
    /// all of them or, when they do not fit the disk or the quota, none.
    fn append_from(
        &self,
        pending: &mut Pending,
        batch: &mut Batch,
        free: Option<u64>,
        quota: &Quota,
        child_batch: FromChild,
        reply: FromReply,
    ) {
        let FromChild { child, lane, records } = child_batch;
        if lane as usize >= LANES {
            let _ = reply.send(Err(AppendError::BadLane(lane)));
            return;
        }
        let from: From = (child, lane);
        let mut marks = match pending.marks.get(&from) {
            Some(m) => m.clone(),
            None => self.received.borrow().get(&from).cloned().unwrap_or_default(),
        };
        let any_ids = records.iter().any(|(id, _)| id.is_some());
        let mut fresh = Vec::with_capacity(records.len());
        let mut outcome = Stored::default();
        for (id, value) in records {
            if let Some(id) = id {
                if !marks.is_new(id) {
                    outcome.duplicates += 1;
                    continue;
                }
                marks.record(id);
            }
            fresh.push(value);
        }
        let c = &self.counters[lane as usize];
        let size: u64 = fresh.iter().map(|v| v.len() as u64).sum();
        let k = fresh.len() as u64;
        if k > 0 && free.is_some_and(|f| f < quota.min_free_disk_bytes.saturating_add(size)) {
            c.rejected_disk.inc_by(k);
            let _ = reply.send(Err(AppendError::DiskFull));
            return;
        }
        let fits = |lanes: &Totals| {
            let (n, b) = lanes.iter().fold((0u64, 0u64), |(n, b), l| (n + l.1, b + l.2));
            n + k <= quota.max_messages && b + size <= quota.max_bytes
        };
        if k > 0 && !fits(&pending.lanes) && quota.drop_oldest {
            for r in self.lanes.claim_oldest(&pending.lanes, &fits) {
                pending.remove(self, batch, r);
            }
        }
        if k > 0 && !fits(&pending.lanes) {
            c.rejected_quota.inc_by(k);
            let (n, _) = pending.total();
            let which = if n + k > quota.max_messages {
                "message count"
            } else {
                "bytes"
            };
            let _ = reply.send(Err(AppendError::QuotaExceeded(which)));
            return;
        }
        let l = &mut pending.lanes[lane as usize];
        for value in fresh {
            let seq = l.0;
            l.0 += 1;
            l.1 += 1;
            l.2 += value.len() as u64;
            batch.insert(&self.data, key(lane, seq), value);
        }
        outcome.stored = k;
        if k > 0 {
            pending.touched[lane as usize] = true;
        }
        if any_ids && k > 0 {
            batch.insert(&self.meta, received::key(&from), marks.encode());
            pending.marks.insert(from, marks);
        }
        pending.from.push((reply, outcome, lane));
    }
}
