//! The fleet scale benchmark: a fleet of stand-in clusters (instant agents over real gRPC + mutual
//! TLS, Bitbucket's rolling-upgrade REST API) in this process, upgraded by the real coordinator —
//! `bbupgrade fleet`, run as a child process (this same program re-executed) so its own wall time,
//! peak memory and CPU are measured apart from the stand-ins'. Prints one JSON summary.
//!
//! `cargo run --release -p bbupgrade-tests --bin fleet-bench -- --clusters 1000 --nodes 4 --concurrency 100`

use anyhow::{Context, Result, bail};
use bbupgrade_tests::fleet_standin::{self, FAKE_SHA256, FleetSpec, StandinFleet};
use std::process::{ExitCode, Stdio};
use std::time::Instant;
use tokio::io::AsyncBufReadExt;

/// Set in the child: run the coordinator's CLI instead of the benchmark.
const COORDINATOR_ENV: &str = "FLEET_BENCH_COORDINATOR";

struct Args {
    clusters: usize,
    nodes: usize,
    concurrency: String,
    dir: Option<std::path::PathBuf>,
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        clusters: 1000,
        nodes: 4,
        concurrency: "100".into(),
        dir: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--clusters" => a.clusters = value()?.parse()?,
            "--nodes" => a.nodes = value()?.parse()?,
            "--concurrency" => a.concurrency = value()?,
            "--dir" => a.dir = Some(value()?.into()),
            "-h" | "--help" => {
                println!(
                    "fleet-bench [--clusters N] [--nodes N] [--concurrency N|P%] [--dir D (kept)]"
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument {other}; see --help"),
        }
    }
    Ok(a)
}

/// Room for thousands of listening agents and their connections.
fn raise_open_files_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain system calls on a valid, initialized struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// Peak RSS (KiB) and CPU time (ms) of the waited-for children.
fn children_usage() -> (u64, u64) {
    // SAFETY: getrusage fills the zeroed struct it is given.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) };
    let ms = |t: libc::timeval| t.tv_sec as u64 * 1000 + t.tv_usec as u64 / 1000;
    (ru.ru_maxrss as u64, ms(ru.ru_utime) + ms(ru.ru_stime))
}

fn main() -> ExitCode {
    if std::env::var_os(COORDINATOR_ENV).is_some() {
        return bbupgrade::cli::main();
    }
    raise_open_files_limit();
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|rt| rt.block_on(bench()));
    match result {
        Ok(ok) if ok => ExitCode::SUCCESS,
        Ok(_) => ExitCode::from(1),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

async fn bench() -> Result<bool> {
    let args = parse_args()?;
    let temp;
    let dir = match &args.dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.clone()
        }
        None => {
            temp = tempfile::Builder::new().prefix("fleet-bench-").tempdir()?;
            temp.path().to_path_buf()
        }
    };
    let setup = Instant::now();
    let spec = FleetSpec::new(args.clusters, args.nodes);
    let fleet = StandinFleet::start(&dir, &spec).await?;
    let setup_ms = setup.elapsed().as_millis() as u64;
    eprintln!(
        "{} stand-in clusters of {} nodes ready in {setup_ms} ms; running bbupgrade fleet",
        args.clusters, args.nodes
    );

    let inventory = fleet.inventory.display().to_string();
    let journal = fleet.journal.display().to_string();
    let url = format!("http://127.0.0.1:9/atlassian-bitbucket-{}.tar.gz", spec.to);
    let stderr = std::fs::File::create(dir.join("coordinator.stderr"))?;
    let started = Instant::now();
    let mut child = tokio::process::Command::new(std::env::current_exe()?)
        .env(COORDINATOR_ENV, "1")
        .args(["fleet", "--inventory", &inventory, "--state", &journal])
        .args([
            "--to",
            &spec.to,
            "--archive-url",
            &url,
            "--sha256",
            FAKE_SHA256,
        ])
        .args(["--concurrency", &args.concurrency, "--output", "json"])
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .context("starting the coordinator")?;
    let mut lines = tokio::io::BufReader::new(child.stdout.take().context("stdout")?).lines();
    let mut summary = None;
    while let Some(line) = lines.next_line().await? {
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
            && v["event"] == "summary"
        {
            summary = Some(v["summary"].clone());
        }
    }
    let status = child.wait().await?;
    let wall_ms = started.elapsed().as_millis() as u64;
    let (peak_kib, cpu_ms) = children_usage();
    let summary = summary.context("the coordinator printed no summary")?;

    let activity = fleet.activity();
    let nodes_total = (args.clusters * args.nodes) as u64;
    let durations: Vec<u64> = summary["clusters"]
        .as_array()
        .map(|cs| {
            cs.iter()
                .filter_map(|c| c["duration_ms"].as_u64())
                .collect()
        })
        .unwrap_or_default();
    let mean_cluster_ms = durations.iter().sum::<u64>() as f64 / durations.len().max(1) as f64;
    let upgraded = summary["clusters_upgraded"].as_u64().unwrap_or(0);
    let out = serde_json::json!({
        "clusters": args.clusters,
        "nodes_per_cluster": args.nodes,
        "concurrency": args.concurrency,
        "clusters_upgraded": upgraded,
        "clusters_failed": summary["clusters_failed"],
        "result": summary["result"],
        "coordinator_exit": status.code(),
        "wall_ms": wall_ms,
        "coordinator_peak_rss_mib": (peak_kib as f64 / 1024.0 * 10.0).round() / 10.0,
        "coordinator_cpu_ms": cpu_ms,
        "coordinator_cpu_percent_of_one_core": (cpu_ms as f64 * 1000.0 / wall_ms.max(1) as f64).round() / 10.0,
        "coordinator_cpu_ms_per_node": (cpu_ms as f64 / nodes_total.max(1) as f64 * 100.0).round() / 100.0,
        "mean_cluster_ms": mean_cluster_ms.round(),
        "orchestration_ms_per_node": (mean_cluster_ms / args.nodes.max(1) as f64 * 10.0).round() / 10.0,
        "max_clusters_in_flight": fleet_standin::max_in_flight(&activity),
        "standin_setup_ms": setup_ms,
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(status.success() && upgraded == args.clusters as u64)
}
