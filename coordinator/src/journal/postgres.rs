//! The journal in a shared PostgreSQL database, so several coordinators (and every admin's `status`)
//! see the same runs. The sync client runs its own small runtime and must not be driven from a tokio
//! worker, so every connection lives on one dedicated thread (an actor): callers send it jobs and
//! wait for the answer. Cluster locks are session-level advisory locks, each on a connection of its
//! own, which the server frees the moment that session ends.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, mpsc};
use std::time::Duration;

use ::postgres::config::SslMode;
use ::postgres::{Client, Config, NoTls, Row};
use sha2::{Digest, Sha256};

use super::sql;
use super::{
    ClusterLock, JournalError, LockInner, NewRun, RawRun, RawStep, RunId, RunRecord, RunResult,
    StepId, StepOutcome, StepRecord, now_ms,
};

/// Key of the transaction-level advisory lock that serializes schema migrations ("bbupgrad").
const MIGRATION_LOCK_KEY: i64 = 0x6262_7570_6772_6164;
/// How long a connection attempt may take before the journal call fails.
const CONNECT_TIMEOUT_SECS: u64 = 10;

/// Schema migrations; entry `i` takes `schema_version.version` from `i` to `i + 1`. Append, never
/// edit. The same tables as SQLite's, in PostgreSQL's words.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE runs (
    id           BIGSERIAL PRIMARY KEY,
    cluster      TEXT    NOT NULL,
    kind         TEXT    NOT NULL CHECK (kind IN ('upgrade', 'rollback')),
    from_version TEXT    NOT NULL,
    to_version   TEXT    NOT NULL,
    plan_json    TEXT    NOT NULL,
    options_json TEXT    NOT NULL,
    actor        TEXT    NOT NULL,
    started_ms   BIGINT  NOT NULL,
    ended_ms     BIGINT,
    result       TEXT    CHECK (result IN ('upgraded', 'rolled_back', 'halted', 'refused')),
    error        TEXT
);
CREATE INDEX runs_by_cluster ON runs (cluster, id);

CREATE TABLE steps (
    id         BIGSERIAL PRIMARY KEY,
    run_id     BIGINT  NOT NULL REFERENCES runs (id),
    node       TEXT,
    step       TEXT    NOT NULL,
    started_ms BIGINT  NOT NULL,
    ended_ms   BIGINT,
    outcome    TEXT    CHECK (outcome IN ('ok', 'failed')),
    error      TEXT,
    detail     TEXT    NOT NULL,
    end_detail TEXT,
    actor      TEXT    NOT NULL
);
CREATE INDEX steps_by_run ON steps (run_id, id);

CREATE TABLE run_state (
    run_id     BIGINT  NOT NULL REFERENCES runs (id),
    key        TEXT    NOT NULL,
    value      TEXT    NOT NULL,
    updated_ms BIGINT  NOT NULL,
    PRIMARY KEY (run_id, key)
);

CREATE TABLE locks (
    cluster      TEXT    PRIMARY KEY,
    holder       TEXT    NOT NULL,
    token        TEXT    NOT NULL,
    acquired_ms  BIGINT  NOT NULL,
    heartbeat_ms BIGINT  NOT NULL
);
"#,
    r#"
CREATE TABLE fleet_runs (
    id           BIGSERIAL PRIMARY KEY,
    to_version   TEXT    NOT NULL,
    options_json TEXT    NOT NULL,
    actor        TEXT    NOT NULL,
    started_ms   BIGINT  NOT NULL,
    ended_ms     BIGINT,
    result       TEXT    CHECK (result IN ('upgraded', 'incomplete', 'halted')),
    error        TEXT
);

CREATE TABLE fleet_clusters (
    fleet_run      BIGINT  NOT NULL REFERENCES fleet_runs (id),
    cluster        TEXT    NOT NULL,
    position       BIGINT  NOT NULL,
    state          TEXT    NOT NULL
                   CHECK (state IN ('pending', 'running', 'upgraded', 'failed', 'skipped')),
    reason         TEXT,
    cluster_run_id BIGINT  REFERENCES runs (id),
    started_ms     BIGINT,
    ended_ms       BIGINT,
    PRIMARY KEY (fleet_run, cluster)
);
"#,
    // Who claimed a fleet's cluster (`user@host:pid`), so several coordinators can share a fleet run.
    r#"
ALTER TABLE fleet_clusters ADD COLUMN claimed_by TEXT;
"#,
    // A cluster already on its line's target is 'up_to_date' (per-line targets).
    r#"
ALTER TABLE fleet_clusters DROP CONSTRAINT IF EXISTS fleet_clusters_state_check;
ALTER TABLE fleet_clusters ADD CONSTRAINT fleet_clusters_state_check
    CHECK (state IN ('pending', 'running', 'upgraded', 'up_to_date', 'failed', 'skipped'));
"#,
];

/// Where and how to connect, checked once; the password is inside `config`, never in `location`.
struct Target {
    config: Config,
    location: String,
    tls: Option<tokio_postgres_rustls::MakeRustlsConnect>,
}

/// A job for the database thread.
type Job = Box<dyn FnOnce(&mut Session) + Send>;

/// What the database thread owns: the journal's connection (reopened after a drop) and one
/// connection per held lock.
struct Session {
    target: Arc<Target>,
    main: Option<Client>,
    locks: HashMap<u64, Client>,
    next_lock: u64,
    no_fsync: bool,
}

/// The PostgreSQL journal; [`super::Journal`] dispatches to it.
pub(crate) struct Db {
    jobs: mpsc::Sender<Job>,
    location: String,
}

/// `url` with its password (in the user part or a `password=` parameter) replaced by `***`.
pub fn redact_url(url: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let mut out = match base.split_once("://") {
        Some((scheme, rest)) => {
            let (authority, path) = match rest.find('/') {
                Some(i) => rest.split_at(i),
                None => (rest, ""),
            };
            let authority = match authority.rsplit_once('@') {
                Some((user, host)) => match user.split_once(':') {
                    Some((name, _password)) => format!("{name}:***@{host}"),
                    None => authority.to_string(),
                },
                None => authority.to_string(),
            };
            format!("{scheme}://{authority}{path}")
        }
        None => base.to_string(),
    };
    if let Some(q) = query {
        let params: Vec<String> = q
            .split('&')
            .map(|p| match p.split_once('=') {
                Some((k, _)) if k == "password" => format!("{k}=***"),
                _ => p.to_string(),
            })
            .collect();
        out.push('?');
        out.push_str(&params.join("&"));
    }
    out
}

/// Decodes `%XX` escapes of a URL parameter (paths such as `/run/secrets/pg%20pw`).
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(hex) = s.get(i + 1..i + 3)
            && let Ok(b) = u8::from_str_radix(hex, 16)
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl Target {
    /// Checks `url`; `env_password` is `PGPASSWORD`, used when neither the URL nor a
    /// `password_file=` gives one.
    fn parse(url: &str, env_password: Option<String>) -> Result<Self, JournalError> {
        let location = redact_url(url);
        let setup = |what: String| JournalError::Setup {
            location: location.clone(),
            what,
        };
        let (base, query) = match url.split_once('?') {
            Some((b, q)) => (b, q),
            None => (url, ""),
        };
        let mut password_file = None;
        let mut root_cert = None;
        let mut kept = Vec::new();
        for p in query.split('&').filter(|p| !p.is_empty()) {
            match p.split_once('=') {
                Some(("password_file", v)) => {
                    password_file = Some(PathBuf::from(percent_decode(v)))
                }
                Some(("sslrootcert", v)) => root_cert = Some(PathBuf::from(percent_decode(v))),
                _ => kept.push(p),
            }
        }
        let cleaned = if kept.is_empty() {
            base.to_string()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        let mut config: Config = cleaned
            .parse()
            .map_err(|e| setup(format!("not a usable PostgreSQL URL: {e}")))?;
        if config.get_password().is_none() {
            if let Some(path) = &password_file {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    setup(format!(
                        "cannot read the password file {}: {e}",
                        path.display()
                    ))
                })?;
                config.password(text.trim_end_matches(['\n', '\r']));
            } else if let Some(pw) = env_password.filter(|p| !p.is_empty()) {
                config.password(pw);
            }
        }
        if config.get_user().is_none() {
            let user = std::env::var("PGUSER")
                .or_else(|_| std::env::var("USER"))
                .unwrap_or_else(|_| "postgres".into());
            config.user(&user);
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(CONNECT_TIMEOUT_SECS));
        }
        if config.get_application_name().is_none() {
            config.application_name("bbupgrade");
        }
        // TLS when the URL asks for it (`sslmode=require`): the server's certificate is verified
        // against the public roots, or `sslrootcert=` for a private CA, and its name checked.
        let tls = match config.get_ssl_mode() {
            SslMode::Require => Some(tls_connector(root_cert.as_deref()).map_err(setup)?),
            _ => {
                config.ssl_mode(SslMode::Disable);
                None
            }
        };
        Ok(Self {
            config,
            location,
            tls,
        })
    }

    fn connect(&self) -> Result<Client, ::postgres::Error> {
        match &self.tls {
            Some(tls) => self.config.connect(tls.clone()),
            None => self.config.connect(NoTls),
        }
    }
}

fn tls_connector(
    root_cert: Option<&std::path::Path>,
) -> Result<tokio_postgres_rustls::MakeRustlsConnect, String> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    match root_cert {
        Some(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| format!("cannot read sslrootcert {}: {e}", path.display()))?;
            for c in certs {
                roots
                    .add(c)
                    .map_err(|e| format!("sslrootcert {}: {e}", path.display()))?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| format!("TLS setup: {e}"))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

impl Session {
    /// The journal's connection, opened again if it dropped.
    fn main(&mut self) -> Result<&mut Client, ::postgres::Error> {
        if self.main.as_ref().is_none_or(|c| c.is_closed()) {
            self.main = None;
            let mut c = self.target.connect()?;
            if self.no_fsync {
                c.batch_execute("SET synchronous_commit = off")?;
            }
            self.main = Some(c);
        }
        Ok(self.main.as_mut().expect("connected just above"))
    }
}

/// The advisory-lock key of a cluster: the first 8 bytes of a SHA-256 of its name.
fn lock_key(cluster: &str) -> i64 {
    let digest = Sha256::digest(format!("bbupgrade-cluster-lock:{cluster}").as_bytes());
    let mut b = [0u8; 8];
    b.copy_from_slice(&digest[..8]);
    i64::from_be_bytes(b)
}

fn thread_gone(location: &str) -> JournalError {
    JournalError::Setup {
        location: location.to_string(),
        what: "the journal's database thread stopped; restart bbupgrade".into(),
    }
}

fn pg_err(location: &str, what: &str) -> impl FnOnce(::postgres::Error) -> JournalError + use<> {
    let (location, what) = (location.to_string(), what.to_string());
    move |source| JournalError::Postgres {
        location,
        what,
        source,
    }
}

/// Sends `f` to the database thread and waits for its answer.
fn send<T: Send + 'static>(
    jobs: &mpsc::Sender<Job>,
    location: &str,
    f: impl FnOnce(&mut Session) -> Result<T, JournalError> + Send + 'static,
) -> Result<T, JournalError> {
    let (tx, rx) = mpsc::sync_channel(1);
    jobs.send(Box::new(move |s| {
        let _ = tx.send(f(s));
    }))
    .map_err(|_| thread_gone(location))?;
    rx.recv().map_err(|_| thread_gone(location))?
}

fn raw_run(r: &Row) -> Result<RawRun, ::postgres::Error> {
    Ok(RawRun {
        id: r.try_get(0)?,
        cluster: r.try_get(1)?,
        kind: r.try_get(2)?,
        from_version: r.try_get(3)?,
        to_version: r.try_get(4)?,
        plan_json: r.try_get(5)?,
        options_json: r.try_get(6)?,
        actor: r.try_get(7)?,
        started_ms: r.try_get(8)?,
        ended_ms: r.try_get(9)?,
        result: r.try_get(10)?,
        error: r.try_get(11)?,
    })
}

fn raw_step(r: &Row) -> Result<RawStep, ::postgres::Error> {
    Ok(RawStep {
        id: r.try_get(0)?,
        run_id: r.try_get(1)?,
        node: r.try_get(2)?,
        step: r.try_get(3)?,
        started_ms: r.try_get(4)?,
        ended_ms: r.try_get(5)?,
        outcome: r.try_get(6)?,
        error: r.try_get(7)?,
        detail: r.try_get(8)?,
        end_detail: r.try_get(9)?,
        actor: r.try_get(10)?,
    })
}

fn migrate(c: &mut Client, location: &str) -> Result<(), JournalError> {
    let err = |what: &str| pg_err(location, what);
    let mut tx = c
        .transaction()
        .map_err(err("starting the schema migration"))?;
    // Two coordinators starting at once: the second waits here, then finds the schema current.
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK_KEY])
        .map_err(err("waiting for another coordinator's schema migration"))?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL)")
        .map_err(err("creating the schema_version table"))?;
    let row = tx
        .query_opt("SELECT version FROM schema_version", &[])
        .map_err(err("reading the schema version"))?;
    let version: i64 = match row {
        Some(r) => r.try_get(0).map_err(err("reading the schema version"))?,
        None => {
            tx.execute("INSERT INTO schema_version (version) VALUES (0)", &[])
                .map_err(err("recording the schema version"))?;
            0
        }
    };
    let known = MIGRATIONS.len() as i64;
    if version > known {
        return Err(JournalError::NewerSchema {
            location: location.to_string(),
            found: version,
            known,
        });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        tx.batch_execute(sql)
            .map_err(err(&format!("applying schema migration {}", i + 1)))?;
    }
    tx.execute("UPDATE schema_version SET version = $1", &[&known])
        .map_err(err("recording the schema version"))?;
    tx.commit()
        .map_err(err("committing the schema migration"))?;
    Ok(())
}

impl Db {
    /// Starts the database thread, connects, and brings the schema up to date.
    pub(crate) fn open(url: &str) -> Result<Self, JournalError> {
        let target = Arc::new(Target::parse(url, std::env::var("PGPASSWORD").ok())?);
        let location = target.location.clone();
        let (jobs, rx) = mpsc::channel::<Job>();
        let mut session = Session {
            target,
            main: None,
            locks: HashMap::new(),
            next_lock: 0,
            no_fsync: false,
        };
        std::thread::Builder::new()
            .name("bbupgrade-journal-pg".into())
            .spawn(move || {
                // Ends when the journal and all its locks are dropped.
                while let Ok(job) = rx.recv() {
                    job(&mut session);
                }
            })
            .map_err(|e| JournalError::Setup {
                location: location.clone(),
                what: format!("cannot start the journal's database thread: {e}"),
            })?;
        let db = Self { jobs, location };
        let loc = db.location.clone();
        send(&db.jobs, &db.location, move |s| {
            let c = s.main().map_err(pg_err(
                &loc,
                "connecting; check the URL, the password and that the server runs",
            ))?;
            migrate(c, &loc)
        })?;
        Ok(db)
    }

    pub(crate) fn location(&self) -> &str {
        &self.location
    }

    /// Runs `f` on the journal's connection (reconnecting first if it dropped).
    pub(crate) fn call<T: Send + 'static>(
        &self,
        what: impl Into<String>,
        f: impl FnOnce(&mut Client) -> Result<T, ::postgres::Error> + Send + 'static,
    ) -> Result<T, JournalError> {
        let what = what.into();
        let location = self.location.clone();
        send(&self.jobs, &self.location, move |s| {
            s.main().and_then(f).map_err(pg_err(&location, &what))
        })
    }

    pub(crate) fn commit_without_fsync(&self) -> Result<(), JournalError> {
        let location = self.location.clone();
        send(&self.jobs, &self.location, move |s| {
            s.no_fsync = true;
            s.main()
                .and_then(|c| c.batch_execute("SET synchronous_commit = off"))
                .map_err(pg_err(&location, "setting synchronous_commit = off"))
        })
    }

    fn no_such_run(&self, run: RunId) -> JournalError {
        JournalError::NoSuchRun {
            location: self.location.clone(),
            run,
        }
    }

    pub(crate) fn create_run(&self, new: &NewRun) -> Result<RunId, JournalError> {
        let new = new.clone();
        let what = format!("recording a new run on cluster {}", new.cluster);
        self.call(what, move |c| {
            let row = c.query_one(
                sql::INSERT_RUN,
                &[
                    &new.cluster,
                    &new.kind.as_str(),
                    &new.from_version,
                    &new.to_version,
                    &new.plan_json,
                    &new.options_json,
                    &new.actor,
                    &now_ms(),
                ],
            )?;
            Ok(RunId(row.try_get(0)?))
        })
    }

    pub(crate) fn run(&self, id: RunId) -> Result<RunRecord, JournalError> {
        let raw = self.call(format!("reading run {id}"), move |c| {
            c.query_opt(sql::RUN_BY_ID, &[&id.0])?
                .map(|r| raw_run(&r))
                .transpose()
        })?;
        match raw {
            Some(raw) => raw.into_record(&self.location),
            None => Err(self.no_such_run(id)),
        }
    }

    pub(crate) fn open_run(&self, cluster: &str) -> Result<Option<RunRecord>, JournalError> {
        self.one_run(
            cluster,
            sql::OPEN_RUN,
            format!("looking for an open run on cluster {cluster}"),
        )
    }

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
        statement: &'static str,
        what: String,
    ) -> Result<Option<RunRecord>, JournalError> {
        let cluster = cluster.to_string();
        let raw = self.call(what, move |c| {
            c.query_opt(statement, &[&cluster])?
                .map(|r| raw_run(&r))
                .transpose()
        })?;
        raw.map(|r| r.into_record(&self.location)).transpose()
    }

    /// The latest `limit` runs on `cluster`, newest first.
    pub(crate) fn recent_runs(
        &self,
        cluster: &str,
        limit: u32,
    ) -> Result<Vec<RunRecord>, JournalError> {
        let cluster = cluster.to_string();
        let raws = self.call(
            format!("reading the latest runs on cluster {cluster}"),
            move |c| {
                c.query(sql::RECENT_RUNS, &[&cluster, &i64::from(limit)])?
                    .iter()
                    .map(raw_run)
                    .collect::<Result<Vec<_>, _>>()
            },
        )?;
        raws.into_iter()
            .map(|r| r.into_record(&self.location))
            .collect()
    }

    pub(crate) fn begin_step(
        &self,
        run: RunId,
        node: Option<&str>,
        step: &str,
        detail: &str,
    ) -> Result<StepId, JournalError> {
        let (node, step_name, detail) = (
            node.map(str::to_string),
            step.to_string(),
            detail.to_string(),
        );
        let id = self.call(
            format!("recording the start of step {step} of run {run}"),
            move |c| {
                c.query_opt(
                    sql::BEGIN_STEP,
                    &[&run.0, &node, &step_name, &now_ms(), &detail],
                )?
                .map(|r| r.try_get::<_, i64>(0))
                .transpose()
            },
        )?;
        id.map(StepId).ok_or_else(|| self.no_such_run(run))
    }

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
        let detail = detail.to_string();
        let updated = self.call(format!("recording the end of step {step}"), move |c| {
            c.execute(sql::END_STEP, &[&step.0, &now_ms(), &word, &error, &detail])
        })?;
        if updated == 0 {
            return Err(super::bad(&self.location, "steps.id", &step.to_string()));
        }
        Ok(())
    }

    pub(crate) fn steps(&self, run: RunId) -> Result<Vec<StepRecord>, JournalError> {
        let raws = self.call(format!("reading the steps of run {run}"), move |c| {
            c.query(sql::STEPS_OF_RUN, &[&run.0])?
                .iter()
                .map(raw_step)
                .collect::<Result<Vec<_>, _>>()
        })?;
        raws.into_iter()
            .map(|r| r.into_record(&self.location))
            .collect()
    }

    pub(crate) fn finish_run(
        &self,
        run: RunId,
        result: RunResult,
        error: Option<&str>,
    ) -> Result<(), JournalError> {
        let error = error.map(str::to_string);
        let updated = self.call(format!("recording the end of run {run}"), move |c| {
            c.execute(
                sql::FINISH_RUN,
                &[&run.0, &now_ms(), &result.as_str(), &error],
            )
        })?;
        if updated == 0 {
            return Err(self.no_such_run(run));
        }
        Ok(())
    }

    pub(crate) fn set_run_state(
        &self,
        run: RunId,
        key: &str,
        value: &str,
    ) -> Result<(), JournalError> {
        let (k, v) = (key.to_string(), value.to_string());
        self.call(format!("recording {key} for run {run}"), move |c| {
            c.execute(sql::SET_RUN_STATE, &[&run.0, &k, &v, &now_ms()])
                .map(|_| ())
        })
    }

    pub(crate) fn get_run_state(
        &self,
        run: RunId,
        key: &str,
    ) -> Result<Option<String>, JournalError> {
        let k = key.to_string();
        self.call(format!("reading {key} of run {run}"), move |c| {
            c.query_opt(sql::GET_RUN_STATE, &[&run.0, &k])?
                .map(|r| r.try_get(0))
                .transpose()
        })
    }

    /// A session-level advisory lock on a new connection kept for the lock alone: if this process
    /// dies or the connection drops, the server ends the session and frees the cluster. The `locks`
    /// row only says who holds it, for messages and `status`.
    pub(crate) fn acquire_lock(
        &self,
        cluster: &str,
        holder: &str,
    ) -> Result<ClusterLock, JournalError> {
        let key = lock_key(cluster);
        let token = uuid::Uuid::new_v4().to_string();
        let (location, c_name, h, t) = (
            self.location.clone(),
            cluster.to_string(),
            holder.to_string(),
            token.clone(),
        );
        let id = send(&self.jobs, &self.location, move |s| {
            let what = format!("taking the lock on cluster {c_name}");
            let err = || pg_err(&location, &what);
            let mut client = s.target.connect().map_err(err())?;
            let got: bool = client
                .query_one("SELECT pg_try_advisory_lock($1)", &[&key])
                .and_then(|r| r.try_get(0))
                .map_err(err())?;
            if !got {
                let row = client
                    .query_opt(sql::LOCK_HOLDER, &[&c_name])
                    .map_err(err())?;
                let (holder, since_ms) = match row {
                    Some(r) => (r.try_get(0).map_err(err())?, r.try_get(1).map_err(err())?),
                    None => ("another bbupgrade (not yet recorded)".to_string(), now_ms()),
                };
                return Err(JournalError::Locked {
                    cluster: c_name,
                    holder,
                    since_ms,
                });
            }
            client
                .execute(sql::WRITE_LOCK, &[&c_name, &h, &t, &now_ms()])
                .map_err(err())?;
            let id = s.next_lock;
            s.next_lock += 1;
            s.locks.insert(id, client);
            Ok(id)
        })?;
        Ok(ClusterLock {
            inner: LockInner::Postgres(Lock {
                jobs: self.jobs.clone(),
                location: self.location.clone(),
                cluster: cluster.to_string(),
                token,
                key,
                id,
                released: false,
            }),
        })
    }
}

/// An advisory lock held on its own session by the database thread.
pub(crate) struct Lock {
    jobs: mpsc::Sender<Job>,
    location: String,
    cluster: String,
    token: String,
    key: i64,
    id: u64,
    released: bool,
}

impl Lock {
    pub(crate) fn cluster(&self) -> &str {
        &self.cluster
    }

    /// Checks the session still holds the advisory lock (a dropped connection loses it).
    pub(crate) fn heartbeat(&self) -> Result<(), JournalError> {
        let (id, cluster, token) = (self.id, self.cluster.clone(), self.token.clone());
        let (hi, lo) = (
            (self.key as u64 >> 32) as i64,
            (self.key as u64 & 0xffff_ffff) as i64,
        );
        send(&self.jobs, &self.location, move |s| {
            let lost = || JournalError::LockLost {
                cluster: cluster.clone(),
            };
            let Some(c) = s.locks.get_mut(&id) else {
                return Err(lost());
            };
            let held = c
                .query_one(
                    "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' \
                     AND pid = pg_backend_pid() AND granted AND classid::bigint = $1 \
                     AND objid::bigint = $2 AND objsubid = 1)",
                    &[&hi, &lo],
                )
                .and_then(|r| r.try_get::<_, bool>(0))
                .unwrap_or(false);
            if !held {
                s.locks.remove(&id);
                return Err(lost());
            }
            // Best effort: the row is only for messages; the advisory lock is what counts.
            let _ = c.execute(sql::LOCK_HEARTBEAT, &[&cluster, &token, &now_ms()]);
            Ok(())
        })
    }

    pub(crate) fn release(mut self) -> Result<(), JournalError> {
        self.released = true;
        self.unlock()
    }

    fn unlock(&self) -> Result<(), JournalError> {
        let (id, key, cluster, token) =
            (self.id, self.key, self.cluster.clone(), self.token.clone());
        let location = self.location.clone();
        send(&self.jobs, &self.location, move |s| {
            // Closing the session frees the lock whatever happens below.
            let Some(mut c) = s.locks.remove(&id) else {
                return Ok(());
            };
            let what = format!("releasing the lock on cluster {cluster}");
            c.execute(sql::DELETE_LOCK, &[&cluster, &token])
                .and_then(|_| c.execute("SELECT pg_advisory_unlock($1)", &[&key]))
                .map(|_| ())
                .map_err(pg_err(&location, &what))
        })
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        if !self.released
            && let Err(e) = self.unlock()
        {
            tracing::warn!(error = %e, "could not release the cluster lock cleanly; closing its session frees it");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact_url("postgres://bb:s3cret@db.example:5432/journal?sslmode=require"),
            "postgres://bb:***@db.example:5432/journal?sslmode=require"
        );
        assert_eq!(
            redact_url("postgresql://bb@db/j?password=x&password_file=/run/pw"),
            "postgresql://bb@db/j?password=***&password_file=/run/pw"
        );
        assert_eq!(
            redact_url("postgres:///j?host=/tmp"),
            "postgres:///j?host=/tmp"
        );
    }

    #[test]
    fn password_comes_from_url_then_file_then_environment() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pw");
        std::fs::write(&file, "from-file\n").unwrap();
        let t = Target::parse(
            &format!("postgres://bb@db/j?password_file={}", file.display()),
            Some("from-env".into()),
        )
        .unwrap();
        assert_eq!(t.config.get_password(), Some(&b"from-file"[..]));
        assert!(!t.location.contains("from-file"));
        let t = Target::parse("postgres://bb:inline@db/j", Some("from-env".into())).unwrap();
        assert_eq!(t.config.get_password(), Some(&b"inline"[..]));
        assert_eq!(t.location, "postgres://bb:***@db/j");
        let t = Target::parse("postgres://bb@db/j", Some("from-env".into())).unwrap();
        assert_eq!(t.config.get_password(), Some(&b"from-env"[..]));
        assert!(t.tls.is_none());
        let t = Target::parse("postgres://bb@db/j?sslmode=require", None).unwrap();
        assert!(t.tls.is_some());
        let err = Target::parse("postgres://bb@db/j?password_file=/nonexistent/pw", None)
            .err()
            .unwrap();
        assert!(err.to_string().contains("/nonexistent/pw"), "{err}");
        let err = Target::parse("postgres://bb:pw@db/j?bogus=1", None)
            .err()
            .unwrap();
        assert!(!err.to_string().contains(":pw@"), "{err}");
    }

    #[test]
    fn lock_keys_differ_per_cluster_and_are_stable() {
        assert_eq!(lock_key("prod"), lock_key("prod"));
        assert_ne!(lock_key("prod"), lock_key("staging"));
    }
}
