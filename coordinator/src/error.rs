//! The kind of error every command tells apart: what the user gave us was wrong (exit code 2).

/// An error caused by what the user gave us (exit code 2); nothing on the cluster was changed.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BadInput(pub String);

/// The admin pressed Ctrl-C during a run (exit code 130); what to run next was printed.
#[derive(Debug, thiserror::Error)]
#[error("interrupted")]
pub struct Interrupted;
