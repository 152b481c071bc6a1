//! `bbupgrade demo`: builds a sandbox cluster (simulated nodes, real agents over mutual TLS, HAProxy
//! in front when installed, or NGINX / Apache httpd with `--lb nginx|apache`), upgrades it end to end while sending traffic through the load balancer,
//! and reports versions, the order chosen and why, time out of service, and requests served/failed.

use crate::cli::{BadInput, Output, UpgradeArgs};
use crate::report::Summary;
use crate::sandbox::{BitbucketForm, Sandbox, SandboxLb, SandboxOptions, sibling_binary};
use anyhow::{Context, Result};
use bbupgrade_sim::load::{LoadOptions, LoadReport};
use clap::Args;
use serde::Serialize;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Args, Clone)]
pub struct DemoArgs {
    #[arg(long, default_value_t = 3)]
    pub nodes: usize,
    #[arg(long, default_value = "8.19.3")]
    pub from: String,
    #[arg(long, default_value = "8.19.6")]
    pub to: String,
    /// Load balancer in front of the nodes (default: haproxy; without it installed, the simulator's
    /// stand-in for it).
    #[arg(long, value_enum)]
    pub lb: Option<SandboxLb>,
    /// Keep the sandbox's files here (inventory.toml, pki/, homes, installs) after the demo exits.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = Output::Human)]
    pub output: Output,
    /// Size of each simulated release's payload.
    #[arg(long, default_value_t = 16)]
    pub payload_mib: u64,
    /// Concurrent simulated users sending traffic during the upgrade.
    #[arg(long, default_value_t = 8)]
    pub users: usize,
    /// The user Bitbucket runs as when the demo runs as root.
    #[arg(long, default_value = "nobody")]
    pub user: String,
}

#[derive(Serialize)]
struct DemoSummary {
    #[serde(flatten)]
    summary: Summary,
    requests: RequestCounts,
    load: LoadReport,
    sandbox_dir: Option<String>,
    load_balancer: String,
}

#[derive(Serialize)]
struct RequestCounts {
    total: u64,
    failed: u64,
    /// Git-over-SSH clones through the SSH front door, and how many were refused or cut.
    ssh_total: u64,
    ssh_failed: u64,
}

fn say(output: Output, text: &str) {
    if output == Output::Human {
        eprintln!("{text}");
    }
}

pub async fn run(args: DemoArgs) -> Result<ExitCode> {
    if args.nodes == 0 || args.nodes > 16 {
        return Err(BadInput("--nodes must be between 1 and 16".into()).into());
    }
    let (from, to) =
        crate::plan::check_target(&args.from, &args.to).map_err(|e| BadInput(e.to_string()))?;
    // HAProxy by default: the real one when installed, else the simulator's stand-in (said loudly).
    let lb = args.lb.unwrap_or(SandboxLb::Haproxy);
    if lb == SandboxLb::None {
        say(
            args.output,
            "WARNING: no load balancer: nodes are NOT drained, traffic goes to one node directly and fails while it is stopped (install haproxy for the real thing)",
        );
    }
    let temp;
    let dir = match &args.dir {
        Some(d) => d.clone(),
        None => {
            temp = tempfile::Builder::new()
                .prefix("bbupgrade-demo-")
                .tempdir()?;
            temp.path().to_path_buf()
        }
    };
    say(
        args.output,
        &format!(
            "building a sandbox of {} nodes on {from} in {}",
            args.nodes,
            dir.display()
        ),
    );
    let opts = SandboxOptions {
        nodes: args.nodes,
        from: from.to_string(),
        to: to.to_string(),
        payload_mib: args.payload_mib,
        startup_ms: 1500,
        lb,
        user_when_root: args.user.clone(),
        agent_bin: sibling_binary("BBUPGRADE_AGENT_BIN", "bbupgrade-agent")?,
        sim_bin: sibling_binary("BITBUCKET_SIM_BIN", "bitbucket-sim")?,
        lb_standin: true,
        // The product as installed (no node names), reached the documented preferred way.
        bitbucket: BitbucketForm {
            basic_auth: true,
            ..BitbucketForm::default()
        },
    };
    let sandbox = tokio::task::spawn_blocking(move || -> Result<Sandbox> {
        let s = Sandbox::create(&dir, opts)?;
        s.wait_agents()?;
        Ok(s)
    })
    .await??;
    sandbox
        .start_nodes()
        .await
        .context("starting the simulated nodes through their agents")?;
    // On standard error in every output mode (JSON included), so others can send their own load.
    // Git over SSH only through a load balancer that fronts it (HAProxy): straight to one node it
    // would fail while that node is upgraded.
    let ssh = sandbox.lb_ssh_addr.clone();
    eprintln!(
        "cluster running; traffic through {}; ssh through {}",
        sandbox.traffic_url(),
        ssh.as_deref()
            .unwrap_or("none (this load balancer does not front Git over SSH)")
    );

    // Give each node its own load so the least-busy order has something to go by.
    for (i, _) in sandbox.sim.nodes().iter().enumerate().skip(1) {
        let _ = sandbox.sim.set_shared_property(
            &format!("sim.background.tasks.node{}", i + 1),
            &format!("{}", i * 3),
        );
    }

    let load = bbupgrade_sim::load::start(LoadOptions {
        base_url: sandbox.traffic_url(),
        users: args.users,
        clone_every: 10,
        ssh_addr: ssh,
        ssh_clone_every: 10,
        think_ms: 20,
        duration: None,
        request_timeout: Duration::from_secs(60),
    });
    tokio::time::sleep(Duration::from_secs(2)).await;

    let upgrade_args = UpgradeArgs {
        target: crate::cli::ClusterArgs {
            inventory: sandbox.inventory.clone(),
            cluster: sandbox.cluster_name.clone(),
            output: args.output,
        },
        to: Some(to.to_string()),
        archive: Some(sandbox.to_archive.path.clone()),
        archive_url: None,
        sha256: Some(sandbox.to_archive.sha256.clone()),
        catalog: None,
        state: None,
        auto_rollback: false,
        soak_secs: None,
    };
    let summary = crate::run::upgrade_summary(upgrade_args, args.output == Output::Human).await;
    let report = load.stop().await;
    let (summary, code) = match summary {
        Ok(s) => {
            let code = if s.result == crate::journal::RunResult::Upgraded
                && report.failed == 0
                && report.ssh_failed == 0
            {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            };
            (s, code)
        }
        Err(e) => return Err(e),
    };
    let doc = DemoSummary {
        requests: RequestCounts {
            total: report.total,
            failed: report.failed,
            ssh_total: report.ssh_total,
            ssh_failed: report.ssh_failed,
        },
        load: report.clone(),
        sandbox_dir: args.dir.as_ref().map(|d| d.display().to_string()),
        load_balancer: match lb {
            SandboxLb::Haproxy if crate::sandbox::which("haproxy").is_none() => {
                "haproxy stand-in (bitbucket-sim balancer)".to_string()
            }
            other => clap::ValueEnum::to_possible_value(&other)
                .map_or_else(|| format!("{other:?}"), |v| v.get_name().to_string()),
        },
        summary,
    };
    match args.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&doc)?),
        Output::Human => {
            print!("{}", crate::report::render_summary(&doc.summary));
            println!(
                "traffic during the upgrade: {} requests, {} failed; {} SSH clones, {} failed ({})",
                report.total,
                report.failed,
                report.ssh_total,
                report.ssh_failed,
                report.summary_line()
            );
            if let Some(d) = &args.dir {
                println!(
                    "sandbox kept in {} (inventory.toml, pki/, cluster/, agents/)",
                    d.display()
                );
            }
        }
    }
    drop(sandbox);
    Ok(code)
}
