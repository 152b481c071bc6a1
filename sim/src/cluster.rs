//! A local cluster of simulated nodes for tests and the demo: one install and home per node, one
//! shared home, each node configured the way an administrator would, driven through the real scripts.

use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::archive::{self, ArchiveInfo};
use crate::client;
use crate::properties;
use crate::scripts;

/// How long one `/status` probe may take.
const PROBE_TIMEOUT_MS: u64 = 1_000;
/// Environment variables of the caller that would override what the scripts configure.
const SCRUBBED_ENV: &[&str] = &[
    "BITBUCKET_HOME",
    "BITBUCKET_USER",
    "JRE_HOME",
    "JAVA_HOME",
    "JAVA_BINARY",
    "JVM_SUPPORT_RECOMMENDED_ARGS",
    "STASH_HOME",
];

/// What cluster to build.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    pub nodes: usize,
    pub version: String,
    /// The `bitbucket-sim` binary bundled into the archive as the nodes' "JVM".
    pub program: PathBuf,
    pub startup_ms: u64,
    /// The sysadmin token (`sim.admin.token` in the shared bitbucket.properties).
    pub admin_token: String,
    pub payload_mib: u64,
    /// The dedicated user the scripts switch to when run as root (`set-bitbucket-user.sh`).
    pub run_as_user: Option<String>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            nodes: 2,
            version: "8.19.3".into(),
            program: std::env::current_exe().unwrap_or_else(|_| PathBuf::from("bitbucket-sim")),
            startup_ms: 1_000,
            admin_token: "sim-admin-token".into(),
            payload_mib: 0,
            run_as_user: None,
        }
    }
}

/// How the administrator set the product up, beyond what [`ClusterOptions`] says: what a rolling
/// upgrade's client must cope with (node names or not, cluster ports, the credentials it may use).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSetup {
    /// Start every node with `-Dcluster.node.name=<its SimNode::name>` (`node1`, ...). Off by
    /// default, as in a real install: every node then reports the name "Not configured".
    pub configure_names: bool,
    /// Node `i` (from 0) gets `-Dhazelcast.port=<base + i>`, so nodes sharing 127.0.0.1 still
    /// have distinct addresses (`ipAddress` + `portNumber`). `None`: no `-Dhazelcast.port`; every
    /// node reports the shared `hazelcast.port`, or 5701. Nothing listens on these ports.
    pub hazelcast_base_port: Option<u16>,
    /// `sim.admin.user` / `sim.admin.password` (HTTP Basic) in the shared properties; `None`
    /// writes neither, and Basic authentication is refused.
    pub admin_login: Option<(String, String)>,
    /// `sim.user.token`: a valid personal access token without system-admin rights.
    pub user_token: Option<String>,
}

impl Default for NodeSetup {
    fn default() -> Self {
        NodeSetup {
            configure_names: false,
            hazelcast_base_port: Some(crate::node::settings::DEFAULT_HAZELCAST_PORT),
            admin_login: Some(("admin".into(), "sim-admin-password".into())),
            user_token: None,
        }
    }
}

/// Where one node is.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SimNode {
    /// The simulator's handle on the node (`node1`, ...): its folder, its `-Dsim.node.label`
    /// (per-node knobs `key.node1`, the `X-Sim-Node` header). Not what Bitbucket reports as
    /// `name` unless [`NodeSetup::configure_names`] is on: see `cluster_name`.
    pub name: String,
    /// The `-Dcluster.node.name` the node is started with, if any.
    pub cluster_name: Option<String>,
    /// The HTTP port.
    pub port: u16,
    /// The `-Dhazelcast.port` the node is started with, if any (what the API reports as
    /// `portNumber`; 5701 or the shared `hazelcast.port` without it).
    pub hazelcast_port: Option<u16>,
    /// The Git-over-SSH port (`-Dplugin.ssh.port`), a free one whatever the HTTP ports.
    pub ssh_port: u16,
    pub base_url: String,
    /// Where releases are extracted (`dir/nodeN/install`).
    pub install_root: PathBuf,
    /// The install the node was created with (`install_root/atlassian-bitbucket-<version>`).
    pub install_dir: PathBuf,
    pub home: PathBuf,
}

/// What `/sim/info` says about the process that answers for a node now.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeInfo {
    /// The node id of this process (a UUID, new on every start).
    #[serde(rename = "nodeId")]
    pub id: String,
    /// The name the cluster view reports ("Not configured" unless `-Dcluster.node.name`).
    #[serde(rename = "nodeName")]
    pub name: String,
    pub ip_address: String,
    /// The HTTP port.
    pub port: u16,
    /// The cluster (Hazelcast) port: the row's `portNumber`.
    pub hazelcast_port: u16,
    /// The `/status` health (`STARTING`, `RUNNING`, `ERROR`, `STOPPING`, `FIRST_RUN`).
    pub state: String,
    pub version: String,
    pub pid: u32,
}

/// A local cluster; dropping it kills any node and search process still running.
#[derive(Debug)]
pub struct SimCluster {
    dir: PathBuf,
    opts: ClusterOptions,
    setup: NodeSetup,
    archive: ArchiveInfo,
    nodes: Vec<SimNode>,
}

impl SimCluster {
    /// Builds the archive, one install and home per node, the shared home and its properties.
    pub fn create(dir: &Path, opts: ClusterOptions) -> anyhow::Result<SimCluster> {
        Self::create_with_ports(dir, opts, None)
    }

    /// As `create`, with the nodes on ports `base_port`, `base_port + 1`, ... instead of free ones.
    pub fn create_with_ports(
        dir: &Path,
        opts: ClusterOptions,
        base_port: Option<u16>,
    ) -> anyhow::Result<SimCluster> {
        Self::create_with(dir, opts, base_port, NodeSetup::default())
    }

    /// As `create_with_ports`, with the nodes set up as `setup` says.
    pub fn create_with(
        dir: &Path,
        opts: ClusterOptions,
        base_port: Option<u16>,
        setup: NodeSetup,
    ) -> anyhow::Result<SimCluster> {
        use crate::node::settings::{ADMIN_PASSWORD, ADMIN_TOKEN, ADMIN_USER, USER_TOKEN};
        if opts.nodes == 0 {
            bail!("a cluster needs at least one node");
        }
        let dir = absolute(dir)?;
        let shared = dir.join("shared");
        fs::create_dir_all(&shared).with_context(|| format!("creating {}", shared.display()))?;
        let archive = build_archive(&dir, &opts.version, opts.payload_mib, &opts.program)?;
        let mut props = format!(
            "# Cluster-wide settings (the shared home), written by bitbucket-sim\n{ADMIN_TOKEN}={}\n",
            opts.admin_token
        );
        if let Some((user, password)) = &setup.admin_login {
            props.push_str(&format!(
                "{ADMIN_USER}={user}\n{ADMIN_PASSWORD}={password}\n"
            ));
        }
        if let Some(token) = &setup.user_token {
            props.push_str(&format!("{USER_TOKEN}={token}\n"));
        }
        fs::write(shared.join("bitbucket.properties"), props)?;
        let hazelcast_ports: Vec<Option<u16>> = (0..opts.nodes)
            .map(|i| {
                setup
                    .hazelcast_base_port
                    .map(|base| {
                        u16::try_from(usize::from(base) + i)
                            .context("the Hazelcast base port leaves no room for every node")
                    })
                    .transpose()
            })
            .collect::<anyhow::Result<_>>()?;

        // Picked together so the HTTP and SSH ports differ.
        let mut free = free_ports(opts.nodes * 2)?;
        let ssh_ports = free.split_off(opts.nodes);
        let ports = match base_port {
            Some(base) => (0..opts.nodes)
                .map(|i| {
                    u16::try_from(usize::from(base) + i)
                        .context("--base-port leaves no room for every node")
                })
                .collect::<anyhow::Result<Vec<u16>>>()?,
            None => free,
        };
        let mut nodes = Vec::new();
        for (i, port) in ports.into_iter().enumerate() {
            let name = format!("node{}", i + 1);
            let node_dir = dir.join(&name);
            let install_root = node_dir.join("install");
            let home = node_dir.join("home");
            fs::create_dir_all(&home)?;
            let link = home.join("shared");
            if fs::symlink_metadata(&link).is_err() {
                std::os::unix::fs::symlink(&shared, &link)
                    .with_context(|| format!("linking {} to the shared home", link.display()))?;
            }
            let node = SimNode {
                base_url: format!("http://127.0.0.1:{port}"),
                install_dir: install_root.join(format!("atlassian-bitbucket-{}", opts.version)),
                cluster_name: setup.configure_names.then(|| name.clone()),
                name,
                port,
                hazelcast_port: hazelcast_ports[i],
                ssh_port: ssh_ports[i],
                install_root,
                home,
            };
            archive::extract(&archive.path, &node.install_root)?;
            configure_install(
                &node.install_dir,
                &node,
                opts.startup_ms,
                opts.run_as_user.as_deref(),
            )?;
            nodes.push(node);
        }
        let cluster = SimCluster {
            dir,
            opts,
            setup,
            archive,
            nodes,
        };
        if let Some(user) = &cluster.opts.run_as_user {
            chown_tree(&cluster.dir, user)?;
        }
        Ok(cluster)
    }

    pub fn nodes(&self) -> &[SimNode] {
        &self.nodes
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn shared_dir(&self) -> PathBuf {
        self.dir.join("shared")
    }

    pub fn archive(&self) -> &ArchiveInfo {
        &self.archive
    }

    pub fn admin_token(&self) -> &str {
        &self.opts.admin_token
    }

    /// How the nodes were set up.
    pub fn setup(&self) -> &NodeSetup {
        &self.setup
    }

    /// The `Authorization` header value for HTTP Basic as the system administrator, when a user
    /// and password were written (`NodeSetup::admin_login`).
    pub fn admin_basic_auth(&self) -> Option<String> {
        self.setup
            .admin_login
            .as_ref()
            .map(|(user, password)| crate::node::auth::basic_header(user, password))
    }

    /// What the process answering for node `index` says about itself (`GET /sim/info`): its
    /// current id (new on every start), reported name, address and ports.
    pub fn node_info(&self, index: usize) -> anyhow::Result<NodeInfo> {
        let node = self.node(index)?;
        let url = format!("{}/sim/info", node.base_url);
        let r = client::get(&url, &[], Duration::from_millis(PROBE_TIMEOUT_MS))
            .with_context(|| format!("asking {} ({url}) who it is", node.name))?;
        if r.status != 200 {
            bail!("{url} answered {}: {}", r.status, r.text());
        }
        serde_json::from_slice(&r.body).with_context(|| format!("reading the answer of {url}"))
    }

    /// The current id of node `index` (`None` when it does not answer).
    pub fn node_id(&self, index: usize) -> Option<String> {
        self.node_info(index).ok().map(|i| i.id)
    }

    fn node(&self, index: usize) -> anyhow::Result<&SimNode> {
        self.nodes
            .get(index)
            .with_context(|| format!("there is no node #{index}"))
    }

    /// Sets a key in the shared `bitbucket.properties` (knobs are re-read by running nodes).
    pub fn set_shared_property(&self, key: &str, value: &str) -> anyhow::Result<()> {
        let path = self.shared_dir().join("bitbucket.properties");
        let text =
            fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        let tmp = path.with_extension("properties.tmp");
        fs::write(&tmp, properties::set(&text, key, value))?;
        fs::rename(&tmp, &path)?;
        Ok(())
    }

    /// Extracts release `version` into the node's install root and configures it as an admin (or
    /// the agent) would: home and JVM arguments carried over. Returns the new install.
    pub fn add_install(&self, index: usize, version: &str) -> anyhow::Result<PathBuf> {
        let node = self.node(index)?;
        let archive = build_archive(
            &self.dir,
            version,
            self.opts.payload_mib,
            &self.opts.program,
        )?;
        archive::extract(&archive.path, &node.install_root)?;
        let install = node
            .install_root
            .join(format!("atlassian-bitbucket-{version}"));
        configure_install(
            &install,
            node,
            self.opts.startup_ms,
            self.opts.run_as_user.as_deref(),
        )?;
        if let Some(user) = &self.opts.run_as_user {
            chown_tree(&install, user)?;
        }
        Ok(install)
    }

    /// Starts every node through `bin/start-bitbucket.sh` (`--no-search` for Data Center nodes).
    pub fn start_all(&self, no_search: bool) -> anyhow::Result<()> {
        for i in 0..self.nodes.len() {
            self.start_node(i, no_search)?;
        }
        Ok(())
    }

    /// Starts one node from the install it was created with.
    pub fn start_node(&self, index: usize, no_search: bool) -> anyhow::Result<()> {
        let install = self.node(index)?.install_dir.clone();
        self.start_install(index, &install, no_search)
    }

    /// Starts one node from `install` (e.g. one made by `add_install`).
    pub fn start_install(
        &self,
        index: usize,
        install: &Path,
        no_search: bool,
    ) -> anyhow::Result<()> {
        let node = self.node(index)?;
        let args: &[&str] = if no_search { &["--no-search"] } else { &[] };
        let out = run_script(&install.join("bin/start-bitbucket.sh"), args)?;
        if !out.status.success() {
            bail!("starting {} failed: {}", node.name, describe(&out));
        }
        Ok(())
    }

    /// Stops one node through `bin/stop-bitbucket.sh` of `install`. The script's exit status is
    /// that of its last step (stopping search), as in the product, so whether the webapp stopped is
    /// checked on its process.
    pub fn stop_install(&self, index: usize, install: &Path) -> anyhow::Result<()> {
        let node = self.node(index)?;
        let pid = self.node_pid(index).filter(|&p| is_sim_process(p));
        let out = run_script(&install.join("bin/stop-bitbucket.sh"), &[])?;
        if !out.status.success() {
            bail!("stopping {} failed: {}", node.name, describe(&out));
        }
        if let Some(pid) = pid
            && is_sim_process(pid)
        {
            bail!(
                "stopping {}: process {pid} is still running: {}",
                node.name,
                describe(&out)
            );
        }
        Ok(())
    }

    /// Stops one node through the install it was created with.
    pub fn stop_node(&self, index: usize) -> anyhow::Result<()> {
        let install = self.node(index)?.install_dir.clone();
        self.stop_install(index, &install)
    }

    /// Stops every node; reports the first failure after trying them all.
    pub fn stop_all(&self) -> anyhow::Result<()> {
        let mut first_error = None;
        for i in 0..self.nodes.len() {
            if let Err(e) = self.stop_node(i) {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// The PID in the node's `log/bitbucket.pid`, if any.
    pub fn node_pid(&self, index: usize) -> Option<i32> {
        read_pid(&self.nodes.get(index)?.home.join("log/bitbucket.pid"))
    }

    /// Kills the node abruptly (SIGKILL), as a crash would; the PID file stays behind.
    pub fn kill_node(&self, index: usize) -> anyhow::Result<()> {
        let pid = self.node_pid(index).context("the node has no PID file")?;
        kill(Pid::from_raw(pid), Signal::SIGKILL)
            .with_context(|| format!("killing process {pid}"))?;
        Ok(())
    }

    /// The node's `/status` state (`None` when it does not answer).
    pub fn status(&self, index: usize) -> Option<String> {
        let node = self.nodes.get(index)?;
        let r = client::get(
            &format!("{}/status", node.base_url),
            &[],
            Duration::from_millis(PROBE_TIMEOUT_MS),
        )
        .ok()?;
        r.json().ok()?.get("state")?.as_str().map(str::to_string)
    }

    /// Waits until the node's `/status` says `state`.
    pub fn wait_status(&self, index: usize, state: &str, timeout: Duration) -> anyhow::Result<()> {
        let node = self.node(index)?;
        let deadline = Instant::now() + timeout;
        loop {
            let now = self.status(index);
            if now.as_deref() == Some(state) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} is {} after {:?}, not {state}",
                    node.name,
                    now.as_deref().unwrap_or("not answering"),
                    timeout
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until every node answers `RUNNING`.
    pub fn wait_running(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        for i in 0..self.nodes.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            self.wait_status(i, "RUNNING", left)?;
        }
        Ok(())
    }

    /// Kills every node and bundled-search process still running (through the PID files).
    pub fn kill_all(&self) {
        for node in &self.nodes {
            for file in ["log/bitbucket.pid", "log/search.pid"] {
                if let Some(pid) = read_pid(&node.home.join(file))
                    && is_sim_process(pid)
                {
                    kill(Pid::from_raw(pid), Signal::SIGKILL).ok();
                }
            }
        }
    }
}

impl Drop for SimCluster {
    fn drop(&mut self) {
        self.kill_all();
    }
}

fn absolute(dir: &Path) -> anyhow::Result<PathBuf> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    dir.canonicalize()
        .with_context(|| format!("resolving {}", dir.display()))
}

fn build_archive(
    dir: &Path,
    version: &str,
    payload_mib: u64,
    program: &Path,
) -> anyhow::Result<ArchiveInfo> {
    let archives = dir.join("archives");
    fs::create_dir_all(&archives)?;
    archive::write_archive_with_program(
        version,
        &archives.join(archive::archive_file_name(version)),
        payload_mib,
        program,
    )
}

/// Configures an install for a node as its admin would: home in `set-bitbucket-home.sh`, the node's
/// JVM arguments in `_start-webapp.sh`, and the dedicated user.
fn configure_install(
    install: &Path,
    node: &SimNode,
    startup_ms: u64,
    user: Option<&str>,
) -> anyhow::Result<()> {
    let edit = |file: &str, f: &dyn Fn(&str) -> Option<String>| -> anyhow::Result<()> {
        let path = install.join("bin").join(file);
        let text =
            fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        let edited =
            f(&text).with_context(|| format!("{} is not in the shipped form", path.display()))?;
        fs::write(&path, edited).with_context(|| format!("writing {}", path.display()))
    };
    let home = node.home.display().to_string();
    edit("set-bitbucket-home.sh", &|t| {
        scripts::with_bitbucket_home(t, &home)
    })?;
    let mut args = format!(
        "-Dserver.port={} -Dplugin.ssh.port={} -Dsim.node.label={}",
        node.port, node.ssh_port, node.name
    );
    if let Some(name) = &node.cluster_name {
        args.push_str(&format!(" -Dcluster.node.name={name}"));
    }
    if let Some(port) = node.hazelcast_port {
        args.push_str(&format!(" -Dhazelcast.port={port}"));
    }
    args.push_str(&format!(" -Dsim.startup.ms={startup_ms}"));
    edit("_start-webapp.sh", &|t| scripts::with_jvm_args(t, &args))?;
    if let Some(user) = user {
        edit("set-bitbucket-user.sh", &|t| {
            scripts::with_bitbucket_user(t, user)
        })?;
    }
    Ok(())
}

/// Ports free on 127.0.0.1 right now (all held until every one is picked, so they differ).
pub fn free_ports(n: usize) -> anyhow::Result<Vec<u16>> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<_, _>>()
        .context("picking free ports")?;
    listeners
        .iter()
        .map(|l| Ok(l.local_addr()?.port()))
        .collect()
}

fn run_script(script: &Path, args: &[&str]) -> anyhow::Result<Output> {
    let mut cmd = Command::new(script);
    cmd.args(args).stdin(std::process::Stdio::null());
    for var in SCRUBBED_ENV {
        cmd.env_remove(var);
    }
    cmd.output()
        .with_context(|| format!("running {}", script.display()))
}

fn describe(out: &Output) -> String {
    format!(
        "{} (stdout: {}; stderr: {})",
        out.status,
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    )
}

fn read_pid(path: &Path) -> Option<i32> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Guards against a recycled PID: only processes running the simulator are killed.
fn is_sim_process(pid: i32) -> bool {
    fs::read(format!("/proc/{pid}/cmdline"))
        .is_ok_and(|c| String::from_utf8_lossy(&c).contains("bitbucket-sim"))
}

fn chown_tree(root: &Path, user: &str) -> anyhow::Result<()> {
    let user =
        nix::unistd::User::from_name(user)?.with_context(|| format!("there is no user {user}"))?;
    let mut stack = vec![root.to_path_buf()];
    while let Some(path) = stack.pop() {
        nix::unistd::fchownat(
            nix::fcntl::AT_FDCWD,
            &path,
            Some(user.uid),
            Some(user.gid),
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .with_context(|| format!("changing the owner of {}", path.display()))?;
        let meta = fs::symlink_metadata(&path)?;
        if meta.is_dir() {
            for entry in fs::read_dir(&path)? {
                stack.push(entry?.path());
            }
        }
    }
    Ok(())
}
