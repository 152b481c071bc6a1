//! `bitbucket-sim`: builds simulated Bitbucket release archives, runs a simulated node (as the
//! release's scripts launch it), and runs a local simulated cluster.

use std::path::PathBuf;
use std::time::Duration;

use crate::cluster::{ClusterOptions, NodeSetup, SimCluster};
use crate::{archive, balancer, load};
use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "bitbucket-sim",
    version,
    about = "A Bitbucket Data Center node simulator and release-archive builder"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Output {
    Human,
    Json,
}

#[derive(Subcommand)]
enum Cmd {
    /// Write a release archive, atlassian-bitbucket-X.Y.Z.tar.gz.
    Archive {
        /// The release to build, e.g. 8.19.6.
        #[arg(long)]
        version: String,
        /// The file to write (or a directory to write atlassian-bitbucket-X.Y.Z.tar.gz into).
        #[arg(long)]
        out: PathBuf,
        /// Size of the incompressible WEB-INF/lib payload, in MiB.
        #[arg(long, default_value_t = 0)]
        payload_mib: u64,
    },
    /// Run one node (what bin/_start-webapp.sh launches); takes JVM-style -D arguments.
    Node {
        /// -Dname=value settings, as the release's scripts pass them.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run the bundled-search stand-in (what bin/_start-search.sh launches) until stopped.
    Search {
        /// The node's home (BITBUCKET_HOME).
        #[arg(long)]
        home: Option<PathBuf>,
        /// The install the search stand-in belongs to.
        #[arg(long)]
        install: Option<PathBuf>,
    },
    /// Start a local cluster through the release scripts and keep it until Ctrl-C / SIGTERM.
    Cluster {
        /// How many nodes.
        #[arg(long, default_value_t = 2)]
        nodes: usize,
        /// The release the nodes run.
        #[arg(long)]
        version: String,
        /// Where the installs, homes and shared home go.
        #[arg(long)]
        dir: PathBuf,
        /// First node port (then +1, +2, ...); free ports on 127.0.0.1 by default.
        #[arg(long)]
        base_port: Option<u16>,
        /// How long each node takes from STARTING to RUNNING, in ms.
        #[arg(long, default_value_t = 3_000)]
        startup_ms: u64,
        /// Size of the release's incompressible payload, in MiB.
        #[arg(long, default_value_t = 0)]
        payload_mib: u64,
        /// The sysadmin token to write in the shared bitbucket.properties.
        #[arg(
            long,
            env = "BITBUCKET_SIM_ADMIN_TOKEN",
            default_value = "sim-admin-token",
            hide_env_values = true
        )]
        admin_token: String,
        /// Start each node with -Dcluster.node.name=nodeN (without it every node reports the name
        /// "Not configured", as a real install does).
        #[arg(long)]
        node_names: bool,
        /// Node N gets -Dhazelcast.port=BASE+N-1 (its `portNumber` in the cluster view).
        #[arg(long, default_value_t = 5701, conflicts_with = "no_hazelcast_ports")]
        hazelcast_base_port: u16,
        /// Start the nodes without -Dhazelcast.port: all report the shared hazelcast.port, or 5701.
        #[arg(long)]
        no_hazelcast_ports: bool,
        /// The system administrator's user name for HTTP Basic (sim.admin.user).
        #[arg(long, default_value = "admin")]
        admin_user: String,
        /// The system administrator's password for HTTP Basic (sim.admin.password).
        #[arg(
            long,
            env = "BITBUCKET_SIM_ADMIN_PASSWORD",
            default_value = "sim-admin-password",
            hide_env_values = true,
            hide_default_value = true
        )]
        admin_password: String,
        /// A personal access token without system-admin rights (sim.user.token).
        #[arg(long, env = "BITBUCKET_SIM_USER_TOKEN", hide_env_values = true)]
        user_token: Option<String>,
        /// How to print: `human` for people, `json` for programs.
        #[arg(long, value_enum, default_value = "human")]
        output: Output,
    },
    /// A stand-in for HAProxy, for the demo where HAProxy is not installed: round robin over
    /// healthy `ready` servers, with HAProxy's runtime API (the subset bbupgrade uses) on --socket.
    Balancer {
        /// Where clients connect, e.g. 127.0.0.1:7990.
        #[arg(long)]
        listen: std::net::SocketAddr,
        /// The runtime-API unix socket (HAProxy's `stats socket ... level admin`).
        #[arg(long)]
        socket: PathBuf,
        /// The backend name the runtime API answers for.
        #[arg(long, default_value = "bitbucket")]
        backend: String,
        /// A server, NAME=IP:PORT (repeat for each node), e.g. node1=127.0.0.1:7991.
        #[arg(long = "server", required = true)]
        servers: Vec<String>,
        /// `http` (requests, checked with GET /status) or `tcp` (Git over SSH: bytes both ways,
        /// checked with a connect).
        #[arg(long, value_enum, default_value = "http")]
        mode: balancer::Mode,
    },
    /// Send load through URL (many users with sessions, pages and clones; SSH clones through --ssh)
    /// and report; exit code 1 if any request or SSH clone failed.
    Load {
        /// Where to send it, e.g. the load balancer: http://127.0.0.1:7990
        #[arg(long)]
        url: String,
        /// Concurrent virtual users, each with its own session.
        #[arg(long, default_value_t = 10)]
        users: usize,
        /// How long to run; until Ctrl-C / SIGTERM without it.
        #[arg(long)]
        duration_secs: Option<u64>,
        /// Every Nth request of a user is a Git clone (0 = none).
        #[arg(long, default_value_t = 10)]
        clone_every: u32,
        /// The load balancer's SSH front door, HOST:PORT: also send Git-over-SSH clones there.
        #[arg(long)]
        ssh: Option<String>,
        /// With --ssh, every Nth request of a user is an SSH clone (0 = none).
        #[arg(long, default_value_t = 10)]
        ssh_clone_every: u32,
        /// Pause between a user's requests, in ms.
        #[arg(long, default_value_t = 200)]
        think_ms: u64,
        /// Longest one request (or whole clone) may take, in seconds.
        #[arg(long, default_value_t = 30)]
        timeout_secs: u64,
        /// How to print: `human` for people, `json` for programs.
        #[arg(long, value_enum, default_value = "human")]
        output: Output,
    },
}

/// The `bitbucket-sim` entry point.
pub fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Archive {
            version,
            out,
            payload_mib,
        } => run_archive(&version, out, payload_mib),
        Cmd::Node { args } => crate::node::run(&args),
        Cmd::Search { .. } => wait_for_stop(),
        Cmd::Cluster {
            nodes,
            version,
            dir,
            base_port,
            startup_ms,
            payload_mib,
            admin_token,
            node_names,
            hazelcast_base_port,
            no_hazelcast_ports,
            admin_user,
            admin_password,
            user_token,
            output,
        } => {
            let setup = NodeSetup {
                configure_names: node_names,
                hazelcast_base_port: (!no_hazelcast_ports).then_some(hazelcast_base_port),
                admin_login: Some((admin_user, admin_password)),
                user_token,
            };
            let opts = ClusterOptions {
                nodes,
                version,
                program: match std::env::current_exe() {
                    Ok(p) => p,
                    Err(e) => {
                        eprintln!("error: finding this program: {e}");
                        return std::process::ExitCode::FAILURE;
                    }
                },
                startup_ms,
                admin_token,
                payload_mib,
                run_as_user: None,
            };
            run_cluster(&dir, opts, base_port, setup, output)
        }
        Cmd::Balancer {
            listen,
            socket,
            backend,
            servers,
            mode,
        } => run_balancer(listen, socket, &backend, &servers, mode),
        Cmd::Load {
            url,
            users,
            duration_secs,
            clone_every,
            ssh,
            ssh_clone_every,
            think_ms,
            timeout_secs,
            output,
        } => {
            let opts = load::LoadOptions {
                base_url: url,
                users,
                clone_every,
                ssh_addr: ssh,
                ssh_clone_every,
                think_ms,
                duration: duration_secs.map(Duration::from_secs),
                request_timeout: Duration::from_secs(timeout_secs),
            };
            run_load(opts, output)
        }
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run_archive(version: &str, out: PathBuf, payload_mib: u64) -> anyhow::Result<()> {
    let info = archive::write_archive(version, &out, payload_mib)
        .with_context(|| format!("writing the {version} archive to {}", out.display()))?;
    println!(
        "{}  {}  ({} bytes)",
        info.sha256,
        info.path.display(),
        info.size_bytes
    );
    Ok(())
}

fn wait_for_stop() -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        Ok(())
    })
}

fn run_cluster(
    dir: &std::path::Path,
    opts: ClusterOptions,
    base_port: Option<u16>,
    setup: NodeSetup,
    output: Output,
) -> anyhow::Result<()> {
    let timeout = Duration::from_millis(opts.startup_ms + 30_000);
    let cluster = SimCluster::create_with(dir, opts, base_port, setup)?;
    cluster.start_all(true)?;
    cluster.wait_running(timeout)?;
    let properties = cluster.shared_dir().join("bitbucket.properties");
    if output == Output::Json {
        let doc = serde_json::json!({
            "dir": cluster.dir(),
            "archive": {"path": cluster.archive().path, "sha256": cluster.archive().sha256, "size_bytes": cluster.archive().size_bytes},
            "shared_properties": properties,
            "nodes": cluster.nodes().iter().enumerate().map(|(i, n)| {
                let info = cluster.node_info(i).ok();
                serde_json::json!({
                    "name": n.name, "port": n.port, "ssh_port": n.ssh_port, "base_url": n.base_url,
                    "cluster_name": n.cluster_name,
                    "reported_name": info.as_ref().map(|i| i.name.clone()),
                    "id": info.as_ref().map(|i| i.id.clone()),
                    "hazelcast_port": info.as_ref().map(|i| i.hazelcast_port),
                    "install_dir": n.install_dir, "install_root": n.install_root, "home": n.home,
                })
            }).collect::<Vec<_>>(),
        });
        println!("{doc}");
    } else {
        println!(
            "Cluster of {} nodes running (admin token in {}):",
            cluster.nodes().len(),
            properties.display()
        );
        for (i, n) in cluster.nodes().iter().enumerate() {
            let info = cluster.node_info(i).ok();
            println!(
                "  {:<8} {:<24} ssh {}  id {}  name \"{}\"  cluster port {}  install {}  home {}",
                n.name,
                n.base_url,
                n.ssh_port,
                info.as_ref().map_or("?", |i| i.id.as_str()),
                info.as_ref().map_or("?", |i| i.name.as_str()),
                info.as_ref()
                    .map_or("?".to_string(), |i| i.hazelcast_port.to_string()),
                n.install_dir.display(),
                n.home.display()
            );
        }
        println!("Press Ctrl-C to stop.");
    }
    let waited = wait_for_stop();
    let stopped = cluster.stop_all();
    waited.and(stopped)
}

fn run_balancer(
    listen: std::net::SocketAddr,
    socket: PathBuf,
    backend: &str,
    servers: &[String],
    mode: balancer::Mode,
) -> anyhow::Result<()> {
    let servers = servers
        .iter()
        .map(|s| balancer::ServerSpec::parse(s))
        .collect::<Result<Vec<_>, _>>()?;
    let opts = balancer::BalancerOptions {
        mode,
        ..balancer::BalancerOptions::new(listen, socket, backend, servers)
    };
    // State changes (drain, maint, a server going down) to stderr, as HAProxy logs them.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .try_init()
        .ok();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let handle = balancer::start(opts).await?;
        eprintln!(
            "bitbucket-sim balancer: a STAND-IN for HAProxy (HAProxy is not installed), for the demo \
             only; listening on {}, runtime API on {}",
            handle.addr(),
            handle.socket().display()
        );
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        handle.shutdown().await;
        anyhow::Ok(())
    })
}

fn run_load(opts: load::LoadOptions, output: Output) -> anyhow::Result<()> {
    let url = reqwest::Url::parse(&opts.base_url)
        .with_context(|| format!("--url {} is not a URL", opts.base_url))?;
    if !matches!(url.scheme(), "http" | "https") {
        anyhow::bail!("--url {url} must be http:// or https://");
    }
    if opts.users == 0 {
        anyhow::bail!("--users must be at least 1");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let report = runtime.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let duration = opts.duration;
        let handle = load::start(opts);
        let elapsed = async {
            match duration {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = elapsed => {}
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        anyhow::Ok(handle.stop().await)
    })?;
    if output == Output::Json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("{}", report.summary_line());
        for failure in &report.failures {
            println!("  {failure}");
        }
        let all_failed = report.failed + report.ssh_failed;
        if all_failed > report.failures.len() as u64 {
            println!(
                "  ... and {} more failures",
                all_failed - report.failures.len() as u64
            );
        }
    }
    if report.failed > 0 || report.ssh_failed > 0 {
        anyhow::bail!(
            "{} of {} requests failed through {url}, {} of {} SSH clones",
            report.failed,
            report.total,
            report.ssh_failed,
            report.ssh_total
        );
    }
    Ok(())
}
