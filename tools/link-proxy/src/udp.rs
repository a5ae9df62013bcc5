//! UDP forwarding: one upstream socket (and one task) per client source address.

use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;

use crate::link::{LINK_CUT, Link, lock};

/// A mapping with no datagram in either direction for this long is forgotten.
const IDLE: Duration = Duration::from_secs(60);
/// Largest UDP payload.
const BUF: usize = 65_535;
/// At most this many bytes wait in one direction of one flow's delay queue; more are dropped.
const MAX_QUEUED: usize = 16 << 20;
/// Accounting overhead per queued datagram, so that empty datagrams count too.
const ITEM_COST: usize = 64;

/// The mappings of one `--udp` listener, keyed by client source address.
pub struct FlowTable {
    flows: Mutex<HashMap<SocketAddr, Arc<Flow>>>,
    listen: Arc<UdpSocket>,
    target: SocketAddr,
}

struct Flow {
    client: SocketAddr,
    upstream: Arc<UdpSocket>,
    /// Milliseconds since the proxy started at the last datagram in either direction.
    last_seen: AtomicU64,
    /// Set when the mapping is forgotten; queued datagrams are then discarded.
    dead: Arc<AtomicBool>,
    kill: Notify,
    to_target: Lane,
    to_client: Lane,
}

/// One direction of a flow: the queue to its delay writer.
struct Lane {
    tx: mpsc::UnboundedSender<Delayed>,
    /// Datagrams go toward the target (else toward the client).
    toward_target: bool,
    /// Bytes (plus `ITEM_COST` each) queued and not yet written; zero means the reader may
    /// send directly without overtaking anything.
    queued: Arc<AtomicUsize>,
}

struct Delayed {
    due: Instant,
    data: Vec<u8>,
}

enum Dest {
    Target(Arc<UdpSocket>),
    Client(Arc<UdpSocket>, SocketAddr),
}

impl Dest {
    async fn send(&self, data: &[u8]) -> io::Result<usize> {
        match self {
            Dest::Target(sock) => sock.send(data).await,
            Dest::Client(sock, addr) => sock.send_to(data, *addr).await,
        }
    }
}

/// What the caller does with a datagram it just received.
enum Route {
    /// Send it now (no delay and nothing queued ahead of it).
    Direct,
    /// Queued for the delay writer, or dropped (and counted).
    Handled,
}

impl Lane {
    fn new(dest: Dest, dead: Arc<AtomicBool>, link: &Arc<Link>) -> Lane {
        let toward_target = matches!(dest, Dest::Target(_));
        let (tx, rx) = mpsc::unbounded_channel();
        let queued = Arc::new(AtomicUsize::new(0));
        tokio::spawn(delay_writer(rx, dest, Arc::clone(&queued), dead, Arc::clone(link)));
        Lane {
            tx,
            queued,
            toward_target,
        }
    }

    fn route(&self, link: &Link, data: &[u8]) -> Route {
        if !link.forwarding_toward(self.toward_target) {
            link.stats.dropped(true, data.len());
            return Route::Handled;
        }
        let delay = link.delay();
        if delay.is_zero() && self.queued.load(Ordering::SeqCst) == 0 {
            return Route::Direct;
        }
        let cost = data.len() + ITEM_COST;
        if self.queued.fetch_add(cost, Ordering::SeqCst) + cost > MAX_QUEUED {
            self.queued.fetch_sub(cost, Ordering::SeqCst);
            link.stats.dropped(true, data.len());
            return Route::Handled;
        }
        let item = Delayed {
            due: Instant::now() + delay,
            data: data.to_vec(),
        };
        if self.tx.send(item).is_err() {
            self.queued.fetch_sub(cost, Ordering::SeqCst);
            link.stats.dropped(true, data.len());
        }
        Route::Handled
    }
}

/// Writes one direction's delayed datagrams when they are due, in order. The queue count
/// drops only after the write, so a direct send by the reader never overtakes one.
async fn delay_writer(
    mut rx: mpsc::UnboundedReceiver<Delayed>,
    dest: Dest,
    queued: Arc<AtomicUsize>,
    dead: Arc<AtomicBool>,
    link: Arc<Link>,
) {
    while let Some(item) = rx.recv().await {
        tokio::time::sleep_until(item.due).await;
        let n = item.data.len();
        if dead.load(Ordering::SeqCst) || !link.forwarding_toward(matches!(dest, Dest::Target(_))) {
            link.stats.dropped(true, n);
        } else {
            match dest.send(&item.data).await {
                Ok(_) => link.stats.forwarded(true, n),
                Err(_) => link.stats.dropped(true, n),
            }
        }
        queued.fetch_sub(n + ITEM_COST, Ordering::SeqCst);
    }
}

impl FlowTable {
    pub fn new(listen: UdpSocket, target: SocketAddr) -> Arc<FlowTable> {
        Arc::new(FlowTable {
            flows: Mutex::new(HashMap::new()),
            listen: Arc::new(listen),
            target,
        })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listen.local_addr()
    }

    pub fn len(&self) -> usize {
        lock(&self.flows).len()
    }

    /// Forgets every mapping (`cut`): their tasks stop, their upstream sockets close and
    /// their queued datagrams are discarded.
    pub fn clear(&self) {
        let flows: Vec<Arc<Flow>> = lock(&self.flows).drain().map(|(_, f)| f).collect();
        for flow in flows {
            flow.dead.store(true, Ordering::SeqCst);
            flow.kill.notify_one();
        }
    }

    /// The mapping for `src`, made if needed; `None` while the link is cut.
    fn flow_for(self: &Arc<Self>, src: SocketAddr, link: &Arc<Link>) -> io::Result<Option<Arc<Flow>>> {
        let mut flows = lock(&self.flows);
        // Checked under the lock: `Link::set_mode` stores the cut state before it clears
        // the table, so no mapping made here survives a cut.
        if link.state() == LINK_CUT {
            return Ok(None);
        }
        let now = link.now_ms();
        if let Some(flow) = flows.get(&src) {
            flow.last_seen.store(now, Ordering::Relaxed);
            return Ok(Some(Arc::clone(flow)));
        }
        let bind: SocketAddr = if self.target.is_ipv4() {
            (Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let sock = std::net::UdpSocket::bind(bind)?;
        sock.connect(self.target)?;
        sock.set_nonblocking(true)?;
        let upstream = Arc::new(UdpSocket::from_std(sock)?);
        let dead = Arc::new(AtomicBool::new(false));
        let flow = Arc::new(Flow {
            client: src,
            to_target: Lane::new(Dest::Target(Arc::clone(&upstream)), Arc::clone(&dead), link),
            to_client: Lane::new(Dest::Client(Arc::clone(&self.listen), src), Arc::clone(&dead), link),
            upstream,
            last_seen: AtomicU64::new(now),
            dead,
            kill: Notify::new(),
        });
        flows.insert(src, Arc::clone(&flow));
        tokio::spawn(flow_task(Arc::clone(&flow), Arc::clone(self), Arc::clone(link)));
        Ok(Some(flow))
    }

    /// Forgets `flow` if it has been idle for `IDLE`; returns whether it did.
    fn expire(&self, flow: &Arc<Flow>, link: &Link) -> bool {
        let mut flows = lock(&self.flows);
        let idle_ms = link.now_ms().saturating_sub(flow.last_seen.load(Ordering::Relaxed));
        if Duration::from_millis(idle_ms) < IDLE {
            return false;
        }
        if flows.get(&flow.client).is_some_and(|f| Arc::ptr_eq(f, flow)) {
            flows.remove(&flow.client);
        }
        true
    }
}

/// Receives client datagrams on the listening socket and passes them to their mapping.
pub async fn run(table: Arc<FlowTable>, link: Arc<Link>) {
    let mut buf = vec![0u8; BUF];
    loop {
        let (n, src) = match table.listen.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(e) => {
                eprintln!("holdfast-link-proxy: udp receive: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let data = &buf[..n];
        let flow = match table.flow_for(src, &link) {
            Ok(Some(flow)) => flow,
            Ok(None) => {
                link.stats.dropped(true, n);
                continue;
            }
            Err(e) => {
                eprintln!("holdfast-link-proxy: udp upstream socket for {src}: {e}");
                link.stats.dropped(true, n);
                continue;
            }
        };
        if let Route::Direct = flow.to_target.route(&link, data) {
            match flow.upstream.send(data).await {
                Ok(_) => link.stats.forwarded(true, n),
                Err(_) => link.stats.dropped(true, n),
            }
        }
    }
}

/// Receives the target's datagrams for one mapping and sends them to the client, until
/// the mapping is idle for `IDLE` or forgotten by a cut.
async fn flow_task(flow: Arc<Flow>, table: Arc<FlowTable>, link: Arc<Link>) {
    let mut buf = vec![0u8; BUF];
    let idle = tokio::time::sleep(IDLE);
    tokio::pin!(idle);
    loop {
        tokio::select! {
            biased;
            () = flow.kill.notified() => break,
            r = flow.upstream.recv(&mut buf) => {
                // Errors here are ICMP reports (target port unreachable and the like).
                let Ok(n) = r else { continue };
                flow.last_seen.store(link.now_ms(), Ordering::Relaxed);
                let data = &buf[..n];
                if let Route::Direct = flow.to_client.route(&link, data) {
                    match table.listen.send_to(data, flow.client).await {
                        Ok(_) => link.stats.forwarded(true, n),
                        Err(_) => link.stats.dropped(true, n),
                    }
                }
            }
            () = &mut idle => {
                if table.expire(&flow, &link) {
                    break;
                }
                let last = flow.last_seen.load(Ordering::Relaxed);
                idle.as_mut().reset(link.instant_at(last) + IDLE);
            }
        }
    }
    flow.dead.store(true, Ordering::SeqCst);
}
