//! Shared pieces of the end-to-end tests: where the binaries are, a sandbox cluster with real agents
//! and (optionally) a real HAProxy, a lone agent process to attack (`agent_process`), and running
//! the `bbupgrade` CLI as a process.
//!
//! Integration tests get the binary paths with [`bins!`], because `CARGO_BIN_EXE_*` is only set
//! while compiling the test package's integration tests.

pub mod agent_process;
pub mod cli_process;
pub mod faultproxy;
pub mod fleet_standin;
pub mod systemd_harness;

use anyhow::{Context, Result};
use bbupgrade_demo::sandbox::{BitbucketForm, Sandbox, SandboxLb, SandboxOptions, SandboxService};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Paths of the programs, built by cargo before the integration tests run.
#[derive(Clone, Debug)]
pub struct Bins {
    pub bbupgrade: PathBuf,
    pub agent: PathBuf,
    pub sim: PathBuf,
    /// `bbupgrade-demo`, which `bbupgrade demo` runs.
    pub demo: PathBuf,
}

/// `Bins` for the calling integration test.
#[macro_export]
macro_rules! bins {
    () => {
        $crate::Bins {
            bbupgrade: env!("CARGO_BIN_EXE_e2e-bbupgrade").into(),
            agent: env!("CARGO_BIN_EXE_e2e-agent").into(),
            sim: env!("CARGO_BIN_EXE_e2e-sim").into(),
            demo: env!("CARGO_BIN_EXE_e2e-demo").into(),
        }
    };
}

/// Fails (not skips) when a load balancer a test needs is missing, unless told to skip.
pub fn require_program(name: &str) -> bool {
    let found = ["/usr/sbin", "/usr/bin", "/sbin", "/bin"]
        .iter()
        .any(|d| Path::new(d).join(name).is_file());
    if found {
        return true;
    }
    if std::env::var("BBUPGRADE_SKIP_LB_TESTS").as_deref() == Ok("1") {
        eprintln!("SKIPPED: {name} is not installed and BBUPGRADE_SKIP_LB_TESTS=1");
        return false;
    }
    panic!(
        "{name} is not installed: apt-get install -y {name} (or set BBUPGRADE_SKIP_LB_TESTS=1 to skip)"
    );
}

/// Options for a small, fast sandbox.
pub fn sandbox_options(bins: &Bins, nodes: usize, lb: SandboxLb) -> SandboxOptions {
    SandboxOptions {
        nodes,
        from: "8.19.3".into(),
        to: "8.19.6".into(),
        payload_mib: 1,
        startup_ms: 800,
        lb,
        user_when_root: "nobody".into(),
        agent_bin: bins.agent.clone(),
        sim_bin: bins.sim.clone(),
        lb_standin: false,
        bitbucket: BitbucketForm {
            // `.ci/run` runs the end-to-end suites once more with node names configured.
            node_names: std::env::var("BBUPGRADE_TEST_NODE_NAMES").as_deref() == Ok("1"),
            ..BitbucketForm::default()
        },
        service: SandboxService::Scripts,
    }
}

/// Creates a sandbox in `dir`, waits for its agents, and starts its nodes through them.
pub async fn start_sandbox(dir: &Path, opts: SandboxOptions) -> Result<Sandbox> {
    Sandbox::start(dir, opts).await
}

/// A temporary directory other users can traverse (the Bitbucket user is `nobody` under root).
pub fn temp_dir() -> tempfile::TempDir {
    let d = tempfile::Builder::new()
        .prefix("bbupgrade-e2e-")
        .tempdir()
        .expect("temp dir");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    d
}

/// `bbupgrade` with arguments, told where the test builds of the other programs are (for `demo`).
pub fn bbupgrade_command(bins: &Bins, args: &[impl AsRef<std::ffi::OsStr>]) -> Command {
    let mut command = Command::new(&bins.bbupgrade);
    command
        .args(args)
        .env("BBUPGRADE_AGENT_BIN", &bins.agent)
        .env("BITBUCKET_SIM_BIN", &bins.sim)
        .env(bbupgrade::demo_launch::DEMO_PROGRAM_ENV, &bins.demo);
    command
}

/// Runs `bbupgrade` with arguments; returns its output (never panics on a non-zero exit).
pub fn bbupgrade(bins: &Bins, args: &[&str]) -> Output {
    bbupgrade_command(bins, args)
        .output()
        .expect("running bbupgrade")
}

/// The `bbupgrade` arguments that target a sandbox's cluster.
pub fn cluster_args(s: &Sandbox) -> Vec<String> {
    vec![
        "--inventory".into(),
        s.inventory.display().to_string(),
        "--cluster".into(),
        s.cluster_name.clone(),
    ]
}

/// The final summary document in `--output json` output (the last `{"event":"summary"}` line).
pub fn summary_of(stdout: &[u8]) -> Option<serde_json::Value> {
    String::from_utf8_lossy(stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["event"] == "summary")
        .map(|v| v["summary"].clone())
        .next_back()
}

/// A readable dump of a process's output for assertion messages.
pub fn describe(out: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}\n--- stderr\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The version a node's `/status`-serving process reports, via the simulator's info page.
pub async fn node_version(base_url: &str) -> Result<String> {
    let v: serde_json::Value = reqwest::get(format!("{base_url}/sim/info"))
        .await?
        .json()
        .await?;
    Ok(v["version"].as_str().unwrap_or_default().to_string())
}

/// The pid of the node's process as it reports it on `/sim/info` (the foreground `-fg` form of the
/// product's scripts writes no pid file, so this is how a test finds the "JVM").
pub async fn node_pid(base_url: &str) -> Result<u32> {
    let v: serde_json::Value = reqwest::get(format!("{base_url}/sim/info"))
        .await?
        .json()
        .await?;
    v["pid"]
        .as_u64()
        .and_then(|p| u32::try_from(p).ok())
        .with_context(|| format!("{base_url}/sim/info reports no pid: {v}"))
}

/// Reads a file, for assertions.
pub fn read(path: impl AsRef<Path>) -> String {
    std::fs::read_to_string(path.as_ref())
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.as_ref().display()))
}

/// The row of a simulated node in a `GET /rest/zdu/cluster` document: the live row at its cluster
/// port, else an OFFLINE one left there (ids change on every restart, names are "Not configured").
pub fn zdu_row<'a>(
    view: &'a serde_json::Value,
    node: &bbupgrade_sim::cluster::SimNode,
) -> Option<&'a serde_json::Value> {
    let port = node.hazelcast_port?;
    let rows: Vec<&serde_json::Value> = view["nodes"]
        .as_array()?
        .iter()
        .filter(|r| r["ipAddress"] == "127.0.0.1" && r["portNumber"].as_u64() == Some(port.into()))
        .collect();
    rows.iter()
        .find(|r| r["state"] != "OFFLINE")
        .or_else(|| rows.first())
        .copied()
}

/// Waits until the load has answered `more` requests beyond what it had answered on entry (the
/// traffic is flowing), instead of a fixed sleep; fails after 30 s.
pub async fn wait_for_traffic(load: &bbupgrade_sim::load::LoadHandle, more: u64) {
    let start = load.snapshot().total;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while load.snapshot().total < start + more {
        assert!(
            std::time::Instant::now() < deadline,
            "the load answered fewer than {more} requests in 30 s: {}",
            load.snapshot().summary_line()
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// `GET /rest/zdu/cluster` as the sysadmin, from the sandbox's first node.
pub async fn zdu_cluster(s: &Sandbox) -> serde_json::Value {
    let url = format!("{}/rest/zdu/cluster", s.sim.nodes()[0].base_url);
    reqwest::Client::new()
        .get(&url)
        .bearer_auth(bbupgrade_demo::sandbox::ADMIN_TOKEN)
        .send()
        .await
        .and_then(|r| r.error_for_status())
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
        .json()
        .await
        .expect("cluster JSON")
}
