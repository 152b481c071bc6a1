//! The release's `bin/` scripts as the product has them: `-fg` runs the node in the foreground
//! without `exec` and without a PID file; a second start is not refused; `BIN_DIR` of the start
//! script is the directory of `$0` as invoked; the stop script ignores its arguments and exits with
//! the status of its last step.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Kills what it holds when dropped (a test that fails leaves nothing running).
struct Reaper {
    child: Option<Child>,
    pids: Vec<i32>,
}

impl Drop for Reaper {
    fn drop(&mut self) {
        for &pid in &self.pids {
            if is_sim(pid) {
                kill(Pid::from_raw(pid), Signal::SIGKILL).ok();
            }
        }
        if let Some(child) = &mut self.child {
            child.kill().ok();
            child.wait().ok();
        }
    }
}

/// A live (not zombie) simulator process.
fn is_sim(pid: i32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .is_ok_and(|c| String::from_utf8_lossy(&c).contains("bitbucket-sim"))
}

fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_name = &stat[stat.rfind(')')? + 1..];
    after_name.split_whitespace().nth(1)?.parse().ok()
}

fn script(path: &Path) -> Command {
    let mut cmd = Command::new(path);
    cmd.stdin(Stdio::null())
        .env_remove("BITBUCKET_HOME")
        .env_remove("BITBUCKET_USER")
        .env_remove("JVM_SUPPORT_RECOMMENDED_ARGS");
    cmd
}

#[test]
fn foreground_start_runs_without_exec_and_without_pid_file() {
    let c = cluster(1, "8.19.3");
    let node = c.nodes()[0].clone();
    let bin = node.install_dir.join("bin");
    let mut reaper = Reaper {
        child: None,
        pids: Vec::new(),
    };
    let child = script(&bin.join("start-bitbucket.sh"))
        .args(["--no-search", "-fg"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start -fg");
    let script_pid = child.id();
    reaper.child = Some(child);
    c.wait_status(0, "RUNNING", TIMEOUT).expect("RUNNING");
    let info = c.node_info(0).expect("info");
    reaper.pids.push(info.pid as i32);

    assert!(
        !node.home.join("log/bitbucket.pid").exists(),
        "no PID file in the foreground form"
    );
    assert_ne!(info.pid, script_pid, "the script did not exec the node");
    // The node is a descendant of the script (start-bitbucket.sh -> _start-webapp.sh -> node).
    let mut ancestor = parent_of(info.pid);
    let mut depth = 0;
    while let Some(p) = ancestor
        && p != script_pid
        && p > 1
        && depth < 5
    {
        ancestor = parent_of(p);
        depth += 1;
    }
    assert_eq!(ancestor, Some(script_pid), "the node runs under the script");

    // Stopping the node ends the script, with the status of its last step.
    kill(Pid::from_raw(info.pid as i32), Signal::SIGTERM).expect("SIGTERM");
    let mut status = None;
    wait_until("the script to end", TIMEOUT, || {
        status = reaper
            .child
            .as_mut()
            .and_then(|c| c.try_wait().expect("try_wait"));
        status.is_some()
    });
    assert_eq!(status.and_then(|s| s.code()), Some(0));
    reaper.child = None;
}

#[test]
fn a_second_start_is_not_refused_and_overwrites_the_pid_file() {
    let c = cluster(1, "8.19.3");
    let pid_file = c.nodes()[0].home.join("log/bitbucket.pid");
    c.start_node(0, true).expect("start");
    c.wait_status(0, "RUNNING", TIMEOUT).expect("RUNNING");
    let first = c.node_info(0).expect("info").pid as i32;
    let _reaper = Reaper {
        child: None,
        pids: vec![first],
    };
    assert_eq!(c.node_pid(0), Some(first));

    // The scripts start a second process, which cannot bind the port and exits.
    c.start_node(0, true).expect("the script does not refuse");
    let second = c.node_pid(0).expect("PID file");
    assert_ne!(second, first, "the PID file now names the second process");
    wait_until("the second process to exit", TIMEOUT, || !is_sim(second));
    assert_eq!(c.status(0).as_deref(), Some("RUNNING"));

    // So the stop script finds a stale PID file and leaves the first process running.
    c.stop_node(0).expect("stop");
    assert!(!pid_file.exists());
    assert_eq!(c.status(0).as_deref(), Some("RUNNING"));
    assert!(is_sim(first));
    kill(Pid::from_raw(first), Signal::SIGTERM).expect("SIGTERM");
    wait_until("the first process to stop", TIMEOUT, || !is_sim(first));
}

#[test]
fn bin_dir_arguments_and_exit_status() {
    let c = cluster(1, "8.19.3");
    let bin = c.nodes()[0].install_dir.join("bin");

    // Started through a link elsewhere, the start script looks for its helpers next to the link.
    let links = c.dir().join("links");
    std::fs::create_dir_all(&links).expect("mkdir");
    for name in ["start-bitbucket.sh", "stop-bitbucket.sh"] {
        std::os::unix::fs::symlink(bin.join(name), links.join(name)).expect("link");
    }
    let out = script(&links.join("start-bitbucket.sh"))
        .arg("--no-search")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("Startup has been aborted"));
    assert_eq!(c.status(0), None);
    // The stop script follows the link, and ignores its arguments.
    let out = script(&links.join("stop-bitbucket.sh"))
        .args(["--bogus", "x"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("not running"));

    // A webapp that outlasts the stop's wait: the stop script still exits 0 (its last step,
    // stopping search, succeeded) while the node runs on.
    c.set_shared_property("sim.fault.stop.ignore.ms", "2000")
        .expect("property");
    c.start_node(0, true).expect("start");
    c.wait_status(0, "RUNNING", TIMEOUT).expect("RUNNING");
    let pid = c.node_pid(0).expect("pid");
    let _reaper = Reaper {
        child: None,
        pids: vec![pid],
    };
    let out = script(&bin.join("stop-bitbucket.sh"))
        .env("BITBUCKET_STOP_WAIT_SECS", "0")
        .output()
        .expect("run");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("did not stop"), "{text}");
    assert!(is_sim(pid), "the node still runs");
    wait_until(
        "the node to stop by itself",
        Duration::from_secs(10),
        || !is_sim(pid),
    );
}
