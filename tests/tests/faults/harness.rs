//! What every fault case needs: a small sandbox with short deadlines, the `bbupgrade` CLI as a
//! child whose JSON step events arrive while it runs (to inject a fault at the right moment), and
//! the end-state checks — one version everywhere and serving, never two nodes out at once.

use bbupgrade::journal::{Journal, RunId, StepOutcome, StepRecord};
use bbupgrade::loadbalancer::{AdminState, OperState};
use bbupgrade_demo::sandbox::{Sandbox, SandboxLb};
use bbupgrade_sim::load::{LoadHandle, LoadOptions};
pub use bbupgrade_tests::cli_process::{Cli, Finished, args, haproxy, is_step};
use bbupgrade_tests::{Bins, sandbox_options, start_sandbox};
use serde_json::Value;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const FROM: &str = "8.19.3";
pub const TO: &str = "8.19.6";
/// Longest the cluster may take to settle (health checks, heartbeats) once a run ended.
const SETTLE_SECS: u64 = 20;

/// Short deadlines, so a fault halts a run in seconds rather than minutes.
pub const FAST_TIMEOUTS: &str = "drain_secs = 5\nstop_secs = 8\nstart_secs = 10\nactive_secs = 10\nsoak_secs = 1\nagent_connect_ms = 2000\n";

// ---------------------------------------------------------------------------------------------
// The sandbox.

/// A sandbox of `nodes` nodes behind a real HAProxy, with `timeouts` in its inventory.
pub async fn sandbox(
    bins: &Bins,
    dir: &Path,
    nodes: usize,
    payload_mib: u64,
    timeouts: &str,
) -> Sandbox {
    let mut opts = sandbox_options(bins, nodes, SandboxLb::Haproxy);
    opts.payload_mib = payload_mib;
    let s = start_sandbox(dir, opts)
        .await
        .expect("starting the sandbox");
    edit_inventory(&s, |inv| {
        let start = inv.find("[timeouts]\n").expect("a [timeouts] section") + "[timeouts]\n".len();
        let end = start + inv[start..].find("\n\n").expect("the end of [timeouts]") + 1;
        format!("{}{timeouts}{}", &inv[..start], &inv[end..])
    });
    s
}

/// Rewrites the sandbox's inventory.
pub fn edit_inventory(s: &Sandbox, edit: impl FnOnce(String) -> String) {
    let text = bbupgrade_tests::read(&s.inventory);
    std::fs::write(&s.inventory, edit(text)).expect("writing the inventory");
}

/// The node's index in the sandbox.
pub fn index_of(s: &Sandbox, node: &str) -> usize {
    s.sim
        .nodes()
        .iter()
        .position(|n| n.name == node)
        .unwrap_or_else(|| panic!("no node {node}"))
}

// ---------------------------------------------------------------------------------------------
// The CLI as a child process.

/// `bbupgrade upgrade --to TO --archive <the sandbox's new release> --output json`.
pub fn upgrade(bins: &Bins, s: &Sandbox) -> Cli {
    let archive = s.to_archive.path.display().to_string();
    Cli::spawn(
        bins,
        &args(s, "upgrade", &["--to", TO, "--archive", &archive]),
    )
}

/// `bbupgrade <command>` (`resume`, `rollback`) to its end.
pub async fn run(bins: &Bins, s: &Sandbox, command: &str) -> Finished {
    Cli::spawn(bins, &args(s, command, &[])).finish().await
}

/// The node an event is about.
pub fn node_of(v: &Value) -> String {
    v["node"]
        .as_str()
        .expect("an event about a node")
        .to_string()
}

/// Asserts a run halted and its report names `node` and says what went wrong (any of `problem`).
pub fn assert_halted_naming(f: &Finished, node: &str, problem: &[&str]) -> Value {
    let s = f.summary();
    assert_eq!(s["result"], "halted", "{}", f.describe());
    assert_eq!(f.code, Some(1), "{}", f.describe());
    let text = f.report_text();
    assert!(
        text.contains(&format!("'{node}'")),
        "the report does not name {node}: {text}"
    );
    assert!(
        problem.iter().any(|p| text.contains(p)),
        "the report does not say {problem:?}: {text}"
    );
    s
}

// ---------------------------------------------------------------------------------------------
// The end state and the one-node-out discipline.

/// Waits until every node answers `/status` RUNNING, all run the same version, and HAProxy has
/// every server in rotation and up; returns that version.
pub async fn assert_serving_one_version(s: &Sandbox) -> String {
    let deadline = Instant::now() + Duration::from_secs(SETTLE_SECS);
    let lb = haproxy(s);
    loop {
        let mut problems = Vec::new();
        let mut versions = Vec::new();
        for n in s.sim.nodes() {
            match sim_info(&n.base_url).await {
                Ok(info) if info["state"] == "RUNNING" => {
                    versions.push(info["version"].as_str().unwrap_or("?").to_string())
                }
                Ok(info) => problems.push(format!("{} is {}", n.name, info["state"])),
                Err(e) => problems.push(format!("{}: {e}", n.name)),
            }
            match lb.server_state(&n.name).await {
                Ok(st) if st.admin == AdminState::Ready && st.operational == OperState::Up => {}
                Ok(st) => problems.push(format!(
                    "haproxy has {} {}/{}",
                    n.name, st.admin, st.operational
                )),
                Err(e) => problems.push(format!("haproxy: {e}")),
            }
        }
        versions.dedup();
        if versions.len() > 1 {
            problems.push(format!("mixed versions {versions:?}"));
        }
        if problems.is_empty() {
            return versions.pop().expect("a version");
        }
        assert!(
            Instant::now() < deadline,
            "the cluster is not serving one version: {}",
            problems.join("; ")
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn sim_info(base_url: &str) -> anyhow::Result<Value> {
    Ok(reqwest::get(format!("{base_url}/sim/info"))
        .await?
        .error_for_status()?
        .json()
        .await?)
}

/// The node's own `/status` state.
pub async fn status_of(s: &Sandbox, node: &str) -> String {
    let n = &s.sim.nodes()[index_of(s, node)];
    sim_info(&n.base_url)
        .await
        .map(|v| v["state"].as_str().unwrap_or("?").to_string())
        .unwrap_or_else(|e| format!("unreachable ({e})"))
}

/// Every step of every run of the sandbox's cluster, in the order they began.
pub fn all_steps(s: &Sandbox) -> Vec<StepRecord> {
    let journal = Journal::open(&s.dir.join("journal.db")).expect("opening the journal");
    let Some(last) = journal.latest_run(&s.cluster_name).expect("latest run") else {
        return Vec::new();
    };
    let mut steps: Vec<StepRecord> = (1..=last.id.0)
        .flat_map(|id| journal.steps(RunId(id)).unwrap_or_default())
        .collect();
    steps.sort_by_key(|st| (st.started_ms, st.id.0));
    steps
}

/// From the journal: each node's times out of the load balancer, from a `drain` (or `disable`)
/// begin to the next completed `enable`; asserts they never overlap across nodes and none is
/// left open. Returns the intervals as text for the log.
pub fn assert_one_out_at_a_time(s: &Sandbox) -> String {
    let steps = all_steps(s);
    let mut open: Vec<(String, i64)> = Vec::new();
    let mut closed: Vec<(String, i64, i64)> = Vec::new();
    for st in &steps {
        let Some(node) = &st.node else { continue };
        match st.step.as_str() {
            "drain" | "disable" if !open.iter().any(|(n, _)| n == node) => {
                open.push((node.clone(), st.started_ms))
            }
            "enable" if st.outcome == Some(StepOutcome::Ok) => {
                if let Some(i) = open.iter().position(|(n, _)| n == node) {
                    let (n, from) = open.remove(i);
                    closed.push((n, from, st.ended_ms.unwrap_or(i64::MAX)));
                }
            }
            _ => {}
        }
    }
    assert!(
        open.is_empty(),
        "left out of the load balancer per the journal: {open:?}"
    );
    for (i, a) in closed.iter().enumerate() {
        for b in &closed[i + 1..] {
            assert!(
                a.0 == b.0 || a.2 <= b.1 || b.2 <= a.1,
                "two nodes out of the load balancer at once: {a:?} and {b:?}"
            );
        }
    }
    closed
        .iter()
        .map(|(n, a, b)| format!("{n} out {} ms", b - a))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Whether any step of `node` named `step` is in the journal.
pub fn has_step(s: &Sandbox, node: &str, step: &str) -> bool {
    all_steps(s)
        .iter()
        .any(|st| st.step == step && st.node.as_deref() == Some(node))
}

/// Polls HAProxy while a test runs and remembers the most servers ever out of rotation at once;
/// with traffic, also sends users' requests, HTTP clones and Git clones over SSH through it.
pub struct LbWatch {
    stop: Arc<AtomicBool>,
    max_out: Arc<AtomicUsize>,
    worst: Arc<Mutex<String>>,
    task: Option<tokio::task::JoinHandle<()>>,
    traffic: Option<LoadHandle>,
}

/// How long a Git clone over SSH takes during a fault case (well within `drain_secs`).
const SSH_CLONE_MS: &str = "300";

impl LbWatch {
    /// [`Self::start`] plus light traffic through HAProxy's two front doors (HTTP and SSH), for
    /// the cases whose fault must cost no user anything: [`Self::assert_at_most_one_out`] then
    /// also asserts that no request and no SSH session failed.
    pub fn with_traffic(s: &Sandbox) -> Self {
        s.sim
            .set_shared_property("sim.ssh.clone.ms", SSH_CLONE_MS)
            .expect("ssh clone time");
        let mut w = Self::start(s);
        w.traffic = Some(bbupgrade_sim::load::start(LoadOptions {
            base_url: s.traffic_url(),
            users: 4,
            clone_every: 10,
            ssh_addr: Some(s.ssh_addr()),
            ssh_clone_every: 5,
            think_ms: 20,
            duration: None,
            request_timeout: Duration::from_secs(30),
        }));
        w
    }

    pub fn start(s: &Sandbox) -> Self {
        let lb = haproxy(s);
        let servers: Vec<String> = s.sim.nodes().iter().map(|n| n.name.clone()).collect();
        let (stop, max_out, worst) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicUsize::new(0)),
            Arc::new(Mutex::new(String::new())),
        );
        let (st, mo, w) = (stop.clone(), max_out.clone(), worst.clone());
        let task = tokio::spawn(async move {
            while !st.load(Ordering::SeqCst) {
                let mut out = Vec::new();
                for server in &servers {
                    // The socket may be away on purpose; a failed sample is no sample.
                    if let Ok(state) = lb.server_state(server).await
                        && state.admin != AdminState::Ready
                    {
                        out.push(format!("{server}={}", state.admin));
                    }
                }
                if out.len() > mo.load(Ordering::SeqCst) {
                    mo.store(out.len(), Ordering::SeqCst);
                    *w.lock().unwrap_or_else(|p| p.into_inner()) = out.join(" ");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        Self {
            stop,
            max_out,
            worst,
            task: Some(task),
            traffic: None,
        }
    }

    /// Stops watching; asserts no two servers were ever out of rotation at once and, with
    /// traffic, that it got through (SSH too) and no request or SSH session failed. Says what the
    /// traffic was.
    pub async fn assert_at_most_one_out(mut self) -> String {
        let traffic = match self.traffic.take() {
            Some(load) => {
                let r = load.stop().await;
                assert!(
                    r.total > 0 && r.ssh_total > 0,
                    "no traffic got through: {r:#?}"
                );
                assert_eq!(r.failed, 0, "failed requests: {:#?}", r.failures);
                assert_eq!(r.ssh_failed, 0, "failed SSH clones: {:#?}", r.failures);
                format!(
                    "; {} requests and {} SSH clones, none failed",
                    r.total, r.ssh_total
                )
            }
            None => String::new(),
        };
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
        let worst = self.worst.lock().unwrap_or_else(|p| p.into_inner()).clone();
        assert!(
            self.max_out.load(Ordering::SeqCst) <= 1,
            "HAProxy had several servers out of rotation at once: {worst}"
        );
        traffic
    }
}

impl Drop for LbWatch {
    fn drop(&mut self) {
        if let Some(t) = &self.task {
            t.abort();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Process and file-system faults, undone on drop.

/// A process frozen with SIGSTOP; SIGCONT on drop (pass or fail) so it can be stopped normally.
pub struct Frozen(pub u32);

impl Frozen {
    pub fn freeze(pid: u32) -> Self {
        use nix::sys::signal::{Signal, kill};
        kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGSTOP).expect("SIGSTOP");
        Frozen(pid)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        use nix::sys::signal::{Signal, kill};
        let _ = kill(nix::unistd::Pid::from_raw(self.0 as i32), Signal::SIGCONT);
    }
}

/// A small tmpfs mounted for the test; unmounted (lazily) on drop.
pub struct Tmpfs(pub std::path::PathBuf);

impl Tmpfs {
    /// Mounts one of `mib` MiB at `dir`, or `None` when this machine does not allow it.
    pub fn mount(dir: &Path, mib: u64) -> Option<Self> {
        std::fs::create_dir_all(dir).expect("creating the mount point");
        let ok = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={mib}m,mode=0755"),
                "tmpfs",
            ])
            .arg(dir)
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Tmpfs(dir.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}
