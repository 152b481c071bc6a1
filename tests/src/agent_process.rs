//! One real agent process on loopback, on its own (no simulated node), for tests that attack it: a
//! PKI directory as `bbupgrade pki` leaves it, a node's files, an agent config with extra keys, and
//! the coordinator's calls. The process is killed when dropped.

use crate::Bins;
use bbupgrade_common::identity::Role;
use bbupgrade_common::pki::{Ca, IssueRequest};
use bbupgrade_common::proto::NodeInfoRequest;
use bbupgrade_common::proto::agent_client::AgentClient;
use bbupgrade_common::tls::{TlsFiles, TlsMaterial, connect_agent, error_chain};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
pub const AGENT_START_TIMEOUT_SECS: u64 = 30;
pub const NODE: &str = "node-a";

/// A PKI directory as `bbupgrade pki` leaves it, with an agent and two coordinators.
pub fn pki_dir(dir: &Path) -> PathBuf {
    let pki = dir.join("pki");
    let ca = Ca::generate().unwrap();
    ca.save(&pki).unwrap();
    ca.issue(&IssueRequest::new(Role::Agent, NODE).with_sans(["127.0.0.1", "localhost"]))
        .unwrap()
        .save(&pki)
        .unwrap();
    for name in ["alice", "mallory"] {
        ca.issue(&IssueRequest::new(Role::Coordinator, name))
            .unwrap()
            .save(&pki)
            .unwrap();
    }
    pki
}

/// A coordinator's TLS material from the PKI directory, checking the CRL when `crl` is set.
pub fn coordinator(pki: &Path, name: &str, crl: bool) -> TlsMaterial {
    let mut files = TlsFiles::in_pki_dir(pki, Role::Coordinator, name);
    if crl {
        files.crl = Some(pki.join("crl.pem"));
    }
    files.load().unwrap()
}

/// A real agent process (the e2e copy of `bbupgrade-agent`); killed when dropped.
pub struct AgentProc {
    child: Child,
    pub addr: String,
    pub dir: PathBuf,
    /// The agent's log (stderr).
    pub stderr: PathBuf,
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl AgentProc {
    pub fn state_dir(&self) -> PathBuf {
        self.dir.join("state")
    }

    pub fn install_root(&self) -> PathBuf {
        self.dir.join("install")
    }

    /// Everything the agent wrote that could quote a request: its journal and its log.
    pub fn journal_and_log(&self) -> String {
        let mut all = std::fs::read_to_string(&self.stderr).unwrap_or_default();
        if let Ok(entries) = std::fs::read_dir(self.state_dir().join("operations")) {
            for e in entries {
                all.push_str(&std::fs::read_to_string(e.unwrap().path()).unwrap_or_default());
            }
        }
        all
    }

    /// The largest journal record, in bytes.
    pub fn largest_journal_record(&self) -> u64 {
        std::fs::read_dir(self.state_dir().join("operations"))
            .map(|entries| {
                entries
                    .map(|e| e.unwrap().metadata().unwrap().len())
                    .max()
                    .unwrap_or(0)
            })
            .unwrap_or(0)
    }
}

/// Writes a node (install, home) and an agent config with `extra` TOML in `dir`; returns the path.
pub fn agent_config(dir: &Path, pki: &Path, tls_extra: &str, extra: &str, port: u16) -> PathBuf {
    let install_root = dir.join("install");
    let current = install_root.join("atlassian-bitbucket-8.19.3");
    std::fs::create_dir_all(current.join("bin")).unwrap();
    std::fs::write(
        current.join("bin/start-bitbucket.sh"),
        "#!/bin/sh\nexit 0\n",
    )
    .unwrap();
    std::fs::create_dir_all(dir.join("home")).unwrap();
    let files = TlsFiles::in_pki_dir(pki, Role::Agent, NODE);
    let user = if nix::unistd::geteuid().is_root() {
        "user = \"nobody\"\n"
    } else {
        ""
    };
    let text = format!(
        "node_id = {NODE:?}\nlisten = \"127.0.0.1:{port}\"\nstate_dir = {:?}\n\n[tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n{tls_extra}\n\n[bitbucket]\ninstall_root = {:?}\ncurrent_install = {:?}\nhome = {:?}\n{user}status_url = \"http://127.0.0.1:1/status\"\n\n[service]\nkind = \"scripts\"\n\n{extra}\n",
        dir.join("state"),
        files.ca,
        files.cert,
        files.key,
        install_root,
        current,
        dir.join("home"),
    );
    let path = dir.join("agent.toml");
    std::fs::write(&path, text).unwrap();
    path
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn spawn_agent(bins: &Bins, config: &Path, dir: &Path) -> (Child, PathBuf) {
    spawn_agent_with_fd_limit(bins, config, dir, None)
}

pub fn set_nofile(soft: u64, hard: u64) -> std::io::Result<()> {
    let lim = libc::rlimit {
        rlim_cur: soft,
        rlim_max: hard,
    };
    // SAFETY: setrlimit reads the struct it is given; async-signal-safe (used after fork).
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Starts the agent, optionally with a lower open-files limit (as a unit's `LimitNOFILE` would).
pub fn spawn_agent_with_fd_limit(
    bins: &Bins,
    config: &Path,
    dir: &Path,
    nofile: Option<u64>,
) -> (Child, PathBuf) {
    use std::os::unix::process::CommandExt;
    let stderr = dir.join(format!(
        "agent-{}.log",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    let mut cmd = Command::new(&bins.agent);
    if let Some(n) = nofile {
        // SAFETY: setrlimit is async-signal-safe and only changes the child's own limit.
        unsafe {
            cmd.pre_exec(move || set_nofile(n, n));
        }
    }
    let child = cmd
        .arg("--config")
        .arg(config)
        .env(
            "BBUPGRADE_LOG",
            "info,bbupgrade_common=debug,bbupgrade_agent=debug",
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr).unwrap())
        .spawn()
        .expect("starting the agent");
    (child, stderr)
}

/// Starts an agent with the extra config and waits until it accepts connections.
pub fn start_agent(bins: &Bins, dir: &Path, pki: &Path, tls_extra: &str, extra: &str) -> AgentProc {
    start_agent_with_fd_limit(bins, dir, pki, tls_extra, extra, None)
}

pub fn start_agent_with_fd_limit(
    bins: &Bins,
    dir: &Path,
    pki: &Path,
    tls_extra: &str,
    extra: &str,
    nofile: Option<u64>,
) -> AgentProc {
    let port = free_port();
    let config = agent_config(dir, pki, tls_extra, extra, port);
    let (mut child, stderr) = spawn_agent_with_fd_limit(bins, &config, dir, nofile);
    let addr = format!("127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(AGENT_START_TIMEOUT_SECS);
    while std::net::TcpStream::connect(&addr).is_err() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!(
                "the agent exited ({status}) before listening:\n{}",
                std::fs::read_to_string(&stderr).unwrap_or_default()
            );
        }
        assert!(
            Instant::now() < deadline,
            "the agent did not start listening"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    AgentProc {
        child,
        addr,
        dir: dir.to_path_buf(),
        stderr,
    }
}

pub async fn client(agent: &AgentProc, m: &TlsMaterial) -> AgentClient<tonic::transport::Channel> {
    let channel = connect_agent(&agent.addr, m, NODE, CONNECT_TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("connecting to the agent: {e:#}"));
    AgentClient::new(channel)
}

/// NodeInfo as a coordinator holding `m`: the node id, or the whole reason it failed.
pub async fn node_info(agent: &AgentProc, m: &TlsMaterial) -> Result<String, String> {
    let channel = connect_agent(&agent.addr, m, NODE, CONNECT_TIMEOUT)
        .await
        .map_err(|e| format!("{e:#}"))?;
    AgentClient::new(channel)
        .node_info(NodeInfoRequest {})
        .await
        .map(|r| r.into_inner().node_id)
        .map_err(|s| format!("{:?}: {}", s.code(), error_chain(&s)))
}
