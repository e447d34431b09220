//! Verification of an audit store: offline (needs only the database file, the broker's
//! public key and, to detect truncation, its head file), and by the broker at start.
//!
//! One pass reads the records in order and checks each one's link and hash. The
//! signatures of group heads are checked in batches (Ed25519 batch verification), on a
//! second thread when it is free, while the pass goes on; a batch that fails is checked
//! signature by signature to name the group.

use std::{
    sync::mpsc::{self, SyncSender, TrySendError},
    thread::{Scope, ScopedJoinHandle},
};

use anyhow::Result;
use ed25519_dalek::{Signature, VerifyingKey};
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
    /// Signatures checked: one per group commit.
    pub signed_heads: u64,
    pub head_hash: String,
    /// The head file's record, when one was given: the store holds it and everything
    /// before it, so nothing up to it was removed.
    pub head_file_seq: Option<i64>,
    #[serde(skip)]
    pub head: Head,
}

/// The first bad record and what is wrong with it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq, thiserror::Error)]
#[error("record {seq}: {}", self.problem())]
pub struct Failure {
    pub seq: i64,
    #[serde(serialize_with = "display")]
    pub fault: ChainFault,
    /// The first record of the unsigned group `seq` falls in, when earlier than `seq`:
    /// the signature that would vouch for those records was never reached.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unsigned_from: Option<i64>,
}

impl Failure {
    /// What is wrong, in a sentence about the record.
    pub fn problem(&self) -> String {
        match self.unsigned_from {
            Some(from) => format!(
                "{}; records {from} to {} before it belong to the same group, whose signature was not reached, so \
                 they are not vouched for either",
                self.fault,
                self.seq - 1
            ),
            None => self.fault.to_string(),
        }
    }
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

/// Walk the chain from its first record: each must link to the one before and match its
/// hash; each group of records must end in a record carrying the broker's signature (as
/// `signatures` says); the record the head file names must be there, with the hash it
/// names. `visit` sees each record whose link and hash passed, in order; its group's
/// signature may be checked later, and the walk as a whole fails if it does not hold.
/// Returns the first failure, if any.
pub fn walk(
    conn: &Connection,
    key: &VerifyingKey,
    head_file: Option<Head>,
    signatures: Signatures,
    visit: impl FnMut(&StoredRecord) -> Result<()>,
) -> Result<Result<Verified, Failure>> {
    std::thread::scope(|scope| {
        let mut walker = Walker::new(head_file, signatures, SignatureChecks::new(scope, *key));
        walker.run(conn, visit)?;
        Ok(walker.finish())
    })
}

/// The state of one pass over the chain.
struct Walker<'scope, 'env> {
    head: Head,
    head_file: Option<Head>,
    /// Records up to this one need no signature of their own (the head file's covers them).
    vouched_through: i64,
    checkpoints: u64,
    signed_heads: u64,
    /// The first record of the group under way, not yet closed by a signed record.
    group_from: Option<i64>,
    failure: Option<Failure>,
    checks: SignatureChecks<'scope, 'env>,
}

impl<'scope, 'env> Walker<'scope, 'env> {
    fn new(head_file: Option<Head>, signatures: Signatures, checks: SignatureChecks<'scope, 'env>) -> Self {
        let vouched_through = match signatures {
            Signatures::Every => 0,
            Signatures::PastHead => head_file.map_or(0, |h| h.seq),
        };
        Self {
            head: Head::EMPTY,
            head_file,
            vouched_through,
            checkpoints: 0,
            signed_heads: 0,
            group_from: None,
            failure: None,
            checks,
        }
    }

    fn run(&mut self, conn: &Connection, mut visit: impl FnMut(&StoredRecord) -> Result<()>) -> Result<()> {
        store::for_each_stored(conn, |record| {
            let record = match record {
                Ok(record) => record,
                Err(unreadable) => {
                    self.fail(unreadable.seq, ChainFault::Unreadable(unreadable.problem));
                    return Ok(false);
                }
            };
            match self.check(&record) {
                Ok(()) => {
                    visit(&record)?;
                    Ok(true)
                }
                Err(failure) => {
                    self.failure = Some(failure);
                    Ok(false)
                }
            }
        })
    }

    /// One record: its place, content and (for a group head) signature, queued.
    fn check(&mut self, record: &StoredRecord) -> Result<(), Failure> {
        let next = self.check_place(record).map_err(|fault| self.failure_at(record.seq, fault))?;
        if record.seq > self.vouched_through {
            let from = *self.group_from.get_or_insert(record.seq);
            if !record.signature.is_empty() {
                let signature = Signature::from_slice(&record.signature).map_err(|_| Failure {
                    seq: from,
                    fault: signature_fault(from, record.seq),
                    unsigned_from: None,
                })?;
                self.checks.push(GroupHead { from, seq: record.seq, hash: next.hash, signature });
                self.signed_heads += 1;
                self.group_from = None;
            }
        }
        self.head = next;
        Ok(())
    }

    /// Link, content, checkpoint and head file; the record's head.
    fn check_place(&mut self, record: &StoredRecord) -> Result<Head, ChainFault> {
        let next = chain::check_link(record, &self.head)?;
        if record.kind == CHECKPOINT_KIND {
            check_checkpoint(&record.body, &self.head)?;
            self.checkpoints += 1;
        }
        if let Some(trusted) = self.head_file
            && next.seq == trusted.seq
            && next.hash != trusted.hash
        {
            return Err(ChainFault::NotTheHead);
        }
        Ok(next)
    }

    fn failure_at(&self, seq: i64, fault: ChainFault) -> Failure {
        Failure { seq, fault, unsigned_from: self.group_from.filter(|&from| from < seq) }
    }

    fn fail(&mut self, seq: i64, fault: ChainFault) {
        self.failure = Some(self.failure_at(seq, fault));
    }

    fn finish(self) -> Result<Verified, Failure> {
        let bad_signature = self.checks.finish();
        // Signatures were checked behind the pass: a bad one is earlier than where it stopped.
        let failure = match (bad_signature, self.failure) {
            (Some(a), Some(b)) => Some(if a.seq <= b.seq { a } else { b }),
            (a, b) => a.or(b),
        };
        if let Some(failure) = failure {
            return Err(failure);
        }
        if let Some(from) = self.group_from {
            return Err(Failure {
                seq: from,
                fault: ChainFault::Unsigned { last: self.head.seq },
                unsigned_from: None,
            });
        }
        let trusted_seq = self.head_file.map_or(0, |h| h.seq);
        if self.head.seq < trusted_seq {
            return Err(Failure {
                seq: trusted_seq,
                fault: ChainFault::Truncated { head_seq: trusted_seq, last: self.head.seq },
                unsigned_from: None,
            });
        }
        Ok(Verified {
            records: self.head.seq,
            checkpoints: self.checkpoints,
            signed_heads: self.signed_heads,
            head_hash: hex::encode(self.head.hash),
            head_file_seq: self.head_file.map(|h| h.seq),
            head: self.head,
        })
    }
}

/// A signed record ending the group that starts at `from`.
struct GroupHead {
    from: i64,
    seq: i64,
    hash: [u8; 32],
    signature: Signature,
}

/// Signatures in a batch, at most: large enough for batch verification to pay (it costs
/// about half of one-by-one here), small enough to keep both threads busy.
const BATCH: usize = 128;

/// The helper thread: where batches go, and its answer.
type Helper<'scope> = (SyncSender<Vec<GroupHead>>, ScopedJoinHandle<'scope, Option<Failure>>);

/// Group-head signatures waiting to be checked, in batches: handed to a helper thread
/// when it is free, else checked on the walking thread.
struct SignatureChecks<'scope, 'env> {
    key: VerifyingKey,
    batch: Vec<GroupHead>,
    helper: Option<Helper<'scope>>,
    scope: &'scope Scope<'scope, 'env>,
    failure: Option<Failure>,
}

impl<'scope, 'env> SignatureChecks<'scope, 'env> {
    fn new(scope: &'scope Scope<'scope, 'env>, key: VerifyingKey) -> Self {
        Self { key, batch: Vec::with_capacity(BATCH), helper: None, scope, failure: None }
    }

    fn push(&mut self, head: GroupHead) {
        self.batch.push(head);
        if self.batch.len() == BATCH {
            self.flush();
        }
    }

    fn flush(&mut self) {
        if self.batch.is_empty() || self.failure.is_some() {
            return;
        }
        let batch = std::mem::replace(&mut self.batch, Vec::with_capacity(BATCH));
        let key = self.key;
        // The helper starts with the first full batch: a short chain never pays for a thread.
        let (to_helper, _) = self.helper.get_or_insert_with(|| {
            let (to_helper, batches) = mpsc::sync_channel::<Vec<GroupHead>>(1);
            let helper = self.scope.spawn(move || {
                let mut first = None;
                for batch in batches {
                    if first.is_none() {
                        first = check_batch(&key, &batch);
                    }
                }
                first
            });
            (to_helper, helper)
        });
        let batch = match to_helper.try_send(batch) {
            Ok(()) => return,
            Err(TrySendError::Full(batch) | TrySendError::Disconnected(batch)) => batch,
        };
        self.failure = check_batch(&key, &batch);
    }

    /// The first group whose signature is not the broker's.
    fn finish(mut self) -> Option<Failure> {
        self.flush();
        let helper = self.helper.take().and_then(|(to_helper, helper)| {
            drop(to_helper);
            helper.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        });
        match (helper, self.failure) {
            (Some(a), Some(b)) => Some(if a.seq <= b.seq { a } else { b }),
            (a, b) => a.or(b),
        }
    }
}

/// `None` if every signature in the batch is the broker's; else the first group that is not.
fn check_batch(key: &VerifyingKey, batch: &[GroupHead]) -> Option<Failure> {
    let messages: Vec<&[u8]> = batch.iter().map(|head| &head.hash[..]).collect();
    let signatures: Vec<Signature> = batch.iter().map(|head| head.signature).collect();
    if ed25519_dalek::verify_batch(&messages, &signatures, &vec![*key; batch.len()]).is_ok() {
        return None;
    }
    // One by one: which group, and the authoritative answer.
    batch
        .iter()
        .find(|head| chain::check_signature(&head.hash, &head.signature.to_bytes(), key).is_err())
        .map(|head| Failure { seq: head.from, fault: signature_fault(head.from, head.seq), unsigned_from: None })
}

/// A group `from..=seq` whose signature is not the broker's.
fn signature_fault(from: i64, seq: i64) -> ChainFault {
    if from == seq { ChainFault::BadSignature } else { ChainFault::BadGroupSignature { head: seq } }
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

#[cfg(test)]
mod tests {
    use std::path::Path;

    use ed25519_dalek::SigningKey;
    use rusqlite::params;

    use super::*;
    use crate::audit::{
        Derived, Ledger, LedgerFiles,
        head::{self, Flush},
    };

    const NOTHING_DERIVED: Derived = Derived::NOTHING;

    fn key() -> SigningKey {
        SigningKey::from_bytes(&[9; 32])
    }

    /// A store written by the ledger, one commit (one group) per entry of `groups`, each
    /// of that many records.
    fn store_with_groups(dir: &Path, groups: &[usize]) -> std::path::PathBuf {
        let files = LedgerFiles { database: dir.join("audit.db"), head: dir.join("broker.key.head") };
        head::write(&files.head, &Head::EMPTY, &key(), Flush::Now).unwrap();
        let (ledger, thread) = Ledger::start(&files, key(), NOTHING_DERIVED).unwrap();
        for &records in groups {
            ledger
                .run_blocking(move |batch| {
                    for i in 0..records {
                        batch.append("test", 1, &format!("record {i} of {records}"))?;
                    }
                    Ok(())
                })
                .unwrap();
        }
        drop(ledger);
        thread.join().unwrap();
        // The WAL checkpointer's thread may still be closing: copy everything into the
        // database file itself, which `verify_tampered` copies alone.
        let conn = Connection::open(&files.database).unwrap();
        conn.busy_timeout(std::time::Duration::from_secs(5)).unwrap();
        conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(())).unwrap();
        files.database
    }

    /// Verify a copy of the store with `tamper` applied to it.
    fn verify_tampered(database: &Path, tamper: impl FnOnce(&Connection)) -> Result<Verified, Failure> {
        let copy = database.with_extension("copy");
        std::fs::copy(database, &copy).unwrap();
        let conn = Connection::open(&copy).unwrap();
        tamper(&conn);
        drop(conn);
        let store = AuditStore::open_read_only(&copy).unwrap();
        verify(&store, &key().verifying_key(), None).unwrap()
    }

    /// Change record `seq`'s body and recompute its hash and every later link and hash,
    /// keeping the signatures: what an attacker without the key can do.
    fn rewrite_and_rehash(conn: &Connection, seq: i64) {
        conn.execute("UPDATE records SET body = '\"forged\"' WHERE seq = ?1", [seq]).unwrap();
        let mut head = Head::EMPTY;
        let rows: Vec<(i64, String, i64, String)> = conn
            .prepare("SELECT seq, kind, time_ns, body FROM records ORDER BY seq")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        for (seq, kind, time_ns, body) in rows {
            let next = head.next(&kind, time_ns, &body);
            conn.execute(
                "UPDATE records SET prev_hash = ?1, hash = ?2 WHERE seq = ?3",
                params![&head.hash[..], &next.hash[..], seq],
            )
            .unwrap();
            head = next;
        }
    }

    fn signed(database: &Path) -> Vec<i64> {
        let conn = Connection::open(database).unwrap();
        let mut query = conn.prepare("SELECT seq FROM records WHERE length(signature) > 0 ORDER BY seq").unwrap();
        query.query_map([], |r| r.get(0)).unwrap().collect::<Result<_, _>>().unwrap()
    }

    #[test]
    fn each_commit_signs_its_last_record_and_every_tampering_is_named() {
        let dir = tempfile::tempdir().unwrap();
        // Groups 1-3, 4, 5-8.
        let database = store_with_groups(dir.path(), &[3, 1, 4]);
        assert_eq!(signed(&database), [3, 4, 8], "one signature per commit, on its last record");
        let verified = verify_tampered(&database, |_| {}).unwrap();
        assert_eq!((verified.records, verified.signed_heads), (8, 3));

        // A record in a group changed: named by its hash.
        let failure = verify_tampered(&database, |c| {
            c.execute("UPDATE records SET body = '\"forged\"' WHERE seq = 6", []).unwrap();
        })
        .unwrap_err();
        assert_eq!((failure.seq, &failure.fault, failure.unsigned_from), (6, &ChainFault::ContentChanged, Some(5)));
        assert!(failure.to_string().contains("records 5 to 5 before it belong to the same group"), "{failure}");

        // Changed and the chain re-hashed: only the group's signature can tell, so the
        // group is named from its first record.
        let failure = verify_tampered(&database, |c| rewrite_and_rehash(c, 6)).unwrap_err();
        assert_eq!((failure.seq, &failure.fault), (5, &ChainFault::BadGroupSignature { head: 8 }), "{failure}");
        let failure = verify_tampered(&database, |c| rewrite_and_rehash(c, 4)).unwrap_err();
        assert_eq!((failure.seq, &failure.fault), (4, &ChainFault::BadSignature), "{failure}");

        // The last group's signature removed: nothing vouches for it.
        let failure = verify_tampered(&database, |c| {
            c.execute("UPDATE records SET signature = X'' WHERE seq = 8", []).unwrap();
        })
        .unwrap_err();
        assert_eq!((failure.seq, &failure.fault), (5, &ChainFault::Unsigned { last: 8 }), "{failure}");

        // A signature that is not the broker's, or not a signature at all.
        let failure = verify_tampered(&database, |c| {
            c.execute("UPDATE records SET signature = ?1 WHERE seq = 3", [&[7u8; 64][..]]).unwrap();
        })
        .unwrap_err();
        assert_eq!((failure.seq, &failure.fault), (1, &ChainFault::BadGroupSignature { head: 3 }), "{failure}");
        let failure = verify_tampered(&database, |c| {
            c.execute("UPDATE records SET signature = X'0102' WHERE seq = 3", []).unwrap();
        })
        .unwrap_err();
        assert_eq!((failure.seq, &failure.fault), (1, &ChainFault::BadGroupSignature { head: 3 }), "{failure}");

        // A store signed on every record (each its own group) is read the same way.
        let verified = verify_tampered(&database, |c| {
            let rows: Vec<(i64, Vec<u8>)> = c
                .prepare("SELECT seq, hash FROM records")
                .unwrap()
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
            for (seq, hash) in rows {
                let head = Head { seq, hash: hash.try_into().unwrap() };
                c.execute("UPDATE records SET signature = ?1 WHERE seq = ?2", params![&head.sign(&key())[..], seq])
                    .unwrap();
            }
        })
        .unwrap();
        assert_eq!(verified.signed_heads, 8);
    }

    #[test]
    fn a_bad_signature_among_many_batches_is_found_and_named() {
        let dir = tempfile::tempdir().unwrap();
        let groups = [1; 3 * BATCH + 5];
        let database = store_with_groups(dir.path(), &groups);
        let verified = verify_tampered(&database, |_| {}).unwrap();
        assert_eq!(verified.signed_heads as usize, groups.len());
        // In the middle of the second batch, whichever thread checks it.
        let bad = BATCH as i64 + 40;
        let failure = verify_tampered(&database, |c| rewrite_and_rehash(c, bad)).unwrap_err();
        assert_eq!((failure.seq, &failure.fault), (bad, &ChainFault::BadSignature), "{failure}");
        // A later structural fault does not hide an earlier bad signature.
        let failure = verify_tampered(&database, |c| {
            rewrite_and_rehash(c, bad);
            c.execute("DELETE FROM records WHERE seq = ?1", [3 * BATCH as i64]).unwrap();
        })
        .unwrap_err();
        assert_eq!(failure.seq, bad, "{failure}");
    }
}
