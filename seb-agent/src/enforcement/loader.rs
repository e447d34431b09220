//! Loading, attaching and pinning the kernel programs, and re-adopting what an earlier
//! agent pinned.
//!
//! Layout under `bpf.pin_path`:
//! - `maps/<NAME>`: every map, pinned by name; the loader reuses an existing pin, so
//!   policy, broker registrations and undelivered denials survive an agent restart.
//! - `links/<program>-<cgroup id>-<object hash>`: one cgroup link per program and
//!   enforced (or exempt) cgroup, and `links/<program>-global-<object hash>` for the
//!   process-exit tracepoint. A pinned link stays attached after the agent exits (fail
//!   closed).
//!
//! On start, a link pinned for this object and these maps is adopted only if the kernel
//! says it is still attached where it belongs (a detached link keeps its program but
//! enforces nothing); anything else is replaced by attaching the new link first and
//! unpinning the old one second, so there is never a moment without a program attached.

use std::{
    collections::BTreeSet,
    fs::{self, File},
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, anyhow, bail, ensure};
use aya::{
    Ebpf, EbpfLoader,
    programs::{CgroupAttachMode, CgroupSkbAttachType, links::FdLink, loaded_programs},
};
use sha2::{Digest, Sha256};
use tracing::{info, warn};

use super::{
    compat_syscalls, device_link, kernel_btf,
    link_info::{Tracepoint, pinned_link},
};
use crate::{bpffs, cgroupfs, config::SyscallTables, tracefs};

/// The kernel programs, built from `seb-ebpf` by `cargo xtask build`.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("CARGO_MANIFEST_DIR"), "/bpf/seb.bpf.o"));

/// Where a program is attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachTo {
    /// Every enforced cgroup.
    Scope,
    /// Every exempt cgroup.
    Exempt,
    /// Once, for the whole node (a tracepoint that only touches this agent's maps).
    Global,
}

/// The programs in the object and where each attaches.
pub const PROGRAMS: [(&str, AttachTo); 29] = [
    ("seb_connect4", AttachTo::Scope),
    ("seb_connect6", AttachTo::Scope),
    ("seb_sendmsg4", AttachTo::Scope),
    ("seb_sendmsg6", AttachTo::Scope),
    ("seb_egress", AttachTo::Scope),
    ("seb_device", AttachTo::Scope),
    ("seb_exempt_origin", AttachTo::Exempt),
    ("seb_exempt_release", AttachTo::Exempt),
    ("seb_process_exit", AttachTo::Global),
    ("seb_process_fork", AttachTo::Global),
    ("seb_process_exec", AttachTo::Global),
    ("seb_cgroup_migrate", AttachTo::Global),
    ("seb_socket_call", AttachTo::Global),
    ("seb_uring_setup", AttachTo::Global),
    ("seb_uring_enter", AttachTo::Global),
    ("seb_getfd_call", AttachTo::Global),
    ("seb_ptrace_call", AttachTo::Global),
    ("seb_vm_write_call", AttachTo::Global),
    ("seb_bpf_call", AttachTo::Global),
    ("seb_ioctl_call", AttachTo::Global),
    ("seb_write_call", AttachTo::Global),
    ("seb_pwrite_call", AttachTo::Global),
    ("seb_writev_call", AttachTo::Global),
    ("seb_pwritev_call", AttachTo::Global),
    ("seb_pwritev2_call", AttachTo::Global),
    ("seb_sys_enter", AttachTo::Global),
    ("seb_uring_submit", AttachTo::Global),
    ("seb_uring_file_get", AttachTo::Global),
    ("seb_uring_create", AttachTo::Global),
];

/// The BTF tracepoint each such program attaches to.
fn btf_tracepoint(program: &str) -> Option<&'static str> {
    match program {
        "seb_sys_enter" => Some("sys_enter"),
        "seb_cgroup_migrate" => Some("cgroup_attach_task"),
        "seb_uring_submit" => Some("io_uring_submit_req"),
        "seb_uring_file_get" => Some("io_uring_file_get"),
        "seb_uring_create" => Some("io_uring_create"),
        _ => None,
    }
}

/// The raw tracepoint each such program attaches to.
fn raw_tracepoint(program: &str) -> Option<&'static str> {
    match program {
        "seb_process_exit" => Some("sched_process_exit"),
        "seb_process_fork" => Some("sched_process_fork"),
        "seb_process_exec" => Some("sched_process_exec"),
        _ => None,
    }
}

/// The syscall tracepoint (`syscalls/<name>`) each such program attaches to. Only the
/// named system call runs the program.
fn syscall_tracepoint(program: &str) -> Option<&'static str> {
    match program {
        "seb_socket_call" => Some("sys_enter_socket"),
        "seb_uring_setup" => Some("sys_enter_io_uring_setup"),
        "seb_uring_enter" => Some("sys_enter_io_uring_enter"),
        "seb_getfd_call" => Some("sys_enter_pidfd_getfd"),
        "seb_ptrace_call" => Some("sys_enter_ptrace"),
        "seb_vm_write_call" => Some("sys_enter_process_vm_writev"),
        "seb_bpf_call" => Some("sys_enter_bpf"),
        "seb_ioctl_call" => Some("sys_enter_ioctl"),
        "seb_write_call" => Some("sys_enter_write"),
        "seb_pwrite_call" => Some("sys_enter_pwrite64"),
        "seb_writev_call" => Some("sys_enter_writev"),
        "seb_pwritev_call" => Some("sys_enter_pwritev"),
        "seb_pwritev2_call" => Some("sys_enter_pwritev2"),
        _ => None,
    }
}

/// Whether a program is attached on this node. Where the kernel takes 32-bit system
/// calls (x86_64 unless booted with `ia32_emulation=0`), `seb_sys_enter` watches both
/// tables in place of the thirteen syscall tracepoints, which see the 64-bit table only
/// (unless the config asks for the native table alone). `seb_uring_submit` needs a
/// kernel with io_uring.
fn supported(program: &str, tables: SyscallTables) -> bool {
    let both_tables = tables == SyscallTables::Auto && compat_syscalls::run_here();
    match program {
        "seb_sys_enter" => both_tables,
        "seb_uring_submit" | "seb_uring_file_get" | "seb_uring_create" => kernel_btf::has_io_uring(),
        _ if syscall_tracepoint(program).is_some() => !both_tables,
        _ => true,
    }
}

/// The programs attached on this node, and where each goes.
pub fn attached_programs(tables: SyscallTables) -> impl Iterator<Item = &'static (&'static str, AttachTo)> + Clone {
    PROGRAMS.iter().filter(move |(program, _)| supported(program, tables))
}

/// The cgroups programs are attached to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AttachTargets {
    pub scopes: Vec<PathBuf>,
    pub exempt: Vec<PathBuf>,
    pub syscall_tables: SyscallTables,
}

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
    /// The cgroup it is attached to; empty, with id 0, for the global tracepoint.
    pub cgroup: PathBuf,
    pub cgroup_id: u64,
    pub pin: PathBuf,
    pub origin: LinkOrigin,
    /// The program the link must run: this agent's.
    #[serde(skip)]
    pub identity: ProgramIdentity,
    #[serde(skip)]
    pub held: HeldLink,
}

/// A descriptor of a link, held while the agent runs. A link lives while its pin or a
/// descriptor holds it: without one, removing the pin (an `unlink` on bpffs, no `bpf()`
/// call) would detach it until the next check attached it again.
#[derive(Clone, Default)]
pub struct HeldLink(Option<std::sync::Arc<std::os::fd::OwnedFd>>);

impl HeldLink {
    fn of(pin: &Path) -> Result<Self> {
        Ok(Self(Some(std::sync::Arc::new(super::link_info::open_pinned_link(pin)?))))
    }
}

/// A state is what the link is, not which descriptor holds it.
impl PartialEq for HeldLink {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl std::fmt::Debug for HeldLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "held" } else { "not held" })
    }
}

/// What tells this agent's program from any other: the kernel's tag (a hash of its
/// instructions, map references left out) and the maps it is bound to. A program of the
/// same instructions bound to maps root made and pinned beside seb's would enforce what
/// those maps hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProgramIdentity {
    pub tag: u64,
    pub maps: BTreeSet<u32>,
}

impl LinkState {
    pub fn is_global(&self) -> bool {
        self.cgroup_id == 0
    }
}

/// Short hash of the object, so links of another build are recognised and replaced.
pub fn object_hash() -> String {
    hex::encode(&Sha256::digest(OBJECT)[..6])
}

/// Load the object, reusing pinned maps; a new `SEB_SCOPED_TASKS` gets
/// `max_scoped_processes` entries, and `SEB_DOOMED_TASKS` a share of that.
pub fn load(layout: &PinLayout, max_scoped_processes: u32) -> Result<Ebpf> {
    bpffs::ensure_mounted(&layout.root)?;
    fs::create_dir_all(layout.maps()).with_context(|| format!("creating {}", layout.maps().display()))?;
    fs::create_dir_all(layout.links()).with_context(|| format!("creating {}", layout.links().display()))?;
    let ebpf = EbpfLoader::new()
        .default_map_pin_directory(layout.maps())
        .map_max_entries(seb_common::map_names::SCOPED_TASKS, max_scoped_processes)
        .map_max_entries(seb_common::map_names::DOOMED_TASKS, doomed_capacity(max_scoped_processes))
        .load(OBJECT)
        .with_context(|| {
            format!(
                "loading the kernel programs with the maps pinned in {}; if they were pinned by an \
             incompatible seb version, run `seb-agent unload` first (enforcement stays as it is until then)",
                layout.maps().display()
            )
        })?;
    check_pinned_sizes(&ebpf, layout)?;
    Ok(ebpf)
}

/// A pinned map is reused as it is, whatever size this version defines: counters an
/// older version pinned fewer of would leave this one's uncounted, and unread; a kernel
/// layout it froze shorter holds none of this version's newer offsets.
fn check_pinned_sizes(ebpf: &Ebpf, layout: &PinLayout) -> Result<()> {
    let counters = seb_common::map_names::COUNTERS;
    let Some(aya::maps::Map::PerCpuArray(map)) = ebpf.map(counters) else { bail!("map {counters} is missing") };
    check_size(counters, map.info()?.max_entries(), seb_common::counters::LEN, layout)?;
    let kernel_layout = seb_common::map_names::KERNEL_LAYOUT;
    let Some(aya::maps::Map::Array(map)) = ebpf.map(kernel_layout) else { bail!("map {kernel_layout} is missing") };
    check_size(kernel_layout, map.info()?.max_entries(), seb_common::layout::LEN, layout)
}

fn check_size(name: &str, entries: u32, wanted: u32, layout: &PinLayout) -> Result<()> {
    ensure!(
        entries == wanted,
        "the map {name} pinned in {} holds {entries} entries, this version keeps {wanted}: it was pinned by an \
         incompatible seb version; run `seb-agent unload` first (enforcement stays as it is until then)",
        layout.maps().display(),
    );
    Ok(())
}

/// Room for processes to be killed at their next call: those moved out of the scope by
/// another, and those the scope table could not take. A sixteenth of the scope table
/// (4,096 for the default), at least 16.
fn doomed_capacity(max_scoped_processes: u32) -> u32 {
    (max_scoped_processes / 16).clamp(16, seb_common::MAX_DOOMED_TASKS)
}

/// Attach every program where it belongs, adopting valid pinned links, then unpin links
/// that are no longer wanted, unless `keep_others` (the scope is not fully known yet).
pub fn attach_all(
    ebpf: &mut Ebpf,
    layout: &PinLayout,
    targets: &AttachTargets,
    keep_others: bool,
) -> Result<Vec<LinkState>> {
    let hash = object_hash();
    let mut states = Vec::new();
    let mut wanted = BTreeSet::new();
    let programs = attached_programs(targets.syscall_tables);
    for (program, _) in programs.clone() {
        load_program(ebpf, program)?;
    }
    let loaded = LoadedPrograms::read();
    for &(program, attach_to) in programs {
        let identity = loaded_identity(ebpf, program)?;
        let cgroups: Vec<Option<&PathBuf>> = match attach_to {
            AttachTo::Scope => targets.scopes.iter().map(Some).collect(),
            AttachTo::Exempt => targets.exempt.iter().map(Some).collect(),
            AttachTo::Global => vec![None],
        };
        for cgroup in cgroups {
            let cgroup_id = cgroup.map(|dir| cgroupfs::cgroup_id(dir)).transpose()?.unwrap_or(0);
            // bpffs refuses names with dots.
            let name = match cgroup {
                Some(_) => format!("{program}-{cgroup_id}-{hash}"),
                None => format!("{program}-global-{hash}"),
            };
            let pin = layout.links().join(&name);
            wanted.insert(name);
            let expected = Expected::new(program, cgroup.map(|_| cgroup_id), &identity);
            let origin = match adopt(&pin, &expected, &loaded) {
                Ok(()) => LinkOrigin::Adopted,
                Err(why) => {
                    if pin.exists() {
                        warn!(pin = %pin.display(), %why, "replacing a pinned link");
                    }
                    attach_and_pin(ebpf, program, cgroup.map(PathBuf::as_path), &pin)?;
                    LinkOrigin::Attached
                }
            };
            let cgroup = cgroup.cloned().unwrap_or_default();
            info!(program, cgroup = %cgroup.display(), ?origin, "enforcing");
            let held = HeldLink::of(&pin)?;
            states.push(LinkState {
                program: program.into(),
                cgroup,
                cgroup_id,
                pin,
                origin,
                identity: identity.clone(),
                held,
            });
        }
    }
    if !keep_others {
        unpin_unwanted(layout, &wanted)?;
    }
    Ok(states)
}

/// The identity of the program this agent loaded as `name`.
fn loaded_identity(ebpf: &Ebpf, name: &str) -> Result<ProgramIdentity> {
    let program = ebpf.program(name).ok_or_else(|| anyhow!("program {name} is missing from the object"))?;
    let info = program.info().with_context(|| format!("reading the kernel's information on program {name}"))?;
    Ok(ProgramIdentity { tag: info.tag(), maps: info.map_ids()?.unwrap_or_default().into_iter().collect() })
}

fn load_program(ebpf: &mut Ebpf, name: &str) -> Result<()> {
    let program = ebpf.program_mut(name).ok_or_else(|| anyhow!("program {name} is missing from the object"))?;
    // Loaded by an earlier apply of this agent.
    if program.fd().is_ok() {
        return Ok(());
    }
    let result = match program {
        aya::programs::Program::CgroupSkb(program) => program.load(),
        aya::programs::Program::CgroupSockAddr(program) => program.load(),
        aya::programs::Program::CgroupSock(program) => program.load(),
        aya::programs::Program::CgroupDevice(program) => program.load(),
        aya::programs::Program::RawTracePoint(program) => program.load(),
        aya::programs::Program::TracePoint(program) => program.load(),
        aya::programs::Program::BtfTracePoint(program) => {
            let tracepoint =
                btf_tracepoint(name).ok_or_else(|| anyhow!("no tracepoint is named for program {name}"))?;
            let btf = aya::Btf::from_sys_fs().context("reading the kernel's BTF (needed by BTF tracepoints)")?;
            program.load(tracepoint, &btf)
        }
        _ => bail!("program {name} has a type this agent does not attach"),
    };
    result.with_context(|| format!("the kernel refused program {name}"))
}

/// What a pinned link must be to be adopted.
struct Expected<'a> {
    /// The cgroup it must still be attached to; `None` for the global tracepoint.
    cgroup_id: Option<u64>,
    /// The raw or syscall tracepoint it must run on; `None` for other links (a BTF
    /// tracepoint program is bound to its tracepoint when loaded).
    tracepoint: Option<&'static str>,
    /// The program this agent loaded for it.
    program: &'a ProgramIdentity,
}

impl<'a> Expected<'a> {
    fn new(program_name: &str, cgroup_id: Option<u64>, program: &'a ProgramIdentity) -> Self {
        let tracepoint = raw_tracepoint(program_name).or_else(|| syscall_tracepoint(program_name));
        Self { cgroup_id, tracepoint, program }
    }
}

/// A pinned link is adopted when the kernel says it is attached where it belongs and
/// runs this agent's program: the same instructions on the same maps. A detached link
/// enforces nothing; root can swap a link's program (`BPF_LINK_UPDATE`) for one that
/// allows everything, or for seb's own bound to maps it made; can pin, in seb's place,
/// seb's own tracepoint program linked to another tracepoint; and a program bound to
/// maps that are no longer pinned would ignore every policy update.
fn adopt(pin: &Path, expected: &Expected<'_>, loaded: &LoadedPrograms) -> Result<()> {
    if !pin.exists() {
        bail!("not pinned");
    }
    let cgroup_id = expected.cgroup_id;
    let kernel = pinned_link(pin)?;
    if kernel.cgroup_id != cgroup_id {
        match kernel.cgroup_id {
            Some(0) => bail!("the link was detached from its cgroup"),
            Some(other) => bail!("the link is attached to cgroup {other}, not {cgroup_id:?}"),
            None => bail!("the link is not a cgroup link"),
        }
    }
    if let Some(tracepoint) = expected.tracepoint {
        match &kernel.tracepoint {
            Tracepoint::Named(name) if name == tracepoint => {}
            Tracepoint::Named(other) => bail!("the link runs on tracepoint {other}, not {tracepoint}"),
            Tracepoint::Unreported => {}
            Tracepoint::None => bail!("the link is not a tracepoint link"),
        }
    }
    let program =
        loaded.0.get(&kernel.program_id).ok_or_else(|| anyhow!("the link's program {} is gone", kernel.program_id))?;
    if program.identity.tag != expected.program.tag {
        bail!(
            "the link runs program {} with tag {:016x}, not this agent's (tag {:016x}): its program was replaced",
            kernel.program_id,
            program.identity.tag,
            expected.program.tag
        );
    }
    if program.identity.maps != expected.program.maps {
        bail!(
            "the link's program uses maps {:?}; this agent's uses maps {:?}",
            program.identity.maps,
            expected.program.maps
        );
    }
    Ok(())
}

/// A program loaded in the kernel, anyone's.
pub struct LoadedProgram {
    pub name: String,
    pub identity: ProgramIdentity,
}

/// Every program loaded in the kernel, by id: read once per check (each program costs
/// three system calls), not once per link.
pub struct LoadedPrograms(pub std::collections::HashMap<u32, LoadedProgram>);

impl LoadedPrograms {
    pub fn read() -> Self {
        let programs = loaded_programs().filter_map(Result::ok).filter_map(|info| {
            let maps = info.map_ids().ok()?.unwrap_or_default().into_iter().collect();
            let name = info.name_as_str().unwrap_or("").to_string();
            Some((info.id(), LoadedProgram { name, identity: ProgramIdentity { tag: info.tag(), maps } }))
        });
        Self(programs.collect())
    }
}

/// Check the links this agent holds against the kernel: still pinned, still attached
/// where they were, still running this agent's program. Returns each link that fails,
/// with why.
pub fn verify_links<'a>(links: &'a [LinkState], loaded: &LoadedPrograms) -> Vec<(&'a LinkState, anyhow::Error)> {
    links
        .iter()
        .filter_map(|state| {
            let cgroup_id = (!state.is_global()).then_some(state.cgroup_id);
            let expected = Expected::new(&state.program, cgroup_id, &state.identity);
            adopt(&state.pin, &expected, loaded).err().map(|why| (state, why))
        })
        .collect()
}

fn attach_and_pin(ebpf: &mut Ebpf, name: &str, cgroup: Option<&Path>, pin: &Path) -> Result<()> {
    let program = ebpf.program_mut(name).ok_or_else(|| anyhow!("program {name} is missing"))?;
    // cgroup bpf links are always multi-attach; the kernel refuses explicit flags on
    // link creation, so the "single" mode (flags 0) is the right one here.
    let mode = CgroupAttachMode::Single;
    let open_cgroup = || -> Result<File> {
        let dir = cgroup.ok_or_else(|| anyhow!("program {name} attaches to a cgroup"))?;
        File::open(dir).with_context(|| format!("opening cgroup {}", dir.display()))
    };
    let link: FdLink = match program {
        aya::programs::Program::CgroupSkb(program) => {
            let id = program.attach(open_cgroup()?, CgroupSkbAttachType::Egress, mode)?;
            program.take_link(id)?.try_into()?
        }
        aya::programs::Program::CgroupSockAddr(program) => {
            let id = program.attach(open_cgroup()?, mode)?;
            program.take_link(id)?.try_into()?
        }
        aya::programs::Program::CgroupSock(program) => {
            let id = program.attach(open_cgroup()?, mode)?;
            program.take_link(id)?.try_into()?
        }
        aya::programs::Program::CgroupDevice(program) => {
            return device_link::attach_and_pin(program.fd()?.as_fd(), open_cgroup()?.as_fd(), pin);
        }
        aya::programs::Program::RawTracePoint(program) => {
            let tracepoint =
                raw_tracepoint(name).ok_or_else(|| anyhow!("no raw tracepoint is named for program {name}"))?;
            let id = program.attach(tracepoint)?;
            program.take_link(id)?.into()
        }
        aya::programs::Program::BtfTracePoint(program) => {
            let id = program.attach()?;
            program.take_link(id)?.into()
        }
        aya::programs::Program::TracePoint(program) => {
            let tracepoint =
                syscall_tracepoint(name).ok_or_else(|| anyhow!("no syscall tracepoint is named for program {name}"))?;
            tracefs::ensure_mounted()?;
            let id = program.attach("syscalls", tracepoint)?;
            program.take_link(id)?.try_into().context("a tracepoint link the kernel cannot pin (needs Linux 5.15+)")?
        }
        _ => bail!("program {name} has a type this agent does not attach"),
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
