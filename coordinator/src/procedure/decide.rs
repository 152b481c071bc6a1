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
    /// How often each step completed in the whole run (attempt-numbered operation ids).
    completions: HashMap<Step, usize>,
    /// Steps carried out by this driver since it read the journal.
    this_pass: HashSet<Step>,
}

impl NodeHistory {
    /// The history of `node` from the run's journaled steps (oldest first).
    pub fn from_journal(steps: &[StepRecord], node: &str) -> Self {
        let mut h = Self::default();
        for s in steps.iter().filter(|s| s.node.as_deref() == Some(node)) {
            let Some(step) = Step::parse(&s.step) else {
                continue;
            };
            if step == Step::FailureHandled {
                // A resume starts this node over: what came before does not count as done.
                h.done.clear();
                h.begun.clear();
                continue;
            }
            match s.outcome {
                Some(StepOutcome::Ok) => {
                    h.done.insert(step);
                    *h.completions.entry(step).or_default() += 1;
                }
                _ => {
                    h.begun.insert(step);
                }
            }
        }
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

    /// Notes that `step` is about to run.
    pub fn begin(&mut self, step: Step) {
        self.begun.insert(step);
    }

    /// Notes that `step` completed (whether or not the journal took its end).
    pub fn completed(&mut self, step: Step) {
        self.done.insert(step);
        self.this_pass.insert(step);
        *self.completions.entry(step).or_default() += 1;
    }

    /// A handled failure: the node starts over.
    pub fn failure_handled(&mut self) {
        self.done.clear();
        self.begun.clear();
        self.this_pass.clear();
    }

    /// The agent operation id for the next `step` on `node` in `run`.
    pub fn op_id(&self, run: RunId, node: &str, step: Step) -> String {
        attempt_op_id(
            run,
            node,
            step,
            self.completions.get(&step).copied().unwrap_or(0),
        )
    }
}

/// The operation id of a step on a node, given how often the run already completed it there: a
/// step cut short keeps its id (the agent replays or finishes it), a repeated one gets a new id.
pub fn attempt_op_id(run: RunId, node: &str, step: Step, completed: usize) -> String {
    match completed {
        0 => format!("run{run}.{node}.{step}"),
        n => format!("run{run}.{node}.{step}.a{n}"),
    }
}

/// The next step of a node being upgraded, or `None` when it is back and soaked. Completed steps
/// are not repeated; putting the node back in the load balancer always is, once per pass (a
/// coordinator that died while handling a failure may have taken it out again after an enable).
pub fn next_node_step(h: &NodeHistory) -> Option<Step> {
    NODE_STEPS.into_iter().find(|&s| match s {
        Step::Enable => !h.this_pass.contains(&Step::Enable),
        s => !h.done(s),
    })
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
    if !(f.stop_asked || f.stop_done) {
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

/// Whether the latest "node" step of `node` is open: it was out of service when a coordinator
/// stopped, and it is finished (back into the load balancer) even if it already runs the target.
pub fn node_step_open(steps: &[StepRecord], node: &str) -> bool {
    steps
        .iter()
        .rev()
        .find(|s| s.step == Step::Node && s.node.as_deref() == Some(node))
        .is_some_and(|s| s.outcome.is_none())
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
    /// Bitbucket shows the node ACTIVE on the original version.
    pub serving_original: bool,
}

/// Whether `bbupgrade rollback` must take this node through its out-and-back: it runs another
/// version, or it runs the original but is not serving (a failed node left stopped and out).
pub fn needs_rollback(node: &RollbackObs, original: &str) -> bool {
    node.active_version != original || !node.serving_original
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
        assert!(node_step_open(&steps, "n2"));
        assert!(!node_step_open(&steps, "n3"));
        assert_eq!(finished_nodes(&steps), vec!["n1".to_string()]);
        assert!(!any_stop(&steps));
    }

    #[test]
    fn rollback_takes_a_stopped_node_on_the_original_version_too() {
        let on = |v: &str, serving: bool| RollbackObs {
            active_version: v.into(),
            serving_original: serving,
        };
        assert!(needs_rollback(&on("8.19.6", false), "8.19.3"));
        assert!(needs_rollback(&on("8.19.3", false), "8.19.3"));
        assert!(!needs_rollback(&on("8.19.3", true), "8.19.3"));
    }
}
