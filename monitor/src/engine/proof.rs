//! Proof 1 (its own agent saw the VM stop) and every `VmFailed` the engine proposes: the one
//! place where a VM is declared failed and its next step decided.

use super::*;

/// A destroy ordered so that a VM starts elsewhere (storage fault, maintenance) is expected
/// to show as a stop for at most this long (wall ms; above the edge's command timeout): a
/// destroy that never completes (QEMU stuck in uninterruptible I/O) must not leave the
/// expectation behind to misread a later operator stop as a failure.
pub const EXPECTED_STOP_TTL_MS: u64 = 120_000;

impl Engine {
    /// Proof 2–4 taken (the host is fenced): every HA VM that ran there fails with that proof
    /// and is placed elsewhere, each one reserved before the next is placed.
    pub(super) fn fail_vms_of_fenced_host(
        &mut self,
        name: &str,
        proof: &HostProof,
        cx: &mut Context<'_>,
    ) {
        let vms: Vec<&VmRecord> = cx
            .state
            .vms
            .values()
            .filter(|v| v.ha && v.host == name)
            .filter(|v| matches!(v.phase, Phase::Running | Phase::Recovering { .. }))
            .collect();
        for vm in vms {
            if self.recovery.proposed_failure.get(&vm.uuid) == Some(&vm.generation) {
                continue;
            }
            let need = need_of(vm);
            let policy = self.policy.clone();
            let (target, warning) = match self.placement_waits() {
                Some(why) => (Err(why), None),
                None => {
                    failover_choice(&policy, &cx.state.hosts, self.views(cx.state), name, &need)
                }
            };
            self.warn_tag(vm, warning, cx.wall_ms, &mut cx.out);
            let decision = recovery::decide_host_failure(vm, cx.wall_ms, &self.policy, target);
            self.recovery
                .proposed_failure
                .insert(vm.uuid.clone(), vm.generation);
            cx.out.push(Action::Propose(StateCommand::VmFailed {
                at_ms: cx.wall_ms,
                uuid: vm.uuid.clone(),
                generation: vm.generation,
                failure: FailureKind::HostFailed,
                proof: Proof::HostFenced {
                    host: name.to_string(),
                    how: proof.clone(),
                },
                decision,
                window_ms: self.policy.window_ms,
            }));
        }
    }

    /// A failure with proof: ask the policy what to do and propose it.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn vm_failed(
        &mut self,
        vm: &VmRecord,
        host: &str,
        failure: FailureKind,
        proof: Proof,
        cx: &mut Context<'_>,
    ) {
        if self.recovery.proposed_failure.get(&vm.uuid) == Some(&vm.generation) {
            return;
        }
        let need = need_of(vm);
        let views = self.views(cx.state).clone();
        // Relocating starts a copy elsewhere: only when this host's own inventory shows the
        // domain shut off (a refused start, say because it still runs, is no such proof).
        let gone_here = self.shut_off_on(host, &vm.uuid);
        let decision = if matches!(failure, FailureKind::StorageLost | FailureKind::Maintenance) {
            // Its host lost the VM's storage, or is being drained: not back there.
            let target = placement::relocation_target(&cx.state.hosts, &views, host, &need)
                .ok_or_else(|| placement::no_room(&cx.state.hosts, &views, host, &need, None));
            recovery::decide_host_failure(vm, cx.wall_ms, &self.policy, target)
        } else {
            recovery::decide(vm, host, cx.wall_ms, &self.policy, || {
                if !gone_here {
                    return None;
                }
                placement::relocation_target(&cx.state.hosts, &views, host, &need)
            })
        };
        self.recovery
            .proposed_failure
            .insert(vm.uuid.clone(), vm.generation);
        self.expected_stops.remove(&vm.uuid);
        cx.out.push(Action::Propose(StateCommand::VmFailed {
            at_ms: cx.wall_ms,
            uuid: vm.uuid.clone(),
            generation: vm.generation,
            failure,
            proof,
            decision,
            window_ms: self.policy.window_ms,
        }));
    }

    /// Whether `host`'s latest inventory, from a healthy hypervisor, shows `uuid` shut off
    /// or not defined at all.
    pub(super) fn shut_off_on(&self, host: &str, uuid: &str) -> bool {
        self.inventory.get(host).is_some_and(|inv| {
            inv.health == HypervisorHealth::Healthy
                && inv.domains.get(uuid).is_none_or(DomainInfo::is_shut_off)
                // Not if it was seen running there after the listing was taken.
                && self
                    .seen_running
                    .get(&(host.to_string(), uuid.to_string()))
                    .is_none_or(|s| *s <= inv.seq)
        })
    }

    /// Forgets forced stops that were consumed, and those whose destroy never showed within
    /// [`EXPECTED_STOP_TTL_MS`].
    pub(super) fn expire_forced_stops(&mut self, wall_ms: u64) {
        let expected = &mut self.expected_stops;
        self.forced_stop_at.retain(|uuid, at| {
            let keep =
                expected.contains_key(uuid) && wall_ms.saturating_sub(*at) < EXPECTED_STOP_TTL_MS;
            if !keep {
                expected.remove(uuid);
            }
            keep
        });
        self.destroy_retry_at.retain(|_, t| wall_ms < *t);
    }
}

/// The expected stop of a VM the monitor destroys through its agent so that it starts
/// elsewhere.
pub(super) fn forced_stop(kind: FailureKind) -> (FailureKind, String) {
    (kind, format!("destroyed on the monitor's order ({kind})"))
}
