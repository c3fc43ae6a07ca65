//! What the agent keeps about fencing between the guard, the session and restarts:
//!
//! - the newest Raft term it has seen (leader records), and the fence requests the monitors
//!   withdrew ([`vigil_common::storage::request_binds`] decides with both whether a request
//!   in the slot is obeyed);
//! - its self-fence reports not yet noted by a monitor, persisted in `state_dir/self-fence.json`
//!   (temporary file, `fsync`, `rename`, like `generations.json`), so that a report is never
//!   dropped: a full channel, a lost connection or a restarted agent only delays it. The
//!   session sends them on every (re)connect, before anything else, and again now and then,
//!   until the monitor answers `SelfFenceNoted`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};
use tracing::{error, warn};
use vigil_common::atomic_file::write_atomic;
use vigil_common::wire::AgentToMonitor;

/// How many withdrawn request ids are remembered.
const WITHDRAWN_REMEMBERED: usize = 64;

/// One self-fence report (one fencing episode).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SelfFenceReport {
    pub id: u64,
    pub reason: String,
    pub destroyed: Vec<String>,
    pub wall_ms: u64,
}

impl SelfFenceReport {
    pub fn message(&self) -> AgentToMonitor {
        AgentToMonitor::SelfFenced {
            id: self.id,
            reason: self.reason.clone(),
            destroyed: self.destroyed.clone(),
            wall_ms: self.wall_ms,
        }
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct OnDisk {
    pending: Vec<SelfFenceReport>,
}

#[derive(Debug, Default)]
struct Inner {
    newest_term: u64,
    withdrawn: BTreeSet<u64>,
    pending: Vec<SelfFenceReport>,
    last_id: u64,
}

/// Shared by the guard, the session and the runner. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Fencing {
    inner: Arc<Mutex<Inner>>,
    path: Option<PathBuf>,
}

impl Fencing {
    /// Loads the reports a previous agent process could not deliver. An unreadable file is
    /// moved aside (`self-fence.json.corrupt`) with an error: the agent must start anyway (a
    /// crash-looping agent protects nothing), and the file is kept for the operator.
    pub fn load(state_dir: &Path) -> Fencing {
        let path = state_dir.join("self-fence.json");
        let mut inner = Inner::default();
        match std::fs::read(&path) {
            Ok(bytes) => match serde_json::from_slice::<OnDisk>(&bytes) {
                Ok(d) => inner.pending = d.pending,
                Err(e) => {
                    let aside = state_dir.join("self-fence.json.corrupt");
                    error!(path = %path.display(), error = %e, aside = %aside.display(), "unreadable self-fence reports: moved aside, not sent");
                    let _ = std::fs::rename(&path, &aside);
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                error!(path = %path.display(), error = %e, "cannot read the self-fence reports")
            }
        }
        inner.last_id = inner.pending.iter().map(|r| r.id).max().unwrap_or(0);
        Fencing {
            inner: Arc::new(Mutex::new(inner)),
            path: Some(path),
        }
    }

    /// Never persisted (tests, load generators).
    pub fn in_memory() -> Fencing {
        Fencing {
            inner: Arc::new(Mutex::new(Inner::default())),
            path: None,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A Raft term seen in a leader record (or a welcome).
    pub fn note_term(&self, term: u64) {
        let mut inner = self.lock();
        inner.newest_term = inner.newest_term.max(term);
    }

    pub fn newest_term(&self) -> u64 {
        self.lock().newest_term
    }

    /// The monitors withdrew fence request `id`.
    pub fn withdraw(&self, id: u64) {
        let mut inner = self.lock();
        inner.withdrawn.insert(id);
        while inner.withdrawn.len() > WITHDRAWN_REMEMBERED {
            if let Some(oldest) = inner.withdrawn.iter().next().copied() {
                inner.withdrawn.remove(&oldest);
            }
        }
    }

    pub fn withdrawn(&self) -> BTreeSet<u64> {
        self.lock().withdrawn.clone()
    }

    /// A new episode id: unique and increasing for this host (the wall clock in ms, made
    /// larger than any id still pending).
    pub fn next_id(&self) -> u64 {
        let mut inner = self.lock();
        let id = vigil_common::unix_ms().max(inner.last_id + 1);
        inner.last_id = id;
        id
    }

    /// Records (or updates, same id) a report and persists it before returning.
    pub fn record(&self, report: SelfFenceReport) {
        let snapshot = {
            let mut inner = self.lock();
            inner.last_id = inner.last_id.max(report.id);
            match inner.pending.iter_mut().find(|r| r.id == report.id) {
                Some(r) => *r = report,
                None => inner.pending.push(report),
            }
            inner.pending.clone()
        };
        self.persist(snapshot);
    }

    /// The monitor noted report `id`: no more resending.
    pub fn noted(&self, id: u64) {
        let snapshot = {
            let mut inner = self.lock();
            let before = inner.pending.len();
            inner.pending.retain(|r| r.id != id);
            if inner.pending.len() == before {
                return;
            }
            inner.pending.clone()
        };
        self.persist(snapshot);
    }

    /// Reports not yet noted, oldest first.
    pub fn pending(&self) -> Vec<SelfFenceReport> {
        self.lock().pending.clone()
    }

    fn persist(&self, pending: Vec<SelfFenceReport>) {
        let Some(path) = &self.path else { return };
        if let Err(e) = write_atomically(path, &OnDisk { pending }) {
            // Kept in memory and resent anyway; only a restart before delivery loses it.
            warn!(path = %path.display(), error = %e, "cannot persist the self-fence reports");
        }
    }
}

fn write_atomically(path: &Path, data: &OnDisk) -> std::io::Result<()> {
    let bytes = serde_json::to_vec(data).map_err(std::io::Error::other)?;
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    write_atomic(path, &bytes).map_err(std::io::Error::other)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(id: u64, destroyed: &[&str]) -> SelfFenceReport {
        SelfFenceReport {
            id,
            reason: "lease expired".into(),
            destroyed: destroyed.iter().map(|s| s.to_string()).collect(),
            wall_ms: 1,
        }
    }

    #[test]
    fn a_self_fence_report_survives_a_restart_until_noted() {
        let dir = tempfile::tempdir().expect("tmp");
        let f = Fencing::load(dir.path());
        f.record(report(5, &["u1"]));
        // Same episode, one more domain: updated, not duplicated.
        f.record(report(5, &["u1", "u2"]));
        drop(f);
        let f = Fencing::load(dir.path());
        assert_eq!(f.pending(), vec![report(5, &["u1", "u2"])]);
        assert!(f.next_id() > 5);
        f.noted(5);
        drop(f);
        assert_eq!(Fencing::load(dir.path()).pending(), vec![]);
    }

    #[test]
    fn an_unreadable_report_file_is_moved_aside_not_fatal() {
        let dir = tempfile::tempdir().expect("tmp");
        std::fs::write(dir.path().join("self-fence.json"), b"{nope").expect("write");
        let f = Fencing::load(dir.path());
        assert_eq!(f.pending(), vec![]);
        assert!(dir.path().join("self-fence.json.corrupt").exists());
    }
}
