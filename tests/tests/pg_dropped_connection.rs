//! A shared journal whose database connections drop in the middle of a rolling upgrade: the run
//! halts between nodes (none left out of the load balancer) and `resume` finishes it.

mod pg_common;

use bbupgrade::journal::{Journal, StepOutcome};
use bbupgrade::loadbalancer::AdminState;
use bbupgrade_demo::sandbox::SandboxLb;
use bbupgrade_tests::cli_process::{Cli, args, haproxy, is_step, run_cli};
use bbupgrade_tests::{bins, require_program, sandbox_options, start_sandbox, temp_dir};
use std::collections::BTreeMap;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_database_connection_halts_between_nodes_and_resume_continues() {
    if !require_program("haproxy") {
        return;
    }
    let Some(url) = pg_common::fresh_database() else {
        return;
    };
    let bins = bins!();
    let dir = temp_dir();
    let s = start_sandbox(dir.path(), sandbox_options(&bins, 2, SandboxLb::Haproxy))
        .await
        .expect("sandbox");
    let archive = s.to_archive.path.display().to_string();
    let state = ["--state", url.as_str()];
    let upgrade_args = args(
        &s,
        "upgrade",
        &["--to", "8.19.6", "--archive", &archive, state[0], state[1]],
    );
    let mut up = Cli::spawn(&bins, &upgrade_args);
    up.wait_event("the first node's drain", |v| {
        is_step(v, None, "drain", "ok")
    })
    .await;
    let killed = pg_common::admin_query(
        &url,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = current_database() AND application_name = 'bbupgrade'",
    );
    assert!(!killed.is_empty(), "no journal session was found to drop");

    let halted = up.finish().await;
    assert_eq!(halted.code, Some(1), "{}", halted.describe());
    let summary = halted.summary();
    assert_eq!(summary["result"], "halted", "{summary}");
    let error = summary["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("lock") && error.contains("resume"),
        "{error}"
    );

    // Halted between nodes: every server is in rotation, every node serves.
    let lb = haproxy(&s);
    for n in s.sim.nodes() {
        let st = lb.server_state(&n.name).await.expect("server state");
        assert_eq!(st.admin, AdminState::Ready, "{} left out: {st:?}", n.name);
        assert_eq!(
            s.sim
                .status(
                    s.sim
                        .nodes()
                        .iter()
                        .position(|m| m.name == n.name)
                        .unwrap_or(0)
                )
                .as_deref(),
            Some("RUNNING")
        );
    }

    let resumed = run_cli(&bins, &args(&s, "resume", &state)).await;
    assert_eq!(resumed.code, Some(0), "{}", resumed.describe());
    assert_eq!(resumed.summary()["result"], "upgraded");

    // No node was stopped twice across both coordinators.
    let journal = Journal::open_postgres(&url).expect("journal");
    let run = journal
        .latest_run(&s.cluster_name)
        .expect("runs")
        .expect("a run");
    let mut stops: BTreeMap<String, usize> = BTreeMap::new();
    for step in journal.steps(run.id).expect("steps") {
        if step.step == "stop" && step.outcome == Some(StepOutcome::Ok) {
            *stops.entry(step.node.unwrap_or_default()).or_default() += 1;
        }
    }
    assert_eq!(stops.len(), 2, "{stops:?}");
    assert!(stops.values().all(|n| *n == 1), "{stops:?}");
}
