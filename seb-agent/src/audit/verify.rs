//! Verification of an audit store: offline (needs only the database file, the broker's
//! public key and, to detect truncation, its head file), and by the broker at start.

use anyhow::Result;
use ed25519_dalek::VerifyingKey;
use rusqlite::Connection;
use serde::Serialize;

use super::{
    AuditStore,
    chain::{self, ChainFault, Head, StoredRecord},
    ledger::{CHECKPOINT_KIND, Checkpoint},
    store,
};

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Verified {
    pub records: i64,
    pub checkpoints: u64,
    pub head_hash: String,
    /// The head file's record, when one was given: the store holds it and everything
    /// before it, so nothing up to it was removed.
    pub head_file_seq: Option<i64>,
    #[serde(skip)]
    pub head: Head,
}

/// The first bad record and what is wrong with it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq, thiserror::Error)]
#[error("record {seq}: {fault}")]
pub struct Failure {
    pub seq: i64,
    #[serde(serialize_with = "display")]
    pub fault: ChainFault,
}

fn display<S: serde::Serializer>(fault: &ChainFault, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.collect_str(fault)
}

/// Which record signatures to check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signatures {
    /// Every one: the offline verifier trusts nothing but the public key.
    Every,
    /// Only those past the head file's record, whose own signed hash covers every record
    /// before it: what the broker does at start, to start fast.
    PastHead,
}

/// Check every signature, and the head file's head if given.
pub fn verify(store: &AuditStore, key: &VerifyingKey, head_file: Option<Head>) -> Result<Result<Verified, Failure>> {
    walk(store.conn(), key, head_file, Signatures::Every, |_| Ok(()))
}

/// Walk the chain from its first record: each must link to the one before, match its
/// hash, and (as `signatures` says) carry the broker's signature; the record the head
/// file names must be there, with the hash it names. `visit` sees each record that
/// passed, in order. Returns the first failure, if any.
pub fn walk(
    conn: &Connection,
    key: &VerifyingKey,
    head_file: Option<Head>,
    signatures: Signatures,
    mut visit: impl FnMut(&StoredRecord) -> Result<()>,
) -> Result<Result<Verified, Failure>> {
    let mut head = Head::EMPTY;
    let mut checkpoints = 0;
    let mut failure = None;
    let trusted_seq = head_file.map_or(0, |h| h.seq);
    store::for_each_stored(conn, |record| {
        let record = match record {
            Ok(record) => record,
            Err(unreadable) => {
                failure = Some(Failure { seq: unreadable.seq, fault: ChainFault::Unreadable(unreadable.problem) });
                return Ok(false);
            }
        };
        let checked = match signatures {
            Signatures::PastHead if record.seq <= trusted_seq => chain::check_link(&record, &head),
            _ => chain::check(&record, &head, key),
        };
        let outcome = checked.and_then(|next| {
            if record.kind == CHECKPOINT_KIND {
                check_checkpoint(&record.body, &head)?;
                checkpoints += 1;
            }
            if let Some(trusted) = head_file
                && next.seq == trusted.seq
                && next.hash != trusted.hash
            {
                return Err(ChainFault::NotTheHead);
            }
            Ok(next)
        });
        match outcome {
            Ok(next) => {
                visit(&record)?;
                head = next;
                Ok(true)
            }
            Err(fault) => {
                failure = Some(Failure { seq: record.seq, fault });
                Ok(false)
            }
        }
    })?;
    if let Some(failure) = failure {
        return Ok(Err(failure));
    }
    if head.seq < trusted_seq {
        return Ok(Err(Failure {
            seq: trusted_seq,
            fault: ChainFault::Truncated { head_seq: trusted_seq, last: head.seq },
        }));
    }
    Ok(Ok(Verified {
        records: head.seq,
        checkpoints,
        head_hash: hex::encode(head.hash),
        head_file_seq: head_file.map(|h| h.seq),
        head,
    }))
}

/// A checkpoint must name the head that precedes it.
fn check_checkpoint(body: &str, before: &Head) -> Result<(), ChainFault> {
    let checkpoint: Checkpoint =
        serde_json::from_str(body).map_err(|e| ChainFault::BadCheckpoint(format!("unreadable: {e}")))?;
    if checkpoint.through_seq != before.seq || checkpoint.head_hash != hex::encode(before.hash) {
        return Err(ChainFault::BadCheckpoint(format!(
            "it names record {} with hash {}, the chain has {} with {}",
            checkpoint.through_seq,
            checkpoint.head_hash,
            before.seq,
            hex::encode(before.hash)
        )));
    }
    Ok(())
}
