//! A scripted HTTP/1.1 origin for the cache's HTTP tests: each answer comes
//! from a handler the test sets (status, fields and body under its
//! control), and every request it receives is recorded and counted.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// A request the origin received.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    /// Fields in order, names lowercase.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

/// An answer. `Content-Length` is added from the body unless the fields
/// say `transfer-encoding: chunked` (the body is then sent chunked) or
/// name a `content-length` themselves (for HEAD).
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn new(status: u16, headers: &[(&str, &str)], body: &[u8]) -> Reply {
        Reply {
            status,
            headers: headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            body: body.to_vec(),
        }
    }
}

type Handler = Box<dyn Fn(&Seen) -> Reply + Send>;

/// The origin.
pub struct ScriptOrigin {
    pub port: u16,
    seen: Arc<Mutex<Vec<Seen>>>,
    handler: Arc<Mutex<Handler>>,
    down: Arc<AtomicBool>,
}

impl ScriptOrigin {
    pub fn start(handler: impl Fn(&Seen) -> Reply + Send + 'static) -> ScriptOrigin {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let handler: Arc<Mutex<Handler>> = Arc::new(Mutex::new(Box::new(handler)));
        let (s, h) = (seen.clone(), handler.clone());
        let down = Arc::new(AtomicBool::new(false));
        let d = down.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                if d.load(Ordering::SeqCst) {
                    // Unreachable: the connection is closed unanswered.
                    drop(conn);
                    continue;
                }
                let (s, h) = (s.clone(), h.clone());
                std::thread::spawn(move || {
                    let _ = serve(conn, &s, &h);
                });
            }
        });
        ScriptOrigin {
            port,
            seen,
            handler,
            down,
        }
    }

    /// While down, every connection is closed without an answer.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    /// Replaces the handler.
    pub fn set(&self, handler: impl Fn(&Seen) -> Reply + Send + 'static) {
        *self.handler.lock().unwrap() = Box::new(handler);
    }

    /// Every request received so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// Requests received for `path` (path and query).
    pub fn count(&self, path: &str) -> usize {
        self.seen.lock().unwrap().iter().filter(|s| s.path == path).count()
    }

    pub fn clear(&self) {
        self.seen.lock().unwrap().clear();
    }

    /// A source serving every path of `host` from this origin as a reverse
    /// proxy (`other = "revalidate"`), plus `extra` source lines.
    pub fn source(&self, host: &str, extra: &str) -> String {
        format!(
            "[[plugins.content-source.config.sources]]\nname = \"site\"\nhosts = [\"{host}\"]\n\
             origin = \"http://127.0.0.1:{}\"\nother = \"revalidate\"\n{extra}\n",
            self.port
        )
    }
}

fn serve(conn: TcpStream, seen: &Mutex<Vec<Seen>>, handler: &Mutex<Handler>) -> std::io::Result<()> {
    let mut r = BufReader::new(conn.try_clone()?);
    let mut w = conn;
    // One request per connection: every answer says `Connection: close`.
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Ok(());
    }
    let mut it = line.split_whitespace();
    let (Some(method), Some(path)) = (it.next(), it.next()) else {
        return Ok(());
    };
    let (method, path) = (method.to_string(), path.to_string());
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        r.read_line(&mut h)?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    let get = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
    let mut body = Vec::new();
    if let Some(len) = get("content-length").and_then(|l| l.parse::<usize>().ok()) {
        body.resize(len, 0);
        r.read_exact(&mut body)?;
    } else if get("transfer-encoding").is_some_and(|t| t.eq_ignore_ascii_case("chunked")) {
        loop {
            let mut size = String::new();
            r.read_line(&mut size)?;
            let n = usize::from_str_radix(size.trim().split(';').next().unwrap_or("0"), 16).unwrap_or(0);
            let mut chunk = vec![0; n + 2];
            r.read_exact(&mut chunk)?;
            if n == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..n]);
        }
    }
    let req = Seen {
        method,
        path,
        headers,
        body,
    };
    seen.lock().unwrap().push(req.clone());
    let reply = (handler.lock().unwrap())(&req);
    let chunked = reply
        .headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked"));
    let has_len = reply
        .headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("content-length"));
    let mut out = format!("HTTP/1.1 {} X\r\n", reply.status);
    for (k, v) in &reply.headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    let no_body = req.method == "HEAD" || reply.status == 304 || reply.status == 204;
    if !chunked && !has_len && reply.status != 304 && reply.status != 204 {
        out.push_str(&format!("Content-Length: {}\r\n", reply.body.len()));
    }
    out.push_str("Connection: close\r\n\r\n");
    w.write_all(out.as_bytes())?;
    if !no_body {
        if chunked {
            for c in reply.body.chunks(1000) {
                w.write_all(format!("{:x}\r\n", c.len()).as_bytes())?;
                w.write_all(c)?;
                w.write_all(b"\r\n")?;
            }
            w.write_all(b"0\r\n\r\n")?;
        } else {
            w.write_all(&reply.body)?;
        }
    }
    w.flush()
}

/// Answers `data` honouring one `Range` (`a-b`, `a-`, `-n`) with a 206, or
/// the whole with a 200, with `fields` added.
pub fn ranged(seen: &Seen, data: &[u8], fields: &[(&str, &str)]) -> Reply {
    let len = data.len() as u64;
    let mut r = Reply::new(200, fields, data);
    let Some(spec) = seen.header("range").and_then(|v| v.strip_prefix("bytes=")) else {
        return r;
    };
    let Some((a, b)) = spec.split_once('-') else {
        return r;
    };
    let (start, end) = match (a.parse::<u64>().ok(), b.parse::<u64>().ok()) {
        (Some(a), Some(b)) => (a, b.min(len - 1)),
        (Some(a), None) => (a, len - 1),
        (None, Some(n)) => (len.saturating_sub(n), len - 1),
        _ => return r,
    };
    if start >= len {
        return Reply::new(416, &[("content-range", &format!("bytes */{len}"))], b"");
    }
    r.status = 206;
    r.headers
        .push(("content-range".into(), format!("bytes {start}-{end}/{len}")));
    r.body = data[start as usize..=end as usize].to_vec();
    r
}
