//! The Bitbucket user, as root deals with it: whom the product's scripts run as (decided by
//! [`plan_script_run`], carried out by dropping privileges in the child), what the user must not be
//! able to edit for root to run it, the `User=` a unit must say, and reading the user's log only as
//! the user.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;

use super::{SAFE_PATH, TAIL_BYTES, TAIL_LINES, TAIL_READ_SECS, tail};

/// Whom the product's scripts run as: the configured Bitbucket user (always, when the agent is
/// root), or the agent's own user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunAs {
    Current,
    User(BitbucketUser),
}

/// How to invoke a product script, decided by [`plan_script_run`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Invocation {
    /// Run it as the agent's own user (an unprivileged agent).
    Direct,
    /// Drop to this user in the child, then exec the script.
    AsUser(BitbucketUser),
}

/// Decide how to run a product script. `script_user` is the `BITBUCKET_USER` the install's
/// `bin/set-bitbucket-user.sh` sets (None or empty when unset): it must be the configured user
/// (the agent never lets that file choose whom root becomes), and with root the agent itself
/// drops to the configured user.
pub fn plan_script_run(
    is_root: bool,
    script_user: Option<&str>,
    run_as: &RunAs,
) -> Result<Invocation, String> {
    if let (Some(named), RunAs::User(u)) = (script_user.filter(|u| !u.is_empty()), run_as)
        && named != u.name
    {
        return Err(format!(
            "bin/set-bitbucket-user.sh sets BITBUCKET_USER={named}, but the agent config runs Bitbucket as {}; make them agree (edit that file, or set bitbucket.user in the agent config)",
            u.name
        ));
    }
    if !is_root {
        return Ok(Invocation::Direct);
    }
    match run_as {
        RunAs::User(u) if u.uid != 0 && u.name != "root" => Ok(Invocation::AsUser(u.clone())),
        RunAs::User(_) => Err(
            "the configured user is root; set bitbucket.user to the Bitbucket user in the agent config"
                .to_string(),
        ),
        RunAs::Current => Err(
            "no Bitbucket user is configured; set bitbucket.user in the agent config (the agent never runs Bitbucket's scripts as root)"
                .to_string(),
        ),
    }
}

/// The `BITBUCKET_USER` a `set-bitbucket-user.sh` assigns (the last active assignment), if any.
pub fn parse_bitbucket_user(script: &str) -> Option<String> {
    script
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let l = l.strip_prefix("export ").unwrap_or(l);
            l.strip_prefix("BITBUCKET_USER=")
        })
        .map(|v| {
            let v = v.trim_start();
            let v = match v.chars().next() {
                Some(q @ ('"' | '\'')) => v[1..].split(q).next().unwrap_or(""),
                _ => v
                    .split(|c: char| c.is_whitespace() || c == '#')
                    .next()
                    .unwrap_or(""),
            };
            v.to_string()
        })
        .next_back()
}

/// The tail of a file the Bitbucket user can write (its log), read only as that user: by `tail`
/// in a child that dropped to it when the agent is root, so no link in that file's path can make
/// root read anything for it. Bounded to a few KiB and a few seconds.
pub async fn user_file_tail(path: &Path, user: Option<&BitbucketUser>) -> String {
    let mut cmd = Command::new("tail");
    cmd.arg("-c")
        .arg((4 * TAIL_BYTES).to_string())
        .arg("--")
        .arg(path)
        .env_clear()
        .env("PATH", SAFE_PATH)
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    if nix::unistd::geteuid().is_root() {
        let Some(user) = user else {
            return format!(
                "({} not read: the agent reads the Bitbucket log only as the Bitbucket user, and none is configured)",
                path.display()
            );
        };
        if let Err(e) = drop_privileges(&mut cmd, user) {
            return format!("({} not read: {e})", path.display());
        }
    }
    let out = tokio::time::timeout(Duration::from_secs(TAIL_READ_SECS), cmd.output()).await;
    match out {
        Ok(Ok(o)) if o.status.success() => tail(&String::from_utf8_lossy(&o.stdout), TAIL_LINES),
        Ok(Ok(_)) => format!("({} not readable by the Bitbucket user)", path.display()),
        Ok(Err(e)) => format!("({} not read: {e})", path.display()),
        Err(_) => format!("({} not read within {TAIL_READ_SECS} s)", path.display()),
    }
}

/// The Bitbucket user from the agent config, as the child processes need it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitbucketUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

impl BitbucketUser {
    /// Looks a user up by name (the config does this once at start).
    pub fn from_name(name: &str) -> Option<Self> {
        let u = nix::unistd::User::from_name(name).ok().flatten()?;
        Some(BitbucketUser {
            name: u.name,
            uid: u.uid.as_raw(),
            gid: u.gid.as_raw(),
        })
    }

    pub fn reader(&self) -> crate::rootfs::Reader {
        crate::rootfs::Reader {
            uid: self.uid,
            gid: self.gid,
        }
    }

    pub(super) fn home(&self) -> String {
        nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(self.uid))
            .ok()
            .flatten()
            .map(|u| u.dir.to_string_lossy().into_owned())
            .unwrap_or_else(|| "/".to_string())
    }
}

/// Makes `cmd`'s child become `user` before exec: its supplementary groups, gid and uid (real,
/// effective and saved), checked. The group list is looked up here, in the parent: only plain
/// system calls run between fork and exec.
pub(super) fn drop_privileges(cmd: &mut Command, user: &BitbucketUser) -> std::io::Result<()> {
    use nix::unistd::{Gid, Uid};
    if user.uid == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            "the Bitbucket user is root",
        ));
    }
    let name = std::ffi::CString::new(user.name.as_str())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let gid = Gid::from_raw(user.gid);
    let uid = Uid::from_raw(user.uid);
    let groups = nix::unistd::getgrouplist(&name, gid).map_err(std::io::Error::from)?;
    // SAFETY: the closure only makes system calls (setgroups, setresgid, setresuid, getuid)
    // on data prepared before the fork; it allocates nothing and takes no locks.
    unsafe {
        cmd.pre_exec(move || {
            nix::unistd::setgroups(&groups)?;
            nix::unistd::setresgid(gid, gid, gid)?;
            nix::unistd::setresuid(uid, uid, uid)?;
            if nix::unistd::getuid() != uid || nix::unistd::geteuid() != uid {
                return Err(std::io::Error::other(
                    "could not drop to the Bitbucket user",
                ));
            }
            Ok(())
        });
    }
    Ok(())
}

/// The user a unit's `[Service]` section runs as: the last `User=` over the unit and its drop-ins
/// (an empty `User=` resets it), `None` for root.
pub fn unit_user(texts: &[String]) -> Option<String> {
    let mut user = None;
    for text in texts {
        let mut in_service = false;
        for line in text.lines() {
            let t = line.trim();
            if t.starts_with('[') {
                in_service = t == "[Service]";
                continue;
            }
            if !in_service {
                continue;
            }
            if let Some(v) = t.strip_prefix("User=") {
                let v = v.trim().trim_matches('"');
                user = (!v.is_empty()).then(|| v.to_string());
            }
        }
    }
    user
}

/// Refuses a unit that does not run as `user`.
pub fn check_unit_user(texts: &[String], user: &str) -> Result<(), String> {
    match unit_user(texts) {
        Some(u) if u == user => Ok(()),
        found => Err(format!(
            "it runs Bitbucket as {}, not as the configured Bitbucket user {user}; set `User={user}` in its [Service] section (and no drop-in overriding it), then systemctl daemon-reload",
            found.map_or_else(|| "root (no User=)".to_string(), |u| format!("User={u}"))
        )),
    }
}

/// The first path among `paths` (a file or one of its directories) that `user` can write, if any.
/// Each path is checked as it resolves and where its link sits, up to `/`.
pub fn user_writable(paths: &[PathBuf], user: &crate::rootfs::Reader) -> Option<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let mut chains = Vec::new();
    for p in paths {
        chains.extend(std::fs::canonicalize(p).ok());
        if let Some(parent) = p.parent() {
            chains.extend(std::fs::canonicalize(parent).ok());
        }
    }
    for chain in chains {
        for a in chain.ancestors() {
            let Ok(m) = std::fs::metadata(a) else {
                continue;
            };
            // In a sticky directory (like /tmp) others may add names but not replace the ones
            // we check next, which are not theirs.
            let sticky_for_others = m.is_dir() && m.mode() & 0o1000 != 0 && m.uid() != user.uid;
            let writable = m.uid() == user.uid
                || (m.gid() == user.gid && m.mode() & 0o020 != 0)
                || m.mode() & 0o002 != 0;
            if writable && !sticky_for_others {
                return Some(a.to_path_buf());
            }
        }
    }
    None
}
