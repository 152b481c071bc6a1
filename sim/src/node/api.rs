//! The node's HTTP surface: `/status`, the rolling-upgrade REST API (`/rest/zdu`), the admin cluster
//! view, ordinary pages and Git clones as traffic, and the simulator's own `/sim` control endpoints.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};

use super::auth::{self, Caller};
use super::{Health, Node, settings};
use crate::membership::now_ms;
use crate::zdu::{ClusterRecord, Conflict, NodeRecord};

type Shared = Arc<Node>;

const SESSION_COOKIE: &str = "BITBUCKETSESSIONID";
const CLONE_CHUNK_BYTES: usize = 16 * 1024;

pub fn router(node: Shared) -> Router {
    Router::new()
        .route("/status", get(status))
        .route("/rest/zdu/state", get(zdu_state))
        .route("/rest/zdu/cluster", get(zdu_cluster))
        .route("/rest/zdu/nodes/{id}", get(zdu_node))
        .route("/rest/zdu/start", post(zdu_start))
        .route("/rest/zdu/cancel", post(zdu_cancel))
        .route("/rest/zdu/approve", post(zdu_approve))
        .route("/rest/zdu/retryUpgrade", post(zdu_retry))
        .route("/rest/api/1.0/admin/cluster", get(admin_cluster))
        .route("/", get(page))
        .route("/rest/api/1.0/projects", get(page))
        .route("/scm/{project}/{repo}/info/refs", get(clone))
        .route("/scm/{project}/{repo}/git-upload-pack", post(clone))
        .route("/sim/info", get(sim_info))
        .route("/sim/faults", get(sim_faults).post(set_sim_faults))
        .with_state(node)
}

/// An error in the REST API's form: `{"errors":[{"context","message","exceptionName"}]}`.
fn error_with(code: StatusCode, message: impl Into<String>, exception: Option<&str>) -> Response {
    let body = json!({"errors": [{
        "context": null,
        "message": message.into(),
        "exceptionName": exception,
    }]});
    (code, Json(body)).into_response()
}

fn error(code: StatusCode, message: impl Into<String>) -> Response {
    error_with(code, message, None)
}

/// What a client asking for something the simulator does not have gets: 404, empty body.
fn not_found() -> Response {
    StatusCode::NOT_FOUND.into_response()
}

async fn status(State(node): State<Shared>) -> Response {
    let health = node.health();
    let code = match health {
        Health::Running | Health::FirstRun => StatusCode::OK,
        Health::Starting | Health::Stopping => StatusCode::SERVICE_UNAVAILABLE,
        Health::Error(_) => StatusCode::INTERNAL_SERVER_ERROR,
    };
    let state = if health == Health::Running && node.knobs().flag(settings::MAINTENANCE) {
        "MAINTENANCE"
    } else {
        health.name()
    };
    (code, Json(json!({"state": state}))).into_response()
}

/// Which administrative resource is asked for: the rolling-upgrade API answers differently on a
/// non-clustered instance.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Resource {
    Zdu,
    Admin,
}

/// Admin endpoints need a system administrator and the node running.
/// `Some(response)` when the request must be refused.
fn admin_check(node: &Node, headers: &HeaderMap, resource: Resource) -> Option<Response> {
    let knobs = node.knobs();
    if resource == Resource::Zdu && knobs.flag(settings::NOT_CLUSTERED) {
        return Some(error_with(
            StatusCode::UNAUTHORIZED,
            "This resource requires a clustered installation of Bitbucket Data Center; this \
             instance is not clustered",
            Some("com.atlassian.bitbucket.AuthorisationException"),
        ));
    }
    let header = headers
        .get(header::AUTHORIZATION)
        .map(|v| v.to_str().unwrap_or("\u{0}"));
    match auth::authenticate(&knobs, header) {
        Caller::SysAdmin => {}
        Caller::User => {
            return Some(error_with(
                StatusCode::UNAUTHORIZED,
                "You are not permitted to access this resource: it requires system administrator \
                 permission",
                Some("com.atlassian.bitbucket.AuthorisationException"),
            ));
        }
        Caller::Anonymous => {
            return Some(error_with(
                StatusCode::UNAUTHORIZED,
                "Authentication is required to access this resource",
                Some("com.atlassian.bitbucket.AuthorisationException"),
            ));
        }
        Caller::BadCredentials => {
            return Some(error_with(
                StatusCode::UNAUTHORIZED,
                "Authentication failed. Please check your credentials and try again.",
                Some("com.atlassian.bitbucket.auth.IncorrectPasswordAuthenticationException"),
            ));
        }
    }
    if node.health() != Health::Running {
        return Some(error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("this node is {}", node.health().name()),
        ));
    }
    None
}

/// How the fields a row leaves blank are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Blank {
    Absent,
    Null,
}

impl Blank {
    fn of(node: &Node) -> Blank {
        match node
            .knobs()
            .choice(settings::ZDU_BLANK_FIELDS, &["absent", "null"])
        {
            "null" => Blank::Null,
            _ => Blank::Absent,
        }
    }
}

/// A node row as the rolling-upgrade API writes it: `OFFLINE` and `STARTING` rows have no version,
/// build number or counts, a `STARTING` row no IP address either.
fn node_json(n: &NodeRecord, local_id: &str, blank: Blank) -> Value {
    let mut row = serde_json::Map::new();
    let mut put = |key: &str, value: Option<Value>| match (value, blank) {
        (Some(v), _) => {
            row.insert(key.to_string(), v);
        }
        (None, Blank::Null) => {
            row.insert(key.to_string(), Value::Null);
        }
        (None, Blank::Absent) => {}
    };
    let versioned = !n.state.blanks_version();
    put("id", Some(json!(n.id)));
    put("name", Some(json!(n.name)));
    put(
        "ipAddress",
        (!n.state.blanks_address()).then(|| json!(n.ip_address)),
    );
    put("portNumber", Some(json!(n.hazelcast_port)));
    put("state", Some(json!(n.state)));
    put("version", versioned.then(|| json!(n.version.to_string())));
    put(
        "buildNumber",
        versioned.then(|| json!(n.version.build_number().to_string())),
    );
    put("tasksTotal", versioned.then(|| json!(n.tasks_total)));
    put(
        "activeUserCount",
        versioned.then(|| json!(n.active_user_count)),
    );
    put("local", Some(json!(n.id == local_id)));
    put("links", Some(json!([])));
    Value::Object(row)
}

fn cluster_json(rec: &ClusterRecord, local_id: &str, blank: Blank) -> Value {
    json!({
        "upgradeModeEnabled": rec.upgrade_mode,
        "state": rec.state(),
        "originalVersion": rec.version.map(|v| v.to_string()),
        "nodes": rec.nodes.values().map(|n| node_json(n, local_id, blank)).collect::<Vec<_>>(),
    })
}

async fn read_cluster(node: &Shared) -> Result<ClusterRecord, Response> {
    node.with_cluster(|rec| rec.clone())
        .await
        .map_err(|e| error(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")))
}

/// `GET /rest/zdu/state`: the cluster state and the row of the node that answered.
async fn zdu_state(State(node): State<Shared>, headers: HeaderMap) -> Response {
    if let Some(r) = admin_check(&node, &headers, Resource::Zdu) {
        return r;
    }
    let blank = Blank::of(&node);
    match read_cluster(&node).await {
        Ok(rec) => {
            let own = rec
                .nodes
                .get(&node.id)
                .map(|n| node_json(n, &node.id, blank));
            Json(json!({"state": rec.state(), "buildInfo": own})).into_response()
        }
        Err(r) => r,
    }
}

async fn zdu_cluster(State(node): State<Shared>, headers: HeaderMap) -> Response {
    if let Some(r) = admin_check(&node, &headers, Resource::Zdu) {
        return r;
    }
    match read_cluster(&node).await {
        Ok(rec) => Json(cluster_json(&rec, &node.id, Blank::of(&node))).into_response(),
        Err(r) => r,
    }
}

async fn zdu_node(
    State(node): State<Shared>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if let Some(r) = admin_check(&node, &headers, Resource::Zdu) {
        return r;
    }
    match read_cluster(&node).await {
        Ok(rec) => match rec.nodes.get(&id) {
            Some(n) => Json(node_json(n, &node.id, Blank::of(&node))).into_response(),
            None => error_with(
                StatusCode::NOT_FOUND,
                format!("No node with id {id} is part of this cluster"),
                Some("com.atlassian.bitbucket.NoSuchEntityException"),
            ),
        },
        Err(r) => r,
    }
}

/// A refused transition: 409, with an empty body unless `sim.zdu.conflict.body=json`.
fn conflict(node: &Node, conflict: Conflict) -> Response {
    match node
        .knobs()
        .choice(settings::ZDU_CONFLICT_BODY, &["empty", "json"])
    {
        "json" => error_with(
            StatusCode::CONFLICT,
            conflict.0,
            Some("java.lang.IllegalStateException"),
        ),
        _ => StatusCode::CONFLICT.into_response(),
    }
}

/// Runs one state-machine transition; 409 when the cluster is in the wrong state.
async fn transition(
    node: Shared,
    headers: HeaderMap,
    change: impl FnOnce(&mut ClusterRecord) -> Result<(), Conflict> + Send + 'static,
) -> Response {
    if let Some(r) = admin_check(&node, &headers, Resource::Zdu) {
        return r;
    }
    let local = node.id.clone();
    let blank = Blank::of(&node);
    match node
        .with_cluster(move |rec| change(rec).map(|()| cluster_json(rec, &local, blank)))
        .await
    {
        Ok(Ok(body)) => Json(body).into_response(),
        Ok(Err(refused)) => conflict(&node, refused),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")),
    }
}

async fn zdu_start(State(node): State<Shared>, headers: HeaderMap) -> Response {
    transition(node, headers, |rec| rec.start_upgrade()).await
}

async fn zdu_cancel(State(node): State<Shared>, headers: HeaderMap) -> Response {
    transition(node, headers, |rec| rec.cancel_upgrade()).await
}

fn tasks_knobs(node: &Node) -> (u64, bool) {
    let knobs = node.knobs();
    (
        knobs.u64_or(settings::UPGRADE_TASKS_MS, 1_000),
        knobs.flag(settings::UPGRADE_TASKS_FAIL),
    )
}

async fn zdu_approve(State(node): State<Shared>, headers: HeaderMap) -> Response {
    let (ms, fail) = tasks_knobs(&node);
    transition(node, headers, move |rec| rec.approve(now_ms(), ms, fail)).await
}

/// Not in Bitbucket's documented API: 404 unless `sim.zdu.retry.upgrade=true`.
async fn zdu_retry(State(node): State<Shared>, headers: HeaderMap) -> Response {
    if !node.knobs().flag(settings::ZDU_RETRY_UPGRADE) {
        return not_found();
    }
    let (ms, fail) = tasks_knobs(&node);
    transition(node, headers, move |rec| rec.retry(now_ms(), ms, fail)).await
}

async fn admin_cluster(State(node): State<Shared>, headers: HeaderMap) -> Response {
    if let Some(r) = admin_check(&node, &headers, Resource::Admin) {
        return r;
    }
    let rec = match read_cluster(&node).await {
        Ok(rec) => rec,
        Err(r) => return r,
    };
    let view = |n: &NodeRecord| {
        json!({
            "id": n.id,
            "name": n.name,
            "address": {"hostName": n.ip_address, "port": n.hazelcast_port},
            "local": n.id == node.id,
            "buildVersion": n.version.to_string(),
        })
    };
    let members: Vec<Value> = rec
        .nodes
        .values()
        .filter(|n| n.state.is_up())
        .map(view)
        .collect();
    let local = rec.nodes.get(&node.id).map(view);
    Json(json!({"localNode": local, "nodes": members, "running": true})).into_response()
}

/// Traffic is served only while running; returns the session id and whether it is new.
fn session(headers: &HeaderMap) -> (String, bool) {
    let existing = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == SESSION_COOKIE)
        .map(|(_, v)| v.to_string())
        .filter(|v| !v.is_empty());
    match existing {
        Some(id) => (id, false),
        None => (uuid::Uuid::new_v4().simple().to_string(), true),
    }
}

fn traffic_headers(node: &Node, response: &mut Response, session: &str, new_session: bool) {
    let h = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&node.cfg.handle()) {
        h.insert("X-Sim-Node", v);
    }
    if let Ok(v) = HeaderValue::from_str(&node.cfg.version.to_string()) {
        h.insert("X-Sim-Version", v);
    }
    if new_session
        && let Ok(v) =
            HeaderValue::from_str(&format!("{SESSION_COOKIE}={session}; Path=/; HttpOnly"))
    {
        h.insert(header::SET_COOKIE, v);
    }
}

/// Users are served only while the node runs and is not in maintenance.
fn not_serving(node: &Node) -> Option<Response> {
    let health = node.health();
    if health != Health::Running {
        return Some(error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("Bitbucket is {}", health.name()),
        ));
    }
    if node.knobs().flag(settings::MAINTENANCE) {
        return Some(error(
            StatusCode::SERVICE_UNAVAILABLE,
            "Bitbucket is in maintenance mode",
        ));
    }
    None
}

async fn page(State(node): State<Shared>, headers: HeaderMap, uri: axum::http::Uri) -> Response {
    if let Some(refused) = not_serving(&node) {
        return refused;
    }
    let _in_flight = node.traffic.begin();
    let (id, new_session) = session(&headers);
    node.traffic.saw_session(&id);
    let slow = node.knobs().u64_or(settings::SLOW_RESPONSE_MS, 0);
    if slow > 0 {
        tokio::time::sleep(Duration::from_millis(slow)).await;
    }
    let body = if uri.path() == "/" {
        format!(
            "<html><body>Bitbucket {} on {}</body></html>",
            node.cfg.version,
            node.cfg.handle()
        )
        .into_response()
    } else {
        Json(json!({"size": 1, "limit": 25, "isLastPage": true, "start": 0,
            "values": [{"key": "PRJ", "id": 1, "name": "Project", "public": false, "type": "NORMAL"}]}))
        .into_response()
    };
    let mut response = body;
    traffic_headers(&node, &mut response, &id, new_session);
    response
}

/// A Git clone: takes the configured time, streaming its body in pieces, counted in flight until the
/// last piece is out.
async fn clone(
    State(node): State<Shared>,
    headers: HeaderMap,
    Path((_project, repo)): Path<(String, String)>,
) -> Response {
    if let Some(refused) = not_serving(&node) {
        return refused;
    }
    if !repo.ends_with(".git") {
        return error(
            StatusCode::NOT_FOUND,
            format!("repository {repo} does not exist"),
        );
    }
    let in_flight = node.traffic.begin();
    let (id, new_session) = session(&headers);
    node.traffic.saw_session(&id);
    let knobs = node.knobs();
    let chunks = knobs.u64_or(settings::CLONE_CHUNKS, 10).max(1);
    let pause = Duration::from_millis(knobs.u64_or(settings::CLONE_MS, 3_000) / chunks);
    let stream = futures::stream::unfold((0u64, in_flight), move |(sent, guard)| async move {
        if sent == chunks {
            drop(guard);
            return None;
        }
        tokio::time::sleep(pause).await;
        let piece = bytes_piece(sent);
        Some((Ok::<_, std::io::Error>(piece), (sent + 1, guard)))
    });
    let mut response = Response::new(Body::from_stream(stream));
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-git-upload-pack-advertisement"),
    );
    h.insert(
        header::CONTENT_LENGTH,
        HeaderValue::from(chunks * CLONE_CHUNK_BYTES as u64),
    );
    traffic_headers(&node, &mut response, &id, new_session);
    response
}

fn bytes_piece(index: u64) -> Vec<u8> {
    vec![b'a' + (index % 26) as u8; CLONE_CHUNK_BYTES]
}

async fn sim_info(State(node): State<Shared>) -> Response {
    let health = node.health();
    Json(json!({
        "nodeName": node.cfg.reported_name(),
        "clusterNodeName": node.cfg.name,
        "nodeLabel": node.cfg.label,
        "nodeId": node.id,
        "ipAddress": node.cfg.address.to_string(),
        "hazelcastPort": node.hazelcast_port(),
        "sshPort": node.cfg.ssh_port,
        "maintenance": node.knobs().flag(settings::MAINTENANCE),
        "version": node.cfg.version.to_string(),
        "pid": node.pid,
        "installDir": node.cfg.install,
        "home": node.cfg.home,
        "bundledSearchStarted": node.bundled_search.load(std::sync::atomic::Ordering::SeqCst),
        "port": node.cfg.port,
        "state": health.name(),
        "error": match &health { Health::Error(reason) => Some(reason.clone()), _ => None },
        "tasksTotal": node.tasks_total(),
        "activeUserCount": node.active_users(),
    }))
    .into_response()
}

async fn sim_faults(State(node): State<Shared>) -> Response {
    Json(node.knobs().overrides().clone()).into_response()
}

/// Sets runtime knob overrides on this node: a JSON object of knob name to value.
async fn set_sim_faults(
    State(node): State<Shared>,
    Json(body): Json<BTreeMap<String, Value>>,
) -> Response {
    let Ok(mut knobs) = node.knobs.write() else {
        return error(StatusCode::INTERNAL_SERVER_ERROR, "knobs unavailable");
    };
    for (k, v) in &body {
        let value = match v {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        knobs.set_override(k, &value);
    }
    Json(knobs.overrides().clone()).into_response()
}
