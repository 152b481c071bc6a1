//! `bbupgrade demo` (the `bbupgrade-demo` program): builds a sandbox cluster (simulated nodes under
//! init.d, real agents over mutual TLS, HAProxy in front when installed, or NGINX / Apache httpd
//! with `--lb nginx|apache`), upgrades it end to end while sending traffic through the load
//! balancer, and reports versions, the order chosen and why, time out of service, requests
//! served/failed and the service definitions activation edited. `--keep` builds it and keeps it
//! running for `bbupgrade` to be tried on by hand.

use crate::sandbox::{
    BitbucketForm, Sandbox, SandboxLb, SandboxOptions, SandboxService, ServiceChange,
    render_changes, sibling_binary,
};
use anyhow::{Context, Result};
use bbupgrade::archive::ReleaseSpec;
use bbupgrade::commands::{ClusterTarget, RunRequest};
use bbupgrade::error::BadInput;
use bbupgrade::report::Output;
use bbupgrade::report::Summary;
use bbupgrade_sim::load::{LoadOptions, LoadReport};
use clap::{Args, Parser};
use serde::Serialize;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

/// The `bbupgrade-demo` program's command line (also `bbupgrade demo`).
#[derive(Parser)]
#[command(
    name = "bbupgrade demo",
    version,
    about = "A local sandbox cluster of simulated Bitbucket nodes with real agents, upgraded end to end"
)]
pub struct DemoCli {
    #[command(flatten)]
    pub args: DemoArgs,
}

#[derive(Args, Clone)]
pub struct DemoArgs {
    /// How many nodes (2 to 16; 1 only with --allow-downtime).
    #[arg(long, default_value_t = 3)]
    pub nodes: usize,
    /// The version the nodes start on.
    #[arg(long, default_value = "8.19.3")]
    pub from: String,
    /// The bug-fix release to upgrade to.
    #[arg(long, default_value = "8.19.6")]
    pub to: String,
    /// Load balancer in front of the nodes (default: haproxy; without it installed, the simulator's
    /// stand-in for it). `none` only with --allow-downtime.
    #[arg(long, value_enum)]
    pub lb: Option<SandboxLb>,
    /// Keep the sandbox's files here (inventory.toml, pki/, homes, installs, init.d scripts) after
    /// the demo exits.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// `json`: the upgrade's step events as JSON lines, then `{"event":"summary",...}`.
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
    /// Build the sandbox, do not upgrade it: print the `bbupgrade` commands to try on it (status,
    /// plan, upgrade, rollback) and keep it running until Ctrl-C or SIGTERM.
    #[arg(long)]
    pub keep: bool,
    /// Allow --nodes 1 or --lb none, where requests fail while a node is upgraded.
    #[arg(long)]
    pub allow_downtime: bool,
}

/// The demo's final document: the upgrade's summary and what the traffic and the service
/// definitions saw.
#[derive(Serialize)]
struct DemoSummary {
    #[serde(flatten)]
    summary: Summary,
    requests: RequestCounts,
    load: LoadReport,
    sandbox_dir: Option<String>,
    load_balancer: String,
    /// Each node's init.d script: the lines activation replaced and their new text.
    service_definitions: Vec<ServiceChange>,
}

#[derive(Serialize)]
struct RequestCounts {
    total: u64,
    failed: u64,
    /// Git-over-SSH clones through the SSH front door, and how many were refused or cut.
    ssh_total: u64,
    ssh_failed: u64,
}

/// The checked command line.
struct Demo {
    args: DemoArgs,
    from: String,
    to: String,
    lb: SandboxLb,
}

fn say(output: Output, text: &str) {
    if output == Output::Human {
        eprintln!("{text}");
    }
}

pub async fn run(args: DemoArgs) -> Result<ExitCode> {
    let demo = Demo::check(args)?;
    let signals = StopSignals::install()?;
    let place = SandboxPlace::choose(demo.args.dir.as_deref())?;
    let mut work = Box::pin(demo.run(&place));
    let outcome = tokio::select! {
        r = &mut work => Some(r),
        signal = signals.recv() => {
            eprintln!("{signal}: stopping every process the demo started");
            None
        }
    };
    // Dropping the work stops the sandbox's processes.
    drop(work);
    match outcome {
        Some(r) => r,
        None if demo.args.keep => Ok(ExitCode::SUCCESS),
        None => {
            eprintln!("the demo was interrupted before the upgrade finished");
            Ok(ExitCode::from(1))
        }
    }
}

impl Demo {
    /// Refuses what the demo cannot show (exit 2): node counts out of range, a target that is not
    /// a bug-fix upgrade, and a setup without zero downtime unless it is asked for.
    fn check(args: DemoArgs) -> Result<Demo> {
        if args.nodes == 0 || args.nodes > 16 {
            return Err(BadInput("--nodes must be between 1 and 16".into()).into());
        }
        let lb = args.lb.unwrap_or(SandboxLb::Haproxy);
        if (args.nodes < 2 || lb == SandboxLb::None) && !args.allow_downtime {
            return Err(BadInput(format!(
                "zero downtime needs at least two nodes behind a load balancer (got --nodes {}{}): with fewer, requests fail while a node is upgraded. Use --nodes 2 or more with --lb haproxy|nginx|nginx-agent|apache, or add --allow-downtime to watch the downtime",
                args.nodes,
                if lb == SandboxLb::None { " --lb none" } else { "" }
            ))
            .into());
        }
        let (from, to) = bbupgrade::plan::check_target(&args.from, &args.to)
            .map_err(|e| BadInput(e.to_string()))?;
        Ok(Demo {
            from: from.to_string(),
            to: to.to_string(),
            lb,
            args,
        })
    }

    async fn run(&self, place: &SandboxPlace) -> Result<ExitCode> {
        if let Some(note) = &place.note {
            eprintln!("NOTE: {note}");
        }
        if self.lb == SandboxLb::None {
            say(
                self.args.output,
                "WARNING: no load balancer: nodes are NOT drained, traffic goes to one node directly and fails while it is stopped",
            );
        }
        let sandbox = self.build_sandbox(&place.path).await?;
        if self.args.keep {
            let program = crate::keep::bbupgrade_program();
            let suggestions = crate::keep::suggestions(&sandbox, &program, &self.to);
            crate::keep::print(&sandbox, &suggestions, self.args.output);
            // Until a stop signal ends the demo (and drops the sandbox).
            std::future::pending::<()>().await;
        }
        self.upgrade_under_load(&sandbox).await
    }

    fn sandbox_options(&self) -> Result<SandboxOptions> {
        Ok(SandboxOptions {
            nodes: self.args.nodes,
            from: self.from.clone(),
            to: self.to.clone(),
            payload_mib: self.args.payload_mib,
            startup_ms: 1500,
            lb: self.lb,
            user_when_root: self.args.user.clone(),
            agent_bin: sibling_binary("BBUPGRADE_AGENT_BIN", "bbupgrade-agent")?,
            sim_bin: sibling_binary("BITBUCKET_SIM_BIN", "bitbucket-sim")?,
            lb_standin: true,
            // The product as installed (no node names), reached the documented preferred way.
            bitbucket: BitbucketForm {
                basic_auth: true,
                ..BitbucketForm::default()
            },
            service: SandboxService::Initd,
        })
    }

    /// Builds the sandbox, starts its nodes through their agents (init.d) and gives each node
    /// its own background load, so the least-busy order has something to go by.
    async fn build_sandbox(&self, dir: &Path) -> Result<Sandbox> {
        say(
            self.args.output,
            &format!(
                "building a sandbox of {} nodes on {} in {}",
                self.args.nodes,
                self.from,
                dir.display()
            ),
        );
        let sandbox = Sandbox::start(dir, self.sandbox_options()?).await?;
        for (i, _) in sandbox.sim.nodes().iter().enumerate().skip(1) {
            let _ = sandbox.sim.set_shared_property(
                &format!("sim.background.tasks.node{}", i + 1),
                &format!("{}", i * 3),
            );
        }
        // On standard error in every output mode (JSON included), so others can send their own load.
        eprintln!(
            "cluster running; traffic through {}; ssh through {}",
            sandbox.traffic_url(),
            sandbox
                .lb_ssh_addr
                .as_deref()
                .unwrap_or("none (this load balancer does not front Git over SSH)")
        );
        Ok(sandbox)
    }

    /// Upgrades the sandbox with the bbupgrade library while simulated users send traffic
    /// through the load balancer; prints the summary. Exit 0 when it upgraded and (unless
    /// downtime was allowed) no request failed.
    async fn upgrade_under_load(&self, sandbox: &Sandbox) -> Result<ExitCode> {
        // Git over SSH only through a load balancer that fronts it: straight to one node it
        // would fail while that node is upgraded.
        let load = bbupgrade_sim::load::start(LoadOptions {
            base_url: sandbox.traffic_url(),
            users: self.args.users,
            clone_every: 10,
            ssh_addr: sandbox.lb_ssh_addr.clone(),
            ssh_clone_every: 10,
            think_ms: 20,
            duration: None,
            request_timeout: Duration::from_secs(60),
        });
        tokio::time::sleep(Duration::from_secs(2)).await;
        let summary =
            bbupgrade::commands::upgrade_summary(self.upgrade_request(sandbox), true).await;
        let report = load.stop().await;
        let summary = summary?;
        let served = report.failed == 0 && report.ssh_failed == 0;
        let code = if summary.result == bbupgrade::journal::RunResult::Upgraded
            && (served || self.args.allow_downtime)
        {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(1)
        };
        let doc = DemoSummary {
            requests: RequestCounts {
                total: report.total,
                failed: report.failed,
                ssh_total: report.ssh_total,
                ssh_failed: report.ssh_failed,
            },
            load: report,
            // Where the files are: `--dir`, or the searchable folder linked from it.
            sandbox_dir: self
                .args
                .dir
                .as_ref()
                .map(|_| sandbox.dir.display().to_string()),
            load_balancer: load_balancer_name(self.lb),
            service_definitions: sandbox.service_changes()?,
            summary,
        };
        self.print_summary(&doc)?;
        Ok(code)
    }

    fn upgrade_request(&self, sandbox: &Sandbox) -> RunRequest {
        RunRequest {
            target: ClusterTarget {
                inventory: sandbox.inventory.clone(),
                cluster: Some(sandbox.cluster_name.clone()),
                output: self.args.output,
            },
            to: Some(self.to.clone()),
            release: ReleaseSpec {
                archive: Some(sandbox.to_archive.path.clone()),
                archive_url: None,
                sha256: Some(sandbox.to_archive.sha256.clone()),
                catalog: None,
            },
            state: None,
            auto_rollback: false,
            soak_secs: None,
            no_finalize: false,
        }
    }

    fn print_summary(&self, doc: &DemoSummary) -> Result<()> {
        if self.args.output == Output::Json {
            let line = serde_json::json!({ "event": "summary", "summary": doc });
            println!("{}", serde_json::to_string(&line)?);
            return Ok(());
        }
        print!("{}", bbupgrade::report::render_summary(&doc.summary));
        let r = &doc.load;
        println!(
            "traffic during the upgrade: {} requests, {} failed; {} SSH clones, {} failed ({})",
            r.total,
            r.failed,
            r.ssh_total,
            r.ssh_failed,
            r.summary_line()
        );
        if !doc.service_definitions.is_empty() {
            println!(
                "service definitions (init.d) activation edited; the previous ones are in each agent's state dir:\n{}",
                render_changes(&doc.service_definitions)
            );
        }
        if let Some(d) = &doc.sandbox_dir {
            println!(
                "sandbox kept in {d} (inventory.toml, pki/, archives/, cluster/, etc/<node>/init.d/, agents/)"
            );
        }
        Ok(())
    }
}

fn load_balancer_name(lb: SandboxLb) -> String {
    match lb {
        SandboxLb::Haproxy if crate::sandbox::which("haproxy").is_none() => {
            "haproxy stand-in (bitbucket-sim balancer)".to_string()
        }
        other => clap::ValueEnum::to_possible_value(&other)
            .map_or_else(|| format!("{other:?}"), |v| v.get_name().to_string()),
    }
}

/// SIGTERM and SIGINT (Ctrl-C), caught from the start so the sandbox is always taken down.
struct StopSignals {
    term: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
}

impl StopSignals {
    fn install() -> Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(StopSignals {
            term: signal(SignalKind::terminate()).context("catching SIGTERM")?,
            interrupt: signal(SignalKind::interrupt()).context("catching SIGINT")?,
        })
    }

    async fn recv(mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.interrupt.recv() => "SIGINT (Ctrl-C)",
        }
    }
}

/// Where the sandbox's files go: `--dir` (kept), or a temporary directory removed at the end.
struct SandboxPlace {
    path: PathBuf,
    _temp: Option<tempfile::TempDir>,
    /// Said before building: why the files are not where `--dir` says.
    note: Option<String>,
}

impl SandboxPlace {
    /// As root, Bitbucket runs as an unprivileged user who must reach its install and home: under
    /// a private parent of `--dir` it cannot, so the sandbox goes in a searchable directory of its
    /// own (kept), linked from `--dir`, and the note says how to have it in `--dir` itself.
    fn choose(dir: Option<&Path>) -> Result<SandboxPlace> {
        let Some(dir) = dir else {
            let temp = tempfile::Builder::new()
                .prefix("bbupgrade-demo-")
                .tempdir()?;
            return Ok(SandboxPlace {
                path: temp.path().to_path_buf(),
                _temp: Some(temp),
                note: None,
            });
        };
        let kept = |path: PathBuf, note| SandboxPlace {
            path,
            _temp: None,
            note,
        };
        let private = nix::unistd::geteuid()
            .is_root()
            .then(|| private_ancestor(dir))
            .flatten();
        let Some(private) = private else {
            return Ok(kept(dir.to_path_buf(), None));
        };
        let real = tempfile::Builder::new()
            .prefix("bbupgrade-demo-")
            .tempdir()?
            .keep();
        std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o755))?;
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let link = dir.join("sandbox");
        std::os::unix::fs::symlink(&real, &link)
            .with_context(|| format!("linking {} to {}", link.display(), real.display()))?;
        let note = format!(
            "{} is not searchable by other users, so Bitbucket's user could not reach the nodes' files under it: the sandbox is in {} (kept), linked from {}. To have it in {} itself: chmod o+x {}",
            private.display(),
            real.display(),
            link.display(),
            dir.display(),
            private.display()
        );
        Ok(kept(real, Some(note)))
    }
}

/// The first existing folder above `dir` that other users cannot search (no `o+x`), if any.
fn private_ancestor(dir: &Path) -> Option<PathBuf> {
    let absolute = std::path::absolute(dir).ok()?;
    absolute
        .ancestors()
        .skip(1)
        .filter_map(|d| Some((d, std::fs::metadata(d).ok()?)))
        .find(|(_, m)| m.permissions().mode() & 0o001 == 0)
        .map(|(d, _)| d.to_path_buf())
}
