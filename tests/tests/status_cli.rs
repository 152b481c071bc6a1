//! `bbupgrade status` against real agent processes, and `bbupgrade pki` through the command line:
//! what they print, how fast an unreachable agent is reported, and their exit codes.

use bbupgrade_demo::sandbox::{Sandbox, SandboxLb};
use bbupgrade_tests::{bbupgrade, bins, cluster_args, describe, sandbox_options, temp_dir};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

/// A sandbox of three agents; the nodes themselves are not started (status needs only the agents).
fn sandbox(dir: &Path) -> Sandbox {
    let bins = bins!();
    let s = Sandbox::create(dir, sandbox_options(&bins, 3, SandboxLb::None)).expect("sandbox");
    s.wait_agents().expect("agents up");
    s
}

fn status(s: &Sandbox, extra: &[&str]) -> std::process::Output {
    status_with(&cluster_args(s), extra)
}

fn json(out: &std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("status --output json is not JSON ({e}):\n{}", describe(out)))
}

#[test]
fn status_reports_every_agent_then_one_that_is_down() {
    let dir = temp_dir();
    let mut s = sandbox(dir.path());

    // The agents answer but no Bitbucket runs: no node is ACTIVE, so status exits 1 and says so.
    let out = status(&s, &[]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no node is known to be ACTIVE"),
        "{}",
        describe(&out)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    for (i, node) in ["node1", "node2", "node3"].iter().enumerate() {
        let line = text
            .lines()
            .find(|l| l.starts_with(node))
            .unwrap_or_else(|| panic!("no row for {node}:\n{text}"));
        assert!(line.contains(&s.agent_addrs[i]), "{line}");
        assert!(line.contains("yes") && line.contains("8.19.3"), "{line}");
    }

    // A journal that cannot be read still shows the live nodes, and says why the runs are missing;
    // asking for a run's steps explicitly then fails.
    let unreachable = [
        "--state",
        "postgresql://postgres@/nope?host=/nonexistent-bbupgrade&port=1",
    ];
    let out = status(&s, &[unreachable[0], unreachable[1], "--output", "json"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let doc = json(&out);
    assert_eq!(doc["nodes"].as_array().map(Vec::len), Some(3), "{doc}");
    assert!(
        doc["journal_error"].as_str().is_some_and(|e| !e.is_empty()),
        "{doc}"
    );
    let out = status(&s, &[unreachable[0], unreachable[1], "--steps"]);
    assert_ne!(out.status.code(), Some(0), "{}", describe(&out));

    let out = status(&s, &["--output", "json"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let doc = json(&out);
    assert_eq!(doc["cluster"], "sandbox");
    let nodes = doc["nodes"].as_array().expect("nodes");
    assert_eq!(nodes.len(), 3);
    for (i, n) in nodes.iter().enumerate() {
        let id = format!("node{}", i + 1);
        assert_eq!(n["id"], id.as_str(), "{n}");
        assert_eq!(n["reachable"], true, "{n}");
        assert_eq!(n["version"], "8.19.3", "{n}");
        assert_eq!(n["identity"], format!("agent/{id}").as_str(), "{n}");
        assert_eq!(n["service_kind"], "scripts", "{n}");
        assert!(
            n["active_install"]
                .as_str()
                .is_some_and(|p| p.ends_with("atlassian-bitbucket-8.19.3")),
            "{n}"
        );
        assert!(n["error"].is_null(), "{n}");
        assert!(n["load"]["memory_total_bytes"].as_u64() > Some(0), "{n}");
        // No load balancer (kind = "none"): every node counts as in service.
        assert_eq!(n["load_balancer"]["in_service"], true, "{n}");
    }

    s.kill_agent(1);
    let started = Instant::now();
    let out = status(&s, &["--output", "json"]);
    let elapsed = started.elapsed();
    assert!(
        elapsed < Duration::from_secs(10),
        "status took {elapsed:?} with one agent down"
    );
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("1 of 3 agents unreachable"),
        "{}",
        describe(&out)
    );
    let doc = json(&out);
    let nodes = doc["nodes"].as_array().expect("nodes");
    assert_eq!(nodes[0]["reachable"], true);
    assert_eq!(nodes[2]["reachable"], true);
    let down = &nodes[1];
    assert_eq!(down["reachable"], false, "{down}");
    let reason = down["error"].as_str().expect("a reason for node2");
    assert!(
        reason.contains("node2") && reason.contains(&s.agent_addrs[1]),
        "the reason should name the node and its agent: {reason}"
    );
    assert!(
        reason.to_lowercase().contains("refused"),
        "the reason should say the connection was refused: {reason}"
    );

    // Human output says it too, with the reason on the node's row.
    let out = status(&s, &[]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    let row = text
        .lines()
        .find(|l| l.starts_with("node2"))
        .unwrap_or_else(|| panic!("no row for node2:\n{text}"));
    assert!(
        row.contains("NO") && row.contains(&s.agent_addrs[1]),
        "{row}"
    );
}

/// Bitbucket's side of `status`: every row of the cluster view with the node it maps to, every key
/// present, and still there when every agent is down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_bitbucket_rows_mapped_to_nodes_even_with_every_agent_down() {
    let dir = temp_dir();
    let bins = bins!();
    let mut s =
        bbupgrade_tests::start_sandbox(dir.path(), sandbox_options(&bins, 2, SandboxLb::None))
            .await
            .expect("sandbox");
    let check = |doc: &serde_json::Value| {
        let bb = &doc["bitbucket"];
        assert!(bb["error"].is_null(), "{bb}");
        assert_eq!(bb["state"], "STABLE", "{bb}");
        assert_eq!(bb["upgrade_mode"], false, "{bb}");
        let rows = bb["nodes"].as_array().expect("bitbucket.nodes");
        for row in rows {
            for k in [
                "node", "id", "name", "address", "state", "version", "tasks", "users",
            ] {
                assert!(row.get(k).is_some(), "{k} missing in {row}");
            }
        }
        for node in ["node1", "node2"] {
            let mine: Vec<_> = rows.iter().filter(|r| r["node"] == node).collect();
            assert_eq!(mine.len(), 1, "{node} should map to one row: {bb}");
            assert_eq!(mine[0]["state"], "ACTIVE", "{bb}");
            assert_eq!(mine[0]["version"], "8.19.3", "{bb}");
            assert!(
                mine[0]["address"]
                    .as_str()
                    .is_some_and(|a| a.starts_with("127.0.0.1:")),
                "{bb}"
            );
        }
    };
    let out = tokio::task::spawn_blocking({
        let args = cluster_args(&s);
        move || status_with(&args, &["--output", "json"])
    })
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    check(&json(&out));

    s.kill_agent(0);
    s.kill_agent(1);
    let args = cluster_args(&s);
    let out = tokio::task::spawn_blocking({
        let args = args.clone();
        move || status_with(&args, &["--output", "json"])
    })
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let doc = json(&out);
    assert!(
        doc["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .all(|n| n["reachable"] == false),
        "{doc}"
    );
    check(&doc);
    let out = tokio::task::spawn_blocking(move || status_with(&args, &[]))
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("bitbucket: cluster STABLE, upgrade mode off"),
        "{text}"
    );
}

fn status_with(cluster: &[String], extra: &[&str]) -> std::process::Output {
    let mut args = vec!["status".to_string()];
    args.extend(cluster.iter().cloned());
    args.extend(extra.iter().map(|a| a.to_string()));
    bbupgrade(
        &bins!(),
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    )
}

#[test]
fn status_with_an_unknown_cluster_or_no_inventory_is_bad_input() {
    let bins = bins!();
    let dir = temp_dir();
    let inv = dir.path().join("inventory.toml");
    let pki = dir.path().join("pki");
    let ca = bbupgrade_common::pki::Ca::generate().unwrap();
    ca.save(&pki).unwrap();
    std::fs::write(
        &inv,
        format!(
            "tls = {{ ca = {:?}, cert = {:?}, key = {:?} }}\n\n\
[[clusters]]\nname = \"prod\"\nbitbucket_url = \"http://127.0.0.1:1\"\ntoken_env = \"BB_TOKEN\"\nload_balancer = {{ kind = \"none\" }}\n\
[[clusters.nodes]]\nid = \"node1\"\nagent = \"127.0.0.1:1\"\n\n\
[[clusters]]\nname = \"staging\"\nbitbucket_url = \"http://127.0.0.1:1\"\ntoken_env = \"BB_TOKEN\"\nload_balancer = {{ kind = \"none\" }}\n\
[[clusters.nodes]]\nid = \"node1\"\nagent = \"127.0.0.1:1\"\n",
            pki.join("ca.pem"),
            pki.join("coordinator-admin.pem"),
            pki.join("coordinator-admin.key"),
        ),
    )
    .unwrap();
    let inv_arg = inv.display().to_string();

    let out = bbupgrade(
        &bins,
        &["status", "--inventory", &inv_arg, "--cluster", "nope"],
    );
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("'nope'") && err.contains("prod") && err.contains("staging"),
        "the error should name the unknown cluster and the known ones: {err}"
    );

    let missing = dir.path().join("no-such-inventory.toml");
    let out = bbupgrade(
        &bins,
        &[
            "status",
            "--inventory",
            &missing.display().to_string(),
            "--cluster",
            "prod",
        ],
    );
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no-such-inventory.toml"),
        "the error should name the missing file: {}",
        describe(&out)
    );
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o777
}

#[test]
fn pki_init_and_issue_through_the_cli() {
    let bins = bins!();
    let dir = temp_dir();
    let pki = dir.path().join("pki");
    let d = pki.display().to_string();

    let out = bbupgrade(&bins, &["pki", "init", "--dir", &d]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert_eq!(mode(&pki.join("ca.key")), 0o600);
    assert!(pki.join("ca.pem").is_file());

    let out = bbupgrade(
        &bins,
        &[
            "pki",
            "issue",
            "--dir",
            &d,
            "--role",
            "agent",
            "--name",
            "node1",
            "--san",
            "127.0.0.1",
            "--san",
            "node1.example",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("spiffe://bbupgrade/agent/node1"),
        "{}",
        describe(&out)
    );
    assert_eq!(mode(&pki.join("agent-node1.key")), 0o600);
    let files = bbupgrade_common::tls::TlsFiles::in_pki_dir(
        &pki,
        bbupgrade_common::identity::Role::Agent,
        "node1",
    );
    let identity = files.load().unwrap().own_identity().unwrap();
    assert_eq!(identity.to_string(), "agent 'node1'");

    let out = bbupgrade(
        &bins,
        &[
            "pki",
            "issue",
            "--dir",
            &d,
            "--role",
            "coordinator",
            "--name",
            "admin",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert_eq!(mode(&pki.join("coordinator-admin.key")), 0o600);

    let out = bbupgrade(
        &bins,
        &[
            "pki",
            "issue",
            "--dir",
            &d,
            "--role",
            "agent",
            "--name",
            "node2",
            "--san",
            "notadomain!",
        ],
    );
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("notadomain!"),
        "the error should name the bad SAN: {}",
        describe(&out)
    );
    assert!(!pki.join("agent-node2.key").exists());

    let ca_before = std::fs::read(pki.join("ca.key")).unwrap();
    let out = bbupgrade(&bins, &["pki", "init", "--dir", &d]);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("already exists"),
        "{}",
        describe(&out)
    );
    assert_eq!(
        std::fs::read(pki.join("ca.key")).unwrap(),
        ca_before,
        "the CA must be left alone"
    );
}

/// `status` shows each node as HAProxy sees it and the open run's step in progress, and exits 1
/// while a node is out of service, 0 when all are back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_the_load_balancers_view_and_the_open_run() {
    if !bbupgrade_tests::require_program("haproxy") {
        return;
    }
    let dir = temp_dir();
    let bins = bins!();
    let s =
        bbupgrade_tests::start_sandbox(dir.path(), sandbox_options(&bins, 2, SandboxLb::Haproxy))
            .await
            .expect("sandbox");
    let run_status = |extra: &'static [&'static str]| {
        let args = cluster_args(&s);
        tokio::task::spawn_blocking(move || status_with(&args, extra))
    };
    let out = run_status(&["--output", "json"]).await.unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let doc = json(&out);
    for n in doc["nodes"].as_array().expect("nodes") {
        let lb = &n["load_balancer"];
        assert_eq!(
            (lb["in_service"].as_bool(), lb["admin"].as_str()),
            (Some(true), Some("ready")),
            "{n}"
        );
    }
    assert!(doc["open_run"].is_null(), "{doc}");

    // node2 taken out by hand, and a run left open in the middle of a step.
    let inventory = bbupgrade::inventory::Inventory::load(&s.inventory).expect("inventory");
    let cluster = inventory.cluster(&s.cluster_name).expect("cluster");
    let lb = bbupgrade::loadbalancer::from_config(&cluster.load_balancer).expect("driver");
    lb.drain("node2", Duration::from_secs(10))
        .await
        .expect("drain node2");
    let journal = bbupgrade::journal::Journal::open(&s.dir.join("journal.db")).expect("journal");
    let run = journal
        .create_run(&bbupgrade::journal::NewRun {
            cluster: s.cluster_name.clone(),
            kind: bbupgrade::journal::RunKind::Upgrade,
            from_version: "8.19.3".into(),
            to_version: "8.19.6".into(),
            plan_json: "{}".into(),
            actor: "test@here:1".into(),
            options_json: "{}".into(),
        })
        .expect("run");
    journal
        .begin_step(run, Some("node2"), "stop", "")
        .expect("step");

    let out = run_status(&["--output", "json"]).await.unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("node2: out of service in the load balancer (maint"),
        "{err}"
    );
    let doc = json(&out);
    assert_eq!(
        doc["nodes"][1]["load_balancer"]["in_service"], false,
        "{doc}"
    );
    assert_eq!(
        doc["nodes"][0]["load_balancer"]["in_service"], true,
        "{doc}"
    );
    let open = &doc["open_run"];
    assert_eq!(open["run"]["id"], run.0, "{doc}");
    assert_eq!(
        (
            open["step_in_progress"]["step"].as_str(),
            open["step_in_progress"]["node"].as_str()
        ),
        (Some("stop"), Some("node2")),
        "{doc}"
    );
    let out = run_status(&[]).await.unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("OUT (maint")
            && text.contains(&format!("open run #{}", run.0))
            && text.contains("in progress: stop on node2"),
        "{text}"
    );

    lb.enable("node2").await.expect("enable node2");
    journal
        .finish_run(run, bbupgrade::journal::RunResult::Halted, Some("test"))
        .expect("finish");
    let out = run_status(&[]).await.unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
}
