//! The pure part of NGINX upstream editing: find one `upstream` block in a configuration file's text
//! and take a `server` line out (mark it `down`, or comment it out) or put it back, changing only
//! that line and keeping every other byte. No I/O here; [`super::NginxHost`] reads, writes, checks
//! and reloads.

use serde::{Deserialize, Serialize};

/// Whether the load balancer may send a server new traffic, as its upstream file says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerAdmin {
    /// In rotation.
    In,
    /// Marked `down` or commented out.
    Out,
}

/// Put before a server line taken out in `remove` mode; restoring removes exactly this.
pub const REMOVED_MARKER: &str = "# bbupgrade-removed: ";

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

/// Whether `server` is in rotation according to the file: `In`, or `Out` when marked down or
/// commented out by us.
pub fn server_admin_state(
    text: &str,
    upstream: &str,
    server: &str,
) -> Result<ServerAdmin, NginxEditError> {
    let block = find_upstream(text, upstream)?;
    match the_server(&block, upstream, server)? {
        Some(d) if has_param(d, "down") => Ok(ServerAdmin::Out),
        Some(_) => Ok(ServerAdmin::In),
        None if removed_lines(text, &block)
            .iter()
            .any(|(_, a)| same_address(a, server)) =>
        {
            Ok(ServerAdmin::Out)
        }
        None => Err(no_server(&block, upstream, server)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

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
            ServerAdmin::Out
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
            ServerAdmin::Out
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
            ServerAdmin::Out
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
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "fixture {} is absent (CI=true)",
                p.display()
            );
            eprintln!("SKIPPED: fixture {} is absent", p.display());
            None
        }
    }
}
