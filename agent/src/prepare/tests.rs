//! Tests of prepare on the real 7.21.17 release scripts and their customized copies.

use super::*;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};

fn fixtures() -> Option<PathBuf> {
    let dir = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/fixtures/real-world/bin-scripts"
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

fn read(dir: &Path, rel: &str) -> String {
    fs::read_to_string(dir.join(rel)).unwrap()
}

fn changed_lines(a: &str, b: &str) -> Vec<(String, String)> {
    assert_eq!(a.lines().count(), b.lines().count());
    a.lines()
        .zip(b.lines())
        .filter(|(x, y)| x != y)
        .map(|(x, y)| (x.to_string(), y.to_string()))
        .collect()
}

#[test]
fn home_line_in_the_release_script() {
    let Some(dir) = fixtures() else { return };
    let text = read(&dir, "release-7.21.17/set-bitbucket-home.sh");
    let out = set_home_line(
        &text,
        Path::new("/var/atlassian/application-data/bitbucket"),
    )
    .unwrap();
    assert_eq!(
        changed_lines(&text, &out),
        vec![(
            "    BITBUCKET_HOME=".to_string(),
            "    BITBUCKET_HOME=/var/atlassian/application-data/bitbucket".to_string()
        )]
    );
    assert!(!out.ends_with('\n'), "no final newline, as shipped");
    let again =
        set_home_line(&out, Path::new("/var/atlassian/application-data/bitbucket")).unwrap();
    assert_eq!(again, out);
    let other = set_home_line(&out, Path::new("/srv/bb-home")).unwrap();
    assert!(other.contains("\n    BITBUCKET_HOME=/srv/bb-home\n"));
    // The STASH_HOME fallback assignment is not touched.
    assert!(other.contains("BITBUCKET_HOME=$STASH_HOME"));
}

#[test]
fn home_line_in_customized_copies() {
    let Some(dir) = fixtures() else { return };
    let chef = read(&dir, "chef-bitbucket_server-5.0.1/set-bitbucket-home.sh");
    let out = set_home_line(&chef, Path::new("/data/bb")).unwrap();
    assert_eq!(
        changed_lines(&chef, &out),
        vec![(
            "    BITBUCKET_HOME=\"/var/atlassian/application-data/bitbucket\" # set by chef".into(),
            "    BITBUCKET_HOME=/data/bb # set by chef".into()
        )]
    );
    let alvistack = read(
        &dir,
        "alvistack-package-patched-7.21.17/set-bitbucket-home.sh",
    );
    let out = set_home_line(&alvistack, Path::new("/data/bb")).unwrap();
    let changes = changed_lines(&alvistack, &out);
    assert_eq!(changes.len(), 1);
    assert_eq!(changes[0].1, "    BITBUCKET_HOME=/data/bb");
    assert!(out.contains("BITBUCKET_CATALINA=\"/opt/atlassian/bitbucket\""));
}

#[test]
fn home_line_in_the_5x_form_with_crlf() {
    let text = "if [ \"x${BITBUCKET_HOME}\" = \"x\" ]; then\r\n\tBITBUCKET_HOME=\r\nfi\r\n";
    let out = set_home_line(text, Path::new("/h")).unwrap();
    assert_eq!(
        out,
        "if [ \"x${BITBUCKET_HOME}\" = \"x\" ]; then\r\n\tBITBUCKET_HOME=/h\r\nfi\r\n"
    );
}

#[test]
fn odd_homes_are_quoted_and_spaces_refused() {
    let text = "if [ -z \"$BITBUCKET_HOME\" ]; then\n    BITBUCKET_HOME=\nfi\n";
    let out = set_home_line(text, Path::new("/h/a$b")).unwrap();
    assert!(out.contains("    BITBUCKET_HOME='/h/a$b'\n"));
    assert_eq!(set_home_line(&out, Path::new("/h/a$b")).unwrap(), out);
    let err = set_home_line(text, Path::new("/h/with space")).unwrap_err();
    assert!(matches!(err, PrepareError::HomeWithSpaces { .. }));
    assert!(set_home_line(text, Path::new("relative")).is_err());
    let err = set_home_line("echo hi\nBITBUCKET_HOME=/x\n", Path::new("/h")).unwrap_err();
    assert!(err.to_string().contains("set-bitbucket-home.sh"), "{err}");
}

#[test]
fn jvm_settings_from_the_alvistack_copy() {
    let Some(dir) = fixtures() else { return };
    let old = read(&dir, "alvistack-package-patched-7.21.17/_start-webapp.sh");
    let new = read(&dir, "release-7.21.17/_start-webapp.sh");
    let (merged, names) = merge_jvm_settings(&old, &new);
    assert_eq!(names, JVM_SETTINGS.map(String::from).to_vec());
    assert_eq!(
        changed_lines(&new, &merged),
        vec![
            (
                "#JVM_SUPPORT_RECOMMENDED_ARGS=".into(),
                "JVM_SUPPORT_RECOMMENDED_ARGS=\"-Datlassian.plugins.enable.wait=300 -XX:+UnlockExperimentalVMOptions\"".into()
            ),
            ("    JVM_MINIMUM_MEMORY=512m".into(), "    JVM_MINIMUM_MEMORY=\"2048m\"".into()),
            ("    JVM_MAXIMUM_MEMORY=1g".into(), "    JVM_MAXIMUM_MEMORY=\"2048m\"".into()),
        ]
    );
    let (again, names) = merge_jvm_settings(&old, &merged);
    assert_eq!(again, merged);
    assert!(names.is_empty());
}

#[test]
fn jvm_settings_and_java_opts_from_the_puppet_copy() {
    let Some(dir) = fixtures() else { return };
    let old = read(&dir, "puppet-bitbucket-7.2.2/_start-webapp.sh");
    let new = read(&dir, "release-7.21.17/_start-webapp.sh");
    let (merged, names) = merge_jvm_settings(&old, &new);
    assert_eq!(
        names,
        vec![
            "JVM_MINIMUM_MEMORY",
            "JVM_MAXIMUM_MEMORY",
            "JVM_SUPPORT_RECOMMENDED_ARGS",
            "JAVA_OPTS"
        ]
    );
    assert!(merged.contains("    JVM_MINIMUM_MEMORY=\"256m\"\n"));
    assert!(merged.contains("    JVM_MAXIMUM_MEMORY=\"1024m\"\n"));
    assert!(merged.contains(&format!(
        "{JAVA_OPTS_MARK}\nJAVA_OPTS=\" $JAVA_OPTS\"\n\n# Occasionally"
    )));
    // The product's own JAVA_OPTS line is still there, once.
    assert_eq!(merged.matches("JAVA_OPTS=\"-classpath").count(), 1);
    let (again, names) = merge_jvm_settings(&old, &merged);
    assert_eq!(again, merged);
    assert!(names.is_empty(), "{names:?}");
}

#[test]
fn jvm_settings_from_chef_and_ansible_copies() {
    let Some(dir) = fixtures() else { return };
    let new = read(&dir, "release-7.21.17/_start-webapp.sh");
    let chef = read(&dir, "chef-bitbucket_server-5.0.1/_start-webapp.sh");
    let (merged, names) = merge_jvm_settings(&chef, &new);
    // Chef's memory values equal the release's; only the (empty) support args are set.
    assert_eq!(names, vec!["JVM_SUPPORT_RECOMMENDED_ARGS"]);
    assert_eq!(changed_lines(&new, &merged).len(), 1);
    let ansible = read(&dir, "ansible-alvistack-role/_start-webapp.sh");
    let (merged, names) = merge_jvm_settings(&ansible, &new);
    assert_eq!(names.len(), 3);
    assert!(merged.contains("-XX:+IgnoreUnrecognizedVMOptions"));
    assert_eq!(changed_lines(&new, &merged).len(), 3);
}

#[test]
fn customized_decision() {
    assert!(!is_customized("aa", Some("AA"), Some("bb")));
    assert!(is_customized("aa", Some("bb"), Some("aa")));
    assert!(!is_customized("aa", None, Some("aa")));
    assert!(is_customized("aa", None, Some("bb")));
    assert!(is_customized("aa", None, None));
}

fn install(root: &Path, name: &str, release: &Path) -> PathBuf {
    let dir = root.join(name);
    fs::create_dir_all(dir.join("bin")).unwrap();
    for f in [
        "_start-webapp.sh",
        "set-bitbucket-home.sh",
        "set-bitbucket-user.sh",
        "set-jre-home.sh",
        "start-bitbucket.sh",
        "stop-bitbucket.sh",
    ] {
        let p = dir.join("bin").join(f);
        fs::copy(release.join(f), &p).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
    }
    dir
}

fn write_manifest(dir: &Path) {
    let mut files = serde_json::Map::new();
    for e in fs::read_dir(dir.join("bin")).unwrap() {
        let e = e.unwrap();
        let rel = format!("bin/{}", e.file_name().to_string_lossy());
        files.insert(rel, sha256_hex(&fs::read(e.path()).unwrap()).into());
    }
    let m = serde_json::json!({"version": "x", "archive_sha256": "00", "files": files});
    fs::write(dir.join(MANIFEST_FILE), m.to_string()).unwrap();
}

fn snapshot(dir: &Path) -> Vec<(String, Vec<u8>, u32)> {
    let mut v: Vec<_> = fs::read_dir(dir.join("bin"))
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                fs::read(e.path()).unwrap(),
                e.metadata().unwrap().mode() & 0o7777,
            )
        })
        .collect();
    v.sort();
    v
}

#[test]
fn prepare_carries_customizations_and_is_idempotent() {
    let Some(fx) = fixtures() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let release = fx.join("release-7.21.17");
    let cur = install(tmp.path(), "8.19.3", &release);
    write_manifest(&cur);
    let new = install(tmp.path(), "8.19.6", &release);
    write_manifest(&new);
    // The admin customized the JRE and the heap in the running install.
    let jre = cur.join("bin/set-jre-home.sh");
    fs::copy(
        fx.join("alvistack-package-patched-7.21.17/set-jre-home.sh"),
        &jre,
    )
    .unwrap();
    fs::set_permissions(&jre, fs::Permissions::from_mode(0o750)).unwrap();
    fs::copy(
        fx.join("puppet-bitbucket-7.2.2/_start-webapp.sh"),
        cur.join("bin/_start-webapp.sh"),
    )
    .unwrap();
    fs::create_dir_all(cur.join("conf")).unwrap();
    fs::write(cur.join("conf/custom.properties"), "a=b\n").unwrap();

    let input = PrepareInput {
        current_install: cur.clone(),
        new_install: new.clone(),
        home: PathBuf::from("/var/atlassian/application-data/bitbucket"),
        extra_files: vec!["conf/custom.properties".into()],
        bitbucket_user: crate::rootfs::Reader::current(),
    };
    let first = prepare(&input).unwrap();
    let paths: Vec<&str> = first.carried.iter().map(|c| c.path.as_str()).collect();
    assert_eq!(
        paths,
        vec![
            "bin/set-jre-home.sh",
            "bin/_start-webapp.sh",
            "conf/custom.properties"
        ]
    );
    assert!(
        first.carried[1].reason.contains("JAVA_OPTS"),
        "{:?}",
        first.carried
    );
    assert_eq!(
        fs::read(new.join("bin/set-jre-home.sh")).unwrap(),
        fs::read(&jre).unwrap()
    );
    assert_eq!(
        fs::metadata(new.join("bin/set-jre-home.sh"))
            .unwrap()
            .mode()
            & 0o7777,
        0o750
    );
    assert_eq!(
        fs::metadata(new.join("bin/_start-webapp.sh"))
            .unwrap()
            .mode()
            & 0o7777,
        0o755
    );
    assert!(
        read(&new, "bin/set-bitbucket-home.sh")
            .contains("    BITBUCKET_HOME=/var/atlassian/application-data/bitbucket\n")
    );
    assert!(read(&new, "bin/_start-webapp.sh").contains("JVM_MAXIMUM_MEMORY=\"1024m\""));
    assert_eq!(read(&new, "conf/custom.properties"), "a=b\n");
    let files = snapshot(&new);

    let second = prepare(&input).unwrap();
    assert_eq!(second.carried, first.carried);
    assert_eq!(snapshot(&new), files);
}

#[test]
fn prepare_without_manifest_notes_it() {
    let Some(fx) = fixtures() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let release = fx.join("release-7.21.17");
    let cur = install(tmp.path(), "8.19.3", &release);
    let new = install(tmp.path(), "8.19.6", &release);
    write_manifest(&new);
    fs::write(
        cur.join("bin/set-bitbucket-user.sh"),
        "BITBUCKET_USER=\"atlbitbucket\"\n",
    )
    .unwrap();
    let input = PrepareInput {
        current_install: cur,
        new_install: new.clone(),
        home: PathBuf::from("/h"),
        extra_files: vec![],
        bitbucket_user: crate::rootfs::Reader::current(),
    };
    let out = prepare(&input).unwrap();
    assert!(
        out.notes.iter().any(|n| n.contains("no manifest")),
        "{:?}",
        out.notes
    );
    let paths: Vec<&str> = out.carried.iter().map(|c| c.path.as_str()).collect();
    assert_eq!(paths, vec!["bin/set-bitbucket-user.sh"]);
    assert_eq!(prepare(&input).unwrap(), out);
}

#[test]
fn extra_files_must_stay_inside_the_install() {
    let tmp = tempfile::tempdir().unwrap();
    let cur = tmp.path().join("a");
    let new = tmp.path().join("b");
    fs::create_dir_all(new.join("bin")).unwrap();
    fs::create_dir_all(&cur).unwrap();
    fs::write(
        new.join("bin/set-bitbucket-home.sh"),
        "if [ -z \"$BITBUCKET_HOME\" ]; then\n    BITBUCKET_HOME=\nfi\n",
    )
    .unwrap();
    for bad in ["../etc/passwd", "/etc/passwd", ""] {
        let input = PrepareInput {
            current_install: cur.clone(),
            new_install: new.clone(),
            home: PathBuf::from("/h"),
            extra_files: vec![bad.into()],
            bitbucket_user: crate::rootfs::Reader::current(),
        };
        assert!(matches!(
            prepare(&input),
            Err(PrepareError::BadExtraPath { .. })
        ));
    }
}

#[test]
fn unit_home_is_read_from_environment_lines() {
    let unit = "[Service]\nEnvironment=JAVA_HOME=/opt/java \"BITBUCKET_HOME=/var/bb home\"\nEnvironment='BITBUCKET_HOME=/srv/bb'\n";
    assert_eq!(super::unit_home(unit).as_deref(), Some("/srv/bb"));
    assert_eq!(super::unit_home("[Service]\nExecStart=/x\n"), None);
    assert!(super::check_unit_home(unit, std::path::Path::new("/srv/bb")).is_ok());
    let err =
        super::check_unit_home(unit, std::path::Path::new("/var/atlassian/bitbucket")).unwrap_err();
    assert!(err.contains("BITBUCKET_HOME=/srv/bb"), "{err}");
}

/// A 0600 file of the agent's (root's) that the Bitbucket user must never get to read.
fn secret(dir: &Path) -> PathBuf {
    let s = dir.join("secret");
    fs::write(&s, "TOPSECRET-root-only\n").unwrap();
    fs::set_permissions(&s, fs::Permissions::from_mode(0o600)).unwrap();
    s
}

/// The Bitbucket user as a uid/gid other than the test's own.
fn other_user() -> crate::rootfs::Reader {
    let me = crate::rootfs::Reader::current();
    crate::rootfs::Reader {
        uid: me.uid + 4242,
        gid: me.gid + 4242,
    }
}

fn attack_input(cur: &Path, new: &Path) -> PrepareInput {
    PrepareInput {
        current_install: cur.to_path_buf(),
        new_install: new.to_path_buf(),
        home: PathBuf::from("/h"),
        extra_files: vec![],
        bitbucket_user: other_user(),
    }
}

#[test]
fn a_symlinked_customization_is_refused_and_its_target_never_copied() {
    let Some(fx) = fixtures() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let release = fx.join("release-7.21.17");
    let s = secret(tmp.path());
    let cur = install(tmp.path(), "8.19.3", &release);
    let new = install(tmp.path(), "8.19.6", &release);
    fs::remove_file(cur.join("bin/set-jre-home.sh")).unwrap();
    std::os::unix::fs::symlink(&s, cur.join("bin/set-jre-home.sh")).unwrap();
    let before = fs::read(new.join("bin/set-jre-home.sh")).unwrap();
    let err = prepare(&attack_input(&cur, &new)).unwrap_err().to_string();
    assert!(err.contains("symbolic link"), "{err}");
    assert!(err.contains("set-jre-home.sh"), "{err}");
    assert!(!err.contains("TOPSECRET"), "{err}");
    assert_eq!(fs::read(new.join("bin/set-jre-home.sh")).unwrap(), before);
}

#[test]
fn a_hard_linked_or_unreadable_file_is_not_read_for_the_user() {
    let Some(fx) = fixtures() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let release = fx.join("release-7.21.17");
    let s = secret(tmp.path());
    let cur = install(tmp.path(), "8.19.3", &release);
    let new = install(tmp.path(), "8.19.6", &release);
    fs::remove_file(cur.join("bin/set-jre-home.sh")).unwrap();
    fs::hard_link(&s, cur.join("bin/set-jre-home.sh")).unwrap();
    let err = prepare(&attack_input(&cur, &new)).unwrap_err().to_string();
    assert!(err.contains("refusing to read it"), "{err}");
    assert!(!err.contains("TOPSECRET"), "{err}");
    assert!(!read(&new, "bin/set-jre-home.sh").contains("TOPSECRET"));
}

#[test]
fn a_symlinked_directory_in_the_running_install_is_refused() {
    let Some(fx) = fixtures() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let release = fx.join("release-7.21.17");
    let cur = install(tmp.path(), "8.19.3", &release);
    let new = install(tmp.path(), "8.19.6", &release);
    let elsewhere = tmp.path().join("elsewhere");
    fs::rename(cur.join("bin"), &elsewhere).unwrap();
    fs::write(elsewhere.join("set-jre-home.sh"), "JRE_HOME=/x\n").unwrap();
    std::os::unix::fs::symlink(&elsewhere, cur.join("bin")).unwrap();
    let err = prepare(&attack_input(&cur, &new)).unwrap_err().to_string();
    assert!(err.contains("symbolic link"), "{err}");
    assert!(!read(&new, "bin/set-jre-home.sh").contains("JRE_HOME=/x"));
}

#[test]
fn a_link_planted_at_the_temp_name_in_the_new_install_is_not_followed() {
    let Some(fx) = fixtures() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let release = fx.join("release-7.21.17");
    let s = secret(tmp.path());
    let cur = install(tmp.path(), "8.19.3", &release);
    let new = install(tmp.path(), "8.19.6", &release);
    std::os::unix::fs::symlink(&s, new.join("bin/.set-bitbucket-home.sh.bbupgrade-tmp")).unwrap();
    prepare(&attack_input(&cur, &new)).unwrap();
    assert_eq!(fs::read_to_string(&s).unwrap(), "TOPSECRET-root-only\n");
    assert_eq!(fs::metadata(&s).unwrap().mode() & 0o7777, 0o600);
    assert!(read(&new, "bin/set-bitbucket-home.sh").contains("BITBUCKET_HOME=/h"));
}

#[test]
fn a_new_install_others_can_write_is_refused() {
    let Some(fx) = fixtures() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let release = fx.join("release-7.21.17");
    let cur = install(tmp.path(), "8.19.3", &release);
    let new = install(tmp.path(), "8.19.6", &release);
    fs::set_permissions(&new, fs::Permissions::from_mode(0o777)).unwrap();
    let err = prepare(&attack_input(&cur, &new)).unwrap_err();
    assert!(matches!(err, PrepareError::NotOurs { .. }), "{err}");
    assert!(err.to_string().contains("stage the version again"), "{err}");
}
