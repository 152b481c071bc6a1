//! The `bbupgrade-agent` command line: run the daemon (`--config FILE`), or stage a release locally
//! (`stage ...`) with the same code the daemon uses. Exit codes: 0 done, 1 failed, 2 bad input.

use crate::config::Settings;
use crate::server::AgentService;
use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use tokio::net::TcpListener;

#[derive(Parser)]
#[command(
    name = "bbupgrade-agent",
    version,
    about = "The bbupgrade agent for a Bitbucket Data Center node"
)]
pub struct Cli {
    /// The agent configuration (TOML), e.g. /etc/bbupgrade/agent.toml.
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Subcommand)]
pub enum Command {
    /// Verify and extract a release archive into <install-root>/<version>, in one pass.
    Stage {
        /// The release archive (atlassian-bitbucket-X.Y.Z.tar.gz).
        #[arg(long)]
        archive: PathBuf,
        /// Its expected SHA-256 (64 hex digits); a mismatch stages nothing.
        #[arg(long)]
        sha256: String,
        /// The release the archive holds, e.g. 8.19.6.
        #[arg(long)]
        version: String,
        /// Where installs live; the release goes to <install-root>/<version>.
        #[arg(long)]
        install_root: PathBuf,
    },
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    bbupgrade_common::logging::init("info");
    match cli.command {
        Some(Command::Stage {
            archive,
            sha256,
            version,
            install_root,
        }) => {
            let started = std::time::Instant::now();
            match crate::stage::run_local_stage(&archive, &sha256, &version, &install_root) {
                Ok(o) => {
                    println!(
                        "staged {} at {}: {} files, {} bytes in {} ms{}",
                        version,
                        o.install_path.display(),
                        o.files,
                        o.bytes,
                        started.elapsed().as_millis(),
                        if o.already_staged {
                            " (already staged)"
                        } else {
                            ""
                        }
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: staging {}: {e}", archive.display());
                    ExitCode::from(if e.is_bad_input() { 2 } else { 1 })
                }
            }
        }
        None => {
            let Some(config) = cli.config else {
                eprintln!(
                    "error: give --config FILE to run the agent, or a subcommand (see --help)"
                );
                return ExitCode::from(2);
            };
            let settings = match Settings::load(&config) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    return ExitCode::from(2);
                }
            };
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("error: starting the runtime: {e}");
                    return ExitCode::from(1);
                }
            };
            match runtime.block_on(daemon(settings)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::from(1)
                }
            }
        }
    }
}

/// Runs the daemon until SIGTERM or SIGINT.
pub async fn daemon(settings: Settings) -> Result<()> {
    let listener = TcpListener::bind(settings.listen)
        .await
        .with_context(|| format!("listening on {}", settings.listen))?;
    let shutdown = async {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
        }
        tracing::info!("shutting down");
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    };
    run(settings, listener, shutdown).await
}

/// Serves the agent on `listener` until `shutdown` completes (tests pass a 127.0.0.1:0 listener).
pub async fn run(
    settings: Settings,
    listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    use bbupgrade_common::tls::{AgentServerConfig, CoordinatorGate};
    let tls = AgentServerConfig::new(settings.tls.clone(), settings.crl_file.clone())
        .context("configuring TLS")?;
    let gate = CoordinatorGate::new(settings.allowed_coordinators.clone());
    match &settings.allowed_coordinators {
        Some(names) => {
            tracing::info!(coordinators = ?names, "serving only the listed coordinators")
        }
        None => tracing::warn!(
            "[tls] allowed_coordinators is not set: any coordinator certificate of the CA may drive this agent; list the coordinator names to restrict it"
        ),
    }
    if settings.tls.crl_pem.is_none() {
        tracing::info!("[tls] crl is not set: no certificate is treated as revoked");
    }
    let node = settings.node_id.clone();
    let addr = listener.local_addr()?;
    let limits = settings.accept;
    let service = AgentService::new(settings)?;
    let interceptor = {
        let gate = gate.clone();
        move |req| gate.intercept(req)
    };
    let server =
        tonic::service::interceptor::InterceptedService::new(service.into_server(), interceptor);
    tracing::info!(%node, %addr, "agent listening (mutual TLS, coordinator-role peers only)");
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    let incoming =
        bbupgrade_common::accept::incoming(listener, std::sync::Arc::new(tls), gate, limits);
    tonic::transport::Server::builder()
        .add_service(server)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .context("serving gRPC")?;
    Ok(())
}
