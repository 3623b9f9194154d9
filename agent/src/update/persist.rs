//! Persistence of the update machine: `DATA/update.db` (SQLite, WAL, synchronous=FULL,
//! its own schema version) plus files.
//!
//! ```text
//! DATA/update.db              machine state (JSON, STATE_SCHEMA), director counter state,
//!                             trusted-time floor, received ranges, byte counters
//! DATA/partial/<artifact>     artifact being fetched; a range is recorded in update.db
//!                             only after its bytes are written and fsynced
//! DATA/tuf/<role>.json        trusted TUF metadata (role names percent-encoded)
//! ```
//!
//! `update.db` is a separate file rather than tables in `agent.db` because `agent.db`'s
//! `user_version` belongs to the model store's migrations: a second list of migrations
//! on the same file would make each side refuse the other's version as "newer".

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use outpost_protocol::director::CounterState;
use outpost_protocol::tuf::{MetadataStore, StoreError as TufStoreError};
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};

use super::machine::{Machine, STATE_SCHEMA};
use crate::db;

const DB_FILE: &str = "update.db";
const PARTIAL_DIR: &str = "partial";
const TUF_DIR: &str = "tuf";

const MIGRATIONS: &[&str] = &[
    r"
CREATE TABLE machine (
  id INTEGER PRIMARY KEY CHECK (id = 1),
  schema INTEGER NOT NULL,
  state TEXT NOT NULL
);
CREATE TABLE counter (
  id INTEGER PRIMARY KEY CHECK (id = 1),
  counter INTEGER NOT NULL,
  digest TEXT NOT NULL
);
CREATE TABLE time_floor (
  id INTEGER PRIMARY KEY CHECK (id = 1),
  unix_secs INTEGER NOT NULL
);
CREATE TABLE ranges (
  artifact TEXT NOT NULL,
  start INTEGER NOT NULL,
  end INTEGER NOT NULL,
  PRIMARY KEY (artifact, start)
);
CREATE TABLE counters (
  name TEXT PRIMARY KEY,
  value INTEGER NOT NULL
);
CREATE TABLE slot_targets (
  slot TEXT PRIMARY KEY,
  sha256 TEXT NOT NULL,
  path TEXT NOT NULL
);
",
    r"
-- One row per (slot, model): the previous model's target path must outlive the next
-- install (status reports name it as the revert target).
CREATE TABLE slot_targets_v2 (
  slot TEXT NOT NULL,
  sha256 TEXT NOT NULL,
  path TEXT NOT NULL,
  PRIMARY KEY (slot, sha256)
);
INSERT INTO slot_targets_v2 (slot, sha256, path) SELECT slot, sha256, path FROM slot_targets;
DROP TABLE slot_targets;
ALTER TABLE slot_targets_v2 RENAME TO slot_targets;
",
];

/// Errors of update persistence.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PersistError {
    /// SQLite failed.
    #[error("update.db: {0}")]
    Db(#[from] rusqlite::Error),
    /// update.db was written by a newer agent.
    #[error("update.db schema version {found} is newer than the supported {supported}")]
    TooNew {
        /// Found.
        found: u32,
        /// Supported.
        supported: u32,
    },
    /// The persisted machine is unreadable or of an unknown schema.
    #[error("persisted update state (schema {schema}) is unreadable: {reason}")]
    BadState {
        /// Its schema.
        schema: u32,
        /// Why.
        reason: String,
    },
    /// A file operation failed.
    #[error("{op} {}: {source}", .path.display())]
    Io {
        /// What.
        op: &'static str,
        /// Where.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// An artifact id is not 64 hex digits (it names a file).
    #[error("artifact id {0:?} is not a sha256 hex digest")]
    BadArtifactId(String),
}

/// Result alias.
pub type Result<T, E = PersistError> = std::result::Result<T, E>;

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> PersistError + 'a {
    move |source| PersistError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

/// `update.db` of one data directory. `Send + Sync`.
#[derive(Debug)]
pub struct UpdateDb {
    root: PathBuf,
    conn: Mutex<Connection>,
}

impl UpdateDb {
    /// Opens (creating and migrating) `DATA/update.db`. The caller holds the data
    /// directory's lock (the agent's store).
    pub fn open(data_dir: &Path) -> Result<UpdateDb> {
        for sub in [PARTIAL_DIR, TUF_DIR] {
            let d = data_dir.join(sub);
            fs::create_dir_all(&d).map_err(io_err("create", &d))?;
        }
        let mut conn = db::open(&data_dir.join(DB_FILE))?;
        db::migrate(&mut conn, MIGRATIONS).map_err(|e| match e {
            db::MigrateError::Sqlite(e) => PersistError::Db(e),
            db::MigrateError::TooNew { found, supported } => {
                PersistError::TooNew { found, supported }
            }
        })?;
        Ok(UpdateDb {
            root: data_dir.to_owned(),
            conn: Mutex::new(conn),
        })
    }

    /// Opens `update.db` read-only, without the data directory lock (for `status`).
    pub fn open_read_only(data_dir: &Path) -> Result<UpdateDb> {
        let conn = Connection::open_with_flags(
            data_dir.join(DB_FILE),
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        Ok(UpdateDb {
            root: data_dir.to_owned(),
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The persisted machine (default: idle).
    pub fn load_machine(&self) -> Result<Machine> {
        let row: Option<(u32, String)> = self
            .conn()
            .query_row("SELECT schema, state FROM machine WHERE id = 1", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .optional()?;
        let Some((schema, json)) = row else {
            return Ok(Machine::default());
        };
        if schema != STATE_SCHEMA {
            return Err(PersistError::BadState {
                schema,
                reason: format!("this agent reads schema {STATE_SCHEMA}"),
            });
        }
        serde_json::from_str(&json).map_err(|e| PersistError::BadState {
            schema,
            reason: e.to_string(),
        })
    }

    /// Writes the machine, and the counter state if given, in one transaction.
    pub fn save_machine(&self, machine: &Machine, counter: Option<&CounterState>) -> Result<()> {
        let json = serde_json::to_string(machine).map_err(|e| PersistError::BadState {
            schema: STATE_SCHEMA,
            reason: e.to_string(),
        })?;
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        tx.execute(
            "INSERT INTO machine (id, schema, state) VALUES (1, ?1, ?2)
             ON CONFLICT(id) DO UPDATE SET schema = excluded.schema, state = excluded.state",
            params![STATE_SCHEMA, json],
        )?;
        if let Some(c) = counter {
            tx.execute(
                "INSERT INTO counter (id, counter, digest) VALUES (1, ?1, ?2)
                 ON CONFLICT(id) DO UPDATE SET counter = excluded.counter, digest = excluded.digest",
                params![db::to_i64(c.counter), hex::encode(c.digest)],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// The last accepted assignment's counter state.
    pub fn counter(&self) -> Result<Option<CounterState>> {
        let row: Option<(i64, String)> = self
            .conn()
            .query_row(
                "SELECT counter, digest FROM counter WHERE id = 1",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        Ok(row.and_then(|(c, d)| {
            let digest: [u8; 32] = hex::decode(d).ok()?.try_into().ok()?;
            Some(CounterState {
                counter: db::to_u64(c)?,
                digest,
            })
        }))
    }

    /// The trusted-time floor (Unix seconds), 0 when none.
    pub fn time_floor(&self) -> Result<i64> {
        Ok(self
            .conn()
            .query_row("SELECT unix_secs FROM time_floor WHERE id = 1", [], |r| {
                r.get(0)
            })
            .optional()?
            .unwrap_or(0))
    }

    /// Raises the floor to `unix_secs` (never lowers it).
    pub fn raise_time_floor(&self, unix_secs: i64) -> Result<()> {
        self.conn().execute(
            "INSERT INTO time_floor (id, unix_secs) VALUES (1, ?1)
             ON CONFLICT(id) DO UPDATE SET unix_secs = max(unix_secs, excluded.unix_secs)",
            [unix_secs],
        )?;
        Ok(())
    }

    /// Received ranges `[start, end)` of an artifact, by start.
    pub fn ranges(&self, artifact: &str) -> Result<Vec<(u64, u64)>> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached("SELECT start, end FROM ranges WHERE artifact = ?1 ORDER BY start")?;
        let rows = stmt.query_map([artifact], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (s, e) = row?;
            if let (Some(s), Some(e)) = (db::to_u64(s), db::to_u64(e)) {
                out.push((s, e));
            }
        }
        Ok(out)
    }

    /// Records `[start, end)` as received (its bytes are already fsynced) and adds the
    /// length to the byte counter `kind`.
    pub fn add_range(&self, artifact: &str, start: u64, end: u64, kind: &str) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        tx.execute(
            "INSERT OR REPLACE INTO ranges (artifact, start, end) VALUES (?1, ?2, ?3)",
            params![artifact, db::to_i64(start), db::to_i64(end)],
        )?;
        tx.execute(
            "INSERT INTO counters (name, value) VALUES (?1, ?2)
             ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
            params![format!("bytes.{kind}"), db::to_i64(end - start)],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Adds to a named counter and returns the new value.
    pub fn bump(&self, name: &str, by: u64) -> Result<u64> {
        let v: i64 = self.conn().query_row(
            "INSERT INTO counters (name, value) VALUES (?1, ?2)
             ON CONFLICT(name) DO UPDATE SET value = value + excluded.value RETURNING value",
            params![name, db::to_i64(by)],
            |r| r.get(0),
        )?;
        Ok(db::to_u64(v).unwrap_or(0))
    }

    /// Bytes received per kind (`full`, `delta`, `metadata`).
    pub fn bytes_received(&self) -> Result<BTreeMap<String, u64>> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare_cached("SELECT name, value FROM counters WHERE name LIKE 'bytes.%'")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
        let mut out = BTreeMap::new();
        for row in rows {
            let (name, v) = row?;
            out.insert(
                name.trim_start_matches("bytes.").to_owned(),
                db::to_u64(v).unwrap_or(0),
            );
        }
        Ok(out)
    }

    /// Deletes an artifact's partial file and ranges (ranges first: a range never names
    /// bytes that are gone).
    pub fn discard_partial(&self, artifact: &str) -> Result<()> {
        self.conn()
            .execute("DELETE FROM ranges WHERE artifact = ?1", [artifact])?;
        let path = self.partial_path(artifact)?;
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("remove", &path)(e)),
        }
    }

    /// Deletes every partial file and range except `keep`'s.
    pub fn discard_partials_except(&self, keep: Option<&str>) -> Result<()> {
        let dir = self.root.join(PARTIAL_DIR);
        let entries = fs::read_dir(&dir).map_err(io_err("list", &dir))?;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if Some(name.as_str()) != keep {
                let _ = fs::remove_file(entry.path());
            }
        }
        self.conn()
            .execute("DELETE FROM ranges WHERE artifact IS NOT ?1", [keep])?;
        Ok(())
    }

    /// Path of an artifact's partial file (the id must be 64 hex digits).
    pub fn partial_path(&self, artifact: &str) -> Result<PathBuf> {
        if artifact.len() != 64 || !artifact.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(PersistError::BadArtifactId(
                artifact.chars().take(80).collect(),
            ));
        }
        Ok(self
            .root
            .join(PARTIAL_DIR)
            .join(artifact.to_ascii_lowercase()))
    }

    /// Writes `bytes` at `offset` of the artifact's partial file and fsyncs it. Call
    /// [`UpdateDb::add_range`] only after this returned.
    pub fn write_chunk(&self, artifact: &str, offset: u64, bytes: &[u8]) -> Result<()> {
        let path = self.partial_path(artifact)?;
        let file = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(false)
            .open(&path)
            .map_err(io_err("open", &path))?;
        file.write_all_at(bytes, offset)
            .map_err(io_err("write", &path))?;
        file.sync_data().map_err(io_err("fsync", &path))
    }

    /// Remembers which target path a slot's model came from (for status reports).
    pub fn set_slot_target(&self, slot: &str, sha256: &str, path: &str) -> Result<()> {
        self.conn().execute(
            "INSERT OR REPLACE INTO slot_targets (slot, sha256, path) VALUES (?1, ?2, ?3)",
            params![slot, sha256, path],
        )?;
        Ok(())
    }

    /// Target path of a model, by slot and sha256.
    pub fn slot_target(&self, slot: &str, sha256: &str) -> Result<Option<String>> {
        Ok(self
            .conn()
            .query_row(
                "SELECT path FROM slot_targets WHERE slot = ?1 AND sha256 = ?2",
                params![slot, sha256],
                |r| r.get(0),
            )
            .optional()?)
    }

    /// The TUF metadata store in `DATA/tuf/`.
    pub fn metadata_store(&self) -> FileMetadataStore {
        FileMetadataStore {
            dir: self.root.join(TUF_DIR),
        }
    }
}

/// Trusted TUF metadata as files, one per role, replaced atomically (write, fsync,
/// rename, fsync the directory).
#[derive(Debug, Clone)]
pub struct FileMetadataStore {
    dir: PathBuf,
}

impl FileMetadataStore {
    /// A store over `dir`.
    pub fn new(dir: PathBuf) -> Self {
        FileMetadataStore { dir }
    }

    fn path(&self, role: &str) -> PathBuf {
        // Delegated role names come from remote metadata: percent-encode all but
        // [A-Za-z0-9_-] so no name can leave the directory.
        let mut name = String::new();
        for b in role.bytes() {
            if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' {
                name.push(b as char);
            } else {
                name.push_str(&format!("%{b:02X}"));
            }
        }
        self.dir.join(format!("{name}.json"))
    }
}

impl MetadataStore for FileMetadataStore {
    fn load(&mut self, role: &str) -> Option<Vec<u8>> {
        fs::read(self.path(role)).ok()
    }

    fn save(&mut self, role: &str, bytes: &[u8]) -> Result<(), TufStoreError> {
        let path = self.path(role);
        let tmp = path.with_extension("json.tmp");
        let write = || -> io::Result<()> {
            let mut f = File::create(&tmp)?;
            f.write_all(bytes)?;
            f.sync_all()?;
            fs::rename(&tmp, &path)?;
            File::open(&self.dir)?.sync_all()
        };
        write().map_err(|e| TufStoreError(format!("{}: {e}", path.display())))
    }

    fn delete(&mut self, role: &str) -> Result<(), TufStoreError> {
        match fs::remove_file(self.path(role)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(TufStoreError(e.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::update::machine::{Failure, FailureKind, Phase};

    #[test]
    fn previous_target_path_survives_the_next_install() {
        let dir = tempfile::tempdir().unwrap();
        let db = UpdateDb::open(dir.path()).unwrap();
        db.set_slot_target("digits", "aa", "digits/1.0/a.onnx")
            .unwrap();
        db.set_slot_target("digits", "bb", "digits/1.1/b.onnx")
            .unwrap();
        assert_eq!(
            db.slot_target("digits", "aa").unwrap().as_deref(),
            Some("digits/1.0/a.onnx")
        );
        assert_eq!(
            db.slot_target("digits", "bb").unwrap().as_deref(),
            Some("digits/1.1/b.onnx")
        );
    }

    #[test]
    fn machine_and_counter_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let db = UpdateDb::open(dir.path()).unwrap();
        assert_eq!(db.load_machine().unwrap(), Machine::default());
        let m = Machine {
            phase: Phase::Failed {
                job: None,
                failure: Failure::new(FailureKind::Assignment, "expired"),
            },
            ..Machine::default()
        };
        let c = CounterState {
            counter: 7,
            digest: [3; 32],
        };
        db.save_machine(&m, Some(&c)).unwrap();
        drop(db);
        let db = UpdateDb::open(dir.path()).unwrap();
        assert_eq!(db.load_machine().unwrap(), m);
        assert_eq!(db.counter().unwrap(), Some(c));
        let ro = UpdateDb::open_read_only(dir.path()).unwrap();
        assert_eq!(ro.load_machine().unwrap(), m);
    }

    #[test]
    fn time_floor_never_goes_down() {
        let dir = tempfile::tempdir().unwrap();
        let db = UpdateDb::open(dir.path()).unwrap();
        db.raise_time_floor(100).unwrap();
        db.raise_time_floor(50).unwrap();
        assert_eq!(db.time_floor().unwrap(), 100);
    }

    #[test]
    fn rejects_artifact_ids_that_could_escape_the_partial_dir() {
        let dir = tempfile::tempdir().unwrap();
        let db = UpdateDb::open(dir.path()).unwrap();
        assert!(db.write_chunk("../../etc/passwd", 0, b"x").is_err());
        let id = "ab".repeat(32);
        db.write_chunk(&id, 4, b"yz").unwrap();
        db.add_range(&id, 4, 6, "full").unwrap();
        assert_eq!(db.ranges(&id).unwrap(), vec![(4, 6)]);
        assert_eq!(db.bytes_received().unwrap()["full"], 2);
        db.discard_partial(&id).unwrap();
        assert!(db.ranges(&id).unwrap().is_empty());
        assert!(!db.partial_path(&id).unwrap().exists());
    }

    #[test]
    fn metadata_store_encodes_role_names() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = FileMetadataStore::new(dir.path().to_owned());
        s.save("../x", b"{}").unwrap();
        assert_eq!(s.load("../x").unwrap(), b"{}");
        assert!(dir.path().join("%2E%2E%2Fx.json").exists());
        s.delete("../x").unwrap();
        assert!(s.load("../x").is_none());
    }
}
