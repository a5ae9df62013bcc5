//! `holdfast-link-proxy`: a fault-injection proxy for end-to-end tests. It sits on the
//! network path between a child gateway and its parent, forwards UDP (QUIC) and TCP
//! traffic, and on command breaks that path in controlled ways.
//!
//! Each `--udp LISTEN=TARGET` forwards datagrams arriving at LISTEN to TARGET, using one
//! upstream socket per client source address (forgotten after 60 s without traffic), and
//! the replies back. Each `--tcp LISTEN=TARGET` forwards accepted connections to TARGET.
//!
//! At start the proxy prints one JSON line to stdout with the bound addresses, in the
//! order given: `{"control":"127.0.0.1:P","udp":["127.0.0.1:P1"],"tcp":["127.0.0.1:P2"]}`.
//!
//! The control address takes one command per line and answers `ok`, `error <reason>`,
//! or for `stats` a JSON line. Modes apply to both directions of every current and future
//! flow:
//!
//! - `up`: forward normally (the initial mode).
//! - `cut`: drop everything, forget every UDP mapping (after `up` the target sees the
//!   client from a new source port), close every TCP connection on both sides and close
//!   new ones as soon as they are accepted.
//! - `blackhole`: silently discard all data, but keep UDP mappings and TCP connections.
//! - `blackhole-up`: discard the client's UDP datagrams toward the target, keep forwarding
//!   the target's to the client (the child's acknowledgements are lost); TCP as `blackhole`.
//! - `blackhole-down`: the other way round: the client's datagrams reach the target, the
//!   target's are discarded (a child's batches are stored, its parent's acks are lost).
//! - `flap <up_ms> <down_ms>`: alternate between up and blackhole, starting up, until the
//!   next mode command.
//!
//! `delay <ms>` is a setting rather than a mode: from then on, data is delivered `ms`
//! later in each direction, in order, whenever the link forwards (in `up` and in the up
//! phases of `flap`); data whose delivery falls into a cut or blackhole is lost. It stays
//! in force across mode commands; `delay 0` removes it.

mod control;
mod link;
mod tcp;
mod udp;

use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail};
use clap::Parser;
use tokio::net::{TcpListener, UdpSocket};
use tokio::task::JoinSet;

use crate::link::Link;
use crate::udp::FlowTable;

/// Fault-injection UDP/TCP proxy: cut, black-hole, delay and flap a network path on command.
#[derive(Parser, Debug)]
#[command(name = "holdfast-link-proxy", version)]
struct Args {
    /// Forward UDP datagrams arriving at LISTEN to TARGET (repeatable; LISTEN may use port 0).
    #[arg(long = "udp", value_name = "LISTEN=TARGET", value_parser = parse_mapping)]
    udp: Vec<Mapping>,
    /// Forward TCP connections accepted at LISTEN to TARGET (repeatable; LISTEN may use port 0).
    #[arg(long = "tcp", value_name = "LISTEN=TARGET", value_parser = parse_mapping)]
    tcp: Vec<Mapping>,
    /// Address of the control listener (line protocol: up, cut, blackhole, blackhole-up, blackhole-down, delay, flap, stats).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:0")]
    control: String,
}

#[derive(Clone, Debug)]
struct Mapping {
    listen: String,
    target: String,
}

fn parse_mapping(s: &str) -> Result<Mapping, String> {
    match s.split_once('=') {
        Some((listen, target)) if !listen.is_empty() && !target.is_empty() => Ok(Mapping {
            listen: listen.to_owned(),
            target: target.to_owned(),
        }),
        _ => Err(format!("expected LISTEN=TARGET, got {s:?}")),
    }
}

async fn resolve(addr: &str) -> Result<SocketAddr> {
    tokio::net::lookup_host(addr)
        .await
        .with_context(|| format!("resolving {addr}"))?
        .next()
        .ok_or_else(|| anyhow!("{addr} resolves to no address"))
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    if args.udp.is_empty() && args.tcp.is_empty() {
        eprintln!("holdfast-link-proxy: no --udp or --tcp given; only the control listener runs");
    }

    let mut tables = Vec::new();
    for m in &args.udp {
        let listen = resolve(&m.listen).await?;
        let target = resolve(&m.target).await?;
        let sock = UdpSocket::bind(listen)
            .await
            .with_context(|| format!("binding UDP {listen}"))?;
        tables.push((FlowTable::new(sock, target), target));
    }
    let mut tcp = Vec::new();
    for m in &args.tcp {
        let listen = resolve(&m.listen).await?;
        let target = resolve(&m.target).await?;
        let listener = TcpListener::bind(listen)
            .await
            .with_context(|| format!("binding TCP {listen}"))?;
        tcp.push((listener, target));
    }
    let control_addr = resolve(&args.control).await?;
    let control = TcpListener::bind(control_addr)
        .await
        .with_context(|| format!("binding control {control_addr}"))?;

    let udp_addrs = tables
        .iter()
        .map(|(t, _)| Ok(t.local_addr()?.to_string()))
        .collect::<Result<Vec<_>>>()?;
    let tcp_addrs = tcp
        .iter()
        .map(|(l, _)| Ok(l.local_addr()?.to_string()))
        .collect::<Result<Vec<_>>>()?;
    let line = format!(
        "{{\"control\":{},\"udp\":{},\"tcp\":{}}}",
        serde_json::to_string(&control.local_addr()?.to_string())?,
        serde_json::to_string(&udp_addrs)?,
        serde_json::to_string(&tcp_addrs)?,
    );
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{line}")?;
        out.flush()?;
    }

    let link = Link::new(tables.iter().map(|(t, _)| Arc::clone(t)).collect());
    let mut tasks = JoinSet::new();
    for (table, target) in tables {
        eprintln!("holdfast-link-proxy: udp {} -> {target}", table.local_addr()?);
        tasks.spawn(udp::run(table, Arc::clone(&link)));
    }
    for (listener, target) in tcp {
        eprintln!("holdfast-link-proxy: tcp {} -> {target}", listener.local_addr()?);
        tasks.spawn(tcp::run(listener, target, Arc::clone(&link)));
    }
    tasks.spawn(control::run(control, Arc::clone(&link)));

    // The listener tasks loop forever; the proxy runs until it is killed.
    match tasks.join_next().await {
        Some(Err(e)) => bail!("listener task failed: {e}"),
        _ => bail!("listener task ended"),
    }
}
