//! The head file: the newest chain head the broker committed, signed, kept beside the
//! signing key (not beside the database), so that deleting, truncating or rolling back
//! the store does not delete the evidence of what it held.
//!
//! The rule its reader applies: the store may be *ahead* of the head file (records past
//! it are then checked by their signatures), never behind it (records were removed). So
//! the file only has to be written before anyone hears of a commit, never flushed with it.
//!
//! It holds two fixed slots, each the head, its sequence number, the head's signature
//! and a checksum. After each group commit the ledger overwrites the older slot in place
//! (one `pwrite`, no rename, no fsync); the reader takes the intact slot with the highest
//! sequence number. A torn or lost write therefore leaves the other slot, an older head,
//! which the rule accepts. The file is flushed (fdatasync) at start, with each checkpoint
//! record (every few seconds) and at stop; a power loss can leave a head at most that
//! old. A slot that is intact but whose signature is not the broker's is refused: it was
//! written by someone else. Replacing the whole head ([`write`], at start and by `audit
//! adopt`) writes a new file and renames it over the old one, so both slots change at once.

use std::{
    fs::{self, File},
    io::Write,
    os::unix::fs::{FileExt, OpenOptionsExt},
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::chain::Head;

const DOMAIN: &[u8] = b"seb-audit-head-v1";
const MAGIC: &[u8; 8] = b"sebhead2";
/// magic, seq, hash, signature, checksum, padding.
const SLOT: usize = 128;
const CHECKED: usize = 8 + 8 + 32 + 64;

/// `<signing key>.head`.
pub fn path_for(signing_key: &Path) -> PathBuf {
    let mut name = signing_key.file_name().unwrap_or_default().to_os_string();
    name.push(".head");
    signing_key.with_file_name(name)
}

/// What the head's signature covers: a domain of its own, so that no record signature
/// (which any reader of the store can copy) serves as a head signature.
fn signed_bytes(head: &Head) -> Vec<u8> {
    [DOMAIN, &head.seq.to_be_bytes(), &head.hash].concat()
}

fn checksum(bytes: &[u8]) -> [u8; 8] {
    Sha256::digest(bytes)[..8].try_into().expect("8 bytes")
}

fn encode_slot(head: &Head, key: &SigningKey) -> [u8; SLOT] {
    let mut slot = [0; SLOT];
    slot[..8].copy_from_slice(MAGIC);
    slot[8..16].copy_from_slice(&head.seq.to_be_bytes());
    slot[16..48].copy_from_slice(&head.hash);
    slot[48..CHECKED].copy_from_slice(&key.sign(&signed_bytes(head)).to_bytes());
    let check = checksum(&slot[..CHECKED]);
    slot[CHECKED..CHECKED + 8].copy_from_slice(&check);
    slot
}

/// A slot's head and signature, if it is intact (a torn write is not).
fn decode_slot(slot: &[u8]) -> Option<(Head, Signature)> {
    if slot.len() != SLOT || &slot[..8] != MAGIC || slot[CHECKED..CHECKED + 8] != checksum(&slot[..CHECKED]) {
        return None;
    }
    let seq = i64::from_be_bytes(slot[8..16].try_into().ok()?);
    let head = Head { seq, hash: slot[16..48].try_into().ok()? };
    Some((head, Signature::from_slice(&slot[48..CHECKED]).ok()?))
}

/// Whether a head write waits until it is on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flush {
    /// On disk within the kernel's writeback interval.
    Later,
    /// On disk before returning.
    Now,
}

/// Replace the head file with one naming `head` (both slots), atomically.
pub fn write(path: &Path, head: &Head, key: &SigningKey, flush: Flush) -> Result<()> {
    let slot = encode_slot(head, key);
    let dir = path.parent().context("the head file has no directory")?;
    let mut temporary = path.as_os_str().to_os_string();
    temporary.push(".tmp");
    let temporary = PathBuf::from(temporary);
    let write = || -> std::io::Result<()> {
        let mut out = super::create_fresh(&temporary, 0o644)?;
        out.write_all(&[slot, slot].concat())?;
        if flush == Flush::Now {
            out.sync_all()?;
        }
        fs::rename(&temporary, path)?;
        if flush == Flush::Now {
            File::open(dir)?.sync_all()?;
        }
        Ok(())
    };
    write().with_context(|| format!("writing the audit head file {}", path.display()))
}

/// The head file open for the ledger's writes after each commit.
pub struct HeadFile {
    file: File,
    path: PathBuf,
    /// The slot the next write overwrites: the one not holding the newest head.
    next: u64,
}

impl HeadFile {
    /// Replace the head file with one naming `head`, flushed (see [`write`]), and keep it
    /// open for in-place updates.
    pub fn create(path: &Path, head: &Head, key: &SigningKey) -> Result<Self> {
        write(path, head, key, Flush::Now)?;
        let file = fs::OpenOptions::new()
            .write(true)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(path)
            .with_context(|| format!("opening the audit head file {}", path.display()))?;
        Ok(Self { file, path: path.to_path_buf(), next: 0 })
    }

    /// Record `head` as the newest committed one, in the older slot.
    pub fn record(&mut self, head: &Head, key: &SigningKey, flush: Flush) -> Result<()> {
        let slot = encode_slot(head, key);
        let write = || -> std::io::Result<()> {
            self.file.write_all_at(&slot, self.next * SLOT as u64)?;
            if flush == Flush::Now {
                self.file.sync_data()?;
            }
            Ok(())
        };
        write().with_context(|| format!("writing the audit head file {}", self.path.display()))?;
        self.next = 1 - self.next;
        Ok(())
    }
}

/// The intact slot with the highest sequence number: its head and signature.
fn newest_slot(slots: &[u8]) -> Option<(Head, Signature)> {
    slots.chunks(SLOT).take(2).filter_map(decode_slot).max_by_key(|(head, _)| head.seq)
}

/// The earlier format: one JSON object, replaced by rename.
#[derive(Deserialize)]
struct JsonHead {
    seq: i64,
    hash: String,
    signature: String,
}

fn parse_json(text: &[u8]) -> Result<(Head, Signature)> {
    let file: JsonHead = serde_json::from_slice(text)?;
    let hash = hex::decode(&file.hash)?.try_into().map_err(|_| anyhow::anyhow!("the hash is not 32 bytes"))?;
    Ok((Head { seq: file.seq, hash }, Signature::from_slice(&hex::decode(&file.signature)?)?))
}

/// The head recorded in `path`, its signature checked; `None` if there is no such file.
pub fn read(path: &Path, key: &VerifyingKey) -> Result<Option<Head>> {
    let text = match fs::read(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading the audit head file {}", path.display())),
    };
    let parse = || -> Result<Head> {
        let (head, signature) = if text.first() == Some(&b'{') {
            parse_json(&text)?
        } else {
            if text.len() != 2 * SLOT {
                bail!("it is {} bytes long, not {}", text.len(), 2 * SLOT);
            }
            newest_slot(&text).context("neither of its slots is intact")?
        };
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

    fn key() -> SigningKey {
        SigningKey::from_bytes(&[3; 32])
    }

    #[test]
    fn a_written_head_reads_back_and_a_changed_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("broker.key.head");
        assert!(read(&path, &key().verifying_key()).unwrap().is_none());
        let head = Head { seq: 42, hash: [9; 32] };
        write(&path, &head, &key(), Flush::Now).unwrap();
        assert_eq!(read(&path, &key().verifying_key()).unwrap(), Some(head));

        // The sequence number changed and the checksum recomputed: the signature fails.
        let mut bytes = fs::read(&path).unwrap();
        for slot in bytes.chunks_mut(SLOT) {
            slot[8..16].copy_from_slice(&41i64.to_be_bytes());
            let check = checksum(&slot[..CHECKED]);
            slot[CHECKED..CHECKED + 8].copy_from_slice(&check);
        }
        fs::write(&path, &bytes).unwrap();
        let error = format!("{:#}", read(&path, &key().verifying_key()).unwrap_err());
        assert!(error.contains("signature is not the broker's"), "{error}");
        let other = SigningKey::from_bytes(&[4; 32]);
        write(&path, &head, &other, Flush::Later).unwrap();
        assert!(read(&path, &key().verifying_key()).is_err());
    }

    #[test]
    fn updates_alternate_slots_and_a_torn_slot_leaves_the_older_head() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("broker.key.head");
        let mut file = HeadFile::create(&path, &Head::EMPTY, &key()).unwrap();
        for seq in 1..=4 {
            file.record(&Head { seq, hash: [seq as u8; 32] }, &key(), Flush::Later).unwrap();
            assert_eq!(read(&path, &key().verifying_key()).unwrap().unwrap().seq, seq);
        }

        // The newest slot torn (a crash in the middle of its write): the older head.
        let mut bytes = fs::read(&path).unwrap();
        let newest = bytes.chunks(SLOT).position(|slot| decode_slot(slot).is_some_and(|(h, _)| h.seq == 4)).unwrap();
        bytes[newest * SLOT + 20] ^= 1;
        fs::write(&path, &bytes).unwrap();
        assert_eq!(read(&path, &key().verifying_key()).unwrap().unwrap(), Head { seq: 3, hash: [3; 32] });
        // Both torn: refused.
        bytes[(1 - newest) * SLOT + 20] ^= 1;
        fs::write(&path, &bytes).unwrap();
        let error = format!("{:#}", read(&path, &key().verifying_key()).unwrap_err());
        assert!(error.contains("neither of its slots is intact"), "{error}");
    }

    #[test]
    fn a_head_file_of_the_earlier_format_is_read_and_then_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("broker.key.head");
        let head = Head { seq: 7, hash: [7; 32] };
        let json = serde_json::json!({
            "seq": 7, "hash": hex::encode(head.hash),
            "signature": hex::encode(key().sign(&signed_bytes(&head)).to_bytes()),
        });
        fs::write(&path, json.to_string()).unwrap();
        assert_eq!(read(&path, &key().verifying_key()).unwrap(), Some(head));
        let mut file = HeadFile::create(&path, &head, &key()).unwrap();
        assert_eq!(read(&path, &key().verifying_key()).unwrap(), Some(head));
        file.record(&Head { seq: 8, hash: [8; 32] }, &key(), Flush::Later).unwrap();
        assert_eq!(read(&path, &key().verifying_key()).unwrap().unwrap().seq, 8);
    }
}
