//! `bbupgrade status`: one row per node with agent reachability, identity, versions and load.

use crate::agents;
use crate::inventory::{Cluster, Node};
use anyhow::Result;
use bbupgrade_common::proto::{LoadMetricsRequest, LoadSample, NodeInfoRequest, NodeInfoResponse};
use bbupgrade_common::tls::TlsMaterial;
use serde::Serialize;
use std::time::Duration;

pub const STATUS_CALL_TIMEOUT_SECS: u64 = 5;

#[derive(Debug, Serialize)]
pub struct StatusReport {
    pub cluster: String,
    pub nodes: Vec<NodeStatus>,
}

#[derive(Debug, Serialize, Default)]
pub struct NodeStatus {
    pub id: String,
    pub agent: String,
    pub reachable: bool,
    pub error: Option<String>,
    /// The identity the agent's certificate proved (`agent/<id>`).
    pub identity: Option<String>,
    pub version: Option<String>,
    pub active_install: Option<String>,
    pub installed: Vec<String>,
    pub bitbucket_status: Option<String>,
    pub service_kind: Option<String>,
    pub load: Option<LoadView>,
}

#[derive(Debug, Serialize)]
pub struct LoadView {
    pub cpu_percent: f32,
    pub load_average_1m: f64,
    pub memory_used_bytes: u64,
    pub memory_total_bytes: u64,
    pub install_root_free_bytes: u64,
    pub home_free_bytes: u64,
    pub bitbucket_pid: u32,
    pub bitbucket_cpu_percent: f32,
    pub bitbucket_rss_bytes: u64,
}

impl From<LoadSample> for LoadView {
    fn from(s: LoadSample) -> Self {
        Self {
            cpu_percent: s.cpu_percent,
            load_average_1m: s.load_average_1m,
            memory_used_bytes: s.memory_used_bytes,
            memory_total_bytes: s.memory_total_bytes,
            install_root_free_bytes: s.install_root_free_bytes,
            home_free_bytes: s.home_free_bytes,
            bitbucket_pid: s.bitbucket_pid,
            bitbucket_cpu_percent: s.bitbucket_cpu_percent,
            bitbucket_rss_bytes: s.bitbucket_rss_bytes,
        }
    }
}

/// Facts and load of one node, or why they could not be had.
pub async fn node_facts(
    node: &Node,
    tls: &TlsMaterial,
    connect_timeout: Duration,
) -> Result<(NodeInfoResponse, LoadSample)> {
    let mut client = agents::connect(node, tls, connect_timeout).await?;
    let deadline = Duration::from_secs(STATUS_CALL_TIMEOUT_SECS);
    let info = agents::call(
        &node.id,
        deadline,
        client.node_info(agents::request(NodeInfoRequest {}, deadline)),
    )
    .await?;
    let load = agents::call(
        &node.id,
        deadline,
        client.load_metrics(agents::request(LoadMetricsRequest {}, deadline)),
    )
    .await?;
    Ok((info, load))
}

pub async fn collect(cluster: &Cluster, tls: &TlsMaterial) -> StatusReport {
    let connect_timeout = Duration::from_millis(cluster.timeouts.agent_connect_ms);
    let rows = futures::future::join_all(cluster.nodes.iter().map(|node| async move {
        let mut row = NodeStatus {
            id: node.id.clone(),
            agent: node.agent.clone(),
            ..Default::default()
        };
        match node_facts(node, tls, connect_timeout).await {
            Ok((info, load)) => {
                row.reachable = true;
                row.identity = Some(format!("agent/{}", info.node_id));
                row.version = Some(info.active_version);
                row.active_install = Some(info.active_install);
                row.installed = info.installed.into_iter().map(|i| i.version).collect();
                row.bitbucket_status = Some(info.status);
                row.service_kind = Some(service_kind_name(info.service_kind).to_string());
                row.load = Some(load.into());
            }
            Err(e) => row.error = Some(format!("{e:#}")),
        }
        row
    }))
    .await;
    StatusReport {
        cluster: cluster.name.clone(),
        nodes: rows,
    }
}

pub fn service_kind_name(kind: i32) -> &'static str {
    use bbupgrade_common::proto::ServiceKind;
    match ServiceKind::try_from(kind) {
        Ok(ServiceKind::Systemd) => "systemd",
        Ok(ServiceKind::Initd) => "initd",
        Ok(ServiceKind::Scripts) => "scripts",
        _ => "unknown",
    }
}

fn mib(b: u64) -> String {
    format!("{:.0} MiB", b as f64 / (1024.0 * 1024.0))
}

pub fn render_human(r: &StatusReport) -> String {
    let mut out = format!("cluster {}\n", r.cluster);
    out.push_str(&format!(
        "{:<12} {:<22} {:<10} {:<10} {:<9} {:>6} {:>10} {:>12}\n",
        "NODE", "AGENT", "REACHABLE", "VERSION", "STATUS", "CPU%", "JVM RSS", "DISK FREE"
    ));
    for n in &r.nodes {
        match &n.load {
            Some(l) => out.push_str(&format!(
                "{:<12} {:<22} {:<10} {:<10} {:<9} {:>6.1} {:>10} {:>12}\n",
                n.id,
                n.agent,
                "yes",
                n.version.as_deref().unwrap_or("?"),
                n.bitbucket_status.as_deref().unwrap_or("?"),
                l.cpu_percent,
                mib(l.bitbucket_rss_bytes),
                mib(l.install_root_free_bytes),
            )),
            None => out.push_str(&format!(
                "{:<12} {:<22} {:<10} {}\n",
                n.id,
                n.agent,
                "NO",
                n.error.as_deref().unwrap_or("")
            )),
        }
    }
    out
}
