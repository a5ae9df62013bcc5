//! Delivery: leasing batches, acknowledging and releasing them, live-first marks and expiry.

#[allow(unused_imports)]
use super::*;

impl Outbox {
    /// Leases up to `max` messages from the lane the scheduling policy picks
    /// next; `None` when nothing is available.
    ///
    /// # Errors
    /// Storage errors.
    pub fn lease(&self, max: usize) -> Result<Option<LeaseBatch>, OutboxError> {
        let mut st = self.inner.lock();
        st.lease_calls += 1;
        let call = st.lease_calls;
        let waiting: Vec<usize> = (0..LANES).filter(|&l| st.lanes[l].available() > 0).collect();
        let Some(&first) = waiting.first() else {
            return Ok(None);
        };
        let pick = match self.inner.config.scheduling {
            Scheduling::Strict => first,
            Scheduling::Bounded => {
                let limit = u64::from(self.inner.config.starvation_limit);
                // The lane that has waited longest, if it has waited too long.
                waiting
                    .iter()
                    .copied()
                    .filter(|&l| call.saturating_sub(st.lanes[l].last_served) > limit)
                    .min_by_key(|&l| st.lanes[l].last_served)
                    .unwrap_or(first)
            }
        };
        for lane in std::iter::once(pick).chain(waiting.into_iter().filter(|&l| l != pick)) {
            let batch = self
                .inner
                .lease_lane(&mut st, lane as u8, max, self.tx_clone().as_ref())?;
            if !batch.items.is_empty() {
                st.lanes[lane].last_served = call;
                return Ok(Some(batch));
            }
        }
        Ok(None)
    }

    /// Leases up to `max` messages from `lane` only.
    ///
    /// # Errors
    /// Storage errors.
    pub fn lease_lane(&self, lane: u8, max: usize) -> Result<LeaseBatch, OutboxError> {
        if lane as usize >= LANES {
            return Ok(LeaseBatch {
                lane,
                items: Vec::new(),
            });
        }
        let mut st = self.inner.lock();
        self.inner.lease_lane(&mut st, lane, max, self.tx_clone().as_ref())
    }

    pub(crate) fn tx_clone(&self) -> Option<mpsc::Sender<Request>> {
        holdfast_model::lock(&self.tx).clone()
    }

    /// Acknowledges delivered messages: they are deleted. Unknown or
    /// already-acknowledged ids are ignored. Resolves when the deletion is
    /// committed (buffered: an ack lost in a crash means a redelivery).
    ///
    /// # Errors
    /// Storage errors, or the outbox is closed.
    pub async fn ack(&self, ids: &[MessageId]) -> Result<(), OutboxError> {
        let Some(rx) = self.ack_request(ids)? else {
            return Ok(());
        };
        rx.await.map_err(|_| OutboxError::Closed)?.map_err(OutboxError::Store)
    }

    /// [`Outbox::ack`] for threads outside an async runtime.
    ///
    /// # Errors
    /// As [`Outbox::ack`].
    pub fn ack_blocking(&self, ids: &[MessageId]) -> Result<(), OutboxError> {
        let Some(rx) = self.ack_request(ids)? else {
            return Ok(());
        };
        rx.blocking_recv()
            .map_err(|_| OutboxError::Closed)?
            .map_err(OutboxError::Store)
    }

    /// Acknowledges without waiting for the deletion to commit (as
    /// [`Outbox::ack`], whose commit is buffered anyway). The messages are
    /// claimed at once, so a following [`Outbox::release_all`] does not
    /// hand them out again.
    pub fn ack_detached(&self, ids: &[MessageId]) {
        if let Err(e) = self.ack_request(ids) {
            tracing::debug!(error = %e, "outbox: ack after close");
        }
    }

    pub(crate) fn ack_request(
        &self,
        ids: &[MessageId],
    ) -> Result<Option<tokio::sync::oneshot::Receiver<Result<(), StoreError>>>, OutboxError> {
        let mut items = Vec::with_capacity(ids.len());
        {
            let mut st = self.inner.lock();
            for id in ids
                .iter()
                .filter(|id| id.instance == self.inner.instance && (id.lane as usize) < LANES)
            {
                let lane = &mut st.lanes[id.lane as usize];
                if let Some(claim @ Claim::Leased(size)) = lane.claims.get(&id.seq).copied() {
                    lane.claims.insert(id.seq, Claim::Removing(claim.size()));
                    items.push(Remove {
                        lane: id.lane,
                        seq: id.seq,
                        size,
                        why: Removal::Acked,
                        raw: None,
                    });
                }
            }
        }
        if items.is_empty() {
            return Ok(None);
        }
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.send(Request::Remove {
            items,
            reply: Some(reply),
        })
        .map_err(|_| OutboxError::Closed)?;
        Ok(Some(rx))
    }

    /// Returns some leased messages to their lanes, to be leased again in
    /// order (a sender that leased more than it sends).
    pub fn release(&self, ids: &[MessageId]) {
        let mut st = self.inner.lock();
        for id in ids
            .iter()
            .filter(|id| id.instance == self.inner.instance && (id.lane as usize) < LANES)
        {
            let lane = &mut st.lanes[id.lane as usize];
            if matches!(lane.claims.get(&id.seq), Some(Claim::Leased(_))) {
                lane.claims.remove(&id.seq);
                match &mut lane.live {
                    Some((first_live, live_cursor)) if id.seq >= *first_live => {
                        *live_cursor = (*live_cursor).min(id.seq);
                    }
                    _ => lane.cursor = lane.cursor.min(id.seq),
                }
            }
        }
        drop(st);
        self.inner.work.send_modify(|n| *n += 1);
    }

    /// Returns every leased, unacknowledged message to its lane, to be leased
    /// again in order (call when the link drops).
    pub fn release_all(&self) {
        let mut st = self.inner.lock();
        for lane in st.lanes.iter_mut() {
            let released: Vec<u64> = lane
                .claims
                .iter()
                .filter(|(_, c)| matches!(c, Claim::Leased(_)))
                .map(|(s, _)| *s)
                .collect();
            if let Some(&min) = released.first() {
                for s in &released {
                    lane.claims.remove(s);
                }
                match &mut lane.live {
                    Some((first_live, live_cursor)) => {
                        if min < *first_live {
                            lane.cursor = lane.cursor.min(min);
                        }
                        if let Some(&s) = released.iter().find(|s| **s >= *first_live) {
                            *live_cursor = (*live_cursor).min(s);
                        }
                    }
                    None => lane.cursor = lane.cursor.min(min),
                }
            }
        }
        drop(st);
        self.inner.work.send_modify(|n| *n += 1);
    }

    /// Marks the start of live traffic on live-first lanes: what is queued now
    /// is backlog, delivered after anything newer (call when the link comes up).
    pub fn mark_live(&self) {
        let mut st = self.inner.lock();
        for (i, lane) in st.lanes.iter_mut().enumerate() {
            if self.inner.config.live_first_lanes.contains(&(i as u8)) {
                // Everything queued now is backlog. The backlog cursor already
                // covers the old live range: what it has passed there is claimed.
                lane.live = Some((lane.next_seq, lane.next_seq));
            }
        }
    }

    /// Removes expired messages now (the background sweep does this every
    /// `outbox.expire_interval_ms`); returns how many were found.
    pub fn sweep_expired(&self) -> usize {
        match self.tx_clone() {
            Some(tx) => self.inner.sweep_expired(&tx),
            None => 0,
        }
    }
}
