//! `holdfast link status`: the upstream link and the children.

use anyhow::Result;

use super::client::AdminClient;
use super::print::{format_time, print_json, print_table, str_of};

pub(crate) fn link_status(client: &AdminClient, json: bool) -> Result<()> {
    let v = client.get("/api/v1/link")?;
    if json {
        return print_json(&v);
    }
    let l = &v["link"];
    let kind = str_of(&l["kind"]);
    if kind == "none" {
        outln!("upstream: none (root)");
    } else {
        outln!("upstream: {kind} {}", str_of(&l["target"]));
        outln!(
            "state:    {} since {}",
            str_of(&l["state"]),
            format_time(l["since_ms"].as_u64())
        );
        outln!(
            "connects: {}   failures: {}   sent: {}   acked: {}   window: {}",
            l["connects"],
            l["failures"],
            l["sent"],
            l["acked"],
            l["window"]
        );
        if let Some(e) = l["last_error"].as_str() {
            outln!("last error: {e}");
        }
    }
    if let Some(addr) = v["listen"].as_str() {
        outln!("children listen on {addr} (udp)");
        let rows: Vec<Vec<String>> = l["children"]
            .as_object()
            .map(|o| {
                o.iter()
                    .map(|(id, c)| {
                        vec![
                            id.clone(),
                            str_of(&c["addr"]),
                            format_time(c["since_ms"].as_u64()),
                            c["received"].to_string(),
                        ]
                    })
                    .collect()
            })
            .unwrap_or_default();
        print_table(&["CHILD", "ADDRESS", "SINCE", "RECEIVED"], &rows);
    }
    Ok(())
}
