//! Certificate authorities kept as a PEM certificate and key on disk: the dev SAB's, and
//! the broker's issuing CA for short-lived client certificates.

use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose, SignatureAlgorithm};
use time::OffsetDateTime;

/// A CA's certificate and key files.
#[derive(Debug, Clone)]
pub struct CaFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl CaFiles {
    /// The dev SAB's layout: `sab-ca.pem` and `sab-ca.key` in a directory.
    pub fn in_dir(dir: &Path) -> Self {
        Self { cert: dir.join("sab-ca.pem"), key: dir.join("sab-ca.key") }
    }

    /// The CA, ready to sign.
    pub fn issuer(&self) -> Result<Issuer<'static, KeyPair>> {
        let key = KeyPair::from_pem(
            &fs::read_to_string(&self.key).with_context(|| format!("reading {}", self.key.display()))?,
        )?;
        let pem = fs::read_to_string(&self.cert).with_context(|| format!("reading {}", self.cert.display()))?;
        Ok(Issuer::from_ca_cert_pem(&pem, key)?)
    }
}

/// Create a CA (valid for a year) at `files`; the key is written with mode 0600. It
/// signs end-entity certificates only (pathLenConstraint 0).
pub fn create(files: &CaFiles, name: &str, algorithm: &'static SignatureAlgorithm) -> Result<()> {
    for path in [&files.cert, &files.key] {
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir)?;
        }
    }
    let key = KeyPair::generate_for(algorithm)?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.not_before = OffsetDateTime::now_utc() - time::Duration::minutes(5);
    params.not_after = OffsetDateTime::now_utc() + time::Duration::days(365);
    let cert = params.self_signed(&key)?;
    fs::write(&files.cert, cert.pem())?;
    write_private(&files.key, &key.serialize_pem())
}

/// 16 random bytes, top bit clear so the DER integer stays positive.
pub fn random_serial() -> [u8; 16] {
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
