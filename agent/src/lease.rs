//! The agent's lease: how long it may keep its HA guests running without hearing from the
//! monitors.
//!
//! Each heartbeat asks for a renewal; the leader answers with a grant for that heartbeat's
//! sequence number, and the lease then runs `lease_ms` from when the agent *sent* that
//! heartbeat, on this process's monotonic clock. The monitor counts from when it *granted*,
//! which is later, and adds a drift margin: the agent's copy always ends first, so when the
//! monitor takes lease expiry as proof the agent has already fenced itself.
//!
//! The lease survives an agent restart, and only that: its end is written to
//! `state_dir/lease.json` (temporary file, fsync, rename, fsync of the directory) at most once
//! a second, as a point on `CLOCK_BOOTTIME` together with the kernel's boot id
//! (`/proc/sys/kernel/random/boot_id`). A lease written during another boot is void (a
//! rebooted host starts with its lease expired), and a stale file only makes the restarted
//! agent's lease end *earlier* than the real one, which is the safe direction. A restarted
//! agent therefore keeps the lease semantics of the process it replaces (CloudStack once
//! restarted VMs elsewhere while only the agent had stopped), and never more.
//!
//! A new process without a lease from this boot starts with its lease **expired**: a grace of
//! any fixed length could outlast what the monitor counts for this host (it counts from its
//! last grant, or from its election), and an expired lease destroys nothing by itself — the
//! agent fences itself only when the monitors condemn it (`vigil_common::isolation`).
//!
//! The file is written by a thread of its own ([`Persister`]), never on the session's task:
//! a local disk that stalls an fsync must not stall heartbeats and renewals (a hung state
//! disk would otherwise silence the host and get it fenced). A write that lags only leaves an
//! older, earlier-ending lease on disk, the safe direction; the thread writes the newest
//! pending lease and skips older ones.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tracing::warn;
use vigil_common::atomic_file::{write_atomic, AtomicWriteError};
use vigil_common::config::IsolationResponse;

pub use vigil_common::isolation::LeaseStatus;

/// Lease duration assumed before the first grant (the monitor's default).
pub const DEFAULT_LEASE_MS: u64 = 5_000;

/// A point on the boot clock: which boot, and how long since it (`CLOCK_BOOTTIME`, which
/// counts suspend too and never goes back).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootClock {
    pub boot_id: String,
    pub now_ms: u64,
}

impl BootClock {
    /// This kernel's boot id and `CLOCK_BOOTTIME`.
    pub fn read() -> Option<BootClock> {
        let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .ok()?
            .trim()
            .to_string();
        if boot_id.is_empty() {
            return None;
        }
        let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME).ok()?;
        let now_ms =
            u64::try_from(ts.tv_sec()).ok()? * 1000 + u64::try_from(ts.tv_nsec()).ok()? / 1_000_000;
        Some(BootClock { boot_id, now_ms })
    }
}

/// Where the boot clock comes from (injectable: the lab's hosts share one kernel).
pub type BootSource = Arc<dyn Fn() -> Option<BootClock> + Send + Sync>;

#[derive(Debug, Serialize, Deserialize)]
struct OnDisk {
    /// The boot the lease was written in; a lease from another boot is void.
    #[serde(default)]
    boot_id: String,
    /// End of the lease on `CLOCK_BOOTTIME` (ms since that boot).
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
    /// When a monitor last answered but could not manage this agent, and why
    /// ([`crate::session::SessionError::unmanaged_reason`]).
    unmanaged: Option<(Instant, String)>,
}

/// How the persister writes a file (injectable: tests stand in a disk that hangs).
pub type WriteFn = Arc<dyn Fn(&Path, &[u8]) -> Result<(), AtomicWriteError> + Send + Sync>;

enum PersistMsg {
    Write(Vec<u8>),
    /// Answered once every write sent before it is done.
    Flush(std::sync::mpsc::Sender<()>),
}

/// Writes `lease.json` on a dedicated thread, newest first (see the module docs). The thread
/// ends when the last [`Lease`] handle is dropped.
#[derive(Clone)]
struct Persister {
    tx: std::sync::mpsc::Sender<PersistMsg>,
}

/// A write slower than this is logged (after it finished: it cannot be cancelled).
const SLOW_WRITE: Duration = Duration::from_secs(2);

impl Persister {
    fn spawn(path: PathBuf, write: WriteFn) -> Option<Persister> {
        let (tx, rx) = std::sync::mpsc::channel::<PersistMsg>();
        let spawned = std::thread::Builder::new()
            .name("lease-writer".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    // Newest write wins; flushes are answered after it.
                    let mut newest = None;
                    let mut flushes = Vec::new();
                    for msg in std::iter::once(first).chain(rx.try_iter()) {
                        match msg {
                            PersistMsg::Write(b) => newest = Some(b),
                            PersistMsg::Flush(done) => flushes.push(done),
                        }
                    }
                    if let Some(bytes) = newest {
                        let t = Instant::now();
                        if let Err(e) = write(&path, &bytes) {
                            warn!(path = %path.display(), error = %e, "cannot persist the lease");
                        }
                        if t.elapsed() > SLOW_WRITE {
                            warn!(path = %path.display(), took_ms = t.elapsed().as_millis() as u64, "persisting the lease was slow: is the state disk healthy?");
                        }
                    }
                    for done in flushes {
                        let _ = done.send(());
                    }
                }
            });
        match spawned {
            Ok(_) => Some(Persister { tx }),
            Err(e) => {
                warn!(error = %e, "cannot start the lease writer thread: the lease is not persisted (a restarted agent starts with an expired lease)");
                None
            }
        }
    }
}

/// Shared between the session (renewals) and the isolation guard (expiry).
#[derive(Clone)]
pub struct Lease {
    inner: Arc<Mutex<Inner>>,
    path: Option<PathBuf>,
    boot: BootSource,
    persister: Option<Persister>,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("inner", &self.inner)
            .field("path", &self.path)
            .finish()
    }
}

impl Lease {
    /// The lease of a new agent process: what the previous process persisted in `state_dir`
    /// if it was written during this boot, else expired (see the module docs).
    pub fn load(state_dir: &Path, now: Instant) -> Lease {
        Lease::load_with(state_dir, now, Arc::new(BootClock::read))
    }

    /// [`Lease::load`] with another boot clock (tests simulate a reboot with it).
    pub fn load_with(state_dir: &Path, now: Instant, boot: BootSource) -> Lease {
        Lease::load_with_writer(state_dir, now, boot, Arc::new(write_atomic))
    }

    fn load_with_writer(state_dir: &Path, now: Instant, boot: BootSource, write: WriteFn) -> Lease {
        let path = state_dir.join("lease.json");
        let mut inner = Inner {
            expires: now,
            lease_ms: DEFAULT_LEASE_MS,
            response: IsolationResponse::default(),
            granted_once: false,
            last_grant: None,
            persisted_at: None,
            heartbeat_interval_ms: 500,
            unmanaged: None,
        };
        match std::fs::read(&path) {
            Ok(bytes) => match serde_json::from_slice::<OnDisk>(&bytes) {
                Ok(d) => {
                    inner.lease_ms = d.lease_ms;
                    inner.response = d.isolation_response;
                    // Measured *after* reading, so the remaining time can only shrink.
                    let remaining = match boot() {
                        Some(b) if b.boot_id == d.boot_id => {
                            d.expires_boot_ms.saturating_sub(b.now_ms)
                        }
                        Some(_) => {
                            warn!(path = %path.display(), "the persisted lease is from another boot: void, starting with an expired lease");
                            0
                        }
                        None => {
                            warn!(path = %path.display(), "cannot read the boot clock: treating the persisted lease as expired");
                            0
                        }
                    };
                    inner.expires = now + Duration::from_millis(remaining);
                }
                Err(e) => {
                    warn!(path = %path.display(), error = %e, "ignoring an unreadable lease file; starting with an expired lease")
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                warn!(path = %path.display(), error = %e, "cannot read the lease file; starting with an expired lease")
            }
        }
        Lease {
            inner: Arc::new(Mutex::new(inner)),
            persister: Persister::spawn(path.clone(), write),
            path: Some(path),
            boot,
        }
    }

    /// Waits until every lease persisted so far is on disk, or `within` passed (returns
    /// whether it was). For shutdown and tests.
    pub fn flush(&self, within: Duration) -> bool {
        let Some(p) = &self.persister else {
            return true;
        };
        let (tx, rx) = std::sync::mpsc::channel();
        if p.tx.send(PersistMsg::Flush(tx)).is_err() {
            return false;
        }
        rx.recv_timeout(within).is_ok()
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
                unmanaged: None,
            })),
            path: None,
            boot: Arc::new(BootClock::read),
            persister: None,
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
        let Some(boot) = (self.boot)() else {
            warn!("cannot read the boot clock: the lease is not persisted (a restarted agent starts with an expired lease)");
            return;
        };
        let remaining = expires.saturating_duration_since(now).as_millis() as u64;
        let d = OnDisk {
            boot_id: boot.boot_id,
            // Rounded down: the clocks were read a moment apart.
            expires_boot_ms: (boot.now_ms + remaining).saturating_sub(2),
            lease_ms,
            isolation_response: response,
        };
        let Some(p) = &self.persister else { return };
        match serde_json::to_vec(&d) {
            Ok(bytes) => {
                let _ = p.tx.send(PersistMsg::Write(bytes));
            }
            Err(e) => warn!(path = %path.display(), error = %e, "cannot encode the lease"),
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

    /// A monitor answered at `at` but cannot manage this agent (`why`): the monitors treat
    /// the host as alive and never condemn it for it.
    pub fn note_unmanaged(&self, at: Instant, why: String) {
        self.lock().unmanaged = Some((at, why));
    }

    /// Why a monitor answered without being able to manage this agent, if it did within
    /// `window` before `now`.
    pub fn unmanaged_within(&self, now: Instant, window: Duration) -> Option<String> {
        self.lock()
            .unmanaged
            .as_ref()
            .filter(|(t, _)| now.saturating_duration_since(*t) < window)
            .map(|(_, why)| why.clone())
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
        assert!(lease.flush(Duration::from_secs(10)));
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
            boot_id: BootClock::read().expect("boot clock").boot_id,
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

    fn fixed_boot(id: &'static str, offset_ms: u64) -> BootSource {
        Arc::new(move || {
            let real = BootClock::read()?;
            Some(BootClock {
                boot_id: id.to_string(),
                now_ms: real.now_ms + offset_ms,
            })
        })
    }

    /// Issue 9 item 2: a lease persisted during one boot must not keep the guests of the
    /// next boot. Before the fix, the persisted end was compared with the new boot's uptime.
    #[test]
    fn a_lease_that_survives_a_reboot_is_void() {
        let dir = tempfile::tempdir().expect("tempdir");
        let t0 = Instant::now();
        // Boot "a", an hour in: a 30 s grant is persisted.
        let lease = Lease::load_with(dir.path(), t0, fixed_boot("boot-a", 3_600_000));
        lease.renew(Instant::now(), 30_000);
        assert!(lease.flush(Duration::from_secs(10)));
        // The same boot: the restarted agent keeps it.
        let t1 = Instant::now();
        let same = Lease::load_with(dir.path(), t1, fixed_boot("boot-a", 3_600_000));
        assert!(
            matches!(same.status(t1), LeaseStatus::Valid { .. }),
            "{:?}",
            same.status(t1)
        );
        // Another boot whose uptime is *smaller* than the persisted end (a quick reboot):
        // void all the same.
        let other = Lease::load_with(dir.path(), t1, fixed_boot("boot-b", 0));
        assert!(
            matches!(other.status(t1), LeaseStatus::Expired { .. }),
            "{:?}",
            other.status(t1)
        );
        // A file from before boot ids (no boot_id field) is void too.
        std::fs::write(
            dir.path().join("lease.json"),
            br#"{"expires_boot_ms":99999999999,"lease_ms":5000,"isolation_response":"self-fence"}"#,
        )
        .expect("write");
        let old = Lease::load_with(dir.path(), t1, fixed_boot("boot-a", 0));
        assert!(matches!(old.status(t1), LeaseStatus::Expired { .. }));
    }

    /// The lease file was written (fsync and all) on the session's task: a state disk that
    /// stalls stalled renewals and heartbeats with it. Before the fix, `renew` below never
    /// returned while the disk hung.
    #[test]
    fn a_hung_state_disk_does_not_stall_lease_renewals() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let release_rx = Mutex::new(release_rx);
        let writes = Arc::new(Mutex::new(Vec::<Vec<u8>>::new()));
        let seen = writes.clone();
        // The first write hangs until released, as an fsync on a stuck disk does.
        let hung: WriteFn = Arc::new(move |path, bytes| {
            let _ = release_rx.lock().unwrap_or_else(|e| e.into_inner()).recv();
            seen.lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(bytes.to_vec());
            write_atomic(path, bytes)
        });
        let t0 = Instant::now();
        let lease = Lease::load_with_writer(dir.path(), t0, Arc::new(BootClock::read), hung);
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let l = lease.clone();
        std::thread::spawn(move || {
            l.renew(Instant::now(), 10_000);
            // Past the once-a-second limit: a second persist while the first still hangs.
            std::thread::sleep(Duration::from_millis(1_100));
            l.renew(Instant::now(), 20_000);
            let _ = done_tx.send(());
        });
        assert!(
            done_rx.recv_timeout(Duration::from_secs(30)).is_ok(),
            "renewals blocked behind a hung write of the lease file"
        );
        assert!(matches!(
            lease.status(Instant::now()),
            LeaseStatus::Valid { .. }
        ));
        assert!(
            !lease.flush(Duration::from_millis(200)),
            "the disk still hangs"
        );
        // The disk recovers: the newest lease (20 s) ends up on disk.
        release_tx.send(()).expect("release");
        release_tx.send(()).expect("release");
        assert!(lease.flush(Duration::from_secs(30)));
        let again = Lease::load(dir.path(), Instant::now());
        assert_eq!(again.lease_ms(), 20_000);
        assert!(writes.lock().unwrap_or_else(|e| e.into_inner()).len() <= 2);
    }

    /// Issue 9 item 7: a new agent without a lease from this boot must not grant itself a
    /// hard-coded grace (5 s before the fix) that can outlast the lease the monitor counts.
    #[test]
    fn the_grace_of_a_new_agent_is_never_longer_than_its_lease() {
        let dir = tempfile::tempdir().expect("tempdir");
        let t = Instant::now();
        let fresh = Lease::load(dir.path(), t);
        assert!(
            matches!(fresh.status(t), LeaseStatus::Expired { .. }),
            "{:?}",
            fresh.status(t)
        );
        // With a 1 s lease persisted by the previous process, the new one has at most 1 s.
        let prev = Lease::load(dir.path(), t);
        prev.renew(Instant::now(), 1_000);
        let t2 = Instant::now();
        let next = Lease::load(dir.path(), t2);
        assert!(matches!(
            next.status(t2 + Duration::from_millis(1_001)),
            LeaseStatus::Expired { .. }
        ));
    }
}
