//! The state of the emulated link shared by every flow: the current mode, the added delay,
//! the counters, and the commands of the control protocol that change them.

use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::AbortHandle;
use tokio::time::Instant;

use crate::udp::FlowTable;

/// Data is forwarded.
pub const LINK_UP: u8 = 0;
/// Data is read and discarded; flows are kept.
pub const LINK_BLACKHOLE: u8 = 1;
/// Data is discarded, flows are torn down and no new ones are made.
pub const LINK_CUT: u8 = 2;
/// UDP datagrams from the client toward the target are read and discarded;
/// the target's still reach the client (a child's acknowledgements are lost,
/// its parent's messages arrive). TCP data is discarded both ways.
pub const LINK_BLACKHOLE_UP: u8 = 3;
/// UDP datagrams from the target toward the client are read and discarded;
/// the client's still reach the target (a child's batches arrive and are
/// stored, its parent's acknowledgements are lost). TCP data is discarded
/// both ways.
pub const LINK_BLACKHOLE_DOWN: u8 = 4;

/// Longest delay or flap phase accepted, in milliseconds (one hour).
const MAX_MS: u64 = 3_600_000;

/// The mode chosen by the last mode command (`up`, `cut`, `blackhole`, `flap`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Up,
    Cut,
    Blackhole,
    BlackholeUp,
    BlackholeDown,
    Flap { up_ms: u64, down_ms: u64 },
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Up => "up",
            Mode::Cut => "cut",
            Mode::Blackhole => "blackhole",
            Mode::BlackholeUp => "blackhole-up",
            Mode::BlackholeDown => "blackhole-down",
            Mode::Flap { .. } => "flap",
        }
    }
}

/// Counters reported by `stats`.
#[derive(Default)]
pub struct Stats {
    forwarded_datagrams: AtomicU64,
    dropped_datagrams: AtomicU64,
    forwarded_bytes: AtomicU64,
    dropped_bytes: AtomicU64,
}

impl Stats {
    /// Counts `bytes` delivered to the far side; `datagram` for a UDP datagram, not for a TCP chunk.
    pub fn forwarded(&self, datagram: bool, bytes: usize) {
        if datagram {
            self.forwarded_datagrams.fetch_add(1, Ordering::Relaxed);
        }
        self.forwarded_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// Counts `bytes` discarded; `datagram` for a UDP datagram, not for a TCP chunk.
    pub fn dropped(&self, datagram: bool, bytes: usize) {
        if datagram {
            self.dropped_datagrams.fetch_add(1, Ordering::Relaxed);
        }
        self.dropped_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }
}

struct Ctl {
    mode: Mode,
    /// Bumped by every mode command; a flap task stops when it no longer matches.
    generation: u64,
    flap: Option<AbortHandle>,
}

pub struct Link {
    /// `LINK_UP`, `LINK_BLACKHOLE` or `LINK_CUT`: what the data path does right now.
    state: AtomicU8,
    delay_ms: AtomicU64,
    /// Bumped on every `cut`; TCP connections watch it and close.
    cut_generation: watch::Sender<u64>,
    pub stats: Stats,
    pub tcp_flows: AtomicUsize,
    udp_tables: Vec<Arc<FlowTable>>,
    /// Origin of the millisecond timestamps kept by UDP flows.
    start: Instant,
    ctl: Mutex<Ctl>,
}

pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Link {
    pub fn new(udp_tables: Vec<Arc<FlowTable>>) -> Arc<Link> {
        Arc::new(Link {
            state: AtomicU8::new(LINK_UP),
            delay_ms: AtomicU64::new(0),
            cut_generation: watch::Sender::new(0),
            stats: Stats::default(),
            tcp_flows: AtomicUsize::new(0),
            udp_tables,
            start: Instant::now(),
            ctl: Mutex::new(Ctl {
                mode: Mode::Up,
                generation: 0,
                flap: None,
            }),
        })
    }

    pub fn state(&self) -> u8 {
        self.state.load(Ordering::SeqCst)
    }

    /// Whether data is to be delivered right now.
    pub fn forwarding(&self) -> bool {
        self.state() == LINK_UP
    }

    /// Whether a UDP datagram toward the target (`toward_target`) or
    /// toward the client is to be delivered right now.
    pub fn forwarding_toward(&self, toward_target: bool) -> bool {
        match self.state() {
            LINK_UP => true,
            LINK_BLACKHOLE_UP => !toward_target,
            LINK_BLACKHOLE_DOWN => toward_target,
            _ => false,
        }
    }

    pub fn delay(&self) -> Duration {
        Duration::from_millis(self.delay_ms.load(Ordering::Relaxed))
    }

    /// A receiver that sees a change at the next `cut`. Subscribe before checking `state()`.
    pub fn subscribe_cut(&self) -> watch::Receiver<u64> {
        self.cut_generation.subscribe()
    }

    /// Milliseconds since the proxy started.
    pub fn now_ms(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// The instant `ms` milliseconds after the proxy started.
    pub fn instant_at(&self, ms: u64) -> Instant {
        self.start + Duration::from_millis(ms)
    }

    /// Runs one line of the control protocol and returns the reply line (without newline).
    pub fn command(self: &Arc<Self>, line: &str) -> String {
        let mut words = line.split_ascii_whitespace();
        let Some(cmd) = words.next() else {
            return "error empty command".to_owned();
        };
        let cmd = cmd.to_ascii_lowercase();
        let args: Vec<&str> = words.collect();
        match (cmd.as_str(), args.as_slice()) {
            ("up", []) => self.set_mode(Mode::Up),
            ("cut", []) => self.set_mode(Mode::Cut),
            ("blackhole", []) => self.set_mode(Mode::Blackhole),
            ("blackhole-up", []) => self.set_mode(Mode::BlackholeUp),
            ("blackhole-down", []) => self.set_mode(Mode::BlackholeDown),
            ("stats", []) => return self.stats_json(),
            ("delay", [ms]) => match parse_ms(ms, 0) {
                Ok(ms) => {
                    self.delay_ms.store(ms, Ordering::Relaxed);
                    eprintln!("holdfast-link-proxy: delay {ms} ms");
                }
                Err(e) => return e,
            },
            ("flap", [up, down]) => match (parse_ms(up, 1), parse_ms(down, 1)) {
                (Ok(up_ms), Ok(down_ms)) => self.set_mode(Mode::Flap { up_ms, down_ms }),
                (Err(e), _) | (_, Err(e)) => return e,
            },
            ("up" | "cut" | "blackhole" | "blackhole-up" | "blackhole-down" | "stats", _) => {
                return format!("error usage: {cmd}");
            }
            ("delay", _) => return "error usage: delay <ms>".to_owned(),
            ("flap", _) => return "error usage: flap <up_ms> <down_ms>".to_owned(),
            _ => return "error unknown command".to_owned(),
        }
        "ok".to_owned()
    }

    fn set_mode(self: &Arc<Self>, mode: Mode) {
        let mut ctl = lock(&self.ctl);
        ctl.generation += 1;
        if let Some(flap) = ctl.flap.take() {
            flap.abort();
        }
        ctl.mode = mode;
        match mode {
            Mode::Up => self.state.store(LINK_UP, Ordering::SeqCst),
            Mode::Blackhole => self.state.store(LINK_BLACKHOLE, Ordering::SeqCst),
            Mode::BlackholeUp => self.state.store(LINK_BLACKHOLE_UP, Ordering::SeqCst),
            Mode::BlackholeDown => self.state.store(LINK_BLACKHOLE_DOWN, Ordering::SeqCst),
            Mode::Cut => {
                // Order matters: the state first, so that a UDP listener that takes its table
                // lock after the table is cleared sees the cut and makes no new mapping, and a
                // TCP connection that subscribes after the bump sees the cut state.
                self.state.store(LINK_CUT, Ordering::SeqCst);
                self.cut_generation.send_modify(|g| *g += 1);
                for table in &self.udp_tables {
                    table.clear();
                }
            }
            Mode::Flap { up_ms, down_ms } => {
                self.state.store(LINK_UP, Ordering::SeqCst);
                let task = tokio::spawn(flap(
                    Arc::clone(self),
                    ctl.generation,
                    Duration::from_millis(up_ms),
                    Duration::from_millis(down_ms),
                ));
                ctl.flap = Some(task.abort_handle());
            }
        }
        match mode {
            Mode::Flap { up_ms, down_ms } => eprintln!("holdfast-link-proxy: mode flap {up_ms} {down_ms}"),
            _ => eprintln!("holdfast-link-proxy: mode {}", mode.name()),
        }
    }

    /// Sets the flap phase unless another mode command came since the flap began.
    fn flap_phase(&self, generation: u64, state: u8) -> bool {
        let ctl = lock(&self.ctl);
        if ctl.generation != generation {
            return false;
        }
        self.state.store(state, Ordering::SeqCst);
        true
    }

    fn stats_json(&self) -> String {
        let mode = lock(&self.ctl).mode;
        let udp_flows: usize = self.udp_tables.iter().map(|t| t.len()).sum();
        let s = &self.stats;
        format!(
            "{{\"mode\":\"{}\",\"udp_flows\":{},\"tcp_flows\":{},\"forwarded_datagrams\":{},\"dropped_datagrams\":{},\
             \"forwarded_bytes\":{},\"dropped_bytes\":{},\"delay_ms\":{}}}",
            mode.name(),
            udp_flows,
            self.tcp_flows.load(Ordering::Relaxed),
            s.forwarded_datagrams.load(Ordering::Relaxed),
            s.dropped_datagrams.load(Ordering::Relaxed),
            s.forwarded_bytes.load(Ordering::Relaxed),
            s.dropped_bytes.load(Ordering::Relaxed),
            self.delay_ms.load(Ordering::Relaxed),
        )
    }
}

fn parse_ms(s: &str, min: u64) -> Result<u64, String> {
    match s.parse::<u64>() {
        Ok(ms) if (min..=MAX_MS).contains(&ms) => Ok(ms),
        Ok(_) => Err(format!("error milliseconds out of range {min}..={MAX_MS}: {s}")),
        Err(_) => Err(format!("error invalid milliseconds: {s}")),
    }
}

/// Alternates the link between up and blackhole, starting with an up phase, until the
/// mode changes.
async fn flap(link: Arc<Link>, generation: u64, up: Duration, down: Duration) {
    let mut next = Instant::now();
    loop {
        next += up;
        tokio::time::sleep_until(next).await;
        if !link.flap_phase(generation, LINK_BLACKHOLE) {
            return;
        }
        next += down;
        tokio::time::sleep_until(next).await;
        if !link.flap_phase(generation, LINK_UP) {
            return;
        }
    }
}
