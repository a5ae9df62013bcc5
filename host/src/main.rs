//! The `holdfast` binary: parses the command line and hands over to the library.

use std::process::ExitCode;

use clap::Parser;
use holdfast::cli::{Cli, Command};
use holdfast::config::Config;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run => run(cli.admin.config.as_deref()),
        _ => holdfast::cli::execute(cli),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(config_path: Option<&std::path::Path>) -> anyhow::Result<()> {
    // Everything the node writes (the store holds device keys) is readable
    // by its owner only.
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    let config = match config_path {
        Some(path) => Config::load(path)?,
        None => Config::embedded_default(),
    };
    let from_env = tracing_subscriber::EnvFilter::try_from_default_env().ok();
    let set_by_config = from_env.is_none();
    let filter = match from_env {
        Some(f) => f,
        None => tracing_subscriber::EnvFilter::try_new(&config.log.level)
            .map_err(|e| anyhow::anyhow!("config key log.level: {e}"))?,
    };
    use std::io::IsTerminal as _;
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    tracing_subscriber::registry()
        .with(filter)
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::stderr().is_terminal()),
        )
        .init();
    if set_by_config {
        holdfast::logging::install(Box::new(move |level| {
            let filter = tracing_subscriber::EnvFilter::try_new(level).map_err(|e| e.to_string())?;
            handle.reload(filter).map_err(|e| e.to_string())
        }));
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("holdfast")
        .build()?;
    let result = runtime.block_on(holdfast::node::run(config, shutdown_signal(), shutdown_signal()));
    // Blocking tasks still running (a plugin compile, a cache read) do not
    // hold the exit up: everything acknowledged is synced already.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    result?;
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(e) => {
                tracing::warn!("cannot listen for SIGTERM: {e}");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
