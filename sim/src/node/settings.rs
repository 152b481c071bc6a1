//! Where a node finds its settings: per-node `-D` arguments (set by the admin in `_start-webapp.sh`),
//! the install's `build.properties`, and the cluster-wide knobs of the shared `bitbucket.properties`.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

use crate::properties;
use crate::version::Version;

pub const DEFAULT_PORT: u16 = 7990;
/// Hazelcast's default cluster port.
pub const DEFAULT_HAZELCAST_PORT: u16 = 5701;
pub const DEFAULT_STARTUP_MS: u64 = 3_000;

/// The node's own, fixed settings.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub home: PathBuf,
    pub install: PathBuf,
    /// The HTTP port (`-Dserver.port`).
    pub port: u16,
    /// `-Dserver.address`; also the `ipAddress` the cluster view reports.
    pub address: IpAddr,
    /// `-Dcluster.node.name`, when given; the node is "Not configured" otherwise.
    pub name: Option<String>,
    /// `-Dsim.node.label`: the simulator's own handle on a node (per-node knobs, `X-Sim-Node`), set
    /// by `SimCluster`; not something Bitbucket reports.
    pub label: Option<String>,
    /// `-Dhazelcast.port`, when given (else the shared `hazelcast.port`, else 5701).
    pub hazelcast_port: Option<u16>,
    /// `-Dplugin.ssh.port`: the Git-over-SSH port. Without it the node opens no SSH port (the
    /// product's default, 7999, would collide between nodes sharing one address).
    pub ssh_port: Option<u16>,
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
        let hazelcast_port = match props.get("hazelcast.port") {
            Some(p) => Some(
                p.parse()
                    .with_context(|| format!("-Dhazelcast.port={p} is not a port number"))?,
            ),
            None => None,
        };
        let ssh_port = match props.get("plugin.ssh.port") {
            Some(p) => Some(
                p.parse()
                    .with_context(|| format!("-Dplugin.ssh.port={p} is not a port number"))?,
            ),
            None => None,
        };
        let install = PathBuf::from(install);
        let version = read_version(&install)?;
        let non_empty = |key: &str| props.get(key).filter(|v| !v.trim().is_empty()).cloned();
        Ok(NodeConfig {
            home: PathBuf::from(home),
            install,
            port,
            address,
            name: non_empty("cluster.node.name"),
            label: non_empty("sim.node.label"),
            hazelcast_port,
            ssh_port,
            startup_ms,
            version,
        })
    }

    /// The name the cluster view reports: the configured one or "Not configured".
    pub fn reported_name(&self) -> &str {
        self.name.as_deref().unwrap_or(crate::zdu::NOT_CONFIGURED)
    }

    /// What the simulator calls this node (`X-Sim-Node`, logs): its label, else its configured
    /// name, else `address:port`.
    pub fn handle(&self) -> String {
        self.label
            .clone()
            .or_else(|| self.name.clone())
            .unwrap_or_else(|| format!("{}:{}", self.address, self.port))
    }

    /// The suffixes of this node's own knobs (`key.<suffix>`), strongest first: the configured
    /// name, the label, the HTTP port.
    pub fn knob_suffixes(&self) -> Vec<String> {
        let mut suffixes: Vec<String> = Vec::new();
        for s in [
            self.name.clone(),
            self.label.clone(),
            Some(self.port.to_string()),
        ]
        .into_iter()
        .flatten()
        {
            if !suffixes.contains(&s) {
                suffixes.push(s);
            }
        }
        suffixes
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

/// Cluster-wide knobs from the shared `bitbucket.properties`; a key suffixed with `.<node>` (the
/// node's configured name, its label or its HTTP port: see [`NodeConfig::knob_suffixes`]) applies to
/// that node only and wins over the plain key; runtime overrides (`/sim/faults`) win over both.
#[derive(Debug, Clone, Default)]
pub struct Knobs {
    file: BTreeMap<String, String>,
    overrides: BTreeMap<String, String>,
    suffixes: Vec<String>,
}

/// The system administrator's personal access token (`Authorization: Bearer ...`).
pub const ADMIN_TOKEN: &str = "sim.admin.token";
/// The system administrator's user name and password (`Authorization: Basic ...`).
pub const ADMIN_USER: &str = "sim.admin.user";
pub const ADMIN_PASSWORD: &str = "sim.admin.password";
/// A valid personal access token without system-admin rights: 401 on `/rest/zdu`.
pub const USER_TOKEN: &str = "sim.user.token";
/// The cluster (Hazelcast) port of nodes started without `-Dhazelcast.port`.
pub const HAZELCAST_PORT: &str = "hazelcast.port";
pub const OFFLINE_ROW_TTL_MS: &str = "sim.offline.row.ttl.ms";
/// `absent` (default) or `null`: how blank fields of OFFLINE and STARTING rows are written.
pub const ZDU_BLANK_FIELDS: &str = "sim.zdu.blank.fields";
/// `empty` (default) or `json`: the body of a 409.
pub const ZDU_CONFLICT_BODY: &str = "sim.zdu.conflict.body";
/// `POST /rest/zdu/retryUpgrade` exists only when true.
pub const ZDU_RETRY_UPGRADE: &str = "sim.zdu.retry.upgrade";
/// Every `/rest/zdu` call answers 401 "requires a clustered installation".
pub const NOT_CLUSTERED: &str = "sim.fault.not.clustered";
/// A RUNNING node's `/status` says `MAINTENANCE`.
pub const MAINTENANCE: &str = "sim.fault.maintenance";
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
/// How long a Git-over-SSH clone streams its pack, and in how many pieces.
pub const SSH_CLONE_MS: &str = "sim.ssh.clone.ms";
pub const SSH_CLONE_CHUNKS: &str = "sim.ssh.clone.chunks";
pub const ACTIVE_USER_WINDOW_MS: &str = "sim.activeusers.window.ms";
pub const STOP_GRACE_MS: &str = "sim.stop.grace.ms";

impl Knobs {
    /// Knobs of the node whose own keys end in `.<node>`.
    pub fn new(node: &str) -> Self {
        Self::with_suffixes(vec![node.to_string()])
    }

    /// Knobs of a node known by several suffixes, strongest first.
    pub fn with_suffixes(suffixes: Vec<String>) -> Self {
        Knobs {
            suffixes,
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
        self.lookup(&self.overrides, key)
            .or_else(|| self.lookup(&self.file, key))
    }

    /// `key.<suffix>` for the strongest suffix present, else `key`, in one map.
    fn lookup<'a>(&self, map: &'a BTreeMap<String, String>, key: &str) -> Option<&'a str> {
        self.suffixes
            .iter()
            .find_map(|s| map.get(&format!("{key}.{s}")))
            .or_else(|| map.get(key))
            .map(String::as_str)
    }

    /// One of `choices` (case-insensitive), the first one when unset or not among them.
    pub fn choice(&self, key: &str, choices: &[&'static str]) -> &'static str {
        let value = self.get(key).map(str::trim).unwrap_or_default();
        choices
            .iter()
            .find(|c| c.eq_ignore_ascii_case(value))
            .or(choices.first())
            .copied()
            .unwrap_or_default()
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

    /// A cluster-wide setting of the shared file itself (credentials, `hazelcast.port`): neither
    /// per node nor overridable at runtime.
    pub fn shared(&self, key: &str) -> Option<&str> {
        self.file
            .get(key)
            .map(String::as_str)
            .filter(|t| !t.is_empty())
    }

    pub fn admin_token(&self) -> Option<&str> {
        self.shared(ADMIN_TOKEN)
    }

    pub fn stale_ms(&self) -> u64 {
        self.u64_or(HEARTBEAT_STALE_MS, 5_000).max(200)
    }

    /// How time changes the cluster record.
    pub fn liveness(&self) -> crate::zdu::Liveness {
        crate::zdu::Liveness {
            stale_ms: self.stale_ms(),
            offline_row_ttl_ms: self.u64_or(OFFLINE_ROW_TTL_MS, 600_000),
        }
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

    #[test]
    fn name_label_and_port_suffixes() {
        let install = tempfile::tempdir().expect("tempdir");
        let classes = install.path().join("app/WEB-INF/classes");
        std::fs::create_dir_all(&classes).expect("mkdir");
        std::fs::write(classes.join("build.properties"), "build.version=8.19.3\n").expect("write");
        let args = |extra: &[&str]| -> Vec<String> {
            ["-Dbitbucket.home=/h", "-Dserver.port=7991"]
                .iter()
                .chain(extra)
                .map(|s| s.to_string())
                .collect()
        };
        let env = |k: &str| (k == "INST_DIR").then(|| install.path().display().to_string());
        let plain = NodeConfig::from_args(&args(&[]), env).expect("config");
        assert_eq!(plain.reported_name(), "Not configured");
        assert_eq!(plain.handle(), "127.0.0.1:7991");
        assert_eq!(plain.knob_suffixes(), ["7991"]);
        assert_eq!(plain.hazelcast_port, None);
        let named = NodeConfig::from_args(
            &args(&[
                "-Dcluster.node.name=bb1",
                "-Dsim.node.label=node1",
                "-Dhazelcast.port=5702",
                "-Dplugin.ssh.port=7997",
            ]),
            env,
        )
        .expect("config");
        assert_eq!(named.reported_name(), "bb1");
        assert_eq!(named.handle(), "node1");
        assert_eq!(named.knob_suffixes(), ["bb1", "node1", "7991"]);
        assert_eq!(named.hazelcast_port, Some(5702));
        assert_eq!(named.ssh_port, Some(7997));
        assert_eq!(plain.ssh_port, None);
        assert!(NodeConfig::from_args(&args(&["-Dplugin.ssh.port=x"]), env).is_err());
        assert!(NodeConfig::from_args(&args(&["-Dhazelcast.port=x"]), env).is_err());

        let mut k = Knobs::with_suffixes(named.knob_suffixes());
        k.set_file(properties::parse(
            "sim.background.tasks.7991=1\nsim.background.tasks.node1=2\nsim.zdu.blank.fields=NULL\n",
        ));
        assert_eq!(
            k.u64_or(BACKGROUND_TASKS, 0),
            2,
            "the label wins over the port"
        );
        assert_eq!(k.choice(ZDU_BLANK_FIELDS, &["absent", "null"]), "null");
        assert_eq!(k.choice(ZDU_CONFLICT_BODY, &["empty", "json"]), "empty");
    }
}
