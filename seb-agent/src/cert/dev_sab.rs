//! A small development SAB: a CA, and certificates binding one contract each, so the
//! whole flow runs without an external assurance authority.

use std::{path::Path, time::Duration};

use anyhow::{Context, Result};
use rcgen::{
    CertificateParams, CustomExtension, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SerialNumber,
    SignatureAlgorithm,
};
use time::OffsetDateTime;
use x509_parser::der_parser::asn1_rs::{ToDer, Utf8String};

use super::contract::{CONTRACT_OID, ExecutionContract, SAB_EKU_OID};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Algorithm {
    Ed25519,
    P256,
}

impl Algorithm {
    pub fn rcgen(self) -> &'static SignatureAlgorithm {
        match self {
            Self::Ed25519 => &rcgen::PKCS_ED25519,
            Self::P256 => &rcgen::PKCS_ECDSA_P256_SHA256,
        }
    }
}

pub use super::ca::CaFiles;

/// Create a SAB CA in `dir`; its certificate is what brokers trust
/// (`admission.trust_anchors`).
pub fn create_ca(dir: &Path, name: &str, algorithm: Algorithm) -> Result<CaFiles> {
    let files = CaFiles::in_dir(dir);
    super::ca::create(&files, name, algorithm.rcgen())?;
    Ok(files)
}

/// How a certificate is to be made. The defaults make a valid one; each other field
/// makes exactly one thing wrong, so brokers' verification can be exercised.
#[derive(Debug, Clone)]
pub struct IssueOptions {
    pub algorithm: Algorithm,
    pub ttl: Duration,
    /// Shift of the validity window from now (negative: in the past).
    pub start_offset_secs: i64,
    pub contract_critical: bool,
    /// Leave the contract extension out.
    pub omit_contract: bool,
    /// An extra critical extension the broker does not understand.
    pub unknown_critical_extension: bool,
}

impl Default for IssueOptions {
    fn default() -> Self {
        Self {
            algorithm: Algorithm::Ed25519,
            ttl: Duration::from_secs(300),
            start_offset_secs: 0,
            contract_critical: true,
            omit_contract: false,
            unknown_critical_extension: false,
        }
    }
}

/// Issue a certificate binding `contract`, signed by the CA in `ca`; returns its PEM.
pub fn issue(ca: &CaFiles, contract: &ExecutionContract, options: &IssueOptions) -> Result<String> {
    let issuer = ca.issuer()?;
    let key = KeyPair::generate_for(options.algorithm.rcgen())?;
    Ok(leaf_params(contract, options)?.signed_by(&key, &issuer)?.pem())
}

/// The leaf's parameters: an end entity for digital signatures with the SAB extended key
/// usage, binding `contract`.
pub fn leaf_params(contract: &ExecutionContract, options: &IssueOptions) -> Result<CertificateParams> {
    contract.check_numbers().context("the contract cannot be certified")?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::Other(SAB_EKU_OID.to_vec())];
    params.distinguished_name.push(DnType::CommonName, contract.contract_id.as_str());
    let start = OffsetDateTime::now_utc() + time::Duration::seconds(options.start_offset_secs);
    params.not_before = start;
    params.not_after = start + time::Duration::try_from(options.ttl)?;
    params.serial_number = Some(SerialNumber::from_slice(&super::ca::random_serial()));
    params.use_authority_key_identifier_extension = true;
    if !options.omit_contract {
        let mut extension = CustomExtension::from_oid_content(CONTRACT_OID, contract_extension_value(contract)?);
        extension.set_criticality(options.contract_critical);
        params.custom_extensions.push(extension);
    }
    if options.unknown_critical_extension {
        let mut unknown = CustomExtension::from_oid_content(&[1, 3, 6, 1, 4, 1, 99999, 1], vec![0x05, 0x00]);
        unknown.set_criticality(true);
        params.custom_extensions.push(unknown);
    }
    Ok(params)
}

/// The extension value: a DER UTF8String holding the contract's canonical JSON.
pub fn contract_extension_value(contract: &ExecutionContract) -> Result<Vec<u8>> {
    Ok(Utf8String::new(&contract.canonical_json()).to_der_vec()?)
}
