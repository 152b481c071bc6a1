//! Deterministic simulation of the upgrade procedure (the FoundationDB/TigerBeetle VOPR model):
//! the real driver (`procedure::drive`) and its decisions (`procedure::decide`) run against
//! in-memory fakes of the agents, Bitbucket, the load balancer and the journal, on a paused tokio
//! clock, under a seeded schedule of faults at every call: an agent call fails, hangs past its
//! deadline, or succeeds with its reply lost; the coordinator is killed at any call and resumed on
//! the same journal (or the admin runs `rollback` instead); Bitbucket answers 500, 409 or times
//! out; a node starts in ERROR, in FIRST_RUN, stays STARTING, crashes after ACTIVE; every restart
//! comes back under a new row id with the old row left OFFLINE without a version; the load
//! balancer is unreachable; the journal fails a write; the clock jumps.
//!
//! Invariants, checked after every call: never more than one node out of service; one operation
//! id per journaled step. After every run: a node out of service is named in the report. At the
//! end: every node serving on the target (upgraded) or every node on the source (rolled back), the
//! journal's record of the run agreeing with the summary.
//!
//! `BBUPGRADE_DST_SEEDS=N` (default 10,000) and `BBUPGRADE_DST_FIRST_SEED=S` (default 1) choose
//! the schedules; a failing seed prints its schedule and becomes a named test below.
//! `BBUPGRADE_DST_LIST=1` lists the first violation of every failing seed; `BBUPGRADE_DST_DUMP=1`
//! adds the journal to a printed schedule.
//!
//! The fakes follow BITBUCKET-FACTS.md: names "Not configured" (nodes are matched by address),
//! a restarted node's new row under a new id with the old row left OFFLINE without a version, a
//! starting row without address or version; and the agent's rules: a completed operation id is
//! replayed, a failed one runs again, a rollback activates only the version it names.

use async_trait::async_trait;
use bbupgrade::inventory::{Node, Timeouts};
use bbupgrade::journal::{RunId, RunResult, StepId, StepOutcome, StepRecord};
use bbupgrade::node_match::NodeKey;
use bbupgrade::procedure::drive::{Agents, Balancer, Bitbucket, Driver, Env, RunJournal};
use bbupgrade::procedure::{RunOptions, Step};
use bbupgrade::report::{Reporter, Summary};
use bbupgrade::zdu::{ClusterState, ClusterView, NodeState, ZduNode};
use std::collections::HashMap;
use std::io::Write;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const FROM: &str = "8.19.3";
const TO: &str = "8.19.6";
/// Runs per schedule: the first upgrade, then resumes (or a rollback); the last two are
/// fault-free (the first of them may only halt cleanly on a node the faults left broken).
const MAX_RUNS: usize = 8;
/// Calls after which a schedule counts as a livelock.
const MAX_CALLS: u64 = 20_000;

/// splitmix64: small, seedable, the same on every platform.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    /// True with probability `per_mille` / 1000.
    fn chance(&mut self, per_mille: u64) -> bool {
        self.below(1000) < per_mille
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Bb {
    Offline,
    Starting(u32),
    Active,
    Error,
}

/// Faults armed on a node for the new version: what happens when it starts on it.
#[derive(Debug, Clone, Copy, PartialEq)]
enum StartFault {
    None,
    Error,
    FirstRun,
    StaysStarting,
    CrashAfterActive,
}

struct SimNode {
    id: String,
    ip: String,
    active: String,
    previous: Option<String>,
    staged: bool,
    running: bool,
    bb: Bb,
    row_id: String,
    old_rows: Vec<String>,
    lb_out: bool,
    users: u64,
    /// The agent's journal: operation id -> (kind, result).
    ops: HashMap<String, (String, Result<String, String>)>,
    fault: StartFault,
}

struct Journal {
    steps: Vec<StepRecord>,
    runs: Vec<(RunId, bool, Option<RunResult>)>,
}

struct World {
    rng: Rng,
    nodes: Vec<SimNode>,
    upgrade_mode: bool,
    finalized: bool,
    next_row: u64,
    journal: Journal,
    /// Per-call fault probability (per mille) while faults are on.
    fault_rate: u64,
    faults_on: bool,
    calls: u64,
    kill_at: Option<u64>,
    killed: bool,
    /// The step open on each node and the agent operation ids sent during it.
    op_of_step: HashMap<i64, String>,
    trace: Vec<String>,
    violations: Vec<String>,
}

/// What a faulty call does.
enum Fault {
    None,
    /// Fails before any effect.
    Fail,
    /// The effect happens, the reply is lost.
    LostReply,
    /// No answer: the caller waits out its deadline.
    Hang,
}

type Shared = Arc<Mutex<World>>;

fn lock(w: &Shared) -> std::sync::MutexGuard<'_, World> {
    w.lock().unwrap_or_else(|p| p.into_inner())
}

impl World {
    fn new(seed: u64) -> Self {
        let mut rng = Rng(seed);
        let n = 2 + rng.below(3) as usize;
        let nodes = (1..=n)
            .map(|i| SimNode {
                id: format!("n{i}"),
                ip: format!("10.0.0.{i}"),
                active: FROM.into(),
                // Half the nodes were upgraded once before (from 8.19.1).
                previous: rng.chance(500).then(|| "8.19.1".to_string()),
                staged: false,
                running: true,
                bb: Bb::Active,
                row_id: format!("uuid-{i}-0"),
                old_rows: Vec::new(),
                lb_out: false,
                users: rng.below(50),
                ops: HashMap::new(),
                fault: StartFault::None,
            })
            .collect();
        let fault_rate = [0, 10, 30, 80][rng.below(4) as usize];
        Self {
            rng,
            nodes,
            upgrade_mode: false,
            finalized: false,
            next_row: 100,
            journal: Journal {
                steps: Vec::new(),
                runs: Vec::new(),
            },
            fault_rate,
            faults_on: true,
            calls: 0,
            kill_at: None,
            killed: false,
            op_of_step: HashMap::new(),
            trace: Vec::new(),
            violations: Vec::new(),
        }
    }

    fn node(&mut self, id: &str) -> &mut SimNode {
        let i = self
            .nodes
            .iter()
            .position(|n| n.id == id)
            .expect("known node");
        &mut self.nodes[i]
    }

    /// Every call goes through here: it may kill the coordinator, jump the clock, or draw a fault.
    fn enter(&mut self, what: &str) -> (bool, Fault, Option<Duration>) {
        self.calls += 1;
        if self.calls > MAX_CALLS {
            if self.calls == MAX_CALLS + 1 {
                self.violations
                    .push(format!("no end after {MAX_CALLS} calls (a livelock)"));
            }
            // Ends the run as a kill does.
            self.killed = true;
            return (true, Fault::None, None);
        }
        self.trace.push(format!("#{} {what}", self.calls));
        if self.kill_at == Some(self.calls) {
            self.killed = true;
            self.trace.push("  coordinator killed".into());
            return (true, Fault::None, None);
        }
        let jump = (self.faults_on && self.rng.chance(self.fault_rate / 4))
            .then(|| Duration::from_secs(1 + self.rng.below(120)));
        if let Some(j) = jump {
            self.trace.push(format!("  clock jumps {}s", j.as_secs()));
        }
        let fault = if self.faults_on && self.rng.chance(self.fault_rate) {
            match self.rng.below(3) {
                0 => Fault::Fail,
                1 => Fault::LostReply,
                _ => Fault::Hang,
            }
        } else {
            Fault::None
        };
        match fault {
            Fault::Fail => self.trace.push("  fails".into()),
            Fault::LostReply => self.trace.push("  reply lost".into()),
            Fault::Hang => self.trace.push("  hangs".into()),
            Fault::None => {}
        }
        (false, fault, jump)
    }

    fn out_of_service(&self) -> Vec<String> {
        self.nodes
            .iter()
            .filter(|n| n.lb_out || !n.running)
            .map(|n| n.id.clone())
            .collect()
    }

    fn check(&mut self) {
        let out = self.out_of_service();
        if out.len() > 1 {
            let v = format!(
                "call #{}: {} nodes out of service: {out:?}",
                self.calls,
                out.len()
            );
            self.violations.push(v);
        }
    }

    fn start_process(&mut self, id: &str) {
        let row = self.next_row;
        self.next_row += 1;
        let n = self.node(id);
        if n.running {
            return;
        }
        n.running = true;
        let old = std::mem::replace(&mut n.row_id, format!("uuid-{id}-{row}"));
        n.old_rows.push(old);
        n.bb = Bb::Starting(1 + (row % 3) as u32);
    }

    fn stop_process(&mut self, id: &str) {
        let n = self.node(id);
        n.running = false;
        n.bb = Bb::Offline;
    }

    fn view(&mut self) -> ClusterView {
        let mut rows = Vec::new();
        let to_ok = |n: &SimNode| n.active == TO;
        for n in &mut self.nodes {
            if let Bb::Starting(k) = n.bb.clone() {
                n.bb = if k > 1 {
                    Bb::Starting(k - 1)
                } else {
                    match (to_ok(n), n.fault) {
                        (true, StartFault::Error) => Bb::Error,
                        (true, StartFault::StaysStarting | StartFault::FirstRun) => Bb::Starting(1),
                        _ => Bb::Active,
                    }
                };
            } else if n.bb == Bb::Active && to_ok(n) && n.fault == StartFault::CrashAfterActive {
                // Crashes once, right after it became ACTIVE on the new version.
                n.fault = StartFault::None;
                n.running = false;
                n.bb = Bb::Offline;
            }
            for old in &n.old_rows {
                rows.push(row(old, Some(&n.ip), NodeState::Offline, None, 0));
            }
            let (state, version, ip) = match n.bb {
                Bb::Offline => (NodeState::Offline, None, Some(n.ip.as_str())),
                Bb::Starting(_) => (NodeState::Starting, None, None),
                Bb::Active => (
                    NodeState::Active,
                    Some(n.active.as_str()),
                    Some(n.ip.as_str()),
                ),
                Bb::Error => (
                    NodeState::Error,
                    Some(n.active.as_str()),
                    Some(n.ip.as_str()),
                ),
            };
            rows.push(row(&n.row_id, ip, state, version, n.users));
        }
        let live: Vec<&ZduNode> = rows
            .iter()
            .filter(|r| r.state != NodeState::Offline)
            .collect();
        let all_new = !live.is_empty() && live.iter().all(|r| r.runs(TO));
        let any_new = live.iter().any(|r| r.runs(TO));
        let state = match (self.upgrade_mode, all_new, any_new) {
            (false, _, _) => ClusterState::Stable,
            (true, true, _) => ClusterState::ReadyToRunUpgradeTasks,
            (true, false, true) => ClusterState::Mixed,
            (true, false, false) => ClusterState::ReadyToUpgrade,
        };
        ClusterView {
            upgrade_mode_enabled: self.upgrade_mode,
            state,
            original_version: Some(FROM.into()),
            nodes: rows,
        }
    }

    fn any_live_new(&mut self) -> bool {
        self.nodes
            .iter()
            .any(|n| n.running && n.active == TO && matches!(n.bb, Bb::Active | Bb::Error))
    }
}

fn row(id: &str, ip: Option<&str>, state: NodeState, version: Option<&str>, users: u64) -> ZduNode {
    let offline = state == NodeState::Offline;
    ZduNode {
        id: id.into(),
        name: Some("Not configured".into()),
        ip_address: ip.map(str::to_string),
        state,
        tasks_total: (!offline).then_some(0),
        active_user_count: (!offline).then_some(users),
        build_number: None,
        version: version.map(str::to_string),
        local: false,
        port_number: Some(5701),
    }
}

/// The fakes, sharing one world; `deadline` is what a hung call waits before failing.
struct Fakes {
    w: Shared,
    kill: Arc<tokio::sync::Notify>,
}

impl Fakes {
    /// Enters a call: on a kill, never returns (the coordinator is gone); on a hang, waits out
    /// `deadline`. Returns the fault drawn.
    async fn enter(&self, what: &str, deadline: Duration) -> Fault {
        let (killed, fault, jump) = lock(&self.w).enter(what);
        if killed {
            self.kill.notify_one();
            std::future::pending::<()>().await;
        }
        if let Some(j) = jump {
            tokio::time::advance(j).await;
        }
        if matches!(fault, Fault::Hang) {
            tokio::time::sleep(deadline).await;
        }
        fault
    }

    /// Runs an agent operation with the agent's replay rule, under the drawn fault.
    async fn agent_op(
        &self,
        node: &Node,
        kind: &str,
        op: &str,
        deadline: Duration,
        effect: impl FnOnce(&mut World) -> Result<String, String>,
    ) -> anyhow::Result<String> {
        let fault = self
            .enter(&format!("agent {} {kind} {op}", node.id), deadline)
            .await;
        let mut w = lock(&self.w);
        w.note_op(&node.id, op);
        if matches!(fault, Fault::Fail) {
            anyhow::bail!(
                "node '{}': the agent is unreachable (connection refused)",
                node.id
            );
        }
        let hung = matches!(fault, Fault::Hang);
        // A hung call may have done its work or not; an agent restarted mid-operation too.
        if hung && w.rng.chance(500) {
            anyhow::bail!(
                "node '{}': no answer from the agent within {deadline:?}",
                node.id
            );
        }
        let recorded = w.node(&node.id).ops.get(op).cloned();
        // Like the agent's journal: a completed operation is replayed, a failed one runs again.
        let result = match recorded {
            Some((k, _)) if k != kind => Err(format!("operation id {op} was used for {k}")),
            Some((_, Ok(r))) => Ok(r),
            _ => {
                let r = effect(&mut w);
                w.node(&node.id)
                    .ops
                    .insert(op.into(), (kind.into(), r.clone()));
                w.trace.push(format!("  -> {r:?}"));
                r
            }
        };
        w.check();
        if hung || matches!(fault, Fault::LostReply) {
            anyhow::bail!("node '{}': the agent's answer was lost", node.id);
        }
        result.map_err(|e| anyhow::anyhow!("node '{}': {e}", node.id))
    }
}

impl World {
    /// One agent operation id per journaled step.
    fn note_op(&mut self, node: &str, op: &str) {
        let open = self
            .journal
            .steps
            .iter()
            .rev()
            .find(|s| s.node.as_deref() == Some(node) && s.outcome.is_none())
            .map(|s| s.id.0);
        if let Some(step) = open {
            match self.op_of_step.get(&step) {
                Some(prev) if prev != op => {
                    let v = format!("step #{step} on {node} sent two operations: {prev} and {op}");
                    self.violations.push(v);
                }
                _ => {
                    self.op_of_step.insert(step, op.to_string());
                }
            }
        }
    }
}

/// The journal of one run, in the world (it outlives the coordinator).
struct SimJournal {
    f: Fakes,
    run: RunId,
}

const CALL: Duration = Duration::from_secs(30);

#[async_trait]
impl Agents for Fakes {
    async fn stage_all(&self) -> anyhow::Result<()> {
        let fault = self.enter("agents stage", CALL).await;
        let mut w = lock(&self.w);
        if matches!(fault, Fault::Fail | Fault::Hang) {
            anyhow::bail!("staging failed; no node was taken out of service: node 'n1': disk full");
        }
        for n in &mut w.nodes {
            n.staged = true;
        }
        Ok(())
    }

    async fn active_version(&self, node: &Node) -> anyhow::Result<String> {
        let fault = self.enter(&format!("agent {} info", node.id), CALL).await;
        if !matches!(fault, Fault::None) {
            anyhow::bail!("node '{}': the agent did not answer", node.id);
        }
        Ok(lock(&self.w).node(&node.id).active.clone())
    }

    async fn cpu(&self, _node: &Node) -> f32 {
        0.0
    }

    async fn stop(&self, node: &Node, op: &str, timeout_secs: u64) -> anyhow::Result<String> {
        let id = node.id.clone();
        self.agent_op(
            node,
            "stop",
            op,
            Duration::from_secs(timeout_secs),
            move |w| {
                let was = w.node(&id).running;
                w.stop_process(&id);
                w.check();
                Ok(format!("was_running={was}"))
            },
        )
        .await
    }

    async fn activate(&self, node: &Node, op: &str, version: &str) -> anyhow::Result<String> {
        let (id, version) = (node.id.clone(), version.to_string());
        self.agent_op(node, "activate", op, CALL, move |w| {
            let n = w.node(&id);
            if !n.staged {
                return Err(format!("{version} is not staged"));
            }
            if n.active != version {
                n.previous = Some(std::mem::replace(&mut n.active, version.clone()));
            }
            Ok(format!("{version} active"))
        })
        .await
    }

    async fn start(&self, node: &Node, op: &str, timeout_secs: u64) -> anyhow::Result<String> {
        let id = node.id.clone();
        self.agent_op(
            node,
            "start",
            op,
            Duration::from_secs(timeout_secs),
            move |w| {
                w.start_process(&id);
                w.check();
                let n = w.node(&id);
                if n.active == TO && n.fault == StartFault::FirstRun {
                    return Err("the node shows the setup wizard (FIRST_RUN)".into());
                }
                Ok(format!("RUNNING on {}", n.active))
            },
        )
        .await
    }

    async fn rollback(
        &self,
        node: &Node,
        op: &str,
        target: &str,
        t: &Timeouts,
    ) -> anyhow::Result<String> {
        let (id, target) = (node.id.clone(), target.to_string());
        let d = Duration::from_secs(t.stop_secs + t.start_secs);
        self.agent_op(node, "rollback", op, d, move |w| {
            // The agent's rule (agent/src/rollback.rs): only the named version, never older.
            let n = w.node(&id);
            if n.active != target {
                if n.previous.as_deref() != Some(target.as_str()) {
                    return Err(format!(
                        "runs {} with previous {:?}: cannot return to {target}",
                        n.active, n.previous
                    ));
                }
                w.stop_process(&id);
                let n = w.node(&id);
                let prev = n.previous.replace(n.active.clone());
                n.active = prev.unwrap_or_default();
            }
            w.start_process(&id);
            w.check();
            Ok(format!("RUNNING {target}"))
        })
        .await
    }
}

#[async_trait]
impl Bitbucket for Fakes {
    async fn cluster(&self) -> anyhow::Result<ClusterView> {
        match self
            .enter("bitbucket cluster", Duration::from_secs(10))
            .await
        {
            Fault::None => Ok(lock(&self.w).view()),
            Fault::Hang => anyhow::bail!("asking Bitbucket for the cluster state: timed out"),
            _ => anyhow::bail!("asking Bitbucket for the cluster state: HTTP 500"),
        }
    }

    async fn start_upgrade_mode(&self) -> anyhow::Result<()> {
        let fault = self.enter("bitbucket start", Duration::from_secs(10)).await;
        let mut w = lock(&self.w);
        if matches!(fault, Fault::Fail | Fault::Hang) {
            anyhow::bail!("POST /rest/zdu/start: HTTP 500");
        }
        if w.upgrade_mode {
            anyhow::bail!("POST /rest/zdu/start: HTTP 409 (empty body)");
        }
        w.upgrade_mode = true;
        if matches!(fault, Fault::LostReply) {
            anyhow::bail!("POST /rest/zdu/start: timed out");
        }
        Ok(())
    }

    async fn cancel_upgrade_mode(&self) -> anyhow::Result<()> {
        let fault = self
            .enter("bitbucket cancel", Duration::from_secs(10))
            .await;
        let mut w = lock(&self.w);
        if matches!(fault, Fault::Fail | Fault::Hang) {
            anyhow::bail!("POST /rest/zdu/cancel: HTTP 500");
        }
        if !w.upgrade_mode || w.any_live_new() {
            anyhow::bail!("POST /rest/zdu/cancel: HTTP 409");
        }
        w.upgrade_mode = false;
        Ok(())
    }

    async fn approve(&self) -> anyhow::Result<()> {
        let fault = self
            .enter("bitbucket approve", Duration::from_secs(10))
            .await;
        let mut w = lock(&self.w);
        if matches!(fault, Fault::Fail | Fault::Hang) {
            anyhow::bail!("POST /rest/zdu/approve: HTTP 500");
        }
        if w.view().state != ClusterState::ReadyToRunUpgradeTasks {
            anyhow::bail!("POST /rest/zdu/approve: HTTP 409");
        }
        w.upgrade_mode = false;
        w.finalized = true;
        Ok(())
    }
}

#[async_trait]
impl Balancer for Fakes {
    async fn drain(&self, node: &Node, timeout: Duration) -> anyhow::Result<String> {
        let fault = self.enter(&format!("lb drain {}", node.id), timeout).await;
        let mut w = lock(&self.w);
        if matches!(fault, Fault::Fail | Fault::Hang) {
            anyhow::bail!("load balancer: cannot reach the haproxy socket");
        }
        w.node(&node.id).lb_out = true;
        w.check();
        if matches!(fault, Fault::LostReply) {
            anyhow::bail!("load balancer: the haproxy socket closed before answering");
        }
        Ok("drained".into())
    }

    async fn enable(&self, node: &Node) -> anyhow::Result<()> {
        let fault = self.enter(&format!("lb enable {}", node.id), CALL).await;
        let mut w = lock(&self.w);
        if matches!(fault, Fault::Fail | Fault::Hang) {
            anyhow::bail!("load balancer: cannot reach the haproxy socket");
        }
        w.node(&node.id).lb_out = false;
        if matches!(fault, Fault::LostReply) {
            anyhow::bail!("load balancer: the haproxy socket closed before answering");
        }
        Ok(())
    }

    fn describe(&self) -> String {
        "simulated load balancer".into()
    }

    async fn after_rejoin(&self, _node: &Node) -> Option<String> {
        None
    }
}

#[async_trait]
impl RunJournal for SimJournal {
    async fn begin_step(
        &self,
        node: Option<&str>,
        step: Step,
        detail: &str,
    ) -> anyhow::Result<StepId> {
        let what = format!("journal begin {step} {}", node.unwrap_or("-"));
        let fault = self.f.enter(&what, CALL).await;
        let mut w = lock(&self.f.w);
        if !matches!(fault, Fault::None) {
            anyhow::bail!("journal: disk I/O error");
        }
        let id = StepId(w.journal.steps.len() as i64 + 1);
        w.journal.steps.push(StepRecord {
            id,
            run: self.run,
            node: node.map(str::to_string),
            step: step.as_str().into(),
            started_ms: 0,
            ended_ms: None,
            outcome: None,
            detail: detail.into(),
            end_detail: None,
            actor: String::new(),
        });
        Ok(id)
    }

    async fn end_step(&self, id: StepId, outcome: StepOutcome, detail: &str) -> anyhow::Result<()> {
        let fault = self.f.enter(&format!("journal end #{}", id.0), CALL).await;
        let mut w = lock(&self.f.w);
        if !matches!(fault, Fault::None) {
            anyhow::bail!("journal: disk I/O error");
        }
        let s = &mut w.journal.steps[id.0 as usize - 1];
        s.outcome = Some(outcome);
        s.end_detail = Some(detail.into());
        Ok(())
    }

    async fn steps(&self) -> anyhow::Result<Vec<StepRecord>> {
        let fault = self.f.enter("journal steps", CALL).await;
        let w = lock(&self.f.w);
        if !matches!(fault, Fault::None) {
            anyhow::bail!("journal: disk I/O error");
        }
        Ok(w.journal
            .steps
            .iter()
            .filter(|s| s.run == self.run)
            .cloned()
            .collect())
    }

    async fn finish_run(&self, result: RunResult, _error: Option<&str>) -> anyhow::Result<()> {
        let fault = self.f.enter("journal finish", CALL).await;
        let mut w = lock(&self.f.w);
        if !matches!(fault, Fault::None) {
            anyhow::bail!("journal: disk I/O error");
        }
        if let Some(r) = w.journal.runs.iter_mut().find(|r| r.0 == self.run) {
            r.2 = Some(result);
        }
        Ok(())
    }
}

fn inventory(w: &World) -> (Vec<Node>, HashMap<String, NodeKey>) {
    let nodes: Vec<Node> = w
        .nodes
        .iter()
        .map(|n| Node {
            id: n.id.clone(),
            agent: format!("{}:7443", n.ip),
            lb_server: n.id.clone(),
            bitbucket_name: None,
            bitbucket_address: Some(n.ip.parse().expect("address")),
        })
        .collect();
    let keys = nodes
        .iter()
        .map(|n| (n.id.clone(), n.bitbucket_key()))
        .collect();
    (nodes, keys)
}

fn options(from: &str, to: &str, auto_rollback: bool) -> RunOptions {
    RunOptions {
        to: to.into(),
        from: from.into(),
        archive: None,
        auto_rollback,
        no_finalize: false,
        timeouts: Timeouts {
            drain_secs: 30,
            stop_secs: 60,
            start_secs: 120,
            active_secs: 120,
            soak_secs: 2,
            agent_connect_ms: 1000,
            ..Timeouts::default()
        },
    }
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Kind {
    Upgrade,
    Rollback,
}

/// The steps of the upgrade run a rollback run supersedes.
fn superseded_steps(w: &Shared, run: RunId) -> Vec<StepRecord> {
    let g = lock(w);
    let upgrade = g
        .journal
        .runs
        .iter()
        .rev()
        .find(|r| r.0 < run && !r.1)
        .map(|r| r.0);
    g.journal
        .steps
        .iter()
        .filter(|s| Some(s.run) == upgrade)
        .cloned()
        .collect()
}

/// One run of the driver, which the world may kill at any call; `None` when killed.
async fn one_run(w: &Shared, run: RunId, kind: Kind, opts: &RunOptions) -> Option<Summary> {
    let (nodes, keys) = inventory(&lock(w));
    let kill = Arc::new(tokio::sync::Notify::new());
    let fakes = Fakes {
        w: w.clone(),
        kill: kill.clone(),
    };
    let journal = SimJournal {
        f: Fakes {
            w: w.clone(),
            kill: kill.clone(),
        },
        run,
    };
    let reporter = Reporter::silent();
    let lock_lost = AtomicBool::new(false);
    let env = Env {
        cluster: "sim",
        nodes: &nodes,
        keys: &keys,
        agents: &fakes,
        bitbucket: &fakes,
        lb: &fakes,
        journal: &journal,
        reporter: &reporter,
        lock_lost: &lock_lost,
    };
    let driver = Driver::new(env, run, opts);
    let work = async {
        match kind {
            Kind::Upgrade => driver.upgrade().await,
            Kind::Rollback => {
                let superseded = superseded_steps(w, run);
                driver.rollback(&superseded).await
            }
        }
    };
    tokio::select! {
        s = work => Some(s),
        _ = kill.notified() => None,
    }
}

/// Runs one seeded schedule; returns its violations and its trace.
fn run_seed(seed: u64) -> (Vec<String>, Vec<String>) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("runtime");
    rt.block_on(schedule(seed))
}

async fn schedule(seed: u64) -> (Vec<String>, Vec<String>) {
    let w: Shared = Arc::new(Mutex::new(World::new(seed)));
    let auto_rollback = set_up(&mut lock(&w), seed);
    let mut run_no = 0i64;
    let mut current = (RunId(0), Kind::Upgrade, options(FROM, TO, auto_rollback));
    let mut last: Option<Summary> = None;
    for attempt in 0..MAX_RUNS {
        let start_new = next_command(&mut lock(&w), attempt, current.1);
        if let Some(kind) = start_new {
            run_no += 1;
            let opts = match kind {
                Kind::Upgrade => options(FROM, TO, auto_rollback),
                Kind::Rollback => options(TO, FROM, false),
            };
            current = (RunId(run_no), kind, opts);
            open_run(&mut lock(&w), current.0, kind);
        } else {
            lock(&w).trace.push(format!("== resume run #{}", current.0));
        }
        let summary = one_run(&w, current.0, current.1, &current.2).await;
        let mut g = lock(&w);
        g.killed = false;
        g.kill_at = None;
        if let Some(s) = &summary
            && check_summary(&mut g, s, current.0)
        {
            last = summary.clone();
            break;
        }
        last = summary;
    }
    let mut g = lock(&w);
    if std::env::var_os("BBUPGRADE_DST_DUMP").is_some() {
        dump_journal(&mut g);
    }
    check_end(&mut g, last.as_ref(), current.1);
    (
        std::mem::take(&mut g.violations),
        std::mem::take(&mut g.trace),
    )
}

/// Draws the schedule's setup (auto-rollback, a release fault on one node) and traces it;
/// returns whether auto-rollback is on.
fn set_up(g: &mut World, seed: u64) -> bool {
    let auto = g.rng.chance(300);
    // One node may carry a fault of the new release.
    if g.rng.chance(400) {
        let n = g.nodes.len() as u64;
        let i = g.rng.below(n) as usize;
        let f = [
            StartFault::Error,
            StartFault::FirstRun,
            StartFault::StaysStarting,
            StartFault::CrashAfterActive,
        ][g.rng.below(4) as usize];
        g.nodes[i].fault = f;
    }
    let (n, rate, faults): (usize, u64, Vec<_>) = (
        g.nodes.len(),
        g.fault_rate,
        g.nodes
            .iter()
            .map(|n| format!("{}:{:?}", n.id, n.fault))
            .collect(),
    );
    g.trace.push(format!(
        "seed {seed}: {n} nodes, fault rate {rate}/1000, auto_rollback={auto}, {faults:?}"
    ));
    auto
}

/// What the admin does next: a new run of some kind, or `None` to resume the current one. The
/// last tries run without faults (and the release fault fixed before them).
fn next_command(g: &mut World, attempt: usize, current: Kind) -> Option<Kind> {
    let clean = attempt >= MAX_RUNS - 2;
    g.faults_on = !clean;
    if attempt >= MAX_RUNS - 3 {
        // The admin fixed the release fault before the last tries.
        for n in &mut g.nodes {
            n.fault = StartFault::None;
        }
    }
    g.kill_at = (!clean && g.rng.chance(500)).then(|| g.calls + 1 + g.rng.below(80));
    let choose_rollback = attempt > 0 && !clean && g.rng.chance(150) && !g.finalized;
    if attempt == 0 {
        Some(Kind::Upgrade)
    } else if choose_rollback && current == Kind::Upgrade {
        Some(Kind::Rollback)
    } else {
        None
    }
}

/// Opens run `run` in the journal; `rollback` closes the upgrade it supersedes.
fn open_run(g: &mut World, run: RunId, kind: Kind) {
    for r in &mut g.journal.runs {
        if r.2.is_none() {
            r.2 = Some(RunResult::Halted);
        }
    }
    g.journal.runs.push((run, kind == Kind::Rollback, None));
    g.trace.push(format!("== run #{}: {kind:?}", run.0));
}

/// Checks a run's summary against the journal; true when the run reached its goal.
fn check_summary(g: &mut World, s: &Summary, run: RunId) -> bool {
    g.trace.push(format!(
        "  summary: {} error={:?} notes={:?}",
        s.result.as_str(),
        s.error,
        s.notes
    ));
    check_report_names_out_nodes(g, s);
    let recorded = g.journal.runs.iter().find(|r| r.0 == run).and_then(|r| r.2);
    let unrecorded = s
        .notes
        .iter()
        .any(|n| n.contains("could not record the run's end"));
    if !unrecorded && recorded.is_some_and(|r| r != s.result) {
        let v = format!("journal says {recorded:?}, summary says {:?}", s.result);
        g.violations.push(v);
    }
    matches!(s.result, RunResult::Upgraded | RunResult::RolledBack)
}

/// Adds the journal's steps to the trace (`BBUPGRADE_DST_DUMP`).
fn dump_journal(g: &mut World) {
    let lines: Vec<String> = g
        .journal
        .steps
        .iter()
        .map(|s| {
            format!(
                "  journal #{} run{} {:?} {} {:?}",
                s.id.0, s.run.0, s.node, s.step, s.outcome
            )
        })
        .collect();
    g.trace.extend(lines);
}

/// A run that ends with a node out of service names it in its report.
fn check_report_names_out_nodes(g: &mut World, s: &Summary) {
    if s.result == RunResult::Upgraded || s.result == RunResult::RolledBack {
        return;
    }
    let text = format!("{:?} {:?}", s.error, s.notes);
    // A report that says it cannot tell (the journal unreadable) is honest, not silent.
    if text.contains("cannot say whether a node is out of service") {
        return;
    }
    for id in g.out_of_service() {
        if !text.contains(&format!("'{id}'")) {
            let v = format!(
                "run halted with node {id} out of service, unnamed in: {text} (#{})",
                g.calls
            );
            g.violations.push(v);
        }
    }
}

fn check_end(g: &mut World, last: Option<&Summary>, kind: Kind) {
    let Some(s) = last else {
        g.violations.push("the last run was killed".into());
        return;
    };
    let want = match (s.result, kind) {
        (RunResult::Upgraded, _) => TO,
        (RunResult::RolledBack, _) => FROM,
        (r, _) => {
            let v = format!(
                "after {MAX_RUNS} runs (the last two without faults) the result is {r:?}: {:?}",
                s.error
            );
            g.violations.push(v);
            return;
        }
    };
    let view = g.view();
    for n in &g.nodes {
        if n.active != want || !n.running || n.lb_out || n.bb != Bb::Active {
            let v = format!(
                "{}: ended {} running={} lb_out={} {:?}, not serving on {want}",
                n.id, n.active, n.running, n.lb_out, n.bb
            );
            g.violations.push(v);
        }
    }
    if want == TO && (view.upgrade_mode_enabled || !g.finalized) {
        g.violations.push("upgraded but not finalized".into());
    }
    if want == FROM && view.upgrade_mode_enabled {
        g.violations
            .push("rolled back with upgrade mode still on".into());
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().replace('_', "").parse().ok())
        .unwrap_or(default)
}

#[test]
fn simulation() {
    let count = env_u64("BBUPGRADE_DST_SEEDS", 10_000);
    let first = env_u64("BBUPGRADE_DST_FIRST_SEED", 1);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    let failures: Vec<(u64, Vec<String>, Vec<String>)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                scope.spawn(move || {
                    let mut bad = Vec::new();
                    let mut seed = first + t;
                    while seed < first + count {
                        let (v, trace) = run_seed(seed);
                        if !v.is_empty() {
                            bad.push((seed, v, trace));
                        }
                        seed += threads;
                    }
                    bad
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("simulation thread"))
            .collect()
    });
    let violations: usize = failures.iter().map(|f| f.1.len()).sum();
    let mut out = std::io::stdout().lock();
    let mut sorted = failures;
    sorted.sort_by_key(|f| f.0);
    if std::env::var_os("BBUPGRADE_DST_LIST").is_some() {
        for (seed, v, _) in &sorted {
            let _ = writeln!(out, "seed {seed}: {}", v[0]);
        }
    }
    for (seed, v, trace) in sorted.iter().take(3) {
        let _ = writeln!(
            out,
            "seed {seed} failed: {v:#?}\nschedule:\n{}",
            trace.join("\n")
        );
    }
    let _ = writeln!(
        out,
        "simulation: {count} schedules from seed {first}, {violations} invariant violations"
    );
    let seeds: Vec<u64> = sorted.iter().map(|f| f.0).collect();
    assert!(seeds.is_empty(), "failing seeds: {seeds:?}");
}

/// Seeds that once failed, kept as regression tests.
fn replay(seed: u64) {
    let (v, trace) = run_seed(seed);
    assert!(v.is_empty(), "{v:#?}\n{}", trace.join("\n"));
}

// Each named for what the seed found (fixed in procedure/decide.rs and drive.rs). Seeds are tied
// to this harness's draws: a change to the harness may move a fault elsewhere, not remove a test.

/// A node that failed at its enable while ACTIVE on the target counted as upgraded: never put back.
#[test]
fn seed_1_failed_enable_on_an_upgraded_node_is_finished_on_resume() {
    replay(1);
}

/// A start whose reply was lost kept its operation id after the handled failure: the agent
/// replayed "RUNNING" and nothing started.
#[test]
fn seed_195_a_failed_step_gets_a_fresh_operation_id() {
    replay(195);
}

/// Rolled back in its failure handling, the coordinator died before the marker: the resume saw
/// the upgrade's steps done and soaked the node on the old version.
#[test]
fn seed_27_a_failure_handling_cut_short_voids_the_pass() {
    replay(27);
}

/// `rollback` after a killed upgrade took a second node out while the first was still stopped.
#[test]
fn seed_75_rollback_finishes_the_stopped_node_first() {
    replay(75);
}

/// `rollback` left a node the killed upgrade had drained (ACTIVE on the target) out of service.
#[test]
fn seed_230_rollback_knows_the_node_the_upgrade_left_out() {
    replay(230);
}

/// An unreadable journal at the node's pick gave it an empty history: a stopped node was put
/// back in the load balancer as "never stopped".
#[test]
fn seed_332_the_nodes_history_comes_from_what_was_read_before_the_pick() {
    replay(332);
}

/// A node left in FIRST_RUN was put back in the load balancer when its next drain failed.
#[test]
fn seed_355_only_a_serving_node_is_put_back_as_it_was() {
    replay(355);
}

/// A clock jump ended a soak without a look; the crashed node then looped through enable-only passes.
#[test]
fn seed_888_a_soak_ends_only_on_a_healthy_look_and_a_down_node_starts_over() {
    replay(888);
}

/// wait_offline's end was lost; after activate and start the resume waited for OFFLINE.
#[test]
fn seed_3122_a_lost_step_end_is_not_repeated_after_a_later_step() {
    replay(3122);
}

/// Killed during a failure handling: the next pass's steps never counted as done.
#[test]
fn seed_26290_a_new_pass_ends_a_handling_the_coordinator_died_in() {
    replay(26290);
}

/// A stop cut short, then a start whose answer was lost: every later pass replayed both recorded
/// results and neither stopped nor started the node.
#[test]
fn seed_19190_an_unfinished_operation_is_stale_once_another_ran() {
    replay(19190);
}

/// The journal failing at the node step's end turned a node failure into an anonymous halt.
#[test]
fn seed_3989_a_node_steps_end_that_the_journal_drops_keeps_the_failure() {
    replay(3989);
}
