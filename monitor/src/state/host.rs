//! Host failure handling in the replicated state: a host's fencing phase.
//!
//! ```text
//!          Down, HA VMs, fence agent configured        fence agent "off" exit 0
//!  Active ─────────────────────────────────▶ Fencing ─────────────────────────▶ Fenced
//!    ▲                                        │   ▲ failed: retried                │
//!    └──────────── its agent connects again ──┴───┴────────────────────────────────┘
//! ```
//!
//! `Fenced` is proof 2 of the design brief ("a fence agent confirmed the old host powered
//! off"), or another proof (storage slot, lease, or an operator's `vigilctl host
//! confirm-off`, recorded with the operator's name): it is what allows the VMs of that host
//! to start elsewhere.

use serde::{Deserialize, Serialize};

use super::{ClusterState, EventKind, Severity, StateCommand, StateResponse};

/// A host's fencing phase.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "phase")]
pub enum HostPhase {
    #[default]
    Active,
    /// Fencing ordered; `attempts` so far.
    Fencing { since_ms: u64, attempts: u32 },
    /// Proven powered off.
    Fenced { at_ms: u64, proof: String },
}

impl HostPhase {
    pub fn name(&self) -> &'static str {
        match self {
            HostPhase::Active => "active",
            HostPhase::Fencing { .. } => "fencing",
            HostPhase::Fenced { .. } => "fenced",
        }
    }
}

pub(super) fn apply(s: &mut ClusterState, cmd: &StateCommand) -> StateResponse {
    match cmd {
        StateCommand::FenceStarted {
            at_ms,
            host,
            reason,
        } => {
            let Some(h) = s.hosts.get_mut(host) else {
                return StateResponse::UnknownHost { host: host.clone() };
            };
            let attempts = match &h.phase {
                HostPhase::Active => 1,
                HostPhase::Fencing { attempts, .. } => attempts + 1,
                HostPhase::Fenced { .. } => {
                    return StateResponse::Stale {
                        reason: format!("{host} is already fenced"),
                    }
                }
            };
            let since_ms = match &h.phase {
                HostPhase::Fencing { since_ms, .. } => *since_ms,
                _ => *at_ms,
            };
            h.phase = HostPhase::Fencing { since_ms, attempts };
            s.push_vm_event(
                *at_ms,
                Severity::Critical,
                Some(host.clone()),
                None,
                EventKind::HostFencing { attempt: attempts },
                format!("fencing host {host} (attempt {attempts}): {reason}"),
            );
            StateResponse::Ok
        }
        StateCommand::FenceResult {
            at_ms,
            host,
            ok,
            detail,
        } => {
            let Some(h) = s.hosts.get_mut(host) else {
                return StateResponse::UnknownHost { host: host.clone() };
            };
            let HostPhase::Fencing { since_ms, attempts } = h.phase.clone() else {
                return StateResponse::Stale {
                    reason: format!("fence result for {host} while it is {}", h.phase.name()),
                };
            };
            if *ok {
                h.phase = HostPhase::Fenced {
                    at_ms: *at_ms,
                    proof: detail.clone(),
                };
                s.push_vm_event(
                    *at_ms,
                    Severity::Critical,
                    Some(host.clone()),
                    None,
                    EventKind::HostFenced,
                    format!(
                        "host {host} fenced: {detail} ({} ms after fencing started); its HA VMs may now start elsewhere",
                        at_ms.saturating_sub(since_ms)
                    ),
                );
            } else {
                s.push_vm_event(
                    *at_ms,
                    Severity::Critical,
                    Some(host.clone()),
                    None,
                    EventKind::HostFenceFailed { attempt: attempts },
                    format!("fencing host {host} failed (attempt {attempts}): {detail}; its HA VMs wait for proof"),
                );
            }
            StateResponse::Ok
        }
        StateCommand::SetHostInfo {
            host, pools, addr, ..
        } => {
            let Some(h) = s.hosts.get_mut(host) else {
                return StateResponse::UnknownHost { host: host.clone() };
            };
            let addr = addr.or(h.addr);
            if h.pools == *pools && h.addr == addr {
                return StateResponse::Unchanged;
            }
            h.pools = pools.clone();
            h.addr = addr;
            StateResponse::Ok
        }
        StateCommand::SetMaintenance { at_ms, host, on } => {
            let Some(h) = s.hosts.get_mut(host) else {
                return StateResponse::UnknownHost { host: host.clone() };
            };
            if h.maintenance == *on {
                return StateResponse::Unchanged;
            }
            h.maintenance = *on;
            s.push_vm_event(
                *at_ms,
                Severity::Warning,
                Some(host.clone()),
                None,
                EventKind::HostMaintenance { on: *on },
                if *on {
                    format!("host {host} entered maintenance (operator): its HA VMs move to other hosts, nothing new is placed on it")
                } else {
                    format!("host {host} left maintenance (operator): it takes VMs again")
                },
            );
            StateResponse::Ok
        }
        StateCommand::OperatorConfirmedOff { at_ms, host, by } => {
            let Some(h) = s.hosts.get_mut(host) else {
                return StateResponse::UnknownHost { host: host.clone() };
            };
            if matches!(h.phase, HostPhase::Fenced { .. }) {
                return StateResponse::Unchanged;
            }
            let proof =
                format!("operator {by} confirmed it powered off (vigilctl host confirm-off)");
            h.phase = HostPhase::Fenced {
                at_ms: *at_ms,
                proof: proof.clone(),
            };
            s.push_vm_event(
                *at_ms,
                Severity::Critical,
                Some(host.clone()),
                None,
                EventKind::HostConfirmedOff { by: by.clone() },
                format!("host {host} fenced: {proof}; its HA VMs may now start elsewhere"),
            );
            StateResponse::Ok
        }
        StateCommand::HostRejoined { at_ms, host } => {
            let Some(h) = s.hosts.get_mut(host) else {
                return StateResponse::UnknownHost { host: host.clone() };
            };
            if h.phase == HostPhase::Active {
                return StateResponse::Unchanged;
            }
            let was = h.phase.name();
            h.phase = HostPhase::Active;
            s.push_vm_event(
                *at_ms,
                Severity::Info,
                Some(host.clone()),
                None,
                EventKind::HostRejoined,
                format!("host {host} rejoined (was {was}); its agent is connected again"),
            );
            StateResponse::Ok
        }
        StateCommand::SetHostPlacement {
            at_ms,
            host,
            zone,
            cluster,
            by,
        } => {
            for (what, v) in [("zone", zone), ("cluster", cluster)] {
                if let Err(reason) = super::validate_name(what, v) {
                    return StateResponse::Invalid { reason };
                }
            }
            let Some(h) = s.hosts.get_mut(host) else {
                return StateResponse::UnknownHost { host: host.clone() };
            };
            if h.zone == *zone && h.cluster == *cluster {
                return StateResponse::Unchanged;
            }
            let old = format!("{}/{}", h.zone, h.cluster);
            h.zone = zone.clone();
            h.cluster = cluster.clone();
            s.push_vm_event(
                *at_ms,
                Severity::Warning,
                Some(host.clone()),
                None,
                EventKind::HostLocationChanged,
                format!(
                    "operator {by} moved host {host} from {old} to {zone}/{cluster} (vigilctl host place); its agent must now say hello with zone {zone:?}, cluster {cluster:?}"
                ),
            );
            StateResponse::Ok
        }
        _ => StateResponse::Invalid {
            reason: "not a host command".into(),
        },
    }
}
