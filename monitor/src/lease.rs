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
//! - the host's agent reported an **armed host watchdog** (timeout W) in its heartbeats: a
//!   lease alone proves nothing when the agent is dead, hung or crash-looping, but the
//!   watchdog resets the host within W once the agent stops feeding it, and the agent stops
//!   feeding it as soon as its lease ran out and the record condemns it. A host without one is
//!   never proven by lease expiry: it waits for power fencing or its storage slot, loudly;
//! - this leader's record has **condemned the host on every pool** of the host, and
//!   `now >= max(lease end, condemned since + two storage intervals + drift margin) + W`:
//!   an agent fences itself (and stops feeding) only once it read a record that names it, so
//!   its last feed is at most that late, and the reset follows within W.

use std::collections::BTreeMap;

use vigil_common::config::{IsolationResponse, LeaseConfig};

use crate::state::HostProof;

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
    /// Per (pool, host): since when every record written there has condemned the host.
    condemned_since: BTreeMap<(String, String), u64>,
    /// Per host: the armed watchdog timeout its agent reported last (ms).
    watchdogs: BTreeMap<String, u64>,
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
            condemned_since: BTreeMap::new(),
            watchdogs: BTreeMap::new(),
        }
    }

    /// What `host`'s agent said of its watchdog in its latest heartbeat (`None`: none armed).
    pub fn watchdog(&mut self, host: &str, timeout_ms: Option<u64>) {
        match timeout_ms {
            Some(ms) if ms > 0 => match self.watchdogs.get_mut(host) {
                // In place when known: this runs on every heartbeat.
                Some(w) => *w = ms,
                None => {
                    self.watchdogs.insert(host.to_string(), ms);
                }
            },
            _ => {
                self.watchdogs.remove(host);
            }
        }
    }

    /// The armed watchdog timeout last reported by `host`'s agent.
    pub fn watchdog_ms(&self, host: &str) -> Option<u64> {
        self.watchdogs.get(host).copied()
    }

    pub fn config(&self) -> &LeaseConfig {
        &self.cfg
    }

    /// A new lease configuration (committed cluster settings). A running cluster only ever
    /// lengthens its lease (`vigil_common::settings::check_live_change`), so every lease
    /// granted before counts at least as long as it was granted for.
    pub fn set_config(&mut self, cfg: LeaseConfig) {
        self.cfg = cfg;
    }

    /// This monitor became leader at `now_ms`: forget what it knew.
    pub fn became_leader(&mut self, now_ms: u64) {
        self.leader_since_ms = Some(now_ms);
        self.forget();
    }

    pub fn lost_leadership(&mut self) {
        self.leader_since_ms = None;
        self.forget();
    }

    /// Watchdog reports are forgotten too: a new leader learns them from fresh heartbeats,
    /// and a host it never heard cannot be proven by lease expiry.
    fn forget(&mut self) {
        self.granted.clear();
        self.record_ok_since.clear();
        self.record_last_ok.clear();
        self.condemned_since.clear();
        self.watchdogs.clear();
    }

    /// A renewal granted to `host` now.
    pub fn grant(&mut self, host: &str, now_ms: u64) {
        // In place when known: this runs on every heartbeat, and a new key costs a String.
        match self.granted.get_mut(host) {
            Some(t) => *t = now_ms,
            None => {
                self.granted.insert(host.to_string(), now_ms);
            }
        }
    }

    /// The leader record was written on `pool` (`ok`), or the attempt failed. A pause of
    /// more than three storage intervals (this monitor was stopped, or its storage thread
    /// stalled) starts the count again: agents that saw the record stop treat its return as a
    /// new start too.
    pub fn record_written(&mut self, pool: &str, ok: bool, now_ms: u64) {
        self.record_condemning(pool, ok, &[], now_ms);
    }

    /// [`Self::record_written`], with the hosts the written record condemned.
    pub fn record_condemning(&mut self, pool: &str, ok: bool, condemned: &[String], now_ms: u64) {
        if ok {
            self.condemned_since
                .retain(|(p, h), _| p != pool || condemned.contains(h));
            for h in condemned {
                self.condemned_since
                    .entry((pool.to_string(), h.clone()))
                    .or_insert(now_ms);
            }
        } else {
            self.condemned_since.retain(|(p, _), _| p != pool);
        }
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
            for ((p, _), since) in self.condemned_since.iter_mut() {
                if p == pool {
                    *since = now_ms;
                }
            }
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

    /// Whether lease expiry can ever prove `host` off in this episode (the conditions that do
    /// not depend on time): `Err(why not)` names what is missing.
    pub fn usable(&self, host: &str, pools: &[String]) -> Result<u64, String> {
        if self.cfg.isolation_response == IsolationResponse::KeepRunning {
            return Err("isolation response is keep-running: its agent keeps the guests".into());
        }
        if pools.is_empty() {
            return Err("the host has no storage pool: its agent cannot tell isolation from a monitor outage and keeps the guests".into());
        }
        self.watchdog_ms(host).ok_or_else(|| {
            "its agent reported no armed host watchdog: nothing would reset the host if the agent is dead or hung, so lease expiry proves nothing there".to_string()
        })
    }

    /// `Ok(explanation)` if lease expiry is proof for `host` at `now_ms`, else `Err(why not)`.
    pub fn proof(&self, host: &str, pools: &[String], now_ms: u64) -> Result<HostProof, String> {
        let watchdog_ms = self.usable(host, pools)?;
        let Some(expires) = self.expires_at(host) else {
            return Err("not leader".into());
        };
        let needed = self.cfg.duration_ms + self.storage_interval_ms;
        let mut condemned_at = 0u64;
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
            match self.condemned_since.get(&(p.clone(), host.to_string())) {
                Some(t) => condemned_at = condemned_at.max(*t),
                None => {
                    return Err(format!(
                        "the leader record on pool {p} does not condemn the host yet"
                    ))
                }
            }
        }
        // The agent stops feeding once its lease ran out and it read a record naming it.
        let last_feed =
            expires.max(condemned_at + 2 * self.storage_interval_ms + self.cfg.drift_margin_ms);
        let proven_at = last_feed + watchdog_ms;
        if now_ms < proven_at {
            return Err(format!(
                "lease and host watchdog run for {} ms more",
                proven_at - now_ms
            ));
        }
        let last = self.granted.get(host).copied();
        let detail = format!(
            "{} (lease {} ms + drift margin {} ms), condemned on {} for {} ms, and its host watchdog ({} ms) has reset the host unless the agent fenced itself",
            match last {
                Some(t) => format!("last renewal granted {} ms ago", now_ms.saturating_sub(t)),
                None => "no renewal granted since this leader was elected".to_string(),
            },
            self.cfg.duration_ms,
            self.cfg.drift_margin_ms,
            pools.join(", "),
            now_ms.saturating_sub(condemned_at),
            watchdog_ms,
        );
        Ok(HostProof::LeaseExpired { detail })
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
        b.record_condemning("p", true, &hv1(), 0);
        b.watchdog("hv1", Some(2_000));
        b
    }

    fn hv1() -> Vec<String> {
        vec!["hv1".to_string()]
    }

    /// Lease expiry proves hv1 off (pool p) from `at_ms` on, and not a millisecond before.
    fn assert_proof_from(b: &LeaseBook, at_ms: u64) -> HostProof {
        let pools = vec!["p".to_string()];
        assert!(b.proof("hv1", &pools, at_ms - 1).is_err());
        b.proof("hv1", &pools, at_ms).expect("proof")
    }

    #[test]
    fn expiry_is_proof_only_after_lease_plus_margin_from_the_last_grant() {
        let mut b = book();
        b.grant("hv1", 10_000);
        // Lease + margin end at 16 s; the watchdog (2 s) after that.
        assert_proof_from(&b, 18_000);
    }

    #[test]
    fn a_new_leader_counts_every_lease_as_granted_at_its_election() {
        let mut b = book();
        b.became_leader(20_000);
        b.record_condemning("p", true, &hv1(), 20_000);
        b.watchdog("hv1", Some(2_000));
        assert_proof_from(&b, 28_000);
    }

    #[test]
    fn no_proof_without_a_fresh_leader_record_on_every_pool() {
        let mut b = book();
        let pools = vec!["p".to_string(), "q".to_string()];
        let err = b.proof("hv1", &pools, 60_000).expect_err("q never written");
        assert!(err.contains("pool q"), "{err}");
        b.record_condemning("q", true, &hv1(), 58_000);
        assert!(
            b.proof("hv1", &pools, 60_000).is_err(),
            "q written too recently"
        );
        b.record_condemning("q", true, &hv1(), 59_000);
        assert!(b.proof("hv1", &pools, 63_500).is_ok());
        b.record_written("p", false, 63_600);
        assert!(b.proof("hv1", &pools, 63_700).is_err(), "p failed");
    }

    #[test]
    fn a_pause_in_writing_the_record_starts_the_count_again() {
        let mut b = book();
        let pools = vec!["p".to_string()];
        for t in (0..=10_000).step_by(500) {
            b.record_condemning("p", true, &hv1(), t);
        }
        assert!(b.proof("hv1", &pools, 10_000).is_ok());
        // Stopped for a minute (a paused monitor), then writing again.
        b.record_condemning("p", true, &hv1(), 70_000);
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

    /// Issue 9 item 3: an agent that is dead for good (stopped, crash-looping) fences nothing
    /// when its lease runs out; without a watchdog that resets the host, expiry is no proof.
    /// Before the fix, lease + margin alone was proof.
    #[test]
    fn lease_expiry_taken_as_proof_while_nobody_enforces_it() {
        let mut b = book();
        b.watchdog("hv1", None);
        let pools = vec!["p".to_string()];
        let err = b.proof("hv1", &pools, 600_000).expect_err("no watchdog");
        assert!(err.contains("watchdog"), "{err}");
        assert!(b.usable("hv1", &pools).is_err());
        b.watchdog("hv1", Some(3_000));
        assert_eq!(b.usable("hv1", &pools), Ok(3_000));
        assert!(b.proof("hv1", &pools, 600_000).is_ok());
    }

    /// Issue 9 item 4: the agent fences itself only once a record names it, so the proof
    /// counts from when the record first condemned the host, plus the watchdog.
    #[test]
    fn lease_proof_counts_from_the_condemnation_plus_the_watchdog() {
        let mut b = book();
        let pools = vec!["p".to_string()];
        // Records every 500 ms: condemning until 30 s, not from 30 s, again from 40 s.
        for t in (500..=44_000).step_by(500) {
            let c = if (30_000..40_000).contains(&t) {
                vec![]
            } else {
                hv1()
            };
            b.record_condemning("p", true, &c, t);
            if t == 39_500 {
                let err = b.proof("hv1", &pools, t).expect_err("not condemned");
                assert!(err.contains("does not condemn"), "{err}");
            }
        }
        // 40 s + 2 intervals (1 s) + margin (1 s) + watchdog (2 s) = 44 s.
        let ok = assert_proof_from(&b, 44_000);
        let HostProof::LeaseExpired { detail } = &ok else {
            panic!("not a lease proof: {ok:?}");
        };
        assert!(detail.contains("watchdog"), "{ok}");
        assert!(ok.to_string().starts_with("lease expired: "), "{ok}");
    }
}
