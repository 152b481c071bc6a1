//! A bounded cache of verified release archives, `<dir>/<sha256>.tar.gz`, least recently used
//! evicted first (recency is the file's mtime, touched on every hit).

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

/// Prefix of archives being written, not yet verified.
const TEMP_PREFIX: &str = ".tmp-";
const SUFFIX: &str = ".tar.gz";

/// See the module documentation.
#[derive(Debug)]
pub struct ArchiveCache {
    dir: PathBuf,
    max_bytes: u64,
    /// Serializes commits and evictions between stages running at once.
    lock: Mutex<()>,
}

impl ArchiveCache {
    /// Opens (creating) the cache folder and removes temp files a crash left behind.
    pub fn new(dir: PathBuf, max_bytes: u64) -> io::Result<Self> {
        fs::create_dir_all(&dir)?;
        for entry in fs::read_dir(&dir)? {
            let entry = entry?;
            if entry.file_name().to_string_lossy().starts_with(TEMP_PREFIX) {
                let _ = fs::remove_file(entry.path());
            }
        }
        Ok(Self {
            dir,
            max_bytes,
            lock: Mutex::new(()),
        })
    }

    /// The cached archive with this SHA-256 (any case), marked as just used.
    pub fn get(&self, sha256: &str) -> Option<PathBuf> {
        let path = self.path_for(sha256)?;
        let file = File::options().append(true).open(&path).ok()?;
        // Recency for eviction; a failure only makes this entry look older.
        let _ = file.set_modified(SystemTime::now());
        Some(path)
    }

    /// Drops an entry that turned out bad.
    pub fn remove(&self, sha256: &str) {
        if let Some(path) = self.path_for(sha256) {
            let _ = fs::remove_file(path);
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path_for(&self, sha256: &str) -> Option<PathBuf> {
        let sha = super::normalize_sha256(sha256).ok()?;
        Some(self.dir.join(format!("{sha}{SUFFIX}")))
    }

    /// Starts writing an archive; it is kept only if [`CacheWriter::commit`] is called.
    pub(super) fn begin(&self, sha256: &str) -> io::Result<CacheWriter<'_>> {
        let tmp = self.dir.join(format!(
            "{TEMP_PREFIX}{sha256}-{}{SUFFIX}",
            super::random_suffix()
        ));
        let file = File::options().write(true).create_new(true).open(&tmp)?;
        Ok(CacheWriter {
            cache: self,
            sha256: sha256.to_string(),
            tmp,
            file: Some(file),
            committed: false,
        })
    }

    /// Removes the least recently used archives until the rest fit in `max_bytes`.
    fn evict(&self) -> io::Result<Vec<PathBuf>> {
        let mut entries = Vec::new();
        for entry in fs::read_dir(&self.dir)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(TEMP_PREFIX) || !name.ends_with(SUFFIX) {
                continue;
            }
            let meta = entry.metadata()?;
            if meta.is_file() {
                let used = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
                entries.push((used, meta.len(), entry.path()));
            }
        }
        entries.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.2.cmp(&b.2)));
        let mut kept = 0u64;
        let mut removed = Vec::new();
        for (_, len, path) in entries {
            if kept.saturating_add(len) <= self.max_bytes {
                kept += len;
            } else {
                fs::remove_file(&path)?;
                removed.push(path);
            }
        }
        Ok(removed)
    }
}

/// An archive being copied into the cache while it is staged.
pub(super) struct CacheWriter<'a> {
    cache: &'a ArchiveCache,
    sha256: String,
    tmp: PathBuf,
    file: Option<File>,
    committed: bool,
}

impl CacheWriter<'_> {
    /// Appends bytes; after a failure the writer stops caching (staging goes on).
    pub fn write(&mut self, bytes: &[u8]) {
        if let Some(f) = self.file.as_mut()
            && let Err(e) = f.write_all(bytes)
        {
            tracing::warn!(path = %self.tmp.display(), error = %e, "not caching the archive");
            self.file = None;
        }
    }

    /// Keeps the verified archive under its hash, then evicts beyond the bound.
    pub fn commit(mut self) -> io::Result<Option<PathBuf>> {
        if self.file.take().is_none() {
            return Ok(None);
        }
        let _guard = self.cache.lock.lock().unwrap_or_else(|p| p.into_inner());
        let path = self.cache.dir.join(format!("{}{SUFFIX}", self.sha256));
        fs::rename(&self.tmp, &path)?;
        self.committed = true;
        self.cache.evict()?;
        Ok(path.exists().then_some(path))
    }
}

impl Drop for CacheWriter<'_> {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}
