//! Prepare a staged install: point `set-bitbucket-home.sh` at the home and carry customizations over.
//!
//! Deciding code is pure ([`set_home_line`], [`merge_jvm_settings`], [`is_customized`]); [`prepare`]
//! is the blocking driver. A file counts as customized when its hash differs from what its release
//! shipped, as recorded in `<install>/.bbupgrade-manifest.json` at stage time.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::rootfs::{self, Dir, Reader};

/// The manifest staging writes, relative to the install.
pub const MANIFEST_FILE: &str = ".bbupgrade-manifest.json";
const HOME_SCRIPT: &str = "bin/set-bitbucket-home.sh";
const START_WEBAPP: &str = "bin/_start-webapp.sh";
/// Files carried whole when customized.
pub const DEFAULT_CARRIED: [&str; 3] = [
    "bin/set-jre-home.sh",
    "bin/set-bitbucket-user.sh",
    "bin/set-jmx-opts.sh",
];
/// The JVM settings of `_start-webapp.sh` carried into the new copy.
const JVM_SETTINGS: [&str; 3] = [
    "JVM_MINIMUM_MEMORY",
    "JVM_MAXIMUM_MEMORY",
    "JVM_SUPPORT_RECOMMENDED_ARGS",
];
const JAVA_OPTS_MARK: &str =
    "# JAVA_OPTS additions carried over from the previous install by bbupgrade";

#[derive(Debug, Clone)]
pub struct PrepareInput {
    pub current_install: PathBuf,
    pub new_install: PathBuf,
    pub home: PathBuf,
    /// Relative paths named in the agent config, carried whole when they differ.
    pub extra_files: Vec<String>,
    /// The Bitbucket user: files of the running install are read only as it could read them.
    pub bitbucket_user: Reader,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Carried {
    pub path: String,
    pub reason: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PrepareOutcome {
    pub carried: Vec<Carried>,
    pub notes: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    #[error(
        "BITBUCKET_HOME {home} contains whitespace, which Bitbucket refuses: move the home to a path without spaces"
    )]
    HomeWithSpaces { home: String },
    #[error("BITBUCKET_HOME {home} is not an absolute UTF-8 path: fix `home` in the agent config")]
    BadHome { home: String },
    #[error(
        "{file}: no `BITBUCKET_HOME=` assignment inside `if [ -z \"$BITBUCKET_HOME\" ]; then` or `if [ \"x${{BITBUCKET_HOME}}\" = \"x\" ]; then`; this is not a set-bitbucket-home.sh bbupgrade recognizes: set the home there by hand"
    )]
    NoHomeLine { file: String },
    #[error("could not {action} {}: {source}", file.display())]
    Io {
        file: PathBuf,
        action: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: not a valid manifest ({source}); re-stage the install", file.display())]
    Manifest {
        file: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "extra file `{path}` in the agent config must be a relative path inside the install, without `..`"
    )]
    BadExtraPath { path: String },
    #[error(
        "{} is not an install bbupgrade staged (owner uid {uid}, mode {mode:o}; staged installs are the agent's and not group/other-writable): stage the version again",
        install.display()
    )]
    NotOurs {
        install: PathBuf,
        uid: u32,
        mode: u32,
    },
}

#[derive(Debug, serde::Deserialize)]
struct Manifest {
    #[serde(default)]
    files: BTreeMap<String, String>,
}

fn io(action: &'static str, file: &Path) -> impl FnOnce(std::io::Error) -> PrepareError {
    let file = file.to_path_buf();
    move |source| PrepareError::Io {
        file,
        action,
        source,
    }
}

/// Quote a home for a shell assignment when it holds anything but plain path characters.
fn shell_value(home: &str) -> String {
    if home
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "/._-+,:@%".contains(c))
    {
        home.to_string()
    } else {
        format!("'{}'", home.replace('\'', r"'\''"))
    }
}

fn is_home_guard(line: &str) -> bool {
    let t: String = line.split_whitespace().collect::<Vec<_>>().join(" ");
    t == r#"if [ -z "$BITBUCKET_HOME" ]; then"#
        || t == r#"if [ -z "${BITBUCKET_HOME}" ]; then"#
        || t == r#"if [ "x${BITBUCKET_HOME}" = "x" ]; then"#
        || t == r#"if [ "x$BITBUCKET_HOME" = "x" ]; then"#
}

/// Rewrite the `BITBUCKET_HOME=` assignment of the first home guard so it sets `home`; every other
/// byte (indentation, trailing comments, line endings) is kept. Idempotent.
pub fn set_home_line(script: &str, home: &Path) -> Result<String, PrepareError> {
    let home_s = home.to_str().ok_or_else(|| PrepareError::BadHome {
        home: home.display().to_string(),
    })?;
    if home_s.chars().any(char::is_whitespace) {
        return Err(PrepareError::HomeWithSpaces {
            home: home_s.to_string(),
        });
    }
    if !home.is_absolute() {
        return Err(PrepareError::BadHome {
            home: home_s.to_string(),
        });
    }
    let lines: Vec<&str> = script.split_inclusive('\n').collect();
    let mut target = None;
    for (i, l) in lines.iter().enumerate() {
        if is_home_guard(l) {
            // The assignment is the first non-comment line inside the guard.
            for (j, inner) in lines.iter().enumerate().skip(i + 1) {
                let t = inner.trim();
                if t.is_empty() || t.starts_with('#') {
                    continue;
                }
                if t.starts_with("BITBUCKET_HOME=") {
                    target = Some(j);
                }
                break;
            }
            break;
        }
    }
    let Some(j) = target else {
        return Err(PrepareError::NoHomeLine {
            file: HOME_SCRIPT.to_string(),
        });
    };
    let line = lines[j];
    let (body, ending) = split_ending(line);
    let indent = &body[..body.len() - body.trim_start().len()];
    let after = &body[indent.len() + "BITBUCKET_HOME=".len()..];
    // Keep a trailing comment (`# set by chef`) and the whitespace before it.
    let rest = value_end(after);
    let mut out = String::with_capacity(script.len() + home_s.len());
    for l in &lines[..j] {
        out.push_str(l);
    }
    out.push_str(indent);
    out.push_str("BITBUCKET_HOME=");
    out.push_str(&shell_value(home_s));
    out.push_str(&after[rest..]);
    out.push_str(ending);
    for l in &lines[j + 1..] {
        out.push_str(l);
    }
    Ok(out)
}

fn split_ending(line: &str) -> (&str, &str) {
    if let Some(b) = line.strip_suffix("\r\n") {
        (b, "\r\n")
    } else if let Some(b) = line.strip_suffix('\n') {
        (b, "\n")
    } else {
        (line, "")
    }
}

/// Byte offset where a shell assignment's value ends (start of trailing whitespace or comment).
fn value_end(after: &str) -> usize {
    let mut quote: Option<char> = None;
    for (i, c) in after.char_indices() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), _) => {}
            (None, '"' | '\'') => quote = Some(c),
            (None, c) if c.is_whitespace() => return i,
            _ => {}
        }
    }
    after.len()
}

/// The assignment of `name` on this line, if it is one: `(indent, active)` where active is false
/// for a commented-out `#NAME=`.
fn assignment_of(line: &str, name: &str) -> Option<bool> {
    let t = line.trim_start();
    let (active, t) = match t.strip_prefix('#') {
        Some(rest) => (false, rest.trim_start()),
        None => (true, t),
    };
    let t = t.strip_prefix("export ").unwrap_or(t);
    t.strip_prefix(name)
        .filter(|r| r.starts_with('='))
        .map(|_| active)
}

/// Carry the JVM settings of an old `_start-webapp.sh` into a new one: each of
/// `JVM_MINIMUM_MEMORY`, `JVM_MAXIMUM_MEMORY`, `JVM_SUPPORT_RECOMMENDED_ARGS` set in `old` replaces
/// the new file's assignment (active, else commented out) with the new line's indentation; extra
/// `JAVA_OPTS=` assignments of `old` are added before the support-args block. Returns the merged
/// text and the names carried. Idempotent: merging into the result changes nothing.
pub fn merge_jvm_settings(old: &str, new: &str) -> (String, Vec<String>) {
    let old_lines: Vec<&str> = old.lines().collect();
    let mut lines: Vec<String> = new.split_inclusive('\n').map(str::to_string).collect();
    let mut carried = Vec::new();
    for name in JVM_SETTINGS {
        let Some(old_line) = old_lines
            .iter()
            .rev()
            .find(|l| assignment_of(l, name) == Some(true))
        else {
            continue;
        };
        let target = lines
            .iter()
            .position(|l| assignment_of(l, name) == Some(true))
            .or_else(|| {
                lines
                    .iter()
                    .position(|l| assignment_of(l, name) == Some(false))
            });
        let Some(t) = target else { continue };
        let (body, ending) = split_ending(&lines[t]);
        let indent = &body[..body.len() - body.trim_start().len()];
        let replaced = format!("{indent}{}{ending}", old_line.trim());
        if replaced != lines[t] {
            lines[t] = replaced;
            carried.push(name.to_string());
        }
    }
    // JAVA_OPTS additions: assignments in old that the new file does not have, other than the
    // product's own final `JAVA_OPTS="-classpath …"`.
    let additions: Vec<&str> = old_lines
        .iter()
        .filter(|l| assignment_of(l, "JAVA_OPTS") == Some(true))
        .filter(|l| !l.contains("-classpath"))
        .filter(|l| !lines.iter().any(|n| n.trim_end() == l.trim_end()))
        .copied()
        .collect();
    if !additions.is_empty() {
        let at = lines
            .iter()
            .position(|l| assignment_of(l, "JVM_SUPPORT_RECOMMENDED_ARGS").is_some())
            .map(|i| {
                // Before the comment block that introduces the support args.
                let mut i = i;
                while i > 0 && lines[i - 1].trim_start().starts_with('#') {
                    i -= 1;
                }
                i
            })
            .unwrap_or(lines.len());
        let ending = if new.contains("\r\n") { "\r\n" } else { "\n" };
        let mut block = vec![format!("{JAVA_OPTS_MARK}{ending}")];
        block.extend(
            additions
                .iter()
                .map(|a| format!("{}{ending}", a.trim_end())),
        );
        block.push(ending.to_string());
        lines.splice(at..at, block);
        carried.push("JAVA_OPTS".to_string());
    }
    (lines.concat(), carried)
}

/// Whether `current` is a customization: it differs from what its release shipped (the manifest's
/// hash) or, with no manifest entry, from the new install's shipped copy.
pub fn is_customized(current_sha: &str, shipped_sha: Option<&str>, new_sha: Option<&str>) -> bool {
    match (shipped_sha, new_sha) {
        (Some(s), _) => !s.eq_ignore_ascii_case(current_sha),
        (None, Some(n)) => !n.eq_ignore_ascii_case(current_sha),
        (None, None) => true,
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn safe_relative(rel: &str) -> Result<&Path, PrepareError> {
    let p = Path::new(rel);
    if rel.is_empty() || !p.components().all(|c| matches!(c, Component::Normal(_))) {
        return Err(PrepareError::BadExtraPath {
            path: rel.to_string(),
        });
    }
    Ok(p)
}

/// The two installs, opened once. The new one is root's and written through its handle; the
/// running one may belong to the Bitbucket user (installed before bbupgrade) and is only read,
/// never through a link and only what that user could read itself.
struct Installs {
    cur: Option<Dir>,
    cur_path: PathBuf,
    new: Dir,
    new_path: PathBuf,
    reader: Reader,
}

impl Installs {
    fn open(input: &PrepareInput) -> Result<Self, PrepareError> {
        let new_path = input.new_install.clone();
        let new = rootfs::open_install(&new_path).map_err(io("open", &new_path))?;
        let st = new.stat().map_err(io("inspect", &new_path))?;
        let me = rustix::process::geteuid().as_raw();
        if st.st_uid != me || st.st_mode & 0o022 != 0 {
            return Err(PrepareError::NotOurs {
                install: new_path,
                uid: st.st_uid,
                mode: st.st_mode & 0o7777,
            });
        }
        let cur_path = input.current_install.clone();
        let cur = match rootfs::open_install(&cur_path) {
            Ok(d) => Some(d),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(io("open", &cur_path)(e)),
        };
        Ok(Installs {
            cur,
            cur_path,
            new,
            new_path,
            reader: input.bitbucket_user,
        })
    }

    fn read_new(&self, rel: &Path) -> Result<Option<Vec<u8>>, PrepareError> {
        self.new
            .read(rel)
            .map_err(io("read", &self.new_path.join(rel)))
    }

    /// A file of the running install, read as the Bitbucket user could.
    fn read_cur(&self, rel: &Path) -> Result<Option<Vec<u8>>, PrepareError> {
        match &self.cur {
            None => Ok(None),
            Some(cur) => cur
                .read_as(rel, &self.reader)
                .map_err(io("read", &self.cur_path.join(rel))),
        }
    }

    fn cur_mode(&self, rel: &Path) -> Result<u32, PrepareError> {
        let st = match &self.cur {
            None => None,
            Some(cur) => cur
                .lstat(rel)
                .map_err(io("inspect", &self.cur_path.join(rel)))?,
        };
        Ok(st.map_or(0o644, |s| s.st_mode & 0o7777))
    }

    fn new_mode(&self, rel: &Path) -> Result<u32, PrepareError> {
        let st = self
            .new
            .lstat(rel)
            .map_err(io("inspect", &self.new_path.join(rel)))?;
        Ok(st.map_or(0o644, |s| s.st_mode & 0o7777))
    }

    fn manifest(&self, of_new: bool) -> Result<Option<Manifest>, PrepareError> {
        let rel = Path::new(MANIFEST_FILE);
        let (bytes, file) = if of_new {
            (self.read_new(rel)?, self.new_path.join(rel))
        } else {
            (self.read_cur(rel)?, self.cur_path.join(rel))
        };
        bytes
            .map(|b| {
                serde_json::from_slice(&b).map_err(|source| PrepareError::Manifest { file, source })
            })
            .transpose()
    }

    /// Writes `bytes` to `rel` in the new install if it differs, root-owned, `mode` masked.
    fn write_if_different(
        &self,
        rel: &Path,
        bytes: &[u8],
        mode: u32,
    ) -> Result<bool, PrepareError> {
        let dest = self.new_path.join(rel);
        let want_mode = mode & rootfs::MODE_MASK;
        let same_bytes = self.read_new(rel)?.as_deref() == Some(bytes);
        let same_mode = self.new_mode(rel)? == want_mode;
        if same_bytes && same_mode {
            return Ok(false);
        }
        let parent = rel.parent().unwrap_or(Path::new(""));
        let dir = self
            .new
            .create_dir_all(parent, 0o755)
            .map_err(io("create", &self.new_path.join(parent)))?;
        let name = rel.file_name().unwrap_or_default();
        dir.write_atomic(name, bytes, want_mode)
            .map_err(io("write", &dest))?;
        Ok(true)
    }
}

/// Blocking and idempotent: set the home in the new install and carry customizations over.
pub fn prepare(input: &PrepareInput) -> Result<PrepareOutcome, PrepareError> {
    let mut outcome = PrepareOutcome::default();
    let at = Installs::open(input)?;
    let cur = &input.current_install;

    // 1. The home line.
    let home_rel = Path::new(HOME_SCRIPT);
    let home_file = input.new_install.join(HOME_SCRIPT);
    let script = at
        .read_new(home_rel)?
        .ok_or_else(|| io("read", &home_file)(std::io::ErrorKind::NotFound.into()))?;
    let script = String::from_utf8_lossy(&script).into_owned();
    let edited = set_home_line(&script, &input.home).map_err(|e| match e {
        PrepareError::NoHomeLine { .. } => PrepareError::NoHomeLine {
            file: home_file.display().to_string(),
        },
        other => other,
    })?;
    if edited != script {
        at.write_if_different(home_rel, edited.as_bytes(), at.new_mode(home_rel)?)?;
    }
    {
        outcome.notes.push(format!(
            "BITBUCKET_HOME={} in {}",
            input.home.display(),
            home_file.display()
        ));
    }

    // 2. What counts as shipped.
    let cur_manifest = at.manifest(false)?;
    let new_manifest = at.manifest(true)?;
    if cur_manifest.is_none() {
        outcome.notes.push(format!(
            "no manifest {} was found (the install was not staged by bbupgrade), so listed files that differ from the new release's copy were carried",
            cur.join(MANIFEST_FILE).display()
        ));
    }
    let shipped = |rel: &str| {
        cur_manifest
            .as_ref()
            .and_then(|m| m.files.get(rel))
            .map(String::as_str)
    };
    let new_shipped = |rel: &str, new_bytes: Option<&[u8]>| {
        new_manifest
            .as_ref()
            .and_then(|m| m.files.get(rel).cloned())
            .or_else(|| new_bytes.map(sha256_hex))
    };

    // 3. Whole files from the default list.
    for rel in DEFAULT_CARRIED {
        let relp = Path::new(rel);
        let Some(bytes) = at.read_cur(relp)? else {
            continue;
        };
        let dest_bytes = at.read_new(relp)?;
        let reference = new_shipped(rel, dest_bytes.as_deref());
        if !is_customized(&sha256_hex(&bytes), shipped(rel), reference.as_deref()) {
            continue;
        }
        at.write_if_different(relp, &bytes, at.cur_mode(relp)?)?;
        let reason = if shipped(rel).is_some() {
            "changed from how its release shipped it (manifest hash differs); copied whole"
        } else {
            "differs from the new release's copy (no manifest); copied whole"
        };
        outcome.carried.push(Carried {
            path: rel.to_string(),
            reason: reason.to_string(),
        });
    }

    // 4. The JVM settings of _start-webapp.sh.
    let webapp = Path::new(START_WEBAPP);
    if let (Some(old_b), Some(new_b)) = (at.read_cur(webapp)?, at.read_new(webapp)?) {
        let reference = new_shipped(START_WEBAPP, Some(&new_b));
        if is_customized(
            &sha256_hex(&old_b),
            shipped(START_WEBAPP),
            reference.as_deref(),
        ) {
            let old_t = String::from_utf8_lossy(&old_b);
            let new_t = String::from_utf8_lossy(&new_b);
            let (merged, names) = merge_jvm_settings(&old_t, &new_t);
            // On a re-run the new file was merged already, so nothing changes now; report what
            // the old file sets so both runs give the same outcome.
            let merged_before = names.is_empty()
                && new_manifest
                    .as_ref()
                    .and_then(|m| m.files.get(START_WEBAPP))
                    .is_some_and(|h| !h.eq_ignore_ascii_case(&sha256_hex(&new_b)));
            let carried_names = if merged_before {
                jvm_names_set(&old_t)
            } else {
                names
            };
            at.write_if_different(webapp, merged.as_bytes(), at.new_mode(webapp)?)?;
            if !carried_names.is_empty() {
                outcome.carried.push(Carried {
                    path: START_WEBAPP.to_string(),
                    reason: format!(
                        "customized; carried the JVM settings {} into the new release's file",
                        carried_names.join(", ")
                    ),
                });
            }
        }
    }

    // 5. Files the admin listed.
    for rel in &input.extra_files {
        let relp = safe_relative(rel)?;
        let Some(bytes) = at.read_cur(relp)? else {
            outcome.notes.push(format!(
                "extra file {rel} is not in {}; nothing to carry",
                cur.display()
            ));
            continue;
        };
        // Compare with what the new release shipped, so a re-run reports the same.
        let differs = match new_manifest.as_ref() {
            Some(m) => m
                .files
                .get(rel.as_str())
                .is_none_or(|h| !h.eq_ignore_ascii_case(&sha256_hex(&bytes))),
            None => at.read_new(relp)?.as_deref() != Some(&bytes[..]),
        };
        if !differs {
            continue;
        }
        at.write_if_different(relp, &bytes, at.cur_mode(relp)?)?;
        outcome.carried.push(Carried {
            path: rel.clone(),
            reason: "listed in the agent config; copied whole".to_string(),
        });
    }
    Ok(outcome)
}

/// The JVM setting names an old `_start-webapp.sh` sets actively (used to report a re-run).
/// The `BITBUCKET_HOME` a systemd unit sets through `Environment=` (quoted or not), if any; the
/// last assignment wins, as in systemd.
pub fn unit_home(unit: &str) -> Option<String> {
    let mut found = None;
    for line in unit.lines() {
        let Some(rest) = line.trim().strip_prefix("Environment=") else {
            continue;
        };
        for word in split_unit_words(rest) {
            if let Some(v) = word.strip_prefix("BITBUCKET_HOME=") {
                found = Some(v.to_string());
            }
        }
    }
    found
}

/// Splits an `Environment=` value into assignments: whitespace-separated, with double or single
/// quotes around a whole assignment.
fn split_unit_words(value: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut quote: Option<char> = None;
    for c in value.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => cur.push(c),
            (None, '"' | '\'') => quote = Some(c),
            (None, c) if c.is_whitespace() => {
                if !cur.is_empty() {
                    words.push(std::mem::take(&mut cur));
                }
            }
            (None, c) => cur.push(c),
        }
    }
    if !cur.is_empty() {
        words.push(cur);
    }
    words
}

/// Refuses a unit whose `Environment=BITBUCKET_HOME` disagrees with the home the agent prepares for.
pub fn check_unit_home(unit: &str, home: &Path) -> Result<(), String> {
    match unit_home(unit) {
        Some(h) if Path::new(h.trim_end_matches('/')) != home => Err(format!(
            "the service sets BITBUCKET_HOME={h}, but the agent config says the home is {}; make them agree before upgrading",
            home.display()
        )),
        _ => Ok(()),
    }
}

fn jvm_names_set(old: &str) -> Vec<String> {
    let mut names: Vec<String> = JVM_SETTINGS
        .iter()
        .filter(|n| old.lines().any(|l| assignment_of(l, n) == Some(true)))
        .map(|n| n.to_string())
        .collect();
    if old
        .lines()
        .any(|l| assignment_of(l, "JAVA_OPTS") == Some(true) && !l.contains("-classpath"))
    {
        names.push("JAVA_OPTS".to_string());
    }
    names
}

#[cfg(test)]
mod tests;
