//! `cargo xtask demo`: the whole flow on this node, narrated step by step.
//!
//! Runs in a sandbox (a dedicated cgroup subtree and network namespace, loopback
//! addresses only) with moto, the AWS API emulator, as the production API on a
//! protected address. Nothing on the machine outside the sandbox is touched.

use std::{path::Path, process::Command};

use anyhow::{Context, Result, ensure};
use seb_agent::{
    cert::{
        MutationRequest,
        contract::{AgentIdentity, ScopedIdentity},
        dev_sab::{self, Algorithm, CaFiles, IssueOptions},
    },
    execute::aws::AwsOperation,
};
use seb_sandbox::{
    Sandbox,
    broker::certified,
    moto::{self, AwsWorld, authorize_ingress, put_object},
};
use serde_json::Value;

use crate::toolchain;

/// moto, the stand-in production API, inside the demo's namespace.
const API: &str = "127.0.0.2:8443";

struct Demo {
    sandbox: Sandbox,
    aws: AwsWorld,
    ca: CaFiles,
    agent_cgroup: String,
    step: usize,
}

pub fn run() -> Result<()> {
    toolchain::ensure_moto()?;
    let tools = crate::release_tools()?;
    let sandbox = Sandbox::new("demo", tools.clone())?;
    println!("seb demo: an AI agent changes production (moto, an AWS API emulator) only through the broker.");
    println!("Everything runs in cgroup {} and network namespace {}.", sandbox.cgroup.display(), sandbox.netns);

    let _moto = moto::start(&sandbox.netns, API.parse()?)?;
    let aws = moto::seed(&sandbox.netns, &format!("http://{API}"))?;
    let ca = dev_sab::create_ca(&sandbox.dir.join("sab"), "seb dev SAB", Algorithm::Ed25519)?;
    let agent_cgroup = format!("{}/workload", sandbox.cgroup_relative);
    let mut demo = Demo { sandbox, aws, ca, agent_cgroup, step: 0 };
    demo.run()
}

impl Demo {
    fn run(&mut self) -> Result<()> {
        self.title("The production API and its identities");
        self.say(&format!("moto listens on {API} (SigV4 and IAM enforced)"));
        self.say(&format!("broker identity: may only sts:AssumeRole into {}", self.aws.role_arn));
        self.say("AI agent's own identity: read-only");
        self.say(&format!("bucket {}, security group {}", self.aws.bucket, self.aws.security_group));

        self.title("Start the broker: seb-agent run");
        let credentials = self.sandbox.dir.join("aws-broker.json");
        std::fs::write(&credentials, serde_json::to_string(&self.aws.broker)?)?;
        self.sandbox.write_config(&format!(
            "[[enforcement.protected]]\ncidr = \"127.0.0.2\"\nport = 8443\nprotocol = \"tcp\"\n\n\
             [admission]\ntrust_anchors = \"{}\"\n\n[aws]\nendpoint = \"http://{API}\"\ncredentials_file = \"{}\"\n",
            self.ca.cert.display(),
            credentials.display()
        ))?;
        for line in std::fs::read_to_string(&self.sandbox.config)?.lines().filter(|l| !l.is_empty()) {
            self.say(&format!("  {line}"));
        }
        self.sandbox.start_agent()?;
        self.cli(&["epoch", "--policy", "1", "--revocation", "1"])?;
        self.say("kernel enforcement attached; epochs set: policy 1, revocation 1");

        self.title("The agent calls the production API directly");
        let direct = self.sandbox.attempt("workload", "tcp", API)?;
        self.say(&format!("connect({API}) from the agent's cgroup -> {}", direct["result"]));
        ensure!(direct["result"] == "EPERM", "the kernel must refuse the agent: {direct}");
        let put = put_object(&self.aws.bucket, "config/app.json", "replicas=3");
        let response =
            moto::call(&self.sandbox.netns, &self.aws.endpoint, &AwsOperation::parse(&put)?.mutation, &self.aws.agent)?;
        self.say(&format!(
            "and even where it could connect, its own credentials are refused: HTTP {} (AccessDenied)",
            response.status().as_u16()
        ));
        ensure!(response.status() == 403, "the agent's credentials must be refused");

        self.title("A certified S3 change, executed by the broker");
        let s3_cert = self.certify(&put, "c-s3-config")?;
        let decision = self.propose(&s3_cert, &put)?;
        ensure!(decision["admitted"] == true && decision["outcome"]["status"] == "succeeded", "{decision}");

        self.title("A certified EC2 change: open tcp/443 from 10.0.0.0/8");
        let ingress = authorize_ingress(&self.aws.security_group, 443);
        let ec2_cert = self.certify(&ingress, "c-ec2-ingress")?;
        let decision = self.propose(&ec2_cert, &ingress)?;
        ensure!(decision["outcome"]["status"] == "succeeded", "{decision}");

        self.title("The same certificate again: replay");
        let decision = self.propose(&s3_cert, &put)?;
        ensure!(decision["reason"] == "replayed", "{decision}");

        self.title("A certified request, tampered with in transit");
        let honest = put_object(&self.aws.bucket, "config/app.json", "replicas=4");
        let tampered = put_object(&self.aws.bucket, "config/app.json", "replicas=400");
        let cert = self.certify(&honest, "c-s3-replicas-4")?;
        let decision = self.propose(&cert, &tampered)?;
        ensure!(decision["reason"] == "request_mismatch", "{decision}");

        self.title("The world moved after certification: drift");
        let later = put_object(&self.aws.bucket, "config/app.json", "replicas=6");
        let stale = self.certify(&later, "c-s3-replicas-6")?;
        self.say("the certificate above binds the object as it is now; then another certified change lands:");
        let decision = self.propose(&cert, &honest)?;
        ensure!(decision["outcome"]["status"] == "succeeded", "{decision}");
        let decision = self.propose(&stale, &later)?;
        ensure!(decision["reason"] == "drift", "{decision}");

        self.title("A revoked certificate");
        let revoked = put_object(&self.aws.bucket, "config/app.json", "replicas=7");
        let cert = self.certify(&revoked, "c-s3-replicas-7")?;
        self.cli(&["revoke", "--contract", "c-s3-replicas-7", "--reason", "the SAB withdrew it"])?;
        self.say("seb-agent revoke --contract c-s3-replicas-7");
        let decision = self.propose(&cert, &revoked)?;
        ensure!(decision["reason"] == "contract_revoked", "{decision}");

        self.title("What a security team sees: seb-agent audit verify and audit list");
        let verify = self.cli(&["audit", "verify"])?;
        print!("{verify}");
        ensure!(verify.contains("audit chain OK"), "the audit chain must verify");
        print!("{}", self.cli(&["audit", "list"])?);
        println!(
            "\nDone. Every decision, outcome and kernel denial above is a signed record in {}.",
            self.sandbox.database.display()
        );
        println!("The sandbox (cgroup, namespace, moto, pins) is removed now.");
        Ok(())
    }

    fn title(&mut self, text: &str) {
        self.step += 1;
        println!("\n== {}. {text}", self.step);
    }

    fn say(&self, line: &str) {
        println!("   {line}");
    }

    fn cli(&self, args: &[&str]) -> Result<String> {
        let output = self.sandbox.agent_cli(args)?;
        ensure!(output.status.success(), "seb-agent {args:?}: {}", String::from_utf8_lossy(&output.stderr));
        Ok(String::from_utf8(output.stdout)?)
    }

    /// What the SAB does: read the live state, bind the request and the agent's cgroup.
    fn certify(&self, request: &MutationRequest, contract_id: &str) -> Result<std::path::PathBuf> {
        let precondition = moto::live_digest(&self.sandbox.netns, &self.aws, request)?;
        let agent = AgentIdentity { cgroup: Some(self.agent_cgroup.clone()), ..Default::default() };
        let role = ScopedIdentity::AwsRole { role_arn: self.aws.role_arn.clone() };
        let contract = certified(contract_id, agent, request, &precondition, role);
        let path = self.sandbox.dir.join(format!("{contract_id}.pem"));
        std::fs::write(&path, dev_sab::issue(&self.ca, &contract, &IssueOptions::default())?)?;
        self.say(&format!(
            "SAB certified {contract_id}: {} on {} for agents in cgroup {}, precondition {}…",
            request.operation,
            request.target,
            self.agent_cgroup,
            &precondition[..20]
        ));
        Ok(path)
    }

    /// The agent, in its cgroup, runs `seb-agent propose`.
    fn propose(&self, cert: &Path, request: &MutationRequest) -> Result<Value> {
        let request_path = self.sandbox.dir.join("request.json");
        std::fs::write(&request_path, serde_json::to_string(request)?)?;
        let output = Command::new(&self.sandbox.tools.probe)
            .arg("--cgroup")
            .arg(self.sandbox.cgroup.join("workload"))
            .args(["exec", "--"])
            .arg(&self.sandbox.tools.agent)
            .args(["--json", "propose"])
            .arg("--socket")
            .arg(&self.sandbox.socket)
            .arg("--cert")
            .arg(cert)
            .arg("--request")
            .arg(&request_path)
            .output()?;
        let decision: Value = serde_json::from_slice(&output.stdout)
            .with_context(|| format!("seb-agent propose printed: {}", String::from_utf8_lossy(&output.stderr)))?;
        let verdict = if decision["admitted"] == true { "ADMITTED" } else { "DENIED" };
        self.say(&format!(
            "agent: seb-agent propose ({} {}) -> {verdict}: {}",
            request.operation,
            request.target,
            decision["reason"].as_str().unwrap_or("?")
        ));
        if decision["admitted"] != true {
            self.say(&format!("  {}", decision["message"].as_str().unwrap_or_default()));
        }
        if let Some(outcome) = decision.get("outcome") {
            self.say(&format!(
                "  executed: {} (HTTP {}) as STS session {} for {:.0} ms; decision record {}, outcome record {}",
                outcome["status"].as_str().unwrap_or("?"),
                outcome["api_status"],
                outcome["identity"]["role_session_name"].as_str().unwrap_or("?"),
                outcome["duration_ms"].as_f64().unwrap_or_default(),
                decision["record_seq"],
                outcome["record_seq"],
            ));
        }
        Ok(decision)
    }
}
