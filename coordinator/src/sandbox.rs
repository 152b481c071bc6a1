//! A local cluster for the demo and the end-to-end tests: a private CA, simulated Bitbucket nodes
//! (`bitbucket-sim`), a real agent process per node over mutual TLS, optionally a real HAProxy in
//! front, and the inventory that ties them together. Everything it starts is stopped on drop.

use anyhow::{Context, Result, bail};
use bbupgrade_common::identity::Role;
use bbupgrade_common::pki::{Ca, IssueRequest};
use bbupgrade_common::tls::TlsFiles;
use bbupgrade_sim::archive::{ArchiveInfo, write_archive_with_program};
use bbupgrade_sim::cluster::{ClusterOptions, SimCluster, free_ports};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const ADMIN_TOKEN: &str = "sandbox-admin-token";
pub const AGENT_READY_TIMEOUT_SECS: u64 = 20;

/// Which load balancer fronts the sandbox.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SandboxLb {
    Haproxy,
    None,
}

#[derive(Clone, Debug)]
pub struct SandboxOptions {
    pub nodes: usize,
    pub from: String,
    pub to: String,
    pub payload_mib: u64,
    pub startup_ms: u64,
    pub lb: SandboxLb,
    /// The unprivileged user Bitbucket runs as when we are root.
    pub user_when_root: String,
    pub agent_bin: PathBuf,
    pub sim_bin: PathBuf,
}

/// A running sandbox; dropping it stops agents, nodes and the load balancer.
pub struct Sandbox {
    pub dir: PathBuf,
    pub inventory: PathBuf,
    pub pki: PathBuf,
    pub cluster_name: String,
    pub sim: SimCluster,
    pub from_archive: ArchiveInfo,
    pub to_archive: ArchiveInfo,
    pub agent_addrs: Vec<String>,
    pub agent_configs: Vec<PathBuf>,
    pub lb_url: Option<String>,
    pub haproxy_socket: Option<PathBuf>,
    pub run_user: Option<String>,
    agents: Vec<Option<Child>>,
    haproxy: Option<Child>,
    opts: SandboxOptions,
}

/// A binary next to this one (cargo puts them together), or named by an environment variable.
pub fn sibling_binary(env: &str, name: &str) -> Result<PathBuf> {
    if let Ok(p) = std::env::var(env) {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().context("locating this program")?;
    let dir = exe.parent().context("this program has no folder")?;
    let candidate = dir.join(name);
    if candidate.is_file() {
        return Ok(candidate);
    }
    // Test executables live in target/<profile>/deps.
    if let Some(up) = dir.parent() {
        let c = up.join(name);
        if c.is_file() {
            return Ok(c);
        }
    }
    bail!(
        "cannot find {name} next to {}; build the workspace first (`cargo build --release`) or set {env}",
        exe.display()
    )
}

fn chown_tree(root: &Path, uid: u32, gid: u32) -> Result<()> {
    let mut stack = vec![root.to_path_buf()];
    while let Some(path) = stack.pop() {
        nix::unistd::fchownat(
            nix::fcntl::AT_FDCWD,
            &path,
            Some(nix::unistd::Uid::from_raw(uid)),
            Some(nix::unistd::Gid::from_raw(gid)),
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .with_context(|| format!("changing the owner of {}", path.display()))?;
        if std::fs::symlink_metadata(&path)?.is_dir() {
            for entry in std::fs::read_dir(&path)? {
                stack.push(entry?.path());
            }
        }
    }
    Ok(())
}

/// The recommended HAProxy configuration for Bitbucket behind a rolling upgrade: health checks on
/// `/status`, retries with redispatch, an admin socket for the coordinator.
pub fn haproxy_config(socket: &Path, bind_port: u16, servers: &[(String, u16)]) -> String {
    let mut cfg = format!(
        "global\n    stats socket {} mode 600 level admin\n    stats timeout 2m\n\n\
defaults\n    mode http\n    timeout connect 2s\n    timeout client 120s\n    timeout server 120s\n    timeout queue 30s\n    retries 3\n    option redispatch 1\n    retry-on conn-failure empty-response response-timeout 503\n\n\
frontend bitbucket\n    bind 127.0.0.1:{bind_port}\n    default_backend bitbucket\n\n\
backend bitbucket\n    balance roundrobin\n    option httpchk GET /status\n    http-check expect status 200\n",
        socket.display()
    );
    for (name, port) in servers {
        cfg.push_str(&format!(
            "    server {name} 127.0.0.1:{port} check inter 500ms fall 2 rise 2\n"
        ));
    }
    cfg
}

impl Sandbox {
    pub fn create(dir: &Path, opts: SandboxOptions) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let dir = std::fs::canonicalize(dir)?;
        let root = nix::unistd::geteuid().is_root();
        let run_user = root.then(|| opts.user_when_root.clone());
        if root {
            // The Bitbucket user must be able to reach its install and home inside the sandbox.
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
            let mut p = dir.parent();
            while let Some(d) = p {
                if let Ok(m) = std::fs::metadata(d)
                    && m.permissions().mode() & 0o001 == 0
                {
                    bail!(
                        "{} is not searchable by other users; put the sandbox elsewhere (--dir)",
                        d.display()
                    );
                }
                p = d.parent();
            }
        }

        // PKI: a CA, the coordinator's certificate, one per agent.
        let pki = dir.join("pki");
        let ca = Ca::generate()?;
        ca.save(&pki)?;
        ca.issue(&IssueRequest::new(Role::Coordinator, "sandbox-admin"))?
            .save(&pki)?;

        // Releases and the simulated cluster on the old one.
        let archives = dir.join("archives");
        std::fs::create_dir_all(&archives)?;
        let from_archive =
            write_archive_with_program(&opts.from, &archives, opts.payload_mib, &opts.sim_bin)
                .with_context(|| format!("building the {} archive", opts.from))?;
        let to_archive =
            write_archive_with_program(&opts.to, &archives, opts.payload_mib, &opts.sim_bin)
                .with_context(|| format!("building the {} archive", opts.to))?;
        let sim = SimCluster::create(
            &dir.join("cluster"),
            ClusterOptions {
                nodes: opts.nodes,
                version: opts.from.clone(),
                program: opts.sim_bin.clone(),
                startup_ms: opts.startup_ms,
                admin_token: ADMIN_TOKEN.into(),
                payload_mib: opts.payload_mib,
                run_as_user: None,
            },
        )?;
        if let Some(user) = &run_user {
            let u = nix::unistd::User::from_name(user)?
                .with_context(|| format!("there is no user {user}"))?;
            chown_tree(sim.dir(), u.uid.as_raw(), u.gid.as_raw())?;
        }

        // One agent per node.
        let ports = free_ports(opts.nodes + 1)?;
        let mut agent_addrs = Vec::new();
        let mut agent_configs = Vec::new();
        for (i, node) in sim.nodes().iter().enumerate() {
            ca.issue(
                &IssueRequest::new(Role::Agent, &node.name).with_sans(["127.0.0.1", "localhost"]),
            )?
            .save(&pki)?;
            let tls = TlsFiles::in_pki_dir(&pki, Role::Agent, &node.name);
            let addr = format!("127.0.0.1:{}", ports[i]);
            let cfg = format!(
                "node_id = {:?}\nlisten = {:?}\nstate_dir = {:?}\n\n[tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n\n[bitbucket]\ninstall_root = {:?}\ncurrent_install = {:?}\nhome = {:?}\n{}status_url = {:?}\n\n[service]\nkind = \"scripts\"\n\n[limits]\nstop_timeout_secs = 60\nstart_timeout_secs = 120\n",
                node.name,
                addr,
                dir.join(format!("agents/{}", node.name)),
                tls.ca,
                tls.cert,
                tls.key,
                node.install_root,
                node.install_dir,
                node.home,
                run_user
                    .as_ref()
                    .map(|u| format!("user = {u:?}\n"))
                    .unwrap_or_default(),
                format!("{}/status", node.base_url),
            );
            let path = dir.join(format!("agents/{}.toml", node.name));
            std::fs::create_dir_all(dir.join("agents"))?;
            std::fs::write(&path, cfg)?;
            agent_addrs.push(addr);
            agent_configs.push(path);
        }

        let mut sandbox = Sandbox {
            inventory: dir.join("inventory.toml"),
            pki,
            cluster_name: "sandbox".into(),
            sim,
            from_archive,
            to_archive,
            agent_addrs,
            agent_configs,
            lb_url: None,
            haproxy_socket: None,
            run_user,
            agents: Vec::new(),
            haproxy: None,
            dir: dir.clone(),
            opts: opts.clone(),
        };
        for i in 0..opts.nodes {
            let child = sandbox.spawn_agent(i)?;
            sandbox.agents.push(Some(child));
        }
        if opts.lb == SandboxLb::Haproxy {
            sandbox.start_haproxy(ports[opts.nodes])?;
        }
        sandbox.write_inventory()?;
        Ok(sandbox)
    }

    fn spawn_agent(&self, i: usize) -> Result<Child> {
        let log = std::fs::File::create(
            self.dir
                .join(format!("agents/{}.log", self.sim.nodes()[i].name)),
        )?;
        let child = Command::new(&self.opts.agent_bin)
            .arg("--config")
            .arg(&self.agent_configs[i])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", self.opts.agent_bin.display()))?;
        Ok(child)
    }

    /// Waits until every agent accepts connections.
    pub fn wait_agents(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(AGENT_READY_TIMEOUT_SECS);
        for addr in &self.agent_addrs {
            while std::net::TcpStream::connect(addr).is_err() {
                if Instant::now() > deadline {
                    bail!(
                        "the agent at {addr} did not start; see {}/agents/*.log",
                        self.dir.display()
                    );
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    }

    /// Kills one agent (SIGKILL), as a crash would.
    pub fn kill_agent(&mut self, i: usize) {
        if let Some(mut c) = self.agents[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The agent process id, for tests that stop or freeze it.
    pub fn agent_pid(&self, i: usize) -> Option<u32> {
        self.agents[i].as_ref().map(|c| c.id())
    }

    pub fn restart_agent(&mut self, i: usize) -> Result<()> {
        self.kill_agent(i);
        let child = self.spawn_agent(i)?;
        self.agents[i] = Some(child);
        self.wait_agents()
    }

    fn start_haproxy(&mut self, port: u16) -> Result<()> {
        let haproxy = which("haproxy").context(
            "haproxy is not installed (apt-get install -y haproxy), or run the sandbox with --lb none",
        )?;
        let socket = self.dir.join("haproxy.sock");
        let servers: Vec<(String, u16)> = self
            .sim
            .nodes()
            .iter()
            .map(|n| (n.name.clone(), n.port))
            .collect();
        let cfg_path = self.dir.join("haproxy.cfg");
        std::fs::write(&cfg_path, haproxy_config(&socket, port, &servers))?;
        let log = std::fs::File::create(self.dir.join("haproxy.log"))?;
        let child = Command::new(haproxy)
            .arg("-f")
            .arg(&cfg_path)
            .arg("-db")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting haproxy")?;
        self.haproxy = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() || std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                bail!(
                    "haproxy did not start; see {}/haproxy.log",
                    self.dir.display()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.lb_url = Some(format!("http://127.0.0.1:{port}"));
        self.haproxy_socket = Some(socket);
        Ok(())
    }

    fn write_inventory(&self) -> Result<()> {
        let tls = TlsFiles::in_pki_dir(&self.pki, Role::Coordinator, "sandbox-admin");
        let token = self.dir.join("admin.token");
        std::fs::write(&token, format!("{ADMIN_TOKEN}\n"))?;
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600))?;
        let lb = match &self.haproxy_socket {
            Some(s) => format!(
                "load_balancer = {{ kind = \"haproxy\", socket = {:?}, backend = \"bitbucket\" }}\n",
                format!("unix:{}", s.display())
            ),
            None => "load_balancer = { kind = \"none\" }\n".to_string(),
        };
        let mut inv = format!(
            "# Written by the bbupgrade sandbox.\ntls = {{ ca = {:?}, cert = {:?}, key = {:?} }}\nstate = {:?}\n\n[timeouts]\ndrain_secs = 60\nstop_secs = 60\nstart_secs = 120\nactive_secs = 60\nsoak_secs = 1\nagent_connect_ms = 3000\n\n[[clusters]]\nname = \"{}\"\nbitbucket_url = {:?}\nbitbucket_node_urls = {:?}\ntoken_file = {:?}\n{lb}",
            tls.ca,
            tls.cert,
            tls.key,
            format!("sqlite:{}", self.dir.join("journal.db").display()),
            self.cluster_name,
            self.lb_url
                .clone()
                .unwrap_or_else(|| self.sim.nodes()[0].base_url.clone()),
            self.sim
                .nodes()
                .iter()
                .map(|n| n.base_url.clone())
                .collect::<Vec<_>>(),
            token,
        );
        for (node, addr) in self.sim.nodes().iter().zip(&self.agent_addrs) {
            inv.push_str(&format!(
                "\n[[clusters.nodes]]\nid = {:?}\nagent = {:?}\n",
                node.name, addr
            ));
        }
        std::fs::write(&self.inventory, inv)?;
        Ok(())
    }

    /// Starts every node through its agent's service manager, as the Bitbucket user.
    pub async fn start_nodes(&self) -> Result<()> {
        let inv = crate::inventory::Inventory::load(&self.inventory)?;
        let tls = inv.tls.load()?;
        let cluster = inv.cluster(&self.cluster_name)?;
        let starts = cluster.nodes.iter().map(|node| {
            let tls = tls.clone();
            async move {
                let mut c = crate::agents::connect(node, &tls, Duration::from_secs(5)).await?;
                let d = Duration::from_secs(120);
                crate::agents::call(
                    &node.id,
                    d,
                    c.start(crate::agents::request(
                        bbupgrade_common::proto::StartRequest {
                            operation_id: format!("sandbox-initial-start-{}", std::process::id()),
                            timeout_secs: 120,
                        },
                        d,
                    )),
                )
                .await
            }
        });
        for r in futures::future::join_all(starts).await {
            r?;
        }
        self.wait_lb_up(Duration::from_secs(20)).await
    }

    /// Waits until the load balancer's health checks see every node up.
    pub async fn wait_lb_up(&self, timeout: Duration) -> Result<()> {
        let Some(socket) = &self.haproxy_socket else {
            return Ok(());
        };
        let lb = crate::loadbalancer::from_config(&crate::loadbalancer::LbConfig::Haproxy {
            socket: format!("unix:{}", socket.display()),
            backend: "bitbucket".into(),
        })?;
        let deadline = Instant::now() + timeout;
        for node in self.sim.nodes() {
            loop {
                let state = lb.server_state(&node.name).await?;
                if state.operational == crate::loadbalancer::OperState::Up {
                    break;
                }
                if Instant::now() > deadline {
                    bail!(
                        "haproxy still sees {} as {:?}",
                        node.name,
                        state.operational
                    );
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Ok(())
    }

    /// Where traffic goes: the load balancer, else the first node.
    pub fn traffic_url(&self) -> String {
        self.lb_url
            .clone()
            .unwrap_or_else(|| self.sim.nodes()[0].base_url.clone())
    }
}

fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        for i in 0..self.agents.len() {
            self.kill_agent(i);
        }
        if let Some(mut h) = self.haproxy.take() {
            let _ = h.kill();
            let _ = h.wait();
        }
        let _ = self.sim.stop_all();
        self.sim.kill_all();
    }
}
