//! The broker's Ed25519 audit-signing key.

use std::{fs, io::Write, os::unix::fs::OpenOptionsExt, path::Path};

use anyhow::{Context, Result};

use super::{chain::Head, head};
use ed25519_dalek::{
    SigningKey, VerifyingKey,
    pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey, spki::der::pem::LineEnding},
};

/// Load the key, creating it (mode 0600) on first start. Its public half is written
/// beside it as `<name>.pub` for offline verification.
pub fn load_or_create(path: &Path) -> Result<SigningKey> {
    let key = match load(path) {
        Ok(key) => key,
        Err(e) if e.downcast_ref::<std::io::Error>().is_some_and(|e| e.kind() == std::io::ErrorKind::NotFound) => {
            create(path)?
        }
        Err(e) => return Err(e),
    };
    let public = key.verifying_key().to_public_key_pem(LineEnding::LF)?;
    let public_path = public_key_path(path);
    super::create_fresh(&public_path, 0o644)
        .and_then(|mut file| file.write_all(public.as_bytes()))
        .with_context(|| format!("writing {}", public_path.display()))?;
    Ok(key)
}

/// Load an existing key.
pub fn load(path: &Path) -> Result<SigningKey> {
    let pem = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    SigningKey::from_pkcs8_pem(&pem).with_context(|| format!("{} is not an Ed25519 PKCS#8 private key", path.display()))
}

/// A new key, with a head file for its (empty) store written first: from then on, a
/// key without a head file means the head file was removed. A head file without its key
/// means the key was removed: refused, since a new key and an empty head written over
/// the old one would let whoever deleted the key and the store start the node afresh
/// (used serials forgotten, node-local revocations gone).
fn create(path: &Path) -> Result<SigningKey> {
    let head = head::path_for(path);
    if head.exists() {
        anyhow::bail!(
            "the audit signing key {} is missing while its head file {} exists: the key was removed. Restore it; \
             to start this node's audit log afresh on purpose, remove the head file (and the store) as well",
            path.display(),
            head.display()
        );
    }
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir)?;
    }
    let key = SigningKey::generate(&mut rand_core::OsRng);
    head::write(&head, &Head::EMPTY, &key, head::Flush::Now)?;
    let pem = key.to_pkcs8_pem(LineEnding::LF)?;
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.write_all(pem.as_bytes())?;
    file.sync_all()?;
    Ok(key)
}

pub fn public_key_path(key_path: &Path) -> std::path::PathBuf {
    let mut name = key_path.file_name().unwrap_or_default().to_os_string();
    name.push(".pub");
    key_path.with_file_name(name)
}

pub fn load_public(path: &Path) -> Result<VerifyingKey> {
    let pem = fs::read_to_string(path).with_context(|| format!("reading public key {}", path.display()))?;
    let key = VerifyingKey::from_public_key_pem(&pem)
        .with_context(|| format!("{} is not an Ed25519 public key", path.display()))?;
    // A small-order point verifies forged signatures (`01 00…` with a zero scalar).
    if key.is_weak() {
        anyhow::bail!(
            "{} is a weak Ed25519 public key (a small-order point): no signature can be trusted to it",
            path.display()
        );
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_removed_key_is_not_replaced_while_its_head_file_remains() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("broker.key");
        let first = load_or_create(&key).unwrap();
        assert_eq!(load_or_create(&key).unwrap().to_bytes(), first.to_bytes(), "the same key again");
        fs::remove_file(&key).unwrap();
        let error = load_or_create(&key).err().unwrap().to_string();
        assert!(error.contains("is missing while its head file"), "{error}");
        fs::remove_file(head::path_for(&key)).unwrap();
        assert_ne!(load_or_create(&key).unwrap().to_bytes(), first.to_bytes(), "a deliberate fresh start");
    }

    #[test]
    fn symlinks_planted_for_the_public_key_and_the_head_file_are_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("broker.key");
        let victim = dir.path().join("victim");
        fs::write(&victim, "precious").unwrap();
        load_or_create(&key).unwrap();
        let head = head::path_for(&key);
        let mut temporary = head.clone().into_os_string();
        temporary.push(".tmp");
        for planted in [public_key_path(&key), std::path::PathBuf::from(temporary)] {
            let _ = fs::remove_file(&planted);
            std::os::unix::fs::symlink(&victim, &planted).unwrap();
        }
        let signing = load_or_create(&key).unwrap();
        head::write(&head, &Head::EMPTY, &signing, head::Flush::Now).unwrap();
        assert_eq!(fs::read_to_string(&victim).unwrap(), "precious", "written through a planted symlink");
        assert!(!fs::symlink_metadata(public_key_path(&key)).unwrap().is_symlink());
        assert!(!fs::symlink_metadata(&head).unwrap().is_symlink());
        load_public(&public_key_path(&key)).unwrap();
    }
}
