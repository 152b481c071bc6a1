//! What a rollback does on this node, decided from the agent's install record and the version the
//! coordinator names: pure, so repeating a rollback can be shown not to flip the node back.

use std::path::{Path, PathBuf};

/// What the rollback handler carries out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RollbackPlan {
    /// The target install is already active: nothing is re-activated (a repeated or re-run
    /// rollback); the node is only started, unless asked to stay stopped.
    AlreadyActive,
    /// Stop, activate this install (the previous one), start.
    Activate(PathBuf),
}

/// What the agent knows of its installs.
#[derive(Debug, Clone, Copy)]
pub struct Installs<'a> {
    pub active_version: Option<&'a str>,
    pub previous: Option<&'a Path>,
    pub previous_version: Option<&'a str>,
}

/// The plan for a rollback to `target` (empty: the previous install, as before the field existed),
/// or why it is refused.
pub fn plan_rollback(installs: Installs<'_>, target: &str) -> Result<RollbackPlan, String> {
    if !target.is_empty() && installs.active_version == Some(target) {
        return Ok(RollbackPlan::AlreadyActive);
    }
    let Some(previous) = installs.previous else {
        return Err(if target.is_empty() {
            "there is no previous install to roll back to on this node".to_string()
        } else {
            format!(
                "this node runs {} and has no previous install; it cannot be returned to {target}",
                installs.active_version.unwrap_or("an unknown version")
            )
        });
    };
    if target.is_empty() || installs.previous_version == Some(target) {
        return Ok(RollbackPlan::Activate(previous.to_path_buf()));
    }
    Err(format!(
        "this node runs {} and its previous install is {} ({}); it cannot be returned to {target}: a rollback activates only the version the run started from, never an older one",
        installs.active_version.unwrap_or("an unknown version"),
        installs.previous_version.unwrap_or("an unknown version"),
        previous.display()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const OLD: &str = "/opt/atlassian/bitbucket/8.19.3";

    fn installs<'a>(active: &'a str, previous: Option<&'a str>) -> Installs<'a> {
        Installs {
            active_version: Some(active),
            previous: previous.map(|_| Path::new(OLD)),
            previous_version: previous,
        }
    }

    #[test]
    fn rolls_back_to_the_named_previous_install() {
        assert_eq!(
            plan_rollback(installs("8.19.6", Some("8.19.3")), "8.19.3"),
            Ok(RollbackPlan::Activate(PathBuf::from(OLD)))
        );
    }

    #[test]
    fn a_repeated_rollback_does_not_flip_the_node_back() {
        // After the first rollback the agent's record is swapped: active 8.19.3, previous 8.19.6.
        let after = installs("8.19.3", Some("8.19.6"));
        for _ in 0..3 {
            assert_eq!(
                plan_rollback(after, "8.19.3"),
                Ok(RollbackPlan::AlreadyActive)
            );
        }
    }

    #[test]
    fn a_node_never_activated_is_not_sent_to_the_upgrade_before_last() {
        // Upgraded 8.19.1 -> 8.19.3 before; this run (8.19.3 -> 8.19.6) failed before activate.
        let never_activated = installs("8.19.3", Some("8.19.1"));
        assert_eq!(
            plan_rollback(never_activated, "8.19.3"),
            Ok(RollbackPlan::AlreadyActive)
        );
    }

    #[test]
    fn a_target_that_is_not_the_previous_install_is_refused() {
        let e = plan_rollback(installs("8.19.6", Some("8.19.1")), "8.19.3").unwrap_err();
        assert!(e.contains("8.19.1") && e.contains("8.19.3"), "{e}");
        let e = plan_rollback(installs("8.19.6", None), "8.19.3").unwrap_err();
        assert!(e.contains("no previous install"), "{e}");
    }

    #[test]
    fn without_a_target_the_previous_install_is_used_as_before() {
        assert_eq!(
            plan_rollback(installs("8.19.6", Some("8.19.3")), ""),
            Ok(RollbackPlan::Activate(PathBuf::from(OLD)))
        );
        assert!(plan_rollback(installs("8.19.6", None), "").is_err());
    }
}
