//! Load-balancer drivers: take a node's server out of rotation before it stops and put it back after.
//!
//! Each kind (HAProxy, NGINX on this host or through an agent on the NGINX host, Apache httpd, Azure
//! Application Gateway, none) is one module implementing [`LoadBalancer`], selected by one
//! [`LbConfig`] variant in [`from_config_with_tls`]. A node behind several doors (HAProxy
//! `backends = [...]`, or `kind = "several"`: one load balancer for HTTP, another for Git over SSH)
//! is driven through [`several::Several`], which fans every call out, so callers see one driver.
//! NGINX names every upstream a node is in (`upstreams = [...]`, the `http` one and the `stream`
//! one) in one driver that edits them all and reloads once. What a run does with sessions still
//! open at the drain deadline is [`policy`]'s.

pub mod apache;
pub mod azure;
pub mod haproxy;
pub mod nginx;
pub mod nginx_agent;
pub mod none;
pub mod policy;
pub mod several;

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Whether the load balancer is allowed to send a server new traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminState {
    /// In rotation.
    Ready,
    /// Keeps its current sessions, gets no new ones.
    Drain,
    /// Out of rotation, health checks stopped.
    Maint,
}

/// What the load balancer's health checks say about a server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OperState {
    Up,
    Down,
    Starting,
    Stopping,
    Unknown,
}

impl fmt::Display for AdminState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AdminState::Ready => "ready",
            AdminState::Drain => "drain",
            AdminState::Maint => "maint",
        })
    }
}

impl fmt::Display for OperState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OperState::Up => "up",
            OperState::Down => "down",
            OperState::Starting => "starting",
            OperState::Stopping => "stopping",
            OperState::Unknown => "unknown",
        })
    }
}

/// A server's state as the load balancer reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerState {
    pub admin: AdminState,
    pub operational: OperState,
    pub current_sessions: u64,
}

/// What a successful drain took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DrainReport {
    pub waited: Duration,
    pub sessions_at_start: u64,
}

/// What went wrong with a load balancer; every message names the load balancer and what to do.
#[derive(Debug, thiserror::Error)]
pub enum LbError {
    /// Nothing was changed: the coordinator must not stop the node.
    #[error(
        "cannot reach {lb} through {target}: {reason}; the node was left in service — check the address and that the load balancer runs"
    )]
    Unreachable {
        lb: String,
        target: String,
        reason: String,
    },
    #[error(
        "{lb} has no server {server:?}; check the node's load-balancer server name in the inventory"
    )]
    UnknownServer { lb: String, server: String },
    #[error("{lb}: the backend does not exist; check the backend name in the inventory")]
    UnknownBackend { lb: String },
    #[error(
        "{lb}: server {server} still had {sessions} session(s) after {waited:?}; it is left draining (no new users) — wait and retry, raise the drain timeout, or put it back with enable"
    )]
    DrainTimeout {
        lb: String,
        server: String,
        sessions: u64,
        waited: Duration,
    },
    /// Sessions were left at the drain deadline and the drain policy says to halt.
    #[error(
        "at the drain deadline {left}{}; drain_policy = {policy}: the run halts and the node, not stopped, goes back in service — let those sessions end and resume, raise drain_secs, or set [timeouts] drain_policy = \"wait\" (bounded by drain_wait_secs)",
        policy::after_waiting(.waited_more)
    )]
    DrainHalted {
        left: String,
        policy: policy::DrainPolicy,
        waited_more: Duration,
    },
    #[error("{lb}: {command:?} was refused: {answer}")]
    Refused {
        lb: String,
        command: String,
        answer: String,
    },
    #[error(
        "{lb}: server {server} should now be {wanted} but reads back as {found}; check the load balancer's configuration and whether something else changes it"
    )]
    NotConfirmed {
        lb: String,
        server: String,
        wanted: String,
        found: String,
    },
    #[error("{lb}: cannot understand the answer to {command:?}: {reason}")]
    Parse {
        lb: String,
        command: String,
        reason: String,
    },
    #[error("invalid load-balancer settings: {0}")]
    Config(String),
}

/// One load balancer in front of a cluster; servers are named as the load balancer names them.
#[async_trait::async_trait]
pub trait LoadBalancer: Send + Sync {
    /// What this is, for messages and logs, e.g. `haproxy at unix:/run/haproxy.sock backend bitbucket`.
    fn describe(&self) -> String;

    /// The server's current state.
    async fn server_state(&self, server: &str) -> Result<ServerState, LbError>;

    /// Stops new traffic to `server`, waits up to `timeout` for its sessions to end, then takes it out
    /// entirely (health checks too) and reads the state back. On `DrainTimeout` it is left draining.
    async fn drain(&self, server: &str, timeout: Duration) -> Result<DrainReport, LbError>;

    /// Puts `server` back in rotation and reads the state back.
    async fn enable(&self, server: &str) -> Result<(), LbError>;

    /// Preflight: the server exists and the load balancer answers.
    async fn check_server(&self, server: &str) -> Result<(), LbError>;
}

/// The `[cluster.load_balancer]` table of the inventory, e.g. `kind = "haproxy"`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum LbConfig {
    Haproxy {
        /// `unix:/path`, `tcp:host:port`, or a plain socket path.
        socket: String,
        /// One backend (the older form; the same as `backends = ["..."]`).
        #[serde(default, skip_serializing_if = "String::is_empty")]
        backend: String,
        /// Every backend a node is in, e.g. `["bitbucket_http", "bitbucket_ssh"]`: drained and
        /// restored together, under the same server name.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        backends: Vec<String>,
        /// Where a node's server has another name in some backend: backend -> (the node's
        /// `lb_server` -> its name there), e.g. `{ bitbucket_ssh = { node1 = "node1_ssh" } }`.
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        server_names: BTreeMap<String, BTreeMap<String, String>>,
    },
    /// Open-source NGINX, edited on this host: the coordinator must run where the NGINX
    /// configuration lives (otherwise use `nginx-agent`).
    Nginx {
        /// The file holding the `upstream` block (the main file or one it includes).
        config: PathBuf,
        /// One upstream (the older form; the same as `upstreams = ["..."]`).
        #[serde(default, skip_serializing_if = "String::is_empty")]
        upstream: String,
        /// Every upstream a node is in, e.g. `["bitbucket", "bitbucket_ssh"]` (the `http` one and
        /// the `stream` one of Git over SSH): taken out and put back together, in one reload.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        upstreams: Vec<String>,
        /// Upstreams held in another file than `config`: upstream -> file, e.g.
        /// `{ bitbucket_ssh = "/etc/nginx/bitbucket-stream.conf" }`.
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        configs: BTreeMap<String, PathBuf>,
        /// Where a node's server has another address in some upstream: upstream -> (the node's
        /// `lb_server` -> its address there), e.g. `{ bitbucket_ssh = { "10.0.0.1:7990" = "10.0.0.1:7999" } }`.
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        server_names: BTreeMap<String, BTreeMap<String, String>>,
        /// `down` (default) marks the server down; `remove` comments its line out.
        #[serde(default)]
        mode: nginx::NginxMode,
        /// What `nginx -t -c` checks (default `/etc/nginx/nginx.conf`).
        main_config: Option<PathBuf>,
        /// NGINX's `-p` prefix, when it runs with one.
        prefix: Option<PathBuf>,
        /// The program (default `/usr/sbin/nginx`).
        nginx: Option<PathBuf>,
        /// The master's pid file (default `/run/nginx.pid`): reload by SIGHUP, old workers found.
        pid_file: Option<PathBuf>,
        /// Reload with this command instead of SIGHUP, e.g. `["systemctl", "reload", "nginx"]`.
        reload_command: Option<Vec<String>>,
    },
    /// Open-source NGINX on another host, edited by the agent there, which has an `[lb]` table
    /// (upstream file, mode, reload) in its own configuration.
    #[serde(rename = "nginx-agent")]
    NginxAgent {
        /// The agent's `host:port`.
        agent: String,
        /// The node id in that agent's certificate (checked on every connection).
        agent_node: String,
    },
    /// Apache httpd `mod_proxy_balancer` through its `balancer-manager` page.
    Apache {
        /// e.g. `http://127.0.0.1:8080/balancer-manager`.
        manager_url: String,
        /// The balancer's name without `balancer://`.
        balancer: String,
    },
    /// Azure Application Gateway: the node's address leaves and rejoins a backend pool via `az`.
    Azure {
        resource_group: String,
        gateway: String,
        pool: String,
        /// The `az` program (default: `az` on the PATH).
        az: Option<PathBuf>,
        /// The gateway's connection-draining timeout, waited after removal (default 60).
        drain_secs: Option<u64>,
    },
    /// Several load balancers before one cluster (e.g. Apache for HTTP, HAProxy for Git over SSH),
    /// drained and restored together. The inventory's `load_balancers = [...]` builds this.
    Several {
        members: Vec<LbConfig>,
    },
    None {},
}

impl LbConfig {
    /// The backends of an HAProxy entry: `backend`, then `backends`, without repeats.
    pub fn haproxy_backends(backend: &str, backends: &[String]) -> Vec<String> {
        nginx::one_and_many(backend, backends)
    }
}

/// Builds the driver a configuration asks for, for kinds that need no TLS material (all but
/// `nginx-agent`).
pub fn from_config(cfg: &LbConfig) -> Result<Box<dyn LoadBalancer>, LbError> {
    from_config_with_tls(cfg, None)
}

/// Builds the driver a configuration asks for; `tls` is the coordinator's own material, which
/// `nginx-agent` connects with.
pub fn from_config_with_tls(
    cfg: &LbConfig,
    tls: Option<&bbupgrade_common::tls::TlsMaterial>,
) -> Result<Box<dyn LoadBalancer>, LbError> {
    Ok(match cfg {
        LbConfig::Haproxy {
            socket,
            backend,
            backends,
            server_names,
        } => haproxy_from_config(socket, backend, backends, server_names)?,
        LbConfig::Nginx {
            config,
            upstream,
            upstreams,
            configs,
            server_names,
            mode,
            main_config,
            prefix,
            nginx,
            pid_file,
            reload_command,
        } => Box::new(nginx::Nginx::new(&nginx::NginxSettings {
            config: config.clone(),
            upstream: upstream.clone(),
            upstreams: upstreams.clone(),
            configs: configs.clone(),
            server_names: server_names.clone(),
            mode: *mode,
            main_config: main_config.clone(),
            prefix: prefix.clone(),
            nginx: nginx.clone(),
            pid_file: pid_file.clone(),
            reload_command: reload_command.clone(),
        })?),
        LbConfig::NginxAgent { agent, agent_node } => {
            let tls = tls.ok_or_else(|| {
                LbError::Config(
                    "kind = \"nginx-agent\" needs the coordinator's TLS material".into(),
                )
            })?;
            Box::new(nginx_agent::NginxAgent::new(agent, agent_node, tls)?)
        }
        LbConfig::Apache {
            manager_url,
            balancer,
        } => Box::new(apache::Apache::new(manager_url, balancer)?),
        LbConfig::Azure {
            resource_group,
            gateway,
            pool,
            az,
            drain_secs,
        } => Box::new(azure::Azure::new(&azure::AzureSettings {
            resource_group: resource_group.clone(),
            gateway: gateway.clone(),
            pool: pool.clone(),
            az: az.clone(),
            drain_secs: drain_secs.unwrap_or(azure::DEFAULT_DRAIN_SECS),
        })?),
        LbConfig::Several { members } => Box::new(several::Several::new(
            members
                .iter()
                .map(|m| from_config_with_tls(m, tls))
                .collect::<Result<_, _>>()?,
        )?),
        LbConfig::None {} => Box::new(none::NoLoadBalancer),
    })
}

/// HAProxy with one backend, or several drained together under the same server names.
fn haproxy_from_config(
    socket: &str,
    backend: &str,
    backends: &[String],
    server_names: &BTreeMap<String, BTreeMap<String, String>>,
) -> Result<Box<dyn LoadBalancer>, LbError> {
    let all = LbConfig::haproxy_backends(backend, backends);
    if let Some(unknown) = server_names.keys().find(|k| !all.contains(k)) {
        return Err(LbError::Config(format!(
            "server_names names backend {unknown:?}, which is not among the backends {all:?}"
        )));
    }
    let driver = |b: &String| {
        haproxy::Haproxy::new(socket, b)
            .map(|h| h.with_server_names(server_names.get(b).cloned().unwrap_or_default()))
    };
    match all.as_slice() {
        [] => Err(LbError::Config(
            "kind = \"haproxy\" needs `backends = [...]` (or `backend`)".into(),
        )),
        [one] => Ok(Box::new(driver(one)?)),
        several => Ok(Box::new(several::Several::new(
            several
                .iter()
                .map(|b| driver(b).map(|h| Box::new(h) as Box<dyn LoadBalancer>))
                .collect::<Result<_, _>>()?,
        )?)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_parses_from_toml_shapes() {
        let cfg: LbConfig = serde_json::from_str(
            r#"{"kind":"haproxy","socket":"unix:/run/haproxy.sock","backend":"bitbucket"}"#,
        )
        .unwrap();
        let lb = from_config(&cfg).unwrap();
        assert_eq!(
            lb.describe(),
            "haproxy at unix:/run/haproxy.sock backend bitbucket"
        );
        let cfg: LbConfig = serde_json::from_str(r#"{"kind":"none"}"#).unwrap();
        assert_eq!(cfg, LbConfig::None {});
        assert!(
            from_config(&cfg)
                .unwrap()
                .describe()
                .contains("NOT drained")
        );
        assert!(serde_json::from_str::<LbConfig>(r#"{"kind":"f5"}"#).is_err());
    }

    #[test]
    fn new_kinds_parse_from_toml() {
        let cfg: LbConfig = toml::from_str(
            "kind = \"nginx\"\nconfig = \"/etc/nginx/conf.d/bitbucket.conf\"\nupstream = \"bitbucket\"\n",
        )
        .unwrap();
        assert!(matches!(
            &cfg,
            LbConfig::Nginx {
                mode: nginx::NginxMode::Down,
                pid_file: None,
                ..
            }
        ));
        assert_eq!(
            from_config(&cfg).unwrap().describe(),
            "nginx upstream bitbucket in /etc/nginx/conf.d/bitbucket.conf"
        );
        let cfg: LbConfig = toml::from_str(
            "kind = \"nginx\"\nconfig = \"/etc/nginx/u.conf\"\nupstream = \"b\"\nmode = \"remove\"\nreload_command = [\"systemctl\", \"reload\", \"nginx\"]\n",
        )
        .unwrap();
        assert!(
            matches!(&cfg, LbConfig::Nginx { mode: nginx::NginxMode::Remove, reload_command: Some(c), .. } if c.len() == 3)
        );
        assert!(
            toml::from_str::<LbConfig>(
                "kind = \"nginx\"\nconfig = \"/x\"\nupstream = \"b\"\nmode = \"drain\"\n"
            )
            .is_err()
        );
        let cfg: LbConfig = toml::from_str(
            "kind = \"apache\"\nmanager_url = \"http://127.0.0.1:8080/balancer-manager\"\nbalancer = \"bitbucket\"\n",
        )
        .unwrap();
        assert!(
            from_config(&cfg)
                .unwrap()
                .describe()
                .contains("balancer://bitbucket")
        );
        let cfg: LbConfig = toml::from_str(
            "kind = \"azure\"\nresource_group = \"rg\"\ngateway = \"agw\"\npool = \"bitbucket\"\ndrain_secs = 30\n",
        )
        .unwrap();
        assert!(from_config(&cfg).unwrap().describe().contains("agw"));
    }

    #[test]
    fn haproxy_backends_and_several_load_balancers() {
        let cfg: LbConfig = toml::from_str(
            "kind = \"haproxy\"\nsocket = \"unix:/run/h.sock\"\nbackends = [\"bitbucket_http\", \"bitbucket_ssh\"]\n",
        )
        .unwrap();
        assert_eq!(
            from_config(&cfg).unwrap().describe(),
            "haproxy at unix:/run/h.sock backend bitbucket_http and haproxy at unix:/run/h.sock backend bitbucket_ssh"
        );
        assert_eq!(
            LbConfig::haproxy_backends("a", &["a".into(), "b".into()]),
            ["a", "b"]
        );
        let none: LbConfig =
            toml::from_str("kind = \"haproxy\"\nsocket = \"unix:/run/h.sock\"\n").unwrap();
        assert!(matches!(from_config(&none), Err(LbError::Config(m)) if m.contains("backends")));
        let bad: LbConfig = toml::from_str(
            "kind = \"haproxy\"\nsocket = \"unix:/run/h.sock\"\nbackends = [\"ok\", \"not ok\"]\n",
        )
        .unwrap();
        assert!(matches!(from_config(&bad), Err(LbError::Config(_))));
        let renamed: LbConfig = toml::from_str(
            "kind = \"haproxy\"\nsocket = \"unix:/run/h.sock\"\nbackends = [\"http\", \"ssh\"]\nserver_names = { ssh = { node1 = \"node1_ssh\" } }\n",
        )
        .unwrap();
        assert!(from_config(&renamed).is_ok());
        let stray: LbConfig = toml::from_str(
            "kind = \"haproxy\"\nsocket = \"unix:/run/h.sock\"\nbackends = [\"http\"]\nserver_names = { sshx = { node1 = \"n\" } }\n",
        )
        .unwrap();
        assert!(matches!(from_config(&stray), Err(LbError::Config(m)) if m.contains("sshx")));
        let cfg: LbConfig = toml::from_str(
            "kind = \"several\"\n[[members]]\nkind = \"apache\"\nmanager_url = \"http://127.0.0.1:8080/balancer-manager\"\nbalancer = \"bitbucket\"\n[[members]]\nkind = \"haproxy\"\nsocket = \"unix:/run/h.sock\"\nbackend = \"bitbucket_ssh\"\n",
        )
        .unwrap();
        let d = from_config(&cfg).unwrap().describe();
        assert!(
            d.contains("balancer://bitbucket") && d.ends_with("backend bitbucket_ssh"),
            "{d}"
        );
        assert!(matches!(
            from_config(&LbConfig::Several { members: vec![] }),
            Err(LbError::Config(_))
        ));
    }

    #[test]
    fn nginx_agent_parses_and_needs_tls() {
        let cfg: LbConfig = toml::from_str(
            "kind = \"nginx-agent\"\nagent = \"10.0.0.5:7443\"\nagent_node = \"lb1\"\n",
        )
        .unwrap();
        assert_eq!(
            cfg,
            LbConfig::NginxAgent {
                agent: "10.0.0.5:7443".into(),
                agent_node: "lb1".into()
            }
        );
        assert!(matches!(from_config(&cfg), Err(LbError::Config(m)) if m.contains("TLS")));
        assert!(
            toml::from_str::<LbConfig>("kind = \"nginx-agent\"\nagent = \"10.0.0.5:7443\"\n")
                .is_err()
        );
    }

    #[test]
    fn bad_haproxy_settings_are_refused() {
        for (socket, backend) in [
            ("unix:/run/h.sock", "bit bucket"),
            ("unix:/run/h.sock", ""),
            ("", "bitbucket"),
            ("tcp:nohostport", "bitbucket"),
            ("relative/path.sock", "bitbucket"),
        ] {
            let cfg = LbConfig::Haproxy {
                socket: socket.into(),
                backend: backend.into(),
                backends: vec![],
                server_names: BTreeMap::new(),
            };
            assert!(
                matches!(from_config(&cfg), Err(LbError::Config(_))),
                "{socket} {backend}"
            );
        }
    }
}
