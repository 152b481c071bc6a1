//! Tests of the whole stage against real files: archives built in memory, extracted into temp dirs.

use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use flate2::Compression;
use flate2::write::GzEncoder;
use sha2::{Digest, Sha256};

use super::*;

const V: &str = "8.19.6";
const TOP: &str = "atlassian-bitbucket-8.19.6";
const MTIME: u64 = 1_700_000_000;

/// Builds tar archives entry by entry, writing header fields raw so unsafe entries can be made.
struct Tar {
    b: tar::Builder<Vec<u8>>,
}

impl Tar {
    fn new() -> Self {
        Self {
            b: tar::Builder::new(Vec::new()),
        }
    }

    fn raw(
        mut self,
        path: &str,
        kind: tar::EntryType,
        mode: u32,
        data: &[u8],
        link: Option<&str>,
    ) -> Self {
        let mut h = tar::Header::new_gnu();
        let name = &mut h.as_old_mut().name;
        name[..path.len()].copy_from_slice(path.as_bytes());
        if let Some(l) = link {
            let field = &mut h.as_old_mut().linkname;
            field[..l.len()].copy_from_slice(l.as_bytes());
        }
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(data.len() as u64);
        h.set_mtime(MTIME);
        h.set_cksum();
        self.b.append(&h, data).expect("append");
        self
    }

    fn dir(self, path: &str, mode: u32) -> Self {
        self.raw(path, tar::EntryType::Directory, mode, &[], None)
    }

    fn file(self, path: &str, mode: u32, data: &[u8]) -> Self {
        self.raw(path, tar::EntryType::Regular, mode, data, None)
    }

    fn symlink(self, path: &str, target: &str) -> Self {
        self.raw(path, tar::EntryType::Symlink, 0o777, &[], Some(target))
    }

    fn hardlink(self, path: &str, target: &str) -> Self {
        self.raw(path, tar::EntryType::Link, 0o644, &[], Some(target))
    }

    fn tar(self) -> Vec<u8> {
        self.b.into_inner().expect("finish tar")
    }

    fn gz(self) -> Vec<u8> {
        gz(&self.tar())
    }
}

fn gz(bytes: &[u8]) -> Vec<u8> {
    let mut e = GzEncoder::new(Vec::new(), Compression::fast());
    e.write_all(bytes).expect("gzip");
    e.finish().expect("gzip")
}

fn sha(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// An install root holding a running install (`8.19.3`) that no stage may touch.
struct Site {
    _tmp: tempfile::TempDir,
    root: PathBuf,
}

impl Site {
    fn new() -> Self {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path().join("installs");
        fs::create_dir_all(root.join("8.19.3/bin")).expect("mkdir");
        fs::write(root.join("8.19.3/bin/start-bitbucket.sh"), "running\n").expect("write");
        Self { _tmp: tmp, root }
    }

    fn req(&self, sha256: &str) -> StageRequest {
        StageRequest {
            version: V.into(),
            sha256: sha256.into(),
            install_root: self.root.clone(),
            limits: StageLimits::default(),
        }
    }

    fn listing(&self) -> Vec<String> {
        let mut out = Vec::new();
        walk(&self.root, &self.root, &mut out);
        out.sort();
        out
    }

    fn assert_untouched(&self) {
        assert_eq!(
            self.listing(),
            vec!["8.19.3", "8.19.3/bin", "8.19.3/bin/start-bitbucket.sh"],
            "only the running install may remain"
        );
        let running = fs::read_to_string(self.root.join("8.19.3/bin/start-bitbucket.sh"));
        assert_eq!(running.ok().as_deref(), Some("running\n"));
    }
}

fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
    for e in fs::read_dir(dir).expect("read_dir").flatten() {
        let p = e.path();
        out.push(
            p.strip_prefix(base)
                .expect("prefix")
                .to_string_lossy()
                .into_owned(),
        );
        if e.file_type().expect("type").is_dir() {
            walk(base, &p, out);
        }
    }
}

fn stage_bytes(archive: &[u8], req: &StageRequest) -> Result<StageOutcome, StageError> {
    stage_from_reader(archive, req, None, &mut |_| {})
}

/// Stages `archive` (with its true hash) and expects a refusal naming `words`, with nothing left.
fn refused(archive: Vec<u8>, limits: StageLimits, words: &[&str]) -> StageError {
    let site = Site::new();
    let mut req = site.req(&sha(&archive));
    req.limits = limits;
    let err = match stage_bytes(&archive, &req) {
        Err(e) => e,
        Ok(o) => panic!("staged an archive that must be refused: {o:?}"),
    };
    let msg = err.to_string();
    for w in words {
        assert!(msg.contains(w), "'{msg}' should mention '{w}'");
    }
    assert!(err.is_bad_input(), "{msg}");
    site.assert_untouched();
    err
}

fn ok_prefix() -> Tar {
    Tar::new().dir(&format!("{TOP}/"), 0o755).file(
        &format!("{TOP}/bin/ok.sh"),
        0o755,
        b"#!/bin/sh\n",
    )
}

#[test]
fn happy_path_stages_strips_the_top_folder_and_repeats_as_already_staged() {
    let big = vec![7u8; 3 * CHUNK_BYTES + 12345];
    let archive = Tar::new()
        .dir(&format!("{TOP}/"), 0o750)
        .dir(&format!("{TOP}/bin/"), 0o755)
        .file(
            &format!("{TOP}/bin/start-bitbucket.sh"),
            0o755,
            b"#!/bin/sh\necho start\n",
        )
        .file(&format!("{TOP}/conf/server.xml"), 0o640, b"<Server/>\n")
        .file(&format!("{TOP}/app/WEB-INF/lib/big.jar"), 0o444, &big)
        .symlink(&format!("{TOP}/lib"), "app/WEB-INF/lib")
        .symlink(
            &format!("{TOP}/app/WEB-INF/lib/alias.jar"),
            "../lib/big.jar",
        )
        .hardlink(
            &format!("{TOP}/app/copy.jar"),
            &format!("{TOP}/app/WEB-INF/lib/big.jar"),
        )
        .gz();
    let site = Site::new();
    let req = site.req(&sha(&archive).to_uppercase());
    let mut calls = Vec::new();
    let cache_dir = tempfile::tempdir().expect("tempdir");
    let cache = ArchiveCache::new(cache_dir.path().to_path_buf(), u64::MAX).expect("cache");
    let out =
        stage_from_reader(&archive[..], &req, Some(&cache), &mut |p| calls.push(p)).expect("stage");

    let install = site.root.join(V);
    assert_eq!(out.install_path, install);
    assert_eq!((out.files, out.bytes), (6, big.len() as u64 + 31));
    assert!(!out.already_staged && !out.from_cache);
    let last = calls.last().copied().expect("progress");
    assert_eq!((last.bytes_in, last.files), (archive.len() as u64, 6));

    let mode = |p: &str| {
        fs::symlink_metadata(install.join(p))
            .map(|m| m.permissions().mode() & 0o7777)
            .ok()
    };
    assert_eq!(mode(""), Some(0o750));
    assert_eq!(mode("bin/start-bitbucket.sh"), Some(0o755));
    assert_eq!(mode("conf/server.xml"), Some(0o640));
    assert_eq!(mode("conf"), Some(0o755), "unlisted directories get 0755");
    assert_eq!(mode("app/WEB-INF/lib/big.jar"), Some(0o444));
    let meta = fs::metadata(install.join("bin/start-bitbucket.sh")).expect("meta");
    assert_eq!(meta.mtime() as u64, MTIME);
    assert_eq!(fs::metadata(&install).expect("meta").mtime() as u64, MTIME);
    assert_eq!(
        fs::read(install.join("lib/big.jar")).ok(),
        Some(big.clone())
    );
    assert_eq!(
        fs::read_link(install.join("lib")).ok(),
        Some(PathBuf::from("app/WEB-INF/lib"))
    );
    assert_eq!(
        fs::read(install.join("app/WEB-INF/lib/alias.jar"))
            .map(|b| b.len())
            .ok(),
        Some(big.len())
    );
    let copy = fs::metadata(install.join("app/copy.jar")).expect("hardlink");
    assert_eq!(copy.nlink(), 2);

    let m = Manifest::load(&install).expect("load").expect("manifest");
    assert_eq!(m.version, V);
    assert_eq!(m.archive_sha256, sha(&archive));
    let keys: Vec<_> = m.files.keys().cloned().collect();
    assert_eq!(keys, vec!["bin/start-bitbucket.sh", "conf/server.xml"]);
    assert_eq!(m.files["conf/server.xml"], sha(b"<Server/>\n"));
    let raw: serde_json::Value =
        serde_json::from_slice(&fs::read(install.join(Manifest::FILE_NAME)).expect("read"))
            .expect("json");
    assert!(raw["sha256"].is_string() && raw["files"].is_object() && raw["version"] == V);

    let mut listing = site.listing();
    listing.retain(|p| p.starts_with('.'));
    assert!(listing.is_empty(), "no staging dir left: {listing:?}");
    assert!(
        cache.get(&sha(&archive)).is_some(),
        "verified archive cached"
    );

    // A repeat reads nothing.
    struct Explodes;
    impl Read for Explodes {
        fn read(&mut self, _: &mut [u8]) -> std::io::Result<usize> {
            panic!("an already staged archive must not be read")
        }
    }
    let again = stage_from_reader(Explodes, &req, None, &mut |_| {}).expect("repeat");
    assert!(again.already_staged);
    assert_eq!((again.files, again.bytes), (out.files, out.bytes));
    // A different archive for the same version is refused, leaving the stage alone.
    let other = ok_prefix().gz();
    let err = stage_bytes(&other, &site.req(&sha(&other))).expect_err("different");
    assert!(
        matches!(err, StageError::AlreadyExistsDifferent { .. }),
        "{err}"
    );
    assert!(!err.is_bad_input());
}

#[test]
fn refuses_absolute_path() {
    let e = refused(
        ok_prefix().file("/etc/cron.d/x", 0o644, b"x").gz(),
        StageLimits::default(),
        &["/etc/cron.d/x", "absolute"],
    );
    assert!(matches!(e, StageError::AbsolutePath { .. }));
}

#[test]
fn refuses_parent_component() {
    let p = format!("{TOP}/../../etc/x");
    let e = refused(
        ok_prefix().file(&p, 0o644, b"x").gz(),
        StageLimits::default(),
        &[&p, "'..'"],
    );
    assert!(matches!(e, StageError::ParentComponent { .. }));
}

#[test]
fn refuses_symlink_escaping() {
    let p = format!("{TOP}/lib/evil");
    let e = refused(
        ok_prefix().symlink(&p, "../../../etc").gz(),
        StageLimits::default(),
        &[&p, "outside the install"],
    );
    assert!(matches!(e, StageError::LinkEscapes { .. }));
}

#[test]
fn refuses_absolute_symlink() {
    let p = format!("{TOP}/lib/evil");
    let e = refused(
        ok_prefix().symlink(&p, "/etc/passwd").gz(),
        StageLimits::default(),
        &[&p, "/etc/passwd", "absolute"],
    );
    assert!(matches!(e, StageError::LinkEscapes { .. }));
}

#[test]
fn refuses_writing_through_a_symlink() {
    let tar =
        ok_prefix()
            .symlink(&format!("{TOP}/up"), ".")
            .file(&format!("{TOP}/up/x"), 0o644, b"x");
    let e = refused(tar.gz(), StageLimits::default(), &["up/x", "symlink 'up'"]);
    assert!(matches!(e, StageError::PathConflict { .. }));
}

#[test]
fn refuses_hardlink_outside() {
    let p = format!("{TOP}/bin/shadow");
    let e = refused(
        ok_prefix().hardlink(&p, "/etc/shadow").gz(),
        StageLimits::default(),
        &[&p, "/etc/shadow", "hard link"],
    );
    assert!(matches!(e, StageError::LinkEscapes { .. }));
}

#[test]
fn refuses_hardlink_to_an_entry_not_yet_extracted() {
    let p = format!("{TOP}/bin/early");
    let tar = ok_prefix().hardlink(&p, &format!("{TOP}/bin/later")).file(
        &format!("{TOP}/bin/later"),
        0o644,
        b"x",
    );
    let e = refused(
        tar.gz(),
        StageLimits::default(),
        &[&p, "bin/later", "no regular file"],
    );
    assert!(matches!(e, StageError::LinkTargetMissing { .. }));
}

#[test]
fn refuses_device_fifo_and_unknown_entries() {
    for (kind, name) in [
        (tar::EntryType::Char, "character device"),
        (tar::EntryType::Block, "block device"),
        (tar::EntryType::Fifo, "FIFO"),
        // Tar has no socket type: anything unknown (where a socket would hide) is refused too.
        (tar::EntryType::new(b'Z'), "unknown type"),
    ] {
        let p = format!("{TOP}/dev/thing");
        let e = refused(
            ok_prefix().raw(&p, kind, 0o600, &[], None).gz(),
            StageLimits::default(),
            &[&p, name],
        );
        assert!(matches!(e, StageError::SpecialFile { .. }));
    }
}

#[test]
fn refuses_setuid_setgid_and_sticky_bits() {
    for mode in [0o4755, 0o2755, 0o1777] {
        let p = format!("{TOP}/bin/su");
        let e = refused(
            ok_prefix().file(&p, mode, b"x").gz(),
            StageLimits::default(),
            &[&p, "setuid"],
        );
        assert!(matches!(e, StageError::SetuidBit { .. }));
    }
}

#[test]
fn refuses_too_many_entries() {
    let mut tar = ok_prefix();
    for i in 0..10 {
        tar = tar.file(&format!("{TOP}/f{i}"), 0o644, b"");
    }
    let limits = StageLimits {
        max_entries: 5,
        ..StageLimits::default()
    };
    let e = refused(tar.gz(), limits, &["more than 5 entries"]);
    assert!(matches!(e, StageError::TooManyEntries { limit: 5 }));
}

#[test]
fn refuses_a_decompression_bomb() {
    let limits = StageLimits {
        max_total_bytes: 1 << 20,
        ..StageLimits::default()
    };
    // One entry whose zeros compress to a few KiB.
    let p = format!("{TOP}/app/zeros.jar");
    let bomb = ok_prefix().file(&p, 0o644, &vec![0u8; 8 << 20]).gz();
    assert!(bomb.len() < (8 << 20) / 100);
    let e = refused(bomb, limits, &[&p, "decompression bomb", "1048576"]);
    assert!(matches!(e, StageError::TooLarge { .. }));
    // Headers that stay small while the stream goes on inflating (zeros after the end of the tar).
    let mut tar = ok_prefix().tar();
    tar.extend(std::iter::repeat_n(0u8, 8 << 20));
    let e = refused(gz(&tar), limits, &["decompression bomb"]);
    assert!(matches!(e, StageError::TooLarge { .. }));
}

#[test]
fn refuses_wrong_top_folder() {
    let tar = Tar::new().file("atlassian-bitbucket-8.19.5/bin/x.sh", 0o755, b"x");
    let e = refused(
        tar.gz(),
        StageLimits::default(),
        &[
            "atlassian-bitbucket-8.19.5/bin/x.sh",
            "atlassian-bitbucket-8.19.6/",
        ],
    );
    match e {
        StageError::WrongTopFolder { expected, found } => {
            assert_eq!(expected, format!("{TOP}/"));
            assert_eq!(found, "atlassian-bitbucket-8.19.5/bin/x.sh");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn refuses_checksum_mismatch_after_extracting() {
    let archive = ok_prefix().gz();
    let site = Site::new();
    let wrong = "ab".repeat(32);
    let err = stage_bytes(&archive, &site.req(&wrong)).expect_err("mismatch");
    match &err {
        StageError::ChecksumMismatch { expected, actual } => {
            assert_eq!(expected, &wrong);
            assert_eq!(actual, &sha(&archive));
        }
        other => panic!("{other:?}"),
    }
    assert!(err.is_bad_input());
    site.assert_untouched();
}

#[test]
fn refuses_truncated_gzip() {
    let full = ok_prefix()
        .file(&format!("{TOP}/app/a.jar"), 0o644, &[1u8; 100_000])
        .gz();
    for cut in [full.len() / 2, full.len() - 4, 5] {
        let e = refused(
            full[..cut].to_vec(),
            StageLimits::default(),
            &["corrupt or truncated"],
        );
        assert!(matches!(e, StageError::Corrupt(_)), "{cut}: {e}");
    }
}

#[test]
fn refuses_corrupt_gzip() {
    let mut bad = ok_prefix()
        .file(&format!("{TOP}/app/a.jar"), 0o644, &[1u8; 100_000])
        .gz();
    let mid = bad.len() / 2;
    for b in &mut bad[mid..mid + 16] {
        *b ^= 0x5a;
    }
    let e = refused(bad, StageLimits::default(), &["corrupt"]);
    assert!(matches!(e, StageError::Corrupt(_)));
    let e = refused(
        b"this is not gzip at all".to_vec(),
        StageLimits::default(),
        &["corrupt"],
    );
    assert!(matches!(e, StageError::Corrupt(_)));
}

#[test]
fn refuses_invalid_requests() {
    let site = Site::new();
    let archive = ok_prefix().gz();
    let mut req = site.req("nothex");
    assert!(matches!(
        stage_bytes(&archive, &req),
        Err(StageError::InvalidRequest(_))
    ));
    req.sha256 = sha(&archive);
    for v in ["", "..", "../8.19.6", "8.19.6/x"] {
        req.version = v.into();
        assert!(
            matches!(
                stage_bytes(&archive, &req),
                Err(StageError::InvalidRequest(_))
            ),
            "{v}"
        );
    }
    site.assert_untouched();
}

#[test]
fn clean_leftovers_removes_only_staging_dirs() {
    let site = Site::new();
    let left = site.root.join(".staging-8.19.6-0123");
    fs::create_dir_all(left.join("bin/ro")).expect("mkdir");
    fs::set_permissions(left.join("bin"), fs::Permissions::from_mode(0o500)).expect("chmod");
    let removed = clean_leftovers(&site.root).expect("clean");
    assert_eq!(removed, vec![left]);
    site.assert_untouched();
    assert_eq!(
        clean_leftovers(&site.root.join("missing")).ok(),
        Some(vec![])
    );
}

#[test]
fn chunk_reader_error_mid_stream_is_a_truncated_archive() {
    let archive = ok_prefix()
        .file(&format!("{TOP}/app/a.jar"), 0o644, &[3u8; 300_000])
        .gz();
    for send_error in [true, false] {
        let site = Site::new();
        let (tx, reader) = chunk_channel(2);
        let half = archive[..archive.len() / 2].to_vec();
        let sender = std::thread::spawn(move || {
            for c in half.chunks(1000) {
                tx.blocking_send(Ok(bytes::Bytes::copy_from_slice(c)))
                    .expect("send");
            }
            if send_error {
                tx.blocking_send(Err("connection reset by coordinator".into()))
                    .expect("send");
            }
        });
        let err = stage_from_reader(reader, &site.req(&sha(&archive)), None, &mut |_| {})
            .expect_err("truncated");
        sender.join().expect("sender");
        let msg = err.to_string();
        assert!(matches!(err, StageError::Corrupt(_)), "{msg}");
        assert!(
            msg.contains("truncated") || msg.contains("unexpected end"),
            "{msg}"
        );
        if send_error {
            assert!(msg.contains("connection reset by coordinator"), "{msg}");
        }
        site.assert_untouched();
    }
}

#[test]
fn chunk_reader_streams_a_whole_archive() {
    let archive = ok_prefix().gz();
    let site = Site::new();
    let (tx, reader) = chunk_channel(1);
    let bytes = bytes::Bytes::from(archive.clone());
    let sender = std::thread::spawn(move || {
        for i in (0..bytes.len()).step_by(100) {
            tx.blocking_send(Ok(bytes.slice(i..(i + 100).min(bytes.len()))))
                .expect("send");
        }
    });
    let out =
        stage_from_reader(reader, &site.req(&sha(&archive)), None, &mut |_| {}).expect("stage");
    sender.join().expect("sender");
    assert_eq!(out.files, 1);
}

/// Serves `body` once per connection with a Content-Length (or `status` instead of 200).
async fn serve(body: Vec<u8>, status: &'static str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let body = body.clone();
            tokio::spawn(async move {
                let mut req = Vec::new();
                let mut buf = [0u8; 1024];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match sock.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                let head = format!(
                    "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = sock.write_all(head.as_bytes()).await;
                let _ = sock.write_all(&body).await;
                let _ = sock.shutdown().await;
            });
        }
    });
    format!("http://{addr}/atlassian-bitbucket-{V}.tar.gz")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stage_from_url_downloads_verifies_and_caches() {
    let archive = Tar::new()
        .dir(&format!("{TOP}/"), 0o755)
        .file(&format!("{TOP}/app/a.jar"), 0o644, &[9u8; 2_000_000])
        .gz();
    let url = serve(archive.clone(), "200 OK").await;
    let site = Site::new();
    let cache_dir = tempfile::tempdir().expect("tempdir");
    let cache = Arc::new(ArchiveCache::new(cache_dir.path().into(), u64::MAX).expect("cache"));
    let totals = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = totals.clone();
    let progress = move |p: StageProgress| seen.lock().expect("lock").push(p.total_bytes);
    let out = stage_from_url(
        &url,
        site.req(&sha(&archive)),
        Some(cache.clone()),
        progress,
    )
    .await
    .expect("download");
    assert!(!out.from_cache && !out.already_staged);
    assert_eq!(out.files, 1);
    assert!(
        totals
            .lock()
            .expect("lock")
            .iter()
            .all(|t| *t == Some(archive.len() as u64))
    );
    assert!(cache.get(&sha(&archive)).is_some());

    // The second stage of the same hash is served from the cache: the URL is never asked.
    let site2 = Site::new();
    let out = stage_from_url(
        "http://127.0.0.1:9/gone",
        site2.req(&sha(&archive)),
        Some(cache.clone()),
        |_| {},
    )
    .await
    .expect("from cache");
    assert!(out.from_cache);
    assert!(site2.root.join(V).join("app/a.jar").is_file());

    // And a repeat at the first site is already staged.
    let out = stage_from_url(&url, site.req(&sha(&archive)), Some(cache), |_| {})
        .await
        .expect("repeat");
    assert!(out.already_staged);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stage_from_url_reports_http_errors_and_bad_archives() {
    let url = serve(b"nope".to_vec(), "404 Not Found").await;
    let site = Site::new();
    let err = stage_from_url(&url, site.req(&"00".repeat(32)), None, |_| {})
        .await
        .expect_err("404");
    assert!(
        matches!(err, StageError::Download(ref m) if m.contains("404")),
        "{err}"
    );
    assert!(!err.is_bad_input());
    let bad = ok_prefix().file("/etc/x", 0o644, b"x").gz();
    let url = serve(bad.clone(), "200 OK").await;
    let err = stage_from_url(&url, site.req(&sha(&bad)), None, |_| {})
        .await
        .expect_err("unsafe");
    assert!(matches!(err, StageError::AbsolutePath { .. }), "{err}");
    site.assert_untouched();
}

#[test]
fn cache_evicts_least_recently_used_beyond_its_bound() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let make = |v: &str, n: usize| {
        Tar::new()
            .file(
                &format!("atlassian-bitbucket-{v}/app/x.jar"),
                0o644,
                &vec![v.len() as u8; n],
            )
            .raw(
                &format!("atlassian-bitbucket-{v}/app/r"),
                tar::EntryType::Regular,
                0o644,
                v.as_bytes(),
                None,
            )
            .gz()
    };
    let a = make("8.19.5", 10);
    let b = make("8.19.6", 10);
    let cache =
        ArchiveCache::new(tmp.path().join("cache"), (a.len() + b.len() / 2) as u64).expect("cache");
    for (v, archive) in [("8.19.5", &a), ("8.19.6", &b)] {
        let site = Site::new();
        let mut req = site.req(&sha(archive));
        req.version = v.into();
        stage_from_reader(&archive[..], &req, Some(&cache), &mut |_| {}).expect("stage");
        assert!(cache.get(&sha(archive)).is_some(), "{v} cached");
    }
    assert!(
        cache.get(&sha(&a)).is_none(),
        "the older archive was evicted"
    );
    let names: Vec<_> = fs::read_dir(cache.dir())
        .expect("ls")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");
    // A failed stage leaves no temp file in the cache.
    let site = Site::new();
    let _ = stage_from_reader(
        &b"junk"[..],
        &site.req(&sha(b"junk")),
        Some(&cache),
        &mut |_| {},
    );
    let names: Vec<_> = fs::read_dir(cache.dir())
        .expect("ls")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");
}

#[test]
fn an_install_is_the_agents_with_modes_masked_and_0700_until_in_place() {
    let archive = Tar::new()
        .dir(&format!("{TOP}/"), 0o777)
        .dir(&format!("{TOP}/bin/"), 0o777)
        .file(
            &format!("{TOP}/bin/start-bitbucket.sh"),
            0o777,
            b"#!/bin/sh\n",
        )
        .file(&format!("{TOP}/conf/server.xml"), 0o666, b"<Server/>\n")
        .gz();
    let site = Site::new();
    let out = stage_bytes(&archive, &site.req(&sha(&archive))).expect("stage");
    let me = rustix::process::geteuid().as_raw();
    for (rel, want) in [
        ("", 0o755),
        ("bin", 0o755),
        ("bin/start-bitbucket.sh", 0o755),
        ("conf", 0o755),
        ("conf/server.xml", 0o644),
        (Manifest::FILE_NAME, 0o644),
    ] {
        let m = fs::symlink_metadata(out.install_path.join(rel)).expect("meta");
        assert_eq!(m.mode() & 0o7777, want, "{rel}");
        assert_eq!(m.uid(), me, "{rel}");
    }
}

#[test]
fn space_ok_keeps_the_reserve() {
    use super::extract::{reserve, space_ok};
    assert!(space_ok(100, 60, 40));
    assert!(!space_ok(100, 61, 40));
    assert!(!space_ok(100, 0, 101));
    assert!(!space_ok(u64::MAX, u64::MAX, 1));
    // The configured reserve, but at most 5 % of the filesystem.
    assert_eq!(reserve(100 * GIB, 512 << 20), 512 << 20);
    assert_eq!(reserve(40 << 20, 512 << 20), 2 << 20);
}

#[test]
fn refuses_to_fill_the_disk_by_the_header_size_and_leaves_nothing() {
    // A header claiming more than the disk holds: refused before its data is read or written
    // (the size limit lifted so only the disk check stands in the way).
    let site = Site::new();
    let big = format!("{TOP}/app/huge.jar");
    let mut h = tar::Header::new_gnu();
    h.set_path(&big).expect("path");
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mode(0o644);
    h.set_size(1 << 60);
    h.set_cksum();
    let mut tar = ok_prefix().tar();
    tar.truncate(tar.len() - 1024); // drop the end-of-archive blocks
    tar.extend_from_slice(h.as_bytes());
    tar.extend(std::iter::repeat_n(0u8, 4096));
    let archive = gz(&tar);
    let mut req = site.req(&sha(&archive));
    req.limits.max_total_bytes = u64::MAX;
    let err = stage_bytes(&archive, &req).unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(&err, StageError::DiskFull { entry, needed, .. } if entry == &big && *needed == 1 << 60),
        "{msg}"
    );
    assert!(
        msg.contains("not enough free disk") && msg.contains("nothing was left behind"),
        "{msg}"
    );
    assert!(!err.is_bad_input());
    site.assert_untouched();
}

/// Reads an archive and, before its last two chunks, swaps the staging directory for a link to a
/// victim directory (what a user who can write the install root could try).
struct SwapBeforeTheLastChunks<'a> {
    inner: &'a [u8],
    root: PathBuf,
    victim: PathBuf,
    swapped: bool,
}

impl Read for SwapBeforeTheLastChunks<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if !self.swapped && self.inner.len() < 2 * CHUNK_BYTES {
            // Give the extractor time to open the staging directory and start writing.
            std::thread::sleep(std::time::Duration::from_millis(100));
            let staging = fs::read_dir(&self.root)
                .expect("read_dir")
                .flatten()
                .find(|e| e.file_name().to_string_lossy().starts_with(STAGING_PREFIX))
                .expect("a staging dir")
                .path();
            fs::rename(&staging, self.root.join("moved-away")).expect("rename");
            std::os::unix::fs::symlink(&self.victim, &staging).expect("symlink");
            self.swapped = true;
        }
        self.inner.read(buf)
    }
}

#[test]
fn a_staging_dir_swapped_for_a_link_mid_extraction_writes_nothing_through_it() {
    let site = Site::new();
    let victim = site.root.parent().expect("parent").join("victim");
    fs::create_dir(&victim).expect("mkdir");
    let mut tar = ok_prefix();
    for i in 0..8 {
        // Incompressible data (xorshift) so the archive spans several chunks.
        let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ i;
        let data: Vec<u8> = (0..CHUNK_BYTES)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        tar = tar.file(&format!("{TOP}/lib/f{i}.jar"), 0o644, &data);
    }
    let archive = tar.gz();
    assert!(archive.len() > 3 * CHUNK_BYTES, "{}", archive.len());
    let req = site.req(&sha(&archive));
    let reader = SwapBeforeTheLastChunks {
        inner: &archive,
        root: site.root.clone(),
        victim: victim.clone(),
        swapped: false,
    };
    let err = stage_from_reader(reader, &req, None, &mut |_| {}).unwrap_err();
    assert!(
        err.to_string()
            .contains("is not the directory that was staged"),
        "{err}"
    );
    assert_eq!(fs::read_dir(&victim).expect("victim").count(), 0);
    // Everything went into the directory that was opened, wherever it was moved.
    assert!(site.root.join("moved-away/lib/f7.jar").is_file());
}
