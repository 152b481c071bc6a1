//! Java-style `.properties` files (`key=value`, `#` comments), as Bitbucket's `bitbucket.properties`
//! and `build.properties` are written.

use std::collections::BTreeMap;
use std::path::Path;

/// Parses `key=value` / `key: value` lines; later keys win, comments and blank lines are skipped.
pub fn parse(text: &str) -> BTreeMap<String, String> {
    let mut map = BTreeMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with('!') {
            continue;
        }
        let split = line.find(['=', ':']);
        let (key, value) = match split {
            Some(i) => (&line[..i], &line[i + 1..]),
            None => (line, ""),
        };
        map.insert(key.trim().to_string(), value.trim().to_string());
    }
    map
}

/// Reads and parses a properties file.
pub fn read(path: &Path) -> std::io::Result<BTreeMap<String, String>> {
    Ok(parse(&std::fs::read_to_string(path)?))
}

/// Sets `key` to `value` in properties text, replacing an existing line or appending one.
pub fn set(text: &str, key: &str, value: &str) -> String {
    let mut out = String::new();
    let mut found = false;
    for line in text.lines() {
        let trimmed = line.trim_start();
        let is_key = !trimmed.starts_with('#')
            && trimmed
                .strip_prefix(key)
                .is_some_and(|rest| rest.trim_start().starts_with(['=', ':']));
        if is_key && !found {
            out.push_str(&format!("{key}={value}\n"));
            found = true;
        } else if !is_key {
            out.push_str(line);
            out.push('\n');
        }
    }
    if !found {
        out.push_str(&format!("{key}={value}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_lines() {
        let p = parse("# c\n a = 1\nb:2\n\nc\nsim.x=a=b\n");
        assert_eq!(p["a"], "1");
        assert_eq!(p["b"], "2");
        assert_eq!(p["c"], "");
        assert_eq!(p["sim.x"], "a=b");
    }

    #[test]
    fn sets_keys() {
        let t = set("a=1\n#b=0\nb = 2\n", "b", "3");
        assert_eq!(t, "a=1\n#b=0\nb=3\n");
        assert_eq!(set("a=1\n", "ab", "2"), "a=1\nab=2\n");
    }
}
