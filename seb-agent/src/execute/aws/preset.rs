//! Presets: certified requests for common mutations, built from a short description (the
//! operation, the target ARN and a few parameters), and the reads that go with them. The
//! broker executes only full certified requests; a preset is how an agent or an assurance
//! authority writes one without spelling out the HTTP request.
//!
//! | operation | target | params |
//! |---|---|---|
//! | `s3:PutObject`, `s3:DeleteObject` | `arn:aws:s3:::<bucket>/<key>` | `{"body"}` (put) |
//! | `s3:PutBucketPolicy` | `arn:aws:s3:::<bucket>` | `{"policy"}` |
//! | `ec2:{Authorize,Revoke}SecurityGroup{Ingress,Egress}` | `arn:aws:ec2:<region>:<account>:security-group/<id>` | `{"ip_permissions": [{"protocol", "from_port", "to_port", "cidrs"}]}` (IPv4 or IPv6 CIDRs) |
//! | `ec2:TerminateInstances` | `arn:aws:ec2:<region>:<account>:instance/<id>` | none |
//! | `iam:AttachRolePolicy`, `iam:DetachRolePolicy` | `arn:aws:iam::<account>:role/<name>` | `{"policy_arn"}` |
//!
//! Every preset accepts `"postcondition": true` to read the resulting state afterwards.

use anyhow::{Context, Result, bail};
use serde::Deserialize;
use serde_json::{Value, json};

use super::request::{AwsParams, CertifiedRead, HttpCall, Protocol};
use crate::cert::{MutationRequest, Provider, contract::canonical_json};

const EC2_VERSION: &str = "2016-11-15";
const IAM_VERSION: &str = "2010-05-08";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct IpPermission {
    protocol: String,
    from_port: i64,
    to_port: i64,
    cidrs: Vec<String>,
}

/// The operations with a preset: a short form the broker expands, and a read it names.
pub const OPERATIONS: &[&str] = &[
    "s3:PutObject",
    "s3:DeleteObject",
    "s3:PutBucketPolicy",
    "ec2:AuthorizeSecurityGroupIngress",
    "ec2:RevokeSecurityGroupIngress",
    "ec2:AuthorizeSecurityGroupEgress",
    "ec2:RevokeSecurityGroupEgress",
    "ec2:TerminateInstances",
    "iam:AttachRolePolicy",
    "iam:DetachRolePolicy",
];

/// The certified request the preset `operation` builds for `target` and `params`.
pub fn request(operation: &str, target: &str, params: &Value) -> Result<MutationRequest> {
    let postcondition = params.get("postcondition").and_then(Value::as_bool).unwrap_or(false);
    let (protocol, call, condition) = match operation {
        "s3:PutObject" | "s3:DeleteObject" => {
            let (bucket, key) = s3_object(target)?;
            let path = s3_path(&bucket, Some(&key));
            let call = if operation == "s3:PutObject" {
                let body = params["body"].as_str().context("s3:PutObject needs params.body (a string)")?;
                http("PUT", &path, &[("content-type", "application/octet-stream")], body)
            } else {
                http("DELETE", &path, &[], "")
            };
            (Protocol::RestXml, call, None)
        }
        "s3:PutBucketPolicy" => {
            let bucket = s3_bucket(target)?;
            let policy =
                params.get("policy").filter(|p| p.is_object()).context("s3:PutBucketPolicy needs params.policy")?;
            let path = format!("{}?policy", s3_path(&bucket, None));
            let call = http("PUT", &path, &[("content-type", "application/json")], &canonical_json(policy));
            (Protocol::RestXml, call, None)
        }
        "ec2:AuthorizeSecurityGroupIngress"
        | "ec2:RevokeSecurityGroupIngress"
        | "ec2:AuthorizeSecurityGroupEgress"
        | "ec2:RevokeSecurityGroupEgress" => {
            let group_id = ec2_resource(target, "security-group/")?;
            let permissions: Vec<IpPermission> = serde_json::from_value(params["ip_permissions"].clone()).context(
                "security group changes need params.ip_permissions: [{protocol, from_port, to_port, cidrs}]",
            )?;
            if permissions.is_empty() {
                bail!("params.ip_permissions is empty");
            }
            let action = operation.trim_start_matches("ec2:");
            let mut form = vec![
                ("Action".to_string(), action.to_string()),
                ("Version".into(), EC2_VERSION.into()),
                ("GroupId".into(), group_id),
            ];
            for (i, permission) in permissions.iter().enumerate() {
                let n = i + 1;
                form.push((format!("IpPermissions.{n}.IpProtocol"), permission.protocol.clone()));
                form.push((format!("IpPermissions.{n}.FromPort"), permission.from_port.to_string()));
                form.push((format!("IpPermissions.{n}.ToPort"), permission.to_port.to_string()));
                let (v6, v4): (Vec<&String>, Vec<&String>) = permission.cidrs.iter().partition(|c| c.contains(':'));
                for (j, cidr) in v4.into_iter().enumerate() {
                    form.push((format!("IpPermissions.{n}.IpRanges.{}.CidrIp", j + 1), cidr.clone()));
                }
                for (j, cidr) in v6.into_iter().enumerate() {
                    form.push((format!("IpPermissions.{n}.Ipv6Ranges.{}.CidrIpv6", j + 1), cidr.clone()));
                }
            }
            (Protocol::Query, query_call(&form), None)
        }
        "ec2:TerminateInstances" => {
            let instance = ec2_resource(target, "instance/")?;
            let form = [("Action", "TerminateInstances"), ("Version", EC2_VERSION), ("InstanceId.1", &instance)];
            (Protocol::Query, query_call(&form), None)
        }
        "iam:AttachRolePolicy" | "iam:DetachRolePolicy" => {
            let role = iam_role(target)?;
            let policy_arn = params["policy_arn"].as_str().context("params.policy_arn is required")?;
            let action = operation.trim_start_matches("iam:");
            let form = [("Action", action), ("Version", IAM_VERSION), ("RoleName", &role), ("PolicyArn", policy_arn)];
            let condition = json!({"ArnEquals": {"iam:PolicyARN": policy_arn}});
            (Protocol::Query, query_call(&form), Some(condition))
        }
        other => return Err(not_a_preset(other)),
    };
    let precondition = precondition_read(operation, target)?;
    let params = AwsParams {
        service: None,
        protocol,
        request: call,
        resources: None,
        condition,
        postcondition: postcondition.then(|| precondition.clone()),
        precondition,
    };
    Ok(MutationRequest {
        provider: Provider::Aws,
        operation: operation.into(),
        target: target.into(),
        params: serde_json::to_value(params).expect("params serialise"),
    })
}

fn not_a_preset(operation: &str) -> anyhow::Error {
    anyhow::anyhow!(
        "`{operation}` is not a preset; certify the full request (service, protocol, request, precondition)"
    )
}

/// The read that shows the live state the preset `operation` changes on `target`: its
/// precondition (and postcondition). Reconciliation reads it again for a decision that
/// recorded the short form.
pub fn precondition_read(operation: &str, target: &str) -> Result<CertifiedRead> {
    let action = match operation {
        "s3:PutObject" | "s3:DeleteObject" => "s3:GetObject",
        "s3:PutBucketPolicy" => "s3:GetBucketPolicy",
        "ec2:AuthorizeSecurityGroupIngress"
        | "ec2:RevokeSecurityGroupIngress"
        | "ec2:AuthorizeSecurityGroupEgress"
        | "ec2:RevokeSecurityGroupEgress" => "ec2:DescribeSecurityGroups",
        "ec2:TerminateInstances" => "ec2:DescribeInstances",
        "iam:AttachRolePolicy" | "iam:DetachRolePolicy" => "iam:ListAttachedRolePolicies",
        other => return Err(not_a_preset(other)),
    };
    read(action, target)
}

/// The preset read `action` of `target`.
pub fn read(action: &str, target: &str) -> Result<CertifiedRead> {
    let read = |request: HttpCall| CertifiedRead {
        action: action.into(),
        service: None,
        resources: None,
        protocol: Protocol::Query,
        request,
        decode: None,
        headers: Vec::new(),
        volatile: Vec::new(),
        unordered: Vec::new(),
    };
    let strings = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    Ok(match action {
        "s3:GetObject" => {
            let (bucket, key) = s3_object(target)?;
            CertifiedRead {
                protocol: Protocol::RestXml,
                decode: Some(super::canonical::Decode::Sha256),
                // What the object is besides its bytes; not ETag, dates or request ids.
                headers: strings(&[
                    "content-type",
                    "content-encoding",
                    "content-disposition",
                    "content-language",
                    "cache-control",
                    "x-amz-meta-*",
                    "x-amz-website-redirect-location",
                    "x-amz-server-side-encryption*",
                    "x-amz-tagging-count",
                    "expires",
                    "x-amz-storage-class",
                    "x-amz-object-lock-*",
                ]),
                ..read(http("GET", &s3_path(&bucket, Some(&key)), &[], ""))
            }
        }
        "s3:GetBucketPolicy" => {
            let path = format!("{}?policy", s3_path(&s3_bucket(target)?, None));
            CertifiedRead {
                protocol: Protocol::RestXml,
                decode: Some(super::canonical::Decode::Json),
                ..read(http("GET", &path, &[], ""))
            }
        }
        "ec2:DescribeSecurityGroups" => {
            let group = ec2_resource(target, "security-group/")?;
            let form = [("Action", "DescribeSecurityGroups"), ("Version", EC2_VERSION), ("GroupId.1", &group)];
            let groups = "/DescribeSecurityGroupsResponse/securityGroupInfo/item/*";
            let mut unordered = Vec::new();
            for rules in ["ipPermissions", "ipPermissionsEgress"] {
                unordered.push(format!("{groups}/{rules}/item"));
                for list in ["ipRanges", "ipv6Ranges", "prefixListIds", "groups"] {
                    unordered.push(format!("{groups}/{rules}/item/*/{list}/item"));
                }
            }
            CertifiedRead {
                protocol: Protocol::Query,
                // Describe calls have no resource-level permissions.
                resources: Some(vec!["*".into()]),
                volatile: strings(&["/DescribeSecurityGroupsResponse/requestId"]),
                unordered,
                ..read(query_call(&form))
            }
        }
        "ec2:DescribeInstances" => {
            let instance = ec2_resource(target, "instance/")?;
            let form = [("Action", "DescribeInstances"), ("Version", EC2_VERSION), ("InstanceId.1", &instance)];
            CertifiedRead {
                protocol: Protocol::Query,
                resources: Some(vec!["*".into()]),
                volatile: strings(&["/DescribeInstancesResponse/requestId"]),
                ..read(query_call(&form))
            }
        }
        "iam:ListAttachedRolePolicies" => {
            let role = iam_role(target)?;
            let form = [("Action", "ListAttachedRolePolicies"), ("Version", IAM_VERSION), ("RoleName", &role)];
            CertifiedRead {
                protocol: Protocol::Query,
                volatile: strings(&["/ListAttachedRolePoliciesResponse/ResponseMetadata"]),
                unordered: strings(&[
                    "/ListAttachedRolePoliciesResponse/ListAttachedRolePoliciesResult/AttachedPolicies/member",
                ]),
                ..read(query_call(&form))
            }
        }
        other => bail!("`{other}` is not a preset read"),
    })
}

fn http(method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> HttpCall {
    HttpCall {
        method: method.into(),
        path: path.into(),
        headers: headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        body: (!body.is_empty()).then(|| body.to_string()),
        body_base64: None,
    }
}

fn query_call<K: AsRef<str>, V: AsRef<str>>(form: &[(K, V)]) -> HttpCall {
    http("POST", "/", &[("content-type", "application/x-www-form-urlencoded; charset=utf-8")], &query_body(form))
}

/// An AWS query-protocol body: form parameters percent-encoded as the AWS SDKs do (RFC
/// 3986 unreserved characters only), so servers that re-encode the form before checking
/// the signature agree with it.
pub fn query_body<K: AsRef<str>, V: AsRef<str>>(form: &[(K, V)]) -> String {
    form.iter()
        .map(|(k, v)| format!("{}={}", uri_encode(k.as_ref()), uri_encode(v.as_ref())))
        .collect::<Vec<_>>()
        .join("&")
}

/// RFC 3986 percent-encoding: everything but unreserved characters.
fn uri_encode(text: &str) -> String {
    const RESERVED: &percent_encoding::AsciiSet =
        &percent_encoding::NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'.').remove(b'~');
    percent_encoding::utf8_percent_encode(text, RESERVED).to_string()
}

/// Path-style S3 addressing, keys percent-encoded segment by segment.
pub(super) fn s3_path(bucket: &str, key: Option<&str>) -> String {
    match key {
        Some(key) => {
            format!("/{}/{}", uri_encode(bucket), key.split('/').map(uri_encode).collect::<Vec<_>>().join("/"))
        }
        None => format!("/{}", uri_encode(bucket)),
    }
}

pub(super) fn s3_object(target: &str) -> Result<(String, String)> {
    let usage = "S3 objects are targeted as arn:aws:s3:::<bucket>/<key>";
    let rest = target.strip_prefix("arn:aws:s3:::").context(usage)?;
    let (bucket, key) = rest.split_once('/').context(usage)?;
    if bucket.is_empty() || key.is_empty() {
        bail!(usage);
    }
    Ok((bucket.into(), key.into()))
}

pub(super) fn s3_bucket(target: &str) -> Result<String> {
    let bucket = target.strip_prefix("arn:aws:s3:::").filter(|b| !b.contains('/') && !b.is_empty());
    Ok(bucket.context("S3 buckets are targeted as arn:aws:s3:::<bucket>")?.to_string())
}

/// The id in `arn:aws:ec2:<region>:<account>:<kind><id>`.
fn ec2_resource(target: &str, kind: &str) -> Result<String> {
    let usage = || format!("EC2 targets are arn:aws:ec2:<region>:<account>:{kind}<id>");
    let rest = target.strip_prefix("arn:aws:ec2:").with_context(usage)?;
    let resource = rest.splitn(3, ':').nth(2).with_context(usage)?;
    let id = resource.strip_prefix(kind).filter(|id| !id.is_empty()).with_context(usage)?;
    Ok(id.into())
}

fn iam_role(target: &str) -> Result<String> {
    let usage = "IAM roles are targeted as arn:aws:iam::<account>:role/<name>";
    let rest = target.strip_prefix("arn:aws:iam::").context(usage)?;
    let (_, role) = rest.split_once(":role/").context(usage)?;
    Ok(role.rsplit('/').next().unwrap_or(role).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::execute::aws::request::AwsOperation;

    #[test]
    fn every_listed_operation_has_a_preset_read() {
        for operation in OPERATIONS {
            let target = match operation.split(':').next() {
                _ if *operation == "s3:PutBucketPolicy" => "arn:aws:s3:::bucket",
                _ if *operation == "ec2:TerminateInstances" => "arn:aws:ec2:us-east-1:1:instance/i-1",
                Some("s3") => "arn:aws:s3:::bucket/key",
                Some("ec2") => "arn:aws:ec2:us-east-1:1:security-group/sg-1",
                _ => "arn:aws:iam::1:role/r",
            };
            precondition_read(operation, target).unwrap_or_else(|e| panic!("{operation}: {e:#}"));
        }
        assert!(precondition_read("s3:GetObject", "arn:aws:s3:::b/k").is_err(), "a read is no preset mutation");
    }

    #[test]
    fn presets_build_certified_requests_the_broker_accepts() {
        let put = request("s3:PutObject", "arn:aws:s3:::b/dir/k.json", &json!({"body": "x"})).unwrap();
        let operation = AwsOperation::parse(&put).unwrap();
        assert_eq!(operation.mutation.request.path, "/b/dir/k.json");
        assert_eq!(operation.session_policy()["Statement"][0]["Resource"], json!(["arn:aws:s3:::b/dir/k.json"]));
        assert_eq!(operation.precondition.call.action, "s3:GetObject");
        assert!(operation.postcondition.is_none());

        let rule = json!({"ip_permissions": [{"protocol": "tcp", "from_port": 443, "to_port": 443,
            "cidrs": ["10.0.0.0/8", "::/0"]}], "postcondition": true});
        let ingress =
            request("ec2:AuthorizeSecurityGroupIngress", "arn:aws:ec2:us-east-1:1:security-group/sg-1", &rule).unwrap();
        let operation = AwsOperation::parse(&ingress).unwrap();
        let body = String::from_utf8(operation.mutation.request.body.to_vec()).unwrap();
        assert!(body.contains("IpPermissions.1.IpRanges.1.CidrIp=10.0.0.0%2F8"), "{body}");
        assert!(body.contains("IpPermissions.1.Ipv6Ranges.1.CidrIpv6=%3A%3A%2F0"), "{body}");
        assert!(operation.postcondition.is_some());

        let attach = request(
            "iam:AttachRolePolicy",
            "arn:aws:iam::1:role/app",
            &json!({"policy_arn": "arn:aws:iam::1:policy/p"}),
        )
        .unwrap();
        let policy = AwsOperation::parse(&attach).unwrap().session_policy();
        assert_eq!(
            policy["Statement"][0]["Condition"],
            json!({"ArnEquals": {"iam:PolicyARN": "arn:aws:iam::1:policy/p"}})
        );
        assert_eq!(query_body(&[("Policy", r#"{"Resource": "*"}"#)]), "Policy=%7B%22Resource%22%3A%20%22%2A%22%7D");
    }

    #[test]
    fn malformed_targets_and_params_are_named() {
        let e = request("s3:PutObject", "arn:aws:s3:::bucket-only", &json!({"body": "x"})).unwrap_err();
        assert!(e.to_string().contains("arn:aws:s3:::<bucket>/<key>"), "{e}");
        let e = request("s3:PutObject", "arn:aws:s3:::b/k", &json!({})).unwrap_err();
        assert!(e.to_string().contains("params.body"), "{e}");
        let e = request("lambda:InvokeFunction", "x", &json!({})).unwrap_err();
        assert!(e.to_string().contains("not a preset"), "{e}");
    }
}
