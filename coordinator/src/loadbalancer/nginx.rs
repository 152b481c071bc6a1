//! NGINX (open source, no runtime API): a server is taken out by editing its upstream block (mark it
//! `down`, or comment it out), checking the result with `nginx -t` and reloading; old workers that
//! still serve requests are waited for. This runs where the NGINX configuration lives (the
//! coordinator's host for now; an agent with an `lb` role later).
//!
//! The edit is a pure function over the file's text ([`edit_server`]) that changes only the server's
//! own line and keeps every other byte; the driver writes it atomically with a backup, and puts the
//! original back (reloading nothing) when `nginx -t` refuses the result.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::{AdminState, DrainReport, LbError, LoadBalancer, OperState, ServerState};

pub const DEFAULT_NGINX: &str = "/usr/sbin/nginx";
pub const DEFAULT_MAIN_CONFIG: &str = "/etc/nginx/nginx.conf";
pub const DEFAULT_PID_FILE: &str = "/run/nginx.pid";
/// Bound on `nginx -t` and a reload command.
pub const COMMAND_TIMEOUT_SECS: u64 = 30;
/// How often a drain looks for workers still shutting down.
pub const DRAIN_POLL_MS: u64 = 200;
/// Put before a server line taken out in `remove` mode; restoring removes exactly this.
pub const REMOVED_MARKER: &str = "# bbupgrade-removed: ";
/// The previous version of the edited file is kept next to it under this suffix.
pub const BACKUP_SUFFIX: &str = ".bbupgrade.bak";

/// How a server is taken out of its upstream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum NginxMode {
    /// Add the `down` parameter to the server line.
    #[default]
    Down,
    /// Comment the server line out (for setups that reject `down`, e.g. with `hash` balancing).
    Remove,
}

/// Why an upstream file could not be edited; nothing was written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NginxEditError {
    #[error("there is no `upstream {0} {{ ... }}` block in this file")]
    NoUpstream(String),
    #[error("`upstream {upstream}` is defined {count} times in this file")]
    DuplicateUpstream { upstream: String, count: usize },
    #[error("`upstream {upstream}` has no `server {server}` (it lists: {found})")]
    NoServer {
        upstream: String,
        server: String,
        found: String,
    },
    #[error("`upstream {upstream}` lists `server {server}` {count} times")]
    DuplicateServer {
        upstream: String,
        server: String,
        count: usize,
    },
    #[error(
        "taking {server} out would leave `upstream {upstream}` with no server in rotation; refusing"
    )]
    LastServer { upstream: String, server: String },
    #[error(
        "`server {server}` does not stand on a line of its own; put it on its own line or use mode = \"down\""
    )]
    NotOnOwnLine { server: String },
    #[error("cannot parse the configuration: {0}")]
    Syntax(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tok {
    Word,
    Open,
    Close,
    Semi,
}

#[derive(Debug, Clone)]
struct Token {
    kind: Tok,
    start: usize,
    end: usize,
    /// The word without its quotes.
    text: String,
}

/// Splits NGINX configuration text into words, `{`, `}` and `;` with their byte spans; comments are
/// skipped. Only ASCII bytes are looked at, so the spans are always on character boundaries.
fn tokenize(text: &str) -> Result<Vec<Token>, NginxEditError> {
    let b = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        match c {
            b' ' | b'\t' | b'\r' | b'\n' => i += 1,
            b'#' => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'{' | b'}' | b';' => {
                let kind = match c {
                    b'{' => Tok::Open,
                    b'}' => Tok::Close,
                    _ => Tok::Semi,
                };
                out.push(Token {
                    kind,
                    start: i,
                    end: i + 1,
                    text: (c as char).to_string(),
                });
                i += 1;
            }
            b'"' | b'\'' => {
                let start = i;
                i += 1;
                while i < b.len() && b[i] != c {
                    i += if b[i] == b'\\' { 2 } else { 1 };
                }
                if i >= b.len() {
                    return Err(NginxEditError::Syntax(format!(
                        "unterminated quoted string at byte {start}"
                    )));
                }
                i += 1;
                out.push(Token {
                    kind: Tok::Word,
                    start,
                    end: i,
                    text: text[start + 1..i - 1].to_string(),
                });
            }
            _ => {
                let start = i;
                while i < b.len() {
                    match b[i] {
                        b' ' | b'\t' | b'\r' | b'\n' | b';' | b'}' => break,
                        // `${var}` is part of a word; any other `{` opens a block.
                        b'{' if i > start && b[i - 1] == b'$' => {
                            while i < b.len() && b[i] != b'}' {
                                i += 1;
                            }
                            i += 1;
                        }
                        b'{' => break,
                        _ => i += 1,
                    }
                }
                let end = i.min(b.len());
                out.push(Token {
                    kind: Tok::Word,
                    start,
                    end,
                    text: text[start..end].to_string(),
                });
            }
        }
    }
    Ok(out)
}

/// One directive: its words, where it starts and ends (after `;` or `}`), and a block's body.
#[derive(Debug, Clone)]
struct Directive {
    words: Vec<Token>,
    start: usize,
    end: usize,
    /// Byte span of the block's inside, between `{` and `}`.
    body_span: Option<(usize, usize)>,
    body: Vec<Directive>,
}

fn parse_block(
    tokens: &[Token],
    pos: &mut usize,
    nested: bool,
) -> Result<Vec<Directive>, NginxEditError> {
    let mut out = Vec::new();
    let mut words: Vec<Token> = Vec::new();
    while *pos < tokens.len() {
        let t = tokens[*pos].clone();
        *pos += 1;
        match t.kind {
            Tok::Word => words.push(t),
            Tok::Semi => {
                let Some(first) = words.first() else {
                    continue;
                };
                out.push(Directive {
                    start: first.start,
                    end: t.end,
                    words: std::mem::take(&mut words),
                    body_span: None,
                    body: Vec::new(),
                });
            }
            Tok::Open => {
                let start = words.first().map_or(t.start, |w| w.start);
                let body = parse_block(tokens, pos, true)?;
                let close = tokens
                    .get(*pos - 1)
                    .filter(|c| c.kind == Tok::Close)
                    .ok_or_else(|| {
                        NginxEditError::Syntax(format!(
                            "the block opened at byte {} is not closed",
                            t.start
                        ))
                    })?;
                out.push(Directive {
                    start,
                    end: close.end,
                    words: std::mem::take(&mut words),
                    body_span: Some((t.end, close.start)),
                    body,
                });
            }
            Tok::Close if nested => return Ok(out),
            Tok::Close => {
                return Err(NginxEditError::Syntax(format!(
                    "unexpected \"}}\" at byte {}",
                    t.start
                )));
            }
        }
    }
    if nested {
        return Err(NginxEditError::Syntax("a block is not closed".into()));
    }
    if let Some(w) = words.first() {
        return Err(NginxEditError::Syntax(format!(
            "directive {:?} at byte {} has no \";\"",
            w.text, w.start
        )));
    }
    Ok(out)
}

fn upstreams<'a>(ds: &'a [Directive], name: &str, out: &mut Vec<&'a Directive>) {
    for d in ds {
        if d.body_span.is_some()
            && d.words.len() == 2
            && d.words[0].text == "upstream"
            && d.words[1].text == name
        {
            out.push(d);
        } else {
            upstreams(&d.body, name, out);
        }
    }
}

/// The one `upstream NAME` block of a file, and its parse.
fn find_upstream(text: &str, upstream: &str) -> Result<Directive, NginxEditError> {
    let tokens = tokenize(text)?;
    let mut pos = 0;
    let tree = parse_block(&tokens, &mut pos, false)?;
    let mut found = Vec::new();
    upstreams(&tree, upstream, &mut found);
    match found.len() {
        0 => Err(NginxEditError::NoUpstream(upstream.to_string())),
        1 => Ok(found[0].clone()),
        count => Err(NginxEditError::DuplicateUpstream {
            upstream: upstream.to_string(),
            count,
        }),
    }
}

fn servers(block: &Directive) -> impl Iterator<Item = &Directive> {
    block
        .body
        .iter()
        .filter(|d| d.body_span.is_none() && d.words.len() >= 2 && d.words[0].text == "server")
}

fn has_param(d: &Directive, p: &str) -> bool {
    d.words[2..].iter().any(|w| w.text == p)
}

/// Addresses match as written, ignoring case (host names) and a trailing `/`.
fn same_address(a: &str, b: &str) -> bool {
    a.trim_end_matches('/')
        .eq_ignore_ascii_case(b.trim_end_matches('/'))
}

/// The one active `server ADDR` line, or `None` when it is not there.
fn the_server<'a>(
    block: &'a Directive,
    upstream: &str,
    server: &str,
) -> Result<Option<&'a Directive>, NginxEditError> {
    let matching: Vec<&Directive> = servers(block)
        .filter(|d| same_address(&d.words[1].text, server))
        .collect();
    match matching.len() {
        0 => Ok(None),
        1 => Ok(Some(matching[0])),
        count => Err(NginxEditError::DuplicateServer {
            upstream: upstream.to_string(),
            server: server.to_string(),
            count,
        }),
    }
}

fn no_server(block: &Directive, upstream: &str, server: &str) -> NginxEditError {
    let found: Vec<String> = servers(block).map(|d| d.words[1].text.clone()).collect();
    NginxEditError::NoServer {
        upstream: upstream.to_string(),
        server: server.to_string(),
        found: if found.is_empty() {
            "no servers".into()
        } else {
            found.join(", ")
        },
    }
}

/// Refuses to take out the last server that would still get traffic.
fn check_not_last(
    block: &Directive,
    target: &Directive,
    upstream: &str,
    server: &str,
) -> Result<(), NginxEditError> {
    let others = servers(block)
        .filter(|d| d.start != target.start)
        .filter(|d| !has_param(d, "down") && !has_param(d, "backup"))
        .count();
    if others == 0 {
        return Err(NginxEditError::LastServer {
            upstream: upstream.to_string(),
            server: server.to_string(),
        });
    }
    Ok(())
}

/// Lines inside the block that hold a server taken out by [`REMOVED_MARKER`]: (marker start, address).
fn removed_lines(text: &str, block: &Directive) -> Vec<(usize, String)> {
    let Some((from, to)) = block.body_span else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let mut offset = from;
    for line in text[from..to].split_inclusive('\n') {
        let indent = line.len() - line.trim_start().len();
        if let Some(rest) = line.trim_start().strip_prefix(REMOVED_MARKER) {
            let words: Vec<&str> = rest.split_whitespace().collect();
            if words.first() == Some(&"server")
                && let Some(addr) = words.get(1)
            {
                out.push((offset + indent, addr.trim_end_matches(';').to_string()));
            }
        }
        offset += line.len();
    }
    out
}

/// Marks `server` down in `upstream` (or clears its `down`), changing nothing else in `text`.
/// Already in the wanted state: the text comes back unchanged.
pub fn mark_server(
    text: &str,
    upstream: &str,
    server: &str,
    down: bool,
) -> Result<String, NginxEditError> {
    let block = find_upstream(text, upstream)?;
    let target =
        the_server(&block, upstream, server)?.ok_or_else(|| no_server(&block, upstream, server))?;
    let down_word = target.words[2..].iter().find(|w| w.text == "down");
    match (down, down_word) {
        (true, Some(_)) | (false, None) => Ok(text.to_string()),
        (true, None) => {
            check_not_last(&block, target, upstream, server)?;
            let last = target.words.last().map_or(target.start, |w| w.end);
            Ok(format!("{} down{}", &text[..last], &text[last..]))
        }
        (false, Some(w)) => {
            // Remove the word and the blank before it.
            let before = target
                .words
                .iter()
                .take_while(|x| x.start < w.start)
                .last()
                .map_or(w.start, |p| p.end);
            Ok(format!("{}{}", &text[..before], &text[w.end..]))
        }
    }
}

/// Comments `server` out of `upstream` with [`REMOVED_MARKER`] (or puts it back), changing nothing
/// else in `text`. Already in the wanted state: the text comes back unchanged.
pub fn remove_server(
    text: &str,
    upstream: &str,
    server: &str,
    removed: bool,
) -> Result<String, NginxEditError> {
    let block = find_upstream(text, upstream)?;
    let active = the_server(&block, upstream, server)?;
    let marked: Vec<usize> = removed_lines(text, &block)
        .into_iter()
        .filter(|(_, a)| same_address(a, server))
        .map(|(at, _)| at)
        .collect();
    match (removed, active) {
        (true, Some(d)) => {
            check_not_last(&block, d, upstream, server)?;
            let line_start = text[..d.start].rfind('\n').map_or(0, |i| i + 1);
            let line_end = text[d.end..].find('\n').map_or(text.len(), |i| d.end + i);
            let after = text[d.end..line_end].trim_start();
            let alone = text[line_start..d.start].trim().is_empty()
                && (after.is_empty() || after.starts_with('#'))
                && !text[d.start..d.end].contains('\n');
            if !alone {
                return Err(NginxEditError::NotOnOwnLine {
                    server: server.to_string(),
                });
            }
            Ok(format!(
                "{}{REMOVED_MARKER}{}",
                &text[..d.start],
                &text[d.start..]
            ))
        }
        (true, None) if !marked.is_empty() => Ok(text.to_string()),
        (false, Some(_)) => Ok(text.to_string()),
        (false, None) if marked.len() == 1 => {
            let at = marked[0];
            Ok(format!(
                "{}{}",
                &text[..at],
                &text[at + REMOVED_MARKER.len()..]
            ))
        }
        (false, None) if marked.len() > 1 => Err(NginxEditError::DuplicateServer {
            upstream: upstream.to_string(),
            server: server.to_string(),
            count: marked.len(),
        }),
        _ => Err(no_server(&block, upstream, server)),
    }
}

/// Takes `server` out (`out = true`) or puts it back, the way `mode` says.
pub fn edit_server(
    text: &str,
    upstream: &str,
    server: &str,
    mode: NginxMode,
    out: bool,
) -> Result<String, NginxEditError> {
    match mode {
        NginxMode::Down => mark_server(text, upstream, server, out),
        NginxMode::Remove => remove_server(text, upstream, server, out),
    }
}

/// Whether `server` is in rotation according to the file: `Ready`, or `Maint` when marked down or
/// commented out by us.
pub fn server_admin_state(
    text: &str,
    upstream: &str,
    server: &str,
) -> Result<AdminState, NginxEditError> {
    let block = find_upstream(text, upstream)?;
    match the_server(&block, upstream, server)? {
        Some(d) if has_param(d, "down") => Ok(AdminState::Maint),
        Some(_) => Ok(AdminState::Ready),
        None if removed_lines(text, &block)
            .iter()
            .any(|(_, a)| same_address(a, server)) =>
        {
            Ok(AdminState::Maint)
        }
        None => Err(no_server(&block, upstream, server)),
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

/// The settings of an NGINX load balancer, as the inventory gives them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NginxSettings {
    pub config: PathBuf,
    pub upstream: String,
    pub mode: NginxMode,
    pub main_config: Option<PathBuf>,
    pub prefix: Option<PathBuf>,
    pub nginx: Option<PathBuf>,
    pub pid_file: Option<PathBuf>,
    pub reload_command: Option<Vec<String>>,
}

/// One upstream of an NGINX on this host.
#[derive(Debug, Clone)]
pub struct Nginx {
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

impl Nginx {
    pub fn new(s: &NginxSettings) -> Result<Self, LbError> {
        if s.upstream.is_empty() || s.upstream.chars().any(|c| c.is_whitespace() || c == ';') {
            return Err(LbError::Config(format!(
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
                return Err(LbError::Config(format!(
                    "NGINX {what} {} must be an absolute path",
                    p.display()
                )));
            }
        }
        if s.reload_command.as_ref().is_some_and(|c| c.is_empty()) {
            return Err(LbError::Config(
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

    async fn read_config(&self) -> Result<String, LbError> {
        let path = self.config.clone();
        tokio::task::spawn_blocking(move || std::fs::read_to_string(&path))
            .await
            .map_err(|e| LbError::Config(e.to_string()))?
            .map_err(|e| LbError::Unreachable {
                lb: self.describe(),
                target: self.config.display().to_string(),
                reason: format!("cannot read it: {e}"),
            })
    }

    async fn write_config(&self, text: String, backup: Option<String>) -> Result<(), LbError> {
        let path = self.config.clone();
        let r = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            if let Some(b) = backup {
                let mut bak = path.as_os_str().to_owned();
                bak.push(BACKUP_SUFFIX);
                write_atomically(Path::new(&bak), &b)?;
            }
            write_atomically(&path, &text)
        })
        .await
        .map_err(|e| LbError::Config(e.to_string()))?;
        r.map_err(|e| LbError::Refused {
            lb: self.describe(),
            command: format!("write {}", self.config.display()),
            answer: e.to_string(),
        })
    }

    fn edit_error(&self, e: NginxEditError) -> LbError {
        match e {
            NginxEditError::NoServer { server, .. } => LbError::UnknownServer {
                lb: self.describe(),
                server,
            },
            NginxEditError::NoUpstream(_) => LbError::UnknownBackend {
                lb: self.describe(),
            },
            other => LbError::Refused {
                lb: self.describe(),
                command: format!("edit {}", self.config.display()),
                answer: other.to_string(),
            },
        }
    }

    /// Runs a program with a bound; returns (success, combined output).
    async fn run(&self, program: &Path, args: &[String]) -> Result<(bool, String), LbError> {
        let mut cmd = tokio::process::Command::new(program);
        cmd.args(args)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        let shown = format!("{} {}", program.display(), args.join(" "));
        match tokio::time::timeout(self.command_timeout, cmd.output()).await {
            Ok(Ok(out)) => Ok((
                out.status.success(),
                format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                )
                .trim()
                .to_string(),
            )),
            Ok(Err(e)) => Err(LbError::Unreachable {
                lb: self.describe(),
                target: shown,
                reason: format!("cannot run it: {e}"),
            }),
            Err(_) => Err(LbError::Unreachable {
                lb: self.describe(),
                target: shown,
                reason: format!("no answer within {:?}", self.command_timeout),
            }),
        }
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
    async fn check_config(&self) -> Result<(), LbError> {
        let args = self.check_args();
        let (ok, output) = self.run(&self.nginx, &args).await?;
        if ok {
            Ok(())
        } else {
            Err(LbError::Refused {
                lb: self.describe(),
                command: format!("{} {}", self.nginx.display(), args.join(" ")),
                answer: output,
            })
        }
    }

    fn master_pid(&self) -> Result<u32, LbError> {
        std::fs::read_to_string(&self.pid_file)
            .ok()
            .and_then(|t| t.trim().parse().ok())
            .ok_or_else(|| LbError::Unreachable {
                lb: self.describe(),
                target: self.pid_file.display().to_string(),
                reason:
                    "no master process id in the pid file; is nginx running, and is pid_file right?"
                        .into(),
            })
    }

    async fn reload(&self) -> Result<(), LbError> {
        if let Some(cmd) = &self.reload_command {
            let (ok, output) = self.run(Path::new(&cmd[0]), &cmd[1..]).await?;
            if !ok {
                return Err(LbError::Refused {
                    lb: self.describe(),
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
        .map_err(|e| LbError::Unreachable {
            lb: self.describe(),
            target: format!("master process {pid}"),
            reason: format!("SIGHUP failed: {e}"),
        })
    }

    /// Edits the file, checks it and reloads; the original stays (nothing reloaded) when the check
    /// fails. Returns whether anything changed.
    async fn apply(&self, server: &str, out: bool) -> Result<bool, LbError> {
        let original = self.read_config().await?;
        let edited = edit_server(&original, &self.upstream, server, self.mode, out)
            .map_err(|e| self.edit_error(e))?;
        if edited == original {
            return Ok(false);
        }
        self.write_config(edited, Some(original.clone())).await?;
        if let Err(e) = self.check_config().await {
            self.write_config(original, None).await?;
            return Err(e);
        }
        if let Err(e) = self.reload().await {
            self.write_config(original, None).await?;
            return Err(e);
        }
        Ok(true)
    }

    async fn confirm(&self, server: &str, wanted: AdminState) -> Result<(), LbError> {
        let state = self.server_state(server).await?;
        if state.admin != wanted {
            return Err(LbError::NotConfirmed {
                lb: self.describe(),
                server: server.to_string(),
                wanted: wanted.to_string(),
                found: state.admin.to_string(),
            });
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl LoadBalancer for Nginx {
    fn describe(&self) -> String {
        format!(
            "nginx upstream {} in {}",
            self.upstream,
            self.config.display()
        )
    }

    async fn server_state(&self, server: &str) -> Result<ServerState, LbError> {
        let text = self.read_config().await?;
        let admin =
            server_admin_state(&text, &self.upstream, server).map_err(|e| self.edit_error(e))?;
        Ok(ServerState {
            admin,
            // Open-source NGINX does not expose its view of the servers' health.
            operational: OperState::Unknown,
            current_sessions: 0,
        })
    }

    async fn drain(&self, server: &str, timeout: Duration) -> Result<DrainReport, LbError> {
        let start = Instant::now();
        let master = self.master_pid()?;
        let before: Vec<u32> = workers_of(master).into_iter().map(|(pid, _)| pid).collect();
        let changed = self.apply(server, true).await?;
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
                return Err(LbError::DrainTimeout {
                    lb: format!(
                        "{} (old worker processes still finishing requests)",
                        self.describe()
                    ),
                    server: server.to_string(),
                    sessions: left,
                    waited: start.elapsed(),
                });
            }
            tokio::time::sleep(self.poll).await;
        }
        self.confirm(server, AdminState::Maint).await?;
        Ok(DrainReport {
            waited: start.elapsed(),
            sessions_at_start: at_start,
        })
    }

    async fn enable(&self, server: &str) -> Result<(), LbError> {
        self.apply(server, false).await?;
        self.confirm(server, AdminState::Ready).await
    }

    async fn check_server(&self, server: &str) -> Result<(), LbError> {
        self.server_state(server).await?;
        self.master_pid()?;
        self.check_config().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TWO_UPSTREAMS: &str = "# Bitbucket behind NGINX\nupstream other {\n    server 10.0.0.9:80;\n}\n\nupstream bitbucket {\n    # the nodes\n    server 10.0.0.1:7990 weight=2 max_fails=3 fail_timeout=10s;   # node1\n    server 10.0.0.2:7990   max_fails=3;\n\tserver 10.0.0.3:7990 down;\n    server backup.example.com:7990 backup;\n    keepalive 16;\n}\n\nserver {\n    listen 80;\n    location / { proxy_pass http://bitbucket; }\n}\n";

    fn only_changed_line(before: &str, after: &str) -> Vec<(String, String)> {
        let (b, a): (Vec<&str>, Vec<&str>) = (before.lines().collect(), after.lines().collect());
        assert_eq!(b.len(), a.len(), "the number of lines changed");
        b.iter()
            .zip(&a)
            .filter(|(x, y)| x != y)
            .map(|(x, y)| (x.to_string(), y.to_string()))
            .collect()
    }

    #[test]
    fn marks_down_and_back_byte_for_byte() {
        let down = mark_server(TWO_UPSTREAMS, "bitbucket", "10.0.0.1:7990", true).unwrap();
        assert_eq!(
            only_changed_line(TWO_UPSTREAMS, &down),
            vec![(
                "    server 10.0.0.1:7990 weight=2 max_fails=3 fail_timeout=10s;   # node1".into(),
                "    server 10.0.0.1:7990 weight=2 max_fails=3 fail_timeout=10s down;   # node1"
                    .into()
            )]
        );
        assert_eq!(
            server_admin_state(&down, "bitbucket", "10.0.0.1:7990").unwrap(),
            AdminState::Maint
        );
        // Idempotent both ways.
        assert_eq!(
            mark_server(&down, "bitbucket", "10.0.0.1:7990", true).unwrap(),
            down
        );
        let back = mark_server(&down, "bitbucket", "10.0.0.1:7990", false).unwrap();
        assert_eq!(back, TWO_UPSTREAMS);
        assert_eq!(
            mark_server(&back, "bitbucket", "10.0.0.1:7990", false).unwrap(),
            back
        );

        // Odd spacing, a tab-indented line already down.
        let d2 = mark_server(TWO_UPSTREAMS, "bitbucket", "10.0.0.2:7990", true).unwrap();
        assert!(
            d2.contains("    server 10.0.0.2:7990   max_fails=3 down;\n"),
            "{d2}"
        );
        let up3 = mark_server(TWO_UPSTREAMS, "bitbucket", "10.0.0.3:7990", false).unwrap();
        assert_eq!(
            only_changed_line(TWO_UPSTREAMS, &up3),
            vec![(
                "\tserver 10.0.0.3:7990 down;".into(),
                "\tserver 10.0.0.3:7990;".into()
            )]
        );
        assert_eq!(
            server_admin_state(TWO_UPSTREAMS, "bitbucket", "10.0.0.3:7990").unwrap(),
            AdminState::Maint
        );
    }

    #[test]
    fn refusals_name_what_is_wrong() {
        assert_eq!(
            mark_server(TWO_UPSTREAMS, "nosuch", "10.0.0.1:7990", true),
            Err(NginxEditError::NoUpstream("nosuch".into()))
        );
        // The same address in another upstream is not ours.
        let e = mark_server(TWO_UPSTREAMS, "bitbucket", "10.0.0.9:80", true).unwrap_err();
        assert!(
            matches!(&e, NginxEditError::NoServer { found, .. } if found.contains("10.0.0.2:7990")),
            "{e}"
        );
        let twice = TWO_UPSTREAMS.replace("10.0.0.2:7990", "10.0.0.1:7990");
        assert!(matches!(
            mark_server(&twice, "bitbucket", "10.0.0.1:7990", true),
            Err(NginxEditError::DuplicateServer { count: 2, .. })
        ));
        let dup = format!("{TWO_UPSTREAMS}upstream other {{ server 1.2.3.4:80; }}\n");
        assert!(matches!(
            mark_server(&dup, "other", "1.2.3.4:80", true),
            Err(NginxEditError::DuplicateUpstream { count: 2, .. })
        ));
        // The only server (others down or backup) cannot be taken out.
        let one = mark_server(TWO_UPSTREAMS, "bitbucket", "10.0.0.2:7990", true).unwrap();
        assert!(matches!(
            mark_server(&one, "bitbucket", "10.0.0.1:7990", true),
            Err(NginxEditError::LastServer { .. })
        ));
        assert!(matches!(
            mark_server("upstream b { server a:1;", "b", "a:1", true),
            Err(NginxEditError::Syntax(_))
        ));
        assert!(matches!(
            mark_server("upstream b { server \"a:1; }", "b", "a:1", true),
            Err(NginxEditError::Syntax(_))
        ));
    }

    #[test]
    fn remove_mode_comments_the_line_out_and_back() {
        let removed = remove_server(TWO_UPSTREAMS, "bitbucket", "10.0.0.2:7990", true).unwrap();
        assert_eq!(
            only_changed_line(TWO_UPSTREAMS, &removed),
            vec![(
                "    server 10.0.0.2:7990   max_fails=3;".into(),
                format!("    {REMOVED_MARKER}server 10.0.0.2:7990   max_fails=3;")
            )]
        );
        assert_eq!(
            server_admin_state(&removed, "bitbucket", "10.0.0.2:7990").unwrap(),
            AdminState::Maint
        );
        assert_eq!(
            remove_server(&removed, "bitbucket", "10.0.0.2:7990", true).unwrap(),
            removed
        );
        let back = remove_server(&removed, "bitbucket", "10.0.0.2:7990", false).unwrap();
        assert_eq!(back, TWO_UPSTREAMS);
        assert_eq!(
            remove_server(&back, "bitbucket", "10.0.0.2:7990", false).unwrap(),
            back
        );
        // A line holding a trailing comment is fine; one shared with another directive is not.
        let with_comment =
            remove_server(TWO_UPSTREAMS, "bitbucket", "10.0.0.1:7990", true).unwrap();
        assert!(with_comment.contains(&format!(
            "    {REMOVED_MARKER}server 10.0.0.1:7990 weight=2"
        )));
        let shared = "upstream b { server a:1; server b:2; }\n";
        assert!(matches!(
            remove_server(shared, "b", "a:1", true),
            Err(NginxEditError::NotOnOwnLine { .. })
        ));
        assert_eq!(
            mark_server(shared, "b", "a:1", true).unwrap(),
            "upstream b { server a:1 down; server b:2; }\n"
        );
        assert!(matches!(
            remove_server(TWO_UPSTREAMS, "bitbucket", "10.9.9.9:1", false),
            Err(NginxEditError::NoServer { .. })
        ));
    }

    #[test]
    fn included_files_hold_the_upstream() {
        // The main file only includes; the upstream lives in conf.d/upstream.conf.
        let main = "events {}\nhttp {\n    include /etc/nginx/conf.d/*.conf;\n    server { listen 80; location / { proxy_pass http://bitbucket; } }\n}\n";
        assert_eq!(
            mark_server(main, "bitbucket", "10.0.0.1:7990", true),
            Err(NginxEditError::NoUpstream("bitbucket".into()))
        );
        let included = "upstream bitbucket {\n  zone bitbucket 64k;\n  server 10.0.0.1:7990 max_fails=1 fail_timeout=5s;\n  server 10.0.0.2:7990 max_fails=1 fail_timeout=5s;\n}\n";
        let out = mark_server(included, "bitbucket", "10.0.0.1:7990", true).unwrap();
        assert_eq!(
            out,
            included.replace(
                "fail_timeout=5s;\n  server 10.0.0.2",
                "fail_timeout=5s down;\n  server 10.0.0.2"
            )
        );
        // Nested in http, with `${var}` words and quotes around.
        let nested = "http {\n  log_format x '$host ${request_uri} {';\n  upstream bitbucket {\n    server 10.0.0.1:7990;\n    server 10.0.0.2:7990;\n  }\n}\n";
        let out = mark_server(nested, "bitbucket", "10.0.0.2:7990", true).unwrap();
        assert!(out.contains("server 10.0.0.2:7990 down;"), "{out}");
    }

    #[test]
    fn real_world_config_edits_keep_every_other_byte() {
        let Some(path) = fixture("nginx/dartvaper-rpm-bitbucket-ssl.conf") else {
            return;
        };
        let original = std::fs::read_to_string(path).unwrap();
        // As shipped it proxies to one node and has no upstream: there is nothing to edit.
        assert_eq!(
            mark_server(&original, "bitbucket", "localhost:7990", true),
            Err(NginxEditError::NoUpstream("bitbucket".into()))
        );
        // A copy turned into a cluster: an upstream before the server block.
        let copy = format!(
            "upstream bitbucket {{\n    server 10.0.0.1:7990 max_fails=3;\n    server 10.0.0.2:7990 max_fails=3;\n}}\n{}",
            original.replace(
                "proxy_pass          http://localhost:7990;",
                "proxy_pass          http://bitbucket;"
            )
        );
        for mode in [NginxMode::Down, NginxMode::Remove] {
            let out = edit_server(&copy, "bitbucket", "10.0.0.2:7990", mode, true).unwrap();
            let changed = only_changed_line(&copy, &out);
            assert_eq!(changed.len(), 1, "{mode:?}: {changed:?}");
            assert!(changed[0].0.contains("10.0.0.2:7990"));
            assert_eq!(
                edit_server(&out, "bitbucket", "10.0.0.2:7990", mode, false).unwrap(),
                copy
            );
        }
    }

    fn fixture(rel: &str) -> Option<PathBuf> {
        let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../shared/fixtures/real-world")
            .join(rel);
        if p.is_file() {
            Some(p)
        } else {
            eprintln!("SKIPPED: fixture {} is absent", p.display());
            None
        }
    }

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
        assert!(Nginx::new(&ok).is_ok());
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
                matches!(Nginx::new(&bad), Err(LbError::Config(_))),
                "{bad:?}"
            );
        }
    }
}
