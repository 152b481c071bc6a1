//! Where a node finds its settings: per-node `-D` arguments (set by the admin in `_start-webapp.sh`),
//! the install's `build.properties`, and the cluster-wide knobs of the shared `bitbucket.properties`.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

use crate::properties;
use crate::version::Version;

pub const DEFAULT_PORT: u16 = 7990;
pub const DEFAULT_STARTUP_MS: u64 = 3_000;

/// The node's own, fixed settings.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub home: PathBuf,
    pub install: PathBuf,
    pub port: u16,
    pub address: IpAddr,
    pub name: String,
    pub startup_ms: u64,
    pub version: Version,
}

/// The `-Dkey=value` arguments among a JVM-style command line; anything else is ignored.
pub fn system_properties(args: &[String]) -> BTreeMap<String, String> {
    args.iter()
        .filter_map(|a| a.strip_prefix("-D"))
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => (kv.to_string(), String::new()),
        })
        .collect()
}

impl NodeConfig {
    /// Builds the settings from the command line and the environment (`BITBUCKET_HOME`, `INST_DIR`).
    pub fn from_args(
        args: &[String],
        env: impl Fn(&str) -> Option<String>,
    ) -> anyhow::Result<Self> {
        let props = system_properties(args);
        let home = props
            .get("bitbucket.home")
            .cloned()
            .or_else(|| env("BITBUCKET_HOME"))
            .filter(|h| !h.is_empty())
            .context("BITBUCKET_HOME is not set (neither -Dbitbucket.home nor the environment)")?;
        let install = props
            .get("bitbucket.install")
            .cloned()
            .or_else(|| env("INST_DIR"))
            .filter(|h| !h.is_empty())
            .context(
                "the install directory is not set (neither -Dbitbucket.install nor INST_DIR)",
            )?;
        let port = match props.get("server.port") {
            Some(p) => p
                .parse()
                .with_context(|| format!("-Dserver.port={p} is not a port number"))?,
            None => DEFAULT_PORT,
        };
        let address = match props.get("server.address") {
            Some(a) => a
                .parse()
                .with_context(|| format!("-Dserver.address={a} is not an IP address"))?,
            None => IpAddr::from([127, 0, 0, 1]),
        };
        let startup_ms = match props.get("sim.startup.ms") {
            Some(v) => v
                .parse()
                .with_context(|| format!("-Dsim.startup.ms={v} is not a number"))?,
            None => DEFAULT_STARTUP_MS,
        };
        let install = PathBuf::from(install);
        let version = read_version(&install)?;
        let name = props
            .get("cluster.node.name")
            .cloned()
            .unwrap_or_else(|| format!("node-{port}"));
        Ok(NodeConfig {
            home: PathBuf::from(home),
            install,
            port,
            address,
            name,
            startup_ms,
            version,
        })
    }

    /// The shared home, `$BITBUCKET_HOME/shared`.
    pub fn shared_dir(&self) -> PathBuf {
        self.home.join("shared")
    }

    /// The cluster-wide properties file.
    pub fn shared_properties(&self) -> PathBuf {
        self.shared_dir().join("bitbucket.properties")
    }
}

/// The version in `app/WEB-INF/classes/build.properties` of an install.
pub fn read_version(install: &Path) -> anyhow::Result<Version> {
    let path = install.join("app/WEB-INF/classes/build.properties");
    let props = properties::read(&path).with_context(|| format!("reading {}", path.display()))?;
    let Some(v) = props.get("build.version") else {
        bail!("{} has no build.version", path.display());
    };
    Ok(v.parse()?)
}

/// Cluster-wide knobs from the shared `bitbucket.properties`; a key suffixed with `.<node name>`
/// applies to that node only and wins over the plain key; runtime overrides (`/sim/faults`) win
/// over both.
#[derive(Debug, Clone, Default)]
pub struct Knobs {
    file: BTreeMap<String, String>,
    overrides: BTreeMap<String, String>,
    node: String,
}

pub const ADMIN_TOKEN: &str = "sim.admin.token";
pub const HEARTBEAT_STALE_MS: &str = "sim.heartbeat.stale.ms";
pub const UPGRADE_TASKS_MS: &str = "sim.upgrade.tasks.ms";
pub const UPGRADE_TASKS_FAIL: &str = "sim.fault.upgrade.tasks.fail";
pub const START_SLOW_MS: &str = "sim.fault.start.slow.ms";
pub const START_ERROR: &str = "sim.fault.start.error";
pub const CRASH_AFTER_MS: &str = "sim.fault.crash.after.ms";
pub const STOP_IGNORE_MS: &str = "sim.fault.stop.ignore.ms";
pub const SLOW_RESPONSE_MS: &str = "sim.fault.slow.response.ms";
pub const BACKGROUND_TASKS: &str = "sim.background.tasks";
pub const CLONE_MS: &str = "sim.scm.clone.ms";
pub const CLONE_CHUNKS: &str = "sim.scm.clone.chunks";
pub const ACTIVE_USER_WINDOW_MS: &str = "sim.activeusers.window.ms";
pub const STOP_GRACE_MS: &str = "sim.stop.grace.ms";

impl Knobs {
    pub fn new(node: &str) -> Self {
        Knobs {
            node: node.to_string(),
            ..Default::default()
        }
    }

    pub fn set_file(&mut self, file: BTreeMap<String, String>) {
        self.file = file;
    }

    pub fn set_override(&mut self, key: &str, value: &str) {
        self.overrides.insert(key.to_string(), value.to_string());
    }

    pub fn overrides(&self) -> &BTreeMap<String, String> {
        &self.overrides
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        let per_node = format!("{key}.{}", self.node);
        self.overrides
            .get(&per_node)
            .or_else(|| self.overrides.get(key))
            .or_else(|| self.file.get(&per_node))
            .or_else(|| self.file.get(key))
            .map(String::as_str)
    }

    pub fn u64_or(&self, key: &str, default: u64) -> u64 {
        self.get(key)
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(default)
    }

    pub fn flag(&self, key: &str) -> bool {
        self.get(key)
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("true"))
    }

    pub fn admin_token(&self) -> Option<&str> {
        self.file
            .get(ADMIN_TOKEN)
            .map(String::as_str)
            .filter(|t| !t.is_empty())
    }

    pub fn stale_ms(&self) -> u64 {
        self.u64_or(HEARTBEAT_STALE_MS, 5_000).max(200)
    }

    /// How often the node writes its heartbeat: well inside the staleness limit.
    pub fn heartbeat_interval_ms(&self) -> u64 {
        (self.stale_ms() / 5).clamp(50, 1_000)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_d_args() {
        let args: Vec<String> = [
            "-classpath",
            "/x/app",
            "-Dserver.port=8123",
            "-Xmx1g",
            "-Dcluster.node.name=n1",
            "-Dflag",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let p = system_properties(&args);
        assert_eq!(p["server.port"], "8123");
        assert_eq!(p["cluster.node.name"], "n1");
        assert_eq!(p["flag"], "");
        assert!(!p.contains_key("/x/app"));
    }

    #[test]
    fn knob_precedence() {
        let mut k = Knobs::new("node2");
        k.set_file(properties::parse("sim.fault.start.error=false\nsim.fault.start.error.node2=true\nsim.background.tasks=3\n"));
        assert!(k.flag(START_ERROR));
        assert_eq!(k.u64_or(BACKGROUND_TASKS, 0), 3);
        k.set_override(BACKGROUND_TASKS, "7");
        assert_eq!(k.u64_or(BACKGROUND_TASKS, 0), 7);
        assert!(!Knobs::new("node1").flag(START_ERROR));
    }
}
