//! Offline verification of an audit store: needs only the database file and the
//! broker's public key.

use anyhow::Result;
use ed25519_dalek::VerifyingKey;
use serde::Serialize;

use super::{
    AuditStore,
    chain::{self, ChainFault, Head},
    ledger::{CHECKPOINT_KIND, Checkpoint},
};

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Verified {
    pub records: i64,
    pub checkpoints: u64,
    pub head_hash: String,
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

pub fn verify(store: &AuditStore, key: &VerifyingKey) -> Result<Result<Verified, Failure>> {
    let mut head = Head::EMPTY;
    let mut checkpoints = 0;
    let mut failure = None;
    store.for_each_stored(|record| {
        let outcome = chain::check(&record, &head, key).and_then(|next| {
            if record.kind == CHECKPOINT_KIND {
                check_checkpoint(&record.body, &head)?;
                checkpoints += 1;
            }
            Ok(next)
        });
        match outcome {
            Ok(next) => {
                head = next;
                Ok(true)
            }
            Err(fault) => {
                failure = Some(Failure { seq: record.seq, fault });
                Ok(false)
            }
        }
    })?;
    Ok(match failure {
        Some(failure) => Err(failure),
        None => Ok(Verified { records: head.seq, checkpoints, head_hash: hex::encode(head.hash) }),
    })
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
