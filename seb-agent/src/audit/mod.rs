//! The audit store: every kernel denial (and, with admission, every decision) as a
//! durable record in an embedded SQLite database.

pub mod denial;
pub mod store;

pub use denial::KernelDenial;
pub use store::{AuditStore, Record};
