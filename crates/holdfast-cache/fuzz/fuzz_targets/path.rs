//! Fuzzes the cache's request-path normaliser: whatever comes in, it must
//! not panic, and a path it accepts is absolute, has no dot segment left,
//! and normalises to itself.

#![no_main]

use holdfast_cache::path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(n) = path::normalize(text) {
        let p = n.split('?').next().unwrap_or_default();
        assert!(p.starts_with('/'));
        assert!(!p.split('/').any(|s| s == "." || s == ".."));
        assert_eq!(path::normalize(&n), Ok(n.clone()));
    }
});
