//! Which install is active and which was active before: the agent's record, kept in
//! `<state_dir>/state.json`, starting from the configured current install.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeState {
    pub active_install: PathBuf,
    pub previous_install: Option<PathBuf>,
}

#[derive(Clone)]
pub struct StateFile {
    path: PathBuf,
}

impl StateFile {
    pub fn new(state_dir: &Path) -> Self {
        Self {
            path: state_dir.join("state.json"),
        }
    }

    /// The recorded state, or the configured install on first start.
    pub fn load_or(&self, initial_install: &Path) -> std::io::Result<NodeState> {
        match std::fs::read(&self.path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(std::io::Error::other),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(NodeState {
                active_install: initial_install.to_path_buf(),
                previous_install: None,
            }),
            Err(e) => Err(e),
        }
    }

    pub fn save(&self, state: &NodeState) -> std::io::Result<()> {
        crate::rootfs::write_config_file(&self.path, &serde_json::to_vec_pretty(state)?, 0o644)
    }
}

/// The version of an install: `app/WEB-INF/classes/build.properties` (`version=`), else the
/// directory name (`8.19.3` or `atlassian-bitbucket-8.19.3`).
pub fn install_version(install: &Path) -> Option<String> {
    // An install from before bbupgrade may be the Bitbucket user's: no link in it is followed.
    let props = crate::rootfs::open_install(install)
        .and_then(|d| d.read(Path::new("app/WEB-INF/classes/build.properties")))
        .ok()
        .flatten()
        .map(|b| String::from_utf8_lossy(&b).into_owned());
    if let Some(text) = props {
        for line in text.lines() {
            if let Some(v) = line.trim().strip_prefix("version=") {
                return Some(v.trim().to_string());
            }
        }
    }
    let name = install.file_name()?.to_str()?;
    let v = name.strip_prefix("atlassian-bitbucket-").unwrap_or(name);
    v.parse::<bbupgrade_common::version::Version>()
        .ok()
        .map(|v| v.to_string())
}

/// Installs under the install root (directories holding `bin/start-bitbucket.sh`), with versions.
pub fn list_installs(install_root: &Path) -> Vec<(String, PathBuf)> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(install_root) {
        for e in entries.flatten() {
            let p = e.path();
            let hidden = p
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with('.'));
            if !hidden
                && p.join("bin/start-bitbucket.sh").is_file()
                && let Some(v) = install_version(&p)
            {
                out.push((v, p));
            }
        }
    }
    out.sort_by(|a, b| {
        let va = a.0.parse::<bbupgrade_common::version::Version>().ok();
        let vb = b.0.parse::<bbupgrade_common::version::Version>().ok();
        va.cmp(&vb).then(a.1.cmp(&b.1))
    });
    out
}

/// Installs that cleanup may remove: all but the newest `keep`, never the active or previous one.
pub fn cleanup_candidates(
    installs: &[(String, PathBuf)],
    state: &NodeState,
    keep: usize,
) -> Vec<PathBuf> {
    let protected =
        |p: &PathBuf| *p == state.active_install || Some(p) == state.previous_install.as_ref();
    let n = installs.len();
    installs
        .iter()
        .enumerate()
        .filter(|(i, (_, p))| *i + keep < n && !protected(p))
        .map(|(_, (_, p))| p.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cleanup_never_touches_active_or_previous() {
        let installs: Vec<(String, PathBuf)> = ["8.19.1", "8.19.2", "8.19.3", "8.19.4", "8.19.5"]
            .iter()
            .map(|v| (v.to_string(), PathBuf::from(format!("/opt/bb/{v}"))))
            .collect();
        let state = NodeState {
            active_install: PathBuf::from("/opt/bb/8.19.1"),
            previous_install: Some(PathBuf::from("/opt/bb/8.19.2")),
        };
        assert_eq!(
            cleanup_candidates(&installs, &state, 2),
            vec![PathBuf::from("/opt/bb/8.19.3")]
        );
        assert!(cleanup_candidates(&installs, &state, 5).is_empty());
        assert_eq!(cleanup_candidates(&installs, &state, 0).len(), 3);
    }
}
