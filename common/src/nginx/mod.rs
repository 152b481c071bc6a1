//! NGINX (open source, no runtime API) on this host: a server is taken out of its upstream by
//! editing the file ([`edit`]), checking the result with `nginx -t` and reloading; old workers that
//! still serve requests are waited for. Used by the coordinator (`kind = "nginx"`, when it runs on the
//! NGINX host) and by an agent with an `[lb]` role (`kind = "nginx-agent"`), so it lives here, where
//! both can reach it without depending on each other.
//!
//! [`NginxHost`] blocks (file edits, child processes, polling `/proc`): callers run it in
//! `spawn_blocking`. The file is written atomically with a backup, and the original is put back
//! (nothing reloaded) when `nginx -t` or the reload refuses the result.

pub mod edit;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub use edit::{
    NginxEditError, NginxMode, REMOVED_MARKER, ServerAdmin, edit_server, mark_server,
    remove_server, server_admin_state,
};

pub const DEFAULT_NGINX: &str = "/usr/sbin/nginx";
pub const DEFAULT_MAIN_CONFIG: &str = "/etc/nginx/nginx.conf";
pub const DEFAULT_PID_FILE: &str = "/run/nginx.pid";
/// Bound on `nginx -t` and a reload command.
pub const COMMAND_TIMEOUT_SECS: u64 = 30;
/// How often a drain looks for workers still shutting down.
pub const DRAIN_POLL_MS: u64 = 200;
/// How often a running command is looked at for having exited.
const COMMAND_POLL_MS: u64 = 20;
/// The previous version of the edited file is kept next to it under this suffix.
pub const BACKUP_SUFFIX: &str = ".bbupgrade.bak";

/// What went wrong with NGINX; the caller adds which NGINX (see [`NginxHost::describe`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NginxError {
    #[error("invalid NGINX settings: {0}")]
    Config(String),
    /// Nothing was changed.
    #[error("cannot reach {target}: {reason}")]
    Unreachable { target: String, reason: String },
    #[error("{0}")]
    UnknownServer(NginxEditError),
    #[error("{0}")]
    UnknownUpstream(NginxEditError),
    #[error(
        "server {server}: {workers} old worker process(es) still finishing requests after {waited:?}; it is left out of rotation — wait and retry, or raise the drain timeout"
    )]
    DrainTimeout {
        server: String,
        workers: u64,
        waited: Duration,
    },
    #[error("{command:?} was refused: {answer}")]
    Refused { command: String, answer: String },
    #[error(
        "server {server} should now be {wanted:?} but reads back as {found:?}; check whether something else changes the file"
    )]
    NotConfirmed {
        server: String,
        wanted: ServerAdmin,
        found: ServerAdmin,
    },
}

/// The settings of an NGINX load balancer, as the inventory or the agent's `[lb]` table gives them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NginxSettings {
    /// The file holding the `upstream` block (the main file or one it includes).
    pub config: PathBuf,
    pub upstream: String,
    pub mode: NginxMode,
    /// What `nginx -t -c` checks (default [`DEFAULT_MAIN_CONFIG`]).
    pub main_config: Option<PathBuf>,
    /// NGINX's `-p` prefix, when it runs with one.
    pub prefix: Option<PathBuf>,
    /// The program (default [`DEFAULT_NGINX`]).
    pub nginx: Option<PathBuf>,
    /// The master's pid file (default [`DEFAULT_PID_FILE`]): reload by SIGHUP, old workers found.
    pub pid_file: Option<PathBuf>,
    /// Reload with this command instead of SIGHUP, e.g. `["systemctl", "reload", "nginx"]`.
    pub reload_command: Option<Vec<String>>,
}

/// What a drain took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NginxDrain {
    pub waited: Duration,
    /// Workers of the previous configuration that were still serving when the reload happened.
    pub old_workers: u64,
    /// Whether the file was changed (false: the server was already out).
    pub changed: bool,
}

/// One upstream of an NGINX on this host.
#[derive(Debug, Clone)]
pub struct NginxHost {
    config: PathBuf,
    upstream: String,
    mode: NginxMode,
    main_config: PathBuf,
    prefix: Option<PathBuf>,
    nginx: PathBuf,
    pid_file: PathBuf,
    reload_command: Option<Vec<String>>,
    command_timeout: Duration,
    poll: Duration,
}

impl NginxHost {
    pub fn new(s: &NginxSettings) -> Result<Self, NginxError> {
        if s.upstream.is_empty() || s.upstream.chars().any(|c| c.is_whitespace() || c == ';') {
            return Err(NginxError::Config(format!(
                "NGINX upstream name {:?} must be non-empty, without spaces or ';'",
                s.upstream
            )));
        }
        for (what, p) in [
            ("config", Some(&s.config)),
            ("main_config", s.main_config.as_ref()),
        ] {
            if let Some(p) = p
                && !p.is_absolute()
            {
                return Err(NginxError::Config(format!(
                    "NGINX {what} {} must be an absolute path",
                    p.display()
                )));
            }
        }
        if s.reload_command.as_ref().is_some_and(|c| c.is_empty()) {
            return Err(NginxError::Config(
                "NGINX reload_command is empty; leave it out to reload with SIGHUP to the master"
                    .into(),
            ));
        }
        Ok(Self {
            config: s.config.clone(),
            upstream: s.upstream.clone(),
            mode: s.mode,
            main_config: s
                .main_config
                .clone()
                .unwrap_or_else(|| PathBuf::from(DEFAULT_MAIN_CONFIG)),
            prefix: s.prefix.clone(),
            nginx: s
                .nginx
                .clone()
                .unwrap_or_else(|| PathBuf::from(DEFAULT_NGINX)),
            pid_file: s
                .pid_file
                .clone()
                .unwrap_or_else(|| PathBuf::from(DEFAULT_PID_FILE)),
            reload_command: s.reload_command.clone(),
            command_timeout: Duration::from_secs(COMMAND_TIMEOUT_SECS),
            poll: Duration::from_millis(DRAIN_POLL_MS),
        })
    }

    /// e.g. `nginx upstream bitbucket in /etc/nginx/conf.d/bitbucket.conf`.
    pub fn describe(&self) -> String {
        format!(
            "nginx upstream {} in {}",
            self.upstream,
            self.config.display()
        )
    }

    /// Whether `server` is in rotation, as the file says.
    pub fn state(&self, server: &str) -> Result<ServerAdmin, NginxError> {
        let text = self.read_config()?;
        server_admin_state(&text, &self.upstream, server).map_err(|e| self.edit_error(e))
    }

    /// Takes `server` out, reloads, and waits up to `timeout` for the workers of the previous
    /// configuration to finish their requests; on `DrainTimeout` the server stays out.
    pub fn drain(&self, server: &str, timeout: Duration) -> Result<NginxDrain, NginxError> {
        let start = Instant::now();
        let master = self.master_pid()?;
        let before: Vec<u32> = workers_of(master).into_iter().map(|(pid, _)| pid).collect();
        let changed = self.apply(server, true)?;
        let old_workers = |now: &[(u32, bool)]| {
            now.iter()
                .filter(|(pid, shutting)| *shutting || (changed && before.contains(pid)))
                .count() as u64
        };
        let at_start = old_workers(&workers_of(master));
        loop {
            let left = old_workers(&workers_of(master));
            if left == 0 {
                break;
            }
            if start.elapsed() >= timeout {
                return Err(NginxError::DrainTimeout {
                    server: server.to_string(),
                    workers: left,
                    waited: start.elapsed(),
                });
            }
            std::thread::sleep(self.poll);
        }
        self.confirm(server, ServerAdmin::Out)?;
        Ok(NginxDrain {
            waited: start.elapsed(),
            old_workers: at_start,
            changed,
        })
    }

    /// Puts `server` back in rotation, reloads, and reads the file back.
    pub fn enable(&self, server: &str) -> Result<bool, NginxError> {
        let changed = self.apply(server, false)?;
        self.confirm(server, ServerAdmin::In)?;
        Ok(changed)
    }

    /// Preflight: the server is in the file, NGINX runs, and its configuration passes `nginx -t`.
    pub fn check(&self, server: &str) -> Result<ServerAdmin, NginxError> {
        let admin = self.state(server)?;
        self.master_pid()?;
        self.check_config()?;
        Ok(admin)
    }

    fn read_config(&self) -> Result<String, NginxError> {
        std::fs::read_to_string(&self.config).map_err(|e| NginxError::Unreachable {
            target: self.config.display().to_string(),
            reason: format!("cannot read it: {e}"),
        })
    }

    fn write_config(&self, text: &str, backup: Option<&str>) -> Result<(), NginxError> {
        let r = (|| -> std::io::Result<()> {
            if let Some(b) = backup {
                let mut bak = self.config.as_os_str().to_owned();
                bak.push(BACKUP_SUFFIX);
                write_atomically(Path::new(&bak), b)?;
            }
            write_atomically(&self.config, text)
        })();
        r.map_err(|e| NginxError::Refused {
            command: format!("write {}", self.config.display()),
            answer: e.to_string(),
        })
    }

    fn edit_error(&self, e: NginxEditError) -> NginxError {
        match e {
            NginxEditError::NoServer { .. } => NginxError::UnknownServer(e),
            NginxEditError::NoUpstream(_) => NginxError::UnknownUpstream(e),
            other => NginxError::Refused {
                command: format!("edit {}", self.config.display()),
                answer: other.to_string(),
            },
        }
    }

    /// Runs a program with a bound; returns (success, combined output).
    fn run(&self, program: &Path, args: &[String]) -> Result<(bool, String), NginxError> {
        let shown = format!("{} {}", program.display(), args.join(" "));
        let mut child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| NginxError::Unreachable {
                target: shown.clone(),
                reason: format!("cannot run it: {e}"),
            })?;
        let deadline = Instant::now() + self.command_timeout;
        // `nginx -t` and reload commands say little, so their output fits in the pipes' buffers
        // while we wait for the exit.
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(COMMAND_POLL_MS))
                }
                Ok(None) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(NginxError::Unreachable {
                        target: shown,
                        reason: format!("no answer within {:?}", self.command_timeout),
                    });
                }
                Err(e) => {
                    return Err(NginxError::Unreachable {
                        target: shown,
                        reason: format!("cannot wait for it: {e}"),
                    });
                }
            }
        };
        let mut output = String::new();
        if let Some(mut o) = child.stdout.take() {
            let _ = o.read_to_string(&mut output);
        }
        if let Some(mut e) = child.stderr.take() {
            let _ = e.read_to_string(&mut output);
        }
        Ok((status.success(), output.trim().to_string()))
    }

    fn check_args(&self) -> Vec<String> {
        let mut args = vec![
            "-t".to_string(),
            "-q".into(),
            "-c".into(),
            self.main_config.display().to_string(),
        ];
        if let Some(p) = &self.prefix {
            args.extend(["-p".to_string(), p.display().to_string()]);
        }
        args
    }

    /// `nginx -t` on the main configuration: `Err(Refused)` with its output when it fails.
    fn check_config(&self) -> Result<(), NginxError> {
        let args = self.check_args();
        let (ok, output) = self.run(&self.nginx, &args)?;
        if ok {
            Ok(())
        } else {
            Err(NginxError::Refused {
                command: format!("{} {}", self.nginx.display(), args.join(" ")),
                answer: output,
            })
        }
    }

    fn master_pid(&self) -> Result<u32, NginxError> {
        std::fs::read_to_string(&self.pid_file)
            .ok()
            .and_then(|t| t.trim().parse().ok())
            .ok_or_else(|| NginxError::Unreachable {
                target: self.pid_file.display().to_string(),
                reason:
                    "no master process id in the pid file; is nginx running, and is pid_file right?"
                        .into(),
            })
    }

    fn reload(&self) -> Result<(), NginxError> {
        if let Some(cmd) = &self.reload_command {
            let (ok, output) = self.run(Path::new(&cmd[0]), &cmd[1..])?;
            if !ok {
                return Err(NginxError::Refused {
                    command: cmd.join(" "),
                    answer: output,
                });
            }
            return Ok(());
        }
        let pid = self.master_pid()?;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGHUP,
        )
        .map_err(|e| NginxError::Unreachable {
            target: format!("master process {pid}"),
            reason: format!("SIGHUP failed: {e}"),
        })
    }

    /// Edits the file, checks it and reloads; the original stays (nothing reloaded) when the check
    /// fails. Returns whether anything changed.
    fn apply(&self, server: &str, out: bool) -> Result<bool, NginxError> {
        let original = self.read_config()?;
        let edited = edit_server(&original, &self.upstream, server, self.mode, out)
            .map_err(|e| self.edit_error(e))?;
        if edited == original {
            return Ok(false);
        }
        self.write_config(&edited, Some(&original))?;
        if let Err(e) = self.check_config().and_then(|()| self.reload()) {
            self.write_config(&original, None)?;
            return Err(e);
        }
        Ok(true)
    }

    fn confirm(&self, server: &str, wanted: ServerAdmin) -> Result<(), NginxError> {
        let found = self.state(server)?;
        if found != wanted {
            return Err(NginxError::NotConfirmed {
                server: server.to_string(),
                wanted,
                found,
            });
        }
        Ok(())
    }
}

/// A worker of an old configuration, still finishing its requests after a reload.
pub fn is_shutting_down(cmdline: &str) -> bool {
    cmdline.contains("nginx: worker process is shutting down")
}

/// The parent pid from `/proc/PID/stat` (the field after the state, past the command in brackets).
pub fn parse_ppid(stat: &str) -> Option<u32> {
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// Worker processes of `master`: (pid, shutting down).
fn workers_of(master: u32) -> Vec<(u32, bool)> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        if parse_ppid(&stat) != Some(master) {
            continue;
        }
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains("nginx: worker process") {
            out.push((pid, is_shutting_down(&cmdline)));
        }
    }
    out
}

/// Writes `text` to `path` through a temporary file and a rename, keeping the file's permissions.
fn write_atomically(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".bbupgrade.tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    if let Ok(meta) = std::fs::metadata(path) {
        std::fs::set_permissions(&tmp, meta.permissions())?;
        use std::os::unix::fs::MetadataExt;
        let _ = nix::unistd::chown(
            &tmp,
            Some(nix::unistd::Uid::from_raw(meta.uid())),
            Some(nix::unistd::Gid::from_raw(meta.gid())),
        );
    }
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_parsing() {
        assert_eq!(
            parse_ppid("4242 (nginx) S 4200 4200 4200 0 -1 4194624 86 0 0 0"),
            Some(4200)
        );
        assert_eq!(parse_ppid("4242 (a) b) S 17 1"), Some(17));
        assert_eq!(parse_ppid("garbage"), None);
        assert!(is_shutting_down(
            "nginx: worker process is shutting down    "
        ));
        assert!(!is_shutting_down("nginx: worker process"));
    }

    #[test]
    fn settings_are_checked() {
        let ok = NginxSettings {
            config: "/etc/nginx/conf.d/bitbucket.conf".into(),
            upstream: "bitbucket".into(),
            mode: NginxMode::Down,
            main_config: None,
            prefix: None,
            nginx: None,
            pid_file: None,
            reload_command: None,
        };
        assert!(NginxHost::new(&ok).is_ok());
        for bad in [
            NginxSettings {
                upstream: "bit bucket".into(),
                ..ok.clone()
            },
            NginxSettings {
                config: "relative.conf".into(),
                ..ok.clone()
            },
            NginxSettings {
                reload_command: Some(vec![]),
                ..ok.clone()
            },
        ] {
            assert!(
                matches!(NginxHost::new(&bad), Err(NginxError::Config(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn a_check_that_fails_leaves_the_file_as_it_was() {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("upstream.conf");
        let text = "upstream b {\n    server 127.0.0.1:1;\n    server 127.0.0.1:2;\n}\n";
        std::fs::write(&conf, text).unwrap();
        std::fs::write(
            dir.path().join("nginx.pid"),
            format!("{}\n", std::process::id()),
        )
        .unwrap();
        let host = NginxHost::new(&NginxSettings {
            config: conf.clone(),
            upstream: "b".into(),
            mode: NginxMode::Down,
            main_config: None,
            prefix: None,
            // `false` stands in for an `nginx -t` that refuses the edit.
            nginx: Some("false".into()),
            pid_file: Some(dir.path().join("nginx.pid")),
            reload_command: None,
        })
        .unwrap();
        assert_eq!(host.state("127.0.0.1:1").unwrap(), ServerAdmin::In);
        let e = host.drain("127.0.0.1:1", Duration::ZERO).unwrap_err();
        assert!(matches!(e, NginxError::Refused { .. }), "{e}");
        assert_eq!(std::fs::read_to_string(&conf).unwrap(), text);
        assert!(matches!(
            host.state("127.0.0.1:9"),
            Err(NginxError::UnknownServer(_))
        ));
    }
}
