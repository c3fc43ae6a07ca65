//! The Vigil agent: runs on every hypervisor, reports host facts to the monitor several times
//! a second over QUIC with mutual TLS, and carries out the monitor's commands.
//!
//! Module map:
//! - [`facts`]: what the agent reports about its host;
//! - [`session`]: one authenticated connection to a monitor (handshake, heartbeats, commands);
//! - [`runner`]: keeps a session up, moving between monitors when one fails;
//! - [`cli`]: the `vigil-agent` command line.
#![forbid(unsafe_code)]

pub mod cli;
pub mod facts;
pub mod runner;
pub mod session;
