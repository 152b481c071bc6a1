//! The rolling-upgrade ("zero-downtime upgrade") state machine of a Bitbucket Data Center cluster, as
//! pure functions over the cluster record kept in the shared home.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::version::Version;

/// A node's state as the rolling-upgrade API reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum NodeState {
    Starting,
    Active,
    Draining,
    Terminating,
    Offline,
    Error,
}

/// The cluster's state as the rolling-upgrade API reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ClusterState {
    Stable,
    ReadyToUpgrade,
    Mixed,
    ReadyToRunUpgradeTasks,
    RunningUpgradeTasks,
    UpgradeTasksFailed,
}

/// Upgrade tasks started by approving the upgrade.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum UpgradeTasks {
    #[default]
    NotStarted,
    Running {
        until_ms: u64,
        fail: bool,
    },
    Failed,
}

/// What the cluster knows of one node (kept in the shared home, written by the node itself).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub id: String,
    pub name: String,
    pub ip_address: String,
    pub port: u16,
    pub version: Version,
    pub state: NodeState,
    pub heartbeat_ms: u64,
    pub tasks_total: u64,
    pub active_user_count: u64,
    pub pid: u32,
    pub bundled_search: bool,
}

/// The cluster as a whole: its version, upgrade mode and members.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ClusterRecord {
    /// The version the cluster runs (the original version while upgrade mode is on).
    pub version: Option<Version>,
    pub upgrade_mode: bool,
    /// The bug-fix version nodes are being upgraded to, once the first one has joined.
    pub target: Option<Version>,
    pub tasks: UpgradeTasks,
    pub nodes: BTreeMap<String, NodeRecord>,
}

/// Why a rolling-upgrade request is refused (the API answers 409).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Conflict(pub String);

/// The outcome of a node asking to join the cluster at the end of its startup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JoinDecision {
    Active,
    Refused(String),
}

impl NodeState {
    /// Whether a node in this state is running (has not left the cluster).
    pub fn is_up(self) -> bool {
        !matches!(self, NodeState::Offline)
    }
}

impl ClusterRecord {
    /// Applies what time alone changes: stale heartbeats turn nodes `OFFLINE`, upgrade tasks end.
    pub fn settle(&mut self, now_ms: u64, stale_ms: u64) {
        for node in self.nodes.values_mut() {
            if node.state.is_up() && now_ms.saturating_sub(node.heartbeat_ms) > stale_ms {
                node.state = NodeState::Offline;
            }
        }
        if let UpgradeTasks::Running { until_ms, fail } = self.tasks
            && now_ms >= until_ms
        {
            if fail {
                self.tasks = UpgradeTasks::Failed;
            } else {
                if let Some(target) = self.target.take() {
                    self.version = Some(target);
                }
                self.upgrade_mode = false;
                self.tasks = UpgradeTasks::NotStarted;
            }
        }
    }

    /// Nodes that are up and run a version other than the cluster's.
    fn new_version_running(&self) -> bool {
        self.nodes.values().any(|n| {
            matches!(
                n.state,
                NodeState::Starting
                    | NodeState::Active
                    | NodeState::Draining
                    | NodeState::Terminating
            ) && Some(n.version) != self.version
        })
    }

    /// The cluster state the API reports.
    pub fn state(&self) -> ClusterState {
        match self.tasks {
            UpgradeTasks::Running { .. } => return ClusterState::RunningUpgradeTasks,
            UpgradeTasks::Failed => return ClusterState::UpgradeTasksFailed,
            UpgradeTasks::NotStarted => {}
        }
        if !self.upgrade_mode {
            return ClusterState::Stable;
        }
        if !self.new_version_running() {
            return ClusterState::ReadyToUpgrade;
        }
        let Some(target) = self.target else {
            return ClusterState::Mixed;
        };
        // A node that is down on the original version still has to be upgraded before the
        // upgrade tasks may run.
        let all_upgraded = self.nodes.values().all(|n| {
            if n.state.is_up() {
                n.state == NodeState::Active && n.version == target
            } else {
                Some(n.version) != self.version
            }
        });
        if all_upgraded {
            ClusterState::ReadyToRunUpgradeTasks
        } else {
            ClusterState::Mixed
        }
    }

    /// Decides whether a node of `version` may join, recording the upgrade target when it does.
    pub fn join(&mut self, version: Version) -> JoinDecision {
        let Some(cluster) = self.version else {
            self.version = Some(version);
            return JoinDecision::Active;
        };
        if version == cluster {
            return JoinDecision::Active;
        }
        if !version.is_bugfix_upgrade_of(&cluster) {
            return JoinDecision::Refused(format!(
                "Bitbucket {version} cannot join this cluster, which runs {cluster}: a rolling upgrade \
                 supports bug-fix versions only (same major.minor, higher patch)"
            ));
        }
        if !self.upgrade_mode {
            return JoinDecision::Refused(format!(
                "Bitbucket {version} cannot join this cluster, which runs {cluster}, because upgrade mode \
                 is not enabled"
            ));
        }
        if self.tasks != UpgradeTasks::NotStarted {
            return JoinDecision::Refused(format!(
                "Bitbucket {version} cannot join while the cluster runs its upgrade tasks"
            ));
        }
        match self.target {
            Some(target) if target != version => JoinDecision::Refused(format!(
                "Bitbucket {version} cannot join: the cluster is being upgraded to {target}"
            )),
            _ => {
                self.target = Some(version);
                JoinDecision::Active
            }
        }
    }

    /// `POST /rest/zdu/start`: upgrade mode on, only when stable with every running node active.
    pub fn start_upgrade(&mut self) -> Result<(), Conflict> {
        let state = self.state();
        if state != ClusterState::Stable {
            return Err(Conflict(format!(
                "upgrade mode can only be enabled when the cluster is STABLE, not {}",
                state.name()
            )));
        }
        if self
            .nodes
            .values()
            .any(|n| n.state.is_up() && n.state != NodeState::Active)
        {
            return Err(Conflict(
                "upgrade mode can only be enabled when every node is ACTIVE".into(),
            ));
        }
        if !self.nodes.values().any(|n| n.state == NodeState::Active) {
            return Err(Conflict("no node is ACTIVE".into()));
        }
        self.upgrade_mode = true;
        self.target = None;
        Ok(())
    }

    /// `POST /rest/zdu/cancel`: upgrade mode off, only while no node runs the new version.
    pub fn cancel_upgrade(&mut self) -> Result<(), Conflict> {
        if !self.upgrade_mode || self.tasks != UpgradeTasks::NotStarted {
            return Err(Conflict(format!(
                "there is no upgrade to cancel in state {}",
                self.state().name()
            )));
        }
        if self.new_version_running() {
            return Err(Conflict(
                "upgrade mode cannot be cancelled while a node runs the new version".into(),
            ));
        }
        self.upgrade_mode = false;
        self.target = None;
        Ok(())
    }

    /// `POST /rest/zdu/approve`: runs the upgrade tasks once every node is upgraded.
    pub fn approve(&mut self, now_ms: u64, tasks_ms: u64, fail: bool) -> Result<(), Conflict> {
        let state = self.state();
        if state != ClusterState::ReadyToRunUpgradeTasks {
            return Err(Conflict(format!(
                "the upgrade can only be approved in state READY_TO_RUN_UPGRADE_TASKS, not {}",
                state.name()
            )));
        }
        self.tasks = UpgradeTasks::Running {
            until_ms: now_ms + tasks_ms,
            fail,
        };
        Ok(())
    }

    /// `POST /rest/zdu/retryUpgrade`: runs the upgrade tasks again after they failed.
    pub fn retry(&mut self, now_ms: u64, tasks_ms: u64, fail: bool) -> Result<(), Conflict> {
        if self.tasks != UpgradeTasks::Failed {
            return Err(Conflict(format!(
                "upgrade tasks can only be retried in state UPGRADE_TASKS_FAILED, not {}",
                self.state().name()
            )));
        }
        self.tasks = UpgradeTasks::Running {
            until_ms: now_ms + tasks_ms,
            fail,
        };
        Ok(())
    }
}

impl ClusterState {
    /// The name the API uses.
    pub fn name(self) -> &'static str {
        match self {
            ClusterState::Stable => "STABLE",
            ClusterState::ReadyToUpgrade => "READY_TO_UPGRADE",
            ClusterState::Mixed => "MIXED",
            ClusterState::ReadyToRunUpgradeTasks => "READY_TO_RUN_UPGRADE_TASKS",
            ClusterState::RunningUpgradeTasks => "RUNNING_UPGRADE_TASKS",
            ClusterState::UpgradeTasksFailed => "UPGRADE_TASKS_FAILED",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Version {
        s.parse().expect("valid version")
    }

    fn node(id: &str, version: &str, state: NodeState) -> NodeRecord {
        NodeRecord {
            id: id.into(),
            name: id.into(),
            ip_address: "127.0.0.1".into(),
            port: 7990,
            version: v(version),
            state,
            heartbeat_ms: 1_000,
            tasks_total: 0,
            active_user_count: 0,
            pid: 1,
            bundled_search: false,
        }
    }

    fn cluster(nodes: &[(&str, &str, NodeState)]) -> ClusterRecord {
        let mut rec = ClusterRecord {
            version: Some(v("8.19.3")),
            ..Default::default()
        };
        for (id, version, state) in nodes {
            rec.nodes.insert(id.to_string(), node(id, version, *state));
        }
        rec
    }

    fn set(rec: &mut ClusterRecord, id: &str, version: &str, state: NodeState) {
        rec.nodes.insert(id.to_string(), node(id, version, state));
    }

    #[test]
    fn join_rules() {
        let mut rec = ClusterRecord::default();
        assert_eq!(rec.join(v("8.19.3")), JoinDecision::Active);
        assert_eq!(rec.version, Some(v("8.19.3")));
        assert_eq!(rec.join(v("8.19.3")), JoinDecision::Active);
        assert!(matches!(rec.join(v("8.19.6")), JoinDecision::Refused(_)));
        assert!(matches!(rec.join(v("8.20.0")), JoinDecision::Refused(_)));
        assert!(matches!(rec.join(v("8.19.2")), JoinDecision::Refused(_)));
        rec.upgrade_mode = true;
        assert!(matches!(rec.join(v("8.20.0")), JoinDecision::Refused(_)));
        assert_eq!(rec.join(v("8.19.6")), JoinDecision::Active);
        assert_eq!(rec.target, Some(v("8.19.6")));
        assert!(matches!(rec.join(v("8.19.5")), JoinDecision::Refused(_)));
        assert_eq!(rec.join(v("8.19.3")), JoinDecision::Active);
    }

    #[test]
    fn full_upgrade_walk() {
        use NodeState::*;
        let mut rec = cluster(&[("a", "8.19.3", Active), ("b", "8.19.3", Active)]);
        assert_eq!(rec.state(), ClusterState::Stable);
        assert!(rec.approve(0, 10, false).is_err());
        assert!(rec.cancel_upgrade().is_err());
        rec.start_upgrade().expect("start");
        assert_eq!(rec.state(), ClusterState::ReadyToUpgrade);
        assert!(rec.start_upgrade().is_err());
        set(&mut rec, "a", "8.19.3", Offline);
        assert_eq!(rec.state(), ClusterState::ReadyToUpgrade);
        set(&mut rec, "a", "8.19.6", Starting);
        assert_eq!(rec.join(v("8.19.6")), JoinDecision::Active);
        set(&mut rec, "a", "8.19.6", Active);
        assert_eq!(rec.state(), ClusterState::Mixed);
        assert!(rec.cancel_upgrade().is_err());
        set(&mut rec, "b", "8.19.3", Offline);
        // b is down on the original version: not ready yet.
        assert_eq!(rec.state(), ClusterState::Mixed);
        set(&mut rec, "b", "8.19.6", Active);
        assert_eq!(rec.state(), ClusterState::ReadyToRunUpgradeTasks);
        rec.approve(100, 50, false).expect("approve");
        assert_eq!(rec.state(), ClusterState::RunningUpgradeTasks);
        rec.settle(120, u64::MAX);
        assert_eq!(rec.state(), ClusterState::RunningUpgradeTasks);
        rec.settle(150, u64::MAX);
        assert_eq!(rec.state(), ClusterState::Stable);
        assert_eq!(rec.version, Some(v("8.19.6")));
        assert!(!rec.upgrade_mode);
        assert!(matches!(rec.join(v("8.19.3")), JoinDecision::Refused(_)));
    }

    #[test]
    fn failed_tasks_and_retry() {
        use NodeState::*;
        let mut rec = cluster(&[("a", "8.19.6", Active)]);
        rec.upgrade_mode = true;
        rec.target = Some(v("8.19.6"));
        assert!(rec.retry(0, 10, false).is_err());
        rec.approve(0, 10, true).expect("approve");
        rec.settle(10, u64::MAX);
        assert_eq!(rec.state(), ClusterState::UpgradeTasksFailed);
        rec.retry(10, 10, false).expect("retry");
        rec.settle(20, u64::MAX);
        assert_eq!(rec.state(), ClusterState::Stable);
    }

    #[test]
    fn start_needs_all_active_and_cancel_works_before_new_version() {
        use NodeState::*;
        let mut rec = cluster(&[("a", "8.19.3", Active), ("b", "8.19.3", Starting)]);
        assert!(rec.start_upgrade().is_err());
        set(&mut rec, "b", "8.19.3", Offline);
        rec.start_upgrade().expect("offline nodes are not members");
        rec.cancel_upgrade().expect("cancel");
        assert_eq!(rec.state(), ClusterState::Stable);
        assert!(cluster(&[]).start_upgrade().is_err());
    }

    #[test]
    fn stale_heartbeat_goes_offline() {
        let mut rec = cluster(&[("a", "8.19.3", NodeState::Active)]);
        rec.settle(2_000, 5_000);
        assert_eq!(rec.nodes["a"].state, NodeState::Active);
        rec.settle(7_000, 5_000);
        assert_eq!(rec.nodes["a"].state, NodeState::Offline);
    }
}
