//! Stage a release: verify a Bitbucket archive's SHA-256 in the same pass as it is gunzipped and
//! extracted into a staging directory, then rename it atomically to `<install_root>/<version>`.
//!
//! Two threads share the pass: the caller's reads the archive in 1 MiB chunks, hashes them (and
//! copies them to the cache), and hands them over; the extractor inflates and writes the entries.
//! Layout: `rules` decides (pure), `extract` writes, `cache` keeps verified archives, `source`
//! bridges async chunk streams and downloads.
//!
//! The install is the agent's (root's), never the Bitbucket user's: the staging directory is made
//! 0700 under the install root and everything is created relative to its handle ([`crate::rootfs`]),
//! so the install root may even be the Bitbucket user's without a race reaching anything else; only
//! after the rename (checked to have moved that very directory) does the install get its 0755.

mod cache;
mod extract;
mod rules;
mod source;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::fs::{self, File};
use std::hash::{BuildHasher, Hasher};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::rootfs;

pub use cache::ArchiveCache;
pub use rules::{EntryHeader, EntryKind, SafeEntry, Tree, check_entry};
pub use source::{ChunkReader, StreamBroken, chunk_channel};

/// Size of the chunks read from the archive source, hashed and handed to the extractor.
const CHUNK_BYTES: usize = 1 << 20;
/// Chunks in flight between the reading and the extracting thread.
const CHUNKS_IN_FLIGHT: usize = 4;
const STAGING_PREFIX: &str = ".staging-";
const GIB: u64 = 1 << 30;

/// What to stage and where.
#[derive(Debug, Clone)]
pub struct StageRequest {
    /// e.g. "8.19.6"; the archive's top folder must be `atlassian-bitbucket-<version>/`.
    pub version: String,
    /// Expected SHA-256 of the compressed archive, hex (either case).
    pub sha256: String,
    /// The install goes to `install_root/<version>`, owned by the agent's user (root) and
    /// writable by nobody else.
    pub install_root: PathBuf,
    pub limits: StageLimits,
}

/// Bounds on what an archive may unpack to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StageLimits {
    /// Decompressed bytes (the tar stream as it inflates, not what headers claim).
    pub max_total_bytes: u64,
    pub max_entries: u64,
    /// Free bytes the stage must leave on the install root's filesystem (at most 5 % of it):
    /// each entry is checked against it by the size its header gives before it is written, and
    /// again while it is.
    pub min_free_bytes: u64,
}

impl Default for StageLimits {
    fn default() -> Self {
        Self {
            max_total_bytes: 8 * GIB,
            max_entries: 500_000,
            min_free_bytes: 512 << 20,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StageProgress {
    /// Compressed bytes read so far.
    pub bytes_in: u64,
    pub total_bytes: Option<u64>,
    /// Files (non-directory entries) extracted so far.
    pub files: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageOutcome {
    pub install_path: PathBuf,
    pub files: u64,
    /// Bytes of file data written.
    pub bytes: u64,
    /// The same archive was staged there before; nothing was read.
    pub already_staged: bool,
    pub from_cache: bool,
}

/// Why a stage failed; everything about the archive is [`StageError::is_bad_input`].
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    #[error("invalid stage request: {0}")]
    InvalidRequest(String),
    #[error("unsafe archive: entry '{entry}' has an absolute path; refusing the whole archive")]
    AbsolutePath { entry: String },
    #[error("unsafe archive: entry '{entry}' has a '..' component; refusing the whole archive")]
    ParentComponent { entry: String },
    #[error("unsafe archive: link '{entry}' -> '{target}' {reason}; refusing the whole archive")]
    LinkEscapes {
        entry: String,
        target: String,
        reason: &'static str,
    },
    #[error(
        "unsafe archive: hard link '{entry}' -> '{target}' names no regular file extracted before it"
    )]
    LinkTargetMissing { entry: String, target: String },
    #[error("unsafe archive: entry '{entry}' is a {kind}, which a release never holds")]
    SpecialFile { entry: String, kind: String },
    #[error(
        "unsafe archive: entry '{entry}' has mode {mode:o} with a setuid, setgid or sticky bit"
    )]
    SetuidBit { entry: String, mode: u32 },
    #[error("unsafe archive: entry '{entry}' {reason}")]
    PathConflict { entry: String, reason: String },
    #[error(
        "archive too large: it unpacks to more than {limit} bytes (at entry '{entry}'); refused as a possible decompression bomb"
    )]
    TooLarge { entry: String, limit: u64 },
    #[error(
        "not enough free disk in {} to stage: entry '{entry}' needs {needed} bytes, {free} are free and {reserve} must stay free; free some space (remove old installs) and stage again; nothing was left behind",
        path.display()
    )]
    DiskFull {
        path: PathBuf,
        entry: String,
        needed: u64,
        free: u64,
        reserve: u64,
    },
    #[error("archive has more than {limit} entries; refused")]
    TooManyEntries { limit: u64 },
    #[error(
        "checksum mismatch: expected SHA-256 {expected}, the archive has {actual}; nothing was staged (check the hash given and the archive's source)"
    )]
    ChecksumMismatch { expected: String, actual: String },
    #[error("corrupt or truncated archive: {0}")]
    Corrupt(String),
    #[error(
        "entry '{found}' is not under the expected top folder '{expected}' (wrong release or not a Bitbucket archive)"
    )]
    WrongTopFolder { expected: String, found: String },
    #[error(
        "{} already exists and is not a stage of this archive (its manifest names sha256 {}); remove it or stage elsewhere",
        path.display(), found_sha256.as_deref().unwrap_or("nothing")
    )]
    AlreadyExistsDifferent {
        path: PathBuf,
        found_sha256: Option<String>,
    },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error("download failed: {0}")]
    Download(String),
}

impl StageError {
    /// True for everything about the archive or the request (exit code 2, gRPC `InvalidArgument`);
    /// false for local I/O, an existing different install, and download failures.
    pub fn is_bad_input(&self) -> bool {
        !matches!(
            self,
            Self::Io { .. }
                | Self::AlreadyExistsDifferent { .. }
                | Self::Download(_)
                | Self::DiskFull { .. }
        )
    }
}

pub(crate) fn io_err(context: impl Into<String>, source: io::Error) -> StageError {
    StageError::Io {
        context: context.into(),
        source,
    }
}

/// `<install>/.bbupgrade-manifest.json`: what was staged, and hashes of the shipped `bin/` and
/// `conf/` files so a later upgrade can tell customizations. Written last: it marks a complete stage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub version: String,
    #[serde(rename = "sha256")]
    pub archive_sha256: String,
    pub files: BTreeMap<String, String>,
    /// Files and bytes staged, reported again on an `already_staged` repeat.
    #[serde(default)]
    pub staged_files: u64,
    #[serde(default)]
    pub staged_bytes: u64,
}

impl Manifest {
    pub const FILE_NAME: &'static str = ".bbupgrade-manifest.json";

    /// The manifest of `install`, or `None` when it has none (not a complete stage). Neither the
    /// install nor the manifest is reached through a link.
    pub fn load(install: &Path) -> io::Result<Option<Manifest>> {
        let dir = match rootfs::open_install(install) {
            Ok(d) => d,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        match dir.read(Path::new(Self::FILE_NAME))? {
            Some(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e)),
            None => Ok(None),
        }
    }
}

/// Blocking. Reads the gzip'd tar from `reader` once, hashing the compressed bytes while it is
/// extracted into `install_root/.staging-<version>-<random>`; the checksum is compared after the
/// whole input is read, and only then is the staging directory renamed to `install_root/<version>`.
/// On any error nothing is left behind. A repeat of a completed stage returns `already_staged`
/// without reading. With a `cache`, the verified archive is also kept there under its hash.
pub fn stage_from_reader<R: Read>(
    reader: R,
    req: &StageRequest,
    cache: Option<&ArchiveCache>,
    progress: &mut dyn FnMut(StageProgress),
) -> Result<StageOutcome, StageError> {
    stage_stream(reader, None, req, cache, progress)
}

/// Blocking. [`stage_from_reader`] over a file (progress knows the total).
pub fn stage_from_file(
    path: &Path,
    req: &StageRequest,
    cache: Option<&ArchiveCache>,
    progress: &mut dyn FnMut(StageProgress),
) -> Result<StageOutcome, StageError> {
    let sha = validate_request(req)?;
    if let Some(done) = find_existing(req, &sha)? {
        return Ok(done);
    }
    let file = File::open(path).map_err(|e| io_err(format!("opening {}", path.display()), e))?;
    let total = file.metadata().ok().map(|m| m.len());
    stage_stream(file, total, req, cache, progress)
}

/// Stage from the cache when it holds the archive, else download `url` (http or https) streaming
/// into the same one-pass stage; the verified archive is then cached.
pub async fn stage_from_url(
    url: &str,
    req: StageRequest,
    cache: Option<Arc<ArchiveCache>>,
    progress: impl FnMut(StageProgress) + Send + 'static,
) -> Result<StageOutcome, StageError> {
    source::stage_from_url(url, req, cache, progress).await
}

/// The CLI's `bbupgrade-agent stage`: a local archive, default limits, no chown. Prints nothing.
pub fn run_local_stage(
    archive: &Path,
    sha256: &str,
    version: &str,
    install_root: &Path,
) -> Result<StageOutcome, StageError> {
    let req = StageRequest {
        version: version.to_string(),
        sha256: sha256.to_string(),
        install_root: install_root.to_path_buf(),
        limits: StageLimits::default(),
    };
    stage_from_file(archive, &req, None, &mut |_| {})
}

/// Removes `.staging-*` directories a crash left under `install_root` (only the agent's own, never
/// through a link); returns what it removed.
pub fn clean_leftovers(install_root: &Path) -> io::Result<Vec<PathBuf>> {
    let root = match rootfs::Dir::open_trusted(install_root) {
        Ok(d) => d,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let me = rustix::process::geteuid().as_raw();
    let mut removed = Vec::new();
    for name in root.entries()? {
        if !name.to_string_lossy().starts_with(STAGING_PREFIX) {
            continue;
        }
        let ours = root
            .lstat(Path::new(&name))?
            .is_some_and(|st| st.st_uid == me && st.st_mode & 0o170000 == 0o040000);
        if ours {
            root.remove_tree(&name)?;
            removed.push(install_root.join(&name));
        }
    }
    removed.sort();
    Ok(removed)
}

/// Lowercase hex of a SHA-256 given in either case.
pub(crate) fn normalize_sha256(sha256: &str) -> Result<String, StageError> {
    let sha = sha256.trim().to_ascii_lowercase();
    if sha.len() != 64 || !sha.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(StageError::InvalidRequest(format!(
            "sha256 '{sha256}' is not 64 hex digits"
        )));
    }
    Ok(sha)
}

/// Checks the request; returns the normalized hash.
pub(crate) fn validate_request(req: &StageRequest) -> Result<String, StageError> {
    let v = &req.version;
    let ok = !v.is_empty()
        && v.len() <= 64
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        && v.bytes().any(|b| b.is_ascii_alphanumeric())
        && !v.starts_with('.');
    if !ok {
        return Err(StageError::InvalidRequest(format!(
            "version '{v}' is not a release version (letters, digits, '.', '-', '_')"
        )));
    }
    normalize_sha256(&req.sha256)
}

/// The outcome of an earlier complete stage of the same archive at the target, if there is one.
pub(crate) fn find_existing(
    req: &StageRequest,
    sha: &str,
) -> Result<Option<StageOutcome>, StageError> {
    let install = req.install_root.join(&req.version);
    match fs::symlink_metadata(&install) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(format!("looking at {}", install.display()), e)),
        Ok(_) => {}
    }
    let manifest = Manifest::load(&install).ok().flatten();
    match manifest {
        Some(m) if m.archive_sha256.eq_ignore_ascii_case(sha) && m.version == req.version => {
            Ok(Some(StageOutcome {
                install_path: install,
                files: m.staged_files,
                bytes: m.staged_bytes,
                already_staged: true,
                from_cache: false,
            }))
        }
        other => Err(StageError::AlreadyExistsDifferent {
            path: install,
            found_sha256: other.map(|m| m.archive_sha256),
        }),
    }
}

pub(crate) fn random_suffix() -> String {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    h.write_u32(std::process::id());
    format!("{:016x}", h.finish())
}

/// The staging directory, root-owned 0700 until it is renamed into place; removed on drop unless
/// the stage completed. Everything in it is written through its handle, so renaming it away or
/// planting a link at its name (the install root may be the Bitbucket user's) changes nothing.
struct Staging {
    root: rootfs::Dir,
    name: OsString,
    dir: rootfs::Dir,
    path: PathBuf,
    keep: bool,
}

impl Staging {
    fn create(req: &StageRequest) -> Result<Self, StageError> {
        let root = rootfs::Dir::create_trusted(&req.install_root, 0o755)
            .map_err(|e| io_err(format!("creating {}", req.install_root.display()), e))?;
        let name = OsString::from(format!(
            "{STAGING_PREFIX}{}-{}",
            req.version,
            random_suffix()
        ));
        let path = req.install_root.join(&name);
        let dir = root
            .mkdir(&name, 0o700)
            .map_err(|e| io_err(format!("creating {}", path.display()), e))?;
        let staging = Self {
            root,
            name,
            dir,
            path,
            keep: false,
        };
        // What we opened must be the empty directory we made, not one swapped in meanwhile.
        let st = staging
            .dir
            .stat()
            .map_err(|e| io_err(format!("inspecting {}", staging.path.display()), e))?;
        let empty = staging.dir.entries().is_ok_and(|e| e.is_empty());
        if st.st_uid != rustix::process::geteuid().as_raw()
            || st.st_mode & 0o7777 != 0o700
            || !empty
        {
            return Err(io_err(
                format!("creating {}", staging.path.display()),
                io::Error::other(
                    "the new staging directory was replaced by another one: someone else can write the install root; make it writable by root only",
                ),
            ));
        }
        Ok(staging)
    }

    /// Whether `name` in the install root is still the directory we staged into.
    fn is_at(&self, name: &OsStr) -> io::Result<bool> {
        let ours = self.dir.stat()?;
        Ok(self
            .root
            .lstat(Path::new(name))?
            .is_some_and(|st| st.st_dev == ours.st_dev && st.st_ino == ours.st_ino))
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        // Only the directory we made: if something else took its name, leave that alone.
        let removed = match self.is_at(&self.name) {
            Ok(true) => self.root.remove_tree(&self.name),
            Ok(false) => Ok(()),
            Err(e) => Err(e),
        };
        if let Err(e) = removed {
            tracing::warn!(path = %self.path.display(), error = %e, "could not remove the staging directory");
        }
    }
}

/// Why the reading side stopped.
enum Pumped {
    Eof,
    ExtractorStopped,
}

/// The one pass: this thread reads, hashes and caches; a scoped thread extracts.
pub(crate) fn stage_stream<R: Read>(
    mut reader: R,
    total: Option<u64>,
    req: &StageRequest,
    cache: Option<&ArchiveCache>,
    progress: &mut dyn FnMut(StageProgress),
) -> Result<StageOutcome, StageError> {
    let sha = validate_request(req)?;
    if let Some(done) = find_existing(req, &sha)? {
        return Ok(done);
    }
    let mut staging = Staging::create(req)?;
    let mut cache_writer = match cache {
        Some(c) if c.get(&sha).is_none() => c.begin(&sha).ok(),
        _ => None,
    };
    let files = AtomicU64::new(0);
    let ctx = extract::ExtractCtx {
        root: &staging.dir,
        top: format!("atlassian-bitbucket-{}", req.version),
        limits: req.limits,
        files: &files,
    };
    let mut hasher = Sha256::new();
    let mut bytes_in = 0u64;
    let (pumped, extracted) = std::thread::scope(|s| {
        let (tx, rx) = mpsc::sync_channel::<Vec<u8>>(CHUNKS_IN_FLIGHT);
        let (give_back, returned) = mpsc::channel::<Vec<u8>>();
        let extractor =
            s.spawn(|| extract::extract(extract::ChunkSource::new(rx, give_back), &ctx));
        let pumped = (|| {
            loop {
                let mut buf = returned.try_recv().unwrap_or_default();
                buf.resize(CHUNK_BYTES, 0);
                let filled = fill(&mut reader, &mut buf, bytes_in)?;
                if filled == 0 {
                    return Ok(Pumped::Eof);
                }
                buf.truncate(filled);
                hasher.update(&buf);
                if let Some(w) = cache_writer.as_mut() {
                    w.write(&buf);
                }
                bytes_in += filled as u64;
                if tx.send(buf).is_err() {
                    return Ok(Pumped::ExtractorStopped);
                }
                progress(StageProgress {
                    bytes_in,
                    total_bytes: total,
                    files: files.load(Ordering::Relaxed),
                });
            }
        })();
        // Closing the channel is the extractor's end of input.
        drop(tx);
        let extracted = extractor.join().unwrap_or_else(|_| {
            Err(io_err(
                "extracting",
                io::Error::other("the extractor thread panicked"),
            ))
        });
        (pumped, extracted)
    });
    let pumped: Pumped = pumped?;
    let extracted = extracted?;
    if matches!(pumped, Pumped::ExtractorStopped) {
        // The extractor only stops early with an error, returned above.
        return Err(StageError::Corrupt(
            "extraction stopped before the input ended".into(),
        ));
    }
    let actual = hex::encode(hasher.finalize());
    if actual != sha {
        return Err(StageError::ChecksumMismatch {
            expected: sha,
            actual,
        });
    }

    let manifest = Manifest {
        version: req.version.clone(),
        archive_sha256: sha.clone(),
        files: extracted.manifest_files,
        staged_files: extracted.files,
        staged_bytes: extracted.bytes,
    };
    write_manifest(&staging.dir, &manifest)?;
    let root_mode = extract::finish_dirs(&staging.dir, &extracted.dirs)?;
    let install = req.install_root.join(&req.version);
    let version = OsString::from(&req.version);
    match staging
        .root
        .rename_no_replace(&staging.name, &staging.root, &version)
    {
        Ok(()) => {}
        // Someone staged the same version meanwhile: fine if it is this archive.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            drop(staging);
            return find_existing(req, &sha)?.ok_or(StageError::AlreadyExistsDifferent {
                path: install,
                found_sha256: None,
            });
        }
        Err(e) => {
            return Err(io_err(
                format!(
                    "renaming {} to {}",
                    staging.path.display(),
                    install.display()
                ),
                e,
            ));
        }
    }
    // The name now holds what we renamed: if it is not our directory (the staging name was
    // swapped in a user-writable install root), refuse and keep it from looking staged.
    if !staging
        .is_at(&version)
        .map_err(|e| io_err(format!("inspecting {}", install.display()), e))?
    {
        staging.keep = true;
        return Err(io_err(
            format!(
                "renaming {} to {}",
                staging.path.display(),
                install.display()
            ),
            io::Error::other(format!(
                "{} is not the directory that was staged (the install root is writable by someone else): remove it and make {} writable by root only",
                install.display(),
                req.install_root.display()
            )),
        ));
    }
    staging.keep = true;
    // Open to the Bitbucket user only now that it is complete and in place.
    extract::finish_root(&staging.dir, root_mode)
        .map_err(|e| io_err(format!("setting the mode of {}", install.display()), e))?;
    File::open(&req.install_root)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_err(format!("syncing {}", req.install_root.display()), e))?;
    if let Some(w) = cache_writer
        && let Err(e) = w.commit()
    {
        tracing::warn!(error = %e, "could not keep the archive in the cache");
    }
    progress(StageProgress {
        bytes_in,
        total_bytes: total,
        files: extracted.files,
    });
    Ok(StageOutcome {
        install_path: install,
        files: extracted.files,
        bytes: extracted.bytes,
        already_staged: false,
        from_cache: false,
    })
}

/// Reads until `buf` is full or the input ends.
fn fill<R: Read>(reader: &mut R, buf: &mut [u8], offset: u64) -> Result<usize, StageError> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                let at = offset + filled as u64;
                return Err(
                    match e.get_ref().and_then(|i| i.downcast_ref::<StreamBroken>()) {
                        Some(broken) => {
                            StageError::Corrupt(format!("{broken} after {at} bytes (truncated)"))
                        }
                        None => io_err(format!("reading the archive at byte {at}"), e),
                    },
                );
            }
        }
    }
    Ok(filled)
}

fn write_manifest(root: &rootfs::Dir, m: &Manifest) -> Result<(), StageError> {
    let json =
        serde_json::to_vec_pretty(m).map_err(|e| io_err("encoding the manifest", e.into()))?;
    root.write_atomic(OsStr::new(Manifest::FILE_NAME), &json, 0o644)
        .map_err(|e| {
            io_err(
                format!(
                    "writing {}",
                    root.path().join(Manifest::FILE_NAME).display()
                ),
                e,
            )
        })
}
