//! Tests of activation: every real-world unit and init script, and the file drivers.

use super::*;
use std::os::unix::fs::PermissionsExt;

/// The real-world fixtures (outside the project); `None` (skipped) when missing, but under
/// `CI=true` a missing folder fails the test.
pub(super) fn fixtures() -> Option<PathBuf> {
    let dir = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/fixtures/real-world"
    ));
    if dir.is_dir() {
        Some(dir)
    } else {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "real-world fixtures not found at {} (CI=true)",
            dir.display()
        );
        println!(
            "SKIPPED: real-world fixtures not found at {} (they live outside the project)",
            dir.display()
        );
        None
    }
}

const NEW: &str = "/srv/bitbucket-new/8.19.6";
/// The old install used when a unit runs through an unversioned link, so the link is detected.
const VERSIONED_OLD: &str = "/opt/atlassian/bitbucket/8.19.3";

#[derive(Debug)]
enum Expect {
    /// Edited: the old install (the one detected in the file) is gone, the new one is there.
    Edit,
    /// Runs through this unversioned link: the text changes only to add --no-search.
    Link(&'static str),
    /// Refused; the reason contains this text.
    Refused(&'static str),
}

fn table() -> Vec<(&'static str, bool, Expect)> {
    use Expect::*;
    // (file, is_systemd, expected outcome)
    vec![
        ("systemd/alvistack-package-bitbucket.service", true, Edit),
        ("systemd/ansible-arhadi-bitbucket-dc.service", true, Edit),
        (
            "systemd/ansible-dc-deployments-automation-2019.service",
            true,
            Link("/opt/atlassian/bitbucket/current"),
        ),
        (
            "systemd/ansible-dc-deployments-automation-foreground-2020.service",
            true,
            Link("/opt/atlassian/bitbucket/current"),
        ),
        (
            "systemd/ansible-dc-deployments-automation-forking.service",
            true,
            Link("/opt/atlassian/bitbucket/current"),
        ),
        (
            "systemd/ansible-rhythmictech.service",
            true,
            Link("/opt/atlassian/bitbucket/current"),
        ),
        ("systemd/archlinux-aur-killsignal.service", true, Edit),
        (
            "systemd/aur-atomica-atlassian-bitbucket-4.8.conf.d",
            true,
            Refused("no ExecStart="),
        ),
        (
            "systemd/aur-atomica-atlassian-bitbucket-4.8.service",
            true,
            Refused("Tomcat"),
        ),
        ("systemd/bparsons-tab-indented.service", true, Edit),
        ("systemd/dartvaper-rpm-5.6.2.service", true, Edit),
        ("systemd/jlhwung-catalina-pid.service", true, Edit),
        ("systemd/mario21ic-restart-always.service", true, Edit),
        ("systemd/puppet-bitbucket.service", true, Edit),
        ("systemd/puppet-stash.service", true, Edit),
        (
            "systemd/salt-xitaso-atlassian-bitbucket.service",
            true,
            Refused("wrapper"),
        ),
        ("initd/atlbitbucket-installer-4.8.1", false, Edit),
        (
            "initd/atlbitbucket_search-installer-4.8.1",
            false,
            Refused("bundled search"),
        ),
        (
            "initd/docker-atlassian-_exec-webapp.sh",
            false,
            Refused("calls neither"),
        ),
        (
            "initd/docker-atlassian-entrypoint-2019.sh",
            false,
            Refused("container entrypoint"),
        ),
        (
            "initd/docker-atlassian-entrypoint.py",
            false,
            Refused("not a shell script"),
        ),
        (
            "initd/docker-atlassian-exec-bitbucket-node.sh",
            false,
            Refused("calls neither"),
        ),
        (
            "initd/docker-wfhartford-start.sh",
            false,
            Refused("container entrypoint"),
        ),
        (
            "initd/puppet-bitbucket-debian.initd",
            false,
            Refused("shell helper"),
        ),
        ("initd/puppet-bitbucket-redhat.initd", false, Edit),
        (
            "initd/puppet-stash-debian.initd",
            false,
            Refused("indirectly"),
        ),
        (
            "initd/salt-simonwgill-bitbucket-4x.initd",
            false,
            Refused("Tomcat"),
        ),
        ("initd/salt-xitaso-env.sh", false, Refused("calls neither")),
        ("initd/salt-xitaso-start.sh", false, Edit),
        ("initd/salt-xitaso-stop.sh", false, Edit),
    ]
}

fn is_start_line(line: &str) -> bool {
    let t = line.trim();
    !t.starts_with('#') && t.contains("start-bitbucket.sh")
}

/// Every line that differs must have named the old install or be a start line.
fn assert_only_expected_lines_changed(name: &str, before: &str, after: &str, old: &str) {
    let b: Vec<&str> = before.split('\n').collect();
    let a: Vec<&str> = after.split('\n').collect();
    assert_eq!(b.len(), a.len(), "{name}: line count changed");
    for (x, y) in b.iter().zip(&a) {
        if x != y {
            assert!(
                x.contains(old) || is_start_line(x),
                "{name}: unexpected change of `{x}` into `{y}`"
            );
        }
    }
}

fn start_lines_have_no_search(name: &str, text: &str, systemd: bool) {
    for l in text.lines().filter(|l| is_start_line(l)) {
        let t = l.trim();
        if systemd && !t.starts_with("ExecStart=") {
            continue;
        }
        assert!(t.contains("--no-search"), "{name}: `{t}` lacks --no-search");
    }
}

#[test]
fn every_real_world_definition_is_edited_or_refused() {
    let Some(dir) = fixtures() else { return };
    let mut seen = 0;
    for sub in ["systemd", "initd"] {
        seen += std::fs::read_dir(dir.join(sub)).unwrap().count();
    }
    let table = table();
    assert_eq!(seen, table.len(), "a fixture is missing from the table");
    let new = Path::new(NEW);
    for (name, systemd, expect) in table {
        let text = std::fs::read_to_string(dir.join(name)).unwrap();
        let detected = install_in_unit(&text);
        let old = match (&expect, &detected) {
            (Expect::Link(_), _) | (_, None) => PathBuf::from(VERSIONED_OLD),
            (_, Some(d)) => d.clone(),
        };
        let edit = |t: &str| {
            if systemd {
                edit_systemd_unit(t, &old, new)
            } else {
                edit_initd_script(t, &old, new)
            }
        };
        match (edit(&text), expect) {
            (Ok(e), Expect::Edit) => {
                let old_s = old.to_str().unwrap();
                assert!(detected.is_some(), "{name}: install not detected");
                assert_eq!(
                    replace_install_count(&e.text, old_s),
                    replace_install_count_home(&e.text, old_s),
                    "{name}: old install {old_s} still named outside the home:\n{}",
                    e.text
                );
                assert!(e.text.contains(NEW), "{name}: new install missing");
                assert!(e.via_link.is_none(), "{name}");
                start_lines_have_no_search(name, &e.text, systemd);
                assert_only_expected_lines_changed(name, &text, &e.text, old_s);
                assert_eq!(install_in_unit(&e.text).as_deref(), Some(new), "{name}");
                // Idempotent: a second run changes nothing.
                let again = edit(&e.text).unwrap();
                assert_eq!(again.text, e.text, "{name}: second run differs");
            }
            (Ok(e), Expect::Link(link)) => {
                assert_eq!(e.via_link.as_deref(), Some(Path::new(link)), "{name}");
                assert!(!e.text.contains(NEW), "{name}");
                start_lines_have_no_search(name, &e.text, systemd);
                assert_only_expected_lines_changed(name, &text, &e.text, "\u{0}");
                assert_eq!(edit(&e.text).unwrap().text, e.text, "{name}");
            }
            (Err(ActivateError::Unsupported { reason, .. }), Expect::Refused(why)) => {
                assert!(
                    reason.contains(why),
                    "{name}: reason `{reason}` lacks `{why}`"
                );
            }
            (got, want) => panic!("{name}: expected {want:?}, got {got:?}"),
        }
    }
}

fn replace_install_count(text: &str, old: &str) -> usize {
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .map(|l| edit::pure_tests_count(l, old))
        .sum()
}

/// Occurrences that are allowed to stay: in BITBUCKET_HOME assignments.
fn replace_install_count_home(text: &str, old: &str) -> usize {
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#') && l.contains("BITBUCKET_HOME="))
        .map(|l| edit::pure_tests_count(l, old))
        .sum()
}

#[test]
fn tab_indented_unit_keeps_tabs_and_bytes() {
    let Some(dir) = fixtures() else { return };
    let text = std::fs::read_to_string(dir.join("systemd/bparsons-tab-indented.service")).unwrap();
    let e =
        edit_systemd_unit(&text, Path::new("/opt/atlassian/bitbucket"), Path::new(NEW)).unwrap();
    assert!(e.text.contains(&format!(
        "\tExecStart={NEW}/bin/start-bitbucket.sh --no-search\n"
    )));
    assert!(
        e.text
            .contains(&format!("\tExecStop={NEW}/bin/stop-bitbucket.sh\n"))
    );
    assert!(e.text.contains("\t \n"), "whitespace-only separator kept");
    // The home-located PIDFile is not under the install and stays.
    assert!(
        e.text
            .contains("\tPIDFile=/var/atlassian/application-data/bitbucket/log/bitbucket.pid\n")
    );
}

#[test]
fn foreground_unit_keeps_fg_and_gets_no_search_at_the_end() {
    let text = "[Service]\nExecStart=/opt/bb/8.19.3/bin/start-bitbucket.sh -fg\n";
    let e = edit_systemd_unit(
        text,
        Path::new("/opt/bb/8.19.3"),
        Path::new("/opt/bb/8.19.6"),
    )
    .unwrap();
    assert_eq!(
        e.text,
        "[Service]\nExecStart=/opt/bb/8.19.6/bin/start-bitbucket.sh -fg --no-search\n"
    );
}

#[test]
fn repeated_exec_start_reset_lines_and_crlf_are_kept() {
    let text = "[Service]\r\nExecStart=\r\nExecStart=/opt/bb/8.19.3/bin/start-bitbucket.sh\r\nWorkingDirectory=/opt/bb/8.19.3\r\n";
    let e = edit_systemd_unit(
        text,
        Path::new("/opt/bb/8.19.3"),
        Path::new("/opt/bb/8.19.6"),
    )
    .unwrap();
    assert_eq!(
        e.text,
        "[Service]\r\nExecStart=\r\nExecStart=/opt/bb/8.19.6/bin/start-bitbucket.sh --no-search\r\nWorkingDirectory=/opt/bb/8.19.6\r\n"
    );
}

#[test]
fn home_is_never_rewritten_even_inside_the_install_dir() {
    let text = "[Service]\nEnvironment=\"BITBUCKET_HOME=/opt/bb/home\"\nEnvironment=\"CATALINA_HOME=/opt/bb\"\nExecStart=/opt/bb/bin/start-bitbucket.sh\n";
    let e = edit_systemd_unit(text, Path::new("/opt/bb"), Path::new("/opt/bb-8.19.6")).unwrap();
    assert!(e.text.contains("BITBUCKET_HOME=/opt/bb/home"));
    assert!(e.text.contains("CATALINA_HOME=/opt/bb-8.19.6\""));
    assert!(e.notes.iter().any(|n| n.contains("BITBUCKET_HOME")));
}

#[test]
fn wrapper_under_the_install_is_refused_too() {
    let text = "[Service]\nExecStart=/opt/bb/8.19.3/custom/start.sh\n";
    let err = edit_systemd_unit(
        text,
        Path::new("/opt/bb/8.19.3"),
        Path::new("/opt/bb/8.19.6"),
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("/opt/bb/8.19.3/custom/start.sh"),
        "{err}"
    );
}

#[test]
fn unit_pointing_at_a_third_versioned_install_is_refused() {
    let text = "[Service]\nExecStart=/opt/bb/8.19.1/bin/start-bitbucket.sh\n";
    let err = edit_systemd_unit(
        text,
        Path::new("/opt/bb/8.19.3"),
        Path::new("/opt/bb/8.19.6"),
    )
    .unwrap_err();
    assert!(err.to_string().contains("neither the old install"), "{err}");
}

#[test]
fn installer_style_script_gets_no_search_after_relative_start() {
    let text = "#!/usr/bin/env bash\n### BEGIN INIT INFO\n# Provides: Bitbucket\n### END INIT INFO\nstart() {\n    ./start-bitbucket.sh\n}\ncd /opt/bb/8.19.3/bin\n";
    let e = edit_initd_script(
        text,
        Path::new("/opt/bb/8.19.3"),
        Path::new("/opt/bb/8.19.6"),
    )
    .unwrap();
    assert_eq!(
        e.text,
        "#!/usr/bin/env bash\n### BEGIN INIT INFO\n# Provides: Bitbucket\n### END INIT INFO\nstart() {\n    ./start-bitbucket.sh --no-search\n}\ncd /opt/bb/8.19.6/bin\n"
    );
}

#[test]
fn installer_4x_script_edits_cd_and_pidfile_and_keeps_header() {
    let Some(dir) = fixtures() else { return };
    let text = std::fs::read_to_string(dir.join("initd/atlbitbucket-installer-4.8.1")).unwrap();
    let e = edit_initd_script(
        &text,
        Path::new("/opt/atlassian/bitbucket/4.8.1"),
        Path::new("/opt/atlassian/bitbucket/4.8.5"),
    )
    .unwrap();
    assert!(e.text.contains("cd /opt/atlassian/bitbucket/4.8.5/bin\n"));
    assert!(
        e.text
            .contains("PIDFILE=/opt/atlassian/bitbucket/4.8.5/bin/../work/catalina.pid\n")
    );
    let header = |t: &str| t.lines().take(12).collect::<Vec<_>>().join("\n");
    assert_eq!(header(&text), header(&e.text));
    assert!(e.notes.iter().any(|n| n.contains("start-webapp.sh")));
}

#[test]
fn install_in_unit_detects_each_form() {
    assert_eq!(
        install_in_unit("[Service]\nExecStart=-/a/b/8.1.1/bin/start-bitbucket.sh --no-search\n"),
        Some(PathBuf::from("/a/b/8.1.1"))
    );
    assert_eq!(
        install_in_unit("cd /x/4.8.1/bin\n"),
        Some(PathBuf::from("/x/4.8.1"))
    );
    assert_eq!(
        install_in_unit("BITBUCKET_INSTALLDIR=\"/opt/x-7.2.2\"\n"),
        Some(PathBuf::from("/opt/x-7.2.2"))
    );
    assert_eq!(
        install_in_unit("[Service]\nExecStart=/usr/local/bin/wrapper\n"),
        None
    );
    assert_eq!(install_in_unit("# cd /x/bin\n"), None);
}

// ---- file drivers ----

fn unit(dir: &Path, exec: &str) -> PathBuf {
    let p = dir.join("bitbucket.service");
    std::fs::write(&p, format!("[Service]\nType=forking\nExecStart={exec}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o640)).unwrap();
    p
}

#[test]
fn activate_then_restore_round_trips_with_backup_and_mode() {
    let dir = tempfile::tempdir().unwrap();
    let old = dir.path().join("8.19.3");
    let new = dir.path().join("8.19.6");
    let p = unit(
        dir.path(),
        &format!("{}/bin/start-bitbucket.sh", old.display()),
    );
    let original = std::fs::read_to_string(&p).unwrap();
    let def = ServiceDef::Systemd {
        unit_path: p.clone(),
        unit_name: "bitbucket.service".into(),
    };
    let state = tempfile::tempdir().unwrap();
    let backups = Backups::in_state_dir(state.path());
    let out = activate(&def, &backups, None, &old, &new).unwrap();
    let backup = state
        .path()
        .join("service-backups/8.19.3/bitbucket.service");
    assert_eq!(out.backup_path.as_deref(), Some(backup.as_path()));
    assert_eq!(std::fs::read_to_string(&backup).unwrap(), original);
    assert_eq!(std::fs::metadata(&backup).unwrap().mode() & 0o777, 0o600);
    // Nothing but the definition where the service manager looks.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    assert_eq!(
        backups.list(),
        vec![BackupEntry {
            version: "8.19.3".into(),
            path: backup.clone()
        }]
    );
    let edited = std::fs::read_to_string(&p).unwrap();
    assert!(edited.contains(&format!(
        "{}/bin/start-bitbucket.sh --no-search",
        new.display()
    )));
    assert_eq!(std::fs::metadata(&p).unwrap().mode() & 0o777, 0o640);
    // A second activate keeps the first backup and the same text.
    activate(&def, &backups, None, &old, &new).unwrap();
    assert_eq!(std::fs::read_to_string(&backup).unwrap(), original);
    assert_eq!(std::fs::read_to_string(&p).unwrap(), edited);
    restore(&def, &backups, None, &old, &new).unwrap();
    assert_eq!(std::fs::read_to_string(&p).unwrap(), original);
    assert_eq!(std::fs::metadata(&p).unwrap().mode() & 0o777, 0o640);
    restore(&def, &backups, None, &old, &new).unwrap();
    assert_eq!(std::fs::read_to_string(&p).unwrap(), original);
}

#[test]
fn unit_through_current_link_switches_the_link() {
    let dir = tempfile::tempdir().unwrap();
    let old = dir.path().join("8.19.3");
    let new = dir.path().join("8.19.6");
    std::fs::create_dir_all(&old).unwrap();
    std::fs::create_dir_all(&new).unwrap();
    let link = dir.path().join("current");
    std::os::unix::fs::symlink(&old, &link).unwrap();
    let p = unit(
        dir.path(),
        &format!("{}/bin/start-bitbucket.sh --no-search", link.display()),
    );
    let original = std::fs::read_to_string(&p).unwrap();
    let def = ServiceDef::Systemd {
        unit_path: p.clone(),
        unit_name: "bitbucket.service".into(),
    };
    let state = tempfile::tempdir().unwrap();
    let backups = Backups::in_state_dir(state.path());
    let out = activate(&def, &backups, None, &old, &new).unwrap();
    assert_eq!(std::fs::read_link(&link).unwrap(), new);
    assert_eq!(std::fs::read_to_string(&p).unwrap(), original);
    assert!(
        out.notes.iter().any(|n| n.contains("switched")),
        "{:?}",
        out.notes
    );
    restore(&def, &backups, None, &old, &new).unwrap();
    assert_eq!(std::fs::read_link(&link).unwrap(), old);
}

#[test]
fn refusing_to_replace_a_real_directory_with_a_link() {
    let dir = tempfile::tempdir().unwrap();
    let link = dir.path().join("current");
    std::fs::create_dir(&link).unwrap();
    let err = switch_link(&link, Path::new("/x")).unwrap_err();
    assert!(err.to_string().contains("not a symlink"), "{err}");
}

#[test]
fn unsupported_error_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = unit(dir.path(), "/usr/local/bin/start-bitbucket-wrapper");
    let def = ServiceDef::Initd {
        script_path: p.clone(),
    };
    let def2 = ServiceDef::Systemd {
        unit_path: p.clone(),
        unit_name: "x".into(),
    };
    let state = tempfile::tempdir().unwrap();
    let backups = Backups::in_state_dir(state.path());
    let (old, new) = (Path::new("/a/1.1.1"), Path::new("/a/1.1.2"));
    let err = activate(&def2, &backups, None, old, new).unwrap_err();
    assert!(err.to_string().contains(&p.display().to_string()), "{err}");
    assert!(activate(&def, &backups, None, old, new).is_err());
    assert!(
        backups.list().is_empty(),
        "no backup of a refused definition"
    );
}

/// The installer's script, as in `/etc/init.d/atlbitbucket`, pointing at `install`.
fn initd_script(dir: &Path, install: &Path) -> PathBuf {
    let p = dir.join("atlbitbucket");
    std::fs::write(
        &p,
        format!(
            "#!/usr/bin/env bash\n### BEGIN INIT INFO\n# Provides:          atlbitbucket\n### END INIT INFO\nstart() {{\n    ./start-bitbucket.sh\n}}\ncd {}/bin\n",
            install.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

#[test]
fn initd_backup_goes_to_the_state_dir_not_init_d() {
    let initd = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    let (old, new) = (Path::new("/opt/bb/8.19.3"), Path::new("/opt/bb/8.19.6"));
    let p = initd_script(initd.path(), old);
    let original = std::fs::read_to_string(&p).unwrap();
    let def = ServiceDef::Initd {
        script_path: p.clone(),
    };
    let backups = Backups::in_state_dir(state.path());
    let out = activate(&def, &backups, None, old, new).unwrap();
    let names: Vec<_> = std::fs::read_dir(initd.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("atlbitbucket")]);
    let backup = state.path().join("service-backups/8.19.3/atlbitbucket");
    assert_eq!(out.backup_path.as_deref(), Some(backup.as_path()));
    assert_eq!(std::fs::read_to_string(&backup).unwrap(), original);
    assert_eq!(std::fs::metadata(&backup).unwrap().mode() & 0o777, 0o600);
    assert_eq!(std::fs::metadata(&p).unwrap().mode() & 0o777, 0o755);
    // Rollback finds it by the install it returns to.
    restore(&def, &backups, None, old, new).unwrap();
    assert_eq!(std::fs::read_to_string(&p).unwrap(), original);
}

#[test]
fn old_style_backup_beside_the_script_is_moved_and_used_by_rollback() {
    let initd = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    let (old, new) = (Path::new("/opt/bb/8.19.3"), Path::new("/opt/bb/8.19.6"));
    // What an older agent left: the script edited, its backup beside it (0755, same Provides).
    let p = initd_script(initd.path(), old);
    let original = std::fs::read_to_string(&p).unwrap();
    let legacy = initd.path().join("atlbitbucket.bbupgrade-backup-8.19.3");
    std::fs::copy(&p, &legacy).unwrap();
    let edited = edit_initd_script(&original, old, new).unwrap().text;
    std::fs::write(&p, &edited).unwrap();
    let def = ServiceDef::Initd {
        script_path: p.clone(),
    };
    let backups = Backups::in_state_dir(state.path());
    let notes = backups.migrate_legacy(&p).unwrap();
    assert!(!legacy.exists(), "the old-style backup is still in init.d");
    assert!(notes[0].contains("moved the backup"), "{notes:?}");
    let moved = state.path().join("service-backups/8.19.3/atlbitbucket");
    assert_eq!(std::fs::read_to_string(&moved).unwrap(), original);
    assert_eq!(backups.migrate_legacy(&p).unwrap(), Vec::<String>::new());
    restore(&def, &backups, None, old, new).unwrap();
    assert_eq!(std::fs::read_to_string(&p).unwrap(), original);

    // Left by an older agent while a state-dir backup exists already: both kept, init.d cleaned.
    std::fs::write(&legacy, "#!/bin/sh\n# another\n").unwrap();
    let out = restore(&def, &backups, None, old, new).unwrap();
    assert!(!legacy.exists());
    assert!(
        out.notes.iter().any(|n| n.contains("legacy-backup")),
        "{:?}",
        out.notes
    );
    assert_eq!(std::fs::read_to_string(&moved).unwrap(), original);
    assert_eq!(backups.list().len(), 2);
}

#[test]
fn a_link_where_a_backup_should_be_is_refused() {
    let initd = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    let (old, new) = (Path::new("/opt/bb/8.19.3"), Path::new("/opt/bb/8.19.6"));
    let p = initd_script(initd.path(), old);
    let def = ServiceDef::Initd {
        script_path: p.clone(),
    };
    let backups = Backups::in_state_dir(state.path());
    let secret = state.path().join("secret");
    std::fs::write(&secret, "x").unwrap();
    std::fs::create_dir_all(state.path().join("service-backups")).unwrap();
    std::os::unix::fs::symlink(&secret, state.path().join("service-backups/8.19.3")).unwrap();
    let err = activate(&def, &backups, None, old, new).unwrap_err();
    assert!(err.to_string().contains("symbolic link"), "{err}");
    assert_eq!(std::fs::read_to_string(&secret).unwrap(), "x");
    assert!(
        std::fs::read_to_string(&p)
            .unwrap()
            .contains("/opt/bb/8.19.3/bin")
    );
}
