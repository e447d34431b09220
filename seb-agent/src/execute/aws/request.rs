//! An AWS API call as a contract certifies it: the exact HTTP request the broker signs and
//! sends, the IAM action and resources its session policy allows, and the reads whose
//! canonical responses are the precondition (and, optionally, the postcondition).
//!
//! The request is certified at the HTTP level (method, path and query, headers, body) so
//! that one executor serves every AWS API and protocol with no per-service code: what the
//! assurance authority assessed is byte for byte what is sent. The protocol is named so
//! the broker can check that the request performs the certified action where the protocol
//! says so on the wire (query `Action=`, JSON `X-Amz-Target`), and decode responses.

use std::collections::BTreeMap;

use anyhow::{Context, Result, bail, ensure};
use base64::Engine;
use bytes::Bytes;
use http::{Method, Request, Response};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::canonical::{self, Decode, Pointer};
use crate::cert::{MutationRequest, contract::digest_of};

/// Bounds on what a certified request may name.
const MAX_RESOURCES: usize = 32;
const MAX_POINTERS: usize = 64;
const MAX_HEADERS: usize = 32;

/// Headers the broker sets itself (host, length, signature): a request may not.
const BROKER_HEADERS: &[&str] =
    &["host", "content-length", "authorization", "x-amz-date", "x-amz-security-token", "x-amz-content-sha256"];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Protocol {
    #[serde(rename = "query")]
    Query,
    #[serde(rename = "json")]
    Json,
    #[serde(rename = "rest-json")]
    RestJson,
    #[serde(rename = "rest-xml")]
    RestXml,
}

impl Protocol {
    fn decode(self) -> Decode {
        match self {
            Self::Query | Self::RestXml => Decode::Xml,
            Self::Json | Self::RestJson => Decode::Json,
        }
    }
}

/// The HTTP request, exactly as sent (before signing).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpCall {
    pub method: String,
    /// Path and query string as sent, percent-encoded: `/bucket/key`, `/bucket?policy`, `/`.
    pub path: String,
    /// Header names in lower case.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// The body, as text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    /// Or as base64, for bodies that are not UTF-8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body_base64: Option<String>,
}

/// A read whose canonical response is compared (precondition) or recorded (postcondition).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertifiedRead {
    /// The read's IAM action, `service:Operation` (e.g. `s3:GetObject`).
    pub action: String,
    /// SigV4 signing name and endpoint prefix; default: the action's service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// Resources for a read session policy; default: the target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<Vec<String>>,
    pub protocol: Protocol,
    pub request: HttpCall,
    /// Default: by protocol (XML for query and rest-xml, JSON for json and rest-json).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decode: Option<Decode>,
    /// Response headers that belong to the state (lower case; a trailing `*` is a prefix).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<String>,
    /// JSON pointers (`*` for every member) to fields left out: request ids, timestamps.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volatile: Vec<String>,
    /// JSON pointers to arrays that are sets: sorted before digesting.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unordered: Vec<String>,
}

/// `params` of a certified AWS request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AwsParams {
    /// SigV4 signing name and endpoint prefix; default: the action's service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    pub protocol: Protocol,
    pub request: HttpCall,
    /// Resources the session policy allows the action on; default: the target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<Vec<String>>,
    /// IAM condition block of the session policy's statement.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub condition: Option<Value>,
    pub precondition: CertifiedRead,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postcondition: Option<CertifiedRead>,
}

/// A certified AWS call, checked and ready to send.
#[derive(Debug, Clone, PartialEq)]
pub struct AwsCall {
    /// IAM action, `service:Operation`.
    pub action: String,
    pub service: String,
    pub resources: Vec<String>,
    pub condition: Option<Value>,
    pub request: CheckedHttp,
}

/// An HTTP request checked against its protocol.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckedHttp {
    pub method: Method,
    pub path: String,
    pub headers: Vec<(http::HeaderName, http::HeaderValue)>,
    pub body: Bytes,
}

/// A certified read, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct StateRead {
    pub call: AwsCall,
    /// Whether a session without a per-read policy (the read role's kept one) may make
    /// it: a read the broker built from the target (a preset's), of a service whose
    /// protocol is known, so the operation on the wire is the one the labels name. An
    /// agent's read names any path: only a session narrowed to the target may make it.
    pub unnarrowed_ok: bool,
    /// The account the target's ARN names (empty for S3, whose names are global).
    pub target_account: String,
    decode: Decode,
    headers: Vec<String>,
    volatile: Vec<Pointer>,
    unordered: Vec<Pointer>,
}

/// The mutation with its reads.
#[derive(Debug, Clone, PartialEq)]
pub struct AwsOperation {
    pub mutation: AwsCall,
    pub precondition: StateRead,
    pub postcondition: Option<StateRead>,
}

impl AwsOperation {
    pub fn parse(request: &MutationRequest) -> Result<Self> {
        // A preset's short form (`{"body": ..}` for s3:PutObject, ...) stands for the full
        // request the preset builds from it. The expansion is deterministic, so a
        // certificate for the short form certifies exactly that request.
        if request.params.get("protocol").is_none() {
            let full = super::preset::request(&request.operation, &request.target, &request.params)
                .context("params are neither a full AWS request (they have no `protocol`) nor a preset's short form")?;
            return Self::parse_full(&full, ReadOrigin::Preset);
        }
        Self::parse_full(request, ReadOrigin::Agent)
    }

    fn parse_full(request: &MutationRequest, origin: ReadOrigin) -> Result<Self> {
        let params: AwsParams = serde_json::from_value(request.params.clone()).context(
            "AWS params are {protocol, request: {method, path, headers?, body?}, precondition: {action, request, \
             volatile?}, service?, resources?, condition?, postcondition?}",
        )?;
        let target = request.target.as_str();
        ensure_exact_arn(target)?;
        if let Some(resources) = &params.resources {
            ensure!(
                resources.len() == 1 && resources[0] == target,
                "params.resources: a mutation's session acts on its target `{target}` alone, not on {resources:?}"
            );
        }
        let mutation = AwsCall::new(
            &request.operation,
            params.service.as_deref(),
            params.protocol,
            &params.request,
            vec![target.to_string()],
            params.condition.clone(),
        )
        .context("params.request")?;
        mutation.ensure_rest_action(params.protocol).context("params.request")?;
        let read = |read: &CertifiedRead, field: &str| {
            StateRead::new(read, &request.target, origin).with_context(|| format!("params.{field}"))
        };
        // A preset's operation is checked against the preset's read of its target: an
        // agent's read of something else (a HEAD, a byte range, another item) would
        // leave the drift check blind to the state the mutation changes.
        if super::preset::OPERATIONS.contains(&request.operation.as_str()) {
            let preset = super::preset::precondition_read(&request.operation, target)?;
            ensure!(
                params.precondition == preset,
                "params.precondition: `{}` is checked against its preset's read of the target (`seb-agent                  aws-preset` prints it), not another",
                request.operation
            );
        }
        let precondition = read(&params.precondition, "precondition")?;
        let postcondition = params.postcondition.as_ref().map(|r| read(r, "postcondition")).transpose()?;
        // The resulting state's digest goes back to the caller: read by the precondition's
        // read, whose state the caller certified, it tells nothing the caller could not
        // read; another read could be aimed at state the caller may not read (another
        // item's secret field) and its digest tested against guesses offline.
        if let Some(postcondition) = &postcondition {
            ensure!(
                *postcondition == precondition,
                "params.postcondition is params.precondition's read (the same request, decoding, headers and \
                 volatile fields)"
            );
        }
        Ok(Self { mutation, precondition, postcondition })
    }

    /// The session policy: exactly the certified action on the certified resources.
    pub fn session_policy(&self) -> Value {
        self.mutation.policy()
    }
}

/// Who wrote a read: the broker (a preset, built from the target) or the agent (a full
/// request, whose path and body the SAB's rules see only as text).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadOrigin {
    Preset,
    Agent,
}

impl StateRead {
    /// The read `read` of `target`. An agent's read acts on the target alone: its
    /// session is narrowed to it, so a read aimed elsewhere (another bucket's object,
    /// whose digest a drift denial would name) is refused by IAM.
    pub fn new(read: &CertifiedRead, target: &str, origin: ReadOrigin) -> Result<Self> {
        let protocol = read.protocol;
        // Written out in full, the broker's own read of the target is still the broker's
        // (`seb-agent aws-preset` prints full requests).
        let origin = match origin {
            ReadOrigin::Agent if super::preset::read(&read.action, target).is_ok_and(|preset| preset == *read) => {
                ReadOrigin::Preset
            }
            origin => origin,
        };
        if origin == ReadOrigin::Agent
            && read.resources.as_ref().is_some_and(|resources| resources[..] != [target.to_string()])
        {
            bail!("a read's session reads its target `{target}` alone (resources)");
        }
        let resources = read.resources.clone().unwrap_or_else(|| vec![target.to_string()]);
        let call = AwsCall::new(&read.action, read.service.as_deref(), protocol, &read.request, resources, None)?;
        ensure_a_read(&call, protocol)?;
        call.ensure_rest_action(protocol)?;
        // Even the broker's own read runs narrowed where the request does not name the
        // whole ARN: IAM's `RoleName` is read in the broker's account, whatever account
        // the target names. Unnarrowed only where narrowing adds nothing: S3 (a bucket
        // name is global, so the path is the ARN) and reads IAM lets name no resource
        // (`*`: EC2's Describe calls, which take the target's id).
        let names_the_whole_target = call.service == "s3" || call.resources.iter().any(|r| r == "*");
        let unnarrowed_ok =
            origin == ReadOrigin::Preset && names_the_whole_target && service_protocols(&call.service).is_some();
        ensure!(read.volatile.len() + read.unordered.len() <= MAX_POINTERS, "more than {MAX_POINTERS} pointers");
        ensure!(read.headers.len() <= MAX_HEADERS, "more than {MAX_HEADERS} headers");
        let pointers = |list: &[String]| list.iter().map(|p| Pointer::parse(p)).collect::<Result<Vec<_>>>();
        Ok(Self {
            call,
            unnarrowed_ok,
            target_account: account_of(target).to_string(),
            decode: read.decode.unwrap_or(protocol.decode()),
            headers: read.headers.iter().map(|h| h.to_ascii_lowercase()).collect(),
            volatile: pointers(&read.volatile)?,
            unordered: pointers(&read.unordered)?,
        })
    }

    /// The session policy of a session that may do this read only.
    pub fn policy(&self) -> Value {
        self.call.policy()
    }

    /// The canonical state a response shows: `{"status", "headers"?, "body"}` for a
    /// success, `{"status", "absent": <error code>}` when the service says the resource
    /// does not exist; any other failure is an error (no state can be certified from it).
    pub fn canonical_state(&self, response: &Response<Bytes>) -> Result<Value> {
        let status = response.status().as_u16();
        if !response.status().is_success() {
            let code = error_code(response);
            let absent = status == 404 || code.contains("NotFound") || code.starts_with("NoSuch");
            ensure!(absent, "the read failed: {}", api_error(response));
            return Ok(json!({"status": status, "absent": code}));
        }
        let mut body = canonical::decode(response.body(), self.decode)?;
        self.volatile.iter().for_each(|p| p.remove(&mut body));
        self.unordered.iter().for_each(|p| p.sort(&mut body));
        let mut state = json!({"status": status, "body": body});
        if !self.headers.is_empty() {
            let headers: BTreeMap<&str, &str> = response
                .headers()
                .iter()
                .filter(|(name, _)| self.headers.iter().any(|h| header_matches(h, name.as_str())))
                .map(|(name, value)| (name.as_str(), value.to_str().unwrap_or("")))
                .collect();
            state["headers"] = json!(headers);
        }
        Ok(state)
    }

    /// `sha256:<hex>` of the canonical state.
    pub fn digest(&self, response: &Response<Bytes>) -> Result<String> {
        Ok(digest_of(&self.canonical_state(response)?))
    }
}

/// The target is what the assurance authority's policy judged and what the records name;
/// a session may act on it alone. An IAM wildcard or policy variable in it would let the
/// session reach resources that an exact-match rule (or a reader of the record) never saw.
pub fn ensure_exact_arn(target: &str) -> Result<()> {
    ensure!(
        target.starts_with("arn:") && !target.contains(['*', '?', '$', '{', '}']),
        "the target `{target}` is not one exact ARN (IAM wildcards `*`, `?` and policy variables `${{...}}` are not \
         taken)"
    );
    Ok(())
}

/// The account an ARN names (`arn:partition:service:region:account:resource`), empty
/// where it names none.
pub fn account_of(arn: &str) -> &str {
    arn.split(':').nth(4).unwrap_or_default()
}

/// Whether the read role `reader` reads a target of `target_account` through `service`:
/// only in its own account, or an S3 target (bucket names are global; other ARNs without
/// an account, Route 53's, name what the caller's account holds). A call naming a
/// resource by its id alone (EC2's Describe calls) is answered in the caller's account,
/// where another account's group or instance is "not found", the state an agent could
/// have certified.
pub fn reader_reads(reader: &str, target_account: &str, service: &str) -> bool {
    if target_account.is_empty() { service == "s3" } else { target_account == account_of(reader) }
}

/// The protocols of services whose protocol is known here. Naming another protocol for
/// them (`json` for S3, so that a POST passes as a read labelled by `x-amz-target`)
/// would let the labels the broker checks differ from what the service does.
fn service_protocols(service: &str) -> Option<&'static [Protocol]> {
    use Protocol::*;
    Some(match service {
        "s3" => &[RestXml],
        "ec2"
        | "iam"
        | "sts"
        | "sns"
        | "rds"
        | "elasticloadbalancing"
        | "cloudformation"
        | "autoscaling"
        | "monitoring" => &[Query],
        "elasticache" | "redshift" | "elasticbeanstalk" => &[Query],
        "sqs" => &[Query, Json],
        "dynamodb"
        | "ssm"
        | "secretsmanager"
        | "kms"
        | "logs"
        | "ecr"
        | "ecs"
        | "events"
        | "kinesis"
        | "firehose"
        | "states"
        | "sagemaker"
        | "glue"
        | "athena"
        | "codebuild"
        | "codepipeline"
        | "cloudtrail"
        | "acm"
        | "organizations"
        | "elasticmapreduce"
        | "application-autoscaling"
        | "cognito-idp" => &[Json],
        "lambda" | "apigateway" | "eks" | "glacier" | "elasticfilesystem" | "batch" | "backup" | "kafka" => &[RestJson],
        "route53" | "cloudfront" => &[RestXml],
        _ => return None,
    })
}

/// Operation names AWS gives its read and list calls (IAM's Read and List access levels).
const READ_VERBS: &[&str] = &["Get", "List", "Describe", "Head", "BatchGet", "Query", "Scan"];

/// A certified read must be one: it runs before the drift check, and a drift denial does
/// not use up the certificate, so a write certified as a "read" could be repeated at will.
/// Its action is a read verb (`GetObject`, `DescribeSecurityGroups`; not `sts:`, whose
/// `Get...Token` calls mint credentials), and on the REST protocols, where the method is
/// what the service acts on, a GET or HEAD. The query and JSON protocols carry the
/// operation on the wire, already checked against the action.
fn ensure_a_read(call: &AwsCall, protocol: Protocol) -> Result<()> {
    let (service, operation) = call.action.split_once(':').unwrap_or_default();
    let is_read_verb = READ_VERBS.iter().any(|verb| {
        operation
            .strip_prefix(verb)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with(|c: char| c.is_ascii_uppercase()))
    });
    ensure!(
        is_read_verb && service != "sts" && call.service != "sts",
        "`{}` is not a read: a certified read's operation starts with one of {READ_VERBS:?} (not of STS)",
        call.action
    );
    match call.request.method {
        Method::GET | Method::HEAD => Ok(()),
        Method::POST if matches!(protocol, Protocol::Query | Protocol::Json) => Ok(()),
        ref method => bail!("a read is a GET or HEAD (or a POST of the query or JSON protocol), not {method}"),
    }
}

fn header_matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => name.starts_with(prefix),
        None => pattern == name,
    }
}

impl AwsCall {
    fn new(
        action: &str,
        service: Option<&str>,
        protocol: Protocol,
        call: &HttpCall,
        resources: Vec<String>,
        condition: Option<Value>,
    ) -> Result<Self> {
        let (prefix, operation) = action
            .split_once(':')
            .filter(|(s, o)| {
                let name =
                    |text: &str| !text.is_empty() && text.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
                name(s) && name(o)
            })
            .with_context(|| format!("the action `{action}` is not service:Operation"))?;
        let service = service.unwrap_or(prefix).to_string();
        ensure!(
            !service.is_empty() && service.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'),
            "`{service}` is not an AWS service name"
        );
        // S3's actions are judged by S3's request shapes: named as another service, an
        // S3 action would be judged by labels the caller chose.
        ensure!(prefix != "s3" || service == "s3", "an `s3:` action is sent to S3, not to `{service}`");
        ensure!(!resources.is_empty() && resources.len() <= MAX_RESOURCES, "1 to {MAX_RESOURCES} resources");
        for resource in &resources {
            ensure!(resource.starts_with("arn:") || resource == "*", "resource `{resource}` is not an ARN or `*`");
        }
        if let Some(condition) = &condition {
            ensure!(condition.is_object(), "the condition is an IAM condition block (an object)");
        }
        if let Some(spoken) = service_protocols(&service) {
            ensure!(
                spoken.contains(&protocol),
                "`{service}` speaks {spoken:?}, not {protocol:?}: the protocol decides which operation the wire names"
            );
        }
        let request = CheckedHttp::new(call)?;
        match protocol {
            Protocol::Query => {
                ensure!(request.method == Method::POST, "query-protocol calls are POSTs");
                let named = form_urlencoded::parse(&request.body).find(|(k, _)| k == "Action").map(|(_, v)| v);
                ensure!(
                    named.as_deref() == Some(operation),
                    "the request's Action is {named:?}, the certified action names {operation}"
                );
            }
            Protocol::Json => {
                ensure!(request.method == Method::POST, "JSON-protocol calls are POSTs");
                let target = request.header("x-amz-target").context("a JSON-protocol call needs x-amz-target")?;
                ensure!(
                    target.rsplit_once('.').map(|(_, op)| op) == Some(operation),
                    "the request's x-amz-target is {target}, the certified action names {operation}"
                );
            }
            // Checked by `ensure_rest_action`, once a read is known to be one.
            Protocol::RestJson | Protocol::RestXml => {}
        }
        Ok(Self { action: action.into(), service, resources, condition, request })
    }

    /// The request performs the certified action: on the REST protocols it has the
    /// action's shape on its resource (see `rest_action`). Of a service whose protocol
    /// is not known here, no label tells: a REST service ignores the `Action` or
    /// `x-amz-target` a caller adds, and a query service takes a GET's `?Action=`.
    fn ensure_rest_action(&self, protocol: Protocol) -> Result<()> {
        ensure!(
            service_protocols(&self.service).is_some(),
            "the broker does not know which protocol `{}` speaks, so it cannot tell which action a request of it \
             performs",
            self.service
        );
        match protocol {
            Protocol::RestJson | Protocol::RestXml => super::rest_action::ensure_performs(
                &self.service,
                &self.action,
                &self.request.method,
                &self.request.path,
                &self.request.headers,
                &self.resources[0],
            ),
            Protocol::Query | Protocol::Json => Ok(()),
        }
    }

    /// Allow exactly this action on exactly these resources.
    pub fn policy(&self) -> Value {
        let mut statement = json!({"Effect": "Allow", "Action": [self.action], "Resource": self.resources});
        if let Some(condition) = &self.condition {
            statement["Condition"] = condition.clone();
        }
        json!({"Version": "2012-10-17", "Statement": [statement]})
    }

    /// The unsigned request to `endpoint`.
    pub fn http_request(&self, endpoint: &str) -> Result<Request<Bytes>> {
        let uri: http::Uri = format!("{}{}", endpoint.trim_end_matches('/'), self.request.path).parse()?;
        let host = uri.authority().context("endpoint without host")?.to_string();
        let mut builder =
            Request::builder().method(self.request.method.clone()).uri(uri).header(http::header::HOST, host);
        for (name, value) in &self.request.headers {
            builder = builder.header(name, value);
        }
        builder = builder.header(http::header::CONTENT_LENGTH, self.request.body.len());
        Ok(builder.body(self.request.body.clone())?)
    }
}

impl CheckedHttp {
    fn new(call: &HttpCall) -> Result<Self> {
        let method = Method::from_bytes(call.method.as_bytes())
            .ok()
            .filter(|m| {
                [Method::GET, Method::HEAD, Method::PUT, Method::POST, Method::PATCH, Method::DELETE].contains(m)
            })
            .with_context(|| format!("`{}` is not an HTTP method AWS APIs use", call.method))?;
        ensure!(call.path.starts_with('/'), "the path `{}` must start with `/`", call.path);
        let parsed = call
            .path
            .parse::<http::uri::PathAndQuery>()
            .with_context(|| format!("`{}` is not a valid path and query", call.path))?;
        // What is signed and sent is what was certified, byte for byte (a `#` fragment
        // would be cut off).
        ensure!(parsed.as_str() == call.path, "the path `{}` would not be sent as written (no `#`)", call.path);
        ensure!(call.headers.len() <= MAX_HEADERS, "more than {MAX_HEADERS} headers");
        let mut headers = Vec::new();
        for (name, value) in &call.headers {
            ensure!(name == &name.to_ascii_lowercase(), "header name `{name}` must be lower case");
            ensure!(!BROKER_HEADERS.contains(&name.as_str()), "the broker sets the `{name}` header itself");
            headers.push((
                http::HeaderName::from_bytes(name.as_bytes())
                    .with_context(|| format!("`{name}` is not a header name"))?,
                http::HeaderValue::from_str(value).with_context(|| format!("header `{name}` has an invalid value"))?,
            ));
        }
        let body = match (&call.body, &call.body_base64) {
            (Some(_), Some(_)) => bail!("give body or body_base64, not both"),
            (Some(text), None) => Bytes::from(text.clone()),
            (None, Some(encoded)) => Bytes::from(
                base64::engine::general_purpose::STANDARD.decode(encoded).context("body_base64 is not base64")?,
            ),
            (None, None) => Bytes::new(),
        };
        Ok(Self { method, path: call.path.clone(), headers, body })
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).and_then(|(_, v)| v.to_str().ok())
    }
}

/// The AWS error code of a failed call: XML `<Code>`, JSON `__type` or `code`, or the
/// `x-amzn-errortype` header.
pub fn error_code(response: &Response<Bytes>) -> String {
    let header = response.headers().get("x-amzn-errortype").and_then(|v| v.to_str().ok());
    let from_body = || -> Option<String> {
        if let Ok(json) = serde_json::from_slice::<Value>(response.body()) {
            let code = json.get("__type").or_else(|| json.get("code")).or_else(|| json.get("Code"))?;
            return code.as_str().map(str::to_string);
        }
        let xml = canonical::xml_to_json(response.body()).ok()?;
        find_key(&xml, "Code")
    };
    let code = header.map(str::to_string).or_else(from_body).unwrap_or_default();
    // `aws.protocols#...#Code:http://...` forms: the bare code.
    let code = code.split(':').next().unwrap_or_default();
    code.rsplit('#').next().unwrap_or_default().to_string()
}

fn find_key(value: &Value, key: &str) -> Option<String> {
    match value {
        Value::Object(map) => map
            .get(key)
            .and_then(Value::as_str)
            .map(str::to_string)
            .or_else(|| map.values().find_map(|v| find_key(v, key))),
        Value::Array(items) => items.iter().find_map(|v| find_key(v, key)),
        _ => None,
    }
}

/// The status, AWS error code and message of a failed call.
pub fn api_error(response: &Response<Bytes>) -> String {
    let message = serde_json::from_slice::<Value>(response.body())
        .ok()
        .and_then(|json| {
            json.get("message").or_else(|| json.get("Message")).and_then(Value::as_str).map(str::to_string)
        })
        .or_else(|| canonical::xml_to_json(response.body()).ok().and_then(|xml| find_key(&xml, "Message")))
        .unwrap_or_default();
    format!("HTTP {} {}: {message}", response.status().as_u16(), error_code(response))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(params: Value) -> MutationRequest {
        serde_json::from_value(json!({"provider": "aws", "operation": "dynamodb:PutItem",
            "target": "arn:aws:dynamodb:us-east-1:1:table/t", "params": params}))
        .unwrap()
    }

    fn put_item() -> Value {
        json!({
            "protocol": "json",
            "request": {"method": "POST", "path": "/", "headers": {"x-amz-target": "DynamoDB_20120810.PutItem",
                "content-type": "application/x-amz-json-1.0"}, "body": "{\"TableName\":\"t\"}"},
            "precondition": {"action": "dynamodb:GetItem", "protocol": "json", "request": {"method": "POST", "path": "/",
                "headers": {"x-amz-target": "DynamoDB_20120810.GetItem", "content-type": "application/x-amz-json-1.0"},
                "body": "{\"TableName\":\"t\"}"}, "volatile": ["/ConsumedCapacity"]}
        })
    }

    #[test]
    fn an_agents_read_acts_on_the_target_alone_and_never_unnarrowed() {
        // Aimed at another table by its own resources: refused.
        let mut params = put_item();
        params["precondition"]["resources"] = json!(["arn:aws:dynamodb:us-east-1:1:table/other"]);
        let error = format!("{:#}", AwsOperation::parse(&request(params)).unwrap_err());
        assert!(error.contains("reads its target `arn:aws:dynamodb:us-east-1:1:table/t` alone"), "{error}");
        // Its path and body are its own: the kept, unnarrowed session never serves it.
        let operation = AwsOperation::parse(&request(put_item())).unwrap();
        assert!(!operation.precondition.unnarrowed_ok);
        assert_eq!(
            operation.precondition.policy()["Statement"][0]["Resource"],
            json!(["arn:aws:dynamodb:us-east-1:1:table/t"])
        );
        // The broker's preset reads may, in their short form or written out in full.
        let target = "arn:aws:ec2:us-east-1:1:security-group/sg-1";
        let rule =
            json!({"ip_permissions": [{"protocol": "tcp", "from_port": 1, "to_port": 1, "cidrs": ["10.0.0.0/8"]}]});
        let full = super::super::preset::request("ec2:AuthorizeSecurityGroupIngress", target, &rule).unwrap();
        assert!(AwsOperation::parse(&full).unwrap().precondition.unnarrowed_ok, "a preset's read written out in full");
        let short = MutationRequest { params: rule, ..full.clone() };
        assert!(AwsOperation::parse(&short).unwrap().precondition.unnarrowed_ok);
        // IAM's preset read names the role, not its account: narrowed to the target's ARN.
        let attach = MutationRequest {
            provider: crate::cert::Provider::Aws,
            operation: "iam:AttachRolePolicy".into(),
            target: "arn:aws:iam::222222222222:role/admin".into(),
            params: json!({"policy_arn": "arn:aws:iam::aws:policy/ReadOnlyAccess"}),
        };
        let read = AwsOperation::parse(&attach).unwrap().precondition;
        assert!(!read.unnarrowed_ok);
        assert_eq!(read.policy()["Statement"][0]["Resource"], json!(["arn:aws:iam::222222222222:role/admin"]));
        // The same read with its path changed is the agent's again.
        let mut changed = full;
        changed.params["precondition"]["request"]["path"] = json!("/?x=1");
        assert!(AwsOperation::parse(&changed).map_or(true, |operation| !operation.precondition.unnarrowed_ok));
    }

    #[test]
    fn the_session_policy_is_the_certified_action_on_the_certified_resources() {
        let operation = AwsOperation::parse(&request(put_item())).unwrap();
        assert_eq!(
            operation.session_policy(),
            json!({"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": ["dynamodb:PutItem"],
                "Resource": ["arn:aws:dynamodb:us-east-1:1:table/t"]}]})
        );
        assert_eq!(operation.precondition.policy()["Statement"][0]["Action"], json!(["dynamodb:GetItem"]));
        let sent = operation.mutation.http_request("http://127.0.0.1:1").unwrap();
        assert_eq!(sent.headers()["x-amz-target"], "DynamoDB_20120810.PutItem");
        assert_eq!(sent.body().as_ref(), b"{\"TableName\":\"t\"}");
    }

    #[test]
    fn the_read_role_reads_only_targets_of_its_own_account() {
        let reader = "arn:aws:iam::111111111111:role/seb-reader";
        assert!(reader_reads(reader, account_of("arn:aws:ec2:us-east-1:111111111111:security-group/sg-1"), "ec2"));
        assert!(!reader_reads(reader, account_of("arn:aws:ec2:us-east-1:222222222222:security-group/sg-1"), "ec2"));
        assert!(reader_reads(reader, account_of("arn:aws:s3:::bucket/key"), "s3"), "S3 names no account");
        assert!(!reader_reads(reader, account_of("arn:aws:route53:::hostedzone/Z1"), "route53"));
        let read = StateRead::new(
            &super::super::preset::read(
                "ec2:DescribeSecurityGroups",
                "arn:aws:ec2:us-east-1:222222222222:security-group/sg-1",
            )
            .unwrap(),
            "arn:aws:ec2:us-east-1:222222222222:security-group/sg-1",
            ReadOrigin::Preset,
        )
        .unwrap();
        assert_eq!(read.target_account, "222222222222");
    }

    #[test]
    fn a_request_that_does_not_perform_the_certified_action_is_refused() {
        let mut params = put_item();
        params["request"]["headers"]["x-amz-target"] = json!("DynamoDB_20120810.DeleteTable");
        let e = format!("{:#}", AwsOperation::parse(&request(params)).unwrap_err());
        assert!(e.contains("certified action names PutItem"), "{e}");

        // Query protocol, on a service whose protocol is not known here.
        let mut params = put_item();
        params["protocol"] = json!("query");
        params["service"] = json!("example");
        params["request"]["body"] = json!("Action=DeleteTable&Version=1");
        let e = format!("{:#}", AwsOperation::parse(&request(params)).unwrap_err());
        assert!(e.contains("certified action names PutItem"), "{e}");
        // And not the protocol the service speaks.
        let mut params = put_item();
        params["protocol"] = json!("query");
        params["request"]["body"] = json!("Action=PutItem&Version=1");
        let e = format!("{:#}", AwsOperation::parse(&request(params)).unwrap_err());
        assert!(e.contains("`dynamodb` speaks [Json], not Query"), "{e}");

        let mut params = put_item();
        params["request"]["headers"]["x-amz-security-token"] = json!("t");
        let e = format!("{:#}", AwsOperation::parse(&request(params)).unwrap_err());
        assert!(e.contains("sets the `x-amz-security-token` header itself"), "{e}");

        let mut params = put_item();
        params["request"]["path"] = json!("/#fragment");
        let e = format!("{:#}", AwsOperation::parse(&request(params)).unwrap_err());
        assert!(e.contains("would not be sent as written"), "{e}");

        let mut params = put_item();
        params["precondition"]["volatile"] = json!(["ConsumedCapacity"]);
        let e = format!("{:#}", AwsOperation::parse(&request(params)).unwrap_err());
        assert!(e.contains("params.precondition") && e.contains("must start with `/`"), "{e}");
    }

    #[test]
    fn a_preset_operation_written_out_is_its_preset_in_shape_and_in_read() {
        let target = "arn:aws:s3:::b/cfg.json";
        let full = super::super::preset::request("s3:PutObject", target, &json!({"body": "x"})).unwrap();
        AwsOperation::parse(&full).unwrap();
        let refused = |change: &dyn Fn(&mut Value)| {
            let mut changed = full.clone();
            change(&mut changed.params);
            format!("{:#}", AwsOperation::parse(&changed).unwrap_err())
        };
        // A certified put carrying a delete of another key, or a copy of another object.
        let e = refused(&|p| {
            p["request"]["method"] = json!("DELETE");
            p["request"]["path"] = json!("/b/other.json");
        });
        assert!(e.contains("not DELETE"), "{e}");
        let e = refused(&|p| p["request"]["headers"]["x-amz-copy-source"] = json!("/b/secret.json"));
        assert!(e.contains("x-amz-copy-source"), "{e}");
        // Its drift check reads what the preset reads: not a HEAD, whose state any
        // existing object shares.
        let e = refused(&|p| p["precondition"]["request"]["method"] = json!("HEAD"));
        assert!(e.contains("checked against its preset's read"), "{e}");
        // The resulting state is read as the precondition was.
        let mut params = put_item();
        params["postcondition"] = params["precondition"].clone();
        AwsOperation::parse(&request(params.clone())).unwrap();
        params["postcondition"]["request"]["body"] = json!("{\"TableName\":\"t\",\"Key\":{\"id\":{\"S\":\"k2\"}}}");
        let e = format!("{:#}", AwsOperation::parse(&request(params)).unwrap_err());
        assert!(e.contains("params.postcondition is params.precondition's read"), "{e}");
        let mut params = put_item();
        params["postcondition"] = params["precondition"].clone();
        params["postcondition"]["volatile"] = json!([]);
        let e = format!("{:#}", AwsOperation::parse(&request(params)).unwrap_err());
        assert!(e.contains("params.postcondition is params.precondition's read"), "{e}");
        // A REST service's request labelled with a protocol whose labels it ignores.
        let mut glacier = request(json!({"protocol": "json", "request": {"method": "POST",
            "path": "/-/vaults/v/multipart-uploads", "headers": {"x-amz-target": "Glacier.InitiateJob"}},
            "precondition": {"action": "glacier:DescribeVault", "protocol": "json", "request": {"method": "POST",
            "path": "/", "headers": {"x-amz-target": "Glacier.DescribeVault"}}}}));
        glacier.operation = "glacier:InitiateJob".into();
        glacier.target = "arn:aws:glacier:us-east-1:1:vaults/v".into();
        let e = format!("{:#}", AwsOperation::parse(&glacier).unwrap_err());
        assert!(e.contains("`glacier` speaks [RestJson], not Json"), "{e}");
        // A service whose protocol is not known here: no label is believed.
        let mut unknown = glacier.clone();
        unknown.operation = "example:DeleteThing".into();
        unknown.params["request"]["headers"]["x-amz-target"] = json!("Example.DeleteThing");
        unknown.params["precondition"]["action"] = json!("example:DescribeThing");
        unknown.params["precondition"]["request"]["headers"]["x-amz-target"] = json!("Example.DescribeThing");
        let e = format!("{:#}", AwsOperation::parse(&unknown).unwrap_err());
        assert!(e.contains("does not know which protocol `example` speaks"), "{e}");
        // An S3 action sent as another service's.
        let mut s3 = super::super::preset::request("s3:PutObject", "arn:aws:s3:::b/k", &json!({"body": "x"})).unwrap();
        s3.params["service"] = json!("s3x");
        let e = format!("{:#}", AwsOperation::parse(&s3).unwrap_err());
        assert!(e.contains("is sent to S3"), "{e}");
        // An action's service is a name, not an IAM wildcard.
        let mut params = put_item();
        params["service"] = json!("dynamodb");
        let mut wild = request(params);
        wild.operation = "*:PutItem".into();
        let e = format!("{:#}", AwsOperation::parse(&wild).unwrap_err());
        assert!(e.contains("is not service:Operation"), "{e}");
    }

    #[test]
    fn a_certified_read_must_be_a_read() {
        let refused = |precondition: Value| {
            let mut params = put_item();
            params["precondition"] = precondition;
            format!("{:#}", AwsOperation::parse(&request(params)).unwrap_err())
        };
        // A delete dressed as the precondition's read: REST, the action says so.
        let e = refused(json!({"action": "s3:DeleteObject", "protocol": "rest-xml",
            "request": {"method": "POST", "path": "/prod?delete", "body": "<Delete/>"}}));
        assert!(e.contains("`s3:DeleteObject` is not a read"), "{e}");
        // A read verb on a REST write method.
        let e = refused(json!({"action": "s3:GetObject", "protocol": "rest-xml",
            "request": {"method": "DELETE", "path": "/prod/app.json"}}));
        assert!(e.contains("a read is a GET or HEAD"), "{e}");
        // JSON protocol: the operation on the wire is the action's, and a read's.
        let e = refused(json!({"action": "dynamodb:DeleteTable", "protocol": "json", "request": {"method": "POST",
            "path": "/", "headers": {"x-amz-target": "DynamoDB_20120810.DeleteTable"}, "body": "{}"}}));
        assert!(e.contains("`dynamodb:DeleteTable` is not a read"), "{e}");
        // Credentials are not state.
        let e = refused(json!({"action": "sts:GetSessionToken", "protocol": "query",
            "request": {"method": "POST", "path": "/", "body": "Action=GetSessionToken"}}));
        assert!(e.contains("is not a read"), "{e}");
        // S3 labelled as the JSON protocol, so that a POST would pass as a read.
        let e = refused(json!({"action": "s3:GetObject", "protocol": "json", "request": {"method": "POST",
            "path": "/prod?delete", "headers": {"x-amz-target": "X.GetObject"}, "body": "<Delete/>"}}));
        assert!(e.contains("`s3` speaks [RestXml]"), "{e}");
        // Another service's label sent to STS.
        let e = refused(json!({"action": "x:GetThing", "service": "sts", "protocol": "query",
            "request": {"method": "POST", "path": "/", "body": "Action=GetThing"}}));
        assert!(e.contains("is not a read"), "{e}");
        // A verb must be the whole first word: `Getaway` is not `Get`.
        let e =
            refused(json!({"action": "x:Getaway", "protocol": "rest-json", "request": {"method": "GET", "path": "/"}}));
        assert!(e.contains("is not a read"), "{e}");
    }

    #[test]
    fn a_mutation_acts_on_its_exact_target_alone() {
        let mut params = put_item();
        params["resources"] = json!(["arn:aws:dynamodb:us-east-1:1:table/prod"]);
        let e = format!("{:#}", AwsOperation::parse(&request(params)).unwrap_err());
        assert!(e.contains("acts on its target `arn:aws:dynamodb:us-east-1:1:table/t` alone"), "{e}");
        let mut params = put_item();
        params["resources"] = json!(["arn:aws:dynamodb:us-east-1:1:table/t"]);
        AwsOperation::parse(&request(params)).unwrap();
        for target in [
            "arn:aws:dynamodb:us-east-1:1:table/*",
            "arn:aws:dynamodb:us-east-1:1:table/?",
            "arn:aws:dynamodb:${aws:RequestedRegion}:1:table/prod",
            "*",
        ] {
            let mut wildcard = request(put_item());
            wildcard.target = target.into();
            let e = format!("{:#}", AwsOperation::parse(&wildcard).unwrap_err());
            assert!(e.contains("is not one exact ARN"), "{target}: {e}");
        }
    }

    #[test]
    fn absence_is_a_state_and_other_failures_are_not() {
        let operation = AwsOperation::parse(&request(put_item())).unwrap();
        let response =
            |status: u16, body: &str| Response::builder().status(status).body(Bytes::from(body.to_string())).unwrap();
        let absent = operation
            .precondition
            .canonical_state(&response(
                400,
                r#"{"__type":"com.amazonaws.dynamodb.v20120810#ResourceNotFoundException"}"#,
            ))
            .unwrap();
        assert_eq!(absent, json!({"status": 400, "absent": "ResourceNotFoundException"}));
        let denied = operation.precondition.canonical_state(&response(403, "<Error><Code>AccessDenied</Code></Error>"));
        assert!(denied.unwrap_err().to_string().contains("AccessDenied"));
        let one = operation.precondition.digest(&response(200, r#"{"Item":{"a":{"S":"x"}},"ConsumedCapacity":1}"#));
        let two = operation.precondition.digest(&response(200, r#"{"ConsumedCapacity":2,"Item":{"a":{"S":"x"}}}"#));
        assert_eq!(one.unwrap(), two.unwrap());
    }
}
