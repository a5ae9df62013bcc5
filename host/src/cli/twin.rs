//! `holdfast twin …`: device twins.

use anyhow::{Context, Result};
use clap::Subcommand;
use serde_json::Value;

use super::client::{AdminClient, segment};
use super::print::{print_json, str_of};

/// `holdfast twin …`
#[derive(Debug, Subcommand)]
pub enum TwinCommand {
    /// Show a twin: desired and reported properties and their versions.
    Show {
        /// Device id or `{device}/{module}`.
        id: String,
    },
    /// Merge a JSON patch into the desired properties (null deletes a key).
    /// Connected devices get the patch; gateways below get it over the link.
    SetDesired {
        /// Device id or `{device}/{module}`.
        id: String,
        /// The patch, e.g. '{"mode":"eco","fan":null}'.
        patch: String,
    },
}

pub(crate) fn twin_command(client: &AdminClient, cmd: TwinCommand, json: bool) -> Result<()> {
    let v = match cmd {
        TwinCommand::Show { id } => client.get(&format!("/api/v1/twins/{}", segment(&id)))?,
        TwinCommand::SetDesired { id, patch } => {
            let patch: Value = serde_json::from_str(&patch).context("the patch must be JSON")?;
            let v = client.post_json(&format!("/api/v1/twins/{}/desired", segment(&id)), &patch)?;
            if json {
                return print_json(&v);
            }
            outln!(
                "{id}: desired properties now at version {}",
                str_of(&v["desired_version"])
            );
            return Ok(());
        }
    };
    if json {
        return print_json(&v);
    }
    outln!("twin {}", str_of(&v["id"]));
    outln!(
        "desired (version {}, owned by {}):",
        str_of(&v["desired_version"]),
        str_of(&v["desired_owner"])
    );
    outln!("{}", serde_json::to_string_pretty(&v["desired"])?);
    outln!("reported (version {}):", str_of(&v["reported_version"]));
    outln!("{}", serde_json::to_string_pretty(&v["reported"])?);
    if !v["pending_upstream"].is_null() {
        outln!("not yet pushed upstream:");
        outln!("{}", serde_json::to_string_pretty(&v["pending_upstream"])?);
    }
    Ok(())
}
