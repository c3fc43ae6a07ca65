//! Host views for placement, reserved as VMs are placed within one input, and the warnings
//! placement raises (no tagged host).

use super::*;

impl Engine {
    /// Host views for placement, built once per input (`views` is reset by `handle`), so
    /// that reservations made while placing several VMs are seen by the next one.
    pub(super) fn views(&mut self, state: &ClusterState) -> &mut BTreeMap<String, HostView> {
        if self.views.is_none() {
            self.views = Some(self.host_views(state));
        }
        self.views.get_or_insert_with(BTreeMap::new)
    }

    /// What each host can take now: its reported free memory and vCPUs, minus the starts
    /// ordered there that its agent does not report running yet (their memory is not in its
    /// facts yet), and the anti-affinity groups running or starting there.
    pub(super) fn host_views(&self, state: &ClusterState) -> BTreeMap<String, HostView> {
        let mut views: BTreeMap<String, HostView> = state
            .hosts
            .keys()
            .map(|h| {
                let facts = self.facts.get(h);
                let running_vcpus: u64 = self
                    .inventory
                    .get(h)
                    .map(|inv| {
                        inv.domains
                            .values()
                            .filter(|d| !d.is_shut_off())
                            .map(|d| u64::from(d.vcpus))
                            .sum()
                    })
                    .unwrap_or(0);
                let cpus = facts.map(|f| u64::from(f.cpus)).unwrap_or(0);
                let vcpus_available = if self.policy.vcpu_overcommit == 0 || cpus == 0 {
                    u64::MAX
                } else {
                    (cpus * u64::from(self.policy.vcpu_overcommit)).saturating_sub(running_vcpus)
                };
                let unusable_why = self.unusable_why(h);
                (
                    h.clone(),
                    HostView {
                        usable: unusable_why.is_none(),
                        unusable_why,
                        memory_available_bytes: facts
                            .map(|f| f.memory_available_bytes)
                            .unwrap_or(0),
                        vcpus_available,
                        groups: Default::default(),
                    },
                )
            })
            .collect();
        for vm in state.vms.values() {
            match &vm.phase {
                Phase::Running => {
                    if let (Some(v), Some(g)) = (views.get_mut(&vm.host), &vm.anti_affinity) {
                        v.groups.insert(g.clone());
                    }
                }
                Phase::Recovering { host, .. } => {
                    let started = self
                        .inventory
                        .get(host)
                        .and_then(|inv| inv.domains.get(&vm.uuid))
                        .is_some_and(|d| !d.is_shut_off());
                    if let Some(v) = views.get_mut(host) {
                        if started {
                            if let Some(g) = &vm.anti_affinity {
                                v.groups.insert(g.clone());
                            }
                        } else {
                            v.reserve(&need_of(vm));
                        }
                    }
                }
                _ => {}
            }
        }
        views
    }

    /// Records a start placed on `target`: reserves its capacity for the rest of this pass,
    /// and says so when anti-affinity could not be honoured.
    pub(super) fn place(&mut self, vm: &VmRecord, target: &str, need: &Need, cx: &mut Context<'_>) {
        let views = self.views(cx.state);
        let shared = need.group.is_some() && placement::shares_group(views, target, need);
        if let Some(v) = views.get_mut(target) {
            v.reserve(need);
        }
        if shared {
            record_event(&mut cx.out, cx.wall_ms, Severity::Warning, Some(target.to_string()), EventKind::AntiAffinityBroken, format!(
                    "VM {} starts on {target} next to another member of anti-affinity group {}: no other host with room",
                    vm.name,
                    need.group.unwrap_or_default()
                ));
        }
    }

    pub(super) fn warn_tag(
        &mut self,
        vm: &VmRecord,
        warning: Option<String>,
        wall_ms: u64,
        out: &mut Vec<Action>,
    ) {
        match warning {
            Some(w) if self.recovery.tag_warned.insert(vm.uuid.clone()) => {
                record_event(
                    out,
                    wall_ms,
                    Severity::Critical,
                    None,
                    EventKind::NoTaggedHost,
                    format!("VM {}: {w}", vm.name),
                );
            }
            Some(_) => {}
            None => {
                self.recovery.tag_warned.remove(&vm.uuid);
            }
        }
    }

    /// Whether `host` can take a VM now: connected, up, a healthy hypervisor, and every
    /// storage pool it mounts up there (nothing is placed on a pool that is down).
    pub(super) fn host_usable(&self, host: &str) -> bool {
        self.unusable_why(host).is_none()
    }

    /// Why placement cannot use `host` now (`None`: it can). One function for the check and
    /// for the words the event log uses about it.
    pub(super) fn unusable_why(&self, host: &str) -> Option<String> {
        if self.maintenance.contains(host) {
            return Some("is in maintenance".into());
        }
        if self.not_active.contains(host) {
            return Some("is being fenced or was fenced".into());
        }
        if let Some(((_, pool), _)) = self
            .pool_status
            .range((host.to_string(), String::new())..)
            .take_while(|((h, _), _)| h == host)
            .find(|(_, p)| !p.ok)
        {
            return Some(format!("has storage pool {pool} down"));
        }
        if !self.connected.contains(host) {
            return Some("has no agent connected".into());
        }
        match self.detector.state(host) {
            Some(Liveness::Up) => {}
            other => {
                return Some(format!(
                    "is not up ({})",
                    other.map_or("unknown".to_string(), |l| format!("{l:?}").to_lowercase())
                ))
            }
        }
        if self
            .inventory
            .get(host)
            .is_some_and(|i| i.health != HypervisorHealth::Healthy)
        {
            return Some("has an unhealthy hypervisor".into());
        }
        None
    }
}

/// Where a VM of the failed host `from` goes: the real placement (zone, ha_tag and its
/// fallback, capacity, anti-affinity), the chosen host reserved in `views` so that the next VM
/// placed in this pass sees it taken; `Err`: why no host can take it. The second value is the
/// ha_tag warning, for the caller to record. Shared by a real host failure
/// ([`Engine::fail_vms_of_fenced_host`]) and `vigilctl plan` ([`Engine::plan_failures`]), so
/// a plan is the same code as the failure it predicts.
pub(super) fn failover_choice(
    policy: &RecoveryConfig,
    hosts: &BTreeMap<String, HostRecord>,
    views: &mut BTreeMap<String, HostView>,
    from: &str,
    need: &Need,
) -> (Result<Choice, String>, Option<String>) {
    let tag = policy.ha_tag.as_deref();
    let (target, warning) =
        placement::failover_target(hosts, views, from, need, tag, policy.ha_tag_fallback);
    let target = match target {
        Some(choice) => {
            if let Some(v) = views.get_mut(&choice.host) {
                v.reserve(need);
            }
            Ok(choice)
        }
        None => Err(placement::no_room(
            hosts,
            views,
            from,
            need,
            tag.filter(|_| policy.ha_tag_fallback == TagFallback::Wait),
        )),
    };
    (target, warning)
}
