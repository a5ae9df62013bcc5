//! `holdfast debug …` (hidden): tools for tests.

use std::path::Path;

use anyhow::{Result, anyhow};

pub(crate) fn outbox_fill(data_dir: &Path, writers: u32, lanes: u8, tag: &str) -> Result<()> {
    use std::io::Write as _;
    use std::sync::{Arc, Mutex};
    let store = holdfast_store::Store::open(&data_dir.join("store"))?;
    let outbox = Arc::new(holdfast_outbox::Outbox::open(
        &store,
        data_dir,
        crate::config::OutboxConfig::default(),
        Arc::new(holdfast_outbox::OutboxMetrics::default()),
        Arc::new(holdfast_outbox::SystemTimeSource),
    )?);
    let out = Arc::new(Mutex::new(std::io::stdout()));
    let threads: Vec<_> = (0..writers)
        .map(|w| {
            let (outbox, out, tag) = (outbox.clone(), out.clone(), tag.to_string());
            std::thread::spawn(move || -> Result<()> {
                for i in 0u64.. {
                    let lane = ((i + u64::from(w)) % u64::from(lanes)) as u8;
                    let payload = format!("{tag}:{w}:{i}");
                    let msg = Arc::new(holdfast_plugins::Message::new(
                        "fill",
                        payload.clone().into_bytes(),
                        "fill",
                    ));
                    let id = outbox.append_blocking(lane, msg, None)?;
                    let mut o = holdfast_model::lock(&out);
                    writeln!(o, "{} {} {payload}", id.lane, id.seq)?;
                    o.flush()?;
                }
                Ok(())
            })
        })
        .collect();
    for t in threads {
        t.join().map_err(|_| anyhow!("writer thread panicked"))??;
    }
    Ok(())
}
