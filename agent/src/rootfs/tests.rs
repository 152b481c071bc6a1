use super::*;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};

fn victim(dir: &Path) -> PathBuf {
    let v = dir.join("victim");
    std::fs::write(&v, "root secret\n").unwrap();
    std::fs::set_permissions(&v, std::fs::Permissions::from_mode(0o600)).unwrap();
    v
}

fn assert_victim_untouched(v: &Path) {
    assert_eq!(std::fs::read_to_string(v).unwrap(), "root secret\n");
    let m = std::fs::metadata(v).unwrap();
    assert_eq!(m.mode() & 0o7777, 0o600);
    assert_eq!(m.uid(), rustix::process::geteuid().as_raw());
}

#[test]
fn write_atomic_writes_with_masked_mode_and_leaves_no_temp() {
    let t = tempfile::tempdir().unwrap();
    let d = Dir::open_trusted(t.path()).unwrap();
    d.write_atomic(OsStr::new("f.sh"), b"one", 0o4777).unwrap();
    d.write_atomic(OsStr::new("f.sh"), b"two", 0o775).unwrap();
    let m = std::fs::metadata(t.path().join("f.sh")).unwrap();
    assert_eq!(m.mode() & 0o7777, 0o755);
    assert_eq!(std::fs::read(t.path().join("f.sh")).unwrap(), b"two");
    assert_eq!(d.entries().unwrap(), vec![OsString::from("f.sh")]);
}

#[test]
fn a_link_planted_at_the_old_temp_name_is_never_followed() {
    // The attack of issue 14: `.name.bbupgrade-tmp -> victim`, planted before the write.
    let t = tempfile::tempdir().unwrap();
    let v = victim(t.path());
    let bin = t.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    symlink(&v, bin.join(".set-bitbucket-home.sh.bbupgrade-tmp")).unwrap();
    let d = Dir::open_trusted(t.path()).unwrap();
    d.write_atomic_at(Path::new("bin/set-bitbucket-home.sh"), b"user text", 0o755)
        .unwrap();
    assert_victim_untouched(&v);
    assert_eq!(
        std::fs::read(bin.join("set-bitbucket-home.sh")).unwrap(),
        b"user text"
    );
}

#[test]
fn a_link_or_hard_link_at_a_random_temp_name_is_never_opened() {
    // Whatever is planted where the temp goes, O_EXCL refuses it; a fresh name is tried.
    let t = tempfile::tempdir().unwrap();
    let v = victim(t.path());
    let d = Dir::open_trusted(t.path()).unwrap();
    for i in 0..TEMP_ATTEMPTS {
        let name = temp_name(OsStr::new("f"));
        if i % 2 == 0 {
            symlink(&v, t.path().join(&name)).unwrap();
        } else {
            std::fs::hard_link(&v, t.path().join(&name)).unwrap();
        }
        let err = d.create_new(&name).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists, "{name:?}");
    }
    d.write_atomic(OsStr::new("f"), b"x", 0o644).unwrap();
    assert_victim_untouched(&v);
}

#[test]
fn a_link_at_the_target_is_refused_not_followed() {
    let t = tempfile::tempdir().unwrap();
    let v = victim(t.path());
    symlink(&v, t.path().join("unit.service")).unwrap();
    let d = Dir::open_trusted(t.path()).unwrap();
    let err = d
        .write_atomic(OsStr::new("unit.service"), b"[Service]\nUser=root\n", 0o644)
        .unwrap_err();
    assert!(err.to_string().contains("symbolic link"), "{err}");
    assert_victim_untouched(&v);
    assert!(
        std::fs::symlink_metadata(t.path().join("unit.service"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
}

#[test]
fn a_hard_link_at_the_target_is_replaced_not_written_through() {
    // A hard link to a root file where the target goes: rename replaces the name, the other
    // file (same inode) keeps its bytes and mode.
    let t = tempfile::tempdir().unwrap();
    let v = victim(t.path());
    std::fs::hard_link(&v, t.path().join("set-jre-home.sh")).unwrap();
    let d = Dir::open_trusted(t.path()).unwrap();
    d.write_atomic(OsStr::new("set-jre-home.sh"), b"JRE_HOME=/x\n", 0o755)
        .unwrap();
    assert_victim_untouched(&v);
    assert_eq!(std::fs::metadata(&v).unwrap().nlink(), 1);
}

#[test]
fn a_symlinked_intermediate_directory_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let elsewhere = t.path().join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    let install = t.path().join("install");
    std::fs::create_dir(&install).unwrap();
    symlink(&elsewhere, install.join("bin")).unwrap();
    let d = Dir::open_trusted(&install).unwrap();
    let err = d
        .write_atomic_at(Path::new("bin/set-bitbucket-home.sh"), b"x", 0o755)
        .unwrap_err();
    assert!(err.to_string().contains("symbolic link"), "{err}");
    assert!(std::fs::read_dir(&elsewhere).unwrap().next().is_none());
    assert!(d.read(Path::new("bin/anything")).is_err());
    assert!(d.lstat(Path::new("bin/anything")).is_err());
    assert!(d.create_dir_all(Path::new("bin/sub"), 0o755).is_err());
    assert!(d.open_dir(Path::new("..")).is_err());
    assert!(d.read(Path::new("/etc/passwd")).is_err());
}

#[test]
fn reading_refuses_links_fifos_and_missing_files_are_none() {
    let t = tempfile::tempdir().unwrap();
    let v = victim(t.path());
    symlink(&v, t.path().join("link")).unwrap();
    nix::unistd::mkfifo(&t.path().join("fifo"), nix::sys::stat::Mode::S_IRWXU).unwrap();
    let d = Dir::open_trusted(t.path()).unwrap();
    let err = d.read(Path::new("link")).unwrap_err();
    assert!(err.to_string().contains("symbolic link"), "{err}");
    assert!(!err.to_string().contains("root secret"));
    let err = d.read(Path::new("fifo")).unwrap_err();
    assert!(err.to_string().contains("not a regular file"), "{err}");
    assert_eq!(d.read(Path::new("missing")).unwrap(), None);
    assert_eq!(d.read(Path::new("nodir/missing")).unwrap(), None);
    assert_eq!(
        d.read(Path::new("victim")).unwrap().unwrap(),
        b"root secret\n"
    );
}

#[test]
fn read_as_refuses_what_the_user_could_not_read() {
    let t = tempfile::tempdir().unwrap();
    let v = victim(t.path());
    let me = Reader::current();
    let other = Reader {
        uid: me.uid + 4242,
        gid: me.gid + 4242,
    };
    let d = Dir::open_trusted(t.path()).unwrap();
    // A hard link to a 0600 file of another owner reads as that file: refused for `other`.
    std::fs::hard_link(&v, t.path().join("set-jre-home.sh")).unwrap();
    let err = d.read_as(Path::new("set-jre-home.sh"), &other).unwrap_err();
    assert!(err.to_string().contains("not readable"), "{err}");
    assert!(!err.to_string().contains("root secret"));
    // Readable by others: fine.
    std::fs::set_permissions(&v, std::fs::Permissions::from_mode(0o644)).unwrap();
    assert!(d.read_as(Path::new("set-jre-home.sh"), &other).is_ok());
    // Its owner may read its own 0600 file.
    std::fs::set_permissions(&v, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert!(d.read_as(Path::new("set-jre-home.sh"), &me).is_ok());
}

#[test]
fn replace_symlink_switches_atomically_and_refuses_a_directory() {
    let t = tempfile::tempdir().unwrap();
    let d = Dir::open_trusted(t.path()).unwrap();
    d.replace_symlink(OsStr::new("current"), Path::new("/opt/a"))
        .unwrap();
    d.replace_symlink(OsStr::new("current"), Path::new("/opt/b"))
        .unwrap();
    assert_eq!(
        d.read_link(OsStr::new("current")).unwrap(),
        Some(PathBuf::from("/opt/b"))
    );
    assert_eq!(d.entries().unwrap().len(), 1);
    std::fs::create_dir(t.path().join("real")).unwrap();
    std::fs::write(t.path().join("real/f"), "x").unwrap();
    assert!(
        d.replace_symlink(OsStr::new("real"), Path::new("/opt/b"))
            .is_err()
    );
    assert!(t.path().join("real/f").is_file());
}

#[test]
fn remove_tree_unlinks_links_without_following_them() {
    let t = tempfile::tempdir().unwrap();
    let v = victim(t.path());
    let outside = t.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(outside.join("keep"), "k").unwrap();
    let tree = t.path().join("tree");
    std::fs::create_dir_all(tree.join("a/b")).unwrap();
    std::fs::write(tree.join("a/b/f"), "f").unwrap();
    symlink(&outside, tree.join("a/dirlink")).unwrap();
    symlink(&v, tree.join("a/filelink")).unwrap();
    std::fs::set_permissions(tree.join("a"), std::fs::Permissions::from_mode(0o500)).unwrap();
    let d = Dir::open_trusted(t.path()).unwrap();
    d.remove_tree(OsStr::new("tree")).unwrap();
    assert!(!tree.exists());
    assert!(outside.join("keep").is_file());
    assert_victim_untouched(&v);
    d.remove_tree(OsStr::new("tree")).unwrap();
}

#[test]
fn rename_no_replace_refuses_an_existing_target() {
    let t = tempfile::tempdir().unwrap();
    let d = Dir::open_trusted(t.path()).unwrap();
    d.mkdir(OsStr::new("a"), 0o700).unwrap();
    d.mkdir(OsStr::new("b"), 0o700).unwrap();
    let err = d
        .rename_no_replace(OsStr::new("a"), &d, OsStr::new("b"))
        .unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
    d.rename_no_replace(OsStr::new("a"), &d, OsStr::new("c"))
        .unwrap();
    assert!(t.path().join("c").is_dir());
}

#[test]
fn handles_keep_pointing_at_the_directory_they_opened() {
    // A directory renamed away and replaced by a link after it was opened: writes still land in
    // the directory that was opened, never through the link.
    let t = tempfile::tempdir().unwrap();
    let v_dir = t.path().join("victim-dir");
    std::fs::create_dir(&v_dir).unwrap();
    let staging = t.path().join("staging");
    std::fs::create_dir(&staging).unwrap();
    let d = Dir::open_trusted(&staging).unwrap();
    std::fs::rename(&staging, t.path().join("moved")).unwrap();
    symlink(&v_dir, &staging).unwrap();
    d.write_atomic(OsStr::new("f"), b"x", 0o644).unwrap();
    assert!(std::fs::read_dir(&v_dir).unwrap().next().is_none());
    assert!(t.path().join("moved/f").is_file());
}

#[test]
fn may_read_and_may_write_follow_the_mode_bits() {
    let t = tempfile::tempdir().unwrap();
    let f = t.path().join("f");
    std::fs::write(&f, "x").unwrap();
    let d = Dir::open_trusted(t.path()).unwrap();
    let me = Reader::current();
    let other = Reader {
        uid: me.uid + 1,
        gid: me.gid + 1,
    };
    for (mode, other_reads, other_writes) in [
        (0o600, false, false),
        (0o644, true, false),
        (0o646, true, true),
        (0o664, true, false),
    ] {
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(mode)).unwrap();
        let st = d.lstat(Path::new("f")).unwrap().unwrap();
        assert_eq!(other.may_read(&st), other_reads, "{mode:o}");
        assert_eq!(other.may_write(&st), other_writes, "{mode:o}");
        assert!(me.may_write(&st));
    }
    let group = Reader {
        uid: me.uid + 1,
        gid: me.gid,
    };
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o664)).unwrap();
    let st = d.lstat(Path::new("f")).unwrap().unwrap();
    assert!(group.may_write(&st));
}
