//! The power-cut harness (tools/powercut): an LD_PRELOAD shim that records
//! what a process changes under a directory since its last fsync, and the
//! restore tool that rolls the directory back to that after a SIGKILL.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use super::BIN;

/// The shim and the restore tool, built with `cc` once per test process.
pub struct Harness {
    pub lib: PathBuf,
    pub restore: PathBuf,
}

impl Harness {
    pub fn get() -> &'static Harness {
        static BUILT: OnceLock<Harness> = OnceLock::new();
        BUILT.get_or_init(|| {
            let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tools/powercut");
            let out = Path::new(BIN).with_file_name("powercut");
            std::fs::create_dir_all(&out).unwrap();
            // Per process: two test binaries building at once do not clash.
            let lib = out.join(format!("libpowercut-{}.so", std::process::id()));
            let restore = out.join(format!("powercut-restore-{}", std::process::id()));
            let cc = |args: &[&str], src_file: &str, dst: &Path| {
                let status = Command::new("cc")
                    .args(["-O2", "-Wall", "-Wno-format-truncation"])
                    .args(args)
                    .arg("-o")
                    .arg(dst)
                    .arg(src.join(src_file))
                    .args(["-ldl", "-lpthread"])
                    .status()
                    .expect("cc is installed");
                assert!(status.success(), "building {src_file} failed");
            };
            cc(&["-shared", "-fPIC"], "powercut.c", &lib);
            cc(&[], "restore.c", &restore);
            Harness { lib, restore }
        })
    }

    /// The environment that puts a process under the shim: what it changes
    /// under `root` is recorded in `state`. With `nosync`, its fsyncs and
    /// fdatasyncs under `root` do nothing.
    pub fn env(&self, root: &Path, state: &Path, nosync: bool) -> Vec<(String, String)> {
        let mut env = vec![
            ("LD_PRELOAD".to_string(), self.lib.display().to_string()),
            ("POWERCUT_ROOT".to_string(), root.display().to_string()),
            ("POWERCUT_STATE".to_string(), state.display().to_string()),
        ];
        if nosync {
            env.push(("POWERCUT_NOSYNC".to_string(), "1".to_string()));
        }
        env
    }

    /// After the process is dead: rolls `root` back to what a power cut
    /// would have left, and empties `state`. Returns the tool's summary.
    pub fn restore(&self, root: &Path, state: &Path) -> String {
        let out = Command::new(&self.restore).arg(root).arg(state).output().unwrap();
        assert!(
            out.status.success(),
            "powercut-restore: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

/// What arrived at a consumer, against what was acknowledged to the
/// publisher, by payload sequence number and `holdfast-id`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    /// Acknowledged, never arrived.
    pub lost: usize,
    /// Arrived again (same sequence number) after its first arrival.
    pub duplicated: usize,
    /// First arrivals that came after a higher sequence number's.
    pub reordered: usize,
    /// Duplicates whose `holdfast-id` differs from their first arrival's.
    pub id_mismatch: usize,
}

pub fn tally(acked: &[u64], got: &[super::client::Received]) -> Tally {
    let mut t = Tally::default();
    let mut first: std::collections::HashMap<u64, Option<String>> = std::collections::HashMap::new();
    let mut highest = None;
    for m in got {
        let Ok(seq) = m.payload.parse::<u64>() else { continue };
        let id = m.prop("holdfast-id").map(str::to_string);
        match first.get(&seq) {
            Some(prev) => {
                t.duplicated += 1;
                if *prev != id {
                    t.id_mismatch += 1;
                }
            }
            None => {
                if highest > Some(seq) {
                    t.reordered += 1;
                }
                highest = highest.max(Some(seq));
                first.insert(seq, id);
            }
        }
    }
    t.lost = acked.iter().filter(|s| !first.contains_key(s)).count();
    t
}
