//! The telemetry outbox: records wait in SQLite until the server acknowledges them.
//!
//! Every record gets a per-device sequence number that is never reused, a priority
//! [`Class`], an opaque payload (JSON or binary) and a creation time on the outbox's own
//! monotonic timeline. [`Outbox::push`] returns the sequence number only once the record is
//! committed (WAL, `synchronous=FULL`). [`Outbox::push_many`] commits many in one
//! transaction; it is the hot path for a writer thread. Inference threads must not call
//! either directly: the outbox does blocking disk I/O.
//!
//! # Caps and eviction
//!
//! Each class has a [`Quota`] (bytes and/or records) and all classes share
//! [`OutboxConfig::max_total_bytes`]. Bytes are payload bytes. When a new record of class
//! `C` does not fit:
//! 1. over `C`'s own quota: the oldest records of `C` are evicted;
//! 2. over the total cap: records are evicted from the lowest class upwards, oldest first,
//!    but only from classes no higher than `C`. A higher class is never evicted to make
//!    room for a lower one.
//!
//! If even that cannot make room, nothing is evicted and the new record is dropped
//! (*rejected*: it never gets a sequence number). Every evicted or rejected record is
//! counted in its class's drop counters ([`Tally`]: records and bytes), which are
//! persisted and cumulative; rejections are also counted on their own
//! ([`Outbox::rejected_counters`]).
//!
//! An evicted record may already be stored on the server: it was in a batch whose ack
//! had not arrived yet. Counting it as dropped would count it twice, so every eviction
//! is also remembered by sequence (table `evicted`, until acknowledged) and travels in
//! [`Batch::evicted`]; the server counts as dropped only the evicted sequences it never
//! stored, plus the cumulative rejections (docs/server.md, "Telemetry accounting").
//! The outbox does not protect records in flight instead: the ack may never come, and a
//! full outbox must still make room for events.
//!
//! # Upload order and acknowledgements
//!
//! Batches are in sequence order, not priority order. The server acknowledges the highest
//! *contiguous* sequence it has stored and [`Outbox::ack`] deletes every record up to it,
//! so one integer is the whole ack state on both sides and a lost or repeated ack is
//! harmless. Priority-ordered batches would leave holes below the ack point that a single
//! integer cannot describe. The cost: an event queued behind many samples waits for them
//! to upload; priority shows instead in what survives when the outbox is full.
//!
//! Eviction leaves gaps in the sequence, so each batch says which range it covers:
//! every record still held with a sequence in `(after_seq, covers_to]` is in the batch, and
//! a sequence in that range that is absent has been evicted (and is listed in
//! [`Batch::evicted`]). The server can therefore advance its contiguous watermark to
//! `covers_to` once it has stored the batch. A batch lists at most
//! [`MAX_EVICTED_PER_BATCH`] evictions; with more pending, its range ends before the
//! first one that does not fit.
//!
//! # Ages
//!
//! Ages are measured on an outbox timeline (milliseconds) that never goes backwards:
//! `timeline = base + (clock.monotonic_ms() - monotonic_at_open)`. Every write persists
//! the timeline value and, if the [`Clock`] has a believable wall clock, the wall time
//! next to it. On open, `base` is the persisted timeline plus the wall-clock time that
//! has passed since (when both wall readings exist and the later one is larger), else
//! just the persisted timeline. So ages continue across restarts; if the device has no
//! usable wall clock, time spent switched off is not counted and ages are lower bounds.
//! A record's age is `timeline_now - created_ms` when the batch is read.
//!
//! # On-disk format (`outbox.db`, schema version 2 in `PRAGMA user_version`)
//!
//! ```sql
//! CREATE TABLE records (
//!   seq INTEGER PRIMARY KEY,       -- per-device sequence, from 1, never reused
//!   class INTEGER NOT NULL,        -- rank: 3 event, 2 label, 1 window, 0 sample
//!   created_ms INTEGER NOT NULL,   -- outbox timeline, see "Ages"
//!   size INTEGER NOT NULL,         -- length(payload)
//!   payload BLOB NOT NULL
//! );
//! CREATE INDEX records_by_class ON records (class, seq);
//! CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
//!   -- next_seq (sequence high-water mark + 1), acked_seq, clock_ms, clock_wall_ms
//! CREATE TABLE drops (class INTEGER PRIMARY KEY, records INTEGER NOT NULL, bytes INTEGER NOT NULL,
//!   rejected_records INTEGER NOT NULL DEFAULT 0, rejected_bytes INTEGER NOT NULL DEFAULT 0);
//!   -- records/bytes: evicted plus rejected; rejected_*: rejected only (version 2)
//! CREATE TABLE evicted (seq INTEGER PRIMARY KEY, class INTEGER NOT NULL, size INTEGER NOT NULL);
//!   -- evictions not yet acknowledged (version 2)
//! ```
//!
//! Sequence numbers and usage counters are cached in memory, so a file must have one
//! `Outbox` at a time: open it as `DATA/outbox.db` ([`crate::store::Store::outbox_path`])
//! in the process that holds the data directory's lock.
//!
//! A full disk (`SQLITE_FULL`) is reported as [`OutboxError::DiskFull`]; the transaction is
//! rolled back and nothing stored before is lost.
//!
//! ```
//! use outpost_agent::outbox::{Class, Outbox, OutboxConfig};
//! let dir = tempfile::tempdir().unwrap();
//! let outbox = Outbox::open(&dir.path().join("outbox.db"), OutboxConfig::default()).unwrap();
//! let seq = outbox.push(Class::Event, br#"{"update":"installed"}"#).unwrap().seq().unwrap();
//! let batch = outbox.read_batch(100, 1 << 20).unwrap();
//! assert_eq!(batch.records[0].seq, seq);
//! outbox.ack(batch.covers_to).unwrap();
//! assert!(outbox.read_batch(100, 1 << 20).unwrap().records.is_empty());
//! ```

use std::cmp::Ordering;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OptionalExtension, Transaction, TransactionBehavior, params};
use serde::{Deserialize, Serialize};

use crate::db;

/// Schema version of `outbox.db` written by this build.
pub const SCHEMA_VERSION: u32 = 2;

/// Largest number of [`Batch::evicted`] entries in one batch (the wire's cap).
pub const MAX_EVICTED_PER_BATCH: usize = outpost_protocol::wire::MAX_EVICTED;

const MIGRATIONS: &[&str] = &[
    r"
CREATE TABLE records (
  seq INTEGER PRIMARY KEY,
  class INTEGER NOT NULL,
  created_ms INTEGER NOT NULL,
  size INTEGER NOT NULL,
  payload BLOB NOT NULL
);
CREATE INDEX records_by_class ON records (class, seq);
CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE drops (class INTEGER PRIMARY KEY, records INTEGER NOT NULL, bytes INTEGER NOT NULL);
",
    r"
CREATE TABLE evicted (
  seq INTEGER PRIMARY KEY,
  class INTEGER NOT NULL,
  size INTEGER NOT NULL
);
ALTER TABLE drops ADD COLUMN rejected_records INTEGER NOT NULL DEFAULT 0;
ALTER TABLE drops ADD COLUMN rejected_bytes INTEGER NOT NULL DEFAULT 0;
",
];

/// Wall-clock readings before this (2020-01-01) are treated as "no clock".
const BELIEVABLE_WALL_MS: u64 = 1_577_836_800_000;

/// Result alias for the outbox.
pub type Result<T, E = OutboxError> = std::result::Result<T, E>;

/// Errors from the outbox.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OutboxError {
    /// The database or its file system is full; the operation was rolled back and nothing
    /// stored before was lost.
    #[error("outbox {} is full (disk or database size limit)", .path.display())]
    DiskFull {
        /// The database file.
        path: PathBuf,
    },
    /// Any other SQLite failure.
    #[error("outbox database: {0}")]
    Db(#[from] rusqlite::Error),
    /// `outbox.db` was written by a newer agent.
    #[error("{} has schema version {found}, newer than the supported {supported}", .path.display())]
    SchemaTooNew {
        /// The database file.
        path: PathBuf,
        /// Version in the file.
        found: u32,
        /// Version this build writes.
        supported: u32,
    },
    /// An acknowledgement for sequence numbers this outbox never assigned (e.g. the server
    /// remembers a previous installation). Nothing was deleted.
    #[error("acknowledgement up to {acked} is beyond the last assigned sequence {high_water}")]
    AckAhead {
        /// What was acknowledged.
        acked: u64,
        /// The last sequence number assigned.
        high_water: u64,
    },
    /// A stored row breaks the format (unknown class, negative number).
    #[error("outbox database is corrupt: {detail}")]
    Corrupt {
        /// What is wrong.
        detail: String,
    },
}

/// Priority class of a record, highest first: events, labels, window summaries, samples.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Class {
    /// Update and security events.
    Event,
    /// Label feedback.
    Label,
    /// Window summaries.
    Window,
    /// Samples for retraining.
    Sample,
}

impl Class {
    /// All classes, highest priority first.
    pub const ALL: [Class; 4] = [Class::Event, Class::Label, Class::Window, Class::Sample];

    /// Priority rank, also the value stored on disk: 3 event, 2 label, 1 window, 0 sample.
    pub const fn rank(self) -> u8 {
        match self {
            Class::Event => 3,
            Class::Label => 2,
            Class::Window => 1,
            Class::Sample => 0,
        }
    }

    /// Inverse of [`Class::rank`].
    pub const fn from_rank(rank: u8) -> Option<Class> {
        match rank {
            3 => Some(Class::Event),
            2 => Some(Class::Label),
            1 => Some(Class::Window),
            0 => Some(Class::Sample),
            _ => None,
        }
    }

    /// Lowercase name (`event`, `label`, `window`, `sample`).
    pub const fn as_str(self) -> &'static str {
        match self {
            Class::Event => "event",
            Class::Label => "label",
            Class::Window => "window",
            Class::Sample => "sample",
        }
    }
}

impl PartialOrd for Class {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Class {
    /// Higher priority compares greater: `Event > Label > Window > Sample`.
    fn cmp(&self, other: &Self) -> Ordering {
        self.rank().cmp(&other.rank())
    }
}

/// One value per class.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PerClass<T> {
    /// For [`Class::Event`].
    pub event: T,
    /// For [`Class::Label`].
    pub label: T,
    /// For [`Class::Window`].
    pub window: T,
    /// For [`Class::Sample`].
    pub sample: T,
}

impl<T> PerClass<T> {
    /// The value for `class`.
    pub fn get(&self, class: Class) -> &T {
        match class {
            Class::Event => &self.event,
            Class::Label => &self.label,
            Class::Window => &self.window,
            Class::Sample => &self.sample,
        }
    }

    /// The value for `class`, mutably.
    pub fn get_mut(&mut self, class: Class) -> &mut T {
        match class {
            Class::Event => &mut self.event,
            Class::Label => &mut self.label,
            Class::Window => &mut self.window,
            Class::Sample => &mut self.sample,
        }
    }
}

/// A count of records and their payload bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tally {
    /// Records.
    pub records: u64,
    /// Payload bytes.
    pub bytes: u64,
}

impl Tally {
    fn add(&mut self, bytes: u64) {
        self.records += 1;
        self.bytes += bytes;
    }

    fn sub(&mut self, bytes: u64) {
        self.records = self.records.saturating_sub(1);
        self.bytes = self.bytes.saturating_sub(bytes);
    }
}

/// Limits of one class; `None` means unlimited (the total cap still applies).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quota {
    /// Maximum payload bytes held for the class.
    pub max_bytes: Option<u64>,
    /// Maximum records held for the class.
    pub max_records: Option<u64>,
}

/// Outbox limits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboxConfig {
    /// Cap on the payload bytes of all records together.
    pub max_total_bytes: u64,
    /// Per-class quotas.
    pub quotas: PerClass<Quota>,
}

impl Default for OutboxConfig {
    /// 64 MiB in total; events and labels up to 16 MiB each, windows and samples up to
    /// 32 MiB each.
    fn default() -> Self {
        const MIB: u64 = 1024 * 1024;
        let bytes = |n| Quota {
            max_bytes: Some(n * MIB),
            max_records: None,
        };
        Self {
            max_total_bytes: 64 * MIB,
            quotas: PerClass {
                event: bytes(16),
                label: bytes(16),
                window: bytes(32),
                sample: bytes(32),
            },
        }
    }
}

/// Time source for record ages.
pub trait Clock: Send + Sync + 'static {
    /// Milliseconds since an arbitrary origin; never decreases within a process.
    fn monotonic_ms(&self) -> u64;
    /// Unix time in milliseconds, if the device has a believable wall clock.
    fn wall_ms(&self) -> Option<u64>;
}

/// [`Clock`] over `Instant` and `SystemTime`. Wall readings before 2020 count as absent.
#[derive(Debug, Clone, Copy)]
pub struct SystemClock {
    origin: Instant,
}

impl SystemClock {
    /// A clock whose monotonic origin is now.
    pub fn new() -> Self {
        Self {
            origin: Instant::now(),
        }
    }
}

impl Default for SystemClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for SystemClock {
    fn monotonic_ms(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn wall_ms(&self) -> Option<u64> {
        let ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .ok()?
            .as_millis();
        let ms = u64::try_from(ms).ok()?;
        (ms >= BELIEVABLE_WALL_MS).then_some(ms)
    }
}

/// A [`Clock`] moved by hand, for tests. Clones share the same time.
#[derive(Debug, Clone, Default)]
pub struct ManualClock {
    monotonic: Arc<AtomicU64>,
    /// `u64::MAX` means no wall clock.
    wall: Arc<AtomicU64>,
}

impl ManualClock {
    /// Monotonic time 0 and the given wall time.
    pub fn new(wall_ms: Option<u64>) -> Self {
        let clock = Self::default();
        clock.set_wall_ms(wall_ms);
        clock
    }

    /// Moves both the monotonic and (if set) the wall clock forward.
    pub fn advance_ms(&self, ms: u64) {
        self.monotonic.fetch_add(ms, AtomicOrdering::SeqCst);
        let _ = self
            .wall
            .fetch_update(AtomicOrdering::SeqCst, AtomicOrdering::SeqCst, |w| {
                (w != u64::MAX).then(|| w.saturating_add(ms).min(u64::MAX - 1))
            });
    }

    /// Sets (or removes) the wall clock.
    pub fn set_wall_ms(&self, wall_ms: Option<u64>) {
        self.wall
            .store(wall_ms.unwrap_or(u64::MAX), AtomicOrdering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn monotonic_ms(&self) -> u64 {
        self.monotonic.load(AtomicOrdering::SeqCst)
    }

    fn wall_ms(&self) -> Option<u64> {
        let wall = self.wall.load(AtomicOrdering::SeqCst);
        (wall != u64::MAX).then_some(wall)
    }
}

/// What happened to a pushed record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushOutcome {
    /// Committed under this sequence number.
    Stored(u64),
    /// Did not fit even after allowed evictions; counted in the drop counters.
    Dropped,
}

impl PushOutcome {
    /// The sequence number if stored.
    pub fn seq(self) -> Option<u64> {
        match self {
            PushOutcome::Stored(seq) => Some(seq),
            PushOutcome::Dropped => None,
        }
    }
}

/// A record read for upload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Sequence number.
    pub seq: u64,
    /// Priority class.
    pub class: Class,
    /// Age in milliseconds when the batch was read (see "Ages" in the module docs).
    pub age_ms: u64,
    /// Payload as pushed.
    pub payload: Vec<u8>,
}

/// Records to upload, oldest first, with the drop counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// Everything up to here has been acknowledged and deleted.
    pub after_seq: u64,
    /// Every record still held with `after_seq < seq <= covers_to` is in `records`;
    /// sequence numbers in that range that are absent were evicted. Equals `after_seq`
    /// when nothing is pending.
    pub covers_to: u64,
    /// The records, by increasing sequence.
    pub records: Vec<Record>,
    /// Cumulative drop counters per class (evicted plus rejected).
    pub drops: PerClass<Tally>,
    /// Records evicted with a sequence in `(after_seq, covers_to]`, by increasing
    /// sequence; at most [`MAX_EVICTED_PER_BATCH`].
    pub evicted: Vec<Evicted>,
    /// Cumulative counters of rejected records (never given a sequence) per class.
    pub rejected: PerClass<Tally>,
}

/// A record evicted before it was acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Evicted {
    /// Its sequence number.
    pub seq: u64,
    /// Its class.
    pub class: Class,
    /// Its payload bytes.
    pub bytes: u64,
}

impl Batch {
    /// The wire form of this batch for `device_id`. JSON payloads are sent as JSON,
    /// anything else as a (lossy UTF-8) string.
    pub fn to_wire(self, device_id: &str) -> outpost_protocol::wire::TelemetryBatch {
        use std::collections::BTreeMap;
        let per_class = |t: PerClass<Tally>| -> BTreeMap<String, [u64; 2]> {
            Class::ALL
                .iter()
                .map(|c| (c.as_str().to_owned(), *t.get(*c)))
                .filter(|(_, t)| t.records > 0)
                .map(|(c, t)| (c, [t.records, t.bytes]))
                .collect()
        };
        let mut evicted: BTreeMap<String, Vec<[u64; 2]>> = BTreeMap::new();
        for e in &self.evicted {
            evicted
                .entry(e.class.as_str().to_owned())
                .or_default()
                .push([e.seq, e.bytes]);
        }
        outpost_protocol::wire::TelemetryBatch {
            device_id: device_id.to_owned(),
            after_seq: self.after_seq,
            covers_to: self.covers_to,
            records: self
                .records
                .into_iter()
                .map(|r| outpost_protocol::wire::TelemetryRecord {
                    seq: r.seq,
                    class: r.class.as_str().into(),
                    age_ms: r.age_ms,
                    payload: serde_json::from_slice(&r.payload).unwrap_or_else(|_| {
                        serde_json::Value::String(String::from_utf8_lossy(&r.payload).into())
                    }),
                })
                .collect(),
            drops: per_class(self.drops),
            evicted: Some(evicted),
            rejected: Some(per_class(self.rejected)),
        }
    }
}

#[derive(Debug, Clone, Default)]
struct Counters {
    next_seq: u64,
    acked: u64,
    usage: PerClass<Tally>,
    drops: PerClass<Tally>,
    rejected: PerClass<Tally>,
}

impl Counters {
    fn total_bytes(&self) -> u64 {
        Class::ALL.iter().map(|c| self.usage.get(*c).bytes).sum()
    }
}

struct State {
    conn: Connection,
    counters: Counters,
}

/// The outbox. `Send + Sync`; operations are serialized internally, and meant for one
/// writer thread plus the uploader.
pub struct Outbox {
    path: PathBuf,
    config: OutboxConfig,
    clock: Box<dyn Clock>,
    timeline_base_ms: u64,
    monotonic_at_open: u64,
    state: Mutex<State>,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox")
            .field("path", &self.path)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Outbox {
    /// Opens (creating if needed) the outbox at `path` with the system clock.
    pub fn open(path: &Path, config: OutboxConfig) -> Result<Self> {
        Self::open_with_clock(path, config, SystemClock::new())
    }

    /// Opens the outbox with an injected clock.
    pub fn open_with_clock(path: &Path, config: OutboxConfig, clock: impl Clock) -> Result<Self> {
        let mut conn = db::open(path).map_err(|e| map_sql(path, e))?;
        db::migrate(&mut conn, MIGRATIONS).map_err(|e| match e {
            db::MigrateError::Sqlite(e) => map_sql(path, e),
            db::MigrateError::TooNew { found, supported } => OutboxError::SchemaTooNew {
                path: path.to_path_buf(),
                found,
                supported,
            },
        })?;

        let counter = |name: &str| -> Result<Option<u64>> {
            let value: Option<i64> = conn
                .query_row("SELECT value FROM counters WHERE name = ?1", [name], |r| {
                    r.get(0)
                })
                .optional()?;
            value
                .map(|v| db::to_u64(v).ok_or_else(|| corrupt(format!("counter {name} = {v}"))))
                .transpose()
        };
        let mut counters = Counters {
            next_seq: counter("next_seq")?.unwrap_or(1).max(1),
            acked: counter("acked_seq")?.unwrap_or(0),
            ..Counters::default()
        };
        let clock_ms = counter("clock_ms")?.unwrap_or(0);
        let clock_wall_ms = counter("clock_wall_ms")?;

        let (max_seq, max_created): (Option<i64>, Option<i64>) =
            conn.query_row("SELECT MAX(seq), MAX(created_ms) FROM records", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })?;
        if let Some(max_seq) = max_seq.and_then(db::to_u64) {
            // Defensive: the counter is written in the same transaction as every insert.
            counters.next_seq = counters.next_seq.max(max_seq + 1);
        }
        {
            let mut stmt =
                conn.prepare("SELECT class, COUNT(*), SUM(size) FROM records GROUP BY class")?;
            let mut rows = stmt.query([])?;
            while let Some(row) = rows.next()? {
                let class = class_of(row.get(0)?)?;
                *counters.usage.get_mut(class) = Tally {
                    records: nonneg(row.get(1)?)?,
                    bytes: nonneg(row.get(2)?)?,
                };
            }
            let mut stmt = conn.prepare(
                "SELECT class, records, bytes, rejected_records, rejected_bytes FROM drops",
            )?;
            let mut rows = stmt.query([])?;
            while let Some(row) = rows.next()? {
                let class = class_of(row.get(0)?)?;
                *counters.drops.get_mut(class) = Tally {
                    records: nonneg(row.get(1)?)?,
                    bytes: nonneg(row.get(2)?)?,
                };
                *counters.rejected.get_mut(class) = Tally {
                    records: nonneg(row.get(3)?)?,
                    bytes: nonneg(row.get(4)?)?,
                };
            }
        }

        let downtime = match (clock_wall_ms, clock.wall_ms()) {
            (Some(then), Some(now)) if now > then => now - then,
            _ => 0,
        };
        let timeline_base_ms = clock_ms
            .saturating_add(downtime)
            .max(max_created.and_then(db::to_u64).unwrap_or(0));
        let monotonic_at_open = clock.monotonic_ms();
        Ok(Self {
            path: path.to_path_buf(),
            config,
            clock: Box::new(clock),
            timeline_base_ms,
            monotonic_at_open,
            state: Mutex::new(State { conn, counters }),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The limits in force.
    pub fn config(&self) -> &OutboxConfig {
        &self.config
    }

    /// Now on the outbox timeline (milliseconds; see "Ages" in the module docs).
    pub fn now_ms(&self) -> u64 {
        self.timeline_base_ms.saturating_add(
            self.clock
                .monotonic_ms()
                .saturating_sub(self.monotonic_at_open),
        )
    }

    /// Stores one record; returns its sequence number once committed, or
    /// [`PushOutcome::Dropped`] if it cannot fit (see "Caps and eviction").
    pub fn push(&self, class: Class, payload: &[u8]) -> Result<PushOutcome> {
        let mut outcomes = self.push_many([(class, payload)])?;
        Ok(outcomes.pop().unwrap_or(PushOutcome::Dropped))
    }

    /// Stores many records in one transaction, in order; returns one outcome per record
    /// once all are committed. On error none of them is stored.
    pub fn push_many<'a>(
        &self,
        records: impl IntoIterator<Item = (Class, &'a [u8])>,
    ) -> Result<Vec<PushOutcome>> {
        let now = self.now_ms();
        let wall = self.clock.wall_ms();
        let mut state = self.state();
        let State { conn, counters } = &mut *state;
        let mut next = counters.clone();
        let outcomes = (|| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let mut outcomes = Vec::new();
            for (class, payload) in records {
                outcomes.push(self.push_in_tx(&tx, &mut next, class, payload, now)?);
            }
            write_counter(&tx, "next_seq", next.next_seq)?;
            write_clock(&tx, now, wall)?;
            if next.drops != counters.drops {
                write_drops(&tx, &next.drops, &next.rejected)?;
            }
            tx.commit()?;
            Ok(outcomes)
        })()
        .map_err(|e| map_sql(&self.path, e))?;
        *counters = next;
        Ok(outcomes)
    }

    fn push_in_tx(
        &self,
        tx: &Transaction<'_>,
        counters: &mut Counters,
        class: Class,
        payload: &[u8],
        now: u64,
    ) -> rusqlite::Result<PushOutcome> {
        let size = payload.len() as u64;
        let quota = *self.config.quotas.get(class);
        let over_quota = |t: Tally| {
            quota.max_bytes.is_some_and(|m| t.bytes + size > m)
                || quota.max_records.is_some_and(|m| t.records + 1 > m)
        };
        let fits_alone = size <= self.config.max_total_bytes && !over_quota(Tally::default());
        let mut victims: Vec<(u64, Class, u64)> = Vec::new();
        let mut admitted = fits_alone;
        if fits_alone {
            let mut cursor = PerClass::<u64>::default();
            let mut own = *counters.usage.get(class);
            while over_quota(own) {
                let Some((seq, vsize)) = oldest_after(tx, class, *cursor.get(class))? else {
                    break;
                };
                victims.push((seq, class, vsize));
                own.sub(vsize);
                *cursor.get_mut(class) = seq;
            }
            let mut total =
                counters.total_bytes() - victims.iter().map(|(_, _, s)| *s).sum::<u64>();
            // Lowest class first, never above the new record's class.
            for victim_class in Class::ALL.iter().rev().filter(|c| **c <= class) {
                while total + size > self.config.max_total_bytes {
                    let Some((seq, vsize)) =
                        oldest_after(tx, *victim_class, *cursor.get(*victim_class))?
                    else {
                        break;
                    };
                    victims.push((seq, *victim_class, vsize));
                    total -= vsize;
                    *cursor.get_mut(*victim_class) = seq;
                }
            }
            admitted = !over_quota(own) && total + size <= self.config.max_total_bytes;
        }
        if !admitted {
            counters.drops.get_mut(class).add(size);
            counters.rejected.get_mut(class).add(size);
            return Ok(PushOutcome::Dropped);
        }
        {
            let mut delete = tx.prepare_cached("DELETE FROM records WHERE seq = ?1")?;
            let mut remember =
                tx.prepare_cached("INSERT INTO evicted (seq, class, size) VALUES (?1, ?2, ?3)")?;
            for (seq, victim_class, vsize) in victims {
                delete.execute([db::to_i64(seq)])?;
                remember.execute(params![
                    db::to_i64(seq),
                    victim_class.rank(),
                    db::to_i64(vsize)
                ])?;
                counters.usage.get_mut(victim_class).sub(vsize);
                counters.drops.get_mut(victim_class).add(vsize);
            }
        }
        let seq = counters.next_seq;
        tx.prepare_cached(
            "INSERT INTO records (seq, class, created_ms, size, payload) VALUES (?1, ?2, ?3, ?4, ?5)",
        )?
        .execute(params![
            db::to_i64(seq),
            class.rank(),
            db::to_i64(now),
            db::to_i64(size),
            payload
        ])?;
        counters.next_seq += 1;
        counters.usage.get_mut(class).add(size);
        Ok(PushOutcome::Stored(seq))
    }

    /// Reads up to `max_records` records by increasing sequence, stopping before the
    /// payload total would exceed `max_bytes` (the first record is always included, so an
    /// oversized record cannot stall the upload). Nothing is removed; see [`Outbox::ack`].
    pub fn read_batch(&self, max_records: usize, max_bytes: u64) -> Result<Batch> {
        let now = self.now_ms();
        let state = self.state();
        let counters = &state.counters;
        let mut records = Vec::new();
        let mut truncated = false;
        {
            let mut stmt = state.conn.prepare_cached(
                "SELECT seq, class, created_ms, size FROM records WHERE seq > ?1 ORDER BY seq",
            )?;
            let mut payload_stmt = state
                .conn
                .prepare_cached("SELECT payload FROM records WHERE seq = ?1")?;
            let mut rows = stmt.query([db::to_i64(counters.acked)])?;
            let mut bytes = 0u64;
            while let Some(row) = rows.next()? {
                let seq = nonneg(row.get(0)?)?;
                let class = class_of(row.get(1)?)?;
                let created_ms = nonneg(row.get(2)?)?;
                let size = nonneg(row.get(3)?)?;
                if records.len() >= max_records
                    || (!records.is_empty() && bytes.saturating_add(size) > max_bytes)
                {
                    truncated = true;
                    break;
                }
                let payload: Vec<u8> = payload_stmt.query_row([db::to_i64(seq)], |r| r.get(0))?;
                bytes += size;
                records.push(Record {
                    seq,
                    class,
                    age_ms: now.saturating_sub(created_ms),
                    payload,
                });
            }
        }
        let high_water = counters.next_seq - 1;
        let mut covers_to = if truncated {
            records.last().map_or(counters.acked, |last| last.seq)
        } else {
            high_water
        }
        .max(counters.acked);
        let mut evicted = Vec::new();
        {
            let mut stmt = state.conn.prepare_cached(
                "SELECT seq, class, size FROM evicted WHERE seq > ?1 AND seq <= ?2
                 ORDER BY seq LIMIT ?3",
            )?;
            let mut rows = stmt.query(params![
                db::to_i64(counters.acked),
                db::to_i64(covers_to),
                db::to_i64(MAX_EVICTED_PER_BATCH as u64 + 1)
            ])?;
            while let Some(row) = rows.next()? {
                evicted.push(Evicted {
                    seq: nonneg(row.get(0)?)?,
                    class: class_of(row.get(1)?)?,
                    bytes: nonneg(row.get(2)?)?,
                });
            }
        }
        if evicted.len() > MAX_EVICTED_PER_BATCH {
            // Evicted sequences are above `acked`, so the range stays non-empty.
            covers_to = evicted[MAX_EVICTED_PER_BATCH].seq - 1;
            evicted.truncate(MAX_EVICTED_PER_BATCH);
            records.retain(|r| r.seq <= covers_to);
        }
        Ok(Batch {
            after_seq: counters.acked,
            covers_to,
            records,
            drops: counters.drops,
            evicted,
            rejected: counters.rejected,
        })
    }

    /// Deletes every record with a sequence number `<= up_to` (the server's highest
    /// contiguous stored sequence). Acks at or below an earlier ack are no-ops. Returns
    /// how many records were deleted.
    pub fn ack(&self, up_to: u64) -> Result<u64> {
        let now = self.now_ms();
        let wall = self.clock.wall_ms();
        let mut state = self.state();
        let State { conn, counters } = &mut *state;
        let high_water = counters.next_seq - 1;
        if up_to > high_water {
            return Err(OutboxError::AckAhead {
                acked: up_to,
                high_water,
            });
        }
        if up_to <= counters.acked {
            return Ok(0);
        }
        let mut next = counters.clone();
        let deleted = (|| -> Result<u64> {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let mut deleted = 0;
            {
                let mut stmt = tx.prepare(
                    "SELECT class, COUNT(*), SUM(size) FROM records WHERE seq <= ?1 GROUP BY class",
                )?;
                let mut rows = stmt.query([db::to_i64(up_to)])?;
                while let Some(row) = rows.next()? {
                    let class = class_of(row.get(0)?)?;
                    let records = nonneg(row.get(1)?)?;
                    let bytes = nonneg(row.get(2)?)?;
                    let usage = next.usage.get_mut(class);
                    usage.records = usage.records.saturating_sub(records);
                    usage.bytes = usage.bytes.saturating_sub(bytes);
                    deleted += records;
                }
            }
            tx.execute("DELETE FROM records WHERE seq <= ?1", [db::to_i64(up_to)])?;
            tx.execute("DELETE FROM evicted WHERE seq <= ?1", [db::to_i64(up_to)])?;
            next.acked = up_to;
            write_counter(&tx, "acked_seq", up_to)?;
            write_clock(&tx, now, wall)?;
            tx.commit()?;
            Ok(deleted)
        })()
        .map_err(|e| match e {
            OutboxError::Db(e) => map_sql(&self.path, e),
            other => other,
        })?;
        *counters = next;
        Ok(deleted)
    }

    /// Cumulative drop counters (evicted plus rejected records) per class.
    pub fn drop_counters(&self) -> PerClass<Tally> {
        self.state().counters.drops
    }

    /// Cumulative counters of rejected records (no room even after evictions; never
    /// given a sequence number) per class. Counted since schema version 2.
    pub fn rejected_counters(&self) -> PerClass<Tally> {
        self.state().counters.rejected
    }

    /// Records and payload bytes currently held per class.
    pub fn usage(&self) -> PerClass<Tally> {
        self.state().counters.usage
    }

    /// The last sequence number assigned (0 before the first record).
    pub fn high_water(&self) -> u64 {
        self.state().counters.next_seq - 1
    }

    /// The highest acknowledged sequence number.
    pub fn acked(&self) -> u64 {
        self.state().counters.acked
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic cannot leave a transaction open (rusqlite rolls back on drop) and the
        // counters are only replaced after a commit, so the state is consistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn map_sql(path: &Path, err: rusqlite::Error) -> OutboxError {
    if db::is_full(&err) {
        OutboxError::DiskFull {
            path: path.to_path_buf(),
        }
    } else {
        OutboxError::Db(err)
    }
}

fn corrupt(detail: String) -> OutboxError {
    OutboxError::Corrupt { detail }
}

fn nonneg(value: i64) -> Result<u64> {
    db::to_u64(value).ok_or_else(|| corrupt(format!("negative value {value}")))
}

fn class_of(rank: i64) -> Result<Class> {
    u8::try_from(rank)
        .ok()
        .and_then(Class::from_rank)
        .ok_or_else(|| corrupt(format!("unknown class {rank}")))
}

fn oldest_after(
    tx: &Transaction<'_>,
    class: Class,
    after_seq: u64,
) -> rusqlite::Result<Option<(u64, u64)>> {
    tx.prepare_cached(
        "SELECT seq, size FROM records WHERE class = ?1 AND seq > ?2 ORDER BY seq LIMIT 1",
    )?
    .query_row(params![class.rank(), db::to_i64(after_seq)], |r| {
        Ok((
            db::to_u64(r.get(0)?).unwrap_or(0),
            db::to_u64(r.get(1)?).unwrap_or(0),
        ))
    })
    .optional()
}

fn write_counter(tx: &Transaction<'_>, name: &str, value: u64) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "INSERT INTO counters (name, value) VALUES (?1, ?2)
         ON CONFLICT(name) DO UPDATE SET value = excluded.value",
    )?
    .execute(params![name, db::to_i64(value)])?;
    Ok(())
}

fn write_clock(tx: &Transaction<'_>, now: u64, wall: Option<u64>) -> rusqlite::Result<()> {
    write_counter(tx, "clock_ms", now)?;
    match wall {
        Some(wall) => write_counter(tx, "clock_wall_ms", wall),
        None => {
            tx.execute("DELETE FROM counters WHERE name = 'clock_wall_ms'", [])?;
            Ok(())
        }
    }
}

fn write_drops(
    tx: &Transaction<'_>,
    drops: &PerClass<Tally>,
    rejected: &PerClass<Tally>,
) -> rusqlite::Result<()> {
    let mut stmt = tx.prepare_cached(
        "INSERT INTO drops (class, records, bytes, rejected_records, rejected_bytes)
         VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT(class) DO UPDATE SET records = excluded.records, bytes = excluded.bytes,
           rejected_records = excluded.rejected_records, rejected_bytes = excluded.rejected_bytes",
    )?;
    for class in Class::ALL {
        let tally = drops.get(class);
        let rejected = rejected.get(class);
        stmt.execute(params![
            class.rank(),
            db::to_i64(tally.records),
            db::to_i64(tally.bytes),
            db::to_i64(rejected.records),
            db::to_i64(rejected.bytes)
        ])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quota_bytes(n: u64) -> Quota {
        Quota {
            max_bytes: Some(n),
            max_records: None,
        }
    }

    fn open(dir: &Path, config: OutboxConfig, clock: &ManualClock) -> Outbox {
        Outbox::open_with_clock(&dir.join("outbox.db"), config, clock.clone()).unwrap()
    }

    fn unlimited(total: u64) -> OutboxConfig {
        OutboxConfig {
            max_total_bytes: total,
            quotas: PerClass::default(),
        }
    }

    fn all(outbox: &Outbox) -> Vec<Record> {
        outbox.read_batch(usize::MAX, u64::MAX).unwrap().records
    }

    fn seqs(outbox: &Outbox) -> Vec<u64> {
        all(outbox).iter().map(|r| r.seq).collect()
    }

    fn stored(outcome: PushOutcome) -> u64 {
        outcome.seq().expect("record should be stored")
    }

    #[test]
    fn sequence_numbers_are_never_reused_after_ack_and_restart() {
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::new(None);
        let outbox = open(dir.path(), unlimited(1 << 20), &clock);
        let a = stored(outbox.push(Class::Event, b"a").unwrap());
        let b = stored(outbox.push(Class::Window, b"b").unwrap());
        assert_eq!((a, b), (1, 2));
        assert_eq!(outbox.ack(2).unwrap(), 2);
        drop(outbox);
        let outbox = open(dir.path(), unlimited(1 << 20), &clock);
        assert!(all(&outbox).is_empty());
        assert_eq!(outbox.high_water(), 2);
        assert_eq!(stored(outbox.push(Class::Event, b"c").unwrap()), 3);
    }

    #[test]
    fn ack_deletes_only_acknowledged_records() {
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::new(None);
        let outbox = open(dir.path(), unlimited(1 << 20), &clock);
        for i in 0..5u8 {
            outbox.push(Class::Sample, &[i]).unwrap();
        }
        assert_eq!(outbox.ack(3).unwrap(), 3);
        assert_eq!(seqs(&outbox), vec![4, 5]);
        // A repeated or stale ack is harmless.
        assert_eq!(outbox.ack(2).unwrap(), 0);
        assert_eq!(outbox.ack(3).unwrap(), 0);
        assert_eq!(seqs(&outbox), vec![4, 5]);
        assert_eq!(
            outbox.usage().sample,
            Tally {
                records: 2,
                bytes: 2
            }
        );
        let batch = outbox.read_batch(10, 1000).unwrap();
        assert_eq!(batch.after_seq, 3);
        assert_eq!(batch.covers_to, 5);
    }

    #[test]
    fn rejects_ack_beyond_assigned_sequence() {
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::new(None);
        let outbox = open(dir.path(), unlimited(1 << 20), &clock);
        outbox.push(Class::Event, b"x").unwrap();
        let err = outbox.ack(7).unwrap_err();
        assert!(
            matches!(
                err,
                OutboxError::AckAhead {
                    acked: 7,
                    high_water: 1
                }
            ),
            "{err:?}"
        );
        assert_eq!(seqs(&outbox), vec![1]);
    }

    #[test]
    fn class_quota_evicts_oldest_of_same_class_only() {
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::new(None);
        let mut config = unlimited(1 << 20);
        config.quotas.window = Quota {
            max_bytes: Some(30),
            max_records: Some(2),
        };
        let outbox = open(dir.path(), config, &clock);
        let s = stored(outbox.push(Class::Sample, &[0; 10]).unwrap());
        stored(outbox.push(Class::Window, &[1; 10]).unwrap());
        let w2 = stored(outbox.push(Class::Window, &[2; 10]).unwrap());
        let w3 = stored(outbox.push(Class::Window, &[3; 10]).unwrap()); // record quota
        assert_eq!(seqs(&outbox), vec![s, w2, w3]);
        let w4 = stored(outbox.push(Class::Window, &[4; 25]).unwrap()); // byte quota
        assert_eq!(seqs(&outbox), vec![s, w4]);
        // w4 needs 35 of 30 bytes with w2 gone, so w3 goes too.
        assert_eq!(
            outbox.drop_counters().window,
            Tally {
                records: 3,
                bytes: 30
            }
        );
        assert_eq!(outbox.drop_counters().sample, Tally::default());
        // Larger than the class quota on its own: dropped, nothing evicted.
        assert_eq!(
            outbox.push(Class::Window, &[5; 31]).unwrap(),
            PushOutcome::Dropped
        );
        assert_eq!(seqs(&outbox), vec![s, w4]);
        assert_eq!(
            outbox.drop_counters().window,
            Tally {
                records: 4,
                bytes: 61
            }
        );
    }

    #[test]
    fn total_cap_evicts_lowest_class_first_oldest_first() {
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::new(None);
        let outbox = open(dir.path(), unlimited(50), &clock);
        let w1 = stored(outbox.push(Class::Window, &[0; 10]).unwrap());
        let s1 = stored(outbox.push(Class::Sample, &[0; 10]).unwrap());
        let l1 = stored(outbox.push(Class::Label, &[0; 10]).unwrap());
        let s2 = stored(outbox.push(Class::Sample, &[0; 10]).unwrap());
        let w2 = stored(outbox.push(Class::Window, &[0; 10]).unwrap());
        assert_eq!(seqs(&outbox), vec![w1, s1, l1, s2, w2]);
        // An event needing 15 bytes evicts s1 then s2 (samples first, oldest first).
        let e1 = stored(outbox.push(Class::Event, &[0; 15]).unwrap());
        assert_eq!(seqs(&outbox), vec![w1, l1, w2, e1]);
        // Next: no samples left, so the oldest window goes.
        let e2 = stored(outbox.push(Class::Event, &[0; 10]).unwrap());
        assert_eq!(seqs(&outbox), vec![l1, w2, e1, e2]);
        let drops = outbox.drop_counters();
        assert_eq!(
            drops.sample,
            Tally {
                records: 2,
                bytes: 20
            }
        );
        assert_eq!(
            drops.window,
            Tally {
                records: 1,
                bytes: 10
            }
        );
        assert_eq!(drops.label, Tally::default());
        assert_eq!(drops.event, Tally::default());
    }

    #[test]
    fn lower_class_never_evicts_higher_class_and_is_dropped_itself() {
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::new(None);
        let outbox = open(dir.path(), unlimited(30), &clock);
        let e = stored(outbox.push(Class::Event, &[0; 10]).unwrap());
        let l = stored(outbox.push(Class::Label, &[0; 12]).unwrap());
        let s = stored(outbox.push(Class::Sample, &[0; 5]).unwrap());
        // A 10-byte window needs 7 more bytes: evicting the sample alone is not enough and
        // the label and event are off limits, so the window is dropped and the sample kept.
        assert_eq!(
            outbox.push(Class::Window, &[0; 10]).unwrap(),
            PushOutcome::Dropped
        );
        assert_eq!(seqs(&outbox), vec![e, l, s]);
        let drops = outbox.drop_counters();
        assert_eq!(
            drops.window,
            Tally {
                records: 1,
                bytes: 10
            }
        );
        assert_eq!(drops.sample, Tally::default());
        // A record larger than the whole outbox is dropped too.
        assert_eq!(
            outbox.push(Class::Event, &[0; 31]).unwrap(),
            PushOutcome::Dropped
        );
        assert_eq!(
            outbox.drop_counters().event,
            Tally {
                records: 1,
                bytes: 31
            }
        );
        // The dropped pushes consumed no sequence numbers.
        assert_eq!(stored(outbox.push(Class::Sample, &[]).unwrap()), s + 1);
    }

    #[test]
    fn full_outbox_of_one_class_rotates_oldest_first() {
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::new(None);
        let outbox = open(dir.path(), unlimited(30), &clock);
        for i in 0..5u8 {
            outbox.push(Class::Sample, &[i; 10]).unwrap();
        }
        let records = all(&outbox);
        assert_eq!(records.iter().map(|r| r.seq).collect::<Vec<_>>(), [3, 4, 5]);
        assert_eq!(records[0].payload, vec![2; 10]);
        assert_eq!(
            outbox.usage().sample,
            Tally {
                records: 3,
                bytes: 30
            }
        );
        assert_eq!(
            outbox.drop_counters().sample,
            Tally {
                records: 2,
                bytes: 20
            }
        );
        // After eviction the batch still covers the evicted sequences 1 and 2.
        let batch = outbox.read_batch(10, 1000).unwrap();
        assert_eq!((batch.after_seq, batch.covers_to), (0, 5));
        // If every pending record was evicted, an empty batch covers up to the high water.
        let dir = tempfile::tempdir().unwrap();
        let mut config = unlimited(1000);
        config.quotas.sample = Quota {
            max_bytes: None,
            max_records: Some(1),
        };
        let outbox = open(dir.path(), config, &clock);
        outbox.push(Class::Sample, b"a").unwrap();
        outbox.push(Class::Sample, b"b").unwrap();
        let batch = outbox.read_batch(10, 1000).unwrap();
        assert_eq!(batch.records.len(), 1);
        assert_eq!(batch.covers_to, 2);
        outbox.ack(2).unwrap();
        assert_eq!(outbox.usage().sample, Tally::default());
    }

    #[test]
    fn drop_counters_persist_and_travel_with_batches() {
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::new(None);
        let mut config = unlimited(1 << 20);
        config.quotas.sample = quota_bytes(4);
        {
            let outbox = open(dir.path(), config.clone(), &clock);
            outbox.push(Class::Sample, &[0; 4]).unwrap();
            outbox.push(Class::Sample, &[0; 3]).unwrap(); // evicts the first
            outbox.push(Class::Sample, &[0; 9]).unwrap(); // dropped
        }
        let outbox = open(dir.path(), config, &clock);
        let expected = Tally {
            records: 2,
            bytes: 13,
        };
        assert_eq!(outbox.drop_counters().sample, expected);
        let batch = outbox.read_batch(10, 1000).unwrap();
        assert_eq!(batch.drops.sample, expected);
        assert_eq!(batch.records.len(), 1);
        // The evicted record 1 is inside the covered range, so the server can move past it.
        assert_eq!((batch.after_seq, batch.covers_to), (0, 2));
        assert_eq!(batch.records[0].seq, 2);
        assert_eq!(
            outbox.usage().sample,
            Tally {
                records: 1,
                bytes: 3
            }
        );
    }

    #[test]
    fn batches_are_in_sequence_order_and_respect_limits() {
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::new(None);
        let outbox = open(dir.path(), unlimited(1 << 20), &clock);
        let classes = [Class::Sample, Class::Event, Class::Window, Class::Label];
        for i in 0..8u8 {
            outbox.push(classes[i as usize % 4], &[i; 10]).unwrap();
        }
        let batch = outbox.read_batch(3, 1000).unwrap();
        assert_eq!(
            batch.records.iter().map(|r| r.seq).collect::<Vec<_>>(),
            [1, 2, 3]
        );
        assert_eq!(batch.records[1].class, Class::Event);
        assert_eq!(batch.records[1].payload, vec![1; 10]);
        assert_eq!(batch.covers_to, 3);
        let batch = outbox.read_batch(100, 25).unwrap();
        assert_eq!(batch.records.len(), 2);
        assert_eq!(batch.covers_to, 2);
        // The first record always goes, even when larger than the byte limit.
        let batch = outbox.read_batch(100, 1).unwrap();
        assert_eq!(batch.records.len(), 1);
        // An empty batch must not claim to cover pending records.
        let batch = outbox.read_batch(0, 1000).unwrap();
        assert!(batch.records.is_empty());
        assert_eq!(batch.covers_to, 0);
        let batch = outbox.read_batch(100, 1000).unwrap();
        assert_eq!(batch.records.len(), 8);
        assert_eq!(batch.covers_to, 8);
    }

    #[test]
    fn ages_use_the_monotonic_clock_and_continue_across_restart() {
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::new(Some(BELIEVABLE_WALL_MS + 1_000));
        let config = unlimited(1 << 20);
        {
            let outbox = open(dir.path(), config.clone(), &clock);
            outbox.push(Class::Event, b"x").unwrap();
            clock.advance_ms(1_500);
            assert_eq!(all(&outbox)[0].age_ms, 1_500);
            // A wall-clock step backwards must not change ages.
            clock.set_wall_ms(Some(BELIEVABLE_WALL_MS));
            assert_eq!(all(&outbox)[0].age_ms, 1_500);
            outbox.push(Class::Event, b"y").unwrap(); // persists the timeline
        }
        // Restart: a new process's monotonic clock starts again from 0, while 10 s of
        // wall time have passed since the last write.
        let rebooted = ManualClock::new(Some(BELIEVABLE_WALL_MS + 10_000));
        let outbox = open(dir.path(), config.clone(), &rebooted);
        let records = all(&outbox);
        assert_eq!(records[0].age_ms, 1_500 + 10_000);
        assert_eq!(records[1].age_ms, 10_000);
        rebooted.advance_ms(250);
        assert_eq!(all(&outbox)[1].age_ms, 10_250);
        drop(outbox);
        // Without a wall clock, ages continue from the persisted timeline (lower bound).
        let no_wall = ManualClock::new(None);
        let outbox = open(dir.path(), config, &no_wall);
        assert_eq!(all(&outbox)[1].age_ms, 0);
        no_wall.advance_ms(40);
        assert_eq!(all(&outbox)[1].age_ms, 40);
    }

    #[test]
    fn push_many_commits_all_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::new(None);
        let outbox = open(dir.path(), unlimited(1 << 20), &clock);
        let payloads: Vec<Vec<u8>> = (0..100u8).map(|i| vec![i; 3]).collect();
        let outcomes = outbox
            .push_many(payloads.iter().map(|p| (Class::Window, p.as_slice())))
            .unwrap();
        let expected: Vec<_> = (1..=100).map(PushOutcome::Stored).collect();
        assert_eq!(outcomes, expected);
        let records = all(&outbox);
        assert_eq!(records.len(), 100);
        assert!(records.iter().zip(&payloads).all(|(r, p)| &r.payload == p));
    }

    #[test]
    fn disk_full_is_typed_and_loses_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::new(None);
        let outbox = open(dir.path(), unlimited(1 << 30), &clock);
        {
            let state = outbox.state();
            let pages: u64 = state
                .conn
                .pragma_query_value(None, "page_count", |r| r.get(0))
                .unwrap();
            state
                .conn
                .pragma_update(None, "max_page_count", pages + 8)
                .unwrap();
        }
        let payload = vec![7u8; 3000];
        let mut written = Vec::new();
        let err = loop {
            match outbox.push(Class::Event, &payload) {
                Ok(outcome) => written.push(stored(outcome)),
                Err(err) => break err,
            }
            assert!(written.len() < 1000, "max_page_count was not enforced");
        };
        assert!(matches!(err, OutboxError::DiskFull { .. }), "{err:?}");
        assert!(!written.is_empty());
        assert_eq!(seqs(&outbox), written);
        // A batch that does not fit is rolled back as a whole.
        let batch: Vec<_> = (0..5).map(|_| (Class::Event, payload.as_slice())).collect();
        assert!(matches!(
            outbox.push_many(batch).unwrap_err(),
            OutboxError::DiskFull { .. }
        ));
        assert_eq!(seqs(&outbox), written);
        // Acknowledging frees pages; pushing works again with the next sequence.
        let last = *written.last().unwrap();
        outbox.ack(last).unwrap();
        assert_eq!(
            stored(outbox.push(Class::Event, &payload).unwrap()),
            last + 1
        );
        drop(outbox);
        let outbox = open(dir.path(), unlimited(1 << 30), &clock);
        assert_eq!(seqs(&outbox), vec![last + 1]);
    }

    #[test]
    fn usage_is_rebuilt_from_disk_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::new(None);
        {
            let outbox = open(dir.path(), unlimited(100), &clock);
            outbox.push(Class::Label, &[0; 40]).unwrap();
            outbox.push(Class::Sample, &[0; 40]).unwrap();
        }
        let outbox = open(dir.path(), unlimited(100), &clock);
        assert_eq!(
            outbox.usage().label,
            Tally {
                records: 1,
                bytes: 40
            }
        );
        // The cap still counts what was stored before the restart.
        outbox.push(Class::Label, &[0; 40]).unwrap();
        assert_eq!(outbox.usage().sample, Tally::default());
        assert_eq!(
            outbox.drop_counters().sample,
            Tally {
                records: 1,
                bytes: 40
            }
        );
    }

    #[test]
    fn schema_version_is_recorded_and_newer_schema_refused() {
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::new(None);
        drop(open(dir.path(), unlimited(1), &clock));
        let path = dir.path().join("outbox.db");
        let conn = Connection::open(&path).unwrap();
        let version: u32 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        conn.pragma_update(None, "user_version", SCHEMA_VERSION + 1)
            .unwrap();
        drop(conn);
        let err = Outbox::open(&path, unlimited(1)).unwrap_err();
        assert!(matches!(err, OutboxError::SchemaTooNew { .. }), "{err:?}");
    }

    #[test]
    fn evictions_are_listed_by_sequence_until_acknowledged() {
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::new(None);
        let mut config = unlimited(1 << 20);
        config.quotas.window = Quota {
            max_bytes: Some(100),
            max_records: Some(2),
        };
        {
            let outbox = open(dir.path(), config.clone(), &clock);
            for i in 1..=4u8 {
                outbox.push(Class::Window, &[i; 10]).unwrap();
            }
            // Over the byte quota on its own: rejected, no sequence, not in `evicted`.
            assert_eq!(
                outbox.push(Class::Window, &[0; 101]).unwrap(),
                PushOutcome::Dropped
            );
            outbox.push(Class::Event, b"e").unwrap();
        }
        let outbox = open(dir.path(), config, &clock);
        let batch = outbox.read_batch(100, 1 << 20).unwrap();
        assert_eq!((batch.after_seq, batch.covers_to), (0, 5));
        assert_eq!(
            batch.records.iter().map(|r| r.seq).collect::<Vec<_>>(),
            [3, 4, 5]
        );
        let evicted = |seq| Evicted {
            seq,
            class: Class::Window,
            bytes: 10,
        };
        assert_eq!(batch.evicted, [evicted(1), evicted(2)]);
        assert_eq!(
            batch.rejected.window,
            Tally {
                records: 1,
                bytes: 101
            }
        );
        assert_eq!(batch.drops.window.records, 3);
        let wire = batch.to_wire("d");
        assert_eq!(
            wire.evicted.as_ref().unwrap()["window"],
            vec![[1, 10], [2, 10]]
        );
        assert_eq!(wire.rejected.as_ref().unwrap()["window"], [1, 101]);
        let bytes = serde_json::to_vec(&wire).unwrap();
        assert_eq!(
            outpost_protocol::wire::TelemetryBatch::from_bytes(&bytes).unwrap(),
            wire
        );
        // A batch that ends before an eviction does not list it.
        let first = outbox.read_batch(0, 1 << 20).unwrap();
        assert!(first.evicted.is_empty());
        outbox.ack(1).unwrap();
        assert_eq!(
            outbox.read_batch(100, 1 << 20).unwrap().evicted,
            [evicted(2)]
        );
        outbox.ack(5).unwrap();
        assert!(outbox.read_batch(100, 1 << 20).unwrap().evicted.is_empty());
        let left: i64 = outbox
            .state()
            .conn
            .query_row("SELECT COUNT(*) FROM evicted", [], |r| r.get(0))
            .unwrap();
        assert_eq!(left, 0);
    }

    #[test]
    fn evicted_list_is_capped_and_ends_the_range_before_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::new(None);
        let mut config = unlimited(1 << 20);
        config.quotas.sample = Quota {
            max_bytes: None,
            max_records: Some(1),
        };
        let outbox = open(dir.path(), config, &clock);
        let n = MAX_EVICTED_PER_BATCH as u64 + 5;
        let payload = [1u8; 3];
        outbox
            .push_many((0..n).map(|_| (Class::Sample, payload.as_slice())))
            .unwrap();
        let batch = outbox.read_batch(100, 1 << 20).unwrap();
        assert!(batch.records.is_empty());
        assert_eq!(batch.evicted.len(), MAX_EVICTED_PER_BATCH);
        assert_eq!(batch.covers_to, MAX_EVICTED_PER_BATCH as u64);
        assert_eq!(batch.evicted.last().unwrap().seq, batch.covers_to);
        outbox.ack(batch.covers_to).unwrap();
        let batch = outbox.read_batch(100, 1 << 20).unwrap();
        assert_eq!(batch.evicted.len(), 4);
        assert_eq!(batch.records.len(), 1);
        assert_eq!(batch.covers_to, n);
    }

    #[test]
    fn schema_1_outbox_is_migrated_with_its_records_and_drops() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox.db");
        {
            let mut conn = db::open(&path).unwrap();
            db::migrate(&mut conn, &MIGRATIONS[..1]).unwrap();
            conn.execute_batch(
                "INSERT INTO records VALUES (7, 1, 0, 2, x'0102');
                 INSERT INTO counters VALUES ('next_seq', 8), ('acked_seq', 6);
                 INSERT INTO drops VALUES (0, 6, 60);",
            )
            .unwrap();
        }
        let clock = ManualClock::new(None);
        let outbox = open(dir.path(), unlimited(1 << 20), &clock);
        let batch = outbox.read_batch(100, 1 << 20).unwrap();
        assert_eq!((batch.after_seq, batch.covers_to), (6, 7));
        assert_eq!(batch.records[0].payload, [1, 2]);
        assert_eq!(batch.drops.sample.records, 6);
        assert_eq!(batch.rejected, PerClass::default());
        assert!(batch.evicted.is_empty());
    }

    #[test]
    fn outbox_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Outbox>();
    }
}
