//! `bbupgrade demo --keep`: the sandbox stays up, not upgraded, and the demo prints the
//! `bbupgrade` commands to try on it by hand, exactly as they can be pasted into a shell.

use crate::sandbox::{Sandbox, which};
use bbupgrade::report::Output;
use serde::Serialize;
use std::path::{Path, PathBuf};

/// A command to try, and what it shows.
#[derive(Debug, Clone, Serialize)]
pub struct Suggestion {
    pub what: &'static str,
    pub command: String,
}

/// How to name `bbupgrade` in the printed commands: the program that ran this demo
/// (`bbupgrade demo` says which), else the one next to this program; plain `bbupgrade` when that
/// is the one on `PATH`.
pub fn bbupgrade_program() -> String {
    let launcher = std::env::var_os(bbupgrade::demo_launch::BBUPGRADE_PROGRAM_ENV)
        .map(PathBuf::from)
        .or_else(|| {
            let me = std::env::current_exe().ok()?;
            Some(me.parent()?.join("bbupgrade")).filter(|p| p.is_file())
        });
    let Some(program) = launcher else {
        return "bbupgrade".to_string();
    };
    let same = |a: &Path, b: &Path| matches!((a.canonicalize(), b.canonicalize()), (Ok(x), Ok(y)) if x == y);
    match which("bbupgrade") {
        Some(on_path) if same(&on_path, &program) => "bbupgrade".to_string(),
        _ => program.display().to_string(),
    }
}

/// A word as a POSIX shell reads it back unchanged.
pub fn shell_word(word: &str) -> String {
    let plain = !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-:=,+@%".contains(c));
    if plain {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

fn command(program: &str, words: &[&str]) -> String {
    let mut line = shell_word(program);
    for w in words {
        line.push(' ');
        line.push_str(&shell_word(w));
    }
    line
}

/// `status`, `plan`, `upgrade` and `rollback` on the sandbox's cluster, upgrading to `to` with
/// the sandbox's archive of it.
pub fn suggestions(sandbox: &Sandbox, program: &str, to: &str) -> Vec<Suggestion> {
    let inventory = sandbox.inventory.display().to_string();
    let archive = sandbox.to_archive.path.display().to_string();
    let target = [
        "--inventory",
        inventory.as_str(),
        "--cluster",
        sandbox.cluster_name.as_str(),
    ];
    let release = ["--to", to, "--archive", archive.as_str()];
    let with_release = |verb: &'static str| {
        let words: Vec<&str> = [verb]
            .iter()
            .chain(&target)
            .chain(&release)
            .copied()
            .collect();
        command(program, &words)
    };
    let plain = |verb: &'static str| {
        let words: Vec<&str> = [verb].iter().chain(&target).copied().collect();
        command(program, &words)
    };
    vec![
        Suggestion {
            what: "agents, versions, load and the journal's runs",
            command: plain("status"),
        },
        Suggestion {
            what: "preflight checks and the order, changing nothing",
            command: with_release("plan"),
        },
        Suggestion {
            what: "the rolling upgrade, node by node",
            command: with_release("upgrade"),
        },
        Suggestion {
            what: "back to the original version, while the upgrade is not finalized (a halted or interrupted run)",
            command: plain("rollback"),
        },
    ]
}

/// Prints what the sandbox is and the commands to try (standard output): as text, or as one
/// JSON line `{"event":"sandbox",...}`.
pub fn print(sandbox: &Sandbox, suggestions: &[Suggestion], output: Output) {
    match output {
        Output::Json => {
            let line = serde_json::json!({
                "event": "sandbox",
                "dir": sandbox.dir,
                "inventory": sandbox.inventory,
                "cluster": sandbox.cluster_name,
                "from_archive": sandbox.from_archive.path,
                "to_archive": sandbox.to_archive.path,
                "traffic_url": sandbox.traffic_url(),
                "commands": suggestions,
                "pid": std::process::id(),
            });
            println!("{line}");
        }
        Output::Human => {
            println!(
                "\nThe sandbox is up and not upgraded: {} nodes in {}.",
                sandbox.sim.nodes().len(),
                sandbox.dir.display()
            );
            println!(
                "Releases: {} (installed) and {}.",
                sandbox.from_archive.path.display(),
                sandbox.to_archive.path.display()
            );
            println!("Try, in another terminal:\n");
            for s in suggestions {
                println!("# {}\n{}\n", s.what, s.command);
            }
            println!(
                "It keeps running until Ctrl-C or SIGTERM (kill {}); then every process it started is stopped.",
                std::process::id()
            );
        }
    }
}
