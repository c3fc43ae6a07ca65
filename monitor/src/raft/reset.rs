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
//!
//! A monitor started with `--join` on an empty data directory waits the same way
//! ([`begin_join`]). A new monitor cannot be told from a member whose files were deleted by
//! hand and that was started with `--join` (the mistake this closes: empty, such a member
//! granted votes, and a committed entry could be lost). Only an explicit act lets it speak:
//! - `vigilctl server add N ADDR` admits it, and only while N is no member (a member in
//!   that state needs `server reset N`, which removes it first);
//! - at a cluster's formation, the monitor started with `--init` admits the monitors its
//!   `[raft] peers` names ([`FORMATION`]: kept in its data directory until each one has
//!   answered, so a restart resumes it).

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// The marker file, in `data_dir`, of a monitor that waits to be re-admitted.
pub const MARKER: &str = "reset-pending";

/// The file, in the `--init` monitor's `data_dir`, of the `[raft] peers` it has still to
/// admit (one `ID ADDR` line each).
pub const FORMATION: &str = "admit-peers";

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
                "mon{node_id} started empty (`--join` or `--reset`) and takes no Raft message \
                 until the leader admits it: `vigilctl server add {node_id} ADDR` for a new \
                 monitor, `vigilctl server reset {node_id}` for a member whose database was lost"
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

/// `--join` on a data directory with no database: writes the marker durably (before the
/// database is created, so a crash in between leaves a waiting monitor, never a voting one).
pub fn begin_join(data_dir: &Path) -> io::Result<()> {
    std::fs::create_dir_all(data_dir)?;
    let mut f = std::fs::File::create(data_dir.join(MARKER))?;
    writeln!(
        f,
        "This monitor was started with --join on an empty data directory and waits for the \
         leader to admit it (vigilctl server add <node id> <addr>; vigilctl server reset <node \
         id> if it was a member whose files were lost). Do not remove this file by hand."
    )?;
    f.sync_all()?;
    std::fs::File::open(data_dir)?.sync_all()
}

/// `--init` with `[raft] peers`: records the peers to admit, durably.
pub fn write_formation(data_dir: &Path, peers: &[(u64, String)]) -> io::Result<()> {
    std::fs::create_dir_all(data_dir)?;
    let path = data_dir.join(FORMATION);
    if peers.is_empty() {
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        }
    } else {
        let tmp = data_dir.join(format!("{FORMATION}.tmp"));
        let mut f = std::fs::File::create(&tmp)?;
        for (id, addr) in peers {
            writeln!(f, "{id} {addr}")?;
        }
        f.sync_all()?;
        std::fs::rename(&tmp, &path)?;
    }
    std::fs::File::open(data_dir)?.sync_all()
}

/// The peers the `--init` monitor has still to admit (none without the file). A line that
/// does not read as `ID ADDR` is an error naming it.
pub fn read_formation(data_dir: &Path) -> io::Result<Vec<(u64, String)>> {
    let path = data_dir.join(FORMATION);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let mut parts = l.split_whitespace();
            match (
                parts.next().and_then(|id| id.parse::<u64>().ok()),
                parts.next(),
                parts.next(),
            ) {
                (Some(id), Some(addr), None) => Ok((id, addr.to_string())),
                _ => Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}: line {l:?} is not `ID ADDR`", path.display()),
                )),
            }
        })
        .collect()
}

/// The `--init` monitor's side of a formation: admits each peer in [`FORMATION`] until it
/// has answered (a peer not started yet is tried again every 500 ms), removing it from the
/// file as it does. Ends when none is left, or at `stop`.
pub async fn admit_formation_peers(
    endpoint: super::quic::RaftEndpoint,
    data_dir: PathBuf,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        let mut left = match read_formation(&data_dir) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the peers to admit; remove the file and admit them with `vigilctl server reset ID --addr ADDR`");
                return;
            }
        };
        if left.is_empty() {
            return;
        }
        let before = left.len();
        let mut i = 0;
        while i < left.len() {
            let (id, addr) = left[i].clone();
            match endpoint
                .reset_step(
                    id,
                    &addr,
                    ResetStep::Admit,
                    std::time::Duration::from_secs(2),
                )
                .await
            {
                Ok(reply) => {
                    tracing::info!(
                        peer = id,
                        %addr,
                        was_waiting = reply.waiting,
                        "formation: [raft] peer admitted"
                    );
                    left.remove(i);
                }
                Err(e) => {
                    tracing::debug!(peer = id, %addr, error = %e, "formation: peer not admitted yet");
                    i += 1;
                }
            }
        }
        if left.len() != before {
            if let Err(e) = write_formation(&data_dir, &left) {
                tracing::warn!(error = %e, "cannot update the peers to admit");
            }
        }
        if left.is_empty() {
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_millis(500)) => {}
            _ = stop.changed() => return,
        }
    }
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
    fn a_monitor_joining_on_an_empty_data_directory_waits_to_be_admitted() {
        let d = tempfile::tempdir().expect("tempdir");
        let dir = d.path().join("data");
        begin_join(&dir).expect("begin_join");
        let gate = ResetGate::load(&dir);
        let why = gate.refusal(3).expect("a joining monitor waits");
        assert!(
            why.contains("server add 3") && why.contains("server reset 3"),
            "{why}"
        );
        assert!(ResetGate::load(&dir).is_waiting(), "after a restart too");
        assert!(gate.answer(ResetStep::Admit).expect("admit").waiting);
        assert!(!ResetGate::load(&dir).is_waiting());
    }

    #[test]
    fn the_formation_list_survives_a_restart_and_names_a_bad_line() {
        let d = tempfile::tempdir().expect("tempdir");
        assert!(read_formation(d.path()).expect("none").is_empty());
        let peers = vec![
            (2, "10.0.0.2:7441".to_string()),
            (3, "mon3:7441".to_string()),
        ];
        write_formation(d.path(), &peers).expect("write");
        assert_eq!(read_formation(d.path()).expect("read"), peers);
        write_formation(d.path(), &peers[1..]).expect("one admitted");
        assert_eq!(read_formation(d.path()).expect("read"), peers[1..].to_vec());
        write_formation(d.path(), &[]).expect("all admitted");
        assert!(!d.path().join(FORMATION).exists());
        std::fs::write(d.path().join(FORMATION), "2 a:1\nthree b:1\n").expect("write");
        let e = read_formation(d.path()).expect_err("bad line");
        assert!(e.to_string().contains("three b:1"), "{e}");
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
