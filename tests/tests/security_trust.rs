//! Who an agent trusts, attacked on a real agent process (issue 14, attacks 4 and 8): coordinators
//! not listed or revoked, a revoked agent, private keys others can read, and the PKI files' modes
//! and overwriting.

use bbupgrade_common::identity::Role;
use bbupgrade_common::tls::TlsFiles;
use bbupgrade_tests::Bins;
use bbupgrade_tests::agent_process::*;
use bbupgrade_tests::{bbupgrade, bins, describe, temp_dir};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

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
