//! The monitor's decision core: inputs in, actions out, no I/O.
//!
//! The edges (QUIC sessions, Raft, timers) turn what happens into [`Input`]s; [`Engine::handle`]
//! decides, reading the replicated [`ClusterState`], and returns [`Action`]s for the edges to
//! carry out. Everything that changes durable state leaves as [`Action::Propose`] and only
//! takes effect once Raft has committed it; orders to agents ([`Action::Send`]) are derived
//! from *committed* state only (a start order is sent after its generation is committed), so
//! a new leader re-derives the same orders and recovery is idempotent across leader changes.
//!
//! Who decides what:
//! - liveness: [`crate::detector`];
//! - what a failed VM does next (restart in place, relocate, give up, backoff):
//!   [`crate::recovery`];
//! - which host takes it: [`crate::placement`];
//! - whether there is proof that the old activation is gone: here, in [`Engine::vm_failed`]
//!   and the event/inventory handlers: only the agent of the VM's current host reporting it
//!   stopped (an event, an inventory entry, or a refused start) counts, and only for the
//!   VM's current generation.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

use vigil_common::config::{DetectorConfig, LeaseConfig, RecoveryConfig, TagFallback};
use vigil_common::domain::{
    DomainEvent, DomainInfo, DomainState, HypervisorHealth, LifecycleKind, StateReason,
};
use vigil_common::storage::{FenceAck, FenceRequest, StorageHeartbeat};
use vigil_common::wire::{AgentCommand, CommandOutcome, HostFacts, MonitorToAgent, PoolStatus};

mod claims;

use crate::detector::{FailureDetector, Liveness, LivenessView, Transition};
use crate::investigation::{self, Condition, Evidence};
use crate::lease::LeaseBook;
use crate::placement::{self, HostView, Need};
use crate::recovery;
use crate::state::{
    ClusterState, EventKind, FailureKind, HostPhase, Phase, Proof, Severity, StateCommand,
    StopReason, VmRecord,
};

/// Something that happened, as seen by the edges.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// An agent completed the handshake. Its identity comes from its certificate.
    AgentConnected {
        host: String,
        zone: String,
        cluster: String,
        agent_version: String,
        facts: HostFacts,
        /// Random per agent process.
        instance: u64,
        /// Storage pools the host mounts.
        pools: Vec<String>,
        /// The address the agent connects from (peers probe it).
        addr: Option<IpAddr>,
    },
    AgentDisconnected {
        host: String,
    },
    /// An agent with a verified certificate for `host` connected, but cannot be managed (its
    /// protocol version differs): the host is alive, and must never be fenced for that.
    AgentIncompatible {
        host: String,
        detail: String,
    },
    Heartbeat {
        host: String,
        seq: u64,
        facts: HostFacts,
        /// The agent's clock when it sent the beat (ms since its process started).
        mono_ms: u64,
        pools: Vec<PoolStatus>,
        /// The host watchdog's timeout while armed (what lets lease expiry prove the host off).
        watchdog_ms: Option<u64>,
    },
    /// The agent fenced itself while cut from the monitors (reported once reconnected); it
    /// is about to destroy, or has destroyed, `destroyed`. `id` names the fencing episode:
    /// the agent resends the report until it is noted, so one episode is recorded once.
    SelfFenced {
        host: String,
        id: u64,
        reason: String,
        destroyed: Vec<String>,
    },
    /// One I/O cycle of this monitor on a storage pool.
    Storage {
        pool: String,
        result: Result<StorageCycle, String>,
    },
    /// The host's full domain list and hypervisor health. `seq`: the agent's observation
    /// sequence number (see `vigil_common::wire::AgentToMonitor`), stamped before listing.
    Inventory {
        host: String,
        domains: Vec<DomainInfo>,
        health: HypervisorHealth,
        seq: u64,
    },
    /// `seq`: the agent's observation sequence number, stamped when the event arrived.
    DomainEvent {
        host: String,
        event: DomainEvent,
        generation: Option<u64>,
        seq: u64,
    },
    Definition {
        host: String,
        uuid: String,
        xml: String,
    },
    StaleDestroyed {
        host: String,
        uuid: String,
        found: Option<u64>,
        newest: u64,
    },
    /// The outcome of a command the engine sent (`Err`: it never got an answer). `seq`: the
    /// agent's observation sequence number of the answer (`None` without one).
    CommandDone {
        host: String,
        command: AgentCommand,
        result: Result<CommandOutcome, String>,
        seq: Option<u64>,
    },
    /// When (monotonic ms) a quorum of monitors last acknowledged this leader, as Raft
    /// reports it (`None`: not known). A leader grants leases only while that is recent
    /// (see [`Engine::with_quorum_check`]): a deposed leader that has not noticed yet must not
    /// extend leases that the new leader counts as expired.
    Quorum {
        last_ack_ms: Option<u64>,
    },
    /// A fence agent finished: `Ok(detail)` only when it confirmed the host powered off.
    FenceDone {
        host: String,
        result: Result<String, String>,
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

#[derive(Debug, Clone, Default)]
struct HostInventory {
    domains: BTreeMap<String, DomainInfo>,
    health: HypervisorHealth,
    /// The listing's observation sequence number.
    seq: u64,
}

/// How host failures are handled.
#[derive(Debug, Clone, Default)]
pub struct FailoverConfig {
    /// Hosts with a fence agent configured.
    pub fence_hosts: BTreeSet<String>,
    /// Hold automatic fencing when more than this share (percent) of a cluster's hosts are
    /// down at once (and at least two are): more likely the monitors' own network.
    pub mass_failure_percent: u32,
    /// "At once": hosts count towards a mass failure only when they went silent within this
    /// many ms of each other, and only until they are proven off.
    pub mass_failure_window_ms: u64,
    /// Prefer hosts carrying this tag for VMs recovering from a host failure.
    pub ha_tag: Option<String>,
    pub ha_tag_fallback: TagFallback,
    /// Ask isolated hosts to fence themselves through their storage slot.
    pub storage_slot: bool,
    /// A host takes VMs up to its CPUs times this many vCPUs (0: vCPUs are not checked).
    pub vcpu_overcommit: u32,
    /// TCP port peers knock on to see whether a silent host's kernel answers.
    pub probe_port: u16,
}

/// Wait this long before retrying a failed fence.
pub const FENCE_RETRY_MS: u64 = 5_000;

/// A destroy ordered so that a VM starts elsewhere (storage fault, maintenance) is expected
/// to show as a stop for at most this long (wall ms; above the edge's command timeout): a
/// destroy that never completes (QEMU stuck in uninterruptible I/O) must not leave the
/// expectation behind to misread a later operator stop as a failure.
pub const EXPECTED_STOP_TTL_MS: u64 = 120_000;

/// Wait this long before ordering a destroy again after the agent said it failed.
pub const DESTROY_RETRY_MS: u64 = 10_000;

/// Leader-local soft state plus the decision logic.
#[derive(Debug, Clone)]
pub struct Engine {
    detector: FailureDetector,
    policy: RecoveryConfig,
    facts: BTreeMap<String, HostFacts>,
    connected: BTreeSet<String>,
    inventory: BTreeMap<String, HostInventory>,
    /// Starts proposed (uuid → generation) and not yet seen committed.
    proposed_start: BTreeMap<String, u64>,
    /// Failures proposed (uuid → generation) and not yet seen committed.
    proposed_failure: BTreeMap<String, u64>,
    /// Start orders sent by this leader (uuid → generation).
    dispatched: BTreeMap<String, u64>,
    /// Generations announced to agents (uuid → generation).
    announced: BTreeMap<String, u64>,
    failover: FailoverConfig,
    /// Fence calls in flight.
    fencing: BTreeSet<String>,
    /// Earliest time (wall ms) for the next fence attempt of a host.
    fence_retry_at: BTreeMap<String, u64>,
    /// Clusters whose automatic fencing is held (mass failure), to say so once.
    held: BTreeSet<String>,
    /// Hosts an operator released from a mass-failure hold (`vigilctl fencing release`): they
    /// neither count towards nor wait for a hold until they are heard again.
    released: BTreeSet<String>,
    /// VMs already told about a missing ha_tag host, to say so once per episode.
    tag_warned: BTreeSet<String>,
    /// VMs already reported as lacking a stored definition.
    def_warned: BTreeSet<String>,
    /// What each connected agent said in its hello (zone, cluster, agent version), so a
    /// monitor that becomes leader after the agent connected still registers the host.
    hellos: BTreeMap<String, (String, String, String)>,
    leader: bool,
    /// What silent hosts' silence means (storage heartbeats, peer probes).
    evidence: Evidence,
    /// Leases granted and when their expiry is proof.
    leases: LeaseBook,
    /// The last condition recorded per host (events on change).
    conditions: BTreeMap<String, Condition>,
    /// Agent process of each host (from its hello).
    instances: BTreeMap<String, u64>,
    /// Storage pools of each host (from its hello), and their state there.
    host_pools: BTreeMap<String, Vec<String>>,
    pool_status: BTreeMap<(String, String), PoolStatus>,
    /// Fence requests written to storage slots by this leader.
    slot_requests: BTreeMap<String, FenceRequest>,
    /// Hosts whose proof (slot or lease) was proposed.
    proof_proposed: BTreeSet<String>,
    /// Self-fence reports already recorded, per host (episode ids), so that a resent
    /// report is recorded once.
    self_fence_noted: BTreeMap<String, BTreeSet<u64>>,
    /// Fence acknowledgements already refused as proof (request ids), to say so once.
    acks_refused: BTreeSet<u64>,
    /// Earliest time (monotonic ms) to power-fence a host in Fencing.
    power_after: BTreeMap<String, u64>,
    /// Whether the host's fencing may use lease expiry (not when only its agent is down).

    /// Hosts already reported as unfenceable (no method), to say so once.
    unfenceable: BTreeSet<String>,
    /// Raft term and node id while leader (stamped into fence requests).
    term_node: (u64, u64),
    /// Stops that are failures to recover from, not an operator's decision, although libvirt
    /// reports them as a destroy: HA domains an agent destroyed when it fenced itself, and
    /// those destroyed on the monitor's order so that they start elsewhere (their host alone
    /// lost their storage, or is in maintenance). uuid → (what failed, why it was destroyed).
    expected_stops: BTreeMap<String, (FailureKind, String)>,
    /// Hosts whose agent connected with an incompatible protocol, and when it last tried
    /// (monotonic ms): alive, not fenced, not condemned, for [`INCOMPATIBLE_ALIVE_MS`].
    incompatible: BTreeMap<String, u64>,
    /// Hosts in maintenance (mirrored from the replicated state on each tick and apply).
    maintenance: BTreeSet<String>,
    /// Hosts that are fencing or fenced (mirrored like `maintenance`): nothing is placed on
    /// them until they rejoin, so a fence's proof only ever covers what ran there before.
    not_active: BTreeSet<String>,
    /// Rejoins proposed for hosts heard again on a session that survived their fencing.
    rejoining: BTreeSet<String>,
    /// Host views for placement, built once per input and reserved as VMs are placed.
    views: Option<BTreeMap<String, HostView>>,
    /// Pools whose outage was already reported (pool-wide or one host), to say so once.
    outages: BTreeMap<String, String>,
    /// Since when (monotonic ms) each (host, pool) has been reported down.
    pool_down_since: BTreeMap<(String, String), u64>,
    /// Per pool: the current outage scope and since when it has held (a pool-wide outage
    /// that heals host by host passes through "some hosts only" for a moment).
    scope_since: BTreeMap<String, (String, u64)>,
    /// The newest observation sequence number seen per (host, VM uuid), for the host's
    /// current agent process: an older observation never overrides a newer one.
    observed: BTreeMap<(String, String), u64>,
    /// Per (host, VM uuid): the newest observation that says it runs there (a start's
    /// "running" answer, a started or resumed event). A listing older than that is no proof
    /// that the domain is shut off.
    seen_running: BTreeMap<(String, String), u64>,
    /// No fencing of any kind (power, slot, lease) before this time (monotonic ms): a full
    /// lease plus drift margin after this monitor became leader.
    fence_after_ms: u64,
    /// Lease grants need a quorum acknowledgement younger than this (`None`: not checked).
    quorum_fresh_ms: Option<u64>,
    /// When a quorum last acknowledged this leader ([`Input::Quorum`]).
    quorum_ack_ms: Option<u64>,
    /// When (wall ms) each forced stop (`expected_stops` from [`forced_stop`]) was ordered.
    forced_stop_at: BTreeMap<String, u64>,
    /// VMs whose ordered destroy failed: not ordered again before this time (wall ms).
    destroy_retry_at: BTreeMap<String, u64>,
    /// Issue 10: what this leader already recorded, to say it once per episode.
    identity: claims::IdentityNotes,
}

/// A pool must be down on a host for this long before that host's HA VMs are moved off it:
/// a storage hiccup must not cost a guest its run.
pub const STORAGE_FAULT_GRACE_MS: u64 = 5_000;

/// An incompatible agent's last attempt counts as a sign of life for this long (agents retry
/// every few seconds at most).
pub const INCOMPATIBLE_ALIVE_MS: u64 = 30_000;

impl Engine {
    pub fn new(cfg: DetectorConfig, policy: RecoveryConfig, now_ms: u64) -> Self {
        Engine {
            detector: FailureDetector::new(cfg, now_ms),
            policy,
            facts: BTreeMap::new(),
            connected: BTreeSet::new(),
            inventory: BTreeMap::new(),
            proposed_start: BTreeMap::new(),
            proposed_failure: BTreeMap::new(),
            dispatched: BTreeMap::new(),
            announced: BTreeMap::new(),
            failover: FailoverConfig::default(),
            fencing: BTreeSet::new(),
            fence_retry_at: BTreeMap::new(),
            held: BTreeSet::new(),
            released: BTreeSet::new(),
            tag_warned: BTreeSet::new(),
            def_warned: BTreeSet::new(),
            hellos: BTreeMap::new(),
            leader: false,
            evidence: Evidence::default(),
            leases: LeaseBook::new(LeaseConfig::default(), 500),
            conditions: BTreeMap::new(),
            instances: BTreeMap::new(),
            host_pools: BTreeMap::new(),
            pool_status: BTreeMap::new(),
            slot_requests: BTreeMap::new(),
            proof_proposed: BTreeSet::new(),
            self_fence_noted: BTreeMap::new(),
            acks_refused: BTreeSet::new(),
            power_after: BTreeMap::new(),
            unfenceable: BTreeSet::new(),
            term_node: (0, 0),
            expected_stops: BTreeMap::new(),
            maintenance: BTreeSet::new(),
            incompatible: BTreeMap::new(),
            not_active: BTreeSet::new(),
            rejoining: BTreeSet::new(),
            views: None,
            outages: BTreeMap::new(),
            pool_down_since: BTreeMap::new(),
            scope_since: BTreeMap::new(),
            observed: BTreeMap::new(),
            seen_running: BTreeMap::new(),
            fence_after_ms: 0,
            quorum_fresh_ms: None,
            quorum_ack_ms: None,
            forced_stop_at: BTreeMap::new(),
            destroy_retry_at: BTreeMap::new(),
            identity: Default::default(),
        }
    }

    /// Grants leases only while a quorum acknowledged this leader within `fresh_ms` (fed by
    /// [`Input::Quorum`]); without this call the engine does not check.
    pub fn with_quorum_check(mut self, fresh_ms: u64) -> Self {
        self.quorum_fresh_ms = Some(fresh_ms);
        self
    }

    /// The first full lease (plus drift margin) after an election.
    fn election_grace_ms(&self) -> u64 {
        let l = self.leases.config();
        l.duration_ms + l.drift_margin_ms
    }

    /// Configures leases (duration, drift margin, isolation response) and the storage
    /// interval agents read the leader record at.
    pub fn with_leases(mut self, cfg: LeaseConfig, storage_interval_ms: u64) -> Self {
        self.leases = LeaseBook::new(cfg, storage_interval_ms);
        self.evidence = Evidence::new(
            self.detector.config().heartbeat_interval_ms,
            storage_interval_ms,
        );
        self
    }

    pub fn lease_config(&self) -> &LeaseConfig {
        self.leases.config()
    }

    /// The host's condition as last recorded.
    pub fn condition(&self, host: &str) -> Option<&Condition> {
        self.conditions.get(host)
    }

    /// Each storage pool's state as the host last reported it.
    pub fn pools_of(&self, host: &str) -> Vec<PoolStatus> {
        self.pool_status
            .iter()
            .filter(|((h, _), _)| h == host)
            .map(|(_, p)| p.clone())
            .collect()
    }

    /// Configures host-failure handling (fence agents, mass-failure guard, ha_tag).
    pub fn with_failover(mut self, failover: FailoverConfig) -> Self {
        self.failover = failover;
        self
    }

    pub fn is_leader(&self) -> bool {
        self.leader
    }

    /// Decides what to do about `input`. `now_ms` is monotonic time, `wall_ms` Unix time
    /// (stamped into proposals so that applying them is deterministic).
    pub fn handle(
        &mut self,
        input: Input,
        now_ms: u64,
        wall_ms: u64,
        state: &ClusterState,
    ) -> Vec<Action> {
        let mut out = Vec::new();
        self.views = None;
        match input {
            Input::AgentConnected {
                host,
                zone,
                cluster,
                agent_version,
                facts,
                instance,
                pools,
                addr,
            } => {
                if self.instances.insert(host.clone(), instance) != Some(instance) {
                    // A new agent process counts its observations afresh.
                    self.observed.retain(|(h, _), _| *h != host);
                    self.seen_running.retain(|(h, _), _| *h != host);
                    if let Some(inv) = self.inventory.get_mut(&host) {
                        inv.seq = 0;
                    }
                }
                self.host_pools.insert(host.clone(), pools);
                if let Some(ip) = addr {
                    self.evidence.address(&host, ip);
                }
                self.evidence.beat(&host, instance, 0, now_ms);
                if state
                    .hosts
                    .get(&host)
                    .is_some_and(|h| h.phase != HostPhase::Active)
                    || self.slot_requests.contains_key(&host)
                {
                    self.end_fencing_episode(&host, &mut out);
                }
                self.forget_fencing(&host);
                self.hellos.insert(
                    host.clone(),
                    (zone.clone(), cluster.clone(), agent_version.clone()),
                );
                let known = state.hosts.get(&host);
                // Zone and cluster are pinned in the host record (issue 10 item 3): a hello
                // never moves a registered host, only `vigilctl host place` does.
                let (zone, cluster) = claims::pinned_placement(known, zone, cluster);
                self.identity.placement_refused.remove(&host);
                let changed = known.is_none_or(|h| {
                    h.zone != zone || h.cluster != cluster || h.agent_version != agent_version
                });
                if changed {
                    out.push(Action::Propose(StateCommand::RegisterHost {
                        at_ms: wall_ms,
                        name: host.clone(),
                        zone,
                        cluster,
                        agent_version,
                    }));
                }
                if let Some(cmd) = self.host_info_update(&host, wall_ms, state) {
                    out.push(Action::Propose(cmd));
                }
                if state
                    .hosts
                    .get(&host)
                    .is_some_and(|h| h.phase != HostPhase::Active)
                {
                    out.push(Action::Propose(StateCommand::HostRejoined {
                        at_ms: wall_ms,
                        host: host.clone(),
                    }));
                }
                self.connected.insert(host.clone());
                self.facts.insert(host.clone(), facts);
                if let Some(t) = self.detector.heartbeat(&host, now_ms) {
                    self.transition_event(t, wall_ms, &mut out);
                }
                // A fresh session: it needs the whole generation table, and any start order
                // for this host that was in flight must be sent again.
                out.push(Action::Notify {
                    host: Some(host.clone()),
                    message: generation_table(state),
                });
                self.dispatched
                    .retain(|uuid, _| state.vms.get(uuid).is_none_or(|v| v.host != host));
            }
            Input::AgentIncompatible { host, detail } => {
                let known = self
                    .incompatible
                    .get(&host)
                    .is_some_and(|t| now_ms.saturating_sub(*t) < INCOMPATIBLE_ALIVE_MS);
                self.incompatible.insert(host.clone(), now_ms);
                if !known && self.leader {
                    out.push(Action::Propose(StateCommand::RecordEvent {
                        at_ms: wall_ms,
                        severity: Severity::Critical,
                        host: Some(host.clone()),
                        kind: EventKind::HostIncompatible,
                        message: format!(
                            "host {host}'s agent cannot be managed: {detail}. The host is alive, so it is not fenced and its guests keep running, unprotected, until its agent and the monitors run compatible versions"
                        ),
                    }));
                }
            }
            Input::AgentDisconnected { host } => {
                // Not evidence of death by itself: the detector decides on silence alone.
                self.connected.remove(&host);
                self.hellos.remove(&host);
                self.dispatched
                    .retain(|uuid, _| state.vms.get(uuid).is_none_or(|v| v.host != host));
            }
            Input::Heartbeat {
                host,
                seq,
                facts,
                mono_ms,
                pools,
                watchdog_ms,
            } => {
                self.leases.watchdog(&host, watchdog_ms);
                // In place when known: a new key would cost a String on every heartbeat.
                match self.facts.get_mut(&host) {
                    Some(f) => *f = facts,
                    None => {
                        self.facts.insert(host.clone(), facts);
                    }
                }
                let instance = self.instances.get(&host).copied().unwrap_or(0);
                self.evidence.beat(&host, instance, mono_ms, now_ms);
                for p in pools {
                    let key = (host.clone(), p.name.clone());
                    if self.pool_status.get(&key) != Some(&p) {
                        if self.pool_status.get(&key).is_none_or(|o| o.ok != p.ok) {
                            out.push(Action::Propose(StateCommand::RecordEvent {
                                at_ms: wall_ms,
                                severity: if p.ok {
                                    Severity::Info
                                } else {
                                    Severity::Warning
                                },
                                host: Some(host.clone()),
                                kind: EventKind::PoolState {
                                    pool: p.name.clone(),
                                    ok: p.ok,
                                },
                                message: if p.ok {
                                    format!("storage pool {} is up on {host}", p.name)
                                } else {
                                    format!(
                                        "storage pool {} is down on {host}: {}",
                                        p.name, p.detail
                                    )
                                },
                            }));
                        }
                        if p.ok {
                            self.pool_down_since.remove(&key);
                        } else {
                            self.pool_down_since.entry(key.clone()).or_insert(now_ms);
                        }
                        self.pool_status.insert(key, p);
                    }
                }
                if let Some(t) = self.detector.heartbeat(&host, now_ms) {
                    self.transition_event(t, wall_ms, &mut out);
                }
                // A host fenced through its storage slot or its lease keeps running, and its
                // session may outlive a short partition: heard again, it rejoins here (a new
                // session rejoins on connect).
                if self.not_active.contains(&host)
                    && self.connected.contains(&host)
                    && self.rejoining.insert(host.clone())
                {
                    out.push(Action::Propose(StateCommand::HostRejoined {
                        at_ms: wall_ms,
                        host: host.clone(),
                    }));
                    self.end_fencing_episode(&host, &mut out);
                    self.forget_fencing(&host);
                }
                // Only a leader grants leases (followers' output is dropped below), and only
                // while a quorum acknowledged it recently. A grant withheld is not recorded:
                // the lease book counts from the grants that went out.
                let quorum_ok = self.quorum_fresh_ms.is_none_or(|fresh| {
                    self.quorum_ack_ms
                        .is_some_and(|t| now_ms.saturating_sub(t) < fresh)
                });
                if self.leader && quorum_ok {
                    self.leases.grant(&host, now_ms);
                    out.push(Action::Notify {
                        host: Some(host),
                        message: MonitorToAgent::LeaseGrant {
                            seq,
                            lease_ms: self.leases.config().duration_ms,
                        },
                    });
                }
            }
            Input::SelfFenced {
                host,
                id,
                reason,
                destroyed,
            } => {
                // Resent until noted (also to a new leader): one event per episode.
                let noted = self.self_fence_noted.entry(host.clone()).or_default();
                let first = noted.insert(id);
                if noted.len() > 64 {
                    if let Some(oldest) = noted.iter().next().copied() {
                        noted.remove(&oldest);
                    }
                }
                out.push(Action::Notify {
                    host: Some(host.clone()),
                    message: MonitorToAgent::SelfFenceNoted { id },
                });
                for uuid in &destroyed {
                    self.expected_stops.insert(
                        uuid.clone(),
                        (
                            FailureKind::Crashed,
                            "destroyed by its own agent when it fenced itself".into(),
                        ),
                    );
                }
                if first {
                    out.push(Action::Propose(StateCommand::RecordEvent {
                        at_ms: wall_ms,
                        severity: Severity::Critical,
                        host: Some(host.clone()),
                        kind: EventKind::HostSelfFenced,
                        message: format!(
                            "host {host} fenced itself ({} HA domain(s) destroyed): {reason}",
                            destroyed.len()
                        ),
                    }));
                }
                // Stops that its agent reported before this message are failures too.
                for uuid in destroyed {
                    if let Some(vm) = state.vms.get(&uuid) {
                        if vm.ha
                            && vm.host == host
                            && vm.phase == Phase::Running
                            && self.shut_off_on(&host, &uuid)
                        {
                            let proof = Proof::AgentReportedStopped {
                                host: host.clone(),
                                detail: format!(
                                    "its agent destroyed it when fencing itself: {reason}"
                                ),
                                observed_at_ms: None,
                            };
                            self.vm_failed(
                                vm,
                                &host,
                                FailureKind::Crashed,
                                proof,
                                wall_ms,
                                state,
                                &mut out,
                            );
                        }
                    }
                }
            }
            Input::Storage { pool, result } => {
                self.on_storage(&pool, result, now_ms, wall_ms, state, &mut out);
            }
            Input::Inventory {
                host,
                domains,
                health,
                seq,
            } => {
                self.on_inventory(&host, domains, health, seq, wall_ms, state, &mut out);
            }
            Input::DomainEvent {
                host,
                event,
                generation,
                seq,
            } => {
                // An event older than what was already seen of this VM here is history.
                if self.observe(&host, &event.uuid, seq) {
                    if matches!(event.kind, LifecycleKind::Started | LifecycleKind::Resumed) {
                        self.seen_running
                            .insert((host.clone(), event.uuid.clone()), seq);
                    }
                    self.on_domain_event(&host, &event, generation, wall_ms, state, &mut out);
                }
            }
            Input::Definition { host, uuid, xml } => {
                self.on_definition(&host, uuid, xml, wall_ms, state, &mut out);
            }
            Input::StaleDestroyed {
                host,
                uuid,
                found,
                newest,
            } => {
                out.push(Action::Propose(StateCommand::StaleDestroyed {
                    at_ms: wall_ms,
                    uuid,
                    host,
                    found,
                    newest,
                }));
            }
            Input::CommandDone {
                host,
                command,
                result,
                seq,
            } => {
                // An answer about a domain is an observation of it (a start's "running").
                if let (
                    Some(seq),
                    AgentCommand::StartDomain { uuid, .. } | AgentCommand::DestroyDomain { uuid },
                ) = (seq, &command)
                {
                    self.observe(&host, uuid, seq);
                    let started = matches!(command, AgentCommand::StartDomain { .. })
                        && matches!(result, Ok(CommandOutcome::Done { .. }));
                    if started {
                        self.seen_running.insert((host.clone(), uuid.clone()), seq);
                    }
                }
                self.on_command_done(&host, command, result, wall_ms, state, &mut out);
            }
            Input::Quorum { last_ack_ms } => {
                self.quorum_ack_ms = last_ack_ms;
            }
            Input::FenceDone { host, result } => {
                self.fencing.remove(&host);
                let (ok, detail) = match result {
                    Ok(d) => (true, format!("power: {d}")),
                    Err(e) => {
                        self.fence_retry_at
                            .insert(host.clone(), wall_ms + FENCE_RETRY_MS);
                        (false, e)
                    }
                };
                out.push(Action::Propose(StateCommand::FenceResult {
                    at_ms: wall_ms,
                    host,
                    ok,
                    detail,
                }));
            }
            Input::Tick => {
                self.detector.track_sorted(state.hosts.keys());
                self.expire_forced_stops(wall_ms);
                self.mirror_maintenance(state);
                self.reconcile_maintenance(wall_ms, state, &mut out);
                for t in self.detector.tick(now_ms) {
                    self.transition_event(t, wall_ms, &mut out);
                }
                self.reconcile_hosts(now_ms, wall_ms, state, &mut out);
                self.reconcile_storage(now_ms, wall_ms, state, &mut out);
                self.reconcile(wall_ms, state, &mut out);
                if self.leader {
                    out.push(self.leader_record(state, now_ms));
                }
            }
            Input::Applied => {
                self.mirror_maintenance(state);
                self.reconcile(wall_ms, state, &mut out);
            }
            Input::BecameLeader { term, node } => {
                self.leader = true;
                self.term_node = (term, node);
                self.leases.became_leader(now_ms);
                self.slot_requests.clear();
                // A request its predecessor left in the slot of a host that is back (Active)
                // must not kill what that host runs: clear them all (durably, by the storage
                // worker). Hosts still fencing are asked again by this leader.
                for (name, h) in &state.hosts {
                    if h.phase == HostPhase::Active {
                        out.push(Action::ClearFence { host: name.clone() });
                    }
                }
                self.proof_proposed.clear();
                self.power_after.clear();
                self.unfenceable.clear();
                self.conditions.clear();
                // A new leader knows nothing fresh: every host gets the full grace period
                // from now, and agents reconnecting will bring it up to date. A host not heard
                // since the election stays Unknown (not Down) for a full lease, and nothing is
                // fenced before that: an agent that reconnects late (its monitor restarted)
                // must not be condemned for it.
                let cfg = self.detector.config().clone();
                let grace = self.election_grace_ms();
                self.fence_after_ms = now_ms + grace;
                self.detector = FailureDetector::new(cfg, now_ms).with_unknown_grace(grace);
                for name in state.hosts.keys() {
                    self.detector.track(name);
                }
                for name in self.connected.clone() {
                    self.detector.heartbeat(&name, now_ms);
                    // An agent that connected before this monitor led was never registered.
                    if let Some((zone, cluster, agent_version)) = self.hellos.get(&name) {
                        let (zone, cluster) = &claims::pinned_placement(
                            state.hosts.get(&name),
                            zone.clone(),
                            cluster.clone(),
                        );
                        let changed = state.hosts.get(&name).is_none_or(|h| {
                            h.zone != *zone
                                || h.cluster != *cluster
                                || h.agent_version != *agent_version
                        });
                        if changed {
                            out.push(Action::Propose(StateCommand::RegisterHost {
                                at_ms: wall_ms,
                                name: name.clone(),
                                zone: zone.clone(),
                                cluster: cluster.clone(),
                                agent_version: agent_version.clone(),
                            }));
                        }
                        if let Some(cmd) = self.host_info_update(&name, wall_ms, state) {
                            out.push(Action::Propose(cmd));
                        }
                    }
                    // Nor were the HA domains it listed then that the cluster does not know:
                    // unprotected until its next listing (an agent resends every 10 s, and
                    // only when something changed before that).
                    if let Some(inv) = self.inventory.get(&name) {
                        for d in inv.domains.values() {
                            if d.meta.ha == Some(true) && !state.vms.contains_key(&d.uuid) {
                                let running =
                                    matches!(d.state, DomainState::Running | DomainState::Paused);
                                out.push(Action::Propose(vm_seen(wall_ms, &name, d, running)));
                            }
                        }
                    }
                }
                self.proposed_start.clear();
                self.proposed_failure.clear();
                self.dispatched.clear();
                self.announced.clear();
                self.fencing.clear();
                self.fence_retry_at.clear();
                self.held.clear();
                self.released.clear();
                self.tag_warned.clear();
                self.def_warned.clear();
                // What a follower noted was never recorded (its output is dropped).
                self.identity = Default::default();
                out.push(Action::Propose(StateCommand::RecordEvent {
                    at_ms: wall_ms,
                    severity: Severity::Info,
                    host: None,
                    kind: EventKind::LeaderElected { term, node },
                    message: format!("monitor node {node} became leader in term {term}"),
                }));
            }
            Input::LostLeadership => {
                self.leader = false;
                self.leases.lost_leadership();
            }
            Input::OperatorFence { host, by } => {
                if self.fence_refusal(&host, true, now_ms).is_none()
                    && state
                        .hosts
                        .get(&host)
                        .is_some_and(|h| !matches!(h.phase, HostPhase::Fenced { .. }))
                {
                    self.fencing.insert(host.clone());
                    self.fence_retry_at.remove(&host);
                    // A failed attempt is retried like any power fence.
                    self.power_after.insert(host.clone(), now_ms);
                    out.push(Action::Propose(StateCommand::FenceStarted {
                        at_ms: wall_ms,
                        host: host.clone(),
                        reason: format!(
                            "operator {by} asked for it (vigilctl host fence): powering it off through its fence agent now"
                        ),
                    }));
                    out.push(Action::Fence { host });
                }
            }
            Input::ReleaseHold { cluster, by } => {
                let clusters: Vec<String> = self
                    .held
                    .iter()
                    .filter(|c| cluster.as_ref().is_none_or(|w| w == *c))
                    .cloned()
                    .collect();
                for c in clusters {
                    let hosts: Vec<String> = state
                        .hosts
                        .iter()
                        .filter(|(n, h)| {
                            h.cluster == c
                                && self.detector.state(n) == Some(Liveness::Down)
                                && !matches!(h.phase, HostPhase::Fenced { .. })
                        })
                        .map(|(n, _)| n.clone())
                        .collect();
                    self.released.extend(hosts.iter().cloned());
                    self.held.remove(&c);
                    out.push(Action::Propose(StateCommand::RecordEvent {
                        at_ms: wall_ms,
                        severity: Severity::Critical,
                        host: None,
                        kind: EventKind::FencingReleased {
                            cluster: c.clone(),
                            by: by.clone(),
                        },
                        message: format!(
                            "operator {by} released the mass-failure hold of cluster {c} (vigilctl fencing release): {} fenced automatically now",
                            if hosts.is_empty() {
                                "no host is down there any more; nothing is".to_string()
                            } else {
                                format!("{} are", hosts.join(", "))
                            }
                        ),
                    }));
                }
                self.reconcile_hosts(now_ms, wall_ms, state, &mut out);
            }
            Input::HostPlacementRefused { host, detail } => {
                if self.leader {
                    self.placement_refused(&host, detail, wall_ms, &mut out);
                }
            }
        }
        if !self.leader {
            // Only the leader records or acts; followers keep soft state for a fast takeover.
            out.clear();
        }
        out
    }

    #[allow(clippy::too_many_arguments)]
    fn on_inventory(
        &mut self,
        host: &str,
        domains: Vec<DomainInfo>,
        health: HypervisorHealth,
        seq: u64,
        wall_ms: u64,
        state: &ClusterState,
        out: &mut Vec<Action>,
    ) {
        // A listing older than the one held (reports reach us by different paths) is history.
        if self.inventory.get(host).is_some_and(|inv| seq < inv.seq) {
            return;
        }
        for d in &domains {
            // Taken before something newer was seen of this VM here (an event, a start's
            // "running" answer): it must not override that. A listing taken while a start
            // was under way shows the domain defined and shut off; read after the answer,
            // it would look like a crash.
            if !self.observe(host, &d.uuid, seq) {
                continue;
            }
            let running = d.state == DomainState::Running || d.state == DomainState::Paused;
            match state.vms.get(&d.uuid) {
                None => {
                    if d.meta.ha == Some(true) {
                        out.push(Action::Propose(vm_seen(wall_ms, host, d, running)));
                    }
                }
                Some(vm) if !claims::owns(vm, host) => {
                    // Another host's VM (issue 10 item 2): a shut-off copy defined here is
                    // normal and says nothing; running, it is a move only when its own
                    // host lets it go (a live migration), else a conflict.
                    if running
                        && self.foreign_claim(host, vm, d, wall_ms, out) == claims::Claim::Accept
                    {
                        out.push(Action::Propose(vm_seen(wall_ms, host, d, running)));
                    }
                }
                Some(vm) => {
                    let differs = vm.name != d.name
                        || vm.vcpus != d.vcpus
                        || vm.memory_kib != d.memory_kib
                        || vm.disks != d.disks;
                    // A copy running with an older generation is stale (its agent destroys
                    // it): it neither resumes protection nor moves the VM.
                    let current = d.meta.generation.unwrap_or(0) >= vm.generation;
                    let resumed = running
                        && current
                        && matches!(vm.phase, Phase::Stopped { .. } | Phase::GaveUp { .. });
                    let moved = running && current && vm.phase == Phase::Running && vm.host != host;
                    if differs || resumed || moved {
                        out.push(Action::Propose(vm_seen(wall_ms, host, d, running)));
                    }
                    // Backstop for a lost start answer: the target reports it running with
                    // the ordered generation.
                    if let Phase::Recovering { host: target, .. } = &vm.phase {
                        if target == host && running && d.meta.generation == Some(vm.generation) {
                            out.push(Action::Propose(StateCommand::VmStarted {
                                at_ms: wall_ms,
                                uuid: vm.uuid.clone(),
                                host: host.to_string(),
                                generation: vm.generation,
                            }));
                        }
                    }
                    // Backstop for a lost crash event: shut off as crashed, on its host,
                    // with the current generation.
                    // Only "shut off" proves qemu is gone; a crashed-but-preserved domain
                    // (state Crashed) still has its qemu.
                    // Also "shut off for an unknown reason": after a host restart libvirt no
                    // longer knows why; the domain is not running, reported by its own agent.
                    let crashed = d.is_shut_off()
                        && matches!(
                            d.reason,
                            StateReason::Crashed
                                | StateReason::Failed
                                | StateReason::Other
                                | StateReason::NeverStarted
                        );
                    // Backstop for a lost stop event: shut down by its guest or destroyed by
                    // an operator while nobody was listening. Respected, as the event would be.
                    let stopped_on_purpose = d.is_shut_off()
                        && matches!(
                            d.reason,
                            StateReason::GuestShutdown | StateReason::Destroyed
                        );
                    let expected = self.expected_stops.get(&d.uuid).cloned();
                    if stopped_on_purpose
                        && expected.is_none()
                        && vm.phase == Phase::Running
                        && vm.host == host
                        && d.meta.generation.unwrap_or(0) == vm.generation
                    {
                        out.push(Action::Propose(StateCommand::VmStopped {
                            at_ms: wall_ms,
                            uuid: vm.uuid.clone(),
                            host: host.to_string(),
                            reason: if d.reason == StateReason::GuestShutdown {
                                StopReason::GuestShutdown
                            } else {
                                StopReason::OperatorDestroy
                            },
                        }));
                    }
                    let current = vm.ha
                        && vm.phase == Phase::Running
                        && vm.host == host
                        && d.meta.generation.unwrap_or(0) == vm.generation;
                    if let (true, true, Some((kind, why))) = (stopped_on_purpose, current, expected)
                    {
                        let proof = Proof::AgentReportedStopped {
                            host: host.to_string(),
                            detail: format!("inventory: {why}"),
                            observed_at_ms: None,
                        };
                        self.vm_failed(vm, host, kind, proof, wall_ms, state, out);
                    } else if crashed
                        && vm.ha
                        && vm.phase == Phase::Running
                        && vm.host == host
                        && d.meta.generation.unwrap_or(0) == vm.generation
                    {
                        let proof = Proof::AgentReportedStopped {
                            host: host.to_string(),
                            detail: format!("inventory: shut off ({:?})", d.reason).to_lowercase(),
                            observed_at_ms: None,
                        };
                        self.vm_failed(vm, host, FailureKind::Crashed, proof, wall_ms, state, out);
                    }
                }
            }
        }
        self.claims_listed(host, &domains);
        self.inventory.insert(
            host.to_string(),
            HostInventory {
                domains: domains.into_iter().map(|d| (d.uuid.clone(), d)).collect(),
                health,
                seq,
            },
        );
    }

    /// Records an observation of `uuid` on `host` numbered `seq` by its agent. `false`: a
    /// newer one was already seen, so this one must not override it.
    fn observe(&mut self, host: &str, uuid: &str, seq: u64) -> bool {
        let newest = self
            .observed
            .entry((host.to_string(), uuid.to_string()))
            .or_insert(0);
        if seq < *newest {
            return false;
        }
        *newest = seq;
        true
    }

    fn on_domain_event(
        &mut self,
        host: &str,
        event: &DomainEvent,
        generation: Option<u64>,
        wall_ms: u64,
        state: &ClusterState,
        out: &mut Vec<Action>,
    ) {
        let Some(vm) = state.vms.get(&event.uuid) else {
            return;
        };
        if !claims::owns(vm, host)
            && matches!(event.kind, LifecycleKind::Started | LifecycleKind::Resumed)
            && generation.is_some_and(|g| g > vm.generation)
        {
            // No activation has a generation above the committed one (issue 10 item 2).
            self.conflict(
                host,
                vm,
                "reports the start of",
                &format!(
                    "with generation {}, above the committed {}",
                    generation.unwrap_or(0),
                    vm.generation
                ),
                wall_ms,
                out,
            );
            return;
        }
        if !vm.ha || vm.host != host || vm.phase != Phase::Running {
            return;
        }
        if generation.is_some_and(|g| g != vm.generation) {
            // An event about another activation (older, or a stale copy): not this one.
            return;
        }
        match event.kind {
            LifecycleKind::Crashed if event.proves_stopped() => {
                let proof = Proof::AgentReportedStopped {
                    host: host.to_string(),
                    detail: format!(
                        "libvirt lifecycle event {}/{}",
                        event.raw_event, event.raw_detail
                    ),
                    observed_at_ms: Some(event.at_ms),
                };
                self.vm_failed(vm, host, FailureKind::Crashed, proof, wall_ms, state, out);
            }
            LifecycleKind::Destroyed
                if event.proves_stopped() && self.expected_stops.contains_key(&event.uuid) =>
            {
                let (kind, why) = self
                    .expected_stops
                    .get(&event.uuid)
                    .cloned()
                    .unwrap_or((FailureKind::Crashed, String::new()));
                let proof = Proof::AgentReportedStopped {
                    host: host.to_string(),
                    detail: why,
                    observed_at_ms: Some(event.at_ms),
                };
                self.vm_failed(vm, host, kind, proof, wall_ms, state, out);
            }
            LifecycleKind::GuestShutdown | LifecycleKind::Destroyed if event.proves_stopped() => {
                let reason = if event.kind == LifecycleKind::GuestShutdown {
                    StopReason::GuestShutdown
                } else {
                    StopReason::OperatorDestroy
                };
                out.push(Action::Propose(StateCommand::VmStopped {
                    at_ms: wall_ms,
                    uuid: vm.uuid.clone(),
                    host: host.to_string(),
                    reason,
                }));
            }
            _ => {}
        }
    }

    fn on_command_done(
        &mut self,
        host: &str,
        command: AgentCommand,
        result: Result<CommandOutcome, String>,
        wall_ms: u64,
        state: &ClusterState,
        out: &mut Vec<Action>,
    ) {
        if let AgentCommand::ProbeHost { host: target, .. } = &command {
            let reachable = matches!(&result, Ok(CommandOutcome::Done { detail }) if detail.starts_with("reachable"));
            self.evidence.probe_answer(target, host, reachable);
            return;
        }
        if let AgentCommand::DestroyDomain { uuid } = &command {
            // The agent could not destroy it (QEMU stuck in I/O, say): no stop is coming, so
            // none is expected any more; a later stop is read for what it is. Tried again
            // after a while. (No answer at all leaves the expectation, bounded in time.)
            if let Ok(CommandOutcome::Failed { reason }) = &result {
                if self.forced_stop_at.remove(uuid).is_some() {
                    self.expected_stops.remove(uuid);
                    self.destroy_retry_at
                        .insert(uuid.clone(), wall_ms + DESTROY_RETRY_MS);
                    let name = state
                        .vms
                        .get(uuid)
                        .map_or(uuid.as_str(), |v| v.name.as_str());
                    out.push(Action::Propose(StateCommand::RecordEvent {
                        at_ms: wall_ms,
                        severity: Severity::Critical,
                        host: Some(host.to_string()),
                        kind: EventKind::VmStopFailed,
                        message: format!(
                            "could not stop VM {name} on {host} to move it: {reason}; it stays there for now (tried again in {} s)",
                            DESTROY_RETRY_MS / 1000
                        ),
                    }));
                }
            }
            return;
        }
        let AgentCommand::StartDomain {
            uuid, generation, ..
        } = command
        else {
            return;
        };
        let Some(vm) = state.vms.get(&uuid) else {
            return;
        };
        let current = matches!(&vm.phase, Phase::Recovering { host: t, .. } if t == host)
            && vm.generation == generation;
        match result {
            Ok(CommandOutcome::Done { .. }) if current => {
                out.push(Action::Propose(StateCommand::VmStarted {
                    at_ms: wall_ms,
                    uuid,
                    host: host.to_string(),
                    generation,
                }));
            }
            Ok(CommandOutcome::Failed { reason }) if current => {
                let proof = Proof::StartRefused {
                    host: host.to_string(),
                    detail: reason,
                };
                self.vm_failed(
                    vm,
                    host,
                    FailureKind::StartFailed,
                    proof,
                    wall_ms,
                    state,
                    out,
                );
            }
            // No answer: the start may or may not have happened, so this is no proof of
            // anything. Send the same order (same generation: idempotent) again later.
            Err(_) if self.dispatched.get(&uuid) == Some(&generation) => {
                self.dispatched.remove(&uuid);
            }
            _ => {}
        }
    }

    /// A failure with proof: ask the policy what to do and propose it.
    #[allow(clippy::too_many_arguments)]
    fn vm_failed(
        &mut self,
        vm: &VmRecord,
        host: &str,
        failure: FailureKind,
        proof: Proof,
        wall_ms: u64,
        state: &ClusterState,
        out: &mut Vec<Action>,
    ) {
        if self.proposed_failure.get(&vm.uuid) == Some(&vm.generation) {
            return;
        }
        let need = need_of(vm);
        let views = self.views(state).clone();
        // Relocating starts a copy elsewhere: only when this host's own inventory shows the
        // domain shut off (a refused start, say because it still runs, is no such proof).
        let gone_here = self.shut_off_on(host, &vm.uuid);
        let decision = if matches!(failure, FailureKind::StorageLost | FailureKind::Maintenance) {
            // Its host lost the VM's storage, or is being drained: not back there.
            let target = placement::relocation_target(&state.hosts, &views, host, &need);
            recovery::decide_host_failure(vm, wall_ms, &self.policy, target)
        } else {
            recovery::decide(vm, host, wall_ms, &self.policy, || {
                if !gone_here {
                    return None;
                }
                placement::relocation_target(&state.hosts, &views, host, &need)
            })
        };
        self.proposed_failure.insert(vm.uuid.clone(), vm.generation);
        self.expected_stops.remove(&vm.uuid);
        out.push(Action::Propose(StateCommand::VmFailed {
            at_ms: wall_ms,
            uuid: vm.uuid.clone(),
            generation: vm.generation,
            failure,
            proof,
            decision,
            window_ms: self.policy.window_ms,
        }));
    }

    /// A storage cycle: the leader record's health (for lease proofs), storage heartbeats
    /// (for investigation) and fence acknowledgements (proof 4).
    fn on_storage(
        &mut self,
        pool: &str,
        result: Result<StorageCycle, String>,
        now_ms: u64,
        wall_ms: u64,
        state: &ClusterState,
        out: &mut Vec<Action>,
    ) {
        let cycle = match result {
            Ok(c) => c,
            Err(_) => {
                self.leases.record_written(pool, false, now_ms);
                return;
            }
        };
        if self.leader {
            self.leases
                .record_condemning(pool, cycle.leader_written, &cycle.condemned, now_ms);
        }
        for hb in cycle.heartbeats {
            self.evidence.storage_beat(pool, hb, now_ms);
        }
        for ack in cycle.acks {
            let Some(req) = self.slot_requests.get(&ack.host).cloned() else {
                continue;
            };
            let fencing = state
                .hosts
                .get(&ack.host)
                .is_some_and(|h| matches!(h.phase, HostPhase::Fencing { .. }));
            if req.id != ack.id || !fencing || self.proof_proposed.contains(&ack.host) {
                continue;
            }
            if let Err(why) = vigil_common::storage::ack_proves(&req, &ack) {
                if self.acks_refused.insert(req.id) {
                    out.push(Action::Propose(StateCommand::RecordEvent {
                        at_ms: wall_ms,
                        severity: Severity::Critical,
                        host: Some(ack.host.clone()),
                        kind: EventKind::FenceAckRefused,
                        message: format!(
                            "host {}: the acknowledgement of fence request {} on pool {pool} is not proof: {why}; waiting for another proof",
                            ack.host, ack.id
                        ),
                    }));
                }
                continue;
            }
            self.proof_proposed.insert(ack.host.clone());
            out.push(Action::Propose(StateCommand::FenceResult {
                at_ms: wall_ms,
                host: ack.host.clone(),
                ok: true,
                detail: format!(
                    "storage slot: fence request {} acknowledged on pool {pool} by its agent, which destroyed {} HA domain(s)",
                    ack.id,
                    ack.destroyed.len()
                ),
            }));
        }
    }

    /// Work derived from committed state: due restarts, start orders to send, generations to
    /// announce.
    fn reconcile(&mut self, wall_ms: u64, state: &ClusterState, out: &mut Vec<Action>) {
        let mut changed_generations = Vec::new();
        // Highest priority first.
        let mut order: Vec<&VmRecord> = state
            .vms
            .values()
            .filter(|v| {
                !matches!(
                    v.phase,
                    Phase::Running | Phase::Stopped { .. } | Phase::GaveUp { .. }
                )
            })
            .collect();
        order.sort_by_key(|v| std::cmp::Reverse(v.priority));
        for vm in order {
            match &vm.phase {
                Phase::Backoff {
                    host,
                    not_before_ms,
                    relocate,
                } => {
                    let next = vm.generation + 1;
                    let old_fenced = state
                        .hosts
                        .get(&vm.host)
                        .is_some_and(|h| matches!(h.phase, HostPhase::Fenced { .. }));
                    // Re-check at order time: the old copy must still be shut off, or its
                    // host proven powered off.
                    let safe = !*relocate || old_fenced || self.shut_off_on(&vm.host, &vm.uuid);
                    // A relocation whose target is gone (or that had none) is placed again;
                    // so is a restart in place whose host has since been fenced.
                    let target_fenced = state
                        .hosts
                        .get(host)
                        .is_some_and(|h| matches!(h.phase, HostPhase::Fenced { .. }));
                    let relocate = &(*relocate || target_fenced || self.maintenance.contains(host));
                    let need = need_of(vm);
                    let target = if *relocate && !self.host_usable(host) {
                        let (tag, fallback) =
                            (self.failover.ha_tag.clone(), self.failover.ha_tag_fallback);
                        let views = self.views(state);
                        let (t, warning) = placement::failover_target(
                            &state.hosts,
                            views,
                            &vm.host,
                            &need,
                            tag.as_deref(),
                            fallback,
                        );
                        self.warn_tag(vm, warning, wall_ms, out);
                        // Nowhere else, but its own host is back (rejoined after fencing, or
                        // storage healed): it may start there again; the proof check below
                        // still applies.
                        t.or_else(|| {
                            let home_ok = state
                                .hosts
                                .get(&vm.host)
                                .is_some_and(|h| h.phase == HostPhase::Active);
                            (home_ok && self.host_usable(&vm.host)).then(|| vm.host.clone())
                        })
                    } else {
                        Some(host.clone())
                    };
                    // Another host can only start it from the stored definition.
                    let target = match target {
                        Some(t) if t != vm.host && vm.definition.is_none() => {
                            if self.def_warned.insert(vm.uuid.clone()) {
                                out.push(Action::Propose(StateCommand::RecordEvent {
                                    at_ms: wall_ms,
                                    severity: Severity::Critical,
                                    host: Some(vm.host.clone()),
                                    kind: EventKind::NoDefinition,
                                    message: format!(
                                        "cannot start VM {} on {t}: its definition never reached the monitor (its agent ships it within a poll of HA being enabled); queued",
                                        vm.name
                                    ),
                                }));
                            }
                            None
                        }
                        other => other,
                    };
                    if let Some(target) = target {
                        if wall_ms >= *not_before_ms
                            && safe
                            && self.host_usable(&target)
                            && self.proposed_start.get(&vm.uuid) != Some(&next)
                        {
                            self.proposed_start.insert(vm.uuid.clone(), next);
                            self.place(vm, &target, &need, wall_ms, state, out);
                            out.push(Action::Propose(StateCommand::OrderStart {
                                at_ms: wall_ms,
                                uuid: vm.uuid.clone(),
                                host: target,
                                generation: next,
                            }));
                        }
                    }
                }
                Phase::Recovering { host, .. }
                    if self.dispatched.get(&vm.uuid) != Some(&vm.generation)
                        && self.connected.contains(host) =>
                {
                    self.dispatched.insert(vm.uuid.clone(), vm.generation);
                    out.push(Action::Send {
                        host: host.clone(),
                        command: AgentCommand::StartDomain {
                            uuid: vm.uuid.clone(),
                            generation: vm.generation,
                            definition: vm.definition.clone(),
                        },
                    });
                }
                _ => {}
            }
        }
        for vm in state.vms.values() {
            if vm.ha && self.announced.get(&vm.uuid) != Some(&vm.generation) {
                self.announced.insert(vm.uuid.clone(), vm.generation);
                changed_generations.push((vm.uuid.clone(), vm.generation));
            }
        }
        // Forget proposals that committed state has overtaken.
        self.proposed_start
            .retain(|u, g| state.vms.get(u).is_some_and(|v| v.generation < *g));
        self.proposed_failure.retain(|u, g| {
            state.vms.get(u).is_some_and(|v| {
                v.generation == *g && matches!(v.phase, Phase::Running | Phase::Recovering { .. })
            })
        });
        if !changed_generations.is_empty() {
            // Announced to every agent *before* any start of that generation is dispatched
            // (dispatch happens on a later pass), so a host holding an older copy learns it
            // is stale.
            out.insert(
                0,
                Action::Notify {
                    host: None,
                    message: MonitorToAgent::Generations {
                        entries: changed_generations,
                        full: false,
                    },
                },
            );
        }
    }

    /// Host failures: investigate silent hosts, fence the ones that are down and hold HA
    /// VMs (unless a mass failure holds fencing) by every method that can prove something
    /// for their condition, and move the VMs of fenced hosts.
    ///
    /// | condition | power (BMC) | storage slot | lease expiry |
    /// | --- | --- | --- | --- |
    /// | dead | at once | asked (harmless) | proof after lease + margin |
    /// | isolated | only once the lease has run out without proof (or keep-running) | asked at once | proof after lease + margin |
    /// | agent down | after one lease (systemd restarts agents) | asked | never (no agent to fence itself) |
    fn reconcile_hosts(
        &mut self,
        now_ms: u64,
        wall_ms: u64,
        state: &ClusterState,
        out: &mut Vec<Action>,
    ) {
        // Hosts holding protected VMs, computed once (not once per host: this runs every tick).
        let hosts_with_ha: BTreeSet<&str> = state
            .vms
            .values()
            .filter(|v| v.ha && !matches!(v.phase, Phase::Stopped { .. } | Phase::GaveUp { .. }))
            .map(|v| v.host.as_str())
            .collect();
        for (name, h) in &state.hosts {
            if self.incompatible_alive(name, now_ms) {
                // It spoke to us: alive, whatever its silence on the agent protocol says.
                continue;
            }
            let live = self.detector.state(name);
            let down = live == Some(Liveness::Down);
            let silent = down || live == Some(Liveness::Suspect);
            // The common case, on every tick for nearly every host: heard, active, and known
            // alive (or never recorded otherwise). Nothing below would change or propose
            // anything for it (its condition is Alive, and only Active hosts that are down
            // are fenced), so it costs no more lookups (BENCHMARKS.md, "Heartbeat load").
            if !silent
                && h.phase == HostPhase::Active
                && self
                    .conditions
                    .get(name.as_str())
                    .is_none_or(|c| *c == Condition::Alive)
            {
                continue;
            }
            if silent {
                self.probe(name, &h.cluster, now_ms, state, out);
            }
            let pools = if h.pools.is_empty() {
                self.host_pools.get(name).cloned().unwrap_or_default()
            } else {
                h.pools.clone()
            };
            let has_pools = !pools.is_empty();
            let condition = self
                .evidence
                .condition(name, silent, down, has_pools, now_ms);
            self.record_condition(name, &condition, wall_ms, out);
            let has_ha = hosts_with_ha.contains(name.as_str());
            // Through the slot only with the host's agent instance known (never instance 0: a
            // request for "any" agent would also kill the guests of one that rejoined).
            let slot = self.failover.storage_slot
                && !pools.is_empty()
                && self.instances.get(name).is_some_and(|i| *i != 0);
            let power = self.failover.fence_hosts.contains(name);
            match &h.phase {
                // No fencing of any kind in the first full lease after the election.
                HostPhase::Active if down && has_ha && now_ms >= self.fence_after_ms => {
                    let (lease_usable, power_at) = match &condition {
                        // Whether peers confirmed it unreachable or not: a dead agent on a
                        // live host is reset by its watchdog, which `usable` requires.
                        Condition::Dead { .. } => (true, now_ms),
                        Condition::Isolated { .. } => {
                            let lease_ok = self.leases.usable(name, &pools).is_ok();
                            let at = if lease_ok || slot {
                                self.leases.expires_at(name).unwrap_or(now_ms)
                            } else {
                                now_ms
                            };
                            (true, at)
                        }
                        Condition::AgentDown { .. } => {
                            // Give the agent one lease to come back before fencing at all.
                            if self.leases.expires_at(name).is_some_and(|t| now_ms < t) {
                                continue;
                            }
                            // The agent is dead: only its host watchdog can back a lease.
                            (true, now_ms)
                        }
                        Condition::Alive | Condition::Investigating => continue,
                    };
                    let lease_possible = lease_usable && self.leases.usable(name, &pools).is_ok();
                    if !power && !slot && !lease_possible {
                        if self.unfenceable.insert(name.clone()) {
                            out.push(Action::Propose(StateCommand::RecordEvent {
                                at_ms: wall_ms,
                                severity: Severity::Critical,
                                host: Some(name.clone()),
                                kind: EventKind::HostUnfenceable,
                                message: format!(
                                    "host {name} is {} ({}) and holds HA VMs, but nothing can prove it fenced: no fence agent configured, no storage slot, and lease expiry proves nothing here ({}). Its HA VMs wait; fence it by hand",
                                    condition.name(),
                                    condition_evidence(&condition),
                                    self.leases.usable(name, &pools).err().unwrap_or_default()
                                ),
                            }));
                        }
                        continue;
                    }
                    if let Some(why) = self.mass_failure(name, state, now_ms) {
                        if self.held.insert(h.cluster.clone()) {
                            out.push(Action::Propose(StateCommand::RecordEvent {
                                at_ms: wall_ms,
                                severity: Severity::Critical,
                                host: Some(name.clone()),
                                kind: EventKind::FencingHeld,
                                message: why,
                            }));
                        }
                        continue;
                    }
                    let mut methods = Vec::new();
                    if power {
                        methods.push(if power_at <= now_ms {
                            "power (now)"
                        } else {
                            "power (if no other proof before the lease ends)"
                        });
                    }
                    if slot {
                        methods.push("storage slot");
                    }
                    if lease_possible {
                        methods.push("lease expiry");
                    }
                    out.push(Action::Propose(StateCommand::FenceStarted {
                        at_ms: wall_ms,
                        host: name.clone(),
                        reason: format!(
                            "{} ({}), holds HA VMs; proof by {}{}",
                            condition.name(),
                            condition_evidence(&condition),
                            methods.join(", "),
                            match self.leases.usable(name, &pools) {
                                Err(why) if lease_usable => {
                                    format!(" (not lease expiry: {why})")
                                }
                                _ => String::new(),
                            }
                        ),
                    }));
                    if power {
                        self.power_after.insert(name.clone(), power_at);
                    }
                    if slot {
                        self.request_fence(name, &condition, wall_ms, state, out);
                    }
                    if power && power_at <= now_ms && self.fencing.insert(name.clone()) {
                        out.push(Action::Fence { host: name.clone() });
                    }
                }
                HostPhase::Fencing { .. } => {
                    if !down || now_ms < self.fence_after_ms {
                        continue;
                    }
                    if slot && !self.slot_requests.contains_key(name) {
                        // A new leader asks again (its predecessor's request may be gone).
                        self.request_fence(name, &condition, wall_ms, state, out);
                    }
                    // Lease expiry is proof only where the host watchdog backs it: then a
                    // dead or hung agent cannot keep the guests past lease + W either.
                    let lease_usable = self.leases.usable(name, &pools).is_ok();
                    if lease_usable && !self.proof_proposed.contains(name) {
                        if let Ok(detail) = self.leases.proof(name, &pools, now_ms) {
                            self.proof_proposed.insert(name.clone());
                            out.push(Action::Propose(StateCommand::FenceResult {
                                at_ms: wall_ms,
                                host: name.clone(),
                                ok: true,
                                detail,
                            }));
                            continue;
                        }
                    }
                    if !power {
                        continue;
                    }
                    let power_at = *self.power_after.entry(name.clone()).or_insert(now_ms);
                    let due = now_ms >= power_at
                        && self.fence_retry_at.get(name).is_none_or(|t| wall_ms >= *t);
                    if due && !self.fencing.contains(name) {
                        self.fencing.insert(name.clone());
                        self.fence_retry_at.remove(name);
                        out.push(Action::Propose(StateCommand::FenceStarted {
                            at_ms: wall_ms,
                            host: name.clone(),
                            reason: "power fencing (no other proof yet, or retrying after a failed attempt)".into(),
                        }));
                        out.push(Action::Fence { host: name.clone() });
                    }
                }
                HostPhase::Fenced { proof, .. } => {
                    let vms: Vec<&VmRecord> = state
                        .vms
                        .values()
                        .filter(|v| v.ha && v.host == *name)
                        .filter(|v| matches!(v.phase, Phase::Running | Phase::Recovering { .. }))
                        .collect();
                    for vm in vms {
                        if self.proposed_failure.get(&vm.uuid) == Some(&vm.generation) {
                            continue;
                        }
                        let need = need_of(vm);
                        let (tag, fallback) =
                            (self.failover.ha_tag.clone(), self.failover.ha_tag_fallback);
                        let views = self.views(state);
                        let (target, warning) = placement::failover_target(
                            &state.hosts,
                            views,
                            name,
                            &need,
                            tag.as_deref(),
                            fallback,
                        );
                        self.warn_tag(vm, warning, wall_ms, out);
                        if let Some(t) = &target {
                            // Reserved now: the next VM of this host must see it taken.
                            if let Some(v) = self.views(state).get_mut(t) {
                                v.reserve(&need);
                            }
                        }
                        let decision =
                            recovery::decide_host_failure(vm, wall_ms, &self.policy, target);
                        self.proposed_failure.insert(vm.uuid.clone(), vm.generation);
                        out.push(Action::Propose(StateCommand::VmFailed {
                            at_ms: wall_ms,
                            uuid: vm.uuid.clone(),
                            generation: vm.generation,
                            failure: FailureKind::HostFailed,
                            proof: Proof::HostFenced {
                                host: name.clone(),
                                detail: proof.clone(),
                            },
                            decision,
                            window_ms: self.policy.window_ms,
                        }));
                    }
                }
                _ => {}
            }
        }
        // A cluster whose hosts are back below the threshold may be fenced again.
        let still_held: BTreeSet<String> =
            self.held
                .iter()
                .filter(|c| {
                    state.hosts.iter().any(|(n, h)| {
                        &h.cluster == *c && self.mass_failure(n, state, now_ms).is_some()
                    })
                })
                .cloned()
                .collect();
        self.held = still_held;
        // A released host that is heard again starts afresh.
        let released: BTreeSet<String> = self
            .released
            .iter()
            .filter(|n| self.detector.state(n) == Some(Liveness::Down))
            .cloned()
            .collect();
        self.released = released;
    }

    /// Primary-storage outages. A pool down on *every* connected host that mounts it is a
    /// pool-wide outage: nobody is fenced or moved for it (moving cannot help; fencing a
    /// host for a storage hiccup is what made CloudStack users turn its NFS heartbeat off);
    /// its VMs wait, and those it stopped restart as soon as it is back (placement skips
    /// hosts with a pool down). A pool down on *some* hosts only: the HA VMs running there
    /// are destroyed through their agent (which proves them stopped) and start elsewhere.
    fn reconcile_storage(
        &mut self,
        now_ms: u64,
        wall_ms: u64,
        state: &ClusterState,
        out: &mut Vec<Action>,
    ) {
        let mut by_pool: BTreeMap<&str, (Vec<&str>, Vec<&str>)> = BTreeMap::new();
        for ((host, pool), st) in &self.pool_status {
            if !self.connected.contains(host) {
                continue;
            }
            let e = by_pool.entry(pool.as_str()).or_default();
            if st.ok {
                e.0.push(host.as_str());
            } else {
                e.1.push(host.as_str());
            }
        }
        let mut outages = BTreeMap::new();
        for (pool, (up, down)) in by_pool {
            if down.is_empty() {
                continue;
            }
            let (scope, message) = if up.is_empty() {
                (
                    format!("pool-wide:{}", down.join(",")),
                    format!(
                        "storage pool {pool} is down on every host that mounts it ({}): a pool-wide outage. No host is fenced for it; its HA VMs wait and restart when it is back",
                        down.join(", ")
                    ),
                )
            } else {
                (
                    format!("hosts:{}", down.join(",")),
                    format!(
                        "storage pool {pool} is down on {} only (up on {}): their HA VMs move to hosts that reach it if it stays down for {} s",
                        down.join(", "),
                        up.join(", "),
                        STORAGE_FAULT_GRACE_MS / 1000
                    ),
                )
            };
            if self.outages.get(pool) != Some(&scope) {
                out.push(Action::Propose(StateCommand::RecordEvent {
                    at_ms: wall_ms,
                    severity: Severity::Critical,
                    host: None,
                    kind: EventKind::StorageOutage {
                        pool: pool.to_string(),
                        pool_wide: up.is_empty(),
                    },
                    message,
                }));
            }
            let since = match self.scope_since.get(pool) {
                Some((s, t)) if *s == scope => *t,
                _ => now_ms,
            };
            self.scope_since
                .insert(pool.to_string(), (scope.clone(), since));
            outages.insert(pool.to_string(), scope);
            if up.is_empty() || now_ms.saturating_sub(since) < STORAGE_FAULT_GRACE_MS {
                continue;
            }
            let lasting: Vec<&str> = down
                .iter()
                .copied()
                .filter(|h| {
                    self.pool_down_since
                        .get(&(h.to_string(), pool.to_string()))
                        .is_some_and(|t| now_ms.saturating_sub(*t) >= STORAGE_FAULT_GRACE_MS)
                })
                .collect();
            for vm in state.vms.values() {
                // Only VMs with a disk on the failed pool: the others' storage is fine.
                if vm.ha
                    && vm.phase == Phase::Running
                    && lasting.contains(&vm.host.as_str())
                    && !self.expected_stops.contains_key(&vm.uuid)
                    && self.uses_pool(&vm.host, &vm.uuid, pool)
                    && !self.destroy_retry_at.contains_key(&vm.uuid)
                {
                    self.expected_stops
                        .insert(vm.uuid.clone(), forced_stop(FailureKind::StorageLost));
                    self.forced_stop_at.insert(vm.uuid.clone(), wall_ms);
                    out.push(Action::Send {
                        host: vm.host.clone(),
                        command: AgentCommand::DestroyDomain {
                            uuid: vm.uuid.clone(),
                        },
                    });
                }
            }
        }
        self.scope_since.retain(|p, _| outages.contains_key(p));
        self.outages = outages;
    }

    /// A host is back: a fence request left in its slot must not kill what it runs next.
    /// The leader record's content: the hosts being fenced that are still silent. Only
    /// those may fence themselves on lease expiry; a host that merely misses its grants (a
    /// version mismatch, an expired certificate, the monitors' own network) is never named.
    fn leader_record(&self, state: &ClusterState, now_ms: u64) -> Action {
        let condemned = state
            .hosts
            .iter()
            .filter(|(_, h)| matches!(h.phase, HostPhase::Fencing { .. }))
            .filter(|(n, _)| self.detector.state(n) == Some(Liveness::Down))
            .filter(|(n, _)| !self.incompatible_alive(n, now_ms))
            .map(|(n, _)| n.clone())
            .collect();
        Action::LeaderRecord {
            condemned,
            hold: !self.held.is_empty(),
        }
    }

    /// The host's agent tried to connect with an incompatible protocol recently.
    fn incompatible_alive(&self, host: &str, now_ms: u64) -> bool {
        self.incompatible
            .get(host)
            .is_some_and(|t| now_ms.saturating_sub(*t) < INCOMPATIBLE_ALIVE_MS)
    }

    fn end_fencing_episode(&mut self, host: &str, out: &mut Vec<Action>) {
        if let Some(req) = self.slot_requests.remove(host) {
            // Void at once, even before the clear reaches storage: the agent may read its
            // slot before the file is gone.
            out.push(Action::Notify {
                host: Some(host.to_string()),
                message: MonitorToAgent::FenceWithdrawn { id: req.id },
            });
        }
        out.push(Action::ClearFence {
            host: host.to_string(),
        });
    }

    /// Forgets this leader's bookkeeping of a host's fencing (it is back).
    fn forget_fencing(&mut self, host: &str) {
        self.proof_proposed.remove(host);
        self.power_after.remove(host);
        self.unfenceable.remove(host);
    }

    /// The host's pools and address, as its agent's connection showed them, when the
    /// replicated record differs: replicated so that a new leader knows which hosts have
    /// storage (and so which proofs can exist) and where peers can check them, before their
    /// agents reconnect.
    fn host_info_update(
        &self,
        host: &str,
        wall_ms: u64,
        state: &ClusterState,
    ) -> Option<StateCommand> {
        let pools = self.host_pools.get(host).cloned().unwrap_or_default();
        let addr = self.evidence.addr_of(host);
        state
            .hosts
            .get(host)
            .is_none_or(|h| h.pools != pools || (addr.is_some() && h.addr != addr))
            .then(|| StateCommand::SetHostInfo {
                at_ms: wall_ms,
                host: host.to_string(),
                pools,
                addr,
            })
    }

    /// Asks up to three live peers of the same cluster whether `host`'s kernel answers.
    fn probe(
        &mut self,
        host: &str,
        cluster: &str,
        now_ms: u64,
        state: &ClusterState,
        out: &mut Vec<Action>,
    ) {
        // Learned from its connection; a new leader that has not seen it connect yet uses
        // the replicated address.
        let Some(ip) = self
            .evidence
            .addr_of(host)
            .or_else(|| state.hosts.get(host).and_then(|h| h.addr))
        else {
            return;
        };
        self.evidence.address(host, ip);
        // This runs on every tick for every silent host: a probe under way asks nobody new,
        // and a new one asks the first PROBE_PEERS usable peers, so neither lists them all
        // (a pass over every host per silent host per tick saturated the monitor when
        // thousands of hosts were silent; BENCHMARKS.md, "Heartbeat load").
        if self.evidence.probing(host) {
            return;
        }
        let peers: Vec<String> = state
            .hosts
            .iter()
            .filter(|(n, h)| *n != host && h.cluster == cluster && self.host_usable(n))
            .map(|(n, _)| n.clone())
            .take(investigation::PROBE_PEERS)
            .collect();
        for peer in self.evidence.start_probe(host, peers, now_ms) {
            out.push(Action::Send {
                host: peer,
                command: AgentCommand::ProbeHost {
                    host: host.to_string(),
                    addr: SocketAddr::new(ip, self.failover.probe_port),
                    timeout_ms: investigation::PROBE_TIMEOUT_MS,
                },
            });
        }
    }

    /// Records a change of a host's condition (a replicated event).
    fn record_condition(
        &mut self,
        host: &str,
        condition: &Condition,
        wall_ms: u64,
        out: &mut Vec<Action>,
    ) {
        let before = self.conditions.get(host).map(Condition::name);
        if before == Some(condition.name()) || (before.is_none() && *condition == Condition::Alive)
        {
            return;
        }
        self.conditions.insert(host.to_string(), condition.clone());
        let (severity, message) = match condition {
            Condition::Alive => (Severity::Info, format!("host {host}: alive again")),
            Condition::Investigating => (
                Severity::Warning,
                format!("host {host}: silent; investigating (storage heartbeat, peers)"),
            ),
            other => (
                Severity::Critical,
                format!(
                    "host {host}: {}: {}",
                    other.name(),
                    condition_evidence(other)
                ),
            ),
        };
        out.push(Action::Propose(StateCommand::RecordEvent {
            at_ms: wall_ms,
            severity,
            host: Some(host.to_string()),
            kind: EventKind::HostCondition {
                condition: condition.name().to_string(),
            },
            message,
        }));
    }

    /// Writes a fence request into `host`'s storage slot.
    fn request_fence(
        &mut self,
        host: &str,
        condition: &Condition,
        wall_ms: u64,
        state: &ClusterState,
        out: &mut Vec<Action>,
    ) {
        let Some(instance) = self.instances.get(host).copied().filter(|i| *i != 0) else {
            return;
        };
        let last = self.slot_requests.values().map(|r| r.id).max().unwrap_or(0);
        // Every VM the leader holds as HA on the host: the agent treats them as HA even if
        // it never heard the flag, and must show each one not running.
        let vms = state
            .vms
            .values()
            .filter(|v| v.ha && v.host == host)
            .map(|v| v.uuid.clone())
            .collect();
        let req = FenceRequest {
            id: wall_ms.max(last + 1),
            host: host.to_string(),
            instance,
            vms,
            term: self.term_node.0,
            node: self.term_node.1,
            wall_ms,
            reason: format!(
                "{} to the monitors ({})",
                condition.name(),
                condition_evidence(condition)
            ),
        };
        self.slot_requests.insert(host.to_string(), req.clone());
        out.push(Action::RequestFence(req));
    }

    /// `Some(explanation)` when too many hosts of `host`'s cluster (a Down host) are down at
    /// once. "At once": only hosts that went silent within `mass_failure_window_ms` of `host`
    /// count, and only those not proven off yet (a host fenced a minute ago plus one more now
    /// are two single failures), and none an operator released from the hold.
    fn mass_failure(&self, host: &str, state: &ClusterState, now_ms: u64) -> Option<String> {
        if self.released.contains(host) || self.detector.state(host) != Some(Liveness::Down) {
            return None;
        }
        let cluster = &state.hosts.get(host)?.cluster;
        // When a host went silent (monotonic ms); one not heard since this monitor's detector
        // started went silent at its start, like every other such host.
        let silent_since = |n: &str| -> u64 {
            self.detector
                .view(n, now_ms)
                .and_then(|v| v.silent_ms)
                .map_or(0, |s| now_ms.saturating_sub(s))
        };
        let own = silent_since(host);
        let window = self.failover.mass_failure_window_ms;
        let members: Vec<(&String, &crate::state::HostRecord)> = state
            .hosts
            .iter()
            .filter(|(_, h)| &h.cluster == cluster)
            .collect();
        let counted: Vec<&str> = members
            .iter()
            .filter(|(n, h)| {
                self.detector.state(n) == Some(Liveness::Down)
                    && !matches!(h.phase, HostPhase::Fenced { .. })
                    && !self.released.contains(*n)
                    && silent_since(n).abs_diff(own) <= window
            })
            .map(|(n, _)| n.as_str())
            .collect();
        let down = counted.len();
        let total = members.len();
        let pct = self.failover.mass_failure_percent.max(1) as usize;
        (down >= 2 && down * 100 > total * pct).then(|| {
            format!(
                "mass failure in cluster {cluster}: {down} of {total} hosts went down within {} s of each other and are not proven off ({}; more than {pct} %); automatic fencing is held — more likely a network fault on the monitors' side. Check each host, then: `vigilctl host fence H` runs H's fence agent now; `vigilctl host confirm-off H` records that you made sure H is off (its HA VMs start elsewhere); `vigilctl fencing release` fences them all automatically",
                window / 1000,
                counted.join(", ")
            )
        })
    }

    /// Clusters whose automatic fencing is held now (a mass failure).
    pub fn held_clusters(&self) -> Vec<String> {
        self.held.iter().cloned().collect()
    }

    /// Why `vigilctl host fence H` must not run now (`None`: it may). Without `force`, a host
    /// that is up is refused: powering it off stops its running guests.
    pub fn fence_refusal(&self, host: &str, force: bool, now_ms: u64) -> Option<String> {
        if !self.failover.fence_hosts.contains(host) {
            return Some(format!(
                "no fence agent is configured for {host} (add a [[fencing.hosts]] entry); if you made sure it is off, use `vigilctl host confirm-off {host}`"
            ));
        }
        if self.fencing.contains(host) {
            return Some(format!("a fence of {host} is already running"));
        }
        if !force {
            if let Some(why) = self.heard_recently(host, now_ms) {
                return Some(format!(
                    "{host} is not down ({why}): fencing it powers off its running guests; add --force if that is what you want"
                ));
            }
        }
        None
    }

    /// Why an operator may not confirm `host` powered off now (`None`: they may). A host this
    /// monitor hears is not off, whatever anyone says: its guests would run twice.
    pub fn confirm_off_refusal(&self, host: &str, now_ms: u64) -> Option<String> {
        self.heard_recently(host, now_ms).map(|why| {
            format!("{host} is not down ({why}); confirm-off is for a host you made sure is powered off")
        })
    }

    /// `Some(what)` when `host` is connected or not (yet) silent for long.
    fn heard_recently(&self, host: &str, now_ms: u64) -> Option<String> {
        if self.connected.contains(host) {
            return Some("its agent is still connected".into());
        }
        match self.detector.view(host, now_ms) {
            Some(v) if matches!(v.state, Liveness::Up | Liveness::Suspect) => Some(format!(
                "last heartbeat {} ms ago",
                v.silent_ms.unwrap_or_default()
            )),
            _ => None,
        }
    }

    fn warn_tag(
        &mut self,
        vm: &VmRecord,
        warning: Option<String>,
        wall_ms: u64,
        out: &mut Vec<Action>,
    ) {
        match warning {
            Some(w) if self.tag_warned.insert(vm.uuid.clone()) => {
                out.push(Action::Propose(StateCommand::RecordEvent {
                    at_ms: wall_ms,
                    severity: Severity::Critical,
                    host: None,
                    kind: EventKind::NoTaggedHost,
                    message: format!("VM {}: {w}", vm.name),
                }));
            }
            Some(_) => {}
            None => {
                self.tag_warned.remove(&vm.uuid);
            }
        }
    }

    /// Whether `host`'s latest inventory, from a healthy hypervisor, shows `uuid` shut off
    /// or not defined at all.
    fn shut_off_on(&self, host: &str, uuid: &str) -> bool {
        self.inventory.get(host).is_some_and(|inv| {
            inv.health == HypervisorHealth::Healthy
                && inv.domains.get(uuid).is_none_or(DomainInfo::is_shut_off)
                // Not if it was seen running there after the listing was taken.
                && self
                    .seen_running
                    .get(&(host.to_string(), uuid.to_string()))
                    .is_none_or(|s| *s <= inv.seq)
        })
    }

    /// Whether `uuid`'s disks on `host` are on `pool`, as its agent reported; a domain whose
    /// agent could not tell (or not yet listed) counts as on every pool.
    fn uses_pool(&self, host: &str, uuid: &str, pool: &str) -> bool {
        self.inventory
            .get(host)
            .and_then(|inv| inv.domains.get(uuid))
            .and_then(|d| d.pools.as_ref())
            .is_none_or(|pools| pools.iter().any(|p| p == pool))
    }

    /// Forgets forced stops that were consumed, and those whose destroy never showed within
    /// [`EXPECTED_STOP_TTL_MS`].
    fn expire_forced_stops(&mut self, wall_ms: u64) {
        let expected = &mut self.expected_stops;
        self.forced_stop_at.retain(|uuid, at| {
            let keep =
                expected.contains_key(uuid) && wall_ms.saturating_sub(*at) < EXPECTED_STOP_TTL_MS;
            if !keep {
                expected.remove(uuid);
            }
            keep
        });
        self.destroy_retry_at.retain(|_, t| wall_ms < *t);
    }

    /// Whether `host` can take a VM now: connected, up, a healthy hypervisor, and every
    /// storage pool it mounts up there (nothing is placed on a pool that is down).
    fn host_usable(&self, host: &str) -> bool {
        !self.maintenance.contains(host)
            && !self.not_active.contains(host)
            && self
                .pool_status
                .range((host.to_string(), String::new())..)
                .take_while(|((h, _), _)| h == host)
                .all(|(_, p)| p.ok)
            && self.connected.contains(host)
            && self.detector.state(host) == Some(Liveness::Up)
            && self
                .inventory
                .get(host)
                .is_none_or(|i| i.health == HypervisorHealth::Healthy)
    }

    /// Host views for placement, built once per input (`views` is reset by `handle`), so
    /// that reservations made while placing several VMs are seen by the next one.
    fn views(&mut self, state: &ClusterState) -> &mut BTreeMap<String, HostView> {
        if self.views.is_none() {
            self.views = Some(self.host_views(state));
        }
        self.views.get_or_insert_with(BTreeMap::new)
    }

    /// What each host can take now: its reported free memory and vCPUs, minus the starts
    /// ordered there that its agent does not report running yet (their memory is not in its
    /// facts yet), and the anti-affinity groups running or starting there.
    fn host_views(&self, state: &ClusterState) -> BTreeMap<String, HostView> {
        let mut views: BTreeMap<String, HostView> = state
            .hosts
            .keys()
            .map(|h| {
                let facts = self.facts.get(h);
                let running_vcpus: u64 = self
                    .inventory
                    .get(h)
                    .map(|inv| {
                        inv.domains
                            .values()
                            .filter(|d| !d.is_shut_off())
                            .map(|d| u64::from(d.vcpus))
                            .sum()
                    })
                    .unwrap_or(0);
                let cpus = facts.map(|f| u64::from(f.cpus)).unwrap_or(0);
                let vcpus_available = if self.failover.vcpu_overcommit == 0 || cpus == 0 {
                    u64::MAX
                } else {
                    (cpus * u64::from(self.failover.vcpu_overcommit)).saturating_sub(running_vcpus)
                };
                (
                    h.clone(),
                    HostView {
                        usable: self.host_usable(h),
                        memory_available_bytes: facts
                            .map(|f| f.memory_available_bytes)
                            .unwrap_or(0),
                        vcpus_available,
                        groups: Default::default(),
                    },
                )
            })
            .collect();
        for vm in state.vms.values() {
            match &vm.phase {
                Phase::Running => {
                    if let (Some(v), Some(g)) = (views.get_mut(&vm.host), &vm.anti_affinity) {
                        v.groups.insert(g.clone());
                    }
                }
                Phase::Recovering { host, .. } => {
                    let started = self
                        .inventory
                        .get(host)
                        .and_then(|inv| inv.domains.get(&vm.uuid))
                        .is_some_and(|d| !d.is_shut_off());
                    if let Some(v) = views.get_mut(host) {
                        if started {
                            if let Some(g) = &vm.anti_affinity {
                                v.groups.insert(g.clone());
                            }
                        } else {
                            v.reserve(&need_of(vm));
                        }
                    }
                }
                _ => {}
            }
        }
        views
    }

    /// Records a start placed on `target`: reserves its capacity for the rest of this pass,
    /// and says so when anti-affinity could not be honoured.
    fn place(
        &mut self,
        vm: &VmRecord,
        target: &str,
        need: &Need,
        wall_ms: u64,
        state: &ClusterState,
        out: &mut Vec<Action>,
    ) {
        let views = self.views(state);
        let shared = need.group.is_some() && placement::shares_group(views, target, need);
        if let Some(v) = views.get_mut(target) {
            v.reserve(need);
        }
        if shared {
            out.push(Action::Propose(StateCommand::RecordEvent {
                at_ms: wall_ms,
                severity: Severity::Warning,
                host: Some(target.to_string()),
                kind: EventKind::AntiAffinityBroken,
                message: format!(
                    "VM {} starts on {target} next to another member of anti-affinity group {}: no other host with room",
                    vm.name,
                    need.group.unwrap_or_default()
                ),
            }));
        }
    }

    fn mirror_maintenance(&mut self, state: &ClusterState) {
        self.maintenance = state
            .hosts
            .iter()
            .filter(|(_, h)| h.maintenance)
            .map(|(n, _)| n.clone())
            .collect();
        self.not_active = state
            .hosts
            .iter()
            .filter(|(_, h)| h.phase != HostPhase::Active)
            .map(|(n, _)| n.clone())
            .collect();
        self.rejoining.retain(|h| self.not_active.contains(h));
        self.views = None;
    }

    /// Drains hosts in maintenance: each HA VM running there is destroyed through its agent
    /// (which proves it stopped) and started on another host. A cold move: live migration is
    /// not built yet (docs/architecture.md).
    fn reconcile_maintenance(&mut self, wall_ms: u64, state: &ClusterState, out: &mut Vec<Action>) {
        if self.maintenance.is_empty() {
            return;
        }
        for vm in state.vms.values() {
            if !(vm.ha && vm.phase == Phase::Running && self.maintenance.contains(&vm.host)) {
                continue;
            }
            if self.expected_stops.contains_key(&vm.uuid)
                || self.destroy_retry_at.contains_key(&vm.uuid)
                || !self.connected.contains(&vm.host)
            {
                continue;
            }
            // Only when it has somewhere to go: a drain must not leave a VM down.
            let need = need_of(vm);
            let views = self.views(state);
            if placement::relocation_target(&state.hosts, views, &vm.host, &need).is_none() {
                continue;
            }
            self.expected_stops
                .insert(vm.uuid.clone(), forced_stop(FailureKind::Maintenance));
            self.forced_stop_at.insert(vm.uuid.clone(), wall_ms);
            out.push(Action::Propose(StateCommand::RecordEvent {
                at_ms: wall_ms,
                severity: Severity::Info,
                host: Some(vm.host.clone()),
                kind: EventKind::VmDraining,
                message: format!(
                    "moving VM {} off {} (maintenance): stopping it there, then starting it elsewhere",
                    vm.name, vm.host
                ),
            }));
            out.push(Action::Send {
                host: vm.host.clone(),
                command: AgentCommand::DestroyDomain {
                    uuid: vm.uuid.clone(),
                },
            });
        }
    }

    fn transition_event(&self, t: Transition, wall_ms: u64, out: &mut Vec<Action>) {
        let (severity, message) = match t.to {
            Liveness::Up => (
                Severity::Info,
                format!("host {} is up (was {})", t.host, t.from),
            ),
            Liveness::Suspect => (
                Severity::Warning,
                format!(
                    "host {} is suspect: no heartbeat for {} ms",
                    t.host, t.silent_ms
                ),
            ),
            Liveness::Down => (
                Severity::Critical,
                format!(
                    "host {} is down: no heartbeat for {} ms",
                    t.host, t.silent_ms
                ),
            ),
            Liveness::Unknown => return,
        };
        out.push(Action::Propose(StateCommand::RecordEvent {
            at_ms: wall_ms,
            severity,
            host: Some(t.host.clone()),
            kind: EventKind::HostLiveness {
                from: t.from.to_string(),
                to: t.to.to_string(),
            },
            message,
        }));
    }

    pub fn liveness(&self, host: &str, now_ms: u64) -> Option<LivenessView> {
        self.detector.view(host, now_ms)
    }

    pub fn facts(&self, host: &str) -> Option<&HostFacts> {
        self.facts.get(host)
    }

    pub fn is_connected(&self, host: &str) -> bool {
        self.connected.contains(host)
    }

    /// Every domain reported by every connected agent, by host.
    pub fn domains(&self) -> impl Iterator<Item = (&str, &DomainInfo)> {
        self.inventory
            .iter()
            .flat_map(|(h, inv)| inv.domains.values().map(move |d| (h.as_str(), d)))
    }

    /// Every copy, on connected hosts, of the first `take` distinct uuids after `after`, in
    /// uuid order. A merge of each host's listing (already sorted by uuid), so one page of
    /// `vm list` costs O((take + hosts) · log hosts) instead of a walk over every domain of
    /// the cluster (43 s for 100,000 VMs, and a page over vigilctl's 3 s on a loaded machine).
    pub fn connected_domains_after(
        &self,
        after: Option<&str>,
        take: usize,
    ) -> Vec<(String, DomainInfo)> {
        use std::cmp::Reverse;
        use std::collections::BinaryHeap;
        use std::ops::Bound;
        let lower = after.map_or(Bound::Unbounded, Bound::Excluded);
        let mut listings: Vec<(
            &str,
            std::collections::btree_map::Range<'_, String, DomainInfo>,
        )> = self
            .inventory
            .iter()
            .filter(|(h, _)| self.connected.contains(h.as_str()))
            .map(|(h, inv)| {
                (
                    h.as_str(),
                    inv.domains.range::<str, _>((lower, Bound::Unbounded)),
                )
            })
            .collect();
        // Each listing's next domain; the heap orders them by (uuid, listing).
        let mut current: Vec<Option<&DomainInfo>> = Vec::with_capacity(listings.len());
        let mut heads = BinaryHeap::new();
        for (i, (_, it)) in listings.iter_mut().enumerate() {
            let d = it.next().map(|(_, d)| d);
            if let Some(d) = d {
                heads.push(Reverse((d.uuid.as_str(), i)));
            }
            current.push(d);
        }
        let mut out = Vec::new();
        let mut distinct = 0usize;
        let mut last: Option<&str> = None;
        while let Some(Reverse((uuid, i))) = heads.pop() {
            let Some(d) = current[i] else { continue };
            if last != Some(uuid) {
                distinct += 1;
                if distinct > take {
                    break;
                }
                last = Some(uuid);
            }
            out.push((listings[i].0.to_string(), d.clone()));
            current[i] = listings[i].1.next().map(|(_, d)| d);
            if let Some(next) = current[i] {
                heads.push(Reverse((next.uuid.as_str(), i)));
            }
        }
        out
    }

    pub fn hypervisor_health(&self, host: &str) -> Option<&HypervisorHealth> {
        self.inventory.get(host).map(|i| &i.health)
    }
}

fn vm_seen(wall_ms: u64, host: &str, d: &DomainInfo, running: bool) -> StateCommand {
    StateCommand::VmSeen {
        at_ms: wall_ms,
        uuid: d.uuid.clone(),
        name: d.name.clone(),
        host: host.to_string(),
        vcpus: d.vcpus,
        memory_kib: d.memory_kib,
        disks: d.disks.clone(),
        meta_ha: d.meta.ha,
        meta_priority: d.meta.priority,
        generation: d.meta.generation,
        running,
    }
}

/// The whole table of HA VMs and their generations.
pub fn generation_table(state: &ClusterState) -> MonitorToAgent {
    MonitorToAgent::Generations {
        entries: state
            .vms
            .values()
            .filter(|v| v.ha)
            .map(|v| (v.uuid.clone(), v.generation))
            .collect(),
        full: true,
    }
}

/// The expected stop of a VM the monitor destroys through its agent so that it starts
/// elsewhere.
fn forced_stop(kind: FailureKind) -> (FailureKind, String) {
    (kind, format!("destroyed on the monitor's order ({kind})"))
}

/// What a VM needs from a host it is placed on.
fn need_of(vm: &VmRecord) -> Need<'_> {
    Need {
        memory_kib: vm.memory_kib,
        vcpus: vm.vcpus,
        group: vm.anti_affinity.as_deref(),
    }
}

fn condition_evidence(c: &Condition) -> &str {
    match c {
        Condition::Isolated { evidence }
        | Condition::AgentDown { evidence }
        | Condition::Dead { evidence, .. } => evidence,
        Condition::Alive => "heartbeats arrive",
        Condition::Investigating => "evidence still coming in",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vigil_common::domain::VigilMeta;

    /// The next observation sequence number of the simulated agents (one counter for all:
    /// increasing is all that matters).
    fn obs() -> u64 {
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        N.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1
    }

    fn cfg() -> DetectorConfig {
        DetectorConfig {
            heartbeat_interval_ms: 100,
            suspect_after_ms: 250,
            down_after_ms: 500,
        }
    }

    /// An HA domain listed to a monitor before it became leader was never registered: the
    /// follower's proposals are dropped, and the new leader registered the host but not what
    /// it listed (seen as a tiny benchmark waiting 30 minutes for 200 VMs).
    #[test]
    fn ha_domains_listed_before_this_monitor_led_are_registered_when_it_leads() {
        let mut s = Sim {
            engine: Engine::new(cfg(), RecoveryConfig::default(), 0),
            state: ClusterState::default(),
            sent: Vec::new(),
        };
        s.connect("hv1", 0);
        s.input(
            Input::Inventory {
                host: "hv1".into(),
                domains: vec![
                    domain("u1", DomainState::Running, StateReason::Booted, None, true),
                    domain(
                        "u2",
                        DomainState::Shutoff,
                        StateReason::NeverStarted,
                        None,
                        true,
                    ),
                    domain(
                        "plain",
                        DomainState::Running,
                        StateReason::Booted,
                        None,
                        false,
                    ),
                ],
                health: HypervisorHealth::Healthy,
                seq: obs(),
            },
            10,
        );
        assert!(s.state.vms.is_empty(), "a follower records nothing");
        s.input(Input::BecameLeader { term: 1, node: 1 }, 20);
        assert_eq!(s.state.vms.get("u1").map(|v| v.host.as_str()), Some("hv1"));
        assert_eq!(s.state.vms.get("u1").map(|v| v.ha), Some(true));
        assert!(s.state.vms.contains_key("u2"));
        assert!(!s.state.vms.contains_key("plain"), "not HA: not registered");
    }

    /// `vm list` pages walked every reported domain of the cluster for each page (43 s for
    /// 100,000 VMs; one page over vigilctl's 3 s under load failed the scale test). The
    /// merge must give what the walk gave: every copy of the first `take` uuids after the
    /// cursor, on connected hosts only.
    #[test]
    fn a_vm_list_page_is_a_merge_of_the_connected_hosts_listings() {
        let mut s = Sim::new();
        let listing = |uuids: &[&str]| -> Vec<DomainInfo> {
            uuids
                .iter()
                .map(|u| domain(u, DomainState::Running, StateReason::Booted, Some(1), false))
                .collect()
        };
        for (h, uuids) in [
            ("hv1", &["a", "c", "e", "g"][..]),
            ("hv2", &["b", "c", "f"][..]),
            ("hv3", &["d", "h"][..]),
        ] {
            s.connect(h, 0);
            s.input(
                Input::Inventory {
                    host: h.into(),
                    domains: listing(uuids),
                    health: HypervisorHealth::Healthy,
                    seq: obs(),
                },
                1,
            );
        }
        s.input(Input::AgentDisconnected { host: "hv3".into() }, 2);
        let walk = |after: Option<&str>, take: usize| -> Vec<(String, String)> {
            let mut v: Vec<(String, String)> = s
                .engine
                .domains()
                .filter(|(h, _)| s.engine.is_connected(h))
                .filter(|(_, d)| after.is_none_or(|a| d.uuid.as_str() > a))
                .map(|(h, d)| (d.uuid.clone(), h.to_string()))
                .collect();
            v.sort();
            let mut keep: Vec<&String> = v.iter().map(|(u, _)| u).collect();
            keep.dedup();
            let keep: Vec<String> = keep.into_iter().take(take).cloned().collect();
            v.into_iter().filter(|(u, _)| keep.contains(u)).collect()
        };
        for after in [
            None,
            Some("a"),
            Some("b"),
            Some("c"),
            Some("f"),
            Some("g"),
            Some("z"),
        ] {
            for take in 1..=4 {
                let mut got: Vec<(String, String)> = s
                    .engine
                    .connected_domains_after(after, take)
                    .into_iter()
                    .map(|(h, d)| (d.uuid, h))
                    .collect();
                got.sort();
                assert_eq!(got, walk(after, take), "after {after:?}, take {take}");
            }
        }
        // Both copies of "c", and nothing of the disconnected hv3.
        let first = s.engine.connected_domains_after(Some("b"), 1);
        assert_eq!(first.len(), 2, "{first:?}");
        assert!(s
            .engine
            .connected_domains_after(None, 100)
            .iter()
            .all(|(h, _)| h != "hv3"));
    }

    /// Drives the engine and applies its proposals, as Raft would.
    struct Sim {
        engine: Engine,
        state: ClusterState,
        sent: Vec<Action>,
    }

    impl Sim {
        fn new() -> Self {
            let mut s = Sim {
                engine: Engine::new(cfg(), RecoveryConfig::default(), 0),
                state: ClusterState::default(),
                sent: Vec::new(),
            };
            s.input(Input::BecameLeader { term: 1, node: 1 }, 0);
            s
        }
        fn input(&mut self, input: Input, now: u64) {
            let mut queue = vec![input];
            while let Some(input) = queue.pop() {
                let mut applied = false;
                for a in self.engine.handle(input, now, 1_000_000 + now, &self.state) {
                    match a {
                        Action::Propose(cmd) => {
                            self.state.apply(&cmd);
                            applied = true;
                        }
                        other => self.sent.push(other),
                    }
                }
                if applied {
                    queue.push(Input::Applied);
                }
            }
        }
        fn connect(&mut self, host: &str, now: u64) {
            self.input(
                Input::AgentConnected {
                    host: host.into(),
                    zone: "z".into(),
                    cluster: "c".into(),
                    agent_version: "1".into(),
                    facts: HostFacts {
                        memory_available_bytes: 8 << 30,
                        ..HostFacts::default()
                    },
                    instance: 1,
                    pools: vec![],
                    addr: None,
                },
                now,
            );
        }
        fn beat(&mut self, host: &str, now: u64) {
            self.input(
                Input::Heartbeat {
                    host: host.into(),
                    seq: 0,
                    facts: HostFacts {
                        memory_available_bytes: 8 << 30,
                        ..HostFacts::default()
                    },
                    mono_ms: 0,
                    pools: vec![],
                    watchdog_ms: None,
                },
                now,
            );
        }
        fn log(&self) -> Vec<String> {
            self.state
                .events
                .iter()
                .map(|e| e.message.clone())
                .collect()
        }
    }

    #[test]
    fn connect_registers_and_silence_goes_down() {
        let mut s = Sim::new();
        s.connect("hv1", 10);
        assert!(s.state.hosts.contains_key("hv1"));
        for t in (100..=400).step_by(100) {
            s.beat("hv1", t);
            s.input(Input::Tick, t + 50);
        }
        for t in (500..=1_000).step_by(50) {
            s.input(Input::Tick, t);
        }
        assert_eq!(
            s.log(),
            vec![
                "monitor node 1 became leader in term 1",
                "host hv1 registered in zone z, cluster c",
                "host hv1 is up (was unknown)",
                "host hv1 is suspect: no heartbeat for 300 ms",
                "host hv1: silent; investigating (storage heartbeat, peers)",
                "host hv1 is down: no heartbeat for 550 ms",
                "host hv1: dead: no storage heartbeat; its address is unknown, so no peer could check it",
            ]
        );
        s.beat("hv1", 1_100);
        assert_eq!(
            s.log().last().map(String::as_str),
            Some("host hv1 is up (was down)")
        );
    }

    #[test]
    fn reconnecting_agent_does_not_reregister() {
        let mut s = Sim::new();
        s.connect("hv1", 0);
        let n = s.state.events.len();
        s.input(Input::AgentDisconnected { host: "hv1".into() }, 50);
        s.connect("hv1", 60);
        assert_eq!(s.state.events.len(), n, "no new events: {:?}", s.log());
    }

    #[test]
    fn followers_propose_nothing() {
        let mut e = Engine::new(cfg(), RecoveryConfig::default(), 0);
        let state = ClusterState::default();
        let actions = e.handle(
            Input::AgentConnected {
                host: "hv1".into(),
                zone: "z".into(),
                cluster: "c".into(),
                agent_version: "1".into(),
                facts: HostFacts::default(),
                instance: 1,
                pools: vec![],
                addr: None,
            },
            0,
            0,
            &state,
        );
        assert!(actions.is_empty());
        assert!(e.is_connected("hv1"));
    }

    #[test]
    fn a_new_leader_grants_grace_to_known_hosts() {
        let mut s = Sim::new();
        s.connect("hv1", 0);
        s.connect("hv2", 0);
        s.input(Input::AgentDisconnected { host: "hv2".into() }, 10);
        s.input(Input::LostLeadership, 20);
        s.input(Input::BecameLeader { term: 2, node: 1 }, 10_000);
        let n = s.state.events.len();
        s.input(Input::Tick, 10_400);
        assert!(
            !s.log()[n..].iter().any(|m| m.contains("is down")),
            "nobody condemned inside the grace period: {:#?}",
            s.log()
        );
        s.beat("hv1", 10_450);
        s.input(Input::Tick, 10_501);
        // Not heard since the election: Unknown, not Down, for a full lease plus the drift
        // margin (5 s + 1 s by default), however long down_after is.
        s.input(Input::Tick, 15_999);
        assert!(
            !s.log()[n..].iter().any(|m| m.contains("host hv2 is down")),
            "{:#?}",
            s.log()
        );
        s.input(Input::Tick, 16_001);
        let log = s.log();
        assert!(
            log[n..]
                .iter()
                .any(|m| m == "host hv2 is down: no heartbeat for 6001 ms"),
            "{log:#?}"
        );
    }

    #[test]
    fn no_host_is_fenced_in_the_first_full_lease_after_an_election() {
        let mut s = Sim::new();
        s.engine = s.engine.clone().with_failover(FailoverConfig {
            fence_hosts: ["hv1".to_string()].into(),
            mass_failure_percent: 100,
            ..FailoverConfig::default()
        });
        s.connect("hv1", 0);
        s.connect("hv2", 0);
        s.inventory("hv1", vec![running("u1", None)], 10);
        s.input(Input::LostLeadership, 20);
        // hv1 was heard once after the election, then its agent went quiet (reconnecting
        // slowly after the monitor restart); hv2 beats on.
        s.input(Input::BecameLeader { term: 2, node: 1 }, 1_000);
        s.beat("hv1", 1_050);
        for t in (1_100..6_950).step_by(100) {
            s.beat("hv2", t);
            s.input(Input::Tick, t);
        }
        let fenced = |s: &Sim| {
            s.sent
                .iter()
                .any(|a| matches!(a, Action::Fence { host } if host == "hv1"))
        };
        assert!(
            !fenced(&s),
            "fenced within a lease of the election: {:#?}",
            s.log()
        );
        assert!(
            !s.log().iter().any(|m| m.contains("fencing")),
            "{:#?}",
            s.log()
        );
        // A full lease plus margin (6 s) after the election, it may be.
        for t in (7_000..8_000).step_by(100) {
            s.beat("hv2", t);
            s.input(Input::Tick, t);
        }
        assert!(fenced(&s), "{:#?}", s.log());
    }

    #[test]
    fn a_listing_taken_before_a_start_completed_is_not_proof_of_a_crash() {
        let mut s = sim_with_ha_vm();
        s.event("hv1", "u1", LifecycleKind::Crashed, Some(0), 100);
        assert_eq!(s.starts(), vec![("hv1".to_string(), "u1".to_string(), 1)]);
        // The agent lists its domains while the start is under way: defined, shut off,
        // generation 1 already in its metadata. That listing reaches the monitor only after
        // the start's "running" answer.
        let taken = obs();
        s.answer_start("hv1", "u1", 1, true, 900);
        assert_eq!(s.phase("u1"), "running");
        s.input(
            Input::Inventory {
                host: "hv1".into(),
                domains: vec![domain(
                    "u1",
                    DomainState::Shutoff,
                    StateReason::NeverStarted,
                    Some(1),
                    true,
                )],
                health: HypervisorHealth::Healthy,
                seq: taken,
            },
            950,
        );
        assert_eq!(s.phase("u1"), "running", "{:#?}", s.log());
        assert_eq!(s.starts().len(), 1, "a second start: {:#?}", s.log());
        // Nor does it count as proof that the domain is gone from hv1.
        assert!(!s.engine.shut_off_on("hv1", "u1"));
        // A newer listing that shows it shut off is believed.
        s.inventory("hv1", vec![shut_off("u1", 1)], 1_500);
        assert!(
            s.log()
                .iter()
                .any(|m| m.contains("crashed on hv1 (generation 1)")),
            "{:#?}",
            s.log()
        );
    }

    #[test]
    fn an_event_older_than_the_newest_observation_of_the_vm_is_ignored() {
        let mut s = sim_with_ha_vm();
        let old = obs();
        // A newer listing shows it running...
        s.inventory("hv1", vec![running("u1", Some(0))], 100);
        // ...then a stop event that was taken before it arrives.
        s.input(
            Input::DomainEvent {
                host: "hv1".into(),
                event: DomainEvent {
                    uuid: "u1".into(),
                    name: "vm-u1".into(),
                    kind: LifecycleKind::Destroyed,
                    raw_event: 5,
                    raw_detail: 1,
                    at_ms: 50,
                },
                generation: Some(0),
                seq: old,
            },
            150,
        );
        assert_eq!(s.phase("u1"), "running", "{:#?}", s.log());
    }

    #[test]
    fn a_failed_destroy_does_not_leave_an_expected_stop_behind() {
        let mut s = two_hosts_one_vm();
        s.store_definition("hv1", "u1", 20);
        s.state.apply(&StateCommand::SetMaintenance {
            at_ms: 1_000_030,
            host: "hv1".into(),
            on: true,
        });
        s.live_ticks_both(100..200);
        let destroys = |s: &Sim| {
            s.sent
                .iter()
                .filter(|a| {
                    matches!(
                        a,
                        Action::Send {
                            command: AgentCommand::DestroyDomain { .. },
                            ..
                        }
                    )
                })
                .count()
        };
        assert_eq!(destroys(&s), 1, "{:#?}", s.log());
        // QEMU is stuck in uninterruptible I/O: the agent cannot destroy it.
        s.input(
            Input::CommandDone {
                host: "hv1".into(),
                command: AgentCommand::DestroyDomain { uuid: "u1".into() },
                result: Ok(CommandOutcome::Failed {
                    reason: "timed out waiting for qemu to exit".into(),
                }),
                seq: Some(obs()),
            },
            300,
        );
        assert!(
            s.log()
                .iter()
                .any(|m| m.contains("could not stop VM vm-u1 on hv1")),
            "{:#?}",
            s.log()
        );
        s.live_ticks_both(400..2_000);
        assert_eq!(destroys(&s), 1, "retried only after a while");
        // Later an operator destroys it on purpose: that is respected, not read as the
        // drain's stop.
        s.event("hv1", "u1", LifecycleKind::Destroyed, Some(0), 2_100);
        assert_eq!(s.phase("u1"), "stopped", "{:#?}", s.log());
        s.live_ticks_both(2_200..5_000);
        assert!(s.starts().is_empty(), "{:?}", s.starts());
    }

    #[test]
    fn an_expected_stop_whose_destroy_never_answers_expires() {
        let mut s = two_hosts_one_vm();
        s.state.apply(&StateCommand::SetMaintenance {
            at_ms: 1_000_030,
            host: "hv1".into(),
            on: true,
        });
        s.live_ticks_both(100..200);
        assert!(s.engine.expected_stops.contains_key("u1"));
        // The destroy hangs (no answer, no stop), and the operator ends the maintenance.
        s.state.apply(&StateCommand::SetMaintenance {
            at_ms: 1_001_000,
            host: "hv1".into(),
            on: false,
        });
        s.live_ticks_both(1_000..1_100);
        s.live_ticks_both(EXPECTED_STOP_TTL_MS + 200..EXPECTED_STOP_TTL_MS + 300);
        assert!(
            !s.engine.expected_stops.contains_key("u1"),
            "still expected after {EXPECTED_STOP_TTL_MS} ms"
        );
        // Much later an operator destroys it: respected, not read as the drain's stop.
        s.event(
            "hv1",
            "u1",
            LifecycleKind::Destroyed,
            Some(0),
            EXPECTED_STOP_TTL_MS + 400,
        );
        assert_eq!(s.phase("u1"), "stopped", "{:#?}", s.log());
    }

    #[test]
    fn no_lease_grant_without_a_recent_quorum_acknowledgement() {
        let mut s = Sim::new();
        s.engine = s.engine.clone().with_quorum_check(300);
        s.connect("hv1", 0);
        let grants = |s: &Sim| {
            s.sent
                .iter()
                .filter(|a| {
                    matches!(
                        a,
                        Action::Notify {
                            message: MonitorToAgent::LeaseGrant { .. },
                            ..
                        }
                    )
                })
                .count()
        };
        s.beat("hv1", 100);
        assert_eq!(grants(&s), 0, "no quorum ack known yet");
        s.input(
            Input::Quorum {
                last_ack_ms: Some(150),
            },
            200,
        );
        s.beat("hv1", 300);
        assert_eq!(grants(&s), 1);
        // Raft reports nothing more (a stalled core): the ack ages, grants stop, and the
        // lease book counts from the last grant that went out.
        s.beat("hv1", 500);
        assert_eq!(grants(&s), 1);
        let l = s.engine.lease_config().clone();
        assert_eq!(
            s.engine.leases.expires_at("hv1"),
            Some(300 + l.duration_ms + l.drift_margin_ms)
        );
    }

    fn domain(
        uuid: &str,
        state: DomainState,
        reason: StateReason,
        generation: Option<u64>,
        ha: bool,
    ) -> DomainInfo {
        DomainInfo {
            uuid: uuid.into(),
            name: format!("vm-{uuid}"),
            state,
            reason,
            vcpus: 1,
            memory_kib: 65536,
            disks: vec![],
            pools: None,
            meta: VigilMeta {
                ha: Some(ha),
                priority: None,
                generation,
            },
            persistent: true,
        }
    }

    impl Sim {
        fn inventory(&mut self, host: &str, domains: Vec<DomainInfo>, now: u64) {
            self.input(
                Input::Inventory {
                    host: host.into(),
                    domains,
                    health: HypervisorHealth::Healthy,
                    seq: obs(),
                },
                now,
            );
        }
        fn event(
            &mut self,
            host: &str,
            uuid: &str,
            kind: LifecycleKind,
            generation: Option<u64>,
            now: u64,
        ) {
            self.input(
                Input::DomainEvent {
                    host: host.into(),
                    event: DomainEvent {
                        uuid: uuid.into(),
                        name: format!("vm-{uuid}"),
                        kind,
                        raw_event: 5,
                        raw_detail: 5,
                        at_ms: now,
                    },
                    generation,
                    seq: obs(),
                },
                now,
            );
        }
        /// Start orders sent so far, as (host, uuid, generation).
        fn starts(&self) -> Vec<(String, String, u64)> {
            self.sent
                .iter()
                .filter_map(|a| match a {
                    Action::Send {
                        host,
                        command:
                            AgentCommand::StartDomain {
                                uuid, generation, ..
                            },
                    } => Some((host.clone(), uuid.clone(), *generation)),
                    _ => None,
                })
                .collect()
        }
        fn answer_start(&mut self, host: &str, uuid: &str, generation: u64, ok: bool, now: u64) {
            self.input(
                Input::CommandDone {
                    host: host.into(),
                    command: AgentCommand::StartDomain {
                        uuid: uuid.into(),
                        generation,
                        definition: None,
                    },
                    result: Ok(if ok {
                        CommandOutcome::Done {
                            detail: "running".into(),
                        }
                    } else {
                        CommandOutcome::Failed {
                            reason: "boom".into(),
                        }
                    }),
                    seq: Some(obs()),
                },
                now,
            );
        }
        /// A tick with hv1 alive (it heartbeats).
        fn live_tick(&mut self, now: u64) {
            self.beat("hv1", now);
            self.input(Input::Tick, now);
        }
        fn phase(&self, uuid: &str) -> String {
            self.state
                .vms
                .get(uuid)
                .map(|v| v.phase.name().to_string())
                .unwrap_or_default()
        }
    }

    fn sim_with_ha_vm() -> Sim {
        let mut s = Sim::new();
        s.connect("hv1", 0);
        s.inventory(
            "hv1",
            vec![domain(
                "u1",
                DomainState::Running,
                StateReason::Booted,
                None,
                true,
            )],
            10,
        );
        assert_eq!(s.phase("u1"), "running");
        s
    }

    #[test]
    fn crash_is_restarted_in_place_with_the_next_generation() {
        let mut s = sim_with_ha_vm();
        s.event("hv1", "u1", LifecycleKind::Crashed, Some(0), 100);
        assert_eq!(s.starts(), vec![("hv1".to_string(), "u1".to_string(), 1)]);
        assert_eq!(
            s.state.vms["u1"].generation, 1,
            "generation committed before the order"
        );
        assert_eq!(s.phase("u1"), "recovering");
        // The inventory that still shows the crashed copy (generation 0) changes nothing.
        s.inventory(
            "hv1",
            vec![domain(
                "u1",
                DomainState::Shutoff,
                StateReason::Failed,
                Some(0),
                true,
            )],
            120,
        );
        assert_eq!(s.starts().len(), 1);
        s.answer_start("hv1", "u1", 1, true, 900);
        assert_eq!(s.phase("u1"), "running");
        let rec = s.state.vms["u1"].last_recovery.clone().expect("recorded");
        assert_eq!(
            (rec.from_host.as_str(), rec.to_host.as_str(), rec.generation),
            ("hv1", "hv1", 1)
        );
        assert!(
            rec.proof.contains("the agent of hv1 reported it stopped"),
            "{rec:?}"
        );
        let log = s.log();
        assert!(
            log.iter()
                .any(|m| m.contains("crashed on hv1 (generation 0)")
                    && m.contains("restarting in place")),
            "{log:#?}"
        );
        assert!(
            log.iter()
                .any(|m| m.contains("ordered start of VM vm-u1 on hv1 with generation 1")),
            "{log:#?}"
        );
        assert!(
            log.iter()
                .any(|m| m.contains("running on hv1 with generation 1")),
            "{log:#?}"
        );
    }

    #[test]
    fn guest_shutdown_and_operator_destroy_are_respected() {
        for kind in [LifecycleKind::GuestShutdown, LifecycleKind::Destroyed] {
            let mut s = sim_with_ha_vm();
            s.event("hv1", "u1", kind, Some(0), 100);
            assert_eq!(s.phase("u1"), "stopped");
            for t in (200..5_000).step_by(100) {
                s.input(Input::Tick, t);
            }
            assert!(s.starts().is_empty(), "{kind:?} must not be restarted");
            // Seen running again (an operator started it): protected again.
            s.inventory(
                "hv1",
                vec![domain(
                    "u1",
                    DomainState::Running,
                    StateReason::Booted,
                    Some(0),
                    true,
                )],
                6_000,
            );
            assert_eq!(s.phase("u1"), "running");
        }
    }

    #[test]
    fn events_of_another_generation_or_host_are_not_proof() {
        let mut s = sim_with_ha_vm();
        s.event("hv1", "u1", LifecycleKind::Crashed, Some(7), 100);
        s.event("hv2", "u1", LifecycleKind::Crashed, Some(0), 100);
        assert!(s.starts().is_empty());
        assert_eq!(s.phase("u1"), "running");
    }

    #[test]
    fn a_vm_that_crashes_on_every_start_backs_off_then_gives_up() {
        let mut s = sim_with_ha_vm();
        let mut now = 100;
        s.event("hv1", "u1", LifecycleKind::Crashed, Some(0), now);
        let mut times = vec![];
        for _ in 0..20 {
            let Some((_, _, g)) = s.starts().last().cloned() else {
                break;
            };
            if s.phase("u1") != "recovering" {
                break;
            }
            times.push(now);
            s.answer_start("hv1", "u1", g, true, now + 50);
            s.event("hv1", "u1", LifecycleKind::Crashed, Some(g), now + 100);
            // Let backoff timers run.
            for _ in 0..1000 {
                now += 100;
                s.live_tick(now);
                if s.phase("u1") != "backoff" {
                    break;
                }
            }
        }
        let budget = RecoveryConfig::default().budget() as usize;
        assert_eq!(s.starts().len(), budget, "exactly the budget of restarts");
        assert_eq!(s.phase("u1"), "gave-up");
        assert!(
            s.log().iter().any(|m| m.contains("giving up")),
            "{:#?}",
            s.log()
        );
        // Gaps between attempts grow (backoff).
        let gaps: Vec<u64> = times.windows(2).map(|w| w[1] - w[0]).collect();
        assert!(gaps.windows(2).all(|w| w[1] >= w[0]), "{gaps:?}");
        // And nothing more happens afterwards.
        for t in 0..100 {
            s.live_tick(now + 100 * t);
        }
        assert_eq!(s.starts().len(), budget);
    }

    #[test]
    fn a_failed_start_is_retried_and_no_answer_is_not_a_failure() {
        let mut s = sim_with_ha_vm();
        s.event("hv1", "u1", LifecycleKind::Crashed, Some(0), 100);
        s.input(
            Input::CommandDone {
                host: "hv1".into(),
                command: AgentCommand::StartDomain {
                    uuid: "u1".into(),
                    generation: 1,
                    definition: None,
                },
                result: Err("timed out".into()),
                seq: None,
            },
            200,
        );
        assert_eq!(s.phase("u1"), "recovering", "no answer proves nothing");
        s.live_tick(300);
        assert_eq!(
            s.starts(),
            vec![
                ("hv1".into(), "u1".into(), 1),
                ("hv1".into(), "u1".into(), 1)
            ],
            "same order again"
        );
        s.answer_start("hv1", "u1", 1, false, 400);
        assert_eq!(s.phase("u1"), "backoff");
        for t in (500..3_000).step_by(100) {
            s.live_tick(t);
        }
        assert_eq!(
            s.starts().last(),
            Some(&("hv1".to_string(), "u1".to_string(), 2))
        );
    }

    #[test]
    fn generations_are_announced_before_the_start_is_sent() {
        let mut s = sim_with_ha_vm();
        s.sent.clear();
        s.event("hv1", "u1", LifecycleKind::Crashed, Some(0), 100);
        let notify = s.sent.iter().position(|a| matches!(a, Action::Notify { host: None, message: MonitorToAgent::Generations { entries, .. } } if entries.contains(&("u1".to_string(), 1))));
        let start = s.sent.iter().position(|a| matches!(a, Action::Send { .. }));
        assert!(
            notify.is_some() && start.is_some() && notify < start,
            "{:#?}",
            s.sent
        );
    }

    #[test]
    fn a_guest_panic_that_leaves_qemu_running_is_not_proof() {
        let mut s = sim_with_ha_vm();
        // VIR_DOMAIN_EVENT_CRASHED (8): the guest panicked, qemu may still be there.
        s.input(
            Input::DomainEvent {
                host: "hv1".into(),
                event: DomainEvent {
                    uuid: "u1".into(),
                    name: "vm-u1".into(),
                    kind: LifecycleKind::Crashed,
                    raw_event: 8,
                    raw_detail: 0,
                    at_ms: 100,
                },
                generation: Some(0),
                seq: obs(),
            },
            100,
        );
        // Nor is a "crashed" state with qemu preserved.
        s.inventory(
            "hv1",
            vec![domain(
                "u1",
                DomainState::Crashed,
                StateReason::Crashed,
                Some(0),
                true,
            )],
            150,
        );
        assert!(s.starts().is_empty());
        assert_eq!(s.phase("u1"), "running");
    }

    fn running(uuid: &str, generation: Option<u64>) -> DomainInfo {
        domain(
            uuid,
            DomainState::Running,
            StateReason::Booted,
            generation,
            true,
        )
    }

    fn shut_off(uuid: &str, generation: u64) -> DomainInfo {
        domain(
            uuid,
            DomainState::Shutoff,
            StateReason::Failed,
            Some(generation),
            true,
        )
    }

    /// hv1 runs HA VM u1, hv2 is empty; one restart in place, then relocation.
    fn two_hosts_one_vm() -> Sim {
        let mut s = Sim::new();
        s.engine.policy.max_restarts_in_place = 1;
        s.connect("hv1", 0);
        s.connect("hv2", 0);
        s.inventory("hv2", vec![], 10);
        s.inventory("hv1", vec![running("u1", None)], 10);
        s
    }

    impl Sim {
        /// `host`'s agent ships the definition of `uuid` (a relocation needs it stored).
        fn store_definition(&mut self, host: &str, uuid: &str, now: u64) {
            self.input(
                Input::Definition {
                    host: host.into(),
                    uuid: uuid.into(),
                    xml: "<domain/>".into(),
                },
                now,
            );
        }

        /// Ticks every 100 ms over `range` with both hosts heartbeating.
        fn live_ticks_both(&mut self, range: std::ops::Range<u64>) {
            for t in range.step_by(100) {
                self.beat("hv2", t);
                self.live_tick(t);
            }
        }
    }

    #[test]
    fn never_relocates_while_the_old_host_may_still_run_it() {
        let mut s = two_hosts_one_vm();
        // Another host can only start it from its stored definition.
        s.store_definition("hv1", "u1", 20);
        s.event("hv1", "u1", LifecycleKind::Crashed, Some(0), 100);
        assert_eq!(s.starts(), vec![("hv1".to_string(), "u1".to_string(), 1)]);
        // The in-place start is refused because, as far as hv1 knows, it runs again.
        s.inventory("hv1", vec![running("u1", Some(0))], 150);
        s.answer_start("hv1", "u1", 1, false, 200);
        s.live_ticks_both(300..5_000);
        assert!(
            s.starts().iter().all(|(h, _, _)| h == "hv1"),
            "relocated without proof: {:?}",
            s.starts()
        );
        // Once hv1 reports it shut off, relocation to hv2 may proceed.
        s.inventory("hv1", vec![shut_off("u1", 1)], 5_000);
        s.answer_start("hv1", "u1", 2, false, 5_050);
        s.live_ticks_both(5_100..20_000);
        assert!(
            s.starts().iter().any(|(h, _, _)| h == "hv2"),
            "{:?} {:#?}",
            s.starts(),
            s.log()
        );
    }

    #[test]
    fn a_relocation_without_a_stored_definition_waits_loudly() {
        let mut s = two_hosts_one_vm();
        s.event("hv1", "u1", LifecycleKind::Crashed, Some(0), 100);
        s.inventory("hv1", vec![shut_off("u1", 1)], 150);
        s.answer_start("hv1", "u1", 1, false, 200);
        s.live_ticks_both(300..10_000);
        assert!(
            s.starts().iter().all(|(h, _, _)| h == "hv1"),
            "{:?}",
            s.starts()
        );
        assert!(
            s.log()
                .iter()
                .any(|m| m.contains("its definition never reached the monitor")),
            "{:#?}",
            s.log()
        );
    }

    #[test]
    fn an_agent_connected_before_leadership_is_registered_when_it_comes() {
        let mut s = Sim {
            engine: Engine::new(cfg(), RecoveryConfig::default(), 0),
            state: ClusterState::default(),
            sent: Vec::new(),
        };
        s.connect("hv1", 0);
        assert!(s.state.hosts.is_empty(), "a follower registers nothing");
        s.input(Input::BecameLeader { term: 1, node: 1 }, 50);
        assert!(s.state.hosts.contains_key("hv1"), "{:#?}", s.log());
    }

    #[test]
    fn a_new_leader_clears_the_slots_of_active_hosts() {
        let mut s = Sim::new();
        s.connect("hv1", 0);
        s.input(Input::LostLeadership, 20);
        s.sent.clear();
        s.input(Input::BecameLeader { term: 2, node: 1 }, 10_000);
        assert!(
            s.sent
                .iter()
                .any(|a| *a == Action::ClearFence { host: "hv1".into() }),
            "a request left by the previous leader must go: {:?}",
            s.sent
        );
    }

    #[test]
    fn one_isolation_episode_records_one_self_fenced_event() {
        let mut s = Sim::new();
        s.connect("hv1", 0);
        // The agent resends its report on every reconnect until the monitor notes it.
        for t in 1..=5 {
            s.input(
                Input::SelfFenced {
                    host: "hv1".into(),
                    id: 9,
                    reason: "lease expired and no storage pool is reachable".into(),
                    destroyed: vec![],
                },
                t * 100,
            );
        }
        let n = s
            .log()
            .iter()
            .filter(|m| m.contains("fenced itself"))
            .count();
        assert_eq!(n, 1, "{:#?}", s.log());
        // Every delivery is answered, so the agent stops resending.
        let noted = s
            .sent
            .iter()
            .filter(|a| {
                **a == Action::Notify {
                    host: Some("hv1".into()),
                    message: MonitorToAgent::SelfFenceNoted { id: 9 },
                }
            })
            .count();
        assert_eq!(noted, 5, "{:?}", s.sent);
    }

    // ---- Issue 10: a host speaks only for itself ----

    fn kinds(s: &Sim, pred: impl Fn(&EventKind) -> bool) -> usize {
        s.state.events.iter().filter(|e| pred(&e.kind)).count()
    }

    fn conflicts(s: &Sim) -> usize {
        kinds(s, |k| matches!(k, EventKind::VmOwnershipConflict { .. }))
    }

    fn two_hosts_u1_on_hv1() -> Sim {
        let mut s = Sim::new();
        s.connect("hv1", 0);
        s.connect("hv2", 0);
        s.inventory("hv1", vec![running("u1", Some(0))], 10);
        assert_eq!(s.state.vms["u1"].host, "hv1");
        s
    }

    #[test]
    fn a_claim_on_another_hosts_running_vm_is_one_conflict_and_never_a_move() {
        let mut s = two_hosts_u1_on_hv1();
        for t in 0..3 {
            s.inventory("hv2", vec![running("u1", Some(7))], 20 + t);
        }
        s.event("hv2", "u1", LifecycleKind::Started, Some(7), 30);
        let vm = &s.state.vms["u1"];
        assert_eq!(
            (vm.host.as_str(), vm.generation),
            ("hv1", 0),
            "{:?}",
            s.log()
        );
        assert_eq!(conflicts(&s), 1, "{:?}", s.log());
        // Even with the current generation: hv1 still runs it.
        s.inventory("hv2", vec![running("u1", Some(0))], 40);
        assert_eq!(s.state.vms["u1"].host, "hv1");
        assert_eq!(conflicts(&s), 1);
        // The episode ends when hv2 stops claiming; a new claim is a new episode. With the
        // committed generation it could be a live migration whose source listing is late: a
        // conflict once hv1 lists the VM again, still running.
        s.inventory("hv2", vec![], 50);
        s.inventory("hv2", vec![running("u1", Some(0))], 60);
        assert_eq!(conflicts(&s), 1, "{:?}", s.log());
        s.inventory("hv1", vec![running("u1", Some(0))], 62);
        s.inventory("hv2", vec![running("u1", Some(0))], 64);
        assert_eq!(conflicts(&s), 2, "{:?}", s.log());
        assert_eq!(s.state.vms["u1"].host, "hv1");
        // A shut-off copy defined on another host is normal and says nothing.
        s.inventory(
            "hv2",
            vec![domain(
                "u1",
                DomainState::Shutoff,
                StateReason::Destroyed,
                Some(0),
                false,
            )],
            70,
        );
        assert_eq!(conflicts(&s), 2);
        assert_eq!(s.phase("u1"), "running");
    }

    /// What the source of a live migration lists once the VM left it.
    fn migrated_away(uuid: &str) -> DomainInfo {
        domain(
            uuid,
            DomainState::Shutoff,
            StateReason::Migrated,
            Some(0),
            true,
        )
    }

    #[test]
    fn a_live_migration_its_own_host_corroborates_still_moves_the_vm() {
        let mut s = two_hosts_u1_on_hv1();
        // hv1 no longer runs it (migrated away), then hv2 reports it with the same generation.
        s.inventory("hv1", vec![migrated_away("u1")], 20);
        s.inventory("hv2", vec![running("u1", Some(0))], 30);
        assert_eq!(s.state.vms["u1"].host, "hv2", "{:?}", s.log());
        assert_eq!(conflicts(&s), 0, "{:?}", s.log());
        // The destination's listing first: no conflict, and the move once the source's
        // listing lets go.
        let mut s = two_hosts_u1_on_hv1();
        s.inventory("hv2", vec![running("u1", Some(0))], 20);
        assert_eq!(s.state.vms["u1"].host, "hv1");
        s.inventory("hv1", vec![migrated_away("u1")], 30);
        s.inventory("hv2", vec![running("u1", Some(0))], 40);
        assert_eq!(s.state.vms["u1"].host, "hv2", "{:?}", s.log());
        assert_eq!(conflicts(&s), 0, "{:?}", s.log());
    }

    #[test]
    fn a_definition_is_taken_only_from_the_vms_host_and_only_within_the_policy() {
        let mut s = two_hosts_u1_on_hv1();
        let good = "<domain type='kvm'><name>vm-u1</name></domain>";
        let hostile = "<domain xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'><name>vm-u1</name><qemu:commandline><qemu:arg value='-x'/></qemu:commandline></domain>";
        let def = |s: &mut Sim, host: &str, xml: &str, now| {
            s.input(
                Input::Definition {
                    host: host.into(),
                    uuid: "u1".into(),
                    xml: xml.into(),
                },
                now,
            )
        };
        def(&mut s, "hv1", good, 20);
        assert_eq!(s.state.vms["u1"].definition.as_deref(), Some(good));
        def(
            &mut s,
            "hv2",
            "<domain type='kvm'><name>other</name></domain>",
            30,
        );
        assert_eq!(s.state.vms["u1"].definition.as_deref(), Some(good));
        // The VM's own host, resending a hostile definition: refused once, the old kept.
        def(&mut s, "hv1", hostile, 40);
        def(&mut s, "hv1", hostile, 50);
        assert_eq!(s.state.vms["u1"].definition.as_deref(), Some(good));
        let refused: Vec<&str> = s
            .state
            .events
            .iter()
            .filter(|e| e.kind == EventKind::VmDefinitionRefused)
            .map(|e| e.message.as_str())
            .collect();
        assert_eq!(refused.len(), 1, "{refused:?}");
        assert!(refused[0].contains("qemu:commandline"), "{}", refused[0]);
        assert!(
            refused[0].contains("stored definition is kept"),
            "{}",
            refused[0]
        );
    }

    #[test]
    fn a_hello_never_moves_a_registered_host() {
        let mut s = Sim::new();
        s.connect("hv1", 0);
        s.input(
            Input::AgentConnected {
                host: "hv1".into(),
                zone: "elsewhere".into(),
                cluster: "c2".into(),
                agent_version: "2".into(),
                facts: HostFacts::default(),
                instance: 2,
                pools: vec![],
                addr: None,
            },
            10,
        );
        let h = &s.state.hosts["hv1"];
        assert_eq!((h.zone.as_str(), h.cluster.as_str()), ("z", "c"));
        assert_eq!(h.agent_version, "2", "the agent version still updates");
        // A refused hello is recorded once per episode.
        for t in [20, 30] {
            s.input(
                Input::HostPlacementRefused {
                    host: "hv1".into(),
                    detail: "zone z vs elsewhere".into(),
                },
                t,
            );
        }
        assert_eq!(kinds(&s, |k| *k == EventKind::HostPlacementRefused), 1);
    }
}
