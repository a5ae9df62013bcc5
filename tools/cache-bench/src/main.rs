//! Range cache benchmark: holdfast and nginx (`proxy_cache` + `slice 1m`)
//! side by side, in one run, against one origin (`tests/cache/origin.py`).
//!
//! 1. Cached 1 MiB aligned range hits: throughput with N keep-alive
//!    connections.
//! 2. Cached 100 KiB ranges at random offsets: requests per second.
//! 3. A cold 64 MiB object asked for by 10 clients at once, each from a
//!    different offset to the end: bytes fetched from the origin, and each
//!    client's time to first byte next to the origin's own.
//!
//! Each steady-state case runs `--rounds` times per peer, alternating;
//! medians and ratios (holdfast / nginx) are printed.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use clap::Parser;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const MIB: u64 = 1 << 20;

#[derive(Parser, Debug)]
struct Args {
    /// The holdfast binary (a release build).
    #[arg(long, default_value = "target/release/holdfast")]
    holdfast: PathBuf,
    /// The nginx binary.
    #[arg(long, default_value = "/usr/sbin/nginx")]
    nginx: PathBuf,
    /// The test origin script.
    #[arg(long, default_value = "tests/cache/origin.py")]
    origin: PathBuf,
    /// Seconds per steady-state round.
    #[arg(long, default_value_t = 5)]
    secs: u64,
    /// Rounds per peer (medians are reported).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Concurrent keep-alive connections for the hit cases.
    #[arg(long, default_value_t = 8)]
    conns: usize,
    /// Delay the origin adds before each response head, ms (a WAN round trip).
    #[arg(long, default_value_t = 50)]
    origin_delay_ms: u64,
    /// Origin bandwidth per response, bytes/s (0 = unlimited).
    #[arg(long, default_value_t = 20_000_000)]
    origin_rate: u64,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn wait_port(port: u16, what: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            bail!("{what} did not listen on {port}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// One response: status, time to the first body byte, body bytes.
struct Answer {
    status: u16,
    ttfb: Duration,
    bytes: u64,
}

/// Sends one GET on a keep-alive connection and reads the whole answer.
async fn get(conn: &mut TcpStream, path: &str, range: Option<&str>, buf: &mut Vec<u8>) -> Result<Answer> {
    let start = Instant::now();
    let range = range.map(|r| format!("Range: bytes={r}\r\n")).unwrap_or_default();
    conn.write_all(format!("GET {path} HTTP/1.1\r\nHost: origin.test\r\n{range}\r\n").as_bytes())
        .await?;
    // Read the head.
    buf.clear();
    let mut chunk = vec![0u8; 64 << 10];
    let head_end = loop {
        let n = conn.read(&mut chunk).await?;
        if n == 0 {
            bail!("connection closed in the response head");
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("bad status line"))?;
    let length: u64 = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .ok_or_else(|| anyhow!("no Content-Length in {head}"))?;
    let mut got = (buf.len() - head_end) as u64;
    let mut ttfb = if got > 0 { Some(start.elapsed()) } else { None };
    while got < length {
        let n = conn.read(&mut chunk).await?;
        if n == 0 {
            bail!("connection closed after {got} of {length} body bytes");
        }
        ttfb.get_or_insert_with(|| start.elapsed());
        got += n as u64;
    }
    Ok(Answer {
        status,
        ttfb: ttfb.unwrap_or_else(|| start.elapsed()),
        bytes: got,
    })
}

/// A tiny deterministic generator for offsets.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Hits for `secs` on `conns` connections: (bytes/s, requests/s).
async fn hits(port: u16, conns: usize, secs: u64, size: u64, object: u64, aligned: bool) -> Result<(f64, f64)> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for c in 0..conns {
        tasks.push(tokio::spawn(async move {
            let mut conn = TcpStream::connect(("127.0.0.1", port)).await?;
            conn.set_nodelay(true)?;
            let mut rng = Rng(0x9E37_79B9 + c as u64 * 7919);
            let mut buf = Vec::new();
            let (mut bytes, mut reqs) = (0u64, 0u64);
            while Instant::now() < deadline {
                let start = if aligned {
                    rng.next() % (object / size) * size
                } else {
                    rng.next() % (object - size)
                };
                let a = get(
                    &mut conn,
                    "/pool/hits.bin",
                    Some(&format!("{start}-{}", start + size - 1)),
                    &mut buf,
                )
                .await?;
                if a.status != 206 || a.bytes != size {
                    bail!("unexpected answer {} with {} bytes", a.status, a.bytes);
                }
                bytes += a.bytes;
                reqs += 1;
            }
            anyhow::Ok((bytes, reqs))
        }));
    }
    let (mut bytes, mut reqs) = (0, 0);
    for t in tasks {
        let (b, r) = t.await??;
        bytes += b;
        reqs += r;
    }
    Ok((bytes as f64 / secs as f64, reqs as f64 / secs as f64))
}

/// Ten clients at once from ten offsets of `path` to its end: their times to
/// first byte, and the time until all finished.
async fn cold(port: u16, path: &str, object: u64) -> Result<(Vec<(u64, Duration)>, Duration)> {
    let start = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..10u64 {
        let path = path.to_string();
        let offset = object / 10 * i + 12_345;
        tasks.push(tokio::spawn(async move {
            let mut conn = TcpStream::connect(("127.0.0.1", port)).await?;
            conn.set_nodelay(true)?;
            let a = get(&mut conn, &path, Some(&format!("{offset}-")), &mut Vec::new()).await?;
            if a.status != 206 || a.bytes != object - offset {
                bail!("client at {offset}: {} with {} bytes", a.status, a.bytes);
            }
            anyhow::Ok((offset, a.ttfb))
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await??);
    }
    Ok((out, start.elapsed()))
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn origin_bytes(port: u16, path: &str) -> Result<u64> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    use std::io::{Read, Write};
    write!(s, "GET /_stats HTTP/1.1\r\nHost: o\r\nConnection: close\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("{}");
    let v: serde_json::Value = serde_json::from_str(body)?;
    Ok(v[path]["bytes"].as_u64().unwrap_or(0))
}

fn origin_control(port: u16, query: &str) -> Result<()> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    write!(
        s,
        "POST /_config?{query} HTTP/1.1\r\nHost: o\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(())
}

fn write_object(path: &Path, len: u64, seed: u64) -> Result<()> {
    let mut x = seed | 1;
    let mut data = Vec::with_capacity(len as usize);
    while (data.len() as u64) < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        data.extend_from_slice(&x.to_le_bytes());
    }
    data.truncate(len as usize);
    std::fs::write(path, data)?;
    Ok(())
}

fn start_origin(args: &Args, root: &Path) -> Result<(Proc, u16)> {
    let mut child = Command::new("python3")
        .arg(&args.origin)
        .arg("--root")
        .arg(root)
        .stdout(Stdio::piped())
        .spawn()
        .context("python3 for the origin")?;
    let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    let port = line
        .trim()
        .strip_prefix("listening ")
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| anyhow!("origin said {line:?}"))?;
    Ok((Proc(child), port))
}

fn start_holdfast(args: &Args, dir: &Path, origin: u16) -> Result<(Proc, u16)> {
    let (port, admin, mqtt) = (free_port()?, free_port()?, free_port()?);
    let config = dir.join("holdfast.toml");
    std::fs::write(
        &config,
        format!(
            "[node]\nid = \"bench\"\ndata_dir = {:?}\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n\
             [mqtt.tcp]\nlisten = \"127.0.0.1:{mqtt}\"\n[log]\nlevel = \"warn\"\n\
             [cache]\nlisten = \"127.0.0.1:{port}\"\nmin_free = 0\n\
             [[plugins.content-source.config.sources]]\nname = \"bench\"\nhosts = [\"origin.test\"]\n\
             origin = \"http://127.0.0.1:{origin}\"\nimmutable = [\"/pool/**\"]\n",
            dir.join("data").display().to_string()
        ),
    )?;
    let child = Command::new(&args.holdfast)
        .args(["run", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", args.holdfast.display()))?;
    let proc = Proc(child);
    wait_port(port, "holdfast")?;
    Ok((proc, port))
}

fn start_nginx(args: &Args, dir: &Path, origin: u16) -> Result<(Proc, u16)> {
    let port = free_port()?;
    for d in ["cache", "tmp", "logs"] {
        std::fs::create_dir_all(dir.join(d))?;
    }
    let d = |p: &str| dir.join(p).display().to_string();
    let user = if rustix_is_root() { "user root;\n" } else { "" };
    let conf = format!(
        "{user}worker_processes 2;\ndaemon off;\npid {pid};\nerror_log {err} warn;\n\
         events {{ worker_connections 1024; }}\n\
         http {{\n  access_log off;\n  keepalive_requests 1000000;\n  client_body_temp_path {tmp}/body;\n  proxy_temp_path {tmp}/proxy;\n\
         fastcgi_temp_path {tmp}/fcgi;\n  uwsgi_temp_path {tmp}/uwsgi;\n  scgi_temp_path {tmp}/scgi;\n\
         proxy_cache_path {cache} levels=1:2 keys_zone=c:16m max_size=10g inactive=1d use_temp_path=off;\n\
         server {{\n    listen 127.0.0.1:{port};\n    location / {{\n      slice 1m;\n      proxy_cache c;\n\
         proxy_cache_key $uri$is_args$args$slice_range;\n      proxy_set_header Range $slice_range;\n\
         proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n      proxy_cache_valid 200 206 1d;\n\
         proxy_cache_lock on;\n      proxy_cache_lock_timeout 120s;\n      proxy_cache_lock_age 120s;\n\
         proxy_pass http://127.0.0.1:{origin};\n    }}\n  }}\n}}\n",
        pid = d("nginx.pid"),
        err = d("logs/error.log"),
        tmp = d("tmp"),
        cache = d("cache"),
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf)?;
    let child = Command::new(&args.nginx)
        .arg("-c")
        .arg(&path)
        .arg("-p")
        .arg(dir)
        .stdout(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", args.nginx.display()))?;
    let proc = Proc(child);
    wait_port(port, "nginx")?;
    Ok((proc, port))
}

fn rustix_is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn main() -> Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let work = std::env::temp_dir().join(format!("holdfast-cache-bench-{}", std::process::id()));
    std::fs::create_dir_all(work.join("root/pool"))?;
    let result = run(&args, &rt, &work);
    let _ = std::fs::remove_dir_all(&work);
    result
}

fn run(args: &Args, rt: &tokio::runtime::Runtime, work: &Path) -> Result<()> {
    let object = 64 * MIB;
    let root = work.join("root");
    write_object(&root.join("pool/hits.bin"), object, 1)?;
    write_object(&root.join("pool/cold-holdfast.bin"), object, 2)?;
    write_object(&root.join("pool/cold-nginx.bin"), object, 3)?;
    write_object(&root.join("pool/cold-origin.bin"), object, 4)?;
    let (_origin, oport) = start_origin(args, &root)?;
    let hdir = work.join("holdfast");
    let ndir = work.join("nginx");
    std::fs::create_dir_all(&hdir)?;
    std::fs::create_dir_all(&ndir)?;
    let (_h, hport) = start_holdfast(args, &hdir, oport)?;
    let (_n, nport) = start_nginx(args, &ndir, oport)?;
    let peers = [("holdfast", hport), ("nginx", nport)];

    // Warm both caches with every 1 MiB block of the hit object.
    rt.block_on(async {
        for (name, port) in peers {
            let mut conn = TcpStream::connect(("127.0.0.1", port)).await?;
            let mut buf = Vec::new();
            for k in 0..object / MIB {
                let a = get(
                    &mut conn,
                    "/pool/hits.bin",
                    Some(&format!("{}-{}", k * MIB, (k + 1) * MIB - 1)),
                    &mut buf,
                )
                .await
                .with_context(|| format!("{name}: warm-up block {k}"))?;
                if a.status != 206 {
                    bail!("warm-up got {}", a.status);
                }
            }
        }
        anyhow::Ok(())
    })?;
    std::thread::sleep(Duration::from_secs(1));
    let warm_fetched = origin_bytes(oport, "/pool/hits.bin")?;

    let mut table = Vec::new();
    for (name, size, aligned) in [
        ("1 MiB aligned range hits", MIB, true),
        ("100 KiB random range hits", 100 << 10, false),
    ] {
        let mut per: Vec<(Vec<f64>, Vec<f64>)> = vec![(Vec::new(), Vec::new()); 2];
        for _ in 0..args.rounds {
            for (i, (_, port)) in peers.iter().enumerate() {
                let (bps, rps) = rt
                    .block_on(hits(*port, args.conns, args.secs, size, object, aligned))
                    .with_context(|| format!("{}: {name}", peers[i].0))?;
                per[i].0.push(bps / MIB as f64);
                per[i].1.push(rps);
            }
        }
        let h = (median(&mut per[0].0.clone()), median(&mut per[0].1.clone()));
        let n = (median(&mut per[1].0.clone()), median(&mut per[1].1.clone()));
        table.push(serde_json::json!({
            "case": name,
            "holdfast": {"mib_per_s": per[0].0, "req_per_s": per[0].1, "median_mib_per_s": h.0, "median_req_per_s": h.1},
            "nginx": {"mib_per_s": per[1].0, "req_per_s": per[1].1, "median_mib_per_s": n.0, "median_req_per_s": n.1},
            "ratio": h.1 / n.1,
        }));
    }

    // Cold object, ten clients at ten offsets.
    origin_control(
        oport,
        &format!("delay_ms={}&throttle={}", args.origin_delay_ms, args.origin_rate),
    )?;
    let origin_ttfb: Vec<f64> = rt.block_on(async {
        let mut v = Vec::new();
        for i in [0u64, 5, 9] {
            let mut conn = TcpStream::connect(("127.0.0.1", oport)).await?;
            let off = object / 10 * i + 12_345;
            let a = get(
                &mut conn,
                "/pool/hits.bin",
                Some(&format!("{off}-{}", off + 99)),
                &mut Vec::new(),
            )
            .await?;
            v.push(a.ttfb.as_secs_f64() * 1000.0);
        }
        anyhow::Ok(v)
    })?;
    let mut cold_rows = Vec::new();
    // The origin itself, asked by the same ten clients: the reference for
    // time to first byte under the same load.
    for (name, port) in [("origin", oport), peers[0], peers[1]] {
        let path = format!("/pool/cold-{name}.bin");
        let (ttfbs, total) = rt
            .block_on(cold(port, &path, object))
            .with_context(|| format!("{name}: cold"))?;
        std::thread::sleep(Duration::from_millis(500));
        let fetched = origin_bytes(oport, &path)?;
        cold_rows.push(serde_json::json!({
            "peer": name,
            "ttfb_ms": ttfbs.iter().map(|(o, t)| serde_json::json!({"offset": o, "ms": t.as_secs_f64() * 1000.0})).collect::<Vec<_>>(),
            "all_done_s": total.as_secs_f64(),
            "origin_bytes": fetched,
            "copies": fetched as f64 / object as f64,
        }));
    }
    let report = serde_json::json!({
        "object_bytes": object,
        "warm_up_origin_bytes": warm_fetched,
        "steady": table,
        "origin_ttfb_ms": origin_ttfb,
        "origin_delay_ms": args.origin_delay_ms,
        "origin_rate": args.origin_rate,
        "cold": cold_rows,
        "conns": args.conns,
        "secs": args.secs,
        "rounds": args.rounds,
    });
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "steady state ({} connections, {} s rounds, {} rounds each, alternating):",
        args.conns, args.secs, args.rounds
    );
    for row in &table {
        println!(
            "  {:<28} holdfast {:>8.1} MiB/s {:>8.0} req/s | nginx {:>8.1} MiB/s {:>8.0} req/s | ratio {:.2}",
            row["case"].as_str().unwrap_or(""),
            row["holdfast"]["median_mib_per_s"].as_f64().unwrap_or(0.0),
            row["holdfast"]["median_req_per_s"].as_f64().unwrap_or(0.0),
            row["nginx"]["median_mib_per_s"].as_f64().unwrap_or(0.0),
            row["nginx"]["median_req_per_s"].as_f64().unwrap_or(0.0),
            row["ratio"].as_f64().unwrap_or(0.0),
        );
        println!(
            "    rounds: holdfast {:?} | nginx {:?} (req/s)",
            rounded(&row["holdfast"]["req_per_s"]),
            rounded(&row["nginx"]["req_per_s"])
        );
    }
    println!(
        "cold 64 MiB object, 10 clients from 10 offsets to the end (origin: +{} ms, {} MB/s per response; its own TTFB {:?} ms):",
        args.origin_delay_ms,
        args.origin_rate / 1_000_000,
        origin_ttfb.iter().map(|t| t.round()).collect::<Vec<_>>()
    );
    for row in &cold_rows {
        let t: Vec<String> = row["ttfb_ms"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|x| format!("{:.0}", x["ms"].as_f64().unwrap_or(0.0)))
                    .collect()
            })
            .unwrap_or_default();
        println!(
            "  {:<9} origin bytes {:>10} ({:.2} copies), all done {:.2} s, TTFB by offset (ms): {}",
            row["peer"].as_str().unwrap_or(""),
            row["origin_bytes"],
            row["copies"].as_f64().unwrap_or(0.0),
            row["all_done_s"].as_f64().unwrap_or(0.0),
            t.join(" ")
        );
    }
    Ok(())
}

fn rounded(v: &serde_json::Value) -> Vec<i64> {
    v.as_array()
        .map(|a| a.iter().map(|x| x.as_f64().unwrap_or(0.0).round() as i64).collect())
        .unwrap_or_default()
}
