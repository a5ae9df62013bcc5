//! TCP forwarding: each accepted connection gets its own connection to the target, and
//! each direction a reader and a delay writer so the mode applies per chunk.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::time::Instant;

use crate::link::{LINK_CUT, Link};

/// Read size per chunk.
const BUF: usize = 65_535;
/// At most this many bytes wait in one direction's delay queue; the reader then waits.
const MAX_QUEUED: usize = 16 << 20;
/// How long to wait for the target to accept a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts client connections; while the link is cut they are closed at once.
pub async fn run(listener: TcpListener, target: SocketAddr, link: Arc<Link>) {
    loop {
        let client = match listener.accept().await {
            Ok((client, _)) => client,
            Err(e) => {
                eprintln!("holdfast-link-proxy: tcp accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // Subscribe before looking at the state, so a cut in between is seen one way or
        // the other.
        let cut = link.subscribe_cut();
        if link.state() == LINK_CUT {
            drop(client);
            continue;
        }
        tokio::spawn(connection(client, target, Arc::clone(&link), cut));
    }
}

/// Decrements the TCP flow count when the connection ends.
struct FlowGuard<'a>(&'a AtomicUsize);

impl Drop for FlowGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn connection(client: TcpStream, target: SocketAddr, link: Arc<Link>, mut cut: watch::Receiver<u64>) {
    let upstream = tokio::select! {
        r = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(target)) => match r {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                eprintln!("holdfast-link-proxy: tcp connect {target}: {e}");
                return;
            }
            Err(_) => {
                eprintln!("holdfast-link-proxy: tcp connect {target}: timed out");
                return;
            }
        },
        _ = cut.changed() => return,
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    link.tcp_flows.fetch_add(1, Ordering::Relaxed);
    let _guard = FlowGuard(&link.tcp_flows);
    let (client_r, client_w) = client.into_split();
    let (upstream_r, upstream_w) = upstream.into_split();
    let both = async { tokio::try_join!(pipe(client_r, upstream_w, &link), pipe(upstream_r, client_w, &link)) };
    // Returning drops both sockets: a cut closes the connection on both sides.
    tokio::select! {
        _ = both => {}
        _ = cut.changed() => {}
    }
}

enum Chunk {
    Data { due: Instant, data: Vec<u8> },
    Eof,
}

/// Copies one direction. The reader stamps each chunk with its due time and never waits
/// for the delay; the writer sleeps until each chunk is due, then writes it or, if the
/// link is not up by then, discards it. End of stream is passed on after the queued data.
async fn pipe(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, link: &Link) -> io::Result<()> {
    let (tx, mut rx) = mpsc::unbounded_channel::<Chunk>();
    let budget = Semaphore::new(MAX_QUEUED);
    let reader = async {
        let mut buf = vec![0u8; BUF];
        loop {
            let n = from.read(&mut buf).await?;
            if n == 0 {
                let _ = tx.send(Chunk::Eof);
                return Ok::<_, io::Error>(());
            }
            if !link.forwarding() {
                link.stats.dropped(false, n);
                continue;
            }
            let due = Instant::now() + link.delay();
            // `n` is at most `BUF`, well below `MAX_QUEUED`; the semaphore is never closed.
            if let Ok(permit) = budget.acquire_many(n as u32).await {
                permit.forget();
            }
            let _ = tx.send(Chunk::Data {
                due,
                data: buf[..n].to_vec(),
            });
        }
    };
    let writer = async {
        while let Some(chunk) = rx.recv().await {
            match chunk {
                Chunk::Data { due, data } => {
                    tokio::time::sleep_until(due).await;
                    if link.forwarding() {
                        to.write_all(&data).await?;
                        link.stats.forwarded(false, data.len());
                    } else {
                        link.stats.dropped(false, data.len());
                    }
                    budget.add_permits(data.len());
                }
                Chunk::Eof => {
                    to.shutdown().await?;
                    break;
                }
            }
        }
        Ok::<_, io::Error>(())
    };
    tokio::try_join!(reader, writer)?;
    Ok(())
}
