//! The operator's fencing verbs: `vigilctl host fence`, `vigilctl host confirm-off` checks,
//! and releasing a mass-failure hold. Each refuses what would fence a host that is heard.

use super::*;

impl Engine {
    /// `vigilctl host fence`: power the host off through its fence agent now.
    pub(super) fn on_operator_fence(&mut self, host: String, by: String, cx: &mut Context<'_>) {
        if self.fence_refusal(&host, true, cx.now_ms).is_none()
            && cx
                .state
                .hosts
                .get(&host)
                .is_some_and(|h| !matches!(h.phase, HostPhase::Fenced { .. }))
        {
            // A failed attempt is retried like any power fence.
            self.fencing.power_after.insert(host.clone(), cx.now_ms);
            let reason = format!(
                "operator {by} asked for it (vigilctl host fence): powering it off through its fence agent now"
            );
            self.propose_power_fence(&host, reason, cx);
        }
    }

    /// `vigilctl fencing release`: lift a mass-failure hold.
    pub(super) fn on_release_hold(
        &mut self,
        cluster: Option<String>,
        by: String,
        cx: &mut Context<'_>,
    ) {
        let clusters: Vec<String> = self
            .fencing
            .held
            .iter()
            .filter(|c| cluster.as_ref().is_none_or(|w| w == *c))
            .cloned()
            .collect();
        for c in clusters {
            let hosts: Vec<String> = cx
                .state
                .hosts
                .iter()
                .filter(|(n, h)| {
                    h.cluster == c
                        && self.detector.state(n) == Some(Liveness::Down)
                        && !matches!(h.phase, HostPhase::Fenced { .. })
                })
                .map(|(n, _)| n.clone())
                .collect();
            self.fencing.released.extend(hosts.iter().cloned());
            self.fencing.held.remove(&c);
            record_event(&mut cx.out, cx.wall_ms, Severity::Critical, None, EventKind::FencingReleased {
                    cluster: c.clone(),
                    by: by.clone(),
                }, format!(
                    "operator {by} released the mass-failure hold of cluster {c} (vigilctl fencing release): {} fenced automatically now",
                    if hosts.is_empty() {
                        "no host is down there any more; nothing is".to_string()
                    } else {
                        format!("{} are", hosts.join(", "))
                    }
                ));
        }
        self.reconcile_hosts(cx);
    }

    /// Clusters whose automatic fencing is held now (a mass failure).
    pub fn held_clusters(&self) -> Vec<String> {
        self.fencing.held.iter().cloned().collect()
    }

    /// Why `vigilctl host fence H` must not run now (`None`: it may). Without `force`, a host
    /// that is up is refused: powering it off stops its running guests.
    pub fn fence_refusal(&self, host: &str, force: bool, now_ms: u64) -> Option<String> {
        if !self.failover.fence_hosts.contains(host) {
            return Some(format!(
                "no fence agent is configured for {host} (add a [[fencing.hosts]] entry); if you made sure it is off, use `vigilctl host confirm-off {host}`"
            ));
        }
        if self.fencing.in_flight.contains(host) {
            return Some(format!("a fence of {host} is already running"));
        }
        if self.adoption.is_some() {
            // Issue 12 item 6: nothing is fenced before a restored cluster has heard the agents.
            return Some(
                "this cluster was just restored from a backup and is still hearing what the agents run (at most a lease): try again in a moment".to_string(),
            );
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
