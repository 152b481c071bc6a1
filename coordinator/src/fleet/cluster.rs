//! One cluster of a fleet run, through the same path as `bbupgrade upgrade` and `resume`: its
//! maintenance window, preflight, the cluster's lock, a journaled cluster run and the node-by-node
//! driver. The agent clients and HTTP clients live only while the cluster is upgraded.

use super::FleetOptions;
use super::journal::{self as fleet_journal, ClusterState, FleetClusterRecord, FleetRunId};
use super::window::in_window;
use crate::inventory::Cluster;
use crate::journal::{Journal, NewRun, RunKind, RunResult, this_process_holder};
use crate::report::{Reporter, Summary};
use crate::run::{self, Ctx, RunOptions};
use anyhow::{Context, Result, anyhow};
use bbupgrade_common::tls::TlsMaterial;
use std::sync::Arc;

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
    Failed(String),
    Skipped(String),
}

impl Outcome {
    pub fn state(&self) -> ClusterState {
        match self {
            Outcome::Upgraded(_) => ClusterState::Upgraded,
            Outcome::Failed(_) => ClusterState::Failed,
            Outcome::Skipped(_) => ClusterState::Skipped,
        }
    }

    pub fn reason(&self) -> &str {
        match self {
            Outcome::Upgraded(r) | Outcome::Failed(r) | Outcome::Skipped(r) => r,
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

/// Takes the cluster's turn; every error ends up as a failed outcome with its reason.
pub async fn take_turn(
    shared: &Shared,
    cluster: &Cluster,
    previous: &FleetClusterRecord,
) -> Outcome {
    if let Some(why) = window_refusal(cluster, previous.state, jiff::Timestamp::now()) {
        return Outcome::Skipped(why);
    }
    if let Err(e) = fleet_journal::set_state(
        &shared.journal,
        shared.fleet,
        &cluster.name,
        ClusterState::Running,
        None,
    ) {
        return Outcome::Failed(format!("{e}"));
    }
    match upgrade(shared, cluster, previous).await {
        Ok(o) => o,
        Err(e) => Outcome::Failed(format!("{e:#}")),
    }
}

async fn upgrade(
    shared: &Shared,
    cluster: &Cluster,
    previous: &FleetClusterRecord,
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
    if let Some(open) = run::resumable_run(&ctx)? {
        if previous.cluster_run_id != Some(open.id.0) || open.kind != RunKind::Upgrade {
            return Ok(Outcome::Failed(format!(
                "has an unfinished {} run #{} ({} -> {}) that this fleet run did not start; finish it with `bbupgrade resume` or `bbupgrade rollback` first",
                open.kind.as_str(),
                open.id,
                open.from_version,
                open.to_version
            )));
        }
        // This fleet's own run, left open by a coordinator that died or halted by a failure.
        let options: RunOptions = serde_json::from_str(&open.options_json)
            .with_context(|| format!("reading the options of run #{}", open.id))?;
        ctx.timeouts = options.timeouts.clone();
        let (_lock, beat) = run::lock_cluster(&ctx)?;
        let summary = crate::upgrade::drive(&ctx, open.id, &options).await;
        beat.abort();
        return Ok(outcome_of(&summary, &format!("resumed run #{}", open.id)));
    }
    if let Some(id) = previous.cluster_run_id
        && ctx.journal.run(crate::journal::RunId(id))?.result == Some(RunResult::Upgraded)
    {
        return Ok(Outcome::Upgraded(format!("run #{id} had finished")));
    }
    let to = shared.opts.to.clone();
    let archive = shared.opts.archive.clone();
    let report = run::make_plan(&ctx, &to, archive.size_bytes()).await;
    if report.from.as_deref() == Some(to.as_str()) {
        return Ok(Outcome::Upgraded(format!("already on {to}")));
    }
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
        to: to.clone(),
        from: report.from.clone().unwrap_or_default(),
        archive: Some(archive),
        auto_rollback: shared.opts.auto_rollback,
        timeouts: ctx.timeouts.clone(),
    };
    let (_lock, beat) = run::lock_cluster(&ctx)?;
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
    let summary = crate::upgrade::drive(&ctx, run_id, &options).await;
    beat.abort();
    Ok(outcome_of(&summary, &format!("run #{run_id}")))
}

fn outcome_of(s: &Summary, run: &str) -> Outcome {
    if s.result == "upgraded" && s.error.is_none() {
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
        s.result,
        s.error.as_deref().unwrap_or("no error recorded")
    );
    if !s.notes.is_empty() {
        why.push_str(&format!("; {}", s.notes.join("; ")));
    }
    Outcome::Failed(why)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(window: Option<&str>) -> Cluster {
        Cluster {
            name: "c".into(),
            bitbucket_url: "http://127.0.0.1:1".into(),
            bitbucket_node_urls: vec![],
            token: crate::inventory::TokenSource::Env("T".into()),
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
            result: "upgraded".into(),
            ..Default::default()
        };
        assert!(
            matches!(outcome_of(&s, "run #1"), Outcome::Upgraded(r) if r.contains("8.19.3 -> 8.19.6"))
        );
        s.result = "halted".into();
        s.error = Some("node 'n1' failed: ERROR".into());
        s.notes = vec!["node 'n1' is stopped".into()];
        let o = outcome_of(&s, "run #2");
        assert_eq!(o.state(), ClusterState::Failed);
        assert!(o.reason().contains("node 'n1' failed") && o.reason().contains("is stopped"));
    }
}
