//! The inventory: the clusters the coordinator drives, their Bitbucket URL and credentials, load
//! balancer, and nodes with their agents. Raw TOML is validated into [`Inventory`].

use crate::loadbalancer::LbConfig;
use crate::loadbalancer::policy::{DEFAULT_DRAIN_WAIT_SECS, DrainPolicy};
use crate::node_match::{Address, NodeKey};
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
    /// Sessions still open at the drain deadline (e.g. a long clone over SSH): `halt` (put the
    /// node back in service and halt) or `wait` (up to `drain_wait_secs` more, then halt).
    pub drain_policy: DrainPolicy,
    /// The bound of `drain_policy = "wait"`, beyond `drain_secs`.
    pub drain_wait_secs: u64,
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
            drain_policy: DrainPolicy::Halt,
            drain_wait_secs: DEFAULT_DRAIN_WAIT_SECS,
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
    /// `bearer` (default: `token_file`/`token_env`) or `basic` (`user` and `password_file`/`password_env`).
    pub auth: Option<String>,
    pub token_file: Option<PathBuf>,
    pub token_env: Option<String>,
    pub user: Option<String>,
    pub password_file: Option<PathBuf>,
    pub password_env: Option<String>,
    /// Send the system-admin credentials over plain `http://` to a host other than loopback.
    #[serde(default)]
    pub allow_insecure_http: bool,
    #[serde(default)]
    pub labels: Vec<String>,
    /// When a fleet run may upgrade this cluster, e.g. `Sat-Sun 01:00-05:00 Europe/Berlin`.
    #[serde(default)]
    pub window: Option<String>,
    pub load_balancer: Option<LbConfig>,
    /// Several load balancers before the cluster (e.g. HTTP through one, Git over SSH through
    /// another), drained and restored together; instead of `load_balancer`.
    pub load_balancers: Option<Vec<LbConfig>>,
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
    /// The node's `-Dcluster.node.name`, when one is set (Bitbucket shows "Not configured" otherwise).
    pub bitbucket_name: Option<String>,
    /// The node's address in Bitbucket's cluster view, `IP` or `IP:PORT` (the row's `portNumber`, only
    /// needed when nodes share an IP); default: the IP the agent's host resolves to.
    pub bitbucket_address: Option<String>,
}

/// Where a secret comes from.
#[derive(Debug, Clone)]
pub enum SecretSource {
    File(PathBuf),
    Env(String),
}

/// How the coordinator authenticates to Bitbucket's rolling-upgrade API.
#[derive(Debug, Clone)]
pub enum Auth {
    Bearer(SecretSource),
    Basic {
        user: String,
        password: SecretSource,
    },
}

#[derive(Debug, Clone)]
pub struct Node {
    pub id: String,
    pub agent: String,
    pub lb_server: String,
    pub bitbucket_name: Option<String>,
    pub bitbucket_address: Option<Address>,
}

#[derive(Debug, Clone)]
pub struct Cluster {
    pub name: String,
    pub bitbucket_url: String,
    pub bitbucket_node_urls: Vec<String>,
    pub auth: Auth,
    pub labels: Vec<String>,
    /// The maintenance window fleet runs respect (none: any time).
    pub window: Option<crate::window::Window>,
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

/// Checks one cluster of the raw inventory (its name already checked).
fn validate_cluster(
    c: RawCluster,
    rel: &dyn Fn(&Path) -> PathBuf,
    default_timeouts: &Timeouts,
) -> Result<Cluster> {
    for url in std::iter::once(&c.bitbucket_url).chain(&c.bitbucket_node_urls) {
        check_bitbucket_url(url, c.allow_insecure_http)
            .with_context(|| format!("cluster '{}'", c.name))?;
    }
    let auth = auth(
        c.auth.as_deref(),
        (c.token_file.map(|f| rel(&f)), c.token_env),
        c.user,
        (c.password_file.map(|f| rel(&f)), c.password_env),
    )
    .with_context(|| format!("cluster '{}'", c.name))?;
    ensure!(!c.nodes.is_empty(), "cluster '{}' has no nodes", c.name);
    let nodes = validate_nodes(&c.name, c.nodes)?;
    let window = c
        .window
        .as_deref()
        .map(str::parse)
        .transpose()
        .with_context(|| format!("cluster '{}'", c.name))?;
    let load_balancer = load_balancer_of(&c.name, c.load_balancer, c.load_balancers)?;
    Ok(Cluster {
        name: c.name,
        bitbucket_url: c.bitbucket_url.trim_end_matches('/').to_string(),
        bitbucket_node_urls: c
            .bitbucket_node_urls
            .iter()
            .map(|u| u.trim_end_matches('/').to_string())
            .collect(),
        auth,
        labels: c.labels,
        window,
        load_balancer,
        timeouts: c.timeouts.unwrap_or_else(|| default_timeouts.clone()),
        nodes,
    })
}

/// Checks a cluster's nodes: names, no id twice, `host:port` agents, Bitbucket addresses.
fn validate_nodes(cluster: &str, raw: Vec<RawNode>) -> Result<Vec<Node>> {
    let mut ids = HashSet::new();
    let mut nodes = Vec::new();
    for n in raw {
        validate_name(&n.id).with_context(|| format!("cluster '{}': node id", cluster))?;
        ensure!(
            ids.insert(n.id.clone()),
            "cluster '{}': node '{}' is listed twice",
            cluster,
            n.id
        );
        ensure!(
            n.agent
                .rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok()),
            "cluster '{}', node '{}': agent = '{}' must be host:port",
            cluster,
            n.id,
            n.agent
        );
        let bitbucket_address = n
            .bitbucket_address
            .as_deref()
            .map(str::parse::<Address>)
            .transpose()
            .map_err(|e| {
                anyhow::anyhow!(
                    "cluster '{}', node '{}': bitbucket_address {e}",
                    cluster,
                    n.id
                )
            })?;
        nodes.push(Node {
            lb_server: n.lb_server.unwrap_or_else(|| n.id.clone()),
            bitbucket_name: n.bitbucket_name.filter(|s| !s.trim().is_empty()),
            bitbucket_address,
            id: n.id,
            agent: n.agent,
        });
    }
    Ok(nodes)
}

/// The cluster's load balancer: one, several at once, or none.
fn load_balancer_of(
    cluster: &str,
    one: Option<LbConfig>,
    many: Option<Vec<LbConfig>>,
) -> Result<LbConfig> {
    Ok(match (one, many) {
        (Some(_), Some(_)) => bail!(
            "cluster '{}': give either load_balancer or load_balancers, not both",
            cluster
        ),
        (Some(one), None) => one,
        (None, Some(mut list)) if list.len() == 1 => list.remove(0),
        (None, Some(list)) if list.is_empty() => bail!(
            "cluster '{}': load_balancers = [] names none; leave it out, or use kind = \"none\"",
            cluster
        ),
        (None, Some(members)) => LbConfig::Several { members },
        (None, None) => LbConfig::None {},
    })
}

/// Loads the inventory; problems with it are bad input.
pub fn load_inventory(path: &Path) -> Result<Inventory> {
    Inventory::load(path).map_err(|e| crate::error::BadInput(format!("{e:#}")).into())
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
            clusters.push(validate_cluster(c, &rel, &raw.timeouts)?);
        }
        Ok(Self {
            path: PathBuf::new(),
            tls,
            state: raw.state,
            clusters,
        })
    }

    /// The cluster named `name`, or with no name the inventory's only cluster (`-c` may be left
    /// out then).
    pub fn pick_cluster(&self, name: Option<&str>) -> Result<&Cluster> {
        match (name, self.clusters.as_slice()) {
            (Some(name), _) => self.cluster(name),
            (None, [only]) => Ok(only),
            (None, all) => {
                let known: Vec<_> = all.iter().map(|c| c.name.as_str()).collect();
                anyhow::bail!(
                    "{} has {} clusters ({}): say which with -c/--cluster NAME",
                    self.path.display(),
                    all.len(),
                    known.join(", ")
                )
            }
        }
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

/// One secret from a file or an environment variable, exactly one of them.
fn secret_source(
    (file, env): (Option<PathBuf>, Option<String>),
    file_key: &str,
    env_key: &str,
    what: &str,
) -> Result<SecretSource> {
    match (file, env) {
        (Some(f), None) => Ok(SecretSource::File(f)),
        (None, Some(e)) => Ok(SecretSource::Env(e)),
        (None, None) => bail!("set {file_key} (a file holding {what}) or {env_key}"),
        (Some(_), Some(_)) => bail!("set {file_key} or {env_key}, not both"),
    }
}

/// `auth = "bearer"` (the default) or `"basic"`, with the keys each needs and none of the other's.
fn auth(
    kind: Option<&str>,
    token: (Option<PathBuf>, Option<String>),
    user: Option<String>,
    password: (Option<PathBuf>, Option<String>),
) -> Result<Auth> {
    match kind.unwrap_or("bearer") {
        "bearer" => {
            ensure!(
                user.is_none() && password.0.is_none() && password.1.is_none(),
                "user and password_file/password_env belong to auth = \"basic\"; remove them or set auth = \"basic\""
            );
            Ok(Auth::Bearer(secret_source(
                token,
                "token_file",
                "token_env",
                "a Bitbucket HTTP access token of a system administrator",
            )?))
        }
        "basic" => {
            ensure!(
                token.0.is_none() && token.1.is_none(),
                "token_file/token_env belong to auth = \"bearer\"; remove them or drop auth = \"basic\""
            );
            let user = user.filter(|u| !u.is_empty() && !u.contains(':')).context(
                "auth = \"basic\" needs user = \"...\" (a Bitbucket system administrator, no ':')",
            )?;
            let password = secret_source(
                password,
                "password_file",
                "password_env",
                "the user's password",
            )?;
            Ok(Auth::Basic { user, password })
        }
        other => bail!("auth = \"{other}\" is not known; use \"basic\" or \"bearer\""),
    }
}

/// An `http(s)` URL; plain `http://` only to loopback unless the cluster allows it, because the
/// system-admin credentials travel with every request.
fn check_bitbucket_url(url: &str, allow_insecure_http: bool) -> Result<()> {
    let parsed = reqwest::Url::parse(url)
        .ok()
        .filter(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some());
    let Some(parsed) = parsed else {
        bail!("bitbucket URL '{url}' must be an http(s) URL such as https://bitbucket.example.com");
    };
    let host = parsed.host_str().unwrap_or("").trim_matches(['[', ']']);
    let loopback = host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    ensure!(
        parsed.scheme() == "https" || loopback || allow_insecure_http,
        "bitbucket URL '{url}' is plain http: the system administrator's credentials would cross the network in clear text; use https://, or set allow_insecure_http = true for this cluster if you accept that"
    );
    Ok(())
}

impl Node {
    /// How this node is recognised in Bitbucket's cluster view (resolves the agent's host when no
    /// `bitbucket_address` is set: blocking DNS, once per command).
    pub fn bitbucket_key(&self) -> NodeKey {
        NodeKey::resolve(
            &self.id,
            self.bitbucket_name.as_deref(),
            self.bitbucket_address,
            &self.agent,
        )
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
    fn several_load_balancers_and_backends() {
        let two = GOOD.replace(
            "load_balancer = { kind = \"none\" }",
            "load_balancers = [\n  { kind = \"apache\", manager_url = \"http://lb:8080/balancer-manager\", balancer = \"bitbucket\" },\n  { kind = \"haproxy\", socket = \"unix:/run/haproxy.sock\", backends = [\"bitbucket_ssh\"] },\n]",
        );
        let inv = parse(&two).unwrap();
        let lb = &inv.cluster("prod").unwrap().load_balancer;
        assert!(
            matches!(lb, LbConfig::Several { members } if members.len() == 2),
            "{lb:?}"
        );
        let one = GOOD.replace(
            "load_balancer = { kind = \"none\" }",
            "load_balancers = [{ kind = \"haproxy\", socket = \"unix:/s\", backends = [\"bitbucket_http\", \"bitbucket_ssh\"] }]",
        );
        let inv = parse(&one).unwrap();
        assert!(matches!(
            &inv.cluster("prod").unwrap().load_balancer,
            LbConfig::Haproxy { backends, .. } if backends.len() == 2
        ));
        let both = GOOD.replace(
            "load_balancer = { kind = \"none\" }",
            "load_balancer = { kind = \"none\" }\nload_balancers = [{ kind = \"none\" }]",
        );
        assert!(parse(&both).unwrap_err().to_string().contains("not both"));
        let empty = GOOD.replace("load_balancer = { kind = \"none\" }", "load_balancers = []");
        assert!(parse(&empty).is_err());
    }

    #[test]
    fn validates_and_fills_defaults() {
        let inv = parse(GOOD).unwrap();
        assert_eq!(inv.tls.ca, PathBuf::from("/inv/pki/ca.pem"));
        assert_eq!(inv.tls.key, PathBuf::from("/etc/k.key"));
        let c = inv.cluster("prod").unwrap();
        assert_eq!(c.bitbucket_url, "https://bb.example.com");
        assert_eq!(c.nodes[0].lb_server, "n1");
        assert_eq!(c.nodes[1].lb_server, "bb2");
        assert!(
            matches!(&c.auth, Auth::Bearer(SecretSource::File(f)) if f == Path::new("/inv/prod.token"))
        );
        assert_eq!(
            (
                c.nodes[0].bitbucket_name.as_ref(),
                c.nodes[0].bitbucket_address
            ),
            (None, None)
        );
        let basic = parse(
            &GOOD
                .replace(
                    "token_file = \"prod.token\"",
                    "auth = \"basic\"\nuser = \"admin\"\npassword_file = \"pw\"",
                )
                .replace(
                    "lb_server = \"bb2\"",
                    "bitbucket_address = \"10.0.0.12:5701\"\nbitbucket_name = \"bb-2\"",
                ),
        )
        .unwrap();
        let c2 = &basic.clusters[0];
        assert!(
            matches!(&c2.auth, Auth::Basic { user, password: SecretSource::File(f) } if user == "admin" && f == Path::new("/inv/pw"))
        );
        assert_eq!(
            c2.nodes[1].bitbucket_address.unwrap().to_string(),
            "10.0.0.12:5701"
        );
        assert_eq!(c2.nodes[1].bitbucket_name.as_deref(), Some("bb-2"));
        let plain =
            parse(&GOOD.replace("https://bb.example.com/", "http://127.0.0.1:7990")).unwrap();
        assert_eq!(plain.clusters[0].bitbucket_url, "http://127.0.0.1:7990");
        parse(
            &GOOD
                .replace("https://bb", "http://bb")
                .replace("token_file", "allow_insecure_http = true\ntoken_file"),
        )
        .unwrap();
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
        assert_eq!(inv.pick_cluster(None).unwrap().name, "prod");
        assert_eq!(inv.pick_cluster(Some("prod")).unwrap().name, "prod");
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
                GOOD.replace("https://bb", "http://bb"),
                "allow_insecure_http",
            ),
            (
                GOOD.replace(
                    "token_file = \"prod.token\"",
                    "auth = \"basic\"\npassword_env = \"P\"",
                ),
                "needs user",
            ),
            (
                GOOD.replace(
                    "token_file = \"prod.token\"",
                    "auth = \"basic\"\nuser = \"admin\"\ntoken_env = \"P\"",
                ),
                "belong to auth = \"bearer\"",
            ),
            (
                GOOD.replace("token_file", "user = \"admin\"\ntoken_file"),
                "belong to auth = \"basic\"",
            ),
            (
                GOOD.replace("token_file", "auth = \"digest\"\ntoken_file"),
                "not known",
            ),
            (
                GOOD.replace("lb_server = \"bb2\"", "bitbucket_address = \"node2\""),
                "node 'n2': bitbucket_address 'node2' is not an IP",
            ),
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
