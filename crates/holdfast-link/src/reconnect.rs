//! When to try the upstream again.
//!
//! Failed attempts back off exponentially, capped, with full jitter (a
//! random delay between zero and the cap), so a fleet whose parent restarts
//! does not reconnect in lock step. Two signals cut the wait short:
//!
//! - **Probe**: while the parent is unreachable, a 1200-byte QUIC packet with
//!   a reserved version is sent to it every `upstream.probe_interval_ms`. A
//!   QUIC server answers that with a stateless Version Negotiation packet, so
//!   the first answer after a silence means the path is back; the link
//!   reconnects at once instead of at the next back-off tick. (An MQTT
//!   broker is probed with a TCP connect.)
//! - **Network change**: on Linux, a netlink socket reports address, route
//!   and link changes of the machine; any change starts an attempt at once.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, watch};

use super::{Ctx, LinkState};
use holdfast_metrics::{ReasonLabels, ResultLabels};

use crate::LinkMetrics;

/// How a connection attempt or an established link ended.
#[derive(Debug)]
pub(crate) enum Ended {
    /// The upstream could not be reached or went silent: probing helps.
    Unreachable(String),
    /// The upstream answered and refused, or failed: back off.
    Refused(String),
    /// The main server answers again: the session on another one ends.
    Failback,
    /// Shutting down.
    Stopped,
}

/// Runs one step of a connection attempt (connect, handshake, the answer to
/// HELLO or CONNECT) under the connect timeout. A step that does not finish
/// in time is counted as `timeout` and ends the attempt as unreachable, so
/// the parent or broker is probed and retried at once when it answers.
pub(crate) async fn within<F: std::future::Future>(
    timeout: std::time::Duration,
    result: &(dyn Fn(&'static str) + Sync),
    what: impl FnOnce() -> String,
    step: F,
) -> Result<F::Output, Ended> {
    tokio::time::timeout(timeout, step).await.map_err(|_| {
        result("timeout");
        Ended::Unreachable(what())
    })
}

/// How an upstream is probed while it does not answer.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Probe {
    /// QUIC Version Negotiation ([`probe_quic`]).
    Quic,
    /// TCP connect ([`probe_tcp`]).
    Tcp,
}

/// One kind of upstream, as [`drive`] runs it: the QUIC parent link, the
/// MQTT bridge or JetStream.
pub(crate) trait Upstream: Send + Sync {
    /// An established connection.
    type Session: Send;
    /// What every kind shares.
    fn ctx(&self) -> &Ctx;
    /// The servers, `host:port` each, resolved again before every attempt.
    fn targets(&self) -> Vec<String>;
    /// True when the first target is the main one: while connected to
    /// another, it is probed, and the link goes back to it when it answers.
    fn failback(&self) -> bool {
        false
    }
    /// How to probe it.
    fn probe(&self) -> Probe;
    /// One attempt: connect to `target` (one of [`Upstream::targets`]) at
    /// `addr`, and handshake.
    fn connect(&self, target: &str, addr: SocketAddr) -> impl Future<Output = Result<Self::Session, Ended>> + Send;
    /// Drains the outbox over `session` until it ends or `stop`.
    fn serve(&self, session: Self::Session, stop: &mut watch::Receiver<bool>) -> impl Future<Output = Ended> + Send;
}

/// Which server of the list the next attempt goes to.
#[derive(Debug)]
pub(crate) struct Servers {
    count: usize,
    next: usize,
    failed_in_turn: usize,
    failback: bool,
}

impl Servers {
    pub(crate) fn new(count: usize, failback: bool) -> Servers {
        Servers {
            count: count.max(1),
            next: 0,
            failed_in_turn: 0,
            failback,
        }
    }

    /// The server of the next attempt.
    pub(crate) fn current(&self) -> usize {
        self.next
    }

    /// The attempt at [`Servers::current`] failed, or its session ended:
    /// the next server is tried. True when every server failed in turn,
    /// so the link should back off before the next round.
    pub(crate) fn failed(&mut self) -> bool {
        self.next = (self.next + 1) % self.count;
        self.failed_in_turn += 1;
        if self.failed_in_turn >= self.count {
            self.failed_in_turn = 0;
            if self.failback {
                self.next = 0;
            }
            return true;
        }
        false
    }

    /// A session was established at [`Servers::current`].
    pub(crate) fn connected(&mut self) {
        self.failed_in_turn = 0;
    }

    /// Back to the main server (failback).
    pub(crate) fn back_to_main(&mut self) {
        self.next = 0;
        self.failed_in_turn = 0;
    }
}

/// Keeps `up` connected until `stop`: resolves, connects, serves, and after
/// a failure tries the next server; once every server failed in turn it
/// backs off, cut short by a probe answer (when the upstream was
/// unreachable) or a network change. Unacknowledged messages return to the
/// outbox whenever a link ends.
pub(crate) async fn drive<U: Upstream>(up: &U, stop: &mut watch::Receiver<bool>) {
    let ctx = up.ctx();
    let m = &ctx.metrics;
    let wake = Arc::new(Wakeups::default());
    if ctx.config.watch_network {
        watch_network(wake.clone());
    }
    let mut backoff = Backoff::new(
        Duration::from_millis(ctx.config.backoff_initial_ms),
        Duration::from_millis(ctx.config.backoff_max_ms),
    );
    let mut probe: Option<(SocketAddr, tokio::task::JoinHandle<()>)> = None;
    let targets = up.targets();
    let mut servers = Servers::new(targets.len(), up.failback() && targets.len() > 1);
    let woke = |reason| m.link_wakeups.get_or_create(&ReasonLabels { reason }).inc();
    let probe_interval = Duration::from_millis(ctx.config.probe_interval_ms);
    // Set by a failback; and how long the next session waits before probing
    // the main server again when going back to it failed.
    let mut failed_back = false;
    let mut failback_hold: Option<Duration> = None;
    loop {
        if *stop.borrow() {
            break;
        }
        let index = servers.current();
        let target = targets.get(index).cloned().unwrap_or_default();
        ctx.status.set_state(LinkState::Connecting, None);
        ctx.status.update(|s| s.target.clone_from(&target));
        let addr = match resolve(&target).await {
            Ok(a) => a,
            Err(e) => {
                m.link_connects.get_or_create(&ResultLabels { result: "resolve" }).inc();
                ctx.status.set_state(LinkState::Down, Some(e));
                if servers.failed() && wait(&mut backoff, &wake, stop, false, m).await {
                    break;
                }
                continue;
            }
        };
        // While the upstream is unreachable, probe it.
        if probe.as_ref().is_some_and(|(a, _)| *a != addr)
            && let Some((_, p)) = probe.take()
        {
            p.abort();
        }
        if probe.is_none() && ctx.config.probe_interval_ms > 0 {
            probe = Some((addr, spawn_probe(up.probe(), addr, probe_interval, wake.clone())));
        }
        let connected = tokio::select! {
            c = up.connect(&target, addr) => c,
            _ = wake.restored.notified() => {
                woke("probe");
                tracing::info!(%target, "link: the upstream answers again; reconnecting now");
                continue;
            }
            _ = wake.network.notified() => {
                woke("network");
                tracing::info!(%target, "link: the network changed; reconnecting now");
                continue;
            }
            _ = stop.wait_for(|s| *s) => break,
        };
        let ended = match connected {
            Err(e) => e,
            Ok(session) => {
                if let Some((_, p)) = probe.take() {
                    p.abort();
                }
                // Going back to the main server worked (if that is what this was).
                failed_back = false;
                ctx.status.set_state(LinkState::Up, None);
                m.link_up.set(1);
                ctx.outbox.mark_live();
                let began = tokio::time::Instant::now();
                // On a server other than the main one, with failback: go back
                // to the main one when it answers.
                let main = (servers.failback && index != 0)
                    .then(|| targets.first().cloned())
                    .flatten();
                let hold = failback_hold.take().unwrap_or_default();
                let ended = tokio::select! {
                    e = up.serve(session, stop) => e,
                    () = main_answers(main, up.probe(), probe_interval.max(Duration::from_millis(500)), hold) => {
                        Ended::Failback
                    }
                };
                // Only a session that lasted starts a new round of the list: one
                // refused at once (a full stream, a quota) counts as a failure of
                // its server, so a list of them still ends in a back-off.
                if began.elapsed() >= SETTLED_SESSION {
                    servers.connected();
                }
                let reason = match &ended {
                    Ended::Unreachable(_) => "lost",
                    Ended::Refused(_) => "closed",
                    Ended::Failback => "failback",
                    Ended::Stopped => "shutdown",
                };
                m.link_disconnects.get_or_create(&ReasonLabels { reason }).inc();
                if let Ended::Unreachable(e) | Ended::Refused(e) = &ended {
                    tracing::warn!(%target, error = %e, "link down");
                }
                // A session the parent closed soon after it began (its outbox is
                // full, or it does not take this child) keeps backing off:
                // reconnecting at once would only be refused again, as fast as
                // handshakes go. Any other end of a session, and the close of one
                // that had settled (a parent restarting), starts the back-off again.
                if !matches!(ended, Ended::Refused(_)) || began.elapsed() >= SETTLED_SESSION {
                    backoff.reset();
                }
                ended
            }
        };
        ctx.outbox.release_all();
        m.link_up.set(0);
        let probing = match ended {
            Ended::Stopped => break,
            Ended::Failback => {
                tracing::info!(main = ?targets.first(), "link: the main server answers again; going back to it");
                servers.back_to_main();
                failed_back = true;
                continue;
            }
            Ended::Unreachable(e) => {
                ctx.status.set_state(LinkState::Down, Some(e));
                true
            }
            Ended::Refused(e) => {
                ctx.status.set_state(LinkState::Down, Some(e));
                // It answers: probing would tell nothing new.
                if let Some((_, p)) = probe.take() {
                    p.abort();
                }
                false
            }
        };
        // The main server answered a probe but not the handshake: do not go
        // back to it again before a back-off ceiling has passed.
        if std::mem::take(&mut failed_back) && index == 0 {
            failback_hold = Some(Duration::from_millis(ctx.config.backoff_max_ms).max(Duration::from_secs(5)));
        }
        // Another server is tried at once; after a whole round, back off.
        if servers.failed() && wait(&mut backoff, &wake, stop, probing, m).await {
            break;
        }
    }
    if let Some((_, p)) = probe {
        p.abort();
    }
    m.link_up.set(0);
    ctx.outbox.release_all();
}

fn spawn_probe(kind: Probe, addr: SocketAddr, interval: Duration, wake: Arc<Wakeups>) -> tokio::task::JoinHandle<()> {
    match kind {
        Probe::Quic => tokio::spawn(probe_quic(addr, interval, wake)),
        Probe::Tcp => tokio::spawn(probe_tcp(addr, interval, wake)),
    }
}

/// Resolves when `main` (if any) answers a TCP connect; pending for ever
/// otherwise (failback is for TCP upstreams: a QUIC parent is one server).
async fn main_answers(main: Option<String>, kind: Probe, interval: Duration, hold: Duration) {
    let (Some(main), Probe::Tcp) = (main, kind) else {
        return std::future::pending().await;
    };
    tokio::time::sleep(hold).await;
    loop {
        tokio::time::sleep(interval).await;
        let Ok(addr) = resolve(&main).await else { continue };
        let answered = matches!(
            tokio::time::timeout(interval, tokio::net::TcpStream::connect(addr)).await,
            Ok(Ok(_))
        );
        if answered {
            return;
        }
    }
}

/// Waits out a back-off delay, or less if woken. True when stopping.
async fn wait(
    backoff: &mut Backoff,
    wake: &Wakeups,
    stop: &mut watch::Receiver<bool>,
    probing: bool,
    metrics: &LinkMetrics,
) -> bool {
    let delay = backoff.next_delay();
    tracing::debug!(
        delay_ms = delay.as_millis() as u64,
        "link: waiting before the next attempt"
    );
    let woke = |reason| metrics.link_wakeups.get_or_create(&ReasonLabels { reason }).inc();
    tokio::select! {
        _ = tokio::time::sleep(delay) => false,
        _ = wake.restored.notified(), if probing => {
            woke("probe");
            false
        }
        _ = wake.network.notified() => {
            woke("network");
            false
        }
        _ = stop.wait_for(|s| *s) => true,
    }
}

async fn resolve(target: &str) -> Result<SocketAddr, String> {
    let mut addrs = tokio::net::lookup_host(target)
        .await
        .map_err(|e| format!("cannot resolve {target}: {e}"))?;
    addrs.next().ok_or_else(|| format!("{target} resolves to no address"))
}

/// A session that lasted this long counts as a success for the back-off, even
/// when the parent closed it.
const SETTLED_SESSION: Duration = Duration::from_secs(10);

/// Capped exponential back-off with full jitter.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    /// Starts at `initial`, never above `max`.
    pub fn new(initial: Duration, max: Duration) -> Backoff {
        Backoff {
            initial,
            max,
            attempt: 0,
        }
    }

    /// The ceiling of the next delay, without jitter.
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(31)).unwrap_or(u32::MAX);
        self.initial.saturating_mul(factor).min(self.max)
    }

    /// The next delay: uniform in `[0, ceiling]`; the ceiling then doubles.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        let ms = ceiling.as_millis() as u64;
        Duration::from_millis(if ms == 0 {
            0
        } else {
            holdfast_model::random_u64() % (ms + 1)
        })
    }

    /// After a success: start from `initial` again.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// What wakes a waiting link early.
#[derive(Debug, Default)]
pub struct Wakeups {
    /// The parent answered a probe after a silence.
    pub restored: Notify,
    /// The machine's network configuration changed.
    pub network: Notify,
}

/// A QUIC packet with a reserved version (RFC 9000 §15: versions of the form
/// 0x?a?a?a?a are never used), padded to 1200 bytes. A QUIC server answers it
/// with Version Negotiation and keeps no state.
fn probe_packet() -> Vec<u8> {
    let mut p = Vec::with_capacity(1200);
    let r = holdfast_model::random_u64();
    p.push(0xc0 | (r as u8 & 0x3f));
    p.extend_from_slice(&0x1a2a_3a4a_u32.to_be_bytes());
    p.push(8);
    p.extend_from_slice(&holdfast_model::random_u64().to_be_bytes());
    p.push(8);
    p.extend_from_slice(&r.to_be_bytes());
    p.resize(1200, 0);
    p
}

/// True for a Version Negotiation packet (long header, version 0).
fn is_version_negotiation(b: &[u8]) -> bool {
    b.len() >= 7 && b[0] & 0x80 != 0 && b[1..5] == [0, 0, 0, 0]
}

/// Probes the parent at `addr` every `interval` until dropped. When an
/// answer arrives after at least one probe went unanswered, `restored` is
/// notified. Errors (no route, and the like) count as no answer.
pub async fn probe_quic(addr: SocketAddr, interval: Duration, wake: Arc<Wakeups>) {
    let bind: SocketAddr = if addr.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let Ok(socket) = tokio::net::UdpSocket::bind(bind).await else {
        return;
    };
    let packet = probe_packet();
    let mut buf = vec![0u8; 2048];
    let mut silent = false;
    loop {
        let _ = socket.send_to(&packet, addr).await;
        let answered = tokio::time::timeout(interval, async {
            loop {
                match socket.recv_from(&mut buf).await {
                    Ok((n, from)) if from == addr && is_version_negotiation(&buf[..n]) => return true,
                    Ok(_) => continue,
                    // ICMP unreachable surfaces here: no answer.
                    Err(_) => return false,
                }
            }
        })
        .await
        .unwrap_or(false);
        if answered {
            if silent {
                wake.restored.notify_one();
            }
            silent = false;
            // Answered at once: wait out the rest of the interval.
            tokio::time::sleep(interval / 2).await;
        } else {
            silent = true;
            // A failed send returns at once; do not spin.
            tokio::time::sleep(interval / 4).await;
        }
    }
}

/// Probes an MQTT broker at `addr` with TCP connects, as [`probe_quic`].
pub async fn probe_tcp(addr: SocketAddr, interval: Duration, wake: Arc<Wakeups>) {
    let mut silent = false;
    loop {
        let started = tokio::time::Instant::now();
        let answered = matches!(
            tokio::time::timeout(interval, tokio::net::TcpStream::connect(addr)).await,
            Ok(Ok(_))
        );
        if answered && silent {
            wake.restored.notify_one();
        }
        silent = !answered;
        tokio::time::sleep_until(started + interval).await;
    }
}

/// Watches the machine's addresses, routes and links (Linux netlink) and
/// notifies `network` on every change, from a thread of its own. Does
/// nothing where netlink is unavailable.
pub fn watch_network(wake: Arc<Wakeups>) {
    #[cfg(target_os = "linux")]
    {
        use rustix::net::netlink::SocketAddrNetlink;
        use rustix::net::{AddressFamily, SocketType};
        // RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_IFADDR | RTMGRP_IPV6_ROUTE
        const GROUPS: u32 = 0x1 | 0x10 | 0x40 | 0x100 | 0x400;
        // Protocol 0 is NETLINK_ROUTE.
        let socket = match rustix::net::socket(AddressFamily::NETLINK, SocketType::RAW, None) {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(error = %e, "netlink unavailable; network changes are not watched");
                return;
            }
        };
        if let Err(e) = rustix::net::bind(&socket, &SocketAddrNetlink::new(0, GROUPS)) {
            tracing::debug!(error = %e, "netlink bind failed; network changes are not watched");
            return;
        }
        let spawned = std::thread::Builder::new()
            .name("holdfast-netwatch".into())
            .spawn(move || {
                let mut buf = vec![0u8; 16 << 10];
                loop {
                    match rustix::io::read(&socket, &mut buf) {
                        Ok(0) => return,
                        Ok(_) => {
                            tracing::debug!("network configuration changed");
                            wake.network.notify_one();
                        }
                        Err(rustix::io::Errno::INTR) | Err(rustix::io::Errno::NOBUFS) => {}
                        Err(e) => {
                            tracing::debug!(error = %e, "netlink read failed; no longer watching the network");
                            return;
                        }
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start the network watcher");
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = wake;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_the_cap_with_jitter_below_it() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(1000));
        let ceilings: Vec<u64> = (0..6)
            .map(|_| {
                let c = b.ceiling();
                assert!(b.next_delay() <= c);
                c.as_millis() as u64
            })
            .collect();
        assert_eq!(ceilings, [100, 200, 400, 800, 1000, 1000]);
        b.reset();
        assert_eq!(b.ceiling(), Duration::from_millis(100));
        // Full jitter: the delays spread over the whole range.
        let mut b = Backoff::new(Duration::from_millis(1000), Duration::from_millis(1000));
        let delays: Vec<u64> = (0..200).map(|_| b.next_delay().as_millis() as u64).collect();
        assert!(delays.iter().any(|d| *d < 250) && delays.iter().any(|d| *d > 750));
        let mut huge = Backoff::new(Duration::from_millis(1), Duration::from_secs(60));
        for _ in 0..100 {
            assert!(huge.next_delay() <= Duration::from_secs(60));
        }
    }

    #[test]
    fn a_server_list_is_taken_in_turn_and_backs_off_after_a_round() {
        // One server (the QUIC parent): every failure backs off.
        let mut one = Servers::new(1, false);
        assert!(one.failed());
        assert!(one.failed());
        assert_eq!(one.current(), 0);
        // Three: the next one at once, back-off after the third.
        let mut three = Servers::new(3, false);
        assert!(!three.failed());
        assert_eq!(three.current(), 1);
        assert!(!three.failed());
        assert!(three.failed());
        assert_eq!(three.current(), 0);
        // A settled session starts a new round.
        assert!(!three.failed());
        three.connected();
        assert!(!three.failed());
        assert!(!three.failed());
        assert!(three.failed());
        // With failback, a round ends back at the main server.
        let mut main = Servers::new(2, true);
        assert!(!main.failed());
        assert_eq!(main.current(), 1);
        assert!(main.failed());
        assert_eq!(main.current(), 0);
        assert!(!main.failed());
        main.back_to_main();
        assert_eq!(main.current(), 0);
    }

    #[test]
    fn probe_packets_are_long_header_reserved_version_initial_sized() {
        let p = probe_packet();
        assert_eq!(p.len(), 1200);
        assert_eq!(p[0] & 0xc0, 0xc0);
        assert_eq!(&p[1..5], &[0x1a, 0x2a, 0x3a, 0x4a]);
        assert!(!is_version_negotiation(&p));
        assert!(is_version_negotiation(&[0x80, 0, 0, 0, 0, 0, 0]));
    }
}
