//! The agent's on-disk model store: content-addressed model files plus, per model slot, an
//! `active` and a `previous` pointer so that a bad model can be reverted instantly.
//!
//! # Data directory layout
//!
//! ```text
//! DATA/
//!   agent.lock            exclusive lock (flock) held for the lifetime of the Store; the file
//!                         holds the holder's pid as decimal text, for the error message only
//!   agent.db              SQLite, WAL, synchronous=FULL: model slots and pins (schema below)
//!   outbox.db             telemetry outbox, see crate::outbox (its own SQLite file)
//!   blobs/sha256/<hex>    model files, named by the lowercase hex SHA-256 of their content
//!   tmp/<hex>.<pid>.<n>.part
//!                         a blob being written; only ever renamed into blobs/ once
//!                         complete, fsynced and hash-checked; emptied when the store opens
//! ```
//!
//! `agent.db`, schema version 1 (`PRAGMA user_version`):
//!
//! ```sql
//! CREATE TABLE slots (
//!   model TEXT PRIMARY KEY,                       -- model slot name (release "model")
//!   active_hash TEXT NOT NULL,                    -- hex sha256 of a blob in blobs/sha256
//!   active_release TEXT NOT NULL,                 -- release metadata JSON (protocol::release)
//!   active_at_ms INTEGER NOT NULL,                -- wall-clock Unix ms of the activation
//!   previous_hash TEXT, previous_release TEXT, previous_at_ms INTEGER  -- all NULL or all set
//! );
//! CREATE TABLE pins (hash TEXT PRIMARY KEY, reason TEXT NOT NULL, pinned_at_ms INTEGER NOT NULL);
//! ```
//!
//! # Crash safety
//!
//! - A blob appears under `blobs/` only by `rename` of a fully written, fsynced and
//!   hash-verified temp file, followed by an fsync of the directory.
//! - [`Store::activate`] requires the blob to be in `blobs/` already and moves
//!   `active -> previous`, `new -> active` in one SQLite transaction. A kill at any instant
//!   therefore leaves either the old or the new model active, never a partial one.
//! - [`Store::open`] recovers: it empties `tmp/`, re-hashes every blob and removes those
//!   whose content does not match their name (or whose name is not a hash), then repairs any
//!   slot whose pointer lost its blob (falls back to `previous`, else clears the slot). The
//!   [`RecoveryReport`] says what it did.
//! - [`Store::open_model`] re-checks the SHA-256 of the bytes it returns: a blob corrupted
//!   after open is a [`StoreError::CorruptBlob`], never served.
//!
//! Garbage collection ([`Store::gc`]) removes blobs referenced by no `active`, no
//! `previous` and no pin. A blob staged for a later activation must be pinned
//! ([`Store::pin`]) before anyone may run `gc`.
//!
//! ```
//! use outpost_agent::store::{BlobHash, Store};
//! let dir = tempfile::tempdir().unwrap();
//! let store = Store::open(dir.path()).unwrap();
//! let model = b"onnx bytes";
//! let hash = BlobHash::of(model);
//! store.put_blob(&model[..], hash, model.len() as u64).unwrap();
//! store.activate("digits", hash, r#"{"model":"digits"}"#).unwrap();
//! let loaded = store.open_model("digits").unwrap();
//! assert_eq!(loaded.bytes, model);
//! ```

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use sha2::{Digest, Sha256};

use crate::db;

/// Schema version of `agent.db` written by this build.
pub const SCHEMA_VERSION: u32 = 1;

const MIGRATIONS: &[&str] = &[r"
CREATE TABLE slots (
  model TEXT PRIMARY KEY,
  active_hash TEXT NOT NULL,
  active_release TEXT NOT NULL,
  active_at_ms INTEGER NOT NULL,
  previous_hash TEXT,
  previous_release TEXT,
  previous_at_ms INTEGER
);
CREATE TABLE pins (
  hash TEXT PRIMARY KEY,
  reason TEXT NOT NULL,
  pinned_at_ms INTEGER NOT NULL
);
"];

const LOCK_FILE: &str = "agent.lock";
const DB_FILE: &str = "agent.db";
const BLOB_DIR: &str = "blobs/sha256";
const TMP_DIR: &str = "tmp";
const COPY_BUF: usize = 64 * 1024;

/// Result alias for the model store.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Errors from the model store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// Another process (or another `Store` in this process) holds the data directory.
    #[error(
        "data directory {} is in use by another outpost-agent{}",
        .path.display(),
        .holder_pid.map(|p| format!(" (pid {p})")).unwrap_or_default()
    )]
    Locked {
        /// The data directory.
        path: PathBuf,
        /// The pid written in the lock file by the holder, if readable.
        holder_pid: Option<u32>,
    },
    /// A file-system operation failed.
    #[error("{op} {}: {source}", .path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// On which path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The SQLite database failed.
    #[error("model store database: {0}")]
    Db(#[from] rusqlite::Error),
    /// `agent.db` was written by a newer agent.
    #[error("{} has schema version {found}, newer than the supported {supported}", .path.display())]
    SchemaTooNew {
        /// The database file.
        path: PathBuf,
        /// Version in the file.
        found: u32,
        /// Version this build writes.
        supported: u32,
    },
    /// Offered bytes do not hash to the expected value; nothing was stored.
    #[error("blob hash mismatch: expected {expected}, got {actual}")]
    HashMismatch {
        /// The hash the caller promised (from signed metadata).
        expected: BlobHash,
        /// The hash of what was read.
        actual: BlobHash,
    },
    /// Offered bytes are not of the expected length; nothing was stored.
    #[error("blob length mismatch: expected {expected} bytes, got {}{actual}", if *.too_long { "more than " } else { "" })]
    LengthMismatch {
        /// The length the caller promised.
        expected: u64,
        /// Bytes read (reading stops one byte past `expected`).
        actual: u64,
        /// The source had more bytes than expected.
        too_long: bool,
    },
    /// The blob is not in the store.
    #[error("blob {hash} is not in the store")]
    MissingBlob {
        /// The blob asked for.
        hash: BlobHash,
    },
    /// A stored blob no longer hashes to its name (disk corruption or tampering).
    #[error("blob {hash} is corrupted: its content hashes to {actual}")]
    CorruptBlob {
        /// The blob's name.
        hash: BlobHash,
        /// The hash of its current content.
        actual: BlobHash,
    },
    /// No model is active in this slot.
    #[error("no model is active in slot {model:?}")]
    NoSuchModel {
        /// Slot name.
        model: String,
    },
    /// Revert asked for but the slot keeps no previous model.
    #[error("slot {model:?} has no previous model to revert to")]
    NoPrevious {
        /// Slot name.
        model: String,
    },
    /// Text that should be a hex SHA-256 is not.
    #[error("not a hex sha256: {text:?}")]
    InvalidHash {
        /// The offending text (truncated to 80 chars).
        text: String,
    },
    /// Release metadata handed to [`Store::activate`] is not JSON.
    #[error("release metadata is not JSON: {0}")]
    InvalidRelease(#[source] serde_json::Error),
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// A SHA-256 digest naming a blob. Displays and parses as 64 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlobHash([u8; 32]);

impl BlobHash {
    /// Wraps raw digest bytes.
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The SHA-256 of `data`.
    pub fn of(data: &[u8]) -> Self {
        Self(Sha256::digest(data).into())
    }

    /// The raw digest bytes.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Lowercase hex, the blob's file name.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl FromStr for BlobHash {
    type Err = StoreError;

    /// Parses 64 hex digits (either case).
    fn from_str(text: &str) -> Result<Self> {
        let invalid = || StoreError::InvalidHash {
            text: text.chars().take(80).collect(),
        };
        if text.len() != 64 {
            return Err(invalid());
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(text, &mut out).map_err(|_| invalid())?;
        Ok(Self(out))
    }
}

impl fmt::Display for BlobHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for BlobHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BlobHash({self})")
    }
}

/// One pointer of a slot: which blob, with which release, since when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotEntry {
    /// The model file.
    pub hash: BlobHash,
    /// Release metadata JSON as given to [`Store::activate`].
    pub release_json: String,
    /// Wall-clock Unix milliseconds of the activation (0 if the clock was before 1970).
    pub activated_at_ms: u64,
}

/// A model slot: the active model and the one it replaced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slot {
    /// Slot name.
    pub model: String,
    /// What serves now.
    pub active: SlotEntry,
    /// What served before, kept for [`Store::revert`].
    pub previous: Option<SlotEntry>,
}

/// The active model of a slot with its verified bytes.
#[derive(Debug, Clone)]
pub struct LoadedModel {
    /// The pointer that was followed.
    pub entry: SlotEntry,
    /// The model file; its SHA-256 equals `entry.hash`.
    pub bytes: Vec<u8>,
}

/// What [`Store::open`] cleaned up.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Leftover staging files removed from `tmp/`.
    pub temp_files_removed: usize,
    /// Files removed from `blobs/sha256` because their name is not a hash or their
    /// content does not match it.
    pub bad_blobs_removed: Vec<String>,
    /// Slots whose pointers had to change because a blob was gone.
    pub repaired_slots: Vec<SlotRepair>,
}

/// A slot changed by recovery.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SlotRepair {
    /// The active blob was missing; the previous model is active again.
    RevertedToPrevious {
        /// Slot name.
        model: String,
        /// The blob that was lost.
        lost: BlobHash,
    },
    /// The active blob was missing and there was no usable previous: the slot is gone.
    Cleared {
        /// Slot name.
        model: String,
        /// The blob that was lost.
        lost: BlobHash,
    },
    /// The previous blob was missing; the slot keeps its active model only.
    PreviousDropped {
        /// Slot name.
        model: String,
        /// The blob that was lost.
        lost: BlobHash,
    },
}

/// What [`Store::gc`] removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Blobs deleted.
    pub removed: Vec<BlobHash>,
    /// Their total size.
    pub bytes_freed: u64,
}

/// The model store of one data directory. Holds the directory's exclusive lock until
/// dropped. `Send + Sync`; database access is serialized internally.
#[derive(Debug)]
pub struct Store {
    root: PathBuf,
    _lock: File,
    conn: Mutex<Connection>,
    tmp_counter: AtomicU64,
    recovery: RecoveryReport,
}

impl Store {
    /// Opens (creating if needed) the data directory `root`: takes its lock, migrates
    /// `agent.db`, and runs crash recovery (see the module docs).
    ///
    /// Fails with [`StoreError::Locked`] if another process or `Store` holds it.
    pub fn open(root: impl AsRef<Path>) -> Result<Self> {
        let root = root.as_ref().to_path_buf();
        fs::create_dir_all(&root).map_err(io_err("create", &root))?;
        let lock = acquire_lock(&root)?;
        for sub in [BLOB_DIR, TMP_DIR] {
            let dir = root.join(sub);
            fs::create_dir_all(&dir).map_err(io_err("create", &dir))?;
        }
        let db_path = root.join(DB_FILE);
        let mut conn = db::open(&db_path)?;
        db::migrate(&mut conn, MIGRATIONS).map_err(|e| match e {
            db::MigrateError::Sqlite(e) => StoreError::Db(e),
            db::MigrateError::TooNew { found, supported } => StoreError::SchemaTooNew {
                path: db_path.clone(),
                found,
                supported,
            },
        })?;
        let mut store = Store {
            root,
            _lock: lock,
            conn: Mutex::new(conn),
            tmp_counter: AtomicU64::new(0),
            recovery: RecoveryReport::default(),
        };
        store.recovery = store.recover()?;
        Ok(store)
    }

    /// The data directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the outbox database of this data directory lives (`DATA/outbox.db`).
    pub fn outbox_path(&self) -> PathBuf {
        self.root.join("outbox.db")
    }

    /// What recovery did when this store was opened.
    pub fn recovery_report(&self) -> &RecoveryReport {
        &self.recovery
    }

    /// Path of a blob's file (it may not exist). Readers that bypass
    /// [`Store::read_blob`] must check the hash themselves.
    pub fn blob_path(&self, hash: &BlobHash) -> PathBuf {
        self.root.join(BLOB_DIR).join(hash.to_hex())
    }

    /// Whether the blob is in the store.
    pub fn has_blob(&self, hash: &BlobHash) -> bool {
        self.blob_path(hash).is_file()
    }

    /// Stores the bytes from `reader` as blob `expected`, reading at most
    /// `expected_len + 1` bytes. The blob is in `blobs/` (fsynced, directory fsynced) when
    /// this returns `Ok`. A hash or length mismatch stores nothing. Idempotent: if the blob
    /// exists with the right length, `reader` is not read.
    pub fn put_blob(&self, reader: impl Read, expected: BlobHash, expected_len: u64) -> Result<()> {
        let final_path = self.blob_path(&expected);
        // An existing blob is re-hashed rather than trusted: if it rotted, the rename below
        // replaces it with the verified new copy.
        if let Ok(meta) = fs::metadata(&final_path)
            && meta.is_file()
            && meta.len() == expected_len
            && hash_file(&final_path).is_ok_and(|h| h == expected)
        {
            return Ok(());
        }
        let n = self.tmp_counter.fetch_add(1, Ordering::Relaxed);
        let tmp_path = self.root.join(TMP_DIR).join(format!(
            "{}.{}.{n}.part",
            expected.to_hex(),
            std::process::id()
        ));
        let result = write_verified(&tmp_path, reader, expected, expected_len);
        if let Err(err) = result {
            let _ = fs::remove_file(&tmp_path);
            return Err(err);
        }
        if let Err(err) = fs::rename(&tmp_path, &final_path) {
            let _ = fs::remove_file(&tmp_path);
            return Err(io_err("rename into", &final_path)(err));
        }
        sync_dir(&self.root.join(BLOB_DIR))
    }

    /// Reads a blob and checks its SHA-256.
    pub fn read_blob(&self, hash: &BlobHash) -> Result<Vec<u8>> {
        let path = self.blob_path(hash);
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(StoreError::MissingBlob { hash: *hash });
            }
            Err(e) => return Err(io_err("read", &path)(e)),
        };
        let actual = BlobHash::of(&bytes);
        if actual != *hash {
            return Err(StoreError::CorruptBlob {
                hash: *hash,
                actual,
            });
        }
        Ok(bytes)
    }

    /// Makes `hash` the active model of `model`, keeping the current active one as
    /// `previous`, in one transaction. The blob must already be in the store
    /// ([`Store::put_blob`] returned). Activating the hash that is already active is a
    /// no-op (so an interrupted update can simply repeat it).
    pub fn activate(&self, model: &str, hash: BlobHash, release_json: &str) -> Result<()> {
        serde_json::from_str::<serde::de::IgnoredAny>(release_json)
            .map_err(StoreError::InvalidRelease)?;
        let mut conn = self.conn();
        // Checked under the connection lock so that a concurrent gc cannot remove it.
        if !self.has_blob(&hash) {
            return Err(StoreError::MissingBlob { hash });
        }
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let current: Option<String> = tx
            .query_row(
                "SELECT active_hash FROM slots WHERE model = ?1",
                [model],
                |row| row.get(0),
            )
            .optional()?;
        let hex = hash.to_hex();
        let now = wall_ms();
        match current {
            Some(active) if active == hex => return Ok(()),
            Some(_) => {
                tx.execute(
                    "UPDATE slots SET previous_hash = active_hash, previous_release = active_release,
                       previous_at_ms = active_at_ms, active_hash = ?2, active_release = ?3,
                       active_at_ms = ?4 WHERE model = ?1",
                    params![model, hex, release_json, db::to_i64(now)],
                )?;
            }
            None => {
                tx.execute(
                    "INSERT INTO slots (model, active_hash, active_release, active_at_ms)
                     VALUES (?1, ?2, ?3, ?4)",
                    params![model, hex, release_json, db::to_i64(now)],
                )?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Swaps `active` and `previous` of `model` in one transaction and returns the new
    /// active entry. The reverted-from model stays as `previous`.
    pub fn revert(&self, model: &str) -> Result<SlotEntry> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let slot = read_slot(&tx, model)?.ok_or_else(|| StoreError::NoSuchModel {
            model: model.to_owned(),
        })?;
        let previous = slot.previous.ok_or_else(|| StoreError::NoPrevious {
            model: model.to_owned(),
        })?;
        if !self.has_blob(&previous.hash) {
            return Err(StoreError::MissingBlob {
                hash: previous.hash,
            });
        }
        write_slot(&tx, model, &previous, Some(&slot.active))?;
        tx.commit()?;
        Ok(previous)
    }

    /// The active entry of `model`, if any.
    pub fn active(&self, model: &str) -> Result<Option<SlotEntry>> {
        Ok(self.slot(model)?.map(|slot| slot.active))
    }

    /// Both pointers of `model`, if it has an active model.
    pub fn slot(&self, model: &str) -> Result<Option<Slot>> {
        read_slot(&self.conn(), model)
    }

    /// All slots, by name.
    pub fn slots(&self) -> Result<Vec<Slot>> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT model FROM slots ORDER BY model")?;
        let names = stmt
            .query_map([], |row| row.get::<_, String>(0))?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        let mut out = Vec::with_capacity(names.len());
        for name in names {
            if let Some(slot) = read_slot(&conn, &name)? {
                out.push(slot);
            }
        }
        Ok(out)
    }

    /// Reads the active model of `model`, checking its SHA-256 against the pointer.
    pub fn open_model(&self, model: &str) -> Result<LoadedModel> {
        let entry = self.active(model)?.ok_or_else(|| StoreError::NoSuchModel {
            model: model.to_owned(),
        })?;
        let bytes = self.read_blob(&entry.hash)?;
        Ok(LoadedModel { entry, bytes })
    }

    /// Protects a blob (e.g. a downloaded candidate awaiting validation) from [`Store::gc`].
    /// The blob need not exist yet. Re-pinning replaces the reason.
    pub fn pin(&self, hash: BlobHash, reason: &str) -> Result<()> {
        self.conn().execute(
            "INSERT INTO pins (hash, reason, pinned_at_ms) VALUES (?1, ?2, ?3)
             ON CONFLICT(hash) DO UPDATE SET reason = excluded.reason",
            params![hash.to_hex(), reason, db::to_i64(wall_ms())],
        )?;
        Ok(())
    }

    /// Removes a pin. Returns whether there was one.
    pub fn unpin(&self, hash: &BlobHash) -> Result<bool> {
        let n = self
            .conn()
            .execute("DELETE FROM pins WHERE hash = ?1", [hash.to_hex()])?;
        Ok(n > 0)
    }

    /// Deletes every blob that no slot (active or previous) and no pin refers to.
    pub fn gc(&self) -> Result<GcReport> {
        let conn = self.conn();
        let keep = referenced_hashes(&conn)?;
        let dir = self.root.join(BLOB_DIR);
        let mut report = GcReport::default();
        for (name, path) in list_dir(&dir)? {
            let Ok(hash) = name.parse::<BlobHash>() else {
                continue;
            };
            if keep.contains(&hash) {
                continue;
            }
            let len = fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            match fs::remove_file(&path) {
                Ok(()) => {
                    report.removed.push(hash);
                    report.bytes_freed += len;
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err("remove", &path)(e)),
            }
        }
        if !report.removed.is_empty() {
            sync_dir(&dir)?;
        }
        drop(conn);
        Ok(report)
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave a transaction open: rusqlite rolls
        // back on drop, so the connection is usable.
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn recover(&self) -> Result<RecoveryReport> {
        let mut report = RecoveryReport::default();
        let tmp = self.root.join(TMP_DIR);
        for (_, path) in list_dir(&tmp)? {
            let removed = if path.is_dir() {
                fs::remove_dir_all(&path)
            } else {
                fs::remove_file(&path)
            };
            removed.map_err(io_err("remove", &path))?;
            report.temp_files_removed += 1;
        }
        if report.temp_files_removed > 0 {
            sync_dir(&tmp)?;
        }

        let blobs = self.root.join(BLOB_DIR);
        for (name, path) in list_dir(&blobs)? {
            let ok = match name.parse::<BlobHash>() {
                Ok(hash) if name == hash.to_hex() => {
                    path.is_file() && hash_file(&path).map(|h| h == hash).unwrap_or(false)
                }
                _ => false,
            };
            if !ok {
                let removed = if path.is_dir() {
                    fs::remove_dir_all(&path)
                } else {
                    fs::remove_file(&path)
                };
                removed.map_err(io_err("remove", &path))?;
                report.bad_blobs_removed.push(name);
            }
        }
        if !report.bad_blobs_removed.is_empty() {
            sync_dir(&blobs)?;
        }

        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let names = {
            let mut stmt = tx.prepare("SELECT model FROM slots ORDER BY model")?;
            stmt.query_map([], |row| row.get::<_, String>(0))?
                .collect::<rusqlite::Result<Vec<_>>>()?
        };
        for model in names {
            let Some(slot) = read_slot(&tx, &model)? else {
                continue;
            };
            let previous_ok = slot
                .previous
                .as_ref()
                .filter(|p| self.has_blob(&p.hash))
                .cloned();
            if !self.has_blob(&slot.active.hash) {
                let lost = slot.active.hash;
                match previous_ok {
                    Some(previous) => {
                        write_slot(&tx, &model, &previous, None)?;
                        report
                            .repaired_slots
                            .push(SlotRepair::RevertedToPrevious { model, lost });
                    }
                    None => {
                        tx.execute("DELETE FROM slots WHERE model = ?1", [&model])?;
                        report
                            .repaired_slots
                            .push(SlotRepair::Cleared { model, lost });
                    }
                }
            } else if let Some(previous) = &slot.previous
                && previous_ok.is_none()
            {
                let lost = previous.hash;
                write_slot(&tx, &model, &slot.active, None)?;
                report
                    .repaired_slots
                    .push(SlotRepair::PreviousDropped { model, lost });
            }
        }
        tx.commit()?;
        Ok(report)
    }
}

fn acquire_lock(root: &Path) -> Result<File> {
    let path = root.join(LOCK_FILE);
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io_err("open", &path))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(fs::TryLockError::WouldBlock) => {
            let holder_pid = fs::read_to_string(&path)
                .ok()
                .and_then(|text| text.trim().parse().ok());
            return Err(StoreError::Locked {
                path: root.to_path_buf(),
                holder_pid,
            });
        }
        Err(fs::TryLockError::Error(e)) => return Err(io_err("lock", &path)(e)),
    }
    file.set_len(0).map_err(io_err("truncate", &path))?;
    file.write_all(format!("{}\n", std::process::id()).as_bytes())
        .map_err(io_err("write", &path))?;
    Ok(file)
}

fn write_verified(
    path: &Path,
    reader: impl Read,
    expected: BlobHash,
    expected_len: u64,
) -> Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(io_err("create", path))?;
    let mut limited = reader.take(expected_len.saturating_add(1));
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; COPY_BUF];
    let mut total = 0u64;
    loop {
        let n = match limited.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_err("read source for", path)(e)),
        };
        total += n as u64;
        if total > expected_len {
            return Err(StoreError::LengthMismatch {
                expected: expected_len,
                actual: total,
                too_long: true,
            });
        }
        hasher.update(&buf[..n]);
        file.write_all(&buf[..n]).map_err(io_err("write", path))?;
    }
    if total != expected_len {
        return Err(StoreError::LengthMismatch {
            expected: expected_len,
            actual: total,
            too_long: false,
        });
    }
    let actual = BlobHash(hasher.finalize().into());
    if actual != expected {
        return Err(StoreError::HashMismatch { expected, actual });
    }
    file.sync_all().map_err(io_err("fsync", path))?;
    Ok(())
}

fn hash_file(path: &Path) -> io::Result<BlobHash> {
    let mut file = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; COPY_BUF];
    loop {
        match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => hasher.update(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(BlobHash(hasher.finalize().into()))
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync directory", dir))
}

fn list_dir(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err("list", dir))? {
        let entry = entry.map_err(io_err("list", dir))?;
        out.push((
            entry.file_name().to_string_lossy().into_owned(),
            entry.path(),
        ));
    }
    out.sort();
    Ok(out)
}

fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn parse_hash_column(text: String) -> rusqlite::Result<BlobHash> {
    text.parse().map_err(|e: StoreError| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
    })
}

fn read_slot(conn: &Connection, model: &str) -> Result<Option<Slot>> {
    let row = conn
        .query_row(
            "SELECT active_hash, active_release, active_at_ms,
                    previous_hash, previous_release, previous_at_ms
             FROM slots WHERE model = ?1",
            [model],
            |row| {
                let active = SlotEntry {
                    hash: parse_hash_column(row.get(0)?)?,
                    release_json: row.get(1)?,
                    activated_at_ms: db::to_u64(row.get(2)?).unwrap_or(0),
                };
                let previous = match (
                    row.get::<_, Option<String>>(3)?,
                    row.get::<_, Option<String>>(4)?,
                    row.get::<_, Option<i64>>(5)?,
                ) {
                    (Some(hash), Some(release_json), Some(at)) => Some(SlotEntry {
                        hash: parse_hash_column(hash)?,
                        release_json,
                        activated_at_ms: db::to_u64(at).unwrap_or(0),
                    }),
                    _ => None,
                };
                Ok(Slot {
                    model: model.to_owned(),
                    active,
                    previous,
                })
            },
        )
        .optional()?;
    Ok(row)
}

fn write_slot(
    conn: &Connection,
    model: &str,
    active: &SlotEntry,
    previous: Option<&SlotEntry>,
) -> Result<()> {
    conn.execute(
        "UPDATE slots SET active_hash = ?2, active_release = ?3, active_at_ms = ?4,
           previous_hash = ?5, previous_release = ?6, previous_at_ms = ?7 WHERE model = ?1",
        params![
            model,
            active.hash.to_hex(),
            active.release_json,
            db::to_i64(active.activated_at_ms),
            previous.map(|p| p.hash.to_hex()),
            previous.map(|p| p.release_json.as_str()),
            previous.map(|p| db::to_i64(p.activated_at_ms)),
        ],
    )?;
    Ok(())
}

fn referenced_hashes(conn: &Connection) -> Result<std::collections::HashSet<BlobHash>> {
    let mut stmt = conn.prepare(
        "SELECT active_hash FROM slots
         UNION SELECT previous_hash FROM slots WHERE previous_hash IS NOT NULL
         UNION SELECT hash FROM pins",
    )?;
    let hashes = stmt
        .query_map([], |row| parse_hash_column(row.get(0)?))?
        .collect::<rusqlite::Result<_>>()?;
    Ok(hashes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blob(seed: u8, len: usize) -> (Vec<u8>, BlobHash) {
        let data: Vec<u8> = (0..len)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed)
            .collect();
        let hash = BlobHash::of(&data);
        (data, hash)
    }

    fn put(store: &Store, seed: u8) -> BlobHash {
        let (data, hash) = blob(seed, 4096 + seed as usize);
        store.put_blob(&data[..], hash, data.len() as u64).unwrap();
        hash
    }

    fn tmp_is_empty(store: &Store) -> bool {
        fs::read_dir(store.root().join(TMP_DIR))
            .unwrap()
            .next()
            .is_none()
    }

    #[test]
    fn second_open_in_same_process_is_locked() {
        let dir = tempfile::tempdir().unwrap();
        let first = Store::open(dir.path()).unwrap();
        let err = Store::open(dir.path()).unwrap_err();
        match &err {
            StoreError::Locked { path, holder_pid } => {
                assert_eq!(path, dir.path());
                assert_eq!(*holder_pid, Some(std::process::id()));
            }
            other => panic!("expected Locked, got {other:?}"),
        }
        let message = err.to_string();
        assert!(
            message.contains("in use by another outpost-agent")
                && message.contains(&format!("pid {}", std::process::id())),
            "{message}"
        );
        drop(first);
        Store::open(dir.path()).expect("lock released on drop");
    }

    #[test]
    fn rejects_blob_with_wrong_hash_and_leaves_no_debris() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (data, _) = blob(1, 1000);
        let (_, other) = blob(2, 1000);
        let err = store.put_blob(&data[..], other, 1000).unwrap_err();
        assert!(
            matches!(err, StoreError::HashMismatch { expected, .. } if expected == other),
            "{err:?}"
        );
        assert!(!store.has_blob(&other));
        assert!(tmp_is_empty(&store));
    }

    #[test]
    fn rejects_blob_longer_or_shorter_than_promised() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (data, hash) = blob(3, 1000);
        let err = store.put_blob(&data[..], hash, 999).unwrap_err();
        assert!(
            matches!(
                err,
                StoreError::LengthMismatch {
                    expected: 999,
                    too_long: true,
                    ..
                }
            ),
            "{err:?}"
        );
        let err = store.put_blob(&data[..], hash, 1001).unwrap_err();
        assert!(
            matches!(
                err,
                StoreError::LengthMismatch {
                    expected: 1001,
                    actual: 1000,
                    too_long: false
                }
            ),
            "{err:?}"
        );
        assert!(!store.has_blob(&hash));
        assert!(tmp_is_empty(&store));
        store.put_blob(&data[..], hash, 1000).unwrap();
        assert!(store.has_blob(&hash));
    }

    #[test]
    fn put_blob_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (data, hash) = blob(4, 2000);
        store.put_blob(&data[..], hash, 2000).unwrap();
        // The second put must not read the source: a failing reader proves it.
        struct Failing;
        impl Read for Failing {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                Err(io::Error::other("must not be read"))
            }
        }
        store.put_blob(Failing, hash, 2000).unwrap();
        assert_eq!(store.read_blob(&hash).unwrap(), data);
    }

    #[test]
    fn put_blob_repairs_a_rotten_copy_of_the_same_blob() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (data, hash) = blob(5, 2000);
        store.put_blob(&data[..], hash, 2000).unwrap();
        let mut rotten = data.clone();
        rotten[7] ^= 0x80;
        fs::write(store.blob_path(&hash), &rotten).unwrap();
        store.put_blob(&data[..], hash, 2000).unwrap();
        assert_eq!(store.read_blob(&hash).unwrap(), data);
    }

    #[test]
    fn activate_keeps_previous_and_revert_swaps() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let a = put(&store, 10);
        let b = put(&store, 11);
        store.activate("m", a, r#"{"v":1}"#).unwrap();
        assert!(store.slot("m").unwrap().unwrap().previous.is_none());
        store.activate("m", b, r#"{"v":2}"#).unwrap();
        let slot = store.slot("m").unwrap().unwrap();
        assert_eq!(slot.active.hash, b);
        assert_eq!(slot.active.release_json, r#"{"v":2}"#);
        assert_eq!(slot.previous.as_ref().unwrap().hash, a);

        // Re-activating the active hash must not push it into previous.
        store.activate("m", b, r#"{"v":2}"#).unwrap();
        assert_eq!(store.slot("m").unwrap().unwrap(), slot);

        let now = store.revert("m").unwrap();
        assert_eq!(now.hash, a);
        assert_eq!(now.release_json, r#"{"v":1}"#);
        let slot = store.slot("m").unwrap().unwrap();
        assert_eq!(slot.active.hash, a);
        assert_eq!(slot.previous.unwrap().hash, b);
        assert_eq!(store.open_model("m").unwrap().entry.hash, a);
    }

    #[test]
    fn revert_without_previous_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert!(matches!(
            store.revert("m").unwrap_err(),
            StoreError::NoSuchModel { .. }
        ));
        let a = put(&store, 12);
        store.activate("m", a, "{}").unwrap();
        assert!(matches!(
            store.revert("m").unwrap_err(),
            StoreError::NoPrevious { .. }
        ));
        assert_eq!(store.active("m").unwrap().unwrap().hash, a);
    }

    #[test]
    fn refuses_to_activate_missing_blob_or_non_json_release() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (_, hash) = blob(13, 100);
        assert!(matches!(
            store.activate("m", hash, "{}").unwrap_err(),
            StoreError::MissingBlob { .. }
        ));
        let a = put(&store, 14);
        assert!(matches!(
            store.activate("m", a, "{not json").unwrap_err(),
            StoreError::InvalidRelease(_)
        ));
        assert!(store.active("m").unwrap().is_none());
    }

    #[test]
    fn corrupted_active_blob_is_not_served() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let a = put(&store, 15);
        store.activate("m", a, "{}").unwrap();
        let path = store.blob_path(&a);
        let mut bytes = fs::read(&path).unwrap();
        bytes[100] ^= 0x01;
        fs::write(&path, &bytes).unwrap();
        let err = store.open_model("m").unwrap_err();
        assert!(
            matches!(err, StoreError::CorruptBlob { hash, actual } if hash == a && actual == BlobHash::of(&bytes)),
            "{err:?}"
        );
    }

    #[test]
    fn recovery_removes_temp_files_and_corrupt_blobs_and_falls_back_to_previous() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b, c) = {
            let store = Store::open(dir.path()).unwrap();
            let a = put(&store, 20);
            let b = put(&store, 21);
            let c = put(&store, 22);
            store.activate("m", a, r#"{"v":"a"}"#).unwrap();
            store.activate("m", b, r#"{"v":"b"}"#).unwrap();
            store.activate("solo", c, "{}").unwrap();
            (a, b, c)
        };
        fs::write(dir.path().join(TMP_DIR).join("x.part"), b"half").unwrap();
        fs::write(dir.path().join(BLOB_DIR).join("not-a-hash"), b"junk").unwrap();
        // Corrupt the active blob of "m" and of "solo".
        for hash in [b, c] {
            let path = dir.path().join(BLOB_DIR).join(hash.to_hex());
            fs::write(&path, b"truncated").unwrap();
        }

        let store = Store::open(dir.path()).unwrap();
        let report = store.recovery_report().clone();
        assert_eq!(report.temp_files_removed, 1);
        let mut expected_bad = vec!["not-a-hash".to_owned(), b.to_hex(), c.to_hex()];
        expected_bad.sort();
        let mut bad = report.bad_blobs_removed.clone();
        bad.sort();
        assert_eq!(bad, expected_bad);
        assert!(
            report
                .repaired_slots
                .contains(&SlotRepair::RevertedToPrevious {
                    model: "m".into(),
                    lost: b
                })
        );
        assert!(report.repaired_slots.contains(&SlotRepair::Cleared {
            model: "solo".into(),
            lost: c
        }));
        let slot = store.slot("m").unwrap().unwrap();
        assert_eq!(slot.active.hash, a);
        assert_eq!(slot.active.release_json, r#"{"v":"a"}"#);
        assert!(slot.previous.is_none());
        assert!(store.active("solo").unwrap().is_none());
        assert_eq!(
            store.open_model("m").unwrap().bytes,
            store.read_blob(&a).unwrap()
        );
        assert!(tmp_is_empty(&store));
    }

    #[test]
    fn recovery_drops_previous_pointer_whose_blob_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = {
            let store = Store::open(dir.path()).unwrap();
            let a = put(&store, 30);
            let b = put(&store, 31);
            store.activate("m", a, "{}").unwrap();
            store.activate("m", b, "{}").unwrap();
            (a, b)
        };
        fs::remove_file(dir.path().join(BLOB_DIR).join(a.to_hex())).unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(
            store.recovery_report().repaired_slots,
            vec![SlotRepair::PreviousDropped {
                model: "m".into(),
                lost: a
            }]
        );
        let slot = store.slot("m").unwrap().unwrap();
        assert_eq!(slot.active.hash, b);
        assert!(slot.previous.is_none());
    }

    #[test]
    fn gc_keeps_active_previous_and_pinned_blobs_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let a = put(&store, 40);
        let b = put(&store, 41);
        let c = put(&store, 42);
        let staged = put(&store, 43);
        let garbage = put(&store, 44);
        store.activate("m", a, "{}").unwrap();
        store.activate("m", b, "{}").unwrap();
        store.activate("m", c, "{}").unwrap(); // a is now unreferenced
        store.pin(staged, "candidate").unwrap();
        let report = store.gc().unwrap();
        let mut removed = report.removed.clone();
        removed.sort();
        let mut expected = vec![a, garbage];
        expected.sort();
        assert_eq!(removed, expected);
        assert!(report.bytes_freed > 0);
        for kept in [b, c, staged] {
            assert!(store.has_blob(&kept));
        }
        assert!(store.unpin(&staged).unwrap());
        assert_eq!(store.gc().unwrap().removed, vec![staged]);
        assert!(!store.unpin(&staged).unwrap());
    }

    #[test]
    fn schema_version_is_recorded_and_newer_schema_refused() {
        let dir = tempfile::tempdir().unwrap();
        drop(Store::open(dir.path()).unwrap());
        let conn = Connection::open(dir.path().join(DB_FILE)).unwrap();
        let version: u32 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        conn.pragma_update(None, "user_version", SCHEMA_VERSION + 1)
            .unwrap();
        drop(conn);
        let err = Store::open(dir.path()).unwrap_err();
        assert!(
            matches!(err, StoreError::SchemaTooNew { found, supported, .. }
                if found == SCHEMA_VERSION + 1 && supported == SCHEMA_VERSION),
            "{err:?}"
        );
    }

    #[test]
    fn store_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Store>();
    }

    #[test]
    fn blob_hash_parses_only_64_hex_digits() {
        let hash = BlobHash::of(b"x");
        assert_eq!(hash.to_hex().parse::<BlobHash>().unwrap(), hash);
        assert_eq!(
            hash.to_hex().to_uppercase().parse::<BlobHash>().unwrap(),
            hash
        );
        for bad in [
            "",
            "ab",
            &"g".repeat(64),
            &"a".repeat(65),
            "../../etc/passwd",
        ] {
            assert!(bad.parse::<BlobHash>().is_err(), "{bad}");
        }
    }
}
