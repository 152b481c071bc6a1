//! What the procedure does next, decided from what was observed: the run's journal, the agents'
//! and Bitbucket's state, the options. Pure functions over plain data, tested here exhaustively;
//! the driver (`upgrade.rs`) only carries the answers out.
//!
//! The resume rules live here: a handled failure starts its node over; a step cut short keeps its
//! operation id (the agent replays or finishes it) while a step repeated after a handled failure
//! gets a fresh one; a node a previous coordinator left out of service is finished first; a node
//! whose new install was never activated is not rolled back.

use super::Step;
use crate::journal::{RunId, StepOutcome, StepRecord};
use std::collections::{HashMap, HashSet};

/// The steps of one node, in order, when it is taken out, upgraded and put back.
pub const NODE_STEPS: [Step; 8] = [
    Step::Drain,
    Step::Stop,
    Step::WaitOffline,
    Step::Activate,
    Step::Start,
    Step::WaitActive,
    Step::Enable,
    Step::Soak,
];

/// What the journal says about one node in one run, kept up to date by the driver as it goes so
/// no question about it goes back to the journal.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeHistory {
    /// Steps completed since the node's last handled failure.
    done: HashSet<Step>,
    /// Steps begun since the last handled failure whose end is not recorded (cut short) or failed.
    begun: HashSet<Step>,
    /// The attempt number of each step's operation id: how often it completed in the run, plus
    /// how often another agent operation ran while it was unfinished.
    attempts: HashMap<Step, usize>,
    /// Agent steps begun and not completed: retried with the same id (the agent reruns a failed
    /// operation and finishes one still under way) until another agent operation runs.
    unfinished: HashSet<Step>,
    /// Steps carried out by this driver since it read the journal.
    this_pass: HashSet<Step>,
}

impl NodeHistory {
    /// The history of `node` from the run's journaled steps (oldest first).
    pub fn from_journal(steps: &[StepRecord], node: &str) -> Self {
        let mut h = Self::default();
        // Inside the handling of a failure (from its first step to its marker) nothing counts
        // as done for the upgrade: the node may have been stopped, started as it was or rolled
        // back, so a resume starts it over — also when the coordinator died mid-handling.
        let mut handling = false;
        for s in steps.iter().filter(|s| s.node.as_deref() == Some(node)) {
            let Some(step) = Step::parse(&s.step) else {
                continue;
            };
            // A new pass (its "node" step) also ends a handling the coordinator died in.
            if step == Step::FailureHandled || (step == Step::Node && handling) {
                h.failure_handled();
                handling = false;
                continue;
            }
            if step == Step::Node {
                continue;
            }
            if matches!(step, Step::Disable | Step::StopFailed | Step::Rollback) {
                handling = true;
            }
            h.begin(step);
            match s.outcome {
                Some(StepOutcome::Ok) => h.ended(step, true),
                Some(StepOutcome::Failed(_)) => h.ended(step, false),
                None => {}
            }
            if handling {
                h.done.clear();
                h.begun.clear();
            }
        }
        if handling {
            h.failure_handled();
        }
        h.this_pass.clear();
        h
    }

    /// Whether `step` completed since the node's last handled failure.
    pub fn done(&self, step: Step) -> bool {
        self.done.contains(&step)
    }

    /// Whether `step` was begun (ended or not) since the node's last handled failure.
    pub fn begun(&self, step: Step) -> bool {
        self.done.contains(&step) || self.begun.contains(&step)
    }

    /// Notes that `step` is about to run. An agent operation makes every other unfinished one
    /// stale: the agent may have completed it (its answer lost), and after this operation
    /// replaying that recorded result would do nothing — so it gets a fresh id next time.
    pub fn begin(&mut self, step: Step) {
        self.begun.insert(step);
        if is_agent_operation(step) {
            let stale: Vec<Step> = self
                .unfinished
                .iter()
                .copied()
                .filter(|s| *s != step)
                .collect();
            for s in stale {
                self.unfinished.remove(&s);
                *self.attempts.entry(s).or_default() += 1;
            }
            self.unfinished.insert(step);
        }
    }

    /// Notes how `step` ended (whether or not the journal took it). A completed step gets a new
    /// operation id the next time; a failed one keeps its id, so the agent reruns it — or
    /// finishes it, when it is still under way (a stop outlasting its deadline).
    pub fn ended(&mut self, step: Step, ok: bool) {
        if ok {
            *self.attempts.entry(step).or_default() += 1;
            self.unfinished.remove(&step);
            self.done.insert(step);
            self.this_pass.insert(step);
        } else {
            self.begun.insert(step);
        }
    }

    /// Notes that `step` completed.
    pub fn completed(&mut self, step: Step) {
        self.ended(step, true);
    }

    /// A handled failure: the node starts over.
    pub fn failure_handled(&mut self) {
        self.done.clear();
        self.begun.clear();
        self.this_pass.clear();
    }

    /// What Bitbucket shows now: a node the journal has ACTIVE on the target that no longer is
    /// (it crashed, or was stopped after) starts over — only putting it back would loop.
    pub fn observed(&mut self, not_serving_target: bool) {
        if not_serving_target && self.done(Step::WaitActive) {
            self.failure_handled();
        }
    }

    /// The agent operation id for the next `step` on `node` in `run`.
    pub fn op_id(&self, run: RunId, node: &str, step: Step) -> String {
        attempt_op_id(
            run,
            node,
            step,
            self.attempts.get(&step).copied().unwrap_or(0),
        )
    }
}

/// Steps carried out by the node's agent under an operation id.
fn is_agent_operation(step: Step) -> bool {
    matches!(
        step,
        Step::Stop | Step::Activate | Step::Start | Step::StopFailed | Step::Rollback
    )
}

/// The operation id of a step on a node, given how often the step already ran to an end there: a
/// step cut short keeps its id (the agent replays or finishes it), a repeated one gets a new id —
/// also after a failure, since the agent may have completed what the coordinator saw fail.
pub fn attempt_op_id(run: RunId, node: &str, step: Step, completed: usize) -> String {
    match completed {
        0 => format!("run{run}.{node}.{step}"),
        n => format!("run{run}.{node}.{step}.a{n}"),
    }
}

/// The next step of a node being upgraded, or `None` when it is back and soaked. Completed steps
/// are not repeated; putting the node back in the load balancer always is, once per pass (a
/// coordinator that died while handling a failure may have taken it out again after an enable).
/// The steps of a pass run in order, so one begun means every step before it ran: a step whose
/// end the journal did not take is not repeated after a later one began (waiting for OFFLINE
/// again on a node already started would only time out).
pub fn next_node_step(h: &NodeHistory) -> Option<Step> {
    let latest = NODE_STEPS
        .iter()
        .rposition(|&s| s != Step::Enable && h.begun(s));
    NODE_STEPS
        .into_iter()
        .enumerate()
        .find(|&(i, s)| match s {
            Step::Enable => !h.this_pass.contains(&Step::Enable),
            s => !h.done(s) && latest.is_none_or(|l| i >= l),
        })
        .map(|(_, s)| s)
}

/// Whether a failure of `step` leaves the node possibly stopped (a stop was asked for, or the
/// steps after it ran): then it is kept out of the load balancer.
pub fn stop_asked_by(step: Step) -> bool {
    matches!(
        step,
        Step::Stop
            | Step::WaitOffline
            | Step::Activate
            | Step::Start
            | Step::WaitActive
            | Step::Enable
    )
}

/// What is known about a node that failed after it was taken out of service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailedNode {
    /// A stop was asked of it (this pass or an earlier one).
    pub stop_asked: bool,
    /// Its stop completed.
    pub stop_done: bool,
    /// The agent's active version now, when it answered.
    pub active_version: Option<String>,
    /// The run's activate step on it was begun (it may have switched the install).
    pub activate_begun: bool,
    /// Bitbucket shows it ACTIVE now (false when unknown).
    pub serving: bool,
    /// The version the run upgrades to.
    pub to: String,
    /// The policy: return a failed node to service on the version it ran.
    pub auto_rollback: bool,
}

/// What to do with a failed node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FailurePlan {
    /// It was never stopped: back into the load balancer as it was.
    PutBack,
    /// It may be stopped: keep it out, stop it gracefully (unless its own stop is what failed:
    /// asking again would only wait out the same deadline), then recover it as the policy says.
    KeepOut { stop_again: bool, recover: Recovery },
}

/// How a failed, stopped node comes back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recovery {
    /// Left stopped and out; the report names it (no auto-rollback).
    LeaveStopped,
    /// The new install was activated: roll back to the run's from-version.
    RollBack,
    /// The new install was never activated: start it on what it has (a rollback would activate
    /// the install from the upgrade before last).
    StartAsIs,
}

/// The failure rule: keep a possibly stopped node out, and roll back only what was activated.
pub fn on_failure(f: &FailedNode) -> FailurePlan {
    // Back in only what is surely serving: a node never asked to stop can still be down (left
    // starting, or in the setup wizard, by an earlier pass).
    if !(f.stop_asked || f.stop_done) && f.serving {
        return FailurePlan::PutBack;
    }
    let activated = match &f.active_version {
        Some(v) => *v == f.to,
        // The agent did not answer: an activate that began may have switched the install, and
        // the agent's rollback names its target, so a rollback that finds it there changes nothing.
        None => f.activate_begun,
    };
    let recover = match (f.auto_rollback, activated) {
        (false, _) => Recovery::LeaveStopped,
        (true, true) => Recovery::RollBack,
        (true, false) => Recovery::StartAsIs,
    };
    FailurePlan::KeepOut {
        stop_again: f.stop_done,
        recover,
    }
}

/// Whether the latest "node" step of `node` is not a success: open (a coordinator died while the
/// node was out of service) or failed (the run halted on it). `None`: the node was never begun.
pub fn node_left_unfinished(steps: &[StepRecord], node: &str) -> Option<bool> {
    steps
        .iter()
        .rev()
        .find(|s| s.step == Step::Node && s.node.as_deref() == Some(node))
        .map(|s| s.outcome != Some(StepOutcome::Ok))
}

/// Whether a node still needs its out-and-back: it does not run the target yet, or its latest
/// "node" step is open or failed — it may be out of service (a coordinator died, or it failed at
/// its enable or soak while already ACTIVE on the target), so it is finished even if upgraded.
pub fn node_remaining(upgraded: bool, steps: &[StepRecord], node: &str) -> bool {
    !upgraded || node_left_unfinished(steps, node) == Some(true)
}

/// The node to finish before any other: one a previous coordinator stopped or halted on (it may
/// be out of service, and no second node is taken out meanwhile).
pub fn finish_first<'a>(steps: &[StepRecord], remaining: &[&'a str]) -> Option<&'a str> {
    remaining
        .iter()
        .copied()
        .find(|n| node_left_unfinished(steps, n) == Some(true))
}

/// Nodes finished in earlier passes of the run, in the order they finished (for the report).
pub fn finished_nodes(steps: &[StepRecord]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for s in steps {
        if s.step == Step::Node
            && s.outcome == Some(StepOutcome::Ok)
            && let Some(n) = &s.node
            && !out.contains(n)
        {
            out.push(n.clone());
        }
    }
    out
}

/// Whether the run took any node's stop (the run may have upgraded something).
pub fn any_stop(steps: &[StepRecord]) -> bool {
    steps.iter().any(|s| s.step == Step::Stop)
}

/// What a rollback run sees of a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RollbackObs {
    /// The agent's active version.
    pub active_version: String,
    /// Bitbucket shows the node ACTIVE (on whatever version it runs).
    pub serving: bool,
    /// The upgrade this rollback supersedes left the node unfinished: it may be out of the load
    /// balancer though Bitbucket shows it ACTIVE.
    pub left_out: bool,
}

/// Whether `bbupgrade rollback` must take this node through its out-and-back: it runs another
/// version, or it runs the original but is not serving (a failed node left stopped and out).
pub fn needs_rollback(node: &RollbackObs, original: &str) -> bool {
    node.active_version != original || !node.serving
}

/// Whether `node` was taken out of the load balancer in these steps and not put back since.
pub fn taken_out(steps: &[StepRecord], node: &str) -> bool {
    let mine: Vec<&StepRecord> = steps
        .iter()
        .filter(|s| s.node.as_deref() == Some(node))
        .collect();
    let out = mine
        .iter()
        .rposition(|s| s.step == Step::Drain || s.step == Step::Disable);
    let back = mine
        .iter()
        .rposition(|s| s.step == Step::Enable && s.outcome == Some(StepOutcome::Ok));
    match (out, back) {
        (Some(o), Some(b)) => o > b,
        (Some(_), None) => true,
        _ => false,
    }
}

/// What `bbupgrade rollback` does with a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RollbackAction {
    /// Serving on the original version: only put back in the load balancer (a superseded run may
    /// have drained it before it died).
    PutBack,
    /// Out, returned to the original version (or started on it), ACTIVE, back in.
    RollBack,
}

/// The order of a rollback, by index into `nodes`: nodes serving on the original version go back
/// in first, then nodes that are not serving (already out of service: finished before any other
/// node is taken out), then the serving nodes on another version.
pub fn rollback_order(nodes: &[RollbackObs], original: &str) -> Vec<(usize, RollbackAction)> {
    let rank = |o: &RollbackObs| match (needs_rollback(o, original), o.serving && !o.left_out) {
        (false, _) => 0,
        (true, false) => 1,
        (true, true) => 2,
    };
    let mut order: Vec<usize> = (0..nodes.len()).collect();
    order.sort_by_key(|&i| rank(&nodes[i]));
    order
        .into_iter()
        .map(|i| {
            let action = if rank(&nodes[i]) == 0 {
                RollbackAction::PutBack
            } else {
                RollbackAction::RollBack
            };
            (i, action)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(node: &str, step: Step, outcome: Option<StepOutcome>) -> StepRecord {
        StepRecord {
            id: crate::journal::StepId(0),
            run: RunId(1),
            node: Some(node.into()),
            step: step.as_str().into(),
            started_ms: 0,
            ended_ms: None,
            outcome,
            detail: String::new(),
            end_detail: None,
            actor: String::new(),
        }
    }

    fn ok(node: &str, step: Step) -> StepRecord {
        rec(node, step, Some(StepOutcome::Ok))
    }

    #[test]
    fn a_fresh_node_goes_through_every_step_in_order() {
        let mut h = NodeHistory::default();
        let mut seen = Vec::new();
        while let Some(s) = next_node_step(&h) {
            seen.push(s);
            h.completed(s);
        }
        assert_eq!(seen, NODE_STEPS.to_vec());
    }

    #[test]
    fn a_resumed_node_repeats_nothing_that_completed_but_always_goes_back_in() {
        let steps = vec![
            ok("n1", Step::Drain),
            ok("n1", Step::Stop),
            ok("n1", Step::WaitOffline),
            ok("n1", Step::Activate),
            ok("n1", Step::Start),
            ok("n1", Step::WaitActive),
            ok("n1", Step::Enable),
            ok("n2", Step::Soak),
        ];
        let mut h = NodeHistory::from_journal(&steps, "n1");
        assert_eq!(next_node_step(&h), Some(Step::Enable));
        h.completed(Step::Enable);
        assert_eq!(next_node_step(&h), Some(Step::Soak));
        h.completed(Step::Soak);
        assert_eq!(next_node_step(&h), None);
    }

    #[test]
    fn a_step_cut_short_keeps_its_operation_id() {
        let steps = vec![ok("n1", Step::Drain), rec("n1", Step::Stop, None)];
        let h = NodeHistory::from_journal(&steps, "n1");
        assert_eq!(next_node_step(&h), Some(Step::Stop));
        assert_eq!(h.op_id(RunId(7), "n1", Step::Stop), "run7.n1.stop");
        assert!(h.begun(Step::Stop) && !h.done(Step::Stop));
    }

    #[test]
    fn a_handled_failure_starts_the_node_over_with_fresh_operation_ids() {
        let steps = vec![
            ok("n1", Step::Drain),
            ok("n1", Step::Stop),
            rec(
                "n1",
                Step::WaitOffline,
                Some(StepOutcome::Failed("x".into())),
            ),
            ok("n1", Step::FailureHandled),
        ];
        let mut h = NodeHistory::from_journal(&steps, "n1");
        assert_eq!(next_node_step(&h), Some(Step::Drain));
        assert!(!h.begun(Step::WaitOffline));
        assert_eq!(h.op_id(RunId(7), "n1", Step::Stop), "run7.n1.stop.a1");
        h.completed(Step::Stop);
        assert_eq!(h.op_id(RunId(7), "n1", Step::Stop), "run7.n1.stop.a2");
        h.failure_handled();
        assert_eq!(next_node_step(&h), Some(Step::Drain));
    }

    #[test]
    fn a_step_that_failed_gets_a_fresh_operation_id_even_if_the_agent_completed_it() {
        // The start's answer was lost: the coordinator recorded a failure, the agent a success.
        // Replaying that id after the node was stopped again would start nothing.
        let steps = vec![
            ok("n1", Step::Stop),
            rec("n1", Step::Start, Some(StepOutcome::Failed("lost".into()))),
            ok("n1", Step::StopFailed),
            ok("n1", Step::FailureHandled),
        ];
        let h = NodeHistory::from_journal(&steps, "n1");
        assert_eq!(h.op_id(RunId(1), "n1", Step::Start), "run1.n1.start.a1");
        assert_eq!(h.op_id(RunId(1), "n1", Step::Stop), "run1.n1.stop.a1");
    }

    #[test]
    fn a_step_left_unfinished_keeps_its_id_unless_the_failure_handling_touched_the_node() {
        // A stop that outlasted its deadline, handled by keeping the node out: the resume's stop
        // keeps the id, so the agent finishes the stop still under way instead of starting one.
        let steps = vec![
            rec(
                "n1",
                Step::Stop,
                Some(StepOutcome::Failed("deadline".into())),
            ),
            ok("n1", Step::Disable),
            ok("n1", Step::FailureHandled),
        ];
        let h = NodeHistory::from_journal(&steps, "n1");
        assert_eq!(h.op_id(RunId(1), "n1", Step::Stop), "run1.n1.stop");
        let mut touched = steps.clone();
        touched.insert(2, ok("n1", Step::StopFailed));
        let h = NodeHistory::from_journal(&touched, "n1");
        assert_eq!(h.op_id(RunId(1), "n1", Step::Stop), "run1.n1.stop.a1");
        let mut live = NodeHistory::default();
        live.begin(Step::Start);
        live.ended(Step::Start, false);
        assert_eq!(live.op_id(RunId(1), "n1", Step::Start), "run1.n1.start");
        assert!(!live.done(Step::Start) && live.begun(Step::Start));
        live.begin(Step::StopFailed);
        assert_eq!(live.op_id(RunId(1), "n1", Step::Start), "run1.n1.start.a1");
    }

    #[test]
    fn a_failure_handling_cut_short_voids_the_pass_before_it() {
        // Found by the simulation: the node was upgraded, failed at soak, rolled back; the
        // coordinator died before the failure marker. The resume saw every upgrade step done,
        // only put the node back and soaked it on the old version.
        let mut steps: Vec<StepRecord> = NODE_STEPS.iter().map(|s| ok("n1", *s)).collect();
        steps.push(ok("n1", Step::Disable));
        steps.push(ok("n1", Step::StopFailed));
        steps.push(ok("n1", Step::Drain));
        steps.push(ok("n1", Step::Rollback));
        steps.push(rec("n1", Step::WaitActive, None));
        let h = NodeHistory::from_journal(&steps, "n1");
        assert_eq!(next_node_step(&h), Some(Step::Drain));
        assert_eq!(h.op_id(RunId(1), "n1", Step::Start), "run1.n1.start.a1");
        assert_eq!(h.op_id(RunId(1), "n1", Step::Stop), "run1.n1.stop.a1");
    }

    #[test]
    fn a_node_down_though_its_steps_are_done_starts_over() {
        // Found by the simulation: crashed after its soak; each pass only put it back.
        let steps: Vec<StepRecord> = NODE_STEPS.iter().map(|s| ok("n1", *s)).collect();
        let mut h = NodeHistory::from_journal(&steps, "n1");
        h.observed(false);
        assert_eq!(next_node_step(&h), Some(Step::Enable));
        h.observed(true);
        assert_eq!(next_node_step(&h), Some(Step::Drain));
        assert_eq!(h.op_id(RunId(1), "n1", Step::Start), "run1.n1.start.a1");
    }

    #[test]
    fn a_step_whose_end_was_lost_is_not_repeated_after_a_later_one_began() {
        // Found by the simulation: wait_offline's end was not journaled, activate and start ran,
        // the coordinator died; the resume waited for OFFLINE on a started node.
        let steps = vec![
            ok("n1", Step::Drain),
            ok("n1", Step::Stop),
            rec("n1", Step::WaitOffline, None),
            ok("n1", Step::Activate),
            rec(
                "n1",
                Step::Start,
                Some(StepOutcome::Failed("FIRST_RUN".into())),
            ),
        ];
        let h = NodeHistory::from_journal(&steps, "n1");
        assert_eq!(next_node_step(&h), Some(Step::Start));
        // It failed on the agent too: the agent runs it again under the same id.
        assert_eq!(h.op_id(RunId(1), "n1", Step::Start), "run1.n1.start");
    }

    #[test]
    fn a_new_pass_ends_a_handling_the_coordinator_died_in() {
        // Found by the simulation: killed during stop_failed; the next pass's steps never
        // counted as done, so its resume started the node over while it was starting.
        let steps = vec![
            rec(
                "n1",
                Step::Start,
                Some(StepOutcome::Failed("FIRST_RUN".into())),
            ),
            ok("n1", Step::Disable),
            rec("n1", Step::StopFailed, None),
            rec("n1", Step::Node, None),
            ok("n1", Step::Drain),
            ok("n1", Step::Stop),
            ok("n1", Step::WaitOffline),
            ok("n1", Step::Activate),
            rec("n1", Step::Start, None),
        ];
        let h = NodeHistory::from_journal(&steps, "n1");
        assert_eq!(next_node_step(&h), Some(Step::Start));
        assert_eq!(h.op_id(RunId(1), "n1", Step::Start), "run1.n1.start.a1");
    }

    #[test]
    fn an_unfinished_step_gets_a_fresh_id_once_another_agent_operation_ran() {
        // Found by the simulation: a stop cut short, then a start whose answer was lost (the
        // agent started the node); the next pass replayed both recorded results and neither
        // stopped nor started anything, for ever.
        let steps = vec![
            ok("n1", Step::Drain),
            rec("n1", Step::Stop, None),
            ok("n1", Step::WaitOffline),
            ok("n1", Step::Activate),
            rec("n1", Step::Start, Some(StepOutcome::Failed("lost".into()))),
            rec("n1", Step::Disable, None),
            rec("n1", Step::Node, None),
            ok("n1", Step::Drain),
        ];
        let h = NodeHistory::from_journal(&steps, "n1");
        assert_eq!(next_node_step(&h), Some(Step::Stop));
        assert_eq!(h.op_id(RunId(1), "n1", Step::Stop), "run1.n1.stop.a1");
        let mut h = h;
        h.begin(Step::Stop);
        h.completed(Step::Stop);
        assert_eq!(h.op_id(RunId(1), "n1", Step::Start), "run1.n1.start.a1");
    }

    #[test]
    fn unknown_step_names_and_other_nodes_are_ignored() {
        let mut steps = vec![ok("n2", Step::Drain), ok("n2", Step::Stop)];
        let mut odd = ok("n1", Step::Drain);
        odd.step = "from_a_newer_version".into();
        steps.push(odd);
        let h = NodeHistory::from_journal(&steps, "n1");
        assert_eq!(h, NodeHistory::default());
    }

    #[test]
    fn only_steps_from_stop_to_enable_leave_a_failed_node_possibly_stopped() {
        let stopped: Vec<Step> = NODE_STEPS
            .into_iter()
            .filter(|s| stop_asked_by(*s))
            .collect();
        assert_eq!(
            stopped,
            vec![
                Step::Stop,
                Step::WaitOffline,
                Step::Activate,
                Step::Start,
                Step::WaitActive,
                Step::Enable
            ]
        );
    }

    fn failed(stop_asked: bool, stop_done: bool, active: Option<&str>) -> FailedNode {
        FailedNode {
            stop_asked,
            stop_done,
            active_version: active.map(str::to_string),
            activate_begun: false,
            serving: !stop_asked,
            to: "8.19.6".into(),
            auto_rollback: true,
        }
    }

    #[test]
    fn a_node_never_stopped_goes_back_in() {
        assert_eq!(
            on_failure(&failed(false, false, Some("8.19.3"))),
            FailurePlan::PutBack
        );
    }

    #[test]
    fn a_node_never_stopped_but_not_serving_is_kept_out() {
        // Found by the simulation: left in FIRST_RUN on the new version by an earlier pass, its
        // drain failed, and it was put back in the load balancer "as it was".
        let mut f = failed(false, false, Some("8.19.6"));
        f.serving = false;
        assert_eq!(
            on_failure(&f),
            FailurePlan::KeepOut {
                stop_again: false,
                recover: Recovery::RollBack
            }
        );
    }

    #[test]
    fn a_failure_before_activate_is_not_rolled_back_but_started_on_what_it_has() {
        // Failure at wait_offline on a node upgraded once before: a rollback would activate the
        // install from the upgrade before last.
        assert_eq!(
            on_failure(&failed(true, true, Some("8.19.3"))),
            FailurePlan::KeepOut {
                stop_again: true,
                recover: Recovery::StartAsIs
            }
        );
        // Its own stop failed: not asked again.
        assert_eq!(
            on_failure(&failed(true, false, Some("8.19.3"))),
            FailurePlan::KeepOut {
                stop_again: false,
                recover: Recovery::StartAsIs
            }
        );
    }

    #[test]
    fn an_activated_node_is_rolled_back_when_the_policy_says_so() {
        let mut f = failed(true, true, Some("8.19.6"));
        assert!(matches!(
            on_failure(&f),
            FailurePlan::KeepOut {
                recover: Recovery::RollBack,
                ..
            }
        ));
        f.auto_rollback = false;
        assert!(matches!(
            on_failure(&f),
            FailurePlan::KeepOut {
                recover: Recovery::LeaveStopped,
                ..
            }
        ));
    }

    #[test]
    fn an_unreachable_agent_is_rolled_back_only_if_activate_began() {
        let mut f = failed(true, true, None);
        assert!(matches!(
            on_failure(&f),
            FailurePlan::KeepOut {
                recover: Recovery::StartAsIs,
                ..
            }
        ));
        f.activate_begun = true;
        assert!(matches!(
            on_failure(&f),
            FailurePlan::KeepOut {
                recover: Recovery::RollBack,
                ..
            }
        ));
    }

    #[test]
    fn the_node_left_out_is_finished_first() {
        let steps = vec![
            ok("n1", Step::Node),
            rec("n2", Step::Node, None),
            rec("n3", Step::Node, Some(StepOutcome::Failed("x".into()))),
        ];
        assert_eq!(finish_first(&steps, &["n1", "n3", "n2"]), Some("n3"));
        assert_eq!(finish_first(&steps, &["n1"]), None);
        // Upgraded, but left open or failed: it may be out of service, so it is finished.
        assert!(node_remaining(true, &steps, "n2"));
        assert!(node_remaining(true, &steps, "n3"));
        assert!(!node_remaining(true, &steps, "n1"));
        assert!(node_remaining(false, &steps, "n1"));
        assert_eq!(finished_nodes(&steps), vec!["n1".to_string()]);
        assert!(!any_stop(&steps));
    }

    #[test]
    fn a_node_drained_and_not_enabled_since_is_out() {
        let steps = vec![
            ok("n1", Step::Drain),
            ok("n1", Step::Enable),
            rec("n1", Step::Drain, None),
        ];
        assert!(taken_out(&steps, "n1"));
        assert!(!taken_out(&steps[..2], "n1"));
        assert!(!taken_out(&steps, "n2"));
    }

    #[test]
    fn rollback_takes_a_stopped_node_on_the_original_version_too() {
        let on = |v: &str, serving: bool| RollbackObs {
            active_version: v.into(),
            serving,
            left_out: false,
        };
        assert!(needs_rollback(&on("8.19.6", false), "8.19.3"));
        assert!(needs_rollback(&on("8.19.3", false), "8.19.3"));
        assert!(!needs_rollback(&on("8.19.3", true), "8.19.3"));
    }

    #[test]
    fn rollback_finishes_the_node_already_out_before_taking_another_out() {
        let on = |v: &str, serving: bool| RollbackObs {
            active_version: v.into(),
            serving,
            left_out: false,
        };
        // Found by the simulation: node 0 upgraded and serving, node 1 activated and stopped
        // when the coordinator died; the rollback took node 0 out while node 1 was down.
        let nodes = [
            on("8.19.6", true),
            on("8.19.6", false),
            on("8.19.3", false),
            on("8.19.3", true),
        ];
        assert_eq!(
            rollback_order(&nodes, "8.19.3"),
            vec![
                (3, RollbackAction::PutBack),
                (1, RollbackAction::RollBack),
                (2, RollbackAction::RollBack),
                (0, RollbackAction::RollBack)
            ]
        );
        // Also found by the simulation: node 1 ACTIVE on the new version but left drained by the
        // upgrade that died; it goes before node 0.
        let mut nodes = [on("8.19.6", true), on("8.19.6", true)];
        nodes[1].left_out = true;
        assert_eq!(
            rollback_order(&nodes, "8.19.3")[0],
            (1, RollbackAction::RollBack)
        );
    }
}
