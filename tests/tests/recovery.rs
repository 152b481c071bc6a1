//! Getting out of a mistake, end to end through the `bbupgrade` CLI against a sandbox: a wrong
//! archive halts staging, then `abort` (and a new upgrade) or `resume` with the corrected archive;
//! `upgrade --no-finalize` then `finalize`, which has the agents clean up to `keep_installs`;
//! Ctrl-C during a run prints the exact `resume` command, which finishes the run.

use bbupgrade::journal::{Journal, RunResult};
use bbupgrade_demo::sandbox::{Sandbox, SandboxLb};
use bbupgrade_tests::cli_process::{Cli, Finished, args, is_step, run_cli};
use bbupgrade_tests::{bins, sandbox_options, start_sandbox, zdu_cluster};
use std::path::{Path, PathBuf};

const FROM: &str = "8.19.3";
const TO: &str = "8.19.6";

async fn sandbox(dir: &Path) -> Sandbox {
    let bins = bins!();
    start_sandbox(dir, sandbox_options(&bins, 2, SandboxLb::None))
        .await
        .expect("starting the sandbox")
}

/// `bbupgrade <command> --to 8.19.6 --archive <archive>` plus `extra`.
fn with_archive(s: &Sandbox, command: &str, archive: &Path, extra: &[&str]) -> Vec<String> {
    let archive = archive.display().to_string();
    let mut a = args(s, command, &["--to", TO, "--archive", &archive]);
    a.extend(extra.iter().map(|x| x.to_string()));
    a
}

/// An archive that looks like the release to the coordinator's check (every entry under
/// `atlassian-bitbucket-8.19.6/`, a start script) but holds a link out of its folder: every agent
/// refuses to stage it, before any node is touched.
fn wrong_archive(dir: &Path) -> PathBuf {
    let src = dir.join("wrong-release");
    let top = src.join(format!("atlassian-bitbucket-{TO}"));
    std::fs::create_dir_all(top.join("bin")).expect("creating the wrong release's folders");
    std::fs::write(top.join("bin/start-bitbucket.sh"), "#!/bin/sh\n").expect("a start script");
    std::os::unix::fs::symlink("/etc/passwd", top.join("escape")).expect("the escaping link");
    let path = dir.join(format!("atlassian-bitbucket-{TO}-WRONG.tar.gz"));
    let status = std::process::Command::new("tar")
        .arg("-czf")
        .arg(&path)
        .arg("-C")
        .arg(&src)
        .arg(format!("atlassian-bitbucket-{TO}"))
        .status()
        .expect("running tar");
    assert!(status.success(), "tar failed: {status}");
    path
}

/// The first upgrade, with the wrong archive: halted at staging, nothing else changed.
async fn halted_by_a_wrong_archive(s: &Sandbox, dir: &Path) -> i64 {
    let bins = bins!();
    let run = run_cli(&bins, &with_archive(s, "upgrade", &wrong_archive(dir), &[])).await;
    assert_eq!(run.code, Some(1), "{}", run.describe());
    let summary = run.summary();
    assert_eq!(summary["result"], "halted", "{summary:#}");
    assert!(
        run.report_text().contains("staging failed"),
        "{}",
        run.describe()
    );
    let view = zdu_cluster(s).await;
    assert_eq!(view["upgradeModeEnabled"], false, "{view:#}");
    summary["run_id"].as_i64().expect("the run's id")
}

fn journal(s: &Sandbox) -> Journal {
    Journal::open(&s.dir.join("journal.db")).expect("opening the journal")
}

/// Every node ACTIVE on `version` in Bitbucket's view, with upgrade mode off and the cluster
/// STABLE (finalized).
async fn assert_finalized_on(s: &Sandbox, version: &str) {
    let view = zdu_cluster(s).await;
    assert_eq!(view["state"], "STABLE", "{view:#}");
    assert_eq!(view["upgradeModeEnabled"], false, "{view:#}");
    for node in s.sim.nodes() {
        let row = bbupgrade_tests::zdu_row(&view, node).expect("a row per node");
        assert_eq!(row["state"], "ACTIVE", "{view:#}");
        assert_eq!(row["version"], version, "{view:#}");
    }
}

fn upgraded(run: &Finished) -> serde_json::Value {
    assert_eq!(run.code, Some(0), "{}", run.describe());
    let summary = run.summary();
    assert_eq!(summary["result"], "upgraded", "{summary:#}");
    summary
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_archive_then_abort_then_a_new_upgrade() {
    let (bins, tmp) = (bins!(), bbupgrade_tests::temp_dir());
    let s = sandbox(tmp.path()).await;
    let first = halted_by_a_wrong_archive(&s, tmp.path()).await;

    let refused = run_cli(&bins, &with_archive(&s, "upgrade", &s.to_archive.path, &[])).await;
    assert_ne!(refused.code, Some(0), "{}", refused.describe());
    assert!(
        refused.stderr.contains("bbupgrade abort"),
        "{}",
        refused.describe()
    );

    let aborted = run_cli(&bins, &args(&s, "abort", &[])).await;
    assert_eq!(aborted.code, Some(0), "{}", aborted.describe());
    assert!(
        aborted.report_text().contains("abandoned"),
        "{}",
        aborted.describe()
    );
    let run = journal(&s)
        .latest_run(&s.cluster_name)
        .expect("journal")
        .expect("the aborted run");
    assert_eq!(run.id.0, first);
    assert_eq!(run.result, Some(RunResult::Halted));
    assert!(
        run.error.as_deref().unwrap_or("").contains("aborted by"),
        "{run:?}"
    );
    let nothing = run_cli(&bins, &args(&s, "resume", &[])).await;
    assert_eq!(
        nothing.code,
        Some(2),
        "an aborted run is not resumed: {}",
        nothing.describe()
    );

    let again = run_cli(&bins, &with_archive(&s, "upgrade", &s.to_archive.path, &[])).await;
    let summary = upgraded(&again);
    assert_ne!(summary["run_id"], first, "a new run");
    assert_finalized_on(&s, TO).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_archive_then_resume_with_the_corrected_one() {
    let (bins, tmp) = (bins!(), bbupgrade_tests::temp_dir());
    let s = sandbox(tmp.path()).await;
    let first = halted_by_a_wrong_archive(&s, tmp.path()).await;

    // Flags that would change the plan are refused with the reason.
    let other_target = run_cli(&bins, &args(&s, "resume", &["--to", "8.19.5"])).await;
    assert_eq!(other_target.code, Some(2), "{}", other_target.describe());
    assert!(
        other_target.stderr.contains("--to"),
        "{}",
        other_target.describe()
    );

    let archive = s.to_archive.path.display().to_string();
    let resumed = run_cli(&bins, &args(&s, "resume", &["--archive", &archive])).await;
    let summary = upgraded(&resumed);
    assert_eq!(summary["run_id"], first, "resume continues the same run");
    assert_finalized_on(&s, TO).await;
}

/// An install as the agent recognises one (a start script and the version in build.properties).
fn fake_install(install_root: &Path, version: &str) -> PathBuf {
    let dir = install_root.join(format!("atlassian-bitbucket-{version}"));
    std::fs::create_dir_all(dir.join("bin")).expect("fake install");
    std::fs::create_dir_all(dir.join("app/WEB-INF/classes")).expect("fake install");
    std::fs::write(dir.join("bin/start-bitbucket.sh"), "#!/bin/sh\n").expect("fake install");
    std::fs::write(
        dir.join("app/WEB-INF/classes/build.properties"),
        format!("version={version}\n"),
    )
    .expect("fake install");
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_finalize_then_finalize_cleans_up_to_keep_installs() {
    let (bins, tmp) = (bins!(), bbupgrade_tests::temp_dir());
    let s = sandbox(tmp.path()).await;
    // Two older installs left by earlier upgrades: with the agent's keep_installs = 3, the oldest
    // goes; the active (8.19.6) and previous (8.19.3) installs always stay.
    let old: Vec<(PathBuf, PathBuf)> = s
        .sim
        .nodes()
        .iter()
        .map(|n| {
            (
                fake_install(&n.install_root, "8.19.1"),
                fake_install(&n.install_root, "8.19.2"),
            )
        })
        .collect();

    let run = run_cli(
        &bins,
        &with_archive(&s, "upgrade", &s.to_archive.path, &["--no-finalize"]),
    )
    .await;
    let summary = upgraded(&run);
    assert!(
        run.report_text().contains("bbupgrade finalize"),
        "{summary:#}"
    );
    let view = zdu_cluster(&s).await;
    assert_eq!(view["upgradeModeEnabled"], true, "not approved: {view:#}");
    assert!(
        old.iter().all(|(a, b)| a.is_dir() && b.is_dir()),
        "no cleanup before finalize"
    );

    let finalized = run_cli(&bins, &args(&s, "finalize", &[])).await;
    let summary = upgraded(&finalized);
    assert_eq!(summary["run_id"], run.summary()["run_id"], "{summary:#}");
    assert_finalized_on(&s, TO).await;
    for (node, (oldest, older)) in s.sim.nodes().iter().zip(&old) {
        assert!(
            !oldest.exists(),
            "{}: {} was kept",
            node.name,
            oldest.display()
        );
        assert!(
            older.is_dir(),
            "{}: {} was removed",
            node.name,
            older.display()
        );
        // The active (new) and previous (original) installs stay, wherever the agent put them.
        let installs: Vec<String> = std::fs::read_dir(&node.install_root)
            .expect("the install root")
            .flatten()
            .filter(|e| e.path().join("bin/start-bitbucket.sh").is_file())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            installs.len(),
            3,
            "{}: keep_installs = 3: {installs:?}",
            node.name
        );
        for v in [FROM, TO] {
            assert!(
                installs.iter().any(|i| i.contains(v)),
                "{}: the {v} install was removed: {installs:?}",
                node.name
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_prints_the_resume_command_that_finishes_the_run() {
    let (bins, tmp) = (bins!(), bbupgrade_tests::temp_dir());
    let s = sandbox(tmp.path()).await;
    let mut cli = Cli::spawn(&bins, &with_archive(&s, "upgrade", &s.to_archive.path, &[]));
    cli.wait_event("upgrade mode on", |v| {
        is_step(v, None, "upgrade_mode", "ok")
    })
    .await;
    cli.interrupt();
    let stopped = cli.finish().await;
    assert_eq!(stopped.code, Some(130), "{}", stopped.describe());
    let line = stopped
        .stderr
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("bbupgrade resume "))
        .unwrap_or_else(|| panic!("no resume command printed:\n{}", stopped.describe()))
        .to_string();
    let inventory = s.inventory.display().to_string();
    assert!(line.contains(&inventory), "{line}");
    assert!(line.contains(&s.cluster_name), "{line}");

    let mut resume: Vec<String> = line.split_whitespace().skip(1).map(String::from).collect();
    resume.extend(["--output".to_string(), "json".to_string()]);
    let resumed = run_cli(&bins, &resume).await;
    upgraded(&resumed);
    assert_finalized_on(&s, TO).await;
}
