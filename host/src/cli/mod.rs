//! The `holdfast` command line. Every admin operation goes through the
//! admin API; `anyhow` is used here only, at the top.

use std::io::Read as _;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use serde_json::{Value, json};

use crate::config::Config;
use crate::scaffold;

/// `println!` for command output. A closed pipe (`holdfast queue | head -2`)
/// ends the process quietly with status 0 instead of a panic.
macro_rules! outln {
    () => {
        $crate::cli::write_out(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::cli::write_out(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// `print!` for command output; see [`outln!`].
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::cli::write_out(format_args!($($arg)*))
    };
}

mod args;
mod cache;
mod client;
mod deadletter;
mod debug;
mod deploy;
mod device;
mod fleet;
mod import;
mod link;
mod ops;
mod plugin;
mod print;
mod twin;

pub use self::args::{
    AdminArgs, CertCommand, Cli, Command, ConfigCommand, DebugCommand, FleetCommand, LinkCommand, MethodCommand,
    QueueCommand,
};
pub use self::cache::CacheCommand;
pub use self::client::AdminClient;
use self::client::segment;
pub use self::deadletter::DeadLetterCommand;
pub use self::deploy::DeployCommand;
pub use self::device::DeviceCommand;
pub use self::plugin::PluginCommand;
use self::print::{print_json, str_of};
pub use self::twin::TwinCommand;

/// Writes command output to stdout. When the reader has gone (EPIPE) the
/// command has nothing left to do: the process exits with status 0, without
/// the panic `println!` would raise. Any other write error exits with 1.
pub(crate) fn write_out(args: std::fmt::Arguments<'_>) {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = stdout.write_fmt(args).and_then(|()| stdout.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("error: cannot write to stdout: {e}");
        std::process::exit(1);
    }
}
pub use self::ops::INIT_CONFIG;

/// Runs a parsed command line (everything except `run`, which `main` owns).
///
/// # Errors
/// Whatever the command hit, with context.
pub fn execute(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Run => bail!("`run` is handled by main"),
        Command::Init { path, force } => ops::init(&path, force),
        Command::Status => ops::status(&AdminClient::discover(&cli.admin)?, cli.admin.json),
        Command::Queue { command } => {
            let client = AdminClient::discover(&cli.admin)?;
            match command.unwrap_or(QueueCommand::List) {
                QueueCommand::List => ops::queue(&client, cli.admin.json),
                QueueCommand::WaitEmpty {
                    lane,
                    timeout,
                    interval_ms,
                } => ops::wait_empty(
                    &client,
                    lane,
                    timeout.map(Duration::from_secs),
                    Duration::from_millis(interval_ms),
                    cli.admin.json,
                ),
            }
        }
        Command::Fleet {
            command,
            state,
            label,
            subtree,
            search,
            watch,
        } => {
            let client = AdminClient::discover(&cli.admin)?;
            match command {
                Some(FleetCommand::Forget { node }) => fleet::forget(&client, &node, cli.admin.json),
                None => fleet::fleet(
                    &client,
                    &fleet::Query {
                        states: state,
                        labels: label,
                        subtree,
                        search,
                    },
                    watch,
                    cli.admin.json,
                ),
            }
        }
        Command::Clients { limit } => ops::clients(&AdminClient::discover(&cli.admin)?, limit, cli.admin.json),
        Command::Config(ConfigCommand::Check { file }) => {
            Config::load(&file)?;
            outln!("{}: ok", file.display());
            Ok(())
        }
        Command::Config(ConfigCommand::Default) => {
            out!("{}", crate::config::EMBEDDED_DEFAULT);
            Ok(())
        }
        Command::Passwd => {
            let mut password = String::new();
            std::io::stdin()
                .read_to_string(&mut password)
                .context("reading the password from stdin")?;
            let password = password.trim_end_matches(['\n', '\r']);
            if password.is_empty() {
                bail!("empty password on stdin");
            }
            let hash = holdfast_model::identity::hash_password(password).map_err(|e| anyhow!("hashing failed: {e}"))?;
            outln!("{hash}");
            Ok(())
        }
        Command::Plugin(PluginCommand::New {
            kind,
            name,
            dir,
            sdk_path,
        }) => {
            let sdk = sdk_path.or_else(scaffold::default_sdk_path);
            let path = scaffold::create(kind, &name, &dir, sdk.as_deref())?;
            outln!("created {}", path.display());
            outln!(
                "next: cd {} && cargo build --target wasm32-wasip2 --release",
                path.display()
            );
            outln!(
                "then: holdfast plugin swap {} target/wasm32-wasip2/release/{}.wasm",
                kind.slot(),
                name.replace('-', "_")
            );
            Ok(())
        }
        Command::Debug(DebugCommand::OutboxFill {
            data_dir,
            writers,
            lanes,
            tag,
        }) => debug::outbox_fill(&data_dir, writers, lanes.clamp(1, 10), &tag),
        Command::Plugin(cmd) => {
            let client = AdminClient::discover(&cli.admin)?;
            plugin::plugin_command(&client, cmd, cli.admin.json)
        }
        Command::Cert(CertCommand::Ca { dir, name, days, force }) => {
            let (cert, key) = holdfast_tls::issue::ca(&dir, &name, days, force)?;
            outln!("fleet CA: {} (key {}, keep it safe)", cert.display(), key.display());
            Ok(())
        }
        Command::Cert(CertCommand::Node {
            node_id,
            ca_dir,
            out,
            days,
            force,
        }) => {
            let out = out.unwrap_or_else(|| ca_dir.clone());
            let (cert, key) = holdfast_tls::issue::node(&ca_dir, &out, &node_id, days, force)?;
            outln!("node {node_id}: {} (key {})", cert.display(), key.display());
            Ok(())
        }
        Command::Link(LinkCommand::Status) => {
            let client = AdminClient::discover(&cli.admin)?;
            link::link_status(&client, cli.admin.json)
        }
        Command::Device(cmd) => {
            let client = AdminClient::discover(&cli.admin)?;
            device::device_command(&client, cmd, cli.admin.json)
        }
        Command::Twin(cmd) => {
            let client = AdminClient::discover(&cli.admin)?;
            twin::twin_command(&client, cmd, cli.admin.json)
        }
        Command::Cache(cmd) => {
            let client = AdminClient::discover(&cli.admin)?;
            cache::cache_command(&client, cmd, cli.admin.json)
        }
        Command::DeadLetter(cmd) => {
            let client = AdminClient::discover(&cli.admin)?;
            deadletter::dead_letter_command(&client, cmd, cli.admin.json)
        }
        Command::Import(cmd) => import::import_command(cmd, cli.admin.json),
        Command::Deploy(cmd) => {
            let client = AdminClient::discover(&cli.admin)?;
            deploy::deploy_command(&client, cmd, cli.admin.json)
        }
        Command::Reload => {
            let client = AdminClient::discover(&cli.admin)?;
            let v = client.post_json("/api/v1/reload", &json!({}))?;
            if cli.admin.json {
                return print_json(&v);
            }
            outln!("reloaded {}", str_of(&v["path"]));
            for (title, key) in [
                ("applied live", "applied"),
                ("needs a restart", "not_applied"),
                ("failed (old value kept)", "failed"),
            ] {
                let items: Vec<String> = v[key]
                    .as_array()
                    .map(|a| a.iter().map(str_of).collect())
                    .unwrap_or_default();
                if !items.is_empty() {
                    outln!("{title}:");
                    for i in items {
                        outln!("  {i}");
                    }
                }
            }
            Ok(())
        }
        Command::Method(MethodCommand::Invoke {
            target,
            name,
            payload,
            timeout,
        }) => {
            let client = AdminClient::discover(&cli.admin)?;
            let payload: Value = match payload {
                Some(p) => serde_json::from_str(&p).context("the payload must be JSON")?,
                None => Value::Null,
            };
            let body = serde_json::json!({ "payload": payload, "timeout_s": timeout });
            let v = client.post_json(
                &format!("/api/v1/devices/{}/methods/{}", segment(&target), segment(&name)),
                &body,
            )?;
            if cli.admin.json {
                return print_json(&v);
            }
            outln!("status {}", str_of(&v["status"]));
            outln!("{}", serde_json::to_string_pretty(&v["payload"])?);
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::print::format_time;
    use super::*;

    #[test]
    fn dates_render_in_utc() {
        assert_eq!(format_time(Some(0)), "1970-01-01T00:00:00Z");
        assert_eq!(format_time(Some(1_700_000_000_000)), "2023-11-14T22:13:20Z");
        assert_eq!(format_time(Some(951_782_400_000)), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn cli_parses() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from(["holdfast", "plugin", "swap", "router", "x.wasm", "--json"]).unwrap();
        assert!(cli.admin.json);
        assert!(Cli::try_parse_from(["holdfast", "plugin", "swap", "nope", "x.wasm"]).is_err());
    }
}
