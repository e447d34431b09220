//! The clients agents use, as they use them: the Python client's pytest suite
//! (`clients/python/tests`) and a real MCP client (the Python `mcp` package) driving
//! `seb-agent mcp` over stdio (`tests/mcp`). Each runs as the agent would, in the enforced
//! workload cgroup of a sandbox, against a real broker (kernel programs attached, moto as
//! production on a protected address) and a SAB over mutual TLS.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use seb_sandbox::{
    Sandbox, Tools,
    broker::Broker,
    moto::{self, AwsWorld, Moto, authorize_ingress},
    sab_standin::{self, SabStandin},
};

const API: &str = "127.0.0.2:8443";
const SAB: &str = "127.0.0.3:8444";

struct World {
    // Servers first, so they stop before the sandbox goes.
    _moto: Moto,
    sab: SabStandin,
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
    let dir = broker.sandbox.dir.join("sab-api");
    std::fs::create_dir_all(&dir).unwrap();
    let sab = sab_standin::start(&broker.sandbox.netns, SAB.parse().unwrap(), &dir, broker.ca.clone(), &aws.role_arn)
        .unwrap();
    World { _moto: moto, sab, broker, aws }
}

fn repository() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// Run pytest on `suite` as the agent: in the workload cgroup and the namespace, with
/// the broker's socket and this agent's SAB credentials in the environment.
fn pytest(world: &World, suite: &str) {
    let sandbox = &world.broker.sandbox;
    let agent = world.sab.agent("agent", &format!("{}/workload", sandbox.cgroup_relative)).unwrap();
    let output = Command::new(&sandbox.tools.probe)
        .arg("--cgroup")
        .arg(sandbox.cgroup.join("workload"))
        .args(["--netns", &sandbox.netns, "exec", "--", "python3", "-m", "pytest", "-q", "-p", "no:cacheprovider"])
        .arg(repository().join(suite))
        .env("PYTHONPATH", repository().join("clients/python/src"))
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("SEB_SOCKET", &sandbox.socket)
        .env("SEB_SAB_URL", &agent.url)
        .env("SEB_SAB_CERT", &agent.cert)
        .env("SEB_SAB_KEY", &agent.key)
        .env("SEB_SAB_CA", &agent.server_ca)
        .env("SEB_AGENT", &sandbox.tools.agent)
        .env("SEB_TEST_BUCKET", &world.aws.bucket)
        .env("SEB_TEST_SECURITY_GROUP_ARN", authorize_ingress(&world.aws.security_group, 443).target)
        .env("SEB_TEST_PROTECTED_API", API)
        .output()
        .expect("running pytest (python3 -m pip install pytest mcp)");
    let report = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "pytest {suite} failed:\n{report}");
    // A suite that collected nothing would pass: insist that every test ran.
    assert!(report.contains(" passed") && !report.contains("skipped"), "pytest {suite}:\n{report}");
    println!("{report}");
}

/// Both suites share one world (moto and its seed are the slow part); each test in them
/// works on objects of its own.
#[test]
fn the_python_client_and_an_mcp_client_reach_production_only_through_the_broker() {
    let world = world("clients");
    pytest(&world, "clients/python/tests");
    pytest(&world, "tests/mcp");
}
