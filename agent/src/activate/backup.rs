//! Backups of the service definition, kept in the agent's state directory, never beside the
//! definition: a copy of an init.d script in `/etc/init.d` is a second service to `insserv` and
//! `service --status-all` (same LSB `Provides:`), and a copy among units is one more file systemd
//! looks at.
//!
//! Layout: `<state_dir>/service-backups/<old install dir name>/<definition file name>`, e.g.
//! `/var/lib/bbupgrade/service-backups/8.19.3/atlbitbucket`, root's, mode 0600 (never executable).
//! Rollback to an install reads the backup named by that install. Agents before this layout wrote
//! `<definition>.bbupgrade-backup-<version>` beside the definition; [`Backups::migrate_legacy`]
//! moves those in (at agent start, and again before every activate and restore).

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use super::ActivateError;
use crate::rootfs::Dir;

/// The folder of the state directory that holds the backups.
pub const BACKUPS_DIR: &str = "service-backups";
/// Only root reads a backup; it is never run from where it is.
const BACKUP_MODE: u32 = 0o600;
const BACKUPS_DIR_MODE: u32 = 0o700;
/// What agents before the state-dir layout appended to the definition's name.
const LEGACY_SUFFIX: &str = ".bbupgrade-backup-";
/// A legacy backup that differs from the one already in the state dir is kept under this suffix.
const LEGACY_KEPT_SUFFIX: &str = ".legacy-backup";

/// One backup, as `status` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupEntry {
    /// The install directory name (the version) the backed-up definition pointed at.
    pub version: String,
    pub path: PathBuf,
}

/// The backups folder of one agent.
#[derive(Debug, Clone)]
pub struct Backups {
    root: PathBuf,
}

fn io_err<'a>(
    file: &'a Path,
    action: &'static str,
) -> impl FnOnce(io::Error) -> ActivateError + 'a {
    move |source| ActivateError::Io {
        file: file.to_path_buf(),
        action,
        source,
    }
}

/// The name of the backup's folder: the old install's directory name (its version).
fn version_name(old_install: &Path) -> OsString {
    old_install
        .file_name()
        .map_or_else(|| OsString::from("previous"), OsStr::to_os_string)
}

fn file_name(definition: &Path) -> Result<&OsStr, ActivateError> {
    definition.file_name().ok_or_else(|| ActivateError::Io {
        file: definition.to_path_buf(),
        action: "name the backup of",
        source: io::Error::new(io::ErrorKind::InvalidInput, "the path names no file"),
    })
}

impl Backups {
    pub fn in_state_dir(state_dir: &Path) -> Self {
        Backups {
            root: state_dir.join(BACKUPS_DIR),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the definition as it pointed at `old_install` is kept.
    pub fn path(&self, definition: &Path, old_install: &Path) -> Result<PathBuf, ActivateError> {
        Ok(self
            .root
            .join(version_name(old_install))
            .join(file_name(definition)?))
    }

    fn open_root(&self) -> io::Result<Option<Dir>> {
        match Dir::open_trusted(&self.root) {
            Ok(d) => Ok(Some(d)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn relative(definition: &Path, version: &OsStr) -> Result<PathBuf, ActivateError> {
        Ok(Path::new(version).join(file_name(definition)?))
    }

    /// The saved definition for `old_install`; `None` when there is none.
    pub fn read(
        &self,
        definition: &Path,
        old_install: &Path,
    ) -> Result<Option<Vec<u8>>, ActivateError> {
        let path = self.path(definition, old_install)?;
        let rel = Self::relative(definition, &version_name(old_install))?;
        let read = || -> io::Result<Option<Vec<u8>>> {
            match self.open_root()? {
                Some(dir) => dir.read(&rel),
                None => Ok(None),
            }
        };
        read().map_err(io_err(&path, "read"))
    }

    /// Saves `bytes` as the definition for `old_install` unless a backup is already there (a
    /// re-run after the definition was edited must not overwrite it); true when it wrote.
    pub fn save_once(
        &self,
        definition: &Path,
        old_install: &Path,
        bytes: &[u8],
    ) -> Result<bool, ActivateError> {
        self.save_at(definition, &version_name(old_install), bytes, false)
    }

    fn save_at(
        &self,
        definition: &Path,
        version: &OsStr,
        bytes: &[u8],
        legacy_copy: bool,
    ) -> Result<bool, ActivateError> {
        let mut name = file_name(definition)?.to_os_string();
        if legacy_copy {
            name.push(LEGACY_KEPT_SUFFIX);
        }
        let path = self.root.join(version).join(&name);
        let save = || -> io::Result<bool> {
            let root = Dir::create_trusted(&self.root, BACKUPS_DIR_MODE)?;
            let dir = root.create_dir_all(Path::new(version), BACKUPS_DIR_MODE)?;
            if dir.lstat(Path::new(&name))?.is_some() {
                return Ok(false);
            }
            dir.write_atomic(&name, bytes, BACKUP_MODE)?;
            Ok(true)
        };
        save().map_err(io_err(&path, "write the backup"))
    }

    /// Every backup kept, by version then name (for `status`). Unreadable entries are skipped:
    /// this is a report, and the agent alone writes there.
    pub fn list(&self) -> Vec<BackupEntry> {
        let Ok(Some(root)) = self.open_root() else {
            return Vec::new();
        };
        let mut out = Vec::new();
        let mut versions = root.entries().unwrap_or_default();
        versions.sort();
        for version in versions {
            let Ok(dir) = root.open_dir(Path::new(&version)) else {
                continue;
            };
            let mut names = dir.entries().unwrap_or_default();
            names.sort();
            for name in names {
                let regular = dir
                    .lstat(Path::new(&name))
                    .ok()
                    .flatten()
                    .is_some_and(|st| {
                        rustix::fs::FileType::from_raw_mode(st.st_mode)
                            == rustix::fs::FileType::RegularFile
                    });
                // Temp files of an interrupted write start with a dot.
                if regular && !name.as_bytes().starts_with(b".") {
                    out.push(BackupEntry {
                        version: version.to_string_lossy().into_owned(),
                        path: self.root.join(&version).join(&name),
                    });
                }
            }
        }
        out
    }

    /// Moves backups an older agent wrote beside `definition` (`<name>.bbupgrade-backup-<version>`)
    /// into the state dir and removes them from there. One that differs from a backup already in
    /// the state dir is kept as `<version>/<name>.legacy-backup` (nothing is lost). Returns what was
    /// done, for the operator.
    pub fn migrate_legacy(&self, definition: &Path) -> Result<Vec<String>, ActivateError> {
        let name = file_name(definition)?;
        let mut prefix = name.as_bytes().to_vec();
        prefix.extend_from_slice(LEGACY_SUFFIX.as_bytes());
        let parent = definition.parent().unwrap_or(Path::new("."));
        let dir = match Dir::open_parent_trusted(definition) {
            Ok((dir, _)) => dir,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err(parent, "open")(e)),
        };
        let mut notes = Vec::new();
        let mut entries = dir.entries().map_err(io_err(parent, "list"))?;
        entries.sort();
        for entry in entries {
            let Some(version) = entry.as_bytes().strip_prefix(prefix.as_slice()) else {
                continue;
            };
            let version = OsStr::from_bytes(version);
            let legacy = parent.join(&entry);
            if version.is_empty() || Path::new(version).components().count() != 1 {
                continue;
            }
            // Read without following a link; a link or a non-file there is refused, not moved.
            let Some(bytes) = dir
                .read(Path::new(&entry))
                .map_err(io_err(&legacy, "read"))?
            else {
                continue;
            };
            let rel = Self::relative(definition, version)?;
            let existing = self
                .open_root()
                .and_then(|r| match r {
                    Some(r) => r.read(&rel),
                    None => Ok(None),
                })
                .map_err(io_err(&legacy, "compare"))?;
            let kept = match existing {
                None => {
                    self.save_at(definition, version, &bytes, false)?;
                    self.root.join(version).join(name)
                }
                Some(same) if same == bytes => self.root.join(version).join(name),
                Some(_) => {
                    self.save_at(definition, version, &bytes, true)?;
                    let mut n = name.to_os_string();
                    n.push(LEGACY_KEPT_SUFFIX);
                    self.root.join(version).join(n)
                }
            };
            dir.remove_tree(&entry)
                .map_err(io_err(&legacy, "remove the old-style backup"))?;
            notes.push(format!(
                "moved the backup {} to {} (backups are kept in the agent's state directory, not where the service manager looks)",
                legacy.display(),
                kept.display()
            ));
        }
        Ok(notes)
    }
}
