//! Waiting in tests for what happens asynchronously (a kernel map filled, a record
//! written, a process killed), with a deadline that fails the test, naming what never
//! came.

use std::{
    thread,
    time::{Duration, Instant},
};

/// Call `check` until it returns a value, for at most `within`; panics with `failure()`
/// (evaluated then, so it can show the state at the deadline) when it never does. The
/// pause between calls grows from 10 ms to 200 ms: cheap checks answer quickly, costly
/// ones (a CLI run) are not repeated in a tight loop.
pub fn eventually<T>(within: Duration, mut check: impl FnMut() -> Option<T>, failure: impl FnOnce() -> String) -> T {
    let deadline = Instant::now() + within;
    let mut pause = Duration::from_millis(10);
    loop {
        if let Some(value) = check() {
            return value;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {within:?}: {}", failure());
        }
        thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(200));
    }
}

/// [`eventually`] for a condition.
pub fn until(within: Duration, mut condition: impl FnMut() -> bool, failure: impl FnOnce() -> String) {
    eventually(within, || condition().then_some(()), failure)
}
