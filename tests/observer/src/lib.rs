//! vigil-observer: an independent duplicate checker for Vigil's lab.
//!
//! It watches every lab host's libvirt directly (not through Vigil's monitor, whose decisions
//! it checks), writes every change of every domain to a JSON-lines timeline ([`timeline`]),
//! takes marks from the lab (`mark`, e.g. the faults it injects), and [`check`]s the timeline:
//! no VM may ever run on two hosts at once; for every VM it reports how long it was down.
//!
//! - [`watch`]: one watcher per host (lifecycle events + a poll of active domains, qemu pid
//!   checks while libvirtd is unreachable);
//! - [`procs`]: qemu process liveness from /proc;
//! - [`timeline`]: the line format and the append-only writer;
//! - [`check`]: intervals, overlaps, gaps, and their rendering.

pub mod check;
pub mod procs;
pub mod timeline;
pub mod watch;
