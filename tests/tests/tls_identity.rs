//! Mutual TLS between coordinator and agent, with real handshakes on loopback against a real agent
//! (served in-process on a `127.0.0.1:0` listener): who is let in, who is refused, and that every
//! refusal says which problem it is.

use bbupgrade_common::identity::Role;
use bbupgrade_common::pki::{Ca, IssueRequest, Issued};
use bbupgrade_common::proto::NodeInfoRequest;
use bbupgrade_common::proto::agent_client::AgentClient;
use bbupgrade_common::tls::{TlsFiles, TlsMaterial, connect_agent, error_chain};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::net::TcpListener;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A PKI: our CA and another one nobody trusts.
struct Pki {
    ca: Ca,
    other_ca: Ca,
}

impl Pki {
    fn new() -> Self {
        Self {
            ca: Ca::generate().expect("CA"),
            other_ca: Ca::generate().expect("other CA"),
        }
    }

    fn coordinator(&self) -> TlsMaterial {
        material(
            &self.ca,
            &self
                .ca
                .issue(&IssueRequest::new(Role::Coordinator, "admin"))
                .unwrap(),
        )
    }
}

/// What a party holding `issued` and trusting `trusts` presents and verifies against.
fn material(trusts: &Ca, issued: &Issued) -> TlsMaterial {
    TlsMaterial {
        ca_pem: trusts.cert_pem.clone().into_bytes(),
        cert_pem: issued.cert_pem.clone().into_bytes(),
        key_pem: issued.key_pem.clone().into_bytes(),
        crl_pem: None,
    }
}

fn agent_cert(ca: &Ca, node: &str) -> Issued {
    ca.issue(&IssueRequest::new(Role::Agent, node).with_sans(["127.0.0.1", "localhost"]))
        .unwrap()
}

/// An agent served in-process; stops when dropped.
struct InProcessAgent {
    addr: String,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    _dir: tempfile::TempDir,
}

impl Drop for InProcessAgent {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.task.abort();
    }
}

fn write(path: &Path, text: &str) -> PathBuf {
    std::fs::write(path, text).unwrap();
    path.to_path_buf()
}

/// Starts an agent for `node` presenting `issued` and trusting client certificates of `trusts`.
async fn start_agent(node: &str, trusts: &Ca, issued: &Issued) -> InProcessAgent {
    let dir = bbupgrade_tests::temp_dir();
    let d = dir.path();
    let install_root = d.join("install");
    let current = install_root.join("atlassian-bitbucket-8.19.3");
    std::fs::create_dir_all(current.join("bin")).unwrap();
    write(
        &current.join("bin/start-bitbucket.sh"),
        "#!/bin/sh\nexit 0\n",
    );
    std::fs::create_dir_all(d.join("home")).unwrap();
    let key = write(&d.join("agent.key"), &issued.key_pem);
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let tls = TlsFiles {
        ca: write(&d.join("ca.pem"), &trusts.cert_pem),
        cert: write(&d.join("agent.pem"), &issued.cert_pem),
        key,
        crl: None,
    };
    let raw = bbupgrade_agent::config::RawConfig {
        node_id: node.into(),
        listen: "127.0.0.1:0".into(),
        state_dir: Some(d.join("state")),
        tls: tls.into(),
        bitbucket: bbupgrade_agent::config::RawBitbucket {
            install_root,
            current_install: current,
            home: d.join("home"),
            user: nix::unistd::geteuid()
                .is_root()
                .then(|| "nobody".to_string()),
            // Nothing listens on port 1: the node reads as unreachable, which NodeInfo reports.
            status_url: "http://127.0.0.1:1/status".into(),
            current_link: None,
            carry_files: Vec::new(),
        },
        service: bbupgrade_agent::config::RawService {
            kind: "scripts".into(),
            unit: None,
            path: None,
            systemctl: None,
        },
        limits: Default::default(),
        stage: Default::default(),
        lb: None,
    };
    let settings = bbupgrade_agent::config::Settings::validate(raw).expect("agent settings");
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(bbupgrade_agent::cli::run(settings, listener, async {
        let _ = rx.await;
    }));
    InProcessAgent {
        addr,
        shutdown: Some(tx),
        task,
        _dir: dir,
    }
}

/// Connects as the coordinator does and asks for the node's facts; the node id, or the whole reason.
async fn node_info(addr: &str, m: &TlsMaterial, expected_node: &str) -> Result<String, String> {
    let channel = connect_agent(addr, m, expected_node, CONNECT_TIMEOUT)
        .await
        .map_err(|e| format!("{e:#}"))?;
    let mut client = AgentClient::new(channel);
    let info = client
        .node_info(NodeInfoRequest {})
        .await
        .map_err(|s| format!("{:?}: {}", s.code(), error_chain(&s)))?;
    Ok(info.into_inner().node_id)
}

fn assert_mentions(err: &str, words: &[&str]) {
    let lower = err.to_lowercase();
    for w in words {
        assert!(
            lower.contains(&w.to_lowercase()),
            "the error should mention '{w}': {err}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_certificate_is_accepted() {
    let pki = Pki::new();
    let agent = start_agent("node-a", &pki.ca, &agent_cert(&pki.ca, "node-a")).await;
    let node = node_info(&agent.addr, &pki.coordinator(), "node-a")
        .await
        .expect("a coordinator of our CA is served");
    assert_eq!(node, "node-a");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_without_certificate_is_unauthenticated() {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
    let pki = Pki::new();
    let agent = start_agent("node-a", &pki.ca, &agent_cert(&pki.ca, "node-a")).await;
    // A plain TLS client: verifies the agent, presents nothing.
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&pki.ca.cert_pem))
        .domain_name("localhost");
    let channel = Endpoint::from_shared(format!("https://{}", agent.addr))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect_timeout(CONNECT_TIMEOUT)
        .connect()
        .await
        .expect("the handshake completes without a client certificate");
    let status = AgentClient::new(channel)
        .node_info(NodeInfoRequest {})
        .await
        .expect_err("an anonymous client must be refused");
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
    assert_mentions(status.message(), &["no client certificate"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificate_from_another_ca_is_refused_in_the_handshake() {
    let pki = Pki::new();
    let agent = start_agent("node-a", &pki.ca, &agent_cert(&pki.ca, "node-a")).await;
    let stranger = pki
        .other_ca
        .issue(&IssueRequest::new(Role::Coordinator, "admin"))
        .unwrap();
    // Trusts our CA (so the agent passes), presents a certificate of another CA.
    let err = node_info(&agent.addr, &material(&pki.ca, &stranger), "node-a")
        .await
        .expect_err("a coordinator of another CA must be refused");
    assert!(
        err.contains("UnknownCA") || err.to_lowercase().contains("unknown issuer"),
        "the error should say the CA is unknown: {err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_coordinator_certificate_is_refused() {
    let pki = Pki::new();
    let agent = start_agent("node-a", &pki.ca, &agent_cert(&pki.ca, "node-a")).await;
    let now = time::OffsetDateTime::now_utc();
    let mut req = IssueRequest::new(Role::Coordinator, "admin");
    req.not_before = now - time::Duration::days(30);
    req.not_after = now - time::Duration::days(1);
    let expired = pki.ca.issue(&req).unwrap();
    let err = node_info(&agent.addr, &material(&pki.ca, &expired), "node-a")
        .await
        .expect_err("an expired certificate must be refused");
    assert_mentions(&err, &["expired"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_certificate_presented_as_coordinator_is_permission_denied() {
    let pki = Pki::new();
    let agent = start_agent("node-a", &pki.ca, &agent_cert(&pki.ca, "node-a")).await;
    // Another agent's certificate, of our CA, used to drive node-a.
    let impostor = material(&pki.ca, &agent_cert(&pki.ca, "node-b"));
    let err = node_info(&agent.addr, &impostor, "node-a")
        .await
        .expect_err("an agent-role peer must be refused");
    assert!(err.starts_with("PermissionDenied"), "{err}");
    assert_mentions(&err, &["agent 'node-b'", "coordinator"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_naming_another_node_is_refused_by_the_coordinator() {
    let pki = Pki::new();
    let agent = start_agent("node-a", &pki.ca, &agent_cert(&pki.ca, "node-a")).await;
    let err = node_info(&agent.addr, &pki.coordinator(), "node-b")
        .await
        .expect_err("the inventory expects node-b at this address");
    assert_mentions(
        &err,
        &["node 'node-a'", "expects node 'node-b'", &agent.addr],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_certificate_from_another_ca_is_refused_by_the_coordinator() {
    let pki = Pki::new();
    // The agent trusts our coordinators but presents a certificate of another CA.
    let agent = start_agent("node-a", &pki.ca, &agent_cert(&pki.other_ca, "node-a")).await;
    let err = node_info(&agent.addr, &pki.coordinator(), "node-a")
        .await
        .expect_err("an agent of another CA must be refused");
    assert!(
        err.contains("UnknownIssuer") || err.to_lowercase().contains("unknown issuer"),
        "the error should say the agent's CA is unknown: {err}"
    );
    assert_mentions(&err, &["node 'node-a'", &agent.addr]);
}
