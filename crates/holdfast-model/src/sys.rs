//! What the node takes from the operating system in several places
//! (randomness), and small helpers shared by every crate.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

/// A random `u64` from the OS's random source.
pub fn random_u64() -> u64 {
    use argon2::password_hash::rand_core::{OsRng, RngCore};
    OsRng.next_u64()
}

/// Fills `buf` from the OS's random source.
///
/// # Errors
/// The random source is unavailable.
pub fn fill_random(buf: &mut [u8]) -> std::io::Result<()> {
    use argon2::password_hash::rand_core::{OsRng, RngCore};
    OsRng.try_fill_bytes(buf).map_err(std::io::Error::other)
}

/// The message of a caught panic (`&str` or `String` payloads; others are
/// "unknown panic").
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_string())
}

/// Locks `m`, ignoring poisoning: the data guarded by the node's mutexes
/// stays consistent between statements, so a panic elsewhere must not stop
/// every later user.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Stores each live limit's new value in its atomic; the keys whose value
/// changed. The broker, the outbox and the cache keep their live limits so.
pub fn store_limits(limits: &[(&'static str, &AtomicU64, u64)]) -> Vec<String> {
    limits
        .iter()
        .filter(|(_, slot, value)| slot.swap(*value, Ordering::Relaxed) != *value)
        .map(|(key, _, _)| key.to_string())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_limits_reports_only_changes() {
        let a = AtomicU64::new(1);
        let b = AtomicU64::new(2);
        assert_eq!(store_limits(&[("a", &a, 1), ("b", &b, 3)]), vec!["b".to_string()]);
        assert_eq!(b.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn lock_survives_poisoning() {
        let m = std::sync::Arc::new(Mutex::new(1));
        let m2 = m.clone();
        let _ = std::thread::spawn(move || {
            let _g = m2.lock().unwrap();
            panic!("poison");
        })
        .join();
        assert_eq!(*lock(&m), 1);
    }
}
