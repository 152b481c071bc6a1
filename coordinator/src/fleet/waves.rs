//! Carries a fleet run out wave by wave: canaries first, each wave's clusters concurrently (one
//! task each), the failure budget checked before every wave, an optional soak between waves.
//! Every cluster's state is journaled as it changes, so a killed run resumes.
//!
//! Several coordinators may carry out one fleet run together (a shared journal): each cluster is
//! claimed under its lock before it is driven, so none is driven twice. A coordinator passes over
//! the clusters another one drives and goes on with its next wave (waves and the concurrency limit
//! hold per coordinator); canary waves are waited for by all; at the end each waits for the
//! clusters still driven elsewhere, taking over any whose coordinator died, and the run closes once
//! every cluster is settled, whoever settled it.

use super::cluster::{self, Claim, Outcome, Shared, unsettled};
use super::journal::{self as fleet_journal, ClusterState, FleetClusterRecord, FleetResult};
use super::plan::{self, Verdict};
use super::report::{FleetReport, FleetReporter};
use crate::inventory::Inventory;
use crate::journal::this_process_holder;
use anyhow::{Result, anyhow};
use futures::FutureExt;
use std::collections::HashSet;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

/// How often a coordinator looks again at clusters another coordinator drives.
const SETTLE_POLL_MS: u64 = 500;

fn verdict(states: &[FleetClusterRecord], shared: &Shared) -> Verdict {
    let failed = |canary_only: bool| {
        let mut v: Vec<String> = states
            .iter()
            .filter(|c| c.state == ClusterState::Failed)
            .filter(|c| !canary_only || shared.opts.canary.contains(&c.cluster))
            .map(|c| c.cluster.clone())
            .collect();
        v.sort();
        v
    };
    plan::budget(
        &failed(false),
        &failed(true),
        shared.opts.max_failed_clusters,
    )
}

/// The names among `names` whose state passes `keep`, in the order of `names`.
fn pick(
    states: &[FleetClusterRecord],
    names: &[String],
    keep: impl Fn(ClusterState) -> bool,
) -> Vec<String> {
    names
        .iter()
        .filter(|n| states.iter().any(|c| &c.cluster == *n && keep(c.state)))
        .cloned()
        .collect()
}

/// How one attempt at a cluster went.
enum Attempt {
    Drove(Outcome),
    Busy(String),
    Settled,
}

/// This coordinator's turns at clusters: claims, drives at most `limit` at once, reports.
struct Turns<'a> {
    shared: Arc<Shared>,
    inv: &'a Inventory,
    reporter: &'a FleetReporter,
    limit: usize,
    holder: String,
    /// Clusters already reported as driven by another coordinator (reported once).
    elsewhere: HashSet<String>,
}

impl Turns<'_> {
    /// One wave: its unsettled clusters driven (a canary wave settled before any other goes on),
    /// then the soak before the next; `Some(why)` when the fleet halts instead.
    async fn wave(&mut self, wave: &plan::Wave, later: &[plan::Wave]) -> Result<Option<String>> {
        let shared = self.shared.clone();
        let reporter = self.reporter;
        let states = self.states()?;
        let todo = pick(&states, &wave.clusters, unsettled);
        if todo.is_empty() {
            return Ok(None);
        }
        if let Verdict::Halt(why) = verdict(&states, &shared) {
            return Ok(Some(why));
        }
        reporter.event(
            Some(wave.number),
            None,
            "wave",
            &format!(
                "{}{} cluster(s) of {}, at most {} at once",
                if wave.canary { "canary: " } else { "" },
                todo.len(),
                wave.clusters.len(),
                self.limit
            ),
        );
        self.attempt(Some(wave.number), &todo).await?;
        if wave.canary {
            // Nobody goes past a canary wave before its canaries are settled, whoever drives them.
            self.settle(Some(wave.number), &wave.clusters, false)
                .await?;
        }
        let states = self.states()?;
        let later: Vec<String> = later
            .iter()
            .flat_map(|w| w.clusters.iter().cloned())
            .collect();
        let more = !pick(&states, &later, unsettled).is_empty();
        if more && shared.opts.wave_soak_secs > 0 && verdict(&states, &shared) == Verdict::Continue
        {
            reporter.event(
                Some(wave.number),
                None,
                "soak",
                &format!("{}s before the next wave", shared.opts.wave_soak_secs),
            );
            tokio::time::sleep(Duration::from_secs(shared.opts.wave_soak_secs)).await;
        }
        Ok(None)
    }

    fn states(&self) -> Result<Vec<FleetClusterRecord>> {
        Ok(fleet_journal::clusters(
            &self.shared.journal,
            self.shared.fleet,
        )?)
    }

    /// Tries every cluster of `names` once; how many this coordinator drove.
    async fn attempt(&mut self, wave: Option<usize>, names: &[String]) -> Result<usize> {
        let mut queue = names.iter().cloned();
        let mut tasks = tokio::task::JoinSet::new();
        let mut drove = 0;
        loop {
            while tasks.len() < self.limit {
                let Some(name) = queue.next() else { break };
                tasks.spawn(attempt_one(
                    self.shared.clone(),
                    self.inv.cluster(&name).cloned(),
                    name,
                    self.holder.clone(),
                    self.reporter.clone(),
                    wave,
                ));
            }
            let Some(joined) = tasks.join_next().await else {
                return Ok(drove);
            };
            let (name, attempt) =
                joined.map_err(|e| anyhow!("a cluster task ended abnormally: {e}"))?;
            match attempt? {
                Attempt::Drove(outcome) => {
                    drove += 1;
                    let state = outcome.state();
                    self.reporter
                        .event(wave, Some(&name), state.as_str(), outcome.reason());
                }
                Attempt::Busy(holder) => {
                    if self.elsewhere.insert(name.clone()) {
                        self.reporter.event(
                            wave,
                            Some(&name),
                            "elsewhere",
                            &format!("driven by {holder}"),
                        );
                    }
                }
                Attempt::Settled => {}
            }
        }
    }

    /// Returns once every cluster of `names` is settled: drives those free to claim, waits for
    /// those driven elsewhere. Once the fleet is halted, pending clusters are left as they are; a
    /// running one is still finished, so no cluster stays on two versions.
    async fn settle(&mut self, wave: Option<usize>, names: &[String], halted: bool) -> Result<()> {
        loop {
            let states = self.states()?;
            let halted = halted || matches!(verdict(&states, &self.shared), Verdict::Halt(_));
            let open = pick(&states, names, |s| {
                s == ClusterState::Running || (!halted && s == ClusterState::Pending)
            });
            if open.is_empty() {
                return Ok(());
            }
            if self.attempt(wave, &open).await? == 0 {
                tokio::time::sleep(Duration::from_millis(SETTLE_POLL_MS)).await;
            }
        }
    }
}

/// Claims a cluster and, if it is ours, takes its turn.
async fn attempt_one(
    shared: Arc<Shared>,
    cluster: Result<crate::inventory::Cluster>,
    name: String,
    holder: String,
    reporter: FleetReporter,
    wave: Option<usize>,
) -> (String, Result<Attempt>) {
    let j = shared.journal.clone();
    let fleet = shared.fleet;
    let (n, h) = (name.clone(), holder);
    let claim =
        match tokio::task::spawn_blocking(move || cluster::try_claim(&j, fleet, &n, &h)).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return (name, Err(e.into())),
            Err(e) => {
                let e = anyhow!("claiming cluster {name}: {e}");
                return (name, Err(e));
            }
        };
    let claimed = match claim {
        Claim::Mine(c) => c,
        Claim::Busy(holder) => return (name, Ok(Attempt::Busy(holder))),
        Claim::Settled => return (name, Ok(Attempt::Settled)),
    };
    reporter.event(wave, Some(&name), "start", "");
    let result = match cluster {
        Err(e) => {
            let outcome = Outcome::Failed(format!("{e:#}"));
            // Still under the lock (dropped below), as take_turn records its outcomes.
            fleet_journal::set_state(
                &shared.journal,
                fleet,
                &name,
                outcome.state(),
                Some(outcome.reason()),
            )
            .map(|_| outcome)
            .map_err(anyhow::Error::from)
        }
        Ok(c) => match AssertUnwindSafe(cluster::take_turn(&shared, &c, claimed))
            .catch_unwind()
            .await
        {
            Ok(r) => r,
            Err(_) => {
                let outcome =
                    Outcome::Failed("the coordinator hit a bug (a panic) upgrading it".into());
                fleet_journal::set_state(
                    &shared.journal,
                    fleet,
                    &name,
                    outcome.state(),
                    Some(outcome.reason()),
                )
                .map(|_| outcome)
                .map_err(anyhow::Error::from)
            }
        },
    };
    (name, result.map(Attempt::Drove))
}

/// Runs the fleet's remaining waves and closes the fleet run with its result.
pub async fn drive(
    shared: Arc<Shared>,
    inv: &Inventory,
    reporter: &FleetReporter,
) -> Result<FleetReport> {
    let j = shared.journal.clone();
    let ordered: Vec<String> = fleet_journal::clusters(&j, shared.fleet)?
        .into_iter()
        .map(|c| c.cluster)
        .collect();
    let limit = shared.opts.concurrency.limit(ordered.len()).max(1);
    let waves = plan::waves(&ordered, &shared.opts.canary, limit);
    let mut turns = Turns {
        shared: shared.clone(),
        inv,
        reporter,
        limit,
        holder: this_process_holder(),
        elsewhere: HashSet::new(),
    };
    let mut halted: Option<String> = None;
    for (i, wave) in waves.iter().enumerate() {
        if let Some(why) = turns.wave(wave, &waves[i + 1..]).await? {
            halted = Some(why);
            break;
        }
    }
    turns.settle(None, &ordered, halted.is_some()).await?;
    if halted.is_none()
        && let Verdict::Halt(why) = verdict(&turns.states()?, &shared)
    {
        halted = Some(why);
    }
    finish(&shared, reporter, halted)
}

/// Closes the fleet run with its result: halted, all upgraded, or incomplete.
fn finish(
    shared: &Shared,
    reporter: &FleetReporter,
    halted: Option<String>,
) -> Result<FleetReport> {
    let j = shared.journal.clone();
    let states = fleet_journal::clusters(&j, shared.fleet)?;
    let result = match &halted {
        Some(_) => FleetResult::Halted,
        None if states
            .iter()
            .all(|c| matches!(c.state, ClusterState::Upgraded | ClusterState::UpToDate)) =>
        {
            FleetResult::Upgraded
        }
        None => FleetResult::Incomplete,
    };
    if let Some(why) = &halted {
        reporter.event(None, None, "halted", why);
    }
    fleet_journal::finish(&j, shared.fleet, result, halted.as_deref())?;
    let run = fleet_journal::run(&j, shared.fleet)?
        .ok_or_else(|| anyhow!("fleet run {} vanished from the journal", shared.fleet))?;
    Ok(FleetReport::new(
        &run,
        &fleet_journal::clusters(&j, shared.fleet)?,
    ))
}
