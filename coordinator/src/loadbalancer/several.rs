//! Several front doors as one load balancer: a node's server in several backends of one HAProxy
//! (`bitbucket_http` and `bitbucket_ssh`), or several load balancers before one cluster (HTTP on one,
//! Git over SSH on another). The procedure sees one [`LoadBalancer`]; this fans every call out.
//!
//! Drain means every member: all are told at once (no new sessions through any door), each waits
//! for the node's sessions through it within the same deadline. If any member fails, the members
//! that did drain are put back, so the node stays in service through every door, and the first
//! failure is returned (it names its load balancer and backend).

use std::time::Duration;

use super::{AdminState, DrainReport, LbError, LoadBalancer, OperState, ServerState};

/// Every member, in the order the inventory lists them.
pub struct Several {
    members: Vec<Box<dyn LoadBalancer>>,
}

impl Several {
    pub fn new(members: Vec<Box<dyn LoadBalancer>>) -> Result<Self, LbError> {
        if members.is_empty() {
            return Err(LbError::Config(
                "a list of load balancers or backends must name at least one".into(),
            ));
        }
        Ok(Self { members })
    }
}

/// The state of a server seen through several doors: in rotation only if in rotation in all, out
/// (`maint`) only if out of all, draining otherwise; up only if up in all; sessions summed.
pub fn combine(states: &[ServerState]) -> ServerState {
    let admin = match states.first().map(|s| s.admin) {
        Some(first) if states.iter().all(|s| s.admin == first) => first,
        Some(_) => AdminState::Drain,
        None => AdminState::Maint,
    };
    let operational = states
        .iter()
        .map(|s| s.operational)
        .find(|o| *o != OperState::Up)
        .unwrap_or(OperState::Up);
    ServerState {
        admin,
        operational,
        current_sessions: states.iter().map(|s| s.current_sessions).sum(),
    }
}

#[async_trait::async_trait]
impl LoadBalancer for Several {
    fn describe(&self) -> String {
        let all: Vec<String> = self.members.iter().map(|m| m.describe()).collect();
        all.join(" and ")
    }

    async fn server_state(&self, server: &str) -> Result<ServerState, LbError> {
        let mut states = Vec::with_capacity(self.members.len());
        for m in &self.members {
            states.push(m.server_state(server).await?);
        }
        Ok(combine(&states))
    }

    async fn drain(&self, server: &str, timeout: Duration) -> Result<DrainReport, LbError> {
        let results =
            futures::future::join_all(self.members.iter().map(|m| m.drain(server, timeout))).await;
        let mut report = DrainReport {
            waited: Duration::ZERO,
            sessions_at_start: 0,
        };
        let mut first_error = None;
        let mut drained = Vec::new();
        for (m, result) in self.members.iter().zip(results) {
            match result {
                Ok(r) => {
                    report.waited = report.waited.max(r.waited);
                    report.sessions_at_start += r.sessions_at_start;
                    drained.push(m);
                }
                Err(e) => {
                    tracing::warn!(lb = %m.describe(), server, "drain failed: {e}");
                    first_error.get_or_insert(e);
                }
            }
        }
        let Some(error) = first_error else {
            return Ok(report);
        };
        for m in drained {
            if let Err(e) = m.enable(server).await {
                tracing::error!(lb = %m.describe(), server, "could not put the server back after another door failed to drain: {e}");
            }
        }
        Err(error)
    }

    async fn enable(&self, server: &str) -> Result<(), LbError> {
        let mut first_error = None;
        for m in &self.members {
            if let Err(e) = m.enable(server).await {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    async fn check_server(&self, server: &str) -> Result<(), LbError> {
        for m in &self.members {
            m.check_server(server).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A member that records calls and fails drain when told to.
    struct Fake {
        name: &'static str,
        fail_drain: bool,
        missing: bool,
        log: Arc<Mutex<Vec<String>>>,
    }

    #[async_trait::async_trait]
    impl LoadBalancer for Fake {
        fn describe(&self) -> String {
            format!("fake {}", self.name)
        }
        async fn server_state(&self, _server: &str) -> Result<ServerState, LbError> {
            Ok(ServerState {
                admin: AdminState::Ready,
                operational: OperState::Up,
                current_sessions: 2,
            })
        }
        async fn drain(&self, server: &str, _timeout: Duration) -> Result<DrainReport, LbError> {
            self.log
                .lock()
                .unwrap()
                .push(format!("drain {} {server}", self.name));
            if self.fail_drain {
                return Err(LbError::DrainTimeout {
                    lb: self.describe(),
                    server: server.into(),
                    sessions: 1,
                    waited: Duration::from_secs(1),
                });
            }
            Ok(DrainReport {
                waited: Duration::from_millis(if self.name == "a" { 10 } else { 30 }),
                sessions_at_start: 1,
            })
        }
        async fn enable(&self, server: &str) -> Result<(), LbError> {
            self.log
                .lock()
                .unwrap()
                .push(format!("enable {} {server}", self.name));
            Ok(())
        }
        async fn check_server(&self, server: &str) -> Result<(), LbError> {
            if self.missing {
                return Err(LbError::UnknownServer {
                    lb: self.describe(),
                    server: server.into(),
                });
            }
            Ok(())
        }
    }

    fn several(fail_b: bool, missing_b: bool) -> (Several, Arc<Mutex<Vec<String>>>) {
        let log = Arc::new(Mutex::new(Vec::new()));
        let member = |name, fail_drain, missing| -> Box<dyn LoadBalancer> {
            Box::new(Fake {
                name,
                fail_drain,
                missing,
                log: Arc::clone(&log),
            })
        };
        let s = Several::new(vec![
            member("a", false, false),
            member("b", fail_b, missing_b),
        ])
        .unwrap();
        (s, log)
    }

    #[tokio::test]
    async fn drains_every_door_and_adds_up() {
        let (s, log) = several(false, false);
        assert_eq!(s.describe(), "fake a and fake b");
        let r = s.drain("n1", Duration::from_secs(5)).await.unwrap();
        assert_eq!(r.waited, Duration::from_millis(30));
        assert_eq!(r.sessions_at_start, 2);
        assert_eq!(*log.lock().unwrap(), ["drain a n1", "drain b n1"]);
        assert_eq!(s.server_state("n1").await.unwrap().current_sessions, 4);
        s.enable("n1").await.unwrap();
        assert!(s.check_server("n1").await.is_ok());
    }

    #[tokio::test]
    async fn a_door_that_fails_to_drain_puts_the_others_back() {
        let (s, log) = several(true, false);
        let err = s.drain("n1", Duration::from_secs(5)).await.unwrap_err();
        assert!(
            matches!(&err, LbError::DrainTimeout { lb, sessions: 1, .. } if lb == "fake b"),
            "{err}"
        );
        assert_eq!(
            *log.lock().unwrap(),
            ["drain a n1", "drain b n1", "enable a n1"]
        );
    }

    #[tokio::test]
    async fn preflight_names_the_door_lacking_the_server() {
        let (s, _) = several(false, true);
        let err = s.check_server("n1").await.unwrap_err();
        assert!(
            err.to_string().contains("fake b has no server \"n1\""),
            "{err}"
        );
    }

    #[test]
    fn combined_state() {
        let st = |admin, operational, current_sessions| ServerState {
            admin,
            operational,
            current_sessions,
        };
        let ready = st(AdminState::Ready, OperState::Up, 1);
        let maint = st(AdminState::Maint, OperState::Down, 0);
        assert_eq!(
            combine(&[ready, ready]),
            st(AdminState::Ready, OperState::Up, 2)
        );
        assert_eq!(combine(&[maint, maint]).admin, AdminState::Maint);
        assert_eq!(
            combine(&[ready, maint]),
            st(AdminState::Drain, OperState::Down, 1)
        );
    }
}
