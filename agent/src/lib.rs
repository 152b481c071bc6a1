//! The bbupgrade agent: a daemon on each Bitbucket node that carries out the node-local steps of a
//! rolling upgrade for the coordinator, over mutual TLS.
//!
//! Layout, in the order of the steps: `config` (validated settings), `stage` (one-pass verify and
//! extract of a release), `prepare` (home and customizations), `service` (stop/start through the
//! service manager), `activate` (point the service definition at an install), `journal` (operation
//! ids and their results), `metrics` (load), `lb` (the optional load-balancer role on an NGINX host),
//! `server` (the gRPC service), `url_policy` (which archive URLs may be fetched, and how they are
//! quoted), `cli` (the binary); `rootfs` is the only way the agent writes files (directory handles,
//! no links followed).

pub mod activate;
pub mod cli;
pub mod config;
pub mod journal;
pub mod lb;
pub mod metrics;
pub mod node_state;
pub mod prepare;
pub mod rollback;
pub mod rootfs;
pub mod server;
pub mod service;
pub mod stage;
pub mod url_policy;
