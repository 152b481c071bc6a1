//! Heartbeats in the shared home and the busyness counters under real traffic.

mod common;

use std::time::Duration;

use bbupgrade_sim::client;
use common::*;

#[test]
fn killed_node_goes_offline_and_counters_follow_traffic() {
    let c = cluster(2, "8.19.3");
    c.set_shared_property("sim.scm.clone.ms", "2000")
        .expect("property");
    c.set_shared_property("sim.background.tasks.node2", "4")
        .expect("property");
    c.start_all(true).expect("start");
    c.wait_running(TIMEOUT).expect("running");
    let base = c.nodes()[0].base_url.clone();

    // Three users on node1, one of them cloning.
    for user in ["u1", "u2", "u3"] {
        let cookie = format!("BITBUCKETSESSIONID={user}");
        let r = client::get(
            &format!("{base}/rest/api/1.0/projects"),
            &[("Cookie", &cookie)],
            TIMEOUT,
        )
        .expect("page");
        assert_eq!(r.header("x-sim-node"), Some("node1"));
        assert!(r.header("set-cookie").is_none());
    }
    let fresh = client::get(&format!("{base}/"), &[], TIMEOUT).expect("page");
    assert!(
        fresh
            .header("set-cookie")
            .is_some_and(|v| v.starts_with("BITBUCKETSESSIONID="))
    );
    let url = format!("{base}/scm/prj/repo.git/info/refs");
    let clone = std::thread::spawn(move || {
        client::get(
            &url,
            &[("Cookie", "BITBUCKETSESSIONID=u1")],
            Duration::from_secs(10),
        )
    });

    let node = |doc: &serde_json::Value, index: usize| row_of(&c, doc, index).expect("node");
    wait_until("busy node1", TIMEOUT, || {
        let doc = zdu_cluster(&c, 1);
        let n1 = node(&doc, 0);
        n1["tasksTotal"] == 1 && n1["activeUserCount"] == 4
    });
    let doc = zdu_cluster(&c, 0);
    assert_eq!(node(&doc, 1)["tasksTotal"], 4, "background tasks count");
    assert_eq!(node(&doc, 1)["activeUserCount"], 0);
    assert!(clone.join().expect("thread").is_ok());
    wait_until("idle node1", TIMEOUT, || {
        node(&zdu_cluster(&c, 1), 0)["tasksTotal"] == 0
    });

    // Knobs can be changed at runtime on one node.
    let faults = format!("{base}/sim/faults");
    let body = br#"{"sim.background.tasks": 2}"#;
    let r = client::request(
        "POST",
        &faults,
        &[("Content-Type", "application/json")],
        Some(body),
        TIMEOUT,
    )
    .expect("post");
    assert_eq!(r.status, 200, "{}", r.text());
    wait_until("background tasks", TIMEOUT, || {
        node(&zdu_cluster(&c, 1), 0)["tasksTotal"] == 2
    });

    // A node that dies turns OFFLINE once its heartbeat is stale.
    c.kill_node(1).expect("kill");
    assert_eq!(node_state(&c, 0, 1), "ACTIVE", "not yet stale");
    wait_until("node2 OFFLINE", Duration::from_secs(5), || {
        node_state(&c, 0, 1) == "OFFLINE"
    });
    c.stop_node(0).expect("stop");
}
