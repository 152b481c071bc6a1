//! The bbupgrade coordinator: the admin's CLI that upgrades Bitbucket Data Center clusters without
//! downtime.
//!
//! Layout: `cli` parses commands; `inventory` holds validated clusters and nodes; `agents` connects
//! to agents over mutual TLS; `zdu` is Bitbucket's rolling-upgrade API; `loadbalancer` drains and
//! restores nodes; `plan` decides (preflight, least-busy order) without I/O; `procedure` carries a
//! run out (pure decisions in `procedure::decide`, the driver in `procedure::drive`); `run` wires
//! commands to it; `journal` records every step in SQLite; `report` prints;
//! `status` is the other command; `demo_launch` runs the demo (its own crate, `bbupgrade-demo`, so
//! this one does not link the simulator); `fleet` upgrades many clusters in waves; `catalog` lists
//! releases and their archives; `run_report` draws a journaled run as an HTML page.

pub mod agents;
pub mod catalog;
pub mod cli;
pub mod demo_launch;
pub mod fleet;
pub mod inventory;
pub mod journal;
pub mod loadbalancer;
pub mod node_match;
pub mod plan;
pub mod procedure;
pub mod report;
pub mod run;
pub mod run_report;
pub mod skew;
pub mod status;
pub mod zdu;
pub mod zdu_pool;
