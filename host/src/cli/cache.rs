//! `holdfast cache …`: the range cache.

use anyhow::{Result, bail};
use clap::Subcommand;
use serde_json::{Value, json};

use super::client::AdminClient;
use super::print::{bytes_of, print_json, print_list, print_table, str_of};

/// `holdfast cache …`
#[derive(Debug, Subcommand)]
pub enum CacheCommand {
    /// Totals: objects, bytes stored, budget, free space, fills in flight.
    Stats,
    /// Stored objects, largest first.
    Objects {
        /// Most objects to list.
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// Delete stored objects: one key, every key with a prefix, or all.
    Purge {
        /// A cache key, e.g. `debian:/debian/pool/main/c/curl/curl_8.deb`.
        #[arg(long, conflicts_with_all = ["prefix", "all"])]
        key: Option<String>,
        /// Every key starting with this, e.g. `debian:`.
        #[arg(long, conflicts_with = "all")]
        prefix: Option<String>,
        /// Everything.
        #[arg(long)]
        all: bool,
    },
}

pub(crate) fn cache_command(client: &AdminClient, cmd: CacheCommand, json: bool) -> Result<()> {
    match cmd {
        CacheCommand::Stats => {
            let v = client.get("/api/v1/cache")?;
            if json {
                return print_json(&v);
            }
            let bytes = |k: &str| bytes_of(&v[k]);
            print_table(
                &[
                    "listen", "objects", "stored", "answers", "max size", "min free", "free", "fills", "parent",
                ],
                &[vec![
                    str_of(&v["listen"]),
                    str_of(&v["objects"]),
                    bytes("stored_bytes"),
                    str_of(&v["stored_answers"]),
                    bytes("max_size"),
                    bytes("min_free"),
                    bytes("free_bytes"),
                    str_of(&v["fills_in_flight"]),
                    str_of(&v["parent"]),
                ]],
            );
        }
        CacheCommand::Objects { limit } => print_list(
            client,
            &format!("/api/v1/cache/objects?limit={limit}"),
            json,
            "objects",
            &["key", "stored", "length", "blocks", "class", "etag"],
            |o| {
                vec![
                    str_of(&o["key"]),
                    bytes_of(&o["stored_bytes"]),
                    bytes_of(&o["length"]),
                    str_of(&o["blocks"]),
                    str_of(&o["class"]),
                    str_of(&o["etag"]),
                ]
            },
        )?,
        CacheCommand::Purge { key, prefix, all } => {
            if key.is_none() && prefix.is_none() && !all {
                bail!("give --key, --prefix or --all");
            }
            let body = json!({ "key": key, "prefix": prefix, "all": all });
            let body = match body {
                Value::Object(m) => Value::Object(
                    m.into_iter()
                        .filter(|(_, v)| !v.is_null() && *v != json!(false))
                        .collect(),
                ),
                other => other,
            };
            let v = client.post_json("/api/v1/cache/purge", &body)?;
            if json {
                return print_json(&v);
            }
            outln!("purged {} objects ({})", str_of(&v["objects"]), bytes_of(&v["bytes"]));
        }
    }
    Ok(())
}
