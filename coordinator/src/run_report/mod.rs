//! `bbupgrade report`: a run (or a fleet run) from the journal as one self-contained HTML page
//! for people — the change-advisory board, the post-mortem — or as JSON. `model` builds what is
//! shown from journal records (pure); `html` draws it.

pub mod html;
pub mod model;

use crate::error::BadInput;
use crate::fleet::journal::{self as fleet_journal, FleetRunId};
use crate::inventory::load_inventory;
use crate::journal::{Journal, JournalError, RunId};
use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use model::{FleetPage, RunPage};
use std::path::PathBuf;
use std::process::ExitCode;

/// How many run ids a "no such run" error lists.
const RUNS_LISTED: u32 = 10;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Default)]
pub enum Format {
    #[default]
    Html,
    Json,
}

#[derive(Args, Clone)]
pub struct ReportArgs {
    /// The inventory (TOML): where the journal is, and the cluster.
    #[arg(short = 'i', long, env = "BBUPGRADE_INVENTORY")]
    pub inventory: PathBuf,
    /// The cluster whose run `--run` names; may be left out when the inventory has only one.
    #[arg(short = 'c', long)]
    pub cluster: Option<String>,
    /// A cluster run id (see `bbupgrade status`).
    #[arg(
        long,
        conflicts_with = "fleet_run",
        required_unless_present = "fleet_run"
    )]
    pub run: Option<i64>,
    /// A fleet run id (see `bbupgrade fleet status`) instead of a cluster run.
    #[arg(long)]
    pub fleet_run: Option<i64>,
    /// The journal: `postgres://...`, `sqlite:PATH` or a path (default: from the inventory, else
    /// ./bbupgrade-journal.db).
    #[arg(long)]
    pub state: Option<String>,
    /// `html`: one self-contained page (no external assets); `json`: the same data for programs.
    #[arg(long, value_enum, default_value_t = Format::Html)]
    pub format: Format,
}

pub async fn command(args: ReportArgs) -> Result<ExitCode> {
    let inv = load_inventory(&args.inventory)?;
    let (state, inv_state) = (args.state.clone(), inv.state.clone());
    let cluster = match args.fleet_run {
        Some(_) => None,
        None => Some(
            inv.pick_cluster(args.cluster.as_deref())
                .map_err(|e| BadInput(format!("{e:#}")))?
                .name
                .clone(),
        ),
    };
    let text = tokio::task::spawn_blocking(move || -> Result<String> {
        let journal = existing_journal(state.as_deref(), inv_state.as_deref())?;
        match (args.fleet_run, args.run, &cluster) {
            (Some(id), _, _) => fleet_report(&journal, FleetRunId(id), args.format),
            (None, Some(id), Some(cluster)) => {
                run_report(&journal, cluster, RunId(id), args.format)
            }
            _ => Err(BadInput("give --cluster C --run ID, or --fleet-run ID".into()).into()),
        }
    })
    .await
    .context("reading the journal")??;
    print!("{text}");
    Ok(ExitCode::SUCCESS)
}

/// The journal as `status` finds it; one that does not exist has no run to report (bad input).
fn existing_journal(state: Option<&str>, inventory_state: Option<&str>) -> Result<Journal> {
    crate::status::existing_journal(state, inventory_state)?.ok_or_else(|| {
        BadInput("the journal does not exist yet: no run to report (see --state)".into()).into()
    })
}

fn run_report(j: &Journal, cluster: &str, id: RunId, format: Format) -> Result<String> {
    let run = match j.run(id) {
        Ok(r) if r.cluster == cluster => r,
        Ok(_) | Err(JournalError::NoSuchRun { .. }) => {
            let latest: Vec<String> = j
                .recent_runs(cluster, RUNS_LISTED)?
                .iter()
                .map(|r| {
                    format!(
                        "#{} ({} {} -> {}, {})",
                        r.id,
                        r.kind.as_str(),
                        r.from_version,
                        r.to_version,
                        crate::journal::format_ms(r.started_ms)
                    )
                })
                .collect();
            return Err(BadInput(format!(
                "cluster {cluster} has no run #{id} in {}; its latest runs: {}",
                j.location(),
                listed(&latest)
            ))
            .into());
        }
        Err(e) => return Err(e.into()),
    };
    let page = RunPage::build(&run, &j.steps(id)?);
    Ok(match format {
        Format::Html => html::run_page(&page),
        Format::Json => serde_json::to_string_pretty(&page)? + "\n",
    })
}

/// Run ids for an error message: comma-separated, or "none".
fn listed(latest: &[String]) -> String {
    if latest.is_empty() {
        "none".into()
    } else {
        latest.join(", ")
    }
}

fn fleet_report(j: &Journal, id: FleetRunId, format: Format) -> Result<String> {
    let Some(run) = fleet_journal::run(j, id)? else {
        let latest: Vec<String> = fleet_journal::recent(j, RUNS_LISTED)?
            .iter()
            .map(|r| {
                format!(
                    "#{} (to {}, {})",
                    r.id,
                    r.to_version,
                    crate::journal::format_ms(r.started_ms)
                )
            })
            .collect();
        return Err(BadInput(format!(
            "the journal {} has no fleet run #{id}; the latest: {}",
            j.location(),
            listed(&latest)
        ))
        .into());
    };
    let clusters = fleet_journal::clusters(j, id)?;
    let options: Option<crate::fleet::FleetOptions> = serde_json::from_str(&run.options_json).ok();
    let names: Vec<String> = clusters.iter().map(|c| c.cluster.clone()).collect();
    let waves = match &options {
        Some(o) => {
            crate::fleet::plan::waves(&names, &o.canary, o.concurrency.limit(names.len()).max(1))
        }
        None => Vec::new(),
    };
    let page = FleetPage::build(&run, &clusters, &waves);
    Ok(match format {
        Format::Html => html::fleet_page(&page),
        Format::Json => serde_json::to_string_pretty(&page)? + "\n",
    })
}
