//! Which row of Bitbucket's cluster view is which inventory node. Rows carry UUIDs that change when a
//! node restarts (the old row stays behind, `OFFLINE`, with no version) and names that are
//! "Not configured" unless `-Dcluster.node.name` is set, so a node is followed by a configured name
//! when that name is unique, else by the address the row reports; a live row wins over an `OFFLINE`
//! one at the same place. Pure functions over the parsed view.

use std::fmt;
use std::net::{IpAddr, ToSocketAddrs};
use std::str::FromStr;

use crate::zdu::{ClusterView, NodeState, ZduNode};

/// What Bitbucket's view shows when no `-Dcluster.node.name` was given.
pub const UNCONFIGURED_NAME: &str = "Not configured";

/// A node's address as the cluster view reports it: the IP, and the row's `portNumber` (probably the
/// cluster port) only where several nodes share one IP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Address {
    pub ip: IpAddr,
    pub port: Option<u16>,
}

impl FromStr for Address {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "'{s}' is not an IP address or IP:PORT (write it like \"10.0.0.11\" or \"10.0.0.11:5701\", as Bitbucket's cluster view shows the node)"
            )
        };
        if let Ok(ip) = s.parse::<IpAddr>() {
            return Ok(Self { ip, port: None });
        }
        let addr: std::net::SocketAddr = s.parse().map_err(|_| bad())?;
        Ok(Self {
            ip: addr.ip(),
            port: Some(addr.port()),
        })
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.port, self.ip) {
            (Some(p), IpAddr::V6(ip)) => write!(f, "[{ip}]:{p}"),
            (Some(p), ip) => write!(f, "{ip}:{p}"),
            (None, ip) => write!(f, "{ip}"),
        }
    }
}

/// How one inventory node is recognised in the cluster view.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize)]
pub struct NodeKey {
    /// The inventory id.
    pub node: String,
    /// `bitbucket_name` from the inventory.
    pub name: Option<String>,
    /// `bitbucket_address`, else the IP the agent's host resolves to.
    #[serde(serialize_with = "display_opt")]
    pub address: Option<Address>,
    /// Why there is no address (the agent's host did not resolve), for the error.
    pub address_error: Option<String>,
}

fn display_opt<S: serde::Serializer>(a: &Option<Address>, s: S) -> Result<S::Ok, S::Error> {
    match a {
        Some(a) => s.serialize_str(&a.to_string()),
        None => s.serialize_none(),
    }
}

impl NodeKey {
    /// The key of a node: its configured name and address, or the IP its agent's `host:port` resolves
    /// to (blocking DNS: called once per run).
    pub fn resolve(
        node: &str,
        name: Option<&str>,
        address: Option<Address>,
        agent_host_port: &str,
    ) -> Self {
        let (address, address_error) = match address {
            Some(a) => (Some(a), None),
            None => match agent_host_port.to_socket_addrs() {
                Ok(mut addrs) => match addrs.next() {
                    Some(a) => (
                        Some(Address {
                            ip: a.ip(),
                            port: None,
                        }),
                        None,
                    ),
                    None => (
                        None,
                        Some(format!(
                            "agent address {agent_host_port} resolves to nothing"
                        )),
                    ),
                },
                Err(e) => (
                    None,
                    Some(format!(
                        "agent address {agent_host_port} does not resolve: {e}"
                    )),
                ),
            },
        };
        Self {
            node: node.to_string(),
            name: name.map(str::to_string),
            address,
            address_error,
        }
    }
}

/// Where an inventory node is in the view, or why it is nowhere.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Match<'a> {
    Row(&'a ZduNode),
    /// No row: maybe the node is starting (a starting row shows no IP yet) or the key is wrong.
    Missing(String),
    /// More than one live row fits, or another node claims the same row: which key settles it.
    Ambiguous(String),
}

impl<'a> Match<'a> {
    pub fn row(&self) -> Option<&'a ZduNode> {
        match self {
            Match::Row(z) => Some(z),
            _ => None,
        }
    }
}

fn is_live(z: &ZduNode) -> bool {
    z.state != NodeState::Offline
}

/// A row as an admin would recognise it in messages: id, name and address.
pub fn describe_row(z: &ZduNode) -> String {
    format!(
        "{} ({}, {}, {})",
        if z.id.is_empty() { "(no id)" } else { &z.id },
        z.name.as_deref().unwrap_or("no name"),
        row_address(z).unwrap_or_else(|| "no address".into()),
        z.state
    )
}

/// `IP:PORT` (or just the IP) as the row reports it.
pub fn row_address(z: &ZduNode) -> Option<String> {
    let ip = z.ip_address.as_deref().filter(|s| !s.is_empty())?;
    Some(match z.port_number {
        Some(p) => format!("{ip}:{p}"),
        None => ip.to_string(),
    })
}

fn at_address(z: &ZduNode, a: &Address) -> bool {
    let ip_matches = z
        .ip_address
        .as_deref()
        .and_then(|s| s.trim().parse::<IpAddr>().ok())
        .is_some_and(|ip| ip == a.ip);
    ip_matches && a.port.is_none_or(|p| z.port_number == Some(p))
}

/// Whether a row has the key's configured name or sits at its address.
pub fn fits(z: &ZduNode, key: &NodeKey) -> bool {
    let named = key
        .name
        .as_deref()
        .is_some_and(|n| n != UNCONFIGURED_NAME && z.name.as_deref() == Some(n));
    named || key.address.as_ref().is_some_and(|a| at_address(z, a))
}

/// Of the rows that fit a key: the one live row, else an OFFLINE one (the node is down), else none.
fn pick<'a>(rows: Vec<&'a ZduNode>, what: &str, settle: &str) -> Option<Match<'a>> {
    let live: Vec<_> = rows.iter().copied().filter(|z| is_live(z)).collect();
    match live.as_slice() {
        [one] => Some(Match::Row(one)),
        [] => rows.first().map(|z| Match::Row(z)),
        many => Some(Match::Ambiguous(format!(
            "{what} fits {} live rows: {}; {settle}",
            many.len(),
            many.iter()
                .map(|z| describe_row(z))
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

/// The row of one node, ignoring what other nodes claim (see [`match_all`]).
pub fn match_node<'a>(view: &'a ClusterView, key: &NodeKey) -> Match<'a> {
    if let Some(name) = key.name.as_deref().filter(|n| *n != UNCONFIGURED_NAME) {
        let rows: Vec<_> = view
            .nodes
            .iter()
            .filter(|z| z.name.as_deref() == Some(name))
            .collect();
        if let Some(m) = pick(
            rows,
            &format!("bitbucket_name '{name}'"),
            "give every node its own -Dcluster.node.name, or set bitbucket_address for this node",
        ) {
            return m;
        }
    }
    let Some(address) = &key.address else {
        return Match::Missing(format!(
            "{}; set bitbucket_address (the node's IP as Bitbucket's cluster view shows it) in the inventory",
            key.address_error
                .as_deref()
                .unwrap_or("no address to look for")
        ));
    };
    let rows: Vec<_> = view
        .nodes
        .iter()
        .filter(|z| at_address(z, address))
        .collect();
    let settle = if address.port.is_none() {
        "set bitbucket_address = \"IP:PORT\" with the row's port, or bitbucket_name with the node's -Dcluster.node.name"
    } else {
        "set bitbucket_name with the node's -Dcluster.node.name"
    };
    pick(rows, &format!("address {address}"), settle).unwrap_or_else(|| {
        let known: Vec<_> = view.nodes.iter().map(describe_row).collect();
        Match::Missing(format!(
            "no row at address {address}{} (rows: {}); a starting node shows no address yet, otherwise set bitbucket_address or bitbucket_name",
            key.name
                .as_deref()
                .map(|n| format!(" nor named '{n}'"))
                .unwrap_or_default(),
            if known.is_empty() {
                "none".to_string()
            } else {
                known.join(", ")
            }
        ))
    })
}

/// The rows of every node; two nodes on one live row make both ambiguous.
pub fn match_all<'a>(view: &'a ClusterView, keys: &[NodeKey]) -> Vec<Match<'a>> {
    let mut found: Vec<Match<'a>> = keys.iter().map(|k| match_node(view, k)).collect();
    let rows: Vec<Option<&ZduNode>> = found.iter().map(Match::row).collect();
    for (i, row) in rows.iter().enumerate() {
        let Some(z) = row.filter(|z| is_live(z)) else {
            continue;
        };
        let sharing: Vec<&str> = rows
            .iter()
            .zip(keys)
            .filter(|(r, _)| r.is_some_and(|r| std::ptr::eq(r, z)))
            .map(|(_, k)| k.node.as_str())
            .collect();
        if sharing.len() > 1 {
            found[i] = Match::Ambiguous(format!(
                "nodes {} all map to the row {}; set bitbucket_address = \"IP:PORT\" (the row's portNumber) or bitbucket_name for each",
                sharing.join(", "),
                describe_row(z)
            ));
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::zdu::{ClusterState, parse_body};

    fn row(
        id: &str,
        name: Option<&str>,
        ip: Option<&str>,
        port: Option<u16>,
        state: &str,
    ) -> ZduNode {
        ZduNode {
            id: id.into(),
            name: name.map(Into::into),
            ip_address: ip.map(Into::into),
            state: NodeState::from(state.to_string()),
            tasks_total: None,
            active_user_count: None,
            build_number: None,
            version: (state != "OFFLINE").then(|| "8.19.3".to_string()),
            local: false,
            port_number: port,
        }
    }

    fn view(nodes: Vec<ZduNode>) -> ClusterView {
        ClusterView {
            upgrade_mode_enabled: true,
            state: ClusterState::Mixed,
            original_version: None,
            nodes,
        }
    }

    fn key(node: &str, name: Option<&str>, addr: &str) -> NodeKey {
        NodeKey {
            node: node.into(),
            name: name.map(Into::into),
            address: Some(addr.parse().unwrap()),
            address_error: None,
        }
    }

    #[test]
    fn addresses_parse_with_and_without_port() {
        assert_eq!(
            "10.0.0.11".parse::<Address>().unwrap(),
            Address {
                ip: "10.0.0.11".parse().unwrap(),
                port: None
            }
        );
        assert_eq!(
            "10.0.0.11:5701".parse::<Address>().unwrap().port,
            Some(5701)
        );
        assert_eq!(
            "[::1]:5701".parse::<Address>().unwrap().to_string(),
            "[::1]:5701"
        );
        let e = "node1.example.com".parse::<Address>().unwrap_err();
        assert!(
            e.contains("node1.example.com") && e.contains("10.0.0.11:5701"),
            "{e}"
        );
    }

    #[test]
    fn restarted_node_is_followed_by_address_and_the_live_row_wins() {
        // The node restarted: its old row stays OFFLINE with no version, the new one is ACTIVE.
        let v = view(vec![
            row(
                "old-1",
                Some(UNCONFIGURED_NAME),
                Some("10.0.0.11"),
                Some(5701),
                "OFFLINE",
            ),
            row(
                "new-1",
                Some(UNCONFIGURED_NAME),
                Some("10.0.0.11"),
                Some(5701),
                "ACTIVE",
            ),
            row(
                "b",
                Some(UNCONFIGURED_NAME),
                Some("10.0.0.12"),
                Some(5701),
                "ACTIVE",
            ),
        ]);
        let keys = [
            key("n1", Some(UNCONFIGURED_NAME), "10.0.0.11"),
            key("n2", None, "10.0.0.12"),
        ];
        let m = match_all(&v, &keys);
        assert_eq!(m[0].row().unwrap().id, "new-1");
        assert_eq!(m[1].row().unwrap().id, "b");
    }

    #[test]
    fn a_down_node_maps_to_its_offline_row_and_a_starting_row_without_ip_to_nothing() {
        let v = view(vec![
            row("old-1", None, Some("10.0.0.11"), None, "OFFLINE"),
            row("new-1", None, None, None, "STARTING"),
        ]);
        let m = match_node(&v, &key("n1", None, "10.0.0.11"));
        assert_eq!(m.row().unwrap().id, "old-1");
        let v = view(vec![row("new-1", None, None, None, "STARTING")]);
        assert!(
            matches!(match_node(&v, &key("n1", None, "10.0.0.11")), Match::Missing(why) if why.contains("starting"))
        );
    }

    #[test]
    fn shared_ip_needs_the_port_and_the_error_says_so() {
        let v = view(vec![
            row("a", None, Some("127.0.0.1"), Some(5701), "ACTIVE"),
            row("b", None, Some("127.0.0.1"), Some(5702), "ACTIVE"),
        ]);
        match match_node(&v, &key("n1", None, "127.0.0.1")) {
            Match::Ambiguous(why) => {
                assert!(
                    why.contains("127.0.0.1:5701") && why.contains("127.0.0.1:5702"),
                    "{why}"
                );
                assert!(why.contains("bitbucket_address = \"IP:PORT\""), "{why}");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            match_node(&v, &key("n1", None, "127.0.0.1:5702"))
                .row()
                .unwrap()
                .id,
            "b"
        );
    }

    #[test]
    fn configured_unique_name_wins_over_address_and_shared_names_are_refused() {
        let v = view(vec![
            row("a", Some("alpha"), Some("10.0.0.11"), None, "ACTIVE"),
            row("b", Some("beta"), Some("10.0.0.11"), None, "ACTIVE"),
        ]);
        assert_eq!(
            match_node(&v, &key("n1", Some("beta"), "10.0.0.11"))
                .row()
                .unwrap()
                .id,
            "b"
        );
        let v = view(vec![
            row("a", Some("same"), Some("10.0.0.11"), None, "ACTIVE"),
            row("b", Some("same"), Some("10.0.0.12"), None, "ACTIVE"),
        ]);
        match match_node(&v, &key("n1", Some("same"), "10.0.0.11")) {
            Match::Ambiguous(why) => assert!(
                why.contains("'same'") && why.contains("-Dcluster.node.name"),
                "{why}"
            ),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_name_not_in_the_view_falls_back_to_the_address() {
        let v = view(vec![row(
            "a",
            Some(UNCONFIGURED_NAME),
            Some("10.0.0.11"),
            None,
            "ACTIVE",
        )]);
        assert_eq!(
            match_node(&v, &key("n1", Some("node1"), "10.0.0.11"))
                .row()
                .unwrap()
                .id,
            "a"
        );
    }

    #[test]
    fn two_nodes_on_one_row_are_both_ambiguous() {
        let v = view(vec![row(
            "a",
            None,
            Some("127.0.0.1"),
            Some(5701),
            "ACTIVE",
        )]);
        let keys = [key("n1", None, "127.0.0.1"), key("n2", None, "127.0.0.1")];
        let m = match_all(&v, &keys);
        for m in &m {
            assert!(
                matches!(m, Match::Ambiguous(why) if why.contains("n1, n2")),
                "{m:?}"
            );
        }
    }

    #[test]
    fn no_row_names_what_was_looked_for_and_what_exists() {
        let v: ClusterView = parse_body(
            "test",
            r#"{"upgradeModeEnabled":false,"state":"STABLE","nodes":[{"id":"x","state":"ACTIVE","ipAddress":"10.0.0.9"}]}"#,
        )
        .unwrap();
        match match_node(&v, &key("n1", None, "10.0.0.11")) {
            Match::Missing(why) => assert!(
                why.contains("10.0.0.11") && why.contains("10.0.0.9"),
                "{why}"
            ),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn unresolvable_agent_host_asks_for_bitbucket_address() {
        let k = NodeKey::resolve("n1", None, None, "no-such-host.invalid:7443");
        assert!(k.address.is_none());
        let v = view(vec![]);
        match match_node(&v, &k) {
            Match::Missing(why) => assert!(why.contains("set bitbucket_address"), "{why}"),
            other => panic!("{other:?}"),
        }
        let k = NodeKey::resolve("n1", None, None, "127.0.0.1:7443");
        assert_eq!(k.address.unwrap().ip, IpAddr::from([127, 0, 0, 1]));
    }
}
