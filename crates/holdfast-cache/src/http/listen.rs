//! The cache's listeners: plain HTTP/1.1 (`cache.listen`) and, as an
//! option, HTTPS (`cache.tls_listen`, rustls). Both share one set of
//! connection slots ([`super::admission`]): a client's TLS connections
//! count against `cache.max_connections_per_ip` with its plain ones. A TLS
//! handshake must finish within `cache.header_timeout_ms`, and then the
//! request head within that again, however slowly its bytes come.

use std::convert::Infallible;
use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use hyper::rt::{Read, Write};
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;

use super::admission::{Admission, Slot};
use super::handle;
use crate::config::CacheConfig;
use crate::{Cache, CacheError};
use holdfast_model::ContentPolicy;

/// What a refused plain connection is told, written if the socket takes it
/// at once; the connection is closed either way (a TLS one is only closed).
const REFUSED: &[u8] =
    b"HTTP/1.1 503 Service Unavailable\r\nconnection: close\r\ncontent-length: 0\r\nretry-after: 1\r\n\r\n";

/// The sockets the cache answers on.
pub struct Listeners {
    /// Plain HTTP (`cache.listen`).
    pub plain: TcpListener,
    /// HTTPS (`cache.tls_listen`) with its TLS configuration, when set.
    pub tls: Option<(TcpListener, Arc<rustls::ServerConfig>)>,
}

impl From<TcpListener> for Listeners {
    fn from(plain: TcpListener) -> Listeners {
        Listeners { plain, tls: None }
    }
}

/// The rustls configuration of the HTTPS listener (`cache.tls_cert`,
/// `cache.tls_key`; ALPN `http/1.1`), `None` without `cache.tls_listen`.
///
/// # Errors
/// [`CacheError::Setup`]: a file that cannot be read or holds no
/// certificate or key, or a key that does not fit the certificate.
pub fn tls_config(cfg: &CacheConfig) -> Result<Option<Arc<rustls::ServerConfig>>, CacheError> {
    if cfg.tls_listen.is_none() {
        return Ok(None);
    }
    let setup = |key: &str, e: &dyn std::fmt::Display| CacheError::Setup(format!("{key}: {e}"));
    let (Some(cert), Some(key)) = (&cfg.tls_cert, &cfg.tls_key) else {
        return Err(setup(
            "cache.tls_cert",
            &"cache.tls_cert and cache.tls_key are required",
        ));
    };
    let certs = load_certs(cert).map_err(|e| setup("cache.tls_cert", &e))?;
    let key =
        PrivateKeyDer::from_pem_file(key).map_err(|e| setup("cache.tls_key", &format!("{}: {e}", key.display())))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| setup("cache.tls_listen", &e))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| setup("cache.tls_key", &e))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Some(Arc::new(config)))
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate in the file", path.display()));
    }
    Ok(certs)
}

/// The next connection on `l`, or never when there is no listener.
async fn accept(l: Option<&TcpListener>) -> std::io::Result<(tokio::net::TcpStream, std::net::SocketAddr)> {
    match l {
        Some(l) => l.accept().await,
        None => std::future::pending().await,
    }
}

/// Accepts connections on every listener until `stop` resolves. Which ones
/// it takes: [`super::admission`]; a request head must arrive whole within
/// `cache.header_timeout_ms`, however slowly its bytes come, and a TLS
/// handshake must finish within it before that.
pub async fn serve(
    cache: Arc<Cache>,
    policy: Arc<dyn ContentPolicy>,
    listeners: impl Into<Listeners>,
    stop: impl Future<Output = ()>,
) {
    let Listeners { plain, tls } = listeners.into();
    let cfg = cache.config();
    let admission = Admission::new(
        cfg.max_connections,
        cfg.max_connections_per_ip,
        cfg.reserved_connections_percent,
    );
    let header_timeout = Duration::from_millis(cfg.header_timeout_ms);
    let (tls_listener, acceptor) = match tls {
        Some((l, config)) => (Some(l), Some(tokio_rustls::TlsAcceptor::from(config))),
        None => (None, None),
    };
    tokio::pin!(stop);
    loop {
        let (accepted, secure) = tokio::select! {
            _ = &mut stop => break,
            r = plain.accept() => (r, false),
            r = accept(tls_listener.as_ref()) => (r, true),
        };
        let (tcp, peer) = match accepted {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "cache: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let slot = match admission.admit(peer.ip()) {
            Ok(slot) => slot,
            Err(refusal) => {
                cache.counters.event(refusal.event());
                tracing::debug!(peer = %peer, refusal = refusal.event(), tls = secure, "cache: connection refused");
                if !secure {
                    let _ = tcp.try_write(REFUSED);
                }
                drop(tcp);
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let (cache, policy) = (cache.clone(), policy.clone());
        match (&acceptor, secure) {
            (Some(acceptor), true) => {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let stream = match tokio::time::timeout(header_timeout, acceptor.accept(tcp)).await {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            tracing::debug!(peer = %peer, error = %e, "cache: TLS handshake failed");
                            cache.counters.event("tls-handshake-failed");
                            return;
                        }
                        Err(_) => {
                            cache.counters.event("tls-handshake-timeout");
                            return;
                        }
                    };
                    connection(cache, policy, TokioIo::new(stream), header_timeout, slot).await;
                });
            }
            _ => {
                tokio::spawn(connection(cache, policy, TokioIo::new(tcp), header_timeout, slot));
            }
        }
    }
}

/// Serves HTTP/1.1 on one accepted connection; gives its slot back at the end.
async fn connection<I>(cache: Arc<Cache>, policy: Arc<dyn ContentPolicy>, io: I, header_timeout: Duration, slot: Slot)
where
    I: Read + Write + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn({
        let cache = cache.clone();
        move |req| {
            let (cache, policy) = (cache.clone(), policy.clone());
            async move { Ok::<_, Infallible>(handle(cache, policy, req).await) }
        }
    });
    // hyper's header timeout runs from when it starts reading a head to the
    // end of it: a total deadline, not one per read.
    let served = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .keep_alive(true)
        .serve_connection(io, service)
        .await;
    if let Err(e) = served
        && e.is_timeout()
    {
        cache.counters.event("header-timeout");
    }
    drop(slot);
}
