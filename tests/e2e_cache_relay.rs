//! Issue 32, items 3 and 5: what the cache relays and how it ages what it
//! stores. A real `holdfast` process in front of a scripted origin, curl as
//! the client. One test per rule of docs/cache.md, "RFC 9111, rule by rule".
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test or benchmark: a panic is its failure

mod support;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use holdfast_cache::range::{format_http_date, parse_http_date};
use support::curl::{Got, curl_host, data};
use support::script_origin::{Reply, ScriptOrigin, Seen, ranged};
use support::{Gateway, free_port};

const HOST: &str = "site.test";

/// A node whose cache serves `HOST` from `origin` as a reverse proxy.
fn node(origin: &ScriptOrigin) -> Gateway {
    let port = free_port();
    let mut gw = Gateway::start_named(
        "relay",
        &format!(
            "[cache]\nlisten = \"127.0.0.1:{port}\"\nblock_size = 65536\n{}",
            origin.source(HOST, "")
        ),
    );
    gw.cache = port;
    gw
}

fn get(gw: &Gateway, path: &str) -> Got {
    curl_host(gw.cache, HOST, path, &[])
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// Requests the origin received for `path` with `method`.
fn count(origin: &ScriptOrigin, method: &str, path: &str) -> usize {
    origin
        .seen()
        .iter()
        .filter(|s| s.method == method && s.path == path)
        .count()
}

/// An object with ETag `"v"` and `fields`: a 304 (with `fields`) to a
/// matching If-None-Match, else its bytes.
fn object(s: &Seen, fields: &[(&str, &str)]) -> Reply {
    let mut all: Vec<(&str, &str)> = vec![("etag", "\"v\"")];
    all.extend_from_slice(fields);
    if s.header("if-none-match") == Some("\"v\"") {
        return Reply::new(304, &all, b"");
    }
    ranged(s, b"content", &all)
}

/// Item 3: a 203, 204, 3xx, 4xx or 5xx answered through the cache lost
/// `Last-Modified`, `ETag`, `Age` and `Accept-Ranges` (and a body over 64 KiB
/// was cut there). Every relayed answer, stored or not, now carries every
/// end-to-end field of the origin's, and none of the hop-by-hop ones.
#[test]
fn relayed_answers_keep_every_end_to_end_field_and_drop_hop_by_hop_ones() {
    let big = data(32, 100_000);
    let b = big.clone();
    let origin = ScriptOrigin::start(move |s| {
        let mut parts = s.path.trim_start_matches('/').split('/');
        let status: u16 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(200);
        let shape = parts.next().unwrap_or("");
        let mut fields = vec![
            ("last-modified", "Sun, 06 Nov 1994 08:49:37 GMT"),
            ("etag", "\"origin-tag\""),
            ("age", "3"),
            ("accept-ranges", "none"),
            ("content-type", "text/x-origin"),
            ("content-language", "de"),
            ("location", "/elsewhere"),
            ("www-authenticate", "Basic realm=\"o\""),
            ("x-origin", "yes"),
            // Hop-by-hop: never relayed.
            ("connection", "x-hop"),
            ("x-hop", "for this hop only"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("proxy-authenticate", "Basic realm=\"proxy\""),
            ("upgrade", "h2c"),
        ];
        let body: &[u8] = match (status, shape) {
            (204 | 304, _) => b"",
            (_, "big") => &b,
            _ => b"the origin's body",
        };
        if shape == "chunked" {
            fields.push(("transfer-encoding", "chunked"));
        }
        Reply::new(status, &fields, body)
    });
    let gw = node(&origin);
    let mut paths: Vec<String> = [
        203, 204, 300, 301, 302, 303, 307, 308, 400, 401, 403, 404, 405, 410, 451, 500, 501, 502, 503,
    ]
    .iter()
    .map(|s| format!("/{s}"))
    .collect();
    paths.extend(["/404/big", "/500/chunked", "/410/chunked"].map(String::from));
    for path in &paths {
        let status: u16 = path[1..4].parse().unwrap();
        // Twice: whether the second is served from storage or not.
        for round in 0..2 {
            let g = get(&gw, path);
            let what = format!("{path} (request {round})");
            assert_eq!(g.status, status, "{what}: {}", gw.describe());
            let body: &[u8] = match (status, path.ends_with("/big")) {
                (204, _) => b"",
                (_, true) => &big,
                _ => b"the origin's body",
            };
            assert!(
                g.body == body,
                "{what}: the origin's body, whole ({} bytes)",
                g.body.len()
            );
            for (k, v) in [
                ("last-modified", "Sun, 06 Nov 1994 08:49:37 GMT"),
                ("etag", "\"origin-tag\""),
                ("content-type", "text/x-origin"),
                ("content-language", "de"),
                ("location", "/elsewhere"),
                ("www-authenticate", "Basic realm=\"o\""),
                ("x-origin", "yes"),
            ] {
                assert_eq!(g.header(k), Some(v), "{what}: {k} relayed: {:?}", g.headers);
            }
            assert!(g.header("age").is_some(), "{what}: Age relayed");
            for gone in [
                "x-hop",
                "keep-alive",
                "proxy-connection",
                "proxy-authenticate",
                "upgrade",
            ] {
                assert!(g.header(gone).is_none(), "{what}: {gone} relayed: {:?}", g.headers);
            }
            assert!(
                !g.header("connection").unwrap_or("").contains("x-hop"),
                "{what}: the origin's Connection relayed"
            );
        }
    }
}

/// Item 5: `Age` as RFC 9111 §5.1 reads it: the first member of a list or
/// of repeated fields; a value that is not a non-negative integer is
/// ignored; one too large counts as 2^31. Before, `+7200` counted as 7200,
/// `7200, 1` and an overflowing value as 0.
#[test]
fn age_is_read_as_rfc_9111_says() {
    let origin = ScriptOrigin::start(|s| {
        let age: Vec<&str> = match s.path.as_str() {
            "/negative" => vec!["-7200"],
            "/fraction" => vec!["7200.5"],
            "/text" => vec!["an hour"],
            "/plus" => vec!["+7200"],
            "/list-young" => vec!["1, 7200"],
            "/repeated-young" => vec!["1", "7200"],
            "/list-old" => vec!["7200, 1"],
            "/repeated-old" => vec!["7200", "1"],
            "/overflow" => vec!["99999999999999999999999"],
            "/old" => vec!["7200"],
            _ => vec![],
        };
        let mut fields = vec![("cache-control", "max-age=3600")];
        fields.extend(age.into_iter().map(|a| ("age", a)));
        object(s, &fields)
    });
    let gw = node(&origin);
    let fresh = [
        "/negative",
        "/fraction",
        "/text",
        "/plus",
        "/list-young",
        "/repeated-young",
    ];
    let stale = ["/list-old", "/repeated-old", "/overflow", "/old"];
    for path in fresh.iter().chain(&stale) {
        for _ in 0..2 {
            let g = get(&gw, path);
            assert_eq!((g.status, g.body.as_slice()), (200, &b"content"[..]), "{path}");
        }
        assert_eq!(count(&origin, "GET", path), 1, "{path}: stored, one fetch");
    }
    for path in fresh {
        assert_eq!(count(&origin, "HEAD", path), 0, "{path}: fresh, not revalidated");
        let age: u64 = get(&gw, path).header("age").unwrap().parse().unwrap();
        assert!(age < 3600, "{path}: Age {age}");
    }
    for path in stale {
        assert_eq!(count(&origin, "HEAD", path), 1, "{path}: stale, revalidated");
    }
}

/// Item 5: a response without a valid `Date` is stored with the time it
/// was received (RFC 9110 §6.6.1), so a hit later says when it was made,
/// not when it was served; a 304 without `Date` counts its age from when it
/// came, not from the stored response's old `Date`; `Expires` in an
/// obsolete date format is read.
#[test]
fn date_missing_invalid_or_obsolete() {
    let origin = ScriptOrigin::start(|s| {
        let t = now();
        let (old, soon) = (format_http_date(t as i64 - 1000), format_http_date(t as i64 + 600));
        match s.path.as_str() {
            "/no-date" => object(s, &[("cache-control", "max-age=600")]),
            "/bad-date" => object(s, &[("cache-control", "max-age=600"), ("date", "yesterday")]),
            // 1000 s old when it arrives: stale at once; its 304s say
            // max-age=600 and bring no Date.
            "/old-then-304" if s.header("if-none-match") == Some("\"v\"") => {
                Reply::new(304, &[("etag", "\"v\""), ("cache-control", "max-age=600")], b"")
            }
            "/old-then-304" => object(s, &[("cache-control", "max-age=600"), ("date", &old)]),
            "/expires-rfc850" => object(s, &[("date", &format_http_date(t as i64)), ("expires", &rfc850(&soon))]),
            "/expires-asctime" => object(
                s,
                &[("date", &format_http_date(t as i64)), ("expires", &asctime(&soon))],
            ),
            _ => Reply::new(404, &[], b""),
        }
    });
    let gw = node(&origin);
    let miss = get(&gw, "/no-date");
    let bad = get(&gw, "/bad-date");
    // Let the clock pass a second boundary or two.
    std::thread::sleep(Duration::from_millis(2100));
    let hit = get(&gw, "/no-date");
    assert_eq!(count(&origin, "GET", "/no-date"), 1);
    assert_eq!(
        hit.header("date"),
        miss.header("date"),
        "the hit carries the Date recorded when the response came"
    );
    let age: u64 = hit.header("age").unwrap().parse().unwrap();
    assert!(age >= 2, "and its Age counts the time since: {age}");
    let bad_hit = get(&gw, "/bad-date");
    assert_eq!(count(&origin, "GET", "/bad-date"), 1);
    for g in [&bad, &bad_hit] {
        let date = g.header("date").unwrap();
        assert!(parse_http_date(date).is_some(), "an invalid Date is replaced: {date:?}");
    }
    for _ in 0..3 {
        assert_eq!(get(&gw, "/old-then-304").status, 200);
    }
    assert_eq!(
        count(&origin, "HEAD", "/old-then-304"),
        1,
        "revalidated once: the 304 made it fresh for 600 s from when it came"
    );
    for path in ["/expires-rfc850", "/expires-asctime"] {
        for _ in 0..2 {
            assert_eq!(get(&gw, path).status, 200, "{path}");
        }
        assert_eq!(count(&origin, "HEAD", path), 0, "{path}: fresh until its Expires");
    }
}

/// `Sun, 06 Nov 1994 08:49:37 GMT` as `Sunday, 06-Nov-94 08:49:37 GMT`.
fn rfc850(imf: &str) -> String {
    let f: Vec<&str> = imf.split([' ', ',']).filter(|s| !s.is_empty()).collect();
    let day = match f[0] {
        "Mon" => "Monday",
        "Tue" => "Tuesday",
        "Wed" => "Wednesday",
        "Thu" => "Thursday",
        "Fri" => "Friday",
        "Sat" => "Saturday",
        _ => "Sunday",
    };
    format!("{day}, {}-{}-{} {} GMT", f[1], f[2], &f[3][2..], f[4])
}

/// `Sun, 06 Nov 1994 08:49:37 GMT` as `Sun Nov  6 08:49:37 1994`.
fn asctime(imf: &str) -> String {
    let f: Vec<&str> = imf.split([' ', ',']).filter(|s| !s.is_empty()).collect();
    let day: u32 = f[1].parse().unwrap();
    format!("{} {} {day:>2} {} {}", f[0], f[2], f[4], f[3])
}
