//! The coordinator's journal: runs, their steps before and after each runs, resume facts, and the
//! per-cluster lock, behind one interface with two backends: an embedded SQLite file (the default,
//! `sqlite.rs`) and a shared PostgreSQL database (`postgres.rs`) several coordinators can use at once.

mod postgres;
pub(crate) mod sql;
mod sqlite;

use std::fmt;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

pub use postgres::redact_url;

/// A lock whose heartbeat is older than this is abandoned and may be taken over.
pub const LOCK_STALE_SECS: u64 = 30;
/// How often a lock holder should call [`ClusterLock::heartbeat`].
pub const LOCK_HEARTBEAT_SECS: u64 = 10;

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
    #[error("journal {location}: {what}: {source}")]
    Postgres {
        location: String,
        what: String,
        #[source]
        source: ::postgres::Error,
    },
    /// A PostgreSQL URL or password source that cannot be used; says what to fix.
    #[error("journal {location}: {what}")]
    Setup { location: String, what: String },
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RunResult {
    Upgraded,
    RolledBack,
    /// Also what a summary says until the run's end is known: nothing is claimed.
    #[default]
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

/// The journal; share it behind an `Arc`. Calls block briefly (SQLite's disk, or a round trip to
/// PostgreSQL on the journal's own thread): from async code, prefer `spawn_blocking` for anything
/// in a loop.
pub struct Journal {
    backend: Backend,
}

enum Backend {
    Sqlite(sqlite::Db),
    Postgres(postgres::Db),
}

impl fmt::Debug for Journal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Journal")
            .field("location", &self.location())
            .finish()
    }
}

/// Forwards a call to whichever backend holds the journal.
macro_rules! dispatch {
    ($self:ident . $method:ident ( $($arg:expr),* )) => {
        match &$self.backend {
            Backend::Sqlite(db) => db.$method($($arg),*),
            Backend::Postgres(db) => db.$method($($arg),*),
        }
    };
}

impl Journal {
    /// Opens (creating if needed) a journal file and brings its schema up to date.
    pub fn open(path: &Path) -> Result<Self, JournalError> {
        Ok(Self {
            backend: Backend::Sqlite(sqlite::Db::open(path)?),
        })
    }

    /// A journal that lives only as long as this value; for tests and `--state :memory:`.
    pub fn open_in_memory() -> Result<Self, JournalError> {
        Ok(Self {
            backend: Backend::Sqlite(sqlite::Db::open_in_memory()?),
        })
    }

    /// Connects to a shared journal in PostgreSQL (`postgres://user@host/db?sslmode=require`) and
    /// brings its schema up to date; two coordinators may do this at once. The password comes from
    /// the URL, a `password_file=PATH` parameter, or `PGPASSWORD`; it never appears in messages.
    pub fn open_postgres(url: &str) -> Result<Self, JournalError> {
        Ok(Self {
            backend: Backend::Postgres(postgres::Db::open(url)?),
        })
    }

    /// Where the journal lives, for messages (a PostgreSQL URL without its password).
    pub fn location(&self) -> &str {
        dispatch!(self.location())
    }

    /// Whether this journal is shared in PostgreSQL (rather than a local SQLite file).
    pub fn is_shared(&self) -> bool {
        matches!(self.backend, Backend::Postgres(_))
    }

    /// Commits without waiting for the disk (SQLite `synchronous = NORMAL` in WAL mode): a commit
    /// still survives the coordinator's crash or kill, which is what a resume needs; only a power
    /// cut or kernel crash may lose the last commits, and repeating those steps is harmless (agent
    /// operations carry ids). Fleet runs use it: thousands of journaled steps, one fsync each, would
    /// otherwise be the bottleneck. PostgreSQL: the session's `synchronous_commit = off`, the same
    /// trade.
    pub fn commit_without_fsync(&self) -> Result<(), JournalError> {
        dispatch!(self.commit_without_fsync())
    }

    /// Runs `sqlite` on the SQLite connection, or `pg` on the PostgreSQL one, for tables another
    /// module owns (the fleet's). Short work only, never across an await.
    pub(crate) fn with_backend<T: Send + 'static>(
        &self,
        what: impl Into<String>,
        sqlite: impl FnOnce(&mut rusqlite::Connection) -> rusqlite::Result<T>,
        pg: impl FnOnce(&mut ::postgres::Client) -> Result<T, ::postgres::Error> + Send + 'static,
    ) -> Result<T, JournalError> {
        match &self.backend {
            Backend::Sqlite(db) => db.with_conn(what, sqlite),
            Backend::Postgres(db) => db.call(what, pg),
        }
    }

    /// Runs one statement of [`sql`] (written once for both backends) with `args`; the number
    /// of rows changed.
    pub(crate) fn execute(
        &self,
        what: impl Into<String>,
        statement: &'static str,
        args: Vec<sql::Arg>,
    ) -> Result<usize, JournalError> {
        let pg = args.clone();
        self.with_backend(
            what,
            |c| c.execute(&sql::sqlite(statement), rusqlite::params_from_iter(&args)),
            move |c| c.execute(statement, &sql::pg_args(&pg)).map(|n| n as usize),
        )
    }

    /// Replaces a run's recorded options (`resume` with a corrected archive).
    pub fn set_run_options(&self, run: RunId, options_json: &str) -> Result<(), JournalError> {
        let changed = self.execute(
            format!("recording new options for run {run}"),
            sql::SET_RUN_OPTIONS,
            vec![run.0.into(), options_json.into()],
        )?;
        if changed == 0 {
            return Err(JournalError::NoSuchRun {
                location: self.location().to_string(),
                run,
            });
        }
        Ok(())
    }

    /// Records a new open run.
    pub fn create_run(&self, new: &NewRun) -> Result<RunId, JournalError> {
        dispatch!(self.create_run(new))
    }

    pub fn run(&self, id: RunId) -> Result<RunRecord, JournalError> {
        dispatch!(self.run(id))
    }

    /// The latest run on `cluster` that has not finished, if any.
    pub fn open_run(&self, cluster: &str) -> Result<Option<RunRecord>, JournalError> {
        dispatch!(self.open_run(cluster))
    }

    /// The latest run on `cluster`, finished or not.
    pub fn latest_run(&self, cluster: &str) -> Result<Option<RunRecord>, JournalError> {
        dispatch!(self.latest_run(cluster))
    }

    /// The latest `limit` runs on `cluster`, newest first (the audit trail `status` shows).
    pub fn recent_runs(&self, cluster: &str, limit: u32) -> Result<Vec<RunRecord>, JournalError> {
        dispatch!(self.recent_runs(cluster, limit))
    }

    /// Records that a step is about to run (`node` is `None` for cluster-wide steps).
    pub fn begin_step(
        &self,
        run: RunId,
        node: Option<&str>,
        step: &str,
        detail: &str,
    ) -> Result<StepId, JournalError> {
        dispatch!(self.begin_step(run, node, step, detail))
    }

    /// Records how a step ended.
    pub fn end_step(
        &self,
        step: StepId,
        outcome: StepOutcome,
        detail: &str,
    ) -> Result<(), JournalError> {
        dispatch!(self.end_step(step, outcome, detail))
    }

    /// A run's steps in the order they began.
    pub fn steps(&self, run: RunId) -> Result<Vec<StepRecord>, JournalError> {
        dispatch!(self.steps(run))
    }

    /// Closes a run with its result.
    pub fn finish_run(
        &self,
        run: RunId,
        result: RunResult,
        error: Option<&str>,
    ) -> Result<(), JournalError> {
        dispatch!(self.finish_run(run, result, error))
    }

    /// Remembers a small fact a resume needs (e.g. `upgrade_mode_enabled_by_us` = `true`).
    pub fn set_run_state(&self, run: RunId, key: &str, value: &str) -> Result<(), JournalError> {
        dispatch!(self.set_run_state(run, key, value))
    }

    pub fn get_run_state(&self, run: RunId, key: &str) -> Result<Option<String>, JournalError> {
        dispatch!(self.get_run_state(run, key))
    }

    /// Takes the cluster's lock for `holder` (`user@host:pid`). SQLite: a lock held by a dead
    /// process on this host, or whose heartbeat is older than [`LOCK_STALE_SECS`], is taken over.
    /// PostgreSQL: a session-level advisory lock on a connection of its own, freed by the server
    /// the moment its holder's session ends (process killed, connection lost).
    pub fn acquire_lock(&self, cluster: &str, holder: &str) -> Result<ClusterLock, JournalError> {
        dispatch!(self.acquire_lock(cluster, holder))
    }
}

/// The cluster's lock; keep it alive with [`ClusterLock::heartbeat`], released when dropped.
pub struct ClusterLock {
    inner: LockInner,
}

enum LockInner {
    Sqlite(sqlite::Lock),
    Postgres(postgres::Lock),
}

impl fmt::Debug for ClusterLock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterLock")
            .field("cluster", &self.cluster())
            .finish()
    }
}

impl ClusterLock {
    pub fn cluster(&self) -> &str {
        match &self.inner {
            LockInner::Sqlite(l) => l.cluster(),
            LockInner::Postgres(l) => l.cluster(),
        }
    }

    /// Proves the holder is alive; call every [`LOCK_HEARTBEAT_SECS`]. `LockLost` if another process
    /// took the lock over meanwhile, or (PostgreSQL) the session holding it ended: stop working on
    /// the cluster then.
    pub fn heartbeat(&self) -> Result<(), JournalError> {
        match &self.inner {
            LockInner::Sqlite(l) => l.heartbeat(),
            LockInner::Postgres(l) => l.heartbeat(),
        }
    }

    /// Releases the lock now, reporting failure (dropping releases too, but can only log).
    pub fn release(self) -> Result<(), JournalError> {
        match self.inner {
            LockInner::Sqlite(l) => l.release(),
            LockInner::Postgres(l) => l.release(),
        }
    }
}

/// A run's row as stored, before its words are checked.
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
    fn into_record(self, location: &str) -> Result<RunRecord, JournalError> {
        let kind =
            RunKind::parse(&self.kind).ok_or_else(|| bad(location, "runs.kind", &self.kind))?;
        let result = match self.result {
            None => None,
            Some(r) => Some(RunResult::parse(&r).ok_or_else(|| bad(location, "runs.result", &r))?),
        };
        Ok(RunRecord {
            id: RunId(self.id),
            cluster: self.cluster,
            kind,
            from_version: self.from_version,
            to_version: self.to_version,
            plan_json: self.plan_json,
            options_json: self.options_json,
            actor: self.actor,
            started_ms: self.started_ms,
            ended_ms: self.ended_ms,
            result,
            error: self.error,
        })
    }
}

/// A step's row as stored, before its words are checked.
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
    fn into_record(self, location: &str) -> Result<StepRecord, JournalError> {
        let outcome = match (self.outcome.as_deref(), self.error) {
            (None, _) => None,
            (Some("ok"), _) => Some(StepOutcome::Ok),
            (Some("failed"), e) => Some(StepOutcome::Failed(e.unwrap_or_default())),
            (Some(other), _) => return Err(bad(location, "steps.outcome", other)),
        };
        Ok(StepRecord {
            id: StepId(self.id),
            run: RunId(self.run_id),
            node: self.node,
            step: self.step,
            started_ms: self.started_ms,
            ended_ms: self.ended_ms,
            outcome,
            detail: self.detail,
            end_detail: self.end_detail,
            actor: self.actor,
        })
    }
}

fn bad(location: &str, column: &'static str, value: &str) -> JournalError {
    JournalError::BadValue {
        location: location.to_string(),
        column,
        value: value.to_string(),
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

pub(crate) fn local_hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its whole length; gethostname writes at most that much.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let len = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    match std::str::from_utf8(&buf[..len]) {
        Ok(name) if rc == 0 && !name.is_empty() => name.to_string(),
        _ => "localhost".to_string(),
    }
}

pub(crate) fn pid_alive(pid: i32) -> bool {
    use nix::errno::Errno;
    match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None) {
        Ok(()) => true,
        // EPERM: it exists but belongs to someone else.
        Err(Errno::EPERM) => true,
        Err(_) => false,
    }
}

/// Unix time in milliseconds.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// A journal time (Unix milliseconds) as RFC 3339, for people reading the journal.
pub fn format_ms(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("{ms} ms after the epoch"))
}

/// The journal file used when neither `--state` nor the inventory names one.
pub const DEFAULT_JOURNAL_FILE: &str = "bbupgrade-journal.db";

/// The journal named by `--state`, the inventory, or the default file: `postgres://...`,
/// `sqlite:PATH` or a path.
pub fn open_journal(state: Option<&str>, inventory_state: Option<&str>) -> anyhow::Result<Journal> {
    use anyhow::Context;
    let spec = state.or(inventory_state).unwrap_or(DEFAULT_JOURNAL_FILE);
    if spec.starts_with("postgres://") || spec.starts_with("postgresql://") {
        // The password may be in the URL: name the journal only by its redacted form.
        let location = redact_url(spec);
        return Journal::open_postgres(spec)
            .with_context(|| format!("opening the shared journal {location}"));
    }
    let path = Path::new(spec.strip_prefix("sqlite:").unwrap_or(spec));
    Journal::open(path).with_context(|| format!("opening the journal {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rusqlite::Connection;

    fn sqlite_conn(j: &Journal) -> std::sync::MutexGuard<'_, Connection> {
        match &j.backend {
            Backend::Sqlite(db) => db.conn(),
            Backend::Postgres(_) => panic!("not a SQLite journal"),
        }
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
        sqlite_conn(&j)
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
}
