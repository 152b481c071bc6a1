//! Stages a local archive with the agent's one-pass stage (the benchmark's stand-in for
//! `bbupgrade-agent stage`): `stage_file ARCHIVE SHA256 VERSION INSTALL_ROOT`.

use std::path::Path;
use std::process::ExitCode;
use std::time::Instant;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [archive, sha256, version, install_root] = args.as_slice() else {
        eprintln!("usage: stage_file ARCHIVE SHA256 VERSION INSTALL_ROOT");
        return ExitCode::from(2);
    };
    let started = Instant::now();
    match bbupgrade_agent::stage::run_local_stage(
        Path::new(archive),
        sha256,
        version,
        Path::new(install_root),
    ) {
        Ok(o) => {
            println!(
                "staged {} files, {} bytes at {} in {} ms",
                o.files,
                o.bytes,
                o.install_path.display(),
                started.elapsed().as_millis()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(if e.is_bad_input() { 2 } else { 1 })
        }
    }
}
