//! `bbupgrade fleet`: rolling upgrades across many clusters in waves — canaries first, a concurrency
//! limit (a number or a percentage), an optional soak between waves, a failure budget that halts
//! the fleet, clusters chosen by name or label, and per-cluster maintenance windows. Each cluster
//! still goes one node at a time through the cluster driver; the fleet run is journaled beside the
//! cluster runs and resumes after the coordinator dies. On a shared journal (PostgreSQL) several
//! coordinators started on the same fleet and target join one fleet run and split its clusters:
//! each is claimed under its lock before it is driven (`cluster`, `waves`).
//!
//! Layout: `plan` decides selection, order, waves and the budget (pure); `crate::window` parses and
//! checks maintenance windows (pure); `journal` holds the fleet's tables; `cluster` takes one
//! cluster's turn; `waves` carries the run out; `report` prints events, the summary and `fleet
//! status`; `targets` gives each cluster the release of its own line; `preview` is `fleet plan`.

pub mod cluster;
pub mod journal;
pub mod plan;
pub mod preview;
pub mod report;
pub mod targets;
pub mod waves;

use crate::archive::ArchiveSource;
use crate::error::BadInput;
use crate::inventory::load_inventory;
use crate::journal::open_journal;
use crate::journal::{Journal, this_process_holder};
use crate::report::Output;
use anyhow::{Result, anyhow};
use clap::{Args, Subcommand};
use journal::{ClusterState, CreatedOrOpen, FleetResult, FleetRunId};
use plan::Concurrency;
use report::{FleetReport, FleetReporter};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct FleetArgs {
    #[command(subcommand)]
    pub command: Option<FleetCommand>,
    #[command(flatten)]
    pub run: FleetRunArgs,
}

#[derive(Subcommand)]
pub enum FleetCommand {
    /// Clusters of the latest (or a given) fleet run by state, failures and skips with reasons.
    Status(FleetStatusArgs),
    /// Continue the latest unfinished fleet run (same as `fleet --resume`).
    Resume(FleetResumeArgs),
    /// What `fleet` with the same options would do, changing nothing: each selected cluster's
    /// line, from -> to, wave and window, and why a cluster would be skipped.
    Plan(Box<FleetRunArgs>),
}

#[derive(Args, Clone)]
pub struct FleetRunArgs {
    /// The inventory (TOML) listing the fleet's clusters.
    #[arg(short = 'i', long, env = "BBUPGRADE_INVENTORY", required = true)]
    pub inventory: Option<PathBuf>,
    /// The bug-fix release of a line, e.g. 8.19.6; one per major.minor line (`--to 8.19.6 --to
    /// 9.4.7`), or `latest` for the top of each cluster's own line in the catalog.
    #[arg(long)]
    pub to: Vec<String>,
    /// A release catalog (TOML file or http(s) URL) the archives of `--to` come from.
    #[arg(long)]
    pub catalog: Option<String>,
    /// Clusters upgraded first, in their own wave(s); a failed canary halts the fleet.
    #[arg(long, value_delimiter = ',')]
    pub canary: Vec<String>,
    /// Clusters at once: a number (10) or a percentage of the selected clusters (25%).
    #[arg(long, default_value = "1")]
    pub concurrency: Concurrency,
    /// Pause between waves, in seconds.
    #[arg(long, default_value_t = 0)]
    pub wave_soak_secs: u64,
    /// Failed clusters tolerated; one more halts the fleet (no further cluster is started).
    #[arg(long, default_value_t = 0)]
    pub max_failed_clusters: u32,
    /// Only these clusters (comma-separated names).
    #[arg(long, value_delimiter = ',')]
    pub clusters: Vec<String>,
    /// Only clusters carrying this label (repeatable: every label must match).
    #[arg(long = "label")]
    pub labels: Vec<String>,
    /// The release archive, streamed by the coordinator to every agent.
    #[arg(long, conflicts_with = "archive_url")]
    pub archive: Option<PathBuf>,
    /// A URL every agent downloads the release from itself (with --sha256); agents keep a cache.
    #[arg(long, requires = "sha256")]
    pub archive_url: Option<String>,
    /// The archive's SHA-256 (64 hex digits): required with --archive-url, checked against
    /// --archive when given.
    #[arg(long)]
    pub sha256: Option<String>,
    /// The journal: `sqlite:PATH` or a path (default: from the inventory, else ./bbupgrade-journal.db).
    #[arg(long)]
    pub state: Option<String>,
    /// How to print: `human` for people, `json` for programs.
    #[arg(long, value_enum, default_value_t = Output::Human)]
    pub output: Output,
    /// Roll a failed node back to the original version and put it back in service.
    #[arg(long)]
    pub auto_rollback: bool,
    /// Healthy time after each node rejoins (overrides the inventory).
    #[arg(long)]
    pub soak_secs: Option<u64>,
    /// Continue the latest unfinished fleet run instead of starting one.
    #[arg(long)]
    pub resume: bool,
    /// With --resume: give failed clusters another turn (their cluster runs are resumed).
    #[arg(long, requires = "resume")]
    pub retry_failed: bool,
}

#[derive(Args, Clone)]
pub struct FleetStatusArgs {
    /// The inventory (TOML) listing the fleet's clusters.
    #[arg(short = 'i', long, env = "BBUPGRADE_INVENTORY")]
    pub inventory: PathBuf,
    /// The journal holding the fleet runs (default: from the inventory, else ./bbupgrade-journal.db).
    #[arg(long)]
    pub state: Option<String>,
    /// A fleet run id (default: the latest).
    #[arg(long)]
    pub run: Option<i64>,
    /// How to print: `human` for people, `json` for programs.
    #[arg(long, value_enum, default_value_t = Output::Human)]
    pub output: Output,
}

#[derive(Args, Clone)]
pub struct FleetResumeArgs {
    /// The inventory (TOML) listing the fleet's clusters.
    #[arg(short = 'i', long, env = "BBUPGRADE_INVENTORY")]
    pub inventory: PathBuf,
    /// The journal holding the fleet runs (default: from the inventory, else ./bbupgrade-journal.db).
    #[arg(long)]
    pub state: Option<String>,
    /// A fleet run id (default: the latest unfinished one).
    #[arg(long)]
    pub run: Option<i64>,
    /// How to print: `human` for people, `json` for programs.
    #[arg(long, value_enum, default_value_t = Output::Human)]
    pub output: Output,
    /// Give failed clusters another turn (their cluster runs are resumed).
    #[arg(long)]
    pub retry_failed: bool,
    /// A new failure budget for the rest of the run.
    #[arg(long)]
    pub max_failed_clusters: Option<u32>,
}

/// The options of a fleet run, kept in the journal so a resume goes on the same way.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FleetOptions {
    /// The targets as they read (`8.19.6`, `8.19.6, 9.4.7`, `latest (8.19.6, 9.4.7)`).
    pub to: String,
    /// The release of a run started before per-line targets (`targets` empty).
    pub archive: ArchiveSource,
    /// One release per line; a cluster goes to the one of its own line.
    #[serde(default)]
    pub targets: Vec<targets::LineTarget>,
    pub canary: Vec<String>,
    pub concurrency: Concurrency,
    pub wave_soak_secs: u64,
    pub max_failed_clusters: u32,
    pub clusters: Vec<String>,
    pub labels: Vec<String>,
    pub auto_rollback: bool,
    pub soak_secs: Option<u64>,
}

impl FleetOptions {
    /// The release of every line this run upgrades.
    pub fn line_targets(&self) -> Vec<targets::LineTarget> {
        if !self.targets.is_empty() {
            return self.targets.clone();
        }
        vec![targets::LineTarget {
            version: self.to.clone(),
            archive: self.archive.clone(),
        }]
    }
}

pub async fn command(args: FleetArgs) -> Result<ExitCode> {
    match args.command {
        Some(FleetCommand::Status(a)) => status(a),
        Some(FleetCommand::Plan(a)) => preview::command(*a).await,
        Some(FleetCommand::Resume(a)) => resume(a).await,
        None if args.run.resume => {
            let r = args.run;
            resume(FleetResumeArgs {
                inventory: r.inventory.unwrap_or_default(),
                state: r.state,
                run: None,
                output: r.output,
                retry_failed: r.retry_failed,
                max_failed_clusters: None,
            })
            .await
        }
        None => start(args.run).await,
    }
}

fn bad(msg: impl Into<String>) -> anyhow::Error {
    BadInput(msg.into()).into()
}

/// What a fleet run with `args` would do: its inventory, the selected clusters and its options.
/// Everything wrong with the input is found here, before anything runs.
pub async fn prepare(
    args: &FleetRunArgs,
) -> Result<(crate::inventory::Inventory, Vec<String>, FleetOptions)> {
    let inventory = args.inventory.clone().unwrap_or_default();
    let inv = load_inventory(&inventory)?;
    let wanted = crate::catalog::parse_targets(&args.to).map_err(bad)?;
    let candidates: Vec<plan::Candidate> = inv
        .clusters
        .iter()
        .map(|c| plan::Candidate {
            name: &c.name,
            labels: &c.labels,
        })
        .collect();
    let selected =
        plan::select(&candidates, &args.clusters, &args.labels, &args.canary).map_err(bad)?;
    let catalog = match &args.catalog {
        Some(source) => Some(crate::archive::load_catalog(source).await?),
        None => None,
    };
    let explicit = args.archive.is_some() || args.archive_url.is_some();
    let planned = targets::releases(&wanted, catalog.as_ref(), explicit).map_err(bad)?;
    let line_targets = targets::with_archives(
        planned,
        args.archive.as_deref(),
        args.archive_url.as_deref(),
        args.sha256.as_deref(),
    )
    .await?;
    let first = line_targets
        .first()
        .ok_or_else(|| bad("the catalog has no release to go to"))?;
    let opts = FleetOptions {
        to: targets::describe(&line_targets, wanted == crate::catalog::Targets::Latest),
        archive: first.archive.clone(),
        targets: line_targets.clone(),
        canary: args.canary.clone(),
        concurrency: args.concurrency,
        wave_soak_secs: args.wave_soak_secs,
        max_failed_clusters: args.max_failed_clusters,
        clusters: args.clusters.clone(),
        labels: args.labels.clone(),
        auto_rollback: args.auto_rollback,
        soak_secs: args.soak_secs,
    };
    Ok((inv, selected, opts))
}

async fn start(args: FleetRunArgs) -> Result<ExitCode> {
    let (inv, selected, opts) = prepare(&args).await?;
    let to = opts.to.clone();
    let journal = Arc::new(open_journal(args.state.as_deref(), inv.state.as_deref())?);
    let ordered = plan::order(&selected, &opts.canary);
    let reporter = FleetReporter::new(args.output);
    match journal::create_unless_open(
        &journal,
        &to,
        &serde_json::to_string(&opts)?,
        &this_process_holder(),
        &ordered,
    )? {
        CreatedOrOpen::Created(id) => drive(inv, journal, id, opts, reporter).await,
        CreatedOrOpen::Open(open) => {
            let theirs: Vec<String> = journal::clusters(&journal, open.id)?
                .into_iter()
                .map(|c| c.cluster)
                .collect();
            let stored: FleetOptions = serde_json::from_str(&open.options_json)
                .map_err(|e| anyhow!("reading the options of fleet run #{}: {e}", open.id))?;
            let joined = join_options(&open, &theirs, stored, &ordered, opts).map_err(bad)?;
            reporter.event(
                None,
                None,
                "info",
                &format!(
                    "joining fleet run #{} to {} started by {}: clusters are shared, each driven by one coordinator",
                    open.id, open.to_version, open.actor
                ),
            );
            drive(inv, journal, open.id, joined, reporter).await
        }
    }
}

/// The options a coordinator joining the open fleet run `open` (with clusters `theirs` and options
/// `stored`) goes on with, or why it may not join: another target, other clusters or another
/// release. The run's own canaries, budget and soaks hold; the release source (a streamed file is on
/// this host) and the concurrency limit (per coordinator) are this coordinator's own.
fn join_options(
    open: &journal::FleetRunRecord,
    theirs: &[String],
    stored: FleetOptions,
    ours: &[String],
    mine: FleetOptions,
) -> std::result::Result<FleetOptions, String> {
    let busy = format!(
        "fleet run #{} (to {}, by {}) is unfinished",
        open.id, open.to_version, open.actor
    );
    if open.to_version != mine.to {
        return Err(format!(
            "{busy}, and this one goes to {}: finish it first (`bbupgrade fleet resume`, see `bbupgrade fleet status`)",
            mine.to
        ));
    }
    if theirs != ours {
        return Err(format!(
            "{busy} with other clusters ({}) than selected here ({}); join it with the same selection or continue it with `bbupgrade fleet resume`",
            theirs.join(", "),
            ours.join(", ")
        ));
    }
    let shas = |o: &FleetOptions| -> Vec<String> {
        o.line_targets()
            .iter()
            .map(|t| t.archive.sha256().to_string())
            .collect()
    };
    if shas(&stored) != shas(&mine) {
        return Err(format!(
            "{busy} with another release (sha256 {}, here {}); join it with the same archive",
            shas(&stored).join(", "),
            shas(&mine).join(", ")
        ));
    }
    Ok(FleetOptions {
        archive: mine.archive,
        targets: mine.targets,
        concurrency: mine.concurrency,
        ..stored
    })
}

async fn resume(args: FleetResumeArgs) -> Result<ExitCode> {
    let inv = load_inventory(&args.inventory)?;
    let journal = Arc::new(open_journal(args.state.as_deref(), inv.state.as_deref())?);
    let record = match args.run {
        Some(id) => journal::run(&journal, FleetRunId(id))?
            .ok_or_else(|| bad(format!("the journal has no fleet run #{id}")))?,
        None => journal::latest(&journal, true)?
            .ok_or_else(|| bad("the journal has no unfinished fleet run to resume"))?,
    };
    if record.result == Some(FleetResult::Upgraded) {
        return Err(bad(format!(
            "fleet run #{} upgraded every cluster; nothing to resume",
            record.id
        )));
    }
    let mut opts: FleetOptions = serde_json::from_str(&record.options_json)
        .map_err(|e| anyhow!("reading the options of fleet run #{}: {e}", record.id))?;
    if let Some(m) = args.max_failed_clusters {
        opts.max_failed_clusters = m;
    }
    for c in journal::clusters(&journal, record.id)? {
        let again = match c.state {
            ClusterState::Skipped => true,
            ClusterState::Failed => args.retry_failed,
            _ => false,
        };
        if again {
            journal::set_state(&journal, record.id, &c.cluster, ClusterState::Pending, None)?;
        }
    }
    journal::reopen(&journal, record.id, &this_process_holder())?;
    drive(
        inv,
        journal,
        record.id,
        opts,
        FleetReporter::new(args.output),
    )
    .await
}

/// Runs the fleet run's waves (beside any other coordinator on it), prints the summary.
async fn drive(
    inv: crate::inventory::Inventory,
    journal: Arc<Journal>,
    id: FleetRunId,
    opts: FleetOptions,
    reporter: FleetReporter,
) -> Result<ExitCode> {
    let tls = inv
        .tls
        .load()
        .map_err(|e| bad(format!("coordinator TLS files: {e:#}")))?;
    journal.commit_without_fsync()?;
    reporter.event(
        None,
        None,
        "info",
        &format!(
            "fleet run #{id} to {}: concurrency {}, canary [{}], failure budget {}, wave soak {}s",
            opts.to,
            opts.concurrency,
            opts.canary.join(", "),
            opts.max_failed_clusters,
            opts.wave_soak_secs
        ),
    );
    let shared = Arc::new(cluster::Shared {
        tls,
        journal,
        fleet: id,
        opts,
    });
    let report = waves::drive(shared, &inv, &reporter).await?;
    reporter.summary(&report);
    Ok(if report.result == FleetResult::Upgraded.as_str() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn status(args: FleetStatusArgs) -> Result<ExitCode> {
    let inv = load_inventory(&args.inventory)?;
    let journal = open_journal(args.state.as_deref(), inv.state.as_deref())?;
    let record = match args.run {
        Some(id) => journal::run(&journal, FleetRunId(id))?,
        None => journal::latest(&journal, false)?,
    }
    .ok_or_else(|| bad("the journal has no fleet run"))?;
    let report = FleetReport::new(&record, &journal::clusters(&journal, record.id)?);
    match args.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        Output::Human => print!("{}", report::render_human(&report)),
    }
    Ok(ExitCode::SUCCESS)
}
