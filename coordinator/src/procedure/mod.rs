//! The upgrade procedure of one cluster: the names of its steps (`step`), the pure rules that
//! decide what comes next (`decide`), the driver that carries them out through small traits
//! (`drive`), and those traits over the real cluster (`real`).

pub mod decide;
pub mod drive;
pub mod real;
pub mod step;

pub use real::{drive, drive_rollback};
pub use step::Step;

use crate::inventory::Timeouts;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Where the release comes from; recorded with the run so `resume` uses the same one.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum ArchiveSource {
    File {
        path: PathBuf,
        sha256: String,
        size_bytes: u64,
    },
    Url {
        url: String,
        sha256: String,
    },
}

impl ArchiveSource {
    pub fn sha256(&self) -> &str {
        match self {
            ArchiveSource::File { sha256, .. } | ArchiveSource::Url { sha256, .. } => sha256,
        }
    }

    pub fn size_bytes(&self) -> u64 {
        match self {
            ArchiveSource::File { size_bytes, .. } => *size_bytes,
            ArchiveSource::Url { .. } => 0,
        }
    }
}

/// The options of a run, kept in the journal.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunOptions {
    pub to: String,
    pub from: String,
    pub archive: Option<ArchiveSource>,
    pub auto_rollback: bool,
    pub timeouts: Timeouts,
}
