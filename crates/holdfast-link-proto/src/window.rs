//! The send window of one lane of the QUIC link, without I/O: what has been
//! sent and not yet acknowledged, how much more may be sent, and what a
//! cumulative acknowledgement from the parent covers.
//!
//! The child sends a lane's records in order and the parent acknowledges
//! them with a running count (`ACK n`: the first `n` records of the stream
//! are stored). At most `window` records are unacknowledged at a time.

use std::collections::VecDeque;

use holdfast_model::MessageId;

/// Why an acknowledgement is refused (a protocol error: the link closes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AckError {
    /// The count went backwards.
    #[error("ack {got} is below the {through} already acknowledged")]
    Backwards {
        /// Already acknowledged.
        through: u64,
        /// Received.
        got: u64,
    },
    /// The count covers records that were never sent.
    #[error("ack {got} is beyond the {sent} records sent")]
    BeyondSent {
        /// Sent on this stream so far.
        sent: u64,
        /// Received.
        got: u64,
    },
}

/// One lane's window.
#[derive(Debug)]
pub struct LaneWindow {
    window: usize,
    inflight: VecDeque<MessageId>,
    through: u64,
}

impl LaneWindow {
    /// A window of at most `window` unacknowledged records.
    pub fn new(window: usize) -> LaneWindow {
        LaneWindow {
            window,
            inflight: VecDeque::new(),
            through: 0,
        }
    }

    /// How many more records may be sent now.
    pub fn room(&self) -> usize {
        self.window.saturating_sub(self.inflight.len())
    }

    /// Records sent, in order.
    pub fn sent(&mut self, ids: impl IntoIterator<Item = MessageId>) {
        self.inflight.extend(ids);
    }

    /// Unacknowledged records.
    pub fn in_flight(&self) -> usize {
        self.inflight.len()
    }

    /// Applies `ACK n`: the ids it newly covers, oldest first (empty for a
    /// repeated count).
    ///
    /// # Errors
    /// The count goes backwards or covers more than was sent; nothing changes.
    pub fn ack(&mut self, n: u64) -> Result<Vec<MessageId>, AckError> {
        if n < self.through {
            return Err(AckError::Backwards {
                through: self.through,
                got: n,
            });
        }
        let sent = self.through + self.inflight.len() as u64;
        if n > sent {
            return Err(AckError::BeyondSent { sent, got: n });
        }
        let k = (n - self.through) as usize;
        self.through = n;
        Ok(self.inflight.drain(..k).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(seq: u64) -> MessageId {
        MessageId {
            instance: 1,
            lane: 5,
            seq,
        }
    }

    #[test]
    fn room_shrinks_as_records_are_sent_and_grows_with_acks() {
        let mut w = LaneWindow::new(3);
        assert_eq!(w.room(), 3);
        w.sent([id(1), id(2)]);
        assert_eq!(w.room(), 1);
        w.sent([id(3)]);
        assert_eq!(w.room(), 0);
        assert_eq!(w.ack(2).unwrap(), vec![id(1), id(2)]);
        assert_eq!(w.room(), 2);
        assert_eq!(w.in_flight(), 1);
    }

    #[test]
    fn acks_are_cumulative_and_may_repeat() {
        let mut w = LaneWindow::new(10);
        w.sent((1..=5).map(id));
        assert_eq!(w.ack(1).unwrap(), vec![id(1)]);
        assert_eq!(w.ack(1).unwrap(), vec![]);
        assert_eq!(w.ack(4).unwrap(), vec![id(2), id(3), id(4)]);
        w.sent([id(6)]);
        assert_eq!(w.ack(6).unwrap(), vec![id(5), id(6)]);
        assert_eq!(w.in_flight(), 0);
    }

    #[test]
    fn a_count_backwards_or_beyond_what_was_sent_is_refused_and_changes_nothing() {
        let mut w = LaneWindow::new(10);
        w.sent((1..=3).map(id));
        assert_eq!(w.ack(4), Err(AckError::BeyondSent { sent: 3, got: 4 }));
        assert_eq!(w.in_flight(), 3);
        w.ack(2).unwrap();
        assert_eq!(w.ack(1), Err(AckError::Backwards { through: 2, got: 1 }));
        assert_eq!(w.ack(3).unwrap(), vec![id(3)]);
    }

    #[test]
    fn a_window_never_exceeds_its_size_under_any_ack_pattern() {
        // A small model check: every interleaving of sends (as much as the
        // room allows) and acks of some count keeps in-flight <= window and
        // acknowledges each id once, in order.
        for window in 1..5usize {
            for pattern in 0u32..256 {
                let mut w = LaneWindow::new(window);
                let (mut next, mut acked, mut through) = (0u64, Vec::new(), 0u64);
                for step in 0..8 {
                    if pattern >> step & 1 == 0 {
                        let n = w.room() as u64;
                        w.sent((next..next + n).map(id));
                        next += n;
                    } else {
                        let to = through + (w.in_flight() as u64).div_ceil(2);
                        acked.extend(w.ack(to).unwrap());
                        through = to;
                    }
                    assert!(w.in_flight() <= window);
                }
                assert_eq!(acked, (0..through).map(id).collect::<Vec<_>>());
            }
        }
    }
}
