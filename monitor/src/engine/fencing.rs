//! Host fencing: which silent hosts are fenced, by which method, the mass-failure hold, and the
//! operator's fence verbs.

use super::*;

/// Wait this long before retrying a failed fence.
pub const FENCE_RETRY_MS: u64 = 5_000;

/// Beyond a fence agent's time limit, how long a BMC may still carry out a power-off it was
/// sent just before the agent was killed.
pub const PREDECESSOR_FENCE_MARGIN_MS: u64 = 5_000;

/// What this leader knows of host fencing: reset with `Default` when a monitor becomes leader
/// (what a predecessor was doing is read again from committed state and the storage slots).
#[derive(Debug, Clone, Default)]
pub(super) struct FencingBook {
    /// Fence agent calls in flight, or proposed and waiting for their commit.
    pub(super) in_flight: BTreeSet<String>,
    /// Power fences proposed (`FenceStarted`) and not yet committed: the fence agent runs
    /// only once the attempt is in the committed state (so two leaders never fence at once
    /// for different reasons, and a leader that cannot commit never fences). Per host: the
    /// committed attempt number that releases it, and when it was proposed (monotonic ms).
    pub(super) awaiting_commit: BTreeMap<String, (u32, u64)>,
    /// Earliest time (wall ms) for the next fence attempt of a host.
    pub(super) retry_at: BTreeMap<String, u64>,
    /// Clusters whose automatic fencing is held (mass failure), to say so once.
    pub(super) held: BTreeSet<String>,
    /// Hosts an operator released from a mass-failure hold (`vigilctl fencing release`): they
    /// neither count towards nor wait for a hold until they are heard again.
    pub(super) released: BTreeSet<String>,
    /// Fence requests written to storage slots by this leader.
    pub(super) slot_requests: BTreeMap<String, FenceRequest>,
    /// Hosts whose proof (slot or lease) was proposed.
    pub(super) proof_proposed: BTreeSet<String>,
    /// Earliest time (monotonic ms) to power-fence a host in Fencing.
    pub(super) power_after: BTreeMap<String, u64>,
    /// Hosts already reported as unfenceable (no method), to say so once.
    pub(super) unfenceable: BTreeSet<String>,
    /// The last condition recorded per host (events on change).
    pub(super) conditions: BTreeMap<String, Condition>,
    /// Hosts that were being fenced when this monitor became leader, and until when
    /// (monotonic ms) a fence agent that a predecessor started may still power them off:
    /// this leader cannot know, and cannot call it back. Such a host does not rejoin before
    /// then (see [`Engine::may_rejoin`]).
    pub(super) predecessor_until: BTreeMap<String, u64>,
}

impl Engine {
    /// A fence agent's verdict.
    pub(super) fn on_fence_done(
        &mut self,
        host: String,
        result: Result<String, FenceFailure>,
        cx: &mut Context<'_>,
    ) {
        self.fencing.in_flight.remove(&host);
        let cmd = match result {
            Ok(detail) => StateCommand::HostProvenOff {
                at_ms: cx.wall_ms,
                host,
                proof: HostProof::Power { detail },
            },
            Err(e) => {
                self.fencing
                    .retry_at
                    .insert(host.clone(), cx.wall_ms + FENCE_RETRY_MS);
                StateCommand::FenceFailed {
                    at_ms: cx.wall_ms,
                    host,
                    detail: e.to_string(),
                }
            }
        };
        cx.out.push(Action::Propose(cmd));
    }

    /// Host failures: investigate silent hosts, fence the ones that are down and hold HA
    /// VMs (unless a mass failure holds fencing) by every method that can prove something
    /// for their condition, and move the VMs of fenced hosts.
    ///
    /// | condition | power (BMC) | storage slot | lease expiry |
    /// | --- | --- | --- | --- |
    /// | dead | at once | asked (harmless) | proof after lease + margin + W, where the host watchdog (timeout W) backs it |
    /// | isolated | only once the lease has run out without proof (or keep-running) | asked at once | the same |
    /// | agent down | after one lease (systemd restarts agents) | asked | the same: the unfed watchdog resets the host even with its agent dead |
    ///
    /// Lease expiry is never proof for a host whose agent reported no armed watchdog
    /// (`LeaseBook::usable`), nor while a mass-failure hold keeps the leader record from
    /// condemning anyone (`LeaderRecord::condemned_hosts`).
    pub(super) fn reconcile_hosts(&mut self, cx: &mut Context<'_>) {
        // Hosts holding protected VMs, computed once (not once per host: this runs every tick).
        let hosts_with_ha: BTreeSet<&str> = cx
            .state
            .vms
            .values()
            .filter(|v| v.ha && !matches!(v.phase, Phase::Stopped { .. } | Phase::GaveUp { .. }))
            .map(|v| v.host.as_str())
            .collect();
        for (name, h) in &cx.state.hosts {
            if self.incompatible_alive(name, cx.now_ms) {
                // It spoke to us: alive, whatever its silence on the agent protocol says.
                continue;
            }
            let live = self.detector.state(name);
            let down = live == Some(Liveness::Down);
            let silent = down || live == Some(Liveness::Suspect);
            // The common case, on every tick for nearly every host: heard, active, and known
            // alive (or never recorded otherwise). Nothing below would change or propose
            // anything for it (its condition is Alive, and only Active hosts that are down
            // are fenced), so it costs no more lookups (BENCHMARKS.md, "Heartbeat load").
            if !silent
                && h.phase == HostPhase::Active
                && self
                    .fencing
                    .conditions
                    .get(name.as_str())
                    .is_none_or(|c| *c == Condition::Alive)
            {
                continue;
            }
            if silent {
                self.probe(name, &h.cluster, cx);
            }
            let pools = if h.pools.is_empty() {
                self.host_pools.get(name).cloned().unwrap_or_default()
            } else {
                h.pools.clone()
            };
            let has_pools = !pools.is_empty();
            let condition = self
                .evidence
                .condition(name, silent, down, has_pools, cx.now_ms);
            if !self.fenced_before_election.contains(name) {
                self.record_condition(name, &condition, cx.wall_ms, &mut cx.out);
            }
            let has_ha = hosts_with_ha.contains(name.as_str());
            // Through the slot only with the host's agent instance known (never instance 0: a
            // request for "any" agent would also kill the guests of one that rejoined).
            let slot = self.failover.storage_slot
                && !pools.is_empty()
                && self.instances.get(name).is_some_and(|i| *i != 0);
            let power = self.failover.fence_hosts.contains(name);
            let silent = SilentHost {
                name,
                cluster: &h.cluster,
                condition,
                pools,
                slot,
                power,
                down,
            };
            match &h.phase {
                // No fencing of any kind in the first full lease after the election.
                HostPhase::Active if down && has_ha && cx.now_ms >= self.fence_after_ms => {
                    self.start_fencing(&silent, cx)
                }
                HostPhase::Fencing { .. } => self.continue_fencing(&silent, cx),
                HostPhase::Fenced { proof, .. } => self.fail_vms_of_fenced_host(name, proof, cx),
                _ => {}
            }
        }
        // A cluster whose hosts are back below the threshold may be fenced again.
        let still_held: BTreeSet<String> = self
            .fencing
            .held
            .iter()
            .filter(|c| {
                cx.state.hosts.iter().any(|(n, h)| {
                    &h.cluster == *c && self.mass_failure(n, cx.state, cx.now_ms).is_some()
                })
            })
            .cloned()
            .collect();
        self.fencing.held = still_held;
        // A released host that is heard again starts afresh.
        let released: BTreeSet<String> = self
            .fencing
            .released
            .iter()
            .filter(|n| self.detector.state(n) == Some(Liveness::Down))
            .cloned()
            .collect();
        self.fencing.released = released;
    }

    /// An active host that is down and holds HA VMs: start fencing it by every method that can
    /// prove something for its condition, unless nothing can (say so once) or a mass failure
    /// holds fencing (say so once).
    fn start_fencing(&mut self, silent: &SilentHost<'_>, cx: &mut Context<'_>) {
        let SilentHost {
            name,
            cluster,
            condition,
            pools,
            slot,
            power,
            ..
        } = silent;
        let (name, slot, power) = (*name, *slot, *power);
        let (lease_usable, power_at) = match condition {
            // Whether peers confirmed it unreachable or not: a dead agent on a
            // live host is reset by its watchdog, which `usable` requires.
            Condition::Dead { .. } => (true, cx.now_ms),
            Condition::Isolated { .. } => {
                let lease_ok = self.leases.usable(name, pools).is_ok();
                let at = if lease_ok || slot {
                    self.leases.expires_at(name).unwrap_or(cx.now_ms)
                } else {
                    cx.now_ms
                };
                (true, at)
            }
            Condition::AgentDown { .. } => {
                // Give the agent one lease to come back before fencing at all.
                if self.leases.expires_at(name).is_some_and(|t| cx.now_ms < t) {
                    return;
                }
                // The agent is dead: only its host watchdog can back a lease.
                (true, cx.now_ms)
            }
            Condition::Alive | Condition::Investigating => return,
        };
        let lease_possible = lease_usable && self.leases.usable(name, pools).is_ok();
        if !power && !slot && !lease_possible {
            if self.fencing.unfenceable.insert(name.clone()) {
                record_event(&mut cx.out, cx.wall_ms, Severity::Critical, Some(name.clone()), EventKind::HostUnfenceable, format!(
                        "host {name} is {} ({}) and holds HA VMs, but nothing can prove it fenced: no fence agent configured, no storage slot, and lease expiry proves nothing here ({}). Its HA VMs wait; fence it by hand",
                        condition.name(),
                        condition_evidence(condition),
                        self.leases.usable(name, pools).err().unwrap_or_default()
                    ));
            }
            return;
        }
        if let Some(why) = self.mass_failure(name, cx.state, cx.now_ms) {
            if self.fencing.held.insert(cluster.to_string()) {
                record_event(
                    &mut cx.out,
                    cx.wall_ms,
                    Severity::Critical,
                    Some(name.clone()),
                    EventKind::FencingHeld,
                    why,
                );
            }
            return;
        }
        let mut methods = Vec::new();
        if power {
            methods.push(if power_at <= cx.now_ms {
                "power (now)"
            } else {
                "power (if no other proof before the lease ends)"
            });
        }
        if slot {
            methods.push("storage slot");
        }
        if lease_possible {
            methods.push("lease expiry");
        }
        cx.out.push(Action::Propose(StateCommand::FenceStarted {
            at_ms: cx.wall_ms,
            host: name.clone(),
            reason: format!(
                "{} ({}), holds HA VMs; proof by {}{}",
                condition.name(),
                condition_evidence(condition),
                methods.join(", "),
                match self.leases.usable(name, pools) {
                    Err(why) if lease_usable => {
                        format!(" (not lease expiry: {why})")
                    }
                    _ => String::new(),
                }
            ),
        }));
        if power {
            self.fencing.power_after.insert(name.clone(), power_at);
        }
        // The slot request and the power fence follow once FenceStarted is committed
        // (`continue_fencing`, `release_committed_fences`).
        if power && power_at <= cx.now_ms && self.fencing.in_flight.insert(name.clone()) {
            self.fencing
                .awaiting_commit
                .insert(name.clone(), (1, cx.now_ms));
        }
    }

    /// Proposes a power-fence attempt of `host` (`FenceStarted`); the fence agent runs once
    /// the attempt is committed ([`Self::release_committed_fences`]).
    pub(super) fn propose_power_fence(&mut self, host: &str, reason: String, cx: &mut Context<'_>) {
        let attempt = match cx.state.hosts.get(host).map(|h| &h.phase) {
            Some(HostPhase::Fencing { attempts, .. }) => attempts + 1,
            _ => 1,
        };
        self.fencing.in_flight.insert(host.to_string());
        self.fencing.retry_at.remove(host);
        self.fencing
            .awaiting_commit
            .insert(host.to_string(), (attempt, cx.now_ms));
        cx.out.push(Action::Propose(StateCommand::FenceStarted {
            at_ms: cx.wall_ms,
            host: host.to_string(),
            reason,
        }));
    }

    /// Runs the fence agent for every proposed attempt that is now committed; forgets one that
    /// has not committed within [`FENCE_RETRY_MS`] (the proposal was lost) so it is tried again.
    pub(super) fn release_committed_fences(&mut self, cx: &mut Context<'_>) {
        let hosts: Vec<(String, u32, u64)> = self
            .fencing
            .awaiting_commit
            .iter()
            .map(|(h, (a, t))| (h.clone(), *a, *t))
            .collect();
        for (host, attempt, since) in hosts {
            let committed = match cx.state.hosts.get(&host).map(|h| &h.phase) {
                Some(HostPhase::Fencing { attempts, .. }) => *attempts >= attempt,
                _ => false,
            };
            if committed {
                self.fencing.awaiting_commit.remove(&host);
                cx.out.push(Action::Fence { host });
            } else if cx.now_ms.saturating_sub(since) > FENCE_RETRY_MS {
                self.fencing.awaiting_commit.remove(&host);
                self.fencing.in_flight.remove(&host);
            }
        }
    }

    /// A host being fenced: ask its slot again (a new leader), take lease expiry as proof where
    /// the host watchdog backs it, and power it off when due.
    fn continue_fencing(&mut self, silent: &SilentHost<'_>, cx: &mut Context<'_>) {
        let SilentHost {
            name,
            condition,
            pools,
            slot,
            power,
            down,
            ..
        } = silent;
        let (name, slot, power, down) = (*name, *slot, *power, *down);
        if !down || cx.now_ms < self.fence_after_ms {
            return;
        }
        if slot && !self.fencing.slot_requests.contains_key(name) {
            // A new leader asks again (its predecessor's request may be gone).
            self.request_fence(name, condition, cx);
        }
        // Lease expiry is proof only where the host watchdog backs it: then a
        // dead or hung agent cannot keep the guests past lease + W either.
        let lease_usable = self.leases.usable(name, pools).is_ok();
        if lease_usable && !self.fencing.proof_proposed.contains(name) {
            if let Ok(proof) = self.leases.proof(name, pools, cx.now_ms) {
                self.fencing.proof_proposed.insert(name.clone());
                cx.out.push(Action::Propose(StateCommand::HostProvenOff {
                    at_ms: cx.wall_ms,
                    host: name.clone(),
                    proof,
                }));
                return;
            }
        }
        if !power {
            return;
        }
        let power_at = *self
            .fencing
            .power_after
            .entry(name.clone())
            .or_insert(cx.now_ms);
        let due = cx.now_ms >= power_at
            && self
                .fencing
                .retry_at
                .get(name)
                .is_none_or(|t| cx.wall_ms >= *t);
        if due && !self.fencing.in_flight.contains(name) {
            let reason = "power fencing (no other proof yet, or retrying after a failed attempt)";
            self.propose_power_fence(name, reason.into(), cx);
        }
    }

    pub(super) fn end_fencing_episode(&mut self, host: &str, out: &mut Vec<Action>) {
        if let Some(req) = self.fencing.slot_requests.remove(host) {
            // Void at once, even before the clear reaches storage: the agent may read its
            // slot before the file is gone.
            out.push(Action::Notify {
                host: Some(host.to_string()),
                message: MonitorToAgent::FenceWithdrawn { id: req.id },
            });
        }
        out.push(Action::ClearFence {
            host: host.to_string(),
        });
    }

    /// `host` was heard (a new session or a heartbeat) while it is not active, or while a
    /// fence of it is proposed: whether it may rejoin now. A power fence proposed but not yet
    /// started is called off (its fence agent never runs: the host is back before anything
    /// was done to it). A fence agent already running cannot be called back (the BMC may be
    /// cutting the power this moment): the host rejoins only once that attempt has failed,
    /// and its success is the proof it would have been (a host that rejoined first was
    /// powered off unrecorded, its VMs never restarted: seed 3589).
    ///
    /// The same holds for a fence agent that a previous leader started: a new leader does
    /// not know whether one still runs (a deposed or killed monitor's agent runs on, in its
    /// own process group, until its time limit), so a host that was being fenced at the
    /// election rejoins only once that limit has passed since
    /// ([`FencingBook::predecessor_until`]). Heard again after that, it rejoins at its next
    /// heartbeat.
    pub(super) fn may_rejoin(&mut self, host: &str, now_ms: u64) -> bool {
        if self.fencing.awaiting_commit.remove(host).is_some() {
            self.fencing.in_flight.remove(host);
        }
        if self
            .fencing
            .predecessor_until
            .get(host)
            .is_some_and(|until| now_ms < *until)
        {
            return false;
        }
        !self.fencing.in_flight.contains(host)
    }

    /// Notes, at this monitor's election, every host being fenced whose last attempt has no
    /// committed outcome: a predecessor's fence agent may still run against it until
    /// `now_ms` + the agents' time limit + margin. (An attempt whose failure is in the event
    /// log has ended; when the log no longer holds its events, the host is noted anyway.)
    pub(super) fn note_predecessor_fences(&mut self, state: &ClusterState, now_ms: u64) {
        let until = now_ms + self.failover.fence_agent_limit_ms + PREDECESSOR_FENCE_MARGIN_MS;
        let failed = |host: &str, attempt: u32| {
            state.events.iter().rev().any(|e| {
                e.host.as_deref() == Some(host) && e.kind == EventKind::HostFenceFailed { attempt }
            })
        };
        self.fencing.predecessor_until = state
            .hosts
            .iter()
            .filter(|(name, h)| match h.phase {
                HostPhase::Fencing { attempts, .. } => !failed(name, attempts),
                _ => false,
            })
            .map(|(name, _)| (name.clone(), until))
            .collect();
    }

    /// Forgets this leader's bookkeeping of a host's fencing (it is back).
    pub(super) fn forget_fencing(&mut self, host: &str) {
        self.fencing.predecessor_until.remove(host);
        self.fencing.proof_proposed.remove(host);
        self.fencing.power_after.remove(host);
        self.fencing.unfenceable.remove(host);
    }

    /// Writes a fence request into `host`'s storage slot.
    pub(super) fn request_fence(
        &mut self,
        host: &str,
        condition: &Condition,
        cx: &mut Context<'_>,
    ) {
        let Some(instance) = self.instances.get(host).copied().filter(|i| *i != 0) else {
            return;
        };
        let last = self
            .fencing
            .slot_requests
            .values()
            .map(|r| r.id)
            .max()
            .unwrap_or(0);
        // Every VM the leader holds as HA on the host: the agent treats them as HA even if
        // it never heard the flag, and must show each one not running.
        let vms = cx
            .state
            .vms
            .values()
            .filter(|v| v.ha && v.host == host)
            .map(|v| v.uuid.clone())
            .collect();
        let req = FenceRequest {
            id: cx.wall_ms.max(last + 1),
            host: host.to_string(),
            instance,
            vms,
            term: self.term_node.0,
            node: self.term_node.1,
            wall_ms: cx.wall_ms,
            reason: format!(
                "{} to the monitors ({})",
                condition.name(),
                condition_evidence(condition)
            ),
        };
        self.fencing
            .slot_requests
            .insert(host.to_string(), req.clone());
        cx.out.push(Action::RequestFence(req));
    }

    /// `Some(explanation)` when too many hosts of `host`'s cluster (a Down host) are down at
    /// once. "At once": only hosts that went silent within `mass_failure_window_ms` of `host`
    /// count, and only those not proven off yet (a host fenced a minute ago plus one more now
    /// are two single failures), and none an operator released from the hold.
    pub(super) fn mass_failure(
        &self,
        host: &str,
        state: &ClusterState,
        now_ms: u64,
    ) -> Option<String> {
        if self.fencing.released.contains(host) || self.detector.state(host) != Some(Liveness::Down)
        {
            return None;
        }
        let cluster = &state.hosts.get(host)?.cluster;
        // When a host went silent (monotonic ms); one not heard since this monitor's detector
        // started went silent at its start, like every other such host.
        let silent_since = |n: &str| -> u64 {
            self.detector
                .view(n, now_ms)
                .and_then(|v| v.silent_ms)
                .map_or(0, |s| now_ms.saturating_sub(s))
        };
        let own = silent_since(host);
        let window = self.failover.mass_failure_window_ms;
        let members: Vec<(&String, &crate::state::HostRecord)> = state
            .hosts
            .iter()
            .filter(|(_, h)| &h.cluster == cluster)
            .collect();
        let counted: Vec<&str> = members
            .iter()
            .filter(|(n, h)| {
                self.detector.state(n) == Some(Liveness::Down)
                    && !matches!(h.phase, HostPhase::Fenced { .. })
                    && !self.fencing.released.contains(*n)
                    && silent_since(n).abs_diff(own) <= window
            })
            .map(|(n, _)| n.as_str())
            .collect();
        let down = counted.len();
        let total = members.len();
        let pct = self.failover.mass_failure_percent.max(1) as usize;
        (down >= 2 && down * 100 > total * pct).then(|| {
            format!(
                "mass failure in cluster {cluster}: {down} of {total} hosts went down within {} s of each other and are not proven off ({}; more than {pct} %); automatic fencing is held — more likely a network fault on the monitors' side. Check each host, then: `vigilctl host fence H` runs H's fence agent now; `vigilctl host confirm-off H` records that you made sure H is off (its HA VMs start elsewhere); `vigilctl fencing release` fences them all automatically",
                window / 1000,
                counted.join(", ")
            )
        })
    }
}

/// What the fencing phases need to know of a silent (or not yet cleared) host, read once per
/// tick in [`Engine::reconcile_hosts`].
pub(super) struct SilentHost<'a> {
    pub(super) name: &'a String,
    pub(super) cluster: &'a String,
    pub(super) condition: Condition,
    /// The pools it mounts (its record's, or its hello's before that was replicated).
    pub(super) pools: Vec<String>,
    /// It can be asked to fence itself through its storage slot.
    pub(super) slot: bool,
    /// It has a fence agent.
    pub(super) power: bool,
    pub(super) down: bool,
}
