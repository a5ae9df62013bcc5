//! MQTT over WebSockets (RFC 6455, MQTT 5.0 §6): the HTTP upgrade on the
//! configured paths with the subprotocol `mqtt`, and a byte stream over
//! binary WebSocket messages that the MQTT connection reads and writes like
//! a socket. An MQTT packet may span several messages and one message may
//! carry several packets: the stream does not care where messages end.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use futures_util::{Sink, Stream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::WebSocketStream;
pub use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

/// Subprotocols accepted, in preference order (MQTT 5.0 §6 names `mqtt`;
/// some MQTT 3.1 clients still offer `mqttv3.1`).
const SUBPROTOCOLS: [&str; 2] = ["mqtt", "mqttv3.1"];

/// Why an upgrade was refused (the `result` of `holdfast_mqtt_connects_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The path is not one of the listener's.
    Path,
    /// The client offered no MQTT subprotocol.
    Subprotocol,
}

impl Refused {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Refused::Path => "websocket-path",
            Refused::Subprotocol => "websocket-subprotocol",
        }
    }
}

/// Checks an upgrade request: its path must be one of `paths` (the query is
/// ignored) and it must offer an MQTT subprotocol, which the response
/// selects.
///
/// # Errors
/// The HTTP answer refusing it, and why.
pub fn check_upgrade(
    req: &Request,
    mut resp: Response,
    paths: &[String],
) -> Result<Response, (Box<ErrorResponse>, Refused)> {
    let path = req.uri().path();
    if !paths.iter().any(|p| p == path) {
        return Err((
            Box::new(refusal(
                StatusCode::NOT_FOUND,
                format!("no MQTT WebSocket endpoint at {path}\n"),
            )),
            Refused::Path,
        ));
    }
    let offered: Vec<&str> = req
        .headers()
        .get_all("sec-websocket-protocol")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    let Some(chosen) = SUBPROTOCOLS
        .iter()
        .find(|p| offered.iter().any(|o| o.eq_ignore_ascii_case(p)))
    else {
        return Err((
            Box::new(refusal(
                StatusCode::BAD_REQUEST,
                "the WebSocket subprotocol \"mqtt\" is required\n".into(),
            )),
            Refused::Subprotocol,
        ));
    };
    resp.headers_mut()
        .insert("sec-websocket-protocol", HeaderValue::from_static(chosen));
    Ok(resp)
}

fn refusal(status: StatusCode, text: String) -> ErrorResponse {
    let mut r = ErrorResponse::new(Some(text));
    *r.status_mut() = status;
    r
}

/// The WebSocket limits for a broker whose largest packet is
/// `max_packet_size`: one message may carry a whole packet and then some
/// (several small packets), never more than twice the largest packet.
pub fn config(max_packet_size: u32) -> WebSocketConfig {
    let max = (max_packet_size as usize).saturating_mul(2).max(64 << 10);
    WebSocketConfig::default()
        .max_message_size(Some(max))
        .max_frame_size(Some(max))
}

/// The MQTT byte stream carried by a WebSocket: reads the payloads of binary
/// messages in order; each write is one binary message.
pub struct WsStream<S> {
    ws: WebSocketStream<S>,
    /// What is left of the message being read.
    pending: Bytes,
    /// The peer closed (or the connection ended).
    eof: bool,
}

impl<S> WsStream<S> {
    /// Wraps an accepted WebSocket.
    pub fn new(ws: WebSocketStream<S>) -> WsStream<S> {
        WsStream {
            ws,
            pending: Bytes::new(),
            eof: false,
        }
    }
}

fn ws_io(e: WsError) -> io::Error {
    match e {
        WsError::Io(e) => e,
        WsError::ConnectionClosed | WsError::AlreadyClosed => io::Error::from(io::ErrorKind::BrokenPipe),
        other => io::Error::new(io::ErrorKind::InvalidData, other.to_string()),
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WsStream<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.pending.is_empty() {
                let n = this.pending.len().min(buf.remaining());
                buf.put_slice(&this.pending.split_to(n));
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            match ready!(Pin::new(&mut this.ws).poll_next(cx)) {
                Some(Ok(Message::Binary(data))) => this.pending = data,
                Some(Ok(Message::Text(_))) => {
                    // MQTT 5.0 §6: data is sent in binary frames only.
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "a text WebSocket message: MQTT uses binary messages",
                    )));
                }
                Some(Ok(Message::Close(_))) | None => this.eof = true,
                // Pings are answered by the WebSocket layer.
                Some(Ok(_)) => {}
                Some(Err(WsError::ConnectionClosed | WsError::AlreadyClosed)) => this.eof = true,
                Some(Err(e)) => return Poll::Ready(Err(ws_io(e))),
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WsStream<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(Pin::new(&mut this.ws).poll_ready(cx)).map_err(ws_io)?;
        Pin::new(&mut this.ws)
            .start_send(Message::Binary(Bytes::copy_from_slice(buf)))
            .map_err(ws_io)?;
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().ws).poll_flush(cx).map_err(ws_io)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match ready!(Pin::new(&mut self.get_mut().ws).poll_close(cx)) {
            Ok(()) | Err(WsError::ConnectionClosed | WsError::AlreadyClosed) => Poll::Ready(Ok(())),
            Err(e) => Poll::Ready(Err(ws_io(e))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::{SinkExt, StreamExt};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_tungstenite::tungstenite::protocol::Role;

    fn request(path: &str, protocols: Option<&str>) -> Request {
        let mut b = Request::builder().uri(path);
        if let Some(p) = protocols {
            b = b.header("sec-websocket-protocol", p);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn upgrades_only_on_the_paths_with_the_mqtt_subprotocol() {
        let paths = vec!["/mqtt".to_string(), "/$iothub/websocket".to_string()];
        let ok = check_upgrade(
            &request("/$iothub/websocket?iothub-no-client-cert=true", Some("mqtt")),
            Response::default(),
            &paths,
        )
        .unwrap();
        assert_eq!(ok.headers()["sec-websocket-protocol"], "mqtt");
        let old = check_upgrade(&request("/mqtt", Some("mqttv3.1, chat")), Response::default(), &paths).unwrap();
        assert_eq!(old.headers()["sec-websocket-protocol"], "mqttv3.1");
        let (r, why) = check_upgrade(&request("/other", Some("mqtt")), Response::default(), &paths).unwrap_err();
        assert_eq!((r.status(), why), (StatusCode::NOT_FOUND, Refused::Path));
        let (r, why) = check_upgrade(&request("/mqtt", None), Response::default(), &paths).unwrap_err();
        assert_eq!((r.status(), why), (StatusCode::BAD_REQUEST, Refused::Subprotocol));
    }

    #[tokio::test]
    async fn bytes_cross_message_boundaries_both_ways() {
        let (a, b) = tokio::io::duplex(1 << 16);
        let server = WebSocketStream::from_raw_socket(a, Role::Server, None).await;
        let mut client = WebSocketStream::from_raw_socket(b, Role::Client, None).await;
        let mut s = WsStream::new(server);
        // One packet split over three messages, then two in one message.
        for part in [&b"\x10\x0a"[..], b"\x00\x04MQ", b"TT\x05\x02\x00\x3c\x00"] {
            client
                .send(Message::Binary(Bytes::copy_from_slice(part)))
                .await
                .unwrap();
        }
        client.send(Message::Ping(Bytes::new())).await.unwrap();
        client
            .send(Message::Binary(Bytes::from_static(b"\xc0\x00\xc0\x00")))
            .await
            .unwrap();
        let mut got = vec![0u8; 16];
        s.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"\x10\x0a\x00\x04MQTT\x05\x02\x00\x3c\x00\xc0\x00\xc0");
        let mut last = [0u8; 1];
        s.read_exact(&mut last).await.unwrap();
        s.write_all(b"\x20\x03\x00\x00\x00").await.unwrap();
        s.flush().await.unwrap();
        // The ping's pong, then the write as one binary message.
        let mut binaries = Vec::new();
        while binaries.is_empty() {
            match client.next().await.unwrap().unwrap() {
                Message::Binary(b) => binaries.push(b),
                Message::Pong(_) => {}
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(&binaries[0][..], b"\x20\x03\x00\x00\x00");
        // A text message is a protocol error; a close is the end.
        client.send(Message::Text("hi".into())).await.unwrap();
        assert_eq!(s.read(&mut last).await.unwrap_err().kind(), io::ErrorKind::InvalidData);
        client.close(None).await.unwrap();
    }
}
