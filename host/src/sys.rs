//! What the node takes from the operating system in several places: the
//! wall clock and randomness.

/// Wall-clock time as milliseconds since the Unix epoch (0 if the clock is
/// before it).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

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
