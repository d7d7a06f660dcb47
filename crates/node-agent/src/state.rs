//! The state store: one SQLite database at `<data_dir>/state.db` (WAL,
//! `synchronous=FULL`) holding instances (desired, observed, seq), the status outbox,
//! the standalone report sink, plan cursor and node state, and the resource ledger.
//!
//! The contract: every method is one transaction, so a crash (even `kill -9`) leaves
//! either all of a batch or none of it. Methods block; async callers go through
//! [`Store::call`], which runs them on the blocking pool. This module stores what it is
//! given and decides nothing.

use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use rusqlite::{params, Connection, OptionalExtension};

/// A state store failure.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite said no.
    #[error("state store {path}: {source}")]
    Sqlite {
        /// Database path.
        path: String,
        /// Cause.
        source: rusqlite::Error,
    },
    /// The blocking task died.
    #[error("state store task failed: {0}")]
    Task(String),
    /// The database was written by a newer agent (a downgrade): refused, its tables
    /// untouched, because this agent cannot know what the newer schema means.
    #[error(
        "state store {path} has schema version {found}, newer than this agent's {supported}: \
         it was written by a newer plfm-node-agent; run that version (or a later one) on \
         this data dir, downgrades are not supported"
    )]
    NewerSchema {
        /// Database path.
        path: String,
        /// `PRAGMA user_version` of the file.
        found: i64,
        /// [`SCHEMA_VERSION`].
        supported: i64,
    },
}

/// Handle to the store; cheap to clone.
#[derive(Clone)]
pub struct Store {
    conn: Arc<Mutex<Connection>>,
    path: Arc<str>,
}

/// One instance row.
#[derive(Debug, Clone, PartialEq)]
pub struct InstanceRow {
    /// Instance id.
    pub instance_id: String,
    /// Generation of the last status.
    pub generation: i32,
    /// Last status (wire name, internal statuses included).
    pub status: String,
    /// Reason code of the last status.
    pub reason_code: Option<String>,
    /// Message of the last status.
    pub error_message: Option<String>,
    /// Exit code of the last status.
    pub exit_code: Option<i32>,
    /// Last report seq.
    pub seq: i64,
    /// Boot id of the current VM.
    pub boot_id: Option<String>,
    /// Restarts so far.
    pub restarts: i64,
    /// Consecutive failures counted by the restart policy (so the crash-loop budget
    /// survives an agent restart).
    pub consecutive_failures: i64,
    /// Last desired assignment (JSON), None once removed from the plan.
    pub desired_json: Option<String>,
    /// Generation an operator stopped, if any.
    pub operator_stopped_generation: Option<i32>,
    /// RFC 3339 time of the last change.
    pub updated_at: String,
}

/// A status change to persist, with its report when it is sent.
#[derive(Debug, Clone)]
pub struct StatusRecord {
    /// The new instance row values.
    pub row: InstanceRow,
    /// The report JSON, when this change is reported (queued in the outbox).
    pub report_json: Option<String>,
}

/// One queued report.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxRow {
    /// Outbox id (delivery order).
    pub id: i64,
    /// Instance.
    pub instance_id: String,
    /// Report seq.
    pub seq: i64,
    /// Report JSON.
    pub report_json: String,
}

/// A resource the agent created for an instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceRow {
    /// Kind (`tap`, `disk`, `process`, `mount`, …).
    pub kind: String,
    /// Name or path.
    pub name: String,
    /// Owner.
    pub instance_id: String,
    /// Runtime-specific details (JSON).
    pub detail: Option<String>,
}

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS instances (
    instance_id TEXT PRIMARY KEY,
    generation INTEGER NOT NULL,
    status TEXT NOT NULL,
    reason_code TEXT,
    error_message TEXT,
    exit_code INTEGER,
    seq INTEGER NOT NULL DEFAULT 0,
    boot_id TEXT,
    restarts INTEGER NOT NULL DEFAULT 0,
    desired_json TEXT,
    operator_stopped_generation INTEGER,
    updated_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    instance_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    report_json TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS reports (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    instance_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    report_json TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS reports_by_instance ON reports (instance_id, seq);
CREATE TABLE IF NOT EXISTS history (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    instance_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    report_json TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS resources (
    kind TEXT NOT NULL,
    name TEXT NOT NULL,
    instance_id TEXT NOT NULL,
    detail TEXT,
    PRIMARY KEY (kind, name)
);
"#;

/// Reports delivered to a control plane that the store keeps for `events` (the last
/// ones; the standalone sink's `reports` are the delivery itself and are all kept).
pub const HISTORY_KEEP: i64 = 10_000;

/// The state store's schema version, kept in SQLite's `PRAGMA user_version`. Every
/// released schema and what it added:
///
/// | version | added | first in |
/// |---|---|---|
/// | 1 | instances, outbox, reports, meta, resources (and the image cache's tables) | 17c5b03 |
/// | 2 | `instances.consecutive_failures` | 82d1ee3 |
/// | 3 | `history` (reports a control plane acknowledged, for `events`) | e539f7e |
///
/// Versions 1–3 were released before the version was recorded (their files say 0);
/// [`migrate`] reads theirs off their tables. A database of a higher version than this
/// one is refused ([`StoreError::NewerSchema`]). Fixtures of every released version are
/// in `tests/data/state/` and `tests/state_migration.rs` opens each.
pub const SCHEMA_VERSION: i64 = 3;

/// Why [`migrate`] failed.
enum MigrateError {
    Sqlite(rusqlite::Error),
    Newer(i64),
}

impl From<rusqlite::Error> for MigrateError {
    fn from(e: rusqlite::Error) -> Self {
        MigrateError::Sqlite(e)
    }
}

/// The `PRAGMA user_version` of `conn`'s database.
pub(crate) fn schema_version(conn: &Connection) -> rusqlite::Result<i64> {
    conn.pragma_query_value(None, "user_version", |r| r.get(0))
}

/// Brings the database to [`SCHEMA_VERSION`]: refuses a newer one untouched, creates
/// missing tables, adds columns added after the first schema, records the version.
/// The check and the changes run in one `BEGIN IMMEDIATE` transaction, so stores
/// opened at the same time (the agent's two handles, a test reading the database)
/// cannot both migrate, and a crash leaves the old version intact.
fn migrate(conn: &Connection) -> Result<(), MigrateError> {
    let has = |table: &str, column: &str| -> rusqlite::Result<bool> {
        let mut stmt = conn.prepare(&format!("PRAGMA table_info({table})"))?;
        let names = stmt.query_map([], |r| r.get::<_, String>(1))?;
        for n in names {
            if n? == column {
                return Ok(true);
            }
        }
        Ok(false)
    };
    conn.execute_batch("BEGIN IMMEDIATE")?;
    let changed = (|| {
        let found = schema_version(conn)?;
        if found > SCHEMA_VERSION {
            return Err(MigrateError::Newer(found));
        }
        if found == SCHEMA_VERSION {
            return Ok(());
        }
        // Version 1 → 3 (or a new file): the tables of every version, then the columns
        // added to existing tables since version 1.
        conn.execute_batch(SCHEMA)?;
        if !has("instances", "consecutive_failures")? {
            conn.execute_batch(
                "ALTER TABLE instances ADD COLUMN consecutive_failures INTEGER NOT NULL DEFAULT 0",
            )?;
        }
        conn.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        Ok(())
    })();
    match changed {
        Ok(()) => conn.execute_batch("COMMIT").map_err(MigrateError::from),
        Err(e) => {
            let _ = conn.execute_batch("ROLLBACK");
            Err(e)
        }
    }
}

impl Store {
    /// Opens (creating if needed) the database at `path`.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let p = path.display().to_string();
        let err = |source| StoreError::Sqlite {
            path: p.clone(),
            source,
        };
        let conn = Connection::open(path).map_err(err)?;
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(err)?;
        // Switching to WAL needs the database to itself and SQLite answers "busy" at
        // once, without its busy handler, when another connection opens it at the same
        // moment (the agent's two handles at start): retry that, for as long as the
        // busy timeout.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let setup = conn
                .pragma_update(None, "journal_mode", "WAL")
                .and_then(|()| conn.pragma_update(None, "synchronous", "FULL"))
                .and_then(|()| conn.pragma_update(None, "foreign_keys", "ON"))
                .map_err(MigrateError::from)
                .and_then(|()| migrate(&conn));
            match setup {
                Ok(()) => break,
                Err(MigrateError::Newer(found)) => {
                    return Err(StoreError::NewerSchema {
                        path: p,
                        found,
                        supported: SCHEMA_VERSION,
                    })
                }
                Err(MigrateError::Sqlite(rusqlite::Error::SqliteFailure(e, _)))
                    if matches!(
                        e.code,
                        rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked
                    ) && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(MigrateError::Sqlite(e)) => return Err(err(e)),
            }
        }
        Ok(Store {
            conn: Arc::new(Mutex::new(conn)),
            path: Arc::from(p.as_str()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Connection> {
        // A panic inside a transaction rolls it back when the Transaction drops, so the
        // connection is usable after poisoning.
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn err(&self, source: rusqlite::Error) -> StoreError {
        StoreError::Sqlite {
            path: self.path.to_string(),
            source,
        }
    }

    /// Runs a blocking store call on tokio's blocking pool.
    pub async fn call<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
    {
        let s = self.clone();
        tokio::task::spawn_blocking(move || f(&s))
            .await
            .map_err(|e| StoreError::Task(e.to_string()))?
    }

    /// All instance rows.
    pub fn load_instances(&self) -> Result<Vec<InstanceRow>, StoreError> {
        let conn = self.lock();
        let mut stmt = conn
            .prepare(
                "SELECT instance_id, generation, status, reason_code, error_message, exit_code, seq, boot_id, restarts, desired_json, operator_stopped_generation, updated_at, consecutive_failures FROM instances ORDER BY instance_id",
            )
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([], |r| {
                Ok(InstanceRow {
                    instance_id: r.get(0)?,
                    generation: r.get(1)?,
                    status: r.get(2)?,
                    reason_code: r.get(3)?,
                    error_message: r.get(4)?,
                    exit_code: r.get(5)?,
                    seq: r.get(6)?,
                    boot_id: r.get(7)?,
                    restarts: r.get(8)?,
                    desired_json: r.get(9)?,
                    operator_stopped_generation: r.get(10)?,
                    updated_at: r.get(11)?,
                    consecutive_failures: r.get(12)?,
                })
            })
            .map_err(|e| self.err(e))?;
        rows.collect::<Result<Vec<_>, _>>().map_err(|e| self.err(e))
    }

    /// Persists a batch of status changes and their reports in one transaction (one
    /// fsync for the whole batch).
    pub fn commit_statuses(&self, batch: &[StatusRecord]) -> Result<(), StoreError> {
        let mut conn = self.lock();
        let tx = conn.transaction().map_err(|e| self.err(e))?;
        {
            let mut up = tx
                .prepare_cached(
                    "INSERT INTO instances (instance_id, generation, status, reason_code, error_message, exit_code, seq, boot_id, restarts, desired_json, operator_stopped_generation, updated_at, consecutive_failures)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)
                     ON CONFLICT(instance_id) DO UPDATE SET generation=excluded.generation, status=excluded.status,
                       reason_code=excluded.reason_code, error_message=excluded.error_message, exit_code=excluded.exit_code,
                       seq=excluded.seq, boot_id=excluded.boot_id, restarts=excluded.restarts, updated_at=excluded.updated_at,
                       consecutive_failures=excluded.consecutive_failures",
                )
                .map_err(|e| self.err(e))?;
            let mut ob = tx
                .prepare_cached(
                    "INSERT INTO outbox (instance_id, seq, report_json) VALUES (?1, ?2, ?3)",
                )
                .map_err(|e| self.err(e))?;
            for rec in batch {
                let r = &rec.row;
                up.execute(params![
                    r.instance_id,
                    r.generation,
                    r.status,
                    r.reason_code,
                    r.error_message,
                    r.exit_code,
                    r.seq,
                    r.boot_id,
                    r.restarts,
                    r.desired_json,
                    r.operator_stopped_generation,
                    r.updated_at,
                    r.consecutive_failures
                ])
                .map_err(|e| self.err(e))?;
                if let Some(json) = &rec.report_json {
                    ob.execute(params![r.instance_id, r.seq, json])
                        .map_err(|e| self.err(e))?;
                }
            }
        }
        tx.commit().map_err(|e| self.err(e))
    }

    /// Records the desired assignments (JSON; `None` once an instance left the plan) of
    /// several instances in one transaction. Creates rows for instances not seen yet.
    pub fn set_desired(
        &self,
        batch: &[(String, Option<String>)],
        now: &str,
    ) -> Result<(), StoreError> {
        let mut conn = self.lock();
        let tx = conn.transaction().map_err(|e| self.err(e))?;
        {
            let mut up = tx
                .prepare_cached(
                    "INSERT INTO instances (instance_id, generation, status, desired_json, updated_at) VALUES (?1, 0, 'pending', ?2, ?3)
                     ON CONFLICT(instance_id) DO UPDATE SET desired_json = excluded.desired_json",
                )
                .map_err(|e| self.err(e))?;
            for (id, json) in batch {
                up.execute(params![id, json, now])
                    .map_err(|e| self.err(e))?;
            }
        }
        tx.commit().map_err(|e| self.err(e))
    }

    /// Records (or clears) an operator stop for an instance's generation.
    pub fn set_operator_stop(
        &self,
        instance_id: &str,
        generation: Option<i32>,
    ) -> Result<(), StoreError> {
        self.lock()
            .execute(
                "UPDATE instances SET operator_stopped_generation = ?2 WHERE instance_id = ?1",
                params![instance_id, generation],
            )
            .map(|_| ())
            .map_err(|e| self.err(e))
    }

    /// The oldest `limit` queued reports, in delivery order.
    pub fn outbox_peek(&self, limit: usize) -> Result<Vec<OutboxRow>, StoreError> {
        let conn = self.lock();
        let mut stmt = conn
            .prepare_cached(
                "SELECT id, instance_id, seq, report_json FROM outbox ORDER BY id LIMIT ?1",
            )
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([limit as i64], |r| {
                Ok(OutboxRow {
                    id: r.get(0)?,
                    instance_id: r.get(1)?,
                    seq: r.get(2)?,
                    report_json: r.get(3)?,
                })
            })
            .map_err(|e| self.err(e))?;
        rows.collect::<Result<Vec<_>, _>>().map_err(|e| self.err(e))
    }

    /// Number of queued reports.
    pub fn outbox_depth(&self) -> Result<i64, StoreError> {
        self.lock()
            .query_row("SELECT COUNT(*) FROM outbox", [], |r| r.get(0))
            .map_err(|e| self.err(e))
    }

    /// Removes delivered reports from the outbox.
    /// The acknowledged reports move to `history` (for `events`), which keeps the last
    /// [`HISTORY_KEEP`].
    pub fn outbox_ack(&self, ids: &[i64]) -> Result<(), StoreError> {
        let mut conn = self.lock();
        let tx = conn.transaction().map_err(|e| self.err(e))?;
        {
            let mut keep = tx
                .prepare_cached(
                    "INSERT INTO history (instance_id, seq, report_json) SELECT instance_id, seq, report_json FROM outbox WHERE id = ?1",
                )
                .map_err(|e| self.err(e))?;
            let mut del = tx
                .prepare_cached("DELETE FROM outbox WHERE id = ?1")
                .map_err(|e| self.err(e))?;
            for id in ids {
                keep.execute([id]).map_err(|e| self.err(e))?;
                del.execute([id]).map_err(|e| self.err(e))?;
            }
            tx.execute(
                "DELETE FROM history WHERE id <= (SELECT MAX(id) FROM history) - ?1",
                [HISTORY_KEEP],
            )
            .map_err(|e| self.err(e))?;
        }
        tx.commit().map_err(|e| self.err(e))
    }

    /// Standalone sink: moves outbox rows into `reports` in one transaction, so each
    /// report is delivered exactly once even across crashes.
    pub fn deliver_to_local_sink(&self, rows: &[OutboxRow]) -> Result<(), StoreError> {
        let mut conn = self.lock();
        let tx = conn.transaction().map_err(|e| self.err(e))?;
        {
            let mut ins = tx
                .prepare_cached(
                    "INSERT INTO reports (instance_id, seq, report_json) VALUES (?1, ?2, ?3)",
                )
                .map_err(|e| self.err(e))?;
            let mut del = tx
                .prepare_cached("DELETE FROM outbox WHERE id = ?1")
                .map_err(|e| self.err(e))?;
            for r in rows {
                if del.execute([r.id]).map_err(|e| self.err(e))? == 1 {
                    ins.execute(params![r.instance_id, r.seq, r.report_json])
                        .map_err(|e| self.err(e))?;
                }
            }
        }
        tx.commit().map_err(|e| self.err(e))
    }

    /// Reports the local sink has taken, for one instance or all, in delivery order.
    pub fn delivered_reports(
        &self,
        instance_id: Option<&str>,
    ) -> Result<Vec<(String, i64, String)>, StoreError> {
        let conn = self.lock();
        let mut stmt = conn
            .prepare(
                "SELECT instance_id, seq, report_json FROM reports WHERE ?1 IS NULL OR instance_id = ?1 ORDER BY id",
            )
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([instance_id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .map_err(|e| self.err(e))?;
        rows.collect::<Result<Vec<_>, _>>().map_err(|e| self.err(e))
    }

    /// The last `limit` reports of one instance or of all, oldest first, each with
    /// whether it still waits in the outbox (`true`) or was delivered (`false`).
    /// Delivered reports come before queued ones: the outbox delivers in order.
    pub fn report_history(
        &self,
        instance_id: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, bool)>, StoreError> {
        let conn = self.lock();
        let tail = |table: &str| -> Result<Vec<String>, StoreError> {
            let mut stmt = conn
                .prepare(&format!(
                    "SELECT report_json FROM (SELECT id, report_json FROM {table} WHERE ?1 IS NULL OR instance_id = ?1 ORDER BY id DESC LIMIT ?2) ORDER BY id"
                ))
                .map_err(|e| self.err(e))?;
            let rows = stmt
                .query_map(params![instance_id, limit as i64], |r| r.get(0))
                .map_err(|e| self.err(e))?;
            rows.collect::<Result<Vec<String>, _>>()
                .map_err(|e| self.err(e))
        };
        // Standalone: the local sink's `reports`; connected: the acknowledged
        // `history`. A node that changed mode has both, the older first.
        let delivered = tail("reports")?.into_iter().chain(tail("history")?);
        let pending = tail("outbox")?;
        let mut all: Vec<(String, bool)> = delivered
            .map(|j| (j, false))
            .chain(pending.into_iter().map(|j| (j, true)))
            .collect();
        let skip = all.len().saturating_sub(limit);
        all.drain(..skip);
        Ok(all)
    }

    /// Number of reports the local sink has taken.
    pub fn delivered_count(&self) -> Result<i64, StoreError> {
        self.lock()
            .query_row("SELECT COUNT(*) FROM reports", [], |r| r.get(0))
            .map_err(|e| self.err(e))
    }

    /// Reads a meta value.
    pub fn meta_get(&self, key: &str) -> Result<Option<String>, StoreError> {
        self.lock()
            .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .optional()
            .map_err(|e| self.err(e))
    }

    /// Writes a meta value.
    pub fn meta_set(&self, key: &str, value: &str) -> Result<(), StoreError> {
        self.lock()
            .execute(
                "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                [key, value],
            )
            .map(|_| ())
            .map_err(|e| self.err(e))
    }

    /// Records a resource before it is created.
    pub fn resource_add(&self, r: &ResourceRow) -> Result<(), StoreError> {
        self.lock()
            .execute(
                "INSERT INTO resources (kind, name, instance_id, detail) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(kind, name) DO UPDATE SET instance_id = excluded.instance_id, detail = excluded.detail",
                params![r.kind, r.name, r.instance_id, r.detail],
            )
            .map(|_| ())
            .map_err(|e| self.err(e))
    }

    /// Forgets a resource after it is gone.
    pub fn resource_remove(&self, kind: &str, name: &str) -> Result<(), StoreError> {
        self.lock()
            .execute(
                "DELETE FROM resources WHERE kind = ?1 AND name = ?2",
                [kind, name],
            )
            .map(|_| ())
            .map_err(|e| self.err(e))
    }

    /// Every recorded resource.
    pub fn resources(&self) -> Result<Vec<ResourceRow>, StoreError> {
        let conn = self.lock();
        let mut stmt = conn
            .prepare("SELECT kind, name, instance_id, detail FROM resources ORDER BY kind, name")
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([], |r| {
                Ok(ResourceRow {
                    kind: r.get(0)?,
                    name: r.get(1)?,
                    instance_id: r.get(2)?,
                    detail: r.get(3)?,
                })
            })
            .map_err(|e| self.err(e))?;
        rows.collect::<Result<Vec<_>, _>>().map_err(|e| self.err(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: &str, seq: i64, status: &str) -> InstanceRow {
        InstanceRow {
            instance_id: id.into(),
            generation: 1,
            status: status.into(),
            reason_code: None,
            error_message: None,
            exit_code: None,
            seq,
            boot_id: None,
            restarts: 0,
            consecutive_failures: 0,
            desired_json: None,
            operator_stopped_generation: None,
            updated_at: "2026-01-01T00:00:00Z".into(),
        }
    }

    #[test]
    fn statuses_and_outbox_commit_together_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        {
            let s = Store::open(&path).unwrap();
            s.commit_statuses(&[
                StatusRecord {
                    row: row("a", 1, "booting"),
                    report_json: Some("{\"seq\":1}".into()),
                },
                StatusRecord {
                    row: row("b", 0, "preparing"),
                    report_json: None,
                },
            ])
            .unwrap();
        }
        let s = Store::open(&path).unwrap();
        let rows = s.load_instances().unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].status, "booting");
        let ob = s.outbox_peek(10).unwrap();
        assert_eq!(ob.len(), 1);
        assert_eq!((ob[0].instance_id.as_str(), ob[0].seq), ("a", 1));
    }

    #[test]
    fn local_sink_delivery_is_exactly_once() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("state.db")).unwrap();
        s.commit_statuses(&[StatusRecord {
            row: row("a", 1, "booting"),
            report_json: Some("r1".into()),
        }])
        .unwrap();
        let ob = s.outbox_peek(10).unwrap();
        s.deliver_to_local_sink(&ob).unwrap();
        // Delivering the same rows again (a retry after a crash) adds nothing.
        s.deliver_to_local_sink(&ob).unwrap();
        assert_eq!(s.delivered_reports(Some("a")).unwrap().len(), 1);
        assert_eq!(s.outbox_depth().unwrap(), 0);
    }

    #[test]
    fn report_history_is_delivered_then_pending_newest_last_limited_and_kept_after_an_ack() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("state.db")).unwrap();
        let commit = |id: &str, seq: i64, json: &str| {
            s.commit_statuses(&[StatusRecord {
                row: row(id, seq, "booting"),
                report_json: Some(json.into()),
            }])
            .unwrap()
        };
        commit("a", 1, "a1");
        commit("b", 1, "b1");
        commit("a", 2, "a2");
        s.deliver_to_local_sink(&s.outbox_peek(10).unwrap())
            .unwrap();
        commit("a", 3, "a3");
        let all = s.report_history(None, 10).unwrap();
        let seen: Vec<(&str, bool)> = all.iter().map(|(j, p)| (j.as_str(), *p)).collect();
        assert_eq!(
            seen,
            [("a1", false), ("b1", false), ("a2", false), ("a3", true)]
        );
        let a = s.report_history(Some("a"), 2).unwrap();
        assert_eq!(a, [("a2".to_string(), false), ("a3".to_string(), true)]);
        // Connected mode: an acknowledged report stays in the history.
        let ob = s.outbox_peek(10).unwrap();
        s.outbox_ack(&[ob[0].id]).unwrap();
        assert_eq!(s.outbox_depth().unwrap(), 0);
        let a = s.report_history(Some("a"), 2).unwrap();
        assert_eq!(a, [("a2".to_string(), false), ("a3".to_string(), false)]);
    }

    #[test]
    fn a_database_from_before_consecutive_failures_is_migrated_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        {
            let c = Connection::open(&path).unwrap();
            c.execute_batch(
                "CREATE TABLE instances (instance_id TEXT PRIMARY KEY, generation INTEGER NOT NULL,
                   status TEXT NOT NULL, reason_code TEXT, error_message TEXT, exit_code INTEGER,
                   seq INTEGER NOT NULL DEFAULT 0, boot_id TEXT, restarts INTEGER NOT NULL DEFAULT 0,
                   desired_json TEXT, operator_stopped_generation INTEGER, updated_at TEXT NOT NULL DEFAULT '');
                 INSERT INTO instances (instance_id, generation, status, seq, restarts) VALUES ('old', 3, 'failed', 7, 2);",
            )
            .unwrap();
        }
        let s = Store::open(&path).unwrap();
        let rows = s.load_instances().unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(
            (rows[0].seq, rows[0].restarts, rows[0].consecutive_failures),
            (7, 2, 0)
        );
        let mut r = row("old", 8, "failed");
        r.consecutive_failures = 3;
        s.commit_statuses(&[StatusRecord {
            row: r,
            report_json: None,
        }])
        .unwrap();
        drop(s);
        let s = Store::open(&path).unwrap();
        assert_eq!(s.load_instances().unwrap()[0].consecutive_failures, 3);
    }

    #[test]
    fn stores_opened_at_once_on_an_old_database_migrate_it_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        Connection::open(&path)
            .unwrap()
            .execute_batch(
                "CREATE TABLE instances (instance_id TEXT PRIMARY KEY, generation INTEGER NOT NULL,
                   status TEXT NOT NULL, reason_code TEXT, error_message TEXT, exit_code INTEGER,
                   seq INTEGER NOT NULL DEFAULT 0, boot_id TEXT, restarts INTEGER NOT NULL DEFAULT 0,
                   desired_json TEXT, operator_stopped_generation INTEGER, updated_at TEXT NOT NULL DEFAULT '');",
            )
            .unwrap();
        let barrier = std::sync::Arc::new(std::sync::Barrier::new(8));
        let opened: Vec<_> = (0..8)
            .map(|_| {
                let (p, b) = (path.clone(), barrier.clone());
                std::thread::spawn(move || {
                    b.wait();
                    Store::open(&p).map(|_| ())
                })
            })
            .collect();
        for t in opened {
            t.join().unwrap().unwrap();
        }
        assert!(Store::open(&path)
            .unwrap()
            .load_instances()
            .unwrap()
            .is_empty());
    }

    #[test]
    fn meta_and_resources_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("state.db")).unwrap();
        assert_eq!(s.meta_get("cursor").unwrap(), None);
        s.meta_set("cursor", "5").unwrap();
        s.meta_set("cursor", "6").unwrap();
        assert_eq!(s.meta_get("cursor").unwrap().as_deref(), Some("6"));
        let r = ResourceRow {
            kind: "tap".into(),
            name: "plfm1".into(),
            instance_id: "a".into(),
            detail: None,
        };
        s.resource_add(&r).unwrap();
        assert_eq!(s.resources().unwrap(), vec![r]);
        s.resource_remove("tap", "plfm1").unwrap();
        assert!(s.resources().unwrap().is_empty());
    }
}
