//! The journal in an embedded SQLite file (the default): one connection behind a mutex, migrations
//! counted in `PRAGMA user_version`, and cluster locks as rows with a heartbeat.

use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, Row, TransactionBehavior, params};

use super::sql::{self, sqlite};
use super::{
    ClusterLock, JournalError, LockInner, NewRun, RawRun, RawStep, RunId, RunRecord, RunResult,
    StepId, StepOutcome, StepRecord, Takeover, local_hostname, now_ms, pid_alive, takeover,
};

/// How long a write waits for another process holding the database.
const BUSY_TIMEOUT_SECS: u64 = 5;

/// Schema migrations; entry `i` takes `PRAGMA user_version` from `i` to `i + 1`. Append, never edit.
pub(super) const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE runs (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    cluster      TEXT    NOT NULL,
    kind         TEXT    NOT NULL CHECK (kind IN ('upgrade', 'rollback')),
    from_version TEXT    NOT NULL,
    to_version   TEXT    NOT NULL,
    plan_json    TEXT    NOT NULL,
    options_json TEXT    NOT NULL,
    actor        TEXT    NOT NULL,
    started_ms   INTEGER NOT NULL,
    ended_ms     INTEGER,
    result       TEXT    CHECK (result IN ('upgraded', 'rolled_back', 'halted', 'refused')),
    error        TEXT
);
CREATE INDEX runs_by_cluster ON runs (cluster, id);

CREATE TABLE steps (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id     INTEGER NOT NULL REFERENCES runs (id),
    node       TEXT,
    step       TEXT    NOT NULL,
    started_ms INTEGER NOT NULL,
    ended_ms   INTEGER,
    outcome    TEXT    CHECK (outcome IN ('ok', 'failed')),
    error      TEXT,
    detail     TEXT    NOT NULL,
    end_detail TEXT,
    actor      TEXT    NOT NULL
);
CREATE INDEX steps_by_run ON steps (run_id, id);

CREATE TABLE run_state (
    run_id     INTEGER NOT NULL REFERENCES runs (id),
    key        TEXT    NOT NULL,
    value      TEXT    NOT NULL,
    updated_ms INTEGER NOT NULL,
    PRIMARY KEY (run_id, key)
);

CREATE TABLE locks (
    cluster      TEXT    PRIMARY KEY,
    holder       TEXT    NOT NULL,
    token        TEXT    NOT NULL,
    acquired_ms  INTEGER NOT NULL,
    heartbeat_ms INTEGER NOT NULL
);
"#,
    r#"
CREATE TABLE fleet_runs (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    to_version   TEXT    NOT NULL,
    options_json TEXT    NOT NULL,
    actor        TEXT    NOT NULL,
    started_ms   INTEGER NOT NULL,
    ended_ms     INTEGER,
    result       TEXT    CHECK (result IN ('upgraded', 'incomplete', 'halted')),
    error        TEXT
);

CREATE TABLE fleet_clusters (
    fleet_run      INTEGER NOT NULL REFERENCES fleet_runs (id),
    cluster        TEXT    NOT NULL,
    position       INTEGER NOT NULL,
    state          TEXT    NOT NULL
                   CHECK (state IN ('pending', 'running', 'upgraded', 'failed', 'skipped')),
    reason         TEXT,
    cluster_run_id INTEGER REFERENCES runs (id),
    started_ms     INTEGER,
    ended_ms       INTEGER,
    PRIMARY KEY (fleet_run, cluster)
);
"#,
    // Who claimed a fleet's cluster (`user@host:pid`), so several coordinators can share a fleet run.
    r#"
ALTER TABLE fleet_clusters ADD COLUMN claimed_by TEXT;
"#,
    // A cluster already on its line's target is 'up_to_date' (per-line targets). SQLite cannot
    // change a CHECK in place: the table is rebuilt (nothing references it).
    r#"
CREATE TABLE fleet_clusters_v4 (
    fleet_run      INTEGER NOT NULL REFERENCES fleet_runs (id),
    cluster        TEXT    NOT NULL,
    position       INTEGER NOT NULL,
    state          TEXT    NOT NULL
                   CHECK (state IN ('pending', 'running', 'upgraded', 'up_to_date', 'failed', 'skipped')),
    reason         TEXT,
    cluster_run_id INTEGER REFERENCES runs (id),
    started_ms     INTEGER,
    ended_ms       INTEGER,
    claimed_by     TEXT,
    PRIMARY KEY (fleet_run, cluster)
);
INSERT INTO fleet_clusters_v4
    (fleet_run, cluster, position, state, reason, cluster_run_id, started_ms, ended_ms, claimed_by)
    SELECT fleet_run, cluster, position, state, reason, cluster_run_id, started_ms, ended_ms, claimed_by
    FROM fleet_clusters;
DROP TABLE fleet_clusters;
ALTER TABLE fleet_clusters_v4 RENAME TO fleet_clusters;
"#,
];

/// The SQLite journal; [`super::Journal`] dispatches to it.
pub(crate) struct Db {
    conn: Arc<Mutex<Connection>>,
    location: String,
}

impl Db {
    /// Opens (creating if needed) a journal file and brings its schema up to date.
    pub(crate) fn open(path: &Path) -> Result<Self, JournalError> {
        let location = path.display().to_string();
        let conn = Connection::open(path).map_err(|source| JournalError::Sqlite {
            location: location.clone(),
            what: "cannot open the database file; check the directory exists and is writable"
                .into(),
            source,
        })?;
        Self::setup(conn, location)
    }

    /// A journal that lives only as long as this value; for tests and `--state :memory:`.
    pub(crate) fn open_in_memory() -> Result<Self, JournalError> {
        let location = ":memory:".to_string();
        let conn = Connection::open_in_memory().map_err(|source| JournalError::Sqlite {
            location: location.clone(),
            what: "cannot open an in-memory database".into(),
            source,
        })?;
        Self::setup(conn, location)
    }

    /// Where the journal lives, for messages.
    pub(crate) fn location(&self) -> &str {
        &self.location
    }

    fn setup(mut conn: Connection, location: String) -> Result<Self, JournalError> {
        let err = |what: &str| {
            let location = location.clone();
            let what = what.to_string();
            move |source| JournalError::Sqlite {
                location,
                what,
                source,
            }
        };
        conn.busy_timeout(Duration::from_secs(BUSY_TIMEOUT_SECS))
            .map_err(err("setting the busy timeout"))?;
        // WAL lets a reader (`bbupgrade status`) look while a run writes; in memory it stays "memory".
        let _mode: String = conn
            .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
            .map_err(err("switching to WAL mode"))?;
        conn.pragma_update(None, "foreign_keys", true)
            .map_err(err("enabling foreign keys"))?;

        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(err("starting the schema migration"))?;
        let version: i64 = tx
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(err("reading the schema version"))?;
        let known = MIGRATIONS.len() as i64;
        if version > known {
            return Err(JournalError::NewerSchema {
                location,
                found: version,
                known,
            });
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            tx.execute_batch(sql)
                .map_err(err(&format!("applying schema migration {}", i + 1)))?;
        }
        tx.pragma_update(None, "user_version", known)
            .map_err(err("recording the schema version"))?;
        tx.commit()
            .map_err(err("committing the schema migration"))?;
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
            location,
        })
    }

    /// Commits without waiting for the disk (SQLite `synchronous = NORMAL` in WAL mode): a commit
    /// still survives the coordinator's crash or kill, which is what a resume needs; only a power
    /// cut or kernel crash may lose the last commits, and repeating those steps is harmless (agent
    /// operations carry ids). Fleet runs use it: thousands of journaled steps, one fsync each, would
    /// otherwise be the bottleneck.
    pub(crate) fn commit_without_fsync(&self) -> Result<(), JournalError> {
        self.conn()
            .pragma_update(None, "synchronous", "NORMAL")
            .map_err(self.sql("setting synchronous = NORMAL"))
    }

    /// Runs `f` on the connection, for tables another module owns (the fleet's). Short work only,
    /// never across an await: the connection is shared behind a mutex.
    pub(crate) fn with_conn<T>(
        &self,
        what: impl Into<String>,
        f: impl FnOnce(&mut Connection) -> rusqlite::Result<T>,
    ) -> Result<T, JournalError> {
        f(&mut self.conn()).map_err(self.sql(what))
    }

    pub(crate) fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic elsewhere while holding the guard leaves SQLite consistent (transactions roll back).
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn sql(&self, what: impl Into<String>) -> impl FnOnce(rusqlite::Error) -> JournalError + '_ {
        let what = what.into();
        move |source| JournalError::Sqlite {
            location: self.location.clone(),
            what,
            source,
        }
    }

    fn bad(&self, column: &'static str, value: &str) -> JournalError {
        JournalError::BadValue {
            location: self.location.clone(),
            column,
            value: value.to_string(),
        }
    }

    /// Records a new open run.
    pub(crate) fn create_run(&self, new: &NewRun) -> Result<RunId, JournalError> {
        let id = self
            .conn()
            .query_row(
                &sqlite(sql::INSERT_RUN),
                params![
                    new.cluster,
                    new.kind.as_str(),
                    new.from_version,
                    new.to_version,
                    new.plan_json,
                    new.options_json,
                    new.actor,
                    now_ms()
                ],
                |r| r.get(0),
            )
            .map_err(self.sql(format!("recording a new run on cluster {}", new.cluster)))?;
        Ok(RunId(id))
    }

    pub(crate) fn run(&self, id: RunId) -> Result<RunRecord, JournalError> {
        let raw = self
            .conn()
            .query_row(&sqlite(sql::RUN_BY_ID), [id.0], raw_run)
            .optional()
            .map_err(self.sql(format!("reading run {id}")))?;
        match raw {
            Some(raw) => raw.into_record(&self.location),
            None => Err(JournalError::NoSuchRun {
                location: self.location.clone(),
                run: id,
            }),
        }
    }

    /// The latest run on `cluster` that has not finished, if any.
    pub(crate) fn open_run(&self, cluster: &str) -> Result<Option<RunRecord>, JournalError> {
        self.one_run(
            cluster,
            sql::OPEN_RUN,
            format!("looking for an open run on cluster {cluster}"),
        )
    }

    /// The latest run on `cluster`, finished or not.
    pub(crate) fn latest_run(&self, cluster: &str) -> Result<Option<RunRecord>, JournalError> {
        self.one_run(
            cluster,
            sql::LATEST_RUN,
            format!("looking for the latest run on cluster {cluster}"),
        )
    }

    fn one_run(
        &self,
        cluster: &str,
        statement: &str,
        what: String,
    ) -> Result<Option<RunRecord>, JournalError> {
        let raw = self
            .conn()
            .query_row(&sqlite(statement), [cluster], raw_run)
            .optional()
            .map_err(self.sql(what))?;
        raw.map(|r| r.into_record(&self.location)).transpose()
    }

    /// The latest `limit` runs on `cluster`, newest first.
    pub(crate) fn recent_runs(
        &self,
        cluster: &str,
        limit: u32,
    ) -> Result<Vec<RunRecord>, JournalError> {
        let what = || format!("reading the latest runs on cluster {cluster}");
        let raws = {
            let conn = self.conn();
            let mut stmt = conn
                .prepare(&sqlite(sql::RECENT_RUNS))
                .map_err(self.sql(what()))?;
            let rows = stmt
                .query_map(params![cluster, i64::from(limit)], raw_run)
                .map_err(self.sql(what()))?;
            rows.collect::<rusqlite::Result<Vec<_>>>()
                .map_err(self.sql(what()))?
        };
        raws.into_iter()
            .map(|r| r.into_record(&self.location))
            .collect()
    }

    /// Records that a step is about to run (`node` is `None` for cluster-wide steps).
    pub(crate) fn begin_step(
        &self,
        run: RunId,
        node: Option<&str>,
        step: &str,
        detail: &str,
    ) -> Result<StepId, JournalError> {
        let id: Option<i64> = self
            .conn()
            .query_row(
                &sqlite(sql::BEGIN_STEP),
                params![run.0, node, step, now_ms(), detail],
                |r| r.get(0),
            )
            .optional()
            .map_err(self.sql(format!("recording the start of step {step} of run {run}")))?;
        id.map(StepId).ok_or_else(|| JournalError::NoSuchRun {
            location: self.location.clone(),
            run,
        })
    }

    /// Records how a step ended.
    pub(crate) fn end_step(
        &self,
        step: StepId,
        outcome: StepOutcome,
        detail: &str,
    ) -> Result<(), JournalError> {
        let (word, error) = match outcome {
            StepOutcome::Ok => ("ok", None),
            StepOutcome::Failed(e) => ("failed", Some(e)),
        };
        let updated = self
            .conn()
            .execute(
                &sqlite(sql::END_STEP),
                params![step.0, now_ms(), word, error, detail],
            )
            .map_err(self.sql(format!("recording the end of step {step}")))?;
        if updated == 0 {
            return Err(self.bad("steps.id", &step.to_string()));
        }
        Ok(())
    }

    /// A run's steps in the order they began.
    pub(crate) fn steps(&self, run: RunId) -> Result<Vec<StepRecord>, JournalError> {
        let conn = self.conn();
        let what = || format!("reading the steps of run {run}");
        let mut stmt = conn
            .prepare(&sqlite(sql::STEPS_OF_RUN))
            .map_err(self.sql(what()))?;
        let rows = stmt
            .query_map([run.0], raw_step)
            .map_err(self.sql(what()))?;
        let mut out = Vec::new();
        for row in rows {
            let raw = row.map_err(self.sql(what()))?;
            out.push(raw.into_record(&self.location)?);
        }
        Ok(out)
    }

    /// Closes a run with its result.
    pub(crate) fn finish_run(
        &self,
        run: RunId,
        result: RunResult,
        error: Option<&str>,
    ) -> Result<(), JournalError> {
        let updated = self
            .conn()
            .execute(
                &sqlite(sql::FINISH_RUN),
                params![run.0, now_ms(), result.as_str(), error],
            )
            .map_err(self.sql(format!("recording the end of run {run}")))?;
        if updated == 0 {
            return Err(JournalError::NoSuchRun {
                location: self.location.clone(),
                run,
            });
        }
        Ok(())
    }

    /// Remembers a small fact a resume needs (e.g. `upgrade_mode_enabled_by_us` = `true`).
    pub(crate) fn set_run_state(
        &self,
        run: RunId,
        key: &str,
        value: &str,
    ) -> Result<(), JournalError> {
        self.conn()
            .execute(
                &sqlite(sql::SET_RUN_STATE),
                params![run.0, key, value, now_ms()],
            )
            .map_err(self.sql(format!("recording {key} for run {run}")))?;
        Ok(())
    }

    pub(crate) fn get_run_state(
        &self,
        run: RunId,
        key: &str,
    ) -> Result<Option<String>, JournalError> {
        self.conn()
            .query_row(&sqlite(sql::GET_RUN_STATE), params![run.0, key], |r| {
                r.get(0)
            })
            .optional()
            .map_err(self.sql(format!("reading {key} of run {run}")))
    }

    /// Takes the cluster's lock for `holder` (`user@host:pid`). A lock held by a dead process on this
    /// host, or whose heartbeat is older than [`LOCK_STALE_SECS`], is taken over.
    pub(crate) fn acquire_lock(
        &self,
        cluster: &str,
        holder: &str,
    ) -> Result<ClusterLock, JournalError> {
        let token = uuid::Uuid::new_v4().to_string();
        let this_host = local_hostname();
        let mut conn = self.conn();
        let what = || format!("taking the lock on cluster {cluster}");
        // IMMEDIATE takes SQLite's write lock up front, so two coordinators cannot both see it free.
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(self.sql(what()))?;
        let existing: Option<(String, i64, i64)> = tx
            .query_row(&sqlite(sql::LOCK_HOLDER), [cluster], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .optional()
            .map_err(self.sql(what()))?;
        let now = now_ms();
        if let Some((current, since_ms, heartbeat_ms)) = existing {
            match takeover(&current, heartbeat_ms, now, &this_host, pid_alive) {
                Takeover::Refuse => {
                    return Err(JournalError::Locked {
                        cluster: cluster.to_string(),
                        holder: current,
                        since_ms,
                    });
                }
                reason => tracing::warn!(
                    cluster,
                    previous_holder = %current,
                    ?reason,
                    "taking over an abandoned cluster lock"
                ),
            }
        }
        tx.execute(
            &sqlite(sql::WRITE_LOCK),
            params![cluster, holder, token, now],
        )
        .map_err(self.sql(what()))?;
        tx.commit().map_err(self.sql(what()))?;
        Ok(ClusterLock {
            inner: LockInner::Sqlite(Lock {
                conn: Arc::clone(&self.conn),
                location: self.location.clone(),
                cluster: cluster.to_string(),
                token,
                released: false,
            }),
        })
    }
}

/// A lock row of the SQLite journal, with its heartbeat.
pub(crate) struct Lock {
    conn: Arc<Mutex<Connection>>,
    location: String,
    cluster: String,
    token: String,
    released: bool,
}

impl Lock {
    pub(crate) fn cluster(&self) -> &str {
        &self.cluster
    }

    /// Proves the holder is alive; call every [`LOCK_HEARTBEAT_SECS`]. `LockLost` if another process
    /// took the lock over meanwhile: stop working on the cluster then.
    pub(crate) fn heartbeat(&self) -> Result<(), JournalError> {
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let updated = conn
            .execute(
                &sqlite(sql::LOCK_HEARTBEAT),
                params![self.cluster, self.token, now_ms()],
            )
            .map_err(|source| JournalError::Sqlite {
                location: self.location.clone(),
                what: format!("refreshing the lock on cluster {}", self.cluster),
                source,
            })?;
        if updated == 0 {
            return Err(JournalError::LockLost {
                cluster: self.cluster.clone(),
            });
        }
        Ok(())
    }

    /// Releases the lock now, reporting failure (dropping releases too, but can only log).
    pub(crate) fn release(mut self) -> Result<(), JournalError> {
        self.released = true;
        self.delete()
    }

    fn delete(&self) -> Result<(), JournalError> {
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        conn.execute(&sqlite(sql::DELETE_LOCK), params![self.cluster, self.token])
            .map_err(|source| JournalError::Sqlite {
                location: self.location.clone(),
                what: format!("releasing the lock on cluster {}", self.cluster),
                source,
            })?;
        Ok(())
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        if !self.released
            && let Err(e) = self.delete()
        {
            tracing::warn!(error = %e, "could not release the cluster lock; it frees itself once stale");
        }
    }
}

fn raw_run(r: &Row<'_>) -> rusqlite::Result<RawRun> {
    Ok(RawRun {
        id: r.get(0)?,
        cluster: r.get(1)?,
        kind: r.get(2)?,
        from_version: r.get(3)?,
        to_version: r.get(4)?,
        plan_json: r.get(5)?,
        options_json: r.get(6)?,
        actor: r.get(7)?,
        started_ms: r.get(8)?,
        ended_ms: r.get(9)?,
        result: r.get(10)?,
        error: r.get(11)?,
    })
}

fn raw_step(r: &Row<'_>) -> rusqlite::Result<RawStep> {
    Ok(RawStep {
        id: r.get(0)?,
        run_id: r.get(1)?,
        node: r.get(2)?,
        step: r.get(3)?,
        started_ms: r.get(4)?,
        ended_ms: r.get(5)?,
        outcome: r.get(6)?,
        error: r.get(7)?,
        detail: r.get(8)?,
        end_detail: r.get(9)?,
        actor: r.get(10)?,
    })
}
