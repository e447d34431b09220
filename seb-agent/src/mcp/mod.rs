//! `seb-agent mcp`: an MCP server over stdio for AI agents. Its three tools are the
//! agent's whole path to production: read a resource through the broker, propose a change
//! (read live state, have the SAB certify it, present it to the broker), and ask the SAB
//! about a request awaiting approval. It runs as the agent's own process (an MCP host
//! starts it), so the broker and the SAB see the agent's identity, not another one's.

use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
};

use anyhow::Result;
use rmcp::{
    ErrorData, ServerHandler, ServiceExt,
    handler::server::{router::tool::ToolRouter, wrapper::Parameters},
    model::{CallToolResult, Implementation, ServerCapabilities, ServerConfig},
    schemars, tool, tool_handler, tool_router,
};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::{
    admission::Decision,
    cert::MutationRequest,
    execute::{OutcomeStatus, passthrough::ReadResult},
    protocol::{self, Request, Response},
};

mod presented;
mod sab;
use presented::Presented;
pub use sab::SabOptions;
use sab::{AgentSab, Certified, Draft};

const INSTRUCTIONS: &str = "This server is the only way to read or change the production systems (AWS, \
Kubernetes, internal HTTPS APIs) from this machine. Direct calls to those APIs are refused by the kernel \
(connect() fails with EPERM) and your own credentials are not enough: do not retry them or look for other \
credentials. Read state with `read_resource`. Change it with `propose_change`: the security authority (SAB) \
checks the change against policy, and the broker executes it with a short-lived identity minted for that one \
change. Every call is recorded in a signed audit log.";

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ProviderArg {
    /// Amazon Web Services; targets are ARNs.
    Aws,
    /// Kubernetes; targets are `<apiVersion>/<Kind>/<namespace>/<name>`.
    Kubernetes,
    /// An internal HTTPS API; targets are https:// URLs.
    Http,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct ReadArgs {
    /// Which kind of system holds the resource.
    pub provider: ProviderArg,
    /// The read operation: `s3:GetObject`, `s3:GetBucketPolicy`, `ec2:DescribeSecurityGroups`,
    /// `ec2:DescribeInstances`, `iam:ListAttachedRolePolicies` (aws), or `GET` (http).
    pub operation: String,
    /// The exact resource, e.g. `arn:aws:s3:::my-bucket/config.json`.
    pub target: String,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct ProposeArgs {
    /// Which kind of system to change.
    pub provider: ProviderArg,
    /// The change: `s3:PutObject`, `s3:DeleteObject`, `s3:PutBucketPolicy`,
    /// `ec2:AuthorizeSecurityGroupIngress`, `ec2:RevokeSecurityGroupIngress`, `ec2:TerminateInstances`,
    /// `iam:AttachRolePolicy`, `iam:DetachRolePolicy` (aws); `PUT`, `POST`, `PATCH`, `DELETE` (http).
    pub operation: String,
    /// The exact resource to change, e.g. `arn:aws:s3:::my-bucket/config.json`.
    pub target: String,
    /// The operation's parameters, e.g. `{"body": "..."}` for s3:PutObject,
    /// `{"ip_permissions": [{"protocol": "tcp", "from_port": 443, "to_port": 443, "cidrs": ["10.0.0.0/8"]}]}`
    /// for security group rules, `{"policy_arn": "..."}` for role policies.
    #[serde(default)]
    pub params: Value,
    /// Why you want this change, in a sentence or two. Reviewers and the audit log read it.
    pub intent: String,
    /// Only after a human approved an earlier proposal of this same change: the `request_id` it
    /// returned. The approved certificate is then used instead of asking the SAB again.
    #[serde(default)]
    pub approved_request_id: Option<String>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct StatusArgs {
    /// The `request_id` that `propose_change` returned.
    pub request_id: String,
}

#[derive(Clone)]
pub struct SebTools {
    socket: PathBuf,
    sab: Arc<AgentSab>,
    presented: Arc<Mutex<Presented>>,
    tool_router: ToolRouter<Self>,
}

/// Serve MCP on standard input and output until the client goes away.
pub async fn serve(socket: PathBuf, sab: &SabOptions) -> Result<()> {
    let tools = SebTools {
        socket,
        sab: Arc::new(AgentSab::new(sab)?),
        presented: Arc::default(),
        tool_router: SebTools::tool_router(),
    };
    let service = tools.serve(rmcp::transport::stdio()).await?;
    service.waiting().await?;
    Ok(())
}

#[tool_router]
impl SebTools {
    #[tool(description = "Read a production resource through the seb broker (no certificate needed). Returns the \
        HTTP status, the body, and `state_digest`: the digest of the resource's current state, which a change \
        to it is checked against. Only the reads the broker's configuration allows are served; others are \
        refused with the reason.")]
    async fn read_resource(&self, Parameters(args): Parameters<ReadArgs>) -> Result<CallToolResult, ErrorData> {
        let request = request(&args.provider, &args.operation, &args.target, Value::Null)?;
        Ok(match self.read(request).await {
            Ok(read) => CallToolResult::structured(json!(read)),
            Err(message) => failure("read_refused", &message),
        })
    }

    #[tool(description = "Propose one change to a production resource, and have it executed if it is allowed. \
        In one call: reads the resource's live state, asks the security authority (SAB) to certify exactly this \
        change against its policy, and presents the certificate to the seb broker, which executes the change \
        with a short-lived identity. `status` in the result is one of: `executed` (done; `outcome` says what \
        happened), `pending_approval` (a human must approve first: tell the user, then poll `request_status` \
        with `request_id`; once it is `issued`, call this tool again with the same change and \
        `approved_request_id`), `refused` (policy forbids this change: `reasons` say why; do not retry it \
        unchanged), `denied` (the broker refused the certificate, e.g. `drift`: the resource changed since it \
        was read; read it again and reconsider), `not_executed` (admitted but the change was not made), or \
        `outcome_unknown` (it may or may not have been made: read the resource before anything else, and do not \
        propose it again until you know).")]
    async fn propose_change(&self, Parameters(args): Parameters<ProposeArgs>) -> Result<CallToolResult, ErrorData> {
        let request = request(&args.provider, &args.operation, &args.target, args.params)?;
        let certificate = match &args.approved_request_id {
            Some(request_id) => match self.approved(request_id).await {
                Ok(certificate) => (request_id.clone(), certificate),
                Err(result) => return Ok(result),
            },
            None => match self.certify(&request, args.intent).await {
                Ok(certificate) => certificate,
                Err(result) => return Ok(result),
            },
        };
        Ok(self.propose(certificate, request).await)
    }

    #[tool(description = "Ask the security authority (SAB) about a change that `propose_change` left \
        `pending_approval`. `status` is `pending` (still waiting for approvers; `approvals` lists who approved \
        so far), `issued` (approved: call `propose_change` again with the same change and \
        `approved_request_id`), `denied` or `refused` (`reasons` say why), or `expired` (nobody approved in \
        time).")]
    async fn request_status(&self, Parameters(args): Parameters<StatusArgs>) -> Result<CallToolResult, ErrorData> {
        Ok(match self.sab.request(&args.request_id).await {
            Ok(mut state) => {
                let ready = state.get("certificate").is_some_and(Value::is_string);
                if let Some(object) = state.as_object_mut() {
                    // The PEM is for the broker, not for the model's context.
                    object.remove("certificate");
                    object.insert("certificate_ready".into(), json!(ready));
                }
                self.presented.lock().unwrap_or_else(|e| e.into_inner()).annotate(&args.request_id, &mut state);
                CallToolResult::structured(state)
            }
            Err(e) => failure("sab_error", &format!("{e:#}")),
        })
    }
}

impl SebTools {
    async fn read(&self, request: MutationRequest) -> Result<ReadResult, String> {
        match protocol::call(&self.socket, &Request::Read { request }).await {
            Ok(Response::Read(read)) => Ok(read),
            Ok(Response::Error { code, message }) => Err(format!("the broker refused the read ({code:?}): {message}")),
            Ok(other) => Err(format!("the broker answered a read with {}", kind(&other))),
            Err(e) => Err(format!("{e:#}")),
        }
    }

    /// Live state, then the SAB: the certificate and its request id, or the result to return.
    async fn certify(&self, request: &MutationRequest, intent: String) -> Result<(String, String), CallToolResult> {
        let read = crate::execute::passthrough::state_read_for(request)
            .map_err(|e| failure("unsupported_operation", &format!("{e:#}")))?;
        let live_state = self.read(read).await.map_err(|message| failure("live_state_unavailable", &message))?;
        let draft =
            Draft { request: request.clone(), precondition: live_state.state_digest.clone(), live_state, intent };
        match self.sab.certify(&draft).await {
            Ok(Certified::Issued { request_id, certificate, .. }) => Ok((request_id, certificate)),
            Ok(Certified::Pending { request_id, approvals_required, approvers }) => {
                Err(CallToolResult::structured(json!({
                    "status": "pending_approval", "request_id": request_id,
                    "approvals_required": approvals_required, "approvers": approvers,
                    "next": "A human must approve this change. Poll request_status with this request_id; when it is \
                             issued, call propose_change again with the same change and approved_request_id.",
                })))
            }
            Ok(Certified::Refused { request_id, reasons }) => Err(CallToolResult::structured_error(json!({
                "status": "refused", "request_id": request_id, "reasons": reasons,
                "next": "Policy forbids this change. Do not retry it unchanged; tell the user why.",
            }))),
            Err(e) => Err(failure("sab_error", &format!("{e:#}"))),
        }
    }

    /// The certificate of an approved request.
    async fn approved(&self, request_id: &str) -> Result<String, CallToolResult> {
        let state = self.sab.request(request_id).await.map_err(|e| failure("sab_error", &format!("{e:#}")))?;
        match (state["status"].as_str(), state["certificate"].as_str()) {
            (Some("issued"), Some(certificate)) => Ok(certificate.to_string()),
            (status, _) => Err(CallToolResult::structured_error(json!({
                "status": status.unwrap_or("unknown"), "request_id": request_id,
                "reasons": state.get("reasons").cloned().unwrap_or(json!([])),
                "next": "The request is not issued: check request_status.",
            }))),
        }
    }

    /// Present the certificate; what came of it is remembered for `request_status`, also
    /// when the host cancels the call meanwhile (the presentation is a task of its own,
    /// which dropping this call does not stop).
    async fn propose(&self, (request_id, certificate): (String, String), request: MutationRequest) -> CallToolResult {
        self.presented.lock().unwrap_or_else(|e| e.into_inner()).started(&request_id);
        let tools = self.clone();
        let presenting = tokio::spawn(async move {
            let result = tools.present(&request_id, certificate, request).await;
            let summary = result.structured_content.clone().unwrap_or_default();
            tools.presented.lock().unwrap_or_else(|e| e.into_inner()).finished(&request_id, summary);
            result
        });
        presenting.await.unwrap_or_else(|e| failure("internal", &format!("presenting the certificate failed: {e}")))
    }

    async fn present(&self, request_id: &str, certificate: String, request: MutationRequest) -> CallToolResult {
        match protocol::call(&self.socket, &Request::Propose { certificate, request }).await {
            Ok(Response::Decision(decision)) => decided(request_id, &decision),
            Ok(Response::Error { code, message }) => {
                failure("broker_error", &format!("the broker refused the proposal ({code:?}): {message}"))
            }
            Ok(other) => failure("broker_error", &format!("the broker answered a proposal with {}", kind(&other))),
            Err(e) if protocol::sent_without_reply(&e) => CallToolResult::structured_error(json!({
                "status": "outcome_unknown", "request_id": request_id, "message": format!("{e:#}"),
                "next": OUTCOME_UNKNOWN_NEXT,
            })),
            Err(e) => failure("broker_unavailable", &format!("{e:#}")),
        }
    }
}

/// What the model is told when a change may or may not have been made.
const OUTCOME_UNKNOWN_NEXT: &str = "The change may or may not have been made. Read the resource with read_resource \
    before anything else, and do not propose this change again until you know it was not made: it could be made \
    twice.";

fn decided(request_id: &str, decision: &Decision) -> CallToolResult {
    let outcome = decision.outcome.as_ref();
    let summary = json!({
        "request_id": request_id, "decision_id": decision.decision_id, "reason": decision.reason,
        "message": decision.message, "decision_record": decision.record_seq,
        "outcome": outcome.map(|o| json!({
            "status": o.status, "api_status": o.api_status, "error": o.error,
            "resulting_state_digest": o.resulting_state_digest, "outcome_record": o.record_seq,
        })),
    });
    let status = match (decision.admitted, outcome.map(|o| o.status)) {
        (false, _) => "denied",
        (true, Some(OutcomeStatus::Succeeded)) => "executed",
        (true, Some(OutcomeStatus::Unknown) | None) => "outcome_unknown",
        (true, _) => "not_executed",
    };
    let mut result = summary;
    result["status"] = json!(status);
    if status == "outcome_unknown" {
        result["next"] = json!(OUTCOME_UNKNOWN_NEXT);
    }
    if status == "executed" { CallToolResult::structured(result) } else { CallToolResult::structured_error(result) }
}

fn request(provider: &ProviderArg, operation: &str, target: &str, params: Value) -> Result<MutationRequest, ErrorData> {
    let provider = match provider {
        ProviderArg::Aws => "aws",
        ProviderArg::Kubernetes => "kubernetes",
        ProviderArg::Http => "http",
    };
    serde_json::from_value(json!({"provider": provider, "operation": operation, "target": target, "params": params}))
        .map_err(|e| ErrorData::invalid_params(format!("not a valid request: {e}"), None))
}

fn failure(status: &str, message: &str) -> CallToolResult {
    CallToolResult::structured_error(json!({"status": status, "message": message}))
}

fn kind(response: &Response) -> String {
    serde_json::to_value(response).ok().and_then(|v| v["type"].as_str().map(String::from)).unwrap_or_default()
}

#[tool_handler(router = self.tool_router)]
impl ServerHandler for SebTools {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new("seb", env!("CARGO_PKG_VERSION")))
            .with_instructions(INSTRUCTIONS)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decision(admitted: bool, reason: &str, outcome: Option<&str>) -> Decision {
        let outcome = outcome.map(|status| {
            json!({"decision_id": "d", "decision_seq": 1, "status": status, "identity": null, "api_status": 200,
                   "resulting_state_digest": null, "duration_ms": 1.0, "timings": {"mint_ms": 0.0,
                   "drift_check_ms": 0.0, "execute_ms": 0.0}, "error": null, "record_seq": 2})
        });
        serde_json::from_value(json!({"decision_id": "d", "admitted": admitted, "reason": reason, "message": "m",
                                      "record_seq": 1, "serial": null, "contract_id": null, "outcome": outcome}))
        .unwrap()
    }

    /// What the model is told: only an executed change is a success.
    #[test]
    fn only_an_executed_change_is_reported_as_a_success() {
        let executed = decided("r", &decision(true, "admitted", Some("succeeded")));
        assert_eq!(
            (executed.is_error, executed.structured_content.unwrap()["status"].clone()),
            (Some(false), json!("executed"))
        );
        for (decision, status) in [
            (decision(false, "drift", None), "denied"),
            (decision(true, "admitted", Some("failed")), "not_executed"),
            (decision(true, "admitted", Some("not_executed")), "not_executed"),
            (decision(true, "admitted", Some("unknown")), "outcome_unknown"),
            (decision(true, "admitted", None), "outcome_unknown"),
        ] {
            let result = decided("r", &decision);
            let content = result.structured_content.unwrap();
            assert_eq!((result.is_error, content["status"].clone()), (Some(true), json!(status)), "{content}");
            assert_eq!(content["reason"], json!(decision.reason));
        }
    }
}
