//! Which cluster settings the engine runs with (issue 12 item 9): its own file's until the
//! cluster has settings of its own, then the committed ones, followed on every input, so a
//! `vigilctl config set` takes effect on the leader as soon as it commits, and a new leader
//! starts with what its predecessor ran, not with what its own file says.

use vigil_common::settings::ClusterSettings;

use super::*;

impl Engine {
    /// Configures the engine from cluster settings (`file`: the cluster-wide sections of
    /// this monitor's file), which it also seeds a cluster with that has none yet (see
    /// [`Self::seed_settings`]). `storage_interval_ms`: how often agents read the leader
    /// record (this monitor's `storage.interval_ms`).
    pub fn with_settings(mut self, file: ClusterSettings, storage_interval_ms: u64) -> Self {
        self = self.with_leases(file.lease.clone(), storage_interval_ms);
        self.evidence = Evidence::new(file.detector.heartbeat_interval_ms, storage_interval_ms);
        self.run_with(&file, 0);
        self.file_settings = Some(file);
        self
    }

    /// Before each input: the committed settings, if they changed since the last input
    /// (their revision), are the ones used from now on.
    pub(super) fn follow_settings(&mut self, state: &ClusterState) {
        let revision = state.settings.as_ref().map_or(0, |r| r.revision);
        if revision == self.settings_revision {
            return;
        }
        self.settings_revision = revision;
        match &state.settings {
            Some(r) => {
                let settings = r.settings.clone();
                self.run_with(&settings, r.longest_fence_agent_ms);
            }
            // Only after a restore of an older backup: back to the file's.
            None => {
                if let Some(file) = self.file_settings.clone() {
                    self.run_with(&file, 0);
                }
            }
        }
    }

    /// Uses `s` for every decision from now on. `longest_fence_agent_ms`: the longest
    /// fence-agent limit the cluster ever had (a predecessor's agent may run that long).
    fn run_with(&mut self, s: &ClusterSettings, longest_fence_agent_ms: u64) {
        self.detector.set_thresholds(&s.detector);
        self.evidence
            .set_heartbeat_interval(s.detector.heartbeat_interval_ms);
        self.policy = s.recovery.clone();
        self.failover.fence_hosts = s.fencing.hosts.iter().map(|h| h.host.clone()).collect();
        self.failover.fence_agent_limit_ms = s.fence_agent_limit_ms().max(longest_fence_agent_ms);
        self.failover.mass_failure_percent = s.fencing.mass_failure_percent;
        self.failover.mass_failure_window_ms = s.fencing.mass_failure_window_ms;
        self.failover.storage_slot = s.fencing.storage_slot;
        // Only ever longer on a running cluster (`check_live_change`): leases granted at the
        // old length are counted at the new, longer one.
        self.leases.set_config(s.lease.clone());
    }

    /// A new leader of a cluster without settings seeds them from its file (the first such
    /// proposal to commit wins; later ones change nothing).
    pub(super) fn seed_settings(&self, node: u64, cx: &mut Context<'_>) {
        if cx.state.settings.is_some() {
            return;
        }
        if let Some(file) = &self.file_settings {
            cx.out.push(Action::Propose(StateCommand::SetSettings {
                at_ms: cx.wall_ms,
                by: format!("monitor {node}'s file"),
                base_revision: 0,
                settings: file.clone(),
            }));
        }
    }
}
