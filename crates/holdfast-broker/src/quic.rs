//! QUIC endpoint configurations from rustls ones, shared by the broker's
//! MQTT-over-QUIC listener and the link (parent listener, child client).

use std::sync::Arc;

/// A QUIC server config: `tls` without 0-RTT (nothing here is replay-safe)
/// and the given transport settings.
///
/// # Errors
/// `tls` cannot be used for QUIC (it must allow TLS 1.3 and use a
/// QUIC-capable cipher suite).
pub fn server_config(
    mut tls: rustls::ServerConfig,
    transport: quinn::TransportConfig,
) -> Result<quinn::ServerConfig, String> {
    tls.max_early_data_size = 0;
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).map_err(|e| e.to_string())?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    server.transport_config(Arc::new(transport));
    Ok(server)
}

/// A QUIC client config: `tls` and the given transport settings.
///
/// # Errors
/// `tls` cannot be used for QUIC.
pub fn client_config(
    tls: rustls::ClientConfig,
    transport: quinn::TransportConfig,
) -> Result<quinn::ClientConfig, String> {
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(|e| e.to_string())?;
    let mut client = quinn::ClientConfig::new(Arc::new(crypto));
    client.transport_config(Arc::new(transport));
    Ok(client)
}

/// An idle timeout for a transport config.
///
/// # Errors
/// `d` is beyond what QUIC can express.
pub fn idle_timeout(d: std::time::Duration) -> Result<quinn::IdleTimeout, String> {
    quinn::IdleTimeout::try_from(d).map_err(|e| e.to_string())
}
