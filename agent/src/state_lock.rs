//! One agent per state directory.
//!
//! Two agent processes on one `state_dir` would both manage the host's guests: each adopts
//! the running domains, each keeps its own lease and generation table, and each may start or
//! destroy what the other one relies on. The agent therefore takes an exclusive `flock` on
//! `state_dir/lock` before it reads anything there, and holds it for its whole life (the
//! kernel releases it when the process dies, however it dies, so a crashed agent never
//! blocks the next one). The file holds the PID of the holder, for the error message of the
//! process that finds it taken.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

/// The lock file's name inside `state_dir`.
pub const LOCK_FILE: &str = "lock";

/// Why the state directory could not be locked.
#[derive(Debug, thiserror::Error)]
pub enum StateLockError {
    #[error(
        "state_dir {dir} is in use by another vigil-agent ({holder}; lock {lock}): two agents \
         on one host would both manage its guests. Stop that agent first"
    )]
    InUse {
        dir: PathBuf,
        lock: PathBuf,
        holder: String,
    },
    #[error("cannot create state_dir {dir}: {source}")]
    CreateDir {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot open the lock file {lock}: {source}")]
    Open {
        lock: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot lock {lock}: {errno}")]
    Lock { lock: PathBuf, errno: Errno },
    #[error("cannot write this agent's PID into {lock}: {source}")]
    WritePid {
        lock: PathBuf,
        source: std::io::Error,
    },
}

/// The held lock: released when dropped (or when the process ends).
#[derive(Debug)]
pub struct StateDirLock {
    _lock: Flock<File>,
    path: PathBuf,
}

impl StateDirLock {
    /// Path of the lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Takes the exclusive lock on `state_dir/lock` (creating the directory if needed) without
/// waiting: a second agent must fail at once with a clear error, not hang.
pub fn lock_state_dir(dir: &Path) -> Result<StateDirLock, StateLockError> {
    std::fs::create_dir_all(dir).map_err(|source| StateLockError::CreateDir {
        dir: dir.to_path_buf(),
        source,
    })?;
    let path = dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|source| StateLockError::Open {
            lock: path.clone(),
            source,
        })?;
    let mut lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(l) => l,
        Err((mut file, Errno::EWOULDBLOCK)) => {
            let mut text = String::new();
            let _ = file.read_to_string(&mut text);
            let holder = match text.trim().parse::<u32>() {
                Ok(pid) => format!("pid {pid}"),
                Err(_) => "pid unknown".to_string(),
            };
            return Err(StateLockError::InUse {
                dir: dir.to_path_buf(),
                lock: path,
                holder,
            });
        }
        Err((_, errno)) => return Err(StateLockError::Lock { lock: path, errno }),
    };
    let write_pid = |f: &mut File| -> std::io::Result<()> {
        f.set_len(0)?;
        f.seek(SeekFrom::Start(0))?;
        writeln!(f, "{}", std::process::id())?;
        f.sync_all()
    };
    write_pid(&mut lock).map_err(|source| StateLockError::WritePid {
        lock: path.clone(),
        source,
    })?;
    Ok(StateDirLock { _lock: lock, path })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_agent_on_one_state_dir_is_refused_naming_the_holder() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().join("state");
        let first = lock_state_dir(&state).expect("first lock");
        assert_eq!(
            std::fs::read_to_string(first.path()).expect("lock file"),
            format!("{}\n", std::process::id())
        );
        // flock locks belong to the open file, so a second open in this process conflicts
        // exactly as a second process would.
        let err = lock_state_dir(&state).expect_err("second lock must fail");
        let msg = err.to_string();
        assert!(
            msg.contains(&format!("pid {}", std::process::id())),
            "{msg}"
        );
        assert!(msg.contains(&state.display().to_string()), "{msg}");
        drop(first);
        lock_state_dir(&state).expect("free again once the first is gone");
    }
}
