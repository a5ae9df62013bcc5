//! The MQTT listeners: plain TCP, TLS (rustls, optional client
//! certificates) and QUIC (quinn, ALPN `mqtt`, one MQTT connection on the
//! first bidirectional stream of each QUIC connection).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::CertificateDer;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::Broker;
use super::conn::{Peer, serve};
use crate::config::TlsListenerConfig;
use holdfast_model::policy::Transport;

/// Why a listener could not start.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    /// The address could not be bound.
    #[error("MQTT {kind} listener cannot bind {addr}: {source}")]
    Bind {
        /// `tcp`, `tls` or `quic`.
        kind: &'static str,
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A certificate or key file could not be read or parsed.
    #[error("MQTT {kind} listener: {path}: {message}")]
    Pem {
        /// Listener.
        kind: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// rustls or quinn refused the configuration.
    #[error("MQTT {kind} listener: {message}")]
    Tls {
        /// Listener.
        kind: &'static str,
        /// What is wrong.
        message: String,
    },
}

/// Where the listeners are bound.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Bound {
    /// TCP.
    pub tcp: Option<SocketAddr>,
    /// TLS.
    pub tls: Option<SocketAddr>,
    /// QUIC (UDP).
    pub quic: Option<SocketAddr>,
    /// MQTT over WebSockets.
    pub ws: Option<SocketAddr>,
    /// MQTT over WebSockets over TLS.
    pub wss: Option<SocketAddr>,
}

/// Binds every enabled listener and spawns its accept loop.
///
/// # Errors
/// A listener cannot bind or its TLS material is unusable.
pub async fn start(
    broker: &Arc<Broker>,
    stop: watch::Receiver<bool>,
) -> Result<(Bound, Vec<JoinHandle<()>>), ListenError> {
    let cfg = broker.config().clone();
    let mut bound = Bound::default();
    let mut tasks = Vec::new();
    if cfg.tcp.enabled {
        let addr = cfg.tcp.listen;
        let (l, local) = bind_tcp("tcp", addr).await?;
        bound.tcp = Some(local);
        tracing::info!(addr = %local, "MQTT listening (tcp)");
        tasks.push(tokio::spawn(accept_tcp(broker.clone(), l, None, stop.clone())));
    }
    if cfg.tls.enabled {
        let tls = server_config("tls", &cfg.tls, Vec::new())?;
        let addr = cfg.tls.listen;
        let (l, local) = bind_tcp("tls", addr).await?;
        bound.tls = Some(local);
        tracing::info!(addr = %local, client_certs = cfg.tls.client_ca.is_some(), "MQTT listening (tls)");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        tasks.push(tokio::spawn(accept_tcp(
            broker.clone(),
            l,
            Some(acceptor),
            stop.clone(),
        )));
    }
    for kind in ["ws", "wss"] {
        let (enabled, addr, limits) = match kind {
            "ws" => (
                cfg.ws.enabled,
                cfg.ws.listen,
                WsLimits {
                    paths: cfg.ws.paths.clone(),
                    max_handshakes: cfg.ws.max_handshakes,
                    max_handshakes_per_ip: cfg.ws.max_handshakes_per_ip,
                },
            ),
            _ => (
                cfg.wss.enabled,
                cfg.wss.listen,
                WsLimits {
                    paths: cfg.wss.paths.clone(),
                    max_handshakes: cfg.wss.max_handshakes,
                    max_handshakes_per_ip: cfg.wss.max_handshakes_per_ip,
                },
            ),
        };
        if !enabled {
            continue;
        }
        let acceptor = match kind {
            "wss" => Some(tokio_rustls::TlsAcceptor::from(Arc::new(server_config(
                "wss",
                &cfg.wss.tls(),
                vec![b"http/1.1".to_vec()],
            )?))),
            _ => None,
        };
        let (listener, local) = bind_tcp(kind, addr).await?;
        if kind == "ws" {
            bound.ws = Some(local);
        } else {
            bound.wss = Some(local);
        }
        tracing::info!(addr = %local, paths = ?limits.paths, "MQTT listening ({kind})");
        tasks.push(tokio::spawn(accept_ws(
            broker.clone(),
            listener,
            acceptor,
            limits,
            stop.clone(),
        )));
    }
    if cfg.quic.enabled {
        let tls = server_config("quic", &cfg.quic, vec![b"mqtt".to_vec()])?;
        let quic_err = |message: String| ListenError::Tls { kind: "quic", message };
        let mut transport = quinn::TransportConfig::default();
        // MQTT keep-alive decides liveness; QUIC only reaps dead paths.
        transport.max_idle_timeout(Some(
            crate::quic::idle_timeout(Duration::from_secs(600)).map_err(quic_err)?,
        ));
        transport.max_concurrent_bidi_streams(1u32.into());
        transport.max_concurrent_uni_streams(0u32.into());
        let server = crate::quic::server_config(tls, transport).map_err(quic_err)?;
        let addr = cfg.quic.listen;
        let endpoint = quinn::Endpoint::server(server, addr).map_err(|source| ListenError::Bind {
            kind: "quic",
            addr,
            source,
        })?;
        let local = endpoint.local_addr().map_err(|source| ListenError::Bind {
            kind: "quic",
            addr,
            source,
        })?;
        bound.quic = Some(local);
        tracing::info!(addr = %local, "MQTT listening (quic)");
        tasks.push(tokio::spawn(accept_quic(broker.clone(), endpoint, stop)));
    }
    Ok((bound, tasks))
}

/// Binds a TCP listener; returns it with the address it got.
async fn bind_tcp(kind: &'static str, addr: SocketAddr) -> Result<(tokio::net::TcpListener, SocketAddr), ListenError> {
    let err = |source| ListenError::Bind { kind, addr, source };
    let l = tokio::net::TcpListener::bind(addr).await.map_err(err)?;
    let local = l.local_addr().map_err(err)?;
    Ok((l, local))
}

fn pem_err(kind: &'static str, path: &Path, e: impl std::fmt::Display) -> ListenError {
    ListenError::Pem {
        kind,
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

fn load_certs(kind: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, ListenError> {
    holdfast_tls::load_certs(path).map_err(|e| pem_err(kind, path, e.message))
}

/// Builds the rustls server configuration of a listener.
fn server_config(
    kind: &'static str,
    l: &TlsListenerConfig,
    alpn: Vec<Vec<u8>>,
) -> Result<rustls::ServerConfig, ListenError> {
    let tls_err = |e: &dyn std::fmt::Display| ListenError::Tls {
        kind,
        message: e.to_string(),
    };
    let (Some(cert), Some(key)) = (&l.cert, &l.key) else {
        return Err(ListenError::Tls {
            kind,
            message: "cert and key are required".into(),
        });
    };
    let certs = load_certs(kind, cert)?;
    let key = holdfast_tls::load_key(key).map_err(|e| pem_err(kind, key, e.message))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let versions: &[&rustls::SupportedProtocolVersion] = if kind == "quic" {
        &[&rustls::version::TLS13]
    } else {
        &[&rustls::version::TLS13, &rustls::version::TLS12]
    };
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)
        .map_err(|e| tls_err(&e))?;
    let builder = match &l.client_ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in load_certs(kind, ca)? {
                roots.add(c).map_err(|e| pem_err(kind, ca, e))?;
            }
            let v = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let v = if l.require_client_cert {
                v.build()
            } else {
                v.allow_unauthenticated().build()
            }
            .map_err(|e| tls_err(&e))?;
            builder.with_client_cert_verifier(v)
        }
        None => builder.with_client_cert_verifier(Arc::new(AnyClientCert { provider })),
    };
    let mut config = builder.with_single_cert(certs, key).map_err(|e| tls_err(&e))?;
    config.alpn_protocols = alpn;
    Ok(config)
}

/// Asks every client for a certificate, makes none mandatory, and accepts
/// any whose holder proves it has the key and that is within its validity
/// period. Whether the certificate means anything is the auth plugin's
/// decision: a registered thumbprint, or a chain to a registered CA.
#[derive(Debug)]
struct AnyClientCert {
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl rustls::server::danger::ClientCertVerifier for AnyClientCert {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        use rustls::CertificateError;
        let (_, cert) = x509_parser::parse_x509_certificate(end_entity)
            .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
        let now = x509_parser::time::ASN1Time::from_timestamp(now.as_secs() as i64)
            .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
        if !cert.validity().is_valid_at(now) {
            return Err(rustls::Error::InvalidCertificate(CertificateError::Expired));
        }
        Ok(rustls::server::danger::ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// Describes a verified client chain and hands it to the registry (for
/// registered-CA checks): thumbprint and common name of the leaf.
fn client_cert(broker: &Broker, chain: Option<&[CertificateDer<'static>]>) -> (Option<String>, Option<String>) {
    let Some(chain) = chain.filter(|c| !c.is_empty()) else {
        return (None, None);
    };
    let (thumbprint, cn) = holdfast_tls::describe_cert(&chain[0]);
    broker.registry.presented(&thumbprint, chain.to_vec());
    (Some(thumbprint), cn)
}

/// The next accepted TCP connection (no Nagle), or `None` once `stop` is set.
/// A failed accept (out of descriptors and the like) is logged and retried
/// after a short pause.
async fn next_socket(
    listener: &tokio::net::TcpListener,
    stop: &mut watch::Receiver<bool>,
) -> Option<(tokio::net::TcpStream, SocketAddr)> {
    loop {
        let accepted = tokio::select! {
            _ = stop.wait_for(|s| *s) => return None,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((socket, addr)) => {
                let _ = socket.set_nodelay(true);
                return Some((socket, addr));
            }
            Err(e) => {
                tracing::warn!(error = %e, "MQTT accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// The TLS handshake of an accepted socket, by `deadline`: the stream and
/// the client certificate's thumbprint and common name. A failure or the
/// deadline is counted and logged; `None` then.
async fn accept_tls(
    broker: &Broker,
    acceptor: &tokio_rustls::TlsAcceptor,
    socket: tokio::net::TcpStream,
    addr: SocketAddr,
    deadline: tokio::time::Instant,
) -> Option<(
    tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    (Option<String>, Option<String>),
)> {
    let stream = match tokio::time::timeout_at(deadline, acceptor.accept(socket)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!(peer = %addr, error = %e, "TLS handshake failed");
            broker.bad_tls("handshake");
            return None;
        }
        Err(_) => {
            broker.bad_tls("handshake-timeout");
            return None;
        }
    };
    let cert = client_cert(broker, stream.get_ref().1.peer_certificates());
    Some((stream, cert))
}

async fn accept_tcp(
    broker: Arc<Broker>,
    listener: tokio::net::TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    mut stop: watch::Receiver<bool>,
) {
    while let Some((socket, addr)) = next_socket(&listener, &mut stop).await {
        let broker = broker.clone();
        match &tls {
            None => {
                let peer = Peer {
                    addr,
                    transport: Transport::Tcp,
                    cert_thumbprint: None,
                    cert_common_name: None,
                };
                tokio::spawn(serve(broker, socket, peer));
            }
            Some(acceptor) => {
                let acceptor = acceptor.clone();
                let deadline = tokio::time::Instant::now() + Duration::from_millis(broker.config().connect_timeout_ms);
                tokio::spawn(async move {
                    let Some((stream, (cert_thumbprint, cert_common_name))) =
                        accept_tls(&broker, &acceptor, socket, addr, deadline).await
                    else {
                        return;
                    };
                    let peer = Peer {
                        addr,
                        transport: Transport::Tls,
                        cert_thumbprint,
                        cert_common_name,
                    };
                    serve(broker, stream, peer).await;
                });
            }
        }
    }
}

/// The upgrade limits of a WebSocket listener.
struct WsLimits {
    paths: Vec<String>,
    max_handshakes: usize,
    max_handshakes_per_ip: usize,
}

async fn accept_ws(
    broker: Arc<Broker>,
    listener: tokio::net::TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    limits: WsLimits,
    mut stop: watch::Receiver<bool>,
) {
    let slots = crate::handshakes::Handshakes::new(limits.max_handshakes, limits.max_handshakes_per_ip);
    let paths = Arc::new(limits.paths);
    while let Some((socket, addr)) = next_socket(&listener, &mut stop).await {
        let slot = match slots.acquire(addr.ip()) {
            Ok(slot) => slot,
            Err(why) => {
                broker.bad_tls(why.label());
                tracing::debug!(peer = %addr, why = why.label(), "WebSocket upgrade refused: too many in progress");
                // Answered without reading the request (in plain text only:
                // a TLS client gets the connection closed), without waiting.
                if tls.is_none() {
                    let r = crate::websocket::Refusal {
                        why,
                        text: "too many WebSocket upgrades in progress; try again later".into(),
                    };
                    let _ = socket.try_write(&r.response());
                }
                continue;
            }
        };
        let (broker, tls, paths) = (broker.clone(), tls.clone(), paths.clone());
        tokio::spawn(async move {
            // The TLS handshake and the whole request head share one
            // deadline, the CONNECT's: not a time per read, so a client
            // sending a byte now and then is cut off all the same.
            let deadline = tokio::time::Instant::now() + Duration::from_millis(broker.config().connect_timeout_ms);
            match tls {
                None => upgrade(&broker, socket, addr, &paths, (None, None), deadline, slot).await,
                Some(acceptor) => {
                    if let Some((stream, cert)) = accept_tls(&broker, &acceptor, socket, addr, deadline).await {
                        upgrade(&broker, stream, addr, &paths, cert, deadline, slot).await;
                    }
                }
            }
        });
    }
}

/// The WebSocket upgrade of an accepted stream, by `deadline`, then the
/// MQTT connection over it. Every refusal is answered in HTTP and counted.
async fn upgrade<S>(
    broker: &Arc<Broker>,
    mut stream: S,
    addr: SocketAddr,
    paths: &[String],
    (cert_thumbprint, cert_common_name): (Option<String>, Option<String>),
    deadline: tokio::time::Instant,
    slot: crate::handshakes::Slot,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    use crate::websocket::{Refusal, Refused};
    use tokio::io::AsyncWriteExt as _;
    let checked = match tokio::time::timeout_at(deadline, crate::websocket::read_head(&mut stream)).await {
        Err(_) => Err(Refusal {
            why: Refused::Timeout,
            text: "the upgrade request did not arrive in time".into(),
        }),
        Ok(Err(r)) => Err(r),
        Ok(Ok((head, tail))) => crate::websocket::check_upgrade(&head, paths).map(|u| (u, tail)),
    };
    let (accepted, tail) = match checked {
        Ok(ok) => ok,
        Err(r) => {
            tracing::debug!(peer = %addr, why = r.why.label(), text = %r.text, "WebSocket upgrade refused");
            broker.bad_tls(r.why.label());
            // A client that does not read its answer does not hold the slot.
            let _ = tokio::time::timeout(Duration::from_secs(1), async {
                stream.write_all(&r.response()).await?;
                stream.shutdown().await
            })
            .await;
            return;
        }
    };
    let written = tokio::time::timeout_at(deadline, async {
        stream.write_all(&accepted.response()).await?;
        stream.flush().await
    })
    .await;
    if !matches!(written, Ok(Ok(()))) {
        broker.bad_tls(Refused::Timeout.label());
        return;
    }
    drop(slot);
    let config = crate::websocket::config(broker.config().max_packet_size);
    let ws = tokio_tungstenite::WebSocketStream::from_partially_read(
        stream,
        tail,
        tokio_tungstenite::tungstenite::protocol::Role::Server,
        Some(config),
    )
    .await;
    let peer = Peer {
        addr,
        transport: Transport::Websocket,
        cert_thumbprint,
        cert_common_name,
    };
    // A task of its own: the connection's task then holds the MQTT
    // connection's state only, not the handshake's as well.
    tokio::spawn(serve(broker.clone(), crate::websocket::WsStream::new(ws), peer));
}

async fn accept_quic(broker: Arc<Broker>, endpoint: quinn::Endpoint, mut stop: watch::Receiver<bool>) {
    loop {
        let incoming = tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            i = endpoint.accept() => i,
        };
        let Some(incoming) = incoming else {
            break;
        };
        let broker = broker.clone();
        tokio::spawn(async move {
            let timeout = Duration::from_millis(broker.config().connect_timeout_ms);
            let conn = match tokio::time::timeout(timeout, incoming).await {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "QUIC handshake failed");
                    broker.bad_tls("quic-handshake");
                    return;
                }
                Err(_) => {
                    broker.bad_tls("handshake-timeout");
                    return;
                }
            };
            let addr = conn.remote_address();
            let chain = conn
                .peer_identity()
                .and_then(|id| id.downcast::<Vec<CertificateDer<'static>>>().ok());
            let (cert_thumbprint, cert_common_name) = client_cert(&broker, chain.as_deref().map(Vec::as_slice));
            let (send, recv) = match tokio::time::timeout(timeout, conn.accept_bi()).await {
                Ok(Ok(s)) => s,
                _ => {
                    conn.close(0u32.into(), b"no stream");
                    return;
                }
            };
            let peer = Peer {
                addr,
                transport: Transport::Quic,
                cert_thumbprint,
                cert_common_name,
            };
            serve(broker, tokio::io::join(recv, send), peer).await;
            // The stream was finished; give the client a moment to read the
            // last bytes and close, rather than cutting them off.
            let _ = tokio::time::timeout(Duration::from_secs(2), conn.closed()).await;
            conn.close(0u32.into(), b"bye");
        });
    }
    endpoint.close(0u32.into(), b"shutting down");
    endpoint.wait_idle().await;
}
