//! The client against documents shaped as BITBUCKET-FACTS.md describes the real product's answers
//! (fixtures in `fixtures/`), served over HTTP so status codes and headers take part too.

use super::*;
use crate::node_match::{Match, NodeKey, match_all};
use axum::Router;
use axum::http::HeaderMap as AxumHeaders;
use axum::response::IntoResponse;
use axum::routing::{get, post};

const RESTARTED: &str = include_str!("fixtures/cluster-restarted-new-ids.json");
const NULLS: &str = include_str!("fixtures/cluster-null-fields.json");
const FINALIZING: &str = include_str!("fixtures/cluster-finalizing-with-offline-rows.json");
const MINIMAL: &str = include_str!("fixtures/cluster-minimal-rows.json");
const STATE: &str = include_str!("fixtures/state.json");
const CONFLICT: &str = include_str!("fixtures/error-conflict.json");
const NOT_CLUSTERED: &str = include_str!("fixtures/error-not-clustered.json");
const NOT_PERMITTED: &str = include_str!("fixtures/error-not-permitted.json");

/// Basic `admin:pa55` as Bitbucket would check it.
const BASIC: &str = "Basic YWRtaW46cGE1NQ==";

fn parse(doc: &str) -> ClusterView {
    parse_body("fixture", doc).unwrap()
}

fn key(node: &str, name: Option<&str>, addr: &str) -> NodeKey {
    NodeKey {
        node: node.into(),
        name: name.map(Into::into),
        address: Some(addr.parse().unwrap()),
        address_error: None,
    }
}

#[test]
fn restarted_nodes_come_back_under_new_ids_and_are_followed_by_address() {
    let v = parse(RESTARTED);
    assert_eq!(v.nodes.len(), 4);
    let offline = &v.nodes[0];
    assert_eq!(offline.state, NodeState::Offline);
    assert_eq!(
        (offline.version.as_deref(), offline.tasks_total),
        (None, None)
    );
    assert_eq!(offline.version_or_dash(), "-");
    let starting = &v.nodes[3];
    assert_eq!(
        (starting.ip_address.as_deref(), starting.port_number),
        (None, None)
    );
    let m = match_all(
        &v,
        &[
            key("node1", None, "10.0.0.11"),
            key("node2", Some("Not configured"), "10.0.0.12"),
        ],
    );
    let rows: Vec<_> = m.iter().map(|m| m.row().map(|z| z.id.as_str())).collect();
    assert_eq!(
        rows,
        [
            Some("7d2c1b0a-9e8f-4a6b-8c5d-3e2f1a0b9c03"),
            Some("0b8e6f3a-52c4-4f5e-a1d2-7c9b3e4f6a02")
        ]
    );
    assert!(m[0].row().unwrap().runs("8.19.6"));
}

#[test]
fn null_and_blank_fields_read_as_unknown() {
    let v = parse(NULLS);
    let (offline, starting, active) = (&v.nodes[0], &v.nodes[1], &v.nodes[2]);
    assert_eq!(offline.version, None);
    assert_eq!(offline.tasks(), 0);
    assert_eq!(starting.version, None, "a blank version is no version");
    assert_eq!(starting.ip_address, None);
    assert_eq!(active.build_number.as_deref(), Some("8019003"));
    assert_eq!(active.name.as_deref(), Some("bitbucket-2"));
    // A configured name finds the live row; the node that is starting maps to nothing yet.
    let m = match_all(
        &v,
        &[
            key("n2", Some("bitbucket-2"), "10.0.0.12"),
            key("n1", None, "10.0.0.11"),
        ],
    );
    assert_eq!(m[0].row().unwrap().id, active.id);
    assert_eq!(m[1].row().unwrap().state, NodeState::Offline);
}

#[test]
fn offline_rows_left_behind_do_not_hide_a_finished_cluster() {
    let v = parse(FINALIZING);
    assert_eq!(v.state, ClusterState::ReadyToRunUpgradeTasks);
    let m = match_all(
        &v,
        &[key("n1", None, "10.0.0.11"), key("n2", None, "10.0.0.12")],
    );
    assert!(m.iter().all(|m| m.row().is_some_and(|z| z.runs("8.19.6"))));
}

#[test]
fn rows_with_only_the_required_fields_and_unknown_states_parse() {
    let v = parse(MINIMAL);
    assert_eq!(
        v.state,
        ClusterState::Unknown("RUNNING_FINALIZE_UPGRADE_TASKS".into())
    );
    assert_eq!(v.nodes[0].id, "");
    assert_eq!(v.nodes[0].state.as_str(), "(none)");
    assert_eq!(v.nodes[1].state, NodeState::Draining);
    assert!(matches!(
        crate::node_match::match_node(&v, &key("n", None, "10.0.0.1")),
        Match::Missing(_)
    ));
}

#[test]
fn state_document_names_the_answering_node_and_no_upgrade_mode() {
    let s: ClusterStateView = parse_body("fixture", STATE).unwrap();
    assert_eq!(s.state, ClusterState::ReadyToUpgrade);
    let node = s.build_info.unwrap();
    assert!(node.local);
    assert_eq!(node.version.as_deref(), Some("8.19.3"));
}

/// Serves the fixtures: `/cluster` and `/state` need Basic `admin:pa55`; `start` answers 409 with an
/// empty body, `cancel` 409 with a JSON body, `approve` like a non-clustered instance,
/// `retryUpgrade` 404 (not in Bitbucket's API).
async fn serve() -> String {
    async fn guarded(h: AxumHeaders, body: &'static str) -> axum::response::Response {
        if h.get("authorization").and_then(|v| v.to_str().ok()) != Some(BASIC) {
            return (StatusCode::UNAUTHORIZED, NOT_PERMITTED).into_response();
        }
        ([("content-type", "application/json")], body).into_response()
    }
    let app = Router::new()
        .route(
            "/rest/zdu/cluster",
            get(|h: AxumHeaders| guarded(h, RESTARTED)),
        )
        .route("/rest/zdu/state", get(|h: AxumHeaders| guarded(h, STATE)))
        .route("/rest/zdu/start", post(|| async { StatusCode::CONFLICT }))
        .route(
            "/rest/zdu/cancel",
            post(|| async { (StatusCode::CONFLICT, CONFLICT) }),
        )
        .route(
            "/rest/zdu/approve",
            post(|| async { (StatusCode::UNAUTHORIZED, NOT_CLUSTERED) }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}")
}

fn basic(base: &str, password: &str) -> ZduClient {
    let creds = Credentials::Basic {
        user: "admin".into(),
        password: Secret::new(password, "environment variable BB_PASSWORD"),
    };
    ZduClient::new(base, creds, Duration::from_secs(5)).unwrap()
}

#[tokio::test]
async fn basic_auth_reads_the_real_documents() {
    let base = serve().await;
    let c = basic(&base, "pa55");
    assert_eq!(c.cluster().await.unwrap().nodes.len(), 4);
    assert_eq!(c.state().await.unwrap().state, ClusterState::ReadyToUpgrade);
}

#[tokio::test]
async fn refusals_each_say_what_they_are() {
    let base = serve().await;
    let err = basic(&base, "wrong").cluster().await.unwrap_err();
    assert!(
        matches!(err, ZduError::Unauthorized { code: 401, .. }),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("user 'admin'") && msg.contains("BB_PASSWORD"),
        "{msg}"
    );
    assert!(!msg.contains("wrong"), "{msg}");

    let c = basic(&base, "pa55");
    match c.start().await.unwrap_err() {
        ZduError::Conflict { body, .. } => assert_eq!(body, "(empty body)"),
        other => panic!("{other:?}"),
    }
    match c.cancel().await.unwrap_err() {
        ZduError::Conflict { body, .. } => assert!(body.contains("upgrade mode"), "{body}"),
        other => panic!("{other:?}"),
    }
    let err = c.approve().await.unwrap_err();
    assert!(matches!(err, ZduError::NotClustered { .. }), "{err:?}");
    assert!(err.to_string().contains("clustered installation"), "{err}");
    let err = c.retry_upgrade().await.unwrap_err();
    assert!(matches!(err, ZduError::NotSupported { .. }), "{err:?}");
}
