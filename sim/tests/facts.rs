//! The simulator follows what the real product does (`BITBUCKET-FACTS.md`): node ids, names and
//! blank fields of the cluster view, the `/state` document, the state rules, 409 and 404 answers,
//! authentication, a non-clustered instance and `MAINTENANCE`.

mod common;

use bbupgrade_sim::client;
use bbupgrade_sim::cluster::NodeSetup;
use bbupgrade_sim::node::auth::basic_header;
use common::*;
use serde_json::{Value, json};

/// Fields an OFFLINE or STARTING row leaves blank.
const BLANK_FIELDS: [&str; 4] = ["version", "buildNumber", "tasksTotal", "activeUserCount"];

/// Sets a knob on one node at runtime (`POST /sim/faults`), effective at once.
fn set_fault(c: &TestCluster, node: usize, key: &str, value: &str) {
    let body = json!({ key: value }).to_string();
    let r = client::request(
        "POST",
        &format!("{}/sim/faults", c.nodes()[node].base_url),
        &[("Content-Type", "application/json")],
        Some(body.as_bytes()),
        TIMEOUT,
    )
    .expect("post");
    assert_eq!(r.status, 200, "{}", r.text());
}

fn row_by_id(doc: &Value, id: &str) -> Option<Value> {
    doc["nodes"]
        .as_array()?
        .iter()
        .find(|n| n["id"] == id)
        .cloned()
}

fn wait_cluster_state(c: &TestCluster, from: usize, state: &str) {
    wait_until(state, TIMEOUT, || cluster_state(c, from) == state);
}

#[test]
fn restarted_node_gets_a_new_id_and_its_old_row_stays_offline_without_version() {
    let c = cluster(2, "8.19.3");
    c.start_all(true).expect("start");
    c.wait_running(TIMEOUT).expect("running");

    let doc = zdu_cluster(&c, 1);
    assert_eq!(doc["nodes"].as_array().map(Vec::len), Some(2), "{doc:#}");
    for i in 0..2 {
        let row = row_of(&c, &doc, i).expect("row");
        let info = c.node_info(i).expect("info");
        assert_eq!(row["id"], info.id.as_str(), "{doc:#}");
        let id = uuid::Uuid::parse_str(&info.id).expect("a UUID");
        assert_eq!(id.get_version_num(), 4);
        assert_eq!(row["name"], "Not configured");
        assert_eq!(info.name, "Not configured");
        assert_eq!(row["ipAddress"], "127.0.0.1");
        assert_eq!(row["portNumber"], 5701 + i as u64);
        assert_eq!(info.hazelcast_port, 5701 + i as u16);
        assert_eq!(row["local"], i == 1, "local is the node that answered");
        assert_eq!(row["links"], json!([]));
        assert_eq!(row["state"], "ACTIVE");
        assert_eq!(row["version"], "8.19.3");
        assert_eq!(row["buildNumber"], "8019003");
        assert!(row["tasksTotal"].is_u64() && row["activeUserCount"].is_u64());
    }

    // Restart node 1 slowly, so that its STARTING row can be seen.
    let old_id = c.node_id(0).expect("id");
    c.set_shared_property("sim.fault.start.slow.ms.node1", "1500")
        .expect("property");
    c.stop_node(0).expect("stop");
    c.start_node(0, true).expect("start");
    let mut starting = None;
    wait_until("a STARTING row at node1's address", TIMEOUT, || {
        starting = zdu_cluster(&c, 1)["nodes"]
            .as_array()
            .and_then(|ns| {
                ns.iter()
                    .find(|n| n["state"] == "STARTING" && n["portNumber"] == cluster_port(&c, 0))
            })
            .cloned();
        starting.is_some()
    });
    let starting = starting.expect("row");
    for field in BLANK_FIELDS.iter().chain(&["ipAddress"]) {
        assert!(starting.get(field).is_none(), "{field} in {starting:#}");
    }
    assert!(starting["id"].is_string() && starting["name"] == "Not configured");
    c.wait_status(0, "RUNNING", TIMEOUT).expect("running");
    let new_id = c.node_id(0).expect("id");
    assert_ne!(new_id, old_id, "a new id on every start");
    assert_eq!(starting["id"], new_id.as_str());

    let doc = zdu_cluster(&c, 1);
    let old = row_by_id(&doc, &old_id).expect("the old row stays");
    assert_eq!(old["state"], "OFFLINE", "{doc:#}");
    for field in BLANK_FIELDS {
        assert!(old.get(field).is_none(), "{field} in {old:#}");
    }
    assert_eq!(old["ipAddress"], "127.0.0.1");
    assert_eq!(old["portNumber"], cluster_port(&c, 0));
    assert_eq!(
        row_by_id(&doc, &new_id).expect("new row")["state"],
        "ACTIVE"
    );
    let one = call(&c, 1, "GET", &format!("/rest/zdu/nodes/{old_id}"));
    assert_eq!(one.status, 200);
    assert_eq!(one.json().expect("json")["state"], "OFFLINE");

    // The same blanks as JSON null.
    c.set_shared_property("sim.zdu.blank.fields", "null")
        .expect("property");
    wait_until("null fields", TIMEOUT, || {
        row_by_id(&zdu_cluster(&c, 1), &old_id)
            .is_some_and(|r| r.get("version") == Some(&Value::Null))
    });
    let old = row_by_id(&zdu_cluster(&c, 1), &old_id).expect("row");
    for field in BLANK_FIELDS {
        assert_eq!(old.get(field), Some(&Value::Null), "{field} in {old:#}");
    }

    // The old row ages out; its id is then unknown.
    c.set_shared_property("sim.offline.row.ttl.ms", "1")
        .expect("property");
    wait_until("the old row to age out", TIMEOUT, || {
        row_by_id(&zdu_cluster(&c, 1), &old_id).is_none()
    });
    assert_eq!(
        call(&c, 1, "GET", &format!("/rest/zdu/nodes/{old_id}")).status,
        404
    );
    assert_eq!(live_rows(&zdu_cluster(&c, 0)).len(), 2);
}

#[test]
fn state_document_authentication_conflicts_and_faults() {
    let c = cluster(1, "8.19.3");
    c.start_all(true).expect("start");
    c.wait_running(TIMEOUT).expect("running");
    let id = c.node_id(0).expect("id");

    // /state: the state and the answering node's row, nothing else.
    let r = call(&c, 0, "GET", "/rest/zdu/state");
    assert_eq!(r.status, 200, "{}", r.text());
    let doc = r.json().expect("json");
    let keys: Vec<&String> = doc.as_object().expect("object").keys().collect();
    assert_eq!(keys, ["buildInfo", "state"], "{doc:#}");
    assert_eq!(doc["state"], "STABLE");
    assert_eq!(doc["buildInfo"]["id"], id.as_str());
    assert_eq!(doc["buildInfo"]["local"], true);
    assert_eq!(doc["buildInfo"]["version"], "8.19.3");

    // Basic as the system administrator; a token without system-admin rights; nothing; wrong.
    let basic = c.admin_basic_auth().expect("a user is configured");
    let r = call_as(&c, 0, "GET", "/rest/zdu/cluster", Some(&basic));
    assert_eq!(r.status, 200, "{}", r.text());
    let r = call_as(
        &c,
        0,
        "GET",
        "/rest/zdu/cluster",
        Some(&basic_header("admin", "nope")),
    );
    assert_eq!(r.status, 401);
    let user = format!("Bearer {USER_TOKEN}");
    let r = call_as(&c, 0, "GET", "/rest/zdu/cluster", Some(&user));
    assert_eq!(r.status, 401);
    let message = r.json().expect("json")["errors"][0]["message"].to_string();
    assert!(message.contains("not permitted"), "{message}");
    assert_eq!(
        call_as(&c, 0, "POST", "/rest/zdu/start", Some(&user)).status,
        401
    );
    assert_eq!(call_as(&c, 0, "GET", "/rest/zdu/state", None).status, 401);

    // A refused transition: 409 with an empty body, or the errors document by knob.
    for path in ["/rest/zdu/approve", "/rest/zdu/cancel"] {
        let r = call(&c, 0, "POST", path);
        assert_eq!(r.status, 409, "{path}");
        assert!(r.body.is_empty(), "{path}: {}", r.text());
    }
    c.set_shared_property("sim.zdu.conflict.body", "json")
        .expect("property");
    wait_until("a JSON 409 body", TIMEOUT, || {
        !call(&c, 0, "POST", "/rest/zdu/approve").body.is_empty()
    });
    let r = call(&c, 0, "POST", "/rest/zdu/approve");
    assert_eq!(r.status, 409);
    let error = &r.json().expect("json")["errors"][0];
    assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()));
    assert!(error["context"].is_null() && error["exceptionName"].is_string());

    // No retryUpgrade in Bitbucket's API.
    let r = call(&c, 0, "POST", "/rest/zdu/retryUpgrade");
    assert_eq!(r.status, 404);

    // MAINTENANCE: 200 on /status, users not served.
    c.set_shared_property("sim.fault.maintenance", "true")
        .expect("property");
    c.wait_status(0, "MAINTENANCE", TIMEOUT)
        .expect("MAINTENANCE");
    let base = &c.nodes()[0].base_url;
    let status = client::get(&format!("{base}/status"), &[], TIMEOUT).expect("status");
    assert_eq!(status.status, 200);
    assert_eq!(
        client::get(&format!("{base}/"), &[], TIMEOUT)
            .expect("page")
            .status,
        503
    );
    c.set_shared_property("sim.fault.maintenance", "false")
        .expect("property");
    c.wait_status(0, "RUNNING", TIMEOUT).expect("RUNNING");

    // A non-clustered instance: 401 about the installation, whatever the credentials.
    c.set_shared_property("sim.fault.not.clustered", "true")
        .expect("property");
    wait_until("not clustered", TIMEOUT, || {
        call(&c, 0, "GET", "/rest/zdu/cluster").status == 401
    });
    for auth in [format!("Bearer {}", c.admin_token()), basic] {
        let r = call_as(&c, 0, "GET", "/rest/zdu/state", Some(&auth));
        assert_eq!(r.status, 401);
        let message = r.json().expect("json")["errors"][0]["message"].to_string();
        assert!(message.contains("clustered installation"), "{message}");
    }
    assert_eq!(
        call(&c, 0, "GET", "/rest/api/1.0/admin/cluster").status,
        200
    );
}

#[test]
fn error_node_with_another_version_running_makes_the_cluster_mixed() {
    let c = cluster(2, "8.19.3");
    c.start_all(true).expect("start");
    c.wait_running(TIMEOUT).expect("running");
    assert_eq!(call(&c, 1, "POST", "/rest/zdu/start").status, 200);

    // Node 1 on the bug-fix version fails to start.
    c.set_shared_property("sim.fault.start.error.node1", "true")
        .expect("property");
    let old = c.nodes()[0].install_dir.clone();
    c.stop_install(0, &old).expect("stop");
    let new = c.add_install(0, "8.19.4").expect("install");
    c.start_install(0, &new, true).expect("start");
    c.wait_status(0, "ERROR", TIMEOUT).expect("ERROR");
    wait_cluster_state(&c, 1, "MIXED");
    assert_eq!(node_state(&c, 1, 0), "ERROR");
    assert_eq!(
        call(&c, 1, "POST", "/rest/zdu/cancel").status,
        409,
        "no cancel while a node in ERROR runs the new version"
    );

    // Once it is down, the upgrade can be cancelled.
    c.stop_install(0, &new).expect("stop");
    wait_cluster_state(&c, 1, "READY_TO_UPGRADE");
    let r = call(&c, 1, "POST", "/rest/zdu/cancel");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(cluster_state(&c, 1), "STABLE");
    assert_eq!(r.json().expect("json")["upgradeModeEnabled"], false);
}

#[test]
fn offline_rows_do_not_hold_finalizing_back_and_retry_needs_its_knob() {
    let c = cluster(2, "8.19.3");
    c.start_all(true).expect("start");
    c.wait_running(TIMEOUT).expect("running");
    assert_eq!(call(&c, 0, "POST", "/rest/zdu/start").status, 200);

    // Node 2 is stopped and stays down on the original version; node 1 is upgraded.
    c.stop_node(1).expect("stop");
    let old = c.nodes()[0].install_dir.clone();
    c.stop_install(0, &old).expect("stop");
    let new = c.add_install(0, "8.19.4").expect("install");
    c.start_install(0, &new, true).expect("start");
    c.wait_status(0, "RUNNING", TIMEOUT).expect("running");
    wait_cluster_state(&c, 0, "READY_TO_RUN_UPGRADE_TASKS");
    let doc = zdu_cluster(&c, 0);
    let offline: Vec<&Value> = doc["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .filter(|n| n["state"] == "OFFLINE")
        .collect();
    assert_eq!(offline.len(), 2, "both old rows are OFFLINE: {doc:#}");
    assert!(offline.iter().all(|n| n.get("version").is_none()));
    assert_eq!(live_rows(&doc).len(), 1);

    // The upgrade tasks fail; upgrade mode is off from the approval on.
    set_fault(&c, 0, "sim.fault.upgrade.tasks.fail", "true");
    let r = call(&c, 0, "POST", "/rest/zdu/approve");
    assert_eq!(r.status, 200, "{}", r.text());
    let doc = r.json().expect("json");
    assert_eq!(doc["state"], "RUNNING_UPGRADE_TASKS");
    assert_eq!(doc["upgradeModeEnabled"], false);
    wait_cluster_state(&c, 0, "UPGRADE_TASKS_FAILED");
    assert_eq!(zdu_cluster(&c, 0)["upgradeModeEnabled"], false);
    assert_eq!(call(&c, 0, "POST", "/rest/zdu/start").status, 409);

    // retryUpgrade is not there, unless a knob adds it.
    assert_eq!(call(&c, 0, "POST", "/rest/zdu/retryUpgrade").status, 404);
    set_fault(&c, 0, "sim.zdu.retry.upgrade", "true");
    set_fault(&c, 0, "sim.fault.upgrade.tasks.fail", "false");
    let r = call(&c, 0, "POST", "/rest/zdu/retryUpgrade");
    assert_eq!(r.status, 200, "{}", r.text());
    wait_cluster_state(&c, 0, "STABLE");
    assert_eq!(zdu_cluster(&c, 0)["originalVersion"], "8.19.4");
    assert_eq!(call(&c, 0, "POST", "/rest/zdu/retryUpgrade").status, 409);
}

#[test]
fn configured_names_and_a_shared_cluster_port() {
    let setup = NodeSetup {
        configure_names: true,
        hazelcast_base_port: None,
        ..NodeSetup::default()
    };
    let c = cluster_with(2, "8.19.3", setup);
    c.set_shared_property("hazelcast.port", "5801")
        .expect("property");
    c.set_shared_property("sim.background.tasks.node2", "3")
        .expect("property");
    c.start_all(true).expect("start");
    c.wait_running(TIMEOUT).expect("running");
    let doc = zdu_cluster(&c, 0);
    for (i, name) in ["node1", "node2"].iter().enumerate() {
        let info = c.node_info(i).expect("info");
        assert_eq!(info.name, *name);
        assert_eq!(info.hazelcast_port, 5801);
        let row = row_by_id(&doc, &info.id).expect("row");
        assert_eq!(row["name"], *name, "{doc:#}");
        assert_eq!(row["portNumber"], 5801);
    }
    wait_until("node2's own knob", TIMEOUT, || {
        let doc = zdu_cluster(&c, 0);
        let id = c.node_id(1).unwrap_or_default();
        row_by_id(&doc, &id).is_some_and(|r| r["tasksTotal"] == 3)
    });
}
