//! `bbupgrade demo` as an administrator runs it: setups without zero downtime are refused, a
//! missing demo program is named, and `--keep` keeps a sandbox whose printed commands work as
//! printed and whose processes all stop on SIGTERM.

use bbupgrade::demo_launch::DEMO_PROGRAM_ENV;
use bbupgrade_tests::{bbupgrade, bbupgrade_command, bins, temp_dir};
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How long building a 2-node sandbox may take on a busy machine.
const SANDBOX_READY_SECS: u64 = 240;
/// How long the demo may take to stop everything after SIGTERM.
const STOP_SECS: u64 = 60;

#[test]
fn a_demo_without_zero_downtime_is_refused_unless_allowed() {
    let bins = bins!();
    for args in [&["demo", "--nodes", "1"][..], &["demo", "--lb", "none"]] {
        let out = bbupgrade(&bins, args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(
            err.contains("zero downtime needs at least two nodes behind a load balancer")
                && err.contains("--allow-downtime"),
            "{args:?}: {err}"
        );
    }
    // `bbupgrade demo --help` is the demo program's own help, passed through.
    let help = bbupgrade(&bins, &["demo", "--help"]);
    let text = String::from_utf8_lossy(&help.stdout);
    assert_eq!(help.status.code(), Some(0), "{text}");
    assert!(
        text.contains("--keep") && text.contains("--allow-downtime"),
        "{text}"
    );
}

#[test]
fn bbupgrade_demo_names_the_demo_program_it_cannot_find() {
    let bins = bins!();
    let tmp = temp_dir();
    let missing = tmp.path().join("nowhere/bbupgrade-demo");
    let out = bbupgrade_command(&bins, &["demo"])
        .env(DEMO_PROGRAM_ENV, &missing)
        .output()
        .expect("running bbupgrade");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&missing.display().to_string())
            && err.contains("cargo build --release -p bbupgrade-demo"),
        "{err}"
    );
}

/// The demo under `--keep`, killed on drop whatever happens.
struct KeptDemo {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl KeptDemo {
    fn start(bins: &bbupgrade_tests::Bins, dir: &Path, log: &Path) -> Self {
        let dir = dir.display().to_string();
        let args = [
            "demo",
            "--keep",
            "--dir",
            &dir,
            "--nodes",
            "2",
            "--payload-mib",
            "1",
        ];
        let mut child = bbupgrade_command(bins, &args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(log).expect("demo log"))
            .spawn()
            .expect("starting bbupgrade demo --keep");
        let out = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        KeptDemo {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Reads standard output until a line contains `marker`.
    fn wait_for(&mut self, marker: &str, timeout: Duration, log: &Path) {
        let deadline = Instant::now() + timeout;
        while !self.seen.iter().any(|l| l.contains(marker)) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => self.seen.push(line),
                Err(_) => panic!(
                    "the demo did not print {marker:?} in {timeout:?}; stdout:\n{}\nstderr:\n{}",
                    self.seen.join("\n"),
                    std::fs::read_to_string(log).unwrap_or_default()
                ),
            }
        }
    }

    /// The printed commands: each line after a `# what it shows` line.
    fn commands(&self) -> Vec<String> {
        self.seen
            .windows(2)
            .filter(|w| w[0].starts_with("# ") && !w[1].is_empty())
            .map(|w| w[1].clone())
            .collect()
    }

    /// The sandbox folder the demo says it runs in.
    fn sandbox_dir(&self) -> PathBuf {
        let line = self
            .seen
            .iter()
            .find_map(|l| l.strip_prefix("The sandbox is up and not upgraded: "))
            .expect("the demo names its sandbox");
        let (_, dir) = line.split_once(" nodes in ").expect("the sandbox's folder");
        PathBuf::from(dir.trim_end_matches('.'))
    }
}

impl Drop for KeptDemo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Processes whose command line mentions `dir` (agents, nodes, load balancer of the sandbox).
fn processes_under(dir: &Path) -> Vec<(u32, String)> {
    let needle = dir.display().to_string();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(raw) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&raw).replace('\0', " ");
        if cmdline.contains(&needle) {
            found.push((pid, cmdline));
        }
    }
    found
}

/// Runs a printed command as a shell would, exactly as printed.
fn run_printed(command: &str) -> std::process::Output {
    Command::new("sh")
        .arg("-c")
        .arg(command)
        .output()
        .expect("running sh")
}

#[test]
fn demo_keep_prints_commands_that_work_as_printed_and_stops_everything_on_sigterm() {
    let bins = bins!();
    let tmp = temp_dir();
    // A private parent: as root, Bitbucket's user cannot reach files under it, and the demo must
    // still build a sandbox (elsewhere, said on standard error) whose commands work.
    let parent = tmp.path().join("private");
    std::fs::create_dir(&parent).expect("mkdir");
    std::fs::set_permissions(&parent, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    let log = tmp.path().join("demo.stderr");
    let mut demo = KeptDemo::start(&bins, &parent.join("demo"), &log);
    demo.wait_for(
        "It keeps running until Ctrl-C or SIGTERM",
        Duration::from_secs(SANDBOX_READY_SECS),
        &log,
    );
    let sandbox = demo.sandbox_dir();
    let commands = demo.commands();
    let verbs: Vec<&str> = commands
        .iter()
        .filter_map(|c| c.split_whitespace().nth(1))
        .collect();
    assert_eq!(
        verbs,
        ["status", "plan", "upgrade", "rollback"],
        "{commands:#?}"
    );
    for command in &commands[..3] {
        let out = run_printed(command);
        assert_eq!(
            out.status.code(),
            Some(0),
            "`{command}` failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // The upgrade went through each node's init.d script: activation edited it.
    for node in ["node1", "node2"] {
        let script = sandbox.join(format!("etc/{node}/init.d/atlbitbucket"));
        let text = std::fs::read_to_string(&script).expect("the node's init.d script");
        assert!(
            text.contains("atlassian-bitbucket-8.19.6") || text.contains("8.19.6/bin"),
            "{}:\n{text}",
            script.display()
        );
        assert!(
            text.contains("--no-search"),
            "{}:\n{text}",
            script.display()
        );
    }

    let before = processes_under(&sandbox);
    assert!(
        before.len() >= 3,
        "the sandbox's agents and nodes should be running: {before:#?}"
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(demo.child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM");
    let deadline = Instant::now() + Duration::from_secs(STOP_SECS);
    let status = loop {
        if let Some(s) = demo.child.try_wait().expect("waiting for the demo") {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "the demo did not exit on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(
        status.code(),
        Some(0),
        "{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    // SIGKILLed processes take a moment to go: wait for that, not for a fixed time.
    let deadline = Instant::now() + Duration::from_secs(STOP_SECS);
    loop {
        let left = processes_under(&sandbox);
        if left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "processes the demo started still run {STOP_SECS} s after it exited: {left:#?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
