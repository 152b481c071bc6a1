//! Shared helpers of the simulator's integration tests: a cluster in a temp dir, REST calls, polling.

#![allow(dead_code)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use bbupgrade_sim::client::{self, HttpResponse};
use bbupgrade_sim::cluster::{ClusterOptions, SimCluster};
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

pub fn cluster(nodes: usize, version: &str) -> TestCluster {
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
    let cluster = SimCluster::create(dir.path(), opts).expect("create cluster");
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

/// The state of the node named `name` as seen from node `from`.
pub fn node_state(c: &SimCluster, from: usize, name: &str) -> String {
    let doc = zdu_cluster(c, from);
    doc["nodes"]
        .as_array()
        .and_then(|ns| ns.iter().find(|n| n["name"] == name))
        .and_then(|n| n["state"].as_str())
        .unwrap_or("ABSENT")
        .to_string()
}

pub fn wait_until(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
