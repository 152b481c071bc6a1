//! Shared pieces of bbupgrade: the agent protocol, TLS and peer identity, PKI, version rules.
//!
//! Layout: `proto` is the generated gRPC code; `identity` decides who a peer certificate names;
//! `tls` builds the rustls configurations and the agent connector; `pki` issues the private CA
//! and certificates; `version` holds Bitbucket's version rules; `nginx` edits an NGINX upstream
//! and reloads it, for the coordinator's `nginx` driver and the agent's `[lb]` role alike.

pub mod identity;
pub mod nginx;
pub mod pki;
pub mod tls;
pub mod version;

/// Generated code for `proto/bbupgrade/agent/v1/agent.proto`.
pub mod proto {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("bbupgrade.agent.v1");
}
