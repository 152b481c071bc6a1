//! Activate: point the service definition (systemd unit, init.d script or `current` link) at an install.
//!
//! The deciding code is pure text editing ([`edit_systemd_unit`], [`edit_initd_script`],
//! [`install_in_unit`]); [`activate`] and [`restore`] are the thin file drivers around it.
//!
//! Decisions worth knowing:
//! - Only the product's own `bin/start-bitbucket.sh`/`stop-bitbucket.sh` (and the webapp-only
//!   `start-webapp.sh`/`stop-webapp.sh`) are accepted as the program of `ExecStart=`/`ExecStop=`.
//!   Any other program — a wrapper script, a shell `-c`, Tomcat's `startup.sh`, a container
//!   entrypoint — is refused with [`ActivateError::Unsupported`], even when the wrapper lives under
//!   the install: we cannot tell what it starts or how it forwards `--no-search`. Such a wrapper can
//!   itself be configured as the definition (as an init.d-style script), and is then edited.
//! - `BITBUCKET_HOME` is never rewritten: the home stays where it is.
//! - A definition that runs through an unversioned path other than the old install (a `current`
//!   symlink) is left as it is, but for `--no-search`; the link is switched instead.
//! - The previous definition is kept in the agent's state directory ([`Backups`]), never beside
//!   the definition, where the service manager would see a second service.

mod backup;
mod edit;
mod shell;

pub use backup::{BACKUPS_DIR, BackupEntry, Backups};
pub use edit::{edit_initd_script, edit_systemd_unit, install_in_unit};

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// How the node's Bitbucket service is defined.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServiceDef {
    /// A systemd unit file, e.g. `/etc/systemd/system/bitbucket.service`.
    Systemd {
        unit_path: PathBuf,
        unit_name: String,
    },
    /// An init.d script (or a wrapper script the agent config names), e.g. `/etc/init.d/atlbitbucket`.
    Initd { script_path: PathBuf },
    /// No service manager: the agent runs `bin/start-bitbucket.sh` itself.
    Scripts,
}

impl ServiceDef {
    /// The file that defines the service; `None` without a service manager.
    pub fn path(&self) -> Option<&Path> {
        match self {
            ServiceDef::Systemd { unit_path, .. } => Some(unit_path),
            ServiceDef::Initd { script_path } => Some(script_path),
            ServiceDef::Scripts => None,
        }
    }
}

/// The result of editing a definition's text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnitEdit {
    /// The new text (equal to the input when nothing had to change).
    pub text: String,
    /// What was changed or noticed, for the operator.
    pub notes: Vec<String>,
    /// Set when the definition runs through an unversioned path (a `current` symlink) that is
    /// neither the old nor the new install: that link must be switched instead of the text.
    pub via_link: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("cannot activate through {file}: {reason}")]
    Unsupported { file: String, reason: String },
    #[error("could not {action} {}: {source}", file.display())]
    Io {
        file: PathBuf,
        action: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "no backup {} to restore the service definition from, and {} does not point at the old install {}: restore it by hand",
        backup.display(), file.display(), old_install.display()
    )]
    NoBackup {
        file: PathBuf,
        backup: PathBuf,
        old_install: PathBuf,
    },
    #[error("cannot switch link {}: {reason}", link.display())]
    Link { link: PathBuf, reason: String },
    #[error("path {} is not valid UTF-8; bbupgrade only edits UTF-8 paths", path.display())]
    NonUtf8Path { path: PathBuf },
}

impl ActivateError {
    /// Name the file in an error the pure editors raised without knowing it.
    fn in_file(self, file: &Path) -> Self {
        match self {
            ActivateError::Unsupported { reason, .. } => ActivateError::Unsupported {
                file: file.display().to_string(),
                reason,
            },
            other => other,
        }
    }
}

/// What [`activate`] or [`restore`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ActivateOutcome {
    pub service_path: Option<PathBuf>,
    pub backup_path: Option<PathBuf>,
    pub notes: Vec<String>,
}

/// Blocking: edit the definition (atomic write to a temp file in the same dir + rename, keeping
/// its mode), keeping the previous definition in `backups` under the old install's name; switch a
/// `current` symlink atomically (symlink tmp + rename) if `current_link` is Some; does NOT call
/// daemon-reload (the caller does it through the ServiceManager).
pub fn activate(
    def: &ServiceDef,
    backups: &Backups,
    current_link: Option<&Path>,
    old_install: &Path,
    new_install: &Path,
) -> Result<ActivateOutcome, ActivateError> {
    let mut outcome = ActivateOutcome::default();
    if let Some(path) = def.path() {
        outcome.notes.extend(backups.migrate_legacy(path)?);
    }
    let (file, edited) = match def {
        ServiceDef::Scripts => {
            if current_link.is_none() {
                outcome.notes.push(
                    "no service definition: the agent starts the active install's bin/start-bitbucket.sh itself"
                        .to_string(),
                );
            }
            (None, None)
        }
        ServiceDef::Systemd { unit_path, .. } => {
            let text = read_text(unit_path)?;
            let edit = edit_systemd_unit(&text, old_install, new_install)
                .map_err(|e| e.in_file(unit_path))?;
            (Some((unit_path.clone(), text)), Some(edit))
        }
        ServiceDef::Initd { script_path } => {
            let text = read_text(script_path)?;
            let edit = edit_initd_script(&text, old_install, new_install)
                .map_err(|e| e.in_file(script_path))?;
            (Some((script_path.clone(), text)), Some(edit))
        }
    };

    let mut link_to_switch = current_link.map(Path::to_path_buf);
    if let (Some((path, text)), Some(edit)) = (file, edited) {
        outcome.notes.extend(edit.notes.iter().cloned());
        let backup = backups.path(&path, old_install)?;
        // The first run saves the definition as it was; a re-run (after the file was already
        // edited) must not overwrite that backup with the edited text.
        if backups.save_once(&path, old_install, text.as_bytes())? {
            outcome.notes.push(format!(
                "kept the previous definition in {}",
                backup.display()
            ));
        }
        if edit.text != text {
            write_atomic(&path, edit.text.as_bytes(), Some(&path))?;
            outcome.notes.push(format!("rewrote {}", path.display()));
        } else {
            outcome
                .notes
                .push(format!("{} needed no change", path.display()));
        }
        if let Some(via) = &edit.via_link {
            match current_link {
                Some(link) if link != via.as_path() => {
                    return Err(ActivateError::Link {
                        link: link.to_path_buf(),
                        reason: format!(
                            "{} runs through {}, not through the configured current link: fix current_link in the agent config",
                            path.display(),
                            via.display()
                        ),
                    });
                }
                _ => link_to_switch = Some(via.clone()),
            }
        }
        outcome.service_path = Some(path);
        outcome.backup_path = Some(backup);
    }

    if let Some(link) = link_to_switch {
        let note = switch_link(&link, new_install)?;
        outcome.notes.push(note);
    }
    Ok(outcome)
}

/// Restore the definition from the backup kept for `old_install` (rollback).
pub fn restore(
    def: &ServiceDef,
    backups: &Backups,
    current_link: Option<&Path>,
    old_install: &Path,
    new_install: &Path,
) -> Result<ActivateOutcome, ActivateError> {
    let mut outcome = ActivateOutcome::default();
    let mut link_to_switch = current_link.map(Path::to_path_buf);
    if let Some(path) = def.path() {
        outcome.notes.extend(backups.migrate_legacy(path)?);
        let backup = backups.path(path, old_install)?;
        let current = read_text(path)?;
        match backups.read(path, old_install)? {
            Some(saved) => {
                if saved != current.as_bytes() {
                    write_atomic(path, &saved, Some(path))?;
                    outcome.notes.push(format!(
                        "restored {} from {}",
                        path.display(),
                        backup.display()
                    ));
                } else {
                    outcome
                        .notes
                        .push(format!("{} already matches its backup", path.display()));
                }
                let saved_text = String::from_utf8_lossy(&saved);
                if let Some(unit_install) = install_in_unit(&saved_text)
                    && unit_install != old_install
                    && unit_install != new_install
                    && link_to_switch.is_none()
                {
                    link_to_switch = Some(unit_install);
                }
            }
            None => {
                if install_in_unit(&current).as_deref() != Some(old_install) {
                    return Err(ActivateError::NoBackup {
                        file: path.to_path_buf(),
                        backup,
                        old_install: old_install.to_path_buf(),
                    });
                }
                outcome.notes.push(format!(
                    "{} already points at {}; no backup needed",
                    path.display(),
                    old_install.display()
                ));
            }
        }
        outcome.service_path = Some(path.to_path_buf());
        outcome.backup_path = Some(backup);
    }
    if let Some(link) = link_to_switch {
        // Only switch an existing symlink back; a link path seen in a unit is not ours to create.
        if fs::symlink_metadata(&link).is_ok_and(|m| m.file_type().is_symlink()) {
            outcome.notes.push(switch_link(&link, old_install)?);
        }
    }
    Ok(outcome)
}

fn read_text(path: &Path) -> Result<String, ActivateError> {
    let bytes = crate::rootfs::read_config_file(path)
        .and_then(|b| b.ok_or_else(|| std::io::ErrorKind::NotFound.into()))
        .map_err(|source| ActivateError::Io {
            file: path.to_path_buf(),
            action: "read",
            source,
        })?;
    String::from_utf8(bytes).map_err(|e| ActivateError::Io {
        file: path.to_path_buf(),
        action: "read",
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
    })
}

/// Write `bytes` to `path` through [`crate::rootfs`] (exclusive temp file in the same directory,
/// rename, root-owned), with the mode of `like` when it exists (masked with 0o022).
fn write_atomic(path: &Path, bytes: &[u8], like: Option<&Path>) -> Result<(), ActivateError> {
    let mode = like
        .and_then(|l| fs::symlink_metadata(l).ok())
        .filter(|m| m.file_type().is_file())
        .map_or(0o644, |m| m.mode() & 0o7777);
    crate::rootfs::write_config_file(path, bytes, mode).map_err(|source| ActivateError::Io {
        file: path.to_path_buf(),
        action: "write",
        source,
    })
}

/// Point the symlink `link` at `target` atomically (new symlink beside it, then rename).
pub fn switch_link(link: &Path, target: &Path) -> Result<String, ActivateError> {
    match fs::symlink_metadata(link) {
        Ok(m) if !m.file_type().is_symlink() => {
            return Err(ActivateError::Link {
                link: link.to_path_buf(),
                reason:
                    "it exists and is not a symlink (a real directory?); refusing to replace it"
                        .to_string(),
            });
        }
        Ok(_) => {
            if fs::read_link(link).is_ok_and(|t| t == target) {
                return Ok(format!(
                    "{} already points at {}",
                    link.display(),
                    target.display()
                ));
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(ActivateError::Io {
                file: link.to_path_buf(),
                action: "inspect",
                source,
            });
        }
    }
    let switched = crate::rootfs::Dir::open_parent_trusted(link)
        .and_then(|(dir, name)| dir.replace_symlink(&name, target));
    switched.map_err(|source| ActivateError::Io {
        file: link.to_path_buf(),
        action: "switch symlink",
        source,
    })?;
    Ok(format!(
        "switched {} to {}",
        link.display(),
        target.display()
    ))
}

#[cfg(test)]
mod initd_variable_tests;
#[cfg(test)]
mod tests;
