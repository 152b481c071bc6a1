//! NGINX (open source, no runtime API) edited on the coordinator's own host (`kind = "nginx"`): a
//! thin async driver over [`bbupgrade_common::nginx::NginxHost`], which marks the server `down` in
//! its upstream block (or comments it out), checks with `nginx -t`, reloads and waits for old
//! workers. When NGINX runs elsewhere, an agent there does the same (`kind = "nginx-agent"`,
//! [`super::nginx_agent`]).

use std::sync::Arc;
use std::time::Duration;

pub use bbupgrade_common::nginx::{
    BACKUP_SUFFIX, COMMAND_TIMEOUT_SECS, DEFAULT_MAIN_CONFIG, DEFAULT_NGINX, DEFAULT_PID_FILE,
    DRAIN_POLL_MS, NginxEditError, NginxError, NginxHost, NginxMode, NginxSettings, REMOVED_MARKER,
    ServerAdmin, edit_server, is_shutting_down, mark_server, one_and_many, parse_ppid,
    remove_server, server_admin_state,
};

use super::{AdminState, DrainReport, LbError, LoadBalancer, OperState, ServerState};

/// The admin state the rest of the coordinator speaks: a server NGINX leaves out is in maintenance.
pub fn admin_state(a: ServerAdmin) -> AdminState {
    match a {
        ServerAdmin::In => AdminState::Ready,
        ServerAdmin::Out => AdminState::Maint,
    }
}

/// An NGINX error as a load-balancer error naming `lb`.
pub fn lb_error(lb: String, e: NginxError) -> LbError {
    match e {
        NginxError::Config(m) => LbError::Config(m),
        NginxError::Unreachable { target, reason } => LbError::Unreachable { lb, target, reason },
        NginxError::UnknownServer(NginxEditError::NoServer {
            upstream,
            server,
            found,
        }) => LbError::UnknownServer {
            lb: format!("{lb} (`upstream {upstream}` lists: {found})"),
            server,
        },
        e @ NginxError::UnknownUpstream(..) => LbError::UnknownBackend {
            lb: format!("{lb} ({e})"),
        },
        NginxError::DrainTimeout {
            server,
            workers,
            waited,
        } => LbError::DrainTimeout {
            lb: format!("{lb} (old worker processes still finishing requests)"),
            server,
            sessions: workers,
            waited,
        },
        NginxError::Refused { command, answer } => LbError::Refused {
            lb,
            command,
            answer,
        },
        NginxError::NotConfirmed {
            server,
            wanted,
            found,
        } => LbError::NotConfirmed {
            lb,
            server,
            wanted: admin_state(wanted).to_string(),
            found: admin_state(found).to_string(),
        },
        other @ NginxError::UnknownServer(_) => LbError::Refused {
            lb,
            command: "edit".into(),
            answer: other.to_string(),
        },
    }
}

/// One upstream of an NGINX on this host.
#[derive(Debug, Clone)]
pub struct Nginx {
    host: Arc<NginxHost>,
}

impl Nginx {
    pub fn new(s: &NginxSettings) -> Result<Self, LbError> {
        let host = NginxHost::new(s).map_err(|e| lb_error(String::new(), e))?;
        Ok(Self {
            host: Arc::new(host),
        })
    }

    /// Runs a blocking NGINX operation off the executor.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&NginxHost) -> Result<T, NginxError> + Send + 'static,
    ) -> Result<T, LbError> {
        let host = self.host.clone();
        tokio::task::spawn_blocking(move || f(&host))
            .await
            .map_err(|e| LbError::Config(format!("a blocking task failed: {e}")))?
            .map_err(|e| lb_error(self.describe(), e))
    }
}

#[async_trait::async_trait]
impl LoadBalancer for Nginx {
    fn describe(&self) -> String {
        self.host.describe()
    }

    async fn server_state(&self, server: &str) -> Result<ServerState, LbError> {
        let server = server.to_string();
        let admin = self.blocking(move |h| h.state(&server)).await?;
        Ok(ServerState {
            admin: admin_state(admin),
            // Open-source NGINX does not expose its view of the servers' health.
            operational: OperState::Unknown,
            current_sessions: 0,
        })
    }

    async fn drain(&self, server: &str, timeout: Duration) -> Result<DrainReport, LbError> {
        let server = server.to_string();
        let d = self.blocking(move |h| h.drain(&server, timeout)).await?;
        Ok(DrainReport {
            waited: d.waited,
            sessions_at_start: d.old_workers,
        })
    }

    async fn enable(&self, server: &str) -> Result<(), LbError> {
        let server = server.to_string();
        self.blocking(move |h| h.enable(&server)).await.map(|_| ())
    }

    async fn check_server(&self, server: &str) -> Result<(), LbError> {
        let server = server.to_string();
        self.blocking(move |h| h.check(&server)).await.map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_load_balancer() {
        let e = lb_error(
            "nginx upstream b in /x".into(),
            NginxError::UnknownServer(NginxEditError::NoServer {
                upstream: "b".into(),
                server: "a:1".into(),
                found: "c:2".into(),
            }),
        );
        assert!(matches!(&e, LbError::UnknownServer { server, .. } if server == "a:1"));
        assert!(e.to_string().contains("nginx upstream b in /x"), "{e}");
        let bad = NginxSettings {
            config: "relative.conf".into(),
            upstream: "b".into(),
            mode: NginxMode::Down,
            main_config: None,
            prefix: None,
            nginx: None,
            pid_file: None,
            ..Default::default()
        };
        assert!(matches!(Nginx::new(&bad), Err(LbError::Config(_))));
        assert_eq!(admin_state(ServerAdmin::Out), AdminState::Maint);
    }
}
