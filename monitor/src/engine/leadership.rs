//! Becoming and losing leadership: what a new leader forgets, re-registers and waits for,
//! and the leader record the storage threads publish.

use super::*;

impl Engine {
    /// This monitor became leader: forget what a predecessor may have changed, re-register connected hosts, and fence nobody for a full lease.
    pub(super) fn on_became_leader(&mut self, term: u64, node: u64, cx: &mut Context<'_>) {
        self.leader = true;
        self.term_node = (term, node);
        self.leases.became_leader(cx.now_ms);
        // This leadership's bookkeeping starts empty: what predecessors did is in committed
        // state (and in the storage slots, cleared below).
        self.fencing = FencingBook::default();
        self.recovery = RecoveryBook::default();
        self.capacity = CapacityBook::default();
        // Rejoins noted before this monitor led were proposed into a dropped output (a
        // follower's, or a new leader's during its lease wait, when agents already connect
        // to it): a host that came back then must rejoin now, on its next heartbeat, or it
        // stays "being fenced" for good (scenario 54).
        self.rejoining.clear();
        // A request its predecessor left in the slot of a host that is back (Active)
        // must not kill what that host runs: clear them all (durably, by the storage
        // worker). Hosts still fencing are asked again by this leader.
        for (name, h) in &cx.state.hosts {
            if h.phase == HostPhase::Active {
                cx.out.push(Action::ClearFence { host: name.clone() });
            }
        }
        // A new leader knows nothing fresh: every host gets the full grace period
        // from now, and agents reconnecting will bring it up to date. A host not heard
        // since the election stays Unknown (not Down) for a full lease, and nothing is
        // fenced before that: an agent that reconnects late (its monitor restarted)
        // must not be condemned for it.
        let cfg = self.detector.config().clone();
        let grace = self.election_grace_ms();
        self.fence_after_ms = self.fencing_resumes_at(cx.now_ms);
        self.detector = FailureDetector::new(cfg, cx.now_ms).with_unknown_grace(grace);
        for name in cx.state.hosts.keys() {
            self.detector.track(name);
        }
        // Placement waits for the agents still finding this leader (see awaiting_reconnect).
        self.awaiting_reconnect = cx
            .state
            .hosts
            .iter()
            .filter(|(name, h)| {
                h.phase == HostPhase::Active && !h.maintenance && !self.connected.contains(*name)
            })
            .map(|(name, _)| name.clone())
            .collect();
        self.logged_liveness = cx
            .state
            .events
            .iter()
            .filter_map(|e| match (&e.host, &e.kind) {
                (Some(h), EventKind::HostLiveness { to, .. }) => Some((h.clone(), to.clone())),
                _ => None,
            })
            .collect();
        self.fenced_before_election = cx
            .state
            .hosts
            .iter()
            .filter(|(name, h)| {
                matches!(
                    h.phase,
                    HostPhase::Fencing { .. } | HostPhase::Fenced { .. }
                ) && !self.connected.contains(*name)
            })
            .map(|(name, _)| name.clone())
            .collect();
        for name in self.connected.clone() {
            self.detector.heartbeat(&name, cx.now_ms);
            // An agent that connected before this monitor led was never registered.
            if let Some(hello) = self.hellos.get(&name) {
                self.register_host(&name, hello, cx);
            }
            // Nor were the HA domains it listed then that the cluster does not know:
            // unprotected until its next listing (an agent resends every 10 s, and
            // only when something changed before that).
            if let Some(inv) = self.inventory.get(&name) {
                for d in inv.domains.values() {
                    if d.meta.ha == Some(true) && !cx.state.vms.contains_key(&d.uuid) {
                        let running = matches!(d.state, DomainState::Running | DomainState::Paused);
                        cx.out
                            .push(Action::Propose(vm_seen(cx.wall_ms, &name, d, running)));
                    }
                }
            }
        }
        // What a follower noted was never recorded (its output is dropped).
        self.identity = Default::default();
        record_event(
            &mut cx.out,
            cx.wall_ms,
            Severity::Info,
            None,
            EventKind::LeaderElected { term, node },
            format!("monitor node {node} became leader in term {term}"),
        );
    }

    /// This monitor no longer leads: no grants, no actions.
    pub(super) fn on_lost_leadership(&mut self) {
        self.leader = false;
        self.leases.lost_leadership();
    }

    /// Why no relocation may be placed now (`None`: it may): active hosts whose agents have
    /// not reconnected to this new leader yet, within the first lease after its election.
    pub(super) fn placement_waits(&self) -> Option<String> {
        if self.awaiting_reconnect.is_empty() {
            return None;
        }
        let hosts: Vec<&str> = self.awaiting_reconnect.iter().map(String::as_str).collect();
        Some(format!(
            "waiting for the agents of {} to reconnect to the new leader (at most until the first lease after its election ends)",
            hosts.join(", ")
        ))
    }

    /// The first full lease (plus drift margin) after an election.
    pub(super) fn election_grace_ms(&self) -> u64 {
        let l = self.leases.config();
        l.duration_ms + l.drift_margin_ms
    }

    /// A host is back: a fence request left in its slot must not kill what it runs next.
    /// The leader record's content: the hosts being fenced that are still silent. Only
    /// those may fence themselves on lease expiry; a host that merely misses its grants (a
    /// version mismatch, an expired certificate, the monitors' own network) is never named.
    pub(super) fn leader_record(&self, state: &ClusterState, now_ms: u64) -> Action {
        let condemned = state
            .hosts
            .iter()
            .filter(|(_, h)| matches!(h.phase, HostPhase::Fencing { .. }))
            .filter(|(n, _)| self.detector.state(n) == Some(Liveness::Down))
            .filter(|(n, _)| !self.incompatible_alive(n, now_ms))
            .map(|(n, _)| n.clone())
            .collect();
        Action::LeaderRecord {
            condemned,
            hold: !self.fencing.held.is_empty(),
        }
    }
}
