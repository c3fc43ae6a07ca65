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

use std::io::Read;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::atomic_file::{write_atomic, AtomicWriteError};

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

    /// The hosts this record asks to fence themselves: none while fencing is held. What the
    /// monitor may count as "condemned" for a lease proof (an agent obeys [`Self::condemns`],
    /// so a held record condemns nobody, whatever it lists).
    pub fn condemned_hosts(&self) -> Vec<String> {
        self.condemned
            .iter()
            .filter(|h| self.condemns(h))
            .cloned()
            .collect()
    }
}

/// A fence request (sbd's poison pill): the agent of `host` destroys its HA domains and answers
/// with a [`FenceAck`] carrying the same `id`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FenceRequest {
    /// Unique per request (the leader's wall clock in ms when it first asked, made unique).
    pub id: u64,
    pub host: String,
    /// Only the agent process the monitor last heard may obey it; never `0` (a leader that
    /// does not know the host's agent instance does not ask through the slot). A request
    /// left behind for an earlier instance must not kill the guests of a host that has since
    /// rejoined.
    pub instance: u64,
    /// The leader's Raft term: an agent obeys only a request whose term is at least the
    /// newest term it knows (from leader records), so a request left by a deposed leader is
    /// void.
    pub term: u64,
    pub node: u64,
    pub wall_ms: u64,
    pub reason: String,
    /// The VMs (uuids) the leader holds as HA on this host: the agent treats each as HA even
    /// if it never heard the flag, and the acknowledgement must show every one not running.
    #[serde(default)]
    pub vms: Vec<String>,
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
    /// UUIDs a fresh, healthy listing from libvirt, taken after the destroys, showed not
    /// running (shut off, crashed, or not defined here): every VM the request named and
    /// every HA domain of the host. The leader takes the acknowledgement as proof only if it
    /// covers every VM the request named.
    #[serde(default)]
    pub verified_off: Vec<String>,
}

/// Whether the agent process `instance` may obey `req`, knowing Raft terms up to
/// `newest_term` and the requests the monitors withdrew (`withdrawn`). The agent and the
/// simulator both decide with this.
pub fn request_binds(
    req: &FenceRequest,
    host: &str,
    instance: u64,
    newest_term: u64,
    withdrawn: &std::collections::BTreeSet<u64>,
) -> Result<(), String> {
    if req.host != host {
        return Err(format!(
            "fence request {} names host {:?}, not {host:?}",
            req.id, req.host
        ));
    }
    if req.instance == 0 || req.instance != instance {
        return Err(format!(
            "fence request {} names agent instance {}, not this one ({instance})",
            req.id, req.instance
        ));
    }
    if req.term < newest_term {
        return Err(format!(
            "fence request {} comes from term {}, older than term {newest_term}: left by a deposed leader",
            req.id, req.term
        ));
    }
    if withdrawn.contains(&req.id) {
        return Err(format!(
            "fence request {} was withdrawn by the monitors",
            req.id
        ));
    }
    Ok(())
}

/// Whether `ack` proves what `req` asked: it answers that request, from the instance it
/// named, and shows every VM it named not running. `Err` says why not (for the event log).
pub fn ack_proves(req: &FenceRequest, ack: &FenceAck) -> Result<(), String> {
    if ack.id != req.id || ack.host != req.host {
        return Err(format!(
            "the acknowledgement answers request {} of {}, not request {} of {}",
            ack.id, ack.host, req.id, req.host
        ));
    }
    if ack.instance != req.instance {
        return Err(format!(
            "acknowledged by agent instance {}, but the request named instance {}",
            ack.instance, req.instance
        ));
    }
    let missing: Vec<&str> = req
        .vms
        .iter()
        .filter(|v| !ack.verified_off.contains(v))
        .map(String::as_str)
        .collect();
    if !missing.is_empty() {
        return Err(format!(
            "the agent's listing does not show {} not running ({})",
            if missing.len() == 1 {
                "this VM"
            } else {
                "these VMs"
            },
            missing.join(", ")
        ));
    }
    Ok(())
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
    /// Writing failed (the error names the file and the step).
    #[error(transparent)]
    Write(#[from] AtomicWriteError),
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

/// Writes a record atomically ([`crate::atomic_file`]: a temporary file in the same
/// directory, created if missing, `fsync`, `rename` over the target, `fsync` of the
/// directory). Blocking: call it from a storage thread.
pub fn write_record<T: Serialize>(path: &Path, record: &T) -> Result<(), RecordError> {
    let bytes = encode(record);
    if bytes.len() > MAX_RECORD_BYTES {
        return Err(RecordError::TooLarge {
            path: path.to_path_buf(),
        });
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|source| RecordError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(write_atomic(path, &bytes)?)
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

    fn request(instance: u64, term: u64) -> FenceRequest {
        FenceRequest {
            id: 10,
            host: "hv1".into(),
            instance,
            term,
            node: 1,
            wall_ms: 0,
            reason: "isolated".into(),
            vms: vec!["u1".into(), "u2".into()],
        }
    }

    #[test]
    fn a_fence_request_binds_to_the_instance_and_the_current_term() {
        let none = std::collections::BTreeSet::new();
        assert!(request_binds(&request(7, 3), "hv1", 7, 3, &none).is_ok());
        assert!(request_binds(&request(7, 4), "hv1", 7, 3, &none).is_ok());
        // Instance 0 never means "any agent"; another instance; an older term; withdrawn.
        let e = request_binds(&request(0, 3), "hv1", 7, 3, &none).expect_err("instance 0");
        assert!(e.contains("instance 0"), "{e}");
        assert!(request_binds(&request(8, 3), "hv1", 7, 3, &none).is_err());
        let e = request_binds(&request(7, 2), "hv1", 7, 3, &none).expect_err("old term");
        assert!(e.contains("deposed"), "{e}");
        let withdrawn = [10].into_iter().collect();
        assert!(request_binds(&request(7, 3), "hv1", 7, 3, &withdrawn).is_err());
        assert!(request_binds(&request(7, 3), "hv2", 7, 3, &none).is_err());
    }

    #[test]
    fn a_held_leader_record_condemns_nobody_for_agents_nor_for_lease_proofs() {
        let mut r = LeaderRecord {
            term: 3,
            node: 1,
            seq: 9,
            wall_ms: 0,
            condemned: vec!["hv1".into(), "hv2".into()],
            hold: false,
        };
        assert!(r.condemns("hv1"));
        assert_eq!(
            r.condemned_hosts(),
            vec!["hv1".to_string(), "hv2".to_string()]
        );
        r.hold = true;
        assert!(!r.condemns("hv1"));
        assert!(r.condemned_hosts().is_empty());
    }

    #[test]
    fn a_fence_ack_proves_only_what_its_listing_shows_off() {
        let req = request(7, 3);
        let mut ack = FenceAck {
            id: 10,
            host: "hv1".into(),
            instance: 7,
            destroyed: vec!["u1".into()],
            wall_ms: 0,
            verified_off: vec!["u1".into()],
        };
        let e = ack_proves(&req, &ack).expect_err("u2 not covered");
        assert!(e.contains("u2"), "{e}");
        ack.verified_off.push("u2".into());
        assert!(ack_proves(&req, &ack).is_ok());
        ack.instance = 8;
        assert!(ack_proves(&req, &ack).is_err());
        // An acknowledgement from an older agent (no listing in it) proves nothing named.
        let old: FenceAck = serde_json::from_str(
            r#"{"id":10,"host":"hv1","instance":7,"destroyed":[],"wall_ms":0}"#,
        )
        .expect("old ack");
        assert!(ack_proves(&req, &old).is_err());
    }

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
