//! `bbupgrade demo`: the demo lives in its own program, `bbupgrade-demo` (package `bbupgrade-demo`),
//! so this one does not link the Bitbucket simulator. This finds it next to this program and runs it
//! in this process's place (same process id, signals and exit code) with the same arguments.

use anyhow::{Context, Result, anyhow};
use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::ExitCode;

/// The demo program's name, next to `bbupgrade`.
pub const DEMO_PROGRAM: &str = "bbupgrade-demo";
/// Names another demo program (the tests' build of it).
pub const DEMO_PROGRAM_ENV: &str = "BBUPGRADE_DEMO_BIN";
/// Tells the demo which `bbupgrade` ran it, for the commands it prints.
pub const BBUPGRADE_PROGRAM_ENV: &str = "BBUPGRADE_BIN";

/// Where the demo program is: [`DEMO_PROGRAM_ENV`], else next to this program.
pub fn demo_program() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os(DEMO_PROGRAM_ENV) {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().context("locating this program")?;
    let dir = exe.parent().context("this program has no folder")?;
    Ok(dir.join(DEMO_PROGRAM))
}

/// Replaces this process with the demo program; returns only when that fails.
pub fn exec(args: Vec<OsString>) -> Result<ExitCode> {
    let program = demo_program()?;
    if !program.is_file() {
        return Err(anyhow!(
            "`bbupgrade demo` runs the {DEMO_PROGRAM} program, which is not at {}: build it with \
             `cargo build --release -p bbupgrade-demo` (it lands next to bbupgrade in target/release/), \
             or name it with {DEMO_PROGRAM_ENV}",
            program.display()
        ));
    }
    let mut command = std::process::Command::new(&program);
    command.args(args);
    if std::env::var_os(BBUPGRADE_PROGRAM_ENV).is_none()
        && let Ok(me) = std::env::current_exe()
    {
        command.env(BBUPGRADE_PROGRAM_ENV, me);
    }
    let error = command.exec();
    Err(anyhow!(error)).with_context(|| format!("running {}", program.display()))
}
