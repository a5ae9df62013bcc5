//! Requests to the origin or the parent cache: the headers sent, the labels counted.

#[allow(unused_imports)]
use super::*;

impl Cache {
    pub(crate) fn upstream_label(&self) -> &'static str {
        if self.client.via_parent() { "parent" } else { "origin" }
    }

    /// Headers every upstream request carries: the loop guard, identity
    /// encoding (ranges of an encoded body are not ranges of the object).
    pub fn upstream_headers(
        &self,
        via: Option<&str>,
        cdn_loop: Option<&str>,
    ) -> Vec<(hyper::header::HeaderName, String)> {
        let mine_via = format!("1.1 {}", self.token);
        let via = match via {
            Some(v) if !v.is_empty() => format!("{v}, {mine_via}"),
            _ => mine_via,
        };
        let cdn = match cdn_loop {
            Some(v) if !v.is_empty() => format!("{v}, {}", self.token),
            _ => self.token.clone(),
        };
        vec![
            (hyper::header::VIA, via),
            (hyper::header::HeaderName::from_static("cdn-loop"), cdn),
            (hyper::header::ACCEPT_ENCODING, "identity".into()),
            (
                hyper::header::USER_AGENT,
                concat!("holdfast/", env!("CARGO_PKG_VERSION")).into(),
            ),
        ]
    }

    pub(crate) fn upstream_labels(&self, plan: &Plan) -> CacheUpstreamLabels {
        CacheUpstreamLabels {
            source: plan.source.clone(),
            upstream: self.upstream_label(),
        }
    }

    /// Sends one request for the plan's object upstream (counted), with the
    /// standard headers and one more.
    pub(crate) async fn upstream(
        &self,
        plan: &Plan,
        method: hyper::Method,
        extra: (hyper::header::HeaderName, String),
    ) -> Result<hyper::Response<hyper::body::Incoming>, upstream::UpstreamError> {
        let mut headers = self.upstream_headers(None, None);
        headers.push(extra);
        self.metrics
            .cache_upstream_requests
            .get_or_create(&self.upstream_labels(plan))
            .inc();
        self.client
            .send(&method, &plan.origin, &plan.origin_path, &headers)
            .await
    }
}
