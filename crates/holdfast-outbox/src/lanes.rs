//! Lane state under the lock: choosing and leasing records in order, expiry sweeps.

#[allow(unused_imports)]
use super::*;

impl Inner {
    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        holdfast_model::lock(&self.state)
    }

    /// Leases from one lane with the state lock held. Expired and damaged
    /// records met on the way are claimed and handed to the writer. The
    /// decisions are the lane's ([`Lane::meet`]); this reads the store.
    pub(crate) fn lease_lane(
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
                    }),
                    Met::Removed(r) => removals.push(r),
                }
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
    pub(crate) fn sweep_expired(&self, tx: &mpsc::Sender<Request>) -> usize {
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
                if let Some(r) = lane.sweep_meet(lane_no, seq, &bytes::Bytes::from(v), now) {
                    removals.push(r);
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

/// What a lease scan did with one stored record.
pub(crate) enum Met {
    /// It was claimed already: passed over.
    Claimed,
    /// Leased to the caller.
    Leased(Record),
    /// Expired or damaged: claimed for removal.
    Removed(Remove),
}

/// The lane's decisions, as pure state: no store, no clock (the outbox
/// clock's reading is an input). The outbox's I/O feeds them the records it
/// reads in sequence order.
impl Lane {
    /// The ranges a lease scans, in order, each `(from, to, live)`: with
    /// live-first on, the live range first, then the backlog below it.
    pub(crate) fn lease_ranges(&self) -> Vec<(u64, u64, bool)> {
        match self.live {
            Some((first_live, live_cursor)) => vec![
                (live_cursor.max(first_live), u64::MAX, true),
                (self.cursor, first_live, false),
            ],
            None => vec![(self.cursor, u64::MAX, false)],
        }
    }

    /// A lease scan meets record `seq` (stored bytes `v`) in a `live` range
    /// or the backlog at outbox clock `now` (ms): claims it (leased, or for
    /// removal when expired or damaged) unless it is claimed already, and
    /// moves that range's cursor past it.
    pub(crate) fn meet(&mut self, lane_no: u8, seq: u64, v: &bytes::Bytes, live: bool, now: u64) -> Met {
        let met = match self.claims.entry(seq) {
            std::collections::btree_map::Entry::Occupied(_) => Met::Claimed,
            std::collections::btree_map::Entry::Vacant(slot) => {
                let size = v.len() as u64;
                match Record::decode_shared(v) {
                    Ok(record) if now.saturating_sub(record.enqueued_clock_ms) >= record.ttl_ms => {
                        slot.insert(Claim::Removing(size));
                        Met::Removed(Remove {
                            lane: lane_no,
                            seq,
                            size,
                            why: Removal::Expired,
                            raw: None,
                        })
                    }
                    Ok(record) => {
                        slot.insert(Claim::Leased(size));
                        Met::Leased(record)
                    }
                    Err(e) => {
                        tracing::error!(lane = lane_no, seq, "outbox: quarantining a damaged record: {e}");
                        slot.insert(Claim::Removing(size));
                        Met::Removed(Remove {
                            lane: lane_no,
                            seq,
                            size,
                            why: Removal::Damaged,
                            raw: Some(v.to_vec()),
                        })
                    }
                }
            }
        };
        if live {
            if let Some((_, c)) = &mut self.live {
                *c = seq + 1;
            }
        } else {
            self.cursor = seq + 1;
        }
        met
    }

    /// The expiry sweep meets record `seq` at outbox clock `now`: claims it
    /// for removal when it is unclaimed and expired.
    pub(crate) fn sweep_meet(&mut self, lane_no: u8, seq: u64, v: &bytes::Bytes, now: u64) -> Option<Remove> {
        self.sweep = seq + 1;
        if self.claims.contains_key(&seq) {
            return None;
        }
        let r = Record::decode_shared(v).ok()?;
        if now.saturating_sub(r.enqueued_clock_ms) < r.ttl_ms {
            return None;
        }
        self.claims.insert(seq, Claim::Removing(v.len() as u64));
        Some(Remove {
            lane: lane_no,
            seq,
            size: v.len() as u64,
            why: Removal::Expired,
            raw: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use holdfast_model::Message;

    /// A stored record enqueued at `at` (outbox clock, ms) with `ttl` ms.
    fn stored(at: u64, ttl: u64, text: &str) -> bytes::Bytes {
        let r = Record {
            enqueued_clock_ms: at,
            enqueued_wall_ms: 0,
            ttl_ms: ttl,
            message: Arc::new(Message::new("t", text.as_bytes().to_vec(), "d")),
        };
        bytes::Bytes::from(r.encode().unwrap())
    }

    fn lane(count: u64) -> Lane {
        Lane {
            next_seq: count,
            count,
            ..Lane::default()
        }
    }

    fn payload(m: &Met) -> Option<&[u8]> {
        match m {
            Met::Leased(r) => Some(&r.message.payload[..]),
            _ => None,
        }
    }

    #[test]
    fn leases_in_order_and_moves_the_cursor() {
        let mut l = lane(3);
        assert_eq!(l.lease_ranges(), [(0, u64::MAX, false)]);
        for seq in 0..3 {
            let m = l.meet(0, seq, &stored(0, 1000, &format!("m{seq}")), false, 10);
            assert_eq!(payload(&m), Some(format!("m{seq}").as_bytes()));
        }
        assert_eq!(l.cursor, 3);
        assert_eq!(l.claims.len(), 3);
        assert_eq!(l.available(), 0);
        // Met again (a second scan): passed over.
        assert!(matches!(l.meet(0, 1, &stored(0, 1000, "m1"), false, 10), Met::Claimed));
    }

    #[test]
    fn time_is_an_input_expiry_at_exactly_the_ttl() {
        let mut l = lane(2);
        let v = stored(100, 50, "x");
        assert!(matches!(l.meet(0, 0, &v, false, 149), Met::Leased(_)));
        match l.meet(0, 1, &stored(100, 50, "y"), false, 150) {
            Met::Removed(r) => assert_eq!((r.seq, r.why), (1, Removal::Expired)),
            _ => panic!("expired at enqueue + ttl"),
        }
        assert!(matches!(l.claims.get(&1), Some(Claim::Removing(_))));
    }

    #[test]
    fn damaged_records_are_quarantined_with_their_bytes() {
        let mut l = lane(1);
        let bad = bytes::Bytes::from_static(b"\x02not a record");
        match l.meet(4, 0, &bad, false, 0) {
            Met::Removed(r) => {
                assert_eq!((r.lane, r.why), (4, Removal::Damaged));
                assert_eq!(r.raw.as_deref(), Some(&bad[..]));
            }
            _ => panic!("a damaged record is removed"),
        }
    }

    #[test]
    fn live_first_scans_the_live_range_before_the_backlog() {
        let mut l = lane(10);
        l.live = Some((7, 7));
        assert_eq!(l.lease_ranges(), [(7, u64::MAX, true), (0, 7, false)]);
        assert!(matches!(
            l.meet(0, 7, &stored(0, 1000, "live"), true, 1),
            Met::Leased(_)
        ));
        assert_eq!((l.live, l.cursor), (Some((7, 8)), 0), "only the live cursor moved");
        assert!(matches!(
            l.meet(0, 0, &stored(0, 1000, "old"), false, 1),
            Met::Leased(_)
        ));
        assert_eq!(l.lease_ranges(), [(8, u64::MAX, true), (1, 7, false)]);
    }

    #[test]
    fn the_sweep_claims_only_unclaimed_expired_records() {
        let mut l = lane(3);
        assert!(matches!(
            l.meet(0, 0, &stored(0, 10, "leased"), false, 5),
            Met::Leased(_)
        ));
        assert!(l.sweep_meet(0, 0, &stored(0, 10, "leased"), 100).is_none(), "claimed");
        assert!(
            l.sweep_meet(0, 1, &stored(0, 1000, "young"), 100).is_none(),
            "not expired"
        );
        let r = l.sweep_meet(0, 2, &stored(0, 10, "old"), 100).expect("expired");
        assert_eq!((r.seq, r.why), (2, Removal::Expired));
        assert_eq!(l.sweep, 3);
        assert!(l.sweep_meet(0, 2, &stored(0, 10, "old"), 100).is_none(), "claimed once");
    }
}
