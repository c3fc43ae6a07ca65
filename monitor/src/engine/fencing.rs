//! Host fencing: which silent hosts are fenced, by which method, the mass-failure hold, and the
//! operator's fence verbs.

use super::*;

/// Wait this long before retrying a failed fence.
pub const FENCE_RETRY_MS: u64 = 5_000;

impl Engine {
    /// A fence agent's verdict.
    pub(super) fn on_fence_done(
        &mut self,
        host: String,
        result: Result<String, String>,
        wall_ms: u64,
        out: &mut Vec<Action>,
    ) {
        self.fencing.remove(&host);
        let (ok, detail) = match result {
            Ok(d) => (true, format!("power: {d}")),
            Err(e) => {
                self.fence_retry_at
                    .insert(host.clone(), wall_ms + FENCE_RETRY_MS);
                (false, e)
            }
        };
        out.push(Action::Propose(StateCommand::FenceResult {
            at_ms: wall_ms,
            host,
            ok,
            detail,
        }));
    }

    /// `vigilctl host fence`: power the host off through its fence agent now.
    pub(super) fn on_operator_fence(
        &mut self,
        host: String,
        by: String,
        now_ms: u64,
        wall_ms: u64,
        state: &ClusterState,
        out: &mut Vec<Action>,
    ) {
        if self.fence_refusal(&host, true, now_ms).is_none()
            && state
                .hosts
                .get(&host)
                .is_some_and(|h| !matches!(h.phase, HostPhase::Fenced { .. }))
        {
            self.fencing.insert(host.clone());
            self.fence_retry_at.remove(&host);
            // A failed attempt is retried like any power fence.
            self.power_after.insert(host.clone(), now_ms);
            out.push(Action::Propose(StateCommand::FenceStarted {
                at_ms: wall_ms,
                host: host.clone(),
                reason: format!(
                    "operator {by} asked for it (vigilctl host fence): powering it off through its fence agent now"
                ),
            }));
            out.push(Action::Fence { host });
        }
    }

    /// `vigilctl fencing release`: lift a mass-failure hold.
    pub(super) fn on_release_hold(
        &mut self,
        cluster: Option<String>,
        by: String,
        now_ms: u64,
        wall_ms: u64,
        state: &ClusterState,
        out: &mut Vec<Action>,
    ) {
        let clusters: Vec<String> = self
            .held
            .iter()
            .filter(|c| cluster.as_ref().is_none_or(|w| w == *c))
            .cloned()
            .collect();
        for c in clusters {
            let hosts: Vec<String> = state
                .hosts
                .iter()
                .filter(|(n, h)| {
                    h.cluster == c
                        && self.detector.state(n) == Some(Liveness::Down)
                        && !matches!(h.phase, HostPhase::Fenced { .. })
                })
                .map(|(n, _)| n.clone())
                .collect();
            self.released.extend(hosts.iter().cloned());
            self.held.remove(&c);
            out.push(Action::Propose(StateCommand::RecordEvent {
                at_ms: wall_ms,
                severity: Severity::Critical,
                host: None,
                kind: EventKind::FencingReleased {
                    cluster: c.clone(),
                    by: by.clone(),
                },
                message: format!(
                    "operator {by} released the mass-failure hold of cluster {c} (vigilctl fencing release): {} fenced automatically now",
                    if hosts.is_empty() {
                        "no host is down there any more; nothing is".to_string()
                    } else {
                        format!("{} are", hosts.join(", "))
                    }
                ),
            }));
        }
        self.reconcile_hosts(now_ms, wall_ms, state, out);
    }

    /// Host failures: investigate silent hosts, fence the ones that are down and hold HA
    /// VMs (unless a mass failure holds fencing) by every method that can prove something
    /// for their condition, and move the VMs of fenced hosts.
    ///
    /// | condition | power (BMC) | storage slot | lease expiry |
    /// | --- | --- | --- | --- |
    /// | dead | at once | asked (harmless) | proof after lease + margin |
    /// | isolated | only once the lease has run out without proof (or keep-running) | asked at once | proof after lease + margin |
    /// | agent down | after one lease (systemd restarts agents) | asked | never (no agent to fence itself) |
    pub(super) fn reconcile_hosts(
        &mut self,
        now_ms: u64,
        wall_ms: u64,
        state: &ClusterState,
        out: &mut Vec<Action>,
    ) {
        // Hosts holding protected VMs, computed once (not once per host: this runs every tick).
        let hosts_with_ha: BTreeSet<&str> = state
            .vms
            .values()
            .filter(|v| v.ha && !matches!(v.phase, Phase::Stopped { .. } | Phase::GaveUp { .. }))
            .map(|v| v.host.as_str())
            .collect();
        for (name, h) in &state.hosts {
            if self.incompatible_alive(name, now_ms) {
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
                    .conditions
                    .get(name.as_str())
                    .is_none_or(|c| *c == Condition::Alive)
            {
                continue;
            }
            if silent {
                self.probe(name, &h.cluster, now_ms, state, out);
            }
            let pools = if h.pools.is_empty() {
                self.host_pools.get(name).cloned().unwrap_or_default()
            } else {
                h.pools.clone()
            };
            let has_pools = !pools.is_empty();
            let condition = self
                .evidence
                .condition(name, silent, down, has_pools, now_ms);
            self.record_condition(name, &condition, wall_ms, out);
            let has_ha = hosts_with_ha.contains(name.as_str());
            // Through the slot only with the host's agent instance known (never instance 0: a
            // request for "any" agent would also kill the guests of one that rejoined).
            let slot = self.failover.storage_slot
                && !pools.is_empty()
                && self.instances.get(name).is_some_and(|i| *i != 0);
            let power = self.failover.fence_hosts.contains(name);
            match &h.phase {
                // No fencing of any kind in the first full lease after the election.
                HostPhase::Active if down && has_ha && now_ms >= self.fence_after_ms => {
                    let (lease_usable, power_at) = match &condition {
                        // Whether peers confirmed it unreachable or not: a dead agent on a
                        // live host is reset by its watchdog, which `usable` requires.
                        Condition::Dead { .. } => (true, now_ms),
                        Condition::Isolated { .. } => {
                            let lease_ok = self.leases.usable(name, &pools).is_ok();
                            let at = if lease_ok || slot {
                                self.leases.expires_at(name).unwrap_or(now_ms)
                            } else {
                                now_ms
                            };
                            (true, at)
                        }
                        Condition::AgentDown { .. } => {
                            // Give the agent one lease to come back before fencing at all.
                            if self.leases.expires_at(name).is_some_and(|t| now_ms < t) {
                                continue;
                            }
                            // The agent is dead: only its host watchdog can back a lease.
                            (true, now_ms)
                        }
                        Condition::Alive | Condition::Investigating => continue,
                    };
                    let lease_possible = lease_usable && self.leases.usable(name, &pools).is_ok();
                    if !power && !slot && !lease_possible {
                        if self.unfenceable.insert(name.clone()) {
                            out.push(Action::Propose(StateCommand::RecordEvent {
                                at_ms: wall_ms,
                                severity: Severity::Critical,
                                host: Some(name.clone()),
                                kind: EventKind::HostUnfenceable,
                                message: format!(
                                    "host {name} is {} ({}) and holds HA VMs, but nothing can prove it fenced: no fence agent configured, no storage slot, and lease expiry proves nothing here ({}). Its HA VMs wait; fence it by hand",
                                    condition.name(),
                                    condition_evidence(&condition),
                                    self.leases.usable(name, &pools).err().unwrap_or_default()
                                ),
                            }));
                        }
                        continue;
                    }
                    if let Some(why) = self.mass_failure(name, state, now_ms) {
                        if self.held.insert(h.cluster.clone()) {
                            out.push(Action::Propose(StateCommand::RecordEvent {
                                at_ms: wall_ms,
                                severity: Severity::Critical,
                                host: Some(name.clone()),
                                kind: EventKind::FencingHeld,
                                message: why,
                            }));
                        }
                        continue;
                    }
                    let mut methods = Vec::new();
                    if power {
                        methods.push(if power_at <= now_ms {
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
                    out.push(Action::Propose(StateCommand::FenceStarted {
                        at_ms: wall_ms,
                        host: name.clone(),
                        reason: format!(
                            "{} ({}), holds HA VMs; proof by {}{}",
                            condition.name(),
                            condition_evidence(&condition),
                            methods.join(", "),
                            match self.leases.usable(name, &pools) {
                                Err(why) if lease_usable => {
                                    format!(" (not lease expiry: {why})")
                                }
                                _ => String::new(),
                            }
                        ),
                    }));
                    if power {
                        self.power_after.insert(name.clone(), power_at);
                    }
                    if slot {
                        self.request_fence(name, &condition, wall_ms, state, out);
                    }
                    if power && power_at <= now_ms && self.fencing.insert(name.clone()) {
                        out.push(Action::Fence { host: name.clone() });
                    }
                }
                HostPhase::Fencing { .. } => {
                    if !down || now_ms < self.fence_after_ms {
                        continue;
                    }
                    if slot && !self.slot_requests.contains_key(name) {
                        // A new leader asks again (its predecessor's request may be gone).
                        self.request_fence(name, &condition, wall_ms, state, out);
                    }
                    // Lease expiry is proof only where the host watchdog backs it: then a
                    // dead or hung agent cannot keep the guests past lease + W either.
                    let lease_usable = self.leases.usable(name, &pools).is_ok();
                    if lease_usable && !self.proof_proposed.contains(name) {
                        if let Ok(detail) = self.leases.proof(name, &pools, now_ms) {
                            self.proof_proposed.insert(name.clone());
                            out.push(Action::Propose(StateCommand::FenceResult {
                                at_ms: wall_ms,
                                host: name.clone(),
                                ok: true,
                                detail,
                            }));
                            continue;
                        }
                    }
                    if !power {
                        continue;
                    }
                    let power_at = *self.power_after.entry(name.clone()).or_insert(now_ms);
                    let due = now_ms >= power_at
                        && self.fence_retry_at.get(name).is_none_or(|t| wall_ms >= *t);
                    if due && !self.fencing.contains(name) {
                        self.fencing.insert(name.clone());
                        self.fence_retry_at.remove(name);
                        out.push(Action::Propose(StateCommand::FenceStarted {
                            at_ms: wall_ms,
                            host: name.clone(),
                            reason: "power fencing (no other proof yet, or retrying after a failed attempt)".into(),
                        }));
                        out.push(Action::Fence { host: name.clone() });
                    }
                }
                HostPhase::Fenced { proof, .. } => {
                    let vms: Vec<&VmRecord> = state
                        .vms
                        .values()
                        .filter(|v| v.ha && v.host == *name)
                        .filter(|v| matches!(v.phase, Phase::Running | Phase::Recovering { .. }))
                        .collect();
                    for vm in vms {
                        if self.proposed_failure.get(&vm.uuid) == Some(&vm.generation) {
                            continue;
                        }
                        let need = need_of(vm);
                        let (tag, fallback) =
                            (self.failover.ha_tag.clone(), self.failover.ha_tag_fallback);
                        let views = self.views(state);
                        let (target, warning) = placement::failover_target(
                            &state.hosts,
                            views,
                            name,
                            &need,
                            tag.as_deref(),
                            fallback,
                        );
                        self.warn_tag(vm, warning, wall_ms, out);
                        if let Some(t) = &target {
                            // Reserved now: the next VM of this host must see it taken.
                            if let Some(v) = self.views(state).get_mut(t) {
                                v.reserve(&need);
                            }
                        }
                        let decision =
                            recovery::decide_host_failure(vm, wall_ms, &self.policy, target);
                        self.proposed_failure.insert(vm.uuid.clone(), vm.generation);
                        out.push(Action::Propose(StateCommand::VmFailed {
                            at_ms: wall_ms,
                            uuid: vm.uuid.clone(),
                            generation: vm.generation,
                            failure: FailureKind::HostFailed,
                            proof: Proof::HostFenced {
                                host: name.clone(),
                                detail: proof.clone(),
                            },
                            decision,
                            window_ms: self.policy.window_ms,
                        }));
                    }
                }
                _ => {}
            }
        }
        // A cluster whose hosts are back below the threshold may be fenced again.
        let still_held: BTreeSet<String> =
            self.held
                .iter()
                .filter(|c| {
                    state.hosts.iter().any(|(n, h)| {
                        &h.cluster == *c && self.mass_failure(n, state, now_ms).is_some()
                    })
                })
                .cloned()
                .collect();
        self.held = still_held;
        // A released host that is heard again starts afresh.
        let released: BTreeSet<String> = self
            .released
            .iter()
            .filter(|n| self.detector.state(n) == Some(Liveness::Down))
            .cloned()
            .collect();
        self.released = released;
    }

    pub(super) fn end_fencing_episode(&mut self, host: &str, out: &mut Vec<Action>) {
        if let Some(req) = self.slot_requests.remove(host) {
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

    /// Forgets this leader's bookkeeping of a host's fencing (it is back).
    pub(super) fn forget_fencing(&mut self, host: &str) {
        self.proof_proposed.remove(host);
        self.power_after.remove(host);
        self.unfenceable.remove(host);
    }

    /// Writes a fence request into `host`'s storage slot.
    pub(super) fn request_fence(
        &mut self,
        host: &str,
        condition: &Condition,
        wall_ms: u64,
        state: &ClusterState,
        out: &mut Vec<Action>,
    ) {
        let Some(instance) = self.instances.get(host).copied().filter(|i| *i != 0) else {
            return;
        };
        let last = self.slot_requests.values().map(|r| r.id).max().unwrap_or(0);
        // Every VM the leader holds as HA on the host: the agent treats them as HA even if
        // it never heard the flag, and must show each one not running.
        let vms = state
            .vms
            .values()
            .filter(|v| v.ha && v.host == host)
            .map(|v| v.uuid.clone())
            .collect();
        let req = FenceRequest {
            id: wall_ms.max(last + 1),
            host: host.to_string(),
            instance,
            vms,
            term: self.term_node.0,
            node: self.term_node.1,
            wall_ms,
            reason: format!(
                "{} to the monitors ({})",
                condition.name(),
                condition_evidence(condition)
            ),
        };
        self.slot_requests.insert(host.to_string(), req.clone());
        out.push(Action::RequestFence(req));
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
        if self.released.contains(host) || self.detector.state(host) != Some(Liveness::Down) {
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
                    && !self.released.contains(*n)
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

    /// Clusters whose automatic fencing is held now (a mass failure).
    pub fn held_clusters(&self) -> Vec<String> {
        self.held.iter().cloned().collect()
    }

    /// Why `vigilctl host fence H` must not run now (`None`: it may). Without `force`, a host
    /// that is up is refused: powering it off stops its running guests.
    pub fn fence_refusal(&self, host: &str, force: bool, now_ms: u64) -> Option<String> {
        if !self.failover.fence_hosts.contains(host) {
            return Some(format!(
                "no fence agent is configured for {host} (add a [[fencing.hosts]] entry); if you made sure it is off, use `vigilctl host confirm-off {host}`"
            ));
        }
        if self.fencing.contains(host) {
            return Some(format!("a fence of {host} is already running"));
        }
        if !force {
            if let Some(why) = self.heard_recently(host, now_ms) {
                return Some(format!(
                    "{host} is not down ({why}): fencing it powers off its running guests; add --force if that is what you want"
                ));
            }
        }
        None
    }

    /// Why an operator may not confirm `host` powered off now (`None`: they may). A host this
    /// monitor hears is not off, whatever anyone says: its guests would run twice.
    pub fn confirm_off_refusal(&self, host: &str, now_ms: u64) -> Option<String> {
        self.heard_recently(host, now_ms).map(|why| {
            format!("{host} is not down ({why}); confirm-off is for a host you made sure is powered off")
        })
    }

    /// `Some(what)` when `host` is connected or not (yet) silent for long.
    pub(super) fn heard_recently(&self, host: &str, now_ms: u64) -> Option<String> {
        if self.connected.contains(host) {
            return Some("its agent is still connected".into());
        }
        match self.detector.view(host, now_ms) {
            Some(v) if matches!(v.state, Liveness::Up | Liveness::Suspect) => Some(format!(
                "last heartbeat {} ms ago",
                v.silent_ms.unwrap_or_default()
            )),
            _ => None,
        }
    }
}
