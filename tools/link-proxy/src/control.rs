//! The control listener: a TCP line protocol, one command per line, one reply per line.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

use crate::link::Link;

/// Longest accepted command line; a longer one gets an error and the connection is closed.
const MAX_LINE: usize = 1024;

pub async fn run(listener: TcpListener, link: Arc<Link>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(session(stream, Arc::clone(&link)));
            }
            Err(e) => {
                eprintln!("holdfast-link-proxy: control accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn session(stream: TcpStream, link: Arc<Link>) {
    let _ = stream.set_nodelay(true);
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r);
    let mut line = Vec::with_capacity(128);
    loop {
        line.clear();
        let limit = (MAX_LINE + 1) as u64;
        match (&mut r).take(limit).read_until(b'\n', &mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let too_long = line.len() > MAX_LINE;
        let mut reply = if too_long {
            "error line too long".to_owned()
        } else {
            link.command(String::from_utf8_lossy(&line).trim())
        };
        reply.push('\n');
        if w.write_all(reply.as_bytes()).await.is_err() || too_long {
            return;
        }
    }
}
