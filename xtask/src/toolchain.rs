//! Installing what the eBPF build needs, idempotently: nightly's `rust-src` (for
//! `-Z build-std=core`) and `bpf-linker` linked against rustc's own LLVM.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use crate::{output_of, run, workspace_root};

pub const NIGHTLY: &str = "nightly";
/// The bpf-linker release the committed object was linked with.
const BPF_LINKER_VERSION: &str = "0.13.0";

/// Whether the eBPF toolchain is usable after trying to install it; `Err` explains why not.
pub fn ensure_ebpf_toolchain() -> Result<()> {
    let rustc = output_of(Command::new("rustc").args([&format!("+{NIGHTLY}"), "-vV"]))
        .context("the nightly toolchain is not installed (rustup toolchain install nightly)")?;
    run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", NIGHTLY]))
        .context("installing nightly's rust-src")?;
    if bpf_linker_ready() {
        return Ok(());
    }
    let llvm_major = llvm_major(&rustc)?;
    let prefix = llvm_prefix()?;
    eprintln!("xtask: installing bpf-linker {BPF_LINKER_VERSION} against rustc's LLVM {llvm_major}");
    run(Command::new("cargo")
        .args([&format!("+{NIGHTLY}"), "install", "bpf-linker", "--locked", "--version", BPF_LINKER_VERSION])
        .args(["--no-default-features", "--features", &format!("llvm-{llvm_major}")])
        .env("LLVM_PREFIX", &prefix))
    .context("installing bpf-linker")?;
    Ok(())
}

/// cargo-fuzz, for the fuzz targets: nightly (the eBPF build's), and cargo-fuzz itself,
/// each installed when missing.
pub fn ensure_fuzz_toolchain() -> Result<()> {
    if output_of(Command::new("rustc").args([&format!("+{NIGHTLY}"), "-vV"])).is_err() {
        eprintln!("xtask: installing the {NIGHTLY} toolchain (cargo-fuzz needs it)");
        run(Command::new("rustup").args(["toolchain", "install", NIGHTLY, "--profile", "minimal"]))
            .context("installing the nightly toolchain")?;
    }
    if output_of(Command::new("cargo").args([&format!("+{NIGHTLY}"), "fuzz", "--version"])).is_ok() {
        return Ok(());
    }
    eprintln!("xtask: installing cargo-fuzz");
    run(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"])).context("installing cargo-fuzz")
}

/// bpf-linker loads rustc's own libLLVM, which only rustup's nightly environment puts on
/// the library path: ask through it, as the eBPF build will run it.
fn bpf_linker_ready() -> bool {
    output_of(Command::new("rustup").args(["run", NIGHTLY, "bpf-linker", "--version"]))
        .is_ok_and(|v| v.contains(BPF_LINKER_VERSION))
}

fn llvm_major(rustc_verbose: &str) -> Result<String> {
    let line = rustc_verbose
        .lines()
        .find_map(|line| line.strip_prefix("LLVM version: "))
        .context("`rustc +nightly -vV` does not name its LLVM version")?;
    Ok(line.split('.').next().unwrap_or(line).to_string())
}

/// A prefix whose lib/libLLVM.so is rustc's own LLVM, for bpf-linker's build to link.
fn llvm_prefix() -> Result<PathBuf> {
    let sysroot = output_of(Command::new("rustc").args([&format!("+{NIGHTLY}"), "--print", "sysroot"]))?;
    let lib = Path::new(sysroot.trim()).join("lib");
    let llvm = std::fs::read_dir(&lib)?
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .find(|path| path.file_name().is_some_and(|n| n.to_string_lossy().starts_with("libLLVM.so.")))
        .with_context(|| format!("no libLLVM.so.* in {}", lib.display()))?;
    let prefix = workspace_root().join("target/llvm-prefix");
    std::fs::create_dir_all(prefix.join("lib"))?;
    let link = prefix.join("lib/libLLVM.so");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&llvm, &link)?;
    Ok(prefix)
}

/// Debian packages the tests, bench and demo use; installed only when missing.
pub fn ensure_packages(packages: &[(&str, &str)]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .filter(|(command, _)| {
            Command::new("sh")
                .args(["-c", &format!("command -v {command}")])
                .output()
                .map_or(true, |o| !o.status.success())
        })
        .map(|(_, package)| *package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("xtask: installing {}", missing.join(" "));
    run(Command::new("apt-get").arg("update").arg("-qq"))?;
    let status = Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()?;
    if !status.success() {
        bail!("apt-get install {} failed", missing.join(" "));
    }
    Ok(())
}

/// moto, the AWS API emulator the execution tests and the demo use as the production API.
pub fn ensure_moto() -> Result<()> {
    if Command::new("moto_server").arg("--help").output().is_ok_and(|o| o.status.success()) {
        return Ok(());
    }
    eprintln!("xtask: installing moto[server] (the AWS API emulator)");
    run(Command::new("python3").args(["-m", "pip", "install", "--quiet", "moto[server]>=5.1,<6"]))
        .context("installing moto[server] with pip")
}

/// What the clients' suites need: pytest, and the `mcp` package as the MCP client that
/// drives `seb-agent mcp`.
pub fn ensure_python_test_packages() -> Result<()> {
    if Command::new("python3")
        .args(["-c", "import pytest, mcp.client.stdio"])
        .output()
        .is_ok_and(|o| o.status.success())
    {
        return Ok(());
    }
    eprintln!("xtask: installing pytest and mcp (the clients' test suites)");
    run(Command::new("python3").args(["-m", "pip", "install", "--quiet", "pytest>=7", "mcp>=2.3,<3"]))
        .context("installing pytest and mcp with pip")
}
