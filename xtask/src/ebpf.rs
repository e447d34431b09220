//! Building the eBPF object and keeping the committed copy honest (the bpf2go
//! convention: the object is committed so the agent builds anywhere; CI rebuilds it
//! wherever the toolchain is available and fails if the two differ).

use std::{path::PathBuf, process::Command};

use anyhow::{Context, Result, bail};

use crate::{run, toolchain, workspace_root};

/// The committed object the agent embeds.
pub fn committed_object() -> PathBuf {
    workspace_root().join("seb-agent/bpf/seb.bpf.o")
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Rebuild and update the committed object.
    Update,
    /// Rebuild and fail if the committed object differs.
    Check,
}

pub fn build(mode: Mode) -> Result<()> {
    if let Err(why) = toolchain::ensure_ebpf_toolchain() {
        if std::env::var_os("SEB_REQUIRE_EBPF_TOOLCHAIN").is_some() {
            return Err(why.context("the eBPF toolchain is required here (SEB_REQUIRE_EBPF_TOOLCHAIN)"));
        }
        eprintln!(
            "xtask: WARNING: cannot build the eBPF object here ({why:#}); using the committed {}",
            committed_object().display()
        );
        return Ok(());
    }
    let dir = workspace_root().join("seb-ebpf");
    let mut cargo = Command::new("cargo");
    cargo.current_dir(&dir).args([&format!("+{}", toolchain::NIGHTLY), "build", "--release"]);
    // Settings of the outer (stable) cargo must not leak into the nightly BPF build.
    for var in
        ["RUSTUP_TOOLCHAIN", "RUSTC", "RUSTC_WRAPPER", "RUSTFLAGS", "CARGO_ENCODED_RUSTFLAGS", "CARGO_TARGET_DIR"]
    {
        cargo.env_remove(var);
    }
    run(&mut cargo).context("building seb-ebpf")?;
    let built = std::fs::read(dir.join("target/bpfel-unknown-none/release/seb"))?;
    ensure_no_mangled_symbols(&built)?;
    let committed = std::fs::read(committed_object()).unwrap_or_default();
    if built == committed {
        eprintln!("xtask: eBPF object up to date ({} bytes)", built.len());
        return Ok(());
    }
    match mode {
        Mode::Check => bail!(
            "{} does not match a fresh build of seb-ebpf: run `cargo xtask build` and commit it",
            committed_object().display()
        ),
        Mode::Update => {
            std::fs::write(committed_object(), &built)?;
            eprintln!("xtask: updated {}", committed_object().display());
            Ok(())
        }
    }
}

/// A function the compiler did not inline keeps a mangled name, whose crate hash covers
/// seb-common's absolute path (outside seb-ebpf's workspace): the object would differ
/// between checkouts, and CI's byte comparison fail in a clean clone only.
fn ensure_no_mangled_symbols(object: &[u8]) -> Result<()> {
    let mangled = |prefix: &[u8]| object.windows(prefix.len()).any(|window| window == prefix);
    if mangled(b"_RNv") || mangled(b"_ZN") {
        bail!(
            "the eBPF object holds a mangled function name (a program body or helper the compiler did not inline): \
             its hash depends on where the checkout is; mark the function #[inline(always)] \
             (llvm-objdump -t seb-ebpf/target/bpfel-unknown-none/release/seb names it)"
        );
    }
    Ok(())
}
