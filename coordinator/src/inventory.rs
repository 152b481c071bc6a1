//! The inventory: the clusters the coordinator drives, their Bitbucket URL and token, load
//! balancer, and nodes with their agents. Raw TOML is validated into [`Inventory`].

use crate::loadbalancer::LbConfig;
use anyhow::{Context, Result, bail, ensure};
use bbupgrade_common::identity::validate_name;
use bbupgrade_common::tls::TlsFiles;
use serde::Deserialize;
use std::collections::HashSet;
use std::path::{Path, PathBuf};

pub const DEFAULT_DRAIN_TIMEOUT_SECS: u64 = 300;
pub const DEFAULT_STOP_TIMEOUT_SECS: u64 = 300;
pub const DEFAULT_START_TIMEOUT_SECS: u64 = 900;
pub const DEFAULT_ACTIVE_TIMEOUT_SECS: u64 = 300;
pub const DEFAULT_SOAK_SECS: u64 = 30;
pub const DEFAULT_AGENT_CONNECT_TIMEOUT_MS: u64 = 3000;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawInventory {
    /// The coordinator's own certificate, key and the CA.
    pub tls: TlsFiles,
    /// Where the journal lives (`sqlite:PATH` or a plain path).
    pub state: Option<String>,
    #[serde(default)]
    pub timeouts: Timeouts,
    #[serde(rename = "clusters", default)]
    pub clusters: Vec<RawCluster>,
}

/// Deadlines for each wait of a rolling upgrade.
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Timeouts {
    pub drain_secs: u64,
    pub stop_secs: u64,
    pub start_secs: u64,
    pub active_secs: u64,
    pub soak_secs: u64,
    pub agent_connect_ms: u64,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            drain_secs: DEFAULT_DRAIN_TIMEOUT_SECS,
            stop_secs: DEFAULT_STOP_TIMEOUT_SECS,
            start_secs: DEFAULT_START_TIMEOUT_SECS,
            active_secs: DEFAULT_ACTIVE_TIMEOUT_SECS,
            soak_secs: DEFAULT_SOAK_SECS,
            agent_connect_ms: DEFAULT_AGENT_CONNECT_TIMEOUT_MS,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCluster {
    pub name: String,
    /// Bitbucket's URL, normally the load balancer's.
    pub bitbucket_url: String,
    /// The nodes' own URLs, asked when `bitbucket_url` does not answer.
    #[serde(default)]
    pub bitbucket_node_urls: Vec<String>,
    pub token_file: Option<PathBuf>,
    pub token_env: Option<String>,
    #[serde(default)]
    pub labels: Vec<String>,
    /// When a fleet run may upgrade this cluster, e.g. `Sat-Sun 01:00-05:00 Europe/Berlin`.
    #[serde(default)]
    pub window: Option<String>,
    pub load_balancer: Option<LbConfig>,
    pub timeouts: Option<Timeouts>,
    pub nodes: Vec<RawNode>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawNode {
    pub id: String,
    /// The agent's `host:port`.
    pub agent: String,
    /// The server's name in the load balancer (default: the node id).
    pub lb_server: Option<String>,
    /// The node's name in Bitbucket's cluster view (default: the node id).
    pub bitbucket_name: Option<String>,
}

#[derive(Debug, Clone)]
pub enum TokenSource {
    File(PathBuf),
    Env(String),
}

#[derive(Debug, Clone)]
pub struct Node {
    pub id: String,
    pub agent: String,
    pub lb_server: String,
    pub bitbucket_name: String,
}

#[derive(Debug, Clone)]
pub struct Cluster {
    pub name: String,
    pub bitbucket_url: String,
    pub bitbucket_node_urls: Vec<String>,
    pub token: TokenSource,
    pub labels: Vec<String>,
    /// The maintenance window fleet runs respect (none: any time).
    pub window: Option<crate::fleet::window::Window>,
    pub load_balancer: LbConfig,
    pub timeouts: Timeouts,
    pub nodes: Vec<Node>,
}

#[derive(Debug, Clone)]
pub struct Inventory {
    pub path: PathBuf,
    pub tls: TlsFiles,
    pub state: Option<String>,
    pub clusters: Vec<Cluster>,
}

impl Inventory {
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the inventory {}", path.display()))?;
        let raw: RawInventory = toml::from_str(&text)
            .with_context(|| format!("parsing the inventory {}", path.display()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::validate(raw, base)
            .with_context(|| format!("in the inventory {}", path.display()))
            .map(|mut inv| {
                inv.path = path.to_path_buf();
                inv
            })
    }

    /// Checks the raw inventory; relative paths are taken from `base` (the inventory's folder).
    pub fn validate(raw: RawInventory, base: &Path) -> Result<Self> {
        let rel = |p: &Path| {
            if p.is_absolute() {
                p.to_path_buf()
            } else {
                base.join(p)
            }
        };
        let tls = TlsFiles {
            ca: rel(&raw.tls.ca),
            cert: rel(&raw.tls.cert),
            key: rel(&raw.tls.key),
            crl: raw.tls.crl.as_deref().map(rel),
        };
        let mut names = HashSet::new();
        let mut clusters = Vec::new();
        for c in raw.clusters {
            validate_name(&c.name).with_context(|| "cluster name".to_string())?;
            ensure!(
                names.insert(c.name.clone()),
                "cluster '{}' is listed twice",
                c.name
            );
            for url in std::iter::once(&c.bitbucket_url).chain(&c.bitbucket_node_urls) {
                ensure!(
                    url.starts_with("http://") || url.starts_with("https://"),
                    "cluster '{}': bitbucket URL '{url}' must be an http(s) URL",
                    c.name
                );
            }
            let token = match (c.token_file, c.token_env) {
                (Some(f), None) => TokenSource::File(rel(&f)),
                (None, Some(e)) => TokenSource::Env(e),
                (None, None) => bail!(
                    "cluster '{}': set token_file (a file holding a Bitbucket HTTP access token with SYS_ADMIN) or token_env",
                    c.name
                ),
                (Some(_), Some(_)) => bail!(
                    "cluster '{}': set token_file or token_env, not both",
                    c.name
                ),
            };
            ensure!(!c.nodes.is_empty(), "cluster '{}' has no nodes", c.name);
            let mut ids = HashSet::new();
            let mut nodes = Vec::new();
            for n in c.nodes {
                validate_name(&n.id).with_context(|| format!("cluster '{}': node id", c.name))?;
                ensure!(
                    ids.insert(n.id.clone()),
                    "cluster '{}': node '{}' is listed twice",
                    c.name,
                    n.id
                );
                ensure!(
                    n.agent
                        .rsplit_once(':')
                        .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok()),
                    "cluster '{}', node '{}': agent = '{}' must be host:port",
                    c.name,
                    n.id,
                    n.agent
                );
                nodes.push(Node {
                    lb_server: n.lb_server.unwrap_or_else(|| n.id.clone()),
                    bitbucket_name: n.bitbucket_name.unwrap_or_else(|| n.id.clone()),
                    id: n.id,
                    agent: n.agent,
                });
            }
            let window = c
                .window
                .as_deref()
                .map(str::parse)
                .transpose()
                .with_context(|| format!("cluster '{}'", c.name))?;
            clusters.push(Cluster {
                name: c.name,
                bitbucket_url: c.bitbucket_url.trim_end_matches('/').to_string(),
                bitbucket_node_urls: c
                    .bitbucket_node_urls
                    .iter()
                    .map(|u| u.trim_end_matches('/').to_string())
                    .collect(),
                token,
                labels: c.labels,
                window,
                load_balancer: c.load_balancer.unwrap_or(LbConfig::None {}),
                timeouts: c.timeouts.unwrap_or_else(|| raw.timeouts.clone()),
                nodes,
            });
        }
        Ok(Self {
            path: PathBuf::new(),
            tls,
            state: raw.state,
            clusters,
        })
    }

    pub fn cluster(&self, name: &str) -> Result<&Cluster> {
        self.clusters
            .iter()
            .find(|c| c.name == name)
            .with_context(|| {
                let known: Vec<_> = self.clusters.iter().map(|c| c.name.as_str()).collect();
                format!(
                    "no cluster named '{name}' in {}; known clusters: {}",
                    self.path.display(),
                    if known.is_empty() {
                        "none".to_string()
                    } else {
                        known.join(", ")
                    }
                )
            })
    }
}

impl Cluster {
    pub fn node(&self, id: &str) -> Result<&Node> {
        self.nodes.iter().find(|n| n.id == id).with_context(|| {
            format!(
                "cluster '{}' has no node '{id}' in the inventory",
                self.name
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Inventory> {
        Inventory::validate(toml::from_str(text)?, Path::new("/inv"))
    }

    const GOOD: &str = r#"
tls = { ca = "pki/ca.pem", cert = "pki/coordinator-admin.pem", key = "/etc/k.key" }
[[clusters]]
name = "prod"
bitbucket_url = "https://bb.example.com/"
token_file = "prod.token"
load_balancer = { kind = "none" }
[[clusters.nodes]]
id = "n1"
agent = "10.0.0.1:7443"
[[clusters.nodes]]
id = "n2"
agent = "node2.example.com:7443"
lb_server = "bb2"
"#;

    #[test]
    fn validates_and_fills_defaults() {
        let inv = parse(GOOD).unwrap();
        assert_eq!(inv.tls.ca, PathBuf::from("/inv/pki/ca.pem"));
        assert_eq!(inv.tls.key, PathBuf::from("/etc/k.key"));
        let c = inv.cluster("prod").unwrap();
        assert_eq!(c.bitbucket_url, "https://bb.example.com");
        assert_eq!(c.nodes[0].lb_server, "n1");
        assert_eq!(c.nodes[1].lb_server, "bb2");
        assert_eq!(c.timeouts, Timeouts::default());
        assert!(c.window.is_none());
        let windowed = parse(&GOOD.replace(
            "token_file",
            "window = \"Mon-Fri 22:00-02:00 UTC\"\ntoken_file",
        ))
        .unwrap();
        assert_eq!(
            windowed.clusters[0].window.as_ref().map(|w| w.to_string()),
            Some("Mon-Fri 22:00-02:00 UTC".to_string())
        );
        let err = inv.cluster("test").unwrap_err().to_string();
        assert!(err.contains("known clusters: prod"), "{err}");
        assert!(c.node("n9").is_err());
    }

    #[test]
    fn refuses_bad_inventories_with_reasons() {
        for (bad, why) in [
            (GOOD.replace("id = \"n2\"", "id = \"n1\""), "listed twice"),
            (
                GOOD.replace("10.0.0.1:7443", "10.0.0.1"),
                "must be host:port",
            ),
            (
                GOOD.replace("token_file = \"prod.token\"", ""),
                "token_file",
            ),
            (GOOD.replace("https://bb", "ftp://bb"), "http(s)"),
            (
                GOOD.replace("name = \"prod\"", "name = \"pr od\""),
                "cluster name",
            ),
            (
                GOOD.replace(
                    "token_file",
                    "window = \"Sat 01:00-05:00 Mars/X\"\ntoken_file",
                ),
                "cluster 'prod': maintenance window",
            ),
        ] {
            let err = format!("{:#}", parse(&bad).unwrap_err());
            assert!(err.contains(why), "{why}: {err}");
        }
    }
}
