//! What each fuzz target does with its input, through seb-agent's public API, and what
//! must hold whatever the input: no panic, every bound kept, and whatever is accepted is
//! exactly what its canonical form says. `seb-agent/tests/fuzz_regressions.rs` runs the
//! committed corpora and crash inputs through these same functions.

use std::{
    pin::Pin,
    sync::LazyLock,
    task::{Context, Poll},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use base64::Engine;
use seb_agent::{
    cert::{
        MutationRequest, TrustAnchors, ValidityPolicy,
        contract::{CONTRACT_OID, canonical_json},
        dev_sab::contract_extension_value,
        extensions::Extension,
        verify::{MAX_BUNDLE_BYTES, contract_of},
    },
    protocol::{Envelope, FrameError, MAX_MESSAGE, Request, VERSION, parse_request, read_frame},
};
use tokio::io::{AsyncRead, ReadBuf};
use x509_parser::prelude::{FromDer, X509Certificate};

/// The SAB CA the certificate seeds are signed by (`cargo xtask fuzz --seed` writes it).
pub const ANCHOR_PEM: &str = include_str!("../anchor.pem");
/// Seed certificates start this long after the anchor, and are verified a minute later.
pub const SEED_DELAY: Duration = Duration::from_secs(24 * 3600);

/// The time certificates are verified at: fixed, so that a finding replays.
pub fn verification_time() -> SystemTime {
    let der = x509_parser::pem::parse_x509_pem(ANCHOR_PEM.as_bytes()).expect("the anchor is PEM").1.contents;
    let (_, anchor) = X509Certificate::from_der(&der).expect("the anchor is a certificate");
    let not_before = anchor.validity().not_before.timestamp() as u64;
    UNIX_EPOCH + Duration::from_secs(not_before) + SEED_DELAY + Duration::from_secs(60)
}

static ANCHORS: LazyLock<TrustAnchors> = LazyLock::new(|| TrustAnchors::from_pem(ANCHOR_PEM).expect("a valid anchor"));
static NOW: LazyLock<SystemTime> = LazyLock::new(verification_time);
static RUNTIME: LazyLock<tokio::runtime::Runtime> =
    LazyLock::new(|| tokio::runtime::Builder::new_current_thread().build().expect("a tokio runtime"));

/// Frames as the broker reads them off its socket, arriving in pieces whose size the
/// first byte picks; each frame's body parsed as a request. Whether every frame was a
/// request.
pub fn frames(data: &[u8]) -> bool {
    let Some((&piece, stream)) = data.split_first() else { return false };
    let mut reader = Pieces { data: stream, piece: usize::from(piece % 64) + 1 };
    RUNTIME.block_on(async {
        let (mut at, mut all_requests) = (0, true);
        loop {
            match read_frame(&mut reader).await {
                Ok(body) => {
                    assert!(body.len() <= MAX_MESSAGE);
                    assert_eq!(body, stream[at + 4..at + 4 + body.len()], "a frame's body is the bytes sent");
                    assert!(body.capacity() <= 2 * body.len().max(1), "a body holds at most twice its length");
                    at += 4 + body.len();
                    all_requests &= request_frame(&body);
                }
                // Closed: nothing, or less than a length prefix, was left.
                Err(FrameError::Closed) => {
                    assert!(stream.len() - at < 4);
                    return all_requests && at == stream.len();
                }
                Err(FrameError::TooLarge(len)) => {
                    assert!(len > MAX_MESSAGE);
                    return false;
                }
                Err(FrameError::Truncated(_)) => {
                    assert!(stream.len() - at < 4 + announced(&stream[at..]));
                    return false;
                }
            }
        }
    })
}

fn announced(rest: &[u8]) -> usize {
    rest.get(..4).map_or(0, |len| u32::from_be_bytes(len.try_into().unwrap()) as usize)
}

/// One frame's body: a request or a refusal with a reason; an accepted request reads the
/// same after the broker writes it back out (as the ledger records it).
fn request_frame(body: &[u8]) -> bool {
    match parse_request(body) {
        Ok(request) => {
            let again = serde_json::to_vec(&Envelope { v: VERSION, body: &request }).expect("a request serialises");
            assert_eq!(parse_request(&again).as_ref(), Ok(&request), "a request reads back as itself");
            if let Request::Propose { request, .. } | Request::Read { request } = &request {
                digest_is_stable(request);
            }
            true
        }
        Err(refused) => {
            assert!(!refused.message.is_empty());
            false
        }
    }
}

/// A mutation request as JSON: when its numbers are accepted, its canonical JSON reads back
/// to the same request and digest. Whether it was accepted.
pub fn request(data: &[u8]) -> bool {
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(data) else { return false };
    let Ok(request) = serde_json::from_value::<MutationRequest>(value) else { return false };
    digest_is_stable(&request)
}

fn digest_is_stable(request: &MutationRequest) -> bool {
    if request.check_numbers().is_err() {
        return false;
    }
    let canonical = canonical_json(request);
    let again: MutationRequest = serde_json::from_str(&canonical).expect("canonical JSON reads back");
    assert_eq!(canonical_json(&again), canonical, "canonical JSON is a fixed point");
    assert_eq!(again.digest(), request.digest(), "the digest survives canonicalisation");
    true
}

/// A certificate bundle verified against the fixed anchor at the fixed time: PEM text if
/// the input is some, else the input as one DER certificate. Whether it verified.
pub fn certificate(data: &[u8]) -> bool {
    let pem = match std::str::from_utf8(data) {
        Ok(text) if text.contains("-----BEGIN") => text.to_string(),
        _ => {
            let base64 = base64::engine::general_purpose::STANDARD.encode(data);
            format!("-----BEGIN CERTIFICATE-----\n{base64}\n-----END CERTIFICATE-----\n")
        }
    };
    let policy = ValidityPolicy { max_ttl: Duration::from_secs(3600), clock_skew: Duration::from_secs(60) };
    match ANCHORS.verify(&pem, policy, *NOW) {
        Ok(verified) => {
            assert!(!verified.serial.is_empty());
            assert!(verified.contract.agent.binds_a_caller(), "a verified contract binds a caller");
            assert_eq!(verified.contract.check_numbers(), Ok(()));
            true
        }
        Err(rejection) => {
            assert!(!rejection.message.is_empty());
            if pem.len() > MAX_BUNDLE_BYTES {
                assert_eq!(rejection.reason, seb_agent::admission::Reason::BundleTooLarge);
            }
            false
        }
    }
}

/// The value of a critical contract extension: what is accepted is exactly the strict DER
/// of the contract's canonical JSON, so no two encodings carry one contract. Whether it
/// was accepted.
pub fn contract(data: &[u8]) -> bool {
    let oid = x509_parser::oid_registry::Oid::from(CONTRACT_OID).expect("a valid OID");
    let extension = Extension { oid: oid.as_bytes(), critical: true, value: data };
    match contract_of(&[extension]) {
        Ok(contract) => {
            assert_eq!(contract_extension_value(&contract).expect("a contract encodes"), data, "accepted ⇒ canonical");
            assert_eq!(contract.check_numbers(), Ok(()));
            assert!(contract.agent.binds_a_caller());
            true
        }
        Err(rejection) => {
            assert!(!rejection.message.is_empty());
            false
        }
    }
}

/// A reader handing out at most `piece` bytes a read, as a socket does.
struct Pieces<'a> {
    data: &'a [u8],
    piece: usize,
}

impl AsyncRead for Pieces<'_> {
    fn poll_read(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let n = self.piece.min(self.data.len()).min(buf.remaining());
        buf.put_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Poll::Ready(Ok(()))
    }
}
