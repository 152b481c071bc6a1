//! Client for Bitbucket Data Center's rolling-upgrade REST API (`/rest/zdu`), authenticated as a system
//! administrator (HTTP Basic or a Bearer token).

mod credentials;
mod model;

pub use credentials::{Credentials, Secret, SecretError};
pub use model::{ClusterState, ClusterStateView, ClusterView, NodeState, ZduNode};

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use reqwest::header::{AUTHORIZATION, HeaderMap, HeaderValue};
use reqwest::{Method, StatusCode, Url};
use serde::Deserialize;
use serde::de::DeserializeOwned;

/// Extra attempts made for an idempotent GET after a connect error, a timeout or a 5xx answer.
pub const GET_RETRIES: u32 = 3;
/// Pause before the first GET retry; doubled before each following one.
pub const RETRY_BACKOFF_MS: u64 = 100;
/// How much of an unexpected response body an error quotes.
const BODY_EXCERPT_CHARS: usize = 400;

/// What went wrong talking to the rolling-upgrade API; callers branch on the kind.
#[derive(Debug, thiserror::Error)]
pub enum ZduError {
    #[error("{what}: HTTP {code}: Bitbucket refused {credentials}{hint}")]
    Unauthorized {
        what: String,
        code: u16,
        credentials: String,
        /// What to do; differs for a token (which may lack system-admin rights) and a password.
        hint: String,
    },
    #[error(
        "{what}: HTTP {code}: this Bitbucket is not a Data Center cluster ({message}); rolling upgrades need a clustered installation"
    )]
    NotClustered {
        what: String,
        code: u16,
        message: String,
    },
    #[error("{what}: HTTP 404: this Bitbucket does not offer {action}")]
    NotSupported { what: String, action: String },
    #[error(
        "Bitbucket refused {action} in the cluster's current state (HTTP 409): {body}; check the cluster state with `bbupgrade status`"
    )]
    Conflict { action: String, body: String },
    #[error("{what}: unexpected HTTP {code}: {body}")]
    Status {
        what: String,
        code: u16,
        body: String,
    },
    #[error(
        "{what}: no answer within {after:?}; check that Bitbucket is up, or raise the request timeout"
    )]
    Timeout { what: String, after: Duration },
    #[error(
        "{what}: cannot connect: {reason}; check the Bitbucket base URL and that the node is reachable"
    )]
    Connect { what: String, reason: String },
    #[error("{what}: the answer is not what the rolling-upgrade API returns: {reason}")]
    Decode { what: String, reason: String },
    #[error("invalid rolling-upgrade client settings: {0}")]
    Config(String),
}

impl ZduError {
    /// Worth retrying for an idempotent request: the server may answer next time.
    fn is_transient(&self) -> bool {
        match self {
            ZduError::Timeout { .. } | ZduError::Connect { .. } => true,
            ZduError::Status { code, .. } => *code >= 500,
            _ => false,
        }
    }
}

/// Parses a response body, naming the request when it does not fit.
pub fn parse_body<T: DeserializeOwned>(what: &str, body: &str) -> Result<T, ZduError> {
    serde_json::from_str(body).map_err(|e| ZduError::Decode {
        what: what.to_string(),
        reason: format!("{e} in {}", excerpt(body)),
    })
}

/// Bitbucket's `{"errors":[{"message":..}]}` messages when present, else the start of the body.
fn excerpt(body: &str) -> String {
    #[derive(Deserialize)]
    struct Errors {
        errors: Vec<Message>,
    }
    #[derive(Deserialize)]
    struct Message {
        message: String,
    }
    if let Ok(e) = serde_json::from_str::<Errors>(body)
        && !e.errors.is_empty()
    {
        return e
            .errors
            .into_iter()
            .map(|m| m.message)
            .collect::<Vec<_>>()
            .join("; ");
    }
    let trimmed = body.trim();
    if trimmed.is_empty() {
        return "(empty body)".to_string();
    }
    let mut out: String = trimmed.chars().take(BODY_EXCERPT_CHARS).collect();
    if trimmed.chars().count() > BODY_EXCERPT_CHARS {
        out.push('…');
    }
    out
}

/// A rolling-upgrade API client for one Bitbucket base URL; cheap to clone.
#[derive(Clone)]
pub struct ZduClient {
    http: reqwest::Client,
    base: Url,
    credentials: Arc<Credentials>,
    timeout: Duration,
}

impl fmt::Debug for ZduClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ZduClient")
            .field("base", &self.base.as_str())
            .field("credentials", &"***")
            .finish()
    }
}

impl ZduClient {
    /// `base_url` is Bitbucket's base URL (with its context path, if any), `http://` or `https://`.
    pub fn new(
        base_url: &str,
        credentials: Credentials,
        request_timeout: Duration,
    ) -> Result<Self, ZduError> {
        let base = Url::parse(base_url).map_err(|e| {
            ZduError::Config(format!(
                "Bitbucket base URL {base_url:?} is not a URL ({e}); write it like https://bitbucket.example.com"
            ))
        })?;
        if !matches!(base.scheme(), "http" | "https") || base.cannot_be_a_base() {
            return Err(ZduError::Config(format!(
                "Bitbucket base URL {base_url:?} must start with http:// or https://"
            )));
        }
        let mut auth = HeaderValue::from_str(&credentials.header()).map_err(|_| {
            ZduError::Config(format!(
                "{} contains characters not allowed in an HTTP header; check it",
                credentials.describe()
            ))
        })?;
        auth.set_sensitive(true);
        let mut headers = HeaderMap::new();
        headers.insert(AUTHORIZATION, auth);
        let http = reqwest::Client::builder()
            .use_rustls_tls()
            .default_headers(headers)
            .timeout(request_timeout)
            // A redirect usually means a login page or a wrong base URL; say so instead of following it.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| ZduError::Config(format!("cannot build the HTTP client: {e}")))?;
        Ok(Self {
            http,
            base,
            credentials: Arc::new(credentials),
            timeout: request_timeout,
        })
    }

    /// The base URL the client talks to.
    pub fn base_url(&self) -> &str {
        self.base.as_str()
    }

    /// `GET /rest/zdu/cluster`: upgrade mode, cluster state and every node.
    pub async fn cluster(&self) -> Result<ClusterView, ZduError> {
        self.get(&["cluster"]).await
    }

    /// `GET /rest/zdu/state`: the cluster state and the node that answered.
    pub async fn state(&self) -> Result<ClusterStateView, ZduError> {
        self.get(&["state"]).await
    }

    /// `GET /rest/zdu/nodes/{id}`.
    pub async fn node(&self, id: &str) -> Result<ZduNode, ZduError> {
        self.get(&["nodes", id]).await
    }

    /// `POST /rest/zdu/start`: enable upgrade mode. Not retried; after a timeout, read `state()` to learn
    /// whether it took effect.
    pub async fn start(&self) -> Result<(), ZduError> {
        self.post("start", "enabling upgrade mode (POST /rest/zdu/start)")
            .await
    }

    /// `POST /rest/zdu/cancel`: leave upgrade mode; only allowed while no node runs the new version.
    pub async fn cancel(&self) -> Result<(), ZduError> {
        self.post("cancel", "cancelling upgrade mode (POST /rest/zdu/cancel)")
            .await
    }

    /// `POST /rest/zdu/approve`: finalize once every node is `ACTIVE` on the new version.
    pub async fn approve(&self) -> Result<(), ZduError> {
        self.post("approve", "approving the upgrade (POST /rest/zdu/approve)")
            .await
    }

    /// `POST /rest/zdu/retryUpgrade`: run the upgrade tasks again after they failed. Not in Bitbucket's
    /// documented API (other products' builds have it): a 404 is [`ZduError::NotSupported`].
    pub async fn retry_upgrade(&self) -> Result<(), ZduError> {
        self.post(
            "retryUpgrade",
            "retrying the upgrade tasks (POST /rest/zdu/retryUpgrade)",
        )
        .await
    }

    fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.base.clone();
        // cannot_be_a_base was refused in new(), so path_segments_mut succeeds.
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(["rest", "zdu"]).extend(segments);
        }
        url
    }

    async fn get<T: DeserializeOwned>(&self, segments: &[&str]) -> Result<T, ZduError> {
        let url = self.url(segments);
        let what = format!("GET {url}");
        let mut backoff = Duration::from_millis(RETRY_BACKOFF_MS);
        let mut retries_left = GET_RETRIES;
        loop {
            match self.exchange(Method::GET, url.clone(), &what, &what).await {
                Ok(body) => return parse_body(&what, &body),
                Err(e) if e.is_transient() && retries_left > 0 => {
                    tracing::debug!(error = %e, retries_left, "retrying rolling-upgrade API read");
                    retries_left -= 1;
                    tokio::time::sleep(backoff).await;
                    backoff *= 2;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn post(&self, endpoint: &str, action: &str) -> Result<(), ZduError> {
        let url = self.url(&[endpoint]);
        let what = format!("POST {url}");
        self.exchange(Method::POST, url, &what, action)
            .await
            .map(|_| ())
    }

    /// One request; maps the status to an error kind and returns the body of a 2xx answer.
    async fn exchange(
        &self,
        method: Method,
        url: Url,
        what: &str,
        action: &str,
    ) -> Result<String, ZduError> {
        let mut request = self.http.request(method.clone(), url);
        if method == Method::POST {
            // Bitbucket's XSRF check refuses POSTs without this header.
            request = request.header("X-Atlassian-Token", "no-check");
        }
        let response = request.send().await.map_err(|e| self.transport(what, &e))?;
        let status = response.status();
        let body = response
            .text()
            .await
            .map_err(|e| self.transport(what, &e))?;
        classify(status, body, what, action, &self.credentials)
    }

    fn transport(&self, what: &str, e: &reqwest::Error) -> ZduError {
        if e.is_timeout() {
            ZduError::Timeout {
                what: what.to_string(),
                after: self.timeout,
            }
        } else {
            ZduError::Connect {
                what: what.to_string(),
                reason: error_chain(e),
            }
        }
    }
}

/// Maps an HTTP answer to the body or an error kind.
fn classify(
    status: StatusCode,
    body: String,
    what: &str,
    action: &str,
    credentials: &Credentials,
) -> Result<String, ZduError> {
    match status.as_u16() {
        200..=299 => Ok(body),
        code @ (401 | 403) if body.to_ascii_lowercase().contains("clustered") => {
            Err(ZduError::NotClustered {
                what: what.to_string(),
                code,
                message: excerpt(&body),
            })
        }
        code @ (401 | 403) => Err(ZduError::Unauthorized {
            what: what.to_string(),
            code,
            credentials: credentials.describe(),
            hint: if credentials.is_bearer() {
                "; the rolling-upgrade API is for system administrators, and a personal access token may not carry that right: use a system administrator's token, or auth = \"basic\" with a system administrator's user and password".to_string()
            } else {
                "; check the user and password, and that the user is a system administrator"
                    .to_string()
            },
        }),
        404 if what.starts_with("POST") => Err(ZduError::NotSupported {
            what: what.to_string(),
            action: action.to_string(),
        }),
        409 => Err(ZduError::Conflict {
            action: action.to_string(),
            body: excerpt(&body),
        }),
        code @ 300..=399 => Err(ZduError::Status {
            what: what.to_string(),
            code,
            body: "redirected; check the Bitbucket base URL (scheme, host and context path)"
                .to_string(),
        }),
        code => Err(ZduError::Status {
            what: what.to_string(),
            code,
            body: excerpt(&body),
        }),
    }
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        let text = inner.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cur = inner.source();
    }
    out
}

#[cfg(test)]
mod contract_tests;

#[cfg(test)]
mod tests {
    use super::*;
    use axum::Router;
    use axum::extract::State;
    use axum::http::HeaderMap as AxumHeaders;
    use axum::response::IntoResponse;
    use axum::routing::{get, post};
    use std::sync::atomic::{AtomicU32, Ordering};

    const TOKEN: &str = "s3cr3t-token";

    const CLUSTER_JSON: &str = r#"{
        "upgradeModeEnabled": true,
        "state": "MIXED",
        "originalVersion": "8.19.3",
        "nodes": [
            {"id": "a1", "name": "node-1", "ipAddress": "10.0.0.1", "state": "ACTIVE",
             "tasksTotal": 3, "activeUserCount": 12, "buildNumber": "8019003",
             "version": "8.19.3", "local": true, "portNumber": 5701},
            {"id": "b2", "name": "node-2", "ipAddress": "10.0.0.2", "state": "SOMETHING_NEW",
             "tasksTotal": 0, "activeUserCount": 0, "buildNumber": 8019006,
             "version": "8.19.6", "local": false, "portNumber": 5701}
        ]
    }"#;

    #[derive(Default)]
    struct Hits {
        state: AtomicU32,
        slow: AtomicU32,
        cancel: AtomicU32,
    }

    fn authorized(h: &AxumHeaders) -> bool {
        h.get("authorization").and_then(|v| v.to_str().ok()) == Some(&format!("Bearer {TOKEN}"))
    }

    async fn serve(hits: Arc<Hits>) -> String {
        let app = Router::new()
            .route(
                "/bb/rest/zdu/cluster",
                get(|h: AxumHeaders| async move {
                    if !authorized(&h) {
                        return (StatusCode::UNAUTHORIZED, "{}").into_response();
                    }
                    (
                        [("content-type", "application/json")],
                        CLUSTER_JSON.to_string(),
                    )
                        .into_response()
                }),
            )
            .route(
                "/bb/rest/zdu/state",
                get(|State(hits): State<Arc<Hits>>| async move {
                    // The first read fails like a node still starting; the retry succeeds.
                    if hits.state.fetch_add(1, Ordering::SeqCst) == 0 {
                        return (StatusCode::INTERNAL_SERVER_ERROR, "boom").into_response();
                    }
                    r#"{"state":"STABLE","buildInfo":{"id":"a1","state":"ACTIVE","version":"8.19.3","local":true}}"#.into_response()
                }),
            )
            .route(
                "/bb/rest/zdu/nodes/{id}",
                get(
                    |State(hits): State<Arc<Hits>>,
                     axum::extract::Path(id): axum::extract::Path<String>| async move {
                        if id == "slow" {
                            hits.slow.fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(Duration::from_secs(5)).await;
                        }
                        if id == "garbage" {
                            return "<html>login</html>".into_response();
                        }
                        format!(
                            r#"{{"id":"{id}","name":"n","ipAddress":"::1","state":"OFFLINE","version":"8.19.3","buildNumber":null}}"#
                        )
                        .into_response()
                    },
                ),
            )
            .route(
                "/bb/rest/zdu/start",
                post(|h: AxumHeaders| async move {
                    assert_eq!(
                        h.get("x-atlassian-token").and_then(|v| v.to_str().ok()),
                        Some("no-check")
                    );
                    (
                        StatusCode::CONFLICT,
                        r#"{"errors":[{"message":"upgrade mode is already enabled"}]}"#,
                    )
                }),
            )
            .route("/bb/rest/zdu/approve", post(|| async { CLUSTER_JSON }))
            .route(
                "/bb/rest/zdu/cancel",
                post(|State(hits): State<Arc<Hits>>| async move {
                    hits.cancel.fetch_add(1, Ordering::SeqCst);
                    (StatusCode::INTERNAL_SERVER_ERROR, "oops")
                }),
            )
            .with_state(hits);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        format!("http://{addr}/bb/")
    }

    fn client(base: &str, token: &str, timeout: Duration) -> ZduClient {
        ZduClient::new(
            base,
            Credentials::Bearer(Secret::new(token, "file /etc/bb/token")),
            timeout,
        )
        .unwrap()
    }

    #[tokio::test]
    async fn reads_cluster_with_mixed_build_numbers_and_unknown_states() {
        let base = serve(Arc::default()).await;
        let view = client(&base, TOKEN, Duration::from_secs(5))
            .cluster()
            .await
            .unwrap();
        assert!(view.upgrade_mode_enabled);
        assert_eq!(view.state, ClusterState::Mixed);
        assert_eq!(view.original_version.as_deref(), Some("8.19.3"));
        assert_eq!(view.nodes.len(), 2);
        let (a, b) = (&view.nodes[0], &view.nodes[1]);
        assert_eq!(a.state, NodeState::Active);
        assert_eq!(a.build_number.as_deref(), Some("8019003"));
        assert_eq!((a.tasks_total, a.active_user_count), (Some(3), Some(12)));
        assert!(a.local);
        assert_eq!(a.port_number, Some(5701));
        assert_eq!(b.state, NodeState::Unknown("SOMETHING_NEW".into()));
        assert_eq!(b.build_number.as_deref(), Some("8019006"));
    }

    #[tokio::test]
    async fn node_with_null_build_number_and_base_without_trailing_slash() {
        let base = serve(Arc::default()).await;
        let base = base.trim_end_matches('/');
        let node = client(base, TOKEN, Duration::from_secs(5))
            .node("a1")
            .await
            .unwrap();
        assert_eq!(node.id, "a1");
        assert_eq!(node.state, NodeState::Offline);
        assert_eq!(node.build_number, None);
    }

    #[tokio::test]
    async fn refused_token_names_its_origin_not_its_value() {
        let base = serve(Arc::default()).await;
        let err = client(&base, "wrong-token", Duration::from_secs(5))
            .cluster()
            .await
            .unwrap_err();
        assert!(
            matches!(err, ZduError::Unauthorized { code: 401, .. }),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(msg.contains("file /etc/bb/token"), "{msg}");
        assert!(msg.contains("system administrator"), "{msg}");
        assert!(msg.contains("auth = \"basic\""), "{msg}");
        assert!(!msg.contains("wrong-token"), "{msg}");
    }

    #[tokio::test]
    async fn conflict_on_post_carries_bitbucket_message() {
        let base = serve(Arc::default()).await;
        let err = client(&base, TOKEN, Duration::from_secs(5))
            .start()
            .await
            .unwrap_err();
        match &err {
            ZduError::Conflict { action, body } => {
                assert!(action.contains("enabling upgrade mode"), "{action}");
                assert_eq!(body, "upgrade mode is already enabled");
            }
            other => panic!("expected a conflict, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn successful_post() {
        let base = serve(Arc::default()).await;
        client(&base, TOKEN, Duration::from_secs(5))
            .approve()
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn get_retries_after_5xx_but_post_does_not() {
        let hits = Arc::new(Hits::default());
        let base = serve(hits.clone()).await;
        let c = client(&base, TOKEN, Duration::from_secs(5));
        let state = c.state().await.unwrap();
        assert_eq!(state.state, ClusterState::Stable);
        assert_eq!(state.build_info.unwrap().id, "a1");
        assert_eq!(hits.state.load(Ordering::SeqCst), 2);

        let err = c.cancel().await.unwrap_err();
        assert!(matches!(err, ZduError::Status { code: 500, .. }), "{err:?}");
        assert_eq!(hits.cancel.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn slow_answer_times_out_after_bounded_retries() {
        let hits = Arc::new(Hits::default());
        let base = serve(hits.clone()).await;
        let err = client(&base, TOKEN, Duration::from_millis(100))
            .node("slow")
            .await
            .unwrap_err();
        assert!(matches!(err, ZduError::Timeout { .. }), "{err:?}");
        assert!(err.to_string().contains("/rest/zdu/nodes/slow"), "{err}");
        assert_eq!(hits.slow.load(Ordering::SeqCst), 1 + GET_RETRIES);
    }

    #[tokio::test]
    async fn html_answer_is_a_decode_error() {
        let base = serve(Arc::default()).await;
        let err = client(&base, TOKEN, Duration::from_secs(5))
            .node("garbage")
            .await
            .unwrap_err();
        assert!(matches!(err, ZduError::Decode { .. }), "{err:?}");
        assert!(err.to_string().contains("<html>login</html>"), "{err}");
    }

    #[tokio::test]
    async fn nothing_listening_is_a_connect_error() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let err = client(&format!("http://{addr}"), TOKEN, Duration::from_secs(2))
            .state()
            .await
            .unwrap_err();
        assert!(matches!(err, ZduError::Connect { .. }), "{err:?}");
    }

    #[test]
    fn bad_base_urls_are_refused() {
        for bad in ["bitbucket.example.com", "ftp://x/", "mailto:a@b"] {
            let creds = Credentials::Bearer(Secret::new("t", "test"));
            let err = ZduClient::new(bad, creds, Duration::from_secs(1)).unwrap_err();
            assert!(matches!(err, ZduError::Config(_)), "{bad}: {err:?}");
        }
        let c = ZduClient::new(
            "https://bb.example.com/ctx",
            Credentials::Basic {
                user: "admin".into(),
                password: Secret::new("supersecret", "test"),
            },
            Duration::from_secs(1),
        )
        .unwrap();
        assert_eq!(
            c.url(&["nodes", "a/b"]).as_str(),
            "https://bb.example.com/ctx/rest/zdu/nodes/a%2Fb"
        );
        assert!(!format!("{c:?}").contains("supersecret"));
    }

    #[test]
    fn secret_never_prints_and_loads_from_file_and_env() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "abc123\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = Secret::from_file(&path).unwrap_err();
        assert!(
            matches!(err, SecretError::TooOpen { mode: 0o644, .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains("chmod 600"), "{err}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let s = Secret::from_file(&path).unwrap();
        assert_eq!(s.expose(), "abc123");
        assert_eq!(format!("{s}"), "***");
        assert_eq!(format!("{s:?}"), "***");
        assert!(s.origin().contains("token"));

        std::fs::write(&path, "\n").unwrap();
        let err = Secret::from_file(&path).unwrap_err();
        assert!(matches!(err, SecretError::EmptyFile { .. }));
        assert!(err.to_string().contains(&path.display().to_string()));

        let missing = dir.path().join("nope");
        let err = Secret::from_file(&missing).unwrap_err();
        assert!(err.to_string().contains("nope"), "{err}");

        let err = Secret::from_env("BBUPGRADE_TEST_SURELY_UNSET_VAR").unwrap_err();
        assert!(err.to_string().contains("BBUPGRADE_TEST_SURELY_UNSET_VAR"));
    }

    #[test]
    fn states_round_trip_and_keep_unknown_strings() {
        for s in [
            "STABLE",
            "READY_TO_UPGRADE",
            "MIXED",
            "READY_TO_RUN_UPGRADE_TASKS",
            "RUNNING_UPGRADE_TASKS",
            "UPGRADE_TASKS_FAILED",
            "NEW_THING",
        ] {
            let parsed: ClusterState = serde_json::from_str(&format!("\"{s}\"")).unwrap();
            assert_eq!(parsed.as_str(), s);
            assert_eq!(serde_json::to_string(&parsed).unwrap(), format!("\"{s}\""));
        }
        assert_eq!(
            ClusterState::from("NEW_THING".to_string()),
            ClusterState::Unknown("NEW_THING".into())
        );
        for s in [
            "STARTING",
            "ACTIVE",
            "DRAINING",
            "TERMINATING",
            "OFFLINE",
            "ERROR",
            "ZOMBIE",
        ] {
            let parsed: NodeState = serde_json::from_str(&format!("\"{s}\"")).unwrap();
            assert_eq!(parsed.as_str(), s);
        }
    }
}
