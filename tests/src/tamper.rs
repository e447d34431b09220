//! What an attacker with root does to seb's kernel objects, for the tests that show
//! the agent notices and repairs it.

use std::{
    ffi::CString,
    net::Ipv4Addr,
    os::{
        fd::{AsFd, AsRawFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::Path,
};

use anyhow::{Context, Result, bail};

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_RAW_TRACEPOINT_OPEN: libc::c_long = 17;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_LINK_UPDATE: libc::c_long = 29;
const BPF_LINK_DETACH: libc::c_long = 34;
const BPF_PROG_TYPE_SOCKET_FILTER: u32 = 1;
const BPF_PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;
const BPF_CGROUP_INET4_CONNECT: u32 = 10;

/// `BPF_LINK_DETACH` on a pinned link, as `bpftool link detach pinned <path>` does: the
/// link stays pinned, with its program, but is attached to nothing.
pub fn detach_pinned_link(pin: &Path) -> Result<()> {
    let fd = open_pinned(pin)?;
    let detach: [u32; 2] = [fd.as_raw_fd() as u32, 0];
    // SAFETY: BPF_LINK_DETACH reads the link fd.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, BPF_LINK_DETACH, detach.as_ptr(), 8usize) };
    if rc != 0 {
        bail!("detaching {}: {}", pin.display(), std::io::Error::last_os_error());
    }
    Ok(())
}

/// Root links seb's own raw tracepoint program (the one whose link is pinned at `pin`) to
/// `tracepoint` instead, and pins that link in seb's place: the same program on the same
/// maps, running where it judges nothing. seb's link lives on while the agent holds it.
pub fn pin_on_other_raw_tracepoint(pin: &Path, tracepoint: &str) -> Result<()> {
    let program_id = seb_agent::enforcement::link_info::pinned_link(pin)?.program_id;
    let get: [u32; 3] = [program_id, 0, 0];
    let program = bpf_fd(BPF_PROG_GET_FD_BY_ID, &get).context("opening seb's program")?;
    #[repr(C)]
    struct RawTracepointOpen {
        name: u64,
        prog_fd: u32,
        _pad: u32,
        cookie: u64,
    }
    let name = CString::new(tracepoint)?;
    let open =
        RawTracepointOpen { name: name.as_ptr() as u64, prog_fd: program.as_raw_fd() as u32, _pad: 0, cookie: 0 };
    let link = bpf_fd(BPF_RAW_TRACEPOINT_OPEN, &open).with_context(|| format!("linking it to {tracepoint}"))?;
    std::fs::remove_file(pin).with_context(|| format!("unpinning {}", pin.display()))?;
    let path = CString::new(pin.as_os_str().as_bytes())?;
    let pin_attr: [u64; 2] = [path.as_ptr() as u64, link.as_raw_fd() as u64];
    // SAFETY: BPF_OBJ_PIN reads the NUL-terminated path and the link fd.
    if unsafe { libc::syscall(libc::SYS_bpf, BPF_OBJ_PIN, pin_attr.as_ptr(), 16usize) } != 0 {
        bail!("pinning at {}: {}", pin.display(), std::io::Error::last_os_error());
    }
    Ok(())
}

/// A `bpf()` command that returns a new descriptor.
fn bpf_fd<T>(command: libc::c_long, attr: &T) -> Result<OwnedFd> {
    // SAFETY: the command reads `attr`, of its own layout, and returns a new fd.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, command, attr as *const T, size_of::<T>()) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    // SAFETY: a fresh fd owned here.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// `BPF_LINK_UPDATE` on a pinned `connect4` link: it stays attached where it was, but
/// runs a program of root's that allows every connect.
pub fn replace_connect4_program(pin: &Path) -> Result<()> {
    update_pinned_link(pin, load_allow_all_connect4()?.as_fd())
}

/// `BPF_LINK_UPDATE`: the link pinned at `pin` runs `program` from now on.
fn update_pinned_link(pin: &Path, program: std::os::fd::BorrowedFd<'_>) -> Result<()> {
    let link = open_pinned(pin)?;
    let update: [u32; 4] = [link.as_raw_fd() as u32, program.as_raw_fd() as u32, 0, 0];
    // SAFETY: BPF_LINK_UPDATE reads the two fds.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, BPF_LINK_UPDATE, update.as_ptr(), 16usize) };
    if rc != 0 {
        bail!("replacing the program of {}: {}", pin.display(), std::io::Error::last_os_error());
    }
    Ok(())
}

/// `BPF_LINK_UPDATE` on a pinned `connect4` link with seb's own `connect4` program
/// (same instructions, same tag) loaded again on maps root made: empty, so nothing is
/// protected. The new maps are pinned beside seb's, under `maps/ROGUE_<name>`.
pub fn replace_connect4_with_seb_on_other_maps(pin: &Path, pin_path: &Path) -> Result<()> {
    let staging = pin_path.join("rogue");
    std::fs::create_dir_all(&staging)?;
    let mut ebpf = aya::EbpfLoader::new()
        .default_map_pin_directory(&staging)
        .load(seb_agent::enforcement::loader::OBJECT)
        .context("loading seb's object on new maps")?;
    for (name, map) in ebpf.maps() {
        map.pin(pin_path.join("maps").join(format!("ROGUE_{name}")))?;
    }
    for entry in std::fs::read_dir(&staging)? {
        std::fs::remove_file(entry?.path())?;
    }
    std::fs::remove_dir(&staging)?;
    let program: &mut aya::programs::CgroupSockAddr =
        ebpf.program_mut("seb_connect4").context("no seb_connect4 in the object")?.try_into()?;
    program.load()?;
    update_pinned_link(pin, program.fd()?.as_fd())
}

/// `r0 = 1; exit`: a cgroup `connect4` program that lets everything through.
fn load_allow_all_connect4() -> Result<OwnedFd> {
    load_connect4(&[insn(0xb7, 0, 0, 0, 1), insn(0x95, 0, 0, 0, 0)])
}

/// A cgroup `connect4` program, as a socket load balancer installs one on a cgroup above
/// the pods: a connect to `from` is sent to `to` (same port). The link detaches when the
/// returned descriptor is closed.
pub fn attach_connect4_redirect(cgroup: &Path, from: Ipv4Addr, to: Ipv4Addr) -> Result<OwnedFd> {
    let (from, to) = (u32::from_ne_bytes(from.octets()) as i32, u32::from_ne_bytes(to.octets()) as i32);
    let program = load_connect4(&[
        insn(0x61, 2, 1, 4, 0),    // r2 = ctx->user_ip4
        insn(0x56, 2, 0, 2, from), // if w2 != from goto +2
        insn(0xb4, 2, 0, 0, to),   // w2 = to
        insn(0x63, 1, 2, 4, 0),    // ctx->user_ip4 = r2
        insn(0xb7, 0, 0, 0, 1),    // r0 = 1 (allow)
        insn(0x95, 0, 0, 0, 0),    // exit
    ])?;
    let dir = std::fs::File::open(cgroup).with_context(|| format!("opening {}", cgroup.display()))?;
    let create: [u32; 4] = [program.as_raw_fd() as u32, dir.as_raw_fd() as u32, BPF_CGROUP_INET4_CONNECT, 0];
    bpf_fd(BPF_LINK_CREATE, &create).with_context(|| format!("attaching to {}", cgroup.display()))
}

/// One instruction: opcode, destination and source registers, offset, immediate.
fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> u64 {
    let [o0, o1] = off.to_le_bytes();
    let [i0, i1, i2, i3] = imm.to_le_bytes();
    u64::from_le_bytes([code, (src << 4) | dst, o0, o1, i0, i1, i2, i3])
}

/// A socket filter program, attached nowhere, that refers to seb's pinned map `map` (a
/// name from `seb_common::map_names`): what root loads to write seb's maps from inside
/// the kernel. It stays loaded while the descriptor is open.
pub fn load_program_using_map(pin_path: &Path, map: &str) -> Result<OwnedFd> {
    let map = open_pinned(&pin_path.join("maps").join(map))?;
    const BPF_PSEUDO_MAP_FD: u8 = 1;
    let insns = [
        insn(0x18, 1, BPF_PSEUDO_MAP_FD, 0, map.as_raw_fd()), // r1 = &map (two words)
        insn(0x00, 0, 0, 0, 0),
        insn(0xb7, 0, 0, 0, 0), // r0 = 0
        insn(0x95, 0, 0, 0, 0), // exit
    ];
    load(BPF_PROG_TYPE_SOCKET_FILTER, 0, *b"root_map_user\0\0\0", &insns)
}

fn load_connect4(insns: &[u64]) -> Result<OwnedFd> {
    load(BPF_PROG_TYPE_CGROUP_SOCK_ADDR, BPF_CGROUP_INET4_CONNECT, *b"root_connect4\0\0\0", insns)
}

fn load(prog_type: u32, expected_attach_type: u32, prog_name: [u8; 16], insns: &[u64]) -> Result<OwnedFd> {
    #[repr(C)]
    struct ProgLoad {
        prog_type: u32,
        insn_cnt: u32,
        insns: u64,
        license: u64,
        log_level: u32,
        log_size: u32,
        log_buf: u64,
        kern_version: u32,
        prog_flags: u32,
        prog_name: [u8; 16],
        prog_ifindex: u32,
        expected_attach_type: u32,
    }
    let license = c"GPL";
    let attr = ProgLoad {
        prog_type,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 0,
        log_size: 0,
        log_buf: 0,
        kern_version: 0,
        prog_flags: 0,
        prog_name,
        prog_ifindex: 0,
        expected_attach_type,
    };
    // The attribute and the instructions it points to outlive the call.
    bpf_fd(BPF_PROG_LOAD, &attr).context("loading a program")
}

fn open_pinned(pin: &Path) -> Result<OwnedFd> {
    let path = CString::new(pin.as_os_str().as_bytes())?;
    let get: [u64; 2] = [path.as_ptr() as u64, 0];
    bpf_fd(BPF_OBJ_GET, &get).with_context(|| format!("opening {}", pin.display()))
}

/// Write `value` at `index` of a pinned array of 32-bit words (`map`, a name from
/// `seb_common::map_names`), such as the kernel layout.
pub fn write_array_slot(pin_path: &Path, map: &str, index: u32, value: u32) -> Result<()> {
    pinned_array(pin_path, map)?.set(index, value, 0)?;
    Ok(())
}

/// The word at `index` of such an array.
pub fn read_array_slot(pin_path: &Path, map: &str, index: u32) -> Result<u32> {
    Ok(pinned_array(pin_path, map)?.get(&index, 0)?)
}

fn pinned_array(pin_path: &Path, map: &str) -> Result<aya::maps::Array<aya::maps::MapData, u32>> {
    use aya::maps::{Array, Map, MapData};
    let data = MapData::from_pin(pin_path.join("maps").join(map))?;
    Ok(Array::try_from(Map::Array(data))?)
}

/// Remove process `tgid` from the pinned table of processes of the scope, as if the
/// kernel had never been able to track it (the table was full).
pub fn forget_scoped_task(pin_path: &Path, tgid: u32) -> Result<()> {
    scoped_tasks(pin_path)?.remove(&tgid)?;
    Ok(())
}

/// The cgroup id the pinned table of processes of the scope holds for `tgid`, if any.
pub fn scoped_entry(pin_path: &Path, tgid: u32) -> Result<Option<u64>> {
    match scoped_tasks(pin_path)?.get(&tgid, 0) {
        Ok(cgroup) => Ok(Some(cgroup)),
        Err(aya::maps::MapError::KeyNotFound) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

fn scoped_tasks(pin_path: &Path) -> Result<aya::maps::HashMap<aya::maps::MapData, u32, u64>> {
    use aya::maps::{HashMap, Map, MapData};
    let data = MapData::from_pin(pin_path.join("maps").join(seb_common::map_names::SCOPED_TASKS))?;
    Ok(HashMap::try_from(Map::HashMap(data))?)
}

/// Remove one IPv4 prefix from the pinned protected-endpoint trie.
pub fn remove_protected_v4(pin_path: &Path, addr: [u8; 4], prefix_len: u32) -> Result<()> {
    use aya::maps::{LpmTrie, Map, MapData, lpm_trie::Key};
    let data = MapData::from_pin(pin_path.join("maps").join(seb_common::map_names::PROTECTED_V4))?;
    let mut trie: LpmTrie<MapData, [u8; 4], seb_common::EndpointRules> = LpmTrie::try_from(Map::LpmTrie(data))?;
    trie.remove(&Key::new(prefix_len, addr))?;
    Ok(())
}

/// Remove every entry of the pinned local-protection rules; how many there were.
pub fn clear_local_protected(pin_path: &Path) -> Result<usize> {
    let mut rules = local_protected(pin_path)?;
    let keys: Vec<u64> = rules.keys().collect::<Result<_, _>>()?;
    for key in &keys {
        rules.remove(key)?;
    }
    Ok(keys.len())
}

/// Entries of the pinned local-protection rules.
pub fn local_protected_entries(pin_path: &Path) -> Result<usize> {
    Ok(local_protected(pin_path)?.keys().count())
}

fn local_protected(pin_path: &Path) -> Result<aya::maps::HashMap<aya::maps::MapData, u64, seb_common::EndpointRules>> {
    use aya::maps::{HashMap, Map, MapData};
    let data = MapData::from_pin(pin_path.join("maps").join(seb_common::map_names::LOCAL_PROTECTED))?;
    Ok(HashMap::try_from(Map::HashMap(data))?)
}

/// The pinned `SEB_AGENT`: the running agent's tgid and cgroup id, zero while none runs.
pub fn agent_entry(pin_path: &Path) -> Result<[u64; 2]> {
    let array = agent_array(pin_path)?;
    Ok([array.get(&seb_common::agent_slots::TGID, 0)?, array.get(&seb_common::agent_slots::CGROUP, 0)?])
}

/// Name another process and cgroup in `SEB_AGENT`, as root with CAP_BPF could.
pub fn write_agent_entry(pin_path: &Path, entry: [u64; 2]) -> Result<()> {
    let mut array = agent_array(pin_path)?;
    array.set(seb_common::agent_slots::CGROUP, entry[1], 0)?;
    array.set(seb_common::agent_slots::TGID, entry[0], 0)?;
    Ok(())
}

fn agent_array(pin_path: &Path) -> Result<aya::maps::Array<aya::maps::MapData, u64>> {
    use aya::maps::{Array, Map, MapData};
    let data = MapData::from_pin(pin_path.join("maps").join(seb_common::map_names::AGENT))?;
    Ok(Array::try_from(Map::Array(data))?)
}
