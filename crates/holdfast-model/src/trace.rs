//! Traces across hops: W3C trace context (`traceparent`, `tracestate`) on
//! messages as user properties, and the spans a node records for a traced
//! message (received, routed, stored, sent, acknowledged by the parent,
//! delivered). The host exports them (OTLP over HTTP) when `[trace]` is
//! enabled.
//!
//! One tracer per process, installed at start ([`install`]); while none is,
//! [`tracer`] answers `None` and the hooks cost one atomic load. A message
//! is traced when its `traceparent` says *sampled*, or, without one, when
//! the node starts a trace for it (`trace.sample_ratio`). Each hop that
//! traces a message writes its own span into the message's `traceparent`,
//! so the next hop's spans hang under it and the whole path is one trace.
//!
//! Finished spans wait in a bounded ring until the exporter takes them; when
//! the ring is full the oldest go, counted ([`Tracer::dropped`]).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

/// The user property carrying the trace context.
pub const TRACEPARENT: &str = "traceparent";
/// The user property carrying vendor trace state (passed on as it is).
pub const TRACESTATE: &str = "tracestate";

/// A message's trace context: its trace, and the span it hangs under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceContext {
    /// The trace id.
    pub trace_id: [u8; 16],
    /// The parent span's id.
    pub parent_id: [u8; 8],
    /// Trace flags; bit 0: sampled.
    pub flags: u8,
}

fn hex_into(s: &str, out: &mut [u8]) -> Option<()> {
    if s.len() != out.len() * 2 || !s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        return None;
    }
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(())
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 15)]));
    }
    s
}

impl TraceContext {
    /// Parses a `traceparent` value (version 00, or a later version read as
    /// 00, per W3C Trace Context §4.3). `None` for anything malformed, or
    /// an all-zero trace or parent id.
    pub fn parse(value: &str) -> Option<TraceContext> {
        let value = value.trim();
        let mut parts = value.split('-');
        let version = parts.next()?;
        let (trace, parent, flags) = (parts.next()?, parts.next()?, parts.next()?);
        if version.len() != 2 || version == "ff" || (version == "00" && parts.next().is_some()) {
            return None;
        }
        let mut v = [0u8; 1];
        hex_into(version, &mut v)?;
        let mut c = TraceContext {
            trace_id: [0; 16],
            parent_id: [0; 8],
            flags: 0,
        };
        hex_into(trace, &mut c.trace_id)?;
        hex_into(parent, &mut c.parent_id)?;
        let mut f = [0u8; 1];
        hex_into(flags, &mut f)?;
        c.flags = f[0];
        if c.trace_id == [0; 16] || c.parent_id == [0; 8] {
            return None;
        }
        Some(c)
    }

    /// Whether the caller recorded it (flags bit 0).
    pub fn sampled(&self) -> bool {
        self.flags & 1 == 1
    }

    /// The `traceparent` value for a child hanging under `span`.
    pub fn header_for(&self, span: [u8; 8]) -> String {
        let mut s = String::with_capacity(55);
        s.push_str("00-");
        s.push_str(&hex(&self.trace_id));
        s.push('-');
        s.push_str(&hex(&span));
        s.push('-');
        s.push_str(&hex(&[self.flags]));
        s
    }

    /// The trace id in hex.
    pub fn trace_hex(&self) -> String {
        hex(&self.trace_id)
    }

    /// The context of `properties`, if they carry a valid `traceparent`.
    pub fn of(properties: &[(String, String)]) -> Option<TraceContext> {
        properties
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(TRACEPARENT))
            .and_then(|(_, v)| TraceContext::parse(v))
    }
}

/// Sets `traceparent` in `properties` to hang under `span` (replacing the
/// one there, or adding it).
pub fn set_parent(properties: &mut Vec<(String, String)>, ctx: &TraceContext, span: [u8; 8]) {
    let value = ctx.header_for(span);
    match properties.iter_mut().find(|(k, _)| k.eq_ignore_ascii_case(TRACEPARENT)) {
        Some((_, v)) => *v = value,
        None => properties.push((TRACEPARENT.to_string(), value)),
    }
}

/// What a span is (OTLP's kinds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpanKind {
    /// Work inside the node.
    Internal,
    /// A message taken in (from a client or a child).
    Server,
    /// A message sent on (to the parent).
    Producer,
    /// A message delivered (to a subscriber).
    Consumer,
}

/// An attribute value.
#[derive(Debug, Clone, PartialEq)]
pub enum AttrValue {
    /// Text.
    Str(String),
    /// A whole number.
    Int(i64),
}

/// A finished span.
#[derive(Debug, Clone, PartialEq)]
pub struct SpanRecord {
    /// The trace.
    pub trace_id: [u8; 16],
    /// This span.
    pub span_id: [u8; 8],
    /// The span it hangs under (the previous hop's, or this hop's receive).
    pub parent_id: Option<[u8; 8]>,
    /// `receive`, `route`, `store`, `send`, `deliver`.
    pub name: &'static str,
    /// Its kind.
    pub kind: SpanKind,
    /// Start, ns since the Unix epoch.
    pub start_ns: u64,
    /// End, ns since the Unix epoch.
    pub end_ns: u64,
    /// Attributes.
    pub attributes: Vec<(&'static str, AttrValue)>,
    /// An error, when the step failed.
    pub error: Option<String>,
}

/// Now, ns since the Unix epoch.
pub fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// The process's tracer. See the module docs.
#[derive(Debug)]
pub struct Tracer {
    /// This node (the exporter's `service.instance.id`).
    pub node: String,
    /// Share of messages without a trace context that start one (0-1).
    ratio: f64,
    max: usize,
    ring: Mutex<VecDeque<SpanRecord>>,
    ids: AtomicU64,
    recorded: AtomicU64,
    dropped: AtomicU64,
}

static TRACER: OnceLock<Tracer> = OnceLock::new();

/// Installs the process's tracer. `false` if one is installed already (a
/// second node in the same process shares it).
pub fn install(node: &str, sample_ratio: f64, max_spans: usize) -> bool {
    TRACER.set(Tracer::new(node, sample_ratio, max_spans)).is_ok()
}

/// The tracer, when tracing is on.
#[inline]
pub fn tracer() -> Option<&'static Tracer> {
    TRACER.get()
}

/// splitmix64: well-mixed ids from a counter (not secret, only unique).
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Tracer {
    /// A tracer for `node` (the process's is made by [`install`]).
    pub fn new(node: &str, sample_ratio: f64, max_spans: usize) -> Tracer {
        let seed = crate::random_u64() ^ now_ns();
        Tracer {
            node: node.to_string(),
            ratio: sample_ratio.clamp(0.0, 1.0),
            max: max_spans.max(1),
            ring: Mutex::new(VecDeque::new()),
            ids: AtomicU64::new(seed),
            recorded: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        }
    }

    fn next(&self) -> u64 {
        mix(self.ids.fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed))
    }

    /// A new span id (never zero).
    pub fn span_id(&self) -> [u8; 8] {
        loop {
            let v = self.next();
            if v != 0 {
                return v.to_be_bytes();
            }
        }
    }

    /// The trace context a message is traced under here: its own when it
    /// has one that is sampled; a new trace (sampled) for `trace.sample_ratio`
    /// of those without one; `None` otherwise. The `bool` is true for a new
    /// trace (it has no parent span).
    pub fn context_for(&self, properties: &[(String, String)]) -> Option<(TraceContext, bool)> {
        match TraceContext::of(properties) {
            Some(c) => c.sampled().then_some((c, false)),
            None => {
                let roll = (self.next() >> 11) as f64 / (1u64 << 53) as f64;
                (self.ratio > 0.0 && roll < self.ratio).then(|| {
                    let mut trace_id = [0u8; 16];
                    trace_id[..8].copy_from_slice(&self.next().to_be_bytes());
                    trace_id[8..].copy_from_slice(&self.span_id());
                    (
                        TraceContext {
                            trace_id,
                            parent_id: [0; 8],
                            flags: 1,
                        },
                        true,
                    )
                })
            }
        }
    }

    /// Keeps a finished span for the exporter; the oldest goes when the
    /// ring is full.
    pub fn record(&self, span: SpanRecord) {
        self.recorded.fetch_add(1, Ordering::Relaxed);
        let mut ring = crate::lock(&self.ring);
        if ring.len() >= self.max {
            ring.pop_front();
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        ring.push_back(span);
    }

    /// Takes up to `n` spans, oldest first.
    pub fn take(&self, n: usize) -> Vec<SpanRecord> {
        let mut ring = crate::lock(&self.ring);
        let n = n.min(ring.len());
        ring.drain(..n).collect()
    }

    /// Puts back spans that could not be exported, in front, as far as
    /// there is room (the newest of them are dropped beyond it).
    pub fn put_back(&self, spans: Vec<SpanRecord>) {
        let mut ring = crate::lock(&self.ring);
        let room = self.max.saturating_sub(ring.len());
        let n = spans.len();
        if n > room {
            self.dropped.fetch_add((n - room) as u64, Ordering::Relaxed);
        }
        for s in spans.into_iter().take(room).rev() {
            ring.push_front(s);
        }
    }

    /// Spans waiting for export.
    pub fn pending(&self) -> usize {
        crate::lock(&self.ring).len()
    }

    /// Spans recorded since the start.
    pub fn recorded(&self) -> u64 {
        self.recorded.load(Ordering::Relaxed)
    }

    /// Spans dropped because the ring was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// A span in progress for a traced message: its ids and start.
#[derive(Debug, Clone, Copy)]
pub struct Started {
    /// The message's context as it came in.
    pub ctx: TraceContext,
    /// The parent span (none for a trace started here).
    pub parent: Option<[u8; 8]>,
    /// This span's id.
    pub span_id: [u8; 8],
    /// Start, ns since the Unix epoch.
    pub start_ns: u64,
}

impl Started {
    /// Starts a span under `ctx` (`new_trace`: it has no parent).
    pub fn new(tracer: &Tracer, ctx: TraceContext, new_trace: bool) -> Started {
        Started {
            ctx,
            parent: (!new_trace).then_some(ctx.parent_id),
            span_id: tracer.span_id(),
            start_ns: now_ns(),
        }
    }

    /// A child span of this one, starting now.
    pub fn child(&self, tracer: &Tracer) -> Started {
        Started {
            ctx: self.ctx,
            parent: Some(self.span_id),
            span_id: tracer.span_id(),
            start_ns: now_ns(),
        }
    }

    /// Ends it now and records it.
    pub fn finish(
        self,
        tracer: &Tracer,
        name: &'static str,
        kind: SpanKind,
        attributes: Vec<(&'static str, AttrValue)>,
        error: Option<String>,
    ) {
        tracer.record(SpanRecord {
            trace_id: self.ctx.trace_id,
            span_id: self.span_id,
            parent_id: self.parent,
            name,
            kind,
            start_ns: self.start_ns,
            end_ns: now_ns().max(self.start_ns),
            attributes,
            error,
        });
    }
}

/// Ends the send span of message `id` at its acknowledgement by `peer`
/// (`peer_key`: `holdfast.parent` or `holdfast.broker`).
pub fn finish_send(
    tracer: &Tracer,
    span: Started,
    id: crate::MessageId,
    peer_key: &'static str,
    peer: String,
    error: Option<String>,
) {
    span.finish(
        tracer,
        "send",
        SpanKind::Producer,
        vec![
            ("holdfast.lane", AttrValue::Int(i64::from(id.lane))),
            ("holdfast.message_id", AttrValue::Str(id.to_string())),
            (peer_key, AttrValue::Str(peer)),
        ],
        error,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_parses_as_w3c_says() {
        let c = TraceContext::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
        assert!(c.sampled());
        assert_eq!(c.trace_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(
            c.header_for([1, 2, 3, 4, 5, 6, 7, 8]),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0102030405060708-01"
        );
        assert!(
            !TraceContext::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00")
                .unwrap()
                .sampled()
        );
        // A later version may add fields; version ff and extra fields on 00 are invalid.
        assert!(TraceContext::parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra").is_some());
        for bad in [
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "garbage",
            "",
        ] {
            assert!(TraceContext::parse(bad).is_none(), "{bad}");
        }
        let mut props = vec![("a".to_string(), "1".to_string())];
        assert!(TraceContext::of(&props).is_none());
        set_parent(&mut props, &c, [9; 8]);
        assert_eq!(TraceContext::of(&props).unwrap().parent_id, [9; 8]);
        set_parent(&mut props, &c, [7; 8]);
        assert_eq!(props.len(), 2);
        assert_eq!(TraceContext::of(&props).unwrap().parent_id, [7; 8]);
    }

    #[test]
    fn the_ring_is_bounded_and_failed_exports_go_back_in_front() {
        let t = Tracer::new("n", 1.0, 3);
        let c = t.context_for(&[]).unwrap();
        assert!(c.1 && c.0.sampled());
        let span = |name| SpanRecord {
            trace_id: c.0.trace_id,
            span_id: t.span_id(),
            parent_id: None,
            name,
            kind: SpanKind::Internal,
            start_ns: 1,
            end_ns: 2,
            attributes: vec![],
            error: None,
        };
        for n in ["a", "b", "c", "d"] {
            t.record(span(n));
        }
        assert_eq!((t.pending(), t.recorded(), t.dropped()), (3, 4, 1));
        let taken = t.take(2);
        assert_eq!(taken.iter().map(|s| s.name).collect::<Vec<_>>(), ["b", "c"]);
        t.record(span("e"));
        t.put_back(taken);
        assert_eq!(t.take(10).iter().map(|s| s.name).collect::<Vec<_>>(), ["b", "d", "e"]);
        assert_eq!(t.dropped(), 2, "c did not fit back");
        // A sampled context is followed; an unsampled one is not; ratio 0 starts none.
        let props = vec![(
            TRACEPARENT.to_string(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00".to_string(),
        )];
        assert!(t.context_for(&props).is_none());
        assert!(Tracer::new("n", 0.0, 3).context_for(&[]).is_none());
        let ids: std::collections::BTreeSet<[u8; 8]> = (0..1000).map(|_| t.span_id()).collect();
        assert_eq!(ids.len(), 1000);
    }
}
