//! The Vigil monitor: the replicated brain of a Vigil cluster, and the `vigilctl` CLI.
//!
//! Read it from the inside out:
//! - pure core, no I/O: [`state`] (the replicated state and its commands), [`detector`]
//!   (heartbeat liveness), [`engine`] (inputs → actions: every decision lives here);
//! - edges: [`raft`] (openraft on redb: log, state machine, network), [`service`] (the task
//!   that feeds the engine and carries out its actions), [`agent_link`] (agent sessions),
//!   [`admin`] (the API `vigilctl` uses), [`server`] (the process: QUIC endpoint and wiring);
//! - [`backup`]: the backup file format (`vigilctl db backup`, `vigil-monitor --restore`);
//! - [`api`]: the JSON documents of the admin API; [`ctl`]: the `vigilctl` command line.
#![forbid(unsafe_code)]

pub mod admin;
pub mod agent_link;
pub mod api;
pub mod backup;
pub mod certs;
pub mod cli;
pub mod ctl;
pub mod detector;
pub mod engine;
pub mod fencing;
pub mod investigation;
pub mod lease;
pub mod placement;
pub mod raft;
pub mod recovery;
pub mod server;
pub mod service;
pub mod sim;
pub mod state;
pub mod storage;
pub mod vip;
