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
pub use store::{AuditStore, CheckedReader, Record};

/// A fresh file at `path` for the broker's own writes: whatever is there (a symlink
/// planted to aim the broker's writes, as root, at another file) is removed, never
/// followed.
pub fn create_fresh(path: &std::path::Path, mode: u32) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).custom_flags(nix::libc::O_NOFOLLOW).open(path)
}

/// Nanoseconds since the Unix epoch, now.
pub fn now_ns() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as i64)
}

/// RFC 3339 form of a `time_ns`.
pub fn format_time(time_ns: i64) -> String {
    let time = std::time::UNIX_EPOCH + std::time::Duration::from_nanos(time_ns.max(0) as u64);
    humantime::format_rfc3339_nanos(time).to_string()
}

/// Of a message (an error, a denial, an API's answer), what an answer or a record keeps.
pub const MESSAGE_CLIP: usize = 4096;

/// `text` as a record keeps what a caller sent: at most `max` bytes (cut at a character),
/// then how long it was and its SHA-256, so the whole can still be matched against what
/// the caller kept (and a marker typed into the text cannot pass for a clip). Records of
/// refused requests are written for anyone who can reach the socket; without a bound
/// each could carry a whole 1 MiB request to disk.
pub fn clipped(text: &str, max: usize) -> String {
    use sha2::Digest;
    if text.len() <= max {
        return text.to_string();
    }
    let cut = (0..=max).rev().find(|at| text.is_char_boundary(*at)).unwrap_or(0);
    let digest = hex::encode(sha2::Sha256::digest(text.as_bytes()));
    format!("{}… ({} bytes, sha256:{digest})", &text[..cut], text.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_field_is_clipped_at_a_character_and_says_how_long_it_was() {
        assert_eq!(clipped("short", 8), "short");
        let ten = "a".repeat(10);
        assert_eq!(
            clipped(&ten, 4),
            "aaaa… (10 bytes, sha256:bf2cb58a68f684d95a3b78ef8f661c9a4e5b09e82cc8f9cc88cce90528caeb27)"
        );
        assert!(clipped("ééé", 3).starts_with("é… (6 bytes, sha256:"));
    }
}
