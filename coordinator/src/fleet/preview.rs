//! `bbupgrade fleet plan`: what `bbupgrade fleet` with the same options would do, changing
//! nothing — each selected cluster's line, from -> to, wave and maintenance window (open now, or
//! when it next opens), and why a cluster would be skipped. The agents are asked which version
//! each cluster runs; no journal is written.

use super::cluster::{Choice, choose, window_refusal};
use super::journal::ClusterState;
use super::targets::Resolution;
use super::{FleetOptions, FleetRunArgs, plan, prepare};
use crate::catalog::Line;
use crate::error::BadInput;
use crate::inventory::{Cluster, Inventory};
use crate::journal::Journal;
use crate::procedure::Ctx;
use crate::report::Output;
use crate::report::Reporter;
use crate::window::{in_window, next_opening};
use anyhow::Result;
use futures::StreamExt;
use serde::Serialize;
use std::process::ExitCode;
use std::sync::Arc;

/// Clusters asked for their version at once.
const OBSERVE_CONCURRENCY: usize = 8;

/// What the run would do with one cluster.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct PlannedCluster {
    pub cluster: String,
    pub wave: usize,
    pub canary: bool,
    /// `major.minor` of the version it runs.
    pub line: Option<String>,
    pub from: Option<String>,
    pub to: Option<String>,
    /// "upgrade" | "up_to_date" | "skip" | "fail".
    pub action: &'static str,
    pub reason: Option<String>,
    pub window: Option<String>,
    /// Whether its window is open now (`true` without a window).
    pub window_open: bool,
    /// When a closed window opens next (RFC 3339, UTC).
    pub next_opening: Option<String>,
}

/// The fleet plan (stable field names).
#[derive(Debug, Clone, Serialize)]
pub struct FleetPlan {
    pub to: String,
    pub concurrency: String,
    pub canary: Vec<String>,
    pub clusters: Vec<PlannedCluster>,
    /// Inventory clusters left out by `--clusters` / `--label`.
    pub not_selected: Vec<String>,
}

pub async fn command(args: FleetRunArgs) -> Result<ExitCode> {
    if args.resume || args.retry_failed {
        return Err(
            BadInput("`fleet plan` plans a new run; drop --resume/--retry-failed".into()).into(),
        );
    }
    let (inv, selected, opts) = prepare(&args).await?;
    let plan = make(&inv, &selected, &opts).await?;
    match args.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&plan)?),
        Output::Human => print!("{}", render_human(&plan)),
    }
    Ok(ExitCode::SUCCESS)
}

/// Asks every selected cluster which version it runs and lays out the run.
pub async fn make(inv: &Inventory, selected: &[String], opts: &FleetOptions) -> Result<FleetPlan> {
    let tls = inv
        .tls
        .load()
        .map_err(|e| BadInput(format!("coordinator TLS files: {e:#}")))?;
    // Ctx wants a journal; an in-memory one keeps `plan` from creating or touching the real one.
    let journal = Arc::new(Journal::open_in_memory()?);
    let ordered = plan::order(selected, &opts.canary);
    let limit = opts.concurrency.limit(ordered.len()).max(1);
    let waves = plan::waves(&ordered, &opts.canary, limit);
    let targets = opts.line_targets();
    let now = jiff::Timestamp::now();
    let jobs = waves.iter().flat_map(|w| {
        w.clusters
            .iter()
            .map(move |name| (w.number, w.canary, name.clone()))
    });
    let clusters = futures::stream::iter(jobs)
        .map(|(wave, canary, name)| {
            let (tls, journal, targets) = (tls.clone(), journal.clone(), targets.clone());
            async move {
                let cluster = inv.cluster(&name)?.clone();
                let ctx = Ctx::new(cluster.clone(), tls, journal, Reporter::silent())?;
                let choice = choose(&ctx, &targets).await;
                let version = |i: usize| targets[i].version.clone();
                anyhow::Ok(lay_out(&cluster, wave, canary, &choice, version, now))
            }
        })
        .buffered(OBSERVE_CONCURRENCY)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<Vec<_>>>()?;
    Ok(FleetPlan {
        to: opts.to.clone(),
        concurrency: opts.concurrency.to_string(),
        canary: opts.canary.clone(),
        clusters,
        not_selected: inv
            .clusters
            .iter()
            .map(|c| c.name.clone())
            .filter(|n| !selected.contains(n))
            .collect(),
    })
}

/// One cluster's line of the plan, from its version and window (pure).
pub fn lay_out(
    cluster: &Cluster,
    wave: usize,
    canary: bool,
    choice: &Choice,
    version_of: impl Fn(usize) -> String,
    now: jiff::Timestamp,
) -> PlannedCluster {
    let window_open = cluster.window.as_ref().is_none_or(|w| in_window(w, now));
    let next = cluster.window.as_ref().and_then(|w| next_opening(w, now));
    let from = choice.from.clone();
    let line = from
        .as_deref()
        .and_then(|f| f.parse().ok())
        .map(|v| Line::of(v).to_string());
    let (action, to, reason) = match &choice.resolution {
        Err(e) => (
            "fail",
            None,
            Some(format!("preflight would refuse it: {e}")),
        ),
        Ok(Resolution::Upgrade(i)) => {
            let closed = window_refusal(cluster, ClusterState::Pending, now);
            let action = if closed.is_some() { "skip" } else { "upgrade" };
            (action, Some(version_of(*i)), closed)
        }
        Ok(r @ Resolution::UpToDate(_)) => (
            "up_to_date",
            from.clone(),
            r.reason(from.as_deref().unwrap_or("?")),
        ),
        Ok(r) => ("skip", None, r.reason(from.as_deref().unwrap_or("?"))),
    };
    PlannedCluster {
        cluster: cluster.name.clone(),
        wave,
        canary,
        line,
        from,
        to,
        action,
        reason,
        window: cluster.window.as_ref().map(|w| w.to_string()),
        window_open,
        next_opening: next.map(|t| t.to_string()),
    }
}

pub fn render_human(p: &FleetPlan) -> String {
    let mut out = format!(
        "fleet plan to {} (concurrency {}, canary [{}]); nothing was changed\n",
        p.to,
        p.concurrency,
        p.canary.join(", ")
    );
    out.push_str(&format!(
        "{:<5} {:<20} {:<6} {:<22} {:<11} WINDOW / WHY\n",
        "WAVE", "CLUSTER", "LINE", "FROM -> TO", "ACTION"
    ));
    for c in &p.clusters {
        let window = match (&c.window, c.window_open, &c.next_opening) {
            (None, _, _) => "no window".to_string(),
            (Some(w), true, _) => format!("\"{w}\" open now"),
            (Some(w), false, Some(n)) => format!("\"{w}\" opens {n}"),
            (Some(w), false, None) => format!("\"{w}\" closed"),
        };
        out.push_str(&format!(
            "{:<5} {:<20} {:<6} {:<22} {:<11} {}{}\n",
            format!("{}{}", c.wave, if c.canary { "c" } else { "" }),
            c.cluster,
            c.line.as_deref().unwrap_or("?"),
            format!(
                "{} -> {}",
                c.from.as_deref().unwrap_or("?"),
                c.to.as_deref().unwrap_or("-")
            ),
            c.action,
            window,
            c.reason
                .as_deref()
                .map(|r| format!("; {r}"))
                .unwrap_or_default()
        ));
    }
    if !p.not_selected.is_empty() {
        out.push_str(&format!(
            "not selected (--clusters/--label): {}\n",
            p.not_selected.join(", ")
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::cluster::tests::cluster;

    fn choice(from: &str, r: Resolution) -> Choice {
        Choice {
            from: Some(from.into()),
            resolution: Ok(r),
        }
    }

    #[test]
    fn each_cluster_says_what_would_happen_and_why() {
        let tuesday: jiff::Timestamp = "2024-06-04T12:00:00Z".parse().unwrap();
        let v = |_: usize| "8.19.6".to_string();
        let up = lay_out(
            &cluster(None),
            1,
            true,
            &choice("8.19.3", Resolution::Upgrade(0)),
            v,
            tuesday,
        );
        assert_eq!(
            (up.action, up.to.as_deref(), up.line.as_deref()),
            ("upgrade", Some("8.19.6"), Some("8.19"))
        );
        assert!(up.window_open && up.canary);
        let weekend = cluster(Some("Sat-Sun 01:00-05:00 UTC"));
        let later = lay_out(
            &weekend,
            2,
            false,
            &choice("8.19.3", Resolution::Upgrade(0)),
            v,
            tuesday,
        );
        assert_eq!(later.action, "skip");
        assert!(
            later
                .reason
                .unwrap()
                .contains("outside its maintenance window")
        );
        assert_eq!(later.next_opening.as_deref(), Some("2024-06-08T01:00:00Z"));
        let none = lay_out(
            &cluster(None),
            2,
            false,
            &choice("9.2.1", Resolution::NoTarget("9.2".into())),
            v,
            tuesday,
        );
        assert_eq!(
            (none.action, none.reason.as_deref()),
            ("skip", Some("no target for 9.2"))
        );
        let top = lay_out(
            &cluster(None),
            2,
            false,
            &choice("8.19.6", Resolution::UpToDate("8.19.6".into())),
            v,
            tuesday,
        );
        assert_eq!(top.action, "up_to_date");
        let broken = Choice {
            from: None,
            resolution: Err("no node reported a version".into()),
        };
        let f = lay_out(&cluster(None), 3, false, &broken, v, tuesday);
        assert_eq!(f.action, "fail");
        assert!(
            render_human(&FleetPlan {
                to: "latest".into(),
                concurrency: "1".into(),
                canary: vec![],
                clusters: vec![up, f],
                not_selected: vec!["x".into()]
            })
            .contains("not selected")
        );
    }
}
