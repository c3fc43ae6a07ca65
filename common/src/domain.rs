//! Virtual machines as agents report them and the monitor reasons about them.
//!
//! The agent's libvirt backend fills these; the monitor never sees libvirt types.

use serde::{Deserialize, Serialize};

/// XML namespace of Vigil's element in a domain's `<metadata>`.
///
/// ```xml
/// <metadata>
///   <vigil:vm xmlns:vigil="urn:vigil:vm:1" ha="true" priority="10" generation="3"/>
/// </metadata>
/// ```
/// `ha` and `priority` are the operator's (also settable with `vigilctl vm ha`); `generation`
/// is written by the agent when it starts the domain on the monitor's order.
pub const METADATA_NS: &str = "urn:vigil:vm:1";
/// Prefix used for that namespace.
pub const METADATA_PREFIX: &str = "vigil";

/// Coarse domain state (libvirt's `virDomainState`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DomainState {
    Running,
    /// Paused (by an operator, a migration, or an I/O error: see the reason).
    Paused,
    Shutoff,
    Crashed,
    Blocked,
    ShuttingDown,
    PmSuspended,
    NoState,
}

/// Why a domain is in its state: the part of libvirt's state reason that Vigil acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StateReason {
    /// Running after a normal boot or restore.
    Booted,
    /// qemu died or the guest crashed (`VIR_DOMAIN_SHUTOFF_CRASHED`, `VIR_DOMAIN_CRASHED_*`).
    Crashed,
    /// qemu failed (`VIR_DOMAIN_SHUTOFF_FAILED`; what `kill -9` of qemu reports).
    Failed,
    /// The guest shut itself down.
    GuestShutdown,
    /// Destroyed by an operator (`virsh destroy`, or Vigil on an operator's request).
    Destroyed,
    /// Migrated to another host.
    Migrated,
    /// Saved to a file.
    Saved,
    /// Paused because of a disk I/O error.
    IoError,
    /// Paused by a user.
    User,
    /// Never started since it was defined.
    NeverStarted,
    Other,
}

/// Vigil's per-domain metadata from the domain XML.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct VigilMeta {
    /// Marked HA in the domain XML (the replicated flag set with vigilctl wins over it).
    pub ha: Option<bool>,
    pub priority: Option<i32>,
    /// The activation generation this domain was last started with by Vigil.
    pub generation: Option<u64>,
}

/// One domain on one host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainInfo {
    /// libvirt UUID, lower-case hyphenated.
    pub uuid: String,
    pub name: String,
    pub state: DomainState,
    pub reason: StateReason,
    pub vcpus: u32,
    pub memory_kib: u64,
    /// Source paths of the domain's disks (files or block devices).
    pub disks: Vec<String>,
    /// The primary storage pools (by name) its disks are on, as its agent tells from the
    /// disks' source paths and the pools' mount paths: `Some(vec![])` when every disk is
    /// local. `None` when the agent cannot tell (a network or volume disk, an older agent):
    /// the monitor then treats the domain as on *every* pool, so a storage fault moves it.
    pub pools: Option<Vec<String>>,
    pub meta: VigilMeta,
    /// Whether the domain is persistent (defined), not just transient.
    pub persistent: bool,
}

/// What happened to a domain, classified from libvirt lifecycle events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LifecycleKind {
    Started,
    /// qemu died or the guest crashed: Vigil's business.
    Crashed,
    /// The guest shut itself down: respected, not restarted.
    GuestShutdown,
    /// An operator destroyed it: respected, not restarted.
    Destroyed,
    MigratedAway,
    /// Paused on a disk I/O error (storage trouble).
    PausedIoError,
    Paused,
    Resumed,
    Defined,
    Undefined,
    Other,
}

/// libvirt's `VIR_DOMAIN_EVENT_STOPPED`: the only event that says qemu is gone. (A
/// `VIR_DOMAIN_EVENT_CRASHED` guest panic can leave qemu running, e.g. with
/// `on_crash=preserve`.)
pub const RAW_EVENT_STOPPED: i32 = 5;

/// A lifecycle event, as the agent forwards it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainEvent {
    pub uuid: String,
    pub name: String,
    pub kind: LifecycleKind,
    /// libvirt's raw event and detail codes, for logs.
    pub raw_event: i32,
    pub raw_detail: i32,
    /// Unix ms when the agent received it.
    pub at_ms: u64,
}

/// Whether the agent can talk to its hypervisor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum HypervisorHealth {
    #[default]
    Healthy,
    /// libvirt calls fail or exceed their deadline; `since_ms` is Unix ms.
    Unhealthy { reason: String, since_ms: u64 },
    /// This agent runs without a hypervisor backend.
    Disabled,
}

impl DomainEvent {
    /// Whether this event proves that the domain's qemu is gone.
    pub fn proves_stopped(&self) -> bool {
        self.raw_event == RAW_EVENT_STOPPED
    }
}

impl DomainInfo {
    /// Whether libvirt reports the domain shut off (qemu gone), as opposed to running,
    /// paused, crashed-but-preserved and so on.
    pub fn is_shut_off(&self) -> bool {
        self.state == DomainState::Shutoff
    }
}
