//! The rolling upgrade of one cluster, carried out: stage everywhere, upgrade mode, then one node at
//! a time least busy first (drain, stop, wait OFFLINE, activate, start, wait ACTIVE, back in, soak),
//! then finalize. Every step is journaled; agent operations carry ids derived from the run, so a
//! resumed run repeats nothing that completed.

use crate::agents;
use crate::inventory::Node;
use crate::journal::{RunId, RunResult, StepOutcome, StepRecord};
use crate::node_match::Match;
use crate::plan::{self, Busyness};
use crate::procedure::Step;
use crate::procedure::decide::{self, FailurePlan, NodeHistory, Recovery};
use crate::report::{NodeSummary, Summary};
use crate::run::{ArchiveSource, Ctx, PreStepError, RunOptions};
use crate::zdu::{ClusterState, NodeState};
use anyhow::{Context, Result, anyhow, bail};
use bbupgrade_common::proto::*;
use std::collections::HashMap;
use std::time::{Duration, Instant};
use tokio_stream::StreamExt;

pub const POLL_INTERVAL_MS: u64 = 250;
pub const UPLOAD_CHUNK_BYTES: usize = 1 << 20;
pub const STAGE_TIMEOUT_SECS: u64 = 3600;
pub const FINALIZE_TIMEOUT_SECS: u64 = 600;
/// Bound on an agent's activate (a service definition edit and a daemon reload).
pub const ACTIVATE_TIMEOUT_SECS: u64 = 120;
/// How long an agent call is retried after the connection dropped (the agent restarting).
pub const AGENT_RETRY_SECS: u64 = 20;

fn op_id(run: RunId, node: &str, step: Step) -> String {
    decide::attempt_op_id(run, node, step, 0)
}

/// The operation id for the next `step` on `node` in this run.
fn next_op_id(ctx: &Ctx, run: RunId, node: &str, step: Step) -> String {
    decide::attempt_op_id(
        run,
        node,
        step,
        ctx.completions(run, node, step).unwrap_or(0),
    )
}

/// A node failed after it was taken out of service.
struct NodeFailure {
    node: String,
    error: anyhow::Error,
    stopped: bool,
    /// What the driver knew of the node's steps when it failed.
    history: NodeHistory,
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
                    tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Aborted
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

/// Waits until Bitbucket shows the node in `want` (on `version` if given); ERROR ends the wait.
async fn wait_zdu(
    ctx: &Ctx,
    node: &Node,
    want: NodeState,
    version: Option<&str>,
    timeout: Duration,
) -> Result<String> {
    let started = Instant::now();
    let mut last: String;
    loop {
        match ctx.zdu.cluster().await {
            Ok(view) => match ctx.row(&view, node) {
                Match::Row(z) => {
                    last = format!(
                        "{} on {} (row {})",
                        z.state,
                        z.version_or_dash(),
                        if z.id.is_empty() { "without id" } else { &z.id }
                    );
                    if z.state == want && version.is_none_or(|v| z.runs(v)) {
                        return Ok(format!(
                            "{last} after {:.1}s",
                            started.elapsed().as_secs_f64()
                        ));
                    }
                    if z.state == NodeState::Error && want != NodeState::Error {
                        bail!("Bitbucket shows node '{}' in ERROR ({last})", node.id);
                    }
                }
                Match::Missing(_) if want == NodeState::Offline => {
                    return Ok("gone from the cluster view".into());
                }
                // A starting node's row has no address yet: keep polling.
                Match::Missing(why) | Match::Ambiguous(why) => last = why,
            },
            Err(e) => last = format!("API error: {e}"),
        }
        if started.elapsed() > timeout {
            bail!(
                "node '{}' did not become {} within {:?} (last seen: {last})",
                node.id,
                want,
                timeout
            );
        }
        tokio::time::sleep(Duration::from_millis(POLL_INTERVAL_MS)).await;
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
            if !ctx.step_done(run, &node.id, Step::Stage)? {
                ctx.step(
                    run,
                    Some(&node.id),
                    Step::Stage,
                    stage_node(ctx, run, node, &opts.to, &archive),
                )
                .await?;
            }
            if !ctx.step_done(run, &node.id, Step::Prepare)? {
                ctx.step(run, Some(&node.id), Step::Prepare, async {
                    let d = Duration::from_secs(120);
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
    let response = match archive {
        ArchiveSource::Url { url, sha256 } => {
            client
                .stage_from_url(agents::request(
                    StageFromUrlRequest {
                        operation_id: id.to_string(),
                        version: version.to_string(),
                        url: url.clone(),
                        sha256: sha256.clone(),
                    },
                    deadline,
                ))
                .await
        }
        ArchiveSource::File {
            path,
            sha256,
            size_bytes,
        } => {
            let header = StageUploadMessage {
                msg: Some(stage_upload_message::Msg::Header(StageHeader {
                    operation_id: id.to_string(),
                    version: version.to_string(),
                    sha256: sha256.clone(),
                    size_bytes: *size_bytes,
                })),
            };
            let (tx, rx) = tokio::sync::mpsc::channel::<StageUploadMessage>(4);
            let path = path.clone();
            tokio::spawn(async move {
                if tx.send(header).await.is_err() {
                    return;
                }
                let Ok(mut f) = tokio::fs::File::open(&path).await else {
                    return;
                };
                use tokio::io::AsyncReadExt;
                loop {
                    let mut buf = vec![0u8; UPLOAD_CHUNK_BYTES];
                    let n = match f.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    buf.truncate(n);
                    let msg = StageUploadMessage {
                        msg: Some(stage_upload_message::Msg::Chunk(buf)),
                    };
                    if tx.send(msg).await.is_err() {
                        break;
                    }
                }
            });
            client
                .stage_upload(agents::request(
                    tokio_stream::wrappers::ReceiverStream::new(rx),
                    deadline,
                ))
                .await
        }
    };
    let retryable = |s: &tonic::Status| {
        matches!(
            s.code(),
            tonic::Code::Unavailable
                | tonic::Code::Unknown
                | tonic::Code::Aborted
                | tonic::Code::Cancelled
        )
    };
    let mut stream = response
        .map_err(|s| (retryable(&s), anyhow!(agents::status_text(&node.id, &s))))?
        .into_inner();
    let mut result = None;
    while let Some(ev) = stream.next().await {
        match ev {
            Ok(StageEvent {
                event: Some(stage_event::Event::Progress(p)),
            }) => {
                if let Some(b) = &bar {
                    b.set_position(p.bytes);
                }
            }
            Ok(StageEvent {
                event: Some(stage_event::Event::Result(r)),
            }) => result = Some(r),
            Ok(_) => {}
            Err(s) => return Err((retryable(&s), anyhow!(agents::status_text(&node.id, &s)))),
        }
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    result.ok_or_else(|| {
        (
            true,
            anyhow!(
                "node '{}': the staging stream ended without a result",
                node.id
            ),
        )
    })
}

/// Picks the next node: the one a previous coordinator left mid-way, else the least busy.
async fn next_node<'a>(
    ctx: &'a Ctx,
    steps: &[StepRecord],
    remaining: &[&'a Node],
) -> Result<(&'a Node, String)> {
    let ids: Vec<&str> = remaining.iter().map(|n| n.id.as_str()).collect();
    if let Some(first) = decide::finish_first(steps, &ids)
        && let Some(n) = remaining.iter().find(|n| n.id == first)
    {
        return Ok((
            n,
            format!(
                "{}: the previous coordinator stopped or halted on it; finished first",
                n.id
            ),
        ));
    }
    let view = ctx.cluster_view().await?;
    let mut busy = Vec::new();
    for n in remaining {
        let z = ctx.row(&view, n).row();
        busy.push(Busyness {
            id: n.id.clone(),
            tasks_total: z.map(|z| z.tasks()).unwrap_or(0),
            active_user_count: z.map(|z| z.users()).unwrap_or(0),
            cpu_percent: ctx.cpu(n).await,
        });
    }
    let ranked = plan::rank_least_busy(busy);
    let first = ranked.first().context("no node left to pick")?;
    let node = remaining
        .iter()
        .find(|n| n.id == first.id)
        .context("ranked an unknown node")?;
    let why = format!(
        "{}: least busy of {} ({})",
        node.id,
        ranked.len(),
        ranked
            .iter()
            .map(|b| format!(
                "{} tasks={} users={} cpu={:.0}%",
                b.id, b.tasks_total, b.active_user_count, b.cpu_percent
            ))
            .collect::<Vec<_>>()
            .join("; ")
    );
    Ok((node, why))
}

/// One node, out and back: returns the time it was out of service. The next step comes from
/// [`decide::next_node_step`] over the node's history, read once from the journal and kept up to
/// date here.
async fn upgrade_node(
    ctx: &Ctx,
    run: RunId,
    node: &Node,
    opts: &RunOptions,
) -> Result<Duration, NodeFailure> {
    let id = node.id.as_str();
    // A journal that cannot be read: every step is done again (the agent replays what completed).
    let mut h = ctx
        .journal
        .steps(run)
        .map(|steps| NodeHistory::from_journal(&steps, id))
        .unwrap_or_default();
    let fail = |error: anyhow::Error, stopped: bool, h: &NodeHistory| {
        // A step that could not even begin did nothing: what counts is whether a stop was asked.
        let stopped = if error.downcast_ref::<PreStepError>().is_some() {
            match ctx.out_node() {
                Some((n, stopping)) if n == id => stopping,
                // Not taken out by this process (a resumed run): the journal says.
                _ => h.done(Step::Stop) || h.begun(Step::Stop),
            }
        } else {
            stopped
        };
        NodeFailure {
            node: node.id.clone(),
            error,
            stopped,
            history: h.clone(),
        }
    };
    if h.done(Step::Drain) {
        // Taken out by an earlier coordinator: this one must know it to put the node back.
        ctx.mark_out(id, h.begun(Step::Stop));
    }
    let out_since = Instant::now();
    let mut out_of_service = Duration::ZERO;
    while let Some(step) = decide::next_node_step(&h) {
        if step == Step::Drain {
            ctx.check_lock().map_err(|e| fail(e, false, &h))?;
        }
        h.begin(step);
        node_step(ctx, run, node, opts, step, &h)
            .await
            // A stop that failed or went unanswered may still be under way: keep the node out.
            .map_err(|e| fail(e, decide::stop_asked_by(step), &h))?;
        h.completed(step);
        match step {
            Step::Drain => ctx.mark_out(id, false),
            Step::Enable => {
                ctx.mark_in();
                out_of_service = out_since.elapsed();
            }
            _ => {}
        }
    }
    Ok(out_of_service)
}

/// Carries out one step of a node's out-and-back, journaled.
async fn node_step(
    ctx: &Ctx,
    run: RunId,
    node: &Node,
    opts: &RunOptions,
    step: Step,
    h: &NodeHistory,
) -> Result<()> {
    let t = &opts.timeouts;
    let id = node.id.as_str();
    let op = h.op_id(run, id, step);
    ctx.step(run, Some(id), step, async {
        let detail = match step {
            Step::Drain => {
                // Marked out before the drain: a failing journal cannot hide the node.
                ctx.mark_out(id, false);
                let r = ctx
                    .lb
                    .drain(&node.lb_server, Duration::from_secs(t.drain_secs))
                    .await?;
                format!(
                    "{} sessions drained in {:.1}s",
                    r.sessions_at_start,
                    r.waited.as_secs_f64()
                )
            }
            Step::Stop => {
                ctx.mark_out(id, true);
                stop_node(ctx, node, op, t.stop_secs).await?
            }
            Step::WaitOffline => {
                let d = Duration::from_secs(t.stop_secs);
                wait_zdu(ctx, node, NodeState::Offline, None, d).await?
            }
            Step::Activate => activate_node(ctx, node, op, &opts.to).await?,
            Step::Start => start_node(ctx, node, op, t.start_secs).await?,
            Step::WaitActive => {
                let d = Duration::from_secs(t.active_secs);
                wait_zdu(ctx, node, NodeState::Active, Some(&opts.to), d).await?
            }
            Step::Enable => {
                ctx.lb.enable(&node.lb_server).await?;
                format!("back in {}", ctx.lb.describe())
            }
            Step::Soak => {
                soak(ctx, node, &opts.to, Duration::from_secs(t.soak_secs)).await?;
                format!("healthy for {}s", t.soak_secs)
            }
            other => bail!("'{other}' is not a step of a node's upgrade"),
        };
        Ok(((), detail))
    })
    .await
}

async fn stop_node(ctx: &Ctx, node: &Node, op: String, stop_secs: u64) -> Result<String> {
    let d = Duration::from_secs(stop_secs);
    let r = agent_op(ctx, node, d, |mut c| {
        let req = agents::request(
            StopRequest {
                operation_id: op.clone(),
                timeout_secs: stop_secs as u32,
                kill_after_timeout: false,
            },
            d,
        );
        async move { c.stop(req).await }
    })
    .await?;
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
    let r = agent_op(ctx, node, d, |mut c| {
        let req = agents::request(
            StartRequest {
                operation_id: op.clone(),
                timeout_secs: start_secs as u32,
            },
            d,
        );
        async move { c.start(req).await }
    })
    .await?;
    if let Some(why) = plan::start_failure(&r.state) {
        bail!("node '{}': {why}", node.id);
    }
    Ok(format!(
        "{} on {} after {} ms",
        r.state, r.version, r.duration_ms
    ))
}

/// Watches a rejoined node for a while: it must stay ACTIVE on the new version.
async fn soak(ctx: &Ctx, node: &Node, version: &str, dur: Duration) -> Result<()> {
    let until = Instant::now() + dur;
    while Instant::now() < until {
        tokio::time::sleep(
            Duration::from_millis(500).min(until.saturating_duration_since(Instant::now())),
        )
        .await;
        if let Ok(view) = ctx.zdu.cluster().await {
            match ctx.row(&view, node) {
                Match::Row(z) if z.state == NodeState::Active && z.runs(version) => {}
                Match::Row(z) => bail!(
                    "node '{}' left ACTIVE while soaking: now {} on {}",
                    node.id,
                    z.state,
                    z.version_or_dash()
                ),
                Match::Missing(why) | Match::Ambiguous(why) => bail!(
                    "node '{}' cannot be found in the cluster view while soaking: {why}",
                    node.id
                ),
            }
        }
    }
    Ok(())
}

/// After a node failed: what [`decide::on_failure`] says — back in if it was never stopped, else
/// kept out and stopped gracefully, then rolled back (only if its new install was activated) or
/// started on what it has, as the policy says; upgrade mode is cancelled when no node runs the
/// new version. Returns notes for the report.
async fn handle_failure(ctx: &Ctx, run: RunId, f: &NodeFailure, opts: &RunOptions) -> Vec<String> {
    let mut notes = Vec::new();
    let Ok(node) = ctx.cluster.node(&f.node) else {
        return notes;
    };
    let id = node.id.as_str();
    let mut h = f.history.clone();
    let facts = decide::FailedNode {
        stop_asked: f.stopped,
        stop_done: h.done(Step::Stop),
        active_version: ctx.node_info(node).await.ok().map(|i| i.active_version),
        activate_begun: h.begun(Step::Activate),
        to: opts.to.clone(),
        auto_rollback: opts.auto_rollback,
    };
    match decide::on_failure(&facts) {
        FailurePlan::PutBack => put_back_failed(ctx, run, node, &mut notes).await,
        FailurePlan::KeepOut {
            stop_again,
            recover,
        } => {
            keep_out_failed(ctx, run, node, opts, stop_again, &mut h, &mut notes).await;
            recover_failed(ctx, run, node, opts, recover, &mut h, &mut notes).await;
        }
    }
    cancel_if_nothing_upgraded(ctx, run, &opts.to, &mut notes).await;
    // A resume starts this node over, with fresh operation ids.
    let _ = ctx
        .step(run, Some(id), Step::FailureHandled, async {
            Ok(((), "a resume starts this node over".to_string()))
        })
        .await;
    notes
}

/// A failed node that was never stopped goes back as it was (journaled, so the journal shows it).
async fn put_back_failed(ctx: &Ctx, run: RunId, node: &Node, notes: &mut Vec<String>) {
    let id = &node.id;
    match ctx
        .put_back(run, node, "put back: it was never stopped")
        .await
    {
        Ok(()) => notes.push(format!(
            "node '{id}' was not stopped and is back in the load balancer"
        )),
        Err(e) => notes.push(format!(
            "node '{id}' was not stopped but could not be put back in the load balancer: {e}"
        )),
    }
}

/// Keeps a failed node out of the load balancer (it may have rejoined before failing) and stops it
/// gracefully; the notes say what did not work.
async fn keep_out_failed(
    ctx: &Ctx,
    run: RunId,
    node: &Node,
    opts: &RunOptions,
    stop_again: bool,
    h: &mut NodeHistory,
    notes: &mut Vec<String>,
) {
    let id = node.id.as_str();
    let drain = Duration::from_secs(opts.timeouts.drain_secs);
    let out = ctx
        .step(run, Some(id), Step::Disable, async {
            ctx.lb.drain(&node.lb_server, drain).await?;
            Ok(((), "kept out of the load balancer".to_string()))
        })
        .await;
    if let Err(e) = &out {
        notes.push(format!(
            "node '{id}' could not be taken out of the load balancer after its failure: {e:#}"
        ));
    }
    let stopped = if stop_again {
        let op = h.op_id(run, id, Step::StopFailed);
        let r = ctx
            .step(run, Some(id), Step::StopFailed, async {
                let r = stop_node(ctx, node, op, opts.timeouts.stop_secs).await?;
                Ok(((), format!("stopped gracefully ({r})")))
            })
            .await;
        if r.is_ok() {
            h.completed(Step::StopFailed);
        }
        r
    } else {
        // Its own stop is what failed: asking again would only wait out the same deadline.
        Err(anyhow!(
            "its stop did not complete, so it may still be going down"
        ))
    };
    if let Err(e) = &stopped {
        notes.push(format!(
            "node '{id}' could not be stopped after its failure: {e:#}"
        ));
    }
    if !opts.auto_rollback {
        notes.push(format!(
            "node '{id}' is {} the load balancer; fix it and run `bbupgrade resume`, or run `bbupgrade rollback`",
            match (stopped.is_ok(), out.is_ok()) {
                (true, true) => "stopped and out of",
                (false, true) => "kept out of",
                (true, false) => "stopped but may still be in",
                (false, false) => "neither surely stopped nor surely out of",
            }
        ));
    }
}

/// Brings a failed, stopped node back as the policy says.
async fn recover_failed(
    ctx: &Ctx,
    run: RunId,
    node: &Node,
    opts: &RunOptions,
    recover: Recovery,
    h: &mut NodeHistory,
    notes: &mut Vec<String>,
) {
    let id = &node.id;
    match recover {
        Recovery::LeaveStopped => {}
        Recovery::RollBack => match rollback_node(ctx, run, node, &opts.from, opts).await {
            Ok(_) => notes.push(format!(
                "node '{id}' was rolled back to {} and is serving",
                opts.from
            )),
            Err(e) => notes.push(format!("rolling node '{id}' back failed: {e:#}")),
        },
        Recovery::StartAsIs => match restart_as_is(ctx, run, node, opts, h).await {
            Ok(()) => notes.push(format!(
                "node '{id}' failed before its new install was activated: started again on {} and serving (nothing to roll back)",
                opts.from
            )),
            Err(e) => notes.push(format!(
                "node '{id}' failed before its new install was activated; starting it again on {} failed: {e:#}",
                opts.from
            )),
        },
    }
}

/// Starts a node that never left its install, waits for it ACTIVE on the run's from-version, and
/// puts it back in the load balancer.
async fn restart_as_is(
    ctx: &Ctx,
    run: RunId,
    node: &Node,
    opts: &RunOptions,
    h: &mut NodeHistory,
) -> Result<()> {
    let t = &opts.timeouts;
    let id = node.id.as_str();
    let op = h.op_id(run, id, Step::Start);
    ctx.step(run, Some(id), Step::Start, async {
        Ok(((), start_node(ctx, node, op, t.start_secs).await?))
    })
    .await?;
    h.completed(Step::Start);
    ctx.step(run, Some(id), Step::WaitActive, async {
        let d = Duration::from_secs(t.active_secs);
        Ok((
            (),
            wait_zdu(ctx, node, NodeState::Active, Some(&opts.from), d).await?,
        ))
    })
    .await?;
    ctx.put_back(run, node, "back in on the version it ran")
        .await
}

async fn cancel_if_nothing_upgraded(
    ctx: &Ctx,
    run: RunId,
    new_version: &str,
    notes: &mut Vec<String>,
) {
    let Ok(view) = ctx.zdu.cluster().await else {
        return;
    };
    if view.upgrade_mode_enabled && !view.any_live_runs(new_version) {
        let r = ctx
            .step(run, None, Step::CancelUpgradeMode, async {
                ctx.zdu.cancel().await?;
                Ok((
                    (),
                    "no node runs the new version; upgrade mode cancelled".to_string(),
                ))
            })
            .await;
        match r {
            Ok(()) => notes.push("upgrade mode cancelled: no node runs the new version".into()),
            Err(e) => notes.push(format!("could not cancel upgrade mode: {e:#}")),
        }
    }
}

/// Returns one node to `version` with the same discipline: out, roll back, ACTIVE, back in.
async fn rollback_node(
    ctx: &Ctx,
    run: RunId,
    node: &Node,
    version: &str,
    opts: &RunOptions,
) -> Result<Duration> {
    let t = &opts.timeouts;
    let id = node.id.as_str();
    let since = Instant::now();
    ctx.step(run, Some(id), Step::Drain, async {
        let r = ctx
            .lb
            .drain(&node.lb_server, Duration::from_secs(t.drain_secs))
            .await?;
        Ok(((), format!("{} sessions drained", r.sessions_at_start)))
    })
    .await?;
    ctx.step(run, Some(id), Step::Rollback, async {
        let d = Duration::from_secs(t.stop_secs + t.start_secs);
        let r = agent_op(ctx, node, d, |mut c| {
            let req = agents::request(
                RollbackRequest {
                    operation_id: next_op_id(ctx, run, id, Step::Rollback),
                    stop_timeout_secs: t.stop_secs as u32,
                    start_timeout_secs: t.start_secs as u32,
                    no_start: false,
                },
                d,
            );
            async move { c.rollback(req).await }
        })
        .await?;
        Ok((
            (),
            format!("{} {} at {}", r.state, r.version, r.install_path),
        ))
    })
    .await?;
    ctx.step(run, Some(id), Step::WaitActive, async {
        Ok((
            (),
            wait_zdu(
                ctx,
                node,
                NodeState::Active,
                Some(version),
                Duration::from_secs(t.active_secs),
            )
            .await?,
        ))
    })
    .await?;
    ctx.step(run, Some(id), Step::Enable, async {
        ctx.lb.enable(&node.lb_server).await?;
        Ok(((), "back in the load balancer".to_string()))
    })
    .await?;
    Ok(since.elapsed())
}

fn base_summary(ctx: &Ctx, run: RunId, opts: &RunOptions) -> Summary {
    Summary {
        cluster: ctx.cluster.name.clone(),
        from: opts.from.clone(),
        to: opts.to.clone(),
        run_id: Some(run.0),
        ..Default::default()
    }
}

async fn versions_now(ctx: &Ctx) -> HashMap<String, String> {
    let mut out = HashMap::new();
    for n in &ctx.cluster.nodes {
        if let Ok(info) = ctx.node_info(n).await {
            out.insert(n.id.clone(), info.active_version);
        }
    }
    out
}

fn finish(
    ctx: &Ctx,
    run: RunId,
    mut s: Summary,
    before: &HashMap<String, String>,
    after: &HashMap<String, String>,
    oos: &HashMap<String, u64>,
) -> Summary {
    s.nodes = ctx
        .cluster
        .nodes
        .iter()
        .map(|n| NodeSummary {
            id: n.id.clone(),
            version_before: before.get(&n.id).cloned().unwrap_or_default(),
            version_after: after.get(&n.id).cloned().unwrap_or_default(),
            out_of_service_ms: oos.get(&n.id).copied().unwrap_or(0),
        })
        .collect();
    s.duration_ms = ctx.reporter.elapsed_ms();
    if let Err(e) = ctx.journal.finish_run(run, s.result, s.error.as_deref()) {
        s.notes.push(format!(
            "could not record the run's end in the journal: {e}"
        ));
    }
    s
}

/// Upgrade (or continue upgrading) a cluster.
pub async fn drive(ctx: &Ctx, run: RunId, opts: &RunOptions) -> Summary {
    let mut s = base_summary(ctx, run, opts);
    let before = versions_now(ctx).await;
    let mut oos = HashMap::new();
    let outcome = drive_inner(ctx, run, opts, &mut s, &mut oos).await;
    match outcome {
        Ok(()) => s.result = RunResult::Upgraded,
        Err(DriveError::Node(f)) => {
            s.error = Some(format!("node '{}' failed: {:#}", f.node, f.error));
            s.notes.extend(handle_failure(ctx, run, &f, opts).await);
            let view = ctx.zdu.cluster().await.ok();
            let any_new = view.as_ref().is_some_and(|v| v.any_live_runs(&opts.to));
            s.result = if opts.auto_rollback && !any_new {
                RunResult::RolledBack
            } else {
                RunResult::Halted
            };
        }
        Err(DriveError::Other(e)) => {
            s.error = Some(format!("{e:#}"));
            s.result = RunResult::Halted;
            // A node taken out but never asked to stop goes back in, journal or no journal.
            if let Some((out, false)) = ctx.out_node()
                && let Ok(node) = ctx.cluster.node(&out)
            {
                match ctx
                    .put_back(run, node, "put back: the run halted before its stop")
                    .await
                {
                    Ok(()) => s.notes.push(format!(
                        "node '{out}' was not stopped and is back in the load balancer"
                    )),
                    Err(e) => s.notes.push(format!(
                        "node '{out}' could not be put back in the load balancer: {e:#}"
                    )),
                }
            }
            if !ctx
                .journal
                .steps(run)
                .map(|st| decide::any_stop(&st))
                .unwrap_or(true)
            {
                cancel_if_nothing_upgraded(ctx, run, &opts.to, &mut s.notes).await;
            }
        }
    }
    let after = versions_now(ctx).await;
    finish(ctx, run, s, &before, &after, &oos)
}

enum DriveError {
    Node(Box<NodeFailure>),
    Other(anyhow::Error),
}

impl From<crate::journal::JournalError> for DriveError {
    fn from(e: crate::journal::JournalError) -> Self {
        DriveError::Other(e.into())
    }
}

impl From<anyhow::Error> for DriveError {
    fn from(e: anyhow::Error) -> Self {
        DriveError::Other(e)
    }
}

async fn drive_inner(
    ctx: &Ctx,
    run: RunId,
    opts: &RunOptions,
    s: &mut Summary,
    oos: &mut HashMap<String, u64>,
) -> Result<(), DriveError> {
    let view = ctx.cluster_view().await?;
    let finalized = view.state == ClusterState::Stable
        && !view.upgrade_mode_enabled
        && view.all_live_run(&opts.to);
    if !finalized {
        stage_all(ctx, run, opts).await?;
        if !view.upgrade_mode_enabled {
            ctx.step(run, None, Step::UpgradeMode, async {
                ctx.zdu.start().await?;
                Ok(((), "upgrade mode enabled".to_string()))
            })
            .await?;
        }
        // Previously finished nodes keep their order in the report.
        for n in decide::finished_nodes(&ctx.journal.steps(run)?) {
            if !s.order.contains(&n) {
                s.order.push(n);
            }
        }
        loop {
            let view = ctx.cluster_view().await?;
            let steps = ctx.journal.steps(run)?;
            let mut remaining = Vec::new();
            for n in &ctx.cluster.nodes {
                let agent_version = ctx.node_info(n).await.map(|i| i.active_version).ok();
                let upgraded = plan::node_upgraded(
                    agent_version.as_deref(),
                    ctx.row(&view, n).row(),
                    &opts.to,
                );
                if !upgraded || decide::node_step_open(&steps, &n.id) {
                    remaining.push(n);
                }
            }
            if remaining.is_empty() {
                break;
            }
            ctx.check_lock()?;
            let (node, why) = next_node(ctx, &steps, &remaining).await?;
            s.order_reasons.push(why.clone());
            ctx.reporter.step(Some(&node.id), "pick", "info", &why);
            let node_step = ctx.journal.begin_step(
                run,
                Some(&node.id),
                Step::Node.as_str(),
                &format!("upgrade to {}", opts.to),
            )?;
            match upgrade_node(ctx, run, node, opts).await {
                Ok(d) => {
                    ctx.journal.end_step(
                        node_step,
                        StepOutcome::Ok,
                        &format!("out of service {} ms", d.as_millis()),
                    )?;
                    oos.insert(node.id.clone(), d.as_millis() as u64);
                    s.order.push(node.id.clone());
                    if let Some(note) = crate::skew::after_rejoin(ctx, run, node, opts).await {
                        s.notes.push(note);
                    }
                }
                Err(f) => {
                    ctx.journal.end_step(
                        node_step,
                        StepOutcome::Failed(format!("{:#}", f.error)),
                        "",
                    )?;
                    s.order.push(node.id.clone());
                    return Err(DriveError::Node(Box::new(f)));
                }
            }
        }
        ctx.step(run, None, Step::Approve, async {
            let v = ctx.cluster_view().await?;
            if v.state != ClusterState::Stable || v.upgrade_mode_enabled {
                ctx.zdu.approve().await?;
            }
            let started = Instant::now();
            loop {
                let v = ctx.cluster_view().await?;
                if v.state == ClusterState::Stable && !v.upgrade_mode_enabled {
                    break;
                }
                if v.state == ClusterState::UpgradeTasksFailed {
                    bail!("Bitbucket's upgrade tasks failed (UPGRADE_TASKS_FAILED); check the Bitbucket log, then POST /rest/zdu/retryUpgrade or contact support");
                }
                if started.elapsed() > Duration::from_secs(FINALIZE_TIMEOUT_SECS) {
                    bail!("the cluster did not become STABLE within {FINALIZE_TIMEOUT_SECS}s after approval (now {})", v.state);
                }
                tokio::time::sleep(Duration::from_millis(POLL_INTERVAL_MS)).await;
            }
            Ok(((), format!("cluster STABLE on {}", opts.to)))
        })
        .await?;
    }
    Ok(())
}

/// Returns every node not on the original version to it, one at a time, then cancels upgrade mode.
pub async fn drive_rollback(ctx: &Ctx, run: RunId, opts: &RunOptions) -> Summary {
    let mut s = base_summary(ctx, run, opts);
    let before = versions_now(ctx).await;
    let mut oos = HashMap::new();
    let result: Result<()> = async {
        for node in &ctx.cluster.nodes {
            let info = ctx.node_info(node).await?;
            if info.active_version == opts.to {
                continue;
            }
            let d = rollback_node(ctx, run, node, &opts.to, opts).await?;
            oos.insert(node.id.clone(), d.as_millis() as u64);
            s.order.push(node.id.clone());
        }
        let view = ctx.cluster_view().await?;
        if view.upgrade_mode_enabled {
            ctx.step(run, None, Step::CancelUpgradeMode, async {
                ctx.zdu.cancel().await?;
                Ok(((), format!("cluster back on {}", opts.to)))
            })
            .await?;
        }
        Ok(())
    }
    .await;
    match result {
        Ok(()) => s.result = RunResult::RolledBack,
        Err(e) => {
            s.result = RunResult::Halted;
            s.error = Some(format!("{e:#}"));
        }
    }
    let after = versions_now(ctx).await;
    finish(ctx, run, s, &before, &after, &oos)
}
