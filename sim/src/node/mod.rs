//! `bitbucket-sim node`: one simulated Bitbucket Data Center node, from startup (binding its port at
//! once, answering `STARTING`) through joining the cluster to a graceful stop on SIGTERM.

mod api;
pub mod auth;
pub mod settings;
pub mod ssh;
pub mod traffic;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};

use crate::membership::{SharedHome, now_ms};
use crate::properties;
use crate::zdu::{ClusterRecord, JoinDecision, NodeRecord, NodeState};
use settings::{Knobs, NodeConfig};
use traffic::Traffic;

/// How long the server may take to close connections once in-flight work is done.
const SERVER_CLOSE_SECS: u64 = 3;

/// The node's health as `/status` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    Starting,
    Running,
    /// Could not start or join; the reason is logged and shown by `/sim/info`.
    Error(String),
    Stopping,
    /// Pointed at a home with no Bitbucket data: the setup wizard.
    FirstRun,
}

impl Health {
    pub fn name(&self) -> &'static str {
        match self {
            Health::Starting => "STARTING",
            Health::Running => "RUNNING",
            Health::Error(_) => "ERROR",
            Health::Stopping => "STOPPING",
            Health::FirstRun => "FIRST_RUN",
        }
    }
}

/// Everything the running node shares between its tasks.
pub struct Node {
    pub cfg: NodeConfig,
    pub id: String,
    pub pid: u32,
    pub shared: Option<SharedHome>,
    pub health: RwLock<Health>,
    pub knobs: RwLock<Knobs>,
    pub traffic: Arc<Traffic>,
    pub bundled_search: AtomicBool,
    /// Set once the node has recorded itself `OFFLINE`: nothing may publish after that.
    left: AtomicBool,
    /// Serialises this node's writes to the shared record.
    publish_lock: tokio::sync::Mutex<()>,
}

impl Node {
    pub fn health(&self) -> Health {
        self.health
            .read()
            .map(|h| h.clone())
            .unwrap_or(Health::Error("poisoned".into()))
    }

    fn set_health(&self, h: Health) {
        if let Ok(mut g) = self.health.write() {
            *g = h;
        }
    }

    pub fn knobs(&self) -> Knobs {
        self.knobs.read().map(|k| k.clone()).unwrap_or_default()
    }

    pub fn tasks_total(&self) -> u64 {
        self.traffic.in_flight() + self.knobs().u64_or(settings::BACKGROUND_TASKS, 0)
    }

    pub fn active_users(&self) -> u64 {
        let window = self.knobs().u64_or(settings::ACTIVE_USER_WINDOW_MS, 60_000);
        self.traffic.active_users(Duration::from_millis(window))
    }

    /// The state this node has in the cluster, from its health.
    fn cluster_state(&self) -> NodeState {
        match self.health() {
            Health::Starting | Health::FirstRun => NodeState::Starting,
            Health::Running => NodeState::Active,
            Health::Error(_) => NodeState::Error,
            Health::Stopping if self.traffic.in_flight() > 0 => NodeState::Draining,
            Health::Stopping => NodeState::Terminating,
        }
    }

    /// The cluster (Hazelcast) port: `-Dhazelcast.port`, else the shared `hazelcast.port`, else 5701.
    pub fn hazelcast_port(&self) -> u16 {
        self.cfg.hazelcast_port.unwrap_or_else(|| {
            self.knobs()
                .shared(settings::HAZELCAST_PORT)
                .and_then(|p| p.trim().parse().ok())
                .unwrap_or(settings::DEFAULT_HAZELCAST_PORT)
        })
    }

    fn record(&self, state: NodeState) -> NodeRecord {
        let now = now_ms();
        NodeRecord {
            id: self.id.clone(),
            name: self.cfg.reported_name().to_string(),
            ip_address: self.cfg.address.to_string(),
            http_port: self.cfg.port,
            hazelcast_port: self.hazelcast_port(),
            version: self.cfg.version,
            state,
            heartbeat_ms: now,
            offline_since_ms: (state == NodeState::Offline).then_some(now),
            tasks_total: self.tasks_total(),
            active_user_count: self.active_users(),
            pid: self.pid,
            bundled_search: self.bundled_search.load(Ordering::SeqCst),
        }
    }

    /// Runs `change` on the shared cluster record (off the executor), after writing this node's record.
    pub async fn with_cluster<T: Send + 'static>(
        self: &Arc<Self>,
        change: impl FnOnce(&mut ClusterRecord) -> T + Send + 'static,
    ) -> anyhow::Result<T> {
        let shared = self
            .shared
            .clone()
            .context("this node has no shared home")?;
        let _guard = self.publish_lock.lock().await;
        let liveness = self.knobs().liveness();
        let record = (!self.left.load(Ordering::SeqCst)).then(|| self.record(self.cluster_state()));
        tokio::task::spawn_blocking(move || {
            shared.update(liveness, |rec| {
                if let Some(r) = record {
                    rec.nodes.insert(r.id.clone(), r);
                }
                change(rec)
            })
        })
        .await?
    }

    /// Writes this node's final `OFFLINE` record; later publishing is a no-op.
    async fn leave(self: &Arc<Self>) -> anyhow::Result<()> {
        let Some(shared) = self.shared.clone() else {
            return Ok(());
        };
        let _guard = self.publish_lock.lock().await;
        self.left.store(true, Ordering::SeqCst);
        let record = self.record(NodeState::Offline);
        let liveness = self.knobs().liveness();
        tokio::task::spawn_blocking(move || {
            shared.update(liveness, |rec| {
                rec.nodes.insert(record.id.clone(), record);
            })
        })
        .await?
    }

    /// Re-reads the shared properties (so tests can change knobs while nodes run).
    fn reload_knobs(&self) {
        if let Ok(file) = properties::read(&self.cfg.shared_properties())
            && let Ok(mut k) = self.knobs.write()
        {
            k.set_file(file);
        }
    }
}

/// Entry point of `bitbucket-sim node ARGS...` (the arguments `_start-webapp.sh` passes the "JVM").
pub fn run(args: &[String]) -> anyhow::Result<()> {
    let cfg = NodeConfig::from_args(args, |k| std::env::var(k).ok())?;
    init_logging(&cfg.home)?;
    tracing::info!(node = %cfg.handle(), name = %cfg.reported_name(), version = %cfg.version, port = cfg.port, home = %cfg.home.display(), "starting Bitbucket (simulated)");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    // Bitbucket gives a node a new id every time its process starts (the admin page of a rolling
    // upgrade shows the old id OFFLINE next to the new one).
    let id = uuid::Uuid::new_v4().to_string();
    tracing::info!(%id, "node id for this start");
    let search = search_running(&cfg.home);
    let result = runtime.block_on(serve(cfg, id, search));
    if let Err(e) = &result {
        tracing::error!("{e:#}");
    }
    result
}

fn init_logging(home: &Path) -> anyhow::Result<()> {
    let dir = home.join("log");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join("atlassian-bitbucket.log");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    tracing_subscriber::fmt()
        .with_writer(Mutex::new(file))
        .with_ansi(false)
        .try_init()
        .ok();
    Ok(())
}

fn search_running(home: &Path) -> bool {
    let Ok(pid) = std::fs::read_to_string(home.join("log/search.pid")) else {
        return false;
    };
    let Ok(pid) = pid.trim().parse::<i32>() else {
        return false;
    };
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
}

async fn serve(cfg: NodeConfig, id: String, search: bool) -> anyhow::Result<()> {
    let listener = TcpListener::bind((cfg.address, cfg.port))
        .await
        .with_context(|| {
            format!(
                "binding {}:{} (is another process using the port?)",
                cfg.address, cfg.port
            )
        })?;
    let first_run = !cfg.shared_properties().is_file();
    let node = Arc::new(Node {
        id,
        pid: std::process::id(),
        shared: (!first_run).then(|| SharedHome::new(&cfg.shared_dir())),
        health: RwLock::new(Health::Starting),
        knobs: RwLock::new(Knobs::with_suffixes(cfg.knob_suffixes())),
        traffic: Arc::new(Traffic::default()),
        bundled_search: AtomicBool::new(search),
        left: AtomicBool::new(false),
        publish_lock: tokio::sync::Mutex::new(()),
        cfg,
    });
    node.reload_knobs();
    if node.bundled_search.load(Ordering::SeqCst) {
        tracing::warn!("the bundled search server is running on this node");
    }

    let (close_tx, close_rx) = tokio::sync::oneshot::channel::<()>();
    let app = api::router(Arc::clone(&node));
    let server = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                close_rx.await.ok();
            })
            .await
    });

    let (ssh_stop_tx, ssh_stop_rx) = tokio::sync::watch::channel(false);
    let ssh = node
        .cfg
        .ssh_port
        .map(|port| tokio::spawn(ssh::serve(Arc::clone(&node), port, ssh_stop_rx)));

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let startup = tokio::spawn(start_up(Arc::clone(&node)));
    let heartbeat = tokio::spawn(heartbeat(Arc::clone(&node)));
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    startup.abort();
    tracing::info!("stop requested");
    let ignore_ms = node.knobs().u64_or(settings::STOP_IGNORE_MS, 0);
    if ignore_ms > 0 {
        tracing::warn!(
            ignore_ms,
            "ignoring the stop request for a while (fault knob)"
        );
        tokio::time::sleep(Duration::from_millis(ignore_ms)).await;
    }
    node.set_health(Health::Stopping);
    // The SSH door closes at once (new sessions refused); open sessions count in flight below.
    ssh_stop_tx.send_replace(true);
    if let Some(ssh) = ssh {
        ssh.await.ok();
    }
    if node.shared.is_some()
        && let Err(e) = node.with_cluster(|_| ()).await
    {
        tracing::warn!("could not record the stop in the shared home: {e:#}");
    }
    let grace_ms = node.knobs().u64_or(settings::STOP_GRACE_MS, 60_000);
    let deadline = tokio::time::Instant::now() + Duration::from_millis(grace_ms);
    while node.traffic.in_flight() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if node.traffic.in_flight() > 0 {
        tracing::warn!(
            in_flight = node.traffic.in_flight(),
            "stopping with requests still in flight after the grace period"
        );
    }
    heartbeat.abort();
    if let Err(e) = node.leave().await {
        tracing::warn!("could not record this node OFFLINE in the shared home: {e:#}");
    }
    close_tx.send(()).ok();
    tokio::time::timeout(Duration::from_secs(SERVER_CLOSE_SECS), server)
        .await
        .ok();
    tracing::info!("stopped");
    Ok(())
}

/// Startup: the configured time in `STARTING`, then joining the cluster (or the setup wizard).
async fn start_up(node: Arc<Node>) {
    let knobs = node.knobs();
    let delay = node.cfg.startup_ms + knobs.u64_or(settings::START_SLOW_MS, 0);
    tokio::time::sleep(Duration::from_millis(delay)).await;
    if node.shared.is_none() {
        tracing::warn!(
            "{} does not exist: this home holds no Bitbucket data, so the setup wizard is shown",
            node.cfg.shared_properties().display()
        );
        node.set_health(Health::FirstRun);
        return;
    }
    if knobs.flag(settings::START_ERROR) {
        fail(
            &node,
            "startup failed (fault knob sim.fault.start.error)".into(),
        )
        .await;
        return;
    }
    let version = node.cfg.version;
    let joined = node
        .with_cluster(move |rec| {
            let decision = rec.join(version);
            (decision, rec.version)
        })
        .await;
    match joined {
        Ok((JoinDecision::Active, cluster)) => {
            node.set_health(Health::Running);
            if let Err(e) = node.with_cluster(|_| ()).await {
                tracing::warn!("could not record this node ACTIVE: {e:#}");
            }
            tracing::info!(cluster_version = ?cluster.map(|v| v.to_string()), "joined the cluster; RUNNING");
            let crash_ms = node.knobs().u64_or(settings::CRASH_AFTER_MS, 0);
            if crash_ms > 0 {
                tokio::time::sleep(Duration::from_millis(crash_ms)).await;
                tracing::error!("crashing (fault knob sim.fault.crash.after.ms)");
                nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL).ok();
            }
        }
        Ok((JoinDecision::Refused(reason), _)) => fail(&node, reason).await,
        Err(e) => fail(&node, format!("could not join the cluster: {e:#}")).await,
    }
}

async fn fail(node: &Arc<Node>, reason: String) {
    tracing::error!("{reason}");
    node.set_health(Health::Error(reason));
    if let Err(e) = node.with_cluster(|_| ()).await {
        tracing::warn!("could not record this node in ERROR: {e:#}");
    }
}

/// Keeps this node's record fresh in the shared home and re-reads the knobs.
async fn heartbeat(node: Arc<Node>) {
    loop {
        let local = Arc::clone(&node);
        let checked = tokio::task::spawn_blocking(move || {
            local.reload_knobs();
            if search_running(&local.cfg.home) {
                local.bundled_search.store(true, Ordering::SeqCst);
            }
        })
        .await;
        if let Err(e) = checked {
            tracing::warn!("re-reading the settings failed: {e}");
        }
        if node.shared.is_some()
            && let Err(e) = node.with_cluster(|_| ()).await
        {
            tracing::warn!("heartbeat failed: {e:#}");
        }
        tokio::time::sleep(Duration::from_millis(node.knobs().heartbeat_interval_ms())).await;
    }
}
