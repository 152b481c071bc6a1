//! A real agent process over mutual TLS driving a simulated node: stage (streamed and from a URL),
//! prepare, stop, activate, start, rollback; repeated operation ids; a crash in the middle of a
//! stage; unsafe archives refused with nothing left behind.

use bbupgrade_common::identity::Role;
use bbupgrade_common::proto::agent_client::AgentClient;
use bbupgrade_common::proto::*;
use bbupgrade_common::tls::{TlsFiles, connect_agent};
use bbupgrade_demo::sandbox::{Sandbox, SandboxLb};
use bbupgrade_tests::{bins, describe, node_version, read, sandbox_options, start_sandbox};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tonic::transport::Channel;

const CHUNK_BYTES: usize = 1 << 20;
const CALL_TIMEOUT_SECS: u32 = 60;

type Client = AgentClient<Channel>;

/// A one-node sandbox; its node is started only when asked.
async fn sandbox(dir: &Path, start_node: bool) -> Sandbox {
    let bins = bins!();
    let opts = sandbox_options(&bins, 1, SandboxLb::None);
    if start_node {
        return start_sandbox(dir, opts).await.expect("sandbox");
    }
    let dir = dir.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let s = Sandbox::create(&dir, opts)?;
        s.wait_agents()?;
        anyhow::Ok(s)
    })
    .await
    .unwrap()
    .expect("sandbox")
}

/// The coordinator's client of node `i`'s agent.
async fn client(s: &Sandbox, i: usize) -> Client {
    let tls = TlsFiles::in_pki_dir(&s.pki, Role::Coordinator, "sandbox-admin")
        .load()
        .unwrap();
    let node = &s.sim.nodes()[i].name;
    let channel = connect_agent(&s.agent_addrs[i], &tls, node, Duration::from_secs(5))
        .await
        .unwrap_or_else(|e| panic!("connecting to the agent of {node}: {e:#}"));
    AgentClient::new(channel)
        .max_decoding_message_size(8 << 20)
        .max_encoding_message_size(8 << 20)
}

fn header(op: &str, version: &str, sha256: &str, size: u64) -> StageUploadMessage {
    StageUploadMessage {
        msg: Some(stage_upload_message::Msg::Header(StageHeader {
            operation_id: op.into(),
            version: version.into(),
            sha256: sha256.into(),
            size_bytes: size,
        })),
    }
}

/// Feeds `archive` to `tx` in 1 MiB chunks after the header; `after_chunk(n)` runs after chunk n.
async fn feed(
    tx: tokio::sync::mpsc::Sender<StageUploadMessage>,
    archive: PathBuf,
    first: StageUploadMessage,
    mut after_chunk: impl AsyncFnMut(usize),
) {
    if tx.send(first).await.is_err() {
        return;
    }
    let mut file = std::fs::File::open(&archive).unwrap();
    let mut n = 0;
    loop {
        let mut buf = vec![0u8; CHUNK_BYTES];
        let len = file.read(&mut buf).unwrap();
        if len == 0 {
            break;
        }
        buf.truncate(len);
        let chunk = StageUploadMessage {
            msg: Some(stage_upload_message::Msg::Chunk(buf)),
        };
        if tx.send(chunk).await.is_err() {
            return;
        }
        n += 1;
        after_chunk(n).await;
    }
}

/// The stage's final result, or the status it failed with.
async fn stage_result(
    resp: Result<tonic::Response<tonic::Streaming<StageEvent>>, tonic::Status>,
) -> Result<StageResult, tonic::Status> {
    let mut events = resp?.into_inner();
    while let Some(ev) = events.message().await? {
        if let Some(stage_event::Event::Result(r)) = ev.event {
            return Ok(r);
        }
    }
    Err(tonic::Status::unknown(
        "the stage stream ended without a result",
    ))
}

/// Streams `archive` to the agent as StageUpload (header first, then 1 MiB chunks).
async fn upload(
    c: &mut Client,
    op: &str,
    version: &str,
    archive: &Path,
    sha256: &str,
) -> Result<StageResult, tonic::Status> {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let size = std::fs::metadata(archive).unwrap().len();
    tokio::spawn(feed(
        tx,
        archive.to_path_buf(),
        header(op, version, sha256, size),
        async |_| {},
    ));
    stage_result(c.stage_upload(receiver_stream(rx)).await).await
}

fn receiver_stream<T: Send + 'static>(
    rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures::Stream<Item = T> + Send + 'static {
    futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) })
}

/// What `install_root` holds besides the node's original install.
fn extra_entries(s: &Sandbox) -> Vec<String> {
    let node = &s.sim.nodes()[0];
    let original = node.install_dir.file_name().unwrap().to_owned();
    std::fs::read_dir(&node.install_root)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| *n != original)
        .map(|n| n.to_string_lossy().into_owned())
        .collect()
}

fn pid_alive(pid: i32) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
}

async fn sim_info(base_url: &str) -> serde_json::Value {
    reqwest::get(format!("{base_url}/sim/info"))
        .await
        .unwrap_or_else(|e| panic!("{base_url}/sim/info: {e}"))
        .json()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stage_prepare_stop_activate_start_rollback() {
    let dir = bbupgrade_tests::temp_dir();
    let s = sandbox(dir.path(), true).await;
    let node = s.sim.nodes()[0].clone();
    let mut c = client(&s, 0).await;
    assert_eq!(node_version(&node.base_url).await.unwrap(), "8.19.3");

    // Stage by stream, while the node serves.
    let to = &s.to_archive;
    let staged = upload(&mut c, "stage-1", "8.19.6", &to.path, &to.sha256)
        .await
        .expect("stage by upload");
    let install = node.install_root.join("8.19.6");
    assert_eq!(staged.version, "8.19.6");
    assert_eq!(Path::new(&staged.install_path), install);
    assert!(staged.files > 0 && !staged.already_staged, "{staged:?}");
    assert!(install.join("bin/start-bitbucket.sh").is_file());
    assert_eq!(extra_entries(&s), ["8.19.6"], "no staging leftovers");
    if s.run_user.is_some() {
        // Installs are root's, not the Bitbucket user's (issue 14).
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(install.join("bin/start-bitbucket.sh")).unwrap();
        assert_eq!(meta.uid(), 0, "staged files belong to root");
        assert_eq!(
            meta.mode() & 0o022,
            0,
            "staged files are not group/other-writable"
        );
    }

    // Prepare: the home and the node's JVM arguments carried into the new install.
    let prepared = c
        .prepare(PrepareRequest {
            operation_id: "prepare-1".into(),
            version: "8.19.6".into(),
        })
        .await
        .expect("prepare")
        .into_inner();
    assert_eq!(Path::new(&prepared.bitbucket_home), node.home);
    let home_script = read(install.join("bin/set-bitbucket-home.sh"));
    assert!(
        home_script.contains(&format!("BITBUCKET_HOME={}", node.home.display())),
        "set-bitbucket-home.sh should name {}:\n{home_script}",
        node.home.display()
    );
    let webapp = read(install.join("bin/_start-webapp.sh"));
    assert!(
        webapp.contains(&format!("-Dserver.port={}", node.port)),
        "_start-webapp.sh should carry the node's JVM args:\n{webapp}"
    );
    assert!(
        prepared
            .carried
            .iter()
            .any(|f| f.path.ends_with("_start-webapp.sh")),
        "{prepared:?}"
    );

    // Bitbucket lets a node of the new version join only in upgrade mode.
    let zdu = reqwest::Client::new()
        .post(format!("{}/rest/zdu/start", node.base_url))
        .bearer_auth(bbupgrade_demo::sandbox::ADMIN_TOKEN)
        .send()
        .await
        .expect("enabling upgrade mode");
    assert!(zdu.status().is_success(), "{zdu:?}");

    // Stop: /status no longer answers and the process is gone.
    let pid = s.sim.node_pid(0).expect("a running node has a pid");
    let stopped = c
        .stop(StopRequest {
            operation_id: "stop-1".into(),
            timeout_secs: CALL_TIMEOUT_SECS,
            kill_after_timeout: false,
        })
        .await
        .expect("stop")
        .into_inner();
    assert!(stopped.was_running && !stopped.killed, "{stopped:?}");
    assert!(
        reqwest::get(format!("{}/status", node.base_url))
            .await
            .is_err(),
        "/status still answers after stop"
    );
    assert!(!pid_alive(pid), "process {pid} is still alive after stop");

    // Activate, then start on the new version without bundled search.
    let activated = c
        .activate(ActivateRequest {
            operation_id: "activate-1".into(),
            version: "8.19.6".into(),
        })
        .await
        .expect("activate")
        .into_inner();
    assert_eq!(Path::new(&activated.install_path), install);
    assert_eq!(Path::new(&activated.previous_install), node.install_dir);
    let started = c
        .start(StartRequest {
            operation_id: "start-1".into(),
            timeout_secs: CALL_TIMEOUT_SECS,
        })
        .await
        .expect("start")
        .into_inner();
    assert_eq!(
        (started.state.as_str(), started.version.as_str()),
        ("RUNNING", "8.19.6")
    );
    let info = sim_info(&node.base_url).await;
    assert_eq!(info["version"], "8.19.6", "{info}");
    assert_eq!(info["state"], "RUNNING", "{info}");
    assert_eq!(info["bundledSearchStarted"], false, "{info}");

    // The same stop again: the recorded result, and the node (started since) keeps running.
    let again = c
        .stop(StopRequest {
            operation_id: "stop-1".into(),
            timeout_secs: CALL_TIMEOUT_SECS,
            kill_after_timeout: false,
        })
        .await
        .expect("a repeated stop")
        .into_inner();
    assert_eq!(
        again, stopped,
        "a repeated operation returns its recorded result"
    );
    let info = sim_info(&node.base_url).await;
    assert_eq!(
        (&info["state"], &info["version"]),
        (&"RUNNING".into(), &"8.19.6".into()),
        "a repeated stop must not stop the node again: {info}"
    );
    let op = c
        .operation_status(OperationStatusRequest {
            operation_id: "stop-1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(op.kind, "stop");
    assert_eq!(op.state, OperationState::Succeeded as i32, "{op:?}");
    // An id is tied to its kind.
    let misuse = c
        .start(StartRequest {
            operation_id: "stop-1".into(),
            timeout_secs: CALL_TIMEOUT_SECS,
        })
        .await
        .expect_err("an id used for stop cannot start");
    assert_eq!(misuse.code(), tonic::Code::InvalidArgument, "{misuse:?}");

    // Roll back to the original install, running.
    let rolled = c
        .rollback(RollbackRequest {
            operation_id: "rollback-1".into(),
            stop_timeout_secs: CALL_TIMEOUT_SECS,
            start_timeout_secs: CALL_TIMEOUT_SECS,
            no_start: false,
            target_version: "8.19.3".into(),
        })
        .await
        .expect("rollback")
        .into_inner();
    assert_eq!(
        (rolled.version.as_str(), rolled.state.as_str()),
        ("8.19.3", "RUNNING")
    );
    assert_eq!(Path::new(&rolled.install_path), node.install_dir);
    let info = sim_info(&node.base_url).await;
    assert_eq!(info["version"], "8.19.3", "{info}");
    assert_eq!(info["state"], "RUNNING", "{info}");
    let facts = c.node_info(NodeInfoRequest {}).await.unwrap().into_inner();
    assert_eq!(facts.active_version, "8.19.3");
    assert_eq!(Path::new(&facts.previous_install), install);

    // Repeated with fresh operation ids (a re-run rollback, a resume): the node stays where the
    // rollback named, it never flips back to the new install.
    for id in ["rollback-2", "rollback-3"] {
        let again = c
            .rollback(RollbackRequest {
                operation_id: id.into(),
                stop_timeout_secs: CALL_TIMEOUT_SECS,
                start_timeout_secs: CALL_TIMEOUT_SECS,
                no_start: false,
                target_version: "8.19.3".into(),
            })
            .await
            .expect("repeated rollback")
            .into_inner();
        assert_eq!(
            (again.version.as_str(), again.state.as_str()),
            ("8.19.3", "RUNNING"),
            "{id}"
        );
    }
    let facts = c.node_info(NodeInfoRequest {}).await.unwrap().into_inner();
    assert_eq!(facts.active_version, "8.19.3");
    // A version that is not the previous install is refused, never activated.
    let refused = c
        .rollback(RollbackRequest {
            operation_id: "rollback-older".into(),
            stop_timeout_secs: CALL_TIMEOUT_SECS,
            start_timeout_secs: CALL_TIMEOUT_SECS,
            no_start: false,
            target_version: "8.19.1".into(),
        })
        .await
        .expect_err("no install of 8.19.1 to return to");
    assert_eq!(
        refused.code(),
        tonic::Code::FailedPrecondition,
        "{refused:?}"
    );
    assert_eq!(sim_info(&node.base_url).await["version"], "8.19.3");
}

/// Serves one file over HTTP/1.1 to any GET; counts the requests.
async fn serve_file(
    path: PathBuf,
) -> (
    String,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
    tokio::task::JoinHandle<()>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!(
        "http://{}/{}",
        listener.local_addr().unwrap(),
        path.file_name().unwrap().to_string_lossy()
    );
    let hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = hits.clone();
    let task = tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let path = path.clone();
            tokio::spawn(async move {
                let mut req = Vec::new();
                let mut buf = [0u8; 1024];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match sock.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                let body = tokio::fs::read(&path).await.unwrap();
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/gzip\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = sock.write_all(head.as_bytes()).await;
                let _ = sock.write_all(&body).await;
                let _ = sock.shutdown().await;
            });
        }
    });
    (url, hits, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stage_from_url_and_repeat_the_operation() {
    let dir = bbupgrade_tests::temp_dir();
    let s = sandbox(dir.path(), false).await;
    let node = s.sim.nodes()[0].clone();
    let (url, hits, server) = serve_file(s.to_archive.path.clone()).await;
    let mut c = client(&s, 0).await;
    let request = StageFromUrlRequest {
        operation_id: "url-1".into(),
        version: "8.19.6".into(),
        url: url.clone(),
        sha256: s.to_archive.sha256.clone(),
    };
    let staged = stage_result(c.stage_from_url(request.clone()).await)
        .await
        .expect("stage from URL");
    assert_eq!(staged.version, "8.19.6");
    assert!(!staged.already_staged && !staged.from_cache, "{staged:?}");
    assert!(
        node.install_root
            .join("8.19.6/bin/start-bitbucket.sh")
            .is_file()
    );
    assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 1);

    let again = stage_result(c.stage_from_url(request).await)
        .await
        .expect("a repeated stage");
    assert_eq!(again, staged, "the recorded result");
    assert_eq!(
        hits.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "a repeated operation must not download again"
    );
    assert_eq!(extra_entries(&s), ["8.19.6"]);
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_killed_mid_stage_leaves_nothing_and_the_retry_succeeds() {
    let dir = bbupgrade_tests::temp_dir();
    let mut s = sandbox(dir.path(), false).await;
    let node = s.sim.nodes()[0].clone();
    let big_dir = s.dir.join("big");
    std::fs::create_dir_all(&big_dir).unwrap();
    let sim = bins!().sim;
    let big = tokio::task::spawn_blocking(move || {
        bbupgrade_sim::archive::write_archive_with_program("8.19.6", &big_dir, 48, &sim)
    })
    .await
    .unwrap()
    .expect("a large archive");

    let mut c = client(&s, 0).await;
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let root = node.install_root.clone();
    let staging_seen = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let seen = staging_seen.clone();
    let (killed_tx, killed_rx) = tokio::sync::oneshot::channel::<()>();
    let mut killed_tx = Some(killed_tx);
    // Slowly: the agent is killed while it extracts, long before the end.
    let feeder = tokio::spawn(feed(
        tx,
        big.path.clone(),
        header("big-1", "8.19.6", &big.sha256, big.size_bytes),
        async move |n| {
            tokio::time::sleep(Duration::from_millis(20)).await;
            if !seen.load(std::sync::atomic::Ordering::SeqCst) {
                let staging = std::fs::read_dir(&root).unwrap().any(|e| {
                    e.unwrap()
                        .file_name()
                        .to_string_lossy()
                        .starts_with(".staging-")
                });
                seen.store(staging, std::sync::atomic::Ordering::SeqCst);
            }
            if n >= 8
                && seen.load(std::sync::atomic::Ordering::SeqCst)
                && let Some(k) = killed_tx.take()
            {
                let _ = k.send(());
                // Hold the rest back until the agent is gone.
                tokio::time::sleep(Duration::from_secs(3600)).await;
            }
        },
    ));
    let call =
        tokio::spawn(async move { stage_result(c.stage_upload(receiver_stream(rx)).await).await });
    tokio::time::timeout(Duration::from_secs(30), killed_rx)
        .await
        .expect("the stage did not get under way")
        .unwrap();
    assert!(staging_seen.load(std::sync::atomic::Ordering::SeqCst));
    tokio::task::block_in_place(|| s.kill_agent(0));
    feeder.abort();
    let cut = call.await.unwrap().expect_err("the agent died mid-stage");
    eprintln!("the interrupted stage: {cut:?}");

    tokio::task::block_in_place(|| s.restart_agent(0)).expect("agent restarts");
    let mut c = client(&s, 0).await;
    // Once it answers, the restarted agent has cleaned up.
    let op = c
        .operation_status(OperationStatusRequest {
            operation_id: "big-1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(op.state, OperationState::Interrupted as i32, "{op:?}");
    assert!(
        extra_entries(&s).is_empty(),
        "half-extracted leftovers: {:?}",
        extra_entries(&s)
    );

    let staged = upload(&mut c, "big-1", "8.19.6", &big.path, &big.sha256)
        .await
        .expect("the retry with the same id");
    assert!(!staged.already_staged, "{staged:?}");
    assert!(
        node.install_root
            .join("8.19.6/bin/start-bitbucket.sh")
            .is_file()
    );
    assert_eq!(extra_entries(&s), ["8.19.6"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsafe_archives_are_refused_over_grpc_with_nothing_left() {
    let dir = bbupgrade_tests::temp_dir();
    let s = sandbox(dir.path(), false).await;
    let mut c = client(&s, 0).await;
    let to = &s.to_archive;

    let wrong_sha = "0".repeat(64);
    let err = upload(&mut c, "bad-sha", "8.19.6", &to.path, &wrong_sha)
        .await
        .expect_err("a checksum mismatch must be refused");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().contains("checksum mismatch") && err.message().contains(&to.sha256),
        "{err:?}"
    );
    assert!(extra_entries(&s).is_empty(), "{:?}", extra_entries(&s));

    // The 8.19.3 release offered as 8.19.6: its top folder gives it away.
    let from = &s.from_archive;
    let err = upload(&mut c, "bad-top", "8.19.6", &from.path, &from.sha256)
        .await
        .expect_err("another release's archive must be refused");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().contains("atlassian-bitbucket-8.19.6")
            && err.message().contains("top folder"),
        "{err:?}"
    );
    assert!(extra_entries(&s).is_empty(), "{:?}", extra_entries(&s));

    let op = c
        .operation_status(OperationStatusRequest {
            operation_id: "bad-sha".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(op.state, OperationState::Failed as i32, "{op:?}");
    assert!(op.error.contains("checksum mismatch"), "{op:?}");
}

#[test]
fn unsafe_archives_are_refused_by_the_stage_cli() {
    let bins = bins!();
    let dir = bbupgrade_tests::temp_dir();
    let archives = dir.path().join("archives");
    std::fs::create_dir_all(&archives).unwrap();
    let good =
        bbupgrade_sim::archive::write_archive_with_program("8.19.6", &archives, 1, &bins.sim)
            .unwrap();
    let bytes = std::fs::read(&good.path).unwrap();
    let truncated = archives.join("truncated.tar.gz");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let truncated_sha = {
        let out = std::process::Command::new("sha256sum")
            .arg(&truncated)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)[..64].to_string()
    };

    let cases: [(&str, &Path, String, &str, &str); 3] = [
        (
            "checksum mismatch",
            &good.path,
            "ab".repeat(32),
            "8.19.6",
            "checksum mismatch",
        ),
        (
            "truncated archive",
            &truncated,
            truncated_sha,
            "8.19.6",
            "corrupt or truncated",
        ),
        (
            "another release",
            &good.path,
            good.sha256.clone(),
            "8.19.7",
            "top folder",
        ),
    ];
    for (what, archive, sha, version, reason) in cases {
        let root = dir.path().join(format!("root-{}", what.replace(' ', "-")));
        std::fs::create_dir_all(&root).unwrap();
        let out = std::process::Command::new(&bins.agent)
            .arg("stage")
            .arg("--archive")
            .arg(archive)
            .args(["--sha256", &sha, "--version", version, "--install-root"])
            .arg(&root)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{what}: {}", describe(&out));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(reason),
            "{what}: the error should say '{reason}': {}",
            describe(&out)
        );
        assert_eq!(
            std::fs::read_dir(&root).unwrap().count(),
            0,
            "{what}: something was left in {}",
            root.display()
        );
    }
}
