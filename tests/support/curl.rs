//! curl as the cache's client, and test data.

#![allow(dead_code)]

use std::path::Path;
use std::process::Command;

/// Deterministic incompressible bytes.
pub fn data(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// A response as curl saw it.
pub struct Got {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub exit: i32,
}

impl Got {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// `curl` against the cache listening on `port` with Host `host`.
pub fn curl_host(port: u16, host: &str, path: &str, args: &[&str]) -> Got {
    let dir = tempfile::tempdir().unwrap();
    let (h, b) = (dir.path().join("h"), dir.path().join("b"));
    let out = Command::new("curl")
        .args(["-s", "--max-time", "60", "-H", &format!("Host: {host}"), "-D"])
        .arg(&h)
        .arg("-o")
        .arg(&b)
        .args(args)
        .arg(format!("http://127.0.0.1:{port}{path}"))
        .output()
        .expect("curl");
    parse_got(&h, &b, out.status.code().unwrap_or(-1))
}

pub fn parse_got(h: &Path, b: &Path, exit: i32) -> Got {
    let head = std::fs::read_to_string(h).unwrap_or_default();
    // The last response head (after any proxy or 100 heads).
    let last = head.trim_end().rsplit("\r\n\r\n").next().unwrap_or("").to_string();
    let mut lines = last.lines();
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    Got {
        status,
        headers,
        body: std::fs::read(b).unwrap_or_default(),
        exit,
    }
}
