//! Load of the node: CPU, load average, memory, disk free, and the Bitbucket JVM found through
//! `$BITBUCKET_HOME/log/bitbucket.pid` (sysinfo).

use bbupgrade_common::proto::LoadSample;
use std::path::Path;
use std::sync::Mutex;
use sysinfo::{Disks, Pid, ProcessRefreshKind, ProcessesToUpdate, System};

pub struct Metrics {
    system: Mutex<System>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// The PID recorded in a Bitbucket PID file, if the file holds one.
/// The file is in the Bitbucket user's home: a link at it is not followed.
pub fn read_pid(pid_file: &Path) -> Option<u32> {
    let (dir, name) = crate::rootfs::Dir::open_parent_trusted(pid_file).ok()?;
    let bytes = dir.read(Path::new(&name)).ok()??;
    String::from_utf8_lossy(&bytes).trim().parse().ok()
}

/// Free bytes on the file system holding `path`: the disk with the longest mount point prefix.
pub fn free_bytes(path: &Path) -> u64 {
    match nix::sys::statvfs::statvfs(path) {
        Ok(s) => s.blocks_available() * s.fragment_size(),
        Err(_) => {
            let disks = Disks::new_with_refreshed_list();
            disks
                .list()
                .iter()
                .filter(|d| path.starts_with(d.mount_point()))
                .max_by_key(|d| d.mount_point().as_os_str().len())
                .map(|d| d.available_space())
                .unwrap_or(0)
        }
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut system = System::new();
        system.refresh_cpu_usage();
        Self {
            system: Mutex::new(system),
        }
    }

    /// One sample. Blocking (reads /proc); call from spawn_blocking.
    pub fn sample(&self, install_root: &Path, home: &Path, pid_file: &Path) -> LoadSample {
        let mut sys = self.system.lock().unwrap_or_else(|p| p.into_inner());
        sys.refresh_cpu_usage();
        sys.refresh_memory();
        let load = System::load_average();
        let mut sample = LoadSample {
            unix_ms: crate::journal::now_ms(),
            cpu_percent: sys.global_cpu_usage(),
            load_average_1m: load.one,
            load_average_5m: load.five,
            load_average_15m: load.fifteen,
            memory_total_bytes: sys.total_memory(),
            memory_used_bytes: sys.used_memory(),
            install_root_free_bytes: free_bytes(install_root),
            home_free_bytes: free_bytes(home),
            ..Default::default()
        };
        if let Some(pid) = read_pid(pid_file) {
            let pid = Pid::from_u32(pid);
            sys.refresh_processes_specifics(
                ProcessesToUpdate::Some(&[pid]),
                true,
                ProcessRefreshKind::nothing().with_cpu().with_memory(),
            );
            if let Some(p) = sys.process(pid) {
                sample.bitbucket_pid = pid.as_u32();
                sample.bitbucket_cpu_percent = p.cpu_usage();
                sample.bitbucket_rss_bytes = p.memory();
            }
        }
        sample
    }
}
