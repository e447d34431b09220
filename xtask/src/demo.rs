//! `cargo xtask demo`: the whole flow on this node, narrated step by step, each step with
//! the command a user could run by hand.
//!
//! Runs in a sandbox (a dedicated cgroup subtree and network namespace, loopback
//! addresses only) with moto, the AWS API emulator, as the production API on a
//! protected address, a SAB with Cedar policies, and a scripted MCP client as the AI
//! agent. Nothing on the machine outside the sandbox is touched.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, ensure};
use seb_agent::{
    cert::{
        MutationRequest,
        dev_sab::{self, Algorithm},
    },
    execute::aws::AwsOperation,
};
use seb_sandbox::{
    Sandbox,
    moto::{self, AwsWorld, put_object},
    sab::Sab,
};
use serde_json::{Value, json};

use crate::{demo_agent::McpAgent, toolchain};

/// moto, the stand-in production API, inside the demo's namespace.
const API: &str = "127.0.0.2:8443";
/// The person the policies name as approver.
const APPROVER: &str = "seb://approver/alice";

struct Demo {
    sandbox: Sandbox,
    aws: AwsWorld,
    step: usize,
}

/// What runs once the broker is up: the SAB, and the agent's client certificate for it.
struct Authority {
    sab: Sab,
    agent_identity: String,
    agent_cert: PathBuf,
}

pub fn run() -> Result<()> {
    toolchain::ensure_moto()?;
    let tools = crate::release_tools()?;
    let sandbox = Sandbox::new("demo", tools.clone())?;
    println!("seb demo: an AI agent changes production (moto, an AWS API emulator) only through the broker.");
    println!("Everything runs in cgroup {} and network namespace {}.", sandbox.cgroup.display(), sandbox.netns);

    let _moto = moto::start(&sandbox.netns, API.parse()?)?;
    let aws = moto::seed(&sandbox.netns, &format!("http://{API}"))?;
    // The SAB's issuing CA: what the broker trusts (`admission.trust_anchors`).
    dev_sab::create_ca(&sandbox.dir.join("sab"), "seb demo SAB", Algorithm::Ed25519)?;
    let mut demo = Demo { sandbox, aws, step: 0 };
    demo.run()
}

/// Writes under `config/` are permitted, deletes forbidden, writes under `release/` need
/// one approval; anything else is refused by default.
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

impl Demo {
    fn run(&mut self) -> Result<()> {
        self.title("The production API and its identities");
        self.say(&format!("moto listens on {API} (SigV4 and IAM enforced)"));
        self.say(&format!("broker identity: may only sts:AssumeRole into {}", self.aws.role_arn));
        self.say("AI agent's own identity: read-only");
        self.say(&format!("bucket {}", self.aws.bucket));

        self.title("Start the broker: seb-agent run");
        let credentials = self.sandbox.dir.join("aws-broker.json");
        std::fs::write(&credentials, serde_json::to_string(&self.aws.broker)?)?;
        self.sandbox.write_config(&format!(
            "[[enforcement.protected]]\ncidr = \"127.0.0.2\"\nport = 8443\nprotocol = \"tcp\"\n\n\
             [admission]\ntrust_anchors = \"{}\"\nnode_name = \"{}\"\n\n[aws]\nendpoint = \"http://{API}\"\ncredentials_file = \"{}\"\n\n\
             [passthrough]\naws_role_arn = \"{}\"\naws_operations = [\"s3:GetObject\"]\n",
            self.sandbox.dir.join("sab/sab-ca.pem").display(),
            seb_sandbox::NODE_NAME,
            credentials.display(),
            self.aws.reader_role_arn,
        ))?;
        for line in std::fs::read_to_string(&self.sandbox.config)?.lines().filter(|l| !l.is_empty()) {
            self.say(&format!("  {line}"));
        }
        self.shell(&format!("export SEB_CONFIG={}", self.sandbox.config.display()));
        self.shell("seb-agent run");
        self.sandbox.start_agent()?;
        self.shell("seb-agent epoch --revocation 1");
        self.cli(&["epoch", "--revocation", "1"])?;
        self.say("kernel enforcement attached; revocation epoch 1 (the SAB sets the policy epoch)");

        self.title("Start the SAB: seb-agent sab serve, with Cedar policies");
        let sab_dir = self.sandbox.dir.join("sab");
        let sab = Sab::start(&self.sandbox, &sab_dir, &policies(&self.aws.bucket, &self.aws.role_arn), "")?;
        for line in std::fs::read_to_string(sab.policies.join("policy.cedar"))?.lines().filter(|l| !l.is_empty()) {
            self.say(&format!("  {line}"));
        }
        self.shell(&format!("seb-agent sab init --dir {} --server-name 127.0.0.1", sab.dir.display()));
        self.shell(&format!("seb-agent sab serve --config {}", sab.config.display()));
        let epochs = self.cli(&["--json", "epoch"])?;
        self.say(&format!("the SAB loaded its policies and set the broker's policy epoch: {}", epochs.trim()));
        let agent_identity = sab.agent_identity(&self.sandbox, "workload");
        let agent_cert = sab.identity_cert(&agent_identity)?;
        self.shell(&format!(
            "seb-agent sab client-cert --dir {} --identity {agent_identity} --out {}",
            sab.dir.display(),
            agent_cert.display()
        ));
        self.say("the agent's identity to the SAB is its cgroup: certificates bind it, not an executable");
        let authority = Authority { sab, agent_identity, agent_cert };

        self.title("The agent calls the production API directly");
        self.shell(&format!(
            "echo $$ > {}/cgroup.procs; curl http://{API}/",
            self.sandbox.cgroup.join("workload").display()
        ));
        let direct = self.sandbox.attempt("workload", "tcp", API)?;
        self.say(&format!("connect({API}) from the agent's cgroup -> {}", direct["result"]));
        ensure!(direct["result"] == "EPERM", "the kernel must refuse the agent: {direct}");
        let cookie = direct["cookie"].as_u64().with_context(|| format!("no socket cookie in {direct}"))?;
        let denial = self.sandbox.wait_for_denial(cookie)?;
        self.say(&format!("recorded: kernel denial ({}) of {}:{}", denial["hook"], denial["address"], denial["port"]));
        let put = put_object(&self.aws.bucket, "config/app.json", "replicas=3");
        let response =
            moto::call(&self.sandbox.netns, &self.aws.endpoint, &AwsOperation::parse(&put)?.mutation, &self.aws.agent)?;
        let body = String::from_utf8_lossy(response.body());
        ensure!(
            response.status() == 403 && body.contains("AccessDenied"),
            "the agent's credentials must be refused (AccessDenied): HTTP {} {body}",
            response.status().as_u16()
        );
        self.say(&format!(
            "and even where it could connect, its own credentials are refused: HTTP {} (AccessDenied)",
            response.status().as_u16()
        ));

        self.title("The agent's MCP host starts seb-agent mcp, in the agent's cgroup");
        let mcp = self.start_mcp(&authority)?;
        for (name, description) in mcp.tools()? {
            self.say(&format!("tool {name}: {description}"));
        }

        self.title("The agent reads what it will change: read_resource");
        let read = self.tool(
            &mcp,
            "read_resource",
            json!({"provider": "aws", "operation": "s3:GetObject", "target": put.target}),
        )?;
        ensure!(!read.is_error, "{}", read.content);
        self.shell("seb-agent read --request read.json   # {\"provider\":\"aws\",\"operation\":\"s3:GetObject\",\"target\":...}");

        self.title("A change policy permits: propose_change, executed by the broker");
        let done = self.propose_tool(&mcp, &put, "scale the app to 3 replicas", None)?;
        ensure!(done["status"] == "executed", "{done}");
        self.say("in one call: read live state, POST /v1/certify to the SAB, propose to the broker; by hand:");
        self.shell(&format!(
            "curl --cert {} --key {} --cacert {} -d @draft.json {}/v1/certify",
            authority.agent_cert.with_extension("pem").display(),
            authority.agent_cert.with_extension("key").display(),
            authority.sab.dir.join("tls-ca.pem").display(),
            authority.sab.url
        ));
        self.shell("seb-agent propose --cert cert.pem --request request.json");

        self.title("A change policy forbids: it never reaches the broker");
        let delete: MutationRequest = serde_json::from_value(
            json!({"provider": "aws", "operation": "s3:DeleteObject", "target": put.target, "params": {}}),
        )?;
        let refused = self.propose_tool(&mcp, &delete, "remove the config", None)?;
        ensure!(refused["status"] == "refused", "{refused}");
        self.shell("seb-agent audit list --kind decision");
        let decisions = self.cli(&["--json", "audit", "list", "--kind", "decision"])?;
        ensure!(!decisions.contains("s3:DeleteObject"), "a refused change reached the broker: {decisions}");
        self.say("the broker's log has no decision for s3:DeleteObject: the SAB refused to certify it");

        self.title("A change that needs a person's approval");
        let release = put_object(&self.aws.bucket, "release/v2.txt", "version=2");
        let pending = self.propose_tool(&mcp, &release, "ship version 2", None)?;
        ensure!(pending["status"] == "pending_approval", "{pending}");
        let request_id = pending["request_id"].as_str().context("a pending request has an id")?.to_string();
        let approver = authority.sab.identity_cert(APPROVER)?;
        self.say(&format!("alice ({APPROVER}) approves with the CLI:"));
        self.shell(&format!(
            "export SEB_SAB_URL={} SEB_SAB_CA={} SEB_SAB_CERT={} SEB_SAB_KEY={}",
            authority.sab.url,
            authority.sab.dir.join("tls-ca.pem").display(),
            approver.with_extension("pem").display(),
            approver.with_extension("key").display()
        ));
        self.shell("seb-agent sab pending");
        let (code, listed) = authority.sab.cli(APPROVER, &["pending"]);
        ensure!(code == 0, "seb-agent sab pending: {listed}");
        self.say(&format!("  {} request(s) pending", listed["requests"].as_array().map_or(0, Vec::len)));
        self.shell(&format!("seb-agent sab approve {request_id} --reason \"release reviewed\""));
        let (code, approved) = authority.sab.cli(APPROVER, &["approve", &request_id, "--reason", "release reviewed"]);
        ensure!(code == 0 && approved["status"] == "issued", "seb-agent sab approve: {approved}");
        let status = self.tool(&mcp, "request_status", json!({"request_id": request_id}))?;
        ensure!(status.content["status"] == "issued", "{}", status.content);
        let done = self.propose_tool(&mcp, &release, "ship version 2", Some(&request_id))?;
        ensure!(done["status"] == "executed", "{done}");

        self.title("What the broker refuses even with a certificate (the agent runs seb-agent propose)");
        let replicas = |n: u32| put_object(&self.aws.bucket, "config/app.json", &format!("replicas={n}"));
        let (cert, _) = self.certify(&authority, &replicas(4), "scale to 4")?;
        let decision = self.propose(&cert, &replicas(4))?;
        ensure!(decision["outcome"]["status"] == "succeeded", "{decision}");
        self.say("the same certificate again: replay");
        let decision = self.propose(&cert, &replicas(4))?;
        ensure!(decision["reason"] == "replayed", "{decision}");

        self.say("a certified request, tampered with in transit:");
        let (cert, _) = self.certify(&authority, &replicas(5), "scale to 5")?;
        let decision = self.propose(&cert, &replicas(500))?;
        ensure!(decision["reason"] == "request_mismatch", "{decision}");

        self.say("the world moved after certification (drift): a certificate for replicas=6 binds the state now;");
        let (stale, _) = self.certify(&authority, &replicas(6), "scale to 6")?;
        self.say("then the certified replicas=5 change lands first:");
        let decision = self.propose(&cert, &replicas(5))?;
        ensure!(decision["outcome"]["status"] == "succeeded", "{decision}");
        let decision = self.propose(&stale, &replicas(6))?;
        ensure!(decision["reason"] == "drift", "{decision}");

        self.say("a revoked certificate:");
        let (cert, contract_id) = self.certify(&authority, &replicas(7), "scale to 7")?;
        self.shell(&format!("seb-agent revoke --contract {contract_id} --reason \"the SAB withdrew it\""));
        self.cli(&["revoke", "--contract", &contract_id, "--reason", "the SAB withdrew it"])?;
        let decision = self.propose(&cert, &replicas(7))?;
        ensure!(decision["reason"] == "contract_revoked", "{decision}");
        drop(mcp);

        self.title("What a security team sees: both signed logs verify");
        self.shell("seb-agent audit verify");
        let verify = self.cli(&["audit", "verify"])?;
        print!("{verify}");
        ensure!(verify.contains("audit chain OK"), "the broker's audit chain must verify");
        let mut sab = authority.sab;
        sab.stop()?;
        let (key, database) = (sab.signing_key.clone(), sab.database.clone());
        let sab_verify = [
            "audit".to_string(),
            "verify".into(),
            "--database".into(),
            database.display().to_string(),
            "--public-key".into(),
            key.with_extension("key.pub").display().to_string(),
            "--head".into(),
            key.with_extension("key.head").display().to_string(),
        ];
        self.shell(&format!("seb-agent {}", sab_verify.join(" ")));
        let output = Command::new(&self.sandbox.tools.agent).args(&sab_verify).output()?;
        print!("{}", String::from_utf8_lossy(&output.stdout));
        ensure!(output.status.success(), "the SAB's log must verify: {}", String::from_utf8_lossy(&output.stderr));
        self.shell("seb-agent audit list");
        print!("{}", self.cli(&["audit", "list"])?);
        println!(
            "\nDone. Every decision, outcome and kernel denial above is a signed record in {}, and every certify \
             request, policy decision, approval and issuance one in {}.",
            self.sandbox.database.display(),
            database.display()
        );
        println!("The sandbox (cgroup, namespace, moto, SAB, pins) is removed now.");
        Ok(())
    }

    fn title(&mut self, text: &str) {
        self.step += 1;
        println!("\n== {}. {text}", self.step);
    }

    fn say(&self, line: &str) {
        println!("   {line}");
    }

    /// A command a user could run by hand for this step.
    fn shell(&self, line: &str) {
        println!("   $ {line}");
    }

    fn cli(&self, args: &[&str]) -> Result<String> {
        let output = self.sandbox.agent_cli(args)?;
        ensure!(output.status.success(), "seb-agent {args:?}: {}", String::from_utf8_lossy(&output.stderr));
        Ok(String::from_utf8(output.stdout)?)
    }

    /// `seb-agent mcp` as an MCP host runs it, inside the agent's cgroup; its configuration
    /// is what a host's MCP settings give it.
    fn start_mcp(&self, authority: &Authority) -> Result<McpAgent> {
        let env = [
            ("SEB_SOCKET", self.sandbox.socket.display().to_string()),
            ("SEB_SAB_URL", authority.sab.url.clone()),
            ("SEB_SAB_CERT", authority.agent_cert.with_extension("pem").display().to_string()),
            ("SEB_SAB_KEY", authority.agent_cert.with_extension("key").display().to_string()),
            ("SEB_SAB_CA", authority.sab.dir.join("tls-ca.pem").display().to_string()),
        ];
        let host_config = json!({"mcpServers": {"seb": {
            "command": "seb-agent", "args": ["mcp"],
            "env": env.iter().map(|(k, v)| (k.to_string(), json!(v))).collect::<serde_json::Map<_, _>>(),
        }}});
        self.say("the MCP host's configuration (e.g. an agent framework's mcp.json):");
        for line in serde_json::to_string_pretty(&host_config)?.lines() {
            self.say(&format!("  {line}"));
        }
        let mut server = Command::new(&self.sandbox.tools.probe);
        server.arg("--cgroup").arg(self.sandbox.cgroup.join("workload")).args(["exec", "--"]);
        server.arg(&self.sandbox.tools.agent).arg("mcp").env("SEB_LOG", "warn");
        for (name, value) in &env {
            server.env(name, value);
        }
        McpAgent::start(server)
    }

    fn tool(&self, mcp: &McpAgent, name: &str, arguments: Value) -> Result<crate::demo_agent::Answer> {
        self.say(&format!("agent -> {name} {arguments}"));
        let answer = mcp.call(name, arguments)?;
        let mut shown = answer.content.clone();
        if let Some(object) = shown.as_object_mut() {
            // The narrative needs the verdict, not the whole request echoed back.
            for noise in ["contract", "request", "requester", "evidence_digest", "serial", "next"] {
                object.remove(noise);
            }
            if object.get("body").and_then(Value::as_str).is_some_and(|body| body.len() > 80) {
                object.insert("body".into(), json!("…"));
            }
        }
        self.say(&format!("  {}{shown}", if answer.is_error { "error: " } else { "" }));
        Ok(answer)
    }

    fn propose_tool(
        &self,
        mcp: &McpAgent,
        request: &MutationRequest,
        intent: &str,
        approved: Option<&str>,
    ) -> Result<Value> {
        let mut arguments = json!({
            "provider": request.provider, "operation": request.operation, "target": request.target,
            "params": request.params, "intent": intent,
        });
        if let Some(id) = approved {
            arguments["approved_request_id"] = json!(id);
        }
        Ok(self.tool(mcp, "propose_change", arguments)?.content)
    }

    /// The agent asks the SAB to certify `request` on the state it reads now; returns the
    /// certificate's file and its contract id.
    fn certify(&self, authority: &Authority, request: &MutationRequest, intent: &str) -> Result<(PathBuf, String)> {
        let precondition = moto::live_digest(&self.sandbox.netns, &self.aws, request)?;
        let draft = json!({"request": request, "precondition": precondition, "intent": intent});
        let (status, body) = authority.sab.call_as(&authority.agent_cert, "POST", "/v1/certify", Some(&draft))?;
        ensure!(status == 200 && body["status"] == "issued", "the SAB did not issue a certificate: {body}");
        let contract_id = body["contract"]["contract_id"].as_str().context("the contract has an id")?.to_string();
        let path = self.sandbox.dir.join(format!("{contract_id}.pem"));
        std::fs::write(&path, body["certificate"].as_str().context("an issued answer has a certificate")?)?;
        self.say(&format!(
            "SAB certified {contract_id}: {} on {} for {}, precondition {}…",
            request.operation,
            request.target,
            authority.agent_identity,
            &precondition[..20]
        ));
        Ok((path, contract_id))
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
