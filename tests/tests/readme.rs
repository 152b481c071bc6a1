//! What the README tells a new user to copy works: its HAProxy sample passes `haproxy -c` without a
//! warning, and its exit codes are the ones `man bbupgrade` gives.

use bbupgrade_tests::describe;
use std::path::Path;
use std::process::Command;

fn readme() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// The text between `<!-- NAME -->` and `<!-- /NAME -->`, without a code fence around it.
fn between_markers(text: &str, name: &str) -> String {
    let open = format!("<!-- {name} -->");
    let close = format!("<!-- /{name} -->");
    let start = text
        .find(&open)
        .unwrap_or_else(|| panic!("README has no {open}"))
        + open.len();
    let end = text[start..]
        .find(&close)
        .unwrap_or_else(|| panic!("README has no {close}"))
        + start;
    text[start..end]
        .lines()
        .filter(|l| !l.starts_with("```"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn the_readme_haproxy_sample_passes_haproxy_check_without_warnings() {
    if !bbupgrade_tests::require_program("haproxy") {
        return;
    }
    let dir = bbupgrade_tests::temp_dir();
    let cfg = dir.path().join("haproxy.cfg");
    std::fs::write(&cfg, between_markers(&readme(), "haproxy-sample") + "\n").unwrap();
    let haproxy = ["/usr/sbin/haproxy", "/usr/bin/haproxy"]
        .into_iter()
        .find(|p| Path::new(p).is_file())
        .expect("haproxy");
    let out = Command::new(haproxy)
        .args(["-c", "-f"])
        .arg(&cfg)
        .output()
        .expect("running haproxy -c");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{}", describe(&out));
    assert!(
        !said.contains("WARNING") && !said.contains("ALERT"),
        "haproxy -c warns about the README's sample:\n{said}"
    );
}

#[test]
fn the_readme_exit_codes_are_the_man_pages() {
    let table = between_markers(&readme(), "exit-codes");
    for line in bbupgrade::manual::EXIT_CODES.lines() {
        let code = line.split_whitespace().next().expect("a code");
        assert!(
            table.contains(&format!("| {code} |")),
            "the README's exit codes lack {code}:\n{table}"
        );
    }
    assert_eq!(
        table
            .lines()
            .filter(|l| l.starts_with("| ") && !l.starts_with("| code"))
            .count(),
        bbupgrade::manual::EXIT_CODES.lines().count(),
        "{table}"
    );
}
