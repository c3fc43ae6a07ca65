//! The JSON documents of the admin API, shared by the monitor (which fills them) and
//! `vigilctl` (which prints them). Adding a field is compatible; renaming one is not.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};
use vigil_common::wire::HostFacts;

use crate::detector::Liveness;
use crate::state::Event;

/// One monitor server, as in OpenNebula's `onezone show`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServerView {
    pub id: u64,
    pub addr: String,
    /// leader, follower, candidate, learner, or unknown (not reported by the leader).
    pub state: String,
    pub term: Option<u64>,
    /// Last log index this server holds (for peers: the index the leader knows it matched).
    pub index: Option<u64>,
    /// Last committed and applied index.
    pub commit: Option<u64>,
    pub voter: bool,
    /// Log entries it is behind the leader's last one (known to the leader only, so `None`
    /// in a follower's answer).
    #[serde(default)]
    pub lag: Option<u64>,
}

/// `vigilctl server list`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServersView {
    /// The node that answered.
    pub node: u64,
    pub leader: Option<u64>,
    pub term: u64,
    pub servers: Vec<ServerView>,
}

/// The outcome of `vigilctl server add|del`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServerChangeView {
    /// "ok" or "unchanged".
    pub result: String,
    pub message: String,
}

/// `vigilctl config show|get` (issue 12 item 9).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConfigView {
    /// The node that answered.
    pub node: u64,
    /// The cluster's settings as `monitor.toml` sections, secrets hidden; before the first
    /// leader seeded them, the answering monitor's own file's.
    pub toml: String,
    /// Every key with its value as TOML (`recovery.ha_tag` → `"ha"`).
    pub values: std::collections::BTreeMap<String, String>,
    /// 0: the cluster has no settings yet (they are the answering monitor's file's).
    pub revision: u64,
    /// Who made the last change (`monitor 1's file` for the seed, `admin:alice`) and when
    /// (Unix ms).
    pub by: Option<String>,
    pub at_ms: Option<u64>,
    /// Where the answering monitor's own file differs from the cluster (its file's values
    /// are not used; align the file, or change the cluster with `config set`).
    pub file_differs: Vec<vigil_common::settings::SettingChange>,
}

/// The outcome of `vigilctl config set|unset`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConfigChangeView {
    /// "ok" or "unchanged".
    pub result: String,
    /// The revision now in force.
    pub revision: u64,
    /// What changed (as the event log has it).
    pub changes: Vec<vigil_common::settings::SettingChange>,
}

/// `vigilctl status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusView {
    /// The node that answered.
    pub node: u64,
    pub leader: Option<u64>,
    pub term: u64,
    pub servers: Vec<ServerView>,
    /// N+k per cluster (computed by the leader every 30 s; empty until then or on a follower).
    #[serde(default)]
    pub capacity: Vec<crate::engine::ClusterCapacity>,
    pub hosts_total: usize,
    pub hosts_up: usize,
    pub hosts_suspect: usize,
    pub hosts_down: usize,
    pub hosts_unknown: usize,
    /// Agents connected to the answering monitor.
    pub agents_connected: usize,
    /// Heartbeats the answering monitor received since it started.
    pub heartbeats_total: u64,
    pub version: String,
    /// Hosts being fenced or fenced (waiting to rejoin), and in maintenance.
    #[serde(default)]
    pub hosts_fencing: usize,
    #[serde(default)]
    pub hosts_fenced: usize,
    #[serde(default)]
    pub hosts_maintenance: usize,
    /// HA VMs waiting to start (backoff: no host, no proof or no tagged host yet) or starting.
    #[serde(default)]
    pub vms_waiting: usize,
    #[serde(default)]
    pub vms_recovering: usize,
    /// HA VMs Vigil gave up on (restart budget spent).
    #[serde(default)]
    pub vms_gave_up: usize,
    /// Certificates this monitor saw that expire within 30 days, or were refused as expired
    /// (issue 10 item 5).
    #[serde(default)]
    pub certificates: Vec<CertView>,
    /// The answering monitor's `[vip]` and whether it holds it (`None`: no `[vip]` there).
    #[serde(default)]
    pub vip: Option<VipView>,
}

/// The floating VIP as the answering monitor sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VipView {
    pub address: String,
    pub interface: String,
    /// Whether the answering monitor has the address on its interface now.
    pub held: bool,
}

/// A certificate near or past its expiry, as the answering monitor saw it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CertView {
    /// agent, monitor, admin or viewer.
    pub role: String,
    pub name: String,
    pub serial: String,
    pub not_after_ms: u64,
    /// Whole days left (negative: expired).
    pub days_left: i64,
    pub expired: bool,
    /// Refused at the handshake (expired): its holder cannot connect.
    pub refused: bool,
}

/// One host, merging the replicated record with the leader's liveness view.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostView {
    pub name: String,
    pub zone: String,
    pub cluster: String,
    pub tags: BTreeSet<String>,
    pub liveness: Liveness,
    /// Milliseconds since its last heartbeat (`None`: none since this monitor became leader).
    pub last_heartbeat_ms_ago: Option<u64>,
    pub connected: bool,
    pub agent_version: String,
    pub registered_at_ms: u64,
    pub facts: Option<HostFacts>,
    /// The agent's view of its hypervisor (`None`: no inventory received yet).
    #[serde(default)]
    pub hypervisor: Option<vigil_common::domain::HypervisorHealth>,
    /// Fencing phase (replicated): active, fencing, fenced (with the proof).
    #[serde(default)]
    pub phase: crate::state::HostPhase,
    /// In maintenance (drained, takes no VMs).
    #[serde(default)]
    pub maintenance: bool,
    /// The leader's reading of the host (alive, investigating, isolated, agent-down, dead).
    #[serde(default)]
    pub condition: Option<crate::investigation::Condition>,
    /// Each storage pool's state as the host last reported it.
    #[serde(default)]
    pub pools: Vec<vigil_common::wire::PoolStatus>,
}

/// `vigilctl events`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventsView {
    pub events: Vec<Event>,
}

/// `vigilctl host ping`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PingView {
    pub host: String,
    pub rtt_us: u64,
}

/// A write's outcome (`host tag add|rm`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WriteView {
    /// "ok" or "unchanged".
    pub result: String,
}

/// The outcome of an operator's fencing command (`host fence`, `host confirm-off`,
/// `fencing release`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OperatorView {
    /// "started" (fence agent running), "ok", "unchanged" or "released".
    pub result: String,
    /// What happens now, for people.
    pub message: String,
    /// Who did it (the admin certificate's name), as recorded in the event log.
    pub by: String,
}

/// One VM: what its host's agent reports merged with its HA record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmView {
    pub uuid: String,
    pub name: String,
    /// Where it runs (reported), or where Vigil last placed it.
    pub host: Option<String>,
    /// libvirt state as reported, `None` if no agent reports it.
    pub state: Option<vigil_common::domain::DomainState>,
    pub reason: Option<vigil_common::domain::StateReason>,
    pub vcpus: u32,
    pub memory_kib: u64,
    pub ha: bool,
    pub ha_source: Option<crate::state::HaSource>,
    pub priority: i32,
    pub generation: u64,
    /// Running generation as reported by the agent (domain metadata).
    pub reported_generation: Option<u64>,
    /// Recovery phase (HA VMs): running, stopped, backoff, recovering, gave-up.
    pub phase: Option<String>,
    pub phase_detail: Option<crate::state::Phase>,
    pub definition_stored: bool,
    pub failures_in_window: usize,
    pub last_recovery: Option<crate::state::RecoveryRecord>,
    /// Anti-affinity group, if any.
    #[serde(default)]
    pub anti_affinity: Option<String>,
}

// --- issue 10 item 7 (scale): paged answers ---

/// One page of `vigilctl vm list` ([`vigil_common::wire::AdminRequest::VmListPage`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmPage {
    /// VMs in uuid order.
    pub vms: Vec<VmView>,
    /// Ask again with `after` set to this to get the next page; `None`: this was the last.
    pub next: Option<String>,
}

/// One page of `vigilctl host list` ([`vigil_common::wire::AdminRequest::HostListPage`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostPage {
    /// Hosts in name order.
    pub hosts: Vec<HostView>,
    /// Ask again with `after` set to this to get the next page; `None`: this was the last.
    pub next: Option<String>,
}

/// One page of `vigilctl events` ([`vigil_common::wire::AdminRequest::EventsPage`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventsPage {
    /// Oldest first.
    pub events: Vec<Event>,
    /// The page stopped before `limit` to stay within a frame: older events start below
    /// this id. `None`: nothing more matched (or `limit` was reached).
    pub next_before: Option<u64>,
}

/// `vigilctl plan --fail H[,H]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanView {
    /// The hosts the plan fails.
    pub failed: Vec<String>,
    /// Every HA VM of those hosts, in the order a real failure places them.
    pub vms: Vec<crate::engine::PlannedVm>,
}
