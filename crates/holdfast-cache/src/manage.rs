//! Revalidation, purging and what the admin API shows.

#[allow(unused_imports)]
use super::*;

impl Cache {
    /// Revalidates a stale object with the upstream (one request for any
    /// number of waiting clients). The object is kept on 304 or an
    /// unchanged validator, with the new response's fields and freshness
    /// (RFC 9111 §4.3.4); it is invalidated on a new validator; it is left
    /// as it is when the upstream cannot be reached.
    pub(crate) async fn revalidate(self: &Arc<Self>, plan: &Plan, meta: &Arc<Meta>) -> Revalidation {
        let waiting = {
            let mut inner = lock(&self.inner);
            let Some(o) = inner.objects.get_mut(&plan.key) else {
                return Revalidation::Invalidated;
            };
            match &o.revalidating {
                Some(rx) => Ok(rx.clone()),
                None => {
                    let (tx, rx) = watch::channel(None);
                    o.revalidating = Some(rx);
                    Err(tx)
                }
            }
        };
        match waiting {
            Ok(mut rx) => match rx.wait_for(Option::is_some).await {
                Ok(r) => r.unwrap_or(Revalidation::Unreachable),
                Err(_) => Revalidation::Unreachable,
            },
            Err(tx) => {
                let outcome = self.revalidate_now(plan, meta).await;
                if let Some(o) = lock(&self.inner).objects.get_mut(&plan.key) {
                    o.revalidating = None;
                }
                let _ = tx.send(Some(outcome));
                outcome
            }
        }
    }

    pub(crate) async fn revalidate_now(self: &Arc<Self>, plan: &Plan, meta: &Arc<Meta>) -> Revalidation {
        let condition = match (&meta.validator.etag, &meta.validator.last_modified) {
            (Some(e), _) => (hyper::header::IF_NONE_MATCH, e.clone()),
            (None, Some(lm)) => (hyper::header::IF_MODIFIED_SINCE, lm.clone()),
            // A validator always has one of the two.
            (None, None) => return Revalidation::Invalidated,
        };
        let request_time = now_secs();
        let resp = self.upstream(plan, hyper::Method::HEAD, condition).await;
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
                let storable = rfc9111::not_storable(200, r.headers(), &RequestRules::default(), false).is_none();
                Some(storable && v.is_some_and(|v| v.same_version(&meta.validator)))
            }
            Ok(r) if r.status().as_u16() == 404 || r.status().as_u16() == 410 => Some(false),
            _ => None,
        };
        match (unchanged, resp) {
            (Some(true), Ok(r)) => {
                self.event("revalidated");
                // §4.3.4: the stored fields are updated with the new ones,
                // and freshness is computed from the result.
                let fields = rfc9111::update_fields(&meta.headers, r.headers());
                let mut merged = hyper::HeaderMap::new();
                for (k, v) in &fields {
                    if let (Ok(k), Ok(v)) = (
                        hyper::header::HeaderName::from_bytes(k.as_bytes()),
                        hyper::header::HeaderValue::from_str(v),
                    ) {
                        merged.append(k, v);
                    }
                }
                if let Some(age) = r.headers().get(hyper::header::AGE) {
                    merged.insert(hyper::header::AGE, age.clone());
                }
                let freshness = Freshness::compute(
                    &merged,
                    request_time,
                    response_time,
                    rfc9111::Operator {
                        immutable: plan.class == Class::Immutable,
                        ttl: u64::from(plan.ttl),
                    },
                );
                let rec = {
                    let mut inner = lock(&self.inner);
                    let bs = self.cfg.block_size;
                    inner.objects.get_mut(&plan.key).and_then(|o| {
                        let fresh = Arc::new(Meta {
                            fetched_at: response_time,
                            freshness,
                            headers: Arc::new(fields),
                            ttl: plan.ttl,
                            ..(**meta).clone()
                        });
                        let same = o
                            .meta
                            .as_ref()
                            .is_some_and(|m| m.validator.same_version(&meta.validator));
                        same.then(|| {
                            o.meta = Some(fresh.clone());
                            o.record(&fresh, bs)
                        })
                    })
                };
                if let Some(rec) = rec {
                    let _ = disk::put_object(&self.index, &plan.key, &rec);
                }
                Revalidation::Validated
            }
            (Some(_), _) => {
                self.event("invalidated");
                let old = {
                    let mut inner = lock(&self.inner);
                    let same = inner
                        .objects
                        .get(&plan.key)
                        .and_then(|o| o.meta.as_ref())
                        .is_some_and(|m| m.validator.same_version(&meta.validator));
                    if same { inner.invalidate(&plan.key) } else { None }
                };
                if let Some(old) = old {
                    self.delete_later(Some(plan.key.clone()), old);
                }
                Revalidation::Invalidated
            }
            (None, resp) => {
                match &resp {
                    Err(e) => {
                        tracing::info!(key = %plan.key, error = %e, "cache: upstream unreachable for revalidation");
                    }
                    Ok(r) => {
                        tracing::info!(key = %plan.key, status = r.status().as_u16(), "cache: upstream failed the revalidation");
                    }
                }
                Revalidation::Unreachable
            }
        }
    }

    /// Invalidates what is stored for `key` and every variant of it (RFC
    /// 9111 §4.4, after an unsafe method succeeded). Returns the objects
    /// removed.
    pub fn invalidate_uri(self: &Arc<Self>, key: &str) -> usize {
        let variants = format!("{key}{VARY_SEP}");
        let (n, _) = self.remove_where(|k| k == key || k.starts_with(&variants));
        if n > 0 {
            self.event("invalidated-by-method");
        }
        n
    }

    /// Removes objects whose key is `key`, starts with `prefix`, or all.
    /// Returns (objects, bytes) removed.
    pub fn purge(self: &Arc<Self>, key: Option<&str>, prefix: Option<&str>) -> (usize, u64) {
        let removed = self.remove_where(|k| match (key, prefix) {
            (Some(key), _) => k == key,
            (None, Some(p)) => k.starts_with(p),
            (None, None) => true,
        });
        self.event("purged");
        removed
    }

    /// Drops every object whose key passes `which` (its blocks are deleted
    /// in the background). Returns (objects that had a version, bytes).
    fn remove_where(self: &Arc<Self>, which: impl Fn(&str) -> bool) -> (usize, u64) {
        let mut removed = Vec::new();
        let mut bytes = 0;
        {
            let mut inner = lock(&self.inner);
            let keys: Vec<String> = inner.objects.keys().filter(|k| which(k)).cloned().collect();
            for k in keys {
                let had_meta = inner.objects.get(&k).is_some_and(|o| o.meta.is_some());
                bytes += inner.objects.get(&k).map_or(0, Obj::stored_bytes);
                if let Some(old) = inner.invalidate(&k)
                    && had_meta
                {
                    removed.push((k.clone(), old));
                }
                inner.forget_if_empty(&k);
            }
        }
        let n = removed.len();
        for (k, id) in removed {
            self.delete_later(Some(k), id);
        }
        (n, bytes)
    }

    /// Stored objects, largest first, at most `limit`.
    pub fn objects(&self, limit: usize) -> Vec<ObjectInfo> {
        let inner = lock(&self.inner);
        let mut out: Vec<ObjectInfo> = inner
            .objects
            .iter()
            .filter(|(_, o)| o.meta.is_some())
            .map(|(k, o)| ObjectInfo {
                key: k.clone(),
                length: o.meta.as_ref().map(|m| m.validator.length),
                etag: o.meta.as_ref().and_then(|m| m.validator.etag.clone()),
                stored_bytes: o.stored_bytes(),
                blocks: o.stored.len(),
                class: o.meta.as_ref().map(|m| m.class),
            })
            .collect();
        out.sort_by(|a, b| b.stored_bytes.cmp(&a.stored_bytes).then(a.key.cmp(&b.key)));
        out.truncate(limit);
        out
    }

    /// Totals.
    pub fn stats(&self) -> Stats {
        let free = rustix::fs::statvfs(&self.dir)
            .ok()
            .map(|s| s.f_bavail.saturating_mul(s.f_frsize));
        let t = &self.totals;
        let (hit_bytes, miss_bytes) = (
            t.hit_bytes.load(Ordering::Relaxed),
            t.miss_bytes.load(Ordering::Relaxed),
        );
        let upstream_bytes = t.upstream_bytes.load(Ordering::Relaxed);
        let served = hit_bytes + miss_bytes;
        let inner = lock(&self.inner);
        Stats {
            listen: lock(&self.listen).clone(),
            block_size: self.cfg.block_size,
            objects: inner.objects.values().filter(|o| o.meta.is_some()).count(),
            stored_bytes: inner.stored_bytes,
            reserved_bytes: inner.reserved_bytes,
            max_size: self.max_size.load(Ordering::Relaxed),
            min_free: self.min_free.load(Ordering::Relaxed),
            free_bytes: free,
            fills_in_flight: self.metrics.cache_fills.get(),
            parent: self.cfg.parent.clone(),
            requests: t.requests.load(Ordering::Relaxed),
            hit_requests: t.hit_requests.load(Ordering::Relaxed),
            hit_bytes,
            miss_bytes,
            upstream_bytes,
            byte_hit_ratio: (served > 0).then(|| hit_bytes as f64 / served as f64),
            saved_bytes: hit_bytes,
        }
    }
}
