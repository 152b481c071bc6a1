//! One cluster of a fleet run, through the same path as `bbupgrade upgrade` and `resume`: the
//! claim (the cluster's lock, then its journaled state read and marked under it, so coordinators
//! sharing a fleet run never drive one cluster twice), its maintenance window, preflight, a
//! journaled cluster run and the node-by-node driver. The agent clients and HTTP clients live only
//! while the cluster is upgraded.

use super::FleetOptions;
use super::journal::{self as fleet_journal, ClusterState, FleetClusterRecord, FleetRunId};
use super::targets::{LineTarget, Resolution, resolve};
use crate::commands;
use crate::inventory::Cluster;
use crate::journal::{
    ClusterLock, Journal, JournalError, NewRun, RunKind, RunResult, this_process_holder,
};
use crate::procedure::{Ctx, RunOptions};
use crate::report::{Reporter, Summary};
use crate::window::in_window;
use anyhow::{Context, Result, anyhow};
use bbupgrade_common::tls::TlsMaterial;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How often a claimed cluster's lock is refreshed: a lost lock stops the driver at its next step.
const CLAIM_HEARTBEAT_SECS: u64 = 2;

/// What the fleet shares with every cluster it drives.
pub struct Shared {
    pub tls: TlsMaterial,
    pub journal: Arc<Journal>,
    pub fleet: FleetRunId,
    pub opts: FleetOptions,
}

/// How a cluster's turn ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Upgraded(String),
    /// Nothing newer on its line: left as it is, not a failure.
    UpToDate(String),
    Failed(String),
    Skipped(String),
}

impl Outcome {
    pub fn state(&self) -> ClusterState {
        match self {
            Outcome::Upgraded(_) => ClusterState::Upgraded,
            Outcome::UpToDate(_) => ClusterState::UpToDate,
            Outcome::Failed(_) => ClusterState::Failed,
            Outcome::Skipped(_) => ClusterState::Skipped,
        }
    }

    pub fn reason(&self) -> &str {
        match self {
            Outcome::Upgraded(r)
            | Outcome::UpToDate(r)
            | Outcome::Failed(r)
            | Outcome::Skipped(r) => r,
        }
    }
}

/// Whether a cluster still waits for a coordinator: pending, or running (driven by a live one, or
/// left by one that died). Upgraded, failed and skipped clusters are settled for this pass.
pub fn unsettled(state: ClusterState) -> bool {
    matches!(state, ClusterState::Pending | ClusterState::Running)
}

/// What trying to claim a cluster gave.
pub enum Claim {
    /// Ours to drive: its lock is held, and its record was read under the lock.
    Mine(Box<Claimed>),
    /// Another coordinator holds its lock (`user@host:pid`): it is being driven.
    Busy(String),
    /// Settled by another coordinator meanwhile (or not in the fleet run).
    Settled,
}

/// A cluster this coordinator holds the lock of.
pub struct Claimed {
    lock: ClusterLock,
    record: FleetClusterRecord,
}

/// Takes the cluster's lock and reads its state under it. Blocks (a round trip or two).
pub fn try_claim(
    journal: &Journal,
    fleet: FleetRunId,
    cluster: &str,
    holder: &str,
) -> Result<Claim, JournalError> {
    let lock = match journal.acquire_lock(cluster, holder) {
        Ok(lock) => lock,
        Err(JournalError::Locked { holder, .. }) => return Ok(Claim::Busy(holder)),
        Err(e) => return Err(e),
    };
    match fleet_journal::cluster(journal, fleet, cluster)? {
        Some(record) if unsettled(record.state) => {
            Ok(Claim::Mine(Box::new(Claimed { lock, record })))
        }
        _ => {
            lock.release()?;
            Ok(Claim::Settled)
        }
    }
}

/// Why a cluster is not started now: outside its window. A cluster already running is finished
/// whatever the time, so no node is left on a different version than the others.
pub fn window_refusal(
    cluster: &Cluster,
    previous: ClusterState,
    now: jiff::Timestamp,
) -> Option<String> {
    let window = cluster.window.as_ref()?;
    if previous == ClusterState::Running || in_window(window, now) {
        return None;
    }
    Some(format!(
        "outside its maintenance window \"{window}\" (now {})",
        window.local_time(now)
    ))
}

/// Takes the turn of a claimed cluster and journals how it ended while still holding its lock:
/// released first, another coordinator could mistake a settled cluster for an abandoned one.
/// Errors here are the journal's; the cluster's own errors end up as a failed outcome.
pub async fn take_turn(
    shared: &Shared,
    cluster: &Cluster,
    claimed: Box<Claimed>,
) -> Result<Outcome> {
    let Claimed { lock, record } = *claimed;
    let lock = Arc::new(Mutex::new(lock));
    let lost = Arc::new(AtomicBool::new(false));
    let beat = keep_alive(lock.clone(), lost.clone());
    let outcome = turn(shared, cluster, &record, lost).await;
    let recorded = fleet_journal::set_state(
        &shared.journal,
        shared.fleet,
        &cluster.name,
        outcome.state(),
        Some(outcome.reason()),
    );
    beat.abort();
    drop(lock);
    recorded?;
    Ok(outcome)
}

async fn turn(
    shared: &Shared,
    cluster: &Cluster,
    previous: &FleetClusterRecord,
    lock_lost: Arc<AtomicBool>,
) -> Outcome {
    if let Some(why) = window_refusal(cluster, previous.state, jiff::Timestamp::now()) {
        return Outcome::Skipped(why);
    }
    if let Err(e) = fleet_journal::claim(
        &shared.journal,
        shared.fleet,
        &cluster.name,
        &this_process_holder(),
    ) {
        return Outcome::Failed(format!("{e}"));
    }
    match upgrade(shared, cluster, previous, lock_lost).await {
        Ok(o) => o,
        Err(e) => Outcome::Failed(format!("{e:#}")),
    }
}

/// Refreshes a held lock until aborted; once it is lost (taken over, or the PostgreSQL session
/// ended), `lost` tells the driver to stop before its next step.
fn keep_alive(lock: Arc<Mutex<ClusterLock>>, lost: Arc<AtomicBool>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(CLAIM_HEARTBEAT_SECS)).await;
            let lock = lock.clone();
            let beat = tokio::task::spawn_blocking(move || {
                lock.lock().unwrap_or_else(|p| p.into_inner()).heartbeat()
            })
            .await;
            match beat {
                Ok(Err(e @ JournalError::LockLost { .. })) => {
                    tracing::error!(error = %e, "the claimed cluster's lock is lost");
                    lost.store(true, Ordering::SeqCst);
                    break;
                }
                Ok(Err(e)) => tracing::warn!(error = %e, "could not refresh the cluster lock"),
                _ => {}
            }
        }
    })
}

async fn upgrade(
    shared: &Shared,
    cluster: &Cluster,
    previous: &FleetClusterRecord,
    lock_lost: Arc<AtomicBool>,
) -> Result<Outcome> {
    let mut cluster = cluster.clone();
    if let Some(s) = shared.opts.soak_secs {
        cluster.timeouts.soak_secs = s;
    }
    let mut ctx = Ctx::new(
        cluster,
        shared.tls.clone(),
        shared.journal.clone(),
        Reporter::silent(),
    )?;
    ctx.lock_lost = lock_lost;
    if let Some(open) = commands::resumable_run(&ctx)? {
        return resume_own_run(&mut ctx, previous, open).await;
    }
    if let Some(id) = previous.cluster_run_id
        && ctx.journal.run(crate::journal::RunId(id))?.result == Some(RunResult::Upgraded)
    {
        return Ok(Outcome::Upgraded(format!("run #{id} had finished")));
    }
    let target = match line_target(&ctx, shared).await {
        Ok(t) => t,
        Err(outcome) => return Ok(outcome),
    };
    let (to, archive) = (target.version, target.archive);
    let report = commands::make_plan(&ctx, &to, archive.size_bytes()).await;
    if !report.ready {
        let failed: Vec<_> = report.checks.iter().filter(|c| !c.ok).cloned().collect();
        return Ok(Outcome::Failed(format!(
            "preflight refused it, nothing was changed: {}",
            failed
                .iter()
                .map(|c| format!("{}: {}", c.name, c.detail))
                .collect::<Vec<_>>()
                .join("; ")
        )));
    }
    let options = RunOptions {
        no_finalize: false,
        to: to.clone(),
        from: report.from.clone().unwrap_or_default(),
        archive: Some(archive),
        auto_rollback: shared.opts.auto_rollback,
        timeouts: ctx.timeouts.clone(),
    };
    let run_id = ctx.journal.create_run(&NewRun {
        cluster: ctx.cluster.name.clone(),
        kind: RunKind::Upgrade,
        from_version: options.from.clone(),
        to_version: to,
        plan_json: serde_json::to_string(&report)?,
        actor: this_process_holder(),
        options_json: serde_json::to_string(&options)?,
    })?;
    fleet_journal::set_cluster_run(&shared.journal, shared.fleet, &ctx.cluster.name, run_id)
        .map_err(|e| anyhow!(e))?;
    let summary = crate::procedure::drive(&ctx, run_id, &options).await;
    Ok(outcome_of(&summary, &format!("run #{run_id}")))
}

/// Continues this fleet's own cluster run, left open by a coordinator that died or halted by a
/// failure; a run this fleet run did not start is a failure (finish it by hand first).
async fn resume_own_run(
    ctx: &mut Ctx,
    previous: &FleetClusterRecord,
    open: crate::journal::RunRecord,
) -> Result<Outcome> {
    if previous.cluster_run_id != Some(open.id.0) || open.kind != RunKind::Upgrade {
        return Ok(Outcome::Failed(format!(
            "has an unfinished {} run #{} ({} -> {}) that this fleet run did not start; finish it with `bbupgrade resume` or `bbupgrade rollback` first",
            open.kind.as_str(),
            open.id,
            open.from_version,
            open.to_version
        )));
    }
    let options: RunOptions = serde_json::from_str(&open.options_json)
        .with_context(|| format!("reading the options of run #{}", open.id))?;
    ctx.timeouts = options.timeouts.clone();
    let summary = crate::procedure::drive(ctx, open.id, &options).await;
    Ok(outcome_of(&summary, &format!("resumed run #{}", open.id)))
}

/// The release of the cluster's own line, or the outcome when there is none to go to (up to
/// date, no target for its line, or its version could not be read).
async fn line_target(ctx: &Ctx, shared: &Shared) -> Result<LineTarget, Outcome> {
    let targets = shared.opts.line_targets();
    let choice = choose(ctx, &targets).await;
    match (&choice.resolution, &choice.from) {
        (Ok(Resolution::Upgrade(i)), _) => Ok(targets[*i].clone()),
        (Ok(r @ Resolution::UpToDate(_)), Some(from)) => {
            Err(Outcome::UpToDate(r.reason(from).unwrap_or_default()))
        }
        (Ok(r), from) => {
            let from = from.as_deref().unwrap_or("?");
            Err(Outcome::Skipped(r.reason(from).unwrap_or_default()))
        }
        (Err(e), _) => Err(Outcome::Failed(format!(
            "preflight refused it, nothing was changed: {e}"
        ))),
    }
}

/// The version a cluster runs and what this fleet run does with it.
pub struct Choice {
    pub from: Option<String>,
    pub resolution: std::result::Result<Resolution, String>,
}

/// Asks the cluster's agents which version it runs and picks its target from `targets`.
pub async fn choose(ctx: &Ctx, targets: &[LineTarget]) -> Choice {
    let observed = ctx.observe().await;
    let from = match crate::plan::common_version(&observed) {
        Ok(v) => v,
        Err(e) => {
            let unreachable: Vec<String> = observed
                .iter()
                .filter_map(|o| o.agent_error.as_ref().map(|e| format!("{}: {e}", o.id)))
                .collect();
            let why = if unreachable.is_empty() {
                e
            } else {
                format!("{e} ({})", unreachable.join("; "))
            };
            return Choice {
                from: None,
                resolution: Err(why),
            };
        }
    };
    let resolution = from
        .parse()
        .map(|v| resolve(targets, v))
        .map_err(|e| format!("{e}"));
    Choice {
        from: Some(from),
        resolution,
    }
}

fn outcome_of(s: &Summary, run: &str) -> Outcome {
    if s.result == RunResult::Upgraded && s.error.is_none() {
        return Outcome::Upgraded(format!(
            "{} -> {}: {} node(s) in {:.1}s ({run})",
            s.from,
            s.to,
            s.nodes.len(),
            s.duration_ms as f64 / 1000.0
        ));
    }
    let mut why = format!(
        "{}: {} ({run})",
        s.result.as_str(),
        s.error.as_deref().unwrap_or("no error recorded")
    );
    if !s.notes.is_empty() {
        why.push_str(&format!("; {}", s.notes.join("; ")));
    }
    Outcome::Failed(why)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A cluster with no nodes and the given maintenance window.
    pub(crate) fn cluster(window: Option<&str>) -> Cluster {
        Cluster {
            name: "c".into(),
            bitbucket_url: "http://127.0.0.1:1".into(),
            bitbucket_node_urls: vec![],
            auth: crate::inventory::Auth::Bearer(crate::inventory::SecretSource::Env("T".into())),
            labels: vec![],
            window: window.map(|w| w.parse().unwrap()),
            load_balancer: crate::loadbalancer::LbConfig::None {},
            timeouts: Default::default(),
            nodes: vec![],
        }
    }

    #[test]
    fn windows_gate_new_turns_but_never_a_running_cluster() {
        // 2024-06-04 is a Tuesday.
        let tuesday_noon: jiff::Timestamp = "2024-06-04T12:00:00Z".parse().unwrap();
        let weekend = cluster(Some("Sat-Sun 01:00-05:00 UTC"));
        let why = window_refusal(&weekend, ClusterState::Pending, tuesday_noon).unwrap();
        assert!(
            why.contains("Sat-Sun 01:00-05:00 UTC") && why.contains("now Tue 12:00"),
            "{why}"
        );
        assert!(window_refusal(&weekend, ClusterState::Skipped, tuesday_noon).is_some());
        assert_eq!(
            window_refusal(&weekend, ClusterState::Running, tuesday_noon),
            None
        );
        assert_eq!(
            window_refusal(&cluster(None), ClusterState::Pending, tuesday_noon),
            None
        );
        let weekdays = cluster(Some("Mon-Fri 00:00-24:00"));
        assert_eq!(
            window_refusal(&weekdays, ClusterState::Pending, tuesday_noon),
            None
        );
    }

    #[test]
    fn summaries_become_outcomes() {
        let mut s = Summary {
            from: "8.19.3".into(),
            to: "8.19.6".into(),
            result: RunResult::Upgraded,
            ..Default::default()
        };
        assert!(
            matches!(outcome_of(&s, "run #1"), Outcome::Upgraded(r) if r.contains("8.19.3 -> 8.19.6"))
        );
        s.result = RunResult::Halted;
        s.error = Some("node 'n1' failed: ERROR".into());
        s.notes = vec!["node 'n1' is stopped".into()];
        let o = outcome_of(&s, "run #2");
        assert_eq!(o.state(), ClusterState::Failed);
        assert!(o.reason().contains("node 'n1' failed") && o.reason().contains("is stopped"));
    }
}
