//! The AWS mutations the broker performs: how each is parsed from a certified request,
//! the session policy that allows exactly it, its API call, and how the live state of its
//! target is read and canonicalised for the drift check.
//!
//! Canonical state per target (volatile fields are left out):
//! - S3 object: `{"exists", "sha256"}` of the object's bytes (not ETag, dates, metadata);
//! - S3 bucket policy: `{"policy"}` as canonical JSON, or null;
//! - EC2 security group: `{"group_id", "ingress", "egress"}`, rules flattened to one
//!   (protocol, from, to, cidr) per entry, sorted (not descriptions, rule ids);
//! - EC2 instance: `{"instance_id", "state"}` (not IPs, launch time, tags);
//! - IAM role: `{"role", "attached_policies"}` sorted.

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http::{Method, Request, Response};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::xml::Element;
use crate::cert::{MutationRequest, contract::canonical_json};

const EC2_VERSION: &str = "2016-11-15";
const IAM_VERSION: &str = "2010-05-08";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpPermission {
    pub protocol: String,
    pub from_port: i64,
    pub to_port: i64,
    pub cidrs: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuleAction {
    AuthorizeIngress,
    RevokeIngress,
    AuthorizeEgress,
    RevokeEgress,
}

#[derive(Debug, Clone, PartialEq)]
pub enum AwsOperation {
    S3PutObject {
        bucket: String,
        key: String,
        body: Vec<u8>,
    },
    S3DeleteObject {
        bucket: String,
        key: String,
    },
    S3PutBucketPolicy {
        bucket: String,
        policy: String,
    },
    Ec2SecurityGroupRule {
        action: RuleAction,
        region: String,
        account: String,
        group_id: String,
        permissions: Vec<IpPermission>,
    },
    Ec2TerminateInstance {
        region: String,
        account: String,
        instance_id: String,
    },
    IamRolePolicy {
        attach: bool,
        account: String,
        role: String,
        policy_arn: String,
    },
}

/// One HTTP call to an AWS service.
pub struct ServiceCall {
    pub service: &'static str,
    pub method: Method,
    /// Path and query, e.g. `/bucket/key` or `/`.
    pub path: String,
    pub body: Bytes,
    pub content_type: Option<&'static str>,
}

impl ServiceCall {
    /// An AWS query-protocol call (STS, EC2, IAM): form parameters in a POST body,
    /// percent-encoded as the AWS SDKs do (RFC 3986 unreserved characters only), so
    /// servers that re-encode the form before checking the signature agree with it.
    pub fn query(service: &'static str, params: &[(&str, String)]) -> Self {
        let body =
            params.iter().map(|(k, v)| format!("{}={}", uri_encode(k), uri_encode(v))).collect::<Vec<_>>().join("&");
        Self {
            service,
            method: Method::POST,
            path: "/".into(),
            body: Bytes::from(body),
            content_type: Some("application/x-www-form-urlencoded; charset=utf-8"),
        }
    }

    pub fn into_request(self, endpoint: &str) -> Result<Request<Bytes>> {
        let uri: http::Uri = format!("{}{}", endpoint.trim_end_matches('/'), self.path).parse()?;
        let host = uri.authority().context("endpoint without host")?.to_string();
        let mut builder = Request::builder().method(self.method).uri(uri).header(http::header::HOST, host);
        if let Some(content_type) = self.content_type {
            builder = builder.header(http::header::CONTENT_TYPE, content_type);
        }
        builder = builder.header(http::header::CONTENT_LENGTH, self.body.len());
        Ok(builder.body(self.body)?)
    }
}

impl AwsOperation {
    pub fn parse(request: &MutationRequest) -> Result<Self> {
        let target = &request.target;
        let params = &request.params;
        Ok(match request.operation.as_str() {
            "s3:PutObject" => {
                let (bucket, key) = s3_object(target)?;
                let body = params["body"].as_str().context("s3:PutObject needs params.body (a string)")?;
                Self::S3PutObject { bucket, key, body: body.as_bytes().to_vec() }
            }
            "s3:DeleteObject" => {
                let (bucket, key) = s3_object(target)?;
                Self::S3DeleteObject { bucket, key }
            }
            "s3:PutBucketPolicy" => {
                let bucket = target.strip_prefix("arn:aws:s3:::").filter(|b| !b.contains('/') && !b.is_empty());
                let bucket = bucket.context("s3:PutBucketPolicy targets arn:aws:s3:::<bucket>")?.to_string();
                let policy =
                    params.get("policy").filter(|p| p.is_object()).context("s3:PutBucketPolicy needs params.policy")?;
                Self::S3PutBucketPolicy { bucket, policy: canonical_json(policy) }
            }
            op @ ("ec2:AuthorizeSecurityGroupIngress"
            | "ec2:RevokeSecurityGroupIngress"
            | "ec2:AuthorizeSecurityGroupEgress"
            | "ec2:RevokeSecurityGroupEgress") => {
                let action = match op {
                    "ec2:AuthorizeSecurityGroupIngress" => RuleAction::AuthorizeIngress,
                    "ec2:RevokeSecurityGroupIngress" => RuleAction::RevokeIngress,
                    "ec2:AuthorizeSecurityGroupEgress" => RuleAction::AuthorizeEgress,
                    _ => RuleAction::RevokeEgress,
                };
                let (region, account, group_id) = ec2_resource(target, "security-group/")?;
                let permissions: Vec<IpPermission> = serde_json::from_value(params["ip_permissions"].clone()).context(
                    "security group changes need params.ip_permissions: [{protocol, from_port, to_port, cidrs}]",
                )?;
                if permissions.is_empty() {
                    bail!("params.ip_permissions is empty");
                }
                Self::Ec2SecurityGroupRule { action, region, account, group_id, permissions }
            }
            "ec2:TerminateInstances" => {
                let (region, account, instance_id) = ec2_resource(target, "instance/")?;
                Self::Ec2TerminateInstance { region, account, instance_id }
            }
            op @ ("iam:AttachRolePolicy" | "iam:DetachRolePolicy") => {
                let rest = target
                    .strip_prefix("arn:aws:iam::")
                    .context("IAM role targets arn:aws:iam::<account>:role/<name>")?;
                let (account, role) =
                    rest.split_once(":role/").context("IAM role targets arn:aws:iam::<account>:role/<name>")?;
                let policy_arn = params["policy_arn"].as_str().context("params.policy_arn is required")?.to_string();
                Self::IamRolePolicy {
                    attach: op == "iam:AttachRolePolicy",
                    account: account.into(),
                    role: role.into(),
                    policy_arn,
                }
            }
            other => bail!("AWS operation `{other}` is not supported"),
        })
    }

    /// The operation on `target` with no parameters: enough to read its live state.
    pub fn for_reading(operation: &str, target: &str) -> Result<Self> {
        let params = match operation {
            "s3:PutObject" => json!({"body": ""}),
            "s3:PutBucketPolicy" => json!({"policy": {}}),
            "iam:AttachRolePolicy" | "iam:DetachRolePolicy" => json!({"policy_arn": ""}),
            op if op.starts_with("ec2:") && op.contains("SecurityGroup") => {
                json!({"ip_permissions": [{"protocol": "-1", "from_port": 0, "to_port": 0, "cidrs": []}]})
            }
            _ => Value::Null,
        };
        let request = MutationRequest {
            provider: crate::cert::Provider::Aws,
            operation: operation.into(),
            target: target.into(),
            params,
        };
        Self::parse(&request)
    }

    /// A session policy allowing only the read of the live state.
    pub fn read_policy(&self) -> Value {
        let full = self.session_policy();
        json!({"Version": "2012-10-17", "Statement": full["Statement"].as_array().map(|s| s[1..].to_vec()).unwrap_or_default()})
    }

    /// The IAM action of the mutation itself.
    pub fn action(&self) -> &'static str {
        match self {
            Self::S3PutObject { .. } => "s3:PutObject",
            Self::S3DeleteObject { .. } => "s3:DeleteObject",
            Self::S3PutBucketPolicy { .. } => "s3:PutBucketPolicy",
            Self::Ec2SecurityGroupRule { action, .. } => match action {
                RuleAction::AuthorizeIngress => "ec2:AuthorizeSecurityGroupIngress",
                RuleAction::RevokeIngress => "ec2:RevokeSecurityGroupIngress",
                RuleAction::AuthorizeEgress => "ec2:AuthorizeSecurityGroupEgress",
                RuleAction::RevokeEgress => "ec2:RevokeSecurityGroupEgress",
            },
            Self::Ec2TerminateInstance { .. } => "ec2:TerminateInstances",
            Self::IamRolePolicy { attach: true, .. } => "iam:AttachRolePolicy",
            Self::IamRolePolicy { attach: false, .. } => "iam:DetachRolePolicy",
        }
    }

    /// The certified resource's ARN.
    pub fn resource(&self) -> String {
        match self {
            Self::S3PutObject { bucket, key, .. } | Self::S3DeleteObject { bucket, key } => {
                format!("arn:aws:s3:::{bucket}/{key}")
            }
            Self::S3PutBucketPolicy { bucket, .. } => format!("arn:aws:s3:::{bucket}"),
            Self::Ec2SecurityGroupRule { region, account, group_id, .. } => {
                format!("arn:aws:ec2:{region}:{account}:security-group/{group_id}")
            }
            Self::Ec2TerminateInstance { region, account, instance_id } => {
                format!("arn:aws:ec2:{region}:{account}:instance/{instance_id}")
            }
            Self::IamRolePolicy { account, role, .. } => format!("arn:aws:iam::{account}:role/{role}"),
        }
    }

    /// The session policy: this action on this resource, plus the read the drift check
    /// needs. EC2's Describe calls have no resource-level permissions, hence `*` there.
    pub fn session_policy(&self) -> Value {
        let resource = self.resource();
        let mut statements = vec![json!({"Effect": "Allow", "Action": [self.action()], "Resource": [resource]})];
        match self {
            Self::S3PutObject { .. } | Self::S3DeleteObject { .. } => {
                statements.push(json!({"Effect": "Allow", "Action": ["s3:GetObject"], "Resource": [resource]}))
            }
            Self::S3PutBucketPolicy { .. } => {
                statements.push(json!({"Effect": "Allow", "Action": ["s3:GetBucketPolicy"], "Resource": [resource]}))
            }
            Self::Ec2SecurityGroupRule { .. } => {
                statements.push(json!({"Effect": "Allow", "Action": ["ec2:DescribeSecurityGroups"], "Resource": ["*"]}))
            }
            Self::Ec2TerminateInstance { .. } => {
                statements.push(json!({"Effect": "Allow", "Action": ["ec2:DescribeInstances"], "Resource": ["*"]}))
            }
            Self::IamRolePolicy { policy_arn, .. } => {
                statements[0]["Condition"] = json!({"ArnEquals": {"iam:PolicyARN": policy_arn}});
                statements.push(
                    json!({"Effect": "Allow", "Action": ["iam:ListAttachedRolePolicies"], "Resource": [resource]}),
                );
            }
        }
        json!({"Version": "2012-10-17", "Statement": statements})
    }

    /// The mutation's API call.
    pub fn mutation(&self) -> ServiceCall {
        match self {
            Self::S3PutObject { bucket, key, body } => ServiceCall {
                service: "s3",
                method: Method::PUT,
                path: s3_path(bucket, Some(key)),
                body: Bytes::from(body.clone()),
                content_type: Some("application/octet-stream"),
            },
            Self::S3DeleteObject { bucket, key } => ServiceCall {
                service: "s3",
                method: Method::DELETE,
                path: s3_path(bucket, Some(key)),
                body: Bytes::new(),
                content_type: None,
            },
            Self::S3PutBucketPolicy { bucket, policy } => ServiceCall {
                service: "s3",
                method: Method::PUT,
                path: format!("{}?policy", s3_path(bucket, None)),
                body: Bytes::from(policy.clone()),
                content_type: Some("application/json"),
            },
            Self::Ec2SecurityGroupRule { group_id, permissions, .. } => {
                let name = self.action().trim_start_matches("ec2:");
                let mut params =
                    vec![("Action", name.to_string()), ("Version", EC2_VERSION.into()), ("GroupId", group_id.clone())];
                let mut keys = Vec::new();
                for (i, permission) in permissions.iter().enumerate() {
                    let n = i + 1;
                    keys.push((format!("IpPermissions.{n}.IpProtocol"), permission.protocol.clone()));
                    keys.push((format!("IpPermissions.{n}.FromPort"), permission.from_port.to_string()));
                    keys.push((format!("IpPermissions.{n}.ToPort"), permission.to_port.to_string()));
                    for (j, cidr) in permission.cidrs.iter().enumerate() {
                        keys.push((format!("IpPermissions.{n}.IpRanges.{}.CidrIp", j + 1), cidr.clone()));
                    }
                }
                params.extend(keys.iter().map(|(k, v)| (k.as_str(), v.clone())));
                ServiceCall::query("ec2", &params)
            }
            Self::Ec2TerminateInstance { instance_id, .. } => ServiceCall::query(
                "ec2",
                &[
                    ("Action", "TerminateInstances".into()),
                    ("Version", EC2_VERSION.into()),
                    ("InstanceId.1", instance_id.clone()),
                ],
            ),
            Self::IamRolePolicy { attach, role, policy_arn, .. } => ServiceCall::query(
                "iam",
                &[
                    ("Action", if *attach { "AttachRolePolicy" } else { "DetachRolePolicy" }.into()),
                    ("Version", IAM_VERSION.into()),
                    ("RoleName", role.clone()),
                    ("PolicyArn", policy_arn.clone()),
                ],
            ),
        }
    }

    /// The read of the target's live state.
    pub fn state_read(&self) -> ServiceCall {
        match self {
            Self::S3PutObject { bucket, key, .. } | Self::S3DeleteObject { bucket, key } => ServiceCall {
                service: "s3",
                method: Method::GET,
                path: s3_path(bucket, Some(key)),
                body: Bytes::new(),
                content_type: None,
            },
            Self::S3PutBucketPolicy { bucket, .. } => ServiceCall {
                service: "s3",
                method: Method::GET,
                path: format!("{}?policy", s3_path(bucket, None)),
                body: Bytes::new(),
                content_type: None,
            },
            Self::Ec2SecurityGroupRule { group_id, .. } => ServiceCall::query(
                "ec2",
                &[
                    ("Action", "DescribeSecurityGroups".into()),
                    ("Version", EC2_VERSION.into()),
                    ("GroupId.1", group_id.clone()),
                ],
            ),
            Self::Ec2TerminateInstance { instance_id, .. } => ServiceCall::query(
                "ec2",
                &[
                    ("Action", "DescribeInstances".into()),
                    ("Version", EC2_VERSION.into()),
                    ("InstanceId.1", instance_id.clone()),
                ],
            ),
            Self::IamRolePolicy { role, .. } => ServiceCall::query(
                "iam",
                &[
                    ("Action", "ListAttachedRolePolicies".into()),
                    ("Version", IAM_VERSION.into()),
                    ("RoleName", role.clone()),
                ],
            ),
        }
    }

    /// Canonical live state from the read's response.
    pub fn canonical_state(&self, response: &Response<Bytes>) -> Result<Value> {
        let status = response.status();
        let body = response.body();
        match self {
            Self::S3PutObject { .. } | Self::S3DeleteObject { .. } => match status.as_u16() {
                200 => Ok(json!({"exists": true, "sha256": hex::encode(Sha256::digest(body))})),
                404 => Ok(json!({"exists": false})),
                _ => bail!("reading the object failed: {}", api_error(response)),
            },
            Self::S3PutBucketPolicy { .. } => match status.as_u16() {
                200 => {
                    let policy: Value = serde_json::from_slice(body).context("the bucket policy is not JSON")?;
                    Ok(json!({"policy": canonical_json(&policy)}))
                }
                404 => Ok(json!({"policy": null})),
                _ => bail!("reading the bucket policy failed: {}", api_error(response)),
            },
            Self::Ec2SecurityGroupRule { group_id, .. } => {
                let root = ok_xml(response)?;
                let group = root
                    .items(&["securityGroupInfo"])
                    .into_iter()
                    .find(|g| g.text_at(&["groupId"]).as_deref() == Some(group_id))
                    .with_context(|| format!("security group {group_id} not found"))?;
                Ok(json!({
                    "group_id": group_id,
                    "ingress": flatten_rules(group.items(&["ipPermissions"])),
                    "egress": flatten_rules(group.items(&["ipPermissionsEgress"])),
                }))
            }
            Self::Ec2TerminateInstance { instance_id, .. } => {
                let root = ok_xml(response)?;
                let state = root
                    .items(&["reservationSet"])
                    .into_iter()
                    .flat_map(|r| r.items(&["instancesSet"]))
                    .find(|i| i.text_at(&["instanceId"]).as_deref() == Some(instance_id))
                    .and_then(|i| i.text_at(&["instanceState", "name"]))
                    .with_context(|| format!("instance {instance_id} not found"))?;
                Ok(json!({"instance_id": instance_id, "state": state}))
            }
            Self::IamRolePolicy { role, .. } => {
                let root = ok_xml(response)?;
                let mut attached: Vec<String> = root
                    .items(&["ListAttachedRolePoliciesResult", "AttachedPolicies"])
                    .into_iter()
                    .filter_map(|p| p.text_at(&["PolicyArn"]))
                    .collect();
                attached.sort();
                Ok(json!({"role": role, "attached_policies": attached}))
            }
        }
    }
}

/// `sha256:<hex>` of a canonical state.
pub fn state_digest(state: &Value) -> String {
    crate::cert::contract::digest_of(state)
}

fn flatten_rules(permissions: Vec<&Element>) -> Vec<Value> {
    let mut rules: Vec<Value> = permissions
        .into_iter()
        .flat_map(|p| {
            let protocol = p.text_at(&["ipProtocol"]).unwrap_or_default();
            let from = p.text_at(&["fromPort"]).and_then(|v| v.parse::<i64>().ok());
            let to = p.text_at(&["toPort"]).and_then(|v| v.parse::<i64>().ok());
            p.items(&["ipRanges"])
                .into_iter()
                .filter_map(|r| r.text_at(&["cidrIp"]))
                .map(move |cidr| json!({"protocol": protocol.clone(), "from_port": from, "to_port": to, "cidr": cidr}))
                .collect::<Vec<_>>()
        })
        .collect();
    rules.sort_by_key(canonical_json);
    rules.dedup();
    rules
}

fn ok_xml(response: &Response<Bytes>) -> Result<Element> {
    if !response.status().is_success() {
        bail!("{}", api_error(response));
    }
    Element::parse(response.body())
}

/// The AWS error code and message of a failed call.
pub fn api_error(response: &Response<Bytes>) -> String {
    let status = response.status().as_u16();
    match Element::parse(response.body()) {
        Ok(root) => {
            let find = |name: &str| -> Option<String> {
                fn walk(e: &Element, name: &str) -> Option<String> {
                    if e.name == name {
                        return Some(e.text.trim().to_string());
                    }
                    e.children.iter().find_map(|c| walk(c, name))
                }
                walk(&root, name)
            };
            format!("HTTP {status} {}: {}", find("Code").unwrap_or_default(), find("Message").unwrap_or_default())
        }
        Err(_) => format!("HTTP {status}"),
    }
}

fn s3_object(target: &str) -> Result<(String, String)> {
    let rest =
        target.strip_prefix("arn:aws:s3:::").context("S3 objects are targeted as arn:aws:s3:::<bucket>/<key>")?;
    let (bucket, key) = rest.split_once('/').context("S3 objects are targeted as arn:aws:s3:::<bucket>/<key>")?;
    if bucket.is_empty() || key.is_empty() {
        bail!("S3 objects are targeted as arn:aws:s3:::<bucket>/<key>");
    }
    Ok((bucket.into(), key.into()))
}

/// `arn:aws:ec2:<region>:<account>:<kind>/<id>`.
fn ec2_resource(target: &str, kind: &str) -> Result<(String, String, String)> {
    let usage = || format!("EC2 targets are arn:aws:ec2:<region>:<account>:{kind}<id>");
    let rest = target.strip_prefix("arn:aws:ec2:").with_context(usage)?;
    let mut parts = rest.splitn(3, ':');
    let (region, account, resource) = (parts.next(), parts.next(), parts.next());
    let (Some(region), Some(account), Some(resource)) = (region, account, resource) else { bail!(usage()) };
    let id = resource.strip_prefix(kind).with_context(usage)?;
    Ok((region.into(), account.into(), id.into()))
}

/// RFC 3986 percent-encoding: everything but unreserved characters.
fn uri_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Path-style S3 addressing, keys percent-encoded segment by segment.
fn s3_path(bucket: &str, key: Option<&str>) -> String {
    match key {
        Some(key) => {
            format!("/{}/{}", uri_encode(bucket), key.split('/').map(uri_encode).collect::<Vec<_>>().join("/"))
        }
        None => format!("/{}", uri_encode(bucket)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(operation: &str, target: &str, params: Value) -> MutationRequest {
        serde_json::from_value(json!({"provider": "aws", "operation": operation, "target": target, "params": params}))
            .unwrap()
    }

    #[test]
    fn the_session_policy_allows_exactly_the_certified_action_and_resource() {
        let op =
            AwsOperation::parse(&request("s3:PutObject", "arn:aws:s3:::b/dir/k.json", json!({"body": "x"}))).unwrap();
        let policy = op.session_policy();
        assert_eq!(policy["Statement"][0]["Action"], json!(["s3:PutObject"]));
        assert_eq!(policy["Statement"][0]["Resource"], json!(["arn:aws:s3:::b/dir/k.json"]));
        assert_eq!(policy["Statement"][1]["Action"], json!(["s3:GetObject"]));
        assert_eq!(policy["Statement"].as_array().unwrap().len(), 2);
        assert_eq!(op.mutation().path, "/b/dir/k.json");
    }

    #[test]
    fn security_group_rules_become_ec2_query_parameters() {
        let op = AwsOperation::parse(&request(
            "ec2:AuthorizeSecurityGroupIngress",
            "arn:aws:ec2:us-east-1:123456789012:security-group/sg-1",
            json!({"ip_permissions": [{"protocol": "tcp", "from_port": 443, "to_port": 443, "cidrs": ["10.0.0.0/8"]}]}),
        ))
        .unwrap();
        let body = String::from_utf8(op.mutation().body.to_vec()).unwrap();
        assert!(body.contains("Action=AuthorizeSecurityGroupIngress"), "{body}");
        assert!(body.contains("IpPermissions.1.IpRanges.1.CidrIp=10.0.0.0%2F8"), "{body}");
        let star = ServiceCall::query("sts", &[("Policy", r#"{"Resource": "*"}"#.into())]);
        assert_eq!(String::from_utf8(star.body.to_vec()).unwrap(), "Policy=%7B%22Resource%22%3A%20%22%2A%22%7D");
        assert_eq!(op.resource(), "arn:aws:ec2:us-east-1:123456789012:security-group/sg-1");
    }

    #[test]
    fn malformed_targets_and_params_are_named() {
        let e = AwsOperation::parse(&request("s3:PutObject", "arn:aws:s3:::bucket-only", json!({"body": "x"})))
            .unwrap_err();
        assert!(e.to_string().contains("arn:aws:s3:::<bucket>/<key>"), "{e}");
        let e = AwsOperation::parse(&request("s3:PutObject", "arn:aws:s3:::b/k", json!({}))).unwrap_err();
        assert!(e.to_string().contains("params.body"), "{e}");
        let e = AwsOperation::parse(&request("lambda:InvokeFunction", "x", json!({}))).unwrap_err();
        assert!(e.to_string().contains("not supported"), "{e}");
    }

    #[test]
    fn security_group_state_ignores_descriptions_and_order() {
        let op = AwsOperation::parse(&request(
            "ec2:RevokeSecurityGroupIngress",
            "arn:aws:ec2:us-east-1:1:security-group/sg-1",
            json!({"ip_permissions": [{"protocol": "tcp", "from_port": 22, "to_port": 22, "cidrs": ["0.0.0.0/0"]}]}),
        ))
        .unwrap();
        let xml = |a: &str, b: &str| {
            format!(
                "<DescribeSecurityGroupsResponse><securityGroupInfo><item><groupId>sg-1</groupId><ipPermissions>\
                 <item><ipProtocol>tcp</ipProtocol><fromPort>22</fromPort><toPort>22</toPort><ipRanges>\
                 <item><cidrIp>{a}</cidrIp><description>one</description></item><item><cidrIp>{b}</cidrIp></item>\
                 </ipRanges></item></ipPermissions><ipPermissionsEgress/></item></securityGroupInfo></DescribeSecurityGroupsResponse>"
            )
        };
        let response = |body: String| Response::builder().status(200).body(Bytes::from(body)).unwrap();
        let one = op.canonical_state(&response(xml("10.0.0.0/8", "0.0.0.0/0"))).unwrap();
        let two = op.canonical_state(&response(xml("0.0.0.0/0", "10.0.0.0/8"))).unwrap();
        assert_eq!(state_digest(&one), state_digest(&two));
        assert_eq!(one["ingress"].as_array().unwrap().len(), 2);
    }
}
