//! `cargo xtask fuzz`: the cargo-fuzz targets in `seb-agent/fuzz/` (the frame decoder and
//! request parsing, request digests, certificate verification, contract parsing), each
//! for a time, from the committed corpus; a crash input is copied where `cargo test`
//! replays it (`seb-agent/tests/fuzz_regressions.rs`). `--seed` writes the seed corpus.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context, Result, bail};
use base64::Engine;
use seb_agent::{
    cert::{
        ExecutionContract, MutationRequest, Provider,
        contract::{AgentIdentity, ScopedIdentity},
        dev_sab::{self, Algorithm, IssueOptions, contract_extension_value},
    },
    protocol::{Envelope, Request, VERSION},
};
use serde_json::json;

use crate::{toolchain, workspace_root};

pub const TARGETS: [&str; 4] = ["frames", "request", "certificate", "contract"];
/// Everything fuzzed is safe Rust: libFuzzer's coverage, overflow checks and debug
/// assertions find what there is to find, at half the cost of AddressSanitizer.
const SANITIZER: &str = "none";
/// Seed certificates start this long after their anchor (`SEED_DELAY` in
/// `seb-agent/fuzz/src/lib.rs`, which verifies them a minute later).
const SEED_DELAY_SECS: i64 = 24 * 3600;

fn fuzz_dir() -> PathBuf {
    workspace_root().join("seb-agent/fuzz")
}

/// `cargo +nightly fuzz` in the fuzz crate, without the outer stable cargo's settings.
fn cargo_fuzz() -> Command {
    let mut cargo = Command::new("cargo");
    cargo.current_dir(fuzz_dir()).args([&format!("+{}", toolchain::NIGHTLY), "fuzz"]);
    for var in ["CARGO", "RUSTUP_TOOLCHAIN", "RUSTC", "RUSTC_WRAPPER", "RUSTFLAGS", "CARGO_ENCODED_RUSTFLAGS"] {
        cargo.env_remove(var);
    }
    cargo
}

/// Run `targets` (all if none is named) for `seconds` each; fail if any finds anything.
pub fn run(seconds: u64, only: Option<&str>) -> Result<()> {
    let targets: Vec<&str> = match only {
        Some(target) if TARGETS.contains(&target) => vec![target],
        Some(other) => bail!("no fuzz target `{other}`; the targets are {}", TARGETS.join(", ")),
        None => TARGETS.to_vec(),
    };
    toolchain::ensure_fuzz_toolchain()?;
    crate::run(cargo_fuzz().args(["build", "--sanitizer", SANITIZER])).context("building the fuzz targets")?;
    let mut findings = Vec::new();
    for target in targets {
        if let Some(finding) = run_one(target, seconds)? {
            findings.push(finding);
        }
    }
    if !findings.is_empty() {
        bail!(
            "fuzzing found {} problem(s):\n{}\nthe inputs are in seb-agent/fuzz/regressions/, which `cargo test -p seb-agent --test fuzz_regressions` replays: fix the code, keep the inputs, commit both",
            findings.len(),
            findings.join("\n")
        );
    }
    Ok(())
}

/// One target for `seconds`: its summary printed; `Some` names what it found.
fn run_one(target: &str, seconds: u64) -> Result<Option<String>> {
    let dir = fuzz_dir();
    // New inputs grow a working corpus (kept between runs, not committed); the committed
    // seeds and regressions are read only.
    let grown = dir.join("grown").join(target);
    fs::create_dir_all(&grown)?;
    let artifacts = dir.join("artifacts").join(target);
    let _ = fs::remove_dir_all(&artifacts);
    fs::create_dir_all(&artifacts)?;
    let log_path = dir.join("grown").join(format!("{target}.log"));
    let log = fs::File::create(&log_path)?;
    let mut corpora = vec![grown];
    for committed in ["corpus", "regressions"] {
        let path = dir.join(committed).join(target);
        if path.is_dir() {
            corpora.push(path);
        }
    }
    eprintln!("xtask: fuzzing {target} for {seconds} s");
    let status = cargo_fuzz()
        .args(["run", "--sanitizer", SANITIZER, target])
        .args(&corpora)
        .args(["--", &format!("-max_total_time={seconds}"), "-timeout=10", "-print_final_stats=1"])
        .stdout(log.try_clone()?)
        .stderr(log)
        .stdin(Stdio::null())
        .status()
        .with_context(|| format!("running the {target} fuzz target"))?;
    let output = fs::read_to_string(&log_path).unwrap_or_default();
    let stat = |name: &str| {
        output.lines().find_map(|l| l.strip_prefix(&format!("stat::{name}:")).map(str::trim)).unwrap_or("?")
    };
    eprintln!(
        "xtask: fuzz {target}: {} runs, {} exec/s, {} new inputs; {}",
        stat("number_of_executed_units"),
        stat("average_exec_per_sec"),
        stat("new_units_added"),
        if status.success() { "nothing found" } else { "FOUND A PROBLEM" }
    );
    if status.success() {
        return Ok(None);
    }
    let tail: Vec<&str> = output.lines().rev().take(40).collect();
    eprintln!("{}", tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
    let kept = keep_findings(target, &artifacts)?;
    if kept.is_empty() {
        bail!("the {target} fuzz target failed without a crash input; its log: {}", log_path.display());
    }
    Ok(Some(format!("{target}: {}", kept.join(", "))))
}

/// Copy what libFuzzer wrote for `target` into the regression inputs `cargo test` replays.
fn keep_findings(target: &str, artifacts: &Path) -> Result<Vec<String>> {
    let regressions = fuzz_dir().join("regressions").join(target);
    fs::create_dir_all(&regressions)?;
    let mut kept = Vec::new();
    for entry in fs::read_dir(artifacts)? {
        let path = entry?.path();
        let name = path.file_name().context("a file name")?.to_string_lossy().into_owned();
        fs::copy(&path, regressions.join(&name))?;
        kept.push(format!("seb-agent/fuzz/regressions/{target}/{name}"));
    }
    Ok(kept)
}

/// Write the anchor and the seed corpus: one valid input per target (`valid-*`, which
/// the regression test requires to be accepted), and known-bad contract encodings.
pub fn seed() -> Result<()> {
    let dir = fuzz_dir();
    let scratch = std::env::temp_dir().join(format!("seb-fuzz-seed-{}", std::process::id()));
    let ca = dev_sab::create_ca(&scratch, "seb fuzz anchor", Algorithm::Ed25519)?;
    fs::copy(&ca.cert, dir.join("anchor.pem"))?;

    let request = MutationRequest {
        provider: Provider::Aws,
        operation: "s3:PutObject".into(),
        target: "arn:aws:s3:::bucket/key".into(),
        params: json!({"body": "héllo", "acl": "private", "size": 1.5, "parts": [1, -2, 9007199254740991u64], "tags": {"a": null, "b": true}}),
    };
    let mut contract = ExecutionContract {
        contract_id: "fuzz-seed".into(),
        agent: AgentIdentity { uid: Some(1000), exe: Some("/usr/bin/agent".into()), ..Default::default() },
        provider: request.provider,
        operation: String::new(),
        target: String::new(),
        request_digest: String::new(),
        precondition: format!("sha256:{}", "0".repeat(64)),
        policy_epoch: 1,
        revocation_epoch: 1,
        evidence_digest: format!("sha256:{}", "1".repeat(64)),
        identity: ScopedIdentity::AwsRole { role_arn: "arn:aws:iam::123456789012:role/writer".into() },
    };
    contract.bind_request(&request);
    // The CA starts 5 minutes before now; the leaf SEED_DELAY after the CA.
    let options = IssueOptions { start_offset_secs: SEED_DELAY_SECS - 300, ..Default::default() };
    let leaf = dev_sab::issue(&ca, &contract, &options)?;
    let _ = fs::remove_dir_all(&scratch);

    let write = |target: &str, name: &str, bytes: &[u8]| -> Result<()> {
        let path = dir.join("corpus").join(target);
        fs::create_dir_all(&path)?;
        fs::write(path.join(name), bytes).with_context(|| format!("writing the {target} seed {name}"))
    };
    write("certificate", "valid-leaf.pem", leaf.as_bytes())?;
    write("certificate", "valid-leaf.der", &pem_contents(&leaf)?)?;
    write("contract", "valid-contract.der", &contract_extension_value(&contract)?)?;
    write("request", "valid-request.json", serde_json::to_string_pretty(&request)?.as_bytes())?;
    let mut frames = vec![7u8]; // read in pieces of 8 bytes
    for body in [
        Request::Ping,
        Request::Propose { certificate: leaf.clone(), request: request.clone() },
        Request::Read { request },
        Request::GetEpochs,
    ] {
        let json = serde_json::to_vec(&Envelope { v: VERSION, body })?;
        frames.extend((json.len() as u32).to_be_bytes());
        frames.extend(json);
    }
    write("frames", "valid-frames.bin", &frames)?;

    // The same contract in encodings the broker must refuse: not canonical JSON, and not
    // strict DER. Replayed as regressions: accepting any would break the one encoding.
    let canonical = contract.canonical_json();
    let spaced = canonical.replacen(',', ", ", 1);
    let refused = dir.join("regressions/contract");
    fs::create_dir_all(&refused)?;
    fs::write(refused.join("not-canonical-json.der"), utf8_string_der(spaced.as_bytes(), false))?;
    fs::write(refused.join("long-form-length.der"), utf8_string_der(canonical.as_bytes(), true))?;
    eprintln!("xtask: wrote {} and the seeds under {}", dir.join("anchor.pem").display(), dir.display());
    Ok(())
}

/// A UTF8String of `text`; its length in four bytes if `overlong` (BER, not DER).
fn utf8_string_der(text: &[u8], overlong: bool) -> Vec<u8> {
    let len = text.len();
    let mut der = vec![0x0c];
    match len {
        _ if overlong => der.extend([0x84].into_iter().chain((len as u32).to_be_bytes())),
        0..0x80 => der.push(len as u8),
        0x80..0x100 => der.extend([0x81, len as u8]),
        _ => der.extend([0x82, (len >> 8) as u8, len as u8]),
    }
    der.extend(text);
    der
}

fn pem_contents(pem: &str) -> Result<Vec<u8>> {
    let base64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    Ok(base64::engine::general_purpose::STANDARD.decode(base64)?)
}
