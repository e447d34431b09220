//! How many passthrough reads run: each mints a credential (an STS session, a Kubernetes
//! token and its Secret, a client certificate) and may hold an answer of up to 16 MiB,
//! and any process that reaches the socket may ask for one, certificate or not. At most
//! [`AT_ONCE`] run at once, [`PER_UID_AT_ONCE`] of one uid; and at most [`PER_SECOND`]
//! credentials are minted for reads in any second, [`PER_UID_PER_SECOND`] for one uid
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
pub const PER_SECOND: u32 = 20;
pub const PER_UID_PER_SECOND: u32 = 5;

pub struct ReadGate {
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

impl Default for ReadGate {
    fn default() -> Self {
        Self {
            at_once: Arc::new(Semaphore::new(AT_ONCE)),
            per_uid: Arc::default(),
            mints: Mutex::new(Mints { since: Instant::now(), all: 0, by_uid: HashMap::new() }),
        }
    }
}

impl ReadGate {
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
        let of_uid = mints.by_uid.get(&self.uid).copied().unwrap_or(0);
        if of_uid >= PER_UID_PER_SECOND {
            bail!(
                "uid {} has had {PER_UID_PER_SECOND} passthrough reads' credentials minted in the last second",
                self.uid
            );
        }
        if mints.all >= PER_SECOND {
            bail!(MintsSpent(format!("{PER_SECOND} passthrough reads' credentials were minted in the last second")));
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
        let gate = ReadGate::default();
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
        // Five mints a second for one uid, twenty in all.
        let pass = gate.enter(10).unwrap();
        for _ in 0..PER_UID_PER_SECOND {
            pass.may_mint().unwrap();
        }
        assert!(pass.may_mint().unwrap_err().to_string().contains("uid 10 has had 5"));
        drop(pass);
        for uid in 11..14 {
            let pass = gate.enter(uid).unwrap();
            for _ in 0..PER_UID_PER_SECOND {
                pass.may_mint().unwrap();
            }
        }
        let pass = gate.enter(20).unwrap();
        assert!(pass.may_mint().unwrap_err().to_string().contains("20 passthrough reads' credentials"));
        // A new second.
        gate.mints.lock().unwrap().since -= Duration::from_secs(1);
        pass.may_mint().unwrap();
    }
}
