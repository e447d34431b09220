//! The head file: the newest chain head the broker committed, signed, kept beside the
//! signing key (not beside the database), so that deleting, truncating or rolling back
//! the store does not delete the evidence of what it held.
//!
//! The broker replaces it (temporary file, rename) after each group commit that appended
//! records, before any caller hears of them, so it is never behind what callers were
//! told, and never ahead of the store. It is flushed to disk (fsync of the file and the
//! directory) at start, with each checkpoint record (every few seconds) and at stop, not
//! at each commit: that would double a single client's admission latency. A power loss
//! can therefore leave an older head (at most a checkpoint interval old; the records past
//! it are then checked by their signatures), never a torn one: the rename replaces the
//! whole file (on ext4, `auto_da_alloc` writes a renamed-over file's data first).

use std::{
    fs,
    io::Write,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};

use super::chain::Head;

const DOMAIN: &[u8] = b"seb-audit-head-v1";

/// `<signing key>.head`.
pub fn path_for(signing_key: &Path) -> PathBuf {
    let mut name = signing_key.file_name().unwrap_or_default().to_os_string();
    name.push(".head");
    signing_key.with_file_name(name)
}

#[derive(Debug, Serialize, Deserialize)]
struct HeadFile {
    seq: i64,
    hash: String,
    signature: String,
}

fn signed_bytes(head: &Head) -> Vec<u8> {
    [DOMAIN, &head.seq.to_be_bytes(), &head.hash].concat()
}

/// Whether a head write waits until it is on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flush {
    /// Replaced atomically, on disk within the kernel's writeback interval.
    Later,
    /// Replaced atomically and on disk before returning.
    Now,
}

/// Record `head` as the newest committed one, atomically.
pub fn write(path: &Path, head: &Head, key: &SigningKey, flush: Flush) -> Result<()> {
    let file = HeadFile {
        seq: head.seq,
        hash: hex::encode(head.hash),
        signature: hex::encode(key.sign(&signed_bytes(head)).to_bytes()),
    };
    let dir = path.parent().context("the head file has no directory")?;
    let mut temporary = path.as_os_str().to_os_string();
    temporary.push(".tmp");
    let temporary = PathBuf::from(temporary);
    let write = || -> std::io::Result<()> {
        let mut out = fs::File::create(&temporary)?;
        out.write_all(&serde_json::to_vec(&file)?)?;
        if flush == Flush::Now {
            out.sync_all()?;
        }
        fs::rename(&temporary, path)?;
        if flush == Flush::Now {
            fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    };
    write().with_context(|| format!("writing the audit head file {}", path.display()))
}

/// The head recorded in `path`, its signature checked; `None` if there is no such file.
pub fn read(path: &Path, key: &VerifyingKey) -> Result<Option<Head>> {
    let text = match fs::read(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading the audit head file {}", path.display())),
    };
    let parse = || -> Result<Head> {
        let file: HeadFile = serde_json::from_slice(&text)?;
        let hash = hex::decode(&file.hash)?.try_into().map_err(|_| anyhow::anyhow!("the hash is not 32 bytes"))?;
        let head = Head { seq: file.seq, hash };
        let signature = Signature::from_slice(&hex::decode(&file.signature)?)?;
        if key.verify(&signed_bytes(&head), &signature).is_err() {
            bail!("its signature is not the broker's");
        }
        Ok(head)
    };
    parse().map(Some).with_context(|| format!("the audit head file {} is not valid", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_written_head_reads_back_and_a_changed_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("broker.key.head");
        let key = SigningKey::from_bytes(&[3; 32]);
        assert!(read(&path, &key.verifying_key()).unwrap().is_none());
        let head = Head { seq: 42, hash: [9; 32] };
        write(&path, &head, &key, Flush::Now).unwrap();
        assert_eq!(read(&path, &key.verifying_key()).unwrap(), Some(head));

        let text = fs::read_to_string(&path).unwrap().replace("42", "41");
        fs::write(&path, text).unwrap();
        let error = format!("{:#}", read(&path, &key.verifying_key()).unwrap_err());
        assert!(error.contains("signature is not the broker's"), "{error}");
        let other = SigningKey::from_bytes(&[4; 32]);
        write(&path, &head, &other, Flush::Later).unwrap();
        assert!(read(&path, &key.verifying_key()).is_err());
    }
}
