//! A log-linear histogram of nanosecond values with a relative error below
//! 1/128 (0.8 %): exact below 128 ns, then 128 buckets per power of two.
//! Fixed size (58 KiB), mergeable, and cheap to record into, so every task
//! keeps its own and they are merged at the end.

const BITS: u32 = 7;
const SUB: usize = 1 << BITS;
const BUCKETS: usize = (64 - BITS as usize + 1) * SUB;

#[derive(Clone)]
pub struct Hist {
    counts: Vec<u64>,
    n: u64,
    max: u64,
    sum: u128,
}

impl Default for Hist {
    fn default() -> Hist {
        Hist {
            counts: vec![0; BUCKETS],
            n: 0,
            max: 0,
            sum: 0,
        }
    }
}

fn index(v: u64) -> usize {
    if v < SUB as u64 {
        return v as usize;
    }
    let e = 63 - v.leading_zeros();
    let top = (v >> (e - BITS)) as usize;
    (e - BITS + 1) as usize * SUB + (top - SUB)
}

/// The highest value that lands in bucket `idx`.
fn highest(idx: usize) -> u64 {
    if idx < SUB {
        return idx as u64;
    }
    let k = idx / SUB;
    let r = idx % SUB;
    let low = ((SUB + r) as u64) << (k - 1);
    low + ((1u64 << (k - 1)) - 1)
}

impl Hist {
    pub fn record(&mut self, v: u64) {
        self.counts[index(v)] += 1;
        self.n += 1;
        self.max = self.max.max(v);
        self.sum += u128::from(v);
    }

    pub fn merge(&mut self, other: &Hist) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.n += other.n;
        self.max = self.max.max(other.max);
        self.sum += other.sum;
    }

    pub fn len(&self) -> u64 {
        self.n
    }

    pub fn max(&self) -> u64 {
        self.max
    }

    pub fn mean(&self) -> u64 {
        if self.n == 0 {
            0
        } else {
            (self.sum / u128::from(self.n)) as u64
        }
    }

    /// The value at quantile `q` (0..=1): the top of the bucket that holds
    /// the sample of that rank, capped at the largest value recorded.
    pub fn quantile(&self, q: f64) -> u64 {
        if self.n == 0 {
            return 0;
        }
        let rank = ((q * self.n as f64).ceil() as u64).clamp(1, self.n);
        let mut seen = 0;
        for (idx, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return highest(idx).min(self.max);
            }
        }
        self.max
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_contiguous_and_tight() {
        let mut prev = 0;
        for v in (0..1_000_000u64).chain([u64::MAX / 3, u64::MAX]) {
            let i = index(v);
            assert!(i >= prev && i < BUCKETS, "{v}");
            assert!(highest(i) >= v, "{v}");
            assert!((highest(i) - v) as f64 <= v as f64 / 128.0, "{v}");
            prev = i;
        }
    }

    #[test]
    fn quantiles_of_a_uniform_range() {
        let mut h = Hist::default();
        for v in 1..=10_000u64 {
            h.record(v * 1000);
        }
        let p50 = h.quantile(0.5) as f64;
        assert!((p50 - 5_000_000.0).abs() / 5_000_000.0 < 0.01, "{p50}");
        assert_eq!(h.quantile(1.0), 10_000_000);
        assert_eq!(h.len(), 10_000);
    }
}
