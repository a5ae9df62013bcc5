//! The test origin for the range cache: `tests/cache/origin.py`, which
//! counts what it serves and can replace an object mid-test.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};

/// The test origin.
pub struct Origin {
    child: Child,
    pub port: u16,
    pub root: tempfile::TempDir,
    tls: bool,
}

impl Origin {
    pub fn start() -> Origin {
        Origin::start_with(&[])
    }

    pub fn start_with(args: &[&str]) -> Origin {
        let root = tempfile::tempdir().unwrap();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/cache/origin.py");
        let mut child = Command::new("python3")
            .arg(script)
            .arg("--root")
            .arg(root.path())
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python3 for the test origin");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let Some(port) = line.trim().strip_prefix("listening ").and_then(|p| p.parse().ok()) else {
            panic!("the test origin did not start ({:?}): {line:?}", child.wait());
        };
        Origin {
            child,
            port,
            root,
            tls: args.contains(&"--tls-cert"),
        }
    }

    pub fn put(&self, path: &str, data: &[u8]) {
        let full = self.root.path().join(path.trim_start_matches('/'));
        std::fs::create_dir_all(full.parent().unwrap()).unwrap();
        std::fs::write(full, data).unwrap();
    }

    pub fn post(&self, path_and_query: &str, body: &[u8]) {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        write!(
            s,
            "POST {path_and_query} HTTP/1.1\r\nHost: origin\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        )
        .unwrap();
        s.write_all(body).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    }

    /// Replaces an object: new bytes, new ETag.
    pub fn replace(&self, path: &str, data: &[u8]) {
        self.post(&format!("/_replace?path={path}"), data);
    }

    pub fn configure(&self, query: &str) {
        self.post(&format!("/_config?{query}"), b"");
    }

    pub fn stats(&self, path: &str) -> serde_json::Value {
        // -k: the TLS origin's certificate is the test's own.
        let out = Command::new("curl")
            .args(["-s", "-k", "--max-time", "10"])
            .arg(format!(
                "{}://localhost:{}/_stats",
                if self.tls { "https" } else { "http" },
                self.port
            ))
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v[path].clone()
    }

    pub fn requests(&self, path: &str) -> u64 {
        self.stats(path)["requests"].as_u64().unwrap_or(0)
    }

    pub fn bytes(&self, path: &str) -> u64 {
        self.stats(path)["bytes"].as_u64().unwrap_or(0)
    }

    pub fn ranges(&self, path: &str) -> Vec<String> {
        self.stats(path)["ranges"]
            .as_array()
            .map(|a| a.iter().map(|r| r.as_str().unwrap_or("none").to_string()).collect())
            .unwrap_or_default()
    }

    /// `[[plugins.content-source.config.sources]]` for this origin.
    pub fn sources(&self) -> String {
        format!(
            "[[plugins.content-source.config.sources]]\nname = \"test\"\nhosts = [\"origin.test\", \"alias.test\"]\n\
             origin = \"http://127.0.0.1:{}\"\nimmutable = [\"/pool/**\", \"/debian/pool/**\"]\n\
             revalidate = [\"/dists/**\", \"/debian/dists/**\"]\nother = \"deny\"\nttl_seconds = 1\n",
            self.port
        )
    }
}

impl Drop for Origin {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
