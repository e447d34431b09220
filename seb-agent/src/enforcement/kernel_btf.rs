//! Field offsets of kernel structures, read from the running kernel's BTF
//! (`/sys/kernel/btf/vmlinux`), for the tracing programs that follow a process's cgroup
//! and name its executable. Only what those programs need: struct members by name,
//! through nested and anonymous members.

use std::collections::HashMap;

use anyhow::{Context, Result, anyhow, bail};
use seb_common::layout;

const BTF_MAGIC: u16 = 0xeb9f;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_TYPE_TAG: u32 = 18;

/// The fields every architecture has, as `struct` and a member path.
const FIELDS: [(u32, &str, &[&str]); 26] = [
    (layout::TASK_TGID, "task_struct", &["tgid"]),
    (layout::TASK_MM, "task_struct", &["mm"]),
    (layout::TASK_CGROUPS, "task_struct", &["cgroups"]),
    (layout::MM_EXE_FILE, "mm_struct", &["exe_file"]),
    (layout::FILE_DENTRY, "file", &["f_path", "dentry"]),
    (layout::DENTRY_NAME, "dentry", &["d_name", "name"]),
    (layout::DENTRY_PARENT, "dentry", &["d_parent"]),
    (layout::CSS_SET_DFL_CGROUP, "css_set", &["dfl_cgrp"]),
    (layout::CGROUP_LEVEL, "cgroup", &["level"]),
    (layout::CGROUP_ANCESTORS, "cgroup", &["ancestors"]),
    (layout::CGROUP_KN, "cgroup", &["kn"]),
    (layout::KERNFS_NODE_ID, "kernfs_node", &["id"]),
    (layout::CGROUP_ROOT, "cgroup", &["root"]),
    (layout::SOCK_ADDR_KERN_SK, "bpf_sock_addr_kern", &["sk"]),
    (layout::SOCK_CGROUP, "sock", &["sk_cgrp_data", "cgroup"]),
    (layout::TASK_SIGNAL, "task_struct", &["signal"]),
    (layout::SIGNAL_LIVE, "signal_struct", &["live"]),
    (layout::TASK_FILES, "task_struct", &["files"]),
    (layout::FILES_FDT, "files_struct", &["fdt"]),
    (layout::FDTABLE_MAX_FDS, "fdtable", &["max_fds"]),
    (layout::FDTABLE_FD, "fdtable", &["fd"]),
    (layout::DENTRY_SB, "dentry", &["d_sb"]),
    (layout::SUPER_MAGIC, "super_block", &["s_magic"]),
    (layout::FILE_INODE, "file", &["f_inode"]),
    (layout::INODE_MODE, "inode", &["i_mode"]),
    (layout::INODE_RDEV, "inode", &["i_rdev"]),
];

/// The values of `SEB_KERNEL_LAYOUT` for the running kernel, `VALID` set.
pub fn kernel_layout() -> Result<[u32; layout::LEN as usize]> {
    let path = "/sys/kernel/btf/vmlinux";
    let data = std::fs::read(path).with_context(|| format!("reading the kernel's BTF at {path}"))?;
    let btf = Btf::parse(&data).with_context(|| format!("parsing {path}"))?;
    let mut values = [0u32; layout::LEN as usize];
    for (index, structure, path) in FIELDS {
        values[index as usize] = btf
            .offset_of(structure, path)
            .with_context(|| format!("finding struct {structure}.{} in the kernel's BTF", path.join(".")))?;
    }
    // Only x86_64 marks a 32-bit system call here, and only its 32-bit gate is watched.
    values[layout::TASK_THREAD_STATUS as usize] = if cfg!(target_arch = "x86_64") {
        btf.offset_of("task_struct", &["thread_info", "status"])
            .context("finding struct task_struct.thread_info.status in the kernel's BTF")?
    } else {
        u32::MAX
    };
    // io_uring's request layout, where the kernel has io_uring (`seb_uring_submit`).
    let uring = [
        (layout::IO_KIOCB_OPCODE, "io_kiocb", &["opcode"][..], None),
        (layout::IO_SOCKET_DOMAIN, "io_socket", &["domain"], Some(("io_kiocb", &["cmd"][..]))),
        (layout::IO_SOCKET_TYPE, "io_socket", &["type"], Some(("io_kiocb", &["cmd"]))),
        (layout::IO_KIOCB_FLAGS, "io_kiocb", &["flags"], None),
        (layout::IO_KIOCB_FD, "io_kiocb", &["cqe", "fd"], None),
        (layout::IO_KIOCB_CTX, "io_kiocb", &["ctx"], None),
        (layout::IO_CTX_FILES_NR, "io_ring_ctx", &["file_table", "data", "nr"], None),
        (layout::IO_CTX_FILES_NODES, "io_ring_ctx", &["file_table", "data", "nodes"], None),
        (layout::IO_RSRC_NODE_FILE, "io_rsrc_node", &["file_ptr"], None),
        (layout::IO_CTX_LINK_HEAD, "io_ring_ctx", &["submit_state", "link", "head"], None),
    ];
    for (index, structure, path, inside) in uring {
        let within = match inside {
            Some((outer, outer_path)) => btf.offset_of(outer, outer_path).ok(),
            None => Some(0),
        };
        values[index as usize] = match (within, btf.offset_of(structure, path).ok()) {
            (Some(base), Some(offset)) => base + offset,
            _ => u32::MAX,
        };
    }
    values[layout::VALID as usize] = 1;
    Ok(values)
}

/// Whether the running kernel has io_uring (its request layout is in the BTF).
pub fn has_io_uring() -> bool {
    static PRESENT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *PRESENT.get_or_init(|| kernel_layout().is_ok_and(|values| values[layout::IO_KIOCB_OPCODE as usize] != u32::MAX))
}

/// Whether an io_uring `IORING_OP_SOCKET` request can be judged: the kernel has the
/// request layout the programs read for its family and type. True without io_uring.
pub fn judges_uring_sockets() -> bool {
    uring_layout_has(&[layout::IO_SOCKET_DOMAIN, layout::IO_SOCKET_TYPE, layout::IO_KIOCB_FLAGS])
}

/// Whether an io_uring write to a fixed file can be judged: the kernel's fixed-file table
/// has the layout the programs read (kernel 6.13 on). True without io_uring.
pub fn judges_fixed_file_writes() -> bool {
    uring_layout_has(&[
        layout::IO_CTX_FILES_NR,
        layout::IO_CTX_FILES_NODES,
        layout::IO_RSRC_NODE_FILE,
        layout::IO_CTX_LINK_HEAD,
    ])
}

/// Whether the kernel's io_uring layout has every one of `fields`; true without io_uring.
fn uring_layout_has(fields: &[u32]) -> bool {
    !has_io_uring()
        || kernel_layout().is_ok_and(|values| fields.iter().all(|field| values[*field as usize] != u32::MAX))
}

struct Type {
    kind: u32,
    /// The referenced type, for modifiers and typedefs.
    target: u32,
    /// (name offset, type id, bit offset) of each struct or union member.
    members: Vec<(u32, u32, u32)>,
}

struct Btf<'a> {
    types: Vec<Type>,
    strings: &'a [u8],
    structs: HashMap<&'a [u8], u32>,
}

impl<'a> Btf<'a> {
    fn parse(data: &'a [u8]) -> Result<Self> {
        let u16_at = |at: usize| data.get(at..at + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
        let u32_at = |at: usize| data.get(at..at + 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
        if u16_at(0) != Some(BTF_MAGIC) {
            bail!("not little-endian BTF");
        }
        let header = |at| u32_at(at).map(|v| v as usize).ok_or_else(|| anyhow!("truncated header"));
        let (header_len, type_off, type_len, str_off, str_len) =
            (header(4)?, header(8)?, header(12)?, header(16)?, header(20)?);
        let strings = data
            .get(header_len + str_off..header_len + str_off + str_len)
            .ok_or_else(|| anyhow!("string section out of bounds"))?;
        let end = header_len + type_off + type_len;
        let mut at = header_len + type_off;
        // Type id 0 is void.
        let mut types = vec![Type { kind: 0, target: 0, members: Vec::new() }];
        let mut structs = HashMap::new();
        while at < end {
            let word = |i: usize| u32_at(at + 4 * i).ok_or_else(|| anyhow!("type {} truncated", types.len()));
            let (name, info, size_or_type) = (word(0)?, word(1)?, word(2)?);
            let (vlen, kind, kind_flag) = ((info & 0xffff) as usize, (info >> 24) & 0x1f, info >> 31 == 1);
            at += 12;
            let trailing = match kind {
                1 | 14 | 17 => 4,
                3 => 12,
                4 | 5 | 15 | 19 => 12 * vlen,
                6 | 13 => 8 * vlen,
                _ => 0,
            };
            let mut members = Vec::new();
            if kind == KIND_STRUCT || kind == KIND_UNION {
                for i in 0..vlen {
                    let member = |j: usize| u32_at(at + 12 * i + 4 * j).ok_or_else(|| anyhow!("member truncated"));
                    let offset = member(2)?;
                    let bits = if kind_flag { offset & 0x00ff_ffff } else { offset };
                    members.push((member(0)?, member(1)?, bits));
                }
                if kind == KIND_STRUCT && name != 0 {
                    structs.entry(c_str(strings, name)).or_insert(types.len() as u32);
                }
            }
            at += trailing;
            types.push(Type { kind, target: size_or_type, members });
        }
        Ok(Self { types, strings, structs })
    }

    /// Byte offset of `path` (member names, outermost first) inside `structure`.
    fn offset_of(&self, structure: &str, path: &[&str]) -> Result<u32> {
        let mut type_id =
            *self.structs.get(structure.as_bytes()).ok_or_else(|| anyhow!("no struct named {structure}"))?;
        let mut bits = 0;
        for name in path {
            let (member_type, member_bits) =
                self.find_member(type_id, name.as_bytes(), 0).ok_or_else(|| anyhow!("no member {name}"))?;
            bits += member_bits;
            type_id = member_type;
        }
        if bits % 8 != 0 {
            bail!("the member is a bitfield");
        }
        Ok(bits / 8)
    }

    /// A member by name, looking inside anonymous members; its type and bit offset.
    fn find_member(&self, type_id: u32, name: &[u8], depth: u32) -> Option<(u32, u32)> {
        let ty = self.types.get(self.resolve(type_id) as usize)?;
        if depth > 8 {
            return None;
        }
        for &(member_name, member_type, bits) in &ty.members {
            if member_name == 0 {
                if let Some((found, inner)) = self.find_member(member_type, name, depth + 1) {
                    return Some((found, bits + inner));
                }
            } else if c_str(self.strings, member_name) == name {
                return Some((member_type, bits));
            }
        }
        None
    }

    /// Follow typedefs and qualifiers to the underlying type.
    fn resolve(&self, mut type_id: u32) -> u32 {
        for _ in 0..16 {
            match self.types.get(type_id as usize) {
                Some(ty)
                    if matches!(ty.kind, KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG) =>
                {
                    type_id = ty.target
                }
                _ => break,
            }
        }
        type_id
    }
}

fn c_str(strings: &[u8], offset: u32) -> &[u8] {
    let rest = strings.get(offset as usize..).unwrap_or_default();
    &rest[..rest.iter().position(|&b| b == 0).unwrap_or(rest.len())]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The running kernel's layout is found whole, and matches what is known of it.
    #[test]
    fn the_running_kernels_layout_is_found() {
        // seb needs kernel BTF: a machine without it fails here rather than skipping.
        assert!(std::path::Path::new("/sys/kernel/btf/vmlinux").exists(), "no kernel BTF at /sys/kernel/btf/vmlinux");
        let values = kernel_layout().unwrap();
        assert_eq!(values[layout::VALID as usize], 1);
        // `d_name.name` follows the 8-byte hash/len union inside `struct qstr`.
        let btf_data = std::fs::read("/sys/kernel/btf/vmlinux").unwrap();
        let btf = Btf::parse(&btf_data).unwrap();
        assert_eq!(btf.offset_of("qstr", &["name"]).unwrap(), 8);
        assert_eq!(
            values[layout::DENTRY_NAME as usize],
            btf.offset_of("dentry", &["d_name"]).unwrap() + 8,
            "nested members add up"
        );
        assert!(btf.offset_of("dentry", &["no_such_member"]).is_err());
        // x86_64's thread_info opens task_struct: flags, syscall_work, then status.
        #[cfg(target_arch = "x86_64")]
        assert_eq!(values[layout::TASK_THREAD_STATUS as usize], 16);
        // A sock_addr program's context opens with the socket; a socket's cgroup sits
        // well inside `struct sock`.
        assert_eq!(values[layout::SOCK_ADDR_KERN_SK as usize], 0);
        assert!(values[layout::SOCK_CGROUP as usize] > 0);
        // An io_uring request's command area opens the request; `io_socket` starts with
        // its file pointer, then domain and type.
        assert_eq!(values[layout::IO_SOCKET_DOMAIN as usize], 8);
        assert_eq!(values[layout::IO_SOCKET_TYPE as usize], 12);
        // A request's flags (64 bits) come just before its completion, whose descriptor
        // follows `user_data` and `res`; a fixed file follows a node's type, refs and tag.
        let at = |field: u32| values[field as usize];
        assert_eq!(at(layout::IO_KIOCB_FD), at(layout::IO_KIOCB_FLAGS) + 8 + 12);
        assert_eq!(at(layout::IO_CTX_FILES_NODES), at(layout::IO_CTX_FILES_NR) + 8);
        assert_eq!(at(layout::IO_RSRC_NODE_FILE), 16);
        // A descriptor table's size precedes its array of files.
        assert_eq!(at(layout::FDTABLE_FD), at(layout::FDTABLE_MAX_FDS) + 8);
        assert!(has_io_uring());
        assert!(judges_fixed_file_writes());
    }
}
