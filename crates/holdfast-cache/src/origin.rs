//! Requests to the origin or the parent cache: the upstream client, this
//! node's loop-guard token, the fields a forwarded request carries, and
//! the upstream requests counted.

use std::sync::Arc;
use std::time::Duration;

use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};

use crate::counters::Counters;
use crate::metrics::UpstreamLabels;
use crate::upstream::{self, Client};
use crate::{Plan, rfc9111};

/// Request fields a fill never forwards: it asks for its own aligned range,
/// unconditionally, in the identity encoding (ranges of an encoded body are
/// not ranges of the object).
const FILL_OWN: [HeaderName; 7] = [
    header::RANGE,
    header::IF_RANGE,
    header::IF_MATCH,
    header::IF_NONE_MATCH,
    header::IF_MODIFIED_SINCE,
    header::IF_UNMODIFIED_SINCE,
    header::ACCEPT_ENCODING,
];

/// Whether a forwarded message is a fill (the cache's own request for an
/// aligned range) or passes the client's request on as it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forward {
    /// A fill or a revalidation.
    Fill,
    /// A pass-through: the client's Range and conditionals go as sent.
    Pass,
}

/// The way upstream (see the module docs).
pub(crate) struct Origin {
    client: Client,
    /// This node's `CDN-Loop` / `Via` token.
    token: String,
    counters: Arc<Counters>,
}

impl Origin {
    /// Requests through `client`, marked with node `node_id`'s token.
    pub(crate) fn new(client: Client, node_id: &str, counters: Arc<Counters>) -> Origin {
        let token: String = node_id
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        Origin {
            client,
            token: format!("holdfast-{token}"),
            counters,
        }
    }

    pub(crate) fn client(&self) -> &Client {
        &self.client
    }

    /// This node's loop-guard token (`holdfast-<node id>`).
    pub(crate) fn token(&self) -> &str {
        &self.token
    }

    /// How long an upstream may stall.
    pub(crate) fn timeout(&self) -> Duration {
        self.client.timeout()
    }

    fn label(&self) -> &'static str {
        if self.client.via_parent() { "parent" } else { "origin" }
    }

    /// The upstream metric labels for the plan's source.
    pub(crate) fn labels(&self, plan: &Plan) -> UpstreamLabels {
        UpstreamLabels {
            source: plan.source.clone(),
            upstream: self.label(),
        }
    }

    /// The fields of a request sent upstream for a client's request with
    /// fields `client` (RFC 9110 §7.6): its end-to-end fields (hop-by-hop
    /// ones and those its `Connection` names dropped; `Host` and framing
    /// set by the client library), this node added to `Via` and
    /// `CDN-Loop` (the loop guard), and for a fill no Range, conditionals
    /// or content codings of the client's.
    pub(crate) fn forward_fields(&self, client: &HeaderMap, kind: Forward) -> HeaderMap {
        let mut out = HeaderMap::new();
        for (k, v) in rfc9111::end_to_end(client) {
            let own = matches!(k.as_str(), "host" | "content-length" | "expect" | "via" | "cdn-loop");
            if own || (kind == Forward::Fill && FILL_OWN.contains(k)) {
                continue;
            }
            out.append(k.clone(), v.clone());
        }
        let joined = |name: &str| {
            client
                .get_all(name)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .filter(|v| !v.trim().is_empty())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let via = match joined("via") {
            v if v.is_empty() => format!("1.1 {}", self.token),
            v => format!("{v}, 1.1 {}", self.token),
        };
        let cdn = match joined("cdn-loop") {
            v if v.is_empty() => self.token.clone(),
            v => format!("{v}, {}", self.token),
        };
        for (name, value) in [(header::VIA, via), (HeaderName::from_static("cdn-loop"), cdn)] {
            if let Ok(v) = HeaderValue::from_str(&value) {
                out.insert(name, v);
            }
        }
        if kind == Forward::Fill {
            out.insert(header::ACCEPT_ENCODING, HeaderValue::from_static("identity"));
        }
        if !out.contains_key(header::USER_AGENT) {
            out.insert(
                header::USER_AGENT,
                HeaderValue::from_static(concat!("holdfast/", env!("CARGO_PKG_VERSION"))),
            );
        }
        out
    }

    /// Sends one request for the plan's object upstream (counted), with the
    /// client's forwarded fields and one more.
    pub(crate) async fn send(
        &self,
        plan: &Plan,
        method: hyper::Method,
        extra: (HeaderName, String),
    ) -> Result<hyper::Response<hyper::body::Incoming>, upstream::UpstreamError> {
        let mut fields = plan.fields.clone();
        if let Ok(v) = HeaderValue::from_str(&extra.1) {
            fields.insert(extra.0, v);
        }
        self.counters.upstream_request(&self.labels(plan));
        self.client
            .send(&method, &plan.origin, &plan.origin_path, &fields, None)
            .await
    }
}
