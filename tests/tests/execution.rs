//! Execution against a real AWS API emulator (moto, SigV4 and IAM enforced), running in
//! the sandbox's namespace on a protected loopback address: the broker mints a scoped STS
//! session per mutation and performs it; the agent's own credentials and direct calls fail.

use seb_agent::{
    admission::{Decision, Reason},
    cert::{
        ExecutionContract, MutationRequest, Provider,
        contract::{AgentIdentity, ScopedIdentity},
        dev_sab::IssueOptions,
    },
    enforcement::BrokerSockets,
    execute::{
        MintedIdentity, OutcomeStatus,
        aws::{AwsConfig, AwsExecutor, AwsOperation, preset},
        broker_http::BrokerHttp,
    },
};
use seb_sandbox::{
    Sandbox, Tools,
    broker::{Broker, certified, this_process},
    moto::{self, AwsWorld, Moto, put_object},
};
use serde_json::json;

fn tools() -> Tools {
    Tools::for_tests(env!("CARGO_BIN_EXE_seb-probe"))
}

const API: &str = "127.0.0.2:8443";

struct World {
    // Declared first so moto stops before the sandbox goes.
    _moto: Moto,
    broker: Broker,
    aws: AwsWorld,
}

fn world(label: &str) -> World {
    let sandbox = Sandbox::new(label, tools()).unwrap();
    let moto = moto::start(&sandbox.netns, API.parse().unwrap()).unwrap();
    let aws = moto::seed(&sandbox.netns, &format!("http://{API}")).unwrap();
    let credentials = sandbox.dir.join("aws-broker.json");
    std::fs::write(&credentials, serde_json::to_string(&aws.broker).unwrap()).unwrap();
    let extra = format!(
        "[[enforcement.protected]]\ncidr = \"127.0.0.2\"\nport = 8443\nprotocol = \"tcp\"\n\n\
         [aws]\nendpoint = \"http://{API}\"\ncredentials_file = \"{}\"\n\n\
         [passthrough]\naws_role_arn = \"{}\"\naws_operations = [\"s3:GetObject\", \"ec2:DescribeSecurityGroups\"]\n",
        credentials.display(),
        aws.reader_role_arn
    );
    World { _moto: moto, broker: Broker::start(sandbox, &extra, true).unwrap(), aws }
}

impl World {
    fn netns(&self) -> &str {
        &self.broker.sandbox.netns
    }

    fn live_digest(&self, request: &MutationRequest) -> String {
        moto::live_digest(self.netns(), &self.aws, request).unwrap()
    }

    /// A contract for `request` for this test process, certified against live state now.
    fn contract(&self, request: &MutationRequest) -> ExecutionContract {
        let role = ScopedIdentity::AwsRole { role_arn: self.aws.role_arn.clone() };
        certified(&format!("c-{}", request.digest()), this_process(), request, &self.live_digest(request), role)
    }

    fn object(&self, key: &str) -> Option<String> {
        let request = put_object(&self.aws.bucket, key, "");
        let read = AwsOperation::parse(&request).unwrap().precondition;
        let response = moto::call(self.netns(), &self.aws.endpoint, &read.call, &self.aws.sab).unwrap();
        (response.status() == 200).then(|| String::from_utf8(response.body().to_vec()).unwrap())
    }
}

#[track_caller]
fn assert_executed(decision: &Decision) -> &seb_agent::execute::Outcome {
    assert!(decision.admitted, "{decision:?}");
    let outcome = decision.outcome.as_ref().expect("an admitted proposal has an outcome");
    assert_eq!(outcome.status, OutcomeStatus::Succeeded, "{outcome:?}");
    assert_eq!(outcome.decision_seq, decision.record_seq);
    assert!(outcome.record_seq > decision.record_seq, "the outcome is recorded after its decision: {outcome:?}");
    outcome
}

#[test]
fn certified_s3_and_ec2_mutations_execute_with_a_session_minted_for_each() {
    let w = world("exec");
    let request = put_object(&w.aws.bucket, "config/app.json", "replicas=3");
    let decision = w.broker.decide(&w.contract(&request), &request);
    let outcome = assert_executed(&decision);
    assert_eq!(outcome.api_status, Some(200));
    let Some(MintedIdentity::AwsSession { role_arn, role_session_name, source_identity, duration_seconds, .. }) =
        &outcome.identity
    else {
        panic!("an AWS session is minted: {outcome:?}");
    };
    assert_eq!(role_arn, &w.aws.role_arn);
    assert_eq!(role_session_name, &format!("seb-{}", decision.decision_id));
    assert_eq!(source_identity, &decision.decision_id);
    assert_eq!(*duration_seconds, 900);
    assert_eq!(w.object("config/app.json").as_deref(), Some("replicas=3"));
    assert_eq!(outcome.resulting_state_digest, None, "no postcondition, no resulting-state read");

    let target = format!("arn:aws:ec2:{}:{}:security-group/{}", moto::REGION, moto::ACCOUNT, w.aws.security_group);
    let rule = json!({"ip_permissions": [{"protocol": "tcp", "from_port": 443, "to_port": 443, "cidrs": ["10.0.0.0/8"]}],
        "postcondition": true});
    let request = preset::request("ec2:AuthorizeSecurityGroupIngress", &target, &rule).unwrap();
    let before = w.live_digest(&request);
    let decision = w.broker.decide(&w.contract(&request), &request);
    let outcome = assert_executed(&decision);
    let after = w.live_digest(&request);
    assert_ne!(before, after, "the security group changed");
    assert_eq!(outcome.resulting_state_digest.as_deref(), Some(after.as_str()));

    // Both outcomes are records chained after their decisions, and the chain verifies.
    let verify = w.broker.sandbox.agent_cli(&["audit", "verify", "--json"]).unwrap();
    assert!(verify.status.success(), "{}", String::from_utf8_lossy(&verify.stdout));
    let listing = w.broker.sandbox.agent_cli(&["audit", "list", "--kind", "outcome", "--json"]).unwrap();
    assert_eq!(String::from_utf8(listing.stdout).unwrap().lines().count(), 2);

    // Through the CLI: admitted and executed is the one success, exit status 0.
    let request = put_object(&w.aws.bucket, "config/cli.json", "replicas=4");
    let agent = w.broker.sandbox.tools.agent.to_string_lossy().into_owned();
    let contract = ExecutionContract {
        agent: AgentIdentity { uid: Some(0), exe: Some(agent), ..Default::default() },
        ..w.contract(&request)
    };
    let dir = &w.broker.sandbox.dir;
    std::fs::write(dir.join("cli.pem"), w.broker.issue(&contract, &IssueOptions::default())).unwrap();
    std::fs::write(dir.join("cli.json"), serde_json::to_string(&request).unwrap()).unwrap();
    let cert = dir.join("cli.pem").to_string_lossy().into_owned();
    let request_path = dir.join("cli.json").to_string_lossy().into_owned();
    let proposed = w.broker.sandbox.agent_cli(&["propose", "--cert", &cert, "--request", &request_path]).unwrap();
    let text = String::from_utf8_lossy(&proposed.stdout);
    assert_eq!(proposed.status.code(), Some(0), "{text}{}", String::from_utf8_lossy(&proposed.stderr));
    assert!(text.starts_with("ADMITTED (admitted)") && text.contains("outcome succeeded, API status 200"), "{text}");
    assert_eq!(w.object("config/cli.json").as_deref(), Some("replicas=4"));
}

#[test]
fn drift_from_the_certified_precondition_is_denied_and_nothing_is_executed() {
    let w = world("drift");
    let first = put_object(&w.aws.bucket, "config/app.json", "replicas=3");
    let stale = w.contract(&put_object(&w.aws.bucket, "config/app.json", "replicas=5"));
    assert_executed(&w.broker.decide(&w.contract(&first), &first));

    // Certified while the object did not exist yet; it exists now.
    let second = put_object(&w.aws.bucket, "config/app.json", "replicas=5");
    let decision = w.broker.decide(&stale, &second);
    assert!(!decision.admitted);
    assert_eq!(decision.reason, Reason::Drift, "{decision:?}");
    assert!(decision.outcome.is_none(), "nothing is executed on drift");
    assert_eq!(w.object("config/app.json").as_deref(), Some("replicas=3"), "the object is untouched");

    // Re-certified against the live state, the same change goes through.
    assert_executed(&w.broker.decide(&w.contract(&second), &second));
    assert_eq!(w.object("config/app.json").as_deref(), Some("replicas=5"));
}

#[test]
fn the_agents_own_credentials_are_refused_and_its_direct_connection_is_blocked() {
    let w = world("agentcreds");
    let request = put_object(&w.aws.bucket, "config/app.json", "replicas=9");
    let operation = AwsOperation::parse(&request).unwrap();

    // From outside the enforced cgroup the API is reachable, and IAM refuses the agent.
    let response = moto::call(w.netns(), &w.aws.endpoint, &operation.mutation, &w.aws.agent).unwrap();
    assert_eq!(response.status(), 403, "{}", String::from_utf8_lossy(response.body()));
    assert!(String::from_utf8_lossy(response.body()).contains("AccessDenied"));
    assert_eq!(w.object("config/app.json"), None);

    // From inside it, the kernel does not even let the agent connect.
    let outcome = w.broker.sandbox.attempt("workload", "tcp", API).unwrap();
    assert_eq!(outcome["result"], "EPERM", "{outcome}");

    // Through the broker, certified, it happens.
    assert_executed(&w.broker.decide(&w.contract(&request), &request));
    assert_eq!(w.object("config/app.json").as_deref(), Some("replicas=9"));
}

#[test]
fn a_minted_session_carries_the_certified_session_policy_and_stays_within_its_role() {
    let mut w = world("session");
    w.broker.sandbox.kill_agent().unwrap();
    let request = put_object(&w.aws.bucket, "config/app.json", "x");
    let operation = AwsOperation::parse(&request).unwrap();
    let policy = operation.session_policy();
    assert_eq!(
        policy["Statement"],
        json!([{"Effect": "Allow", "Action": ["s3:PutObject"], "Resource": ["arn:aws:s3:::seb-demo/config/app.json"]}])
    );
    let pin_path = w.broker.sandbox.pin_path.clone();
    let dir = w.broker.sandbox.dir.clone();
    let (aws, netns) = (w.aws.clone(), w.netns().to_string());
    let other = put_object(&aws.other_bucket, "anything", "x");
    let certified = policy.clone();
    let status = moto::in_netns(&netns, move || async move {
        let credentials = dir.join("aws-broker.json");
        let config = AwsConfig {
            endpoint: Some(aws.endpoint.clone()),
            region: moto::REGION.into(),
            credentials_file: credentials,
            read_role_arn: None,
        };
        let executor = AwsExecutor::new(config, BrokerHttp::new(BrokerSockets::open_at(&pin_path)?))?;
        let session = executor.mint(&aws.role_arn, "d-test", Some(&certified)).await?;
        let (status, _) = executor.mutate(&AwsOperation::parse(&other)?, &session).await?;
        Ok(status)
    })
    .unwrap();
    assert_eq!(status, 403, "the minted session must not write outside the executor role");
    // moto applies the role's policy, not a session policy: what STS was sent for the
    // session is what shows the session carries the certified one.
    let sent = moto::session_policies(w.netns(), &w.aws.endpoint).unwrap();
    let (_, sent) = sent.iter().find(|(name, _)| name == "seb-d-test").expect("the session seb-d-test was minted");
    assert_eq!(sent.as_ref(), Some(&policy), "the session policy STS received");
}

#[test]
fn a_decision_left_without_an_outcome_by_a_crash_is_reconciled_on_restart() {
    use seb_agent::{
        admission::{CallerIdentity, DECISION_KIND, DecisionRecord, RequestSummary, state::Epochs},
        audit::now_ns,
    };
    let mut w = world("reconcile");
    let request = put_object(&w.aws.bucket, "config/app.json", "replicas=3");
    assert_executed(&w.broker.decide(&w.contract(&request), &request));
    w.broker.sandbox.stop_agent().unwrap();

    // What a broker killed between recording a decision and its outcome leaves behind.
    let (ledger, thread) = w.broker.sandbox.start_ledger().unwrap();
    let decision = DecisionRecord {
        decision_id: "d-crashed".into(),
        admitted: true,
        reason: Reason::Admitted,
        message: "every admission predicate holds".into(),
        caller: CallerIdentity { uid: 0, gid: 0, pid: 1, exe: None, cgroup: None, pod_uid: None },
        serial: Some("0badc0de".into()),
        contract_id: Some("c-crashed".into()),
        request: RequestSummary {
            provider: Provider::Aws,
            operation: request.operation.clone(),
            target: request.target.clone(),
            digest: request.digest(),
            state_read: request.state_read().cloned(),
        },
        identity: Some(ScopedIdentity::AwsRole { role_arn: w.aws.role_arn.clone() }),
        active_epochs: Epochs { policy: Some(1), revocation: Some(1) },
    };
    // The same decision as a short-form preset records it (what the Python client and
    // `seb-agent mcp` certify): no read in the record; the preset names it.
    let short = DecisionRecord {
        decision_id: "d-crashed-short".into(),
        serial: Some("0badc0df".into()),
        request: RequestSummary { state_read: None, ..decision.request.clone() },
        ..decision.clone()
    };
    let seq = ledger.run_blocking(move |batch| batch.append(DECISION_KIND, now_ns(), &decision)).unwrap();
    let short_seq = ledger.run_blocking(move |batch| batch.append(DECISION_KIND, now_ns(), &short)).unwrap();
    drop(ledger);
    thread.join().unwrap();

    w.broker.sandbox.start_agent().unwrap();
    let listing = w.broker.sandbox.agent_cli(&["audit", "list", "--kind", "outcome", "--json"]).unwrap();
    let outcomes: Vec<serde_json::Value> =
        String::from_utf8(listing.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let reconciled =
        outcomes.iter().find(|o| o["body"]["decision_seq"] == seq).expect("an outcome for the orphaned decision");
    assert_eq!(reconciled["body"]["status"], "unknown", "{reconciled}");
    assert_eq!(
        reconciled["body"]["resulting_state_digest"],
        w.live_digest(&request),
        "the live state was read: {reconciled}"
    );
    assert_eq!(reconciled["body"]["identity"]["role_session_name"], "seb-d-crashed");
    let short =
        outcomes.iter().find(|o| o["body"]["decision_seq"] == short_seq).expect("an outcome for the short form");
    assert_eq!(short["body"]["resulting_state_digest"], w.live_digest(&request), "read again: {short}");
    assert_eq!(outcomes.len(), 3, "exactly one outcome per admitted decision");
    let verify = w.broker.sandbox.agent_cli(&["audit", "verify"]).unwrap();
    assert!(verify.status.success(), "{}", String::from_utf8_lossy(&verify.stdout));
}

#[test]
fn passthrough_reads_need_no_certificate_only_read_and_are_recorded() {
    use seb_agent::protocol::{Request, Response};
    let w = world("passthrough");
    let request = put_object(&w.aws.bucket, "config/app.json", "replicas=3");
    assert_executed(&w.broker.decide(&w.contract(&request), &request));

    let read: MutationRequest = serde_json::from_value(json!({
        "provider": "aws", "operation": "s3:GetObject", "target": "arn:aws:s3:::seb-demo/config/app.json"
    }))
    .unwrap();
    let Response::Read(result) = w.broker.call(Request::Read { request: read }) else {
        panic!("expected a read result")
    };
    assert_eq!(result.status, 200);
    assert_eq!(result.body.as_deref(), Some("replicas=3"));
    assert_eq!(result.state_digest, w.live_digest(&request), "the digest a SAB certifies as precondition");

    // A mutation is never a passthrough read, certificate or not.
    let Response::Error { message, .. } = w.broker.call(Request::Read { request: request.clone() }) else {
        panic!("a mutation must not pass through");
    };
    assert!(message.contains("not a passthrough read"), "{message}");
    assert_eq!(w.object("config/app.json").as_deref(), Some("replicas=3"));

    let listing = w.broker.sandbox.agent_cli(&["audit", "list", "--kind", "read", "--json"]).unwrap();
    let reads: Vec<serde_json::Value> =
        String::from_utf8(listing.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(reads.len(), 2, "both reads, served and refused, are recorded: {reads:?}");
    assert_eq!(reads[0]["body"]["status"], 200);
    assert!(reads[1]["body"]["error"].as_str().is_some());
}

#[test]
fn every_supported_s3_ec2_and_iam_mutation_executes_against_the_emulator() {
    let w = world("awsops");
    let run = |request: serde_json::Value| {
        let mut params = request["params"].clone();
        if params.is_null() {
            params = json!({});
        }
        params["postcondition"] = json!(true);
        let operation = request["operation"].as_str().unwrap();
        let request = preset::request(operation, request["target"].as_str().unwrap(), &params).unwrap();
        let decision = w.broker.decide(&w.contract(&request), &request);
        let outcome = assert_executed(&decision).clone();
        assert_eq!(outcome.resulting_state_digest, Some(w.live_digest(&request)), "{outcome:?}");
        outcome
    };
    let object = format!("arn:aws:s3:::{}/config/app.json", w.aws.bucket);
    run(json!({"provider": "aws", "operation": "s3:PutObject", "target": object, "params": {"body": "x"}}));
    run(json!({"provider": "aws", "operation": "s3:DeleteObject", "target": object}));
    assert_eq!(w.object("config/app.json"), None);

    let policy = json!({"Version": "2012-10-17", "Statement": [{"Effect": "Deny", "Principal": "*", "Action": "s3:DeleteBucket",
        "Resource": format!("arn:aws:s3:::{}", w.aws.bucket)}]});
    run(
        json!({"provider": "aws", "operation": "s3:PutBucketPolicy", "target": format!("arn:aws:s3:::{}", w.aws.bucket),
        "params": {"policy": policy}}),
    );

    let group = format!("arn:aws:ec2:{}:{}:security-group/{}", moto::REGION, moto::ACCOUNT, w.aws.security_group);
    let rule =
        json!({"ip_permissions": [{"protocol": "tcp", "from_port": 22, "to_port": 22, "cidrs": ["192.0.2.0/24"]}]});
    run(json!({"provider": "aws", "operation": "ec2:AuthorizeSecurityGroupIngress", "target": group, "params": rule}));
    run(json!({"provider": "aws", "operation": "ec2:RevokeSecurityGroupIngress", "target": group, "params": rule}));

    let role = format!("arn:aws:iam::{}:role/{}", moto::ACCOUNT, moto::TARGET_ROLE);
    let managed = json!({"policy_arn": moto::ATTACHABLE_POLICY});
    run(json!({"provider": "aws", "operation": "iam:AttachRolePolicy", "target": role, "params": managed}));
    run(json!({"provider": "aws", "operation": "iam:DetachRolePolicy", "target": role, "params": managed}));
}
