//! Carries a fleet run out wave by wave: canaries first, each wave's clusters concurrently (one
//! task each), the failure budget checked before and after every wave, an optional soak between
//! waves. Every cluster's state is journaled as it changes, so a killed run resumes.

use super::cluster::{self, Outcome, Shared};
use super::journal::{self as fleet_journal, ClusterState, FleetClusterRecord, FleetResult};
use super::plan::{self, Verdict};
use super::report::{FleetReport, FleetReporter};
use crate::inventory::Inventory;
use anyhow::{Result, anyhow};
use futures::FutureExt;
use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

/// Whether a cluster still needs its turn in this run.
fn needs_turn(state: ClusterState) -> bool {
    matches!(
        state,
        ClusterState::Pending | ClusterState::Running | ClusterState::Skipped
    )
}

fn verdict(states: &HashMap<String, FleetClusterRecord>, shared: &Shared) -> Verdict {
    let failed = |canary_only: bool| {
        let mut v: Vec<String> = states
            .values()
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

/// Runs the fleet's remaining waves and closes the fleet run with its result.
pub async fn drive(
    shared: Arc<Shared>,
    inv: &Inventory,
    reporter: &FleetReporter,
) -> Result<FleetReport> {
    let j = shared.journal.clone();
    let records = fleet_journal::clusters(&j, shared.fleet)?;
    let ordered: Vec<String> = records.iter().map(|c| c.cluster.clone()).collect();
    let mut states: HashMap<String, FleetClusterRecord> = records
        .into_iter()
        .map(|c| (c.cluster.clone(), c))
        .collect();
    let limit = shared.opts.concurrency.limit(ordered.len());
    let waves = plan::waves(&ordered, &shared.opts.canary, limit);
    let mut halted: Option<String> = None;
    for (i, wave) in waves.iter().enumerate() {
        let todo: Vec<String> = wave
            .clusters
            .iter()
            .filter(|c| states.get(*c).is_some_and(|r| needs_turn(r.state)))
            .cloned()
            .collect();
        if todo.is_empty() {
            continue;
        }
        if let Verdict::Halt(why) = verdict(&states, &shared) {
            halted = Some(why);
            break;
        }
        reporter.event(
            Some(wave.number),
            None,
            "wave",
            &format!(
                "{}{} cluster(s) of {}, at most {limit} at once",
                if wave.canary { "canary: " } else { "" },
                todo.len(),
                wave.clusters.len()
            ),
        );
        let mut tasks = tokio::task::JoinSet::new();
        for name in todo {
            let Some(previous) = states.get(&name).cloned() else {
                continue;
            };
            let cluster = inv.cluster(&name).cloned();
            let shared = shared.clone();
            reporter.event(Some(wave.number), Some(&name), "start", "");
            tasks.spawn(async move {
                let outcome = match cluster {
                    Err(e) => Outcome::Failed(format!("{e:#}")),
                    Ok(c) => AssertUnwindSafe(cluster::take_turn(&shared, &c, &previous))
                        .catch_unwind()
                        .await
                        .unwrap_or_else(|_| {
                            Outcome::Failed(
                                "the coordinator hit a bug (a panic) upgrading it".into(),
                            )
                        }),
                };
                (name, outcome)
            });
        }
        while let Some(joined) = tasks.join_next().await {
            let (name, outcome) =
                joined.map_err(|e| anyhow!("a cluster task ended abnormally: {e}"))?;
            let state = outcome.state();
            fleet_journal::set_state(&j, shared.fleet, &name, state, Some(outcome.reason()))?;
            reporter.event(
                Some(wave.number),
                Some(&name),
                state.as_str(),
                outcome.reason(),
            );
            if let Some(r) = states.get_mut(&name) {
                r.state = state;
                r.reason = Some(outcome.reason().to_string());
            }
        }
        let more = waves[i + 1..]
            .iter()
            .flat_map(|w| &w.clusters)
            .any(|c| states.get(c).is_some_and(|r| needs_turn(r.state)));
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
    }
    if halted.is_none()
        && let Verdict::Halt(why) = verdict(&states, &shared)
    {
        halted = Some(why);
    }
    let result = match &halted {
        Some(_) => FleetResult::Halted,
        None if states.values().all(|c| c.state == ClusterState::Upgraded) => FleetResult::Upgraded,
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
