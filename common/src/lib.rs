//! Shared pieces of bbupgrade: the agent protocol, TLS and peer identity, PKI, version rules.
//!
//! Layout: `proto` is the generated gRPC code; `identity` decides who a peer certificate names;
//! `tls` builds the rustls configurations and the agent connector; `accept` is the agent's bounded
//! TLS front door (handshake deadline, connection cap); `pki` issues the private CA, certificates
//! and the revocation list; `keyfile` refuses private keys others can read; `echo` bounds what is
//! quoted back from a peer; `version` holds Bitbucket's version rules; `nginx` edits an NGINX
//! upstream and reloads it, for the coordinator's `nginx` driver and the agent's `[lb]` role alike.

pub mod accept;
pub mod echo;
pub mod identity;
pub mod keyfile;
pub mod logging;
pub mod nginx;
pub mod pki;
pub mod tls;
pub mod version;

/// Generated code for `proto/bbupgrade/agent/v1/agent.proto`.
pub mod proto {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("bbupgrade.agent.v1");
}
