//! The upgrade procedure of one cluster: the names of its steps (`step`), the pure rules that
//! decide what comes next (`decide`), the driver that carries them out through small traits
//! (`drive`), those traits over the real cluster (`real`, on the cluster's `context`, with the
//! journal called off the executor by `run_journal`), and the version-skew watch after a node
//! rejoins (`skew`).

pub mod context;
pub mod decide;
pub mod drive;
pub mod real;
pub mod run_journal;
pub mod skew;
pub mod step;

pub use crate::archive::ArchiveSource;
pub use context::{Ctx, actor, lock_cluster};
pub use real::{clean_up_installs, drive, drive_rollback, finalize};
pub use step::Step;

use crate::inventory::Timeouts;
use serde::{Deserialize, Serialize};

/// The options of a run, kept in the journal.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunOptions {
    pub to: String,
    pub from: String,
    pub archive: Option<ArchiveSource>,
    pub auto_rollback: bool,
    pub timeouts: Timeouts,
    /// Stop before approving: the nodes run the new version, upgrade mode stays on and a rollback
    /// is still possible; `bbupgrade finalize` approves later.
    #[serde(default)]
    pub no_finalize: bool,
}
