//! Making sure tracefs is mounted: the syscall tracepoints are found by their ids there.

use std::path::Path;

use anyhow::{Context, Result};
use nix::mount::{MsFlags, mount};
use tracing::info;

const TRACEFS: &str = "/sys/kernel/tracing";
const DEBUGFS_TRACING: &str = "/sys/kernel/debug/tracing";

/// Mount tracefs at /sys/kernel/tracing unless it (or the debugfs copy) is there already.
pub fn ensure_mounted() -> Result<()> {
    if [TRACEFS, DEBUGFS_TRACING].iter().any(|dir| Path::new(dir).join("events").is_dir()) {
        return Ok(());
    }
    info!("mounting tracefs at {TRACEFS}");
    mount(
        Some("tracefs"),
        TRACEFS,
        Some("tracefs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .with_context(|| format!("mounting tracefs at {TRACEFS} (needed for the syscall tracepoints)"))
}
