//! What goes to the client: packets encoded in its protocol into the write
//! buffer, and the session's queue moved into it within the client's
//! receive maximum, its Maximum Packet Size and the buffer's high-water mark.

use std::sync::Arc;

use bytes::BytesMut;
use holdfast_mqtt::{Ack, Packet, Properties, Publish, QoS, Version, encode};

use crate::metrics::BrokerMetrics;
use crate::now_ms;
use crate::session::{Delivery, Inflight, Outgoing, Session};
use crate::sessions::Sessions;
use crate::{Broker, Dialect};

/// Bytes buffered for the socket beyond which the session queue is not
/// drained further until the client reads.
pub(super) const HIGH_WATER: usize = 256 << 10;

/// The write side of one connection.
pub(super) struct Outbound {
    /// Encoded, not yet written to the socket.
    pub(super) buf: BytesMut,
    version: Version,
    /// Most QoS 1/2 deliveries unacknowledged (the client's receive maximum).
    window: usize,
    /// The client's Maximum Packet Size.
    max_packet: u32,
    sessions: Arc<Sessions>,
    metrics: Arc<BrokerMetrics>,
    dialect: Arc<dyn Dialect>,
}

impl Outbound {
    /// The write side of a connection in protocol `version`, with the
    /// client's receive maximum (`window`) and Maximum Packet Size.
    pub(super) fn new(broker: &Broker, version: Version, window: usize, max_packet: u32) -> Outbound {
        Outbound {
            buf: BytesMut::new(),
            version,
            window,
            max_packet,
            sessions: broker.sessions.clone(),
            metrics: broker.metrics.clone(),
            dialect: broker.dialect.clone(),
        }
    }

    /// Encodes a packet.
    pub(super) fn send(&mut self, p: &Packet) {
        encode(p, self.version, &mut self.buf);
    }

    /// Acknowledges a received PUBLISH (PUBACK or PUBREC; nothing at QoS 0).
    pub(super) fn ack(&mut self, pkid: u16, qos: QoS, code: u8) {
        let ack = Ack {
            pkid,
            code,
            properties: Properties::default(),
        };
        match qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => self.send(&Packet::PubAck(ack)),
            QoS::ExactlyOnce => self.send(&Packet::PubRec(ack)),
        }
    }

    /// On resume: unacknowledged messages go again, in order.
    pub(super) fn resend(&mut self, session: &Session) {
        let resend: Vec<Inflight> = session.lock().inflight.iter().cloned().collect();
        for i in resend {
            if i.released {
                self.send(&Packet::PubRel(Ack::new(i.pkid)));
            } else if let Err(size) = self.encode_delivery(&i.out, i.pkid, true, now_ms()) {
                // The client came back with a smaller Maximum Packet Size.
                session.lock().take_inflight(i.pkid);
                self.too_large(session, &i.out, size);
            }
        }
    }

    /// Moves queued messages into the write buffer, within the client's
    /// receive maximum and the buffer's high-water mark.
    pub(super) fn flush_session(&mut self, session: &Session) {
        let now = now_ms();
        let mut st = session.lock();
        let mut took = false;
        while self.buf.len() < HIGH_WATER {
            let Some(front) = st.queue.front() else {
                break;
            };
            if front.qos != QoS::AtMostOnce && st.inflight.len() >= self.window {
                break;
            }
            let Some(out) = st.queue.pop_front() else {
                break;
            };
            took = true;
            if out.msg.expires_at_ms.is_some_and(|e| e <= now) {
                self.metrics.dropped("expired");
                self.sessions.del_queued(session, out.seq);
                continue;
            }
            let pkid = if out.qos == QoS::AtMostOnce { 0 } else { st.next_pkid() };
            if let Err(size) = self.encode_delivery(&out, pkid, false, now) {
                self.too_large(session, &out, size);
                continue;
            }
            if out.qos == QoS::AtMostOnce {
                out.settle(Delivery::Delivered);
            } else {
                st.inflight.push_back(Inflight {
                    pkid,
                    out,
                    released: false,
                });
            }
        }
        let room = took && std::mem::take(&mut st.wants_room);
        drop(st);
        if room {
            // A delivery refused for a full queue may try again.
            self.dialect.client_ready(&session.client_id);
        }
    }

    /// A message that exceeds the client's Maximum Packet Size: dropped,
    /// counted, and its sender told.
    fn too_large(&self, session: &Session, out: &Outgoing, size: usize) {
        self.metrics.dropped("too-large-for-client");
        self.sessions.del_queued(session, out.seq);
        out.settle(Delivery::TooLarge {
            size,
            max: self.max_packet,
        });
    }

    /// Encodes a delivery; if it exceeds the client's maximum packet size,
    /// encodes nothing and returns the size it would have had.
    fn encode_delivery(&mut self, out: &Outgoing, pkid: u16, dup: bool, now: u64) -> Result<(), usize> {
        let m = &out.msg;
        let mut properties = Properties::default();
        if self.version.is_v5() {
            properties = m.properties.clone();
            properties.subscription_identifiers = out.sub_ids.clone();
            if let Some(e) = m.expires_at_ms {
                properties.message_expiry_interval = Some(e.saturating_sub(now).div_ceil(1000) as u32);
            }
        }
        let p = Publish {
            dup,
            qos: out.qos,
            retain: out.retain,
            topic: m.topic.clone(),
            pkid,
            payload: m.payload.clone(),
            properties,
        };
        let before = self.buf.len();
        encode(&Packet::Publish(p), self.version, &mut self.buf);
        let size = self.buf.len() - before;
        if size > self.max_packet as usize {
            self.buf.truncate(before);
            return Err(size);
        }
        self.metrics.sent(out.qos);
        Ok(())
    }
}
