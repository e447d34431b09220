//! Making sure pins land on a BPF filesystem.

use std::path::Path;

use anyhow::{Context, Result, bail};
use nix::{
    mount::{MsFlags, mount},
    sys::statfs::{BPF_FS_MAGIC, statfs},
};
use tracing::info;

/// Where bpffs is conventionally mounted; mounted by the agent if nothing is there yet.
const DEFAULT_BPFFS: &str = "/sys/fs/bpf";

/// `pin_path` must be on bpffs. If it lies under /sys/fs/bpf and that is not a bpffs
/// yet (a fresh host), mount one there, as systemd would.
pub fn ensure_mounted(pin_path: &Path) -> Result<()> {
    let Some(existing) = pin_path.ancestors().find(|dir| dir.exists()) else {
        bail!("no ancestor of {} exists", pin_path.display());
    };
    if is_bpffs(existing)? {
        return Ok(());
    }
    if pin_path.starts_with(DEFAULT_BPFFS) && !is_bpffs(Path::new(DEFAULT_BPFFS))? {
        info!("mounting a bpffs at {DEFAULT_BPFFS}");
        mount(Some("bpf"), DEFAULT_BPFFS, Some("bpf"), MsFlags::empty(), None::<&str>)
            .context("mounting bpffs at /sys/fs/bpf")?;
        return Ok(());
    }
    bail!("bpf.pin_path {} is not on a bpffs (mount one with `mount -t bpf bpf <dir>`)", pin_path.display())
}

fn is_bpffs(path: &Path) -> Result<bool> {
    let stat = statfs(path).with_context(|| format!("statfs {}", path.display()))?;
    Ok(stat.filesystem_type() == BPF_FS_MAGIC)
}
