//! Loading, attaching and pinning the kernel programs, and re-adopting what an earlier
//! agent pinned.
//!
//! Layout under `bpf.pin_path`:
//! - `maps/<NAME>`: every map, pinned by name; the loader reuses an existing pin, so
//!   policy, broker registrations and undelivered denials survive an agent restart.
//! - `links/<program>-<cgroup id>-<object hash>`: one cgroup link per program and
//!   enforced cgroup. A pinned link stays attached after the agent exits (fail closed).
//!
//! On start, a link pinned for this object and these maps is adopted as it is; anything
//! else is replaced by attaching the new link first and unpinning the old one second, so
//! there is never a moment without a program attached.

use std::{
    collections::BTreeSet,
    fs::{self, File},
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, anyhow, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::MapData,
    programs::{
        CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSockAddr,
        links::{FdLink, PinnedLink},
        loaded_programs,
    },
};
use sha2::{Digest, Sha256};
use tracing::{info, warn};

use crate::{bpffs, cgroupfs};

/// The kernel programs, built from `seb-ebpf` by `cargo xtask build`.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("CARGO_MANIFEST_DIR"), "/bpf/seb.bpf.o"));

/// The programs in the object and how each attaches.
pub const PROGRAMS: [&str; 5] = ["seb_connect4", "seb_connect6", "seb_sendmsg4", "seb_sendmsg6", "seb_egress"];

/// Paths of the pinned state.
#[derive(Debug, Clone)]
pub struct PinLayout {
    pub root: PathBuf,
}

impl PinLayout {
    pub fn new(root: &Path) -> Self {
        Self { root: root.to_path_buf() }
    }
    pub fn maps(&self) -> PathBuf {
        self.root.join("maps")
    }
    pub fn links(&self) -> PathBuf {
        self.root.join("links")
    }
    pub fn map(&self, name: &str) -> PathBuf {
        self.maps().join(name)
    }
}

/// How a link came to be attached in this start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LinkOrigin {
    Adopted,
    Attached,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LinkState {
    pub program: String,
    pub cgroup: PathBuf,
    pub cgroup_id: u64,
    pub pin: PathBuf,
    pub origin: LinkOrigin,
}

/// Short hash of the object, so links of another build are recognised and replaced.
pub fn object_hash() -> String {
    hex::encode(&Sha256::digest(OBJECT)[..6])
}

/// Load the object, reusing pinned maps.
pub fn load(layout: &PinLayout) -> Result<Ebpf> {
    bpffs::ensure_mounted(&layout.root)?;
    fs::create_dir_all(layout.maps()).with_context(|| format!("creating {}", layout.maps().display()))?;
    fs::create_dir_all(layout.links()).with_context(|| format!("creating {}", layout.links().display()))?;
    EbpfLoader::new().default_map_pin_directory(layout.maps()).load(OBJECT).with_context(|| {
        format!(
            "loading the kernel programs with the maps pinned in {}; if they were pinned by an \
             incompatible seb version, run `seb-agent unload` first (enforcement stays as it is until then)",
            layout.maps().display()
        )
    })
}

/// Attach every program to every scope cgroup, adopting valid pinned links, then unpin
/// links that are no longer wanted, unless `keep_others` (the scope is not fully known yet).
pub fn attach_all(
    ebpf: &mut Ebpf,
    layout: &PinLayout,
    scopes: &[PathBuf],
    keep_others: bool,
) -> Result<Vec<LinkState>> {
    let hash = object_hash();
    let map_ids = pinned_map_ids(layout)?;
    let mut states = Vec::new();
    let mut wanted = BTreeSet::new();
    for program in PROGRAMS {
        load_program(ebpf, program)?;
    }
    for scope in scopes {
        let cgroup_id = cgroupfs::cgroup_id(scope)?;
        for program in PROGRAMS {
            // bpffs refuses names with dots.
            let name = format!("{program}-{cgroup_id}-{hash}");
            let pin = layout.links().join(&name);
            wanted.insert(name);
            let origin = match adopt(&pin, &map_ids) {
                Ok(()) => LinkOrigin::Adopted,
                Err(why) => {
                    if pin.exists() {
                        warn!(pin = %pin.display(), %why, "replacing a pinned link");
                    }
                    attach_and_pin(ebpf, program, scope, &pin)?;
                    LinkOrigin::Attached
                }
            };
            info!(program, cgroup = %scope.display(), ?origin, "enforcing");
            states.push(LinkState { program: program.into(), cgroup: scope.clone(), cgroup_id, pin, origin });
        }
    }
    if !keep_others {
        unpin_unwanted(layout, &wanted)?;
    }
    Ok(states)
}

fn load_program(ebpf: &mut Ebpf, name: &str) -> Result<()> {
    let program = ebpf.program_mut(name).ok_or_else(|| anyhow!("program {name} is missing from the object"))?;
    // Loaded by an earlier apply of this agent.
    if program.fd().is_ok() {
        return Ok(());
    }
    let result = if name == "seb_egress" {
        let program: &mut CgroupSkb = program.try_into()?;
        program.load()
    } else {
        let program: &mut CgroupSockAddr = program.try_into()?;
        program.load()
    };
    result.with_context(|| format!("the kernel refused program {name}"))
}

/// A pinned link is adopted when its program still uses the pinned maps: a program
/// bound to maps that are no longer pinned would ignore every policy update.
fn adopt(pin: &Path, map_ids: &BTreeSet<u32>) -> Result<()> {
    if !pin.exists() {
        bail!("not pinned");
    }
    let link: FdLink = PinnedLink::from_pin(pin).context("opening the pinned link")?.into();
    let program_id = link.info().context("reading link info")?.program_id();
    let program = loaded_programs()
        .filter_map(Result::ok)
        .find(|program| program.id() == program_id)
        .ok_or_else(|| anyhow!("the link's program {program_id} is gone"))?;
    let used: BTreeSet<u32> = program.map_ids()?.unwrap_or_default().into_iter().collect();
    if !used.is_subset(map_ids) {
        bail!("the link's program uses maps {used:?} but the pinned maps are {map_ids:?}");
    }
    Ok(())
}

fn attach_and_pin(ebpf: &mut Ebpf, name: &str, cgroup: &Path, pin: &Path) -> Result<()> {
    let cgroup_dir = File::open(cgroup).with_context(|| format!("opening cgroup {}", cgroup.display()))?;
    let program = ebpf.program_mut(name).ok_or_else(|| anyhow!("program {name} is missing"))?;
    // cgroup bpf links are always multi-attach; the kernel refuses explicit flags on
    // link creation, so the "single" mode (flags 0) is the right one here.
    let mode = CgroupAttachMode::Single;
    let link: FdLink = if name == "seb_egress" {
        let program: &mut CgroupSkb = program.try_into()?;
        let id = program.attach(&cgroup_dir, CgroupSkbAttachType::Egress, mode)?;
        program.take_link(id)?.try_into()?
    } else {
        let program: &mut CgroupSockAddr = program.try_into()?;
        let id = program.attach(&cgroup_dir, mode)?;
        program.take_link(id)?.try_into()?
    };
    // An old link at this path stays attached until its pin is gone; the new one is
    // attached already, so removing the old pin first leaves no gap.
    if pin.exists() {
        fs::remove_file(pin).with_context(|| format!("unpinning {}", pin.display()))?;
    }
    link.pin(pin).with_context(|| format!("pinning {}", pin.display()))?;
    Ok(())
}

fn unpin_unwanted(layout: &PinLayout, wanted: &BTreeSet<String>) -> Result<()> {
    for entry in fs::read_dir(layout.links())? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !wanted.contains(&name) {
            info!(link = %name, "detaching a link no longer configured");
            fs::remove_file(entry.path())?;
        }
    }
    Ok(())
}

fn pinned_map_ids(layout: &PinLayout) -> Result<BTreeSet<u32>> {
    let mut ids = BTreeSet::new();
    for entry in fs::read_dir(layout.maps())? {
        let path = entry?.path();
        let map = MapData::from_pin(&path).with_context(|| format!("opening pinned map {}", path.display()))?;
        ids.insert(map.info()?.id());
    }
    Ok(ids)
}

/// Remove every pin: the programs detach as soon as no process holds their links.
pub fn unload(layout: &PinLayout) -> Result<usize> {
    let mut removed = 0;
    for dir in [layout.links(), layout.maps()] {
        let Ok(entries) = fs::read_dir(&dir) else { continue };
        for entry in entries {
            fs::remove_file(entry?.path())?;
            removed += 1;
        }
        fs::remove_dir(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    if layout.root.exists() {
        fs::remove_dir(&layout.root).with_context(|| format!("removing {}", layout.root.display()))?;
    }
    Ok(removed)
}
