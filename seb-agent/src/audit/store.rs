//! SQLite audit store: the record chain. WAL with `synchronous=FULL`: a commit is on disk
//! when it returns. Writes go through the [`super::Ledger`] only; state derived from the
//! records lives in the ledger connection's temporary tables, rebuilt at each start.

use std::{
    fs::File,
    os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use serde::de::DeserializeOwned;

use super::chain::{self, Head, StoredRecord};

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
        // Made owner-only before SQLite writes anything (its `-wal` and `-shm` files take
        // the database's mode): records name callers, their executables and cgroups,
        // targets and minted identities, no business of other local users.
        match std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e).with_context(|| format!("creating audit store {}", path.display())),
        }
    }
    let conn =
        Connection::open_with_flags(path, flags).with_context(|| format!("opening audit store {}", path.display()))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    // A store made before that, or by a hand with another umask: owner-only from now on.
    for file in [path.to_path_buf(), sibling(path, "-wal"), sibling(path, "-shm")] {
        if std::fs::metadata(&file).is_ok_and(|m| m.mode() & 0o077 != 0) {
            // Tightening it does not close what others opened while they could.
            tracing::warn!(file = %file.display(), "the audit store was readable by others; it is owner-only now");
        }
        match std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("making {} owner-only", file.display())),
        }
    }
    conn.pragma_update(None, "synchronous", "FULL")?;
    // The derived admission state lives in temporary tables: in memory, since it is
    // rebuilt from the chain at each start. On a file, each group commit would also open,
    // write and truncate a journal for the temporary database.
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    conn.execute_batch(SCHEMA).context("creating the audit schema")?;
    check_schema(&conn)?;
    Ok(conn)
}

/// The records table and everything on it are exactly seb's: the table and its index, as
/// seb creates them, and no trigger or view anywhere. Anything else planted in the file
/// while the broker was down could work on what a query returns: a trigger drops or
/// rewrites records as they are appended; an index pointed at the table
/// (`writable_schema`) answers the queries that use it (the newest record of a kind, the
/// decisions without an outcome) from rows the verified walk, a table scan, never sees;
/// a view takes the table's name. Other tables, which no query of seb's reads, are let
/// be: the admission state of versions before head files (`used_serials`, `revoked`,
/// `epochs`, dropped by the ledger's start) and `sqlite_stat1`.
pub fn check_schema(conn: &Connection) -> Result<()> {
    let found = schema_of(conn)?;
    let expected = EXPECTED_SCHEMA.as_ref().map_err(|e| anyhow::anyhow!("{e}"))?;
    let unexpected: Vec<String> = found
        .iter()
        .filter(|object| {
            let (kind, _, table, _) = object;
            !expected.contains(object) && (table == "records" || kind == "trigger" || kind == "view")
        })
        .map(|(kind, name, _, _)| format!("{kind} {name}"))
        .collect();
    if !unexpected.is_empty() {
        bail!(
            "the audit store holds schema objects seb did not create, or changed ({}); refusing to use it",
            unexpected.join(", ")
        );
    }
    if let Some((kind, name, _, _)) = expected.iter().find(|object| !found.contains(object)) {
        bail!("the audit store lacks its {kind} {name}; refusing to use it");
    }
    Ok(())
}

/// (type, name, table, sql) of one object of a schema.
type SchemaObject = (String, String, String, Option<String>);

/// Every object in the main schema.
fn schema_of(conn: &Connection) -> Result<Vec<SchemaObject>> {
    let mut query = conn.prepare("SELECT type, name, tbl_name, sql FROM main.sqlite_master ORDER BY type, name")?;
    let rows = query.query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?)))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// The schema as SQLite records it for [`SCHEMA`], read from a scratch database.
static EXPECTED_SCHEMA: std::sync::LazyLock<Result<Vec<SchemaObject>, String>> = std::sync::LazyLock::new(|| {
    let scratch = Connection::open_in_memory().map_err(|e| e.to_string())?;
    scratch.execute_batch(SCHEMA).map_err(|e| e.to_string())?;
    schema_of(&scratch).map_err(|e| format!("{e:#}"))
});

/// Rebuild the index from the table, under the verifying transaction: what it answers
/// is then what the verified walk read.
pub fn rebuild_index(conn: &Connection) -> Result<()> {
    conn.execute_batch("REINDEX records_by_kind").context("rebuilding the audit store's index")
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

/// The body of the last record of `kind` as verified at the ledger's start (on the
/// ledger's connection only): what start-up work resumes from, which a row written into
/// the store since cannot change.
pub fn last_body_at_start(conn: &Connection, kind: &str) -> Result<Option<String>> {
    Ok(conn.query_row("SELECT body FROM temp.last_at_start WHERE kind = ?1", [kind], |row| row.get(0)).optional()?)
}

impl From<&StoredRecord> for Record {
    fn from(stored: &StoredRecord) -> Self {
        Self { seq: stored.seq, kind: stored.kind.clone(), time_ns: stored.time_ns, body: stored.body.clone() }
    }
}

fn stored_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<StoredRecord> {
    Ok(StoredRecord {
        seq: row.get(0)?,
        kind: row.get(1)?,
        time_ns: row.get(2)?,
        body: row.get(3)?,
        prev_hash: row.get(4)?,
        hash: row.get(5)?,
        signature: row.get(6)?,
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
        check_schema(&conn)?;
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

    /// Records above `after` with their chain fields, oldest first, for a reader that
    /// checks each link as it goes.
    pub fn stored_after(&self, after: i64, limit: usize) -> Result<Vec<StoredRecord>> {
        let mut query = self.conn.prepare_cached(
            "SELECT seq, kind, time_ns, body, prev_hash, hash, signature FROM records WHERE seq > ?1 ORDER BY seq \
             LIMIT ?2",
        )?;
        let rows = query.query_map(params![after, limit as i64], stored_from_row)?;
        rows.collect::<Result<_, _>>().context("reading audit records")
    }

    /// One record with its chain fields.
    pub fn stored(&self, seq: i64) -> Result<Option<StoredRecord>> {
        let mut query = self.conn.prepare_cached(
            "SELECT seq, kind, time_ns, body, prev_hash, hash, signature FROM records WHERE seq = ?1",
        )?;
        Ok(query.query_row(params![seq], stored_from_row).optional()?)
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
        if !f(stored_from_row(row).map_err(|e| Unreadable { seq, problem: e.to_string() }))? {
            break;
        }
    }
    Ok(())
}

/// The store's files as the broker opened them, to notice one deleted or replaced under
/// it: SQLite would go on writing into the unlinked file, and the records would vanish
/// with the process.
pub struct OpenFiles {
    /// Each path, its file held open (so its inode number cannot be reused by another
    /// file while watched) and that file's device and inode, read once.
    files: Vec<(PathBuf, File, (u64, u64))>,
}

impl OpenFiles {
    /// The database and its `-wal` (once SQLite created it, on the first read).
    pub fn pin(database: &Path) -> Result<Self> {
        let mut watched = Self { files: Vec::new() };
        for path in [database.to_path_buf(), sibling(database, "-wal")] {
            match watched.watch(&path) {
                Err(e) if watched.files.len() == 1 && is_not_found(&e) => {}
                result => result?,
            }
        }
        Ok(watched)
    }

    /// Also watch `path` (the head file, once written).
    pub fn watch(&mut self, path: &Path) -> Result<()> {
        let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let open = file.metadata().with_context(|| format!("checking {}", path.display()))?;
        self.files.push((path.to_path_buf(), file, (open.dev(), open.ino())));
        Ok(())
    }

    /// Fails if a file was deleted, or its path now names another file. One `stat` of
    /// each path: what a batch of records costs the ledger thread, twice.
    pub fn check(&self) -> Result<()> {
        for (path, _, open) in &self.files {
            match std::fs::metadata(path) {
                Ok(now) if (now.dev(), now.ino()) == *open => {}
                Ok(_) => bail!("the audit file {} was replaced while the broker ran", path.display()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    bail!("the audit file {} was deleted while the broker ran", path.display())
                }
                Err(e) => return Err(e).with_context(|| format!("checking {}", path.display())),
            }
        }
        Ok(())
    }
}

fn is_not_found(error: &anyhow::Error) -> bool {
    error.downcast_ref::<std::io::Error>().is_some_and(|e| e.kind() == std::io::ErrorKind::NotFound)
}

/// Reads a store's records in order, each checked to link to the one before it and to
/// match its hash: a reader shipping the log elsewhere (`audit follow`, `denials
/// --follow`) stops, saying where, when the store is changed under it (a record
/// rewritten, or one inserted far ahead to make it skip everything after), rather than
/// passing on what it was handed. Signatures are `audit verify`'s.
pub struct CheckedReader<'a> {
    store: &'a AuditStore,
    head: Head,
    /// Where the chain broke, once it did: the records before it were handed out.
    broken: Option<String>,
}

impl<'a> CheckedReader<'a> {
    /// Reading from after record `after` (0: from the first), linked to that record.
    pub fn after(store: &'a AuditStore, after: i64) -> Result<Self> {
        let head = if after == 0 {
            Head::EMPTY
        } else {
            let anchor = store.stored(after)?.with_context(|| format!("there is no record {after} to read on from"))?;
            let hash = anchor.hash.try_into().map_err(|_| anyhow::anyhow!("record {after} has no readable hash"))?;
            Head { seq: after, hash }
        };
        Ok(Self { store, head, broken: None })
    }

    /// An error naming the broken link, if the chain broke in what was read.
    pub fn intact(&self) -> Result<()> {
        match &self.broken {
            Some(broken) => bail!("{broken}"),
            None => Ok(()),
        }
    }

    /// The next records, at most `limit`, each checked: those before a broken link, then
    /// (at the next call) the error naming it.
    pub fn next_page(&mut self, limit: usize) -> Result<Vec<StoredRecord>> {
        self.intact()?;
        let mut records = self.store.stored_after(self.head.seq, limit)?;
        for (at, record) in records.iter().enumerate() {
            match chain::check_link(record, &self.head) {
                Ok(head) => self.head = head,
                Err(fault) => {
                    self.broken = Some(format!(
                        "record {}: {fault}; the store no longer holds the chain read so far, so nothing more is \
                         read (check it with `seb-agent audit verify`)",
                        record.seq
                    ));
                    records.truncate(at);
                    if records.is_empty() {
                        bail!("{}", self.broken.as_deref().unwrap_or_default());
                    }
                    break;
                }
            }
        }
        Ok(records)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_store_is_the_owners_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.db");
        let mode = |file: &Path| std::fs::metadata(file).unwrap().permissions().mode() & 0o777;
        let files = || [path.clone(), sibling(&path, "-wal"), sibling(&path, "-shm")];
        let conn = open_writable(&path, true).unwrap();
        for file in files() {
            assert_eq!(mode(&file), 0o600, "{}", file.display());
        }
        // One left readable by everyone (an older version, another umask) is tightened.
        drop(conn);
        for file in files().iter().filter(|f| f.exists()) {
            std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o644)).unwrap();
        }
        let _conn = open_writable(&path, false).unwrap();
        for file in files() {
            assert_eq!(mode(&file), 0o600, "{}", file.display());
        }
    }

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
        assert!(error.contains("schema objects seb did not create, or changed (trigger hide)"), "{error}");
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
    fn an_index_or_view_planted_in_the_store_is_refused_by_the_writer_and_the_verifier() {
        let dir = tempfile::tempdir().unwrap();
        for (label, planting) in [
            ("index evil", "CREATE INDEX evil ON records(kind, seq, body)"),
            ("view last", "CREATE VIEW last AS SELECT * FROM records"),
            ("trigger elsewhere", "CREATE TABLE t(x); CREATE TRIGGER elsewhere AFTER INSERT ON t BEGIN SELECT 1; END;"),
            (
                "index records_by_kind",
                "DROP INDEX records_by_kind; CREATE INDEX records_by_kind ON records(kind, seq, body)",
            ),
        ] {
            let path = dir.path().join(format!("{}.db", label.replace(' ', "-")));
            drop(open_writable(&path, true).unwrap());
            Connection::open(&path).unwrap().execute_batch(planting).unwrap();
            for error in [
                open_writable(&path, false).err().map(|e| e.to_string()),
                AuditStore::open_read_only(&path).err().map(|e| e.to_string()),
            ] {
                let error = error.unwrap_or_else(|| panic!("{label}: opened"));
                assert!(error.contains(&format!("did not create, or changed ({label})")), "{label}: {error}");
            }
        }
        // Tables no query of seb's reads are let be: an older version's state, ANALYZE's.
        let path = dir.path().join("legacy.db");
        drop(open_writable(&path, true).unwrap());
        Connection::open(&path)
            .unwrap()
            .execute_batch("CREATE TABLE used_serials(serial TEXT PRIMARY KEY); ANALYZE;")
            .unwrap();
        open_writable(&path, false).unwrap();
        AuditStore::open_read_only(&path).unwrap();
        // A records table seb did not make (a view in its place) is missing its table.
        let path = dir.path().join("view.db");
        Connection::open(&path).unwrap().execute_batch("CREATE VIEW records AS SELECT 1 AS seq").unwrap();
        let error = AuditStore::open_read_only(&path).err().unwrap().to_string();
        assert!(error.contains("view records"), "{error}");
    }

    #[test]
    fn an_index_whose_pages_were_swapped_for_a_shadow_is_rebuilt_from_the_table() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.db");
        let conn = open_writable(&path, true).unwrap();
        for seq in 1..=3 {
            conn.execute(
                "INSERT INTO records (seq, kind, time_ns, body, prev_hash, hash, signature) VALUES (?1, 'decision', 0, '{}', X'', X'', X'')",
                [seq],
            )
            .unwrap();
        }
        drop(conn);
        // The index's name and text are seb's, its pages a shadow table's that lacks record 2.
        let planted = Connection::open(&path).unwrap();
        planted
            .execute_batch(
                "DROP INDEX records_by_kind;
                 CREATE TABLE shadow(seq INTEGER PRIMARY KEY, kind TEXT);
                 INSERT INTO shadow VALUES (1, 'decision'), (3, 'decision');
                 CREATE INDEX shadow_by_kind ON shadow(kind, seq);
                 PRAGMA writable_schema = ON;
                 UPDATE sqlite_master SET name = 'records_by_kind', tbl_name = 'records',
                     sql = 'CREATE INDEX records_by_kind ON records(kind, seq)' WHERE name = 'shadow_by_kind';
                 DELETE FROM sqlite_master WHERE name = 'shadow';
                 PRAGMA writable_schema = OFF;",
            )
            .unwrap();
        drop(planted);
        let conn = open_writable(&path, false).unwrap();
        let decisions = |conn: &Connection| -> Vec<i64> {
            let mut query = conn.prepare("SELECT seq FROM records WHERE kind = 'decision' ORDER BY seq").unwrap();
            query.query_map([], |row| row.get(0)).unwrap().collect::<Result<_, _>>().unwrap()
        };
        assert_eq!(decisions(&conn), vec![1, 3], "the planted index answers (the attack as reproduced)");
        rebuild_index(&conn).unwrap();
        assert_eq!(decisions(&conn), vec![1, 2, 3], "rebuilt from the table");
    }

    #[test]
    fn the_derived_state_of_the_writer_is_kept_in_memory() {
        let dir = tempfile::tempdir().unwrap();
        let conn = open_writable(&dir.path().join("audit.db"), true).unwrap();
        let temp_store: i64 = conn.query_row("PRAGMA temp_store", [], |row| row.get(0)).unwrap();
        assert_eq!(temp_store, 2, "temporary tables in memory (2), not in a file");
    }
}
