//! Root role: a node with no upstream is the top of its tree. What reaches
//! its outbox (from its own clients' `upstream` routes and from child
//! gateways) is delivered to its local subscribers, stamped with the
//! message's id and path, then deleted. A message the root's own router
//! already delivered locally is not delivered twice.
//!
//! Persistent subscribers (clean-start false, QoS 1) are the durable
//! consumers: their queues are written through to the `sessions` space
//! before the message leaves the outbox.

use holdfast_model::trace;
use std::sync::Arc;

use tokio::sync::watch;

use super::{origin_id, to_local};
use holdfast_metrics::ResultLabels;

use crate::LinkMetrics;
use holdfast_model::ports::LocalDelivery;
use holdfast_outbox::Outbox;

/// Drains `outbox` into `local` (the broker's subscribers) until `stop`.
pub async fn run(
    outbox: Arc<Outbox>,
    local: Option<Arc<dyn LocalDelivery>>,
    metrics: Arc<LinkMetrics>,
    batch: usize,
    mut stop: watch::Receiver<bool>,
) {
    metrics.link_up.set(1);
    let mut work = outbox.watch_work();
    let count = |r: &'static str, n: u64| metrics.link_root.get_or_create(&ResultLabels { result: r }).inc_by(n);
    loop {
        work.borrow_and_update();
        let leased = match outbox.lease(batch) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "root: cannot read the outbox");
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                continue;
            }
        };
        let Some(leased) = leased else {
            tokio::select! {
                r = work.changed() => if r.is_err() { return },
                _ = stop.wait_for(|s| *s) => return,
            }
            continue;
        };
        let now = outbox.clock_ms();
        let mut ids = Vec::with_capacity(leased.items.len());
        for item in &leased.items {
            ids.push(item.id);
            let m = &item.record.message;
            if m.delivered_locally {
                count("already-delivered", 1);
                continue;
            }
            let Some(local) = &local else {
                count("no-broker", 1);
                continue;
            };
            let left = item
                .record
                .ttl_ms
                .saturating_sub(now.saturating_sub(item.record.enqueued_clock_ms));
            let span = trace::tracer().and_then(|t| {
                let c = trace::TraceContext::of(&m.properties).filter(|c| c.sampled())?;
                Some((t, trace::Started::new(t, c, false)))
            });
            let backlog = local.deliver(to_local(m, origin_id(item), Some(left)));
            count("delivered", 1);
            if let Some((t, span)) = span {
                span.finish(
                    t,
                    "deliver",
                    trace::SpanKind::Consumer,
                    vec![
                        ("holdfast.node", trace::AttrValue::Str(t.node.clone())),
                        ("messaging.destination.name", trace::AttrValue::Str(m.topic.clone())),
                        ("holdfast.path", trace::AttrValue::Str(m.source.path.join("/"))),
                    ],
                    None,
                );
            }
            if backlog > 256 {
                // A connected subscriber is behind: let it catch up.
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
        }
        if let Err(e) = outbox.ack(&ids).await {
            tracing::error!(error = %e, "root: cannot delete delivered messages");
            outbox.release_all();
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        }
    }
}
