//! The outbox's epochs, for the link's per-hop idempotence
//! ([`holdfast_model::hop`]): a random epoch is drawn at every open, and it
//! names the messages stored from then on. A message keeps the epoch it was
//! stored in for as long as it is queued, so one sent again after a restart
//! is recognised upstream; a new message never shares an (epoch, sequence)
//! with an old one, even after the data directory is restored from a backup
//! (the restored sequence numbers come back, the epoch does not).
//!
//! Stored under `epochs` in `outbox-meta`: each run's epoch and the first
//! sequence number of each lane it covers, oldest first. Runs no queued
//! message belongs to any more are forgotten at the next open.

use holdfast_store::{Batch, Space, StoreError};

use crate::LANES;

const KEY: &[u8] = b"epochs";
const RUN_LEN: usize = 8 + 8 * LANES;

/// One start of the outbox: its epoch, and from which sequence number of
/// each lane it applies.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Run {
    epoch: u64,
    starts: [u64; LANES],
}

/// The epochs of the messages queued, and the current one.
#[derive(Debug, Clone)]
pub(crate) struct Epochs {
    /// Oldest first; the last is this run's.
    runs: Vec<Run>,
}

impl Epochs {
    /// Starts a new run at `lanes` (each lane's `(first queued sequence,
    /// next sequence)`) with a fresh random epoch, keeping the runs of the
    /// messages still queued; what to store goes into `batch`, which must
    /// be committed durably before anything is appended.
    ///
    /// # Errors
    /// Storage errors.
    pub(crate) fn open(meta: &Space, lanes: [(u64, u64); LANES], batch: &mut Batch) -> Result<Epochs, StoreError> {
        let stored = meta.get(KEY)?.map(|b| decode(&b)).unwrap_or_default();
        let mut epoch = holdfast_model::random_u64();
        while stored.iter().any(|r| r.epoch == epoch) {
            epoch = holdfast_model::random_u64();
        }
        let now = Run {
            epoch,
            starts: std::array::from_fn(|l| lanes[l].1),
        };
        let epochs = Epochs::keep_needed(stored, now, &lanes);
        batch.insert(meta, KEY.to_vec(), encode(&epochs.runs));
        Ok(epochs)
    }

    /// `stored` runs still holding a queued message, then `now`.
    fn keep_needed(stored: Vec<Run>, now: Run, lanes: &[(u64, u64); LANES]) -> Epochs {
        let mut runs = Vec::with_capacity(stored.len() + 1);
        for (i, run) in stored.iter().enumerate() {
            let end = stored.get(i + 1).unwrap_or(&now);
            // Run i covers [starts, next run's starts) in each lane; the
            // queued messages of a lane are [head, next).
            let needed = (0..LANES).any(|l| {
                let (head, next) = lanes[l];
                head < next && run.starts[l] < next && end.starts[l] > head
            });
            if needed {
                runs.push(run.clone());
            }
        }
        runs.push(now);
        Epochs { runs }
    }

    /// The epoch of this run: what new messages are stored in.
    pub(crate) fn current(&self) -> u64 {
        self.runs.last().map_or(0, |r| r.epoch)
    }

    /// The epoch message `seq` of `lane` was stored in.
    pub(crate) fn of(&self, lane: u8, seq: u64) -> u64 {
        let l = usize::from(lane).min(LANES - 1);
        self.runs
            .iter()
            .rev()
            .find(|r| r.starts[l] <= seq)
            .or(self.runs.first())
            .map_or(0, |r| r.epoch)
    }
}

fn encode(runs: &[Run]) -> Vec<u8> {
    let mut out = Vec::with_capacity(runs.len() * RUN_LEN);
    for r in runs {
        out.extend_from_slice(&r.epoch.to_be_bytes());
        for s in r.starts {
            out.extend_from_slice(&s.to_be_bytes());
        }
    }
    out
}

/// The runs stored; nothing if they do not decode (every queued message
/// then gets this run's epoch: at worst one is stored twice upstream).
fn decode(b: &[u8]) -> Vec<Run> {
    if !b.len().is_multiple_of(RUN_LEN) {
        tracing::warn!("outbox: the epochs record is damaged; starting afresh");
        return Vec::new();
    }
    let u = |c: &[u8]| {
        let mut a = [0u8; 8];
        a.copy_from_slice(c);
        u64::from_be_bytes(a)
    };
    b.chunks(RUN_LEN)
        .map(|c| Run {
            epoch: u(&c[..8]),
            starts: std::array::from_fn(|l| u(&c[8 + 8 * l..16 + 8 * l])),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(epoch: u64, start: u64) -> Run {
        Run {
            epoch,
            starts: [start; LANES],
        }
    }

    fn lanes(head: u64, next: u64) -> [(u64, u64); LANES] {
        [(head, next); LANES]
    }

    #[test]
    fn a_message_keeps_the_epoch_it_was_stored_in() {
        // Runs at 0 (epoch 1), 10 (epoch 2), 20 (epoch 3): queued 5..25.
        let e = Epochs::keep_needed(vec![run(1, 0), run(2, 10)], run(3, 20), &lanes(5, 25));
        assert_eq!(e.runs.len(), 3);
        assert_eq!(
            (e.of(0, 5), e.of(0, 9), e.of(0, 10), e.of(0, 19), e.of(0, 20)),
            (1, 1, 2, 2, 3)
        );
        assert_eq!(e.current(), 3);
        assert_eq!(decode(&encode(&e.runs)), e.runs);
    }

    #[test]
    fn runs_with_nothing_queued_are_forgotten() {
        // Queued 12..25: the run of 0..10 holds nothing any more.
        let e = Epochs::keep_needed(vec![run(1, 0), run(2, 10)], run(3, 20), &lanes(12, 25));
        assert_eq!(e.runs.iter().map(|r| r.epoch).collect::<Vec<_>>(), [2, 3]);
        // Nothing queued: only the new run.
        let e = Epochs::keep_needed(vec![run(1, 0), run(2, 10)], run(3, 20), &lanes(20, 20));
        assert_eq!(e.runs.iter().map(|r| r.epoch).collect::<Vec<_>>(), [3]);
        // One lane still holds an old message: its run stays.
        let mut l = lanes(20, 20);
        l[4] = (3, 8);
        let e = Epochs::keep_needed(vec![run(1, 0), run(2, 10)], run(3, 20), &l);
        assert_eq!(e.runs.iter().map(|r| r.epoch).collect::<Vec<_>>(), [1, 3]);
        assert!(decode(&[0; 7]).is_empty());
    }
}
