//! The bbupgrade coordinator: the admin's CLI that upgrades Bitbucket Data Center clusters without
//! downtime.
//!
//! Layout: `cli` parses commands (the only module that knows clap's argument types) and hands
//! plain options to `commands` (`plan`, `upgrade`, `resume`, `rollback`, `finalize`, `abort`);
//! `inventory` holds validated clusters and nodes; `archive` the release given; `agents` connects
//! to agents over mutual TLS; `zdu` is Bitbucket's rolling-upgrade API; `loadbalancer` drains and
//! restores nodes; `plan` decides (preflight, least-busy order) without I/O; `procedure` carries a
//! run out (pure decisions in `procedure::decide`, the driver in `procedure::drive`, the real
//! cluster in `procedure::context`); `journal` records every step in SQLite or PostgreSQL;
//! `report` prints; `error` holds the bad-input error; `status` is the other command;
//! `demo_launch` runs the demo (its own crate, `bbupgrade-demo`, so this one does not link the
//! simulator); `fleet` upgrades many clusters in waves (within a `window`); `catalog` lists
//! releases and their archives; `run_report` draws a journaled run as an HTML page.

pub mod agents;
pub mod archive;
pub mod catalog;
pub mod cli;
pub mod commands;
pub mod demo_launch;
pub mod error;
pub mod fleet;
pub mod inventory;
pub mod journal;
pub mod loadbalancer;
pub mod manual;
pub mod node_match;
pub mod plan;
pub mod procedure;
pub mod release_check;
pub mod report;
pub mod run_report;
pub mod status;
pub mod window;
pub mod zdu;
pub mod zdu_pool;
