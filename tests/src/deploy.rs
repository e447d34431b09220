//! The kustomizations under `deploy/`, rendered as `kubectl apply -k` would send them.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, ensure};
use serde_json::Value;

/// Every kustomization under `deploy/`, in the order they are applied.
pub const KUSTOMIZATIONS: [&str; 7] =
    ["base", "node-local", "cluster", "cluster-state", "sab", "brokered-namespace", "agent-pod"];

/// The overlays that run the broker DaemonSet (and the base they share).
pub const BROKER_OVERLAYS: [&str; 3] = ["base", "node-local", "cluster"];

/// `deploy/` in this checkout.
pub fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").join("deploy")
}

/// `kubectl kustomize <dir>`: the YAML text.
pub fn render_text(dir: &Path) -> Result<String> {
    let output = Command::new("kubectl")
        .arg("kustomize")
        .arg(dir)
        .output()
        .context("running `kubectl kustomize` (kubectl is needed)")?;
    ensure!(
        output.status.success(),
        "`kubectl kustomize {}` failed: {}",
        dir.display(),
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(String::from_utf8(output.stdout)?)
}

/// The rendered objects of the kustomization in `dir`.
pub fn render(dir: &Path) -> Result<Vec<Value>> {
    let text = render_text(dir)?;
    let objects: Vec<Value> =
        serde_saphyr::from_multiple(&text).with_context(|| format!("parsing what {} renders", dir.display()))?;
    Ok(objects.into_iter().filter(|o| !o.is_null()).collect())
}

/// The one object of `kind` named `name`.
pub fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> Result<&'a Value> {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .with_context(|| format!("no {kind} named {name} was rendered"))
}
