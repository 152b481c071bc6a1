//! Getting out of a run or closing it later: `finalize` approves an upgrade left unfinalized
//! (`upgrade --no-finalize`) and has the agents clean up old installs; `abort` abandons a run that
//! stopped no node (journaled; staged installs stay, upgrade mode cancelled).

use super::{RunRequest, context, exit_for, resumable_run};
use crate::error::BadInput;
use crate::journal::{RunKind, RunRecord, RunResult};
use crate::procedure::decide::any_stop;
use crate::procedure::{Ctx, RunOptions, Step, actor, lock_cluster};
use crate::report::{Reporter, Summary};
use crate::zdu::NodeState;
use anyhow::{Context, Result};
use std::process::ExitCode;

/// The run-state key that marks a run abandoned by `abort`: `resume` no longer continues it.
pub const ABORTED_KEY: &str = "aborted_by";

pub async fn finalize_command(req: RunRequest) -> Result<ExitCode> {
    let ctx = context(&req, Reporter::new(req.target.output)).await?;
    let run = upgraded_run(&ctx)?;
    refuse_unless_all_on(&ctx, &run.to_version).await?;
    let options: RunOptions = serde_json::from_str(&run.options_json)
        .with_context(|| format!("reading the options of run #{}", run.id))?;
    let (_lock, beat) = lock_cluster(&ctx)?;
    let mut summary = crate::procedure::finalize(&ctx, run.id, &options).await;
    if summary.result == RunResult::Upgraded {
        summary
            .notes
            .extend(crate::procedure::clean_up_installs(&ctx, run.id).await);
    }
    beat.abort();
    ctx.reporter.summary(&summary);
    Ok(exit_for(&summary))
}

/// The cluster's latest run, which `finalize` closes: an upgrade that ended upgraded.
fn upgraded_run(ctx: &Ctx) -> Result<RunRecord> {
    let name = &ctx.cluster.name;
    let Some(run) = ctx.journal.latest_run(name)? else {
        return Err(BadInput(format!(
            "cluster '{name}' has no run in the journal to finalize"
        ))
        .into());
    };
    match (run.kind, run.result) {
        (RunKind::Upgrade, Some(RunResult::Upgraded)) => Ok(run),
        (RunKind::Upgrade, None | Some(RunResult::Halted)) => Err(BadInput(format!(
            "run #{} on cluster '{name}' is unfinished; finish it with `bbupgrade resume` (or undo it with `bbupgrade rollback`) before finalizing",
            run.id
        ))
        .into()),
        _ => Err(BadInput(format!(
            "the latest run on cluster '{name}' (#{}, {}) is no completed upgrade; nothing to finalize",
            run.id,
            run.kind.as_str()
        ))
        .into()),
    }
}

/// Approving is final (Bitbucket runs its database tasks): every node must be ACTIVE on `to`.
async fn refuse_unless_all_on(ctx: &Ctx, to: &str) -> Result<()> {
    let view = ctx.cluster_view().await?;
    let behind: Vec<String> = ctx
        .cluster
        .nodes
        .iter()
        .filter(|n| {
            !ctx.row(&view, n)
                .row()
                .is_some_and(|z| z.state == NodeState::Active && z.runs(to))
        })
        .map(|n| n.id.clone())
        .collect();
    if !behind.is_empty() {
        return Err(BadInput(format!(
            "not finalizing: node(s) {} are not ACTIVE on {to}; `bbupgrade status` shows them",
            behind.join(", ")
        ))
        .into());
    }
    Ok(())
}

pub async fn abort_command(req: RunRequest) -> Result<ExitCode> {
    let ctx = context(&req, Reporter::new(req.target.output)).await?;
    let name = ctx.cluster.name.clone();
    let Some(run) = resumable_run(&ctx)? else {
        return Err(BadInput(format!(
            "cluster '{name}' has no unfinished or halted run to abort"
        ))
        .into());
    };
    if run.kind != RunKind::Upgrade {
        return Err(BadInput(format!(
            "run #{} is a rollback; it cannot be abandoned half-way: `bbupgrade resume` finishes it",
            run.id
        ))
        .into());
    }
    let steps = ctx.journal.steps(run.id)?;
    if any_stop(&steps) {
        return Err(BadInput(format!(
            "run #{} has stopped a node already, so it cannot be abandoned: `bbupgrade resume` finishes it, `bbupgrade rollback` undoes it",
            run.id
        ))
        .into());
    }
    let (_lock, beat) = lock_cluster(&ctx)?;
    let summary = abandon(&ctx, &run).await;
    beat.abort();
    ctx.reporter.summary(&summary);
    Ok(if summary.error.is_none() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// Cancels upgrade mode (journaled in the run) and closes the run as halted, marked aborted.
async fn abandon(ctx: &Ctx, run: &RunRecord) -> Summary {
    let mut summary = Summary {
        cluster: ctx.cluster.name.clone(),
        from: run.from_version.clone(),
        to: run.to_version.clone(),
        result: RunResult::Halted,
        run_id: Some(run.id.0),
        ..Default::default()
    };
    let cancelled = ctx
        .step(run.id, None, Step::CancelUpgradeMode, async {
            let view = ctx.cluster_view().await?;
            if !view.upgrade_mode_enabled {
                return Ok(((), "upgrade mode was off".to_string()));
            }
            ctx.zdu.cancel().await?;
            Ok(((), "upgrade mode cancelled".to_string()))
        })
        .await;
    if let Err(e) = cancelled {
        summary.error = Some(format!(
            "could not cancel upgrade mode: {e:#}; run `bbupgrade abort` again"
        ));
        return summary;
    }
    let who = actor();
    let why = format!("aborted by {who}: no node was stopped; staged installs stay");
    let recorded = ctx
        .journal
        .set_run_state(run.id, ABORTED_KEY, &who)
        .and_then(|_| {
            ctx.journal
                .finish_run(run.id, RunResult::Halted, Some(&why))
        });
    match recorded {
        Ok(()) => summary.notes.push(format!(
            "run #{} abandoned: no node was stopped, upgrade mode is off, staged installs stay; `bbupgrade upgrade` may start a new run",
            run.id
        )),
        Err(e) => summary.error = Some(format!("could not record the abort in the journal: {e:#}")),
    }
    summary
}
