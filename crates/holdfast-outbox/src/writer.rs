//! The writer thread: every change to the outbox goes through it, and
//! appends that arrive while it syncs share the next sync (group commit).

#[allow(unused_imports)]
use super::*;

/// Where an append's result goes.
pub(crate) type AppendReply = tokio::sync::oneshot::Sender<Result<MessageId, AppendError>>;

/// What one commit changes, computed before it and applied after it.
struct Pending {
    appends: Vec<(u8, u64, u64, AppendReply)>,
    removes: Vec<Remove>,
    ack_replies: Vec<tokio::sync::oneshot::Sender<Result<(), StoreError>>>,
    lanes: [(u64, u64, u64); LANES],
    touched: [bool; LANES],
}

pub(crate) fn writer_loop(inner: &Inner, rx: mpsc::Receiver<Request>) {
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
