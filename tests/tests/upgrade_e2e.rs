//! The rolling upgrade end to end, through the `bbupgrade` CLI run as a process against a sandbox of
//! simulated nodes, real agents over mutual TLS and (where the test is about it) a real HAProxy: the
//! happy path under traffic, a coordinator killed mid-run and resumed, a node failing to start,
//! `rollback`, targets that are refused, and the demo.

use bbupgrade::journal::{Journal, RunId, StepOutcome, StepRecord};
use bbupgrade::loadbalancer::{AdminState, LoadBalancer, OperState};
use bbupgrade_common::proto::{NodeInfoRequest, NodeInfoResponse};
use bbupgrade_demo::sandbox::{Sandbox, SandboxLb};
use bbupgrade_sim::load::LoadOptions;
use bbupgrade_tests::cli_process::{Cli, Finished, args, haproxy, is_step, run_cli};
use bbupgrade_tests::{bins, sandbox_options, start_sandbox, zdu_cluster};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const FROM: &str = "8.19.3";
const TO: &str = "8.19.6";

/// `bbupgrade <command> --to <to> --archive <the sandbox's new release>`.
fn upgrade_args(s: &Sandbox, command: &str, to: &str, extra: &[&str]) -> Vec<String> {
    let archive = s.to_archive.path.display().to_string();
    let mut a = args(s, command, &["--to", to, "--archive", &archive]);
    a.extend(extra.iter().map(|x| x.to_string()));
    a
}

// ---------------------------------------------------------------------------------------------
// Looking at the cluster.

async fn sandbox(dir: &Path, lb: SandboxLb) -> Sandbox {
    let bins = bins!();
    start_sandbox(dir, sandbox_options(&bins, 3, lb))
        .await
        .expect("starting the sandbox")
}

/// `GET {node}/sim/info`.
async fn sim_info(base_url: &str) -> Value {
    reqwest::get(format!("{base_url}/sim/info"))
        .await
        .and_then(|r| r.error_for_status())
        .unwrap_or_else(|e| panic!("GET {base_url}/sim/info: {e}"))
        .json()
        .await
        .expect("sim info JSON")
}

/// Waits until Bitbucket's cluster view satisfies `pred` (the simulator re-reads knobs on heartbeat).
async fn wait_cluster(s: &Sandbox, what: &str, pred: impl Fn(&Value) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let v = zdu_cluster(s).await;
        if pred(&v) {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: cluster is {v:#}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The row of the sandbox's node `name` (`node1`, ...): ids change on restart and names are not
/// configured, so it is the live row at the node's cluster port (else the OFFLINE one left there).
fn zdu_node<'a>(view: &'a Value, s: &Sandbox, name: &str) -> &'a Value {
    let node = s
        .sim
        .nodes()
        .iter()
        .find(|n| n.name == name)
        .expect("a sandbox node");
    bbupgrade_tests::zdu_row(view, node).unwrap_or_else(|| panic!("no row for {name} in {view:#}"))
}

/// What a node's agent says about it (over mutual TLS, as the coordinator asks).
async fn agent_info(s: &Sandbox, node: &str) -> NodeInfoResponse {
    let inv = bbupgrade::inventory::Inventory::load(&s.inventory).expect("inventory");
    let tls = inv.tls.load().expect("coordinator TLS");
    let cluster = inv.cluster(&s.cluster_name).expect("cluster");
    let n = cluster.node(node).expect("node in the inventory");
    let mut c = bbupgrade::agents::connect(n, &tls, Duration::from_secs(5))
        .await
        .expect("connecting to the agent");
    c.node_info(NodeInfoRequest {})
        .await
        .expect("NodeInfo")
        .into_inner()
}

/// Waits until HAProxy has `server` ready (in rotation) and its health checks see it up.
async fn assert_lb_ready(lb: &dyn LoadBalancer, server: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let st = lb.server_state(server).await.expect("show servers state");
        if st.admin == AdminState::Ready && st.operational == OperState::Up {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "haproxy has {server} {}/{}, not ready/up",
            st.admin,
            st.operational
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Every node serving `version`, as its process, its agent and Bitbucket see it.
async fn assert_all_on(s: &Sandbox, version: &str) {
    let view = zdu_cluster(s).await;
    for node in s.sim.nodes() {
        let info = sim_info(&node.base_url).await;
        assert_eq!(info["version"], version, "{}: {info:#}", node.name);
        assert_eq!(info["state"], "RUNNING", "{}: {info:#}", node.name);
        let agent = agent_info(s, &node.name).await;
        assert_eq!(agent.active_version, version, "{}: {agent:?}", node.name);
        let z = zdu_node(&view, s, &node.name);
        assert_eq!(z["state"], "ACTIVE", "{}: {view:#}", node.name);
        assert_eq!(z["version"], version, "{}: {view:#}", node.name);
    }
}

fn journal(s: &Sandbox) -> Journal {
    Journal::open(&s.dir.join("journal.db")).expect("opening the journal")
}

/// For each node: its completed `stop` steps in the run.
fn completed_stops(steps: &[StepRecord]) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for st in steps {
        if st.step == "stop"
            && st.outcome == Some(StepOutcome::Ok)
            && let Some(n) = &st.node
        {
            *out.entry(n.clone()).or_insert(0) += 1;
        }
    }
    out
}

/// For each node, the time it was out of service: from its first `drain` begin to its last
/// completed `enable` end.
fn out_of_service(steps: &[StepRecord]) -> BTreeMap<String, (i64, i64)> {
    let mut out: BTreeMap<String, (i64, Option<i64>)> = BTreeMap::new();
    for st in steps {
        let Some(n) = &st.node else { continue };
        if st.step == "drain" {
            out.entry(n.clone()).or_insert((st.started_ms, None));
        }
        if st.step == "enable" && st.outcome == Some(StepOutcome::Ok) {
            let e = out
                .get_mut(n)
                .unwrap_or_else(|| panic!("{n}: enabled, never drained"));
            e.1 = st.ended_ms;
        }
    }
    out.into_iter()
        .map(|(n, (from, to))| {
            let to = to.unwrap_or_else(|| panic!("{n} was drained and never put back"));
            (n, (from, to))
        })
        .collect()
}

/// The agent-side operation records of a node (`<sandbox>/agents/<node>/operations/*.json`).
fn agent_ops(s: &Sandbox, node: &str, kind: &str) -> Vec<Value> {
    let dir = s.dir.join("agents").join(node).join("operations");
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.expect("dir entry").path();
        if path.extension().is_some_and(|e| e == "json") {
            let v: Value =
                serde_json::from_str(&bbupgrade_tests::read(&path)).expect("operation record");
            if v["kind"] == kind {
                out.push(v);
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// 1. The whole upgrade, under traffic, through HAProxy.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrades_every_node_least_busy_first_under_traffic_through_haproxy() {
    if !bbupgrade_tests::require_program("haproxy") {
        return;
    }
    let bins = bins!();
    let tmp = bbupgrade_tests::temp_dir();
    let s = sandbox(tmp.path(), SandboxLb::Haproxy).await;

    // node2 idle, node3 busy, node1 busiest. The gaps are wider than the tasks the test's own
    // traffic adds (one in flight per virtual user at most), so the order cannot flip.
    for (key, tasks) in [
        ("sim.background.tasks.node1", 30),
        ("sim.background.tasks.node3", 15),
    ] {
        s.sim
            .set_shared_property(key, &tasks.to_string())
            .expect("setting background tasks");
    }
    wait_cluster(&s, "background tasks visible", |v| {
        zdu_node(v, &s, "node1")["tasksTotal"].as_u64() >= Some(30)
            && zdu_node(v, &s, "node3")["tasksTotal"].as_u64() >= Some(15)
    })
    .await;

    let load = bbupgrade_sim::load::start(LoadOptions {
        base_url: s.traffic_url(),
        users: 4,
        clone_every: 10,
        ssh_addr: None,
        ssh_clone_every: 0,
        think_ms: 50,
        duration: None,
        request_timeout: Duration::from_secs(60),
    });
    bbupgrade_tests::wait_for_traffic(&load, 4).await;
    let run = run_cli(&bins, &upgrade_args(&s, "upgrade", TO, &[])).await;
    let traffic = load.stop().await;

    assert_eq!(run.code, Some(0), "{}", run.describe());
    let summary = run.summary();
    assert_eq!(summary["result"], "upgraded", "{summary:#}");
    assert_eq!(summary["from"], FROM);
    assert_eq!(summary["to"], TO);
    assert_eq!(
        summary["order"],
        serde_json::json!(["node2", "node3", "node1"]),
        "least busy first: {summary:#}"
    );
    for n in summary["nodes"].as_array().expect("nodes") {
        assert_eq!(n["version_before"], FROM, "{summary:#}");
        assert_eq!(n["version_after"], TO, "{summary:#}");
    }
    assert!(traffic.total > 0, "no traffic was sent: {traffic:#?}");
    assert_eq!(traffic.failed, 0, "requests failed: {traffic:#?}");

    assert_all_on(&s, TO).await;
    let lb = haproxy(&s);
    for node in s.sim.nodes() {
        // The scripts service started the new install with --no-search: no bundled search.
        let info = sim_info(&node.base_url).await;
        assert_eq!(
            info["bundledSearchStarted"], false,
            "{}: {info:#}",
            node.name
        );
        let agent = agent_info(&s, &node.name).await;
        assert_eq!(
            PathBuf::from(&agent.active_install),
            node.install_root.join(TO),
            "{}: {agent:?}",
            node.name
        );
        assert_lb_ready(lb.as_ref(), &node.name).await;
    }
    let view = zdu_cluster(&s).await;
    assert_eq!(view["state"], "STABLE", "{view:#}");
    assert_eq!(view["upgradeModeEnabled"], false, "{view:#}");
}

// ---------------------------------------------------------------------------------------------
// 2. The coordinator killed mid-run; `resume` finishes it without repeating a stop.

/// Starts an upgrade, SIGKILLs the coordinator when `step` of some node begins, resumes, and checks
/// the journal's discipline.
async fn killed_at_then_resumed(step: &str) {
    let bins = bins!();
    let tmp = bbupgrade_tests::temp_dir();
    let s = sandbox(tmp.path(), SandboxLb::None).await;
    if step == "stop" {
        // A stop that takes a while, so the coordinator dies while the agent carries it out.
        for node in s.sim.nodes() {
            set_runtime_fault(&node.base_url, "sim.fault.stop.ignore.ms", "1500").await;
        }
    }

    let mut upgrade = Cli::spawn(&bins, &upgrade_args(&s, "upgrade", TO, &[]));
    let ev = upgrade
        .wait_event(&format!("a {step} step"), |v| {
            is_step(v, None, step, "begin")
        })
        .await;
    let node = ev["node"]
        .as_str()
        .expect("the step names its node")
        .to_string();
    let agent_state = if step == "stage" {
        // Staging 1 MiB is quick: killed as it begins.
        None
    } else {
        Some(wait_agent_op_begun(&s, &node, step).await)
    };
    upgrade.kill();
    let killed = upgrade.finish().await;
    assert_ne!(killed.code, Some(0), "{}", killed.describe());
    eprintln!("killed the coordinator as {node} began {step} (agent operation: {agent_state:?})");

    let run = journal(&s)
        .open_run(&s.cluster_name)
        .expect("journal")
        .expect("the killed run is open in the journal");
    // What the agents did before the resume: an operation they completed must not run again.
    let before = settled_ops(&s).await;
    let resumed = run_cli(&bins, &args(&s, "resume", &[])).await;
    assert_eq!(resumed.code, Some(0), "{}", resumed.describe());
    let summary = resumed.summary();
    assert_eq!(summary["result"], "upgraded", "{summary:#}");
    assert_eq!(summary["run_id"], run.id.0, "resume continues the same run");
    assert_all_on(&s, TO).await;
    let view = zdu_cluster(&s).await;
    assert_eq!(view["state"], "STABLE", "{view:#}");

    assert_run_discipline(&s, run.id);
    for (key, op) in &before {
        if op["state"] == "succeeded" {
            let path = s
                .dir
                .join(format!("agents/{}/operations/{}.json", key.0, key.1));
            let now: Value =
                serde_json::from_str(&bbupgrade_tests::read(&path)).expect("operation record");
            assert_eq!(
                now["started_unix_ms"], op["started_unix_ms"],
                "{key:?} completed before the resume and ran again: {op:#} then {now:#}"
            );
        }
    }
}

/// The stop and start operations of every node's agent, once none is still running (an operation
/// the killed coordinator asked for carries on in the agent).
async fn settled_ops(s: &Sandbox) -> BTreeMap<(String, String), Value> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut ops = BTreeMap::new();
        for node in s.sim.nodes() {
            for kind in ["stop", "start"] {
                for op in agent_ops(s, &node.name, kind) {
                    let id = op["operation_id"].as_str().unwrap_or_default().to_string();
                    if id.starts_with("run") {
                        ops.insert((node.name.clone(), id), op);
                    }
                }
            }
        }
        let running: Vec<_> = ops.values().filter(|o| o["state"] == "running").collect();
        if running.is_empty() {
            return ops;
        }
        assert!(
            Instant::now() < deadline,
            "agent operations still running 30s after the coordinator died: {running:#?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Sets a knob override on one running node (`POST /sim/faults`).
async fn set_runtime_fault(base_url: &str, key: &str, value: &str) {
    reqwest::Client::new()
        .post(format!("{base_url}/sim/faults"))
        .json(&serde_json::json!({ key: value }))
        .send()
        .await
        .and_then(|r| r.error_for_status())
        .unwrap_or_else(|e| panic!("POST {base_url}/sim/faults: {e}"));
}

/// Waits until the node's agent has begun this run's `step` operation; returns its state then.
async fn wait_agent_op_begun(s: &Sandbox, node: &str, step: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let begun = agent_ops(s, node, step).into_iter().find(|o| {
            o["operation_id"]
                .as_str()
                .is_some_and(|id| id.starts_with("run"))
        });
        if let Some(op) = begun {
            return op["state"].as_str().unwrap_or_default().to_string();
        }
        assert!(
            Instant::now() < deadline,
            "{node}'s agent never began the {step}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// No node stopped twice (journal and agents), never two nodes out of service at once.
fn assert_run_discipline(s: &Sandbox, run: RunId) {
    let steps = journal(s).steps(run).expect("steps");
    let table = steps
        .iter()
        .map(|st| {
            format!(
                "{:>14} {:<6} {:<14} {:?}",
                st.started_ms,
                st.node.as_deref().unwrap_or("-"),
                st.step,
                st.outcome
            )
        })
        .collect::<Vec<_>>()
        .join("\n");
    let stops = completed_stops(&steps);
    for node in s.sim.nodes() {
        assert_eq!(
            stops.get(&node.name),
            Some(&1),
            "{} must be stopped exactly once:\n{table}",
            node.name
        );
        let ops = agent_ops(s, &node.name, "stop");
        assert_eq!(
            ops.len(),
            1,
            "{}: agent stop operations {ops:#?}",
            node.name
        );
        assert_eq!(ops[0]["state"], "succeeded", "{}: {ops:#?}", node.name);
    }
    let out = out_of_service(&steps);
    assert_eq!(out.len(), s.sim.nodes().len(), "{table}");
    let spans: Vec<_> = out.iter().collect();
    for (i, (a, (a0, a1))) in spans.iter().enumerate() {
        for (b, (b0, b1)) in &spans[i + 1..] {
            assert!(
                a1 < b0 || b1 < a0,
                "{a} ({a0}..{a1}) and {b} ({b0}..{b1}) were out of service at once:\n{table}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_after_the_coordinator_is_killed_during_staging() {
    killed_at_then_resumed("stage").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_after_the_coordinator_is_killed_during_a_stop() {
    killed_at_then_resumed("stop").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_after_the_coordinator_is_killed_during_a_start() {
    killed_at_then_resumed("start").await;
}

// ---------------------------------------------------------------------------------------------
// 3. A node that starts in ERROR halts the run; auto-rollback and `rollback` undo it.

/// node1 first, node2 second (the one that fails), node3 last.
async fn node1_then_node2(s: &Sandbox) {
    for (key, tasks) in [
        ("sim.background.tasks.node2", 10),
        ("sim.background.tasks.node3", 20),
    ] {
        s.sim
            .set_shared_property(key, &tasks.to_string())
            .expect("setting background tasks");
    }
    wait_cluster(s, "background tasks visible", |v| {
        zdu_node(v, s, "node2")["tasksTotal"].as_u64() >= Some(10)
            && zdu_node(v, s, "node3")["tasksTotal"].as_u64() >= Some(20)
    })
    .await;
    // Set after the sandbox started, so it applies to node2's next start: the new version's.
    s.sim
        .set_shared_property("sim.fault.start.error.node2", "true")
        .expect("setting the fault");
}

fn assert_halted_on_node2(run: &Finished) -> Value {
    assert_eq!(run.code, Some(1), "{}", run.describe());
    let summary = run.summary();
    assert_eq!(summary["result"], "halted", "{summary:#}");
    let error = summary["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("node2"),
        "the error names node2: {summary:#}"
    );
    assert_eq!(summary["order"][0], "node1", "{summary:#}");
    summary
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_starting_in_error_halts_the_run_and_rollback_restores_the_cluster() {
    let bins = bins!();
    let tmp = bbupgrade_tests::temp_dir();
    let s = sandbox(tmp.path(), SandboxLb::None).await;
    node1_then_node2(&s).await;

    let run = run_cli(&bins, &upgrade_args(&s, "upgrade", TO, &[])).await;
    let summary = assert_halted_on_node2(&run);
    assert_eq!(
        summary["order"],
        serde_json::json!(["node1", "node2"]),
        "node3 must not be touched: {summary:#}"
    );
    assert_eq!(sim_info(&s.sim.nodes()[0].base_url).await["version"], TO);
    assert_eq!(sim_info(&s.sim.nodes()[2].base_url).await["version"], FROM);

    s.sim
        .set_shared_property("sim.fault.start.error.node2", "false")
        .expect("clearing the fault");
    let rolled = run_cli(&bins, &args(&s, "rollback", &[])).await;
    assert_eq!(rolled.code, Some(0), "{}", rolled.describe());
    let summary = rolled.summary();
    assert_eq!(summary["result"], "rolled_back", "{summary:#}");
    assert_all_on(&s, FROM).await;
    let view = zdu_cluster(&s).await;
    assert_eq!(view["upgradeModeEnabled"], false, "{view:#}");
    assert_eq!(view["state"], "STABLE", "{view:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_rollback_returns_a_failed_node_to_the_old_version_in_service() {
    if !bbupgrade_tests::require_program("haproxy") {
        return;
    }
    let bins = bins!();
    let tmp = bbupgrade_tests::temp_dir();
    let s = sandbox(tmp.path(), SandboxLb::Haproxy).await;
    node1_then_node2(&s).await;

    let mut upgrade = Cli::spawn(
        &bins,
        &upgrade_args(&s, "upgrade", TO, &["--auto-rollback"]),
    );
    upgrade
        .wait_event("node2's start failing", |v| {
            is_step(v, Some("node2"), "start", "failed")
        })
        .await;
    // The fault stands for a broken new release: the old one, started by the rollback, is fine.
    s.sim
        .set_shared_property("sim.fault.start.error.node2", "false")
        .expect("clearing the fault");
    let run = upgrade.finish().await;
    let summary = assert_halted_on_node2(&run);

    let node2 = &s.sim.nodes()[1];
    let info = sim_info(&node2.base_url).await;
    assert_eq!(info["version"], FROM, "{info:#}");
    let status: Value = reqwest::get(format!("{}/status", node2.base_url))
        .await
        .expect("GET /status")
        .json()
        .await
        .expect("status JSON");
    assert_eq!(status["state"], "RUNNING", "{status:#}");
    assert_eq!(agent_info(&s, "node2").await.active_version, FROM);
    let view = zdu_cluster(&s).await;
    assert_eq!(zdu_node(&view, &s, "node2")["state"], "ACTIVE", "{view:#}");
    assert_lb_ready(haproxy(&s).as_ref(), "node2").await;
    let notes = summary["notes"].to_string();
    assert!(notes.contains("rolled back"), "{summary:#}");
}

// ---------------------------------------------------------------------------------------------
// 4. Targets that are not a bug-fix upgrade are refused before anything changes.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn targets_that_are_not_a_bug_fix_upgrade_are_refused_before_anything_changes() {
    let bins = bins!();
    let tmp = bbupgrade_tests::temp_dir();
    let s = sandbox(tmp.path(), SandboxLb::None).await;

    for (to, reason) in [
        ("8.20.0", "changes the major or minor version"),
        ("8.19.1", "older than"),
        (FROM, "already runs"),
    ] {
        for command in ["plan", "upgrade"] {
            let out = run_cli(&bins, &upgrade_args(&s, command, to, &[])).await;
            assert_eq!(out.code, Some(2), "{command} --to {to}: {}", out.describe());
            assert!(
                out.stderr.contains(reason),
                "{command} --to {to} must say '{reason}': {}",
                out.describe()
            );
        }
    }

    assert!(
        journal(&s)
            .latest_run(&s.cluster_name)
            .expect("journal")
            .is_none(),
        "a refused target must leave no run in the journal"
    );
    for node in s.sim.nodes() {
        let agent = agent_info(&s, &node.name).await;
        let staged: Vec<_> = agent.installed.iter().map(|i| i.version.as_str()).collect();
        assert_eq!(staged, [FROM], "{}: {agent:?}", node.name);
        assert!(!node.install_root.join(TO).exists(), "{}", node.name);
    }
    let view = zdu_cluster(&s).await;
    assert_eq!(view["state"], "STABLE", "{view:#}");
    assert_eq!(view["upgradeModeEnabled"], false, "{view:#}");
    assert_all_on(&s, FROM).await;
}

// ---------------------------------------------------------------------------------------------
// 5. The demo.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_upgrades_its_sandbox_without_failed_requests() {
    let bins = bins!();
    let tmp = bbupgrade_tests::temp_dir();
    let dir = tmp.path().join("demo").display().to_string();
    let out = run_cli(
        &bins,
        &["demo", "--output", "json", "--dir", &dir].map(String::from),
    )
    .await;
    assert_eq!(out.code, Some(0), "{}", out.describe());
    // The demo streams the upgrade's step events as JSON lines and ends with the summary.
    let events: Vec<Value> = out
        .stdout
        .lines()
        .map(|l| {
            serde_json::from_str(l).unwrap_or_else(|e| {
                panic!(
                    "a line of the demo's output is not JSON ({e}): {l}\n{}",
                    out.describe()
                )
            })
        })
        .collect();
    assert!(
        events.iter().any(|e| is_step(e, None, "activate", "ok")),
        "no step events streamed:\n{}",
        out.describe()
    );
    let last = events.last().expect("the demo printed nothing");
    assert_eq!(last["event"], "summary", "{last:#}");
    let doc = &last["summary"];
    assert_eq!(doc["result"], "upgraded", "{doc:#}");
    // Every node runs under an init.d script, which activation pointed at the new install with
    // --no-search; the script is kept in the sandbox's folder.
    let services = doc["service_definitions"]
        .as_array()
        .expect("service_definitions");
    assert_eq!(services.len(), 3, "{doc:#}");
    for s in services {
        let added = s["added"].to_string();
        assert!(added.contains("--no-search") && added.contains(TO), "{s:#}");
        assert!(s["removed"].to_string().contains(FROM), "{s:#}");
        let path = s["path"].as_str().expect("path");
        assert!(path.starts_with(&dir), "{s:#}");
        let text = std::fs::read_to_string(path).expect("the init.d script");
        assert!(text.contains("--no-search"), "{path}:\n{text}");
    }
    assert_eq!(doc["requests"]["failed"], 0, "{doc:#}");
    assert!(doc["requests"]["total"].as_u64() > Some(0), "{doc:#}");
    assert_eq!(doc["requests"]["ssh_failed"], 0, "{doc:#}");
    assert!(doc["requests"]["ssh_total"].as_u64() > Some(0), "{doc:#}");
    // Both front doors are named on standard error, even with --output json.
    assert!(
        out.stderr.contains("traffic through http://127.0.0.1:"),
        "{}",
        out.describe()
    );
    assert!(
        out.stderr.contains("ssh through 127.0.0.1:"),
        "{}",
        out.describe()
    );
    assert_eq!(doc["order"].as_array().map(Vec::len), Some(3), "{doc:#}");
}
