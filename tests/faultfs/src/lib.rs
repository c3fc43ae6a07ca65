//! `vigil-faultfs`: shared primary storage that fails the way NFS fails.
//!
//! A FUSE passthrough filesystem that mirrors a backing directory and can be switched at run
//! time between three modes (see [`Mode`]):
//!
//! * `ok`: plain passthrough;
//! * `eio`: every operation fails with `EIO`;
//! * `hang`: every operation is parked unanswered (the caller blocks, as on a dead NFS server)
//!   until the mode changes; parked requests then proceed according to the new mode.
//!
//! Several instances may mirror the same backing directory (one per lab host), each with its
//! own mode. The crate offers:
//!
//! * [`mount()`] / [`Mounted`]: mount in this process and flip the mode through a [`Controller`];
//! * [`control`]: the one-line unix-socket protocol (`ok`, `eio`, `hang`, `status`), server and
//!   client;
//! * [`ServerProcess`]: run the `vigil-faultfs mount` binary as a child and drive it, with a
//!   `Drop` that always releases hung requests, unmounts and reaps the child;
//! * [`cleanup()`]: remove a mount whose server died (`SIGKILL`).
//!
//! And the lab's per-host fake watchdog ([`watchdog`], binary `vigil-lab-watchdog`): a file that
//! behaves like `/dev/watchdog` and whose expiry runs a command (the host's power loss).

#![warn(missing_docs)]

pub mod cleanup;
pub mod control;
mod fs;
mod mode;
mod mount;
pub mod process;
// Field-level docs are on the types' own doc comments and the control protocol's description.
#[allow(missing_docs)]
pub mod watchdog;

pub use cleanup::{cleanup, is_mounted, CleanupReport};
pub use mode::{now_ms, Controller, Mode};
pub use mount::{mount, MountOptions, Mounted};
pub use process::{ServerOptions, ServerProcess};
