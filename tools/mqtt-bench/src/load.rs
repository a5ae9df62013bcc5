//! The publisher and subscriber tasks of a throughput/latency run.
//!
//! Payload layout (big-endian), the rest is zeros:
//!
//! | bytes  | field                                                     |
//! |--------|-----------------------------------------------------------|
//! | 0..8   | send time, ns since the run's shared `Instant`            |
//! | 8..10  | run tag (random per run; other traffic is not counted)    |
//! | 10..12 | publisher index                                           |
//! | 12..16 | per-publisher sequence number, from 0                     |

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use holdfast_mqtt::{Ack, Disconnect, Packet, Publish, QoS};
use tokio::io::Interest;
use tokio::sync::watch;
use tokio::time::{MissedTickBehavior, interval_at, sleep_until};

use crate::conn::{Conn, KEEP_ALIVE_SECS, reason_name};
use crate::hist::Hist;

pub const HEADER_LEN: usize = 16;

/// Stop producing into the write buffer above this many bytes.
const HIGH_WATER: usize = 64 * 1024;

/// The shared clock and phases of a run.
#[derive(Debug, Clone)]
pub struct Timeline {
    pub epoch: Instant,
    /// Publishers start.
    pub start: Instant,
    /// Measurement window: `[warm_end, end)`.
    pub warm_end: Instant,
    pub end: Instant,
    /// How long publishers wait for outstanding acknowledgements after `end`.
    pub drain: Duration,
    pub tag: u16,
    pub publishers: usize,
}

impl Timeline {
    pub fn ns(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.epoch).as_nanos() as u64
    }

    fn window_ns(&self) -> (u64, u64) {
        (self.ns(self.warm_end), self.ns(self.end))
    }
}

#[derive(Debug, Default, Clone, Copy)]
pub struct Errors {
    /// Socket errors.
    pub io: u64,
    /// Connections the broker closed or DISCONNECTed.
    pub disconnects: u64,
    /// Undecodable or unexpected packets.
    pub protocol: u64,
    /// MQTT 5 acknowledgements with a failure reason code.
    pub rejected: u64,
}

impl Errors {
    pub fn add(&mut self, o: &Errors) {
        self.io += o.io;
        self.disconnects += o.disconnects;
        self.protocol += o.protocol;
        self.rejected += o.rejected;
    }

    pub fn broken(&self) -> u64 {
        self.io + self.disconnects + self.protocol
    }
}

pub struct PubStats {
    /// Messages published in the whole run (= next sequence number).
    pub sent_total: u64,
    /// Messages published inside the measurement window.
    pub sent_window: u64,
    /// PUBACK/PUBCOMP received inside the measurement window.
    pub acked_window: u64,
    /// Publishes still unacknowledged when the publisher gave up.
    pub unacked: u64,
    /// Send → PUBACK (QoS 1) / PUBCOMP (QoS 2), for publishes sent in the window.
    pub ack_latency: Hist,
    pub errors: Errors,
    /// The in-flight limit used (after the broker's receive maximum).
    pub inflight_limit: usize,
}

/// What one publisher sends.
#[derive(Debug, Clone)]
pub struct PubPlan {
    pub index: usize,
    pub topic: String,
    pub qos: QoS,
    pub payload_len: usize,
    /// Unacknowledged QoS 1/2 publishes at most (capped by the broker's
    /// receive maximum).
    pub inflight: usize,
    /// One message per interval; `None` = as fast as possible.
    pub interval: Option<Duration>,
}

/// Publishes to `plan.topic` from `t.start` until `t.end`.
pub async fn publisher(mut c: Conn, plan: PubPlan, t: Arc<Timeline>) -> PubStats {
    let PubPlan {
        index,
        topic,
        qos,
        payload_len,
        inflight,
        interval,
    } = plan;
    let version = c.version;
    let limit = if qos == QoS::AtMostOnce {
        usize::MAX
    } else {
        inflight.min(usize::from(c.receive_max)).max(1)
    };
    let mut stats = PubStats {
        sent_total: 0,
        sent_window: 0,
        acked_window: 0,
        unacked: 0,
        ack_latency: Hist::default(),
        errors: Errors::default(),
        inflight_limit: if qos == QoS::AtMostOnce { 0 } else { limit },
    };
    let (win_start, win_end) = t.window_ns();
    let mut template = Packet::Publish(Publish::new(topic, vec![0u8; payload_len], qos, 1));
    // Send time + 1 of the publish holding each packet identifier; 0 = free.
    let mut slots: Vec<u64> = if qos == QoS::AtMostOnce {
        Vec::new()
    } else {
        vec![0; 65536]
    };
    let mut released: Vec<bool> = if qos == QoS::ExactlyOnce {
        vec![false; 65536]
    } else {
        Vec::new()
    };
    let mut in_flight = 0usize;
    let mut next_pkid: u16 = 1;
    let mut seq: u32 = 0;
    let mut next_due = interval.map(|iv| t.start + iv.mul_f64(index as f64 / t.publishers.max(1) as f64));
    let drain_deadline = t.end + t.drain;
    let ping_every = Duration::from_secs(u64::from(KEEP_ALIVE_SECS) / 2);
    let mut ping = interval_at((t.start + ping_every).into(), ping_every);
    ping.set_missed_tick_behavior(MissedTickBehavior::Delay);

    sleep_until(t.start.into()).await;
    let mut stopped = false;
    'run: loop {
        let now = Instant::now();
        if !stopped && now >= t.end {
            stopped = true;
        }
        if stopped && (in_flight == 0 || now >= drain_deadline) {
            break;
        }
        // Produce what is due and allowed into the write buffer.
        let mut throttled = false;
        while !stopped && in_flight < limit && c.wbuf.len() < HIGH_WATER {
            let now = Instant::now();
            if now >= t.end {
                stopped = true;
                break;
            }
            if let (Some(due), Some(iv)) = (next_due.as_mut(), interval) {
                if now < *due {
                    throttled = true;
                    break;
                }
                *due += iv;
            }
            let ts = t.ns(now);
            let Packet::Publish(p) = &mut template else {
                unreachable!()
            };
            if qos != QoS::AtMostOnce {
                while slots[usize::from(next_pkid)] != 0 {
                    next_pkid = next_pkid.checked_add(1).unwrap_or(1);
                }
                p.pkid = next_pkid;
                slots[usize::from(next_pkid)] = ts + 1;
                if qos == QoS::ExactlyOnce {
                    released[usize::from(next_pkid)] = false;
                }
                next_pkid = next_pkid.checked_add(1).unwrap_or(1);
                in_flight += 1;
            }
            c.send(&template);
            let end = c.wbuf.len();
            let body = &mut c.wbuf[end - payload_len..end];
            body[0..8].copy_from_slice(&ts.to_be_bytes());
            body[8..10].copy_from_slice(&t.tag.to_be_bytes());
            body[10..12].copy_from_slice(&(index as u16).to_be_bytes());
            body[12..16].copy_from_slice(&seq.to_be_bytes());
            seq = seq.wrapping_add(1);
            stats.sent_total += 1;
            if ts >= win_start && ts < win_end {
                stats.sent_window += 1;
            }
        }
        if stopped && in_flight == 0 && c.wbuf.is_empty() {
            break;
        }
        let wake = if stopped {
            Some(drain_deadline)
        } else if throttled {
            next_due.map(|d| d.min(t.end))
        } else {
            Some(t.end)
        };
        let interest = if c.wbuf.is_empty() {
            Interest::READABLE
        } else {
            Interest::READABLE | Interest::WRITABLE
        };
        tokio::select! {
            ready = c.stream.ready(interest) => {
                let Some(read) = service(&mut c, ready, &mut stats.errors) else { break 'run };
                if read {
                    let now = t.ns(Instant::now());
                    loop {
                        let packet = match c.next_packet() {
                            Ok(Some(p)) => p,
                            Ok(None) => break,
                            Err(_) => { stats.errors.protocol += 1; break 'run; }
                        };
                        match packet {
                            Packet::PubAck(a) if qos == QoS::AtLeastOnce => {
                                complete(&mut slots, &mut in_flight, &a, now, (win_start, win_end), version.is_v5(), &mut stats);
                            }
                            Packet::PubRec(a) if qos == QoS::ExactlyOnce => {
                                let i = usize::from(a.pkid);
                                if slots[i] == 0 {
                                    // Not ours (any more): answer so the broker can forget it.
                                    c.send(&Packet::PubRel(Ack::new(a.pkid)));
                                    stats.errors.protocol += 1;
                                } else if version.is_v5() && a.code >= 0x80 {
                                    slots[i] = 0;
                                    in_flight -= 1;
                                    stats.errors.rejected += 1;
                                    note_rejection("PUBREC", a.code);
                                } else if !released[i] {
                                    released[i] = true;
                                    c.send(&Packet::PubRel(Ack::new(a.pkid)));
                                }
                            }
                            Packet::PubComp(a) if qos == QoS::ExactlyOnce => {
                                complete(&mut slots, &mut in_flight, &a, now, (win_start, win_end), version.is_v5(), &mut stats);
                            }
                            Packet::PingResp => {}
                            Packet::Disconnect(d) => {
                                note_disconnect(&d);
                                stats.errors.disconnects += 1;
                                break 'run;
                            }
                            _ => stats.errors.protocol += 1,
                        }
                    }
                    if !c.wbuf.is_empty() && c.try_flush().is_err() {
                        stats.errors.io += 1;
                        break 'run;
                    }
                }
            }
            _ = sleep_until(wake.unwrap_or(t.end).into()), if wake.is_some() => {}
            _ = ping.tick() => c.send(&Packet::PingReq),
        }
    }
    stats.unacked = in_flight as u64;
    // QoS 0 publishes may still be buffered: give them the rest of the drain.
    let left = drain_deadline.saturating_duration_since(Instant::now());
    goodbye(&mut c, left.max(Duration::from_secs(1))).await;
    stats
}

fn complete(
    slots: &mut [u64],
    in_flight: &mut usize,
    a: &Ack,
    now: u64,
    (win_start, win_end): (u64, u64),
    v5: bool,
    stats: &mut PubStats,
) {
    let slot = &mut slots[usize::from(a.pkid)];
    if *slot == 0 {
        stats.errors.protocol += 1;
        return;
    }
    let sent = *slot - 1;
    *slot = 0;
    *in_flight -= 1;
    if v5 && a.code >= 0x80 {
        stats.errors.rejected += 1;
        note_rejection("acknowledgement", a.code);
        return;
    }
    if sent >= win_start && sent < win_end {
        stats.ack_latency.record(now.saturating_sub(sent));
    }
    if now >= win_start && now < win_end {
        stats.acked_window += 1;
    }
}

/// Per (subscriber, publisher) delivery bookkeeping: which sequence numbers
/// arrived (one bit each).
#[derive(Default)]
pub struct Track {
    bits: Vec<u64>,
    pub distinct: u64,
    pub duplicates: u64,
    pub out_of_order: u64,
    max_seen: Option<u32>,
}

impl Track {
    fn see(&mut self, seq: u32) {
        let word = (seq / 64) as usize;
        if word >= self.bits.len() {
            self.bits.resize((word + 1).next_power_of_two(), 0);
        }
        let bit = 1u64 << (seq % 64);
        if self.bits[word] & bit != 0 {
            self.duplicates += 1;
            return;
        }
        self.bits[word] |= bit;
        self.distinct += 1;
        match self.max_seen {
            Some(m) if seq < m => self.out_of_order += 1,
            _ => self.max_seen = Some(seq),
        }
    }
}

pub struct SubStats {
    /// Messages of this run received inside the measurement window.
    pub delivered_window: u64,
    /// Publish (send) → receipt here, for messages sent in the window.
    pub latency: Hist,
    /// One per publisher.
    pub tracks: Vec<Track>,
    /// Messages that are not this run's (other traffic on the topics).
    pub foreign: u64,
    pub errors: Errors,
}

/// Receives until `stop`, acknowledging QoS 1 and 2 deliveries.
/// `progress` is the number of distinct messages of this run received.
pub async fn subscriber(
    mut c: Conn,
    t: Arc<Timeline>,
    mut stop: watch::Receiver<bool>,
    progress: Arc<AtomicU64>,
) -> SubStats {
    let mut stats = SubStats {
        delivered_window: 0,
        latency: Hist::default(),
        tracks: (0..t.publishers).map(|_| Track::default()).collect(),
        foreign: 0,
        errors: Errors::default(),
    };
    let (win_start, win_end) = t.window_ns();
    let ping_every = Duration::from_secs(u64::from(KEEP_ALIVE_SECS) / 2);
    let mut ping = interval_at(tokio::time::Instant::now() + ping_every, ping_every);
    ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut distinct = 0u64;
    // Packets buffered during SUBSCRIBE come first.
    let mut pending = !c.rbuf.is_empty();
    'run: loop {
        let interest = if c.wbuf.is_empty() {
            Interest::READABLE
        } else {
            Interest::READABLE | Interest::WRITABLE
        };
        let mut readable = std::mem::take(&mut pending);
        if !readable {
            tokio::select! {
                ready = c.stream.ready(interest) => {
                    let Some(read) = service(&mut c, ready, &mut stats.errors) else { break 'run };
                    readable = read;
                }
                _ = ping.tick() => c.send(&Packet::PingReq),
                _ = stop.changed() => break 'run,
            }
        }
        if !readable {
            continue;
        }
        let now = t.ns(Instant::now());
        loop {
            let packet = match c.next_packet() {
                Ok(Some(p)) => p,
                Ok(None) => break,
                Err(_) => {
                    stats.errors.protocol += 1;
                    break 'run;
                }
            };
            match packet {
                Packet::Publish(p) => {
                    match p.qos {
                        QoS::AtMostOnce => {}
                        QoS::AtLeastOnce => c.send(&Packet::PubAck(Ack::new(p.pkid))),
                        QoS::ExactlyOnce => c.send(&Packet::PubRec(Ack::new(p.pkid))),
                    }
                    let b = &p.payload;
                    if b.len() < HEADER_LEN {
                        stats.foreign += 1;
                        continue;
                    }
                    let ts = u64::from_be_bytes(b[0..8].try_into().unwrap_or_default());
                    let tag = u16::from_be_bytes([b[8], b[9]]);
                    let publisher = usize::from(u16::from_be_bytes([b[10], b[11]]));
                    let seq = u32::from_be_bytes([b[12], b[13], b[14], b[15]]);
                    if tag != t.tag || publisher >= stats.tracks.len() {
                        stats.foreign += 1;
                        continue;
                    }
                    if ts >= win_start && ts < win_end {
                        stats.latency.record(now.saturating_sub(ts));
                    }
                    if now >= win_start && now < win_end {
                        stats.delivered_window += 1;
                    }
                    let track = &mut stats.tracks[publisher];
                    let before = track.distinct;
                    track.see(seq);
                    distinct += track.distinct - before;
                }
                Packet::PubRel(a) => c.send(&Packet::PubComp(Ack::new(a.pkid))),
                Packet::PingResp | Packet::SubAck(_) => {}
                Packet::Disconnect(d) => {
                    note_disconnect(&d);
                    stats.errors.disconnects += 1;
                    break 'run;
                }
                _ => stats.errors.protocol += 1,
            }
        }
        progress.store(distinct, Ordering::Relaxed);
        if !c.wbuf.is_empty() && c.try_flush().is_err() {
            stats.errors.io += 1;
            break 'run;
        }
    }
    progress.store(distinct, Ordering::Relaxed);
    goodbye(&mut c, Duration::from_secs(1)).await;
    stats
}

/// DISCONNECT (normal) and close, waiting at most `wait` for the socket.
/// Services a ready socket: flushes it when writable, reads it when
/// readable. `Some(true)` when it was read; `None`, counted in `errors`, when
/// the connection failed or ended.
fn service(c: &mut Conn, ready: std::io::Result<tokio::io::Ready>, errors: &mut Errors) -> Option<bool> {
    let Ok(ready) = ready else {
        errors.io += 1;
        return None;
    };
    if ready.is_writable() && c.try_flush().is_err() {
        errors.io += 1;
        return None;
    }
    if !ready.is_readable() {
        return Some(false);
    }
    match c.try_fill() {
        Ok(true) => Some(true),
        Ok(false) => {
            errors.disconnects += 1;
            None
        }
        Err(_) => {
            errors.io += 1;
            None
        }
    }
}

pub async fn goodbye(c: &mut Conn, wait: Duration) {
    c.send(&Packet::Disconnect(Disconnect::default()));
    let _ = tokio::time::timeout(wait, c.flush_all()).await;
}

fn note_disconnect(d: &Disconnect) {
    eprintln!(
        "warning: the broker sent DISCONNECT, reason 0x{:02X} ({})",
        d.code,
        reason_name(d.code)
    );
}

fn note_rejection(what: &str, code: u8) {
    use std::sync::atomic::AtomicBool;
    static ONCE: AtomicBool = AtomicBool::new(false);
    if !ONCE.swap(true, Ordering::Relaxed) {
        eprintln!(
            "warning: the broker rejected a publish ({what} reason 0x{code:02X}, {}); further rejections are only counted",
            reason_name(code)
        );
    }
}
