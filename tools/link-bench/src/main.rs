//! `holdfast-link-bench`: moves N bytes over one loopback QUIC stream (quinn,
//! TLS 1.3, the link's window sizes) or one TCP connection, in-process, and
//! prints one JSON line: `{"transport", "bytes", "seconds", "mb_per_s"}`.
//!
//! `scripts/bench-link.py` runs it beside the upstream link's drain benchmark
//! with the same number of bytes: what a bare stream manages on the same
//! machine in the same run is the ceiling the link is compared with.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{Parser, ValueEnum};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Transport {
    Quic,
    Tcp,
}

/// Raw stream throughput on loopback.
#[derive(Debug, Parser)]
struct Args {
    /// quic or tcp.
    transport: Transport,
    /// Bytes to move.
    #[arg(long, default_value_t = 100 << 20)]
    bytes: u64,
    /// Write size.
    #[arg(long, default_value_t = 64 << 10)]
    chunk: usize,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let seconds = rt.block_on(async {
        match args.transport {
            Transport::Quic => quic(args.bytes, args.chunk).await,
            Transport::Tcp => tcp(args.bytes, args.chunk).await,
        }
    })?;
    println!(
        "{}",
        serde_json::json!({
            "transport": format!("{:?}", args.transport).to_lowercase(),
            "bytes": args.bytes,
            "seconds": seconds,
            "mb_per_s": args.bytes as f64 / seconds / 1e6,
        })
    );
    Ok(())
}

fn transport() -> Result<quinn::TransportConfig> {
    // The same windows as the link (host/src/link/mod.rs).
    let mut t = quinn::TransportConfig::default();
    t.stream_receive_window((8u32 << 20).into());
    t.receive_window((32u32 << 20).into());
    t.send_window(32 << 20);
    t.max_idle_timeout(Some(quinn::IdleTimeout::try_from(Duration::from_secs(10))?));
    Ok(t)
}

async fn quic(bytes: u64, chunk: usize) -> Result<f64> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cert = rcgen::generate_simple_self_signed(vec!["bench".into()])?;
    let der = cert.cert.der().clone();
    let key =
        rustls::pki_types::PrivateKeyDer::try_from(cert.signing_key.serialize_der()).map_err(anyhow::Error::msg)?;
    let mut server_tls = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(vec![der.clone()], key)?;
    server_tls.alpn_protocols = vec![b"bench".to_vec()];
    let mut server =
        quinn::ServerConfig::with_crypto(Arc::new(quinn::crypto::rustls::QuicServerConfig::try_from(server_tls)?));
    server.transport_config(Arc::new(transport()?));
    let endpoint = quinn::Endpoint::server(server, SocketAddr::from(([127, 0, 0, 1], 0)))?;
    let addr = endpoint.local_addr()?;
    let receiver = tokio::spawn(async move {
        let conn = endpoint.accept().await.context("no connection")?.await?;
        let got = sink(conn.accept_uni().await?).await?;
        conn.close(0u32.into(), b"done");
        anyhow::Ok(got)
    });
    let mut roots = rustls::RootCertStore::empty();
    roots.add(der)?;
    let mut client_tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    client_tls.alpn_protocols = vec![b"bench".to_vec()];
    let mut client = quinn::ClientConfig::new(Arc::new(quinn::crypto::rustls::QuicClientConfig::try_from(client_tls)?));
    client.transport_config(Arc::new(transport()?));
    let mut ep = quinn::Endpoint::client(SocketAddr::from(([127, 0, 0, 1], 0)))?;
    ep.set_default_client_config(client);
    let conn = ep.connect(addr, "bench")?.await?;
    let started = Instant::now();
    let mut send = conn.open_uni().await?;
    pump(&mut send, bytes, chunk).await?;
    send.finish()?;
    let got = receiver.await??;
    let seconds = started.elapsed().as_secs_f64();
    anyhow::ensure!(got == bytes, "received {got} of {bytes} bytes");
    Ok(seconds)
}

async fn tcp(bytes: u64, chunk: usize) -> Result<f64> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let receiver = tokio::spawn(async move {
        let (s, _) = listener.accept().await?;
        sink(s).await
    });
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    let started = Instant::now();
    pump(&mut s, bytes, chunk).await?;
    s.shutdown().await?;
    let got = receiver.await??;
    let seconds = started.elapsed().as_secs_f64();
    anyhow::ensure!(got == bytes, "received {got} of {bytes} bytes");
    Ok(seconds)
}

/// Writes `bytes` bytes in writes of `chunk`.
async fn pump(w: &mut (impl AsyncWrite + Unpin), bytes: u64, chunk: usize) -> Result<()> {
    let data = vec![0x5au8; chunk];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk as u64) as usize;
        w.write_all(&data[..n]).await?;
        left -= n as u64;
    }
    Ok(())
}

/// Reads to the end; returns how many bytes came.
async fn sink(mut r: impl AsyncRead + Unpin) -> Result<u64> {
    let mut buf = vec![0u8; 1 << 20];
    let mut got = 0u64;
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            return Ok(got);
        }
        got += n as u64;
    }
}
