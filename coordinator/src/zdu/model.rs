//! The documents of the rolling-upgrade API as Bitbucket sends them: every node field but `id` and `state`
//! may be absent or `null` (OFFLINE and starting rows carry no version, counts or address), states
//! this code does not know are kept.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize};

/// Cluster state as Bitbucket reports it; strings this code does not know are kept, not refused.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(from = "String", into = "String")]
pub enum ClusterState {
    Stable,
    ReadyToUpgrade,
    Mixed,
    ReadyToRunUpgradeTasks,
    RunningUpgradeTasks,
    UpgradeTasksFailed,
    Unknown(String),
}

impl ClusterState {
    pub fn as_str(&self) -> &str {
        match self {
            ClusterState::Stable => "STABLE",
            ClusterState::ReadyToUpgrade => "READY_TO_UPGRADE",
            ClusterState::Mixed => "MIXED",
            ClusterState::ReadyToRunUpgradeTasks => "READY_TO_RUN_UPGRADE_TASKS",
            ClusterState::RunningUpgradeTasks => "RUNNING_UPGRADE_TASKS",
            ClusterState::UpgradeTasksFailed => "UPGRADE_TASKS_FAILED",
            ClusterState::Unknown(s) => s,
        }
    }
}

impl From<String> for ClusterState {
    fn from(s: String) -> Self {
        match s.as_str() {
            "STABLE" => ClusterState::Stable,
            "READY_TO_UPGRADE" => ClusterState::ReadyToUpgrade,
            "MIXED" => ClusterState::Mixed,
            "READY_TO_RUN_UPGRADE_TASKS" => ClusterState::ReadyToRunUpgradeTasks,
            "RUNNING_UPGRADE_TASKS" => ClusterState::RunningUpgradeTasks,
            "UPGRADE_TASKS_FAILED" => ClusterState::UpgradeTasksFailed,
            _ => ClusterState::Unknown(s),
        }
    }
}

impl From<ClusterState> for String {
    fn from(s: ClusterState) -> Self {
        s.as_str().to_string()
    }
}

impl fmt::Display for ClusterState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Node state as Bitbucket reports it; strings this code does not know are kept, not refused.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(from = "String", into = "String")]
pub enum NodeState {
    Starting,
    Active,
    Draining,
    Terminating,
    Offline,
    Error,
    Unknown(String),
}

impl NodeState {
    pub fn as_str(&self) -> &str {
        match self {
            NodeState::Starting => "STARTING",
            NodeState::Active => "ACTIVE",
            NodeState::Draining => "DRAINING",
            NodeState::Terminating => "TERMINATING",
            NodeState::Offline => "OFFLINE",
            NodeState::Error => "ERROR",
            NodeState::Unknown(s) => s,
        }
    }
}

impl From<String> for NodeState {
    fn from(s: String) -> Self {
        match s.as_str() {
            "STARTING" => NodeState::Starting,
            "ACTIVE" => NodeState::Active,
            "DRAINING" => NodeState::Draining,
            "TERMINATING" => NodeState::Terminating,
            "OFFLINE" => NodeState::Offline,
            "ERROR" => NodeState::Error,
            _ => NodeState::Unknown(s),
        }
    }
}

impl From<NodeState> for String {
    fn from(s: NodeState) -> Self {
        s.as_str().to_string()
    }
}

impl fmt::Display for NodeState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `GET /rest/zdu/cluster`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterView {
    pub upgrade_mode_enabled: bool,
    pub state: ClusterState,
    #[serde(default, deserialize_with = "blank_as_none")]
    pub original_version: Option<String>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub nodes: Vec<ZduNode>,
}

impl ClusterView {
    /// Rows of nodes that are not OFFLINE: an OFFLINE row may be one a restarted node left behind,
    /// and Bitbucket ignores those when it decides every node runs the new version.
    pub fn live(&self) -> impl Iterator<Item = &ZduNode> {
        self.nodes.iter().filter(|n| n.state != NodeState::Offline)
    }

    /// Whether any live row runs `version`.
    pub fn any_live_runs(&self, version: &str) -> bool {
        self.live().any(|n| n.runs(version))
    }

    /// Whether there are live rows and all run `version`.
    pub fn all_live_run(&self, version: &str) -> bool {
        self.live().next().is_some() && self.live().all(|n| n.runs(version))
    }
}

/// `GET /rest/zdu/state`: the cluster state and the node that answered. Upgrade mode is not in it
/// (read it from [`ClusterView`]).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterStateView {
    pub state: ClusterState,
    #[serde(default)]
    pub build_info: Option<ZduNode>,
}

/// One cluster node, from `GET /rest/zdu/cluster` or `GET /rest/zdu/nodes/{id}`. Only `id` and `state`
/// are always there: an OFFLINE row has no version or counts, a starting one no address either.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ZduNode {
    #[serde(default, deserialize_with = "null_as_default")]
    pub id: String,
    #[serde(default, deserialize_with = "blank_as_none")]
    pub name: Option<String>,
    #[serde(default, deserialize_with = "blank_as_none")]
    pub ip_address: Option<String>,
    #[serde(default = "unknown_state", deserialize_with = "state_or_unknown")]
    pub state: NodeState,
    #[serde(default)]
    pub tasks_total: Option<u64>,
    #[serde(default)]
    pub active_user_count: Option<u64>,
    /// Bitbucket versions differ on whether this is a string or a number; both are accepted.
    #[serde(default, deserialize_with = "string_or_number")]
    pub build_number: Option<String>,
    #[serde(default, deserialize_with = "blank_as_none")]
    pub version: Option<String>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub local: bool,
    #[serde(default)]
    pub port_number: Option<u16>,
}

impl ZduNode {
    /// The version, or "-" where Bitbucket shows none (OFFLINE and starting rows).
    pub fn version_or_dash(&self) -> &str {
        self.version.as_deref().unwrap_or("-")
    }

    /// Whether the row runs `version`.
    pub fn runs(&self, version: &str) -> bool {
        self.version.as_deref() == Some(version)
    }

    pub fn tasks(&self) -> u64 {
        self.tasks_total.unwrap_or(0)
    }

    pub fn users(&self) -> u64 {
        self.active_user_count.unwrap_or(0)
    }
}

fn unknown_state() -> NodeState {
    NodeState::Unknown("(none)".into())
}

fn state_or_unknown<'de, D: Deserializer<'de>>(d: D) -> Result<NodeState, D::Error> {
    Ok(Option::<String>::deserialize(d)?
        .map(NodeState::from)
        .unwrap_or_else(unknown_state))
}

fn null_as_default<'de, D: Deserializer<'de>, T: Default + Deserialize<'de>>(
    d: D,
) -> Result<T, D::Error> {
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// A missing, `null` or blank string (the admin page shows a blank version) is `None`.
fn blank_as_none<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Ok(Option::<String>::deserialize(d)?.filter(|s| !s.trim().is_empty()))
}

fn string_or_number<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Text(String),
        Number(serde_json::Number),
    }
    Ok(Option::<Raw>::deserialize(d)?.map(|raw| match raw {
        Raw::Text(s) => s,
        Raw::Number(n) => n.to_string(),
    }))
}
