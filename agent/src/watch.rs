//! Watches the local hypervisor whether or not a monitor is reachable: forwards lifecycle
//! events at once, polls the full inventory as a backstop, ships changed definitions of HA
//! VMs, and destroys any HA domain found running with a stale activation generation.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tracing::{error, warn};
use vigil_common::domain::{DomainInfo, DomainState, HypervisorHealth, LifecycleKind};
use vigil_common::generation_guard::{stale_verdict, StaleVerdict};
use vigil_common::wire::AgentToMonitor;

use crate::executor::Executor;

/// The latest inventory, for a session that just connected, with the observation sequence
/// number it was taken under (see [`observation_seq`]).
pub type Latest = watch::Receiver<Option<(Vec<DomainInfo>, HypervisorHealth, u64)>>;

/// This process's observation counter (see `vigil_common::wire::AgentToMonitor`).
static OBSERVATIONS: AtomicU64 = AtomicU64::new(0);

/// The next observation sequence number of this agent process: call it when an observation
/// is *taken* (before a listing starts, when an event arrives, when a command finished), so
/// the monitor can order observations that reach it by different paths.
pub fn observation_seq() -> u64 {
    OBSERVATIONS.fetch_add(1, Ordering::SeqCst) + 1
}

/// Resend the inventory at least this often even if nothing changed.
const RESEND_EVERY: Duration = Duration::from_secs(10);

/// Starts the watcher. Reports go to `reports` (dropped when full: the inventory is resent
/// periodically and the latest one is always available through the returned receiver).
pub fn spawn(exec: Executor, poll: Duration, reports: mpsc::Sender<AgentToMonitor>) -> Latest {
    let (latest_tx, latest_rx) = watch::channel(None);
    let Some(hv) = exec.hv.clone() else {
        let _ = latest_tx.send(Some((
            vec![],
            HypervisorHealth::Disabled,
            observation_seq(),
        )));
        return latest_rx;
    };
    let mut events = hv.events();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(poll);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_sent: Option<(Vec<DomainInfo>, HypervisorHealth)> = None;
        // The sequence number of the listing in `last_sent`.
        let mut last_seq = 0u64;
        let mut last_sent_at = tokio::time::Instant::now();
        let mut xml_seen: BTreeMap<String, String> = BTreeMap::new();
        // Generation of each running domain as last listed, to label events.
        let mut running_gen: BTreeMap<String, Option<u64>> = BTreeMap::new();
        let mut polls = 0u64;
        loop {
            let mut relist = false;
            tokio::select! {
                _ = tick.tick() => relist = true,
                ev = async {
                    match events.as_mut() {
                        Some(rx) => rx.recv().await,
                        None => std::future::pending().await,
                    }
                } => match ev {
                    Some(ev) => {
                        let seq = observation_seq();
                        // Label the event with the generation of the copy it is about: the
                        // domain's own metadata (set before every start Vigil orders), else
                        // what the last listing saw running.
                        let from_meta = match hv.get(&ev.uuid).await {
                            Ok(Some(d)) => d.meta.generation,
                            _ => None,
                        };
                        let generation = from_meta
                            .or_else(|| running_gen.get(&ev.uuid).copied().flatten());
                        // Any change of state: list again, so the inventory follows at once.
                        relist = !matches!(ev.kind, LifecycleKind::Other);
                        let _ = reports.try_send(AgentToMonitor::DomainEvent { event: ev, generation, seq });
                    }
                    None => events = None,
                },
            }
            if !relist {
                continue;
            }
            polls += 1;
            if polls % 30 == 0 {
                // Definitions are resent now and then: the monitor ignores unchanged ones, and
                // a lost one (monitor restarting) gets through eventually.
                xml_seen.clear();
            }
            // Stamped before listing: a start that completes while the listing runs has a
            // higher number, so a listing that still shows it shut off is the older one.
            let seq = observation_seq();
            let health = hv.health();
            let domains = match hv.list().await {
                Ok(d) => d,
                Err(e) => {
                    warn!(error = %e, "cannot list domains");
                    let h = hv.health();
                    let report = (
                        last_sent.as_ref().map(|l| l.0.clone()).unwrap_or_default(),
                        h,
                    );
                    if last_sent.as_ref().map(|l| &l.1) != Some(&report.1) {
                        // The domains are the last listing's: so is its sequence number.
                        let _ = reports.try_send(AgentToMonitor::Inventory {
                            domains: report.0.clone(),
                            health: report.1.clone(),
                            seq: last_seq,
                        });
                        let _ =
                            latest_tx.send(Some((report.0.clone(), report.1.clone(), last_seq)));
                        last_sent = Some(report);
                    }
                    continue;
                }
            };
            running_gen = domains
                .iter()
                .filter(|d| matches!(d.state, DomainState::Running | DomainState::Paused))
                .map(|d| (d.uuid.clone(), d.meta.generation))
                .collect();
            enforce_generations(&exec, &domains, &reports).await;
            ship_definitions(&exec, &domains, &mut xml_seen, &reports).await;
            let report = (domains, health);
            let changed = last_sent.as_ref() != Some(&report);
            if changed || last_sent_at.elapsed() >= RESEND_EVERY {
                let _ = reports.try_send(AgentToMonitor::Inventory {
                    domains: report.0.clone(),
                    health: report.1.clone(),
                    seq,
                });
                last_sent_at = tokio::time::Instant::now();
            }
            // Always the newest listing (and its number), even when unchanged.
            let _ = latest_tx.send(Some((report.0.clone(), report.1.clone(), seq)));
            last_seq = seq;
            if changed {
                last_sent = Some(report);
            }
        }
    });
    latest_rx
}

/// Destroys HA domains running with a generation older than the newest known
/// (`vigil_common::generation_guard::stale_verdict`, shared with the simulator).
async fn enforce_generations(
    exec: &Executor,
    domains: &[DomainInfo],
    reports: &mpsc::Sender<AgentToMonitor>,
) {
    let Some(hv) = &exec.hv else { return };
    let stale: Vec<(DomainInfo, u64)> = {
        let Ok(gens) = exec.gens.lock() else { return };
        domains
            .iter()
            .filter(|d| matches!(d.state, DomainState::Running | DomainState::Paused))
            .filter_map(
                |d| match stale_verdict(d.meta.generation, gens.newest(&d.uuid)) {
                    StaleVerdict::Stale { newest, .. } => Some((d.clone(), newest)),
                    StaleVerdict::Current => None,
                },
            )
            .collect()
    };
    for (d, newest) in stale {
        error!(
            uuid = %d.uuid, name = %d.name, found = ?d.meta.generation, newest,
            "domain runs with a stale activation generation: destroying it"
        );
        match hv.destroy(&d.uuid).await {
            Ok(()) => {
                let _ = reports.try_send(AgentToMonitor::StaleDestroyed {
                    uuid: d.uuid.clone(),
                    name: d.name.clone(),
                    found: d.meta.generation,
                    newest,
                });
            }
            Err(e) => error!(uuid = %d.uuid, error = %e, "cannot destroy stale domain"),
        }
    }
}

/// Sends the inactive XML of HA domains whose definition changed.
async fn ship_definitions(
    exec: &Executor,
    domains: &[DomainInfo],
    seen: &mut BTreeMap<String, String>,
    reports: &mpsc::Sender<AgentToMonitor>,
) {
    let Some(hv) = &exec.hv else { return };
    let ha: Vec<&DomainInfo> = {
        let Ok(gens) = exec.gens.lock() else { return };
        domains
            .iter()
            .filter(|d| d.persistent && (gens.is_ha(&d.uuid) || d.meta.ha == Some(true)))
            .collect()
    };
    for d in ha {
        match hv.inactive_xml(&d.uuid).await {
            Ok(xml) => {
                if seen.get(&d.uuid) != Some(&xml)
                    && reports
                        .try_send(AgentToMonitor::Definition {
                            uuid: d.uuid.clone(),
                            xml: xml.clone(),
                        })
                        .is_ok()
                {
                    seen.insert(d.uuid.clone(), xml);
                }
            }
            Err(e) => warn!(uuid = %d.uuid, error = %e, "cannot read definition"),
        }
    }
}
