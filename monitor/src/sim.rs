//! A deterministic simulator of a Vigil cluster around the *real* decision core.
//!
//! Compare Proxmox's pve-ha-manager `src/test/`: a scenario is a timed list of faults, the
//! output is the replicated event log, and a golden file says what it must be. The simulator
//! runs [`Engine`] and [`ClusterState`] exactly as the monitor does (proposals are applied in
//! order, as Raft would commit them, followed by an `Applied` input), with simulated agents
//! that heartbeat, report inventories and lifecycle events, and carry out start orders with
//! the same generation guard as the real agent. Time is simulated, so thousands of seeded
//! random runs are cheap; after every step the simulator checks the one rule: no VM ever runs
//! on two hosts at once.
//!
//! Scenario files (`monitor/tests/scenarios/*.scn`, every directive and fault explained in
//! `monitor/tests/scenarios/README.md`), one directive a line, `#` comments:
//!
//! ```text
//! policy max_restarts_in_place=3 max_relocations=2 window_ms=600000 backoff_initial_ms=1000
//! host hv1 cluster=c1 zone=z1
//! vm u1 host=hv1 priority=5          # an HA VM running on hv1
//! at 1000 crash-vm u1                # qemu dies: the agent reports STOPPED (crashed)
//! at 2000 crash-on-start u1 on       # from now on every start of u1 dies at once
//! at 3000 guest-shutdown u1
//! at 4000 destroy u1                 # an operator's virsh destroy
//! at 5000 kill-agent hv1             # the agent process dies (guests keep running); systemd
//!                                    # restarts it 1 s later (Restart=always), as deployed
//! at 6000 start-agent hv1
//! at 7000 start-fails hv1 on         # libvirt refuses starts on hv1
//! at 8000 drop-answers hv1 on        # start answers from hv1 are lost
//! at 9000 new-leader                 # leadership moves: fresh soft state, same log
//! at 9500 crash-host hv2             # power loss: agent and every domain of hv2 gone
//! at 9600 partition hv2              # hv2 cut from the monitor; its domains keep running
//! at 9700 heal hv2
//! at 9800 power-on hv2               # back, empty (no domain running)
//! at 9900 fence-fails hv2 on         # its BMC does not answer
//! at 9950 storage-fault hv2 on       # hv2 loses the shared pool (others keep it)
//! at 9960 storage-outage on          # the pool fails for every host and the monitor
//! at 9970 monitors-down              # every monitor stops (agents keep running)
//! at 9980 monitors-up                # they come back (a new leader)
//! at 9990 maintenance hv1 on         # an operator puts hv1 in maintenance (drain)
//! at 9995 stale-ack hv2 on           # hv2's agent acknowledges fence requests without
//!                                    # destroying anything (an agent trusting an empty cache)
//! at 9991 confirm-off hv2 by=alice   # vigilctl host confirm-off hv2 (admin "alice")
//! at 9992 fence hv2 by=bob [force]   # vigilctl host fence hv2 [--force]
//! at 9993 release-hold by=carol [cluster=c1]  # vigilctl fencing release [--cluster c1]
//! at 9994 config-set recovery.ha_tag ha by=dave  # vigilctl config set (config-unset KEY by=A: unset)
//! at 9995 monitor-restart 1500 hv1   # a new leader; hv1's agent reconnects only 1500 ms
//!                                    # later (every agent's when none is named)
//! at 9996 reorder-reports hv1 on     # hv1's listings reach the monitor 400 ms late, after
//!                                    # newer events and answers
//! at 9996 reorder-reports hv1 on all # hv1's listings, lifecycle events and command answers
//!                                    # each 0-400 ms late, varying report by report
//! at 9997 quorum-stall on            # the leader's probes go unanswered: its leader lease runs out
//! at 9998 leader-crash               # the leader monitor dies (with `monitors 3`: another is elected)
//! at 9998 partition-leader on hosts  # the leader cut from the other monitors (and the hosts)
//! at 9999 when fencing hv2 leader-crash   # the fault, once hv2 is being fenced
//! at 9999 when recovering u1 partition-leader on  # ... once a restart of u1 is ordered
//! run 20000                          # simulate until this time
//!
//! `monitors N` runs N monitors, each with its own [`Engine`] and the real leader lease
//! (`raft::leader_lease::LeaseClock`, followed through `service::follow_lease`); the default,
//! 1, is a sole voter as before. `host NAME [cluster=C] [zone=Z] [tags=a,b] [fence=yes|no] [mem_gib=N] [fence_ms=N]` declares a host
//! (fence agent configured by default, 16 GiB free); `failover ha_tag=T fallback=any|wait mass_failure_percent=P
//! mass_failure_window_ms=N storage_slot=yes|no` sets host-failure handling; `vm U host=H group=G` puts a VM in an
//! anti-affinity group, `vm U host=H pools=none|P` says which pools its disks are on (default:
//! unknown, i.e. every pool); `watchdog MS|none` sets every agent's host watchdog (default
//! 2500 ms); `storage pool=NAME` gives every host
//! and the monitor one shared pool (default: none); `lease duration_ms=N margin_ms=N
//! response=self-fence|keep-running` sets the leases.
//! ```
//!
//! Simulated agents follow the real agent's rules: they hold a lease renewed by the
//! leader's grants, write a storage heartbeat, obey fence requests in their storage slot,
//! and fence themselves when their lease runs out while the leader record is fresh or the
//! storage is unreachable (see `vigil_agent::isolation`).

use std::collections::{BTreeMap, BTreeSet};

use vigil_common::config::{
    DetectorConfig, IsolationResponse, LeaseConfig, RecoveryConfig, TagFallback,
};
use vigil_common::domain::{
    DomainEvent, DomainInfo, DomainState, HypervisorHealth, LifecycleKind, StateReason, VigilMeta,
    RAW_EVENT_STOPPED,
};
use vigil_common::generation_guard::{
    admit_order, stale_verdict, start_verdict, LocalCopy, StaleVerdict, StartVerdict,
};
use vigil_common::storage::{FenceAck, FenceRequest, LeaderRecord, StorageHeartbeat};
use vigil_common::wire::{AgentCommand, CommandOutcome, HostFacts, MonitorToAgent, PoolStatus};

use crate::agent_link::CommandError;
use crate::engine::{
    Action, Beat, CommandAnswer, DefinitionReport, Engine, FailoverConfig, Hello, Input,
    LifecycleReport, Listing, SelfFenceReport, StaleCopyDestroyed, StorageCycle,
};
use crate::fencing::{FenceAction, FenceError, FenceFailure};
use crate::raft::leader_lease::{probe_due, LeaseClock, LeaseView};
use crate::service::{follow_lease, LeaseChange, LeaseFollower};
use crate::state::{ClusterState, HostPhase, Phase, StateCommand};

/// Wall-clock offset: simulated time 0 is this Unix ms (keeps timestamps plausible).
const WALL0: u64 = 1_800_000_000_000;
/// Simulation step.
const STEP_MS: u64 = 10;
/// A QUIC session survives this long without packets (the transport's idle timeout).
const SESSION_IDLE_MS: u64 = 1_500;
/// systemd restarts a dead agent this long after it died (the packaged unit's `RestartSec`).
const SYSTEMD_RESTART_MS: u64 = 1_000;
/// Time a simulated domain start takes.
const START_MS: u64 = 200;
/// With `reorder-reports`, a host's listings reach the monitor this late (after the answer
/// to a start that completed meanwhile); with `reorder-reports H on all`, each of its
/// reports is up to this late (see [`scrambled_delay`]).
const REORDER_DELAY_MS: u64 = 400;

/// Which of a host's reports reach the monitor late (`reorder-reports`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reorder {
    Off,
    /// Listings, [`REORDER_DELAY_MS`] late (after newer events and answers).
    Listings,
    /// Listings, lifecycle events and command answers, each late by its own
    /// [`scrambled_delay`]: any of them can overtake any other, older or newer.
    All,
}

/// With [`Reorder::All`], how late the report with observation number `seq` arrives: 0 to
/// [`REORDER_DELAY_MS`] in steps, a fixed scramble of the number (deterministic, and
/// neighbouring reports get unrelated delays).
fn scrambled_delay(seq: u64) -> u64 {
    let steps = REORDER_DELAY_MS / STEP_MS + 1;
    STEP_MS * ((seq.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40) % steps)
}
/// The leader lease each answered probe gives (`raft::leader_lease`'s `L`).
const LEADER_LEASE_MS: u64 = 300;
/// A `when` fault whose condition does not hold within this long after its time is dropped.
const WHEN_WAIT_MS: u64 = 10_000;
/// Followers that hear no leader for this long elect another (within openraft's election
/// timeout range, scaled like the rest of the simulator).
const ELECTION_TIMEOUT_MS: u64 = 500;
/// A crashed monitor is back (systemd, then Raft catching up) this long after it died.
const MONITOR_RESTART_MS: u64 = 2_000;
/// An agent whose session ended (its monitor died, stepped down, or closed it) dials again
/// this long after (its backoff and jitter, `vigil_agent::follow`).
const AGENT_REDIAL_MS: u64 = 200;

/// One monitor process: its own engine, its own leader lease (the real [`LeaseClock`]), and
/// what its service task and storage worker keep.
#[derive(Debug, Clone)]
struct SimMonitor {
    /// Node id (in golden logs: "monitor node N became leader").
    node: u64,
    engine: Engine,
    clock: LeaseClock,
    /// What the lease task last published (its watch channel only sends changes).
    published: LeaseView,
    /// What the service task remembers of the lease ([`follow_lease`]).
    follower: LeaseFollower,
    /// The storage worker's `set_leader`: the record it writes, if any.
    storage_leader: Option<(u64, u64)>,
    /// The engine's last `LeaderRecord` (sim ms, condemned, hold), as `publish_record` keeps it.
    record_published: Option<(u64, Vec<String>, bool)>,
    alive: bool,
    /// systemd brings a crashed monitor back at this time.
    restart_at: Option<u64>,
    /// Cut from the other monitors (`partition-leader`): it hears no quorum.
    cut: bool,
    /// Cut from the hosts too (`partition-leader on hosts`), since `cut_at` (sim ms).
    cut_hosts: bool,
    cut_at: u64,
    /// The term Raft says this node leads in (openraft never steps a cut-off leader down: it
    /// keeps this until it hears the higher term).
    raft_leading: Option<u64>,
    /// The lease task's probe schedule.
    next_probe_ms: u64,
    /// While cut off: the replicated state as far as it had applied it (nothing reaches it).
    stale_state: Option<ClusterState>,
    /// A proposal of this monitor failed to commit and the log said so (until one commits).
    uncommitted_noted: bool,
    /// Its proposals waiting for a quorum, in order (its proposer's writes in flight).
    backlog: Vec<StateCommand>,
}

/// A short label of a proposal for the fault log: an event's message, else its kind.
fn proposal_label(cmd: &StateCommand) -> String {
    match cmd {
        StateCommand::RecordEvent { message, .. } => format!("event {message:?}"),
        other => {
            let text = format!("{other:?}");
            let end = text.find([' ', '{', '(']).unwrap_or(text.len());
            text[..end].to_string()
        }
    }
}

#[derive(Debug, Clone)]
struct SimDomain {
    running: bool,
    generation: u64,
    reason: StateReason,
}

#[derive(Debug, Clone)]
struct SimHost {
    zone: String,
    cluster: String,
    /// Powered on (a crash or a fence turns it off).
    powered: bool,
    /// Cut from the monitor (processes keep running).
    partitioned: bool,
    fence_fails: bool,
    agent_alive: bool,
    start_fails: bool,
    drop_answers: bool,
    domains: BTreeMap<String, SimDomain>,
    /// Newest generation per VM the agent has seen (the agent's durable table).
    newest: BTreeMap<String, u64>,
    /// Highest generation per VM the agent has started (each activates at most once).
    started: BTreeMap<String, u64>,
    /// The monitor the agent has a session with (its index), if any.
    session: Option<usize>,
    /// Agent process id (changes on every agent start) and when it started.
    instance: u64,
    agent_started_at: u64,
    /// The heartbeat interval its monitor told it (welcome, then `Tuning`), and when it
    /// beats next.
    beat_every_ms: u64,
    next_beat_at: u64,
    /// End of the agent's lease (sim ms) and when it last got a grant.
    lease_until: u64,
    last_grant: Option<u64>,
    /// This host's view of the shared pool.
    storage_ok: bool,
    /// The latest storage heartbeat it wrote.
    storage_hb: Option<StorageHeartbeat>,
    /// Fence request in its slot, and the acknowledgement it wrote.
    slot: Option<FenceRequest>,
    ack: Option<FenceAck>,
    /// Reports queued while it was cut off (delivered on reconnect, before the inventory).
    queued: Vec<Input>,
    /// The last self-fence reason (to report once per episode).
    fenced_reason: Option<String>,
    /// The agent does not try to connect before this time (its reconnect backoff).
    reconnect_after: u64,
    /// systemd restarts a killed agent at this time (`Restart=always`, `RestartSec=1`).
    restart_at: Option<u64>,
    /// The agent has fenced itself and says so in its storage heartbeat.
    self_fenced: bool,
    /// When its current partition began.
    partitioned_at: Option<u64>,
    /// The host watchdog: `Some(last feed)` while armed. Not fed for the scenario's
    /// watchdog timeout, it powers the host off.
    watchdog_fed: Option<u64>,
    /// The agent speaks another protocol version: it reaches the monitor, which refuses it.
    incompatible: bool,
    /// When a monitor last refused it for that (what the real agent notes through
    /// `SessionError::unmanaged_reason`).
    unmanaged_at: Option<u64>,
    /// The agent acknowledges fence requests from an empty cache: destroys nothing.
    stale_ack: bool,
    /// The agent's fencing episode (id, since when): it refuses starts until a grant.
    episode: Option<(u64, u64)>,
    /// The newest term the agent saw in a leader record, and the requests withdrawn.
    known_term: u64,
    withdrawn: BTreeSet<u64>,
    /// The agent process's observation counter (listings, events, answers).
    obs_seq: u64,
    /// Which of its reports reach the monitor late (`reorder-reports`).
    reorder: Reorder,
}

#[derive(Debug, Clone)]
enum Fault {
    CrashVm(String),
    CrashOnStart(String, bool),
    GuestShutdown(String),
    Destroy(String),
    KillAgent(String),
    /// The agent dies and stays dead (stopped, crash-looping, start limit hit).
    KillAgentForGood(String),
    /// The agent and the monitors speak different protocol versions (an upgrade).
    VersionMismatch(String, bool),
    StartAgent(String),
    StartFails(String, bool),
    DropAnswers(String, bool),
    NewLeader,
    CrashHost(String),
    PowerOn(String),
    Partition(String),
    Heal(String),
    FenceFails(String, bool),
    HostStorage(String, bool),
    StorageOutage(bool),
    MonitorsDown,
    MonitorsUp,
    /// `vigilctl db backup`: a copy of the committed state as it is now (the last one taken
    /// is the one `restore` uses).
    Backup,
    /// Every monitor's data is wiped and the cluster is rebuilt from the last `backup`
    /// (`vigil-monitor --restore`): the monitors go down (if they are not), the state becomes
    /// the backup's, and they come back as after `monitors-up`.
    Restore,
    Maintenance(String, bool),
    StaleAck(String, bool),
    /// `vigilctl host confirm-off HOST` by an admin.
    ConfirmOff(String, String),
    /// `vigilctl host fence HOST [--force]` by an admin.
    OperatorFence(String, String, bool),
    /// `vigilctl fencing release [--cluster C]` by an admin.
    ReleaseHold(Option<String>, String),
    /// `vigilctl config set KEY VALUE` (`Some`) or `config unset KEY` (`None`), by an admin.
    ConfigSet(String, Option<String>, String),
    /// A new leader; the listed agents (all when none is listed) reconnect only this many
    /// ms later, the others after 200 ms.
    MonitorRestart(u64, Vec<String>),
    /// `reorder-reports H on|off`: H's listings arrive late (off: no report does).
    ReorderReports(String, bool),
    /// `reorder-reports H on|off all`: H's listings, lifecycle events and command answers
    /// arrive late, each by its own delay (off: no report does).
    ReorderAllReports(String, bool),
    QuorumStall(bool),
    /// `vigilctl plan --fail H[,H]`: logged, and every start ordered later for a VM the plan
    /// placed must go to the planned host (else a PLAN MISMATCH violation).
    Plan(Vec<String>),
    /// The leader monitor's process dies; the others elect a new leader after an election
    /// timeout; systemd brings it back (a follower) [`MONITOR_RESTART_MS`] later.
    LeaderCrash,
    /// `partition-leader on [hosts]`: the leader is cut from the other monitors (and with
    /// `hosts` from every host too) and keeps running; `off`: healed.
    PartitionLeader(bool, bool),
    /// `when fencing H FAULT` / `when recovering U FAULT`: the fault, at the first step at or
    /// after its time at which the committed state shows H being fenced (U recovering).
    When(Trigger, Box<Fault>),
}

/// What a `when` fault waits for, in the committed state.
#[derive(Debug, Clone)]
enum Trigger {
    /// The host is being fenced (`HostPhase::Fencing`).
    Fencing(String),
    /// The VM is being recovered: a start is ordered (committed) and not yet seen running.
    Recovering(String),
}

/// How long a simulated fence agent run takes unless the host says `fence_ms=N`.
const DEFAULT_FENCE_MS: u64 = 300;

/// The "monitor" of a fence agent run whose monitor crashed meanwhile.
const ORPHANED: usize = usize::MAX;

/// A parsed scenario.
#[derive(Debug, Clone, Default)]
pub struct Scenario {
    policy: RecoveryConfig,
    failover: FailoverConfig,
    /// name, zone, cluster, tags, fence configured
    hosts: Vec<(String, String, String, Vec<String>, bool)>,
    vms: Vec<(String, String, i32)>,
    /// The pools each VM's disks are on, when the scenario says (else unknown).
    vm_pools: BTreeMap<String, Vec<String>>,
    /// Anti-affinity groups of VMs.
    groups: Vec<(String, String)>,
    /// Free memory per host (GiB) when not the default 16.
    memory_gib: BTreeMap<String, u64>,
    /// How long a fence agent run against a host takes, when not [`DEFAULT_FENCE_MS`].
    fence_ms: BTreeMap<String, u64>,
    faults: Vec<(u64, Fault)>,
    until: u64,
    pool: Option<String>,
    lease: LeaseConfig,
    /// The agents' host watchdog timeout (`None`: no watchdog on any host).
    watchdog_ms: Option<u64>,
    /// Monitors (`monitors N`; default 1: a sole voter, as every scenario before issue 12).
    monitors: usize,
}

/// A scenario file that does not parse; names the line.
#[derive(Debug, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct ScenarioError {
    pub line: usize,
    pub message: String,
}

fn kv(words: &[&str]) -> BTreeMap<String, String> {
    words
        .iter()
        .filter_map(|w| w.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

impl Scenario {
    pub fn parse(text: &str) -> Result<Scenario, ScenarioError> {
        let mut sc = Scenario {
            until: 10_000,
            monitors: 1,
            ..Scenario::default()
        };
        sc.failover.mass_failure_percent = 30;
        // Longer than any agent absence the scenarios model (systemd restarts in 1 s).
        sc.watchdog_ms = Some(2_500);
        sc.failover.mass_failure_window_ms = 60_000;
        sc.failover.storage_slot = true;
        sc.policy.vcpu_overcommit = 4;
        sc.failover.probe_port = 22;
        // Scaled to the simulator's fast detector (down after 600 ms).
        sc.lease = LeaseConfig {
            duration_ms: 2_000,
            drift_margin_ms: 500,
            isolation_response: IsolationResponse::SelfFence,
        };
        for (i, raw) in text.lines().enumerate() {
            let line = raw.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let err = |m: String| ScenarioError {
                line: i + 1,
                message: m,
            };
            let w: Vec<&str> = line.split_whitespace().collect();
            let num = |s: &str| -> Result<u64, ScenarioError> {
                s.parse().map_err(|_| err(format!("{s:?} is not a number")))
            };
            match w.as_slice() {
                ["policy", rest @ ..] => {
                    for (k, v) in kv(rest) {
                        let n = num(&v)?;
                        match k.as_str() {
                            "max_restarts_in_place" => sc.policy.max_restarts_in_place = n as u32,
                            "max_relocations" => sc.policy.max_relocations = n as u32,
                            "window_ms" => sc.policy.window_ms = n,
                            "backoff_initial_ms" => sc.policy.backoff_initial_ms = n,
                            "backoff_max_ms" => sc.policy.backoff_max_ms = n,
                            "min_failures_tolerated" => sc.policy.min_failures_tolerated = n as u32,
                            other => return Err(err(format!("unknown policy field {other:?}"))),
                        }
                    }
                }
                ["host", name, rest @ ..] => {
                    let m = kv(rest);
                    let fence = m.get("fence").is_none_or(|v| v != "no");
                    if fence {
                        sc.failover.fence_hosts.insert(name.to_string());
                    }
                    if let Some(g) = m.get("mem_gib") {
                        sc.memory_gib.insert(name.to_string(), num(g)?);
                    }
                    if let Some(f) = m.get("fence_ms") {
                        sc.fence_ms.insert(name.to_string(), num(f)?);
                    }
                    sc.hosts.push((
                        name.to_string(),
                        m.get("zone").cloned().unwrap_or_else(|| "z1".into()),
                        m.get("cluster").cloned().unwrap_or_else(|| "c1".into()),
                        m.get("tags")
                            .map(|t| t.split(',').map(String::from).collect())
                            .unwrap_or_default(),
                        fence,
                    ));
                }
                ["failover", rest @ ..] => {
                    for (k, v) in kv(rest) {
                        match k.as_str() {
                            "ha_tag" => sc.policy.ha_tag = Some(v),
                            "fallback" => {
                                sc.policy.ha_tag_fallback = match v.as_str() {
                                    "any" => TagFallback::Any,
                                    "wait" => TagFallback::Wait,
                                    o => return Err(err(format!("fallback {o:?}: any or wait"))),
                                }
                            }
                            "mass_failure_percent" => {
                                sc.failover.mass_failure_percent = num(&v)? as u32
                            }
                            "mass_failure_window_ms" => {
                                sc.failover.mass_failure_window_ms = num(&v)?
                            }
                            "storage_slot" => sc.failover.storage_slot = v == "yes",
                            other => return Err(err(format!("unknown failover field {other:?}"))),
                        }
                    }
                }
                ["storage", rest @ ..] => {
                    for (k, v) in kv(rest) {
                        match k.as_str() {
                            "pool" => sc.pool = Some(v),
                            other => return Err(err(format!("unknown storage field {other:?}"))),
                        }
                    }
                }
                ["lease", rest @ ..] => {
                    for (k, v) in kv(rest) {
                        match k.as_str() {
                            "duration_ms" => sc.lease.duration_ms = num(&v)?,
                            "margin_ms" => sc.lease.drift_margin_ms = num(&v)?,
                            "response" => {
                                sc.lease.isolation_response = match v.as_str() {
                                    "self-fence" => IsolationResponse::SelfFence,
                                    "keep-running" => IsolationResponse::KeepRunning,
                                    o => {
                                        return Err(err(format!(
                                            "response {o:?}: self-fence or keep-running"
                                        )))
                                    }
                                }
                            }
                            other => return Err(err(format!("unknown lease field {other:?}"))),
                        }
                    }
                }
                ["monitors", n] => {
                    sc.monitors = num(n)? as usize;
                    if sc.monitors == 0 {
                        return Err(err("monitors: at least 1".into()));
                    }
                }
                ["watchdog", "none"] => sc.watchdog_ms = None,
                ["watchdog", ms] => sc.watchdog_ms = Some(num(ms)?),
                ["vm", uuid, rest @ ..] => {
                    let m = kv(rest);
                    let host = m
                        .get("host")
                        .cloned()
                        .ok_or_else(|| err("vm needs host=".into()))?;
                    let prio = m.get("priority").map(|p| num(p)).transpose()?.unwrap_or(0);
                    if let Some(g) = m.get("group") {
                        sc.groups.push((uuid.to_string(), g.clone()));
                    }
                    if let Some(p) = m.get("pools") {
                        let pools = match p.as_str() {
                            "none" => vec![],
                            list => list.split(',').map(String::from).collect(),
                        };
                        sc.vm_pools.insert(uuid.to_string(), pools);
                    }
                    sc.vms.push((uuid.to_string(), host, prio as i32));
                }
                ["at", t, "when", kind, target, verb, args @ ..] => {
                    let t = num(t)?;
                    let trigger = match *kind {
                        "fencing" => Trigger::Fencing(target.to_string()),
                        "recovering" => Trigger::Recovering(target.to_string()),
                        other => {
                            return Err(err(format!(
                                "when {other:?}: fencing HOST or recovering VM"
                            )))
                        }
                    };
                    let f = parse_fault(verb, args).map_err(err)?;
                    sc.faults.push((t, Fault::When(trigger, Box::new(f))));
                }
                ["at", t, verb, args @ ..] => {
                    let t = num(t)?;
                    let f = parse_fault(verb, args).map_err(err)?;
                    sc.faults.push((t, f));
                }
                ["run", t] => sc.until = num(t)?,
                other => return Err(err(format!("cannot read {other:?}"))),
            }
        }
        sc.faults.sort_by_key(|(t, _)| *t);
        // A fence agent ends within its time limit (its process group is killed then).
        sc.failover.fence_agent_limit_ms = sc
            .fence_ms
            .values()
            .copied()
            .fold(DEFAULT_FENCE_MS, u64::max);
        Ok(sc)
    }
}

/// One fault's verb and arguments (after `at MS`, or after `at MS when ...`).
fn parse_fault(verb: &str, args: &[&str]) -> Result<Fault, String> {
    let arg = |n: usize| -> Result<String, String> {
        args.get(n)
            .map(|s| s.to_string())
            .ok_or_else(|| format!("{verb} needs an argument"))
    };
    let on = |n: usize| -> Result<bool, String> {
        match args.get(n).copied() {
            Some("on") => Ok(true),
            Some("off") => Ok(false),
            other => Err(format!("expected on|off, got {other:?}")),
        }
    };
    let num = |s: &str| -> Result<u64, String> {
        s.parse().map_err(|_| format!("{s:?} is not a number"))
    };
    let f = match verb {
        "crash-vm" => Fault::CrashVm(arg(0)?),
        "crash-on-start" => Fault::CrashOnStart(arg(0)?, on(1)?),
        "guest-shutdown" => Fault::GuestShutdown(arg(0)?),
        "destroy" => Fault::Destroy(arg(0)?),
        "kill-agent" => Fault::KillAgent(arg(0)?),
        "kill-agent-for-good" => Fault::KillAgentForGood(arg(0)?),
        "version-mismatch" => Fault::VersionMismatch(arg(0)?, on(1)?),
        "start-agent" => Fault::StartAgent(arg(0)?),
        "start-fails" => Fault::StartFails(arg(0)?, on(1)?),
        "drop-answers" => Fault::DropAnswers(arg(0)?, on(1)?),
        "new-leader" => Fault::NewLeader,
        "crash-host" => Fault::CrashHost(arg(0)?),
        "plan" => Fault::Plan(arg(0)?.split(',').map(String::from).collect()),
        "power-on" => Fault::PowerOn(arg(0)?),
        "partition" => Fault::Partition(arg(0)?),
        "heal" => Fault::Heal(arg(0)?),
        "fence-fails" => Fault::FenceFails(arg(0)?, on(1)?),
        "storage-fault" => Fault::HostStorage(arg(0)?, on(1)?),
        "storage-outage" => Fault::StorageOutage(on(0)?),
        "monitors-down" => Fault::MonitorsDown,
        "monitors-up" => Fault::MonitorsUp,
        "backup" => Fault::Backup,
        "restore" => Fault::Restore,
        "maintenance" => Fault::Maintenance(arg(0)?, on(1)?),
        "stale-ack" => Fault::StaleAck(arg(0)?, on(1)?),
        "confirm-off" | "fence" | "release-hold" => {
            let m = kv(args);
            let by = m
                .get("by")
                .cloned()
                .ok_or_else(|| format!("{verb} needs by=ADMIN"))?;
            match verb {
                "confirm-off" => Fault::ConfirmOff(arg(0)?, by),
                "fence" => Fault::OperatorFence(arg(0)?, by, args.contains(&"force")),
                _ => Fault::ReleaseHold(m.get("cluster").cloned(), by),
            }
        }
        "config-set" | "config-unset" => {
            let by = kv(args)
                .get("by")
                .cloned()
                .ok_or_else(|| format!("{verb} needs by=ADMIN"))?;
            let value = (verb == "config-set").then(|| arg(1)).transpose()?;
            Fault::ConfigSet(arg(0)?, value, by)
        }
        "monitor-restart" => Fault::MonitorRestart(
            num(&arg(0)?)?,
            args.iter().skip(1).map(|a| a.to_string()).collect(),
        ),
        "reorder-reports" => match args.get(2) {
            None => Fault::ReorderReports(arg(0)?, on(1)?),
            Some(&"all") => Fault::ReorderAllReports(arg(0)?, on(1)?),
            Some(other) => {
                return Err(format!(
                    "reorder-reports H on|off [all]: unexpected {other:?}"
                ))
            }
        },
        "quorum-stall" => Fault::QuorumStall(on(0)?),
        "leader-crash" => Fault::LeaderCrash,
        "partition-leader" => Fault::PartitionLeader(on(0)?, args.get(1) == Some(&"hosts")),
        other => return Err(format!("unknown fault {other:?}")),
    };
    Ok(f)
}

impl SimHost {
    /// The agent can talk to the monitor.
    fn reachable(&self) -> bool {
        self.agent_alive && self.powered && !self.partitioned && !self.incompatible
    }

    /// A new agent process: a new instance, not fenced yet; its persisted lease is kept.
    fn start_agent(&mut self, instance: u64, now: u64) {
        self.agent_alive = true;
        self.restart_at = None;
        self.instance = instance;
        self.agent_started_at = now;
        self.self_fenced = false;
        self.episode = None;
        self.known_term = 0;
        self.withdrawn.clear();
        self.obs_seq = 0;
    }

    /// The next observation sequence number of its agent process.
    fn observe(&mut self) -> u64 {
        self.obs_seq += 1;
        self.obs_seq
    }

    /// How late its report numbered `seq` reaches the monitor (0: at once): a listing, or
    /// else a lifecycle event or a command answer (`reorder-reports`).
    fn late_by(&self, listing: bool, seq: u64) -> u64 {
        match (self.reorder, listing) {
            (Reorder::Off, _) | (Reorder::Listings, false) => 0,
            (Reorder::Listings, true) => REORDER_DELAY_MS,
            (Reorder::All, _) => scrambled_delay(seq),
        }
    }

    /// Power loss: the agent and every domain are gone at once, silently.
    fn power_off(&mut self) {
        self.powered = false;
        self.agent_alive = false;
        self.restart_at = None;
        self.self_fenced = false;
        self.queued.clear();
        self.fenced_reason = None;
        self.watchdog_fed = None;
        self.episode = None;
        for d in self.domains.values_mut() {
            if d.running {
                d.running = false;
                d.reason = StateReason::Other;
            }
        }
    }
}

/// A safety violation found by the simulator.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    /// `vigilctl plan` said one host and the real failure used another.
    #[error("at {at_ms} ms PLAN MISMATCH: {detail}")]
    PlanMismatch { at_ms: u64, detail: String },
    /// Two monitors hold the leader lease at the same moment (both may act outside Raft).
    #[error("at {at_ms} ms monitor nodes {nodes:?} both act as leader")]
    TwoLeadersAct { at_ms: u64, nodes: Vec<u64> },
    #[error("at {at_ms} ms VM {uuid} runs on {hosts:?} at once")]
    RunsTwice {
        at_ms: u64,
        uuid: String,
        hosts: Vec<String>,
    },
    #[error("at {at_ms} ms host {host} runs VM {uuid} with generation {found}, older than {newest} it had already seen")]
    StaleRuns {
        at_ms: u64,
        host: String,
        uuid: String,
        found: u64,
        newest: u64,
    },
}

/// The simulated cluster.
pub struct Sim {
    /// The monitors (one by default: a sole voter).
    monitors: Vec<SimMonitor>,
    /// The Raft leader of the current term, as the majority knows it (index in `monitors`).
    leader: Option<usize>,
    /// The majority hears no leader: it elects one at this time.
    election_at: Option<u64>,
    /// `when` faults waiting for their condition, and until when they wait.
    waiting: Vec<(Trigger, Fault, u64)>,
    /// The replicated state: the committed log, applied.
    state: ClusterState,
    /// `plan` verbs: uuid -> the host the plan placed it on, until its next start order.
    planned: BTreeMap<String, String>,
    /// Start orders that went elsewhere than a plan said.
    plan_mismatch: Vec<String>,
    hosts: BTreeMap<String, SimHost>,
    crash_on_start: BTreeSet<String>,
    /// Commands in flight: (due, host, command, the monitor that sent it).
    pending: Vec<(u64, String, AgentCommand, usize)>,
    /// Domains that die right after their start: (due, host, uuid).
    pending_crash: Vec<(u64, String, String)>,
    /// HA VMs (marked in their XML) and their priorities.
    ha: BTreeMap<String, i32>,
    policy: RecoveryConfig,
    failover: FailoverConfig,
    /// Fence calls in flight: (due, host, the monitor that runs the fence agent).
    pending_fence: Vec<(u64, String, usize)>,
    /// Host tags to set once the hosts registered.
    tags: Vec<(String, String)>,
    /// Anti-affinity groups to set once the VMs registered.
    groups: Vec<(String, String)>,
    memory_gib: BTreeMap<String, u64>,
    fence_ms: BTreeMap<String, u64>,
    now: u64,
    term: u64,
    log: Vec<String>,
    pool: Option<String>,
    lease: LeaseConfig,
    /// The monitor's own view of the pool.
    monitor_storage_ok: bool,
    /// When the leader record last changed on the pool (sim ms), and when its current run
    /// of changes began (after a pause longer than a lease).
    leader_record_at: Option<u64>,
    leader_epoch_at: Option<u64>,
    /// The leader record agents read last (the real type, read with its real rules).
    record_read: LeaderRecord,
    watchdog_ms: Option<u64>,
    /// Sim time 0 as an `Instant`, for the shared pure decisions.
    t0: std::time::Instant,
    next_instance: u64,
    vm_pools: BTreeMap<String, Vec<String>>,
    /// Reports on their way to a monitor: (due, host, agent instance, input, the monitor).
    delayed: Vec<(u64, String, u64, Input, usize)>,
    /// No quorum acknowledgement reaches the leader (`quorum-stall`).
    quorum_stalled: bool,
    /// The state the last `backup` fault copied, and when (wall ms).
    backup: Option<(ClusterState, u64)>,
}

/// Raises a generation table entry (generations only ever go up), as the agent's
/// `Generations` does.
fn raise(table: &mut BTreeMap<String, u64>, uuid: &str, generation: u64) {
    let e = table.entry(uuid.to_string()).or_insert(generation);
    *e = (*e).max(generation);
}

/// Takes the entries of `queue` that are due at `now` (`at` reads an entry's time), in queue
/// order, and leaves the later ones.
fn take_due<T>(queue: &mut Vec<T>, now: u64, at: impl Fn(&T) -> u64) -> Vec<T> {
    let (due, later) = std::mem::take(queue)
        .into_iter()
        .partition(|entry| at(entry) <= now);
    *queue = later;
    due
}

/// Takes all of `pending` ((key, value) pairs) once `known` holds for every key, and none of
/// it before.
fn take_once_known(
    pending: &mut Vec<(String, String)>,
    known: impl Fn(&str) -> bool,
) -> Vec<(String, String)> {
    if pending.iter().all(|(key, _)| known(key)) {
        std::mem::take(pending)
    } else {
        Vec::new()
    }
}

fn detector() -> DetectorConfig {
    DetectorConfig {
        heartbeat_interval_ms: 100,
        suspect_after_ms: 300,
        down_after_ms: 600,
    }
}

impl Sim {
    pub fn new(sc: &Scenario) -> Sim {
        let mut sim = Sim {
            monitors: Vec::new(),
            leader: Some(0),
            election_at: None,
            waiting: Vec::new(),
            state: ClusterState::default(),
            planned: BTreeMap::new(),
            plan_mismatch: Vec::new(),
            hosts: BTreeMap::new(),
            crash_on_start: BTreeSet::new(),
            pending: Vec::new(),
            pending_crash: Vec::new(),
            ha: sc.vms.iter().map(|(u, _, p)| (u.clone(), *p)).collect(),
            policy: sc.policy.clone(),
            failover: sc.failover.clone(),
            pending_fence: Vec::new(),
            tags: sc
                .hosts
                .iter()
                .flat_map(|(n, _, _, tags, _)| tags.iter().map(move |t| (n.clone(), t.clone())))
                .collect(),
            groups: sc.groups.clone(),
            memory_gib: sc.memory_gib.clone(),
            fence_ms: sc.fence_ms.clone(),
            now: 0,
            term: 1,
            log: Vec::new(),
            pool: sc.pool.clone(),
            lease: sc.lease.clone(),
            monitor_storage_ok: true,
            leader_record_at: None,
            leader_epoch_at: None,
            record_read: LeaderRecord {
                term: 0,
                node: 0,
                seq: 0,
                wall_ms: 0,
                condemned: Vec::new(),
                hold: false,
            },
            watchdog_ms: sc.watchdog_ms,
            t0: std::time::Instant::now(),
            next_instance: 100,
            vm_pools: sc.vm_pools.clone(),
            delayed: Vec::new(),
            quorum_stalled: false,
            backup: None,
        };
        for (name, zone, cluster, _, _) in &sc.hosts {
            sim.hosts.insert(
                name.clone(),
                SimHost {
                    zone: zone.clone(),
                    cluster: cluster.clone(),
                    powered: true,
                    partitioned: false,
                    fence_fails: false,
                    agent_alive: true,
                    start_fails: false,
                    drop_answers: false,
                    domains: BTreeMap::new(),
                    newest: BTreeMap::new(),
                    started: BTreeMap::new(),
                    session: None,
                    instance: 1,
                    agent_started_at: 0,
                    beat_every_ms: 100,
                    next_beat_at: 0,
                    lease_until: sc.lease.duration_ms,
                    last_grant: None,
                    storage_ok: true,
                    storage_hb: None,
                    slot: None,
                    ack: None,
                    queued: Vec::new(),
                    fenced_reason: None,
                    reconnect_after: 0,
                    restart_at: None,
                    self_fenced: false,
                    partitioned_at: None,
                    watchdog_fed: None,
                    incompatible: false,
                    unmanaged_at: None,
                    stale_ack: false,
                    episode: None,
                    known_term: 0,
                    withdrawn: BTreeSet::new(),
                    obs_seq: 0,
                    reorder: Reorder::Off,
                },
            );
        }
        for (uuid, host, _) in &sc.vms {
            if let Some(h) = sim.hosts.get_mut(host) {
                h.domains.insert(
                    uuid.clone(),
                    SimDomain {
                        running: true,
                        generation: 0,
                        reason: StateReason::Booted,
                    },
                );
            }
        }
        for i in 0..sc.monitors {
            let m = sim.fresh_monitor(i as u64 + 1);
            sim.monitors.push(m);
        }
        // Term 1: the first monitor leads (Raft elected it before the simulation starts).
        sim.monitors[0].raft_leading = Some(1);
        sim.drive_leases();
        sim
    }

    /// A monitor process just started: a fresh engine, a fresh lease clock, no sessions.
    fn fresh_monitor(&self, node: u64) -> SimMonitor {
        SimMonitor {
            node,
            // As `service::spawn` builds it: the settings are the file's until the first
            // leader seeds the cluster with them, then the committed ones.
            engine: Engine::new(detector(), self.engine_policy(), self.now)
                .with_failover(self.failover.clone())
                .with_settings(self.cluster_settings(), 500)
                .with_leader_lease(),
            // openraft's vote lease, as the simulator's elections honour it: none comes
            // sooner than ELECTION_TIMEOUT_MS after the leader was last heard, so the new
            // leader's wait after its election is what the monitor computes from that
            // (`LeaseClock::after_election_ms`, 0 here). Not modelled: a restarted monitor's
            // vote quiet time (`VoteGate`); its clock counts from the run's start.
            clock: LeaseClock::new(LEADER_LEASE_MS, ELECTION_TIMEOUT_MS),
            published: LeaseView::default(),
            follower: LeaseFollower::default(),
            storage_leader: None,
            record_published: None,
            alive: true,
            restart_at: None,
            cut: false,
            cut_hosts: false,
            cut_at: 0,
            raft_leading: None,
            next_probe_ms: 0,
            stale_state: None,
            uncommitted_noted: false,
            backlog: Vec::new(),
        }
    }

    /// A sole voter (`monitors 1`): nobody can be elected against it.
    fn sole_voter(&self) -> bool {
        self.monitors.len() == 1
    }

    /// Whether monitor `m` hears a quorum of voters (itself included).
    fn has_quorum(&self, m: usize) -> bool {
        let Some(me) = self.monitors.get(m) else {
            return false;
        };
        if !me.alive {
            return false;
        }
        let with_me = if me.cut {
            1
        } else {
            self.monitors.iter().filter(|o| o.alive && !o.cut).count()
        };
        2 * with_me > self.monitors.len()
    }

    /// Whether a proposal of monitor `m` commits: it must be the leader of the current term
    /// and hear a quorum (a stale leader's proposals never commit; nor do any while the
    /// quorum's acknowledgements are lost, with several monitors).
    fn commits(&self, m: usize) -> bool {
        self.leader == Some(m)
            && self.monitors[m].raft_leading == Some(self.term)
            && self.has_quorum(m)
            && (self.sole_voter() || !self.quorum_stalled)
    }

    /// Whether `host`'s agent and monitor `m` can talk.
    fn links(&self, host: &str, m: usize) -> bool {
        self.hosts.get(host).is_some_and(SimHost::reachable)
            && self
                .monitors
                .get(m)
                .is_some_and(|o| o.alive && !o.cut_hosts)
    }

    /// The monitor that hears what `host`'s agent reports: the one it has a session with, else
    /// the leader when they can talk (an agent between sessions is about to reach it).
    fn hearing(&self, host: &str) -> Option<usize> {
        let h = self.hosts.get(host)?;
        match h.session {
            Some(m) => Some(m),
            None => self
                .leader
                .filter(|m| self.sole_voter() && self.links(host, *m)),
        }
    }

    /// Whether monitor `m` takes agents' sessions: the shipped rule,
    /// [`crate::server::takes_agents`], on what Raft tells it and what its lease clock says.
    fn takes_agents(&self, m: usize) -> bool {
        let mon = &self.monitors[m];
        mon.alive
            && crate::server::takes_agents(mon.raft_leading.is_some(), mon.clock.deposed(self.now))
    }

    /// A proposal of monitor `m`, handed to Raft as its proposer does: committed now when `m`
    /// can commit (after what it proposed earlier), else kept in order while `m` still leads
    /// the current term (a write waits for its quorum: lost acknowledgements, a partition
    /// shorter than an election), else lost (a stale leader's: the write fails). Returns
    /// whether something committed.
    fn propose(&mut self, m: usize, cmd: StateCommand) -> bool {
        if self.commits(m) {
            let backlog = std::mem::take(&mut self.monitors[m].backlog);
            for c in backlog {
                self.apply_committed(c);
            }
            self.apply_committed(cmd);
            self.monitors[m].uncommitted_noted = false;
            return true;
        }
        if self.monitors[m].raft_leading == Some(self.term) {
            self.monitors[m].backlog.push(cmd);
        } else {
            self.not_committed(m, &cmd);
        }
        false
    }

    /// Monitor `m`'s proposal `cmd` never commits: said once per episode, with what it was.
    fn not_committed(&mut self, m: usize, cmd: &StateCommand) {
        if !self.monitors[m].uncommitted_noted {
            self.monitors[m].uncommitted_noted = true;
            self.log.push(format!(
                "{:>6} NOT COMMITTED monitor node {} (its term is over): {}",
                self.now,
                self.monitors[m].node,
                proposal_label(cmd)
            ));
        }
    }

    /// Applies a committed command to the replicated state.
    fn apply_committed(&mut self, cmd: StateCommand) {
        if let StateCommand::OrderStart { uuid, host, .. } = &cmd {
            if let Some(planned) = self.planned.remove(uuid) {
                if planned != *host {
                    self.plan_mismatch
                        .push(format!("{uuid}: planned {planned}, ordered on {host}"));
                }
            }
        }
        self.state.apply(&cmd);
    }

    /// Raft for the proposals each monitor still waits on: committed once it can, lost once
    /// its term is over (or with its process).
    fn flush_backlogs(&mut self) {
        for m in 0..self.monitors.len() {
            if self.monitors[m].backlog.is_empty() {
                continue;
            }
            if !self.monitors[m].alive {
                self.monitors[m].backlog.clear();
            } else if self.commits(m) {
                let backlog = std::mem::take(&mut self.monitors[m].backlog);
                for c in backlog {
                    self.apply_committed(c);
                }
                self.feed(m, Input::Applied);
            } else if self.monitors[m].raft_leading != Some(self.term) {
                let backlog = std::mem::take(&mut self.monitors[m].backlog);
                if let Some(first) = backlog.first() {
                    self.not_committed(m, first);
                }
            }
        }
    }

    /// The monitor `host`'s agent gets a session with when it dials: one that takes agents
    /// (`server::admission_check`), and that the agent reaches (the majority's leader first:
    /// the followers it may dial first redirect it there).
    fn admitting(&self, host: &str) -> Option<usize> {
        let takes = |m: usize| self.takes_agents(m) && self.links(host, m);
        self.leader
            .filter(|m| takes(*m))
            .or_else(|| (0..self.monitors.len()).find(|m| takes(*m)))
    }

    /// The monitor an operator's command reaches (the admin API of the leader), if any.
    fn admin(&self) -> Option<usize> {
        self.leader.filter(|m| self.monitors[*m].alive)
    }

    /// Each monitor's lease task and the service task's follow-up, with the shipped rules:
    /// [`LeaseClock`] told what Raft says, probes by [`probe_due`] (answered when the monitor
    /// hears a quorum in its own term), and every change of what it publishes turned into the
    /// engine's inputs by [`follow_lease`].
    fn drive_leases(&mut self) {
        let now = self.now;
        let sole = self.sole_voter();
        for m in 0..self.monitors.len() {
            if !self.monitors[m].alive {
                continue;
            }
            let answered = self.leader == Some(m)
                && self.monitors[m].raft_leading == Some(self.term)
                && self.has_quorum(m)
                && !self.quorum_stalled;
            let mon = &mut self.monitors[m];
            mon.clock.leadership(mon.raft_leading, sole, now);
            if let Some(term) = mon.clock.raft_term() {
                if probe_due(&mon.clock, sole, false, now, mon.next_probe_ms) {
                    mon.next_probe_ms = now + mon.clock.probe_every_ms();
                    if answered {
                        mon.clock.confirmed(term, now);
                    }
                }
            }
            let view = mon.clock.view(now);
            if view == mon.published {
                continue;
            }
            mon.published = view;
            let node = mon.node;
            let (change, inputs) = follow_lease(view, &mut mon.follower, node, now);
            match change {
                LeaseChange::Became { term } | LeaseChange::Resumed { term, .. } => {
                    mon.storage_leader = Some((term, node))
                }
                LeaseChange::Lost | LeaseChange::Paused { .. } => {
                    mon.storage_leader = None;
                    mon.record_published = None;
                }
                LeaseChange::Same => {}
            }
            for input in inputs {
                self.feed(m, input);
            }
        }
    }

    fn wall(&self) -> u64 {
        WALL0 + self.now
    }

    /// Feeds one input to what `host`'s agent reports to ([`Sim::hearing`]).
    fn report(&mut self, host: &str, input: Input) {
        if let Some(m) = self.hearing(host) {
            self.feed(m, input);
        }
    }

    /// Feeds one input to monitor `m`'s engine and carries out its actions, as the service
    /// task does: proposals through Raft (committed only when [`Sim::commits`]), the rest
    /// from this monitor (its sessions, its fence agents, its storage worker).
    fn feed(&mut self, m: usize, input: Input) {
        if !self.monitors.get(m).is_some_and(|o| o.alive) {
            return;
        }
        let mut queue = vec![input];
        while let Some(input) = queue.pop() {
            let (now, wall) = (self.now, self.wall());
            let actions = {
                let mon = &mut self.monitors[m];
                let state = mon.stale_state.as_ref().unwrap_or(&self.state);
                mon.engine.handle(input, now, wall, state)
            };
            let mut applied = false;
            for a in actions {
                match a {
                    Action::Propose(cmd) => {
                        applied |= self.propose(m, cmd);
                    }
                    Action::Send { host, command } => {
                        if let AgentCommand::StartDomain {
                            uuid, generation, ..
                        } = &command
                        {
                            if self.hearing(&host) == Some(m) {
                                self.define_for_start(&host, uuid, *generation, m);
                            }
                        }
                        self.pending.push((self.now + START_MS, host, command, m));
                    }
                    Action::Fence { host } => {
                        let takes = self
                            .fence_ms
                            .get(&host)
                            .copied()
                            .unwrap_or(DEFAULT_FENCE_MS);
                        self.pending_fence.push((self.now + takes, host, m));
                    }
                    Action::RequestFence(req) => {
                        if self.monitor_storage_ok {
                            if let Some(h) = self.hosts.get_mut(&req.host) {
                                h.slot = Some(req);
                            }
                        }
                    }
                    Action::LeaderRecord { condemned, hold } => {
                        self.monitors[m].record_published = Some((self.now, condemned, hold));
                    }
                    Action::ClearFence { host } => {
                        if self.monitor_storage_ok {
                            if let Some(h) = self.hosts.get_mut(&host) {
                                h.slot = None;
                                h.ack = None;
                            }
                        }
                    }
                    Action::Notify {
                        host: Some(h),
                        message: MonitorToAgent::LeaseGrant { lease_ms, .. },
                    } => {
                        let now = self.now;
                        if self.hearing(&h) == Some(m) && self.links(&h, m) {
                            if let Some(host) = self.hosts.get_mut(&h) {
                                // Granted for the beat sent this very step.
                                host.lease_until = host.lease_until.max(now + lease_ms);
                                host.last_grant = Some(now);
                            }
                        }
                    }
                    Action::Notify {
                        host: Some(h),
                        message: MonitorToAgent::FenceWithdrawn { id },
                    } => {
                        if self.hearing(&h) == Some(m) && self.links(&h, m) {
                            if let Some(host) = self.hosts.get_mut(&h) {
                                host.withdrawn.insert(id);
                            }
                        }
                    }
                    Action::Notify {
                        host,
                        message:
                            MonitorToAgent::Tuning {
                                heartbeat_interval_ms,
                            },
                    } => {
                        // As the agent's session: the next beat one new interval from now.
                        let now = self.now;
                        let every = heartbeat_interval_ms.max(STEP_MS);
                        for t in self.reached_by(m, host) {
                            if let Some(h) = self.hosts.get_mut(&t) {
                                if h.beat_every_ms != every {
                                    h.beat_every_ms = every;
                                    h.next_beat_at = now + every;
                                }
                            }
                        }
                    }
                    Action::Notify { host, message } => {
                        if let MonitorToAgent::Generations { entries, .. } = message {
                            for t in self.reached_by(m, host) {
                                if let Some(h) = self.hosts.get_mut(&t) {
                                    for (u, g) in &entries {
                                        let e = h.newest.entry(u.clone()).or_insert(*g);
                                        *e = (*e).max(*g);
                                    }
                                }
                            }
                        }
                    }
                }
            }
            if applied {
                queue.push(Input::Applied);
            }
        }
    }

    fn domain_infos(&self, host: &str) -> Vec<DomainInfo> {
        let Some(h) = self.hosts.get(host) else {
            return vec![];
        };
        h.domains
            .iter()
            .map(|(u, d)| DomainInfo {
                uuid: u.clone(),
                name: format!("vm-{u}"),
                state: if d.running {
                    DomainState::Running
                } else {
                    DomainState::Shutoff
                },
                reason: d.reason,
                vcpus: 1,
                memory_kib: 65_536,
                disks: vec![],
                pools: self.vm_pools.get(u).cloned(),
                meta: VigilMeta {
                    ha: self.ha.contains_key(u).then_some(true),
                    priority: self.ha.get(u).copied(),
                    generation: Some(d.generation),
                },
                persistent: true,
            })
            .collect()
    }

    fn stop_event(&mut self, host: &str, uuid: &str, kind: LifecycleKind, reason: StateReason) {
        let hearing = self.hearing(host);
        let Some(h) = self.hosts.get_mut(host) else {
            return;
        };
        let Some(d) = h.domains.get_mut(uuid) else {
            return;
        };
        if !d.running {
            return;
        }
        d.running = false;
        d.reason = reason;
        let generation = Some(d.generation);
        let seq = h.observe();
        if let Some(m) = hearing.filter(|_| h.reachable()) {
            let (late, instance) = (h.late_by(false, seq), h.instance);
            let ev = DomainEvent {
                uuid: uuid.to_string(),
                name: format!("vm-{uuid}"),
                kind,
                raw_event: RAW_EVENT_STOPPED,
                raw_detail: 0,
                at_ms: self.wall(),
            };
            let report = Input::DomainEvent(LifecycleReport {
                host: host.to_string(),
                event: ev,
                generation,
                seq,
            });
            if late == 0 {
                self.feed(m, report);
            } else {
                // Late (`reorder-reports H on all`): after newer reports, maybe.
                self.delayed
                    .push((self.now + late, host.to_string(), instance, report, m));
            }
        }
    }

    fn host_of(&self, uuid: &str) -> Option<String> {
        self.hosts
            .iter()
            .find(|(_, h)| h.domains.get(uuid).is_some_and(|d| d.running))
            .map(|(n, _)| n.clone())
    }

    fn apply_fault(&mut self, f: Fault) {
        self.log.push(format!("{:>6} FAULT {f:?}", self.now));
        match f {
            Fault::CrashVm(u) => {
                if let Some(h) = self.host_of(&u) {
                    self.stop_event(&h, &u, LifecycleKind::Crashed, StateReason::Crashed);
                }
            }
            Fault::CrashOnStart(u, on) => {
                if on {
                    self.crash_on_start.insert(u);
                } else {
                    self.crash_on_start.remove(&u);
                }
            }
            Fault::GuestShutdown(u) => {
                if let Some(h) = self.host_of(&u) {
                    self.stop_event(
                        &h,
                        &u,
                        LifecycleKind::GuestShutdown,
                        StateReason::GuestShutdown,
                    );
                }
            }
            Fault::Destroy(u) => {
                if let Some(h) = self.host_of(&u) {
                    self.stop_event(&h, &u, LifecycleKind::Destroyed, StateReason::Destroyed);
                }
            }
            Fault::KillAgent(h) => {
                let now = self.now;
                if let Some(host) = self.hosts.get_mut(&h) {
                    if host.agent_alive {
                        host.agent_alive = false;
                        host.restart_at = Some(now + SYSTEMD_RESTART_MS);
                    }
                }
            }
            Fault::KillAgentForGood(h) => {
                if let Some(host) = self.hosts.get_mut(&h) {
                    host.agent_alive = false;
                    host.restart_at = None;
                }
            }
            Fault::VersionMismatch(h, on) => {
                if let Some(host) = self.hosts.get_mut(&h) {
                    host.incompatible = on;
                }
            }
            Fault::StartAgent(h) => {
                let instance = self.new_instance();
                let now = self.now;
                if let Some(host) = self.hosts.get_mut(&h) {
                    if !host.agent_alive {
                        host.start_agent(instance, now);
                    }
                }
            }
            Fault::StartFails(h, on) => {
                if let Some(host) = self.hosts.get_mut(&h) {
                    host.start_fails = on;
                }
            }
            Fault::DropAnswers(h, on) => {
                if let Some(host) = self.hosts.get_mut(&h) {
                    host.drop_answers = on;
                }
            }
            Fault::CrashHost(h) => {
                if let Some(host) = self.hosts.get_mut(&h) {
                    host.power_off();
                }
            }
            Fault::PowerOn(h) => {
                let instance = self.new_instance();
                let now = self.now;
                if let Some(host) = self.hosts.get_mut(&h) {
                    if !host.powered {
                        host.powered = true;
                        host.start_agent(instance, now);
                        // A fresh boot: no lease file survives on the sim's boot clock.
                        host.lease_until = now;
                    }
                }
            }
            Fault::HostStorage(h, on) => {
                if let Some(host) = self.hosts.get_mut(&h) {
                    host.storage_ok = !on;
                }
            }
            Fault::StorageOutage(on) => {
                self.monitor_storage_ok = !on;
                for h in self.hosts.values_mut() {
                    h.storage_ok = !on;
                }
            }
            Fault::MonitorsDown => {
                for m in self.monitors.iter_mut() {
                    m.alive = false;
                    m.restart_at = None;
                }
                for h in self.hosts.values_mut() {
                    h.session = None;
                }
            }
            Fault::Backup => self.backup = Some((self.state.clone(), self.wall())),
            Fault::Restore => {
                let Some((backup, taken_at)) = self.backup.clone() else {
                    return;
                };
                // Whatever the monitors held is gone; what comes back is the backup, as
                // `vigil-monitor --restore` seeds it.
                self.apply_fault(Fault::MonitorsDown);
                self.state = crate::backup::restored_state(backup, taken_at, None, self.wall());
                self.apply_fault(Fault::MonitorsUp);
            }
            Fault::MonitorsUp if !self.monitors_down() => {}
            Fault::MonitorsUp => {
                for i in 0..self.monitors.len() {
                    if !self.monitors[i].alive {
                        let node = self.monitors[i].node;
                        self.monitors[i] = self.fresh_monitor(node);
                    }
                }
                // Agents back off while no monitor answers: they come back over a couple of
                // seconds, after the new leader already writes its record.
                let now = self.now;
                for (i, h) in self.hosts.values_mut().enumerate() {
                    h.reconnect_after = now + 300 + 100 * i as u64;
                }
                self.new_leader();
            }
            Fault::Partition(h) => {
                let now = self.now;
                if let Some(host) = self.hosts.get_mut(&h) {
                    if !host.partitioned {
                        host.partitioned_at = Some(now);
                    }
                    host.partitioned = true;
                }
            }
            Fault::Heal(h) => {
                if let Some(host) = self.hosts.get_mut(&h) {
                    host.partitioned = false;
                }
            }
            Fault::FenceFails(h, on) => {
                if let Some(host) = self.hosts.get_mut(&h) {
                    host.fence_fails = on;
                }
            }
            Fault::NewLeader => self.new_leader(),
            Fault::LeaderCrash => {
                if let Some(m) = self.leader.filter(|m| self.monitors[*m].alive) {
                    self.crash_monitor(m);
                }
            }
            Fault::PartitionLeader(on, hosts) => self.partition_leader(on, hosts),
            Fault::When(trigger, fault) => {
                let until = self.now + WHEN_WAIT_MS;
                self.waiting.push((trigger, *fault, until));
            }
            Fault::StaleAck(h, on) => {
                if let Some(host) = self.hosts.get_mut(&h) {
                    host.stale_ack = on;
                }
            }
            Fault::MonitorRestart(delay, late) => {
                // The monitor restarts (a new leader); its agents back off and reconnect only
                // `delay` ms later (or just the listed ones; the others within 200 ms).
                let now = self.now;
                for (name, h) in self.hosts.iter_mut() {
                    let slow = late.is_empty() || late.contains(name);
                    h.reconnect_after = now + if slow { delay } else { 200 };
                }
                self.new_leader();
            }
            Fault::ReorderReports(h, on) => {
                if let Some(host) = self.hosts.get_mut(&h) {
                    host.reorder = if on { Reorder::Listings } else { Reorder::Off };
                }
            }
            Fault::ReorderAllReports(h, on) => {
                if let Some(host) = self.hosts.get_mut(&h) {
                    host.reorder = if on { Reorder::All } else { Reorder::Off };
                }
            }
            Fault::QuorumStall(on) => self.quorum_stalled = on,
            Fault::Maintenance(h, on) => {
                // An operator's command, committed through Raft like any other.
                if let Some(m) = self.admin() {
                    let at_ms = self.wall();
                    self.commit(m, StateCommand::SetMaintenance { at_ms, host: h, on });
                }
            }
            // Operators' commands, checked the way the admin API checks them.
            Fault::ConfirmOff(h, by) => {
                let Some(m) = self.admin() else {
                    return;
                };
                match self.monitors[m].engine.confirm_off_refusal(&h, self.now) {
                    Some(why) => self.log.push(format!("{:>6} REFUSED {why}", self.now)),
                    None => {
                        let at_ms = self.wall();
                        self.commit(m, StateCommand::OperatorConfirmedOff { at_ms, host: h, by });
                    }
                }
            }
            Fault::OperatorFence(h, by, force) => {
                let Some(m) = self.admin() else {
                    return;
                };
                match self.monitors[m].engine.fence_refusal(&h, force, self.now) {
                    Some(why) => self.log.push(format!("{:>6} REFUSED {why}", self.now)),
                    None => self.feed(m, Input::OperatorFence { host: h, by }),
                }
            }
            Fault::Plan(hosts) => {
                let m = self.leader.unwrap_or(0);
                let plan = self.monitors[m]
                    .engine
                    .plan_failures(&hosts, &self.state, self.wall());
                match plan {
                    Ok(vms) => {
                        for v in vms {
                            let target = match &v.outcome {
                                crate::engine::PlanOutcome::Placed { target } => {
                                    self.planned.insert(v.uuid.clone(), target.clone());
                                    target.clone()
                                }
                                other => format!("{other:?}").to_lowercase(),
                            };
                            self.log.push(format!(
                                "{:>6} PLAN {} from {} -> {target}: {}",
                                self.now, v.uuid, v.from, v.why
                            ));
                        }
                    }
                    Err(e) => self.log.push(format!("{:>6} REFUSED {e}", self.now)),
                }
            }
            Fault::ConfigSet(key, value, by) => {
                // `vigilctl config set|unset`, made and checked as the admin API does.
                let Some(m) = self.admin() else {
                    return;
                };
                let change = crate::state::settings::proposed_change(
                    self.state.settings.as_ref(),
                    &key,
                    value.as_deref(),
                    500,
                );
                match change {
                    Err(why) => self.log.push(format!("{:>6} REFUSED {why}", self.now)),
                    Ok(None) => {}
                    Ok(Some((base_revision, settings))) => {
                        let at_ms = self.wall();
                        let by = format!("admin:{by}");
                        self.commit(
                            m,
                            StateCommand::SetSettings {
                                at_ms,
                                by,
                                base_revision,
                                settings,
                            },
                        );
                    }
                }
            }
            Fault::ReleaseHold(cluster, by) => {
                let Some(m) = self.admin() else {
                    return;
                };
                if self.monitors[m].engine.held_clusters().is_empty() {
                    self.log.push(format!(
                        "{:>6} REFUSED no fencing hold is in place",
                        self.now
                    ));
                } else {
                    self.feed(m, Input::ReleaseHold { cluster, by });
                }
            }
        }
    }

    /// A listing taken now by `host`'s agent (its number stamped now), delivered at once, or
    /// late with `reorder-reports`.
    fn report_listing(&mut self, host: &str, domains: Vec<DomainInfo>) {
        let now = self.now;
        let Some(m) = self.hearing(host) else {
            return;
        };
        let Some(h) = self.hosts.get_mut(host) else {
            return;
        };
        let seq = h.observe();
        let due = now + h.late_by(true, seq);
        let input = Input::Inventory(Listing {
            host: host.to_string(),
            domains,
            health: HypervisorHealth::Healthy,
            seq,
        });
        if due <= now {
            self.feed(m, input);
        } else {
            self.delayed
                .push((due, host.to_string(), h.instance, input, m));
        }
    }

    /// Reports whose time has come, if the agent process that took them still talks to the
    /// monitor (a session that ended takes its queue with it). A command answer waits while
    /// the session lasts (a partition it survives); when it ends, the monitor hears that the
    /// agent disconnected before answering (see [`Sim::answers_lost`]).
    fn deliver_delayed(&mut self) {
        let due = take_due(&mut self.delayed, self.now, |(t, _, _, _, _)| *t);
        for (t, host, instance, input, m) in due {
            let session = self
                .hosts
                .get(&host)
                .is_some_and(|h| h.session == Some(m) && h.instance == instance);
            let live = session && self.links(&host, m);
            if live {
                self.feed(m, input);
            } else if session && matches!(input, Input::CommandDone(_)) {
                self.delayed.push((t, host, instance, input, m));
            }
        }
    }

    /// `host`'s session ended: the answers still in flight on it are lost, and the monitor
    /// hears so (`CommandError::Lost`, as `agent_link` reports a session that ended before
    /// the answer came).
    fn answers_lost(&mut self, host: &str) {
        let (lost, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut self.delayed)
            .into_iter()
            .partition(|(_, h, _, i, _)| h == host && matches!(i, Input::CommandDone(_)));
        self.delayed = kept;
        for (_, _, _, input, m) in lost {
            if let Input::CommandDone(answer) = input {
                self.feed(
                    m,
                    Input::CommandDone(CommandAnswer {
                        result: Err(CommandError::Lost(host.to_string())),
                        seq: None,
                        ..answer
                    }),
                );
            }
        }
    }

    /// The agent received a start order: like libvirt, it defines the domain (shut off, with
    /// the order's generation in its metadata) before starting it, and its watcher lists the
    /// host again on the "defined" event. That listing shows the domain shut off.
    fn define_for_start(&mut self, host: &str, uuid: &str, generation: u64, m: usize) {
        let Some(h) = self.hosts.get_mut(host) else {
            return;
        };
        if !h.reachable() || h.domains.contains_key(uuid) {
            return;
        }
        // The agent defines nothing for an order it does not admit (fencing, stale).
        if admit_order(h.episode.is_some(), h.newest.get(uuid).copied(), generation).is_err() {
            return;
        }
        h.domains.insert(
            uuid.to_string(),
            SimDomain {
                running: false,
                generation,
                reason: StateReason::NeverStarted,
            },
        );
        let domains = self.domain_infos(host);
        let now = self.now;
        let Some(h) = self.hosts.get_mut(host) else {
            return;
        };
        let seq = h.observe();
        let due = now + h.late_by(true, seq).max(STEP_MS);
        self.delayed.push((
            due,
            host.to_string(),
            h.instance,
            Input::Inventory(Listing {
                host: host.to_string(),
                domains,
                health: HypervisorHealth::Healthy,
                seq,
            }),
            m,
        ));
    }

    fn new_instance(&mut self) -> u64 {
        self.next_instance += 1;
        self.next_instance
    }

    /// Every monitor is down.
    fn monitors_down(&self) -> bool {
        self.monitors.iter().all(|m| !m.alive)
    }

    /// A new leader: same replicated state (the log), fresh soft state. A sole monitor is
    /// replaced by a fresh process in a new term (node id = term, as every scenario before
    /// issue 12 has it); of several, the leader hands over to the next one of the majority,
    /// which waits out its lease like any new leader.
    fn new_leader(&mut self) {
        if self.sole_voter() {
            self.term += 1;
            let mut mon = self.fresh_monitor(self.term);
            mon.raft_leading = Some(self.term);
            self.monitors[0] = mon;
            self.leader = Some(0);
            for h in self.hosts.values_mut() {
                h.session = None;
            }
        } else if self
            .leader
            .is_some_and(|l| self.monitors[l].alive && self.monitors[l].cut)
        {
            // A leader cut off from the other monitors hands nothing over: the majority
            // elects when its election timer runs out, never sooner than openraft's vote
            // lease after it last heard the leader (the election loop; the real monitor's
            // new leader acts at once after such an election, `LeaseClock`).
        } else {
            let from = self.leader.unwrap_or(0);
            if let Some(next) = self.candidate(from) {
                self.elect(next);
            }
        }
        // Answers in flight to the old leader die with its sessions (this one never sent
        // those commands).
        self.delayed
            .retain(|(_, _, _, i, _)| !matches!(i, Input::CommandDone(_)));
        self.drive_leases();
    }

    /// The monitor the majority elects after `from`: the next one that is up and not cut off.
    fn candidate(&self, from: usize) -> Option<usize> {
        let n = self.monitors.len();
        (1..=n)
            .map(|k| (from + k) % n)
            .find(|i| self.monitors[*i].alive && !self.monitors[*i].cut)
    }

    /// `m` wins an election in the next term. The monitors of the majority hear the new term
    /// (an old leader among them steps down); a cut-off one does not and keeps believing.
    fn elect(&mut self, m: usize) {
        self.term += 1;
        for (i, o) in self.monitors.iter_mut().enumerate() {
            if i != m && o.alive && !o.cut {
                o.raft_leading = None;
            }
        }
        self.monitors[m].raft_leading = Some(self.term);
        self.leader = Some(m);
        self.election_at = None;
        if !self.sole_voter() {
            self.log.push(format!(
                "{:>6} ELECTION monitor node {} leads term {} (Raft)",
                self.now, self.monitors[m].node, self.term
            ));
        }
    }

    /// Monitor `m`'s process dies: its engine, lease and sessions with it. Its agents notice
    /// when the transport's idle timeout passes (no close frame comes from a dead process).
    fn crash_monitor(&mut self, m: usize) {
        let now = self.now;
        let node = self.monitors[m].node;
        self.monitors[m].alive = false;
        self.monitors[m].restart_at = Some(now + MONITOR_RESTART_MS);
        self.monitors[m].storage_leader = None;
        for h in self.hosts.values_mut() {
            if h.session == Some(m) {
                h.session = None;
                h.reconnect_after = h.reconnect_after.max(now + SESSION_IDLE_MS);
            }
        }
        self.delayed.retain(|(_, _, _, _, to)| *to != m);
        self.pending.retain(|(_, _, _, to)| *to != m);
        // Its fence agents run on (their own process group) and power the host off; their
        // answer reaches no one.
        for f in &mut self.pending_fence {
            if f.2 == m {
                f.2 = ORPHANED;
            }
        }
        self.log
            .push(format!("{now:>6} MONITOR node {node} crashed"));
    }

    /// `partition-leader on|off [hosts]`: the leader (on) cut from the other monitors, and
    /// with `hosts` from every agent too; it keeps running and Raft keeps telling it it leads.
    /// Off: it hears the majority again, steps down if a newer term was elected meanwhile,
    /// and catches up with the log.
    fn partition_leader(&mut self, on: bool, hosts: bool) {
        if on {
            let Some(m) = self.leader.filter(|m| self.monitors[*m].alive) else {
                return;
            };
            let several = !self.sole_voter();
            if several && !self.monitors[m].cut {
                self.monitors[m].stale_state = Some(self.state.clone());
            }
            self.monitors[m].cut = several;
            self.monitors[m].cut_hosts = hosts;
            self.monitors[m].cut_at = self.now;
            return;
        }
        let term = self.term;
        for mon in self.monitors.iter_mut() {
            if mon.cut || mon.cut_hosts {
                mon.cut = false;
                mon.cut_hosts = false;
                mon.stale_state = None;
                if mon.raft_leading.is_some_and(|t| t < term) {
                    mon.raft_leading = None;
                }
            }
        }
    }

    /// Raft among the monitors: crashed ones come back (followers, fresh processes), and a
    /// majority that hears no leader elects one after an election timeout.
    fn raft_step(&mut self) {
        let now = self.now;
        for i in 0..self.monitors.len() {
            if self.monitors[i].restart_at.is_some_and(|t| t <= now) {
                let node = self.monitors[i].node;
                self.monitors[i] = self.fresh_monitor(node);
                self.log.push(format!(
                    "{now:>6} MONITOR node {node} restarted (a follower)"
                ));
            }
        }
        // Led: the leader of the current term is up and in the majority (a crashed leader
        // that came back is a follower: it leads nothing until elected again).
        let led = self.leader.is_some_and(|l| {
            let o = &self.monitors[l];
            o.alive && !o.cut && o.raft_leading == Some(self.term)
        });
        let majority = self.monitors.iter().position(|o| o.alive && !o.cut);
        match majority {
            Some(any) if !led && self.has_quorum(any) => {
                let at = *self.election_at.get_or_insert(now + ELECTION_TIMEOUT_MS);
                if now >= at {
                    if let Some(c) = self.candidate(self.leader.unwrap_or(0)) {
                        self.elect(c);
                    }
                }
            }
            _ => self.election_at = None,
        }
    }

    /// Each agent's isolation guard: the agent's own pure decisions
    /// (`vigil_common::isolation::decide` and `vigil_common::storage::request_binds`, the code
    /// that ships), fed with what the simulated agent knows; one fencing episode at a time
    /// (starts refused, one report), and its host watchdog, fed exactly while the decision is
    /// "keep".
    fn isolation_guards(&mut self) {
        use std::time::Duration;
        use vigil_common::isolation::{
            decide, feeds_watchdog, Freshness, LeaseStatus, PoolEvidence, Verdict,
        };
        let now = self.now;
        let t0 = self.t0;
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let pool = self.pool.clone();
        let lease = self.lease.clone();
        let leader_at = self.leader_record_at;
        let epoch_at = self.leader_epoch_at;
        let record = self.record_read.clone();
        let watchdog = self.watchdog_ms;
        let ha = self.ha.clone();
        let names: Vec<String> = self.hosts.keys().cloned().collect();
        for name in names {
            let Some(h) = self.hosts.get_mut(&name) else {
                continue;
            };
            if !(h.powered && h.agent_alive) {
                continue;
            }
            // The episode ends once a grant came for a beat sent after it began.
            if h.episode
                .is_some_and(|(_, since)| h.last_grant.is_some_and(|g| g > since))
            {
                h.episode = None;
                h.fenced_reason = None;
                h.self_fenced = false;
            }
            // The real agent's rule: bound to this instance and the current leader.
            let request = h.slot.clone().filter(|r| {
                h.storage_ok
                    && vigil_common::storage::request_binds(
                        r,
                        &name,
                        h.instance,
                        h.known_term,
                        &h.withdrawn,
                    )
                    .is_ok()
                    && h.ack.as_ref().is_none_or(|a| a.id != r.id)
            });
            let pools: Vec<PoolEvidence> = pool
                .iter()
                .map(|p| PoolEvidence {
                    name: p.clone(),
                    checked: true,
                    ok: h.storage_ok,
                    leader_changed_at: leader_at.map(at),
                    leader_epoch_since: epoch_at.map(at),
                    // The real agent's rule (agent/src/isolation.rs): a held record
                    // condemns nobody.
                    condemns_us: record.condemns(&name),
                    fence_request: request.clone(),
                })
                .collect();
            let status = if now < h.lease_until {
                LeaseStatus::Valid {
                    remaining: Duration::from_millis(h.lease_until - now),
                }
            } else {
                LeaseStatus::Expired {
                    ago: Duration::from_millis(now - h.lease_until),
                }
            };
            let verdict = decide(
                at(now),
                status,
                lease.duration_ms,
                lease.isolation_response,
                Freshness {
                    renewed_at: at(h.last_grant.unwrap_or(h.agent_started_at)),
                    after: Duration::from_millis(2 * 500 + 100),
                },
                &pools,
                h.unmanaged_at
                    .filter(|t| now.saturating_sub(*t) < lease.duration_ms)
                    .map(|_| "protocol version mismatch (simulated)"),
            );
            if feeds_watchdog(&verdict) && watchdog.is_some() {
                h.watchdog_fed = Some(now);
            }
            let request = match &verdict {
                Verdict::SelfFence { request, .. } => request.clone(),
                Verdict::Keep(_) => None,
            };
            // The simulator's log keeps short, stable labels.
            let reason = match &verdict {
                Verdict::Keep(_) => None,
                Verdict::SelfFence { .. } => Some(match &request {
                    Some(r) => format!("fence request {} in its storage slot", r.id),
                    None if !h.storage_ok => "lease expired, storage unreachable".to_string(),
                    None => "lease expired, leader record fresh".to_string(),
                }),
            };
            let Some(reason) = reason else {
                continue;
            };
            let new_episode = h.episode.is_none();
            let episode_id = match h.episode {
                Some((id, _)) => id,
                None => {
                    let id = WALL0 + now;
                    h.episode = Some((id, now));
                    id
                }
            };
            let stale_ack = h.stale_ack && request.is_some();
            let victims: Vec<String> = h
                .domains
                .iter()
                .filter(|(u, d)| d.running && ha.contains_key(*u) && !stale_ack)
                .map(|(u, _)| u.clone())
                .collect();
            if victims.is_empty() && !new_episode && request.is_none() {
                continue;
            }
            if !victims.is_empty() || new_episode {
                // Reported before the destroys, once per episode (again if more went), as
                // the real agent does.
                h.queued.push(Input::SelfFenced(SelfFenceReport {
                    host: name.clone(),
                    id: episode_id,
                    reason: reason.clone(),
                    destroyed: victims.clone(),
                }));
            }
            for u in &victims {
                if let Some(d) = h.domains.get_mut(u) {
                    d.running = false;
                    d.reason = StateReason::Destroyed;
                    h.obs_seq += 1;
                    let seq = h.obs_seq;
                    h.queued.push(Input::DomainEvent(LifecycleReport {
                        host: name.clone(),
                        event: DomainEvent {
                            uuid: u.clone(),
                            name: format!("vm-{u}"),
                            kind: LifecycleKind::Destroyed,
                            raw_event: RAW_EVENT_STOPPED,
                            raw_detail: 0,
                            at_ms: WALL0 + now,
                        },
                        generation: Some(d.generation),
                        seq,
                    }));
                }
            }
            if let Some(r) = request {
                // After the destroys nothing HA runs: every VM the request named is off
                // (an agent trusting an empty cache claims nothing, like the old agent).
                let verified_off = if stale_ack {
                    Vec::new()
                } else {
                    r.vms
                        .iter()
                        .filter(|u| h.domains.get(*u).is_none_or(|d| !d.running))
                        .cloned()
                        .collect()
                };
                h.ack = Some(FenceAck {
                    id: r.id,
                    host: name.clone(),
                    instance: h.instance,
                    destroyed: victims.clone(),
                    wall_ms: WALL0 + now,
                    verified_off,
                });
            }
            h.self_fenced = true;
            // Every HA domain is gone (the stale-ack fault aside): the agent disarms its
            // watchdog (magic close).
            if !stale_ack {
                h.watchdog_fed = None;
            }
            self.log.push(format!(
                "{now:>6} SELF-FENCE {name}: {reason} ({} destroyed)",
                victims.len()
            ));
            h.fenced_reason = Some(reason);
        }
    }

    /// Storage: agents write their heartbeats; the leader writes its record and reads the
    /// heartbeats and acknowledgements (every 500 ms).
    fn storage_cycle(&mut self) {
        let Some(pool) = self.pool.clone() else {
            return;
        };
        let now = self.now;
        for h in self.hosts.values_mut() {
            if h.powered && h.agent_alive && h.storage_ok {
                let seq = h.storage_hb.as_ref().map(|s| s.seq + 1).unwrap_or(1);
                h.storage_hb = Some(StorageHeartbeat {
                    host: String::new(),
                    instance: h.instance,
                    agent_mono_ms: now - h.agent_started_at,
                    seq,
                    wall_ms: WALL0 + now,
                    fenced: h.self_fenced,
                });
            }
        }
        // Every monitor's storage worker runs its cycle; only one whose engine holds the
        // lease (`set_leader`) and keeps publishing writes the leader record.
        for m in 0..self.monitors.len() {
            if self.monitors[m].alive {
                self.monitor_storage_cycle(m, &pool);
            }
        }
    }

    /// One storage cycle of monitor `m` (what `monitor/src/storage.rs` does and reports).
    fn monitor_storage_cycle(&mut self, m: usize, pool: &str) {
        let now = self.now;
        if !self.monitor_storage_ok {
            self.feed(
                m,
                Input::Storage {
                    pool: pool.to_string(),
                    result: Err(crate::storage::PoolFault::Io("simulated outage".into())),
                },
            );
            return;
        }
        // The record is written only while the engine keeps deciding (publishing).
        let mon = &self.monitors[m];
        let published = mon.storage_leader.and_then(|(term, node)| {
            mon.record_published
                .as_ref()
                .filter(|(t, _, _)| now.saturating_sub(*t) <= 1_000)
                .map(|(_, c, hold)| (term, node, c.clone(), *hold))
        });
        if let Some((term, node, c, hold)) = &published {
            if self
                .leader_record_at
                .is_none_or(|t| now.saturating_sub(t) > self.lease.duration_ms)
            {
                self.leader_epoch_at = Some(now);
            }
            self.leader_record_at = Some(now);
            self.record_read = LeaderRecord {
                term: *term,
                node: *node,
                seq: self.record_read.seq + 1,
                wall_ms: now,
                condemned: c.clone(),
                hold: *hold,
            };
            // Agents learn the term from the record they read.
            for h in self.hosts.values_mut() {
                if h.powered && h.agent_alive && h.storage_ok {
                    h.known_term = h.known_term.max(*term);
                }
            }
        }
        let heartbeats = self
            .hosts
            .iter()
            .filter_map(|(n, h)| {
                h.storage_hb.clone().map(|mut hb| {
                    hb.host = n.clone();
                    hb
                })
            })
            .collect();
        let acks = self.hosts.values().filter_map(|h| h.ack.clone()).collect();
        let condemned = if published.is_some() {
            // As the monitor's storage worker reports it (monitor/src/storage.rs).
            self.record_read.condemned_hosts()
        } else {
            Vec::new()
        };
        self.feed(
            m,
            Input::Storage {
                pool: pool.to_string(),
                result: Ok(StorageCycle {
                    leader_written: published.is_some(),
                    condemned,
                    heartbeats,
                    acks,
                }),
            },
        );
    }

    fn engine_policy(&self) -> RecoveryConfig {
        self.policy.clone()
    }

    /// The cluster-wide sections of every simulated monitor's file.
    fn cluster_settings(&self) -> vigil_common::settings::ClusterSettings {
        use vigil_common::config::{FenceHostConfig, FencingConfig};
        vigil_common::settings::ClusterSettings {
            detector: detector(),
            recovery: self.engine_policy(),
            lease: self.lease.clone(),
            fencing: FencingConfig {
                timeout_ms: self.failover.fence_agent_limit_ms,
                mass_failure_percent: self.failover.mass_failure_percent,
                mass_failure_window_ms: self.failover.mass_failure_window_ms,
                storage_slot: self.failover.storage_slot,
                hosts: self
                    .failover
                    .fence_hosts
                    .iter()
                    .map(|h| FenceHostConfig {
                        host: h.clone(),
                        agent: "fence_sim".into(),
                        options: Default::default(),
                        timeout_ms: None,
                        netns: None,
                    })
                    .collect(),
            },
        }
    }

    /// Carries out a start order the way the real agent does (`agent/src/executor.rs`), with
    /// its own decisions: `vigil_common::generation_guard::{admit_order, start_verdict}`.
    fn agent_start(&mut self, host: &str, uuid: &str, generation: u64) -> CommandOutcome {
        let crash = self.crash_on_start.contains(uuid);
        let Some(h) = self.hosts.get_mut(host) else {
            return CommandOutcome::Failed {
                reason: "no such host".into(),
            };
        };
        // 1. No start while fencing, never a stale order; the generation is recorded as the
        // newest seen before anything else happens.
        if let Err(refusal) =
            admit_order(h.episode.is_some(), h.newest.get(uuid).copied(), generation)
        {
            return CommandOutcome::Failed {
                reason: refusal.reason(uuid, generation),
            };
        }
        raise(&mut h.newest, uuid, generation);
        // 2. Defined from the order if this host does not have it.
        let d = h.domains.entry(uuid.to_string()).or_insert(SimDomain {
            running: false,
            generation,
            reason: StateReason::NeverStarted,
        });
        // 3. This very activation already running, a second copy, a late duplicate.
        let here = if d.running {
            LocalCopy::Running {
                generation: Some(d.generation),
            }
        } else {
            LocalCopy::NotRunning
        };
        match start_verdict(here, h.started.get(uuid).copied(), generation) {
            StartVerdict::Start => {}
            StartVerdict::AlreadyRunning => {
                return CommandOutcome::Done {
                    detail: format!("{uuid} already running with generation {generation}"),
                }
            }
            StartVerdict::Refused(refusal) => {
                return CommandOutcome::Failed {
                    reason: refusal.reason(uuid, generation),
                }
            }
        }
        // Recorded before libvirt is asked, as the agent does: a start libvirt refuses has
        // used up its generation.
        raise(&mut h.started, uuid, generation);
        // 4. libvirt starts it (or refuses).
        if h.start_fails {
            return CommandOutcome::Failed {
                reason: "libvirt refused".into(),
            };
        }
        let Some(d) = h.domains.get_mut(uuid) else {
            return CommandOutcome::Failed {
                reason: "vanished".into(),
            };
        };
        d.running = true;
        d.generation = generation;
        d.reason = StateReason::Booted;
        if crash {
            // Reports success, then dies right away.
            self.pending_crash
                .push((self.now + 50, host.to_string(), uuid.to_string()));
        }
        CommandOutcome::Done {
            detail: format!("{uuid} started with generation {generation}"),
        }
    }

    /// Advances to `until`, applying faults at their times. Returns the first violation.
    pub fn run(&mut self, sc: &Scenario) -> Result<(), Violation> {
        let mut faults = sc.faults.clone().into_iter().peekable();
        while self.now <= sc.until {
            while faults.peek().is_some_and(|(t, _)| *t <= self.now) {
                if let Some((_, f)) = faults.next() {
                    self.apply_fault(f);
                }
            }
            self.step();
            self.check()?;
            self.now += STEP_MS;
        }
        Ok(())
    }

    fn step(&mut self) {
        // systemd restarts killed agents; a restarted agent keeps its persisted lease.
        let now = self.now;
        let due: Vec<String> = self
            .hosts
            .iter()
            .filter(|(_, h)| h.powered && !h.agent_alive && h.restart_at.is_some_and(|t| t <= now))
            .map(|(n, _)| n.clone())
            .collect();
        for name in due {
            let instance = self.new_instance();
            if let Some(h) = self.hosts.get_mut(&name) {
                h.start_agent(instance, now);
            }
        }
        self.isolation_guards();
        if let Some(w) = self.watchdog_ms {
            let now = self.now;
            let expired: Vec<String> = self
                .hosts
                .iter()
                .filter(|(_, h)| h.powered && h.watchdog_fed.is_some_and(|t| now >= t + w))
                .map(|(n, _)| n.clone())
                .collect();
            for name in expired {
                if let Some(h) = self.hosts.get_mut(&name) {
                    h.power_off();
                }
                self.log.push(format!(
                    "{now:>6} WATCHDOG {name}: not fed for {w} ms, host reset"
                ));
            }
        }
        if self.now % 1_000 == 0 {
            let knocking: Vec<String> = self
                .hosts
                .iter()
                .filter(|(_, h)| h.incompatible && h.agent_alive && h.powered && !h.partitioned)
                .map(|(n, _)| n.clone())
                .collect();
            let admin = self.admin().filter(|m| !self.monitors[*m].cut_hosts);
            for host in knocking {
                let Some(m) = admin else {
                    break;
                };
                let now = self.now;
                if let Some(h) = self.hosts.get_mut(&host) {
                    h.unmanaged_at = Some(now);
                }
                self.feed(
                    m,
                    Input::AgentIncompatible {
                        host,
                        detail: "protocol version mismatch (simulated)".into(),
                    },
                );
            }
        }
        self.raft_step();
        self.flush_backlogs();
        self.drive_leases();
        self.deliver_delayed();
        if self.now % 500 == 0 {
            self.storage_cycle();
        }
        // Crashes right after start.
        let due = take_due(&mut self.pending_crash, self.now, |(t, _, _)| *t);
        for (_, h, u) in due {
            self.stop_event(&h, &u, LifecycleKind::Crashed, StateReason::Crashed);
        }
        // Agents: (re)connect, heartbeat, inventory.
        let names: Vec<String> = self.hosts.keys().cloned().collect();
        for name in &names {
            let Some(h) = self.hosts.get(name).cloned() else {
                continue;
            };
            // A monitor that no longer takes agents closes its sessions (NOT_LEADER, as
            // `server::follow_leadership` does: at once when Raft's view changes, else on its
            // sweep every 500 ms): its agents go to the leader.
            let closes = |m: usize| {
                self.monitors[m].raft_leading.is_none()
                    || (self.now % 500 == 0 && !self.takes_agents(m))
            };
            if let Some(m) = h.session.filter(|m| closes(*m)) {
                let now = self.now;
                if let Some(hm) = self.hosts.get_mut(name) {
                    hm.session = None;
                    hm.reconnect_after = hm.reconnect_after.max(now + AGENT_REDIAL_MS);
                }
                self.feed(m, Input::AgentDisconnected { host: name.clone() });
                self.answers_lost(name);
                continue;
            }
            let linked = match h.session {
                Some(m) => self.links(name, m),
                None => h.reachable(),
            };
            if !linked {
                // A QUIC session outlives a short partition (until its idle timeout): the
                // monitor hears nothing, but no disconnect either.
                let cut_at = h.session.and_then(|m| {
                    self.monitors[m]
                        .cut_hosts
                        .then_some(self.monitors[m].cut_at)
                });
                let since = if h.partitioned {
                    h.partitioned_at
                } else {
                    cut_at
                };
                let session_survives = h.powered
                    && h.agent_alive
                    && (h.partitioned || cut_at.is_some())
                    && since.is_some_and(|t| self.now < t + SESSION_IDLE_MS);
                if let Some(m) = h.session.filter(|_| !session_survives) {
                    if let Some(hm) = self.hosts.get_mut(name) {
                        hm.session = None;
                    }
                    self.feed(m, Input::AgentDisconnected { host: name.clone() });
                    self.answers_lost(name);
                }
                continue;
            }
            let facts = HostFacts {
                memory_available_bytes: self.memory_gib.get(name).copied().unwrap_or(16) << 30,
                ..HostFacts::default()
            };
            if h.session.is_none() && self.now < h.reconnect_after {
                continue;
            }
            if h.session.is_some() && !h.queued.is_empty() {
                // A session that survived a partition delivers what queued up meanwhile.
                self.deliver_queued(name);
            }
            let m = match h.session {
                Some(m) => m,
                None => {
                    let Some(m) = self.admitting(name) else {
                        continue;
                    };
                    // The welcome: the interval the engine runs with (as agent_link asks it).
                    let every = self.monitors[m].engine.heartbeat_interval_ms().max(STEP_MS);
                    if let Some(hm) = self.hosts.get_mut(name) {
                        hm.session = Some(m);
                        if hm.beat_every_ms != every {
                            hm.beat_every_ms = every;
                            hm.next_beat_at = self.now;
                        }
                    }
                    self.feed(
                        m,
                        Input::AgentConnected(Hello {
                            host: name.clone(),
                            zone: h.zone.clone(),
                            cluster: h.cluster.clone(),
                            agent_version: "sim".into(),
                            facts: facts.clone(),
                            instance: h.instance,
                            pools: self.pool.iter().cloned().collect(),
                            addr: Some(std::net::IpAddr::from([198, 18, 0, 1])),
                        }),
                    );
                    // What happened while cut off, then the current inventory (as the session).
                    self.deliver_queued(name);
                    let domains = self.domain_infos(name);
                    let seq = self.hosts.get_mut(name).map_or(0, SimHost::observe);
                    self.feed(
                        m,
                        Input::Inventory(Listing {
                            host: name.clone(),
                            domains,
                            health: HypervisorHealth::Healthy,
                            seq,
                        }),
                    );
                    m
                }
            };
            if self.now >= h.next_beat_at {
                // Multiples of the interval until it changes (the old fixed 100 ms cadence).
                if let Some(hm) = self.hosts.get_mut(name) {
                    hm.next_beat_at = (self.now / hm.beat_every_ms + 1) * hm.beat_every_ms;
                }
                let pools = self
                    .pool
                    .iter()
                    .map(|p| PoolStatus {
                        name: p.clone(),
                        ok: h.storage_ok,
                        detail: if h.storage_ok {
                            String::new()
                        } else {
                            "simulated I/O error".into()
                        },
                    })
                    .collect();
                self.feed(
                    m,
                    Input::Heartbeat(Beat {
                        host: name.clone(),
                        seq: self.now,
                        facts,
                        mono_ms: self.now - h.agent_started_at,
                        pools,
                        watchdog_ms: self.watchdog_ms.filter(|_| h.watchdog_fed.is_some()),
                    }),
                );
            }
            if self.now % 500 == 0 {
                let domains = self.domain_infos(name);
                // Like the real agent: the definitions of HA domains, shipped on polls.
                for d in &domains {
                    if self.ha.contains_key(&d.uuid) {
                        self.feed(
                            m,
                            Input::Definition(DefinitionReport {
                                host: name.clone(),
                                uuid: d.uuid.clone(),
                                xml: format!("<domain><uuid>{}</uuid></domain>", d.uuid),
                            }),
                        );
                    }
                }
                self.report_listing(name, domains);
            }
        }
        self.stale_check();
        // Commands that are due.
        let due = take_due(&mut self.pending, self.now, |(t, _, _, _)| *t);
        for (_, host, command, m) in due {
            // The order reaches the agent only over its session with the monitor that sent it.
            let alive = self.hearing(&host) == Some(m) && self.links(&host, m);
            let result = if !alive {
                Err(CommandError::NotConnected(host.clone()))
            } else {
                match &command {
                    AgentCommand::StartDomain {
                        uuid, generation, ..
                    } => {
                        let (u, g) = (uuid.clone(), *generation);
                        let outcome = self.agent_start(&host, &u, g);
                        if self.hosts.get(&host).is_some_and(|h| h.drop_answers) {
                            Err(CommandError::Timeout(
                                host.clone(),
                                crate::service::COMMAND_TIMEOUT,
                            ))
                        } else {
                            Ok(outcome)
                        }
                    }
                    AgentCommand::DestroyDomain { uuid } => {
                        let u = uuid.clone();
                        self.stop_event(
                            &host,
                            &u,
                            LifecycleKind::Destroyed,
                            StateReason::Destroyed,
                        );
                        Ok(CommandOutcome::Done {
                            detail: "destroyed".into(),
                        })
                    }
                    AgentCommand::Ping { nonce } => Ok(CommandOutcome::Pong { nonce: *nonce }),
                    AgentCommand::ProbeHost { host: target, .. } => {
                        // A partition cuts the host's network: peers do not reach it either.
                        let up = self
                            .hosts
                            .get(target)
                            .is_some_and(|t| t.powered && !t.partitioned);
                        Ok(CommandOutcome::Done {
                            detail: if up {
                                "reachable: connection refused by its kernel".into()
                            } else {
                                "unreachable: no answer".into()
                            },
                        })
                    }
                }
            };
            // Stamped when the command finished, like the real agent's answers; late with
            // `reorder-reports H on all`.
            let (seq, late, instance) = match (&result, self.hosts.get_mut(&host)) {
                (Ok(_), Some(h)) => {
                    let seq = h.observe();
                    (Some(seq), h.late_by(false, seq), h.instance)
                }
                _ => (None, 0, 0),
            };
            let answer = Input::CommandDone(CommandAnswer {
                host: host.clone(),
                command,
                result,
                seq,
            });
            if late == 0 {
                self.feed(m, answer);
            } else {
                self.delayed
                    .push((self.now + late, host, instance, answer, m));
            }
        }
        // Fence agents that are due.
        let fences = take_due(&mut self.pending_fence, self.now, |(t, _, _)| *t);
        for (_, host, m) in fences {
            let result = match self.hosts.get_mut(&host) {
                Some(h) if !h.fence_fails => {
                    h.power_off();
                    Ok("simulated BMC confirmed power off".to_string())
                }
                _ => Err(FenceFailure::Agent(std::sync::Arc::new(
                    FenceError::Timeout {
                        agent: "simulated BMC".into(),
                        action: FenceAction::Off,
                        after: std::time::Duration::from_secs(20),
                    },
                ))),
            };
            let by = if m == ORPHANED {
                " (run by a monitor that crashed)".to_string()
            } else if self.sole_voter() {
                String::new()
            } else {
                format!(" (run by monitor node {})", self.monitors[m].node)
            };
            self.log
                .push(format!("{:>6} FENCE {host}{by}: {result:?}", self.now));
            self.feed(m, Input::FenceDone { host, result });
        }
        // Anti-affinity groups, once the VMs are registered.
        for (uuid, group) in take_once_known(&mut self.groups, |u| self.state.vms.contains_key(u)) {
            self.state.apply(&StateCommand::SetAntiAffinity {
                at_ms: self.wall(),
                uuid,
                group: Some(group),
            });
        }
        // Host tags, once the hosts are registered.
        for (host, tag) in take_once_known(&mut self.tags, |h| self.state.hosts.contains_key(h)) {
            self.state.apply(&StateCommand::AddTag {
                at_ms: self.wall(),
                host,
                tag,
            });
        }
        for m in 0..self.monitors.len() {
            self.feed(m, Input::Tick);
        }
        self.stale_check();
        self.fire_waiting();
    }

    /// `when` faults whose condition the committed state now shows.
    fn fire_waiting(&mut self) {
        let waiting = std::mem::take(&mut self.waiting);
        for (trigger, fault, until) in waiting {
            let holds = match &trigger {
                Trigger::Fencing(h) => self
                    .state
                    .hosts
                    .get(h)
                    .is_some_and(|r| matches!(r.phase, HostPhase::Fencing { .. })),
                Trigger::Recovering(u) => self
                    .state
                    .vms
                    .get(u)
                    .is_some_and(|v| matches!(v.phase, Phase::Recovering { .. })),
            };
            if holds {
                self.log
                    .push(format!("{:>6} WHEN {trigger:?} holds", self.now));
                self.apply_fault(fault);
            } else if self.now >= until {
                self.log.push(format!(
                    "{:>6} WHEN {trigger:?} never held: dropped",
                    self.now
                ));
            } else {
                self.waiting.push((trigger, fault, until));
            }
        }
    }

    /// Delivers what `host`'s agent queued up while it was cut off.
    fn deliver_queued(&mut self, host: &str) {
        let queued = self
            .hosts
            .get_mut(host)
            .map(|hm| std::mem::take(&mut hm.queued))
            .unwrap_or_default();
        for q in queued {
            self.report(host, q);
        }
    }

    /// An operator's command through monitor `m`'s admin API: committed when `m` can commit
    /// (else refused: no quorum answers), then the engine is told, as after any commit.
    fn commit(&mut self, m: usize, cmd: StateCommand) {
        if !self.commits(m) {
            self.log.push(format!(
                "{:>6} REFUSED the write did not commit (no quorum)",
                self.now
            ));
            return;
        }
        self.state.apply(&cmd);
        self.feed(m, Input::Applied);
    }

    /// The agents' own stale check (the real agent destroys stale copies on each poll and when
    /// it learns a newer generation), with the agent's decision
    /// (`vigil_common::generation_guard::stale_verdict`); run at the start and at the end of
    /// every step, since a newer generation can be announced in the middle of one.
    fn stale_check(&mut self) {
        let names: Vec<String> = self.hosts.keys().cloned().collect();
        for name in &names {
            let stale: Vec<(String, u64, u64)> = self
                .hosts
                .get(name)
                .filter(|h| h.agent_alive && h.powered)
                .map(|h| {
                    h.domains
                        .iter()
                        .filter(|(_, d)| d.running)
                        .filter_map(|(u, d)| {
                            match stale_verdict(Some(d.generation), h.newest.get(u).copied()) {
                                StaleVerdict::Stale { newest, .. } => {
                                    Some((u.clone(), d.generation, newest))
                                }
                                StaleVerdict::Current => None,
                            }
                        })
                        .collect()
                })
                .unwrap_or_default();
            for (u, found, newest) in stale {
                if let Some(d) = self.hosts.get_mut(name).and_then(|h| h.domains.get_mut(&u)) {
                    d.running = false;
                    d.reason = StateReason::Destroyed;
                }
                if !self.hosts.get(name).is_some_and(SimHost::reachable) {
                    continue;
                }
                self.report(
                    name,
                    Input::StaleDestroyed(StaleCopyDestroyed {
                        host: name.clone(),
                        uuid: u,
                        found: Some(found),
                        newest,
                    }),
                );
            }
        }
    }

    /// The one rule, checked after every step.
    /// The agents a notification from monitor `m` to `host` (every host: `None`) reaches:
    /// those with a session to `m` over a link that works.
    fn reached_by(&self, m: usize, host: Option<String>) -> Vec<String> {
        let targets: Vec<String> = match host {
            Some(h) => vec![h],
            None => self.hosts.keys().cloned().collect(),
        };
        targets
            .into_iter()
            .filter(|t| self.hearing(t) == Some(m) && self.links(t, m))
            .collect()
    }

    fn check(&self) -> Result<(), Violation> {
        if let Some(detail) = self.plan_mismatch.first() {
            return Err(Violation::PlanMismatch {
                at_ms: self.now,
                detail: detail.clone(),
            });
        }
        let acting = self.acting_leaders();
        if acting.len() > 1 {
            return Err(Violation::TwoLeadersAct {
                at_ms: self.now,
                nodes: acting,
            });
        }
        let mut running: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        for (hn, h) in &self.hosts {
            for (u, d) in &h.domains {
                if d.running {
                    running.entry(u.as_str()).or_default().push(hn.clone());
                    // A live agent destroys stale copies within the same step.
                    if let Some(n) = h.newest.get(u) {
                        if d.generation < *n && h.agent_alive {
                            return Err(Violation::StaleRuns {
                                at_ms: self.now,
                                host: hn.clone(),
                                uuid: u.clone(),
                                found: d.generation,
                                newest: *n,
                            });
                        }
                    }
                }
            }
        }
        for (u, hosts) in running {
            if hosts.len() > 1 {
                return Err(Violation::RunsTwice {
                    at_ms: self.now,
                    uuid: u.to_string(),
                    hosts,
                });
            }
        }
        Ok(())
    }

    /// The replicated event log, with times relative to the start.
    pub fn event_log(&self) -> String {
        let mut out = String::new();
        for e in &self.state.events {
            out.push_str(&format!(
                "{:>6} {:<8} {}\n",
                e.at_ms.saturating_sub(WALL0),
                e.severity,
                e.message.replace(&WALL0.to_string(), "T0")
            ));
        }
        out
    }

    /// The monitors that may act as leader now (their lease task says they serve, and their
    /// engine was told it leads): after healing, exactly one.
    pub fn acting_leaders(&self) -> Vec<u64> {
        self.monitors
            .iter()
            .filter(|m| m.alive && m.clock.serving(self.now).is_some() && m.engine.is_leader())
            .map(|m| m.node)
            .collect()
    }

    /// Faults applied, for the golden file's header.
    pub fn fault_log(&self) -> &[String] {
        &self.log
    }

    pub fn state(&self) -> &ClusterState {
        &self.state
    }

    /// Whether every VM is running somewhere, or deliberately not (stopped / gave up).
    pub fn settled(&self) -> Vec<String> {
        let mut unsettled = Vec::new();
        for (u, vm) in &self.state.vms {
            use crate::state::Phase;
            let ok = match vm.phase {
                Phase::Stopped { .. } | Phase::GaveUp { .. } => true,
                _ => self.host_of(u).is_some(),
            };
            if !ok {
                unsettled.push(format!("{u}: {} on {}", vm.phase.name(), vm.host));
            }
        }
        unsettled
    }
}
