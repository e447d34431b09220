//! `cargo xtask deploy-check`: every kustomization under deploy/ renders; every object
//! validates against the Kubernetes schemas offline (`kubernetes-validate`) and every pod
//! spec against the API server's and Pod Security's own rules (`pod_rules`); each
//! overlay's agent.toml, as its ConfigMap carries it, is a valid config; the example
//! cluster state is what brokers accept; the committed CRDs are what the Rust types generate.

use std::{path::PathBuf, process::Command};

use anyhow::{Context, Result, bail, ensure};
use seb_sandbox::deploy::{self, BROKER_OVERLAYS, KUSTOMIZATIONS};
use serde_json::Value;

use crate::{pod_rules, run, workspace_root};

/// The Kubernetes version the manifests are validated against (the machines' kubectl).
const KUBERNETES_VERSION: &str = "1.32.0";

pub fn run_check() -> Result<()> {
    ensure_validator()?;
    let root = workspace_root();
    let deploy_dir = deploy::deploy_dir();
    run(Command::new("cargo").current_dir(&root).args(["build", "--quiet", "-p", "seb-agent"]))?;
    let agent =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from).join("debug/seb-agent");
    let scratch = tempdir()?;

    let generated = scratch.join("crds");
    run(Command::new(&agent).arg("crds").arg("--out-dir").arg(&generated))?;
    for entry in std::fs::read_dir(&generated)? {
        let entry = entry?;
        let committed = std::fs::read_to_string(deploy_dir.join("cluster").join(entry.file_name())).unwrap_or_default();
        if committed != std::fs::read_to_string(entry.path())? {
            bail!(
                "deploy/cluster/{} does not match the Rust types: run `seb-agent crds --out-dir deploy/cluster` and commit it",
                entry.file_name().to_string_lossy()
            );
        }
    }

    let mut count = 0;
    for name in KUSTOMIZATIONS {
        let dir = deploy_dir.join(name);
        let text = deploy::render_text(&dir)?;
        let file = scratch.join(format!("{name}.yaml"));
        std::fs::write(&file, &text)?;
        run(Command::new("kubernetes-validate").args(["-k", KUBERNETES_VERSION, "--strict", "--quiet"]).arg(&file))
            .with_context(|| {
                format!("an object deploy/{name} renders does not validate against the Kubernetes schemas")
            })?;
        let objects = deploy::render(&dir)?;
        check_pod_specs(name, &objects)?;
        if BROKER_OVERLAYS.contains(&name) {
            check_agent_config(name, &objects, &agent, &scratch)?;
        }
        if name == "sab" {
            check_sab_config(&objects, &scratch)?;
        }
        count += objects.len();
    }

    check_admission_policy(&deploy::render_text(&deploy_dir.join("cluster"))?)?;

    let state = deploy_dir.join("cluster-state");
    let mut check = Command::new(&agent);
    check.arg("check-cluster-state");
    for name in ["sebpolicy.json", "sebrevocation.json"] {
        check.arg(state.join(name));
    }
    run(&mut check).context("deploy/cluster-state/ holds an object a broker would refuse")?;
    eprintln!(
        "xtask: deploy/ renders {count} objects in {} kustomizations, all valid for Kubernetes {KUBERNETES_VERSION} \
         and the API server's pod rules; CRDs match the Rust types",
        KUSTOMIZATIONS.len()
    );
    let _ = std::fs::remove_dir_all(&scratch);
    Ok(())
}

/// The API server's and Pod Security's rules on every pod spec `deploy/<name>` renders.
pub fn check_pod_specs(name: &str, objects: &[Value]) -> Result<()> {
    let violations = pod_rules::violations(objects);
    ensure!(
        violations.is_empty(),
        "deploy/{name} renders a pod spec the API server would refuse:\n  {}",
        violations.join("\n  ")
    );
    Ok(())
}

/// The agent.toml the DaemonSet mounts, from the ConfigMap the render carries, checked
/// field by field (its files and cgroups are the node's: the pod-as-the-kubelet-runs-it
/// test checks those).
fn check_agent_config(name: &str, objects: &[Value], agent: &std::path::Path, scratch: &std::path::Path) -> Result<()> {
    let config_map = objects
        .iter()
        .find(|o| o["kind"] == "ConfigMap" && o["data"]["agent.toml"].is_string())
        .with_context(|| format!("deploy/{name} renders no ConfigMap with agent.toml"))?;
    let file = scratch.join(format!("{name}-agent.toml"));
    std::fs::write(&file, config_map["data"]["agent.toml"].as_str().unwrap_or_default())?;
    run(Command::new(agent)
        .args(["check-config", "--fields-only", "--config"])
        .arg(&file)
        .stdout(std::process::Stdio::null()))
    .with_context(|| format!("deploy/{name}: its agent.toml is not a valid agent config"))
}

/// The SAB's sab.toml and policies, as its ConfigMaps carry them: the config parses and
/// validates, and the policies load against the schema as `seb-agent sab serve` would.
fn check_sab_config(objects: &[Value], scratch: &std::path::Path) -> Result<()> {
    let data_of = |key: &str| {
        objects
            .iter()
            .find(|o| o["kind"] == "ConfigMap" && o["data"][key].is_string())
            .map(|o| &o["data"])
            .with_context(|| format!("deploy/sab renders no ConfigMap with {key}"))
    };
    let config = data_of("sab.toml")?["sab.toml"].as_str().unwrap_or_default();
    seb_agent::sab::SabConfig::parse(config).context("deploy/sab: its sab.toml is not a valid SAB config")?;
    let policies = scratch.join("sab-policies");
    std::fs::create_dir_all(&policies)?;
    for (file, text) in data_of("base.cedar")?.as_object().into_iter().flatten() {
        std::fs::write(policies.join(file), text.as_str().unwrap_or_default())?;
    }
    seb_agent::sab::policy::PolicyBook::load_dir(&policies, seb_agent::sab::config::MAX_CERTIFICATE_TTL)
        .context("deploy/sab: its policies do not load")?;
    Ok(())
}

fn ensure_validator() -> Result<()> {
    let installed = |probe: &[&str]| Command::new("python3").args(probe).output().is_ok_and(|o| o.status.success());
    if !installed(&["-m", "kubernetes_validate", "--version"]) {
        eprintln!("xtask: installing kubernetes-validate (offline Kubernetes schemas)");
        run(Command::new("python3").args(["-m", "pip", "install", "--quiet", "kubernetes-validate"]))?;
    }
    if !installed(&["-c", "import celpy"]) {
        eprintln!("xtask: installing cel-python (the admission policy's CEL, evaluated offline)");
        run(Command::new("python3").args(["-m", "pip", "install", "--quiet", "cel-python"]))?;
    }
    Ok(())
}

/// The brokers' admission policy (deploy/cluster) admits what the executor sends and
/// refuses what a stolen broker token would do instead, its CEL evaluated offline.
fn check_admission_policy(rendered: &str) -> Result<()> {
    use std::io::Write;
    let script = workspace_root().join("xtask/scripts/admission_policy_check.py");
    let mut child = Command::new("python3")
        .arg(&script)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("running {}", script.display()))?;
    child.stdin.take().context("the check's stdin")?.write_all(rendered.as_bytes())?;
    ensure!(child.wait()?.success(), "deploy/cluster's admission policy for the brokers fails its cases");
    Ok(())
}

fn tempdir() -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("seb-deploy-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    ensure!(dir.is_dir(), "cannot create {}", dir.display());
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use seb_sandbox::deploy::{self, KUSTOMIZATIONS};

    use super::check_pod_specs;

    /// deploy/base as committed, and with one line changed in its DaemonSet, rendered.
    fn render_base(edit: impl FnOnce(String) -> String) -> Vec<serde_json::Value> {
        let dir = std::env::temp_dir().join(format!(
            "seb-deploy-rule-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for entry in std::fs::read_dir(deploy::deploy_dir().join("base")).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
        }
        let daemon_set = dir.join("daemonset.yaml");
        std::fs::write(&daemon_set, edit(std::fs::read_to_string(&daemon_set).unwrap())).unwrap();
        let objects = deploy::render(&dir).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        objects
    }

    #[test]
    fn every_kustomization_passes_the_pod_rules() {
        for name in KUSTOMIZATIONS {
            check_pod_specs(name, &deploy::render(&deploy::deploy_dir().join(name)).unwrap()).unwrap();
        }
    }

    #[test]
    fn bidirectional_propagation_in_an_unprivileged_container_is_caught() {
        let objects = render_base(|text| {
            let edited = text.replacen("privileged: true", "privileged: false", 1);
            assert_ne!(edited, text, "the base's init container is no longer privileged: update this test");
            edited
        });
        let error = check_pod_specs("base", &objects).unwrap_err().to_string();
        assert!(
            error.contains("initContainers[0].volumeMounts[1].mountPropagation")
                && error.contains("only to privileged containers"),
            "{error}"
        );
    }
}
