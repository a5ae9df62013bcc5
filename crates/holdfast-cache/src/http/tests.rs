use super::cached::cold_target;
use super::*;
use crate::range;

fn parts(uri: &str, host: Option<&str>) -> Parts {
    let mut b = Request::builder().uri(uri);
    if let Some(h) = host {
        b = b.header(header::HOST, h);
    }
    b.body(()).unwrap().into_parts().0
}

#[test]
fn targets() {
    let t = target(&parts("/pool/a.deb?x=1", Some("Deb.Debian.org:8080"))).unwrap();
    assert_eq!(
        t,
        Target {
            host: "deb.debian.org".into(),
            port: Some(8080),
            path_and_query: "/pool/a.deb?x=1".into()
        }
    );
    let t = target(&parts("http://deb.debian.org/debian/InRelease", Some("ignored"))).unwrap();
    assert_eq!((t.host.as_str(), t.port), ("deb.debian.org", None));
    assert_eq!(t.path_and_query, "/debian/InRelease");
    assert!(target(&parts("/x", None)).is_none());
    let t = target(&parts("/x", Some("[::1]:81"))).unwrap();
    assert_eq!(t.host, "::1");
}

#[test]
fn loop_guard() {
    let mut h = HeaderMap::new();
    h.insert("cdn-loop", HeaderValue::from_static("holdfast-a, holdfast-b; x=1"));
    assert!(is_loop(&h, "holdfast-b"));
    assert!(is_loop(&h, "holdfast-a"));
    assert!(!is_loop(&h, "holdfast-c"));
    let mut h = HeaderMap::new();
    h.insert(header::VIA, HeaderValue::from_static("1.1 proxy, 1.1 holdfast-c"));
    assert!(is_loop(&h, "holdfast-c"));
    assert_eq!(client_kind(&h), "child-cache");
    assert_eq!(client_kind(&HeaderMap::new()), "client");
}

#[test]
fn cold_targets_are_block_aligned() {
    let bs = 1 << 20;
    assert_eq!(cold_target(None, bs, None), (0, None));
    let s = range::parse("bytes=3145728-").unwrap();
    assert_eq!(cold_target(Some(&s), bs, None), (3, None));
    let s = range::parse("bytes=100-200").unwrap();
    assert_eq!(cold_target(Some(&s), bs, None), (0, Some(bs - 1)));
    let s = range::parse("bytes=1048570-1048580").unwrap();
    assert_eq!(cold_target(Some(&s), bs, None), (0, Some(2 * bs - 1)));
    let s = range::parse("bytes=-10").unwrap();
    assert_eq!(cold_target(Some(&s), bs, None), (0, Some(bs - 1)));
    // Several ranges: one fill from the first to the last block asked for.
    let s = range::parse("bytes=5242880-5242889,100-199").unwrap();
    assert_eq!(cold_target(Some(&s), bs, None), (0, Some(6 * bs - 1)));
    let s = range::parse("bytes=3145728-,100-199").unwrap();
    assert_eq!(cold_target(Some(&s), bs, None), (0, None));
    // A known length places a suffix.
    let s = range::parse("bytes=-10").unwrap();
    assert_eq!(cold_target(Some(&s), bs, Some(10 * bs)), (9, Some(10 * bs - 1)));
    let s = range::parse("bytes=-10,0-5").unwrap();
    assert_eq!(cold_target(Some(&s), bs, Some(3 * bs)), (0, Some(3 * bs - 1)));
    assert_eq!(align_end(1, bs), bs - 1);
    assert_eq!(align_end(bs, bs), bs - 1);
    assert_eq!(align_end(bs + 1, bs), 2 * bs - 1);
}
