//! `cargo xtask`: build, test, bench and demo for seb.

mod bench_admission;
mod bench_connect;
mod bench_execution;
mod bench_revocation;
mod bench_sab;
mod bench_verify;
mod demo;
mod demo_agent;
mod deploy_check;
mod ebpf;
mod fuzz;
mod image;
mod pod_rules;
mod stats;
mod toolchain;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail, ensure};
use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Build the eBPF object (installing its toolchain if needed) and the agent.
    Build {
        /// Fail if the committed eBPF object differs from a fresh build (CI).
        #[arg(long)]
        check: bool,
        /// Only the eBPF object (seb-agent/bpf/seb.bpf.o), not the agent.
        #[arg(long)]
        ebpf_only: bool,
    },
    /// Run every test, the privileged integration tests included (as root).
    Test,
    /// Run a benchmark; prints JSON.
    Bench { which: Bench },
    /// The whole flow on this node, narrated (a sandboxed cgroup and namespace).
    Demo,
    /// Fuzz the broker's parsers (cargo-fuzz, nightly): each target for `--seconds`.
    Fuzz {
        /// How long to run each target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Write the anchor and seed corpus instead (`seb-agent/fuzz/corpus/`).
        #[arg(long, conflicts_with = "target")]
        seed: bool,
        /// One target: frames, request, certificate or contract (all if none).
        target: Option<String>,
    },
    /// Render every kustomization under deploy/, validate every object offline and every pod
    /// spec against the API server's own rules, check the CRDs against the Rust types.
    DeployCheck,
    /// Build the container image without a container engine (an OCI image layout in
    /// target/image, tag `dev`: a static agent and nothing else) and check it with umoci.
    Image,
}

#[derive(Clone, Copy, ValueEnum)]
enum Bench {
    /// Added latency of connect() with the programs attached.
    Connect,
    /// Admission latency and throughput over the broker socket.
    Admission,
    /// Broker overhead per AWS mutation against direct calls with static credentials.
    Execution,
    /// From a cluster revocation applied on the node to the next denied admission and
    /// the kernel map update.
    Revocation,
    /// Records per second of `audit verify` over a 100,000-record store.
    Verify,
    /// SAB certify latency and certificates per second, with 1 and 1,000 policies.
    Sab,
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Task::Build { check, ebpf_only } => build(check, ebpf_only),
        Task::Test => test(),
        Task::Bench { which: Bench::Connect } => bench_connect::run(),
        Task::Bench { which: Bench::Admission } => bench_admission::run(),
        Task::Bench { which: Bench::Execution } => bench_execution::run(),
        Task::Bench { which: Bench::Revocation } => bench_revocation::run(),
        Task::Bench { which: Bench::Verify } => bench_verify::run(),
        Task::Bench { which: Bench::Sab } => bench_sab::run(),
        Task::Fuzz { seed: true, .. } => fuzz::seed(),
        Task::Fuzz { seconds, target, .. } => fuzz::run(seconds, target.as_deref()),
        Task::Demo => demo::run(),
        Task::DeployCheck => deploy_check::run_check(),
        Task::Image => image::build_and_check(),
    };
    if let Err(error) = result {
        eprintln!("xtask: {error:#}");
        std::process::exit(1);
    }
}

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

fn build(check: bool, ebpf_only: bool) -> Result<()> {
    ebpf::build(if check { ebpf::Mode::Check } else { ebpf::Mode::Update })?;
    if ebpf_only {
        return Ok(());
    }
    run(Command::new("cargo").current_dir(workspace_root()).args(["build", "--release", "-p", "seb-agent"]))
}

fn test() -> Result<()> {
    require_root()?;
    toolchain::ensure_packages(&[("ip", "iproute2"), ("nft", "nftables")])?;
    toolchain::ensure_moto()?;
    toolchain::ensure_python_test_packages()?;
    // In CI the committed object must be what the sources build; locally it is refreshed.
    ebpf::build(if in_ci() { ebpf::Mode::Check } else { ebpf::Mode::Update })?;
    let cargo = |args: &[&str]| run(Command::new("cargo").current_dir(workspace_root()).args(args));
    cargo(&["fmt", "--all", "--", "--check"]).context("formatting differs: run `cargo fmt --all`")?;
    cargo(&["clippy", "--workspace", "--all-targets", "--quiet", "--", "-D", "warnings"])?;
    deploy_check::run_check()?;
    cargo(&["test", "--workspace"])?;
    // A short slice of each fuzz target; longer runs are `cargo xtask fuzz`.
    fuzz::run(FUZZ_SLICE_SECONDS, None)
}

/// Seconds each fuzz target runs in `cargo xtask test`.
const FUZZ_SLICE_SECONDS: u64 = 12;

fn require_root() -> Result<()> {
    ensure!(
        nix_is_root(),
        "this task attaches eBPF programs and creates cgroups and network namespaces: run it as root"
    );
    Ok(())
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status.lines().find(|l| l.starts_with("Uid:")).map(|l| l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false)
}

/// For jobs that run sandboxes: root, iproute2, and release builds of the agent and
/// the probe; or, with `SEB_BENCH_BINARIES=<dir>`, the `seb-agent` and `seb-probe` in that
/// directory (a saved build, to compare against).
pub fn release_tools() -> Result<seb_sandbox::Tools> {
    require_root()?;
    toolchain::ensure_packages(&[("ip", "iproute2")])?;
    if let Some(dir) = std::env::var_os("SEB_BENCH_BINARIES") {
        eprintln!("xtask: using the binaries in {} (SEB_BENCH_BINARIES)", Path::new(&dir).display());
        return Ok(seb_sandbox::Tools::in_dir(Path::new(&dir)));
    }
    // Cargo's own progress shows: a first (cold) build takes several minutes.
    eprintln!("xtask: building seb-agent and seb-probe (release; several minutes the first time)");
    run(Command::new("cargo").current_dir(workspace_root()).args([
        "build",
        "--release",
        "-p",
        "seb-agent",
        "-p",
        "seb-tests",
        "--bins",
    ]))?;
    Ok(seb_sandbox::Tools::in_dir(&target_dir().join("release")))
}

/// Where cargo builds: `CARGO_TARGET_DIR` if set, else the workspace's `target/`.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| workspace_root().join("target"), PathBuf::from)
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

/// Run a command, inheriting stdio; fail with its name if it fails.
pub fn run(command: &mut Command) -> Result<()> {
    let status = command.status().with_context(|| format!("starting {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed with {status}");
    }
    Ok(())
}

/// Run a command and return its stdout.
pub fn output_of(command: &mut Command) -> Result<String> {
    let output = command.output().with_context(|| format!("starting {command:?}"))?;
    if !output.status.success() {
        bail!("{command:?} failed: {}", String::from_utf8_lossy(&output.stderr).trim());
    }
    Ok(String::from_utf8(output.stdout)?)
}
