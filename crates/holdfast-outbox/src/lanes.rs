//! The ten lanes under one lock, and the reads of the store that feed them:
//! recovering them at open, leasing in order across lanes by the scheduling
//! policy, acknowledging, releasing, live-first marks, the expiry sweep and
//! the figures. Each lane's decisions are [`Lane`]'s; what must be removed
//! comes back as [`Remove`]s for the writer, which commits and then tells
//! the lanes ([`Lanes::committed`]).

use std::sync::{Mutex, MutexGuard};

use holdfast_store::{Space, StoreError};

use crate::config::{OutboxConfig, Scheduling};
use crate::lane::{Claim, Lane, Met, Removal, Remove};
use crate::layout::{decode_lane_meta, key, lane_meta_key, parse_key};
use crate::record::Record;
use crate::{LANES, LaneStats, LeaseBatch, Leased, MessageId, OutboxError};

/// Each lane's `(next sequence, count, bytes)`.
pub(crate) type Totals = [(u64, u64, u64); LANES];

struct State {
    lanes: [Lane; LANES],
    lease_calls: u64,
}

/// The lanes' state, shared by the writer and the callers that lease,
/// acknowledge and release.
pub(crate) struct Lanes {
    /// The records (read here, written by the writer).
    data: Space,
    instance: u64,
    scheduling: Scheduling,
    starvation_limit: u64,
    live_first: Vec<u8>,
    expire_scan_limit: usize,
    state: Mutex<State>,
    /// Bumped after every commit that stored messages, and when leases are
    /// released: a drainer waiting for work watches it.
    work: tokio::sync::watch::Sender<u64>,
}

impl Lanes {
    /// Recovers the lanes of outbox `instance`: counters from `meta`, and
    /// delivery resuming at the first record still present.
    ///
    /// # Errors
    /// Storage errors.
    pub(crate) fn open(data: Space, meta: &Space, instance: u64, config: &OutboxConfig) -> Result<Lanes, StoreError> {
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
        Ok(Lanes {
            data,
            instance,
            scheduling: config.scheduling,
            starvation_limit: u64::from(config.starvation_limit),
            live_first: config.live_first_lanes.clone(),
            expire_scan_limit: config.expire_scan_limit,
            state: Mutex::new(State { lanes, lease_calls: 0 }),
            work: tokio::sync::watch::channel(0).0,
        })
    }

    /// The outbox's stable instance id.
    pub(crate) fn instance(&self) -> u64 {
        self.instance
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        holdfast_model::lock(&self.state)
    }

    /// See [`crate::Outbox::watch_work`].
    pub(crate) fn watch_work(&self) -> tokio::sync::watch::Receiver<u64> {
        self.work.subscribe()
    }

    fn bump_work(&self) {
        self.work.send_modify(|n| *n += 1);
    }

    /// Leases up to `max` messages from the lane the scheduling policy picks
    /// next, at outbox clock `now`. Expired and damaged records met on the
    /// way are claimed and pushed to `removed`.
    ///
    /// # Errors
    /// Storage errors.
    pub(crate) fn lease(
        &self,
        max: usize,
        now: u64,
        removed: &mut Vec<Remove>,
    ) -> Result<Option<LeaseBatch>, OutboxError> {
        let mut st = self.lock();
        st.lease_calls += 1;
        let call = st.lease_calls;
        let waiting: Vec<usize> = (0..LANES).filter(|&l| st.lanes[l].available() > 0).collect();
        let Some(&first) = waiting.first() else {
            return Ok(None);
        };
        let pick = match self.scheduling {
            Scheduling::Strict => first,
            Scheduling::Bounded => {
                // The lane that has waited longest, if it has waited too long.
                waiting
                    .iter()
                    .copied()
                    .filter(|&l| call.saturating_sub(st.lanes[l].last_served) > self.starvation_limit)
                    .min_by_key(|&l| st.lanes[l].last_served)
                    .unwrap_or(first)
            }
        };
        for lane in std::iter::once(pick).chain(waiting.into_iter().filter(|&l| l != pick)) {
            let batch = self.lease_from(&mut st.lanes[lane], lane as u8, max, now, removed)?;
            if !batch.items.is_empty() {
                st.lanes[lane].last_served = call;
                return Ok(Some(batch));
            }
        }
        Ok(None)
    }

    /// Leases up to `max` messages from `lane_no` only (as [`Lanes::lease`]).
    ///
    /// # Errors
    /// Storage errors.
    pub(crate) fn lease_lane(
        &self,
        lane_no: u8,
        max: usize,
        now: u64,
        removed: &mut Vec<Remove>,
    ) -> Result<LeaseBatch, OutboxError> {
        let mut st = self.lock();
        self.lease_from(&mut st.lanes[lane_no as usize], lane_no, max, now, removed)
    }

    /// Leases from one lane with the state lock held. The decisions are the
    /// lane's ([`Lane::meet`]); this reads the store.
    fn lease_from(
        &self,
        lane: &mut Lane,
        lane_no: u8,
        max: usize,
        now: u64,
        removed: &mut Vec<Remove>,
    ) -> Result<LeaseBatch, OutboxError> {
        let mut items = Vec::new();
        'ranges: for (from, to, is_live) in lane.lease_ranges() {
            if from >= to {
                continue;
            }
            for entry in self.data.range(key(lane_no, from)..key(lane_no, to)) {
                let (k, v) = entry?;
                let Some((_, seq)) = parse_key(&k) else { continue };
                // The leased record's payload is a slice of the stored bytes.
                match lane.meet(lane_no, seq, &bytes::Bytes::from(v), is_live, now) {
                    Met::Claimed => {}
                    Met::Leased(record) => items.push(Leased {
                        id: MessageId {
                            instance: self.instance,
                            lane: lane_no,
                            seq,
                        },
                        record,
                        epoch: 0,
                    }),
                    Met::Removed(r) => removed.push(r),
                }
                if items.len() >= max {
                    break 'ranges;
                }
            }
        }
        Ok(LeaseBatch { lane: lane_no, items })
    }

    /// Drops the claims of removals that will not reach the writer (the
    /// outbox is closed).
    pub(crate) fn unclaim(&self, removed: &[Remove]) {
        let mut st = self.lock();
        for r in removed {
            st.lanes[r.lane as usize].claims.remove(&r.seq);
        }
    }

    /// The ids of this outbox that are in a lane.
    fn ours<'a>(&self, ids: &'a [MessageId]) -> impl Iterator<Item = &'a MessageId> + use<'a> {
        let instance = self.instance;
        ids.iter()
            .filter(move |id| id.instance == instance && (id.lane as usize) < LANES)
    }

    /// Claims the leased records among `ids` for removal as acknowledged.
    /// Unknown or already-acknowledged ids are passed over.
    pub(crate) fn claim_acked(&self, ids: &[MessageId]) -> Vec<Remove> {
        self.claim_leased(ids, Removal::Acked)
    }

    /// Claims the leased records among `ids` for removal, `why`.
    pub(crate) fn claim_leased(&self, ids: &[MessageId], why: Removal) -> Vec<Remove> {
        let mut items = Vec::with_capacity(ids.len());
        let mut st = self.lock();
        for id in self.ours(ids) {
            let lane = &mut st.lanes[id.lane as usize];
            if let Some(claim @ Claim::Leased(size)) = lane.claims.get(&id.seq).copied() {
                lane.claims.insert(id.seq, Claim::Removing(claim.size()));
                items.push(Remove {
                    lane: id.lane,
                    seq: id.seq,
                    size,
                    why,
                    raw: None,
                });
            }
        }
        items
    }

    /// See [`crate::Outbox::release`].
    pub(crate) fn release(&self, ids: &[MessageId]) {
        let mut st = self.lock();
        for id in self.ours(ids) {
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
        self.bump_work();
    }

    /// See [`crate::Outbox::release_all`].
    pub(crate) fn release_all(&self) {
        let mut st = self.lock();
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
        self.bump_work();
    }

    /// See [`crate::Outbox::mark_live`].
    pub(crate) fn mark_live(&self) {
        let mut st = self.lock();
        for (i, lane) in st.lanes.iter_mut().enumerate() {
            if self.live_first.contains(&(i as u8)) {
                // Everything queued now is backlog. The backlog cursor already
                // covers the old live range: what it has passed there is claimed.
                lane.live = Some((lane.next_seq, lane.next_seq));
            }
        }
    }

    /// Claims up to `expire_scan_limit` expired, unclaimed records at outbox
    /// clock `now`, for the writer to remove.
    pub(crate) fn sweep(&self, now: u64) -> Vec<Remove> {
        let mut budget = self.expire_scan_limit;
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
                if let Some(r) = lane.sweep_meet(lane_no, seq, &bytes::Bytes::from(v), now) {
                    removals.push(r);
                }
            }
            if reached_end {
                lane.sweep = lane.head;
            }
        }
        removals
    }

    /// Per-lane figures at outbox clock `now`.
    pub(crate) fn stats(&self, now: u64) -> Vec<LaneStats> {
        let st = self.lock();
        let mut out = Vec::with_capacity(LANES);
        for (i, lane) in st.lanes.iter().enumerate() {
            let oldest_age_ms = if lane.count == 0 {
                None
            } else {
                self.data
                    .range(key(i as u8, lane.head)..key(i as u8, u64::MAX))
                    .next()
                    .and_then(|r| r.ok())
                    .and_then(|(_, v)| Record::decode_shared(&v.into()).ok())
                    .map(|r| now.saturating_sub(r.enqueued_clock_ms))
            };
            out.push(LaneStats {
                messages: lane.count,
                bytes: lane.bytes,
                in_flight: lane.claims.values().filter(|c| matches!(c, Claim::Leased(_))).count() as u64,
                oldest_age_ms,
            });
        }
        out
    }

    /// Each lane's `(first queued sequence, next sequence)`.
    pub(crate) fn heads(&self) -> [(u64, u64); LANES] {
        let st = self.lock();
        std::array::from_fn(|i| (st.lanes[i].head.min(st.lanes[i].next_seq), st.lanes[i].next_seq))
    }

    /// Each lane's committed counters (the writer's starting point).
    pub(crate) fn totals(&self) -> Totals {
        let st = self.lock();
        std::array::from_fn(|i| (st.lanes[i].next_seq, st.lanes[i].count, st.lanes[i].bytes))
    }

    /// Claims the oldest unclaimed records of the lowest-priority non-empty
    /// lanes for removal until what `totals` has left `fits`.
    pub(crate) fn claim_oldest(&self, totals: &Totals, fits: &dyn Fn(&Totals) -> bool) -> Vec<Remove> {
        let mut totals = *totals;
        let mut st = self.lock();
        let mut claimed = Vec::new();
        for lane_no in (0..LANES as u8).rev() {
            if fits(&totals) {
                break;
            }
            let lane = &mut st.lanes[lane_no as usize];
            let mut victims = Vec::new();
            let mut trial = totals;
            for entry in self.data.range(key(lane_no, lane.head)..key(lane_no, u64::MAX)) {
                if fits(&trial) {
                    break;
                }
                let Ok((k, val)) = entry else { break };
                let Some((_, seq)) = parse_key(&k) else { continue };
                if lane.claims.contains_key(&seq) {
                    continue;
                }
                let l = &mut trial[lane_no as usize];
                l.1 = l.1.saturating_sub(1);
                l.2 = l.2.saturating_sub(val.len() as u64);
                victims.push((seq, val.len() as u64));
            }
            for (seq, size) in victims {
                lane.claims.insert(seq, Claim::Removing(size));
                let l = &mut totals[lane_no as usize];
                l.1 = l.1.saturating_sub(1);
                l.2 = l.2.saturating_sub(size);
                claimed.push(Remove {
                    lane: lane_no,
                    seq,
                    size,
                    why: Removal::Quota,
                    raw: None,
                });
            }
        }
        claimed
    }

    /// A commit succeeded: the lanes take its counters, the removed records'
    /// claims go and the heads move past them. Drainers are woken when it
    /// stored messages.
    pub(crate) fn committed(&self, totals: &Totals, removed: &[Remove], stored: bool) {
        let mut st = self.lock();
        for (i, lane) in st.lanes.iter_mut().enumerate() {
            (lane.next_seq, lane.count, lane.bytes) = totals[i];
        }
        for r in removed {
            let lane = &mut st.lanes[r.lane as usize];
            lane.claims.remove(&r.seq);
            if r.seq == lane.head {
                // Advance past removed records; the next present one is at or after.
                lane.head = r.seq + 1;
            }
        }
        drop(st);
        if stored {
            self.bump_work();
        }
    }

    /// A commit failed and wrote nothing: the removals' claims are undone so
    /// the records stay deliverable.
    pub(crate) fn commit_failed(&self, removed: &[Remove]) {
        let mut st = self.lock();
        for r in removed {
            let lane = &mut st.lanes[r.lane as usize];
            lane.claims.remove(&r.seq);
            lane.cursor = lane.cursor.min(r.seq);
        }
    }
}
