//! Rolling upgrades behind real NGINX (edited by the coordinator, or by an agent with an `[lb]` role)
//! and real Apache httpd under load (zero failed requests), the
//! NGINX driver refusing a configuration `nginx -t` rejects (file restored, nothing reloaded), and
//! traffic skew after a rejoin being redistributed behind a HAProxy that favours one node.

use bbupgrade::loadbalancer::{self, AdminState, LbConfig, LbError, LoadBalancer};
use bbupgrade_demo::sandbox::{ADMIN_TOKEN, Sandbox, SandboxLb};
use bbupgrade_sim::load::{LoadOptions, LoadReport};
use bbupgrade_tests::{
    Bins, bins, cluster_args, describe, require_program, sandbox_options, start_sandbox, summary_of,
};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

const TO: &str = "8.19.6";

/// Runs `bbupgrade upgrade --output json` against the sandbox while `users` send traffic through
/// its load balancer (every `clone_every`th request a clone, and as often a Git clone over SSH
/// through its SSH front door when it has one); returns the summary, all step events and the load
/// report.
async fn upgrade_under_load(
    bins: &Bins,
    s: &Sandbox,
    users: usize,
    clone_every: u32,
    extra: &[&str],
) -> (Value, Vec<Value>, LoadReport) {
    let load = bbupgrade_sim::load::start(LoadOptions {
        base_url: s.traffic_url(),
        users,
        clone_every,
        ssh_addr: s.lb_ssh_addr.clone(),
        ssh_clone_every: if s.lb_ssh_addr.is_some() {
            clone_every
        } else {
            0
        },
        think_ms: 50,
        duration: None,
        request_timeout: Duration::from_secs(60),
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut args = vec!["upgrade".to_string()];
    args.extend(cluster_args(s));
    args.extend(
        [
            "--output",
            "json",
            "--to",
            TO,
            "--archive",
            &s.to_archive.path.display().to_string(),
        ]
        .map(String::from),
    );
    args.extend(extra.iter().map(|x| x.to_string()));
    let bins2 = bins.clone();
    let out = tokio::task::spawn_blocking(move || {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        bbupgrade_tests::bbupgrade(&bins2, &refs)
    })
    .await
    .expect("running bbupgrade");
    let report = load.stop().await;
    let summary =
        summary_of(&out.stdout).unwrap_or_else(|| panic!("no summary:\n{}", describe(&out)));
    assert_eq!(summary["result"], "upgraded", "{}", describe(&out));
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let steps = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["event"] == "step")
        .collect();
    (summary, steps, report)
}

/// The detail of a node's step that ended well.
fn step_detail(steps: &[Value], node: &str, step: &str) -> String {
    steps
        .iter()
        .find(|v| v["node"] == node && v["step"] == step && v["status"] == "ok")
        .and_then(|v| v["detail"].as_str())
        .unwrap_or_else(|| panic!("{node}: no {step} step that ended well in {steps:#?}"))
        .to_string()
}

/// No HTTP request and no SSH session failed, and SSH reached every node through the load balancer.
fn assert_no_failure(report: &LoadReport, nodes: usize) {
    assert!(report.total > 0, "{report:#?}");
    assert_eq!(report.failed, 0, "requests failed: {report:#?}");
    assert_eq!(report.ssh_failed, 0, "SSH clones failed: {report:#?}");
    assert!(report.ssh_total > 0, "no SSH clones: {report:#?}");
    assert_eq!(report.ssh_by_node.len(), nodes, "{:?}", report.ssh_by_node);
}

fn step_ok(steps: &[Value], node: &str, step: &str) -> bool {
    steps
        .iter()
        .any(|v| v["node"] == node && v["step"] == step && v["status"] == "ok")
}

async fn assert_all_ready(s: &Sandbox, lb: &dyn LoadBalancer) {
    for (i, node) in s.sim.nodes().iter().enumerate() {
        let server = s.lb_servers.get(i).cloned().unwrap_or(node.name.clone());
        let state = lb.server_state(&server).await.expect("server state");
        assert_eq!(state.admin, AdminState::Ready, "{server}: {state:?}");
        assert_eq!(
            bbupgrade_tests::node_version(&node.base_url).await.unwrap(),
            TO,
            "{}",
            node.name
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_behind_real_nginx_under_load() {
    if !require_program("nginx") {
        return;
    }
    let bins = bins!();
    let tmp = bbupgrade_tests::temp_dir();
    let s = start_sandbox(tmp.path(), sandbox_options(&bins, 3, SandboxLb::Nginx))
        .await
        .expect("sandbox behind nginx");
    // SSH clones of most of a second keep the stream upstream's drains honest.
    s.sim
        .set_shared_property("sim.ssh.clone.ms", "600")
        .expect("ssh clone time");
    let cfg = s.lb_config.clone().expect("nginx settings");
    let LbConfig::Nginx {
        config, configs, ..
    } = &cfg
    else {
        panic!("{cfg:?}")
    };
    let stream = configs
        .get("bitbucket_ssh")
        .expect("the stream upstream's file");
    let before = [config, stream].map(|f| std::fs::read_to_string(f).unwrap());
    assert!(
        std::fs::read_to_string(s.dir.join("nginx/nginx.conf"))
            .unwrap()
            .contains("stream {"),
        "the sandbox's NGINX fronts SSH through stream"
    );

    let (summary, steps, report) = upgrade_under_load(&bins, &s, 6, 10, &[]).await;
    eprintln!(
        "behind nginx (http + stream): {} requests, {} SSH clones, {} failed, {} SSH failed",
        report.total, report.ssh_total, report.failed, report.ssh_failed
    );
    assert_no_failure(&report, 3);
    // Every node left and rejoined both doors, as the journal's step details say.
    for node in s.sim.nodes() {
        for step in ["drain", "enable"] {
            let d = step_detail(&steps, &node.name, step);
            assert!(
                d.contains("upstream bitbucket in ")
                    && d.contains(" and upstream bitbucket_ssh in "),
                "{}: {step}: {d}\n{summary:#}",
                node.name
            );
        }
    }
    // Every server is back, and the upstream files are byte for byte what they were.
    for (file, was) in [config, stream].into_iter().zip(&before) {
        assert_eq!(&std::fs::read_to_string(file).unwrap(), was);
        let mut bak = file.as_os_str().to_owned();
        bak.push(".bbupgrade.bak");
        assert!(
            Path::new(&bak).is_file(),
            "no backup next to {}",
            file.display()
        );
    }
    let lb = loadbalancer::from_config(&cfg).unwrap();
    assert_all_ready(&s, lb.as_ref()).await;

    // Preflight names the load balancer, the upstream and the server: an upstream NGINX does not
    // have, and a node missing from the stream upstream (no address of its own there).
    let node1 = &s.lb_servers[0];
    let LbConfig::Nginx {
        upstreams,
        server_names,
        ..
    } = &cfg
    else {
        unreachable!()
    };
    let mut extra = cfg.clone();
    if let LbConfig::Nginx { upstreams: u, .. } = &mut extra {
        *u = [upstreams.clone(), vec!["bitbucket_git".into()]].concat();
    }
    let e = loadbalancer::from_config(&extra)
        .unwrap()
        .check_server(node1)
        .await
        .unwrap_err();
    assert!(
        matches!(e, LbError::UnknownBackend { .. })
            && e.to_string().contains("upstream bitbucket_git"),
        "{e}"
    );
    let mut unnamed = cfg.clone();
    if let LbConfig::Nginx {
        server_names: n, ..
    } = &mut unnamed
    {
        *n = server_names.clone();
        n.get_mut("bitbucket_ssh").unwrap().remove(node1);
    }
    let e = loadbalancer::from_config(&unnamed)
        .unwrap()
        .check_server(node1)
        .await
        .unwrap_err();
    let m = e.to_string();
    assert!(
        matches!(e, LbError::UnknownServer { .. })
            && m.contains("`upstream bitbucket_ssh` lists")
            && m.contains(&format!("has no server {node1:?}")),
        "{m}"
    );
}

/// NGINX on "another host": the coordinator never touches its files; the agent with the `[lb]`
/// role does, over mutual TLS. A node's own agent, which has no such role, refuses the call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_behind_nginx_edited_by_an_lb_agent_under_load() {
    if !require_program("nginx") {
        return;
    }
    let bins = bins!();
    let tmp = bbupgrade_tests::temp_dir();
    let s = start_sandbox(tmp.path(), sandbox_options(&bins, 3, SandboxLb::NginxAgent))
        .await
        .expect("sandbox behind nginx with an lb agent");
    let cfg = s.lb_config.clone().expect("nginx-agent settings");
    assert!(
        matches!(&cfg, LbConfig::NginxAgent { agent_node, .. } if agent_node == "lb1"),
        "{cfg:?}"
    );
    let inventory = std::fs::read_to_string(&s.inventory).unwrap();
    assert!(inventory.contains("kind = \"nginx-agent\""), "{inventory}");
    let config = s.dir.join("nginx/upstream.conf");
    let before = std::fs::read_to_string(&config).unwrap();
    let tls = bbupgrade_common::tls::TlsFiles::in_pki_dir(
        &s.pki,
        bbupgrade_common::identity::Role::Coordinator,
        "sandbox-admin",
    )
    .load()
    .unwrap();

    // A Bitbucket node's agent has no [lb] role.
    let channel = bbupgrade_common::tls::connect_agent(
        &s.agent_addrs[0],
        &tls,
        &s.sim.nodes()[0].name,
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    let refused = bbupgrade_common::proto::agent_client::AgentClient::new(channel)
        .lb_server(bbupgrade_common::proto::LbServerRequest {
            operation_id: "t".into(),
            action: bbupgrade_common::proto::LbAction::State as i32,
            server: s.lb_servers[0].clone(),
            drain_timeout_secs: 1,
            check: false,
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition, "{refused}");
    assert!(refused.message().contains("no [lb] role"), "{refused}");

    let (summary, steps, report) = upgrade_under_load(&bins, &s, 6, 10, &[]).await;
    assert_no_failure(&report, 3);
    for node in s.sim.nodes() {
        assert!(step_ok(&steps, &node.name, "drain"), "{summary:#}");
        assert!(step_ok(&steps, &node.name, "enable"), "{summary:#}");
    }
    assert_eq!(std::fs::read_to_string(&config).unwrap(), before);
    let mut bak = config.as_os_str().to_owned();
    bak.push(".bbupgrade.bak");
    assert!(Path::new(&bak).is_file(), "the lb agent kept no backup");
    let lb = loadbalancer::from_config_with_tls(&cfg, Some(&tls)).unwrap();
    lb.check_server(&s.lb_servers[0])
        .await
        .expect("preflight through the lb agent");
    assert_all_ready(&s, lb.as_ref()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_behind_real_apache_under_load() {
    if !require_program("apache2") {
        return;
    }
    let bins = bins!();
    let tmp = bbupgrade_tests::temp_dir();
    let s = start_sandbox(tmp.path(), sandbox_options(&bins, 3, SandboxLb::Apache))
        .await
        .expect("sandbox behind apache");
    let cfg = s.lb_config.clone().expect("apache settings");

    let (summary, steps, report) = upgrade_under_load(&bins, &s, 6, 10, &[]).await;
    assert!(report.total > 0, "{report:#?}");
    assert_eq!(
        report.failed, 0,
        "requests failed behind apache: {report:#?}"
    );
    for node in s.sim.nodes() {
        assert!(step_ok(&steps, &node.name, "drain"), "{summary:#}");
        assert!(step_ok(&steps, &node.name, "enable"), "{summary:#}");
    }
    let lb = loadbalancer::from_config(&cfg).unwrap();
    assert_all_ready(&s, lb.as_ref()).await;
}

// ---------------------------------------------------------------------------------------------
// NGINX on its own: drain waits for old workers; a configuration `nginx -t` rejects is never loaded.

/// Stops the nginx it started, workers included, pass or fail.
struct NginxProcess(Child);

impl Drop for NginxProcess {
    fn drop(&mut self) {
        let group = nix::unistd::Pid::from_raw(self.0.id() as i32);
        let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
        let _ = self.0.wait();
    }
}

/// A backend answering every request after `delay_ms` (a slow request holds an old worker).
/// A backend answering every request after `delay_ms`; its port and how many requests it has
/// received (so a test waits until one is in flight instead of sleeping).
async fn slow_backend(delay_ms: u64) -> (u16, Arc<AtomicUsize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let received = Arc::new(AtomicUsize::new(0));
    let count = received.clone();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let count = count.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = sock.read(&mut buf).await;
                count.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(delay_ms)).await;
                let _ = sock
                    .write_all(
                        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
                    )
                    .await;
            });
        }
    });
    (port, received)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn worker_pids(master: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        if loadbalancer::nginx::parse_ppid(&stat) == Some(master) {
            out.push(pid);
        }
    }
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_drain_waits_for_old_workers_and_refuses_a_broken_config() {
    if !require_program("nginx") {
        return;
    }
    let tmp = bbupgrade_tests::temp_dir();
    let dir = tmp.path().to_path_buf();
    std::fs::create_dir_all(dir.join("tmp")).unwrap();
    let ((p1, node1_received), (p2, _)) = (slow_backend(1500).await, slow_backend(10).await);
    let port = free_port();
    let upstream = dir.join("upstream.conf");
    let main = dir.join("nginx.conf");
    let extra = dir.join("extra.conf");
    let upstream_text = format!(
        "upstream bitbucket {{\n    server 127.0.0.1:{p1} weight=2 max_fails=3;   # node1\n    server 127.0.0.1:{p2};\n}}\n"
    );
    std::fs::write(&upstream, &upstream_text).unwrap();
    std::fs::write(&extra, "# nothing yet\n").unwrap();
    std::fs::write(
        &main,
        bbupgrade_demo::sandbox::nginx_config(&dir, &upstream, port),
    )
    .unwrap();
    // The main file also includes extra.conf, which the test breaks later.
    let text = std::fs::read_to_string(&main).unwrap().replace(
        "    include ",
        &format!("    include {};\n    include ", extra.display()),
    );
    std::fs::write(&main, text).unwrap();
    let log = std::fs::File::create(dir.join("nginx.log")).unwrap();
    let _nginx = NginxProcess({
        use std::os::unix::process::CommandExt;
        Command::new("/usr/sbin/nginx")
            .args([
                "-p",
                &dir.display().to_string(),
                "-c",
                &main.display().to_string(),
            ])
            .args(["-e", &dir.join("error.log").display().to_string()])
            .args(["-g", "daemon off;"])
            .process_group(0)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap()
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err()
        || !dir.join("nginx.pid").is_file()
    {
        assert!(
            Instant::now() < deadline,
            "nginx did not start: {}",
            std::fs::read_to_string(dir.join("nginx.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let cfg = LbConfig::Nginx {
        config: upstream.clone(),
        upstream: "bitbucket".into(),
        upstreams: vec![],
        configs: Default::default(),
        server_names: Default::default(),
        mode: Default::default(),
        main_config: Some(main.clone()),
        prefix: Some(dir.clone()),
        nginx: Some(PathBuf::from("/usr/sbin/nginx")),
        pid_file: Some(dir.join("nginx.pid")),
        reload_command: None,
    };
    let lb = loadbalancer::from_config(&cfg).unwrap();
    let node1 = format!("127.0.0.1:{p1}");
    lb.check_server(&node1).await.unwrap();
    assert!(matches!(
        lb.check_server("127.0.0.1:1").await,
        Err(LbError::UnknownServer { .. })
    ));

    // Slow requests to node1 hold the current workers; the drain waits for them after the reload.
    let http = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{port}/");
    let mut slow = Vec::new();
    for _ in 0..6 {
        let (http, url) = (http.clone(), url.clone());
        slow.push(tokio::spawn(async move {
            http.get(url).send().await.map(|r| r.status().as_u16())
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while node1_received.load(Ordering::SeqCst) == 0 {
        assert!(Instant::now() < deadline, "no slow request reached node1");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let report = lb.drain(&node1, Duration::from_secs(20)).await.unwrap();
    assert!(report.sessions_at_start >= 1, "{report:?}");
    assert!(report.waited >= Duration::from_millis(500), "{report:?}");
    for h in slow {
        assert_eq!(
            h.await.unwrap().unwrap(),
            200,
            "an in-flight request failed"
        );
    }
    let down = std::fs::read_to_string(&upstream).unwrap();
    assert_eq!(
        down,
        upstream_text.replace("max_fails=3;", "max_fails=3 down;"),
        "only the server's line changes"
    );
    // New requests avoid node1 (fast answers only).
    for _ in 0..4 {
        let t = Instant::now();
        assert_eq!(http.get(&url).send().await.unwrap().status(), 200);
        assert!(
            t.elapsed() < Duration::from_millis(1000),
            "a request went to the drained server"
        );
    }

    // A configuration nginx -t rejects: the edit is undone and nothing is reloaded.
    let master: u32 = std::fs::read_to_string(dir.join("nginx.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let workers = loop {
        let w = worker_pids(master);
        if w.len() == 2 || Instant::now() > deadline {
            break w;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    std::fs::write(&extra, "this is not nginx syntax\n").unwrap();
    let err = lb.enable(&node1).await.unwrap_err();
    assert!(matches!(&err, LbError::Refused { .. }), "{err:?}");
    assert!(err.to_string().contains("nginx"), "{err}");
    assert_eq!(
        std::fs::read_to_string(&upstream).unwrap(),
        down,
        "the file was not restored"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(worker_pids(master), workers, "nginx was reloaded");
    assert_eq!(
        lb.server_state(&node1).await.unwrap().admin,
        AdminState::Maint
    );

    // Fixed: back in, byte for byte.
    std::fs::write(&extra, "# fixed\n").unwrap();
    lb.enable(&node1).await.unwrap();
    assert_eq!(std::fs::read_to_string(&upstream).unwrap(), upstream_text);
}

// ---------------------------------------------------------------------------------------------
// Traffic skew: HAProxy `balance first` sends every user to the first server once it rejoins.

async fn zdu_cluster(s: &Sandbox) -> Value {
    reqwest::Client::new()
        .get(format!("{}/rest/zdu/cluster", s.sim.nodes()[0].base_url))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skew_after_rejoin_is_redistributed() {
    if !require_program("haproxy") {
        return;
    }
    let bins = bins!();
    let tmp = bbupgrade_tests::temp_dir();
    let mut s = start_sandbox(tmp.path(), sandbox_options(&bins, 3, SandboxLb::Haproxy))
        .await
        .expect("sandbox behind haproxy");
    tokio::task::block_in_place(|| s.set_haproxy_balance("first")).expect("balance first");
    s.wait_lb_up(Duration::from_secs(20)).await.unwrap();
    // Active users are the sessions of the last 2 s; node1 is the least busy, so first.
    s.sim
        .set_shared_property("sim.activeusers.window.ms", "2000")
        .unwrap();
    for n in ["node2", "node3"] {
        s.sim
            .set_shared_property(&format!("sim.background.tasks.{n}"), "50")
            .unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let v = zdu_cluster(&s).await;
        let nodes = v["nodes"].as_array().cloned().unwrap_or_default();
        if nodes
            .iter()
            .filter(|n| n["tasksTotal"].as_u64() >= Some(50))
            .count()
            == 2
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "background tasks never showed: {v:#}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Short page requests only: a user inside a long clone is not seen as active.
    let (summary, steps, report) = upgrade_under_load(&bins, &s, 8, 0, &["--soak-secs", "3"]).await;

    assert_eq!(report.failed, 0, "{report:#?}");
    assert_eq!(summary["order"][0], "node1", "{summary:#}");
    assert!(
        step_ok(&steps, "node1", "skew"),
        "no skew step for node1: {summary:#}"
    );
    let notes = summary["notes"].to_string();
    assert!(
        notes.contains("node 'node1': traffic skew after rejoining")
            && notes.contains("taken out of the load balancer"),
        "{summary:#}"
    );
    // Nodes that got no users after rejoining were left alone.
    assert!(
        !step_ok(&steps, "node2", "skew") && !step_ok(&steps, "node3", "skew"),
        "{summary:#}"
    );
}
