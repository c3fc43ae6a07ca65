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
use std::net::SocketAddr;

use vigil_common::config::{DetectorConfig, LeaseConfig, RecoveryConfig, TagFallback};
use vigil_common::domain::{
    DomainEvent, DomainInfo, DomainState, HypervisorHealth, LifecycleKind, StateReason,
};
use vigil_common::storage::FenceRequest;
use vigil_common::wire::{AgentCommand, CommandOutcome, HostFacts, MonitorToAgent, PoolStatus};

mod claims;
mod conditions;
mod fencing;
mod interface;
mod leadership;
mod lease_pause;
mod maintenance;
mod observation;
mod operator;
mod own_certificate;
mod plan;
mod proof;
mod queries;
mod reservations;
mod restarts;
mod sessions;
mod settings;
mod storage;
#[cfg(test)]
mod tests;

pub use self::fencing::{FENCE_RETRY_MS, PREDECESSOR_FENCE_MARGIN_MS};
pub use self::interface::*;
pub use self::observation::DESTROY_RETRY_MS;
pub use self::plan::{ClusterCapacity, PlanOutcome, PlannedVm, UnknownHost, CAPACITY_CHECK_MS};
pub use self::proof::EXPECTED_STOP_TTL_MS;
pub use self::restarts::generation_table;
pub use self::sessions::INCOMPATIBLE_ALIVE_MS;
pub use self::storage::STORAGE_FAULT_GRACE_MS;

use self::conditions::condition_evidence;
use self::fencing::FencingBook;
use self::observation::HostInventory;
use self::plan::CapacityBook;
use self::proof::forced_stop;
use self::reservations::failover_choice;
use self::restarts::RecoveryBook;
use self::restarts::{need_of, vm_seen};
use self::sessions::HelloClaims;
use crate::agent_link::CommandError;
use crate::fencing::FenceFailure;
use crate::storage::PoolFault;

use crate::detector::{FailureDetector, Liveness, LivenessView, Transition};
use crate::investigation::{self, Condition, Evidence};
use crate::lease::LeaseBook;
use crate::placement::{self, Choice, HostView, Need};
use crate::recovery;
use crate::state::{
    ClusterState, EventKind, FailureKind, HostPhase, HostProof, HostRecord, Phase, Proof, Severity,
    StateCommand, StopReason, VmRecord,
};
/// Leader-local soft state plus the decision logic.
#[derive(Debug, Clone)]
pub struct Engine {
    detector: FailureDetector,
    policy: RecoveryConfig,
    /// This leadership's bookkeeping of VM recovery (reset on election).
    recovery: RecoveryBook,
    /// This leadership's bookkeeping of host fencing (reset on election).
    fencing: FencingBook,
    /// This leadership's N+k figures (reset on election).
    capacity: CapacityBook,
    facts: BTreeMap<String, HostFacts>,
    connected: BTreeSet<String>,
    inventory: BTreeMap<String, HostInventory>,
    failover: FailoverConfig,
    /// What each connected agent's hello claims, so that a monitor that becomes leader after
    /// the agent connected still registers the host.
    hellos: BTreeMap<String, HelloClaims>,
    leader: bool,
    /// What silent hosts' silence means (storage heartbeats, peer probes).
    evidence: Evidence,
    /// Leases granted and when their expiry is proof.
    leases: LeaseBook,
    /// Agent process of each host (from its hello).
    instances: BTreeMap<String, u64>,
    /// Storage pools of each host (from its hello), and their state there.
    host_pools: BTreeMap<String, Vec<String>>,
    pool_status: BTreeMap<(String, String), PoolStatus>,
    /// Self-fence reports already recorded, per host (episode ids), so that a resent
    /// report is recorded once.
    self_fence_noted: BTreeMap<String, BTreeSet<u64>>,
    /// Fence acknowledgements already refused as proof (request ids), to say so once.
    acks_refused: BTreeSet<u64>,
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
    /// Hosts that were active when this monitor became leader but had no agent connected to
    /// it: their agents are still finding the new leader. Until each one reconnects (or
    /// `fence_after_ms` passes) no VM is placed on a relocation: a partial view would send
    /// VMs past the ha_tag host, or a host with room, only because its agent is late.
    awaiting_reconnect: BTreeSet<String>,
    /// Hosts being fenced or fenced when this monitor became leader, and not heard since:
    /// their silence is on record (down, and being or already proven off), so this leader's detector and investigation
    /// finding them silent again is no new state, and no new event.
    fenced_before_election: BTreeSet<String>,
    /// The liveness the event log last recorded per host ("up", "down", ...), read from the
    /// log at election: a new leader's detector starts every host at unknown and finds it up
    /// again, which is no state change and gets no event (one per host per election, ten
    /// thousand for a large cloud, before this).
    logged_liveness: BTreeMap<String, String>,
    /// The pool state (up or not) the event log last recorded per (host, pool), read from
    /// the log at election and kept as events are recorded: a new leader hears every pool
    /// again, which is no state change and gets no event.
    logged_pools: BTreeMap<(String, String), bool>,
    /// `Some(what)` while this monitor's own certificate is expired ([`Input::OwnCertificate`]):
    /// no fencing of any kind then.
    own_certificate_expired: Option<String>,
    /// Whether this engine acts only under a leader lease ([`Self::with_leader_lease`]).
    lease_checked: bool,
    /// Until when (monotonic ms) this monitor holds its leader lease ([`Input::LeaderLease`]).
    lease_until_ms: Option<u64>,
    /// When (wall ms) each forced stop (`expected_stops` from [`forced_stop`]) was ordered.
    forced_stop_at: BTreeMap<String, u64>,
    /// VMs whose ordered destroy failed: not ordered again before this time (wall ms).
    destroy_retry_at: BTreeMap<String, u64>,
    /// What this leader decided while its lease was out and carries out once it is back
    /// (`lease_pause`).
    held: lease_pause::HeldActions,
    /// Issue 10: what this leader already recorded, to say it once per episode.
    identity: claims::IdentityNotes,
    /// Issue 12 item 6: while a restored cluster's leader adopts what the agents report
    /// (nothing is ordered, stopped or fenced meanwhile); `None` otherwise.
    adoption: Option<leadership::Adoption>,
    /// Issue 12 item 9: the cluster-wide sections of this monitor's file (the seed of a
    /// cluster without settings), and the revision of the committed settings in use (0:
    /// the file's).
    file_settings: Option<vigil_common::settings::ClusterSettings>,
    settings_revision: u64,
}

/// A pool must be down on a host for this long before that host's HA VMs are moved off it:
impl Engine {
    pub fn new(cfg: DetectorConfig, policy: RecoveryConfig, now_ms: u64) -> Self {
        Engine {
            detector: FailureDetector::new(cfg, now_ms),
            policy,
            recovery: RecoveryBook::default(),
            fencing: FencingBook::default(),
            capacity: CapacityBook::default(),
            facts: BTreeMap::new(),
            connected: BTreeSet::new(),
            inventory: BTreeMap::new(),
            failover: FailoverConfig::default(),
            hellos: BTreeMap::new(),
            leader: false,
            evidence: Evidence::default(),
            leases: LeaseBook::new(LeaseConfig::default(), 500),
            instances: BTreeMap::new(),
            host_pools: BTreeMap::new(),
            pool_status: BTreeMap::new(),
            self_fence_noted: BTreeMap::new(),
            acks_refused: BTreeSet::new(),
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
            awaiting_reconnect: BTreeSet::new(),
            fenced_before_election: BTreeSet::new(),
            logged_liveness: BTreeMap::new(),
            logged_pools: BTreeMap::new(),
            own_certificate_expired: None,
            lease_checked: false,
            lease_until_ms: None,
            forced_stop_at: BTreeMap::new(),
            destroy_retry_at: BTreeMap::new(),
            held: Default::default(),
            identity: Default::default(),
            adoption: None,
            file_settings: None,
            settings_revision: 0,
        }
    }

    /// Acts outside Raft (lease grants, fencing, storage slots, the leader record, commands
    /// to agents) only while it holds the leader lease ([`Input::LeaderLease`], see
    /// `raft::leader_lease`), checked against `now_ms` at every use; without this call the
    /// engine does not check.
    pub fn with_leader_lease(mut self) -> Self {
        self.lease_checked = true;
        self
    }

    /// Whether this monitor may act as leader at `now_ms` (the leader lease, where checked).
    pub(super) fn lease_holds(&self, now_ms: u64) -> bool {
        !self.lease_checked || self.lease_until_ms.is_some_and(|t| now_ms < t)
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

    /// Configures host-failure handling (fence agents, mass-failure guard, ha_tag).
    pub fn with_failover(mut self, failover: FailoverConfig) -> Self {
        self.failover = failover;
        self
    }

    /// The heartbeat interval the engine runs with (the cluster's, once it has settings):
    /// what agents are told at their welcome and when it changes.
    pub fn heartbeat_interval_ms(&self) -> u64 {
        self.detector.config().heartbeat_interval_ms
    }

    pub fn is_leader(&self) -> bool {
        self.leader
    }

    /// Decides what to do about `input`. `now_ms` is monotonic time, `wall_ms` Unix time
    /// (stamped into proposals so that applying them is deterministic). One line per input:
    /// each concern's handler lives in its own module.
    pub fn handle(
        &mut self,
        input: Input,
        now_ms: u64,
        wall_ms: u64,
        state: &ClusterState,
    ) -> Vec<Action> {
        let mut cx = Context {
            now_ms,
            wall_ms,
            state,
            out: Vec::new(),
        };
        self.views = None;
        let interval_was = self.heartbeat_interval_ms();
        self.follow_settings(state);
        if self.heartbeat_interval_ms() != interval_was {
            // Agents learn it at their welcome; the connected ones are told now (a session
            // welcomed before this asked the engine first, so none misses it).
            cx.out.push(Action::Notify {
                host: None,
                message: MonitorToAgent::Tuning {
                    heartbeat_interval_ms: self.heartbeat_interval_ms(),
                },
            });
        }
        match input {
            Input::AgentConnected(hello) => self.on_agent_connected(hello, &mut cx),
            Input::AgentIncompatible { host, detail } => {
                self.on_agent_incompatible(host, detail, &mut cx)
            }
            Input::AgentDisconnected { host } => self.on_agent_disconnected(host, state),
            Input::Heartbeat(beat) => self.on_heartbeat(beat, &mut cx),
            Input::SelfFenced(report) => self.on_self_fenced(report, &mut cx),
            Input::Storage { pool, result } => self.on_storage(&pool, result, &mut cx),
            Input::Inventory(listing) => self.on_inventory(listing, &mut cx),
            Input::DomainEvent(report) => self.on_lifecycle(report, &mut cx),
            Input::Definition(report) => self.on_definition(report, &mut cx),
            Input::StaleDestroyed(report) => self.on_stale_destroyed(report, &mut cx),
            Input::CommandDone(answer) => self.on_command_answer(answer, &mut cx),
            Input::LeaderLease { until_ms } => self.lease_until_ms = until_ms,
            Input::FenceDone { host, result } => self.on_fence_done(host, result, &mut cx),
            Input::Tick => self.tick(&mut cx),
            Input::Applied => self.applied(&mut cx),
            Input::BecameLeader { term, node } => self.on_became_leader(term, node, &mut cx),
            Input::LostLeadership => self.on_lost_leadership(),
            Input::OwnCertificate { expired } => self.on_own_certificate(expired, &mut cx),
            Input::OperatorFence { host, by } => self.on_operator_fence(host, by, &mut cx),
            Input::ReleaseHold { cluster, by } => self.on_release_hold(cluster, by, &mut cx),
            Input::HostPlacementRefused { host, detail } => {
                self.placement_refused(&host, detail, wall_ms, &mut cx.out)
            }
        }
        let mut out = cx.out;
        if !self.leader {
            // Only the leader records or acts; followers keep soft state for a fast takeover.
            out.clear();
        } else if !self.lease_holds(now_ms) {
            // A leader whose lease ran out may already have been replaced: nothing that needs
            // the lease leaves; what must still happen is put back or held (`lease_pause`).
            out = self.hold_back(out, state, now_ms);
        } else if !self.held.is_empty() {
            let mut released = self.release_held(state);
            released.append(&mut out);
            out = released;
        }
        out
    }

    /// The periodic pass: detector, maintenance, hosts, storage, recovery, leader record.
    fn tick(&mut self, cx: &mut Context<'_>) {
        if self.adoption_holds(cx) {
            // A restored cluster's leader fences nobody before it has adopted what the
            // agents report (see `leadership::Adoption`).
            self.fence_after_ms = self.fence_after_ms.max(cx.now_ms.saturating_add(1));
        }
        if cx.now_ms >= self.fence_after_ms {
            self.awaiting_reconnect.clear();
        }
        self.detector.track_sorted(cx.state.hosts.keys());
        self.expire_forced_stops(cx.wall_ms);
        self.mirror_maintenance(cx.state);
        self.reconcile_maintenance(cx);
        for t in self.detector.tick(cx.now_ms) {
            if !self.fenced_before_election.contains(&t.host) {
                self.transition_event(t, cx.wall_ms, &mut cx.out);
            }
        }
        self.reconcile_hosts(cx);
        self.release_committed_fences(cx);
        self.reconcile_storage(cx);
        self.reconcile(cx);
        if self.leader {
            self.check_capacity(cx);
            cx.out.push(self.leader_record(cx.state, cx.now_ms));
        }
    }

    /// Committed state changed: mirror it and derive the work it implies.
    fn applied(&mut self, cx: &mut Context<'_>) {
        self.mirror_maintenance(cx.state);
        self.release_committed_fences(cx);
        self.reconcile(cx);
    }
}

/// What handling one input reads and writes besides the engine itself: the clocks it is
/// handled at (`now_ms` monotonic, `wall_ms` Unix time), the committed state it reads, and the
/// actions decided so far. [`Engine::handle`] makes one per input; its handlers pass it on.
pub(super) struct Context<'a> {
    pub(super) now_ms: u64,
    pub(super) wall_ms: u64,
    pub(super) state: &'a ClusterState,
    pub(super) out: Vec<Action>,
}

/// Proposes an event for the replicated log: the one way the engine records one.
fn record_event(
    out: &mut Vec<Action>,
    at_ms: u64,
    severity: Severity,
    host: Option<String>,
    kind: EventKind,
    message: String,
) {
    // Cut here, not only when applied: the proposal itself stays small.
    out.push(Action::Propose(StateCommand::RecordEvent {
        at_ms,
        severity,
        host,
        kind,
        message: crate::state::clip_message(message),
    }));
}
