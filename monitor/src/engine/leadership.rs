//! Becoming and losing leadership: what a new leader forgets, re-registers and waits for,
//! and the leader record the storage threads publish.

use super::storage::outage_scope;
use super::*;

/// How long an adoption proposal may stay uncommitted before it is made again.
const ADOPTION_RETRY_MS: u64 = 2_000;

/// A restored cluster's leader, adopting what the agents report (see
/// [`Engine::begin_adoption`]).
#[derive(Debug, Clone)]
pub(super) struct Adoption {
    /// Ends at this time (monotonic ms) whoever was heard: the first full lease.
    until_ms: u64,
    /// Hosts that have not listed their domains to this leader yet.
    waiting: BTreeSet<String>,
    /// Adoptions proposed and not seen committed yet, by VM uuid.
    proposed: BTreeMap<String, ProposedAdoption>,
}

#[derive(Debug, Clone)]
struct ProposedAdoption {
    generation: u64,
    /// When it was proposed (monotonic ms).
    at_ms: u64,
    cmd: StateCommand,
}

impl Engine {
    /// This monitor became leader: forget what a predecessor may have changed, re-register connected hosts, and fence nobody for a full lease.
    pub(super) fn on_became_leader(&mut self, term: u64, node: u64, cx: &mut Context<'_>) {
        self.leader = true;
        self.term_node = (term, node);
        self.forget_held();
        self.seed_settings(node, cx);
        self.leases.became_leader(cx.now_ms);
        // This leadership's bookkeeping starts empty: what predecessors did is in committed
        // state (and in the storage slots, cleared below).
        self.fencing = FencingBook::default();
        self.note_predecessor_fences(cx.state, cx.now_ms);
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
        // What the event log last recorded per host, in one pass: a new leader hears it all
        // again, which is no state change and gets no event.
        // So is a storage outage the log recorded last for a pool, while the hosts the log
        // last recorded that pool down on are the ones the outage names: the predecessor
        // reported it. (A host logged up again since, or another logged down, is a change
        // the predecessor had not judged yet: it is judged and logged as new.)
        self.logged_liveness.clear();
        self.logged_pools.clear();
        let mut outages: BTreeMap<String, (bool, Vec<String>)> = BTreeMap::new();
        for e in &cx.state.events {
            match (&e.host, &e.kind) {
                (Some(h), EventKind::HostLiveness { to, .. }) => {
                    self.logged_liveness.insert(h.clone(), to.clone());
                }
                (Some(h), EventKind::PoolState { pool, ok }) => {
                    self.logged_pools.insert((h.clone(), pool.clone()), *ok);
                }
                (
                    _,
                    EventKind::StorageOutage {
                        pool,
                        pool_wide,
                        hosts,
                    },
                ) => {
                    outages.insert(pool.clone(), (*pool_wide, hosts.clone()));
                }
                _ => {}
            }
        }
        self.outages = outages
            .into_iter()
            .filter(|(pool, (_, hosts))| {
                let logged_down: Vec<&String> = self
                    .logged_pools
                    .iter()
                    .filter(|((_, p), ok)| p == pool && !**ok)
                    .map(|((h, _), _)| h)
                    .collect();
                // (Recorded before the hosts were kept: the scope is unknown.)
                !hosts.is_empty() && logged_down.iter().copied().eq(hosts.iter())
            })
            .map(|(pool, (pool_wide, hosts))| (pool, outage_scope(pool_wide, &hosts)))
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
        self.begin_adoption(cx);
    }

    /// Issue 12 item 6: a cluster restored from a backup (and not adopted yet) first learns
    /// what the agents know. Its committed generations may be older than ones that agents
    /// have seen since the backup (a recovery after it): an order with such a generation
    /// would be refused, and a start on another host could make a second copy of a VM that
    /// runs elsewhere with a newer generation. So until every host has listed its domains
    /// to this leader, or a full lease has passed, it orders no start, stops nothing and
    /// fences nobody, and each VM reported with a generation above the committed one is
    /// adopted ([`StateCommand::VmAdopted`]): its generation, the host reporting it, and
    /// whether it runs there. The newest report wins (a generation only goes up).
    fn begin_adoption(&mut self, cx: &mut Context<'_>) {
        self.adoption = None;
        let Some(restored) = cx.state.restored.as_ref().filter(|r| !r.adopted) else {
            return;
        };
        let grace = self.election_grace_ms();
        self.adoption = Some(Adoption {
            until_ms: cx.now_ms.saturating_add(grace),
            waiting: cx.state.hosts.keys().cloned().collect(),
            proposed: BTreeMap::new(),
        });
        record_event(
            &mut cx.out,
            cx.wall_ms,
            Severity::Warning,
            None,
            EventKind::RestoreAdoption,
            format!(
                "this cluster was restored from a backup taken at {} ms (Unix time): the agents may know newer VM generations, so nothing is started, stopped or fenced until every host ({}) has listed its domains or a full lease ({grace} ms) has passed; newer generations they report are adopted",
                restored.backup_created_at_ms,
                cx.state.hosts.len()
            ),
        );
        // Agents connected before this monitor led: their last listing is their report.
        let listed: Vec<(String, Vec<DomainInfo>)> = self
            .inventory
            .iter()
            .filter(|(h, _)| self.connected.contains(*h))
            .map(|(h, inv)| (h.clone(), inv.domains.values().cloned().collect()))
            .collect();
        for (host, domains) in listed {
            self.adopt_listing(&host, &domains, cx);
        }
    }

    /// A listing of `host` while adopting: every VM it reports with a generation above the
    /// committed one (and above any adoption proposed) is adopted.
    pub(super) fn adopt_listing(
        &mut self,
        host: &str,
        domains: &[DomainInfo],
        cx: &mut Context<'_>,
    ) {
        let Some(a) = self.adoption.as_mut() else {
            if cx
                .state
                .restored
                .as_ref()
                .is_some_and(|r| r.silent.contains(host))
            {
                // Silent when the adoption ended, heard now: what it runs is adopted (a
                // VmAdopted only ever raises a generation), then it counts as heard.
                for d in domains {
                    if let Some(cmd) = adoption_of(host, d, cx.state, None, cx.wall_ms) {
                        cx.out.push(Action::Propose(cmd));
                    }
                }
                cx.out.push(Action::Propose(StateCommand::RestoreHostHeard {
                    at_ms: cx.wall_ms,
                    host: host.to_string(),
                }));
            }
            return;
        };
        if !cx.state.hosts.contains_key(host) {
            return;
        }
        a.waiting.remove(host);
        for d in domains {
            let Some(cmd) = adoption_of(
                host,
                d,
                cx.state,
                a.proposed.get(&d.uuid).map(|p| p.generation),
                cx.wall_ms,
            ) else {
                continue;
            };
            let StateCommand::VmAdopted { generation, .. } = &cmd else {
                continue;
            };
            a.proposed.insert(
                d.uuid.clone(),
                ProposedAdoption {
                    generation: *generation,
                    at_ms: cx.now_ms,
                    cmd: cmd.clone(),
                },
            );
            cx.out.push(Action::Propose(cmd));
        }
    }

    /// Whether a restored cluster's leader is still adopting (see [`Self::begin_adoption`]);
    /// ends it (durably, with [`StateCommand::RestoreAdopted`]) once every host has listed
    /// its domains or the first full lease has passed, and every adoption has committed.
    pub(super) fn adoption_holds(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(a) = self.adoption.as_mut() else {
            return false;
        };
        if cx.state.restored.as_ref().is_none_or(|r| r.adopted) {
            // Another leader finished it.
            self.adoption = None;
            return false;
        }
        a.proposed.retain(|u, p| {
            cx.state
                .vms
                .get(u)
                .is_some_and(|v| v.generation < p.generation)
        });
        for p in a.proposed.values_mut() {
            // A proposal that did not commit (a write lost on its way) is made again.
            if cx.now_ms.saturating_sub(p.at_ms) >= ADOPTION_RETRY_MS {
                p.at_ms = cx.now_ms;
                cx.out.push(Action::Propose(p.cmd.clone()));
            }
        }
        let lease_over = cx.now_ms >= a.until_ms;
        if !a.proposed.is_empty() || !(a.waiting.is_empty() || lease_over) {
            return true;
        }
        let message = if a.waiting.is_empty() {
            "every host listed its domains to the restored cluster's leader: it acts again"
                .to_string()
        } else {
            let silent: Vec<&str> = a.waiting.iter().map(String::as_str).collect();
            format!(
                "a full lease passed since the restored cluster's leader was elected: it acts again; not heard from: {} (no VM restarts until each of them is heard or fenced: one may run a copy the backup does not know of)",
                silent.join(", ")
            )
        };
        let silent = a.waiting.iter().cloned().collect();
        cx.out.push(Action::Propose(StateCommand::RestoreAdopted {
            at_ms: cx.wall_ms,
            message,
            silent,
        }));
        self.adoption = None;
        false
    }

    /// This monitor no longer leads: no grants, no actions.
    pub(super) fn on_lost_leadership(&mut self) {
        self.leader = false;
        self.adoption = None;
        self.forget_held();
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

/// The adoption of what `host` reports of `d`'s VM, if it reports a generation above the
/// committed one and above `proposed` (one already proposed).
fn adoption_of(
    host: &str,
    d: &DomainInfo,
    state: &ClusterState,
    proposed: Option<u64>,
    wall_ms: u64,
) -> Option<StateCommand> {
    let generation = d.meta.generation?;
    let vm = state.vms.get(&d.uuid)?;
    if generation <= proposed.map_or(vm.generation, |p| p.max(vm.generation)) {
        return None;
    }
    Some(StateCommand::VmAdopted {
        at_ms: wall_ms,
        uuid: d.uuid.clone(),
        host: host.to_string(),
        generation,
        running: matches!(d.state, DomainState::Running | DomainState::Paused),
    })
}

/// Whether restarts wait for hosts a restored cluster never heard ([`Restored::silent`]):
/// while one of them is neither heard nor fenced.
///
/// [`Restored::silent`]: crate::state::Restored::silent
pub(super) fn restore_silent_holds(state: &ClusterState) -> bool {
    state.restored.as_ref().is_some_and(|r| {
        r.silent.iter().any(|h| {
            state
                .hosts
                .get(h)
                .is_some_and(|x| !matches!(x.phase, crate::state::HostPhase::Fenced { .. }))
        })
    })
}
