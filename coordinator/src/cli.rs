//! The `bbupgrade` command line: argument parsing and dispatch. Exit codes (the same failure gives
//! the same code from every command; `manual::EXIT_CODES`): 0 done, 1 failed or not ready, 2 bad
//! input.

use crate::archive::ReleaseSpec;
use crate::commands::{ClusterTarget, RunRequest};
use anyhow::{Context, Result};
use bbupgrade_common::identity::Role;
use bbupgrade_common::pki::{Ca, IssueRequest};
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

pub use crate::error::BadInput;
pub use crate::inventory::load_inventory;
pub use crate::report::Output;

#[derive(Parser)]
#[command(
    name = "bbupgrade",
    version,
    about = "Zero-downtime rolling upgrades of Bitbucket Data Center clusters"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// The private CA and certificates for agents and coordinators.
    Pki {
        #[command(subcommand)]
        command: PkiCommand,
    },
    /// Agent reachability, identity, versions and load of every node of a cluster, and its latest
    /// runs from the journal (who ran what, when, how it ended); `--steps` for each step.
    Status(StatusArgs),
    /// Preflight checks, the archive verified, and the ordered plan; changes nothing.
    Plan(PlanArgs),
    /// Upgrade a cluster node by node without downtime.
    Upgrade(UpgradeArgs),
    /// Continue the cluster's unfinished run from its journal and the live state.
    Resume(ResumeArgs),
    /// Return every upgraded node to the original version, one at a time.
    Rollback(RollbackArgs),
    /// Approve an upgrade run with --no-finalize (ends the rollback window), then have every agent
    /// remove old installs beyond its keep_installs (never the active or previous one).
    Finalize(RunTargetArgs),
    /// Abandon the cluster's unfinished upgrade run when it stopped no node: upgrade mode is
    /// cancelled, staged installs stay, the journal records it; a new upgrade may start.
    Abort(RunTargetArgs),
    /// A local sandbox cluster of simulated nodes with real agents, upgraded end to end: runs the
    /// `bbupgrade-demo` program next to this one with the same arguments (`bbupgrade demo --help`).
    #[command(disable_help_flag = true)]
    Demo {
        /// The demo's arguments, passed on unchanged.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, num_args = 0..)]
        args: Vec<std::ffi::OsString>,
    },
    /// Upgrade many clusters in waves (canary, concurrency, failure budget, windows); `fleet status`.
    Fleet(crate::fleet::FleetArgs),
    /// A journaled run (or fleet run) as one self-contained HTML page (or JSON) on stdout: each
    /// node's steps on a timeline, out-of-service times, the order and why, failures and notes.
    Report(crate::run_report::ReportArgs),
    /// Print the shell completion script (bash: /usr/share/bash-completion/completions/bbupgrade).
    Completions {
        /// The shell to complete for.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write the man pages (bbupgrade.1 and one per subcommand) into a directory.
    Man {
        /// Where to write them (created if missing).
        #[arg(long)]
        dir: PathBuf,
    },
}

#[derive(Subcommand)]
pub enum PkiCommand {
    /// Create the CA (ca.pem, ca.key) and an empty revocation list (crl.pem) in a directory.
    Init {
        /// The PKI directory (ca.pem, ca.key, crl.pem and the issued certificates).
        #[arg(long)]
        dir: PathBuf,
    },
    /// Issue a certificate for an agent (397 days) or a coordinator (90 days).
    Issue {
        /// The PKI directory (ca.pem, ca.key, crl.pem and the issued certificates).
        #[arg(long)]
        dir: PathBuf,
        /// `agent` for a node's agent, `coordinator` for an admin or a CI job running bbupgrade.
        #[arg(long, value_parser = ["agent", "coordinator"])]
        role: String,
        /// The node id (agents; the inventory's node id) or the admin's name (coordinators).
        #[arg(long)]
        name: String,
        /// DNS name or IP address the holder is reached at (repeatable).
        #[arg(long = "san")]
        sans: Vec<String>,
        /// Days the certificate is valid (default: 397 for agents, 90 for coordinators).
        #[arg(long)]
        days: Option<i64>,
        /// Replace an existing certificate and key of this role and name.
        #[arg(long)]
        force: bool,
    },
    /// Revoke a certificate: add it to crl.pem, then copy crl.pem to every agent (`[tls] crl`)
    /// and to the inventory's `tls.crl`.
    Revoke {
        /// The PKI directory (ca.pem, ca.key, crl.pem and the issued certificates).
        #[arg(long)]
        dir: PathBuf,
        /// The name the certificate was issued to.
        #[arg(long)]
        name: String,
        /// Which certificate when an agent and a coordinator share the name.
        #[arg(long, value_parser = ["agent", "coordinator"])]
        role: Option<String>,
    },
}

#[derive(Args, Clone)]
pub struct ClusterArgs {
    /// The inventory (TOML): clusters, their nodes and agents, load balancers, TLS files.
    #[arg(short = 'i', long, env = "BBUPGRADE_INVENTORY")]
    pub inventory: PathBuf,
    /// The cluster in the inventory; may be left out when the inventory has only one.
    #[arg(short = 'c', long)]
    pub cluster: Option<String>,
    /// How to print: `human` for people, `json` for programs (runs stream one JSON object per line).
    #[arg(long, value_enum, default_value_t = Output::Human)]
    pub output: Output,
}

/// The journal and the soak time, shared by the commands that drive a run.
#[derive(Args, Clone, Default)]
pub struct RunArgs {
    /// The journal: `postgres://...`, `sqlite:PATH` or a path (default: from the inventory, else
    /// ./bbupgrade-journal.db).
    #[arg(long)]
    pub state: Option<String>,
    /// Healthy time after a node rejoins before the next node is taken out (overrides the inventory).
    #[arg(long)]
    pub soak_secs: Option<u64>,
}

/// The release to upgrade to and where its archive comes from.
#[derive(Args, Clone, Default)]
pub struct ReleaseArgs {
    /// The bug-fix release to upgrade to, e.g. 8.19.6.
    #[arg(long)]
    pub to: Option<String>,
    /// The release archive (atlassian-bitbucket-X.Y.Z.tar.gz), streamed to every agent.
    #[arg(long, conflicts_with = "archive_url")]
    pub archive: Option<PathBuf>,
    /// A URL the agents download the release from themselves (with --sha256).
    #[arg(long, requires = "sha256")]
    pub archive_url: Option<String>,
    /// The archive's SHA-256 (64 hex digits): required with --archive-url, checked against
    /// --archive when given.
    #[arg(long)]
    pub sha256: Option<String>,
    /// A release catalog (TOML file or http(s) URL): `--to` must be in it, and without `--archive*`
    /// the release comes from its entry.
    #[arg(long)]
    pub catalog: Option<String>,
}

#[derive(Args, Clone)]
pub struct StatusArgs {
    #[command(flatten)]
    pub target: ClusterArgs,
    /// The journal to read runs from: `postgres://...`, `sqlite:PATH` or a path (default: from the
    /// inventory, else ./bbupgrade-journal.db). A journal file that does not exist shows no runs.
    #[arg(long)]
    pub state: Option<String>,
    /// How many of the cluster's latest runs to list.
    #[arg(long, default_value_t = crate::status::DEFAULT_RUNS_SHOWN)]
    pub runs: u32,
    /// Also list each step of the latest run: node, step, actor, start and end, outcome, detail.
    #[arg(long)]
    pub steps: bool,
    /// List the steps of this run (of this cluster) instead of the latest.
    #[arg(long)]
    pub run: Option<i64>,
}

/// `plan`: the target, and the archive it verifies.
#[derive(Args, Clone)]
pub struct PlanArgs {
    #[command(flatten)]
    pub target: ClusterArgs,
    #[command(flatten)]
    pub release: ReleaseArgs,
}

#[derive(Args, Clone)]
pub struct UpgradeArgs {
    #[command(flatten)]
    pub target: ClusterArgs,
    #[command(flatten)]
    pub release: ReleaseArgs,
    #[command(flatten)]
    pub run: RunArgs,
    /// Roll a failed node back to the original version and put it back in service.
    #[arg(long)]
    pub auto_rollback: bool,
    /// Stop before approving: nodes upgraded, upgrade mode on, rollback still possible;
    /// `bbupgrade finalize` approves later.
    #[arg(long)]
    pub no_finalize: bool,
}

/// `resume`: the run's own options come from the journal; only a corrected archive may be given,
/// and only while no node was stopped.
#[derive(Args, Clone)]
pub struct ResumeArgs {
    #[command(flatten)]
    pub target: ClusterArgs,
    #[command(flatten)]
    pub run: RunArgs,
    /// A corrected release archive, replacing the recorded one (only before any node was stopped).
    #[arg(long, conflicts_with = "archive_url")]
    pub archive: Option<PathBuf>,
    /// A corrected release URL (with --sha256), replacing the recorded one (only before any node
    /// was stopped).
    #[arg(long, requires = "sha256")]
    pub archive_url: Option<String>,
    /// The corrected archive's SHA-256 (64 hex digits).
    #[arg(long)]
    pub sha256: Option<String>,
}

/// `rollback`: the versions come from the journal (or Bitbucket's original version).
#[derive(Args, Clone)]
pub struct RollbackArgs {
    #[command(flatten)]
    pub target: ClusterArgs,
    #[command(flatten)]
    pub run: RunArgs,
}

/// A cluster and its journal, for commands that act on its latest run.
#[derive(Args, Clone)]
pub struct RunTargetArgs {
    #[command(flatten)]
    pub target: ClusterArgs,
    /// The journal: `postgres://...`, `sqlite:PATH` or a path (default: from the inventory, else
    /// ./bbupgrade-journal.db).
    #[arg(long)]
    pub state: Option<String>,
}

impl From<ClusterArgs> for ClusterTarget {
    fn from(a: ClusterArgs) -> Self {
        ClusterTarget {
            inventory: a.inventory,
            cluster: a.cluster,
            output: a.output,
        }
    }
}

impl From<ReleaseArgs> for ReleaseSpec {
    fn from(a: ReleaseArgs) -> Self {
        ReleaseSpec {
            archive: a.archive,
            archive_url: a.archive_url,
            sha256: a.sha256,
            catalog: a.catalog,
        }
    }
}

/// What a command that names neither a release nor run options asks for.
fn request(target: ClusterArgs, state: Option<String>, soak_secs: Option<u64>) -> RunRequest {
    RunRequest {
        target: target.into(),
        to: None,
        release: ReleaseSpec::default(),
        state,
        auto_rollback: false,
        soak_secs,
        no_finalize: false,
    }
}

impl From<UpgradeArgs> for RunRequest {
    fn from(a: UpgradeArgs) -> Self {
        RunRequest {
            to: a.release.to.clone(),
            release: a.release.into(),
            auto_rollback: a.auto_rollback,
            no_finalize: a.no_finalize,
            ..request(a.target, a.run.state, a.run.soak_secs)
        }
    }
}

impl From<PlanArgs> for RunRequest {
    fn from(a: PlanArgs) -> Self {
        RunRequest {
            to: a.release.to.clone(),
            release: a.release.into(),
            ..request(a.target, None, None)
        }
    }
}

impl From<ResumeArgs> for RunRequest {
    fn from(a: ResumeArgs) -> Self {
        RunRequest {
            release: ReleaseSpec {
                archive: a.archive,
                archive_url: a.archive_url,
                sha256: a.sha256,
                catalog: None,
            },
            ..request(a.target, a.run.state, a.run.soak_secs)
        }
    }
}

impl From<RollbackArgs> for RunRequest {
    fn from(a: RollbackArgs) -> Self {
        request(a.target, a.run.state, a.run.soak_secs)
    }
}

impl From<RunTargetArgs> for RunRequest {
    fn from(a: RunTargetArgs) -> Self {
        request(a.target, a.state, None)
    }
}

/// The top-level command as clap sees it (for the man pages and completions).
pub fn command() -> clap::Command {
    <Cli as clap::CommandFactory>::command()
}

pub fn main() -> ExitCode {
    run_to_exit_code(run(Cli::parse()))
}

/// Runs a command on a fresh runtime with logs on standard error; an error is printed and exits 1,
/// or 2 when it is bad input.
pub fn run_to_exit_code(command: impl Future<Output = Result<ExitCode>>) -> ExitCode {
    init_tracing();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(command) {
        Ok(code) => code,
        // What to run next was printed when the run was interrupted.
        Err(e) if e.downcast_ref::<crate::error::Interrupted>().is_some() => ExitCode::from(130),
        Err(e) => {
            eprintln!("error: {e:#}");
            if e.downcast_ref::<BadInput>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::from(1)
            }
        }
    }
}

fn init_tracing() {
    bbupgrade_common::logging::init("warn");
}

pub async fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Pki { command } => pki(command).map(|_| ExitCode::SUCCESS),
        Command::Status(args) => status(args).await,
        Command::Plan(args) => crate::commands::plan_command(args.into()).await,
        Command::Upgrade(args) => crate::commands::upgrade_command(args.into()).await,
        Command::Resume(args) => crate::commands::resume_command(args.into()).await,
        Command::Rollback(args) => crate::commands::rollback_command(args.into()).await,
        Command::Finalize(args) => crate::commands::finalize_command(args.into()).await,
        Command::Abort(args) => crate::commands::abort_command(args.into()).await,
        Command::Demo { args } => crate::demo_launch::exec(args),
        Command::Fleet(args) => crate::fleet::command(args).await,
        Command::Report(args) => crate::run_report::command(args).await,
        Command::Completions { shell } => {
            crate::manual::print_completions(command(), shell);
            Ok(ExitCode::SUCCESS)
        }
        Command::Man { dir } => {
            let pages = crate::manual::write_man_pages(command(), &dir)?;
            println!("wrote {} man pages to {}", pages.len(), dir.display());
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn pki(cmd: PkiCommand) -> Result<()> {
    match cmd {
        PkiCommand::Init { dir } => {
            Ca::generate()?
                .save(&dir)
                .map_err(|e| BadInput(format!("{e:#}")))?;
            println!(
                "created the CA in {} (ca.pem, ca.key with mode 0600, an empty crl.pem)",
                dir.display()
            );
        }
        PkiCommand::Issue {
            dir,
            role,
            name,
            sans,
            days,
            force,
        } => {
            let bad = |e: anyhow::Error| BadInput(format!("{e:#}"));
            let role: Role = role.parse().map_err(|e| BadInput(format!("{e}")))?;
            let ca = Ca::load(&dir).map_err(bad)?;
            let mut req = IssueRequest::new(role, &name).with_sans(sans);
            if let Some(d) = days {
                req = req.with_days(d).map_err(bad)?;
            }
            let issued = ca.issue(&req).map_err(bad)?;
            let (cert, key) = if force {
                issued
                    .save_replacing(&dir)
                    .context("writing the certificate")?
            } else {
                issued.save(&dir).map_err(bad)?
            };
            println!(
                "issued {} valid until {} -> {} and {} (0600)",
                issued.identity.uri(),
                req.not_after.date(),
                cert.display(),
                key.display()
            );
        }
        PkiCommand::Revoke { dir, name, role } => {
            let bad = |e: anyhow::Error| BadInput(format!("{e:#}"));
            let role = role
                .map(|r| r.parse::<Role>())
                .transpose()
                .map_err(|e| BadInput(format!("{e}")))?;
            let ca = Ca::load(&dir).map_err(bad)?;
            let r = ca.revoke(&dir, role, &name).map_err(bad)?;
            println!(
                "{} {} (serial {}); {} now lists {} revoked certificate(s): copy it to every agent's [tls] crl and the inventory's tls.crl",
                if r.already_revoked {
                    "already revoked"
                } else {
                    "revoked"
                },
                r.cert.display(),
                r.serial_hex,
                r.crl.display(),
                r.revoked_total
            );
        }
    }
    Ok(())
}

async fn status(args: StatusArgs) -> Result<ExitCode> {
    let StatusArgs {
        target: args,
        state,
        runs,
        steps,
        run,
    } = args;
    let inv = load_inventory(&args.inventory)?;
    let cluster = inv
        .pick_cluster(args.cluster.as_deref())
        .map_err(|e| BadInput(format!("{e:#}")))?;
    let tls = inv
        .tls
        .load()
        .map_err(|e| BadInput(format!("coordinator TLS files: {e:#}")))?;
    let mut report = crate::status::collect(cluster, &tls).await;
    let steps_of = match (run, steps) {
        (Some(id), _) => crate::status::StepsOf::Run(crate::journal::RunId(id)),
        (None, true) => crate::status::StepsOf::Latest,
        (None, false) => crate::status::StepsOf::None,
    };
    // Runs or steps asked for explicitly must come from the journal; the default view still shows
    // the live nodes when the journal cannot be read.
    let explicit = run.is_some() || steps;
    let (cluster_name, inv_state) = (cluster.name.clone(), inv.state.clone());
    let audit = tokio::task::spawn_blocking(move || {
        crate::status::audit(
            state.as_deref(),
            inv_state.as_deref(),
            &cluster_name,
            runs,
            steps_of,
        )
    })
    .await
    .context("reading the journal")?;
    match audit {
        Ok(audit) => {
            report.journal = audit.journal;
            report.runs = audit.runs;
            report.open_run = audit.open_run;
        }
        Err(e) if explicit || e.downcast_ref::<BadInput>().is_some() => return Err(e),
        Err(e) => report.journal_error = Some(format!("{e:#}")),
    }
    match args.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        Output::Human => print!("{}", crate::status::render_human(&report)),
    }
    let unreachable = report.nodes.iter().filter(|n| !n.reachable).count();
    if unreachable > 0 {
        eprintln!("{unreachable} of {} agents unreachable", report.nodes.len());
    }
    let problems = crate::status::problems(&report.nodes, &report.bitbucket);
    for p in &problems {
        eprintln!("{p}");
    }
    Ok(if problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
