//! Metrics, health and `seb-agent status`, from a real agent in a sandbox.

use std::time::{Duration, Instant};

use seb_sandbox::{Sandbox, Tools};
use serde_json::Value;

fn tools() -> Tools {
    Tools::for_tests(env!("CARGO_BIN_EXE_seb-probe"))
}

/// GET a path from the agent's metrics endpoint, inside the sandbox's namespace.
fn get(sandbox: &Sandbox, path: &str) -> (u16, String) {
    sandbox.http_get(path).unwrap()
}

#[test]
fn metrics_health_and_status_report_what_the_agent_sees() {
    let mut sandbox = Sandbox::new("metrics", tools()).unwrap();
    sandbox.write_config("[[enforcement.protected]]\ncidr = \"127.0.0.2/32\"\n").unwrap();
    sandbox.start_agent().unwrap();

    let denied = sandbox.attempt("workload", "tcp", "127.0.0.2:8443").unwrap();
    sandbox.wait_for_denial(denied["cookie"].as_u64().unwrap()).unwrap();
    let garbage = sandbox.dir.join("garbage.pem");
    std::fs::write(&garbage, "not a certificate").unwrap();
    let request = sandbox.dir.join("request.json");
    std::fs::write(&request, r#"{"provider":"http","operation":"PUT","target":"https://api.internal/x"}"#).unwrap();
    let proposal = sandbox
        .agent_cli(&["propose", "--cert", garbage.to_str().unwrap(), "--request", request.to_str().unwrap()])
        .unwrap();
    assert_eq!(proposal.status.code(), Some(1));

    assert_eq!(get(&sandbox, "/healthz").0, 200);
    assert_eq!(get(&sandbox, "/readyz").0, 200);
    let expected = [
        // Bounded labels: the destination and the cgroup are in the denial record only.
        r#"seb_kernel_denials_total{hook="connect4",namespace="",pod=""} 1"#.to_string(),
        r#"seb_admissions_total{decision="denied",reason="untrusted_issuer"} 1"#.to_string(),
        // The protected /32, and loopback's 127.0.0.0/8 marked local (127.0.0.2 is local).
        r#"seb_map_entries{map="SEB_PROTECTED_V4"} 2"#.to_string(),
    ];
    let deadline = Instant::now() + Duration::from_secs(15);
    let metrics = loop {
        let (status, body) = get(&sandbox, "/metrics");
        assert_eq!(status, 200);
        if expected.iter().all(|line| body.contains(line.as_str())) {
            break body;
        }
        assert!(Instant::now() < deadline, "missing metrics in:\n{body}");
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(metrics.contains("seb_ringbuf_lost_events_total 0"), "{metrics}");
    assert!(!metrics.contains("127.0.0.2") && !metrics.contains("workload"), "unbounded labels:\n{metrics}");

    let output = sandbox.agent_cli(&["status", "--json"]).unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let status: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(status["ready"], true);
    // One link per program: the sandbox has one scope and one exempt cgroup.
    assert_eq!(status["links"].as_array().unwrap().len(), seb_agent::enforcement::loader::PROGRAMS.len());
    assert_eq!(status["integrity"]["intact"], true, "{status}");
    assert_eq!(status["map_entries"]["SEB_PROTECTED_V4"], 2);
    assert_eq!(status["last_denial"]["socket_cookie"], denied["cookie"]);

    // A link unpinned behind the agent's back: no longer ready.
    let pin = status["links"][0]["pin"].as_str().unwrap().to_string();
    std::fs::remove_file(&pin).unwrap();
    assert_eq!(get(&sandbox, "/readyz").0, 503);
}
