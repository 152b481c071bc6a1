//! The `bitbucket-sim` binary.
fn main() -> std::process::ExitCode {
    bbupgrade_sim::cli::main()
}
