//! The writer thread: every change to the stored outbox goes through it, and
//! appends that arrive while it syncs share the next sync (group commit).
//! It owns the batch, the quotas' enforcement, the lane counters as stored
//! and the durability of each commit; the lanes learn the outcome after the
//! commit ([`Lanes::committed`]).

use std::path::{Path, PathBuf};
use std::sync::{Arc, mpsc};
use std::time::Duration;

use holdfast_store::{Batch, Durability, Space, Store, StoreError};
use prometheus_client::metrics::counter::Counter;

use crate::config::{OutboxConfig, SyncMode};
use crate::lane::{Removal, Remove};
use crate::lanes::{Lanes, Totals};
use crate::layout::{encode_lane_meta, key, lane_meta_key};
use crate::limits::{Limits, free_disk};
use crate::metrics::{LaneCounters, OutboxMetrics};
use crate::{AppendError, LANES, MessageId, OutboxTime};

/// Where an append's result goes.
pub(crate) type AppendReply = tokio::sync::oneshot::Sender<Result<MessageId, AppendError>>;

/// What the writer is asked to do.
pub(crate) enum Request {
    /// Store an encoded record at the end of `lane`.
    Append {
        lane: u8,
        value: Vec<u8>,
        reply: AppendReply,
    },
    /// Remove claimed records (acknowledged, expired, damaged).
    Remove {
        items: Vec<Remove>,
        reply: Option<tokio::sync::oneshot::Sender<Result<(), StoreError>>>,
    },
    /// Save the outbox clock.
    SaveClock,
}

/// What one commit changes, computed before it and applied after it.
struct Pending {
    appends: Vec<(u8, u64, u64, AppendReply)>,
    removes: Vec<Remove>,
    ack_replies: Vec<tokio::sync::oneshot::Sender<Result<(), StoreError>>>,
    lanes: Totals,
    touched: [bool; LANES],
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
        self.removes.push(r);
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
}

/// The store and the spaces the outbox keeps its records in.
pub(crate) struct Storage {
    pub(crate) store: Store,
    pub(crate) data: Space,
    pub(crate) meta: Space,
    pub(crate) quarantine: Space,
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
            removes: Vec::new(),
            ack_replies: Vec::new(),
            lanes: self.lanes.totals(),
            touched: [false; LANES],
        };
        let free = free_disk(&self.dir);
        let mut appends = Vec::new();
        for req in reqs {
            match req {
                Request::Append { lane, value, reply } => appends.push((lane, value, reply)),
                Request::Remove { items, reply } => {
                    for r in items {
                        pending.remove(self, &mut batch, r);
                    }
                    if let Some(reply) = reply {
                        pending.ack_replies.push(reply);
                    }
                }
                Request::SaveClock => save_clock = true,
            }
        }
        let any_append = !appends.is_empty();
        // One reading of the limits for the whole batch.
        let quota = self.limits.quota();
        for (lane, value, reply) in appends {
            let size = value.len() as u64;
            let c = &self.counters[lane as usize];
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
        if batch.is_empty() {
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
        self.commits.inc();
        match result {
            Ok(()) => {
                self.lanes.committed(&pending.lanes, &pending.removes, any_append);
                for r in &pending.removes {
                    let c = &self.counters[r.lane as usize];
                    match r.why {
                        Removal::Acked => c.delivered.inc(),
                        Removal::Expired => c.expired.inc(),
                        Removal::Damaged => c.dropped_damaged.inc(),
                        Removal::Quota => c.dropped_quota.inc(),
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
            }
            Err(e) => {
                // Nothing was written: undo the claims so the records stay deliverable.
                self.lanes.commit_failed(&pending.removes);
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
}
