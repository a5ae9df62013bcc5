//! The range cache as an HTTP cache and reverse proxy (RFC 9110/9111): a real
//! `holdfast` process in front of a scripted origin (status, fields and
//! bodies set by each test; every request it receives is recorded), with
//! curl as the client. One test per rule of docs/cache.md, "Reverse proxy".
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test or benchmark: a panic is its failure

mod support;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use holdfast_cache::range::format_http_date;
use support::curl::{Got, curl_host, data};
use support::script_origin::{Reply, ScriptOrigin, Seen, ranged};
use support::{Gateway, free_port};

const HOST: &str = "site.test";

/// A node whose cache serves `HOST` from `origin` as a reverse proxy, with
/// 64 KiB blocks; `source` adds lines to the source.
fn node(origin: &ScriptOrigin, source: &str) -> Gateway {
    let port = free_port();
    let mut gw = Gateway::start_named(
        "rp",
        &format!(
            "[cache]\nlisten = \"127.0.0.1:{port}\"\nblock_size = 65536\n{}",
            origin.source(HOST, source)
        ),
    );
    gw.cache = port;
    gw
}

fn get(gw: &Gateway, path: &str, args: &[&str]) -> Got {
    curl_host(gw.cache, HOST, path, args)
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

fn date(secs: u64) -> String {
    format_http_date(secs as i64)
}

/// An object with a strong ETag: 304 to a matching If-None-Match (with
/// `fields`), else its bytes (ranges honoured) with `fields`.
fn object(s: &Seen, body: &[u8], etag: &str, fields: &[(&str, &str)]) -> Reply {
    let mut all: Vec<(&str, &str)> = vec![("etag", etag)];
    all.extend_from_slice(fields);
    if s.header("if-none-match") == Some(etag) {
        return Reply::new(304, &all, b"");
    }
    ranged(s, body, &all)
}

/// Requests the origin received for `path` with `method`.
fn count(origin: &ScriptOrigin, method: &str, path: &str) -> usize {
    origin
        .seen()
        .iter()
        .filter(|s| s.method == method && s.path == path)
        .count()
}

#[test]
fn other_methods_reach_the_origin_with_bodies_and_invalidate_what_they_change() {
    let doc = data(1, 5000);
    let origin = ScriptOrigin::start(move |s| match (s.method.as_str(), s.path.as_str()) {
        ("GET" | "HEAD", "/doc" | "/other") => object(s, &doc, "\"v1\"", &[("cache-control", "max-age=600")]),
        ("POST", "/doc") => Reply::new(
            201,
            &[("location", "http://site.test/other"), ("x-made", "yes")],
            b"created",
        ),
        ("PUT", "/doc") => Reply::new(500, &[], b"refused"),
        (m, _) => Reply::new(200, &[("x-method", m)], &s.body),
    });
    let gw = node(&origin, "");
    for m in ["PUT", "POST", "PATCH", "DELETE", "OPTIONS"] {
        let body = format!("the body of {m}");
        let g = get(&gw, "/echo", &["-X", m, "--data-binary", &body]);
        assert_eq!(g.status, 200, "{m}: {}", gw.describe());
        assert_eq!(g.body, body.as_bytes(), "{m}: the origin's answer comes back");
        assert_eq!(g.header("x-method"), Some(m));
        assert!(
            origin
                .seen()
                .iter()
                .any(|s| s.method == m && s.path == "/echo" && s.body == body.as_bytes()),
            "{m} reached the origin with its body"
        );
    }
    // Stored, then invalidated by a POST to it, and its Location too.
    for path in ["/doc", "/other"] {
        for _ in 0..2 {
            assert_eq!(get(&gw, path, &[]).status, 200);
        }
        assert_eq!(count(&origin, "GET", path), 1, "{path} is stored");
    }
    let g = get(&gw, "/doc", &["-X", "POST", "-d", "x=1"]);
    assert_eq!((g.status, g.body.as_slice()), (201, &b"created"[..]));
    assert_eq!(g.header("x-made"), Some("yes"));
    for path in ["/doc", "/other"] {
        assert_eq!(get(&gw, path, &[]).status, 200);
        assert_eq!(count(&origin, "GET", path), 2, "{path} was invalidated by the POST");
    }
    // A failed unsafe method and a safe one invalidate nothing.
    assert_eq!(get(&gw, "/doc", &["-X", "PUT", "-d", "y"]).status, 500);
    assert_eq!(get(&gw, "/doc", &["-X", "OPTIONS"]).status, 200);
    assert_eq!(get(&gw, "/doc", &[]).status, 200);
    assert_eq!(count(&origin, "GET", "/doc"), 2, "still stored");
    assert!(gw.metric("holdfast_cache_events_total{event=\"invalidated-by-method\"}") >= 1.0);
}

#[test]
fn end_to_end_request_fields_are_forwarded_and_hop_by_hop_ones_are_not() {
    let body = data(2, 3000);
    let origin = ScriptOrigin::start(move |s| match s.method.as_str() {
        "GET" | "HEAD" => object(s, &body, "\"f\"", &[("cache-control", "public, max-age=600")]),
        _ => Reply::new(200, &[], b"ok"),
    });
    let gw = node(&origin, "");
    let args = [
        "-H",
        "X-Custom: 42",
        "-H",
        "Authorization: Bearer s3cret",
        "-H",
        "Accept-Language: de",
        "-H",
        "Connection: X-Hop",
        "-H",
        "X-Hop: private to this hop",
        "-H",
        "Keep-Alive: timeout=5",
        "-H",
        "TE: trailers",
        "-H",
        "Proxy-Authorization: Basic eDp5",
        "-H",
        "Via: 1.1 client-proxy",
    ];
    // A pass-through (POST) and a fill (GET of a cacheable path).
    for (extra, path) in [(&["-X", "POST", "-d", "b"][..], "/pass"), (&[][..], "/fill")] {
        let all: Vec<&str> = args.iter().chain(extra).copied().collect();
        let g = get(&gw, path, &all);
        assert_eq!(g.status, 200, "{}", gw.describe());
        let seen = origin.seen();
        let s = seen.iter().rev().find(|s| s.path == path).unwrap();
        assert_eq!(s.header("x-custom"), Some("42"), "{path}");
        assert_eq!(s.header("authorization"), Some("Bearer s3cret"), "{path}");
        assert_eq!(s.header("accept-language"), Some("de"), "{path}");
        for gone in ["x-hop", "keep-alive", "te", "proxy-authorization", "connection"] {
            assert!(
                s.header(gone).is_none(),
                "{path}: {gone} was forwarded: {:?}",
                s.headers
            );
        }
        let via = s.header("via").unwrap_or_default();
        assert_eq!(via, "1.1 client-proxy, 1.1 holdfast-rp", "{path}");
        assert_eq!(s.header("host"), Some(format!("127.0.0.1:{}", origin.port).as_str()));
    }
    let fill = origin.seen().into_iter().find(|s| s.path == "/fill").unwrap();
    assert_eq!(
        fill.header("accept-encoding"),
        Some("identity"),
        "fills ask for the identity coding"
    );
}

#[test]
fn response_fields_pass_through_and_hits_carry_age() {
    let body = data(3, 200_000);
    let origin = ScriptOrigin::start(move |s| match s.method.as_str() {
        "GET" | "HEAD" => object(
            s,
            &body,
            "\"r\"",
            &[
                ("cache-control", "max-age=600"),
                ("x-origin", "a"),
                ("content-language", "de"),
                ("link", "</style.css>; rel=preload"),
                ("age", "100"),
            ],
        ),
        _ => Reply::new(202, &[("cache-control", "no-store"), ("x-p", "1")], b"accepted"),
    });
    let gw = node(&origin, "");
    let miss = get(&gw, "/r", &[]);
    let hit = get(&gw, "/r", &[]);
    let part = get(&gw, "/r", &["-r", "70000-70099"]);
    assert_eq!(count(&origin, "GET", "/r"), 1);
    for (what, g) in [("miss", &miss), ("hit", &hit), ("range hit", &part)] {
        assert_eq!(g.header("cache-control"), Some("max-age=600"), "{what}");
        assert_eq!(g.header("x-origin"), Some("a"), "{what}");
        assert_eq!(g.header("content-language"), Some("de"), "{what}");
        assert_eq!(g.header("link"), Some("</style.css>; rel=preload"), "{what}");
        let age: u64 = g.header("age").and_then(|a| a.parse().ok()).unwrap_or(0);
        assert!(age >= 100, "{what}: Age {age} counts the origin's Age");
    }
    let cs = hit.header("cache-status").unwrap_or("");
    assert!(cs.starts_with("holdfast-rp; hit; ttl="), "{cs}");
    assert_eq!(part.status, 206);
    let pass = get(&gw, "/r", &["-X", "POST", "-d", "z"]);
    assert_eq!((pass.status, pass.body.as_slice()), (202, &b"accepted"[..]));
    assert_eq!(pass.header("cache-control"), Some("no-store"));
    assert_eq!(pass.header("x-p"), Some("1"));
}

#[test]
fn freshness_follows_cache_control_expires_age_and_date() {
    let origin = ScriptOrigin::start(|s| {
        let t = now();
        let (d, soon, past, old) = (date(t), date(t + 600), date(t - 10), date(t - 864_000));
        let fields: Vec<(&str, &str)> = match s.path.as_str() {
            "/max-age-2" => vec![("cache-control", "max-age=2")],
            "/s-maxage" => vec![("cache-control", "max-age=0, s-maxage=600")],
            "/expires" => vec![("date", &d), ("expires", &soon)],
            "/expired" => vec![("date", &d), ("expires", &past)],
            "/bad-expires" => vec![("date", &d), ("expires", "0")],
            "/aged" => vec![("cache-control", "max-age=60"), ("age", "100")],
            "/no-cache" => vec![("cache-control", "no-cache, max-age=600")],
            "/heuristic" => vec![("date", &d), ("last-modified", &old)],
            _ => vec![],
        };
        object(s, b"content", "\"e\"", &fields)
    });
    let gw = node(&origin, "");
    let fresh = ["/max-age-2", "/s-maxage", "/expires", "/heuristic"];
    let stale = ["/expired", "/bad-expires", "/aged", "/no-cache", "/nothing"];
    for path in fresh.iter().chain(&stale) {
        for _ in 0..2 {
            let g = get(&gw, path, &[]);
            assert_eq!((g.status, g.body.as_slice()), (200, &b"content"[..]), "{path}");
        }
        assert_eq!(count(&origin, "GET", path), 1, "{path}: one fetch");
    }
    for path in fresh {
        assert_eq!(count(&origin, "HEAD", path), 0, "{path} is fresh: not revalidated");
    }
    for path in stale {
        assert_eq!(count(&origin, "HEAD", path), 1, "{path} is stale: revalidated once");
        let head = origin
            .seen()
            .into_iter()
            .find(|s| s.method == "HEAD" && s.path == path)
            .unwrap();
        assert_eq!(
            head.header("if-none-match"),
            Some("\"e\""),
            "{path}: a conditional request"
        );
    }
    std::thread::sleep(Duration::from_millis(2100));
    assert_eq!(get(&gw, "/max-age-2", &[]).status, 200);
    assert_eq!(
        count(&origin, "HEAD", "/max-age-2"),
        1,
        "revalidated once max-age ran out"
    );
}

#[test]
fn the_source_ttl_caps_freshness_and_immutable_never_revalidates() {
    let origin = ScriptOrigin::start(|s| object(s, b"v", "\"t\"", &[("cache-control", "max-age=600")]));
    let gw = node(&origin, "ttl_seconds = 1\nimmutable = [\"/pkg/**\"]");
    assert_eq!(get(&gw, "/index", &[]).status, 200);
    assert_eq!(get(&gw, "/pkg/a.deb", &[]).status, 200);
    std::thread::sleep(Duration::from_millis(1200));
    assert_eq!(get(&gw, "/index", &[]).status, 200);
    assert_eq!(get(&gw, "/pkg/a.deb", &["-H", "Cache-Control: no-cache"]).status, 200);
    assert_eq!(count(&origin, "HEAD", "/index"), 1, "capped at the source's 1 s");
    assert_eq!(count(&origin, "HEAD", "/pkg/a.deb"), 0, "immutable: never revalidated");
}

#[test]
fn responses_that_must_not_be_stored_are_not_and_cost_one_request_each() {
    let origin = ScriptOrigin::start(|s| {
        let fields: Vec<(&str, &str)> = match s.path.as_str() {
            "/no-store" => vec![("cache-control", "no-store")],
            "/private" => vec![("cache-control", "private, max-age=600")],
            "/auth" => vec![("cache-control", "max-age=600")],
            "/auth-public" => vec![("cache-control", "public, max-age=600")],
            "/cookie" => vec![("cache-control", "max-age=600"), ("set-cookie", "session=1")],
            "/moved" => {
                return Reply::new(
                    302,
                    &[("cache-control", "max-age=600"), ("location", "/elsewhere")],
                    b"moved",
                );
            }
            "/missing" => return Reply::new(404, &[("cache-control", "max-age=600")], b"no such thing"),
            // Not heuristically cacheable, no explicit freshness (issue 32,
            // item 2): passed on each time.
            "/created" => return Reply::new(201, &[("last-modified", "Sun, 06 Nov 1994 08:49:37 GMT")], b"made"),
            "/forbidden" => return Reply::new(403, &[("last-modified", "Sun, 06 Nov 1994 08:49:37 GMT")], b"no"),
            "/failed" => return Reply::new(503, &[("last-modified", "Sun, 06 Nov 1994 08:49:37 GMT")], b"down"),
            "/weak" => return ranged(s, b"weak", &[("etag", "W/\"w\""), ("cache-control", "max-age=600")]),
            _ => vec![("cache-control", "max-age=600")],
        };
        object(s, b"body", "\"s\"", &fields)
    });
    let gw = node(&origin, "");
    // (path, curl arguments, status, body, upstream requests for two client requests)
    type Case<'a> = (&'a str, &'a [&'a str], u16, &'a [u8], usize);
    // A 302 and a 404 with explicit freshness, and a complete 200 with only
    // a weak validator, are stored (issue 32, items 1 and 2): one request.
    let cases: [Case<'_>; 12] = [
        ("/cookie", &[], 200, b"body", 2),
        ("/no-store", &[], 200, b"body", 2),
        ("/private", &[], 200, b"body", 2),
        ("/auth", &["-H", "Authorization: Bearer a"], 200, b"body", 2),
        ("/auth-public", &["-H", "Authorization: Bearer a"], 200, b"body", 1),
        ("/moved", &[], 302, b"moved", 1),
        ("/missing", &[], 404, b"no such thing", 1),
        ("/created", &[], 201, b"made", 2),
        ("/forbidden", &[], 403, b"no", 2),
        ("/failed", &[], 503, b"down", 2),
        ("/weak", &[], 200, b"weak", 1),
        ("/asked-no-store", &["-H", "Cache-Control: no-store"], 200, b"body", 2),
    ];
    for (path, args, status, body, fetches) in cases {
        for _ in 0..2 {
            let g = get(&gw, path, args);
            assert_eq!(
                (g.status, g.body.as_slice()),
                (status, body),
                "{path}: {}",
                gw.describe()
            );
        }
        assert_eq!(
            count(&origin, "GET", path),
            fetches,
            "{path}: each request that cannot be stored costs one upstream request, one that is stored none"
        );
    }
    assert_eq!(get(&gw, "/cookie", &[]).header("set-cookie"), Some("session=1"));
    let moved = get(&gw, "/moved", &[]);
    assert_eq!(
        moved.header("location"),
        Some("/elsewhere"),
        "fields of an error answer pass"
    );
}

#[test]
fn vary_keeps_one_response_per_selecting_values_and_vary_star_is_not_stored() {
    let origin = ScriptOrigin::start(|s| {
        let lang = s.header("accept-language").unwrap_or("none").to_string();
        match s.path.as_str() {
            "/lang" => ranged(
                s,
                format!("hello in {lang}").as_bytes(),
                &[
                    ("etag", &format!("\"{lang}\"")),
                    ("vary", "Accept-Language"),
                    ("cache-control", "max-age=600"),
                ],
            ),
            "/enc" => ranged(
                s,
                b"plain",
                &[
                    ("etag", "\"p\""),
                    ("vary", "Accept-Encoding"),
                    ("cache-control", "max-age=600"),
                ],
            ),
            _ => ranged(
                s,
                b"star",
                &[("etag", "\"x\""), ("vary", "*"), ("cache-control", "max-age=600")],
            ),
        }
    });
    let gw = node(&origin, "");
    for lang in ["en", "fr", "en", "fr", ""] {
        let args: Vec<String> = if lang.is_empty() {
            vec![]
        } else {
            vec!["-H".into(), format!("Accept-Language: {lang}")]
        };
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let g = get(&gw, "/lang", &args);
        let want = if lang.is_empty() { "none" } else { lang };
        assert_eq!(g.body, format!("hello in {want}").as_bytes(), "{}", gw.describe());
    }
    assert_eq!(count(&origin, "GET", "/lang"), 3, "en, fr and none: one fetch each");
    // The cache asks for the identity coding, so every client shares it.
    for enc in ["gzip", "br", "identity"] {
        let g = get(&gw, "/enc", &["-H", &format!("Accept-Encoding: {enc}")]);
        assert_eq!(g.body, b"plain");
    }
    assert_eq!(count(&origin, "GET", "/enc"), 1);
    for _ in 0..2 {
        assert_eq!(get(&gw, "/star", &[]).body, b"star");
    }
    assert_eq!(count(&origin, "GET", "/star"), 2, "Vary: * is never stored");
}

#[test]
fn request_cache_control_is_honoured() {
    let origin = ScriptOrigin::start(|s| object(s, b"doc", "\"d\"", &[("cache-control", "max-age=600")]));
    let gw = node(&origin, "");
    let g = get(&gw, "/doc", &["-H", "Cache-Control: only-if-cached"]);
    assert_eq!(g.status, 504, "only-if-cached on a miss");
    assert!(origin.seen().is_empty(), "only-if-cached never goes upstream");
    assert_eq!(get(&gw, "/doc", &[]).status, 200);
    let g = get(&gw, "/doc", &["-H", "Cache-Control: only-if-cached"]);
    assert_eq!((g.status, g.body.as_slice()), (200, &b"doc"[..]));
    assert_eq!(origin.seen().len(), 1);
    let mut heads = 0;
    for h in [
        "Cache-Control: no-cache",
        "Pragma: no-cache",
        "Cache-Control: min-fresh=1000",
    ] {
        let g = get(&gw, "/doc", &["-H", h]);
        assert_eq!((g.status, g.body.as_slice()), (200, &b"doc"[..]), "{h}");
        heads += 1;
        assert_eq!(count(&origin, "HEAD", "/doc"), heads, "{h}: validated first");
    }
    for h in ["Cache-Control: max-age=1000", "Cache-Control: max-stale=5"] {
        assert_eq!(get(&gw, "/doc", &["-H", h]).status, 200);
    }
    assert_eq!(count(&origin, "HEAD", "/doc"), heads, "fresh enough: no request");
    // max-age=0 accepts an age of 0 only.
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(get(&gw, "/doc", &["-H", "Cache-Control: max-age=0"]).status, 200);
    assert_eq!(count(&origin, "HEAD", "/doc"), heads + 1, "max-age=0: validated first");
    assert_eq!(count(&origin, "GET", "/doc"), 1);
}

#[test]
fn a_304_updates_the_stored_fields_and_freshness() {
    let origin = ScriptOrigin::start(|s| {
        if s.header("if-none-match") == Some("\"u\"") {
            return Reply::new(
                304,
                &[("etag", "\"u\""), ("cache-control", "max-age=600"), ("x-version", "2")],
                b"",
            );
        }
        ranged(
            s,
            b"updated",
            &[
                ("etag", "\"u\""),
                ("cache-control", "max-age=1"),
                ("x-version", "1"),
                ("x-kept", "k"),
            ],
        )
    });
    let mut gw = node(&origin, "");
    assert_eq!(get(&gw, "/u", &[]).header("x-version"), Some("1"));
    std::thread::sleep(Duration::from_millis(1200));
    let g = get(&gw, "/u", &[]);
    assert_eq!(g.body, b"updated");
    assert_eq!(
        g.header("x-version"),
        Some("2"),
        "the 304's fields replace the stored ones"
    );
    assert_eq!(g.header("x-kept"), Some("k"), "fields the 304 does not carry stay");
    assert_eq!(g.header("cache-control"), Some("max-age=600"));
    assert_eq!(count(&origin, "HEAD", "/u"), 1);
    gw.restart();
    let g = get(&gw, "/u", &[]);
    assert_eq!(g.header("x-version"), Some("2"), "kept across a restart");
    assert_eq!(
        count(&origin, "HEAD", "/u") + count(&origin, "GET", "/u"),
        2,
        "fresh for 600 s now"
    );
}

#[test]
fn stale_responses_are_served_only_where_allowed_and_every_5xx_is_logged() {
    let origin = ScriptOrigin::start(|s| {
        let cc = match s.path.as_str() {
            "/strict" => "max-age=1, must-revalidate",
            "/shared" => "max-age=600, s-maxage=1",
            "/no-cache" => "no-cache",
            _ => "max-age=1",
        };
        object(s, b"kept", "\"k\"", &[("cache-control", cc)])
    });
    let gw = node(&origin, "");
    let paths = ["/plain", "/strict", "/shared", "/no-cache"];
    for p in paths {
        assert_eq!(get(&gw, p, &[]).status, 200);
    }
    std::thread::sleep(Duration::from_millis(1200));
    origin.set_down(true);
    let g = get(&gw, "/plain", &[]);
    assert_eq!(
        (g.status, g.body.as_slice()),
        (200, &b"kept"[..]),
        "served stale: the origin is down"
    );
    for p in ["/strict", "/shared", "/no-cache"] {
        assert_eq!(get(&gw, p, &[]).status, 504, "{p} may not be served stale");
    }
    let g = get(&gw, "/plain", &["-H", "Cache-Control: no-cache"]);
    assert_eq!(g.status, 504, "the client asked for a validated response");
    // A miss with the origin down: 502.
    assert_eq!(get(&gw, "/cold", &[]).status, 502);
    let log = gw.log();
    let logged = log.matches("cache: answering with a server error").count();
    assert!(logged >= 5, "every 5xx is logged with why ({logged}):\n{log}");
    assert!(log.contains("may not be served stale"), "{log}");
    assert!(gw.metric("holdfast_cache_events_total{event=\"served-stale\"}") >= 1.0);
}

#[test]
fn a_miss_costs_exactly_one_upstream_request() {
    let big = data(4, 300_000);
    let served = big.clone();
    let origin = ScriptOrigin::start(move |s| match s.path.as_str() {
        // A 200 of unknown length, whatever the Range.
        "/chunked" => Reply::new(200, &[("etag", "\"c\""), ("transfer-encoding", "chunked")], &served),
        "/no-validator" => ranged(s, &served, &[("cache-control", "max-age=600")]),
        _ => object(s, &served, "\"b\"", &[("cache-control", "max-age=600")]),
    });
    let gw = node(&origin, "");
    let cases: [(&str, &[&str], &[u8]); 7] = [
        ("/plain", &[], &big),
        ("/head", &["-I"], b""),
        ("/middle", &["-r", "100000-100099"], &big[100_000..100_100]),
        ("/two-ranges", &["-r", "0-9,250000-250009"], b""),
        ("/tail", &["-r", "-100"], &big[big.len() - 100..]),
        ("/chunked", &[], &big),
        ("/no-validator", &[], &big),
    ];
    for (path, args, want) in cases {
        origin.clear();
        let g = get(&gw, path, args);
        assert!(g.status == 200 || g.status == 206, "{path}: {}", g.status);
        if !want.is_empty() {
            assert!(g.body == want, "{path}: other bytes");
        }
        assert_eq!(origin.seen().len(), 1, "{path}: one upstream request for one miss");
    }
    // The tail's length is known now: the next tail request is an aligned
    // fill that is stored, and the one after is a hit.
    origin.clear();
    assert!(get(&gw, "/tail", &["-r", "-100"]).body == big[big.len() - 100..]);
    assert_eq!(origin.seen().len(), 1);
    assert!(get(&gw, "/tail", &["-r", "-100"]).body == big[big.len() - 100..]);
    assert_eq!(origin.seen().len(), 1, "stored");
}

#[test]
fn partial_answers_from_the_origin_are_stored_and_served() {
    let obj = data(5, 300_000);
    let origin = ScriptOrigin::start(move |s| {
        let fields = [("etag", "\"p\""), ("cache-control", "max-age=600")];
        let len = obj.len();
        // What the client asked for, as the origin sees it.
        let asked = s
            .header("range")
            .and_then(|r| r.strip_prefix("bytes="))
            .and_then(|r| r.split_once('-'))
            .and_then(|(a, b)| Some((a.parse::<usize>().ok()?, b.parse::<usize>().ok())));
        let part = |a: usize, b: usize| {
            let mut r = Reply::new(206, &fields, &obj[a..=b]);
            r.headers.push(("content-range".into(), format!("bytes {a}-{b}/{len}")));
            r
        };
        match (s.path.as_str(), asked) {
            // Ignores Range: the whole object with 200.
            ("/ignores", _) => Reply::new(200, &fields, &obj),
            // Answers at most 100,000 bytes, ending inside a block.
            ("/short", Some((a, b))) => part(a, b.unwrap_or(len - 1).min(a + 99_999).min(len - 1)),
            // Answers from byte 0 whatever was asked.
            ("/wider", Some(_)) => part(0, len - 1),
            // Answers from 10 bytes later than asked.
            ("/later", Some((a, b))) => part(a + 10, b.unwrap_or(len - 1).min(len - 1)),
            _ => ranged(s, &obj, &fields),
        }
    });
    let obj = data(5, 300_000);
    let gw = node(&origin, "");
    for path in ["/ignores", "/short", "/wider", "/later"] {
        let g = get(&gw, path, &["-r", "70000-170000"]);
        assert_eq!(g.status, 206, "{path}: {}", gw.describe());
        assert!(g.body == obj[70_000..=170_000], "{path}: other bytes");
        assert_eq!(g.header("content-range"), Some("bytes 70000-170000/300000"), "{path}");
    }
    // What the first answers stored is served without asking again.
    for path in ["/ignores", "/short", "/wider"] {
        let before = count(&origin, "GET", path);
        let g = get(&gw, path, &["-r", "70000-130000"]);
        assert!(g.body == obj[70_000..=130_000], "{path}");
        assert_eq!(count(&origin, "GET", path), before, "{path}: stored");
        let cs = g.header("cache-status").unwrap_or("");
        assert!(cs.starts_with("holdfast-rp; hit"), "{path}: {cs}");
    }
    assert!(
        !gw.log().contains("cache: answering with a server error"),
        "no 5xx: {}",
        gw.log()
    );
}

// Issue 28: attacks on the cache, kept as regression tests.

/// A connection to the cache on `port` from source address `src` (any
/// 127.0.0.0/8 address works on loopback): one client per address.
fn connect_from(src: &str, port: u16) -> std::net::TcpStream {
    use rustix::net::{AddressFamily, SocketType, bind, connect, socket};
    let fd = socket(AddressFamily::INET, SocketType::STREAM, None).unwrap();
    let src: std::net::SocketAddr = format!("{src}:0").parse().unwrap();
    bind(&fd, &src).unwrap();
    connect(&fd, &std::net::SocketAddr::from(([127, 0, 0, 1], port))).unwrap();
    std::net::TcpStream::from(fd)
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    while !f() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Slow clients: each connection sends the start of a request head, then
/// one more header line every half second from a background thread, and
/// never ends the head.
struct Slowloris {
    port: u16,
    conns: std::sync::Arc<std::sync::Mutex<Vec<(String, std::net::TcpStream)>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Slowloris {
    fn start(port: u16) -> Slowloris {
        let conns: std::sync::Arc<std::sync::Mutex<Vec<(String, std::net::TcpStream)>>> = Default::default();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (c, s) = (conns.clone(), stop.clone());
        std::thread::spawn(move || {
            while !s.load(std::sync::atomic::Ordering::SeqCst) {
                for (_, conn) in c.lock().unwrap().iter_mut() {
                    let _ = std::io::Write::write_all(conn, b"x-slow: 1\r\n");
                }
                std::thread::sleep(Duration::from_millis(500));
            }
        });
        Slowloris { port, conns, stop }
    }

    /// Opens `n` slow connections from `src`.
    fn open(&self, src: &str, n: usize) {
        for _ in 0..n {
            let mut c = connect_from(src, self.port);
            let _ = std::io::Write::write_all(&mut c, b"GET /doc HTTP/1.1\r\nhost: site.test\r\n");
            self.conns.lock().unwrap().push((src.to_string(), c));
        }
    }

    /// Connections from `src` the cache still holds open without a word.
    fn held(&self, src: &str) -> usize {
        let mut buf = [0u8; 256];
        let mut open = 0;
        for (s, c) in self.conns.lock().unwrap().iter_mut() {
            if s != src {
                continue;
            }
            c.set_nonblocking(true).unwrap();
            let read = std::io::Read::read(c, &mut buf);
            c.set_nonblocking(false).unwrap();
            if matches!(read, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock) {
                open += 1;
            }
        }
        open
    }
}

impl Drop for Slowloris {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Issue 28, item 5: 1,024 connections from one client, each sending a
/// header line now and then, held every slot of the cache's listener. Now
/// one client holds at most `max_connections_per_ip`, and once only the
/// reserved share is left, only clients holding nothing get a slot.
#[test]
fn slow_clients_do_not_lock_another_client_out() {
    let doc = data(9, 2000);
    let d = doc.clone();
    let origin = ScriptOrigin::start(move |s| object(s, &d, "\"s\"", &[("cache-control", "max-age=600")]));
    let port = free_port();
    let mut gw = Gateway::start_named(
        "slow",
        &format!(
            "[cache]\nlisten = \"127.0.0.1:{port}\"\nmax_connections = 32\nmax_connections_per_ip = 8\n\
             reserved_connections_percent = 25\nheader_timeout_ms = 120000\n{}",
            origin.source(HOST, "")
        ),
    );
    gw.cache = port;
    let event = |e: &str| gw.metric(&format!("holdfast_cache_events_total{{event=\"{e}\"}}"));
    let victim = |gw: &Gateway| curl_host(gw.cache, HOST, "/doc", &["--interface", "127.0.0.2"]);

    // One client opens more connections than the listener has slots.
    let slow = Slowloris::start(port);
    slow.open("127.0.0.1", 40);
    // The listener takes connections in order: by the time it has refused
    // the eighth of these, it has seen them all, and the victim comes next.
    wait_for("refusals", || {
        event("connection-refused-per-ip") + event("connection-refused") >= 8.0
    });
    let g = victim(&gw);
    assert_eq!(
        (g.status, g.body == doc),
        (200, true),
        "another client is served: {}",
        gw.describe()
    );
    assert_eq!(event("connection-refused-per-ip"), 32.0);
    assert_eq!(slow.held("127.0.0.1"), 8, "one client holds its share only");

    // Clients from more addresses take 8 + 8 + 7 of the 24 shared slots.
    // The next one takes the last shared slot (or, if the victim's finished
    // connection is not closed yet, a reserved one) and is then refused
    // every further one, as is anyone who already holds a connection.
    slow.open("127.0.0.3", 8);
    slow.open("127.0.0.4", 7);
    slow.open("127.0.0.5", 8);
    wait_for("reserve refusals", || event("connection-refused-reserved") >= 7.0);
    assert_eq!(
        [1, 3, 4, 5].map(|i| slow.held(&format!("127.0.0.{i}"))),
        [8, 8, 7, 1],
        "{}",
        gw.describe()
    );
    assert_eq!(event("connection-refused-reserved"), 7.0);
    slow.open("127.0.0.4", 1);
    wait_for("a reserve refusal", || event("connection-refused-reserved") >= 8.0);
    // A newcomer still gets in, repeatedly (each request frees its slot).
    for _ in 0..3 {
        let g = victim(&gw);
        assert_eq!(
            g.status,
            200,
            "a new client is served from the reserve: {}",
            gw.describe()
        );
    }
    assert_eq!(event("connection-refused"), 0.0, "the listener was never full");
}

/// Issue 28, item 5: the request head has a total deadline, however
/// steadily its bytes come.
#[test]
fn a_request_head_that_never_ends_is_cut_at_the_deadline() {
    let doc = data(10, 100);
    let d = doc.clone();
    let origin = ScriptOrigin::start(move |s| object(s, &d, "\"t\"", &[]));
    let port = free_port();
    let mut gw = Gateway::start_named(
        "head",
        &format!(
            "[cache]\nlisten = \"127.0.0.1:{port}\"\nheader_timeout_ms = 1000\n{}",
            origin.source(HOST, "")
        ),
    );
    gw.cache = port;
    let mut c = connect_from("127.0.0.1", port);
    std::io::Write::write_all(&mut c, b"GET /doc HTTP/1.1\r\nhost: site.test\r\n").unwrap();
    c.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    let started = std::time::Instant::now();
    let mut buf = [0u8; 1024];
    // Ten header lines a second: no gap between reads is ever long.
    loop {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "still open after 20 s of a never-ending head"
        );
        match std::io::Read::read(&mut c, &mut buf) {
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            _ => break,
        }
        if std::io::Write::write_all(&mut c, b"x-slow: 1\r\n").is_err() {
            break;
        }
    }
    eprintln!("a never-ending head was cut after {:?}", started.elapsed());
    wait_for("the header-timeout event", || {
        gw.metric("holdfast_cache_events_total{event=\"header-timeout\"}") >= 1.0
    });
    let g = get(&gw, "/doc", &[]);
    assert_eq!((g.status, g.body == doc), (200, true), "{}", gw.describe());
}

/// Issue 28, item 4: when the content-source plugin failed (it was made to
/// run past its deadline), the default failure policy forwarded the request,
/// POST body included, to whatever host the client named. Now it forwards
/// only to the origin the configuration names for that host, and refuses
/// the rest.
#[test]
fn a_failing_content_source_never_forwards_to_an_unconfigured_host() {
    let evil = ScriptOrigin::start(|_| Reply::new(200, &[("x-evil", "1")], b"evil"));
    let good = ScriptOrigin::start(|s| Reply::new(200, &[("x-method", s.method.as_str())], &s.body));
    let port = free_port();
    let mut gw = Gateway::start_named(
        "fail",
        &format!(
            "[cache]\nlisten = \"127.0.0.1:{port}\"\n[plugins.content-source]\nfile = {:?}\n\
             [[plugins.content-source.config.sources]]\nname = \"site\"\nhosts = [\"{HOST}\"]\n\
             origin = \"http://127.0.0.1:{}\"\n",
            holdfast_plugins::artifacts::TEST_CONTENT_SOURCE_WASM,
            good.port
        ),
    );
    gw.cache = port;
    let evil_host = format!("127.0.0.1:{}", evil.port);
    for path in ["/hostile/loop", "/hostile/trap", "/hostile/bomb"] {
        let absolute = format!("http://{evil_host}{path}");
        // The host in the Host field, then as an absolute URI (proxy form).
        for extra in [&[][..], &["--request-target", absolute.as_str()][..]] {
            let mut args = vec!["--data-binary", "secret"];
            args.extend_from_slice(extra);
            let g = curl_host(gw.cache, &evil_host, path, &args);
            assert_eq!(g.status, 403, "{path} {extra:?}: {}", gw.describe());
            let text = String::from_utf8_lossy(&g.body);
            assert!(text.contains("no configured origin"), "{text}");
        }
    }
    assert!(evil.seen().is_empty(), "the cache reached {:?}", evil.seen());
    // The configured host still reaches its configured origin, uncached.
    let g = curl_host(gw.cache, HOST, "/hostile/loop", &["--data-binary", "mine"]);
    assert_eq!((g.status, g.body.as_slice()), (200, &b"mine"[..]), "{}", gw.describe());
    assert_eq!(g.header("x-method"), Some("POST"));
    assert_eq!(count(&good, "POST", "/hostile/loop"), 1);
    for kind in ["timeout", "trap", "memory"] {
        let failures = gw.metric(&format!(
            "holdfast_plugin_failures_total{{slot=\"content-source\",kind=\"{kind}\"}}"
        ));
        assert!(failures >= 2.0, "{kind}: {failures}: the plugin really failed");
    }
}

/// Issue 28, item 4, the attack itself: a pattern with two `**` and a long
/// crafted path made the default plugin's glob match run past its deadline,
/// and the failure policy then forwarded to the host the client named
/// (here through `cacheHostOrigin`, which picks the source). The match is
/// linear now: the plugin answers, and its answer is the configured one.
#[test]
fn a_crafted_path_does_not_make_the_content_source_fail() {
    let evil = ScriptOrigin::start(|_| Reply::new(200, &[], b"evil"));
    let pkg = data(11, 5000);
    let p = pkg.clone();
    let good = ScriptOrigin::start(move |s| ranged(s, &p, &[("etag", "\"p\"")]));
    let port = free_port();
    let mut gw = Gateway::start_named(
        "glob",
        &format!(
            "[cache]\nlisten = \"127.0.0.1:{port}\"\n\
             [[plugins.content-source.config.sources]]\nname = \"repo\"\nhosts = [\"repo.test\"]\n\
             origin = \"http://127.0.0.1:{}\"\nimmutable = [\"/**/pool/**/*.deb\"]\n\
             revalidate = [\"/**/dists/**/InRelease\"]\nother = \"deny\"\n",
            good.port
        ),
    );
    gw.cache = port;
    // About 60 KiB (a request target stays under 64 KiB).
    let crafted = |tail: &str| {
        let mut s = String::from("/");
        while s.len() < 60 << 10 {
            s.push_str("pool/");
        }
        s.push_str(tail);
        s
    };
    let evil_host = format!("127.0.0.1:{}", evil.port);
    let no_class = format!("{}?cacheHostOrigin=repo.test", crafted("dists/x.deb/"));
    for args in [&[][..], &["--data-binary", "secret"][..]] {
        let g = curl_host(gw.cache, &evil_host, &no_class, args);
        assert_eq!(g.status, 403, "{}", gw.describe());
        let text = String::from_utf8_lossy(&g.body);
        assert!(
            text.contains("is not served for repo"),
            "the plugin's own answer: {text}"
        );
    }
    let deb = crafted("x.deb");
    let g = curl_host(gw.cache, &evil_host, &format!("{deb}?cacheHostOrigin=repo.test"), &[]);
    assert_eq!((g.status, g.body == pkg), (200, true), "{}", gw.describe());
    assert!(
        good.seen().iter().any(|s| s.path == deb),
        "fetched from the configured origin"
    );
    assert!(evil.seen().is_empty(), "the cache reached {:?}", evil.seen().len());
    for kind in ["timeout", "trap", "memory", "unavailable"] {
        assert_eq!(
            gw.metric(&format!(
                "holdfast_plugin_failures_total{{slot=\"content-source\",kind=\"{kind}\"}}"
            )),
            0.0,
            "{kind}"
        );
    }
}
