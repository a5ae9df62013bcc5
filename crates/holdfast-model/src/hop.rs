//! Idempotence of one hop of the link (`holdfast-link/4`).
//!
//! Every message a node sends up carries a [`HopId`]: the epoch of the
//! sending outbox (a random number drawn at every start, so a restart, a
//! crash or a data directory restored from a backup never makes a new
//! message look like one sent before) and the message's sequence number in
//! its lane, which the outbox never reuses within an epoch. A message sent
//! again (its acknowledgement was lost to a cut, a crash, a restart) keeps
//! the id it had.
//!
//! The receiving outbox keeps, per child and lane, the highest sequence it
//! has stored of each recent epoch ([`HopMarks`]), written in the same
//! commit as the messages themselves, so no cut can separate them. A
//! message at or below its epoch's mark is a duplicate: it is acknowledged
//! and not stored again.

/// A message's identity on one hop: the sender's epoch and the message's
/// sequence number in its lane.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HopId {
    /// The sending outbox's epoch: random, new at every start.
    pub epoch: u64,
    /// The message's sequence number in its lane.
    pub seq: u64,
}

/// The highest sequence stored per epoch from one child's lane, for the
/// [`MAX_EPOCHS`] epochs seen most recently.
///
/// A child that restarts more than [`MAX_EPOCHS`] times while holding
/// unacknowledged messages of its oldest epoch could have one of them
/// stored twice: that is the only way a duplicate gets through.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HopMarks {
    /// `(epoch, highest seq)`, least recently stored first.
    epochs: Vec<(u64, u64)>,
}

/// Epochs remembered per child and lane.
pub const MAX_EPOCHS: usize = 16;

impl HopMarks {
    /// Whether a message `id` has not been stored yet.
    pub fn is_new(&self, id: HopId) -> bool {
        self.epochs
            .iter()
            .find(|(e, _)| *e == id.epoch)
            .is_none_or(|(_, highest)| id.seq > *highest)
    }

    /// Notes that `id` is stored (it must be new): its epoch becomes the
    /// most recent, and the least recent is forgotten past [`MAX_EPOCHS`].
    pub fn record(&mut self, id: HopId) {
        let highest = match self.epochs.iter().position(|(e, _)| *e == id.epoch) {
            Some(i) => self.epochs.remove(i).1.max(id.seq),
            None => id.seq,
        };
        self.epochs.push((id.epoch, highest));
        if self.epochs.len() > MAX_EPOCHS {
            self.epochs.remove(0);
        }
    }

    /// The epochs remembered, least recent first, with their highest
    /// sequence stored.
    pub fn epochs(&self) -> &[(u64, u64)] {
        &self.epochs
    }

    /// The stored form: `(epoch, highest)` pairs, big-endian u64s.
    pub fn encode(&self) -> Vec<u8> {
        self.epochs
            .iter()
            .flat_map(|(e, s)| e.to_be_bytes().into_iter().chain(s.to_be_bytes()))
            .collect()
    }

    /// Reads what [`HopMarks::encode`] wrote; `None` if it is not that.
    pub fn decode(b: &[u8]) -> Option<HopMarks> {
        if !b.len().is_multiple_of(16) || b.len() / 16 > MAX_EPOCHS {
            return None;
        }
        let u = |c: &[u8]| {
            let mut a = [0u8; 8];
            a.copy_from_slice(c);
            u64::from_be_bytes(a)
        };
        Some(HopMarks {
            epochs: b.chunks(16).map(|c| (u(&c[..8]), u(&c[8..]))).collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(epoch: u64, seq: u64) -> HopId {
        HopId { epoch, seq }
    }

    #[test]
    fn a_message_at_or_below_its_epochs_mark_is_a_duplicate() {
        let mut m = HopMarks::default();
        assert!(m.is_new(id(7, 0)));
        m.record(id(7, 0));
        m.record(id(7, 5));
        assert!(!m.is_new(id(7, 0)) && !m.is_new(id(7, 5)));
        assert!(m.is_new(id(7, 6)));
        // Another epoch (a restart, a restored backup) starts afresh, and
        // the first one is still remembered.
        assert!(m.is_new(id(9, 0)));
        m.record(id(9, 0));
        assert!(!m.is_new(id(7, 3)) && !m.is_new(id(9, 0)));
        assert_eq!(HopMarks::decode(&m.encode()), Some(m));
    }

    #[test]
    fn only_the_most_recent_epochs_are_kept() {
        let mut m = HopMarks::default();
        for e in 0..MAX_EPOCHS as u64 + 1 {
            m.record(id(e, 10));
        }
        assert_eq!(m.epochs().len(), MAX_EPOCHS);
        assert!(m.is_new(id(0, 1)), "the least recent epoch is forgotten");
        assert!(!m.is_new(id(1, 10)));
        // Storing again under an old epoch makes it the most recent.
        m.record(id(1, 11));
        m.record(id(100, 0));
        assert!(!m.is_new(id(1, 11)));
        assert!(m.is_new(id(2, 1)));
        assert_eq!(HopMarks::decode(&[0; 15]), None);
        assert_eq!(HopMarks::decode(&[]), Some(HopMarks::default()));
    }
}
