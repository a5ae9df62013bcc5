//! One MQTT client connection over raw TCP, driven by the holdfast-mqtt codec.
//!
//! The handshake (CONNECT/CONNACK, SUBSCRIBE/SUBACK) is plain async code. The
//! measuring loops use the non-blocking half: `try_fill`/`try_flush` after
//! `TcpStream::ready`, so one task both reads acknowledgements and writes
//! publishes without a second task or a channel in between.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use bytes::{Buf, Bytes, BytesMut};
use holdfast_mqtt::{
    ConnAck, Connect, DecodeError, Packet, Properties, QoS, SubOptions, Subscribe, Version, decode, encode,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::timeout;

/// Keep-alive requested in CONNECT; the loops send PINGREQ at half of it.
pub const KEEP_ALIVE_SECS: u16 = 60;

/// The largest packet accepted from the broker (MQTT's own limit).
const MAX_PACKET: usize = 268_435_460;

/// Read at most this much per readiness event before handling it, so one
/// busy connection cannot hold a worker thread forever.
const READ_BURST: usize = 1 << 20;

/// How to reach and log in to the broker.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
    pub version: Version,
    pub username: Option<String>,
    pub password: Option<String>,
    pub timeout: Duration,
    /// Loopback source addresses to spread connections over (1: let the kernel choose).
    pub source_ips: u8,
    pub next_source: Arc<AtomicU32>,
}

impl Endpoint {
    /// Opens the TCP connection, from the next loopback source address when
    /// `source_ips` is above 1.
    async fn open(&self) -> io::Result<TcpStream> {
        let addr = self.addr();
        if self.source_ips <= 1 {
            return TcpStream::connect(&addr).await;
        }
        let k = self.next_source.fetch_add(1, Ordering::Relaxed) % u32::from(self.source_ips);
        let mut last = io::Error::other(format!("cannot resolve {addr}"));
        for target in tokio::net::lookup_host(&addr).await? {
            let SocketAddr::V4(v4) = target else { continue };
            let socket = TcpSocket::new_v4()?;
            let [a, b, c, d] = Ipv4Addr::LOCALHOST.octets();
            let src = Ipv4Addr::new(a, b, c, d.wrapping_add(k as u8));
            socket.bind(SocketAddr::new(IpAddr::V4(src), 0))?;
            match socket.connect(SocketAddr::V4(v4)).await {
                Ok(s) => return Ok(s),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    pub fn addr(&self) -> String {
        if self.host.contains(':') && !self.host.starts_with('[') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

pub struct Conn {
    pub stream: TcpStream,
    pub rbuf: BytesMut,
    pub wbuf: BytesMut,
    pub version: Version,
    /// The broker's receive maximum (MQTT 5 CONNACK), else 65535.
    pub receive_max: u16,
    /// The broker's maximum QoS (MQTT 5 CONNACK), else 2.
    pub max_qos: u8,
}

impl Conn {
    /// Opens a TCP connection and completes CONNECT/CONNACK.
    pub async fn connect(ep: &Endpoint, client_id: String) -> Result<Conn> {
        let addr = ep.addr();
        let stream = timeout(ep.timeout, ep.open())
            .await
            .map_err(|_| anyhow!("cannot connect to {addr}: timed out after {:?}", ep.timeout))?
            .with_context(|| format!("cannot connect to {addr}"))?;
        stream.set_nodelay(true)?;
        let mut c = Conn {
            stream,
            rbuf: BytesMut::new(),
            wbuf: BytesMut::new(),
            version: ep.version,
            receive_max: u16::MAX,
            max_qos: 2,
        };
        c.send(&Packet::Connect(Box::new(Connect {
            version: ep.version,
            client_id,
            clean_start: true,
            keep_alive: KEEP_ALIVE_SECS,
            username: ep.username.clone(),
            password: ep.password.clone().map(Bytes::from),
            will: None,
            properties: Properties::default(),
        })));
        let ack = timeout(ep.timeout, async {
            c.flush_all().await?;
            c.read_packet().await
        })
        .await
        .map_err(|_| anyhow!("{addr}: no CONNACK within {:?}", ep.timeout))?
        .map_err(|e| {
            anyhow!(
                "{addr}: {e:#} (before CONNACK; does the broker speak {}?)",
                version_name(ep.version)
            )
        })?;
        let Packet::ConnAck(ConnAck { code, properties, .. }) = ack else {
            bail!("{addr}: expected CONNACK, got {}", ack.name());
        };
        if code != 0 {
            bail!("{addr}: broker refused the connection: {}", connack_reason(code));
        }
        if let Some(m) = properties.receive_maximum {
            c.receive_max = m;
        }
        if let Some(q) = properties.maximum_qos {
            c.max_qos = q;
        }
        Ok(c)
    }

    /// SUBSCRIBE to one filter and wait for its SUBACK. Returns the granted QoS.
    pub async fn subscribe(&mut self, filter: &str, qos: QoS, wait: Duration) -> Result<u8> {
        self.send(&Packet::Subscribe(Subscribe {
            pkid: 1,
            filters: vec![(
                filter.to_string(),
                SubOptions {
                    qos,
                    ..SubOptions::default()
                },
            )],
            properties: Properties::default(),
        }));
        let code = timeout(wait, async {
            self.flush_all().await?;
            loop {
                // Anything before the SUBACK (nothing is expected) is dropped;
                // what follows it stays buffered for the subscriber loop.
                if let Packet::SubAck(a) = self.read_packet().await? {
                    break Ok::<_, anyhow::Error>(a.codes.first().copied().unwrap_or(0x80));
                }
            }
        })
        .await
        .map_err(|_| anyhow!("no SUBACK within {wait:?}"))??;
        if code > 2 {
            bail!("broker refused the subscription to {filter:?}: reason 0x{code:02X}");
        }
        Ok(code)
    }

    /// Appends a packet to the write buffer.
    pub fn send(&mut self, p: &Packet) {
        encode(p, self.version, &mut self.wbuf);
    }

    /// Writes the whole write buffer.
    pub async fn flush_all(&mut self) -> io::Result<()> {
        self.stream.write_all(&self.wbuf).await?;
        self.wbuf.clear();
        Ok(())
    }

    /// Reads until one whole packet has arrived.
    pub async fn read_packet(&mut self) -> Result<Packet> {
        loop {
            if let Some(p) = self.next_packet()? {
                return Ok(p);
            }
            self.rbuf.reserve(4096);
            if self.stream.read_buf(&mut self.rbuf).await? == 0 {
                bail!("connection closed by the broker");
            }
        }
    }

    /// The next whole packet already buffered, if any.
    pub fn next_packet(&mut self) -> Result<Option<Packet>, DecodeError> {
        decode(&mut self.rbuf, Some(self.version), MAX_PACKET)
    }

    /// Writes as much of the write buffer as the socket takes now.
    pub fn try_flush(&mut self) -> io::Result<()> {
        while !self.wbuf.is_empty() {
            match self.stream.try_write(&self.wbuf) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.wbuf.advance(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Reads what the socket has now. `Ok(false)` at end of stream.
    pub fn try_fill(&mut self) -> io::Result<bool> {
        let mut total = 0;
        while total < READ_BURST {
            if self.rbuf.capacity() - self.rbuf.len() < 8192 {
                self.rbuf.reserve(64 * 1024);
            }
            match self.stream.try_read_buf(&mut self.rbuf) {
                Ok(0) => return Ok(false),
                Ok(n) => total += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }
}

pub fn version_name(v: Version) -> &'static str {
    match v {
        Version::V31 => "MQTT 3.1",
        Version::V311 => "MQTT 3.1.1",
        Version::V5 => "MQTT 5",
    }
}

/// Names a CONNACK code. The codec maps 3.1.1 return codes to the MQTT 5
/// reason codes they stand for.
fn connack_reason(code: u8) -> String {
    format!("reason 0x{code:02X} ({})", reason_name(code))
}

/// Names an MQTT 5 reason code.
pub fn reason_name(code: u8) -> &'static str {
    match code {
        0x00 => "success",
        0x10 => "no matching subscribers",
        0x80 => "unspecified error",
        0x81 => "malformed packet",
        0x82 => "protocol error",
        0x83 => "implementation specific error",
        0x84 => "unsupported protocol version",
        0x85 => "client identifier not valid",
        0x86 => "bad user name or password",
        0x87 => "not authorized",
        0x88 => "server unavailable",
        0x89 => "server busy",
        0x8A => "banned",
        0x8B => "server shutting down",
        0x8C => "bad authentication method",
        0x8D => "keep alive timeout",
        0x8E => "session taken over",
        0x90 => "topic name invalid",
        0x91 => "packet identifier in use",
        0x93 => "receive maximum exceeded",
        0x95 => "packet too large",
        0x96 => "message rate too high",
        0x97 => "quota exceeded",
        0x98 => "administrative action",
        0x9F => "connection rate exceeded",
        _ => "other",
    }
}
