//! Attacks on a real agent process (issue 14, attacks 4, 6, 7 and 8), each performed and refused:
//! coordinators not listed or revoked, revoked agents, idle and half-open connections, stalled
//! uploads, huge request fields, archive URLs to hosts the agent was not told about (and redirects
//! off them, and credentials in them), private keys others can read, and the PKI files' modes.

use bbupgrade_common::identity::Role;
use bbupgrade_common::pki::{Ca, IssueRequest};
use bbupgrade_common::proto::agent_client::AgentClient;
use bbupgrade_common::proto::*;
use bbupgrade_common::tls::{TlsFiles, TlsMaterial, connect_agent, error_chain};
use bbupgrade_tests::{Bins, bins, describe, temp_dir};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const AGENT_START_TIMEOUT_SECS: u64 = 30;
const NODE: &str = "node-a";

/// A PKI directory as `bbupgrade pki` leaves it, with an agent and two coordinators.
fn pki_dir(dir: &Path) -> PathBuf {
    let pki = dir.join("pki");
    let ca = Ca::generate().unwrap();
    ca.save(&pki).unwrap();
    ca.issue(&IssueRequest::new(Role::Agent, NODE).with_sans(["127.0.0.1", "localhost"]))
        .unwrap()
        .save(&pki)
        .unwrap();
    for name in ["alice", "mallory"] {
        ca.issue(&IssueRequest::new(Role::Coordinator, name))
            .unwrap()
            .save(&pki)
            .unwrap();
    }
    pki
}

/// A coordinator's TLS material from the PKI directory, checking the CRL when `crl` is set.
fn coordinator(pki: &Path, name: &str, crl: bool) -> TlsMaterial {
    let mut files = TlsFiles::in_pki_dir(pki, Role::Coordinator, name);
    if crl {
        files.crl = Some(pki.join("crl.pem"));
    }
    files.load().unwrap()
}

/// A real agent process (the e2e copy of `bbupgrade-agent`); killed when dropped.
struct AgentProc {
    child: Child,
    addr: String,
    dir: PathBuf,
    stderr: PathBuf,
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl AgentProc {
    fn state_dir(&self) -> PathBuf {
        self.dir.join("state")
    }

    fn install_root(&self) -> PathBuf {
        self.dir.join("install")
    }

    /// Everything the agent wrote that could quote a request: its journal and its log.
    fn journal_and_log(&self) -> String {
        let mut all = std::fs::read_to_string(&self.stderr).unwrap_or_default();
        if let Ok(entries) = std::fs::read_dir(self.state_dir().join("operations")) {
            for e in entries {
                all.push_str(&std::fs::read_to_string(e.unwrap().path()).unwrap_or_default());
            }
        }
        all
    }

    /// The largest journal record, in bytes.
    fn largest_journal_record(&self) -> u64 {
        std::fs::read_dir(self.state_dir().join("operations"))
            .map(|entries| {
                entries
                    .map(|e| e.unwrap().metadata().unwrap().len())
                    .max()
                    .unwrap_or(0)
            })
            .unwrap_or(0)
    }
}

/// Writes a node (install, home) and an agent config with `extra` TOML in `dir`; returns the path.
fn agent_config(dir: &Path, pki: &Path, tls_extra: &str, extra: &str, port: u16) -> PathBuf {
    let install_root = dir.join("install");
    let current = install_root.join("atlassian-bitbucket-8.19.3");
    std::fs::create_dir_all(current.join("bin")).unwrap();
    std::fs::write(
        current.join("bin/start-bitbucket.sh"),
        "#!/bin/sh\nexit 0\n",
    )
    .unwrap();
    std::fs::create_dir_all(dir.join("home")).unwrap();
    let files = TlsFiles::in_pki_dir(pki, Role::Agent, NODE);
    let user = if nix::unistd::geteuid().is_root() {
        "user = \"nobody\"\n"
    } else {
        ""
    };
    let text = format!(
        "node_id = {NODE:?}\nlisten = \"127.0.0.1:{port}\"\nstate_dir = {:?}\n\n[tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n{tls_extra}\n\n[bitbucket]\ninstall_root = {:?}\ncurrent_install = {:?}\nhome = {:?}\n{user}status_url = \"http://127.0.0.1:1/status\"\n\n[service]\nkind = \"scripts\"\n\n{extra}\n",
        dir.join("state"),
        files.ca,
        files.cert,
        files.key,
        install_root,
        current,
        dir.join("home"),
    );
    let path = dir.join("agent.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn spawn_agent(bins: &Bins, config: &Path, dir: &Path) -> (Child, PathBuf) {
    spawn_agent_with_fd_limit(bins, config, dir, None)
}

fn set_nofile(soft: u64, hard: u64) -> std::io::Result<()> {
    let lim = libc::rlimit {
        rlim_cur: soft,
        rlim_max: hard,
    };
    // SAFETY: setrlimit reads the struct it is given; async-signal-safe (used after fork).
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Starts the agent, optionally with a lower open-files limit (as a unit's `LimitNOFILE` would).
fn spawn_agent_with_fd_limit(
    bins: &Bins,
    config: &Path,
    dir: &Path,
    nofile: Option<u64>,
) -> (Child, PathBuf) {
    use std::os::unix::process::CommandExt;
    let stderr = dir.join(format!(
        "agent-{}.log",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    let mut cmd = Command::new(&bins.agent);
    if let Some(n) = nofile {
        // SAFETY: setrlimit is async-signal-safe and only changes the child's own limit.
        unsafe {
            cmd.pre_exec(move || set_nofile(n, n));
        }
    }
    let child = cmd
        .arg("--config")
        .arg(config)
        .env(
            "BBUPGRADE_LOG",
            "info,bbupgrade_common=debug,bbupgrade_agent=debug",
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr).unwrap())
        .spawn()
        .expect("starting the agent");
    (child, stderr)
}

/// Starts an agent with the extra config and waits until it accepts connections.
fn start_agent(bins: &Bins, dir: &Path, pki: &Path, tls_extra: &str, extra: &str) -> AgentProc {
    start_agent_with_fd_limit(bins, dir, pki, tls_extra, extra, None)
}

fn start_agent_with_fd_limit(
    bins: &Bins,
    dir: &Path,
    pki: &Path,
    tls_extra: &str,
    extra: &str,
    nofile: Option<u64>,
) -> AgentProc {
    let port = free_port();
    let config = agent_config(dir, pki, tls_extra, extra, port);
    let (mut child, stderr) = spawn_agent_with_fd_limit(bins, &config, dir, nofile);
    let addr = format!("127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(AGENT_START_TIMEOUT_SECS);
    while std::net::TcpStream::connect(&addr).is_err() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!(
                "the agent exited ({status}) before listening:\n{}",
                std::fs::read_to_string(&stderr).unwrap_or_default()
            );
        }
        assert!(
            Instant::now() < deadline,
            "the agent did not start listening"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    AgentProc {
        child,
        addr,
        dir: dir.to_path_buf(),
        stderr,
    }
}

async fn client(agent: &AgentProc, m: &TlsMaterial) -> AgentClient<tonic::transport::Channel> {
    let channel = connect_agent(&agent.addr, m, NODE, CONNECT_TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("connecting to the agent: {e:#}"));
    AgentClient::new(channel)
}

/// NodeInfo as a coordinator holding `m`: the node id, or the whole reason it failed.
async fn node_info(agent: &AgentProc, m: &TlsMaterial) -> Result<String, String> {
    let channel = connect_agent(&agent.addr, m, NODE, CONNECT_TIMEOUT)
        .await
        .map_err(|e| format!("{e:#}"))?;
    AgentClient::new(channel)
        .node_info(NodeInfoRequest {})
        .await
        .map(|r| r.into_inner().node_id)
        .map_err(|s| format!("{:?}: {}", s.code(), error_chain(&s)))
}

fn bbupgrade(bins: &Bins, args: &[&str]) -> std::process::Output {
    Command::new(&bins.bbupgrade)
        .args(args)
        .output()
        .expect("running bbupgrade")
}

// ---- attack 4: any coordinator certificate was enough; no revocation ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_listed_coordinators_are_served() {
    let bins = bins!();
    let dir = temp_dir();
    let pki = pki_dir(dir.path());
    let agent = start_agent(
        &bins,
        dir.path(),
        &pki,
        "allowed_coordinators = [\"alice\"]",
        "",
    );
    assert_eq!(
        node_info(&agent, &coordinator(&pki, "alice", false))
            .await
            .expect("alice is listed"),
        NODE
    );
    let err = node_info(&agent, &coordinator(&pki, "mallory", false))
        .await
        .expect_err("mallory is a coordinator of the CA, but not listed");
    assert!(err.starts_with("PermissionDenied"), "{err}");
    assert!(
        err.contains("mallory") && err.contains("allowed_coordinators"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_coordinator_is_refused_after_pki_revoke_without_a_restart() {
    let bins = bins!();
    let dir = temp_dir();
    let pki = pki_dir(dir.path());
    let crl = format!("crl = {:?}", pki.join("crl.pem"));
    let agent = start_agent(&bins, dir.path(), &pki, &crl, "");
    let alice = coordinator(&pki, "alice", false);
    node_info(&agent, &alice)
        .await
        .expect("alice is served before the revocation");

    let d = pki.display().to_string();
    let out = bbupgrade(&bins, &["pki", "revoke", "--dir", &d, "--name", "alice"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    // The agent's `[tls] crl` is the file `pki revoke` rewrote (as if copied to the node): new
    // connections see it without a restart.
    let err = node_info(&agent, &alice)
        .await
        .expect_err("a revoked certificate must be refused");
    assert!(err.to_lowercase().contains("revoked"), "{err}");
    node_info(&agent, &coordinator(&pki, "mallory", false))
        .await
        .expect("a coordinator not revoked is still served");

    // A replacement that cannot be used (here: garbage) leaves the loaded list in force.
    std::fs::write(pki.join("crl.pem"), "not a CRL").unwrap();
    let err = node_info(&agent, &alice)
        .await
        .expect_err("still revoked after a bad CRL replaced the good one");
    assert!(err.to_lowercase().contains("revoked"), "{err}");
    node_info(&agent, &coordinator(&pki, "mallory", false))
        .await
        .expect("others are still served");
    let log = std::fs::read_to_string(&agent.stderr).unwrap();
    assert!(log.contains("cannot be used"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_agent_is_refused_by_the_coordinator() {
    let bins = bins!();
    let dir = temp_dir();
    let pki = pki_dir(dir.path());
    let agent = start_agent(&bins, dir.path(), &pki, "", "");
    node_info(&agent, &coordinator(&pki, "alice", true))
        .await
        .expect("served before the revocation");
    let d = pki.display().to_string();
    let out = bbupgrade(
        &bins,
        &[
            "pki", "revoke", "--dir", &d, "--name", NODE, "--role", "agent",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let err = node_info(&agent, &coordinator(&pki, "alice", true))
        .await
        .expect_err("the coordinator must refuse a revoked agent");
    assert!(err.to_lowercase().contains("revoked"), "{err}");
    assert!(err.contains(NODE), "the error names the node: {err}");
}

// ---- attack 6: unbounded before and after authentication ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_do_not_lock_the_coordinator_out() {
    // As reported: 1,100 idle connections against an agent allowed 1,024 open files. The cap
    // (256 by default) keeps the agent under its limit and the oldest idle ones make room.
    const IDLE_CONNECTIONS: usize = 1100;
    const AGENT_NOFILE: u64 = 1024;
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct it is given.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
    let needed = IDLE_CONNECTIONS as u64 + 256;
    if lim.rlim_cur < needed {
        assert!(
            lim.rlim_max >= needed,
            "this test opens {IDLE_CONNECTIONS} connections; raise the open-files hard limit to {needed} (ulimit -Hn)"
        );
        set_nofile(lim.rlim_max, lim.rlim_max).unwrap();
    }
    let bins = bins!();
    let dir = temp_dir();
    let pki = pki_dir(dir.path());
    let agent = start_agent_with_fd_limit(&bins, dir.path(), &pki, "", "", Some(AGENT_NOFILE));
    let mut idle = Vec::new();
    for _ in 0..IDLE_CONNECTIONS {
        idle.push(tokio::net::TcpStream::connect(&agent.addr).await.unwrap());
    }
    let started = Instant::now();
    let node = tokio::time::timeout(
        Duration::from_secs(10),
        node_info(&agent, &coordinator(&pki, "alice", false)),
    )
    .await
    .expect("the call must not hang behind idle connections")
    .expect("the coordinator is served");
    assert_eq!(node, NODE);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "served in {:?}",
        started.elapsed()
    );
    drop(idle);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_that_never_completes_is_dropped() {
    let bins = bins!();
    let dir = temp_dir();
    let pki = pki_dir(dir.path());
    let agent = start_agent(
        &bins,
        dir.path(),
        &pki,
        "",
        "[limits]\nhandshake_timeout_secs = 1\n",
    );
    let mut sock = tokio::net::TcpStream::connect(&agent.addr).await.unwrap();
    // The first bytes of a TLS record header, then nothing.
    sock.write_all(&[0x16, 0x03, 0x01]).await.unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 64];
    let closed = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match sock.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the agent kept a stalled handshake open");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(10),
        "closed after {waited:?}, expected about the 1 s handshake timeout"
    );
}

/// The install root's staging directories.
fn staging_dirs(root: &Path) -> Vec<String> {
    std::fs::read_dir(root)
        .map(|entries| {
            entries
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(".staging-"))
                .collect()
        })
        .unwrap_or_default()
}

/// Waits (polling) until `cond` holds; panics with `what` after `secs`.
async fn wait_until(secs: u64, what: &str, mut cond: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !cond().await {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_upload_fails_and_leaves_no_staging_dir() {
    let bins = bins!();
    let dir = temp_dir();
    let pki = pki_dir(dir.path());
    let archive = dir.path().join("atlassian-bitbucket-8.19.6.tar.gz");
    let out = Command::new(&bins.sim)
        .args(["archive", "--version", "8.19.6", "--out"])
        .arg(&archive)
        .args(["--payload-mib", "1"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", describe(&out));
    let bytes = std::fs::read(&archive).unwrap();
    let agent = start_agent(
        &bins,
        dir.path(),
        &pki,
        "",
        "[limits]\nupload_idle_timeout_secs = 2\n",
    );
    let mut c = client(&agent, &coordinator(&pki, "alice", false)).await;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(StageUploadMessage {
        msg: Some(stage_upload_message::Msg::Header(StageHeader {
            operation_id: "stall-1".into(),
            version: "8.19.6".into(),
            sha256: "0".repeat(64),
            size_bytes: bytes.len() as u64,
        })),
    })
    .await
    .unwrap();
    // Part of the archive, then the sender goes quiet while keeping the stream open.
    tx.send(StageUploadMessage {
        msg: Some(stage_upload_message::Msg::Chunk(
            bytes[..bytes.len().min(64 << 10)].to_vec(),
        )),
    })
    .await
    .unwrap();
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
    let mut events = c
        .stage_upload(stream)
        .await
        .expect("upload opened")
        .into_inner();
    let root = agent.install_root();
    wait_until(15, "the stage began (a staging dir exists)", async || {
        !staging_dirs(&root).is_empty()
    })
    .await;
    let failure = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match events.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => return None,
                Err(s) => return Some(s),
            }
        }
    })
    .await
    .expect("the agent must give a stalled upload up");
    let status = failure.expect("the stage must fail");
    assert!(
        status.message().contains("sent nothing"),
        "{}",
        status.message()
    );
    let mut c2 = client(&agent, &coordinator(&pki, "alice", false)).await;
    let op = c2
        .operation_status(OperationStatusRequest {
            operation_id: "stall-1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(op.state, OperationState::Failed as i32, "{op:?}");
    assert!(
        staging_dirs(&root).is_empty(),
        "staging dirs left: {:?}",
        staging_dirs(&root)
    );
    drop(tx);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_request_fields_are_cut_in_errors_and_the_journal() {
    const BIG: usize = 7 << 20; // under the 8 MiB message limit, so it reaches the agent
    let bins = bins!();
    let dir = temp_dir();
    let pki = pki_dir(dir.path());
    let agent = start_agent(
        &bins,
        dir.path(),
        &pki,
        "",
        "[stage]\nurl_hosts = [\"127.0.0.1\"]\n",
    );
    let mut c = client(&agent, &coordinator(&pki, "alice", false))
        .await
        .max_encoding_message_size(64 << 20);
    let big = "9".repeat(BIG);
    let ok = StageFromUrlRequest {
        operation_id: "big-1".into(),
        version: "8.19.6".into(),
        url: "http://127.0.0.1:9/a.tar.gz".into(),
        sha256: "0".repeat(64),
    };
    let cases = [
        StageFromUrlRequest {
            version: big.clone(),
            ..ok.clone()
        },
        StageFromUrlRequest {
            operation_id: big.clone(),
            ..ok.clone()
        },
        StageFromUrlRequest {
            sha256: big.clone(),
            ..ok.clone()
        },
        StageFromUrlRequest {
            url: format!("http://127.0.0.1:9/{big}"),
            ..ok.clone()
        },
        StageFromUrlRequest {
            // Over the message limit: refused by the transport, also without an echo.
            url: format!("http://127.0.0.1:9/{}", "9".repeat(10 << 20)),
            ..ok.clone()
        },
    ];
    for (i, req) in cases.into_iter().enumerate() {
        let err = match c.stage_from_url(req).await {
            Err(s) => s,
            Ok(r) => {
                let mut events = r.into_inner();
                loop {
                    match events.message().await {
                        Err(s) => break s,
                        Ok(None) => panic!("case {i}: the stage did not fail"),
                        Ok(Some(_)) => continue,
                    }
                }
            }
        };
        assert!(
            err.message().len() < 1024,
            "case {i}: a {} byte error: {}…",
            err.message().len(),
            &err.message()[..200.min(err.message().len())]
        );
    }
    // A request that reaches an operation records an error that stays small.
    let mut op = client(&agent, &coordinator(&pki, "alice", false)).await;
    let _ = op
        .prepare(PrepareRequest {
            operation_id: "prep-1".into(),
            version: "8.19.6".into(),
        })
        .await;
    assert!(
        agent.largest_journal_record() < 16 << 10,
        "a journal record of {} bytes",
        agent.largest_journal_record()
    );
    assert!(!agent.journal_and_log().contains(&"9".repeat(4096)));
}

// ---- attack 7: StageFromUrl as an internal port scanner, redirects, credentials ----

/// A plain HTTP server on loopback counting connections; answers every request with `response`.
async fn http_server(response: String) -> (u16, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            let response = response.clone();
            tokio::spawn(async move {
                let mut req = Vec::new();
                let mut buf = [0u8; 1024];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match sock.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = sock.write_all(response.as_bytes()).await;
                let _ = sock.shutdown().await;
            });
        }
    });
    (port, hits)
}

/// Runs StageFromUrl to its end; the status it failed with.
async fn stage_url_error(
    c: &mut AgentClient<tonic::transport::Channel>,
    op: &str,
    url: &str,
) -> tonic::Status {
    let req = StageFromUrlRequest {
        operation_id: op.into(),
        version: "8.19.6".into(),
        url: url.into(),
        sha256: "0".repeat(64),
    };
    let mut events = match c.stage_from_url(req).await {
        Err(s) => return s,
        Ok(r) => r.into_inner(),
    };
    loop {
        match events.message().await {
            Err(s) => return s,
            Ok(None) => panic!("StageFromUrl of {url} did not fail"),
            Ok(Some(_)) => continue,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_url_host_not_listed_is_never_contacted() {
    let bins = bins!();
    let dir = temp_dir();
    let pki = pki_dir(dir.path());
    let (port, hits) =
        http_server("HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n".into()).await;
    let agent = start_agent(
        &bins,
        dir.path(),
        &pki,
        "",
        "[stage]\nurl_hosts = [\"artifacts.example.com\"]\n",
    );
    let mut c = client(&agent, &coordinator(&pki, "alice", false)).await;
    let status = stage_url_error(&mut c, "scan-1", &format!("http://127.0.0.1:{port}/x")).await;
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert!(
        status.message().contains("url_hosts"),
        "{}",
        status.message()
    );
    assert_eq!(hits.load(Ordering::SeqCst), 0, "the agent connected anyway");

    // No url_hosts at all: no URL is fetched.
    drop(agent);
    let dir2 = temp_dir();
    let agent = start_agent(&bins, dir2.path(), &pki, "", "");
    let mut c = client(&agent, &coordinator(&pki, "alice", false)).await;
    let status = stage_url_error(&mut c, "scan-2", &format!("http://127.0.0.1:{port}/x")).await;
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert_eq!(hits.load(Ordering::SeqCst), 0, "the agent connected anyway");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirect_to_another_host_is_refused() {
    let bins = bins!();
    let dir = temp_dir();
    let pki = pki_dir(dir.path());
    let (inner_port, inner_hits) =
        http_server("HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nhi".into()).await;
    let (port, hits) = http_server(format!(
        "HTTP/1.1 302 Found\r\nlocation: http://localhost:{inner_port}/secret\r\ncontent-length: 0\r\n\r\n"
    ))
    .await;
    let agent = start_agent(
        &bins,
        dir.path(),
        &pki,
        "",
        "[stage]\nurl_hosts = [\"127.0.0.1\"]\n",
    );
    let mut c = client(&agent, &coordinator(&pki, "alice", false)).await;
    let status = stage_url_error(&mut c, "redir-1", &format!("http://127.0.0.1:{port}/a")).await;
    assert!(
        status.message().contains("redirect"),
        "{}",
        status.message()
    );
    assert_eq!(hits.load(Ordering::SeqCst), 1);
    assert_eq!(
        inner_hits.load(Ordering::SeqCst),
        0,
        "the redirect to another host was followed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_in_a_url_never_appear() {
    let bins = bins!();
    let dir = temp_dir();
    let pki = pki_dir(dir.path());
    let (port, hits) =
        http_server("HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n".into()).await;
    let agent = start_agent(
        &bins,
        dir.path(),
        &pki,
        "",
        "[stage]\nurl_hosts = [\"127.0.0.1\"]\n",
    );
    let mut c = client(&agent, &coordinator(&pki, "alice", false)).await;
    let url = format!("http://builder:Pa55w0rd@127.0.0.1:{port}/a.tar.gz?token=T0KEN42");
    let status = stage_url_error(&mut c, "cred-1", &url).await;
    assert_eq!(hits.load(Ordering::SeqCst), 1, "the listed host is fetched");
    let text = status.message();
    assert!(text.contains("404"), "{text}");
    assert!(
        text.contains(&format!("127.0.0.1:{port}/a.tar.gz")),
        "{text}"
    );
    // A host not listed, with credentials: refused, and not quoted either.
    let status2 = stage_url_error(
        &mut c,
        "cred-2",
        "https://builder:Pa55w0rd@elsewhere.example/a?token=T0KEN42",
    )
    .await;
    let everything = format!("{text}\n{}\n{}", status2.message(), agent.journal_and_log());
    for secret in ["Pa55w0rd", "T0KEN42", "builder"] {
        assert!(
            !everything.contains(secret),
            "'{secret}' appears in an error, the journal or the log:\n{everything}"
        );
    }
}

// ---- attack 8: key and certificate modes, overwriting ----

#[test]
fn a_key_others_can_read_stops_agent_and_coordinator_with_exit_2() {
    let bins = bins!();
    let dir = temp_dir();
    let pki = pki_dir(dir.path());
    let agent_key = TlsFiles::in_pki_dir(&pki, Role::Agent, NODE).key;
    std::fs::set_permissions(&agent_key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let config = agent_config(dir.path(), &pki, "", "", free_port());
    let (mut child, stderr) = spawn_agent(&bins, &config, dir.path());
    let deadline = Instant::now() + Duration::from_secs(AGENT_START_TIMEOUT_SECS);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the agent started with a 0644 key");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let err = std::fs::read_to_string(&stderr).unwrap();
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(
        err.contains(&agent_key.display().to_string()) && err.contains("chmod 600"),
        "{err}"
    );

    // The coordinator, through its inventory.
    let coord_key = TlsFiles::in_pki_dir(&pki, Role::Coordinator, "alice").key;
    std::fs::set_permissions(&coord_key, std::fs::Permissions::from_mode(0o640)).unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "t").unwrap();
    let inventory = dir.path().join("inventory.toml");
    std::fs::write(
        &inventory,
        format!(
            "tls = {{ ca = \"pki/ca.pem\", cert = \"pki/coordinator-alice.pem\", key = \"pki/coordinator-alice.key\" }}\n[[clusters]]\nname = \"c\"\nbitbucket_url = \"http://127.0.0.1:1/\"\ntoken_file = {token:?}\nload_balancer = {{ kind = \"none\" }}\n[[clusters.nodes]]\nid = {NODE:?}\nagent = \"127.0.0.1:1\"\n"
        ),
    )
    .unwrap();
    let out = bbupgrade(
        &bins,
        &[
            "status",
            "--inventory",
            &inventory.display().to_string(),
            "--cluster",
            "c",
        ],
    );
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("coordinator-alice.key") && err.contains("chmod 600"),
        "{}",
        describe(&out)
    );
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

/// `bbupgrade` with umask 000, as a careless shell would run it.
fn bbupgrade_umask_000(bins: &Bins, args: &[&str]) -> std::process::Output {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(&bins.bbupgrade);
    cmd.args(args);
    // SAFETY: umask is async-signal-safe and touches nothing but the child's own mask.
    unsafe {
        cmd.pre_exec(|| {
            libc::umask(0);
            Ok(())
        });
    }
    cmd.output().expect("running bbupgrade")
}

#[test]
fn pki_files_have_fixed_modes_and_issue_does_not_overwrite() {
    let bins = bins!();
    let dir = temp_dir();
    let pki = dir.path().join("pki");
    let d = pki.display().to_string();
    let out = bbupgrade_umask_000(&bins, &["pki", "init", "--dir", &d]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert_eq!(mode(&pki.join("ca.pem")), 0o644);
    assert_eq!(mode(&pki.join("crl.pem")), 0o644);
    assert_eq!(mode(&pki.join("ca.key")), 0o600);

    let issue = |extra: &[&str]| {
        let mut args = vec![
            "pki",
            "issue",
            "--dir",
            &d,
            "--role",
            "coordinator",
            "--name",
            "ci",
        ];
        args.extend_from_slice(extra);
        bbupgrade_umask_000(&bins, &args)
    };
    let out = issue(&[]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let cert = pki.join("coordinator-ci.pem");
    let key = pki.join("coordinator-ci.key");
    assert_eq!(mode(&cert), 0o644);
    assert_eq!(mode(&key), 0o600);
    let in_90_days = (time::OffsetDateTime::now_utc() + time::Duration::days(90)).date();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&in_90_days.to_string()),
        "coordinator certificates last 90 days: {}",
        describe(&out)
    );
    let before = (std::fs::read(&cert).unwrap(), std::fs::read(&key).unwrap());

    let out = issue(&[]);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--force"),
        "{}",
        describe(&out)
    );
    assert_eq!(
        (std::fs::read(&cert).unwrap(), std::fs::read(&key).unwrap()),
        before,
        "nothing replaced without --force"
    );

    let out = issue(&["--force", "--days", "10"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert_ne!(std::fs::read(&cert).unwrap(), before.0);
    let in_10_days = (time::OffsetDateTime::now_utc() + time::Duration::days(10)).date();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&in_10_days.to_string()),
        "{}",
        describe(&out)
    );
    assert_eq!(mode(&cert), 0o644);
    assert_eq!(mode(&key), 0o600);

    let out = bbupgrade_umask_000(&bins, &["pki", "revoke", "--dir", &d, "--name", "ci"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert_eq!(mode(&pki.join("crl.pem")), 0o644);
}
