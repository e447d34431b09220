//! Pod UIDs from the kubelet's cgroup layout, and only from it: under the cgroupfs driver
//! `kubepods[/<qos>]/pod<uid>/<container id>`, under the systemd driver
//! `kubepods.slice[/kubepods-<qos>.slice]/kubepods[-<qos>]-pod<uid with _>.slice/...`.
//! A pod-shaped cgroup anywhere else (a user's delegated subtree) names no pod.

/// Where the kubelet keeps pods by default, relative to the cgroup2 mount.
pub const DEFAULT_KUBEPODS: [&str; 2] = ["/kubepods.slice", "/kubepods"];

/// The caller's pod UID, only where the kubelet puts pods: under the
/// hierarchy's own `kubepods` (cgroupfs driver: `/kubepods[/burstable|/besteffort]/pod<uid>`)
/// or `kubepods.slice` (systemd driver: `/kubepods.slice[/kubepods-<qos>.slice]/
/// kubepods[-<qos>]-pod<uid_with_underscores>.slice`). Seen from inside a cgroup namespace
/// (a path starting with `..`, the namespace's root being in that hierarchy), from the
/// QoS level or the pod itself. Anywhere else (a user's delegated subtree, where anyone
/// may make `kubepods/pod<uid>`, or `systemd-run --user --unit=pod<uid>`), none.
pub fn pod_uid_of_caller(cgroup: &str) -> Option<String> {
    let segments: Vec<&str> = cgroup.split('/').filter(|s| !s.is_empty()).collect();
    let above = segments.iter().take_while(|s| **s == "..").count();
    let path = &segments[above..];
    match path.first() {
        Some(&root) if DEFAULT_KUBEPODS.iter().any(|default| default.trim_start_matches('/') == root) => {
            pod_below(Some(root), &path[1..])
        }
        _ if above > 0 => pod_below(None, path),
        _ => None,
    }
}

/// The pod UID of `cgroup` where it lies in the kubelet's pod hierarchy `kubepods` (both
/// relative to the mount, as the kernel names cgroups): `<kubepods>[/<qos>]/<pod>[/...]`.
/// For naming what a cgroup holds (denials, this node's pod cgroups) under a kubelet
/// root that may be configured (`cluster.kubepods_cgroup`); nowhere else (a delegated
/// subtree's `pod<uid>` names no pod).
pub fn pod_uid_in(kubepods: &str, cgroup: &str) -> Option<String> {
    let root: Vec<&str> = kubepods.split('/').filter(|s| !s.is_empty()).collect();
    let segments: Vec<&str> = cgroup.split('/').filter(|s| !s.is_empty()).collect();
    let rest = segments.strip_prefix(root.as_slice())?;
    pod_below(Some(root.last()?), rest)
}

/// The pod named by `rest`, the segments below the kubepods cgroup `root` (None: below
/// a cgroup namespace's root inside the hierarchy, at the QoS level or the pod).
fn pod_below(root: Option<&str>, mut rest: &[&str]) -> Option<String> {
    let systemd = root.map_or_else(|| rest.first().is_some_and(|s| s.ends_with(".slice")), |r| r.ends_with(".slice"));
    // A systemd slice repeats its parent's name: `<root>-<qos>.slice`, `<root>[-<qos>]-pod<uid>.slice`.
    let root_name = root.map_or("kubepods", |r| r.trim_end_matches(".slice"));
    let levels =
        ["burstable", "besteffort"].map(|qos| if systemd { format!("{root_name}-{qos}.slice") } else { qos.into() });
    let mut prefixes: Vec<String> = match root {
        Some(_) => vec![root_name.into()],
        None => ["", "-burstable", "-besteffort"].iter().map(|qos| format!("kubepods{qos}")).collect(),
    };
    if let Some(level) = rest.first().filter(|s| levels.iter().any(|l| l == *s)) {
        prefixes = vec![level.trim_end_matches(".slice").into()];
        rest = &rest[1..];
    }
    let pod = rest.first()?;
    let uid = if systemd {
        prefixes
            .iter()
            .find_map(|prefix| pod.strip_prefix(prefix.as_str())?.strip_prefix("-pod")?.strip_suffix(".slice"))?
            .replace('_', "-")
    } else {
        pod.strip_prefix("pod")?.to_string()
    };
    well_formed_uid(uid)
}

/// `uid` if it is a UUID in its hyphenated form, as the kubelet names pods.
fn well_formed_uid(uid: String) -> Option<String> {
    let well_formed = uid.len() == 36
        && uid
            .chars()
            .enumerate()
            .all(|(i, c)| if [8, 13, 18, 23].contains(&i) { c == '-' } else { c.is_ascii_hexdigit() });
    well_formed.then_some(uid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_uids_are_found_under_both_cgroup_drivers() {
        let uid = "0f3c2a1e-5b6d-4e7f-8a9b-0c1d2e3f4a5b";
        assert_eq!(pod_uid_of_caller(&format!("/kubepods/burstable/pod{uid}/abc123")).as_deref(), Some(uid));
        let systemd = format!(
            "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/cri-containerd-1.scope",
            uid.replace('-', "_")
        );
        assert_eq!(pod_uid_of_caller(&systemd).as_deref(), Some(uid));
        assert_eq!(pod_uid_of_caller(&format!("/kubepods/pod{uid}/abc")).as_deref(), Some(uid));
        let guaranteed = format!("/kubepods.slice/kubepods-pod{}.slice/cri-containerd-1.scope", uid.replace('-', "_"));
        assert_eq!(pod_uid_of_caller(&guaranteed).as_deref(), Some(uid));
        // Seen from a cgroup namespace whose root is a container of another pod.
        let relative = format!("/../../kubepods-besteffort-pod{}.slice/cri-containerd-2.scope", uid.replace('-', "_"));
        assert_eq!(pod_uid_of_caller(&relative).as_deref(), Some(uid));
        assert_eq!(pod_uid_of_caller("/system.slice/kubelet.service"), None);
        // Naming what a cgroup holds, under a configured kubelet root.
        assert_eq!(
            pod_uid_in("/nested/kubepods", &format!("/nested/kubepods/burstable/pod{uid}/abc")).as_deref(),
            Some(uid)
        );
        assert_eq!(pod_uid_in("nested/kubepods/", &format!("/nested/kubepods/pod{uid}")).as_deref(), Some(uid));
        // kind's kubelet: `--cgroup-root=/kubelet` under the systemd driver.
        let kind = format!(
            "/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{}.slice/x",
            uid.replace('-', "_")
        );
        assert_eq!(pod_uid_in("/kubelet.slice/kubelet-kubepods.slice", &kind).as_deref(), Some(uid));
    }

    #[test]
    fn a_pod_uid_is_not_taken_from_outside_the_kubelets_hierarchy() {
        let uid = "0f3c2a1e-5b6d-4e7f-8a9b-0c1d2e3f4a5b";
        let forged = [
            // systemd-run --user --scope --unit=pod<uid>
            format!("/user.slice/user-1000.slice/user@1000.service/app.slice/pod{uid}.scope"),
            // mkdir in a user's delegated subtree
            format!("/user.slice/user-1000.slice/user@1000.service/kubepods/pod{uid}/x"),
            format!(
                "/user.slice/user-1000.slice/user@1000.service/kubepods.slice/kubepods-pod{}.slice/x",
                uid.replace('-', "_")
            ),
            format!("/../../../user.slice/user-1000.slice/user@1000.service/kubepods/pod{uid}"),
            format!("/kubepods/burstable/notapod{uid}/x"),
        ];
        for path in &forged {
            assert_eq!(pod_uid_of_caller(path), None, "{path}");
        }
        // Nor for naming a denied cgroup, under the default or a configured root.
        for root in ["/kubepods", "/kubepods.slice", "/nested/kubepods", "/user.slice"] {
            for path in &forged {
                assert_eq!(pod_uid_in(root, path), None, "{root} {path}");
            }
        }
        let outside = format!("/nested/kubepodsx/pod{uid}");
        assert_eq!(pod_uid_in("/nested/kubepods", &outside), None);
        assert_eq!(pod_uid_in("/nested/kubepods", &format!("/nested/kubepods/burstable/x/pod{uid}")), None);
    }
}
