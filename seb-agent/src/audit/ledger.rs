//! The ledger: the one writer of the audit store.
//!
//! Work arrives as closures that run inside a database transaction: stateful admission
//! checks, appending records, state changes. The ledger thread takes every job waiting,
//! runs each under its own savepoint, commits the batch once (one fsync for many
//! decisions) and only then answers each job. So a caller never hears of a decision that
//! is not on disk, and all state checks and writes are serialised.
//!
//! The queue is bounded. Work done for a socket request uses [`Ledger::try_run`]: a full
//! queue is answered with [`LedgerBusy`] at once, so an overloaded ledger never holds a
//! runtime worker. The broker's own work waits for room without blocking a worker
//! ([`Ledger::run`]), and threads outside the runtime block ([`Ledger::run_blocking`]).

use std::{
    path::{Path, PathBuf},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};
use ed25519_dalek::SigningKey;
use rusqlite::{Connection, Transaction, TransactionBehavior, params};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};
use tracing::{error, info};

use super::{
    chain::{Head, StoredRecord},
    head::{self, Flush, HeadFile},
    now_ns,
    store::{self, OpenFiles},
    verify::{self, Signatures},
};

/// Record kind of the periodic signed checkpoints.
pub const CHECKPOINT_KIND: &str = "checkpoint";
const CHECKPOINT_RECORDS: u64 = 1024;
const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(5);
const MAX_BATCH: usize = 512;
/// Room for a usual record body (a decision), so that serialising one does not grow
/// the buffer step by step.
const USUAL_RECORD: usize = 1024;
/// Jobs waiting for the ledger thread, at most.
pub const QUEUE: usize = 4096;

/// The ledger's queue is full: the request is refused rather than left waiting.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the audit ledger is busy ({QUEUE} jobs waiting); try again")]
pub struct LedgerBusy;

/// Whether an error is, at its root, a full ledger queue.
pub fn is_busy(error: &anyhow::Error) -> bool {
    error.downcast_ref::<LedgerBusy>().is_some()
}

/// A checkpoint: the chain head at a point, signed like every record. Exported
/// checkpoints let a verifier also detect truncation of the newest records.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Checkpoint {
    pub through_seq: i64,
    pub head_hash: String,
    pub records_since_previous: u64,
}

/// State derived from the records (the admission state). Its tables are temporary tables
/// of the ledger's connection: no other process can change them, and they are rebuilt
/// from the verified chain at each start, then kept current by the jobs that append the
/// records they derive from (with the same `apply`).
#[derive(Clone, Copy)]
pub struct Derived {
    /// Creates the (temporary) tables.
    pub schema: &'static str,
    /// How one record changes the state.
    pub apply: fn(&Connection, &StoredRecord) -> Result<()>,
    /// Run at start in the transaction that verified the store, right after the walk:
    /// temporary tables of what start-up work needs from the records (the decisions left
    /// without an outcome), taken while the store is known to be the verified chain.
    /// Read after that transaction, the store is whatever its writers made it since.
    pub at_start: &'static str,
}

impl Derived {
    /// No derived state.
    pub const NOTHING: Derived = Derived { schema: "", apply: |_, _| Ok(()), at_start: "" };
}

/// The last record of each kind as verified at start (`temp.last_at_start`), for what
/// start-up work resumes from: see [`store::last_body_at_start`].
const LAST_AT_START: &str = "
DROP TABLE IF EXISTS temp.last_at_start;
CREATE TEMP TABLE last_at_start AS
    SELECT kind, seq, body FROM main.records WHERE seq IN (SELECT max(seq) FROM main.records GROUP BY kind);
";

/// The ledger's files: the store, and the head file kept beside the signing key.
#[derive(Debug, Clone)]
pub struct LedgerFiles {
    pub database: PathBuf,
    pub head: PathBuf,
}

impl LedgerFiles {
    pub fn new(database: &Path, signing_key: &Path) -> Self {
        Self { database: database.to_path_buf(), head: head::path_for(signing_key) }
    }
}

/// One group commit that appended records.
#[derive(Debug, Clone, Copy)]
pub struct Commit {
    /// Its COMMIT, the fsync included.
    pub duration: Duration,
    pub records: u64,
}

/// Called on the ledger thread after each group commit that appended records.
pub type OnCommit = Box<dyn Fn(&Commit) + Send>;

/// How the ledger runs.
pub struct LedgerOptions {
    /// Jobs waiting, at most.
    pub queue: usize,
    /// Called on the ledger thread after each group commit that appended records (for
    /// metrics: keep it short).
    pub on_commit: Option<OnCommit>,
}

impl Default for LedgerOptions {
    fn default() -> Self {
        Self { queue: QUEUE, on_commit: None }
    }
}

type Completion = Box<dyn FnOnce(Result<(), String>) + Send>;
/// Runs the work in the batch, or (`None`) only hands back its completion, for a batch
/// that failed before the job's turn.
type Job = Box<dyn FnOnce(Option<&mut Batch<'_>>) -> (bool, Completion) + Send>;

/// Handle for submitting work; cheap to clone.
#[derive(Clone)]
pub struct Ledger {
    jobs: mpsc::Sender<Job>,
}

/// What a job sees: its savepoint in the open transaction, and the chain head.
pub struct Batch<'a> {
    conn: &'a Connection,
    head: Head,
    appended: u64,
}

impl Batch<'_> {
    /// Append a signed, chained record; returns its sequence number.
    pub fn append<T: Serialize + ?Sized>(&mut self, kind: &str, time_ns: i64, body: &T) -> Result<i64> {
        Ok(self.append_record(kind, time_ns, body)?.seq)
    }

    /// The same, returning the record as stored (to derive state from it). Its signature
    /// is empty: the commit signs the last record of the group.
    pub fn append_record<T: Serialize + ?Sized>(&mut self, kind: &str, time_ns: i64, body: &T) -> Result<StoredRecord> {
        let mut json = Vec::with_capacity(USUAL_RECORD);
        serde_json::to_writer(&mut json, body)?;
        let body = String::from_utf8(json)?;
        let prev = self.head;
        let next = prev.next(kind, time_ns, &body);
        self.conn
            .prepare_cached(
                "INSERT INTO records (seq, kind, time_ns, body, prev_hash, hash, signature) VALUES (?1, ?2, ?3, ?4, ?5, ?6, X'')",
            )?
            .execute(params![next.seq, kind, time_ns, body, &prev.hash[..], &next.hash[..]])
            .and_then(store::one_row)
            .context("appending a record")?;
        self.head = next;
        self.appended += 1;
        Ok(StoredRecord {
            seq: next.seq,
            kind: kind.into(),
            time_ns,
            body,
            prev_hash: prev.hash.to_vec(),
            hash: next.hash.to_vec(),
            signature: Vec::new(),
        })
    }

    /// The transaction, for state reads and writes.
    pub fn conn(&self) -> &Connection {
        self.conn
    }
}

/// What the ledger thread owns.
struct Writer {
    conn: Connection,
    key: SigningKey,
    head: Head,
    head_file: HeadFile,
    /// The head file could not take the last committed head: the records are in the
    /// store (their callers were told so), and nothing more commits until it does.
    head_file_behind: bool,
    open_files: OpenFiles,
    since_checkpoint: u64,
    last_checkpoint: Instant,
    on_commit: Option<OnCommit>,
    /// The store's schema cookie when it was verified: a trigger or table added to the
    /// file since (by another writer) changes it, and no commit goes through then.
    schema_version: i64,
    /// Dropped with the writer, which stops the WAL checkpointer.
    _checkpointer: std::sync::mpsc::Sender<()>,
}

impl Ledger {
    /// Open the store, verify it against the head file, rebuild the derived state, and
    /// start the ledger thread; it stops when every handle is dropped. Refuses a store
    /// that is missing, truncated, replaced or altered while the head file says
    /// otherwise, naming why.
    pub fn start(files: &LedgerFiles, key: SigningKey, derived: Derived) -> Result<(Self, JoinHandle<()>)> {
        Self::start_with(files, key, derived, LedgerOptions::default())
    }

    /// The same with a queue of `queue` jobs.
    pub fn start_with_queue(
        files: &LedgerFiles,
        key: SigningKey,
        derived: Derived,
        queue: usize,
    ) -> Result<(Self, JoinHandle<()>)> {
        Self::start_with(files, key, derived, LedgerOptions { queue, ..LedgerOptions::default() })
    }

    /// The same, as `options` say.
    pub fn start_with(
        files: &LedgerFiles,
        key: SigningKey,
        derived: Derived,
        options: LedgerOptions,
    ) -> Result<(Self, JoinHandle<()>)> {
        let LedgerOptions { queue, on_commit } = options;
        let (conn, head, schema_version) = open_verified(files, &key, derived)?;
        let checkpointer = store::start_wal_checkpointer(&conn, &files.database)?;
        let mut open_files = OpenFiles::pin(&files.database)?;
        let head_file = HeadFile::create(&files.head, &head, &key)?;
        // A head file renamed over the one the ledger writes would go unwritten (the
        // ledger writing to the unlinked one) while an old head stood at its path.
        open_files.watch(&files.head)?;
        let writer = Writer {
            conn,
            key,
            head,
            head_file,
            head_file_behind: false,
            open_files,
            since_checkpoint: 0,
            last_checkpoint: Instant::now(),
            on_commit,
            schema_version,
            _checkpointer: checkpointer,
        };
        let (jobs, queue) = mpsc::channel::<Job>(queue);
        let thread = std::thread::Builder::new()
            .name("seb-ledger".into())
            .spawn(move || run_ledger(writer, queue))
            .context("starting the ledger thread")?;
        Ok((Self { jobs }, thread))
    }

    /// Package `work` as a job and the receiver of its result, which arrives once the
    /// batch is durably committed.
    fn job<R: Send + 'static>(
        work: impl FnOnce(&mut Batch<'_>) -> Result<R> + Send + 'static,
    ) -> (Job, oneshot::Receiver<Result<R>>) {
        let (reply, result) = oneshot::channel();
        let job: Job = Box::new(move |batch| {
            let outcome = match batch {
                Some(batch) => work(batch),
                None => Err(anyhow!("the audit batch failed before this job ran")),
            };
            let ok = outcome.is_ok();
            let completion: Completion = Box::new(move |committed| {
                let _ = reply.send(committed.map_err(|e| anyhow!("committing the audit store: {e}")).and(outcome));
            });
            (ok, completion)
        });
        (job, result)
    }

    /// For socket requests: queue `work` if there is room, else fail with [`LedgerBusy`]
    /// at once.
    pub async fn try_run<R: Send + 'static>(
        &self,
        work: impl FnOnce(&mut Batch<'_>) -> Result<R> + Send + 'static,
    ) -> Result<R> {
        let (job, result) = Self::job(work);
        match self.jobs.try_send(job) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => return Err(LedgerBusy.into()),
            Err(mpsc::error::TrySendError::Closed(_)) => return Err(anyhow!("the audit ledger stopped")),
        }
        result.await.map_err(|_| anyhow!("the audit ledger stopped"))?
    }

    /// For the broker's own work: wait (without blocking a worker) for room in the queue.
    pub async fn run<R: Send + 'static>(
        &self,
        work: impl FnOnce(&mut Batch<'_>) -> Result<R> + Send + 'static,
    ) -> Result<R> {
        let (job, result) = Self::job(work);
        self.jobs.send(job).await.map_err(|_| anyhow!("the audit ledger stopped"))?;
        result.await.map_err(|_| anyhow!("the audit ledger stopped"))?
    }

    /// For threads outside the async runtime: block until queued and committed.
    pub fn run_blocking<R: Send + 'static>(
        &self,
        work: impl FnOnce(&mut Batch<'_>) -> Result<R> + Send + 'static,
    ) -> Result<R> {
        self.submit_blocking(work).blocking_recv().map_err(|_| anyhow!("the audit ledger stopped"))?
    }

    /// Queue `work` from outside the runtime, blocking for room; the receiver yields its
    /// result once committed (a stopped ledger drops it, which the receiver reports).
    fn submit_blocking<R: Send + 'static>(
        &self,
        work: impl FnOnce(&mut Batch<'_>) -> Result<R> + Send + 'static,
    ) -> oneshot::Receiver<Result<R>> {
        let (job, result) = Self::job(work);
        let _ = self.jobs.blocking_send(job);
        result
    }
}

/// The store, checked against the head file and verified, with the derived state rebuilt
/// from it; its head, and the schema version it was verified under (any change after
/// fails the next commit).
fn open_verified(files: &LedgerFiles, key: &SigningKey, derived: Derived) -> Result<(Connection, Head, i64)> {
    let database = files.database.display();
    let public = key.verifying_key();
    let Some(trusted) = head::read(&files.head, &public)? else {
        bail!(
            "the audit head file {} is missing although the signing key exists, so the store {database} cannot be \
             checked for removed records; refusing to start. If the store is known to be intact (written by a version \
             without head files), `seb-agent audit adopt --force` verifies it and records its head",
            files.head.display()
        );
    };
    let exists = files.database.try_exists().with_context(|| format!("checking {database}"))?;
    if !exists && trusted.seq > 0 {
        bail!(
            "the audit store {database} does not exist, but the head file {} says it held {} records; refusing to \
             start on an empty store (restore the store)",
            files.head.display(),
            trusted.seq
        );
    }
    let mut conn = store::open_writable(&files.database, trusted.seq == 0)?;
    let started = Instant::now();
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    // Checked again under the write lock, with the index rebuilt from the table the walk
    // reads and the schema version taken here: nothing can slip in between.
    store::check_schema(&tx)?;
    store::rebuild_index(&tx)?;
    // The derived state's schema drops tables earlier versions left in the store, which
    // moves the schema version: it is taken after.
    tx.execute_batch(derived.schema).context("creating the derived state")?;
    let schema_version = store::schema_version(&tx)?;
    let verified = verify::walk(&tx, &public, Some(trusted), Signatures::PastHead, |record| {
        (derived.apply)(&tx, record).with_context(|| format!("record {}: deriving the admission state", record.seq))
    })?
    .map_err(|failure| {
        anyhow!(
            "the audit store {database} fails verification at {failure} (head file {}); refusing to start",
            files.head.display()
        )
    })?;
    tx.execute_batch(LAST_AT_START).context("keeping the last record of each kind")?;
    tx.execute_batch(derived.at_start).context("keeping what start-up work needs from the records")?;
    tx.commit()?;
    info!(
        records = verified.records,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "audit store verified against its head file; admission state rebuilt from it"
    );
    Ok((conn, verified.head, schema_version))
}

fn run_ledger(mut writer: Writer, mut queue: mpsc::Receiver<Job>) {
    while let Some(first) = queue.blocking_recv() {
        let mut jobs = vec![first];
        while jobs.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
        let (result, completions) = writer.run_batch(jobs);
        let result = result.map_err(|e| format!("{e:#}"));
        if let Err(e) = &result {
            error!(error = %e, "an audit batch failed; its callers are told so");
        }
        for completion in completions {
            completion(result.clone());
        }
    }
    if let Err(e) = writer.head_file.record(&writer.head, &writer.key, Flush::Now) {
        error!(error = %format!("{e:#}"), "the audit head file could not be flushed at stop");
    }
}

impl Writer {
    /// Run the jobs in one transaction, each under its own savepoint, and commit once.
    /// Every job's completion is returned, whatever fails.
    fn run_batch(&mut self, jobs: Vec<Job>) -> (Result<()>, Vec<Completion>) {
        let mut completions = Vec::with_capacity(jobs.len());
        let mut jobs = jobs.into_iter();
        let result = self.try_batch(&mut jobs, &mut completions);
        // Jobs the failure left unrun still answer, with the error.
        completions.extend(jobs.map(|job| job(None).1));
        (result, completions)
    }

    fn try_batch(&mut self, jobs: &mut impl Iterator<Item = Job>, completions: &mut Vec<Completion>) -> Result<()> {
        // Fail closed rather than record into a store file nobody will see again, or past
        // a head file that no longer follows the store (its truncation would go unseen).
        self.open_files.check()?;
        if self.head_file_behind {
            self.head_file
                .record(&self.head, &self.key, Flush::Now)
                .context("the audit head file is behind the store and still cannot be written")?;
            self.head_file_behind = false;
        }
        let mut tx =
            self.conn.transaction_with_behavior(TransactionBehavior::Immediate).context("beginning a transaction")?;
        let mut head = self.head;
        let mut appended = 0;
        for job in jobs.by_ref() {
            let mut savepoint = match tx.savepoint() {
                Ok(savepoint) => savepoint,
                Err(e) => {
                    completions.push(job(None).1);
                    return Err(e).context("opening a savepoint");
                }
            };
            let mut batch = Batch { conn: &savepoint, head, appended };
            let (ok, completion) = job(Some(&mut batch));
            let (job_head, job_appended) = (batch.head, batch.appended);
            completions.push(completion);
            if ok {
                savepoint.commit().context("releasing a savepoint")?;
                (head, appended) = (job_head, job_appended);
            } else {
                savepoint.rollback().context("rolling back a failed job")?;
                savepoint.finish().context("releasing a rolled back savepoint")?;
            }
        }
        self.since_checkpoint += appended;
        let due = self.since_checkpoint >= CHECKPOINT_RECORDS
            || (self.since_checkpoint > 0 && self.last_checkpoint.elapsed() >= CHECKPOINT_INTERVAL);
        if due {
            head = append_checkpoint(&tx, head, self.since_checkpoint)?;
        }
        if head != self.head {
            // One signature for the group: on its last record, covering every record before.
            tx.prepare_cached("UPDATE records SET signature = ?1 WHERE seq = ?2")?
                .execute(params![&head.sign(&self.key)[..], head.seq])
                .and_then(store::one_row)
                .context("signing the group's head")?;
        }
        self.open_files.check()?;
        if store::schema_version(&tx)? != self.schema_version {
            bail!("the audit store's schema changed while the broker ran (a trigger or table added to its file)");
        }
        let committing = Instant::now();
        tx.commit().context("committing")?;
        let commit = Commit { duration: committing.elapsed(), records: (head.seq - self.head.seq) as u64 };
        if due {
            self.since_checkpoint = 0;
            self.last_checkpoint = Instant::now();
        }
        let moved = head != self.head;
        self.head = head;
        if moved {
            // Before anyone hears of the records: a later truncation is then detectable.
            let flush = if due { Flush::Now } else { Flush::Later };
            if let Err(e) = self.head_file.record(&head, &self.key, flush) {
                // Committed all the same: this batch's callers hear the truth, the next
                // batch fails unless the head file takes the head first.
                error!(error = %format!("{e:#}"), seq = head.seq, "the audit head file fell behind the store");
                self.head_file_behind = true;
            }
            if let Some(on_commit) = &self.on_commit {
                on_commit(&commit);
            }
        }
        Ok(())
    }
}

fn append_checkpoint(tx: &Transaction<'_>, head: Head, since_previous: u64) -> Result<Head> {
    let checkpoint =
        Checkpoint { through_seq: head.seq, head_hash: hex::encode(head.hash), records_since_previous: since_previous };
    let mut batch = Batch { conn: tx, head, appended: 0 };
    batch.append(CHECKPOINT_KIND, now_ns(), &checkpoint)?;
    Ok(batch.head)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOTHING_DERIVED: Derived = Derived::NOTHING;

    fn start(dir: &Path) -> (Ledger, JoinHandle<()>, LedgerFiles) {
        let key = SigningKey::from_bytes(&[5; 32]);
        let files = LedgerFiles { database: dir.join("audit.db"), head: dir.join("broker.key.head") };
        if !files.head.exists() {
            head::write(&files.head, &Head::EMPTY, &key, Flush::Now).unwrap();
        }
        let (ledger, thread) = Ledger::start(&files, key, NOTHING_DERIVED).unwrap();
        (ledger, thread, files)
    }

    fn append(ledger: &Ledger, fail: bool) -> oneshot::Receiver<Result<i64>> {
        ledger.submit_blocking(move |batch| {
            let seq = batch.append("test", 1, "x")?;
            if fail { Err(anyhow!("this job fails after appending")) } else { Ok(seq) }
        })
    }

    #[test]
    fn a_failed_job_is_rolled_back_alone_and_the_head_file_follows_each_commit() {
        let dir = tempfile::tempdir().unwrap();
        let (ledger, thread, files) = start(dir.path());
        let results: Vec<_> = [false, true, false].map(|fail| append(&ledger, fail)).into_iter().collect();
        let results: Vec<_> = results.into_iter().map(|r| r.blocking_recv().unwrap()).collect();
        assert_eq!(results[0].as_ref().unwrap(), &1);
        assert!(format!("{:#}", results[1].as_ref().unwrap_err()).contains("fails after appending"));
        assert_eq!(results[2].as_ref().unwrap(), &2, "the failed job's record was rolled back, its seq reused");
        let key = SigningKey::from_bytes(&[5; 32]).verifying_key();
        assert_eq!(head::read(&files.head, &key).unwrap().unwrap().seq, 2);
        drop(ledger);
        thread.join().unwrap();

        // A restart verifies the store against the head file and goes on from it.
        let (ledger, _thread, _) = start(dir.path());
        assert_eq!(append(&ledger, false).blocking_recv().unwrap().unwrap(), 3);
    }

    /// A head file that cannot be written after a commit: the committed records' callers
    /// are told they were recorded (they were), the next batch is refused before it
    /// commits, and once the file takes writes again the head is written first.
    #[test]
    fn a_head_file_write_failing_after_a_commit_stops_the_next_one() {
        let dir = tempfile::tempdir().unwrap();
        let (ledger, _thread, files) = start(dir.path());
        let key = SigningKey::from_bytes(&[5; 32]).verifying_key();
        assert_eq!(append(&ledger, false).blocking_recv().unwrap().unwrap(), 1);
        let immutable = |on: bool| {
            let flag = if on { "+i" } else { "-i" };
            let status = std::process::Command::new("chattr").arg(flag).arg(&files.head).status().unwrap();
            assert!(status.success(), "chattr {flag} (needs root)");
        };
        immutable(true);
        assert_eq!(append(&ledger, false).blocking_recv().unwrap().unwrap(), 2, "committed, and told so");
        let refused = append(&ledger, false).blocking_recv().unwrap();
        immutable(false);
        let error = format!("{:#}", refused.unwrap_err());
        assert!(error.contains("head file is behind the store"), "{error}");
        assert_eq!(head::read(&files.head, &key).unwrap().unwrap().seq, 1, "the head file could not follow");
        assert_eq!(append(&ledger, false).blocking_recv().unwrap().unwrap(), 3, "the refused batch committed nothing");
        assert_eq!(head::read(&files.head, &key).unwrap().unwrap().seq, 3);
    }

    #[test]
    fn a_head_file_replaced_under_the_ledger_fails_the_next_commit() {
        let dir = tempfile::tempdir().unwrap();
        let (ledger, _thread, files) = start(dir.path());
        assert_eq!(append(&ledger, false).blocking_recv().unwrap().unwrap(), 1);
        // An old copy put back at the head file's path.
        let old = dir.path().join("old.head");
        std::fs::copy(&files.head, &old).unwrap();
        assert_eq!(append(&ledger, false).blocking_recv().unwrap().unwrap(), 2);
        std::fs::rename(&old, &files.head).unwrap();
        let error = format!("{:#}", append(&ledger, false).blocking_recv().unwrap().unwrap_err());
        assert!(error.contains("broker.key.head was replaced while the broker ran"), "{error}");
    }

    #[test]
    fn a_store_deleted_under_the_ledger_fails_every_queued_job_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let (ledger, _thread, files) = start(dir.path());
        assert_eq!(append(&ledger, false).blocking_recv().unwrap().unwrap(), 1);
        std::fs::remove_file(&files.database).unwrap();
        let results: Vec<_> = (0..3).map(|_| append(&ledger, false)).collect();
        for result in results {
            let error = format!("{:#}", result.blocking_recv().expect("every job is answered").unwrap_err());
            assert!(error.contains("was deleted while the broker ran"), "{error}");
        }
        let key = SigningKey::from_bytes(&[5; 32]).verifying_key();
        assert_eq!(head::read(&files.head, &key).unwrap().unwrap().seq, 1, "nothing more was committed");
    }

    #[test]
    fn a_trigger_added_under_the_ledger_fails_every_commit() {
        let dir = tempfile::tempdir().unwrap();
        let (ledger, _thread, files) = start(dir.path());
        assert_eq!(append(&ledger, false).blocking_recv().unwrap().unwrap(), 1);
        // AFTER INSERT: the insert still changes one row (and so does the group's
        // signature), the trigger then rewrites what the record says.
        let other = Connection::open(&files.database).unwrap();
        other
            .execute_batch(
                "CREATE TRIGGER rewrite AFTER INSERT ON records BEGIN \
                 UPDATE records SET body = '\"nothing happened\"' WHERE seq = new.seq; END;",
            )
            .unwrap();
        let error = format!("{:#}", append(&ledger, false).blocking_recv().unwrap().unwrap_err());
        assert!(error.contains("schema changed while the broker ran"), "{error}");
        let key = SigningKey::from_bytes(&[5; 32]).verifying_key();
        assert_eq!(head::read(&files.head, &key).unwrap().unwrap().seq, 1, "nothing more was committed");
    }

    #[test]
    fn a_table_the_derived_state_drops_at_start_does_not_fail_the_commits_after() {
        let dir = tempfile::tempdir().unwrap();
        let (ledger, thread, files) = start(dir.path());
        assert_eq!(append(&ledger, false).blocking_recv().unwrap().unwrap(), 1);
        drop(ledger);
        thread.join().unwrap();
        // Left by an earlier version (or by anyone): the derived state drops it at start.
        Connection::open(&files.database).unwrap().execute_batch("CREATE TABLE legacy (x)").unwrap();
        let dropping = Derived { schema: "DROP TABLE IF EXISTS main.legacy;", ..Derived::NOTHING };
        let (ledger, _thread) = Ledger::start(&files, SigningKey::from_bytes(&[5; 32]), dropping).unwrap();
        assert_eq!(append(&ledger, false).blocking_recv().unwrap().unwrap(), 2);
    }

    #[test]
    fn a_store_replaced_under_the_ledger_fails_closed() {
        let dir = tempfile::tempdir().unwrap();
        let (ledger, _thread, files) = start(dir.path());
        assert_eq!(append(&ledger, false).blocking_recv().unwrap().unwrap(), 1);
        let copy = dir.path().join("copy.db");
        std::fs::copy(&files.database, &copy).unwrap();
        std::fs::rename(&copy, &files.database).unwrap();
        let error = format!("{:#}", append(&ledger, false).blocking_recv().unwrap().unwrap_err());
        assert!(error.contains("audit.db was replaced while the broker ran"), "{error}");
    }

    /// A ledger with a queue of two, its thread held inside a job until `release` drops.
    fn held_ledger(dir: &Path) -> (Ledger, JoinHandle<()>, std::sync::mpsc::Sender<()>) {
        let key = SigningKey::from_bytes(&[7; 32]);
        let files = LedgerFiles { database: dir.join("audit.db"), head: dir.join("broker.key.head") };
        head::write(&files.head, &Head::EMPTY, &key, Flush::Now).unwrap();
        let (ledger, thread) = Ledger::start_with_queue(&files, key, NOTHING_DERIVED, 2).expect("starting the ledger");
        let (release, held) = std::sync::mpsc::channel::<()>();
        let (entered, inside) = std::sync::mpsc::channel();
        let holder = ledger.clone();
        std::thread::spawn(move || {
            holder.run_blocking(move |_| {
                entered.send(()).unwrap();
                let _ = held.recv();
                Ok(())
            })
        });
        inside.recv_timeout(Duration::from_secs(5)).expect("the ledger thread took the holding job");
        (ledger, thread, release)
    }

    #[test]
    fn a_full_queue_answers_busy_at_once_and_broker_work_waits_for_room() {
        let dir = tempfile::tempdir().unwrap();
        let (ledger, thread, release) = held_ledger(dir.path());
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        // Two jobs fill the queue.
        let queued: Vec<_> = (0..2)
            .map(|i| {
                let ledger = ledger.clone();
                runtime.spawn(async move { ledger.try_run(move |batch| batch.append("test", i, &i)).await })
            })
            .collect();
        runtime.block_on(async {
            while ledger.jobs.capacity() > 0 {
                tokio::task::yield_now().await;
            }
        });

        // A socket request now hears `busy` at once, from a thread that is never blocked.
        let (answer, answered) = std::sync::mpsc::channel();
        let asker = ledger.clone();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
            let _ = answer.send(runtime.block_on(asker.try_run(|batch| batch.append("test", 9, &9))));
        });
        let busy = answered.recv_timeout(Duration::from_secs(2)).expect("try_run blocked on a full queue");
        assert!(busy.as_ref().is_err_and(is_busy), "{busy:?}");

        // Broker work waits for room instead, without holding its runtime thread.
        let waiting = {
            let ledger = ledger.clone();
            runtime.spawn(async move { ledger.run(|batch| batch.append("test", 10, &10)).await })
        };
        runtime.block_on(async { tokio::time::sleep(Duration::from_millis(50)).await });
        assert!(!waiting.is_finished());

        drop(release);
        for job in queued {
            runtime.block_on(job).unwrap().expect("a queued job is recorded");
        }
        runtime.block_on(waiting).unwrap().expect("the waiting job is recorded once there is room");
        drop(ledger);
        thread.join().unwrap();
    }
}
