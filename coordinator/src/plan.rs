//! Deciding, without I/O: preflight checks over what was observed, the least-busy order, and which
//! node is done. The driver in `run` observes and carries these decisions out.

use crate::node_match::{self, Match, NodeKey};
use crate::zdu::{ClusterState, ClusterView, NodeState, ZduNode};
use bbupgrade_common::version::{Version, VersionError, check_rolling_upgrade};
use serde::Serialize;

/// What the coordinator saw of one node before deciding.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ObservedNode {
    pub id: String,
    /// How the node is recognised in Bitbucket's cluster view.
    pub bitbucket: NodeKey,
    /// `None` when the agent could not be reached (with the reason).
    pub agent_error: Option<String>,
    pub active_version: Option<String>,
    pub staged_versions: Vec<String>,
    pub install_root_free_bytes: u64,
    pub cpu_percent: f32,
    pub lb_error: Option<String>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Check {
    pub name: String,
    pub ok: bool,
    pub detail: String,
}

impl Check {
    pub fn new(name: &str, ok: bool, detail: impl Into<String>) -> Self {
        Self {
            name: name.to_string(),
            ok,
            detail: detail.into(),
        }
    }
}

/// Name of the preflight check that every node maps to exactly one row of the cluster view.
pub const CHECK_MAPPED: &str = "node in cluster view";
/// Name of the preflight check on the rolling-upgrade API's answer.
pub const CHECK_API: &str = "rolling-upgrade API";

/// Why the target version is refused, checked before anything else.
pub fn check_target(from: &str, to: &str) -> Result<(Version, Version), VersionError> {
    let from: Version = from.parse()?;
    let to: Version = to.parse()?;
    check_rolling_upgrade(from, to)?;
    Ok((from, to))
}

/// The version every node runs, or why there is none.
pub fn common_version(nodes: &[ObservedNode]) -> Result<String, String> {
    let mut versions: Vec<&str> = nodes
        .iter()
        .filter_map(|n| n.active_version.as_deref())
        .collect();
    versions.sort();
    versions.dedup();
    match versions.as_slice() {
        [one] => Ok(one.to_string()),
        [] => Err("no node reported a version".into()),
        many => Err(format!(
            "nodes run different versions ({}); a rolling upgrade starts from one version",
            many.join(", ")
        )),
    }
}

/// Preflight of a fresh upgrade: every check with its verdict.
pub fn preflight(
    nodes: &[ObservedNode],
    view: Option<&ClusterView>,
    zdu_error: Option<&str>,
    to: &str,
    archive_bytes: u64,
) -> Vec<Check> {
    let mut checks: Vec<Check> = nodes
        .iter()
        .map(|n| match &n.agent_error {
            None => Check::new(
                "agent",
                true,
                format!("{}: reachable, identity verified", n.id),
            ),
            Some(e) => Check::new("agent", false, e.clone()),
        })
        .collect();
    let from = common_version(nodes);
    checks.push(match &from {
        Ok(v) => Check::new("one version", true, format!("all nodes run {v}")),
        Err(e) => Check::new("one version", false, e.clone()),
    });
    if let Ok(from) = &from {
        checks.push(match check_target(from, to) {
            Ok(_) => Check::new(
                "target",
                true,
                format!("{from} -> {to} is a bug-fix upgrade"),
            ),
            Err(e) => Check::new("target", false, e.to_string()),
        });
    }
    checks.extend(disk_checks(nodes, to, archive_bytes));
    match (view, zdu_error) {
        (Some(view), _) => checks.extend(bitbucket_checks(nodes, view)),
        (None, e) => checks.push(Check::new(
            CHECK_API,
            false,
            e.unwrap_or("not reachable").to_string(),
        )),
    }
    for n in nodes {
        if let Some(e) = &n.lb_error {
            checks.push(Check::new("load balancer", false, format!("{}: {e}", n.id)));
        }
    }
    checks
}

/// Room to stage on every reachable node (none needed where the target is staged already).
fn disk_checks(nodes: &[ObservedNode], to: &str, archive_bytes: u64) -> Vec<Check> {
    // Staging needs room for the archive's content; the extracted size is about the archive's.
    let needed = archive_bytes.saturating_mul(2);
    nodes
        .iter()
        .filter(|n| n.agent_error.is_none())
        .map(|n| {
            let staged = n.staged_versions.iter().any(|v| v == to);
            let ok = staged || archive_bytes == 0 || n.install_root_free_bytes >= needed;
            Check::new(
                "disk",
                ok,
                if staged {
                    format!("{}: {to} already staged", n.id)
                } else {
                    format!(
                        "{}: {} MiB free at the install root, {} MiB needed",
                        n.id,
                        n.install_root_free_bytes >> 20,
                        needed >> 20
                    )
                },
            )
        })
        .collect()
}

/// What Bitbucket's rolling-upgrade API says: reachable, the cluster stable, every node mapped
/// to its row and ACTIVE.
fn bitbucket_checks(nodes: &[ObservedNode], view: &ClusterView) -> Vec<Check> {
    let mut checks = vec![Check::new(
        CHECK_API,
        true,
        "reachable with the credentials",
    )];
    let stable = view.state == ClusterState::Stable && !view.upgrade_mode_enabled;
    checks.push(Check::new(
        "cluster stable",
        stable,
        format!(
            "cluster is {}{}",
            view.state,
            if view.upgrade_mode_enabled {
                " with upgrade mode on"
            } else {
                ""
            }
        ),
    ));
    let keys: Vec<NodeKey> = nodes.iter().map(|n| n.bitbucket.clone()).collect();
    for (n, m) in nodes.iter().zip(node_match::match_all(view, &keys)) {
        checks.push(match m {
            Match::Row(z) if z.state == NodeState::Active => Check::new(
                "node active",
                true,
                format!(
                    "{}: ACTIVE on {} (row {})",
                    n.id,
                    z.version_or_dash(),
                    node_match::describe_row(z)
                ),
            ),
            Match::Row(z) => Check::new(
                "node active",
                false,
                format!(
                    "{}: {} (must be ACTIVE; row {})",
                    n.id,
                    z.state,
                    node_match::describe_row(z)
                ),
            ),
            Match::Missing(why) | Match::Ambiguous(why) => {
                Check::new(CHECK_MAPPED, false, format!("{}: {why}", n.id))
            }
        });
    }
    checks
}

/// Busyness used for the least-busy order.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Busyness {
    pub id: String,
    pub tasks_total: u64,
    pub active_user_count: u64,
    pub cpu_percent: f32,
}

/// Least busy first: fewest tasks, then fewest active users, then lowest agent CPU, then id.
pub fn rank_least_busy(mut nodes: Vec<Busyness>) -> Vec<Busyness> {
    nodes.sort_by(|a, b| {
        (a.tasks_total, a.active_user_count)
            .cmp(&(b.tasks_total, b.active_user_count))
            .then(a.cpu_percent.total_cmp(&b.cpu_percent))
            .then(a.id.cmp(&b.id))
    });
    nodes
}

/// A node counts as upgraded when its agent runs the target and Bitbucket shows it ACTIVE on it.
pub fn node_upgraded(agent_version: Option<&str>, zdu: Option<&ZduNode>, to: &str) -> bool {
    agent_version == Some(to) && zdu.is_some_and(|z| z.state == NodeState::Active && z.runs(to))
}

/// Why the run must stop waiting for a node that was started: FIRST_RUN and ERROR are failures.
pub fn start_failure(status: &str) -> Option<String> {
    match status {
        "ERROR" => Some("Bitbucket reports ERROR on /status".into()),
        "FIRST_RUN" => Some(
            "the node shows the setup wizard (FIRST_RUN): its BITBUCKET_HOME is wrong or empty"
                .into(),
        ),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn busy(id: &str, tasks: u64, users: u64, cpu: f32) -> Busyness {
        Busyness {
            id: id.into(),
            tasks_total: tasks,
            active_user_count: users,
            cpu_percent: cpu,
        }
    }

    #[test]
    fn least_busy_first() {
        let order: Vec<String> = rank_least_busy(vec![
            busy("a", 5, 0, 1.0),
            busy("b", 0, 9, 1.0),
            busy("c", 0, 2, 50.0),
            busy("d", 0, 2, 10.0),
        ])
        .into_iter()
        .map(|b| b.id)
        .collect();
        assert_eq!(order, ["d", "c", "b", "a"]);
    }

    fn node(id: &str, v: &str) -> ObservedNode {
        ObservedNode {
            id: id.into(),
            bitbucket: NodeKey {
                node: id.into(),
                name: Some(id.into()),
                address: Some("10.0.0.1".parse().unwrap()),
                address_error: None,
            },
            active_version: Some(v.into()),
            install_root_free_bytes: 10 << 30,
            ..Default::default()
        }
    }

    fn view(nodes: &[(&str, &str, &str)]) -> ClusterView {
        serde_json::from_value(serde_json::json!({
            "upgradeModeEnabled": false, "state": "STABLE", "originalVersion": "8.19.3",
            "nodes": nodes.iter().map(|(n, s, v)| serde_json::json!({
                "id": format!("id-{n}"), "name": n, "ipAddress": "10.0.0.1", "state": s, "version": v
            })).collect::<Vec<_>>()
        }))
        .unwrap()
    }

    #[test]
    fn preflight_passes_a_healthy_cluster_and_names_every_problem() {
        let nodes = vec![node("n1", "8.19.3"), node("n2", "8.19.3")];
        let v = view(&[("n1", "ACTIVE", "8.19.3"), ("n2", "ACTIVE", "8.19.3")]);
        assert!(
            preflight(&nodes, Some(&v), None, "8.19.6", 100 << 20)
                .iter()
                .all(|c| c.ok)
        );

        let failed = |checks: Vec<Check>| -> Vec<String> {
            checks
                .into_iter()
                .filter(|c| !c.ok)
                .map(|c| c.detail)
                .collect()
        };
        let f = failed(preflight(&nodes, Some(&v), None, "8.20.0", 0));
        assert!(f[0].contains("major or minor"), "{f:?}");
        let mut mixed = nodes.clone();
        mixed[1].active_version = Some("8.19.4".into());
        assert!(
            failed(preflight(&mixed, Some(&v), None, "8.19.6", 0))[0]
                .contains("different versions")
        );
        let mut down = nodes.clone();
        down[0].agent_error = Some("n1: unreachable".into());
        assert_eq!(
            failed(preflight(&down, Some(&v), None, "8.19.6", 0)),
            ["n1: unreachable"]
        );
        let v2 = view(&[("n1", "ACTIVE", "8.19.3"), ("n2", "OFFLINE", "8.19.3")]);
        assert!(failed(preflight(&nodes, Some(&v2), None, "8.19.6", 0))[0].contains("OFFLINE"));
        // n2's name is not in the view, so it falls back to the address, which is n1's row.
        let v3 = view(&[("n1", "ACTIVE", "8.19.3")]);
        let f = failed(preflight(&nodes, Some(&v3), None, "8.19.6", 0));
        assert!(
            f[1].starts_with("n2: nodes n1, n2 all map to the row id-n1"),
            "{f:?}"
        );
        let v4 = view(&[("n1", "ACTIVE", "8.19.3"), ("n1", "ACTIVE", "8.19.3")]);
        let f = failed(preflight(&nodes, Some(&v4), None, "8.19.6", 0));
        assert!(
            f[0].contains("bitbucket_name 'n1' fits 2 live rows"),
            "{f:?}"
        );
        let mut small = nodes.clone();
        small[0].install_root_free_bytes = 1 << 20;
        assert!(
            failed(preflight(&small, Some(&v), None, "8.19.6", 100 << 20))[0].contains("MiB free")
        );
        assert!(failed(preflight(&nodes, None, Some("401"), "8.19.6", 0))[0].contains("401"));
    }

    #[test]
    fn upgraded_needs_agent_and_bitbucket_to_agree() {
        let v = view(&[("n1", "ACTIVE", "8.19.6"), ("n2", "STARTING", "8.19.6")]);
        let (n1, n2) = (Some(&v.nodes[0]), Some(&v.nodes[1]));
        assert!(node_upgraded(Some("8.19.6"), n1, "8.19.6"));
        assert!(!node_upgraded(Some("8.19.3"), n1, "8.19.6"));
        assert!(!node_upgraded(Some("8.19.6"), n2, "8.19.6"));
        assert!(!node_upgraded(Some("8.19.6"), None, "8.19.6"));
        assert!(
            start_failure("FIRST_RUN")
                .unwrap()
                .contains("BITBUCKET_HOME")
        );
        assert!(start_failure("RUNNING").is_none());
    }
}
