//! Agent leases as the leader sees them, and when their expiry counts as proof.
//!
//! Pure and leader-local, times in the engine's monotonic milliseconds. The leader grants a
//! lease on every heartbeat it receives; the agent counts `lease_ms` from when it *sent* that
//! heartbeat, so its copy ends first. Lease expiry is proof 3 of the design brief ("the old
//! host's lease expired") only when all of these hold:
//!
//! - `now >= last grant + lease_ms + drift_margin_ms`; a new leader counts every lease as
//!   granted at the moment it was elected (it cannot know what its predecessor granted);
//! - the cluster's isolation response is `self-fence` (with `keep-running` the agent keeps its
//!   guests, so expiry proves nothing);
//! - the host has storage pools (an agent without pools cannot tell isolation from a monitor
//!   outage, so it never self-fences on expiry);
//! - this leader's leader record has been written on *every* pool of the host, without a
//!   failure, for at least one lease plus one storage interval: otherwise the isolated agent
//!   may have read a stale record, concluded that every monitor is down, and kept its guests.
//! - the agent was not seen alive-but-silent with a dead agent process: that is decided by the
//!   caller ([`crate::investigation`]); a host whose kernel answers but whose agent does not
//!   may still run its guests, and only power fencing proves anything then.

use std::collections::BTreeMap;

use vigil_common::config::{IsolationResponse, LeaseConfig};

/// Leader-local lease bookkeeping.
#[derive(Debug, Clone)]
pub struct LeaseBook {
    cfg: LeaseConfig,
    /// Storage interval (ms): how often agents read the leader record.
    storage_interval_ms: u64,
    /// When this monitor became leader (every lease counts as granted then).
    leader_since_ms: Option<u64>,
    /// Last grant per host.
    granted: BTreeMap<String, u64>,
    /// Per pool: since when the leader record has been written without a failure or a
    /// pause, and when it was last written.
    record_ok_since: BTreeMap<String, u64>,
    record_last_ok: BTreeMap<String, u64>,
}

impl LeaseBook {
    pub fn new(cfg: LeaseConfig, storage_interval_ms: u64) -> Self {
        LeaseBook {
            cfg,
            storage_interval_ms,
            leader_since_ms: None,
            granted: BTreeMap::new(),
            record_ok_since: BTreeMap::new(),
            record_last_ok: BTreeMap::new(),
        }
    }

    pub fn config(&self) -> &LeaseConfig {
        &self.cfg
    }

    /// This monitor became leader at `now_ms`: forget what it knew.
    pub fn became_leader(&mut self, now_ms: u64) {
        self.leader_since_ms = Some(now_ms);
        self.granted.clear();
        self.record_ok_since.clear();
        self.record_last_ok.clear();
    }

    pub fn lost_leadership(&mut self) {
        self.leader_since_ms = None;
        self.granted.clear();
        self.record_ok_since.clear();
        self.record_last_ok.clear();
    }

    /// A renewal granted to `host` now.
    pub fn grant(&mut self, host: &str, now_ms: u64) {
        self.granted.insert(host.to_string(), now_ms);
    }

    /// The leader record was written on `pool` (`ok`), or the attempt failed. A pause of
    /// more than three storage intervals (this monitor was stopped, or its storage thread
    /// stalled) starts the count again: agents that saw the record stop treat its return as a
    /// new start too.
    pub fn record_written(&mut self, pool: &str, ok: bool, now_ms: u64) {
        if !ok {
            self.record_ok_since.remove(pool);
            self.record_last_ok.remove(pool);
            return;
        }
        let paused = self
            .record_last_ok
            .get(pool)
            .is_some_and(|t| now_ms.saturating_sub(*t) > 3 * self.storage_interval_ms);
        if paused {
            self.record_ok_since.insert(pool.to_string(), now_ms);
        } else {
            self.record_ok_since
                .entry(pool.to_string())
                .or_insert(now_ms);
        }
        self.record_last_ok.insert(pool.to_string(), now_ms);
    }

    /// When `host`'s lease ends as far as this leader knows (grant + lease + margin).
    pub fn expires_at(&self, host: &str) -> Option<u64> {
        let since = self.leader_since_ms?;
        let last = self.granted.get(host).copied().unwrap_or(since).max(since);
        Some(last + self.cfg.duration_ms + self.cfg.drift_margin_ms)
    }

    /// `Ok(explanation)` if lease expiry is proof for `host` at `now_ms`, else `Err(why not)`.
    pub fn proof(&self, host: &str, pools: &[String], now_ms: u64) -> Result<String, String> {
        if self.cfg.isolation_response == IsolationResponse::KeepRunning {
            return Err("isolation response is keep-running: its agent keeps the guests".into());
        }
        if pools.is_empty() {
            return Err("the host has no storage pool: its agent cannot tell isolation from a monitor outage and keeps the guests".into());
        }
        let Some(expires) = self.expires_at(host) else {
            return Err("not leader".into());
        };
        let needed = self.cfg.duration_ms + self.storage_interval_ms;
        for p in pools {
            match self.record_ok_since.get(p) {
                Some(since) if now_ms.saturating_sub(*since) >= needed => {}
                Some(since) => {
                    return Err(format!(
                        "the leader record has been on pool {p} for {} ms only (needs {needed} ms)",
                        now_ms.saturating_sub(*since)
                    ))
                }
                None => {
                    return Err(format!(
                        "the leader record is not being written on pool {p}"
                    ))
                }
            }
        }
        if now_ms < expires {
            return Err(format!("lease runs for {} ms more", expires - now_ms));
        }
        let last = self.granted.get(host).copied();
        Ok(format!(
            "lease expired: {} (lease {} ms + drift margin {} ms); the leader record is fresh on {}, so its agent has fenced itself",
            match last {
                Some(t) => format!("last renewal granted {} ms ago", now_ms.saturating_sub(t)),
                None => "no renewal granted since this leader was elected".to_string(),
            },
            self.cfg.duration_ms,
            self.cfg.drift_margin_ms,
            pools.join(", ")
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn book() -> LeaseBook {
        let mut b = LeaseBook::new(
            LeaseConfig {
                duration_ms: 5_000,
                drift_margin_ms: 1_000,
                isolation_response: IsolationResponse::SelfFence,
            },
            500,
        );
        b.became_leader(0);
        b.record_written("p", true, 0);
        b
    }

    #[test]
    fn expiry_is_proof_only_after_lease_plus_margin_from_the_last_grant() {
        let mut b = book();
        b.grant("hv1", 10_000);
        let pools = vec!["p".to_string()];
        assert!(b.proof("hv1", &pools, 15_999).is_err());
        assert!(b.proof("hv1", &pools, 16_000).is_ok());
    }

    #[test]
    fn a_new_leader_counts_every_lease_as_granted_at_its_election() {
        let mut b = book();
        b.became_leader(20_000);
        b.record_written("p", true, 20_000);
        let pools = vec!["p".to_string()];
        assert!(b.proof("hv1", &pools, 25_999).is_err());
        assert!(b.proof("hv1", &pools, 26_000).is_ok());
    }

    #[test]
    fn no_proof_without_a_fresh_leader_record_on_every_pool() {
        let mut b = book();
        let pools = vec!["p".to_string(), "q".to_string()];
        let err = b.proof("hv1", &pools, 60_000).expect_err("q never written");
        assert!(err.contains("pool q"), "{err}");
        b.record_written("q", true, 58_000);
        assert!(
            b.proof("hv1", &pools, 60_000).is_err(),
            "q written too recently"
        );
        b.record_written("q", true, 59_000);
        assert!(b.proof("hv1", &pools, 63_500).is_ok());
        b.record_written("p", false, 63_600);
        assert!(b.proof("hv1", &pools, 63_700).is_err(), "p failed");
    }

    #[test]
    fn a_pause_in_writing_the_record_starts_the_count_again() {
        let mut b = book();
        let pools = vec!["p".to_string()];
        for t in (0..=10_000).step_by(500) {
            b.record_written("p", true, t);
        }
        assert!(b.proof("hv1", &pools, 10_000).is_ok());
        // Stopped for a minute (a paused monitor), then writing again.
        b.record_written("p", true, 70_000);
        let err = b.proof("hv1", &pools, 70_100).expect_err("pause");
        assert!(err.contains("for 100 ms only"), "{err}");
    }

    #[test]
    fn keep_running_or_no_pools_is_never_proof() {
        let mut b = book();
        assert!(b.proof("hv1", &[], 600_000).is_err());
        b.cfg.isolation_response = IsolationResponse::KeepRunning;
        assert!(b.proof("hv1", &["p".to_string()], 600_000).is_err());
    }
}
