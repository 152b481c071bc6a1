//! Starting and stopping simulated nodes through the release's own scripts.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use bbupgrade_sim::client;
use common::*;

#[test]
fn scripts_start_status_and_graceful_stop_with_in_flight_clone() {
    let c = cluster(1, "8.19.3");
    c.set_shared_property("sim.scm.clone.ms", "1500")
        .expect("property");
    let node = c.nodes()[0].clone();

    let bin = node.install_dir.join("bin");
    let bad = Command::new(bin.join("start-bitbucket.sh"))
        .arg("--bogus")
        .output()
        .expect("run");
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stdout).contains("Unsupported argument: --bogus"));

    // With search (as a server install would): the node records that bundled search runs.
    c.start_node(0, false).expect("start");
    let pid_file = node.home.join("log/bitbucket.pid");
    assert!(pid_file.is_file());
    let first = c.status(0);
    assert!(
        matches!(first.as_deref(), None | Some("STARTING")),
        "{first:?}"
    );
    c.wait_status(0, "STARTING", TIMEOUT).ok();
    c.wait_running(TIMEOUT).expect("running");
    assert!(node.home.join("log/atlassian-bitbucket.log").is_file());
    let info = client::get(&format!("{}/sim/info", node.base_url), &[], TIMEOUT)
        .expect("info")
        .json()
        .expect("json");
    assert_eq!(info["bundledSearchStarted"], true);
    assert_eq!(info["version"], "8.19.3");
    assert_eq!(info["port"], node.port);

    // A clone in flight when the stop comes finishes whole.
    let url = format!("{}/scm/prj/repo.git/info/refs", node.base_url);
    let clone = std::thread::spawn(move || client::get(&url, &[], Duration::from_secs(10)));
    std::thread::sleep(Duration::from_millis(300));
    let stopping_seen = std::thread::spawn({
        let url = format!("{}/status", node.base_url);
        move || {
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(r) = client::get(&url, &[], Duration::from_secs(1))
                    && r.status == 503
                    && r.text().contains("STOPPING")
                {
                    return true;
                }
                std::thread::sleep(Duration::from_millis(30));
            }
            false
        }
    });
    let started = Instant::now();
    c.stop_node(0).expect("stop");
    assert!(
        started.elapsed() >= Duration::from_millis(700),
        "the stop waited for the clone"
    );
    let body = clone
        .join()
        .expect("thread")
        .expect("the in-flight clone completed");
    assert_eq!(body.status, 200);
    assert_eq!(body.body.len(), 10 * 16 * 1024);
    assert!(
        stopping_seen.join().expect("thread"),
        "/status said STOPPING during the stop"
    );
    assert!(!pid_file.exists(), "the stop script removes the PID file");
    assert!(
        !node.home.join("log/search.pid").exists(),
        "search was stopped"
    );
    assert_eq!(c.status(0), None);
}

#[test]
fn misconfigured_homes() {
    let c = cluster(1, "8.19.3");
    let node = c.nodes()[0].clone();
    let bin = node.install_dir.join("bin");

    // No home set at all: the scripts refuse to start.
    let script = bin.join("set-bitbucket-home.sh");
    let shipped = std::fs::read_to_string(&script).expect("read");
    let unset = bbupgrade_sim::scripts::with_bitbucket_home(&shipped, "").expect("edit");
    std::fs::write(&script, unset).expect("write");
    let out = Command::new(bin.join("start-bitbucket.sh"))
        .arg("--no-search")
        .env_remove("BITBUCKET_HOME")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Startup has been aborted"), "{text}");

    // A home without Bitbucket data: the setup wizard (FIRST_RUN), never RUNNING.
    let empty = c.dir().join("empty-home");
    std::fs::create_dir_all(&empty).expect("mkdir");
    let out = Command::new(bin.join("start-bitbucket.sh"))
        .arg("--no-search")
        .env("BITBUCKET_HOME", &empty)
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let wait = c.wait_status(0, "FIRST_RUN", TIMEOUT);
    let pid = std::fs::read_to_string(empty.join("log/bitbucket.pid")).expect("pid");
    let stop = Command::new(bin.join("stop-bitbucket.sh"))
        .env("BITBUCKET_HOME", &empty)
        .output()
        .expect("stop");
    wait.expect("FIRST_RUN");
    assert!(
        stop.status.success(),
        "{}",
        String::from_utf8_lossy(&stop.stdout)
    );
    assert!(!std::path::Path::new(&format!("/proc/{}", pid.trim())).exists());
}

#[test]
fn fault_knobs_start_error_and_crash() {
    let c = cluster(1, "8.19.3");
    c.set_shared_property("sim.fault.start.error.node1", "true")
        .expect("property");
    c.start_node(0, true).expect("start");
    c.wait_status(0, "ERROR", TIMEOUT).expect("ERROR");
    let status =
        client::get(&format!("{}/status", c.nodes()[0].base_url), &[], TIMEOUT).expect("status");
    assert_eq!(status.status, 500);
    c.stop_node(0).expect("stop");

    c.set_shared_property("sim.fault.start.error.node1", "false")
        .expect("property");
    c.set_shared_property("sim.fault.crash.after.ms", "300")
        .expect("property");
    c.start_node(0, true).expect("start");
    c.wait_status(0, "RUNNING", TIMEOUT).expect("RUNNING");
    wait_until("the crash", TIMEOUT, || c.status(0).is_none());
    assert!(
        c.nodes()[0].home.join("log/bitbucket.pid").exists(),
        "a crash leaves the PID file"
    );
    let stop = c.stop_node(0);
    assert!(
        stop.is_ok(),
        "stopping a crashed node clears its stale PID file: {stop:?}"
    );
}

/// Run as a non-root user other than the configured `BITBUCKET_USER`, the scripts refuse.
#[test]
fn scripts_refuse_another_non_root_user() {
    if !nix::unistd::Uid::effective().is_root()
        || nix::unistd::User::from_name("nobody")
            .ok()
            .flatten()
            .is_none()
    {
        eprintln!("skipped: needs root and the user nobody");
        return;
    }
    let c = cluster(1, "8.19.3");
    // Let `nobody` read the install (temp dirs are private).
    let mut dir = c.nodes()[0].install_dir.clone();
    while dir.pop() {
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(&dir).expect("metadata");
        if meta.permissions().mode() & 0o005 != 0o005 {
            std::fs::set_permissions(
                &dir,
                std::fs::Permissions::from_mode(meta.permissions().mode() | 0o755),
            )
            .expect("chmod");
        }
        if dir == c.dir() || dir.parent().is_none() {
            break;
        }
    }
    let bin = c.nodes()[0].install_dir.join("bin");
    let user_script = bin.join("set-bitbucket-user.sh");
    let text = std::fs::read_to_string(&user_script).expect("read");
    let edited = bbupgrade_sim::scripts::with_bitbucket_user(&text, "root").expect("edit");
    std::fs::write(&user_script, edited).expect("write");
    for script in ["start-bitbucket.sh", "stop-bitbucket.sh"] {
        let out = Command::new("runuser")
            .args(["-u", "nobody", "--"])
            .arg(bin.join(script))
            .output()
            .expect("runuser");
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(1), "{script}: {text}");
        assert!(
            text.contains("has been installed to run as root"),
            "{script}: {text}"
        );
    }
}
