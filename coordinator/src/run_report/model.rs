//! What a run report shows, built from journal records alone (pure): per node its steps as bars
//! on one time axis, its out-of-service time, the order nodes were taken in and why, failures and
//! notes; for a fleet run, its clusters by wave with their results.

use crate::fleet::journal::{FleetClusterRecord, FleetRunRecord};
use crate::journal::{RunRecord, StepOutcome, StepRecord};
use crate::procedure::Step;
use serde::Serialize;

/// One step drawn as a bar; times are milliseconds from the start of the run.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Bar {
    pub step: String,
    pub start_ms: i64,
    /// `None` while the step is open (interrupted, or still running): drawn to the run's end.
    pub end_ms: Option<i64>,
    /// "ok" | "failed" | "open".
    pub outcome: &'static str,
    pub detail: String,
}

/// One node's lane.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct NodeLane {
    pub node: String,
    pub bars: Vec<Bar>,
    /// From its drain to its return to the load balancer; to the run's end if it never returned.
    pub out_of_service_ms: Option<i64>,
    pub returned: bool,
}

/// Why a node came when it did.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Pick {
    pub node: String,
    pub why: String,
}

/// A step that failed.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Failure {
    pub node: Option<String>,
    pub step: String,
    pub at_ms: i64,
    pub error: String,
}

/// One cluster run, ready to render (stable field names for `--format json`).
#[derive(Debug, Clone, Serialize)]
pub struct RunPage {
    pub cluster: String,
    pub run: i64,
    pub kind: &'static str,
    pub from: String,
    pub to: String,
    /// "upgraded" | "rolled_back" | "halted" | "refused", or "running" while open.
    pub result: &'static str,
    pub error: Option<String>,
    pub actor: String,
    pub started_ms: i64,
    pub started: String,
    pub duration_ms: i64,
    /// Steps of no node (upgrade mode, approve): the cluster's own lane.
    pub cluster_bars: Vec<Bar>,
    pub nodes: Vec<NodeLane>,
    pub order: Vec<Pick>,
    pub failures: Vec<Failure>,
    pub notes: Vec<String>,
}

/// Steps whose details are worth reading after the run.
const NOTE_STEPS: [Step; 5] = [
    Step::Skew,
    Step::FailureHandled,
    Step::StopFailed,
    Step::Rollback,
    Step::CancelUpgradeMode,
];

fn bar(s: &StepRecord, t0: i64) -> Bar {
    let (outcome, detail) = match &s.outcome {
        Some(StepOutcome::Ok) => ("ok", s.end_detail.clone().unwrap_or_default()),
        Some(StepOutcome::Failed(e)) => ("failed", e.clone()),
        None => ("open", s.detail.clone()),
    };
    let detail = if detail.is_empty() {
        s.detail.clone()
    } else {
        detail
    };
    Bar {
        step: s.step.clone(),
        start_ms: s.started_ms - t0,
        end_ms: s.ended_ms.map(|e| e - t0),
        outcome,
        detail,
    }
}

/// Out of service: from the node's first drain to its last successful return, or to `end`.
fn out_of_service(bars: &[Bar], end: i64) -> (Option<i64>, bool) {
    let Some(out) = bars.iter().find(|b| b.step == Step::Drain.as_str()) else {
        return (None, false);
    };
    let back = bars
        .iter()
        .rev()
        .find(|b| {
            b.step == Step::Enable.as_str() && b.outcome == "ok" && b.start_ms >= out.start_ms
        })
        .and_then(|b| b.end_ms);
    match back {
        Some(b) => (Some(b - out.start_ms), true),
        None => (Some(end - out.start_ms), false),
    }
}

/// The reason a pick was made, as the driver journals it with the node's "node" step.
fn pick_reason(detail: &str) -> String {
    match detail.split_once("; picked ") {
        Some((_, why)) => why.to_string(),
        None => "(no reason journaled: a run of an older bbupgrade)".into(),
    }
}

/// The failed steps, at their time since the run's start.
fn failures(steps: &[StepRecord], t0: i64) -> Vec<Failure> {
    steps
        .iter()
        .filter_map(|s| match &s.outcome {
            Some(StepOutcome::Failed(e)) => Some(Failure {
                node: s.node.clone(),
                step: s.step.clone(),
                at_ms: s.ended_ms.unwrap_or(s.started_ms) - t0,
                error: e.clone(),
            }),
            _ => None,
        })
        .collect()
}

/// What the note-worthy steps said (their end detail, else their detail).
fn notes(steps: &[StepRecord]) -> Vec<String> {
    steps
        .iter()
        .filter(|s| NOTE_STEPS.iter().any(|n| n.as_str() == s.step))
        .map(|s| {
            let text = s
                .end_detail
                .clone()
                .filter(|d| !d.is_empty())
                .unwrap_or(s.detail.clone());
            format!(
                "{} {}: {text}",
                s.node.as_deref().unwrap_or("cluster"),
                s.step
            )
        })
        .collect()
}

impl RunPage {
    pub fn build(run: &RunRecord, steps: &[StepRecord]) -> Self {
        let t0 = run.started_ms;
        let last = steps
            .iter()
            .map(|s| s.ended_ms.unwrap_or(s.started_ms))
            .max()
            .unwrap_or(t0);
        let end = run.ended_ms.unwrap_or(last).max(last);
        let mut nodes: Vec<NodeLane> = Vec::new();
        let mut order = Vec::new();
        let mut cluster_bars = Vec::new();
        for s in steps {
            let Some(node) = &s.node else {
                cluster_bars.push(bar(s, t0));
                continue;
            };
            if s.step == Step::Node.as_str() {
                order.push(Pick {
                    node: node.clone(),
                    why: pick_reason(&s.detail),
                });
                continue;
            }
            match nodes.iter_mut().find(|l| &l.node == node) {
                Some(l) => l.bars.push(bar(s, t0)),
                None => nodes.push(NodeLane {
                    node: node.clone(),
                    bars: vec![bar(s, t0)],
                    out_of_service_ms: None,
                    returned: false,
                }),
            }
        }
        for lane in &mut nodes {
            (lane.out_of_service_ms, lane.returned) = out_of_service(&lane.bars, end - t0);
        }
        let failures = failures(steps, t0);
        let mut notes = notes(steps);
        if run.result.is_none() {
            notes.push(
                "the run is open: still running, or its coordinator stopped (`bbupgrade resume`)"
                    .into(),
            );
        }
        Self {
            cluster: run.cluster.clone(),
            run: run.id.0,
            kind: run.kind.as_str(),
            from: run.from_version.clone(),
            to: run.to_version.clone(),
            result: run.result.map_or("running", |r| r.as_str()),
            error: run.error.clone(),
            actor: run.actor.clone(),
            started_ms: t0,
            started: crate::journal::format_ms(t0),
            duration_ms: end - t0,
            cluster_bars,
            nodes,
            order,
            failures,
            notes,
        }
    }
}

/// One cluster of a fleet run on the fleet's time axis.
#[derive(Debug, Clone, Serialize)]
pub struct ClusterLane {
    pub cluster: String,
    pub wave: usize,
    pub canary: bool,
    pub state: String,
    pub reason: Option<String>,
    pub cluster_run_id: Option<i64>,
    pub start_ms: Option<i64>,
    pub end_ms: Option<i64>,
}

/// A fleet run, ready to render.
#[derive(Debug, Clone, Serialize)]
pub struct FleetPage {
    pub fleet_run: i64,
    pub to: String,
    pub result: &'static str,
    pub error: Option<String>,
    pub actor: String,
    pub started_ms: i64,
    pub started: String,
    pub duration_ms: i64,
    pub clusters: Vec<ClusterLane>,
}

impl FleetPage {
    /// `waves` gives each cluster's wave number and whether it is a canary.
    pub fn build(
        run: &FleetRunRecord,
        clusters: &[FleetClusterRecord],
        waves: &[crate::fleet::plan::Wave],
    ) -> Self {
        let t0 = run.started_ms;
        let last = clusters
            .iter()
            .filter_map(|c| c.ended_ms.or(c.started_ms))
            .max()
            .unwrap_or(t0);
        let end = run.ended_ms.unwrap_or(last).max(last);
        let wave_of = |name: &str| {
            waves
                .iter()
                .find(|w| w.clusters.iter().any(|c| c == name))
                .map_or((0, false), |w| (w.number, w.canary))
        };
        let mut lanes: Vec<ClusterLane> = clusters
            .iter()
            .map(|c| {
                let (wave, canary) = wave_of(&c.cluster);
                ClusterLane {
                    cluster: c.cluster.clone(),
                    wave,
                    canary,
                    state: c.state.as_str().to_string(),
                    reason: c.reason.clone(),
                    cluster_run_id: c.cluster_run_id,
                    start_ms: c.started_ms.map(|s| s - t0),
                    end_ms: c.ended_ms.map(|e| e - t0),
                }
            })
            .collect();
        lanes.sort_by_key(|l| (l.wave, l.start_ms.unwrap_or(i64::MAX)));
        Self {
            fleet_run: run.id.0,
            to: run.to_version.clone(),
            result: run.result.map_or("running", |r| r.as_str()),
            error: run.error.clone(),
            actor: run.actor.clone(),
            started_ms: t0,
            started: crate::journal::format_ms(t0),
            duration_ms: end - t0,
            clusters: lanes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::{RunId, RunKind, RunResult, StepId};

    fn step(
        id: i64,
        node: Option<&str>,
        step: &str,
        start: i64,
        end: Option<i64>,
        ok: bool,
    ) -> StepRecord {
        StepRecord {
            id: StepId(id),
            run: RunId(1),
            node: node.map(String::from),
            step: step.into(),
            started_ms: 1_000 + start,
            ended_ms: end.map(|e| 1_000 + e),
            outcome: end.map(|_| {
                if ok {
                    StepOutcome::Ok
                } else {
                    StepOutcome::Failed("boom".into())
                }
            }),
            detail: if step == "node" {
                "upgrade to 8.19.6; picked n2: least busy of 2".into()
            } else {
                String::new()
            },
            end_detail: None,
            actor: "me".into(),
        }
    }

    #[test]
    fn nodes_get_their_bars_out_of_service_time_order_and_failures() {
        let run = RunRecord {
            id: RunId(1),
            cluster: "c".into(),
            kind: RunKind::Upgrade,
            from_version: "8.19.3".into(),
            to_version: "8.19.6".into(),
            plan_json: "{}".into(),
            options_json: "{}".into(),
            actor: "me".into(),
            started_ms: 1_000,
            ended_ms: Some(1_900),
            result: Some(RunResult::Halted),
            error: Some("n1 failed".into()),
        };
        let steps = vec![
            step(1, None, "upgrade_mode", 0, Some(10), true),
            step(2, Some("n2"), "node", 10, Some(400), true),
            step(3, Some("n2"), "drain", 20, Some(50), true),
            step(4, Some("n2"), "stop", 50, Some(100), true),
            step(5, Some("n2"), "enable", 300, Some(320), true),
            step(6, Some("n1"), "node", 400, Some(800), false),
            step(7, Some("n1"), "drain", 410, Some(420), true),
            step(8, Some("n1"), "start", 500, Some(800), false),
        ];
        let page = RunPage::build(&run, &steps);
        assert_eq!(page.cluster_bars.len(), 1);
        let names: Vec<&str> = page.nodes.iter().map(|n| n.node.as_str()).collect();
        assert_eq!(names, ["n2", "n1"]);
        assert_eq!(page.nodes[0].bars.len(), 3);
        assert_eq!(
            (page.nodes[0].out_of_service_ms, page.nodes[0].returned),
            (Some(300), true)
        );
        assert_eq!(
            (page.nodes[1].out_of_service_ms, page.nodes[1].returned),
            (Some(490), false)
        );
        assert_eq!(page.order[0].why, "n2: least busy of 2");
        assert_eq!(page.failures.len(), 2);
        assert_eq!(page.result, "halted");
        assert_eq!(page.duration_ms, 900);
    }
}
