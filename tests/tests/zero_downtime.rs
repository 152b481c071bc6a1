//! The product's promise, measured: a rolling upgrade of three nodes behind a real HAProxy under
//! steady load (many users with sessions, short requests and long Git clones over HTTP, and Git
//! clones over SSH through HAProxy's second front door) fails no request and no SSH session.

use bbupgrade_demo::sandbox::SandboxLb;
use bbupgrade_sim::load::{LoadOptions, start};
use bbupgrade_tests::{
    bins, cluster_args, describe, require_program, sandbox_options, start_sandbox, summary_of,
    temp_dir,
};
use std::time::{Duration, Instant};

/// Requests the test must see during the upgrade for the zero to mean something.
const MIN_REQUESTS: u64 = 2000;
/// SSH clones likewise (each takes about a second, so far fewer).
const MIN_SSH_CLONES: u64 = 50;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_upgrade_under_load_fails_no_request() {
    if !require_program("haproxy") {
        return;
    }
    let bins = bins!();
    let dir = temp_dir();
    let sandbox = start_sandbox(dir.path(), sandbox_options(&bins, 3, SandboxLb::Haproxy))
        .await
        .expect("sandbox");
    // Clones of about a second each keep drains honest without stretching the test.
    sandbox
        .sim
        .set_shared_property("sim.scm.clone.ms", "800")
        .expect("clone time");
    sandbox
        .sim
        .set_shared_property("sim.ssh.clone.ms", "800")
        .expect("ssh clone time");
    let ssh = sandbox.lb_ssh_addr.clone().expect("HAProxy fronts SSH");

    let load = start(LoadOptions {
        base_url: sandbox.traffic_url(),
        users: 24,
        clone_every: 20,
        ssh_addr: Some(ssh),
        ssh_clone_every: 20,
        think_ms: 2,
        duration: None,
        request_timeout: Duration::from_secs(30),
    });
    bbupgrade_tests::wait_for_traffic(&load, 24).await;

    let started = Instant::now();
    let mut args = vec!["upgrade".to_string()];
    args.extend(cluster_args(&sandbox));
    let archive = sandbox.to_archive.path.display().to_string();
    args.extend(["--to", "8.19.6", "--archive", &archive, "--output", "json"].map(String::from));
    let bbupgrade = bins.bbupgrade.clone();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(bbupgrade).args(&args).output()
    })
    .await
    .expect("join")
    .expect("run bbupgrade");
    let upgrade_ms = started.elapsed().as_millis();
    // Traffic after the last node rejoined is served too.
    bbupgrade_tests::wait_for_traffic(&load, 24).await;
    let report = load.stop().await;

    assert!(out.status.success(), "{}", describe(&out));
    let summary = summary_of(&out.stdout).expect("a summary");
    assert_eq!(summary["result"], "upgraded", "{summary}");
    let out_of_service: Vec<String> = summary["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .map(|n| {
            format!(
                "{}={}ms",
                n["id"].as_str().unwrap_or("?"),
                n["out_of_service_ms"]
            )
        })
        .collect();
    eprintln!(
        "zero-downtime run: {} requests ({} clones) and {} SSH clones during a {} ms upgrade, {} failed, {} SSH failed; out of service: {}; {}",
        report.total,
        report.clones,
        report.ssh_total,
        upgrade_ms,
        report.failed,
        report.ssh_failed,
        out_of_service.join(" "),
        report.summary_line()
    );
    assert_eq!(report.failed, 0, "failed requests: {:#?}", report.failures);
    assert_eq!(report.connection_errors + report.interrupted_transfers, 0);
    assert_eq!(
        report.ssh_failed, 0,
        "failed SSH clones: {:#?}",
        report.failures
    );
    assert!(
        report.ssh_total >= MIN_SSH_CLONES,
        "only {} SSH clones during the upgrade",
        report.ssh_total
    );
    assert_eq!(
        report.ssh_by_node.len(),
        3,
        "SSH reached every node: {:?}",
        report.ssh_by_node
    );
    assert!(
        report.total >= MIN_REQUESTS,
        "only {} requests during the upgrade",
        report.total
    );
    assert!(report.by_version.contains_key("8.19.6") && report.by_version.contains_key("8.19.3"));

    // Every node went out of and back into both doors: the step details name both backends.
    let steps: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["event"] == "step" && v["status"] == "ok")
        .collect();
    for node in sandbox.sim.nodes() {
        let detail = |step: &str| {
            steps
                .iter()
                .find(|v| v["node"] == node.name.as_str() && v["step"] == step)
                .and_then(|v| v["detail"].as_str())
                .map(str::to_string)
                .unwrap_or_else(|| panic!("{}: no {step} step in {steps:#?}", node.name))
        };
        let out_of = detail("drain");
        assert!(
            out_of.contains("drained in")
                && out_of.contains("backend bitbucket and ")
                && out_of.ends_with("backend bitbucket_ssh"),
            "{}: {out_of}",
            node.name
        );
        let back = detail("enable");
        assert!(
            back.contains("backend bitbucket and ") && back.ends_with("backend bitbucket_ssh"),
            "{}: {back}",
            node.name
        );
    }
}
