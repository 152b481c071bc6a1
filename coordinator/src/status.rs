//! `bbupgrade status`: one row per node with agent reachability, identity, versions and load, and
//! the cluster's latest runs from the journal — shared in PostgreSQL, every admin's and
//! coordinator's runs — with who ran each step, when, and how it ended (an audit trail).

mod bitbucket;
mod verdict;

pub use bitbucket::{BitbucketRow, BitbucketView};
pub use verdict::{LbView, OpenRun, problems};

use crate::agents;
use crate::error::BadInput;
use crate::inventory::{Cluster, Node};
use crate::journal::{Journal, RunId, RunRecord, StepOutcome, StepRecord, format_ms};
use anyhow::Result;
use bbupgrade_common::proto::{LoadMetricsRequest, LoadSample, NodeInfoRequest, NodeInfoResponse};
use bbupgrade_common::tls::TlsMaterial;
use serde::Serialize;
use std::time::Duration;

pub const STATUS_CALL_TIMEOUT_SECS: u64 = 5;
/// How many of a cluster's latest runs `status` lists unless told otherwise.
pub const DEFAULT_RUNS_SHOWN: u32 = 10;

#[derive(Debug, Serialize)]
pub struct StatusReport {
    pub cluster: String,
    pub nodes: Vec<NodeStatus>,
    /// Bitbucket's own view: cluster state, upgrade mode, every row and the node it maps to.
    pub bitbucket: BitbucketView,
    /// Where the runs were read from (a PostgreSQL URL without its password); `None` when the
    /// journal does not exist yet.
    pub journal: Option<String>,
    /// The cluster's latest runs, newest first.
    pub runs: Vec<RunView>,
    /// The run not finished yet (running, or its coordinator stopped), with its step in progress.
    pub open_run: Option<OpenRun>,
    /// Why the runs could not be read (the live node rows are still shown).
    pub journal_error: Option<String>,
}

/// A journaled run, for people and pipelines (stable field names).
#[derive(Debug, Clone, Serialize)]
pub struct RunView {
    pub id: i64,
    pub kind: &'static str,
    pub from: String,
    pub to: String,
    /// Who ran it, `user@host:pid`.
    pub actor: String,
    pub started_ms: i64,
    pub started: String,
    pub ended_ms: Option<i64>,
    pub ended: Option<String>,
    /// upgraded | rolled_back | halted | refused, or "open" (running, or its coordinator died).
    pub result: &'static str,
    pub error: Option<String>,
    /// Present for the run whose steps were asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub steps: Option<Vec<StepView>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct StepView {
    pub id: i64,
    /// `None` for cluster-wide steps.
    pub node: Option<String>,
    pub step: String,
    pub actor: String,
    pub started_ms: i64,
    pub started: String,
    pub ended_ms: Option<i64>,
    pub ended: Option<String>,
    /// ok | failed | unfinished (begun and not ended: running, or interrupted).
    pub outcome: &'static str,
    pub error: Option<String>,
    /// Written when the step began.
    pub detail: String,
    /// Written when it ended.
    pub end_detail: Option<String>,
}

/// Which run's steps `status` lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepsOf {
    None,
    Latest,
    Run(RunId),
}

/// What the journal says about a cluster.
#[derive(Debug, Default)]
pub struct Audit {
    pub journal: Option<String>,
    pub runs: Vec<RunView>,
    pub open_run: Option<OpenRun>,
}

pub fn run_view(r: &RunRecord, steps: Option<&[StepRecord]>) -> RunView {
    RunView {
        id: r.id.0,
        kind: r.kind.as_str(),
        from: r.from_version.clone(),
        to: r.to_version.clone(),
        actor: r.actor.clone(),
        started_ms: r.started_ms,
        started: format_ms(r.started_ms),
        ended_ms: r.ended_ms,
        ended: r.ended_ms.map(format_ms),
        result: r.result.map_or("open", |r| r.as_str()),
        error: r.error.clone(),
        steps: steps.map(|s| s.iter().map(step_view).collect()),
    }
}

pub(crate) fn step_view(s: &StepRecord) -> StepView {
    let (outcome, error) = match &s.outcome {
        None => ("unfinished", None),
        Some(StepOutcome::Ok) => ("ok", None),
        Some(StepOutcome::Failed(e)) => ("failed", Some(e.clone())),
    };
    StepView {
        id: s.id.0,
        node: s.node.clone(),
        step: s.step.clone(),
        actor: s.actor.clone(),
        started_ms: s.started_ms,
        started: format_ms(s.started_ms),
        ended_ms: s.ended_ms,
        ended: s.ended_ms.map(format_ms),
        outcome,
        error,
        detail: s.detail.clone(),
        end_detail: s.end_detail.clone(),
    }
}

/// Where the journal is, as `journal::open_journal` resolves it; `None` for a journal file that does
/// not exist (or `:memory:`), which `status` must not create.
pub(crate) fn existing_journal(
    state: Option<&str>,
    inventory_state: Option<&str>,
) -> Result<Option<Journal>> {
    let spec = state
        .or(inventory_state)
        .unwrap_or(crate::journal::DEFAULT_JOURNAL_FILE);
    let shared = spec.starts_with("postgres://") || spec.starts_with("postgresql://");
    let path = std::path::Path::new(spec.strip_prefix("sqlite:").unwrap_or(spec));
    if !shared && (spec == ":memory:" || !path.exists()) {
        return Ok(None);
    }
    crate::journal::open_journal(state, inventory_state).map(Some)
}

/// The cluster's latest `limit` runs, with the steps of the one asked for. Blocks.
pub fn audit(
    state: Option<&str>,
    inventory_state: Option<&str>,
    cluster: &str,
    limit: u32,
    steps_of: StepsOf,
) -> Result<Audit> {
    let Some(journal) = existing_journal(state, inventory_state)? else {
        if let StepsOf::Run(id) = steps_of {
            return Err(BadInput(format!(
                "the journal has no run #{id}: it does not exist yet"
            ))
            .into());
        }
        return Ok(Audit::default());
    };
    let mut runs = journal.recent_runs(cluster, limit)?;
    let wanted = match steps_of {
        StepsOf::None => None,
        StepsOf::Latest => runs.first().map(|r| r.id),
        StepsOf::Run(id) => {
            let run = journal
                .run(id)
                .map_err(|e| BadInput(format!("{e}; see the run ids in `bbupgrade status`")))?;
            if run.cluster != cluster {
                return Err(BadInput(format!(
                    "run #{id} is on cluster {}, not {cluster}",
                    run.cluster
                ))
                .into());
            }
            if !runs.iter().any(|r| r.id == id) {
                runs.push(run);
            }
            Some(id)
        }
    };
    let open_run = match journal.open_run(cluster)? {
        Some(r) => Some(verdict::open_run(run_view(&r, None), &journal.steps(r.id)?)),
        None => None,
    };
    let mut views = Vec::with_capacity(runs.len());
    for r in &runs {
        let steps = match wanted {
            Some(id) if id == r.id => Some(journal.steps(id)?),
            _ => None,
        };
        views.push(run_view(r, steps.as_deref()));
    }
    Ok(Audit {
        journal: Some(journal.location().to_string()),
        runs: views,
        open_run,
    })
}

#[derive(Debug, Serialize, Default)]
pub struct NodeStatus {
    pub id: String,
    pub agent: String,
    pub reachable: bool,
    pub error: Option<String>,
    /// The identity the agent's certificate proved (`agent/<id>`).
    pub identity: Option<String>,
    pub version: Option<String>,
    pub active_install: Option<String>,
    pub installed: Vec<String>,
    pub bitbucket_status: Option<String>,
    pub service_kind: Option<String>,
    pub load: Option<LoadView>,
    /// Service definitions the agent keeps for rollback.
    pub backups: Vec<BackupView>,
    /// The node as its load balancer sees it.
    pub load_balancer: LbView,
}

#[derive(Debug, Serialize)]
pub struct BackupView {
    pub version: String,
    pub path: String,
}

#[derive(Debug, Serialize)]
pub struct LoadView {
    pub cpu_percent: f32,
    pub load_average_1m: f64,
    pub memory_used_bytes: u64,
    pub memory_total_bytes: u64,
    pub install_root_free_bytes: u64,
    pub home_free_bytes: u64,
    pub bitbucket_pid: u32,
    pub bitbucket_cpu_percent: f32,
    pub bitbucket_rss_bytes: u64,
}

impl From<LoadSample> for LoadView {
    fn from(s: LoadSample) -> Self {
        Self {
            cpu_percent: s.cpu_percent,
            load_average_1m: s.load_average_1m,
            memory_used_bytes: s.memory_used_bytes,
            memory_total_bytes: s.memory_total_bytes,
            install_root_free_bytes: s.install_root_free_bytes,
            home_free_bytes: s.home_free_bytes,
            bitbucket_pid: s.bitbucket_pid,
            bitbucket_cpu_percent: s.bitbucket_cpu_percent,
            bitbucket_rss_bytes: s.bitbucket_rss_bytes,
        }
    }
}

/// Facts and load of one node, or why they could not be had.
pub async fn node_facts(
    node: &Node,
    tls: &TlsMaterial,
    connect_timeout: Duration,
) -> Result<(NodeInfoResponse, LoadSample)> {
    let mut client = agents::connect(node, tls, connect_timeout).await?;
    let deadline = Duration::from_secs(STATUS_CALL_TIMEOUT_SECS);
    let info = agents::call(
        &node.id,
        deadline,
        client.node_info(agents::request(NodeInfoRequest {}, deadline)),
    )
    .await?;
    let load = agents::call(
        &node.id,
        deadline,
        client.load_metrics(agents::request(LoadMetricsRequest {}, deadline)),
    )
    .await?;
    Ok((info, load))
}

pub async fn collect(cluster: &Cluster, tls: &TlsMaterial) -> StatusReport {
    let connect_timeout = Duration::from_millis(cluster.timeouts.agent_connect_ms);
    let rows = futures::future::join_all(cluster.nodes.iter().map(|node| async move {
        let mut row = NodeStatus {
            id: node.id.clone(),
            agent: node.agent.clone(),
            ..Default::default()
        };
        match node_facts(node, tls, connect_timeout).await {
            Ok((info, load)) => {
                row.reachable = true;
                row.identity = Some(format!("agent/{}", info.node_id));
                row.version = Some(info.active_version);
                row.active_install = Some(info.active_install);
                row.installed = info.installed.into_iter().map(|i| i.version).collect();
                row.bitbucket_status = Some(info.status);
                row.service_kind = Some(service_kind_name(info.service_kind).to_string());
                row.backups = info
                    .backups
                    .into_iter()
                    .map(|b| BackupView {
                        version: b.version,
                        path: b.path,
                    })
                    .collect();
                row.load = Some(load.into());
            }
            Err(e) => row.error = Some(format!("{e:#}")),
        }
        row
    }));
    let lb_timeout = Duration::from_secs(STATUS_CALL_TIMEOUT_SECS);
    let (mut rows, bitbucket, lbs) = tokio::join!(
        rows,
        bitbucket::collect(cluster),
        verdict::load_balancer_views(cluster, tls, lb_timeout)
    );
    for (row, lb) in rows.iter_mut().zip(lbs) {
        row.load_balancer = lb;
    }
    StatusReport {
        cluster: cluster.name.clone(),
        nodes: rows,
        bitbucket,
        journal: None,
        runs: Vec::new(),
        open_run: None,
        journal_error: None,
    }
}

pub fn service_kind_name(kind: i32) -> &'static str {
    use bbupgrade_common::proto::ServiceKind;
    match ServiceKind::try_from(kind) {
        Ok(ServiceKind::Systemd) => "systemd",
        Ok(ServiceKind::Initd) => "initd",
        Ok(ServiceKind::Scripts) => "scripts",
        _ => "unknown",
    }
}

fn mib(b: u64) -> String {
    format!("{:.0} MiB", b as f64 / (1024.0 * 1024.0))
}

pub fn render_human(r: &StatusReport) -> String {
    let mut out = format!("cluster {}\n", r.cluster);
    out.push_str(&format!(
        "{:<12} {:<22} {:<10} {:<10} {:<9} {:<14} {:>6} {:>10} {:>12}\n",
        "NODE",
        "AGENT",
        "REACHABLE",
        "VERSION",
        "STATUS",
        "LOAD BALANCER",
        "CPU%",
        "JVM RSS",
        "DISK FREE"
    ));
    for n in &r.nodes {
        match &n.load {
            Some(l) => out.push_str(&format!(
                "{:<12} {:<22} {:<10} {:<10} {:<9} {:<14} {:>6.1} {:>10} {:>12}\n",
                n.id,
                n.agent,
                "yes",
                n.version.as_deref().unwrap_or("?"),
                n.bitbucket_status.as_deref().unwrap_or("?"),
                lb_cell(&n.load_balancer),
                l.cpu_percent,
                mib(l.bitbucket_rss_bytes),
                mib(l.install_root_free_bytes),
            )),
            None => out.push_str(&format!(
                "{:<12} {:<22} {:<10} {:<10} {:<9} {:<14} {}\n",
                n.id,
                n.agent,
                "NO",
                "?",
                "?",
                lb_cell(&n.load_balancer),
                n.error.as_deref().unwrap_or("")
            )),
        }
        if let Some(e) = &n.load_balancer.error {
            out.push_str(&format!("{:<12} load balancer: {e}\n", ""));
        }
        for b in &n.backups {
            out.push_str(&format!("{:<12} backup of {}: {}\n", "", b.version, b.path));
        }
    }
    out.push_str(&bitbucket::render(&r.bitbucket));
    if let Some(open) = &r.open_run {
        out.push_str(&render_open_run(open));
    }
    match &r.journal_error {
        Some(e) => out.push_str(&format!("\nruns: the journal could not be read: {e}\n")),
        None => out.push_str(&render_runs(r.journal.as_deref(), &r.runs)),
    }
    out
}

/// `in (ready/up)` or `OUT (maint/up)`: whether the load balancer sends the node traffic.
fn lb_cell(lb: &LbView) -> String {
    if lb.error.is_some() {
        return "unreadable".to_string();
    }
    format!(
        "{} ({}/{})",
        if lb.in_service { "in" } else { "OUT" },
        lb.admin.as_deref().unwrap_or("?"),
        lb.health.as_deref().unwrap_or("?")
    )
}

/// The open run and the step it is in.
fn render_open_run(open: &OpenRun) -> String {
    let r = &open.run;
    let mut out = format!(
        "\nopen run #{}: {} {} -> {}, started {} by {}\n",
        r.id, r.kind, r.from, r.to, r.started, r.actor
    );
    match &open.step_in_progress {
        Some(s) => out.push_str(&format!(
            "  in progress: {} on {} since {}\n",
            s.step,
            s.node.as_deref().unwrap_or("the cluster"),
            s.started
        )),
        None => out.push_str("  no step in progress (between steps, or its coordinator stopped: `bbupgrade resume`)\n"),
    }
    out
}

/// The runs section: one line per run, and the steps of a run that carries them.
pub fn render_runs(journal: Option<&str>, runs: &[RunView]) -> String {
    let Some(journal) = journal else {
        return "\nruns: none (no journal yet)\n".to_string();
    };
    if runs.is_empty() {
        return format!("\nruns ({journal}): none\n");
    }
    let mut out = format!("\nruns ({journal}), newest first\n");
    out.push_str(&format!(
        "{:<6} {:<9} {:<18} {:<28} {:<25} {:<25} {:<12} {}\n",
        "RUN", "KIND", "FROM -> TO", "ACTOR", "STARTED", "ENDED", "RESULT", "ERROR"
    ));
    for r in runs {
        out.push_str(&format!(
            "{:<6} {:<9} {:<18} {:<28} {:<25} {:<25} {:<12} {}\n",
            format!("#{}", r.id),
            r.kind,
            format!("{} -> {}", r.from, r.to),
            r.actor,
            r.started,
            r.ended.as_deref().unwrap_or("-"),
            r.result,
            r.error.as_deref().unwrap_or("")
        ));
    }
    for r in runs {
        let Some(steps) = &r.steps else { continue };
        out.push_str(&format!(
            "\nsteps of run #{} ({} step(s))\n",
            r.id,
            steps.len()
        ));
        out.push_str(&format!(
            "{:<14} {:<16} {:<28} {:<25} {:<25} {:<10} {}\n",
            "NODE", "STEP", "ACTOR", "STARTED", "ENDED", "OUTCOME", "DETAIL"
        ));
        for s in steps {
            let detail = [
                Some(s.detail.as_str()),
                s.end_detail.as_deref(),
                s.error.as_deref(),
            ]
            .into_iter()
            .flatten()
            .filter(|d| !d.is_empty())
            .collect::<Vec<_>>()
            .join("; ");
            out.push_str(&format!(
                "{:<14} {:<16} {:<28} {:<25} {:<25} {:<10} {}\n",
                s.node.as_deref().unwrap_or("(cluster)"),
                s.step,
                s.actor,
                s.started,
                s.ended.as_deref().unwrap_or("-"),
                s.outcome,
                detail
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::{NewRun, RunKind, RunResult};

    #[test]
    fn runs_and_steps_read_as_an_audit_trail() {
        let j = Journal::open_in_memory().unwrap();
        let run = j
            .create_run(&NewRun {
                cluster: "prod".into(),
                kind: RunKind::Upgrade,
                from_version: "8.19.3".into(),
                to_version: "8.19.6".into(),
                plan_json: "{}".into(),
                actor: "alice@admin:7".into(),
                options_json: "{}".into(),
            })
            .unwrap();
        let s = j.begin_step(run, Some("n1"), "stop", "drained").unwrap();
        j.end_step(s, StepOutcome::Failed("timeout".into()), "3 left")
            .unwrap();
        j.begin_step(run, None, "upgrade_mode", "").unwrap();
        j.finish_run(run, RunResult::Halted, Some("n1 would not stop"))
            .unwrap();
        let rec = j.run(run).unwrap();
        let steps = j.steps(run).unwrap();
        let v = run_view(&rec, Some(&steps));
        assert_eq!(
            (v.kind, v.result, v.actor.as_str()),
            ("upgrade", "halted", "alice@admin:7")
        );
        let sv = v.steps.as_ref().unwrap();
        assert_eq!(
            (sv[0].outcome, sv[0].error.as_deref()),
            ("failed", Some("timeout"))
        );
        assert_eq!((sv[1].outcome, sv[1].node.as_deref()), ("unfinished", None));
        assert!(v.started.starts_with("20"), "{}", v.started);

        let text = render_runs(Some("journal.db"), std::slice::from_ref(&v));
        assert!(
            text.contains("8.19.3 -> 8.19.6") && text.contains("n1 would not stop"),
            "{text}"
        );
        assert!(
            text.contains("steps of run #1") && text.contains("drained; 3 left; timeout"),
            "{text}"
        );
        assert!(
            text.contains("(cluster)") && text.contains("unfinished"),
            "{text}"
        );
        let json = serde_json::to_value(run_view(&rec, None)).unwrap();
        assert!(json.get("steps").is_none(), "{json}");
        assert_eq!(json["result"], "halted");
        assert!(render_runs(None, &[]).contains("no journal yet"));
    }

    #[test]
    fn a_missing_journal_file_shows_no_runs_and_is_not_created() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("none.db");
        let spec = format!("sqlite:{}", path.display());
        let a = audit(Some(&spec), None, "prod", 5, StepsOf::Latest).unwrap();
        assert!(a.journal.is_none() && a.runs.is_empty());
        assert!(!path.exists());
        assert!(audit(Some(&spec), None, "prod", 5, StepsOf::Run(RunId(3))).is_err());
    }
}
