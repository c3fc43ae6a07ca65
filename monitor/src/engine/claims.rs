//! Issue 10: an agent certificate speaks only for its own host.
//!
//! The session layer already binds a session to its certificate's host name; this module
//! decides what a host may say about the rest of the cluster:
//! - its zone and cluster are pinned in its host record when it first registers: a hello
//!   never moves a registered host (only `vigilctl host place` does);
//! - it reports only the domains it runs: a claim to run a VM that the cluster has on
//!   another host (an inventory entry, a start event with a generation never committed) is
//!   a conflict, recorded once per episode, never a move; a definition is taken only from
//!   the VM's own host. The one exception is a live migration, where the VM's own host
//!   corroborates the move by no longer running it;
//! - a definition is stored only if [`vigil_common::domain_policy`] accepts it: a refused
//!   one raises an event and the stored one is kept.

use std::collections::{BTreeMap, BTreeSet};
use std::hash::{Hash, Hasher};

use vigil_common::domain::{DomainInfo, DomainState};
use vigil_common::domain_policy::{self, DomainPolicy};

use super::{record_event, Action, Context, DefinitionReport, Engine};
use crate::state::{EventKind, HostRecord, Phase, Severity, StateCommand, VmRecord};

/// What this leader already recorded, to say it once per episode.
#[derive(Debug, Clone, Default)]
pub(super) struct IdentityNotes {
    /// Hosts whose refused hello was recorded (the detail recorded), until one is accepted.
    pub placement_refused: BTreeMap<String, String>,
    /// (VM uuid, claimant host) conflicts recorded, until the claimant stops claiming.
    pub conflicts: BTreeSet<(String, String)>,
    /// Listings received per host (a count: agents' sequence numbers restart with them).
    pub listings: BTreeMap<String, u64>,
    /// Claims not recorded yet, with the owner's listing count when the claim was first seen: in a live migration the destination's listing may arrive before
    /// the source's, so the conflict waits for a newer listing of the owner that still runs
    /// the VM.
    pub unconfirmed: BTreeMap<(String, String), u64>,
    /// Per VM: the refused definition recorded (a hash of its text), so an agent resending
    /// the same definition raises one event.
    pub refused_definitions: BTreeMap<String, u64>,
}

/// The zone and cluster a host is registered with: the record's, once there is one. A hello
/// names them only for a host's first registration.
pub(super) fn pinned_placement(
    known: Option<&HostRecord>,
    zone: String,
    cluster: String,
) -> (String, String) {
    match known {
        Some(h) => (h.zone.clone(), h.cluster.clone()),
        None => (zone, cluster),
    }
}

fn runs(d: &DomainInfo) -> bool {
    matches!(d.state, DomainState::Running | DomainState::Paused)
}

/// Whether `host` may speak for `vm` (report it, send its definition): the host the cluster
/// has it on, or the target of its recovery under way.
pub(super) fn owns(vm: &VmRecord, host: &str) -> bool {
    vm.host == host || matches!(&vm.phase, Phase::Recovering { host: target, .. } if target == host)
}

fn text_hash(xml: &str) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    xml.hash(&mut h);
    h.finish()
}

/// What the engine does with a report of `vm` running on a host that does not own it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Claim {
    /// The report may change the record (a live migration its own host corroborates, or a
    /// stopped VM an operator started again elsewhere, with the VM's current generation).
    Accept,
    /// Nothing changes (a conflict is recorded where it is one).
    Refuse,
}

impl Engine {
    /// A hello refused for naming another zone or cluster than the host record: one event
    /// per episode (the agent retries; the same refusal is not recorded again).
    pub(super) fn placement_refused(
        &mut self,
        host: &str,
        detail: String,
        wall_ms: u64,
        out: &mut Vec<Action>,
    ) {
        if self.identity.placement_refused.get(host) == Some(&detail) {
            return;
        }
        self.identity
            .placement_refused
            .insert(host.to_string(), detail.clone());
        record_event(
            out,
            wall_ms,
            Severity::Critical,
            Some(host.to_string()),
            EventKind::HostPlacementRefused,
            format!("refused the agent of {host}: {detail}"),
        );
    }

    /// A report by `host` that `d` runs there, while the cluster has the VM elsewhere.
    pub(super) fn foreign_claim(
        &mut self,
        host: &str,
        vm: &VmRecord,
        d: &DomainInfo,
        restored_silent: bool,
        wall_ms: u64,
        out: &mut Vec<Action>,
    ) -> Claim {
        let generation = d.meta.generation.unwrap_or(0);
        let owner_lets_go = self.connected.contains(&vm.host)
            && self
                .inventory
                .get(&vm.host)
                .is_some_and(|inv| inv.domains.get(&vm.uuid).is_none_or(|o| !runs(o)));
        let owner_listings = self.identity.listings.get(&vm.host).copied().unwrap_or(0);
        let key = (vm.uuid.clone(), host.to_string());
        // A restored cluster adopts it (`adopt_listing`), also from a host it first heard
        // after its adoption ended.
        let adopting = self.adoption.is_some() || restored_silent;
        if generation > vm.generation && adopting {
            // A restored cluster adopts it (`adopt_listing`): no conflict.
            return Claim::Refuse;
        }
        let verdict = if generation > vm.generation {
            // No activation has a generation above the committed one: forged (or a state
            // lost, which an operator must look at).
            Err(format!(
                "it claims generation {generation}, above the committed {}",
                vm.generation
            ))
        } else if generation < vm.generation {
            // A stale copy: its agent destroys it (not a conflict of ownership).
            return Claim::Refuse;
        } else {
            match &vm.phase {
                Phase::Running if owner_lets_go => Ok(()),
                // Maybe a live migration whose source listing is still on its way: a
                // conflict only once a newer listing of the owner still shows it running.
                Phase::Running
                    if self.connected.contains(&vm.host)
                        && self
                            .identity
                            .unconfirmed
                            .get(&key)
                            .is_none_or(|first| owner_listings <= *first) =>
                {
                    self.identity
                        .unconfirmed
                        .entry(key)
                        .or_insert(owner_listings);
                    return Claim::Refuse;
                }
                Phase::Running => Err(format!(
                    "{} still runs it{}",
                    vm.host,
                    if self.connected.contains(&vm.host) {
                        ""
                    } else {
                        " as far as the cluster knows (its agent is not connected)"
                    }
                )),
                Phase::Stopped { .. } | Phase::GaveUp { .. } => Ok(()),
                other => Err(format!(
                    "the cluster is recovering it ({}) and did not place it there",
                    other.name()
                )),
            }
        };
        match verdict {
            Ok(()) => {
                self.identity.unconfirmed.remove(&key);
                self.identity.conflicts.remove(&key);
                Claim::Accept
            }
            Err(why) => {
                self.conflict(host, vm, "reports it running", &why, wall_ms, out);
                Claim::Refuse
            }
        }
    }

    /// Records that `host` claims `vm`, which the cluster has on `vm.host`: once per episode.
    pub(super) fn conflict(
        &mut self,
        host: &str,
        vm: &VmRecord,
        what: &str,
        why: &str,
        wall_ms: u64,
        out: &mut Vec<Action>,
    ) {
        if !self
            .identity
            .conflicts
            .insert((vm.uuid.clone(), host.to_string()))
        {
            return;
        }
        record_event(out, wall_ms, Severity::Critical, Some(host.to_string()), EventKind::VmOwnershipConflict {
                claimant: host.to_string(),
            }, format!(
                "host {host} {what} VM {} ({}), which the cluster has on {}: {why}. Ignored: a host speaks only for the domains it runs; nothing moves and its definition is not taken. If the VM really runs on both, one copy must go (look at both hosts)",
                vm.name, vm.uuid, vm.host
            ));
    }

    /// After a listing of `host`: its conflicts about VMs it no longer reports running end.
    pub(super) fn claims_listed(&mut self, host: &str, domains: &[DomainInfo]) {
        *self.identity.listings.entry(host.to_string()).or_insert(0) += 1;
        let running: BTreeSet<&str> = domains
            .iter()
            .filter(|d| runs(d))
            .map(|d| d.uuid.as_str())
            .collect();
        self.identity
            .conflicts
            .retain(|(uuid, h)| h != host || running.contains(uuid.as_str()));
        self.identity
            .unconfirmed
            .retain(|(uuid, h), _| h != host || running.contains(uuid.as_str()));
    }

    /// The inactive XML of `uuid` from `host`: stored only from the host that owns the VM,
    /// and only if the domain policy accepts it.
    pub(super) fn on_definition(&mut self, report: DefinitionReport, cx: &mut Context<'_>) {
        let DefinitionReport { host, uuid, xml } = report;
        let host = host.as_str();
        let Some(vm) = cx.state.vms.get(&uuid) else {
            return;
        };
        if vm.host != host {
            // Never taken from another host. Not a conflict by itself: a VM stays defined
            // (shut off) on the hosts it ran on, and their agents ship that copy; a host
            // that also claims to *run* it is recorded by the inventory check.
            return;
        }
        if vm.definition.as_deref() == Some(xml.as_str()) {
            return;
        }
        match domain_policy::check(&xml, &DomainPolicy::default()) {
            Ok(()) => {
                self.identity.refused_definitions.remove(&uuid);
                cx.out.push(Action::Propose(StateCommand::StoreDefinition {
                    at_ms: cx.wall_ms,
                    uuid,
                    xml,
                }));
            }
            Err(e) => {
                let hash = text_hash(&xml);
                if self.identity.refused_definitions.insert(uuid.clone(), hash) == Some(hash) {
                    return;
                }
                let kept = if vm.definition.is_some() {
                    "the stored definition is kept"
                } else {
                    "no definition is stored, so it cannot start on another host"
                };
                record_event(&mut cx.out, cx.wall_ms, Severity::Critical, Some(host.to_string()), EventKind::VmDefinitionRefused, format!(
                        "refused the definition of VM {} ({uuid}) from {host}: {e}; {kept} (docs/domain-policy.md)",
                        vm.name
                    ));
            }
        }
    }
}
