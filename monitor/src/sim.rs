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
//! at 9995 monitor-restart 1500 hv1   # a new leader; hv1's agent reconnects only 1500 ms
//!                                    # later (every agent's when none is named)
//! at 9996 reorder-reports hv1 on     # hv1's listings reach the monitor 400 ms late, after
//!                                    # newer events and answers
//! at 9996 reorder-reports hv1 on all # hv1's listings, lifecycle events and command answers
//!                                    # each 0-400 ms late, varying report by report
//! at 9997 quorum-stall on            # the leader's probes go unanswered: its leader lease runs out
//! run 20000                          # simulate until this time
//!
//! `host NAME [cluster=C] [zone=Z] [tags=a,b] [fence=yes|no] [mem_gib=N]` declares a host
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
use crate::state::{ClusterState, StateCommand};

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
    connected_to_engine: bool,
    /// Agent process id (changes on every agent start) and when it started.
    instance: u64,
    agent_started_at: u64,
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
}

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
    faults: Vec<(u64, Fault)>,
    until: u64,
    pool: Option<String>,
    lease: LeaseConfig,
    /// The agents' host watchdog timeout (`None`: no watchdog on any host).
    watchdog_ms: Option<u64>,
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
                ["at", t, verb, args @ ..] => {
                    let t = num(t)?;
                    let arg = |n: usize| -> Result<String, ScenarioError> {
                        args.get(n)
                            .map(|s| s.to_string())
                            .ok_or_else(|| err(format!("{verb} needs an argument")))
                    };
                    let on = |n: usize| -> Result<bool, ScenarioError> {
                        match args.get(n).copied() {
                            Some("on") => Ok(true),
                            Some("off") => Ok(false),
                            other => Err(err(format!("expected on|off, got {other:?}"))),
                        }
                    };
                    let f = match *verb {
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
                                .ok_or_else(|| err(format!("{verb} needs by=ADMIN")))?;
                            match *verb {
                                "confirm-off" => Fault::ConfirmOff(arg(0)?, by),
                                "fence" => {
                                    Fault::OperatorFence(arg(0)?, by, args.contains(&"force"))
                                }
                                _ => Fault::ReleaseHold(m.get("cluster").cloned(), by),
                            }
                        }
                        "monitor-restart" => Fault::MonitorRestart(
                            num(&arg(0)?)?,
                            args.iter().skip(1).map(|a| a.to_string()).collect(),
                        ),
                        "reorder-reports" => match args.get(2) {
                            None => Fault::ReorderReports(arg(0)?, on(1)?),
                            Some(&"all") => Fault::ReorderAllReports(arg(0)?, on(1)?),
                            Some(other) => {
                                return Err(err(format!(
                                    "reorder-reports H on|off [all]: unexpected {other:?}"
                                )))
                            }
                        },
                        "quorum-stall" => Fault::QuorumStall(on(0)?),
                        other => return Err(err(format!("unknown fault {other:?}"))),
                    };
                    sc.faults.push((t, f));
                }
                ["run", t] => sc.until = num(t)?,
                other => return Err(err(format!("cannot read {other:?}"))),
            }
        }
        sc.faults.sort_by_key(|(t, _)| *t);
        Ok(sc)
    }
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
    engine: Engine,
    state: ClusterState,
    /// `plan` verbs: uuid -> the host the plan placed it on, until its next start order.
    planned: BTreeMap<String, String>,
    /// Start orders that went elsewhere than a plan said.
    plan_mismatch: Vec<String>,
    hosts: BTreeMap<String, SimHost>,
    crash_on_start: BTreeSet<String>,
    /// Commands in flight: (due, host, command, outcome).
    pending: Vec<(u64, String, AgentCommand)>,
    /// Domains that die right after their start: (due, host, uuid).
    pending_crash: Vec<(u64, String, String)>,
    /// HA VMs (marked in their XML) and their priorities.
    ha: BTreeMap<String, i32>,
    policy: RecoveryConfig,
    failover: FailoverConfig,
    /// Fence calls in flight: (due, host).
    pending_fence: Vec<(u64, String)>,
    /// Host tags to set once the hosts registered.
    tags: Vec<(String, String)>,
    /// Anti-affinity groups to set once the VMs registered.
    groups: Vec<(String, String)>,
    memory_gib: BTreeMap<String, u64>,
    now: u64,
    term: u64,
    log: Vec<String>,
    pool: Option<String>,
    lease: LeaseConfig,
    /// Every monitor is down: no inputs, no leader record.
    monitors_down: bool,
    /// The monitor's own view of the pool.
    monitor_storage_ok: bool,
    /// When the leader record last changed on the pool (sim ms), and when its current run
    /// of changes began (after a pause longer than a lease).
    leader_record_at: Option<u64>,
    leader_epoch_at: Option<u64>,
    /// What the engine last published for the leader record, and when (sim ms); and the
    /// hosts condemned by the record on storage.
    record_published: Option<(u64, Vec<String>, bool)>,
    /// The leader record agents read last (the real type, read with its real rules).
    record_read: LeaderRecord,
    watchdog_ms: Option<u64>,
    /// Sim time 0 as an `Instant`, for the shared pure decisions.
    t0: std::time::Instant,
    next_instance: u64,
    vm_pools: BTreeMap<String, Vec<String>>,
    /// Reports on their way to the monitor: (due, host, agent instance, input).
    delayed: Vec<(u64, String, u64, Input)>,
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
            engine: Engine::new(detector(), sc.policy.clone(), 0)
                .with_failover(sc.failover.clone())
                .with_leases(sc.lease.clone(), 500)
                .with_leader_lease(),
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
            now: 0,
            term: 1,
            log: Vec::new(),
            pool: sc.pool.clone(),
            lease: sc.lease.clone(),
            monitors_down: false,
            monitor_storage_ok: true,
            leader_record_at: None,
            leader_epoch_at: None,
            record_published: None,
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
                    connected_to_engine: false,
                    instance: 1,
                    agent_started_at: 0,
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
        sim.input(Input::BecameLeader { term: 1, node: 1 });
        sim
    }

    fn wall(&self) -> u64 {
        WALL0 + self.now
    }

    /// Feeds one input and carries out the actions, as the service task does.
    fn input(&mut self, input: Input) {
        if self.monitors_down {
            return;
        }
        let mut queue = vec![input];
        while let Some(input) = queue.pop() {
            let actions = self
                .engine
                .handle(input, self.now, self.wall(), &self.state);
            let mut applied = false;
            for a in actions {
                match a {
                    Action::Propose(cmd) => {
                        if let StateCommand::OrderStart { uuid, host, .. } = &cmd {
                            if let Some(planned) = self.planned.remove(uuid) {
                                if planned != *host {
                                    self.plan_mismatch.push(format!(
                                        "{uuid}: planned {planned}, ordered on {host}"
                                    ));
                                }
                            }
                        }
                        self.state.apply(&cmd);
                        applied = true;
                    }
                    Action::Send { host, command } => {
                        if let AgentCommand::StartDomain {
                            uuid, generation, ..
                        } = &command
                        {
                            self.define_for_start(&host, uuid, *generation);
                        }
                        self.pending.push((self.now + START_MS, host, command));
                    }
                    Action::Fence { host } => {
                        self.pending_fence.push((self.now + 300, host));
                    }
                    Action::RequestFence(req) => {
                        if self.monitor_storage_ok {
                            if let Some(h) = self.hosts.get_mut(&req.host) {
                                h.slot = Some(req);
                            }
                        }
                    }
                    Action::LeaderRecord { condemned, hold } => {
                        self.record_published = Some((self.now, condemned, hold));
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
                        if let Some(host) = self.hosts.get_mut(&h) {
                            if host.reachable() {
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
                        if let Some(host) = self.hosts.get_mut(&h) {
                            if host.reachable() {
                                host.withdrawn.insert(id);
                            }
                        }
                    }
                    Action::Notify { host, message } => {
                        if let MonitorToAgent::Generations { entries, .. } = message {
                            let targets: Vec<String> = match host {
                                Some(h) => vec![h],
                                None => self.hosts.keys().cloned().collect(),
                            };
                            for t in targets {
                                if let Some(h) = self.hosts.get_mut(&t) {
                                    if h.reachable() {
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
        if h.reachable() {
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
                self.input(report);
            } else {
                // Late (`reorder-reports H on all`): after newer reports, maybe.
                self.delayed
                    .push((self.now + late, host.to_string(), instance, report));
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
                self.monitors_down = true;
                for h in self.hosts.values_mut() {
                    h.connected_to_engine = false;
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
            Fault::MonitorsUp if !self.monitors_down => {}
            Fault::MonitorsUp => {
                self.monitors_down = false;
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
                if !self.monitors_down {
                    let at_ms = self.wall();
                    self.commit(StateCommand::SetMaintenance { at_ms, host: h, on });
                }
            }
            // Operators' commands, checked the way the admin API checks them.
            Fault::ConfirmOff(h, by) => {
                if self.monitors_down {
                    return;
                }
                match self.engine.confirm_off_refusal(&h, self.now) {
                    Some(why) => self.log.push(format!("{:>6} REFUSED {why}", self.now)),
                    None => {
                        let at_ms = self.wall();
                        self.commit(StateCommand::OperatorConfirmedOff { at_ms, host: h, by });
                    }
                }
            }
            Fault::OperatorFence(h, by, force) => {
                if self.monitors_down {
                    return;
                }
                match self.engine.fence_refusal(&h, force, self.now) {
                    Some(why) => self.log.push(format!("{:>6} REFUSED {why}", self.now)),
                    None => self.input(Input::OperatorFence { host: h, by }),
                }
            }
            Fault::Plan(hosts) => {
                match self.engine.plan_failures(&hosts, &self.state, self.wall()) {
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
            Fault::ReleaseHold(cluster, by) => {
                if self.monitors_down {
                    return;
                }
                if self.engine.held_clusters().is_empty() {
                    self.log.push(format!(
                        "{:>6} REFUSED no fencing hold is in place",
                        self.now
                    ));
                } else {
                    self.input(Input::ReleaseHold { cluster, by });
                }
            }
        }
    }

    /// A listing taken now by `host`'s agent (its number stamped now), delivered at once, or
    /// late with `reorder-reports`.
    fn report_listing(&mut self, host: &str, domains: Vec<DomainInfo>) {
        let now = self.now;
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
            self.input(input);
        } else {
            self.delayed
                .push((due, host.to_string(), h.instance, input));
        }
    }

    /// Reports whose time has come, if the agent process that took them still talks to the
    /// monitor (a session that ended takes its queue with it). A command answer waits while
    /// the session lasts (a partition it survives); when it ends, the monitor hears that the
    /// agent disconnected before answering (see [`Sim::answers_lost`]).
    fn deliver_delayed(&mut self) {
        let due = take_due(&mut self.delayed, self.now, |(t, _, _, _)| *t);
        for (t, host, instance, input) in due {
            let (live, session) = self.hosts.get(&host).map_or((false, false), |h| {
                (
                    h.reachable() && h.connected_to_engine && h.instance == instance,
                    h.connected_to_engine && h.instance == instance,
                )
            });
            if live {
                self.input(input);
            } else if session && matches!(input, Input::CommandDone(_)) {
                self.delayed.push((t, host, instance, input));
            }
        }
    }

    /// `host`'s session ended: the answers still in flight on it are lost, and the monitor
    /// hears so (`CommandError::Lost`, as `agent_link` reports a session that ended before
    /// the answer came).
    fn answers_lost(&mut self, host: &str) {
        let (lost, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut self.delayed)
            .into_iter()
            .partition(|(_, h, _, i)| h == host && matches!(i, Input::CommandDone(_)));
        self.delayed = kept;
        for (_, _, _, input) in lost {
            if let Input::CommandDone(answer) = input {
                self.input(Input::CommandDone(CommandAnswer {
                    result: Err(CommandError::Lost(host.to_string())),
                    seq: None,
                    ..answer
                }));
            }
        }
    }

    /// The agent received a start order: like libvirt, it defines the domain (shut off, with
    /// the order's generation in its metadata) before starting it, and its watcher lists the
    /// host again on the "defined" event. That listing shows the domain shut off.
    fn define_for_start(&mut self, host: &str, uuid: &str, generation: u64) {
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
        ));
    }

    fn new_instance(&mut self) -> u64 {
        self.next_instance += 1;
        self.next_instance
    }

    /// A new leader: same replicated state (the log), fresh soft state.
    fn new_leader(&mut self) {
        self.term += 1;
        let policy = self.engine_policy();
        self.engine = Engine::new(detector(), policy, self.now)
            .with_failover(self.failover.clone())
            .with_leases(self.lease.clone(), 500)
            .with_leader_lease();
        for h in self.hosts.values_mut() {
            h.connected_to_engine = false;
        }
        // Answers in flight to the old leader die with its sessions (this one never sent
        // those commands).
        self.delayed
            .retain(|(_, _, _, i)| !matches!(i, Input::CommandDone(_)));
        self.input(Input::BecameLeader {
            term: self.term,
            node: self.term,
        });
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
        if self.monitors_down {
            return;
        }
        if !self.monitor_storage_ok {
            self.input(Input::Storage {
                pool,
                result: Err(crate::storage::PoolFault::Io("simulated outage".into())),
            });
            return;
        }
        // The record is written only while the engine keeps deciding (publishing).
        let published = self
            .record_published
            .as_ref()
            .filter(|(t, _, _)| now.saturating_sub(*t) <= 1_000)
            .map(|(_, c, hold)| (c.clone(), *hold));
        if let Some((c, hold)) = &published {
            if self
                .leader_record_at
                .is_none_or(|t| now.saturating_sub(t) > self.lease.duration_ms)
            {
                self.leader_epoch_at = Some(now);
            }
            self.leader_record_at = Some(now);
            self.record_read = LeaderRecord {
                term: self.term,
                node: 1,
                seq: self.record_read.seq + 1,
                wall_ms: now,
                condemned: c.clone(),
                hold: *hold,
            };
            // Agents learn the term from the record they read.
            let term = self.term;
            for h in self.hosts.values_mut() {
                if h.powered && h.agent_alive && h.storage_ok {
                    h.known_term = h.known_term.max(term);
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
        self.input(Input::Storage {
            pool,
            result: Ok(StorageCycle {
                leader_written: published.is_some(),
                // As the monitor's storage worker reports it (monitor/src/storage.rs).
                condemned: if published.is_some() {
                    self.record_read.condemned_hosts()
                } else {
                    Vec::new()
                },
                heartbeats,
                acks,
            }),
        });
    }

    fn engine_policy(&self) -> RecoveryConfig {
        self.policy.clone()
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
                .filter(|_| !self.monitors_down)
                .map(|(n, _)| n.clone())
                .collect();
            for host in knocking {
                let now = self.now;
                if let Some(h) = self.hosts.get_mut(&host) {
                    h.unmanaged_at = Some(now);
                }
                self.input(Input::AgentIncompatible {
                    host,
                    detail: "protocol version mismatch (simulated)".into(),
                });
            }
        }
        if !self.quorum_stalled {
            let now = self.now;
            self.input(Input::LeaderLease {
                until_ms: Some(now + LEADER_LEASE_MS),
            });
        }
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
            if !h.reachable() {
                // A QUIC session outlives a short partition (until its idle timeout): the
                // monitor hears nothing, but no disconnect either.
                let session_survives = h.powered
                    && h.agent_alive
                    && h.partitioned
                    && h.partitioned_at
                        .is_some_and(|t| self.now < t + SESSION_IDLE_MS);
                if h.connected_to_engine && !session_survives {
                    if let Some(hm) = self.hosts.get_mut(name) {
                        hm.connected_to_engine = false;
                    }
                    self.input(Input::AgentDisconnected { host: name.clone() });
                    self.answers_lost(name);
                }
                continue;
            }
            let facts = HostFacts {
                memory_available_bytes: self.memory_gib.get(name).copied().unwrap_or(16) << 30,
                ..HostFacts::default()
            };
            if !h.connected_to_engine && self.now < h.reconnect_after {
                continue;
            }
            if h.connected_to_engine && !h.queued.is_empty() {
                // A session that survived a partition delivers what queued up meanwhile.
                self.deliver_queued(name);
            }
            if !h.connected_to_engine {
                if let Some(hm) = self.hosts.get_mut(name) {
                    hm.connected_to_engine = true;
                }
                self.input(Input::AgentConnected(Hello {
                    host: name.clone(),
                    zone: h.zone.clone(),
                    cluster: h.cluster.clone(),
                    agent_version: "sim".into(),
                    facts: facts.clone(),
                    instance: h.instance,
                    pools: self.pool.iter().cloned().collect(),
                    addr: Some(std::net::IpAddr::from([198, 18, 0, 1])),
                }));
                // What happened while cut off, then the current inventory (as the session).
                self.deliver_queued(name);
                let domains = self.domain_infos(name);
                let seq = self.hosts.get_mut(name).map_or(0, SimHost::observe);
                self.input(Input::Inventory(Listing {
                    host: name.clone(),
                    domains,
                    health: HypervisorHealth::Healthy,
                    seq,
                }));
            }
            if self.now % 100 == 0 {
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
                self.input(Input::Heartbeat(Beat {
                    host: name.clone(),
                    seq: self.now,
                    facts,
                    mono_ms: self.now - h.agent_started_at,
                    pools,
                    watchdog_ms: self.watchdog_ms.filter(|_| h.watchdog_fed.is_some()),
                }));
            }
            if self.now % 500 == 0 {
                let domains = self.domain_infos(name);
                // Like the real agent: the definitions of HA domains, shipped on polls.
                for d in &domains {
                    if self.ha.contains_key(&d.uuid) {
                        self.input(Input::Definition(DefinitionReport {
                            host: name.clone(),
                            uuid: d.uuid.clone(),
                            xml: format!("<domain><uuid>{}</uuid></domain>", d.uuid),
                        }));
                    }
                }
                self.report_listing(name, domains);
            }
        }
        self.stale_check();
        // Commands that are due.
        let due = take_due(&mut self.pending, self.now, |(t, _, _)| *t);
        for (_, host, command) in due {
            let alive = self.hosts.get(&host).is_some_and(SimHost::reachable);
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
                self.input(answer);
            } else {
                self.delayed.push((self.now + late, host, instance, answer));
            }
        }
        // Fence agents that are due.
        let fences = take_due(&mut self.pending_fence, self.now, |(t, _)| *t);
        for (_, host) in fences {
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
            self.log
                .push(format!("{:>6} FENCE {host}: {result:?}", self.now));
            self.input(Input::FenceDone { host, result });
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
        self.input(Input::Tick);
        self.stale_check();
    }

    /// Delivers what `host`'s agent queued up while it was cut off.
    fn deliver_queued(&mut self, host: &str) {
        let queued = self
            .hosts
            .get_mut(host)
            .map(|hm| std::mem::take(&mut hm.queued))
            .unwrap_or_default();
        for q in queued {
            self.input(q);
        }
    }

    /// An operator's command: committed (the simulated Raft commits at once), then the engine
    /// is told, as after any commit.
    fn commit(&mut self, cmd: StateCommand) {
        self.state.apply(&cmd);
        self.input(Input::Applied);
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
                self.input(Input::StaleDestroyed(StaleCopyDestroyed {
                    host: name.clone(),
                    uuid: u,
                    found: Some(found),
                    newest,
                }));
            }
        }
    }

    /// The one rule, checked after every step.
    fn check(&self) -> Result<(), Violation> {
        if let Some(detail) = self.plan_mismatch.first() {
            return Err(Violation::PlanMismatch {
                at_ms: self.now,
                detail: detail.clone(),
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
