//! Tallies of a load run and the report made from them: pure bookkeeping over plain data (how each
//! HTTP exchange ended), so the counting rules are tested without a network.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;

/// How many failure descriptions a report keeps (the first ones; later ones are only counted).
pub const MAX_FAILURES_LISTED: usize = 20;
/// Latency samples kept per kind; past this a reservoir keeps a uniform sample, so a long run stays
/// bounded in memory while its percentiles stay representative.
pub const LATENCY_SAMPLE_CAP: usize = 10_000;

/// Which part of the traffic an exchange belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A short page or REST request.
    Page,
    /// One of the two requests of a Git-over-HTTP clone (`info/refs`, `git-upload-pack`).
    Clone,
}

/// What the server said about itself in a response's head.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Served {
    pub status: u16,
    /// `X-Sim-Node`.
    pub node: Option<String>,
    /// `X-Sim-Version`.
    pub version: Option<String>,
}

/// How one HTTP exchange ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The whole response arrived (body read to its announced end).
    Complete(Served),
    /// No response head: connection refused or reset, timed out, or the request could not be built.
    NoResponse(String),
    /// The head arrived but the body was cut short (connection closed or reset, or timed out).
    Interrupted(Served, String),
}

impl Outcome {
    /// A request fails on any transport error, a cut-off body, or a server-side status (>= 500).
    pub fn is_failure(&self) -> bool {
        match self {
            Outcome::Complete(served) => served.status >= 500,
            Outcome::NoResponse(_) | Outcome::Interrupted(..) => true,
        }
    }

    /// A complete 2xx response: the step of a clone may go on.
    pub fn is_success(&self) -> bool {
        matches!(self, Outcome::Complete(s) if (200..300).contains(&s.status))
    }
}

/// How one Git-over-SSH session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SshOutcome {
    /// The whole pack arrived and the session closed cleanly.
    Complete { node: String, version: String },
    /// No pack: connection refused, closed or reset before the head, an `ERR` answer, a timeout.
    Refused(String),
    /// The pack started (from `node`) but was cut off or cut short.
    Cut { node: String, reason: String },
}

impl SshOutcome {
    pub fn is_complete(&self) -> bool {
        matches!(self, SshOutcome::Complete { .. })
    }
}

/// One Git-over-SSH session as the load generator saw it.
#[derive(Debug, Clone)]
pub struct SshSession {
    /// When it started, from the start of the run.
    pub at: Duration,
    /// The SSH front door, `HOST:PORT`.
    pub addr: String,
    pub repo: String,
    pub elapsed: Duration,
    pub outcome: SshOutcome,
}

/// One HTTP exchange as the load generator saw it.
#[derive(Debug, Clone)]
pub struct Exchange {
    /// When it started, from the start of the run.
    pub at: Duration,
    pub method: &'static str,
    pub url: String,
    pub kind: Kind,
    pub elapsed: Duration,
    pub outcome: Outcome,
}

/// p50, p90, p99 and max, in milliseconds, over `count` observations.
#[derive(Serialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct Percentiles {
    pub count: u64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub max: u64,
}

/// A bounded, uniform sample of millisecond values (reservoir sampling) with the exact count and max.
#[derive(Debug, Clone)]
pub struct Sample {
    seen: u64,
    max: u64,
    values: Vec<u64>,
    cap: usize,
    /// splitmix64 state: deterministic, so reports of equal runs compare equal.
    rng: u64,
}

impl Sample {
    pub fn with_cap(cap: usize) -> Sample {
        Sample {
            seen: 0,
            max: 0,
            values: Vec::new(),
            cap: cap.max(1),
            rng: 0x9E37_79B9_7F4A_7C15,
        }
    }

    pub fn add(&mut self, ms: u64) {
        self.seen += 1;
        self.max = self.max.max(ms);
        if self.values.len() < self.cap {
            self.values.push(ms);
            return;
        }
        let slot = self.next_random() % self.seen;
        if let Ok(slot) = usize::try_from(slot)
            && slot < self.cap
        {
            self.values[slot] = ms;
        }
    }

    fn next_random(&mut self) -> u64 {
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.values.len()
    }

    pub fn percentiles(&self) -> Percentiles {
        let mut sorted = self.values.clone();
        sorted.sort_unstable();
        // Nearest rank: the smallest value with at least p % of the sample at or below it.
        let rank = |p: usize| -> u64 {
            if sorted.is_empty() {
                return 0;
            }
            let i = (p * sorted.len()).div_ceil(100).clamp(1, sorted.len()) - 1;
            sorted[i]
        };
        Percentiles {
            count: self.seen,
            p50: rank(50),
            p90: rank(90),
            p99: rank(99),
            max: self.max,
        }
    }
}

/// What a load run reports (see the module docs of `load` for the counting rules).
#[derive(Serialize, Clone, Debug)]
pub struct LoadReport {
    /// HTTP requests sent (a clone is two: `info/refs` and `git-upload-pack`).
    pub total: u64,
    pub ok: u64,
    pub failed: u64,
    /// Statuses of the responses whose head arrived (including those whose body was then cut).
    pub by_status: BTreeMap<u16, u64>,
    /// Requests with no response: refused, reset, timed out; and short responses cut off.
    pub connection_errors: u64,
    /// Clone responses whose body ended before its announced end.
    pub interrupted_transfers: u64,
    /// Clones attempted (each one both requests).
    pub clones: u64,
    /// Clones that did not complete with 2xx on both requests.
    pub clones_failed: u64,
    /// Responses per `X-Sim-Node`.
    pub by_node: BTreeMap<String, u64>,
    /// Responses per `X-Sim-Version`.
    pub by_version: BTreeMap<String, u64>,
    /// Git-over-SSH sessions (clones) attempted; not in `total`.
    pub ssh_total: u64,
    /// SSH sessions refused, cut or timed out; not in `failed`.
    pub ssh_failed: u64,
    /// Complete SSH sessions per node (the `PACK` head names it).
    pub ssh_by_node: BTreeMap<String, u64>,
    /// Over the complete SSH sessions.
    pub ssh_ms: Percentiles,
    /// Over the complete short (page/REST) responses.
    pub latency_ms: Percentiles,
    /// Over the clones that completed.
    pub clone_ms: Percentiles,
    pub duration_ms: u64,
    /// The first failures: time offset, method, URL, status or error.
    pub failures: Vec<String>,
}

impl LoadReport {
    /// One line for logs and the demo.
    pub fn summary_line(&self) -> String {
        let statuses = join_counts(self.by_status.iter().map(|(k, v)| (k.to_string(), *v)));
        let nodes = join_counts(self.by_node.iter().map(|(k, v)| (k.clone(), *v)));
        let versions = join_counts(self.by_version.iter().map(|(k, v)| (k.clone(), *v)));
        let ssh_nodes = join_counts(self.ssh_by_node.iter().map(|(k, v)| (k.clone(), *v)));
        format!(
            "{} requests in {:.1} s: {} ok, {} failed (status {statuses}; {} connection errors, {} interrupted transfers); \
             {} clones ({} failed); {} ssh clones ({} failed); latency ms p50 {} p90 {} p99 {} max {}; clone ms p50 {} max {}; \
             ssh ms p50 {} max {}; nodes {nodes}; ssh nodes {ssh_nodes}; versions {versions}",
            self.total,
            self.duration_ms as f64 / 1000.0,
            self.ok,
            self.failed,
            self.connection_errors,
            self.interrupted_transfers,
            self.clones,
            self.clones_failed,
            self.ssh_total,
            self.ssh_failed,
            self.latency_ms.p50,
            self.latency_ms.p90,
            self.latency_ms.p99,
            self.latency_ms.max,
            self.clone_ms.p50,
            self.clone_ms.max,
            self.ssh_ms.p50,
            self.ssh_ms.max,
        )
    }
}

fn join_counts(items: impl Iterator<Item = (String, u64)>) -> String {
    let parts: Vec<String> = items.map(|(k, v)| format!("{k}={v}")).collect();
    if parts.is_empty() {
        "none".into()
    } else {
        parts.join(" ")
    }
}

/// The running tallies behind a report.
#[derive(Debug, Clone)]
pub struct Stats {
    total: u64,
    failed: u64,
    by_status: BTreeMap<u16, u64>,
    connection_errors: u64,
    interrupted_transfers: u64,
    clones: u64,
    clones_failed: u64,
    by_node: BTreeMap<String, u64>,
    by_version: BTreeMap<String, u64>,
    latency: Sample,
    clone_latency: Sample,
    ssh_total: u64,
    ssh_failed: u64,
    ssh_by_node: BTreeMap<String, u64>,
    ssh_latency: Sample,
    failures: Vec<String>,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            total: 0,
            failed: 0,
            by_status: BTreeMap::new(),
            connection_errors: 0,
            interrupted_transfers: 0,
            clones: 0,
            clones_failed: 0,
            by_node: BTreeMap::new(),
            by_version: BTreeMap::new(),
            latency: Sample::with_cap(LATENCY_SAMPLE_CAP),
            clone_latency: Sample::with_cap(LATENCY_SAMPLE_CAP),
            ssh_total: 0,
            ssh_failed: 0,
            ssh_by_node: BTreeMap::new(),
            ssh_latency: Sample::with_cap(LATENCY_SAMPLE_CAP),
            failures: Vec::new(),
        }
    }
}

impl Stats {
    /// Counts one HTTP exchange.
    pub fn record(&mut self, ex: &Exchange) {
        self.total += 1;
        let served = match &ex.outcome {
            Outcome::Complete(s) | Outcome::Interrupted(s, _) => Some(s),
            Outcome::NoResponse(_) => None,
        };
        if let Some(s) = served {
            *self.by_status.entry(s.status).or_default() += 1;
            if let Some(node) = &s.node {
                *self.by_node.entry(node.clone()).or_default() += 1;
            }
            if let Some(version) = &s.version {
                *self.by_version.entry(version.clone()).or_default() += 1;
            }
        }
        match (&ex.outcome, ex.kind) {
            (Outcome::NoResponse(_), _) | (Outcome::Interrupted(..), Kind::Page) => {
                self.connection_errors += 1;
            }
            (Outcome::Interrupted(..), Kind::Clone) => self.interrupted_transfers += 1,
            (Outcome::Complete(_), Kind::Page) => self.latency.add(millis(ex.elapsed)),
            (Outcome::Complete(_), Kind::Clone) => {}
        }
        if ex.outcome.is_failure() {
            self.failed += 1;
            self.note(describe(ex));
        }
    }

    /// Counts one clone (both its requests), `ok` when it completed.
    pub fn record_clone(&mut self, ok: bool, elapsed: Duration) {
        self.clones += 1;
        if ok {
            self.clone_latency.add(millis(elapsed));
        } else {
            self.clones_failed += 1;
        }
    }

    /// Counts one Git-over-SSH session.
    pub fn record_ssh(&mut self, session: &SshSession) {
        self.ssh_total += 1;
        let failure = match &session.outcome {
            SshOutcome::Complete { node, .. } => {
                *self.ssh_by_node.entry(node.clone()).or_default() += 1;
                self.ssh_latency.add(millis(session.elapsed));
                return;
            }
            SshOutcome::Refused(e) => format!("no pack: {e}"),
            SshOutcome::Cut { node, reason } => {
                format!("pack from {node} cut off: {reason}")
            }
        };
        self.ssh_failed += 1;
        self.note(format!(
            "+{:.3}s ssh {} {} -> {failure}",
            session.at.as_secs_f64(),
            session.addr,
            session.repo
        ));
    }

    /// A failure of the run itself (not of a request), listed and counted as failed.
    pub fn record_run_error(&mut self, description: String) {
        self.failed += 1;
        self.note(description);
    }

    fn note(&mut self, description: String) {
        if self.failures.len() < MAX_FAILURES_LISTED {
            self.failures.push(description);
        }
    }

    pub fn report(&self, duration: Duration) -> LoadReport {
        LoadReport {
            total: self.total,
            ok: self.total.saturating_sub(self.failed),
            failed: self.failed,
            by_status: self.by_status.clone(),
            connection_errors: self.connection_errors,
            interrupted_transfers: self.interrupted_transfers,
            clones: self.clones,
            clones_failed: self.clones_failed,
            by_node: self.by_node.clone(),
            by_version: self.by_version.clone(),
            latency_ms: self.latency.percentiles(),
            clone_ms: self.clone_latency.percentiles(),
            ssh_total: self.ssh_total,
            ssh_failed: self.ssh_failed,
            ssh_by_node: self.ssh_by_node.clone(),
            ssh_ms: self.ssh_latency.percentiles(),
            duration_ms: millis(duration),
            failures: self.failures.clone(),
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// `+1.234s GET http://... -> 503 from node2` and the like.
pub fn describe(ex: &Exchange) -> String {
    let from = |s: &Served| {
        s.node
            .as_deref()
            .map(|n| format!(" from {n}"))
            .unwrap_or_default()
    };
    let what = match &ex.outcome {
        Outcome::Complete(s) => format!("{}{}", s.status, from(s)),
        Outcome::NoResponse(e) => format!("no response: {e}"),
        Outcome::Interrupted(s, e) => {
            format!("{}{} but the body was cut off: {e}", s.status, from(s))
        }
    };
    format!(
        "+{:.3}s {} {} -> {what}",
        ex.at.as_secs_f64(),
        ex.method,
        ex.url
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn served(status: u16, node: &str) -> Served {
        Served {
            status,
            node: Some(node.into()),
            version: Some("8.19.3".into()),
        }
    }

    fn ex(kind: Kind, ms: u64, outcome: Outcome) -> Exchange {
        Exchange {
            at: Duration::from_millis(1500),
            method: "GET",
            url: "http://lb/".into(),
            kind,
            elapsed: Duration::from_millis(ms),
            outcome,
        }
    }

    #[test]
    fn failures_are_transport_errors_cut_bodies_and_server_statuses() {
        assert!(!Outcome::Complete(served(200, "n")).is_failure());
        assert!(!Outcome::Complete(served(404, "n")).is_failure());
        assert!(Outcome::Complete(served(500, "n")).is_failure());
        assert!(Outcome::Complete(served(503, "n")).is_failure());
        assert!(Outcome::NoResponse("refused".into()).is_failure());
        assert!(Outcome::Interrupted(served(200, "n"), "cut".into()).is_failure());
        assert!(Outcome::Complete(served(204, "n")).is_success());
        assert!(!Outcome::Complete(served(404, "n")).is_success());
        assert!(!Outcome::Interrupted(served(200, "n"), "cut".into()).is_success());
    }

    #[test]
    fn counts_by_kind_status_node_and_version() {
        let mut s = Stats::default();
        s.record(&ex(Kind::Page, 10, Outcome::Complete(served(200, "node1"))));
        s.record(&ex(Kind::Page, 20, Outcome::Complete(served(503, "node2"))));
        s.record(&ex(Kind::Page, 0, Outcome::NoResponse("refused".into())));
        s.record(&ex(
            Kind::Page,
            5,
            Outcome::Interrupted(served(200, "node1"), "reset".into()),
        ));
        s.record(&ex(
            Kind::Clone,
            900,
            Outcome::Interrupted(served(200, "node2"), "cut".into()),
        ));
        s.record(&ex(
            Kind::Clone,
            900,
            Outcome::Complete(served(200, "node1")),
        ));
        s.record_clone(false, Duration::from_millis(900));
        s.record_clone(true, Duration::from_millis(1800));
        let r = s.report(Duration::from_millis(2500));
        assert_eq!(r.total, 6);
        assert_eq!(r.failed, 4);
        assert_eq!(r.ok, 2);
        assert_eq!(r.by_status, BTreeMap::from([(200, 4), (503, 1)]));
        assert_eq!(r.connection_errors, 2);
        assert_eq!(r.interrupted_transfers, 1);
        assert_eq!(r.clones, 2);
        assert_eq!(r.clones_failed, 1);
        assert_eq!(
            r.by_node,
            BTreeMap::from([("node1".into(), 3), ("node2".into(), 2)])
        );
        assert_eq!(r.by_version, BTreeMap::from([("8.19.3".into(), 5)]));
        // Only complete short responses count in latency (the 503 was complete, so it does).
        assert_eq!(r.latency_ms.count, 2);
        assert_eq!(r.latency_ms.max, 20);
        assert_eq!(r.clone_ms.count, 1);
        assert_eq!(r.clone_ms.p50, 1800);
        assert_eq!(r.duration_ms, 2500);
        assert_eq!(r.failures.len(), 4);
        assert_eq!(r.failures[0], "+1.500s GET http://lb/ -> 503 from node2");
        assert_eq!(
            r.failures[1],
            "+1.500s GET http://lb/ -> no response: refused"
        );
        let line = r.summary_line();
        assert!(line.contains("6 requests"), "{line}");
        assert!(line.contains("status 200=4 503=1"), "{line}");
        assert!(line.contains("nodes node1=3 node2=2"), "{line}");
    }

    #[test]
    fn ssh_sessions_count_apart_from_http() {
        let mut s = Stats::default();
        let session = |ms: u64, outcome: SshOutcome| SshSession {
            at: Duration::from_millis(2000),
            addr: "lb:7999".into(),
            repo: "/prj/repo1.git".into(),
            elapsed: Duration::from_millis(ms),
            outcome,
        };
        s.record_ssh(&session(
            700,
            SshOutcome::Complete {
                node: "node1".into(),
                version: "8.19.3".into(),
            },
        ));
        s.record_ssh(&session(
            5,
            SshOutcome::Refused("connecting: refused".into()),
        ));
        s.record_ssh(&session(
            300,
            SshOutcome::Cut {
                node: "node2".into(),
                reason: "pack ended after 10 of 20 bytes".into(),
            },
        ));
        let r = s.report(Duration::from_millis(3000));
        assert_eq!((r.total, r.failed), (0, 0));
        assert_eq!((r.ssh_total, r.ssh_failed), (3, 2));
        assert_eq!(r.ssh_by_node, BTreeMap::from([("node1".into(), 1)]));
        assert_eq!((r.ssh_ms.count, r.ssh_ms.max), (1, 700));
        assert_eq!(
            r.failures,
            [
                "+2.000s ssh lb:7999 /prj/repo1.git -> no pack: connecting: refused",
                "+2.000s ssh lb:7999 /prj/repo1.git -> pack from node2 cut off: pack ended after 10 of 20 bytes",
            ]
        );
        assert!(r.summary_line().contains("3 ssh clones (2 failed)"));
    }

    #[test]
    fn failures_listed_are_capped_but_all_counted() {
        let mut s = Stats::default();
        for _ in 0..(MAX_FAILURES_LISTED + 5) {
            s.record(&ex(Kind::Page, 0, Outcome::NoResponse("refused".into())));
        }
        s.record_run_error("misconfigured".into());
        let r = s.report(Duration::ZERO);
        assert_eq!(r.failed, MAX_FAILURES_LISTED as u64 + 6);
        assert_eq!(r.failures.len(), MAX_FAILURES_LISTED);
        assert_eq!(r.ok, 0);
    }

    #[test]
    fn percentiles_by_nearest_rank() {
        let mut s = Sample::with_cap(1000);
        assert_eq!(s.percentiles(), Percentiles::default());
        for ms in 1..=100 {
            s.add(ms);
        }
        assert_eq!(
            s.percentiles(),
            Percentiles {
                count: 100,
                p50: 50,
                p90: 90,
                p99: 99,
                max: 100
            }
        );
        let mut one = Sample::with_cap(10);
        one.add(7);
        let p = one.percentiles();
        assert_eq!((p.count, p.p50, p.p99, p.max), (1, 7, 7, 7));
    }

    #[test]
    fn sample_stays_bounded_and_representative() {
        let mut s = Sample::with_cap(1000);
        for i in 0..100_000u64 {
            s.add(i % 1000);
        }
        assert_eq!(s.len(), 1000);
        let p = s.percentiles();
        assert_eq!(p.count, 100_000);
        assert_eq!(p.max, 999);
        assert!((400..600).contains(&p.p50), "{p:?}");
        assert!((850..950).contains(&p.p90), "{p:?}");
    }
}
