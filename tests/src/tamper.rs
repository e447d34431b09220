//! What an attacker with root does to seb's kernel objects, for the tests that show
//! the agent notices and repairs it.

use std::{
    ffi::CString,
    os::{fd::FromRawFd, fd::OwnedFd, unix::ffi::OsStrExt},
    path::Path,
};

use anyhow::{Context, Result, bail};

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_DETACH: libc::c_long = 34;

/// `BPF_LINK_DETACH` on a pinned link, as `bpftool link detach pinned <path>` does: the
/// link stays pinned, with its program, but is attached to nothing.
pub fn detach_pinned_link(pin: &Path) -> Result<()> {
    let path = CString::new(pin.as_os_str().as_bytes())?;
    let get: [u64; 2] = [path.as_ptr() as u64, 0];
    // SAFETY: BPF_OBJ_GET reads the NUL-terminated path.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_OBJ_GET, get.as_ptr(), 16usize) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("opening {}", pin.display()));
    }
    // SAFETY: a fresh fd owned here.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let detach: [u32; 2] = [std::os::fd::AsRawFd::as_raw_fd(&fd) as u32, 0];
    // SAFETY: BPF_LINK_DETACH reads the link fd.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, BPF_LINK_DETACH, detach.as_ptr(), 8usize) };
    if rc != 0 {
        bail!("detaching {}: {}", pin.display(), std::io::Error::last_os_error());
    }
    Ok(())
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

/// Remove one IPv4 prefix from the pinned protected-endpoint trie.
pub fn remove_protected_v4(pin_path: &Path, addr: [u8; 4], prefix_len: u32) -> Result<()> {
    use aya::maps::{LpmTrie, Map, MapData, lpm_trie::Key};
    let data = MapData::from_pin(pin_path.join("maps").join(seb_common::map_names::PROTECTED_V4))?;
    let mut trie: LpmTrie<MapData, [u8; 4], seb_common::EndpointRules> = LpmTrie::try_from(Map::LpmTrie(data))?;
    trie.remove(&Key::new(prefix_len, addr))?;
    Ok(())
}
