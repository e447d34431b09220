//! How many passthrough reads run: each mints a credential (an STS session, a Kubernetes
//! token and its Secret, a client certificate) and may hold an answer of up to 16 MiB,
//! and any process that reaches the socket may ask for one, certificate or not. At most
//! [`AT_ONCE`] run at once, [`PER_UID_AT_ONCE`] of one uid; and at most
//! `passthrough.mints_per_second` credentials are minted for reads in each one-second
//! window, `passthrough.mints_per_uid_per_second` for one uid
//! (the AWS account's STS quota is the one every mutation's mint draws on). A read
//! refused before its mint (not one this broker serves) spends no mint.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Result, bail};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::connection_shares::{Share, Shares};

pub const AT_ONCE: usize = 4;
pub const PER_UID_AT_ONCE: usize = 2;

pub struct ReadGate {
    per_second: u32,
    per_uid_per_second: u32,
    at_once: Arc<Semaphore>,
    per_uid: Arc<Shares<u32>>,
    mints: Mutex<Mints>,
}

/// Mints of the current second (monotonic: a clock step moves no window), in all and
/// by uid (at most `PER_SECOND` uids).
struct Mints {
    since: Instant,
    all: u32,
    by_uid: HashMap<u32, u32>,
}

/// A read's place, given back on drop.
pub struct ReadPass<'a> {
    gate: &'a ReadGate,
    uid: u32,
    _permit: OwnedSemaphorePermit,
    _share: Share<u32>,
}

impl ReadGate {
    /// At most `per_second` mints in each second, `per_uid_per_second` of one uid.
    pub fn new(per_second: u32, per_uid_per_second: u32) -> Self {
        Self {
            per_second,
            per_uid_per_second,
            at_once: Arc::new(Semaphore::new(AT_ONCE)),
            per_uid: Arc::default(),
            mints: Mutex::new(Mints { since: Instant::now(), all: 0, by_uid: HashMap::new() }),
        }
    }

    /// A place for one read of `uid`'s now, or why there is none.
    pub fn enter(&self, uid: u32) -> Result<ReadPass<'_>, String> {
        let share = self
            .per_uid
            .take(&uid, PER_UID_AT_ONCE)
            .ok_or_else(|| format!("uid {uid} has {PER_UID_AT_ONCE} passthrough reads under way"))?;
        let permit = self
            .at_once
            .clone()
            .try_acquire_owned()
            .map_err(|_| format!("{AT_ONCE} passthrough reads are under way"))?;
        Ok(ReadPass { gate: self, uid, _permit: permit, _share: share })
    }
}

/// A read turned away for the second's mints: `busy`, not a refusal.
#[derive(Debug, thiserror::Error)]
#[error("{0}; ask again shortly")]
pub struct MintsSpent(String);

impl ReadPass<'_> {
    /// Whether this read may mint its credential now (`Err` holds a [`MintsSpent`]).
    pub fn may_mint(&self) -> Result<()> {
        let mut mints = self.gate.mints.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if mints.since.elapsed() >= Duration::from_secs(1) {
            *mints = Mints { since: Instant::now(), all: 0, by_uid: HashMap::new() };
        }
        let (per_second, per_uid) = (self.gate.per_second, self.gate.per_uid_per_second);
        let of_uid = mints.by_uid.get(&self.uid).copied().unwrap_or(0);
        if of_uid >= per_uid {
            bail!(MintsSpent(format!(
                "uid {} has had {per_uid} passthrough reads' credentials minted in the last second",
                self.uid
            )));
        }
        if mints.all >= per_second {
            bail!(MintsSpent(format!("{per_second} passthrough reads' credentials were minted in the last second")));
        }
        mints.all += 1;
        mints.by_uid.insert(self.uid, of_uid + 1);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_are_bounded_at_once_per_uid_and_their_mints_per_second() {
        const PER_SECOND: u32 = 50;
        const PER_UID_PER_SECOND: u32 = 20;
        let gate = ReadGate::new(PER_SECOND, PER_UID_PER_SECOND);
        let refused = |uid| gate.enter(uid).err().expect("refused");
        let first: Vec<ReadPass> = (0..PER_UID_AT_ONCE).map(|_| gate.enter(7).unwrap()).collect();
        assert!(refused(7).contains("uid 7 has 2"));
        let others: Vec<ReadPass> = (0..AT_ONCE - PER_UID_AT_ONCE).map(|_| gate.enter(8).unwrap()).collect();
        assert!(refused(9).contains("4 passthrough reads are under way"));
        drop((first, others));
        // A read that never reaches its mint spends nothing: many passes, no mint.
        for _ in 0..100 {
            drop(gate.enter(10).unwrap());
        }
        // PER_UID_PER_SECOND mints a second for one uid, PER_SECOND in all.
        let pass = gate.enter(10).unwrap();
        for _ in 0..PER_UID_PER_SECOND {
            pass.may_mint().unwrap();
        }
        let spent = pass.may_mint().unwrap_err();
        assert!(spent.downcast_ref::<MintsSpent>().is_some_and(|e| e.0.contains("uid 10 has had 20")), "{spent}");
        drop(pass);
        let mut minted = PER_UID_PER_SECOND;
        for uid in 11.. {
            let pass = gate.enter(uid).unwrap();
            while minted < PER_SECOND && pass.may_mint().is_ok() {
                minted += 1;
            }
            if minted == PER_SECOND {
                break;
            }
        }
        let pass = gate.enter(99).unwrap();
        let spent = pass.may_mint().unwrap_err();
        assert!(
            spent.downcast_ref::<MintsSpent>().is_some_and(|e| e.0.contains("50 passthrough reads' credentials")),
            "{spent}"
        );
        // A new second.
        gate.mints.lock().unwrap().since -= Duration::from_secs(1);
        pass.may_mint().unwrap();
    }
}
