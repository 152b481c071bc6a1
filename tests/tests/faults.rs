//! The fault suite: each case breaks one thing during a real rolling upgrade of a sandbox cluster
//! (agents, nodes, the load balancer's API, Bitbucket's API, the disk) and asserts the run halts
//! with the node and the problem named, never with two nodes out of the load balancer, and that
//! the cluster ends fully on one version and serving — after a `resume` or `rollback` where one
//! is needed. Where a fault must cost users nothing (the load balancer's or Bitbucket's API
//! failing), traffic runs through HAProxy's HTTP and SSH doors, and no request or SSH clone fails.

#[path = "faults/harness.rs"]
mod harness;

use bbupgrade::journal::StepOutcome;
use bbupgrade_demo::sandbox::Sandbox;
use bbupgrade_tests::faultproxy::{FaultProxy, Mode};
use bbupgrade_tests::{Bins, bins, require_program, temp_dir};
use harness::*;
use std::path::Path;
use std::time::{Duration, Instant};

/// Prints the line the fault table in BENCHMARKS.md is made from.
fn report(case: &str, started: Instant, outcome: &str) {
    eprintln!(
        "FAULT-CASE {case}: {outcome} in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// `resume`, which must bring the cluster to the new version.
async fn resume_to_new(bins: &Bins, s: &Sandbox) {
    let f = run(bins, s, "resume").await;
    assert_eq!(f.summary()["result"], "upgraded", "{}", f.describe());
    assert_eq!(f.code, Some(0), "{}", f.describe());
}

/// The checks every case ends with; returns what the log line says.
async fn assert_end_state(s: &Sandbox, watch: LbWatch, want: &str) -> String {
    let version = assert_serving_one_version(s).await;
    assert_eq!(version, want, "the cluster ended on {version}, not {want}");
    let traffic = watch.assert_at_most_one_out().await;
    let out = assert_one_out_at_a_time(s);
    format!("all on {version}; {out}{traffic}")
}

fn other(node: &str) -> &'static str {
    if node == "node1" { "node2" } else { "node1" }
}

// ---------------------------------------------------------------------------------------------
// Agents.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_killed_during_its_nodes_stop_is_restarted_and_the_upgrade_completes() {
    if !require_program("haproxy") {
        return;
    }
    let (bins, dir, started) = (bins!(), temp_dir(), Instant::now());
    let mut s = sandbox(&bins, dir.path(), 2, 1, FAST_TIMEOUTS).await;
    let watch = LbWatch::start(&s);
    let mut cli = upgrade(&bins, &s);
    let ev = cli
        .wait_event("a stop", |v| is_step(v, None, "stop", "begin"))
        .await;
    let i = index_of(&s, &node_of(&ev));
    s.kill_agent(i);
    tokio::time::sleep(Duration::from_millis(500)).await;
    tokio::task::block_in_place(|| s.restart_agent(i)).expect("restarting the agent");
    let f = cli.finish().await;
    let result = f.summary()["result"].clone();
    if result != "upgraded" {
        resume_to_new(&bins, &s).await;
    }
    let end = assert_end_state(&s, watch, TO).await;
    report(
        "agent killed during stop",
        started,
        &format!("first run {result}; {end}"),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_killed_during_staging_is_restarted_and_staging_is_retried() {
    if !require_program("haproxy") {
        return;
    }
    let (bins, dir, started) = (bins!(), temp_dir(), Instant::now());
    // A release big enough that its extraction is caught in the act.
    let mut s = sandbox(&bins, dir.path(), 2, 24, FAST_TIMEOUTS).await;
    let watch = LbWatch::start(&s);
    let mut cli = upgrade(&bins, &s);
    let ev = cli
        .wait_event("a stage", |v| is_step(v, None, "stage", "begin"))
        .await;
    let i = index_of(&s, &node_of(&ev));
    let root = s.sim.nodes()[i].install_root.clone();
    let deadline = Instant::now() + Duration::from_secs(20);
    while staging_dirs(&root).is_empty() {
        assert!(
            Instant::now() < deadline,
            "no staging directory appeared in {}",
            root.display()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    s.kill_agent(i);
    tokio::task::block_in_place(|| s.restart_agent(i)).expect("restarting the agent");
    let f = cli.finish().await;
    let result = f.summary()["result"].clone();
    if result != "upgraded" {
        resume_to_new(&bins, &s).await;
    }
    for n in s.sim.nodes() {
        assert_eq!(
            staging_dirs(&n.install_root),
            Vec::<String>::new(),
            "half-extracted release left on {}",
            n.name
        );
    }
    let end = assert_end_state(&s, watch, TO).await;
    report(
        "agent killed during staging",
        started,
        &format!("first run {result}; {end}"),
    );
}

/// The agent's staging directories (`.staging-*`) under an install root.
fn staging_dirs(root: &Path) -> Vec<String> {
    std::fs::read_dir(root)
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(".staging-"))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_agent_halts_the_run_on_its_node_and_resume_completes() {
    if !require_program("haproxy") {
        return;
    }
    let (bins, dir, started) = (bins!(), temp_dir(), Instant::now());
    let s = sandbox(&bins, dir.path(), 2, 1, FAST_TIMEOUTS).await;
    let watch = LbWatch::start(&s);
    let mut cli = upgrade(&bins, &s);
    // Frozen while its node drains, so the stop request finds it hung.
    let ev = cli
        .wait_event("a drain", |v| is_step(v, None, "drain", "begin"))
        .await;
    let node = node_of(&ev);
    let pid = s.agent_pid(index_of(&s, &node)).expect("agent pid");
    let frozen = Frozen::freeze(pid);
    let f = cli.finish().await;
    assert_halted_naming(&f, &node, &["did not answer", "hung"]);
    assert!(
        !has_step(&s, other(&node), "drain"),
        "the coordinator moved on to {} while {node}'s agent hung",
        other(&node)
    );
    let (halted_after, said) = (f.elapsed, f.report_text());
    drop(frozen);
    resume_to_new(&bins, &s).await;
    let end = assert_end_state(&s, watch, TO).await;
    report(
        "agent hung (SIGSTOP) at its node's stop",
        started,
        &format!(
            "halted after {:.1} s naming {node}; resumed; {end}; said: {said}",
            halted_after.as_secs_f64()
        ),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_to_an_agent_cut_during_its_nodes_stop_then_resume_completes() {
    if !require_program("haproxy") {
        return;
    }
    let (bins, dir, started) = (bins!(), temp_dir(), Instant::now());
    let s = sandbox(&bins, dir.path(), 2, 1, FAST_TIMEOUTS).await;
    // A proxy in front of each agent; the agents' certificates still say who they are.
    let mut proxies = Vec::new();
    for addr in &s.agent_addrs {
        let p = FaultProxy::start(addr.parse().expect("agent address"))
            .await
            .expect("proxy");
        let (from, to) = (
            format!("agent = {addr:?}"),
            format!("agent = \"{}\"", p.addr),
        );
        edit_inventory(&s, |inv| inv.replace(&from, &to));
        proxies.push(p);
    }
    let watch = LbWatch::start(&s);
    let mut cli = upgrade(&bins, &s);
    let ev = cli
        .wait_event("a stop", |v| is_step(v, None, "stop", "begin"))
        .await;
    let node = node_of(&ev);
    let proxy = &proxies[index_of(&s, &node)];
    proxy.set(Mode::Cut);
    let f = cli.finish().await;
    assert_halted_naming(&f, &node, &["agent", "connect"]);
    assert!(
        !has_step(&s, other(&node), "drain"),
        "the coordinator moved on while {node} was cut off"
    );
    let (halted_after, said) = (f.elapsed, f.report_text());
    proxy.set(Mode::Pass);
    resume_to_new(&bins, &s).await;
    let end = assert_end_state(&s, watch, TO).await;
    report(
        "coordinator-agent connection cut at stop",
        started,
        &format!(
            "halted after {:.1} s naming {node}; resumed; {end}; said: {said}",
            halted_after.as_secs_f64()
        ),
    );
}

// ---------------------------------------------------------------------------------------------
// Nodes.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_crashing_right_after_it_became_active_halts_and_rollback_restores() {
    if !require_program("haproxy") {
        return;
    }
    let (bins, dir, started) = (bins!(), temp_dir(), Instant::now());
    // A soak longer than Bitbucket takes to notice a dead node.
    let timeouts = FAST_TIMEOUTS.replace("soak_secs = 1", "soak_secs = 4");
    let s = sandbox(&bins, dir.path(), 2, 1, &timeouts).await;
    s.sim
        .set_shared_property("sim.heartbeat.stale.ms", "1000")
        .expect("knob");
    // Read at start-up: the running nodes keep going, the first upgraded one crashes.
    s.sim
        .set_shared_property("sim.fault.crash.after.ms", "1500")
        .expect("knob");
    let watch = LbWatch::start(&s);
    let mut cli = upgrade(&bins, &s);
    let ev = cli
        .wait_event("a start", |v| is_step(v, None, "start", "begin"))
        .await;
    let node = node_of(&ev);
    let f = cli.finish().await;
    assert_halted_naming(&f, &node, &["ACTIVE", "soak"]);
    assert!(!has_step(&s, other(&node), "drain"));
    s.sim
        .set_shared_property("sim.fault.crash.after.ms", "0")
        .expect("knob");
    let r = run(&bins, &s, "rollback").await;
    assert_eq!(r.summary()["result"], "rolled_back", "{}", r.describe());
    let end = assert_end_state(&s, watch, FROM).await;
    report(
        "node crashes after ACTIVE",
        started,
        &format!(
            "halted naming {node}; rolled back; {end}; said: {}",
            f.report_text()
        ),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_stuck_starting_past_its_deadline_halts_and_resume_completes() {
    if !require_program("haproxy") {
        return;
    }
    let (bins, dir, started) = (bins!(), temp_dir(), Instant::now());
    let timeouts = FAST_TIMEOUTS.replace("start_secs = 10", "start_secs = 4");
    let s = sandbox(&bins, dir.path(), 2, 1, &timeouts).await;
    s.sim
        .set_shared_property("sim.fault.start.slow.ms", "60000")
        .expect("knob");
    let watch = LbWatch::start(&s);
    let mut cli = upgrade(&bins, &s);
    let ev = cli
        .wait_event("a start", |v| is_step(v, None, "start", "begin"))
        .await;
    let node = node_of(&ev);
    let f = cli.finish().await;
    assert_halted_naming(&f, &node, &["STARTING"]);
    assert!(!has_step(&s, other(&node), "drain"));
    s.sim
        .set_shared_property("sim.fault.start.slow.ms", "0")
        .expect("knob");
    resume_to_new(&bins, &s).await;
    let end = assert_end_state(&s, watch, TO).await;
    report(
        "node stuck STARTING",
        started,
        &format!(
            "halted naming {node}; knob cleared; resumed; {end}; said: {}",
            f.report_text()
        ),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_ignoring_sigterm_halts_and_resume_completes() {
    if !require_program("haproxy") {
        return;
    }
    let (bins, dir, started) = (bins!(), temp_dir(), Instant::now());
    let timeouts = FAST_TIMEOUTS.replace("stop_secs = 8", "stop_secs = 4");
    let s = sandbox(&bins, dir.path(), 2, 1, &timeouts).await;
    s.sim
        .set_shared_property("sim.fault.stop.ignore.ms", "15000")
        .expect("knob");
    let watch = LbWatch::start(&s);
    let mut cli = upgrade(&bins, &s);
    let ev = cli
        .wait_event("a stop", |v| is_step(v, None, "stop", "begin"))
        .await;
    let node = node_of(&ev);
    let f = cli.finish().await;
    assert_halted_naming(&f, &node, &["did not stop", "still running", "stop"]);
    assert!(!has_step(&s, other(&node), "drain"));
    s.sim
        .set_shared_property("sim.fault.stop.ignore.ms", "0")
        .expect("knob");
    resume_to_new(&bins, &s).await;
    let end = assert_end_state(&s, watch, TO).await;
    report(
        "node ignores SIGTERM",
        started,
        &format!(
            "halted naming {node}; knob cleared; resumed; {end}; said: {}",
            f.report_text()
        ),
    );
}

// ---------------------------------------------------------------------------------------------
// The load balancer's runtime API.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_balancer_api_unreachable_at_drain_leaves_the_node_serving_then_resume() {
    if !require_program("haproxy") {
        return;
    }
    let (bins, dir, started) = (bins!(), temp_dir(), Instant::now());
    let s = sandbox(&bins, dir.path(), 2, 1, FAST_TIMEOUTS).await;
    let socket = s.haproxy_socket.clone().expect("haproxy socket");
    let away = socket.with_extension("away");
    let watch = LbWatch::with_traffic(&s);
    let mut cli = upgrade(&bins, &s);
    let ev = cli
        .wait_event("a pick", |v| is_step(v, None, "pick", "info"))
        .await;
    let node = node_of(&ev);
    std::fs::rename(&socket, &away).expect("moving the HAProxy socket away");
    let f = cli.finish().await;
    let restore = std::fs::rename(&away, &socket);
    assert_halted_naming(&f, &node, &["haproxy", "socket", "load balancer"]);
    restore.expect("putting the HAProxy socket back");
    assert!(!has_step(&s, &node, "stop"), "{node} was stopped");
    assert_eq!(status_of(&s, &node).await, "RUNNING");
    assert!(!has_step(&s, other(&node), "drain"));
    resume_to_new(&bins, &s).await;
    let end = assert_end_state(&s, watch, TO).await;
    report(
        "HAProxy runtime API unreachable at drain",
        started,
        &format!(
            "halted naming {node}, node kept serving; resumed; {end}; said: {}",
            f.report_text()
        ),
    );
}

// ---------------------------------------------------------------------------------------------
// Bitbucket's rolling-upgrade API.

/// Puts a fault proxy in front of the inventory's `bitbucket_url` and drops the node URLs the
/// coordinator would otherwise fall back to.
async fn proxy_bitbucket(s: &Sandbox) -> FaultProxy {
    let url = s.lb_url.clone().expect("the load balancer's URL");
    let target = url.trim_start_matches("http://").parse().expect("address");
    let p = FaultProxy::start(target).await.expect("proxy");
    edit_inventory(s, |inv| {
        inv.lines()
            .filter(|l| !l.starts_with("bitbucket_node_urls"))
            .map(|l| {
                if l.starts_with("bitbucket_url") {
                    format!("bitbucket_url = \"http://{}\"", p.addr)
                } else {
                    l.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join("\n")
            + "\n"
    });
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bitbucket_api_short_500_bursts_are_absorbed() {
    if !require_program("haproxy") {
        return;
    }
    let (bins, dir, started) = (bins!(), temp_dir(), Instant::now());
    let s = sandbox(&bins, dir.path(), 2, 1, FAST_TIMEOUTS).await;
    let proxy = proxy_bitbucket(&s).await;
    let watch = LbWatch::with_traffic(&s);
    let mut cli = upgrade(&bins, &s);
    // Right before the reads that pick the next node, and right after the first node rejoined.
    let mut bursts = 0;
    for (step, status) in [("upgrade_mode", "ok"), ("soak", "ok")] {
        cli.wait_event(step, |v| is_step(v, None, step, status))
            .await;
        proxy.set(Mode::Http500);
        tokio::time::sleep(Duration::from_millis(400)).await;
        proxy.set(Mode::Pass);
        bursts += 1;
    }
    let f = cli.finish().await;
    assert_eq!(f.summary()["result"], "upgraded", "{}", f.describe());
    let end = assert_end_state(&s, watch, TO).await;
    report(
        "Bitbucket API 500 bursts (400 ms)",
        started,
        &format!("{bursts} bursts absorbed, upgraded in one run; {end}"),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bitbucket_api_persistent_errors_and_timeouts_halt_cleanly_then_resume() {
    if !require_program("haproxy") {
        return;
    }
    let (bins, dir, started) = (bins!(), temp_dir(), Instant::now());
    let s = sandbox(&bins, dir.path(), 2, 1, FAST_TIMEOUTS).await;
    let proxy = proxy_bitbucket(&s).await;
    let watch = LbWatch::with_traffic(&s);
    let mut outcomes = Vec::new();

    // Hangs from staging on: enabling upgrade mode (a POST, never retried) times out.
    let mut cli = upgrade(&bins, &s);
    cli.wait_event("staging", |v| is_step(v, None, "stage", "begin"))
        .await;
    proxy.set(Mode::Hang);
    cli.wait_event("upgrade mode failing", |v| {
        is_step(v, None, "upgrade_mode", "failed")
    })
    .await;
    // Answering again once the POST timed out keeps the rest of the run short.
    proxy.set(Mode::Pass);
    let f = cli.finish().await;
    outcomes.push(assert_halted_cleanly(&s, &f, "hang", &["timed out", "timeout"]).await);

    // Answers 409, then 500, to every request of a resume.
    for (mode, name, words) in [
        (Mode::Http409, "409", &["409"][..]),
        (Mode::Http500, "500", &["500"][..]),
    ] {
        proxy.set(mode);
        let f = run(&bins, &s, "resume").await;
        outcomes.push(assert_halted_cleanly(&s, &f, name, words).await);
    }

    proxy.set(Mode::Pass);
    resume_to_new(&bins, &s).await;
    let end = assert_end_state(&s, watch, TO).await;
    report(
        "Bitbucket API hang / 409 / 500 (persistent)",
        started,
        &format!("{}; resumed; {end}", outcomes.join("; ")),
    );
}

/// A run that halted on Bitbucket's API: the error says so, no node was taken out, all serve.
async fn assert_halted_cleanly(s: &Sandbox, f: &Finished, fault: &str, words: &[&str]) -> String {
    let summary = f.summary();
    assert_eq!(summary["result"], "halted", "{fault}: {}", f.describe());
    let error = summary["error"].as_str().unwrap_or_default().to_lowercase();
    assert!(
        words.iter().any(|w| error.contains(w)),
        "{fault}: the error does not say {words:?}: {error}"
    );
    assert!(
        !all_steps(s).iter().any(|st| st.step == "drain"),
        "{fault}: a node was taken out"
    );
    assert_eq!(assert_serving_one_version(s).await, FROM);
    format!(
        "{fault} halted after {:.1} s ({})",
        f.elapsed.as_secs_f64(),
        summary["error"]
    )
}

// ---------------------------------------------------------------------------------------------
// The disk.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_filling_during_staging_fails_cleanly_and_takes_no_node_out() {
    if !require_program("haproxy") {
        return;
    }
    let (bins, dir, started) = (bins!(), temp_dir(), Instant::now());
    let mut s = sandbox(&bins, dir.path(), 2, 16, FAST_TIMEOUTS).await;
    // Just what the preflight wants (twice the archive), filled up once staging began.
    let archive_mib = std::fs::metadata(&s.to_archive.path)
        .expect("archive")
        .len()
        >> 20;
    let disk_mib = 2 * archive_mib + 4;
    let root = s.dir.join("small-disk");
    let Some(tmpfs) = Tmpfs::mount(&root, disk_mib) else {
        eprintln!("SKIPPED: this machine does not allow mounting a tmpfs");
        return;
    };
    let i = 1;
    let node = s.sim.nodes()[i].name.clone();
    let cfg = s.agent_configs[i].clone();
    let text = bbupgrade_tests::read(&cfg);
    let old_root = format!("install_root = {:?}", s.sim.nodes()[i].install_root);
    assert!(text.contains(&old_root), "{text}");
    std::fs::write(
        &cfg,
        text.replace(&old_root, &format!("install_root = {root:?}")),
    )
    .expect("agent config");
    tokio::task::block_in_place(|| s.restart_agent(i)).expect("restarting the agent");

    let watch = LbWatch::with_traffic(&s);
    let mut cli = upgrade(&bins, &s);
    cli.wait_event("staging", |v| is_step(v, Some(&node), "stage", "begin"))
        .await;
    fill(&root.join("filler"), (disk_mib as usize) << 20);
    let f = cli.finish().await;
    assert_halted_naming(&f, &node, &["No space left", "space"]);
    let steps = all_steps(&s);
    assert!(
        !steps.iter().any(|st| st.step == "drain"),
        "a node was taken out"
    );
    assert!(
        !steps
            .iter()
            .any(|st| st.step == "upgrade_mode" && st.outcome == Some(StepOutcome::Ok)),
        "upgrade mode was enabled"
    );
    let _ = std::fs::remove_file(root.join("filler"));
    let left: Vec<String> = std::fs::read_dir(&root)
        .expect("install root")
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        left.is_empty(),
        "left behind on {node}'s full disk: {left:?}"
    );
    let end = assert_end_state(&s, watch, FROM).await;
    drop(tmpfs);
    report(
        "disk full during staging",
        started,
        &format!(
            "{disk_mib} MiB tmpfs; halted naming {node}, nothing left behind; {end}; {}",
            f.report_text()
        ),
    );
}

/// Writes up to `bytes` into `path`, stopping quietly when the disk is full.
fn fill(path: &Path, bytes: usize) {
    use std::io::Write;
    let mut f = std::fs::File::create(path).expect("filler");
    let chunk = vec![0x5au8; 1 << 20];
    for _ in 0..bytes / chunk.len() {
        if f.write_all(&chunk).is_err() {
            break;
        }
    }
}
