//! Rules the API server (or Pod Security admission) applies to a pod spec that the
//! offline OpenAPI schemas cannot express. Each cites the function that enforces it in
//! k8s.io/kubernetes `pkg/apis/core/validation/validation.go` (or
//! k8s.io/pod-security-admission `policy/`), as of Kubernetes 1.32.

use std::collections::HashSet;

use serde_json::Value;

/// Every pod template in `objects` (Pods, and the workloads that carry one), with where
/// it is, checked: one line per violation, naming the object and field.
pub fn violations(objects: &[Value]) -> Vec<String> {
    let mut found = Vec::new();
    for object in objects {
        let Some((spec, path)) = pod_spec(object) else { continue };
        let name = format!(
            "{} {}/{}",
            object["kind"].as_str().unwrap_or("?"),
            object["metadata"]["namespace"].as_str().unwrap_or("-"),
            object["metadata"]["name"].as_str().unwrap_or("?")
        );
        let mut report = |field: String, problem: String| found.push(format!("{name}: {path}.{field}: {problem}"));
        check_pod_spec(spec, &mut report);
        if let Some(level) = pod_security_level(objects, object) {
            check_pod_security(spec, &level, &mut report);
        }
    }
    found
}

fn pod_spec(object: &Value) -> Option<(&Value, &'static str)> {
    match object["kind"].as_str()? {
        "Pod" => Some((&object["spec"], "spec")),
        "DaemonSet" | "Deployment" | "StatefulSet" | "ReplicaSet" | "Job" => {
            Some((&object["spec"]["template"]["spec"], "spec.template.spec"))
        }
        _ => None,
    }
}

fn list(value: &Value) -> &[Value] {
    value.as_array().map(Vec::as_slice).unwrap_or_default()
}

/// Every container with its field path: init containers, then containers.
fn containers(spec: &Value) -> impl Iterator<Item = (String, &Value)> {
    let init = list(&spec["initContainers"]).iter().enumerate().map(|(i, c)| (format!("initContainers[{i}]"), c));
    let main = list(&spec["containers"]).iter().enumerate().map(|(i, c)| (format!("containers[{i}]"), c));
    init.chain(main)
}

fn check_pod_spec(spec: &Value, report: &mut impl FnMut(String, String)) {
    // validateVolumes: volume names are unique.
    let mut volumes = HashSet::new();
    for (i, volume) in list(&spec["volumes"]).iter().enumerate() {
        let name = volume["name"].as_str().unwrap_or_default();
        if !volumes.insert(name) {
            report(format!("volumes[{i}].name"), format!("Duplicate value: {name:?}"));
        }
    }
    // validateInitContainers / validateContainers: names unique across both lists.
    let mut names = HashSet::new();
    let host_network = spec["hostNetwork"] == true;
    for (path, container) in containers(spec) {
        let name = container["name"].as_str().unwrap_or_default();
        if !names.insert(name) {
            report(format!("{path}.name"), format!("Duplicate value: {name:?}"));
        }
        let privileged = container["securityContext"]["privileged"] == true;
        check_mounts(&path, container, &volumes, privileged, report);
        check_env(&path, container, report);
        check_security_context(&path, &container["securityContext"], report);
        // validateHostNetwork: with the host's network, a hostPort is the containerPort.
        if host_network {
            for (i, port) in list(&container["ports"]).iter().enumerate() {
                if let Some(host_port) = port["hostPort"].as_i64()
                    && Some(host_port) != port["containerPort"].as_i64()
                {
                    report(
                        format!("{path}.ports[{i}].hostPort"),
                        "must match `containerPort` when `hostNetwork` is true".into(),
                    );
                }
            }
        }
    }
}

fn check_mounts(
    path: &str,
    container: &Value,
    volumes: &HashSet<&str>,
    privileged: bool,
    report: &mut impl FnMut(String, String),
) {
    let mut mount_paths = HashSet::new();
    for (i, mount) in list(&container["volumeMounts"]).iter().enumerate() {
        let field = |name: &str| format!("{path}.volumeMounts[{i}].{name}");
        let name = mount["name"].as_str().unwrap_or_default();
        // ValidateVolumeMounts: the volume exists, and each mountPath is used once.
        if !volumes.contains(name) {
            report(field("name"), format!("Not found: {name:?}"));
        }
        let mount_path = mount["mountPath"].as_str().unwrap_or_default();
        if !mount_paths.insert(mount_path) {
            report(field("mountPath"), format!("Invalid value: {mount_path:?}: must be unique"));
        }
        // ValidateVolumeMounts → validateLocalDescendingPath: a subPath stays inside the volume.
        if let Some(sub_path) = mount["subPath"].as_str() {
            if sub_path.starts_with('/') {
                report(field("subPath"), "must be a relative path".into());
            }
            if sub_path.split('/').any(|part| part == "..") {
                report(field("subPath"), "must not contain '..'".into());
            }
            if mount["subPathExpr"].is_string() {
                report(field("subPathExpr"), "subPathExpr and subPath are mutually exclusive".into());
            }
        }
        // validateMountPropagation: Bidirectional only in a privileged container.
        match mount["mountPropagation"].as_str() {
            None | Some("None" | "HostToContainer") => {}
            Some("Bidirectional") if privileged => {}
            Some("Bidirectional") => report(
                field("mountPropagation"),
                "Bidirectional mount propagation is available only to privileged containers".into(),
            ),
            Some(other) => report(field("mountPropagation"), format!("Unsupported value: {other:?}")),
        }
    }
}

/// The downward API fields an env var may read (validEnvDownwardAPIFieldPathExpressions).
const ENV_FIELD_PATHS: [&str; 9] = [
    "metadata.name",
    "metadata.namespace",
    "metadata.uid",
    "spec.nodeName",
    "spec.serviceAccountName",
    "status.hostIP",
    "status.hostIPs",
    "status.podIP",
    "status.podIPs",
];

fn check_env(path: &str, container: &Value, report: &mut impl FnMut(String, String)) {
    for (i, env) in list(&container["env"]).iter().enumerate() {
        let name = env["name"].as_str().unwrap_or_default();
        // ValidateEnv → validateEnvVarName (IsEnvVarName in 1.32): [-._a-zA-Z][-._a-zA-Z0-9]*.
        let valid = name.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || "-._".contains(c))
            && name.chars().all(|c| c.is_ascii_alphanumeric() || "-._".contains(c));
        if !valid {
            report(
                format!("{path}.env[{i}].name"),
                format!("Invalid value: {name:?}: a valid environment variable name"),
            );
        }
        // validateEnvVarValueFrom → validateObjectFieldSelector.
        if let Some(field_path) = env["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
            let labelled =
                field_path.starts_with("metadata.labels[") || field_path.starts_with("metadata.annotations[");
            if !labelled && !ENV_FIELD_PATHS.contains(&field_path) {
                report(
                    format!("{path}.env[{i}].valueFrom.fieldRef.fieldPath"),
                    format!("Unsupported value: {field_path:?}"),
                );
            }
        }
    }
}

fn check_security_context(path: &str, context: &Value, report: &mut impl FnMut(String, String)) {
    // ValidateSecurityContext: no_new_privs cannot hold in a privileged container or one
    // granted CAP_SYS_ADMIN (the API server matches the "CAP_SYS_ADMIN" spelling; container
    // runtimes accept "SYS_ADMIN" as the same capability, so both are refused here).
    if context["allowPrivilegeEscalation"] != false {
        return;
    }
    if context["privileged"] == true {
        report(
            format!("{path}.securityContext"),
            "cannot set `allowPrivilegeEscalation` to false and `privileged` to true".into(),
        );
    }
    if list(&context["capabilities"]["add"]).iter().any(|c| c == "CAP_SYS_ADMIN" || c == "SYS_ADMIN") {
        report(
            format!("{path}.securityContext"),
            "cannot set `allowPrivilegeEscalation` to false and `capabilities.Add` CAP_SYS_ADMIN".into(),
        );
    }
}

/// The Pod Security level the object's namespace enforces, if that namespace is rendered
/// alongside it.
fn pod_security_level(objects: &[Value], object: &Value) -> Option<String> {
    let namespace = object["metadata"]["namespace"].as_str()?;
    objects
        .iter()
        .find(|o| o["kind"] == "Namespace" && o["metadata"]["name"] == namespace)
        .and_then(|n| n["metadata"]["labels"]["pod-security.kubernetes.io/enforce"].as_str())
        .map(String::from)
}

/// Pod Security admission's `baseline` checks that concern our pods (policy/check_host*.go,
/// check_privileged.go, check_capabilities_baseline.go, check_seccompProfile_baseline.go,
/// check_appArmorProfile.go, check_seLinuxOptions.go, check_procMount.go), and for
/// `restricted` also check_runAsNonRoot.go, check_runAsUser.go,
/// check_allowPrivilegeEscalation.go, check_capabilities_restricted.go,
/// check_seccompProfile_restricted.go and check_restrictedVolumes.go.
fn check_pod_security(spec: &Value, level: &str, report: &mut impl FnMut(String, String)) {
    if level != "baseline" && level != "restricted" {
        return;
    }
    let restricted = level == "restricted";
    for host in ["hostNetwork", "hostPID", "hostIPC"] {
        if spec[host] == true {
            report(host.into(), format!("forbidden by Pod Security {level:?}"));
        }
    }
    const RESTRICTED_VOLUMES: [&str; 8] =
        ["configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected", "secret"];
    for (i, volume) in list(&spec["volumes"]).iter().enumerate() {
        let kinds: Vec<&String> =
            volume.as_object().map(|v| v.keys().filter(|k| *k != "name").collect()).unwrap_or_default();
        for kind in kinds {
            if kind == "hostPath" || (restricted && !RESTRICTED_VOLUMES.contains(&kind.as_str())) {
                report(format!("volumes[{i}].{kind}"), format!("forbidden by Pod Security {level:?}"));
            }
        }
    }
    let pod_non_root = spec["securityContext"]["runAsNonRoot"] == true;
    let pod_seccomp = spec["securityContext"]["seccompProfile"]["type"].as_str();
    check_confinement("securityContext", &spec["securityContext"], level, report);
    if restricted && spec["securityContext"]["runAsUser"] == 0 {
        report("securityContext.runAsUser".into(), "must not be 0 (restricted)".into());
    }
    for (path, container) in containers(spec) {
        let context = &container["securityContext"];
        check_confinement(&format!("{path}.securityContext"), context, level, report);
        if restricted && context["runAsUser"] == 0 {
            report(format!("{path}.securityContext.runAsUser"), "must not be 0 (restricted)".into());
        }
        if !matches!(context["procMount"].as_str(), None | Some("Default")) {
            report(format!("{path}.securityContext.procMount"), format!("must be Default (Pod Security {level:?})"));
        }
        if context["privileged"] == true {
            report(format!("{path}.securityContext.privileged"), format!("forbidden by Pod Security {level:?}"));
        }
        for port in list(&container["ports"]) {
            if port["hostPort"].as_i64().is_some_and(|p| p != 0) {
                report(format!("{path}.ports"), format!("hostPort forbidden by Pod Security {level:?}"));
            }
        }
        const BASELINE_CAPABILITIES: [&str; 13] = [
            "AUDIT_WRITE",
            "CHOWN",
            "DAC_OVERRIDE",
            "FOWNER",
            "FSETID",
            "KILL",
            "MKNOD",
            "NET_BIND_SERVICE",
            "SETFCAP",
            "SETGID",
            "SETPCAP",
            "SETUID",
            "SYS_CHROOT",
        ];
        for cap in list(&context["capabilities"]["add"]).iter().filter_map(Value::as_str) {
            let allowed = if restricted { cap == "NET_BIND_SERVICE" } else { BASELINE_CAPABILITIES.contains(&cap) };
            if !allowed {
                report(
                    format!("{path}.securityContext.capabilities.add"),
                    format!("{cap} forbidden by Pod Security {level:?}"),
                );
            }
        }
        if !restricted {
            continue;
        }
        if context["allowPrivilegeEscalation"] != false {
            report(format!("{path}.securityContext.allowPrivilegeEscalation"), "must be false (restricted)".into());
        }
        if !list(&context["capabilities"]["drop"]).iter().any(|c| c == "ALL") {
            report(format!("{path}.securityContext.capabilities.drop"), "must include ALL (restricted)".into());
        }
        if context["runAsNonRoot"] != true && !(pod_non_root && context["runAsNonRoot"].is_null()) {
            report(format!("{path}.securityContext.runAsNonRoot"), "must be true (restricted)".into());
        }
        let seccomp = context["seccompProfile"]["type"].as_str().or(pod_seccomp);
        if !matches!(seccomp, Some("RuntimeDefault" | "Localhost")) {
            report(
                format!("{path}.securityContext.seccompProfile"),
                "must be RuntimeDefault or Localhost (restricted)".into(),
            );
        }
    }
}

/// `baseline`'s rules on a pod's or a container's confinement: no `Unconfined` seccomp or
/// AppArmor profile, and SELinux options only of the container types, with no user or role.
fn check_confinement(path: &str, context: &Value, level: &str, report: &mut impl FnMut(String, String)) {
    for profile in ["seccompProfile", "appArmorProfile"] {
        if context[profile]["type"] == "Unconfined" {
            report(format!("{path}.{profile}"), format!("Unconfined forbidden by Pod Security {level:?}"));
        }
    }
    let selinux = &context["seLinuxOptions"];
    let allowed_type = matches!(
        selinux["type"].as_str(),
        None | Some("" | "container_t" | "container_init_t" | "container_kvm_t" | "container_engine_t")
    );
    if !allowed_type || !selinux["user"].is_null() || !selinux["role"].is_null() {
        report(format!("{path}.seLinuxOptions"), format!("type, user or role forbidden by Pod Security {level:?}"));
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::violations;

    fn daemon_set(container: Value, spec: Value) -> Value {
        let mut pod =
            json!({"containers": [container], "volumes": [{"name": "bpffs", "hostPath": {"path": "/sys/fs/bpf"}}]});
        pod.as_object_mut().unwrap().extend(spec.as_object().unwrap().clone());
        json!({"kind": "DaemonSet", "metadata": {"name": "d", "namespace": "n"}, "spec": {"template": {"spec": pod}}})
    }

    fn bpffs_mount(propagation: &str, privileged: bool) -> Value {
        json!({"name": "c", "securityContext": {"privileged": privileged},
               "volumeMounts": [{"name": "bpffs", "mountPath": "/sys/fs/bpf", "mountPropagation": propagation}]})
    }

    #[test]
    fn bidirectional_propagation_needs_a_privileged_container() {
        let bad = violations(&[daemon_set(bpffs_mount("Bidirectional", false), json!({}))]);
        assert_eq!(bad.len(), 1, "{bad:?}");
        assert!(bad[0].contains("volumeMounts[0].mountPropagation") && bad[0].contains("privileged"), "{bad:?}");
        assert!(violations(&[daemon_set(bpffs_mount("Bidirectional", true), json!({}))]).is_empty());
        assert!(violations(&[daemon_set(bpffs_mount("HostToContainer", false), json!({}))]).is_empty());
    }

    #[test]
    fn host_network_host_port_must_be_the_container_port() {
        let container = |host: u16| json!({"name": "c", "ports": [{"containerPort": 9464, "hostPort": host}]});
        let bad = violations(&[daemon_set(container(9465), json!({"hostNetwork": true}))]);
        assert!(bad.len() == 1 && bad[0].contains("ports[0].hostPort"), "{bad:?}");
        assert!(violations(&[daemon_set(container(9464), json!({"hostNetwork": true}))]).is_empty());
        assert!(violations(&[daemon_set(container(9465), json!({}))]).is_empty());
    }

    #[test]
    fn no_new_privs_conflicts_and_mount_and_env_rules() {
        let container = json!({"name": "c",
            "securityContext": {"allowPrivilegeEscalation": false, "capabilities": {"add": ["SYS_ADMIN"]}},
            "env": [{"name": "1BAD", "value": "x"}, {"name": "N", "valueFrom": {"fieldRef": {"fieldPath": "spec.hostname"}}}],
            "volumeMounts": [{"name": "missing", "mountPath": "/a"}, {"name": "bpffs", "mountPath": "/a", "subPath": "../x"}]});
        let bad = violations(&[daemon_set(container, json!({}))]);
        for expected in ["CAP_SYS_ADMIN", "env[0].name", "fieldRef.fieldPath", "Not found", "must be unique", "'..'"] {
            assert!(bad.iter().any(|v| v.contains(expected)), "{expected} not reported: {bad:?}");
        }
    }

    #[test]
    fn pod_security_baseline_refuses_host_path() {
        let namespace = json!({"kind": "Namespace", "metadata": {"name": "n",
            "labels": {"pod-security.kubernetes.io/enforce": "baseline"}}});
        let bad = violations(&[namespace.clone(), daemon_set(json!({"name": "c"}), json!({}))]);
        assert!(bad.iter().any(|v| v.contains("volumes[0].hostPath")), "{bad:?}");
        let pvc = json!({"kind": "Pod", "metadata": {"name": "p", "namespace": "n"}, "spec": {"containers": [{"name": "c"}],
            "volumes": [{"name": "s", "persistentVolumeClaim": {"claimName": "s"}}]}});
        assert!(violations(&[namespace, pvc]).is_empty());
    }

    #[test]
    fn pod_security_refuses_unconfined_profiles_root_and_selinux_types() {
        let namespace = |level: &str| json!({"kind": "Namespace", "metadata": {"name": "n", "labels": {"pod-security.kubernetes.io/enforce": level}}});
        let pod = |container: Value, pod_context: Value| {
            json!({"kind": "Pod", "metadata": {"name": "p", "namespace": "n"},
                   "spec": {"containers": [container], "securityContext": pod_context}})
        };
        let unconfined = pod(
            json!({"name": "c", "securityContext": {"appArmorProfile": {"type": "Unconfined"}, "procMount": "Unmasked"}}),
            json!({"seccompProfile": {"type": "Unconfined"}, "seLinuxOptions": {"type": "spc_t"}}),
        );
        let bad = violations(&[namespace("baseline"), unconfined]);
        for expected in ["appArmorProfile", "procMount", "securityContext.seccompProfile", "seLinuxOptions"] {
            assert!(bad.iter().any(|v| v.contains(expected)), "{expected} not reported: {bad:?}");
        }
        let root = pod(
            json!({"name": "c", "securityContext": {"runAsUser": 0, "runAsNonRoot": true, "allowPrivilegeEscalation": false,
                   "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}}}),
            json!({}),
        );
        let bad = violations(&[namespace("restricted"), root.clone()]);
        assert_eq!(bad.len(), 1, "{bad:?}");
        assert!(bad[0].contains("runAsUser"), "{bad:?}");
        assert!(violations(&[namespace("baseline"), root]).is_empty());
    }
}
