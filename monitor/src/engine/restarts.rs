//! VM recovery from committed state: due restarts placed and ordered, start orders dispatched
//! once per generation, generations announced before any start of them.

use super::*;

/// What this leader proposed, sent and announced for VM recovery: reset with `Default` when a
/// monitor becomes leader, which then re-derives every order from committed state (activation
/// generations make a repeated order harmless).
#[derive(Debug, Clone, Default)]
pub(super) struct RecoveryBook {
    /// Starts proposed (uuid → generation) and not yet seen committed.
    pub(super) proposed_start: BTreeMap<String, u64>,
    /// Failures proposed (uuid → generation) and not yet seen committed.
    pub(super) proposed_failure: BTreeMap<String, u64>,
    /// Start orders sent by this leader (uuid → generation).
    pub(super) dispatched: BTreeMap<String, u64>,
    /// Generations announced to agents (uuid → generation).
    pub(super) announced: BTreeMap<String, u64>,
    /// VMs already told about a missing ha_tag host, to say so once per episode.
    pub(super) tag_warned: BTreeSet<String>,
    /// VMs already reported as lacking a stored definition.
    pub(super) def_warned: BTreeSet<String>,
}

impl Engine {
    /// Work derived from committed state: due restarts, start orders to send, generations to
    /// announce.
    pub(super) fn reconcile(&mut self, cx: &mut Context<'_>) {
        let mut changed_generations = Vec::new();
        // Highest priority first.
        let mut order: Vec<&VmRecord> = cx
            .state
            .vms
            .values()
            .filter(|v| {
                !matches!(
                    v.phase,
                    Phase::Running | Phase::Stopped { .. } | Phase::GaveUp { .. }
                )
            })
            .collect();
        order.sort_by_key(|v| std::cmp::Reverse(v.priority));
        if self.adoption.is_some() || leadership::restore_silent_holds(cx.state) {
            // A restored cluster orders nothing before it knows the agents' generations,
            // nor while a host it never heard may run a copy it does not know of.
            order.clear();
        }
        for vm in order {
            match &vm.phase {
                Phase::Backoff {
                    host,
                    not_before_ms,
                    relocate,
                } => {
                    let next = vm.generation + 1;
                    let old_fenced = cx
                        .state
                        .hosts
                        .get(&vm.host)
                        .is_some_and(|h| matches!(h.phase, HostPhase::Fenced { .. }));
                    // Re-check at order time: the old copy must still be shut off, or its
                    // host proven powered off.
                    let safe = !*relocate || old_fenced || self.shut_off_on(&vm.host, &vm.uuid);
                    // A relocation whose target is gone (or that had none) is placed again;
                    // so is a restart in place whose host has since been fenced.
                    let target_fenced = cx
                        .state
                        .hosts
                        .get(host)
                        .is_some_and(|h| matches!(h.phase, HostPhase::Fenced { .. }));
                    let relocate = &(*relocate || target_fenced || self.maintenance.contains(host));
                    let need = need_of(vm);
                    // Where it starts, and (when placement runs again here) why there.
                    // Placed again when its planned host cannot take it; not at all while a
                    // new leader still waits for agents to reconnect (`placement_waits`).
                    let place_again = *relocate && !self.host_usable(host);
                    let target: Option<(String, String)> = if place_again
                        && self.placement_waits().is_some()
                    {
                        None
                    } else if place_again {
                        let (tag, fallback) =
                            (self.policy.ha_tag.clone(), self.policy.ha_tag_fallback);
                        let views = self.views(cx.state);
                        let (t, warning) = placement::failover_target(
                            &cx.state.hosts,
                            views,
                            &vm.host,
                            &need,
                            tag.as_deref(),
                            fallback,
                        );
                        self.warn_tag(vm, warning, cx.wall_ms, &mut cx.out);
                        // Nowhere else, but its own host is back (rejoined after fencing, or
                        // storage healed): it may start there again; the proof check below
                        // still applies.
                        match t {
                            Some(c) => Some((c.host, c.why)),
                            None => {
                                let home_ok = cx
                                    .state
                                    .hosts
                                    .get(&vm.host)
                                    .is_some_and(|h| h.phase == HostPhase::Active);
                                (home_ok && self.host_usable(&vm.host)).then(|| {
                                    let views = self.views(cx.state);
                                    let why = placement::no_room(&cx.state.hosts, views, &vm.host, &need, tag.as_deref().filter(|_| fallback == TagFallback::Wait));
                                    (vm.host.clone(), format!("back on its own host, the only one that can take it ({why})"))
                                })
                            }
                        }
                    } else {
                        Some((host.clone(), String::new()))
                    };
                    // Another host can only start it from the stored definition.
                    let target = match target {
                        Some((t, _)) if t != vm.host && vm.definition.is_none() => {
                            if self.recovery.def_warned.insert(vm.uuid.clone()) {
                                record_event(&mut cx.out, cx.wall_ms, Severity::Critical, Some(vm.host.clone()), EventKind::NoDefinition, format!(
                                        "cannot start VM {} on {t}: its definition never reached the monitor (its agent ships it within a poll of HA being enabled); queued",
                                        vm.name
                                    ));
                            }
                            None
                        }
                        other => other,
                    };
                    if let Some((target, why)) = target {
                        if cx.wall_ms >= *not_before_ms
                            && safe
                            && self.host_usable(&target)
                            && self.recovery.proposed_start.get(&vm.uuid) != Some(&next)
                        {
                            self.recovery.proposed_start.insert(vm.uuid.clone(), next);
                            if !why.is_empty() {
                                // The failure's event named another host (or none): say why
                                // the start goes here instead, before it is ordered.
                                self.placed_again(
                                    vm,
                                    host,
                                    &target,
                                    &why,
                                    next,
                                    cx.wall_ms,
                                    &mut cx.out,
                                );
                            }
                            self.place(vm, &target, &need, cx);
                            cx.out.push(Action::Propose(StateCommand::OrderStart {
                                at_ms: cx.wall_ms,
                                uuid: vm.uuid.clone(),
                                host: target,
                                generation: next,
                            }));
                        }
                    }
                }
                Phase::Recovering { host, .. }
                    if self.recovery.dispatched.get(&vm.uuid) != Some(&vm.generation)
                        && self.connected.contains(host) =>
                {
                    self.recovery
                        .dispatched
                        .insert(vm.uuid.clone(), vm.generation);
                    cx.out.push(Action::Send {
                        host: host.clone(),
                        command: AgentCommand::StartDomain {
                            uuid: vm.uuid.clone(),
                            generation: vm.generation,
                            definition: vm.definition.clone(),
                        },
                    });
                }
                _ => {}
            }
        }
        for vm in cx.state.vms.values() {
            if vm.ha && self.recovery.announced.get(&vm.uuid) != Some(&vm.generation) {
                self.recovery
                    .announced
                    .insert(vm.uuid.clone(), vm.generation);
                changed_generations.push((vm.uuid.clone(), vm.generation));
            }
        }
        // Forget proposals that committed state has overtaken.
        self.recovery
            .proposed_start
            .retain(|u, g| cx.state.vms.get(u).is_some_and(|v| v.generation < *g));
        self.recovery.proposed_failure.retain(|u, g| {
            cx.state.vms.get(u).is_some_and(|v| {
                v.generation == *g && matches!(v.phase, Phase::Running | Phase::Recovering { .. })
            })
        });
        if !changed_generations.is_empty() {
            // Announced to every agent *before* any start of that generation is dispatched
            // (dispatch happens on a later pass), so a host holding an older copy learns it
            // is stale.
            cx.out.insert(
                0,
                Action::Notify {
                    host: None,
                    message: MonitorToAgent::Generations {
                        entries: changed_generations,
                        full: false,
                    },
                },
            );
        }
    }

    /// Says where a start goes when placement ran again after the failure's event: the host
    /// that event named (`planned`, empty when none could take it then) and why it no longer
    /// can, the host chosen now and why.
    #[allow(clippy::too_many_arguments)]
    fn placed_again(
        &self,
        vm: &VmRecord,
        planned: &str,
        target: &str,
        why: &str,
        generation: u64,
        wall_ms: u64,
        out: &mut Vec<Action>,
    ) {
        let instead = if planned.is_empty() {
            "no host could take it when it failed".to_string()
        } else {
            format!(
                "instead of {planned}, which {}",
                self.unusable_why(planned)
                    .unwrap_or_else(|| "is not its own host any more".into())
            )
        };
        record_event(
            out,
            wall_ms,
            Severity::Info,
            Some(target.to_string()),
            EventKind::VmPlaced {
                generation,
                target: target.to_string(),
            },
            format!(
                "VM {} (priority {}) placed on {target} ({instead}): {why}",
                vm.name, vm.priority
            ),
        );
    }
}

pub(super) fn vm_seen(wall_ms: u64, host: &str, d: &DomainInfo, running: bool) -> StateCommand {
    StateCommand::VmSeen {
        at_ms: wall_ms,
        uuid: d.uuid.clone(),
        name: d.name.clone(),
        host: host.to_string(),
        vcpus: d.vcpus,
        memory_kib: d.memory_kib,
        disks: d.disks.clone(),
        meta_ha: d.meta.ha,
        meta_priority: d.meta.priority,
        generation: d.meta.generation,
        running,
    }
}

/// The whole table of HA VMs and their generations.
pub fn generation_table(state: &ClusterState) -> MonitorToAgent {
    MonitorToAgent::Generations {
        entries: state
            .vms
            .values()
            .filter(|v| v.ha)
            .map(|v| (v.uuid.clone(), v.generation))
            .collect(),
        full: true,
    }
}

/// What a VM needs from a host it is placed on.
pub(super) fn need_of(vm: &VmRecord) -> Need<'_> {
    Need {
        memory_kib: vm.memory_kib,
        vcpus: vm.vcpus,
        group: vm.anti_affinity.as_deref(),
    }
}
