//! One lane as pure state: which records are claimed, where the next lease
//! and the expiry sweep resume, and what to do with a record a scan meets.
//! No store and no clock: the outbox clock's reading is an input, and the
//! records come from [`crate::lanes::Lanes`], which reads them in sequence
//! order.

use std::collections::BTreeMap;

use crate::record::Record;

/// A stored record someone has taken: exactly one path removes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Claim {
    /// Handed to the link, awaiting ack.
    Leased(u64),
    /// Being removed by the writer; the value is the stored size.
    Removing(u64),
}

impl Claim {
    pub(crate) fn size(self) -> u64 {
        match self {
            Claim::Leased(s) | Claim::Removing(s) => s,
        }
    }
}

/// One lane's state.
#[derive(Debug, Default, Clone)]
pub(crate) struct Lane {
    /// Next sequence number to assign (writer-owned).
    pub(crate) next_seq: u64,
    /// Committed messages in the lane (writer-owned).
    pub(crate) count: u64,
    /// Committed stored bytes (writer-owned).
    pub(crate) bytes: u64,
    /// No record below this sequence exists (a scan start).
    pub(crate) head: u64,
    /// Next sequence to consider for leasing.
    pub(crate) cursor: u64,
    /// Live-first: `(first live sequence, live cursor)`. Sequences from the
    /// first live one on are delivered before the backlog below it.
    pub(crate) live: Option<(u64, u64)>,
    /// Claimed records.
    pub(crate) claims: BTreeMap<u64, Claim>,
    /// The lease call that last served this lane.
    pub(crate) last_served: u64,
    /// Where the background sweep resumes.
    pub(crate) sweep: u64,
}

/// Why the writer removes a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Removal {
    Acked,
    Expired,
    Damaged,
    Quota,
    /// Leased, then refused or found expired by the upstream sender: set
    /// aside in the dead-letter store.
    SetAside,
}

/// A claimed record the writer is to remove.
#[derive(Debug)]
pub(crate) struct Remove {
    pub(crate) lane: u8,
    pub(crate) seq: u64,
    pub(crate) size: u64,
    pub(crate) why: Removal,
    /// For damaged records: the raw bytes, kept in quarantine.
    pub(crate) raw: Option<Vec<u8>>,
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

impl Lane {
    /// Committed records nobody has claimed.
    pub(crate) fn available(&self) -> u64 {
        self.count.saturating_sub(self.claims.len() as u64)
    }

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
    use std::sync::Arc;

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
