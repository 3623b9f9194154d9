//! SQLite plumbing shared by the agent's databases (`agent.db`, `outbox.db`).
//!
//! Every database is opened in WAL mode with `synchronous=FULL`: a commit has reached stable
//! storage (the WAL is fsynced) when `COMMIT` returns, which is what the model pointers and
//! the outbox's "durable before the sequence number is returned" promise need.
//!
//! Schemas are versioned by `PRAGMA user_version`. A database's migrations are a list of SQL
//! batches; batch `i` takes the schema from version `i` to `i + 1` and runs in one
//! transaction together with the `user_version` bump, so a kill mid-migration leaves the
//! old version. Migrations only go forward: a file written by a newer agent is refused
//! rather than guessed at.

use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, ErrorCode};

/// How long a statement waits for another connection's write lock before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors from [`migrate`].
#[derive(Debug, thiserror::Error)]
pub(crate) enum MigrateError {
    #[error(transparent)]
    Sqlite(#[from] rusqlite::Error),
    #[error("schema version {found} is newer than the supported {supported}")]
    TooNew { found: u32, supported: u32 },
}

/// Opens (creating if needed) a database with the agent's durability settings.
pub(crate) fn open(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    let mode: String =
        conn.pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CANTOPEN),
            Some(format!("journal_mode=WAL refused (got {mode})")),
        ));
    }
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    Ok(conn)
}

/// Brings the schema up to `migrations.len()`, one transaction per step. Returns the
/// version found before migrating.
pub(crate) fn migrate(conn: &mut Connection, migrations: &[&str]) -> Result<u32, MigrateError> {
    let supported = u32::try_from(migrations.len()).unwrap_or(u32::MAX);
    let found: u32 = conn.pragma_query_value(None, "user_version", |row| row.get(0))?;
    if found > supported {
        return Err(MigrateError::TooNew { found, supported });
    }
    for (index, sql) in migrations.iter().enumerate().skip(found as usize) {
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", index as u32 + 1)?;
        tx.commit()?;
    }
    Ok(found)
}

/// Whether an SQLite error means the database or its disk is full (`SQLITE_FULL`).
pub(crate) fn is_full(err: &rusqlite::Error) -> bool {
    err.sqlite_error_code() == Some(ErrorCode::DiskFull)
}

/// Converts a stored integer into `u64`; SQLite integers are `i64` and ours are never
/// negative, so a negative value means a damaged row.
pub(crate) fn to_u64(value: i64) -> Option<u64> {
    u64::try_from(value).ok()
}

/// Converts a `u64` for storage; values above `i64::MAX` saturate (never reached by
/// sequence numbers, sizes or millisecond clocks).
pub(crate) fn to_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    const V1: &str = "CREATE TABLE a (x INTEGER);";
    const V2: &str = "ALTER TABLE a ADD COLUMN y TEXT;";

    #[test]
    fn migrations_run_forward_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let mut conn = open(&path).unwrap();
        assert_eq!(migrate(&mut conn, &[V1]).unwrap(), 0);
        drop(conn);
        let mut conn = open(&path).unwrap();
        assert_eq!(migrate(&mut conn, &[V1, V2]).unwrap(), 1);
        assert_eq!(migrate(&mut conn, &[V1, V2]).unwrap(), 2);
        conn.execute("INSERT INTO a (x, y) VALUES (1, 'z')", [])
            .unwrap();
        let version: u32 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(version, 2);
    }

    #[test]
    fn refuses_database_from_newer_agent() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let mut conn = open(&path).unwrap();
        migrate(&mut conn, &[V1, V2]).unwrap();
        let err = migrate(&mut conn, &[V1]).unwrap_err();
        assert!(
            matches!(
                err,
                MigrateError::TooNew {
                    found: 2,
                    supported: 1
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn failed_migration_keeps_old_version() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let mut conn = open(&path).unwrap();
        migrate(&mut conn, &[V1]).unwrap();
        let broken = "ALTER TABLE a ADD COLUMN y TEXT; THIS IS NOT SQL;";
        assert!(migrate(&mut conn, &[V1, broken]).is_err());
        let version: u32 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(version, 1);
        // The half-applied ALTER was rolled back with the step.
        assert!(
            conn.execute("INSERT INTO a (x, y) VALUES (1, 'z')", [])
                .is_err()
        );
    }
}
