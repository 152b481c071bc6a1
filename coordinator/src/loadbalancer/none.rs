//! The `none` load balancer: nothing to drain; every call succeeds at once, and it says so loudly.

use std::time::Duration;

use super::{AdminState, DrainReport, LbError, LoadBalancer, OperState, ServerState};

/// No load balancer in front of the cluster.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoLoadBalancer;

#[async_trait::async_trait]
impl LoadBalancer for NoLoadBalancer {
    fn describe(&self) -> String {
        "no load balancer: nodes are NOT drained; users on a stopped node see errors".to_string()
    }

    async fn server_state(&self, _server: &str) -> Result<ServerState, LbError> {
        Ok(ServerState {
            admin: AdminState::Ready,
            operational: OperState::Unknown,
            current_sessions: 0,
        })
    }

    async fn drain(&self, server: &str, _timeout: Duration) -> Result<DrainReport, LbError> {
        tracing::warn!(
            server,
            "no load balancer configured: the node is stopped without draining its users"
        );
        Ok(DrainReport {
            waited: Duration::ZERO,
            sessions_at_start: 0,
        })
    }

    async fn enable(&self, _server: &str) -> Result<(), LbError> {
        Ok(())
    }

    async fn check_server(&self, _server: &str) -> Result<(), LbError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_call_succeeds_immediately() {
        let lb = NoLoadBalancer;
        lb.check_server("n1").await.unwrap();
        let report = lb.drain("n1", Duration::from_secs(60)).await.unwrap();
        assert_eq!(report.waited, Duration::ZERO);
        lb.enable("n1").await.unwrap();
        assert_eq!(lb.server_state("n1").await.unwrap().current_sessions, 0);
        assert!(lb.describe().contains("NOT drained"));
    }
}
