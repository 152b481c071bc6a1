//! The `bbupgrade` binary.
fn main() -> std::process::ExitCode {
    bbupgrade::cli::main()
}
