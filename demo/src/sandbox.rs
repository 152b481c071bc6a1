//! A local cluster for the demo and the end-to-end tests: a private CA, simulated Bitbucket nodes
//! (`bitbucket-sim`), a real agent process per node over mutual TLS, optionally a real HAProxy,
//! NGINX (edited by the coordinator, or by an extra agent with an `[lb]` role) or Apache httpd in
//! front, and the inventory that ties them together. The nodes run under the product's scripts or
//! an init.d script each (`initd`). Everything it starts is stopped on drop.

use anyhow::{Context, Result, bail};
use bbupgrade_common::identity::Role;
use bbupgrade_common::pki::{Ca, IssueRequest};
use bbupgrade_common::tls::TlsFiles;
use bbupgrade_sim::archive::{ArchiveInfo, write_archive_with_program};
use bbupgrade_sim::cluster::{ClusterOptions, NodeSetup, SimCluster, SimNode, free_ports};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod initd;
pub use initd::{
    INITD_NAME, SandboxService, ServiceChange, ServiceDefinition, initd_script, render_changes,
};

pub const ADMIN_TOKEN: &str = "sandbox-admin-token";
/// The sandbox's Bitbucket system administrator for HTTP Basic.
pub const ADMIN_USER: &str = "admin";
pub const ADMIN_PASSWORD: &str = "sandbox-admin-password";
pub const AGENT_READY_TIMEOUT_SECS: u64 = 20;
/// The node id of the load-balancer agent of [`SandboxLb::NginxAgent`].
pub const LB_AGENT_NODE: &str = "lb1";

/// Which load balancer fronts the sandbox.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SandboxLb {
    Haproxy,
    Nginx,
    /// NGINX edited by an extra agent (node id [`LB_AGENT_NODE`]) with an `[lb]` role.
    NginxAgent,
    Apache,
    None,
}

/// Where Debian's apache2 keeps its modules.
pub const APACHE_MODULES_DIR: &str = "/usr/lib/apache2/modules";
/// How long NGINX or Apache get to stop on SIGTERM before SIGKILL.
pub const LB_STOP_GRACE_MS: u64 = 5000;

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
    /// Without HAProxy installed, front the nodes with the simulator's stand-in (the demo) instead
    /// of failing (the tests, which need the real one).
    pub lb_standin: bool,
    /// How the nodes and the coordinator meet Bitbucket's API.
    pub bitbucket: BitbucketForm,
    /// How the agents run Bitbucket: the product's scripts, or an init.d script per node.
    pub service: SandboxService,
}

/// The forms of the real product the sandbox can present (BITBUCKET-FACTS.md); the default is the
/// product as installed: no node names, blank fields absent, and a Bearer token.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BitbucketForm {
    /// Start nodes with `-Dcluster.node.name` and put `bitbucket_name` in the inventory.
    pub node_names: bool,
    /// OFFLINE and starting rows carry `null` instead of leaving fields out.
    pub null_fields: bool,
    /// The inventory authenticates with HTTP Basic (a system administrator's user and password).
    pub basic_auth: bool,
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
    /// Each node's init.d script, as written (empty with [`SandboxService::Scripts`]).
    pub service_definitions: Vec<ServiceDefinition>,
    pub lb_url: Option<String>,
    /// The load balancer's Git-over-SSH front door, `HOST:PORT`, when it has one (HAProxy).
    pub lb_ssh_addr: Option<String>,
    /// The port the SSH front door binds, when the load balancer has one.
    lb_ssh_port: u16,
    pub haproxy_socket: Option<PathBuf>,
    /// The stand-in balancer's second process, in TCP mode for Git over SSH, and its runtime-API
    /// socket (real HAProxy fronts both doors in one process).
    ssh_standin: Option<Child>,
    pub standin_ssh_socket: Option<PathBuf>,
    /// The inventory's load balancer for NGINX or Apache (HAProxy is `haproxy_socket`).
    pub lb_config: Option<bbupgrade::loadbalancer::LbConfig>,
    /// Each node's server in the load balancer, when it is not the node's name.
    pub lb_servers: Vec<String>,
    pub run_user: Option<String>,
    agents: Vec<Option<Child>>,
    haproxy: Option<Child>,
    /// NGINX or Apache, in a process group of its own (its workers die with it).
    lb_process: Option<Child>,
    /// The agent with the `[lb]` role ([`SandboxLb::NginxAgent`]): its config, address and process.
    pub lb_agent_config: Option<PathBuf>,
    pub lb_agent_addr: Option<String>,
    lb_agent: Option<Child>,
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

fn chown_one(path: &Path, uid: u32, gid: u32) -> Result<()> {
    nix::unistd::fchownat(
        nix::fcntl::AT_FDCWD,
        path,
        Some(nix::unistd::Uid::from_raw(uid)),
        Some(nix::unistd::Gid::from_raw(gid)),
        nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
    )
    .with_context(|| format!("changing the owner of {}", path.display()))
}

fn chown_tree(root: &Path, uid: u32, gid: u32) -> Result<()> {
    let mut stack = vec![root.to_path_buf()];
    while let Some(path) = stack.pop() {
        chown_one(&path, uid, gid)?;
        if std::fs::symlink_metadata(&path)?.is_dir() {
            for entry in std::fs::read_dir(&path)? {
                stack.push(entry?.path());
            }
        }
    }
    Ok(())
}

/// Creates the sandbox's folder and resolves it. As root, Bitbucket runs as another user, who
/// must reach its install and home inside: the folder becomes 0755, and a parent other users
/// cannot search is refused.
fn prepare_dir(dir: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let dir = std::fs::canonicalize(dir)?;
    if !nix::unistd::geteuid().is_root() {
        return Ok(dir);
    }
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
    for d in dir.ancestors().skip(1) {
        if let Ok(m) = std::fs::metadata(d)
            && m.permissions().mode() & 0o001 == 0
        {
            bail!(
                "{} is not searchable by other users; put the sandbox elsewhere (--dir), or chmod o+x {}",
                d.display(),
                d.display()
            );
        }
    }
    Ok(dir)
}

/// The two simulated releases, in `dir/archives`.
fn build_archives(dir: &Path, opts: &SandboxOptions) -> Result<(ArchiveInfo, ArchiveInfo)> {
    let archives = dir.join("archives");
    std::fs::create_dir_all(&archives)?;
    let build = |version: &str| {
        write_archive_with_program(version, &archives, opts.payload_mib, &opts.sim_bin)
            .with_context(|| format!("building the {version} archive"))
    };
    Ok((build(&opts.from)?, build(&opts.to)?))
}

/// The simulated cluster on the old release, in `dir/cluster`. With a Bitbucket user (root),
/// its files are that user's; under init.d the installs stay root's, as the agent runs their
/// scripts as root and refuses scripts the Bitbucket user could edit.
fn create_cluster(dir: &Path, opts: &SandboxOptions, run_user: Option<&str>) -> Result<SimCluster> {
    let sim = SimCluster::create_with(
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
        None,
        NodeSetup {
            configure_names: opts.bitbucket.node_names,
            admin_login: Some((ADMIN_USER.into(), ADMIN_PASSWORD.into())),
            ..NodeSetup::default()
        },
    )?;
    if opts.bitbucket.null_fields {
        sim.set_shared_property("sim.zdu.blank.fields", "null")?;
    }
    let Some(user) = run_user else {
        return Ok(sim);
    };
    let u =
        nix::unistd::User::from_name(user)?.with_context(|| format!("there is no user {user}"))?;
    chown_tree(sim.dir(), u.uid.as_raw(), u.gid.as_raw())?;
    if opts.service == SandboxService::Initd {
        chown_one(sim.dir(), 0, 0)?;
        for node in sim.nodes() {
            if let Some(node_dir) = node.install_root.parent() {
                chown_one(node_dir, 0, 0)?;
            }
            chown_tree(&node.install_root, 0, 0)?;
        }
    }
    Ok(sim)
}

/// The recommended HAProxy configuration for Bitbucket behind a rolling upgrade: health checks on
/// `/status`, retries with redispatch, an admin socket for the coordinator.
pub fn haproxy_config(socket: &Path, bind_port: u16, servers: &[(String, u16)]) -> String {
    haproxy_config_with_balance(socket, bind_port, servers, "roundrobin")
}

/// [`haproxy_config`] with another balancing algorithm (e.g. `first`, to skew traffic on purpose).
pub fn haproxy_config_with_balance(
    socket: &Path,
    bind_port: u16,
    servers: &[(String, u16)],
    balance: &str,
) -> String {
    haproxy_config_with_ssh(socket, bind_port, servers, balance, None)
}

/// The HAProxy backend of the Git-over-SSH front door.
pub const HAPROXY_SSH_BACKEND: &str = "bitbucket_ssh";

/// [`haproxy_config_with_balance`] with, when `ssh` is given (`(bind port, [(server, node's SSH
/// port)])`), Git over SSH as a second front door: a `mode tcp` frontend and backend
/// ([`HAPROXY_SSH_BACKEND`]) whose servers have the same names as in the HTTP backend, checked by
/// a TCP connect (a node opens its SSH port once it runs and closes it when it stops).
pub fn haproxy_config_with_ssh(
    socket: &Path,
    bind_port: u16,
    servers: &[(String, u16)],
    balance: &str,
    ssh: Option<(u16, &[(String, u16)])>,
) -> String {
    let mut cfg = format!(
        "global\n    stats socket {} mode 600 level admin\n    stats timeout 2m\n\n\
defaults\n    mode http\n    timeout connect 2s\n    timeout client 120s\n    timeout server 120s\n    timeout queue 30s\n    retries 3\n    option redispatch 1\n\n\
frontend bitbucket\n    bind 127.0.0.1:{bind_port}\n    default_backend bitbucket\n\n\
backend bitbucket\n    balance {balance}\n    retry-on conn-failure empty-response response-timeout 503\n    option httpchk GET /status\n    http-check expect status 200\n",
        socket.display()
    );
    for (name, port) in servers {
        cfg.push_str(&format!(
            "    server {name} 127.0.0.1:{port} check inter 500ms fall 2 rise 2\n"
        ));
    }
    if let Some((ssh_port, ssh_servers)) = ssh {
        cfg.push_str(&format!(
            "\nfrontend {HAPROXY_SSH_BACKEND}\n    mode tcp\n    bind 127.0.0.1:{ssh_port}\n    default_backend {HAPROXY_SSH_BACKEND}\n\n\
backend {HAPROXY_SSH_BACKEND}\n    mode tcp\n    balance {balance}\n"
        ));
        for (name, port) in ssh_servers {
            cfg.push_str(&format!(
                "    server {name} 127.0.0.1:{port} check inter 500ms fall 2 rise 2\n"
            ));
        }
    }
    cfg
}

/// Git over SSH through NGINX's `stream` module: the port it listens on, the included file with
/// the `upstream` of the nodes' SSH ports, and the module to load (`None`: built in).
pub struct NginxStream<'a> {
    pub bind_port: u16,
    pub upstream_file: &'a Path,
    pub module: Option<&'a Path>,
}

/// The `stream` upstream of the sandbox's NGINX.
pub const NGINX_SSH_UPSTREAM: &str = "bitbucket_ssh";

/// NGINX's main configuration for the sandbox: everything under `dir`, the upstream in an included
/// file (what the coordinator edits), retries on errors and 502/503 to the next server.
///
/// Client keep-alive is off: on a reload, old workers close their idle keep-alive connections,
/// which races with a client sending its next request on one (a reset), and a `git-upload-pack`
/// POST is not retried by clients. Without keep-alive every request has its own connection.
pub fn nginx_config(dir: &Path, upstream_file: &Path, bind_port: u16) -> String {
    nginx_config_with_stream(dir, upstream_file, bind_port, None)
}

/// [`nginx_config`] with, when `stream` is given, Git over SSH as a second front door: a `stream`
/// server proxying TCP to [`NGINX_SSH_UPSTREAM`] (trying the next node when one refuses).
pub fn nginx_config_with_stream(
    dir: &Path,
    upstream_file: &Path,
    bind_port: u16,
    stream: Option<&NginxStream>,
) -> String {
    let d = dir.display();
    let load = stream
        .and_then(|s| s.module)
        .map(|m| format!("load_module {};\n", m.display()))
        .unwrap_or_default();
    let stream_block = stream.map_or(String::new(), |s| {
        format!(
            "\nstream {{\n    include {};\n\n    server {{\n        listen 127.0.0.1:{};\n        proxy_pass {NGINX_SSH_UPSTREAM};\n        proxy_connect_timeout 2s;\n        proxy_timeout 120s;\n        proxy_next_upstream on;\n        proxy_next_upstream_tries 3;\n    }}\n}}\n",
            s.upstream_file.display(),
            s.bind_port
        )
    });
    format!(
        "{load}worker_processes 2;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\nevents {{\n    worker_connections 1024;\n}}\n\n\
http {{\n    access_log off;\n    keepalive_timeout 0;\n    client_body_temp_path {d}/tmp/body;\n    proxy_temp_path {d}/tmp/proxy;\n    fastcgi_temp_path {d}/tmp/fastcgi;\n    uwsgi_temp_path {d}/tmp/uwsgi;\n    scgi_temp_path {d}/tmp/scgi;\n    client_max_body_size 0;\n\n    include {};\n\n\
    server {{\n        listen 127.0.0.1:{bind_port};\n        location / {{\n            proxy_pass http://bitbucket;\n            proxy_http_version 1.1;\n            proxy_set_header Connection \"\";\n            proxy_set_header Host $http_host;\n            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;\n            proxy_connect_timeout 2s;\n            proxy_read_timeout 120s;\n            proxy_buffering off;\n            proxy_request_buffering off;\n            proxy_next_upstream error timeout http_502 http_503 non_idempotent;\n            proxy_next_upstream_tries 3;\n        }}\n    }}\n}}\n{stream_block}",
        upstream_file.display()
    )
}

/// The included upstream file: one `server` line per node.
pub fn nginx_upstream(servers: &[u16]) -> String {
    nginx_upstream_named("bitbucket", servers, "    keepalive 16;\n")
}

/// An upstream file for `name`: one `server` line per node port, then `tail`.
pub fn nginx_upstream_named(name: &str, servers: &[u16], tail: &str) -> String {
    let mut cfg = format!(
        "# The Bitbucket nodes; bbupgrade marks a node `down` while it is upgraded.\nupstream {name} {{\n"
    );
    for port in servers {
        cfg.push_str(&format!(
            "    server 127.0.0.1:{port} max_fails=1 fail_timeout=2s;\n"
        ));
    }
    cfg.push_str(tail);
    cfg.push_str("}\n");
    cfg
}

/// Apache httpd's configuration for the sandbox: `mod_proxy_balancer` with its balancer-manager.
pub fn apache_config(dir: &Path, bind_port: u16, servers: &[u16]) -> String {
    let m = APACHE_MODULES_DIR;
    let d = dir.display();
    let user = if nix::unistd::geteuid().is_root() {
        "User nobody\nGroup nogroup\n"
    } else {
        ""
    };
    let mut cfg = format!(
        "ServerRoot {d}\nServerName 127.0.0.1\nListen 127.0.0.1:{bind_port}\nPidFile {d}/httpd.pid\nErrorLog {d}/error.log\nLogLevel warn\n{user}DefaultRuntimeDir {d}\nMutex file:{d} default\n\
LoadModule mpm_event_module {m}/mod_mpm_event.so\nLoadModule authz_core_module {m}/mod_authz_core.so\nLoadModule authz_host_module {m}/mod_authz_host.so\nLoadModule proxy_module {m}/mod_proxy.so\nLoadModule proxy_http_module {m}/mod_proxy_http.so\nLoadModule proxy_balancer_module {m}/mod_proxy_balancer.so\nLoadModule lbmethod_byrequests_module {m}/mod_lbmethod_byrequests.so\nLoadModule slotmem_shm_module {m}/mod_slotmem_shm.so\n\
Timeout 120\nKeepAlive On\nProxyTimeout 120\n\n<Proxy balancer://bitbucket>\n"
    );
    for port in servers {
        cfg.push_str(&format!(
            "    BalancerMember http://127.0.0.1:{port} retry=2 connectiontimeout=2\n"
        ));
    }
    cfg.push_str(
        "    ProxySet lbmethod=byrequests failonstatus=502,503\n</Proxy>\n\n<Location /balancer-manager>\n    SetHandler balancer-manager\n    Require ip 127.0.0.1\n</Location>\nProxyPass /balancer-manager !\nProxyPass / balancer://bitbucket/\nProxyPassReverse / balancer://bitbucket/\n",
    );
    cfg
}

impl Sandbox {
    pub fn create(dir: &Path, opts: SandboxOptions) -> Result<Self> {
        let dir = prepare_dir(dir)?;
        let run_user = nix::unistd::geteuid()
            .is_root()
            .then(|| opts.user_when_root.clone());

        // PKI: a CA and the coordinator's certificate (each agent's comes with its config).
        let pki = dir.join("pki");
        let ca = Ca::generate()?;
        ca.save(&pki)?;
        ca.issue(&IssueRequest::new(Role::Coordinator, "sandbox-admin"))?
            .save(&pki)?;

        let (from_archive, to_archive) = build_archives(&dir, &opts)?;
        let sim = create_cluster(&dir, &opts, run_user.as_deref())?;
        let service_definitions = match opts.service {
            SandboxService::Scripts => Vec::new(),
            SandboxService::Initd => {
                initd::write_initd_scripts(&dir, sim.nodes(), run_user.as_deref())?
            }
        };
        // One per agent, the load balancer's, the load-balancer agent's, and the SSH front door's.
        let ports = free_ports(opts.nodes + 3)?;
        let mut sandbox = Sandbox {
            inventory: dir.join("inventory.toml"),
            pki,
            cluster_name: "sandbox".into(),
            sim,
            from_archive,
            to_archive,
            agent_addrs: ports[..opts.nodes]
                .iter()
                .map(|p| format!("127.0.0.1:{p}"))
                .collect(),
            agent_configs: Vec::new(),
            service_definitions,
            lb_url: None,
            lb_ssh_addr: None,
            lb_ssh_port: ports[opts.nodes + 2],
            haproxy_socket: None,
            ssh_standin: None,
            standin_ssh_socket: None,
            lb_config: None,
            lb_servers: Vec::new(),
            run_user,
            agents: Vec::new(),
            haproxy: None,
            lb_process: None,
            lb_agent_config: None,
            lb_agent_addr: None,
            lb_agent: None,
            dir,
            opts,
        };
        sandbox.write_agent_configs(&ca)?;
        for i in 0..sandbox.opts.nodes {
            let child = sandbox.spawn_agent(i)?;
            sandbox.agents.push(Some(child));
        }
        sandbox.start_lb(
            &ca,
            ports[sandbox.opts.nodes],
            ports[sandbox.opts.nodes + 1],
        )?;
        sandbox.write_inventory()?;
        Ok(sandbox)
    }

    /// Issues each node's agent certificate and writes its config to `agents/<node>.toml`.
    fn write_agent_configs(&mut self, ca: &Ca) -> Result<()> {
        std::fs::create_dir_all(self.dir.join("agents"))?;
        for (i, node) in self.sim.nodes().iter().enumerate() {
            ca.issue(
                &IssueRequest::new(Role::Agent, &node.name).with_sans(["127.0.0.1", "localhost"]),
            )?
            .save(&self.pki)?;
            let path = self.dir.join(format!("agents/{}.toml", node.name));
            std::fs::write(&path, self.agent_config(i))?;
            self.agent_configs.push(path);
        }
        Ok(())
    }

    /// Node `i`'s agent config: its address, state dir, TLS files, the node's install and home,
    /// and how it runs Bitbucket (init.d script or the product's scripts).
    fn agent_config(&self, i: usize) -> String {
        let node = &self.sim.nodes()[i];
        let tls = TlsFiles::in_pki_dir(&self.pki, Role::Agent, &node.name);
        let service = match self.service_definitions.get(i) {
            Some(d) => format!("kind = \"initd\"\npath = {:?}", d.path),
            None => "kind = \"scripts\"".to_string(),
        };
        format!(
            "node_id = {:?}\nlisten = {:?}\nstate_dir = {:?}\n\n[tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\ncrl = {:?}\nallowed_coordinators = [\"sandbox-admin\"]\n\n{}\n[service]\n{service}\n\n[limits]\nstop_timeout_secs = 60\nstart_timeout_secs = 120\n\n[stage]\nurl_hosts = [\"127.0.0.1\"]\n",
            node.name,
            self.agent_addrs[i],
            self.dir.join(format!("agents/{}", node.name)),
            tls.ca,
            tls.cert,
            tls.key,
            self.pki.join(bbupgrade_common::pki::CRL_FILE),
            self.bitbucket_section(node),
        )
    }

    /// An agent config's `[bitbucket]` section for `node`: its install, home, user and status URL.
    fn bitbucket_section(&self, node: &SimNode) -> String {
        format!(
            "[bitbucket]\ninstall_root = {:?}\ncurrent_install = {:?}\nhome = {:?}\n{}status_url = {:?}\n",
            node.install_root,
            node.install_dir,
            node.home,
            self.run_user
                .as_ref()
                .map(|u| format!("user = {u:?}\n"))
                .unwrap_or_default(),
            format!("{}/status", node.base_url),
        )
    }

    /// Starts the load balancer `opts.lb` on `port` (the NGINX agent on `agent_port`).
    fn start_lb(&mut self, ca: &Ca, port: u16, agent_port: u16) -> Result<()> {
        match self.opts.lb {
            SandboxLb::Haproxy => self.start_haproxy(port, "roundrobin"),
            SandboxLb::Nginx => self.start_nginx(port),
            SandboxLb::NginxAgent => {
                self.start_nginx(port)?;
                self.start_lb_agent(ca, agent_port)
            }
            SandboxLb::Apache => self.start_apache(port),
            SandboxLb::None => Ok(()),
        }
    }

    /// What activation changed in each node's init.d script (none without init.d).
    pub fn service_changes(&self) -> Result<Vec<ServiceChange>> {
        self.service_definitions
            .iter()
            .map(ServiceDefinition::change)
            .collect()
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

    /// Creates a sandbox in `dir`, waits for its agents, and starts its nodes through them.
    pub async fn start(dir: &Path, opts: SandboxOptions) -> Result<Self> {
        let dir = dir.to_path_buf();
        let sandbox = tokio::task::spawn_blocking(move || -> Result<Sandbox> {
            let s = Sandbox::create(&dir, opts)?;
            s.wait_agents()?;
            Ok(s)
        })
        .await??;
        sandbox
            .start_nodes()
            .await
            .context("starting the nodes through their agents")?;
        Ok(sandbox)
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

    /// Restarts HAProxy with another balancing algorithm on the same port (before traffic starts).
    pub fn set_haproxy_balance(&mut self, balance: &str) -> Result<()> {
        let port = self
            .lb_url
            .as_deref()
            .and_then(|u| u.rsplit_once(':'))
            .and_then(|(_, p)| p.parse::<u16>().ok())
            .filter(|_| self.haproxy.is_some())
            .context("the sandbox has no HAProxy")?;
        for mut h in [self.haproxy.take(), self.ssh_standin.take()]
            .into_iter()
            .flatten()
        {
            let _ = h.kill();
            let _ = h.wait();
        }
        if let Some(s) = &self.haproxy_socket {
            let _ = std::fs::remove_file(s);
        }
        self.start_haproxy(port, balance)
    }

    fn start_haproxy(&mut self, port: u16, balance: &str) -> Result<()> {
        let Some(haproxy) = which("haproxy") else {
            if self.opts.lb_standin {
                return self.start_lb_standin(port);
            }
            bail!(
                "haproxy is not installed (apt-get install -y haproxy), or run the sandbox with --lb none"
            );
        };
        let socket = self.dir.join("haproxy.sock");
        let servers: Vec<(String, u16)> = self
            .sim
            .nodes()
            .iter()
            .map(|n| (n.name.clone(), n.port))
            .collect();
        let ssh_servers: Vec<(String, u16)> = self
            .sim
            .nodes()
            .iter()
            .map(|n| (n.name.clone(), n.ssh_port))
            .collect();
        let cfg_path = self.dir.join("haproxy.cfg");
        std::fs::write(
            &cfg_path,
            haproxy_config_with_ssh(
                &socket,
                port,
                &servers,
                balance,
                Some((self.lb_ssh_port, &ssh_servers)),
            ),
        )?;
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
        self.lb_ssh_addr = Some(format!("127.0.0.1:{}", self.lb_ssh_port));
        self.haproxy_socket = Some(socket);
        Ok(())
    }

    /// The simulator's stand-in for HAProxy (same runtime API subset), for a demo on a machine
    /// without HAProxy. Said loudly: it is not a load balancer to run Bitbucket behind.
    fn start_lb_standin(&mut self, port: u16) -> Result<()> {
        eprintln!(
            "NOTE: haproxy is not installed; the sandbox uses bitbucket-sim's stand-in balancer (HAProxy's runtime API, health checks, retries), one for HTTP and one in TCP mode for Git over SSH. Install haproxy (apt-get install haproxy) for the real thing."
        );
        let http: Vec<(String, u16)> = self
            .sim
            .nodes()
            .iter()
            .map(|n| (n.name.clone(), n.port))
            .collect();
        let ssh: Vec<(String, u16)> = self
            .sim
            .nodes()
            .iter()
            .map(|n| (n.name.clone(), n.ssh_port))
            .collect();
        let socket = self.dir.join("haproxy.sock");
        self.haproxy =
            Some(self.spawn_standin("http", "bitbucket", &socket, port, &http, "haproxy")?);
        self.lb_url = Some(format!("http://127.0.0.1:{port}"));
        self.haproxy_socket = Some(socket);
        let ssh_socket = self.dir.join("haproxy-ssh.sock");
        let ssh_port = self.lb_ssh_port;
        self.ssh_standin = Some(self.spawn_standin(
            "tcp",
            HAPROXY_SSH_BACKEND,
            &ssh_socket,
            ssh_port,
            &ssh,
            "haproxy-ssh",
        )?);
        self.lb_ssh_addr = Some(format!("127.0.0.1:{ssh_port}"));
        self.standin_ssh_socket = Some(ssh_socket);
        Ok(())
    }

    /// Starts one `bitbucket-sim balancer` and waits for its port and runtime-API socket.
    fn spawn_standin(
        &self,
        mode: &str,
        backend: &str,
        socket: &Path,
        port: u16,
        servers: &[(String, u16)],
        log_name: &str,
    ) -> Result<Child> {
        let mut cmd = Command::new(&self.opts.sim_bin);
        cmd.arg("balancer")
            .args(["--mode", mode, "--backend", backend])
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--socket")
            .arg(socket);
        for (name, p) in servers {
            cmd.arg("--server").arg(format!("{name}=127.0.0.1:{p}"));
        }
        let log_path = self.dir.join(format!("{log_name}.log"));
        let log = std::fs::File::create(&log_path)?;
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting the stand-in balancer")?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() || std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "the stand-in balancer ({mode}) did not start; see {}",
                    log_path.display()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(child)
    }

    /// Starts a load balancer in a process group of its own and waits for its port.
    fn spawn_lb(&mut self, name: &str, mut cmd: Command, port: u16, log: &Path) -> Result<()> {
        use std::os::unix::process::CommandExt;
        let out = std::fs::File::create(log)?;
        let child = cmd
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        self.lb_process = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            let exited = self
                .lb_process
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if exited.is_some() || Instant::now() > deadline {
                bail!(
                    "{name} did not start ({}); see {}",
                    exited.map_or("no port".to_string(), |s| s.to_string()),
                    log.display()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.lb_url = Some(format!("http://127.0.0.1:{port}"));
        Ok(())
    }

    fn start_nginx(&mut self, port: u16) -> Result<()> {
        let nginx = which("nginx").context(
            "nginx is not installed (apt-get install -y nginx), or run the sandbox with another --lb",
        )?;
        let module = bbupgrade_common::nginx::stream_module(&nginx)
            .map_err(anyhow::Error::msg)
            .context("the sandbox's NGINX fronts Git over SSH through its stream module")?;
        let dir = self.dir.join("nginx");
        std::fs::create_dir_all(dir.join("tmp"))?;
        let nodes = self.sim.nodes();
        let ports: Vec<u16> = nodes.iter().map(|n| n.port).collect();
        let ssh_ports: Vec<u16> = nodes.iter().map(|n| n.ssh_port).collect();
        let upstream = dir.join("upstream.conf");
        let ssh_upstream = dir.join("stream-upstream.conf");
        let main = dir.join("nginx.conf");
        std::fs::write(&upstream, nginx_upstream(&ports))?;
        std::fs::write(
            &ssh_upstream,
            nginx_upstream_named(NGINX_SSH_UPSTREAM, &ssh_ports, ""),
        )?;
        let stream = NginxStream {
            bind_port: self.lb_ssh_port,
            upstream_file: &ssh_upstream,
            module: module.as_deref(),
        };
        std::fs::write(
            &main,
            nginx_config_with_stream(&dir, &upstream, port, Some(&stream)),
        )?;
        let mut cmd = Command::new(&nginx);
        cmd.arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(&main)
            .arg("-e")
            .arg(dir.join("error.log"))
            .arg("-g")
            .arg("daemon off;");
        self.spawn_lb("nginx", cmd, port, &dir.join("nginx.log"))?;
        self.lb_ssh_addr = Some(format!("127.0.0.1:{}", self.lb_ssh_port));
        self.lb_servers = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        // A node's server in the stream upstream is its SSH port.
        let ssh_names: std::collections::BTreeMap<String, String> = self
            .lb_servers
            .iter()
            .zip(&ssh_ports)
            .map(|(s, p)| (s.clone(), format!("127.0.0.1:{p}")))
            .collect();
        self.lb_config = Some(bbupgrade::loadbalancer::LbConfig::Nginx {
            config: upstream,
            upstream: String::new(),
            upstreams: vec!["bitbucket".into(), NGINX_SSH_UPSTREAM.into()],
            configs: [(NGINX_SSH_UPSTREAM.to_string(), ssh_upstream)].into(),
            server_names: [(NGINX_SSH_UPSTREAM.to_string(), ssh_names)].into(),
            mode: Default::default(),
            main_config: Some(main),
            prefix: Some(dir.clone()),
            nginx: Some(nginx),
            pid_file: Some(dir.join("nginx.pid")),
            reload_command: None,
        });
        Ok(())
    }

    /// Starts an agent with an `[lb]` role over the NGINX that [`Self::start_nginx`] started, and
    /// turns the inventory's load balancer into `nginx-agent`. It still needs a `[bitbucket]`
    /// section: it gets node 1's, which it only reads.
    fn start_lb_agent(&mut self, ca: &Ca, port: u16) -> Result<()> {
        use bbupgrade::loadbalancer::LbConfig;
        let Some(nginx @ LbConfig::Nginx { .. }) = self.lb_config.clone() else {
            bail!("the load-balancer agent needs the sandbox's NGINX started first");
        };
        // The agent's `[lb]` table has the same keys as the inventory's `kind = "nginx"`.
        let lb_table = inline_toml(&nginx)?;
        ca.issue(
            &IssueRequest::new(Role::Agent, LB_AGENT_NODE).with_sans(["127.0.0.1", "localhost"]),
        )?
        .save_replacing(&self.pki)?;
        let tls = TlsFiles::in_pki_dir(&self.pki, Role::Agent, LB_AGENT_NODE);
        let node = &self.sim.nodes()[0];
        let addr = format!("127.0.0.1:{port}");
        let cfg = format!(
            "node_id = {LB_AGENT_NODE:?}\nlisten = {:?}\nlb = {lb_table}\nstate_dir = {:?}\n\n[tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n\n{}\n[service]\nkind = \"scripts\"\n",
            addr,
            self.dir.join(format!("agents/{LB_AGENT_NODE}")),
            tls.ca,
            tls.cert,
            tls.key,
            self.bitbucket_section(node),
        );
        let cfg_path = self.dir.join(format!("agents/{LB_AGENT_NODE}.toml"));
        std::fs::write(&cfg_path, cfg)?;
        let log = std::fs::File::create(self.dir.join(format!("agents/{LB_AGENT_NODE}.log")))?;
        let child = Command::new(&self.opts.agent_bin)
            .arg("--config")
            .arg(&cfg_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", self.opts.agent_bin.display()))?;
        self.lb_agent = Some(child);
        let deadline = Instant::now() + Duration::from_secs(AGENT_READY_TIMEOUT_SECS);
        while std::net::TcpStream::connect(&addr).is_err() {
            if Instant::now() > deadline {
                bail!(
                    "the load-balancer agent at {addr} did not start; see {}/agents/{LB_AGENT_NODE}.log",
                    self.dir.display()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.lb_config = Some(LbConfig::NginxAgent {
            agent: addr.clone(),
            agent_node: LB_AGENT_NODE.into(),
        });
        self.lb_agent_config = Some(cfg_path);
        self.lb_agent_addr = Some(addr);
        Ok(())
    }

    fn start_apache(&mut self, port: u16) -> Result<()> {
        let apache = which("apache2").context(
            "apache2 is not installed (apt-get install -y apache2), or run the sandbox with another --lb",
        )?;
        let dir = self.dir.join("apache");
        std::fs::create_dir_all(&dir)?;
        let ports: Vec<u16> = self.sim.nodes().iter().map(|n| n.port).collect();
        let conf = dir.join("httpd.conf");
        std::fs::write(&conf, apache_config(&dir, port, &ports))?;
        let mut cmd = Command::new(&apache);
        cmd.arg("-f").arg(&conf).arg("-DFOREGROUND");
        self.spawn_lb("apache2", cmd, port, &dir.join("apache.log"))?;
        self.lb_servers = ports
            .iter()
            .map(|p| format!("http://127.0.0.1:{p}"))
            .collect();
        self.lb_config = Some(bbupgrade::loadbalancer::LbConfig::Apache {
            manager_url: format!("http://127.0.0.1:{port}/balancer-manager"),
            balancer: "bitbucket".into(),
        });
        Ok(())
    }

    /// The inventory's `load_balancer = {...}` line.
    fn inventory_lb(&self) -> Result<String> {
        use bbupgrade::loadbalancer::LbConfig;
        let unix = |s: &PathBuf| format!("unix:{}", s.display());
        Ok(
            match (
                &self.haproxy_socket,
                &self.standin_ssh_socket,
                &self.lb_config,
            ) {
                // The stand-in: two processes, so two load balancers of one backend each.
                (Some(s), Some(ssh), _) => format!(
                    "load_balancers = [{{ kind = \"haproxy\", socket = {:?}, backends = [\"bitbucket\"] }}, {{ kind = \"haproxy\", socket = {:?}, backends = [{HAPROXY_SSH_BACKEND:?}] }}]\n",
                    unix(s),
                    unix(ssh)
                ),
                (Some(s), None, _) => format!(
                    "load_balancer = {{ kind = \"haproxy\", socket = {:?}, backends = {:?} }}\n",
                    unix(s),
                    self.haproxy_backends()
                ),
                (None, _, Some(nginx @ LbConfig::Nginx { .. })) => {
                    format!("load_balancer = {}\n", inline_toml(nginx)?)
                }
                (None, _, Some(LbConfig::NginxAgent { agent, agent_node })) => format!(
                    "load_balancer = {{ kind = \"nginx-agent\", agent = {agent:?}, agent_node = {agent_node:?} }}\n"
                ),
                (
                    None,
                    _,
                    Some(LbConfig::Apache {
                        manager_url,
                        balancer,
                    }),
                ) => format!(
                    "load_balancer = {{ kind = \"apache\", manager_url = {manager_url:?}, balancer = {balancer:?} }}\n"
                ),
                _ => "load_balancer = { kind = \"none\" }\n".to_string(),
            },
        )
    }

    /// The inventory's credentials lines, with the secret in a file of mode 0600.
    fn inventory_auth(&self) -> Result<String> {
        let (file, secret, lines) = if self.opts.bitbucket.basic_auth {
            let file = self.dir.join("admin.password");
            let lines = format!(
                "auth = \"basic\"\nuser = {ADMIN_USER:?}\npassword_file = {:?}\n",
                file
            );
            (file, ADMIN_PASSWORD, lines)
        } else {
            let file = self.dir.join("admin.token");
            let lines = format!("token_file = {file:?}\n");
            (file, ADMIN_TOKEN, lines)
        };
        std::fs::write(&file, format!("{secret}\n"))?;
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600))?;
        Ok(lines)
    }

    fn write_inventory(&self) -> Result<()> {
        let tls = TlsFiles::in_pki_dir(&self.pki, Role::Coordinator, "sandbox-admin");
        let auth = self.inventory_auth()?;
        let lb = self.inventory_lb()?;
        let mut inv = format!(
            "# Written by the bbupgrade sandbox.\ntls = {{ ca = {:?}, cert = {:?}, key = {:?} }}\nstate = {:?}\n\n[timeouts]\ndrain_secs = 60\nstop_secs = 60\nstart_secs = 120\nactive_secs = 60\nsoak_secs = 1\nagent_connect_ms = 3000\n\n[[clusters]]\nname = \"{}\"\nbitbucket_url = {:?}\nbitbucket_node_urls = {:?}\n{auth}{lb}",
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
        );
        for (i, (node, addr)) in self.sim.nodes().iter().zip(&self.agent_addrs).enumerate() {
            inv.push_str(&format!(
                "\n[[clusters.nodes]]\nid = {:?}\nagent = {:?}\n",
                node.name, addr
            ));
            // Every simulated node shares 127.0.0.1: the cluster port in the view tells them apart.
            if let Some(port) = node.hazelcast_port {
                inv.push_str(&format!("bitbucket_address = \"127.0.0.1:{port}\"\n"));
            }
            if let Some(name) = &node.cluster_name {
                inv.push_str(&format!("bitbucket_name = {name:?}\n"));
            }
            if let Some(server) = self.lb_servers.get(i) {
                inv.push_str(&format!("lb_server = {server:?}\n"));
            }
        }
        std::fs::write(&self.inventory, inv)?;
        Ok(())
    }

    /// Starts every node through its agent's service manager, as the Bitbucket user.
    pub async fn start_nodes(&self) -> Result<()> {
        let inv = bbupgrade::inventory::Inventory::load(&self.inventory)?;
        let tls = inv.tls.load()?;
        let cluster = inv.cluster(&self.cluster_name)?;
        let starts = cluster.nodes.iter().map(|node| {
            let tls = tls.clone();
            async move {
                let mut c = bbupgrade::agents::connect(node, &tls, Duration::from_secs(5)).await?;
                let d = Duration::from_secs(120);
                bbupgrade::agents::call(
                    &node.id,
                    d,
                    c.start(bbupgrade::agents::request(
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
            return self.wait_proxy_serves(timeout).await;
        };
        let lb = self.haproxy_lb(socket)?;
        let deadline = Instant::now() + timeout;
        for node in self.sim.nodes() {
            loop {
                let state = lb.server_state(&node.name).await?;
                if state.operational == bbupgrade::loadbalancer::OperState::Up {
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

    /// NGINX and Apache have no health view of their own: wait until `/status` answers through
    /// them twice as many times in a row as there are nodes.
    async fn wait_proxy_serves(&self, timeout: Duration) -> Result<()> {
        let (Some(_), Some(url)) = (&self.lb_process, &self.lb_url) else {
            return Ok(());
        };
        let http = reqwest::Client::new();
        let deadline = Instant::now() + timeout;
        let mut in_a_row = 0;
        while in_a_row < self.sim.nodes().len() * 2 {
            let ok = http
                .get(format!("{url}/status"))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            in_a_row = if ok { in_a_row + 1 } else { 0 };
            if Instant::now() > deadline {
                bail!("the load balancer at {url} does not serve /status yet");
            }
            if !ok {
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

    /// Where to send Git over SSH: the load balancer's SSH front door, or the first node's SSH port.
    pub fn ssh_addr(&self) -> String {
        self.lb_ssh_addr
            .clone()
            .unwrap_or_else(|| format!("127.0.0.1:{}", self.sim.nodes()[0].ssh_port))
    }

    /// The backends every node is in on the HAProxy at `haproxy_socket`: HTTP, and Git over SSH
    /// when that same process fronts it (the stand-in has a second process for SSH).
    pub fn haproxy_backends(&self) -> Vec<String> {
        let mut backends = vec!["bitbucket".to_string()];
        if self.lb_ssh_addr.is_some() && self.standin_ssh_socket.is_none() {
            backends.push(HAPROXY_SSH_BACKEND.to_string());
        }
        backends
    }

    /// Every HAProxy runtime API of the sandbox as one load balancer (two with the stand-in).
    fn haproxy_lb(&self, socket: &Path) -> Result<Box<dyn bbupgrade::loadbalancer::LoadBalancer>> {
        use bbupgrade::loadbalancer::LbConfig;
        let one = |socket: &Path, backends: Vec<String>| LbConfig::Haproxy {
            socket: format!("unix:{}", socket.display()),
            backend: String::new(),
            backends,
            server_names: Default::default(),
        };
        let http = one(socket, self.haproxy_backends());
        let cfg = match &self.standin_ssh_socket {
            Some(ssh) => LbConfig::Several {
                members: vec![http, one(ssh, vec![HAPROXY_SSH_BACKEND.to_string()])],
            },
            None => http,
        };
        Ok(bbupgrade::loadbalancer::from_config(&cfg)?)
    }
}

/// Stops a process started in its own group, workers included: SIGTERM, then SIGKILL after a grace.
fn stop_group(child: &mut Child) {
    use nix::sys::signal::{Signal, killpg};
    let group = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = killpg(group, Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_millis(LB_STOP_GRACE_MS);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = killpg(group, Signal::SIGKILL);
    let _ = child.kill();
    let _ = child.wait();
}

/// A load balancer's settings as one TOML inline table (`{ kind = "nginx", ... }`).
pub fn inline_toml(cfg: &bbupgrade::loadbalancer::LbConfig) -> Result<String> {
    let value = toml::Value::try_from(cfg).context("writing the load balancer's settings")?;
    Ok(value.to_string())
}

pub fn which(name: &str) -> Option<PathBuf> {
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
        if let Some(mut c) = self.lb_agent.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        for mut h in [self.haproxy.take(), self.ssh_standin.take()]
            .into_iter()
            .flatten()
        {
            let _ = h.kill();
            let _ = h.wait();
        }
        if let Some(mut p) = self.lb_process.take() {
            stop_group(&mut p);
        }
        let _ = self.sim.stop_all();
        self.sim.kill_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bbupgrade::loadbalancer::LbConfig;

    #[test]
    fn nginx_settings_round_trip_through_an_inline_table() {
        let cfg = LbConfig::Nginx {
            config: "/s/nginx/upstream.conf".into(),
            upstream: String::new(),
            upstreams: vec!["bitbucket".into(), NGINX_SSH_UPSTREAM.into()],
            configs: [(
                NGINX_SSH_UPSTREAM.to_string(),
                "/s/nginx/stream.conf".into(),
            )]
            .into(),
            server_names: [(
                NGINX_SSH_UPSTREAM.to_string(),
                [("127.0.0.1:1".to_string(), "127.0.0.1:2".to_string())].into(),
            )]
            .into(),
            mode: Default::default(),
            main_config: Some("/s/nginx/nginx.conf".into()),
            prefix: None,
            nginx: Some("/usr/sbin/nginx".into()),
            pid_file: None,
            reload_command: None,
        };
        let line = format!("lb = {}\n", inline_toml(&cfg).unwrap());
        assert_eq!(line.lines().count(), 1, "{line}");
        #[derive(serde::Deserialize)]
        struct Doc {
            lb: LbConfig,
        }
        assert_eq!(toml::from_str::<Doc>(&line).unwrap().lb, cfg);
    }

    #[test]
    fn nginx_fronts_ssh_through_stream() {
        let dir = Path::new("/s/nginx");
        let stream = NginxStream {
            bind_port: 7999,
            upstream_file: Path::new("/s/nginx/stream.conf"),
            module: Some(Path::new("/usr/lib/nginx/modules/ngx_stream_module.so")),
        };
        let cfg = nginx_config_with_stream(dir, Path::new("/s/u.conf"), 7990, Some(&stream));
        assert!(
            cfg.starts_with("load_module /usr/lib/nginx/modules/ngx_stream_module.so;\n"),
            "{cfg}"
        );
        assert!(
            cfg.contains("stream {\n    include /s/nginx/stream.conf;"),
            "{cfg}"
        );
        assert!(cfg.contains("listen 127.0.0.1:7999;\n        proxy_pass bitbucket_ssh;"));
        assert!(!nginx_config(dir, Path::new("/s/u.conf"), 7990).contains("stream {"));
        let up = nginx_upstream_named(NGINX_SSH_UPSTREAM, &[1, 2], "");
        assert!(
            up.contains("upstream bitbucket_ssh {\n    server 127.0.0.1:1 ")
                && !up.contains("keepalive")
        );
    }
}
