//! Deciding whether one tar entry may be staged: pure checks over a header's plain data and over the
//! tree extracted so far, so every refusal is tested without touching a disk.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use super::StageError;

/// What a tar header says an entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    File,
    Dir,
    Symlink,
    Hardlink,
    CharDevice,
    BlockDevice,
    Fifo,
    /// GNU sparse files: their holes are made up by the reader, never counted, so refused.
    Sparse,
    /// A pax global header (e.g. `git archive`'s comment): carries no file.
    PaxGlobal,
    Other(u8),
}

impl EntryKind {
    pub fn from_tar(kind: tar::EntryType) -> Self {
        use tar::EntryType as T;
        match kind {
            T::Regular | T::Continuous => Self::File,
            T::Directory => Self::Dir,
            T::Symlink => Self::Symlink,
            T::Link => Self::Hardlink,
            T::Char => Self::CharDevice,
            T::Block => Self::BlockDevice,
            T::Fifo => Self::Fifo,
            T::GNUSparse => Self::Sparse,
            T::XGlobalHeader => Self::PaxGlobal,
            other => Self::Other(other.as_byte()),
        }
    }

    fn special_name(self) -> Option<String> {
        match self {
            Self::CharDevice => Some("character device".into()),
            Self::BlockDevice => Some("block device".into()),
            Self::Fifo => Some("FIFO".into()),
            Self::Sparse => Some("GNU sparse file".into()),
            Self::Other(b) => Some(format!("entry of unknown type {:?}", b as char)),
            _ => None,
        }
    }
}

/// The parts of a tar header the rules look at.
#[derive(Debug, Clone, Copy)]
pub struct EntryHeader<'a> {
    pub path: &'a [u8],
    pub kind: EntryKind,
    pub mode: u32,
    pub link: Option<&'a [u8]>,
}

/// An entry that passed [`check_entry`], with the top folder stripped (`rel` is relative to the install).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SafeEntry {
    /// Carries nothing to write (pax global header).
    Skip,
    /// The top folder itself: its mode becomes the install's.
    Root {
        mode: u32,
    },
    Dir {
        rel: PathBuf,
        mode: u32,
    },
    File {
        rel: PathBuf,
        mode: u32,
    },
    Symlink {
        rel: PathBuf,
        target: PathBuf,
    },
    /// `target` is relative to the install, like `rel`.
    Hardlink {
        rel: PathBuf,
        target: PathBuf,
    },
}

/// Bits that make an extracted file run with someone else's rights or change deletion rules.
const SPECIAL_MODE_BITS: u32 = 0o7000;
/// What is left of a mode once the special bits are refused.
pub const PERMISSION_BITS: u32 = 0o777;

/// Checks one entry's path, kind, mode and link target, and strips `top` (the expected top folder).
pub fn check_entry(h: &EntryHeader<'_>, top: &str) -> Result<SafeEntry, StageError> {
    let entry = lossy(h.path);
    if h.kind == EntryKind::PaxGlobal {
        return Ok(SafeEntry::Skip);
    }
    let parts = split_archive_path(h.path).map_err(|bad| match bad {
        BadPath::Absolute => StageError::AbsolutePath {
            entry: entry.clone(),
        },
        BadPath::Parent => StageError::ParentComponent {
            entry: entry.clone(),
        },
    })?;
    if let Some(kind) = h.kind.special_name() {
        return Err(StageError::SpecialFile { entry, kind });
    }
    if h.mode & SPECIAL_MODE_BITS != 0 {
        return Err(StageError::SetuidBit {
            entry,
            mode: h.mode,
        });
    }
    let rel = strip_top(&parts, top).ok_or_else(|| StageError::WrongTopFolder {
        expected: format!("{top}/"),
        found: entry.clone(),
    })?;
    let mode = h.mode & PERMISSION_BITS;
    if rel.as_os_str().is_empty() {
        return match h.kind {
            EntryKind::Dir => Ok(SafeEntry::Root { mode }),
            _ => Err(StageError::WrongTopFolder {
                expected: format!("{top}/"),
                found: format!("{entry} (not a directory)"),
            }),
        };
    }
    match h.kind {
        EntryKind::Dir => Ok(SafeEntry::Dir { rel, mode }),
        EntryKind::File => Ok(SafeEntry::File { rel, mode }),
        EntryKind::Symlink => {
            let target = h.link.unwrap_or_default();
            check_symlink_target(&rel, target).map_err(|reason| StageError::LinkEscapes {
                entry: entry.clone(),
                target: lossy(target),
                reason,
            })?;
            Ok(SafeEntry::Symlink {
                rel,
                target: PathBuf::from(OsStr::from_bytes(target)),
            })
        }
        EntryKind::Hardlink => {
            let raw = h.link.unwrap_or_default();
            let escapes = |reason| StageError::LinkEscapes {
                entry: entry.clone(),
                target: lossy(raw),
                reason,
            };
            let parts = split_archive_path(raw).map_err(|bad| {
                escapes(match bad {
                    BadPath::Absolute => "is a hard link to an absolute path",
                    BadPath::Parent => "is a hard link through '..'",
                })
            })?;
            let target = strip_top(&parts, top)
                .ok_or_else(|| escapes("is a hard link to a path outside the top folder"))?;
            if target.as_os_str().is_empty() {
                return Err(escapes("is a hard link to the top folder"));
            }
            Ok(SafeEntry::Hardlink { rel, target })
        }
        // Special kinds returned above.
        _ => Err(StageError::SpecialFile {
            entry,
            kind: format!("{:?}", h.kind),
        }),
    }
}

enum BadPath {
    Absolute,
    Parent,
}

/// Splits an archive path on `/`, dropping empty and `.` components.
fn split_archive_path(path: &[u8]) -> Result<Vec<&[u8]>, BadPath> {
    if path.first() == Some(&b'/') {
        return Err(BadPath::Absolute);
    }
    let mut parts = Vec::new();
    for part in path.split(|b| *b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => return Err(BadPath::Parent),
            _ => parts.push(part),
        }
    }
    Ok(parts)
}

fn strip_top(parts: &[&[u8]], top: &str) -> Option<PathBuf> {
    let (first, rest) = parts.split_first()?;
    if *first != top.as_bytes() {
        return None;
    }
    Some(rest.iter().map(|p| OsStr::from_bytes(p)).collect())
}

/// A symlink target is safe when it is relative and only *leading* `..` components climb, no higher
/// than the install. A `..` after a name is refused: if that name is itself a link, the climb happens
/// from wherever the link points, which a lexical check cannot see.
fn check_symlink_target(rel: &Path, target: &[u8]) -> Result<(), &'static str> {
    if target.is_empty() {
        return Err("has an empty target");
    }
    if target.first() == Some(&b'/') {
        return Err("points to an absolute path");
    }
    // The link's own directory, counted in components below the install.
    let depth = rel.components().count().saturating_sub(1);
    let mut climbs = 0usize;
    let mut named = false;
    for part in target.split(|b| *b == b'/') {
        match part {
            b"" | b"." => {}
            b".." if named => return Err("has a '..' after a name, which may leave the install"),
            b".." => climbs += 1,
            _ => named = true,
        }
    }
    if climbs > depth {
        return Err("points outside the install");
    }
    Ok(())
}

pub fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Node {
    Dir,
    File,
    Symlink,
}

/// What is already in the staging tree, so an entry never writes through a link or a file, never
/// replaces anything, and a hard link only names a regular file extracted before it.
#[derive(Debug, Default)]
pub struct Tree {
    nodes: HashMap<PathBuf, Node>,
}

/// What the extractor must do for an admitted entry.
#[derive(Debug, PartialEq, Eq)]
pub struct Admitted {
    /// Parent directories the archive did not list, to create first (outermost first).
    pub missing_parents: Vec<PathBuf>,
    /// A directory entry for a directory that already exists (only its mode and time apply).
    pub exists: bool,
}

impl Tree {
    pub fn admit(&mut self, e: &SafeEntry, entry: &str) -> Result<Admitted, StageError> {
        let (rel, node) = match e {
            SafeEntry::Skip | SafeEntry::Root { .. } => {
                return Ok(Admitted {
                    missing_parents: Vec::new(),
                    exists: false,
                });
            }
            SafeEntry::Dir { rel, .. } => (rel, Node::Dir),
            SafeEntry::File { rel, .. } => (rel, Node::File),
            SafeEntry::Symlink { rel, .. } => (rel, Node::Symlink),
            SafeEntry::Hardlink { rel, target } => {
                if self.nodes.get(target) != Some(&Node::File) {
                    return Err(StageError::LinkTargetMissing {
                        entry: entry.to_string(),
                        target: target.display().to_string(),
                    });
                }
                (rel, Node::File)
            }
        };
        let conflict = |reason: String| StageError::PathConflict {
            entry: entry.to_string(),
            reason,
        };
        let mut missing_parents = Vec::new();
        for parent in rel.ancestors().skip(1) {
            if parent.as_os_str().is_empty() {
                break;
            }
            match self.nodes.get(parent) {
                Some(Node::Dir) => break,
                Some(Node::Symlink) => {
                    return Err(conflict(format!(
                        "lies under the symlink '{}'; writing through a link is refused",
                        parent.display()
                    )));
                }
                Some(Node::File) => {
                    return Err(conflict(format!(
                        "lies under '{}', which is a file",
                        parent.display()
                    )));
                }
                None => missing_parents.push(parent.to_path_buf()),
            }
        }
        let exists = match self.nodes.get(rel) {
            None => false,
            Some(Node::Dir) if node == Node::Dir => true,
            Some(_) => return Err(conflict("appears twice in the archive".into())),
        };
        missing_parents.reverse();
        for p in &missing_parents {
            self.nodes.insert(p.clone(), Node::Dir);
        }
        self.nodes.insert(rel.clone(), node);
        Ok(Admitted {
            missing_parents,
            exists,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOP: &str = "atlassian-bitbucket-8.19.6";

    fn h<'a>(path: &'a str, kind: EntryKind, mode: u32, link: Option<&'a str>) -> EntryHeader<'a> {
        EntryHeader {
            path: path.as_bytes(),
            kind,
            mode,
            link: link.map(str::as_bytes),
        }
    }

    fn file(path: &str) -> Result<SafeEntry, StageError> {
        check_entry(&h(path, EntryKind::File, 0o644, None), TOP)
    }

    fn symlink(path: &str, target: &str) -> Result<SafeEntry, StageError> {
        check_entry(&h(path, EntryKind::Symlink, 0o777, Some(target)), TOP)
    }

    fn hardlink(path: &str, target: &str) -> Result<SafeEntry, StageError> {
        check_entry(&h(path, EntryKind::Hardlink, 0o644, Some(target)), TOP)
    }

    #[test]
    fn strips_the_top_folder_and_normalizes_dots() {
        let want = SafeEntry::File {
            rel: "bin/start-bitbucket.sh".into(),
            mode: 0o644,
        };
        assert_eq!(
            file(&format!("{TOP}/bin/start-bitbucket.sh")).ok(),
            Some(want.clone())
        );
        assert_eq!(
            file(&format!("./{TOP}//bin/./start-bitbucket.sh")).ok(),
            Some(want)
        );
        let root = check_entry(&h(&format!("{TOP}/"), EntryKind::Dir, 0o755, None), TOP);
        assert_eq!(root.ok(), Some(SafeEntry::Root { mode: 0o755 }));
        let dir = check_entry(&h(&format!("{TOP}/bin/"), EntryKind::Dir, 0o750, None), TOP);
        assert_eq!(
            dir.ok(),
            Some(SafeEntry::Dir {
                rel: "bin".into(),
                mode: 0o750
            })
        );
    }

    #[test]
    fn refuses_absolute_paths_and_parent_components() {
        assert!(
            matches!(file("/etc/passwd"), Err(StageError::AbsolutePath { entry }) if entry == "/etc/passwd")
        );
        for p in [
            format!("{TOP}/../evil"),
            "../x".into(),
            format!("{TOP}/a/../../b"),
        ] {
            assert!(
                matches!(file(&p), Err(StageError::ParentComponent { entry }) if entry == p),
                "{p}"
            );
        }
    }

    #[test]
    fn refuses_wrong_top_folder() {
        for p in [
            "atlassian-bitbucket-8.19.5/bin/x",
            "other",
            "atlassian-bitbucket-8.19.6x/a",
        ] {
            match file(p) {
                Err(StageError::WrongTopFolder { expected, found }) => {
                    assert_eq!(expected, format!("{TOP}/"));
                    assert_eq!(found, p);
                }
                other => panic!("{p}: {other:?}"),
            }
        }
        assert!(matches!(file(TOP), Err(StageError::WrongTopFolder { .. })));
    }

    #[test]
    fn refuses_special_files_and_special_mode_bits() {
        for kind in [
            EntryKind::CharDevice,
            EntryKind::BlockDevice,
            EntryKind::Fifo,
            EntryKind::Sparse,
            EntryKind::Other(b'Z'),
        ] {
            let r = check_entry(&h(&format!("{TOP}/dev"), kind, 0o644, None), TOP);
            assert!(
                matches!(r, Err(StageError::SpecialFile { ref entry, .. }) if entry.ends_with("/dev")),
                "{kind:?}"
            );
        }
        for mode in [0o4755, 0o2755, 0o1777] {
            let r = check_entry(
                &h(&format!("{TOP}/bin/x"), EntryKind::File, mode, None),
                TOP,
            );
            assert!(matches!(r, Err(StageError::SetuidBit { mode: m, .. }) if m == mode));
        }
        let g = check_entry(&h("pax_global_header", EntryKind::PaxGlobal, 0, None), TOP);
        assert_eq!(g.ok(), Some(SafeEntry::Skip));
    }

    #[test]
    fn symlink_targets() {
        let ok = [
            ("lib/a.jar", "b.jar"),
            ("lib/a.jar", "../app/b.jar"),
            ("lib/sub/a", "../../x"),
            ("current", "."),
            ("lib/a", "./b/c"),
        ];
        for (p, t) in ok {
            assert!(symlink(&format!("{TOP}/{p}"), t).is_ok(), "{p} -> {t}");
        }
        let bad = [
            ("lib/a", "/etc/passwd", "absolute"),
            ("lib/a", "../../x", "outside"),
            ("a", "..", "outside"),
            ("lib/a", "b/../../x", "after a name"),
            ("lib/a", "b/..", "after a name"),
            ("lib/a", "", "empty"),
        ];
        for (p, t, why) in bad {
            match symlink(&format!("{TOP}/{p}"), t) {
                Err(e @ StageError::LinkEscapes { .. }) => {
                    let msg = e.to_string();
                    assert!(msg.contains(why) && msg.contains(p), "{msg}");
                }
                other => panic!("{p} -> {t}: {other:?}"),
            }
        }
    }

    #[test]
    fn hardlink_targets() {
        assert_eq!(
            hardlink(&format!("{TOP}/lib/b"), &format!("{TOP}/lib/a")).ok(),
            Some(SafeEntry::Hardlink {
                rel: "lib/b".into(),
                target: "lib/a".into()
            })
        );
        for t in ["/etc/shadow", "../x", "atlassian-bitbucket-1.0.0/a", TOP] {
            assert!(
                matches!(
                    hardlink(&format!("{TOP}/b"), t),
                    Err(StageError::LinkEscapes { .. })
                ),
                "{t}"
            );
        }
    }

    #[test]
    fn tree_refuses_conflicts_and_dangling_hardlinks() {
        let mut tree = Tree::default();
        let f = SafeEntry::File {
            rel: "lib/a/x.jar".into(),
            mode: 0o644,
        };
        let adm = tree.admit(&f, "e").ok();
        assert_eq!(
            adm.map(|a| a.missing_parents),
            Some(vec!["lib".into(), "lib/a".into()])
        );
        // Duplicates are refused; a directory listed again is fine.
        assert!(matches!(
            tree.admit(&f, "e"),
            Err(StageError::PathConflict { .. })
        ));
        let d = SafeEntry::Dir {
            rel: "lib".into(),
            mode: 0o755,
        };
        assert_eq!(tree.admit(&d, "e").ok().map(|a| a.exists), Some(true));
        // Nothing under a file or a symlink.
        let under_file = SafeEntry::File {
            rel: "lib/a/x.jar/y".into(),
            mode: 0o644,
        };
        assert!(matches!(
            tree.admit(&under_file, "e"),
            Err(StageError::PathConflict { .. })
        ));
        let link = SafeEntry::Symlink {
            rel: "l".into(),
            target: "lib".into(),
        };
        assert!(tree.admit(&link, "e").is_ok());
        let through = SafeEntry::File {
            rel: "l/z".into(),
            mode: 0o644,
        };
        let err = tree
            .admit(&through, "e")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("symlink 'l'"), "{err}");
        // Hard links only to regular files seen before.
        let hl = |t: &str| SafeEntry::Hardlink {
            rel: "h".into(),
            target: t.into(),
        };
        for t in ["missing", "lib", "l"] {
            assert!(
                matches!(
                    tree.admit(&hl(t), "h"),
                    Err(StageError::LinkTargetMissing { .. })
                ),
                "{t}"
            );
        }
        assert!(tree.admit(&hl("lib/a/x.jar"), "h").is_ok());
    }
}
