//! How both binaries log: to stderr, filtered by `BBUPGRADE_LOG`; colour only on a terminal and
//! never with `NO_COLOR` set; no timestamps of our own under journald, which adds its own.

use std::io::IsTerminal;

/// Whether text written to stderr may carry ANSI colour: a terminal, and `NO_COLOR` unset or empty
/// (<https://no-color.org>).
pub fn stderr_colour() -> bool {
    colour_allowed(
        std::io::stderr().is_terminal(),
        std::env::var_os("NO_COLOR").as_deref(),
    )
}

/// The rule behind [`stderr_colour`], apart from the process's environment.
pub fn colour_allowed(terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    terminal && no_color.is_none_or(|v| v.is_empty())
}

/// Installs the stderr logger; `default_filter` applies when `BBUPGRADE_LOG` is unset or invalid.
pub fn init(default_filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("BBUPGRADE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(stderr_colour());
    // systemd sets JOURNAL_STREAM when stderr goes to the journal, which stamps every line itself.
    let _ = if std::env::var_os("JOURNAL_STREAM").is_some() {
        builder.without_time().try_init()
    } else {
        builder.try_init()
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(colour_allowed(true, None));
        assert!(colour_allowed(true, Some(OsStr::new(""))));
        assert!(!colour_allowed(true, Some(OsStr::new("1"))));
        assert!(!colour_allowed(false, None));
    }
}
