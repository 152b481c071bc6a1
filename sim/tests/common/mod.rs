//! Shared helpers of the simulator's integration tests: a cluster in a temp dir, REST calls, polling.

#![allow(dead_code)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use bbupgrade_sim::client::{self, HttpResponse};
use bbupgrade_sim::cluster::{ClusterOptions, NodeSetup, SimCluster};
use serde_json::Value;

pub const STARTUP_MS: u64 = 300;
pub const TIMEOUT: Duration = Duration::from_secs(20);

/// A cluster and the temp dir holding it; the cluster (and its processes) goes first.
pub struct TestCluster {
    pub cluster: SimCluster,
    _dir: tempfile::TempDir,
}

impl std::ops::Deref for TestCluster {
    type Target = SimCluster;
    fn deref(&self) -> &SimCluster {
        &self.cluster
    }
}

pub fn program() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_bitbucket-sim"))
}

pub const USER_TOKEN: &str = "test-user-token";

/// A cluster as a real install has it: no node names, distinct cluster ports (all on 127.0.0.1).
pub fn cluster(nodes: usize, version: &str) -> TestCluster {
    cluster_with(nodes, version, NodeSetup::default())
}

pub fn cluster_with(nodes: usize, version: &str, setup: NodeSetup) -> TestCluster {
    let dir = tempfile::tempdir().expect("tempdir");
    let opts = ClusterOptions {
        nodes,
        version: version.into(),
        program: program(),
        startup_ms: STARTUP_MS,
        admin_token: "test-token".into(),
        payload_mib: 0,
        run_as_user: None,
    };
    let setup = NodeSetup {
        user_token: Some(USER_TOKEN.into()),
        ..setup
    };
    let cluster = SimCluster::create_with(dir.path(), opts, None, setup).expect("create cluster");
    cluster
        .set_shared_property("sim.heartbeat.stale.ms", "1000")
        .expect("property");
    cluster
        .set_shared_property("sim.upgrade.tasks.ms", "300")
        .expect("property");
    TestCluster { cluster, _dir: dir }
}

pub fn call(c: &SimCluster, node: usize, method: &str, path: &str) -> HttpResponse {
    let auth = format!("Bearer {}", c.admin_token());
    let url = format!("{}{path}", c.nodes()[node].base_url);
    client::request(
        method,
        &url,
        &[("Authorization", &auth)],
        None,
        Duration::from_secs(5),
    )
    .expect("request")
}

pub fn zdu_cluster(c: &SimCluster, node: usize) -> Value {
    let r = call(c, node, "GET", "/rest/zdu/cluster");
    assert_eq!(r.status, 200, "{}", r.text());
    r.json().expect("json")
}

pub fn cluster_state(c: &SimCluster, node: usize) -> String {
    zdu_cluster(c, node)["state"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// The cluster (Hazelcast) port node `index` reports as `portNumber`.
pub fn cluster_port(c: &SimCluster, index: usize) -> u16 {
    c.nodes()[index].hazelcast_port.unwrap_or(5701)
}

/// The row of node `index` in a cluster view, found by its address as a client must (names are
/// "Not configured", ids change on restart): the live row at its port, else an OFFLINE one.
pub fn row_of(c: &SimCluster, doc: &Value, index: usize) -> Option<Value> {
    let port = cluster_port(c, index);
    let rows: Vec<&Value> = doc["nodes"]
        .as_array()?
        .iter()
        .filter(|n| n["portNumber"] == port)
        .collect();
    rows.iter()
        .find(|n| n["state"] != "OFFLINE")
        .or(rows.first())
        .map(|n| (*n).clone())
}

/// The state of node `index` as seen from node `from` (`ABSENT` without a row).
pub fn node_state(c: &SimCluster, from: usize, index: usize) -> String {
    row_of(c, &zdu_cluster(c, from), index)
        .and_then(|n| n["state"].as_str().map(str::to_string))
        .unwrap_or_else(|| "ABSENT".into())
}

/// The rows of a cluster view that are not OFFLINE.
pub fn live_rows(doc: &Value) -> Vec<Value> {
    doc["nodes"]
        .as_array()
        .map(|ns| {
            ns.iter()
                .filter(|n| n["state"] != "OFFLINE")
                .cloned()
                .collect()
        })
        .unwrap_or_default()
}

/// A REST call with an explicit `Authorization` header (or none).
pub fn call_as(
    c: &SimCluster,
    node: usize,
    method: &str,
    path: &str,
    authorization: Option<&str>,
) -> HttpResponse {
    let url = format!("{}{path}", c.nodes()[node].base_url);
    let headers: Vec<(&str, &str)> = authorization
        .map(|a| vec![("Authorization", a)])
        .unwrap_or_default();
    client::request(method, &url, &headers, None, Duration::from_secs(5)).expect("request")
}

pub fn wait_until(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
