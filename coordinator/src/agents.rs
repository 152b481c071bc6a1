//! Connections to the agents of a cluster: mutual TLS, the node identity checked against the
//! inventory, and deadlines so an unreachable agent is reported instead of hanging a command.

use crate::inventory::Node;
use anyhow::Result;
use bbupgrade_common::proto::agent_client::AgentClient;
use bbupgrade_common::tls::{TlsMaterial, connect_agent};
use std::time::Duration;
use tonic::transport::Channel;

pub type Client = AgentClient<Channel>;

/// Largest message either side sends: staged archives go in 1 MiB chunks.
pub const MAX_MESSAGE_BYTES: usize = 8 << 20;

/// Connects to a node's agent; the error says which node, where, and why.
pub async fn connect(node: &Node, tls: &TlsMaterial, connect_timeout: Duration) -> Result<Client> {
    let channel = connect_agent(&node.agent, tls, &node.id, connect_timeout).await?;
    Ok(AgentClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES))
}

/// Added to the grpc-timeout of a request: the agent's own deadline (given in the request) must
/// answer first with its reason ("still STARTING after 4 s"), and a hung agent is caught by the
/// caller's timeout (`deadline` + 2 s), so the transport's bare "Timeout expired" is a backstop.
pub const REQUEST_GRACE_SECS: u64 = 5;

/// A request with a deadline the agent also sees (grpc-timeout).
pub fn request<T>(msg: T, deadline: Duration) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.set_timeout(deadline + Duration::from_secs(REQUEST_GRACE_SECS));
    req
}

/// A gRPC status as a sentence: the agent's message, with the code only when it adds something.
pub fn status_text(node: &str, s: &tonic::Status) -> String {
    let msg = s.message();
    match s.code() {
        tonic::Code::DeadlineExceeded | tonic::Code::Cancelled if msg == "Timeout expired" => {
            format!("node '{node}': the agent did not answer in time; it may be hung")
        }
        tonic::Code::DeadlineExceeded => {
            format!("node '{node}': the agent did not answer in time ({msg})")
        }
        tonic::Code::Unavailable => format!(
            "node '{node}': the agent is unreachable ({})",
            bbupgrade_common::tls::error_chain(s)
        ),
        // The transport gave up on the call: the link to the agent broke while it was running.
        tonic::Code::Cancelled => format!(
            "node '{node}': the connection to the agent was lost during the call ({msg}); the operation may still be running on the node"
        ),
        _ => format!("node '{node}': {msg}"),
    }
}

/// Runs a call with a deadline on the client side too (a hung agent holds the connection open).
pub async fn call<T, F>(node: &str, deadline: Duration, fut: F) -> Result<T>
where
    F: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    match tokio::time::timeout(deadline + Duration::from_secs(2), fut).await {
        Ok(Ok(resp)) => Ok(resp.into_inner()),
        Ok(Err(status)) => Err(anyhow::anyhow!(status_text(node, &status))),
        Err(_) => Err(anyhow::anyhow!(
            "node '{node}': the agent did not answer within {deadline:?}; it may be hung (check `systemctl status bbupgrade-agent` on the node)"
        )),
    }
}
