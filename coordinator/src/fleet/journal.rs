//! The fleet's tables in the journal: a fleet run with its options, and the state of each of its
//! clusters (pending, running, upgraded, failed, skipped) with the reason and the cluster run.

use crate::journal::sql::{self, Arg, sqlite};
use crate::journal::{Journal, JournalError, RunId, now_ms};
use rusqlite::{OptionalExtension, params};
use serde::Serialize;
use std::fmt;

/// A fleet run's id in the journal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct FleetRunId(pub i64);

impl fmt::Display for FleetRunId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Where one cluster of a fleet run stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ClusterState {
    Pending,
    Running,
    Upgraded,
    /// Nothing newer on its line (already on its target): settled, not a failure.
    #[serde(rename = "up_to_date")]
    UpToDate,
    Failed,
    Skipped,
}

impl ClusterState {
    pub const ALL: [ClusterState; 6] = [
        ClusterState::Upgraded,
        ClusterState::UpToDate,
        ClusterState::Running,
        ClusterState::Pending,
        ClusterState::Skipped,
        ClusterState::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ClusterState::Pending => "pending",
            ClusterState::Running => "running",
            ClusterState::Upgraded => "upgraded",
            ClusterState::UpToDate => "up_to_date",
            ClusterState::Failed => "failed",
            ClusterState::Skipped => "skipped",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.as_str() == s)
    }
}

/// How a fleet run ended; `None` while it is open (running, or its coordinator died).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FleetResult {
    /// Every selected cluster is upgraded.
    Upgraded,
    /// No budget was exceeded, but clusters were skipped (windows) or failed within the budget.
    Incomplete,
    /// The failure budget was exceeded or a canary failed: clusters were left pending.
    Halted,
}

impl FleetResult {
    pub fn as_str(self) -> &'static str {
        match self {
            FleetResult::Upgraded => "upgraded",
            FleetResult::Incomplete => "incomplete",
            FleetResult::Halted => "halted",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        [Self::Upgraded, Self::Incomplete, Self::Halted]
            .into_iter()
            .find(|r| r.as_str() == s)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetRunRecord {
    pub id: FleetRunId,
    pub to_version: String,
    pub options_json: String,
    pub actor: String,
    pub started_ms: i64,
    pub ended_ms: Option<i64>,
    pub result: Option<FleetResult>,
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FleetClusterRecord {
    pub cluster: String,
    pub state: ClusterState,
    pub reason: Option<String>,
    pub cluster_run_id: Option<i64>,
    pub started_ms: Option<i64>,
    pub ended_ms: Option<i64>,
    /// The coordinator (`user@host:pid`) that last claimed the cluster to drive it.
    pub claimed_by: Option<String>,
}

/// What [`create_unless_open`] found: a new fleet run, or the open one to join.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CreatedOrOpen {
    Created(FleetRunId),
    Open(FleetRunRecord),
}

fn pg_run_from_row(r: &postgres::Row) -> Result<FleetRunRecord, postgres::Error> {
    let result: Option<String> = r.try_get(6)?;
    Ok(FleetRunRecord {
        id: FleetRunId(r.try_get(0)?),
        to_version: r.try_get(1)?,
        options_json: r.try_get(2)?,
        actor: r.try_get(3)?,
        started_ms: r.try_get(4)?,
        ended_ms: r.try_get(5)?,
        // An unknown word reads as open, as the SQLite side would refuse it: never written by us.
        result: result.as_deref().and_then(FleetResult::parse),
        error: r.try_get(7)?,
    })
}

fn bad(column: &'static str, value: &str) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(
        0,
        rusqlite::types::Type::Text,
        format!("unexpected value {value:?} in {column}").into(),
    )
}

fn run_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<FleetRunRecord> {
    let result: Option<String> = r.get(6)?;
    Ok(FleetRunRecord {
        id: FleetRunId(r.get(0)?),
        to_version: r.get(1)?,
        options_json: r.get(2)?,
        actor: r.get(3)?,
        started_ms: r.get(4)?,
        ended_ms: r.get(5)?,
        result: match result {
            None => None,
            Some(s) => Some(FleetResult::parse(&s).ok_or_else(|| bad("fleet_runs.result", &s))?),
        },
        error: r.get(7)?,
    })
}

/// Inserts a fleet run and its clusters (in order, pending) in SQLite; its id.
fn insert_sqlite(
    tx: &rusqlite::Transaction<'_>,
    to: &str,
    options_json: &str,
    actor: &str,
    clusters: &[String],
) -> rusqlite::Result<i64> {
    let id: i64 = tx.query_row(
        &sqlite(sql::INSERT_FLEET_RUN),
        params![to, options_json, actor, now_ms()],
        |r| r.get(0),
    )?;
    let mut stmt = tx.prepare(&sqlite(sql::INSERT_FLEET_CLUSTER))?;
    for (i, name) in clusters.iter().enumerate() {
        stmt.execute(params![id, name, i as i64])?;
    }
    Ok(id)
}

/// [`insert_sqlite`] in PostgreSQL.
fn insert_pg(
    tx: &mut postgres::Transaction<'_>,
    to: &str,
    options_json: &str,
    actor: &str,
    clusters: &[String],
) -> Result<i64, postgres::Error> {
    let id: i64 = tx
        .query_one(
            sql::INSERT_FLEET_RUN,
            &[&to, &options_json, &actor, &now_ms()],
        )?
        .try_get(0)?;
    let stmt = tx.prepare(sql::INSERT_FLEET_CLUSTER)?;
    for (i, name) in clusters.iter().enumerate() {
        tx.execute(&stmt, &[&id, name, &(i as i64)])?;
    }
    Ok(id)
}

/// Creates a fleet run with its clusters (in order), all pending.
pub fn create(
    j: &Journal,
    to: &str,
    options_json: &str,
    actor: &str,
    clusters: &[String],
) -> Result<FleetRunId, JournalError> {
    let pg = (
        to.to_string(),
        options_json.to_string(),
        actor.to_string(),
        clusters.to_vec(),
    );
    j.with_backend(
        "recording a new fleet run",
        |c| {
            let tx = c.transaction()?;
            let id = insert_sqlite(&tx, to, options_json, actor, clusters)?;
            tx.commit()?;
            Ok(FleetRunId(id))
        },
        move |c| {
            let (to, options_json, actor, clusters) = pg;
            let mut tx = c.transaction()?;
            let id = insert_pg(&mut tx, &to, &options_json, &actor, &clusters)?;
            tx.commit()?;
            Ok(FleetRunId(id))
        },
    )
}

/// Creates a fleet run as [`create`] does, unless one is open (no result yet): then that one, to
/// join. Atomic across coordinators: two started at once on one journal never both create a run.
pub fn create_unless_open(
    j: &Journal,
    to: &str,
    options_json: &str,
    actor: &str,
    clusters: &[String],
) -> Result<CreatedOrOpen, JournalError> {
    let pg = (
        to.to_string(),
        options_json.to_string(),
        actor.to_string(),
        clusters.to_vec(),
    );
    j.with_backend(
        "recording a new fleet run (or joining the open one)",
        |c| {
            let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            if let Some(open) = tx
                .query_row(&sqlite(sql::OPEN_FLEET_RUN), [], run_from_row)
                .optional()?
            {
                return Ok(CreatedOrOpen::Open(open));
            }
            let id = insert_sqlite(&tx, to, options_json, actor, clusters)?;
            tx.commit()?;
            Ok(CreatedOrOpen::Created(FleetRunId(id)))
        },
        move |c| {
            let (to, options_json, actor, clusters) = pg;
            let mut tx = c.transaction()?;
            // Conflicts with itself: a second coordinator waits here until the first commits.
            tx.batch_execute("LOCK TABLE fleet_runs IN SHARE ROW EXCLUSIVE MODE")?;
            if let Some(r) = tx.query_opt(sql::OPEN_FLEET_RUN, &[])? {
                return Ok(CreatedOrOpen::Open(pg_run_from_row(&r)?));
            }
            let id = insert_pg(&mut tx, &to, &options_json, &actor, &clusters)?;
            tx.commit()?;
            Ok(CreatedOrOpen::Created(FleetRunId(id)))
        },
    )
}

/// Marks a cluster running for `holder`, who must hold the cluster's lock: the claim that keeps
/// other coordinators off it. A takeover (it was running already) keeps its start time.
pub fn claim(j: &Journal, id: FleetRunId, cluster: &str, holder: &str) -> Result<(), JournalError> {
    j.execute(
        format!("claiming cluster {cluster} for {holder}"),
        sql::CLAIM_FLEET_CLUSTER,
        vec![id.0.into(), cluster.into(), holder.into(), now_ms().into()],
    )
    .map(|_| ())
}

pub fn run(j: &Journal, id: FleetRunId) -> Result<Option<FleetRunRecord>, JournalError> {
    j.with_backend(
        format!("reading fleet run {id}"),
        |c| {
            c.query_row(&sqlite(sql::FLEET_RUN_BY_ID), [id.0], run_from_row)
                .optional()
        },
        move |c| {
            c.query_opt(sql::FLEET_RUN_BY_ID, &[&id.0])?
                .map(|r| pg_run_from_row(&r))
                .transpose()
        },
    )
}

/// The latest fleet run; with `unfinished`, the latest not fully upgraded (open, halted or
/// incomplete), the one `fleet resume` continues.
pub fn latest(j: &Journal, unfinished: bool) -> Result<Option<FleetRunRecord>, JournalError> {
    let statement = if unfinished {
        sql::LATEST_UNFINISHED_FLEET_RUN
    } else {
        sql::LATEST_FLEET_RUN
    };
    j.with_backend(
        "looking for the latest fleet run",
        |c| c.query_row(&sqlite(statement), [], run_from_row).optional(),
        move |c| {
            c.query_opt(statement, &[])?
                .map(|r| pg_run_from_row(&r))
                .transpose()
        },
    )
}

/// The latest `limit` fleet runs, newest first.
pub fn recent(j: &Journal, limit: u32) -> Result<Vec<FleetRunRecord>, JournalError> {
    let sql = format!("{}{limit}", sql::RECENT_FLEET_RUNS);
    let pg_sql = sql.clone();
    j.with_backend(
        "listing the latest fleet runs",
        |c| {
            c.prepare(&sql)?
                .query_map([], run_from_row)?
                .collect::<rusqlite::Result<Vec<_>>>()
        },
        move |c| c.query(&pg_sql, &[])?.iter().map(pg_run_from_row).collect(),
    )
}

/// The clusters of a fleet run in their order.
pub fn clusters(j: &Journal, id: FleetRunId) -> Result<Vec<FleetClusterRecord>, JournalError> {
    select_clusters(j, id, None)
}

/// One cluster of a fleet run, as journaled now.
pub fn cluster(
    j: &Journal,
    id: FleetRunId,
    name: &str,
) -> Result<Option<FleetClusterRecord>, JournalError> {
    Ok(select_clusters(j, id, Some(name))?.pop())
}

fn select_clusters(
    j: &Journal,
    id: FleetRunId,
    only: Option<&str>,
) -> Result<Vec<FleetClusterRecord>, JournalError> {
    let pg_only = only.map(str::to_string);
    let pg = move |c: &mut postgres::Client| {
        let mut out = Vec::new();
        for r in c.query(sql::FLEET_CLUSTERS, &[&id.0, &pg_only])? {
            let state: String = r.try_get(1)?;
            let Some(state) = ClusterState::parse(&state) else {
                continue; // never written by bbupgrade; SQLite refuses it, here it is left out
            };
            out.push(FleetClusterRecord {
                cluster: r.try_get(0)?,
                state,
                reason: r.try_get(2)?,
                cluster_run_id: r.try_get(3)?,
                started_ms: r.try_get(4)?,
                ended_ms: r.try_get(5)?,
                claimed_by: r.try_get(6)?,
            });
        }
        Ok(out)
    };
    j.with_backend(
        format!("reading the clusters of fleet run {id}"),
        |c| {
            let mut stmt = c.prepare(&sqlite(sql::FLEET_CLUSTERS))?;
            let rows = stmt.query_map(params![id.0, only], |r| {
                let state: String = r.get(1)?;
                Ok(FleetClusterRecord {
                    cluster: r.get(0)?,
                    state: ClusterState::parse(&state)
                        .ok_or_else(|| bad("fleet_clusters.state", &state))?,
                    reason: r.get(2)?,
                    cluster_run_id: r.get(3)?,
                    started_ms: r.get(4)?,
                    ended_ms: r.get(5)?,
                    claimed_by: r.get(6)?,
                })
            })?;
            rows.collect()
        },
        pg,
    )
}

/// Records a cluster's new state; `running` stamps its start, the others its end.
pub fn set_state(
    j: &Journal,
    id: FleetRunId,
    cluster: &str,
    state: ClusterState,
    reason: Option<&str>,
) -> Result<(), JournalError> {
    let word = state.as_str();
    let mut args: Vec<Arg> = vec![id.0.into(), cluster.into(), word.into(), reason.into()];
    let statement = match state {
        ClusterState::Running => sql::FLEET_CLUSTER_RUNNING,
        ClusterState::Pending => sql::FLEET_CLUSTER_PENDING,
        _ => sql::FLEET_CLUSTER_ENDED,
    };
    if state != ClusterState::Pending {
        args.push(now_ms().into());
    }
    j.execute(
        format!("recording cluster {cluster} as {word}"),
        statement,
        args,
    )
    .map(|_| ())
}

/// Links a cluster to the cluster run that upgrades it (so a resume continues that run).
pub fn set_cluster_run(
    j: &Journal,
    id: FleetRunId,
    cluster: &str,
    run: RunId,
) -> Result<(), JournalError> {
    j.execute(
        format!("linking cluster {cluster} to run {run}"),
        sql::FLEET_CLUSTER_RUN,
        vec![id.0.into(), cluster.into(), run.0.into()],
    )
    .map(|_| ())
}

pub fn finish(
    j: &Journal,
    id: FleetRunId,
    result: FleetResult,
    error: Option<&str>,
) -> Result<(), JournalError> {
    j.execute(
        format!("recording the end of fleet run {id}"),
        sql::FINISH_FLEET_RUN,
        vec![
            id.0.into(),
            now_ms().into(),
            result.as_str().into(),
            error.into(),
        ],
    )
    .map(|_| ())
}

/// Reopens a fleet run for a resume (it is open again until it ends).
pub fn reopen(j: &Journal, id: FleetRunId, actor: &str) -> Result<(), JournalError> {
    j.execute(
        format!("reopening fleet run {id}"),
        sql::REOPEN_FLEET_RUN,
        vec![id.0.into(), actor.into()],
    )
    .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fleet_run_round_trip() {
        let j = Journal::open_in_memory().unwrap();
        let names: Vec<String> = ["b", "a", "c"].iter().map(|s| s.to_string()).collect();
        let id = create(&j, "8.19.6", "{}", "me@h:1", &names).unwrap();
        let rec = run(&j, id).unwrap().unwrap();
        assert_eq!(rec.to_version, "8.19.6");
        assert_eq!(rec.result, None);
        assert_eq!(latest(&j, true).unwrap().unwrap().id, id);
        let cs = clusters(&j, id).unwrap();
        assert_eq!(
            cs.iter().map(|c| c.cluster.as_str()).collect::<Vec<_>>(),
            ["b", "a", "c"]
        );
        assert!(cs.iter().all(|c| c.state == ClusterState::Pending));

        set_state(&j, id, "a", ClusterState::Running, None).unwrap();
        set_state(
            &j,
            id,
            "b",
            ClusterState::Skipped,
            Some("outside its window"),
        )
        .unwrap();
        let cs = clusters(&j, id).unwrap();
        assert_eq!(cs[1].state, ClusterState::Running);
        assert!(cs[1].started_ms.is_some() && cs[1].ended_ms.is_none());
        assert_eq!(cs[0].reason.as_deref(), Some("outside its window"));

        finish(&j, id, FleetResult::Incomplete, None).unwrap();
        assert_eq!(
            latest(&j, true).unwrap().unwrap().result,
            Some(FleetResult::Incomplete)
        );
        reopen(&j, id, "you@h:2").unwrap();
        let rec = run(&j, id).unwrap().unwrap();
        assert_eq!((rec.result, rec.actor.as_str()), (None, "you@h:2"));
        finish(&j, id, FleetResult::Upgraded, None).unwrap();
        assert!(latest(&j, true).unwrap().is_none());
        assert_eq!(latest(&j, false).unwrap().unwrap().id, id);
        assert!(run(&j, FleetRunId(99)).unwrap().is_none());
    }
}
