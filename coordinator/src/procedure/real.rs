//! The real cluster behind the driver's traits: agents over mutual TLS (with staging of the
//! release), Bitbucket's rolling-upgrade API, the configured load balancer, and the journal with
//! its blocking calls run off the async executor.

use super::context::Ctx;
use super::drive::{Agents, Balancer, Bitbucket, Driver, Env};
use super::run_journal::JournalOnThread;
use super::{ArchiveSource, RunOptions, Step};
use crate::agents;
use crate::inventory::{Node, Timeouts};
use crate::journal::{RunId, StepRecord};
use crate::plan;
use crate::report::Summary;
use crate::zdu::ClusterView;
use anyhow::{Context, Result, anyhow, bail};
use async_trait::async_trait;
use bbupgrade_common::proto::*;
use std::time::{Duration, Instant};
use tokio_stream::StreamExt;

pub const UPLOAD_CHUNK_BYTES: usize = 1 << 20;
pub const STAGE_TIMEOUT_SECS: u64 = 3600;
/// Bound on an agent's activate (a service definition edit and a daemon reload).
pub const ACTIVATE_TIMEOUT_SECS: u64 = 120;
/// Bound on an agent's prepare (files carried over, the home pointed at).
pub const PREPARE_TIMEOUT_SECS: u64 = 120;
/// Bound on an agent's cleanup of old installs (removing directory trees).
pub const CLEANUP_TIMEOUT_SECS: u64 = 300;
/// How long an agent call is retried after the connection dropped (the agent restarting).
pub const AGENT_RETRY_SECS: u64 = 20;
/// How often a long stop or start reports a sign of life.
pub const HEARTBEAT_SECS: u64 = 10;
/// Bound on asking the node's agent for its status during a heartbeat.
pub const HEARTBEAT_PROBE_SECS: u64 = 5;

/// Upgrades (or continues upgrading) a cluster.
pub async fn drive(ctx: &Ctx, run: RunId, opts: &RunOptions) -> Summary {
    let io = CtxIo::new(ctx, run, opts);
    Driver::new(io.env(), run, opts).upgrade().await
}

/// Approves an upgrade left unfinalized (`bbupgrade finalize`), journaled in its run.
pub async fn finalize(ctx: &Ctx, run: RunId, opts: &RunOptions) -> Summary {
    let io = CtxIo::new(ctx, run, opts);
    Driver::new(io.env(), run, opts).finalize().await
}

/// After approval, asks every agent to remove old installs beyond its `keep_installs` (never the
/// active or previous one), journaled per node; a node that cannot is named, nothing fails.
pub async fn clean_up_installs(ctx: &Ctx, run: RunId) -> Vec<String> {
    let results = futures::future::join_all(ctx.cluster.nodes.iter().map(|node| {
        ctx.step(run, Some(&node.id), Step::Cleanup, async {
            let d = Duration::from_secs(CLEANUP_TIMEOUT_SECS);
            let r = agent_op(ctx, node, d, |mut c| {
                // keep = 0: the agent's own `keep_installs`.
                let req = agents::request(
                    CleanupRequest {
                        operation_id: op_id(run, &node.id, Step::Cleanup),
                        keep: 0,
                    },
                    d,
                );
                async move { c.cleanup(req).await }
            })
            .await?;
            let removed = if r.removed.is_empty() {
                "nothing".to_string()
            } else {
                r.removed.join(", ")
            };
            Ok(((), format!("removed {removed}; kept {}", r.kept.len())))
        })
    }))
    .await;
    results
        .into_iter()
        .zip(&ctx.cluster.nodes)
        .filter_map(|(r, n)| {
            r.err()
                .map(|e| format!("node '{}': old installs were not cleaned up: {e:#}", n.id))
        })
        .collect()
}

/// Returns every node not serving on the original version (`opts.to`) to it, one at a time.
pub async fn drive_rollback(ctx: &Ctx, run: RunId, opts: &RunOptions) -> Summary {
    let io = CtxIo::new(ctx, run, opts);
    let superseded = superseded_steps(ctx, run).await;
    Driver::new(io.env(), run, opts).rollback(&superseded).await
}

/// The steps of the latest upgrade run before rollback run `run` (none when it cannot be read).
async fn superseded_steps(ctx: &Ctx, run: RunId) -> Vec<StepRecord> {
    let (j, cluster) = (ctx.journal.clone(), ctx.cluster.name.clone());
    tokio::task::spawn_blocking(move || {
        let runs = j.recent_runs(&cluster, 20).ok()?;
        let upgrade = runs
            .iter()
            .find(|r| r.id < run && r.kind == crate::journal::RunKind::Upgrade)?;
        j.steps(upgrade.id).ok()
    })
    .await
    .ok()
    .flatten()
    .unwrap_or_default()
}

/// The driver's traits over a command's context.
pub struct CtxIo<'a> {
    ctx: &'a Ctx,
    run: RunId,
    opts: &'a RunOptions,
    journal: JournalOnThread,
}

impl<'a> CtxIo<'a> {
    pub fn new(ctx: &'a Ctx, run: RunId, opts: &'a RunOptions) -> Self {
        Self {
            ctx,
            run,
            opts,
            journal: JournalOnThread::new(ctx.journal.clone(), run),
        }
    }

    pub fn env(&self) -> Env<'_> {
        Env {
            cluster: &self.ctx.cluster.name,
            nodes: &self.ctx.cluster.nodes,
            keys: self.ctx.keys(),
            agents: self,
            bitbucket: self,
            lb: self,
            journal: &self.journal,
            reporter: &self.ctx.reporter,
            lock_lost: &self.ctx.lock_lost,
        }
    }
}

#[async_trait]
impl Agents for CtxIo<'_> {
    async fn stage_all(&self) -> Result<()> {
        stage_all(self.ctx, self.run, self.opts).await
    }

    async fn active_version(&self, node: &Node) -> Result<String> {
        Ok(self.ctx.node_info(node).await?.active_version)
    }

    async fn cpu(&self, node: &Node) -> f32 {
        self.ctx.cpu(node).await
    }

    async fn stop(&self, node: &Node, op: &str, timeout_secs: u64) -> Result<String> {
        stop_node(self.ctx, node, op.to_string(), timeout_secs).await
    }

    async fn activate(&self, node: &Node, op: &str, version: &str) -> Result<String> {
        activate_node(self.ctx, node, op.to_string(), version).await
    }

    async fn start(&self, node: &Node, op: &str, timeout_secs: u64) -> Result<String> {
        start_node(self.ctx, node, op.to_string(), timeout_secs).await
    }

    async fn rollback(&self, node: &Node, op: &str, target: &str, t: &Timeouts) -> Result<String> {
        let d = Duration::from_secs(t.stop_secs + t.start_secs);
        let call = agent_op(self.ctx, node, d, |mut c| {
            let req = agents::request(
                RollbackRequest {
                    operation_id: op.to_string(),
                    stop_timeout_secs: t.stop_secs as u32,
                    start_timeout_secs: t.start_secs as u32,
                    no_start: false,
                    // Named, so a repeated rollback changes nothing and never goes further back.
                    target_version: target.to_string(),
                },
                d,
            );
            async move { c.rollback(req).await }
        });
        let r = with_heartbeat(self.ctx, node, Step::Rollback, d, call).await?;
        Ok(format!("{} {} at {}", r.state, r.version, r.install_path))
    }
}

#[async_trait]
impl Bitbucket for CtxIo<'_> {
    async fn cluster(&self) -> Result<ClusterView> {
        self.ctx.cluster_view().await
    }

    async fn start_upgrade_mode(&self) -> Result<()> {
        Ok(self.ctx.zdu.start().await?)
    }

    async fn cancel_upgrade_mode(&self) -> Result<()> {
        Ok(self.ctx.zdu.cancel().await?)
    }

    async fn approve(&self) -> Result<()> {
        Ok(self.ctx.zdu.approve().await?)
    }
}

#[async_trait]
impl Balancer for CtxIo<'_> {
    async fn drain(&self, node: &Node, timeout: Duration) -> Result<String> {
        let t = &self.opts.timeouts;
        let d = crate::loadbalancer::policy::drain_with_policy(
            &*self.ctx.lb,
            &node.lb_server,
            timeout,
            t.drain_policy,
            Duration::from_secs(t.drain_wait_secs),
        )
        .await?;
        // Name every door (backend and load balancer) the node was drained from, for the journal,
        // and what the deadline found when the policy waited longer.
        let r = d.report;
        Ok(format!(
            "{} sessions drained in {:.1}s from {}{}",
            r.sessions_at_start,
            r.waited.as_secs_f64(),
            self.ctx.lb.describe(),
            d.at_deadline.map(|n| format!("; {n}")).unwrap_or_default()
        ))
    }

    async fn enable(&self, node: &Node) -> Result<()> {
        Ok(self.ctx.lb.enable(&node.lb_server).await?)
    }

    fn describe(&self) -> String {
        self.ctx.lb.describe()
    }

    async fn after_rejoin(&self, node: &Node) -> Option<String> {
        super::skew::after_rejoin(self.ctx, self.run, node, self.opts).await
    }
}

fn op_id(run: RunId, node: &str, step: Step) -> String {
    super::decide::attempt_op_id(run, node, step, 0)
}

/// Calls an idempotent agent operation, reconnecting and repeating it (same operation id) while the
/// agent is unreachable, for a bounded time.
async fn agent_op<T, F, Fut>(ctx: &Ctx, node: &Node, deadline: Duration, f: F) -> Result<T>
where
    F: Fn(agents::Client) -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let give_up = Instant::now() + Duration::from_secs(AGENT_RETRY_SECS);
    loop {
        let client = match ctx.client(node).await {
            Ok(c) => c,
            Err(e) if Instant::now() < give_up => {
                tracing::warn!(node = %node.id, error = %format!("{e:#}"), "agent unreachable; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            Err(e) => return Err(e),
        };
        match tokio::time::timeout(deadline + Duration::from_secs(2), f(client)).await {
            Ok(Ok(r)) => return Ok(r.into_inner()),
            Ok(Err(s))
                if matches!(
                    s.code(),
                    // Cancelled: the connection was cut mid-call (seen in the fault suite);
                    // the operation id makes asking again safe.
                    tonic::Code::Unavailable
                        | tonic::Code::Unknown
                        | tonic::Code::Aborted
                        | tonic::Code::Cancelled
                ) && Instant::now() < give_up =>
            {
                ctx.forget_client(node).await;
                tracing::warn!(node = %node.id, error = %s.message(), "agent call cut off; retrying with the same operation id");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Ok(Err(s)) => {
                ctx.forget_client(node).await;
                return Err(anyhow!(agents::status_text(&node.id, &s)));
            }
            Err(_) => {
                ctx.forget_client(node).await;
                bail!(
                    "node '{}': no answer from the agent within {:?}: the operation outlasted its deadline (Bitbucket ignoring SIGTERM, a slow start) or the agent is hung — the run stops here",
                    node.id,
                    deadline
                );
            }
        }
    }
}

/// Waits for `call` (a stop, start or rollback the agent waits out, up to `deadline`) while
/// reporting, every `HEARTBEAT_SECS`, the time so far and what the node's status said last, so a
/// five-minute stop is not a silent "begin".
async fn with_heartbeat<T>(
    ctx: &Ctx,
    node: &Node,
    step: Step,
    deadline: Duration,
    call: impl std::future::Future<Output = T>,
) -> T {
    let began = Instant::now();
    let beat = async {
        loop {
            tokio::time::sleep(Duration::from_secs(HEARTBEAT_SECS)).await;
            let probe = Duration::from_secs(HEARTBEAT_PROBE_SECS);
            let seen = match tokio::time::timeout(probe, ctx.node_info(node)).await {
                Ok(Ok(info)) => info.status,
                Ok(Err(_)) | Err(_) => "unknown (its agent did not answer)".to_string(),
            };
            ctx.reporter
                .heartbeat(&node.id, step.as_str(), began.elapsed(), &seen, deadline);
        }
    };
    tokio::select! {
        r = call => r,
        _ = beat => unreachable!("the heartbeat loop never ends"),
    }
}

/// Stages (and prepares) the release on every node at once; nodes keep serving meanwhile.
async fn stage_all(ctx: &Ctx, run: RunId, opts: &RunOptions) -> Result<()> {
    let archive = opts
        .archive
        .clone()
        .context("the run has no release archive recorded")?;
    let results = futures::future::join_all(ctx.cluster.nodes.iter().map(|node| {
        let archive = archive.clone();
        async move {
            if !ctx.step_done(run, &node.id, Step::Stage).await? {
                ctx.step(
                    run,
                    Some(&node.id),
                    Step::Stage,
                    stage_node(ctx, run, node, &opts.to, &archive),
                )
                .await?;
            }
            if !ctx.step_done(run, &node.id, Step::Prepare).await? {
                ctx.step(run, Some(&node.id), Step::Prepare, async {
                    let d = Duration::from_secs(PREPARE_TIMEOUT_SECS);
                    let r = agent_op(ctx, node, d, |mut c| {
                        let req = agents::request(
                            PrepareRequest {
                                operation_id: op_id(run, &node.id, Step::Prepare),
                                version: opts.to.clone(),
                            },
                            d,
                        );
                        async move { c.prepare(req).await }
                    })
                    .await?;
                    let carried: Vec<_> = r
                        .carried
                        .iter()
                        .map(|c| format!("{} ({})", c.path, c.reason))
                        .collect();
                    Ok((
                        (),
                        format!(
                            "home {}; carried: {}{}",
                            r.bitbucket_home,
                            if carried.is_empty() {
                                "nothing".into()
                            } else {
                                carried.join(", ")
                            },
                            if r.notes.is_empty() {
                                String::new()
                            } else {
                                format!("; {}", r.notes.join("; "))
                            }
                        ),
                    ))
                })
                .await?;
            }
            Ok::<_, anyhow::Error>(())
        }
    }))
    .await;
    let errors: Vec<String> = results
        .into_iter()
        .filter_map(|r| r.err())
        .map(|e| format!("{e:#}"))
        .collect();
    if !errors.is_empty() {
        bail!(
            "staging failed; no node was taken out of service: {}",
            errors.join("; ")
        );
    }
    Ok(())
}

async fn stage_node(
    ctx: &Ctx,
    run: RunId,
    node: &Node,
    version: &str,
    archive: &ArchiveSource,
) -> Result<((), String)> {
    let info = ctx.node_info(node).await?;
    if info.installed.iter().any(|i| i.version == version) {
        return Ok(((), format!("{version} already staged")));
    }
    let id = op_id(run, &node.id, Step::Stage);
    let deadline = Duration::from_secs(STAGE_TIMEOUT_SECS);
    let give_up = Instant::now() + Duration::from_secs(AGENT_RETRY_SECS);
    loop {
        let attempt = stage_attempt(ctx, node, &id, version, archive, deadline).await;
        match attempt {
            Ok(r) => {
                return Ok((
                    (),
                    format!(
                        "{} files, {} MiB at {}{}",
                        r.files,
                        r.bytes >> 20,
                        r.install_path,
                        if r.from_cache {
                            " (from the agent's cache)"
                        } else {
                            ""
                        }
                    ),
                ));
            }
            Err((retryable, e)) if retryable && Instant::now() < give_up => {
                ctx.forget_client(node).await;
                tracing::warn!(node = %node.id, error = %format!("{e:#}"), "staging cut off; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err((_, e)) => return Err(e),
        }
    }
}

/// One staging attempt: `Err((retryable, error))`.
async fn stage_attempt(
    ctx: &Ctx,
    node: &Node,
    id: &str,
    version: &str,
    archive: &ArchiveSource,
    deadline: Duration,
) -> Result<StageResult, (bool, anyhow::Error)> {
    let mut client = ctx.client(node).await.map_err(|e| (true, e))?;
    let bar = ctx.reporter.stage_bar(&node.id, archive.size_bytes());
    let (response, feeder) = match archive {
        ArchiveSource::Url { url, sha256 } => {
            let req = StageFromUrlRequest {
                operation_id: id.to_string(),
                version: version.to_string(),
                url: url.clone(),
                sha256: sha256.clone(),
            };
            let r = client.stage_from_url(agents::request(req, deadline)).await;
            (r, None)
        }
        ArchiveSource::File {
            path,
            sha256,
            size_bytes,
        } => {
            let header = StageHeader {
                operation_id: id.to_string(),
                version: version.to_string(),
                sha256: sha256.clone(),
                size_bytes: *size_bytes,
            };
            let (rx, feeder) = upload_feed(path.clone(), header);
            let r = client.stage_upload(agents::request(rx, deadline)).await;
            (r, Some(feeder))
        }
    };
    let outcome = match response {
        Ok(r) => stage_events(node, r.into_inner(), bar.as_ref()).await,
        Err(s) => Err(stage_status(node, &s)),
    };
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    // A file that could not be read is what failed, not the archive the agent received short.
    if outcome.is_err()
        && let Some(feeder) = feeder
        && let Ok(Err(why)) = feeder.await
    {
        return Err((false, anyhow!("{why}")));
    }
    outcome
}

/// Streams the archive file after `header`; the task ends with why the file could not be read.
fn upload_feed(
    path: std::path::PathBuf,
    header: StageHeader,
) -> (
    tokio_stream::wrappers::ReceiverStream<StageUploadMessage>,
    tokio::task::JoinHandle<Result<(), String>>,
) {
    let (tx, rx) = tokio::sync::mpsc::channel::<StageUploadMessage>(4);
    let task = tokio::spawn(async move {
        use tokio::io::AsyncReadExt;
        let header = StageUploadMessage {
            msg: Some(stage_upload_message::Msg::Header(header)),
        };
        if tx.send(header).await.is_err() {
            return Ok(());
        }
        let cannot = |e: std::io::Error| format!("cannot read the archive {}: {e}", path.display());
        let mut f = tokio::fs::File::open(&path).await.map_err(cannot)?;
        loop {
            let mut buf = vec![0u8; UPLOAD_CHUNK_BYTES];
            let n = f.read(&mut buf).await.map_err(cannot)?;
            if n == 0 {
                return Ok(());
            }
            buf.truncate(n);
            let msg = StageUploadMessage {
                msg: Some(stage_upload_message::Msg::Chunk(buf)),
            };
            if tx.send(msg).await.is_err() {
                // The agent stopped listening; its answer says why.
                return Ok(());
            }
        }
    });
    (tokio_stream::wrappers::ReceiverStream::new(rx), task)
}

/// Whether a failed staging call is worth repeating (the connection, not the archive).
fn stage_status(node: &Node, s: &tonic::Status) -> (bool, anyhow::Error) {
    let retryable = matches!(
        s.code(),
        tonic::Code::Unavailable
            | tonic::Code::Unknown
            | tonic::Code::Aborted
            | tonic::Code::Cancelled
    );
    (retryable, anyhow!(agents::status_text(&node.id, s)))
}

/// Follows a staging stream to its result, moving the progress bar.
async fn stage_events(
    node: &Node,
    mut stream: tonic::Streaming<StageEvent>,
    bar: Option<&indicatif::ProgressBar>,
) -> Result<StageResult, (bool, anyhow::Error)> {
    let mut result = None;
    while let Some(ev) = stream.next().await {
        match ev.map_err(|s| stage_status(node, &s))?.event {
            Some(stage_event::Event::Progress(p)) => {
                if let Some(b) = bar {
                    b.set_position(p.bytes);
                }
            }
            Some(stage_event::Event::Result(r)) => result = Some(r),
            None => {}
        }
    }
    result.ok_or_else(|| {
        let e = anyhow!(
            "node '{}': the staging stream ended without a result",
            node.id
        );
        (true, e)
    })
}

async fn stop_node(ctx: &Ctx, node: &Node, op: String, stop_secs: u64) -> Result<String> {
    let d = Duration::from_secs(stop_secs);
    let call = agent_op(ctx, node, d, |mut c| {
        let req = agents::request(
            StopRequest {
                operation_id: op.clone(),
                timeout_secs: stop_secs as u32,
                kill_after_timeout: false,
            },
            d,
        );
        async move { c.stop(req).await }
    });
    let r = with_heartbeat(ctx, node, Step::Stop, d, call).await?;
    Ok(format!(
        "was_running={} in {} ms",
        r.was_running, r.duration_ms
    ))
}

async fn activate_node(ctx: &Ctx, node: &Node, op: String, version: &str) -> Result<String> {
    let d = Duration::from_secs(ACTIVATE_TIMEOUT_SECS);
    let r = agent_op(ctx, node, d, |mut c| {
        let req = agents::request(
            ActivateRequest {
                operation_id: op.clone(),
                version: version.to_string(),
            },
            d,
        );
        async move { c.activate(req).await }
    })
    .await?;
    Ok(format!(
        "{} (was {}){}",
        r.install_path,
        r.previous_install,
        if r.notes.is_empty() {
            String::new()
        } else {
            format!("; {}", r.notes.join("; "))
        }
    ))
}

async fn start_node(ctx: &Ctx, node: &Node, op: String, start_secs: u64) -> Result<String> {
    let d = Duration::from_secs(start_secs);
    let call = agent_op(ctx, node, d, |mut c| {
        let req = agents::request(
            StartRequest {
                operation_id: op.clone(),
                timeout_secs: start_secs as u32,
            },
            d,
        );
        async move { c.start(req).await }
    });
    let r = with_heartbeat(ctx, node, Step::Start, d, call).await?;
    if let Some(why) = plan::start_failure(&r.state) {
        bail!("node '{}': {why}", node.id);
    }
    Ok(format!(
        "{} on {} after {} ms",
        r.state, r.version, r.duration_ms
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_unreadable_archive_is_reported_as_such_not_as_a_corrupt_upload() {
        let header = StageHeader {
            operation_id: "op".into(),
            version: "8.19.6".into(),
            sha256: String::new(),
            size_bytes: 1,
        };
        let (mut rx, task) = upload_feed("/nonexistent/bitbucket.tar.gz".into(), header);
        let mut sent = 0;
        while rx.next().await.is_some() {
            sent += 1;
        }
        assert_eq!(sent, 1, "only the header goes out");
        let why = task.await.unwrap().unwrap_err();
        assert!(
            why.contains("cannot read the archive /nonexistent/bitbucket.tar.gz"),
            "{why}"
        );
    }
}
