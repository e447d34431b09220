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
    path::Path,
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow};
use ed25519_dalek::SigningKey;
use rusqlite::{Connection, Transaction, TransactionBehavior, params};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};
use tracing::error;

use super::{
    chain::{self, Head},
    now_ns, store,
};

/// Record kind of the periodic signed checkpoints.
pub const CHECKPOINT_KIND: &str = "checkpoint";
const CHECKPOINT_RECORDS: u64 = 1024;
const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(5);
const MAX_BATCH: usize = 512;
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

type Completion = Box<dyn FnOnce(Result<(), String>) + Send>;
type Job = Box<dyn FnOnce(&mut Batch<'_>) -> (bool, Completion) + Send>;

/// Handle for submitting work; cheap to clone.
#[derive(Clone)]
pub struct Ledger {
    jobs: mpsc::Sender<Job>,
}

/// What a job sees: the open transaction and the chain head.
pub struct Batch<'a> {
    tx: Transaction<'a>,
    head: Head,
    key: &'a SigningKey,
    appended: u64,
}

impl Batch<'_> {
    /// Append a signed, chained record; returns its sequence number.
    pub fn append<T: Serialize + ?Sized>(&mut self, kind: &str, time_ns: i64, body: &T) -> Result<i64> {
        let body = serde_json::to_string(body)?;
        let sealed = chain::seal(&self.head, self.key, kind, time_ns, &body);
        self.tx
            .prepare_cached(
                "INSERT INTO records (seq, kind, time_ns, body, prev_hash, hash, signature) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?
            .execute(params![sealed.seq, kind, time_ns, body, &sealed.prev_hash[..], &sealed.hash[..], &sealed.signature[..]])?;
        self.head = Head { seq: sealed.seq, hash: sealed.hash };
        self.appended += 1;
        Ok(sealed.seq)
    }

    /// The transaction, for state reads and writes.
    pub fn conn(&self) -> &Connection {
        &self.tx
    }
}

impl Ledger {
    /// Open the store and start the ledger thread; it stops when every handle is dropped.
    pub fn start(path: &Path, key: SigningKey) -> Result<(Self, JoinHandle<()>)> {
        Self::start_with_queue(path, key, QUEUE)
    }

    /// The same with a queue of `queue` jobs.
    pub fn start_with_queue(path: &Path, key: SigningKey, queue: usize) -> Result<(Self, JoinHandle<()>)> {
        let conn = store::open_writable(path)?;
        let head = store::head(&conn)?;
        let (jobs, queue) = mpsc::channel::<Job>(queue);
        let thread = std::thread::Builder::new()
            .name("seb-ledger".into())
            .spawn(move || run_ledger(conn, key, head, queue))
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
            let outcome = work(batch);
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
        let (job, result) = Self::job(work);
        self.jobs.blocking_send(job).map_err(|_| anyhow!("the audit ledger stopped"))?;
        result.blocking_recv().map_err(|_| anyhow!("the audit ledger stopped"))?
    }
}

fn run_ledger(mut conn: Connection, key: SigningKey, mut head: Head, mut queue: mpsc::Receiver<Job>) {
    let mut since_checkpoint = 0u64;
    let mut last_checkpoint = Instant::now();
    while let Some(first) = queue.blocking_recv() {
        let mut jobs = vec![first];
        while jobs.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
        let (result, completions) =
            run_batch(&mut conn, &key, &mut head, jobs, &mut since_checkpoint, &mut last_checkpoint);
        let result = result.map_err(|e| format!("{e:#}"));
        if let Err(e) = &result {
            error!(error = %e, "an audit batch failed; its callers are told so");
        }
        for completion in completions {
            completion(result.clone());
        }
    }
}

fn run_batch(
    conn: &mut Connection,
    key: &SigningKey,
    head: &mut Head,
    jobs: Vec<Job>,
    since_checkpoint: &mut u64,
    last_checkpoint: &mut Instant,
) -> (Result<()>, Vec<Completion>) {
    let mut completions = Vec::with_capacity(jobs.len());
    let tx = match conn.transaction_with_behavior(TransactionBehavior::Immediate) {
        Ok(tx) => tx,
        Err(e) => {
            // Still run each job so it can answer; nothing it wrote is kept.
            return (Err(e.into()), Vec::new());
        }
    };
    let mut batch = Batch { tx, head: *head, key, appended: 0 };
    for job in jobs {
        let before = (batch.head, batch.appended);
        let _ = batch.tx.execute_batch("SAVEPOINT job");
        let (ok, completion) = job(&mut batch);
        if ok {
            let _ = batch.tx.execute_batch("RELEASE job");
        } else {
            let _ = batch.tx.execute_batch("ROLLBACK TO job; RELEASE job");
            (batch.head, batch.appended) = before;
        }
        completions.push(completion);
    }
    *since_checkpoint += batch.appended;
    let due = *since_checkpoint >= CHECKPOINT_RECORDS
        || (*since_checkpoint > 0 && last_checkpoint.elapsed() >= CHECKPOINT_INTERVAL);
    if due {
        let checkpoint = Checkpoint {
            through_seq: batch.head.seq,
            head_hash: hex::encode(batch.head.hash),
            records_since_previous: *since_checkpoint,
        };
        if let Err(e) = batch.append(CHECKPOINT_KIND, now_ns(), &checkpoint) {
            return (Err(e), completions);
        }
        *since_checkpoint = 0;
        *last_checkpoint = Instant::now();
    }
    let new_head = batch.head;
    match batch.tx.commit() {
        Ok(()) => {
            *head = new_head;
            (Ok(()), completions)
        }
        Err(e) => (Err(e.into()), completions),
    }
}

#[cfg(test)]
mod tests {
    use std::{sync::mpsc as sync_mpsc, time::Duration};

    use super::*;

    /// A ledger with a queue of two, its thread held inside a job until `release` drops.
    fn held_ledger(dir: &Path) -> (Ledger, JoinHandle<()>, sync_mpsc::Sender<()>) {
        let (ledger, thread) = Ledger::start_with_queue(&dir.join("audit.db"), SigningKey::from_bytes(&[7; 32]), 2)
            .expect("starting the ledger");
        let (release, held) = sync_mpsc::channel::<()>();
        let (entered, inside) = sync_mpsc::channel();
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
        let (answer, answered) = sync_mpsc::channel();
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
