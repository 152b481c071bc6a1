//! `bbupgrade-demo`, built inside the test package so integration tests find it via CARGO_BIN_EXE_*.
fn main() -> std::process::ExitCode {
    bbupgrade_demo::main()
}
