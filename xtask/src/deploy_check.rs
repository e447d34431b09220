//! `cargo xtask deploy-check`: the kustomize base renders, every object validates against
//! the Kubernetes schemas offline (`kubernetes-validate`), the ConfigMap's agent.toml is a
//! valid config, the example cluster state is what brokers accept, and the committed CRDs
//! are exactly what the Rust types generate.

use std::process::Command;

use anyhow::{Context, Result, bail, ensure};

use crate::{output_of, run, workspace_root};

/// The Kubernetes version the manifests are validated against (the machines' kubectl).
const KUBERNETES_VERSION: &str = "1.32.0";

pub fn run_check() -> Result<()> {
    ensure_validator()?;
    let root = workspace_root();
    let deploy = root.join("deploy");
    run(Command::new("cargo").current_dir(&root).args(["build", "--quiet", "-p", "seb-agent"]))?;
    let agent = root.join("target/debug/seb-agent");

    let generated = tempdir()?;
    run(Command::new(&agent).arg("crds").arg("--out-dir").arg(&generated))?;
    for entry in std::fs::read_dir(&generated)? {
        let entry = entry?;
        let committed = std::fs::read_to_string(deploy.join(entry.file_name())).unwrap_or_default();
        if committed != std::fs::read_to_string(entry.path())? {
            bail!(
                "deploy/{} does not match the Rust types: run `seb-agent crds --out-dir deploy` and commit it",
                entry.file_name().to_string_lossy()
            );
        }
    }

    run(Command::new(&agent)
        .args(["check-config", "--config"])
        .arg(deploy.join("agent.toml"))
        .stdout(std::process::Stdio::null()))
    .context("deploy/agent.toml (the ConfigMap) is not a valid agent config")?;

    let state = deploy.join("cluster-state");
    output_of(Command::new("kubectl").arg("kustomize").arg(&state)).context("rendering deploy/cluster-state/")?;
    let mut check = Command::new(&agent);
    check.arg("check-cluster-state");
    for name in ["sebpolicy.json", "sebrevocation.json"] {
        check.arg(state.join(name));
    }
    run(&mut check).context("deploy/cluster-state/ holds an object a broker would refuse")?;

    let rendered = output_of(Command::new("kubectl").arg("kustomize").arg(&deploy))
        .context("rendering deploy/ with `kubectl kustomize` (kubectl is needed)")?;
    let file = generated.join("rendered.yaml");
    std::fs::write(&file, &rendered)?;
    let objects = rendered.matches("\nkind: ").count() + usize::from(rendered.starts_with("kind: "));
    run(Command::new("kubernetes-validate").args(["-k", KUBERNETES_VERSION, "--strict", "--quiet"]).arg(&file))
        .context("a rendered object does not validate against the Kubernetes schemas")?;
    eprintln!(
        "xtask: deploy/ renders {objects} objects, all valid for Kubernetes {KUBERNETES_VERSION}; CRDs match the Rust types"
    );
    let _ = std::fs::remove_dir_all(&generated);
    Ok(())
}

fn ensure_validator() -> Result<()> {
    if Command::new("kubernetes-validate").arg("--version").output().is_ok_and(|o| o.status.success()) {
        return Ok(());
    }
    eprintln!("xtask: installing kubernetes-validate (offline Kubernetes schemas)");
    run(Command::new("python3").args(["-m", "pip", "install", "--quiet", "kubernetes-validate"]))
}

fn tempdir() -> Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("seb-deploy-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    ensure!(dir.is_dir(), "cannot create {}", dir.display());
    Ok(dir)
}
