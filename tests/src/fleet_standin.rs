//! A fleet of stand-in clusters for the fleet tests and the scale benchmark, all in this process
//! and instant: per node a minimal agent serving the real gRPC service over mutual TLS (with the
//! real coordinator-only gate and a certificate naming the node), per cluster Bitbucket's
//! rolling-upgrade REST API. The real coordinator drives them; they record what it did (when each
//! cluster was first and last changed, every call), for assertions.

use anyhow::{Context, Result};
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::{Json, Router};
use bbupgrade_common::identity::Role;
use bbupgrade_common::pki::{Ca, IssueRequest};
use bbupgrade_common::proto::agent_server::{Agent, AgentServer};
use bbupgrade_common::proto::*;
use bbupgrade_common::tls::{AgentServerConfig, CoordinatorGate, TlsFiles, TlsMaterial};
use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

pub const TOKEN: &str = "standin-sysadmin-token";
/// A SHA-256 for `--archive-url`: the stand-in agents do not download anything.
pub const FAKE_SHA256: &str = "5d5b09f6dcb2d53a5fffc60c4ac0d55fabdc556069d6631545f42aa6e3500f2e";

/// What the stand-in fleet looks like.
#[derive(Debug, Clone)]
pub struct FleetSpec {
    pub clusters: usize,
    pub nodes: usize,
    pub from: String,
    pub to: String,
    /// Clusters whose nodes answer ERROR when started on the new version.
    pub fail_start: HashSet<String>,
    /// Maintenance windows by cluster name.
    pub windows: HashMap<String, String>,
    /// How long each stop and start takes (0 for the benchmark).
    pub op_delay: Duration,
    /// Clusters that run another version than `from` before the upgrade (another line, say).
    pub from_by_cluster: HashMap<String, String>,
}

impl FleetSpec {
    pub fn new(clusters: usize, nodes: usize) -> Self {
        Self {
            clusters,
            nodes,
            from: "8.19.3".into(),
            to: "8.19.6".into(),
            fail_start: HashSet::new(),
            windows: HashMap::new(),
            op_delay: Duration::ZERO,
            from_by_cluster: HashMap::new(),
        }
    }
}

/// Cluster names are `c0001`, `c0002`, ...; node ids `c0001-n1`, ...
pub fn cluster_name(i: usize) -> String {
    format!("c{:04}", i + 1)
}

#[derive(Debug)]
struct SimNode {
    id: String,
    version: String,
    staged: Vec<String>,
    state: &'static str,
}

#[derive(Debug)]
struct SimCluster {
    name: String,
    from: String,
    upgrade_mode: bool,
    fail_start: bool,
    nodes: Vec<SimNode>,
    first_change: Option<Instant>,
    last_change: Option<Instant>,
    calls: Vec<String>,
}

impl SimCluster {
    fn touch(&mut self, call: String) {
        let now = Instant::now();
        self.first_change.get_or_insert(now);
        self.last_change = Some(now);
        self.calls.push(call);
    }

    fn state(&self) -> &'static str {
        if !self.upgrade_mode {
            return "STABLE";
        }
        let on_new = self.nodes.iter().filter(|n| n.version != self.from).count();
        if on_new == 0 {
            "READY_TO_UPGRADE"
        } else if on_new == self.nodes.len() && self.nodes.iter().all(|n| n.state == "ACTIVE") {
            "READY_TO_RUN_UPGRADE_TASKS"
        } else {
            "MIXED"
        }
    }

    fn view(&self) -> serde_json::Value {
        serde_json::json!({
            "upgradeModeEnabled": self.upgrade_mode,
            "state": self.state(),
            "originalVersion": self.upgrade_mode.then_some(&self.from),
            // As the product shows rows: no name configured, nodes told apart by address, and no
            // version or counts on a row that is not up.
            "nodes": self.nodes.iter().enumerate().map(|(i, n)| {
                let mut row = serde_json::json!({
                    "id": n.id, "name": "Not configured", "ipAddress": "127.0.0.1", "state": n.state,
                    "local": false, "portNumber": standin_cluster_port(i),
                });
                if n.state == "ACTIVE" {
                    row["tasksTotal"] = 0.into();
                    row["activeUserCount"] = 0.into();
                    row["buildNumber"] = "1".into();
                    row["version"] = n.version.clone().into();
                }
                row
            }).collect::<Vec<_>>(),
        })
    }
}

/// The cluster (Hazelcast) port a stand-in node reports: all share 127.0.0.1, so the port tells
/// them apart, as it would for real nodes sharing one host.
fn standin_cluster_port(node_index: usize) -> usize {
    5701 + node_index
}

struct World {
    clusters: Vec<Mutex<SimCluster>>,
    index: HashMap<String, usize>,
    op_delay: Duration,
    started: Instant,
}

impl World {
    fn cluster(&self, i: usize) -> MutexGuard<'_, SimCluster> {
        self.clusters[i].lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// One cluster's activity as the stand-ins saw it.
#[derive(Debug, Clone)]
pub struct Activity {
    pub cluster: String,
    /// Milliseconds since the fleet started; `None` when the coordinator never changed anything.
    pub first_ms: Option<u64>,
    pub last_ms: Option<u64>,
    pub versions: Vec<String>,
    pub calls: Vec<String>,
}

/// The stand-in fleet, serving until dropped.
pub struct StandinFleet {
    pub inventory: PathBuf,
    pub journal: PathBuf,
    pub names: Vec<String>,
    world: Arc<World>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for StandinFleet {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl StandinFleet {
    /// Writes the PKI, token and inventory into `dir` and starts serving every agent and cluster.
    pub async fn start(dir: &Path, spec: &FleetSpec) -> Result<Self> {
        let pki = dir.join("pki");
        let ca = Ca::generate()?;
        ca.save(&pki)?;
        ca.issue(&IssueRequest::new(Role::Coordinator, "fleet"))?
            .save(&pki)?;
        let token = dir.join("token");
        std::fs::write(&token, TOKEN)?;
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600))?;
        let names: Vec<String> = (0..spec.clusters).map(cluster_name).collect();
        let world = Arc::new(World {
            clusters: names
                .iter()
                .map(|name| {
                    let from = spec.from_by_cluster.get(name).unwrap_or(&spec.from);
                    Mutex::new(SimCluster {
                        name: name.clone(),
                        from: from.clone(),
                        upgrade_mode: false,
                        fail_start: spec.fail_start.contains(name),
                        nodes: (1..=spec.nodes)
                            .map(|n| SimNode {
                                id: format!("{name}-n{n}"),
                                version: from.clone(),
                                staged: vec![from.clone()],
                                state: "ACTIVE",
                            })
                            .collect(),
                        first_change: None,
                        last_change: None,
                        calls: Vec::new(),
                    })
                })
                .collect(),
            index: names
                .iter()
                .enumerate()
                .map(|(i, n)| (n.clone(), i))
                .collect(),
            op_delay: spec.op_delay,
            started: Instant::now(),
        });
        let mut tasks = Vec::new();
        let rest = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let rest_port = rest.local_addr()?.port();
        let app = Router::new()
            .route("/{cluster}/rest/zdu/cluster", get(zdu_cluster))
            .route("/{cluster}/rest/zdu/state", get(zdu_state))
            .route("/{cluster}/rest/zdu/{action}", post(zdu_post))
            .with_state(world.clone());
        tasks.push(tokio::spawn(async move {
            let _ = axum::serve(rest, app).await;
        }));

        let coordinator = TlsFiles::in_pki_dir(&pki, Role::Coordinator, "fleet");
        let journal = dir.join("journal.db");
        let mut inv = String::new();
        writeln!(
            inv,
            "state = {:?}\ntls = {{ ca = {:?}, cert = {:?}, key = {:?} }}\n\n[timeouts]\nsoak_secs = 0\nagent_connect_ms = 10000\n",
            journal.display().to_string(),
            coordinator.ca.display().to_string(),
            coordinator.cert.display().to_string(),
            coordinator.key.display().to_string(),
        )?;
        for (ci, name) in names.iter().enumerate() {
            writeln!(
                inv,
                "[[clusters]]\nname = {name:?}\nbitbucket_url = \"http://127.0.0.1:{rest_port}/{name}\"\ntoken_file = {:?}\nlabels = [\"standin\", \"{}\"]\nload_balancer = {{ kind = \"none\" }}",
                token.display().to_string(),
                if ci % 2 == 0 { "odd" } else { "even" },
            )?;
            if let Some(w) = spec.windows.get(name) {
                writeln!(inv, "window = {w:?}")?;
            }
            for ni in 0..spec.nodes {
                let node_id = format!("{name}-n{}", ni + 1);
                let issued =
                    ca.issue(&IssueRequest::new(Role::Agent, &node_id).with_sans(["127.0.0.1"]))?;
                let material = TlsMaterial {
                    ca_pem: ca.cert_pem.clone().into_bytes(),
                    cert_pem: issued.cert_pem.into_bytes(),
                    key_pem: issued.key_pem.into_bytes(),
                    crl_pem: None,
                };
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
                let port = listener.local_addr()?.port();
                let svc = StandinAgent {
                    world: world.clone(),
                    cluster: ci,
                    node: ni,
                };
                let tls = AgentServerConfig::new(material, None)
                    .context("configuring the stand-in agent's TLS")?;
                let gate = CoordinatorGate::default();
                let interceptor = {
                    let gate = gate.clone();
                    move |req| gate.intercept(req)
                };
                let server = tonic::transport::Server::builder()
                    .add_service(AgentServer::with_interceptor(svc, interceptor));
                let incoming = bbupgrade_common::accept::incoming(
                    listener,
                    Arc::new(tls),
                    gate,
                    Default::default(),
                );
                tasks.push(tokio::spawn(async move {
                    let _ = server.serve_with_incoming(incoming).await;
                }));
                writeln!(
                    inv,
                    "[[clusters.nodes]]\nid = {node_id:?}\nagent = \"127.0.0.1:{port}\"\nbitbucket_address = \"127.0.0.1:{}\"",
                    standin_cluster_port(ni)
                )?;
            }
            inv.push('\n');
        }
        let inventory = dir.join("inventory.toml");
        std::fs::write(&inventory, inv)?;
        Ok(Self {
            inventory,
            journal,
            names,
            world,
            tasks,
        })
    }

    /// What the stand-ins saw of each cluster, in cluster order.
    pub fn activity(&self) -> Vec<Activity> {
        let ms =
            |t: Option<Instant>| t.map(|t| t.duration_since(self.world.started).as_millis() as u64);
        (0..self.world.clusters.len())
            .map(|i| {
                let c = self.world.cluster(i);
                Activity {
                    cluster: c.name.clone(),
                    first_ms: ms(c.first_change),
                    last_ms: ms(c.last_change),
                    versions: c.nodes.iter().map(|n| n.version.clone()).collect(),
                    calls: c.calls.clone(),
                }
            })
            .collect()
    }

    /// The versions a cluster's nodes run now.
    pub fn versions(&self, cluster: &str) -> Vec<String> {
        let i = self.world.index[cluster];
        self.world
            .cluster(i)
            .nodes
            .iter()
            .map(|n| n.version.clone())
            .collect()
    }

    /// Clusters whose every node runs `version`.
    pub fn count_on(&self, version: &str) -> usize {
        self.activity()
            .iter()
            .filter(|a| a.versions.iter().all(|v| v == version))
            .count()
    }
}

/// The most clusters the coordinator was changing at one time (from first to last change).
pub fn max_in_flight(activity: &[Activity]) -> usize {
    let mut edges: Vec<(u64, i32)> = Vec::new();
    for a in activity {
        if let (Some(f), Some(l)) = (a.first_ms, a.last_ms) {
            edges.push((f, 1));
            edges.push((l, -1));
        }
    }
    // At equal times an end counts before a start: the clusters did not overlap.
    edges.sort_by_key(|&(t, d)| (t, d));
    let (mut now, mut max) = (0i32, 0i32);
    for (_, d) in edges {
        now += d;
        max = max.max(now);
    }
    max as usize
}

type EventStream = Pin<Box<dyn Stream<Item = Result<StageEvent, Status>> + Send>>;
type LoadStream = Pin<Box<dyn Stream<Item = Result<LoadSample, Status>> + Send>>;

struct Rules {
    fail_start: bool,
    from: String,
}

struct StandinAgent {
    world: Arc<World>,
    cluster: usize,
    node: usize,
}

impl StandinAgent {
    /// Changes the node under the cluster's lock, recording the call; `f` also gets the cluster's
    /// rules (whether starts fail, the version it runs before the upgrade).
    fn change<T>(&self, call: &str, f: impl FnOnce(&mut SimNode, &Rules) -> T) -> T {
        let mut c = self.world.cluster(self.cluster);
        let id = c.nodes[self.node].id.clone();
        c.touch(format!("{id} {call}"));
        let rules = Rules {
            fail_start: c.fail_start,
            from: c.from.clone(),
        };
        f(&mut c.nodes[self.node], &rules)
    }

    fn staged(&self, version: &str) -> EventStream {
        let path = self.change(&format!("stage {version}"), |n, _| {
            if !n.staged.iter().any(|v| v == version) {
                n.staged.push(version.to_string());
            }
            format!("/opt/atlassian/bitbucket/{version}")
        });
        let result = StageEvent {
            event: Some(stage_event::Event::Result(StageResult {
                version: version.to_string(),
                install_path: path,
                files: 1,
                bytes: 0,
                already_staged: false,
                from_cache: false,
            })),
        };
        Box::pin(tokio_stream::once(Ok(result)))
    }

    async fn pause(&self) {
        if !self.world.op_delay.is_zero() {
            tokio::time::sleep(self.world.op_delay).await;
        }
    }
}

#[tonic::async_trait]
impl Agent for StandinAgent {
    async fn node_info(
        &self,
        _req: Request<NodeInfoRequest>,
    ) -> Result<Response<NodeInfoResponse>, Status> {
        let c = self.world.cluster(self.cluster);
        let n = &c.nodes[self.node];
        Ok(Response::new(NodeInfoResponse {
            node_id: n.id.clone(),
            agent_version: "standin".into(),
            hostname: "127.0.0.1".into(),
            installed: n
                .staged
                .iter()
                .map(|v| InstalledVersion {
                    version: v.clone(),
                    path: format!("/opt/atlassian/bitbucket/{v}"),
                })
                .collect(),
            active_version: n.version.clone(),
            active_install: format!("/opt/atlassian/bitbucket/{}", n.version),
            install_root_free_bytes: 100 << 30,
            home_free_bytes: 100 << 30,
            status: if n.state == "ACTIVE" {
                "RUNNING"
            } else {
                "UNREACHABLE"
            }
            .into(),
            ..Default::default()
        }))
    }

    async fn load_metrics(
        &self,
        _req: Request<LoadMetricsRequest>,
    ) -> Result<Response<LoadSample>, Status> {
        Ok(Response::new(LoadSample::default()))
    }

    type WatchLoadStream = LoadStream;

    async fn watch_load(
        &self,
        _req: Request<WatchLoadRequest>,
    ) -> Result<Response<Self::WatchLoadStream>, Status> {
        Err(Status::unimplemented(
            "the stand-in agent does not stream load",
        ))
    }

    type StageUploadStream = EventStream;

    async fn stage_upload(
        &self,
        req: Request<tonic::Streaming<StageUploadMessage>>,
    ) -> Result<Response<Self::StageUploadStream>, Status> {
        let mut stream = req.into_inner();
        let mut version = None;
        while let Some(msg) = stream.message().await? {
            if let Some(stage_upload_message::Msg::Header(h)) = msg.msg {
                version = Some(h.version);
            }
        }
        let version = version.ok_or_else(|| Status::invalid_argument("no header"))?;
        Ok(Response::new(self.staged(&version)))
    }

    type StageFromUrlStream = EventStream;

    async fn stage_from_url(
        &self,
        req: Request<StageFromUrlRequest>,
    ) -> Result<Response<Self::StageFromUrlStream>, Status> {
        Ok(Response::new(self.staged(&req.into_inner().version)))
    }

    async fn prepare(
        &self,
        _req: Request<PrepareRequest>,
    ) -> Result<Response<PrepareResponse>, Status> {
        Ok(Response::new(PrepareResponse {
            bitbucket_home: "/var/atlassian/application-data/bitbucket".into(),
            ..Default::default()
        }))
    }

    async fn stop(&self, _req: Request<StopRequest>) -> Result<Response<StopResponse>, Status> {
        self.pause().await;
        let was_running = self.change("stop", |n, _| {
            let was = n.state != "OFFLINE";
            n.state = "OFFLINE";
            was
        });
        Ok(Response::new(StopResponse {
            was_running,
            duration_ms: 0,
            killed: false,
        }))
    }

    async fn activate(
        &self,
        req: Request<ActivateRequest>,
    ) -> Result<Response<ActivateResponse>, Status> {
        let version = req.into_inner().version;
        let previous = self.change(&format!("activate {version}"), |n, _| {
            if !n.staged.contains(&version) {
                return Err(Status::failed_precondition(format!(
                    "{version} is not staged"
                )));
            }
            Ok(std::mem::replace(&mut n.version, version.clone()))
        })?;
        Ok(Response::new(ActivateResponse {
            install_path: format!("/opt/atlassian/bitbucket/{version}"),
            previous_install: format!("/opt/atlassian/bitbucket/{previous}"),
            ..Default::default()
        }))
    }

    async fn start(&self, _req: Request<StartRequest>) -> Result<Response<StartResponse>, Status> {
        self.pause().await;
        let (state, version) = self.change("start", |n, c| {
            n.state = if c.fail_start && n.version != c.from {
                "ERROR"
            } else {
                "ACTIVE"
            };
            (n.state, n.version.clone())
        });
        Ok(Response::new(StartResponse {
            state: if state == "ACTIVE" { "RUNNING" } else { state }.into(),
            version,
            duration_ms: 0,
        }))
    }

    async fn rollback(
        &self,
        _req: Request<RollbackRequest>,
    ) -> Result<Response<RollbackResponse>, Status> {
        let version = self.change("rollback", |n, c| {
            n.version = c.from.clone();
            n.state = "ACTIVE";
            n.version.clone()
        });
        Ok(Response::new(RollbackResponse {
            install_path: format!("/opt/atlassian/bitbucket/{version}"),
            version,
            state: "RUNNING".into(),
        }))
    }

    async fn cleanup(
        &self,
        _req: Request<CleanupRequest>,
    ) -> Result<Response<CleanupResponse>, Status> {
        Ok(Response::new(CleanupResponse::default()))
    }

    async fn operation_status(
        &self,
        req: Request<OperationStatusRequest>,
    ) -> Result<Response<OperationStatusResponse>, Status> {
        Ok(Response::new(OperationStatusResponse {
            operation_id: req.into_inner().operation_id,
            state: OperationState::Unknown as i32,
            ..Default::default()
        }))
    }

    async fn lb_server(
        &self,
        _req: Request<LbServerRequest>,
    ) -> Result<Response<LbServerResponse>, Status> {
        Err(Status::failed_precondition(
            "this agent has no [lb] role (a fleet stand-in)",
        ))
    }
}

type Answer = (StatusCode, Json<serde_json::Value>);

fn authorized(headers: &HeaderMap) -> bool {
    headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == format!("Bearer {TOKEN}"))
}

fn with_cluster(
    world: &World,
    headers: &HeaderMap,
    name: &str,
    f: impl FnOnce(&mut SimCluster) -> Answer,
) -> Answer {
    if !authorized(headers) {
        return (
            StatusCode::UNAUTHORIZED,
            Json(serde_json::json!({"errors": [{"message": "authentication required"}]})),
        );
    }
    match world.index.get(name) {
        Some(&i) => f(&mut world.cluster(i)),
        None => (
            StatusCode::NOT_FOUND,
            Json(serde_json::json!({"errors": [{"message": "no such cluster"}]})),
        ),
    }
}

async fn zdu_cluster(
    State(world): State<Arc<World>>,
    UrlPath(name): UrlPath<String>,
    headers: HeaderMap,
) -> Answer {
    with_cluster(&world, &headers, &name, |c| {
        (StatusCode::OK, Json(c.view()))
    })
}

async fn zdu_state(
    State(world): State<Arc<World>>,
    UrlPath(name): UrlPath<String>,
    headers: HeaderMap,
) -> Answer {
    with_cluster(&world, &headers, &name, |c| {
        (
            StatusCode::OK,
            Json(serde_json::json!({"state": c.state(), "buildInfo": c.view()["nodes"][0]})),
        )
    })
}

async fn zdu_post(
    State(world): State<Arc<World>>,
    UrlPath((name, action)): UrlPath<(String, String)>,
    headers: HeaderMap,
) -> Answer {
    with_cluster(&world, &headers, &name, |c| {
        let allowed = match action.as_str() {
            "start" => !c.upgrade_mode,
            "approve" => c.state() == "READY_TO_RUN_UPGRADE_TASKS",
            "cancel" => c.upgrade_mode && c.nodes.iter().all(|n| n.version == c.from),
            _ => {
                return (
                    StatusCode::NOT_FOUND,
                    Json(serde_json::json!({"errors": [{"message": "no such endpoint"}]})),
                );
            }
        };
        if !allowed {
            return (
                StatusCode::CONFLICT,
                Json(
                    serde_json::json!({"errors": [{"message": format!("{action} not allowed in {}", c.state())}]}),
                ),
            );
        }
        c.touch(format!("zdu {action}"));
        c.upgrade_mode = action == "start";
        if action == "approve" {
            let to = c.nodes[0].version.clone();
            c.from = to;
        }
        (StatusCode::OK, Json(serde_json::json!({})))
    })
}
