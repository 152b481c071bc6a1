//! `bbupgrade-demo` (also run as `bbupgrade demo`): builds a sandbox cluster and upgrades it.
fn main() -> std::process::ExitCode {
    bbupgrade_demo::main()
}
