//! Failover capacity asked before a failure (`vigilctl plan --fail H[,H]`, and the N+k figure
//! of `vigilctl status`): the real placement and recovery policy run on today's state, as if
//! the named hosts had just been fenced, without changing anything.
//!
//! The same functions decide a real host failure ([`failover_choice`],
//! `recovery::decide_host_failure`), in the same order (failed hosts by name, each host's VMs
//! by uuid, every choice reserved before the next), so a plan names the hosts that a crash of
//! those hosts then uses — as long as the state does not change in between (a VM started, a
//! host gone) and the hosts are fenced in the same pass.

use super::*;

/// What would happen to one HA VM if its host failed now.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PlannedVm {
    pub uuid: String,
    pub name: String,
    /// The (failed) host it runs on.
    pub from: String,
    pub priority: i32,
    pub outcome: PlanOutcome,
    /// Placement's reasons for the target, or why it would wait or give up.
    pub why: String,
    /// The ha_tag could not be honoured (the event a real failure would record).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
}

/// The outcome for one VM.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case", tag = "outcome")]
pub enum PlanOutcome {
    /// It would start on `target`.
    Placed { target: String },
    /// It would be queued: no host can take it (see `why`).
    Waits,
    /// Its restart budget is spent: Vigil would give up on it.
    GivesUp,
}

/// A host named in a plan that the cluster does not know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown host {0:?}")]
pub struct UnknownHost(pub String);

/// How many host failures one cluster absorbs with every HA VM placed.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ClusterCapacity {
    pub cluster: String,
    /// Its active hosts.
    pub hosts: usize,
    /// N+k: the worst `k` failures (the hosts holding the most HA memory first) leave every
    /// HA VM of the cluster placed.
    pub tolerated: usize,
    /// `tolerated` is the most that was checked (the real figure may be higher).
    pub at_least: bool,
}

/// How often the leader recomputes N+k (it runs the placement once per cluster and failure
/// count checked); sooner after hosts or VMs come or go.
pub const CAPACITY_CHECK_MS: u64 = 30_000;

/// This leader's last N+k figures.
#[derive(Debug, Clone, Default)]
pub(super) struct CapacityBook {
    pub(super) clusters: Vec<ClusterCapacity>,
    /// When (monotonic ms) they were computed.
    pub(super) checked_ms: Option<u64>,
    /// Clusters already reported below the configured level.
    pub(super) low: BTreeSet<String>,
    /// (active hosts, VMs) when last computed: a change makes the next check due sooner.
    pub(super) basis: (usize, usize),
}

impl Engine {
    /// N+k per cluster as last computed by this leader.
    pub fn capacity(&self) -> &[ClusterCapacity] {
        &self.capacity.clusters
    }

    /// Recomputes N+k when due and says once when a cluster drops below
    /// `recovery.min_failures_tolerated` (and once when it is back).
    pub(super) fn check_capacity(&mut self, cx: &mut Context<'_>) {
        // Due every CAPACITY_CHECK_MS, and sooner (at most once a second) when hosts joined or
        // left the active set or VMs came or went, so `vigilctl status` is not stale for long
        // after a change.
        let basis = (
            cx.state
                .hosts
                .values()
                .filter(|h| h.phase == HostPhase::Active && !h.maintenance)
                .count(),
            cx.state.vms.len(),
        );
        let since = self
            .capacity
            .checked_ms
            .map(|t| cx.now_ms.saturating_sub(t));
        let due = match since {
            None => true,
            Some(ago) => ago >= CAPACITY_CHECK_MS || (ago >= 1_000 && basis != self.capacity.basis),
        };
        if !due {
            return;
        }
        self.capacity.checked_ms = Some(cx.now_ms);
        self.capacity.basis = basis;
        let level = self.policy.min_failures_tolerated as usize;
        self.capacity.clusters = self.failures_tolerated(cx.state, cx.wall_ms, level.max(2));
        if level == 0 {
            return;
        }
        for c in &self.capacity.clusters {
            let low = c.tolerated < level;
            let (sev, kind, message) = if low && self.capacity.low.insert(c.cluster.clone()) {
                (
                    Severity::Warning,
                    EventKind::CapacityLow {
                        cluster: c.cluster.clone(),
                        tolerated: c.tolerated,
                    },
                    format!(
                        "cluster {} can absorb only {} host failure(s) with all its HA VMs placed (recovery.min_failures_tolerated = {level}); `vigilctl plan --fail HOST` shows which VMs would wait and why",
                        c.cluster, c.tolerated
                    ),
                )
            } else if !low && self.capacity.low.remove(&c.cluster) {
                (
                    Severity::Info,
                    EventKind::CapacityRestored {
                        cluster: c.cluster.clone(),
                        tolerated: c.tolerated,
                    },
                    format!(
                        "cluster {} absorbs {}{} host failure(s) with all its HA VMs placed again",
                        c.cluster,
                        if c.at_least { "at least " } else { "" },
                        c.tolerated
                    ),
                )
            } else {
                continue;
            };
            record_event(&mut cx.out, cx.wall_ms, sev, None, kind, message);
        }
    }

    /// Where each HA VM of `failed` would go if those hosts were fenced now. Changes nothing:
    /// the engine's views are copied.
    pub fn plan_failures(
        &self,
        failed: &[String],
        state: &ClusterState,
        wall_ms: u64,
    ) -> Result<Vec<PlannedVm>, UnknownHost> {
        let mut failed: Vec<&String> = failed.iter().collect();
        failed.sort();
        failed.dedup();
        if let Some(h) = failed
            .iter()
            .find(|h| !state.hosts.contains_key(h.as_str()))
        {
            return Err(UnknownHost(h.to_string()));
        }
        let mut views = self.host_views(state);
        for h in &failed {
            if let Some(v) = views.get_mut(h.as_str()) {
                v.usable = false;
                v.unusable_why = Some("fails in this plan".into());
            }
        }
        let mut planned = Vec::new();
        for from in failed {
            let vms = state
                .vms
                .values()
                .filter(|v| v.ha && v.host == *from)
                .filter(|v| matches!(v.phase, Phase::Running | Phase::Recovering { .. }));
            for vm in vms {
                let need = need_of(vm);
                let (target, warning) =
                    failover_choice(&self.policy, &state.hosts, &mut views, from, &need);
                let (outcome, why) = match (
                    recovery::decide_host_failure(vm, wall_ms, &self.policy, target.clone()),
                    target,
                ) {
                    (crate::state::Decision::GiveUp { reason }, _) => {
                        (PlanOutcome::GivesUp, reason)
                    }
                    (_, Ok(choice)) => (
                        PlanOutcome::Placed {
                            target: choice.host,
                        },
                        choice.why,
                    ),
                    (_, Err(why)) => (PlanOutcome::Waits, why),
                };
                planned.push(PlannedVm {
                    uuid: vm.uuid.clone(),
                    name: vm.name.clone(),
                    from: from.clone(),
                    priority: vm.priority,
                    outcome,
                    why,
                    warning,
                });
            }
        }
        Ok(planned)
    }

    /// N+k per cluster, checking at most `max_k` failures: for k = 1, 2, … the k active hosts
    /// holding the most HA memory fail (a greedy worst case, not every combination), until one
    /// HA VM would wait.
    pub fn failures_tolerated(
        &self,
        state: &ClusterState,
        wall_ms: u64,
        max_k: usize,
    ) -> Vec<ClusterCapacity> {
        let mut clusters: BTreeMap<&str, Vec<(u64, &String)>> = BTreeMap::new();
        for (name, h) in &state.hosts {
            if h.phase == HostPhase::Active && !h.maintenance {
                clusters
                    .entry(h.cluster.as_str())
                    .or_default()
                    .push((0, name));
            }
        }
        for vm in state.vms.values().filter(|v| v.ha) {
            if let Some(hosts) = state
                .hosts
                .get(&vm.host)
                .and_then(|h| clusters.get_mut(h.cluster.as_str()))
            {
                if let Some(e) = hosts.iter_mut().find(|(_, n)| **n == vm.host) {
                    e.0 += vm.memory_kib;
                }
            }
        }
        clusters
            .into_iter()
            .map(|(cluster, mut hosts)| {
                hosts.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(b.1)));
                let limit = max_k.min(hosts.len());
                let mut tolerated = 0;
                for k in 1..=limit {
                    let failed: Vec<String> =
                        hosts[..k].iter().map(|(_, n)| (*n).clone()).collect();
                    let all_placed = self.plan_failures(&failed, state, wall_ms).is_ok_and(|p| {
                        p.iter()
                            .all(|v| matches!(v.outcome, PlanOutcome::Placed { .. }))
                    });
                    if !all_placed {
                        break;
                    }
                    tolerated = k;
                }
                ClusterCapacity {
                    cluster: cluster.to_string(),
                    hosts: hosts.len(),
                    tolerated,
                    at_least: tolerated == max_k && max_k < hosts.len(),
                }
            })
            .collect()
    }
}
