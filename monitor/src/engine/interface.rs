//! The engine's interface: what happens ([`Input`]) and what the edges must do ([`Action`]).

use std::collections::BTreeSet;
use std::net::IpAddr;

use vigil_common::domain::{DomainEvent, DomainInfo, HypervisorHealth};
use vigil_common::storage::{FenceAck, FenceRequest, StorageHeartbeat};
use vigil_common::wire::{AgentCommand, CommandOutcome, HostFacts, MonitorToAgent, PoolStatus};

use crate::agent_link::CommandError;
use crate::fencing::FenceFailure;
use crate::state::StateCommand;
use crate::storage::PoolFault;

/// Something that happened, as seen by the edges.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// An agent completed the handshake. Its identity comes from its certificate.
    AgentConnected(Hello),
    AgentDisconnected {
        host: String,
    },
    /// An agent with a verified certificate for `host` connected, but cannot be managed (its
    /// protocol version differs): the host is alive, and must never be fenced for that.
    AgentIncompatible {
        host: String,
        detail: String,
    },
    Heartbeat(Beat),
    /// The agent fenced itself while cut from the monitors (reported once reconnected); it
    /// is about to destroy, or has destroyed, `destroyed`. `id` names the fencing episode:
    /// the agent resends the report until it is noted, so one episode is recorded once.
    SelfFenced(SelfFenceReport),
    /// One I/O cycle of this monitor on a storage pool.
    Storage {
        pool: String,
        result: Result<StorageCycle, PoolFault>,
    },
    /// The host's full domain list and hypervisor health. `seq`: the agent's observation
    /// sequence number (see `vigil_common::wire::AgentToMonitor`), stamped before listing.
    Inventory(Listing),
    /// `seq`: the agent's observation sequence number, stamped when the event arrived.
    DomainEvent(LifecycleReport),
    Definition(DefinitionReport),
    StaleDestroyed(StaleCopyDestroyed),
    /// The outcome of a command the engine sent (`Err`: it never got an answer). `seq`: the
    /// agent's observation sequence number of the answer (`None` without one).
    CommandDone(CommandAnswer),
    /// Until when (monotonic ms) this monitor holds its leader lease (`None`: it does not;
    /// see `raft::leader_lease`). With [`Engine::with_leader_lease`], no action that
    /// [`Action::needs_leader_lease`] leaves the engine once that moment has passed: a deposed
    /// leader that has not noticed yet must not grant leases the new leader counts as expired,
    /// fence, or write storage.
    LeaderLease {
        until_ms: Option<u64>,
    },
    /// A fence agent finished: `Ok(detail)` only when it confirmed the host powered off.
    FenceDone {
        host: String,
        result: Result<String, FenceFailure>,
    },
    /// Time passed (the edge ticks several times per heartbeat interval).
    Tick,
    /// A proposal was committed and applied: committed state may have new work.
    Applied,
    /// This monitor became the Raft leader.
    BecameLeader {
        term: u64,
        node: u64,
    },
    /// This monitor is no longer the leader.
    LostLeadership,
    /// Whether this monitor's own certificate has expired (`Some(what)`) or is valid
    /// (`None`), from the edge's periodic check: agents refuse an expired one, so every host
    /// falls silent at once, and silence then proves nothing.
    OwnCertificate {
        expired: Option<String>,
    },
    /// An operator asks to power `host` off through its fence agent now (`vigilctl host fence
    /// H`, like Pacemaker's `stonith_admin --fence`); `by` is the admin certificate's name.
    /// The admin API checks [`Engine::fence_refusal`] first.
    OperatorFence {
        host: String,
        by: String,
    },
    /// An operator lifts the mass-failure hold (`vigilctl fencing release`) of one cluster or
    /// of all: the hosts it holds now are fenced automatically.
    ReleaseHold {
        cluster: Option<String>,
        by: String,
    },
    /// Issue 10 item 3: an agent with a valid certificate said hello with another zone or
    /// cluster than its host record; the session was refused (`detail` names both).
    HostPlacementRefused {
        host: String,
        detail: String,
    },
}

/// What an agent said in its hello, its host name taken from its certificate.
#[derive(Debug, Clone, PartialEq)]
pub struct Hello {
    pub host: String,
    pub zone: String,
    pub cluster: String,
    pub agent_version: String,
    pub facts: HostFacts,
    /// Random per agent process.
    pub instance: u64,
    /// Storage pools the host mounts.
    pub pools: Vec<String>,
    /// The address the agent connects from (peers probe it).
    pub addr: Option<IpAddr>,
}

/// One heartbeat of an agent.
#[derive(Debug, Clone, PartialEq)]
pub struct Beat {
    pub host: String,
    pub seq: u64,
    pub facts: HostFacts,
    /// The agent's clock when it sent the beat (ms since its process started).
    pub mono_ms: u64,
    pub pools: Vec<PoolStatus>,
    /// The host watchdog's timeout while armed (what lets lease expiry prove the host off).
    pub watchdog_ms: Option<u64>,
}

/// An agent's report that it fenced itself.
#[derive(Debug, Clone, PartialEq)]
pub struct SelfFenceReport {
    pub host: String,
    pub id: u64,
    pub reason: String,
    pub destroyed: Vec<String>,
}

/// A host's full domain list and hypervisor health.
#[derive(Debug, Clone, PartialEq)]
pub struct Listing {
    pub host: String,
    pub domains: Vec<DomainInfo>,
    pub health: HypervisorHealth,
    pub seq: u64,
}

/// A libvirt lifecycle event of one domain, as its host's agent saw it.
#[derive(Debug, Clone, PartialEq)]
pub struct LifecycleReport {
    pub host: String,
    pub event: DomainEvent,
    pub generation: Option<u64>,
    pub seq: u64,
}

/// A domain definition (XML) an agent ships for an HA VM it runs.
#[derive(Debug, Clone, PartialEq)]
pub struct DefinitionReport {
    pub host: String,
    pub uuid: String,
    pub xml: String,
}

/// An agent destroyed a copy of a VM older than the generation the monitors announced: `found` is the copy's generation (`None`: unstamped), `newest` the announced one.
#[derive(Debug, Clone, PartialEq)]
pub struct StaleCopyDestroyed {
    pub host: String,
    pub uuid: String,
    pub found: Option<u64>,
    pub newest: u64,
}

/// The outcome of a command the engine sent.
#[derive(Debug, Clone, PartialEq)]
pub struct CommandAnswer {
    pub host: String,
    pub command: AgentCommand,
    pub result: Result<CommandOutcome, CommandError>,
    pub seq: Option<u64>,
}

/// What one storage cycle of the leader found on a pool.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StorageCycle {
    /// The leader record was written in this cycle.
    pub leader_written: bool,
    /// The hosts the record written in this cycle condemned.
    pub condemned: Vec<String>,
    pub heartbeats: Vec<StorageHeartbeat>,
    pub acks: Vec<FenceAck>,
}

/// What the edges must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Replicate this command through Raft.
    Propose(StateCommand),
    /// Send a command to a host's agent; the outcome comes back as [`Input::CommandDone`].
    Send { host: String, command: AgentCommand },
    /// Power a host off through its fence agent; the verdict comes back as
    /// [`Input::FenceDone`].
    Fence { host: String },
    /// Send a notification frame to one host's agent (`Some`) or to every agent (`None`).
    Notify {
        host: Option<String>,
        message: MonitorToAgent,
    },
    /// Write a fence request in the host's slot on every storage pool.
    RequestFence(FenceRequest),
    /// Remove the host's fence request (and acknowledgement) from every pool.
    ClearFence { host: String },
    /// What the leader record says now: the hosts this leader condemns (their agents must
    /// fence themselves once their lease ran out) and whether fencing is held. Emitted on
    /// every tick while leading; the storage threads write the record only while these keep
    /// coming, so a stalled engine leaves it stale and makes nobody fence.
    LeaderRecord { condemned: Vec<String>, hold: bool },
}

impl Action {
    /// Whether carrying this out needs the leader lease: what a deposed leader that has not
    /// noticed yet must not do, because the new leader may be acting on the same host (lease
    /// grants it counts as expired, fencing, storage slots and the leader record, destroying a
    /// domain). Not needed: proposals (they cannot commit without a quorum), start orders (only
    /// of a committed generation, which the agent runs at most once, on the host that the
    /// committed state names), pings, probes, and notes to agents.
    pub fn needs_leader_lease(&self) -> bool {
        match self {
            Action::Propose(_) => false,
            Action::Send { command, .. } => matches!(command, AgentCommand::DestroyDomain { .. }),
            Action::Notify { message, .. } => matches!(message, MonitorToAgent::LeaseGrant { .. }),
            Action::Fence { .. }
            | Action::RequestFence(_)
            | Action::ClearFence { .. }
            | Action::LeaderRecord { .. } => true,
        }
    }
}

/// How host failures are handled. (Placement preferences — ha_tag, its fallback, vCPU
/// overcommit — are in the engine's `RecoveryConfig`, read from `[recovery]`.)
#[derive(Debug, Clone, Default)]
pub struct FailoverConfig {
    /// Hosts with a fence agent configured.
    pub fence_hosts: BTreeSet<String>,
    /// The longest a fence-agent call may run before its process group is killed (the
    /// longest of `fencing.timeout_ms` and the hosts' own). A new leader waits this long
    /// (and [`crate::engine::PREDECESSOR_FENCE_MARGIN_MS`]) before it lets a host that was
    /// being fenced rejoin: a fence agent its predecessor started may still be running.
    pub fence_agent_limit_ms: u64,
    /// Hold automatic fencing when more than this share (percent) of a cluster's hosts are
    /// down at once (and at least two are): more likely the monitors' own network.
    pub mass_failure_percent: u32,
    /// "At once": hosts count towards a mass failure only when they went silent within this
    /// many ms of each other, and only until they are proven off.
    pub mass_failure_window_ms: u64,
    /// Ask isolated hosts to fence themselves through their storage slot.
    pub storage_slot: bool,
    /// TCP port peers knock on to see whether a silent host's kernel answers.
    pub probe_port: u16,
}
