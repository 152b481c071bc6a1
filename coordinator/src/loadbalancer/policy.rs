//! What a run does about sessions still open on a node when the drain deadline (`drain_secs`)
//! passes, e.g. a long Git clone over SSH: `[timeouts] drain_policy = "halt"` (the default) stops
//! the run, and the node, never stopped, is put back in service by the failure handling;
//! `"wait"` keeps waiting, up to `drain_wait_secs` more, and halts after that. Either way the run
//! says how many sessions were left and where (load balancer, backend, server).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{DrainReport, LbError, LoadBalancer};

/// The default bound of `drain_policy = "wait"`, beyond `drain_secs`.
pub const DEFAULT_DRAIN_WAIT_SECS: u64 = 900;

/// `[timeouts] drain_policy`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DrainPolicy {
    /// Halt the run; the node goes back in service.
    #[default]
    Halt,
    /// Keep waiting, up to `drain_wait_secs` more, then halt.
    Wait,
}

impl std::fmt::Display for DrainPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DrainPolicy::Halt => "halt",
            DrainPolicy::Wait => "wait",
        })
    }
}

/// `, and after waiting 10s more` for a halt that waited first; nothing otherwise.
pub fn after_waiting(waited_more: &Duration) -> String {
    if waited_more.is_zero() {
        String::new()
    } else {
        format!(", and after waiting {waited_more:?} more")
    }
}

/// The decision at a drain deadline with sessions left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AtDeadline {
    /// Wait this much longer.
    WaitMore(Duration),
    Halt,
}

/// The pure decision: `waited_more` is how long the run already waited past `drain_secs`,
/// `bound` the policy's `drain_wait_secs`.
pub fn at_deadline(policy: DrainPolicy, waited_more: Duration, bound: Duration) -> AtDeadline {
    match policy {
        DrainPolicy::Wait if waited_more < bound => AtDeadline::WaitMore(bound - waited_more),
        DrainPolicy::Wait | DrainPolicy::Halt => AtDeadline::Halt,
    }
}

/// A successful drain under a policy, with what the deadline found when it had to wait longer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyDrain {
    pub report: DrainReport,
    /// e.g. `at the drain deadline 1 session(s) were still open on node1 in haproxy ... backend
    /// bitbucket_ssh; drain_policy = wait: they ended 2.1s later`.
    pub at_deadline: Option<String>,
}

/// Drains `server` within `timeout` and, when sessions are left at the deadline, does what
/// `policy` says: waits again (up to `bound` in all), or returns [`LbError::DrainHalted`].
pub async fn drain_with_policy(
    lb: &dyn LoadBalancer,
    server: &str,
    timeout: Duration,
    policy: DrainPolicy,
    bound: Duration,
) -> Result<PolicyDrain, LbError> {
    let mut this_time = timeout;
    let mut first_left: Option<String> = None;
    // How long the first attempt waited, and the ones after it (past the deadline).
    let (mut before_deadline, mut waited_more) = (Duration::ZERO, Duration::ZERO);
    loop {
        let error = match lb.drain(server, this_time).await {
            Ok(mut report) => {
                let at_deadline = first_left.map(|left| {
                    let later = waited_more + report.waited;
                    format!(
                        "at the drain deadline {left}; drain_policy = wait: they ended {:.1}s later",
                        later.as_secs_f64()
                    )
                });
                report.waited += before_deadline + waited_more;
                return Ok(PolicyDrain {
                    report,
                    at_deadline,
                });
            }
            Err(e) => e,
        };
        let LbError::DrainTimeout {
            lb: door,
            server: s,
            sessions,
            waited,
        } = &error
        else {
            return Err(error);
        };
        let left = format!("{sessions} session(s) were still open on {s} in {door}");
        tracing::warn!(server, policy = %policy, "at the drain deadline {left}");
        if first_left.is_none() {
            first_left = Some(left.clone());
            before_deadline = *waited;
        } else {
            waited_more += *waited;
        }
        match at_deadline(policy, waited_more, bound) {
            AtDeadline::WaitMore(more) => this_time = more,
            AtDeadline::Halt => {
                return Err(LbError::DrainHalted {
                    left: first_left.unwrap_or(left),
                    policy,
                    waited_more,
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loadbalancer::{AdminState, OperState, ServerState};
    use std::sync::Mutex;

    #[test]
    fn the_decision_at_the_deadline() {
        let s = Duration::from_secs;
        assert_eq!(
            at_deadline(DrainPolicy::Halt, s(0), s(60)),
            AtDeadline::Halt
        );
        assert_eq!(
            at_deadline(DrainPolicy::Wait, s(0), s(60)),
            AtDeadline::WaitMore(s(60))
        );
        assert_eq!(
            at_deadline(DrainPolicy::Wait, s(45), s(60)),
            AtDeadline::WaitMore(s(15))
        );
        assert_eq!(
            at_deadline(DrainPolicy::Wait, s(60), s(60)),
            AtDeadline::Halt
        );
        assert_eq!(at_deadline(DrainPolicy::Wait, s(0), s(0)), AtDeadline::Halt);
    }

    /// A door whose drains time out with one SSH session left, `timeouts` times, then succeed.
    struct Slow {
        timeouts: Mutex<u32>,
        asked: Mutex<Vec<Duration>>,
    }

    #[async_trait::async_trait]
    impl LoadBalancer for Slow {
        fn describe(&self) -> String {
            "haproxy at unix:/h backend bitbucket_ssh".into()
        }
        async fn server_state(&self, _: &str) -> Result<ServerState, LbError> {
            Ok(ServerState {
                admin: AdminState::Drain,
                operational: OperState::Up,
                current_sessions: 1,
            })
        }
        async fn drain(&self, server: &str, timeout: Duration) -> Result<DrainReport, LbError> {
            self.asked.lock().unwrap().push(timeout);
            let mut left = self.timeouts.lock().unwrap();
            if *left > 0 {
                *left -= 1;
                return Err(LbError::DrainTimeout {
                    lb: self.describe(),
                    server: server.into(),
                    sessions: 1,
                    waited: timeout,
                });
            }
            Ok(DrainReport {
                waited: Duration::from_secs(2),
                sessions_at_start: 0,
            })
        }
        async fn enable(&self, _: &str) -> Result<(), LbError> {
            Ok(())
        }
        async fn check_server(&self, _: &str) -> Result<(), LbError> {
            Ok(())
        }
    }

    fn slow(timeouts: u32) -> Slow {
        Slow {
            timeouts: Mutex::new(timeouts),
            asked: Mutex::new(Vec::new()),
        }
    }

    #[tokio::test]
    async fn halt_says_how_many_and_where() {
        let lb = slow(1);
        let s = Duration::from_secs;
        let e = drain_with_policy(&lb, "node1", s(5), DrainPolicy::Halt, s(60))
            .await
            .unwrap_err();
        let m = e.to_string();
        assert!(
            m.contains(
                "1 session(s) were still open on node1 in haproxy at unix:/h backend bitbucket_ssh"
            ) && m.contains("drain_policy = halt"),
            "{m}"
        );
        assert_eq!(*lb.asked.lock().unwrap(), [s(5)]);
    }

    #[tokio::test]
    async fn wait_keeps_waiting_within_its_bound() {
        let s = Duration::from_secs;
        let lb = slow(1);
        let d = drain_with_policy(&lb, "node1", s(5), DrainPolicy::Wait, s(60))
            .await
            .unwrap();
        assert_eq!(*lb.asked.lock().unwrap(), [s(5), s(60)]);
        assert_eq!(d.report.waited, s(7));
        let note = d.at_deadline.unwrap();
        assert!(
            note.contains("1 session(s) were still open on node1")
                && note.contains("drain_policy = wait: they ended 2.0s later"),
            "{note}"
        );
        // Still sessions when the bound is used up: halt, saying it waited.
        let lb = slow(2);
        let e = drain_with_policy(&lb, "node1", s(5), DrainPolicy::Wait, s(60))
            .await
            .unwrap_err();
        assert!(
            matches!(&e, LbError::DrainHalted { waited_more, .. } if *waited_more == s(60)),
            "{e}"
        );
        assert!(e.to_string().contains("drain_policy = wait"), "{e}");
        // Nothing left at the deadline: no note.
        let d = drain_with_policy(&slow(0), "node1", s(5), DrainPolicy::Halt, s(60))
            .await
            .unwrap();
        assert_eq!(d.at_deadline, None);
    }
}
