//! A received QoS 1/2 PUBLISH whose acknowledgement waits for its outbox
//! appends to be durable.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use holdfast_mqtt::{QoS, reason};
use holdfast_outbox::{AppendError, MessageId};
use tokio::sync::oneshot;

/// An acknowledgement waiting for appends.
pub(super) struct PendingAck {
    pub(super) pkid: u16,
    pub(super) qos: QoS,
    pub(super) waits: Vec<oneshot::Receiver<Result<MessageId, AppendError>>>,
    /// The reason code so far (a refusal, or the first failed append's).
    pub(super) code: u8,
    /// A traced message's store span, ended with the appends.
    pub(super) span: Option<crate::StoreSpan>,
}

impl PendingAck {
    /// The reason code if every append has finished, without waiting.
    pub(super) fn try_ready(&mut self) -> Option<u8> {
        while let Some(rx) = self.waits.last_mut() {
            match rx.try_recv() {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => self.code = e.mqtt_reason_code(),
                Err(oneshot::error::TryRecvError::Closed) => self.code = reason::UNSPECIFIED,
                Err(oneshot::error::TryRecvError::Empty) => return None,
            }
            self.waits.pop();
        }
        if let Some(span) = self.span.take() {
            span.finish(self.code);
        }
        Some(self.code)
    }

    /// Resolves to the reason code once every append has finished.
    pub(super) fn poll(&mut self, cx: &mut Context<'_>) -> Poll<u8> {
        while let Some(rx) = self.waits.last_mut() {
            match Pin::new(rx).poll(cx) {
                Poll::Ready(Ok(Ok(_))) => {}
                Poll::Ready(Ok(Err(e))) => self.code = e.mqtt_reason_code(),
                Poll::Ready(Err(_)) => self.code = reason::UNSPECIFIED,
                Poll::Pending => return Poll::Pending,
            }
            self.waits.pop();
        }
        if let Some(span) = self.span.take() {
            span.finish(self.code);
        }
        Poll::Ready(self.code)
    }
}
