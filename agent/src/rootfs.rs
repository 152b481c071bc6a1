//! Root's one way to touch files: through directory handles, never following a link it did not
//! expect (the idea of systemd's `chase()` and cap-std's `Dir`, on rustix's `*at` calls).
//!
//! A path the agent config names (the install root, a unit file's directory, the state dir) is
//! trusted as the admin wrote it; everything below it is reached component by component with
//! `O_NOFOLLOW`, so a link planted anywhere inside an install makes the operation fail instead of
//! redirecting it. Files are written to an exclusive temp file with a random name (`O_CREAT|O_EXCL`:
//! a link or hard link planted at that name is never opened), given their mode on the handle
//! (`fchmod`, masked with [`MODE_MASK`]), synced, and `renameat`ed over the target. Everything root
//! writes is owned by root.
//!
//! Files the Bitbucket user can write (the running install's customizations, its logs) are read with
//! [`Dir::read_as`]: no link on the way, a regular file, and only what that user could read itself.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use rustix::fs::{self as rfs, AtFlags, FileType, Mode, OFlags, RenameFlags, Stat};

/// Bits never given to anything root writes: group/other write, setuid, setgid, sticky.
pub const MODE_MASK: u32 = 0o755;
/// Files read into memory are refused past this size (scripts, manifests, unit files).
pub const MAX_READ_BYTES: u64 = 16 << 20;
/// Attempts at a fresh random temp name before giving up (each collision is a planted file).
const TEMP_ATTEMPTS: usize = 16;

/// Who may have written a file, for [`Dir::read_as`]: the Bitbucket user's ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reader {
    pub uid: u32,
    pub gid: u32,
}

impl Reader {
    /// The agent's own user (an unprivileged agent reads as itself).
    pub fn current() -> Self {
        Reader {
            uid: rustix::process::geteuid().as_raw(),
            gid: rustix::process::getegid().as_raw(),
        }
    }

    /// Whether this user may read a file with this owner and mode (owner, group, other bits).
    pub fn may_read(&self, st: &Stat) -> bool {
        let mode = st.st_mode;
        if st.st_uid == self.uid {
            mode & 0o400 != 0
        } else if st.st_gid == self.gid {
            mode & 0o040 != 0
        } else {
            mode & 0o004 != 0
        }
    }

    /// Whether this user may write a file or directory with this owner and mode.
    pub fn may_write(&self, st: &Stat) -> bool {
        let mode = st.st_mode;
        st.st_uid == self.uid || (st.st_gid == self.gid && mode & 0o020 != 0) || mode & 0o002 != 0
    }
}

/// An open directory; every operation is relative to it. The path is kept for messages only.
#[derive(Debug)]
pub struct Dir {
    fd: OwnedFd,
    path: PathBuf,
}

fn refused(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::PermissionDenied, msg)
}

/// The error `O_NOFOLLOW` gives for a link, said so a person knows what happened.
fn explain_link(e: rustix::io::Errno, path: &Path) -> io::Error {
    if e == rustix::io::Errno::LOOP || e == rustix::io::Errno::NOTDIR {
        refused(format!(
            "{} is a symbolic link (or not a directory where one was expected); bbupgrade never follows links inside an install: replace it with the real file or directory",
            path.display()
        ))
    } else {
        io::Error::from(e)
    }
}

fn is_missing(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::NotFound
}

fn file_type(st: &Stat) -> FileType {
    FileType::from_raw_mode(st.st_mode)
}

/// The components of a relative path without `.`/`..`/root: the only paths walked below a handle.
fn components(rel: &Path) -> io::Result<Vec<&OsStr>> {
    let mut out = Vec::new();
    for c in rel.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "{} is not a plain relative path (no '..', not absolute)",
                        rel.display()
                    ),
                ));
            }
        }
    }
    Ok(out)
}

/// A random temp name beside `name`: `.<name>.bbupgrade-tmp-<16 hex>`.
fn temp_name(name: &OsStr) -> OsString {
    let mut bytes = [0u8; 8];
    // getrandom never fails on Linux >= 3.17 for 8 bytes; a zero suffix still works with O_EXCL.
    let _ = rustix::rand::getrandom(&mut bytes[..], rustix::rand::GetRandomFlags::empty());
    let mut s = OsString::from(".");
    s.push(name);
    s.push(format!(".bbupgrade-tmp-{}", hex::encode(bytes)));
    s
}

impl Dir {
    /// A directory the agent config names: links in that path are the admin's and are followed.
    pub fn open_trusted(path: &Path) -> io::Result<Dir> {
        let fd = rfs::open(
            path,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(Dir {
            fd,
            path: path.to_path_buf(),
        })
    }

    /// [`Dir::open_trusted`], creating the path first (root-owned, `mode`) when it is missing.
    pub fn create_trusted(path: &Path, mode: u32) -> io::Result<Dir> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(mode & MODE_MASK)
            .create(path)?;
        Self::open_trusted(path)
    }

    /// The parent directory of a file the agent config names (trusted) and the file's name.
    pub fn open_parent_trusted(path: &Path) -> io::Result<(Dir, OsString)> {
        let name = path.file_name().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} names no file", path.display()),
            )
        })?;
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        Ok((Self::open_trusted(parent)?, name.to_os_string()))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// `fstat` of the directory itself.
    pub fn stat(&self) -> io::Result<Stat> {
        Ok(rfs::fstat(&self.fd)?)
    }

    fn child_path(&self, rel: impl AsRef<Path>) -> PathBuf {
        self.path.join(rel)
    }

    /// Opens one component below this directory, not following a link.
    fn open_child_dir(&self, name: &OsStr) -> io::Result<Dir> {
        let path = self.child_path(name);
        let fd = rfs::openat(
            &self.fd,
            name,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| explain_link(e, &path))?;
        Ok(Dir { fd, path })
    }

    /// Opens the directory `rel` below this one without following any link on the way.
    pub fn open_dir(&self, rel: &Path) -> io::Result<Dir> {
        let mut cur = self.try_clone()?;
        for c in components(rel)? {
            cur = cur.open_child_dir(c)?;
        }
        Ok(cur)
    }

    /// Like [`Dir::open_dir`], creating missing directories (root-owned, `mode` masked).
    pub fn create_dir_all(&self, rel: &Path, mode: u32) -> io::Result<Dir> {
        let mut cur = self.try_clone()?;
        for c in components(rel)? {
            match rfs::mkdirat(&cur.fd, c, Mode::from_raw_mode(mode & MODE_MASK)) {
                Ok(()) | Err(rustix::io::Errno::EXIST) => {}
                Err(e) => return Err(e.into()),
            }
            cur = cur.open_child_dir(c)?;
        }
        Ok(cur)
    }

    /// Creates the directory `name` here (it must not exist) and opens it.
    pub fn mkdir(&self, name: &OsStr, mode: u32) -> io::Result<Dir> {
        rfs::mkdirat(&self.fd, name, Mode::from_raw_mode(mode))?;
        self.open_child_dir(name)
    }

    fn try_clone(&self) -> io::Result<Dir> {
        Ok(Dir {
            fd: self.fd.try_clone()?,
            path: self.path.clone(),
        })
    }

    /// The directory holding `rel` (reached without links) and `rel`'s last component.
    pub fn parent_of(&self, rel: &Path) -> io::Result<(Dir, OsString)> {
        let comps = components(rel)?;
        let Some((name, dirs)) = comps.split_last() else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "an empty path names no file",
            ));
        };
        let mut cur = self.try_clone()?;
        for c in dirs {
            cur = cur.open_child_dir(c)?;
        }
        Ok((cur, name.to_os_string()))
    }

    /// `lstat` of `rel` (no link followed anywhere); `None` when it does not exist.
    pub fn lstat(&self, rel: &Path) -> io::Result<Option<Stat>> {
        let (dir, name) = match self.parent_of(rel) {
            Ok(p) => p,
            Err(e) if is_missing(&e) => return Ok(None),
            Err(e) => return Err(e),
        };
        match rfs::statat(&dir.fd, &name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => Ok(Some(st)),
            Err(rustix::io::Errno::NOENT) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Opens the regular file `rel` for reading without following a link; `None` when missing.
    pub fn open_file(&self, rel: &Path) -> io::Result<Option<(File, Stat)>> {
        let (dir, name) = match self.parent_of(rel) {
            Ok(p) => p,
            Err(e) if is_missing(&e) => return Ok(None),
            Err(e) => return Err(e),
        };
        let path = self.child_path(rel);
        // O_NONBLOCK: a FIFO planted there must not hang the agent; it is refused below.
        let fd = match rfs::openat(
            &dir.fd,
            &name,
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK,
            Mode::empty(),
        ) {
            Ok(fd) => fd,
            Err(rustix::io::Errno::NOENT) => return Ok(None),
            Err(e) => return Err(explain_link(e, &path)),
        };
        let st = rfs::fstat(&fd)?;
        if file_type(&st) != FileType::RegularFile {
            return Err(refused(format!(
                "{} is not a regular file; refusing to read it",
                path.display()
            )));
        }
        let flags = rfs::fcntl_getfl(&fd)?;
        rfs::fcntl_setfl(&fd, flags - OFlags::NONBLOCK)?;
        Ok(Some((File::from(fd), st)))
    }

    /// Reads the regular file `rel` (no links, at most [`MAX_READ_BYTES`]); `None` when missing.
    pub fn read(&self, rel: &Path) -> io::Result<Option<Vec<u8>>> {
        match self.open_file(rel)? {
            None => Ok(None),
            Some((f, st)) => read_bounded(f, &st, &self.child_path(rel)).map(Some),
        }
    }

    /// Reads a file another user can write: no links anywhere below this directory, a regular
    /// file, and only when `reader` could read it itself (so root never reads a secret for it,
    /// whatever was linked or placed there).
    pub fn read_as(&self, rel: &Path, reader: &Reader) -> io::Result<Option<Vec<u8>>> {
        let Some((f, st)) = self.open_file(rel)? else {
            return Ok(None);
        };
        let path = self.child_path(rel);
        if st.st_uid != 0 && st.st_uid != reader.uid {
            return Err(refused(format!(
                "{} is owned by uid {}, neither root nor the Bitbucket user; refusing to read it",
                path.display(),
                st.st_uid
            )));
        }
        if !reader.may_read(&st) {
            return Err(refused(format!(
                "{} is not readable by the Bitbucket user (uid {}); refusing to read it as root for that user",
                path.display(),
                reader.uid
            )));
        }
        read_bounded(f, &st, &path).map(Some)
    }

    /// Creates `name` here exclusively (never opening anything already there), mode 0600.
    pub fn create_new(&self, name: &OsStr) -> io::Result<File> {
        let fd = rfs::openat(
            &self.fd,
            name,
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )?;
        Ok(File::from(fd))
    }

    /// A new temp file beside `name` under a random name; returns it and its name.
    fn create_temp(&self, name: &OsStr) -> io::Result<(File, OsString)> {
        let mut last = None;
        for _ in 0..TEMP_ATTEMPTS {
            let tmp = temp_name(name);
            match self.create_new(&tmp) {
                Ok(f) => return Ok((f, tmp)),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| io::Error::other("no temp name was free")))
    }

    /// Refuses a link or non-regular file at `name` (a definition or script is replaced only
    /// when it is a plain file); `None` when missing.
    fn existing_regular(&self, name: &OsStr) -> io::Result<Option<Stat>> {
        match rfs::statat(&self.fd, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) if file_type(&st) == FileType::RegularFile => Ok(Some(st)),
            Ok(st) => Err(refused(format!(
                "{} is {}; bbupgrade replaces only regular files: replace it with the real file",
                self.child_path(name).display(),
                if file_type(&st) == FileType::Symlink {
                    "a symbolic link"
                } else {
                    "not a regular file"
                }
            ))),
            Err(rustix::io::Errno::NOENT) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Writes `bytes` to `name` in this directory atomically: an exclusive temp file with a random
    /// name, `fchmod(mode & MODE_MASK)` on its handle, fsync, `renameat` over `name`, fsync of the
    /// directory. Owned by the agent's user (root). A link at `name` is refused, not followed.
    pub fn write_atomic(&self, name: &OsStr, bytes: &[u8], mode: u32) -> io::Result<()> {
        if components(Path::new(name))?.len() != 1 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is not a file name", Path::new(name).display()),
            ));
        }
        self.existing_regular(name)?;
        let (mut file, tmp) = self.create_temp(name)?;
        let written = (|| {
            file.write_all(bytes)?;
            rfs::fchmod(&file, Mode::from_raw_mode(mode & MODE_MASK))?;
            file.sync_all()?;
            rfs::renameat(&self.fd, &tmp, &self.fd, name)?;
            io::Result::Ok(())
        })();
        if let Err(e) = written {
            let _ = rfs::unlinkat(&self.fd, &tmp, AtFlags::empty());
            return Err(e);
        }
        let _ = rfs::fsync(&self.fd);
        Ok(())
    }

    /// [`Dir::write_atomic`] at `rel` below this directory (parents reached without links).
    pub fn write_atomic_at(&self, rel: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
        let (dir, name) = self.parent_of(rel)?;
        dir.write_atomic(&name, bytes, mode)
    }

    /// Points the symlink `name` at `target` atomically: a new link under a random name, then
    /// `renameat` over `name` (which must be missing or a link).
    pub fn replace_symlink(&self, name: &OsStr, target: &Path) -> io::Result<()> {
        let mut last = None;
        for _ in 0..TEMP_ATTEMPTS {
            let tmp = temp_name(name);
            match rfs::symlinkat(target, &self.fd, &tmp) {
                Ok(()) => {
                    return rfs::renameat(&self.fd, &tmp, &self.fd, name).map_err(|e| {
                        let _ = rfs::unlinkat(&self.fd, &tmp, AtFlags::empty());
                        e.into()
                    });
                }
                Err(rustix::io::Errno::EXIST) => last = Some(rustix::io::Errno::EXIST),
                Err(e) => return Err(e.into()),
            }
        }
        Err(last.unwrap_or(rustix::io::Errno::EXIST).into())
    }

    /// `readlinkat` of `name` here, `None` when it is missing or not a link.
    pub fn read_link(&self, name: &OsStr) -> io::Result<Option<PathBuf>> {
        match rfs::statat(&self.fd, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) if file_type(&st) == FileType::Symlink => {
                let t = rfs::readlinkat(&self.fd, name, Vec::new())?;
                Ok(Some(PathBuf::from(OsStr::from_bytes(t.as_bytes()))))
            }
            Ok(_) | Err(rustix::io::Errno::NOENT) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Renames `from` here to `to` in `to_dir`, failing with `AlreadyExists` rather than replacing
    /// anything at `to`.
    pub fn rename_no_replace(&self, from: &OsStr, to_dir: &Dir, to: &OsStr) -> io::Result<()> {
        match rfs::renameat_with(&self.fd, from, &to_dir.fd, to, RenameFlags::NOREPLACE) {
            Ok(()) => Ok(()),
            // Filesystems without RENAME_NOREPLACE: a plain rename still refuses a non-empty
            // directory at the target, and we look first.
            Err(rustix::io::Errno::INVAL) => {
                if rfs::statat(&to_dir.fd, to, AtFlags::SYMLINK_NOFOLLOW).is_ok() {
                    return Err(io::ErrorKind::AlreadyExists.into());
                }
                Ok(rfs::renameat(&self.fd, from, &to_dir.fd, to)?)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Removes `name` here and everything under it, never following a link (links are unlinked).
    pub fn remove_tree(&self, name: &OsStr) -> io::Result<()> {
        let st = match rfs::statat(&self.fd, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(rustix::io::Errno::NOENT) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        if file_type(&st) != FileType::Directory {
            return Ok(rfs::unlinkat(&self.fd, name, AtFlags::empty())?);
        }
        let sub = self.open_child_dir(name)?;
        // An unprivileged agent needs write and search permission on what it empties.
        let _ = rfs::fchmod(&sub.fd, Mode::from_raw_mode(0o700));
        sub.empty()?;
        Ok(rfs::unlinkat(&self.fd, name, AtFlags::REMOVEDIR)?)
    }

    /// The names in this directory (without `.` and `..`).
    pub fn entries(&self) -> io::Result<Vec<OsString>> {
        let mut names = Vec::new();
        for entry in rfs::Dir::read_from(&self.fd)? {
            let entry = entry?;
            let n = entry.file_name().to_bytes();
            if n != b"." && n != b".." {
                names.push(OsStr::from_bytes(n).to_os_string());
            }
        }
        Ok(names)
    }

    fn empty(&self) -> io::Result<()> {
        for name in self.entries()? {
            self.remove_tree(&name)?;
        }
        Ok(())
    }
}

fn read_bounded(f: File, st: &Stat, path: &Path) -> io::Result<Vec<u8>> {
    if st.st_size as u64 > MAX_READ_BYTES {
        return Err(refused(format!(
            "{} is larger than {MAX_READ_BYTES} bytes; refusing to read it",
            path.display()
        )));
    }
    let mut out = Vec::with_capacity(st.st_size as usize);
    f.take(MAX_READ_BYTES + 1).read_to_end(&mut out)?;
    if out.len() as u64 > MAX_READ_BYTES {
        return Err(refused(format!(
            "{} grew past {MAX_READ_BYTES} bytes while read; refusing it",
            path.display()
        )));
    }
    Ok(out)
}

/// Reads a file the agent config names (unit file, init script, backup) without following a link
/// at its last component; `None` when missing.
pub fn read_config_file(path: &Path) -> io::Result<Option<Vec<u8>>> {
    let (dir, name) = Dir::open_parent_trusted(path)?;
    dir.read(Path::new(&name))
}

/// Writes a file the agent config names (its directory trusted) through [`Dir::write_atomic`].
pub fn write_config_file(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let (dir, name) = Dir::open_parent_trusted(path)?;
    dir.write_atomic(&name, bytes, mode)
}

/// Opens an install (`<root>/<name>`; the root is the config's, the install itself is reached
/// without following a link).
pub fn open_install(install: &Path) -> io::Result<Dir> {
    let (root, name) = Dir::open_parent_trusted(install)?;
    root.open_child_dir(&name)
}

#[cfg(test)]
mod tests;
