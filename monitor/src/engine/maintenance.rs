//! Maintenance: draining a host an operator put in maintenance.

use super::*;

impl Engine {
    pub(super) fn mirror_maintenance(&mut self, state: &ClusterState) {
        self.maintenance = state
            .hosts
            .iter()
            .filter(|(_, h)| h.maintenance)
            .map(|(n, _)| n.clone())
            .collect();
        self.not_active = state
            .hosts
            .iter()
            .filter(|(_, h)| h.phase != HostPhase::Active)
            .map(|(n, _)| n.clone())
            .collect();
        self.rejoining.retain(|h| self.not_active.contains(h));
        self.views = None;
    }

    /// Drains hosts in maintenance: each HA VM running there is destroyed through its agent
    /// (which proves it stopped) and started on another host. A cold move: live migration is
    /// not built yet (docs/architecture.md).
    pub(super) fn reconcile_maintenance(&mut self, cx: &mut Context<'_>) {
        // Nothing is stopped while a restored cluster adopts the agents' generations.
        if self.maintenance.is_empty() || self.adoption.is_some() {
            return;
        }
        for vm in cx.state.vms.values() {
            if !(vm.ha && vm.phase == Phase::Running && self.maintenance.contains(&vm.host)) {
                continue;
            }
            if self.expected_stops.contains_key(&vm.uuid)
                || self.destroy_retry_at.contains_key(&vm.uuid)
                || !self.connected.contains(&vm.host)
            {
                continue;
            }
            // Only when it has somewhere to go: a drain must not leave a VM down.
            let need = need_of(vm);
            let views = self.views(cx.state);
            if placement::relocation_target(&cx.state.hosts, views, &vm.host, &need).is_none() {
                continue;
            }
            self.expected_stops
                .insert(vm.uuid.clone(), forced_stop(FailureKind::Maintenance));
            self.forced_stop_at.insert(vm.uuid.clone(), cx.wall_ms);
            record_event(&mut cx.out, cx.wall_ms, Severity::Info, Some(vm.host.clone()), EventKind::VmDraining, format!(
                    "moving VM {} off {} (maintenance): stopping it there, then starting it elsewhere",
                    vm.name, vm.host
                ));
            cx.out.push(Action::Send {
                host: vm.host.clone(),
                command: AgentCommand::DestroyDomain {
                    uuid: vm.uuid.clone(),
                },
            });
        }
    }
}
