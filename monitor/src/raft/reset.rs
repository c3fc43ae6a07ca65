//! Bringing back a monitor whose database is gone or damaged, under the same node id
//! (`vigil-monitor --reset` on it, then `vigilctl server reset N` against the leader).
//!
//! Why the order matters. A monitor that comes back with an empty log while the leader still
//! counts it as a member is the one thing Raft cannot survive:
//! - its vote: it may have acknowledged an entry that only it and the old leader hold. Empty,
//!   it would vote for a monitor that lacks that entry, and a committed entry is lost;
//! - its replication progress: openraft 0.9 asserts (debug builds panic, on the leader)
//!   that a follower's log never goes back ("follower log reversion is not allowed"), and
//!   in a release build the leader keeps believing the follower holds entries it does not.
//!
//! So a reset monitor says nothing in Raft until the leader has forgotten it:
//! 1. `--reset` moves the old file aside (never deleted: `raft.redb.reset-<unix ms>`),
//!    writes [`MARKER`] and starts with an empty database. While the marker exists, the
//!    Raft server answers every AppendEntries, Vote and InstallSnapshot with a refusal
//!    ([`ResetGate`]); a restart keeps the marker and so the silence.
//! 2. `vigilctl server reset N` on the leader asks N whether it waits for a reset
//!    ([`ResetStep::Probe`]), removes N from the membership (committed: the monitors that
//!    committed it hold every committed entry, and the leader drops N's progress), then
//!    re-admits N ([`ResetStep::Admit`]: the marker goes) and adds it back as a learner,
//!    waits until it has caught up, and makes it a voter.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// The marker file, in `data_dir`, of a monitor that waits to be re-admitted.
pub const MARKER: &str = "reset-pending";

/// What the leader asks a monitor during `server reset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ResetStep {
    /// Does it wait for a reset? Changes nothing.
    Probe,
    /// The leader removed it from the membership: it may take Raft messages again (it is
    /// added back as a learner next).
    Admit,
}

/// The request, with the node it claims to come from (checked against the certificate).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResetRequest {
    pub from: u64,
    pub step: ResetStep,
}

/// The answer: whether it was waiting for a reset when the request arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResetReply {
    pub waiting: bool,
}

/// Whether this monitor waits to be re-admitted (shared by the Raft server and the start-up).
#[derive(Debug, Clone)]
pub struct ResetGate {
    waiting: Arc<AtomicBool>,
    marker: PathBuf,
}

impl ResetGate {
    /// The gate of `data_dir`: waiting while its marker exists.
    pub fn load(data_dir: &Path) -> ResetGate {
        let marker = data_dir.join(MARKER);
        ResetGate {
            waiting: Arc::new(AtomicBool::new(marker.exists())),
            marker,
        }
    }

    /// A gate that never waits (tests, and monitors without a data directory of their own).
    pub fn open() -> ResetGate {
        ResetGate {
            waiting: Arc::new(AtomicBool::new(false)),
            marker: PathBuf::new(),
        }
    }

    pub fn is_waiting(&self) -> bool {
        self.waiting.load(Ordering::SeqCst)
    }

    /// Answers `step`; on [`ResetStep::Admit`] the marker is removed (and the removal made
    /// durable) before the gate opens.
    pub fn answer(&self, step: ResetStep) -> io::Result<ResetReply> {
        let waiting = self.is_waiting();
        if step == ResetStep::Admit && waiting {
            match std::fs::remove_file(&self.marker) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
            if let Some(dir) = self.marker.parent() {
                std::fs::File::open(dir)?.sync_all()?;
            }
            self.waiting.store(false, Ordering::SeqCst);
        }
        Ok(ResetReply { waiting })
    }

    /// Why a Raft message from `peer` is refused now, if it is.
    pub fn refusal(&self, node_id: u64) -> Option<String> {
        self.is_waiting().then(|| {
            format!(
                "mon{node_id} was reset (`vigil-monitor --reset`) and takes no Raft message until \
                 the leader re-admits it: run `vigilctl server reset {node_id}` against the leader"
            )
        })
    }
}

/// Step 1 on the monitor being reset: moves `data_dir/db_name` aside if it exists (returns
/// where), then writes the marker durably. Nothing is deleted.
pub fn begin(data_dir: &Path, db_name: &str, now_ms: u64) -> io::Result<Option<PathBuf>> {
    std::fs::create_dir_all(data_dir)?;
    let db = data_dir.join(db_name);
    let moved = if db.exists() {
        let aside = data_dir.join(format!("{db_name}.reset-{now_ms}"));
        if aside.exists() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists already", aside.display()),
            ));
        }
        std::fs::rename(&db, &aside)?;
        Some(aside)
    } else {
        None
    };
    let marker = data_dir.join(MARKER);
    let mut f = std::fs::File::create(&marker)?;
    writeln!(
        f,
        "This monitor was reset (vigil-monitor --reset) and waits for the leader to re-admit it \
         (vigilctl server reset <node id>). Do not remove this file by hand."
    )?;
    f.sync_all()?;
    std::fs::File::open(data_dir)?.sync_all()?;
    Ok(moved)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn begin_keeps_the_old_file_and_the_gate_waits_until_admitted() {
        let d = tempfile::tempdir().expect("tempdir");
        std::fs::write(d.path().join("raft.redb"), b"old").expect("write");
        let aside = begin(d.path(), "raft.redb", 42)
            .expect("begin")
            .expect("moved");
        assert_eq!(std::fs::read(&aside).expect("aside"), b"old");
        assert!(!d.path().join("raft.redb").exists());

        let gate = ResetGate::load(d.path());
        assert!(gate
            .refusal(3)
            .is_some_and(|r| r.contains("server reset 3")));
        assert_eq!(
            gate.answer(ResetStep::Probe).expect("probe"),
            ResetReply { waiting: true }
        );
        assert!(gate.is_waiting(), "a probe changes nothing");
        // A restart before the admission still waits.
        assert!(ResetGate::load(d.path()).is_waiting());

        assert_eq!(
            gate.answer(ResetStep::Admit).expect("admit"),
            ResetReply { waiting: true }
        );
        assert!(!gate.is_waiting() && gate.refusal(3).is_none());
        assert!(
            !ResetGate::load(d.path()).is_waiting(),
            "admission is durable"
        );
        assert_eq!(
            gate.answer(ResetStep::Admit).expect("again"),
            ResetReply { waiting: false }
        );
    }

    #[test]
    fn a_second_reset_keeps_both_old_files() {
        let d = tempfile::tempdir().expect("tempdir");
        std::fs::write(d.path().join("raft.redb"), b"one").expect("write");
        begin(d.path(), "raft.redb", 1).expect("first");
        std::fs::write(d.path().join("raft.redb"), b"two").expect("write");
        begin(d.path(), "raft.redb", 2).expect("second");
        assert_eq!(
            std::fs::read(d.path().join("raft.redb.reset-1")).expect("1"),
            b"one"
        );
        assert_eq!(
            std::fs::read(d.path().join("raft.redb.reset-2")).expect("2"),
            b"two"
        );
        assert!(begin(d.path(), "raft.redb", 3)
            .expect("nothing to move")
            .is_none());
    }
}
