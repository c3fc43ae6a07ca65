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
    Fenced {
        at_ms: u64,
        #[serde(deserialize_with = "host_proof_or_text")]
        proof: HostProof,
    },
}

/// What proved a host powered off (or its guests gone): what moves it to
/// [`HostPhase::Fenced`] and lets its HA VMs start elsewhere. The numbers are the proofs of
/// docs/decisions.md ("Proof 1–4").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "method")]
pub enum HostProof {
    /// Proof 2: a fence agent confirmed the host powered off (exit 0 for `off`).
    Power { detail: String },
    /// Proof 3: the host's lease expired where its armed host watchdog backs it
    /// (`LeaseBook::proof`); `detail` says which lease, pools and watchdog.
    LeaseExpired { detail: String },
    /// Proof 4: the host's agent acknowledged fence request `request` in its storage slot on
    /// `pool`, with a fresh listing showing every named HA domain off.
    StorageSlot {
        request: u64,
        pool: String,
        destroyed: usize,
    },
    /// An operator's `vigilctl host confirm-off`, with the admin certificate's name.
    Operator { by: String },
    /// A proof recorded as text by a monitor from before proofs were typed (read from older
    /// state or log entries): shown as it was written.
    Recorded { text: String },
}

impl std::fmt::Display for HostProof {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HostProof::Power { detail } => write!(f, "power: {detail}"),
            HostProof::LeaseExpired { detail } => write!(f, "lease expired: {detail}"),
            HostProof::StorageSlot {
                request,
                pool,
                destroyed,
            } => write!(
                f,
                "storage slot: fence request {request} acknowledged on pool {pool} by its agent, which destroyed {destroyed} HA domain(s)"
            ),
            HostProof::Operator { by } => {
                write!(f, "operator {by} confirmed it powered off (vigilctl host confirm-off)")
            }
            HostProof::Recorded { text } => f.write_str(text),
        }
    }
}

/// Reads a stored [`HostProof`]: the typed form, or the plain text that older monitors stored
/// (as [`HostProof::Recorded`]), so nothing already stored is lost. For
/// `#[serde(deserialize_with)]` on every field that holds one.
pub fn host_proof_or_text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<HostProof, D::Error> {
    typed_or_text(d, |text| HostProof::Recorded { text })
}

/// Reads a stored proof of type `T`: its typed form, or the plain text that older monitors
/// stored, which `recorded` wraps (the proof types' `Recorded` variant).
pub(super) fn typed_or_text<'de, D, T>(
    d: D,
    recorded: impl FnOnce(String) -> T,
) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Stored<T> {
        Typed(T),
        Text(String),
    }
    Ok(match Stored::deserialize(d)? {
        Stored::Typed(p) => p,
        Stored::Text(text) => recorded(text),
    })
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
            let message = format!("fencing host {host} (attempt {attempts}): {reason}");
            s.host_event(
                *at_ms,
                Severity::Critical,
                host,
                EventKind::HostFencing { attempt: attempts },
                message,
            );
            StateResponse::Ok
        }
        StateCommand::HostProvenOff { at_ms, host, proof } => {
            proven_off(s, *at_ms, host, proof.clone())
        }
        StateCommand::FenceFailed {
            at_ms,
            host,
            detail,
        } => fence_failed(s, *at_ms, host, detail),
        // Written by monitors from before `HostProvenOff`/`FenceFailed`: applied the same way,
        // the proof kept as the text it was.
        StateCommand::FenceResult {
            at_ms,
            host,
            ok,
            detail,
        } => {
            if *ok {
                let proof = HostProof::Recorded {
                    text: detail.clone(),
                };
                proven_off(s, *at_ms, host, proof)
            } else {
                fence_failed(s, *at_ms, host, detail)
            }
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
            let message = if *on {
                format!("host {host} entered maintenance (operator): its HA VMs move to other hosts, nothing new is placed on it")
            } else {
                format!("host {host} left maintenance (operator): it takes VMs again")
            };
            s.host_event(
                *at_ms,
                Severity::Warning,
                host,
                EventKind::HostMaintenance { on: *on },
                message,
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
            let proof = HostProof::Operator { by: by.clone() };
            h.phase = HostPhase::Fenced {
                at_ms: *at_ms,
                proof: proof.clone(),
            };
            let message =
                format!("host {host} fenced: {proof}; its HA VMs may now start elsewhere");
            s.host_event(
                *at_ms,
                Severity::Critical,
                host,
                EventKind::HostConfirmedOff { by: by.clone() },
                message,
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
            let message = format!("host {host} rejoined (was {was}); its agent is connected again");
            s.host_event(
                *at_ms,
                Severity::Info,
                host,
                EventKind::HostRejoined,
                message,
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
            let message = format!(
                    "operator {by} moved host {host} from {old} to {zone}/{cluster} (vigilctl host place); its agent must now say hello with zone {zone:?}, cluster {cluster:?}"
                );
            s.host_event(
                *at_ms,
                Severity::Warning,
                host,
                EventKind::HostLocationChanged,
                message,
            );
            StateResponse::Ok
        }
        _ => StateResponse::Invalid {
            reason: "not a host command".into(),
        },
    }
}

/// `host` is proven off by `proof` (it must be `Fencing`): `Fenced`, and its HA VMs may start
/// elsewhere.
fn proven_off(s: &mut ClusterState, at_ms: u64, host: &str, proof: HostProof) -> StateResponse {
    let Some(h) = s.hosts.get_mut(host) else {
        return StateResponse::UnknownHost {
            host: host.to_string(),
        };
    };
    let HostPhase::Fencing { since_ms, .. } = h.phase else {
        return StateResponse::Stale {
            reason: format!("proof for {host} while it is {}", h.phase.name()),
        };
    };
    let message = format!(
        "host {host} fenced: {proof} ({} ms after fencing started); its HA VMs may now start elsewhere",
        at_ms.saturating_sub(since_ms)
    );
    h.phase = HostPhase::Fenced { at_ms, proof };
    s.host_event(
        at_ms,
        Severity::Critical,
        host,
        EventKind::HostFenced,
        message,
    );
    StateResponse::Ok
}

/// An attempt to fence `host` failed: it stays `Fencing` and its HA VMs wait for proof.
fn fence_failed(s: &mut ClusterState, at_ms: u64, host: &str, detail: &str) -> StateResponse {
    let Some(h) = s.hosts.get_mut(host) else {
        return StateResponse::UnknownHost {
            host: host.to_string(),
        };
    };
    let HostPhase::Fencing { attempts, .. } = h.phase else {
        return StateResponse::Stale {
            reason: format!("fence result for {host} while it is {}", h.phase.name()),
        };
    };
    let message = format!(
        "fencing host {host} failed (attempt {attempts}): {detail}; its HA VMs wait for proof"
    );
    s.host_event(
        at_ms,
        Severity::Critical,
        host,
        EventKind::HostFenceFailed { attempt: attempts },
        message,
    );
    StateResponse::Ok
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Proof;

    fn fencing_hv1() -> ClusterState {
        let mut s = ClusterState::default();
        s.apply(&StateCommand::RegisterHost {
            at_ms: 1,
            name: "hv1".into(),
            zone: "z1".into(),
            cluster: "c1".into(),
            agent_version: "0.1.0".into(),
        });
        s.apply(&StateCommand::FenceStarted {
            at_ms: 2,
            host: "hv1".into(),
            reason: "down".into(),
        });
        s
    }

    #[test]
    fn a_proof_is_stored_typed_and_read_back_the_same() {
        let mut s = fencing_hv1();
        let proof = HostProof::StorageSlot {
            request: 7,
            pool: "p".into(),
            destroyed: 2,
        };
        let cmd = StateCommand::HostProvenOff {
            at_ms: 3,
            host: "hv1".into(),
            proof: proof.clone(),
        };
        let json = serde_json::to_string(&cmd).expect("json");
        let back: StateCommand = serde_json::from_str(&json).expect("decode");
        assert_eq!(s.apply(&back), StateResponse::Ok);
        assert_eq!(
            s.hosts["hv1"].phase,
            HostPhase::Fenced {
                at_ms: 3,
                proof: proof.clone()
            }
        );
        let stored = serde_json::to_string(&s).expect("state json");
        let again: ClusterState = serde_json::from_str(&stored).expect("state decode");
        assert_eq!(again.hosts["hv1"].phase, s.hosts["hv1"].phase);
        let last = s.events.back().expect("event");
        assert!(
            last.message
                .contains("storage slot: fence request 7 acknowledged on pool p"),
            "{}",
            last.message
        );
    }

    /// State and log entries written before proofs were typed held them as text: they still
    /// load and apply, the text kept as it was.
    #[test]
    fn proofs_stored_as_text_by_older_monitors_still_load() {
        let phase: HostPhase =
            serde_json::from_str(r#"{"phase":"fenced","at_ms":5,"proof":"power: ipmi off"}"#)
                .expect("old phase");
        assert_eq!(
            phase,
            HostPhase::Fenced {
                at_ms: 5,
                proof: HostProof::Recorded {
                    text: "power: ipmi off".into()
                }
            }
        );
        let vm_proof: Proof = serde_json::from_str(
            r#"{"proof":"host_fenced","host":"hv1","detail":"lease expired: gone"}"#,
        )
        .expect("old vm proof");
        assert_eq!(
            vm_proof.to_string(),
            "host hv1 was fenced: lease expired: gone"
        );
        let record: crate::state::RecoveryRecord = serde_json::from_str(
            r#"{"at_ms":1,"from_host":"hv1","to_host":"hv2","generation":2,"cause":"crashed","proof":"the agent of hv1 reported it stopped (crashed)"}"#,
        )
        .expect("old record");
        assert_eq!(
            record.proof,
            Proof::Recorded {
                text: "the agent of hv1 reported it stopped (crashed)".into()
            }
        );

        let mut s = fencing_hv1();
        let old: StateCommand = serde_json::from_value(serde_json::json!({
            "op": "fence_result", "at_ms": 9, "host": "hv1", "ok": true, "detail": "power: ipmi off"
        }))
        .expect("old log entry");
        assert_eq!(s.apply(&old), StateResponse::Ok);
        let HostPhase::Fenced { proof, .. } = &s.hosts["hv1"].phase else {
            panic!("not fenced: {:?}", s.hosts["hv1"].phase);
        };
        assert_eq!(proof.to_string(), "power: ipmi off");
    }

    #[test]
    fn a_failed_fence_attempt_leaves_the_host_fencing() {
        let mut s = fencing_hv1();
        let failed = StateCommand::FenceFailed {
            at_ms: 3,
            host: "hv1".into(),
            detail: "bmc timeout".into(),
        };
        assert_eq!(s.apply(&failed), StateResponse::Ok);
        assert!(matches!(
            s.hosts["hv1"].phase,
            HostPhase::Fencing { attempts: 1, .. }
        ));
        assert_eq!(
            s.events.back().map(|e| e.kind.clone()),
            Some(EventKind::HostFenceFailed { attempt: 1 })
        );
    }
}
