//! `cargo xtask demo`: the whole flow on this node, narrated step by step.
//!
//! Runs in a sandbox (a dedicated cgroup subtree and network namespace, loopback
//! addresses only), so nothing on the machine outside it is touched.

use std::process::Command;

use anyhow::{Context, Result, ensure};
use seb_sandbox::{Sandbox, Tools, parse_json_output};

use crate::{toolchain, workspace_root};

/// The stand-in production API endpoint inside the demo's namespace.
const API: &str = "127.0.0.2:8443";

pub fn run() -> Result<()> {
    crate::require_root()?;
    toolchain::ensure_packages(&[("ip", "iproute2")])?;
    crate::run(Command::new("cargo").current_dir(workspace_root()).args([
        "build",
        "--release",
        "--quiet",
        "-p",
        "seb-agent",
        "-p",
        "seb-tests",
        "--bins",
    ]))?;
    let tools = Tools::in_dir(&workspace_root().join("target/release"));

    step("1. A sandbox: its own cgroup subtree and network namespace");
    let mut sandbox = Sandbox::new("demo", tools)?;
    sandbox.write_config("[[enforcement.protected]]\ncidr = \"127.0.0.2/32\"\nport = 8443\nprotocol = \"tcp\"\n")?;
    sandbox.listen(API.parse()?)?;
    say(&format!("cgroup  {}  (broker/, workload/, exempt/ below it)", sandbox.cgroup.display()));
    say(&format!("netns   {}", sandbox.netns));
    say(&format!("a stand-in production API listens on {API}"));
    say(&format!("config  {}:", sandbox.config.display()));
    for line in std::fs::read_to_string(&sandbox.config)?.lines().filter(|l| !l.is_empty()) {
        say(&format!("        {line}"));
    }

    step("2. Start the broker: seb-agent run");
    sandbox.start_agent()?;
    for link in sandbox.pinned_links()? {
        say(&format!("pinned link {}/links/{link}", sandbox.pin_path.display()));
    }

    step("3. A workload in the enforced cgroup calls the API directly");
    let direct = sandbox.attempt("workload", "tcp", API)?;
    say(&format!("connect({API}) -> {}", direct["result"]));
    ensure!(direct["result"] == "EPERM", "the kernel should have refused the workload: {direct}");

    step("4. The broker reaches the same API as itself");
    let probe = parse_json_output(&sandbox.agent_cli(&["probe-egress", API])?, "probe-egress")?;
    say(&format!("seb-agent probe-egress {API} -> connected: {}", probe["connected"]));
    ensure!(probe["connected"] == true, "the broker should get through: {probe}");

    step("5. Kill the broker with SIGKILL: enforcement stays in the kernel");
    sandbox.kill_agent()?;
    let while_down = sandbox.attempt("workload", "tcp", API)?;
    say(&format!("agent dead; connect({API}) -> {}", while_down["result"]));
    ensure!(while_down["result"] == "EPERM", "enforcement must survive the agent: {while_down}");

    step("6. Restart it: the pinned programs are re-adopted, the missed denial is recorded");
    let logs = sandbox.start_agent()?;
    if let Some(active) = logs.iter().find(|l| l["fields"]["message"] == "kernel enforcement active") {
        say(&format!("links: {}, adopted: {}", active["fields"]["links"], active["fields"]["adopted"]));
    }
    let cookie = while_down["cookie"].as_u64().context("no socket cookie")?;
    sandbox.wait_for_denial(cookie)?;

    step("7. What a security team sees: seb-agent denials");
    let table = sandbox.agent_cli(&["denials"])?;
    print!("{}", String::from_utf8_lossy(&table.stdout));
    say("(seb-agent denials --json gives the same records as JSON lines)");

    step("Done: the sandbox is removed");
    Ok(())
}

fn step(title: &str) {
    println!("\n== {title}");
}

fn say(line: &str) {
    println!("   {line}");
}
