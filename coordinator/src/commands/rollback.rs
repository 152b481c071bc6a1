//! `rollback`: a new run that returns every upgraded node to the original version, one at a time.

use super::{RunRequest, context, exit_for, until_interrupted};
use crate::error::BadInput;
use crate::journal::{NewRun, RunKind, RunRecord, RunResult};
use crate::procedure::{RunOptions, actor, lock_cluster};
use crate::report::Reporter;
use crate::zdu::{ClusterState, ClusterView};
use anyhow::Result;
use std::process::ExitCode;

pub async fn rollback_command(req: RunRequest) -> Result<ExitCode> {
    let ctx = context(&req, Reporter::new(req.target.output)).await?;
    let (_lock, beat) = lock_cluster(&ctx)?;
    // The upgrade being undone: the open one, or the latest.
    let last = match ctx.journal.open_run(&ctx.cluster.name)? {
        Some(r) => Some(r),
        None => ctx.journal.latest_run(&ctx.cluster.name)?,
    };
    let view = ctx.cluster_view().await?;
    let (original, upgraded_to) = versions(last.as_ref(), &view, &req)?;
    refuse_finalized(&view, &original)?;
    if let Some(r) = &last
        && r.kind == RunKind::Upgrade
        && r.result.is_none()
    {
        ctx.journal
            .finish_run(r.id, RunResult::Halted, Some("superseded by a rollback"))?;
    }
    let options = RunOptions {
        to: original.clone(),
        from: upgraded_to.clone(),
        archive: None,
        auto_rollback: false,
        timeouts: ctx.timeouts.clone(),
        no_finalize: false,
    };
    let run = ctx.journal.create_run(&NewRun {
        cluster: ctx.cluster.name.clone(),
        kind: RunKind::Rollback,
        from_version: upgraded_to,
        to_version: original,
        plan_json: "{}".into(),
        actor: actor(),
        options_json: serde_json::to_string(&options)?,
    })?;
    let summary =
        until_interrupted(crate::procedure::drive_rollback(&ctx, run, &options), &req).await;
    beat.abort();
    let summary = summary?;
    ctx.reporter.summary(&summary);
    Ok(exit_for(&summary))
}

/// (original version, version upgraded to): from the upgrade run being undone, else from
/// Bitbucket's original version and `--to`.
fn versions(
    last: Option<&RunRecord>,
    view: &ClusterView,
    req: &RunRequest,
) -> Result<(String, String)> {
    match last {
        Some(r) if r.kind == RunKind::Upgrade => Ok((r.from_version.clone(), r.to_version.clone())),
        _ => Ok((
            view.original_version.clone().ok_or_else(|| {
                BadInput("no upgrade run in the journal and Bitbucket reports no original version; nothing to roll back".into())
            })?,
            req.to.clone().unwrap_or_default(),
        )),
    }
}

/// A finalized upgrade (STABLE, upgrade mode off, not on the original) cannot be rolled back.
fn refuse_finalized(view: &ClusterView, original: &str) -> Result<()> {
    if view.state == ClusterState::Stable
        && !view.upgrade_mode_enabled
        && !view.all_live_run(original)
    {
        return Err(BadInput(format!(
            "the cluster is STABLE on {} with upgrade mode off: the upgrade was finalized and its database tasks ran, so a rolling rollback is not possible; restore from backup",
            view.live().find_map(|n| n.version.as_deref()).unwrap_or("?")
        ))
        .into());
    }
    Ok(())
}
