//! SQLite-backed audit records (WAL, `synchronous=FULL`: a record is on disk when
//! `append` returns).

use std::path::Path;

use anyhow::{Context, Result};
use rusqlite::{Connection, OpenFlags, params};
use serde::{Serialize, de::DeserializeOwned};

pub struct AuditStore {
    conn: Connection,
}

/// One stored record.
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
    seq     INTEGER PRIMARY KEY,
    kind    TEXT    NOT NULL,
    time_ns INTEGER NOT NULL,
    body    TEXT    NOT NULL
);
CREATE INDEX IF NOT EXISTS records_by_kind ON records(kind, seq);
";

impl AuditStore {
    /// Open (creating if needed) for writing.
    pub fn open(path: &Path) -> Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let conn = Connection::open(path).with_context(|| format!("opening audit store {}", path.display()))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(SCHEMA).context("creating the audit schema")?;
        Ok(Self { conn })
    }

    /// Open an existing store for reading only (a security team's copy, or a live one).
    pub fn open_read_only(path: &Path) -> Result<Self> {
        let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)
            .with_context(|| format!("opening audit store {} (does it exist?)", path.display()))?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        Ok(Self { conn })
    }

    /// Append records in one transaction; durable when this returns.
    pub fn append_all<T: Serialize>(&mut self, kind: &str, items: &[(i64, T)]) -> Result<()> {
        let tx = self.conn.transaction()?;
        {
            let mut insert = tx.prepare_cached("INSERT INTO records (kind, time_ns, body) VALUES (?1, ?2, ?3)")?;
            for (time_ns, item) in items {
                insert.execute(params![kind, time_ns, serde_json::to_string(item)?])?;
            }
        }
        tx.commit().context("committing audit records")
    }

    pub fn append<T: Serialize>(&mut self, kind: &str, time_ns: i64, item: &T) -> Result<()> {
        self.append_all(kind, std::slice::from_ref(&(time_ns, item)))
    }

    /// Records of `kind` with a sequence number above `after`, oldest first.
    pub fn records_after(&self, kind: &str, after: i64, limit: usize) -> Result<Vec<Record>> {
        let mut query = self.conn.prepare_cached(
            "SELECT seq, kind, time_ns, body FROM records WHERE kind = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
        )?;
        let rows = query.query_map(params![kind, after, limit as i64], |row| {
            Ok(Record { seq: row.get(0)?, kind: row.get(1)?, time_ns: row.get(2)?, body: row.get(3)? })
        })?;
        rows.collect::<Result<_, _>>().context("reading audit records")
    }

    /// The newest record of `kind`.
    pub fn last(&self, kind: &str) -> Result<Option<Record>> {
        let mut query = self
            .conn
            .prepare_cached("SELECT seq, kind, time_ns, body FROM records WHERE kind = ?1 ORDER BY seq DESC LIMIT 1")?;
        let mut rows = query.query_map(params![kind], |row| {
            Ok(Record { seq: row.get(0)?, kind: row.get(1)?, time_ns: row.get(2)?, body: row.get(3)? })
        })?;
        rows.next().transpose().context("reading the audit store")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appended_records_read_back_in_order_and_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.db");
        {
            let mut store = AuditStore::open(&path).unwrap();
            store.append_all("k", &[(1, "a"), (2, "b")]).unwrap();
            store.append("other", 3, &"c").unwrap();
        }
        let store = AuditStore::open_read_only(&path).unwrap();
        let records = store.records_after("k", 0, 10).unwrap();
        let bodies: Vec<String> = records.iter().map(|r| r.parse().unwrap()).collect();
        assert_eq!(bodies, ["a", "b"]);
        assert_eq!(store.records_after("k", records[0].seq, 10).unwrap().len(), 1);
        assert_eq!(store.last("other").unwrap().unwrap().parse::<String>().unwrap(), "c");
    }
}
