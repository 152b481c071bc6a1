//! The commands that drive one cluster — `plan`, `upgrade`, `resume`, `rollback` — over plain
//! options the CLI builds: each loads the cluster's context, decides what to do from the journal
//! and the live state, and hands the run to the procedure.

mod plan;
mod recovery;
mod rollback;
mod upgrade;

pub use plan::{PlanReport, make_plan, plan_command};
pub use recovery::{ABORTED_KEY, abort_command, finalize_command};
pub use rollback::rollback_command;
pub use upgrade::{resume_command, upgrade_command, upgrade_summary};

use crate::archive::ReleaseSpec;
use crate::error::{BadInput, Interrupted};
use crate::inventory::load_inventory;
use crate::journal::{RunRecord, RunResult, open_journal};
use crate::procedure::Ctx;
use crate::report::{Output, Reporter, Summary};
use anyhow::Result;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

/// Which cluster of which inventory, and how to print.
#[derive(Debug, Clone)]
pub struct ClusterTarget {
    pub inventory: PathBuf,
    /// `None`: the inventory's only cluster.
    pub cluster: Option<String>,
    pub output: Output,
}

/// What the admin asked of a cluster's run (unchecked; each command checks what it uses).
#[derive(Debug, Clone)]
pub struct RunRequest {
    pub target: ClusterTarget,
    /// The bug-fix release to upgrade to.
    pub to: Option<String>,
    pub release: ReleaseSpec,
    /// The journal (`postgres://...`, `sqlite:PATH` or a path); default from the inventory.
    pub state: Option<String>,
    pub auto_rollback: bool,
    /// Overrides the inventory's soak time.
    pub soak_secs: Option<u64>,
    /// Stop before approving (`bbupgrade finalize` approves later).
    pub no_finalize: bool,
}

/// Loads what every command needs.
async fn context(req: &RunRequest, reporter: Reporter) -> Result<Ctx> {
    let inv = load_inventory(&req.target.inventory)?;
    let mut cluster = inv
        .pick_cluster(req.target.cluster.as_deref())
        .map_err(|e| BadInput(format!("{e:#}")))?
        .clone();
    if let Some(s) = req.soak_secs {
        cluster.timeouts.soak_secs = s;
    }
    let tls = inv
        .tls
        .load()
        .map_err(|e| BadInput(format!("coordinator TLS files: {e:#}")))?;
    let journal = Arc::new(open_journal(req.state.as_deref(), inv.state.as_deref())?);
    Ctx::new(cluster, tls, journal, reporter)
}

/// The target version, checked to be a version.
fn target_of(req: &RunRequest) -> Result<String> {
    let to = req
        .to
        .clone()
        .ok_or_else(|| BadInput("give the target version with --to, e.g. --to 8.19.6".into()))?;
    to.parse::<bbupgrade_common::version::Version>()
        .map_err(|e| BadInput(e.to_string()))?;
    Ok(to)
}

fn exit_for(summary: &Summary) -> ExitCode {
    match summary.result {
        RunResult::Upgraded | RunResult::RolledBack if summary.error.is_none() => ExitCode::SUCCESS,
        _ => ExitCode::from(1),
    }
}

/// The run `resume` continues: an open one (a coordinator died), or the latest if it halted and
/// was not abandoned with `abort`.
pub fn resumable_run(ctx: &Ctx) -> Result<Option<RunRecord>> {
    if let Some(r) = ctx.journal.open_run(&ctx.cluster.name)? {
        return Ok(Some(r));
    }
    let Some(r) = ctx.journal.latest_run(&ctx.cluster.name)? else {
        return Ok(None);
    };
    let aborted = ctx.journal.get_run_state(r.id, ABORTED_KEY)?.is_some();
    Ok((r.result == Some(RunResult::Halted) && !aborted).then_some(r))
}

/// Drives `work` until it ends or the admin presses Ctrl-C. A run may stop at any point and be
/// resumed (every step is journaled, agent operations carry ids), so Ctrl-C drops it where it is
/// and prints the exact `resume` command.
async fn until_interrupted(
    work: impl std::future::Future<Output = Summary>,
    req: &RunRequest,
) -> Result<Summary> {
    tokio::select! {
        summary = work => Ok(summary),
        _ = tokio::signal::ctrl_c() => {
            eprintln!(
                "\ninterrupted: the run stays in the journal where it stopped (a node taken out of the load balancer stays out until the run goes on). Continue it with:\n  {}\nor undo it with `bbupgrade rollback` and the same --inventory and --cluster.",
                resume_line(req)
            );
            Err(Interrupted.into())
        }
    }
}

/// `bbupgrade resume` with the inventory (absolute), cluster and journal of `req`.
fn resume_line(req: &RunRequest) -> String {
    let inventory =
        std::path::absolute(&req.target.inventory).unwrap_or_else(|_| req.target.inventory.clone());
    let mut words = vec![
        "bbupgrade".to_string(),
        "resume".into(),
        "--inventory".into(),
        shell_word(&inventory.display().to_string()),
    ];
    if let Some(cluster) = &req.target.cluster {
        words.extend(["--cluster".to_string(), shell_word(cluster)]);
    }
    if let Some(state) = &req.state {
        words.extend(["--state".to_string(), shell_word(state)]);
    }
    words.join(" ")
}

/// `s` as one shell word: as is when plain, else single-quoted.
fn shell_word(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-:@=+,".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_resume_line_quotes_what_the_shell_would_split() {
        let req = RunRequest {
            target: ClusterTarget {
                inventory: "/etc/bbupgrade/my inventory.toml".into(),
                cluster: Some("prod".into()),
                output: Output::Human,
            },
            to: None,
            release: ReleaseSpec::default(),
            state: Some("sqlite:/var/lib/bbupgrade/j.db".into()),
            auto_rollback: false,
            soak_secs: None,
            no_finalize: false,
        };
        assert_eq!(
            resume_line(&req),
            "bbupgrade resume --inventory '/etc/bbupgrade/my inventory.toml' --cluster prod --state sqlite:/var/lib/bbupgrade/j.db"
        );
        assert_eq!(shell_word("it's"), "'it'\\''s'");
    }
}
