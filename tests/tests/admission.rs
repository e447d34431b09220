//! Certificate admission through the real broker socket: every predicate admits a good
//! proposal and denies a bad one with its own reason code, with real certificates from
//! the dev SAB and hand-built malformed ones.

use std::{path::PathBuf, process::Command, time::Duration};

use rcgen::{BasicConstraints, CustomExtension, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyUsagePurpose};
use seb_agent::{
    admission::{Decision, Reason, state::RevocationTarget},
    cert::{
        ExecutionContract, MutationRequest, Provider, TrustAnchors, ValidityPolicy,
        contract::{AgentIdentity, CONTRACT_OID, CONTRACT_OID_TEXT, SAB_EKU_OID_TEXT, ScopedIdentity},
        dev_sab::{self, Algorithm, IssueOptions},
    },
    protocol::{Request, Response},
};
use seb_sandbox::{
    Sandbox, Tools,
    broker::{Broker, certified, this_process},
    forge,
};

fn tools() -> Tools {
    Tools::for_tests(env!("CARGO_BIN_EXE_seb-probe"))
}

/// A sandboxed broker trusting a fresh dev SAB, with epochs 1/1 unless told otherwise.
fn broker(label: &str, set_epochs: bool) -> Broker {
    Broker::start(Sandbox::new(label, tools()).unwrap(), "", set_epochs).unwrap()
}

fn request() -> MutationRequest {
    serde_json::from_value(serde_json::json!({
        "provider": "aws",
        "operation": "s3:PutObject",
        "target": "arn:aws:s3:::seb-demo/config.json",
        "params": {"body": "replicas=3"}
    }))
    .unwrap()
}

/// The contract certifying `request()` for this test process.
fn contract() -> ExecutionContract {
    let role = ScopedIdentity::AwsRole { role_arn: "arn:aws:iam::123456789012:role/seb-demo".into() };
    certified(&format!("c-{}", uuid_like()), this_process(), &request(), "sha256:00", role)
}

fn uuid_like() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    format!("{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}

#[track_caller]
fn assert_admitted(decision: &Decision) {
    assert!(decision.admitted, "expected admission: {decision:?}");
    assert_eq!(decision.reason, Reason::Admitted);
    assert!(decision.record_seq > 0, "an admission is recorded: {decision:?}");
}

#[track_caller]
fn assert_denied(decision: &Decision, reason: Reason) {
    assert!(!decision.admitted, "expected a denial ({reason}): {decision:?}");
    assert_eq!(decision.reason, reason, "{decision:?}");
    assert!(decision.record_seq > 0, "a denial is recorded: {decision:?}");
}

#[test]
fn certificate_predicates_each_admit_and_deny() {
    let f = broker("certs", true);
    let (contract, request) = (contract(), request());

    // Ed25519 and ECDSA P-256 certificates from the trusted SAB are admitted.
    assert_admitted(&f.decide(&contract, &request));
    let p256 = IssueOptions { algorithm: Algorithm::P256, ..Default::default() };
    assert_admitted(&f.propose(&f.issue(&contract, &p256), &request));

    // A certificate from another CA with the very same name: the signature fails.
    let impostor = dev_sab::create_ca(&f.sandbox.dir.join("impostor"), "seb test SAB", Algorithm::Ed25519).unwrap();
    let forged = dev_sab::issue(&impostor, &contract, &IssueOptions::default()).unwrap();
    assert_denied(&f.propose(&forged, &request), Reason::UntrustedIssuer);

    // The critical contract extension altered after signing.
    let genuine = f.issue(&contract, &IssueOptions::default());
    assert_denied(&f.propose(&alter_contract(&genuine), &request), Reason::UntrustedIssuer);

    let expired = IssueOptions { start_offset_secs: -3000, ttl: Duration::from_secs(600), ..Default::default() };
    assert_denied(&f.propose(&f.issue(&contract, &expired), &request), Reason::Expired);
    let early = IssueOptions { start_offset_secs: 600, ..Default::default() };
    assert_denied(&f.propose(&f.issue(&contract, &early), &request), Reason::NotYetValid);
    let long = IssueOptions { ttl: Duration::from_secs(7200), ..Default::default() };
    assert_denied(&f.propose(&f.issue(&contract, &long), &request), Reason::TtlExceedsMaximum);
    let unknown = IssueOptions { unknown_critical_extension: true, ..Default::default() };
    assert_denied(&f.propose(&f.issue(&contract, &unknown), &request), Reason::UnsupportedCriticalExtension);
    let missing = IssueOptions { omit_contract: true, ..Default::default() };
    assert_denied(&f.propose(&f.issue(&contract, &missing), &request), Reason::MissingContract);
    let not_critical = IssueOptions { contract_critical: false, ..Default::default() };
    assert_denied(&f.propose(&f.issue(&contract, &not_critical), &request), Reason::MalformedContract);
    // A contract naming only a node binds no caller: any process there could use it.
    let anyone = ExecutionContract {
        agent: AgentIdentity { node: Some("node-a".into()), ..AgentIdentity::default() },
        ..contract.clone()
    };
    assert_denied(&f.decide(&anyone, &request), Reason::MalformedContract);
    assert_denied(
        &f.propose("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n", &request),
        Reason::MalformedCertificate,
    );
}

/// Flip one byte inside the contract JSON of a PEM certificate; the rest stays intact.
fn alter_contract(pem: &str) -> String {
    let block = ::pem::parse(pem).unwrap();
    let mut der = block.contents().to_vec();
    let needle = b"s3:PutObject";
    let at = der.windows(needle.len()).position(|w| w == needle).expect("contract in the DER");
    der[at + needle.len() - 1] = b'X';
    ::pem::encode(&::pem::Pem::new("CERTIFICATE", der))
}

#[test]
fn caller_and_request_predicates_each_admit_and_deny() {
    let f = broker("request", true);
    let (contract, request) = (contract(), request());
    assert_admitted(&f.decide(&contract, &request));

    let other_uid =
        ExecutionContract { agent: AgentIdentity { uid: Some(1000), ..Default::default() }, ..contract.clone() };
    assert_denied(&f.decide(&other_uid, &request), Reason::CallerMismatch);
    let other_exe = ExecutionContract {
        agent: AgentIdentity { exe: Some("/usr/local/bin/some-other-agent".into()), ..Default::default() },
        ..contract.clone()
    };
    assert_denied(&f.decide(&other_exe, &request), Reason::CallerMismatch);
    // A contract bound to another node is refused, node-local mode included (this
    // broker's `admission.node_name` is the sandbox SAB's node). Before, only cluster
    // mode compared it: one certificate ran once on every node trusting its SAB.
    let on = |node: &str| ExecutionContract {
        agent: AgentIdentity { node: Some(node.into()), ..contract.agent.clone() },
        ..contract.clone()
    };
    assert_admitted(&f.decide(&on(seb_sandbox::NODE_NAME), &request));
    assert_denied(&f.decide(&on("node-b"), &request), Reason::CallerMismatch);
    // The root cgroup holds every process: bound to it alone, a contract binds no caller.
    // (A caller bound by its own cgroup: the cgroup-namespace test below.)
    let everyone = ExecutionContract {
        agent: AgentIdentity { cgroup: Some("/".into()), ..Default::default() },
        ..contract.clone()
    };
    assert_denied(&f.decide(&everyone, &request), Reason::MalformedContract);

    let k8s = MutationRequest { provider: Provider::Kubernetes, ..request.clone() };
    assert_denied(&f.decide(&contract, &k8s), Reason::ProviderMismatch);
    let delete = MutationRequest { operation: "s3:DeleteObject".into(), ..request.clone() };
    assert_denied(&f.decide(&contract, &delete), Reason::OperationMismatch);
    let elsewhere = MutationRequest { target: "arn:aws:s3:::seb-demo/other.json".into(), ..request.clone() };
    assert_denied(&f.decide(&contract, &elsewhere), Reason::TargetMismatch);
    let mut tampered = request.clone();
    tampered.params["body"] = "replicas=300".into();
    assert_denied(&f.decide(&contract, &tampered), Reason::RequestMismatch);
}

/// Started in a cgroup namespace of its own (as a container is), the broker still reads
/// a caller's cgroup as the host names it, so a contract bound to that cgroup matches:
/// it joins PID 1's cgroup namespace first. Without, it read the caller in `workload` as
/// `/../workload` and refused it.
#[test]
fn a_broker_in_its_own_cgroup_namespace_reads_callers_cgroups_as_the_host_does() {
    let mut sandbox = Sandbox::new("cgroupns", tools()).unwrap();
    sandbox.agent_wrapper = vec!["unshare".into(), "--cgroup".into()];
    let f = Broker::start(sandbox, "", true).unwrap();
    let propose_from_workload = |cgroup: String| {
        let contract =
            ExecutionContract { agent: AgentIdentity { cgroup: Some(cgroup), ..Default::default() }, ..contract() };
        let certificate = f.sandbox.dir.join("cgroup-bound.pem");
        std::fs::write(&certificate, f.issue(&contract, &IssueOptions::default())).unwrap();
        let request_file = f.sandbox.dir.join("cgroup-bound.json");
        std::fs::write(&request_file, serde_json::to_string(&request()).unwrap()).unwrap();
        let (socket, certificate, request_file) = (
            f.sandbox.socket.to_string_lossy().into_owned(),
            certificate.to_string_lossy().into_owned(),
            request_file.to_string_lossy().into_owned(),
        );
        let args = ["--json", "propose", "--socket", &socket, "--cert", &certificate, "--request", &request_file];
        let output = f.sandbox.run_in("workload", &f.sandbox.tools.agent, &args, &[]).unwrap();
        serde_json::from_slice::<serde_json::Value>(&output.stdout)
            .unwrap_or_else(|_| panic!("no decision: {}", String::from_utf8_lossy(&output.stderr)))
    };
    let workload = format!("/{}/workload", f.sandbox.cgroup_relative.trim_start_matches('/'));
    let decision = propose_from_workload(workload);
    assert_eq!(decision["admitted"], true, "{decision}");
    let decision = propose_from_workload(format!("/{}/exempt", f.sandbox.cgroup_relative.trim_start_matches('/')));
    assert_eq!(decision["reason"], "caller_mismatch", "{decision}");
}

#[test]
fn epoch_revocation_and_replay_predicates_each_admit_and_deny() {
    let f = broker("state", false);
    let (contract, request) = (contract(), request());

    // No epochs known yet: fail closed.
    assert_denied(&f.decide(&contract, &request), Reason::EpochsUnset);
    f.admin(Request::SetEpochs { policy: Some(1), revocation: Some(1) });
    assert_admitted(&f.decide(&contract, &request));

    let other_policy = ExecutionContract { policy_epoch: 2, ..contract.clone() };
    assert_denied(&f.decide(&other_policy, &request), Reason::PolicyEpochMismatch);
    let ahead = ExecutionContract { revocation_epoch: 2, ..contract.clone() };
    assert_denied(&f.decide(&ahead, &request), Reason::RevocationStateBehind);

    // Revoke a serial: the very next admission of it is denied; other serials pass.
    let certificate = f.issue(&contract, &IssueOptions::default());
    let serial = dev_serial(&certificate);
    f.admin(Request::Revoke { target: RevocationTarget::Serial, value: serial, reason: Some("test".into()) });
    assert_denied(&f.propose(&certificate, &request), Reason::SerialRevoked);
    assert_admitted(&f.decide(&contract, &request));

    // Revoke a contract id: every certificate of it is denied.
    let doomed = ExecutionContract { contract_id: "c-doomed".into(), ..contract.clone() };
    assert_admitted(&f.decide(&doomed, &request));
    f.admin(Request::Revoke { target: RevocationTarget::ContractId, value: "c-doomed".into(), reason: None });
    assert_denied(&f.decide(&doomed, &request), Reason::ContractRevoked);

    // Moving the revocation epoch on retires older certificates.
    f.admin(Request::SetEpochs { policy: None, revocation: Some(2) });
    assert_denied(&f.decide(&contract, &request), Reason::RevocationEpochStale);
    assert_admitted(&f.decide(&ahead, &request));
    let backwards = f.call(Request::SetEpochs { policy: None, revocation: Some(1) });
    assert!(matches!(backwards, Response::Error { .. }), "the revocation epoch must not go back: {backwards:?}");
    // Nor the policy epoch (that would revive certificates of a retired policy), and
    // neither goes past what a contract can carry (every certificate stale for good).
    let backwards = f.call(Request::SetEpochs { policy: Some(0), revocation: None });
    assert!(matches!(backwards, Response::Error { .. }), "the policy epoch must not go back: {backwards:?}");
    let beyond = f.call(Request::SetEpochs { policy: None, revocation: Some(1 << 53) });
    assert!(matches!(beyond, Response::Error { .. }), "past 2^53-1: {beyond:?}");

    // Root in the enforced scope (a pod's root is uid 0 on the node) is no administrator.
    let socket = f.sandbox.socket.to_string_lossy().into_owned();
    for admin in [&["epoch", "--revocation", "99"][..], &["revoke", "--contract", "c-live"], &["status"]] {
        let mut args = admin.to_vec();
        args.extend(["--socket", &socket]);
        let output = f.sandbox.run_in("workload", &f.sandbox.tools.agent, &args, &[]).unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            !output.status.success() && stderr.contains("is a process of the enforced scope"),
            "{admin:?} from the scope: {stderr}"
        );
    }
    // Nor is root outside the scope in a pid namespace of its own (a container whose
    // cgroup names no pod the broker knows: another runtime's, a kubelet's own root).
    for admin in [&["epoch", "--revocation", "99"][..], &["revoke", "--contract", "c-live"], &["status"]] {
        let output = std::process::Command::new("unshare")
            .args(["--pid", "--fork"])
            .arg(&f.sandbox.tools.agent)
            .args(admin)
            .args(["--socket", &socket])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            !output.status.success() && stderr.contains("runs in another pid namespace"),
            "{admin:?} from another pid namespace: {stderr}"
        );
    }
    let Response::Epochs(epochs) = f.call(Request::GetEpochs) else { panic!("no epochs") };
    assert_eq!(epochs.revocation, Some(2), "the scope's root, or a container's, moved the revocation epoch");
    assert_admitted(&f.decide(&ahead, &request));
}

fn dev_serial(pem: &str) -> String {
    let path = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(path.path(), pem).unwrap();
    seb_agent::cli::cert::inspect(path.path()).unwrap()["serial"].as_str().unwrap().to_string()
}

#[test]
fn a_used_serial_is_refused_again_even_after_a_broker_restart() {
    let mut f = broker("replay", true);
    let (contract, request) = (contract(), request());
    let certificate = f.issue(&contract, &IssueOptions::default());
    assert_admitted(&f.propose(&certificate, &request));
    assert_denied(&f.propose(&certificate, &request), Reason::Replayed);

    f.sandbox.kill_agent().unwrap();
    f.sandbox.start_agent().unwrap();
    assert_denied(&f.propose(&certificate, &request), Reason::Replayed);
    // Epochs and revocations persist too: a new certificate is admitted without setup.
    assert_admitted(&f.decide(&contract, &request));
}

#[test]
fn the_cli_exit_status_tells_admitted_but_not_executed_from_denied_and_from_errors() {
    let f = broker("cli", true);
    let agent = f.sandbox.tools.agent.clone();
    let contract = ExecutionContract {
        agent: AgentIdentity { uid: Some(0), exe: Some(agent.to_string_lossy().into_owned()), ..Default::default() },
        ..contract()
    };
    let dir = &f.sandbox.dir;
    let (cert_path, request_path): (PathBuf, PathBuf) = (dir.join("cert.pem"), dir.join("request.json"));
    std::fs::write(&cert_path, f.issue(&contract, &IssueOptions::default())).unwrap();
    std::fs::write(&request_path, serde_json::to_string(&request()).unwrap()).unwrap();
    let propose = |extra: &[&str]| {
        let mut args =
            vec!["propose", "--cert", cert_path.to_str().unwrap(), "--request", request_path.to_str().unwrap()];
        args.extend(extra);
        f.sandbox.agent_cli(&args).unwrap()
    };
    // This broker has no AWS executor: admitted, but nothing was done, which is not success.
    let first = propose(&["--json"]);
    assert_eq!(first.status.code(), Some(3), "{}", String::from_utf8_lossy(&first.stderr));
    let decision: serde_json::Value = serde_json::from_slice(&first.stdout).unwrap();
    assert_eq!(decision["reason"], "admitted");
    assert_eq!(decision["outcome"]["status"], "not_executed", "{decision}");
    assert_eq!(decision["outcome"]["error"], "this broker has no executor for provider aws", "{decision}");
    // Denied (a replay), in text for a person.
    let second = propose(&[]);
    assert_eq!(second.status.code(), Some(1));
    let text = String::from_utf8(second.stdout).unwrap();
    assert!(text.starts_with("DENIED (replayed): "), "{text}");

    // SEB_SOCKET names the broker (no --config); an unreachable one is an error, 2.
    let bare = |socket: &std::path::Path, args: &[&str]| {
        Command::new(&agent).args(args).env("SEB_SOCKET", socket).env_remove("SEB_CONFIG").output().unwrap()
    };
    let epochs = bare(&f.sandbox.socket, &["epoch", "--json"]);
    assert!(epochs.status.success(), "{}", String::from_utf8_lossy(&epochs.stderr));
    let epochs: serde_json::Value = serde_json::from_slice(&epochs.stdout).unwrap();
    assert_eq!((epochs["policy"].as_u64(), epochs["revocation"].as_u64()), (Some(1), Some(1)), "{epochs}");
    let unreachable = bare(&dir.join("absent.sock"), &["status"]);
    assert_eq!(unreachable.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&unreachable.stderr).contains("absent.sock"));
    assert!(unreachable.stdout.is_empty());
}

/// `seb-agent` with `args`, and the sandbox config when the command reads one.
fn cli(f: &Broker, args: &[&str]) -> std::process::Output {
    let mut command = Command::new(&f.sandbox.tools.agent);
    command.args(args);
    if args[0] != "cert" {
        command.arg("--config").arg(&f.sandbox.config);
    }
    command.output().unwrap()
}

#[test]
fn every_command_prints_text_by_default_and_json_with_json() {
    let f = broker("cli-json", true);
    assert_admitted(&f.decide(&contract(), &request()));
    let dir = &f.sandbox.dir;
    let cert = dir.join("inspected.pem");
    std::fs::write(&cert, f.issue(&contract(), &IssueOptions::default())).unwrap();
    let cert = cert.to_str().unwrap();
    let commands: [&[&str]; 11] = [
        &["status"],
        &["epoch"],
        &["epoch", "--policy", "1"],
        &["revoke", "--serial", "0a:0b", "--reason", "rotated"],
        &["audit", "list"],
        &["audit", "list", "--kind", "decision"],
        &["audit", "show", "1"],
        &["audit", "verify"],
        &["check-config"],
        &["cert", "inspect", cert],
        &["cert", "ca", "--dir"],
    ];
    for args in commands {
        let with = |mode: &str| {
            let mut args = args.to_vec();
            let ca = dir.join(format!("ca-{mode}"));
            if args.ends_with(&["--dir"]) {
                args.push(ca.to_str().unwrap());
            }
            let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
            args
        };
        let mut json_args = with("json");
        json_args.push("--json".into());
        let json = cli(&f, &json_args.iter().map(String::as_str).collect::<Vec<_>>());
        let stdout = String::from_utf8(json.stdout).unwrap();
        assert!(json.status.success(), "{args:?} --json: {}", String::from_utf8_lossy(&json.stderr));
        assert!(!stdout.is_empty(), "{args:?} --json printed nothing");
        for line in stdout.lines() {
            let parsed: Result<serde_json::Value, _> = serde_json::from_str(line);
            assert!(parsed.is_ok(), "{args:?} --json printed a line that is not JSON: {line}");
        }
        let text = cli(&f, &with("text").iter().map(String::as_str).collect::<Vec<_>>());
        let stdout = String::from_utf8(text.stdout).unwrap();
        assert!(text.status.success(), "{args:?}: {}", String::from_utf8_lossy(&text.stderr));
        let first = stdout.lines().next().unwrap_or_else(|| panic!("{args:?} printed nothing"));
        assert!(serde_json::from_str::<serde_json::Value>(first).is_err(), "{args:?} printed JSON by default: {first}");
    }

    // A reader that goes away early ends the command quietly, with no panic.
    for args in [&["status"][..], &["audit", "list"], &["audit", "list", "--json"]] {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let output = Command::new(&f.sandbox.tools.agent)
            .args(args)
            .arg("--config")
            .arg(&f.sandbox.config)
            .stdout(writer)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(0), "{args:?} into a closed pipe: {stderr}");
        assert!(stderr.is_empty(), "{args:?} into a closed pipe: {stderr}");
    }

    // A kind the broker never writes is an error naming the kinds, not an empty list.
    let typo = cli(&f, &["audit", "list", "--kind", "decisions"]);
    assert_eq!(typo.status.code(), Some(2));
    assert!(typo.stdout.is_empty());
    let stderr = String::from_utf8_lossy(&typo.stderr);
    assert!(stderr.contains("`decisions`") && stderr.contains("decision, outcome,"), "{stderr}");
}

/// Raw frames over a blocking socket, to send what no well-behaved client would.
mod raw {
    use std::{
        io::{Read, Write},
        os::unix::net::UnixStream,
    };

    pub fn send(stream: &mut UnixStream, declared_len: u32, body: &[u8]) {
        stream.write_all(&declared_len.to_be_bytes()).unwrap();
        stream.write_all(body).unwrap();
    }

    /// The next reply, or None if the broker closed the connection.
    pub fn reply(stream: &mut UnixStream) -> Option<serde_json::Value> {
        let mut len = [0u8; 4];
        stream.read_exact(&mut len).ok()?;
        let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
        stream.read_exact(&mut body).ok()?;
        Some(serde_json::from_slice(&body).unwrap())
    }
}

#[test]
fn bad_input_gets_a_clear_error_and_closes_only_that_connection() {
    use std::os::unix::net::UnixStream;
    let f = broker("protocol", true);
    let socket = &f.sandbox.socket;
    let mut bystander = UnixStream::connect(socket).unwrap();

    let cases: [(&str, u32, Vec<u8>, Option<&str>); 5] = [
        ("oversized", 2 << 20, Vec::new(), Some("too_large")),
        ("not JSON", 9, b"{not json".to_vec(), Some("malformed")),
        ("no version", 15, br#"{"type":"ping"}"#.to_vec(), Some("malformed")),
        ("future version", 22, br#"{"v":99,"type":"ping"}"#.to_vec(), Some("unsupported_version")),
        ("unknown type", 31, br#"{"v":1,"type":"launch_missiles"}"#.to_vec(), Some("malformed")),
    ];
    for (what, len, body, code) in cases {
        let mut stream = UnixStream::connect(socket).unwrap();
        raw::send(&mut stream, len, &body);
        let reply = raw::reply(&mut stream).unwrap_or_else(|| panic!("{what}: no error reply"));
        assert_eq!(reply["type"], "error", "{what}: {reply}");
        assert_eq!(reply["code"].as_str(), code, "{what}: {reply}");
        assert!(!reply["message"].as_str().unwrap().is_empty(), "{what}: {reply}");
        assert!(raw::reply(&mut stream).is_none(), "{what}: the connection must be closed after the error");
    }

    // Truncated: fewer bytes than declared, then end of input. Closed without a reply.
    let mut truncated = UnixStream::connect(socket).unwrap();
    raw::send(&mut truncated, 100, b"{\"v\":1");
    truncated.shutdown(std::net::Shutdown::Write).unwrap();
    assert!(raw::reply(&mut truncated).is_none());

    // The other connection was never disturbed, and can make several requests in turn.
    for _ in 0..2 {
        raw::send(&mut bystander, 21, br#"{"v":1,"type":"ping"}"#);
        assert_eq!(raw::reply(&mut bystander).unwrap()["type"], "pong");
    }
}

/// A broker that also trusts a root with no path length limit, and that root's issuer.
fn broker_with_root(label: &str) -> (Broker, forge::Ca) {
    let (root, root_pem) = forge::root(forge::ca_params("seb test root", None)).unwrap();
    (Broker::start_trusting(Sandbox::new(label, tools()).unwrap(), &root_pem).unwrap(), root)
}

#[test]
fn the_path_is_validated_as_rfc_5280_asks() {
    let (f, root) = broker_with_root("path");
    let (contract, request) = (contract(), request());
    let sab = f.ca.issuer().unwrap();
    let propose = |chain: &[&str]| f.propose(&chain.concat(), &request);

    // A CA under the root, allowed to sign leaves, issues one: admitted.
    let (intermediate, intermediate_pem) =
        forge::issued(forge::ca_params("seb test issuing CA", Some(0)), &root).unwrap();
    assert_admitted(&propose(&[
        &forge::leaf(forge::leaf_params(&contract), &intermediate).unwrap(),
        &intermediate_pem,
    ]));

    // An issuer whose key is not the SAB's algorithms' (P-384 here; RSA-8192 is the
    // expensive case): refused before any signature is checked, naming why.
    let (p384, p384_pem) =
        forge::issued_with_key(forge::ca_params("seb test P-384 CA", Some(0)), &root, &rcgen::PKCS_ECDSA_P384_SHA384)
            .unwrap();
    let denied = propose(&[&forge::leaf(forge::leaf_params(&contract), &p384).unwrap(), &p384_pem]);
    assert_denied(&denied, Reason::UntrustedIssuer);
    assert!(denied.message.contains("only Ed25519, or ECDSA P-256 with SHA-256"), "{denied:?}");

    // The leaf: a CA certificate, no digitalSignature, no SAB extended key usage.
    let mut ca_leaf = forge::leaf_params(&contract);
    ca_leaf.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyCertSign];
    let denied = propose(&[&forge::leaf(ca_leaf, &sab).unwrap()]);
    assert_denied(&denied, Reason::LeafIsCa);
    let mut no_signing = forge::leaf_params(&contract);
    no_signing.key_usages = vec![KeyUsagePurpose::KeyEncipherment];
    assert_denied(&propose(&[&forge::leaf(no_signing, &sab).unwrap()]), Reason::LeafLacksDigitalSignature);
    let mut no_key_usage = forge::leaf_params(&contract);
    no_key_usage.key_usages = Vec::new();
    assert_denied(&propose(&[&forge::leaf(no_key_usage, &sab).unwrap()]), Reason::LeafLacksDigitalSignature);
    let mut tls_client = forge::leaf_params(&contract);
    tls_client.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let denied = propose(&[&forge::leaf(tls_client, &sab).unwrap()]);
    assert_denied(&denied, Reason::LeafLacksSabEku);
    assert!(denied.message.contains(SAB_EKU_OID_TEXT), "{denied:?}");

    // An issuer that is not a CA, and CAs not allowed to sign certificates.
    let mut not_ca = forge::ca_params("seb test not a CA", None);
    not_ca.is_ca = IsCa::ExplicitNoCa;
    let mut no_usage = forge::ca_params("seb test CA without keyUsage", Some(0));
    no_usage.key_usages = Vec::new();
    let mut crl_only = forge::ca_params("seb test CRL signer", Some(0));
    crl_only.key_usages = vec![KeyUsagePurpose::CrlSign];
    for (params, reason) in [
        (not_ca, Reason::IssuerNotCa),
        (no_usage, Reason::IssuerLacksKeyCertSign),
        (crl_only, Reason::IssuerLacksKeyCertSign),
    ] {
        let name = params.distinguished_name.get(&DnType::CommonName).cloned();
        let (issuer, issuer_pem) = forge::issued(params, &root).unwrap();
        let denied = propose(&[&forge::leaf(forge::leaf_params(&contract), &issuer).unwrap(), &issuer_pem]);
        assert_denied(&denied, reason);
        assert!(denied.message.contains("seb test"), "the message names the issuer: {denied:?} ({name:?})");
    }

    // An intermediate with a critical extension the broker does not understand.
    let mut constrained = forge::ca_params("seb test CA with an unknown critical extension", Some(0));
    let mut unknown = CustomExtension::from_oid_content(&[1, 3, 6, 1, 4, 1, 99999, 2], vec![0x05, 0x00]);
    unknown.set_criticality(true);
    constrained.custom_extensions.push(unknown);
    let (issuer, issuer_pem) = forge::issued(constrained, &root).unwrap();
    let denied = propose(&[&forge::leaf(forge::leaf_params(&contract), &issuer).unwrap(), &issuer_pem]);
    assert_denied(&denied, Reason::UnsupportedCriticalExtension);

    // Path lengths: the dev SAB signs leaves only (pathLen 0), so a CA under it may not
    // issue; nor may a CA under the root's pathLen-0 intermediate.
    let (under_sab, under_sab_pem) = forge::issued(forge::ca_params("seb test sub-SAB", None), &sab).unwrap();
    let denied = propose(&[&forge::leaf(forge::leaf_params(&contract), &under_sab).unwrap(), &under_sab_pem]);
    assert_denied(&denied, Reason::PathLenExceeded);
    assert!(denied.message.contains("seb test SAB") && denied.message.contains("allows 0"), "{denied:?}");
    let (deeper, deeper_pem) = forge::issued(forge::ca_params("seb test deeper CA", None), &intermediate).unwrap();
    let denied =
        propose(&[&forge::leaf(forge::leaf_params(&contract), &deeper).unwrap(), &deeper_pem, &intermediate_pem]);
    assert_denied(&denied, Reason::PathLenExceeded);
    assert!(denied.message.contains("seb test issuing CA"), "{denied:?}");
}

#[test]
fn the_contract_extension_is_exactly_one_strict_der_value() {
    let f = broker("der", true);
    let (contract, request) = (contract(), request());
    let sab = f.ca.issuer().unwrap();
    let json = contract.canonical_json();
    let utf8 = dev_sab::contract_extension_value(&contract).unwrap();
    // A leaf whose contract extension holds `value` (critical), instead of the dev SAB's.
    let with_value = |value: Vec<u8>| {
        let mut params =
            dev_sab::leaf_params(&contract, &IssueOptions { omit_contract: true, ..Default::default() }).unwrap();
        let mut extension = CustomExtension::from_oid_content(CONTRACT_OID, value);
        extension.set_criticality(true);
        params.custom_extensions.push(extension);
        forge::leaf(params, &sab).unwrap()
    };
    assert_admitted(&f.propose(&with_value(utf8.clone()), &request));

    // Two contract extensions: the same one twice, or another contract after it.
    let other = ExecutionContract { contract_id: "c-other".into(), ..contract.clone() };
    for second in [utf8.clone(), dev_sab::contract_extension_value(&other).unwrap()] {
        let mut params = forge::leaf_params(&contract);
        let mut extension = CustomExtension::from_oid_content(CONTRACT_OID, second);
        extension.set_criticality(true);
        params.custom_extensions.push(extension);
        let denied = f.propose(&forge::leaf(params, &sab).unwrap(), &request);
        assert_denied(&denied, Reason::DuplicateExtension);
        assert!(denied.message.contains(CONTRACT_OID_TEXT), "{denied:?}");
    }

    // Loose DER in the value: trailing bytes, a non-minimal length, another string type.
    let long_length = [&[0x0c, 0x83, 0x00][..], &(json.len() as u16).to_be_bytes(), json.as_bytes()].concat();
    let printable = [&[0x13][..], &utf8[1..]].concat();
    let octets = [&[0x04][..], &utf8[1..]].concat();
    for (value, says) in [
        ([&utf8[..], &[0x00]].concat(), "1 trailing bytes"),
        (long_length, "not minimal"),
        (printable, "PrintableString where UTF8String is required"),
        (octets, "OCTET STRING where UTF8String is required"),
    ] {
        let denied = f.propose(&with_value(value), &request);
        assert_denied(&denied, Reason::ExtensionNotDer);
        assert!(denied.message.contains("contract extension") && denied.message.contains(says), "{denied:?}");
    }

    // A critical flag of 0x7f, which a BER reader takes for TRUE, signed by the SAB.
    let oid = x509_parser::oid_registry::Oid::from(CONTRACT_OID).unwrap();
    let flag = [&[0x06, oid.as_bytes().len() as u8][..], oid.as_bytes(), &[0x01, 0x01]].concat();
    let genuine = f.issue(&contract, &IssueOptions::default());
    let loose = forge::patch_and_resign(&genuine, sab.key(), |tbs| {
        forge::replace_once(tbs, &[&flag[..], &[0xff]].concat(), &[&flag[..], &[0x7f]].concat())
    })
    .unwrap();
    let denied = f.propose(&loose, &request);
    assert_denied(&denied, Reason::ExtensionNotDer);
    assert!(denied.message.contains(CONTRACT_OID_TEXT) && denied.message.contains("BOOLEAN"), "{denied:?}");
    // The same patch with the genuine 0xff is admitted: only the flag was wrong.
    let resigned = forge::patch_and_resign(&genuine, sab.key(), |_| {}).unwrap();
    assert_admitted(&f.propose(&resigned, &request));
}

#[test]
fn numbers_beyond_the_i_json_range_are_refused() {
    let f = broker("numbers", true);
    let role = ScopedIdentity::AwsRole { role_arn: "arn:aws:iam::123456789012:role/seb-demo".into() };
    let with_n = |n: serde_json::Value| MutationRequest { params: serde_json::json!({"replicas": n}), ..request() };
    let certify = |request: &MutationRequest| {
        certified(&format!("c-{}", uuid_like()), this_process(), request, "sha256:00", role.clone())
    };

    let max = (1i64 << 53) - 1;
    let safe = with_n(max.into());
    assert_admitted(&f.decide(&certify(&safe), &safe));
    // 2^53 + 1 and 2^53 have one canonical JSON: certified for one, the other is presented.
    for (certified_n, presented_n) in [(1i64 << 53, (1i64 << 53) + 1), (-(1i64 << 53), -(1i64 << 53) - 1)] {
        let (certified_request, presented) = (with_n(certified_n.into()), with_n(presented_n.into()));
        assert_eq!(certified_request.digest(), presented.digest(), "RFC 8785 cannot tell them apart");
        let denied = f.decide(&certify(&certified_request), &presented);
        assert_denied(&denied, Reason::NumberOutOfRange);
        assert!(denied.message.contains(&format!("params.replicas = {presented_n}")), "{denied:?}");
    }

    // In the contract: an epoch beyond the range, an epoch with a fraction.
    let contract = certify(&safe);
    let sab = f.ca.issuer().unwrap();
    let json = contract.canonical_json();
    for (field, text, reason) in [
        ("policy_epoch", "9007199254740993", Reason::NumberOutOfRange),
        ("revocation_epoch", "1.5", Reason::NumberNotInteger),
    ] {
        let edited = json.replace(&format!("\"{field}\":1"), &format!("\"{field}\":{text}"));
        assert_ne!(edited, json);
        let mut params =
            dev_sab::leaf_params(&contract, &IssueOptions { omit_contract: true, ..Default::default() }).unwrap();
        let value = x509_parser::der_parser::asn1_rs::ToDer::to_der_vec(
            &x509_parser::der_parser::asn1_rs::Utf8String::new(&edited),
        )
        .unwrap();
        let mut extension = CustomExtension::from_oid_content(CONTRACT_OID, value);
        extension.set_criticality(true);
        params.custom_extensions.push(extension);
        let denied = f.propose(&forge::leaf(params, &sab).unwrap(), &safe);
        assert_denied(&denied, reason);
        assert!(denied.message.contains(&format!("contract.{field} = {text}")), "{denied:?}");
    }
    // The dev SAB does not certify such a contract in the first place.
    let beyond = ExecutionContract { policy_epoch: 1 << 53, ..contract };
    let refused = dev_sab::issue(&f.ca, &beyond, &IssueOptions::default()).unwrap_err();
    assert!(format!("{refused:#}").contains("contract.policy_epoch"), "{refused:#}");
}

/// CPU time the broker process has used so far.
fn broker_cpu(f: &Broker) -> Duration {
    let pid = nix::unistd::Pid::from_raw(f.sandbox.agent_pid().unwrap() as i32);
    let clock = nix::time::clock_getcpuclockid(pid).unwrap();
    Duration::from(nix::time::clock_gettime(clock).unwrap())
}

#[test]
fn a_chain_bomb_is_refused_within_a_few_milliseconds_of_cpu() {
    let f = broker("bomb", true);
    let (contract, request) = (contract(), request());

    // A leaf and thousands of self-signed attacker CAs (970 KB, just under the frame
    // limit), all under the name the leaf names.
    let attacker = forge::ca_params("attacker CA", None);
    let (attacker_ca, _) = forge::root(attacker.clone()).unwrap();
    let leaf = forge::leaf(forge::leaf_params(&contract), &attacker_ca).unwrap();
    let decoy_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let mut bomb = leaf.clone();
    let mut decoys = Vec::new();
    while bomb.len() < 970_000 {
        let mut params = attacker.clone();
        params.serial_number = Some(rcgen::SerialNumber::from_slice(&seb_agent::cert::ca::random_serial()));
        decoys.push(params.self_signed(&decoy_key).unwrap().pem());
        bomb += decoys.last().unwrap();
    }
    assert!(decoys.len() > 1500, "{} decoys", decoys.len());

    // A frame as large with no certificate beyond the leaf: what reading and parsing
    // the bytes alone costs the broker, measured in the same run.
    let mut filler = leaf.clone();
    while filler.len() < bomb.len() {
        filler += &"A".repeat(64);
        filler.push('\n');
    }
    let before = broker_cpu(&f);
    let denied = f.propose(&filler, &request);
    let bytes_alone = broker_cpu(&f) - before;
    assert!(!denied.admitted, "{denied:?}");

    let before = broker_cpu(&f);
    let denied = f.propose(&bomb, &request);
    let spent = broker_cpu(&f) - before;
    assert_denied(&denied, Reason::BundleTooLarge);
    assert!(denied.message.contains("bytes"), "{denied:?}");
    let before = broker_cpu(&f);
    assert_denied(&f.propose(&leaf, &request), Reason::UntrustedIssuer);
    let small = broker_cpu(&f) - before;
    eprintln!(
        "broker CPU: {spent:?} for a chain bomb of {} certificates ({} bytes), {bytes_alone:?} for as many bytes \
         of filler, {small:?} for one certificate",
        decoys.len() + 1,
        bomb.len()
    );
    // The bomb costs what its bytes cost (reading and parsing the 1 MB frame, recording
    // the decision), with room for the noise of a loaded machine; checking each
    // certificate's signature, or even parsing each, would cost many times that.
    let allowed = bytes_alone * 3 + Duration::from_millis(10);
    assert!(spent < allowed, "the chain bomb cost {spent:?} of broker CPU, as many other bytes {bytes_alone:?}");
    // The verification alone, in this process.
    let anchors = TrustAnchors::from_pem(&std::fs::read_to_string(&f.ca.cert).unwrap()).unwrap();
    let policy = ValidityPolicy { max_ttl: Duration::from_secs(3600), clock_skew: Duration::from_secs(30) };
    let thread_cpu = || Duration::from(nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID).unwrap());
    let start = thread_cpu();
    assert_eq!(anchors.verify(&bomb, policy, std::time::SystemTime::now()).unwrap_err().reason, Reason::BundleTooLarge);
    let verifying = thread_cpu() - start;
    eprintln!("verifying the chain bomb: {verifying:?} of CPU");
    assert!(verifying < Duration::from_millis(10), "verifying the chain bomb took {verifying:?} of CPU");

    // Small, but more certificates than the longest path needs.
    let six = [leaf.as_str(), &decoys[..5].concat()].concat();
    let denied = f.propose(&six, &request);
    assert_denied(&denied, Reason::BundleTooLarge);
    assert!(denied.message.contains("4 intermediates"), "{denied:?}");

    // Within the caps, four CAs with one name and one key: every order of them is a path
    // whose signatures verify, more than the signature budget allows.
    let same_key = forge::leaf(forge::leaf_params(&contract), &Issuer::new(attacker.clone(), &decoy_key)).unwrap();
    let denied = f.propose(&[same_key.as_str(), &decoys[..4].concat()].concat(), &request);
    assert_denied(&denied, Reason::ChainBudgetExceeded);
    assert!(denied.message.contains("signature checks"), "{denied:?}");
    // The same with pathLenConstraint 1: the third level's candidates are refused before
    // their signature, but considering them is counted too.
    let limited: String =
        (0..4).map(|_| forge::ca_params("attacker CA", Some(1)).self_signed(&decoy_key).unwrap().pem()).collect();
    let denied = f.propose(&[same_key.as_str(), &limited].concat(), &request);
    assert_denied(&denied, Reason::ChainBudgetExceeded);
    assert!(denied.message.contains("candidate issuers"), "{denied:?}");

    // The broker is unharmed.
    assert_admitted(&f.decide(&contract, &request));
}
