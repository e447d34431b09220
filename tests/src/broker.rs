//! A running sandboxed broker that trusts a fresh dev SAB: propose, administer, issue.

use anyhow::Result;
use seb_agent::{
    admission::Decision,
    cert::{
        ExecutionContract, MutationRequest,
        contract::{AgentIdentity, ScopedIdentity},
        dev_sab::{self, Algorithm, CaFiles, IssueOptions},
    },
    protocol::{self, Request, Response},
};

use crate::Sandbox;

pub struct Broker {
    pub sandbox: Sandbox,
    pub ca: CaFiles,
    runtime: tokio::runtime::Runtime,
}

impl Broker {
    /// Start the sandbox's agent trusting a new SAB CA; `extra` is more config (endpoints,
    /// executors); with `epochs`, the policy and revocation epochs are set to 1.
    pub fn start(sandbox: Sandbox, extra: &str, epochs: bool) -> Result<Self> {
        let scope = vec![sandbox.cgroup_relative.clone()];
        let broker = Self::start_scoped(sandbox, &scope, extra)?;
        if epochs {
            broker.admin(Request::SetEpochs { policy: Some(1), revocation: Some(1) });
        }
        Ok(broker)
    }

    /// The same, enforcing only `scope` (cgroup paths relative to the mount), epochs unset.
    pub fn start_scoped(sandbox: Sandbox, scope: &[String], extra: &str) -> Result<Self> {
        Self::launch(sandbox, scope, extra, "")
    }

    /// As `start` with epochs 1/1, also trusting the CA certificates in `extra_anchors` (PEM).
    pub fn start_trusting(sandbox: Sandbox, extra_anchors: &str) -> Result<Self> {
        let scope = vec![sandbox.cgroup_relative.clone()];
        let broker = Self::launch(sandbox, &scope, "", extra_anchors)?;
        broker.admin(Request::SetEpochs { policy: Some(1), revocation: Some(1) });
        Ok(broker)
    }

    fn launch(mut sandbox: Sandbox, scope: &[String], extra: &str, extra_anchors: &str) -> Result<Self> {
        let ca = dev_sab::create_ca(&sandbox.dir.join("sab"), "seb test SAB", Algorithm::Ed25519)?;
        let anchors = sandbox.dir.join("trust-anchors.pem");
        std::fs::write(&anchors, std::fs::read_to_string(&ca.cert)? + extra_anchors)?;
        let admission = format!(
            "[admission]\ntrust_anchors = \"{}\"\nmax_ttl_seconds = 3600\nnode_name = \"{}\"\n",
            anchors.display(),
            crate::NODE_NAME
        );
        sandbox.write_config_scoped(scope, &format!("{extra}\n{admission}"))?;
        sandbox.start_agent()?;
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        Ok(Self { sandbox, ca, runtime })
    }

    /// One request; a broker that does not answer within 30 s fails the test.
    pub fn call(&self, request: Request) -> Response {
        let call = protocol::call(&self.sandbox.socket, &request);
        let answer =
            self.runtime.block_on(async { tokio::time::timeout(std::time::Duration::from_secs(30), call).await });
        answer
            .unwrap_or_else(|_| panic!("the broker did not answer {request:?} within 30 s"))
            .expect("calling the broker")
    }

    /// An admin request that must succeed.
    pub fn admin(&self, request: Request) -> Response {
        let response = self.call(request);
        assert!(!matches!(response, Response::Error { .. }), "{response:?}");
        response
    }

    pub fn propose(&self, certificate: &str, request: &MutationRequest) -> Decision {
        match self.call(Request::Propose { certificate: certificate.into(), request: request.clone() }) {
            Response::Decision(decision) => *decision,
            other => panic!("expected a decision, got {other:?}"),
        }
    }

    pub fn issue(&self, contract: &ExecutionContract, options: &IssueOptions) -> String {
        dev_sab::issue(&self.ca, contract, options).expect("issuing a certificate")
    }

    /// A fresh certificate for `contract`, proposed with `request`.
    pub fn decide(&self, contract: &ExecutionContract, request: &MutationRequest) -> Decision {
        self.propose(&self.issue(contract, &IssueOptions::default()), request)
    }
}

/// A contract certifying exactly `request` for `agent`, under epochs 1/1, with the given
/// precondition and identity to mint.
pub fn certified(
    contract_id: &str,
    agent: AgentIdentity,
    request: &MutationRequest,
    precondition: &str,
    identity: ScopedIdentity,
) -> ExecutionContract {
    let mut contract = ExecutionContract {
        contract_id: contract_id.into(),
        agent,
        provider: request.provider,
        operation: String::new(),
        target: String::new(),
        request_digest: String::new(),
        precondition: precondition.into(),
        policy_epoch: 1,
        revocation_epoch: 1,
        evidence_digest: request.digest(),
        identity,
    };
    contract.bind_request(request);
    contract
}

/// This process as the certified agent: its uid and executable.
pub fn this_process() -> AgentIdentity {
    let exe = std::env::current_exe().map(|p| p.to_string_lossy().into_owned()).ok();
    AgentIdentity { uid: Some(nix::unistd::geteuid().as_raw()), exe, ..Default::default() }
}
