//! Headless Chromium driven over WebDriver (chromedriver), for the status
//! page's tests; and curl for plain HTTP calls.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::fleet::wait_until;
use super::free_port;

/// `curl` to 127.0.0.1:`port`: the status and the body.
pub fn curl(port: u16, method: &str, path: &str, body: Option<&str>) -> Option<(u16, String)> {
    let mut c = Command::new("curl");
    c.args(["-s", "--max-time", "60", "-X", method, "-w", "\n%{http_code}"]);
    if let Some(b) = body {
        c.args(["-H", "Content-Type: application/json", "--data-binary", b]);
    }
    let out = c.arg(format!("http://127.0.0.1:{port}{path}")).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n')?;
    Some((code.trim().parse().ok()?, body.to_string()))
}

/// A WebDriver session on chromedriver with headless Chromium.
pub struct Browser {
    driver: Child,
    port: u16,
    pub session: String,
    _profile: tempfile::TempDir,
}

impl Browser {
    pub fn start() -> Browser {
        let port = free_port();
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver (Debian packages chromium and chromium-driver; scripts/setup.sh installs them)");
        let mut b = Browser {
            driver,
            port,
            session: String::new(),
            _profile: tempfile::tempdir().unwrap(),
        };
        wait_until(20, "chromedriver to answer", || {
            curl(port, "GET", "/status", None).is_some_and(|(c, _)| c == 200)
        });
        let args = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--window-size=1280,1600",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain([format!("--user-data-dir={}", b._profile.path().display())])
        .collect::<Vec<_>>();
        let v = b.call(
            "POST",
            "/session",
            json!({ "capabilities": { "alwaysMatch": {
                "browserName": "chrome",
                "goog:chromeOptions": { "binary": "/usr/bin/chromium", "args": args },
            }}}),
        );
        b.session = v["sessionId"].as_str().expect("a WebDriver session").to_string();
        b
    }

    /// One WebDriver command: its `value`.
    pub fn call(&self, method: &str, path: &str, body: Value) -> Value {
        let (code, text) = curl(self.port, method, path, Some(&body.to_string())).expect("chromedriver");
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
        assert_eq!(code, 200, "{method} {path}: {v}");
        let mut v = v;
        if v.get("sessionId").is_some() {
            return v;
        }
        v["value"].take()
    }

    pub fn open(&self, url: &str) {
        self.call("POST", &format!("/session/{}/url", self.session), json!({ "url": url }));
    }

    /// Runs `script` in the page: what it returns.
    pub fn eval(&self, script: &str) -> Value {
        self.call(
            "POST",
            &format!("/session/{}/execute/sync", self.session),
            json!({ "script": script, "args": [] }),
        )
    }

    /// The text a person sees in the element with id `id`.
    pub fn text(&self, id: &str) -> String {
        self.eval(&format!(
            "const e = document.getElementById({id:?}); return e ? e.innerText : null;"
        ))
        .as_str()
        .unwrap_or_default()
        .to_string()
    }

    /// Waits until the element `id` shows `want` (the page refreshes itself).
    pub fn wait_text(&self, id: &str, want: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let got = self.text(id);
            if got == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "#{id} shows {got:?}, not {want:?}; the page reads:\n{}",
                self.text("main")
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = curl(self.port, "DELETE", &format!("/session/{}", self.session), None);
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}
