//! Cluster mode, end to end on this node: the agent's kube-rs watchers read SebPolicy,
//! SebRevocation, pods, namespaces and the API server's Service and EndpointSlices from a
//! stand-in API server (no cluster can be run here: the stand-in speaks the list/watch
//! wire format, it is no Kubernetes), and what they read changes admissions and what the
//! kernel denies, in real cgroups, in the sandbox's namespace.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use seb_agent::{
    admission::{Decision, Reason},
    cert::{MutationRequest, contract::ScopedIdentity},
    protocol::{Request, Response, StatusReport},
};
use seb_sandbox::{
    Sandbox, Tools,
    broker::{Broker, certified, this_process},
    kube_standin::{self, BROKER_TOKEN, KubeStandIn},
    kube_store::{ENDPOINT_SLICES, NAMESPACES, PODS, SEB_POLICIES, SEB_REVOCATIONS, SERVICES},
};
use serde_json::{Value, json};

fn tools() -> Tools {
    Tools::for_tests(env!("CARGO_BIN_EXE_seb-probe"))
}

const API: &str = "127.0.0.61:6443";
const SLICE_ADDRESS: &str = "127.0.0.63";
const NODE: &str = "node-a";

/// Poll `check` for up to 20 s.
fn eventually<T>(what: &str, check: impl FnMut() -> Option<T>) -> T {
    seb_sandbox::poll::eventually(Duration::from_secs(20), check, || format!("waiting for {what}"))
}

fn policy(epoch: u64, extra: Value) -> Value {
    let mut object = json!({"metadata": {"name": "default"}, "spec": {"policyEpoch": epoch, "protected": [
        {"cidr": "127.0.0.71", "port": 80, "protocol": "tcp"}
    ]}});
    if let (Some(spec), Some(extra)) = (object["spec"].as_object_mut(), extra.as_object()) {
        spec.extend(extra.clone());
    }
    object
}

fn revocation(epoch: u64, serials: &[&str], contracts: &[&str]) -> Value {
    json!({"metadata": {"name": "default"}, "spec": {"revocationEpoch": epoch, "serials": serials, "contractIds": contracts}})
}

struct World {
    cluster: KubeStandIn,
    broker: Broker,
    token: PathBuf,
    kubeconfig: PathBuf,
}

/// A stand-in API server holding the cluster state, and an agent in cluster mode following
/// it, with the kubelet's pod cgroups under the sandbox. `scope`: the config's enforced
/// cgroups (default: the whole sandbox). The probe reads the resources every third of
/// `staleness` seconds; anything a test sees sooner came through a watch.
fn world(label: &str, scope: Option<&[String]>, staleness: u64, seed: impl FnOnce(&KubeStandIn, &Sandbox)) -> World {
    let world = start_world(label, scope, staleness, seed);
    eventually("the cluster state to be read", || world.status().cluster.filter(|c| c.synced && c.settled));
    world
}

/// `world`, without waiting for the broker to read the cluster's state.
fn start_world(
    label: &str,
    scope: Option<&[String]>,
    staleness: u64,
    seed: impl FnOnce(&KubeStandIn, &Sandbox),
) -> World {
    let mut sandbox = Sandbox::new(label, tools()).unwrap();
    // Listeners bound to the policies' endpoints: where nothing listens, a local address
    // on a locally protected port is judged as the protected service (fail closed), so an
    // unprotected endpoint is told from a protected one by a listener that answers.
    for addr in ["127.0.0.71:80", "127.0.0.72:80"] {
        sandbox.listen(addr.parse().unwrap()).unwrap();
    }
    let cluster = kube_standin::start(&sandbox.netns, API.parse().unwrap(), &sandbox.dir).unwrap();
    {
        let mut store = cluster.store.lock().unwrap();
        store.put(NAMESPACES, json!({"metadata": {"name": "agents"}}));
        store.put(
            SERVICES,
            json!({"metadata": {"name": "kubernetes", "namespace": "default"},
                   "spec": {"clusterIP": "127.0.0.61", "ports": [{"name": "https", "port": 6443, "protocol": "TCP"}]}}),
        );
        store.put(
            ENDPOINT_SLICES,
            json!({"metadata": {"name": "kubernetes", "namespace": "default",
                                "labels": {"kubernetes.io/service-name": "kubernetes"}},
                   "addressType": "IPv4", "endpoints": [{"addresses": [SLICE_ADDRESS]}],
                   "ports": [{"name": "https", "port": 6443, "protocol": "TCP"}]}),
        );
    }
    seed(&cluster, &sandbox);
    let token = sandbox.dir.join("broker-token");
    std::fs::write(&token, BROKER_TOKEN).unwrap();
    let kubeconfig = sandbox.dir.join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: sbx\n  cluster:\n    server: https://{API}\n    certificate-authority: {}\n\
             users:\n- name: admin\n  user:\n    token: {BROKER_TOKEN}\ncontexts:\n- name: sbx\n  context:\n    cluster: sbx\n    user: admin\n\
             current-context: sbx\n",
            cluster.ca.display()
        ),
    )
    .unwrap();
    let extra = format!(
        "[kubernetes]\napi_server = \"https://{API}\"\nca_file = \"{}\"\ntoken_file = \"{}\"\n\n\
         [cluster]\nnode_name = \"{NODE}\"\nstaleness_seconds = {staleness}\nkubepods_cgroup = \"{}/kubepods\"\n",
        cluster.ca.display(),
        token.display(),
        sandbox.cgroup_relative,
    );
    let broker = match scope {
        None => Broker::start(sandbox, &extra, false).unwrap(),
        Some(scope) => Broker::start_scoped(sandbox, scope, &extra).unwrap(),
    };
    World { cluster, broker, token, kubeconfig }
}

/// Installed in the README's order (the DaemonSet, then the cluster state), a broker's
/// first list finds no SebPolicy: it settles once one is made. A watcher lists again
/// only after an error, so a node waiting for its next list stayed unready for good.
#[test]
fn a_broker_that_first_lists_no_policy_settles_once_one_is_made() {
    let w = start_world("late", Some(&[]), 90, |cluster, _| {
        cluster.store.lock().unwrap().put(SEB_REVOCATIONS, revocation(2, &[], &[]));
    });
    std::thread::sleep(Duration::from_secs(3));
    let cluster = w.status().cluster.unwrap();
    assert!(!cluster.synced && !cluster.settled, "settled without a SebPolicy: {cluster:?}");
    w.cluster.store.lock().unwrap().put(SEB_POLICIES, policy(1, json!({})));
    eventually("the broker to settle", || w.status().cluster.filter(|c| c.synced && c.settled));
    eventually("the broker to be ready", || (w.broker.sandbox.http_get("/readyz").unwrap().0 == 200).then_some(()));
}

impl World {
    fn status(&self) -> StatusReport {
        match self.broker.admin(Request::Status) {
            Response::Status(report) => *report,
            other => panic!("{other:?}"),
        }
    }

    fn epochs(&self) -> (Option<u64>, Option<u64>) {
        match self.broker.admin(Request::GetEpochs) {
            Response::Epochs(epochs) => (epochs.policy, epochs.revocation),
            other => panic!("{other:?}"),
        }
    }

    /// Propose a fresh certificate for `contract_id`, bound as `node` says, at these epochs.
    fn propose(&self, contract_id: &str, node: Option<&str>, epochs: (u64, u64)) -> (Decision, String) {
        let request = request();
        let mut agent = this_process();
        agent.node = node.map(String::from);
        let mut contract = certified(contract_id, agent, &request, "sha256:none", role());
        (contract.policy_epoch, contract.revocation_epoch) = epochs;
        let pem = self.broker.issue(&contract, &Default::default());
        (self.broker.propose(&pem, &request), pem)
    }

    /// `seb-agent <args>` as an administrator would run it, with this cluster's kubeconfig
    /// (from the exempt cgroup: the API server's address is protected).
    /// Its output: one JSON object per resource written.
    fn cli(&self, args: &[&str]) -> Vec<Value> {
        let sandbox = &self.broker.sandbox;
        let args = [&["--json"], args].concat();
        let output =
            sandbox.run_in("exempt", &sandbox.tools.agent, &args, &[("KUBECONFIG", &self.kubeconfig)]).unwrap();
        assert!(output.status.success(), "seb-agent {args:?}: {}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8(output.stdout).unwrap().lines().map(|line| serde_json::from_str(line).unwrap()).collect()
    }

    fn attempt(&self, cgroup: &str, addr: &str) -> String {
        self.broker.sandbox.attempt(cgroup, "tcp", addr).unwrap()["result"].as_str().unwrap().to_string()
    }
}

fn request() -> MutationRequest {
    serde_json::from_value(json!({"provider": "aws", "operation": "s3:PutObject", "target": "arn:aws:s3:::b/k"}))
        .unwrap()
}

fn role() -> ScopedIdentity {
    ScopedIdentity::AwsRole { role_arn: "arn:aws:iam::123456789012:role/writer".into() }
}

fn serial_of(pem: &str) -> String {
    let cert = seb_agent::cli::cert::inspect_pem(pem).unwrap();
    cert["serial"].as_str().unwrap().to_string()
}

#[test]
fn the_cluster_resources_set_epochs_endpoints_and_revocations_and_admission_fails_closed_without_them() {
    let w = world("cluster", None, 2, |cluster, _| {
        let mut store = cluster.store.lock().unwrap();
        store.put(SEB_POLICIES, policy(3, json!({})));
        store.put(SEB_REVOCATIONS, revocation(2, &[], &[]));
    });
    let _ = &w.token;
    assert_eq!(w.epochs(), (Some(3), Some(2)), "the epochs come from the cluster's resources");
    let refused = w.broker.call(Request::SetEpochs { policy: Some(9), revocation: None });
    assert!(matches!(refused, Response::Error { .. }), "a node-local epoch change is refused: {refused:?}");

    // The policy's endpoint and the API server's discovered addresses are protected.
    assert_eq!(w.attempt("workload", "127.0.0.71:80"), "EPERM");
    assert_eq!(w.attempt("workload", API), "EPERM", "the kubernetes Service's ClusterIP");
    assert_eq!(w.attempt("workload", &format!("{SLICE_ADDRESS}:6443")), "EPERM", "an EndpointSlice address");
    assert_eq!(w.attempt("workload", "127.0.0.72:80"), "ok", "an address nobody protects");

    // Node binding: the contract names this node, or its pod, or it is refused.
    let (admitted, _) = w.propose("c-node", Some(NODE), (3, 2));
    assert!(admitted.admitted, "{admitted:?}");
    let (elsewhere, _) = w.propose("c-other-node", Some("node-b"), (3, 2));
    assert_eq!(elsewhere.reason, Reason::CallerMismatch, "{elsewhere:?}");
    let (unbound, _) = w.propose("c-unbound", None, (3, 2));
    assert_eq!(unbound.reason, Reason::NotNodeBound, "{unbound:?}");

    // A revocation written to the SebRevocation reaches this node's admission state.
    w.cluster.store.lock().unwrap().put(SEB_REVOCATIONS, revocation(2, &[], &["c-revoked"]));
    let revoked = eventually("the contract revocation", || {
        let (decision, _) = w.propose("c-revoked", Some(NODE), (3, 2));
        (decision.reason == Reason::ContractRevoked).then_some(decision)
    });
    assert!(!revoked.admitted);

    // `seb-agent revoke --cluster` and `epoch --cluster` write the resources.
    let (decision, pem) = w.propose("c-serial", Some(NODE), (3, 2));
    assert!(decision.admitted, "{decision:?}");
    let serial = serial_of(&pem);
    let written = w.cli(&["revoke", "--cluster", "--serial", &serial]);
    assert_eq!(written[0]["serials"], 1, "{written:?}");
    let stored = w.cluster.store.lock().unwrap().get(SEB_REVOCATIONS, "default").unwrap();
    assert_eq!(stored["spec"]["serials"], json!([serial]));
    assert!(stored["metadata"]["annotations"]["seb.io/written-at"].is_string(), "{stored}");
    let written = w.cli(&["epoch", "--cluster", "--revocation", "5", "--policy", "4"]);
    assert_eq!((written[0]["kind"].as_str(), written[1]["kind"].as_str()), (Some("SebRevocation"), Some("SebPolicy")));
    eventually("the new epochs", || (w.epochs() == (Some(4), Some(5))).then_some(()));
    let (stale, _) = w.propose("c-old-epoch", Some(NODE), (4, 2));
    assert_eq!(stale.reason, Reason::RevocationEpochStale, "{stale:?}");
    let backwards = w.broker.sandbox.run_in(
        "exempt",
        &w.broker.sandbox.tools.agent,
        &["epoch", "--cluster", "--revocation", "1"],
        &[("KUBECONFIG", &w.kubeconfig)],
    );
    assert!(!backwards.unwrap().status.success(), "the revocation epoch does not move back");
    let backwards = w.broker.sandbox.run_in(
        "exempt",
        &w.broker.sandbox.tools.agent,
        &["epoch", "--cluster", "--policy", "3"],
        &[("KUBECONFIG", &w.kubeconfig)],
    );
    let backwards = backwards.unwrap();
    assert!(
        !backwards.status.success() && String::from_utf8_lossy(&backwards.stderr).contains("only moves forward"),
        "the policy epoch does not move back: {}",
        String::from_utf8_lossy(&backwards.stderr)
    );
    // A SebPolicy whose epoch is behind this node's is refused whole: neither the epoch
    // nor the kernel takes any of it (the endpoint it adds stays reachable).
    let current = w.cluster.store.lock().unwrap().get(SEB_POLICIES, "default").unwrap();
    let mut behind = current.clone();
    behind["spec"]["policyEpoch"] = json!(2);
    behind["spec"]["protected"] = json!([{"cidr": "127.0.0.72", "port": 80, "protocol": "tcp"}]);
    let refusals = || {
        let metrics = w.broker.sandbox.http_get("/metrics").unwrap().1;
        metrics
            .lines()
            .find(|line| line.starts_with(r#"seb_cluster_sync_errors_total{resource="SebPolicy"}"#))
            .and_then(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let refused_before = refusals();
    w.cluster.store.lock().unwrap().put(SEB_POLICIES, behind);
    // The agent saw it (and refused it) before anything is concluded from its absence.
    eventually("the policy behind to be refused", || (refusals() > refused_before).then_some(()));
    assert_eq!(w.epochs(), (Some(4), Some(5)), "a policy epoch behind this node's was recorded");
    assert_eq!(w.attempt("workload", "127.0.0.72:80"), "ok", "the refused policy reached the kernel");
    w.cluster.store.lock().unwrap().put(SEB_POLICIES, current);
    eventually("the valid policy again", || (w.attempt("workload", "127.0.0.71:80") == "EPERM").then_some(()));

    // The API server goes away: within the staleness bound, admissions are denied.
    w.cluster.set_offline(true);
    let stale = eventually("admissions to fail closed", || {
        let (decision, _) = w.propose("c-offline", Some(NODE), (4, 5));
        (decision.reason == Reason::ClusterStateStale).then_some(decision)
    });
    assert!(stale.message.contains("staleness bound"), "{stale:?}");
    // Refusing every admission, the node is not ready.
    assert_eq!(w.broker.sandbox.http_get("/readyz").unwrap().0, 503, "ready while stale");
    w.cluster.set_offline(false);
    eventually("admissions to resume", || w.propose("c-back", Some(NODE), (4, 5)).0.admitted.then_some(()));
    eventually("ready again", || (w.broker.sandbox.http_get("/readyz").unwrap().0 == 200).then_some(()));

    // The same when the watches end with 410 Gone and every list fails after: the
    // watchers' retries read nothing, and must not count as reads.
    w.cluster.expire_watches_and_go_offline();
    eventually("admissions to fail closed after 410 Gone", || {
        let (decision, _) = w.propose("c-gone", Some(NODE), (4, 5));
        (decision.reason == Reason::ClusterStateStale).then_some(())
    });
    w.cluster.set_offline(false);
    eventually("admissions to resume", || w.propose("c-back-2", Some(NODE), (4, 5)).0.admitted.then_some(()));

    // Deleting the SebRevocation does not un-revoke anything: admissions wait for it.
    w.cluster.store.lock().unwrap().delete(SEB_REVOCATIONS, "default");
    eventually("admissions to wait for the SebRevocation", || {
        let (decision, _) = w.propose("c-deleted", Some(NODE), (4, 5));
        (decision.reason == Reason::ClusterStateStale).then_some(())
    });
}

#[test]
fn the_probe_never_applies_a_policy_older_than_the_one_the_watcher_applied() {
    // The probe reads both objects every 2/3 s.
    let w = world("probe-order", None, 2, |cluster, _| {
        let mut store = cluster.store.lock().unwrap();
        store.put(SEB_POLICIES, policy(3, json!({})));
        store.put(SEB_REVOCATIONS, revocation(1, &[], &[]));
    });
    assert_eq!(w.attempt("workload", "127.0.0.71:80"), "EPERM");
    let older = w.cluster.store.lock().unwrap().get(SEB_POLICIES, "default").unwrap();
    let newer = json!({"protected": [{"cidr": "127.0.0.72", "port": 80, "protocol": "tcp"}]});
    w.cluster.store.lock().unwrap().put(SEB_POLICIES, policy(4, newer));
    eventually("the watcher to apply the newer policy", || (w.epochs().0 == Some(4)).then_some(()));

    // Every probe GET now answers with the older object, as a GET served just before the
    // write would: the probe reads X after the watcher applied Y.
    let probe_gets = || {
        let store = w.cluster.store.lock().unwrap();
        store.requests.iter().filter(|(collection, query)| collection == SEB_POLICIES && query.is_empty()).count()
    };
    let before = probe_gets();
    w.cluster.store.lock().unwrap().stale_reads.insert((SEB_POLICIES.into(), "default".into()), older);
    eventually("three probe reads of the older policy", || (probe_gets() >= before + 3).then_some(()));
    assert_eq!(w.epochs().0, Some(4), "the older policy's epoch came back");
    assert_eq!(w.attempt("workload", "127.0.0.72:80"), "EPERM", "the newer policy's endpoint is enforced");
    assert_eq!(w.attempt("workload", "127.0.0.71:80"), "ok", "the older policy's endpoint is not");
    assert!(w.status().cluster.unwrap().synced);
}

fn pod(uid: &str, name: &str, node: &str, labels: Value, container: &str) -> Value {
    json!({"metadata": {"uid": uid, "name": name, "namespace": "agents", "labels": labels},
           "spec": {"nodeName": node, "containers": [{"name": "agent", "image": "agent"}]},
           "status": {"containerStatuses": [{"name": "agent", "containerID": format!("containerd://{container}"),
                      "image": "agent", "imageID": "", "ready": true, "restartCount": 0}]}})
}

/// Make the kubelet's cgroups for a pod and its container under the sandbox; returns the
/// container's cgroup relative to the sandbox root.
fn pod_cgroups(root: &Path, uid: &str, container: &str) -> String {
    let relative = format!("kubepods/burstable/pod{uid}/{container}");
    std::fs::create_dir_all(root.join(&relative)).unwrap();
    relative
}

#[test]
fn pods_the_policy_selects_are_enforced_as_they_come_and_go_and_denials_name_them() {
    const ENFORCED: &str = "0f3c2a1e-5b6d-4e7f-8a9b-0c1d2e3f4a5b";
    const OTHER: &str = "11111111-2222-3333-4444-555555555555";
    const IN_NAMESPACE: &str = "44444444-2222-3333-4444-555555555555";
    let (c1, c2, c3) = (format!("{:064x}", 1), format!("{:064x}", 2), format!("{:064x}", 3));
    let mut cgroups = (String::new(), String::new(), String::new());
    // The probe runs every 30 s: every change below reaches the agent through its watches.
    let w = world("pods", Some(&[]), 90, |cluster, sandbox| {
        // The kubelet's cgroups, where the agent is told to look for them.
        cgroups.0 = pod_cgroups(&sandbox.cgroup, ENFORCED, &c1);
        cgroups.1 = pod_cgroups(&sandbox.cgroup, OTHER, &c2);
        cgroups.2 = pod_cgroups(&sandbox.cgroup, IN_NAMESPACE, &c3);
        let mut store = cluster.store.lock().unwrap();
        let selector = json!({"scope": {"podSelector": {"seb.io/enforce": "true"},
                                        "namespaceSelector": {"seb.io/agents": "true"}}});
        store.put(SEB_POLICIES, policy(1, selector));
        store.put(SEB_REVOCATIONS, revocation(1, &[], &[]));
        store.put(PODS, pod(ENFORCED, "agent-0", NODE, json!({"seb.io/enforce": "true"}), &c1));
        store.put(PODS, pod(OTHER, "web-0", NODE, json!({}), &c2));
        let mut in_namespace = pod(IN_NAMESPACE, "ml-0", NODE, json!({}), &c3);
        in_namespace["metadata"]["namespace"] = json!("ai");
        store.put(PODS, in_namespace);
        store.put(NAMESPACES, json!({"metadata": {"name": "ai"}}));
        store.put(
            PODS,
            pod("33333333-2222-3333-4444-555555555555", "far", "node-b", json!({"seb.io/enforce": "true"}), &c1),
        );
    });
    eventually("the selected pod to be enforced", || (w.attempt(&cgroups.0, "127.0.0.71:80") == "EPERM").then_some(()));
    assert_eq!(w.attempt(&cgroups.1, "127.0.0.71:80"), "ok", "a pod the policy does not select");
    assert_eq!(w.attempt("workload", "127.0.0.71:80"), "ok", "outside every pod: the config enforces nothing");

    // The denial names the pod and the container.
    let outcome = w.broker.sandbox.attempt(&cgroups.0, "tcp", "127.0.0.71:80").unwrap();
    let denial = w.broker.sandbox.wait_for_denial(outcome["cookie"].as_u64().unwrap()).unwrap();
    assert_eq!(denial["pod_uid"], ENFORCED);
    assert_eq!(denial["pod_namespace"], "agents");
    assert_eq!(denial["pod_name"], "agent-0");
    assert_eq!(denial["container_id"], c1);
    assert_eq!(denial["container_name"], "agent");
    // The denial metric names a known pod, until the pod is gone.
    let series = r#"seb_kernel_denials_total{hook="connect4",namespace="agents",pod="agent-0"}"#;
    let metrics = || w.broker.sandbox.http_get("/metrics").unwrap().1;
    eventually("the pod's denial series", || metrics().contains(series).then_some(()));

    // Labelled later: enforced. Deleted: its links go.
    w.cluster.store.lock().unwrap().put(PODS, pod(OTHER, "web-0", NODE, json!({"seb.io/enforce": "true"}), &c2));
    eventually("the newly labelled pod to be enforced", || {
        (w.attempt(&cgroups.1, "127.0.0.71:80") == "EPERM").then_some(())
    });
    let links_before = w.broker.sandbox.pinned_links().unwrap().len();
    w.cluster.store.lock().unwrap().delete(PODS, "agent-0");
    eventually("the deleted pod's denial series to go", || (!metrics().contains(series)).then_some(()));
    // Deleted while its cgroup is there (a forced delete: its containers run out their
    // grace period), it stays enforced: the sockets it opened while enforced would be
    // judged by nothing once its links were off. (Given the time its links took to go.)
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(w.attempt(&cgroups.0, "127.0.0.71:80"), "EPERM", "a deleted pod whose cgroup is there");
    assert_eq!(w.broker.sandbox.pinned_links().unwrap().len(), links_before);
    // Once its cgroup is gone, so are its links.
    let container = w.broker.sandbox.cgroup.join(&cgroups.0);
    std::fs::remove_dir(&container).unwrap();
    std::fs::remove_dir(container.parent().unwrap()).unwrap();
    eventually("the deleted pod's links to go", || {
        (w.broker.sandbox.pinned_links().unwrap().len() < links_before).then_some(())
    });
    // Still listed and no longer selected: released at once (the policy's choice).
    w.cluster.store.lock().unwrap().put(PODS, pod(OTHER, "web-0", NODE, json!({}), &c2));
    eventually("the unlabelled pod to be released", || (w.attempt(&cgroups.1, "127.0.0.71:80") == "ok").then_some(()));

    // A pod without the label, once its namespace gets the namespace selector's label.
    assert_eq!(w.attempt(&cgroups.2, "127.0.0.71:80"), "ok", "its namespace is not selected yet");
    w.cluster
        .store
        .lock()
        .unwrap()
        .put(NAMESPACES, json!({"metadata": {"name": "ai", "labels": {"seb.io/agents": "true"}}}));
    eventually("the pod of the labelled namespace to be enforced", || {
        (w.attempt(&cgroups.2, "127.0.0.71:80") == "EPERM").then_some(())
    });

    // Selected, and listed before the kubelet made its cgroup: enforced as soon as the
    // cgroup is there, without waiting for another pod event or the probe (30 s here).
    const LATE: &str = "55555555-2222-3333-4444-555555555555";
    let c4 = format!("{:064x}", 4);
    w.cluster.store.lock().unwrap().put(PODS, pod(LATE, "late-0", NODE, json!({"seb.io/enforce": "true"}), &c4));
    std::thread::sleep(Duration::from_secs(1));
    let late = pod_cgroups(&w.broker.sandbox.cgroup, LATE, &c4);
    let made = std::time::Instant::now();
    eventually("the late pod to be enforced", || (w.attempt(&late, "127.0.0.71:80") == "EPERM").then_some(()));
    assert!(made.elapsed() < Duration::from_secs(5), "enforced {:?} after its cgroup appeared", made.elapsed());
}
