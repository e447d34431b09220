//! Signing: a leaf binding one contract, from the SAB CA, with the SAB's validity.

use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use rcgen::{Issuer as CaIssuer, KeyPair};

use crate::cert::{
    ExecutionContract,
    ca::CaFiles,
    dev_sab::{self, IssueOptions},
};

pub struct Issuer {
    ca: CaIssuer<'static, KeyPair>,
}

/// A signed certificate.
pub struct Signed {
    pub pem: String,
    /// Lower-case hex, as the broker names serials.
    pub serial: String,
    pub not_after: SystemTime,
}

impl Issuer {
    /// The CA, read once.
    pub fn load(files: &CaFiles) -> Result<Self> {
        Ok(Self { ca: files.issuer().context("loading the SAB CA")? })
    }

    /// A leaf (fresh Ed25519 key, random serial) binding `contract`, valid from now for `ttl`.
    pub fn sign(&self, contract: &ExecutionContract, ttl: Duration) -> Result<Signed> {
        let params = dev_sab::leaf_params(contract, &IssueOptions { ttl, ..IssueOptions::default() })?;
        let serial = params.serial_number.as_ref().map(|s| hex::encode(s.to_bytes())).unwrap_or_default();
        let not_after = SystemTime::from(params.not_after);
        let key = KeyPair::generate_for(&rcgen::PKCS_ED25519)?;
        let pem = params.signed_by(&key, &self.ca)?.pem();
        Ok(Signed { pem, serial, not_after })
    }
}
