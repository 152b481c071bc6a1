//! `plan`: preflight checks and the order the nodes would go in, changing nothing.

use super::{RunRequest, context, target_of};
use crate::archive;
use crate::error::BadInput;
use crate::node_match;
use crate::plan::{self, Check};
use crate::procedure::Ctx;
use crate::report::{Output, Reporter};
use anyhow::Result;
use serde::Serialize;
use std::process::ExitCode;

pub(super) fn checks_text(checks: &[Check]) -> String {
    checks
        .iter()
        .map(|c| {
            format!(
                "  [{}] {:<20} {}",
                if c.ok { " ok " } else { "FAIL" },
                c.name,
                c.detail
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The ordered plan and the preflight verdict, changing nothing.
#[derive(Debug, Serialize)]
pub struct PlanReport {
    pub cluster: String,
    pub from: Option<String>,
    pub to: String,
    pub ready: bool,
    pub checks: Vec<Check>,
    pub order: Vec<plan::Busyness>,
    pub load_balancer: String,
}

pub async fn make_plan(ctx: &Ctx, to: &str, archive_bytes: u64) -> PlanReport {
    let observed = ctx.observe().await;
    let (view, zdu_err) = match ctx.cluster_view().await {
        Ok(v) => (Some(v), None),
        Err(e) => (None, Some(format!("{e:#}"))),
    };
    let checks = plan::preflight(
        &observed,
        view.as_ref(),
        zdu_err.as_deref(),
        to,
        archive_bytes,
    );
    let order = plan::rank_least_busy(
        observed
            .iter()
            .map(|o| {
                let z = view
                    .as_ref()
                    .and_then(|v| node_match::match_node(v, &o.bitbucket).row());
                plan::Busyness {
                    id: o.id.clone(),
                    tasks_total: z.map(|z| z.tasks()).unwrap_or(0),
                    active_user_count: z.map(|z| z.users()).unwrap_or(0),
                    cpu_percent: o.cpu_percent,
                }
            })
            .collect(),
    );
    PlanReport {
        cluster: ctx.cluster.name.clone(),
        from: plan::common_version(&observed).ok(),
        to: to.to_string(),
        ready: checks.iter().all(|c| c.ok),
        checks,
        order,
        load_balancer: ctx.lb.describe(),
    }
}

/// Checks whose failure `plan` reports as bad input (exit 2): a target that is not a bug-fix upgrade
/// of the cluster's version, a rolling-upgrade API that refuses or cannot be reached (not clustered,
/// credentials without system-admin rights, a wrong URL), a cluster view the nodes cannot be mapped
/// to. `upgrade` refuses the same with a "refused" summary, also exit 2.
pub(super) const PLAN_REFUSALS: [&str; 4] = [
    "target",
    plan::CHECK_API,
    plan::CHECK_MAPPED,
    crate::release_check::CHECK_ARCHIVE,
];

/// Adds the archive's check to `report`: no plan is ready with an archive that is not the release.
pub(super) async fn check_archive(
    report: &mut PlanReport,
    archive: Option<&crate::archive::ArchiveSource>,
    to: &str,
) {
    if let Some(a) = archive {
        report.checks.push(crate::release_check::check(a, to).await);
        report.ready = report.checks.iter().all(|c| c.ok);
    }
}

/// Refuses (bad input, exit 2) when one of the `refusing` checks failed.
pub(super) fn refuse_bad_target(report: &PlanReport, refusing: &[&str]) -> Result<()> {
    let failed: Vec<&str> = report
        .checks
        .iter()
        .filter(|c| !c.ok && refusing.contains(&c.name.as_str()))
        .map(|c| c.detail.as_str())
        .collect();
    if !failed.is_empty() {
        return Err(BadInput(format!("refused: {}", failed.join("; "))).into());
    }
    Ok(())
}

pub async fn plan_command(req: RunRequest) -> Result<ExitCode> {
    let to = target_of(&req)?;
    let ctx = context(&req, Reporter::new(req.target.output)).await?;
    let archive = archive::resolve_for(&req.release, req.to.as_deref()).await?;
    let archive_bytes = archive.as_ref().map(|a| a.size_bytes()).unwrap_or(0);
    let mut report = make_plan(&ctx, &to, archive_bytes).await;
    check_archive(&mut report, archive.as_ref(), &to).await;
    match req.target.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        Output::Human => {
            print!("{}", render_plan(&report));
            if archive.is_none() {
                println!(
                    "  (archive not checked: give --archive FILE or --archive-url URL --sha256 HEX)"
                );
            }
        }
    }
    refuse_bad_target(&report, &PLAN_REFUSALS)?;
    Ok(if report.ready {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// The plan as people read it: the checks, the order, the verdict.
fn render_plan(report: &PlanReport) -> String {
    let mut out = format!(
        "plan for cluster {}: {} -> {} ({})\n{}\norder (least busy first, re-ranked before each node):\n",
        report.cluster,
        report.from.as_deref().unwrap_or("?"),
        report.to,
        report.load_balancer,
        checks_text(&report.checks)
    );
    for (i, b) in report.order.iter().enumerate() {
        out += &format!(
            "  {}. {} (tasks {}, active users {}, cpu {:.0}%)\n",
            i + 1,
            b.id,
            b.tasks_total,
            b.active_user_count,
            b.cpu_percent
        );
    }
    out += if report.ready {
        "ready to upgrade\n"
    } else {
        "NOT ready: fix the failed checks first\n"
    };
    out
}
