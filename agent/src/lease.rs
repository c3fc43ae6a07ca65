//! The agent's lease: how long it may keep its HA guests running without hearing from the
//! monitors.
//!
//! Each heartbeat asks for a renewal; the leader answers with a grant for that heartbeat's
//! sequence number, and the lease then runs `lease_ms` from when the agent *sent* that
//! heartbeat, on this process's monotonic clock. The monitor counts from when it *granted*,
//! which is later, and adds a drift margin: the agent's copy always ends first, so when the
//! monitor takes lease expiry as proof the agent has already fenced itself.
//!
//! The lease survives an agent restart: its end is written to `state_dir/lease.json` as a
//! point on the system's boot clock (`/proc/uptime`, which does not restart with the process),
//! at most once a second. A stale file only makes the restarted agent's lease end *earlier*
//! than the real one, which is the safe direction. A restarted agent therefore keeps the
//! lease semantics of the process it replaces (CloudStack once restarted VMs elsewhere while
//! only the agent had stopped).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tracing::warn;
use vigil_common::config::IsolationResponse;

/// Lease duration assumed before the first grant (the monitor's default).
pub const DEFAULT_LEASE_MS: u64 = 5_000;

/// The lease as the isolation guard sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseStatus {
    /// Valid for this much longer.
    Valid { remaining: Duration },
    /// Ran out this long ago.
    Expired { ago: Duration },
}

#[derive(Debug, Serialize, Deserialize)]
struct OnDisk {
    /// End of the lease on the boot clock (ms since boot).
    expires_boot_ms: u64,
    lease_ms: u64,
    isolation_response: IsolationResponse,
}

#[derive(Debug)]
struct Inner {
    expires: Instant,
    lease_ms: u64,
    response: IsolationResponse,
    granted_once: bool,
    last_grant: Option<Instant>,
    persisted_at: Option<Instant>,
    heartbeat_interval_ms: u64,
}

/// Shared between the session (renewals) and the isolation guard (expiry).
#[derive(Debug, Clone)]
pub struct Lease {
    inner: Arc<Mutex<Inner>>,
    path: Option<PathBuf>,
}

/// Milliseconds since boot, from `/proc/uptime` (10 ms resolution).
fn boot_ms() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/uptime").ok()?;
    let secs: f64 = text.split_whitespace().next()?.parse().ok()?;
    Some((secs * 1000.0) as u64)
}

impl Lease {
    /// The lease of a new agent process: what the previous process persisted in `state_dir`
    /// (if it is still running on this boot), else a startup grace of one default lease from
    /// now, so that an agent that just started is not taken for an isolated one before its
    /// first connection completes.
    pub fn load(state_dir: &Path, now: Instant) -> Lease {
        let path = state_dir.join("lease.json");
        let mut inner = Inner {
            expires: now + Duration::from_millis(DEFAULT_LEASE_MS),
            lease_ms: DEFAULT_LEASE_MS,
            response: IsolationResponse::default(),
            granted_once: false,
            last_grant: None,
            persisted_at: None,
            heartbeat_interval_ms: 500,
        };
        match std::fs::read(&path) {
            Ok(bytes) => match serde_json::from_slice::<OnDisk>(&bytes) {
                Ok(d) => {
                    inner.lease_ms = d.lease_ms;
                    inner.response = d.isolation_response;
                    // Measured *after* reading, so the remaining time can only shrink.
                    let remaining = boot_ms()
                        .map(|b| d.expires_boot_ms.saturating_sub(b))
                        .unwrap_or(0);
                    inner.expires = now + Duration::from_millis(remaining);
                }
                Err(e) => {
                    warn!(path = %path.display(), error = %e, "ignoring an unreadable lease file; starting with a default lease")
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                warn!(path = %path.display(), error = %e, "cannot read the lease file; starting with a default lease")
            }
        }
        Lease {
            inner: Arc::new(Mutex::new(inner)),
            path: Some(path),
        }
    }

    /// A lease that is never persisted (tests, load generators).
    pub fn in_memory(now: Instant, lease_ms: u64) -> Lease {
        Lease {
            inner: Arc::new(Mutex::new(Inner {
                expires: now + Duration::from_millis(lease_ms),
                lease_ms,
                response: IsolationResponse::default(),
                granted_once: false,
                last_grant: None,
                persisted_at: None,
                heartbeat_interval_ms: 500,
            })),
            path: None,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A grant for a heartbeat sent at `sent_at`. Never shortens the lease.
    pub fn renew(&self, sent_at: Instant, lease_ms: u64) {
        let now = Instant::now();
        let persist = {
            let mut i = self.lock();
            let end = sent_at + Duration::from_millis(lease_ms);
            if end > i.expires {
                i.expires = end;
            }
            i.lease_ms = lease_ms;
            i.granted_once = true;
            i.last_grant = Some(now);
            let due = i
                .persisted_at
                .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1));
            if due {
                i.persisted_at = Some(now);
            }
            due.then(|| (i.expires, i.lease_ms, i.response))
        };
        if let Some((expires, lease_ms, response)) = persist {
            self.persist(now, expires, lease_ms, response);
        }
    }

    fn persist(&self, now: Instant, expires: Instant, lease_ms: u64, response: IsolationResponse) {
        let Some(path) = &self.path else { return };
        let Some(boot) = boot_ms() else { return };
        let remaining = expires.saturating_duration_since(now).as_millis() as u64;
        // /proc/uptime has 10 ms resolution: round down by two ticks.
        let d = OnDisk {
            expires_boot_ms: (boot + remaining).saturating_sub(20),
            lease_ms,
            isolation_response: response,
        };
        let tmp = path.with_extension("json.tmp");
        let write = || -> std::io::Result<()> {
            std::fs::write(&tmp, serde_json::to_vec(&d).unwrap_or_default())?;
            std::fs::rename(&tmp, path)
        };
        if let Err(e) = write() {
            warn!(path = %path.display(), error = %e, "cannot persist the lease");
        }
    }

    /// The isolation response the monitors configured (learned at each welcome).
    pub fn set_isolation_response(&self, r: IsolationResponse) {
        self.lock().response = r;
    }

    pub fn isolation_response(&self) -> IsolationResponse {
        self.lock().response
    }

    /// The duration of the latest grant (the default before any).
    pub fn lease_ms(&self) -> u64 {
        self.lock().lease_ms
    }

    /// Whether this process has been granted a lease at least once.
    pub fn granted_once(&self) -> bool {
        self.lock().granted_once
    }

    /// The heartbeat interval the monitor asked for (learned at each welcome).
    pub fn set_heartbeat_interval_ms(&self, ms: u64) {
        self.lock().heartbeat_interval_ms = ms;
    }

    pub fn heartbeat_interval_ms(&self) -> u64 {
        self.lock().heartbeat_interval_ms
    }

    /// When the last grant arrived.
    pub fn last_grant(&self) -> Option<Instant> {
        self.lock().last_grant
    }

    /// Whether a grant arrived within `window` before `now`.
    pub fn granted_within(&self, now: Instant, window: Duration) -> bool {
        self.lock()
            .last_grant
            .is_some_and(|t| now.saturating_duration_since(t) < window)
    }

    pub fn status(&self, now: Instant) -> LeaseStatus {
        let expires = self.lock().expires;
        if now < expires {
            LeaseStatus::Valid {
                remaining: expires - now,
            }
        } else {
            LeaseStatus::Expired { ago: now - expires }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_from_the_send_time_and_never_shrinks() {
        let t0 = Instant::now();
        let lease = Lease::in_memory(t0, 1_000);
        assert!(matches!(lease.status(t0), LeaseStatus::Valid { .. }));
        lease.renew(t0 + Duration::from_millis(500), 1_000);
        // Valid until 1500 ms after t0, measured from the send time.
        assert!(matches!(
            lease.status(t0 + Duration::from_millis(1_400)),
            LeaseStatus::Valid { .. }
        ));
        assert!(matches!(
            lease.status(t0 + Duration::from_millis(1_600)),
            LeaseStatus::Expired { .. }
        ));
        // A late grant for an older beat does not shorten it.
        lease.renew(t0 + Duration::from_millis(100), 1_000);
        assert!(matches!(
            lease.status(t0 + Duration::from_millis(1_400)),
            LeaseStatus::Valid { .. }
        ));
    }

    #[test]
    fn a_restarted_agent_keeps_the_remaining_lease_and_no_more() {
        let dir = tempfile::tempdir().expect("tempdir");
        let t0 = Instant::now();
        let lease = Lease::load(dir.path(), t0);
        assert!(!lease.granted_once());
        lease.set_isolation_response(IsolationResponse::KeepRunning);
        std::thread::sleep(Duration::from_millis(50));
        // Past the startup grace (one default lease from t0): this grant extends it.
        lease.renew(t0 + Duration::from_millis(DEFAULT_LEASE_MS + 1_000), 3_000);
        // The "next process" reads it back: valid, for at most what was granted.
        let t1 = Instant::now();
        let again = Lease::load(dir.path(), t1);
        match again.status(t1) {
            LeaseStatus::Valid { remaining } => {
                assert!(
                    remaining <= Duration::from_millis(DEFAULT_LEASE_MS + 4_000),
                    "{remaining:?}"
                )
            }
            other => panic!("expected a valid lease, got {other:?}"),
        }
        assert_eq!(again.lease_ms(), 3_000);
        assert!(matches!(
            again.status(t1 + Duration::from_millis(DEFAULT_LEASE_MS + 4_001)),
            LeaseStatus::Expired { .. }
        ));
    }

    #[test]
    fn an_expired_persisted_lease_stays_expired() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = OnDisk {
            expires_boot_ms: 1,
            lease_ms: 5_000,
            isolation_response: IsolationResponse::SelfFence,
        };
        std::fs::write(
            dir.path().join("lease.json"),
            serde_json::to_vec(&d).expect("json"),
        )
        .expect("write");
        let t = Instant::now();
        let lease = Lease::load(dir.path(), t);
        assert!(matches!(lease.status(t), LeaseStatus::Expired { .. }));
    }
}
