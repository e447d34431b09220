//! Build facts for `seb_build_info`: the source's git commit and the compiler's version.

use std::{path::Path, process::Command};

fn main() {
    println!("cargo:rerun-if-env-changed=SEB_GIT_COMMIT");
    let commit = std::env::var("SEB_GIT_COMMIT").ok().filter(|c| !c.is_empty()).or_else(git_commit);
    println!("cargo:rustc-env=SEB_GIT_COMMIT={}", commit.as_deref().unwrap_or("unknown"));

    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let version = output(Command::new(rustc).arg("--version")).unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=SEB_RUSTC_VERSION={version}");
}

/// `HEAD`'s commit, rebuilt when it moves; `None` outside a git checkout (a source
/// archive, an image build without `.git`: set `SEB_GIT_COMMIT` there).
fn git_commit() -> Option<String> {
    let commit = output(Command::new("git").args(["rev-parse", "HEAD"]))?;
    // HEAD, the branch it names and packed refs: whichever moves, the commit is read again.
    for file in ["HEAD", "packed-refs"] {
        if let Some(path) = output(Command::new("git").args(["rev-parse", "--git-path", file])) {
            rerun_if_changed(&path);
        }
    }
    if let Some(branch) = output(Command::new("git").args(["symbolic-ref", "-q", "HEAD"]))
        && let Some(path) = output(Command::new("git").args(["rev-parse", "--git-path", &branch]))
    {
        rerun_if_changed(&path);
    }
    Some(commit)
}

fn rerun_if_changed(path: &str) {
    if Path::new(path).exists() {
        println!("cargo:rerun-if-changed={path}");
    }
}

fn output(command: &mut Command) -> Option<String> {
    let output = command.output().ok().filter(|o| o.status.success())?;
    Some(String::from_utf8(output.stdout).ok()?.trim().to_string()).filter(|s| !s.is_empty())
}
