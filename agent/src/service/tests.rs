//! Tests of the service managers and the waits: real processes, a tiny HTTP server, fake systemctl.

use super::*;
use std::os::unix::fs::PermissionsExt;
use std::sync::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Serve `/status` answers in order (the last one repeats); returns the URL.
async fn status_server(answers: Vec<(u16, &'static str)>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let answers = Arc::new(Mutex::new(answers));
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let answers = answers.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match sock.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                let (code, state) = {
                    let mut a = answers.lock().unwrap();
                    if a.len() > 1 { a.remove(0) } else { a[0] }
                };
                let body = format!("{{\"state\":\"{state}\"}}");
                let resp = format!(
                    "HTTP/1.1 {code} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = sock.write_all(resp.as_bytes()).await;
            });
        }
    });
    format!("http://{addr}/status")
}

/// A URL nothing listens on.
async fn dead_url() -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    format!("http://{addr}/status")
}

/// A log the Bitbucket user (`nobody` under root) can read.
fn log_with_lines(dir: &Path) -> PathBuf {
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let p = dir.join("atlassian-bitbucket.log");
    let text: String = (1..=30).map(|i| format!("log line {i}\n")).collect();
    std::fs::write(&p, text).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
    p
}

/// Whether the test runs as root; without root it fails under `CI=true` and skips elsewhere.
fn root_or_skip(why: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    assert_ne!(
        std::env::var("CI").as_deref(),
        Ok("true"),
        "{why}, and CI runs as root"
    );
    println!("SKIPPED: {why}");
    false
}

/// The Bitbucket user of these tests: `nobody`.
fn nobody() -> BitbucketUser {
    BitbucketUser::from_name("nobody").expect("a user nobody")
}

#[test]
fn status_bodies_parse() {
    assert_eq!(parse_status(r#"{"state":"RUNNING"}"#), NodeStatus::Running);
    assert_eq!(
        parse_status(r#"{"state":"FIRST_RUN"}"#),
        NodeStatus::FirstRun
    );
    assert_eq!(
        parse_status(r#"{"state":"STOPPING"}"#),
        NodeStatus::Stopping
    );
    assert_eq!(
        parse_status(r#"{"state":"MAINTENANCE"}"#),
        NodeStatus::Other("MAINTENANCE".into())
    );
    assert!(matches!(parse_status("<html>"), NodeStatus::Other(_)));
}

#[tokio::test]
async fn wait_running_sees_starting_then_running() {
    let url = status_server(vec![(503, "STARTING"), (503, "STARTING"), (200, "RUNNING")]).await;
    let dir = tempfile::tempdir().unwrap();
    let got = wait_running(
        &url,
        Duration::from_secs(10),
        &log_with_lines(dir.path()),
        None,
    )
    .await
    .unwrap();
    assert_eq!(got, NodeStatus::Running);
}

#[tokio::test]
async fn wait_running_fails_at_once_on_error_with_the_log_tail() {
    let url = status_server(vec![(500, "ERROR")]).await;
    let dir = tempfile::tempdir().unwrap();
    let user = nobody();
    let err = wait_running(
        &url,
        Duration::from_secs(30),
        &log_with_lines(dir.path()),
        Some(&user),
    )
    .await
    .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, ServiceError::NodeError { .. }), "{msg}");
    assert!(
        msg.contains("log line 30") && msg.contains("log line 11"),
        "{msg}"
    );
    assert!(!msg.contains("log line 10\n"), "{msg}");
}

#[tokio::test]
async fn wait_running_refuses_first_run() {
    let url = status_server(vec![(200, "FIRST_RUN")]).await;
    let dir = tempfile::tempdir().unwrap();
    let err = wait_running(
        &url,
        Duration::from_secs(30),
        &dir.path().join("none.log"),
        None,
    )
    .await
    .unwrap_err();
    assert!(
        err.to_string().contains("BITBUCKET_HOME is wrong or empty"),
        "{err}"
    );
}

#[tokio::test]
async fn wait_running_times_out_with_the_last_state() {
    let url = status_server(vec![(503, "STARTING")]).await;
    let dir = tempfile::tempdir().unwrap();
    let err = wait_running(
        &url,
        Duration::from_millis(600),
        &log_with_lines(dir.path()),
        None,
    )
    .await
    .unwrap_err();
    assert!(
        matches!(&err, ServiceError::StartTimeout { last, .. } if last == "STARTING"),
        "{err}"
    );
}

#[tokio::test(start_paused = true)]
async fn wait_running_times_out_on_a_silent_node_in_paused_time() {
    // No process and no answer at all: the URL is invalid, so no socket is involved.
    let err = wait_running(
        "http://",
        Duration::from_secs(300),
        Path::new("/nonexistent"),
        None,
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err, ServiceError::StartTimeout { secs: 300, .. }),
        "{err}"
    );
}

/// A `sleep` child reaped by a thread, its pid in a pid file.
/// Under root it runs as `nobody`, as Bitbucket would (a root process is never killed).
fn sleeper(dir: &Path, secs: &str) -> (PathBuf, i32) {
    let mut cmd = std::process::Command::new("sleep");
    cmd.arg(secs);
    if nix::unistd::geteuid().is_root() {
        use std::os::unix::process::CommandExt;
        let u = nobody();
        cmd.uid(u.uid).gid(u.gid);
    }
    let child = cmd.spawn().unwrap();
    let pid = child.id() as i32;
    let pid_file = dir.join("bitbucket.pid");
    std::fs::write(&pid_file, format!("{pid}\n")).unwrap();
    std::thread::spawn(move || {
        let mut child = child;
        let _ = child.wait();
    });
    (pid_file, pid)
}

#[tokio::test]
async fn wait_stopped_waits_for_the_process_to_exit() {
    let dir = tempfile::tempdir().unwrap();
    let (pid_file, pid) = sleeper(dir.path(), "1");
    let report = wait_stopped(&pid_file, &dead_url().await, Duration::from_secs(10), false)
        .await
        .unwrap();
    assert_eq!(report.pid, Some(pid));
    assert!(!report.killed);
    assert!(report.waited >= Duration::from_millis(500), "{report:?}");
}

#[tokio::test]
async fn wait_stopped_times_out_naming_the_pid_or_kills_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let (pid_file, pid) = sleeper(dir.path(), "30");
    let url = dead_url().await;
    let err = wait_stopped(&pid_file, &url, Duration::from_millis(500), false)
        .await
        .unwrap_err();
    assert!(err.to_string().contains(&pid.to_string()), "{err}");
    let report = wait_stopped(&pid_file, &url, Duration::from_millis(300), true)
        .await
        .unwrap();
    assert!(report.killed);
    assert!(!alive(pid));
}

#[tokio::test]
async fn a_pid_file_naming_a_root_process_is_never_killed() {
    if !root_or_skip("needs root") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new("sleep")
        .arg("30")
        .spawn()
        .unwrap();
    let pid_file = dir.path().join("bitbucket.pid");
    std::fs::write(&pid_file, format!("{}\n", child.id())).unwrap();
    let err = wait_stopped(
        &pid_file,
        &dead_url().await,
        Duration::from_millis(300),
        true,
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("root process"), "{err}");
    assert!(alive(child.id() as i32));
    child.kill().unwrap();
    child.wait().unwrap();
    // A pid file that is a link is not read at all.
    let other = dir.path().join("other");
    std::fs::write(&other, "1\n").unwrap();
    std::fs::remove_file(&pid_file).unwrap();
    std::os::unix::fs::symlink(&other, &pid_file).unwrap();
    assert_eq!(read_pid(&pid_file), None);
}

#[tokio::test]
async fn wait_stopped_also_waits_for_status_to_go_away() {
    let dir = tempfile::tempdir().unwrap();
    let url = status_server(vec![(503, "STOPPING")]).await;
    let err = wait_stopped(
        &dir.path().join("gone.pid"),
        &url,
        Duration::from_millis(500),
        false,
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("STOPPING"), "{err}");
}

#[test]
fn script_run_plans() {
    let bb = BitbucketUser {
        name: "atlbitbucket".into(),
        uid: 1001,
        gid: 1001,
    };
    let user = RunAs::User(bb.clone());
    assert_eq!(
        plan_script_run(false, None, &RunAs::Current),
        Ok(Invocation::Direct)
    );
    assert_eq!(
        plan_script_run(false, Some("atlbitbucket"), &user),
        Ok(Invocation::Direct)
    );
    // Root always drops to the configured user itself, whatever the script would do.
    for named in [None, Some(""), Some("atlbitbucket")] {
        assert_eq!(
            plan_script_run(true, named, &user),
            Ok(Invocation::AsUser(bb.clone())),
            "{named:?}"
        );
    }
    // A set-bitbucket-user.sh naming another user (root included) is refused, root or not.
    for named in ["x", "root"] {
        let err = plan_script_run(true, Some(named), &user).unwrap_err();
        assert!(
            err.contains(&format!("BITBUCKET_USER={named}")) && err.contains("atlbitbucket"),
            "{err}"
        );
        assert!(plan_script_run(false, Some(named), &user).is_err());
    }
    assert!(plan_script_run(true, None, &RunAs::Current).is_err());
    let root = RunAs::User(BitbucketUser {
        name: "root".into(),
        uid: 0,
        gid: 0,
    });
    assert!(plan_script_run(true, None, &root).is_err());
}

#[test]
fn unit_user_is_the_last_user_of_the_service_section() {
    let unit = "[Unit]\nUser=nope\n[Service]\nUser=atlbitbucket\nExecStart=/x\n".to_string();
    assert_eq!(
        unit_user(std::slice::from_ref(&unit)),
        Some("atlbitbucket".into())
    );
    let dropin = "[Service]\nUser=\n".to_string();
    assert_eq!(unit_user(&[unit.clone(), dropin]), None);
    let dropin = "[Service]\nUser=root\n".to_string();
    assert_eq!(
        unit_user(&[unit.clone(), dropin.clone()]),
        Some("root".into())
    );
    assert!(check_unit_user(std::slice::from_ref(&unit), "atlbitbucket").is_ok());
    let err = check_unit_user(&[unit, dropin], "atlbitbucket").unwrap_err();
    assert!(
        err.contains("User=root") && err.contains("User=atlbitbucket"),
        "{err}"
    );
    let err = check_unit_user(&["[Service]\nExecStart=/x\n".to_string()], "bb").unwrap_err();
    assert!(err.contains("root (no User=)"), "{err}");
}

#[test]
fn bitbucket_user_parses() {
    let Some(text) = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/fixtures/real-world/bin-scripts/release-7.21.17/set-bitbucket-user.sh"
    ))
    .ok() else {
        assert_ne!(
            std::env::var("CI").as_deref(),
            Ok("true"),
            "real-world fixtures not found (CI=true)"
        );
        println!("SKIPPED: real-world fixtures not found");
        return;
    };
    assert_eq!(parse_bitbucket_user(&text).as_deref(), Some(""));
    let set = text.replace(
        "BITBUCKET_USER=\"\" ##",
        "BITBUCKET_USER=\"atlbitbucket\" ##",
    );
    assert_eq!(parse_bitbucket_user(&set).as_deref(), Some("atlbitbucket"));
    assert_eq!(
        parse_bitbucket_user("export BITBUCKET_USER=bb # x\n").as_deref(),
        Some("bb")
    );
    assert_eq!(parse_bitbucket_user("# BITBUCKET_USER=bb\n"), None);
}

fn write_script(path: &Path, body: &str) {
    std::fs::write(path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// A throwaway install whose scripts record who ran them with which arguments.
fn fake_install(dir: &Path, bitbucket_user: &str) -> PathBuf {
    let install = dir.join("8.19.6");
    let bin = install.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let record = dir.join("record");
    std::fs::write(&record, "").unwrap();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    std::fs::set_permissions(&record, std::fs::Permissions::from_mode(0o666)).unwrap();
    for s in ["start-bitbucket.sh", "stop-bitbucket.sh"] {
        write_script(
            &bin.join(s),
            &format!(
                "echo \"{s} $(id -un) $*\" >> {}\n# a background child holding stdout must not block us\n(sleep 5 &)\necho output of {s}",
                record.display()
            ),
        );
    }
    std::fs::write(
        bin.join("set-bitbucket-user.sh"),
        format!("BITBUCKET_USER=\"{bitbucket_user}\" ##\n"),
    )
    .unwrap();
    install
}

#[tokio::test]
async fn scripts_run_as_the_configured_user_with_no_search() {
    if !nix::unistd::geteuid().is_root() {
        println!("SKIPPED: needs root to run scripts as nobody");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let install = fake_install(dir.path(), "");
    let log = dir.path().join("start.log");
    let m = Scripts::new(Arc::new(RwLock::new(install)), RunAs::User(nobody()), &log);
    assert_eq!(m.kind(), "scripts");
    let started = std::time::Instant::now();
    m.start().await.unwrap();
    m.stop().await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "waited on a background child"
    );
    let record = std::fs::read_to_string(dir.path().join("record")).unwrap();
    assert_eq!(
        record,
        "start-bitbucket.sh nobody --no-search\nstop-bitbucket.sh nobody \n"
    );
    assert!(
        std::fs::read_to_string(&log)
            .unwrap()
            .contains("output of start-bitbucket.sh")
    );
}

#[tokio::test]
async fn scripts_never_run_as_root_and_refuse_another_user_in_set_bitbucket_user() {
    let dir = tempfile::tempdir().unwrap();
    let install = fake_install(dir.path(), "");
    let log = dir.path().join("start.log");
    let m = Scripts::new(Arc::new(RwLock::new(install.clone())), RunAs::Current, &log);
    if !nix::unistd::geteuid().is_root() {
        m.start().await.unwrap();
        return;
    }
    let err = m.start().await.unwrap_err();
    assert!(matches!(err, ServiceError::RefuseRoot { .. }), "{err}");
    assert!(err.to_string().contains("bitbucket.user"), "{err}");
    // With BITBUCKET_USER set, the agent still drops to the user itself: the script never runs
    // as root, and is not asked to switch again.
    std::fs::write(
        install.join("bin/set-bitbucket-user.sh"),
        "BITBUCKET_USER=\"nobody\"\n",
    )
    .unwrap();
    let m = Scripts::new(
        Arc::new(RwLock::new(install.clone())),
        RunAs::User(nobody()),
        &log,
    );
    m.start().await.unwrap();
    let record = std::fs::read_to_string(dir.path().join("record")).unwrap();
    assert_eq!(record, "start-bitbucket.sh nobody --no-search\n");
    // Naming another user is refused with the fix, and nothing runs.
    std::fs::write(
        install.join("bin/set-bitbucket-user.sh"),
        "BITBUCKET_USER=\"root\"\n",
    )
    .unwrap();
    let err = m.start().await.unwrap_err().to_string();
    assert!(
        err.contains("BITBUCKET_USER=root") && err.contains("nobody"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(dir.path().join("record")).unwrap(),
        record
    );
}

#[tokio::test]
async fn a_symlinked_log_is_never_read_as_root() {
    if !root_or_skip("needs root to read as nobody") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "TOPSECRET\n").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let log = dir.path().join("atlassian-bitbucket.log");
    std::os::unix::fs::symlink(&secret, &log).unwrap();
    let got = user_file_tail(&log, Some(&nobody())).await;
    assert!(!got.contains("TOPSECRET"), "{got}");
    assert!(got.contains("not readable by the Bitbucket user"), "{got}");
    let got = user_file_tail(&log, None).await;
    assert!(
        !got.contains("TOPSECRET") && got.contains("not read"),
        "{got}"
    );
}

#[tokio::test]
async fn initd_refuses_scripts_the_bitbucket_user_can_write() {
    if !root_or_skip("needs root to own the scripts") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let install = dir.path().join("8.19.6");
    std::fs::create_dir_all(install.join("bin")).unwrap();
    let start = install.join("bin/start-bitbucket.sh");
    write_script(&start, "exit 0");
    let record = dir.path().join("args");
    let script = dir.path().join("atlbitbucket");
    write_script(&script, &format!("echo \"$*\" >> {}", record.display()));
    let mut m = Initd::new(&script, dir.path().join("initd.log"));
    m.guard = Some((nobody(), Arc::new(RwLock::new(install.clone()))));
    m.start().await.unwrap();
    let nobody_uid = nix::unistd::Uid::from_raw(nobody().uid);
    for (path, how) in [
        (&start, "owner"),
        (&start, "other-writable"),
        (&install.join("bin"), "owner"),
        (&script, "owner"),
    ] {
        if how == "owner" {
            nix::unistd::chown(path.as_path(), Some(nobody_uid), None).unwrap();
        } else {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o757)).unwrap();
        }
        let err = m.start().await.unwrap_err().to_string();
        assert!(
            err.contains("can write") && err.contains(&path.display().to_string()),
            "{how} {}: {err}",
            path.display()
        );
        nix::unistd::chown(path.as_path(), Some(nix::unistd::Uid::from_raw(0)), None).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    // A root-owned set-bitbucket-user.sh naming another user than the config's is refused too.
    std::fs::write(
        install.join("bin/set-bitbucket-user.sh"),
        "BITBUCKET_USER=\"root\"\n",
    )
    .unwrap();
    let err = m.start().await.unwrap_err().to_string();
    assert!(
        err.contains("BITBUCKET_USER=root") && err.contains("nobody"),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(&record).unwrap(), "start\n");
}

#[tokio::test]
async fn systemd_refuses_a_unit_without_the_configured_user() {
    let dir = tempfile::tempdir().unwrap();
    let (systemctl, record) = fake_systemctl(dir.path(), false);
    let unit = dir.path().join("bitbucket.service");
    std::fs::write(
        &unit,
        "[Service]\nExecStart=/opt/b/bin/start-bitbucket.sh\n",
    )
    .unwrap();
    let mut m = Systemd::new("bitbucket.service");
    m.systemctl = systemctl;
    m.require_user = Some((unit.clone(), "nobody".into()));
    let err = m.start().await.unwrap_err().to_string();
    assert!(
        err.contains("bitbucket.service")
            && err.contains("root (no User=)")
            && err.contains("User=nobody"),
        "{err}"
    );
    std::fs::write(&unit, "[Service]\nUser=nobody\nExecStart=/x\n").unwrap();
    m.start().await.unwrap();
    // A drop-in next to the unit file overrides it.
    std::fs::create_dir(dir.path().join("bitbucket.service.d")).unwrap();
    std::fs::write(
        dir.path().join("bitbucket.service.d/x.conf"),
        "[Service]\nUser=root\n",
    )
    .unwrap();
    let err = m.stop().await.unwrap_err().to_string();
    assert!(err.contains("User=root"), "{err}");
    assert_eq!(
        std::fs::read_to_string(&record).unwrap(),
        "start bitbucket.service\n"
    );
}

#[tokio::test]
async fn failing_script_reports_command_code_and_output() {
    let dir = tempfile::tempdir().unwrap();
    let install = fake_install(dir.path(), "nobody");
    write_script(
        &install.join("bin/stop-bitbucket.sh"),
        "echo 'Bitbucket is not running' >&2\nexit 3",
    );
    let m = Scripts::new(
        Arc::new(RwLock::new(install)),
        RunAs::User(nobody()),
        dir.path().join("log"),
    );
    let err = m.stop().await.unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("stop-bitbucket.sh") && msg.contains("exit code 3"),
        "{msg}"
    );
    assert!(msg.contains("Bitbucket is not running"), "{msg}");
}

#[tokio::test]
async fn script_timeout_kills_it() {
    let dir = tempfile::tempdir().unwrap();
    let install = fake_install(dir.path(), "nobody");
    write_script(&install.join("bin/stop-bitbucket.sh"), "exec sleep 30");
    let mut m = Scripts::new(
        Arc::new(RwLock::new(install)),
        RunAs::User(nobody()),
        dir.path().join("log"),
    );
    m.timeout = Duration::from_millis(300);
    let err = m.stop().await.unwrap_err();
    assert!(matches!(err, ServiceError::CommandTimeout { .. }), "{err}");
}

/// A fake `systemctl` that records its arguments and lists the search unit when asked.
fn fake_systemctl(dir: &Path, has_search: bool) -> (PathBuf, PathBuf) {
    let record = dir.join("systemctl-args");
    let path = dir.join("systemctl");
    let listing = if has_search {
        "echo 'atlbitbucket_search.service enabled enabled'"
    } else {
        "exit 1"
    };
    write_script(
        &path,
        &format!(
            "echo \"$*\" >> {}\ncase \"$1\" in list-unit-files) {listing};; start) [ \"$2\" = broken.service ] && {{ echo 'Job failed' >&2; exit 1; }};; esac\nexit 0",
            record.display()
        ),
    );
    (path, record)
}

#[tokio::test]
async fn systemd_manager_calls_systemctl() {
    let dir = tempfile::tempdir().unwrap();
    let (systemctl, record) = fake_systemctl(dir.path(), true);
    let mut m = Systemd::new("bitbucket.service");
    m.systemctl = systemctl.clone();
    m.stop().await.unwrap();
    m.daemon_reload().await.unwrap();
    m.start().await.unwrap();
    let notes = m.disable_bundled_search().await.unwrap();
    assert!(notes[0].contains("disabled"), "{notes:?}");
    assert_eq!(
        std::fs::read_to_string(&record).unwrap(),
        "stop bitbucket.service\ndaemon-reload\nstart bitbucket.service\nlist-unit-files --no-legend atlbitbucket_search.service\nstop atlbitbucket_search.service\ndisable atlbitbucket_search.service\n"
    );
    let mut broken = Systemd::new("broken.service");
    broken.systemctl = systemctl;
    let err = broken.start().await.unwrap_err().to_string();
    assert!(
        err.contains("start broken.service")
            && err.contains("exit code 1")
            && err.contains("Job failed"),
        "{err}"
    );
}

#[tokio::test]
async fn systemd_without_search_unit_disables_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (systemctl, record) = fake_systemctl(dir.path(), false);
    let mut m = Systemd::new("bitbucket.service");
    m.systemctl = systemctl;
    let notes = m.disable_bundled_search().await.unwrap();
    assert!(notes[0].contains("nothing to disable"), "{notes:?}");
    assert_eq!(std::fs::read_to_string(&record).unwrap().lines().count(), 1);
}

#[tokio::test]
async fn initd_manager_runs_the_script_with_output_to_a_log() {
    let dir = tempfile::tempdir().unwrap();
    let record = dir.path().join("args");
    let script = dir.path().join("atlbitbucket");
    write_script(
        &script,
        &format!(
            "echo \"$*\" >> {}\n(sleep 5 &)\necho started",
            record.display()
        ),
    );
    let search = dir.path().join("atlbitbucket_search");
    write_script(
        &search,
        &format!("echo \"search $*\" >> {}", record.display()),
    );
    let mut m = Initd::new(&script, dir.path().join("initd.log"));
    m.search_script = search;
    let t = std::time::Instant::now();
    m.stop().await.unwrap();
    m.start().await.unwrap();
    m.daemon_reload().await.unwrap();
    let notes = m.disable_bundled_search().await.unwrap();
    assert!(t.elapsed() < Duration::from_secs(4));
    assert!(notes[0].contains("update-rc.d"), "{notes:?}");
    assert_eq!(
        std::fs::read_to_string(&record).unwrap(),
        "stop\nstart\nsearch stop\n"
    );
    assert_eq!(m.kind(), "initd");
}
