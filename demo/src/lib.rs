//! `bbupgrade-demo`: a local cluster of simulated Bitbucket nodes with a real agent per node over
//! mutual TLS behind a real load balancer (`sandbox`), and the demo that upgrades it end to end
//! while sending traffic through it (`demo`). Kept out of the `bbupgrade` package so the shipped
//! coordinator does not link the simulator; `bbupgrade demo` runs this crate's binary.

pub mod demo;
pub mod keep;
pub mod sandbox;

/// The `bbupgrade-demo` program: parses its command line and runs the demo (exit codes as
/// `bbupgrade`'s: 0 done, 1 failed, 2 bad input).
pub fn main() -> std::process::ExitCode {
    use clap::Parser;
    let cli = demo::DemoCli::parse();
    bbupgrade::cli::run_to_exit_code(demo::run(cli.args))
}
