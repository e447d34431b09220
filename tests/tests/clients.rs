//! The clients agents use, as they use them: the Python client's pytest suite
//! (`clients/python/tests`) and a real MCP client (the Python `mcp` package) driving
//! `seb-agent mcp` over stdio (`tests/mcp`). Each runs as the agent would, in the enforced
//! workload cgroup of a sandbox, against a real broker (kernel programs attached, moto as
//! production on a protected address) and a real SAB (`seb-agent sab serve`, Cedar).

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use seb_sandbox::{
    Sandbox, Tools,
    broker::Broker,
    moto::{self, AwsWorld, Moto},
    sab::Sab,
};
use serde_json::Value;

const API: &str = "127.0.0.2:8443";
const APPROVER: &str = "seb://approver/alice";

/// Writes under `config/` are permitted; deletes are forbidden; writes under `release/`
/// need one approval; anything else is refused by default.
fn policies(bucket: &str, role_arn: &str) -> String {
    format!(
        r#"@id("config-writes")
@identity("aws_role:{role_arn}")
permit (principal in Seb::Node::"node-a", action == Seb::Action::"aws::s3:PutObject", resource)
when {{ resource.resource like "{bucket}/config/*" }};

@id("no-deletes")
forbid (principal, action == Seb::Action::"aws::s3:DeleteObject", resource);

@id("releases-need-approval")
@identity("aws_role:{role_arn}")
@approvals("1")
@approvers("{APPROVER}")
permit (principal in Seb::Node::"node-a", action == Seb::Action::"aws::s3:PutObject", resource)
when {{ resource.resource like "{bucket}/release/*" }};
"#
    )
}

struct World {
    // Servers first, so they stop before the sandbox goes.
    _moto: Moto,
    sab: Sab,
    broker: Broker,
    aws: AwsWorld,
}

fn world(label: &str) -> World {
    let tools = Tools::for_tests(env!("CARGO_BIN_EXE_seb-probe"));
    let sandbox = Sandbox::new(label, tools).unwrap();
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
    let broker = Broker::start(sandbox, &extra, true).unwrap();
    let issuing = broker.sandbox.dir.join("sab");
    let sab = Sab::start(&broker.sandbox, &issuing, &policies(&aws.bucket, &aws.role_arn), "").unwrap();
    World { _moto: moto, sab, broker, aws }
}

fn repository() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// Run pytest on `suite` as the agent: in the workload cgroup, with the broker's socket
/// and this agent's SAB credentials in the environment (and an approver's, for the
/// approval tests to run `seb-agent sab approve` as a person would).
fn pytest(world: &World, suite: &str) {
    let sandbox = &world.broker.sandbox;
    let agent = world.sab.identity_cert(&world.sab.agent_identity(sandbox, "workload")).unwrap();
    let approver = world.sab.identity_cert(APPROVER).unwrap();
    let output = Command::new(&sandbox.tools.probe)
        .arg("--cgroup")
        .arg(sandbox.cgroup.join("workload"))
        .args(["exec", "--", "python3", "-m", "pytest", "-q", "-p", "no:cacheprovider"])
        .arg(repository().join(suite))
        .env("PYTHONPATH", repository().join("clients/python/src"))
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("SEB_SOCKET", &sandbox.socket)
        .env("SEB_SAB_URL", &world.sab.url)
        .env("SEB_SAB_CERT", agent.with_extension("pem"))
        .env("SEB_SAB_KEY", agent.with_extension("key"))
        .env("SEB_SAB_CA", world.sab.dir.join("tls-ca.pem"))
        .env("SEB_AGENT", &sandbox.tools.agent)
        .env("SEB_TEST_APPROVER_CERT", approver.with_extension("pem"))
        .env("SEB_TEST_APPROVER_KEY", approver.with_extension("key"))
        .env("SEB_TEST_BUCKET", &world.aws.bucket)
        .env("SEB_TEST_PROTECTED_API", API)
        .output()
        .expect("running pytest (python3 -m pip install pytest mcp)");
    let report = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "pytest {suite} failed:\n{report}\nSAB log:\n{}", world.sab.log());
    // A suite that collected nothing would pass: insist that tests ran and none was skipped.
    assert!(report.contains(" passed") && !report.contains("skipped"), "pytest {suite}:\n{report}");
    println!("{report}");
}

/// The broker's decision records, from its signed log.
fn decisions(world: &World) -> Vec<Value> {
    let output = world.broker.sandbox.agent_cli(&["--json", "audit", "list", "--kind", "decision"]).unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout).unwrap().lines().map(|line| serde_json::from_str(line).unwrap()).collect()
}

/// Both suites share one world (moto and its seed are the slow part); each test in them
/// works on objects of its own.
#[test]
fn the_python_client_and_an_mcp_client_reach_production_only_through_the_broker() {
    let world = world("clients");
    pytest(&world, "clients/python/tests");
    pytest(&world, "tests/mcp");
    // The suites asked the SAB for deletes, which policy forbids: none reached the broker.
    let decisions = decisions(&world);
    assert!(decisions.iter().any(|d| d["body"]["request"]["operation"] == "s3:PutObject"), "{decisions:?}");
    assert!(!decisions.iter().any(|d| d["body"]["request"]["operation"] == "s3:DeleteObject"), "{decisions:?}");
    // Both logs verify.
    let verify = world.broker.sandbox.agent_cli(&["audit", "verify"]).unwrap();
    assert!(verify.status.success(), "{}", String::from_utf8_lossy(&verify.stdout));
    let public_key = world.sab.signing_key.with_extension("key.pub");
    let verify = Command::new(&world.broker.sandbox.tools.agent)
        .args(["audit", "verify", "--database"])
        .arg(&world.sab.database)
        .arg("--public-key")
        .arg(&public_key)
        .arg("--head")
        .arg(world.sab.signing_key.with_extension("key.head"))
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "{}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
}
