//! What `status` concludes: each node as its load balancer sees it, the run in progress, and the
//! problems that make `status` exit 1 (a node unreachable, out of service, or not ACTIVE).

use super::{BitbucketView, NodeStatus, RunView, StepView};
use crate::inventory::Cluster;
use crate::loadbalancer::{self, AdminState, OperState};
use bbupgrade_common::tls::TlsMaterial;
use serde::Serialize;
use std::time::Duration;

/// A node as the load balancer reports it (`load_balancer` of `status --output json`).
#[derive(Debug, Serialize, Default, Clone, PartialEq)]
pub struct LbView {
    /// ready | drain | maint
    pub admin: Option<String>,
    /// What its health checks say: up | down | starting | stopping | unknown.
    pub health: Option<String>,
    pub sessions: Option<u64>,
    /// Ready and not down: it gets traffic.
    pub in_service: bool,
    /// Why the state could not be read.
    pub error: Option<String>,
}

/// The cluster's open run (running, or its coordinator stopped) and the step it is in.
#[derive(Debug, Serialize, Clone)]
pub struct OpenRun {
    pub run: RunView,
    /// The latest step begun and not ended.
    pub step_in_progress: Option<StepView>,
}

/// Reads every node's state from the cluster's load balancer(s), through the same drivers an
/// upgrade uses; `timeout` bounds each read.
pub async fn load_balancer_views(
    cluster: &Cluster,
    tls: &TlsMaterial,
    timeout: Duration,
) -> Vec<LbView> {
    let lb = match loadbalancer::from_config_with_tls(&cluster.load_balancer, Some(tls)) {
        Ok(lb) => lb,
        Err(e) => {
            let view = LbView {
                error: Some(e.to_string()),
                ..LbView::default()
            };
            return vec![view; cluster.nodes.len()];
        }
    };
    let lb = &lb;
    futures::future::join_all(cluster.nodes.iter().map(|node| async move {
        match tokio::time::timeout(timeout, lb.server_state(&node.lb_server)).await {
            Ok(Ok(s)) => LbView {
                admin: Some(s.admin.to_string()),
                health: Some(s.operational.to_string()),
                sessions: Some(s.current_sessions),
                in_service: s.admin == AdminState::Ready && s.operational != OperState::Down,
                error: None,
            },
            Ok(Err(e)) => LbView {
                error: Some(e.to_string()),
                ..LbView::default()
            },
            Err(_) => LbView {
                error: Some(format!(
                    "{} did not answer within {timeout:?}",
                    lb.describe()
                )),
                ..LbView::default()
            },
        }
    }))
    .await
}

/// The open run with its step in progress, from the run's steps as the journal holds them.
pub fn open_run(run: RunView, steps: &[crate::journal::StepRecord]) -> OpenRun {
    let step_in_progress = steps
        .iter()
        .rev()
        .find(|s| s.outcome.is_none())
        .map(super::step_view);
    OpenRun {
        run,
        step_in_progress,
    }
}

/// Why the cluster is not all well: one line per node problem (empty: exit 0).
pub fn problems(nodes: &[NodeStatus], bitbucket: &BitbucketView) -> Vec<String> {
    let mut out = Vec::new();
    for n in nodes {
        if !n.reachable {
            out.push(format!("{}: its agent is unreachable", n.id));
        }
        match (&n.load_balancer.error, n.load_balancer.in_service) {
            (Some(e), _) => out.push(format!(
                "{}: the load balancer's view could not be read: {e}",
                n.id
            )),
            (None, false) => out.push(format!(
                "{}: out of service in the load balancer ({}, health {})",
                n.id,
                n.load_balancer.admin.as_deref().unwrap_or("?"),
                n.load_balancer.health.as_deref().unwrap_or("?")
            )),
            (None, true) => {}
        }
        if bitbucket.error.is_none() {
            match bitbucket
                .nodes
                .iter()
                .find(|r| r.node.as_deref() == Some(n.id.as_str()))
            {
                Some(row) if row.state.as_deref() == Some("ACTIVE") => {}
                Some(row) => out.push(format!(
                    "{}: Bitbucket says {}, not ACTIVE",
                    n.id,
                    row.state.as_deref().unwrap_or("nothing")
                )),
                None => out.push(format!(
                    "{}: not ACTIVE (no row in Bitbucket's cluster view)",
                    n.id
                )),
            }
        }
    }
    if let Some(e) = &bitbucket.error {
        out.push(format!(
            "Bitbucket's cluster view could not be read, so no node is known to be ACTIVE: {e}"
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::BitbucketRow;

    fn node(id: &str, reachable: bool, in_service: bool) -> NodeStatus {
        NodeStatus {
            id: id.into(),
            reachable,
            load_balancer: LbView {
                admin: Some(if in_service { "ready" } else { "maint" }.into()),
                health: Some("up".into()),
                in_service,
                ..LbView::default()
            },
            ..NodeStatus::default()
        }
    }

    fn row(node: &str, state: &str) -> BitbucketRow {
        BitbucketRow {
            node: Some(node.into()),
            id: None,
            name: None,
            address: None,
            state: Some(state.into()),
            version: None,
            tasks: None,
            users: None,
            why: None,
        }
    }

    #[test]
    fn unreachable_out_of_service_or_not_active_nodes_are_problems() {
        let view = BitbucketView {
            nodes: vec![
                row("n1", "ACTIVE"),
                row("n2", "ACTIVE"),
                row("n3", "STARTING"),
            ],
            ..BitbucketView::default()
        };
        let all_well = [node("n1", true, true), node("n2", true, true)];
        assert!(problems(&all_well, &view).is_empty());
        let p = problems(
            &[
                node("n1", false, true),
                node("n2", true, false),
                node("n3", true, true),
            ],
            &view,
        );
        assert_eq!(p.len(), 3, "{p:?}");
        assert!(p[0].contains("n1: its agent is unreachable"), "{p:?}");
        assert!(
            p[1].contains("n2: out of service in the load balancer (maint"),
            "{p:?}"
        );
        assert!(p[2].contains("n3: Bitbucket says STARTING"), "{p:?}");
        let unread = BitbucketView {
            error: Some("connection refused".into()),
            ..BitbucketView::default()
        };
        let p = problems(&all_well, &unread);
        assert!(p.len() == 1 && p[0].contains("connection refused"), "{p:?}");
    }
}
