//! The replicated cluster state: everything durable the monitor knows.
//!
//! This module is pure. `ClusterState` changes only through [`ClusterState::apply`], which
//! the Raft state machine calls for every committed [`StateCommand`], in log order, on every
//! monitor. `apply` must therefore be deterministic: it takes time from the command (the
//! leader stamps it before proposing), never from a clock, and it never fails halfway: a
//! command that does not fit the current state is rejected whole with a [`StateResponse`]
//! error and changes nothing.

pub mod host;
pub mod settings;
pub mod vm;

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde::{Deserialize, Serialize};

pub use host::{HostPhase, HostProof};
pub use vm::{
    Decision, FailureKind, HaSource, Phase, Proof, RecoveryRecord, StopReason, VmRecord,
    MAX_DEFINITION_LEN,
};

/// How many events the replicated log keeps; the oldest are dropped first.
pub const EVENT_LOG_CAPACITY: usize = 10_000;

/// A hypervisor host as the cluster remembers it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRecord {
    /// The host's identity: the common name of its agent certificate.
    pub name: String,
    /// Availability zone. HA never crosses zones.
    pub zone: String,
    /// Cluster inside the zone. Recovery prefers the same cluster.
    pub cluster: String,
    /// Operator tags (for example the `ha_tag` of dedicated HA hosts).
    pub tags: BTreeSet<String>,
    /// When the host first registered (Unix ms, leader's clock).
    pub registered_at_ms: u64,
    /// Last agent version that registered for this host.
    pub agent_version: String,
    /// Fencing phase (host failure handling).
    #[serde(default)]
    pub phase: HostPhase,
    /// In maintenance: its HA VMs are moved off it and nothing new is placed on it.
    #[serde(default)]
    pub maintenance: bool,
    /// Shared storage pools it mounts (from its agent's hello).
    #[serde(default)]
    pub pools: Vec<String>,
    /// The address its agent connects from (peers probe it when it goes silent).
    #[serde(default)]
    pub addr: Option<std::net::IpAddr>,
}

/// Severity of an event, for operators' eyes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Info,
    Warning,
    Critical,
}

impl std::fmt::Display for Severity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Critical => "critical",
        })
    }
}

/// What happened, as a machine-readable kind. The human explanation is in `Event::message`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum EventKind {
    HostRegistered,
    HostLocationChanged,
    HostTagAdded {
        tag: String,
    },
    HostTagRemoved {
        tag: String,
    },
    /// The failure detector moved a host between liveness states.
    HostLiveness {
        from: String,
        to: String,
    },
    /// A monitor became leader (term given).
    LeaderElected {
        term: u64,
        node: u64,
    },
    HostFencing {
        attempt: u32,
    },
    HostFenced,
    HostFenceFailed {
        attempt: u32,
    },
    HostRejoined,
    /// A host's agent connected while a fence agent was running against it: it rejoins only
    /// if that attempt fails.
    HostHeardWhileFenced,
    /// The leader's reading of a silent host changed (alive, investigating, isolated,
    /// agent-down, dead).
    HostCondition {
        condition: String,
    },
    /// A host holds HA VMs that nothing can prove stopped.
    HostUnfenceable,
    /// A host's agent reached this monitor but cannot be managed (a protocol version
    /// mismatch): alive, never fenced for it.
    HostIncompatible,
    /// A fence acknowledgement through the storage slot that does not prove the host's HA
    /// VMs stopped (it does not cover every VM the request named): not proof.
    FenceAckRefused,
    /// A host's agent fenced itself (destroyed its HA domains).
    /// A host's agent fenced itself; `episode` is the report's id (its agent resends the
    /// report until noted, also to a new leader: one event per episode, whoever leads).
    /// Absent in events recorded before it was kept.
    HostSelfFenced {
        #[serde(default)]
        episode: Option<u64>,
    },
    /// A host entered or left maintenance.
    HostMaintenance {
        on: bool,
    },
    /// A VM placed next to a member of its anti-affinity group (no other host had room).
    AntiAffinityBroken,
    /// A VM is being moved off a host in maintenance.
    VmDraining,
    /// A destroy the monitor ordered to move a VM (storage fault, maintenance) failed.
    VmStopFailed,
    /// A VM joined or left an anti-affinity group.
    VmAntiAffinity {
        group: Option<String>,
    },
    /// A storage pool is down: on every host (pool-wide) or on some.
    StorageOutage {
        pool: String,
        pool_wide: bool,
        /// The hosts it is down on, sorted (what makes it the same outage for a new
        /// leader). Empty in events recorded before it was kept.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        hosts: Vec<String>,
    },
    /// A storage pool went down or came back on a host.
    PoolState {
        pool: String,
        ok: bool,
    },
    /// Automatic fencing held: too many hosts of a cluster failed at once.
    FencingHeld,
    /// An operator lifted a cluster's mass-failure hold (`vigilctl fencing release`).
    FencingReleased {
        cluster: String,
        by: String,
    },
    /// An operator confirmed a host powered off (`vigilctl host confirm-off`): their word is
    /// the proof that lets its HA VMs start elsewhere.
    HostConfirmedOff {
        by: String,
    },
    /// No live host carries the ha_tag for a recovering VM.
    NoTaggedHost,
    /// A VM cannot be started on another host: no stored definition.
    NoDefinition,
    VmRegistered,
    VmHaChanged {
        ha: bool,
    },
    VmDefinitionStored,
    /// The VM failed; the message says what Vigil does about it.
    VmFailed {
        generation: u64,
        failure: FailureKind,
        /// When the failure was observed where it happened (agent clock), if known.
        #[serde(default)]
        observed_at_ms: Option<u64>,
    },
    VmRestartOrdered {
        generation: u64,
        target: String,
    },
    /// A cluster absorbs fewer host failures (with every HA VM placed) than configured.
    CapacityLow {
        cluster: String,
        tolerated: usize,
    },
    /// It absorbs the configured number again.
    CapacityRestored {
        cluster: String,
        tolerated: usize,
    },
    /// Placement ran again before a start was ordered: the message names the host chosen,
    /// why, and why not the one the failure's event named.
    VmPlaced {
        generation: u64,
        target: String,
    },
    VmRecovered {
        generation: u64,
    },
    VmStopped,
    VmRunningAgain,
    VmGaveUp,
    VmMoved,
    /// A domain running with an older generation than the newest was destroyed.
    VmStaleDestroyed {
        found: Option<u64>,
        newest: u64,
    },
    // Issue 10 items 5 and 6 (certificates, admin audit).
    /// A certificate in use (an agent's at connect, an admin's at a request, the monitor's
    /// own) expires within 30 days. Once per certificate (serial).
    CertificateExpiring {
        role: String,
        name: String,
        serial: String,
        not_after_ms: u64,
    },
    /// A genuine certificate (of the cluster CA, not revoked) was refused at the handshake
    /// because it expired. Once per certificate (serial).
    /// This monitor's own certificate expired (`expired`), or was renewed: while expired,
    /// no agent can connect and the monitor fences nobody.
    OwnCertificate {
        expired: bool,
    },
    CertificateExpired {
        role: String,
        name: String,
        serial: String,
        not_after_ms: u64,
    },
    /// An admin API write, by whom (`admin:alice`, `viewer:bob`), what (`vigilctl`'s words)
    /// and its outcome (`ok`, `unchanged`, `started`, `error: ...`, `refused: ...`).
    AdminAction {
        by: String,
        request: String,
        result: String,
    },
    // ---- Issue 10 (an agent certificate speaks only for its own host) ----
    /// A host's agent said hello with another zone or cluster than its host record: refused
    /// (only an operator moves a host, `vigilctl host place`).
    HostPlacementRefused,
    /// A host claimed a VM that the cluster has on another host (an inventory, an event or a
    /// definition): neither a move nor a definition change. One per conflict episode.
    VmOwnershipConflict {
        claimant: String,
    },
    /// A domain definition refused by the domain policy: the stored one is kept.
    VmDefinitionRefused,
    // ---- Issue 12 item 6 (backup and restore) ----
    /// A restored cluster's first leader waits for the agents before it orders anything.
    RestoreAdoption,
    /// An agent reported a VM with a newer activation generation than the restored backup
    /// holds: the cluster adopted it (and the host reporting it).
    VmAdopted {
        generation: u64,
    },
    /// A restored cluster's leader heard every host (or waited a full lease): it acts again.
    RestoreAdopted,
    // ---- Issue 12 item 9 (cluster settings in the replicated state) ----
    /// The cluster's first leader took the cluster-wide settings from its file (`by`).
    SettingsSeeded {
        by: String,
    },
    /// An operator changed one cluster setting (values as TOML, secrets hidden; `None`: not
    /// set).
    SettingChanged {
        key: String,
        from: Option<String>,
        to: Option<String>,
        by: String,
    },
}

/// One entry of the replicated event log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Monotonic id, assigned at apply time.
    pub id: u64,
    /// Unix ms, stamped by the leader that proposed it.
    pub at_ms: u64,
    pub severity: Severity,
    pub host: Option<String>,
    /// The VM (uuid) the event is about, if any.
    #[serde(default)]
    pub vm: Option<String>,
    #[serde(flatten)]
    pub kind: EventKind,
    pub message: String,
}

/// A change to the replicated state. Every variant carries the leader's wall-clock time so
/// that applying it is deterministic on every replica.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "op")]
pub enum StateCommand {
    /// An agent with a valid certificate connected. Creates the host, or updates its zone,
    /// cluster and agent version.
    RegisterHost {
        at_ms: u64,
        name: String,
        zone: String,
        cluster: String,
        agent_version: String,
    },
    AddTag {
        at_ms: u64,
        host: String,
        tag: String,
    },
    RemoveTag {
        at_ms: u64,
        host: String,
        tag: String,
    },
    /// Several commands in one Raft entry, applied in order (the proposer batches).
    Batch { commands: Vec<StateCommand> },
    /// An agent reports a domain: registers HA VMs marked in their XML metadata, and keeps
    /// known VMs' facts and host current.
    VmSeen {
        at_ms: u64,
        uuid: String,
        name: String,
        host: String,
        vcpus: u32,
        memory_kib: u64,
        disks: Vec<String>,
        meta_ha: Option<bool>,
        meta_priority: Option<i32>,
        generation: Option<u64>,
        running: bool,
    },
    /// `vigilctl vm ha enable|disable`.
    SetHa {
        at_ms: u64,
        uuid: String,
        name: String,
        host: String,
        ha: bool,
        priority: Option<i32>,
    },
    /// The inactive XML of an HA VM, sent by its agent when it changes.
    StoreDefinition {
        at_ms: u64,
        uuid: String,
        xml: String,
    },
    /// A VM failed (with proof that nothing runs); records the engine's decision.
    VmFailed {
        at_ms: u64,
        uuid: String,
        generation: u64,
        failure: FailureKind,
        proof: Proof,
        decision: Decision,
        window_ms: u64,
    },
    /// Raise the generation and order a start on `host`. Only from `Backoff`.
    OrderStart {
        at_ms: u64,
        uuid: String,
        host: String,
        generation: u64,
    },
    /// The agent of `host` reports the VM running with `generation`.
    VmStarted {
        at_ms: u64,
        uuid: String,
        host: String,
        generation: u64,
    },
    /// The guest shut down or an operator destroyed it: respected.
    VmStopped {
        at_ms: u64,
        uuid: String,
        host: String,
        reason: StopReason,
    },
    /// The leader starts fencing a host (proof 2 of the one rule).
    FenceStarted {
        at_ms: u64,
        host: String,
        reason: String,
    },
    /// A fencing host is proven off (proof 2, 3 or 4): `Fenced`, its HA VMs may start
    /// elsewhere.
    HostProvenOff {
        at_ms: u64,
        host: String,
        proof: HostProof,
    },
    /// An attempt to fence a host failed (a fence agent's error): it stays `Fencing`.
    FenceFailed {
        at_ms: u64,
        host: String,
        detail: String,
    },
    /// Legacy: the form of the two above written by monitors before proofs were typed. Still
    /// applied (old log entries), never written.
    FenceResult {
        at_ms: u64,
        host: String,
        ok: bool,
        detail: String,
    },
    /// A fenced (or fencing) host's agent is connected again.
    HostRejoined { at_ms: u64, host: String },
    /// `vigilctl host confirm-off H`: the operator (`by`, the admin certificate's name) says H
    /// is powered off, like Pacemaker's `stonith_admin --confirm` or oVirt's "confirm host has
    /// been rebooted". A proof: H is fenced and its HA VMs may start elsewhere.
    OperatorConfirmedOff {
        at_ms: u64,
        host: String,
        by: String,
    },
    /// An operator stops an HA VM through Vigil: recovery stops, the VM is left alone.
    OperatorStop { at_ms: u64, uuid: String },
    /// An agent destroyed a domain running with a stale generation.
    StaleDestroyed {
        at_ms: u64,
        uuid: String,
        host: String,
        found: Option<u64>,
        newest: u64,
    },
    /// The storage pools a host's agent says it mounts, and the address it connects from.
    SetHostInfo {
        at_ms: u64,
        host: String,
        pools: Vec<String>,
        addr: Option<std::net::IpAddr>,
    },
    /// `vigilctl host maintenance on|off`.
    SetMaintenance { at_ms: u64, host: String, on: bool },
    /// `vigilctl vm anti-affinity VM GROUP|--none`: VMs of one group are kept on different
    /// hosts where placement can.
    SetAntiAffinity {
        at_ms: u64,
        uuid: String,
        group: Option<String>,
    },
    /// Record an event that is not a side effect of another command (liveness changes,
    /// leadership changes).
    RecordEvent {
        at_ms: u64,
        severity: Severity,
        host: Option<String>,
        kind: EventKind,
        message: String,
    },
    // ---- Issue 10 item 3 ----
    /// `vigilctl host place H --zone Z --cluster C`: an operator (`by`) moves a host. The
    /// only way a registered host changes zone or cluster: its agent's hello must match.
    SetHostPlacement {
        at_ms: u64,
        host: String,
        zone: String,
        cluster: String,
        by: String,
    },
    // ---- Issue 12 item 3 ----
    /// Monitor `node`'s client endpoint (its `advertise`, where agents and `vigilctl` reach
    /// it), written by each monitor when it becomes leader: the membership holds only Raft
    /// addresses, and followers name this one when they redirect agents and writes.
    MonitorEndpoint { node: u64, addr: String },
    // ---- Issue 12 item 6 (backup and restore) ----
    /// After a restore, the leader adopts what an agent reports of a VM with a generation
    /// above the committed one (the backup is older than the agents' memory): the VM's
    /// generation becomes `generation`, its host `host`, and it is running there (`running`)
    /// or stopped. Only a higher generation changes anything (else `Unchanged`).
    VmAdopted {
        at_ms: u64,
        uuid: String,
        host: String,
        generation: u64,
        running: bool,
    },
    /// The restored cluster's leader finished adopting (every host reported, or a full lease
    /// passed): later leaders do not wait again.
    RestoreAdopted {
        at_ms: u64,
        message: String,
        /// The hosts not heard from (see [`Restored::silent`]).
        #[serde(default)]
        silent: Vec<String>,
    },
    /// A host of [`Restored::silent`] was heard at last, and what it runs proposed for
    /// adoption before this.
    RestoreHostHeard { at_ms: u64, host: String },
    // ---- Issue 12 item 9 ----
    /// The cluster-wide settings (`state::settings`): with `base_revision` 0 the seed,
    /// taken only while the cluster has none; otherwise an operator's change made against
    /// that revision (`Stale` if another came first), checked against the running
    /// settings (`vigil_common::settings::check_live_change`).
    SetSettings {
        at_ms: u64,
        by: String,
        base_revision: u64,
        settings: vigil_common::settings::ClusterSettings,
    },
}

/// Longest client endpoint a [`StateCommand::MonitorEndpoint`] may record (as the agents'
/// wire limit, [`vigil_common::wire::MAX_LEADER_ADDR_LEN`]).
pub const MAX_MONITOR_ENDPOINT_LEN: usize = vigil_common::wire::MAX_LEADER_ADDR_LEN;

/// Outcome of applying one command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "result")]
pub enum StateResponse {
    Ok,
    /// Nothing changed (for example the tag was already there).
    Unchanged,
    UnknownHost {
        host: String,
    },
    UnknownVm {
        vm: String,
    },
    /// The command was made against an older state (another decision came first); nothing
    /// changed. This is what makes recovery idempotent across leaders.
    Stale {
        reason: String,
    },
    Invalid {
        reason: String,
    },
    Batch {
        results: Vec<StateResponse>,
    },
}

impl StateResponse {
    /// Turns the rejections into an error message for callers.
    pub fn into_result(self) -> Result<StateResponse, String> {
        match self {
            StateResponse::UnknownHost { host } => Err(format!("unknown host {host:?}")),
            StateResponse::UnknownVm { vm } => Err(format!("unknown VM {vm:?}")),
            StateResponse::Stale { reason } => Err(reason),
            StateResponse::Invalid { reason } => Err(reason),
            ok => Ok(ok),
        }
    }
}

use vigil_common::names::validate as validate_name;

/// The whole replicated state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterState {
    pub hosts: BTreeMap<String, HostRecord>,
    /// HA VMs by uuid.
    #[serde(default)]
    pub vms: BTreeMap<String, VmRecord>,
    pub events: VecDeque<Event>,
    pub next_event_id: u64,
    /// Each monitor's client endpoint, by Raft node id, as it wrote it when it last became
    /// leader ([`StateCommand::MonitorEndpoint`]). Absent in older snapshots (and never
    /// written by a one-node cluster).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub monitors: BTreeMap<u64, String>,
    /// Set when this cluster was rebuilt from a backup (`vigil-monitor --restore`); absent
    /// otherwise (and in every older snapshot).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restored: Option<Restored>,
    /// The cluster-wide settings ([`settings::SettingsRecord`]); absent until the first
    /// leader seeds them from its file (and in every older snapshot).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub settings: Option<settings::SettingsRecord>,
}

/// A cluster rebuilt from a backup. A backup is older than the agents' memory: until
/// `adopted`, a leader of this cluster adopts the newest generation any agent reports of
/// each VM before it orders anything (see `engine::leadership`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Restored {
    /// When the restore was done (Unix ms).
    pub at_ms: u64,
    /// When the backup was taken (Unix ms).
    pub backup_created_at_ms: u64,
    /// The Raft log index the backup was taken at, on its source cluster.
    pub backup_log_index: Option<u64>,
    /// A leader heard every host (or waited a full lease) since the restore.
    pub adopted: bool,
    /// Hosts no leader had heard when the adoption ended: until each is heard (and what it
    /// runs adopted) or fenced, no VM is restarted, since one of them may run a copy the
    /// backup does not know of (`engine::leadership::restore_silent_holds`).
    #[serde(default, skip_serializing_if = "std::collections::BTreeSet::is_empty")]
    pub silent: std::collections::BTreeSet<String>,
}

impl ClusterState {
    /// Applies one committed command. Deterministic; rejects invalid commands whole.
    pub fn apply(&mut self, cmd: &StateCommand) -> StateResponse {
        match cmd {
            StateCommand::RegisterHost {
                at_ms,
                name,
                zone,
                cluster,
                agent_version,
            } => {
                for (what, v) in [("host name", name), ("zone", zone), ("cluster", cluster)] {
                    if let Err(reason) = validate_name(what, v) {
                        return StateResponse::Invalid { reason };
                    }
                }
                match self.hosts.get_mut(name) {
                    None => {
                        self.hosts.insert(
                            name.clone(),
                            HostRecord {
                                name: name.clone(),
                                zone: zone.clone(),
                                cluster: cluster.clone(),
                                tags: BTreeSet::new(),
                                registered_at_ms: *at_ms,
                                agent_version: agent_version.clone(),
                                phase: HostPhase::Active,
                                maintenance: false,
                                pools: Vec::new(),
                                addr: None,
                            },
                        );
                        self.push_event(
                            *at_ms,
                            Severity::Info,
                            Some(name.clone()),
                            EventKind::HostRegistered,
                            format!("host {name} registered in zone {zone}, cluster {cluster}"),
                        );
                        StateResponse::Ok
                    }
                    Some(h) => {
                        let moved = h.zone != *zone || h.cluster != *cluster;
                        let changed = moved || h.agent_version != *agent_version;
                        if !changed {
                            return StateResponse::Unchanged;
                        }
                        let old = format!("{}/{}", h.zone, h.cluster);
                        h.zone = zone.clone();
                        h.cluster = cluster.clone();
                        h.agent_version = agent_version.clone();
                        if moved {
                            self.push_event(
                                *at_ms,
                                Severity::Warning,
                                Some(name.clone()),
                                EventKind::HostLocationChanged,
                                format!("host {name} moved from {old} to {zone}/{cluster}"),
                            );
                        }
                        StateResponse::Ok
                    }
                }
            }
            StateCommand::AddTag { at_ms, host, tag } => {
                if let Err(reason) = validate_name("tag", tag) {
                    return StateResponse::Invalid { reason };
                }
                let Some(h) = self.hosts.get_mut(host) else {
                    return StateResponse::UnknownHost { host: host.clone() };
                };
                if !h.tags.insert(tag.clone()) {
                    return StateResponse::Unchanged;
                }
                self.push_event(
                    *at_ms,
                    Severity::Info,
                    Some(host.clone()),
                    EventKind::HostTagAdded { tag: tag.clone() },
                    format!("tag {tag} added to host {host}"),
                );
                StateResponse::Ok
            }
            StateCommand::RemoveTag { at_ms, host, tag } => {
                let Some(h) = self.hosts.get_mut(host) else {
                    return StateResponse::UnknownHost { host: host.clone() };
                };
                if !h.tags.remove(tag) {
                    return StateResponse::Unchanged;
                }
                self.push_event(
                    *at_ms,
                    Severity::Info,
                    Some(host.clone()),
                    EventKind::HostTagRemoved { tag: tag.clone() },
                    format!("tag {tag} removed from host {host}"),
                );
                StateResponse::Ok
            }
            StateCommand::RecordEvent {
                at_ms,
                severity,
                host,
                kind,
                message,
            } => {
                self.push_event(
                    *at_ms,
                    *severity,
                    host.clone(),
                    kind.clone(),
                    message.clone(),
                );
                StateResponse::Ok
            }
            StateCommand::MonitorEndpoint { node, addr } => {
                if *node == 0 {
                    return StateResponse::Invalid {
                        reason: "a monitor's node id is at least 1".into(),
                    };
                }
                if addr.len() > MAX_MONITOR_ENDPOINT_LEN {
                    return StateResponse::Invalid {
                        reason: format!(
                            "monitor endpoint of {} bytes (at most {MAX_MONITOR_ENDPOINT_LEN})",
                            addr.len()
                        ),
                    };
                }
                if let Err(why) = vigil_common::config::check_host_port(addr) {
                    return StateResponse::Invalid {
                        reason: format!("monitor endpoint {addr:?} {why}"),
                    };
                }
                if self.monitors.get(node) == Some(addr) {
                    return StateResponse::Unchanged;
                }
                self.monitors.insert(*node, addr.clone());
                StateResponse::Ok
            }
            StateCommand::SetSettings { .. } => settings::apply(self, cmd),
            StateCommand::Batch { commands } => StateResponse::Batch {
                results: commands.iter().map(|c| self.apply(c)).collect(),
            },
            StateCommand::VmSeen { .. }
            | StateCommand::SetHa { .. }
            | StateCommand::StoreDefinition { .. }
            | StateCommand::VmFailed { .. }
            | StateCommand::OrderStart { .. }
            | StateCommand::VmStarted { .. }
            | StateCommand::VmStopped { .. }
            | StateCommand::OperatorStop { .. }
            | StateCommand::SetAntiAffinity { .. }
            | StateCommand::StaleDestroyed { .. }
            | StateCommand::VmAdopted { .. } => vm::apply(self, cmd),
            StateCommand::RestoreHostHeard { at_ms, host } => match &mut self.restored {
                Some(r) if r.silent.contains(host) => {
                    r.silent.remove(host);
                    let message = format!(
                        "host {host}, silent when the restored cluster's adoption ended, was heard: what it runs is adopted"
                    );
                    self.push_event(
                        *at_ms,
                        Severity::Info,
                        Some(host.clone()),
                        EventKind::RestoreAdopted,
                        message,
                    );
                    StateResponse::Ok
                }
                _ => StateResponse::Unchanged,
            },
            StateCommand::RestoreAdopted {
                at_ms,
                message,
                silent,
            } => match &mut self.restored {
                Some(r) if !r.adopted => {
                    r.adopted = true;
                    r.silent = silent.iter().cloned().collect();
                    self.push_event(
                        *at_ms,
                        Severity::Info,
                        None,
                        EventKind::RestoreAdopted,
                        message.clone(),
                    );
                    StateResponse::Ok
                }
                _ => StateResponse::Unchanged,
            },
            StateCommand::FenceStarted { .. }
            | StateCommand::FenceResult { .. }
            | StateCommand::HostProvenOff { .. }
            | StateCommand::FenceFailed { .. }
            | StateCommand::SetMaintenance { .. }
            | StateCommand::SetHostInfo { .. }
            | StateCommand::HostRejoined { .. }
            | StateCommand::OperatorConfirmedOff { .. }
            | StateCommand::SetHostPlacement { .. } => host::apply(self, cmd),
        }
    }

    fn push_event(
        &mut self,
        at_ms: u64,
        severity: Severity,
        host: Option<String>,
        kind: EventKind,
        message: String,
    ) {
        self.push_vm_event(at_ms, severity, host, None, kind, message);
    }

    /// An event about `host`.
    pub(crate) fn host_event(
        &mut self,
        at_ms: u64,
        severity: Severity,
        host: &str,
        kind: EventKind,
        message: String,
    ) {
        self.push_vm_event(at_ms, severity, Some(host.to_string()), None, kind, message);
    }

    /// An event about the VM `uuid` on `host`.
    pub(crate) fn vm_event(
        &mut self,
        at_ms: u64,
        severity: Severity,
        host: &str,
        uuid: &str,
        kind: EventKind,
        message: String,
    ) {
        let (host, vm) = (Some(host.to_string()), Some(uuid.to_string()));
        self.push_vm_event(at_ms, severity, host, vm, kind, message);
    }

    pub(crate) fn push_vm_event(
        &mut self,
        at_ms: u64,
        severity: Severity,
        host: Option<String>,
        vm: Option<String>,
        kind: EventKind,
        message: String,
    ) {
        let message = clip_message(message);
        let id = self.next_event_id;
        self.next_event_id += 1;
        self.events.push_back(Event {
            id,
            at_ms,
            severity,
            host,
            vm,
            kind,
            message,
        });
        while self.events.len() > EVENT_LOG_CAPACITY {
            self.events.pop_front();
        }
    }
}

/// The longest event message kept, in bytes. Messages quote what agents and fence agents
/// report (a pool's error, a fence agent's output); an agent could send a megabyte there,
/// and the event log keeps thousands of events on every monitor.
pub const MAX_EVENT_MESSAGE_BYTES: usize = 4 * 1024;

/// `message`, cut at a character boundary to at most [`MAX_EVENT_MESSAGE_BYTES`] (with a
/// note of how much was cut) if it is longer.
pub fn clip_message(message: String) -> String {
    if message.len() <= MAX_EVENT_MESSAGE_BYTES {
        return message;
    }
    let note = format!(" … ({} bytes cut)", message.len());
    let mut end = MAX_EVENT_MESSAGE_BYTES - note.len();
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    let cut = message.len() - end;
    format!("{} … ({cut} bytes cut)", &message[..end])
}

/// Host `name`'s registration as the tests write it (zone z1, cluster c1).
#[cfg(test)]
pub(crate) fn registration(at_ms: u64, name: &str) -> StateCommand {
    StateCommand::RegisterHost {
        at_ms,
        name: name.into(),
        zone: "z1".into(),
        cluster: "c1".into(),
        agent_version: "0.1.0".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An agent can put up to a frame (1 MiB) into a pool's error, and every event log
    /// keeps thousands of events on every monitor: an event keeps at most 4 KiB of it.
    #[test]
    fn an_event_quoting_a_megabyte_keeps_4_kib_and_says_what_was_cut() {
        let mut s = ClusterState::default();
        let long = format!("pool down: {}", "é".repeat(512 * 1024));
        s.apply(&StateCommand::RecordEvent {
            at_ms: 1,
            severity: Severity::Warning,
            host: Some("hv1".into()),
            kind: EventKind::HostRegistered,
            message: long.clone(),
        });
        let kept = &s.events.back().expect("event").message;
        assert!(kept.len() <= MAX_EVENT_MESSAGE_BYTES, "{}", kept.len());
        assert!(kept.starts_with("pool down: é"));
        let cut = long.len() - kept.split(" … (").next().map_or(0, str::len);
        assert!(
            kept.ends_with(&format!("({cut} bytes cut)")),
            "{}",
            &kept[kept.len() - 40..]
        );
        assert_eq!(clip_message("short".into()), "short");
    }

    fn register(name: &str) -> StateCommand {
        registration(1, name)
    }

    /// Events stored before the self-fence episode was kept still load (and the episode
    /// does not collide with the event's own `id` when flattened).
    #[test]
    fn a_self_fenced_event_with_or_without_its_episode_loads() {
        let old = r#"{"id":7,"at_ms":1,"severity":"critical","host":"hv1","kind":"host_self_fenced","message":"m"}"#;
        let e: Event = serde_json::from_str(old).expect("old event");
        assert_eq!(e.kind, EventKind::HostSelfFenced { episode: None });
        let new = serde_json::to_value(Event {
            kind: EventKind::HostSelfFenced { episode: Some(9) },
            ..e
        })
        .expect("json");
        assert_eq!(
            (new["id"].as_u64(), new["episode"].as_u64()),
            (Some(7), Some(9))
        );
    }

    #[test]
    fn register_then_tag_then_untag() {
        let mut s = ClusterState::default();
        assert_eq!(s.apply(&register("hv1")), StateResponse::Ok);
        assert_eq!(s.apply(&register("hv1")), StateResponse::Unchanged);
        let add = StateCommand::AddTag {
            at_ms: 2,
            host: "hv1".into(),
            tag: "ha".into(),
        };
        assert_eq!(s.apply(&add), StateResponse::Ok);
        assert_eq!(s.apply(&add), StateResponse::Unchanged);
        assert!(s.hosts["hv1"].tags.contains("ha"));
        let rm = StateCommand::RemoveTag {
            at_ms: 3,
            host: "hv1".into(),
            tag: "ha".into(),
        };
        assert_eq!(s.apply(&rm), StateResponse::Ok);
        assert!(s.hosts["hv1"].tags.is_empty());
        let kinds: Vec<_> = s.events.iter().map(|e| e.kind.clone()).collect();
        assert_eq!(
            kinds,
            vec![
                EventKind::HostRegistered,
                EventKind::HostTagAdded { tag: "ha".into() },
                EventKind::HostTagRemoved { tag: "ha".into() },
            ]
        );
        assert_eq!(s.events.iter().map(|e| e.id).collect::<Vec<_>>(), [0, 1, 2]);
    }

    #[test]
    fn monitor_endpoints_are_validated_and_old_states_load() {
        let mut s = ClusterState::default();
        let ep = |node: u64, addr: &str| StateCommand::MonitorEndpoint {
            node,
            addr: addr.into(),
        };
        assert_eq!(s.apply(&ep(2, "10.0.0.2:7440")), StateResponse::Ok);
        assert_eq!(s.apply(&ep(2, "10.0.0.2:7440")), StateResponse::Unchanged);
        assert_eq!(s.apply(&ep(2, "mon2.example:7440")), StateResponse::Ok);
        assert_eq!(s.monitors[&2], "mon2.example:7440");
        for bad in [
            ep(0, "10.0.0.1:7440"),
            ep(3, "nope"),
            ep(3, &format!("{}:1", "a".repeat(300))),
        ] {
            assert!(
                matches!(s.apply(&bad), StateResponse::Invalid { .. }),
                "{bad:?}"
            );
        }
        assert_eq!(s.monitors.len(), 1);
        // No event: a leader's own endpoint is bookkeeping, not news.
        assert!(s.events.is_empty());
        // A snapshot from before issue 12 item 3 (no `monitors`) loads; an empty map is not
        // written, so a one-node cluster's snapshots stay as they were.
        let old = serde_json::to_string(&ClusterState::default()).expect("json");
        assert!(!old.contains("monitors"), "{old}");
        let back: ClusterState = serde_json::from_str(&old).expect("old snapshot");
        assert!(back.monitors.is_empty());
        let json = serde_json::to_string(&s).expect("json");
        let back: ClusterState = serde_json::from_str(&json).expect("roundtrip");
        assert_eq!(back, s);
    }

    #[test]
    fn only_an_operator_placement_moves_a_host() {
        let mut s = ClusterState::default();
        s.apply(&register("hv1"));
        let place = |zone: &str| StateCommand::SetHostPlacement {
            at_ms: 2,
            host: "hv1".into(),
            zone: zone.into(),
            cluster: "c9".into(),
            by: "alice".into(),
        };
        assert_eq!(s.apply(&place("z2")), StateResponse::Ok);
        assert_eq!(
            (
                s.hosts["hv1"].zone.as_str(),
                s.hosts["hv1"].cluster.as_str()
            ),
            ("z2", "c9")
        );
        assert_eq!(s.apply(&place("z2")), StateResponse::Unchanged);
        let last = s.events.back().expect("event");
        assert_eq!(last.kind, EventKind::HostLocationChanged);
        assert!(
            last.message
                .contains("operator alice moved host hv1 from z1/c1 to z2/c9"),
            "{}",
            last.message
        );
        assert!(matches!(
            s.apply(&place("bad zone")),
            StateResponse::Invalid { .. }
        ));
        let unknown = StateCommand::SetHostPlacement {
            at_ms: 3,
            host: "nope".into(),
            zone: "z".into(),
            cluster: "c".into(),
            by: "alice".into(),
        };
        assert!(matches!(
            s.apply(&unknown),
            StateResponse::UnknownHost { .. }
        ));
    }

    #[test]
    fn rejected_commands_change_nothing() {
        let mut s = ClusterState::default();
        s.apply(&register("hv1"));
        let before = s.clone();
        let bad_tag = StateCommand::AddTag {
            at_ms: 2,
            host: "hv1".into(),
            tag: "has space".into(),
        };
        assert!(matches!(s.apply(&bad_tag), StateResponse::Invalid { .. }));
        let unknown = StateCommand::AddTag {
            at_ms: 2,
            host: "nope".into(),
            tag: "ha".into(),
        };
        assert_eq!(
            s.apply(&unknown),
            StateResponse::UnknownHost {
                host: "nope".into()
            }
        );
        let mut bad_host = register("");
        if let StateCommand::RegisterHost { name, .. } = &mut bad_host {
            *name = "a/b".into();
        }
        assert!(matches!(s.apply(&bad_host), StateResponse::Invalid { .. }));
        assert_eq!(s, before);
    }

    #[test]
    fn moving_a_host_is_recorded() {
        let mut s = ClusterState::default();
        s.apply(&register("hv1"));
        let moved = StateCommand::RegisterHost {
            at_ms: 5,
            name: "hv1".into(),
            zone: "z2".into(),
            cluster: "c1".into(),
            agent_version: "0.1.0".into(),
        };
        assert_eq!(s.apply(&moved), StateResponse::Ok);
        assert_eq!(s.hosts["hv1"].zone, "z2");
        assert_eq!(
            s.events.back().map(|e| e.kind.clone()),
            Some(EventKind::HostLocationChanged)
        );
    }

    #[test]
    fn event_log_is_bounded() {
        let mut s = ClusterState::default();
        for i in 0..(EVENT_LOG_CAPACITY as u64 + 10) {
            s.apply(&StateCommand::RecordEvent {
                at_ms: i,
                severity: Severity::Info,
                host: None,
                kind: EventKind::LeaderElected { term: i, node: 1 },
                message: String::new(),
            });
        }
        assert_eq!(s.events.len(), EVENT_LOG_CAPACITY);
        assert_eq!(s.events.front().map(|e| e.id), Some(10));
    }

    #[test]
    fn serde_roundtrip_is_lossless() {
        let mut s = ClusterState::default();
        s.apply(&register("hv1"));
        let json = serde_json::to_string(&s).expect("serialize");
        let back: ClusterState = serde_json::from_str(&json).expect("deserialize");
        assert_eq!(s, back);
    }
}
