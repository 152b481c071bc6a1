//! Bitbucket's side of `bbupgrade status`: the cluster's rolling-upgrade state and every row of its
//! cluster view, each with the inventory node it maps to or why none does.

use crate::inventory::Cluster;
use crate::node_match::{self, Match, NodeKey, describe_row, row_address};
use crate::zdu::{ClusterView, ZduNode};
use crate::zdu_pool::ZduPool;
use serde::Serialize;
use std::time::Duration;

/// How long `status` waits for the rolling-upgrade API (each address of the cluster).
pub const STATUS_ZDU_TIMEOUT_SECS: u64 = 5;

/// `"bitbucket"` of `status --output json`: every key present, `null` when unknown.
#[derive(Debug, Serialize, Default, PartialEq)]
pub struct BitbucketView {
    /// The cluster state as Bitbucket says it (unknown states passed through).
    pub state: Option<String>,
    pub upgrade_mode: Option<bool>,
    /// Why the cluster view could not be read.
    pub error: Option<String>,
    pub nodes: Vec<BitbucketRow>,
    /// Inventory nodes with no row, and why.
    pub unmapped: Vec<Unmapped>,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct BitbucketRow {
    /// The inventory node this row is, or `null`.
    pub node: Option<String>,
    pub id: Option<String>,
    pub name: Option<String>,
    /// `IP:PORT` as reported.
    pub address: Option<String>,
    pub state: Option<String>,
    pub version: Option<String>,
    pub tasks: Option<u64>,
    pub users: Option<u64>,
    /// Why no inventory node maps to the row (`null` when one does).
    pub why: Option<String>,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct Unmapped {
    pub node: String,
    pub why: String,
}

/// Reads the cluster view (never fails: the error goes into the view).
pub async fn collect(cluster: &Cluster) -> BitbucketView {
    let pool = match ZduPool::for_cluster(cluster, Duration::from_secs(STATUS_ZDU_TIMEOUT_SECS)) {
        Ok(p) => p,
        Err(e) => return failed(e),
    };
    let nodes = cluster.nodes.clone();
    let keys = tokio::task::spawn_blocking(move || {
        nodes.iter().map(|n| n.bitbucket_key()).collect::<Vec<_>>()
    });
    let (view, keys) = tokio::join!(pool.cluster(), keys);
    match (view, keys) {
        (Ok(view), Ok(keys)) => summarize(&view, &keys),
        (Err(e), _) => failed(format!(
            "reading {}/rest/zdu/cluster: {e}",
            cluster.bitbucket_url
        )),
        (_, Err(e)) => failed(format!("resolving the agents' addresses: {e}")),
    }
}

fn failed(error: String) -> BitbucketView {
    BitbucketView {
        error: Some(error),
        ..Default::default()
    }
}

/// Every row with its node, and the nodes no row is.
pub fn summarize(view: &ClusterView, keys: &[NodeKey]) -> BitbucketView {
    let matches = node_match::match_all(view, keys);
    let owner = |z: &ZduNode| {
        keys.iter()
            .zip(&matches)
            .find(|(_, m)| m.row().is_some_and(|r| std::ptr::eq(r, z)))
            .map(|(k, _)| k.node.clone())
    };
    let nodes = view
        .nodes
        .iter()
        .map(|z| {
            let node = owner(z);
            let why = node.is_none().then(|| why_unowned(z, keys, &matches));
            BitbucketRow {
                node,
                id: Some(z.id.clone()).filter(|i| !i.is_empty()),
                name: z.name.clone(),
                address: row_address(z),
                state: Some(z.state.to_string()),
                version: z.version.clone(),
                tasks: z.tasks_total,
                users: z.active_user_count,
                why,
            }
        })
        .collect();
    let unmapped = keys
        .iter()
        .zip(&matches)
        .filter_map(|(k, m)| match m {
            Match::Row(_) => None,
            Match::Missing(why) | Match::Ambiguous(why) => Some(Unmapped {
                node: k.node.clone(),
                why: why.clone(),
            }),
        })
        .collect();
    BitbucketView {
        state: Some(view.state.to_string()),
        upgrade_mode: Some(view.upgrade_mode_enabled),
        error: None,
        nodes,
        unmapped,
    }
}

/// Why a row is no inventory node's: left behind by a restart, or nobody's address or name.
fn why_unowned(z: &ZduNode, keys: &[NodeKey], matches: &[Match<'_>]) -> String {
    let same_place = keys
        .iter()
        .zip(matches)
        .find(|(k, _)| node_match::fits(z, k));
    match same_place {
        Some((k, Match::Row(live))) => format!(
            "an old row of {} (a restarted node comes back under a new id; its live row is {})",
            k.node,
            describe_row(live)
        ),
        Some((k, _)) => format!("fits {}, which could not be mapped (see unmapped)", k.node),
        None => "no inventory node has this address or name".into(),
    }
}

/// The Bitbucket section of `status`'s text.
pub fn render(b: &BitbucketView) -> String {
    let mut out = String::from("\nbitbucket");
    if let Some(e) = &b.error {
        out.push_str(&format!(": cannot read the cluster view: {e}\n"));
        return out;
    }
    out.push_str(&format!(
        ": cluster {}, upgrade mode {}\n",
        b.state.as_deref().unwrap_or("?"),
        match b.upgrade_mode {
            Some(true) => "on",
            Some(false) => "off",
            None => "?",
        }
    ));
    out.push_str(&format!(
        "{:<12} {:<38} {:<16} {:<22} {:<12} {:<10} {:>6} {:>6}\n",
        "NODE", "ID", "NAME", "ADDRESS", "STATE", "VERSION", "TASKS", "USERS"
    ));
    let dash = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
    for r in &b.nodes {
        out.push_str(&format!(
            "{:<12} {:<38} {:<16} {:<22} {:<12} {:<10} {:>6} {:>6}{}\n",
            r.node.as_deref().unwrap_or("-"),
            r.id.as_deref().unwrap_or("-"),
            r.name.as_deref().unwrap_or("-"),
            r.address.as_deref().unwrap_or("-"),
            r.state.as_deref().unwrap_or("-"),
            r.version.as_deref().unwrap_or("-"),
            dash(r.tasks),
            dash(r.users),
            r.why
                .as_deref()
                .map(|w| format!("  ({w})"))
                .unwrap_or_default()
        ));
    }
    for u in &b.unmapped {
        out.push_str(&format!("node {} has no row: {}\n", u.node, u.why));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::zdu::parse_body;

    fn key(node: &str, addr: &str) -> NodeKey {
        NodeKey {
            node: node.into(),
            name: None,
            address: Some(addr.parse().unwrap()),
            address_error: None,
        }
    }

    #[test]
    fn rows_show_their_node_and_old_rows_say_why_they_are_nobodys() {
        let view: ClusterView = parse_body(
            "t",
            include_str!("../zdu/fixtures/cluster-restarted-new-ids.json"),
        )
        .unwrap();
        let b = summarize(
            &view,
            &[
                key("node1", "10.0.0.11"),
                key("node2", "10.0.0.12"),
                key("node3", "10.0.0.13"),
            ],
        );
        let nodes: Vec<_> = b.nodes.iter().map(|r| r.node.as_deref()).collect();
        assert_eq!(nodes, [None, Some("node2"), Some("node1"), None]);
        assert!(
            b.nodes[0]
                .why
                .as_deref()
                .unwrap()
                .contains("an old row of node1")
        );
        assert_eq!(b.nodes[0].version, None);
        assert_eq!(b.nodes[1].address.as_deref(), Some("10.0.0.12:5701"));
        assert_eq!(b.unmapped.len(), 1);
        assert!(b.unmapped[0].why.contains("10.0.0.13"), "{:?}", b.unmapped);
        let json = serde_json::to_value(&b).unwrap();
        for row in json["nodes"].as_array().unwrap() {
            for k in [
                "node", "id", "name", "address", "state", "version", "tasks", "users",
            ] {
                assert!(row.get(k).is_some(), "{k} missing in {row}");
            }
        }
        assert_eq!(json["state"], "MIXED");
        assert_eq!(json["upgrade_mode"], true);
        let text = render(&b);
        assert!(text.contains("cluster MIXED, upgrade mode on"), "{text}");
        assert!(text.contains("node node3 has no row"), "{text}");
    }
}
