//! Revalidation of a stale object with the upstream: one conditional
//! request for any number of waiting clients. The object is kept on 304 or
//! an unchanged validator, with the new response's fields and freshness
//! (RFC 9111 §4.3.4); it is invalidated on a new validator; it is left as
//! it is when the upstream cannot be reached.

use std::sync::Arc;

use crate::counters::Counters;
use crate::disk::Class;
use crate::objects::Objects;
use crate::origin::Origin;
use crate::range::Validator;
use crate::rfc9111::{self, Freshness, RequestRules};
use crate::store::BlockStore;
use crate::{Meta, Plan, Revalidation, now_secs};

/// Revalidates stored objects (see the module docs).
pub(crate) struct Revalidator {
    objects: Arc<Objects>,
    store: Arc<BlockStore>,
    origin: Arc<Origin>,
    counters: Arc<Counters>,
    /// `cache.targeted_cache_control` (RFC 9213).
    targeted: Arc<[hyper::header::HeaderName]>,
}

impl Revalidator {
    pub(crate) fn new(
        objects: Arc<Objects>,
        store: Arc<BlockStore>,
        origin: Arc<Origin>,
        counters: Arc<Counters>,
        targeted: Arc<[hyper::header::HeaderName]>,
    ) -> Revalidator {
        Revalidator {
            objects,
            store,
            origin,
            counters,
            targeted,
        }
    }

    /// Revalidates `meta`, the stale version stored for the plan's key, or
    /// waits for the revalidation running.
    pub(crate) async fn revalidate(&self, plan: &Plan, meta: &Arc<Meta>) -> Revalidation {
        match self.objects.revalidating(&plan.key) {
            None => Revalidation::Invalidated,
            Some(Ok(mut rx)) => match rx.wait_for(Option::is_some).await {
                Ok(r) => r.unwrap_or(Revalidation::Unreachable),
                Err(_) => Revalidation::Unreachable,
            },
            Some(Err(tx)) => {
                let outcome = self.revalidate_now(plan, meta).await;
                self.objects.revalidated(&plan.key);
                let _ = tx.send(Some(outcome));
                outcome
            }
        }
    }

    async fn revalidate_now(&self, plan: &Plan, meta: &Arc<Meta>) -> Revalidation {
        let v = &meta.validator;
        // RFC 9111 §4.3.1: the strong ETag, else Last-Modified; for a
        // response stored without them, its weak ETag, else its Date (RFC
        // 9110 §13.1.3 allows the Date of the stored response).
        let date = || meta.headers.iter().find(|(k, _)| k == "date").map(|(_, d)| d.clone());
        let condition = match (&v.etag, &v.last_modified, &v.weak_etag) {
            (Some(e), _, _) => (hyper::header::IF_NONE_MATCH, e.clone()),
            (None, Some(lm), _) => (hyper::header::IF_MODIFIED_SINCE, lm.clone()),
            (None, None, Some(w)) => (hyper::header::IF_NONE_MATCH, w.clone()),
            (None, None, None) => match date() {
                Some(d) => (hyper::header::IF_MODIFIED_SINCE, d),
                None => return Revalidation::Invalidated,
            },
        };
        let request_time = now_secs();
        let resp = self.origin.send(plan, hyper::Method::HEAD, condition).await;
        let response_time = now_secs();
        let unchanged = match &resp {
            Ok(r) if r.status().as_u16() == 304 => Some(true),
            Ok(r) if r.status().is_success() => {
                let h = |n: hyper::header::HeaderName| r.headers().get(n).and_then(|v| v.to_str().ok());
                let len = h(hyper::header::CONTENT_LENGTH)
                    .and_then(|l| l.parse().ok())
                    .unwrap_or(u64::MAX);
                let v = Validator::new(h(hyper::header::ETAG), h(hyper::header::LAST_MODIFIED), len);
                // A response that may no longer be stored replaces it too.
                let ruling = rfc9111::targeted(r.headers(), &self.targeted);
                let storable = rfc9111::not_storable(200, &ruling, &RequestRules::default(), false).is_none();
                Some(storable && v.is_some_and(|v| v.same_version(&meta.validator)))
            }
            Ok(r) if r.status().as_u16() == 404 || r.status().as_u16() == 410 => Some(false),
            _ => None,
        };
        match (unchanged, resp) {
            (Some(true), Ok(r)) => {
                self.counters.event("revalidated");
                // §4.3.4: the stored fields are updated with the new ones,
                // and freshness is computed from the result: its age from
                // the new response's own Date, the time it was received
                // when it has none (RFC 9110 §6.6.1), not the stored one.
                let mut own = r.headers().clone();
                rfc9111::age::record_date(&mut own, response_time);
                let fields = rfc9111::update_fields(&meta.headers, &own);
                let mut merged = hyper::HeaderMap::new();
                for (k, v) in &fields {
                    if let (Ok(k), Ok(v)) = (
                        hyper::header::HeaderName::from_bytes(k.as_bytes()),
                        hyper::header::HeaderValue::from_str(v),
                    ) {
                        merged.append(k, v);
                    }
                }
                for age in own.get_all(hyper::header::AGE) {
                    merged.append(hyper::header::AGE, age.clone());
                }
                let freshness = Freshness::compute(
                    &rfc9111::targeted(&merged, &self.targeted),
                    request_time,
                    response_time,
                    rfc9111::Operator {
                        immutable: plan.class == Class::Immutable,
                        ttl: u64::from(plan.ttl),
                    },
                );
                let fresh = Arc::new(Meta {
                    fetched_at: response_time,
                    freshness,
                    headers: Arc::new(fields),
                    ttl: plan.ttl,
                    ..(**meta).clone()
                });
                if let Some(rec) = self.objects.refresh(&plan.key, &fresh) {
                    self.store.put_object(&plan.key, &rec);
                }
                Revalidation::Validated
            }
            (Some(_), _) => {
                self.counters.event("invalidated");
                if let Some(old) = self.objects.invalidate_version(&plan.key, &meta.validator) {
                    self.store.delete_later(Some(plan.key.clone()), old);
                    self.objects.update_gauges();
                }
                Revalidation::Invalidated
            }
            (None, Err(e)) => {
                tracing::info!(key = %plan.key, error = %e, "cache: upstream unreachable for revalidation");
                Revalidation::Unreachable
            }
            (None, Ok(r)) => {
                tracing::info!(key = %plan.key, status = r.status().as_u16(), "cache: upstream failed the revalidation");
                Revalidation::Failed
            }
        }
    }
}
