//! A small blocking MQTT client over the `holdfast-mqtt` codec, for tests
//! that must know exactly which publish was acknowledged and read every
//! property of what arrives.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use holdfast_mqtt::{self as codec, Packet, Properties, Publish, QoS, SubOptions, Subscribe, Version};

pub struct Client {
    stream: TcpStream,
    buf: BytesMut,
    version: Version,
    next: u16,
    /// Messages that arrived while waiting for something else.
    pending: std::collections::VecDeque<Received>,
}

/// A received message: topic, payload and user properties.
#[derive(Debug, Clone)]
pub struct Received {
    pub topic: String,
    pub payload: String,
    pub props: Vec<(String, String)>,
}

impl Received {
    pub fn prop(&self, k: &str) -> Option<&str> {
        self.props.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str())
    }
}

impl Client {
    /// Connects with MQTT 5; `clean` false keeps the session for a day.
    pub fn connect(port: u16, client_id: &str, clean: bool) -> std::io::Result<Client> {
        match Client::connect_as(port, client_id, clean, None, None)? {
            Ok(c) => Ok(c),
            Err(code) => Err(std::io::Error::other(format!("CONNACK refused with 0x{code:02x}"))),
        }
    }

    /// Connects with MQTT 5 and credentials; `Ok(Err(code))` when the
    /// server refuses with a CONNACK reason code.
    pub fn connect_as(
        port: u16,
        client_id: &str,
        clean: bool,
        username: Option<&str>,
        password: Option<&[u8]>,
    ) -> std::io::Result<Result<Client, u8>> {
        let stream = TcpStream::connect(("127.0.0.1", port))?;
        stream.set_nodelay(true)?;
        let mut c = Client {
            stream,
            buf: BytesMut::new(),
            version: Version::V5,
            next: 1,
            pending: std::collections::VecDeque::new(),
        };
        let mut properties = Properties::default();
        if !clean {
            properties.session_expiry_interval = Some(86_400);
        }
        c.send(&Packet::Connect(Box::new(codec::Connect {
            version: Version::V5,
            client_id: client_id.into(),
            clean_start: clean,
            keep_alive: 60,
            username: username.map(str::to_string),
            password: password.map(Bytes::copy_from_slice),
            will: None,
            properties,
        })))?;
        match c.read(Duration::from_secs(30))? {
            Some(Packet::ConnAck(a)) if a.code < 0x80 => Ok(Ok(c)),
            Some(Packet::ConnAck(a)) => Ok(Err(a.code)),
            other => Err(std::io::Error::other(format!("no CONNACK: {other:?}"))),
        }
    }

    /// Waits up to `timeout` for the server to end the connection: the
    /// DISCONNECT reason code, 0 if it just closed, `None` if it stayed up.
    pub fn wait_disconnect(&mut self, timeout: Duration) -> Option<u8> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            match self.read(deadline.saturating_duration_since(Instant::now())) {
                Ok(Some(Packet::Disconnect(d))) => return Some(d.code),
                Ok(Some(_)) => continue,
                Ok(None) => return None,
                Err(_) => return Some(0),
            }
        }
        None
    }

    fn send(&mut self, p: &Packet) -> std::io::Result<()> {
        let mut out = BytesMut::new();
        codec::encode(p, self.version, &mut out);
        self.stream.write_all(&out)
    }

    /// The next packet, or `None` after `timeout`.
    fn read(&mut self, timeout: Duration) -> std::io::Result<Option<Packet>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(p) = codec::decode(&mut self.buf, Some(self.version), 1 << 24)
                .map_err(|e| std::io::Error::other(e.to_string()))?
            {
                return Ok(Some(p));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            self.stream.set_read_timeout(Some(left))?;
            let mut chunk = [0u8; 16384];
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err(std::io::Error::other("connection closed")),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                    return Ok(None);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Publishes with QoS 1 and waits for the PUBACK: true if it came with
    /// a success code within `timeout`.
    pub fn publish_acked(&mut self, topic: &str, payload: &str, timeout: Duration) -> std::io::Result<bool> {
        self.publish_acked_with(topic, payload, &[], timeout)
    }

    /// [`Client::publish_acked`] with MQTT 5 user properties.
    pub fn publish_acked_with(
        &mut self,
        topic: &str,
        payload: &str,
        user_properties: &[(&str, &str)],
        timeout: Duration,
    ) -> std::io::Result<bool> {
        let pkid = self.next;
        self.next = self.next.checked_add(1).unwrap_or(1);
        let mut publish = Publish::new(
            topic,
            Bytes::copy_from_slice(payload.as_bytes()),
            QoS::AtLeastOnce,
            pkid,
        );
        publish.properties.user_properties = user_properties
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.send(&Packet::Publish(publish))?;
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            match self.read(deadline.saturating_duration_since(Instant::now()))? {
                Some(Packet::PubAck(a)) if a.pkid == pkid => return Ok(a.code < 0x80),
                Some(_) => continue,
                None => break,
            }
        }
        Ok(false)
    }

    /// Subscribes with QoS 1.
    pub fn subscribe(&mut self, filter: &str) -> std::io::Result<()> {
        self.send(&Packet::Subscribe(Subscribe {
            pkid: 1,
            filters: vec![(
                filter.into(),
                SubOptions {
                    qos: QoS::AtLeastOnce,
                    ..SubOptions::default()
                },
            )],
            properties: Properties::default(),
        }))?;
        // A resumed session's queued messages may come before the SUBACK.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.read(deadline.saturating_duration_since(Instant::now()))? {
                Some(Packet::SubAck(_)) => return Ok(()),
                Some(Packet::Publish(p)) => {
                    let m = self.accept(p)?;
                    self.pending.push_back(m);
                }
                Some(_) => {}
                None => return Err(std::io::Error::other("no SUBACK")),
            }
        }
    }

    fn accept(&mut self, p: Publish) -> std::io::Result<Received> {
        if p.qos == QoS::AtLeastOnce {
            self.send(&Packet::PubAck(codec::Ack::new(p.pkid)))?;
        }
        Ok(Received {
            topic: p.topic,
            payload: String::from_utf8_lossy(&p.payload).into_owned(),
            props: p.properties.user_properties,
        })
    }

    /// The next message within `timeout`, acknowledged.
    pub fn recv(&mut self, timeout: Duration) -> std::io::Result<Option<Received>> {
        if let Some(m) = self.pending.pop_front() {
            return Ok(Some(m));
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.read(left)? {
                Some(Packet::Publish(p)) => return self.accept(p).map(Some),
                Some(_) => continue,
                None => return Ok(None),
            }
        }
    }
}
