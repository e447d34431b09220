//! How many passthrough reads run: each mints a credential (an STS session, a Kubernetes
//! token and its Secret, a client certificate) and may hold an answer of up to 16 MiB,
//! and any process that reaches the socket may ask for one, certificate or not. At most
//! [`AT_ONCE`] run at once, [`PER_UID_AT_ONCE`] of one uid, and [`PER_SECOND`] start in
//! any second (the AWS account's STS quota is the one every mutation's mint draws on).

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::connection_shares::{Share, Shares};

pub const AT_ONCE: usize = 4;
pub const PER_UID_AT_ONCE: usize = 2;
pub const PER_SECOND: u32 = 20;

pub struct ReadGate {
    at_once: Arc<Semaphore>,
    per_uid: Arc<Shares<u32>>,
    /// The current second (monotonic: a clock step moves no window) and reads started in it.
    window: Mutex<(Instant, u32)>,
}

/// A read's place, given back on drop.
pub struct ReadPass {
    _permit: OwnedSemaphorePermit,
    _share: Share<u32>,
}

impl Default for ReadGate {
    fn default() -> Self {
        Self {
            at_once: Arc::new(Semaphore::new(AT_ONCE)),
            per_uid: Arc::default(),
            window: Mutex::new((Instant::now(), 0)),
        }
    }
}

impl ReadGate {
    /// A place for one read of `uid`'s now, or why there is none.
    pub fn enter(&self, uid: u32) -> Result<ReadPass, String> {
        let share = self
            .per_uid
            .take(&uid, PER_UID_AT_ONCE)
            .ok_or_else(|| format!("uid {uid} has {PER_UID_AT_ONCE} passthrough reads under way"))?;
        let permit = self
            .at_once
            .clone()
            .try_acquire_owned()
            .map_err(|_| format!("{AT_ONCE} passthrough reads are under way"))?;
        let mut window = self.window.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if window.0.elapsed() >= Duration::from_secs(1) {
            *window = (Instant::now(), 0);
        }
        if window.1 >= PER_SECOND {
            return Err(format!("{PER_SECOND} passthrough reads started in the last second"));
        }
        window.1 += 1;
        Ok(ReadPass { _permit: permit, _share: share })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_are_bounded_at_once_per_uid_and_per_second() {
        let gate = ReadGate::default();
        let refused = |uid| gate.enter(uid).err().expect("refused");
        let first: Vec<ReadPass> = (0..PER_UID_AT_ONCE).map(|_| gate.enter(7).unwrap()).collect();
        assert!(refused(7).contains("uid 7 has 2"));
        let others: Vec<ReadPass> = (0..AT_ONCE - PER_UID_AT_ONCE).map(|_| gate.enter(8).unwrap()).collect();
        assert!(refused(9).contains("4 passthrough reads are under way"));
        drop((first, others));
        // 4 started so far; the second's budget runs out at 20, whoever asks.
        for _ in 4..PER_SECOND {
            drop(gate.enter(10).unwrap());
        }
        assert!(refused(11).contains("20 passthrough reads started"));
        // A new second.
        gate.window.lock().unwrap().0 -= Duration::from_secs(1);
        drop(gate.enter(11).unwrap());
    }
}
