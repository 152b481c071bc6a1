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

use std::collections::BTreeMap;
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
    /// The upstream is not in the file named second.
    #[error("{0} ({1})")]
    UnknownUpstream(NginxEditError, String),
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
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NginxSettings {
    /// The file holding the `upstream` block (the main file or one it includes).
    pub config: PathBuf,
    /// One upstream (the older form; the same as `upstreams = ["..."]`).
    pub upstream: String,
    /// Every upstream a node is in, e.g. the `http` one and the `stream` one of Git over SSH:
    /// taken out and put back together, in one reload.
    pub upstreams: Vec<String>,
    /// Upstreams held in another file than `config`: upstream -> file.
    pub configs: BTreeMap<String, PathBuf>,
    /// Where a node's server has another address in some upstream: upstream -> (the node's
    /// `lb_server` -> its address there), e.g. `{ bitbucket_ssh = { "10.0.0.1:7990" = "10.0.0.1:7999" } }`.
    pub server_names: BTreeMap<String, BTreeMap<String, String>>,
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

/// Names given once and in a list, in order, without repeats or blanks (`backend` and `backends`,
/// `upstream` and `upstreams`).
pub fn one_and_many(one: &str, many: &[String]) -> Vec<String> {
    let mut all: Vec<String> = Vec::new();
    for b in std::iter::once(one).chain(many.iter().map(String::as_str)) {
        if !b.is_empty() && !all.iter().any(|a| a == b) {
            all.push(b.to_string());
        }
    }
    all
}

/// One upstream block a node is in.
#[derive(Debug, Clone)]
struct Upstream {
    name: String,
    /// The file holding the block.
    config: PathBuf,
    /// The node's `lb_server` -> its address in this upstream, where it differs.
    names: BTreeMap<String, String>,
}

impl Upstream {
    /// The node's server as this upstream lists it.
    fn server<'a>(&'a self, server: &'a str) -> &'a str {
        self.names.get(server).map_or(server, String::as_str)
    }
}

/// The upstreams a node is in, on an NGINX on this host.
#[derive(Debug, Clone)]
pub struct NginxHost {
    upstreams: Vec<Upstream>,
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
        let upstreams = upstreams_of(s)?;
        for p in upstreams
            .iter()
            .map(|u| &u.config)
            .chain(s.main_config.as_ref())
        {
            if !p.is_absolute() {
                return Err(NginxError::Config(format!(
                    "NGINX config file {} must be an absolute path",
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
            upstreams,
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

    /// Every file holding one of the upstreams, once each.
    pub fn config_files(&self) -> Vec<&Path> {
        let mut files: Vec<&Path> = Vec::new();
        for u in &self.upstreams {
            if !files.contains(&u.config.as_path()) {
                files.push(&u.config);
            }
        }
        files
    }

    /// e.g. `nginx upstream bitbucket in /etc/nginx/conf.d/bitbucket.conf`, or with two upstreams
    /// `nginx upstreams bitbucket and bitbucket_ssh in /etc/nginx/bitbucket.conf`.
    pub fn describe(&self) -> String {
        let files = self.config_files();
        let names: Vec<&str> = self.upstreams.iter().map(|u| u.name.as_str()).collect();
        match (names.as_slice(), files.as_slice()) {
            ([one], _) => format!("nginx upstream {one} in {}", files[0].display()),
            (_, [file]) => format!(
                "nginx upstreams {} in {}",
                names.join(" and "),
                file.display()
            ),
            _ => {
                let each: Vec<String> = self
                    .upstreams
                    .iter()
                    .map(|u| format!("upstream {} in {}", u.name, u.config.display()))
                    .collect();
                format!("nginx {}", each.join(" and "))
            }
        }
    }

    /// Whether `server` is in rotation, as the files say: `In` only when it is in every upstream.
    pub fn state(&self, server: &str) -> Result<ServerAdmin, NginxError> {
        let mut all = ServerAdmin::In;
        for u in &self.upstreams {
            let text = read_file(&u.config)?;
            if server_admin_state(&text, &u.name, u.server(server)).map_err(|e| edit_error(u, e))?
                == ServerAdmin::Out
            {
                all = ServerAdmin::Out;
            }
        }
        Ok(all)
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

    /// Preflight: the server is in every upstream, NGINX runs, and its configuration passes `nginx -t`.
    pub fn check(&self, server: &str) -> Result<ServerAdmin, NginxError> {
        let admin = self.state(server)?;
        self.master_pid()?;
        self.check_config()?;
        Ok(admin)
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

    /// Edits every upstream's file, checks the result and reloads once; the originals are put back
    /// (nothing reloaded) when the check fails. Returns whether anything changed.
    fn apply(&self, server: &str, out: bool) -> Result<bool, NginxError> {
        // (file, original, edited), one entry per file however many upstreams it holds.
        let mut files: Vec<(&Path, String, String)> = Vec::new();
        for u in &self.upstreams {
            let at = match files.iter().position(|f| f.0 == u.config) {
                Some(at) => at,
                None => {
                    let text = read_file(&u.config)?;
                    files.push((u.config.as_path(), text.clone(), text));
                    files.len() - 1
                }
            };
            files[at].2 = edit_server(&files[at].2, &u.name, u.server(server), self.mode, out)
                .map_err(|e| edit_error(u, e))?;
        }
        files.retain(|(_, original, edited)| original != edited);
        if files.is_empty() {
            return Ok(false);
        }
        let mut written = Vec::new();
        let mut result = Ok(());
        for (path, original, edited) in &files {
            result = write_config(path, edited, Some(original));
            if result.is_err() {
                break;
            }
            written.push((path, original));
        }
        let result = result.and_then(|()| self.check_config().and_then(|()| self.reload()));
        if let Err(e) = result {
            for (path, original) in written {
                write_config(path, original, None)?;
            }
            return Err(e);
        }
        Ok(true)
    }

    fn confirm(&self, server: &str, wanted: ServerAdmin) -> Result<(), NginxError> {
        for u in &self.upstreams {
            let text = read_file(&u.config)?;
            let found = server_admin_state(&text, &u.name, u.server(server))
                .map_err(|e| edit_error(u, e))?;
            if found != wanted {
                return Err(NginxError::NotConfirmed {
                    server: format!("{} in upstream {}", u.server(server), u.name),
                    wanted,
                    found,
                });
            }
        }
        Ok(())
    }
}

/// The upstreams the settings name, each with its file and server names, checked.
fn upstreams_of(s: &NginxSettings) -> Result<Vec<Upstream>, NginxError> {
    let names = one_and_many(&s.upstream, &s.upstreams);
    if names.is_empty() {
        return Err(NginxError::Config(
            "NGINX needs `upstreams = [...]` (or `upstream`): the upstream blocks a node is in"
                .into(),
        ));
    }
    if let Some(bad) = names
        .iter()
        .find(|n| n.chars().any(|c| c.is_whitespace() || c == ';'))
    {
        return Err(NginxError::Config(format!(
            "NGINX upstream name {bad:?} must be without spaces or ';'"
        )));
    }
    for (what, keys) in [
        ("configs", s.configs.keys().collect::<Vec<_>>()),
        ("server_names", s.server_names.keys().collect()),
    ] {
        if let Some(stray) = keys.into_iter().find(|k| !names.contains(k)) {
            return Err(NginxError::Config(format!(
                "NGINX {what} names upstream {stray:?}, which is not among the upstreams {names:?}"
            )));
        }
    }
    Ok(names
        .into_iter()
        .map(|name| Upstream {
            config: s.configs.get(&name).unwrap_or(&s.config).clone(),
            names: s.server_names.get(&name).cloned().unwrap_or_default(),
            name,
        })
        .collect())
}

fn read_file(path: &Path) -> Result<String, NginxError> {
    std::fs::read_to_string(path).map_err(|e| NginxError::Unreachable {
        target: path.display().to_string(),
        reason: format!("cannot read it: {e}"),
    })
}

fn write_config(path: &Path, text: &str, backup: Option<&str>) -> Result<(), NginxError> {
    let r = (|| -> std::io::Result<()> {
        if let Some(b) = backup {
            let mut bak = path.as_os_str().to_owned();
            bak.push(BACKUP_SUFFIX);
            write_atomically(Path::new(&bak), b)?;
        }
        write_atomically(path, text)
    })();
    r.map_err(|e| NginxError::Refused {
        command: format!("write {}", path.display()),
        answer: e.to_string(),
    })
}

fn edit_error(u: &Upstream, e: NginxEditError) -> NginxError {
    match e {
        NginxEditError::NoServer { .. } => NginxError::UnknownServer(e),
        NginxEditError::NoUpstream(_) => {
            NginxError::UnknownUpstream(e, u.config.display().to_string())
        }
        other => NginxError::Refused {
            command: format!("edit {}", u.config.display()),
            answer: other.to_string(),
        },
    }
}

/// Where NGINX's `stream` module (TCP proxying, e.g. Git over SSH) comes from for `nginx`:
/// `Ok(None)` when it is built in, `Ok(Some(file))` for the `load_module` line when it is a
/// dynamic module (Debian's `libnginx-mod-stream`), found in the build's `--modules-path`, its
/// prefix's `modules/`, or the usual module folders.
pub fn stream_module(nginx: &Path) -> Result<Option<PathBuf>, String> {
    let out = Command::new(nginx)
        .arg("-V")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {} -V: {e}", nginx.display()))?;
    // `nginx -V` writes its build options to standard error.
    let text =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    stream_module_in(&text, |p| p.is_file())
}

/// [`stream_module`] on the text of `nginx -V`, with `exists` telling which files are there.
pub fn stream_module_in(
    build: &str,
    exists: impl Fn(&Path) -> bool,
) -> Result<Option<PathBuf>, String> {
    let options: Vec<&str> = build.split_whitespace().collect();
    let option = |name: &str| {
        options
            .iter()
            .find_map(|o| o.strip_prefix(name)?.strip_prefix('='))
    };
    if options.contains(&"--with-stream") {
        return Ok(None);
    }
    if option("--with-stream") != Some("dynamic") {
        return Err("this nginx is built without the stream module (no --with-stream in nginx -V); install an nginx with it (Debian: nginx with libnginx-mod-stream)".into());
    }
    let mut folders: Vec<PathBuf> = Vec::new();
    folders.extend(option("--modules-path").map(PathBuf::from));
    folders.extend(option("--prefix").map(|p| Path::new(p).join("modules")));
    for f in [
        "/usr/lib/nginx/modules",
        "/usr/lib64/nginx/modules",
        "/usr/share/nginx/modules",
        "/etc/nginx/modules",
    ] {
        folders.push(PathBuf::from(f));
    }
    folders
        .iter()
        .map(|f| f.join("ngx_stream_module.so"))
        .find(|f| exists(f))
        .map(Some)
        .ok_or_else(|| {
            format!(
                "nginx loads the stream module dynamically, but ngx_stream_module.so is in none of {}; install it (Debian: apt-get install libnginx-mod-stream)",
                folders
                    .iter()
                    .map(|f| f.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
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
    fn the_stream_module_is_found_where_the_build_says() {
        let debian = "nginx version: nginx/1.22.1\nconfigure arguments: --prefix=/usr/share/nginx --modules-path=/usr/lib/nginx/modules --with-stream=dynamic --with-stream_ssl_module";
        let at = |want: &'static str| move |p: &Path| p == Path::new(want);
        assert_eq!(
            stream_module_in(debian, at("/usr/lib/nginx/modules/ngx_stream_module.so")),
            Ok(Some("/usr/lib/nginx/modules/ngx_stream_module.so".into()))
        );
        let no_path = "configure arguments: --prefix=/opt/nginx --with-stream=dynamic";
        assert_eq!(
            stream_module_in(no_path, at("/opt/nginx/modules/ngx_stream_module.so")),
            Ok(Some("/opt/nginx/modules/ngx_stream_module.so".into()))
        );
        let missing = stream_module_in(debian, |_| false).unwrap_err();
        assert!(missing.contains("libnginx-mod-stream"), "{missing}");
        let built_in = "configure arguments: --with-stream --with-stream_ssl_module";
        assert_eq!(stream_module_in(built_in, |_| false), Ok(None));
        let without = stream_module_in("configure arguments: --with-http_ssl_module", |_| true);
        assert!(without.unwrap_err().contains("without the stream module"));
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
            ..Default::default()
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
            ..Default::default()
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

    /// An HTTP upstream and a `stream` one (Git over SSH) in two files, the node's server on
    /// another port in the second: both taken out in one reload, both put back.
    fn two_doors(dir: &Path, nginx: &str) -> (NginxHost, PathBuf, PathBuf) {
        let http = dir.join("http.conf");
        let stream = dir.join("stream.conf");
        std::fs::write(
            &http,
            "upstream bitbucket {\n    server 127.0.0.1:1;\n    server 127.0.0.1:2;\n}\n",
        )
        .unwrap();
        std::fs::write(
            &stream,
            "upstream bitbucket_ssh {\n    server 127.0.0.1:11;\n    server 127.0.0.1:12;\n}\n",
        )
        .unwrap();
        std::fs::write(dir.join("nginx.pid"), format!("{}\n", std::process::id())).unwrap();
        let host = NginxHost::new(&NginxSettings {
            config: http.clone(),
            upstreams: vec!["bitbucket".into(), "bitbucket_ssh".into()],
            configs: [("bitbucket_ssh".to_string(), stream.clone())].into(),
            server_names: [(
                "bitbucket_ssh".to_string(),
                [("127.0.0.1:1".to_string(), "127.0.0.1:11".to_string())].into(),
            )]
            .into(),
            nginx: Some(nginx.into()),
            pid_file: Some(dir.join("nginx.pid")),
            reload_command: Some(vec!["true".into()]),
            ..Default::default()
        })
        .unwrap();
        (host, http, stream)
    }

    #[test]
    fn every_upstream_is_drained_and_restored_together() {
        let dir = tempfile::tempdir().unwrap();
        let (host, http, stream) = two_doors(dir.path(), "true");
        assert_eq!(
            host.describe(),
            format!(
                "nginx upstream bitbucket in {} and upstream bitbucket_ssh in {}",
                http.display(),
                stream.display()
            )
        );
        let d = host.drain("127.0.0.1:1", Duration::from_secs(1)).unwrap();
        assert!(d.changed);
        assert!(
            std::fs::read_to_string(&http)
                .unwrap()
                .contains("127.0.0.1:1 down;")
        );
        assert!(
            std::fs::read_to_string(&stream)
                .unwrap()
                .contains("127.0.0.1:11 down;")
        );
        assert_eq!(host.state("127.0.0.1:1").unwrap(), ServerAdmin::Out);
        assert!(host.enable("127.0.0.1:1").unwrap());
        assert!(!std::fs::read_to_string(&stream).unwrap().contains("down"));
        assert_eq!(host.state("127.0.0.1:1").unwrap(), ServerAdmin::In);
        // Node 2 has no name in the stream upstream, and 127.0.0.1:2 is not there.
        let e = host.check("127.0.0.1:2").unwrap_err();
        assert!(
            e.to_string()
                .contains("`upstream bitbucket_ssh` has no `server 127.0.0.1:2`"),
            "{e}"
        );
    }

    #[test]
    fn a_refused_check_puts_every_file_back() {
        let dir = tempfile::tempdir().unwrap();
        let (host, http, stream) = two_doors(dir.path(), "false");
        let before = (
            std::fs::read_to_string(&http).unwrap(),
            std::fs::read_to_string(&stream).unwrap(),
        );
        let e = host.drain("127.0.0.1:1", Duration::ZERO).unwrap_err();
        assert!(matches!(e, NginxError::Refused { .. }), "{e}");
        assert_eq!(std::fs::read_to_string(&http).unwrap(), before.0);
        assert_eq!(std::fs::read_to_string(&stream).unwrap(), before.1);
    }

    #[test]
    fn upstream_lists_are_checked() {
        let base = NginxSettings {
            config: "/etc/nginx/bitbucket.conf".into(),
            upstreams: vec!["bitbucket".into(), "bitbucket_ssh".into()],
            ..Default::default()
        };
        assert!(NginxHost::new(&base).is_ok());
        let none = NginxSettings {
            upstreams: vec![],
            ..base.clone()
        };
        let stray = NginxSettings {
            configs: [("ssh".to_string(), PathBuf::from("/x"))].into(),
            ..base.clone()
        };
        let relative = NginxSettings {
            configs: [("bitbucket_ssh".to_string(), PathBuf::from("x.conf"))].into(),
            ..base.clone()
        };
        for (bad, says) in [
            (none, "upstreams"),
            (stray, "\"ssh\""),
            (relative, "x.conf"),
        ] {
            let e = NginxHost::new(&bad).unwrap_err();
            assert!(e.to_string().contains(says), "{e}");
        }
        let in_another = NginxHost::new(&NginxSettings {
            upstream: "bitbucket".into(),
            ..base
        })
        .unwrap();
        assert_eq!(
            in_another.describe(),
            "nginx upstreams bitbucket and bitbucket_ssh in /etc/nginx/bitbucket.conf"
        );
    }
}
