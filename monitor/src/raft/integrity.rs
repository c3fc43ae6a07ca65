//! Reads a whole `raft.redb` once before the monitor uses it, so that a damaged file is
//! reported as damaged, with its path, instead of crashing the monitor.
//!
//! redb 4 *panics* on some damaged pages (zeroed or overwritten b-tree pages: found in
//! `btree.rs` and `btree_base.rs` by the tests below), even inside its own
//! `check_integrity`; only a truncated file or a wrong magic number come back as errors. A
//! panic in the middle of openraft's start-up leaves an operator with a backtrace into a
//! storage library and no hint that the file, not the program, is at fault, or what to do.
//!
//! So [`verify`] opens the file on a thread of its own, reads every row of every table the
//! monitor keeps (the log, the log's metadata, the state machine's snapshot) and decodes
//! them as the monitor will, under `catch_unwind`. Whatever goes wrong becomes one
//! [`Damage`]. It never writes (beyond the repair redb itself runs when it opens a file that
//! was not closed cleanly, as the real open would). The file is small: the log is compacted
//! behind snapshots.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::OnceLock;

use redb::{ReadableDatabase, ReadableTable};

use super::log_store::{LOG_META_TABLE, LOG_TABLE};
use super::state_machine::SM_TABLE;

/// The name of the thread that reads the file; the panic hook stays quiet for it.
const THREAD: &str = "vigil-db-check";

/// What is wrong with a database file, in words for the operator.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Damage(pub String);

/// Reads all of `path` (an existing redb file) as the monitor would, on a dedicated thread.
pub fn verify(path: &Path) -> Result<(), Damage> {
    quiet_panics_of_the_check_thread();
    let path = path.to_path_buf();
    let handle = std::thread::Builder::new()
        .name(THREAD.into())
        .spawn(move || catch_unwind(AssertUnwindSafe(|| read_everything(&path))))
        .map_err(|e| Damage(format!("cannot start the check of the file: {e}")))?;
    match handle.join() {
        Ok(Ok(result)) => result,
        Ok(Err(panic)) | Err(panic) => Err(Damage(format!(
            "the storage library failed while reading it ({})",
            panic_message(&panic)
        ))),
    }
}

fn read_everything(path: &Path) -> Result<(), Damage> {
    let db = redb::Database::open(path).map_err(|e| Damage(e.to_string()))?;
    let txn = db.begin_read().map_err(|e| Damage(e.to_string()))?;
    let table_err = |what: &str, e: &dyn std::fmt::Display| Damage(format!("{what}: {e}"));
    // A table that does not exist yet is fine (a database created but never written).
    match txn.open_table(LOG_TABLE) {
        Err(redb::TableError::TableDoesNotExist(_)) => {}
        Err(e) => return Err(table_err("the Raft log", &e)),
        Ok(t) => {
            for row in t.iter().map_err(|e| table_err("the Raft log", &e))? {
                let (k, v) = row.map_err(|e| table_err("the Raft log", &e))?;
                super::log_store::decode_entry(k.value(), v.value())
                    .map_err(|e| table_err(&format!("Raft log entry {}", k.value()), &e))?;
            }
        }
    }
    match txn.open_table(LOG_META_TABLE) {
        Err(redb::TableError::TableDoesNotExist(_)) => {}
        Err(e) => return Err(table_err("the Raft metadata", &e)),
        Ok(t) => {
            for row in t.iter().map_err(|e| table_err("the Raft metadata", &e))? {
                let (k, v) = row.map_err(|e| table_err("the Raft metadata", &e))?;
                serde_json::from_slice::<serde_json::Value>(v.value())
                    .map_err(|e| table_err(&format!("Raft metadata {:?}", k.value()), &e))?;
            }
        }
    }
    match txn.open_table(SM_TABLE) {
        Err(redb::TableError::TableDoesNotExist(_)) => {}
        Err(e) => return Err(table_err("the state machine", &e)),
        Ok(t) => {
            for row in t.iter().map_err(|e| table_err("the state machine", &e))? {
                row.map_err(|e| table_err("the state machine", &e))?;
            }
        }
    }
    drop(txn);
    super::state_machine::verify_snapshot(&db).map_err(|e| table_err("the state snapshot", &e))
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".into())
}

/// Installs, once, a panic hook that prints nothing for the check thread (its panic is
/// turned into a [`Damage`] that says what happened) and defers to the previous hook for
/// every other thread.
fn quiet_panics_of_the_check_thread() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if std::thread::current().name() != Some(THREAD) {
                previous(info);
            }
        }));
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::{RaftNode, RaftTuning, StateCommand, DB_FILE_NAME};
    use std::time::Duration;

    /// A one-node cluster in `dir` with 200 events written, shut down cleanly.
    fn filled(dir: &Path) {
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        rt.block_on(async {
            let node = RaftNode::open(dir, 1, "127.0.0.1:7001".into(), RaftTuning::default())
                .await
                .expect("open");
            node.initialize_single_if_new().await.expect("init");
            assert_eq!(node.wait_for_leader(Duration::from_secs(10)).await, Some(1));
            for i in 0..200u64 {
                node.write(StateCommand::RecordEvent {
                    at_ms: i,
                    severity: crate::state::Severity::Info,
                    host: None,
                    kind: crate::state::EventKind::HostRegistered,
                    message: "x".repeat(200),
                })
                .await
                .expect("write");
            }
            node.shutdown().await;
        });
    }

    /// Damages `dir`'s database in one of the ways a disk or an operator does.
    fn damage(dir: &Path, how: &str) {
        let p = dir.join(DB_FILE_NAME);
        let mut bytes = std::fs::read(&p).expect("read db");
        let n = bytes.len();
        match how {
            "truncated to half" => bytes.truncate(n / 2),
            "a third zeroed" => bytes[n / 3..n / 2].fill(0),
            "header zeroed" => bytes[..4096].fill(0),
            "tail zeroed" => bytes[n - 8192..].fill(0),
            "overwritten with garbage" => {
                for (i, b) in bytes[n / 4..].iter_mut().enumerate() {
                    *b = (i * 7919 % 251) as u8;
                }
            }
            other => panic!("unknown damage {other}"),
        }
        std::fs::write(&p, &bytes).expect("write db");
    }

    #[test]
    fn an_intact_database_passes() {
        let d = tempfile::tempdir().expect("tempdir");
        filled(d.path());
        verify(&d.path().join(DB_FILE_NAME)).expect("intact");
    }

    /// The defect: redb panicked inside the monitor's start-up on three of these five, and
    /// the monitor died with a backtrace into the storage library.
    #[test]
    fn a_damaged_database_is_reported_not_a_panic() {
        for how in [
            "truncated to half",
            "a third zeroed",
            "header zeroed",
            "tail zeroed",
            "overwritten with garbage",
        ] {
            let d = tempfile::tempdir().expect("tempdir");
            filled(d.path());
            damage(d.path(), how);
            let r = verify(&d.path().join(DB_FILE_NAME));
            assert!(r.is_err(), "{how}: passed the check");
            // And the real open, with the check in front, returns an error too.
            let rt = tokio::runtime::Runtime::new().expect("runtime");
            let opened = rt.block_on(RaftNode::open(
                d.path(),
                1,
                "127.0.0.1:7001".into(),
                RaftTuning::default(),
            ));
            match opened {
                Err(crate::raft::RaftSetupError::Damaged { path, .. }) => {
                    assert_eq!(path, d.path().join(DB_FILE_NAME), "{how}")
                }
                Err(e) => panic!("{how}: not reported as damaged: {e}"),
                Ok(_) => panic!("{how}: opened"),
            }
        }
    }
}
