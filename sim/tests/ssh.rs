//! The node's Git-over-SSH stand-in on `-Dplugin.ssh.port`: clones under load, a graceful stop that
//! lets sessions in flight finish and refuses new ones, a kill that cuts them.

mod common;

use std::time::{Duration, Instant};

use bbupgrade_sim::load::{self, LoadOptions};
use common::*;

/// Running nodes whose SSH clones take `clone_ms` (in 10 pieces).
async fn running_cluster(nodes: usize, clone_ms: u64) -> TestCluster {
    tokio::task::spawn_blocking(move || {
        let c = cluster(nodes, "8.19.3");
        c.set_shared_property("sim.ssh.clone.ms", &clone_ms.to_string())
            .expect("property");
        c.set_shared_property("sim.stop.grace.ms", "10000")
            .expect("property");
        c.start_all(true).expect("start");
        c.wait_running(TIMEOUT).expect("running");
        c
    })
    .await
    .expect("setup")
}

fn ssh_addr(c: &TestCluster, node: usize) -> String {
    format!("127.0.0.1:{}", c.nodes()[node].ssh_port)
}

/// SSH clones only: every request of every user.
fn ssh_only(addr: String, users: usize) -> LoadOptions {
    LoadOptions {
        base_url: "http://127.0.0.1:1".into(),
        users,
        clone_every: 0,
        ssh_addr: Some(addr),
        ssh_clone_every: 1,
        think_ms: 20,
        duration: None,
        request_timeout: Duration::from_secs(10),
    }
}

/// Waits until the SSH port accepts connections (the door opens once the node is RUNNING).
async fn wait_ssh_open(addr: &str) {
    let deadline = Instant::now() + TIMEOUT;
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        assert!(Instant::now() < deadline, "SSH port {addr} never opened");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_clones_with_http_load_have_no_failures() {
    let c = running_cluster(1, 300).await;
    let addr = ssh_addr(&c, 0);
    wait_ssh_open(&addr).await;
    let report = load::run_for(LoadOptions {
        base_url: c.nodes()[0].base_url.clone(),
        users: 3,
        clone_every: 3,
        ssh_addr: Some(addr),
        ssh_clone_every: 2,
        think_ms: 30,
        duration: Some(Duration::from_secs(2)),
        request_timeout: Duration::from_secs(10),
    })
    .await;
    let line = report.summary_line();
    assert_eq!(report.failed, 0, "{line}\n{:#?}", report.failures);
    assert_eq!(report.ssh_failed, 0, "{line}\n{:#?}", report.failures);
    assert!(report.ssh_total >= 3, "{line}");
    assert!(report.total > 0 && report.clones > 0, "{line}");
    assert_eq!(report.ssh_by_node.get("node1"), Some(&report.ssh_total));
    assert!(report.ssh_ms.p50 >= 250, "{:?}", report.ssh_ms);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_stop_finishes_ssh_sessions_in_flight_and_refuses_new_ones() {
    let c = running_cluster(1, 1_500).await;
    let addr = ssh_addr(&c, 0);
    wait_ssh_open(&addr).await;
    let handle = load::start(LoadOptions {
        users: 3,
        ..ssh_only(addr.clone(), 3)
    });
    // Every user is in the middle of its first session.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stopper = tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        c.stop_node(0).expect("stop");
        (c, started.elapsed())
    });
    let (c, took) = stopper.await.expect("stop");
    let report = handle.stop().await;
    let line = report.summary_line();
    assert!(
        took >= Duration::from_millis(700),
        "the stop waited for the sessions: {took:?}"
    );
    // The sessions in flight completed; the users' next ones were refused (the door is shut).
    assert!(
        report.ssh_by_node.get("node1").copied().unwrap_or(0) >= 3,
        "{line}\n{:#?}",
        report.failures
    );
    assert!(report.ssh_failed > 0, "later sessions refused: {line}");
    assert!(
        report.failures.iter().all(|f| f.contains("no pack")),
        "refused, never cut: {:#?}",
        report.failures
    );
    let after = load::clone_over_ssh(&addr, "/prj/x.git", Duration::from_secs(2)).await;
    assert!(!after.is_complete(), "{after:?}");
    drop(c);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_cuts_ssh_sessions_in_flight() {
    let c = running_cluster(1, 3_000).await;
    let addr = ssh_addr(&c, 0);
    wait_ssh_open(&addr).await;
    let handle = load::start(ssh_only(addr, 2));
    tokio::time::sleep(Duration::from_millis(700)).await;
    c.kill_node(0).expect("kill");
    // Until both cut sessions are counted (not a fixed time).
    let deadline = Instant::now() + Duration::from_secs(10);
    while handle.snapshot().ssh_failed < 2 {
        assert!(
            Instant::now() < deadline,
            "{}",
            handle.snapshot().summary_line()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let report = handle.stop().await;
    let line = report.summary_line();
    assert!(report.ssh_failed >= 2, "{line}");
    assert!(
        report.failures.iter().any(|f| f.contains("cut off")),
        "{:#?}",
        report.failures
    );
    assert!(report.ssh_by_node.is_empty(), "{line}");
}
