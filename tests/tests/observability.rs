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
        // The protected /32, and marked local (127.0.0.2 is local): loopback's
        // 127.0.0.0/8 and its broadcast address, the limited broadcast address and the
        // multicast range.
        r#"seb_map_entries{map="SEB_PROTECTED_V4"} 5"#.to_string(),
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
    let attached = seb_agent::enforcement::loader::attached_programs(seb_agent::config::SyscallTables::Auto).count();
    assert_eq!(status["links"].as_array().unwrap().len(), attached);
    assert_eq!(status["integrity"]["intact"], true, "{status}");
    assert_eq!(status["map_entries"]["SEB_PROTECTED_V4"], 5);
    assert_eq!(status["last_denial"]["socket_cookie"], denied["cookie"]);

    // One source holding connections open gets 8: a ninth displaces its oldest (so one
    // sharing the kubelet's address cannot hold the probe out); the kubelet's probe from
    // another source is answered.
    let netns = sandbox.netns.clone();
    let (ninth, probe) = seb_sandbox::moto::in_netns(&netns, || async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let from = |source: &str| {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
            socket.connect("127.0.0.1:9464".parse().unwrap())
        };
        let mut held = Vec::new();
        for _ in 0..seb_agent::metrics::SCRAPE_CONNECTIONS_PER_SOURCE {
            held.push(from("127.0.0.5").await?);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let get = |mut stream: tokio::net::TcpStream| async move {
            stream.write_all(b"GET /healthz HTTP/1.0\r\nhost: x\r\n\r\n").await?;
            let mut answer = String::new();
            let _ = stream.read_to_string(&mut answer).await;
            anyhow::Ok(answer)
        };
        let ninth = get(from("127.0.0.5").await?).await?;
        let probe = get(from("127.0.0.1").await?).await?;
        // Every place taken, from 32 more addresses: the probe displaces the oldest.
        for source in 0..seb_agent::metrics::MAX_SCRAPE_CONNECTIONS / seb_agent::metrics::SCRAPE_CONNECTIONS_PER_SOURCE
        {
            for _ in 0..seb_agent::metrics::SCRAPE_CONNECTIONS_PER_SOURCE {
                held.push(from(&format!("127.0.1.{}", source + 1)).await?);
            }
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let probe_when_full = get(from("127.0.0.1").await?).await?;
        drop(held);
        Ok((ninth, (probe, probe_when_full)))
    })
    .unwrap();
    let (probe, probe_when_full) = probe;
    for probe in [ninth, probe, probe_when_full] {
        assert!(probe.starts_with("HTTP/1.0 200") || probe.starts_with("HTTP/1.1 200"), "{probe}");
    }

    // A link unpinned behind the agent's back: no longer ready.
    let pin = status["links"][0]["pin"].as_str().unwrap().to_string();
    std::fs::remove_file(&pin).unwrap();
    assert_eq!(get(&sandbox, "/readyz").0, 503);
}

/// The value of the series `name{...}` whose labels include each of `labels`.
fn series(metrics: &str, name: &str, labels: &[&str]) -> Option<f64> {
    metrics.lines().find_map(|line| {
        let (series, value) = line.rsplit_once(' ')?;
        let (series_name, rest) = series.split_once('{').unwrap_or((series, ""));
        (series_name == name && labels.iter().all(|l| rest.contains(l))).then(|| value.parse().ok())?
    })
}

fn scrape(sandbox: &Sandbox) -> String {
    let (status, body) = get(sandbox, "/metrics");
    assert_eq!(status, 200);
    body
}

#[test]
fn build_info_and_the_latency_histograms_follow_real_admissions_executions_and_commits() {
    use seb_agent::{
        admission::Reason,
        cert::contract::{ScopedIdentity, digest_of},
        execute::OutcomeStatus,
    };
    use seb_sandbox::{
        broker::{Broker, certified, this_process},
        mtls,
    };
    const API: &str = "127.0.0.3:9443";
    let sandbox = Sandbox::new("histograms", tools()).unwrap();
    let api = mtls::start(&sandbox.netns, API.parse().unwrap(), &sandbox.dir).unwrap();
    let extra = format!(
        "[http]\ntrust_anchors = \"{}\"\nclient_ca_cert = \"{}\"\nclient_ca_key = \"{}\"\n",
        api.server_ca.display(),
        api.client_ca.cert.display(),
        api.client_ca.key.display()
    );
    let broker = Broker::start(sandbox, &extra, true).unwrap();

    // What this binary is, from the build.
    let before = scrape(&broker.sandbox);
    let git = std::process::Command::new("git").args(["rev-parse", "HEAD"]).output().unwrap();
    let commit = String::from_utf8(git.stdout).unwrap().trim().to_string();
    let rustc =
        std::process::Command::new(std::env::var("RUSTC").unwrap_or("rustc".into())).arg("--version").output().unwrap();
    let rustc = String::from_utf8(rustc.stdout).unwrap().trim().to_string();
    let build = [
        format!("version=\"{}\"", env!("CARGO_PKG_VERSION")),
        format!("git_commit=\"{commit}\""),
        format!("rustc=\"{rustc}\""),
    ];
    let labels: Vec<&str> = build.iter().map(String::as_str).collect();
    assert_eq!(series(&before, "seb_build_info", &labels), Some(1.0), "{labels:?} in:\n{before}");
    assert_eq!(series(&before, "seb_admission_duration_seconds_count", &[]), None, "no decision yet");

    // One certified change executed, then its certificate replayed.
    let request: seb_agent::cert::MutationRequest = serde_json::from_value(serde_json::json!({
        "provider": "http", "operation": "PUT", "target": format!("https://{API}/v1/config"),
        "params": {"body": {"replicas": 3}}
    }))
    .unwrap();
    let absent = digest_of(&serde_json::json!({"status": 404}));
    let role = ScopedIdentity::X509Client { subject: "seb-executor@config".into() };
    let contract = certified("c-metrics", this_process(), &request, &absent, role);
    let certificate = broker.issue(&contract, &Default::default());
    let admitted = broker.propose(&certificate, &request);
    let outcome = admitted.outcome.clone().expect("an outcome");
    assert_eq!(outcome.status, OutcomeStatus::Succeeded, "{admitted:?}");
    assert_eq!(broker.propose(&certificate, &request).reason, Reason::Replayed);

    let after = scrape(&broker.sandbox);
    let admission = |decision: &str, what: &str| {
        series(&after, &format!("seb_admission_duration_seconds_{what}"), &[&format!("decision=\"{decision}\"")])
    };
    assert_eq!(admission("admitted", "count"), Some(1.0), "{after}");
    assert_eq!(admission("denied", "count"), Some(1.0), "{after}");
    // The admission ended before execution began, within the proposal's whole time.
    let admitted_seconds = admission("admitted", "sum").unwrap();
    assert!(
        admitted_seconds > 0.0 && admitted_seconds * 1e3 < outcome.duration_ms,
        "{admitted_seconds} s, {outcome:?}"
    );

    let executed = ["provider=\"http\"", "status=\"succeeded\""];
    assert_eq!(series(&after, "seb_execution_duration_seconds_count", &executed), Some(1.0), "{after}");
    // Measured around the executor: at least its own mutation time, at most the whole proposal.
    let execution_ms = series(&after, "seb_execution_duration_seconds_sum", &executed).unwrap() * 1e3;
    assert!(
        execution_ms >= outcome.timings.execute_ms && execution_ms <= outcome.duration_ms,
        "{execution_ms} ms, {outcome:?}"
    );

    // Every record the store holds was counted in a group commit, whose time was observed.
    let records = || -> i64 {
        let output = broker.sandbox.agent_cli(&["audit", "verify", "--json"]).unwrap();
        let report: Value = serde_json::from_slice(&output.stdout).unwrap();
        report["records"].as_i64().unwrap()
    };
    let commit_records = || series(&scrape(&broker.sandbox), "seb_audit_commit_records_sum", &[]).unwrap() as i64;
    // A checkpoint may land between the reads: read until the count is steady around the store's.
    let (counted, stored) = (0..5)
        .map(|_| (commit_records(), records(), commit_records()))
        .find(|(first, _, again)| first == again)
        .map(|(counted, stored, _)| (counted, stored))
        .expect("the commit count settles");
    assert_eq!(counted, stored, "records counted by the commit histogram and records in the store");
    let commits = series(&after, "seb_audit_commit_duration_seconds_count", &[]).unwrap();
    // Epochs; decision; outcome; the replay's decision: four commits at least.
    assert!(commits >= 4.0, "{after}");
    assert!(series(&after, "seb_audit_commit_duration_seconds_sum", &[]).unwrap() > 0.0);
    assert_eq!(
        series(&after, "seb_audit_commit_duration_seconds_bucket", &["le=\"+Inf\""]),
        Some(commits),
        "the buckets cover every commit"
    );
}
