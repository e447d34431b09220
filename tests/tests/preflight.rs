//! A config that names a file that is not there, or a cgroup that does not exist, is
//! refused by `check-config`, naming the field, and `run` with it attaches nothing: the
//! sandbox's bpffs pin directory stays empty.

use std::process::Output;

use seb_sandbox::{Sandbox, Tools};

fn tools() -> Tools {
    Tools::for_tests(env!("CARGO_BIN_EXE_seb-probe"))
}

/// `check-config`, then `run`, on the sandbox's config.
fn check_then_run(sandbox: &Sandbox) -> (Output, Output) {
    let check = sandbox.agent_cli(&["check-config"]).unwrap();
    let run = sandbox.agent_command().output().unwrap();
    (check, run)
}

fn pins(sandbox: &Sandbox) -> Vec<String> {
    match std::fs::read_dir(&sandbox.pin_path) {
        Ok(entries) => entries.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => panic!("reading {}: {e}", sandbox.pin_path.display()),
    }
}

#[test]
fn a_config_naming_what_is_not_there_is_refused_before_the_kernel() {
    let sandbox = Sandbox::new("preflight", tools()).unwrap();
    let dir = sandbox.dir.clone();
    let not_pem = dir.join("not-a-ca.pem");
    std::fs::write(&not_pem, "this is not a certificate\n").unwrap();
    let missing = |name: &str| dir.join(name).display().to_string();
    let cases: Vec<(&str, Vec<String>, String)> = vec![
        (
            "admission.trust_anchors",
            vec![sandbox.cgroup_relative.clone()],
            format!("[admission]\ntrust_anchors = \"{}\"\n", missing("sab-ca.pem")),
        ),
        (
            "admission.trust_anchors",
            vec![sandbox.cgroup_relative.clone()],
            format!("[admission]\ntrust_anchors = \"{}\"\n", not_pem.display()),
        ),
        (
            "enforcement.scope[1]",
            vec![sandbox.cgroup_relative.clone(), format!("{}/absent", sandbox.cgroup_relative)],
            String::new(),
        ),
        (
            "aws.credentials_file",
            vec![sandbox.cgroup_relative.clone()],
            format!("[aws]\ncredentials_file = \"{}\"\n", missing("aws.json")),
        ),
        (
            "kubernetes.ca_file",
            vec![sandbox.cgroup_relative.clone()],
            format!("[kubernetes]\napi_server = \"https://127.0.0.1:6443\"\nca_file = \"{}\"\n", missing("ca.crt")),
        ),
        ("broker.socket_group", vec![sandbox.cgroup_relative.clone()], String::new()),
    ];
    // The control: the same sandbox with nothing missing passes.
    sandbox.write_config("").unwrap();
    let check = sandbox.agent_cli(&["check-config"]).unwrap();
    assert!(check.status.success(), "a good config was refused: {}", String::from_utf8_lossy(&check.stderr));

    let mut sandbox = sandbox;
    for (field, scope, extra) in cases {
        sandbox.broker_settings =
            if field == "broker.socket_group" { "socket_group = \"no-such-group-seb\"".into() } else { String::new() };
        sandbox.write_config_scoped(&scope, &extra).unwrap();
        let (check, run) = check_then_run(&sandbox);
        let check_err = String::from_utf8_lossy(&check.stderr);
        assert_eq!(check.status.code(), Some(2), "check-config accepted a bad `{field}`: {check_err}");
        assert!(check_err.contains(field), "check-config did not name `{field}`: {check_err}");
        let run_err = String::from_utf8_lossy(&run.stderr);
        assert!(!run.status.success(), "run started with a bad `{field}`");
        assert!(run_err.contains(field), "run did not name `{field}`: {run_err}");
        assert_eq!(pins(&sandbox), Vec::<String>::new(), "run pinned something with a bad `{field}`");
    }
}

/// The kernel programs name processes by their host pid: an agent in a PID namespace of
/// its own (a container without `hostPID`) is refused before anything is attached.
#[test]
fn an_agent_in_a_pid_namespace_of_its_own_is_refused_before_the_kernel() {
    let sandbox = Sandbox::new("pidns", tools()).unwrap();
    sandbox.write_config("").unwrap();
    for command in ["check-config", "run"] {
        let output = std::process::Command::new("unshare")
            .args(["--pid", "--fork", "--mount-proc"])
            .arg(&sandbox.tools.agent)
            .args([command, "--config"])
            .arg(&sandbox.config)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{command} ran in a PID namespace of its own: {stderr}");
        assert!(stderr.contains("PID namespace of its own"), "{command}: {stderr}");
        assert_eq!(pins(&sandbox), Vec::<String>::new(), "{command} pinned something");
    }
}
