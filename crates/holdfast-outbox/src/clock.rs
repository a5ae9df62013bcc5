//! How the outbox measures a message's age.
//!
//! Age is measured on the **outbox clock**, in milliseconds. The clock only
//! moves forward and keeps running across restarts, and wall-clock jumps do
//! not move it:
//!
//! - While the node runs, it advances with `CLOCK_BOOTTIME` (monotonic, and it
//!   counts suspend). Setting the wall clock has no effect on it.
//! - Its value is saved with the boot id (`/proc/sys/kernel/random/boot_id`),
//!   the boot-time reading and the wall time. On open, if the machine has not
//!   rebooted, the clock resumes at the saved value plus the boot-time
//!   elapsed since the save, which is exact whatever the wall clock did.
//! - After a reboot boot time restarts, so the downtime is taken from the wall
//!   clock, once, and clamped at zero. A clock set back during the outage
//!   never makes messages younger. A wall clock that is wrong by hours at
//!   boot is the one case that can move ages; it is logged.
//!
//! A message records the clock value at enqueue; its age is `now - enqueue`.

use std::time::{SystemTime, UNIX_EPOCH};

/// What is saved to resume the clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Saved {
    /// Clock value at the save.
    pub clock_ms: u64,
    /// Boot id at the save (its 128 bits, from the kernel's UUID).
    pub boot_id: u128,
    /// `CLOCK_BOOTTIME` at the save, ms.
    pub boottime_ms: u64,
    /// Wall time at the save, ms since the Unix epoch.
    pub wall_ms: u64,
}

impl Saved {
    /// Encodes as 40 bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(40);
        v.extend_from_slice(&self.clock_ms.to_be_bytes());
        v.extend_from_slice(&self.boot_id.to_be_bytes());
        v.extend_from_slice(&self.boottime_ms.to_be_bytes());
        v.extend_from_slice(&self.wall_ms.to_be_bytes());
        v
    }

    /// Decodes what [`Saved::encode`] wrote.
    pub fn decode(b: &[u8]) -> Option<Saved> {
        if b.len() != 40 {
            return None;
        }
        let u64_at = |i: usize| u64::from_be_bytes(b[i..i + 8].try_into().unwrap_or([0; 8]));
        Some(Saved {
            clock_ms: u64_at(0),
            boot_id: u128::from_be_bytes(b[8..24].try_into().unwrap_or([0; 16])),
            boottime_ms: u64_at(24),
            wall_ms: u64_at(32),
        })
    }
}

/// A reading of the machine's clocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Now {
    /// Current boot id.
    pub boot_id: u128,
    /// `CLOCK_BOOTTIME`, ms.
    pub boottime_ms: u64,
    /// Wall time, ms since the Unix epoch.
    pub wall_ms: u64,
}

impl Now {
    /// Reads the machine's clocks.
    pub fn read() -> Now {
        let ts = rustix::time::clock_gettime(rustix::time::ClockId::Boottime);
        Now {
            boot_id: boot_id(),
            boottime_ms: ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000,
            wall_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
        }
    }
}

/// The kernel's boot id, or 0 when unavailable (then every open counts as a
/// reboot). It cannot change while the process runs, so it is read once.
fn boot_id() -> u128 {
    static BOOT_ID: std::sync::OnceLock<u128> = std::sync::OnceLock::new();
    *BOOT_ID.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .ok()
            .and_then(|s| u128::from_str_radix(&s.trim().replace('-', ""), 16).ok())
            .unwrap_or(0)
    })
}

/// How the clock resumed, for the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resumed {
    /// First open: the clock starts at zero.
    Fresh,
    /// Same boot: downtime measured with boot time.
    SameBoot {
        /// Downtime counted, ms.
        downtime_ms: u64,
    },
    /// After a reboot: downtime from the wall clock, clamped at zero.
    Rebooted {
        /// Downtime counted, ms.
        downtime_ms: u64,
        /// True when the wall clock was behind the saved wall time.
        wall_went_back: bool,
    },
}

/// The clock value to resume at, given what was saved and the clocks now.
pub fn resume(saved: Option<Saved>, now: Now) -> (u64, Resumed) {
    let Some(s) = saved else {
        return (0, Resumed::Fresh);
    };
    if s.boot_id != 0 && s.boot_id == now.boot_id && now.boottime_ms >= s.boottime_ms {
        let downtime_ms = now.boottime_ms - s.boottime_ms;
        (s.clock_ms + downtime_ms, Resumed::SameBoot { downtime_ms })
    } else {
        let wall_went_back = now.wall_ms < s.wall_ms;
        let downtime_ms = now.wall_ms.saturating_sub(s.wall_ms);
        (
            s.clock_ms + downtime_ms,
            Resumed::Rebooted {
                downtime_ms,
                wall_went_back,
            },
        )
    }
}

/// A running outbox clock.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    base_ms: u64,
    opened_boottime_ms: u64,
    boot_id: u128,
}

impl Clock {
    /// A clock at `base_ms` as of `now`.
    pub fn start(base_ms: u64, now: Now) -> Clock {
        Clock {
            base_ms,
            opened_boottime_ms: now.boottime_ms,
            boot_id: now.boot_id,
        }
    }

    /// The clock's value at `now`.
    pub fn at(&self, now: Now) -> u64 {
        self.base_ms + now.boottime_ms.saturating_sub(self.opened_boottime_ms)
    }

    /// The clock's value now.
    pub fn now_ms(&self) -> u64 {
        self.at(Now::read())
    }

    /// What to save so the clock resumes correctly.
    pub fn save(&self, now: Now) -> Saved {
        Saved {
            clock_ms: self.at(now),
            boot_id: self.boot_id,
            boottime_ms: now.boottime_ms,
            wall_ms: now.wall_ms,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: u64 = 3_600_000;

    fn saved() -> Saved {
        Saved {
            clock_ms: 10 * HOUR,
            boot_id: 7,
            boottime_ms: 100 * HOUR,
            wall_ms: 1_700_000_000_000,
        }
    }

    #[test]
    fn same_boot_uses_boot_time_whatever_the_wall_clock_did() {
        for wall_jump in [-(5 * HOUR as i64), 0, 5 * HOUR as i64] {
            let now = Now {
                boot_id: 7,
                boottime_ms: 100 * HOUR + 60_000,
                wall_ms: (1_700_000_000_000i64 + 60_000 + wall_jump) as u64,
            };
            assert_eq!(
                resume(Some(saved()), now),
                (10 * HOUR + 60_000, Resumed::SameBoot { downtime_ms: 60_000 })
            );
        }
    }

    #[test]
    fn after_a_reboot_the_wall_clock_counts_but_never_backwards() {
        let forward = Now {
            boot_id: 8,
            boottime_ms: 30_000,
            wall_ms: 1_700_000_000_000 + 2 * HOUR,
        };
        assert_eq!(resume(Some(saved()), forward).0, 12 * HOUR);
        let back = Now {
            boot_id: 8,
            boottime_ms: 30_000,
            wall_ms: 1_700_000_000_000 - 3 * HOUR,
        };
        assert_eq!(
            resume(Some(saved()), back),
            (
                10 * HOUR,
                Resumed::Rebooted {
                    downtime_ms: 0,
                    wall_went_back: true
                }
            )
        );
    }

    #[test]
    fn running_clock_ignores_wall_jumps_and_saves_round_trip() {
        let start = Now {
            boot_id: 7,
            boottime_ms: 1000,
            wall_ms: 5_000_000,
        };
        let c = Clock::start(42, start);
        let later = Now {
            boot_id: 7,
            boottime_ms: 3000,
            wall_ms: 1, // wall clock set back to 1970
        };
        assert_eq!(c.at(later), 2042);
        let s = c.save(later);
        assert_eq!(Saved::decode(&s.encode()), Some(s));
        assert_eq!(resume(Some(s), later).0, 2042);
        assert_eq!(Saved::decode(&[1, 2, 3]), None);
    }

    #[test]
    fn real_clocks_read() {
        let a = Now::read();
        let b = Now::read();
        assert!(b.boottime_ms >= a.boottime_ms);
    }
}
