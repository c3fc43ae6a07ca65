//! Self-fencing: when a host must destroy its own HA guests, and when it may feed its host
//! watchdog. Pure, so that the agent and the monitor's simulator run the same decision (a rule
//! written twice is a rule tested zero times).
//!
//! [`decide`] is the whole policy. The rules (the one rule's proofs 3 and 4, docs/architecture.md):
//!
//! - a fence request for this agent in its slot on shared storage (sbd's poison pill): obey at
//!   once, whatever the lease says, and acknowledge it. `PoolEvidence::fence_request` holds
//!   only requests that bind to this agent process and the current leader
//!   ([`crate::storage::request_binds`]), filtered by the caller;
//! - lease valid: nothing to do;
//! - lease expired, isolation response `keep-running`: keep the guests, wait to be
//!   power-fenced (the monitors do not count lease expiry as proof then);
//! - lease expired and no storage pool configured: keep the guests, because nothing tells an
//!   isolated host from an outage of every monitor (and the monitors never count lease
//!   expiry as proof for such a host);
//! - lease expired and no configured pool reachable: self-fence (cut from the monitors *and*
//!   the storage: the guests cannot do I/O anyway) — unless a monitor answered within the
//!   last lease but could not manage this agent (another protocol version, an expired
//!   certificate on either side): the monitors hear such a host and never condemn it, so
//!   this host is not cut off, and nobody would restart its guests elsewhere;
//! - lease expired and the leader record on some reachable pool is **fresh and condemns this
//!   host** (names it, no hold): self-fence. Fresh means it changed within the last lease *and*
//!   well after the last renewal this agent received (more than two storage intervals plus one
//!   heartbeat interval after it, so that the last write of monitors that all died right after
//!   renewing cannot count), and it has been changing again for at least half a lease since it
//!   last stopped for longer than a lease (monitors that come back after an outage start
//!   writing it before the agents have reconnected);
//! - lease expired and the record fresh but not naming this host (or holding fencing): keep the
//!   guests. Anything that stops grants but not the record — a protocol version mismatch, an
//!   expired certificate, the monitors' own network, a stalled engine (which stops the record
//!   too) — must never destroy guests: the monitors condemn only hosts they are fencing;
//! - lease expired and the leader record stale on every reachable pool: keep the guests (every
//!   monitor is down; nobody can restart anything elsewhere). **All monitors down is not
//!   isolation.**
//!
//! The host watchdog (proof 3) is fed exactly while the verdict is [`Verdict::Keep`]
//! ([`feeds_watchdog`]): an agent that decides to fence itself, or that is dead, hung or
//! crash-looping, stops feeding it and the host resets within the watchdog's timeout unless
//! every HA domain is gone first (then the agent disarms it).

use std::time::{Duration, Instant};

use crate::config::IsolationResponse;
use crate::storage::FenceRequest;

/// The lease as the isolation guard sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseStatus {
    /// Valid for this much longer.
    Valid { remaining: Duration },
    /// Ran out this long ago.
    Expired { ago: Duration },
}

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
    /// Whether the latest leader record read there condemns this host
    /// ([`crate::storage::LeaderRecord::condemns`]).
    pub condemns_us: bool,
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

/// The text of the `Keep` verdict for a valid lease.
pub const LEASE_VALID: &str = "lease valid";

/// When the leader record counts as fresh: it changed within the last lease, and more than
/// `after` past `renewed_at` (the last renewal received, or the agent's start).
#[derive(Debug, Clone, Copy)]
pub struct Freshness {
    pub renewed_at: Instant,
    pub after: Duration,
}

/// Whether the host watchdog may be fed under this verdict: only while the agent would not
/// fence itself now.
pub fn feeds_watchdog(v: &Verdict) -> bool {
    matches!(v, Verdict::Keep(_))
}

/// The self-fencing policy (see the module docs).
pub fn decide(
    now: Instant,
    lease: LeaseStatus,
    lease_ms: u64,
    response: IsolationResponse,
    fresh: Freshness,
    pools: &[PoolEvidence],
    unmanaged: Option<&str>,
) -> Verdict {
    if let Some((pool, req)) = pools
        .iter()
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
        return Verdict::Keep(LEASE_VALID.into());
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
    if let (true, Some(why)) = (reachable.is_empty(), unmanaged) {
        return Verdict::Keep(format!(
            "lease expired {ago} ms ago and no storage pool is reachable, but a monitor answered within the lease without being able to manage this agent ({why}): the monitors hear this host and never condemn it for that, so the guests keep running, unprotected"
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
    let is_fresh = |p: &PoolEvidence| {
        p.leader_changed_at.is_some_and(|t| {
            now.saturating_duration_since(t) <= fresh_within && t > fresh.renewed_at + fresh.after
        }) && p
            .leader_epoch_since
            .is_some_and(|e| now.saturating_duration_since(e) >= fresh_within / 2)
    };
    if let Some(p) = reachable.iter().find(|p| is_fresh(p) && p.condemns_us) {
        return Verdict::SelfFence {
            reason: format!(
                "lease expired {ago} ms ago and the fresh leader record on storage pool {} condemns this host: the monitors are alive without it and are fencing it",
                p.name
            ),
            request: None,
        };
    }
    if let Some(p) = reachable.iter().find(|p| is_fresh(p)) {
        return Verdict::Keep(format!(
            "lease expired {ago} ms ago; the leader record on storage pool {} is fresh but does not condemn this host: the guests keep running",
            p.name
        ));
    }
    Verdict::Keep(format!(
        "lease expired {ago} ms ago, but the leader record is stale on every reachable pool: every monitor seems down, so the guests keep running"
    ))
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
            condemns_us: true,
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
            expired(),
            5_000,
            IsolationResponse::SelfFence,
            long_ago(now),
            pools,
            None,
        )
    }

    #[test]
    fn a_valid_lease_keeps_the_guests() {
        let now = Instant::now();
        let v = decide(
            now,
            LeaseStatus::Valid {
                remaining: Duration::from_secs(1),
            },
            5_000,
            IsolationResponse::SelfFence,
            long_ago(now),
            &[pool(true, Some(now))],
            None,
        );
        assert!(!is_fence(&v), "{v:?}");
        assert!(feeds_watchdog(&v));
    }

    #[test]
    fn expired_with_a_fresh_leader_record_that_condemns_us_self_fences() {
        let now = Instant::now();
        let v = expired_verdict(now, &[pool(true, Some(now - Duration::from_millis(600)))]);
        assert!(is_fence(&v), "{v:?}");
        assert!(!feeds_watchdog(&v));
    }

    /// Issue 9 item 4: anything that stops grants but not the record (a version mismatch, an
    /// expired certificate, the monitors' own network) must not destroy guests: only a record
    /// that names this host does.
    #[test]
    fn self_fencing_the_monitors_did_not_ask_for_keeps_the_guests() {
        let now = Instant::now();
        let mut p = pool(true, Some(now - Duration::from_millis(600)));
        p.condemns_us = false;
        let v = expired_verdict(now, &[p]);
        assert!(!is_fence(&v), "{v:?}");
        assert!(feeds_watchdog(&v));
    }

    /// Issue 9 item 4, the edge a review found: a version mismatch (or an expired
    /// certificate) during a storage fault. No pool answers, but a monitor does, refusing to
    /// manage this agent: the monitors hear the host and never condemn it, so nobody would
    /// restart its guests elsewhere — destroying them is a needless kill.
    #[test]
    fn a_version_mismatch_during_a_storage_fault_keeps_the_guests() {
        let now = Instant::now();
        let pools = [pool(false, None)];
        let refused = decide(
            now,
            expired(),
            5_000,
            IsolationResponse::SelfFence,
            long_ago(now),
            &pools,
            Some("the monitor speaks another protocol version"),
        );
        assert!(!is_fence(&refused), "{refused:?}");
        assert!(feeds_watchdog(&refused));
        // Without an answer from any monitor it is cut off from both: fence.
        assert!(is_fence(&expired_verdict(now, &pools)));
    }

    #[test]
    fn all_monitors_down_is_not_isolation() {
        let now = Instant::now();
        // The record stopped changing more than a lease ago: the monitors are gone.
        let stale = Some(now - Duration::from_millis(5_001));
        for leader in [stale, None] {
            let v = expired_verdict(now, &[pool(true, leader)]);
            assert!(!is_fence(&v), "{v:?}");
            assert!(feeds_watchdog(&v));
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
            expired(),
            5_000,
            IsolationResponse::SelfFence,
            fresh,
            &[pool(true, Some(now - Duration::from_millis(4_500)))],
            None,
        );
        assert!(!is_fence(&v), "{v:?}");
        // Alive monitors keep changing it well after the renewal: isolated.
        let v = decide(
            now,
            expired(),
            5_000,
            IsolationResponse::SelfFence,
            fresh,
            &[pool(true, Some(now - Duration::from_millis(300)))],
            None,
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
        assert!(!feeds_watchdog(&v));
    }

    #[test]
    fn keep_running_response_waits_for_power_fencing() {
        let now = Instant::now();
        let v = decide(
            now,
            expired(),
            5_000,
            IsolationResponse::KeepRunning,
            long_ago(now),
            &[pool(true, Some(now))],
            None,
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
            vms: vec![],
        });
        let v = decide(
            now,
            LeaseStatus::Valid {
                remaining: Duration::from_secs(4),
            },
            5_000,
            IsolationResponse::KeepRunning,
            long_ago(now),
            &[p],
            None,
        );
        match v {
            Verdict::SelfFence { request, reason } => {
                assert_eq!(request.map(|r| r.id), Some(42));
                assert!(reason.contains("fence request 42"), "{reason}");
            }
            other => panic!("expected a self-fence, got {other:?}"),
        }
    }
}
