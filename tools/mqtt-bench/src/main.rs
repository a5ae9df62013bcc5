//! `holdfast-mqtt-bench`: an MQTT load generator built on the holdfast-mqtt
//! codec over raw tokio TCP. It measures any broker the same way: publish
//! throughput, delivery rate, end-to-end and acknowledgement latency, loss
//! and reordering, and (with `--idle-clients`) how many idle connections a
//! broker holds.

mod conn;
mod hist;
mod idle;
mod load;

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use clap::Parser;
use holdfast_mqtt::{QoS, Version};
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::conn::{Conn, Endpoint, version_name};
use crate::hist::Hist;
use crate::idle::IdleReport;
use crate::load::{Errors, PubPlan, PubStats, SubStats, Timeline};

/// MQTT load generator: publishers and subscribers over raw TCP, speaking
/// MQTT 3.1.1 or 5 through the holdfast-mqtt codec.
#[derive(Parser, Debug)]
#[command(name = "holdfast-mqtt-bench", version)]
struct Args {
    /// Broker host name or address.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Broker TCP port.
    #[arg(long, default_value_t = 1883)]
    port: u16,
    /// Publishing connections; publisher i publishes to {topic}/{i}.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..))]
    publishers: u16,
    /// Subscribing connections, each subscribed to {topic}/#.
    #[arg(long, default_value_t = 1)]
    subscribers: usize,
    /// QoS of the publishes and the subscriptions.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=2))]
    qos: u8,
    /// Payload size in bytes (at least 16: send timestamp, run tag, publisher and sequence number).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(16..=100_000_000))]
    payload: u32,
    /// Total target publish rate in messages per second over all publishers; 0 = as fast as possible.
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Measurement time in seconds (after the warm-up); with --idle-clients, how long to hold them.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Warm-up in seconds: traffic runs but is not measured.
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,
    /// Topic prefix.
    #[arg(long, default_value = "bench")]
    topic: String,
    /// MQTT protocol version: 3 (3.1.1) or 5.
    #[arg(long = "mqtt-version", default_value = "5", value_parser = parse_version)]
    mqtt_version: Version,
    /// Unacknowledged QoS 1/2 publishes per publisher at most (also capped by the broker's receive maximum).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..))]
    inflight: u16,
    /// User name for CONNECT.
    #[arg(long)]
    username: Option<String>,
    /// Password for CONNECT.
    #[arg(long)]
    password: Option<String>,
    /// Print one JSON summary line on stdout instead of the text report.
    #[arg(long)]
    json: bool,
    /// Instead of a load run, open this many idle clients (keep-alive 60 s), hold them for --duration and report
    /// how many connected.
    #[arg(long, default_value_t = 0)]
    idle_clients: usize,
    /// With --idle-clients: the broker's process id, to report its resident memory before and after.
    #[arg(long)]
    broker_pid: Option<u32>,
    /// Spread the connections over this many loopback source addresses (127.0.0.1, 127.0.0.2, ...): one
    /// address has only about 28,000 ephemeral ports, so 100,000 clients on loopback need four.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..))]
    source_ips: u8,
    /// Seconds to wait after the run for outstanding acknowledgements and deliveries.
    #[arg(long, default_value_t = 5.0)]
    drain: f64,
    /// Seconds to wait for TCP connect, CONNACK and SUBACK.
    #[arg(long, default_value_t = 10.0)]
    connect_timeout: f64,
}

fn parse_version(s: &str) -> Result<Version, String> {
    match s {
        "3" | "4" | "3.1.1" | "311" => Ok(Version::V311),
        "5" | "5.0" => Ok(Version::V5),
        _ => Err("expected 3 (MQTT 3.1.1) or 5".into()),
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Err(e) = check(&args) {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    let nofile = raise_nofile_limit();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        if args.idle_clients > 0 {
            run_idle(&args, nofile).await
        } else {
            run_load(&args).await
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn check(a: &Args) -> Result<()> {
    let secs = |name: &str, v: f64, min: f64| {
        if !v.is_finite() || v < min || v > 1e7 {
            bail!("--{name} must be a number of seconds ≥ {min}");
        }
        Ok(())
    };
    secs("duration", a.duration, 0.001)?;
    secs("warmup", a.warmup, 0.0)?;
    secs("drain", a.drain, 0.0)?;
    secs("connect-timeout", a.connect_timeout, 0.001)?;
    if a.topic.is_empty() || a.topic.contains(['+', '#', '\0']) {
        bail!("--topic must be a non-empty topic name without wildcards");
    }
    if a.password.is_some() && a.username.is_none() && !a.mqtt_version.is_v5() {
        bail!("MQTT 3.1.1 does not allow --password without --username");
    }
    Ok(())
}

/// Raises the soft open-files limit to the hard limit (idle mode needs one
/// descriptor per client). Returns the soft limit now in force.
fn raise_nofile_limit() -> Option<u64> {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let lim = getrlimit(Resource::Nofile);
    if lim.current != lim.maximum && lim.maximum.is_some() {
        let want = Rlimit {
            current: lim.maximum,
            maximum: lim.maximum,
        };
        if let Err(e) = setrlimit(Resource::Nofile, want) {
            eprintln!("warning: cannot raise the open-files limit to {:?}: {e}", lim.maximum);
        }
    }
    getrlimit(Resource::Nofile).current
}

fn endpoint(a: &Args) -> Arc<Endpoint> {
    Arc::new(Endpoint {
        host: a.host.clone(),
        port: a.port,
        version: a.mqtt_version,
        username: a.username.clone(),
        password: a.password.clone(),
        timeout: Duration::from_secs_f64(a.connect_timeout),
        source_ips: a.source_ips,
        next_source: Arc::new(AtomicU32::new(0)),
    })
}

/// A random-enough tag that tells this run's messages and client ids apart.
fn run_tag() -> u16 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    (nanos ^ (nanos >> 16) ^ std::process::id()) as u16
}

fn version_number(v: Version) -> u8 {
    if v.is_v5() { 5 } else { 3 }
}

async fn run_load(a: &Args) -> Result<ExitCode> {
    let ep = endpoint(a);
    let qos = QoS::from_u8(a.qos).unwrap_or_default();
    let tag = run_tag();
    let epoch = Instant::now();
    let publishers = usize::from(a.publishers);

    // Subscribers first, so that they see every message.
    let filter = format!("{}/#", a.topic);
    let mut pending = Vec::new();
    for j in 0..a.subscribers {
        let (ep, filter) = (ep.clone(), filter.clone());
        pending.push(tokio::spawn(async move {
            let mut c = Conn::connect(&ep, format!("hfbench-{tag:04x}-s{j}")).await?;
            let granted = c.subscribe(&filter, qos, ep.timeout).await?;
            Ok::<_, anyhow::Error>((c, granted))
        }));
    }
    let mut subs = Vec::new();
    for (j, h) in pending.into_iter().enumerate() {
        let (c, granted) = h.await?.with_context(|| format!("subscriber {j}"))?;
        if granted < a.qos {
            eprintln!("warning: subscriber {j} was granted QoS {granted}, not {}", a.qos);
        }
        subs.push(c);
    }
    let mut pending = Vec::new();
    for i in 0..publishers {
        let ep = ep.clone();
        pending.push(tokio::spawn(async move {
            Conn::connect(&ep, format!("hfbench-{tag:04x}-p{i}")).await
        }));
    }
    let mut pubs = Vec::new();
    for (i, h) in pending.into_iter().enumerate() {
        let c = h.await?.with_context(|| format!("publisher {i}"))?;
        if c.max_qos < a.qos {
            bail!(
                "the broker's maximum QoS is {}; cannot publish at QoS {}",
                c.max_qos,
                a.qos
            );
        }
        pubs.push(c);
    }
    if let Some(c) = pubs.first()
        && a.qos > 0
        && c.receive_max < a.inflight
    {
        eprintln!(
            "note: the broker's receive maximum {} caps --inflight {} to {}",
            c.receive_max, a.inflight, c.receive_max
        );
    }

    let start = Instant::now() + Duration::from_millis(100);
    let warm_end = start + Duration::from_secs_f64(a.warmup);
    let t = Arc::new(Timeline {
        epoch,
        start,
        warm_end,
        end: warm_end + Duration::from_secs_f64(a.duration),
        drain: Duration::from_secs_f64(a.drain),
        tag,
        publishers,
    });
    eprintln!(
        "{} at {}: {publishers} publisher(s) -> {} subscriber(s), QoS {}, {} B, rate {}; warm-up {} s, measuring {} s",
        version_name(a.mqtt_version),
        ep.addr(),
        a.subscribers,
        a.qos,
        a.payload,
        if a.rate == 0 {
            "max".to_string()
        } else {
            format!("{}/s", a.rate)
        },
        a.warmup,
        a.duration
    );

    let (stop_tx, stop_rx) = watch::channel(false);
    let progress: Vec<Arc<AtomicU64>> = (0..subs.len()).map(|_| Arc::new(AtomicU64::new(0))).collect();
    let sub_tasks: Vec<_> = subs
        .into_iter()
        .zip(&progress)
        .map(|(c, p)| tokio::spawn(load::subscriber(c, t.clone(), stop_rx.clone(), p.clone())))
        .collect();
    let interval = (a.rate > 0).then(|| Duration::from_secs_f64(publishers as f64 / a.rate as f64));
    let pub_tasks: Vec<_> = pubs
        .into_iter()
        .enumerate()
        .map(|(index, c)| {
            let plan = PubPlan {
                index,
                topic: format!("{}/{index}", a.topic),
                qos,
                payload_len: a.payload as usize,
                inflight: usize::from(a.inflight),
                interval,
            };
            tokio::spawn(load::publisher(c, plan, t.clone()))
        })
        .collect();

    let mut pub_stats = Vec::new();
    for h in pub_tasks {
        pub_stats.push(h.await?);
    }
    let sent_total: u64 = pub_stats.iter().map(|p| p.sent_total).sum();
    // Wait until every subscriber has every message, progress stalls for a
    // second, or the drain time is up.
    let deadline = Instant::now() + t.drain;
    let (mut last_sum, mut last_change) = (u64::MAX, Instant::now());
    while !progress.is_empty() {
        let counts: Vec<u64> = progress.iter().map(|p| p.load(Ordering::Relaxed)).collect();
        if counts.iter().all(|&c| c >= sent_total) || Instant::now() >= deadline {
            break;
        }
        let sum = counts.iter().sum();
        if sum != last_sum {
            (last_sum, last_change) = (sum, Instant::now());
        } else if last_change.elapsed() > Duration::from_secs(1) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let _ = stop_tx.send(true);
    let mut sub_stats = Vec::new();
    for h in sub_tasks {
        sub_stats.push(h.await?);
    }

    let report = load_report(a, &ep, &pub_stats, &sub_stats);
    if a.json {
        println!("{report}");
    } else {
        print_load(&report);
    }
    let broken: u64 = pub_stats.iter().map(|p| p.errors.broken()).sum::<u64>()
        + sub_stats.iter().map(|s| s.errors.broken()).sum::<u64>();
    if broken > 0 {
        eprintln!("error: {broken} connection(s) broke during the run; the figures are incomplete");
        return Ok(ExitCode::from(3));
    }
    Ok(ExitCode::SUCCESS)
}

fn us(ns: u64) -> f64 {
    (ns as f64 / 100.0).round() / 10.0
}

fn latency_json(h: &Hist) -> Value {
    json!({
        "samples": h.len(),
        "p50": us(h.quantile(0.50)),
        "p90": us(h.quantile(0.90)),
        "p99": us(h.quantile(0.99)),
        "max": us(h.max()),
        "mean": us(h.mean()),
    })
}

fn rate(count: u64, secs: f64) -> f64 {
    (count as f64 / secs).round()
}

fn load_report(a: &Args, ep: &Endpoint, pubs: &[PubStats], subs: &[SubStats]) -> Value {
    let secs = a.duration;
    let mut errors = Errors::default();
    let mut ack_latency = Hist::default();
    let mut latency = Hist::default();
    for p in pubs {
        errors.add(&p.errors);
        ack_latency.merge(&p.ack_latency);
    }
    for s in subs {
        errors.add(&s.errors);
        latency.merge(&s.latency);
    }
    let sent: u64 = pubs.iter().map(|p| p.sent_window).sum();
    let acked: u64 = pubs.iter().map(|p| p.acked_window).sum();
    let delivered: u64 = subs.iter().map(|s| s.delivered_window).sum();
    let per_publisher: Vec<Value> = pubs
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let lost: u64 = subs.iter().map(|s| p.sent_total.saturating_sub(s.tracks[i].distinct)).sum();
            let dups: u64 = subs.iter().map(|s| s.tracks[i].duplicates).sum();
            let ooo: u64 = subs.iter().map(|s| s.tracks[i].out_of_order).sum();
            json!({"publisher": i, "sent": p.sent_total, "unacked": p.unacked, "lost": lost, "duplicates": dups, "out_of_order": ooo})
        })
        .collect();
    let total = |k: &str| per_publisher.iter().map(|p| p[k].as_u64().unwrap_or(0)).sum::<u64>();
    let sent_total: u64 = pubs.iter().map(|p| p.sent_total).sum();
    json!({
        "mode": "load",
        "broker": ep.addr(),
        "mqtt_version": version_number(a.mqtt_version),
        "publishers": a.publishers,
        "subscribers": a.subscribers,
        "qos": a.qos,
        "payload_bytes": a.payload,
        "rate_target": a.rate,
        "inflight": pubs.iter().map(|p| p.inflight_limit).min().unwrap_or(0),
        "warmup_s": a.warmup,
        "duration_s": secs,
        "publish": {
            "sent": sent,
            "acked": acked,
            "sent_per_s": rate(sent, secs),
            "acked_per_s": rate(acked, secs),
            "throughput_per_s": rate(if a.qos == 0 { sent } else { acked }, secs),
        },
        "delivered": {
            "count": delivered,
            "per_s": rate(delivered, secs),
            "per_subscriber_per_s": rate(delivered, secs * a.subscribers.max(1) as f64),
        },
        "latency_us": latency_json(&latency),
        "ack_latency_us": if a.qos > 0 { latency_json(&ack_latency) } else { Value::Null },
        "errors": {"io": errors.io, "disconnects": errors.disconnects, "protocol": errors.protocol, "rejected": errors.rejected},
        "loss": {
            "sent_total": sent_total,
            "expected_deliveries": sent_total * subs.len() as u64,
            "lost": total("lost"),
            "duplicates": total("duplicates"),
            "out_of_order": total("out_of_order"),
            "unacked": total("unacked"),
            "foreign": subs.iter().map(|s| s.foreign).sum::<u64>(),
            "per_publisher": per_publisher,
        },
    })
}

fn print_load(r: &Value) {
    let f = |v: &Value| v.as_f64().unwrap_or(0.0);
    let n = |v: &Value| v.as_u64().unwrap_or(0);
    let p = &r["publish"];
    if n(&r["qos"]) == 0 {
        println!("publish:    {:>10.0} msg/s sent", f(&p["sent_per_s"]));
    } else {
        println!(
            "publish:    {:>10.0} msg/s acked ({:.0} msg/s sent, in-flight limit {})",
            f(&p["acked_per_s"]),
            f(&p["sent_per_s"]),
            n(&r["inflight"])
        );
    }
    let d = &r["delivered"];
    println!(
        "delivered:  {:>10.0} msg/s over {} subscriber(s) ({:.0} msg/s each)",
        f(&d["per_s"]),
        n(&r["subscribers"]),
        f(&d["per_subscriber_per_s"])
    );
    let lat = |name: &str, l: &Value| {
        println!(
            "{name:<11} p50 {:>9.1}  p90 {:>9.1}  p99 {:>9.1}  max {:>9.1}  µs  ({} samples)",
            f(&l["p50"]),
            f(&l["p90"]),
            f(&l["p99"]),
            f(&l["max"]),
            n(&l["samples"])
        );
    };
    lat("end-to-end:", &r["latency_us"]);
    if !r["ack_latency_us"].is_null() {
        let what = if n(&r["qos"]) == 1 { "PUBACK:" } else { "PUBCOMP:" };
        lat(what, &r["ack_latency_us"]);
    }
    let e = &r["errors"];
    println!(
        "errors:     {} i/o, {} disconnects, {} protocol, {} rejected publishes",
        n(&e["io"]),
        n(&e["disconnects"]),
        n(&e["protocol"]),
        n(&e["rejected"])
    );
    let l = &r["loss"];
    println!(
        "delivery:   {} sent, {} deliveries expected; {} lost, {} duplicates, {} out of order, {} unacked{}",
        n(&l["sent_total"]),
        n(&l["expected_deliveries"]),
        n(&l["lost"]),
        n(&l["duplicates"]),
        n(&l["out_of_order"]),
        n(&l["unacked"]),
        match n(&l["foreign"]) {
            0 => String::new(),
            x => format!(", {x} foreign messages ignored"),
        }
    );
    let per = l["per_publisher"].as_array().cloned().unwrap_or_default();
    let shown: Vec<&Value> = per
        .iter()
        .filter(|p| per.len() <= 8 || n(&p["lost"]) + n(&p["duplicates"]) + n(&p["out_of_order"]) > 0)
        .take(32)
        .collect();
    for p in shown {
        println!(
            "  publisher {:>3}: {} sent, {} lost, {} duplicates, {} out of order",
            n(&p["publisher"]),
            n(&p["sent"]),
            n(&p["lost"]),
            n(&p["duplicates"]),
            n(&p["out_of_order"])
        );
    }
}

async fn run_idle(a: &Args, nofile: Option<u64>) -> Result<ExitCode> {
    let n = a.idle_clients;
    if let Some(limit) = nofile
        && (n as u64).saturating_add(64) > limit
    {
        eprintln!("warning: the open-files limit is {limit}; {n} clients may not all get a socket");
    }
    let ep = endpoint(a);
    eprintln!(
        "{} at {}: opening {n} idle clients (keep-alive {} s)",
        version_name(a.mqtt_version),
        ep.addr(),
        conn::KEEP_ALIVE_SECS
    );
    let r = idle::run(
        ep.clone(),
        n,
        Duration::from_secs_f64(a.duration),
        run_tag(),
        a.broker_pid,
    )
    .await;
    let report = idle_report(a, &ep, &r);
    if a.json {
        println!("{report}");
    } else {
        print_idle(&r);
    }
    if r.connected == 0
        && let Some((e, _)) = r.failures.iter().next()
    {
        bail!("no client connected: {e}");
    }
    Ok(if r.connected == r.requested as u64 && r.held == r.connected {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(3)
    })
}

fn per_conn_kib(r: &IdleReport) -> Option<f64> {
    let (b, a) = (r.rss_before_kib?, r.rss_after_kib?);
    (r.connected > 0).then(|| (a as f64 - b as f64) / r.connected as f64)
}

fn idle_report(a: &Args, ep: &Endpoint, r: &IdleReport) -> Value {
    json!({
        "mode": "idle",
        "broker": ep.addr(),
        "mqtt_version": version_number(a.mqtt_version),
        "requested": r.requested,
        "connected": r.connected,
        "failed": r.failed,
        "failures": r.failures,
        "connect_s": (r.connect_secs * 1000.0).round() / 1000.0,
        "held": r.held,
        "held_s": r.held_secs,
        "broker_rss_before_kib": r.rss_before_kib,
        "broker_rss_after_kib": r.rss_after_kib,
        "broker_kib_per_connection": per_conn_kib(r).map(|k| (k * 100.0).round() / 100.0),
    })
}

fn print_idle(r: &IdleReport) {
    println!(
        "idle clients: {}/{} connected in {:.2} s ({:.0} connections/s), {} failed; {} still connected after {:.0} s",
        r.connected,
        r.requested,
        r.connect_secs,
        r.connected as f64 / r.connect_secs.max(1e-9),
        r.failed,
        r.held,
        r.held_secs
    );
    for (e, count) in r.failures.iter().take(5) {
        println!("  {count} x {e}");
    }
    if let (Some(b), Some(a)) = (r.rss_before_kib, r.rss_after_kib) {
        println!(
            "broker RSS:   {:.1} MiB before, {:.1} MiB with the clients: {:.2} KiB per connection",
            b as f64 / 1024.0,
            a as f64 / 1024.0,
            per_conn_kib(r).unwrap_or(0.0)
        );
    }
}
