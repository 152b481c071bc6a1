//! The coordinator's top-level modules import each other as a tree (a DAG): no module reaches,
//! through `crate::` paths, a module that reaches back to it. Read from the sources, so a new cycle
//! fails here with the modules on it. Test code is left out, as `cargo modules` leaves it out: a
//! `#[cfg(test)] mod tests { .. }` (kept at the end of its file) and files of `#[cfg(test)] mod x;`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Every `.rs` file under `dir`.
fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("reading coordinator/src") {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a file belongs to (`fleet/journal.rs` -> `fleet`); none for the crate root.
fn top_module(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).ok()?;
    let first = rel.components().next()?.as_os_str().to_str()?;
    let name = first.strip_suffix(".rs").unwrap_or(first);
    (!matches!(name, "lib" | "main")).then(|| name.to_string())
}

/// The modules `text` names through `crate::NAME`, including `use crate::{a, b::c}` groups.
fn crate_refs(text: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect()
    };
    for (i, _) in text.match_indices("crate::") {
        let rest = &text[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            for item in top_level_items(group) {
                let name = ident(item.trim());
                if !name.is_empty() {
                    found.insert(name);
                }
            }
        } else {
            let name = ident(rest);
            if !name.is_empty() {
                found.insert(name);
            }
        }
    }
    found
}

/// The comma-separated items of a `{...}` group (its text after `{`), nested groups kept whole.
fn top_level_items(group: &str) -> Vec<&str> {
    let (mut items, mut depth, mut start) = (Vec::new(), 0usize, 0usize);
    for (i, c) in group.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => {
                items.push(&group[start..i]);
                return items;
            }
            '}' => depth -= 1,
            ',' if depth == 0 => {
                items.push(&group[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    items.push(&group[start..]);
    items
}

/// A file's text without its test module (`#[cfg(test)]` then `mod tests {`, to the end).
fn without_tests(text: &str) -> &str {
    match text.find("#[cfg(test)]\nmod tests {") {
        Some(i) => &text[..i],
        None => text,
    }
}

/// Files that are test modules of their own (`#[cfg(test)]` then `mod name;` in `dir/parent.rs`).
fn test_files(files: &[PathBuf]) -> BTreeSet<PathBuf> {
    let mut out = BTreeSet::new();
    for file in files {
        let text = std::fs::read_to_string(file).expect("reading a source file");
        for (i, _) in text.match_indices("#[cfg(test)]\nmod ") {
            let rest = &text[i + "#[cfg(test)]\nmod ".len()..];
            let Some((name, _)) = rest.split_once(';') else {
                continue;
            };
            if name.contains(char::is_whitespace) {
                continue; // an inline module (`mod tests {`), not a file
            }
            out.insert(file.with_extension("").join(format!("{name}.rs")));
        }
    }
    out
}

/// The import graph between top-level modules, self-edges left out.
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let tests = test_files(&files);
    files.retain(|f| !tests.contains(f));
    let modules: BTreeSet<String> = files.iter().filter_map(|f| top_module(&src, f)).collect();
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in &files {
        let Some(from) = top_module(&src, file) else {
            continue;
        };
        let text = std::fs::read_to_string(file).expect("reading a source file");
        let to = edges.entry(from.clone()).or_default();
        for name in crate_refs(without_tests(&text)) {
            if name != from && modules.contains(&name) {
                to.insert(name);
            }
        }
    }
    edges
}

/// A cycle through `start`, as the modules on it, if there is one.
fn cycle_from(
    edges: &BTreeMap<String, BTreeSet<String>>,
    start: &str,
    path: &mut Vec<String>,
) -> Option<Vec<String>> {
    let here = path.last().cloned().unwrap_or_else(|| start.to_string());
    for next in edges.get(&here).into_iter().flatten() {
        if next == start {
            let mut cycle = path.clone();
            cycle.push(start.to_string());
            return Some(cycle);
        }
        if path.contains(next) {
            continue;
        }
        path.push(next.clone());
        if let Some(c) = cycle_from(edges, start, path) {
            return Some(c);
        }
        path.pop();
    }
    None
}

#[test]
fn the_coordinators_modules_import_each_other_as_a_tree() {
    let edges = graph();
    assert!(edges.len() > 10, "found too few modules: {edges:?}");
    let cycles: Vec<String> = edges
        .keys()
        .filter_map(|m| cycle_from(&edges, m, &mut vec![m.clone()]))
        .map(|c| c.join(" -> "))
        .collect();
    assert!(cycles.is_empty(), "module cycles:\n{}", cycles.join("\n"));
}

#[test]
fn crate_paths_are_read_from_use_groups_and_inline_paths() {
    let refs = crate_refs("use crate::{a::{B, C}, c};\nlet x = crate::d::e();\nuse crate::f;");
    let want: BTreeSet<String> = ["a", "c", "d", "f"].into_iter().map(String::from).collect();
    assert_eq!(refs, want);
}
