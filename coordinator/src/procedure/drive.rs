//! The procedure carried out: observe -> decide -> act -> record, through small async traits
//! (agents, Bitbucket, the load balancer, the run's journal) so the same code runs against the real
//! cluster (`real.rs`) and against the in-memory fakes of the simulation test. Time is tokio's, so
//! a paused clock drives it deterministically.

use super::decide::{self, FailurePlan, NodeHistory, Recovery, RollbackAction};
use super::{RunOptions, Step};
use crate::inventory::{Node, Timeouts};
use crate::journal::{RunId, RunResult, StepId, StepOutcome, StepRecord};
use crate::node_match::{self, Match, NodeKey};
use crate::plan::{self, Busyness};
use crate::report::{NodeSummary, Reporter, Summary};
use crate::zdu::{ClusterState, ClusterView, NodeState};
use anyhow::{Context, Result, anyhow, bail};
use async_trait::async_trait;
use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::time::Instant;

/// How often Bitbucket's cluster view is read while waiting for a node.
pub const POLL_INTERVAL_MS: u64 = 250;
/// How long the cluster may take to become STABLE after approval.
pub const FINALIZE_TIMEOUT_SECS: u64 = 600;
/// How often a soaking node is looked at.
pub const SOAK_SAMPLE_MS: u64 = 500;

/// The node agents. Every operation carries an id: repeating it returns the recorded result.
#[async_trait]
pub trait Agents: Send + Sync {
    /// Stages and prepares the release on every node at once (they keep serving).
    async fn stage_all(&self) -> Result<()>;
    async fn active_version(&self, node: &Node) -> Result<String>;
    async fn cpu(&self, node: &Node) -> f32;
    async fn stop(&self, node: &Node, op: &str, timeout_secs: u64) -> Result<String>;
    async fn activate(&self, node: &Node, op: &str, version: &str) -> Result<String>;
    /// Starts Bitbucket; an answer of ERROR or FIRST_RUN is an error.
    async fn start(&self, node: &Node, op: &str, timeout_secs: u64) -> Result<String>;
    /// Returns the node to `target` (named, so a repeat changes nothing).
    async fn rollback(&self, node: &Node, op: &str, target: &str, t: &Timeouts) -> Result<String>;
}

/// Bitbucket's rolling-upgrade API.
#[async_trait]
pub trait Bitbucket: Send + Sync {
    async fn cluster(&self) -> Result<ClusterView>;
    async fn start_upgrade_mode(&self) -> Result<()>;
    async fn cancel_upgrade_mode(&self) -> Result<()>;
    async fn approve(&self) -> Result<()>;
}

/// The load balancer in front of the nodes.
#[async_trait]
pub trait Balancer: Send + Sync {
    /// Takes the node out and waits (bounded) for its sessions to end; says how many there were.
    async fn drain(&self, node: &Node, timeout: Duration) -> Result<String>;
    async fn enable(&self, node: &Node) -> Result<()>;
    fn describe(&self) -> String;
    /// After a node rejoined: spreads its users if it gets far more than the others (a note).
    async fn after_rejoin(&self, node: &Node) -> Option<String>;
}

/// The run's journal. The real one runs its blocking calls off the async executor.
#[async_trait]
pub trait RunJournal: Send + Sync {
    async fn begin_step(&self, node: Option<&str>, step: Step, detail: &str) -> Result<StepId>;
    async fn end_step(&self, id: StepId, outcome: StepOutcome, detail: &str) -> Result<()>;
    async fn steps(&self) -> Result<Vec<StepRecord>>;
    async fn finish_run(&self, result: RunResult, error: Option<&str>) -> Result<()>;
}

/// A step could not begin (the cluster lock was lost, or the journal failed): nothing was done.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct PreStepError(pub String);

/// Journals a step's begin, asking once more when the first call fails (a dropped database
/// connection fails the call that meets it; the next one reconnects).
pub async fn begin_step(
    j: &dyn RunJournal,
    node: Option<&str>,
    step: Step,
) -> Result<StepId, PreStepError> {
    match j.begin_step(node, step, "").await {
        Ok(id) => Ok(id),
        Err(_) => j
            .begin_step(node, step, "")
            .await
            .map_err(|e| PreStepError(format!("the journal failed before '{step}': {e:#}"))),
    }
}

/// What a run is carried out with.
pub struct Env<'a> {
    pub cluster: &'a str,
    pub nodes: &'a [Node],
    /// How each node (by inventory id) is recognised in Bitbucket's cluster view.
    pub keys: &'a HashMap<String, NodeKey>,
    pub agents: &'a dyn Agents,
    pub bitbucket: &'a dyn Bitbucket,
    pub lb: &'a dyn Balancer,
    pub journal: &'a dyn RunJournal,
    pub reporter: &'a Reporter,
    /// Set when the cluster lock is lost: no further node is taken out.
    pub lock_lost: &'a AtomicBool,
}

/// A node failed after it was taken out of service.
struct NodeFailure {
    node: String,
    error: anyhow::Error,
    stopped: bool,
    /// What the driver knew of the node's steps when it failed.
    history: NodeHistory,
}

enum DriveError {
    Node(Box<NodeFailure>),
    Other(anyhow::Error),
}

impl From<anyhow::Error> for DriveError {
    fn from(e: anyhow::Error) -> Self {
        DriveError::Other(e)
    }
}

/// One run of the procedure on one cluster.
pub struct Driver<'a> {
    env: Env<'a>,
    run: RunId,
    opts: &'a RunOptions,
    /// The node out of the load balancer and whether a stop was asked of it; kept in memory so a
    /// failing journal cannot hide which node must go back in.
    out: Mutex<Option<(String, bool)>>,
    /// The run's steps as last read from the journal, for a report when the journal fails.
    seen: Mutex<Option<Vec<StepRecord>>>,
    /// Whether Bitbucket showed each node not serving the target, when the nodes were last looked at.
    down: Mutex<HashMap<String, bool>>,
}

impl<'a> Driver<'a> {
    pub fn new(env: Env<'a>, run: RunId, opts: &'a RunOptions) -> Self {
        Self {
            env,
            run,
            opts,
            out: Mutex::new(None),
            seen: Mutex::new(None),
            down: Mutex::new(HashMap::new()),
        }
    }

    fn row<'v>(&self, view: &'v ClusterView, node: &Node) -> Match<'v> {
        match self.env.keys.get(&node.id) {
            Some(k) => node_match::match_node(view, k),
            None => node_match::match_node(view, &node.bitbucket_key()),
        }
    }

    fn node(&self, id: &str) -> Option<&'a Node> {
        self.env.nodes.iter().find(|n| n.id == id)
    }

    fn mark_out(&self, node: &str, stopping: bool) {
        *self.out.lock().unwrap_or_else(|p| p.into_inner()) = Some((node.to_string(), stopping));
    }

    fn mark_in(&self) {
        *self.out.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    fn out_node(&self) -> Option<(String, bool)> {
        self.out.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn check_lock(&self) -> Result<()> {
        if self.env.lock_lost.load(Ordering::SeqCst) {
            return Err(PreStepError(format!(
                "the cluster lock of '{}' was lost (the journal's database connection dropped, or another coordinator took over); the run stops between nodes — continue it with `bbupgrade resume`",
                self.env.cluster
            ))
            .into());
        }
        Ok(())
    }

    /// Records a step around `work`; the journal gets its start, end and result.
    async fn step<T, F>(&self, node: Option<&str>, step: Step, work: F) -> Result<T>
    where
        F: std::future::Future<Output = Result<(T, String)>>,
    {
        let j = self.env.journal;
        let id = begin_step(j, node, step).await?;
        self.env.reporter.step(node, step.as_str(), "begin", "");
        match work.await {
            Ok((v, detail)) => {
                self.record_end(id, step, StepOutcome::Ok, &detail).await;
                self.env.reporter.step(node, step.as_str(), "ok", &detail);
                Ok(v)
            }
            Err(e) => {
                let text = format!("{e:#}");
                self.record_end(id, step, StepOutcome::Failed(text.clone()), "")
                    .await;
                self.env.reporter.step(node, step.as_str(), "failed", &text);
                Err(e)
            }
        }
    }

    /// Records a step's end; the work is done either way, so a journal that cannot take it (after
    /// one retry) is reported, not made the step's failure. A resume repeats such a step through
    /// its operation id, which the agent replays.
    async fn record_end(&self, id: StepId, step: Step, outcome: StepOutcome, detail: &str) {
        let j = self.env.journal;
        if j.end_step(id, outcome.clone(), detail).await.is_ok() {
            return;
        }
        if let Err(e) = j.end_step(id, outcome, detail).await {
            tracing::error!(%step, error = %e, "could not record the end of a step in the journal");
            self.env.reporter.step(
                None,
                step.as_str(),
                "info",
                &format!("the journal did not take this step's end: {e:#}"),
            );
        }
    }

    /// Puts a node back in the load balancer, journaled when the journal works.
    async fn put_back(&self, node: &Node, why: &str) -> Result<()> {
        let journaled = self
            .step(Some(&node.id), Step::Enable, async {
                self.env.lb.enable(node).await?;
                Ok(((), why.to_string()))
            })
            .await;
        match journaled {
            Err(e) if e.downcast_ref::<PreStepError>().is_some() => {
                self.env.lb.enable(node).await?;
            }
            other => other?,
        }
        self.mark_in();
        Ok(())
    }

    /// The run's steps from the journal (remembered for a report if the journal fails later).
    async fn steps(&self) -> Result<Vec<StepRecord>> {
        let steps = self.env.journal.steps().await?;
        *self.seen.lock().unwrap_or_else(|p| p.into_inner()) = Some(steps.clone());
        Ok(steps)
    }

    async fn cluster_view(&self) -> Result<ClusterView> {
        self.env.bitbucket.cluster().await
    }

    /// Upgrades (or continues upgrading) the cluster; the summary says how it ended.
    pub async fn upgrade(&self) -> Summary {
        let mut s = self.base_summary();
        let before = self.versions_now().await;
        let mut oos = HashMap::new();
        match self.upgrade_inner(&mut s, &mut oos).await {
            Ok(()) => s.result = RunResult::Upgraded,
            Err(DriveError::Node(f)) => self.halted_on_node(&mut s, &f).await,
            Err(DriveError::Other(e)) => self.halted(&mut s, e).await,
        }
        let after = self.versions_now().await;
        self.finish(s, &before, &after, &oos).await
    }

    async fn halted_on_node(&self, s: &mut Summary, f: &NodeFailure) {
        s.error = Some(format!("node '{}' failed: {:#}", f.node, f.error));
        let (notes, recovered) = self.handle_failure(f).await;
        s.notes.extend(notes);
        let view = self.env.bitbucket.cluster().await.ok();
        // Rolled back only when that is sure: the node is back, nothing runs the new version and
        // upgrade mode is off; otherwise halted, and `resume` or `rollback` continues.
        let back_on_source = view
            .as_ref()
            .is_some_and(|v| !v.any_live_runs(&self.opts.to) && !v.upgrade_mode_enabled);
        s.result = if self.opts.auto_rollback && recovered && back_on_source {
            RunResult::RolledBack
        } else {
            RunResult::Halted
        };
    }

    async fn halted(&self, s: &mut Summary, e: anyhow::Error) {
        s.error = Some(format!("{e:#}"));
        s.result = RunResult::Halted;
        // A node taken out but never asked to stop goes back in, journal or no journal.
        if let Some((out, false)) = self.out_node()
            && let Some(node) = self.node(&out)
        {
            match self
                .put_back(node, "put back: the run halted before its stop")
                .await
            {
                Ok(()) => s.notes.push(format!(
                    "node '{out}' was not stopped and is back in the load balancer"
                )),
                Err(e) => s.notes.push(format!(
                    "node '{out}' could not be put back in the load balancer: {e:#}"
                )),
            }
        }
        let steps = match self.steps().await {
            Ok(st) => Some(st),
            Err(_) => self.seen.lock().unwrap_or_else(|p| p.into_inner()).clone(),
        };
        self.name_unfinished(s, steps.as_deref());
        let stopped_any = steps.as_deref().is_none_or(decide::any_stop);
        if !stopped_any {
            self.cancel_if_nothing_upgraded(&mut s.notes).await;
        }
    }

    /// Names in the report every node that may be out of service: the one this process asked to
    /// stop, and those the journal shows unfinished.
    fn name_unfinished(&self, s: &mut Summary, steps: Option<&[StepRecord]>) {
        let mut out: Vec<String> = Vec::new();
        if let Some((n, true)) = self.out_node() {
            out.push(n);
        }
        match steps {
            Some(st) => {
                for n in self.env.nodes {
                    if decide::node_left_unfinished(st, &n.id) == Some(true) && !out.contains(&n.id) {
                        out.push(n.id.clone());
                    }
                }
            }
            None => s.notes.push(
                "the journal could not be read, so this report cannot say whether a node is out of service; `bbupgrade status` shows the nodes".into(),
            ),
        }
        for n in out {
            s.notes.push(format!(
                "node '{n}' may be out of service: its upgrade in this run is unfinished; `bbupgrade resume` finishes it first, `bbupgrade rollback` returns it"
            ));
        }
    }

    async fn upgrade_inner(
        &self,
        s: &mut Summary,
        oos: &mut HashMap<String, u64>,
    ) -> Result<(), DriveError> {
        let view = self.cluster_view().await?;
        let finalized = view.state == ClusterState::Stable
            && !view.upgrade_mode_enabled
            && view.all_live_run(&self.opts.to);
        if finalized {
            return Ok(());
        }
        self.env.agents.stage_all().await?;
        if !view.upgrade_mode_enabled {
            self.step(None, Step::UpgradeMode, async {
                self.env.bitbucket.start_upgrade_mode().await?;
                Ok(((), "upgrade mode enabled".to_string()))
            })
            .await?;
        }
        // Previously finished nodes keep their order in the report.
        for n in decide::finished_nodes(&self.steps().await?) {
            if !s.order.contains(&n) {
                s.order.push(n);
            }
        }
        while let Some((node, steps)) = self.next_remaining().await? {
            self.check_lock()?;
            let (node, why) = self.pick(&steps, &node).await?;
            s.order_reasons.push(why.clone());
            self.env.reporter.step(Some(&node.id), "pick", "info", &why);
            self.one_node(node, &steps, s, oos).await?;
        }
        if self.opts.no_finalize {
            s.notes.push(format!(
                "not finalized (--no-finalize): every node runs {} and upgrade mode stays on, so `bbupgrade rollback` is still possible; `bbupgrade finalize` approves the upgrade",
                self.opts.to
            ));
            return Ok(());
        }
        self.approve().await?;
        Ok(())
    }

    /// The nodes still to upgrade (with the run's steps as read), or `None` when none is left.
    async fn next_remaining(&self) -> Result<Option<(Vec<&'a Node>, Vec<StepRecord>)>> {
        let view = self.cluster_view().await?;
        let steps = self.steps().await?;
        let mut remaining = Vec::new();
        for n in self.env.nodes {
            let agent_version = self.env.agents.active_version(n).await.ok();
            let upgraded = plan::node_upgraded(
                agent_version.as_deref(),
                self.row(&view, n).row(),
                &self.opts.to,
            );
            if decide::node_remaining(upgraded, &steps, &n.id) {
                remaining.push(n);
            }
            let serving_target = self
                .row(&view, n)
                .row()
                .is_some_and(|z| z.state == NodeState::Active && z.runs(&self.opts.to));
            self.down
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(n.id.clone(), !serving_target);
        }
        Ok((!remaining.is_empty()).then_some((remaining, steps)))
    }

    /// One node out and back, enclosed in its "node" step.
    async fn one_node(
        &self,
        node: &Node,
        steps: &[StepRecord],
        s: &mut Summary,
        oos: &mut HashMap<String, u64>,
    ) -> Result<(), DriveError> {
        let j = self.env.journal;
        // The pick's reason goes into the journal with the node, for the run report.
        let detail = match s.order_reasons.last() {
            Some(why) => format!("upgrade to {}; picked {why}", self.opts.to),
            None => format!("upgrade to {}", self.opts.to),
        };
        let node_step = j.begin_step(Some(&node.id), Step::Node, &detail).await?;
        s.order.retain(|n| *n != node.id);
        let outcome = self.upgrade_node(node, steps).await;
        s.order.push(node.id.clone());
        match outcome {
            Ok(d) => {
                let text = format!("out of service {} ms", d.as_millis());
                // Found by the simulation: a journal failing here turned a finished (or failed)
                // node into a halt that named no node; the end is reported like any step's.
                self.record_end(node_step, Step::Node, StepOutcome::Ok, &text)
                    .await;
                oos.insert(node.id.clone(), d.as_millis() as u64);
                if let Some(note) = self.env.lb.after_rejoin(node).await {
                    s.notes.push(note);
                }
                Ok(())
            }
            Err(f) => {
                let text = format!("{:#}", f.error);
                self.record_end(node_step, Step::Node, StepOutcome::Failed(text), "")
                    .await;
                Err(DriveError::Node(Box::new(f)))
            }
        }
    }

    /// Picks the next node: the one a previous coordinator left mid-way, else the least busy.
    async fn pick(
        &self,
        steps: &[StepRecord],
        remaining: &[&'a Node],
    ) -> Result<(&'a Node, String)> {
        let ids: Vec<&str> = remaining.iter().map(|n| n.id.as_str()).collect();
        if let Some(first) = decide::finish_first(steps, &ids)
            && let Some(n) = remaining.iter().find(|n| n.id == first)
        {
            let why = format!(
                "{}: the previous coordinator stopped or halted on it; finished first",
                n.id
            );
            return Ok((n, why));
        }
        let view = self.cluster_view().await?;
        let mut busy = Vec::new();
        for n in remaining {
            let z = self.row(&view, n).row();
            busy.push(Busyness {
                id: n.id.clone(),
                tasks_total: z.map(|z| z.tasks()).unwrap_or(0),
                active_user_count: z.map(|z| z.users()).unwrap_or(0),
                cpu_percent: self.env.agents.cpu(n).await,
            });
        }
        let ranked = plan::rank_least_busy(busy);
        let first = ranked.first().context("no node left to pick")?;
        let node = remaining
            .iter()
            .find(|n| n.id == first.id)
            .context("ranked an unknown node")?;
        let ranking: Vec<String> = ranked
            .iter()
            .map(|b| {
                format!(
                    "{} tasks={} users={} cpu={:.0}%",
                    b.id, b.tasks_total, b.active_user_count, b.cpu_percent
                )
            })
            .collect();
        let why = format!(
            "{}: least busy of {} ({})",
            node.id,
            ranked.len(),
            ranking.join("; ")
        );
        Ok((node, why))
    }

    /// One node, out and back: returns the time it was out of service. The next step comes from
    /// [`decide::next_node_step`] over the node's history, from the run's steps as read before
    /// the pick and kept up to date here.
    async fn upgrade_node(
        &self,
        node: &Node,
        steps: &[StepRecord],
    ) -> Result<Duration, NodeFailure> {
        let id = node.id.as_str();
        // The steps as read just before the node was picked: no second read that could fail.
        let mut h = NodeHistory::from_journal(steps, id);
        let down = self
            .down
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .copied();
        h.observed(down == Some(true));
        if h.done(Step::Drain) {
            // Taken out by an earlier coordinator: this one must know it to put the node back.
            self.mark_out(id, h.begun(Step::Stop));
        }
        let out_since = Instant::now();
        let mut out_of_service = Duration::ZERO;
        while let Some(step) = decide::next_node_step(&h) {
            if step == Step::Drain {
                self.check_lock()
                    .map_err(|e| self.failure(node, e, false, &h))?;
            }
            h.begin(step);
            let r = self.node_step(node, step, &h).await;
            note_end(&mut h, step, &r);
            // A stop that failed or went unanswered may still be under way: keep it out.
            r.map_err(|e| self.failure(node, e, decide::stop_asked_by(step), &h))?;
            if step == Step::Enable {
                self.mark_in();
                out_of_service = out_since.elapsed();
            }
        }
        Ok(out_of_service)
    }

    fn failure(
        &self,
        node: &Node,
        error: anyhow::Error,
        stopped: bool,
        h: &NodeHistory,
    ) -> NodeFailure {
        // A step that could not even begin did nothing: what counts is whether a stop was asked.
        let stopped = if error.downcast_ref::<PreStepError>().is_some() {
            match self.out_node() {
                Some((n, stopping)) if n == node.id => stopping,
                // Not taken out by this process (a resumed run): the journal says.
                _ => h.begun(Step::Stop),
            }
        } else {
            stopped
        };
        NodeFailure {
            node: node.id.clone(),
            error,
            stopped,
            history: h.clone(),
        }
    }

    /// Carries out one step of a node's out-and-back, journaled.
    async fn node_step(&self, node: &Node, step: Step, h: &NodeHistory) -> Result<()> {
        let t = &self.opts.timeouts;
        let to = self.opts.to.as_str();
        let id = node.id.as_str();
        let op = h.op_id(self.run, id, step);
        let agents = self.env.agents;
        self.step(Some(id), step, async {
            let detail = match step {
                Step::Drain => {
                    // Marked out first: a failing journal cannot hide the node.
                    self.mark_out(id, false);
                    self.env.lb.drain(node, secs(t.drain_secs)).await?
                }
                Step::Stop => {
                    self.mark_out(id, true);
                    agents.stop(node, &op, t.stop_secs).await?
                }
                Step::WaitOffline => {
                    self.wait_zdu(node, NodeState::Offline, None, secs(t.stop_secs))
                        .await?
                }
                Step::Activate => agents.activate(node, &op, to).await?,
                Step::Start => agents.start(node, &op, t.start_secs).await?,
                Step::WaitActive => {
                    self.wait_zdu(node, NodeState::Active, Some(to), secs(t.active_secs))
                        .await?
                }
                Step::Enable => {
                    self.env.lb.enable(node).await?;
                    format!("back in {}", self.env.lb.describe())
                }
                Step::Soak => {
                    self.soak(node, to, secs(t.soak_secs)).await?;
                    format!("healthy for {}s", t.soak_secs)
                }
                other => bail!("'{other}' is not a step of a node's upgrade"),
            };
            Ok(((), detail))
        })
        .await
    }

    /// Waits until Bitbucket shows the node in `want` (on `version` if given); ERROR ends the wait.
    async fn wait_zdu(
        &self,
        node: &Node,
        want: NodeState,
        version: Option<&str>,
        timeout: Duration,
    ) -> Result<String> {
        let started = Instant::now();
        let mut last: String;
        loop {
            match self.env.bitbucket.cluster().await {
                Ok(view) => match self.row(&view, node) {
                    Match::Row(z) => {
                        let row = if z.id.is_empty() { "without id" } else { &z.id };
                        last = format!("{} on {} (row {row})", z.state, z.version_or_dash());
                        if z.state == want && version.is_none_or(|v| z.runs(v)) {
                            let waited = started.elapsed().as_secs_f64();
                            return Ok(format!("{last} after {waited:.1}s"));
                        }
                        if z.state == NodeState::Error && want != NodeState::Error {
                            bail!("Bitbucket shows node '{}' in ERROR ({last})", node.id);
                        }
                    }
                    Match::Missing(_) if want == NodeState::Offline => {
                        return Ok("gone from the cluster view".into());
                    }
                    // A starting node's row has no address yet: keep polling.
                    Match::Missing(why) | Match::Ambiguous(why) => last = why,
                },
                Err(e) => last = format!("API error: {e:#}"),
            }
            if started.elapsed() > timeout {
                bail!(
                    "node '{}' did not become {want} within {timeout:?} (last seen: {last})",
                    node.id
                );
            }
            tokio::time::sleep(Duration::from_millis(POLL_INTERVAL_MS)).await;
        }
    }

    /// Watches a rejoined node for a while: it must stay ACTIVE on the new version.
    async fn soak(&self, node: &Node, version: &str, dur: Duration) -> Result<()> {
        let until = Instant::now() + dur;
        // Soaked only when seen healthy once the time is up (a clock that jumps, or a Bitbucket
        // that does not answer, proves nothing); bounded when Bitbucket stays silent.
        let give_up = until + secs(self.opts.timeouts.active_secs);
        loop {
            let left = until.saturating_duration_since(Instant::now());
            let sample = Duration::from_millis(SOAK_SAMPLE_MS);
            tokio::time::sleep(if left.is_zero() {
                sample
            } else {
                sample.min(left)
            })
            .await;
            let view = match self.env.bitbucket.cluster().await {
                Ok(v) => v,
                Err(e) if Instant::now() > give_up => bail!(
                    "node '{}' could not be seen healthy at the end of its soak: {e:#}",
                    node.id
                ),
                Err(_) => continue,
            };
            match self.row(&view, node) {
                Match::Row(z) if z.state == NodeState::Active && z.runs(version) => {}
                Match::Row(z) => bail!(
                    "node '{}' left ACTIVE while soaking: now {} on {}",
                    node.id,
                    z.state,
                    z.version_or_dash()
                ),
                Match::Missing(why) | Match::Ambiguous(why) => bail!(
                    "node '{}' cannot be found in the cluster view while soaking: {why}",
                    node.id
                ),
            }
            if Instant::now() >= until {
                return Ok(());
            }
        }
    }

    /// Approves an upgrade whose nodes all run the new version (`bbupgrade finalize`).
    pub async fn finalize(&self) -> Summary {
        let mut s = self.base_summary();
        let before = self.versions_now().await;
        match self.approve().await {
            Ok(()) => s.result = RunResult::Upgraded,
            Err(e) => {
                s.result = RunResult::Halted;
                s.error = Some(format!("{e:#}"));
            }
        }
        self.finish(s, &before, &before, &HashMap::new()).await
    }

    /// Approves the upgrade and waits for the cluster to become STABLE.
    async fn approve(&self) -> Result<()> {
        self.step(None, Step::Approve, async {
            let v = self.cluster_view().await?;
            if v.state != ClusterState::Stable || v.upgrade_mode_enabled {
                self.env.bitbucket.approve().await?;
            }
            let started = Instant::now();
            loop {
                let v = self.cluster_view().await?;
                if v.state == ClusterState::Stable && !v.upgrade_mode_enabled {
                    break;
                }
                if v.state == ClusterState::UpgradeTasksFailed {
                    bail!("Bitbucket's upgrade tasks failed after approval (UPGRADE_TASKS_FAILED); read atlassian-bitbucket.log on the nodes and contact Atlassian support (Bitbucket's documented API offers no retry)");
                }
                if started.elapsed() > secs(FINALIZE_TIMEOUT_SECS) {
                    bail!("the cluster did not become STABLE within {FINALIZE_TIMEOUT_SECS}s after approval (now {})", v.state);
                }
                tokio::time::sleep(Duration::from_millis(POLL_INTERVAL_MS)).await;
            }
            Ok(((), format!("cluster STABLE on {}", self.opts.to)))
        })
        .await
    }

    /// After a node failed: what [`decide::on_failure`] says — back in if it was never stopped,
    /// else kept out and stopped gracefully, then rolled back (only if its new install was
    /// activated) or started on what it has, as the policy says; upgrade mode is cancelled when
    /// no node runs the new version. Returns notes for the report.
    async fn handle_failure(&self, f: &NodeFailure) -> (Vec<String>, bool) {
        let mut notes = Vec::new();
        let Some(node) = self.node(&f.node) else {
            return (notes, false);
        };
        let mut h = f.history.clone();
        let facts = decide::FailedNode {
            stop_asked: f.stopped,
            stop_done: h.done(Step::Stop),
            active_version: self.env.agents.active_version(node).await.ok(),
            activate_begun: h.begun(Step::Activate),
            serving: self.env.bitbucket.cluster().await.is_ok_and(|v| {
                self.row(&v, node)
                    .row()
                    .is_some_and(|z| z.state == NodeState::Active)
            }),
            to: self.opts.to.clone(),
            auto_rollback: self.opts.auto_rollback,
        };
        let recovered = match decide::on_failure(&facts) {
            FailurePlan::PutBack => self.put_back_failed(node, &mut notes).await,
            FailurePlan::KeepOut {
                stop_again,
                recover,
            } => {
                self.keep_out_failed(node, stop_again, &mut h, &mut notes)
                    .await;
                self.recover_failed(node, recover, &mut h, &mut notes).await
            }
        };
        self.cancel_if_nothing_upgraded(&mut notes).await;
        // A resume starts this node over, with fresh operation ids.
        let _ = self
            .step(Some(&node.id), Step::FailureHandled, async {
                Ok(((), "a resume starts this node over".to_string()))
            })
            .await;
        (notes, recovered)
    }

    /// A failed node that was never stopped goes back as it was (journaled); true when it is.
    async fn put_back_failed(&self, node: &Node, notes: &mut Vec<String>) -> bool {
        let id = &node.id;
        match self.put_back(node, "put back: it was never stopped").await {
            Ok(()) => {
                notes.push(format!(
                    "node '{id}' was not stopped and is back in the load balancer"
                ));
                true
            }
            Err(e) => {
                notes.push(format!(
                    "node '{id}' was not stopped but could not be put back in the load balancer: {e:#}"
                ));
                false
            }
        }
    }

    /// Keeps a failed node out of the load balancer (it may have rejoined before failing) and
    /// stops it gracefully; the notes say what did not work.
    async fn keep_out_failed(
        &self,
        node: &Node,
        stop_again: bool,
        h: &mut NodeHistory,
        notes: &mut Vec<String>,
    ) {
        let id = node.id.as_str();
        let t = &self.opts.timeouts;
        let out = self
            .step(Some(id), Step::Disable, async {
                self.env.lb.drain(node, secs(t.drain_secs)).await?;
                Ok(((), "kept out of the load balancer".to_string()))
            })
            .await;
        if let Err(e) = &out {
            notes.push(format!(
                "node '{id}' could not be taken out of the load balancer after its failure: {e:#}"
            ));
        }
        let stopped = if stop_again {
            h.begin(Step::StopFailed);
            let op = h.op_id(self.run, id, Step::StopFailed);
            self.mark_out(id, true);
            let r = self
                .step(Some(id), Step::StopFailed, async {
                    let r = self.env.agents.stop(node, &op, t.stop_secs).await?;
                    Ok(((), format!("stopped gracefully ({r})")))
                })
                .await;
            note_end(h, Step::StopFailed, &r);
            r
        } else {
            // Its own stop is what failed: asking again would only wait out the same deadline.
            Err(anyhow!(
                "its stop did not complete, so it may still be going down"
            ))
        };
        if let Err(e) = &stopped {
            notes.push(format!(
                "node '{id}' could not be stopped after its failure: {e:#}"
            ));
        }
        if !self.opts.auto_rollback {
            let state = match (stopped.is_ok(), out.is_ok()) {
                (true, true) => "stopped and out of",
                (false, true) => "kept out of",
                (true, false) => "stopped but may still be in",
                (false, false) => "neither surely stopped nor surely out of",
            };
            notes.push(format!(
                "node '{id}' is {state} the load balancer; fix it and run `bbupgrade resume`, or run `bbupgrade rollback`"
            ));
        }
    }

    /// Brings a failed, stopped node back as the policy says; true when it is serving again.
    async fn recover_failed(
        &self,
        node: &Node,
        recover: Recovery,
        h: &mut NodeHistory,
        notes: &mut Vec<String>,
    ) -> bool {
        let id = &node.id;
        let from = &self.opts.from;
        let (note, ok) = match recover {
            Recovery::LeaveStopped => return false,
            Recovery::RollBack => match self.rollback_node(node, from, h).await {
                Ok(_) => (
                    format!("node '{id}' was rolled back to {from} and is serving"),
                    true,
                ),
                Err(e) => (format!("rolling node '{id}' back failed: {e:#}"), false),
            },
            Recovery::StartAsIs => match self.restart_as_is(node, h).await {
                Ok(()) => (
                    format!(
                        "node '{id}' failed before its new install was activated: started again on {from} and serving (nothing to roll back)"
                    ),
                    true,
                ),
                Err(e) => (
                    format!(
                        "node '{id}' failed before its new install was activated; starting it again on {from} failed: {e:#}"
                    ),
                    false,
                ),
            },
        };
        notes.push(note);
        ok
    }

    /// Starts a node that never left its install, waits for it ACTIVE on the run's from-version,
    /// and puts it back in the load balancer.
    async fn restart_as_is(&self, node: &Node, h: &mut NodeHistory) -> Result<()> {
        let t = &self.opts.timeouts;
        let id = node.id.as_str();
        h.begin(Step::Start);
        let op = h.op_id(self.run, id, Step::Start);
        let r = self
            .step(Some(id), Step::Start, async {
                Ok(((), self.env.agents.start(node, &op, t.start_secs).await?))
            })
            .await;
        note_end(h, Step::Start, &r);
        r?;
        self.step(Some(id), Step::WaitActive, async {
            let d = secs(t.active_secs);
            let from = Some(self.opts.from.as_str());
            Ok(((), self.wait_zdu(node, NodeState::Active, from, d).await?))
        })
        .await?;
        self.put_back(node, "back in on the version it ran").await
    }

    /// Returns one node to `version` with the same discipline: out, roll back, ACTIVE, back in.
    async fn rollback_node(
        &self,
        node: &Node,
        version: &str,
        h: &mut NodeHistory,
    ) -> Result<Duration> {
        let t = &self.opts.timeouts;
        let id = node.id.as_str();
        let since = Instant::now();
        self.step(Some(id), Step::Drain, async {
            self.mark_out(id, false);
            Ok(((), self.env.lb.drain(node, secs(t.drain_secs)).await?))
        })
        .await?;
        h.begin(Step::Rollback);
        let op = h.op_id(self.run, id, Step::Rollback);
        self.mark_out(id, true);
        let r = self
            .step(Some(id), Step::Rollback, async {
                Ok(((), self.env.agents.rollback(node, &op, version, t).await?))
            })
            .await;
        note_end(h, Step::Rollback, &r);
        r?;
        self.step(Some(id), Step::WaitActive, async {
            let d = secs(t.active_secs);
            Ok((
                (),
                self.wait_zdu(node, NodeState::Active, Some(version), d)
                    .await?,
            ))
        })
        .await?;
        self.step(Some(id), Step::Enable, async {
            self.env.lb.enable(node).await?;
            Ok(((), "back in the load balancer".to_string()))
        })
        .await?;
        self.mark_in();
        Ok(since.elapsed())
    }

    async fn cancel_if_nothing_upgraded(&self, notes: &mut Vec<String>) {
        let Ok(view) = self.env.bitbucket.cluster().await else {
            return;
        };
        if view.upgrade_mode_enabled && !view.any_live_runs(&self.opts.to) {
            let r = self
                .step(None, Step::CancelUpgradeMode, async {
                    self.env.bitbucket.cancel_upgrade_mode().await?;
                    let why = "no node runs the new version; upgrade mode cancelled";
                    Ok(((), why.to_string()))
                })
                .await;
            match r {
                Ok(()) => notes.push("upgrade mode cancelled: no node runs the new version".into()),
                Err(e) => notes.push(format!("could not cancel upgrade mode: {e:#}")),
            }
        }
    }

    /// Returns every node not serving on the original version (`opts.to` of a rollback run) to
    /// it, one at a time, then cancels upgrade mode. `superseded`: the steps of the upgrade run
    /// being undone (its unfinished node is finished first).
    pub async fn rollback(&self, superseded: &[StepRecord]) -> Summary {
        let mut s = self.base_summary();
        let before = self.versions_now().await;
        let mut oos = HashMap::new();
        let mut down = Vec::new();
        match self
            .rollback_inner(&mut s, &mut oos, &mut down, superseded)
            .await
        {
            Ok(()) => s.result = RunResult::RolledBack,
            Err(e) => {
                s.result = RunResult::Halted;
                s.error = Some(format!("{e:#}"));
                // Name what may be out of service: the node being rolled back, and the nodes
                // seen down before it (a rollback finishes those first).
                if let Some((n, _)) = self.out_node() {
                    down.retain(|d| *d != n);
                    down.insert(0, n);
                }
                for n in down {
                    s.notes.push(format!(
                        "node '{n}' may be out of service: its rollback did not finish; run `bbupgrade rollback` again"
                    ));
                }
            }
        }
        let after = self.versions_now().await;
        self.finish(s, &before, &after, &oos).await
    }

    async fn rollback_inner(
        &self,
        s: &mut Summary,
        oos: &mut HashMap<String, u64>,
        down: &mut Vec<String>,
        superseded: &[StepRecord],
    ) -> Result<()> {
        let original = self.opts.to.as_str();
        // Everything is looked at before anything is decided, so a halt names every node down.
        let view = self.cluster_view().await;
        let steps = self.steps().await;
        if steps.is_err() {
            s.notes.push(
                "the journal could not be read, so this report cannot say whether a node is out of service; `bbupgrade status` shows the nodes".into(),
            );
        }
        let own = steps.as_deref().unwrap_or_default();
        let mut seen = Vec::new();
        let mut unanswered = None;
        for node in self.env.nodes {
            let serving = view.as_ref().is_ok_and(|v| {
                self.row(v, node)
                    .row()
                    .is_some_and(|z| z.state == NodeState::Active)
            });
            let left_out = decide::node_left_unfinished(superseded, &node.id) == Some(true)
                || decide::taken_out(own, &node.id);
            if !serving || left_out {
                down.push(node.id.clone());
            }
            match self.env.agents.active_version(node).await {
                Ok(active_version) => seen.push(decide::RollbackObs {
                    active_version,
                    serving,
                    left_out,
                }),
                Err(e) => {
                    unanswered.get_or_insert(e);
                }
            }
        }
        view?;
        if let Some(e) = unanswered {
            return Err(e);
        }
        let steps = steps?;
        for (i, action) in decide::rollback_order(&seen, original) {
            let node = &self.env.nodes[i];
            if action == RollbackAction::PutBack {
                self.put_back(node, &format!("serving on {original}"))
                    .await?;
                continue;
            }
            let mut h = NodeHistory::from_journal(&steps, &node.id);
            let d = self.rollback_node(node, original, &mut h).await?;
            down.retain(|n| *n != node.id);
            oos.insert(node.id.clone(), d.as_millis() as u64);
            s.order.push(node.id.clone());
        }
        let view = self.cluster_view().await?;
        if view.upgrade_mode_enabled {
            self.step(None, Step::CancelUpgradeMode, async {
                self.env.bitbucket.cancel_upgrade_mode().await?;
                Ok(((), format!("cluster back on {original}")))
            })
            .await?;
        }
        Ok(())
    }

    fn base_summary(&self) -> Summary {
        Summary {
            cluster: self.env.cluster.to_string(),
            from: self.opts.from.clone(),
            to: self.opts.to.clone(),
            run_id: Some(self.run.0),
            ..Default::default()
        }
    }

    async fn versions_now(&self) -> HashMap<String, String> {
        let mut out = HashMap::new();
        for n in self.env.nodes {
            if let Ok(v) = self.env.agents.active_version(n).await {
                out.insert(n.id.clone(), v);
            }
        }
        out
    }

    async fn finish(
        &self,
        mut s: Summary,
        before: &HashMap<String, String>,
        after: &HashMap<String, String>,
        oos: &HashMap<String, u64>,
    ) -> Summary {
        s.nodes = self
            .env
            .nodes
            .iter()
            .map(|n| NodeSummary {
                id: n.id.clone(),
                version_before: before.get(&n.id).cloned().unwrap_or_default(),
                version_after: after.get(&n.id).cloned().unwrap_or_default(),
                out_of_service_ms: oos.get(&n.id).copied().unwrap_or(0),
            })
            .collect();
        s.duration_ms = self.env.reporter.elapsed_ms();
        if let Err(e) = self
            .env
            .journal
            .finish_run(s.result, s.error.as_deref())
            .await
        {
            s.notes.push(format!(
                "could not record the run's end in the journal: {e:#}"
            ));
        }
        s
    }
}

/// Notes in `h` how a step ended; one that could not begin did nothing and keeps its id.
fn note_end<T>(h: &mut NodeHistory, step: Step, r: &Result<T>) {
    match r {
        Ok(_) => h.completed(step),
        Err(e) if e.downcast_ref::<PreStepError>().is_none() => h.ended(step, false),
        Err(_) => {}
    }
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}
