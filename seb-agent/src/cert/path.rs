//! Building a path from the leaf through the bundle's intermediates to a trust anchor,
//! within a budget.
//!
//! Issuers are found by name, so an attacker can offer many candidates for one name, and
//! each candidate costs a signature check. As rustls-webpki's `Budget` does, each
//! verification may check a bounded number of signatures and consider a bounded number of
//! candidate issuers; past either bound it is refused, whatever paths remain untried.

use x509_parser::{
    oid_registry::{OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_SIG_ECDSA_WITH_SHA256, OID_SIG_ED25519},
    prelude::*,
};

use super::{
    profile,
    verify::{Rejection, reject},
};
use crate::admission::Reason;

/// Signature checks per verification: a path of the longest accepted length needs
/// `MAX_INTERMEDIATES + 1`; the rest allows for a few dead ends (say, an anchor and its
/// successor under one name).
pub const MAX_SIGNATURE_CHECKS: u32 = 16;
/// Candidate issuers considered per verification, including those refused before their
/// signature was checked.
pub const MAX_ISSUER_CANDIDATES: u32 = 32;

self_cell::self_cell!(
    /// A trust anchor's DER and the certificate parsed from it.
    struct ParsedAnchor {
        owner: Vec<u8>,
        #[covariant]
        dependent: X509Certificate,
    }
);

/// A trust anchor, decoded once when loaded: its certificate, and its Ed25519 key (a
/// point decompression otherwise repeated on every signature check).
pub struct Anchor {
    parsed: ParsedAnchor,
    ed25519: Option<ed25519_dalek::VerifyingKey>,
}

impl Anchor {
    /// From a certificate's DER.
    pub fn from_der(der: Vec<u8>) -> anyhow::Result<Self> {
        let parsed = ParsedAnchor::try_new(der, |der| match X509Certificate::from_der(der) {
            Ok(([], cert)) => Ok(cert),
            Ok((rest, _)) => Err(anyhow::anyhow!("a trust anchor is followed by {} stray bytes", rest.len())),
            Err(e) => Err(anyhow::anyhow!("a trust anchor is not an X.509 certificate: {e}")),
        })?;
        let ed25519 = ed25519_key(parsed.borrow_dependent());
        Ok(Self { parsed, ed25519 })
    }

    pub fn der(&self) -> &[u8] {
        self.parsed.borrow_owner()
    }

    pub fn certificate(&self) -> &X509Certificate<'_> {
        self.parsed.borrow_dependent()
    }
}

struct Budget {
    signatures: u32,
    candidates: u32,
}

impl Budget {
    fn spend_candidate(&mut self) -> Result<(), Rejection> {
        self.candidates += 1;
        if self.candidates > MAX_ISSUER_CANDIDATES {
            return Err(reject(
                Reason::ChainBudgetExceeded,
                format!("more than {MAX_ISSUER_CANDIDATES} candidate issuers were considered"),
            ));
        }
        Ok(())
    }

    fn spend_signature(&mut self) -> Result<(), Rejection> {
        self.signatures += 1;
        if self.signatures > MAX_SIGNATURE_CHECKS {
            return Err(reject(
                Reason::ChainBudgetExceeded,
                format!("more than {MAX_SIGNATURE_CHECKS} signature checks were needed"),
            ));
        }
        Ok(())
    }
}

/// Find a path from `leaf` to one of `anchors`, each certificate signed by the next, each
/// issuer a CA allowed to sign certificates (see [`profile::check_issuer`]) and valid at
/// `now`. The intermediates are used at most once each.
pub fn build(
    leaf: &X509Certificate<'_>,
    intermediates: &[X509Certificate<'_>],
    anchors: &[Anchor],
    now: ASN1Time,
) -> Result<(), Rejection> {
    assert!(intermediates.len() < 64, "the bundle is capped well below 64 certificates");
    let mut search = Search { intermediates, anchors, now, budget: Budget { signatures: 0, candidates: 0 } };
    search.from(leaf, 0, 0)
}

struct Search<'s, 'c> {
    intermediates: &'s [X509Certificate<'c>],
    anchors: &'s [Anchor],
    now: ASN1Time,
    budget: Budget,
}

impl Search<'_, '_> {
    /// A path up from `current`, which has `below` intermediates under it; `used` marks
    /// the intermediates already on the path.
    fn from(&mut self, current: &X509Certificate<'_>, below: usize, used: u64) -> Result<(), Rejection> {
        let wanted = current.issuer().as_raw();
        // Why the path failed, the most specific first: a refused issuer says more than a
        // name no one answers to.
        let mut failure: Option<Rejection> = None;
        let (anchors, intermediates) = (self.anchors, self.intermediates);
        for anchor in anchors.iter().filter(|a| a.certificate().subject().as_raw() == wanted) {
            let issuer = Issuer { cert: anchor.certificate(), ed25519: anchor.ed25519 };
            match self.signed_by(current, issuer, below, "the trusted SAB anchor") {
                Ok(()) => return Ok(()),
                Err(e) if e.reason == Reason::ChainBudgetExceeded => return Err(e),
                Err(e) => keep_most_specific(&mut failure, e),
            }
        }
        for (index, issuer) in intermediates.iter().enumerate() {
            if used & (1 << index) != 0 || issuer.subject().as_raw() != wanted {
                continue;
            }
            let step = self
                .signed_by(current, Issuer::of(issuer), below, &format!("intermediate `{}`", issuer.subject()))
                .and_then(|()| self.from(issuer, below + 1, used | (1 << index)));
            match step {
                Ok(()) => return Ok(()),
                Err(e) if e.reason == Reason::ChainBudgetExceeded => return Err(e),
                Err(e) => keep_most_specific(&mut failure, e),
            }
        }
        Err(failure.unwrap_or_else(|| {
            reject(Reason::UntrustedIssuer, format!("issuer `{}` is not a trusted SAB anchor", current.issuer()))
        }))
    }

    /// `issuer` may issue and did issue `current`: its constraints first (no signature
    /// is spent on an issuer that could not be used), then the signature, then its
    /// validity.
    fn signed_by(
        &mut self,
        current: &X509Certificate<'_>,
        issuer: Issuer<'_, '_>,
        below: usize,
        what: &str,
    ) -> Result<(), Rejection> {
        self.budget.spend_candidate()?;
        profile::check_issuer(issuer.cert, below)?;
        // Before any signature is checked: RSA-8192 (which ring would check, at several
        // milliseconds each) or any other algorithm than the SAB's is refused as such.
        if !accepted_algorithm(current, issuer.cert) {
            return Err(reject(
                Reason::UntrustedIssuer,
                format!(
                    "{what} signed with {} under a key of {}: only Ed25519, or ECDSA P-256 with SHA-256, is accepted",
                    current.signature_algorithm.algorithm,
                    issuer.cert.public_key().algorithm.algorithm
                ),
            ));
        }
        self.budget.spend_signature()?;
        if !signature_verifies(current, issuer) {
            return Err(reject(Reason::UntrustedIssuer, format!("the signature does not verify against {what}")));
        }
        if !issuer.cert.validity().is_valid_at(self.now) {
            return Err(reject(Reason::UntrustedIssuer, format!("{what} is outside its validity window")));
        }
        Ok(())
    }
}

/// A candidate issuer, with its Ed25519 key if it has a valid one.
#[derive(Clone, Copy)]
struct Issuer<'s, 'c> {
    cert: &'s X509Certificate<'c>,
    ed25519: Option<ed25519_dalek::VerifyingKey>,
}

impl<'s, 'c> Issuer<'s, 'c> {
    /// An intermediate, its key decoded now.
    fn of(cert: &'s X509Certificate<'c>) -> Self {
        Self { cert, ed25519: ed25519_key(cert) }
    }
}

/// The certificate's Ed25519 public key, if it holds a valid one.
fn ed25519_key(cert: &X509Certificate<'_>) -> Option<ed25519_dalek::VerifyingKey> {
    let key = cert.public_key();
    if key.algorithm.algorithm != OID_SIG_ED25519 {
        return None;
    }
    let bytes = <[u8; 32]>::try_from(&key.subject_public_key.data[..]).ok()?;
    ed25519_dalek::VerifyingKey::from_bytes(&bytes).ok()
}

/// Whether `current` is signed with Ed25519 under an Ed25519 key, or ECDSA with SHA-256
/// under a P-256 key: the SAB's algorithms, and the only ones worth a signature check.
fn accepted_algorithm(current: &X509Certificate<'_>, issuer: &X509Certificate<'_>) -> bool {
    let key = &issuer.public_key().algorithm;
    match &current.signature_algorithm.algorithm {
        oid if *oid == OID_SIG_ED25519 => key.algorithm == OID_SIG_ED25519,
        oid if *oid == OID_SIG_ECDSA_WITH_SHA256 => {
            key.algorithm == OID_KEY_TYPE_EC_PUBLIC_KEY
                && key.parameters.as_ref().and_then(|p| p.as_oid().ok()).is_some_and(|curve| curve == OID_EC_P256)
        }
        _ => false,
    }
}

/// Whether `issuer`'s key signed `current`. Ed25519 (what the SAB signs with) is checked
/// with ed25519-dalek, strictly (canonical encodings, no small-order keys), which uses the
/// CPU's vector units; ECDSA with x509-parser (ring).
fn signature_verifies(current: &X509Certificate<'_>, issuer: Issuer<'_, '_>) -> bool {
    if current.signature_algorithm.algorithm != OID_SIG_ED25519 {
        return current.verify_signature(Some(issuer.cert.public_key())).is_ok();
    }
    let Ok(signature) = ed25519_dalek::Signature::from_slice(&current.signature_value.data) else {
        return false;
    };
    current.signature_algorithm.parameters.is_none()
        && issuer.ed25519.is_some_and(|key| key.verify_strict(current.tbs_certificate.as_ref(), &signature).is_ok())
}

fn keep_most_specific(failure: &mut Option<Rejection>, rejection: Rejection) {
    if failure.as_ref().is_none_or(|f| f.reason == Reason::UntrustedIssuer) {
        *failure = Some(rejection);
    }
}
