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

/// What the cluster knows of one node process (kept in the shared home, written by the node itself).
/// A node gets a new id every time its process starts; the row of an earlier process stays behind as
/// `OFFLINE` until it ages out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub id: String,
    /// `-Dcluster.node.name`, or [`NOT_CONFIGURED`].
    pub name: String,
    pub ip_address: String,
    /// The HTTP port (not reported by the rolling-upgrade API; the simulator's own view).
    pub http_port: u16,
    /// The cluster (Hazelcast) port: what the API reports as `portNumber`.
    pub hazelcast_port: u16,
    pub version: Version,
    pub state: NodeState,
    pub heartbeat_ms: u64,
    /// When the row turned `OFFLINE` (it ages out a while later).
    #[serde(default)]
    pub offline_since_ms: Option<u64>,
    pub tasks_total: u64,
    pub active_user_count: u64,
    pub pid: u32,
    pub bundled_search: bool,
}

/// The name a node reports unless it was started with `-Dcluster.node.name`.
pub const NOT_CONFIGURED: &str = "Not configured";

/// The cluster as a whole: its version, upgrade mode and members.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ClusterRecord {
    /// The version the cluster runs (the original version while upgrading).
    pub version: Option<Version>,
    pub upgrade_mode: bool,
    /// The bug-fix version nodes are being upgraded to, once the first one has joined.
    pub target: Option<Version>,
    pub tasks: UpgradeTasks,
    pub nodes: BTreeMap<String, NodeRecord>,
}

/// How time changes the record: when a silent node is `OFFLINE`, when an `OFFLINE` row disappears.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Liveness {
    /// A node whose heartbeat is older than this is `OFFLINE`.
    pub stale_ms: u64,
    /// An `OFFLINE` row older than this leaves the cluster view.
    pub offline_row_ttl_ms: u64,
}

impl Default for Liveness {
    fn default() -> Self {
        Liveness {
            stale_ms: 5_000,
            offline_row_ttl_ms: 600_000,
        }
    }
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

    /// Whether the API leaves the version, build number and counts of a row in this state blank.
    pub fn blanks_version(self) -> bool {
        matches!(self, NodeState::Offline | NodeState::Starting)
    }

    /// Whether the API leaves the IP address of a row in this state blank.
    pub fn blanks_address(self) -> bool {
        matches!(self, NodeState::Starting)
    }
}

impl ClusterRecord {
    /// Applies what time alone changes: stale heartbeats turn nodes `OFFLINE`, old `OFFLINE` rows
    /// age out, upgrade tasks end.
    pub fn settle(&mut self, now_ms: u64, liveness: Liveness) {
        for node in self.nodes.values_mut() {
            if node.state.is_up() && now_ms.saturating_sub(node.heartbeat_ms) > liveness.stale_ms {
                node.state = NodeState::Offline;
                node.offline_since_ms = Some(now_ms);
            }
            if node.state == NodeState::Offline && node.offline_since_ms.is_none() {
                node.offline_since_ms = Some(now_ms);
            }
        }
        self.nodes.retain(|_, n| {
            n.state.is_up()
                || n.offline_since_ms
                    .is_none_or(|since| now_ms.saturating_sub(since) < liveness.offline_row_ttl_ms)
        });
        if let UpgradeTasks::Running { until_ms, fail } = self.tasks
            && now_ms >= until_ms
        {
            if fail {
                self.tasks = UpgradeTasks::Failed;
            } else {
                if let Some(target) = self.target.take() {
                    self.version = Some(target);
                }
                self.tasks = UpgradeTasks::NotStarted;
            }
        }
    }

    /// Rows of nodes that are up: `OFFLINE` rows never hold the cluster back.
    fn live(&self) -> impl Iterator<Item = &NodeRecord> {
        self.nodes.values().filter(|n| n.state.is_up())
    }

    /// Whether a live node (in any state but `OFFLINE`, `ERROR` included) runs a version other
    /// than the cluster's original one.
    fn other_version_running(&self) -> bool {
        self.live().any(|n| Some(n.version) != self.version)
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
        if !self.other_version_running() {
            return ClusterState::ReadyToUpgrade;
        }
        let Some(target) = self.target else {
            return ClusterState::Mixed;
        };
        if self
            .live()
            .all(|n| n.state == NodeState::Active && n.version == target)
        {
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
        if self.tasks != UpgradeTasks::NotStarted {
            return JoinDecision::Refused(format!(
                "Bitbucket {version} cannot join while the cluster runs its upgrade tasks"
            ));
        }
        if !self.upgrade_mode {
            return JoinDecision::Refused(format!(
                "Bitbucket {version} cannot join this cluster, which runs {cluster}, because upgrade mode \
                 is not enabled"
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

    /// `POST /rest/zdu/start`: upgrade mode on, only from `STABLE`.
    pub fn start_upgrade(&mut self) -> Result<(), Conflict> {
        let state = self.state();
        if state != ClusterState::Stable {
            return Err(Conflict(format!(
                "upgrade mode can only be enabled when the cluster is STABLE, not {}",
                state.name()
            )));
        }
        self.upgrade_mode = true;
        self.target = None;
        Ok(())
    }

    /// `POST /rest/zdu/cancel`: upgrade mode off, only while it is on and no live node runs a
    /// version other than the original.
    pub fn cancel_upgrade(&mut self) -> Result<(), Conflict> {
        if !self.upgrade_mode {
            return Err(Conflict(format!(
                "upgrade mode is not enabled (the cluster is {})",
                self.state().name()
            )));
        }
        if self.other_version_running() {
            return Err(Conflict(
                "upgrade mode cannot be cancelled while a node runs another version than the \
                 original one"
                    .into(),
            ));
        }
        self.upgrade_mode = false;
        self.target = None;
        Ok(())
    }

    /// `POST /rest/zdu/approve`: runs the upgrade tasks once every live node is upgraded; upgrade
    /// mode is off at once.
    pub fn approve(&mut self, now_ms: u64, tasks_ms: u64, fail: bool) -> Result<(), Conflict> {
        let state = self.state();
        if state != ClusterState::ReadyToRunUpgradeTasks {
            return Err(Conflict(format!(
                "the upgrade can only be approved in state READY_TO_RUN_UPGRADE_TASKS, not {}",
                state.name()
            )));
        }
        self.upgrade_mode = false;
        self.tasks = UpgradeTasks::Running {
            until_ms: now_ms + tasks_ms,
            fail,
        };
        Ok(())
    }

    /// `POST /rest/zdu/retryUpgrade` (only with the `sim.zdu.retry.upgrade` knob): runs the upgrade
    /// tasks again after they failed.
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

    const NO_AGING: Liveness = Liveness {
        stale_ms: u64::MAX,
        offline_row_ttl_ms: u64::MAX,
    };

    fn v(s: &str) -> Version {
        s.parse().expect("valid version")
    }

    fn node(id: &str, version: &str, state: NodeState) -> NodeRecord {
        NodeRecord {
            id: id.into(),
            name: NOT_CONFIGURED.into(),
            ip_address: "127.0.0.1".into(),
            http_port: 7990,
            hazelcast_port: 5701,
            version: v(version),
            state,
            heartbeat_ms: 1_000,
            offline_since_ms: None,
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

    /// Every restarted node comes back under a new id; its old row stays OFFLINE on the old version
    /// and does not hold the upgrade back.
    #[test]
    fn full_upgrade_walk_with_new_ids() {
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
        set(&mut rec, "a2", "8.19.6", Starting);
        assert_eq!(rec.state(), ClusterState::Mixed, "a starting node counts");
        assert!(rec.cancel_upgrade().is_err());
        assert_eq!(rec.join(v("8.19.6")), JoinDecision::Active);
        set(&mut rec, "a2", "8.19.6", Active);
        assert_eq!(rec.state(), ClusterState::Mixed);
        assert!(rec.cancel_upgrade().is_err());
        assert!(rec.approve(0, 10, false).is_err());
        set(&mut rec, "b", "8.19.3", Offline);
        // Only a2 is live, on the new version: the OFFLINE rows on 8.19.3 do not count.
        assert_eq!(rec.state(), ClusterState::ReadyToRunUpgradeTasks);
        set(&mut rec, "b2", "8.19.6", Starting);
        assert_eq!(rec.state(), ClusterState::Mixed);
        set(&mut rec, "b2", "8.19.6", Active);
        assert_eq!(rec.state(), ClusterState::ReadyToRunUpgradeTasks);
        rec.approve(100, 50, false).expect("approve");
        assert!(!rec.upgrade_mode, "upgrade mode is off at once");
        assert_eq!(rec.state(), ClusterState::RunningUpgradeTasks);
        assert!(rec.cancel_upgrade().is_err());
        assert!(rec.start_upgrade().is_err());
        rec.settle(120, NO_AGING);
        assert_eq!(rec.state(), ClusterState::RunningUpgradeTasks);
        rec.settle(150, NO_AGING);
        assert_eq!(rec.state(), ClusterState::Stable);
        assert_eq!(rec.version, Some(v("8.19.6")));
        assert!(matches!(rec.join(v("8.19.3")), JoinDecision::Refused(_)));
    }

    #[test]
    fn three_offline_rows_on_the_old_version_do_not_block_finalizing() {
        use NodeState::*;
        let mut rec = cluster(&[
            ("old1", "8.19.3", Offline),
            ("old2", "8.19.3", Offline),
            ("old3", "8.19.3", Offline),
            ("new1", "8.19.6", Active),
            ("new2", "8.19.6", Active),
            ("new3", "8.19.6", Active),
        ]);
        rec.upgrade_mode = true;
        rec.target = Some(v("8.19.6"));
        assert_eq!(rec.state(), ClusterState::ReadyToRunUpgradeTasks);
    }

    #[test]
    fn an_error_node_with_another_version_running_is_mixed() {
        use NodeState::*;
        // The upgraded node failed to start; the rest are on the original version.
        let mut rec = cluster(&[("a", "8.19.3", Active), ("b", "8.19.6", Error)]);
        rec.upgrade_mode = true;
        assert_eq!(rec.state(), ClusterState::Mixed);
        assert!(rec.cancel_upgrade().is_err());
        // The other way round: an old-version node in ERROR next to an upgraded one.
        let mut rec = cluster(&[("a", "8.19.6", Active), ("b", "8.19.3", Error)]);
        rec.upgrade_mode = true;
        rec.target = Some(v("8.19.6"));
        assert_eq!(rec.state(), ClusterState::Mixed);
        assert!(rec.approve(0, 10, false).is_err());
        // Once the ERROR node is down, cancel is possible again.
        let mut rec = cluster(&[("a", "8.19.3", Active), ("b", "8.19.6", Offline)]);
        rec.upgrade_mode = true;
        assert_eq!(rec.state(), ClusterState::ReadyToUpgrade);
        rec.cancel_upgrade().expect("cancel");
    }

    #[test]
    fn failed_tasks_and_retry() {
        use NodeState::*;
        let mut rec = cluster(&[("a", "8.19.6", Active)]);
        rec.upgrade_mode = true;
        rec.target = Some(v("8.19.6"));
        assert!(rec.retry(0, 10, false).is_err());
        rec.approve(0, 10, true).expect("approve");
        rec.settle(10, NO_AGING);
        assert_eq!(rec.state(), ClusterState::UpgradeTasksFailed);
        assert!(rec.start_upgrade().is_err());
        assert!(rec.cancel_upgrade().is_err());
        rec.retry(10, 10, false).expect("retry");
        rec.settle(20, NO_AGING);
        assert_eq!(rec.state(), ClusterState::Stable);
    }

    #[test]
    fn start_only_from_stable_and_cancel_before_another_version() {
        use NodeState::*;
        let mut rec = cluster(&[("a", "8.19.3", Active), ("b", "8.19.3", Starting)]);
        rec.start_upgrade().expect("start from STABLE");
        assert!(rec.start_upgrade().is_err());
        rec.cancel_upgrade().expect("cancel");
        assert_eq!(rec.state(), ClusterState::Stable);
        assert!(rec.cancel_upgrade().is_err(), "nothing to cancel");
    }

    #[test]
    fn stale_heartbeat_goes_offline_then_the_row_ages_out() {
        let liveness = Liveness {
            stale_ms: 5_000,
            offline_row_ttl_ms: 10_000,
        };
        let mut rec = cluster(&[("a", "8.19.3", NodeState::Active)]);
        rec.settle(2_000, liveness);
        assert_eq!(rec.nodes["a"].state, NodeState::Active);
        rec.settle(7_000, liveness);
        assert_eq!(rec.nodes["a"].state, NodeState::Offline);
        assert_eq!(rec.nodes["a"].offline_since_ms, Some(7_000));
        rec.settle(16_999, liveness);
        assert!(rec.nodes.contains_key("a"));
        rec.settle(17_000, liveness);
        assert!(rec.nodes.is_empty(), "the OFFLINE row aged out");
    }
}
