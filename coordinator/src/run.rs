//! The commands that drive a cluster — `plan`, `upgrade`, `resume`, `rollback` — and the context
//! they share: inventory, journal, agents, Bitbucket's API and the load balancer.

use crate::agents::{self, Client};
use crate::cli::{BadInput, Output, UpgradeArgs, load_inventory};
use crate::inventory::{Cluster, Node, Timeouts};
use crate::journal::{ClusterLock, Journal, NewRun, RunId, RunKind, RunResult, StepOutcome};
use crate::loadbalancer::{self, LoadBalancer};
use crate::node_match::{self, Match, NodeKey};
use crate::plan::{self, ObservedNode};
use crate::procedure::Step;
use crate::procedure::decide::NodeHistory;
use crate::procedure::drive::RunJournal;
use crate::procedure::real::JournalOnThread;
use crate::report::{Reporter, Summary};
use crate::zdu::ClusterView;
use crate::zdu_pool::ZduPool;
use anyhow::{Context, Result, anyhow, bail};
use bbupgrade_common::proto::{LoadMetricsRequest, NodeInfoRequest, NodeInfoResponse};
use bbupgrade_common::tls::TlsMaterial;
use serde::Serialize;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Mutex;

pub const DEFAULT_JOURNAL_FILE: &str = "bbupgrade-journal.db";
pub const ZDU_REQUEST_TIMEOUT_SECS: u64 = 10;
pub const NODE_INFO_TIMEOUT_SECS: u64 = 10;
/// How often a running coordinator refreshes its cluster lock.
pub const LOCK_HEARTBEAT_INTERVAL_SECS: u64 = 2;

pub use crate::procedure::drive::PreStepError;
pub use crate::procedure::{ArchiveSource, RunOptions};

/// Everything a driver needs for one cluster.
pub struct Ctx {
    pub cluster: Cluster,
    pub tls: TlsMaterial,
    pub zdu: ZduPool,
    /// How each node (by inventory id) is recognised in Bitbucket's cluster view.
    keys: HashMap<String, NodeKey>,
    pub lb: Box<dyn LoadBalancer>,
    pub journal: Arc<Journal>,
    pub reporter: Reporter,
    pub timeouts: Timeouts,
    clients: Mutex<HashMap<String, Client>>,
    /// Set when the cluster lock's heartbeat finds the lock gone: no further step begins.
    pub lock_lost: Arc<std::sync::atomic::AtomicBool>,
}

impl Ctx {
    pub fn new(
        cluster: Cluster,
        tls: TlsMaterial,
        journal: Arc<Journal>,
        reporter: Reporter,
    ) -> Result<Self> {
        let zdu = ZduPool::for_cluster(&cluster, Duration::from_secs(ZDU_REQUEST_TIMEOUT_SECS))
            .map_err(BadInput)?;
        let keys = cluster
            .nodes
            .iter()
            .map(|n| (n.id.clone(), n.bitbucket_key()))
            .collect();
        let lb = loadbalancer::from_config_with_tls(&cluster.load_balancer, Some(&tls))
            .map_err(|e| BadInput(format!("cluster '{}': load balancer: {e}", cluster.name)))?;
        Ok(Self {
            timeouts: cluster.timeouts.clone(),
            cluster,
            tls,
            zdu,
            keys,
            lb,
            journal,
            reporter,
            clients: Mutex::new(HashMap::new()),
            lock_lost: Arc::new(std::sync::atomic::AtomicBool::new(false)),
        })
    }

    /// How `node` is recognised in Bitbucket's cluster view.
    pub fn key(&self, node: &Node) -> NodeKey {
        self.keys
            .get(&node.id)
            .cloned()
            .unwrap_or_else(|| node.bitbucket_key())
    }

    /// How every node (by inventory id) is recognised in Bitbucket's cluster view.
    pub fn keys(&self) -> &HashMap<String, NodeKey> {
        &self.keys
    }

    /// The row of `node` in `view`: followed by name or address, never by an id seen before.
    pub fn row<'a>(&self, view: &'a ClusterView, node: &Node) -> Match<'a> {
        node_match::match_node(view, &self.key(node))
    }

    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.timeouts.agent_connect_ms)
    }

    /// A connected client for a node's agent (cached; dropped on transport errors).
    pub async fn client(&self, node: &Node) -> Result<Client> {
        if let Some(c) = self.clients.lock().await.get(&node.id) {
            return Ok(c.clone());
        }
        let c = agents::connect(node, &self.tls, self.connect_timeout()).await?;
        self.clients.lock().await.insert(node.id.clone(), c.clone());
        Ok(c)
    }

    pub async fn forget_client(&self, node: &Node) {
        self.clients.lock().await.remove(&node.id);
    }

    pub async fn node_info(&self, node: &Node) -> Result<NodeInfoResponse> {
        let mut c = self.client(node).await?;
        let d = Duration::from_secs(NODE_INFO_TIMEOUT_SECS);
        let r = agents::call(
            &node.id,
            d,
            c.node_info(agents::request(NodeInfoRequest {}, d)),
        )
        .await;
        if r.is_err() {
            self.forget_client(node).await;
        }
        r
    }

    /// What every node looks like now, agents and load balancer (in parallel).
    pub async fn observe(&self) -> Vec<ObservedNode> {
        futures::future::join_all(self.cluster.nodes.iter().map(|node| async move {
            let mut o = ObservedNode {
                id: node.id.clone(),
                bitbucket: self.key(node),
                ..Default::default()
            };
            match self.node_info(node).await {
                Ok(info) => {
                    o.active_version = Some(info.active_version.clone());
                    o.staged_versions = info.installed.iter().map(|i| i.version.clone()).collect();
                    o.install_root_free_bytes = info.install_root_free_bytes;
                    o.cpu_percent = self.cpu(node).await;
                }
                Err(e) => o.agent_error = Some(format!("{e:#}")),
            }
            if let Err(e) = self.lb.check_server(&node.lb_server).await {
                o.lb_error = Some(e.to_string());
            }
            o
        }))
        .await
    }

    pub async fn cpu(&self, node: &Node) -> f32 {
        let Ok(mut c) = self.client(node).await else {
            return 0.0;
        };
        let d = Duration::from_secs(NODE_INFO_TIMEOUT_SECS);
        agents::call(
            &node.id,
            d,
            c.load_metrics(agents::request(LoadMetricsRequest {}, d)),
        )
        .await
        .map(|s| s.cpu_percent)
        .unwrap_or(0.0)
    }

    pub async fn cluster_view(&self) -> Result<ClusterView> {
        self.zdu.cluster().await.with_context(|| {
            format!(
                "asking Bitbucket at {} for the cluster state",
                self.cluster.bitbucket_url
            )
        })
    }

    /// Records a step around `work`; the journal gets its start, end and result, on a blocking
    /// thread (never on the async executor).
    pub async fn step<T, F>(&self, run: RunId, node: Option<&str>, step: Step, work: F) -> Result<T>
    where
        F: std::future::Future<Output = Result<(T, String)>>,
    {
        let j = JournalOnThread::new(self.journal.clone(), run);
        // A dropped database connection fails the call that meets it; the next one reconnects.
        let id = match j.begin_step(node, step, "").await {
            Ok(id) => id,
            Err(_) => j
                .begin_step(node, step, "")
                .await
                .map_err(|e| PreStepError(format!("the journal failed before '{step}': {e:#}")))?,
        };
        let name = step.as_str();
        self.reporter.step(node, name, "begin", "");
        match work.await {
            Ok((v, detail)) => {
                self.record_end(&j, id, step, StepOutcome::Ok, &detail)
                    .await;
                self.reporter.step(node, name, "ok", &detail);
                Ok(v)
            }
            Err(e) => {
                let text = format!("{e:#}");
                self.record_end(&j, id, step, StepOutcome::Failed(text.clone()), "")
                    .await;
                self.reporter.step(node, name, "failed", &text);
                Err(e)
            }
        }
    }

    /// Records a step's end; the work is done either way, so a journal that cannot take it (after
    /// one retry, which reconnects a dropped database) is reported, not made the step's failure.
    /// Resuming repeats such a step through its operation id, which the agent replays.
    async fn record_end(
        &self,
        j: &JournalOnThread,
        id: crate::journal::StepId,
        step: Step,
        outcome: StepOutcome,
        detail: &str,
    ) {
        if j.end_step(id, outcome.clone(), detail).await.is_ok() {
            return;
        }
        if let Err(e) = j.end_step(id, outcome, detail).await {
            tracing::error!(%step, error = %e, "could not record the end of a step in the journal");
            self.reporter.step(
                None,
                step.as_str(),
                "info",
                &format!("the journal did not take this step's end: {e:#}"),
            );
        }
    }

    /// Whether this run's journal has `step` of `node` completed (since its last handled failure).
    pub async fn step_done(&self, run: RunId, node: &str, step: Step) -> Result<bool> {
        let steps = JournalOnThread::new(self.journal.clone(), run)
            .steps()
            .await?;
        Ok(NodeHistory::from_journal(&steps, node).done(step))
    }
}

/// The journal named by `--state`, the inventory, or the default file.
pub fn open_journal(state: Option<&str>, inventory_state: Option<&str>) -> Result<Journal> {
    let spec = state.or(inventory_state).unwrap_or(DEFAULT_JOURNAL_FILE);
    if spec.starts_with("postgres://") || spec.starts_with("postgresql://") {
        // The password may be in the URL: name the journal only by its redacted form.
        let location = crate::journal::redact_url(spec);
        return Journal::open_postgres(spec)
            .with_context(|| format!("opening the shared journal {location}"));
    }
    let path = Path::new(spec.strip_prefix("sqlite:").unwrap_or(spec));
    Journal::open(path).with_context(|| format!("opening the journal {}", path.display()))
}

fn actor() -> String {
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "unknown".into());
    let host = nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_default();
    format!("{user}@{host}:{}", std::process::id())
}

/// The release archive of a command: `--archive*` when given, else the catalog's entry for `--to`.
/// With `--catalog`, `--to` must be in the catalog either way.
pub async fn archive_source(args: &UpgradeArgs) -> Result<Option<ArchiveSource>> {
    let release = match (&args.catalog, &args.to) {
        (Some(source), Some(to)) => Some(catalog_release(source, to).await?),
        _ => None,
    };
    if args.archive.is_some() || args.archive_url.is_some() {
        return archive_from(
            args.archive.as_deref(),
            args.archive_url.as_deref(),
            args.sha256.as_deref(),
        )
        .await;
    }
    match release {
        Some(r) => release_archive(&r).await.map(Some),
        None => Ok(None),
    }
}

/// Loads the catalog at `source` (bad input when it is wrong) and finds `to` in it.
pub async fn catalog_release(source: &str, to: &str) -> Result<crate::catalog::Release> {
    let catalog = load_catalog(source).await?;
    let v = to
        .parse::<bbupgrade_common::version::Version>()
        .map_err(|e| BadInput(e.to_string()))?;
    Ok(catalog.require(v).map_err(BadInput)?.clone())
}

/// Loads a catalog; anything wrong with it is bad input.
pub async fn load_catalog(source: &str) -> Result<crate::catalog::Catalog> {
    crate::catalog::load(source)
        .await
        .map_err(|e| BadInput(format!("{e:#}")).into())
}

/// A catalog release's archive: its local copy (streamed, hashed against the catalog's sha256)
/// when it has one, else its URL for the agents.
pub async fn release_archive(r: &crate::catalog::Release) -> Result<ArchiveSource> {
    let archive = archive_from(
        r.archive.as_deref(),
        Some(r.archive_url.as_str()),
        Some(r.sha256.as_str()),
    )
    .await
    .with_context(|| format!("the catalog's release {}", r.version))?;
    archive.ok_or_else(|| anyhow!("the catalog's release {} has no archive", r.version))
}

/// Hashes an archive file once, before anything changes (the agents verify it again as they
/// extract), or checks the SHA-256 given with a URL.
pub async fn archive_from(
    archive: Option<&Path>,
    archive_url: Option<&str>,
    sha256: Option<&str>,
) -> Result<Option<ArchiveSource>> {
    if let Some(path) = archive {
        let owned = path.to_path_buf();
        let (sha, size) = tokio::task::spawn_blocking(move || -> Result<(String, u64, PathBuf)> {
            let path = owned;
            use sha2::Digest;
            use std::io::Read;
            let mut f = std::fs::File::open(&path).map_err(|e| {
                BadInput(format!("cannot read the archive {}: {e}", path.display()))
            })?;
            let mut h = sha2::Sha256::new();
            let mut buf = vec![0u8; 1 << 20];
            let mut size = 0u64;
            loop {
                let n = f.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                size += n as u64;
                h.update(&buf[..n]);
            }
            Ok((hex::encode(h.finalize()), size, path))
        })
        .await?
        .map(|(s, n, _)| (s, n))?;
        if let Some(expected) = sha256
            && !expected.eq_ignore_ascii_case(&sha)
        {
            return Err(BadInput(format!(
                "the archive's SHA-256 is {sha}, not the one expected ({expected}, from --sha256 or the catalog); it may be corrupt or the wrong file"
            ))
            .into());
        }
        let abs = std::fs::canonicalize(path)
            .with_context(|| format!("finding the archive {}", path.display()))?;
        return Ok(Some(ArchiveSource::File {
            path: abs,
            sha256: sha,
            size_bytes: size,
        }));
    }
    if let Some(url) = archive_url {
        let sha = sha256.unwrap_or_default().to_string();
        if !crate::catalog::is_sha256_hex(&sha) {
            return Err(BadInput(format!("--sha256 '{sha}' must be 64 hex digits")).into());
        }
        return Ok(Some(ArchiveSource::Url {
            url: url.to_string(),
            sha256: sha.to_lowercase(),
        }));
    }
    Ok(None)
}

/// Loads what every command needs.
async fn context(args: &UpgradeArgs, reporter: Reporter) -> Result<Ctx> {
    let inv = load_inventory(&args.target.inventory)?;
    let mut cluster = inv
        .cluster(&args.target.cluster)
        .map_err(|e| BadInput(format!("{e:#}")))?
        .clone();
    if let Some(s) = args.soak_secs {
        cluster.timeouts.soak_secs = s;
    }
    let tls = inv
        .tls
        .load()
        .map_err(|e| BadInput(format!("coordinator TLS files: {e:#}")))?;
    let journal = Arc::new(open_journal(args.state.as_deref(), inv.state.as_deref())?);
    Ctx::new(cluster, tls, journal, reporter)
}

fn checks_text(checks: &[plan::Check]) -> String {
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
    pub checks: Vec<plan::Check>,
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

fn target_of(args: &UpgradeArgs) -> Result<String> {
    let to = args
        .to
        .clone()
        .ok_or_else(|| BadInput("give the target version with --to, e.g. --to 8.19.6".into()))?;
    to.parse::<bbupgrade_common::version::Version>()
        .map_err(|e| BadInput(e.to_string()))?;
    Ok(to)
}

/// Checks whose failure `plan` reports as bad input (exit 2): a target that is not a bug-fix upgrade
/// of the cluster's version, a rolling-upgrade API that refuses or cannot be reached (not clustered,
/// credentials without system-admin rights, a wrong URL), a cluster view the nodes cannot be mapped
/// to. `upgrade` refuses the same with a "refused" summary, also exit 2.
const PLAN_REFUSALS: [&str; 3] = ["target", plan::CHECK_API, plan::CHECK_MAPPED];

/// Refuses (bad input, exit 2) when one of the `refusing` checks failed.
fn refuse_bad_target(report: &PlanReport, refusing: &[&str]) -> Result<()> {
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

pub async fn plan_command(args: UpgradeArgs) -> Result<ExitCode> {
    let to = target_of(&args)?;
    let ctx = context(&args, Reporter::new(args.target.output)).await?;
    let archive_bytes = archive_source(&args)
        .await?
        .map(|a| a.size_bytes())
        .unwrap_or(0);
    let report = make_plan(&ctx, &to, archive_bytes).await;
    match args.target.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        Output::Human => {
            println!(
                "plan for cluster {}: {} -> {} ({})",
                report.cluster,
                report.from.as_deref().unwrap_or("?"),
                report.to,
                report.load_balancer
            );
            println!("{}", checks_text(&report.checks));
            println!("order (least busy first, re-ranked before each node):");
            for (i, b) in report.order.iter().enumerate() {
                println!(
                    "  {}. {} (tasks {}, active users {}, cpu {:.0}%)",
                    i + 1,
                    b.id,
                    b.tasks_total,
                    b.active_user_count,
                    b.cpu_percent
                );
            }
            println!(
                "{}",
                if report.ready {
                    "ready to upgrade"
                } else {
                    "NOT ready: fix the failed checks first"
                }
            );
        }
    }
    refuse_bad_target(&report, &PLAN_REFUSALS)?;
    Ok(if report.ready {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn exit_for(summary: &Summary) -> ExitCode {
    match summary.result {
        RunResult::Upgraded | RunResult::RolledBack if summary.error.is_none() => ExitCode::SUCCESS,
        RunResult::Refused => ExitCode::from(2),
        _ => ExitCode::from(1),
    }
}

/// The run `resume` continues: an open one (a coordinator died), or the latest if it halted.
pub fn resumable_run(ctx: &Ctx) -> Result<Option<crate::journal::RunRecord>> {
    if let Some(r) = ctx.journal.open_run(&ctx.cluster.name)? {
        return Ok(Some(r));
    }
    Ok(ctx
        .journal
        .latest_run(&ctx.cluster.name)?
        .filter(|r| r.result == Some(RunResult::Halted)))
}

/// Takes the cluster's lock and keeps it fresh while the run lasts.
pub fn lock_cluster(
    ctx: &Ctx,
) -> Result<(
    Arc<std::sync::Mutex<ClusterLock>>,
    tokio::task::JoinHandle<()>,
)> {
    let lock = ctx
        .journal
        .acquire_lock(&ctx.cluster.name, &actor())
        .map_err(|e| anyhow!("{e}"))?;
    let lock = Arc::new(std::sync::Mutex::new(lock));
    let beat = lock.clone();
    let lost = ctx.lock_lost.clone();
    let task = tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(LOCK_HEARTBEAT_INTERVAL_SECS)).await;
            let beat = beat.clone();
            let r = tokio::task::spawn_blocking(move || {
                beat.lock().unwrap_or_else(|p| p.into_inner()).heartbeat()
            })
            .await;
            match r {
                Ok(Err(e @ crate::journal::JournalError::LockLost { .. })) => {
                    tracing::error!(error = %e, "the cluster lock is lost; the run stops at the next step");
                    lost.store(true, std::sync::atomic::Ordering::SeqCst);
                    break;
                }
                Ok(Err(e)) => tracing::warn!(error = %e, "could not refresh the cluster lock"),
                _ => {}
            }
        }
    });
    Ok((lock, task))
}

pub async fn upgrade_command(args: UpgradeArgs) -> Result<ExitCode> {
    let output = args.target.output;
    let summary = upgrade_summary(args, true).await?;
    let reporter = Reporter::new(output);
    reporter.summary(&summary);
    Ok(exit_for(&summary))
}

/// Runs an upgrade and returns its summary; `progress` shows step events as they happen.
pub async fn upgrade_summary(args: UpgradeArgs, progress: bool) -> Result<Summary> {
    let to = target_of(&args)?;
    let output = args.target.output;
    let reporter = if progress {
        Reporter::new(output)
    } else {
        Reporter::silent()
    };
    let ctx = context(&args, reporter).await?;
    let archive = archive_source(&args).await?;
    let report = make_plan(
        &ctx,
        &to,
        archive.as_ref().map(|a| a.size_bytes()).unwrap_or(0),
    )
    .await;
    refuse_bad_target(&report, &["target"])?;
    if let Some(open) = resumable_run(&ctx)? {
        bail!(
            "cluster '{}' has an unfinished {} run (#{}, {} -> {}) started by {}; continue it with `bbupgrade resume` or undo it with `bbupgrade rollback`",
            ctx.cluster.name,
            open.kind.as_str(),
            open.id,
            open.from_version,
            open.to_version,
            open.actor
        );
    }
    if !report.ready {
        let failed: Vec<_> = report.checks.iter().filter(|c| !c.ok).cloned().collect();
        eprintln!(
            "preflight failed; nothing was changed:\n{}",
            checks_text(&failed)
        );
        let summary = Summary {
            cluster: ctx.cluster.name.clone(),
            from: report.from.clone().unwrap_or_default(),
            to: to.clone(),
            result: RunResult::Refused,
            error: Some(
                failed
                    .iter()
                    .map(|c| c.detail.clone())
                    .collect::<Vec<_>>()
                    .join("; "),
            ),
            ..Default::default()
        };
        return Ok(summary);
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
        auto_rollback: args.auto_rollback,
        timeouts: ctx.timeouts.clone(),
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
    let summary = crate::procedure::drive(&ctx, run, &options).await;
    beat.abort();
    Ok(summary)
}

pub async fn resume_command(args: UpgradeArgs) -> Result<ExitCode> {
    let ctx = context(&args, Reporter::new(args.target.output)).await?;
    let Some(open) = resumable_run(&ctx)? else {
        return Err(BadInput(format!(
            "cluster '{}' has no unfinished or halted run to resume",
            ctx.cluster.name
        ))
        .into());
    };
    let mut options: RunOptions = serde_json::from_str(&open.options_json)
        .with_context(|| format!("reading the options of run #{}", open.id))?;
    if let Some(s) = args.soak_secs {
        options.timeouts.soak_secs = s;
    }
    let mut ctx = ctx;
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
        crate::procedure::drive_rollback(&ctx, open.id, &options).await
    } else {
        crate::procedure::drive(&ctx, open.id, &options).await
    };
    beat.abort();
    ctx.reporter.summary(&summary);
    Ok(exit_for(&summary))
}

pub async fn rollback_command(args: UpgradeArgs) -> Result<ExitCode> {
    let ctx = context(&args, Reporter::new(args.target.output)).await?;
    let (_lock, beat) = lock_cluster(&ctx)?;
    // The upgrade being undone: the open one, or the latest.
    let last = match ctx.journal.open_run(&ctx.cluster.name)? {
        Some(r) => Some(r),
        None => ctx.journal.latest_run(&ctx.cluster.name)?,
    };
    let view = ctx.cluster_view().await?;
    let (original, upgraded_to) = match &last {
        Some(r) if r.kind == RunKind::Upgrade => (r.from_version.clone(), r.to_version.clone()),
        _ => (
            view.original_version.clone().ok_or_else(|| {
                BadInput("no upgrade run in the journal and Bitbucket reports no original version; nothing to roll back".into())
            })?,
            args.to.clone().unwrap_or_default(),
        ),
    };
    if view.state == crate::zdu::ClusterState::Stable && !view.upgrade_mode_enabled {
        let on_original = view.all_live_run(&original);
        if !on_original {
            return Err(BadInput(format!(
                "the cluster is STABLE on {} with upgrade mode off: the upgrade was finalized and its database tasks ran, so a rolling rollback is not possible; restore from backup",
                view.live().find_map(|n| n.version.as_deref()).unwrap_or("?")
            ))
            .into());
        }
    }
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
    let summary = crate::procedure::drive_rollback(&ctx, run, &options).await;
    beat.abort();
    ctx.reporter.summary(&summary);
    Ok(exit_for(&summary))
}
