//! Self-fencing: when this host must destroy its own HA guests.
//!
//! [`decide`] is the whole policy, pure, so every case is a unit test. The rules (design.md,
//! "The one rule"):
//!
//! - a fence request for this agent in its slot on shared storage (sbd's poison pill): obey at
//!   once, whatever the lease says, and acknowledge it; unless the leader granted a renewal
//!   within the last second (a request left behind from before a heal must not kill the
//!   guests of a host the monitors hear again; the monitors only ask hosts they cannot hear);
//! - lease valid: nothing to do;
//! - lease expired, isolation response `keep-running`: keep the guests, wait to be
//!   power-fenced (the monitors do not count lease expiry as proof then);
//! - lease expired and no storage pool configured: keep the guests, because nothing tells an
//!   isolated host from an outage of every monitor (and the monitors never count lease
//!   expiry as proof for such a host);
//! - lease expired and no configured pool reachable: self-fence (cut from the monitors *and*
//!   the storage: the guests cannot do I/O anyway);
//! - lease expired and the leader record on some reachable pool changed within the last lease
//!   *and* well after the last renewal this agent received (more than two storage intervals
//!   plus one heartbeat interval after it, so that the last write of monitors that all died
//!   right after renewing cannot count), and the record has been changing again for at least
//!   half a lease since it last stopped for longer than a lease (monitors that come back
//!   after an outage start writing it before the agents have reconnected and been renewed;
//!   the new leader counts every lease as granted at its election, so it cannot take lease
//!   expiry as proof before a full lease has passed): self-fence (the monitors are alive
//!   without this host and will restart its guests);
//! - lease expired and the leader record stale on every reachable pool: keep the guests (every
//!   monitor is down; nobody can restart anything elsewhere). **All monitors down is not
//!   isolation.**

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tracing::{error, info, warn};
use vigil_common::config::IsolationResponse;
use vigil_common::domain::DomainState;
use vigil_common::storage::{FenceAck, FenceRequest};
use vigil_common::wire::{AgentCommand, AgentToMonitor, CommandOutcome};

use crate::executor::Executor;
use crate::lease::{Lease, LeaseStatus};
use crate::storage::StorageWorker;
use crate::watch::Latest;

/// What the guard knows about one pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolEvidence {
    pub name: String,
    /// Whether its first I/O cycle has finished (or overrun): unknown is not down.
    pub checked: bool,
    pub ok: bool,
    /// When the leader record there was last seen to change (our clock).
    pub leader_changed_at: Option<Instant>,
    /// When the leader record started changing again after a pause longer than a lease (or
    /// was first seen changing).
    pub leader_epoch_since: Option<Instant>,
    pub fence_request: Option<FenceRequest>,
}

/// The guard's verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Keep the guests running; the text says why (for the log).
    Keep(String),
    /// Destroy the HA guests now.
    SelfFence {
        reason: String,
        /// The fence request to acknowledge, if one asked for it.
        request: Option<FenceRequest>,
    },
}

/// When the leader record counts as fresh: it changed within the last lease, and more than
/// `after` past `renewed_at` (the last renewal received, or the agent's start).
#[derive(Debug, Clone, Copy)]
pub struct Freshness {
    pub renewed_at: Instant,
    pub after: Duration,
}

/// The self-fencing policy (see the module docs).
pub fn decide(
    now: Instant,
    granted_recently: bool,
    lease: LeaseStatus,
    lease_ms: u64,
    response: IsolationResponse,
    fresh: Freshness,
    pools: &[PoolEvidence],
) -> Verdict {
    if let Some((pool, req)) = pools
        .iter()
        .filter(|_| !granted_recently)
        .find_map(|p| p.fence_request.as_ref().map(|r| (&p.name, r)))
    {
        return Verdict::SelfFence {
            reason: format!(
                "fence request {} from monitor node {} (term {}) in storage pool {pool}: {}",
                req.id, req.node, req.term, req.reason
            ),
            request: Some(req.clone()),
        };
    }
    let LeaseStatus::Expired { ago } = lease else {
        return Verdict::Keep("lease valid".into());
    };
    let ago = ago.as_millis();
    if response == IsolationResponse::KeepRunning {
        return Verdict::Keep(format!(
            "lease expired {ago} ms ago; isolation response is keep-running: waiting to be power-fenced"
        ));
    }
    if pools.is_empty() {
        return Verdict::Keep(format!(
            "lease expired {ago} ms ago, but no storage pool is configured: an isolated host cannot be told from a monitor outage, so the guests keep running"
        ));
    }
    let reachable: Vec<&PoolEvidence> = pools.iter().filter(|p| p.ok).collect();
    if reachable.is_empty() && pools.iter().any(|p| !p.checked) {
        return Verdict::Keep(format!(
            "lease expired {ago} ms ago; storage not checked yet (the agent just started)"
        ));
    }
    if reachable.is_empty() {
        return Verdict::SelfFence {
            reason: format!(
                "lease expired {ago} ms ago and no storage pool is reachable: cut from the monitors and from storage"
            ),
            request: None,
        };
    }
    let fresh_within = Duration::from_millis(lease_ms);
    if let Some(p) = reachable.iter().find(|p| {
        p.leader_changed_at.is_some_and(|t| {
            now.saturating_duration_since(t) <= fresh_within && t > fresh.renewed_at + fresh.after
        }) && p
            .leader_epoch_since
            .is_some_and(|e| now.saturating_duration_since(e) >= fresh_within / 2)
    }) {
        return Verdict::SelfFence {
            reason: format!(
                "lease expired {ago} ms ago while the leader record on storage pool {} is fresh: the monitors are alive without this host",
                p.name
            ),
            request: None,
        };
    }
    Verdict::Keep(format!(
        "lease expired {ago} ms ago, but the leader record is stale on every reachable pool: every monitor seems down, so the guests keep running"
    ))
}

/// What the guard works with.
pub struct Guard {
    pub lease: Lease,
    pub storage: StorageWorker,
    pub exec: Executor,
    pub latest: Latest,
    pub host: String,
    pub instance: u64,
    pub reports: mpsc::Sender<AgentToMonitor>,
    /// Feed the systemd watchdog.
    pub watchdog: bool,
    /// How often the storage threads read the leader record.
    pub storage_interval: Duration,
    /// When this agent process started.
    pub started: Instant,
}

/// How often the guard looks.
const GUARD_EVERY: Duration = Duration::from_millis(100);

/// Runs the guard until `stop`: evaluates [`decide`] every 100 ms (and on every storage
/// cycle), destroys the HA domains when told to, acknowledges fence requests, reports what it
/// did to the monitor once connected, and feeds the systemd watchdog from this loop (so a
/// hung agent stops feeding it and systemd resets the host).
pub fn spawn(
    g: Guard,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    let Guard {
        lease,
        storage,
        exec,
        latest,
        host,
        instance,
        reports,
        watchdog,
        storage_interval,
        started,
    } = g;
    let mut changes = storage.changes();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(GUARD_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_reason = String::new();
        let mut acked: BTreeSet<u64> = BTreeSet::new();
        // Per pool: the last change time seen, and when the current run of changes began.
        let mut epochs: BTreeMap<String, (Instant, Instant)> = BTreeMap::new();
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = changes.changed() => {}
                _ = stop.changed() => break,
            }
            if watchdog {
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
            }
            let now = Instant::now();
            let lease_span = Duration::from_millis(lease.lease_ms());
            let pools: Vec<PoolEvidence> = storage
                .view()
                .pools
                .into_iter()
                .map(|p| PoolEvidence {
                    leader_epoch_since: p.leader.as_ref().and_then(|(_, c)| *c).map(|changed| {
                        let e = epochs.entry(p.name.clone()).or_insert((changed, changed));
                        if changed != e.0 {
                            if changed.saturating_duration_since(e.0) > lease_span {
                                e.1 = changed;
                            }
                            e.0 = changed;
                        }
                        e.1
                    }),
                    name: p.name,
                    checked: p.checked,
                    ok: p.ok,
                    leader_changed_at: p.leader.and_then(|(_, changed)| changed),
                    fence_request: p.fence_request.filter(|r| !acked.contains(&r.id)),
                })
                .collect();
            let verdict = decide(
                now,
                lease.granted_within(now, Duration::from_secs(1)),
                lease.status(now),
                lease.lease_ms(),
                lease.isolation_response(),
                Freshness {
                    renewed_at: lease.last_grant().unwrap_or(started),
                    after: storage_interval * 2
                        + Duration::from_millis(lease.heartbeat_interval_ms()),
                },
                &pools,
            );
            match verdict {
                Verdict::Keep(reason) if reason == "lease valid" => {
                    storage.set_fenced(false);
                    if !last_reason.is_empty() && last_reason != reason {
                        info!("lease valid again");
                    }
                    last_reason = reason;
                }
                Verdict::Keep(reason) => {
                    if reason != last_reason {
                        if reason == "lease valid" {
                            if !last_reason.is_empty() {
                                info!("lease valid again");
                            }
                        } else {
                            warn!(%reason, "keeping the guests running");
                        }
                        last_reason = reason;
                    }
                }
                Verdict::SelfFence { reason, request } => {
                    let running = running_ha_domains(&exec, &latest);
                    let fresh_episode = reason != last_reason || request.is_some();
                    if running.is_empty() && !fresh_episode {
                        continue;
                    }
                    if fresh_episode {
                        error!(%reason, domains = ?running, "self-fencing: destroying this host's HA domains");
                    }
                    let mut destroyed = Vec::new();
                    for uuid in &running {
                        let outcome = exec
                            .execute(AgentCommand::DestroyDomain { uuid: uuid.clone() })
                            .await;
                        match outcome {
                            CommandOutcome::Failed { reason } => {
                                error!(%uuid, %reason, "self-fence: destroy failed; retrying")
                            }
                            _ => destroyed.push(uuid.clone()),
                        }
                    }
                    if destroyed.len() == running.len() {
                        // Every HA domain is gone: say so on storage (the leader takes lease
                        // expiry as proof for a host it sees alive only then).
                        storage.set_fenced(true);
                    }
                    if let Some(req) = &request {
                        if destroyed.len() == running.len() {
                            storage.acknowledge(FenceAck {
                                id: req.id,
                                host: host.clone(),
                                instance,
                                destroyed: destroyed.clone(),
                                wall_ms: vigil_common::unix_ms(),
                            });
                            acked.insert(req.id);
                        }
                    }
                    if !destroyed.is_empty() || fresh_episode {
                        let _ = reports.try_send(AgentToMonitor::SelfFenced {
                            reason: reason.clone(),
                            destroyed,
                            wall_ms: vigil_common::unix_ms(),
                        });
                    }
                    last_reason = reason;
                }
            }
        }
    })
}

/// HA domains that are running (or paused) here, per the latest inventory.
fn running_ha_domains(exec: &Executor, latest: &Latest) -> Vec<String> {
    let inventory = latest.borrow().clone();
    let Some((domains, _, _)) = inventory else {
        return Vec::new();
    };
    domains
        .into_iter()
        .filter(|d| !matches!(d.state, DomainState::Shutoff | DomainState::Crashed))
        .filter(|d| d.meta.ha == Some(true) || exec.is_ha(&d.uuid))
        .map(|d| d.uuid)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(ok: bool, leader_changed_at: Option<Instant>) -> PoolEvidence {
        PoolEvidence {
            name: "primary".into(),
            checked: true,
            ok,
            leader_changed_at,
            leader_epoch_since: leader_changed_at.map(|t| t - Duration::from_secs(30)),
            fence_request: None,
        }
    }

    /// The last renewal was long before any leader record change in these tests.
    fn long_ago(now: Instant) -> Freshness {
        Freshness {
            renewed_at: now - Duration::from_secs(60),
            after: Duration::from_millis(1_500),
        }
    }

    fn expired() -> LeaseStatus {
        LeaseStatus::Expired {
            ago: Duration::from_millis(10),
        }
    }

    fn is_fence(v: &Verdict) -> bool {
        matches!(v, Verdict::SelfFence { .. })
    }

    /// The verdict for an expired lease, isolation response self-fence, last renewal long ago.
    fn expired_verdict(now: Instant, pools: &[PoolEvidence]) -> Verdict {
        decide(
            now,
            false,
            expired(),
            5_000,
            IsolationResponse::SelfFence,
            long_ago(now),
            pools,
        )
    }

    #[test]
    fn a_valid_lease_keeps_the_guests() {
        let now = Instant::now();
        let v = decide(
            now,
            false,
            LeaseStatus::Valid {
                remaining: Duration::from_secs(1),
            },
            5_000,
            IsolationResponse::SelfFence,
            long_ago(now),
            &[pool(true, Some(now))],
        );
        assert!(!is_fence(&v), "{v:?}");
    }

    #[test]
    fn expired_with_a_fresh_leader_record_self_fences() {
        let now = Instant::now();
        let v = expired_verdict(now, &[pool(true, Some(now - Duration::from_millis(600)))]);
        assert!(is_fence(&v), "{v:?}");
    }

    #[test]
    fn all_monitors_down_is_not_isolation() {
        let now = Instant::now();
        // The record stopped changing more than a lease ago: the monitors are gone.
        let stale = Some(now - Duration::from_millis(5_001));
        for leader in [stale, None] {
            let v = expired_verdict(now, &[pool(true, leader)]);
            assert!(!is_fence(&v), "{v:?}");
        }
        // And without pools, nothing can tell: keep.
        let v = expired_verdict(now, &[]);
        assert!(!is_fence(&v), "{v:?}");
    }

    #[test]
    fn the_last_write_of_monitors_that_died_after_renewing_is_not_fresh() {
        let now = Instant::now();
        // Renewed at now-5.2 s; the monitors' last leader record write was seen at now-4.5 s
        // (0.7 s after the renewal: a write in flight when they died), within the lease.
        let fresh = Freshness {
            renewed_at: now - Duration::from_millis(5_200),
            after: Duration::from_millis(1_500),
        };
        let v = decide(
            now,
            false,
            expired(),
            5_000,
            IsolationResponse::SelfFence,
            fresh,
            &[pool(true, Some(now - Duration::from_millis(4_500)))],
        );
        assert!(!is_fence(&v), "{v:?}");
        // Alive monitors keep changing it well after the renewal: isolated.
        let v = decide(
            now,
            false,
            expired(),
            5_000,
            IsolationResponse::SelfFence,
            fresh,
            &[pool(true, Some(now - Duration::from_millis(300)))],
        );
        assert!(is_fence(&v), "{v:?}");
    }

    #[test]
    fn monitors_back_from_an_outage_do_not_make_agents_fence_before_renewing() {
        let now = Instant::now();
        // The record changes again, but only for a second after a long pause: the agents
        // get time to reconnect and be renewed.
        let mut p = pool(true, Some(now - Duration::from_millis(100)));
        p.leader_epoch_since = Some(now - Duration::from_millis(1_000));
        let v = expired_verdict(now, &[p.clone()]);
        assert!(!is_fence(&v), "{v:?}");
        // Half a lease later without a renewal: isolated after all.
        p.leader_epoch_since = Some(now - Duration::from_millis(2_600));
        let v = expired_verdict(now, &[p]);
        assert!(is_fence(&v), "{v:?}");
    }

    #[test]
    fn storage_not_checked_yet_is_not_storage_down() {
        let now = Instant::now();
        let mut p = pool(false, None);
        p.checked = false;
        let v = expired_verdict(now, &[p]);
        assert!(!is_fence(&v), "{v:?}");
    }

    #[test]
    fn cut_from_monitors_and_storage_self_fences() {
        let now = Instant::now();
        let v = expired_verdict(now, &[pool(false, Some(now))]);
        assert!(is_fence(&v), "{v:?}");
    }

    #[test]
    fn keep_running_response_waits_for_power_fencing() {
        let now = Instant::now();
        let v = decide(
            now,
            false,
            expired(),
            5_000,
            IsolationResponse::KeepRunning,
            long_ago(now),
            &[pool(true, Some(now))],
        );
        assert!(!is_fence(&v), "{v:?}");
    }

    #[test]
    fn a_fence_request_is_obeyed_even_with_a_valid_lease() {
        let now = Instant::now();
        let mut p = pool(true, Some(now));
        p.fence_request = Some(FenceRequest {
            id: 42,
            host: "hv1".into(),
            instance: 7,
            term: 3,
            node: 1,
            wall_ms: 0,
            reason: "cut from the monitors".into(),
        });
        let v = decide(
            now,
            false,
            LeaseStatus::Valid {
                remaining: Duration::from_secs(4),
            },
            5_000,
            IsolationResponse::KeepRunning,
            long_ago(now),
            &[p],
        );
        match v {
            Verdict::SelfFence { request, reason } => {
                assert_eq!(request.map(|r| r.id), Some(42));
                assert!(reason.contains("fence request 42"), "{reason}");
            }
            other => panic!("expected a self-fence, got {other:?}"),
        }
    }

    #[test]
    fn a_fence_request_is_ignored_while_the_leader_renews_the_lease() {
        let now = Instant::now();
        let mut p = pool(true, Some(now));
        p.fence_request = Some(FenceRequest {
            id: 43,
            host: "hv1".into(),
            instance: 0,
            term: 3,
            node: 1,
            wall_ms: 0,
            reason: "left behind".into(),
        });
        let v = decide(
            now,
            true,
            LeaseStatus::Valid {
                remaining: Duration::from_secs(4),
            },
            5_000,
            IsolationResponse::SelfFence,
            long_ago(now),
            &[p],
        );
        assert!(!is_fence(&v), "{v:?}");
    }
}
