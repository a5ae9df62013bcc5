//! A Mosquitto broker started for real, for the bridge's tests.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use super::fleet::wait_until;
use super::free_port;

/// A Mosquitto broker for the bridge, on a free port, persisting to `dir`.
pub struct Mosquitto {
    child: Option<Child>,
    conf: PathBuf,
    pub port: u16,
}

impl Mosquitto {
    pub fn start(dir: &Path) -> Mosquitto {
        let port = free_port();
        // Started as root, Mosquitto runs as the `mosquitto` user: let it
        // write its database here.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        }
        let conf = dir.join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\npersistence_location {}/\nmax_inflight_messages 10\n",
                dir.display()
            ),
        )
        .unwrap();
        let mut m = Mosquitto {
            child: None,
            conf,
            port,
        };
        m.spawn();
        m
    }

    pub fn spawn(&mut self) {
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(&self.conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto is installed (scripts/setup.sh)");
        self.child = Some(child);
        let port = self.port;
        wait_until(10, "mosquitto", || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
    }

    /// SIGTERM: Mosquitto saves its sessions and exits.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill").arg(c.id().to_string()).status();
            let _ = c.wait();
        }
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
