//! Cluster membership through the shared home: one JSON record under `$BITBUCKET_HOME/shared`,
//! read and written by every node under an exclusive `flock`, as nodes on NFS would.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use nix::fcntl::{Flock, FlockArg};

use crate::zdu::{ClusterRecord, Liveness};

/// Folder inside the shared home that holds the simulator's cluster record.
pub const CLUSTER_DIR: &str = ".sim-cluster";

/// Milliseconds since the Unix epoch; heartbeats are compared across processes.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The cluster record in one shared home.
#[derive(Debug, Clone)]
pub struct SharedHome {
    dir: PathBuf,
}

impl SharedHome {
    /// `shared` is the shared home (`$BITBUCKET_HOME/shared`).
    pub fn new(shared: &Path) -> Self {
        SharedHome {
            dir: shared.join(CLUSTER_DIR),
        }
    }

    fn record_path(&self) -> PathBuf {
        self.dir.join("cluster.json")
    }

    /// Reads, settles, changes and writes back the cluster record, holding the lock throughout.
    /// Blocking: call it from `spawn_blocking` in async code.
    pub fn update<T>(
        &self,
        liveness: Liveness,
        change: impl FnOnce(&mut ClusterRecord) -> T,
    ) -> anyhow::Result<T> {
        fs::create_dir_all(&self.dir)
            .with_context(|| format!("creating the cluster folder {}", self.dir.display()))?;
        let lock_path = self.dir.join("lock");
        let lock_file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .with_context(|| format!("opening {}", lock_path.display()))?;
        let _lock = Flock::lock(lock_file, FlockArg::LockExclusive)
            .map_err(|(_, e)| e)
            .with_context(|| format!("locking {}", lock_path.display()))?;
        let path = self.record_path();
        let mut record = match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .with_context(|| format!("reading the cluster record {}", path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => ClusterRecord::default(),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let before = record.clone();
        record.settle(now_ms(), liveness);
        let result = change(&mut record);
        if record != before {
            let tmp = self
                .dir
                .join(format!("cluster.json.{}", std::process::id()));
            let mut file =
                File::create(&tmp).with_context(|| format!("writing {}", tmp.display()))?;
            file.write_all(&serde_json::to_vec_pretty(&record)?)?;
            file.sync_data().ok();
            fs::rename(&tmp, &path).with_context(|| format!("replacing {}", path.display()))?;
        }
        Ok(result)
    }

    /// A settled copy of the cluster record.
    pub fn read(&self, liveness: Liveness) -> anyhow::Result<ClusterRecord> {
        self.update(liveness, |r| r.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::zdu::{JoinDecision, Liveness};

    #[test]
    fn record_survives_round_trip() {
        let dir = tempfile::tempdir().expect("tempdir");
        let shared = SharedHome::new(dir.path());
        let decision = shared
            .update(Liveness::default(), |r| {
                r.join("8.19.3".parse().expect("version"))
            })
            .expect("update");
        assert_eq!(decision, JoinDecision::Active);
        let rec = shared.read(Liveness::default()).expect("read");
        assert_eq!(
            rec.version.map(|v| v.to_string()),
            Some("8.19.3".to_string())
        );
    }
}
