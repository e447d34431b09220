//! The tamper-evident record chain.
//!
//! Record `n` stores `hash_n = SHA-256(domain ‖ n ‖ hash_{n-1} ‖ kind ‖ time_ns ‖ body)`
//! (lengths prefixed, integers big-endian). Sequence numbers start at 1 and have no gaps;
//! record 1 links to 32 zero bytes. So a changed, deleted, inserted or reordered record
//! breaks the chain at the first record touched.
//!
//! Records are signed per group commit, as Certificate Transparency signs tree heads: the
//! last record of each commit (the group's head) carries the broker's Ed25519 signature
//! over its hash, which covers it and, through the links, every record before it; the
//! other records of the group carry an empty signature. So no record can be forged or
//! altered without the broker's key, and one signature serves a whole group. A store
//! written with a signature on every record (each its own group) is read the same way.

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

impl Head {
    /// The head after appending a record to this one.
    pub fn next(&self, kind: &str, time_ns: i64, body: &str) -> Head {
        let seq = self.seq + 1;
        Head { seq, hash: record_hash(seq, &self.hash, kind, time_ns, body) }
    }

    /// The broker's signature on this head: it vouches for the record and every one before.
    pub fn sign(&self, key: &SigningKey) -> [u8; 64] {
        key.sign(&self.hash).to_bytes()
    }
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
    #[error(
        "is not covered by the broker's signature: the signature on record {head}, which ends the group of records \
         from here, is not the broker's (a record of the group was changed and the chain re-hashed, or the signature \
         forged)"
    )]
    BadGroupSignature { head: i64 },
    #[error(
        "is not covered by any signature: it and the records after it up to {last} carry none (a signed group head \
         ends every commit, so these were not written by the broker)"
    )]
    Unsigned { last: i64 },
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

/// Check a group head's signature over its hash.
pub fn check_signature(hash: &[u8; 32], signature: &[u8], key: &VerifyingKey) -> Result<(), ChainFault> {
    let signature = Signature::from_slice(signature).map_err(|_| ChainFault::BadSignature)?;
    key.verify(hash, &signature).map_err(|_| ChainFault::BadSignature)
}

/// Check one record's place and content, not its signature: the signature of its group's
/// head covers it.
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

    fn chain(bodies: &[&str]) -> Vec<StoredRecord> {
        let mut head = Head::EMPTY;
        bodies
            .iter()
            .map(|body| {
                let next = head.next("k", 7, body);
                let record = StoredRecord {
                    seq: next.seq,
                    kind: "k".into(),
                    time_ns: 7,
                    body: body.to_string(),
                    prev_hash: head.hash.to_vec(),
                    hash: next.hash.to_vec(),
                    signature: Vec::new(),
                };
                head = next;
                record
            })
            .collect()
    }

    fn first_fault(records: &[StoredRecord]) -> Option<(i64, ChainFault)> {
        let mut head = Head::EMPTY;
        for record in records {
            match check_link(record, &head) {
                Ok(next) => head = next,
                Err(fault) => return Some((record.seq, fault)),
            }
        }
        None
    }

    #[test]
    fn an_untouched_chain_links_and_each_tampering_is_named() {
        let records = chain(&["a", "b", "c", "d"]);
        assert_eq!(first_fault(&records), None);

        let mut changed = records.clone();
        changed[2].body = "x".into();
        assert_eq!(first_fault(&changed), Some((3, ChainFault::ContentChanged)));

        let mut deleted = records.clone();
        deleted.remove(1);
        assert_eq!(first_fault(&deleted), Some((3, ChainFault::Missing { expected: 2, found: 3 })));

        let mut reordered = records.clone();
        reordered.swap(1, 2);
        (reordered[1].seq, reordered[2].seq) = (2, 3);
        assert_eq!(first_fault(&reordered), Some((2, ChainFault::BrokenLink)));
    }

    #[test]
    fn a_head_signature_is_the_key_holders_alone() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let head = Head::EMPTY.next("k", 7, "a");
        let signature = head.sign(&key);
        assert_eq!(check_signature(&head.hash, &signature, &key.verifying_key()), Ok(()));
        let other = SigningKey::from_bytes(&[8; 32]).verifying_key();
        assert_eq!(check_signature(&head.hash, &signature, &other), Err(ChainFault::BadSignature));
        assert_eq!(check_signature(&head.hash, &signature[..63], &key.verifying_key()), Err(ChainFault::BadSignature));
    }
}
