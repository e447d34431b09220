//! Verifying a SAB certificate: a bounded bundle, strict DER extensions, the leaf's
//! profile, a path to a trusted anchor within a budget, the validity window, and the
//! embedded contract.
//!
//! rustls-webpki refuses certificates with unknown critical extensions, and the contract
//! extension must be critical, so the path is checked here with x509-parser's signature
//! verification (ring): Ed25519 and ECDSA P-256.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use x509_parser::{
    oid_registry::{
        OID_X509_EXT_AUTHORITY_KEY_IDENTIFIER, OID_X509_EXT_BASIC_CONSTRAINTS, OID_X509_EXT_EXTENDED_KEY_USAGE,
        OID_X509_EXT_KEY_USAGE, OID_X509_EXT_SUBJECT_ALT_NAME, OID_X509_EXT_SUBJECT_KEY_IDENTIFIER, Oid,
    },
    pem::Pem,
    prelude::*,
};

use super::{
    contract::{CONTRACT_OID, ExecutionContract},
    extensions::{self, Extension, ExtensionError},
    ijson::{self, NumberError, Numbers},
    path::{self, Anchor},
    profile,
};
use crate::admission::Reason;

/// The largest PEM bundle accepted, checked before anything in it is decoded.
pub const MAX_BUNDLE_BYTES: usize = 64 * 1024;
/// Intermediates accepted after the leaf; so also the longest path.
pub const MAX_INTERMEDIATES: usize = 4;

/// Trusted SAB certificate authorities, checked once when loaded.
pub struct TrustAnchors {
    anchors: Vec<Anchor>,
}

/// A verified certificate: its serial and the contract it binds.
#[derive(Debug, Clone)]
pub struct Verified {
    /// Lower-case hex of the serial number.
    pub serial: String,
    pub contract: ExecutionContract,
    pub not_after: SystemTime,
}

/// Limits on certificate lifetimes.
#[derive(Debug, Clone, Copy)]
pub struct ValidityPolicy {
    pub max_ttl: Duration,
    pub clock_skew: Duration,
}

/// A verification failure: the reason code and a sentence for people.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}: {message}")]
pub struct Rejection {
    pub reason: Reason,
    pub message: String,
}

pub(super) fn reject(reason: Reason, message: impl Into<String>) -> Rejection {
    Rejection { reason, message: message.into() }
}

impl From<ExtensionError> for Rejection {
    fn from(error: ExtensionError) -> Self {
        let reason = match error {
            ExtensionError::Certificate { .. } => Reason::MalformedCertificate,
            ExtensionError::NotDer { .. } => Reason::ExtensionNotDer,
            ExtensionError::Duplicate { .. } => Reason::DuplicateExtension,
        };
        reject(reason, error.to_string())
    }
}

impl From<NumberError> for Rejection {
    fn from(error: NumberError) -> Self {
        let reason = match error {
            NumberError::OutOfRange { .. } => Reason::NumberOutOfRange,
            NumberError::NotInteger { .. } => Reason::NumberNotInteger,
        };
        reject(reason, error.to_string())
    }
}

impl TrustAnchors {
    /// From PEM text holding one or more CA certificates, each allowed to sign
    /// certificates.
    pub fn from_pem(text: &str) -> anyhow::Result<Self> {
        let mut anchors = Vec::new();
        for pem in Pem::iter_from_buffer(text.as_bytes()) {
            let anchor = Anchor::from_der(pem?.contents)?;
            let cert = anchor.certificate();
            extensions::read(anchor.der()).map_err(|e| anyhow::anyhow!("trust anchor `{}`: {e}", cert.subject()))?;
            profile::check_issuer(cert, 0)
                .map_err(|e| anyhow::anyhow!("trust anchor `{}` cannot be an anchor: {e}", cert.subject()))?;
            anchors.push(anchor);
        }
        anyhow::ensure!(!anchors.is_empty(), "no certificate in the trust anchor file");
        Ok(Self { anchors })
    }

    /// Verify a PEM bundle (leaf first, then any intermediates) at time `now`.
    pub fn verify(&self, pem: &str, policy: ValidityPolicy, now: SystemTime) -> Result<Verified, Rejection> {
        let chain = parse_bundle(pem)?;
        let (leaf_der, intermediate_ders) =
            chain.split_first().ok_or_else(|| reject(Reason::MalformedCertificate, "no certificate given"))?;
        let leaf = parse_certificate(leaf_der, "the certificate")?;
        let leaf_extensions = extensions::read(leaf_der)?;
        let intermediates = intermediate_ders
            .iter()
            .map(|der| {
                let cert = parse_certificate(der, "an intermediate")?;
                check_critical_extensions(&extensions::read(der)?)?;
                Ok(cert)
            })
            .collect::<Result<Vec<_>, Rejection>>()?;
        profile::check_leaf(&leaf)?;
        path::build(&leaf, &intermediates, &self.anchors, asn1_time(now))?;
        check_validity(&leaf, policy, now)?;
        check_critical_extensions(&leaf_extensions)?;
        let contract = contract_of(&leaf_extensions)?;
        Ok(Verified {
            serial: hex::encode(leaf.raw_serial()),
            contract,
            not_after: UNIX_EPOCH + Duration::from_secs(leaf.validity().not_after.timestamp().max(0) as u64),
        })
    }
}

/// The bundle's certificates, DER; its size and count are checked before decoding more.
fn parse_bundle(pem: &str) -> Result<Vec<Vec<u8>>, Rejection> {
    if pem.len() > MAX_BUNDLE_BYTES {
        return Err(reject(
            Reason::BundleTooLarge,
            format!("the PEM bundle is {} bytes; at most {MAX_BUNDLE_BYTES} are accepted", pem.len()),
        ));
    }
    let mut chain = Vec::new();
    for block in Pem::iter_from_buffer(pem.as_bytes()) {
        if chain.len() > MAX_INTERMEDIATES {
            return Err(reject(
                Reason::BundleTooLarge,
                format!("the PEM bundle holds more than the leaf and {MAX_INTERMEDIATES} intermediates"),
            ));
        }
        let block = block.map_err(|e| reject(Reason::MalformedCertificate, format!("not PEM: {e}")))?;
        if block.label != "CERTIFICATE" {
            return Err(reject(Reason::MalformedCertificate, format!("unexpected PEM block `{}`", block.label)));
        }
        chain.push(block.contents);
    }
    if chain.is_empty() {
        return Err(reject(Reason::MalformedCertificate, "no PEM certificate found"));
    }
    Ok(chain)
}

fn parse_certificate<'a>(der: &'a [u8], what: &str) -> Result<X509Certificate<'a>, Rejection> {
    match X509Certificate::from_der(der) {
        Ok(([], cert)) => Ok(cert),
        Ok((rest, _)) => {
            Err(reject(Reason::MalformedCertificate, format!("{what} is followed by {} stray bytes", rest.len())))
        }
        Err(e) => Err(reject(Reason::MalformedCertificate, format!("{what} is not an X.509 certificate: {e}"))),
    }
}

fn check_validity(leaf: &X509Certificate<'_>, policy: ValidityPolicy, now: SystemTime) -> Result<(), Rejection> {
    let now_s = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs() as i64;
    let skew = policy.clock_skew.as_secs() as i64;
    let (not_before, not_after) = (leaf.validity().not_before.timestamp(), leaf.validity().not_after.timestamp());
    if now_s + skew < not_before {
        return Err(reject(
            Reason::NotYetValid,
            format!("valid from {} (now {})", leaf.validity().not_before, asn1_time(now)),
        ));
    }
    if now_s - skew > not_after {
        return Err(reject(Reason::Expired, format!("expired at {}", leaf.validity().not_after)));
    }
    let ttl = not_after - not_before;
    if ttl > policy.max_ttl.as_secs() as i64 {
        return Err(reject(
            Reason::TtlExceedsMaximum,
            format!("valid for {ttl} s; the broker accepts at most {} s", policy.max_ttl.as_secs()),
        ));
    }
    Ok(())
}

/// Critical extensions the broker understands; any other one means the certificate
/// asks for semantics the broker would ignore, so it is refused.
fn check_critical_extensions(extensions: &[Extension<'_>]) -> Result<(), Rejection> {
    let contract = Oid::from(CONTRACT_OID).expect("valid OID");
    let known = [
        &OID_X509_EXT_BASIC_CONSTRAINTS,
        &OID_X509_EXT_KEY_USAGE,
        &OID_X509_EXT_EXTENDED_KEY_USAGE,
        &OID_X509_EXT_SUBJECT_ALT_NAME,
        &OID_X509_EXT_SUBJECT_KEY_IDENTIFIER,
        &OID_X509_EXT_AUTHORITY_KEY_IDENTIFIER,
        &contract,
    ];
    for ext in extensions {
        if ext.critical && !known.iter().any(|oid| oid.as_bytes() == ext.oid) {
            return Err(reject(
                Reason::UnsupportedCriticalExtension,
                format!("critical extension {} is not understood", ext.oid()),
            ));
        }
    }
    Ok(())
}

/// The contract among a leaf's `extensions`: the one contract extension, critical, a
/// strict DER UTF8String, I-JSON numbers, a valid contract in canonical form, naming an
/// agent.
pub fn contract_of(extensions: &[Extension<'_>]) -> Result<ExecutionContract, Rejection> {
    let oid = Oid::from(CONTRACT_OID).expect("valid OID");
    let ext = extensions
        .iter()
        .find(|ext| ext.oid == oid.as_bytes())
        .ok_or_else(|| reject(Reason::MissingContract, "the certificate carries no execution contract"))?;
    if !ext.critical {
        return Err(reject(Reason::MalformedContract, "the contract extension must be critical"));
    }
    let text = extensions::utf8_string(ext.value).map_err(|detail| {
        reject(
            Reason::ExtensionNotDer,
            format!("the contract extension's value is not a strict DER UTF8String: {detail}"),
        )
    })?;
    let contract = match serde_json::from_str::<ExecutionContract>(text) {
        // The usual case: one pass, straight into the contract, then its numbers.
        Ok(contract) => {
            contract.check_numbers()?;
            contract
        }
        // Otherwise the JSON value, checked step by step, names what is wrong.
        Err(_) => contract_from_value(text)?,
    };
    if !contract.is_in_canonical_form(text) {
        return Err(reject(Reason::MalformedContract, "the contract is not in RFC 8785 canonical form"));
    }
    if !contract.agent.binds_a_caller() {
        return Err(reject(
            Reason::MalformedContract,
            "the contract binds no caller: its agent names none of uid, exe, cgroup (other than `/`), pod_uid",
        ));
    }
    Ok(contract)
}

/// The contract in `text` through a JSON value: whether it is JSON, then its numbers
/// (I-JSON, integers), then its fields; the first that fails is the rejection.
fn contract_from_value(text: &str) -> Result<ExecutionContract, Rejection> {
    let value: serde_json::Value = serde_json::from_str(text)
        .map_err(|e| reject(Reason::MalformedContract, format!("the contract is not JSON: {e}")))?;
    ijson::check(&value, Numbers::Integers, "contract")?;
    serde_json::from_value(value)
        .map_err(|e| reject(Reason::MalformedContract, format!("the contract is not valid: {e}")))
}

fn asn1_time(now: SystemTime) -> ASN1Time {
    let secs = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs() as i64;
    ASN1Time::from_timestamp(secs).unwrap_or_else(|_| ASN1Time::now())
}

#[cfg(test)]
mod tests {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, KeyUsagePurpose};

    use super::*;

    fn anchor_pem(is_ca: IsCa, key_usages: Vec<KeyUsagePurpose>) -> String {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = is_ca;
        params.key_usages = key_usages;
        params.self_signed(&KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap()).unwrap().pem()
    }

    #[test]
    fn an_anchor_must_be_a_ca_allowed_to_sign_certificates() {
        let ca = IsCa::Ca(BasicConstraints::Constrained(0));
        assert!(TrustAnchors::from_pem(&anchor_pem(ca, vec![KeyUsagePurpose::KeyCertSign])).is_ok());
        let not_ca = TrustAnchors::from_pem(&anchor_pem(IsCa::NoCa, vec![KeyUsagePurpose::KeyCertSign]));
        assert!(format!("{:#}", not_ca.err().unwrap()).contains("is not a CA"));
        let no_usage = TrustAnchors::from_pem(&anchor_pem(ca, vec![KeyUsagePurpose::DigitalSignature]));
        assert!(format!("{:#}", no_usage.err().unwrap()).contains("keyCertSign"));
    }

    fn contract() -> ExecutionContract {
        serde_json::from_value(serde_json::json!({
            "contract_id": "c-1", "agent": {"uid": 0}, "provider": "aws", "operation": "s3:PutObject",
            "target": "arn:aws:s3:::b/k", "request_digest": "sha256:00", "precondition": "sha256:00",
            "policy_epoch": 1, "revocation_epoch": 1, "evidence_digest": "sha256:00",
            "identity": {"kind": "aws_role", "role_arn": "arn:aws:iam::1:role/r"}
        }))
        .unwrap()
    }

    /// The anchor's key is decoded once, when loaded: each verification must still check
    /// the signature against that anchor's key, of either algorithm, and no other.
    #[test]
    fn a_loaded_anchor_verifies_its_own_leaves_and_not_those_of_a_namesake() {
        use crate::cert::dev_sab::{self, Algorithm, IssueOptions};
        let dir = tempfile::tempdir().unwrap();
        let policy = ValidityPolicy { max_ttl: Duration::from_secs(3600), clock_skew: Duration::from_secs(60) };
        for algorithm in [Algorithm::Ed25519, Algorithm::P256] {
            let options = IssueOptions { algorithm, ..IssueOptions::default() };
            let ours = dev_sab::create_ca(&dir.path().join(format!("{algorithm:?}-ours")), "SAB", algorithm).unwrap();
            let theirs =
                dev_sab::create_ca(&dir.path().join(format!("{algorithm:?}-theirs")), "SAB", algorithm).unwrap();
            let anchors = TrustAnchors::from_pem(&std::fs::read_to_string(&ours.cert).unwrap()).unwrap();
            for _ in 0..2 {
                let leaf = dev_sab::issue(&ours, &contract(), &options).unwrap();
                let verified = anchors.verify(&leaf, policy, SystemTime::now());
                assert!(verified.is_ok(), "{algorithm:?}: {verified:?}");
                let forged = dev_sab::issue(&theirs, &contract(), &options).unwrap();
                let refused = anchors.verify(&forged, policy, SystemTime::now()).unwrap_err();
                assert_eq!(refused.reason, Reason::UntrustedIssuer, "{algorithm:?}: {refused}");
            }
        }
    }
}
