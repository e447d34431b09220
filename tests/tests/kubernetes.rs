//! The Kubernetes executor at the HTTP boundary: kube-rs's real client and types, through
//! the broker's sockets, against a stand-in API server (no cluster can be run here).
//! What is shown: the requests the broker sends, with which token, in which order, and
//! that it honours the answers. What a real API server does with them is not shown.

use seb_agent::{
    admission::Reason,
    cert::{
        MutationRequest,
        contract::{ScopedIdentity, digest_of},
    },
    execute::{MintedIdentity, OutcomeStatus, kubernetes::canonical_state},
};
use seb_sandbox::{
    Sandbox, Tools,
    broker::{Broker, certified, this_process},
    kube_standin::{self, BROKER_TOKEN, KubeStandIn},
};
use serde_json::json;

fn tools() -> Tools {
    Tools::for_tests(env!("CARGO_BIN_EXE_seb-probe"))
}

const API: &str = "127.0.0.4:6443";
const DEPLOYMENT: &str = "/apis/apps/v1/namespaces/prod/deployments/web";

struct World {
    cluster: KubeStandIn,
    broker: Broker,
}

fn world(label: &str) -> World {
    world_with(label, "")
}

fn world_with(label: &str, more: &str) -> World {
    let sandbox = Sandbox::new(label, tools()).unwrap();
    let cluster = kube_standin::start(&sandbox.netns, API.parse().unwrap(), &sandbox.dir).unwrap();
    cluster.put_object(
        DEPLOYMENT,
        json!({"apiVersion": "apps/v1", "kind": "Deployment",
               "metadata": {"name": "web", "namespace": "prod", "resourceVersion": "41", "uid": "d-uid"},
               "spec": {"replicas": 2}, "status": {"readyReplicas": 2}}),
    );
    let token = sandbox.dir.join("broker-token");
    std::fs::write(&token, BROKER_TOKEN).unwrap();
    let extra = format!(
        "[[enforcement.protected]]\ncidr = \"127.0.0.4\"\nport = 6443\nprotocol = \"tcp\"\n\n\
         [kubernetes]\napi_server = \"https://{API}\"\nca_file = \"{}\"\ntoken_file = \"{}\"\n{more}",
        cluster.ca.display(),
        token.display()
    );
    World { broker: Broker::start(sandbox, &extra, true).unwrap(), cluster }
}

impl World {
    /// What a SAB certifies: the digest of the object's canonical state now.
    fn state(&self) -> String {
        let object = self.cluster.object(DEPLOYMENT).map(|o| serde_json::from_value(o).unwrap());
        digest_of(&canonical_state(object.as_ref()))
    }
}

fn scale(replicas: i64) -> MutationRequest {
    serde_json::from_value(json!({
        "provider": "kubernetes", "operation": "scale", "target": "apps/v1/Deployment/prod/web", "params": {"replicas": replicas}
    }))
    .unwrap()
}

fn deployer() -> ScopedIdentity {
    ScopedIdentity::KubernetesServiceAccount { namespace: "prod".into(), name: "deployer".into() }
}

/// A passthrough read (no certificate): a bound token for the configured reader, one
/// GET with it, the token's Secret deleted; the answer carries the digest a SAB
/// certifies as the precondition, for an object that exists and for one that does not.
#[test]
fn a_passthrough_read_uses_a_short_lived_reader_token_and_returns_the_precondition_digest() {
    use seb_agent::protocol::{Request, Response};
    let w = world_with("kuberead", "\n[passthrough]\nkubernetes_reader = \"seb-system/reader\"\n");
    let read = |operation: &str, target: &str| {
        let request =
            serde_json::from_value(json!({"provider": "kubernetes", "operation": operation, "target": target}));
        w.broker.call(Request::Read { request: request.unwrap() })
    };
    let Response::Read(result) = read("get", "apps/v1/Deployment/prod/web") else { panic!("expected a read result") };
    assert_eq!(result.status, 200);
    let body: serde_json::Value = serde_json::from_str(result.body.as_deref().unwrap()).unwrap();
    assert_eq!(body["spec"]["replicas"], 2, "{body}");
    assert_eq!(result.state_digest, w.state(), "the digest a SAB certifies as precondition");

    let seen = w.cluster.seen();
    let summary: Vec<(&str, &str)> = seen.iter().map(|s| (s.method.as_str(), s.path.as_str())).collect();
    assert_eq!(
        summary[..2],
        [
            ("POST", "/api/v1/namespaces/seb-system/secrets"),
            ("POST", "/api/v1/namespaces/seb-system/serviceaccounts/reader/token")
        ]
    );
    assert_eq!(summary[2], ("GET", DEPLOYMENT));
    assert_ne!(seen[2].authorization, format!("Bearer {BROKER_TOKEN}"), "read with the reader's token");
    assert_eq!(summary[3].0, "DELETE");
    assert!(w.cluster.live_secrets().is_empty(), "the reader's token dies with the read");

    let Response::Read(absent) = read("get", "apps/v1/Deployment/prod/gone") else { panic!("expected a read result") };
    assert_eq!((absent.status, absent.body.as_deref()), (404, None));
    assert_eq!(absent.state_digest, digest_of(&canonical_state(None)));

    let Response::Error { message, .. } = read("scale", "apps/v1/Deployment/prod/web") else {
        panic!("a mutation must not pass through");
    };
    assert!(message.contains("only `get`"), "{message}");
    assert_eq!(w.cluster.object(DEPLOYMENT).unwrap()["spec"]["replicas"], 2);
}

#[test]
fn a_certified_scale_mints_a_bound_token_writes_with_the_resource_version_and_kills_the_token() {
    let w = world("kube");
    let request = scale(5);
    let decision = w.broker.decide(&certified("c-k8s-1", this_process(), &request, &w.state(), deployer()), &request);
    assert!(decision.admitted, "{decision:?}");
    let outcome = decision.outcome.clone().unwrap();
    assert_eq!(outcome.status, OutcomeStatus::Succeeded, "{outcome:?}");
    let Some(MintedIdentity::KubernetesToken { credential_id, bound_secret, service_account, .. }) = &outcome.identity
    else {
        panic!("a token is minted: {outcome:?}");
    };
    assert_eq!(credential_id, "jti-1", "the token's jti is recorded");
    assert_eq!(service_account, "deployer");
    assert_eq!(w.cluster.object(DEPLOYMENT).unwrap()["spec"]["replicas"], 5);
    assert_eq!(outcome.resulting_state_digest, Some(w.state()));

    // The request shapes, in order.
    let seen = w.cluster.seen();
    let broker = format!("Bearer {BROKER_TOKEN}");
    let summary: Vec<(String, String)> = seen.iter().map(|s| (s.method.clone(), s.path.clone())).collect();
    let expected: Vec<(String, String)> = [
        ("POST", "/api/v1/namespaces/prod/secrets".to_string()),
        ("POST", "/api/v1/namespaces/prod/serviceaccounts/deployer/token".to_string()),
        ("GET", DEPLOYMENT.to_string()),
        ("PATCH", format!("{DEPLOYMENT}/scale")),
        ("GET", DEPLOYMENT.to_string()),
        ("DELETE", format!("/api/v1/namespaces/prod/secrets/{bound_secret}")),
    ]
    .into_iter()
    .map(|(m, p)| (m.to_string(), p))
    .collect();
    assert_eq!(summary, expected);
    let token_request = &seen[1];
    assert_eq!(token_request.authorization, broker);
    assert_eq!(token_request.body["spec"]["expirationSeconds"], 600, "the API's floor");
    assert_eq!(
        token_request.body["spec"]["boundObjectRef"],
        json!({"apiVersion": "v1", "kind": "Secret", "name": bound_secret, "uid": format!("uid-{bound_secret}")})
    );
    let patch = &seen[3];
    assert_ne!(patch.authorization, broker, "the mutation uses the minted token, not the broker's");
    assert_eq!(patch.content_type, "application/merge-patch+json");
    assert_eq!(patch.body, json!({"metadata": {"resourceVersion": "41"}, "spec": {"replicas": 5}}));
    assert_eq!(seen[5].authorization, broker, "the broker deletes the bound Secret");
    assert!(w.cluster.live_secrets().is_empty(), "the token's Secret is gone, and the token with it");
}

#[test]
fn drift_and_a_concurrent_write_are_both_refused_and_leave_no_token_behind() {
    let w = world("kubedrift");
    let stale = w.state();
    let request = scale(3);
    assert!(w.broker.decide(&certified("c-k8s-a", this_process(), &request, &stale, deployer()), &request).admitted);

    // Certified against the state before that change.
    let again = scale(7);
    let decision = w.broker.decide(&certified("c-k8s-b", this_process(), &again, &stale, deployer()), &again);
    assert_eq!(decision.reason, Reason::Drift, "{decision:?}");
    assert_eq!(w.cluster.object(DEPLOYMENT).unwrap()["spec"]["replicas"], 3);
    assert!(w.cluster.live_secrets().is_empty(), "the token minted for the drift check is revoked");

    // Someone else writes right after the drift check: the resourceVersion precondition
    // makes the API refuse the broker's write instead of overwriting theirs.
    w.cluster.race_after_get.store(true, std::sync::atomic::Ordering::SeqCst);
    let decision = w.broker.decide(&certified("c-k8s-c", this_process(), &again, &w.state(), deployer()), &again);
    assert!(decision.admitted, "{decision:?}");
    let outcome = decision.outcome.unwrap();
    assert_eq!(outcome.status, OutcomeStatus::Failed, "{outcome:?}");
    assert_eq!(outcome.api_status, Some(409));
    assert_eq!(w.cluster.object(DEPLOYMENT).unwrap()["spec"]["replicas"], 99, "the concurrent write stands");
    assert!(w.cluster.live_secrets().is_empty());

    // The Secret is made, then the TokenRequest fails (no such ServiceAccount): the
    // Secret made for a token that never was is deleted too.
    let missing = ScopedIdentity::KubernetesServiceAccount {
        namespace: "prod".into(),
        name: seb_sandbox::kube_standin::MISSING_SERVICE_ACCOUNT.into(),
    };
    let decision = w.broker.decide(&certified("c-k8s-d", this_process(), &again, &w.state(), missing), &again);
    assert_eq!(decision.reason, Reason::LiveStateUnavailable, "{decision:?}");
    assert!(decision.message.contains("minting"), "{decision:?}");
    assert!(w.cluster.live_secrets().is_empty(), "the Secret of a token that was never minted is left");
}

/// An object whose answer is larger than the executor reads (a stand-in for a response
/// without end): the drift read fails and nothing is written, instead of the broker
/// reading on.
#[test]
fn a_response_larger_than_the_executor_reads_is_refused_not_read_whole() {
    let w = world("kubehuge");
    let mut object = w.cluster.object(DEPLOYMENT).unwrap();
    object["metadata"]["annotations"] = json!({"filler": "x".repeat(17 << 20)});
    w.cluster.put_object(DEPLOYMENT, object);
    let request = scale(3);
    let decision =
        w.broker.decide(&certified("c-k8s-huge", this_process(), &request, &w.state(), deployer()), &request);
    assert_eq!(decision.reason, Reason::LiveStateUnavailable, "{decision:?}");
    assert_eq!(w.cluster.object(DEPLOYMENT).unwrap()["spec"]["replicas"], 2, "nothing was written");
}

fn request(operation: &str, params: serde_json::Value) -> MutationRequest {
    serde_json::from_value(json!({
        "provider": "kubernetes", "operation": operation, "target": "v1/ConfigMap/prod/settings", "params": params
    }))
    .unwrap()
}

#[test]
fn create_merge_patch_server_side_apply_and_delete_each_carry_their_precondition() {
    let w = world("kubeverbs");
    let path = "/api/v1/namespaces/prod/configmaps/settings";
    let object = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "settings", "namespace": "prod"}, "data": {"mode": "a"}});
    let state = || {
        let object = w.cluster.object(path).map(|o| serde_json::from_value(o).unwrap());
        digest_of(&canonical_state(object.as_ref()))
    };
    let run = |id: &str, request: &MutationRequest| {
        let decision = w.broker.decide(&certified(id, this_process(), request, &state(), deployer()), request);
        let outcome = decision.outcome.clone().unwrap_or_else(|| panic!("{decision:?}"));
        assert_eq!(outcome.status, OutcomeStatus::Succeeded, "{id}: {outcome:?}");
        w.cluster
            .seen()
            .into_iter()
            .rev()
            .find(|s| s.path.starts_with("/api/v1/namespaces/prod/configmaps") && s.method != "GET")
            .expect("the write")
    };

    // Create: certified against "does not exist".
    let create = run("c-create", &request("create", json!({"object": object})));
    assert_eq!((create.method.as_str(), create.path.as_str()), ("POST", "/api/v1/namespaces/prod/configmaps"));
    assert_eq!(w.cluster.object(path).unwrap()["data"]["mode"], "a");

    let patch = run("c-patch", &request("patch", json!({"patch": {"data": {"mode": "b"}}})));
    assert_eq!(patch.content_type, "application/merge-patch+json");
    assert_eq!(patch.body["metadata"]["resourceVersion"], "1");
    assert_eq!(w.cluster.object(path).unwrap()["data"]["mode"], "b");

    let applied = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "settings", "namespace": "prod"}, "data": {"mode": "c"}});
    let apply = run("c-apply", &request("apply", json!({"object": applied})));
    assert_eq!(apply.content_type, "application/apply-patch+yaml");
    assert_eq!(apply.body["metadata"]["resourceVersion"], "2");
    assert_eq!(w.cluster.object(path).unwrap()["data"]["mode"], "c");

    let delete = run("c-delete", &request("delete", json!(null)));
    assert_eq!(delete.method, "DELETE");
    assert_eq!(delete.body["preconditions"]["resourceVersion"], "3");
    assert!(w.cluster.object(path).is_none());

    // An apply certified against "does not exist" creates: a POST, which an object made
    // meanwhile would answer with a conflict (an apply would update it).
    let absent = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "settings", "namespace": "prod"}, "data": {"mode": "d"}});
    let created = run("c-apply-absent", &request("apply", json!({"object": absent})));
    assert_eq!((created.method.as_str(), created.path.as_str()), ("POST", "/api/v1/namespaces/prod/configmaps"));
    assert_eq!(w.cluster.object(path).unwrap()["data"]["mode"], "d");
    assert!(w.cluster.live_secrets().is_empty());

    // A patch certified against "does not exist" has no resourceVersion to carry: an
    // object made meanwhile would take it. Refused after the read, nothing written, the
    // token ended.
    let other: MutationRequest = serde_json::from_value(json!({"provider": "kubernetes", "operation": "patch",
        "target": "v1/ConfigMap/prod/absent", "params": {"patch": {"data": {"mode": "e"}}}}))
    .unwrap();
    let writes = || w.cluster.seen().iter().filter(|s| s.method != "GET" && s.path.contains("configmaps")).count();
    let before = writes();
    let absent_state = digest_of(&canonical_state(None));
    let patch_absent = certified("c-patch-absent", this_process(), &other, &absent_state, deployer());
    let certificate = w.broker.issue(&patch_absent, &seb_agent::cert::dev_sab::IssueOptions::default());
    let decision = w.broker.propose(&certificate, &other);
    assert_eq!(decision.reason, Reason::UnsupportedOperation, "{decision:?}");
    assert!(decision.message.contains("did not exist at the drift check"), "{decision:?}");
    assert_eq!(writes(), before, "nothing was written");
    assert!(w.cluster.live_secrets().is_empty(), "the token's Secret was deleted");
    // Refused after its mint, the certificate is paced: proposed again at once, nothing
    // is minted. Before (found by review), each proposal minted a token and its Secret.
    let mints = || w.cluster.seen().iter().filter(|s| s.method == "POST" && s.path.ends_with("/token")).count();
    let minted = mints();
    let again = w.broker.propose(&certificate, &other);
    assert_eq!(again.reason, Reason::LiveStateUnavailable, "{again:?}");
    assert!(again.message.contains("failed under 1 s ago"), "{again:?}");
    assert_eq!(mints(), minted, "nothing minted for the paced proposal");
}
