//! NGINX on another host (`kind = "nginx-agent"`): the agent running there with an `[lb]` role
//! edits its upstream, checks with `nginx -t` and reloads ([`bbupgrade_common::nginx`]); this driver
//! asks it to over the agent protocol's `LbServer` call, on the same mutual TLS as every agent call
//! (the agent must present the certificate of `agent_node`).

use std::time::Duration;

use bbupgrade_common::proto::{LbAction, LbAdminState, LbServerRequest, LbServerResponse};
use bbupgrade_common::tls::TlsMaterial;

use super::{AdminState, DrainReport, LbError, LoadBalancer, OperState, ServerState};
/// A client of the agent protocol (the same client the coordinator uses for the nodes).
type Client = bbupgrade_common::proto::agent_client::AgentClient<tonic::transport::Channel>;

/// Bound on connecting to the load balancer's agent.
pub const CONNECT_TIMEOUT_SECS: u64 = 5;
/// Bound on a call beyond its own wait: `nginx -t` and a reload, each bounded on the agent's side.
pub const CALL_GRACE_SECS: u64 = 2 * bbupgrade_common::nginx::COMMAND_TIMEOUT_SECS + 10;

/// The load balancer's agent, connected on first use and again after a transport error.
pub struct NginxAgent {
    agent: String,
    agent_node: String,
    tls: TlsMaterial,
    client: tokio::sync::Mutex<Option<Client>>,
}

impl NginxAgent {
    pub fn new(agent: &str, agent_node: &str, tls: &TlsMaterial) -> Result<Self, LbError> {
        if agent
            .rsplit_once(':')
            .is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err())
        {
            return Err(LbError::Config(format!(
                "nginx-agent: agent = {agent:?} must be host:port of the agent on the NGINX host"
            )));
        }
        bbupgrade_common::identity::validate_name(agent_node).map_err(|e| {
            LbError::Config(format!(
                "nginx-agent: agent_node = {agent_node:?} must be the node id in that agent's certificate: {e}"
            ))
        })?;
        Ok(Self {
            agent: agent.to_string(),
            agent_node: agent_node.to_string(),
            tls: tls.clone(),
            client: tokio::sync::Mutex::new(None),
        })
    }

    async fn client(&self) -> Result<Client, LbError> {
        let mut cached = self.client.lock().await;
        if let Some(c) = cached.as_ref() {
            return Ok(c.clone());
        }
        let channel = bbupgrade_common::tls::connect_agent(
            &self.agent,
            &self.tls,
            &self.agent_node,
            Duration::from_secs(CONNECT_TIMEOUT_SECS),
        )
        .await
        .map_err(|e| LbError::Unreachable {
            lb: self.describe(),
            target: self.agent.clone(),
            reason: format!("{e:#}"),
        })?;
        let c = Client::new(channel);
        *cached = Some(c.clone());
        Ok(c)
    }

    async fn call(
        &self,
        action: LbAction,
        server: &str,
        drain_timeout: Duration,
        check: bool,
    ) -> Result<LbServerResponse, LbError> {
        let mut client = self.client().await?;
        let deadline = drain_timeout + Duration::from_secs(CALL_GRACE_SECS);
        let mut req = tonic::Request::new(LbServerRequest {
            operation_id: format!(
                "lb-{}-{server}-{}",
                action.as_str_name(),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis())
            ),
            action: action as i32,
            server: server.to_string(),
            drain_timeout_secs: drain_timeout.as_secs().try_into().unwrap_or(u32::MAX),
            check,
        });
        req.set_timeout(deadline);
        let command = format!("LbServer {} {server}", action.as_str_name());
        match tokio::time::timeout(deadline + Duration::from_secs(2), client.lb_server(req)).await {
            Ok(Ok(r)) => Ok(r.into_inner()),
            Ok(Err(s)) => {
                if s.code() == tonic::Code::Unavailable {
                    *self.client.lock().await = None;
                    return Err(LbError::Unreachable {
                        lb: self.describe(),
                        target: self.agent.clone(),
                        reason: bbupgrade_common::tls::error_chain(&s),
                    });
                }
                if s.code() == tonic::Code::NotFound {
                    return Err(LbError::UnknownServer {
                        lb: format!("{} ({})", self.describe(), s.message()),
                        server: server.to_string(),
                    });
                }
                Err(LbError::Refused {
                    lb: self.describe(),
                    command,
                    answer: s.message().to_string(),
                })
            }
            Err(_) => {
                *self.client.lock().await = None;
                Err(LbError::Unreachable {
                    lb: self.describe(),
                    target: self.agent.clone(),
                    reason: format!("no answer to {command} within {deadline:?}"),
                })
            }
        }
    }
}

/// The admin state an agent reports, in the coordinator's terms.
pub fn admin_of(r: &LbServerResponse) -> AdminState {
    match r.admin() {
        LbAdminState::Out => AdminState::Maint,
        _ => AdminState::Ready,
    }
}

#[async_trait::async_trait]
impl LoadBalancer for NginxAgent {
    fn describe(&self) -> String {
        format!(
            "nginx through the agent '{}' at {}",
            self.agent_node, self.agent
        )
    }

    async fn server_state(&self, server: &str) -> Result<ServerState, LbError> {
        let r = self
            .call(LbAction::State, server, Duration::ZERO, false)
            .await?;
        Ok(ServerState {
            admin: admin_of(&r),
            operational: OperState::Unknown,
            current_sessions: 0,
        })
    }

    async fn drain(&self, server: &str, timeout: Duration) -> Result<DrainReport, LbError> {
        let r = self.call(LbAction::Drain, server, timeout, false).await?;
        if admin_of(&r) != AdminState::Maint {
            return Err(LbError::NotConfirmed {
                lb: self.describe(),
                server: server.to_string(),
                wanted: AdminState::Maint.to_string(),
                found: admin_of(&r).to_string(),
            });
        }
        Ok(DrainReport {
            waited: Duration::from_millis(r.waited_ms),
            sessions_at_start: r.old_workers,
        })
    }

    async fn enable(&self, server: &str) -> Result<(), LbError> {
        let r = self
            .call(LbAction::Enable, server, Duration::ZERO, false)
            .await?;
        if admin_of(&r) != AdminState::Ready {
            return Err(LbError::NotConfirmed {
                lb: self.describe(),
                server: server.to_string(),
                wanted: AdminState::Ready.to_string(),
                found: admin_of(&r).to_string(),
            });
        }
        Ok(())
    }

    async fn check_server(&self, server: &str) -> Result<(), LbError> {
        self.call(LbAction::State, server, Duration::ZERO, true)
            .await
            .map(|_| ())
    }
}
