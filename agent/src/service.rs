//! Stop and start Bitbucket through its service manager (systemd, init.d or the bin scripts) and wait on `/status`.
//!
//! Scripts that start the node leave a backgrounded JVM behind which inherits the script's file
//! descriptors, so their output always goes to a log file, never to a pipe we would wait on.
//!
//! Bitbucket's scripts never run as root: with `scripts` the agent drops to the configured user in
//! the child itself (supplementary groups, gid, uid) before exec; an init script or a script it
//! runs that the Bitbucket user could edit is refused; a systemd unit must say `User=` that user.
//! The Bitbucket log is read for an error message only as that user, by a child that dropped
//! privileges.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::process::Command;

use as_user::drop_privileges;
pub use as_user::{
    BitbucketUser, Invocation, RunAs, check_unit_user, parse_bitbucket_user, plan_script_run,
    unit_user, user_file_tail, user_writable,
};

/// How long a start/stop script or `systemctl` may run.
pub const SCRIPT_TIMEOUT_SECS: u64 = 120;
const POLL_MS: u64 = 200;
const STATUS_REQUEST_TIMEOUT_MS: u64 = 2000;
const TAIL_LINES: usize = 20;
const TAIL_BYTES: usize = 4000;
/// How long reading the Bitbucket log's tail as the Bitbucket user may take.
const TAIL_READ_SECS: u64 = 5;
/// A pid file holds a number and a newline.
const PID_FILE_MAX_BYTES: i64 = 64;
const SAFE_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Environment passed through to the product's scripts when the agent has it.
const PASSED_ENV: [&str; 3] = ["JAVA_HOME", "JRE_HOME", "LANG"];

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("`{command}` failed with exit code {code}; last output:\n{tail}")]
    Failed {
        command: String,
        code: String,
        tail: String,
    },
    #[error("could not run `{command}`: {source}")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` did not finish within {secs} s and was killed; last output:\n{tail}")]
    CommandTimeout {
        command: String,
        secs: u64,
        tail: String,
    },
    #[error("refusing to run {script} as root: {reason}")]
    RefuseRoot { script: String, reason: String },
    #[error("refusing to run {what}: {reason}")]
    Unsafe { what: String, reason: String },
    #[error("could not read {}: {source}", file.display())]
    Read {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "Bitbucket did not stop within {secs} s: pid {pid} still {alive}, /status says {state}; stop it by hand or allow the kill policy"
    )]
    StopTimeout {
        secs: u64,
        pid: String,
        alive: &'static str,
        state: String,
    },
    #[error("could not kill pid {pid}: {source}")]
    Kill {
        pid: i32,
        #[source]
        source: nix::Error,
    },
    #[error(
        "{url} says ERROR: the node failed to start; last lines of the Bitbucket log:\n{log_tail}"
    )]
    NodeError { url: String, log_tail: String },
    #[error(
        "{url} says FIRST_RUN: the node shows the setup wizard: BITBUCKET_HOME is wrong or empty; last lines of the Bitbucket log:\n{log_tail}"
    )]
    FirstRun { url: String, log_tail: String },
    #[error(
        "{url} did not say RUNNING within {secs} s (last: {last}); last lines of the Bitbucket log:\n{log_tail}"
    )]
    StartTimeout {
        url: String,
        secs: u64,
        last: String,
        log_tail: String,
    },
}

/// The same errors, under the name the start/stop callers use.
pub type StartStopError = ServiceError;

/// Stops and starts the node; implemented for systemd, init.d and the product's scripts.
#[async_trait::async_trait]
pub trait ServiceManager: Send + Sync {
    /// `"systemd"`, `"initd"` or `"scripts"`.
    fn kind(&self) -> &'static str;
    async fn stop(&self) -> Result<(), ServiceError>;
    async fn start(&self) -> Result<(), ServiceError>;
    async fn daemon_reload(&self) -> Result<(), ServiceError>;
    /// Stop (and, with systemd, disable) the bundled search service if present; notes of what was done.
    async fn disable_bundled_search(&self) -> Result<Vec<String>, ServiceError>;
}

/// The last `TAIL_LINES` lines of `text`, bounded in bytes.
pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    let mut s = all[all.len().saturating_sub(lines)..].join("\n");
    if s.len() > TAIL_BYTES {
        let mut cut = s.len() - TAIL_BYTES;
        while !s.is_char_boundary(cut) {
            cut += 1;
        }
        s = s[cut..].to_string();
    }
    s
}

/// The tail of a file of the agent's own (its state dir), or a note that it could not be read.
fn file_tail(path: &Path) -> String {
    match std::fs::read(path) {
        Ok(b) => tail(&String::from_utf8_lossy(&b), TAIL_LINES),
        Err(e) => format!("({} not readable: {e})", path.display()),
    }
}

fn describe(cmd: &Command) -> String {
    let std = cmd.as_std();
    let mut s = std.get_program().to_string_lossy().into_owned();
    for a in std.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Run `cmd` with its output captured through pipes (for commands that leave no children behind).
async fn run_piped(mut cmd: Command, timeout: Duration) -> Result<String, ServiceError> {
    let command = describe(&cmd);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let child = cmd.spawn().map_err(|source| ServiceError::Spawn {
        command: command.clone(),
        source,
    })?;
    match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Err(_) => Err(ServiceError::CommandTimeout {
            command,
            secs: timeout.as_secs(),
            tail: String::new(),
        }),
        Ok(Err(source)) => Err(ServiceError::Spawn { command, source }),
        Ok(Ok(out)) => {
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            if out.status.success() {
                Ok(text)
            } else {
                Err(ServiceError::Failed {
                    command,
                    code: exit_code(&out.status),
                    tail: tail(&text, TAIL_LINES),
                })
            }
        }
    }
}

fn exit_code(status: &std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => c.to_string(),
        (None, Some(s)) => format!("none (killed by signal {s})"),
        _ => "unknown".to_string(),
    }
}

/// Run `cmd` with stdout/stderr appended to `log` (the background JVM may keep them open), then
/// read the log's tail for the error message.
async fn run_logged(mut cmd: Command, log: &Path, timeout: Duration) -> Result<(), ServiceError> {
    let command = describe(&cmd);
    if let Some(dir) = log.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let open = || {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|source| ServiceError::Spawn {
                command: format!("{command} (opening its log {})", log.display()),
                source,
            })
    };
    let (out, err) = (open()?, open()?);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err))
        .kill_on_drop(true);
    let mut child = cmd.spawn().map_err(|source| ServiceError::Spawn {
        command: command.clone(),
        source,
    })?;
    match tokio::time::timeout(timeout, child.wait()).await {
        Err(_) => {
            let _ = child.kill().await;
            Err(ServiceError::CommandTimeout {
                command,
                secs: timeout.as_secs(),
                tail: file_tail(log),
            })
        }
        Ok(Err(source)) => Err(ServiceError::Spawn { command, source }),
        Ok(Ok(status)) if status.success() => Ok(()),
        Ok(Ok(status)) => Err(ServiceError::Failed {
            command,
            code: exit_code(&status),
            tail: file_tail(log),
        }),
    }
}

fn clean_env(cmd: &mut Command, home: &str) {
    cmd.env_clear().env("PATH", SAFE_PATH).env("HOME", home);
    for key in PASSED_ENV {
        if let Ok(v) = std::env::var(key) {
            cmd.env(key, v);
        }
    }
}

/// systemd: `systemctl stop|start <unit>`.
#[derive(Debug, Clone)]
pub struct Systemd {
    pub unit: String,
    /// `systemctl` normally; a fake in tests.
    pub systemctl: PathBuf,
    /// The bundled search unit, `atlbitbucket_search.service` by default.
    pub search_unit: String,
    pub timeout: Duration,
    /// When set (the agent is root): the unit file, and the user its `User=` must name.
    pub require_user: Option<(PathBuf, String)>,
}

impl Systemd {
    pub fn new(unit: impl Into<String>) -> Self {
        Systemd {
            unit: unit.into(),
            systemctl: PathBuf::from("systemctl"),
            search_unit: "atlbitbucket_search.service".to_string(),
            timeout: Duration::from_secs(SCRIPT_TIMEOUT_SECS),
            require_user: None,
        }
    }

    /// Refuses a unit that would run Bitbucket as anyone but the configured user (root, when it
    /// has no `User=`), counting drop-ins next to the unit file.
    fn check_user(&self) -> Result<(), ServiceError> {
        let Some((unit_path, user)) = &self.require_user else {
            return Ok(());
        };
        let read = |p: &Path| -> Result<Option<String>, ServiceError> {
            crate::rootfs::read_config_file(p)
                .map(|b| b.map(|b| String::from_utf8_lossy(&b).into_owned()))
                .map_err(|source| ServiceError::Read {
                    file: p.to_path_buf(),
                    source,
                })
        };
        let mut texts = vec![read(unit_path)?.ok_or_else(|| ServiceError::Read {
            file: unit_path.clone(),
            source: std::io::ErrorKind::NotFound.into(),
        })?];
        let mut dropin_dirs = vec![PathBuf::from(format!("{}.d", unit_path.display()))];
        let etc = Path::new("/etc/systemd/system").join(format!("{}.d", self.unit));
        if !dropin_dirs.contains(&etc) {
            dropin_dirs.push(etc);
        }
        for dir in dropin_dirs {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            let mut confs: Vec<PathBuf> = entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "conf"))
                .collect();
            confs.sort();
            for c in confs {
                texts.extend(read(&c)?);
            }
        }
        check_unit_user(&texts, user).map_err(|reason| ServiceError::Unsafe {
            what: format!("{} ({})", self.unit, unit_path.display()),
            reason,
        })
    }

    async fn systemctl(&self, args: &[&str]) -> Result<String, ServiceError> {
        let mut cmd = Command::new(&self.systemctl);
        // The agent's own notification socket is not for its children: systemd logs every
        // message from another PID as a protocol violation.
        cmd.args(args).env_remove("NOTIFY_SOCKET");
        run_piped(cmd, self.timeout).await
    }
}

#[async_trait::async_trait]
impl ServiceManager for Systemd {
    fn kind(&self) -> &'static str {
        "systemd"
    }
    async fn stop(&self) -> Result<(), ServiceError> {
        self.check_user()?;
        self.systemctl(&["stop", &self.unit]).await.map(drop)
    }
    async fn start(&self) -> Result<(), ServiceError> {
        self.check_user()?;
        self.systemctl(&["start", &self.unit]).await.map(drop)
    }
    async fn daemon_reload(&self) -> Result<(), ServiceError> {
        self.systemctl(&["daemon-reload"]).await.map(drop)
    }
    async fn disable_bundled_search(&self) -> Result<Vec<String>, ServiceError> {
        let listed = self
            .systemctl(&["list-unit-files", "--no-legend", &self.search_unit])
            .await
            // systemctl exits 1 when no unit file matches.
            .unwrap_or_default();
        let unit_base = self.search_unit.trim_end_matches(".service");
        let present = listed.lines().any(|l| {
            l.split_whitespace().next().is_some_and(|u| {
                u == self.search_unit || u.trim_end_matches(".service") == unit_base
            })
        });
        if !present {
            return Ok(vec![format!(
                "no {} unit; nothing to disable",
                self.search_unit
            )]);
        }
        self.systemctl(&["stop", &self.search_unit]).await?;
        self.systemctl(&["disable", &self.search_unit]).await?;
        Ok(vec![format!(
            "stopped and disabled {}: a Data Center node uses remote search",
            self.search_unit
        )])
    }
}

/// init.d: `<script> stop|start`, as root. Refused when the Bitbucket user could edit the
/// script or a script of the install it runs.
#[derive(Debug, Clone)]
pub struct Initd {
    pub script: PathBuf,
    /// The bundled search script, `/etc/init.d/atlbitbucket_search` by default.
    pub search_script: PathBuf,
    /// Where the script's output goes (it backgrounds the JVM, which inherits it).
    pub log_file: PathBuf,
    pub timeout: Duration,
    /// When set (the agent is root): the Bitbucket user, and the active install whose `bin/*.sh`
    /// the init script runs.
    pub guard: Option<(BitbucketUser, Arc<RwLock<PathBuf>>)>,
}

impl Initd {
    pub fn new(script: impl Into<PathBuf>, log_file: impl Into<PathBuf>) -> Self {
        Initd {
            script: script.into(),
            search_script: PathBuf::from("/etc/init.d/atlbitbucket_search"),
            log_file: log_file.into(),
            timeout: Duration::from_secs(SCRIPT_TIMEOUT_SECS),
            guard: None,
        }
    }

    /// Refuses to run `script` as root when the Bitbucket user could edit it, a directory above
    /// it, or a `bin/*.sh` of the active install (which the init script runs).
    fn check_writable(&self, script: &Path) -> Result<(), ServiceError> {
        let Some((user, install)) = &self.guard else {
            return Ok(());
        };
        let install = match install.read() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        let mut paths = vec![script.to_path_buf(), install.join("bin")];
        if let Ok(entries) = std::fs::read_dir(install.join("bin")) {
            let mut scripts: Vec<PathBuf> = entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "sh"))
                .collect();
            scripts.sort();
            paths.extend(scripts);
        }
        // The installer's init script lets start-bitbucket.sh switch to the user this file names.
        let user_file = Path::new("bin/set-bitbucket-user.sh");
        let named = crate::rootfs::open_install(&install)
            .and_then(|d| d.read(user_file))
            .ok()
            .flatten()
            .and_then(|t| parse_bitbucket_user(&String::from_utf8_lossy(&t)))
            .filter(|n| !n.is_empty());
        if let Some(named) = named
            && named != user.name
        {
            return Err(ServiceError::Unsafe {
                what: script.display().to_string(),
                reason: format!(
                    "{} sets BITBUCKET_USER={named}, but the agent config runs Bitbucket as {}; make them agree (edit that file, or set bitbucket.user in the agent config)",
                    install.join(user_file).display(),
                    user.name
                ),
            });
        }
        match user_writable(&paths, &user.reader()) {
            None => Ok(()),
            Some(w) => Err(ServiceError::Unsafe {
                what: format!("{} as root", script.display()),
                reason: format!(
                    "the Bitbucket user {} can write {}, so it could make root run anything: make it root-owned and not group/other-writable (chown root:root, chmod go-w), or upgrade to an install bbupgrade staged",
                    user.name,
                    w.display()
                ),
            }),
        }
    }

    async fn run(&self, script: &Path, action: &str) -> Result<(), ServiceError> {
        self.check_writable(script)?;
        let mut cmd = Command::new(script);
        cmd.arg(action);
        clean_env(&mut cmd, "/root");
        run_logged(cmd, &self.log_file, self.timeout).await
    }
}

#[async_trait::async_trait]
impl ServiceManager for Initd {
    fn kind(&self) -> &'static str {
        "initd"
    }
    async fn stop(&self) -> Result<(), ServiceError> {
        self.run(&self.script, "stop").await
    }
    async fn start(&self) -> Result<(), ServiceError> {
        self.run(&self.script, "start").await
    }
    async fn daemon_reload(&self) -> Result<(), ServiceError> {
        Ok(())
    }
    async fn disable_bundled_search(&self) -> Result<Vec<String>, ServiceError> {
        if !self.search_script.exists() {
            return Ok(vec![format!(
                "no {}; nothing to stop",
                self.search_script.display()
            )]);
        }
        self.run(&self.search_script, "stop").await?;
        Ok(vec![format!(
            "stopped {}; it still starts at boot: remove it from the runlevels (update-rc.d -f atlbitbucket_search remove, or chkconfig atlbitbucket_search off)",
            self.search_script.display()
        )])
    }
}

/// No service manager: the product's `bin/start-bitbucket.sh --no-search` / `stop-bitbucket.sh`.
#[derive(Debug, Clone)]
pub struct Scripts {
    /// The active install; activation switches it.
    pub install: Arc<RwLock<PathBuf>>,
    pub run_as: RunAs,
    /// Where the scripts' output goes (the started JVM inherits it).
    pub log_file: PathBuf,
    pub timeout: Duration,
}

impl Scripts {
    pub fn new(install: Arc<RwLock<PathBuf>>, run_as: RunAs, log_file: impl Into<PathBuf>) -> Self {
        Scripts {
            install,
            run_as,
            log_file: log_file.into(),
            timeout: Duration::from_secs(SCRIPT_TIMEOUT_SECS),
        }
    }

    fn active_install(&self) -> PathBuf {
        match self.install.read() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    async fn run(&self, script: &str, args: &[&str]) -> Result<(), ServiceError> {
        let install = self.active_install();
        let path = install.join("bin").join(script);
        let user_file = install.join("bin/set-bitbucket-user.sh");
        // The file is the Bitbucket user's to edit in an install that predates bbupgrade: read it
        // without links, only as that user could.
        let reader = match &self.run_as {
            RunAs::User(u) => u.reader(),
            RunAs::Current => crate::rootfs::Reader::current(),
        };
        let script_user = crate::rootfs::open_install(&install)
            .and_then(|d| d.read_as(Path::new("bin/set-bitbucket-user.sh"), &reader))
            .map_err(|source| ServiceError::Read {
                file: user_file,
                source,
            })?
            .and_then(|t| parse_bitbucket_user(&String::from_utf8_lossy(&t)));
        let is_root = nix::unistd::geteuid().is_root();
        let plan =
            plan_script_run(is_root, script_user.as_deref(), &self.run_as).map_err(|reason| {
                ServiceError::RefuseRoot {
                    script: path.display().to_string(),
                    reason,
                }
            })?;
        // A fixed argument list; no BITBUCKET_USER in the environment, so the product's script
        // never tries to switch users again.
        let mut cmd = Command::new(&path);
        cmd.args(args).current_dir(install.join("bin"));
        let home = match &plan {
            Invocation::AsUser(user) => {
                drop_privileges(&mut cmd, user).map_err(|source| ServiceError::Spawn {
                    command: describe(&cmd),
                    source,
                })?;
                user.home()
            }
            Invocation::Direct => std::env::var("HOME").unwrap_or_else(|_| "/".to_string()),
        };
        clean_env(&mut cmd, &home);
        run_logged(cmd, &self.log_file, self.timeout).await
    }
}

#[async_trait::async_trait]
impl ServiceManager for Scripts {
    fn kind(&self) -> &'static str {
        "scripts"
    }
    async fn stop(&self) -> Result<(), ServiceError> {
        self.run("stop-bitbucket.sh", &[]).await
    }
    async fn start(&self) -> Result<(), ServiceError> {
        self.run("start-bitbucket.sh", &["--no-search"]).await
    }
    async fn daemon_reload(&self) -> Result<(), ServiceError> {
        Ok(())
    }
    async fn disable_bundled_search(&self) -> Result<Vec<String>, ServiceError> {
        Ok(vec![
            "the node is started with --no-search, so the bundled search does not start"
                .to_string(),
        ])
    }
}

/// What `/status` says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeStatus {
    Running,
    Starting,
    Stopping,
    Error,
    FirstRun,
    Other(String),
    Unreachable(String),
}

impl std::fmt::Display for NodeStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NodeStatus::Running => f.write_str("RUNNING"),
            NodeStatus::Starting => f.write_str("STARTING"),
            NodeStatus::Stopping => f.write_str("STOPPING"),
            NodeStatus::Error => f.write_str("ERROR"),
            NodeStatus::FirstRun => f.write_str("FIRST_RUN"),
            NodeStatus::Other(s) => write!(f, "{s}"),
            NodeStatus::Unreachable(e) => write!(f, "unreachable ({e})"),
        }
    }
}

/// Parse a `/status` body `{"state":"…"}` (whatever the HTTP code).
pub fn parse_status(body: &str) -> NodeStatus {
    #[derive(serde::Deserialize)]
    struct Body {
        state: String,
    }
    match serde_json::from_str::<Body>(body) {
        Ok(b) => match b.state.as_str() {
            "RUNNING" => NodeStatus::Running,
            "STARTING" => NodeStatus::Starting,
            "STOPPING" => NodeStatus::Stopping,
            "ERROR" => NodeStatus::Error,
            "FIRST_RUN" => NodeStatus::FirstRun,
            other => NodeStatus::Other(other.to_string()),
        },
        Err(_) => NodeStatus::Other(format!("unparsable status: {}", tail(body, 1))),
    }
}

pub async fn read_status(client: &reqwest::Client, status_url: &str) -> NodeStatus {
    let resp = client
        .get(status_url)
        .timeout(Duration::from_millis(STATUS_REQUEST_TIMEOUT_MS))
        .send()
        .await;
    match resp {
        Err(e) => NodeStatus::Unreachable(e.to_string()),
        Ok(r) => match r.text().await {
            Ok(body) => parse_status(&body),
            Err(e) => NodeStatus::Unreachable(e.to_string()),
        },
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_millis(STATUS_REQUEST_TIMEOUT_MS))
        .build()
        .unwrap_or_default()
}

/// What [`wait_stopped`] saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StopReport {
    pub pid: Option<i32>,
    pub killed: bool,
    pub waited: Duration,
}

/// The pid in Bitbucket's pid file (in its home, which the Bitbucket user can write): never read
/// through a link at the file, and only a few bytes of a regular file.
fn read_pid(pid_file: &Path) -> Option<i32> {
    let (dir, name) = crate::rootfs::Dir::open_parent_trusted(pid_file).ok()?;
    let (file, st) = dir.open_file(Path::new(&name)).ok()??;
    if st.st_size > PID_FILE_MAX_BYTES {
        return None;
    }
    let mut text = String::new();
    std::io::Read::read_to_string(
        &mut std::io::Read::take(file, PID_FILE_MAX_BYTES as u64),
        &mut text,
    )
    .ok()?;
    text.trim().parse().ok().filter(|p: &i32| *p > 0)
}

/// The owner of a running process, from `/proc`.
fn process_uid(pid: i32) -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(format!("/proc/{pid}"))
        .ok()
        .map(|m| m.uid())
}

/// Whether a process exists and is not a zombie waiting to be reaped.
fn alive(pid: i32) -> bool {
    use nix::sys::signal::kill;
    use nix::unistd::Pid;
    match kill(Pid::from_raw(pid), None) {
        Err(nix::errno::Errno::ESRCH) => false,
        _ => {
            // `/proc/<pid>/stat`: "pid (comm) S …"; a zombie has exited already.
            match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
                Ok(s) => s
                    .rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().next())
                    .is_none_or(|state| state != "Z"),
                Err(_) => true,
            }
        }
    }
}

/// Wait until the pid in `pid_file` has exited (or the file is gone) and `/status` no longer
/// answers. On timeout: an error naming the pid and state, or SIGKILL when `kill_after_timeout`.
pub async fn wait_stopped(
    pid_file: &Path,
    status_url: &str,
    timeout: Duration,
    kill_after_timeout: bool,
) -> Result<StopReport, ServiceError> {
    let client = client();
    let started = tokio::time::Instant::now();
    let mut seen_pid = None;
    loop {
        let pid = read_pid(pid_file);
        if pid.is_some() {
            seen_pid = pid;
        }
        let proc_alive = pid.is_some_and(alive);
        let status = read_status(&client, status_url).await;
        let answering = !matches!(status, NodeStatus::Unreachable(_));
        if !proc_alive && !answering {
            return Ok(StopReport {
                pid: seen_pid,
                killed: false,
                waited: started.elapsed(),
            });
        }
        if started.elapsed() >= timeout {
            if kill_after_timeout && let Some(p) = pid.filter(|p| alive(*p)) {
                use nix::sys::signal::{Signal, kill};
                // The pid file is the Bitbucket user's to write: never kill a root process for it.
                if process_uid(p) == Some(0) {
                    return Err(ServiceError::Unsafe {
                        what: format!("kill pid {p} (from {})", pid_file.display()),
                        reason: "it is a root process, and Bitbucket never runs as root: stop it by hand if it really is Bitbucket".to_string(),
                    });
                }
                kill(nix::unistd::Pid::from_raw(p), Signal::SIGKILL)
                    .map_err(|source| ServiceError::Kill { pid: p, source })?;
                let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
                while alive(p) && tokio::time::Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(POLL_MS)).await;
                }
                return Ok(StopReport {
                    pid: Some(p),
                    killed: true,
                    waited: started.elapsed(),
                });
            }
            return Err(ServiceError::StopTimeout {
                secs: timeout.as_secs(),
                pid: pid.map_or_else(
                    || format!("file {} gone", pid_file.display()),
                    |p| p.to_string(),
                ),
                alive: if proc_alive { "running" } else { "exited" },
                state: status.to_string(),
            });
        }
        tokio::time::sleep(Duration::from_millis(POLL_MS)).await;
    }
}

/// Poll `/status` until RUNNING. ERROR and FIRST_RUN fail at once; errors carry the tail of the
/// Bitbucket log, read as `user` (see [`user_file_tail`]).
pub async fn wait_running(
    status_url: &str,
    timeout: Duration,
    log_file: &Path,
    user: Option<&BitbucketUser>,
) -> Result<NodeStatus, ServiceError> {
    let client = client();
    let started = tokio::time::Instant::now();
    loop {
        let status = read_status(&client, status_url).await;
        match status {
            NodeStatus::Running => return Ok(status),
            NodeStatus::Error => {
                return Err(ServiceError::NodeError {
                    url: status_url.to_string(),
                    log_tail: user_file_tail(log_file, user).await,
                });
            }
            NodeStatus::FirstRun => {
                return Err(ServiceError::FirstRun {
                    url: status_url.to_string(),
                    log_tail: user_file_tail(log_file, user).await,
                });
            }
            _ => {}
        }
        if started.elapsed() >= timeout {
            return Err(ServiceError::StartTimeout {
                url: status_url.to_string(),
                secs: timeout.as_secs(),
                last: status.to_string(),
                log_tail: user_file_tail(log_file, user).await,
            });
        }
        tokio::time::sleep(Duration::from_millis(POLL_MS)).await;
    }
}

mod as_user;
#[cfg(test)]
mod tests;
