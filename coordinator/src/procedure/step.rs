//! The names of a run's steps as an enum, so a resume rule cannot miss a step by a typo; the
//! journal and the JSON events keep the documented snake_case names.

use std::fmt;

/// A journaled step of a run (cluster-wide or on one node).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Step {
    /// Stage the release on a node (it keeps serving).
    Stage,
    /// Point the staged install at the node's home, carry customizations over.
    Prepare,
    /// `POST /rest/zdu/start`.
    UpgradeMode,
    /// One node out and back: encloses the node's steps below.
    Node,
    Drain,
    Stop,
    WaitOffline,
    Activate,
    Start,
    WaitActive,
    Enable,
    Soak,
    /// After a node failed: kept out of the load balancer.
    Disable,
    /// After a node failed: stopped gracefully.
    StopFailed,
    /// Return a node to the version it ran before this run.
    Rollback,
    /// `POST /rest/zdu/cancel`.
    CancelUpgradeMode,
    /// `POST /rest/zdu/approve`, then wait for STABLE.
    Approve,
    /// Closes a handled node failure: a resume starts that node over after it.
    FailureHandled,
    /// A rejoined node taken out briefly so its users spread over the others.
    Skew,
    /// After approval: the agent removes old installs beyond its `keep_installs`.
    Cleanup,
}

impl Step {
    pub const ALL: [Step; 20] = [
        Step::Stage,
        Step::Prepare,
        Step::UpgradeMode,
        Step::Node,
        Step::Drain,
        Step::Stop,
        Step::WaitOffline,
        Step::Activate,
        Step::Start,
        Step::WaitActive,
        Step::Enable,
        Step::Soak,
        Step::Disable,
        Step::StopFailed,
        Step::Rollback,
        Step::CancelUpgradeMode,
        Step::Approve,
        Step::FailureHandled,
        Step::Skew,
        Step::Cleanup,
    ];

    /// The name in the journal and in step events.
    pub fn as_str(self) -> &'static str {
        match self {
            Step::Stage => "stage",
            Step::Prepare => "prepare",
            Step::UpgradeMode => "upgrade_mode",
            Step::Node => "node",
            Step::Drain => "drain",
            Step::Stop => "stop",
            Step::WaitOffline => "wait_offline",
            Step::Activate => "activate",
            Step::Start => "start",
            Step::WaitActive => "wait_active",
            Step::Enable => "enable",
            Step::Soak => "soak",
            Step::Disable => "disable",
            Step::StopFailed => "stop_failed",
            Step::Rollback => "rollback",
            Step::CancelUpgradeMode => "cancel_upgrade_mode",
            Step::Approve => "approve",
            Step::FailureHandled => "failure_handled",
            Step::Skew => "skew",
            Step::Cleanup => "cleanup",
        }
    }

    /// The step a journal name stands for; `None` for a name this version does not write.
    pub fn parse(name: &str) -> Option<Step> {
        Step::ALL.into_iter().find(|s| s.as_str() == name)
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq<Step> for str {
    fn eq(&self, other: &Step) -> bool {
        self == other.as_str()
    }
}

impl PartialEq<Step> for String {
    fn eq(&self, other: &Step) -> bool {
        self.as_str() == other.as_str()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_step_parses_back_from_its_journal_name() {
        for s in Step::ALL {
            assert_eq!(Step::parse(s.as_str()), Some(s));
        }
        let mut names: Vec<_> = Step::ALL.iter().map(|s| s.as_str()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), Step::ALL.len(), "two steps share a name");
        assert_eq!(Step::parse("stpo"), None);
    }

    #[test]
    fn journal_names_stay_as_documented() {
        assert_eq!(Step::WaitOffline.as_str(), "wait_offline");
        assert_eq!(Step::FailureHandled.as_str(), "failure_handled");
        assert_eq!(Step::CancelUpgradeMode.as_str(), "cancel_upgrade_mode");
        let name = String::from("stop");
        assert!(name == Step::Stop);
    }
}
