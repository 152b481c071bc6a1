//! The coordinator's journal in SQLite: runs, their steps before and after each runs, resume facts, and the per-cluster lock.

use std::fmt;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OptionalExtension, Row, TransactionBehavior, params};

/// A lock whose heartbeat is older than this is abandoned and may be taken over.
pub const LOCK_STALE_SECS: u64 = 30;
/// How often a lock holder should call [`ClusterLock::heartbeat`].
pub const LOCK_HEARTBEAT_SECS: u64 = 10;
/// How long a write waits for another process holding the database.
const BUSY_TIMEOUT_SECS: u64 = 5;

/// Schema migrations; entry `i` takes `PRAGMA user_version` from `i` to `i + 1`. Append, never edit.
const MIGRATIONS: &[&str] = &[
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
];

/// What went wrong with the journal; callers branch on `Locked` and `LockLost`.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("journal {location}: {what}: {source}")]
    Sqlite {
        location: String,
        what: String,
        #[source]
        source: rusqlite::Error,
    },
    #[error(
        "journal {location} has schema version {found}, newer than this bbupgrade knows ({known}); use a newer bbupgrade"
    )]
    NewerSchema {
        location: String,
        found: i64,
        known: i64,
    },
    #[error("cluster {cluster} is locked by {holder} since {}: another bbupgrade is working on it; wait for it to finish (a lock whose heartbeat stops is freed after {LOCK_STALE_SECS}s)", format_ms(*since_ms))]
    Locked {
        cluster: String,
        holder: String,
        since_ms: i64,
    },
    #[error(
        "the lock on cluster {cluster} was taken over by another process (our heartbeat stopped for more than {LOCK_STALE_SECS}s); stop and run `bbupgrade resume` once the other run is done"
    )]
    LockLost { cluster: String },
    #[error("journal {location} has no run {run}")]
    NoSuchRun { location: String, run: RunId },
    #[error(
        "journal {location}: unexpected value {value:?} in column {column}; the journal was edited or written by another program"
    )]
    BadValue {
        location: String,
        column: &'static str,
        value: String,
    },
}

/// A run's id in the journal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RunId(pub i64);

/// A step's id in the journal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StepId(pub i64);

impl fmt::Display for RunId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl fmt::Display for StepId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// What a run does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunKind {
    Upgrade,
    Rollback,
}

impl RunKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RunKind::Upgrade => "upgrade",
            RunKind::Rollback => "rollback",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "upgrade" => Some(RunKind::Upgrade),
            "rollback" => Some(RunKind::Rollback),
            _ => None,
        }
    }
}

/// How a run ended; the same words as the `result` field of the JSON summary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunResult {
    Upgraded,
    RolledBack,
    Halted,
    Refused,
}

impl RunResult {
    pub fn as_str(self) -> &'static str {
        match self {
            RunResult::Upgraded => "upgraded",
            RunResult::RolledBack => "rolled_back",
            RunResult::Halted => "halted",
            RunResult::Refused => "refused",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "upgraded" => Some(RunResult::Upgraded),
            "rolled_back" => Some(RunResult::RolledBack),
            "halted" => Some(RunResult::Halted),
            "refused" => Some(RunResult::Refused),
            _ => None,
        }
    }
}

/// How a step ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepOutcome {
    Ok,
    Failed(String),
}

/// A run about to start.
#[derive(Debug, Clone)]
pub struct NewRun {
    pub cluster: String,
    pub kind: RunKind,
    pub from_version: String,
    pub to_version: String,
    pub plan_json: String,
    /// Who runs it, `user@host`.
    pub actor: String,
    pub options_json: String,
}

/// A run as journaled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunRecord {
    pub id: RunId,
    pub cluster: String,
    pub kind: RunKind,
    pub from_version: String,
    pub to_version: String,
    pub plan_json: String,
    pub options_json: String,
    pub actor: String,
    pub started_ms: i64,
    pub ended_ms: Option<i64>,
    /// `None` while the run is open.
    pub result: Option<RunResult>,
    pub error: Option<String>,
}

/// A step as journaled; `outcome` is `None` for a step begun and not ended (interrupted, or running).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepRecord {
    pub id: StepId,
    pub run: RunId,
    pub node: Option<String>,
    pub step: String,
    pub started_ms: i64,
    pub ended_ms: Option<i64>,
    pub outcome: Option<StepOutcome>,
    /// Written when the step began.
    pub detail: String,
    /// Written when the step ended.
    pub end_detail: Option<String>,
    pub actor: String,
}

/// The journal; share it behind an `Arc`. Calls block briefly on SQLite: from async code, prefer
/// `spawn_blocking` for anything in a loop.
pub struct Journal {
    conn: Arc<Mutex<Connection>>,
    location: String,
}

impl fmt::Debug for Journal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Journal")
            .field("location", &self.location)
            .finish()
    }
}

const RUN_COLUMNS: &str = "id, cluster, kind, from_version, to_version, plan_json, options_json, \
                           actor, started_ms, ended_ms, result, error";
const STEP_COLUMNS: &str =
    "id, run_id, node, step, started_ms, ended_ms, outcome, error, detail, end_detail, actor";

impl Journal {
    /// Opens (creating if needed) a journal file and brings its schema up to date.
    pub fn open(path: &Path) -> Result<Self, JournalError> {
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
    pub fn open_in_memory() -> Result<Self, JournalError> {
        let location = ":memory:".to_string();
        let conn = Connection::open_in_memory().map_err(|source| JournalError::Sqlite {
            location: location.clone(),
            what: "cannot open an in-memory database".into(),
            source,
        })?;
        Self::setup(conn, location)
    }

    /// Where the journal lives, for messages.
    pub fn location(&self) -> &str {
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
    pub fn commit_without_fsync(&self) -> Result<(), JournalError> {
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

    fn conn(&self) -> MutexGuard<'_, Connection> {
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
    pub fn create_run(&self, new: &NewRun) -> Result<RunId, JournalError> {
        let conn = self.conn();
        conn.execute(
            "INSERT INTO runs (cluster, kind, from_version, to_version, plan_json, options_json, \
             actor, started_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
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
        )
        .map_err(self.sql(format!("recording a new run on cluster {}", new.cluster)))?;
        Ok(RunId(conn.last_insert_rowid()))
    }

    pub fn run(&self, id: RunId) -> Result<RunRecord, JournalError> {
        let raw = self
            .conn()
            .query_row(
                &format!("SELECT {RUN_COLUMNS} FROM runs WHERE id = ?1"),
                [id.0],
                RawRun::from_row,
            )
            .optional()
            .map_err(self.sql(format!("reading run {id}")))?;
        match raw {
            Some(raw) => self.run_record(raw),
            None => Err(JournalError::NoSuchRun {
                location: self.location.clone(),
                run: id,
            }),
        }
    }

    /// The latest run on `cluster` that has not finished, if any.
    pub fn open_run(&self, cluster: &str) -> Result<Option<RunRecord>, JournalError> {
        self.one_run(
            cluster,
            "AND result IS NULL",
            format!("looking for an open run on cluster {cluster}"),
        )
    }

    /// The latest run on `cluster`, finished or not.
    pub fn latest_run(&self, cluster: &str) -> Result<Option<RunRecord>, JournalError> {
        self.one_run(
            cluster,
            "",
            format!("looking for the latest run on cluster {cluster}"),
        )
    }

    fn one_run(
        &self,
        cluster: &str,
        filter: &str,
        what: String,
    ) -> Result<Option<RunRecord>, JournalError> {
        let raw = self
            .conn()
            .query_row(
                &format!(
                    "SELECT {RUN_COLUMNS} FROM runs WHERE cluster = ?1 {filter} \
                     ORDER BY id DESC LIMIT 1"
                ),
                [cluster],
                RawRun::from_row,
            )
            .optional()
            .map_err(self.sql(what))?;
        raw.map(|r| self.run_record(r)).transpose()
    }

    fn run_record(&self, raw: RawRun) -> Result<RunRecord, JournalError> {
        let kind = RunKind::parse(&raw.kind).ok_or_else(|| self.bad("runs.kind", &raw.kind))?;
        let result = match raw.result {
            None => None,
            Some(r) => Some(RunResult::parse(&r).ok_or_else(|| self.bad("runs.result", &r))?),
        };
        Ok(RunRecord {
            id: RunId(raw.id),
            cluster: raw.cluster,
            kind,
            from_version: raw.from_version,
            to_version: raw.to_version,
            plan_json: raw.plan_json,
            options_json: raw.options_json,
            actor: raw.actor,
            started_ms: raw.started_ms,
            ended_ms: raw.ended_ms,
            result,
            error: raw.error,
        })
    }

    /// Records that a step is about to run (`node` is `None` for cluster-wide steps).
    pub fn begin_step(
        &self,
        run: RunId,
        node: Option<&str>,
        step: &str,
        detail: &str,
    ) -> Result<StepId, JournalError> {
        let conn = self.conn();
        let inserted = conn
            .execute(
                "INSERT INTO steps (run_id, node, step, started_ms, detail, actor) \
                 SELECT id, ?2, ?3, ?4, ?5, actor FROM runs WHERE id = ?1",
                params![run.0, node, step, now_ms(), detail],
            )
            .map_err(self.sql(format!("recording the start of step {step} of run {run}")))?;
        if inserted == 0 {
            return Err(JournalError::NoSuchRun {
                location: self.location.clone(),
                run,
            });
        }
        Ok(StepId(conn.last_insert_rowid()))
    }

    /// Records how a step ended.
    pub fn end_step(
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
                "UPDATE steps SET ended_ms = ?2, outcome = ?3, error = ?4, end_detail = ?5 \
                 WHERE id = ?1",
                params![step.0, now_ms(), word, error, detail],
            )
            .map_err(self.sql(format!("recording the end of step {step}")))?;
        if updated == 0 {
            return Err(self.bad("steps.id", &step.to_string()));
        }
        Ok(())
    }

    /// A run's steps in the order they began.
    pub fn steps(&self, run: RunId) -> Result<Vec<StepRecord>, JournalError> {
        let conn = self.conn();
        let what = || format!("reading the steps of run {run}");
        let mut stmt = conn
            .prepare(&format!(
                "SELECT {STEP_COLUMNS} FROM steps WHERE run_id = ?1 ORDER BY id"
            ))
            .map_err(self.sql(what()))?;
        let rows = stmt
            .query_map([run.0], RawStep::from_row)
            .map_err(self.sql(what()))?;
        let mut out = Vec::new();
        for row in rows {
            let raw = row.map_err(self.sql(what()))?;
            let outcome = match (raw.outcome.as_deref(), raw.error) {
                (None, _) => None,
                (Some("ok"), _) => Some(StepOutcome::Ok),
                (Some("failed"), e) => Some(StepOutcome::Failed(e.unwrap_or_default())),
                (Some(other), _) => return Err(self.bad("steps.outcome", other)),
            };
            out.push(StepRecord {
                id: StepId(raw.id),
                run: RunId(raw.run_id),
                node: raw.node,
                step: raw.step,
                started_ms: raw.started_ms,
                ended_ms: raw.ended_ms,
                outcome,
                detail: raw.detail,
                end_detail: raw.end_detail,
                actor: raw.actor,
            });
        }
        Ok(out)
    }

    /// Closes a run with its result.
    pub fn finish_run(
        &self,
        run: RunId,
        result: RunResult,
        error: Option<&str>,
    ) -> Result<(), JournalError> {
        let updated = self
            .conn()
            .execute(
                "UPDATE runs SET ended_ms = ?2, result = ?3, error = ?4 WHERE id = ?1",
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
    pub fn set_run_state(&self, run: RunId, key: &str, value: &str) -> Result<(), JournalError> {
        self.conn()
            .execute(
                "INSERT INTO run_state (run_id, key, value, updated_ms) VALUES (?1, ?2, ?3, ?4) \
                 ON CONFLICT (run_id, key) DO UPDATE SET value = excluded.value, \
                 updated_ms = excluded.updated_ms",
                params![run.0, key, value, now_ms()],
            )
            .map_err(self.sql(format!("recording {key} for run {run}")))?;
        Ok(())
    }

    pub fn get_run_state(&self, run: RunId, key: &str) -> Result<Option<String>, JournalError> {
        self.conn()
            .query_row(
                "SELECT value FROM run_state WHERE run_id = ?1 AND key = ?2",
                params![run.0, key],
                |r| r.get(0),
            )
            .optional()
            .map_err(self.sql(format!("reading {key} of run {run}")))
    }

    /// Takes the cluster's lock for `holder` (`user@host:pid`). A lock held by a dead process on this
    /// host, or whose heartbeat is older than [`LOCK_STALE_SECS`], is taken over.
    pub fn acquire_lock(&self, cluster: &str, holder: &str) -> Result<ClusterLock, JournalError> {
        let token = uuid::Uuid::new_v4().to_string();
        let this_host = local_hostname();
        let mut conn = self.conn();
        let what = || format!("taking the lock on cluster {cluster}");
        // IMMEDIATE takes SQLite's write lock up front, so two coordinators cannot both see it free.
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(self.sql(what()))?;
        let existing: Option<(String, i64, i64)> = tx
            .query_row(
                "SELECT holder, acquired_ms, heartbeat_ms FROM locks WHERE cluster = ?1",
                [cluster],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
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
            "INSERT OR REPLACE INTO locks (cluster, holder, token, acquired_ms, heartbeat_ms) \
             VALUES (?1, ?2, ?3, ?4, ?4)",
            params![cluster, holder, token, now],
        )
        .map_err(self.sql(what()))?;
        tx.commit().map_err(self.sql(what()))?;
        Ok(ClusterLock {
            conn: Arc::clone(&self.conn),
            location: self.location.clone(),
            cluster: cluster.to_string(),
            token,
            released: false,
        })
    }
}

/// Why a lock may (or may not) be taken from its current holder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Takeover {
    Refuse,
    DeadHolder,
    Stale,
}

/// Decides whether a held lock may be taken; `alive` answers whether a pid on this host runs.
pub fn takeover(
    holder: &str,
    heartbeat_ms: i64,
    now_ms: i64,
    this_host: &str,
    alive: impl Fn(i32) -> bool,
) -> Takeover {
    if let Some((host, pid)) = parse_holder(holder)
        && host == this_host
        && !alive(pid)
    {
        return Takeover::DeadHolder;
    }
    if now_ms.saturating_sub(heartbeat_ms) > (LOCK_STALE_SECS * 1000) as i64 {
        return Takeover::Stale;
    }
    Takeover::Refuse
}

/// Splits `user@host:pid` (or `host:pid`) into host and pid.
pub fn parse_holder(holder: &str) -> Option<(&str, i32)> {
    let (rest, pid) = holder.rsplit_once(':')?;
    let pid: i32 = pid.parse().ok().filter(|p| *p > 0)?;
    let host = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
    (!host.is_empty()).then_some((host, pid))
}

/// `user@host:pid` for this process, the holder string [`Journal::acquire_lock`] expects.
pub fn this_process_holder() -> String {
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| nix::unistd::getuid().to_string());
    format!("{user}@{}:{}", local_hostname(), std::process::id())
}

fn local_hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its whole length; gethostname writes at most that much.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let len = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    match std::str::from_utf8(&buf[..len]) {
        Ok(name) if rc == 0 && !name.is_empty() => name.to_string(),
        _ => "localhost".to_string(),
    }
}

fn pid_alive(pid: i32) -> bool {
    use nix::errno::Errno;
    match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None) {
        Ok(()) => true,
        // EPERM: it exists but belongs to someone else.
        Err(Errno::EPERM) => true,
        Err(_) => false,
    }
}

/// The cluster's lock; keep it alive with [`ClusterLock::heartbeat`], released when dropped.
pub struct ClusterLock {
    conn: Arc<Mutex<Connection>>,
    location: String,
    cluster: String,
    token: String,
    released: bool,
}

impl fmt::Debug for ClusterLock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterLock")
            .field("cluster", &self.cluster)
            .finish()
    }
}

impl ClusterLock {
    pub fn cluster(&self) -> &str {
        &self.cluster
    }

    /// Proves the holder is alive; call every [`LOCK_HEARTBEAT_SECS`]. `LockLost` if another process
    /// took the lock over meanwhile: stop working on the cluster then.
    pub fn heartbeat(&self) -> Result<(), JournalError> {
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let updated = conn
            .execute(
                "UPDATE locks SET heartbeat_ms = ?3 WHERE cluster = ?1 AND token = ?2",
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
    pub fn release(mut self) -> Result<(), JournalError> {
        self.released = true;
        self.delete()
    }

    fn delete(&self) -> Result<(), JournalError> {
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        conn.execute(
            "DELETE FROM locks WHERE cluster = ?1 AND token = ?2",
            params![self.cluster, self.token],
        )
        .map_err(|source| JournalError::Sqlite {
            location: self.location.clone(),
            what: format!("releasing the lock on cluster {}", self.cluster),
            source,
        })?;
        Ok(())
    }
}

impl Drop for ClusterLock {
    fn drop(&mut self) {
        if !self.released
            && let Err(e) = self.delete()
        {
            tracing::warn!(error = %e, "could not release the cluster lock; it frees itself once stale");
        }
    }
}

struct RawRun {
    id: i64,
    cluster: String,
    kind: String,
    from_version: String,
    to_version: String,
    plan_json: String,
    options_json: String,
    actor: String,
    started_ms: i64,
    ended_ms: Option<i64>,
    result: Option<String>,
    error: Option<String>,
}

impl RawRun {
    fn from_row(r: &Row<'_>) -> rusqlite::Result<Self> {
        Ok(Self {
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
}

struct RawStep {
    id: i64,
    run_id: i64,
    node: Option<String>,
    step: String,
    started_ms: i64,
    ended_ms: Option<i64>,
    outcome: Option<String>,
    error: Option<String>,
    detail: String,
    end_detail: Option<String>,
    actor: String,
}

impl RawStep {
    fn from_row(r: &Row<'_>) -> rusqlite::Result<Self> {
        Ok(Self {
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
}

/// Unix time in milliseconds.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn format_ms(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("{ms} ms after the epoch"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

    fn new_run(cluster: &str) -> NewRun {
        NewRun {
            cluster: cluster.into(),
            kind: RunKind::Upgrade,
            from_version: "8.19.3".into(),
            to_version: "8.19.6".into(),
            plan_json: r#"{"order":["n1","n2"]}"#.into(),
            actor: "alice@admin-host".into(),
            options_json: "{}".into(),
        }
    }

    #[test]
    fn run_and_steps_round_trip() {
        let j = Journal::open_in_memory().unwrap();
        let run = j.create_run(&new_run("prod")).unwrap();
        let rec = j.run(run).unwrap();
        assert_eq!(rec.cluster, "prod");
        assert_eq!(rec.kind, RunKind::Upgrade);
        assert_eq!(rec.plan_json, r#"{"order":["n1","n2"]}"#);
        assert_eq!(rec.result, None);
        assert!(rec.started_ms > 0);

        let s1 = j
            .begin_step(run, None, "upgrade_mode", "POST /start")
            .unwrap();
        j.end_step(s1, StepOutcome::Ok, "READY_TO_UPGRADE").unwrap();
        let s2 = j.begin_step(run, Some("n1"), "drain", "haproxy").unwrap();
        j.end_step(s2, StepOutcome::Failed("timeout".into()), "3 sessions left")
            .unwrap();
        let s3 = j.begin_step(run, Some("n1"), "stop", "").unwrap();

        let steps = j.steps(run).unwrap();
        assert_eq!(steps.len(), 3);
        assert_eq!(steps[0].id, s1);
        assert_eq!(steps[0].node, None);
        assert_eq!(steps[0].outcome, Some(StepOutcome::Ok));
        assert_eq!(steps[0].detail, "POST /start");
        assert_eq!(steps[0].end_detail.as_deref(), Some("READY_TO_UPGRADE"));
        assert_eq!(steps[0].actor, "alice@admin-host");
        assert!(steps[0].ended_ms.is_some());
        assert_eq!(steps[1].node.as_deref(), Some("n1"));
        assert_eq!(
            steps[1].outcome,
            Some(StepOutcome::Failed("timeout".into()))
        );
        assert_eq!(steps[2].id, s3);
        assert_eq!(steps[2].outcome, None);
        assert_eq!(steps[2].ended_ms, None);

        assert_eq!(j.open_run("prod").unwrap().unwrap().id, run);
        assert!(j.open_run("other").unwrap().is_none());
        j.finish_run(run, RunResult::Halted, Some("drain timed out"))
            .unwrap();
        assert!(j.open_run("prod").unwrap().is_none());
        let latest = j.latest_run("prod").unwrap().unwrap();
        assert_eq!(latest.result, Some(RunResult::Halted));
        assert_eq!(latest.error.as_deref(), Some("drain timed out"));
        assert!(latest.ended_ms.is_some());

        let run2 = j.create_run(&new_run("prod")).unwrap();
        assert_eq!(j.latest_run("prod").unwrap().unwrap().id, run2);
        assert!(j.steps(run2).unwrap().is_empty());
    }

    #[test]
    fn missing_runs_are_reported() {
        let j = Journal::open_in_memory().unwrap();
        assert!(matches!(
            j.run(RunId(42)),
            Err(JournalError::NoSuchRun { .. })
        ));
        assert!(matches!(
            j.begin_step(RunId(42), None, "stage", ""),
            Err(JournalError::NoSuchRun { .. })
        ));
        assert!(matches!(
            j.finish_run(RunId(42), RunResult::Refused, None),
            Err(JournalError::NoSuchRun { .. })
        ));
    }

    #[test]
    fn run_state_is_per_run_and_overwritable() {
        let j = Journal::open_in_memory().unwrap();
        let a = j.create_run(&new_run("c")).unwrap();
        let b = j.create_run(&new_run("c")).unwrap();
        assert_eq!(
            j.get_run_state(a, "upgrade_mode_enabled_by_us").unwrap(),
            None
        );
        j.set_run_state(a, "upgrade_mode_enabled_by_us", "true")
            .unwrap();
        j.set_run_state(a, "upgrade_mode_enabled_by_us", "false")
            .unwrap();
        assert_eq!(
            j.get_run_state(a, "upgrade_mode_enabled_by_us")
                .unwrap()
                .as_deref(),
            Some("false")
        );
        assert_eq!(
            j.get_run_state(b, "upgrade_mode_enabled_by_us").unwrap(),
            None
        );
    }

    #[test]
    fn file_journal_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal.db");
        let (run, step) = {
            let j = Journal::open(&path).unwrap();
            let run = j.create_run(&new_run("prod")).unwrap();
            let step = j.begin_step(run, Some("n1"), "stop", "").unwrap();
            (run, step)
        };
        let j = Journal::open(&path).unwrap();
        let open = j.open_run("prod").unwrap().unwrap();
        assert_eq!(open.id, run);
        j.end_step(step, StepOutcome::Ok, "stopped").unwrap();
        j.begin_step(run, Some("n1"), "activate", "").unwrap();
        let steps = j.steps(run).unwrap();
        assert_eq!(
            steps.iter().map(|s| s.step.as_str()).collect::<Vec<_>>(),
            ["stop", "activate"]
        );
        let version: i64 = j
            .conn()
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, MIGRATIONS.len() as i64);
    }

    #[test]
    fn newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal.db");
        {
            let c = Connection::open(&path).unwrap();
            c.pragma_update(None, "user_version", 99).unwrap();
        }
        let err = Journal::open(&path).unwrap_err();
        assert!(
            matches!(err, JournalError::NewerSchema { found: 99, .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains("journal.db"), "{err}");
    }

    #[test]
    fn second_acquire_fails_naming_the_holder_and_drop_releases() {
        let j = Journal::open_in_memory().unwrap();
        let me = this_process_holder();
        let lock = j.acquire_lock("prod", &me).unwrap();
        lock.heartbeat().unwrap();
        let err = j.acquire_lock("prod", "bob@elsewhere:1").unwrap_err();
        match &err {
            JournalError::Locked {
                cluster, holder, ..
            } => {
                assert_eq!(cluster, "prod");
                assert_eq!(holder, &me);
            }
            other => panic!("expected Locked, got {other:?}"),
        }
        assert!(err.to_string().contains(&me), "{err}");
        // Another cluster is independent.
        let other = j.acquire_lock("staging", &me).unwrap();
        drop(lock);
        let again = j.acquire_lock("prod", "bob@elsewhere:1").unwrap();
        again.release().unwrap();
        drop(other);
        j.acquire_lock("prod", &me).unwrap();
    }

    #[test]
    fn lock_of_a_dead_local_process_is_taken_over() {
        let j = Journal::open_in_memory().unwrap();
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead_pid = child.id();
        child.wait().unwrap();
        let dead = format!("carol@{}:{dead_pid}", local_hostname());
        let old = j.acquire_lock("prod", &dead).unwrap();
        std::mem::forget(old); // the dead process never released it
        let lock = j.acquire_lock("prod", &this_process_holder()).unwrap();
        lock.heartbeat().unwrap();
    }

    #[test]
    fn stale_lock_is_taken_over_and_old_holder_learns_it_lost() {
        let j = Journal::open_in_memory().unwrap();
        // A live pid on another host: only the heartbeat can tell it is gone.
        let first = j.acquire_lock("prod", "dave@other-host:1").unwrap();
        j.conn()
            .execute(
                "UPDATE locks SET heartbeat_ms = ?1",
                [now_ms() - (LOCK_STALE_SECS as i64 + 5) * 1000],
            )
            .unwrap();
        let second = j.acquire_lock("prod", &this_process_holder()).unwrap();
        assert!(matches!(
            first.heartbeat(),
            Err(JournalError::LockLost { .. })
        ));
        // Dropping the superseded lock must not release the new holder's lock.
        drop(first);
        second.heartbeat().unwrap();
        assert!(matches!(
            j.acquire_lock("prod", "x@other-host:2"),
            Err(JournalError::Locked { .. })
        ));
    }

    #[test]
    fn takeover_decisions() {
        let now = 1_000_000_000;
        let fresh = now - 1_000;
        let stale = now - (LOCK_STALE_SECS as i64 + 1) * 1000;
        let alive = |_| true;
        let dead = |_| false;
        assert_eq!(takeover("a@h:10", fresh, now, "h", alive), Takeover::Refuse);
        assert_eq!(
            takeover("a@h:10", fresh, now, "h", dead),
            Takeover::DeadHolder
        );
        assert_eq!(takeover("a@g:10", fresh, now, "h", dead), Takeover::Refuse);
        assert_eq!(takeover("a@g:10", stale, now, "h", alive), Takeover::Stale);
        assert_eq!(takeover("garbage", fresh, now, "h", dead), Takeover::Refuse);
        assert_eq!(parse_holder("a@h.example:42"), Some(("h.example", 42)));
        assert_eq!(parse_holder("h:42"), Some(("h", 42)));
        assert_eq!(parse_holder("a@h:x"), None);
        assert_eq!(parse_holder("a@h:0"), None);
        assert_eq!(parse_holder("a@:5"), None);
    }

    #[test]
    fn two_journals_on_one_file_never_both_hold_the_lock() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal.db");
        Journal::open(&path).unwrap();
        let held = Arc::new(AtomicBool::new(false));
        let wins = Arc::new(AtomicU32::new(0));
        let threads: Vec<_> = (0..2)
            .map(|i| {
                let (path, held, wins) = (path.clone(), held.clone(), wins.clone());
                std::thread::spawn(move || {
                    let j = Journal::open(&path).unwrap();
                    let holder = format!("{}-{i}", this_process_holder());
                    for _ in 0..40 {
                        match j.acquire_lock("prod", &holder) {
                            Ok(lock) => {
                                assert!(!held.swap(true, Ordering::SeqCst), "both hold the lock");
                                wins.fetch_add(1, Ordering::SeqCst);
                                std::thread::sleep(Duration::from_millis(2));
                                held.store(false, Ordering::SeqCst);
                                lock.release().unwrap();
                            }
                            Err(JournalError::Locked { .. }) => {}
                            Err(e) => panic!("{e}"),
                        }
                        std::thread::sleep(Duration::from_millis(1));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert!(wins.load(Ordering::SeqCst) > 0);
    }
}
