//! Verifying a SAB certificate: chain to a trusted anchor, validity window, extensions,
//! and the embedded contract.
//!
//! rustls-webpki refuses certificates with unknown critical extensions, and the contract
//! extension must be critical, so the chain is checked here with x509-parser's signature
//! verification (ring): Ed25519 and ECDSA P-256.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use x509_parser::{
    der_parser::asn1_rs::{FromDer, Utf8String},
    oid_registry::{
        OID_X509_EXT_AUTHORITY_KEY_IDENTIFIER, OID_X509_EXT_BASIC_CONSTRAINTS, OID_X509_EXT_EXTENDED_KEY_USAGE,
        OID_X509_EXT_KEY_USAGE, OID_X509_EXT_SUBJECT_ALT_NAME, OID_X509_EXT_SUBJECT_KEY_IDENTIFIER, Oid,
    },
    pem::Pem,
    prelude::*,
};

use super::contract::{CONTRACT_OID, ExecutionContract};
use crate::admission::Reason;

/// Trusted SAB certificate authorities, parsed once.
pub struct TrustAnchors {
    ders: Vec<Vec<u8>>,
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

fn reject(reason: Reason, message: impl Into<String>) -> Rejection {
    Rejection { reason, message: message.into() }
}

impl TrustAnchors {
    /// From PEM text holding one or more CA certificates.
    pub fn from_pem(text: &str) -> anyhow::Result<Self> {
        let mut ders = Vec::new();
        for pem in Pem::iter_from_buffer(text.as_bytes()) {
            let pem = pem?;
            let (_, cert) = X509Certificate::from_der(&pem.contents)?;
            anyhow::ensure!(cert.is_ca(), "trust anchor `{}` is not a CA certificate", cert.subject());
            ders.push(pem.contents);
        }
        anyhow::ensure!(!ders.is_empty(), "no certificate in the trust anchor file");
        Ok(Self { ders })
    }

    /// Verify a PEM bundle (leaf first, then any intermediates) at time `now`.
    pub fn verify(&self, pem: &str, policy: ValidityPolicy, now: SystemTime) -> Result<Verified, Rejection> {
        let chain = parse_bundle(pem)?;
        let (leaf_der, intermediates) =
            chain.split_first().ok_or_else(|| reject(Reason::MalformedCertificate, "no certificate given"))?;
        let (_, leaf) = X509Certificate::from_der(leaf_der)
            .map_err(|e| reject(Reason::MalformedCertificate, format!("not an X.509 certificate: {e}")))?;
        self.verify_chain(&leaf, intermediates, now)?;
        check_validity(&leaf, policy, now)?;
        check_critical_extensions(&leaf)?;
        let contract = contract_of(&leaf)?;
        Ok(Verified {
            serial: hex::encode(leaf.raw_serial()),
            contract,
            not_after: UNIX_EPOCH + Duration::from_secs(leaf.validity().not_after.timestamp().max(0) as u64),
        })
    }

    /// Walk up from the leaf through the given intermediates to an anchor, checking each
    /// signature against its issuer's key.
    fn verify_chain(
        &self,
        leaf: &X509Certificate<'_>,
        intermediates: &[Vec<u8>],
        now: SystemTime,
    ) -> Result<(), Rejection> {
        let anchors: Vec<X509Certificate<'_>> =
            self.ders.iter().filter_map(|der| X509Certificate::from_der(der).ok().map(|(_, c)| c)).collect();
        let mut parsed = Vec::new();
        for der in intermediates {
            let (_, cert) = X509Certificate::from_der(der)
                .map_err(|e| reject(Reason::MalformedCertificate, format!("an intermediate is not X.509: {e}")))?;
            parsed.push(cert);
        }
        let mut current = leaf;
        for _ in 0..=parsed.len() {
            if let Some(anchor) = anchors.iter().find(|a| a.subject() == current.issuer()) {
                current.verify_signature(Some(anchor.public_key())).map_err(|_| {
                    reject(Reason::UntrustedIssuer, "the signature does not verify against the trusted SAB anchor")
                })?;
                if !anchor.validity().is_valid_at(asn1_time(now)) {
                    return Err(reject(
                        Reason::UntrustedIssuer,
                        "the SAB anchor itself is outside its validity window",
                    ));
                }
                return Ok(());
            }
            let Some(issuer) = parsed.iter().find(|c| c.subject() == current.issuer() && c.is_ca()) else { break };
            current.verify_signature(Some(issuer.public_key())).map_err(|_| {
                reject(
                    Reason::UntrustedIssuer,
                    format!("the signature by intermediate `{}` does not verify", issuer.subject()),
                )
            })?;
            if !issuer.validity().is_valid_at(asn1_time(now)) {
                return Err(reject(
                    Reason::UntrustedIssuer,
                    format!("intermediate `{}` is outside its validity window", issuer.subject()),
                ));
            }
            current = issuer;
        }
        Err(reject(Reason::UntrustedIssuer, format!("issuer `{}` is not a trusted SAB anchor", current.issuer())))
    }
}

fn parse_bundle(pem: &str) -> Result<Vec<Vec<u8>>, Rejection> {
    let mut chain = Vec::new();
    for block in Pem::iter_from_buffer(pem.as_bytes()) {
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

fn contract_oid() -> Oid<'static> {
    Oid::from(CONTRACT_OID).expect("valid OID")
}

/// Critical extensions the broker understands; any other one means the certificate
/// asks for semantics the broker would ignore, so it is refused.
fn check_critical_extensions(leaf: &X509Certificate<'_>) -> Result<(), Rejection> {
    let known = [
        OID_X509_EXT_BASIC_CONSTRAINTS,
        OID_X509_EXT_KEY_USAGE,
        OID_X509_EXT_EXTENDED_KEY_USAGE,
        OID_X509_EXT_SUBJECT_ALT_NAME,
        OID_X509_EXT_SUBJECT_KEY_IDENTIFIER,
        OID_X509_EXT_AUTHORITY_KEY_IDENTIFIER,
        contract_oid(),
    ];
    for ext in leaf.extensions() {
        if ext.critical && !known.contains(&ext.oid) {
            return Err(reject(
                Reason::UnsupportedCriticalExtension,
                format!("critical extension {} is not understood", ext.oid),
            ));
        }
    }
    Ok(())
}

fn contract_of(leaf: &X509Certificate<'_>) -> Result<ExecutionContract, Rejection> {
    let oid = contract_oid();
    let ext = leaf
        .extensions()
        .iter()
        .find(|ext| ext.oid == oid)
        .ok_or_else(|| reject(Reason::MissingContract, "the certificate carries no execution contract"))?;
    if !ext.critical {
        return Err(reject(Reason::MalformedContract, "the contract extension must be critical"));
    }
    let (_, text) = Utf8String::from_der(ext.value)
        .map_err(|e| reject(Reason::MalformedContract, format!("the contract extension is not a UTF8String: {e}")))?;
    let contract: ExecutionContract = serde_json::from_str(&text.string())
        .map_err(|e| reject(Reason::MalformedContract, format!("the contract is not valid: {e}")))?;
    if contract.canonical_json() != text.string() {
        return Err(reject(Reason::MalformedContract, "the contract is not in RFC 8785 canonical form"));
    }
    if contract.agent.is_empty() {
        return Err(reject(Reason::MalformedContract, "the contract names no agent identity"));
    }
    Ok(contract)
}

fn asn1_time(now: SystemTime) -> ASN1Time {
    let secs = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs() as i64;
    ASN1Time::from_timestamp(secs).unwrap_or_else(|_| ASN1Time::now())
}
