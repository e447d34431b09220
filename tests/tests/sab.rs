//! The SAB through its real HTTPS API and the real broker socket: Cedar permits, forbids
//! and deny-by-default; approvals (N-of-M, and who may not approve); a policy reload that
//! bumps the epoch so older certificates are refused; the SAB's log; and the agent
//! identity a certificate binds (a cgroup, not an executable).

use std::{path::Path, time::Duration};

use seb_agent::{
    admission::Reason,
    cert::contract::digest_of,
    protocol::{Request, Response},
};
use seb_sandbox::{
    Sandbox, Tools,
    broker::Broker,
    mtls::{self, InternalApi},
    sab::Sab,
};
use serde_json::{Value, json};

fn tools() -> Tools {
    Tools::for_tests(env!("CARGO_BIN_EXE_seb-probe"))
}

const API: &str = "127.0.0.3:9443";
const APPROVERS: &str = "seb://approver/alice, seb://approver/bob, seb://approver/carol";

/// Writes to /v1/ are permitted; /v1/secrets is forbidden; /v1/flags needs two approvals.
fn policies(requester: &str) -> String {
    format!(
        r#"@id("config-writes")
@identity("x509_client:seb-executor@config-service")
permit (principal in Seb::Node::"node-a", action == Seb::Action::"http::PUT", resource)
when {{ resource.host == "127.0.0.3" && resource.path like "/v1/*" }};

@id("no-secrets")
forbid (principal, action, resource is Seb::HttpsEndpoint) when {{ resource.path like "/v1/secrets*" }};

@id("flags-need-two")
@identity("x509_client:seb-executor@config-service")
@approvals("2")
@approvers("{APPROVERS}, {requester}")
permit (principal, action == Seb::Action::"http::PUT", resource)
when {{ resource.path like "/v1/flags*" }};
"#
    )
}

struct World {
    api: InternalApi,
    broker: Broker,
    sab: Sab,
    /// The identity of agents in the sandbox's `workload` cgroup.
    agent: String,
}

fn world(label: &str, sab_extra: &str) -> World {
    let sandbox = Sandbox::new(label, tools()).unwrap();
    let api = mtls::start(&sandbox.netns, API.parse().unwrap(), &sandbox.dir).unwrap();
    let extra = format!(
        "[[enforcement.protected]]\ncidr = \"127.0.0.3\"\nport = 9443\nprotocol = \"tcp\"\n\n\
         [http]\ntrust_anchors = \"{}\"\nclient_ca_cert = \"{}\"\nclient_ca_key = \"{}\"\nclient_cert_ttl_seconds = 120\n",
        api.server_ca.display(),
        api.client_ca.cert.display(),
        api.client_ca.key.display()
    );
    let broker = Broker::start(sandbox, &extra, true).unwrap();
    let issuing = broker.sandbox.dir.join("sab");
    let requester =
        format!("seb://node/node-a/cgroup/{}/workload", broker.sandbox.cgroup_relative.trim_start_matches('/'));
    let sab = Sab::start(&broker.sandbox, &issuing, &policies(&requester), sab_extra).unwrap();
    World { api, broker, agent: requester, sab }
}

fn put(path: &str, body: Value) -> Value {
    json!({"provider": "http", "operation": "PUT", "target": format!("https://{API}{path}"), "params": {"body": body}})
}

/// The state the API shows for an absent document (what the broker's drift check computes).
fn absent() -> String {
    digest_of(&json!({"status": 404}))
}

fn certify_body(request: &Value) -> Value {
    json!({"request": request, "precondition": absent(), "live_state": {"status": 404}, "intent": "roll out the new config"})
}

impl World {
    fn certify(&self, request: &Value) -> (u16, Value) {
        self.sab.call(&self.agent, "POST", "/v1/certify", Some(&certify_body(request)))
    }

    /// `seb-agent propose` run inside the sandbox's `cgroup`: the broker's decision.
    fn propose_from(&self, cgroup: &str, certificate: &str, request: &Value) -> Value {
        let dir = &self.broker.sandbox.dir;
        let (cert, req) = (dir.join("proposal.pem"), dir.join("proposal.json"));
        std::fs::write(&cert, certificate).unwrap();
        std::fs::write(&req, request.to_string()).unwrap();
        let socket = self.broker.sandbox.socket.display().to_string();
        let args = ["--json", "propose", "--socket", &socket, "--cert", path(&cert), "--request", path(&req)];
        let output = self.broker.sandbox.run_in(cgroup, &self.broker.sandbox.tools.agent, &args, &[]).unwrap();
        seb_sandbox::parse_json_output(&output, "seb-agent propose").unwrap()
    }

    fn stored(&self, path: &str) -> Option<Value> {
        self.api.store.lock().unwrap().get(path).map(|bytes| serde_json::from_slice(bytes).unwrap())
    }
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn a_permitted_change_is_certified_then_executed_and_forbidden_or_unpermitted_ones_are_refused() {
    let w = world("sabpermit", "");
    let request = put("/v1/config", json!({"replicas": 3}));
    let (status, issued) = w.certify(&request);
    assert_eq!((status, issued["status"].as_str()), (200, Some("issued")), "{issued}");

    // The SAB chose the binding, epochs and identity; the agent chose none of them.
    let contract = &issued["contract"];
    let cgroup = format!("{}/workload", w.broker.sandbox.cgroup_relative);
    assert_eq!(contract["agent"], json!({"cgroup": cgroup, "node": "node-a"}), "{contract}");
    assert_eq!(contract["identity"], json!({"kind": "x509_client", "subject": "seb-executor@config-service"}));
    let Response::Epochs(epochs) = w.broker.call(Request::GetEpochs) else { panic!("epochs") };
    assert_eq!(contract["policy_epoch"].as_u64(), epochs.policy, "the broker runs the SAB's policy epoch");
    assert_eq!(contract["revocation_epoch"].as_u64(), epochs.revocation);
    assert_eq!(contract["evidence_digest"], issued["evidence_digest"]);
    // Kept for reading back without its parameters (the contract holds the request): one
    // requester's thousands of 1 MiB requests would otherwise fill the SAB's memory.
    let id = issued["request_id"].as_str().unwrap();
    let (_, state) = w.sab.call(&w.agent, "GET", &format!("/v1/requests/{id}"), None);
    assert_eq!((state["status"].as_str(), &state["request"]["params"]), (Some("issued"), &Value::Null), "{state}");
    assert_eq!(state["certificate"], issued["certificate"]);

    let decision = w.propose_from("workload", issued["certificate"].as_str().unwrap(), &request);
    assert_eq!(decision["admitted"], true, "{decision}");
    assert_eq!(decision["outcome"]["status"], "succeeded", "{decision}");
    assert_eq!(w.stored("/v1/config"), Some(json!({"replicas": 3})));

    // A forbid wins over the permit, and names itself.
    let (status, refused) = w.certify(&put("/v1/secrets/db", json!("x")));
    assert_eq!(status, 403, "{refused}");
    assert_eq!(refused["status"], "refused");
    assert_eq!(refused["reasons"], json!(["forbidden_by: no-secrets"]));
    // Nothing permits a DELETE: denied by default.
    let delete = json!({"provider": "http", "operation": "DELETE", "target": format!("https://{API}/v1/config")});
    let (status, refused) = w.certify(&delete);
    assert_eq!(status, 403, "{refused}");
    assert!(refused["reasons"][0].as_str().unwrap().starts_with("no_permit"), "{refused}");
    // A refused request can be read back by its requester, with its reasons, and by nobody else.
    let id = refused["request_id"].as_str().unwrap();
    let (status, state) = w.sab.call(&w.agent, "GET", &format!("/v1/requests/{id}"), None);
    assert_eq!((status, state["status"].as_str()), (200, Some("refused")), "{state}");
    let other = w.sab.agent_identity(&w.broker.sandbox, "exempt");
    assert_eq!(w.sab.call(&other, "GET", &format!("/v1/requests/{id}"), None).0, 404);

    // An approver is not an agent, and an agent of another node is not this SAB's.
    let (status, error) = w.sab.call("seb://approver/alice", "POST", "/v1/certify", Some(&certify_body(&request)));
    assert_eq!((status, error["error"]["code"].as_str()), (403, Some("not_an_agent")), "{error}");
    let elsewhere = "seb://node/node-b/cgroup/agents";
    let (status, error) = w.sab.call(elsewhere, "POST", "/v1/certify", Some(&certify_body(&request)));
    assert_eq!((status, error["error"]["code"].as_str()), (403, Some("wrong_node")), "{error}");
    // What the agent says is checked: a precondition that is not a digest.
    let mut bad = certify_body(&request);
    bad["precondition"] = json!("latest");
    let (status, error) = w.sab.call(&w.agent, "POST", "/v1/certify", Some(&bad));
    assert_eq!((status, error["error"]["code"].as_str()), (400, Some("malformed")), "{error}");
}

#[test]
fn a_certificate_binds_the_agents_cgroup_so_the_same_program_elsewhere_is_refused() {
    let w = world("sabident", "");
    let request = put("/v1/config", json!({"replicas": 4}));
    let (status, issued) = w.certify(&request);
    assert_eq!(status, 200, "{issued}");
    let certificate = issued["certificate"].as_str().unwrap();

    // The same executable (seb-agent propose), the same certificate and request, from a
    // process outside the agent's cgroup: refused, and nothing reaches the API.
    let decision = w.propose_from("exempt", certificate, &request);
    assert_eq!(decision["admitted"], false, "{decision}");
    assert_eq!(decision["reason"], json!(Reason::CallerMismatch), "{decision}");
    assert!(decision["message"].as_str().unwrap().contains("workload"), "{decision}");
    assert_eq!(w.stored("/v1/config"), None);

    // From inside it: admitted and executed.
    let decision = w.propose_from("workload", certificate, &request);
    assert_eq!(decision["admitted"], true, "{decision}");
    assert_eq!(w.stored("/v1/config"), Some(json!({"replicas": 4})));
}

#[test]
fn approvals_need_n_distinct_named_approvers_other_than_the_requester() {
    let w = world("sabapprove", "");
    let request = put("/v1/flags/dark-mode", json!(true));
    let (status, pending) = w.certify(&request);
    assert_eq!(status, 202, "{pending}");
    assert_eq!(pending["status"], "pending");
    assert_eq!(pending["approvals_required"], 2);
    let id = pending["request_id"].as_str().unwrap().to_string();
    let approve = format!("/v1/requests/{id}/approve");

    // Listed for the approvers (through the CLI), not for an unrelated caller.
    let (code, listed) = w.sab.cli("seb://approver/alice", &["pending"]);
    assert_eq!(code, 0, "{listed}");
    assert_eq!(listed["requests"][0]["request_id"], id.as_str(), "{listed}");
    let (_, listed) = w.sab.call("seb://approver/mallory", "GET", "/v1/requests?status=pending", None);
    assert_eq!(listed["requests"], json!([]));

    let refused = |who: &str| {
        let (status, error) = w.sab.call(who, "POST", &approve, Some(&json!({"reason": "looks fine"})));
        (status, error["error"]["code"].as_str().unwrap_or_default().to_string())
    };
    // The requester is among the approvers the policy names, and still may not approve.
    assert_eq!(refused(&w.agent), (403, "self_approval".into()));
    assert_eq!(refused("seb://approver/mallory"), (403, "not_an_approver".into()));

    let (code, first) = w.sab.cli("seb://approver/alice", &["approve", &id, "--reason", "reviewed"]);
    assert_eq!((code, first["status"].as_str()), (0, Some("pending")), "one of two: {first}");
    assert_eq!(refused("seb://approver/alice"), (409, "already_approved".into()));
    let (status, done) = w.sab.call("seb://approver/bob", "POST", &approve, None);
    assert_eq!((status, done["status"].as_str()), (200, Some("issued")), "{done}");
    let approvers: Vec<&str> =
        done["approvals"].as_array().unwrap().iter().map(|a| a["approver"].as_str().unwrap()).collect();
    assert_eq!(approvers, ["seb://approver/alice", "seb://approver/bob"]);
    assert_eq!(refused("seb://approver/carol"), (409, "already_decided".into()));

    // The requester reads the certificate back and the broker executes it.
    let (_, state) = w.sab.call(&w.agent, "GET", &format!("/v1/requests/{id}"), None);
    let decision = w.propose_from("workload", state["certificate"].as_str().unwrap(), &request);
    assert_eq!(decision["admitted"], true, "{decision}");
    assert_eq!(w.stored("/v1/flags/dark-mode"), Some(json!(true)));

    // A denial ends a request; it cannot be approved afterwards.
    let (_, pending) = w.certify(&put("/v1/flags/beta", json!(true)));
    let id = pending["request_id"].as_str().unwrap();
    let (code, denied) = w.sab.cli("seb://approver/carol", &["deny", id, "--reason", "not this week"]);
    assert_eq!((code, denied["status"].as_str()), (0, Some("denied")), "{denied}");
    assert!(denied["reasons"][0].as_str().unwrap().contains("not this week"), "{denied}");
    let (status, error) = w.sab.call("seb://approver/alice", "POST", &format!("/v1/requests/{id}/approve"), None);
    assert_eq!((status, error["error"]["code"].as_str()), (409, Some("already_decided")), "{error}");

    // An approver the policies no longer name decides nothing, even of a request that
    // began waiting while they did.
    let (_, pending) = w.certify(&put("/v1/flags/gamma", json!(true)));
    let waiting = pending["request_id"].as_str().unwrap();
    let (_, health) = w.sab.call(&w.agent, "GET", "/v1/healthz", None);
    let without_carol = policies(&w.agent).replace(", seb://approver/carol", "");
    w.sab.write_policy("policy.cedar", &without_carol, health["policy_epoch"].as_u64().unwrap()).unwrap();
    let (status, error) = w.sab.call("seb://approver/carol", "POST", &format!("/v1/requests/{waiting}/deny"), None);
    assert_eq!((status, error["error"]["code"].as_str()), (403, Some("not_an_approver")), "{error}");
    let (_, state) = w.sab.call(&w.agent, "GET", &format!("/v1/requests/{waiting}"), None);
    assert_eq!(state["status"], "pending", "{state}");
    // Relaxed to one approval while a request waits for two: its first approval issues it.
    let (_, pending) = w.certify(&put("/v1/flags/delta", json!(true)));
    let relaxed = pending["request_id"].as_str().unwrap();
    let (_, health) = w.sab.call(&w.agent, "GET", "/v1/healthz", None);
    let one = without_carol.replace("@approvals(\"2\")", "@approvals(\"1\")");
    w.sab.write_policy("policy.cedar", &one, health["policy_epoch"].as_u64().unwrap()).unwrap();
    let (status, done) = w.sab.call("seb://approver/alice", "POST", &format!("/v1/requests/{relaxed}/approve"), None);
    assert_eq!((status, done["status"].as_str()), (200, Some("issued")), "{done}");

    // The requester approving its own request as fast as it can: every call refused, a
    // few logged (their reason left out), the rest counted in a summary.
    let reason = "x".repeat(4000);
    for _ in 0..150 {
        let (status, error) =
            w.sab.call(&w.agent, "POST", &format!("/v1/requests/{id}/approve"), Some(&json!({"reason": reason})));
        assert_eq!((status, error["error"]["code"].as_str()), (403, Some("self_approval")), "{error}");
    }
    let summarised = || {
        let store = seb_agent::audit::AuditStore::open_read_only(&w.sab.database).unwrap();
        let records = store.records_after(None, 0, 10_000).unwrap();
        let logged: Vec<Value> = records
            .iter()
            .filter(|r| r.kind == "sab_approval")
            .map(|r| r.parse::<Value>().unwrap())
            .filter(|r| r["refused"] == "self_approval")
            .collect();
        let summaries = records.iter().filter(|r| r.kind == "sab_refusals_suppressed").count();
        (logged, summaries)
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let (logged, _) = loop {
        let (logged, summaries) = summarised();
        if summaries > 0 {
            break (logged, summaries);
        }
        assert!(std::time::Instant::now() < deadline, "no summary of the refusals past the budget");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(logged.len() < 75, "{} of 150 refused approvals logged one by one", logged.len());
    assert!(logged.iter().all(|r| r["reason"].is_null()), "a refused approval's reason was logged");
}

#[test]
fn an_approval_after_the_deadline_is_refused_and_the_request_is_expired() {
    let w = world("sabexpire", "approval_timeout_seconds = 1");
    let (status, pending) = w.certify(&put("/v1/flags/x", json!(1)));
    assert_eq!(status, 202, "{pending}");
    let id = pending["request_id"].as_str().unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let (status, error) = w.sab.call("seb://approver/alice", "POST", &format!("/v1/requests/{id}/approve"), None);
    assert_eq!((status, error["error"]["code"].as_str()), (409, Some("expired")), "{error}");
    let (_, state) = w.sab.call(&w.agent, "GET", &format!("/v1/requests/{id}"), None);
    assert_eq!(state["status"], "expired", "{state}");
    assert!(state.get("certificate").is_none());
}

#[test]
fn pending_requests_survive_a_restart_with_their_approvals_requester_and_deadline() {
    let mut w = world("sabrestart", "approval_timeout_seconds = 900");
    let request = put("/v1/flags/restart", json!(true));
    let (status, pending) = w.certify(&request);
    assert_eq!(status, 202, "{pending}");
    let id = pending["request_id"].as_str().unwrap().to_string();
    let (code, first) = w.sab.cli("seb://approver/alice", &["approve", &id, "--reason", "before the restart"]);
    assert_eq!((code, first["status"].as_str()), (0, Some("pending")), "{first}");

    // Restarted with a shorter approval timeout: the waiting request keeps the deadline it was given.
    let config = std::fs::read_to_string(&w.sab.config).unwrap();
    std::fs::write(&w.sab.config, config.replace("approval_timeout_seconds = 900", "approval_timeout_seconds = 1"))
        .unwrap();
    w.sab.stop().unwrap();
    w.sab.launch().unwrap();

    let (code, listed) = w.sab.cli("seb://approver/bob", &["pending"]);
    assert_eq!(code, 0, "{listed}");
    let resumed = &listed["requests"][0];
    assert_eq!(resumed["request_id"], id.as_str(), "{listed}");
    assert_eq!((&resumed["expires_at"], &resumed["approvals"]), (&first["expires_at"], &first["approvals"]));
    assert_eq!(resumed["requester"], w.agent.as_str());
    // Who requested is still known: the requester still may not approve.
    let (status, error) = w.sab.call(&w.agent, "POST", &format!("/v1/requests/{id}/approve"), None);
    assert_eq!((status, error["error"]["code"].as_str()), (403, Some("self_approval")), "{error}");
    let (status, error) = w.sab.call("seb://approver/alice", "POST", &format!("/v1/requests/{id}/approve"), None);
    assert_eq!((status, error["error"]["code"].as_str()), (409, Some("already_approved")), "{error}");

    // A request made now waits one second only.
    let (status, short) = w.certify(&put("/v1/flags/short", json!(1)));
    assert_eq!(status, 202, "{short}");
    let short = short["request_id"].as_str().unwrap().to_string();

    // The second of two approvals, after the restart: issued, with both in its evidence.
    let (code, done) = w.sab.cli("seb://approver/bob", &["approve", &id]);
    assert_eq!((code, done["status"].as_str()), (0, Some("issued")), "{done}");
    let approvers: Vec<&str> =
        done["approvals"].as_array().unwrap().iter().map(|a| a["approver"].as_str().unwrap()).collect();
    assert_eq!(approvers, ["seb://approver/alice", "seb://approver/bob"]);
    let (_, state) = w.sab.call(&w.agent, "GET", &format!("/v1/requests/{id}"), None);
    let decision = w.propose_from("workload", state["certificate"].as_str().unwrap(), &request);
    assert_eq!(decision["admitted"], true, "{decision}");
    assert_eq!(w.stored("/v1/flags/restart"), Some(json!(true)));

    // Its deadline passes while the SAB is stopped: after the restart it is expired, and stays refused.
    w.sab.stop().unwrap();
    std::thread::sleep(Duration::from_millis(1200));
    w.sab.launch().unwrap();
    let (status, error) = w.sab.call("seb://approver/alice", "POST", &format!("/v1/requests/{short}/approve"), None);
    assert_eq!((status, error["error"]["code"].as_str()), (409, Some("expired")), "{error}");
    let (_, state) = w.sab.call(&w.agent, "GET", &format!("/v1/requests/{short}"), None);
    assert_eq!(state["status"], "expired", "{state}");
    assert!(state.get("certificate").is_none());
    // Its expiry is on record: a restart does not bring it back.
    w.sab.stop().unwrap();
    w.sab.launch().unwrap();
    let (status, _) = w.sab.call("seb://approver/bob", "POST", &format!("/v1/requests/{short}/approve"), None);
    assert_eq!(status, 404, "an expired request is no longer awaiting approvals");
    let (_, listed) = w.sab.call("seb://approver/bob", "GET", "/v1/requests?status=pending", None);
    assert_eq!(listed["requests"], json!([]), "{listed}");
}

#[test]
fn a_policy_reload_bumps_the_epoch_and_the_broker_refuses_older_certificates() {
    let w = world("sabreload", "");
    let request = put("/v1/config", json!({"replicas": 5}));
    let (_, old) = w.certify(&request);
    let old_epoch = old["contract"]["policy_epoch"].as_u64().unwrap();

    // A policy that does not validate is refused (named by file and line) and changes nothing.
    let (_, before) = w.sab.call(&w.agent, "GET", "/v1/healthz", None);
    std::fs::write(
        w.sab.policies.join("broken.cedar"),
        "@identity(\"x509_client:s\")\npermit (principal, action, resource)\nwhen { resource.nope };\n",
    )
    .unwrap();
    let output = std::process::Command::new(&w.broker.sandbox.tools.agent)
        .args(["sab", "check", "--policies"])
        .arg(&w.sab.policies)
        .output()
        .unwrap();
    let error = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success() && error.contains("broken.cedar:3: policy broken.cedar:1"), "{error}");
    std::thread::sleep(Duration::from_millis(500));
    let (_, after) = w.sab.call(&w.agent, "GET", "/v1/healthz", None);
    assert_eq!(before["policy_epoch"], after["policy_epoch"], "an invalid policy set is not loaded");
    assert!(w.sab.log().contains("broken.cedar:3"), "the SAB logs where the error is");
    std::fs::remove_file(w.sab.policies.join("broken.cedar")).unwrap();

    let new_epoch = w
        .sab
        .write_policy(
            "extra.cedar",
            "@identity(\"x509_client:reader\")\npermit (principal, action == Seb::Action::\"http::POST\", resource);\n",
            old_epoch,
        )
        .unwrap();
    assert_eq!(new_epoch, old_epoch + 1);
    let Response::Epochs(epochs) = w.broker.call(Request::GetEpochs) else { panic!("epochs") };
    assert_eq!(epochs.policy, Some(new_epoch), "the SAB set the broker's policy epoch");

    let decision = w.propose_from("workload", old["certificate"].as_str().unwrap(), &request);
    assert_eq!(decision["admitted"], false, "{decision}");
    assert_eq!(decision["reason"], json!(Reason::PolicyEpochMismatch), "{decision}");
    let (_, new) = w.certify(&request);
    assert_eq!(new["contract"]["policy_epoch"].as_u64(), Some(new_epoch));
    let decision = w.propose_from("workload", new["certificate"].as_str().unwrap(), &request);
    assert_eq!(decision["admitted"], true, "{decision}");
}

#[test]
fn the_sab_log_holds_every_step_verifies_and_names_a_tampered_record() {
    let mut w = world("sablog", "");
    let (_, issued) = w.certify(&put("/v1/config", json!({"replicas": 6})));
    // A refused request (anyone with a client certificate can send one) is recorded
    // without its body: by digest.
    let refused_request = put("/v1/secrets/x", json!("x".repeat(200_000)));
    let (_, refused) = w.certify(&refused_request);
    assert_eq!(refused["status"], "refused", "{refused}");
    let (_, pending) = w.certify(&put("/v1/flags/y", json!(1)));
    let id = pending["request_id"].as_str().unwrap();
    w.sab.call("seb://approver/mallory", "POST", &format!("/v1/requests/{id}/approve"), None);
    w.sab.stop().unwrap();

    let verify = |database: &Path| {
        let output = std::process::Command::new(&w.broker.sandbox.tools.agent)
            .args(["audit", "verify", "--json", "--database"])
            .arg(database)
            .arg("--public-key")
            .arg(w.sab.signing_key.with_extension("key.pub"))
            .arg("--head")
            .arg(w.sab.signing_key.with_extension("key.head"))
            .output()
            .unwrap();
        let report: Value = serde_json::from_slice(&output.stdout).unwrap();
        (output.status.code().unwrap(), report)
    };
    let (code, report) = verify(&w.sab.database);
    assert_eq!(code, 0, "{report}");

    let store = seb_agent::audit::AuditStore::open_read_only(&w.sab.database).unwrap();
    let records = store.records_after(None, 0, 1000).unwrap();
    let kinds: Vec<&str> = records.iter().map(|r| r.kind.as_str()).collect();
    for kind in ["sab_policy", "sab_certify", "sab_decision", "sab_issuance", "sab_approval"] {
        assert!(kinds.contains(&kind), "{kind} in {kinds:?}");
    }
    let certify: Vec<Value> =
        records.iter().filter(|r| r.kind == "sab_certify").map(|r| r.parse::<Value>().unwrap()).collect();
    let refused_record = certify.iter().find(|r| r["request_id"] == refused["request_id"]).unwrap();
    let request: seb_agent::cert::MutationRequest = serde_json::from_value(refused_request).unwrap();
    assert_eq!(refused_record["request_digest"], request.digest(), "{refused_record}");
    assert!(refused_record.to_string().len() < 2048, "{} bytes", refused_record.to_string().len());
    // The refused approval is on record, with why.
    let approval: Value = records.iter().find(|r| r.kind == "sab_approval").unwrap().parse().unwrap();
    assert_eq!((approval["accepted"].as_bool(), approval["refused"].as_str()), (Some(false), Some("not_an_approver")));
    // An auditor recomputes the evidence digest from the issuance record alone.
    let issuance: Value = records.iter().find(|r| r.kind == "sab_issuance").unwrap().parse().unwrap();
    assert_eq!(digest_of(&issuance["evidence"]), issued["evidence_digest"].as_str().unwrap());
    assert_eq!(issuance["contract"], issued["contract"]);
    assert_eq!(issuance["evidence"]["live_state"], json!({"status": 404}));
    assert_eq!(issuance["evidence"]["intent"], "roll out the new config");
    drop(store);

    // A refusal rewritten as an issuance: the chain names that record.
    let seq = records.iter().find(|r| r.kind == "sab_decision" && r.body.contains("\"refused\"")).unwrap().seq;
    let copy = w.sab.dir.join("tampered.db");
    seb_sandbox::snapshot_store(&w.sab.database, &copy).unwrap();
    let conn = rusqlite::Connection::open(&copy).unwrap();
    let changed = conn
        .execute("UPDATE records SET body = replace(body, '\"refused\"', '\"issued\"') WHERE seq = ?1", [seq])
        .unwrap();
    assert_eq!(changed, 1);
    drop(conn);
    let (code, report) = verify(&copy);
    assert_eq!((code, report["first_bad_record"].as_i64()), (1, Some(seq)), "{report}");
}

/// What the SAB answers, as raw HTTP, to `request` sent on a TLS connection with the
/// client certificate `cert` (files from `Sab::identity_cert`) or none, read until the
/// SAB closes the connection (at most 30 s).
fn exchange(sab: &Sab, cert: Option<&Path>, request: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tls = tls_client(sab, cert);
    let address = sab.url.trim_start_matches("https://").to_string();
    let request = request.to_vec();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async move {
        let stream = tokio::net::TcpStream::connect(address).await.unwrap();
        let name = tokio_rustls::rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let mut tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls)).connect(name, stream).await.unwrap();
        tls.write_all(&request).await.unwrap();
        let mut answer = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(30), tls.read_to_end(&mut answer)).await;
        assert!(read.is_ok(), "the SAB held the connection for 30 s");
        String::from_utf8_lossy(&answer).into_owned()
    })
}

/// A TLS client of the SAB, with the client certificate `cert` (files from
/// `Sab::identity_cert`) or none.
fn tls_client(sab: &Sab, cert: Option<&Path>) -> tokio_rustls::rustls::ClientConfig {
    use tokio_rustls::rustls::{
        ClientConfig, RootCertStore,
        pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    };
    let mut roots = RootCertStore::empty();
    for der in CertificateDer::pem_file_iter(sab.dir.join("tls-ca.pem")).unwrap() {
        roots.add(der.unwrap()).unwrap();
    }
    let provider = std::sync::Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    match cert {
        Some(cert) => {
            let chain =
                CertificateDer::pem_file_iter(cert.with_extension("pem")).unwrap().collect::<Result<Vec<_>, _>>();
            let key = PrivateKeyDer::from_pem_file(cert.with_extension("key")).unwrap();
            builder.with_client_auth_cert(chain.unwrap(), key).unwrap()
        }
        None => builder.with_no_client_auth(),
    }
}

#[test]
fn one_caller_holds_neither_the_sabs_connections_nor_its_time_nor_its_approval_queue() {
    // 8 connections: 2 per caller.
    let w = world("sabbounds", "max_connections = 8\nmax_pending_per_requester = 2\n");
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let alice = w.sab.identity_cert("seb://approver/alice").unwrap();
    let client = w.sab.client(&alice).unwrap();
    // Two kept-alive connections of alice's, each answered once (so the SAB holds both).
    let held: Vec<_> = (0..2)
        .map(|_| {
            runtime.block_on(async {
                let mut session = client.session().await.unwrap();
                let (status, _) = session.call("GET", "/v1/healthz", None).await.unwrap();
                assert_eq!(status, 200);
                session
            })
        })
        .collect();
    let third = runtime.block_on(client.call("GET", "/v1/healthz", None));
    assert!(third.is_err(), "a third connection of alice's was served: {third:?}");
    let (status, _) = w.sab.call("seb://approver/bob", "GET", "/v1/healthz", None);
    assert_eq!(status, 200, "another caller is still served");
    drop(held);
    seb_sandbox::poll::eventually(
        Duration::from_secs(5),
        || runtime.block_on(client.call("GET", "/v1/healthz", None)).ok(),
        || "alice is served again once her connections close".into(),
    );

    // Handshakes begun and never finished, as many as the whole pool, from one address
    // (each would hold a place for 10 s): another address is answered at once.
    let address: std::net::SocketAddr = w.sab.url.trim_start_matches("https://").parse().unwrap();
    let stalled: Vec<socket2::Socket> = (0..8)
        .map(|_| {
            let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
            socket.bind(&std::net::SocketAddr::from(([127, 0, 0, 9], 0)).into()).unwrap();
            socket.connect(&address.into()).unwrap();
            socket
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let started = std::time::Instant::now();
    let (status, _) = w.sab.call("seb://approver/bob", "GET", "/v1/healthz", None);
    assert_eq!(status, 200);
    assert!(started.elapsed() < Duration::from_secs(5), "answered after {:?}", started.elapsed());
    drop(stalled);

    // Two connections of alice's that pipeline requests and never read the answers: the
    // SAB stops writing to each once it has waited 10 s, and alice is served again.
    let flooded: Vec<_> = (0..2)
        .map(|_| {
            let tls = std::sync::Arc::new(tls_client(&w.sab, Some(&alice)));
            runtime.block_on(async {
                use tokio::io::AsyncWriteExt;
                let stream = tokio::net::TcpStream::connect(address).await.unwrap();
                let name = tokio_rustls::rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
                let mut tls = tokio_rustls::TlsConnector::from(tls).connect(name, stream).await.unwrap();
                let requests = b"GET /v1/healthz HTTP/1.1\r\nhost: sab\r\n\r\n".repeat(100_000);
                // Written until the SAB, its answers unread, stops reading too.
                let _ = tokio::time::timeout(Duration::from_secs(2), tls.write_all(&requests)).await;
                tls
            })
        })
        .collect();
    let flooded_at = std::time::Instant::now();
    let third = runtime.block_on(client.call("GET", "/v1/healthz", None));
    assert!(third.is_err(), "a third connection of alice's was served while two were flooded: {third:?}");
    seb_sandbox::poll::eventually(
        Duration::from_secs(20),
        || runtime.block_on(client.call("GET", "/v1/healthz", None)).ok(),
        || "alice is never served again: her unread connections hold their slots".into(),
    );
    assert!(flooded_at.elapsed() > Duration::from_secs(5), "served after {:?}", flooded_at.elapsed());
    drop(flooded);

    // A body announced and never sent is answered 408 once its time is up.
    let started = std::time::Instant::now();
    let answer =
        exchange(&w.sab, Some(&alice), b"POST /v1/certify HTTP/1.1\r\nhost: sab\r\ncontent-length: 100\r\n\r\n{");
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(started.elapsed() < Duration::from_secs(20), "{:?}", started.elapsed());

    // One requester's requests awaiting approval are bounded; another's still queue.
    for (flag, expected) in [("a", 202), ("b", 202), ("c", 503)] {
        let (status, answer) = w.certify(&put(&format!("/v1/flags/{flag}"), json!(true)));
        assert_eq!(status, expected, "{flag}: {answer}");
    }
    let other = w.sab.agent_identity(&w.broker.sandbox, "other");
    let (status, answer) =
        w.sab.call(&other, "POST", "/v1/certify", Some(&certify_body(&put("/v1/flags/d", json!(true)))));
    assert_eq!(status, 202, "{answer}");

    // A flood of refused requests from one requester is counted, not logged one by one.
    let forbidden = certify_body(&put("/v1/secrets/x", json!("x".repeat(100_000))));
    let mut unlogged = 0;
    for _ in 0..60 {
        let (status, answer) = w.sab.call(&w.agent, "POST", "/v1/certify", Some(&forbidden));
        assert_eq!(status, 403, "{answer}");
        unlogged += usize::from(answer.get("logged").is_some());
    }
    let list = |kind: &str| -> Vec<Value> {
        let output = std::process::Command::new(&w.broker.sandbox.tools.agent)
            .args(["audit", "list", "--json", "--kind", kind, "--database"])
            .arg(&w.sab.database)
            .output()
            .unwrap();
        String::from_utf8(output.stdout).unwrap().lines().map(|line| serde_json::from_str(line).unwrap()).collect()
    };
    let refused_logged = list("sab_decision").iter().filter(|r| r["body"]["decision"] == "refused").count();
    assert!(unlogged >= 30, "{unlogged} of 60 refusals unlogged");
    assert_eq!(refused_logged + unlogged, 60);
    seb_sandbox::poll::eventually(
        Duration::from_secs(5),
        || {
            let counted: u64 =
                list("sab_refusals_suppressed").iter().map(|r| r["body"]["suppressed"].as_u64().unwrap_or(0)).sum();
            (counted == unlogged as u64).then_some(())
        },
        || format!("the summaries never counted the {unlogged} unlogged refusals"),
    );
    // What a refused request carried is not kept in memory either.
    let (_, listed) = w.sab.call(&w.agent, "GET", "/v1/requests?status=refused", None);
    assert_eq!(listed["requests"][0]["request"]["params"], Value::Null, "{}", listed["requests"][0]);

    // A body of many small values, which would take tens of MiB parsed.
    let mut body = certify_body(&put("/v1/config", json!(1)));
    body["live_state"] = json!(vec![0; 70_000]);
    let (status, answer) = w.sab.call(&w.agent, "POST", "/v1/certify", Some(&body));
    assert_eq!((status, answer["error"]["code"].as_str()), (413, Some("too_large")), "{answer}");
}

#[test]
fn only_clients_with_a_certificate_from_the_sabs_tls_ca_and_an_identity_get_an_answer() {
    let w = world("sabtls", "");
    // A certificate from another CA: the handshake fails.
    let stranger = w.broker.sandbox.dir.join("stranger");
    std::fs::create_dir_all(&stranger).unwrap();
    seb_agent::sab::pki::init(&seb_agent::sab::pki::Layout::new(&stranger), &["127.0.0.1".into()]).unwrap();
    let other_ca = seb_agent::sab::pki::Layout::new(&stranger).tls_ca();
    let out = stranger.join("agent");
    seb_agent::sab::pki::client_certificate(&other_ca, &w.agent, Duration::from_secs(60), &out).unwrap();
    // The same identity with a certificate from the SAB's CA is answered, the same way.
    let ours = w.sab.identity_cert(&w.agent).unwrap();
    assert_eq!(w.sab.call_as(&ours, "GET", "/v1/healthz", None).unwrap().0, 200);
    let refused_in_the_handshake = |result: anyhow::Result<(u16, Value)>| {
        let error = format!("{:#}", result.expect_err("an answer without a valid client certificate"));
        assert!(error.contains("alert"), "the SAB's TLS refused the client certificate: {error}");
    };
    refused_in_the_handshake(w.sab.call_as(&out, "GET", "/v1/healthz", None));
    // Our CA, but the server certificate is no client certificate (no seb:// identity).
    let server = w.sab.dir.join("server");
    refused_in_the_handshake(w.sab.call_as(&server, "GET", "/v1/healthz", None));
}

#[test]
fn a_probe_without_a_certificate_gets_the_health_answer_once_and_nothing_else() {
    let w = world("sabprobe", "");
    // What the SAB's Deployment asks of the kubelet.
    let objects = seb_sandbox::deploy::render(&seb_sandbox::deploy::deploy_dir().join("sab")).unwrap();
    let deployment = seb_sandbox::deploy::find(&objects, "Deployment", "seb-sab").unwrap();
    let probe = &deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"];
    assert_eq!((probe["scheme"].as_str(), probe["path"].as_str()), (Some("HTTPS"), Some("/v1/healthz")), "{probe}");

    // Sixteen clients without a certificate from one address hold connections open and
    // send nothing: the probe, from another address, is still answered.
    let address: std::net::SocketAddr = w.sab.url.trim_start_matches("https://").parse().unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls_client(&w.sab, None)));
    let idle: Vec<_> = runtime.block_on(async {
        let mut idle = Vec::new();
        for _ in 0..16 {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.bind("127.0.0.9:0".parse().unwrap()).unwrap();
            let stream = socket.connect(address).await.unwrap();
            let name = tokio_rustls::rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
            if let Ok(tls) = connector.connect(name, stream).await {
                idle.push(tls);
            }
        }
        idle
    });
    let answer = exchange(&w.sab, None, b"GET /v1/healthz HTTP/1.1\r\nhost: sab\r\n\r\n");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    drop(idle);

    // Two requests on one connection: one answer, then the SAB closes it.
    let healthz = b"GET /v1/healthz HTTP/1.1\r\nhost: sab\r\n\r\n";
    let answer = exchange(&w.sab, None, &[&healthz[..], &healthz[..]].concat());
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(answer.matches("HTTP/1.1").count(), 1, "a second request was answered: {answer}");
    let body = answer.split("\r\n\r\n").nth(1).unwrap();
    assert_eq!(
        serde_json::from_str::<Value>(body).unwrap(),
        json!({"status": "ok"}),
        "no epochs without a certificate"
    );

    // Anything else is refused, naming why.
    for request in [
        "GET /v1/requests HTTP/1.1\r\nhost: sab\r\n\r\n",
        "POST /v1/certify HTTP/1.1\r\nhost: sab\r\ncontent-length: 2\r\n\r\n{}",
        "POST /v1/healthz HTTP/1.1\r\nhost: sab\r\ncontent-length: 0\r\n\r\n",
    ] {
        let answer = exchange(&w.sab, None, request.as_bytes());
        assert!(answer.starts_with("HTTP/1.1 401") && answer.contains("certificate_required"), "{request}: {answer}");
    }
    // The same call with a certificate carries the epochs.
    let (status, health) = w.sab.call(&w.agent, "GET", "/v1/healthz", None);
    assert_eq!(status, 200);
    assert!(health["revocation_epoch"].is_u64(), "{health}");
}

#[test]
fn in_cluster_mode_an_agent_is_its_pod_by_tokenreview_and_epochs_live_in_the_cluster() {
    use seb_sandbox::{
        kube_standin::{self, BROKER_TOKEN},
        kube_store::{SEB_POLICIES, SEB_REVOCATIONS},
    };
    const KUBE: &str = "127.0.0.61:6443";
    const POD: &str = "0f3c2a1e-5b6d-4e7f-8a9b-0c1d2e3f4a5b";
    let sandbox = Sandbox::new("sabcluster", tools()).unwrap();
    let cluster = kube_standin::start(&sandbox.netns, KUBE.parse().unwrap(), &sandbox.dir).unwrap();
    cluster.store.lock().unwrap().put(
        SEB_REVOCATIONS,
        json!({"metadata": {"name": "default"}, "spec": {"revocationEpoch": 3, "serials": [], "contractIds": []}}),
    );
    cluster
        .store
        .lock()
        .unwrap()
        .put(SEB_POLICIES, json!({"metadata": {"name": "default"}, "spec": {"policyEpoch": 0}}));
    cluster.add_pod_token("pod-token", ["agents", "planner", POD, "node-a"], &["seb-sab"]);
    // The same pod's token for the API server (what every pod has mounted by default).
    cluster.add_pod_token("api-token", ["agents", "planner", POD, "node-a"], &[kube_standin::API_SERVER_AUDIENCE]);
    let kubeconfig = sandbox.dir.join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: sbx\n  cluster:\n    server: https://{KUBE}\n    certificate-authority: {}\n\
             users:\n- name: sab\n  user:\n    token: {BROKER_TOKEN}\ncontexts:\n- name: sbx\n  context:\n    cluster: sbx\n    user: sab\n\
             current-context: sbx\n",
            cluster.ca.display()
        ),
    )
    .unwrap();
    let issuing = sandbox.dir.join("issuing");
    seb_agent::cert::dev_sab::create_ca(&issuing, "seb test SAB", seb_agent::cert::dev_sab::Algorithm::Ed25519)
        .unwrap();
    // The agent's container, in the token's pod (systemd driver).
    let agent = "seb://node/node-a/cgroup/kubepods.slice/kubepods-pod0f3c2a1e_5b6d_4e7f_8a9b_0c1d2e3f4a5b.slice/cri-containerd-1.scope";
    let sab = Sab::start_cluster(&sandbox, &issuing, &policies(agent), &kubeconfig).unwrap();

    // Its first policy load became the SebPolicy's epoch (the object is never created by
    // the SAB: an empty one would protect nothing).
    let policy_epoch = |cluster: &kube_standin::KubeStandIn| {
        cluster.store.lock().unwrap().get(SEB_POLICIES, "default").map(|p| p["spec"]["policyEpoch"].as_u64().unwrap())
    };
    assert_eq!(policy_epoch(&cluster), Some(1));

    let body = certify_body(&put("/v1/config", json!({"replicas": 2})));
    let (status, error) = sab.call(agent, "POST", "/v1/certify", Some(&body));
    assert_eq!((status, error["error"]["code"].as_str()), (401, Some("token_required")), "{error}");
    let (status, error) = sab.call_with_token(agent, "stolen", "POST", "/v1/certify", Some(&body));
    assert_eq!((status, error["error"]["code"].as_str()), (401, Some("token_refused")), "{error}");
    let elsewhere = "seb://node/node-b/cgroup/kubepods.slice/kubepods-pod0f3c2a1e_5b6d_4e7f_8a9b_0c1d2e3f4a5b.slice/x";
    let (status, error) = sab.call_with_token(elsewhere, "pod-token", "POST", "/v1/certify", Some(&body));
    assert_eq!((status, error["error"]["code"].as_str()), (403, Some("wrong_node")), "{error}");
    // Another pod's certificate with this pod's token.
    let other_pod = "seb://node/node-a/cgroup/kubepods.slice/kubepods-pod11111111_2222_3333_4444_555555555555.slice/x";
    let (status, error) = sab.call_with_token(other_pod, "pod-token", "POST", "/v1/certify", Some(&body));
    assert_eq!((status, error["error"]["code"].as_str()), (403, Some("wrong_pod")), "{error}");
    assert!(
        error["error"]["message"].as_str().unwrap().contains("is not in the ServiceAccount token's pod"),
        "{error}"
    );
    // The pod's token for the API server, not for the SAB.
    let (status, error) = sab.call_with_token(agent, "api-token", "POST", "/v1/certify", Some(&body));
    assert_eq!((status, error["error"]["code"].as_str()), (401, Some("token_refused")), "{error}");

    let (status, issued) = sab.call_with_token(agent, "pod-token", "POST", "/v1/certify", Some(&body));
    assert_eq!(status, 200, "{issued}");
    let contract = &issued["contract"];
    let cgroup = agent.trim_start_matches("seb://node/node-a/cgroup");
    assert_eq!(contract["agent"], json!({"cgroup": cgroup, "node": "node-a", "pod_uid": POD}));
    assert_eq!((contract["policy_epoch"].as_u64(), contract["revocation_epoch"].as_u64()), (Some(1), Some(3)));

    // A policy change moves the cluster's epoch.
    std::fs::write(
        sab.policies.join("more.cedar"),
        "@identity(\"x509_client:r\")\npermit (principal, action == Seb::Action::\"http::POST\", resource);\n",
    )
    .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while policy_epoch(&cluster) != Some(2) {
        assert!(
            std::time::Instant::now() < deadline,
            "the SebPolicy's epoch stayed {:?}: {}",
            policy_epoch(&cluster),
            sab.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // Healthy while it could issue; without the SebRevocation it cannot, and says so.
    let (status, health) = sab.call(agent, "GET", "/v1/healthz", None);
    assert_eq!((status, health["revocation_epoch"].as_u64()), (200, Some(3)), "{health}");
    cluster.store.lock().unwrap().delete(SEB_REVOCATIONS, "default");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (status, health) = sab.call(agent, "GET", "/v1/healthz", None);
        if status == 503 {
            assert_eq!(health["error"]["code"], "epochs_unavailable", "{health}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "healthy without a SebRevocation: {health}");
        std::thread::sleep(Duration::from_millis(100));
    }
}
