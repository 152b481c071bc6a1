//! The extracting half of the one-pass stage: gunzip and untar entry by entry into the staging
//! directory, applying the rules, counting every decompressed byte against the limits.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::io::{self, BufRead, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender};

use rustix::fs::{self as rfs, AtFlags, Mode, Timespec, Timestamps, UTIME_OMIT};

use flate2::bufread::MultiGzDecoder;
use sha2::{Digest, Sha256};

use super::rules::{EntryHeader, EntryKind, SafeEntry, Tree, check_entry, lossy};
use super::{StageError, StageLimits, io_err};
use crate::rootfs::{Dir, MODE_MASK};

/// Size of the buffer file data is inflated into and written from.
pub const WRITE_BUF_BYTES: usize = 1 << 20;
/// Tar metadata (header, GNU long names, pax records) allowed for one entry: long names are read
/// into memory by the tar crate, so they must not be allowed to grow with the size limit.
const META_BYTES_PER_ENTRY: u64 = 1 << 20;
/// Mode of directories the archive does not list.
const DEFAULT_DIR_MODE: u32 = 0o755;
/// Mode of directories while extracting: only we can write there until the stage is complete.
const STAGING_DIR_MODE: u32 = 0o700;
/// The free-disk reserve is at most this fraction (1/20 = 5 %) of the filesystem's size.
const RESERVE_MAX_FRACTION: u64 = 20;
/// While a file is written, the free disk is checked again after this many bytes.
const SPACE_CHECK_BYTES: u64 = 64 << 20;
/// Folders whose files get hashed into the manifest (customizations live there).
const MANIFEST_DIRS: [&str; 2] = ["bin", "conf"];

/// What the extractor needs to know. Every entry is created relative to `root`'s handle, its
/// parent directory reached one component at a time without following a link.
pub struct ExtractCtx<'a> {
    pub root: &'a Dir,
    pub top: String,
    pub limits: StageLimits,
    /// Non-directory entries written so far, read by the progress reporter on the other thread.
    pub files: &'a AtomicU64,
}

impl ExtractCtx<'_> {
    fn path(&self, rel: &Path) -> PathBuf {
        self.root.path().join(rel)
    }

    /// Fails when writing `needed` more bytes would leave less than the configured free space.
    fn check_space(&self, needed: u64, entry: &str) -> Result<(), StageError> {
        let vfs = rfs::fstatvfs(self.root.as_fd()).map_err(|e| {
            io_err(
                format!("checking free disk in {}", self.root.path().display()),
                e.into(),
            )
        })?;
        let free = vfs.f_bavail.saturating_mul(vfs.f_frsize);
        let size = vfs.f_blocks.saturating_mul(vfs.f_frsize);
        let reserve = reserve(size, self.limits.min_free_bytes);
        if !space_ok(free, needed, reserve) {
            return Err(StageError::DiskFull {
                path: self
                    .root
                    .path()
                    .parent()
                    .unwrap_or(self.root.path())
                    .to_path_buf(),
                entry: entry.to_string(),
                needed,
                free,
                reserve,
            });
        }
        Ok(())
    }
}

/// Whether `needed` bytes fit in `free` while keeping `reserve` free.
pub fn space_ok(free: u64, needed: u64, reserve: u64) -> bool {
    needed.checked_add(reserve).is_some_and(|n| free >= n)
}

/// What a stage keeps free on a filesystem of `size` bytes: the configured bytes, but never more
/// than 1/[`RESERVE_MAX_FRACTION`] of the filesystem, so a small disk can still be staged on.
pub fn reserve(size: u64, min_free: u64) -> u64 {
    min_free.min(size / RESERVE_MAX_FRACTION)
}

/// The last parent directory opened, reused while entries stay in one folder (tar order).
#[derive(Default)]
struct Parents {
    last: RefCell<Option<(PathBuf, std::rc::Rc<Dir>)>>,
}

impl Parents {
    /// The directory holding `rel`, opened without links, and `rel`'s file name.
    fn of<'r>(
        &self,
        ctx: &ExtractCtx<'_>,
        rel: &'r Path,
    ) -> Result<(std::rc::Rc<Dir>, &'r OsStr), StageError> {
        let parent = rel.parent().unwrap_or(Path::new(""));
        let name = rel.file_name().ok_or_else(|| {
            io_err(
                format!("creating {}", ctx.path(rel).display()),
                io::Error::from(io::ErrorKind::InvalidInput),
            )
        })?;
        if let Some((p, d)) = self.last.borrow().as_ref()
            && p == parent
        {
            return Ok((d.clone(), name));
        }
        let dir = std::rc::Rc::new(
            ctx.root
                .open_dir(parent)
                .map_err(|e| io_err(format!("opening {}", ctx.path(parent).display()), e))?,
        );
        *self.last.borrow_mut() = Some((parent.to_path_buf(), dir.clone()));
        Ok((dir, name))
    }
}

fn timestamps(mtime: u64) -> Timestamps {
    let t = Timespec {
        tv_sec: i64::try_from(mtime).unwrap_or(i64::MAX),
        tv_nsec: 0,
    };
    Timestamps {
        last_access: t,
        last_modification: t,
    }
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
    let parents = Parents::default();
    ctx.check_space(0, &last)?;
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
            ctx.check_space(size, &last)?;
            for dir in &admitted.missing_parents {
                make_dir(ctx, &parents, dir)?;
                out.dirs.insert(dir.clone(), (DEFAULT_DIR_MODE, None));
            }
            match safe {
                SafeEntry::Skip => {}
                SafeEntry::Root { mode } => {
                    out.dirs.insert(PathBuf::new(), (mode, mtime));
                }
                SafeEntry::Dir { rel, mode } => {
                    if !admitted.exists {
                        make_dir(ctx, &parents, &rel)?;
                    }
                    out.dirs.insert(rel, (mode, mtime));
                }
                SafeEntry::File { rel, mode } => {
                    meter.enter(Phase::Data);
                    let hash = wants_hash(&rel);
                    let (written, digest) = write_file(
                        ctx, &parents, &rel, mode, mtime, &mut entry, &mut buf, hash, &meter, &last,
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
                    let path = ctx.path(&rel);
                    let (dir, name) = parents.of(ctx, &rel)?;
                    rfs::symlinkat(&target, dir.as_fd(), name).map_err(|e| {
                        io_err(format!("creating symlink {}", path.display()), e.into())
                    })?;
                    if let Some(t) = mtime {
                        rfs::utimensat(
                            dir.as_fd(),
                            name,
                            &timestamps(t),
                            AtFlags::SYMLINK_NOFOLLOW,
                        )
                        .map_err(|e| {
                            io_err(format!("setting the time of {}", path.display()), e.into())
                        })?;
                    }
                }
                SafeEntry::Hardlink { rel, target } => {
                    let (from, to) = (ctx.path(&target), ctx.path(&rel));
                    let (from_dir, from_name) = Parents::default().of(ctx, &target)?;
                    let (dir, name) = parents.of(ctx, &rel)?;
                    // No AT_SYMLINK_FOLLOW: the link is to the entry itself, never through a link.
                    rfs::linkat(
                        from_dir.as_fd(),
                        from_name,
                        dir.as_fd(),
                        name,
                        AtFlags::empty(),
                    )
                    .map_err(|e| {
                        io_err(
                            format!("linking {} to {}", to.display(), from.display()),
                            e.into(),
                        )
                    })?;
                    if wants_hash(&rel) {
                        let digest = match out.manifest_files.get(&manifest_key(&target)) {
                            Some(d) => d.clone(),
                            None => hash_file(ctx, &rel)?,
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

fn make_dir(ctx: &ExtractCtx<'_>, parents: &Parents, rel: &Path) -> Result<(), StageError> {
    let (dir, name) = parents.of(ctx, rel)?;
    rfs::mkdirat(dir.as_fd(), name, Mode::from_raw_mode(STAGING_DIR_MODE)).map_err(|e| {
        io_err(
            format!("creating directory {}", ctx.path(rel).display()),
            e.into(),
        )
    })
}

#[allow(clippy::too_many_arguments)]
fn write_file<R: Read>(
    ctx: &ExtractCtx<'_>,
    parents: &Parents,
    rel: &Path,
    mode: u32,
    mtime: Option<u64>,
    entry: &mut R,
    buf: &mut [u8],
    hash: bool,
    meter: &Meter,
    name: &str,
) -> Result<(u64, Option<String>), StageError> {
    let path = ctx.path(rel);
    let ctx_err = |what: &str, e| io_err(format!("{what} {}", path.display()), e);
    let (dir, file_name) = parents.of(ctx, rel)?;
    // O_CREAT|O_EXCL|O_NOFOLLOW: never follow or reuse something already at that name.
    let mut file = dir
        .create_new(file_name)
        .map_err(|e| ctx_err("creating", e))?;
    let mut hasher = hash.then(Sha256::new);
    let mut written = 0u64;
    let mut next_check = SPACE_CHECK_BYTES;
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
        if written >= next_check {
            // Others share the disk: check again while a large file is written.
            ctx.check_space(0, name)?;
            next_check = written + SPACE_CHECK_BYTES;
        }
    }
    rfs::fchmod(&file, Mode::from_raw_mode(mode & MODE_MASK))
        .map_err(|e| ctx_err("setting the mode of", e.into()))?;
    if let Some(t) = mtime {
        rfs::futimens(&file, &timestamps(t))
            .map_err(|e| ctx_err("setting the time of", e.into()))?;
    }
    Ok((written, hasher.map(|h| hex::encode(h.finalize()))))
}

fn hash_file(ctx: &ExtractCtx<'_>, rel: &Path) -> Result<String, StageError> {
    let path = ctx.path(rel);
    let (mut f, _) = ctx
        .root
        .open_file(rel)
        .and_then(|f| f.ok_or_else(|| io::ErrorKind::NotFound.into()))
        .map_err(|e| io_err(format!("reading {}", path.display()), e))?;
    let mut h = Sha256::new();
    io::copy(&mut f, &mut h).map_err(|e| io_err(format!("reading {}", path.display()), e))?;
    Ok(hex::encode(h.finalize()))
}

/// Applies directory modes (masked with 0o022) and times below the staging root, deepest first so
/// a read-only parent never blocks a child; returns the mode and time for the root itself, which
/// stays 0700 until the install is renamed into place ([`finish_root`]).
pub fn finish_dirs(
    root: &Dir,
    dirs: &HashMap<PathBuf, (u32, Option<u64>)>,
) -> Result<(u32, Option<u64>), StageError> {
    let mut ordered: Vec<_> = dirs.iter().collect();
    ordered.sort_by_key(|(p, _)| std::cmp::Reverse(p.components().count()));
    let mut root_mode = (DEFAULT_DIR_MODE, None);
    for (rel, (mode, mtime)) in ordered {
        if rel.as_os_str().is_empty() {
            root_mode = (*mode, *mtime);
            continue;
        }
        let path = root.path().join(rel);
        let dir = root
            .open_dir(rel)
            .map_err(|e| io_err(format!("opening {}", path.display()), e))?;
        set_dir(&dir, *mode, *mtime)
            .map_err(|e| io_err(format!("setting the mode of {}", path.display()), e))?;
    }
    Ok(root_mode)
}

/// The install's own mode and time, once it is in place.
pub fn finish_root(root: &Dir, (mode, mtime): (u32, Option<u64>)) -> io::Result<()> {
    set_dir(root, mode, mtime)
}

fn set_dir(dir: &Dir, mode: u32, mtime: Option<u64>) -> io::Result<()> {
    if let Some(t) = mtime {
        let mut ts = timestamps(t);
        ts.last_access = Timespec {
            tv_sec: 0,
            tv_nsec: UTIME_OMIT,
        };
        rfs::futimens(dir.as_fd(), &ts)?;
    }
    rfs::fchmod(dir.as_fd(), Mode::from_raw_mode(mode & MODE_MASK))?;
    Ok(())
}
