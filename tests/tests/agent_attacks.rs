//! Issue 14, attacks 1-3, performed against a real agent running as root with the Bitbucket user a
//! real unprivileged user (`nobody`): what that user can do to its own files (the running install
//! it owns, its home, its log) must never become a write, a read or a process of root's.
//!
//! Every test needs root and a `nobody` user; without them it fails under `CI=true` and skips
//! (saying so) elsewhere.

use bbupgrade_common::identity::Role;
use bbupgrade_common::proto::agent_client::AgentClient;
use bbupgrade_common::proto::*;
use bbupgrade_common::tls::{TlsFiles, connect_agent};
use bbupgrade_demo::sandbox::{Sandbox, SandboxLb};
use bbupgrade_tests::{bins, sandbox_options, start_sandbox};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tonic::transport::Channel;

const CALL_TIMEOUT_SECS: u32 = 60;
const CHUNK_BYTES: usize = 1 << 20;
const SECRET: &str = "TOPSECRET-issue14-4b1d";

type Client = AgentClient<Channel>;

/// Root and a `nobody` user, or a clear failure under CI (a skip with a message elsewhere).
fn prerequisites() -> Option<nix::unistd::User> {
    let user = nix::unistd::User::from_name("nobody").ok().flatten();
    let root = nix::unistd::geteuid().is_root();
    match user {
        Some(u) if root => Some(u),
        _ => {
            let why = format!(
                "these attacks need root (euid is {}) and a user `nobody` (found: {})",
                nix::unistd::geteuid(),
                user.is_some()
            );
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!("{why}");
            }
            eprintln!("SKIPPED: {why}");
            None
        }
    }
}

/// A one-node sandbox with its node running on the old release, installed (as before bbupgrade)
/// owned by the Bitbucket user.
async fn sandbox(dir: &Path) -> Sandbox {
    let bins = bins!();
    start_sandbox(dir, sandbox_options(&bins, 1, SandboxLb::None))
        .await
        .expect("sandbox")
}

async fn client(s: &Sandbox) -> Client {
    let tls = TlsFiles::in_pki_dir(&s.pki, Role::Coordinator, "sandbox-admin")
        .load()
        .unwrap();
    let node = &s.sim.nodes()[0].name;
    let channel = connect_agent(&s.agent_addrs[0], &tls, node, Duration::from_secs(5))
        .await
        .unwrap_or_else(|e| panic!("connecting to the agent of {node}: {e:#}"));
    AgentClient::new(channel)
        .max_decoding_message_size(8 << 20)
        .max_encoding_message_size(8 << 20)
}

/// Streams the sandbox's new release to the agent.
async fn stage_new_release(c: &mut Client, s: &Sandbox) -> PathBuf {
    let to = &s.to_archive;
    let bytes = std::fs::read(&to.path).unwrap();
    let mut msgs = vec![StageUploadMessage {
        msg: Some(stage_upload_message::Msg::Header(StageHeader {
            operation_id: "stage-1".into(),
            version: "8.19.6".into(),
            sha256: to.sha256.clone(),
            size_bytes: bytes.len() as u64,
        })),
    }];
    msgs.extend(bytes.chunks(CHUNK_BYTES).map(|c| StageUploadMessage {
        msg: Some(stage_upload_message::Msg::Chunk(c.to_vec())),
    }));
    let mut events = c
        .stage_upload(futures::stream::iter(msgs))
        .await
        .expect("stage")
        .into_inner();
    while let Some(ev) = events.message().await.expect("stage events") {
        if let Some(stage_event::Event::Result(r)) = ev.event {
            return PathBuf::from(r.install_path);
        }
    }
    panic!("the stage ended without a result");
}

/// Runs `sh -c script` as the Bitbucket user; returns whether it succeeded.
fn as_user(user: &nix::unistd::User, script: &str) -> bool {
    std::process::Command::new("sh")
        .arg("-c")
        .arg(script)
        .uid(user.uid.as_raw())
        .gid(user.gid.as_raw())
        .current_dir("/")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .expect("running sh as the Bitbucket user")
        .success()
}

/// A root-only file (0600) in a directory the Bitbucket user cannot enter.
fn root_file(dir: &Path, name: &str, text: &str) -> PathBuf {
    let vault = dir.join("root-only");
    std::fs::create_dir_all(&vault).unwrap();
    std::fs::set_permissions(&vault, std::fs::Permissions::from_mode(0o711)).unwrap();
    let p = vault.join(name);
    std::fs::write(&p, text).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p
}

fn assert_root_file_untouched(p: &Path, text: &str) {
    let m = std::fs::metadata(p).unwrap();
    assert_eq!(std::fs::read_to_string(p).unwrap(), text, "{}", p.display());
    assert_eq!(
        (m.uid(), m.mode() & 0o7777),
        (0, 0o600),
        "{} changed owner or mode",
        p.display()
    );
}

/// Every file under `dir` (not following links) whose bytes contain `needle`, but `except`.
fn files_containing(dir: &Path, needle: &str, except: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            let Ok(t) = e.file_type() else { continue };
            if t.is_dir() {
                stack.push(p);
            } else if t.is_file()
                && p != except
                && std::fs::read(&p)
                    .is_ok_and(|b| b.windows(needle.len()).any(|w| w == needle.as_bytes()))
            {
                found.push(p);
            }
        }
    }
    found
}

/// Attacks 1 and 3: links planted where Prepare writes (aimed at a root file and at a unit file),
/// and a customization of the running install symlinked to a root-only secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planted_links_never_make_prepare_write_or_read_root_files() {
    let Some(user) = prerequisites() else { return };
    let dir = bbupgrade_tests::temp_dir();
    let s = sandbox(dir.path()).await;
    let node = s.sim.nodes()[0].clone();
    let mut c = client(&s).await;

    // The staged install is root's: not the Bitbucket user's, not writable by it.
    let install = stage_new_release(&mut c, &s).await;
    for rel in [
        "",
        "bin",
        "bin/start-bitbucket.sh",
        "bin/set-bitbucket-home.sh",
    ] {
        let m = std::fs::symlink_metadata(install.join(rel)).unwrap();
        assert_eq!(m.uid(), 0, "{rel} of the staged install is not root's");
        assert_eq!(m.mode() & 0o022, 0, "{rel} is group/other-writable");
    }

    // Attack 1: the Bitbucket user can no longer plant anything in the staged install...
    let victim = root_file(dir.path(), "victim", "root 0600 victim\n");
    let unit = dir.path().join("root-only/bitbucket.service");
    std::fs::write(&unit, "[Service]\nUser=nobody\n").unwrap();
    std::fs::set_permissions(&unit, std::fs::Permissions::from_mode(0o600)).unwrap();
    let tmp_home = install.join("bin/.set-bitbucket-home.sh.bbupgrade-tmp");
    assert!(
        !as_user(
            &user,
            &format!("ln -s {} {}", victim.display(), tmp_home.display())
        ),
        "the Bitbucket user could write into the staged install"
    );
    // ...and a link planted there anyway (an install from before, or any other way) is not
    // followed: the temp files have random names and are created exclusively.
    std::os::unix::fs::symlink(&victim, &tmp_home).unwrap();
    std::os::unix::fs::symlink(&unit, install.join("bin/._start-webapp.sh.bbupgrade-tmp")).unwrap();

    // Attack 3: the user (owner of the running install) links a customization to a root secret.
    let secret = root_file(dir.path(), "secret", &format!("{SECRET}\n"));
    let jre = node.install_dir.join("bin/set-jre-home.sh");
    assert!(as_user(
        &user,
        &format!("ln -sf {} {}", secret.display(), jre.display())
    ));
    let err = c
        .prepare(PrepareRequest {
            operation_id: "prepare-attack".into(),
            version: "8.19.6".into(),
        })
        .await
        .expect_err("prepare must refuse a symlinked customization");
    let msg = err.message();
    assert!(
        msg.contains("set-jre-home.sh") && msg.contains("symbolic link"),
        "{msg}"
    );
    assert!(!msg.contains(SECRET), "the secret is in the error: {msg}");

    // Once the user makes it a plain file again, Prepare succeeds; no victim was touched.
    assert!(as_user(
        &user,
        &format!(
            "rm {0} && echo 'JRE_HOME=/opt/jre # mine' > {0}",
            jre.display()
        )
    ));
    let prepared = c
        .prepare(PrepareRequest {
            operation_id: "prepare-1".into(),
            version: "8.19.6".into(),
        })
        .await
        .expect("prepare")
        .into_inner();
    assert!(
        prepared
            .carried
            .iter()
            .any(|f| f.path == "bin/set-jre-home.sh"),
        "{prepared:?}"
    );
    assert_root_file_untouched(&victim, "root 0600 victim\n");
    assert_root_file_untouched(&unit, "[Service]\nUser=nobody\n");
    let carried = std::fs::symlink_metadata(install.join("bin/set-jre-home.sh")).unwrap();
    assert!(carried.file_type().is_file());
    assert_eq!((carried.uid(), carried.mode() & 0o022), (0, 0));

    // The secret is nowhere but in its file: not in the new install, the agent's journal or log.
    let leaks = files_containing(dir.path(), SECRET, &secret);
    assert!(leaks.is_empty(), "the secret leaked into {leaks:?}");
    drop(s);
}

/// Attack 2 and the log half of attack 3: scripts the Bitbucket user edits never run as root, a
/// `set-bitbucket-user.sh` naming root is refused, and a symlinked log is not read as root.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scripts_the_user_edits_never_run_as_root_and_its_log_is_not_read_as_root() {
    let Some(user) = prerequisites() else { return };
    let dir = bbupgrade_tests::temp_dir();
    let s = sandbox(dir.path()).await;
    let node = s.sim.nodes()[0].clone();
    let mut c = client(&s).await;
    let bin = node.install_dir.join("bin");
    let seen = node.home.join("uid-seen");
    let uid = user.uid.as_raw().to_string();

    // The user edits its scripts to record whom they run as, then names root as its user.
    for script in ["start-bitbucket.sh", "stop-bitbucket.sh"] {
        let p = bin.join(script);
        assert!(as_user(
            &user,
            &format!("sed -i '2i id -u >> {}' {}", seen.display(), p.display())
        ));
    }
    let user_file = bin.join("set-bitbucket-user.sh");
    assert!(as_user(
        &user,
        &format!("echo 'BITBUCKET_USER=\"root\"' > {}", user_file.display())
    ));
    let err = c
        .stop(StopRequest {
            operation_id: "stop-as-root".into(),
            timeout_secs: CALL_TIMEOUT_SECS,
            kill_after_timeout: false,
        })
        .await
        .expect_err("a set-bitbucket-user.sh naming root must be refused");
    assert!(
        err.message().contains("BITBUCKET_USER=root") && err.message().contains("nobody"),
        "{}",
        err.message()
    );
    assert!(!seen.exists(), "a script ran although it was refused");

    // Naming the configured user (the old way: root ran the script and let it switch), the
    // agent still switches itself: every script runs as the user, and so does the node.
    assert!(as_user(
        &user,
        &format!("echo 'BITBUCKET_USER=\"nobody\"' > {}", user_file.display())
    ));
    c.stop(StopRequest {
        operation_id: "stop-1".into(),
        timeout_secs: CALL_TIMEOUT_SECS,
        kill_after_timeout: false,
    })
    .await
    .expect("stop");
    let started = c
        .start(StartRequest {
            operation_id: "start-1".into(),
            timeout_secs: CALL_TIMEOUT_SECS,
        })
        .await
        .expect("start")
        .into_inner();
    assert_eq!(started.state, "RUNNING");
    let uids = std::fs::read_to_string(&seen).unwrap();
    assert_eq!(
        uids.lines().collect::<Vec<_>>(),
        vec![uid.as_str(), uid.as_str()],
        "the scripts ran as {uids:?}"
    );
    let pid = s.sim.node_pid(0).expect("a running node");
    let owner = std::fs::metadata(format!("/proc/{pid}")).unwrap().uid();
    assert_eq!(owner, user.uid.as_raw(), "the node runs as uid {owner}");

    // A start that times out reports the log's tail: never through a link, as root.
    c.stop(StopRequest {
        operation_id: "stop-2".into(),
        timeout_secs: CALL_TIMEOUT_SECS,
        kill_after_timeout: false,
    })
    .await
    .expect("stop");
    let secret = root_file(dir.path(), "secret", &format!("{SECRET}\n"));
    let log = node.home.join("log/atlassian-bitbucket.log");
    assert!(as_user(
        &user,
        &format!(
            "mkdir -p {0} && rm -f {1} && ln -s {2} {1} && sed -i '2i exit 0' {3}",
            log.parent().unwrap().display(),
            log.display(),
            secret.display(),
            bin.join("start-bitbucket.sh").display()
        )
    ));
    let err = c
        .start(StartRequest {
            operation_id: "start-timeout".into(),
            timeout_secs: 2,
        })
        .await
        .expect_err("a node that never starts times out");
    let msg = err.message();
    assert!(msg.contains("did not say RUNNING"), "{msg}");
    assert!(msg.contains("not readable by the Bitbucket user"), "{msg}");
    assert!(!msg.contains(SECRET), "the secret is in the error: {msg}");
    let leaks = files_containing(dir.path(), SECRET, &secret);
    assert!(leaks.is_empty(), "the secret leaked into {leaks:?}");
    drop(s);
}
