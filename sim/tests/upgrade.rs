//! The rolling-upgrade state machine through the REST API, with real nodes upgraded one at a time.

mod common;

use bbupgrade_sim::client;
use common::*;
use std::time::Duration;

/// Stops node `i`, installs `version` next to its current install, carries its settings over, starts it.
fn upgrade_node(
    c: &TestCluster,
    i: usize,
    from: &std::path::Path,
    version: &str,
) -> std::path::PathBuf {
    c.stop_install(i, from).expect("stop");
    let install = c.add_install(i, version).expect("install");
    c.start_install(i, &install, true).expect("start");
    install
}

#[test]
fn two_nodes_full_upgrade_with_refused_minor_jump() {
    let c = cluster(2, "8.19.3");
    c.start_all(true).expect("start");
    c.wait_running(TIMEOUT).expect("running");

    // Auth and wrong-state answers.
    let url = format!("{}/rest/zdu/cluster", c.nodes()[0].base_url);
    assert_eq!(client::get(&url, &[], TIMEOUT).expect("get").status, 401);
    assert_eq!(
        client::get(&url, &[("Authorization", "Bearer wrong")], TIMEOUT)
            .expect("get")
            .status,
        401
    );
    assert_eq!(call(&c, 0, "POST", "/rest/zdu/approve").status, 409);
    assert_eq!(call(&c, 0, "POST", "/rest/zdu/cancel").status, 409);
    let doc = zdu_cluster(&c, 1);
    assert_eq!(doc["state"], "STABLE");
    assert_eq!(doc["upgradeModeEnabled"], false);
    assert_eq!(doc["originalVersion"], "8.19.3");
    assert_eq!(doc["nodes"].as_array().map(Vec::len), Some(2));
    let admin = call(&c, 0, "GET", "/rest/api/1.0/admin/cluster");
    assert_eq!(admin.status, 200);

    // A bug-fix version cannot join without upgrade mode.
    let old0 = c.nodes()[0].install_dir.clone();
    let old1 = c.nodes()[1].install_dir.clone();
    let new0 = upgrade_node(&c, 0, &old0, "8.19.6");
    c.wait_status(0, "ERROR", TIMEOUT)
        .expect("refused without upgrade mode");
    c.stop_install(0, &new0).expect("stop");
    c.start_install(0, &old0, true).expect("start old");
    c.wait_status(0, "RUNNING", TIMEOUT).expect("running");

    // Upgrade mode on; node 0 upgraded.
    let r = call(&c, 1, "POST", "/rest/zdu/start");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(cluster_state(&c, 0), "READY_TO_UPGRADE");
    assert_eq!(call(&c, 0, "POST", "/rest/zdu/start").status, 409);
    c.stop_install(0, &old0).expect("stop");
    wait_until("node1 OFFLINE", TIMEOUT, || {
        node_state(&c, 1, 0) == "OFFLINE"
    });
    c.start_install(0, &new0, true).expect("start new");
    c.wait_status(0, "RUNNING", TIMEOUT).expect("running");
    assert_eq!(cluster_state(&c, 1), "MIXED");
    assert_eq!(
        call(&c, 1, "POST", "/rest/zdu/cancel").status,
        409,
        "cannot cancel with a node on the new version"
    );
    assert_eq!(call(&c, 1, "POST", "/rest/zdu/approve").status, 409);
    let page = client::get(&format!("{}/", c.nodes()[0].base_url), &[], TIMEOUT).expect("page");
    assert_eq!(page.header("x-sim-version"), Some("8.19.6"));

    // A minor-version jump is refused even in upgrade mode.
    let jump = upgrade_node(&c, 1, &old1, "8.20.0");
    c.wait_status(1, "ERROR", TIMEOUT)
        .expect("minor jump refused");
    let status =
        client::get(&format!("{}/status", c.nodes()[1].base_url), &[], TIMEOUT).expect("status");
    assert_eq!(status.status, 500);
    assert_eq!(node_state(&c, 0, 1), "ERROR");
    c.stop_install(1, &jump).expect("stop");

    // Node 1 on the bug-fix version: ready to run upgrade tasks; approve finishes the upgrade.
    let new1 = c.add_install(1, "8.19.6").expect("install");
    c.start_install(1, &new1, true).expect("start");
    c.wait_status(1, "RUNNING", TIMEOUT).expect("running");
    wait_until("READY_TO_RUN_UPGRADE_TASKS", TIMEOUT, || {
        cluster_state(&c, 0) == "READY_TO_RUN_UPGRADE_TASKS"
    });
    let r = call(&c, 1, "POST", "/rest/zdu/approve");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json().expect("json")["state"], "RUNNING_UPGRADE_TASKS");
    wait_until("STABLE", TIMEOUT, || cluster_state(&c, 0) == "STABLE");
    let doc = zdu_cluster(&c, 0);
    assert_eq!(doc["upgradeModeEnabled"], false);
    assert_eq!(doc["originalVersion"], "8.19.6");
    let node_id = live_rows(&doc)[0]["id"].as_str().expect("id").to_string();
    let one = call(&c, 1, "GET", &format!("/rest/zdu/nodes/{node_id}"));
    assert_eq!(one.status, 200);
    assert_eq!(one.json().expect("json")["version"], "8.19.6");
    assert_eq!(call(&c, 1, "GET", "/rest/zdu/nodes/nope").status, 404);
    c.stop_install(0, &new0).expect("stop");
    c.stop_install(1, &new1).expect("stop");
}

#[test]
fn three_nodes_cancel_then_upgrade_all() {
    let c = cluster(3, "8.19.3");
    c.start_all(true).expect("start");
    c.wait_running(TIMEOUT).expect("running");
    assert_eq!(call(&c, 2, "POST", "/rest/zdu/start").status, 200);
    assert_eq!(call(&c, 0, "POST", "/rest/zdu/cancel").status, 200);
    assert_eq!(cluster_state(&c, 1), "STABLE");
    assert_eq!(call(&c, 2, "POST", "/rest/zdu/start").status, 200);

    let mut installs = Vec::new();
    for i in 0..3 {
        let old = c.nodes()[i].install_dir.clone();
        let new = upgrade_node(&c, i, &old, "8.19.4");
        c.wait_status(i, "RUNNING", TIMEOUT).expect("running");
        let other = (i + 1) % 3;
        let expected = if i < 2 {
            "MIXED"
        } else {
            "READY_TO_RUN_UPGRADE_TASKS"
        };
        wait_until(expected, TIMEOUT, || cluster_state(&c, other) == expected);
        installs.push(new);
    }
    assert_eq!(call(&c, 0, "POST", "/rest/zdu/approve").status, 200);
    wait_until("STABLE", Duration::from_secs(10), || {
        cluster_state(&c, 2) == "STABLE"
    });
    let doc = zdu_cluster(&c, 1);
    let live = live_rows(&doc);
    assert_eq!(live.len(), 3, "{doc:#}");
    assert!(
        live.iter()
            .all(|n| n["version"] == "8.19.4" && n["state"] == "ACTIVE"),
        "{doc:#}"
    );
    for (i, install) in installs.iter().enumerate() {
        c.stop_install(i, install).expect("stop");
    }
}
