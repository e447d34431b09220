//! SQLite audit store: the record chain. WAL with `synchronous=FULL`: a commit is on disk
//! when it returns. Writes go through the [`super::Ledger`] only; state derived from the
//! records lives in the ledger connection's temporary tables, rebuilt at each start.

use std::{
    fs::File,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use serde::de::DeserializeOwned;

use super::chain::StoredRecord;

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
";

/// `<database><suffix>`: SQLite's `-wal` and `-shm` files.
fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_os_string();
    name.push(suffix);
    PathBuf::from(name)
}

/// Open for writing (the ledger's connection), creating the file only if `create`, and
/// the schema.
pub fn open_writable(path: &Path, create: bool) -> Result<Connection> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    // SQLite maps the `-shm` file; one it cannot write (immutable, read-only) makes it
    // fail later or fault (SIGBUS). Refuse up front, naming the file.
    for file in [path.to_path_buf(), sibling(path, "-wal"), sibling(path, "-shm")] {
        match std::fs::OpenOptions::new().read(true).write(true).open(&file) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => bail!("the audit store file {} cannot be opened for writing: {e}", file.display()),
        }
    }
    let mut flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX | OpenFlags::SQLITE_OPEN_URI;
    if create {
        flags |= OpenFlags::SQLITE_OPEN_CREATE;
    }
    let conn =
        Connection::open_with_flags(path, flags).with_context(|| format!("opening audit store {}", path.display()))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    // The derived admission state lives in temporary tables: in memory, since it is
    // rebuilt from the chain at each start. On a file, each group commit would also open,
    // write and truncate a journal for the temporary database.
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    conn.execute_batch(SCHEMA).context("creating the audit schema")?;
    refuse_triggers(&conn)?;
    Ok(conn)
}

/// The store holds no trigger: seb creates none, and one planted in the file (while the
/// broker was down) could drop or rewrite chosen records as they are appended.
fn refuse_triggers(conn: &Connection) -> Result<()> {
    let mut query = conn.prepare("SELECT name FROM sqlite_master WHERE type = 'trigger'")?;
    let names = query.query_map([], |row| row.get::<_, String>(0))?.collect::<Result<Vec<_>, _>>()?;
    if !names.is_empty() {
        bail!(
            "the audit store holds triggers seb did not create ({}); refusing to write through them",
            names.join(", ")
        );
    }
    Ok(())
}

/// The main database's schema cookie, which every change to its schema moves.
pub fn schema_version(conn: &Connection) -> Result<i64> {
    Ok(conn.query_row("PRAGMA main.schema_version", [], |row| row.get(0))?)
}

/// A statement that must change exactly one row did (a trigger added while the broker
/// runs could make an INSERT do nothing).
pub fn one_row(rows: usize) -> rusqlite::Result<()> {
    if rows == 1 { Ok(()) } else { Err(rusqlite::Error::StatementChangedRows(rows)) }
}

/// How often the WAL is copied back into the database.
const WAL_CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Move WAL checkpoints off the commit path: SQLite's automatic checkpoint runs inside
/// the COMMIT that crosses its threshold (about every 60 certifies here), copying and
/// syncing pages while that commit's callers wait. A thread with its own connection
/// checkpoints instead (PASSIVE: it never blocks the writer) until the returned sender
/// is dropped. Durability is the WAL's either way: a commit is synced there first.
pub fn start_wal_checkpointer(writer: &Connection, path: &Path) -> Result<std::sync::mpsc::Sender<()>> {
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX)
        .with_context(|| format!("opening audit store {} for checkpoints", path.display()))?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    writer.pragma_update(None, "wal_autocheckpoint", 0)?;
    let (stop, stopped) = std::sync::mpsc::channel::<()>();
    std::thread::Builder::new()
        .name("seb-wal-ckpt".into())
        .spawn(move || {
            while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(WAL_CHECKPOINT_EVERY) {
                if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
                    tracing::warn!(error = %e, "a WAL checkpoint of the audit store failed; retried");
                }
            }
        })
        .context("starting the WAL checkpoint thread")?;
    Ok(stop)
}

/// The body of the newest record of `kind`.
pub fn last_body(conn: &Connection, kind: &str) -> Result<Option<String>> {
    Ok(conn
        .query_row("SELECT body FROM records WHERE kind = ?1 ORDER BY seq DESC LIMIT 1", [kind], |row| row.get(0))
        .optional()?)
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

    /// Every record with its chain fields, in order of `seq`.
    pub fn for_each_stored(&self, f: impl FnMut(Result<StoredRecord, Unreadable>) -> Result<bool>) -> Result<()> {
        for_each_stored(&self.conn, f)
    }

    pub fn conn(&self) -> &Connection {
        &self.conn
    }
}

/// A stored record whose columns do not have the types the chain needs (a BLOB body,
/// text that is not UTF-8, a NULL).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unreadable {
    pub seq: i64,
    pub problem: String,
}

/// Every record with its chain fields, in order of `seq`; `f` returns whether to go on.
pub fn for_each_stored(
    conn: &Connection,
    mut f: impl FnMut(Result<StoredRecord, Unreadable>) -> Result<bool>,
) -> Result<()> {
    let mut query =
        conn.prepare("SELECT seq, kind, time_ns, body, prev_hash, hash, signature FROM records ORDER BY seq")?;
    let mut rows = query.query([])?;
    while let Some(row) = rows.next().context("reading the audit records")? {
        // `seq` is the row id: always an integer.
        let seq: i64 = row.get(0)?;
        let read = || -> rusqlite::Result<StoredRecord> {
            Ok(StoredRecord {
                seq,
                kind: row.get(1)?,
                time_ns: row.get(2)?,
                body: row.get(3)?,
                prev_hash: row.get(4)?,
                hash: row.get(5)?,
                signature: row.get(6)?,
            })
        };
        if !f(read().map_err(|e| Unreadable { seq, problem: e.to_string() }))? {
            break;
        }
    }
    Ok(())
}

/// The store's files as the broker opened them, to notice one deleted or replaced under
/// it: SQLite would go on writing into the unlinked file, and the records would vanish
/// with the process.
pub struct OpenFiles {
    files: Vec<(PathBuf, File)>,
}

impl OpenFiles {
    /// The database and its `-wal` (once SQLite created it, on the first read).
    pub fn pin(database: &Path) -> Result<Self> {
        let mut files = Vec::new();
        for path in [database.to_path_buf(), sibling(database, "-wal")] {
            match File::open(&path) {
                Ok(file) => files.push((path, file)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && !files.is_empty() => {}
                Err(e) => return Err(e).with_context(|| format!("opening {}", path.display())),
            }
        }
        Ok(Self { files })
    }

    /// Fails if a file was deleted, or its path now names another file.
    pub fn check(&self) -> Result<()> {
        for (path, file) in &self.files {
            let open = file.metadata().with_context(|| format!("checking {}", path.display()))?;
            match std::fs::metadata(path) {
                Ok(now) if (now.dev(), now.ino()) == (open.dev(), open.ino()) => {}
                Ok(_) => bail!("the audit store file {} was replaced while the broker ran", path.display()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    bail!("the audit store file {} was deleted while the broker ran", path.display())
                }
                Err(e) => return Err(e).with_context(|| format!("checking {}", path.display())),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trigger_planted_in_the_store_is_refused_and_one_added_later_is_caught() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.db");
        drop(open_writable(&path, true).unwrap());
        let planted = Connection::open(&path).unwrap();
        planted
            .execute_batch(
                "CREATE TRIGGER hide BEFORE INSERT ON records WHEN new.kind = 'kernel_denial' \
                 BEGIN SELECT RAISE(IGNORE); END;",
            )
            .unwrap();
        let error = open_writable(&path, false).err().unwrap().to_string();
        assert!(error.contains("triggers seb did not create (hide)"), "{error}");
        // Added under a running writer: the INSERT it swallows changes no row.
        planted.execute_batch("DROP TRIGGER hide").unwrap();
        let conn = open_writable(&path, false).unwrap();
        planted.execute_batch("CREATE TRIGGER hide BEFORE INSERT ON records BEGIN SELECT RAISE(IGNORE); END;").unwrap();
        let rows = conn
            .execute(
                "INSERT INTO records (seq, kind, time_ns, body, prev_hash, hash, signature) VALUES (1, 'k', 0, '{}', X'', X'', X'')",
                [],
            )
            .unwrap();
        assert!(one_row(rows).is_err(), "{rows} rows");
    }

    #[test]
    fn the_derived_state_of_the_writer_is_kept_in_memory() {
        let dir = tempfile::tempdir().unwrap();
        let conn = open_writable(&dir.path().join("audit.db"), true).unwrap();
        let temp_store: i64 = conn.query_row("PRAGMA temp_store", [], |row| row.get(0)).unwrap();
        assert_eq!(temp_store, 2, "temporary tables in memory (2), not in a file");
    }
}
