//! The agent's gRPC service: each call checks its operation id against the journal, then carries
//! out one node-local step (stage, prepare, stop, activate, start, rollback, cleanup).

use crate::config::{ServiceSettings, Settings};
use crate::journal::OpJournal;
use crate::metrics::{Metrics, read_pid};
use crate::node_state::{NodeState, StateFile, cleanup_candidates, install_version, list_installs};
use crate::{activate, prepare, service, stage};
use bbupgrade_common::echo::{MAX_ERROR_CHARS, truncate};
use bbupgrade_common::proto::agent_server::{Agent, AgentServer};
use bbupgrade_common::proto::*;
use bbupgrade_common::version::Version;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

type EventStream = Pin<Box<dyn Stream<Item = Result<StageEvent, Status>> + Send>>;
type LoadStream = Pin<Box<dyn Stream<Item = Result<LoadSample, Status>> + Send>>;

/// Chunks of an upload buffered between the network and the extractor.
const UPLOAD_CHANNEL_CHUNKS: usize = 16;
const MIN_WATCH_INTERVAL_MS: u32 = 200;

/// Cheap to clone (shared parts behind `Arc`), so an operation can run on its own task.
#[derive(Clone)]
pub struct AgentService {
    settings: Arc<Settings>,
    journal: Arc<OpJournal>,
    state_file: StateFile,
    state: Arc<Mutex<NodeState>>,
    active_install: Arc<RwLock<PathBuf>>,
    service: Arc<dyn service::ServiceManager>,
    metrics: Arc<Metrics>,
    cache: Option<Arc<stage::ArchiveCache>>,
    http: reqwest::Client,
}

fn internal(context: &str, e: impl std::fmt::Display) -> Status {
    Status::internal(truncate(&format!("{context}: {e}"), MAX_ERROR_CHARS).into_owned())
}

/// Longest accepted request fields (the journal, errors and file names quote them).
const MAX_OP_ID_BYTES: usize = 128;
const MAX_VERSION_BYTES: usize = 64;
const MAX_SHA256_BYTES: usize = 64;
const MAX_LB_SERVER_BYTES: usize = 256;
/// A drain holds a blocking thread while it waits.
const MAX_DRAIN_TIMEOUT_SECS: u32 = 86_400;

/// Refuses an over-long request field before anything quotes it.
#[allow(clippy::result_large_err)]
fn check_lengths(fields: &[(&str, &str, usize)]) -> Result<(), Status> {
    for (name, value, max) in fields {
        if value.len() > *max {
            return Err(Status::invalid_argument(format!(
                "{name} is {} bytes long; at most {max} are accepted (it starts '{}')",
                value.len(),
                truncate(value, 32)
            )));
        }
    }
    Ok(())
}

fn blocking_join(e: tokio::task::JoinError) -> Status {
    Status::internal(format!("a blocking task failed: {e}"))
}

/// Stage results as recorded in the journal.
#[derive(Serialize, Deserialize)]
struct StageRecord {
    version: String,
    install_path: String,
    files: u64,
    bytes: u64,
    already_staged: bool,
    from_cache: bool,
}

impl From<StageRecord> for StageResult {
    fn from(r: StageRecord) -> Self {
        StageResult {
            version: r.version,
            install_path: r.install_path,
            files: r.files,
            bytes: r.bytes,
            already_staged: r.already_staged,
            from_cache: r.from_cache,
        }
    }
}

fn stage_status(e: stage::StageError) -> Status {
    let text = truncate(&e.to_string(), MAX_ERROR_CHARS).into_owned();
    if e.is_bad_input() {
        Status::invalid_argument(text)
    } else {
        Status::internal(text)
    }
}

/// Runs an operation on its own task, so it ends (and is journaled) even when the caller goes away
/// mid-call, e.g. a coordinator killed while the node stops. Run inside the request, it would be
/// dropped half-done with its id left "running" until the agent restarts, and the caller's retry
/// refused; detached, the retry gets the recorded result and nothing is done twice.
async fn detached<T: Send + 'static>(
    work: impl std::future::Future<Output = Result<T, Status>> + Send + 'static,
) -> Result<T, Status> {
    tokio::spawn(work)
        .await
        .map_err(|e| Status::internal(format!("the operation's task failed: {e}")))?
}

impl AgentService {
    /// Runs a journaled operation detached from the caller (see [`detached`]).
    async fn run_detached<T, F, Fut>(
        &self,
        op_id: String,
        kind: &'static str,
        work: F,
    ) -> Result<T, Status>
    where
        T: Serialize + serde::de::DeserializeOwned + Send + 'static,
        F: FnOnce(AgentService) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<T, Status>> + Send + 'static,
    {
        let this = self.clone();
        detached(async move {
            let journal = this.journal.clone();
            journal.run(&op_id, kind, work(this)).await
        })
        .await
    }
}

fn check_version(v: &str) -> Result<Version, Status> {
    check_lengths(&[("version", v, MAX_VERSION_BYTES)])?;
    v.parse::<Version>()
        .map_err(|e| Status::invalid_argument(e.to_string()))
}

impl AgentService {
    pub fn new(settings: Settings) -> anyhow::Result<Self> {
        use anyhow::Context;
        std::fs::create_dir_all(&settings.state_dir).with_context(|| {
            format!(
                "creating the state directory {}",
                settings.state_dir.display()
            )
        })?;
        let journal =
            OpJournal::open(&settings.state_dir).context("opening the operation journal")?;
        let removed = stage::clean_leftovers(&settings.install_root).with_context(|| {
            format!("cleaning leftovers in {}", settings.install_root.display())
        })?;
        for r in removed {
            tracing::warn!(path = %r.display(), "removed a staging directory left by an interrupted stage");
        }
        // Backups an older agent left beside the definition, where the service manager sees them.
        let def_path = match &settings.service {
            ServiceSettings::Systemd { unit_path, .. } => Some(unit_path),
            ServiceSettings::Initd { script } => Some(script),
            ServiceSettings::Scripts => None,
        };
        if let Some(path) = def_path {
            match activate::Backups::in_state_dir(&settings.state_dir).migrate_legacy(path) {
                Ok(notes) => notes.iter().for_each(|n| tracing::info!("{n}")),
                Err(e) => tracing::warn!("{e}; activate and rollback will try again"),
            }
        }
        let state_file = StateFile::new(&settings.state_dir);
        let state = state_file
            .load_or(&settings.initial_install)
            .context("reading state.json")?;
        let active_install = Arc::new(RwLock::new(state.active_install.clone()));
        let service = service_manager(&settings, active_install.clone());
        let cache = stage::ArchiveCache::new(
            settings.state_dir.join("archive-cache"),
            settings.cache_max_bytes,
        )
        .context("opening the archive cache")?;
        Ok(Self {
            journal: Arc::new(journal),
            state_file,
            state: Arc::new(Mutex::new(state)),
            active_install,
            service,
            metrics: Arc::new(Metrics::new()),
            cache: Some(Arc::new(cache)),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(3))
                .build()
                .context("building the HTTP client")?,
            settings: Arc::new(settings),
        })
    }

    pub fn into_server(self) -> AgentServer<Self> {
        AgentServer::new(self)
            .max_decoding_message_size(8 << 20)
            .max_encoding_message_size(8 << 20)
    }

    fn node_state(&self) -> NodeState {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set_node_state(&self, new: NodeState) -> Result<(), Status> {
        self.state_file
            .save(&new)
            .map_err(|e| internal("writing state.json", e))?;
        *self
            .active_install
            .write()
            .unwrap_or_else(|p| p.into_inner()) = new.active_install.clone();
        *self.state.lock().unwrap_or_else(|p| p.into_inner()) = new;
        Ok(())
    }

    fn install_path(&self, version: &str) -> PathBuf {
        self.settings.install_root.join(version)
    }

    fn stage_request(&self, version: &str, sha256: &str) -> stage::StageRequest {
        stage::StageRequest {
            version: version.to_string(),
            sha256: sha256.to_string(),
            install_root: self.settings.install_root.clone(),
            limits: stage::StageLimits {
                max_total_bytes: self.settings.max_archive_bytes,
                ..Default::default()
            },
        }
    }

    fn bitbucket_running(&self) -> bool {
        read_pid(&self.settings.pid_file()).is_some_and(pid_alive)
    }

    async fn stop_bitbucket(&self, timeout_secs: u32, kill: bool) -> Result<StopResponse, Status> {
        let started = Instant::now();
        let status_answers = !matches!(
            service::read_status(&self.http, &self.settings.status_url).await,
            service::NodeStatus::Unreachable(_)
        );
        if !self.bitbucket_running() && !status_answers {
            return Ok(StopResponse {
                was_running: false,
                duration_ms: 0,
                killed: false,
            });
        }
        self.service
            .stop()
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        let timeout = Duration::from_secs(u64::from(if timeout_secs == 0 {
            self.settings.stop_timeout_secs
        } else {
            timeout_secs
        }));
        let report = service::wait_stopped(
            &self.settings.pid_file(),
            &self.settings.status_url,
            timeout,
            kill,
        )
        .await
        .map_err(|e| Status::deadline_exceeded(e.to_string()))?;
        Ok(StopResponse {
            was_running: true,
            duration_ms: started.elapsed().as_millis() as u64,
            killed: report.killed,
        })
    }

    /// A rollback whose target is already active: nothing is re-activated; the node is started
    /// (it may have been stopped by a failed upgrade step) unless asked to stay stopped.
    async fn rollback_in_place(
        &self,
        state: &NodeState,
        no_start: bool,
        start_timeout_secs: u32,
    ) -> Result<RollbackRecord, Status> {
        let state_text = if no_start {
            "UNCHANGED".to_string()
        } else {
            self.start_bitbucket(start_timeout_secs).await?.state
        };
        Ok(RollbackRecord {
            install_path: state.active_install.display().to_string(),
            version: install_version(&state.active_install).unwrap_or_default(),
            state: state_text,
        })
    }

    async fn start_bitbucket(&self, timeout_secs: u32) -> Result<StartResponse, Status> {
        let started = Instant::now();
        let version = install_version(&self.node_state().active_install).unwrap_or_default();
        if matches!(
            service::read_status(&self.http, &self.settings.status_url).await,
            service::NodeStatus::Running
        ) && self.bitbucket_running()
        {
            return Ok(StartResponse {
                state: "RUNNING".into(),
                version,
                duration_ms: 0,
            });
        }
        self.service
            .start()
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        let timeout = Duration::from_secs(u64::from(if timeout_secs == 0 {
            self.settings.start_timeout_secs
        } else {
            timeout_secs
        }));
        let state = service::wait_running(
            &self.settings.status_url,
            timeout,
            &self.settings.log_file(),
            Some(&bitbucket_user(&self.settings)),
        )
        .await
        .map_err(|e| Status::failed_precondition(e.to_string()))?;
        Ok(StartResponse {
            state: state.to_string(),
            version,
            duration_ms: started.elapsed().as_millis() as u64,
        })
    }

    fn service_def(&self) -> activate::ServiceDef {
        match &self.settings.service {
            ServiceSettings::Systemd {
                unit, unit_path, ..
            } => activate::ServiceDef::Systemd {
                unit_path: unit_path.clone(),
                unit_name: unit.clone(),
            },
            ServiceSettings::Initd { script } => activate::ServiceDef::Initd {
                script_path: script.clone(),
            },
            ServiceSettings::Scripts => activate::ServiceDef::Scripts,
        }
    }

    fn backups(&self) -> activate::Backups {
        activate::Backups::in_state_dir(&self.settings.state_dir)
    }

    async fn activate_install(&self, new_install: PathBuf) -> Result<ActivateResponse, Status> {
        let state = self.node_state();
        let service_path = match &self.settings.service {
            ServiceSettings::Systemd { unit_path, .. } => unit_path.display().to_string(),
            ServiceSettings::Initd { script } => script.display().to_string(),
            ServiceSettings::Scripts => String::new(),
        };
        if state.active_install == new_install {
            return Ok(ActivateResponse {
                install_path: new_install.display().to_string(),
                previous_install: state
                    .previous_install
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
                service_path,
                backup_path: String::new(),
                notes: vec!["already active".into()],
            });
        }
        if self.bitbucket_running() {
            return Err(Status::failed_precondition(
                "Bitbucket is still running on this node; stop it before activating another install",
            ));
        }
        let def = self.service_def();
        let backups = self.backups();
        let link = self.settings.current_link.clone();
        let old = state.active_install.clone();
        let new = new_install.clone();
        let outcome = tokio::task::spawn_blocking(move || {
            activate::activate(&def, &backups, link.as_deref(), &old, &new)
        })
        .await
        .map_err(blocking_join)?
        .map_err(|e| Status::failed_precondition(e.to_string()))?;
        self.service
            .daemon_reload()
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        let mut notes = outcome.notes;
        notes.extend(
            self.service
                .disable_bundled_search()
                .await
                .map_err(|e| Status::internal(e.to_string()))?,
        );
        self.set_node_state(NodeState {
            active_install: new_install.clone(),
            previous_install: Some(state.active_install.clone()),
        })?;
        Ok(ActivateResponse {
            install_path: new_install.display().to_string(),
            previous_install: state.active_install.display().to_string(),
            service_path,
            backup_path: outcome
                .backup_path
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            notes,
        })
    }

    fn node_info(&self) -> NodeInfoResponse {
        let s = &self.settings;
        let state = self.node_state();
        let mut installed: Vec<InstalledVersion> = list_installs(&s.install_root)
            .into_iter()
            .map(|(version, path)| InstalledVersion {
                version,
                path: path.display().to_string(),
            })
            .collect();
        if !installed
            .iter()
            .any(|i| Path::new(&i.path) == state.active_install)
        {
            installed.push(InstalledVersion {
                version: install_version(&state.active_install).unwrap_or_default(),
                path: state.active_install.display().to_string(),
            });
        }
        NodeInfoResponse {
            node_id: s.node_id.clone(),
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            hostname: nix::unistd::gethostname()
                .map(|h| h.to_string_lossy().into_owned())
                .unwrap_or_default(),
            installed,
            active_version: install_version(&state.active_install).unwrap_or_default(),
            active_install: state.active_install.display().to_string(),
            previous_install: state
                .previous_install
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            bitbucket_home: s.home.display().to_string(),
            service_kind: match s.service {
                ServiceSettings::Systemd { .. } => ServiceKind::Systemd,
                ServiceSettings::Initd { .. } => ServiceKind::Initd,
                ServiceSettings::Scripts => ServiceKind::Scripts,
            } as i32,
            service_path: match &s.service {
                ServiceSettings::Systemd { unit_path, .. } => unit_path.display().to_string(),
                ServiceSettings::Initd { script } => script.display().to_string(),
                ServiceSettings::Scripts => String::new(),
            },
            install_root: s.install_root.display().to_string(),
            install_root_free_bytes: crate::metrics::free_bytes(&s.install_root),
            home_free_bytes: crate::metrics::free_bytes(&s.home),
            status: String::new(),
            status_url: s.status_url.clone(),
            backups: self
                .backups()
                .list()
                .into_iter()
                .map(|b| ServiceBackup {
                    version: b.version,
                    path: b.path.display().to_string(),
                })
                .collect(),
        }
    }

    /// Runs a staging operation in the background and streams its events; replays a recorded one.
    fn stage_stream<F>(&self, op_id: String, work: F) -> Result<EventStream, Status>
    where
        F: FnOnce(
            tokio::sync::mpsc::Sender<Result<StageEvent, Status>>,
        ) -> tokio::task::JoinHandle<Result<StageRecord, Status>>,
    {
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        match self.journal.begin(&op_id, "stage")? {
            crate::journal::Admission::Replay(v) => {
                let rec: StageRecord =
                    serde_json::from_value(v).map_err(|e| internal("recorded stage", e))?;
                let _ = tx.try_send(Ok(StageEvent {
                    event: Some(stage_event::Event::Result(rec.into())),
                }));
            }
            crate::journal::Admission::Run => {
                let journal = self.journal.clone();
                let handle = work(tx.clone());
                tokio::spawn(async move {
                    let out = match handle.await {
                        Ok(r) => r,
                        Err(e) => Err(blocking_join(e)),
                    };
                    match out {
                        Ok(rec) => {
                            journal.finish(
                                &op_id,
                                serde_json::to_value(&rec).map_err(|e| e.to_string()),
                            );
                            let _ = tx
                                .send(Ok(StageEvent {
                                    event: Some(stage_event::Event::Result(rec.into())),
                                }))
                                .await;
                        }
                        Err(status) => {
                            journal.finish(&op_id, Err(status.message().to_string()));
                            let _ = tx.send(Err(status)).await;
                        }
                    }
                });
            }
        }
        Ok(Box::pin(ReceiverStream::new(rx)))
    }
}

fn pid_alive(pid: u32) -> bool {
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None) {
        Ok(()) => true,
        Err(nix::errno::Errno::EPERM) => true,
        Err(_) => false,
    }
}

/// The configured Bitbucket user, as the service code needs it.
fn bitbucket_user(settings: &Settings) -> service::BitbucketUser {
    service::BitbucketUser {
        name: settings.user.name.clone(),
        uid: settings.user.uid,
        gid: settings.user.gid,
    }
}

fn service_manager(
    settings: &Settings,
    active_install: Arc<RwLock<PathBuf>>,
) -> Arc<dyn service::ServiceManager> {
    // Script output goes to a file the agent owns, never to a pipe the backgrounded JVM inherits.
    let log = settings.state_dir.join("service-commands.log");
    let user = bitbucket_user(settings);
    let root = nix::unistd::geteuid().is_root();
    match &settings.service {
        ServiceSettings::Systemd {
            unit,
            systemctl,
            unit_path,
        } => {
            let mut m = service::Systemd::new(unit.clone());
            m.systemctl = systemctl.clone();
            m.require_user = root.then(|| (unit_path.clone(), user.name.clone()));
            Arc::new(m)
        }
        ServiceSettings::Initd { script } => {
            let mut m = service::Initd::new(script.clone(), log);
            m.guard = root.then_some((user, active_install));
            Arc::new(m)
        }
        ServiceSettings::Scripts => Arc::new(service::Scripts::new(
            active_install,
            service::RunAs::User(user),
            log,
        )),
    }
}

fn progress_sender(
    tx: tokio::sync::mpsc::Sender<Result<StageEvent, Status>>,
) -> impl FnMut(stage::StageProgress) + Send + 'static {
    let mut last = Instant::now() - Duration::from_secs(1);
    move |p: stage::StageProgress| {
        // Progress is for people: a few events a second is plenty.
        if last.elapsed() >= Duration::from_millis(100) {
            last = Instant::now();
            let _ = tx.try_send(Ok(StageEvent {
                event: Some(stage_event::Event::Progress(StageProgress {
                    bytes: p.bytes_in,
                    total_bytes: p.total_bytes.unwrap_or(0),
                    files: p.files,
                })),
            }));
        }
    }
}

fn record_of(o: stage::StageOutcome, version: &str) -> StageRecord {
    StageRecord {
        version: version.to_string(),
        install_path: o.install_path.display().to_string(),
        files: o.files,
        bytes: o.bytes,
        already_staged: o.already_staged,
        from_cache: o.from_cache,
    }
}

#[tonic::async_trait]
impl Agent for AgentService {
    async fn node_info(
        &self,
        _req: Request<NodeInfoRequest>,
    ) -> Result<Response<NodeInfoResponse>, Status> {
        let mut info = self.node_info();
        info.status = service::read_status(&self.http, &self.settings.status_url)
            .await
            .to_string();
        Ok(Response::new(info))
    }

    async fn load_metrics(
        &self,
        _req: Request<LoadMetricsRequest>,
    ) -> Result<Response<LoadSample>, Status> {
        let (m, s) = (self.metrics.clone(), self.settings.clone());
        let sample =
            tokio::task::spawn_blocking(move || m.sample(&s.install_root, &s.home, &s.pid_file()))
                .await
                .map_err(blocking_join)?;
        Ok(Response::new(sample))
    }

    type WatchLoadStream = LoadStream;

    async fn watch_load(
        &self,
        req: Request<WatchLoadRequest>,
    ) -> Result<Response<LoadStream>, Status> {
        let interval = Duration::from_millis(u64::from(
            req.into_inner().interval_ms.max(MIN_WATCH_INTERVAL_MS),
        ));
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let (m, s) = (self.metrics.clone(), self.settings.clone());
        tokio::spawn(async move {
            loop {
                let (m2, s2) = (m.clone(), s.clone());
                let Ok(sample) = tokio::task::spawn_blocking(move || {
                    m2.sample(&s2.install_root, &s2.home, &s2.pid_file())
                })
                .await
                else {
                    break;
                };
                if tx.send(Ok(sample)).await.is_err() {
                    break;
                }
                tokio::time::sleep(interval).await;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type StageUploadStream = EventStream;

    async fn stage_upload(
        &self,
        req: Request<Streaming<StageUploadMessage>>,
    ) -> Result<Response<EventStream>, Status> {
        let mut inbound = req.into_inner();
        let idle = self.settings.upload_idle_timeout;
        let first = tokio::time::timeout(idle, inbound.message())
            .await
            .map_err(|_| {
                Status::deadline_exceeded(format!(
                    "no stage header within {}s of opening the upload",
                    idle.as_secs()
                ))
            })??;
        let header = match first {
            Some(StageUploadMessage {
                msg: Some(stage_upload_message::Msg::Header(h)),
            }) => h,
            _ => {
                return Err(Status::invalid_argument(
                    "the first upload message must be the stage header",
                ));
            }
        };
        check_lengths(&[
            ("operation_id", &header.operation_id, MAX_OP_ID_BYTES),
            ("sha256", &header.sha256, MAX_SHA256_BYTES),
        ])?;
        check_version(&header.version)?;
        let stage_req = self.stage_request(&header.version, &header.sha256);
        let cache = self.cache.clone();
        let version = header.version.clone();
        let total = header.size_bytes;
        let stream = self.stage_stream(header.operation_id.clone(), move |tx| {
            let (chunk_tx, reader) = stage::chunk_channel(UPLOAD_CHANNEL_CHUNKS);
            tokio::spawn(async move {
                loop {
                    // A stalled upload must not hold its staging dir and operation id forever.
                    let Ok(next) = tokio::time::timeout(idle, inbound.message()).await else {
                        let _ = chunk_tx
                            .send(Err(format!(
                                "the upload sent nothing for {}s and was given up",
                                idle.as_secs()
                            )))
                            .await;
                        break;
                    };
                    match next {
                        Ok(Some(StageUploadMessage {
                            msg: Some(stage_upload_message::Msg::Chunk(c)),
                        })) => {
                            if chunk_tx.send(Ok(c.into())).await.is_err() {
                                break;
                            }
                        }
                        Ok(Some(_)) => {
                            let _ = chunk_tx
                                .send(Err("a second header arrived in the upload".into()))
                                .await;
                            break;
                        }
                        Ok(None) => break,
                        Err(e) => {
                            let _ = chunk_tx
                                .send(Err(format!("the upload was cut off: {}", e.message())))
                                .await;
                            break;
                        }
                    }
                }
            });
            let mut progress = progress_sender(tx);
            tokio::task::spawn_blocking(move || {
                stage::stage_from_reader(
                    reader,
                    &stage_req,
                    cache.as_deref(),
                    &mut |mut p: stage::StageProgress| {
                        if p.total_bytes.is_none() && total > 0 {
                            p.total_bytes = Some(total);
                        }
                        progress(p)
                    },
                )
                .map(|o| record_of(o, &version))
                .map_err(stage_status)
            })
        })?;
        Ok(Response::new(stream))
    }

    type StageFromUrlStream = EventStream;

    async fn stage_from_url(
        &self,
        req: Request<StageFromUrlRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let r = req.into_inner();
        check_lengths(&[
            ("operation_id", &r.operation_id, MAX_OP_ID_BYTES),
            ("sha256", &r.sha256, MAX_SHA256_BYTES),
        ])?;
        check_version(&r.version)?;
        // Decided before any connection is made, and before the journal: a refused host is
        // never contacted.
        crate::url_policy::check_url(&r.url, self.settings.url_hosts.as_deref()).map_err(|e| {
            match e {
                crate::url_policy::UrlRefused::HostNotAllowed { .. }
                | crate::url_policy::UrlRefused::NoHostsAllowed => {
                    Status::permission_denied(e.to_string())
                }
                _ => Status::invalid_argument(e.to_string()),
            }
        })?;
        let stage_req = self.stage_request(&r.version, &r.sha256);
        let cache = self.cache.clone();
        let stream = self.stage_stream(r.operation_id.clone(), move |tx| {
            let progress = progress_sender(tx);
            tokio::spawn(async move {
                stage::stage_from_url(&r.url, stage_req, cache, progress)
                    .await
                    .map(|o| record_of(o, &r.version))
                    .map_err(stage_status)
            })
        })?;
        Ok(Response::new(stream))
    }

    async fn prepare(
        &self,
        req: Request<PrepareRequest>,
    ) -> Result<Response<PrepareResponse>, Status> {
        let r = req.into_inner();
        check_version(&r.version)?;
        let new_install = self.install_path(&r.version);
        let s = self.settings.clone();
        let state = self.node_state();
        let resp = self
            .journal
            .run(&r.operation_id, "prepare", async move {
                if !new_install.join("bin/start-bitbucket.sh").is_file() {
                    return Err(Status::failed_precondition(format!(
                        "{} is not staged; stage version {} first",
                        new_install.display(),
                        r.version
                    )));
                }
                // Prepare carries customizations from the running install, which is the previous
                // one once the new install has been activated (a repeated prepare after activate).
                let current = if state.active_install == new_install {
                    state
                        .previous_install
                        .clone()
                        .unwrap_or(state.active_install.clone())
                } else {
                    state.active_install.clone()
                };
                if let ServiceSettings::Systemd { unit_path, .. } = &s.service {
                    let unit = std::fs::read_to_string(unit_path)
                        .map_err(|e| internal(&format!("reading {}", unit_path.display()), e))?;
                    prepare::check_unit_home(&unit, &s.home)
                        .map_err(Status::failed_precondition)?;
                }
                let input = prepare::PrepareInput {
                    current_install: current,
                    new_install: new_install.clone(),
                    home: s.home.clone(),
                    extra_files: s.carry_files.clone(),
                    bitbucket_user: crate::rootfs::Reader {
                        uid: s.user.uid,
                        gid: s.user.gid,
                    },
                };
                let outcome = tokio::task::spawn_blocking(move || prepare::prepare(&input))
                    .await
                    .map_err(blocking_join)?
                    .map_err(|e| Status::failed_precondition(e.to_string()))?;
                Ok(PrepareResponseRecord {
                    install_path: new_install.display().to_string(),
                    bitbucket_home: s.home.display().to_string(),
                    carried: outcome
                        .carried
                        .into_iter()
                        .map(|c| (c.path, c.reason))
                        .collect(),
                    notes: outcome.notes,
                })
            })
            .await?;
        Ok(Response::new(resp.into()))
    }

    async fn stop(&self, req: Request<StopRequest>) -> Result<Response<StopResponse>, Status> {
        let r = req.into_inner();
        let resp = self
            .run_detached(r.operation_id, "stop", move |this| async move {
                this.stop_bitbucket(r.timeout_secs, r.kill_after_timeout)
                    .await
                    .map(StopRecord::from)
            })
            .await?;
        Ok(Response::new(resp.into()))
    }

    async fn activate(
        &self,
        req: Request<ActivateRequest>,
    ) -> Result<Response<ActivateResponse>, Status> {
        let r = req.into_inner();
        check_version(&r.version)?;
        let new_install = self.install_path(&r.version);
        let resp = self
            .journal
            .run(&r.operation_id, "activate", async {
                if !new_install.join("bin/start-bitbucket.sh").is_file() {
                    return Err(Status::failed_precondition(format!(
                        "{} is not staged; stage and prepare version {} first",
                        new_install.display(),
                        r.version
                    )));
                }
                self.activate_install(new_install.clone())
                    .await
                    .map(ActivateRecord::from)
            })
            .await?;
        Ok(Response::new(resp.into()))
    }

    async fn start(&self, req: Request<StartRequest>) -> Result<Response<StartResponse>, Status> {
        let r = req.into_inner();
        let resp = self
            .run_detached(r.operation_id, "start", move |this| async move {
                this.start_bitbucket(r.timeout_secs)
                    .await
                    .map(StartRecord::from)
            })
            .await?;
        Ok(Response::new(resp.into()))
    }

    async fn rollback(
        &self,
        req: Request<RollbackRequest>,
    ) -> Result<Response<RollbackResponse>, Status> {
        let r = req.into_inner();
        let resp = self
            .run_detached(r.operation_id.clone(), "rollback", move |this| async move {
                let state = this.node_state();
                let active_version = install_version(&state.active_install);
                let previous_version = state.previous_install.as_deref().and_then(install_version);
                let installs = crate::rollback::Installs {
                    active_version: active_version.as_deref(),
                    previous: state.previous_install.as_deref(),
                    previous_version: previous_version.as_deref(),
                };
                let previous = match crate::rollback::plan_rollback(installs, &r.target_version)
                    .map_err(Status::failed_precondition)?
                {
                    crate::rollback::RollbackPlan::Activate(p) => p,
                    crate::rollback::RollbackPlan::AlreadyActive => {
                        return this
                            .rollback_in_place(&state, r.no_start, r.start_timeout_secs)
                            .await;
                    }
                };
                this.stop_bitbucket(r.stop_timeout_secs, false).await?;
                let def = this.service_def();
                let backups = this.backups();
                let link = this.settings.current_link.clone();
                let (from, to) = (state.active_install.clone(), previous.clone());
                tokio::task::spawn_blocking(move || {
                    activate::restore(&def, &backups, link.as_deref(), &to, &from)
                })
                .await
                .map_err(blocking_join)?
                .map_err(|e| Status::failed_precondition(e.to_string()))?;
                this.service
                    .daemon_reload()
                    .await
                    .map_err(|e| Status::internal(e.to_string()))?;
                this.set_node_state(NodeState {
                    active_install: previous.clone(),
                    previous_install: Some(state.active_install.clone()),
                })?;
                let state_text = if r.no_start {
                    "STOPPED".to_string()
                } else {
                    this.start_bitbucket(r.start_timeout_secs).await?.state
                };
                Ok(RollbackRecord {
                    install_path: previous.display().to_string(),
                    version: install_version(&previous).unwrap_or_default(),
                    state: state_text,
                })
            })
            .await?;
        Ok(Response::new(resp.into()))
    }

    async fn cleanup(
        &self,
        req: Request<CleanupRequest>,
    ) -> Result<Response<CleanupResponse>, Status> {
        let r = req.into_inner();
        let root = self.settings.install_root.clone();
        let state = self.node_state();
        let keep = if r.keep == 0 {
            self.settings.keep_installs
        } else {
            r.keep.max(2)
        } as usize;
        let resp = self
            .journal
            .run(&r.operation_id, "cleanup", async move {
                tokio::task::spawn_blocking(move || {
                    let installs = list_installs(&root);
                    let remove = cleanup_candidates(&installs, &state, keep);
                    let mut removed = Vec::new();
                    for p in &remove {
                        std::fs::remove_dir_all(p)
                            .map_err(|e| internal(&format!("removing {}", p.display()), e))?;
                        removed.push(p.display().to_string());
                    }
                    let kept = installs
                        .iter()
                        .filter(|(_, p)| !remove.contains(p))
                        .map(|(_, p)| p.display().to_string())
                        .collect();
                    Ok(CleanupRecord { removed, kept })
                })
                .await
                .map_err(blocking_join)?
            })
            .await?;
        Ok(Response::new(CleanupResponse {
            removed: resp.removed,
            kept: resp.kept,
        }))
    }

    async fn lb_server(
        &self,
        req: Request<LbServerRequest>,
    ) -> Result<Response<LbServerResponse>, Status> {
        let r = req.into_inner();
        check_lengths(&[
            ("operation_id", &r.operation_id, MAX_OP_ID_BYTES),
            ("server", &r.server, MAX_LB_SERVER_BYTES),
        ])?;
        if r.drain_timeout_secs > MAX_DRAIN_TIMEOUT_SECS {
            return Err(Status::invalid_argument(format!(
                "drain_timeout_secs {} is more than {MAX_DRAIN_TIMEOUT_SECS} (a day)",
                r.drain_timeout_secs
            )));
        }
        let settings = self.settings.clone();
        // On its own blocking task: a drain finishes (and the file is left consistent) even when
        // the caller goes away.
        let resp =
            tokio::task::spawn_blocking(move || crate::lb::lb_server(settings.lb.as_ref(), &r))
                .await
                .map_err(blocking_join)??;
        Ok(Response::new(resp))
    }

    async fn operation_status(
        &self,
        req: Request<OperationStatusRequest>,
    ) -> Result<Response<OperationStatusResponse>, Status> {
        use crate::journal::OpState;
        let id = req.into_inner().operation_id;
        check_lengths(&[("operation_id", &id, MAX_OP_ID_BYTES)])?;
        let resp = match self.journal.get(&id) {
            None => OperationStatusResponse {
                operation_id: id,
                state: OperationState::Unknown as i32,
                ..Default::default()
            },
            Some(rec) => OperationStatusResponse {
                operation_id: rec.operation_id,
                kind: rec.kind,
                state: match rec.state {
                    OpState::Running => OperationState::Running,
                    OpState::Succeeded => OperationState::Succeeded,
                    OpState::Failed => OperationState::Failed,
                    OpState::Interrupted => OperationState::Interrupted,
                } as i32,
                error: rec.error.unwrap_or_default(),
                started_unix_ms: rec.started_unix_ms,
                finished_unix_ms: rec.finished_unix_ms.unwrap_or(0),
                result_json: rec.result.map(|v| v.to_string()).unwrap_or_default(),
            },
        };
        Ok(Response::new(resp))
    }
}

// Journal records of the unary results: plain serde mirrors of the protocol messages.

#[derive(Serialize, Deserialize)]
struct PrepareResponseRecord {
    install_path: String,
    bitbucket_home: String,
    carried: Vec<(String, String)>,
    notes: Vec<String>,
}

impl From<PrepareResponseRecord> for PrepareResponse {
    fn from(r: PrepareResponseRecord) -> Self {
        PrepareResponse {
            install_path: r.install_path,
            bitbucket_home: r.bitbucket_home,
            carried: r
                .carried
                .into_iter()
                .map(|(path, reason)| CarriedFile { path, reason })
                .collect(),
            notes: r.notes,
        }
    }
}

#[derive(Serialize, Deserialize)]
struct StopRecord {
    was_running: bool,
    duration_ms: u64,
    killed: bool,
}

impl From<StopResponse> for StopRecord {
    fn from(r: StopResponse) -> Self {
        Self {
            was_running: r.was_running,
            duration_ms: r.duration_ms,
            killed: r.killed,
        }
    }
}

impl From<StopRecord> for StopResponse {
    fn from(r: StopRecord) -> Self {
        Self {
            was_running: r.was_running,
            duration_ms: r.duration_ms,
            killed: r.killed,
        }
    }
}

#[derive(Serialize, Deserialize)]
struct ActivateRecord {
    install_path: String,
    previous_install: String,
    service_path: String,
    backup_path: String,
    notes: Vec<String>,
}

impl From<ActivateResponse> for ActivateRecord {
    fn from(r: ActivateResponse) -> Self {
        Self {
            install_path: r.install_path,
            previous_install: r.previous_install,
            service_path: r.service_path,
            backup_path: r.backup_path,
            notes: r.notes,
        }
    }
}

impl From<ActivateRecord> for ActivateResponse {
    fn from(r: ActivateRecord) -> Self {
        Self {
            install_path: r.install_path,
            previous_install: r.previous_install,
            service_path: r.service_path,
            backup_path: r.backup_path,
            notes: r.notes,
        }
    }
}

#[derive(Serialize, Deserialize)]
struct StartRecord {
    state: String,
    version: String,
    duration_ms: u64,
}

impl From<StartResponse> for StartRecord {
    fn from(r: StartResponse) -> Self {
        Self {
            state: r.state,
            version: r.version,
            duration_ms: r.duration_ms,
        }
    }
}

impl From<StartRecord> for StartResponse {
    fn from(r: StartRecord) -> Self {
        Self {
            state: r.state,
            version: r.version,
            duration_ms: r.duration_ms,
        }
    }
}

#[derive(Serialize, Deserialize)]
struct RollbackRecord {
    install_path: String,
    version: String,
    state: String,
}

impl From<RollbackRecord> for RollbackResponse {
    fn from(r: RollbackRecord) -> Self {
        Self {
            install_path: r.install_path,
            version: r.version,
            state: r.state,
        }
    }
}

#[derive(Serialize, Deserialize)]
struct CleanupRecord {
    removed: Vec<String>,
    kept: Vec<String>,
}
