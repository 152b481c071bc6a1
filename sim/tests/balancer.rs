//! The HAProxy stand-in (`bbupgrade_sim::balancer`) in front of real simulated nodes: round robin,
//! drain with a clone in flight, maintenance, a node restart, back to ready, zero failed requests
//! under load through a rolling restart, redispatch away from a dead server, 503 with none left.
//! The runtime-API answers are parsed the way bbupgrade's HAProxy driver parses HAProxy's.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bbupgrade_sim::balancer::{self, BalancerHandle, BalancerOptions, ServerSpec};
use bbupgrade_sim::cluster::free_ports;
use bbupgrade_sim::load::{self, LoadOptions};
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Two (or more) running nodes whose clones take `clone_ms`.
async fn running_cluster(nodes: usize, clone_ms: u64) -> Arc<TestCluster> {
    tokio::task::spawn_blocking(move || {
        let c = cluster(nodes, "8.19.3");
        c.set_shared_property("sim.scm.clone.ms", &clone_ms.to_string())
            .expect("property");
        c.start_all(true).expect("start");
        c.wait_running(TIMEOUT).expect("running");
        Arc::new(c)
    })
    .await
    .expect("setup")
}

async fn blocking<T: Send + 'static>(
    c: &Arc<TestCluster>,
    f: impl FnOnce(&TestCluster) -> T + Send + 'static,
) -> T {
    let c = Arc::clone(c);
    tokio::task::spawn_blocking(move || f(&c))
        .await
        .expect("blocking step")
}

fn specs(c: &TestCluster) -> Vec<ServerSpec> {
    c.nodes()
        .iter()
        .map(|n| ServerSpec {
            name: n.name.clone(),
            addr: ([127, 0, 0, 1], n.port).into(),
        })
        .collect()
}

async fn start_balancer(dir: &Path, servers: Vec<ServerSpec>) -> BalancerHandle {
    let opts = BalancerOptions::new(
        ([127, 0, 0, 1], 0).into(),
        dir.join("admin.sock"),
        "bitbucket",
        servers,
    );
    balancer::start(opts).await.expect("balancer starts")
}

/// One runtime-API exchange, as the driver does it: a line, then read to EOF.
async fn admin(socket: &Path, cmd: &str) -> String {
    let mut s = tokio::net::UnixStream::connect(socket)
        .await
        .expect("socket");
    s.write_all(format!("{cmd}\n").as_bytes())
        .await
        .expect("write");
    let mut answer = String::new();
    s.read_to_string(&mut answer).await.expect("read");
    answer
}

async fn set_state(socket: &Path, server: &str, state: &str) {
    let answer = admin(
        socket,
        &format!("set server bitbucket/{server} state {state}"),
    )
    .await;
    assert!(answer.trim().is_empty(), "set {server} {state}: {answer:?}");
}

/// (srv_op_state, srv_admin_state) of a server, columns found by header name as the driver does.
async fn servers_state(socket: &Path, server: &str) -> (u32, u32) {
    let text = admin(socket, "show servers state bitbucket").await;
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    assert_eq!(lines.next(), Some("1"), "{text}");
    let header: Vec<&str> = lines
        .next()
        .and_then(|l| l.strip_prefix("# "))
        .expect("header")
        .split_whitespace()
        .collect();
    let col = |name: &str| {
        header
            .iter()
            .position(|c| *c == name)
            .unwrap_or_else(|| panic!("no {name} in {text}"))
    };
    let (be, srv, op, adm) = (
        col("be_name"),
        col("srv_name"),
        col("srv_op_state"),
        col("srv_admin_state"),
    );
    assert_eq!(
        &header[..7],
        [
            "be_id",
            "be_name",
            "srv_id",
            "srv_name",
            "srv_addr",
            "srv_op_state",
            "srv_admin_state"
        ]
    );
    let row: Vec<&str> = lines
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f[be] == "bitbucket" && f[srv] == server)
        .unwrap_or_else(|| panic!("no row for {server} in {text}"));
    (
        row[op].parse().expect("op"),
        row[adm].parse().expect("admin"),
    )
}

/// (scur, status) of a server from `show stat -1 4 -1`, columns found by header name.
async fn stat(socket: &Path, server: &str) -> (u64, String) {
    let text = admin(socket, "show stat -1 4 -1").await;
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let header: Vec<&str> = lines
        .next()
        .and_then(|l| l.strip_prefix("# "))
        .expect("header")
        .split(',')
        .collect();
    assert_eq!(&header[..5], ["pxname", "svname", "qcur", "qmax", "scur"]);
    let col = |name: &str| {
        header
            .iter()
            .position(|c| *c == name)
            .unwrap_or_else(|| panic!("no {name} in {text}"))
    };
    let (px, sv, scur, status) = (col("pxname"), col("svname"), col("scur"), col("status"));
    let row: Vec<&str> = lines
        .map(|l| l.split(',').collect::<Vec<_>>())
        .find(|f| f[px] == "bitbucket" && f[sv] == server)
        .unwrap_or_else(|| panic!("no row for {server} in {text}"));
    (row[scur].parse().expect("scur"), row[status].to_string())
}

async fn wait_for(what: &str, mut ok: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + TIMEOUT;
    while !ok().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The nodes that served `n` page requests.
async fn served_by(http: &reqwest::Client, url: &str, n: usize) -> Vec<String> {
    let mut nodes = Vec::new();
    for _ in 0..n {
        let r = http
            .get(format!("{url}/rest/api/1.0/projects"))
            .send()
            .await
            .expect("page");
        assert_eq!(r.status(), 200);
        nodes.push(
            r.headers()["x-sim-node"]
                .to_str()
                .expect("header")
                .to_string(),
        );
    }
    nodes
}

/// A clone's pack, read to its end: (node, bytes received, Content-Length).
async fn clone_pack(http: reqwest::Client, url: String) -> (String, u64, Option<u64>) {
    let r = http
        .post(format!("{url}/scm/prj/repo1.git/git-upload-pack"))
        .header("Content-Type", "application/x-git-upload-pack-request")
        .body("0032want 0000000000000000000000000000000000000000\n00000009done\n")
        .send()
        .await
        .expect("clone");
    assert_eq!(r.status(), 200);
    let node = r.headers()["x-sim-node"]
        .to_str()
        .expect("header")
        .to_string();
    let expected = r.content_length();
    let body = r.bytes().await.expect("pack body");
    (node, body.len() as u64, expected)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn balancer_drains_maints_and_returns_a_node() {
    let c = running_cluster(2, 1_500).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let lb = start_balancer(dir.path(), specs(&c)).await;
    let sock = lb.socket().to_path_buf();
    let url = lb.url();
    let http = reqwest::Client::new();

    // Both up and ready (assumed up at start, "UP 1/2" until a first check passes); traffic
    // spreads over both; cookies pass through.
    assert_eq!(servers_state(&sock, "node1").await, (2, 0));
    wait_for("node2 checked", async || {
        stat(&sock, "node2").await == (0, "UP".to_string())
    })
    .await;
    let nodes = served_by(&http, &url, 6).await;
    assert!(
        nodes.contains(&"node1".into()) && nodes.contains(&"node2".into()),
        "{nodes:?}"
    );
    let r = http.get(format!("{url}/")).send().await.expect("page");
    let cookie = r
        .headers()
        .get("set-cookie")
        .map(|v| v.to_str().unwrap_or("").to_string());
    assert!(
        cookie.is_some_and(|c| c.contains("BITBUCKETSESSIONID")),
        "{:?}",
        r.headers()
    );

    // A clone in flight on node1 (node2 drained so it lands there).
    set_state(&sock, "node2", "drain").await;
    let clone = tokio::spawn(clone_pack(http.clone(), url.clone()));
    wait_for("node1 holds the clone", async || {
        stat(&sock, "node1").await.0 == 1
    })
    .await;
    set_state(&sock, "node2", "ready").await;

    // Drain node1: no new requests there, the clone goes on to its end.
    set_state(&sock, "node1", "drain").await;
    assert_eq!(
        servers_state(&sock, "node1").await,
        (2, balancer::ADMF_FDRAIN)
    );
    assert_eq!(stat(&sock, "node1").await, (1, "DRAIN".to_string()));
    let nodes = served_by(&http, &url, 6).await;
    assert!(
        nodes.iter().all(|n| n == "node2"),
        "a draining server got a new request: {nodes:?}"
    );
    let (node, received, expected) = clone.await.expect("clone task");
    assert_eq!(node, "node1");
    assert_eq!(Some(received), expected, "the clone was cut");
    wait_for("node1 scur 0", async || stat(&sock, "node1").await.0 == 0).await;

    // Maintenance, a restart of node1, then ready: traffic returns once its checks pass.
    set_state(&sock, "node1", "maint").await;
    assert_eq!(
        servers_state(&sock, "node1").await,
        (0, balancer::ADMF_FMAINT)
    );
    assert_eq!(stat(&sock, "node1").await.1, "MAINT");
    blocking(&c, |c| c.stop_node(0).expect("stop node1")).await;
    blocking(&c, |c| c.start_node(0, true).expect("start node1")).await;
    let nodes = served_by(&http, &url, 4).await;
    assert!(nodes.iter().all(|n| n == "node2"), "{nodes:?}");
    blocking(&c, |c| {
        c.wait_status(0, "RUNNING", TIMEOUT).expect("node1 running")
    })
    .await;
    set_state(&sock, "node1", "ready").await;
    assert_eq!(servers_state(&sock, "node1").await.1, 0);
    wait_for("node1 up", async || {
        servers_state(&sock, "node1").await == (2, 0)
    })
    .await;
    let nodes = served_by(&http, &url, 6).await;
    assert!(
        nodes.contains(&"node1".into()),
        "traffic did not return to node1: {nodes:?}"
    );

    // Errors as HAProxy words them.
    let a = admin(&sock, "set server bitbucket/node9 state drain").await;
    assert_eq!(a.trim(), "No such server.");
    let a = admin(&sock, "set server nosuch/node1 state drain").await;
    assert_eq!(a.trim(), "No such backend.");
    assert_eq!(
        admin(&sock, "show servers state nosuch").await.trim(),
        "Can't find backend."
    );
    assert!(
        admin(&sock, "disable server bitbucket/node1")
            .await
            .starts_with("Unknown command")
    );

    lb.shutdown().await;
    assert!(!sock.exists(), "the socket file is removed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn balancer_load_through_a_rolling_restart_has_no_failures() {
    let c = running_cluster(2, 600).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let lb = start_balancer(dir.path(), specs(&c)).await;
    let sock = lb.socket().to_path_buf();
    let load = load::start(LoadOptions {
        base_url: lb.url(),
        users: 6,
        clone_every: 3,
        ssh_addr: None,
        ssh_clone_every: 0,
        think_ms: 50,
        duration: None,
        request_timeout: Duration::from_secs(15),
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    for (i, name) in ["node1", "node2"].into_iter().enumerate() {
        // What the coordinator does: drain until no session is left, maintenance, restart, ready.
        set_state(&sock, name, "drain").await;
        wait_for("no sessions", async || stat(&sock, name).await.0 == 0).await;
        set_state(&sock, name, "maint").await;
        blocking(&c, move |c| c.stop_node(i).expect("stop")).await;
        blocking(&c, move |c| c.start_node(i, true).expect("start")).await;
        blocking(&c, move |c| {
            c.wait_status(i, "RUNNING", TIMEOUT).expect("running")
        })
        .await;
        set_state(&sock, name, "ready").await;
        wait_for("up again", async || {
            servers_state(&sock, name).await == (2, 0)
        })
        .await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let report = load.stop().await;
    let line = report.summary_line();
    assert_eq!(report.failed, 0, "{line}\n{:#?}", report.failures);
    assert!(report.clones > 0 && report.clones_failed == 0, "{line}");
    assert!(
        report.by_node.get("node1").is_some_and(|n| *n > 0),
        "{line}"
    );
    assert!(
        report.by_node.get("node2").is_some_and(|n| *n > 0),
        "{line}"
    );
    lb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn balancer_redispatches_from_a_dead_server_and_says_503_with_none() {
    let c = running_cluster(1, 300).await;
    let dead = free_ports(1).expect("port")[0];
    let mut servers = specs(&c);
    servers.insert(
        0,
        ServerSpec::parse(&format!("dead=127.0.0.1:{dead}")).expect("spec"),
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let lb = start_balancer(dir.path(), servers).await;
    let sock: PathBuf = lb.socket().to_path_buf();
    let http = reqwest::Client::new();

    // Before its first check fails the dead server is assumed up: its connections fail and the
    // request goes to node1 instead.
    let nodes = served_by(&http, &lb.url(), 4).await;
    assert!(nodes.iter().all(|n| n == "node1"), "{nodes:?}");
    let clone = clone_pack(http.clone(), lb.url()).await;
    assert_eq!(Some(clone.1), clone.2);
    wait_for("dead is down", async || {
        servers_state(&sock, "dead").await.0 == 0
    })
    .await;
    assert_eq!(stat(&sock, "dead").await, (0, "DOWN".to_string()));

    set_state(&sock, "node1", "maint").await;
    let r = http.get(lb.url()).send().await.expect("answer");
    assert_eq!(r.status(), 503);
    set_state(&sock, "node1", "ready").await;
    wait_for("node1 up", async || {
        servers_state(&sock, "node1").await == (2, 0)
    })
    .await;
    assert_eq!(served_by(&http, &lb.url(), 2).await, ["node1", "node1"]);
    drop(c);
    lb.shutdown().await;
}
