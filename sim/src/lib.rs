//! Bitbucket Data Center simulator: a faithful stand-in for the product's node (`node`), its release
//! archives and `bin/` scripts (`archive`, `scripts`), and a local cluster of nodes for tests and the
//! demo (`cluster`).
//!
//! Layout: `version` (release versions, the bug-fix rule), `zdu` (the rolling-upgrade state machine,
//! pure), `membership` (the cluster record in the shared home, under `flock`), `node` (the HTTP node and its Git-over-SSH door),
//! `properties` (`.properties` files), `client` (a tiny blocking HTTP client for probes and tests),
//! `load` (a load generator: many users' sessions, pages and clones, through the load balancer),
//! `balancer` (a stand-in for HAProxy, for the demo where HAProxy is not installed).

pub mod archive;
pub mod balancer;
pub mod cli;
pub mod client;
pub mod cluster;
pub mod load;
pub mod membership;
pub mod node;
pub mod properties;
pub mod scripts;
pub mod version;
pub mod zdu;
