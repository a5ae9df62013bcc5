//! The cache's HTTP/1.1 client: one connection per upstream request, plain
//! TCP or rustls, to an origin or, as a forward proxy, to the parent cache.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{Either, Empty};
use hyper::body::Incoming;
use hyper::header::{HeaderMap, HeaderValue};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;

/// `http://host[:port]` or `https://host[:port]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Whether it is https.
    pub tls: bool,
    /// Host name or IP literal (without brackets).
    pub host: String,
    /// Port (default 80 / 443).
    pub port: u16,
}

impl Endpoint {
    /// Parses a base URL; a path other than `/` is refused.
    ///
    /// # Errors
    /// A message naming what is wrong.
    pub fn parse(url: &str) -> Result<Endpoint, String> {
        let (tls, rest) = if let Some(r) = url.strip_prefix("http://") {
            (false, r)
        } else if let Some(r) = url.strip_prefix("https://") {
            (true, r)
        } else {
            return Err(format!("{url:?} must start with http:// or https://"));
        };
        let authority = rest.trim_end_matches('/');
        if authority.is_empty() || authority.contains(['/', '?', '#', '@', ' ']) {
            return Err(format!("{url:?} must be scheme://host[:port]"));
        }
        let default_port = if tls { 443 } else { 80 };
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (h, after) = v6.split_once(']').ok_or_else(|| format!("{url:?}: unclosed '['"))?;
            let port = match after.strip_prefix(':') {
                Some(p) => p.parse().map_err(|_| format!("{url:?}: bad port"))?,
                None if after.is_empty() => default_port,
                None => return Err(format!("{url:?}: bad authority")),
            };
            (h.to_string(), port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), p.parse().map_err(|_| format!("{url:?}: bad port"))?),
                None => (authority.to_string(), default_port),
            }
        };
        if host.is_empty() {
            return Err(format!("{url:?}: empty host"));
        }
        Ok(Endpoint {
            tls,
            host: host.to_ascii_lowercase(),
            port,
        })
    }

    /// `scheme://host[:port]`, the port only when not the default.
    pub fn base(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        if self.port == if self.tls { 443 } else { 80 } {
            format!("{scheme}://{host}")
        } else {
            format!("{scheme}://{host}:{}", self.port)
        }
    }

    /// The Host header value.
    pub fn authority(&self) -> String {
        let b = self.base();
        b.split_once("://").map(|(_, a)| a.to_string()).unwrap_or(b)
    }
}

/// Upstream failures.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// Could not connect or the TLS handshake failed.
    #[error("cannot connect to {0}: {1}")]
    Connect(String, String),
    /// The request or the response head failed.
    #[error("upstream {0}: {1}")]
    Http(String, String),
    /// No response head within the timeout.
    #[error("upstream {0} did not answer within {1} ms")]
    Timeout(String, u64),
}

/// Sends requests to origins and to the parent cache.
pub struct Client {
    tls: tokio_rustls::TlsConnector,
    parent: Option<Endpoint>,
    timeout: Duration,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("parent", &self.parent)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// A client trusting the system's roots plus `ca_file`.
    ///
    /// # Errors
    /// `ca_file` cannot be read or holds no certificate.
    pub fn new(
        parent: Option<Endpoint>,
        timeout: Duration,
        ca_file: Option<&std::path::Path>,
    ) -> Result<Client, String> {
        let mut roots = rustls::RootCertStore::empty();
        let native = rustls_native_certs::load_native_certs();
        for cert in native.certs {
            let _ = roots.add(cert);
        }
        if let Some(path) = ca_file {
            let pem = std::fs::read(path).map_err(|e| format!("cache.ca_file {}: {e}", path.display()))?;
            let mut n = 0;
            for cert in rustls_pki_types::pem::PemObject::pem_slice_iter(&pem) {
                let cert: rustls_pki_types::CertificateDer<'static> =
                    cert.map_err(|e| format!("cache.ca_file {}: {e}", path.display()))?;
                roots
                    .add(cert)
                    .map_err(|e| format!("cache.ca_file {}: {e}", path.display()))?;
                n += 1;
            }
            if n == 0 {
                return Err(format!("cache.ca_file {}: no certificate", path.display()));
            }
        }
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Client {
            tls: tokio_rustls::TlsConnector::from(Arc::new(config)),
            parent,
            timeout,
        })
    }

    /// Whether requests go through a parent cache.
    pub fn via_parent(&self) -> bool {
        self.parent.is_some()
    }

    /// The timeout for connecting, for the response head, and per body read.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Sends `method path_and_query` for `origin`, with `headers` and an
    /// optional request body, through the parent if there is one. Returns
    /// the response head; the body streams.
    ///
    /// # Errors
    /// [`UpstreamError`].
    pub async fn send(
        &self,
        method: &hyper::Method,
        origin: &Endpoint,
        path_and_query: &str,
        headers: &HeaderMap,
        body: Option<Incoming>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let (target, uri) = match &self.parent {
            Some(p) => (p, format!("{}{}", origin.base(), path_and_query)),
            None => (origin, path_and_query.to_string()),
        };
        let name = target.base();
        let body: ReqBody = match body {
            Some(b) => Either::Right(b),
            None => Either::Left(Empty::new()),
        };
        let mut req = Request::builder()
            .method(method.clone())
            .uri(uri)
            .body(body)
            .map_err(|e| UpstreamError::Http(name.clone(), e.to_string()))?;
        *req.headers_mut() = headers.clone();
        let host =
            HeaderValue::from_str(&origin.authority()).map_err(|e| UpstreamError::Http(name.clone(), e.to_string()))?;
        req.headers_mut().insert(hyper::header::HOST, host);
        let work = async {
            let tcp = tokio::net::TcpStream::connect((target.host.as_str(), target.port))
                .await
                .map_err(|e| UpstreamError::Connect(name.clone(), e.to_string()))?;
            let _ = tcp.set_nodelay(true);
            if target.tls {
                let server = ServerName::try_from(target.host.clone())
                    .map_err(|e| UpstreamError::Connect(name.clone(), e.to_string()))?;
                let tls = self
                    .tls
                    .connect(server, tcp)
                    .await
                    .map_err(|e| UpstreamError::Connect(name.clone(), e.to_string()))?;
                exchange(TokioIo::new(tls), req, &name).await
            } else {
                exchange(TokioIo::new(tcp), req, &name).await
            }
        };
        match tokio::time::timeout(self.timeout, work).await {
            Ok(r) => r,
            Err(_) => Err(UpstreamError::Timeout(name, self.timeout.as_millis() as u64)),
        }
    }
}

/// A request body sent upstream: none, or the client's, streamed.
type ReqBody = Either<Empty<Bytes>, Incoming>;

async fn exchange<T>(io: T, req: Request<ReqBody>, name: &str) -> Result<Response<Incoming>, UpstreamError>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| UpstreamError::Http(name.to_string(), e.to_string()))?;
    tokio::spawn(async move {
        // Ends when the response body is read or dropped.
        let _ = conn.await;
    });
    sender
        .send_request(req)
        .await
        .map_err(|e| UpstreamError::Http(name.to_string(), e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        let e = Endpoint::parse("https://Deb.Debian.org/").unwrap();
        assert_eq!((e.tls, e.host.as_str(), e.port), (true, "deb.debian.org", 443));
        assert_eq!(e.base(), "https://deb.debian.org");
        let e = Endpoint::parse("http://127.0.0.1:8080").unwrap();
        assert_eq!(e.authority(), "127.0.0.1:8080");
        let e = Endpoint::parse("http://[::1]:81").unwrap();
        assert_eq!((e.host.as_str(), e.port), ("::1", 81));
        assert_eq!(e.base(), "http://[::1]:81");
        for bad in [
            "ftp://a",
            "http://",
            "http://a/b",
            "http://a:x",
            "http://u@a",
            "http://[::1",
        ] {
            assert!(Endpoint::parse(bad).is_err(), "{bad}");
        }
    }
}
