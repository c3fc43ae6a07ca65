//! `vigil-lab`: several hypervisor hosts and monitors on one machine, each in its own network
//! namespace on one bridge, with real libvirtd/QEMU, real agents and monitors, and fault
//! injection. See README.md beside this crate for the CLI and the process model.

pub mod cmd;
pub mod faults;
pub mod installed;
pub mod lab;
pub mod layout;
pub mod net;
pub mod procfs;
pub mod state;
pub mod supervisor;
