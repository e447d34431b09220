//! The SAB's certificate files, for a node or a test: the issuing CA (what brokers
//! trust), a TLS CA, the SAB's server certificate, and client certificates naming a
//! caller by its identity URI.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result};
use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, KeyPair, KeyUsagePurpose, SanType};
use time::OffsetDateTime;

use super::identity::Caller;
use crate::cert::ca::{self, CaFiles};

/// The layout `seb-agent sab init` writes.
pub struct Layout {
    pub dir: PathBuf,
}

impl Layout {
    pub fn new(dir: &Path) -> Self {
        Self { dir: dir.to_path_buf() }
    }
    /// Issues the contract certificates: brokers' `admission.trust_anchors`.
    pub fn issuing_ca(&self) -> CaFiles {
        CaFiles::in_dir(&self.dir)
    }
    /// Issues the SAB's server certificate and callers' client certificates.
    pub fn tls_ca(&self) -> CaFiles {
        CaFiles { cert: self.dir.join("tls-ca.pem"), key: self.dir.join("tls-ca.key") }
    }
    pub fn server(&self) -> (PathBuf, PathBuf) {
        (self.dir.join("server.pem"), self.dir.join("server.key"))
    }
}

/// Create both CAs and a server certificate for `names` (DNS names or IP addresses).
pub fn init(layout: &Layout, names: &[String]) -> Result<()> {
    ca::create(&layout.issuing_ca(), "seb SAB", &rcgen::PKCS_ED25519)?;
    ca::create(&layout.tls_ca(), "seb SAB TLS", &rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = leaf(Duration::from_secs(365 * 86_400))?;
    params.distinguished_name.push(DnType::CommonName, "seb SAB");
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    for name in names {
        params.subject_alt_names.push(match name.parse::<IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(name.clone().try_into().with_context(|| format!("`{name}` is not a DNS name"))?),
        });
    }
    let (cert, key) = layout.server();
    write_pair(&params, &layout.tls_ca(), &cert, &key)
}

/// A client certificate naming `identity` (checked), valid for `ttl`, at `<out>.pem` and `<out>.key`.
pub fn client_certificate(tls_ca: &CaFiles, identity: &str, ttl: Duration, out: &Path) -> Result<(PathBuf, PathBuf)> {
    Caller::parse(identity)?;
    let mut params = leaf(ttl)?;
    params.distinguished_name.push(DnType::CommonName, identity);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.subject_alt_names = vec![SanType::URI(identity.try_into()?)];
    let (cert, key) = (out.with_extension("pem"), out.with_extension("key"));
    write_pair(&params, tls_ca, &cert, &key)?;
    Ok((cert, key))
}

fn leaf(ttl: Duration) -> Result<CertificateParams> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.not_before = OffsetDateTime::now_utc() - time::Duration::minutes(5);
    params.not_after = OffsetDateTime::now_utc() + time::Duration::try_from(ttl)?;
    params.serial_number = Some(rcgen::SerialNumber::from_slice(&ca::random_serial()));
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

fn write_pair(params: &CertificateParams, ca: &CaFiles, cert: &Path, key: &Path) -> Result<()> {
    use std::{io::Write, os::unix::fs::OpenOptionsExt};
    let pair = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let signed = params.signed_by(&pair, &ca.issuer()?)?;
    std::fs::write(cert, signed.pem()).with_context(|| format!("writing {}", cert.display()))?;
    let mut file = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(key)?;
    file.write_all(pair.serialize_pem().as_bytes())?;
    Ok(())
}
