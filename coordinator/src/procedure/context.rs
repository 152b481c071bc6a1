//! The real cluster a run works on: inventory, agents over mutual TLS, Bitbucket's API, the load
//! balancer, the journal and the reporter, and the cluster lock kept fresh while a run lasts.

use super::Step;
use super::decide::NodeHistory;
use super::drive::RunJournal;
use super::run_journal::JournalOnThread;
use crate::agents::{self, Client};
use crate::error::BadInput;
use crate::inventory::{Cluster, Node, Timeouts};
use crate::journal::{ClusterLock, Journal, RunId, StepOutcome};
use crate::loadbalancer::{self, LoadBalancer};
use crate::node_match::{self, Match, NodeKey};
use crate::plan::ObservedNode;
use crate::report::Reporter;
use crate::zdu::ClusterView;
use crate::zdu_pool::ZduPool;
use anyhow::{Context, Result, anyhow};
use bbupgrade_common::proto::{LoadMetricsRequest, NodeInfoRequest, NodeInfoResponse};
use bbupgrade_common::tls::TlsMaterial;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Mutex;

pub const ZDU_REQUEST_TIMEOUT_SECS: u64 = 10;
pub const NODE_INFO_TIMEOUT_SECS: u64 = 10;
/// How often a running coordinator refreshes its cluster lock.
pub const LOCK_HEARTBEAT_INTERVAL_SECS: u64 = 2;

/// Everything a driver needs for one cluster.
pub struct Ctx {
    pub cluster: Cluster,
    pub tls: TlsMaterial,
    pub zdu: ZduPool,
    /// How each node (by inventory id) is recognised in Bitbucket's cluster view.
    keys: HashMap<String, NodeKey>,
    pub lb: Box<dyn LoadBalancer>,
    pub journal: Arc<Journal>,
    pub reporter: Reporter,
    pub timeouts: Timeouts,
    clients: Mutex<HashMap<String, Client>>,
    /// Set when the cluster lock's heartbeat finds the lock gone: no further step begins.
    pub lock_lost: Arc<std::sync::atomic::AtomicBool>,
}

impl Ctx {
    pub fn new(
        cluster: Cluster,
        tls: TlsMaterial,
        journal: Arc<Journal>,
        reporter: Reporter,
    ) -> Result<Self> {
        let zdu = ZduPool::for_cluster(&cluster, Duration::from_secs(ZDU_REQUEST_TIMEOUT_SECS))
            .map_err(BadInput)?;
        let keys = cluster
            .nodes
            .iter()
            .map(|n| (n.id.clone(), n.bitbucket_key()))
            .collect();
        let lb = loadbalancer::from_config_with_tls(&cluster.load_balancer, Some(&tls))
            .map_err(|e| BadInput(format!("cluster '{}': load balancer: {e}", cluster.name)))?;
        Ok(Self {
            timeouts: cluster.timeouts.clone(),
            cluster,
            tls,
            zdu,
            keys,
            lb,
            journal,
            reporter,
            clients: Mutex::new(HashMap::new()),
            lock_lost: Arc::new(std::sync::atomic::AtomicBool::new(false)),
        })
    }

    /// How `node` is recognised in Bitbucket's cluster view.
    pub fn key(&self, node: &Node) -> NodeKey {
        self.keys
            .get(&node.id)
            .cloned()
            .unwrap_or_else(|| node.bitbucket_key())
    }

    /// How every node (by inventory id) is recognised in Bitbucket's cluster view.
    pub fn keys(&self) -> &HashMap<String, NodeKey> {
        &self.keys
    }

    /// The row of `node` in `view`: followed by name or address, never by an id seen before.
    pub fn row<'a>(&self, view: &'a ClusterView, node: &Node) -> Match<'a> {
        node_match::match_node(view, &self.key(node))
    }

    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.timeouts.agent_connect_ms)
    }

    /// A connected client for a node's agent (cached; dropped on transport errors).
    pub async fn client(&self, node: &Node) -> Result<Client> {
        if let Some(c) = self.clients.lock().await.get(&node.id) {
            return Ok(c.clone());
        }
        let c = agents::connect(node, &self.tls, self.connect_timeout()).await?;
        self.clients.lock().await.insert(node.id.clone(), c.clone());
        Ok(c)
    }

    pub async fn forget_client(&self, node: &Node) {
        self.clients.lock().await.remove(&node.id);
    }

    pub async fn node_info(&self, node: &Node) -> Result<NodeInfoResponse> {
        let mut c = self.client(node).await?;
        let d = Duration::from_secs(NODE_INFO_TIMEOUT_SECS);
        let r = agents::call(
            &node.id,
            d,
            c.node_info(agents::request(NodeInfoRequest {}, d)),
        )
        .await;
        match &r {
            Ok(info) => self
                .reporter
                .learn_paths(&info.install_root, &info.bitbucket_home),
            Err(_) => self.forget_client(node).await,
        }
        r
    }

    /// What every node looks like now, agents and load balancer (in parallel).
    pub async fn observe(&self) -> Vec<ObservedNode> {
        futures::future::join_all(self.cluster.nodes.iter().map(|node| async move {
            let mut o = ObservedNode {
                id: node.id.clone(),
                bitbucket: self.key(node),
                ..Default::default()
            };
            match self.node_info(node).await {
                Ok(info) => {
                    o.active_version = Some(info.active_version.clone());
                    o.staged_versions = info.installed.iter().map(|i| i.version.clone()).collect();
                    o.install_root_free_bytes = info.install_root_free_bytes;
                    o.cpu_percent = self.cpu(node).await;
                }
                Err(e) => o.agent_error = Some(format!("{e:#}")),
            }
            if let Err(e) = self.lb.check_server(&node.lb_server).await {
                o.lb_error = Some(e.to_string());
            }
            o
        }))
        .await
    }

    pub async fn cpu(&self, node: &Node) -> f32 {
        let Ok(mut c) = self.client(node).await else {
            return 0.0;
        };
        let d = Duration::from_secs(NODE_INFO_TIMEOUT_SECS);
        agents::call(
            &node.id,
            d,
            c.load_metrics(agents::request(LoadMetricsRequest {}, d)),
        )
        .await
        .map(|s| s.cpu_percent)
        .unwrap_or(0.0)
    }

    pub async fn cluster_view(&self) -> Result<ClusterView> {
        self.zdu.cluster().await.with_context(|| {
            format!(
                "asking Bitbucket at {} for the cluster state",
                self.cluster.bitbucket_url
            )
        })
    }

    /// Records a step around `work`; the journal gets its start, end and result, on a blocking
    /// thread (never on the async executor).
    pub async fn step<T, F>(&self, run: RunId, node: Option<&str>, step: Step, work: F) -> Result<T>
    where
        F: std::future::Future<Output = Result<(T, String)>>,
    {
        let j = JournalOnThread::new(self.journal.clone(), run);
        let id = super::drive::begin_step(&j, node, step).await?;
        let name = step.as_str();
        self.reporter.step(node, name, "begin", "");
        match work.await {
            Ok((v, detail)) => {
                self.record_end(&j, id, step, StepOutcome::Ok, &detail)
                    .await;
                self.reporter.step(node, name, "ok", &detail);
                Ok(v)
            }
            Err(e) => {
                let text = format!("{e:#}");
                self.record_end(&j, id, step, StepOutcome::Failed(text.clone()), "")
                    .await;
                self.reporter.step(node, name, "failed", &text);
                Err(e)
            }
        }
    }

    /// Records a step's end; the work is done either way, so a journal that cannot take it (after
    /// one retry, which reconnects a dropped database) is reported, not made the step's failure.
    /// Resuming repeats such a step through its operation id, which the agent replays.
    async fn record_end(
        &self,
        j: &JournalOnThread,
        id: crate::journal::StepId,
        step: Step,
        outcome: StepOutcome,
        detail: &str,
    ) {
        if j.end_step(id, outcome.clone(), detail).await.is_ok() {
            return;
        }
        if let Err(e) = j.end_step(id, outcome, detail).await {
            tracing::error!(%step, error = %e, "could not record the end of a step in the journal");
            self.reporter.step(
                None,
                step.as_str(),
                "info",
                &format!("the journal did not take this step's end: {e:#}"),
            );
        }
    }

    /// Whether this run's journal has `step` of `node` completed (since its last handled failure).
    pub async fn step_done(&self, run: RunId, node: &str, step: Step) -> Result<bool> {
        let steps = JournalOnThread::new(self.journal.clone(), run)
            .steps()
            .await?;
        Ok(NodeHistory::from_journal(&steps, node).done(step))
    }
}

/// Who runs this coordinator: `user@host:pid`, recorded with runs and the cluster lock.
pub fn actor() -> String {
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "unknown".into());
    let host = nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_default();
    format!("{user}@{host}:{}", std::process::id())
}

/// Takes the cluster's lock and keeps it fresh while the run lasts.
pub fn lock_cluster(
    ctx: &Ctx,
) -> Result<(
    Arc<std::sync::Mutex<ClusterLock>>,
    tokio::task::JoinHandle<()>,
)> {
    let lock = ctx
        .journal
        .acquire_lock(&ctx.cluster.name, &actor())
        .map_err(|e| anyhow!("{e}"))?;
    let lock = Arc::new(std::sync::Mutex::new(lock));
    let beat = lock.clone();
    let lost = ctx.lock_lost.clone();
    let task = tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(LOCK_HEARTBEAT_INTERVAL_SECS)).await;
            let beat = beat.clone();
            let r = tokio::task::spawn_blocking(move || {
                beat.lock().unwrap_or_else(|p| p.into_inner()).heartbeat()
            })
            .await;
            match r {
                Ok(Err(e @ crate::journal::JournalError::LockLost { .. })) => {
                    tracing::error!(error = %e, "the cluster lock is lost; the run stops at the next step");
                    lost.store(true, std::sync::atomic::Ordering::SeqCst);
                    break;
                }
                Ok(Err(e)) => tracing::warn!(error = %e, "could not refresh the cluster lock"),
                _ => {}
            }
        }
    });
    Ok((lock, task))
}
