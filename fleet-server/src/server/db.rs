//! The server's SQLite database (WAL): devices, image-repository targets, artifacts,
//! telemetry, operator tokens and the audit log.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;

use super::auth::Role;

const SCHEMA_VERSION: i64 = 1;

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS devices (
    id TEXT PRIMARY KEY,
    tags TEXT NOT NULL,
    password_hash TEXT NOT NULL,
    created INTEGER NOT NULL,
    last_seen INTEGER,
    status TEXT,
    status_seq INTEGER,
    assignment_counter INTEGER NOT NULL DEFAULT 0,
    assignment BLOB,
    telemetry_acked INTEGER NOT NULL DEFAULT 0,
    telemetry_drops TEXT
);
CREATE TABLE IF NOT EXISTS device_slots (
    device TEXT NOT NULL REFERENCES devices(id),
    model TEXT NOT NULL,
    target TEXT NOT NULL,
    PRIMARY KEY (device, model)
);
CREATE TABLE IF NOT EXISTS targets (
    path TEXT PRIMARY KEY,
    role TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    length INTEGER NOT NULL,
    file TEXT NOT NULL,
    model TEXT,
    version TEXT,
    sequence INTEGER
);
CREATE TABLE IF NOT EXISTS artifacts (
    id TEXT NOT NULL,
    target_sha256 TEXT NOT NULL,
    base_sha256 TEXT,
    length INTEGER NOT NULL,
    codec TEXT,
    created INTEGER NOT NULL,
    PRIMARY KEY (target_sha256, id)
);
CREATE INDEX IF NOT EXISTS artifacts_id ON artifacts(id);
CREATE TABLE IF NOT EXISTS telemetry (
    device TEXT NOT NULL,
    seq INTEGER NOT NULL,
    class TEXT NOT NULL,
    age_ms INTEGER NOT NULL,
    payload TEXT NOT NULL,
    received INTEGER NOT NULL,
    PRIMARY KEY (device, seq)
);
CREATE TABLE IF NOT EXISTS telemetry_ranges (
    device TEXT NOT NULL,
    after_seq INTEGER NOT NULL,
    covers_to INTEGER NOT NULL,
    PRIMARY KEY (device, after_seq, covers_to)
);
CREATE TABLE IF NOT EXISTS telemetry_evicted (
    device TEXT NOT NULL,
    seq INTEGER NOT NULL,
    class TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    PRIMARY KEY (device, seq)
);
CREATE TABLE IF NOT EXISTS telemetry_drop_totals (
    device TEXT NOT NULL,
    class TEXT NOT NULL,
    evicted_records INTEGER NOT NULL DEFAULT 0,
    evicted_bytes INTEGER NOT NULL DEFAULT 0,
    rejected_records INTEGER NOT NULL DEFAULT 0,
    rejected_bytes INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (device, class)
);
CREATE TABLE IF NOT EXISTS tokens (
    hash TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    role TEXT NOT NULL,
    created INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at INTEGER NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    detail TEXT NOT NULL
);
"#;

/// Errors of the database layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DbError {
    /// SQLite failed.
    #[error("database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// A stored row does not parse.
    #[error("database row {what}: {reason}")]
    Corrupt {
        /// Which row.
        what: String,
        /// Why.
        reason: String,
    },
    /// The database was written by a newer server.
    #[error("database schema version {found} is newer than this server's {supported}")]
    NewerSchema {
        /// Found.
        found: i64,
        /// Supported.
        supported: i64,
    },
}

type Result<T, E = DbError> = std::result::Result<T, E>;

/// A device row.
#[derive(Debug, Clone, Serialize)]
pub struct DeviceRow {
    /// Device id.
    pub id: String,
    /// Tags.
    pub tags: BTreeMap<String, String>,
    /// Created (Unix seconds).
    pub created: i64,
    /// Last message from the device (Unix seconds).
    pub last_seen: Option<i64>,
    /// Last status report (JSON).
    pub status: Option<serde_json::Value>,
    /// Counter of the last signed assignment.
    pub assignment_counter: u64,
    /// Model → assigned target path.
    pub slots: BTreeMap<String, String>,
    /// Highest contiguous telemetry sequence stored.
    pub telemetry_acked: u64,
    /// Cumulative drop counters the device last reported.
    pub telemetry_drops: Option<serde_json::Value>,
}

/// A target of the image repository as the server indexes it.
#[derive(Debug, Clone, Serialize)]
pub struct TargetRow {
    /// Target path.
    pub path: String,
    /// Targets role that lists it.
    pub role: String,
    /// sha256 (hex).
    pub sha256: String,
    /// Length.
    pub length: u64,
    /// The signed entry (JSON of `TargetFile`).
    pub file: serde_json::Value,
    /// Release model name, when the target is a model release.
    pub model: Option<String>,
    /// Release version.
    pub version: Option<String>,
    /// Release sequence.
    pub sequence: Option<u64>,
}

/// A stored artifact: a full target or a delta to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ArtifactRow {
    /// sha256 of the artifact's bytes.
    pub id: String,
    /// sha256 of the target it reconstructs.
    pub target_sha256: String,
    /// Base model's sha256, for a delta.
    pub base_sha256: Option<String>,
    /// Length.
    pub length: u64,
    /// Delta codec.
    pub codec: Option<String>,
}

/// A device's new assignment state: id, counter, model → target path.
pub type DeviceAssignment = (String, u64, BTreeMap<String, String>);

/// An audit log entry.
#[derive(Debug, Clone, Serialize)]
pub struct AuditRow {
    /// Row id.
    pub id: i64,
    /// Unix seconds.
    pub at: i64,
    /// Token name.
    pub actor: String,
    /// Action.
    pub action: String,
    /// Details (JSON).
    pub detail: serde_json::Value,
}

/// A stored telemetry record.
#[derive(Debug, Clone, Serialize)]
pub struct TelemetryRow {
    /// Sequence.
    pub seq: u64,
    /// Class.
    pub class: String,
    /// Age when sent.
    pub age_ms: u64,
    /// Payload.
    pub payload: serde_json::Value,
    /// Received (Unix seconds).
    pub received: i64,
}

/// The database handle (one connection behind a mutex; calls are short).
#[derive(Debug)]
pub struct Db {
    conn: Mutex<Connection>,
}

fn corrupt(what: &str, e: impl std::fmt::Display) -> DbError {
    DbError::Corrupt {
        what: what.into(),
        reason: e.to_string(),
    }
}

fn json_col<T: serde::de::DeserializeOwned>(what: &str, s: &str) -> Result<T> {
    serde_json::from_str(s).map_err(|e| corrupt(what, e))
}

impl Db {
    /// Opens (creating) the database at `path`.
    pub fn open(path: &Path) -> Result<Db> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let found: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        if found > SCHEMA_VERSION {
            return Err(DbError::NewerSchema {
                found,
                supported: SCHEMA_VERSION,
            });
        }
        conn.execute_batch(SCHEMA)?;
        conn.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        Ok(Db {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock leaves SQLite consistent (transactions roll
        // back on drop), so a poisoned lock is still usable.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    // --- tokens and audit ---

    /// Number of tokens.
    pub fn token_count(&self) -> Result<u64> {
        Ok(self
            .conn()
            .query_row("SELECT COUNT(*) FROM tokens", [], |r| r.get(0))?)
    }

    /// Stores a token hash.
    pub fn insert_token(&self, hash: &str, name: &str, role: Role, now: i64) -> Result<()> {
        self.conn().execute(
            "INSERT INTO tokens (hash, name, role, created) VALUES (?1, ?2, ?3, ?4)",
            params![hash, name, role.as_str(), now],
        )?;
        Ok(())
    }

    /// The name and role of a token hash.
    pub fn token(&self, hash: &str) -> Result<Option<(String, Role)>> {
        let row: Option<(String, String)> = self
            .conn()
            .query_row(
                "SELECT name, role FROM tokens WHERE hash = ?1",
                [hash],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        row.map(|(name, role)| {
            Role::parse(&role)
                .map(|r| (name, r))
                .ok_or_else(|| corrupt("tokens.role", role))
        })
        .transpose()
    }

    /// Appends to the audit log.
    pub fn audit(&self, now: i64, actor: &str, action: &str, detail: &serde_json::Value) {
        let r = self.conn().execute(
            "INSERT INTO audit (at, actor, action, detail) VALUES (?1, ?2, ?3, ?4)",
            params![now, actor, action, detail.to_string()],
        );
        if let Err(e) = r {
            eprintln!("outpost-server: audit log write failed: {e}");
        }
    }

    /// The newest `limit` audit entries, newest first.
    pub fn audit_log(&self, limit: u32) -> Result<Vec<AuditRow>> {
        let conn = self.conn();
        let mut st = conn
            .prepare("SELECT id, at, actor, action, detail FROM audit ORDER BY id DESC LIMIT ?1")?;
        let rows = st.query_map([limit], |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get::<_, String>(4)?,
            ))
        })?;
        rows.map(|r| {
            let (id, at, actor, action, detail) = r?;
            Ok(AuditRow {
                id,
                at,
                actor,
                action,
                detail: json_col("audit.detail", &detail)?,
            })
        })
        .collect()
    }

    // --- devices ---

    /// Creates a device. Returns false if it exists.
    pub fn insert_device(
        &self,
        id: &str,
        tags: &BTreeMap<String, String>,
        password_hash: &str,
        now: i64,
    ) -> Result<bool> {
        let tags = serde_json::to_string(tags).expect("tags serialize");
        let n = self.conn().execute(
            "INSERT OR IGNORE INTO devices (id, tags, password_hash, created) VALUES (?1, ?2, ?3, ?4)",
            params![id, tags, password_hash, now],
        )?;
        Ok(n == 1)
    }

    /// Replaces a device's password hash. Returns false if there is no such device.
    pub fn set_password(&self, id: &str, password_hash: &str) -> Result<bool> {
        let n = self.conn().execute(
            "UPDATE devices SET password_hash = ?2 WHERE id = ?1",
            params![id, password_hash],
        )?;
        Ok(n == 1)
    }

    /// `(device id, password hash)` of every device.
    pub fn password_hashes(&self) -> Result<Vec<(String, String)>> {
        let conn = self.conn();
        let mut st = conn.prepare("SELECT id, password_hash FROM devices ORDER BY id")?;
        let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// One device.
    pub fn device(&self, id: &str) -> Result<Option<DeviceRow>> {
        Ok(self.devices_where(Some(id))?.into_iter().next())
    }

    /// Every device, by id.
    pub fn devices(&self) -> Result<Vec<DeviceRow>> {
        self.devices_where(None)
    }

    fn devices_where(&self, id: Option<&str>) -> Result<Vec<DeviceRow>> {
        let conn = self.conn();
        let mut st = conn.prepare(
            "SELECT id, tags, created, last_seen, status, assignment_counter, telemetry_acked, telemetry_drops
             FROM devices WHERE ?1 IS NULL OR id = ?1 ORDER BY id",
        )?;
        type Raw = (
            String,
            String,
            i64,
            Option<i64>,
            Option<String>,
            i64,
            i64,
            Option<String>,
        );
        let raw: Vec<Raw> = st
            .query_map([id], |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                    r.get(6)?,
                    r.get(7)?,
                ))
            })?
            .collect::<rusqlite::Result<_>>()?;
        let mut slots_st =
            conn.prepare("SELECT model, target FROM device_slots WHERE device = ?1")?;
        let mut out = Vec::with_capacity(raw.len());
        for (id, tags, created, last_seen, status, counter, acked, drops) in raw {
            let slots = slots_st
                .query_map([&id], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<rusqlite::Result<BTreeMap<String, String>>>()?;
            out.push(DeviceRow {
                tags: json_col("devices.tags", &tags)?,
                status: status.map(|s| json_col("devices.status", &s)).transpose()?,
                telemetry_drops: drops
                    .map(|s| json_col("devices.telemetry_drops", &s))
                    .transpose()?,
                id,
                created,
                last_seen,
                assignment_counter: counter as u64,
                slots,
                telemetry_acked: acked as u64,
            });
        }
        Ok(out)
    }

    /// Records that a device was heard from.
    pub fn touch_device(&self, id: &str, now: i64) -> Result<()> {
        self.conn().execute(
            "UPDATE devices SET last_seen = ?2 WHERE id = ?1",
            params![id, now],
        )?;
        Ok(())
    }

    /// Stores a status report unless an equal or newer `seq` is stored. Returns whether
    /// it was stored (false also for unknown devices).
    pub fn store_status(&self, id: &str, seq: u64, status: &str, now: i64) -> Result<bool> {
        let n = self.conn().execute(
            "UPDATE devices SET status = ?3, status_seq = ?2, last_seen = ?4
             WHERE id = ?1 AND (status_seq IS NULL OR status_seq < ?2)",
            params![id, seq as i64, status, now],
        )?;
        Ok(n == 1)
    }

    /// Sets `model` → `target` for each device and bumps its assignment counter, in one
    /// transaction. Returns each device's new counter and full slot map.
    pub fn assign(
        &self,
        devices: &[String],
        model: &str,
        target: &str,
    ) -> Result<Vec<DeviceAssignment>> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let mut out = Vec::new();
        for d in devices {
            tx.execute(
                "INSERT INTO device_slots (device, model, target) VALUES (?1, ?2, ?3)
                 ON CONFLICT(device, model) DO UPDATE SET target = excluded.target",
                params![d, model, target],
            )?;
            let counter: i64 = tx.query_row(
                "UPDATE devices SET assignment_counter = assignment_counter + 1 WHERE id = ?1
                 RETURNING assignment_counter",
                [d],
                |r| r.get(0),
            )?;
            let slots = {
                let mut st =
                    tx.prepare("SELECT model, target FROM device_slots WHERE device = ?1")?;
                st.query_map([d], |r| Ok((r.get(0)?, r.get(1)?)))?
                    .collect::<rusqlite::Result<BTreeMap<String, String>>>()?
            };
            out.push((d.clone(), counter as u64, slots));
        }
        tx.commit()?;
        Ok(out)
    }

    /// Raises the assignment counter of `id` by one and returns it (a renewal keeps
    /// the slots).
    pub fn next_assignment_counter(&self, id: &str) -> Result<u64> {
        let counter: i64 = self.conn().query_row(
            "UPDATE devices SET assignment_counter = assignment_counter + 1 WHERE id = ?1
             RETURNING assignment_counter",
            [id],
            |r| r.get(0),
        )?;
        Ok(counter as u64)
    }

    /// Stores the signed assignment document of a device.
    pub fn store_assignment(&self, id: &str, doc: &[u8]) -> Result<()> {
        self.conn().execute(
            "UPDATE devices SET assignment = ?2 WHERE id = ?1",
            params![id, doc],
        )?;
        Ok(())
    }

    /// `(device, signed assignment)` of every device that has one.
    pub fn assignments(&self) -> Result<Vec<(String, Vec<u8>)>> {
        let conn = self.conn();
        let mut st =
            conn.prepare("SELECT id, assignment FROM devices WHERE assignment IS NOT NULL")?;
        let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    // --- targets and artifacts ---

    /// Replaces the target index with the verified repository's targets.
    pub fn replace_targets(&self, rows: &[TargetRow]) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        tx.execute("DELETE FROM targets", [])?;
        for t in rows {
            tx.execute(
                "INSERT INTO targets (path, role, sha256, length, file, model, version, sequence)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![
                    t.path,
                    t.role,
                    t.sha256,
                    t.length as i64,
                    t.file.to_string(),
                    t.model,
                    t.version,
                    t.sequence.map(|s| s as i64)
                ],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Every target, by model then sequence.
    pub fn targets(&self) -> Result<Vec<TargetRow>> {
        let conn = self.conn();
        let mut st = conn.prepare(
            "SELECT path, role, sha256, length, file, model, version, sequence FROM targets
             ORDER BY model, sequence, path",
        )?;
        type Raw = (
            String,
            String,
            String,
            i64,
            String,
            Option<String>,
            Option<String>,
            Option<i64>,
        );
        let raw: Vec<Raw> = st
            .query_map([], |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                    r.get(6)?,
                    r.get(7)?,
                ))
            })?
            .collect::<rusqlite::Result<_>>()?;
        raw.into_iter()
            .map(
                |(path, role, sha256, length, file, model, version, sequence)| {
                    Ok(TargetRow {
                        file: json_col("targets.file", &file)?,
                        path,
                        role,
                        sha256,
                        length: length as u64,
                        model,
                        version,
                        sequence: sequence.map(|s| s as u64),
                    })
                },
            )
            .collect()
    }

    /// Stores an artifact row (idempotent).
    pub fn insert_artifact(&self, a: &ArtifactRow, now: i64) -> Result<()> {
        self.conn().execute(
            "INSERT OR IGNORE INTO artifacts (id, target_sha256, base_sha256, length, codec, created)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                a.id,
                a.target_sha256,
                a.base_sha256,
                a.length as i64,
                a.codec,
                now
            ],
        )?;
        Ok(())
    }

    /// Artifacts that reconstruct `target_sha256`.
    pub fn artifacts_for(&self, target_sha256: &str) -> Result<Vec<ArtifactRow>> {
        let conn = self.conn();
        let mut st = conn.prepare(
            "SELECT id, target_sha256, base_sha256, length, codec FROM artifacts
             WHERE target_sha256 = ?1 ORDER BY length, id",
        )?;
        let rows = st.query_map([target_sha256], |r| {
            Ok(ArtifactRow {
                id: r.get(0)?,
                target_sha256: r.get(1)?,
                base_sha256: r.get(2)?,
                length: r.get::<_, i64>(3)? as u64,
                codec: r.get(4)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// The length of artifact `id`, if it is stored.
    pub fn artifact_length(&self, id: &str) -> Result<Option<u64>> {
        Ok(self
            .conn()
            .query_row(
                "SELECT length FROM artifacts WHERE id = ?1 LIMIT 1",
                [id],
                |r| r.get::<_, i64>(0),
            )
            .optional()?
            .map(|l| l as u64))
    }

    // --- telemetry ---

    /// Stores a batch's records (deduplicated by `(device, seq)`), records the range
    /// `(after_seq, covers_to]` as complete, advances the device's contiguous watermark
    /// over every complete range that touches it, and returns the watermark.
    ///
    /// Drops: an evicted sequence counts only when no record with it is stored (a
    /// record stored later un-counts it), rejections are cumulative on the device (the
    /// largest value seen is kept). `telemetry_drops` is their sum per class; for a
    /// batch without `evicted` (older agents) it is the batch's own `drops`.
    pub fn ingest_telemetry(
        &self,
        device: &str,
        batch: &outpost_protocol::wire::TelemetryBatch,
        now: i64,
    ) -> Result<u64> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        {
            let mut ins = tx.prepare(
                "INSERT OR IGNORE INTO telemetry (device, seq, class, age_ms, payload, received)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?;
            let mut unevict = tx.prepare(
                "DELETE FROM telemetry_evicted WHERE device = ?1 AND seq = ?2 RETURNING class, bytes",
            )?;
            let mut uncount = tx.prepare(
                "UPDATE telemetry_drop_totals SET evicted_records = evicted_records - 1,
                 evicted_bytes = evicted_bytes - ?3 WHERE device = ?1 AND class = ?2",
            )?;
            for r in &batch.records {
                let stored = ins.execute(params![
                    device,
                    r.seq as i64,
                    r.class,
                    r.age_ms as i64,
                    r.payload.to_string(),
                    now
                ])?;
                if stored == 0 {
                    continue;
                }
                // Delivered late, after a batch that listed it as evicted.
                let counted: Option<(String, i64)> = unevict
                    .query_row(params![device, r.seq as i64], |r| {
                        Ok((r.get(0)?, r.get(1)?))
                    })
                    .optional()?;
                if let Some((class, bytes)) = counted {
                    uncount.execute(params![device, class, bytes])?;
                }
            }
        }
        if let Some(evicted) = &batch.evicted {
            let mut ins = tx.prepare(
                "INSERT OR IGNORE INTO telemetry_evicted (device, seq, class, bytes)
                 SELECT ?1, ?2, ?3, ?4
                 WHERE NOT EXISTS (SELECT 1 FROM telemetry WHERE device = ?1 AND seq = ?2)",
            )?;
            let mut count = tx.prepare(
                "INSERT INTO telemetry_drop_totals (device, class, evicted_records, evicted_bytes)
                 VALUES (?1, ?2, 1, ?3)
                 ON CONFLICT (device, class) DO UPDATE SET
                 evicted_records = evicted_records + 1, evicted_bytes = evicted_bytes + ?3",
            )?;
            for (class, entries) in evicted {
                for [seq, bytes] in entries {
                    let bytes = i64::try_from(*bytes).unwrap_or(i64::MAX);
                    if ins.execute(params![device, *seq as i64, class, bytes])? == 1 {
                        count.execute(params![device, class, bytes])?;
                    }
                }
            }
        }
        if let Some(rejected) = &batch.rejected {
            let mut st = tx.prepare(
                "INSERT INTO telemetry_drop_totals (device, class, rejected_records, rejected_bytes)
                 VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (device, class) DO UPDATE SET
                 rejected_records = MAX(rejected_records, ?3),
                 rejected_bytes = MAX(rejected_bytes, ?4)",
            )?;
            for (class, [records, bytes]) in rejected {
                st.execute(params![
                    device,
                    class,
                    i64::try_from(*records).unwrap_or(i64::MAX),
                    i64::try_from(*bytes).unwrap_or(i64::MAX)
                ])?;
            }
        }
        let mut acked: u64 = tx
            .query_row(
                "SELECT telemetry_acked FROM devices WHERE id = ?1",
                [device],
                |r| r.get::<_, i64>(0),
            )
            .optional()?
            .unwrap_or(0) as u64;
        if batch.covers_to > acked {
            tx.execute(
                "INSERT OR IGNORE INTO telemetry_ranges (device, after_seq, covers_to) VALUES (?1, ?2, ?3)",
                params![device, batch.after_seq as i64, batch.covers_to as i64],
            )?;
        }
        // Every record the device held in a covered range was in its batch; what is
        // missing was evicted on the device. Chain ranges starting at or below the
        // watermark.
        loop {
            let next: Option<i64> = tx.query_row(
                "SELECT MAX(covers_to) FROM telemetry_ranges WHERE device = ?1 AND after_seq <= ?2 AND covers_to > ?2",
                params![device, acked as i64],
                |r| r.get(0),
            )?;
            match next {
                Some(n) => acked = n as u64,
                None => break,
            }
        }
        tx.execute(
            "DELETE FROM telemetry_ranges WHERE device = ?1 AND covers_to <= ?2",
            params![device, acked as i64],
        )?;
        let drops = if batch.evicted.is_some() {
            let mut st = tx.prepare(
                "SELECT class, evicted_records + rejected_records, evicted_bytes + rejected_bytes
                 FROM telemetry_drop_totals WHERE device = ?1 ORDER BY class",
            )?;
            let totals: BTreeMap<String, [u64; 2]> = st
                .query_map([device], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        [r.get::<_, i64>(1)? as u64, r.get::<_, i64>(2)? as u64],
                    ))
                })?
                .filter(|r| r.as_ref().map_or(true, |(_, [n, _])| *n > 0))
                .collect::<rusqlite::Result<_>>()?;
            serde_json::to_string(&totals)
        } else {
            serde_json::to_string(&batch.drops)
        }
        .expect("drops serialize");
        tx.execute(
            "UPDATE devices SET telemetry_acked = ?2, telemetry_drops = ?3, last_seen = ?4 WHERE id = ?1",
            params![device, acked as i64, drops, now],
        )?;
        tx.commit()?;
        Ok(acked)
    }

    /// Stored telemetry of a device with `seq > after`, oldest first.
    pub fn telemetry(&self, device: &str, after: u64, limit: u32) -> Result<Vec<TelemetryRow>> {
        let conn = self.conn();
        let mut st = conn.prepare(
            "SELECT seq, class, age_ms, payload, received FROM telemetry
             WHERE device = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
        )?;
        let raw: Vec<(i64, String, i64, String, i64)> = st
            .query_map(params![device, after as i64, limit], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
            })?
            .collect::<rusqlite::Result<_>>()?;
        raw.into_iter()
            .map(|(seq, class, age_ms, payload, received)| {
                Ok(TelemetryRow {
                    seq: seq as u64,
                    class,
                    age_ms: age_ms as u64,
                    payload: json_col("telemetry.payload", &payload)?,
                    received,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_protocol::wire::{TelemetryBatch, TelemetryRecord};

    fn batch(after: u64, to: u64, seqs: &[u64]) -> TelemetryBatch {
        TelemetryBatch {
            device_id: "d".into(),
            after_seq: after,
            covers_to: to,
            records: seqs
                .iter()
                .map(|&seq| TelemetryRecord {
                    seq,
                    class: "window".into(),
                    age_ms: 1,
                    payload: serde_json::json!({"n": seq}),
                })
                .collect(),
            drops: BTreeMap::new(),
            evicted: Some(BTreeMap::new()),
            rejected: None,
        }
    }

    fn drops(db: &Db) -> serde_json::Value {
        db.device("d").unwrap().unwrap().telemetry_drops.unwrap()
    }

    #[test]
    fn eviction_of_a_stored_record_is_not_counted_as_dropped() {
        let (_d, db) = db();
        // Records 1-3 stored; the ack is lost and the device evicts 1-4 (4 was never
        // sent) and rejects one record.
        assert_eq!(
            db.ingest_telemetry("d", &batch(0, 3, &[1, 2, 3]), 1)
                .unwrap(),
            3
        );
        let mut b = batch(0, 5, &[5]);
        b.evicted = Some(BTreeMap::from([(
            "window".to_owned(),
            vec![[1, 10], [2, 10], [3, 10], [4, 7]],
        )]));
        b.rejected = Some(BTreeMap::from([("window".to_owned(), [1, 99])]));
        b.drops = BTreeMap::from([("window".to_owned(), [5, 136])]);
        assert_eq!(db.ingest_telemetry("d", &b, 2).unwrap(), 5);
        assert_eq!(drops(&db), serde_json::json!({"window": [2, 106]}));
        // Redelivered: nothing counted twice.
        assert_eq!(db.ingest_telemetry("d", &b, 3).unwrap(), 5);
        assert_eq!(drops(&db), serde_json::json!({"window": [2, 106]}));
        assert_eq!(db.telemetry("d", 0, 100).unwrap().len(), 4);
    }

    #[test]
    fn record_delivered_after_its_eviction_was_reported_is_uncounted() {
        let (_d, db) = db();
        let mut late = batch(0, 2, &[1, 2]);
        let mut b = batch(0, 3, &[3]);
        b.evicted = Some(BTreeMap::from([(
            "window".to_owned(),
            vec![[1, 10], [2, 10]],
        )]));
        assert_eq!(db.ingest_telemetry("d", &b, 1).unwrap(), 3);
        assert_eq!(drops(&db), serde_json::json!({"window": [2, 20]}));
        late.evicted = Some(BTreeMap::new());
        assert_eq!(db.ingest_telemetry("d", &late, 2).unwrap(), 3);
        assert_eq!(drops(&db), serde_json::json!({}));
        assert_eq!(db.telemetry("d", 0, 100).unwrap().len(), 3);
    }

    #[test]
    fn batches_without_evicted_lists_keep_the_devices_drop_counters() {
        let (_d, db) = db();
        let mut b = batch(0, 3, &[3]);
        b.evicted = None;
        b.drops = BTreeMap::from([("sample".to_owned(), [2, 20])]);
        db.ingest_telemetry("d", &b, 1).unwrap();
        assert_eq!(drops(&db), serde_json::json!({"sample": [2, 20]}));
    }

    fn db() -> (tempfile::TempDir, Db) {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("s.db")).unwrap();
        assert!(db.insert_device("d", &BTreeMap::new(), "h", 0).unwrap());
        (dir, db)
    }

    #[test]
    fn duplicate_batches_are_stored_once() {
        let (_d, db) = db();
        assert_eq!(
            db.ingest_telemetry("d", &batch(0, 3, &[1, 2, 3]), 1)
                .unwrap(),
            3
        );
        assert_eq!(
            db.ingest_telemetry("d", &batch(0, 3, &[1, 2, 3]), 2)
                .unwrap(),
            3
        );
        assert_eq!(db.telemetry("d", 0, 100).unwrap().len(), 3);
    }

    #[test]
    fn evicted_records_inside_a_covered_range_do_not_stall_the_watermark() {
        let (_d, db) = db();
        assert_eq!(
            db.ingest_telemetry("d", &batch(0, 5, &[1, 4, 5]), 1)
                .unwrap(),
            5
        );
        let seqs: Vec<u64> = db
            .telemetry("d", 0, 100)
            .unwrap()
            .iter()
            .map(|r| r.seq)
            .collect();
        assert_eq!(seqs, [1, 4, 5]);
    }

    #[test]
    fn out_of_order_batches_join_once_the_gap_is_covered() {
        let (_d, db) = db();
        // (5, 8] arrives before (0, 5]: nothing contiguous yet.
        assert_eq!(
            db.ingest_telemetry("d", &batch(5, 8, &[6, 8]), 1).unwrap(),
            0
        );
        assert_eq!(
            db.ingest_telemetry("d", &batch(0, 5, &[1, 2]), 2).unwrap(),
            8
        );
        // A stale batch below the watermark changes nothing.
        assert_eq!(
            db.ingest_telemetry("d", &batch(0, 2, &[1, 2]), 3).unwrap(),
            8
        );
    }

    #[test]
    fn status_reports_only_move_forward() {
        let (_d, db) = db();
        assert!(db.store_status("d", 2, "{\"seq\":2}", 1).unwrap());
        assert!(!db.store_status("d", 1, "{\"seq\":1}", 2).unwrap());
        assert!(!db.store_status("nope", 5, "{}", 2).unwrap());
        let d = db.device("d").unwrap().unwrap();
        assert_eq!(d.status.unwrap()["seq"], 2);
    }

    #[test]
    fn assignment_counters_increase_per_device() {
        let (_d, db) = db();
        let a = db.assign(&["d".into()], "m", "m/1/x.onnx").unwrap();
        let b = db.assign(&["d".into()], "n", "n/1/y.onnx").unwrap();
        assert_eq!(a[0].1 + 1, b[0].1);
        assert_eq!(b[0].2.len(), 2);
    }
}
