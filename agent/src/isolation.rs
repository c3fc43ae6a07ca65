//! The isolation guard: evaluates the self-fencing policy ([`decide`], shared with the
//! monitor's simulator in `vigil_common::isolation`, where every rule is written down) every
//! 100 ms, destroys the HA domains when told to, acknowledges fence requests, reports what it
//! did, and tells the host watchdog ([`crate::watchdog`]) whether it may be fed.
//!
//! Fence requests reach [`decide`] only if they bind to this agent process and the current
//! leader ([`vigil_common::storage::request_binds`]: they name this instance, a term at least
//! the newest seen in a leader record, and the monitors have not withdrawn them), so a
//! request left behind from before a heal, for an earlier agent process or by a deposed leader
//! never kills guests. The acknowledgement (and `fenced: true` on storage, and the self-fence
//! report's claim) is written only once a fresh, healthy listing from libvirt, taken after the
//! destroys, shows no HA domain running (every VM the request names counts as HA); from the
//! first moment of the episode the executor refuses starts, until the monitors grant a lease
//! again. The host watchdog is fed while the verdict is "keep", stops being fed at the first
//! self-fence verdict, and is disarmed once that fresh listing shows no HA domain running.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tracing::{error, info, warn};
use vigil_common::storage::FenceAck;
use vigil_common::wire::{AgentCommand, AgentToMonitor, CommandOutcome};

pub use vigil_common::isolation::{decide, feeds_watchdog, Freshness, PoolEvidence, Verdict};

use crate::executor::Executor;
use crate::fencing::{Fencing, SelfFenceReport};
use crate::lease::Lease;
use crate::storage::StorageWorker;
use crate::watchdog::Watchdog;

/// What the guard works with.
pub struct Guard {
    pub lease: Lease,
    pub storage: StorageWorker,
    pub exec: Executor,
    pub host: String,
    pub instance: u64,
    pub reports: mpsc::Sender<AgentToMonitor>,
    /// Feed the systemd watchdog.
    pub watchdog: bool,
    /// How often the storage threads read the leader record.
    pub storage_interval: Duration,
    /// When this agent process started.
    pub started: Instant,
    /// Terms, withdrawn requests, and the self-fence reports not yet noted.
    pub fencing: Fencing,
    /// The host watchdog: fed while the verdict is "keep", disarmed once a self-fence left
    /// no HA domain running.
    pub host_watchdog: Watchdog,
}

/// One fencing episode: from the first self-fence verdict until the monitors grant a lease
/// again.
struct Episode {
    report: SelfFenceReport,
    started: Instant,
    /// Whether the report was recorded (it is, before the first destroy, or once verified).
    reported: bool,
    /// Whether a fresh listing showed no HA domain running (logged once), and when.
    verified: bool,
    verified_at: Option<Instant>,
    /// The last reason the listing could not be had (logged on change).
    listing_error: Option<String>,
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
        host,
        instance,
        reports,
        watchdog,
        storage_interval,
        started,
        fencing,
        host_watchdog,
    } = g;
    let mut changes = storage.changes();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(GUARD_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_reason = String::new();
        let mut acked: BTreeSet<u64> = BTreeSet::new();
        let mut episode: Option<Episode> = None;
        // Requests ignored, and why (logged once per request).
        let mut ignored: BTreeSet<u64> = BTreeSet::new();
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
            let view = storage.view();
            for p in &view.pools {
                if let Some((record, _)) = &p.leader {
                    fencing.note_term(record.term);
                }
            }
            let (newest_term, withdrawn) = (fencing.newest_term(), fencing.withdrawn());
            let pools: Vec<PoolEvidence> =
                view.pools
                    .into_iter()
                    .map(|p| PoolEvidence {
                        // (First: it borrows the pool's name.)
                        fence_request: p.fence_request.filter(|r| !acked.contains(&r.id)).filter(
                            |r| match vigil_common::storage::request_binds(
                                r,
                                &host,
                                instance,
                                newest_term,
                                &withdrawn,
                            ) {
                                Ok(()) => true,
                                Err(why) => {
                                    if ignored.insert(r.id) {
                                        warn!(pool = %p.name, "ignoring a fence request: {why}");
                                    }
                                    false
                                }
                            },
                        ),
                        leader_epoch_since: p.leader.as_ref().and_then(|(_, c)| *c).map(
                            |changed| {
                                let e = epochs.entry(p.name.clone()).or_insert((changed, changed));
                                if changed != e.0 {
                                    if changed.saturating_duration_since(e.0) > lease_span {
                                        e.1 = changed;
                                    }
                                    e.0 = changed;
                                }
                                e.1
                            },
                        ),
                        name: p.name,
                        checked: p.checked,
                        ok: p.ok,
                        condemns_us: p.leader.as_ref().is_some_and(|(r, _)| r.condemns(&host)),
                        leader_changed_at: p.leader.and_then(|(_, changed)| changed),
                    })
                    .collect();
            let verdict = decide(
                now,
                lease.status(now),
                lease.lease_ms(),
                lease.isolation_response(),
                Freshness {
                    renewed_at: lease.last_grant().unwrap_or(started),
                    after: storage_interval * 2
                        + Duration::from_millis(lease.heartbeat_interval_ms()),
                },
                &pools,
                lease.unmanaged_within(now, lease_span).as_deref(),
            );
            if feeds_watchdog(&verdict) {
                host_watchdog.keep(now);
            } else {
                host_watchdog.fence();
            }
            // The episode ends once the monitors granted a lease for a beat sent after it
            // began: they hear this host again, and start orders may come back.
            if !matches!(verdict, Verdict::SelfFence { .. }) {
                if let Some(ep) = &episode {
                    if lease.last_grant().is_some_and(|g| g > ep.started) {
                        info!(id = ep.report.id, "fencing episode over: the monitors granted a lease again; starts are allowed");
                        exec.end_fencing();
                        storage.set_fenced(false);
                        episode = None;
                    }
                }
            }
            match verdict {
                Verdict::Keep(reason) => {
                    if reason != last_reason {
                        if reason == vigil_common::isolation::LEASE_VALID {
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
                    let ep = episode.get_or_insert_with(|| {
                        // No start gets through from here on, also one already queued.
                        exec.begin_fencing();
                        error!(%reason, "self-fencing: destroying this host's HA domains");
                        Episode {
                            report: SelfFenceReport {
                                id: fencing.next_id(),
                                reason: reason.clone(),
                                destroyed: Vec::new(),
                                wall_ms: vigil_common::unix_ms(),
                            },
                            started: now,
                            reported: false,
                            verified: false,
                            verified_at: None,
                            listing_error: None,
                        }
                    });
                    let named: BTreeSet<String> = request
                        .as_ref()
                        .map(|r| r.vms.iter().map(|u| u.to_ascii_lowercase()).collect())
                        .unwrap_or_default();
                    // Verified and no request to answer: look again once a second, not on
                    // every tick (a domain started by hand meanwhile goes too).
                    if request.is_none()
                        && ep.verified_at.is_some_and(|t| {
                            now.saturating_duration_since(t) < Duration::from_secs(1)
                        })
                    {
                        last_reason = reason;
                        continue;
                    }
                    let verified_off = fence_pass(&exec, &named, ep, &fencing, &reports).await;
                    ep.verified_at = verified_off.as_ref().map(|_| now);
                    if let Some(off) = verified_off {
                        // Every HA domain is gone, as libvirt itself says now: only now say
                        // so on storage (the leader takes lease expiry as proof for a host it
                        // sees alive only then) and in the slot.
                        storage.set_fenced(true);
                        // Nothing left to reset the host for.
                        host_watchdog.disarm();
                        if !ep.reported {
                            fencing.record(ep.report.clone());
                            let _ = reports.try_send(ep.report.message());
                            ep.reported = true;
                        }
                        if !ep.verified {
                            info!(id = ep.report.id, destroyed = ?ep.report.destroyed, "self-fence verified: no HA domain runs");
                            ep.verified = true;
                        }
                        if let Some(req) = &request {
                            info!(id = req.id, "acknowledging the fence request");
                            storage.acknowledge(FenceAck {
                                id: req.id,
                                host: host.clone(),
                                instance,
                                destroyed: ep.report.destroyed.clone(),
                                wall_ms: vigil_common::unix_ms(),
                                verified_off: off,
                            });
                            acked.insert(req.id);
                        }
                    }
                    last_reason = reason;
                }
            }
        }
    })
}

/// One pass of a self-fence: list the HA domains afresh (through the libvirt worker, after
/// every call queued before, starts included), destroy those that run, and list again, up to
/// three times. Before destroying a domain not yet in the episode's report, the report is
/// updated and persisted (so the monitor reads those stops as failures, not as an operator's
/// `virsh destroy`). `Some(off)`: a fresh, healthy listing showed no HA domain running;
/// `off` is what it showed not running (with every uuid in `named`).
async fn fence_pass(
    exec: &Executor,
    named: &BTreeSet<String>,
    ep: &mut Episode,
    fencing: &Fencing,
    reports: &mpsc::Sender<AgentToMonitor>,
) -> Option<Vec<String>> {
    for _ in 0..3 {
        let listing = match exec.ha_listing(named).await {
            Ok(l) => {
                ep.listing_error = None;
                l
            }
            Err(e) => {
                if ep.listing_error.as_deref() != Some(e.as_str()) {
                    error!(error = %e, "self-fence: no fresh listing from libvirt; not acknowledging until one shows no HA domain running");
                    ep.listing_error = Some(e);
                }
                return None;
            }
        };
        if listing.running.is_empty() {
            return Some(listing.off);
        }
        let new: Vec<String> = listing
            .running
            .iter()
            .filter(|u| !ep.report.destroyed.contains(u))
            .cloned()
            .collect();
        if !new.is_empty() || !ep.reported {
            ep.report.destroyed.extend(new);
            fencing.record(ep.report.clone());
            let _ = reports.try_send(ep.report.message());
            ep.reported = true;
        }
        for uuid in &listing.running {
            match exec
                .execute(AgentCommand::DestroyDomain { uuid: uuid.clone() })
                .await
            {
                CommandOutcome::Failed { reason } => {
                    error!(%uuid, %reason, "self-fence: destroy failed; retrying")
                }
                _ => info!(%uuid, "self-fence: destroyed"),
            }
        }
    }
    None
}

#[cfg(test)]
mod guard_tests {
    use super::*;
    use crate::generations::Generations;
    use crate::libvirt::Hypervisor;
    use vigil_common::config::{PoolConfig, StorageConfig};
    use vigil_common::domain::DomainState;
    use vigil_common::storage::{self as records, FenceRequest, LeaderRecord};

    const INSTANCE: u64 = 7;

    struct Rig {
        dir: tempfile::TempDir,
        pool: std::path::PathBuf,
        hv: Hypervisor,
        exec: Executor,
        storage: StorageWorker,
        reports: mpsc::Receiver<AgentToMonitor>,
        stop: tokio::sync::watch::Sender<bool>,
        host: String,
    }

    fn node_xml() -> String {
        // An empty node: no domain of the default test driver.
        "<node></node>".to_string()
    }

    fn domain_xml(name: &str) -> String {
        format!(
            r#"<domain type='test'>
  <name>{name}</name>
  <memory unit='KiB'>131072</memory>
  <vcpu>1</vcpu>
  <os><type>hvm</type></os>
  <metadata><vigil:vm xmlns:vigil="urn:vigil:vm:1" ha="true"/></metadata>
</domain>"#
        )
    }

    /// A guard that never saw an inventory (it lists through libvirt only), the given lease,
    /// and one pool (`bad_pool`: a path that is a regular file, so every I/O fails).
    async fn rig(tag: &str, lease: Lease, bad_pool: bool, report_capacity: usize) -> Rig {
        let dir = tempfile::tempdir().expect("tempdir");
        let node = dir.path().join("node.xml");
        std::fs::write(&node, node_xml()).expect("node.xml");
        let hv = Hypervisor::open(
            &format!("test://{}", node.display()),
            Duration::from_secs(10),
        );
        let exec = Executor::new(Some(hv.clone()), Generations::in_memory());
        let pool = if bad_pool {
            let p = dir.path().join("not-a-dir");
            std::fs::write(&p, b"a regular file").expect("file");
            p
        } else {
            let p = dir.path().join("pool");
            std::fs::create_dir(&p).expect("pool");
            p
        };
        let host = format!("hv-{tag}");
        let cfg = StorageConfig {
            pools: vec![PoolConfig {
                name: "primary".into(),
                path: pool.clone(),
            }],
            interval_ms: 50,
            deadline_ms: 1_000,
        };
        let started = Instant::now();
        let storage = StorageWorker::spawn(&cfg, &host, INSTANCE, started);
        let (reports_tx, reports) = mpsc::channel(report_capacity);
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        spawn(
            Guard {
                lease,
                storage: storage.clone(),
                exec: exec.clone(),
                host: host.clone(),
                instance: INSTANCE,
                reports: reports_tx,
                watchdog: false,
                storage_interval: Duration::from_millis(50),
                started,
                fencing: Fencing::in_memory(),
                host_watchdog: Watchdog::none(),
            },
            stop_rx,
        );
        Rig {
            dir,
            pool,
            hv,
            exec,
            storage,
            reports,
            stop,
            host,
        }
    }

    impl Rig {
        async fn running_ha_domain(&self, name: &str) -> String {
            let uuid = self.hv.define(domain_xml(name)).await.expect("define");
            self.hv.start(&uuid).await.expect("start");
            uuid
        }
        async fn running(&self, uuid: &str) -> bool {
            matches!(
                self.hv.get(uuid).await.expect("get").map(|d| d.state),
                Some(DomainState::Running | DomainState::Paused)
            )
        }
        fn request(&self, id: u64, instance: u64, term: u64) {
            let req = FenceRequest {
                id,
                host: self.host.clone(),
                instance,
                term,
                node: 1,
                wall_ms: 0,
                reason: "test".into(),
                vms: vec![],
            };
            records::write_record(&records::fence_request_path(&self.pool, &self.host), &req)
                .expect("write request");
        }
        fn ack(&self) -> Option<FenceAck> {
            records::read_record(&records::fence_ack_path(&self.pool, &self.host))
                .ok()
                .flatten()
        }
        fn finish(self) {
            let _ = self.stop.send(true);
            self.storage.stop();
            let _ = self.dir;
        }
    }

    async fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
        let end = Instant::now() + timeout;
        loop {
            if let Some(v) = f() {
                return Some(v);
            }
            if Instant::now() >= end {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The self-fence reports sent: (id, destroyed) of each.
    fn self_fenced(reports: &mut mpsc::Receiver<AgentToMonitor>) -> Vec<(u64, Vec<String>)> {
        let mut out = Vec::new();
        while let Ok(r) = reports.try_recv() {
            if let AgentToMonitor::SelfFenced { id, destroyed, .. } = r {
                out.push((id, destroyed));
            }
        }
        out
    }

    #[tokio::test]
    async fn a_fence_ack_is_not_written_before_a_fresh_listing_shows_no_ha_domain_running() {
        let rig = rig("fresh", Lease::in_memory(Instant::now(), 60_000), false, 64).await;
        // Running, but the agent has no inventory yet (it just started).
        let uuid = rig.running_ha_domain("vigil-fresh-listing").await;
        rig.request(42, INSTANCE, 1);
        let ack = wait_for(Duration::from_secs(5), || rig.ack()).await;
        let ack = ack.expect("the request is acknowledged");
        assert_eq!(ack.id, 42);
        assert!(
            !rig.running(&uuid).await,
            "acknowledged ({ack:?}) while an HA domain runs"
        );
        assert_eq!(ack.destroyed, vec![uuid.clone()]);
        // Fencing has begun: the executor refuses to start HA domains again.
        let outcome = rig
            .exec
            .execute(AgentCommand::StartDomain {
                uuid: uuid.clone(),
                generation: 1,
                definition: None,
            })
            .await;
        assert!(
            matches!(&outcome, CommandOutcome::Failed { reason } if reason.contains("fenc")),
            "{outcome:?}"
        );
        assert!(!rig.running(&uuid).await);
        rig.finish();
    }

    #[tokio::test]
    async fn a_fence_request_for_another_instance_or_an_older_term_is_not_obeyed() {
        let rig = rig(
            "binding",
            Lease::in_memory(Instant::now(), 60_000),
            false,
            64,
        )
        .await;
        let uuid = rig.running_ha_domain("vigil-binding").await;
        records::write_record(
            &records::leader_path(&rig.pool),
            &LeaderRecord {
                term: 5,
                node: 2,
                seq: 1,
                wall_ms: 0,
                condemned: vec![],
                hold: false,
            },
        )
        .expect("leader.json");
        // Let the worker read the leader record first.
        tokio::time::sleep(Duration::from_millis(300)).await;
        for (id, instance, term) in [(50, INSTANCE, 3), (51, 0, 5), (52, INSTANCE + 1, 5)] {
            rig.request(id, instance, term);
            tokio::time::sleep(Duration::from_millis(500)).await;
            assert!(
                rig.running(&uuid).await,
                "obeyed request {id} (instance {instance}, term {term})"
            );
            assert_eq!(rig.ack(), None);
        }
        // The current term and this instance: obeyed.
        rig.request(53, INSTANCE, 5);
        let ack = wait_for(Duration::from_secs(5), || rig.ack()).await;
        assert_eq!(ack.map(|a| a.id), Some(53));
        assert!(!rig.running(&uuid).await);
        rig.finish();
    }

    #[tokio::test]
    async fn one_isolation_episode_sends_one_self_fence_report() {
        // Lease expired and the only pool unreachable: self-fence, for as long as it lasts.
        let lease = Lease::in_memory(Instant::now(), 0);
        let mut rig = rig("storm", lease, true, 1024).await;
        let uuid = rig.running_ha_domain("vigil-storm").await;
        // 20 guard ticks and more.
        tokio::time::sleep(Duration::from_millis(2_500)).await;
        assert!(!rig.running(&uuid).await);
        let sent = self_fenced(&mut rig.reports);
        // One episode: one id. Sent again only when the episode's state changed (the guard
        // may have fenced before the domain was started, then destroyed it): at most twice.
        let ids: BTreeSet<u64> = sent.iter().map(|(id, _)| *id).collect();
        assert_eq!(ids.len(), 1, "{sent:?}");
        assert!(
            sent.len() <= 2,
            "{} reports for one episode: {sent:?}",
            sent.len()
        );
        assert_eq!(
            sent.last().map(|(_, d)| d.clone()),
            Some(vec![uuid.clone()])
        );
        rig.finish();
    }
}
