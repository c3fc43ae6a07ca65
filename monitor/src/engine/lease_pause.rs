//! What a leader does with the actions it decides while its leader lease is out.
//!
//! A lease runs out when no quorum answers a probe in time: the other monitors may be
//! electing another leader, or this machine was merely too loaded to hear them (defect A,
//! issue 12: lapses of 13 ms to 2 s under load, in the same term). While it is out nothing
//! that [`Action::needs_leader_lease`] leaves the engine. The engine task keeps such a leader
//! leading through the lapse (`service::follow_lease`): when the lease comes back in the same
//! term no other monitor can have acted meanwhile, so what it decided is still its to do.
//! Dropping those actions while the books say they went out would leave a fence agent that
//! never ran "in flight" (the host never rejoins), a storage slot request never written
//! awaited, a stale fence request left in the slot of a host that is back, a destroy of a
//! drained VM never sent. So here each one is either put back where the engine will decide
//! it again, or held and carried out once the lease holds, if it is still due then:
//!
//! | action | while the lease is out | when it is back |
//! | --- | --- | --- |
//! | lease grant, leader record | dropped (the next heartbeat, tick, does it again; a grant the agent never got only makes this leader wait longer for its expiry) | - |
//! | fence agent run | the committed attempt waits again for release (a host that rejoins first calls it off, `Engine::may_rejoin`) | released by `release_committed_fences` |
//! | fence request into a slot | forgotten as written | asked again by `continue_fencing` |
//! | clear of a slot | held | written first |
//! | destroy of a domain | held | sent if the stop is still expected and the VM still on that host |
//!
//! When leadership is lost instead (another term, or the lapse outlasted the pause and this
//! monitor counts as deposed), everything held is forgotten: a new leader starts from
//! committed state.

use std::collections::{BTreeMap, BTreeSet};

use vigil_common::wire::AgentCommand;

use super::{Action, Engine};
use crate::state::{ClusterState, HostPhase};

/// What is held while the lease is out (see the module docs).
#[derive(Debug, Clone, Default)]
pub(super) struct HeldActions {
    /// Hosts whose storage-slot clear waits for the lease.
    clears: BTreeSet<String>,
    /// Domain destroys that wait for the lease: uuid -> host.
    destroys: BTreeMap<String, String>,
}

impl HeldActions {
    pub(super) fn is_empty(&self) -> bool {
        self.clears.is_empty() && self.destroys.is_empty()
    }
}

impl Engine {
    /// The lease is out at `now_ms`: keeps from `out` what needs no lease, and puts back or
    /// holds the rest (module docs).
    pub(super) fn hold_back(
        &mut self,
        out: Vec<Action>,
        state: &ClusterState,
        now_ms: u64,
    ) -> Vec<Action> {
        let mut kept = Vec::with_capacity(out.len());
        for action in out {
            if !action.needs_leader_lease() {
                kept.push(action);
                continue;
            }
            match action {
                Action::Fence { host } => {
                    if let Some(HostPhase::Fencing { attempts, .. }) =
                        state.hosts.get(&host).map(|h| &h.phase)
                    {
                        // Still in flight (no second decision), waiting for release again.
                        self.fencing
                            .awaiting_commit
                            .insert(host, (*attempts, now_ms));
                    } else {
                        self.fencing.in_flight.remove(&host);
                    }
                }
                Action::RequestFence(req)
                    if self
                        .fencing
                        .slot_requests
                        .get(&req.host)
                        .is_some_and(|r| r.id == req.id) =>
                {
                    self.fencing.slot_requests.remove(&req.host);
                }
                Action::ClearFence { host } => {
                    self.held.clears.insert(host);
                }
                Action::Send {
                    host,
                    command: AgentCommand::DestroyDomain { uuid },
                } => {
                    self.held.destroys.insert(uuid, host);
                }
                // Lease grants and the leader record: periodic, done again.
                _ => {}
            }
        }
        kept
    }

    /// The lease holds again: what was held and is still due, to go out before anything
    /// decided now (a clear must not come after a newer request for the same slot).
    pub(super) fn release_held(&mut self, state: &ClusterState) -> Vec<Action> {
        let held = std::mem::take(&mut self.held);
        let mut out: Vec<Action> = held
            .clears
            .into_iter()
            .map(|host| Action::ClearFence { host })
            .collect();
        for (uuid, host) in held.destroys {
            let due = self.expected_stops.contains_key(&uuid)
                && state.vms.get(&uuid).is_some_and(|v| v.host == host);
            if due {
                out.push(Action::Send {
                    host,
                    command: AgentCommand::DestroyDomain { uuid },
                });
            }
        }
        out
    }

    /// Leadership itself changed: nothing held is this monitor's to do any more.
    pub(super) fn forget_held(&mut self) {
        self.held = HeldActions::default();
    }
}
