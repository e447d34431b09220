//! A pod's container run the way a kubelet and an OCI runtime run it, on this node, in a
//! sandbox: the container's volumes laid out from the rendered objects (ConfigMap, Secret
//! and projected keys as files in the kubelet's atomic-writer layout, hostPaths,
//! PersistentVolumeClaims through their PersistentVolume, the ServiceAccount token volume
//! when the pod automounts it), mounted at their mountPaths in a private mount namespace
//! over a read-only image root, with the container's env (downward API included),
//! command and args, user, groups, capabilities and no_new_privs.
//!
//! The emulated node is the sandbox: its cgroup subtree stands for the node's cgroup2
//! tree, a directory on the bpffs for the node's /sys/fs/bpf, and a directory in the
//! sandbox for every other host path. The image root holds the agent binary at
//! [`IMAGE_ENTRYPOINT`] and, read-only, this machine's /usr (the test binary is dynamically
//! linked; the image's is static).

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail, ensure};
use base64::Engine;
use serde_json::Value;

use crate::Sandbox;

/// The cluster DNS the pods' /etc/resolv.conf names (nothing answers there unless a test
/// starts a name server: `Sandbox::answer_dns_with_no_records`).
pub const CLUSTER_DNS: &str = "127.0.0.10";

/// Where the image puts the agent, and its entrypoint (`cargo xtask image`).
pub const IMAGE_ENTRYPOINT: &str = "/seb-agent";

/// The capabilities an OCI runtime (containerd, CRI-O) grants a container by default.
const RUNTIME_DEFAULT_CAPABILITIES: [&str; 14] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "FSETID",
    "FOWNER",
    "MKNOD",
    "NET_RAW",
    "SETGID",
    "SETUID",
    "SETFCAP",
    "SETPCAP",
    "NET_BIND_SERVICE",
    "SYS_CHROOT",
    "KILL",
    "AUDIT_WRITE",
];

/// One emulated node.
pub struct Node<'a> {
    pub sandbox: &'a Sandbox,
    pub name: String,
    /// Host paths other than cgroup2 and bpffs live under here.
    pub host: PathBuf,
    /// The node's /sys/fs/bpf: a directory on the real bpffs.
    pub bpffs: PathBuf,
    /// What the kubelet puts in every pod's environment: the API server's Service.
    pub api_server: (String, u16),
    /// The API server's CA and a token, for pods that automount their ServiceAccount token.
    pub service_account: Option<(PathBuf, String)>,
}

/// A pod (or a workload's pod template) with the objects it was rendered with.
pub struct Pod<'a> {
    pub name: String,
    pub namespace: String,
    pub spec: &'a Value,
    pub objects: &'a [Value],
}

impl<'a> Pod<'a> {
    /// The pod a workload object (DaemonSet, Deployment) would create, or a Pod.
    pub fn of(object: &'a Value, objects: &'a [Value]) -> Result<Self> {
        let spec = match object["kind"].as_str() {
            Some("Pod") => &object["spec"],
            _ => &object["spec"]["template"]["spec"],
        };
        ensure!(spec.is_object(), "{} has no pod spec", object["metadata"]["name"]);
        let name = object["metadata"]["name"].as_str().unwrap_or_default().to_string();
        let namespace = object["metadata"]["namespace"].as_str().unwrap_or("default").to_string();
        Ok(Self { name, namespace, spec, objects })
    }

    fn containers(&self, list: &str) -> &'a [Value] {
        self.spec[list].as_array().map(Vec::as_slice).unwrap_or_default()
    }

    pub fn init_containers(&self) -> &'a [Value] {
        self.containers("initContainers")
    }

    pub fn container(&self, name: &str) -> Result<&'a Value> {
        self.containers("containers").iter().find(|c| c["name"] == name).with_context(|| format!("no container {name}"))
    }
}

impl Node<'_> {
    /// A command that runs `container` of `pod` as the kubelet would; `dir` is where its
    /// volumes and image root are laid out. It joins `cgroup` (under the sandbox's) and the
    /// sandbox's network namespace.
    pub fn container_command(&self, pod: &Pod, container: &Value, dir: &Path, cgroup: &str) -> Result<Command> {
        std::fs::create_dir_all(dir)?;
        let volumes = self.volumes(pod, dir)?;
        let root = dir.join("rootfs");
        std::fs::create_dir_all(&root)?;
        let context = SecurityContext::of(pod.spec, container);
        let mut script = String::from("set -eu\n");
        let q = |p: &Path| quote(&p.to_string_lossy());
        let r = q(&root);
        // The image: a root of its own, the binary at its entrypoint, /usr for its libraries.
        writeln!(script, "mount -t tmpfs -o mode=0755 image {r}")?;
        writeln!(script, "mkdir -p {r}/usr {r}/proc {r}/sys {r}/dev {r}/etc")?;
        for (link, target) in [("bin", "usr/bin"), ("lib", "usr/lib"), ("lib64", "usr/lib64"), ("sbin", "usr/sbin")] {
            writeln!(script, "ln -s {target} {r}/{link}")?;
        }
        writeln!(script, "mount --rbind /usr {r}/usr && mount -o remount,bind,ro {r}/usr")?;
        writeln!(
            script,
            "touch {r}{IMAGE_ENTRYPOINT} && mount --bind {} {r}{IMAGE_ENTRYPOINT}",
            q(&self.sandbox.tools.agent)
        )?;
        // What the runtime mounts: the host's PID namespace's /proc, a fresh sysfs, /dev.
        writeln!(script, "mount -t proc proc {r}/proc")?;
        writeln!(script, "mount -t sysfs sysfs {r}/sys")?;
        writeln!(script, "mount --rbind /dev {r}/dev")?;
        // The kubelet's /etc/resolv.conf (the cluster DNS, which does not answer here).
        writeln!(script, "echo 'nameserver {CLUSTER_DNS}' > {r}/etc/resolv.conf")?;
        writeln!(script, "echo {} > {r}/etc/hostname", quote(&self.name))?;
        let mut mounts = container["volumeMounts"].as_array().cloned().unwrap_or_default();
        if self.automounts_token(pod) {
            // Every container mounts the token volume (the admission plugin adds the mount too).
            mounts.push(serde_json::json!({"name": "kube-api-access", "readOnly": true,
                "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"}));
        }
        for mount in &mounts {
            let name = mount["name"].as_str().unwrap_or_default();
            let source = volumes.get(name).with_context(|| format!("volumeMount {name}: no such volume"))?;
            let target = format!("{r}{}", quote(mount["mountPath"].as_str().context("mountPath")?));
            let source = match mount["subPath"].as_str() {
                Some(sub) => source.join(sub),
                None => source.clone(),
            };
            if source.is_dir() {
                writeln!(script, "mkdir -p {target}")?;
            } else {
                writeln!(script, "mkdir -p \"$(dirname {target})\" && touch {target}")?;
            }
            writeln!(script, "mount --bind {} {target}", q(&source))?;
            if mount["readOnly"] == true || source.starts_with(dir.join("volumes")) {
                writeln!(script, "mount -o remount,bind,ro {target}")?;
            }
        }
        if context.read_only_root {
            writeln!(script, "mount -o remount,ro {r}")?;
        }
        let mut exec = vec!["chroot".to_string(), root.display().to_string(), "/usr/bin/env".into(), "-i".into()];
        exec.extend(self.env(pod, container)?.into_iter().map(|(k, v)| format!("{k}={v}")));
        exec.push("/usr/bin/setpriv".into());
        exec.extend(context.setpriv_args());
        exec.push("--".into());
        let command: Vec<String> = match container["command"].as_array() {
            Some(command) => command.iter().filter_map(|a| a.as_str().map(String::from)).collect(),
            None => vec![IMAGE_ENTRYPOINT.into()],
        };
        exec.extend(command);
        exec.extend(container["args"].as_array().into_iter().flatten().filter_map(|a| a.as_str().map(String::from)));
        writeln!(script, "exec {}", exec.iter().map(|a| quote(a)).collect::<Vec<_>>().join(" "))?;
        let script_file = dir.join("run.sh");
        std::fs::write(&script_file, script)?;
        let mut command = Command::new(&self.sandbox.tools.probe);
        command
            .arg("--cgroup")
            .arg(self.sandbox.cgroup.join(cgroup))
            .args([
                "--netns",
                &self.sandbox.netns,
                "exec",
                "--",
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "sh",
            ])
            .arg(&script_file)
            .env_clear();
        Ok(command)
    }

    /// The pod's volumes, laid out under `dir`, by name.
    fn volumes(&self, pod: &Pod, dir: &Path) -> Result<BTreeMap<String, PathBuf>> {
        let mut volumes = BTreeMap::new();
        let mut list: Vec<Value> = pod.spec["volumes"].as_array().cloned().unwrap_or_default();
        if self.automounts_token(pod) {
            // What the ServiceAccount admission plugin adds to such a pod.
            list.push(serde_json::json!({"name": "kube-api-access", "projected": {"sources": [
                {"serviceAccountToken": {"path": "token"}},
                {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
                {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"fieldPath": "metadata.namespace"}}]}}
            ]}}));
        }
        for volume in &list {
            let name = volume["name"].as_str().context("volume without a name")?;
            let path = self.volume(pod, volume, &dir.join("volumes").join(name))?;
            volumes.insert(name.to_string(), path);
        }
        Ok(volumes)
    }

    fn automounts_token(&self, pod: &Pod) -> bool {
        match pod.spec["automountServiceAccountToken"].as_bool() {
            Some(automount) => automount,
            None => {
                let account = pod.spec["serviceAccountName"].as_str().unwrap_or("default");
                pod.objects
                    .iter()
                    .find(|o| o["kind"] == "ServiceAccount" && o["metadata"]["name"] == account)
                    .and_then(|a| a["automountServiceAccountToken"].as_bool())
                    .unwrap_or(true)
            }
        }
    }

    fn volume(&self, pod: &Pod, volume: &Value, dir: &Path) -> Result<PathBuf> {
        let name = &volume["name"];
        if let Some(host) = volume["hostPath"].as_object() {
            return self.host_path(host["path"].as_str().context("hostPath.path")?, host["type"].as_str());
        }
        if let Some(claim) = volume["persistentVolumeClaim"]["claimName"].as_str() {
            let claim = find(pod.objects, "PersistentVolumeClaim", claim, Some(&pod.namespace))?;
            let volume_name = claim["spec"]["volumeName"].as_str().context("the claim names no volume")?;
            let pv = find(pod.objects, "PersistentVolume", volume_name, None)?;
            ensure!(
                pv["spec"]["claimRef"]["name"] == claim["metadata"]["name"]
                    && pv["spec"]["claimRef"]["namespace"] == pod.namespace.as_str(),
                "PersistentVolume {volume_name} is not bound to this claim"
            );
            let host = &pv["spec"]["hostPath"];
            return self.host_path(host["path"].as_str().context("the volume is no hostPath")?, host["type"].as_str());
        }
        if volume["emptyDir"].is_object() {
            std::fs::create_dir_all(dir)?;
            return Ok(dir.to_path_buf());
        }
        let mut files = BTreeMap::new();
        if let Some(source) = volume.get("configMap").or_else(|| volume.get("secret")) {
            self.project(pod, volume, source, &mut files)?;
        } else if let Some(sources) = volume["projected"]["sources"].as_array() {
            for source in sources {
                let (kind, inner) = source.as_object().and_then(|o| o.iter().next()).context("empty projection")?;
                let wrapped = serde_json::json!({ kind: inner });
                self.project(pod, &wrapped, inner, &mut files)?;
            }
        } else {
            bail!("volume {name}: this kind of volume is not emulated");
        }
        write_atomic(dir, &files)?;
        Ok(dir.to_path_buf())
    }

    /// The files one ConfigMap, Secret, downward API or token source contributes.
    fn project(&self, pod: &Pod, wrapped: &Value, source: &Value, files: &mut BTreeMap<String, Vec<u8>>) -> Result<()> {
        let mut data: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        if wrapped.get("configMap").is_some() {
            let name = source["name"].as_str().context("configMap.name")?;
            if name == "kube-root-ca.crt" {
                let (ca, _) = self.service_account.as_ref().context("no API server CA on this node")?;
                data.insert("ca.crt".into(), std::fs::read(ca)?);
            } else {
                let map = find(pod.objects, "ConfigMap", name, Some(&pod.namespace))?;
                for (key, value) in map["data"].as_object().into_iter().flatten() {
                    data.insert(key.clone(), value.as_str().unwrap_or_default().as_bytes().to_vec());
                }
            }
        } else if wrapped.get("secret").is_some() {
            let name = source["secretName"].as_str().or(source["name"].as_str()).context("secret name")?;
            let secret = find(pod.objects, "Secret", name, Some(&pod.namespace))?;
            for (key, value) in secret["data"].as_object().into_iter().flatten() {
                let decoded = base64::engine::general_purpose::STANDARD.decode(value.as_str().unwrap_or_default())?;
                data.insert(key.clone(), decoded);
            }
            for (key, value) in secret["stringData"].as_object().into_iter().flatten() {
                data.insert(key.clone(), value.as_str().unwrap_or_default().as_bytes().to_vec());
            }
        } else if let Some(projected) = wrapped.get("serviceAccountToken") {
            // A token for another audience than the API server's (the SAB's) is the
            // kubelet's TokenRequest; no API server here, so a stand-in naming what it is.
            let token = match (projected["audience"].as_str(), &self.service_account) {
                (Some(audience), _) => format!("stand-in-token:{}:{audience}", pod.name),
                (None, Some((_, token))) => token.clone(),
                (None, None) => bail!("no ServiceAccount token on this node"),
            };
            files.insert(source["path"].as_str().unwrap_or("token").into(), token.into_bytes());
            return Ok(());
        } else if wrapped.get("downwardAPI").is_some() {
            for item in source["items"].as_array().into_iter().flatten() {
                let field = item["fieldRef"]["fieldPath"].as_str().context("downwardAPI fieldRef")?;
                files.insert(item["path"].as_str().context("path")?.into(), self.field(pod, field)?.into_bytes());
            }
            return Ok(());
        } else {
            bail!("projection {wrapped}: not emulated");
        }
        // `items` picks keys and names their files; without it every key is a file.
        match source["items"].as_array() {
            Some(items) => {
                for item in items {
                    let key = item["key"].as_str().context("items[].key")?;
                    let value = data.remove(key).with_context(|| format!("key {key} is not in the source"))?;
                    files.insert(item["path"].as_str().unwrap_or(key).into(), value);
                }
            }
            None => {
                for (key, value) in data {
                    // The kubelet refuses to project two sources onto one path.
                    ensure!(files.insert(key.clone(), value).is_none(), "two projected sources both write {key}");
                }
            }
        }
        Ok(())
    }

    fn host_path(&self, path: &str, kind: Option<&str>) -> Result<PathBuf> {
        let local = match path {
            "/sys/fs/cgroup" => self.sandbox.cgroup.clone(),
            "/sys/fs/bpf" => self.bpffs.clone(),
            // The node's tracefs directory itself: tracing is node-wide.
            "/sys/kernel/tracing" => PathBuf::from("/sys/kernel/tracing"),
            other => self.host.join(other.trim_start_matches('/')),
        };
        match kind {
            Some("DirectoryOrCreate") => std::fs::create_dir_all(&local)?,
            Some("Directory") => ensure!(local.is_dir(), "hostPath {path} (type Directory) does not exist on the node"),
            _ => {}
        }
        Ok(local)
    }

    /// A downward API field of the pod.
    fn field(&self, pod: &Pod, path: &str) -> Result<String> {
        Ok(match path {
            "spec.nodeName" => self.name.clone(),
            "metadata.name" => format!("{}-x7k2q", pod.name),
            "metadata.namespace" => pod.namespace.clone(),
            "spec.serviceAccountName" => pod.spec["serviceAccountName"].as_str().unwrap_or("default").into(),
            "status.hostIP" | "status.podIP" => "127.0.0.1".into(),
            other => bail!("downward API field {other} is not emulated"),
        })
    }

    /// The container's environment as the kubelet builds it.
    fn env(&self, pod: &Pod, container: &Value) -> Result<Vec<(String, String)>> {
        let (host, port) = &self.api_server;
        let mut env = vec![
            ("PATH".to_string(), "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string()),
            ("HOSTNAME".into(), self.name.clone()),
            ("KUBERNETES_SERVICE_HOST".into(), host.clone()),
            ("KUBERNETES_SERVICE_PORT".into(), port.to_string()),
        ];
        for var in container["env"].as_array().into_iter().flatten() {
            let name = var["name"].as_str().context("env name")?.to_string();
            let value = match (&var["value"], &var["valueFrom"]["fieldRef"]["fieldPath"]) {
                (Value::String(value), _) => value.clone(),
                (_, Value::String(field)) => self.field(pod, field)?,
                _ => bail!("env {name}: this source is not emulated"),
            };
            env.push((name, value));
        }
        Ok(env)
    }
}

/// The container's user, groups and privileges.
struct SecurityContext {
    uid: u64,
    gid: u64,
    groups: Vec<u64>,
    /// None: every capability (privileged).
    capabilities: Option<Vec<String>>,
    no_new_privs: bool,
    read_only_root: bool,
}

impl SecurityContext {
    fn of(pod: &Value, container: &Value) -> Self {
        let (p, c) = (&pod["securityContext"], &container["securityContext"]);
        let either = |field: &str| c[field].as_u64().or(p[field].as_u64());
        let privileged = c["privileged"] == true;
        let capabilities = (!privileged).then(|| {
            let list = |v: &Value| -> Vec<String> {
                v.as_array().into_iter().flatten().filter_map(|c| c.as_str().map(str::to_uppercase)).collect()
            };
            let drop = list(&c["capabilities"]["drop"]);
            let mut caps: Vec<String> = if drop.iter().any(|d| d == "ALL") {
                Vec::new()
            } else {
                RUNTIME_DEFAULT_CAPABILITIES.iter().map(|c| c.to_string()).filter(|c| !drop.contains(c)).collect()
            };
            caps.extend(list(&c["capabilities"]["add"]));
            caps
        });
        Self {
            uid: either("runAsUser").unwrap_or(0),
            gid: either("runAsGroup").unwrap_or(0),
            groups: p["supplementalGroups"].as_array().into_iter().flatten().filter_map(Value::as_u64).collect(),
            capabilities,
            // The runtime sets no_new_privs unless escalation is allowed (the default).
            no_new_privs: c["allowPrivilegeEscalation"] == false,
            read_only_root: c["readOnlyRootFilesystem"] == true,
        }
    }

    fn setpriv_args(&self) -> Vec<String> {
        let mut args = vec![format!("--reuid={}", self.uid), format!("--regid={}", self.gid)];
        if self.groups.is_empty() {
            args.push("--clear-groups".into());
        } else {
            args.push(format!("--groups={}", self.groups.iter().map(u64::to_string).collect::<Vec<_>>().join(",")));
        }
        if let Some(caps) = &self.capabilities {
            let mut set = String::from("-all");
            for cap in caps {
                write!(set, ",+{}", cap.to_lowercase()).expect("a string");
            }
            args.push(format!("--bounding-set={set}"));
            args.push("--inh-caps=-all".into());
        }
        if self.no_new_privs {
            args.push("--no-new-privs".into());
        }
        args
    }
}

fn find<'a>(objects: &'a [Value], kind: &str, name: &str, namespace: Option<&str>) -> Result<&'a Value> {
    objects
        .iter()
        .find(|o| {
            o["kind"] == kind
                && o["metadata"]["name"] == name
                && namespace.is_none_or(|ns| o["metadata"]["namespace"].as_str().unwrap_or("default") == ns)
        })
        .with_context(|| format!("no {kind} {name} was rendered (the kubelet would wait for it)"))
}

/// The kubelet's atomic writer layout: the files in a timestamped directory, `..data`
/// pointing at it, and each file name a link through `..data`.
fn write_atomic(dir: &Path, files: &BTreeMap<String, Vec<u8>>) -> Result<()> {
    // A second container of the same pod (or a rerun) writes the volume afresh.
    if dir.join("..data").is_symlink() {
        std::fs::remove_dir_all(dir)?;
        std::fs::create_dir_all(dir)?;
    }
    let data = dir.join("..2026_01_01_00_00_00.000000000");
    std::fs::create_dir_all(&data)?;
    for (path, content) in files {
        let file = data.join(path);
        if let Some(parent) = file.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&file, content)?;
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644))?;
    }
    std::os::unix::fs::symlink(data.file_name().expect("name"), dir.join("..data"))?;
    for path in files.keys() {
        let top = path.split('/').next().expect("a path");
        if !dir.join(top).exists() {
            std::os::unix::fs::symlink(Path::new("..data").join(top), dir.join(top))?;
        }
    }
    Ok(())
}

/// Single-quoted for sh.
fn quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', "'\\''"))
}
