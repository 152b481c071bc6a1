//! `bbupgrade report` rendered in a real browser: a real upgrade of a small sandbox (simulated
//! nodes, real agents over mutual TLS; the release taken from a `--catalog`), its journal drawn as an HTML page, the page loaded in
//! Debian's headless chromium, every node's bars counted in the rendered DOM, and screenshots
//! (desktop and phone width) kept under `target/tmp/report-browser/` for a person to look at.

use bbupgrade_demo::sandbox::SandboxLb;
use bbupgrade_tests::cli_process::{args, run_cli};
use bbupgrade_tests::{bins, sandbox_options, start_sandbox};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::Duration;

const CHROMIUM: &str = "/usr/bin/chromium";
/// Longest one chromium run may take.
const CHROMIUM_TIMEOUT_SECS: u64 = 120;

/// Runs headless chromium on `page` with `extra` options; its standard output.
async fn chromium(page: &Path, profile: &Path, extra: &[String]) -> String {
    let mut cmd = tokio::process::Command::new(CHROMIUM);
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
    ])
    .arg(format!("--user-data-dir={}", profile.display()))
    .args(extra)
    .arg(format!("file://{}", page.display()))
    .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(CHROMIUM_TIMEOUT_SECS), cmd.output())
        .await
        .expect("chromium did not finish in time")
        .expect("running chromium");
    assert!(
        out.status.success(),
        "chromium failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn shots_dir() -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join("report-browser");
    std::fs::create_dir_all(&d).expect("screenshot folder");
    d
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_report_of_a_real_upgrade_draws_every_nodes_timeline_in_chromium() {
    if !Path::new(CHROMIUM).exists() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{CHROMIUM} is missing: install Debian's chromium (.ci/run does)"
        );
        eprintln!("skipped: {CHROMIUM} is missing (apt-get install chromium)");
        return;
    }
    let bins = bins!();
    let tmp = bbupgrade_tests::temp_dir();
    let s = start_sandbox(tmp.path(), sandbox_options(&bins, 3, SandboxLb::None))
        .await
        .expect("starting the sandbox");
    // The release comes from a catalog: its local copy, hashed against the catalog's sha256.
    let catalog = tmp.path().join("releases.toml");
    std::fs::write(
        &catalog,
        format!(
            "[[release]]\nversion = \"8.19.6\"\narchive_url = \"http://127.0.0.1:9/unused.tar.gz\"\nsha256 = \"{}\"\narchive = {:?}\n",
            s.to_archive.sha256,
            s.to_archive.path.display().to_string()
        ),
    )
    .expect("writing the catalog");
    let catalog = catalog.display().to_string();
    let missing = run_cli(
        &bins,
        &args(&s, "upgrade", &["--to", "8.19.5", "--catalog", &catalog]),
    )
    .await;
    assert_eq!(missing.code, Some(2), "{}", missing.describe());
    assert!(
        missing.stderr.contains("not in the catalog"),
        "{}",
        missing.describe()
    );
    let out = run_cli(
        &bins,
        &args(&s, "upgrade", &["--to", "8.19.6", "--catalog", &catalog]),
    )
    .await;
    assert_eq!(out.code, Some(0), "{}", out.describe());

    let report = |format: &str| {
        let inv = s.inventory.display().to_string();
        [
            "report",
            "--inventory",
            &inv,
            "--cluster",
            &s.cluster_name,
            "--run",
            "1",
            "--format",
            format,
        ]
        .map(String::from)
        .to_vec()
    };
    let json = run_cli(&bins, &report("json")).await;
    assert_eq!(json.code, Some(0), "{}", json.describe());
    let page: Value = serde_json::from_str(&json.stdout).expect("report JSON");
    assert_eq!(page["result"], "upgraded", "{page:#}");
    let nodes = page["nodes"].as_array().expect("nodes");
    assert_eq!(nodes.len(), 3, "{page:#}");
    assert_eq!(page["order"].as_array().map(Vec::len), Some(3), "{page:#}");

    let html = run_cli(&bins, &report("html")).await;
    assert_eq!(html.code, Some(0), "{}", html.describe());
    for external in ["<script", "src=\"http", "href=\"http", "@import", "url("] {
        assert!(
            !html.stdout.contains(external),
            "the page must be self-contained: {external}"
        );
    }
    let dir = shots_dir();
    let file = dir.join("report.html");
    std::fs::write(&file, &html.stdout).expect("writing the page");

    let profile = tempfile::tempdir().expect("chromium profile");
    let dom = chromium(&file, profile.path(), &["--dump-dom".into()]).await;
    for n in nodes {
        let id = n["node"].as_str().unwrap();
        let drawn = dom.matches(&format!("data-node=\"{id}\"")).count();
        let steps = n["bars"].as_array().map(Vec::len).unwrap_or(0);
        assert!(steps >= 6, "{id} has only {steps} steps: {n:#}");
        assert_eq!(drawn, steps, "{id}: {drawn} bars drawn for {steps} steps");
        let oos = n["out_of_service_ms"].as_i64().unwrap_or(0);
        assert!(oos > 0 && n["returned"] == true, "{n:#}");
    }
    for (name, size) in [
        ("report-desktop.png", "1280,1400"),
        ("report-phone.png", "390,1600"),
    ] {
        let shot = dir.join(name);
        let _ = std::fs::remove_file(&shot);
        chromium(
            &file,
            profile.path(),
            &[
                format!("--screenshot={}", shot.display()),
                format!("--window-size={size}"),
                "--hide-scrollbars".into(),
            ],
        )
        .await;
        let len = std::fs::metadata(&shot).map(|m| m.len()).unwrap_or(0);
        assert!(len > 10_000, "{} is {len} bytes", shot.display());
        eprintln!("screenshot: {}", shot.display());
    }
}
