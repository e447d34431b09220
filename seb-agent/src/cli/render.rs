//! The text a person reads for each broker answer (`--json` prints the answer itself).

use std::io::{self, Write};

use crate::{
    admission::{Decision, state::Epochs},
    audit::KernelDenial,
    execute::passthrough::ReadResult,
    protocol::StatusReport,
};

fn or_unset(value: Option<u64>) -> String {
    value.map_or_else(|| "unset".into(), |v| v.to_string())
}

pub fn epochs(out: &mut dyn Write, epochs: &Epochs) -> io::Result<()> {
    writeln!(out, "policy epoch {}, revocation epoch {}", or_unset(epochs.policy), or_unset(epochs.revocation))
}

pub fn decision(out: &mut dyn Write, decision: &Decision) -> io::Result<()> {
    let verdict = if decision.admitted { "ADMITTED" } else { "DENIED" };
    writeln!(out, "{verdict} ({}): {}", decision.reason, decision.message)?;
    writeln!(out, "  decision {} (audit record {})", decision.decision_id, decision.record_seq)?;
    if let Some(serial) = &decision.serial {
        writeln!(out, "  certificate serial {serial}")?;
    }
    if let Some(contract) = &decision.contract_id {
        writeln!(out, "  contract {contract}")?;
    }
    if let Some(outcome) = &decision.outcome {
        let api = outcome.api_status.map(|s| format!(", API status {s}")).unwrap_or_default();
        writeln!(
            out,
            "  outcome {}{api} in {:.0} ms (audit record {})",
            outcome.status, outcome.duration_ms, outcome.record_seq
        )?;
        if let Some(error) = &outcome.error {
            writeln!(out, "  {error}")?;
        }
    }
    Ok(())
}

pub fn read(out: &mut dyn Write, read: &ReadResult) -> io::Result<()> {
    writeln!(out, "status {}, state digest {}", read.status, read.state_digest)?;
    match (&read.body, &read.body_hex) {
        (Some(body), _) => writeln!(out, "{body}"),
        (None, Some(hex)) => writeln!(out, "(binary body, hex) {hex}"),
        (None, None) => Ok(()),
    }
}

pub fn denial(d: &KernelDenial) -> String {
    let destination = if d.address.contains(':') {
        format!("[{}]:{}", d.address, d.port)
    } else {
        format!("{}:{}", d.address, d.port)
    };
    let who = d.comm.as_deref().unwrap_or("-");
    let pid = d.tgid.map_or_else(|| "-".into(), |t| t.to_string());
    format!(
        "{} {} {destination} {} by {who} (pid {pid}, cgroup {})",
        d.time,
        d.hook,
        d.protocol,
        d.cgroup_path.as_deref().unwrap_or("-")
    )
}

pub fn status(out: &mut dyn Write, report: &StatusReport) -> io::Result<()> {
    writeln!(out, "seb-agent {}: {}", report.version, if report.ready { "ready" } else { "NOT READY" })?;
    epochs(out, &report.epochs)?;
    writeln!(out, "links ({}):", report.links.len())?;
    for link in &report.links {
        let cgroup = if link.is_global() { "(global)".into() } else { link.cgroup.display().to_string() };
        writeln!(out, "  {:<24} {cgroup}  pinned at {}", link.program, link.pin.display())?;
    }
    let integrity = &report.integrity;
    if integrity.checked_at.is_empty() {
        writeln!(out, "integrity: not checked yet")?;
    } else {
        let state = if integrity.intact { "intact" } else { "DIVERGED" };
        writeln!(
            out,
            "integrity: {state} (checked {}; {} checks found tampering)",
            integrity.checked_at, integrity.tampered_checks
        )?;
    }
    if !integrity.last_findings.is_empty() {
        let repaired = if integrity.repaired { "repaired" } else { "NOT repaired" };
        writeln!(out, "  last findings at {} ({repaired}):", integrity.last_findings_at)?;
        for finding in &integrity.last_findings {
            writeln!(out, "    {} {}: {}", finding.kind, finding.object, finding.problem)?;
        }
    }
    writeln!(out, "map entries:")?;
    for (map, count) in &report.map_entries {
        writeln!(out, "  {map:<28} {count}")?;
    }
    writeln!(out, "ring buffer events lost: {}", report.ring_lost_total)?;
    match &report.last_denial {
        Some(d) => writeln!(out, "last kernel denial: {}", denial(d))?,
        None => writeln!(out, "last kernel denial: none")?,
    }
    if let Some(cluster) = &report.cluster {
        let yes_no = |b: bool| if b { "yes" } else { "no" };
        writeln!(
            out,
            "cluster: node {}, synced {}, settled {}",
            cluster.node,
            yes_no(cluster.synced),
            yes_no(cluster.settled)
        )?;
        if let Some(age) = cluster.api_age_seconds {
            writeln!(out, "  API server last answered {age:.1} s ago")?;
        }
        if let Some(stale) = &cluster.stale {
            writeln!(out, "  admissions denied: {stale}")?;
        }
    }
    Ok(())
}
