//! What an init script's own shell variables hold, as far as plain assignments tell: `NAME=value`
//! (quoted or not, after `export`/`readonly`/`local`/`declare`), and a line with `$NAME`/`${NAME}`
//! expanded, remembering for each expanded byte where it came from in the line, so an edit found
//! on the expanded text (`--no-search` after the start script) lands at the right place.
//!
//! Deliberately small: a value computed at run time (`$(…)`, backticks, `${X:-…}`) is unknown and
//! left as written; a name assigned different values is ambiguous, and the editor refuses a script
//! whose install or start script depends on one.

use std::collections::BTreeMap;
use std::ops::Range;

/// Nested references followed before giving up (`A=$B`, `B=$C`, …; also stops a cycle).
const MAX_EXPANSION_DEPTH: usize = 8;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Value {
    /// As written, quotes removed, references not yet expanded.
    Known(String),
    /// Computed when the script runs.
    Unknown,
    /// Assigned different values in different places.
    Ambiguous(Vec<String>),
}

/// One `NAME=value` at the start of a line (or after another assignment).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Assignment {
    pub name: String,
    /// The value as written in the line, quotes included.
    pub span: Range<usize>,
    /// The value with quotes removed; `None` when computed at run time.
    pub value: Option<String>,
}

impl Assignment {
    /// A value that is one word (a path, a script name), not a command line; a value computed
    /// when the script runs counts as one word (it is not a command this line runs).
    pub fn is_single_word(&self) -> bool {
        self.value
            .as_deref()
            .is_none_or(|v| !v.chars().any(char::is_whitespace))
    }
}

fn is_name_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_'
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// The length of a shell name at the start of `s`.
fn name_len(s: &str) -> usize {
    let mut chars = s.char_indices();
    match chars.next() {
        Some((_, c)) if is_name_start(c) => {}
        _ => return 0,
    }
    chars
        .find(|(_, c)| !is_name_char(*c))
        .map_or(s.len(), |(i, _)| i)
}

/// Parses one shell word starting at `at`: its end and its text without quotes (`None` when it
/// holds a command substitution or a parameter operator).
fn word(line: &str, at: usize) -> (usize, Option<String>) {
    let bytes = line.as_bytes();
    // First pass: where the word ends, and whether its value is known before the script runs.
    let mut known = true;
    let mut i = at;
    let mut quote: Option<u8> = None;
    while i < bytes.len() {
        let c = bytes[i];
        match (quote, c) {
            (None, b' ' | b'\t' | b';' | b'&' | b'|' | b')' | b'<' | b'>') => break,
            (None, b'"' | b'\'') => quote = Some(c),
            (Some(q), _) if c == q => quote = None,
            (Some(b'\''), _) => {}
            // A command substitution is one piece of the word, whatever spaces it holds.
            (_, b'`') => {
                known = false;
                i = line[i + 1..].find('`').map_or(line.len(), |n| i + 1 + n);
            }
            (_, b'$') if bytes.get(i + 1) == Some(&b'(') => {
                known = false;
                let mut depth = 0usize;
                let mut j = i + 1;
                while j < bytes.len() {
                    match bytes[j] {
                        b'(' => depth += 1,
                        b')' => {
                            depth -= 1;
                            if depth == 0 {
                                break;
                            }
                        }
                        _ => {}
                    }
                    j += 1;
                }
                i = j;
            }
            (_, b'$') if bytes.get(i + 1) == Some(&b'{') => {
                let inner = &line[i + 2..];
                let n = name_len(inner);
                if n == 0 || inner.as_bytes().get(n) != Some(&b'}') {
                    known = false;
                }
            }
            (_, b'\\') if i + 1 < bytes.len() => {
                i += 1;
            }
            _ => {}
        }
        i += 1;
    }
    // An unclosed substitution runs to the end of the line.
    let i = i.min(line.len());
    // Second pass: the text without quotes.
    let mut out = String::new();
    let mut q: Option<char> = None;
    let mut escaped = false;
    for c in line[at..i].chars() {
        if escaped {
            out.push(c);
            escaped = false;
            continue;
        }
        match (q, c) {
            (None, '"' | '\'') => q = Some(c),
            (Some(open), _) if c == open => q = None,
            (q, '\\') if q != Some('\'') => escaped = true,
            _ => out.push(c),
        }
    }
    (i, known.then_some(out))
}

/// The assignments a line starts with (after `export`, `readonly`, `local` or `declare [-flags]`).
pub(super) fn assignments(line: &str) -> Vec<Assignment> {
    let mut out = Vec::new();
    let mut at = line.len() - line.trim_start().len();
    for keyword in ["export ", "readonly ", "local ", "declare "] {
        if line[at..].starts_with(keyword) {
            at += keyword.len();
            at += line[at..].len() - line[at..].trim_start().len();
            while line[at..].starts_with('-') {
                let flags = line[at..].find(' ').unwrap_or(line.len() - at);
                at += flags;
                at += line[at..].len() - line[at..].trim_start().len();
            }
            break;
        }
    }
    loop {
        let n = name_len(&line[at..]);
        if n == 0 || line.as_bytes().get(at + n) != Some(&b'=') {
            break;
        }
        let name = line[at..at + n].to_string();
        let start = at + n + 1;
        let (end, value) = word(line, start);
        out.push(Assignment {
            name,
            span: start..end,
            value,
        });
        at = end + (line[end..].len() - line[end..].trim_start().len());
    }
    out
}

/// The variables a script assigns.
#[derive(Debug, Default)]
pub(super) struct Vars {
    map: BTreeMap<String, Value>,
}

/// A line with the script's variables expanded.
#[derive(Debug)]
pub(super) struct Expanded {
    pub text: String,
    /// For each byte of `text`, the offset in the line just after what produced it.
    src_end: Vec<usize>,
    /// Ambiguous names this line refers to.
    pub ambiguous: Vec<String>,
}

impl Expanded {
    /// Where, in the original line, the expanded text up to `end` ends.
    pub fn source_end(&self, end: usize) -> usize {
        if end == 0 { 0 } else { self.src_end[end - 1] }
    }
}

impl Vars {
    /// The assignments of every line that is not a comment.
    pub fn parse<'a>(lines: impl IntoIterator<Item = &'a str>) -> Vars {
        let mut map: BTreeMap<String, Value> = BTreeMap::new();
        for line in lines {
            if line.trim_start().starts_with('#') {
                continue;
            }
            for a in assignments(line) {
                let v = a.value.map_or(Value::Unknown, Value::Known);
                let merged = match (map.remove(&a.name), v) {
                    (None, v) => v,
                    (Some(Value::Known(x)), Value::Known(y)) if x == y => Value::Known(x),
                    (Some(Value::Known(x)), Value::Known(y)) => Value::Ambiguous(vec![x, y]),
                    (Some(Value::Ambiguous(mut xs)), Value::Known(y)) => {
                        if !xs.contains(&y) {
                            xs.push(y);
                        }
                        Value::Ambiguous(xs)
                    }
                    (Some(_), _) => Value::Unknown,
                };
                map.insert(a.name, merged);
            }
        }
        Vars { map }
    }

    /// These names left unexpanded from here on.
    pub fn forget(mut self, names: &[&str]) -> Vars {
        for n in names {
            self.map.remove(*n);
        }
        self
    }

    /// The candidate values (expanded) of an ambiguous name.
    pub fn candidates(&self, name: &str) -> Vec<String> {
        match self.map.get(name) {
            Some(Value::Ambiguous(vs)) => vs
                .iter()
                .map(|v| self.expand_depth(v, MAX_EXPANSION_DEPTH).text)
                .collect(),
            _ => Vec::new(),
        }
    }

    pub fn expand(&self, line: &str) -> Expanded {
        self.expand_depth(line, MAX_EXPANSION_DEPTH)
    }

    fn expand_depth(&self, line: &str, depth: usize) -> Expanded {
        let mut out = Expanded {
            text: String::with_capacity(line.len()),
            src_end: Vec::with_capacity(line.len()),
            ambiguous: Vec::new(),
        };
        let mut in_single = false;
        let mut in_double = false;
        let mut i = 0;
        while i < line.len() {
            let rest = &line[i..];
            let c = rest.chars().next().unwrap_or(' ');
            let literal = |out: &mut Expanded, len: usize| {
                out.text.push_str(&line[i..i + len]);
                out.src_end.extend(std::iter::repeat_n(i + len, len));
            };
            if c == '\'' && !in_double {
                in_single = !in_single;
            } else if c == '"' && !in_single {
                in_double = !in_double;
            } else if c == '\\' && !in_single && rest.len() > 1 {
                let len = 1 + rest[1..].chars().next().map_or(0, char::len_utf8);
                literal(&mut out, len);
                i += len;
                continue;
            } else if c == '$' && !in_single {
                let (name, len) = if let Some(inner) = rest.strip_prefix("${") {
                    let n = name_len(inner);
                    if n > 0 && inner.as_bytes().get(n) == Some(&b'}') {
                        (&inner[..n], n + 3)
                    } else {
                        ("", 0)
                    }
                } else {
                    let n = name_len(&rest[1..]);
                    (&rest[1..1 + n], n + 1)
                };
                if !name.is_empty() {
                    match self.map.get(name) {
                        Some(Value::Known(v)) if depth > 0 => {
                            let inner = self.expand_depth(v, depth - 1);
                            out.text.push_str(&inner.text);
                            out.src_end
                                .extend(std::iter::repeat_n(i + len, inner.text.len()));
                            out.ambiguous.extend(inner.ambiguous);
                            i += len;
                            continue;
                        }
                        Some(Value::Ambiguous(_)) => out.ambiguous.push(name.to_string()),
                        _ => {}
                    }
                }
            }
            literal(&mut out, c.len_utf8());
            i += c.len_utf8();
        }
        out
    }
}

/// Where to add an argument to a program whose name ends at `end` in `line`: right after it, or,
/// when the name alone is quoted as a command word (`"$START"`), after the closing quote. A name
/// inside a longer quoted string, or a quoted word after `-c`, is a command line another shell
/// runs (`su - user -c "$START"`), so the argument goes inside the quotes.
pub(super) fn argument_position(line: &str, end: usize) -> usize {
    let mut open: Option<(char, usize)> = None;
    for (i, c) in line[..end].char_indices() {
        match open {
            None if c == '"' || c == '\'' => open = Some((c, i)),
            Some((q, _)) if c == q => open = None,
            _ => {}
        }
    }
    let Some((quote, at)) = open else {
        return end;
    };
    let one_word = !line[at + 1..end].chars().any(char::is_whitespace);
    let closes = line[end..].starts_with(quote);
    let before = line[..at].split_whitespace().next_back().unwrap_or("");
    let after_dash_c = before.starts_with('-') && !before.starts_with("--") && before.contains('c');
    if one_word && closes && !after_dash_c {
        end + quote.len_utf8()
    } else {
        end
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assignments_in_their_forms() {
        let a = assignments("export BB=\"/opt/x/8.19.3\"  # the install");
        assert_eq!(a.len(), 1);
        assert_eq!(a[0].name, "BB");
        assert_eq!(a[0].value.as_deref(), Some("/opt/x/8.19.3"));
        assert_eq!(
            &"export BB=\"/opt/x/8.19.3\""[a[0].span.clone()],
            "\"/opt/x/8.19.3\""
        );
        assert_eq!(
            assignments("  local -r S=$BB/bin/start-bitbucket.sh")[0]
                .value
                .as_deref(),
            Some("$BB/bin/start-bitbucket.sh")
        );
        assert_eq!(assignments("V=$(cat /x)")[0].value, None);
        let line = "S=$(ls -d \"/x (1)\")/bin/start.sh `a b`; run";
        let a = assignments(line);
        assert_eq!(&line[a[0].span.clone()], "$(ls -d \"/x (1)\")/bin/start.sh");
        assert!(a[0].is_single_word());
        for open in ["X=`date", "X=$(date", "X=\"a", "X=a\\"] {
            assert_eq!(assignments(open)[0].span.end, open.len(), "{open}");
        }
        assert_eq!(assignments("V=${X:-/opt}")[0].value, None);
        assert_eq!(assignments("A=1 B='two words'").len(), 2);
        assert!(assignments("cd $X/bin").is_empty());
        assert!(assignments("[ \"$A\" = x ]").is_empty());
        assert!(!assignments("CMD=\"$S -fg\"")[0].is_single_word());
    }

    #[test]
    fn expansion_maps_back_to_the_line() {
        let vars = Vars::parse([
            "BASE=/opt/x",
            "INST=\"${BASE}/8.19.3\"",
            "S=$INST/bin/start-bitbucket.sh",
            "HOME_OF_USER=$(getent passwd bb)",
        ]);
        let line = "    su -c \"$S\" bb";
        let e = vars.expand(line);
        assert_eq!(
            e.text,
            "    su -c \"/opt/x/8.19.3/bin/start-bitbucket.sh\" bb"
        );
        let end = e.text.find("start-bitbucket.sh").unwrap() + "start-bitbucket.sh".len();
        assert_eq!(e.source_end(end), line.find("$S").unwrap() + 2);
        assert_eq!(
            vars.expand("'$S' \\$S $HOME_OF_USER").text,
            "'$S' \\$S $HOME_OF_USER"
        );
    }

    #[test]
    fn ambiguous_and_cyclic_names() {
        let vars = Vars::parse(["X=/a", "X=/b", "Y=$Z", "Z=$Y"]);
        let e = vars.expand("cd $X/bin");
        assert_eq!(e.text, "cd $X/bin");
        assert_eq!(e.ambiguous, vec!["X".to_string()]);
        assert_eq!(vars.candidates("X"), vec!["/a", "/b"]);
        // A cycle ends at the depth limit instead of looping.
        assert!(vars.expand("$Y").text.contains('$'));
    }

    #[test]
    fn where_an_argument_goes() {
        let pos = |l: &str| argument_position(l, l.find(".sh").unwrap() + 3);
        assert_eq!(pos("/x/start-bitbucket.sh"), 21);
        assert_eq!(pos("\"/x/start-bitbucket.sh\" &"), 23);
        assert_eq!(pos("su - bb -c \"/x/start-bitbucket.sh\""), 33);
        assert_eq!(
            pos("su - bb -c \"cd /x && ./start-bitbucket.sh >/dev/null\""),
            41
        );
        assert_eq!(pos("bash -lc '/x/start-bitbucket.sh'"), 31);
    }
}
