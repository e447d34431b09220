//! The execution contract a SAB certificate binds, and the mutation request it binds.
//!
//! Both are hashed and embedded as RFC 8785 (JCS) canonical JSON, so the same content
//! always has the same bytes and the same digest, whoever serialised it.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::ijson::{self, NumberError, Numbers};

/// OID of the certificate extension holding the contract, under the UUID arc 2.25
/// (ITU-T X.667, no registration needed): the integer value of UUID
/// 00000000-0000-0000-7240-78fd9dd48203, random in its low 63 bits so that certificate tooling
/// with 64-bit arcs can encode it. Its value is a DER UTF8String with the contract's
/// canonical JSON. The extension must be marked critical.
pub const CONTRACT_OID: &[u64] = &[2, 25, 8232713149503275523];
pub const CONTRACT_OID_TEXT: &str = "2.25.8232713149503275523";

/// Extended key usage a SAB leaf must carry: "binds an execution contract for the seb
/// broker", the first arc under the contract OID. A certificate issued for anything else by
/// the same CA (a TLS server, a client) is thereby not a SAB certificate.
pub const SAB_EKU_OID: &[u64] = &[2, 25, 8232713149503275523, 1];
pub const SAB_EKU_OID_TEXT: &str = "2.25.8232713149503275523.1";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    Kubernetes,
    Aws,
    Http,
}

impl Provider {
    /// The name used on the wire and in contracts.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Kubernetes => "kubernetes",
            Self::Aws => "aws",
            Self::Http => "http",
        }
    }
}

impl std::fmt::Display for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What an agent asks the broker to do.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MutationRequest {
    pub provider: Provider,
    /// Provider operation, e.g. `s3:PutObject`, `patch`, `POST`.
    pub operation: String,
    /// The exact target: an ARN, a Kubernetes object path, a URL.
    pub target: String,
    /// Operation parameters (the object body, the patch, ...).
    #[serde(default)]
    pub params: serde_json::Value,
}

impl MutationRequest {
    /// `sha256:<hex>` of the request's canonical JSON. Exact only for a request whose
    /// numbers pass [`Self::check_numbers`].
    pub fn digest(&self) -> String {
        digest_of(self)
    }

    /// `params.precondition`: how the target's state is read, for providers whose
    /// requests say (AWS); others read a target from its name alone.
    pub fn state_read(&self) -> Option<&serde_json::Value> {
        self.params.get("precondition")
    }

    /// Every number in the parameters is within the I-JSON range, so the digest names
    /// exactly this request.
    pub fn check_numbers(&self) -> Result<(), NumberError> {
        ijson::check(&self.params, Numbers::Any, "params")
    }
}

/// Who may present the certificate. Every field given must match the caller. Fields in
/// canonical order (see [`ExecutionContract::is_in_canonical_form`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentIdentity {
    /// The caller's cgroup v2 path (relative to the mount), or an ancestor of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<String>,
    /// Absolute path of the caller's executable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exe: Option<String>,
    /// The node whose broker may admit it (cluster mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// The Kubernetes pod UID the caller runs in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
}

impl AgentIdentity {
    /// Whether it names the caller at all: `node` only says where, and the root cgroup
    /// holds every process, so a contract naming nothing else would serve any process.
    pub fn binds_a_caller(&self) -> bool {
        let cgroup = self.cgroup.as_deref().is_some_and(|cgroup| !cgroup.trim_matches('/').is_empty());
        self.uid.is_some() || self.exe.is_some() || cgroup || self.pod_uid.is_some()
    }
}

/// The identity the broker mints to execute the mutation. `kind` comes first, then each
/// variant's fields in canonical order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum ScopedIdentity {
    /// STS AssumeRole with a session policy for exactly this mutation.
    AwsRole { role_arn: String },
    /// A TokenRequest token for this ServiceAccount.
    KubernetesServiceAccount { name: String, namespace: String },
    /// A short-lived client certificate from the broker's issuing CA.
    X509Client { subject: String },
}

impl ScopedIdentity {
    /// The identity's kind, as contracts name it.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::AwsRole { .. } => "aws_role",
            Self::KubernetesServiceAccount { .. } => "kubernetes_service_account",
            Self::X509Client { .. } => "x509_client",
        }
    }
}

/// The execution contract. Fields in canonical order (see [`Self::is_in_canonical_form`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecutionContract {
    pub agent: AgentIdentity,
    pub contract_id: String,
    /// `sha256:<hex>` of the evidence the SAB assessed.
    pub evidence_digest: String,
    pub identity: ScopedIdentity,
    pub operation: String,
    pub policy_epoch: u64,
    /// `sha256:<hex>` of the certified live state of the target (checked for drift).
    pub precondition: String,
    pub provider: Provider,
    /// `sha256:<hex>` of the certified request's canonical JSON.
    pub request_digest: String,
    pub revocation_epoch: u64,
    pub target: String,
}

impl ExecutionContract {
    /// Bind exactly this request: provider, operation, target and digest.
    pub fn bind_request(&mut self, request: &MutationRequest) {
        self.provider = request.provider;
        self.operation = request.operation.clone();
        self.target = request.target.clone();
        self.request_digest = request.digest();
    }

    /// RFC 8785 canonical JSON: the bytes embedded in the certificate.
    pub fn canonical_json(&self) -> String {
        canonical_json(self)
    }

    /// Whether `text`, which this contract was read from, is its canonical JSON. Once
    /// [`Self::check_numbers`] has passed, the contract holds only strings, integers in
    /// the I-JSON range and objects whose keys are declared in canonical (UTF-16 code
    /// unit) order; for such a value serde_json's compact output is RFC 8785's, so one
    /// plain serialisation decides (a property test holds it to `serde_jcs`). This runs
    /// for every admission, where `serde_jcs` (which re-parses each key) cost about 8% of
    /// the broker's CPU.
    pub fn is_in_canonical_form(&self, text: &str) -> bool {
        serde_json::to_string(self).is_ok_and(|json| json == text)
    }

    /// Every number (uid, epochs) is an integer within the I-JSON range: the same check,
    /// and error, as on the contract's JSON, field by field in its order.
    pub fn check_numbers(&self) -> Result<(), NumberError> {
        if let Some(uid) = self.agent.uid {
            ijson::check_integer(uid.into(), "contract.agent.uid")?;
        }
        ijson::check_integer(self.policy_epoch, "contract.policy_epoch")?;
        ijson::check_integer(self.revocation_epoch, "contract.revocation_epoch")
    }
}

pub fn canonical_json<T: Serialize>(value: &T) -> String {
    serde_jcs::to_string(value).expect("contract types serialise to JSON")
}

/// `sha256:<hex>` of a value's canonical JSON.
pub fn digest_of<T: Serialize>(value: &T) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(canonical_json(value).as_bytes())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_digest_ignores_key_order_and_whitespace() {
        let a: MutationRequest = serde_json::from_str(
            r#"{"provider":"aws","operation":"s3:PutObject","target":"arn:aws:s3:::b/k","params":{"body":"x","acl":"private"}}"#,
        )
        .unwrap();
        let b: MutationRequest = serde_json::from_str(
            r#"{ "params": {"acl": "private", "body": "x"}, "target": "arn:aws:s3:::b/k",
                 "operation": "s3:PutObject", "provider": "aws" }"#,
        )
        .unwrap();
        assert_eq!(a.digest(), b.digest());
        let mut c = a.clone();
        c.params["body"] = "y".into();
        assert_ne!(a.digest(), c.digest());
    }

    /// `check_numbers` reads the numeric fields directly: it must find what the walk over
    /// the contract's JSON finds, and every number in that JSON must be one it reads.
    #[test]
    fn a_contract_s_numbers_are_checked_as_its_json_would_be() {
        let mut contract: ExecutionContract = serde_json::from_value(serde_json::json!({
            "contract_id": "c-1", "agent": {"uid": 0}, "provider": "aws", "operation": "s3:PutObject",
            "target": "arn:aws:s3:::b/k", "request_digest": "sha256:00", "precondition": "sha256:00",
            "policy_epoch": 1, "revocation_epoch": 1, "evidence_digest": "sha256:00",
            "identity": {"kind": "aws_role", "role_arn": "arn:aws:iam::1:role/r"}
        }))
        .unwrap();
        let max = ijson::MAX_SAFE_INTEGER;
        for (uid, policy, revocation) in
            [(Some(u32::MAX), max, max), (None, max + 1, 1), (Some(0), 1, max + 1), (Some(7), u64::MAX, u64::MAX)]
        {
            (contract.agent.uid, contract.policy_epoch, contract.revocation_epoch) = (uid, policy, revocation);
            let walked = ijson::check(&serde_json::to_value(&contract).unwrap(), Numbers::Integers, "contract");
            assert_eq!(contract.check_numbers(), walked, "{uid:?} {policy} {revocation}");
        }

        fn numbers(value: &serde_json::Value, path: String, found: &mut Vec<String>) {
            match value {
                serde_json::Value::Number(_) => found.push(path),
                serde_json::Value::Object(fields) => {
                    fields.iter().for_each(|(key, item)| numbers(item, format!("{path}.{key}"), found))
                }
                _ => {}
            }
        }
        let mut found = Vec::new();
        numbers(&serde_json::to_value(&contract).unwrap(), "contract".into(), &mut found);
        found.sort();
        assert_eq!(found, ["contract.agent.uid", "contract.policy_epoch", "contract.revocation_epoch"]);
    }

    /// Any string: ASCII, control characters, quotes and backslashes, any Unicode scalar.
    fn any_text() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        prop_oneof![".*", "[\\x00-\\x1f\"\\\\a-z\\x7f]{0,12}", any::<String>()]
    }

    fn any_contract() -> impl proptest::strategy::Strategy<Value = ExecutionContract> {
        use proptest::prelude::*;
        let integer = 0..=ijson::MAX_SAFE_INTEGER;
        let agent = (
            proptest::option::of(any_text()),
            proptest::option::of(any_text()),
            proptest::option::of(any_text()),
            proptest::option::of(any_text()),
            proptest::option::of(any::<u32>()),
        )
            .prop_map(|(cgroup, exe, node, pod_uid, uid)| AgentIdentity { cgroup, exe, node, pod_uid, uid });
        let identity = prop_oneof![
            any_text().prop_map(|role_arn| ScopedIdentity::AwsRole { role_arn }),
            (any_text(), any_text())
                .prop_map(|(name, namespace)| ScopedIdentity::KubernetesServiceAccount { name, namespace }),
            any_text().prop_map(|subject| ScopedIdentity::X509Client { subject }),
        ];
        let provider = prop_oneof![Just(Provider::Aws), Just(Provider::Kubernetes), Just(Provider::Http)];
        (
            (agent, any_text(), any_text(), identity, any_text()),
            (integer.clone(), any_text(), provider, any_text(), integer, any_text()),
        )
            .prop_map(
                |(
                    (agent, contract_id, evidence_digest, identity, operation),
                    (policy_epoch, precondition, provider, request_digest, revocation_epoch, target),
                )| ExecutionContract {
                    agent,
                    contract_id,
                    evidence_digest,
                    identity,
                    operation,
                    policy_epoch,
                    precondition,
                    provider,
                    request_digest,
                    revocation_epoch,
                    target,
                },
            )
    }

    proptest::proptest! {
        /// The admission's canonical-form check is RFC 8785's, as `serde_jcs` writes it,
        /// on any contract whose numbers pass the I-JSON check: its own form passes, and
        /// that form with anything changed (a key out of order, a space, an escape
        /// written another way) fails.
        #[test]
        fn the_canonical_form_check_is_rfc_8785s(contract in any_contract()) {
            let canonical = contract.canonical_json();
            proptest::prop_assert!(contract.is_in_canonical_form(&canonical), "{}", canonical);
            let spaced = canonical.replacen(':', ": ", 1);
            proptest::prop_assert!(!contract.is_in_canonical_form(&spaced));
            let value: serde_json::Value = serde_json::from_str(&canonical).unwrap();
            let pretty = serde_json::to_string_pretty(&value).unwrap();
            proptest::prop_assert!(!contract.is_in_canonical_form(&pretty));
        }
    }

    #[test]
    fn a_contract_out_of_canonical_order_or_escaped_otherwise_is_not_canonical() {
        let contract = ExecutionContract {
            agent: AgentIdentity { uid: Some(7), exe: Some("/bin/é\u{1f}".into()), ..AgentIdentity::default() },
            contract_id: "c".into(),
            evidence_digest: "e".into(),
            identity: ScopedIdentity::KubernetesServiceAccount { name: "n".into(), namespace: "ns".into() },
            operation: "o".into(),
            policy_epoch: 1,
            precondition: "p".into(),
            provider: Provider::Kubernetes,
            request_digest: "r".into(),
            revocation_epoch: 2,
            target: "t".into(),
        };
        let canonical = contract.canonical_json();
        assert!(contract.is_in_canonical_form(&canonical));
        let swapped = canonical.replace(r#""name":"n","namespace":"ns""#, r#""namespace":"ns","name":"n""#);
        assert_ne!(swapped, canonical);
        assert!(!contract.is_in_canonical_form(&swapped));
        let escaped = canonical.replace('é', "\\u00e9");
        assert_ne!(escaped, canonical);
        assert!(!contract.is_in_canonical_form(&escaped));
        let upper_hex = canonical.replace("\\u001f", "\\u001F");
        assert_ne!(upper_hex, canonical);
        assert!(!contract.is_in_canonical_form(&upper_hex));
    }

    #[test]
    fn canonical_json_sorts_keys() {
        let value = serde_json::json!({"b": 1, "a": [true, null], "c": "é"});
        assert_eq!(canonical_json(&value), r#"{"a":[true,null],"b":1,"c":"é"}"#);
    }
}
