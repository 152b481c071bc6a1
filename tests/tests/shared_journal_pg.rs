//! The shared journal on a real PostgreSQL (the private test instance, see `pg_common`): locks that
//! die with their holder, dropped connections, concurrent migrations, and coordinators as child
//! processes against the fleet stand-ins with `--state postgres://...`: one resuming another's
//! cluster, two sharing one fleet run, one taking over the cluster of another killed mid-cluster.

mod pg_common;

use bbupgrade::journal::{Journal, JournalError, RunResult, StepOutcome};
use bbupgrade_tests::fleet_standin::{FAKE_SHA256, FleetSpec, StandinFleet};
use bbupgrade_tests::{describe, summary_of};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BBUPGRADE: &str = env!("CARGO_BIN_EXE_e2e-bbupgrade");
const TO: &str = "8.19.6";

#[test]
fn killed_holder_frees_its_lock() {
    let Some(url) = pg_common::fresh_database() else {
        return;
    };
    let j = Journal::open_postgres(&url).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_pg-lock-holder"))
        .arg(&url)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    assert!(
        lines.any(|l| l.is_ok_and(|l| l.contains("HOLDING"))),
        "the child never took the lock"
    );
    match j.acquire_lock("prod", "parent@test:1") {
        Err(JournalError::Locked { holder, .. }) => {
            assert_eq!(holder, format!("child@test:{}", child.id()))
        }
        other => panic!("expected Locked, got {other:?}"),
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match j.acquire_lock("prod", "parent@test:1") {
            Ok(lock) => {
                lock.heartbeat().unwrap();
                break;
            }
            Err(JournalError::Locked { .. }) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => panic!("the dead holder's lock was not freed: {e}"),
        }
    }
}

#[test]
fn dropped_connections_lose_the_lock_and_the_journal_reconnects() {
    let Some(url) = pg_common::fresh_database() else {
        return;
    };
    let j = Journal::open_postgres(&url).unwrap();
    let run = j.create_run(&new_run("prod")).unwrap();
    let lock = j.acquire_lock("prod", "me@test:1").unwrap();
    lock.heartbeat().unwrap();
    let killed = pg_common::admin_query(
        &url,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = current_database() AND application_name = 'bbupgrade'",
    );
    assert_eq!(killed.len(), 2, "the journal's and the lock's sessions");
    assert!(matches!(
        lock.heartbeat(),
        Err(JournalError::LockLost { .. })
    ));
    // The call that meets the dead connection fails; the next one reconnects.
    let step = j
        .begin_step(run, Some("n1"), "stop", "")
        .or_else(|_| j.begin_step(run, Some("n1"), "stop", ""))
        .unwrap();
    j.end_step(step, StepOutcome::Ok, "stopped").unwrap();
    assert_eq!(j.steps(run).unwrap().len(), 1);
    let other = Journal::open_postgres(&url).unwrap();
    other.acquire_lock("prod", "you@test:2").unwrap();
}

#[test]
fn concurrent_first_opens_migrate_once() {
    let Some(url) = pg_common::fresh_database() else {
        return;
    };
    std::thread::scope(|s| {
        for _ in 0..6 {
            s.spawn(|| Journal::open_postgres(&url).unwrap());
        }
    });
    assert_eq!(
        pg_common::admin_query(&url, "SELECT version FROM schema_version"),
        ["4"]
    );
    pg_common::admin_query(&url, "UPDATE schema_version SET version = 99");
    let err = Journal::open_postgres(&url).unwrap_err();
    assert!(
        matches!(err, JournalError::NewerSchema { found: 99, .. }),
        "{err:?}"
    );
}

#[test]
fn the_password_never_appears_in_messages() {
    let err =
        Journal::open_postgres("postgres://bb:SuperSecret123@127.0.0.1:1/journal").unwrap_err();
    let text = format!("{err} {err:?}");
    assert!(!text.contains("SuperSecret123"), "{text}");
    assert!(
        text.contains("postgres://bb:***@127.0.0.1:1/journal"),
        "{text}"
    );
}

fn new_run(cluster: &str) -> bbupgrade::journal::NewRun {
    bbupgrade::journal::NewRun {
        cluster: cluster.into(),
        kind: bbupgrade::journal::RunKind::Upgrade,
        from_version: "8.19.3".into(),
        to_version: TO.into(),
        plan_json: "{}".into(),
        actor: "me@test:1".into(),
        options_json: "{}".into(),
    }
}

fn cli(args: &[&str]) -> std::process::Output {
    Command::new(BBUPGRADE)
        .args(args)
        .output()
        .expect("running bbupgrade")
}

/// An HTTP server on loopback that answers every request with a size and no body, as a release
/// URL answers HEAD (the stand-in agents download nothing); lives as long as the test's runtime.
async fn head_only_server() -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let mut request = [0u8; 4096];
            let _ = conn.read(&mut request).await;
            let _ = conn
                .write_all(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 1048576\r\nConnection: close\r\n\r\n",
                )
                .await;
        }
    });
    format!("http://127.0.0.1:{port}/atlassian-bitbucket-{TO}.tar.gz")
}

fn archive_args() -> [&'static str; 6] {
    [
        "--to",
        TO,
        "--archive-url",
        "http://127.0.0.1:9/atlassian-bitbucket-8.19.6.tar.gz",
        "--sha256",
        FAKE_SHA256,
    ]
}

/// Each node of the cluster's latest run stopped exactly once (successfully), whoever drove it.
fn assert_each_node_stopped_once(j: &Journal, cluster: &str, nodes: usize) {
    let run = j.latest_run(cluster).unwrap().expect("a run");
    let steps = j.steps(run.id).unwrap();
    let mut stopped: Vec<&str> = steps
        .iter()
        .filter(|s| s.step == "stop" && s.outcome == Some(StepOutcome::Ok))
        .filter_map(|s| s.node.as_deref())
        .collect();
    let total = stopped.len();
    stopped.sort();
    stopped.dedup();
    assert_eq!(total, stopped.len(), "a node stopped twice: {steps:#?}");
    assert_eq!(total, nodes, "{steps:#?}");
    assert!(steps.iter().all(|s| !s.actor.is_empty()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_on_the_shared_journal_is_seen_by_fleet_status() {
    let Some(url) = pg_common::fresh_database() else {
        return;
    };
    let d = tempfile::tempdir().unwrap();
    let fleet = StandinFleet::start(d.path(), &FleetSpec::new(4, 2))
        .await
        .unwrap();
    let inv = fleet.inventory.display().to_string();
    let (u, i) = (url.clone(), inv.clone());
    let out = tokio::task::spawn_blocking(move || {
        let mut args = vec![
            "fleet",
            "--inventory",
            &i,
            "--state",
            &u,
            "--output",
            "json",
        ];
        args.extend(archive_args());
        cli(&args)
    })
    .await
    .unwrap();
    assert!(out.status.success(), "{}", describe(&out));
    let out = tokio::task::spawn_blocking(move || {
        cli(&[
            "fleet",
            "status",
            "--inventory",
            &inv,
            "--state",
            &url,
            "--output",
            "json",
        ])
    })
    .await
    .unwrap();
    assert!(out.status.success(), "{}", describe(&out));
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["result"], "upgraded", "{status:#}");
    assert!(
        !std::path::Path::new(&fleet.journal).exists(),
        "SQLite was used"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_coordinator_is_resumed_by_another_without_repeating_a_stop() {
    let Some(url) = pg_common::fresh_database() else {
        return;
    };
    let d = tempfile::tempdir().unwrap();
    let mut spec = FleetSpec::new(1, 3);
    spec.op_delay = Duration::from_millis(300);
    let fleet = StandinFleet::start(d.path(), &spec).await.unwrap();
    let cluster = fleet.names[0].clone();
    let inv = fleet.inventory.display().to_string();
    // `upgrade` checks that the archive URL answers HEAD with a size before it starts.
    let url_of_archive = head_only_server().await;
    let mut args = vec![
        "upgrade".to_string(),
        "--inventory".into(),
        inv.clone(),
        "--cluster".into(),
        cluster.clone(),
        "--state".into(),
        url.clone(),
        "--output".into(),
        "json".into(),
    ];
    args.extend(
        [
            "--to",
            TO,
            "--archive-url",
            &url_of_archive,
            "--sha256",
            FAKE_SHA256,
        ]
        .map(String::from),
    );
    let mut first = Command::new(BBUPGRADE)
        .args(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Kill it once the first node's stop is journaled as done, mid-cluster.
    let (u, c) = (url.clone(), cluster.clone());
    tokio::task::spawn_blocking(move || {
        let j = Journal::open_postgres(&u).unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(run) = j.latest_run(&c).unwrap()
                && j.steps(run.id)
                    .unwrap()
                    .iter()
                    .any(|s| s.step == "stop" && s.outcome == Some(StepOutcome::Ok))
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the first coordinator never stopped a node"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    })
    .await
    .unwrap();
    first.kill().unwrap();
    first.wait().unwrap();

    let (u, i, c) = (url.clone(), inv.clone(), cluster.clone());
    let out = tokio::task::spawn_blocking(move || {
        let args = vec![
            "resume",
            "--inventory",
            &i,
            "--cluster",
            &c,
            "--state",
            &u,
            "--output",
            "json",
        ];
        cli(&args)
    })
    .await
    .unwrap();
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(fleet.versions(&cluster), [TO, TO, TO]);
    let (u, c) = (url.clone(), cluster.clone());
    tokio::task::spawn_blocking(move || {
        let j = Journal::open_postgres(&u).unwrap();
        assert_eq!(
            j.latest_run(&c).unwrap().unwrap().result,
            Some(RunResult::Upgraded)
        );
        assert_each_node_stopped_once(&j, &c, 3);
    })
    .await
    .unwrap();
}

/// `bbupgrade fleet ... --concurrency N` on the shared journal, as a child process.
fn fleet_child(inv: &str, url: &str, concurrency: &str) -> tokio::process::Command {
    let mut c = tokio::process::Command::new(BBUPGRADE);
    c.args([
        "fleet",
        "--inventory",
        inv,
        "--state",
        url,
        "--concurrency",
        concurrency,
        "--output",
        "json",
    ])
    .args(archive_args())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .kill_on_drop(true);
    c
}

/// The clusters a coordinator's JSON events say it upgraded itself.
fn upgraded_by(out: &std::process::Output) -> Vec<String> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["event"] == "fleet" && v["status"] == "upgraded")
        .filter_map(|v| v["cluster"].as_str().map(String::from))
        .collect()
}

/// Every cluster has exactly one upgrade run, upgraded, with each node stopped once.
async fn assert_one_run_per_cluster(url: &str, names: &[String], nodes: usize) {
    let (u, names) = (url.to_string(), names.to_vec());
    tokio::task::spawn_blocking(move || {
        let j = Journal::open_postgres(&u).unwrap();
        for c in &names {
            let runs = j.recent_runs(c, 10).unwrap();
            assert_eq!(runs.len(), 1, "{c}: {runs:#?}");
            assert_eq!(runs[0].result, Some(RunResult::Upgraded), "{c}");
            assert_each_node_stopped_once(&j, c, nodes);
        }
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_coordinators_share_one_fleet_run_and_never_drive_a_cluster_twice() {
    let Some(url) = pg_common::fresh_database() else {
        return;
    };
    let d = tempfile::tempdir().unwrap();
    let mut spec = FleetSpec::new(8, 2);
    // Long enough per cluster that the second coordinator starts while the first is busy.
    spec.op_delay = Duration::from_millis(100);
    let fleet = StandinFleet::start(d.path(), &spec).await.unwrap();
    let inv = fleet.inventory.display().to_string();
    let a = fleet_child(&inv, &url, "2").spawn().unwrap();
    let b = fleet_child(&inv, &url, "2").spawn().unwrap();
    let (pid_a, pid_b) = (a.id().unwrap(), b.id().unwrap());
    let (a, b) = tokio::join!(a.wait_with_output(), b.wait_with_output());
    let (a, b) = (a.unwrap(), b.unwrap());
    for out in [&a, &b] {
        assert!(out.status.success(), "{}", describe(out));
        let summary = summary_of(&out.stdout).expect("summary");
        assert_eq!(summary["result"], "upgraded", "{summary:#}");
        assert_eq!(summary["clusters_upgraded"], 8, "{summary:#}");
    }
    let (by_a, by_b) = (upgraded_by(&a), upgraded_by(&b));
    assert!(
        !by_a.is_empty() && !by_b.is_empty(),
        "one coordinator did everything: {by_a:?} / {by_b:?}"
    );
    let mut all: Vec<String> = by_a.iter().chain(&by_b).cloned().collect();
    all.sort();
    assert_eq!(all, fleet.names, "each cluster upgraded by exactly one");
    // The claims name the coordinator that drove each cluster.
    let claimers = pg_common::admin_query(
        &url,
        "SELECT DISTINCT claimed_by FROM fleet_clusters ORDER BY 1",
    );
    assert_eq!(claimers.len(), 2, "{claimers:?}");
    for pid in [pid_a, pid_b] {
        assert!(
            claimers.iter().any(|c| c.ends_with(&format!(":{pid}"))),
            "{pid} not among {claimers:?}"
        );
    }
    assert_eq!(
        pg_common::admin_query(&url, "SELECT count(*) FROM fleet_runs"),
        ["1"],
        "both coordinators joined one fleet run"
    );
    for act in fleet.activity() {
        assert_eq!(act.versions, [TO, TO], "{}", act.cluster);
        let starts = act.calls.iter().filter(|c| *c == "zdu start").count();
        assert_eq!(starts, 1, "{}: {:?}", act.cluster, act.calls);
    }
    assert_one_run_per_cluster(&url, &fleet.names, 2).await;

    // Any admin sees who did what on the shared journal: runs, then each step with its actor.
    let c = fleet.names[0].clone();
    let out = tokio::process::Command::new(BBUPGRADE)
        .args([
            "status",
            "--inventory",
            &inv,
            "--cluster",
            &c,
            "--state",
            &url,
            "--steps",
            "--output",
            "json",
        ])
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", describe(&out));
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["nodes"].as_array().unwrap().len(), 2, "{status:#}");
    let runs = status["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 1, "{status:#}");
    let run = &runs[0];
    assert_eq!(
        (&run["kind"], &run["result"], &run["to"]),
        (&"upgrade".into(), &"upgraded".into(), &TO.into())
    );
    let actor = run["actor"].as_str().unwrap();
    assert!(
        [pid_a, pid_b]
            .iter()
            .any(|p| actor.ends_with(&format!(":{p}"))),
        "{actor}"
    );
    let stops: Vec<&serde_json::Value> = run["steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["step"] == "stop")
        .collect();
    assert_eq!(stops.len(), 2, "{run:#}");
    assert!(
        stops
            .iter()
            .all(|s| s["outcome"] == "ok" && s["actor"] == actor && s["ended"].is_string()),
        "{run:#}"
    );
    assert!(!status["journal"].as_str().unwrap().contains("password"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_killed_mid_cluster_is_taken_over_by_the_other() {
    let Some(url) = pg_common::fresh_database() else {
        return;
    };
    let d = tempfile::tempdir().unwrap();
    let mut spec = FleetSpec::new(4, 3);
    spec.op_delay = Duration::from_millis(300);
    let fleet = StandinFleet::start(d.path(), &spec).await.unwrap();
    let inv = fleet.inventory.display().to_string();
    let mut a = fleet_child(&inv, &url, "1").spawn().unwrap();
    let b = fleet_child(&inv, &url, "1").spawn().unwrap();
    let pid_a = a.id().unwrap();
    // Wait until A drives a cluster and has stopped one of its nodes, then kill it there.
    let (u, names) = (url.clone(), fleet.names.clone());
    let victim = tokio::task::spawn_blocking(move || {
        let j = Journal::open_postgres(&u).unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let claimed = pg_common::admin_query(
                &u,
                &format!(
                    "SELECT cluster FROM fleet_clusters WHERE state = 'running' \
                     AND claimed_by LIKE '%:{pid_a}'"
                ),
            );
            for c in claimed.iter().filter(|c| names.contains(c)) {
                if let Some(run) = j.latest_run(c).unwrap()
                    && run.result.is_none()
                    && j.steps(run.id)
                        .unwrap()
                        .iter()
                        .any(|s| s.step == "stop" && s.outcome == Some(StepOutcome::Ok))
                {
                    return c.clone();
                }
            }
            assert!(
                Instant::now() < deadline,
                "the first coordinator never stopped a node"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    })
    .await
    .unwrap();
    a.kill().await.unwrap();
    let b = b.wait_with_output().await.unwrap();
    assert!(b.status.success(), "{}", describe(&b));
    let summary = summary_of(&b.stdout).expect("summary");
    assert_eq!(summary["result"], "upgraded", "{summary:#}");
    assert!(
        upgraded_by(&b).contains(&victim),
        "B did not finish {victim}: {}",
        describe(&b)
    );
    for c in &fleet.names {
        assert_eq!(fleet.versions(c), [TO, TO, TO], "{c}");
    }
    assert_one_run_per_cluster(&url, &fleet.names, 3).await;
}
