//! The isolation guard: evaluates the self-fencing policy ([`decide`], shared with the
//! monitor's simulator in `vigil_common::isolation`, where every rule is written down) every
//! 100 ms, destroys the HA domains when told to, acknowledges fence requests, reports what it
//! did, and tells the host watchdog ([`crate::watchdog`]) whether it may be fed.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tracing::{error, info, warn};
use vigil_common::domain::DomainState;
use vigil_common::storage::FenceAck;
use vigil_common::wire::{AgentCommand, AgentToMonitor, CommandOutcome};

pub use vigil_common::isolation::{decide, feeds_watchdog, Freshness, PoolEvidence, Verdict};

use crate::executor::Executor;
use crate::lease::Lease;
use crate::storage::StorageWorker;
use crate::watch::Latest;
use crate::watchdog::Watchdog;

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
    /// The host watchdog: fed while the verdict is "keep", disarmed once a self-fence left
    /// no HA domain running.
    pub host_watchdog: Watchdog,
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
        host_watchdog,
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
                    condemns_us: p.leader.as_ref().is_some_and(|(r, _)| r.condemns(&host)),
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
            if feeds_watchdog(&verdict) {
                host_watchdog.keep(now);
            } else {
                host_watchdog.fence();
            }
            match verdict {
                Verdict::Keep(reason) if reason == vigil_common::isolation::LEASE_VALID => {
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
                        // expiry as proof for a host it sees alive only then), and disarm the
                        // host watchdog: there is nothing left to reset the host for.
                        storage.set_fenced(true);
                        host_watchdog.disarm();
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
    let Some((domains, _)) = inventory else {
        return Vec::new();
    };
    domains
        .into_iter()
        .filter(|d| !matches!(d.state, DomainState::Shutoff | DomainState::Crashed))
        .filter(|d| d.meta.ha == Some(true) || exec.is_ha(&d.uuid))
        .map(|d| d.uuid)
        .collect()
}
