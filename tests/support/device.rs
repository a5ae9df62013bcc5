//! A device or module as the IoT Hub device SDKs connect: MQTT 3.1.1 with
//! a real client library (rumqttc), a SAS token, client id = identity id.

use std::collections::VecDeque;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use rumqttc::{Client as MqttClient, Event, MqttOptions, Packet, QoS};
use serde_json::Value;

use super::sas::{in_an_hour, sas, username};

/// What the client's event loop saw.
pub enum Ev {
    ConnAck(rumqttc::ConnectReturnCode),
    SubAck,
    Publish(String, Vec<u8>),
    Gone(String),
}

/// A device or module on an IoT Hub SDK's footing: MQTT 3.1.1, a SAS
/// token, client id = identity id.
pub struct Device {
    pub id: String,
    client: MqttClient,
    rx: mpsc::Receiver<Ev>,
    backlog: std::cell::RefCell<VecDeque<(String, Vec<u8>)>>,
}

impl Device {
    pub fn connect(port: u16, id: &str, key: &str) -> Device {
        let mut o = MqttOptions::new(id, "127.0.0.1", port);
        o.set_credentials(username(id), sas(id, key, in_an_hour()));
        o.set_keep_alive(Duration::from_secs(30));
        o.set_max_packet_size(256 << 10, 256 << 10);
        let (client, mut connection) = MqttClient::new(o, 64);
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for ev in connection.iter() {
                let sent = match ev {
                    Ok(Event::Incoming(Packet::ConnAck(c))) => tx.send(Ev::ConnAck(c.code)),
                    Ok(Event::Incoming(Packet::SubAck(_))) => tx.send(Ev::SubAck),
                    Ok(Event::Incoming(Packet::Publish(p))) => tx.send(Ev::Publish(p.topic, p.payload.to_vec())),
                    Ok(_) => Ok(()),
                    Err(e) => {
                        let _ = tx.send(Ev::Gone(e.to_string()));
                        return;
                    }
                };
                if sent.is_err() {
                    return;
                }
            }
        });
        let d = Device {
            id: id.to_string(),
            client,
            rx,
            backlog: Default::default(),
        };
        match d.rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Ev::ConnAck(rumqttc::ConnectReturnCode::Success)) => d,
            Ok(Ev::ConnAck(code)) => panic!("{id}: refused: {code:?}"),
            Ok(Ev::Gone(e)) => panic!("{id}: {e}"),
            _ => panic!("{id}: no CONNACK"),
        }
    }

    pub fn subscribe(&self, filters: &[&str]) {
        for f in filters {
            self.client.subscribe(*f, QoS::AtLeastOnce).unwrap();
            self.wait(10, |e| matches!(e, Ev::SubAck).then_some(()))
                .unwrap_or_else(|| panic!("{}: no SUBACK for {f}", self.id));
        }
    }

    pub fn publish(&self, topic: &str, payload: impl Into<Vec<u8>>) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload.into())
            .unwrap();
    }

    /// Waits for an event `f` picks; publishes it does not pick are kept.
    pub fn wait<T>(&self, secs: u64, mut f: impl FnMut(&Ev) -> Option<T>) -> Option<T> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            match self.rx.recv_timeout(left) {
                Ok(ev) => {
                    if let Some(t) = f(&ev) {
                        return Some(t);
                    }
                    match ev {
                        Ev::Publish(t, p) => self.backlog.borrow_mut().push_back((t, p)),
                        Ev::Gone(e) => panic!("{}: connection lost: {e}", self.id),
                        _ => {}
                    }
                }
                Err(_) => return None,
            }
        }
    }

    /// The next message whose topic starts with `prefix`.
    pub fn try_expect(&self, prefix: &str, secs: u64) -> Option<(String, Vec<u8>)> {
        {
            let mut backlog = self.backlog.borrow_mut();
            if let Some(i) = backlog.iter().position(|(t, _)| t.starts_with(prefix)) {
                return backlog.remove(i);
            }
        }
        self.wait(secs, |e| match e {
            Ev::Publish(t, p) if t.starts_with(prefix) => Some((t.clone(), p.clone())),
            _ => None,
        })
    }

    pub fn expect(&self, prefix: &str) -> (String, Vec<u8>) {
        self.try_expect(prefix, 15)
            .unwrap_or_else(|| panic!("{}: nothing on {prefix}", self.id))
    }

    pub fn expect_json(&self, prefix: &str) -> (String, Value) {
        let (t, p) = self.expect(prefix);
        let v = if p.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&p).unwrap_or_else(|e| panic!("{t}: {e}"))
        };
        (t, v)
    }
}
