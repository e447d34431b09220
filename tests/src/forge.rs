//! Certificates a careful SAB would not issue, for admission tests: CA hierarchies with
//! chosen constraints, leaves with chosen defects, and DER patched after signing, then
//! signed again so that only the defect is wrong.

use ::time::OffsetDateTime;
use anyhow::{Context, Result, ensure};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose, SerialNumber, SigningKey,
};
use seb_agent::cert::{
    ExecutionContract,
    dev_sab::{self, IssueOptions},
};
use x509_parser::prelude::{FromDer, X509Certificate};

pub type Ca = Issuer<'static, KeyPair>;

/// CA parameters named `name`: by default cA with the given path length and keyUsage
/// keyCertSign; the caller may take either away.
pub fn ca_params(name: &str, path_len: Option<u8>) -> CertificateParams {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("no names");
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(path_len.map_or(BasicConstraints::Unconstrained, BasicConstraints::Constrained));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    params.not_before = OffsetDateTime::now_utc() - time::Duration::minutes(5);
    params.not_after = OffsetDateTime::now_utc() + time::Duration::days(1);
    params.serial_number = Some(SerialNumber::from_slice(&seb_agent::cert::ca::random_serial()));
    params
}

/// A self-signed root from `params`; returns it as an issuer and its PEM.
pub fn root(params: CertificateParams) -> Result<(Ca, String)> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ED25519)?;
    let pem = params.self_signed(&key)?.pem();
    Ok((Issuer::new(params, key), pem))
}

/// A certificate from `params` signed by `issuer`; returns it as an issuer and its PEM.
pub fn issued(params: CertificateParams, issuer: &Issuer<'_, impl SigningKey>) -> Result<(Ca, String)> {
    issued_with_key(params, issuer, &rcgen::PKCS_ED25519)
}

/// As [`issued`], its own key of `algorithm` (what it signs with as an issuer).
pub fn issued_with_key(
    params: CertificateParams,
    issuer: &Issuer<'_, impl SigningKey>,
    algorithm: &'static rcgen::SignatureAlgorithm,
) -> Result<(Ca, String)> {
    let key = KeyPair::generate_for(algorithm)?;
    let pem = params.signed_by(&key, issuer)?.pem();
    Ok((Issuer::new(params, key), pem))
}

/// The dev SAB's leaf parameters for `contract`, for a test to spoil one thing in.
pub fn leaf_params(contract: &ExecutionContract) -> CertificateParams {
    dev_sab::leaf_params(contract, &IssueOptions::default()).expect("leaf parameters")
}

/// A leaf from `params` signed by `issuer`: its PEM.
pub fn leaf(params: CertificateParams, issuer: &Issuer<'_, impl SigningKey>) -> Result<String> {
    Ok(issued(params, issuer)?.1)
}

/// Apply `patch` to the TBSCertificate of an Ed25519-signed `pem` (it must keep its
/// length), then sign it again with `key`: a certificate the key's owner did sign.
pub fn patch_and_resign(pem: &str, key: &impl SigningKey, patch: impl FnOnce(&mut [u8])) -> Result<String> {
    let mut der = ::pem::parse(pem)?.into_contents();
    let (_, cert) = X509Certificate::from_der(&der).context("parsing the certificate to patch")?;
    let tbs = cert.tbs_certificate.as_ref();
    let start = tbs.as_ptr() as usize - der.as_ptr() as usize;
    let end = start + tbs.len();
    ensure!(cert.signature_value.data.len() == 64, "only Ed25519 signatures (64 bytes, at the end) are replaced");
    patch(&mut der[start..end]);
    let signature = key.sign(&der[start..end])?;
    let at = der.len() - 64;
    der[at..].copy_from_slice(&signature);
    Ok(::pem::encode(&::pem::Pem::new("CERTIFICATE", der)))
}

/// Replace the one occurrence of `from` in `bytes` with `to`, of the same length.
pub fn replace_once(bytes: &mut [u8], from: &[u8], to: &[u8]) {
    assert_eq!(from.len(), to.len(), "a patch keeps the length");
    let hits: Vec<usize> = bytes.windows(from.len()).enumerate().filter(|(_, w)| *w == from).map(|(i, _)| i).collect();
    assert_eq!(hits.len(), 1, "{from:02x?} must occur exactly once");
    bytes[hits[0]..hits[0] + to.len()].copy_from_slice(to);
}
