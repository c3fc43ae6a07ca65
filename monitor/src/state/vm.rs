//! HA virtual machines in the replicated state: the record, its recovery phase (an explicit
//! state machine), and the budget that stops restart storms.
//!
//! ```text
//!             crash proven (agent reported it stopped)          start ordered (generation+1)
//!  Running ─────────────────────────────────────▶ Backoff ─────────────────────────▶ Recovering
//!     ▲  ▲                                          │ ▲                                 │  │
//!     │  │ seen running again                       │ └──── start failed / timed out ───┘  │
//!     │  └────────────── Stopped ◀── guest shutdown │                                      │
//!     │                  (respected)   or operator  ▼ budget spent                         │
//!     │                                          GaveUp                                    │
//!     └────────────────────────────── agent reports it running with that generation ───────┘
//! ```

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use super::{HostPhase, HostProof};

/// Longest domain definition stored (the inactive XML of one VM).
pub const MAX_DEFINITION_LEN: usize = 256 * 1024;

/// Who marked a VM HA.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HaSource {
    /// `vigilctl vm ha enable|disable`: wins over the domain XML.
    Operator,
    /// The `<vigil:vm ha="true"/>` element in the domain's metadata.
    Metadata,
}

/// Why a VM stopped on purpose.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    GuestShutdown,
    OperatorDestroy,
}

/// What failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// qemu died or the guest crashed.
    Crashed,
    /// The agent could not start it.
    StartFailed,
    /// The start order got no answer in time.
    OrderTimedOut,
    /// Its host failed and was fenced.
    HostFailed,
    /// Its host alone lost the VM's storage; destroyed there to start elsewhere.
    StorageLost,
    /// Moved off a host in maintenance (not a failure: not counted in the budget).
    Maintenance,
}

impl std::fmt::Display for FailureKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FailureKind::Crashed => "crashed",
            FailureKind::StartFailed => "failed to start",
            FailureKind::OrderTimedOut => "start order timed out",
            FailureKind::HostFailed => "lost with its host",
            FailureKind::StorageLost => "lost its storage on its host",
            FailureKind::Maintenance => "stopped to leave a host in maintenance",
        })
    }
}

/// The proof that the previous activation is gone (design brief, "The one rule").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "proof")]
pub enum Proof {
    /// 1. The agent on the old host reported the domain stopped.
    AgentReportedStopped {
        host: String,
        detail: String,
        /// When the agent observed it (Unix ms, the agent's clock), if known.
        #[serde(default)]
        observed_at_ms: Option<u64>,
    },
    /// The agent answered a start order with a failure: nothing runs.
    StartRefused { host: String, detail: String },
    /// The old host was proven off (proof 2, 3 or 4, or an operator): `how` says which.
    HostFenced {
        host: String,
        #[serde(alias = "detail", deserialize_with = "super::host::host_proof_or_text")]
        how: HostProof,
    },
    /// A proof recorded as text by a monitor from before proofs were typed (read from older
    /// state): shown as it was written.
    Recorded { text: String },
}

/// Reads a stored [`Proof`]: the typed form, or the plain text older monitors stored (as
/// [`Proof::Recorded`]). For `#[serde(deserialize_with)]` on the fields that hold one.
fn proof_or_text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Proof, D::Error> {
    super::host::typed_or_text(d, |text| Proof::Recorded { text })
}

impl Proof {
    /// When the fact behind the proof was observed, if known.
    pub fn observed_at_ms(&self) -> Option<u64> {
        match self {
            Proof::AgentReportedStopped { observed_at_ms, .. } => *observed_at_ms,
            Proof::StartRefused { .. } | Proof::HostFenced { .. } | Proof::Recorded { .. } => None,
        }
    }
}

impl std::fmt::Display for Proof {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Proof::AgentReportedStopped { host, detail, .. } => {
                write!(f, "the agent of {host} reported it stopped ({detail})")
            }
            Proof::StartRefused { host, detail } => {
                write!(f, "the agent of {host} could not start it ({detail})")
            }
            Proof::HostFenced { host, how } => write!(f, "host {host} was fenced: {how}"),
            Proof::Recorded { text } => f.write_str(text),
        }
    }
}

/// Where a recovery goes next, decided by the engine's recovery policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "decision")]
pub enum Decision {
    /// Start it again on `host` (the same host: in place; another: relocation) not before
    /// `not_before_ms` (Unix ms; backoff).
    Restart {
        host: String,
        relocate: bool,
        not_before_ms: u64,
        /// Why this host (placement's reasons), or why none yet (`host` empty); empty for a
        /// plain restart in place.
        #[serde(default)]
        why: String,
    },
    /// The restart budget is spent; an operator must look.
    GiveUp { reason: String },
}

/// A VM's recovery phase.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "phase")]
pub enum Phase {
    /// Running (or presumed running) on its host with its current generation.
    Running,
    /// Stopped on purpose; Vigil leaves it alone until it is seen running again.
    Stopped { reason: StopReason, at_ms: u64 },
    /// Waiting to (re)start on `host` not before `not_before_ms`.
    Backoff {
        host: String,
        relocate: bool,
        not_before_ms: u64,
    },
    /// A start with `generation` was ordered on `host` at `ordered_at_ms`.
    Recovering { host: String, ordered_at_ms: u64 },
    /// Budget spent: no more automatic restarts until an operator acts.
    GaveUp { reason: String, at_ms: u64 },
}

impl Phase {
    pub fn name(&self) -> &'static str {
        match self {
            Phase::Running => "running",
            Phase::Stopped { .. } => "stopped",
            Phase::Backoff { .. } => "backoff",
            Phase::Recovering { .. } => "recovering",
            Phase::GaveUp { .. } => "gave-up",
        }
    }
}

/// The last completed recovery, for "why did this VM move?".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecoveryRecord {
    pub at_ms: u64,
    pub from_host: String,
    pub to_host: String,
    pub generation: u64,
    pub cause: String,
    #[serde(deserialize_with = "proof_or_text")]
    pub proof: Proof,
}

/// Why a recovery under way started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingCause {
    pub from_host: String,
    pub cause: String,
    #[serde(deserialize_with = "proof_or_text")]
    pub proof: Proof,
}

/// One HA VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRecord {
    pub uuid: String,
    pub name: String,
    pub ha: bool,
    pub ha_source: HaSource,
    /// Higher restarts first.
    pub priority: i32,
    /// The host it runs on, or was last ordered to run on.
    pub host: String,
    /// Activation generation: raised, and committed, before every start Vigil orders.
    pub generation: u64,
    pub vcpus: u32,
    pub memory_kib: u64,
    pub disks: Vec<String>,
    /// Inactive domain XML, so the VM can be started on another host.
    pub definition: Option<String>,
    pub phase: Phase,
    /// Failure times (Unix ms) inside the budget window, oldest first.
    pub failures: VecDeque<u64>,
    /// Relocation times (Unix ms) inside the budget window.
    pub relocations: VecDeque<u64>,
    /// Why the current recovery started, while one is under way.
    pub pending_cause: Option<PendingCause>,
    pub last_recovery: Option<RecoveryRecord>,
    /// Anti-affinity group: placement keeps VMs of one group on different hosts where it can.
    #[serde(default)]
    pub anti_affinity: Option<String>,
}

use super::{ClusterState, EventKind, Severity, StateCommand, StateResponse};
use vigil_common::names::validate as validate_name;

fn stale(reason: String) -> StateResponse {
    StateResponse::Stale { reason }
}

fn prune(times: &mut VecDeque<u64>, now_ms: u64, window_ms: u64) {
    while times
        .front()
        .is_some_and(|t| now_ms.saturating_sub(*t) > window_ms)
    {
        times.pop_front();
    }
}

/// Applies the VM commands. Every precondition that fails returns `Stale` or an error and
/// changes nothing.
pub(super) fn apply(s: &mut ClusterState, cmd: &StateCommand) -> StateResponse {
    match cmd {
        StateCommand::VmSeen {
            at_ms,
            uuid,
            name,
            host,
            vcpus,
            memory_kib,
            disks,
            meta_ha,
            meta_priority,
            generation,
            running,
        } => {
            let Some(rec) = s.vms.get_mut(uuid) else {
                if *meta_ha != Some(true) {
                    return StateResponse::Unchanged;
                }
                s.vms.insert(
                    uuid.clone(),
                    VmRecord {
                        uuid: uuid.clone(),
                        name: name.clone(),
                        ha: true,
                        ha_source: HaSource::Metadata,
                        priority: meta_priority.unwrap_or(0),
                        host: host.clone(),
                        generation: generation.unwrap_or(0),
                        vcpus: *vcpus,
                        memory_kib: *memory_kib,
                        disks: disks.clone(),
                        definition: None,
                        phase: if *running {
                            Phase::Running
                        } else {
                            Phase::Stopped {
                                reason: StopReason::OperatorDestroy,
                                at_ms: *at_ms,
                            }
                        },
                        failures: VecDeque::new(),
                        relocations: VecDeque::new(),
                        pending_cause: None,
                        last_recovery: None,
                        anti_affinity: None,
                    },
                );
                let message =
                    format!("VM {name} ({uuid}) on {host} is HA (marked in its domain XML)");
                s.vm_event(
                    *at_ms,
                    Severity::Info,
                    host,
                    uuid,
                    EventKind::VmRegistered,
                    message,
                );
                return StateResponse::Ok;
            };
            let mut changed = false;
            if rec.name != *name
                || rec.vcpus != *vcpus
                || rec.memory_kib != *memory_kib
                || rec.disks != *disks
            {
                rec.name = name.clone();
                rec.vcpus = *vcpus;
                rec.memory_kib = *memory_kib;
                rec.disks = disks.clone();
                changed = true;
            }
            if rec.ha_source == HaSource::Metadata {
                if let Some(p) = meta_priority {
                    if rec.priority != *p {
                        rec.priority = *p;
                        changed = true;
                    }
                }
            }
            if let Some(g) = generation {
                if *g > rec.generation && *running {
                    rec.generation = *g;
                    changed = true;
                }
            }
            let event = match (&rec.phase, *running) {
                (Phase::Stopped { .. } | Phase::GaveUp { .. }, true) => {
                    rec.phase = Phase::Running;
                    rec.host = host.clone();
                    rec.failures.clear();
                    rec.relocations.clear();
                    Some((
                        EventKind::VmRunningAgain,
                        Severity::Info,
                        format!("VM {name} is running again on {host} (started outside Vigil's recovery); HA protection resumes"),
                    ))
                }
                (Phase::Running, true) if rec.host != *host => {
                    let from = std::mem::replace(&mut rec.host, host.clone());
                    Some((
                        EventKind::VmMoved,
                        Severity::Info,
                        format!("VM {name} now runs on {host} (was on {from})"),
                    ))
                }
                _ => None,
            };
            if let Some((kind, sev, msg)) = event {
                let message = msg;
                s.vm_event(*at_ms, sev, host, uuid, kind, message);
                return StateResponse::Ok;
            }
            if changed {
                StateResponse::Ok
            } else {
                StateResponse::Unchanged
            }
        }
        StateCommand::SetHa {
            at_ms,
            uuid,
            name,
            host,
            ha,
            priority,
        } => {
            let created = !s.vms.contains_key(uuid);
            let rec = s.vms.entry(uuid.clone()).or_insert_with(|| VmRecord {
                uuid: uuid.clone(),
                name: name.clone(),
                ha: *ha,
                ha_source: HaSource::Operator,
                priority: priority.unwrap_or(0),
                host: host.clone(),
                generation: 0,
                vcpus: 0,
                memory_kib: 0,
                disks: vec![],
                definition: None,
                phase: Phase::Running,
                failures: VecDeque::new(),
                relocations: VecDeque::new(),
                pending_cause: None,
                last_recovery: None,
                anti_affinity: None,
            });
            if !created
                && rec.ha == *ha
                && rec.ha_source == HaSource::Operator
                && priority.is_none_or(|p| p == rec.priority)
            {
                return StateResponse::Unchanged;
            }
            rec.ha = *ha;
            rec.ha_source = HaSource::Operator;
            if let Some(p) = priority {
                rec.priority = *p;
            }
            if *ha && matches!(rec.phase, Phase::GaveUp { .. }) {
                // Re-enabling is how an operator hands a given-up VM back to Vigil.
                rec.phase = Phase::Stopped {
                    reason: StopReason::OperatorDestroy,
                    at_ms: *at_ms,
                };
                rec.failures.clear();
                rec.relocations.clear();
            }
            let prio = rec.priority;
            let rname = rec.name.clone();
            let message = format!(
                "HA {} for VM {rname} by an operator (priority {prio})",
                if *ha { "enabled" } else { "disabled" }
            );
            s.vm_event(
                *at_ms,
                Severity::Info,
                host,
                uuid,
                EventKind::VmHaChanged { ha: *ha },
                message,
            );
            StateResponse::Ok
        }
        StateCommand::StoreDefinition { at_ms, uuid, xml } => {
            if xml.len() > MAX_DEFINITION_LEN {
                return StateResponse::Invalid {
                    reason: format!(
                        "definition of {uuid} is {} bytes; at most {MAX_DEFINITION_LEN} are stored",
                        xml.len()
                    ),
                };
            }
            let Some(rec) = s.vms.get_mut(uuid) else {
                return StateResponse::UnknownVm { vm: uuid.clone() };
            };
            if rec.definition.as_deref() == Some(xml.as_str()) {
                return StateResponse::Unchanged;
            }
            let first = rec.definition.is_none();
            rec.definition = Some(xml.clone());
            let (name, host) = (rec.name.clone(), rec.host.clone());
            let message = format!(
                "{} definition of VM {name} stored ({} bytes)",
                if first { "first" } else { "new" },
                xml.len()
            );
            s.vm_event(
                *at_ms,
                Severity::Info,
                &host,
                uuid,
                EventKind::VmDefinitionStored,
                message,
            );
            StateResponse::Ok
        }
        StateCommand::VmFailed {
            at_ms,
            uuid,
            generation,
            failure,
            proof,
            decision,
            window_ms,
        } => {
            let Some(rec) = s.vms.get_mut(uuid) else {
                return StateResponse::UnknownVm { vm: uuid.clone() };
            };
            if rec.generation != *generation {
                return stale(format!(
                    "failure of generation {generation} of {uuid}, but generation {} is current",
                    rec.generation
                ));
            }
            if !matches!(rec.phase, Phase::Running | Phase::Recovering { .. }) {
                return stale(format!(
                    "failure of {uuid} reported while it is {}",
                    rec.phase.name()
                ));
            }
            if *failure != FailureKind::Maintenance {
                rec.failures.push_back(*at_ms);
            }
            prune(&mut rec.failures, *at_ms, *window_ms);
            prune(&mut rec.relocations, *at_ms, *window_ms);
            let failed_on = match &rec.phase {
                Phase::Recovering { host, .. } => host.clone(),
                _ => rec.host.clone(),
            };
            let cause = format!("{failure} on {failed_on} (generation {generation})");
            let name = rec.name.clone();
            let n = rec.failures.len();
            let (sev, kind, msg) = match decision {
                Decision::Restart {
                    host,
                    relocate,
                    not_before_ms,
                    why,
                } => {
                    rec.phase = Phase::Backoff {
                        host: host.clone(),
                        relocate: *relocate,
                        not_before_ms: *not_before_ms,
                    };
                    if rec.pending_cause.is_none() {
                        rec.pending_cause = Some(PendingCause {
                            from_host: failed_on.clone(),
                            cause: cause.clone(),
                            proof: proof.clone(),
                        });
                    }
                    let wait = not_before_ms.saturating_sub(*at_ms);
                    // A host being fenced takes no start: say what will happen instead of a
                    // restart there (the start is placed when it is due).
                    let fencing = !relocate
                        && s.hosts.get(host.as_str()).is_some_and(|h| {
                            matches!(
                                h.phase,
                                HostPhase::Fencing { .. } | HostPhase::Fenced { .. }
                            )
                        });
                    let plan = match (*relocate, host.is_empty(), why.is_empty()) {
                        (false, _, _) if fencing => format!(
                            "to restart once {host} is back, or elsewhere once it is proven off ({host} is being fenced)"
                        ),
                        (true, true, _) => {
                            format!("relocating once a host can take it ({why})")
                        }
                        (true, false, _) => format!("relocating to {host} ({why})"),
                        (false, _, true) => format!("restarting in place on {host}"),
                        (false, _, false) => format!("restarting in place on {host} ({why})"),
                    };
                    (
                        Severity::Warning,
                        EventKind::VmFailed {
                            generation: *generation,
                            failure: *failure,
                            observed_at_ms: proof.observed_at_ms(),
                        },
                        format!(
                            "VM {name} {cause}; proof: {proof}; failure {n} in the budget window; {plan}{}",
                            if wait > 0 { format!(" after {wait} ms backoff") } else { String::new() }
                        ),
                    )
                }
                Decision::GiveUp { reason } => {
                    rec.phase = Phase::GaveUp {
                        reason: reason.clone(),
                        at_ms: *at_ms,
                    };
                    rec.pending_cause = None;
                    (
                        Severity::Critical,
                        EventKind::VmGaveUp,
                        format!(
                            "VM {name} {cause}; proof: {proof}; giving up: {reason}. Re-enable HA or start it by hand once fixed"
                        ),
                    )
                }
            };
            s.push_vm_event(*at_ms, sev, Some(failed_on), Some(uuid.clone()), kind, msg);
            StateResponse::Ok
        }
        StateCommand::OrderStart {
            at_ms,
            uuid,
            host,
            generation,
        } => {
            let Some(rec) = s.vms.get_mut(uuid) else {
                return StateResponse::UnknownVm { vm: uuid.clone() };
            };
            if !matches!(rec.phase, Phase::Backoff { .. }) {
                return stale(format!(
                    "start of {uuid} ordered while it is {}",
                    rec.phase.name()
                ));
            }
            if *generation != rec.generation + 1 {
                return stale(format!(
                    "start of {uuid} with generation {generation}, expected {}",
                    rec.generation + 1
                ));
            }
            let relocate = matches!(&rec.phase, Phase::Backoff { relocate: true, .. });
            if relocate {
                rec.relocations.push_back(*at_ms);
            }
            rec.generation = *generation;
            let from = std::mem::replace(&mut rec.host, host.clone());
            rec.phase = Phase::Recovering {
                host: host.clone(),
                ordered_at_ms: *at_ms,
            };
            let name = rec.name.clone();
            let why = rec
                .pending_cause
                .as_ref()
                .map(|c| format!("{}; proof: {}", c.cause, c.proof))
                .unwrap_or_default();
            let message = format!(
                    "ordered start of VM {name} on {host} with generation {generation} (was on {from}; {why})"
                );
            s.vm_event(
                *at_ms,
                Severity::Info,
                host,
                uuid,
                EventKind::VmRestartOrdered {
                    generation: *generation,
                    target: host.clone(),
                },
                message,
            );
            StateResponse::Ok
        }
        StateCommand::VmStarted {
            at_ms,
            uuid,
            host,
            generation,
        } => {
            let Some(rec) = s.vms.get_mut(uuid) else {
                return StateResponse::UnknownVm { vm: uuid.clone() };
            };
            let Phase::Recovering {
                host: target,
                ordered_at_ms,
            } = &rec.phase
            else {
                return stale(format!(
                    "{uuid} reported started while {}",
                    rec.phase.name()
                ));
            };
            if target != host || rec.generation != *generation {
                return stale(format!(
                    "{uuid} reported started on {host} with generation {generation}, expected {target} with {}",
                    rec.generation
                ));
            }
            let took = at_ms.saturating_sub(*ordered_at_ms);
            // A recovery ordered by a monitor that did not record its cause yet.
            let pc = rec.pending_cause.take().unwrap_or_else(|| PendingCause {
                from_host: String::new(),
                cause: String::new(),
                proof: Proof::Recorded {
                    text: String::new(),
                },
            });
            let cause = pc.cause.clone();
            rec.last_recovery = Some(RecoveryRecord {
                at_ms: *at_ms,
                from_host: pc.from_host,
                to_host: host.clone(),
                generation: *generation,
                cause: pc.cause,
                proof: pc.proof,
            });
            rec.phase = Phase::Running;
            let name = rec.name.clone();
            let message = format!(
                    "VM {name} running on {host} with generation {generation}, {took} ms after the order (cause: {cause})"
                );
            s.vm_event(
                *at_ms,
                Severity::Info,
                host,
                uuid,
                EventKind::VmRecovered {
                    generation: *generation,
                },
                message,
            );
            StateResponse::Ok
        }
        StateCommand::VmStopped {
            at_ms,
            uuid,
            host,
            reason,
        } => {
            let Some(rec) = s.vms.get_mut(uuid) else {
                return StateResponse::UnknownVm { vm: uuid.clone() };
            };
            if rec.phase != Phase::Running || rec.host != *host {
                return stale(format!(
                    "{uuid} reported stopped on {host} while {} on {}",
                    rec.phase.name(),
                    rec.host
                ));
            }
            rec.phase = Phase::Stopped {
                reason: *reason,
                at_ms: *at_ms,
            };
            let name = rec.name.clone();
            let why = match reason {
                StopReason::GuestShutdown => "the guest shut itself down",
                StopReason::OperatorDestroy => "an operator destroyed it",
            };
            let message = format!("VM {name} stopped on {host}: {why}; not restarting (respected)");
            s.vm_event(
                *at_ms,
                Severity::Info,
                host,
                uuid,
                EventKind::VmStopped,
                message,
            );
            StateResponse::Ok
        }
        StateCommand::SetAntiAffinity { at_ms, uuid, group } => {
            let Some(rec) = s.vms.get_mut(uuid) else {
                return StateResponse::UnknownVm { vm: uuid.clone() };
            };
            if let Some(g) = group {
                if let Err(m) = validate_name("anti-affinity group", g) {
                    return StateResponse::Invalid { reason: m };
                }
            }
            if rec.anti_affinity == *group {
                return StateResponse::Unchanged;
            }
            rec.anti_affinity = group.clone();
            let name = rec.name.clone();
            let host = rec.host.clone();
            let message = match group {
                Some(g) => format!("VM {name} joined anti-affinity group {g} (operator)"),
                None => format!("VM {name} left its anti-affinity group (operator)"),
            };
            s.vm_event(
                *at_ms,
                Severity::Info,
                &host,
                uuid,
                EventKind::VmAntiAffinity {
                    group: group.clone(),
                },
                message,
            );
            StateResponse::Ok
        }
        StateCommand::OperatorStop { at_ms, uuid } => {
            let Some(rec) = s.vms.get_mut(uuid) else {
                return StateResponse::UnknownVm { vm: uuid.clone() };
            };
            match rec.phase {
                Phase::Recovering { .. } => {
                    return stale(format!(
                        "a start of {} is in flight; stop it again once it has finished",
                        rec.name
                    ))
                }
                Phase::Stopped {
                    reason: StopReason::OperatorDestroy,
                    ..
                } => return StateResponse::Unchanged,
                _ => {}
            }
            rec.phase = Phase::Stopped {
                reason: StopReason::OperatorDestroy,
                at_ms: *at_ms,
            };
            rec.pending_cause = None;
            let (name, host) = (rec.name.clone(), rec.host.clone());
            let message =
                format!("VM {name} on {host} stopped by an operator through Vigil; not restarting");
            s.vm_event(
                *at_ms,
                Severity::Info,
                &host,
                uuid,
                EventKind::VmStopped,
                message,
            );
            StateResponse::Ok
        }
        StateCommand::StaleDestroyed {
            at_ms,
            uuid,
            host,
            found,
            newest,
        } => {
            let name = s
                .vms
                .get(uuid)
                .map(|r| r.name.clone())
                .unwrap_or_else(|| uuid.clone());
            let found_s = found
                .map(|g| g.to_string())
                .unwrap_or_else(|| "none".into());
            let message = format!(
                    "the agent of {host} destroyed VM {name}: it was running with generation {found_s}, older than the newest generation {newest} (started outside Vigil?)"
                );
            s.vm_event(
                *at_ms,
                Severity::Critical,
                host,
                uuid,
                EventKind::VmStaleDestroyed {
                    found: *found,
                    newest: *newest,
                },
                message,
            );
            StateResponse::Ok
        }
        StateCommand::VmAdopted {
            at_ms,
            uuid,
            host,
            generation,
            running,
        } => {
            if !s.hosts.contains_key(host) {
                return StateResponse::UnknownHost { host: host.clone() };
            }
            let Some(rec) = s.vms.get_mut(uuid) else {
                return StateResponse::UnknownVm { vm: uuid.clone() };
            };
            if *generation <= rec.generation {
                return StateResponse::Unchanged;
            }
            let (from_host, from_generation, from_phase) =
                (rec.host.clone(), rec.generation, rec.phase.name());
            rec.generation = *generation;
            rec.host = host.clone();
            rec.phase = if *running {
                Phase::Running
            } else {
                // Not running anywhere that reported: left alone (never started twice); an
                // operator starts it again, as after any stop.
                Phase::Stopped {
                    reason: StopReason::OperatorDestroy,
                    at_ms: *at_ms,
                }
            };
            rec.pending_cause = None;
            let name = rec.name.clone();
            let now = if *running {
                format!("runs on {host}")
            } else {
                format!("is defined but not running on {host}; left stopped")
            };
            s.vm_event(
                *at_ms,
                Severity::Warning,
                host,
                uuid,
                EventKind::VmAdopted {
                    generation: *generation,
                },
                format!(
                    "VM {name} {now} with generation {generation}, newer than the {from_generation} the cluster had ({from_phase} on {from_host}) after its restore from a backup: adopted"
                ),
            );
            StateResponse::Ok
        }
        _ => StateResponse::Invalid {
            reason: "not a VM command".into(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn adopted(host: &str, generation: u64, running: bool) -> StateCommand {
        StateCommand::VmAdopted {
            at_ms: 9,
            uuid: "u1".into(),
            host: host.into(),
            generation,
            running,
        }
    }

    /// After a restore: only a generation above the committed one changes the record, the
    /// highest wins whatever the order, and a stopped report leaves the VM stopped.
    #[test]
    fn adoption_takes_only_a_newer_generation_and_its_host() {
        let mut s = ClusterState::default();
        for h in ["hv1", "hv2", "hv3"] {
            s.apply(&crate::state::registration(0, h));
        }
        s.apply(&set_ha(true, None));
        s.vms.get_mut("u1").expect("vm").generation = 3;
        assert_eq!(s.apply(&adopted("hv2", 3, true)), StateResponse::Unchanged);
        assert_eq!(s.apply(&adopted("hv2", 4, false)), StateResponse::Ok);
        let v = &s.vms["u1"];
        assert_eq!((v.generation, v.host.as_str()), (4, "hv2"));
        assert!(matches!(v.phase, Phase::Stopped { .. }));
        assert_eq!(s.apply(&adopted("hv3", 6, true)), StateResponse::Ok);
        // Older than what is adopted now: history.
        assert_eq!(s.apply(&adopted("hv2", 5, true)), StateResponse::Unchanged);
        let v = &s.vms["u1"];
        assert_eq!((v.generation, v.host.as_str()), (6, "hv3"));
        assert_eq!(v.phase, Phase::Running);
        assert!(s
            .events
            .iter()
            .any(|e| e.kind == EventKind::VmAdopted { generation: 6 }));
        assert_eq!(
            s.apply(&adopted("nowhere", 9, true)),
            StateResponse::UnknownHost {
                host: "nowhere".into()
            }
        );
        // The end of the adoption is recorded once, and only for a restored cluster.
        let done = StateCommand::RestoreAdopted {
            at_ms: 10,
            message: "done".into(),
            silent: Vec::new(),
        };
        assert_eq!(s.apply(&done), StateResponse::Unchanged);
        s.restored = Some(crate::state::Restored {
            at_ms: 1,
            backup_created_at_ms: 0,
            backup_log_index: None,
            adopted: false,
            silent: Default::default(),
        });
        assert_eq!(s.apply(&done), StateResponse::Ok);
        assert!(s.restored.as_ref().is_some_and(|r| r.adopted));
        assert_eq!(s.apply(&done), StateResponse::Unchanged);
    }

    fn set_ha(ha: bool, priority: Option<i32>) -> StateCommand {
        StateCommand::SetHa {
            at_ms: 1,
            uuid: "u1".into(),
            name: "web1".into(),
            host: "hv1".into(),
            ha,
            priority,
        }
    }

    /// The defect: a VM that crashed on a host being fenced was logged as "restarting in
    /// place on hv1", a start that never comes (a host being fenced takes none; it was then
    /// placed elsewhere). The event says what will happen instead.
    #[test]
    fn a_crash_on_a_host_being_fenced_is_not_logged_as_a_restart_there() {
        let mut s = ClusterState::default();
        s.apply(&crate::state::registration(1, "hv1"));
        s.apply(&set_ha(true, None));
        s.apply(&StateCommand::FenceStarted {
            at_ms: 2,
            host: "hv1".into(),
            reason: "dead".into(),
        });
        let failed = StateCommand::VmFailed {
            at_ms: 3,
            uuid: "u1".into(),
            generation: 0,
            failure: FailureKind::Crashed,
            proof: Proof::AgentReportedStopped {
                host: "hv1".into(),
                detail: "shut off".into(),
                observed_at_ms: None,
            },
            decision: Decision::Restart {
                host: "hv1".into(),
                relocate: false,
                not_before_ms: 3,
                why: String::new(),
            },
            window_ms: 1000,
        };
        assert_eq!(s.apply(&failed), StateResponse::Ok);
        let msg = &s.events.back().expect("event").message;
        assert!(!msg.contains("restarting in place"), "{msg}");
        assert!(msg.contains("hv1 is being fenced"), "{msg}");
    }

    #[test]
    fn enabling_ha_is_recorded_and_idempotent() {
        let mut s = ClusterState::default();
        assert_eq!(s.apply(&set_ha(true, Some(5))), StateResponse::Ok);
        assert_eq!(s.events.len(), 1, "enabling HA is an event");
        assert_eq!(s.vms["u1"].priority, 5);
        assert_eq!(s.apply(&set_ha(true, None)), StateResponse::Unchanged);
        assert_eq!(s.apply(&set_ha(false, None)), StateResponse::Ok);
        assert!(!s.vms["u1"].ha);
    }

    #[test]
    fn stale_recovery_commands_change_nothing() {
        let mut s = ClusterState::default();
        s.apply(&set_ha(true, None));
        let before = s.clone();
        // A start ordered without a failure first, or with a wrong generation, is stale.
        let order = StateCommand::OrderStart {
            at_ms: 2,
            uuid: "u1".into(),
            host: "hv1".into(),
            generation: 1,
        };
        assert!(matches!(s.apply(&order), StateResponse::Stale { .. }));
        let failed = StateCommand::VmFailed {
            at_ms: 3,
            uuid: "u1".into(),
            generation: 7,
            failure: FailureKind::Crashed,
            proof: Proof::AgentReportedStopped {
                host: "hv1".into(),
                detail: "x".into(),
                observed_at_ms: None,
            },
            decision: Decision::GiveUp { reason: "x".into() },
            window_ms: 1000,
        };
        assert!(matches!(s.apply(&failed), StateResponse::Stale { .. }));
        assert_eq!(s, before);
    }
}
