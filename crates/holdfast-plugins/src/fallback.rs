//! What the content-source slot answers when its plugin fails.
//!
//! A plugin failure must never widen what the cache reaches. With
//! `on_failure = "pass-through"` a request is forwarded, uncached, only to
//! the origin the slot's configuration names for the request's host: the
//! `sources` of `[plugins.content-source.config]` in the default plugin's
//! schema (`hosts`, `origin`), matched as the default plugin matches them
//! (a name in `hosts`, any port; or the origin's own host and port). Any
//! other request is refused with 403, as with `on_failure = "deny"`. The
//! host the client named is never the destination by itself: a client that
//! makes the plugin fail (a crafted path, a heavy request) gets nothing it
//! could not get while the plugin works.
//!
//! `cacheHostOrigin` is not honoured here: on failure a Delivery
//! Optimization request addressed to the cache itself is refused.

use serde::Deserialize;

use crate::config::ContentFailurePolicy;
use crate::{ContentDecision, Failure, RequestHead};

#[derive(Debug, Default, Deserialize)]
struct Settings {
    #[serde(default)]
    sources: Vec<SourceEntry>,
}

/// The keys of one source this module reads; the rest are the plugin's.
#[derive(Debug, Deserialize)]
struct SourceEntry {
    #[serde(default)]
    hosts: Vec<String>,
    #[serde(default)]
    origin: Option<String>,
}

/// One configured origin and the hosts it answers for.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    /// Lowercase.
    hosts: Vec<String>,
    /// The origin's own host (lowercase) and port.
    authority: (String, u16),
    origin: String,
}

/// The origins a content-source config names, by host.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Origins {
    entries: Vec<Entry>,
}

/// Host and port of an `http(s)://host[:port]` URL.
fn authority_of(url: &str) -> Option<(String, u16)> {
    let (default, rest) = match url.split_once("://")? {
        ("http", r) => (80, r),
        ("https", r) => (443, r),
        _ => return None,
    };
    let auth = rest.split(['/', '?', '#']).next()?;
    if auth.is_empty() || auth.contains('@') {
        return None;
    }
    if let Some(v6) = auth.strip_prefix('[') {
        let (h, p) = v6.split_once(']')?;
        let port = match p.strip_prefix(':') {
            Some(p) => p.parse().ok()?,
            None if p.is_empty() => default,
            None => return None,
        };
        return Some((h.to_ascii_lowercase(), port));
    }
    match auth.rsplit_once(':') {
        Some((h, p)) => Some((h.to_ascii_lowercase(), p.parse().ok()?)),
        None => Some((auth.to_ascii_lowercase(), default)),
    }
}

impl Origins {
    /// The `sources` of a content-source config (JSON). A config of another
    /// shape, or a source without a valid `http(s)://` origin, names nothing.
    pub(crate) fn from_config(json: &str) -> Origins {
        let settings: Settings = serde_json::from_str(json).unwrap_or_default();
        let entries = settings
            .sources
            .into_iter()
            .filter_map(|s| {
                let origin = s.origin?;
                let authority = authority_of(&origin)?;
                Some(Entry {
                    hosts: s.hosts.iter().map(|h| h.to_ascii_lowercase()).collect(),
                    authority,
                    origin,
                })
            })
            .collect();
        Origins { entries }
    }

    /// The origin configured for `host` (lowercase) and `port`, if any.
    pub(crate) fn origin_for(&self, host: &str, port: Option<u16>) -> Option<&str> {
        self.entries
            .iter()
            .find(|e| {
                e.hosts.iter().any(|h| h.eq_ignore_ascii_case(host))
                    || (e.authority.0.eq_ignore_ascii_case(host) && port.is_none_or(|p| p == e.authority.1))
            })
            .map(|e| e.origin.as_str())
    }
}

/// The decision for a request whose classification failed.
pub(crate) fn decide(
    policy: ContentFailurePolicy,
    origins: &Origins,
    request: &RequestHead,
    failure: &Failure,
) -> ContentDecision {
    match policy {
        ContentFailurePolicy::PassThrough => match origins.origin_for(&request.host, request.port) {
            Some(origin) => ContentDecision::PassThrough(origin.to_string()),
            None => ContentDecision::Deny(format!(
                "content-source plugin failed ({failure}); host {:?} has no configured origin, so the \
                 request is refused (policy pass-through forwards only to configured origins)",
                request.host
            )),
        },
        ContentFailurePolicy::Deny => {
            ContentDecision::Deny(format!("content-source plugin failed ({failure}); policy deny"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::FailureKind;

    fn failure() -> Failure {
        Failure {
            kind: FailureKind::Timeout,
            message: "deadline".into(),
        }
    }

    fn head(host: &str, port: Option<u16>) -> RequestHead {
        RequestHead {
            method: "POST".into(),
            host: host.into(),
            port,
            path_and_query: "/x".into(),
            headers: Vec::new(),
        }
    }

    const CONFIG: &str = r#"{"sources":[
        {"name":"debian","hosts":["deb.debian.org","FTP.debian.org"],"origin":"https://deb.debian.org",
         "immutable":["/**/*.deb"],"other":"deny"},
        {"name":"local","hosts":["repo.test"],"origin":"http://127.0.0.1:8999/base"},
        {"name":"bad","hosts":["bad.test"],"origin":"ftp://bad.test"}]}"#;

    /// Issue 28, item 4: a failed classification used to forward to
    /// `http://<the host the client named>`, whatever it was.
    #[test]
    fn pass_through_forwards_only_to_a_configured_origin() {
        let o = Origins::from_config(CONFIG);
        let pass = |host: &str, port| decide(ContentFailurePolicy::PassThrough, &o, &head(host, port), &failure());
        assert_eq!(
            pass("deb.debian.org", None),
            ContentDecision::PassThrough("https://deb.debian.org".into())
        );
        assert_eq!(
            pass("ftp.debian.org", Some(8080)),
            ContentDecision::PassThrough("https://deb.debian.org".into())
        );
        // The origin itself (as a child cache asks), on its port only.
        assert_eq!(
            pass("127.0.0.1", Some(8999)),
            ContentDecision::PassThrough("http://127.0.0.1:8999/base".into())
        );
        for (host, port) in [
            ("127.0.0.1", Some(9000)),
            ("evil.example", None),
            ("evil.example", Some(8999)),
            ("10.0.0.1", Some(80)),
            ("bad.test", None),
        ] {
            let d = pass(host, port);
            let ContentDecision::Deny(why) = &d else {
                panic!("{host}:{port:?} was not refused: {d:?}")
            };
            assert!(why.contains("no configured origin"), "{why}");
        }
    }

    #[test]
    fn deny_refuses_everything_and_other_configs_name_nothing() {
        let o = Origins::from_config(CONFIG);
        let d = decide(
            ContentFailurePolicy::Deny,
            &o,
            &head("deb.debian.org", None),
            &failure(),
        );
        assert!(
            matches!(d, ContentDecision::Deny(ref w) if w.contains("policy deny")),
            "{d:?}"
        );
        for config in [
            "{}",
            "not json",
            r#"{"sources":"x"}"#,
            r#"{"sources":[{"hosts":["a"]}]}"#,
            "[]",
        ] {
            assert_eq!(Origins::from_config(config), Origins::default(), "{config}");
        }
        assert_eq!(Origins::from_config("{}").origin_for("a", None), None);
    }

    #[test]
    fn authorities() {
        assert_eq!(authority_of("https://[::1]/"), Some(("::1".into(), 443)));
        assert_eq!(
            authority_of("http://Deb.Debian.org"),
            Some(("deb.debian.org".into(), 80))
        );
        assert_eq!(authority_of("http://h:81?x"), Some(("h".into(), 81)));
        assert_eq!(authority_of("http://u@h/"), None);
        assert_eq!(authority_of("http:///x"), None);
        assert_eq!(authority_of("http://h:x"), None);
    }
}
