//! The newest activation generation this agent has seen for each HA VM, kept on disk.
//!
//! This is the agent's half of "a VM never runs twice": a start order older than the newest
//! generation is refused, and a domain found running with an older generation is destroyed.
//! Those decisions are pure functions in `vigil_common::generation_guard`, shared with the
//! monitor's simulator; this module is the table they read. The table survives agent
//! restarts (a restarted agent must not forget that a VM moved away), so every raise is
//! written to disk (temporary file, fsync, rename) *before* the agent acts on it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use vigil_common::atomic_file::{write_atomic, AtomicWriteError};

#[derive(Debug, thiserror::Error)]
pub enum GenerationsError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a generations file: {message}")]
    Corrupt { path: PathBuf, message: String },
    /// Persisting failed (the error names the file and the step).
    #[error(transparent)]
    Write(#[from] AtomicWriteError),
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct OnDisk {
    newest: BTreeMap<String, u64>,
    ha: BTreeSet<String>,
    /// The highest generation this agent has started, per VM: a generation activates at
    /// most once, so a late duplicate of an old order can never start it again.
    #[serde(default)]
    started: BTreeMap<String, u64>,
}

/// The table, backed by a file (or only in memory when `path` is `None`).
#[derive(Debug)]
pub struct Generations {
    path: Option<PathBuf>,
    data: OnDisk,
}

impl Generations {
    /// Loads `dir/generations.json`, creating `dir` if needed. A missing file is an empty
    /// table; a corrupt one is an error (never silently forget generations).
    pub fn load(dir: &Path) -> Result<Self, GenerationsError> {
        let io = |p: &Path| {
            let p = p.to_path_buf();
            move |source| GenerationsError::Io { path: p, source }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let path = dir.join("generations.json");
        let data = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| GenerationsError::Corrupt {
                path: path.clone(),
                message: e.to_string(),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => OnDisk::default(),
            Err(e) => return Err(io(&path)(e)),
        };
        Ok(Generations {
            path: Some(path),
            data,
        })
    }

    /// A table that lives only in memory (tests, agents without a state directory).
    pub fn in_memory() -> Self {
        Generations {
            path: None,
            data: OnDisk::default(),
        }
    }

    pub fn newest(&self, uuid: &str) -> Option<u64> {
        self.data.newest.get(uuid).copied()
    }

    /// The highest generation this agent has started for `uuid`.
    pub fn started(&self, uuid: &str) -> Option<u64> {
        self.data.started.get(uuid).copied()
    }

    /// Records, durably and before the start, that `generation` of `uuid` is being started.
    pub fn mark_started(&mut self, uuid: &str, generation: u64) -> Result<(), GenerationsError> {
        let mut next = self.data.clone();
        let e = next.started.entry(uuid.to_string()).or_insert(generation);
        *e = (*e).max(generation);
        let n = next.newest.entry(uuid.to_string()).or_insert(generation);
        *n = (*n).max(generation);
        if next != self.data {
            self.persist(&next)?;
            self.data = next;
        }
        Ok(())
    }

    pub fn is_ha(&self, uuid: &str) -> bool {
        self.data.ha.contains(uuid)
    }

    pub fn ha_vms(&self) -> impl Iterator<Item = &str> {
        self.data.ha.iter().map(String::as_str)
    }

    /// Records `generation` for `uuid` if it is newer, durably. Returns whether it changed.
    pub fn raise(&mut self, uuid: &str, generation: u64) -> Result<bool, GenerationsError> {
        if self.newest(uuid).is_some_and(|n| n >= generation) {
            return Ok(false);
        }
        let mut next = self.data.clone();
        next.newest.insert(uuid.to_string(), generation);
        self.persist(&next)?;
        self.data = next;
        Ok(true)
    }

    /// Applies a table from the monitor: generations only ever go up; with `full`, the HA set
    /// becomes exactly the table's VMs.
    pub fn merge(&mut self, entries: &[(String, u64)], full: bool) -> Result<(), GenerationsError> {
        let mut next = self.data.clone();
        if full {
            next.ha = entries.iter().map(|(u, _)| u.clone()).collect();
        } else {
            next.ha.extend(entries.iter().map(|(u, _)| u.clone()));
        }
        for (uuid, g) in entries {
            let e = next.newest.entry(uuid.clone()).or_insert(*g);
            *e = (*e).max(*g);
        }
        if next != self.data {
            self.persist(&next)?;
            self.data = next;
        }
        Ok(())
    }

    fn persist(&self, data: &OnDisk) -> Result<(), GenerationsError> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        let bytes = serde_json::to_vec_pretty(data).map_err(|e| GenerationsError::Corrupt {
            path: path.clone(),
            message: e.to_string(),
        })?;
        Ok(write_atomic(path, &bytes)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raises_only_upwards_and_survives_reload() {
        let dir = tempfile::tempdir().expect("tmp");
        let mut g = Generations::load(dir.path()).expect("load");
        assert!(g.raise("u1", 3).expect("raise"));
        assert!(!g.raise("u1", 2).expect("lower is ignored"));
        g.merge(&[("u1".into(), 1), ("u2".into(), 5)], true)
            .expect("merge");
        assert_eq!(g.newest("u1"), Some(3));
        assert_eq!(g.newest("u2"), Some(5));
        drop(g);
        let g = Generations::load(dir.path()).expect("reload");
        assert_eq!(g.newest("u1"), Some(3));
        assert!(g.is_ha("u2"));
    }

    #[test]
    fn a_corrupt_file_is_an_error_not_an_empty_table() {
        let dir = tempfile::tempdir().expect("tmp");
        std::fs::write(dir.path().join("generations.json"), b"{nope").expect("write");
        let err = Generations::load(dir.path()).expect_err("corrupt");
        assert!(err.to_string().contains("generations.json"), "{err}");
    }
}
