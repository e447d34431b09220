//! `seb-agent cert`: the dev SAB and certificate inspection.

use std::{
    io::{self, Write},
    path::Path,
    time::Duration,
};

use anyhow::{Context, Result};
use serde_json::json;
use x509_parser::{pem::Pem, prelude::*};

use crate::cert::{
    ExecutionContract, MutationRequest,
    contract::CONTRACT_OID_TEXT,
    dev_sab::{self, Algorithm, CaFiles, IssueOptions},
    extensions,
};

pub fn create_ca(dir: &Path, name: &str, algorithm: Algorithm) -> Result<CaFiles> {
    dev_sab::create_ca(dir, name, algorithm)
}

/// Issue a certificate for a contract file. With `request`, the contract's request
/// digest, provider, operation and target are filled in from that request.
pub fn issue(
    dir: &Path,
    contract_path: &Path,
    request: Option<&Path>,
    ttl: Duration,
    algorithm: Algorithm,
) -> Result<String> {
    let text =
        std::fs::read_to_string(contract_path).with_context(|| format!("reading {}", contract_path.display()))?;
    let mut value: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", contract_path.display()))?;
    if request.is_some() {
        // Filled in from the request below; placeholders keep the contract parseable.
        let object = value.as_object_mut().context("the contract must be a JSON object")?;
        for (field, placeholder) in [("provider", "http"), ("operation", ""), ("target", ""), ("request_digest", "")] {
            object.entry(field).or_insert(json!(placeholder));
        }
    }
    let mut contract: ExecutionContract = serde_json::from_value(value)
        .with_context(|| format!("{} is not a valid execution contract", contract_path.display()))?;
    if let Some(path) = request {
        let request: MutationRequest = serde_json::from_str(&std::fs::read_to_string(path)?)
            .with_context(|| format!("{} is not a valid request", path.display()))?;
        request.check_numbers().with_context(|| format!("{} cannot be certified", path.display()))?;
        contract.bind_request(&request);
    }
    dev_sab::issue(&CaFiles::in_dir(dir), &contract, &IssueOptions { algorithm, ttl, ..Default::default() })
}

/// The certificate's serial, validity and contract, as JSON.
pub fn inspect(path: &Path) -> Result<serde_json::Value> {
    inspect_pem(&std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?)
}

/// The same, of a PEM text.
pub fn inspect_pem(text: &str) -> Result<serde_json::Value> {
    let pem = Pem::iter_from_buffer(text.as_bytes()).next().context("no PEM certificate in the file")??;
    let (_, cert) = X509Certificate::from_der(&pem.contents).context("not an X.509 certificate")?;
    // The broker's strict reader, so that what is shown is what the broker would read.
    let extensions = extensions::read(&pem.contents)?;
    let contract = extensions
        .iter()
        .find(|ext| ext.oid().to_id_string() == CONTRACT_OID_TEXT)
        .map(|ext| -> Result<serde_json::Value> {
            let text = extensions::utf8_string(ext.value)
                .map_err(|e| anyhow::anyhow!("the contract extension is not a strict DER UTF8String: {e}"))?;
            Ok(json!({"critical": ext.critical, "canonical": text, "contract": serde_json::from_str::<serde_json::Value>(text)?}))
        })
        .transpose()?;
    Ok(json!({
        "serial": hex::encode(cert.raw_serial()),
        "subject": cert.subject().to_string(),
        "issuer": cert.issuer().to_string(),
        "not_before": cert.validity().not_before.to_string(),
        "not_after": cert.validity().not_after.to_string(),
        "signature_algorithm": cert.signature_algorithm.algorithm.to_id_string(),
        "contract_extension": contract,
    }))
}

/// What [`inspect`] found, for a person.
pub fn render(out: &mut dyn Write, inspected: &serde_json::Value) -> io::Result<()> {
    let field = |name: &str| inspected[name].as_str().unwrap_or("-").to_string();
    writeln!(out, "serial     {}", field("serial"))?;
    writeln!(out, "subject    {}", field("subject"))?;
    writeln!(out, "issuer     {}", field("issuer"))?;
    writeln!(out, "valid      {} to {}", field("not_before"), field("not_after"))?;
    writeln!(out, "algorithm  {}", field("signature_algorithm"))?;
    let extension = &inspected["contract_extension"];
    if extension.is_null() {
        return writeln!(out, "contract   none (the broker would refuse it: missing_contract)");
    }
    let critical = if extension["critical"] == true { "critical" } else { "NOT critical" };
    writeln!(out, "contract   ({critical})")?;
    let pretty = serde_json::to_string_pretty(&extension["contract"]).map_err(io::Error::other)?;
    for line in pretty.lines() {
        writeln!(out, "  {line}")?;
    }
    Ok(())
}
