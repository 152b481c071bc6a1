//! The `bbupgrade` CLI as a child process for end-to-end tests: its JSON step events arrive while
//! it runs (so a test can inject a fault or kill it at the right moment), and dropping it SIGKILLs
//! it, pass or fail.

use crate::{Bins, cluster_args, summary_of};
use bbupgrade::loadbalancer::{self, LbConfig, LoadBalancer};
use bbupgrade_demo::sandbox::Sandbox;
use serde_json::Value;
use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Longest one CLI command may take before the test kills it and fails.
pub const CLI_TIMEOUT_SECS: u64 = 150;
/// Longest a test waits for one event on a running CLI's stdout.
pub const EVENT_TIMEOUT_SECS: u64 = 90;

/// How a finished `bbupgrade` ended.
pub struct Finished {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Finished {
    pub fn describe(&self) -> String {
        format!(
            "exit {:?}\n--- stdout\n{}\n--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }

    /// The final summary (panics, with the output, without one).
    pub fn summary(&self) -> Value {
        summary_of(self.stdout.as_bytes())
            .unwrap_or_else(|| panic!("no summary in the output:\n{}", self.describe()))
    }

    /// The summary's error and notes in one text, for "names the node and the problem" checks.
    pub fn report_text(&self) -> String {
        let s = self.summary();
        format!("{} {}", s["error"], s["notes"])
    }
}

/// A running `bbupgrade`; dropping it SIGKILLs it, pass or fail.
pub struct Cli {
    child: Arc<Mutex<Child>>,
    events: mpsc::UnboundedReceiver<Value>,
    stdout: Option<std::thread::JoinHandle<String>>,
    stderr: Option<std::thread::JoinHandle<String>>,
    started: Instant,
}

impl Cli {
    pub fn spawn(bins: &Bins, args: &[String]) -> Self {
        let mut child = crate::bbupgrade_command(bins, args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting bbupgrade");
        let out = child.stdout.take().expect("stdout");
        let mut err = child.stderr.take().expect("stderr");
        let (tx, events) = mpsc::unbounded_channel();
        let stdout = std::thread::spawn(move || {
            let mut all = String::new();
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    let _ = tx.send(v);
                }
                all.push_str(&line);
                all.push('\n');
            }
            all
        });
        let stderr = std::thread::spawn(move || {
            let mut all = String::new();
            let _ = err.read_to_string(&mut all);
            all
        });
        Self {
            child: Arc::new(Mutex::new(child)),
            events,
            stdout: Some(stdout),
            stderr: Some(stderr),
            started: Instant::now(),
        }
    }

    /// SIGKILL, as a crashed or killed coordinator.
    pub fn kill(&self) {
        let mut c = self.child.lock().unwrap_or_else(|p| p.into_inner());
        let _ = c.kill();
        let _ = c.wait();
    }

    /// SIGINT, as an admin pressing Ctrl-C.
    pub fn interrupt(&self) {
        let c = self.child.lock().unwrap_or_else(|p| p.into_inner());
        let pid = nix::unistd::Pid::from_raw(c.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).expect("sending SIGINT");
    }

    /// Waits for the first event (from now) that `pred` accepts; panics on timeout or exit.
    pub async fn wait_event(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(EVENT_TIMEOUT_SECS);
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(v)) if pred(&v) => return v,
                Ok(Some(_)) => {}
                Ok(None) => {
                    let f = self.finish().await;
                    panic!("bbupgrade ended before {what}:\n{}", f.describe());
                }
                Err(_) => {
                    self.kill();
                    let f = self.finish().await;
                    panic!("no {what} within {EVENT_TIMEOUT_SECS}s:\n{}", f.describe());
                }
            }
        }
    }

    /// Waits for the process to exit (killing it after `CLI_TIMEOUT_SECS`) and collects its output.
    pub async fn finish(&mut self) -> Finished {
        let deadline = Instant::now() + Duration::from_secs(CLI_TIMEOUT_SECS);
        let mut timed_out = false;
        let code = loop {
            let status = {
                let mut c = self.child.lock().unwrap_or_else(|p| p.into_inner());
                c.try_wait().expect("waiting for bbupgrade")
            };
            if let Some(s) = status {
                break s.code();
            }
            if Instant::now() > deadline {
                timed_out = true;
                self.kill();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let elapsed = self.started.elapsed();
        let join = |h: Option<std::thread::JoinHandle<String>>| {
            h.map(|h| h.join().unwrap_or_default()).unwrap_or_default()
        };
        let (out, err) = (self.stdout.take(), self.stderr.take());
        let (stdout, stderr) = tokio::task::spawn_blocking(move || (join(out), join(err)))
            .await
            .expect("joining the output readers");
        let f = Finished {
            code,
            stdout,
            stderr,
            elapsed,
        };
        assert!(
            !timed_out,
            "bbupgrade did not finish within {CLI_TIMEOUT_SECS}s:\n{}",
            f.describe()
        );
        f
    }
}

impl Drop for Cli {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs `bbupgrade` to its end.
pub async fn run_cli(bins: &Bins, args: &[String]) -> Finished {
    Cli::spawn(bins, args).finish().await
}

/// `bbupgrade <command>` against the sandbox's cluster with JSON output, plus `extra`.
pub fn args(s: &Sandbox, command: &str, extra: &[&str]) -> Vec<String> {
    let mut a = vec![command.to_string()];
    a.extend(cluster_args(s));
    a.extend(["--output".into(), "json".into()]);
    a.extend(extra.iter().map(|x| x.to_string()));
    a
}

/// A step event `{"event":"step","node":..,"step":..,"status":..}` (any node when `None`).
pub fn is_step(v: &Value, node: Option<&str>, step: &str, status: &str) -> bool {
    v["event"] == "step"
        && v["step"] == step
        && v["status"] == status
        && node.is_none_or(|n| v["node"] == n)
}

/// The coordinator's HAProxy driver on the sandbox's HAProxy.
pub fn haproxy(s: &Sandbox) -> Box<dyn LoadBalancer> {
    let socket = s.haproxy_socket.as_ref().expect("the sandbox has HAProxy");
    loadbalancer::from_config(&LbConfig::Haproxy {
        socket: format!("unix:{}", socket.display()),
        backend: "bitbucket".into(),
        backends: vec![],
        server_names: Default::default(),
    })
    .expect("haproxy driver")
}
