//! The SQL both journal backends run, written once where SQLite and PostgreSQL accept the same
//! statement (the schema's types, locking and migrations differ and stay with each backend).
//! Placeholders are PostgreSQL's `$N`; [`sqlite`] turns them into SQLite's `?N`, which bind by
//! number as `$N` does (SQLite reads `$1` as a name, bound in order of first appearance).

use std::borrow::Cow;

macro_rules! run_columns {
    () => {
        "id, cluster, kind, from_version, to_version, plan_json, options_json, actor, started_ms, \
         ended_ms, result, error"
    };
}

macro_rules! step_columns {
    () => {
        "id, run_id, node, step, started_ms, ended_ms, outcome, error, detail, end_detail, actor"
    };
}

macro_rules! fleet_run_columns {
    () => {
        "id, to_version, options_json, actor, started_ms, ended_ms, result, error"
    };
}

pub(crate) const INSERT_RUN: &str = "INSERT INTO runs (cluster, kind, from_version, to_version, \
     plan_json, options_json, actor, started_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
     RETURNING id";
pub(crate) const RUN_BY_ID: &str = concat!("SELECT ", run_columns!(), " FROM runs WHERE id = $1");
pub(crate) const OPEN_RUN: &str = concat!(
    "SELECT ",
    run_columns!(),
    " FROM runs WHERE cluster = $1 AND result IS NULL ORDER BY id DESC LIMIT 1"
);
pub(crate) const LATEST_RUN: &str = concat!(
    "SELECT ",
    run_columns!(),
    " FROM runs WHERE cluster = $1 ORDER BY id DESC LIMIT 1"
);
pub(crate) const RECENT_RUNS: &str = concat!(
    "SELECT ",
    run_columns!(),
    " FROM runs WHERE cluster = $1 ORDER BY id DESC LIMIT $2"
);
pub(crate) const FINISH_RUN: &str =
    "UPDATE runs SET ended_ms = $2, result = $3, error = $4 WHERE id = $1";
/// Inserts nothing when the run does not exist.
pub(crate) const BEGIN_STEP: &str = "INSERT INTO steps (run_id, node, step, started_ms, detail, \
     actor) SELECT id, $2, $3, $4, $5, actor FROM runs WHERE id = $1 RETURNING id";
pub(crate) const END_STEP: &str = "UPDATE steps SET ended_ms = $2, outcome = $3, error = $4, \
     end_detail = $5 WHERE id = $1";
pub(crate) const STEPS_OF_RUN: &str = concat!(
    "SELECT ",
    step_columns!(),
    " FROM steps WHERE run_id = $1 ORDER BY id"
);
pub(crate) const SET_RUN_OPTIONS: &str = "UPDATE runs SET options_json = $2 WHERE id = $1";
pub(crate) const SET_RUN_STATE: &str = "INSERT INTO run_state (run_id, key, value, updated_ms) \
     VALUES ($1, $2, $3, $4) ON CONFLICT (run_id, key) DO UPDATE SET value = EXCLUDED.value, \
     updated_ms = EXCLUDED.updated_ms";
pub(crate) const GET_RUN_STATE: &str = "SELECT value FROM run_state WHERE run_id = $1 AND key = $2";

pub(crate) const LOCK_HOLDER: &str =
    "SELECT holder, acquired_ms, heartbeat_ms FROM locks WHERE cluster = $1";
pub(crate) const WRITE_LOCK: &str = "INSERT INTO locks (cluster, holder, token, acquired_ms, \
     heartbeat_ms) VALUES ($1, $2, $3, $4, $4) ON CONFLICT (cluster) DO UPDATE SET \
     holder = EXCLUDED.holder, token = EXCLUDED.token, acquired_ms = EXCLUDED.acquired_ms, \
     heartbeat_ms = EXCLUDED.heartbeat_ms";
pub(crate) const LOCK_HEARTBEAT: &str =
    "UPDATE locks SET heartbeat_ms = $3 WHERE cluster = $1 AND token = $2";
pub(crate) const DELETE_LOCK: &str = "DELETE FROM locks WHERE cluster = $1 AND token = $2";

pub(crate) const INSERT_FLEET_RUN: &str = "INSERT INTO fleet_runs (to_version, options_json, \
     actor, started_ms) VALUES ($1, $2, $3, $4) RETURNING id";
pub(crate) const INSERT_FLEET_CLUSTER: &str = "INSERT INTO fleet_clusters (fleet_run, cluster, \
     position, state) VALUES ($1, $2, $3, 'pending')";
pub(crate) const FLEET_RUN_BY_ID: &str = concat!(
    "SELECT ",
    fleet_run_columns!(),
    " FROM fleet_runs WHERE id = $1"
);
pub(crate) const OPEN_FLEET_RUN: &str = concat!(
    "SELECT ",
    fleet_run_columns!(),
    " FROM fleet_runs WHERE result IS NULL ORDER BY id DESC LIMIT 1"
);
pub(crate) const LATEST_FLEET_RUN: &str = concat!(
    "SELECT ",
    fleet_run_columns!(),
    " FROM fleet_runs ORDER BY id DESC LIMIT 1"
);
/// Followed by the number of runs wanted (a literal: the dialects bind LIMIT differently).
pub(crate) const RECENT_FLEET_RUNS: &str = concat!(
    "SELECT ",
    fleet_run_columns!(),
    " FROM fleet_runs ORDER BY id DESC LIMIT "
);
pub(crate) const LATEST_UNFINISHED_FLEET_RUN: &str = concat!(
    "SELECT ",
    fleet_run_columns!(),
    " FROM fleet_runs WHERE result IS NULL OR result != 'upgraded' ORDER BY id DESC LIMIT 1"
);
/// `$2` NULL for every cluster of the run.
pub(crate) const FLEET_CLUSTERS: &str = "SELECT cluster, state, reason, cluster_run_id, \
     started_ms, ended_ms, claimed_by FROM fleet_clusters WHERE fleet_run = $1 \
     AND (CAST($2 AS TEXT) IS NULL OR cluster = $2) ORDER BY position";
/// A takeover (the cluster was running already) keeps its start time.
pub(crate) const CLAIM_FLEET_CLUSTER: &str = "UPDATE fleet_clusters SET state = 'running', \
     reason = NULL, claimed_by = $3, ended_ms = NULL, \
     started_ms = CASE WHEN state = 'running' THEN started_ms ELSE $4 END \
     WHERE fleet_run = $1 AND cluster = $2";
pub(crate) const FLEET_CLUSTER_RUNNING: &str = "UPDATE fleet_clusters SET state = $3, \
     reason = $4, started_ms = $5, ended_ms = NULL WHERE fleet_run = $1 AND cluster = $2";
pub(crate) const FLEET_CLUSTER_PENDING: &str = "UPDATE fleet_clusters SET state = $3, \
     reason = $4, ended_ms = NULL WHERE fleet_run = $1 AND cluster = $2";
pub(crate) const FLEET_CLUSTER_ENDED: &str = "UPDATE fleet_clusters SET state = $3, reason = $4, \
     ended_ms = $5 WHERE fleet_run = $1 AND cluster = $2";
pub(crate) const FLEET_CLUSTER_RUN: &str =
    "UPDATE fleet_clusters SET cluster_run_id = $3 WHERE fleet_run = $1 AND cluster = $2";
pub(crate) const FINISH_FLEET_RUN: &str =
    "UPDATE fleet_runs SET ended_ms = $2, result = $3, error = $4 WHERE id = $1";
pub(crate) const REOPEN_FLEET_RUN: &str = "UPDATE fleet_runs SET ended_ms = NULL, result = NULL, \
     error = NULL, actor = $2 WHERE id = $1";

/// A statement for SQLite: `$N` placeholders as `?N` (our statements hold no other `$`).
pub(crate) fn sqlite(sql: &str) -> Cow<'_, str> {
    if sql.contains('$') {
        Cow::Owned(sql.replace('$', "?"))
    } else {
        Cow::Borrowed(sql)
    }
}

/// An argument either backend binds: the journal's columns are integers and text.
#[derive(Debug, Clone)]
pub(crate) enum Arg {
    Int(i64),
    Text(Option<String>),
}

impl From<i64> for Arg {
    fn from(v: i64) -> Self {
        Arg::Int(v)
    }
}

impl From<&str> for Arg {
    fn from(v: &str) -> Self {
        Arg::Text(Some(v.to_string()))
    }
}

impl From<Option<&str>> for Arg {
    fn from(v: Option<&str>) -> Self {
        Arg::Text(v.map(str::to_string))
    }
}

impl rusqlite::ToSql for Arg {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        match self {
            Arg::Int(v) => v.to_sql(),
            Arg::Text(v) => v.to_sql(),
        }
    }
}

/// The arguments as PostgreSQL's client takes them.
pub(crate) fn pg_args(args: &[Arg]) -> Vec<&(dyn ::postgres::types::ToSql + Sync)> {
    args.iter()
        .map(|a| match a {
            Arg::Int(v) => v as &(dyn ::postgres::types::ToSql + Sync),
            Arg::Text(v) => v as &(dyn ::postgres::types::ToSql + Sync),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: &[&str] = &[
        INSERT_RUN,
        RUN_BY_ID,
        OPEN_RUN,
        LATEST_RUN,
        RECENT_RUNS,
        FINISH_RUN,
        BEGIN_STEP,
        END_STEP,
        STEPS_OF_RUN,
        SET_RUN_OPTIONS,
        SET_RUN_STATE,
        GET_RUN_STATE,
        LOCK_HOLDER,
        WRITE_LOCK,
        LOCK_HEARTBEAT,
        DELETE_LOCK,
        INSERT_FLEET_RUN,
        INSERT_FLEET_CLUSTER,
        FLEET_RUN_BY_ID,
        OPEN_FLEET_RUN,
        LATEST_FLEET_RUN,
        LATEST_UNFINISHED_FLEET_RUN,
        FLEET_CLUSTERS,
        CLAIM_FLEET_CLUSTER,
        FLEET_CLUSTER_RUNNING,
        FLEET_CLUSTER_PENDING,
        FLEET_CLUSTER_ENDED,
        FLEET_CLUSTER_RUN,
        FINISH_FLEET_RUN,
        REOPEN_FLEET_RUN,
    ];

    #[test]
    fn every_dollar_is_a_numbered_placeholder() {
        for sql in ALL {
            for (i, _) in sql.match_indices('$') {
                assert!(
                    sql[i + 1..].starts_with(|c: char| c.is_ascii_digit()),
                    "a `$` that is no placeholder would be changed for SQLite: {sql}"
                );
            }
            assert!(!sqlite(sql).contains('$'), "{sql}");
        }
    }

    #[test]
    fn every_statement_prepares_on_sqlite_against_the_schema() {
        let j = rusqlite::Connection::open_in_memory().unwrap();
        for m in super::super::sqlite::MIGRATIONS {
            j.execute_batch(m).unwrap();
        }
        for sql in ALL {
            j.prepare(&sqlite(sql))
                .unwrap_or_else(|e| panic!("{e}: {sql}"));
        }
    }
}
