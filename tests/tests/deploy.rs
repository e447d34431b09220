//! The broker DaemonSet of the base and of every overlay, rendered by kustomize and run
//! as the kubelet would run it (`seb_sandbox::kubelet`): its init container, then the
//! broker, reading the agent.toml the rendered ConfigMap carries, with exactly the
//! capabilities, user and mounts the manifest gives it, until `/readyz` answers 200. Then
//! the example agent pod (deploy/agent-pod/), unprivileged and reaching the socket through
//! its PersistentVolumeClaim, reads the epochs over `$SEB_SOCKET`.

use std::{
    process::{Child, Stdio},
    thread,
    time::{Duration, Instant},
};

use seb_sandbox::{
    Sandbox, Tools,
    deploy::{self, find},
    kube_standin::{self, BROKER_TOKEN, KubeStandIn},
    kube_store::{ENDPOINT_SLICES, SEB_POLICIES, SEB_REVOCATIONS, SERVICES},
    kubelet::{Node, Pod},
};
use serde_json::{Value, json};

fn tools() -> Tools {
    Tools::for_tests(env!("CARGO_BIN_EXE_seb-probe"))
}

const API: (&str, u16) = ("127.0.0.61", 6443);

/// The agent, killed if the test fails before it stops it.
struct Running(Option<Child>);

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(child) = &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The cluster's state as deploy/cluster-state/ renders it, and the API server's Service,
/// in a stand-in API server in the sandbox.
fn api_server(sandbox: &Sandbox) -> KubeStandIn {
    let cluster =
        kube_standin::start(&sandbox.netns, format!("{}:{}", API.0, API.1).parse().unwrap(), &sandbox.dir).unwrap();
    let state = deploy::render(&deploy::deploy_dir().join("cluster-state")).unwrap();
    let mut store = cluster.store.lock().unwrap();
    store.put(SEB_POLICIES, find(&state, "SebPolicy", "default").unwrap().clone());
    store.put(SEB_REVOCATIONS, find(&state, "SebRevocation", "default").unwrap().clone());
    store.put(
        SERVICES,
        json!({"metadata": {"name": "kubernetes", "namespace": "default"},
               "spec": {"clusterIP": API.0, "ports": [{"name": "https", "port": API.1, "protocol": "TCP"}]}}),
    );
    store.put(
        ENDPOINT_SLICES,
        json!({"metadata": {"name": "kubernetes", "namespace": "default",
                            "labels": {"kubernetes.io/service-name": "kubernetes"}},
               "addressType": "IPv4", "endpoints": [{"addresses": [API.0]}],
               "ports": [{"name": "https", "port": API.1, "protocol": "TCP"}]}),
    );
    drop(store);
    cluster
}

fn run_overlay(overlay: &str) {
    let sandbox = Sandbox::new(&format!("deploy-{overlay}"), tools()).unwrap();
    let objects = deploy::render(&deploy::deploy_dir().join(overlay)).unwrap();
    let daemon_set = find(&objects, "DaemonSet", "seb-agent").unwrap();
    let pod = Pod::of(daemon_set, &objects).unwrap();
    // What the kubelet (systemd cgroup driver) made on this node before any pod ran.
    std::fs::create_dir_all(sandbox.cgroup.join("kubepods.slice")).unwrap();
    // The node's name server: the node-local config protects a host name, and the agent
    // is not ready until it has been answered.
    sandbox.answer_dns_with_no_records(seb_sandbox::kubelet::CLUSTER_DNS.parse().unwrap()).unwrap();
    let bpffs = std::path::PathBuf::from("/sys/fs/bpf").join(&sandbox.name);
    std::fs::create_dir_all(&bpffs).unwrap();
    let _cleanup = BpffsDir(bpffs.clone());
    let cluster = (overlay == "cluster").then(|| api_server(&sandbox));
    let node = Node {
        sandbox: &sandbox,
        name: "node-a".into(),
        host: sandbox.dir.join("host"),
        bpffs: bpffs.clone(),
        api_server: (API.0.into(), API.1),
        service_account: cluster.as_ref().map(|c| (c.ca.clone(), BROKER_TOKEN.to_string())),
    };
    let pod_dir = sandbox.dir.join("pod");

    for (i, init) in pod.init_containers().iter().enumerate() {
        let output =
            node.container_command(&pod, init, &pod_dir.join(format!("init-{i}")), "broker").unwrap().output().unwrap();
        assert!(
            output.status.success(),
            "{overlay}: init container {} failed: {}",
            init["name"],
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let container = pod.container("seb-agent").unwrap();
    let mut command = node.container_command(&pod, container, &pod_dir.join("seb-agent"), "broker").unwrap();
    let log = std::fs::File::create(sandbox.dir.join("agent.log")).unwrap();
    let mut agent = Running(Some(command.stdout(Stdio::null()).stderr(log).spawn().unwrap()));
    let logs = || std::fs::read_to_string(sandbox.dir.join("agent.log")).unwrap_or_default();

    // The kubelet's readiness probe: the port the manifest names, on the pod's (host) network.
    let port = container["readinessProbe"]["httpGet"]["port"].clone();
    assert_eq!(port, "metrics", "{overlay}: the readiness probe moved");
    assert_eq!(container["ports"][0]["containerPort"], 9464);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = agent.0.as_mut().unwrap().try_wait().unwrap() {
            panic!("{overlay}: the broker exited with {status}:\n{}", logs());
        }
        if matches!(sandbox.http_get("/readyz"), Ok((200, _))) {
            break;
        }
        assert!(Instant::now() < deadline, "{overlay}: /readyz did not answer 200 within 30 s:\n{}", logs());
        thread::sleep(Duration::from_millis(200));
    }
    // It read the rendered config: its pins are where that config put them, on the node's bpffs.
    assert!(bpffs.join("seb").join("links").read_dir().unwrap().next().is_some(), "{overlay}: nothing pinned");
    // Inside its cgroup namespace it found the cgroup the kernel named for it as its own,
    // and armed it.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let [tgid, cgroup] = seb_sandbox::tamper::agent_entry(&bpffs.join("seb")).unwrap();
        if tgid != 0 && cgroup != 0 && cgroup & seb_common::agent_slots::UNARMED == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "{overlay}: the agent's cgroup was never armed ({cgroup:#x}):\n{}", logs());
        thread::sleep(Duration::from_millis(100));
    }

    // The example agent pod, from the socket's PersistentVolume, as uid 10000.
    let agents = deploy::render(&deploy::deploy_dir().join("agent-pod")).unwrap();
    let agent_pod = Pod::of(find(&agents, "Pod", "example-agent").unwrap(), &agents).unwrap();
    let mut container = agent_pod.container("agent").unwrap().clone();
    container["args"].as_array_mut().unwrap().push("--json".into());
    let output = node
        .container_command(&agent_pod, &container, &sandbox.dir.join("agent-pod"), "workload")
        .unwrap()
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{overlay}: the agent pod could not reach the broker: {stderr}\n{}", logs());
    let epochs: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert!(epochs.get("policy").is_some(), "{overlay}: {epochs}");
    if overlay == "cluster" {
        assert_eq!(epochs["policy"], 1, "{overlay}: the SebPolicy's epoch was not applied: {epochs}");
    }
    // A request that identifies its caller (a passthrough read), from the same pod: the
    // broker, root without CAP_KILL, still tells a live caller of another uid from one
    // that exited, and answers what it asked (refused: no such passthrough read here).
    container["args"] = json!(["read", "--request", "-", "--json"]);
    let mut reader = node
        .container_command(&agent_pod, &container, &sandbox.dir.join("agent-pod"), "workload")
        .unwrap()
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let request = json!({"provider": "http", "operation": "get", "target": "https://127.0.0.1/status"});
    std::io::Write::write_all(&mut reader.stdin.take().unwrap(), request.to_string().as_bytes()).unwrap();
    let output = reader.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("passthrough") && !stderr.contains("has exited"),
        "{overlay}: the read from uid 10000 was not judged on what it asked: {stderr}\n{}",
        logs()
    );

    // SIGTERM, as the kubelet stops a pod.
    let mut child = agent.0.take().unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "{overlay}: the broker stopped with {status}:\n{}", logs());
    drop(cluster);
    let _ = seb_agent::enforcement::loader::unload(&seb_agent::enforcement::PinLayout::new(&bpffs.join("seb")));
}

/// The node's bpffs directory goes with the test.
struct BpffsDir(std::path::PathBuf);

impl Drop for BpffsDir {
    fn drop(&mut self) {
        let _ = seb_agent::enforcement::loader::unload(&seb_agent::enforcement::PinLayout::new(&self.0.join("seb")));
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn the_base_daemon_set_runs_as_rendered() {
    run_overlay("base");
}

#[test]
fn the_node_local_daemon_set_runs_as_rendered() {
    run_overlay("node-local");
}

#[test]
fn the_cluster_daemon_set_runs_as_rendered() {
    run_overlay("cluster");
}
