//! An agent's bounds, attacked on a real agent process (issue 14, attacks 6 and 7): idle and
//! half-open connections, a stalled upload, huge request fields, and `StageFromUrl` used as a port
//! scanner, redirected off its host, or given credentials in the URL.

use bbupgrade_common::proto::agent_client::AgentClient;
use bbupgrade_common::proto::*;
use bbupgrade_tests::agent_process::*;
use bbupgrade_tests::{bins, describe, temp_dir};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

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
