//! What agents report about their domains: listings, lifecycle events, command answers, stale
//! copies destroyed, self-fence reports. Each observation is ordered per (host, VM): an older
//! one never overrides a newer one.

use super::*;

/// Wait this long before ordering a destroy again after the agent said it failed.
pub const DESTROY_RETRY_MS: u64 = 10_000;

#[derive(Debug, Clone, Default)]
pub(super) struct HostInventory {
    pub(super) domains: BTreeMap<String, DomainInfo>,
    pub(super) health: HypervisorHealth,
    /// The listing's observation sequence number.
    pub(super) seq: u64,
}

impl Engine {
    /// A host's agent fenced itself: one event per episode, its HA domains failed.
    pub(super) fn on_self_fenced(&mut self, report: SelfFenceReport, cx: &mut Context<'_>) {
        let SelfFenceReport {
            host,
            id,
            reason,
            destroyed,
        } = report;
        // Resent until noted (also to a new leader, which finds the episode in the log):
        // one event per episode.
        let on_record = cx.state.events.iter().any(|e| {
            e.host.as_deref() == Some(host.as_str())
                && e.kind == EventKind::HostSelfFenced { episode: Some(id) }
        });
        let noted = self.self_fence_noted.entry(host.clone()).or_default();
        let first = noted.insert(id) && !on_record;
        if noted.len() > 64 {
            if let Some(oldest) = noted.iter().next().copied() {
                noted.remove(&oldest);
            }
        }
        cx.out.push(Action::Notify {
            host: Some(host.clone()),
            message: MonitorToAgent::SelfFenceNoted { id },
        });
        for uuid in &destroyed {
            self.expected_stops.insert(
                uuid.clone(),
                (
                    FailureKind::Crashed,
                    "destroyed by its own agent when it fenced itself".into(),
                ),
            );
        }
        if first {
            record_event(
                &mut cx.out,
                cx.wall_ms,
                Severity::Critical,
                Some(host.clone()),
                EventKind::HostSelfFenced { episode: Some(id) },
                format!(
                    "host {host} fenced itself ({} HA domain(s) destroyed): {reason}",
                    destroyed.len()
                ),
            );
        }
        // Stops that its agent reported before this message are failures too.
        for uuid in destroyed {
            if let Some(vm) = cx.state.vms.get(&uuid) {
                if vm.ha
                    && vm.host == host
                    && vm.phase == Phase::Running
                    && self.shut_off_on(&host, &uuid)
                {
                    let proof = Proof::AgentReportedStopped {
                        host: host.clone(),
                        detail: format!("its agent destroyed it when fencing itself: {reason}"),
                        observed_at_ms: None,
                    };
                    self.vm_failed(vm, &host, FailureKind::Crashed, proof, cx);
                }
            }
        }
    }

    /// A lifecycle event, unless something newer was already seen of this VM on this host.
    pub(super) fn on_lifecycle(&mut self, report: LifecycleReport, cx: &mut Context<'_>) {
        let LifecycleReport {
            host,
            event,
            generation,
            seq,
        } = report;
        // An event older than what was already seen of this VM here is history.
        if self.observe(&host, &event.uuid, seq) {
            if matches!(event.kind, LifecycleKind::Started | LifecycleKind::Resumed) {
                self.seen_running
                    .insert((host.clone(), event.uuid.clone()), seq);
            }
            self.on_domain_event(&host, &event, generation, cx);
        }
    }

    /// An agent destroyed a stale copy (older generation) of a VM.
    pub(super) fn on_stale_destroyed(&mut self, report: StaleCopyDestroyed, cx: &mut Context<'_>) {
        let StaleCopyDestroyed {
            host,
            uuid,
            found,
            newest,
        } = report;
        cx.out.push(Action::Propose(StateCommand::StaleDestroyed {
            at_ms: cx.wall_ms,
            uuid,
            host,
            found,
            newest,
        }));
    }

    /// An answer to a command; an answer about a domain is also an observation of it.
    pub(super) fn on_command_answer(&mut self, answer: CommandAnswer, cx: &mut Context<'_>) {
        let CommandAnswer {
            host,
            command,
            result,
            seq,
        } = answer;
        // An answer about a domain is an observation of it (a start's "running").
        if let (
            Some(seq),
            AgentCommand::StartDomain { uuid, .. } | AgentCommand::DestroyDomain { uuid },
        ) = (seq, &command)
        {
            self.observe(&host, uuid, seq);
            let started = matches!(command, AgentCommand::StartDomain { .. })
                && matches!(result, Ok(CommandOutcome::Done { .. }));
            if started {
                self.seen_running.insert((host.clone(), uuid.clone()), seq);
            }
        }
        self.on_command_done(&host, command, result, cx);
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn on_inventory(&mut self, listing: Listing, cx: &mut Context<'_>) {
        let Listing {
            host,
            domains,
            health,
            seq,
        } = listing;
        let host = host.as_str();
        // A listing older than the one held (reports reach us by different paths) is history.
        if self.inventory.get(host).is_some_and(|inv| seq < inv.seq) {
            return;
        }
        self.adopt_listing(host, &domains, cx);
        for d in &domains {
            // Taken before something newer was seen of this VM here (an event, a start's
            // "running" answer): it must not override that. A listing taken while a start
            // was under way shows the domain defined and shut off; read after the answer,
            // it would look like a crash.
            if !self.observe(host, &d.uuid, seq) {
                continue;
            }
            let running = d.state == DomainState::Running || d.state == DomainState::Paused;
            match cx.state.vms.get(&d.uuid) {
                None => {
                    if d.meta.ha == Some(true) {
                        cx.out
                            .push(Action::Propose(vm_seen(cx.wall_ms, host, d, running)));
                    }
                }
                Some(vm) if !claims::owns(vm, host) => {
                    // Another host's VM (issue 10 item 2): a shut-off copy defined here is
                    // normal and says nothing; running, it is a move only when its own
                    // host lets it go (a live migration), else a conflict.
                    let silent = cx
                        .state
                        .restored
                        .as_ref()
                        .is_some_and(|r| r.silent.contains(host));
                    if running
                        && self.foreign_claim(host, vm, d, silent, cx.wall_ms, &mut cx.out)
                            == claims::Claim::Accept
                    {
                        cx.out
                            .push(Action::Propose(vm_seen(cx.wall_ms, host, d, running)));
                    }
                }
                Some(vm) => {
                    let differs = vm.name != d.name
                        || vm.vcpus != d.vcpus
                        || vm.memory_kib != d.memory_kib
                        || vm.disks != d.disks;
                    // A copy running with an older generation is stale (its agent destroys
                    // it): it neither resumes protection nor moves the VM.
                    let current = d.meta.generation.unwrap_or(0) >= vm.generation;
                    let resumed = running
                        && current
                        && matches!(vm.phase, Phase::Stopped { .. } | Phase::GaveUp { .. });
                    let moved = running && current && vm.phase == Phase::Running && vm.host != host;
                    if differs || resumed || moved {
                        cx.out
                            .push(Action::Propose(vm_seen(cx.wall_ms, host, d, running)));
                    }
                    // Backstop for a lost start answer: the target reports it running with
                    // the ordered generation.
                    if let Phase::Recovering { host: target, .. } = &vm.phase {
                        if target == host && running && d.meta.generation == Some(vm.generation) {
                            cx.out.push(Action::Propose(StateCommand::VmStarted {
                                at_ms: cx.wall_ms,
                                uuid: vm.uuid.clone(),
                                host: host.to_string(),
                                generation: vm.generation,
                            }));
                        }
                    }
                    // Backstop for a lost crash event: shut off as crashed, on its host,
                    // with the current generation.
                    // Only "shut off" proves qemu is gone; a crashed-but-preserved domain
                    // (state Crashed) still has its qemu.
                    // Also "shut off for an unknown reason": after a host restart libvirt no
                    // longer knows why; the domain is not running, reported by its own agent.
                    let crashed = d.is_shut_off()
                        && matches!(
                            d.reason,
                            StateReason::Crashed
                                | StateReason::Failed
                                | StateReason::Other
                                | StateReason::NeverStarted
                        );
                    // Backstop for a lost stop event: shut down by its guest or destroyed by
                    // an operator while nobody was listening. Respected, as the event would be.
                    let stopped_on_purpose = d.is_shut_off()
                        && matches!(
                            d.reason,
                            StateReason::GuestShutdown | StateReason::Destroyed
                        );
                    let expected = self.expected_stops.get(&d.uuid).cloned();
                    if stopped_on_purpose
                        && expected.is_none()
                        && vm.phase == Phase::Running
                        && vm.host == host
                        && d.meta.generation.unwrap_or(0) == vm.generation
                    {
                        cx.out.push(Action::Propose(StateCommand::VmStopped {
                            at_ms: cx.wall_ms,
                            uuid: vm.uuid.clone(),
                            host: host.to_string(),
                            reason: if d.reason == StateReason::GuestShutdown {
                                StopReason::GuestShutdown
                            } else {
                                StopReason::OperatorDestroy
                            },
                        }));
                    }
                    let current = vm.ha
                        && vm.phase == Phase::Running
                        && vm.host == host
                        && d.meta.generation.unwrap_or(0) == vm.generation;
                    if let (true, true, Some((kind, why))) = (stopped_on_purpose, current, expected)
                    {
                        let proof = Proof::AgentReportedStopped {
                            host: host.to_string(),
                            detail: format!("inventory: {why}"),
                            observed_at_ms: None,
                        };
                        self.vm_failed(vm, host, kind, proof, cx);
                    } else if crashed
                        && vm.ha
                        && vm.phase == Phase::Running
                        && vm.host == host
                        && d.meta.generation.unwrap_or(0) == vm.generation
                    {
                        let proof = Proof::AgentReportedStopped {
                            host: host.to_string(),
                            detail: format!("inventory: shut off ({:?})", d.reason).to_lowercase(),
                            observed_at_ms: None,
                        };
                        self.vm_failed(vm, host, FailureKind::Crashed, proof, cx);
                    }
                }
            }
        }
        self.claims_listed(host, &domains);
        self.inventory.insert(
            host.to_string(),
            HostInventory {
                domains: domains.into_iter().map(|d| (d.uuid.clone(), d)).collect(),
                health,
                seq,
            },
        );
    }

    /// Records an observation of `uuid` on `host` numbered `seq` by its agent. `false`: a
    /// newer one was already seen, so this one must not override it.
    pub(super) fn observe(&mut self, host: &str, uuid: &str, seq: u64) -> bool {
        let newest = self
            .observed
            .entry((host.to_string(), uuid.to_string()))
            .or_insert(0);
        if seq < *newest {
            return false;
        }
        *newest = seq;
        true
    }

    pub(super) fn on_domain_event(
        &mut self,
        host: &str,
        event: &DomainEvent,
        generation: Option<u64>,
        cx: &mut Context<'_>,
    ) {
        let Some(vm) = cx.state.vms.get(&event.uuid) else {
            return;
        };
        if generation.is_some_and(|g| g > vm.generation) && self.adoption.is_some() {
            // Newer than the restored backup: adopted from the host's listing, not a conflict.
            return;
        }
        if !claims::owns(vm, host)
            && matches!(event.kind, LifecycleKind::Started | LifecycleKind::Resumed)
            && generation.is_some_and(|g| g > vm.generation)
        {
            // No activation has a generation above the committed one (issue 10 item 2).
            self.conflict(
                host,
                vm,
                "reports the start of",
                &format!(
                    "with generation {}, above the committed {}",
                    generation.unwrap_or(0),
                    vm.generation
                ),
                cx.wall_ms,
                &mut cx.out,
            );
            return;
        }
        if !vm.ha || vm.host != host || vm.phase != Phase::Running {
            return;
        }
        if generation.is_some_and(|g| g != vm.generation) {
            // An event about another activation (older, or a stale copy): not this one.
            return;
        }
        match event.kind {
            LifecycleKind::Crashed if event.proves_stopped() => {
                let proof = Proof::AgentReportedStopped {
                    host: host.to_string(),
                    detail: format!(
                        "libvirt lifecycle event {}/{}",
                        event.raw_event, event.raw_detail
                    ),
                    observed_at_ms: Some(event.at_ms),
                };
                self.vm_failed(vm, host, FailureKind::Crashed, proof, cx);
            }
            LifecycleKind::Destroyed
                if event.proves_stopped() && self.expected_stops.contains_key(&event.uuid) =>
            {
                let (kind, why) = self
                    .expected_stops
                    .get(&event.uuid)
                    .cloned()
                    .unwrap_or((FailureKind::Crashed, String::new()));
                let proof = Proof::AgentReportedStopped {
                    host: host.to_string(),
                    detail: why,
                    observed_at_ms: Some(event.at_ms),
                };
                self.vm_failed(vm, host, kind, proof, cx);
            }
            LifecycleKind::GuestShutdown | LifecycleKind::Destroyed if event.proves_stopped() => {
                let reason = if event.kind == LifecycleKind::GuestShutdown {
                    StopReason::GuestShutdown
                } else {
                    StopReason::OperatorDestroy
                };
                cx.out.push(Action::Propose(StateCommand::VmStopped {
                    at_ms: cx.wall_ms,
                    uuid: vm.uuid.clone(),
                    host: host.to_string(),
                    reason,
                }));
            }
            _ => {}
        }
    }

    pub(super) fn on_command_done(
        &mut self,
        host: &str,
        command: AgentCommand,
        result: Result<CommandOutcome, CommandError>,
        cx: &mut Context<'_>,
    ) {
        if let AgentCommand::ProbeHost { host: target, .. } = &command {
            let reachable = matches!(&result, Ok(CommandOutcome::Done { detail }) if detail.starts_with("reachable"));
            self.evidence.probe_answer(target, host, reachable);
            return;
        }
        if let AgentCommand::DestroyDomain { uuid } = &command {
            // The agent could not destroy it (QEMU stuck in I/O, say): no stop is coming, so
            // none is expected any more; a later stop is read for what it is. Tried again
            // after a while. (No answer at all leaves the expectation, bounded in time.)
            if let Ok(CommandOutcome::Failed { reason }) = &result {
                if self.forced_stop_at.remove(uuid).is_some() {
                    self.expected_stops.remove(uuid);
                    self.destroy_retry_at
                        .insert(uuid.clone(), cx.wall_ms + DESTROY_RETRY_MS);
                    let name = cx
                        .state
                        .vms
                        .get(uuid)
                        .map_or(uuid.as_str(), |v| v.name.as_str());
                    record_event(&mut cx.out, cx.wall_ms, Severity::Critical, Some(host.to_string()), EventKind::VmStopFailed, format!(
                            "could not stop VM {name} on {host} to move it: {reason}; it stays there for now (tried again in {} s)",
                            DESTROY_RETRY_MS / 1000
                        ));
                }
            }
            return;
        }
        let AgentCommand::StartDomain {
            uuid, generation, ..
        } = command
        else {
            return;
        };
        let Some(vm) = cx.state.vms.get(&uuid) else {
            return;
        };
        let current = matches!(&vm.phase, Phase::Recovering { host: t, .. } if t == host)
            && vm.generation == generation;
        match result {
            Ok(CommandOutcome::Done { .. }) if current => {
                cx.out.push(Action::Propose(StateCommand::VmStarted {
                    at_ms: cx.wall_ms,
                    uuid,
                    host: host.to_string(),
                    generation,
                }));
            }
            Ok(CommandOutcome::Failed { reason }) if current => {
                let proof = Proof::StartRefused {
                    host: host.to_string(),
                    detail: reason,
                };
                self.vm_failed(vm, host, FailureKind::StartFailed, proof, cx);
            }
            // No answer: the start may or may not have happened, so this is no proof of
            // anything. Send the same order (same generation: idempotent) again later.
            Err(_) if self.recovery.dispatched.get(&uuid) == Some(&generation) => {
                self.recovery.dispatched.remove(&uuid);
            }
            _ => {}
        }
    }
}
