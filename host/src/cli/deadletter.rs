//! `holdfast dead-letter …`: what the node could not route or deliver.

use anyhow::{Result, bail};
use clap::Subcommand;
use serde_json::{Value, json};

use super::client::AdminClient;
use super::print::{bytes_of, format_time, print_json, print_table, rows_of, str_of};

/// `holdfast dead-letter …`
#[derive(Debug, Subcommand)]
pub enum DeadLetterCommand {
    /// Dead letters, oldest first: id, reason, topic, lane, when, size.
    List {
        /// List entries with ids above this one.
        #[arg(long)]
        after: Option<u64>,
        /// Most entries to list.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// One dead letter with its payload and properties.
    Show {
        /// Its id (from `list`).
        id: u64,
    },
    /// Replay: an entry from an outbox lane goes back to that lane, one the
    /// router failed on is routed again as if published; with --to-topic,
    /// it is published on that topic. A replayed entry leaves the store.
    Replay {
        /// Its id (from `list`).
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        id: Option<u64>,
        /// Every entry.
        #[arg(long)]
        all: bool,
        /// Publish on this topic instead of sending it where it was going.
        #[arg(long)]
        to_topic: Option<String>,
    },
    /// Delete one entry, or every entry.
    Purge {
        /// Its id (from `list`).
        #[arg(conflicts_with = "all")]
        id: Option<u64>,
        /// Every entry.
        #[arg(long)]
        all: bool,
    },
}

pub(crate) fn dead_letter_command(client: &AdminClient, cmd: DeadLetterCommand, json: bool) -> Result<()> {
    match cmd {
        DeadLetterCommand::List { after, limit } => {
            let after = after.map(|a| format!("&after={a}")).unwrap_or_default();
            let v = client.get(&format!("/api/v1/dead-letter?limit={limit}{after}"))?;
            if json {
                return print_json(&v);
            }
            outln!(
                "{} dead letters, {} (quota {} messages, {})",
                str_of(&v["messages"]),
                bytes_of(&v["bytes"]),
                str_of(&v["max_messages"]),
                bytes_of(&v["max_bytes"]),
            );
            print_table(
                &["id", "reason", "detail", "topic", "lane", "at", "payload"],
                &rows_of(&v, "entries", |e| {
                    vec![
                        str_of(&e["id"]),
                        str_of(&e["reason"]),
                        str_of(&e["detail"]),
                        str_of(&e["topic"]),
                        str_of(&e["lane"]),
                        format_time(e["at_ms"].as_u64()),
                        bytes_of(&e["payload_bytes"]),
                    ]
                }),
            );
        }
        DeadLetterCommand::Show { id } => {
            let v = client.get(&format!("/api/v1/dead-letter/{id}"))?;
            if json {
                return print_json(&v);
            }
            let field = |k: &str, value: String| outln!("{k:<13} {value}");
            field("id", str_of(&v["id"]));
            field("reason", format!("{} ({})", str_of(&v["reason"]), str_of(&v["detail"])));
            field("at", format_time(v["at_ms"].as_u64()));
            field("topic", str_of(&v["topic"]));
            field("lane", str_of(&v["lane"]));
            field("qos", str_of(&v["qos"]));
            field("retain", str_of(&v["retain"]));
            field("content type", str_of(&v["content_type"]));
            field("client", str_of(&v["client_id"]));
            for p in v["properties"].as_array().into_iter().flatten() {
                field("property", format!("{}={}", str_of(&p[0]), str_of(&p[1])));
            }
            match v["payload"].as_str() {
                Some(text) => field("payload", text.to_string()),
                None => field("payload", format!("(base64) {}", str_of(&v["payload_base64"]))),
            }
        }
        DeadLetterCommand::Replay { id, all, to_topic } => {
            let body = match &to_topic {
                Some(t) => json!({ "to_topic": t }),
                None => json!({}),
            };
            let v = match (id, all) {
                (_, true) => client.post_json("/api/v1/dead-letter/replay", &body)?,
                (Some(id), false) => client.post_json(&format!("/api/v1/dead-letter/{id}/replay"), &body)?,
                (None, false) => bail!("give an id or --all"),
            };
            if json {
                return print_json(&v);
            }
            if all {
                outln!("replayed {}", str_of(&v["replayed"]));
                for f in v["failed"].as_array().into_iter().flatten() {
                    outln!("not replayed: {}: {}", str_of(&f["id"]), str_of(&f["error"]));
                }
            } else {
                outln!("replayed {} to {}", str_of(&v["id"]), str_of(&v["replayed_to"]));
            }
        }
        DeadLetterCommand::Purge { id, all } => {
            let v: Value = match (id, all) {
                (_, true) => client.delete("/api/v1/dead-letter")?,
                (Some(id), false) => client.delete(&format!("/api/v1/dead-letter/{id}"))?,
                (None, false) => bail!("give an id or --all"),
            };
            if json {
                return print_json(&v);
            }
            outln!("purged {}", str_of(&v["purged"]));
        }
    }
    Ok(())
}
