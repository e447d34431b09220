//! `seb-agent denials`: kernel denials from the audit store, for a security team.

use std::{io::Write, path::Path, time::Duration};

use anyhow::Result;

use crate::{
    audit::{AuditStore, CheckedReader, KernelDenial, Record, denial},
    cli::output::printable,
};

const PAGE: usize = 1000;
const FOLLOW_INTERVAL: Duration = Duration::from_millis(200);

/// Print denials (JSON lines, or a table); with `follow`, keep printing new ones.
pub fn print(database: &Path, json: bool, follow: bool, out: &mut impl Write) -> Result<()> {
    let store = AuditStore::open_read_only(database)?;
    if !json {
        writeln!(
            out,
            "{:<35} {:<9} {:>8} {:<16} {:<40} {:<6} {:<28}",
            "TIME", "HOOK", "PID", "COMM", "DESTINATION", "PROTO", "CGROUP"
        )?;
    }
    // Every record is read, each checked to link to the one before it (see
    // `CheckedReader`); the denials among them are printed.
    let mut reader = CheckedReader::after(&store, 0)?;
    loop {
        let records = reader.next_page(PAGE)?;
        for stored in records.iter().filter(|stored| stored.kind == denial::KIND) {
            let denial: KernelDenial = Record::from(stored).parse()?;
            if json {
                serde_json::to_writer(&mut *out, &denial)?;
                writeln!(out)?;
            } else {
                writeln!(out, "{}", printable(&table_row(&denial)))?;
            }
        }
        out.flush()?;
        if records.len() == PAGE {
            continue;
        }
        if !follow {
            return reader.intact();
        }
        std::thread::sleep(FOLLOW_INTERVAL);
    }
}

fn table_row(d: &KernelDenial) -> String {
    let destination = if d.address.contains(':') {
        format!("[{}]:{}", d.address, d.port)
    } else {
        format!("{}:{}", d.address, d.port)
    };
    format!(
        "{:<35} {:<9} {:>8} {:<16} {:<40} {:<6} {:<28}",
        d.time,
        d.hook,
        d.tgid.map_or("-".into(), |t| t.to_string()),
        d.comm.as_deref().unwrap_or("-"),
        destination,
        d.protocol,
        d.cgroup_path.as_deref().unwrap_or("-"),
    )
}
