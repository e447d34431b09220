//! Read-only passthrough: reads named in config go through the broker with a read-only
//! identity and no certificate, so agents need no direct API access at all. Every read
//! is an audit record. The answer carries the target's canonical state digest, which is
//! what a SAB certifies as a contract's precondition.

use anyhow::{Context, Result, bail, ensure};
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::{
    Executors,
    aws::{
        preset,
        request::{self, CertifiedRead, ReadOrigin, StateRead},
    },
    https::{is_under, target_url},
    kubernetes::{KubeTarget, canonical_state},
};
use crate::cert::{MutationRequest, Provider, contract::digest_of};

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PassthroughConfig {
    /// Role assumed (with a read-only session policy) for AWS reads.
    #[serde(default)]
    pub aws_role_arn: Option<String>,
    /// AWS reads allowed, by IAM action (e.g. `s3:GetObject`, `dynamodb:GetItem`).
    #[serde(default)]
    pub aws_operations: Vec<String>,
    /// Subject of the client certificates minted for HTTPS reads.
    #[serde(default)]
    pub http_subject: Option<String>,
    /// URL prefixes HTTPS reads (GET) may address.
    #[serde(default)]
    pub http_prefixes: Vec<String>,
    /// `<namespace>/<name>` of the read-only ServiceAccount a Kubernetes read mints a
    /// bound token for (its RBAC decides what it may get); the token dies after the read.
    #[serde(default)]
    pub kubernetes_reader: Option<String>,
    /// Credentials minted for reads in each second, in all and for one caller uid (each
    /// read mints one: an STS session, a token, a client certificate).
    #[serde(default = "default_mints_per_second")]
    pub mints_per_second: u32,
    #[serde(default = "default_mints_per_uid_per_second")]
    pub mints_per_uid_per_second: u32,
}

impl Default for PassthroughConfig {
    fn default() -> Self {
        Self {
            aws_role_arn: None,
            aws_operations: Vec::new(),
            http_subject: None,
            http_prefixes: Vec::new(),
            kubernetes_reader: None,
            mints_per_second: default_mints_per_second(),
            mints_per_uid_per_second: default_mints_per_uid_per_second(),
        }
    }
}

fn default_mints_per_second() -> u32 {
    50
}

fn default_mints_per_uid_per_second() -> u32 {
    20
}

/// What a read returned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadResult {
    pub status: u16,
    /// The response body, when it is UTF-8.
    pub body: Option<String>,
    /// Otherwise its bytes, hex-encoded.
    pub body_hex: Option<String>,
    /// Digest of the target's canonical state (for preconditions).
    pub state_digest: String,
}

/// Each AWS passthrough read, and the mutations whose live state (the state their drift
/// check digests) it reads.
const AWS_READS: &[(&str, &[&str])] = &[
    ("s3:GetObject", &["s3:PutObject", "s3:DeleteObject"]),
    ("s3:GetBucketPolicy", &["s3:PutBucketPolicy"]),
    (
        "ec2:DescribeSecurityGroups",
        &[
            "ec2:AuthorizeSecurityGroupIngress",
            "ec2:RevokeSecurityGroupIngress",
            "ec2:AuthorizeSecurityGroupEgress",
            "ec2:RevokeSecurityGroupEgress",
        ],
    ),
    ("ec2:DescribeInstances", &["ec2:TerminateInstances"]),
    ("iam:ListAttachedRolePolicies", &["iam:AttachRolePolicy", "iam:DetachRolePolicy"]),
];

/// The passthrough read of `mutation`'s target whose digest is the mutation's
/// precondition: what an agent reads before asking the SAB to certify it.
pub fn state_read_for(mutation: &MutationRequest) -> Result<MutationRequest> {
    let operation = match mutation.provider {
        Provider::Aws => AWS_READS
            .iter()
            .find(|(_, mutations)| mutations.contains(&mutation.operation.as_str()))
            .map(|(read, _)| *read)
            .with_context(|| format!("no live-state read is known for `{}`", mutation.operation))?,
        Provider::Http => "GET",
        Provider::Kubernetes => "get",
    };
    Ok(MutationRequest {
        provider: mutation.provider,
        operation: operation.into(),
        target: mutation.target.clone(),
        params: serde_json::Value::Null,
    })
}

/// `may_mint` is asked right before a credential is minted, once the read is known to be
/// one this broker serves (the caller's rate of mints is bounded there).
pub async fn read(
    config: &PassthroughConfig,
    executors: &Executors,
    request: &MutationRequest,
    read_id: &str,
    may_mint: impl FnOnce() -> Result<()>,
) -> Result<ReadResult> {
    match request.provider {
        Provider::Aws => {
            if !config.aws_operations.contains(&request.operation) {
                bail!("`{}` is not a passthrough read on this broker (passthrough.aws_operations)", request.operation);
            }
            request::ensure_exact_arn(&request.target)?;
            // A full read, as a precondition certifies it, or a preset read by name (the
            // broker's own, which may need `*`: EC2's Describe calls take no resource).
            let (read, origin): (CertifiedRead, _) = if request.params.is_null() {
                (preset::read(&request.operation, &request.target)?, ReadOrigin::Preset)
            } else {
                // The caller's session reads the target the record names, nothing beside it.
                (
                    serde_json::from_value(request.params.clone()).context("params is a certified read")?,
                    ReadOrigin::Agent,
                )
            };
            if read.action != request.operation {
                bail!("the read performs {}, the request names {}", read.action, request.operation);
            }
            let read = StateRead::new(&read, &request.target, origin)?;
            let role = config.aws_role_arn.as_deref().context("passthrough.aws_role_arn is not set")?;
            let executor = executors.aws.as_ref().context("this broker has no AWS executor")?;
            may_mint()?;
            let session = executor.mint(role, read_id, Some(&read.policy())).await?;
            let response = executor.call(&read.call, &session.credentials).await?;
            let digest = read.digest(&response)?;
            result(response.status().as_u16(), response.body(), digest)
        }
        Provider::Http => {
            let url = target_url(&request.target)?;
            if request.operation != "GET"
                || !config.http_prefixes.iter().any(|prefix| is_under(&request.target, prefix))
            {
                bail!("only GET under passthrough.http_prefixes is a passthrough read on this broker");
            }
            let subject = config.http_subject.as_deref().context("passthrough.http_subject is not set")?;
            let executor = executors.https.as_ref().context("this broker has no HTTPS executor")?;
            may_mint()?;
            let session = executor.mint(subject, read_id)?;
            let (status, body, digest) = executor.get(&url, &session).await?;
            result(status, &body, digest)
        }
        Provider::Kubernetes => {
            if request.operation != "get" {
                bail!("only `get` is a Kubernetes passthrough read, not `{}`", request.operation);
            }
            let reader = config.kubernetes_reader.as_deref().context("passthrough.kubernetes_reader is not set")?;
            let (namespace, service_account) =
                reader.split_once('/').context("passthrough.kubernetes_reader is <namespace>/<ServiceAccount name>")?;
            let target = KubeTarget::parse(&request.target)?;
            // A read needs no certificate: a Secret's values (a token Secret's
            // non-expiring token), in its body, its annotations (kubectl's
            // last-applied-configuration) or its digest (which lets a caller test guesses
            // of them), would reach any caller of the socket, and a model's context.
            if target.is_core_secret() {
                bail!("a core Secret is not a passthrough read: its values are not for callers of the broker socket");
            }
            let executor = executors.kubernetes.as_ref().context("this broker has no Kubernetes executor")?;
            may_mint()?;
            let (_, object) = executor.read_with_fresh_token(namespace, service_account, &target, read_id).await?;
            let state_digest = digest_of(&canonical_state(object.as_ref()));
            match object {
                Some(object) => result(200, &Bytes::from(serde_json::to_vec(&object)?), state_digest),
                None => Ok(ReadResult { status: 404, body: None, body_hex: None, state_digest }),
            }
        }
    }
}

/// How long one passthrough read may take, minting included: reads hold one of a few
/// places (`server::read_gate`), and a server that stalls mid-body would hold it.
pub const READ_DEADLINE: std::time::Duration = std::time::Duration::from_secs(60);

/// What a read's body may take in its reply, as JSON text: a reply is one message of at
/// most `MAX_MESSAGE`, and the rest of it (status, digest, framing) is small.
const REPLY_BODY: usize = crate::protocol::MAX_MESSAGE - 4096;

fn result(status: u16, body: &Bytes, state_digest: String) -> Result<ReadResult> {
    let text = std::str::from_utf8(body).ok();
    // Counted before anything is copied: escaped, a body of control characters is six
    // times its size.
    let in_reply = text.map_or(2 * body.len(), json_string_len);
    ensure!(
        in_reply <= REPLY_BODY,
        "the answer's body takes {in_reply} bytes in a reply, more than one carries ({REPLY_BODY}); read a narrower target"
    );
    Ok(match text {
        Some(text) => ReadResult { status, body: Some(text.to_string()), body_hex: None, state_digest },
        None => ReadResult { status, body: None, body_hex: Some(hex::encode(body)), state_digest },
    })
}

/// The length of `text` as a JSON string's contents, as serde_json escapes it.
fn json_string_len(text: &str) -> usize {
    text.bytes()
        .map(|b| match b {
            b'"' | b'\\' | b'\n' | b'\r' | b'\t' | 0x08 | 0x0c => 2,
            0..0x20 => 6,
            _ => 1,
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_core_secret_is_no_passthrough_read_but_a_lookalike_kind_is_judged_as_any() {
        let config: PassthroughConfig =
            serde_json::from_value(serde_json::json!({"kubernetes_reader": "seb-system/reader"})).unwrap();
        let executors = Executors::default();
        let read = |target: &str| {
            let request: MutationRequest = serde_json::from_value(
                serde_json::json!({"provider": "kubernetes", "operation": "get", "target": target}),
            )
            .unwrap();
            let (config, executors) = (&config, &executors);
            async move {
                let minted = std::cell::Cell::new(false);
                let error = read(config, executors, &request, "r", || {
                    minted.set(true);
                    Ok(())
                })
                .await
                .unwrap_err();
                (format!("{error:#}"), minted.get())
            }
        };
        let (secret, minted) = read("v1/Secret/prod/db").await;
        assert!(secret.contains("a core Secret is not a passthrough read") && !minted, "{secret}");
        // Another group's kind named Secret is not the core Secret: it goes on (here, to the
        // missing executor).
        let (lookalike, _) = read("example.com/v1/Secret/prod/db").await;
        assert!(lookalike.contains("no Kubernetes executor"), "{lookalike}");
    }

    proptest::proptest! {
        /// The reply-size count is what serde_json writes.
        #[test]
        fn a_body_is_counted_as_serde_json_escapes_it(text in "(?s).{0,64}", controls in proptest::collection::vec(0u8..0x20, 0..8)) {
            let text = format!("{text}{}", String::from_utf8(controls).unwrap());
            proptest::prop_assert_eq!(json_string_len(&text) + 2, serde_json::to_string(&text).unwrap().len());
        }
    }

    #[test]
    fn a_body_that_no_reply_carries_is_refused_before_it_is_copied() {
        let fits = Bytes::from(vec![b'a'; REPLY_BODY]);
        assert_eq!(result(200, &fits, "d".into()).unwrap().body.unwrap().len(), REPLY_BODY);
        // A sixth of the size, six times as large escaped.
        let controls = Bytes::from(vec![1u8; REPLY_BODY / 6 + 1]);
        let e = format!("{:#}", result(200, &controls, "d".into()).unwrap_err());
        assert!(e.contains("more than one carries"), "{e}");
        // Not UTF-8: sent in hex, twice its size.
        let binary = Bytes::from(vec![0xffu8; REPLY_BODY / 2 + 1]);
        assert!(result(200, &binary, "d".into()).is_err());
    }

    fn request(provider: &str, operation: &str) -> MutationRequest {
        serde_json::from_value(serde_json::json!({
            "provider": provider, "operation": operation, "target": "arn:aws:s3:::b/k", "params": {"body": "x"}
        }))
        .unwrap()
    }

    #[tokio::test]
    async fn a_passthrough_read_names_one_exact_resource() {
        let config = PassthroughConfig { aws_operations: vec!["s3:GetObject".into()], ..Default::default() };
        for target in ["arn:aws:s3:::b/*", "arn:aws:s3:::b/k?", "arn:aws:s3:::${aws:username}/k"] {
            let request: MutationRequest = serde_json::from_value(serde_json::json!({
                "provider": "aws", "operation": "s3:GetObject", "target": target}))
            .unwrap();
            let error =
                format!("{:#}", read(&config, &Executors::default(), &request, "r-1", || Ok(())).await.unwrap_err());
            assert!(error.contains("is not one exact ARN"), "{target}: {error}");
        }
    }

    #[test]
    fn each_mutation_is_read_by_the_read_that_shows_its_live_state() {
        for (mutation, read) in [
            ("s3:PutObject", "s3:GetObject"),
            ("s3:DeleteObject", "s3:GetObject"),
            ("s3:PutBucketPolicy", "s3:GetBucketPolicy"),
            ("ec2:RevokeSecurityGroupEgress", "ec2:DescribeSecurityGroups"),
            ("ec2:TerminateInstances", "ec2:DescribeInstances"),
            ("iam:DetachRolePolicy", "iam:ListAttachedRolePolicies"),
        ] {
            let state_read = state_read_for(&request("aws", mutation)).unwrap();
            assert_eq!((state_read.operation.as_str(), state_read.target.as_str()), (read, "arn:aws:s3:::b/k"));
            assert_eq!(state_read.params, serde_json::Value::Null, "a read carries no parameters");
            // And the broker has that read as a preset, so a null-params read is served.
            let target = match read {
                "s3:GetObject" => "arn:aws:s3:::b/k",
                "s3:GetBucketPolicy" => "arn:aws:s3:::b",
                "ec2:DescribeSecurityGroups" => "arn:aws:ec2:us-east-1:123456789012:security-group/sg-1",
                "ec2:DescribeInstances" => "arn:aws:ec2:us-east-1:123456789012:instance/i-1",
                _ => "arn:aws:iam::123456789012:role/r",
            };
            if let Err(e) = preset::read(read, target) {
                panic!("{read} has no preset: {e:#}");
            }
        }
        assert_eq!(state_read_for(&request("http", "PUT")).unwrap().operation, "GET");
        let unknown = state_read_for(&request("aws", "s3:CreateBucket")).unwrap_err().to_string();
        assert!(unknown.contains("s3:CreateBucket"), "{unknown}");
        assert_eq!(state_read_for(&request("kubernetes", "patch")).unwrap().operation, "get");
    }
}
