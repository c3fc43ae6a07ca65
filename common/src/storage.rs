//! What agents and monitors write on shared primary storage, and where.
//!
//! Every primary storage pool (an NFS/iSCSI-backed mount seen by every host of a cluster and by
//! the monitors) carries a small `.vigil/` directory:
//!
//! ```text
//! <pool>/.vigil/leader.json                    the leader record (written by the Raft leader)
//! <pool>/.vigil/hosts/<host>/heartbeat.json    the host's storage heartbeat (written by its agent)
//! <pool>/.vigil/hosts/<host>/fence-request.json  a fence request for the host (the leader)
//! <pool>/.vigil/hosts/<host>/fence-ack.json    the host's acknowledgement (its agent)
//! ```
//!
//! Records are small JSON documents (readable with `cat` during an incident), written atomically
//! (temporary file + `fsync` + `rename`), read with a size limit, and never trusted blindly: a
//! record that does not parse, names another host, or exceeds [`MAX_RECORD_BYTES`] is an error,
//! never a panic. Freshness is always judged by the *reader's* monotonic clock (did the record
//! change recently?), never by comparing wall clocks of two machines.
//!
//! Why JSON and not the wire codec: these files are an operator-visible interface that outlives
//! protocol versions, and they are tiny and written twice a second at most.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// The directory Vigil owns on each pool.
pub const DIR: &str = ".vigil";
/// Largest record read or written.
pub const MAX_RECORD_BYTES: usize = 4096;

/// A host's storage heartbeat: proof of life that does not depend on the network to the
/// monitors (compare vSphere's datastore heartbeating).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StorageHeartbeat {
    pub host: String,
    /// Random per agent process: tells a restarted agent from the one the monitor last heard.
    pub instance: u64,
    /// Milliseconds since that agent process started (its monotonic clock). The monitor
    /// compares it with the `mono_ms` of the last QUIC heartbeat of the same instance: a
    /// storage heartbeat written well after the last network heartbeat proves the host alive.
    pub agent_mono_ms: u64,
    /// Increases by one per write.
    pub seq: u64,
    /// Wall clock of the writer, for humans only.
    pub wall_ms: u64,
    /// The agent fenced itself (its lease ran out while isolated) and none of its HA domains
    /// runs: what lets the leader take lease expiry as proof for a host it sees alive.
    #[serde(default)]
    pub fenced: bool,
}

/// The leader record: lets an agent that lost its lease tell "the monitors are alive and
/// condemn me" (self-fence) from "every monitor is down" or "the monitors do not ask for it"
/// (keep the guests running). It is written only while the leader's engine is deciding: a
/// stalled engine leaves it stale, and a stale record never makes anyone fence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaderRecord {
    /// Raft term and node id of the writer.
    pub term: u64,
    pub node: u64,
    /// Increases by one per write: readers judge freshness by seeing it change.
    pub seq: u64,
    /// Wall clock of the writer, for humans only.
    pub wall_ms: u64,
    /// The hosts this leader condemns: it is fencing them and their agents, once their lease
    /// ran out, must destroy their HA domains. No other host ever self-fences on lease expiry
    /// while the record is fresh.
    #[serde(default)]
    pub condemned: Vec<String>,
    /// Automatic fencing is held (mass failure): nobody is condemned, whatever `condemned`
    /// says.
    #[serde(default)]
    pub hold: bool,
}

impl LeaderRecord {
    /// Whether this record asks `host` to fence itself once its lease ran out.
    pub fn condemns(&self, host: &str) -> bool {
        !self.hold && self.condemned.iter().any(|h| h == host)
    }
}

/// A fence request (sbd's poison pill): the agent of `host` destroys its HA domains and answers
/// with a [`FenceAck`] carrying the same `id`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FenceRequest {
    /// Unique per request (the leader's wall clock in ms when it first asked, made unique).
    pub id: u64,
    pub host: String,
    /// Only the agent process the monitor last heard may obey it (`0`: any instance). A
    /// request left behind for an earlier instance must not kill the guests of a host that
    /// has since rejoined.
    pub instance: u64,
    pub term: u64,
    pub node: u64,
    pub wall_ms: u64,
    pub reason: String,
}

/// An agent's answer to a [`FenceRequest`]: its HA domains are destroyed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FenceAck {
    /// The request answered.
    pub id: u64,
    pub host: String,
    pub instance: u64,
    /// UUIDs of the domains the agent destroyed (for the event log).
    pub destroyed: Vec<String>,
    pub wall_ms: u64,
}

/// Why a record could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: larger than {MAX_RECORD_BYTES} bytes")]
    TooLarge { path: PathBuf },
    #[error("{path}: not a valid record: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// `<pool>/.vigil`
pub fn vigil_dir(pool: &Path) -> PathBuf {
    pool.join(DIR)
}

/// `<pool>/.vigil/leader.json`
pub fn leader_path(pool: &Path) -> PathBuf {
    vigil_dir(pool).join("leader.json")
}

/// `<pool>/.vigil/hosts`
pub fn hosts_dir(pool: &Path) -> PathBuf {
    vigil_dir(pool).join("hosts")
}

/// `<pool>/.vigil/hosts/<host>` (`host` is a validated name: no `/`, no `..`).
pub fn host_dir(pool: &Path, host: &str) -> PathBuf {
    hosts_dir(pool).join(host)
}

pub fn heartbeat_path(pool: &Path, host: &str) -> PathBuf {
    host_dir(pool, host).join("heartbeat.json")
}

pub fn fence_request_path(pool: &Path, host: &str) -> PathBuf {
    host_dir(pool, host).join("fence-request.json")
}

pub fn fence_ack_path(pool: &Path, host: &str) -> PathBuf {
    host_dir(pool, host).join("fence-ack.json")
}

/// Encodes a record.
pub fn encode<T: Serialize>(record: &T) -> Vec<u8> {
    // Serializing these plain structs cannot fail.
    serde_json::to_vec(record).unwrap_or_default()
}

/// Decodes a record, refusing anything larger than [`MAX_RECORD_BYTES`].
pub fn decode<T: DeserializeOwned>(path: &Path, bytes: &[u8]) -> Result<T, RecordError> {
    if bytes.len() > MAX_RECORD_BYTES {
        return Err(RecordError::TooLarge {
            path: path.to_path_buf(),
        });
    }
    serde_json::from_slice(bytes).map_err(|e| RecordError::Invalid {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// Writes a record atomically: a temporary file in the same directory (created if missing),
/// `fsync`, then `rename` over the target. Blocking: call it from a storage thread.
pub fn write_record<T: Serialize>(path: &Path, record: &T) -> Result<(), RecordError> {
    let io = |source| RecordError::Io {
        path: path.to_path_buf(),
        source,
    };
    let bytes = encode(record);
    if bytes.len() > MAX_RECORD_BYTES {
        return Err(RecordError::TooLarge {
            path: path.to_path_buf(),
        });
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
    let mut f = std::fs::File::create(&tmp).map_err(io)?;
    f.write_all(&bytes).map_err(io)?;
    f.sync_data().map_err(io)?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(io)
}

/// Reads a record; `Ok(None)` if the file does not exist. Blocking: call it from a storage
/// thread.
pub fn read_record<T: DeserializeOwned>(path: &Path) -> Result<Option<T>, RecordError> {
    let f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(RecordError::Io {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    let mut bytes = Vec::with_capacity(256);
    f.take(MAX_RECORD_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|source| RecordError::Io {
            path: path.to_path_buf(),
            source,
        })?;
    decode(path, &bytes).map(Some)
}

/// Removes a record; a missing file is fine.
pub fn remove_record(path: &Path) -> Result<(), RecordError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(RecordError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_roundtrip_and_garbage_is_an_error() {
        let dir = std::env::temp_dir().join(format!("vigil-storage-test-{}", std::process::id()));
        let pool = dir.join("pool");
        let hb = StorageHeartbeat {
            host: "hv1".into(),
            instance: 7,
            agent_mono_ms: 1234,
            seq: 3,
            wall_ms: 99,
            fenced: false,
        };
        let p = heartbeat_path(&pool, "hv1");
        assert_eq!(read_record::<StorageHeartbeat>(&p).expect("read"), None);
        write_record(&p, &hb).expect("write");
        assert_eq!(read_record::<StorageHeartbeat>(&p).expect("read"), Some(hb));
        std::fs::write(&p, b"{not json").expect("garbage");
        let err = read_record::<StorageHeartbeat>(&p).expect_err("garbage");
        assert!(err.to_string().contains("heartbeat.json"), "{err}");
        std::fs::write(&p, vec![b' '; MAX_RECORD_BYTES + 10]).expect("big");
        assert!(matches!(
            read_record::<StorageHeartbeat>(&p),
            Err(RecordError::TooLarge { .. })
        ));
        remove_record(&p).expect("remove");
        remove_record(&p).expect("remove twice");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
