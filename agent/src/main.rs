//! The `bbupgrade-agent` binary.
fn main() -> std::process::ExitCode {
    bbupgrade_agent::cli::main()
}
