//! The load generator against real simulated nodes: a steady run, a node killed mid-run, and a URL
//! where nothing listens.

mod common;

use std::time::Duration;

use bbupgrade_sim::cluster::free_ports;
use bbupgrade_sim::load::{self, LoadOptions};
use common::*;

/// Two running nodes whose clones take `clone_ms` in `chunks` pieces (per request).
async fn running_cluster(clone_ms: u64, chunks: u64) -> TestCluster {
    tokio::task::spawn_blocking(move || {
        let c = cluster(2, "8.19.3");
        c.set_shared_property("sim.scm.clone.ms", &clone_ms.to_string())
            .expect("property");
        c.set_shared_property("sim.scm.clone.chunks", &chunks.to_string())
            .expect("property");
        c.start_all(true).expect("start");
        c.wait_running(TIMEOUT).expect("running");
        c
    })
    .await
    .expect("setup")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_steady_against_a_running_node_has_no_failures() {
    let c = running_cluster(300, 5).await;
    let report = load::run_for(LoadOptions {
        base_url: c.nodes()[0].base_url.clone(),
        users: 4,
        clone_every: 3,
        ssh_addr: None,
        ssh_clone_every: 0,
        think_ms: 50,
        duration: Some(Duration::from_secs(2)),
        request_timeout: Duration::from_secs(10),
    })
    .await;
    let line = report.summary_line();
    assert_eq!(report.failed, 0, "{line}\n{:#?}", report.failures);
    assert_eq!(report.ok, report.total, "{line}");
    assert_eq!(report.connection_errors, 0, "{line}");
    assert_eq!(report.interrupted_transfers, 0, "{line}");
    assert!(report.total >= 20, "{line}");
    assert_eq!(report.by_status.get(&200), Some(&report.total), "{line}");
    assert_eq!(
        report.by_node.keys().collect::<Vec<_>>(),
        ["node1"],
        "{line}"
    );
    assert_eq!(report.by_node["node1"], report.total, "{line}");
    assert_eq!(report.by_version.keys().collect::<Vec<_>>(), ["8.19.3"]);
    assert!(report.clones > 0 && report.clones_failed == 0, "{line}");
    let l = &report.latency_ms;
    assert!(l.count > 0, "{line}");
    assert!(l.p50 <= l.p90 && l.p90 <= l.p99 && l.p99 <= l.max, "{l:?}");
    assert!(l.p50 < 200, "a page of an idle node is quick: {l:?}");
    // A clone is two streamed requests of 300 ms each.
    let cl = &report.clone_ms;
    assert_eq!(cl.count, report.clones);
    assert!(
        cl.p50 >= 500 && cl.p50 <= cl.max && cl.max < 5_000,
        "{cl:?}"
    );
    assert!(report.duration_ms >= 2_000, "{line}");
    assert!(report.failures.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_against_a_node_killed_mid_run_shows_failures() {
    let c = running_cluster(1_500, 10).await;
    let handle = load::start(LoadOptions {
        base_url: c.nodes()[0].base_url.clone(),
        users: 4,
        clone_every: 2,
        ssh_addr: None,
        ssh_clone_every: 0,
        think_ms: 20,
        duration: None,
        request_timeout: Duration::from_secs(5),
    });
    // Each user has sent a page and is half-way through the first request of a clone.
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let before = handle.snapshot();
    assert!(before.total >= 4, "{}", before.summary_line());
    assert_eq!(before.failed, 0, "{:#?}", before.failures);
    c.kill_node(0).expect("kill node1");
    // Until the cut clones and a refused request are counted (not a fixed time).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let r = handle.snapshot();
        if r.interrupted_transfers > 0 && r.connection_errors > 0 && r.clones_failed > 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the kill showed no failures: {}",
            r.summary_line()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let report = handle.stop().await;
    let line = report.summary_line();
    assert!(report.failed > 0, "{line}");
    assert!(report.interrupted_transfers > 0, "clones were cut: {line}");
    assert!(
        report.connection_errors > 0,
        "later requests refused: {line}"
    );
    assert!(report.clones_failed > 0, "{line}");
    assert_eq!(report.ok + report.failed, report.total);
    assert!(!report.failures.is_empty());
    assert!(
        report.failures.iter().any(|f| f.contains("cut off")),
        "{:#?}",
        report.failures
    );
    assert!(report.duration_ms < 5_000, "stop does not linger: {line}");
}

#[tokio::test]
async fn load_where_nothing_listens_is_connection_errors() {
    let port = free_ports(1).expect("port")[0];
    let url = format!("http://127.0.0.1:{port}");
    let report = load::run_for(LoadOptions {
        base_url: url.clone(),
        users: 2,
        clone_every: 2,
        ssh_addr: None,
        ssh_clone_every: 0,
        think_ms: 50,
        duration: Some(Duration::from_millis(500)),
        request_timeout: Duration::from_secs(2),
    })
    .await;
    let line = report.summary_line();
    assert!(report.total > 0, "{line}");
    assert_eq!(report.failed, report.total, "{line}");
    assert_eq!(report.connection_errors, report.total, "{line}");
    assert_eq!(report.ok, 0);
    assert!(report.by_status.is_empty() && report.by_node.is_empty());
    assert_eq!(report.clones, report.clones_failed);
    assert!(report.failures[0].contains(&url), "{:#?}", report.failures);
    assert!(
        report.failures[0].contains("no response"),
        "{:#?}",
        report.failures
    );
}

#[tokio::test]
async fn load_run_for_without_a_duration_says_so() {
    let report = load::run_for(LoadOptions::default()).await;
    assert_eq!(report.total, 0);
    assert_eq!(report.failed, 1);
    assert!(
        report.failures[0].contains("duration"),
        "{:?}",
        report.failures
    );
}
