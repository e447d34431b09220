//! Draining kernel denials from the ring buffer into the audit store.
//!
//! Runs on its own thread: poll the ring buffer, drain it, enrich each event (executable,
//! cgroup path, wall-clock time) and write the batch in one durable transaction. Every
//! denial drained is counted in the metrics; past a per-second budget, denials are summed into
//! one record per second rather than recorded one by one (see `denial_budget`). Events
//! the kernel could not queue (ring full), and refusals it did not queue (their cgroup
//! past its rate in the kernel), are counted in kernel counters; every increase becomes
//! a `ring_loss` record, so neither is ever silent.

use std::{
    os::fd::AsRawFd,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow};
use aya::{
    Ebpf,
    maps::{MapData, RingBuf},
};
use seb_common::{DenialEvent, map_names};
use serde::{Deserialize, Serialize};
use tracing::{error, info, warn};

use crate::{
    audit::{KernelDenial, Ledger, denial, now_ns, store},
    cgroupfs::CgroupNames,
    cluster::directory::SharedDirectory,
    denial_backlog::{Backlog, UNWRITTEN_KIND},
    denial_budget::{DenialBudget, SUPPRESSED_KIND, Suppressed},
    enforcement::maps::Counters,
    metrics::Metrics,
};

/// Record kind for lost denials.
pub const RING_LOSS_KIND: &str = "ring_loss";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RingLoss {
    /// Denials lost since the previous `ring_loss` record.
    pub lost: u64,
    /// The kernel's running total of lost denials.
    pub lost_total: u64,
    /// Refusals the kernel counted but did not queue since the previous record, their
    /// cgroup being past its rate (`seb_common::DENIALS_PER_CGROUP_SECOND`), and the
    /// kernel's running total of them.
    #[serde(default)]
    pub over_rate: u64,
    #[serde(default)]
    pub over_rate_total: u64,
    /// Which counter `lost_total` is of (boot id and map id): a reboot or a reinstall
    /// starts a new one at zero.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub counter: Option<String>,
}

impl RingLoss {
    /// Where counting resumes for `counter` (lost, over rate): the recorded totals if
    /// this record is of the same counter, else zero (a fresh counter; all of it is new).
    fn baseline(last: Option<&RingLoss>, counter: &str) -> (u64, u64) {
        last.filter(|loss| loss.counter.as_deref() == Some(counter))
            .map_or((0, 0), |loss| (loss.lost_total, loss.over_rate_total))
    }
}

pub struct Recorder {
    ring: RingBuf<MapData>,
    counters: Counters,
    /// The counter's instance, stamped on each `ring_loss` record.
    counter: String,
    ledger: Ledger,
    names: CgroupNames,
    /// The kernel's totals (lost, over rate) as last recorded.
    recorded_losses: (u64, u64),
    metrics: Arc<Metrics>,
    directory: SharedDirectory,
    /// The kubelet's pod cgroup, relative to the mount (None: the default places).
    kubepods: Option<String>,
    budget: DenialBudget,
    /// Denials drained whose write failed, written with the next one.
    backlog: Backlog,
}

const POLL_TIMEOUT_MS: i32 = 200;
const LOSS_CHECK_INTERVAL: Duration = Duration::from_secs(1);

impl Recorder {
    pub fn new(
        ebpf: &mut Ebpf,
        ledger: Ledger,
        names: CgroupNames,
        metrics: Arc<Metrics>,
        (directory, kubepods): (SharedDirectory, Option<String>),
    ) -> Result<Self> {
        let ring = ebpf.take_map(map_names::DENIALS).ok_or_else(|| anyhow!("map {} is missing", map_names::DENIALS))?;
        let ring = RingBuf::try_from(ring)?;
        let counters = Counters::take(ebpf)?;
        let counter = counters.instance()?;
        // As verified at start: a row written into the store since cannot move the baseline.
        let last =
            ledger.run_blocking(|batch| last_ring_loss(store::last_body_at_start(batch.conn(), RING_LOSS_KIND)?))?;
        let recorded_losses = RingLoss::baseline(last.as_ref(), &counter);
        let budget = DenialBudget::default();
        let backlog = Backlog::default();
        Ok(Self {
            ring,
            counters,
            counter,
            ledger,
            names,
            recorded_losses,
            metrics,
            directory,
            kubepods,
            budget,
            backlog,
        })
    }

    /// Run until `stop` is set; drains once more before returning.
    pub fn spawn(mut self, stop: Arc<AtomicBool>) -> JoinHandle<()> {
        std::thread::Builder::new()
            .name("seb-recorder".into())
            .spawn(move || {
                let mut last_loss_check = Instant::now() - LOSS_CHECK_INTERVAL;
                loop {
                    let stopping = stop.load(Ordering::Acquire);
                    if let Err(e) = self.drain().and_then(|_| self.close_budget(stopping)) {
                        error!(error = %format!("{e:#}"), "recording kernel denials failed");
                    }
                    if last_loss_check.elapsed() >= LOSS_CHECK_INTERVAL || stopping {
                        last_loss_check = Instant::now();
                        if let Err(e) = self.record_losses() {
                            error!(error = %format!("{e:#}"), "recording ring-buffer losses failed");
                        }
                    }
                    if stopping {
                        return;
                    }
                    self.wait_readable();
                }
            })
            .expect("spawning the recorder thread")
    }

    fn wait_readable(&self) {
        let mut fd = libc::pollfd { fd: self.ring.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut fd, 1, POLL_TIMEOUT_MS) };
    }

    /// Record everything queued; returns how many denials were written.
    pub fn drain(&mut self) -> Result<usize> {
        let mut events = Vec::new();
        while let Some(item) = self.ring.next() {
            if item.len() < size_of::<DenialEvent>() {
                warn!(len = item.len(), "ignoring a short ring-buffer record");
                continue;
            }
            // SAFETY: the kernel wrote a DenialEvent; read unaligned from its bytes.
            events.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<DenialEvent>()) });
        }
        if events.is_empty() {
            return Ok(0);
        }
        let clock = BootClock::now();
        let directory = self.directory.read().ok();
        let mut records: Vec<(i64, KernelDenial)> = Vec::new();
        let mut summaries = Vec::new();
        for event in &events {
            let time_ns = clock.wall_ns(event.boot_ns);
            let mut denial = KernelDenial::from_event(event, time_ns);
            denial.cgroup_path = self.names.path_of(denial.cgroup_id);
            denial.task_cgroup_path = denial.task_cgroup_id.and_then(|id| self.names.path_of(id));
            if let Some(directory) = &directory {
                denial.attribute(directory, self.kubepods.as_deref());
            }
            // Counted under the directory's read lock: a pod cannot leave the directory
            // (and have its series removed) between being found and being counted.
            let pod = denial.pod_uid.as_deref().zip(directory.as_ref()).and_then(|(uid, directory)| directory.pod(uid));
            self.metrics.kernel_denials.count(&denial.hook, pod);
            let (admitted, closed) = self.budget.admit(&denial);
            summaries.extend(closed);
            if !admitted {
                continue;
            }
            if let Some(tgid) = denial.tgid {
                let proc_exe =
                    std::fs::read_link(format!("/proc/{tgid}/exe")).ok().map(|p| p.to_string_lossy().into_owned());
                denial.exe = crate::audit::denial::best_exe(denial.exe.take(), proc_exe);
            }
            info!(hook = %denial.hook, address = %denial.address, port = denial.port, tgid = denial.tgid, comm = denial.comm.as_deref(), "kernel denied egress");
            records.push((time_ns as i64, denial));
        }
        drop(directory);
        let written = records.len();
        self.write(records, summaries)?;
        Ok(written)
    }

    /// Write the summary of a second of denials that has ended, if it suppressed any
    /// (`all`: the current one too, when stopping).
    fn close_budget(&mut self, all: bool) -> Result<()> {
        let summary = if all { self.budget.close() } else { self.budget.close_if_past(now_ns() as u64) };
        self.write(Vec::new(), summary.into_iter().collect())
    }

    /// Full records and summaries of suppressed ones, in one durable transaction, after
    /// those of earlier writes that failed; if this one fails too, all of them are kept
    /// for the next.
    fn write(&mut self, records: Vec<(i64, KernelDenial)>, summaries: Vec<Suppressed>) -> Result<()> {
        if records.is_empty() && summaries.is_empty() && self.backlog.is_empty() {
            return Ok(());
        }
        for summary in &summaries {
            warn!(
                suppressed = summary.suppressed,
                largest = summary.kinds.first().map_or(0, |kind| kind.count),
                "kernel denials past the recording budget were counted, not recorded in full"
            );
            self.metrics.denials_suppressed.inc_by(summary.suppressed);
        }
        let pending = std::sync::Arc::new(self.backlog.with(records, summaries));
        let writing = pending.clone();
        let written = self
            .ledger
            .run_blocking(move |batch| {
                for (time_ns, denial) in &writing.records {
                    batch.append(denial::KIND, *time_ns, denial)?;
                }
                for summary in &writing.summaries {
                    batch.append(SUPPRESSED_KIND, summary.second_ns as i64, summary)?;
                }
                if let Some(unwritten) = &writing.unwritten {
                    batch.append(UNWRITTEN_KIND, now_ns(), unwritten)?;
                }
                Ok(())
            })
            .context("writing kernel denials");
        if written.is_err() {
            // The ledger is done with its copy once it has answered.
            let pending = std::sync::Arc::try_unwrap(pending).unwrap_or_else(|shared| shared.as_ref().clone());
            let kept = pending.records.len();
            self.backlog.keep(pending, now_ns() as u64);
            warn!(kept, "kernel denials not written are kept for the next write");
        }
        written
    }

    fn record_losses(&mut self) -> Result<()> {
        let counters = self.counters.read()?;
        let (lost_total, over_rate_total) = (counters.ring_drops, counters.over_rate);
        let (recorded_lost, recorded_over_rate) = self.recorded_losses;
        if lost_total <= recorded_lost && over_rate_total <= recorded_over_rate {
            return Ok(());
        }
        let loss = RingLoss {
            lost: lost_total.saturating_sub(recorded_lost),
            lost_total,
            over_rate: over_rate_total.saturating_sub(recorded_over_rate),
            over_rate_total,
            counter: Some(self.counter.clone()),
        };
        if loss.lost > 0 {
            warn!(lost = loss.lost, "kernel denials were lost to a full ring buffer");
        }
        if loss.over_rate > 0 {
            warn!(over_rate = loss.over_rate, "kernel refusals past their cgroup's rate were counted, not queued");
        }
        self.metrics.ring_lost.inc_by(loss.lost);
        self.metrics.denials_suppressed.inc_by(loss.over_rate);
        let time_ns = now_ns();
        self.ledger.run_blocking(move |batch| batch.append(RING_LOSS_KIND, time_ns, &loss).map(drop))?;
        self.recorded_losses = (lost_total.max(recorded_lost), over_rate_total.max(recorded_over_rate));
        Ok(())
    }
}

/// The kernel's running total of denials lost to a full ring as last recorded (0 before
/// any loss).
pub fn recorded_loss_total(conn: &rusqlite::Connection) -> Result<u64> {
    Ok(last_ring_loss(store::last_body(conn, RING_LOSS_KIND)?)?.map_or(0, |loss| loss.lost_total))
}

fn last_ring_loss(body: Option<String>) -> Result<Option<RingLoss>> {
    body.map(|body| Ok(serde_json::from_str(&body)?)).transpose()
}

/// Converts `bpf_ktime_get_boot_ns` stamps to wall-clock time.
struct BootClock {
    boot_ns: u64,
    wall_ns: u64,
}

impl BootClock {
    fn now() -> Self {
        let boot = nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME).expect("CLOCK_BOOTTIME");
        let wall = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        Self { boot_ns: boot.tv_sec() as u64 * 1_000_000_000 + boot.tv_nsec() as u64, wall_ns: wall.as_nanos() as u64 }
    }

    fn wall_ns(&self, boot_ns: u64) -> u64 {
        self.wall_ns.saturating_sub(self.boot_ns.saturating_sub(boot_ns))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// After a reboot or a reinstall the kernel counts losses from zero again: taking
    /// the last recorded total as the baseline would leave that many losses unrecorded.
    #[test]
    fn losses_are_counted_from_zero_on_a_new_counter() {
        let last = RingLoss {
            lost: 5,
            lost_total: 1_000_000,
            over_rate: 3,
            over_rate_total: 70,
            counter: Some("boot-a/17".into()),
        };
        assert_eq!(RingLoss::baseline(Some(&last), "boot-a/17"), (1_000_000, 70), "the same counter resumes");
        assert_eq!(RingLoss::baseline(Some(&last), "boot-b/17"), (0, 0), "rebooted");
        assert_eq!(RingLoss::baseline(Some(&last), "boot-a/42"), (0, 0), "reinstalled");
        let unstamped = RingLoss { counter: None, ..last };
        assert_eq!(RingLoss::baseline(Some(&unstamped), "boot-a/17"), (0, 0), "unknown counter: every loss is new");
        assert_eq!(RingLoss::baseline(None, "boot-a/17"), (0, 0));
        // A record from before the rate was counted reads as none over it.
        let older: RingLoss = serde_json::from_str(r#"{"lost": 1, "lost_total": 9, "counter": "boot-a/17"}"#).unwrap();
        assert_eq!(RingLoss::baseline(Some(&older), "boot-a/17"), (9, 0));
    }
}
