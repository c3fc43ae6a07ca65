//! The Vigil agent: runs on every hypervisor, reports host facts to the monitor several times
//! a second over QUIC with mutual TLS, and carries out the monitor's commands.
//!
//! Module map:
//! - [`facts`]: what the agent reports about its host;
//! - [`session`]: one authenticated connection to a monitor (handshake, heartbeats, commands);
//! - [`runner`]: keeps a session up, moving between monitors when one fails;
//! - [`follow`]: which monitor to dial next (the Raft leader, by the followers' redirects);
//! - [`libvirt`]: the hypervisor backend (a dedicated thread with deadlines, lifecycle events);
//! - [`watch`]: watches the hypervisor (events, inventory, definitions, stale generations);
//! - [`executor`]: carries out the monitor's orders, guarded by [`generations`];
//! - [`lease`]: how long the agent may keep its HA guests without the monitors;
//! - [`storage`]: the storage heartbeat, fence slot and leader record on shared pools;
//! - [`isolation`]: when to self-fence (lease, leader record, fence requests);
//! - [`watchdog`]: the host watchdog that backs lease expiry as a proof;
//! - [`fencing`]: terms, withdrawn requests and the persisted self-fence reports;
//! - [`state_lock`]: one agent process per `state_dir`;
//! - [`cli`]: the `vigil-agent` command line.
#![deny(unsafe_code)]

pub mod cli;
pub mod executor;
pub mod facts;
pub mod fencing;
pub mod follow;
pub mod generations;
pub mod isolation;
pub mod lease;
pub mod libvirt;
pub mod runner;
pub mod session;
pub mod state_lock;
pub mod storage;
pub mod watch;
pub mod watchdog;
