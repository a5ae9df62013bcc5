//! What arrives where: a subscriber that collects everything, and the
//! check of arrivals against what was acknowledged.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::client::{Client, Received};

/// Collects everything a persistent QoS 1 subscriber at `port` receives.
pub struct Consumer {
    got: Arc<Mutex<Vec<Received>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Consumer {
    pub fn start(port: u16, id: &str, filter: &str) -> Consumer {
        // A broker that has just started may still refuse the first connection.
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut client = loop {
            match Client::connect(port, id, false).and_then(|mut c| c.subscribe(filter).map(|_| c)) {
                Ok(c) => break c,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("consumer {id}: {e}; retrying");
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => panic!("consumer {id} cannot connect to {port}: {e}"),
            }
        };
        let got = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (g, s) = (got.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match client.recv(Duration::from_millis(100)) {
                    Ok(Some(m)) => g.lock().unwrap().push(m),
                    Ok(None) => {}
                    Err(e) => panic!("consumer: {e}"),
                }
            }
        });
        Consumer {
            got,
            stop,
            thread: Some(thread),
        }
    }

    pub fn len(&self) -> usize {
        self.got.lock().unwrap().len()
    }

    pub fn messages(&self) -> Vec<Received> {
        self.got.lock().unwrap().clone()
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Checks what arrived against what was acknowledged: nothing acknowledged
/// is missing, first arrivals are in publish order, and every duplicate
/// carries the id of its first arrival. Returns the number of duplicates.
pub fn check_delivery(acked: &[u64], got: &[Received]) -> usize {
    let mut first: std::collections::HashMap<u64, String> = std::collections::HashMap::new();
    let mut last_new = None;
    let mut dups = 0;
    for m in got {
        let seq: u64 = m.payload.parse().unwrap();
        let id = m.prop("holdfast-id").expect("holdfast-id").to_string();
        match first.get(&seq) {
            Some(prev) => {
                assert_eq!(prev, &id, "duplicate of {seq} has another id");
                dups += 1;
            }
            None => {
                assert!(last_new < Some(seq), "{seq} arrived after {last_new:?}: order broken");
                last_new = Some(seq);
                first.insert(seq, id);
            }
        }
    }
    let missing: Vec<&u64> = acked.iter().filter(|s| !first.contains_key(s)).collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged messages lost, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    let ids: std::collections::HashSet<&String> = first.values().collect();
    assert_eq!(ids.len(), first.len(), "two messages share an id");
    dups
}
