//! The cgroup v2 hierarchy: where it is mounted, and cgroup ids (the directory's inode
//! number on cgroup2, as `bpf_get_current_cgroup_id` reports) to paths and back.

use std::{
    collections::HashMap,
    fs,
    io::Read,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

/// The cgroup2 mount point, read from /proc/mounts (never assumed: hybrid hosts mount it
/// at /sys/fs/cgroup/unified, unified ones at /sys/fs/cgroup).
pub fn cgroup2_mount() -> Result<PathBuf> {
    let mounts = fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    find_cgroup2_mount(&mounts).context("no cgroup2 filesystem is mounted (see /proc/mounts)")
}

fn find_cgroup2_mount(mounts: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_source, target, fstype) = (fields.next()?, fields.next()?, fields.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(unescape_mount_path(target)))
    })
}

/// /proc/mounts escapes spaces and a few other bytes as octal.
fn unescape_mount_path(path: &str) -> String {
    path.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")
}

/// A cgroup directory relative to the cgroup2 mount (as written in the config).
pub fn resolve(mount: &Path, relative: &str) -> PathBuf {
    mount.join(relative.trim_start_matches('/'))
}

/// The processes (tgids) in one cgroup directory, not in its descendants.
pub fn processes_in(dir: &Path) -> Result<Vec<u32>> {
    let procs = fs::read_to_string(dir.join("cgroup.procs"))
        .with_context(|| format!("reading {}", dir.join("cgroup.procs").display()))?;
    Ok(procs.lines().filter_map(|line| line.trim().parse().ok()).collect())
}

/// A process's cgroup v2 path relative to the mount (its `0::` line in
/// /proc/<process>/cgroup); `process` is a tgid or `self`.
pub fn cgroup_of(process: &str) -> Result<String> {
    let file = format!("/proc/{process}/cgroup");
    let opened = fs::File::open(&file).with_context(|| format!("reading {file}"))?;
    unified_cgroup(opened).with_context(|| format!("no cgroup v2 line in {file}"))
}

/// A /proc/<pid>/cgroup file longer than this is not read on (it cannot be: the kernel
/// bounds each hierarchy's line by the path length).
const CGROUP_FILE_MAX: usize = 64 * 1024;

/// The cgroup v2 path in a /proc/<pid>/cgroup file (its `0::` line), read as far as that
/// line: one system call unless the v1 hierarchies before it fill a page.
pub fn unified_cgroup(mut file: std::fs::File) -> Option<String> {
    let mut text = Vec::new();
    let mut chunk = [0; 4096];
    while text.len() < CGROUP_FILE_MAX {
        let read = file.read(&mut chunk).ok()?;
        text.extend_from_slice(&chunk[..read]);
        // Whole lines only: the last may be cut by the read's end.
        let whole = text.iter().rposition(|&b| b == b'\n').map_or(&text[..0], |end| &text[..end]);
        if let Some(path) = whole.split(|&b| b == b'\n').find_map(|line| line.strip_prefix(b"0::")) {
            return String::from_utf8(path.to_vec()).ok();
        }
        if read == 0 {
            return None;
        }
    }
    None
}

/// The cgroup id of a cgroup2 directory.
pub fn cgroup_id(dir: &Path) -> Result<u64> {
    let meta = fs::metadata(dir).with_context(|| format!("cgroup {} does not exist", dir.display()))?;
    if !meta.is_dir() {
        bail!("{} is not a cgroup directory", dir.display());
    }
    Ok(meta.ino())
}

/// Maps cgroup ids back to paths for denial records; rescans the tree on a miss, at
/// most once per `RESCAN_INTERVAL`, so a burst of denials cannot turn into a walk storm.
pub struct CgroupNames {
    mount: PathBuf,
    paths: HashMap<u64, String>,
    last_scan: Option<Instant>,
}

const RESCAN_INTERVAL: Duration = Duration::from_secs(1);

impl CgroupNames {
    pub fn new(mount: PathBuf) -> Self {
        Self { mount, paths: HashMap::new(), last_scan: None }
    }

    /// The path (relative to the mount, starting with `/`), if the cgroup still exists.
    pub fn path_of(&mut self, id: u64) -> Option<String> {
        if let Some(path) = self.paths.get(&id) {
            return Some(path.clone());
        }
        if self.last_scan.is_some_and(|at| at.elapsed() < RESCAN_INTERVAL) {
            return None;
        }
        self.rescan();
        self.paths.get(&id).cloned()
    }

    fn rescan(&mut self) {
        self.last_scan = Some(Instant::now());
        self.paths.clear();
        let mut pending = vec![self.mount.clone()];
        while let Some(dir) = pending.pop() {
            let Ok(meta) = fs::metadata(&dir) else { continue };
            let relative = dir.strip_prefix(&self.mount).map(|p| format!("/{}", p.display())).unwrap_or_default();
            self.paths.insert(meta.ino(), relative);
            let Ok(entries) = fs::read_dir(&dir) else { continue };
            for entry in entries.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    pending.push(entry.path());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cgroup_v2_line_is_found_among_v1_lines_and_cut_reads() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let cases: [(&[u8], Option<&str>); 5] = [
            (b"12:cpuacct:/\n1:cpu:/\n0::/kubepods/pod1\n", Some("/kubepods/pod1")),
            (b"0::/a\n", Some("/a")),
            (b"1:cpu:/\n", None),
            (b"0::/not-ended", None),
            (b"0::/\xff\n", None),
        ];
        for (i, (content, expected)) in cases.into_iter().enumerate() {
            let path = dir.path().join(i.to_string());
            std::fs::File::create(&path).unwrap().write_all(content).unwrap();
            assert_eq!(unified_cgroup(std::fs::File::open(&path).unwrap()).as_deref(), expected, "{content:?}");
        }
        // Longer than one read: a v2 line after 8 KiB of v1 lines.
        let long = [b"9:x:/".repeat(2000), b"\n0::/far\n".to_vec()].concat();
        let path = dir.path().join("long");
        std::fs::write(&path, &long).unwrap();
        assert_eq!(unified_cgroup(std::fs::File::open(&path).unwrap()).as_deref(), Some("/far"));
        let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
        let own = own.lines().find_map(|l| l.strip_prefix("0::")).map(str::to_string);
        assert_eq!(unified_cgroup(std::fs::File::open("/proc/self/cgroup").unwrap()), own);
    }

    #[test]
    fn finds_the_cgroup2_mount_among_v1_hierarchies() {
        let mounts = "tmpfs /sys/fs/cgroup tmpfs rw 0 0\n\
                      cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\n\
                      cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n";
        assert_eq!(find_cgroup2_mount(mounts), Some(PathBuf::from("/sys/fs/cgroup/unified")));
        assert_eq!(find_cgroup2_mount("cgroup /sys/fs/cgroup/cpu cgroup rw 0 0\n"), None);
        assert_eq!(find_cgroup2_mount("none /mnt/my\\040cg cgroup2 rw 0 0\n"), Some(PathBuf::from("/mnt/my cg")));
    }

    #[test]
    fn names_ids_of_a_directory_tree() {
        let root = tempfile::tempdir().unwrap();
        fs::create_dir_all(root.path().join("a/b")).unwrap();
        let id = cgroup_id(&root.path().join("a/b")).unwrap();
        let mut names = CgroupNames::new(root.path().to_path_buf());
        assert_eq!(names.path_of(id).as_deref(), Some("/a/b"));
        assert_eq!(names.path_of(u64::MAX), None);
    }
}
