//! A small development SAB: a CA, and certificates binding one contract each, so the
//! whole flow runs without an external assurance authority.

use std::{
    fs,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, CustomExtension, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose, SerialNumber,
    SignatureAlgorithm,
};
use time::OffsetDateTime;
use x509_parser::der_parser::asn1_rs::{ToDer, Utf8String};

use super::contract::{CONTRACT_OID, ExecutionContract};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Algorithm {
    Ed25519,
    P256,
}

impl Algorithm {
    fn rcgen(self) -> &'static SignatureAlgorithm {
        match self {
            Self::Ed25519 => &rcgen::PKCS_ED25519,
            Self::P256 => &rcgen::PKCS_ECDSA_P256_SHA256,
        }
    }
}

/// Files of a dev SAB CA in its directory.
pub struct CaFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl CaFiles {
    pub fn in_dir(dir: &Path) -> Self {
        Self { cert: dir.join("sab-ca.pem"), key: dir.join("sab-ca.key") }
    }
}

/// Create a CA; its certificate is what brokers trust (`admission.trust_anchors`).
pub fn create_ca(dir: &Path, name: &str, algorithm: Algorithm) -> Result<CaFiles> {
    fs::create_dir_all(dir)?;
    let key = KeyPair::generate_for(algorithm.rcgen())?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.not_before = OffsetDateTime::now_utc() - time::Duration::minutes(5);
    params.not_after = OffsetDateTime::now_utc() + time::Duration::days(365);
    let cert = params.self_signed(&key)?;
    let files = CaFiles::in_dir(dir);
    fs::write(&files.cert, cert.pem())?;
    write_private(&files.key, &key.serialize_pem())?;
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
    let ca_key =
        KeyPair::from_pem(&fs::read_to_string(&ca.key).with_context(|| format!("reading {}", ca.key.display()))?)?;
    let ca_pem = fs::read_to_string(&ca.cert).with_context(|| format!("reading {}", ca.cert.display()))?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key)?;
    let key = KeyPair::generate_for(options.algorithm.rcgen())?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(DnType::CommonName, contract.contract_id.as_str());
    let start = OffsetDateTime::now_utc() + time::Duration::seconds(options.start_offset_secs);
    params.not_before = start;
    params.not_after = start + time::Duration::try_from(options.ttl)?;
    params.serial_number = Some(SerialNumber::from_slice(&random_serial()));
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
    Ok(params.signed_by(&key, &issuer)?.pem())
}

/// The extension value: a DER UTF8String holding the contract's canonical JSON.
pub fn contract_extension_value(contract: &ExecutionContract) -> Result<Vec<u8>> {
    Ok(Utf8String::new(&contract.canonical_json()).to_der_vec()?)
}

/// 16 random bytes, top bit clear so the DER integer stays positive.
fn random_serial() -> [u8; 16] {
    let mut serial = *uuid::Uuid::new_v4().as_bytes();
    serial[0] &= 0x7f;
    serial[0] |= 0x01;
    serial
}

fn write_private(path: &Path, text: &str) -> Result<()> {
    use std::{io::Write, os::unix::fs::OpenOptionsExt};
    let mut file = fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path)?;
    file.write_all(text.as_bytes())?;
    Ok(())
}
