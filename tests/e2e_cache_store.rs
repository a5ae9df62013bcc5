//! Issue 32, items 1, 2, 4 and 6: what the cache stores and how it reuses
//! it. Responses without a strong validator (stored whole, never combined),
//! other statuses (RFC 9111 §3 with RFC 9110 §15.1), partial content,
//! `stale-while-revalidate` and `stale-if-error` (RFC 5861), targeted cache
//! control (RFC 9213), qualified `private`/`no-cache`, `must-understand`
//! and `Cache-Status` (RFC 9211). A real `holdfast` process in front of a
//! scripted origin, curl as the client.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test or benchmark: a panic is its failure

mod support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::curl::{Got, curl_host, data};
use support::script_origin::{Reply, ScriptOrigin, Seen, ranged};
use support::{Gateway, free_port};

const HOST: &str = "site.test";
const LM: &str = "Sun, 06 Nov 1994 08:49:37 GMT";

/// A node whose cache serves `HOST` from `origin` (64 KiB blocks), with
/// `extra` lines in `[cache]`.
fn node(name: &str, origin: &ScriptOrigin, extra: &str, source_extra: &str) -> Gateway {
    let port = free_port();
    let mut gw = Gateway::start_named(
        name,
        &format!(
            "[cache]\nlisten = \"127.0.0.1:{port}\"\nblock_size = 65536\n{extra}\n{}",
            origin.source(HOST, source_extra)
        ),
    );
    gw.cache = port;
    gw
}

fn get(gw: &Gateway, path: &str, args: &[&str]) -> Got {
    curl_host(gw.cache, HOST, path, args)
}

/// Requests the origin received for `path` with `method`.
fn count(origin: &ScriptOrigin, method: &str, path: &str) -> usize {
    origin
        .seen()
        .iter()
        .filter(|s| s.method == method && s.path == path)
        .count()
}

fn cache_status(g: &Got) -> &str {
    g.header("cache-status").unwrap_or("")
}

fn event(gw: &Gateway, event: &str) -> f64 {
    gw.metric(&format!("holdfast_cache_events_total{{event=\"{event}\"}}"))
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Item 1: a complete 200 with `max-age` and no `ETag`/`Last-Modified` was
/// fetched again on every request. It is stored whole, as one version, and
/// every range is served from it.
#[test]
fn a_complete_response_without_a_validator_is_stored_and_serves_every_range() {
    let body = data(1, 200_000);
    let b = body.clone();
    let origin = ScriptOrigin::start(move |s| ranged(s, &b, &[("cache-control", "max-age=3600")]));
    let gw = node("plain", &origin, "", "");
    let g = get(&gw, "/plain", &[]);
    assert_eq!((g.status, g.body == body), (200, true), "{}", gw.describe());
    assert!(
        cache_status(&g).contains("fwd=uri-miss; stored"),
        "{}",
        cache_status(&g)
    );
    let g = get(&gw, "/plain", &[]);
    assert_eq!((g.status, g.body == body), (200, true));
    assert!(
        cache_status(&g).starts_with("holdfast-plain; hit; ttl="),
        "{}",
        cache_status(&g)
    );
    for (arg, range) in [
        ("0-1", 0..2),
        ("5-", 5..200_000),
        ("-5", 199_995..200_000),
        ("100000-150000", 100_000..150_001),
    ] {
        let g = get(&gw, "/plain", &["-r", arg]);
        assert_eq!(g.status, 206, "{arg}");
        assert!(g.body == body[range.clone()], "{arg}: the bytes of the stored response");
        assert!(cache_status(&g).contains("; hit"), "{arg}: {}", cache_status(&g));
    }
    assert_eq!(count(&origin, "GET", "/plain"), 1, "one upstream request in all");
    // If-Range needs a strong validator (RFC 9110 §13.1.5): the whole object.
    let g = get(&gw, "/plain", &["-r", "0-1", "-H", "If-Range: W/\"x\""]);
    assert_eq!((g.status, g.body.len()), (200, 200_000));
    gw.stop();
}

/// Item 1: a cold range of an object without a validator cannot be stored
/// (its other blocks could only come from other responses, maybe of another
/// version): it is answered as it came, and the next miss asks for the
/// whole object, which is stored.
#[test]
fn a_cold_range_without_a_validator_is_passed_on_then_fetched_whole() {
    let body = data(2, 200_000);
    let b = body.clone();
    let origin = ScriptOrigin::start(move |s| ranged(s, &b, &[("cache-control", "max-age=3600")]));
    let gw = node("cold", &origin, "", "");
    let g = get(&gw, "/cold", &["-r", "100000-100009"]);
    assert_eq!((g.status, g.body.as_slice()), (206, &body[100_000..100_010]));
    assert_eq!(count(&origin, "GET", "/cold"), 1);
    let g = get(&gw, "/cold", &["-r", "0-9"]);
    assert_eq!((g.status, g.body.as_slice()), (206, &body[..10]));
    let asked: Vec<String> = origin
        .seen()
        .iter()
        .filter(|s| s.path == "/cold")
        .map(|s| s.header("range").unwrap_or("").to_string())
        .collect();
    assert_eq!(
        asked[1], "bytes=0-",
        "the second miss asks for the whole object: {asked:?}"
    );
    let g = get(&gw, "/cold", &[]);
    assert_eq!((g.status, g.body == body), (200, true));
    assert!(cache_status(&g).contains("; hit"), "{}", cache_status(&g));
    assert_eq!(count(&origin, "GET", "/cold"), 2);
    gw.stop();
}

/// Item 1: the blocks of a version without a validator all come from one
/// response. A fill whose client left stops part way (after
/// `orphan_fill_bytes`); the origin then changes the object; the next
/// request fetches the whole object again instead of completing the old
/// blocks with new bytes.
#[test]
fn versions_without_a_validator_are_never_combined() {
    const LEN: usize = 8 << 20;
    let old = Arc::new(data(3, LEN));
    let new = Arc::new(data(4, LEN));
    let current = Arc::new(Mutex::new(old.clone()));
    let c = current.clone();
    let origin = ScriptOrigin::start(move |s| {
        let body = c.lock().unwrap().clone();
        ranged(s, &body, &[("cache-control", "max-age=3600")])
    });
    let gw = node("mix", &origin, "orphan_fill_bytes = 65536", "");
    // The first miss learns that the object has no validator; the second
    // fills it whole, but its client leaves after 10 bytes.
    for _ in 0..2 {
        let g = get(&gw, "/mix", &["-r", "0-9"]);
        assert_eq!(g.body.as_slice(), &old[..10]);
    }
    let stored = || -> u64 { gw.api("/api/v1/cache")["stored_bytes"].as_u64().unwrap() };
    let mut last = u64::MAX;
    wait_until("the orphaned fill to stop", || {
        std::thread::sleep(Duration::from_millis(300));
        let now = stored();
        let settled = now == last;
        last = now;
        settled
    });
    assert!(
        last > 0 && last < LEN as u64,
        "part of the object is stored ({last} bytes): the test needs an incomplete version"
    );
    *current.lock().unwrap() = new.clone();
    let g = get(&gw, "/mix", &[]);
    assert_eq!(g.body.len(), LEN);
    assert!(g.body == *new, "the whole new version, no old block in it");
    assert_eq!(event(&gw, "refetched-incomplete"), 1.0);
    let g = get(&gw, "/mix", &["-r", "0-99"]);
    assert_eq!(g.body.as_slice(), &new[..100]);
    assert!(cache_status(&g).contains("; hit"), "{}", cache_status(&g));
    gw.stop();
}

/// Item 1: an object the source calls immutable needs no validator (its
/// name is its version): its blocks are stored from range requests and
/// combined, as for a package mirror that sends no `ETag`/`Last-Modified`.
#[test]
fn an_immutable_object_without_a_validator_is_stored_from_ranges() {
    let body = data(5, 300_000);
    let b = body.clone();
    let origin = ScriptOrigin::start(move |s| ranged(s, &b, &[]));
    let gw = node("imm", &origin, "", "immutable = [\"/pool/**\"]");
    let g = get(&gw, "/pool/p.deb", &["-r", "0-9"]);
    assert_eq!(g.body.as_slice(), &body[..10]);
    let g = get(&gw, "/pool/p.deb", &[]);
    assert_eq!((g.status, g.body == body), (200, true), "{}", gw.describe());
    assert_eq!(
        count(&origin, "GET", "/pool/p.deb"),
        2,
        "block 0 from the first request"
    );
    assert!(cache_status(&g).contains("fwd=partial; stored"), "{}", cache_status(&g));
    let g = get(&gw, "/pool/p.deb", &[]);
    assert_eq!((g.body == body, cache_status(&g)), (true, "holdfast-imm; hit"));
    assert_eq!(count(&origin, "GET", "/pool/p.deb"), 2);
    gw.stop();
}

/// Item 2: every final status is stored when the origin gives explicit
/// freshness; without it only the heuristically cacheable ones (RFC 9110
/// §15.1); nothing else. Stored answers keep their fields and survive a
/// restart.
#[test]
fn other_statuses_are_stored_as_rfc_9111_allows() {
    let origin = ScriptOrigin::start(|s| {
        let mut it = s.path.trim_start_matches('/').split('/');
        let status: u16 = it.next().and_then(|p| p.parse().ok()).unwrap_or(200);
        let how = it.next().unwrap_or("");
        let mut fields = vec![
            ("last-modified", LM),
            ("etag", "\"e\""),
            ("location", "/there"),
            ("x-o", "1"),
        ];
        match how {
            "max-age" => fields.push(("cache-control", "max-age=600")),
            "expires" => fields.push(("expires", "Sun, 06 Nov 2094 08:49:37 GMT")),
            "public" => fields.push(("cache-control", "public")),
            _ => {}
        }
        let body: &[u8] = if status == 204 || how == "empty" {
            b""
        } else {
            b"answer"
        };
        Reply::new(status, &fields, body)
    });
    let mut gw = node("status", &origin, "", "");
    let stored = [
        "/203",
        "/204",
        "/300",
        "/301",
        "/308",
        "/404",
        "/405",
        "/410",
        "/414",
        "/501",
        "/302/max-age",
        "/201/max-age",
        "/500/expires",
        "/403/public",
        "/200/empty",
        "/503/max-age",
    ];
    let not_stored = ["/201", "/202", "/302", "/303", "/307", "/403", "/500", "/502", "/503"];
    for path in stored.iter().chain(&not_stored) {
        let status: u16 = path[1..4].parse().unwrap();
        for round in 0..2 {
            let g = get(&gw, path, &[]);
            assert_eq!(g.status, status, "{path} ({round}): {}", gw.describe());
            let body: &[u8] = if status == 204 || path.ends_with("empty") {
                b""
            } else {
                b"answer"
            };
            assert_eq!(g.body.as_slice(), body, "{path} ({round})");
            for (k, v) in [
                ("location", "/there"),
                ("last-modified", LM),
                ("etag", "\"e\""),
                ("x-o", "1"),
            ] {
                assert_eq!(g.header(k), Some(v), "{path} ({round}): {k}");
            }
            if round == 1 && stored.contains(path) {
                assert!(g.header("age").is_some(), "{path}: Age");
                assert!(cache_status(&g).contains("; hit"), "{path}: {}", cache_status(&g));
            }
        }
        let want = if stored.contains(path) { 1 } else { 2 };
        assert_eq!(count(&origin, "GET", path), want, "{path}");
    }
    // HEAD of a stored answer: its status and fields, no body.
    let g = get(&gw, "/404", &["-I"]);
    assert_eq!((g.status, g.header("content-length")), (404, Some("6")));
    assert_eq!(count(&origin, "GET", "/404") + count(&origin, "HEAD", "/404"), 1);
    // A conditional request for a stored 2xx answer.
    let g = get(&gw, "/203", &["-H", "If-None-Match: \"e\""]);
    assert_eq!(g.status, 304);
    let stats = gw.api("/api/v1/cache");
    assert_eq!(stats["stored_answers"].as_u64(), Some(stored.len() as u64), "{stats}");
    gw.restart();
    for path in stored {
        let g = get(&gw, path, &[]);
        assert!(
            cache_status(&g).contains("; hit"),
            "{path} after a restart: {}",
            cache_status(&g)
        );
        assert_eq!(count(&origin, "GET", path), 1, "{path}");
    }
    // A purge drops them too.
    let (code, body) = gw.post("/api/v1/cache/purge", &serde_json::json!({"all": true}));
    assert_eq!(code, 200, "{body}");
    assert_eq!(get(&gw, "/404", &[]).status, 404);
    assert_eq!(count(&origin, "GET", "/404"), 2);
    gw.stop();
}

/// Item 4: ranges of a small object whose origin answers 206 (a cut
/// connection or a 502 before), a 206 stored and reused for a contained
/// range, and fields a later 206 of the same version carries update what
/// is stored (RFC 9111 §3.2).
#[test]
fn partial_content_is_stored_reused_and_updates_stored_fields() {
    let version = Arc::new(Mutex::new("1".to_string()));
    let v = version.clone();
    let big = data(6, 200_000);
    let b = big.clone();
    let origin = ScriptOrigin::start(move |s: &Seen| {
        let x = v.lock().unwrap().clone();
        match s.path.as_str() {
            "/small" => ranged(s, b"0123456789", &[("etag", "\"s\""), ("cache-control", "max-age=600")]),
            "/small-plain" => ranged(s, b"abcdefghij", &[("cache-control", "max-age=600")]),
            _ => ranged(
                s,
                &b,
                &[("etag", "\"b\""), ("cache-control", "max-age=600"), ("x-version", &x)],
            ),
        }
    });
    let gw = node("partial", &origin, "", "");
    for path in ["/small", "/small-plain"] {
        let whole: &[u8] = if path == "/small" { b"0123456789" } else { b"abcdefghij" };
        for (arg, want, cr) in [
            ("0-1", &whole[..2], "bytes 0-1/10"),
            ("5-", &whole[5..], "bytes 5-9/10"),
            ("-5", &whole[5..], "bytes 5-9/10"),
            ("3-3", &whole[3..4], "bytes 3-3/10"),
        ] {
            let g = get(&gw, path, &["-r", arg]);
            assert_eq!((g.exit, g.status), (0, 206), "{path} {arg}: {}", gw.describe());
            assert_eq!(g.body.as_slice(), want, "{path} {arg}");
            assert_eq!(g.header("content-range"), Some(cr), "{path} {arg}");
        }
        assert_eq!(count(&origin, "GET", path), 1, "{path}: stored by the first 206");
    }
    // A 206 of block 1 is stored and reused for a range inside it.
    let g = get(&gw, "/big", &["-r", "70000-70009"]);
    assert_eq!(g.body.as_slice(), &big[70_000..70_010]);
    assert_eq!(g.header("x-version"), Some("1"));
    let g = get(&gw, "/big", &["-r", "65536-131071"]);
    assert!(g.body == big[65_536..131_072]);
    assert!(cache_status(&g).contains("; hit"), "{}", cache_status(&g));
    assert_eq!(count(&origin, "GET", "/big"), 1);
    // A later 206 of the same version (block 0) brings a new field value.
    *version.lock().unwrap() = "2".into();
    let g = get(&gw, "/big", &["-r", "0-9"]);
    assert_eq!(g.body.as_slice(), &big[..10]);
    assert_eq!(count(&origin, "GET", "/big"), 2);
    let g = get(&gw, "/big", &["-r", "70000-70009"]);
    assert!(cache_status(&g).contains("; hit"), "{}", cache_status(&g));
    assert_eq!(
        g.header("x-version"),
        Some("2"),
        "the stored fields follow the newer 206"
    );
    gw.stop();
}

/// Item 6: `stale-while-revalidate` serves the stale response at once and
/// validates it in the background; `stale-if-error` serves it when the
/// origin answers with an error, and only within its window; without it the
/// origin's error is passed on.
#[test]
fn stale_while_revalidate_and_stale_if_error() {
    let version = Arc::new(Mutex::new(1u32));
    let failing = Arc::new(Mutex::new(false));
    let (v, f) = (version.clone(), failing.clone());
    let origin = ScriptOrigin::start(move |s: &Seen| {
        if *f.lock().unwrap() {
            return Reply::new(503, &[("retry-after", "5")], b"maintenance");
        }
        let n = *v.lock().unwrap();
        let tag = format!("\"v{n}\"");
        let cc = match s.path.as_str() {
            "/swr" => "max-age=1, stale-while-revalidate=60",
            "/sie" => "max-age=1, stale-if-error=60",
            _ => "max-age=1",
        };
        if s.header("if-none-match") == Some(tag.as_str()) {
            return Reply::new(304, &[("etag", &tag), ("cache-control", cc)], b"");
        }
        ranged(
            s,
            format!("version {n}").as_bytes(),
            &[("etag", &tag), ("cache-control", cc)],
        )
    });
    let gw = node("stale", &origin, "", "");
    for p in ["/swr", "/sie", "/plain"] {
        assert_eq!(get(&gw, p, &[]).body, b"version 1");
    }
    std::thread::sleep(Duration::from_millis(2200));
    *version.lock().unwrap() = 2;
    // Stale within its window: answered from storage at once.
    let g = get(&gw, "/swr", &[]);
    assert_eq!(g.body, b"version 1");
    let cs = cache_status(&g);
    assert!(cs.starts_with("holdfast-stale; hit; ttl=-"), "{cs}");
    wait_until("the background validation", || count(&origin, "HEAD", "/swr") == 1);
    wait_until("the new version", || get(&gw, "/swr", &[]).body == b"version 2");
    assert_eq!(event(&gw, "served-stale-while-revalidate"), 1.0);
    // The origin fails: /sie is served stale, /plain gets the origin's 503.
    *failing.lock().unwrap() = true;
    let g = get(&gw, "/sie", &[]);
    assert_eq!((g.status, g.body.as_slice()), (200, &b"version 1"[..]));
    assert_eq!(event(&gw, "served-stale-if-error"), 1.0);
    let g = get(&gw, "/plain", &[]);
    assert_eq!((g.status, g.body.as_slice()), (503, &b"maintenance"[..]));
    assert_eq!(g.header("retry-after"), Some("5"));
    // A request may narrow the window.
    let g = get(&gw, "/sie", &["-H", "Cache-Control: stale-if-error=0"]);
    assert_eq!(g.status, 503);
    gw.stop();
}

/// Item 6: targeted cache control (RFC 9213), qualified `private` and
/// `no-cache` (the named fields are not stored, the rest is), and
/// `must-understand` (§5.2.2.3).
#[test]
fn targeted_fields_qualified_directives_and_must_understand() {
    let origin = ScriptOrigin::start(|s: &Seen| {
        let fields: Vec<(&str, &str)> = match s.path.as_str() {
            "/cdn" => vec![("cache-control", "no-store"), ("cdn-cache-control", "max-age=600")],
            "/cdn-no" => vec![("cache-control", "max-age=600"), ("cdn-cache-control", "no-store")],
            "/qualified" => vec![
                (
                    "cache-control",
                    "max-age=600, private=\"x-user\", no-cache=\"set-cookie\"",
                ),
                ("x-user", "alice"),
                ("set-cookie", "session=1"),
                ("x-kept", "yes"),
            ],
            "/mu" => vec![("cache-control", "must-understand, no-store, max-age=600")],
            _ => vec![("cache-control", "max-age=600")],
        };
        if s.path == "/mu-unknown" {
            // A status this cache does not know: never stored with
            // must-understand.
            return Reply::new(299, &[("cache-control", "must-understand, max-age=600")], b"content");
        }
        ranged(s, b"content", &fields)
    });
    let gw = node("targeted", &origin, "", "");
    for (path, fetches) in [
        ("/cdn", 1),
        ("/cdn-no", 2),
        ("/qualified", 1),
        ("/mu", 1),
        ("/mu-unknown", 2),
    ] {
        let first = get(&gw, path, &[]);
        let second = get(&gw, path, &[]);
        assert_eq!(second.body, b"content", "{path}");
        assert_eq!(count(&origin, "GET", path), fetches, "{path}");
        if path == "/qualified" {
            assert_eq!(first.header("x-user"), Some("alice"), "relayed the first time");
            assert_eq!(first.header("set-cookie"), Some("session=1"));
            assert_eq!(second.header("x-user"), None, "private=\"x-user\" is not stored");
            assert_eq!(
                second.header("set-cookie"),
                None,
                "no-cache=\"set-cookie\" is not stored"
            );
            assert_eq!(second.header("x-kept"), Some("yes"));
        }
    }
    gw.stop();
}
