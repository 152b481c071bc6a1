//! What a person or a pipeline sees of a fleet run: one event per cluster turn and wave (lines or
//! JSON lines), and the fleet's state — clusters by state, failures and skips with their reasons —
//! as a table or one JSON document (`fleet status`, and the end of `fleet`).

use super::journal::{ClusterState, FleetClusterRecord, FleetRunRecord};
use crate::report::Output;
use serde::Serialize;
use std::collections::BTreeMap;
use std::time::Instant;

/// A fleet run as journaled, with counts (stable field names).
#[derive(Debug, Clone, Serialize)]
pub struct FleetReport {
    pub fleet_run: i64,
    pub to: String,
    /// "upgraded" | "incomplete" | "halted", or "running" while open (or its coordinator died).
    pub result: String,
    pub actor: String,
    pub started_ms: i64,
    pub ended_ms: Option<i64>,
    pub duration_ms: u64,
    pub error: Option<String>,
    pub counts: BTreeMap<&'static str, usize>,
    pub clusters_total: usize,
    pub clusters_upgraded: usize,
    /// Already on their line's target (or above it): nothing to do.
    pub clusters_up_to_date: usize,
    pub clusters_failed: usize,
    pub clusters_skipped: usize,
    pub clusters_pending: usize,
    pub clusters_running: usize,
    pub clusters: Vec<ClusterLine>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ClusterLine {
    pub cluster: String,
    pub state: ClusterState,
    pub reason: Option<String>,
    pub cluster_run_id: Option<i64>,
    pub duration_ms: Option<u64>,
    /// The coordinator that drove it last (`user@host:pid`).
    pub claimed_by: Option<String>,
}

impl FleetReport {
    pub fn new(run: &FleetRunRecord, clusters: &[FleetClusterRecord]) -> Self {
        let count = |s: ClusterState| clusters.iter().filter(|c| c.state == s).count();
        let counts = ClusterState::ALL
            .into_iter()
            .map(|s| (s.as_str(), count(s)))
            .collect();
        let end = run.ended_ms.unwrap_or_else(crate::journal::now_ms);
        Self {
            fleet_run: run.id.0,
            to: run.to_version.clone(),
            result: run.result.map_or("running", |r| r.as_str()).to_string(),
            actor: run.actor.clone(),
            started_ms: run.started_ms,
            ended_ms: run.ended_ms,
            duration_ms: end.saturating_sub(run.started_ms).max(0) as u64,
            error: run.error.clone(),
            counts,
            clusters_total: clusters.len(),
            clusters_upgraded: count(ClusterState::Upgraded),
            clusters_up_to_date: count(ClusterState::UpToDate),
            clusters_failed: count(ClusterState::Failed),
            clusters_skipped: count(ClusterState::Skipped),
            clusters_pending: count(ClusterState::Pending),
            clusters_running: count(ClusterState::Running),
            clusters: clusters
                .iter()
                .map(|c| ClusterLine {
                    cluster: c.cluster.clone(),
                    state: c.state,
                    reason: c.reason.clone(),
                    cluster_run_id: c.cluster_run_id,
                    claimed_by: c.claimed_by.clone(),
                    duration_ms: match (c.started_ms, c.ended_ms) {
                        (Some(s), Some(e)) => Some(e.saturating_sub(s).max(0) as u64),
                        _ => None,
                    },
                })
                .collect(),
        }
    }
}

/// The table `fleet status` and a finished `fleet` print.
pub fn render_human(r: &FleetReport) -> String {
    let mut out = format!(
        "fleet run #{} to {}: {} after {:.1}s (by {})\n",
        r.fleet_run,
        r.to,
        r.result.to_uppercase(),
        r.duration_ms as f64 / 1000.0,
        r.actor
    );
    out.push_str(&format!("{:<10} {:>8}\n", "STATE", "CLUSTERS"));
    for s in ClusterState::ALL {
        out.push_str(&format!(
            "{:<10} {:>8}\n",
            s.as_str(),
            r.counts.get(s.as_str()).copied().unwrap_or(0)
        ));
    }
    out.push_str(&format!("{:<10} {:>8}\n", "total", r.clusters_total));
    for (state, title) in [
        (ClusterState::Failed, "FAILED"),
        (ClusterState::Skipped, "SKIPPED"),
        (ClusterState::UpToDate, "UP TO DATE"),
        (
            ClusterState::Running,
            "RUNNING (or interrupted: `bbupgrade fleet resume`)",
        ),
    ] {
        let lines: Vec<_> = r.clusters.iter().filter(|c| c.state == state).collect();
        if lines.is_empty() {
            continue;
        }
        out.push_str(&format!("{title}\n"));
        for c in lines {
            out.push_str(&format!(
                "  {:<20} {}\n",
                c.cluster,
                c.reason.as_deref().unwrap_or("")
            ));
        }
    }
    if let Some(e) = &r.error {
        out.push_str(&format!("halted: {e}\n"));
    }
    out
}

/// Prints fleet events as they happen.
#[derive(Clone)]
pub struct FleetReporter {
    output: Output,
    started: Instant,
}

#[derive(Serialize)]
struct Event<'a> {
    event: &'static str,
    t_ms: u64,
    wave: Option<usize>,
    cluster: Option<&'a str>,
    status: &'a str,
    detail: &'a str,
}

impl FleetReporter {
    pub fn new(output: Output) -> Self {
        Self {
            output,
            started: Instant::now(),
        }
    }

    /// `status` is wave | start | upgraded | failed | skipped | halted | soak | info | elsewhere.
    pub fn event(&self, wave: Option<usize>, cluster: Option<&str>, status: &str, detail: &str) {
        match self.output {
            Output::Json => {
                let e = Event {
                    event: "fleet",
                    t_ms: self.started.elapsed().as_millis() as u64,
                    wave,
                    cluster,
                    status,
                    detail,
                };
                if let Ok(line) = serde_json::to_string(&e) {
                    println!("{line}");
                }
            }
            Output::Human => eprintln!(
                "[{:>7.1}s] {:<8} {:<20} {:<9} {}",
                self.started.elapsed().as_secs_f64(),
                wave.map(|w| format!("wave {w}")).unwrap_or_default(),
                cluster.unwrap_or("fleet"),
                status,
                detail
            ),
        }
    }

    pub fn summary(&self, r: &FleetReport) {
        match self.output {
            Output::Json => {
                if let Ok(text) =
                    serde_json::to_string(&serde_json::json!({ "event": "summary", "summary": r }))
                {
                    println!("{text}");
                }
            }
            Output::Human => print!("{}", render_human(r)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::journal::{FleetResult, FleetRunId};

    #[test]
    fn report_counts_and_table() {
        let run = FleetRunRecord {
            id: FleetRunId(3),
            to_version: "8.19.6".into(),
            options_json: "{}".into(),
            actor: "me@h:1".into(),
            started_ms: 1_000,
            ended_ms: Some(6_000),
            result: Some(FleetResult::Halted),
            error: Some("2 cluster(s) failed".into()),
        };
        let rec = |name: &str, state, reason: Option<&str>| FleetClusterRecord {
            cluster: name.into(),
            state,
            reason: reason.map(String::from),
            cluster_run_id: None,
            started_ms: Some(1_000),
            ended_ms: Some(2_500),
            claimed_by: Some("me@h:1".into()),
        };
        let clusters = vec![
            rec("a", ClusterState::Upgraded, None),
            rec("b", ClusterState::Failed, Some("node 'n1' failed")),
            rec(
                "c",
                ClusterState::Skipped,
                Some("outside its maintenance window"),
            ),
            rec("d", ClusterState::Pending, None),
        ];
        let r = FleetReport::new(&run, &clusters);
        assert_eq!(
            (
                r.clusters_upgraded,
                r.clusters_failed,
                r.clusters_skipped,
                r.clusters_pending
            ),
            (1, 1, 1, 1)
        );
        assert_eq!(r.duration_ms, 5_000);
        assert_eq!(r.clusters[0].duration_ms, Some(1_500));
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["result"], "halted");
        assert_eq!(json["counts"]["failed"], 1);
        assert_eq!(json["clusters"][1]["state"], "failed");
        let text = render_human(&r);
        assert!(text.contains("HALTED"), "{text}");
        assert!(text.contains("FAILED\n  b"), "{text}");
        assert!(text.contains("outside its maintenance window"), "{text}");
        assert!(text.contains("halted: 2 cluster(s) failed"), "{text}");
    }
}
