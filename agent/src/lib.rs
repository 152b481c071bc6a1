//! The bbupgrade agent: a daemon on each Bitbucket node that carries out the node-local steps of a
//! rolling upgrade for the coordinator, over mutual TLS.
//!
//! Layout, in the order of the steps: `config` (validated settings), `stage` (one-pass verify and
//! extract of a release), `prepare` (home and customizations), `service` (stop/start through the
//! service manager), `activate` (point the service definition at an install), `journal` (operation
//! ids and their results), `metrics` (load), `lb` (the optional load-balancer role on an NGINX host),
//! `server` (the gRPC service), `cli` (the binary).

pub mod activate;
pub mod cli;
pub mod config;
pub mod journal;
pub mod lb;
pub mod metrics;
pub mod node_state;
pub mod prepare;
pub mod rollback;
pub mod server;
pub mod service;
pub mod stage;
