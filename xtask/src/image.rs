//! `cargo xtask image`: the agent's container image, built without a container engine,
//! as an OCI image layout (`target/image/`, tag `dev`): one layer holding a static (musl)
//! seb-agent at `/seb-agent` and the empty directories the pod mounts over, nothing else
//! (no shell, no libc, no group database: the socket group is numeric). The layer is
//! reproducible (sorted, owner 0, fixed mtime). `umoci` then unpacks the layout, checking
//! every digest, and the unpacked binary is run.

use std::{
    io::Read,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, ensure};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::{output_of, run, toolchain, workspace_root};

const TARGET: &str = "x86_64-unknown-linux-musl";
pub const TAG: &str = "dev";
/// The binary's place in the image; the DaemonSet's command is its entrypoint.
const ENTRYPOINT: &str = seb_sandbox::kubelet::IMAGE_ENTRYPOINT;
/// Mount points the DaemonSet uses, present so a runtime need not create them.
const DIRECTORIES: [&str; 3] = ["etc/seb", "run/seb", "var/lib/seb"];

pub fn build_and_check() -> Result<()> {
    let layout = build()?;
    check(&layout)
}

/// Build the image; returns the layout directory.
pub fn build() -> Result<PathBuf> {
    toolchain::ensure_packages(&[("musl-gcc", "musl-tools"), ("umoci", "umoci"), ("file", "file")])?;
    let installed = output_of(Command::new("rustup").args(["target", "list", "--installed"]))?;
    if !installed.lines().any(|t| t.trim() == TARGET) {
        run(Command::new("rustup").args(["target", "add", TARGET]))?;
    }
    let root = workspace_root();
    run(Command::new("cargo").current_dir(&root).args([
        "build",
        "--release",
        "--locked",
        "-p",
        "seb-agent",
        "--target",
        TARGET,
    ]))?;
    let target_dir = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from);
    let binary = target_dir.join(TARGET).join("release/seb-agent");
    let linkage = output_of(Command::new("file").arg(&binary))?;
    ensure!(
        linkage.contains("statically linked") || linkage.contains("static-pie linked"),
        "{} is not static: {linkage}",
        binary.display()
    );

    let layout = target_dir.join("image");
    let _ = std::fs::remove_dir_all(&layout);
    let blobs = layout.join("blobs/sha256");
    std::fs::create_dir_all(&blobs)?;
    let epoch = source_date_epoch(&root)?;

    // The layer: a directory tree, archived reproducibly, then gzipped without a timestamp.
    let tree = target_dir.join("image-rootfs");
    let _ = std::fs::remove_dir_all(&tree);
    for dir in DIRECTORIES {
        std::fs::create_dir_all(tree.join(dir))?;
    }
    let entry = tree.join(ENTRYPOINT.trim_start_matches('/'));
    std::fs::copy(&binary, &entry)?;
    run(Command::new("chmod").arg("0755").arg(&entry))?;
    let tar = target_dir.join("image-layer.tar");
    run(Command::new("tar")
        .args(["--create", "--sort=name", "--owner=0", "--group=0", "--numeric-owner", "--format=gnu"])
        .arg(format!("--mtime=@{epoch}"))
        .arg("--file")
        .arg(&tar)
        .arg("--directory")
        .arg(&tree)
        .args(["etc", "run", "var", ENTRYPOINT.trim_start_matches('/')]))?;
    let diff_id = sha256_file(&tar)?;
    run(Command::new("gzip").args(["-n", "-9", "--force"]).arg(&tar))?;
    let layer = put_blob(&blobs, &std::fs::read(tar.with_extension("tar.gz"))?)?;
    std::fs::remove_file(tar.with_extension("tar.gz"))?;
    std::fs::remove_dir_all(&tree)?;

    let created = output_of(Command::new("date").args(["-u", "-d", &format!("@{epoch}"), "+%Y-%m-%dT%H:%M:%SZ"]))?;
    let created = created.trim();
    let revision = output_of(Command::new("git").current_dir(&root).args(["rev-parse", "HEAD"])).unwrap_or_default();
    let labels = json!({
        "org.opencontainers.image.title": "seb-agent",
        "org.opencontainers.image.description": "seb node broker: certified mutations in, kernel-enforced egress out",
        "org.opencontainers.image.licenses": env!("CARGO_PKG_LICENSE"),
        "org.opencontainers.image.version": env!("CARGO_PKG_VERSION"),
        "org.opencontainers.image.revision": revision.trim(),
        "org.opencontainers.image.created": created,
    });
    let config = json!({
        "created": created,
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "User": "0:0",
            "Entrypoint": [ENTRYPOINT],
            "Cmd": ["run", "--config", "/etc/seb/agent.toml"],
            "Env": ["SEB_LOG_FORMAT=json"],
            "Labels": labels,
        },
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{diff_id}")]},
        "history": [{"created": created, "created_by": "cargo xtask image"}],
    });
    let config = put_blob(&blobs, &serde_json::to_vec(&config)?)?;
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": descriptor("application/vnd.oci.image.config.v1+json", &config),
        "layers": [descriptor("application/vnd.oci.image.layer.v1.tar+gzip", &layer)],
        "annotations": labels,
    });
    let manifest = put_blob(&blobs, &serde_json::to_vec(&manifest)?)?;
    let mut entry = descriptor("application/vnd.oci.image.manifest.v1+json", &manifest);
    entry["annotations"] = json!({"org.opencontainers.image.ref.name": TAG});
    entry["platform"] = json!({"architecture": "amd64", "os": "linux"});
    let index =
        json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [entry]});
    std::fs::write(layout.join("index.json"), serde_json::to_vec(&index)?)?;
    std::fs::write(layout.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    eprintln!(
        "xtask: image written to {} (oci:{}:{TAG}), manifest sha256:{}",
        layout.display(),
        layout.display(),
        manifest.0
    );
    Ok(layout)
}

/// `umoci unpack` (which checks every blob against its digest and the layout's structure),
/// then the unpacked entrypoint must run and the config must say what the DaemonSet expects.
pub fn check(layout: &Path) -> Result<()> {
    toolchain::ensure_packages(&[("umoci", "umoci")])?;
    let bundle = layout.with_file_name("image-check");
    let _ = std::fs::remove_dir_all(&bundle);
    run(Command::new("umoci").args(["unpack", "--image"]).arg(format!("{}:{TAG}", layout.display())).arg(&bundle))
        .context("umoci refused the image layout")?;
    let rootfs = bundle.join("rootfs");
    let version = output_of(Command::new(rootfs.join(ENTRYPOINT.trim_start_matches('/'))).arg("--version"))?;
    ensure!(version.starts_with("seb-agent "), "the image's entrypoint printed {version:?}");
    let mut files = Vec::new();
    collect(&rootfs, &rootfs, &mut files)?;
    files.sort();
    let expected: Vec<String> = std::iter::once(ENTRYPOINT.to_string()).collect();
    ensure!(files == expected, "the image holds files beyond the agent: {files:?}");
    let config: Value = serde_json::from_str(&std::fs::read_to_string(bundle.join("config.json"))?)?;
    ensure!(config["process"]["args"][0] == ENTRYPOINT, "the runtime config runs {}", config["process"]["args"]);
    ensure!(config["process"]["user"]["uid"] == 0, "the image's user is not 0");
    std::fs::remove_dir_all(&bundle)?;
    eprintln!(
        "xtask: umoci unpacked the image; it holds {ENTRYPOINT} ({}) and empty mount points only",
        version.trim()
    );
    Ok(())
}

fn collect(root: &Path, dir: &Path, files: &mut Vec<String>) -> Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            collect(root, &path, files)?;
        } else {
            files.push(format!("/{}", path.strip_prefix(root)?.display()));
        }
    }
    Ok(())
}

/// SOURCE_DATE_EPOCH, else the commit's time: the same checkout builds the same image.
fn source_date_epoch(root: &Path) -> Result<u64> {
    if let Some(epoch) = std::env::var("SOURCE_DATE_EPOCH").ok().and_then(|e| e.parse().ok()) {
        return Ok(epoch);
    }
    let time = output_of(Command::new("git").current_dir(root).args(["log", "-1", "--format=%ct"]))?;
    time.trim().parse().context("reading the commit time")
}

/// A blob's digest (hex) and size.
struct Blob(String, usize);

fn put_blob(blobs: &Path, bytes: &[u8]) -> Result<Blob> {
    let digest = format!("{:x}", Sha256::digest(bytes));
    std::fs::write(blobs.join(&digest), bytes)?;
    Ok(Blob(digest, bytes.len()))
}

fn descriptor(media_type: &str, blob: &Blob) -> Value {
    json!({"mediaType": media_type, "digest": format!("sha256:{}", blob.0), "size": blob.1})
}

fn sha256_file(path: &Path) -> Result<String> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0; 1 << 16];
    loop {
        let read = file.read(&mut buffer)?;
        if read == 0 {
            break;
        }
        hasher.update(&buffer[..read]);
    }
    Ok(format!("{:x}", hasher.finalize()))
}
