//! `bbupgrade fleet` end to end: the real CLI as a child process against stand-in clusters (instant
//! agents over gRPC + mutual TLS, Bitbucket's rolling-upgrade REST API) served by the test.

use bbupgrade_tests::fleet_standin::{FAKE_SHA256, FleetSpec, StandinFleet, max_in_flight};
use bbupgrade_tests::{describe, summary_of};
use serde_json::Value;
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

const BBUPGRADE: &str = env!("CARGO_BIN_EXE_e2e-bbupgrade");
const FROM: &str = "8.19.3";
const TO: &str = "8.19.6";

fn run_args(fleet: &StandinFleet, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "fleet",
        "--inventory",
        &fleet.inventory.display().to_string(),
        "--to",
        TO,
        "--archive-url",
        "http://127.0.0.1:9/atlassian-bitbucket-8.19.6.tar.gz",
        "--sha256",
        FAKE_SHA256,
        "--output",
        "json",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

async fn bbupgrade(args: &[String]) -> Output {
    tokio::process::Command::new(BBUPGRADE)
        .args(args)
        .output()
        .await
        .expect("running bbupgrade")
}

async fn status_json(fleet: &StandinFleet) -> Value {
    let inv = fleet.inventory.display().to_string();
    let out =
        bbupgrade(&["fleet", "status", "--inventory", &inv, "--output", "json"].map(String::from))
            .await;
    assert!(out.status.success(), "{}", describe(&out));
    serde_json::from_slice(&out.stdout).expect("fleet status JSON")
}

fn line<'a>(summary: &'a Value, cluster: &str) -> &'a Value {
    summary["clusters"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["cluster"] == cluster))
        .unwrap_or_else(|| panic!("no {cluster} in {summary}"))
}

fn dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("bbupgrade-fleet-")
        .tempdir()
        .expect("temp dir")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waves_respect_the_concurrency_limit_and_the_canary_goes_first() {
    let d = dir();
    let mut spec = FleetSpec::new(10, 2);
    spec.op_delay = Duration::from_millis(20);
    let fleet = StandinFleet::start(d.path(), &spec).await.unwrap();
    let out = bbupgrade(&run_args(
        &fleet,
        &["--canary", "c0007", "--concurrency", "3"],
    ))
    .await;
    assert!(out.status.success(), "{}", describe(&out));
    let summary = summary_of(&out.stdout).expect("summary");
    assert_eq!(summary["result"], "upgraded");
    assert_eq!(summary["clusters_upgraded"], 10);

    let activity = fleet.activity();
    assert!(activity.iter().all(|a| a.versions.iter().all(|v| v == TO)));
    let canary = activity.iter().find(|a| a.cluster == "c0007").unwrap();
    let canary_end = canary.last_ms.unwrap();
    for a in activity.iter().filter(|a| a.cluster != "c0007") {
        assert!(
            a.first_ms.unwrap() >= canary_end,
            "{} started at {:?} ms, before the canary finished at {canary_end} ms",
            a.cluster,
            a.first_ms
        );
    }
    assert_eq!(max_in_flight(&activity), 3, "{activity:#?}");
    let waves: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["event"] == "fleet" && v["status"] == "wave")
        .collect();
    assert_eq!(waves.len(), 4, "canary, then 3 + 3 + 3: {waves:?}");
    assert!(waves[0]["detail"].as_str().unwrap().starts_with("canary"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_beyond_the_budget_halt_the_fleet_and_leave_the_rest_untouched() {
    let d = dir();
    let mut spec = FleetSpec::new(10, 2);
    spec.fail_start = ["c0003", "c0005"].map(String::from).into();
    let fleet = StandinFleet::start(d.path(), &spec).await.unwrap();
    // Waves: [1 2] [3 4] [5 6] [7 8] [9 10]; c0003 uses the budget, c0005 exceeds it.
    let out = bbupgrade(&run_args(
        &fleet,
        &["--concurrency", "2", "--max-failed-clusters", "1"],
    ))
    .await;
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let summary = summary_of(&out.stdout).expect("summary");
    assert_eq!(summary["result"], "halted", "{summary:#}");
    assert_eq!(summary["clusters_failed"], 2);
    assert_eq!(summary["clusters_upgraded"], 4);
    assert_eq!(summary["clusters_pending"], 4);
    assert!(summary["error"].as_str().unwrap().contains("budget of 1"));
    let reason = line(&summary, "c0003")["reason"].as_str().unwrap();
    assert!(reason.contains("ERROR"), "{reason}");
    for c in ["c0001", "c0002", "c0004", "c0006"] {
        assert_eq!(line(&summary, c)["state"], "upgraded");
        assert_eq!(fleet.versions(c), [TO, TO], "{c}");
    }
    for a in fleet.activity().iter().skip(6) {
        assert_eq!(line(&summary, &a.cluster)["state"], "pending");
        assert_eq!(a.first_ms, None, "{} was touched: {:?}", a.cluster, a.calls);
        assert_eq!(a.versions, [FROM, FROM]);
    }

    let status = status_json(&fleet).await;
    assert_eq!(status["result"], "halted");
    assert_eq!(status["counts"]["failed"], 2);
    assert_eq!(status["counts"]["pending"], 4);
    let inv = fleet.inventory.display().to_string();
    let human = bbupgrade(&["fleet", "status", "--inventory", &inv].map(String::from)).await;
    let text = String::from_utf8_lossy(&human.stdout);
    assert!(
        text.contains("HALTED") && text.contains("FAILED\n  c0003"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_fleet_run_resumes_to_completion() {
    let d = dir();
    let mut spec = FleetSpec::new(8, 2);
    spec.op_delay = Duration::from_millis(100);
    let fleet = StandinFleet::start(d.path(), &spec).await.unwrap();
    let mut child = tokio::process::Command::new(BBUPGRADE)
        .args(run_args(&fleet, &["--concurrency", "2"]))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while fleet.count_on(TO) < 2 {
        assert!(Instant::now() < deadline, "no cluster upgraded within 60s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Into the second wave: a cluster with a node upgraded and a node not yet.
    let partly = |a: &bbupgrade_tests::fleet_standin::Activity| {
        a.versions.iter().any(|v| v == TO) && a.versions.iter().any(|v| v != TO)
    };
    while !fleet.activity().iter().any(partly) {
        assert!(
            Instant::now() < deadline,
            "no cluster of the second wave was half upgraded within 60s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    child.kill().await.unwrap();
    let upgraded_at_kill = fleet.count_on(TO);
    assert!(
        upgraded_at_kill < 8,
        "the run finished before it was killed"
    );
    assert_eq!(status_json(&fleet).await["result"], "running");

    let inv = fleet.inventory.display().to_string();
    let out =
        bbupgrade(&["fleet", "resume", "--inventory", &inv, "--output", "json"].map(String::from))
            .await;
    assert!(out.status.success(), "{}", describe(&out));
    let summary = summary_of(&out.stdout).expect("summary");
    assert_eq!(summary["result"], "upgraded", "{summary:#}");
    assert_eq!(summary["clusters_upgraded"], 8);
    for a in fleet.activity() {
        assert_eq!(a.versions, [TO, TO], "{}", a.cluster);
        let starts = a.calls.iter().filter(|c| *c == "zdu start").count();
        assert_eq!(
            starts, 1,
            "{}: upgrade mode enabled {starts} times: {:?}",
            a.cluster, a.calls
        );
    }
    assert_eq!(status_json(&fleet).await["result"], "upgraded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_outside_its_window_is_skipped_and_reported() {
    let d = dir();
    let mut spec = FleetSpec::new(3, 2);
    // A window three days from now is closed now, whatever the time of day.
    let closed_day = (time::OffsetDateTime::now_utc() + time::Duration::days(3)).weekday();
    let closed = format!("{} 00:00-01:00 UTC", &closed_day.to_string()[..3]);
    spec.windows.insert("c0002".into(), closed.clone());
    spec.windows
        .insert("c0003".into(), "daily 00:00-24:00 Europe/Berlin".into());
    let fleet = StandinFleet::start(d.path(), &spec).await.unwrap();
    let out = bbupgrade(&run_args(&fleet, &["--concurrency", "3"])).await;
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let summary = summary_of(&out.stdout).expect("summary");
    assert_eq!(summary["result"], "incomplete", "{summary:#}");
    let skipped = line(&summary, "c0002");
    assert_eq!(skipped["state"], "skipped");
    let reason = skipped["reason"].as_str().unwrap();
    assert!(
        reason.contains("outside its maintenance window") && reason.contains(&closed),
        "{reason}"
    );
    assert_eq!(fleet.versions("c0002"), [FROM, FROM]);
    for c in ["c0001", "c0003"] {
        assert_eq!(line(&summary, c)["state"], "upgraded");
        assert_eq!(fleet.versions(c), [TO, TO]);
    }
    let inv = fleet.inventory.display().to_string();
    let human = bbupgrade(&["fleet", "status", "--inventory", &inv].map(String::from)).await;
    let text = String::from_utf8_lossy(&human.stdout);
    assert!(
        text.contains("SKIPPED\n  c0002") && text.contains("outside its maintenance window"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_lists_the_runs_and_steps_from_the_journal_and_never_creates_one() {
    let d = dir();
    let fleet = StandinFleet::start(d.path(), &FleetSpec::new(1, 2))
        .await
        .unwrap();
    let inv = fleet.inventory.display().to_string();
    let status = |extra: &[&str]| {
        let mut args: Vec<String> = ["status", "--inventory", &inv, "--cluster", "c0001"]
            .map(String::from)
            .to_vec();
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    };
    // No journal yet: no runs, and none created.
    let out = bbupgrade(&status(&["--output", "json"])).await;
    assert!(out.status.success(), "{}", describe(&out));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["runs"], serde_json::json!([]), "{v:#}");
    assert!(v["journal"].is_null());
    assert!(!fleet.journal.exists(), "status created the journal");

    let out = bbupgrade(&run_args(&fleet, &[])).await;
    assert!(out.status.success(), "{}", describe(&out));
    let out = bbupgrade(&status(&["--steps"])).await;
    assert!(out.status.success(), "{}", describe(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("#1")
            && text.contains(&format!("{FROM} -> {TO}"))
            && text.contains("upgraded"),
        "{text}"
    );
    assert!(
        text.contains("steps of run #1") && text.contains("c0001-n2") && text.contains("stop"),
        "{text}"
    );
    let out = bbupgrade(&status(&["--run", "1", "--output", "json"])).await;
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        !v["runs"][0]["steps"].as_array().unwrap().is_empty(),
        "{v:#}"
    );
    let out = bbupgrade(&status(&["--run", "99"])).await;
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
}

/// A catalog of two lines (8.19 and 9.4) for the stand-in agents, which download nothing.
fn two_line_catalog(dir: &std::path::Path) -> String {
    let path = dir.join("releases.toml");
    let text: String = ["8.19.5", "8.19.6", "9.4.2", "9.4.7"]
        .iter()
        .map(|v| {
            format!(
                "[[release]]\nversion = \"{v}\"\narchive_url = \"http://127.0.0.1:9/atlassian-bitbucket-{v}.tar.gz\"\nsha256 = \"{FAKE_SHA256}\"\n\n"
            )
        })
        .collect();
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latest_takes_every_cluster_to_the_top_of_its_own_line_in_one_run() {
    let d = dir();
    let mut spec = FleetSpec::new(5, 2);
    for (c, v) in [("c0003", "9.4.2"), ("c0004", "9.4.7"), ("c0005", "9.2.1")] {
        spec.from_by_cluster.insert(c.into(), v.into());
    }
    let fleet = StandinFleet::start(d.path(), &spec).await.unwrap();
    let catalog = two_line_catalog(d.path());
    let inv = fleet.inventory.display().to_string();
    let args = |cmd: &[&str], extra: &[&str]| -> Vec<String> {
        let mut a: Vec<String> = cmd.iter().map(|s| s.to_string()).collect();
        a.extend(
            [
                "--inventory",
                &inv,
                "--catalog",
                &catalog,
                "--output",
                "json",
            ]
            .map(String::from),
        );
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };

    // The plan changes nothing and says what the run will do with each cluster.
    let out = bbupgrade(&args(
        &["fleet", "plan"],
        &["--to", "latest", "--concurrency", "2"],
    ))
    .await;
    assert!(out.status.success(), "{}", describe(&out));
    let plan: Value = serde_json::from_slice(&out.stdout).expect("plan JSON");
    let planned = |c: &str| {
        plan["clusters"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["cluster"] == c)
            .unwrap()
            .clone()
    };
    assert_eq!(planned("c0001")["line"], "8.19");
    assert_eq!(
        (
            planned("c0001")["from"].as_str(),
            planned("c0001")["to"].as_str()
        ),
        (Some(FROM), Some(TO))
    );
    assert_eq!(
        (
            planned("c0003")["action"].as_str(),
            planned("c0003")["to"].as_str()
        ),
        (Some("upgrade"), Some("9.4.7"))
    );
    assert_eq!(planned("c0003")["wave"], 2);
    assert_eq!(planned("c0004")["action"], "up_to_date");
    assert_eq!(
        (
            planned("c0005")["action"].as_str(),
            planned("c0005")["reason"].as_str()
        ),
        (Some("skip"), Some("no target for 9.2"))
    );
    assert!(!fleet.journal.exists(), "fleet plan wrote a journal");
    assert_eq!(fleet.versions("c0003"), ["9.4.2", "9.4.2"]);

    // Two --to on one line, and a --to the catalog lacks, are refused before anything runs.
    let out = bbupgrade(&args(&["fleet"], &["--to", "8.19.6", "--to", "8.19.5"])).await;
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("both on the 8.19 line"));
    let out = bbupgrade(&args(&["fleet"], &["--to", "8.19.4"])).await;
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not in the catalog"));
    assert!(!fleet.journal.exists());

    let out = bbupgrade(&args(&["fleet"], &["--to", "latest", "--concurrency", "2"])).await;
    let summary = summary_of(&out.stdout).expect("summary");
    // The cluster on 9.2 has no target: the run is incomplete (exit 1), nothing failed.
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert_eq!(summary["result"], "incomplete", "{summary:#}");
    assert_eq!(summary["clusters_failed"], 0, "{summary:#}");
    assert_eq!(summary["to"], "latest (9.4.7, 8.19.6)");
    for c in ["c0001", "c0002"] {
        assert_eq!(line(&summary, c)["state"], "upgraded");
        assert_eq!(fleet.versions(c), [TO, TO]);
    }
    assert_eq!(line(&summary, "c0003")["state"], "upgraded");
    assert_eq!(fleet.versions("c0003"), ["9.4.7", "9.4.7"]);
    let top = line(&summary, "c0004");
    assert_eq!(top["state"], "up_to_date");
    assert!(
        top["reason"].as_str().unwrap().contains("up to date"),
        "{top}"
    );
    assert_eq!(line(&summary, "c0005")["reason"], "no target for 9.2");
    assert_eq!(fleet.versions("c0005"), ["9.2.1", "9.2.1"]);

    // The fleet run as a report; a run id that does not exist lists the real ones.
    let report = |extra: &[&str]| {
        let mut a: Vec<String> = ["report", "--inventory", &inv].map(String::from).to_vec();
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let out = bbupgrade(&report(&["--fleet-run", "1", "--format", "json"])).await;
    assert!(out.status.success(), "{}", describe(&out));
    let page: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(page["clusters"].as_array().unwrap().len(), 5, "{page:#}");
    let out = bbupgrade(&report(&["--fleet-run", "1"])).await;
    let html = String::from_utf8_lossy(&out.stdout);
    assert!(
        html.contains("data-node=\"c0003\"") && html.contains("no target for 9.2"),
        "{html}"
    );
    let out = bbupgrade(&report(&["--cluster", "c0001", "--run", "99"])).await;
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no run #99") && err.contains("latest runs: #"),
        "{err}"
    );
}
