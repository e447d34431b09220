//! SQLite audit store: the record chain and the admission state derived from it (used
//! serials, revocations, epochs). WAL with `synchronous=FULL`: a commit is on disk when
//! it returns. Writes go through the [`super::Ledger`] only.

use std::path::Path;

use anyhow::{Context, Result};
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use serde::de::DeserializeOwned;

use super::chain::{Head, StoredRecord};

/// Read access to an audit store (a live one, or a copy a security team holds).
pub struct AuditStore {
    conn: Connection,
}

/// One stored record's content.
#[derive(Debug, Clone)]
pub struct Record {
    pub seq: i64,
    pub kind: String,
    pub time_ns: i64,
    pub body: String,
}

impl Record {
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T> {
        serde_json::from_str(&self.body).with_context(|| format!("record {} has an unreadable body", self.seq))
    }
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS records (
    seq       INTEGER PRIMARY KEY,
    kind      TEXT    NOT NULL,
    time_ns   INTEGER NOT NULL,
    body      TEXT    NOT NULL,
    prev_hash BLOB    NOT NULL,
    hash      BLOB    NOT NULL,
    signature BLOB    NOT NULL
);
CREATE INDEX IF NOT EXISTS records_by_kind ON records(kind, seq);
CREATE TABLE IF NOT EXISTS used_serials (
    serial       TEXT PRIMARY KEY,
    decision_seq INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS revoked (
    kind       TEXT    NOT NULL,
    value      TEXT    NOT NULL,
    record_seq INTEGER NOT NULL,
    PRIMARY KEY (kind, value)
);
CREATE TABLE IF NOT EXISTS epochs (
    name       TEXT PRIMARY KEY,
    value      INTEGER NOT NULL,
    record_seq INTEGER NOT NULL
);
";

/// Open for writing (the ledger's connection), creating the schema.
pub fn open_writable(path: &Path) -> Result<Connection> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let conn = Connection::open(path).with_context(|| format!("opening audit store {}", path.display()))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    conn.execute_batch(SCHEMA).context("creating the audit schema")?;
    Ok(conn)
}

/// The body of the newest record of `kind`.
pub fn last_body(conn: &Connection, kind: &str) -> Result<Option<String>> {
    Ok(conn
        .query_row("SELECT body FROM records WHERE kind = ?1 ORDER BY seq DESC LIMIT 1", [kind], |row| row.get(0))
        .optional()?)
}

pub fn head(conn: &Connection) -> Result<Head> {
    let head = conn
        .query_row("SELECT seq, hash FROM records ORDER BY seq DESC LIMIT 1", [], |row| {
            Ok((row.get::<_, i64>(0)?, row.get::<_, Vec<u8>>(1)?))
        })
        .optional()?;
    Ok(match head {
        None => Head::EMPTY,
        Some((seq, hash)) => {
            Head { seq, hash: hash.try_into().map_err(|_| anyhow::anyhow!("record {seq} has a malformed hash"))? }
        }
    })
}

fn record_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Record> {
    Ok(Record { seq: row.get(0)?, kind: row.get(1)?, time_ns: row.get(2)?, body: row.get(3)? })
}

impl AuditStore {
    pub fn open_read_only(path: &Path) -> Result<Self> {
        let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)
            .with_context(|| format!("opening audit store {} (does it exist?)", path.display()))?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        Ok(Self { conn })
    }

    /// Records above `after`, oldest first; of one kind, or all.
    pub fn records_after(&self, kind: Option<&str>, after: i64, limit: usize) -> Result<Vec<Record>> {
        let mut query = self.conn.prepare_cached(
            "SELECT seq, kind, time_ns, body FROM records WHERE (?1 IS NULL OR kind = ?1) AND seq > ?2 ORDER BY seq LIMIT ?3",
        )?;
        let rows = query.query_map(params![kind, after, limit as i64], record_from_row)?;
        rows.collect::<Result<_, _>>().context("reading audit records")
    }

    pub fn get(&self, seq: i64) -> Result<Option<Record>> {
        let mut query = self.conn.prepare_cached("SELECT seq, kind, time_ns, body FROM records WHERE seq = ?1")?;
        Ok(query.query_row(params![seq], record_from_row).optional()?)
    }

    /// Every record with its chain fields, in storage order of `seq`.
    pub fn for_each_stored(&self, mut f: impl FnMut(StoredRecord) -> Result<bool>) -> Result<()> {
        let mut query = self
            .conn
            .prepare("SELECT seq, kind, time_ns, body, prev_hash, hash, signature FROM records ORDER BY seq")?;
        let mut rows = query.query([])?;
        while let Some(row) = rows.next()? {
            let record = StoredRecord {
                seq: row.get(0)?,
                kind: row.get(1)?,
                time_ns: row.get(2)?,
                body: row.get(3)?,
                prev_hash: row.get(4)?,
                hash: row.get(5)?,
                signature: row.get(6)?,
            };
            if !f(record)? {
                break;
            }
        }
        Ok(())
    }
}
