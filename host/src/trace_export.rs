//! `[trace]`: traces of messages across hops. The spans a node records
//! (`holdfast_model::trace`) are exported as OTLP over HTTP (protobuf,
//! `POST <endpoint>`, the OpenTelemetry collector's `/v1/traces`). Spans
//! wait in a bounded ring while the endpoint cannot be reached (a site
//! offline), and go with their original times once it can; a failed export
//! is retried with back-off, and at once when the upstream link comes back.

use std::sync::Arc;
use std::time::Duration;

use holdfast_metrics::{Counter, Family, Gauge, handle};
use holdfast_model::trace::{self, AttrValue, SpanKind, SpanRecord};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span, Status, span, status};
use prost::Message as _;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

/// `[trace]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TraceConfig {
    /// Record and export spans. Default false: no span is recorded, and the
    /// hooks cost one atomic load. Restart-only.
    pub enabled: bool,
    /// The OTLP/HTTP traces endpoint (protobuf), `http://…`. Default
    /// `http://127.0.0.1:4318/v1/traces` (a collector on the node).
    pub endpoint: String,
    /// Share of messages arriving without a `traceparent` that start a
    /// trace here (0-1). Messages with one follow its sampled flag. Default 1.
    pub sample_ratio: f64,
    /// Spans kept waiting for export, at most (the oldest go). Default 10000.
    pub max_spans: usize,
    /// How often spans are sent, ms. Default 1000.
    pub export_interval_ms: u64,
    /// Spans per request, at most. Default 512.
    pub batch_spans: usize,
}

impl Default for TraceConfig {
    fn default() -> Self {
        TraceConfig {
            enabled: false,
            endpoint: "http://127.0.0.1:4318/v1/traces".into(),
            sample_ratio: 1.0,
            max_spans: 10_000,
            export_interval_ms: 1000,
            batch_spans: 512,
        }
    }
}

impl TraceConfig {
    /// Checks the ranges.
    ///
    /// # Errors
    /// The key and why.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if !self.endpoint.starts_with("http://") || self.endpoint.len() <= "http://".len() {
            return Err(("trace.endpoint", "must be an http:// URL (OTLP/HTTP)".into()));
        }
        if !(0.0..=1.0).contains(&self.sample_ratio) {
            return Err(("trace.sample_ratio", "must be 0-1".into()));
        }
        if !(1..=10_000_000).contains(&self.max_spans) {
            return Err(("trace.max_spans", "must be 1-10000000".into()));
        }
        if !(10..=600_000).contains(&self.export_interval_ms) {
            return Err(("trace.export_interval_ms", "must be 10-600000".into()));
        }
        if !(1..=10_000).contains(&self.batch_spans) {
            return Err(("trace.batch_spans", "must be 1-10000".into()));
        }
        Ok(())
    }
}

/// Labels of the span counter: `result`.
type ResultLabels = [(&'static str, &'static str); 1];

/// `holdfast_trace_spans_total{result}` and `holdfast_trace_spans_pending`.
#[derive(Clone)]
struct TraceMetrics {
    spans: Family<ResultLabels, Counter>,
    pending: Gauge,
}

impl TraceMetrics {
    fn new(registry: &holdfast_metrics::Registry) -> TraceMetrics {
        let spans = Family::<ResultLabels, Counter>::default();
        registry.register(
            "trace_spans",
            "Spans of traced messages: recorded, exported, dropped (the ring was full), failed (an export attempt failed; they are retried)",
            spans.clone(),
        );
        let pending = Gauge::default();
        registry.register("trace_spans_pending", "Spans waiting for export", pending.clone());
        TraceMetrics { spans, pending }
    }

    fn add(&self, result: &'static str, n: u64) {
        if n > 0 {
            handle(&self.spans, &[("result", result)]).inc_by(n);
        }
    }
}

fn kv(key: &str, value: AttrValue) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        value: Some(AnyValue {
            value: Some(match value {
                AttrValue::Str(s) => any_value::Value::StringValue(s),
                AttrValue::Int(i) => any_value::Value::IntValue(i),
            }),
        }),
        ..KeyValue::default()
    }
}

/// The OTLP request for `spans` of node `node`.
pub fn encode(node: &str, spans: Vec<SpanRecord>) -> Vec<u8> {
    let spans: Vec<Span> = spans
        .into_iter()
        .map(|s| Span {
            trace_id: s.trace_id.to_vec(),
            span_id: s.span_id.to_vec(),
            parent_span_id: s.parent_id.map(|p| p.to_vec()).unwrap_or_default(),
            name: s.name.to_string(),
            kind: match s.kind {
                SpanKind::Internal => span::SpanKind::Internal,
                SpanKind::Server => span::SpanKind::Server,
                SpanKind::Producer => span::SpanKind::Producer,
                SpanKind::Consumer => span::SpanKind::Consumer,
            } as i32,
            start_time_unix_nano: s.start_ns,
            end_time_unix_nano: s.end_ns,
            attributes: s.attributes.into_iter().map(|(k, v)| kv(k, v)).collect(),
            status: Some(match s.error {
                Some(message) => Status {
                    message,
                    code: status::StatusCode::Error as i32,
                },
                None => Status {
                    message: String::new(),
                    code: status::StatusCode::Ok as i32,
                },
            }),
            ..Span::default()
        })
        .collect();
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource {
                attributes: vec![
                    kv("service.name", AttrValue::Str("holdfast".into())),
                    kv("service.instance.id", AttrValue::Str(node.to_string())),
                    kv("service.version", AttrValue::Str(env!("CARGO_PKG_VERSION").into())),
                ],
                ..Resource::default()
            }),
            scope_spans: vec![ScopeSpans {
                scope: Some(InstrumentationScope {
                    name: "holdfast".into(),
                    version: env!("CARGO_PKG_VERSION").into(),
                    ..InstrumentationScope::default()
                }),
                spans,
                ..ScopeSpans::default()
            }],
            ..ResourceSpans::default()
        }],
    }
    .encode_to_vec()
}

/// POSTs one request; the error says why it did not go.
fn post(endpoint: &str, body: Vec<u8>) -> Result<(), String> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(10)))
        .http_status_as_error(false)
        .build()
        .into();
    let resp = agent
        .post(endpoint)
        .header("Content-Type", "application/x-protobuf")
        .send(&body[..])
        .map_err(|e| e.to_string())?;
    let code = resp.status().as_u16();
    if (200..300).contains(&code) {
        Ok(())
    } else {
        Err(format!("HTTP {code}"))
    }
}

/// Installs the process's tracer for `node`, when `[trace]` is enabled.
pub fn install(node: &str, config: &TraceConfig) {
    if config.enabled && !trace::install(node, config.sample_ratio, config.max_spans) {
        tracing::warn!(
            node,
            "trace: a tracer is installed in this process already; this node shares it"
        );
    }
}

/// Exports spans until the node stops (then once more, what is left).
pub async fn export_task(
    config: TraceConfig,
    host: Arc<crate::metrics::HostMetrics>,
    link: Arc<holdfast_link::Status>,
    mut stopped: watch::Receiver<bool>,
) {
    let Some(tracer) = trace::tracer() else { return };
    let metrics = TraceMetrics::new(host.registry());
    let interval = Duration::from_millis(config.export_interval_ms);
    let (mut recorded, mut dropped) = (0u64, 0u64);
    let mut backoff = Duration::ZERO;
    let mut failing = false;
    let mut connects = link.snapshot().connects;
    loop {
        let wait = interval.max(backoff);
        let stop = tokio::select! {
            () = tokio::time::sleep(wait) => false,
            _ = stopped.wait_for(|s| *s) => true,
        };
        // The counters the tracer keeps, as metrics.
        let (r, d) = (tracer.recorded(), tracer.dropped());
        metrics.add("recorded", r - recorded);
        metrics.add("dropped", d - dropped);
        (recorded, dropped) = (r, d);
        // The link came back: the collector is likely reachable again.
        let now_connects = link.snapshot().connects;
        if now_connects != connects {
            connects = now_connects;
            backoff = Duration::ZERO;
        }
        while tracer.pending() > 0 {
            let spans = tracer.take(config.batch_spans);
            let n = spans.len() as u64;
            let body = encode(&tracer.node, spans.clone());
            let endpoint = config.endpoint.clone();
            let sent = tokio::task::spawn_blocking(move || post(&endpoint, body))
                .await
                .unwrap_or_else(|e| Err(e.to_string()));
            match sent {
                Ok(()) => {
                    metrics.add("exported", n);
                    if failing {
                        tracing::info!(endpoint = %config.endpoint, "trace: exporting again");
                    }
                    failing = false;
                    backoff = Duration::ZERO;
                }
                Err(e) => {
                    metrics.add("failed", n);
                    tracer.put_back(spans);
                    if !failing {
                        tracing::warn!(endpoint = %config.endpoint, error = %e, "trace: export failed; spans are kept and sent later");
                    }
                    failing = true;
                    backoff = (backoff * 2).clamp(interval, Duration::from_secs(30));
                    break;
                }
            }
        }
        metrics.pending.set(i64::try_from(tracer.pending()).unwrap_or(i64::MAX));
        if stop {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_encode_as_otlp_that_decodes_back() {
        let s = SpanRecord {
            trace_id: [1; 16],
            span_id: [2; 8],
            parent_id: Some([3; 8]),
            name: "store",
            kind: SpanKind::Internal,
            start_ns: 10,
            end_ns: 20,
            attributes: vec![("holdfast.lane", AttrValue::Int(3))],
            error: Some("disk full".into()),
        };
        let body = encode("gw1", vec![s]);
        let req = ExportTraceServiceRequest::decode(&body[..]).unwrap();
        let rs = &req.resource_spans[0];
        let span = &rs.scope_spans[0].spans[0];
        assert_eq!(
            (span.name.as_str(), span.start_time_unix_nano, span.end_time_unix_nano),
            ("store", 10, 20)
        );
        assert_eq!(span.parent_span_id, vec![3; 8]);
        assert_eq!(span.status.as_ref().unwrap().code, status::StatusCode::Error as i32);
        let attrs = &rs.resource.as_ref().unwrap().attributes;
        assert!(attrs.iter().any(|a| a.key == "service.instance.id"
            && a.value.as_ref().unwrap().value == Some(any_value::Value::StringValue("gw1".into()))));
    }

    #[test]
    fn bad_settings_are_refused() {
        let bad = |f: fn(&mut TraceConfig)| {
            let mut c = TraceConfig::default();
            f(&mut c);
            c.validate().unwrap_err().0
        };
        assert_eq!(bad(|c| c.endpoint = "https://x/v1/traces".into()), "trace.endpoint");
        assert_eq!(bad(|c| c.sample_ratio = 1.5), "trace.sample_ratio");
        assert_eq!(bad(|c| c.max_spans = 0), "trace.max_spans");
        assert!(TraceConfig::default().validate().is_ok());
    }
}
