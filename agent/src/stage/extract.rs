//! The extracting half of the one-pass stage: gunzip and untar entry by entry into the staging
//! directory, applying the rules, counting every decompressed byte against the limits.

use std::cell::Cell;
use std::collections::{BTreeMap, HashMap};
use std::fs::{self, DirBuilder, File, FileTimes, OpenOptions};
use std::io::{self, BufRead, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use flate2::bufread::MultiGzDecoder;
use sha2::{Digest, Sha256};

use super::rules::{EntryHeader, EntryKind, SafeEntry, Tree, check_entry, lossy};
use super::{StageError, StageLimits, io_err};

/// Size of the buffer file data is inflated into and written from.
pub const WRITE_BUF_BYTES: usize = 1 << 20;
/// Tar metadata (header, GNU long names, pax records) allowed for one entry: long names are read
/// into memory by the tar crate, so they must not be allowed to grow with the size limit.
const META_BYTES_PER_ENTRY: u64 = 1 << 20;
/// Mode of directories the archive does not list.
const DEFAULT_DIR_MODE: u32 = 0o755;
/// Mode of directories while extracting: only we can write there until the stage is complete.
const STAGING_DIR_MODE: u32 = 0o700;
/// Folders whose files get hashed into the manifest (customizations live there).
const MANIFEST_DIRS: [&str; 2] = ["bin", "conf"];

/// What the extractor needs to know.
pub struct ExtractCtx<'a> {
    pub root: &'a Path,
    pub top: String,
    pub limits: StageLimits,
    pub owner: Option<(u32, u32)>,
    /// Non-directory entries written so far, read by the progress reporter on the other thread.
    pub files: &'a AtomicU64,
}

/// What was extracted; directory modes and times are applied by the caller once the checksum holds.
#[derive(Debug, Default)]
pub struct Extracted {
    pub files: u64,
    pub bytes: u64,
    /// Mode and mtime for each directory (the install itself under the empty path).
    pub dirs: HashMap<PathBuf, (u32, Option<u64>)>,
    /// Hashes of the regular files under `bin/` and `conf/`.
    pub manifest_files: BTreeMap<String, String>,
}

/// A `BufRead` over the chunks the reading thread hands over; consumed chunks go back for reuse.
pub struct ChunkSource {
    rx: Receiver<Vec<u8>>,
    give_back: Sender<Vec<u8>>,
    cur: Vec<u8>,
    pos: usize,
}

impl ChunkSource {
    pub fn new(rx: Receiver<Vec<u8>>, give_back: Sender<Vec<u8>>) -> Self {
        Self {
            rx,
            give_back,
            cur: Vec::new(),
            pos: 0,
        }
    }
}

impl Read for ChunkSource {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let avail = self.fill_buf()?;
        let n = avail.len().min(buf.len());
        buf[..n].copy_from_slice(&avail[..n]);
        self.consume(n);
        Ok(n)
    }
}

impl BufRead for ChunkSource {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        while self.pos >= self.cur.len() {
            // A closed channel is the end of the input: the reading thread saw EOF or gave up.
            let Ok(next) = self.rx.recv() else {
                return Ok(&[]);
            };
            let used = std::mem::replace(&mut self.cur, next);
            self.pos = 0;
            if used.capacity() > 0 {
                let _ = self.give_back.send(used);
            }
        }
        Ok(&self.cur[self.pos..])
    }

    fn consume(&mut self, amt: usize) {
        self.pos = (self.pos + amt).min(self.cur.len());
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Reading tar headers, long names, pax records.
    Meta,
    /// Reading file data.
    Data,
    /// After the end-of-archive block: padding up to the end of the gzip stream.
    Trailer,
}

/// Why the metered reader stopped the stream.
#[derive(Debug, Clone, Copy)]
enum Trip {
    Total,
    Meta,
}

/// Counts decompressed bytes as they stream, whatever the headers claim.
struct Meter {
    total: Cell<u64>,
    meta: Cell<u64>,
    phase: Cell<Phase>,
    tripped: Cell<Option<Trip>>,
    limit: u64,
}

struct Metered<'m, R> {
    inner: R,
    meter: &'m Meter,
}

impl<R: Read> Read for Metered<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let m = self.meter;
        if m.tripped.get().is_some() {
            return Err(io::Error::other("archive refused"));
        }
        let n = self.inner.read(buf)?;
        m.total.set(m.total.get() + n as u64);
        if m.phase.get() == Phase::Meta {
            m.meta.set(m.meta.get() + n as u64);
            if m.meta.get() > META_BYTES_PER_ENTRY {
                m.tripped.set(Some(Trip::Meta));
            }
        }
        if m.total.get() > m.limit {
            m.tripped.set(Some(Trip::Total));
        }
        if m.tripped.get().is_some() {
            return Err(io::Error::other("archive refused"));
        }
        Ok(n)
    }
}

impl Meter {
    fn enter(&self, phase: Phase) {
        if phase == Phase::Meta {
            self.meta.set(0);
        }
        self.phase.set(phase);
    }

    /// Turns an error from the decompressing/untarring side into the refusal it stands for.
    fn explain(&self, e: io::Error, entry: &str) -> StageError {
        match self.tripped.get() {
            Some(Trip::Total) => StageError::TooLarge {
                entry: entry.to_string(),
                limit: self.limit,
            },
            Some(Trip::Meta) => StageError::Corrupt(format!(
                "more than {META_BYTES_PER_ENTRY} bytes of tar metadata (long name or pax records) after entry '{entry}'"
            )),
            None => StageError::Corrupt(format!("{e} (at or after entry '{entry}')")),
        }
    }
}

/// Extracts the gzip'd tar from `src` under `ctx.root`, which exists and is empty.
pub fn extract<B: BufRead>(src: B, ctx: &ExtractCtx<'_>) -> Result<Extracted, StageError> {
    let meter = Meter {
        total: Cell::new(0),
        meta: Cell::new(0),
        phase: Cell::new(Phase::Meta),
        tripped: Cell::new(None),
        limit: ctx.limits.max_total_bytes,
    };
    let mut archive = tar::Archive::new(Metered {
        inner: MultiGzDecoder::new(src),
        meter: &meter,
    });
    let mut out = Extracted::default();
    out.dirs.insert(PathBuf::new(), (DEFAULT_DIR_MODE, None));
    let mut buf = vec![0u8; WRITE_BUF_BYTES];
    let mut last = String::from("(start of archive)");
    {
        let mut entries = archive.entries().map_err(|e| meter.explain(e, &last))?;
        let mut tree = Tree::default();
        let mut count = 0u64;
        loop {
            meter.enter(Phase::Meta);
            let mut entry = match entries.next() {
                None => break,
                Some(Ok(entry)) => entry,
                Some(Err(e)) => return Err(meter.explain(e, &last)),
            };
            count += 1;
            if count > ctx.limits.max_entries {
                return Err(StageError::TooManyEntries {
                    limit: ctx.limits.max_entries,
                });
            }
            let path = entry.path_bytes().into_owned();
            last = lossy(&path);
            let link = entry.link_name_bytes().map(|l| l.into_owned());
            let header = entry.header();
            let mode = header.mode().map_err(|e| meter.explain(e, &last))?;
            let mtime = header.mtime().ok();
            let raw = EntryHeader {
                path: &path,
                kind: EntryKind::from_tar(header.entry_type()),
                mode,
                link: link.as_deref(),
            };
            let safe = check_entry(&raw, &ctx.top)?;
            let size = entry.size();
            if size > ctx.limits.max_total_bytes.saturating_sub(out.bytes) {
                return Err(StageError::TooLarge {
                    entry: last,
                    limit: ctx.limits.max_total_bytes,
                });
            }
            let admitted = tree.admit(&safe, &last)?;
            for dir in &admitted.missing_parents {
                make_dir(ctx, dir)?;
                out.dirs.insert(dir.clone(), (DEFAULT_DIR_MODE, None));
            }
            match safe {
                SafeEntry::Skip => {}
                SafeEntry::Root { mode } => {
                    out.dirs.insert(PathBuf::new(), (mode, mtime));
                }
                SafeEntry::Dir { rel, mode } => {
                    if !admitted.exists {
                        make_dir(ctx, &rel)?;
                    }
                    out.dirs.insert(rel, (mode, mtime));
                }
                SafeEntry::File { rel, mode } => {
                    meter.enter(Phase::Data);
                    let hash = wants_hash(&rel);
                    let (written, digest) = write_file(
                        ctx, &rel, mode, mtime, &mut entry, &mut buf, hash, &meter, &last,
                    )?;
                    if written != size {
                        return Err(StageError::Corrupt(format!(
                            "entry '{last}' ends after {written} of its {size} bytes (truncated)"
                        )));
                    }
                    out.bytes += written;
                    if let Some(d) = digest {
                        out.manifest_files.insert(manifest_key(&rel), d);
                    }
                }
                SafeEntry::Symlink { rel, target } => {
                    let path = ctx.root.join(&rel);
                    std::os::unix::fs::symlink(&target, &path)
                        .map_err(|e| io_err(format!("creating symlink {}", path.display()), e))?;
                    if let Some((uid, gid)) = ctx.owner {
                        std::os::unix::fs::lchown(&path, Some(uid), Some(gid))
                            .map_err(|e| io_err(format!("chowning {}", path.display()), e))?;
                    }
                    if let Some(t) = mtime {
                        set_symlink_mtime(&path, t)?;
                    }
                }
                SafeEntry::Hardlink { rel, target } => {
                    let (from, to) = (ctx.root.join(&target), ctx.root.join(&rel));
                    fs::hard_link(&from, &to).map_err(|e| {
                        io_err(format!("linking {} to {}", to.display(), from.display()), e)
                    })?;
                    if wants_hash(&rel) {
                        let digest = match out.manifest_files.get(&manifest_key(&target)) {
                            Some(d) => d.clone(),
                            None => hash_file(&to)?,
                        };
                        out.manifest_files.insert(manifest_key(&rel), digest);
                    }
                }
            }
            if !matches!(raw.kind, EntryKind::Dir | EntryKind::PaxGlobal) {
                out.files += 1;
                ctx.files.fetch_add(1, Ordering::Relaxed);
            }
        }
        if count == 0 {
            return Err(StageError::Corrupt("the archive holds no entries".into()));
        }
    }
    // Read on to the end of the gzip stream so its CRC and length are checked too.
    meter.enter(Phase::Trailer);
    let mut rest = archive.into_inner();
    loop {
        match rest.read(&mut buf) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(meter.explain(e, &format!("end of archive after {last}"))),
        }
    }
    Ok(out)
}

fn wants_hash(rel: &Path) -> bool {
    rel.components().count() > 1
        && MANIFEST_DIRS
            .iter()
            .any(|d| rel.components().next().is_some_and(|c| c.as_os_str() == *d))
}

fn manifest_key(rel: &Path) -> String {
    rel.to_string_lossy().into_owned()
}

fn make_dir(ctx: &ExtractCtx<'_>, rel: &Path) -> Result<(), StageError> {
    let path = ctx.root.join(rel);
    DirBuilder::new()
        .mode(STAGING_DIR_MODE)
        .create(&path)
        .map_err(|e| io_err(format!("creating directory {}", path.display()), e))?;
    if let Some((uid, gid)) = ctx.owner {
        std::os::unix::fs::lchown(&path, Some(uid), Some(gid))
            .map_err(|e| io_err(format!("chowning {}", path.display()), e))?;
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn write_file<R: Read>(
    ctx: &ExtractCtx<'_>,
    rel: &Path,
    mode: u32,
    mtime: Option<u64>,
    entry: &mut R,
    buf: &mut [u8],
    hash: bool,
    meter: &Meter,
    name: &str,
) -> Result<(u64, Option<String>), StageError> {
    let path = ctx.root.join(rel);
    let ctx_err = |what: &str, e| io_err(format!("{what} {}", path.display()), e);
    // create_new: never follow or reuse something already at that path.
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| ctx_err("creating", e))?;
    let mut hasher = hash.then(Sha256::new);
    let mut written = 0u64;
    loop {
        // Fill the whole buffer before writing: inflate lands directly in it, one write per MiB.
        let mut filled = 0;
        while filled < buf.len() {
            match entry.read(&mut buf[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(meter.explain(e, name)),
            }
        }
        if filled == 0 {
            break;
        }
        if let Some(h) = hasher.as_mut() {
            h.update(&buf[..filled]);
        }
        file.write_all(&buf[..filled])
            .map_err(|e| ctx_err("writing", e))?;
        written += filled as u64;
        if written > ctx.limits.max_total_bytes {
            return Err(StageError::TooLarge {
                entry: name.to_string(),
                limit: ctx.limits.max_total_bytes,
            });
        }
    }
    file.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(|e| ctx_err("setting the mode of", e))?;
    if let Some(t) = mtime {
        let t = UNIX_EPOCH + Duration::from_secs(t);
        file.set_times(FileTimes::new().set_modified(t).set_accessed(t))
            .map_err(|e| ctx_err("setting the time of", e))?;
    }
    if let Some((uid, gid)) = ctx.owner {
        std::os::unix::fs::fchown(&file, Some(uid), Some(gid))
            .map_err(|e| ctx_err("chowning", e))?;
    }
    Ok((written, hasher.map(|h| hex::encode(h.finalize()))))
}

fn hash_file(path: &Path) -> Result<String, StageError> {
    let mut f = File::open(path).map_err(|e| io_err(format!("reading {}", path.display()), e))?;
    let mut h = Sha256::new();
    io::copy(&mut f, &mut h).map_err(|e| io_err(format!("reading {}", path.display()), e))?;
    Ok(hex::encode(h.finalize()))
}

fn set_symlink_mtime(path: &Path, secs: u64) -> Result<(), StageError> {
    use nix::sys::stat::{UtimensatFlags, utimensat};
    use nix::sys::time::TimeSpec;
    let t = TimeSpec::new(i64::try_from(secs).unwrap_or(i64::MAX), 0);
    utimensat(
        nix::fcntl::AT_FDCWD,
        path,
        &t,
        &t,
        UtimensatFlags::NoFollowSymlink,
    )
    .map_err(|e| io_err(format!("setting the time of {}", path.display()), e.into()))
}

/// Applies directory modes and times, deepest first so a read-only parent never blocks a child.
pub fn finish_dirs(
    root: &Path,
    dirs: &HashMap<PathBuf, (u32, Option<u64>)>,
) -> Result<(), StageError> {
    let mut ordered: Vec<_> = dirs.iter().collect();
    ordered.sort_by_key(|(p, _)| std::cmp::Reverse(p.components().count()));
    for (rel, (mode, mtime)) in ordered {
        let path = root.join(rel);
        // Times first: the directory is still ours to open whatever mode it ends up with.
        if let Some(t) = mtime {
            let t = UNIX_EPOCH + Duration::from_secs(*t);
            let set = File::open(&path).and_then(|d| {
                d.set_times(
                    FileTimes::new()
                        .set_modified(t)
                        .set_accessed(SystemTime::now()),
                )
            });
            set.map_err(|e| io_err(format!("setting the time of {}", path.display()), e))?;
        }
        fs::set_permissions(&path, fs::Permissions::from_mode(*mode))
            .map_err(|e| io_err(format!("setting the mode of {}", path.display()), e))?;
    }
    Ok(())
}
