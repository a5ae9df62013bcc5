//! MQTT over WebSockets (RFC 6455, MQTT 5.0 §6): the HTTP upgrade on the
//! configured paths with the subprotocol `mqtt`, and a byte stream over
//! binary WebSocket messages that the MQTT connection reads and writes like
//! a socket ([`WsStream`]). An MQTT packet may span several messages and one
//! message may carry several packets: the stream does not care where
//! messages end. Shutting the stream down is the whole closing handshake
//! ([`stream`]).

use base64::Engine as _;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

pub mod stream;

pub use stream::{CLOSE_GRACE, CLOSE_LIMIT, CLOSE_MAX, WsStream};

/// Subprotocols accepted, in preference order (MQTT 5.0 §6 names `mqtt`;
/// some MQTT 3.1 clients still offer `mqttv3.1`).
const SUBPROTOCOLS: [&str; 2] = ["mqtt", "mqttv3.1"];

/// The largest upgrade request head read, bytes (a longer one is answered
/// 431). Browsers and the device SDKs send well under 2 KiB.
pub const MAX_HEAD: usize = 8 << 10;

/// Bytes an upgraded connection reads from its socket at a time, and keeps
/// allocated while idle (the TCP path reads 1 KiB at a time while idle
/// too). tungstenite's default (128 KiB) made an idle WebSocket cost ten
/// times a TCP connection; a larger message still arrives whole (the
/// buffer grows to it, read by read).
pub const READ_BUFFER: usize = 1 << 10;

/// Why an upgrade was refused (the `result` of `holdfast_mqtt_connects_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The path is not one of the listener's.
    Path,
    /// The client offered no MQTT subprotocol.
    Subprotocol,
    /// Not a GET.
    Method,
    /// A request without `Upgrade: websocket` (a plain HTTP request).
    NotUpgrade,
    /// `Sec-WebSocket-Version` is not 13.
    Version,
    /// `Sec-WebSocket-Key` is missing or not 16 bytes in base64.
    Key,
    /// Not an HTTP/1.1 request, or a malformed one.
    BadRequest,
    /// The request head is longer than [`MAX_HEAD`].
    HeadTooLarge,
    /// The request head (with the TLS handshake) did not arrive within
    /// `mqtt.connect_timeout_ms`.
    Timeout,
    /// The client's address has as many upgrades in progress as
    /// `max_handshakes_per_ip` allows (or the slots kept for new clients
    /// are all that is left).
    PerIp,
    /// The listener has `max_handshakes` upgrades in progress.
    Busy,
}

impl Refused {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Refused::Path => "websocket-path",
            Refused::Subprotocol => "websocket-subprotocol",
            Refused::Method => "websocket-method",
            Refused::NotUpgrade => "websocket-not-upgrade",
            Refused::Version => "websocket-version",
            Refused::Key => "websocket-key",
            Refused::BadRequest => "websocket-bad-request",
            Refused::HeadTooLarge => "websocket-head-too-large",
            Refused::Timeout => "websocket-handshake-timeout",
            Refused::PerIp => "websocket-per-ip-limit",
            Refused::Busy => "websocket-busy",
        }
    }

    /// The HTTP status it is answered with.
    pub fn status(self) -> u16 {
        match self {
            Refused::Path => 404,
            Refused::Method => 405,
            Refused::Timeout => 408,
            Refused::NotUpgrade | Refused::Version => 426,
            Refused::PerIp => 429,
            Refused::HeadTooLarge => 431,
            Refused::Busy => 503,
            Refused::Subprotocol | Refused::Key | Refused::BadRequest => 400,
        }
    }
}

/// A refused upgrade: why, and the text of the answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// Why.
    pub why: Refused,
    /// The answer's body, one line.
    pub text: String,
}

impl Refusal {
    fn new(why: Refused, text: impl Into<String>) -> Refusal {
        Refusal { why, text: text.into() }
    }

    /// The HTTP answer: status, the headers the status calls for
    /// (`Upgrade` and `Sec-WebSocket-Version` with 426, RFC 6455 §4.4;
    /// `Allow` with 405), the text, and `Connection: close`.
    pub fn response(&self) -> Vec<u8> {
        let status = self.why.status();
        let phrase = match status {
            400 => "Bad Request",
            404 => "Not Found",
            405 => "Method Not Allowed",
            408 => "Request Timeout",
            426 => "Upgrade Required",
            429 => "Too Many Requests",
            431 => "Request Header Fields Too Large",
            _ => "Service Unavailable",
        };
        let extra = match self.why {
            Refused::NotUpgrade | Refused::Version => "Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n",
            Refused::Method => "Allow: GET\r\n",
            _ => "",
        };
        let body = format!("{}\n", self.text);
        format!(
            "HTTP/1.1 {status} {phrase}\r\n{extra}Content-Type: text/plain; charset=utf-8\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    }
}

/// An HTTP/1.1 request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    /// Method.
    pub method: String,
    /// Request target as sent (path and query).
    pub target: String,
    /// Minor HTTP version: 1 for HTTP/1.1.
    pub minor: u8,
    /// Header fields in order, names as sent.
    pub headers: Vec<(String, String)>,
}

impl Head {
    /// Every value of header `name` (case-insensitive), comma lists split.
    fn values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.headers
            .iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .flat_map(|(_, v)| v.split(','))
            .map(str::trim)
            .filter(|v| !v.is_empty())
    }

    /// The single value of header `name`, if it appears exactly once.
    fn one(&self, name: &str) -> Option<&str> {
        let mut it = self.headers.iter().filter(|(n, _)| n.eq_ignore_ascii_case(name));
        let first = it.next()?;
        it.next().is_none().then_some(first.1.trim())
    }
}

/// What parsing the bytes received so far gives.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// The head is not complete yet.
    Partial,
    /// A whole head, and its length in bytes (what follows is the
    /// WebSocket's).
    Complete(Head, usize),
    /// Not an HTTP/1.x request head.
    Invalid(&'static str),
}

fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Parses a request head (RFC 9112 §2–§5) from the start of `buf`.
pub fn parse_head(buf: &[u8]) -> Parsed {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4) else {
        // Something that does not start like a request line (an MQTT
        // CONNECT sent to the wrong port) is not worth waiting for.
        let token = |b: &u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(b);
        return match buf.iter().position(|b| !token(b)) {
            Some(i) if i == 0 || buf[i] != b' ' => Parsed::Invalid("not an HTTP request"),
            _ => Parsed::Partial,
        };
    };
    let Ok(text) = std::str::from_utf8(&buf[..end - 4]) else {
        return Parsed::Invalid("the request head is not UTF-8");
    };
    let mut lines = text.split("\r\n");
    let Some(request_line) = lines.next() else {
        return Parsed::Invalid("no request line");
    };
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Parsed::Invalid("a malformed request line");
    };
    if !is_token(method) {
        return Parsed::Invalid("a malformed method");
    }
    if !target.starts_with('/') || target.bytes().any(|b| b <= b' ' || b == 0x7f) {
        return Parsed::Invalid("the request target must be a path");
    }
    let minor = match version {
        "HTTP/1.1" => 1,
        "HTTP/1.0" => 0,
        _ => return Parsed::Invalid("not HTTP/1.x"),
    };
    let mut headers = Vec::new();
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            return Parsed::Invalid("a header line without a colon");
        };
        // No whitespace before the colon, no obsolete line folding.
        if !is_token(name) {
            return Parsed::Invalid("a malformed header name");
        }
        if value.bytes().any(|b| (b < b' ' && b != b'\t') || b == 0x7f) {
            return Parsed::Invalid("a control character in a header value");
        }
        headers.push((name.to_string(), value.trim_matches([' ', '\t']).to_string()));
    }
    Parsed::Complete(
        Head {
            method: method.to_string(),
            target: target.to_string(),
            minor,
            headers,
        },
        end,
    )
}

/// Reads a request head: returns it and the bytes received after it.
/// Reads in small pieces up to [`MAX_HEAD`]; the caller puts the deadline
/// on the whole.
///
/// # Errors
/// The refusal to answer with: a malformed or too long head, or the
/// connection closing first.
pub async fn read_head<S: AsyncRead + Unpin>(stream: &mut S) -> Result<(Head, Vec<u8>), Refusal> {
    let mut buf = Vec::with_capacity(1024);
    loop {
        match parse_head(&buf) {
            Parsed::Complete(head, len) => {
                let tail = buf.split_off(len);
                return Ok((head, tail));
            }
            Parsed::Invalid(why) => return Err(Refusal::new(Refused::BadRequest, why)),
            Parsed::Partial => {}
        }
        if buf.len() >= MAX_HEAD {
            return Err(Refusal::new(
                Refused::HeadTooLarge,
                format!("the request head is longer than {MAX_HEAD} bytes"),
            ));
        }
        // Read into the vector's spare room (no buffer in the future,
        // which would stay allocated with the connection's task).
        buf.reserve((MAX_HEAD - buf.len()).min(1024));
        let room = MAX_HEAD - buf.len();
        match (&mut *stream).take(room as u64).read_buf(&mut buf).await {
            Ok(0) | Err(_) => {
                return Err(Refusal::new(
                    Refused::BadRequest,
                    "the connection closed inside the request head",
                ));
            }
            Ok(_) => {}
        }
    }
}

/// An upgrade to accept: the subprotocol chosen and the accept key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upgrade {
    /// `Sec-WebSocket-Protocol` of the answer.
    pub protocol: &'static str,
    /// `Sec-WebSocket-Accept` of the answer.
    pub accept: String,
}

impl Upgrade {
    /// The 101 answer.
    pub fn response(&self) -> Vec<u8> {
        format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Accept: {}\r\nSec-WebSocket-Protocol: {}\r\n\r\n",
            self.accept, self.protocol
        )
        .into_bytes()
    }
}

/// Checks an upgrade request (RFC 6455 §4.2.1): a GET over HTTP/1.1 on one
/// of `paths` (the query is ignored), `Upgrade: websocket`, `Connection:
/// upgrade`, version 13, a key of 16 bytes in base64, and an MQTT
/// subprotocol, which the answer selects.
///
/// # Errors
/// Why it is refused, and the text of the answer.
pub fn check_upgrade(head: &Head, paths: &[String]) -> Result<Upgrade, Refusal> {
    if head.method != "GET" {
        return Err(Refusal::new(
            Refused::Method,
            format!("{} is not allowed: MQTT over WebSockets starts with a GET", head.method),
        ));
    }
    let path = head.target.split_once('?').map_or(head.target.as_str(), |(p, _)| p);
    if !paths.iter().any(|p| p == path) {
        return Err(Refusal::new(
            Refused::Path,
            format!("no MQTT WebSocket endpoint at {path}"),
        ));
    }
    if head.minor < 1 {
        return Err(Refusal::new(Refused::BadRequest, "a WebSocket upgrade needs HTTP/1.1"));
    }
    if !head.values("upgrade").any(|v| v.eq_ignore_ascii_case("websocket")) {
        return Err(Refusal::new(
            Refused::NotUpgrade,
            format!("{path} is an MQTT over WebSocket endpoint: send a WebSocket upgrade (subprotocol \"mqtt\")"),
        ));
    }
    if !head.values("connection").any(|v| v.eq_ignore_ascii_case("upgrade")) {
        return Err(Refusal::new(
            Refused::BadRequest,
            "the upgrade needs \"Connection: Upgrade\"",
        ));
    }
    if head.one("sec-websocket-version") != Some("13") {
        return Err(Refusal::new(Refused::Version, "the WebSocket version must be 13"));
    }
    let key = head.one("sec-websocket-key").unwrap_or("");
    let valid_key = base64::engine::general_purpose::STANDARD
        .decode(key)
        .is_ok_and(|k| k.len() == 16);
    if !valid_key {
        return Err(Refusal::new(
            Refused::Key,
            "Sec-WebSocket-Key must be 16 bytes in base64 (RFC 6455 section 4.1)",
        ));
    }
    let Some(protocol) = SUBPROTOCOLS
        .iter()
        .find(|p| head.values("sec-websocket-protocol").any(|o| o.eq_ignore_ascii_case(p)))
    else {
        return Err(Refusal::new(
            Refused::Subprotocol,
            "the WebSocket subprotocol \"mqtt\" is required",
        ));
    };
    Ok(Upgrade {
        protocol,
        accept: tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes()),
    })
}

/// The WebSocket limits for a broker whose largest packet is
/// `max_packet_size`: one message may carry a whole packet and then some
/// (several small packets), never more than twice the largest packet; and
/// a read buffer of [`READ_BUFFER`].
pub fn config(max_packet_size: u32) -> WebSocketConfig {
    let max = (max_packet_size as usize).saturating_mul(2).max(64 << 10);
    WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .max_message_size(Some(max))
        .max_frame_size(Some(max))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

    fn head(text: &str) -> Head {
        match parse_head(text.as_bytes()) {
            Parsed::Complete(h, n) => {
                assert_eq!(n, text.len());
                h
            }
            other => panic!("{other:?}"),
        }
    }

    fn upgrade_request(path: &str, extra: &str) -> String {
        format!(
            "GET {path} HTTP/1.1\r\nHost: gw\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n{extra}\r\n"
        )
    }

    fn refused(text: &str, paths: &[String]) -> (u16, Refused) {
        let r = check_upgrade(&head(text), paths).unwrap_err();
        (r.why.status(), r.why)
    }

    #[test]
    fn upgrades_only_a_valid_request_on_the_paths_with_the_mqtt_subprotocol() {
        let paths = vec!["/mqtt".to_string(), "/$iothub/websocket".to_string()];
        let good = |path: &str, protocols: &str| {
            upgrade_request(
                path,
                &format!(
                    "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Protocol: {protocols}\r\n"
                ),
            )
        };
        let ok = check_upgrade(
            &head(&good("/$iothub/websocket?iothub-no-client-cert=true", "mqtt")),
            &paths,
        )
        .unwrap();
        // RFC 6455 section 1.3's example.
        assert_eq!(ok.accept, "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
        assert_eq!(ok.protocol, "mqtt");
        let text = String::from_utf8(ok.response()).unwrap();
        assert!(
            text.starts_with("HTTP/1.1 101 ") && text.contains("Sec-WebSocket-Protocol: mqtt\r\n"),
            "{text}"
        );
        let old = check_upgrade(&head(&good("/mqtt", "mqttv3.1, chat")), &paths).unwrap();
        assert_eq!(old.protocol, "mqttv3.1");
        assert_eq!(refused(&good("/other", "mqtt"), &paths), (404, Refused::Path));
        assert_eq!(
            refused(
                &upgrade_request(
                    "/mqtt",
                    &format!("Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {KEY}\r\n")
                ),
                &paths
            ),
            (400, Refused::Subprotocol)
        );
        // A plain GET gets 426 with what to upgrade to.
        let plain = refused("GET /mqtt HTTP/1.1\r\nHost: gw\r\n\r\n", &paths);
        assert_eq!(plain, (426, Refused::NotUpgrade));
        let answer = String::from_utf8(
            check_upgrade(&head("GET /mqtt HTTP/1.1\r\n\r\n"), &paths)
                .unwrap_err()
                .response(),
        )
        .unwrap();
        assert!(answer.starts_with("HTTP/1.1 426 Upgrade Required\r\n"), "{answer}");
        assert!(answer.contains("Upgrade: websocket\r\n") && answer.contains("Sec-WebSocket-Version: 13\r\n"));
        assert!(answer.contains("Connection: close\r\n"));
        // Wrong version: 426 naming version 13.
        let v8 = upgrade_request(
            "/mqtt",
            &format!("Sec-WebSocket-Version: 8\r\nSec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Protocol: mqtt\r\n"),
        );
        assert_eq!(refused(&v8, &paths), (426, Refused::Version));
        // Keys that are not 16 bytes of base64.
        for key in [
            "",
            "abc",
            "not base64 at all!!!",
            "AAAAAAAAAAAAAAAAAAAAAAAAAAAA",
            "dGhlIHNhbXBsZSBub25jZQ",
        ] {
            let r = upgrade_request(
                "/mqtt",
                &format!("Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Protocol: mqtt\r\n"),
            );
            assert_eq!(refused(&r, &paths), (400, Refused::Key), "key {key:?}");
        }
        let no_connection = format!(
            "GET /mqtt HTTP/1.1\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Protocol: mqtt\r\n\r\n"
        );
        assert_eq!(refused(&no_connection, &paths), (400, Refused::BadRequest));
        assert_eq!(
            refused(&good("/mqtt", "mqtt").replacen("GET", "POST", 1), &paths),
            (405, Refused::Method)
        );
        assert_eq!(
            refused(&good("/mqtt", "mqtt").replacen("HTTP/1.1", "HTTP/1.0", 1), &paths),
            (400, Refused::BadRequest)
        );
    }

    #[test]
    fn request_heads_parse_strictly() {
        assert_eq!(parse_head(b"GET /mqtt HTTP/1.1\r\nHost: a"), Parsed::Partial);
        let h = head("GET /mqtt?x=1 HTTP/1.1\r\nHost:  gw \r\nX-Empty:\r\n\r\n");
        assert_eq!(h.target, "/mqtt?x=1");
        assert_eq!(
            h.headers,
            [("Host".into(), "gw".into()), ("X-Empty".into(), String::new())]
        );
        // What follows the head is the WebSocket's.
        match parse_head(b"GET / HTTP/1.1\r\n\r\n\x82\x00") {
            Parsed::Complete(_, n) => assert_eq!(n, 18),
            other => panic!("{other:?}"),
        }
        for bad in [
            &b"GET /mqtt\r\n\r\n"[..],
            b"GET  /mqtt HTTP/1.1\r\n\r\n",
            b"GET http://x/mqtt HTTP/1.1\r\n\r\n",
            b"GET /mqtt HTTP/2.0\r\n\r\n",
            b"GET /mqtt HTTP/1.1\r\nHost : gw\r\n\r\n",
            b"GET /mqtt HTTP/1.1\r\nHost: gw\r\n folded\r\n\r\n",
            b"GET /mqtt HTTP/1.1\r\nNo-colon\r\n\r\n",
            b"GET /mqtt HTTP/1.1\r\nX: a\x00b\r\n\r\n",
            b"GET /\xff HTTP/1.1\r\n\r\n",
            b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x3c\x00\x00",
        ] {
            assert!(
                matches!(parse_head(bad), Parsed::Invalid(_)),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[tokio::test]
    async fn a_head_is_read_to_its_end_and_no_further_than_the_limit() {
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        let request = upgrade_request("/mqtt", "");
        b.write_all(request.as_bytes()).await.unwrap();
        b.write_all(b"\x82\x00").await.unwrap();
        let (h, tail) = read_head(&mut a).await.unwrap();
        assert_eq!(h.target, "/mqtt");
        assert_eq!(tail, b"\x82\x00");
        // Header lines that never end: 431 once the limit is reached.
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        b.write_all(b"GET /mqtt HTTP/1.1\r\n").await.unwrap();
        for i in 0..1000 {
            b.write_all(format!("X-Pad-{i}: yes\r\n").as_bytes()).await.unwrap();
        }
        let r = read_head(&mut a).await.unwrap_err();
        assert_eq!(r.why, Refused::HeadTooLarge);
        drop(b);
        let (mut a, b) = tokio::io::duplex(64);
        drop(b);
        assert_eq!(read_head(&mut a).await.unwrap_err().why, Refused::BadRequest);
    }
}
