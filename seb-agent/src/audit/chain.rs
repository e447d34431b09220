//! The tamper-evident record chain.
//!
//! Record `n` stores `hash_n = SHA-256(domain ‖ n ‖ hash_{n-1} ‖ kind ‖ time_ns ‖ body)`
//! (lengths prefixed, integers big-endian) and the broker's Ed25519 signature over
//! `hash_n`. Sequence numbers start at 1 and have no gaps; record 1 links to 32 zero
//! bytes. So a changed, deleted, inserted or reordered record breaks the chain at the
//! first record touched, and a record cannot be forged without the broker's key.

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use sha2::{Digest, Sha256};

pub const GENESIS: [u8; 32] = [0; 32];
const DOMAIN: &[u8] = b"seb-audit-record-v1";

pub fn record_hash(seq: i64, prev: &[u8; 32], kind: &str, time_ns: i64, body: &str) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(DOMAIN);
    hasher.update(seq.to_be_bytes());
    hasher.update(prev);
    hasher.update((kind.len() as u64).to_be_bytes());
    hasher.update(kind.as_bytes());
    hasher.update(time_ns.to_be_bytes());
    hasher.update((body.len() as u64).to_be_bytes());
    hasher.update(body.as_bytes());
    hasher.finalize().into()
}

/// The newest record: where the next one links.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    pub seq: i64,
    pub hash: [u8; 32],
}

impl Head {
    pub const EMPTY: Head = Head { seq: 0, hash: GENESIS };
}

/// A record ready to store: linked and signed.
#[derive(Debug, Clone)]
pub struct Sealed {
    pub seq: i64,
    pub prev_hash: [u8; 32],
    pub hash: [u8; 32],
    pub signature: [u8; 64],
}

pub fn seal(head: &Head, key: &SigningKey, kind: &str, time_ns: i64, body: &str) -> Sealed {
    let seq = head.seq + 1;
    let hash = record_hash(seq, &head.hash, kind, time_ns, body);
    Sealed { seq, prev_hash: head.hash, hash, signature: key.sign(&hash).to_bytes() }
}

/// What is wrong with a stored record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainFault {
    #[error("record {expected} is missing (the next stored record is {found})")]
    Missing { expected: i64, found: i64 },
    #[error("does not link to the record before it (deleted, inserted or reordered records)")]
    BrokenLink,
    #[error("its content does not match its hash (the record was modified)")]
    ContentChanged,
    #[error("its signature is not the broker's")]
    BadSignature,
    #[error("checkpoint does not match the chain: {0}")]
    BadCheckpoint(String),
    #[error("cannot be read: {0}")]
    Unreadable(String),
    #[error(
        "is missing: the head file names record {head_seq}, the store ends at record {last} (the newest records were removed)"
    )]
    Truncated { head_seq: i64, last: i64 },
    #[error("is not the one the head file names (the store was replaced or rolled back)")]
    NotTheHead,
}

/// One stored record, as read back for verification.
#[derive(Debug, Clone)]
pub struct StoredRecord {
    pub seq: i64,
    pub kind: String,
    pub time_ns: i64,
    pub body: String,
    pub prev_hash: Vec<u8>,
    pub hash: Vec<u8>,
    pub signature: Vec<u8>,
}

/// Check one record against the head before it, its signature included; returns the
/// new head.
pub fn check(record: &StoredRecord, head: &Head, key: &VerifyingKey) -> Result<Head, ChainFault> {
    let next = check_link(record, head)?;
    let signature = Signature::from_slice(&record.signature).map_err(|_| ChainFault::BadSignature)?;
    key.verify(&next.hash, &signature).map_err(|_| ChainFault::BadSignature)?;
    Ok(next)
}

/// Check one record's place and content, not its signature: enough for records up to a
/// signed head, whose hash covers every record before it.
pub fn check_link(record: &StoredRecord, head: &Head) -> Result<Head, ChainFault> {
    let expected = head.seq + 1;
    if record.seq != expected {
        return Err(ChainFault::Missing { expected, found: record.seq });
    }
    if record.prev_hash != head.hash {
        return Err(ChainFault::BrokenLink);
    }
    let hash = record_hash(record.seq, &head.hash, &record.kind, record.time_ns, &record.body);
    if record.hash != hash {
        return Err(ChainFault::ContentChanged);
    }
    Ok(Head { seq: record.seq, hash })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(key: &SigningKey, bodies: &[&str]) -> Vec<StoredRecord> {
        let mut head = Head::EMPTY;
        bodies
            .iter()
            .map(|body| {
                let sealed = seal(&head, key, "k", 7, body);
                head = Head { seq: sealed.seq, hash: sealed.hash };
                StoredRecord {
                    seq: sealed.seq,
                    kind: "k".into(),
                    time_ns: 7,
                    body: body.to_string(),
                    prev_hash: sealed.prev_hash.to_vec(),
                    hash: sealed.hash.to_vec(),
                    signature: sealed.signature.to_vec(),
                }
            })
            .collect()
    }

    fn first_fault(records: &[StoredRecord], key: &VerifyingKey) -> Option<(i64, ChainFault)> {
        let mut head = Head::EMPTY;
        for record in records {
            match check(record, &head, key) {
                Ok(next) => head = next,
                Err(fault) => return Some((record.seq, fault)),
            }
        }
        None
    }

    #[test]
    fn an_untouched_chain_verifies_and_each_tampering_is_named() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let public = key.verifying_key();
        let records = chain(&key, &["a", "b", "c", "d"]);
        assert_eq!(first_fault(&records, &public), None);

        let mut changed = records.clone();
        changed[2].body = "x".into();
        assert_eq!(first_fault(&changed, &public), Some((3, ChainFault::ContentChanged)));

        let mut deleted = records.clone();
        deleted.remove(1);
        assert_eq!(first_fault(&deleted, &public), Some((3, ChainFault::Missing { expected: 2, found: 3 })));

        let mut reordered = records.clone();
        reordered.swap(1, 2);
        (reordered[1].seq, reordered[2].seq) = (2, 3);
        assert_eq!(first_fault(&reordered, &public), Some((2, ChainFault::BrokenLink)));

        let other = SigningKey::from_bytes(&[8; 32]);
        assert_eq!(first_fault(&records, &other.verifying_key()), Some((1, ChainFault::BadSignature)));
    }
}
