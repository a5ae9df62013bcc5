//! Lane state under the lock: choosing and leasing records in order, expiry sweeps.

#[allow(unused_imports)]
use super::*;

impl Inner {
    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        holdfast_model::lock(&self.state)
    }

    /// Leases from one lane with the state lock held. Expired and damaged
    /// records met on the way are claimed and handed to the writer.
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
                lane.sweep = seq + 1;
                if lane.claims.contains_key(&seq) {
                    continue;
                }
                let v = bytes::Bytes::from(v);
                if let Ok(r) = Record::decode_shared(&v)
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
