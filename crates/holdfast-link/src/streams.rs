//! The service streams of a link connection, on quinn: the link's side of
//! the [`LinkService`] port. This module opens and accepts the streams and
//! frames what crosses them; what is said on them belongs to the service's
//! own crate (twins: holdfast-iothub, deployments: holdfast-deploy, scope
//! sync: holdfast-registry).
//!
//! | service | opened by | frames |
//! |---|---|---|
//! | scope sync | the parent, unidirectional | SCOPE |
//! | twins and methods | the child, after its SVC hello | SVC |
//! | deployments (link/3) | the child, after its DEPLOY hello | DEPLOY, BLOB |

use std::sync::Arc;

use bytes::BytesMut;
use holdfast_metrics::ReasonLabels;

use crate::LinkMetrics;
use holdfast_model::ports::{
    BoxFuture, LinkPeer, LinkService, ServiceStream, StreamClosed, StreamMsg, StreamRecv, StreamSend,
};

use crate::wire::{self, Frame, close};

/// The services a link connection carries besides the lanes (QUIC only),
/// each implemented by the crate that owns it. A service left out is not
/// run: a child's stream for it is refused, and a child does not open one.
#[derive(Clone, Default)]
pub struct Services {
    /// Scope sync: the identities behind each child gateway, down the tree.
    pub scope: Option<Arc<dyn LinkService>>,
    /// Twins, direct methods and cloud-to-device messages.
    pub twins: Option<Arc<dyn LinkService>>,
    /// Fleet deployments down, node reports up (link/3 and later).
    pub deploy: Option<Arc<dyn LinkService>>,
}

impl std::fmt::Debug for Services {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Services")
            .field("scope", &self.scope.is_some())
            .field("twins", &self.twins.is_some())
            .field("deploy", &self.deploy.is_some())
            .finish()
    }
}

/// Which service a stream carries: which frames it may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// SCOPE frames.
    Scope,
    /// SVC frames.
    Twins,
    /// DEPLOY and BLOB frames.
    Deploy,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Scope => "scope",
            Kind::Twins => "service",
            Kind::Deploy => "deploy",
        }
    }

    /// The frame of `msg` on this stream; `None` if it has no place here.
    fn frame(self, msg: StreamMsg) -> Option<Frame> {
        match (self, msg) {
            (Kind::Scope, StreamMsg::Part(part, body)) => Some(Frame::Scope { part, body }),
            (Kind::Twins, StreamMsg::Msg(body)) => Some(Frame::Svc(body)),
            (Kind::Deploy, StreamMsg::Msg(body)) => Some(Frame::Deploy(body)),
            (Kind::Deploy, StreamMsg::Blob(body)) => Some(Frame::Blob(body)),
            _ => None,
        }
    }

    /// The message `frame` carries on this stream; the frame back if it
    /// has no place here.
    pub(crate) fn message(self, frame: Frame) -> Result<StreamMsg, Frame> {
        match (self, frame) {
            (Kind::Scope, Frame::Scope { part, body }) => Ok(StreamMsg::Part(part, body)),
            (Kind::Twins, Frame::Svc(body)) => Ok(StreamMsg::Msg(body)),
            (Kind::Deploy, Frame::Deploy(body)) => Ok(StreamMsg::Msg(body)),
            (Kind::Deploy, Frame::Blob(body)) => Ok(StreamMsg::Blob(body)),
            (_, other) => Err(other),
        }
    }
}

/// The connection, as a service sees it.
pub(crate) struct QuicPeer {
    conn: quinn::Connection,
    peer: String,
    version: u16,
    metrics: Arc<LinkMetrics>,
}

impl QuicPeer {
    pub(crate) fn new(conn: quinn::Connection, peer: &str, metrics: Arc<LinkMetrics>) -> Arc<QuicPeer> {
        let version = wire::negotiated(&conn);
        Arc::new(QuicPeer {
            conn,
            peer: peer.to_string(),
            version,
            metrics,
        })
    }
}

impl LinkPeer for QuicPeer {
    fn peer_id(&self) -> &str {
        &self.peer
    }

    fn version(&self) -> u16 {
        self.version
    }

    fn protocol_error(&self, reason: &str) {
        self.conn.close(close::PROTOCOL.into(), reason.as_bytes());
    }

    fn revoke(&self, reason: &str) {
        tracing::warn!(peer = %self.peer, reason, "link: closing the link of a peer no longer allowed here");
        holdfast_metrics::handle(&self.metrics.link_refused, &ReasonLabels { reason: "revoked" }).inc();
        self.conn.close(close::REFUSED.into(), reason.as_bytes());
    }
}

/// Frames written to a quinn send stream.
struct QuicSend {
    send: quinn::SendStream,
    kind: Kind,
    buf: BytesMut,
}

impl StreamSend for QuicSend {
    fn send(&mut self, msg: StreamMsg) -> BoxFuture<'_, Result<(), StreamClosed>> {
        Box::pin(async move {
            let Some(frame) = self.kind.frame(msg) else {
                tracing::error!(
                    stream = self.kind.name(),
                    "link: a service sent a message its stream does not carry"
                );
                return Err(StreamClosed);
            };
            self.buf.clear();
            if let Err(e) = frame.encode(&mut self.buf) {
                tracing::error!(stream = self.kind.name(), error = %e, "link: a service message cannot be framed");
                return Err(StreamClosed);
            }
            self.send.write_all(&self.buf).await.map_err(|_| StreamClosed)
        })
    }
}

/// Frames read from a quinn receive stream (cancel-safe: [`wire::FramedRecv`]).
struct QuicRecv {
    frames: wire::FramedRecv,
    kind: Kind,
}

impl StreamRecv for QuicRecv {
    fn recv(&mut self) -> BoxFuture<'_, Result<Option<StreamMsg>, String>> {
        Box::pin(async move {
            match self.frames.next().await {
                Ok(Some(frame)) => self
                    .kind
                    .message(frame)
                    .map(Some)
                    .map_err(|f| format!("expected a {} frame, got {}", self.kind.name(), f.name())),
                Ok(None) | Err(wire::ReadError::Stream(_)) => Ok(None),
                Err(wire::ReadError::Wire(e)) => Err(e.to_string()),
            }
        })
    }
}

/// The sending side of a stream that carries nothing this way.
struct NoSend;

impl StreamSend for NoSend {
    fn send(&mut self, _msg: StreamMsg) -> BoxFuture<'_, Result<(), StreamClosed>> {
        Box::pin(async { Err(StreamClosed) })
    }
}

/// The receiving side of a stream that carries nothing this way: ends
/// with the connection.
struct UntilClosed(quinn::Connection);

impl StreamRecv for UntilClosed {
    fn recv(&mut self) -> BoxFuture<'_, Result<Option<StreamMsg>, String>> {
        Box::pin(async move {
            self.0.closed().await;
            Ok(None)
        })
    }
}

/// A bidirectional stream of `kind` for `peer`; at most `max` bytes a frame.
pub(crate) fn bidi(
    peer: Arc<QuicPeer>,
    kind: Kind,
    send: quinn::SendStream,
    mut frames: wire::FramedRecv,
    max: usize,
) -> ServiceStream {
    frames.set_max(max);
    ServiceStream {
        peer,
        send: Box::new(QuicSend {
            send,
            kind,
            buf: BytesMut::new(),
        }),
        recv: Box::new(QuicRecv { frames, kind }),
    }
}

/// Parent side: opens the scope stream towards the child and runs
/// `service` on it until the connection ends.
pub(crate) async fn serve_scope(service: Arc<dyn LinkService>, peer: Arc<QuicPeer>) {
    let Ok(send) = peer.conn.open_uni().await else {
        return;
    };
    let conn = peer.conn.clone();
    let stream = ServiceStream {
        peer,
        send: Box::new(QuicSend {
            send,
            kind: Kind::Scope,
            buf: BytesMut::new(),
        }),
        recv: Box::new(UntilClosed(conn)),
    };
    service.parent_end(stream).await;
}

/// Child side: accepts the parent's scope stream and runs `service` on it.
pub(crate) async fn receive_scope(service: Arc<dyn LinkService>, peer: Arc<QuicPeer>) {
    let max = service.max_frame();
    let Ok(recv) = peer.conn.accept_uni().await else {
        return;
    };
    let stream = ServiceStream {
        peer,
        send: Box::new(NoSend),
        recv: Box::new(QuicRecv {
            frames: wire::FramedRecv::new(recv, max),
            kind: Kind::Scope,
        }),
    };
    service.child_end(stream).await;
}

/// Child side: opens a stream of `kind` and runs `service` on it (it sends
/// its hello first).
pub(crate) async fn open(service: Arc<dyn LinkService>, peer: Arc<QuicPeer>, kind: Kind) {
    let max = service.max_frame();
    let Ok((send, recv)) = peer.conn.open_bi().await else {
        return;
    };
    let frames = wire::FramedRecv::new(recv, max);
    let stream = bidi(peer, kind, send, frames, max);
    service.child_end(stream).await;
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    #[test]
    fn each_stream_carries_only_its_own_frames() {
        let b = Bytes::from_static(b"{}");
        let cases = [
            (Kind::Scope, StreamMsg::Part(3, b.clone())),
            (Kind::Twins, StreamMsg::Msg(b.clone())),
            (Kind::Deploy, StreamMsg::Msg(b.clone())),
            (Kind::Deploy, StreamMsg::Blob(b.clone())),
        ];
        for (kind, msg) in cases {
            let frame = kind.frame(msg.clone()).unwrap();
            assert_eq!(kind.message(frame).unwrap(), msg, "{kind:?}");
        }
        // A message of another stream has no frame here, and a frame of
        // another stream is handed back.
        assert!(Kind::Twins.frame(StreamMsg::Blob(b.clone())).is_none());
        assert!(Kind::Scope.frame(StreamMsg::Msg(b.clone())).is_none());
        assert!(Kind::Deploy.frame(StreamMsg::Part(1, b.clone())).is_none());
        assert!(matches!(
            Kind::Twins.message(Frame::Deploy(b.clone())),
            Err(Frame::Deploy(_))
        ));
        assert!(matches!(
            Kind::Deploy.message(Frame::Svc(b.clone())),
            Err(Frame::Svc(_))
        ));
        assert!(Kind::Scope.message(Frame::Lane(0)).is_err());
    }
}
