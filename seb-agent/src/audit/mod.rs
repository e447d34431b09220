//! The audit trail: every admission decision, outcome, state change and kernel denial
//! is a record in a hash chain signed with the broker's key, in an embedded SQLite
//! store, durable before anyone hears of it.

pub mod chain;
pub mod denial;
pub mod head;
pub mod keys;
pub mod ledger;
pub mod store;
pub mod verify;

pub use denial::KernelDenial;
pub use ledger::{Batch, Commit, Derived, Ledger, LedgerBusy, LedgerFiles, LedgerOptions, is_busy};
pub use store::{AuditStore, Record};

/// Nanoseconds since the Unix epoch, now.
pub fn now_ns() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as i64)
}

/// RFC 3339 form of a `time_ns`.
pub fn format_time(time_ns: i64) -> String {
    let time = std::time::UNIX_EPOCH + std::time::Duration::from_nanos(time_ns.max(0) as u64);
    humantime::format_rfc3339_nanos(time).to_string()
}
