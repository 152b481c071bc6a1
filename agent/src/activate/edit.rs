//! Pure editing of systemd units and init.d scripts: install path rewrite and `--no-search`.

use std::path::{Path, PathBuf};

use super::shell::{self, Vars};
use super::{ActivateError, UnitEdit};

const NO_SEARCH: &str = "--no-search";
/// Placeholder for the file name in errors the pure editors raise; the driver names the file.
const SOME_FILE: &str = "the service definition";

/// One line of text split from its line ending, so edits keep `\n`/`\r\n` exactly.
struct Line<'a> {
    content: &'a str,
    ending: &'a str,
}

fn split_lines(text: &str) -> Vec<Line<'_>> {
    text.split_inclusive('\n')
        .map(|l| {
            if let Some(c) = l.strip_suffix("\r\n") {
                Line {
                    content: c,
                    ending: "\r\n",
                }
            } else if let Some(c) = l.strip_suffix('\n') {
                Line {
                    content: c,
                    ending: "\n",
                }
            } else {
                Line {
                    content: l,
                    ending: "",
                }
            }
        })
        .collect()
}

fn unsupported(reason: impl Into<String>) -> ActivateError {
    ActivateError::Unsupported {
        file: SOME_FILE.to_string(),
        reason: reason.into(),
    }
}

fn utf8(path: &Path) -> Result<&str, ActivateError> {
    path.to_str()
        .map(|s| s.trim_end_matches('/'))
        .ok_or_else(|| ActivateError::NonUtf8Path {
            path: path.to_path_buf(),
        })
}

fn is_name_char(c: char) -> bool {
    c.is_alphanumeric() || matches!(c, '.' | '-' | '_')
}

/// Replace whole-path occurrences of `old` by `new` (not `/opt/bb` inside `/opt/bb2` or `/x/opt/bb`).
fn replace_install(s: &str, old: &str, new: &str) -> (String, usize) {
    let mut out = String::with_capacity(s.len());
    let mut count = 0;
    let mut i = 0;
    while let Some(pos) = s[i..].find(old) {
        let start = i + pos;
        let end = start + old.len();
        let before_ok = s[..start]
            .chars()
            .next_back()
            .is_none_or(|c| !is_name_char(c) && c != '/');
        let after_ok = s[end..].chars().next().is_none_or(|c| !is_name_char(c));
        out.push_str(&s[i..start]);
        if before_ok && after_ok {
            out.push_str(new);
            count += 1;
        } else {
            out.push_str(old);
        }
        i = end;
    }
    out.push_str(&s[i..]);
    (out, count)
}

fn mentions(s: &str, install: &str) -> bool {
    replace_install(s, install, "").1 > 0
}

fn words(s: &str) -> impl Iterator<Item = &str> {
    s.split(|c: char| c.is_whitespace() || matches!(c, '"' | '\'' | ';' | '`'))
        .filter(|w| !w.is_empty())
}

fn has_no_search(s: &str) -> bool {
    words(s).any(|w| w == NO_SEARCH || w == "-ns")
}

/// What a program path in a definition is.
#[derive(Debug, PartialEq, Eq)]
enum Program {
    /// `<install>/bin/start-bitbucket.sh`
    Start(PathBuf),
    /// `<install>/bin/start-webapp.sh`: the webapp alone, never the bundled search.
    StartWebapp(PathBuf),
    /// `<install>/bin/stop-bitbucket.sh` or `stop-webapp.sh`
    Stop(PathBuf),
    Search,
    Tomcat,
    Other,
}

/// Characters a shell would still expand or glob: a path holding one is not an install.
const SHELL_SPECIAL: &[char] = &['$', '`', '*', '?', '(', ')', '[', ']', '{', '}'];

fn classify(program: &str) -> Program {
    let path = Path::new(program);
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let bin = path.parent();
    let install = bin
        .filter(|b| b.file_name().is_some_and(|n| n == "bin"))
        .and_then(Path::parent)
        .filter(|i| i.is_absolute() && !i.to_string_lossy().contains(SHELL_SPECIAL))
        .map(Path::to_path_buf);
    match (name, install) {
        ("start-search.sh" | "_start-search.sh" | "stop-search.sh" | "_stop-search.sh", _) => {
            Program::Search
        }
        ("startup.sh" | "shutdown.sh" | "catalina.sh", _) => Program::Tomcat,
        ("start-bitbucket.sh", Some(i)) => Program::Start(i),
        ("start-webapp.sh", Some(i)) => Program::StartWebapp(i),
        ("stop-bitbucket.sh" | "stop-webapp.sh", Some(i)) => Program::Stop(i),
        _ if program.contains("atlbitbucket_search") => Program::Search,
        _ => Program::Other,
    }
}

/// The program of an `Exec*=` value: its first word, without systemd's `-@:+!` prefixes.
fn exec_program(value: &str) -> &str {
    let v = value
        .trim_start()
        .trim_start_matches(['@', '-', ':', '+', '!']);
    words(v).next().unwrap_or("")
}

/// A `[Service]`-section `Key=value` line: the key and the byte offset of the value in the line.
fn key_value(content: &str) -> Option<(&str, usize)> {
    let trimmed = content.trim_start();
    if trimmed.is_empty() || trimmed.starts_with(['#', ';', '[']) {
        return None;
    }
    let eq = content.find('=')?;
    Some((content[..eq].trim(), eq + 1))
}

fn has_version_component(path: &Path) -> bool {
    path.components().any(|c| {
        let s = c.as_os_str().to_string_lossy();
        let b = s.as_bytes();
        b.windows(3)
            .any(|w| w[0].is_ascii_digit() && w[1] == b'.' && w[2].is_ascii_digit())
    })
}

/// How the definition relates to the old and new installs.
enum Mode {
    /// It points at the old install: rewrite the paths.
    Rewrite,
    /// It already points at the new install (a re-run): leave the paths.
    Already,
    /// It runs through an unversioned path (a `current` link): switch that instead.
    Link(PathBuf),
}

fn decide_mode(unit_install: &Path, old: &Path, new: &Path) -> Result<Mode, ActivateError> {
    if unit_install == new {
        Ok(Mode::Already)
    } else if unit_install == old {
        Ok(Mode::Rewrite)
    } else if !has_version_component(unit_install) {
        Ok(Mode::Link(unit_install.to_path_buf()))
    } else {
        Err(unsupported(format!(
            "it starts the install {}, which is neither the old install {} nor the new one {}; check the agent config",
            unit_install.display(),
            old.display(),
            new.display()
        )))
    }
}

fn mode_note(mode: &Mode, notes: &mut Vec<String>, new: &Path) {
    match mode {
        Mode::Already => notes.push(format!("already points at {}", new.display())),
        Mode::Link(link) => notes.push(format!(
            "runs through {} (no version in the path): left as it is; the link is switched to {} instead",
            link.display(),
            new.display()
        )),
        Mode::Rewrite => {}
    }
}

fn assigns_home(s: &str) -> bool {
    let t = s.trim_start().trim_start_matches('"');
    let t = t.strip_prefix("export ").map(str::trim_start).unwrap_or(t);
    t.starts_with("BITBUCKET_HOME=") || t.starts_with("STASH_HOME=")
}

/// Rewrite a systemd unit from `old_install` to `new_install` and make its start carry `--no-search`.
pub fn edit_systemd_unit(
    text: &str,
    old_install: &Path,
    new_install: &Path,
) -> Result<UnitEdit, ActivateError> {
    let old = utf8(old_install)?;
    let new = utf8(new_install)?;
    let lines = split_lines(text);

    // First pass: find the effective start and every stop, and refuse what we cannot handle.
    let mut section = String::new();
    let mut start: Option<Program> = None;
    let mut start_program = String::new();
    let mut notes = Vec::new();
    // A bad ExecStop is reported after the start, whose problem is usually the root one.
    let mut bad_stop: Option<ActivateError> = None;
    for line in &lines {
        let t = line.content.trim();
        if t.starts_with('[') {
            section = t.to_string();
            continue;
        }
        let Some((key, at)) = key_value(line.content) else {
            continue;
        };
        let value = &line.content[at..];
        if t.contains("atlbitbucket_search") || t.contains("start-search.sh") {
            notes.push(format!(
                "`{t}` refers to the bundled search service, which must not run on a Data Center node"
            ));
        }
        if section != "[Service]" {
            continue;
        }
        match key {
            // An empty ExecStart= resets the list; the last non-empty one is what runs.
            "ExecStart" if !value.trim().is_empty() => {
                start_program = exec_program(value).to_string();
                start = Some(classify(&start_program));
            }
            "ExecStop" if !value.trim().is_empty() => {
                let p = exec_program(value);
                let problem = match classify(p) {
                    Program::Stop(_) => None,
                    Program::Search => Some(search_refusal(p)),
                    _ => Some(unsupported(format!(
                        "ExecStop runs `{p}`, not the product's bin/stop-bitbucket.sh; point it at <install>/bin/stop-bitbucket.sh or remove it"
                    ))),
                };
                bad_stop = bad_stop.or(problem);
            }
            "EnvironmentFile" => notes.push(format!(
                "EnvironmentFile={} is not edited; check it names no install path",
                value.trim()
            )),
            _ => {}
        }
    }
    let unit_install = match start {
        None => {
            return Err(unsupported(
                "no ExecStart= in its [Service] section: it is not a Bitbucket service unit",
            ));
        }
        Some(Program::Start(i)) => i,
        Some(Program::StartWebapp(i)) => {
            notes.push(
                "ExecStart runs bin/start-webapp.sh, which starts the webapp only (never the bundled search)"
                    .to_string(),
            );
            i
        }
        Some(Program::Search) => return Err(search_refusal(&start_program)),
        Some(Program::Tomcat) => return Err(tomcat_refusal(&start_program)),
        Some(Program::Stop(_) | Program::Other) => return Err(wrapper_refusal(&start_program)),
    };
    if let Some(e) = bad_stop {
        return Err(e);
    }
    let mode = decide_mode(&unit_install, old_install, new_install)?;
    mode_note(&mode, &mut notes, new_install);

    // Second pass: edit line by line, everything else byte for byte.
    let mut out = String::with_capacity(text.len() + 32);
    section.clear();
    for (n, line) in lines.iter().enumerate() {
        let t = line.content.trim();
        if t.starts_with('[') {
            section = t.to_string();
        }
        let kv = key_value(line.content).filter(|_| section == "[Service]");
        let Some((key, at)) = kv else {
            if matches!(mode, Mode::Rewrite) && !t.starts_with(['#', ';']) && mentions(t, old) {
                notes.push(format!(
                    "line {} `{t}` names the old install and was left unchanged",
                    n + 1
                ));
            }
            out.push_str(line.content);
            out.push_str(line.ending);
            continue;
        };
        let prefix = &line.content[..at];
        let mut value = line.content[at..].to_string();
        if matches!(mode, Mode::Rewrite) {
            let rewritable = key.starts_with("Exec")
                || key == "WorkingDirectory"
                || key == "PIDFile"
                || (key == "Environment" && !value.contains("BITBUCKET_HOME="));
            if rewritable {
                let (v, count) = replace_install(&value, old, new);
                if count > 0 {
                    value = v;
                    if key == "PIDFile" && value.contains("catalina.pid") {
                        notes.push(
                            "PIDFile points at the 4.x-era work/catalina.pid under the install; start-bitbucket.sh of 5.x+ writes $BITBUCKET_HOME/log/bitbucket.pid instead"
                                .to_string(),
                        );
                    }
                }
            } else if mentions(&value, old) {
                notes.push(format!(
                    "line {} `{t}` names the old install and was left unchanged (BITBUCKET_HOME is the home, never moved into an install)",
                    n + 1
                ));
            }
        }
        if key == "ExecStart"
            && matches!(classify(exec_program(&value)), Program::Start(_))
            && !has_no_search(&value)
        {
            let trimmed_len = value.trim_end().len();
            value.insert_str(trimmed_len, &format!(" {NO_SEARCH}"));
            notes.push(format!("added {NO_SEARCH} to ExecStart"));
        }
        out.push_str(prefix);
        out.push_str(&value);
        out.push_str(line.ending);
    }
    let via_link = match mode {
        Mode::Link(l) => Some(l),
        _ => None,
    };
    Ok(UnitEdit {
        text: out,
        notes,
        via_link,
    })
}

fn search_refusal(program: &str) -> ActivateError {
    unsupported(format!(
        "it runs the bundled search service (`{program}`), which must not run on a Data Center node: stop and disable it instead of activating it"
    ))
}

fn tomcat_refusal(program: &str) -> ActivateError {
    unsupported(format!(
        "it runs Tomcat's `{program}` (the 4.x layout) instead of bin/start-bitbucket.sh, so --no-search cannot be added; point it at <install>/bin/start-bitbucket.sh --no-search first"
    ))
}

fn wrapper_refusal(program: &str) -> ActivateError {
    unsupported(format!(
        "its start runs `{program}`, not the product's <install>/bin/start-bitbucket.sh (a wrapper script or shell): bbupgrade cannot tell which install it starts or pass --no-search; point ExecStart at <install>/bin/start-bitbucket.sh --no-search, or configure the wrapper itself as an init.d-style definition"
    ))
}

/// A start of `start-bitbucket.sh` found in a script line (on its text with variables expanded).
enum StartCall {
    /// `…/start-bitbucket.sh`: the place in the line (as written) to add an argument.
    Path(usize),
    /// The name alone, or through a variable we cannot resolve: passed to a helper we cannot follow.
    Indirect,
}

/// The start calls of one script line, with the script's variables expanded. A single-word value
/// of an assignment (`START=$INST/bin/start-bitbucket.sh`) names the script but does not run it:
/// its call is where the variable is used.
fn start_calls(content: &str, vars: &Vars) -> Vec<StartCall> {
    let expanded = vars.expand(content);
    let text = &expanded.text;
    let definitions: Vec<_> = shell::assignments(content)
        .into_iter()
        .filter(|a| a.is_single_word())
        .map(|a| a.span)
        .collect();
    let defines = |at: usize| definitions.iter().any(|s| s.start < at && at <= s.end);
    let mut calls = Vec::new();
    for (pos, _) in text.match_indices("start-bitbucket.sh") {
        let end = expanded.source_end(pos + "start-bitbucket.sh".len());
        if defines(end) || in_test(content, end) {
            continue;
        }
        if text[..pos].ends_with('/') {
            calls.push(StartCall::Path(shell::argument_position(content, end)));
        } else {
            calls.push(StartCall::Indirect);
        }
    }
    for (pos, _) in text.match_indices("start-$") {
        if !defines(expanded.source_end(pos + 1)) {
            calls.push(StartCall::Indirect);
        }
    }
    calls
}

/// Whether the word ending at `end` is an operand of `[ … ]`/`test` (`[ -x "$START" ] || exit 0`),
/// not a program the line runs.
fn in_test(content: &str, end: usize) -> bool {
    let mut before = content[..end].split_whitespace().rev();
    before.next();
    for w in before {
        if matches!(w, "[" | "[[" | "test") {
            return true;
        }
        if matches!(
            w,
            ";" | "&&" | "||" | "|" | "then" | "do" | "else" | "{" | "("
        ) || w.ends_with(';')
        {
            return false;
        }
    }
    false
}

fn is_comment_or_echo(t: &str) -> bool {
    t.starts_with('#') || t.starts_with("echo ") || t.starts_with("log_")
}

/// Rewrite an init.d script (or a wrapper script) from `old_install` to `new_install`: every path
/// outside comments (the `cd <install>/bin`, `PIDFILE=`, an install variable such as
/// `INST=/opt/…/8.19.3` of any name …), `--no-search` after each `…/start-bitbucket.sh` or
/// `$VARIABLE` naming it where it is run. The LSB header and comments are kept as they are.
pub fn edit_initd_script(
    text: &str,
    old_install: &Path,
    new_install: &Path,
) -> Result<UnitEdit, ActivateError> {
    let old = utf8(old_install)?;
    let new = utf8(new_install)?;
    let first = text.lines().next().unwrap_or("");
    if first.starts_with("#!") && !first.contains("sh") {
        return Err(unsupported(format!(
            "it is not a shell script (`{first}`); bbupgrade edits only shell init scripts"
        )));
    }
    let lines = split_lines(text);
    let vars = Vars::parse(lines.iter().map(|l| l.content));
    let mut notes = Vec::new();
    let (mut starts, mut webapp, mut stops, mut search, mut tomcat) = (0, 0, 0, false, false);
    let mut ambiguous = Vec::new();
    for line in &lines {
        let t = line.content.trim();
        if is_comment_or_echo(t) {
            continue;
        }
        let expanded = vars.expand(line.content);
        let e = expanded.text.trim();
        ambiguous.extend(expanded.ambiguous.iter().cloned());
        for call in start_calls(line.content, &vars) {
            match call {
                StartCall::Path(_) => starts += 1,
                StartCall::Indirect => {
                    return Err(unsupported(format!(
                        "its start (`{t}`) names the start script indirectly or passes it to a shell helper, so bbupgrade cannot tell how arguments reach it; add --no-search there by hand and point it at the new install"
                    )));
                }
            }
            if words(e).any(|w| w == "start-stop-daemon") && !has_no_search(e) {
                return Err(unsupported(format!(
                    "it runs the start script through start-stop-daemon (`{t}`), whose own options come first: bbupgrade cannot tell where --no-search goes; pass it after `--` there (e.g. DAEMON_ARGS=--no-search) and bbupgrade edits the rest"
                )));
            }
            if e.starts_with("exec ") || words(e).any(|w| w == "-fg" || w == "run") {
                return Err(unsupported(format!(
                    "it runs the node in the foreground (`{t}`): a container entrypoint, upgraded by replacing the image, not by bbupgrade"
                )));
            }
        }
        webapp += e.matches("/start-webapp.sh").count();
        stops += e.matches("/stop-bitbucket.sh").count() + e.matches("/stop-webapp.sh").count();
        search |= e.contains("start-search.sh");
        tomcat |= e.contains("bin/startup.sh");
    }
    if starts == 0 && webapp == 0 {
        if search {
            return Err(search_refusal("start-search.sh"));
        }
        if tomcat {
            return Err(tomcat_refusal("bin/startup.sh"));
        }
        if stops == 0 {
            return Err(unsupported(
                "it calls neither bin/start-bitbucket.sh nor bin/stop-bitbucket.sh, so it is not a definition bbupgrade can point at an install",
            ));
        }
    }
    ambiguous.sort();
    ambiguous.dedup();
    for name in &ambiguous {
        let candidates = vars.candidates(name);
        let matters = candidates.iter().any(|v| {
            v.contains("start-bitbucket.sh")
                || mentions(v, old)
                || mentions(v, new)
                || (v.starts_with('/') && has_version_component(Path::new(v)))
        });
        if matters {
            return Err(unsupported(format!(
                "${name} is assigned different values ({}), so bbupgrade cannot tell which install or start script it runs; keep one assignment",
                candidates.join(", ")
            )));
        }
    }
    let unit_install = install_in_unit(text).ok_or_else(|| {
        unsupported(
            "no install directory found in it (no absolute <install>/bin/start-bitbucket.sh, `cd <install>/bin` or install variable, directly or through its variables)",
        )
    })?;
    let mode = decide_mode(&unit_install, old_install, new_install)?;
    mode_note(&mode, &mut notes, new_install);
    if lines.iter().any(|l| {
        let t = l.content.trim_start();
        t.starts_with(". ") || t.starts_with("source ")
    }) {
        notes.push(
            "it reads another file (`.`/`source`): a variable set there could change what runs; only this script was checked and edited"
                .to_string(),
        );
    }
    if webapp > 0 {
        notes.push(
            "it starts bin/start-webapp.sh, the webapp only: no bundled search is started from it, so no --no-search is added (disable the separate search service)"
                .to_string(),
        );
    }

    let mut out = String::with_capacity(text.len() + 32);
    for line in &lines {
        let t = line.content.trim();
        if t.starts_with('#') {
            out.push_str(line.content);
            out.push_str(line.ending);
            continue;
        }
        let mut content = line.content.to_string();
        if matches!(mode, Mode::Rewrite) && !assigns_home(&content) {
            content = replace_install(&content, old, new).0;
        }
        if !is_comment_or_echo(t) && !has_no_search(&vars.expand(&content).text) {
            // Insert after each call, from the back so offsets hold.
            let mut ends: Vec<usize> = start_calls(&content, &vars)
                .into_iter()
                .filter_map(|c| match c {
                    StartCall::Path(end) => Some(end),
                    StartCall::Indirect => None,
                })
                .collect();
            ends.sort_unstable();
            ends.dedup();
            for end in ends.iter().rev() {
                content.insert_str(*end, &format!(" {NO_SEARCH}"));
            }
            if !ends.is_empty() {
                notes.push(format!("added {NO_SEARCH} to `{}`", content.trim()));
            }
        }
        out.push_str(&content);
        out.push_str(line.ending);
    }
    if matches!(mode, Mode::Rewrite) {
        check_rewritten(text, &out, old)?;
    }
    let via_link = match mode {
        Mode::Link(l) => Some(l),
        _ => None,
    };
    Ok(UnitEdit {
        text: out,
        notes,
        via_link,
    })
}

/// After the rewrite, no line may still reach the old install through its variables (a path
/// built from pieces, such as a version in a variable of its own, is not rewritten), and no home
/// may have moved with a variable it is built from.
fn check_rewritten(before: &str, after: &str, old: &str) -> Result<(), ActivateError> {
    // A path under the home is the home's, even when the home sits inside an unversioned install.
    let homes = ["BITBUCKET_HOME", "STASH_HOME"];
    let vb = Vars::parse(before.lines()).forget(&homes);
    let va = Vars::parse(after.lines()).forget(&homes);
    for (n, (b, a)) in before.lines().zip(after.lines()).enumerate() {
        if a.trim_start().starts_with('#') {
            continue;
        }
        let (eb, ea) = (vb.expand(b).text, va.expand(a).text);
        if assigns_home(a) {
            if eb != ea {
                return Err(unsupported(format!(
                    "line {} `{}` sets the home from the install's variables, so the edit would move the home; set it to the home's own path",
                    n + 1,
                    a.trim()
                )));
            }
        } else if mentions(&ea, old) {
            return Err(unsupported(format!(
                "line {} `{}` still leads to the old install {old} after the edit (its path is built from pieces, such as a version in a variable of its own); name the install in one variable or one path",
                n + 1,
                a.trim()
            )));
        }
    }
    Ok(())
}

const INSTALL_VARS: [&str; 5] = [
    "BITBUCKET_INSTALLDIR",
    "BITBUCKET_INSTALL_DIR",
    "STASH_INSTALLDIR",
    "INST_DIR",
    "CATALINA_HOME",
];

/// Which install a unit or init script currently points at (for reporting and resume): the
/// directory above `bin/` of its start script, else of any product script it names, else its
/// `cd <install>/bin` (in a script, with its variables expanded), else an install-dir variable it
/// sets.
pub fn install_in_unit(text: &str) -> Option<PathBuf> {
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|t| !t.starts_with(['#', ';']))
        .collect();
    // A systemd unit: the last non-empty ExecStart= decides.
    let exec_start = lines
        .iter()
        .filter_map(|l| l.strip_prefix("ExecStart="))
        .rfind(|v| !v.trim().is_empty());
    if let Some(v) = exec_start {
        return match classify(exec_program(v)) {
            Program::Start(i) | Program::StartWebapp(i) | Program::Stop(i) => Some(i),
            _ => None,
        };
    }
    let vars = Vars::parse(lines.iter().copied());
    let mut found = None;
    for l in &lines {
        let expanded = vars.expand(l);
        let l = expanded.text.as_str();
        for w in words(l) {
            if let Program::Start(i) | Program::StartWebapp(i) | Program::Stop(i) = classify(w) {
                return Some(i);
            }
        }
        if found.is_none()
            && let Some(dir) = l.strip_prefix("cd ").and_then(|d| words(d).next())
            && let Some(install) = dir.trim_end_matches('/').strip_suffix("/bin")
            && install.starts_with('/')
            && !install.contains(SHELL_SPECIAL)
        {
            found = Some(PathBuf::from(install));
        }
    }
    if found.is_some() {
        return found;
    }
    for l in &lines {
        let l = l.strip_prefix("export ").unwrap_or(l);
        for var in INSTALL_VARS {
            if let Some(v) = l.strip_prefix(var).and_then(|r| r.strip_prefix('=')) {
                let v = v.trim().trim_matches(['"', '\'']).trim_end_matches('/');
                if v.starts_with('/') && !v.contains('$') {
                    return Some(PathBuf::from(v));
                }
            }
        }
    }
    None
}

#[cfg(test)]
pub(super) fn pure_tests_count(s: &str, old: &str) -> usize {
    replace_install(s, old, "").1
}

#[cfg(test)]
pub(super) mod pure_tests {
    use super::*;

    #[test]
    fn replace_install_respects_path_boundaries() {
        let (s, n) = replace_install(
            "/opt/bb /opt/bb/bin /opt/bb2 /x/opt/bb \"/opt/bb\" /opt/bb-1",
            "/opt/bb",
            "/new",
        );
        assert_eq!(s, "/new /new/bin /opt/bb2 /x/opt/bb \"/new\" /opt/bb-1");
        assert_eq!(n, 3);
    }

    #[test]
    fn classify_programs() {
        assert_eq!(
            classify("/opt/a/1.2.3/bin/start-bitbucket.sh"),
            Program::Start(PathBuf::from("/opt/a/1.2.3"))
        );
        assert_eq!(classify("/opt/a/bin/_start-search.sh"), Program::Search);
        assert_eq!(classify("/opt/a/bin/startup.sh"), Program::Tomcat);
        assert_eq!(
            classify("/usr/local/bin/start-bitbucket-wrapper"),
            Program::Other
        );
        assert_eq!(classify("start-bitbucket.sh"), Program::Other);
        assert_eq!(classify("/bin/bash"), Program::Other);
    }

    #[test]
    fn versions_in_paths() {
        assert!(has_version_component(Path::new("/opt/bitbucket/8.19.6")));
        assert!(has_version_component(Path::new(
            "/opt/atlassian-bitbucket-7.2.2"
        )));
        assert!(!has_version_component(Path::new(
            "/opt/atlassian/bitbucket/current"
        )));
        assert!(!has_version_component(Path::new(
            "/opt/atlassian-bitbucket"
        )));
    }
}
