//! Primary-storage outages: pool states reported by agents, storage cycles of the monitor's own
//! storage threads, and moving HA VMs off a host that alone lost a pool.

use super::*;

/// A pool must be down on a host for this long before that host's HA VMs are moved off it:
/// a storage hiccup must not cost a guest its run.
pub const STORAGE_FAULT_GRACE_MS: u64 = 5_000;

impl Engine {
    /// A storage cycle: the leader record's health (for lease proofs), storage heartbeats
    /// (for investigation) and fence acknowledgements (proof 4).
    pub(super) fn on_storage(
        &mut self,
        pool: &str,
        result: Result<StorageCycle, PoolFault>,
        cx: &mut Context<'_>,
    ) {
        let cycle = match result {
            Ok(c) => c,
            Err(_) => {
                self.leases.record_written(pool, false, cx.now_ms);
                return;
            }
        };
        if self.leader {
            self.leases
                .record_condemning(pool, cycle.leader_written, &cycle.condemned, cx.now_ms);
        }
        for hb in cycle.heartbeats {
            self.evidence.storage_beat(pool, hb, cx.now_ms);
        }
        for ack in cycle.acks {
            let Some(req) = self.fencing.slot_requests.get(&ack.host).cloned() else {
                continue;
            };
            let fencing = cx
                .state
                .hosts
                .get(&ack.host)
                .is_some_and(|h| matches!(h.phase, HostPhase::Fencing { .. }));
            if req.id != ack.id || !fencing || self.fencing.proof_proposed.contains(&ack.host) {
                continue;
            }
            if let Err(why) = vigil_common::storage::ack_proves(&req, &ack) {
                if self.acks_refused.insert(req.id) {
                    record_event(&mut cx.out, cx.wall_ms, Severity::Critical, Some(ack.host.clone()), EventKind::FenceAckRefused, format!(
                            "host {}: the acknowledgement of fence request {} on pool {pool} is not proof: {why}; waiting for another proof",
                            ack.host, ack.id
                        ));
                }
                continue;
            }
            self.fencing.proof_proposed.insert(ack.host.clone());
            cx.out.push(Action::Propose(StateCommand::HostProvenOff {
                at_ms: cx.wall_ms,
                host: ack.host.clone(),
                proof: HostProof::StorageSlot {
                    request: ack.id,
                    pool: pool.to_string(),
                    destroyed: ack.destroyed.len(),
                },
            }));
        }
    }

    /// Primary-storage outages. A pool down on *every* connected host that mounts it is a
    /// pool-wide outage: nobody is fenced or moved for it (moving cannot help; fencing a
    /// host for a storage hiccup is what made CloudStack users turn its NFS heartbeat off);
    /// its VMs wait, and those it stopped restart as soon as it is back (placement skips
    /// hosts with a pool down). A pool down on *some* hosts only: the HA VMs running there
    /// are destroyed through their agent (which proves them stopped) and start elsewhere.
    pub(super) fn reconcile_storage(&mut self, cx: &mut Context<'_>) {
        let mut by_pool: BTreeMap<&str, (Vec<&str>, Vec<&str>)> = BTreeMap::new();
        for ((host, pool), st) in &self.pool_status {
            if !self.connected.contains(host) {
                continue;
            }
            let e = by_pool.entry(pool.as_str()).or_default();
            if st.ok {
                e.0.push(host.as_str());
            } else {
                e.1.push(host.as_str());
            }
        }
        // A pool that no connected host reports on (a new leader that hears no agent yet)
        // keeps what the log last recorded of it: nothing new is known.
        let mut outages: BTreeMap<String, String> = self
            .outages
            .iter()
            .filter(|(pool, _)| !by_pool.contains_key(pool.as_str()))
            .map(|(pool, scope)| (pool.clone(), scope.clone()))
            .collect();
        for (pool, (up, down)) in by_pool {
            if down.is_empty() {
                continue;
            }
            if up.is_empty() && !self.awaiting_reconnect.is_empty() {
                // Just elected, with agents still finding this leader: "down on every host
                // heard so far" is no pool-wide outage yet, the others may well reach it (a
                // one-host outage was reported pool-wide for 0.8 s after an election). A
                // pool-wide outage does nothing but wait, so waiting to judge costs nothing;
                // it is judged once they are back, or the first lease after the election ends.
                // What the log last recorded stays recorded meanwhile.
                if let Some(scope) = self.outages.get(pool) {
                    outages.insert(pool.to_string(), scope.clone());
                }
                continue;
            }
            let scope = outage_scope(up.is_empty(), &down);
            let message = if up.is_empty() {
                format!(
                        "storage pool {pool} is down on every host that mounts it ({}): a pool-wide outage. No host is fenced for it; its HA VMs wait and restart when it is back",
                        down.join(", ")
                    )
            } else {
                format!(
                        "storage pool {pool} is down on {} only (up on {}): their HA VMs move to hosts that reach it if it stays down for {} s",
                        down.join(", "),
                        up.join(", "),
                        STORAGE_FAULT_GRACE_MS / 1000
                    )
            };
            if self.outages.get(pool) != Some(&scope) {
                record_event(
                    &mut cx.out,
                    cx.wall_ms,
                    Severity::Critical,
                    None,
                    EventKind::StorageOutage {
                        pool: pool.to_string(),
                        pool_wide: up.is_empty(),
                        hosts: down.iter().map(|h| h.to_string()).collect(),
                    },
                    message,
                );
            }
            let since = match self.scope_since.get(pool) {
                Some((s, t)) if *s == scope => *t,
                _ => cx.now_ms,
            };
            self.scope_since
                .insert(pool.to_string(), (scope.clone(), since));
            outages.insert(pool.to_string(), scope);
            if up.is_empty()
                || cx.now_ms.saturating_sub(since) < STORAGE_FAULT_GRACE_MS
                || self.adoption.is_some()
            {
                // (Nothing is stopped while a restored cluster adopts the agents' generations.)
                continue;
            }
            let lasting: Vec<&str> = down
                .iter()
                .copied()
                .filter(|h| {
                    self.pool_down_since
                        .get(&(h.to_string(), pool.to_string()))
                        .is_some_and(|t| cx.now_ms.saturating_sub(*t) >= STORAGE_FAULT_GRACE_MS)
                })
                .collect();
            for vm in cx.state.vms.values() {
                // Only VMs with a disk on the failed pool: the others' storage is fine.
                if vm.ha
                    && vm.phase == Phase::Running
                    && lasting.contains(&vm.host.as_str())
                    && !self.expected_stops.contains_key(&vm.uuid)
                    && self.uses_pool(&vm.host, &vm.uuid, pool)
                    && !self.destroy_retry_at.contains_key(&vm.uuid)
                {
                    self.expected_stops
                        .insert(vm.uuid.clone(), forced_stop(FailureKind::StorageLost));
                    self.forced_stop_at.insert(vm.uuid.clone(), cx.wall_ms);
                    cx.out.push(Action::Send {
                        host: vm.host.clone(),
                        command: AgentCommand::DestroyDomain {
                            uuid: vm.uuid.clone(),
                        },
                    });
                }
            }
        }
        self.scope_since.retain(|p, _| outages.contains_key(p));
        self.outages = outages;
    }

    /// Whether `uuid`'s disks on `host` are on `pool`, as its agent reported; a domain whose
    /// agent could not tell (or not yet listed) counts as on every pool.
    pub(super) fn uses_pool(&self, host: &str, uuid: &str, pool: &str) -> bool {
        self.inventory
            .get(host)
            .and_then(|inv| inv.domains.get(uuid))
            .and_then(|d| d.pools.as_ref())
            .is_none_or(|pools| pools.iter().any(|p| p == pool))
    }

    /// Each storage pool's state as the host last reported it.
    pub fn pools_of(&self, host: &str) -> Vec<PoolStatus> {
        self.pool_status
            .iter()
            .filter(|((h, _), _)| h == host)
            .map(|(_, p)| p.clone())
            .collect()
    }
}

/// What makes two reports of a pool's outage the same outage: pool-wide or not, and the hosts
/// it is down on (sorted). One event per scope, whichever monitor leads when it is judged.
pub(super) fn outage_scope<S: AsRef<str>>(pool_wide: bool, down: &[S]) -> String {
    let hosts: Vec<&str> = down.iter().map(|h| h.as_ref()).collect();
    if pool_wide {
        format!("pool-wide:{}", hosts.join(","))
    } else {
        format!("hosts:{}", hosts.join(","))
    }
}
