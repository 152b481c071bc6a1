//! `upgrade` (a new run after preflight) and `resume` (the open or halted run, from its journal).

use super::plan::{
    PLAN_REFUSALS, PlanReport, check_archive, checks_text, make_plan, refuse_bad_target,
};
use super::{RunRequest, context, exit_for, resumable_run, target_of, until_interrupted};
use crate::archive::{self, ArchiveSource};
use crate::error::BadInput;
use crate::journal::RunRecord;
use crate::journal::{NewRun, RunKind, RunResult};
use crate::procedure::decide::any_stop;
use crate::procedure::{Ctx, RunOptions, actor, lock_cluster};
use crate::report::{Reporter, Summary};
use anyhow::{Context, Result, bail};
use std::process::ExitCode;

pub async fn upgrade_command(req: RunRequest) -> Result<ExitCode> {
    let output = req.target.output;
    let summary = upgrade_summary(req, true).await?;
    Reporter::new(output).summary(&summary);
    Ok(exit_for(&summary))
}

/// Runs an upgrade and returns its summary; `progress` shows step events as they happen.
pub async fn upgrade_summary(req: RunRequest, progress: bool) -> Result<Summary> {
    let to = target_of(&req)?;
    let reporter = if progress {
        Reporter::new(req.target.output)
    } else {
        Reporter::silent()
    };
    let ctx = context(&req, reporter).await?;
    let archive = archive::resolve_for(&req.release, req.to.as_deref()).await?;
    let mut report = make_plan(
        &ctx,
        &to,
        archive.as_ref().map(|a| a.size_bytes()).unwrap_or(0),
    )
    .await;
    check_archive(&mut report, archive.as_ref(), &to).await;
    refuse_bad_target(&report, &PLAN_REFUSALS)?;
    refuse_open_run(&ctx)?;
    if !report.ready {
        return Ok(refused(&ctx, &report));
    }
    let Some(archive) = archive else {
        return Err(BadInput(
            "give the release with --archive FILE or --archive-url URL --sha256 HEX".into(),
        )
        .into());
    };
    let from = report.from.clone().unwrap_or_default();
    let options = RunOptions {
        to: to.clone(),
        from: from.clone(),
        archive: Some(archive),
        auto_rollback: req.auto_rollback,
        timeouts: ctx.timeouts.clone(),
        no_finalize: req.no_finalize,
    };
    let (_lock, beat) = lock_cluster(&ctx)?;
    let run = ctx.journal.create_run(&NewRun {
        cluster: ctx.cluster.name.clone(),
        kind: RunKind::Upgrade,
        from_version: from,
        to_version: to,
        plan_json: serde_json::to_string(&report)?,
        actor: actor(),
        options_json: serde_json::to_string(&options)?,
    })?;
    let summary = until_interrupted(crate::procedure::drive(&ctx, run, &options), &req).await;
    beat.abort();
    Ok(clean_up_when_finalized(&ctx, run, &options, summary?).await)
}

/// A new run is refused while another is unfinished: it must be resumed or rolled back first.
fn refuse_open_run(ctx: &Ctx) -> Result<()> {
    if let Some(open) = resumable_run(ctx)? {
        bail!(
            "cluster '{}' has an unfinished {} run (#{}, {} -> {}) started by {}; continue it with `bbupgrade resume` (with a corrected --archive if staging failed), abandon it with `bbupgrade abort` if it stopped no node, or undo it with `bbupgrade rollback`",
            ctx.cluster.name,
            open.kind.as_str(),
            open.id,
            open.from_version,
            open.to_version,
            open.actor
        );
    }
    Ok(())
}

/// The summary of an upgrade refused by preflight; nothing was changed.
fn refused(ctx: &Ctx, report: &PlanReport) -> Summary {
    let failed: Vec<_> = report.checks.iter().filter(|c| !c.ok).cloned().collect();
    eprintln!(
        "preflight failed; nothing was changed:\n{}",
        checks_text(&failed)
    );
    Summary {
        cluster: ctx.cluster.name.clone(),
        from: report.from.clone().unwrap_or_default(),
        to: report.to.clone(),
        result: RunResult::Refused,
        error: Some(
            failed
                .iter()
                .map(|c| c.detail.clone())
                .collect::<Vec<_>>()
                .join("; "),
        ),
        ..Default::default()
    }
}

pub async fn resume_command(req: RunRequest) -> Result<ExitCode> {
    let mut ctx = context(&req, Reporter::new(req.target.output)).await?;
    let Some(open) = resumable_run(&ctx)? else {
        return Err(BadInput(format!(
            "cluster '{}' has no unfinished or halted run to resume",
            ctx.cluster.name
        ))
        .into());
    };
    let mut options: RunOptions = serde_json::from_str(&open.options_json)
        .with_context(|| format!("reading the options of run #{}", open.id))?;
    refuse_plan_changes(&req, &open, &options)?;
    if let Some(archive) = archive::resolve_for(&req.release, req.to.as_deref()).await? {
        correct_archive(&ctx, &open, &mut options, archive)?;
    }
    if let Some(s) = req.soak_secs {
        options.timeouts.soak_secs = s;
    }
    options.no_finalize |= req.no_finalize;
    ctx.timeouts = options.timeouts.clone();
    let (_lock, beat) = lock_cluster(&ctx)?;
    ctx.reporter.step(
        None,
        "resume",
        "info",
        &format!(
            "resuming {} run #{} ({} -> {})",
            open.kind.as_str(),
            open.id,
            open.from_version,
            open.to_version
        ),
    );
    let summary = if open.kind == RunKind::Rollback {
        until_interrupted(
            crate::procedure::drive_rollback(&ctx, open.id, &options),
            &req,
        )
        .await
    } else {
        until_interrupted(crate::procedure::drive(&ctx, open.id, &options), &req).await
    };
    beat.abort();
    let summary = match open.kind {
        RunKind::Upgrade => clean_up_when_finalized(&ctx, open.id, &options, summary?).await,
        RunKind::Rollback => summary?,
    };
    ctx.reporter.summary(&summary);
    Ok(exit_for(&summary))
}

/// After an upgrade run approved (finalized), the agents remove old installs beyond their
/// `keep_installs`; a node that cannot is named in the notes.
async fn clean_up_when_finalized(
    ctx: &Ctx,
    run: crate::journal::RunId,
    options: &RunOptions,
    mut summary: Summary,
) -> Summary {
    if summary.result == RunResult::Upgraded && !options.no_finalize {
        let notes = crate::procedure::clean_up_installs(ctx, run).await;
        summary.notes.extend(notes);
    }
    summary
}

/// `resume` continues the plan recorded with the run: another target or failure policy would
/// change it, and is refused with what to do instead.
fn refuse_plan_changes(req: &RunRequest, open: &RunRecord, options: &RunOptions) -> Result<()> {
    if let Some(to) = &req.to
        && to != &open.to_version
    {
        return Err(BadInput(format!(
            "run #{} goes to {}; `resume --to {to}` would change its plan: resume without --to, or end the run (`bbupgrade abort` if it stopped no node, else `bbupgrade rollback`) and start a new upgrade",
            open.id, open.to_version
        ))
        .into());
    }
    if req.auto_rollback && !options.auto_rollback {
        return Err(BadInput(format!(
            "--auto-rollback would change the failure policy recorded with run #{}; resume without it",
            open.id
        ))
        .into());
    }
    if req.release.sha256.is_some() && !req.release.is_given() {
        return Err(BadInput("--sha256 goes with --archive or --archive-url".into()).into());
    }
    Ok(())
}

/// Records a corrected release for a run that stopped no node yet (a wrong archive halted its
/// staging); once a node was stopped, every node must come back on the build it recorded.
fn correct_archive(
    ctx: &Ctx,
    open: &RunRecord,
    options: &mut RunOptions,
    archive: ArchiveSource,
) -> Result<()> {
    if open.kind != RunKind::Upgrade {
        return Err(BadInput(format!(
            "run #{} is a rollback, which uses no archive; resume without --archive",
            open.id
        ))
        .into());
    }
    if any_stop(&ctx.journal.steps(open.id)?) {
        return Err(BadInput(format!(
            "run #{} has stopped a node already with the archive it recorded, so its release cannot change: resume without --archive/--archive-url, or `bbupgrade rollback`",
            open.id
        ))
        .into());
    }
    options.archive = Some(archive);
    ctx.journal
        .set_run_options(open.id, &serde_json::to_string(options)?)?;
    ctx.reporter.step(
        None,
        "resume",
        "info",
        &format!(
            "run #{} now stages the archive given (SHA-256 {})",
            open.id,
            options.archive.as_ref().map_or("", |a| a.sha256())
        ),
    );
    Ok(())
}
