//! Fuzzes the range cache's header parsing: `Range`, `Content-Range`, HTTP
//! dates and the conditional headers. It calls the cache crate's own
//! module.

#![no_main]

use holdfast_cache::range;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // The length of the object comes from the first 8 bytes when present.
    let length = data
        .get(..8)
        .map_or(1000, |b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])) % (1 << 40));
    if let Ok(specs) = range::parse(text) {
        assert!(!specs.is_empty() && specs.len() <= range::MAX_RANGES);
        let mut total = 0u64;
        for r in range::resolve(&specs, length) {
            assert!(r.start < r.end && r.end <= length);
            total += r.len();
            let _ = r.content_range(length);
        }
        // Coalesced: the parts of an answer never add up to more than the object.
        assert!(total <= length);
    }
    if let Some((a, b, len)) = range::parse_content_range(text) {
        assert!(a <= b && len.is_none_or(|l| b < l));
    }
    let _ = range::parse_unsatisfied(text);
    if let Some(secs) = range::parse_http_date(text) {
        assert_eq!(range::parse_http_date(&range::format_http_date(secs)), Some(secs));
    }
    if let Some(v) = range::Validator::new(Some(text), Some(text), length) {
        let _ = v.if_range_matches(text);
        let _ = v.none_match(text);
        let _ = v.not_modified_since(text);
        assert!(v.same_version(&v.clone()));
    }
});
