//! The backup file of the monitor database (`vigilctl db backup FILE`, restored with
//! `vigil-monitor --restore FILE`).
//!
//! A backup is the replicated [`ClusterState`] as a linearizable read on the leader saw it,
//! with the Raft position it was taken at. Layout (integers big-endian):
//!
//! ```text
//! offset  size  what
//! 0       8     magic "VIGILBAK"
//! 8       4     format version (FORMAT_VERSION)
//! 12      4     header length H (at most MAX_HEADER_LEN)
//! 16      H     header: JSON of BackupHeader (vigil version, created at, source node,
//!               Raft last-applied log id, counts)
//! 16+H    8     body length B
//! 24+H    B     body: JSON of the ClusterState (the state machine's snapshot state)
//! 24+H+B  32    SHA-256 of every byte before it
//! ```
//!
//! The decoder checks, in this order, so that its error names what is wrong: the size limit
//! ([`MAX_BACKUP_LEN`]), the magic, the format version, the lengths (truncated or trailing
//! bytes), the checksum, then the JSON. A file that decodes is exactly what was written.
//!
//! Restoring ([`restored_state`]) marks the state as restored: its first leader adopts the
//! newest generation any agent reports of each VM before it orders anything (a backup is
//! older than the agents' memory; see `engine::leadership`).

use openraft::LogId;
use serde::{Deserialize, Serialize};

use crate::state::{ClusterState, Restored};

/// The first bytes of every backup file.
pub const MAGIC: &[u8; 8] = b"VIGILBAK";
/// The format this code writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// The largest backup file accepted (a state of 10,000 hosts and the full event log is a few
/// tens of MB of JSON).
pub const MAX_BACKUP_LEN: usize = 512 * 1024 * 1024;
/// The largest header accepted.
pub const MAX_HEADER_LEN: usize = 64 * 1024;
const DIGEST_LEN: usize = 32;
/// magic + version + header length.
const PREFIX_LEN: usize = 16;

/// What a backup says about itself (informational, except `last_applied`, which the
/// restored cluster's Raft position starts from).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupHeader {
    /// The monitor version that wrote it.
    pub vigil_version: String,
    /// When it was taken (Unix ms, the leader's clock).
    pub created_at_ms: u64,
    /// The Raft node (leader) it was taken on, and that node's Raft address.
    pub source_node: u64,
    pub source_addr: String,
    /// The voters of the source cluster when it was taken.
    pub source_voters: Vec<u64>,
    /// Every member of the source cluster (voters and learners) with its Raft address: a
    /// restore asks each one whether it still runs (absent in backups written before it was
    /// kept: then only the source node is asked).
    #[serde(default)]
    pub source_members: std::collections::BTreeMap<u64, String>,
    /// The last Raft log entry applied to the state in the body.
    pub last_applied: Option<LogId<u64>>,
    /// Counts of the body, for `vigilctl` and operators.
    pub hosts: usize,
    pub vms: usize,
    pub events: usize,
}

/// A decoded backup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backup {
    pub header: BackupHeader,
    pub state: ClusterState,
}

/// Why bytes are not a backup this monitor can restore.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("too large: {len} bytes, the limit is {max}")]
    TooLarge { len: u64, max: usize },
    #[error("truncated: {what} needs {need} bytes, the file has {have}")]
    Truncated {
        what: &'static str,
        need: u64,
        have: u64,
    },
    #[error("not a Vigil backup (bad magic {found:?}, expected \"VIGILBAK\")")]
    BadMagic { found: String },
    #[error(
        "unsupported backup format version {found} (this vigil-monitor reads version {supported}; \
         restore it with the Vigil version that wrote it, or a newer one)"
    )]
    UnsupportedVersion { found: u32, supported: u32 },
    #[error("header length {len} is over the limit of {max} bytes (corrupt file?)")]
    HeaderTooLarge { len: u64, max: usize },
    #[error("{extra} unexpected bytes after the checksum (not one backup file?)")]
    TrailingBytes { extra: u64 },
    #[error("checksum mismatch: the file is corrupt (SHA-256 {found}, the file says {stored})")]
    ChecksumMismatch { found: String, stored: String },
    #[error("the header is not valid: {0}")]
    Header(#[source] serde_json::Error),
    #[error("the cluster state is not valid: {0}")]
    Body(#[source] serde_json::Error),
    #[error("cannot encode the backup: {0}")]
    Encode(#[source] serde_json::Error),
}

/// Why a backup file cannot be restored.
#[derive(Debug, thiserror::Error)]
pub enum BackupFileError {
    #[error("cannot read backup file {path}: {source}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("backup file {path}: {source}")]
    Invalid {
        path: std::path::PathBuf,
        source: BackupError,
    },
}

/// Reads and verifies the backup file at `path`, refusing one above [`MAX_BACKUP_LEN`]
/// before reading it.
pub fn read_file(path: &std::path::Path) -> Result<Backup, BackupFileError> {
    let io = |source| BackupFileError::Io {
        path: path.to_path_buf(),
        source,
    };
    let len = std::fs::metadata(path).map_err(io)?.len();
    if len > MAX_BACKUP_LEN as u64 {
        return Err(BackupFileError::Invalid {
            path: path.to_path_buf(),
            source: BackupError::TooLarge {
                len,
                max: MAX_BACKUP_LEN,
            },
        });
    }
    let bytes = std::fs::read(path).map_err(io)?;
    decode(&bytes).map_err(|source| BackupFileError::Invalid {
        path: path.to_path_buf(),
        source,
    })
}

fn sha256(bytes: &[u8]) -> [u8; DIGEST_LEN] {
    let d = ring::digest::digest(&ring::digest::SHA256, bytes);
    let mut out = [0u8; DIGEST_LEN];
    out.copy_from_slice(d.as_ref());
    out
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Encodes a backup file of `state` described by `header`.
pub fn encode(header: &BackupHeader, state: &ClusterState) -> Result<Vec<u8>, BackupError> {
    let head = serde_json::to_vec(header).map_err(BackupError::Encode)?;
    let body = serde_json::to_vec(state).map_err(BackupError::Encode)?;
    let total = PREFIX_LEN + head.len() + 8 + body.len() + DIGEST_LEN;
    if total > MAX_BACKUP_LEN {
        return Err(BackupError::TooLarge {
            len: total as u64,
            max: MAX_BACKUP_LEN,
        });
    }
    let mut out = Vec::with_capacity(total);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_be_bytes());
    out.extend_from_slice(&(head.len() as u32).to_be_bytes());
    out.extend_from_slice(&head);
    out.extend_from_slice(&(body.len() as u64).to_be_bytes());
    out.extend_from_slice(&body);
    let digest = sha256(&out);
    out.extend_from_slice(&digest);
    Ok(out)
}

/// Reads a big-endian integer of `N` bytes at `at` (the caller checked the length).
fn be<const N: usize>(bytes: &[u8], at: usize) -> [u8; N] {
    let mut b = [0u8; N];
    b.copy_from_slice(&bytes[at..at + N]);
    b
}

/// Decodes and verifies a backup file (see the module docs for the order of the checks).
pub fn decode(bytes: &[u8]) -> Result<Backup, BackupError> {
    let have = bytes.len() as u64;
    if bytes.len() > MAX_BACKUP_LEN {
        return Err(BackupError::TooLarge {
            len: have,
            max: MAX_BACKUP_LEN,
        });
    }
    let truncated = |what, need: u64| BackupError::Truncated { what, need, have };
    if bytes.len() < MAGIC.len() {
        // Too short to tell: say which, if what is there is not even the magic's start.
        if !MAGIC.starts_with(bytes) {
            return Err(BackupError::BadMagic {
                found: String::from_utf8_lossy(bytes).into_owned(),
            });
        }
        return Err(truncated("the magic", MAGIC.len() as u64));
    }
    if &bytes[..MAGIC.len()] != MAGIC {
        return Err(BackupError::BadMagic {
            found: String::from_utf8_lossy(&bytes[..MAGIC.len()]).into_owned(),
        });
    }
    if bytes.len() < PREFIX_LEN {
        return Err(truncated(
            "the format version and header length",
            PREFIX_LEN as u64,
        ));
    }
    let version = u32::from_be_bytes(be(bytes, 8));
    if version != FORMAT_VERSION {
        return Err(BackupError::UnsupportedVersion {
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    let head_len = u64::from(u32::from_be_bytes(be(bytes, 12)));
    if head_len > MAX_HEADER_LEN as u64 {
        return Err(BackupError::HeaderTooLarge {
            len: head_len,
            max: MAX_HEADER_LEN,
        });
    }
    let body_len_at = PREFIX_LEN as u64 + head_len;
    if have < body_len_at + 8 {
        return Err(truncated("the header", body_len_at + 8));
    }
    // Both fit in usize: they are below `have`, itself below MAX_BACKUP_LEN.
    let body_len_at = body_len_at as usize;
    let body_len = u64::from_be_bytes(be(bytes, body_len_at));
    let need = (body_len_at as u64 + 8)
        .saturating_add(body_len)
        .saturating_add(DIGEST_LEN as u64);
    if have < need {
        return Err(truncated("the cluster state and checksum", need));
    }
    if have > need {
        return Err(BackupError::TrailingBytes { extra: have - need });
    }
    let digest_at = bytes.len() - DIGEST_LEN;
    let found = sha256(&bytes[..digest_at]);
    let stored = &bytes[digest_at..];
    if found.as_slice() != stored {
        return Err(BackupError::ChecksumMismatch {
            found: hex(&found),
            stored: hex(stored),
        });
    }
    let header: BackupHeader =
        serde_json::from_slice(&bytes[PREFIX_LEN..body_len_at]).map_err(BackupError::Header)?;
    let state: ClusterState =
        serde_json::from_slice(&bytes[body_len_at + 8..digest_at]).map_err(BackupError::Body)?;
    Ok(Backup { header, state })
}

/// The header of a backup of `state` taken now on node `source_node`.
pub fn header_for(
    state: &ClusterState,
    last_applied: Option<LogId<u64>>,
    source_node: u64,
    source_addr: &str,
    source_voters: Vec<u64>,
    source_members: std::collections::BTreeMap<u64, String>,
    created_at_ms: u64,
) -> BackupHeader {
    BackupHeader {
        vigil_version: env!("CARGO_PKG_VERSION").to_string(),
        created_at_ms,
        source_node,
        source_addr: source_addr.to_string(),
        source_voters,
        source_members,
        last_applied,
        hosts: state.hosts.len(),
        vms: state.vms.len(),
        events: state.events.len(),
    }
}

/// The state a restored cluster starts from: the backup's, marked as restored at `at_ms`
/// (so that its leader adopts what the agents report before it orders anything), without
/// the old cluster's monitor endpoints (each monitor of the new cluster writes its own when
/// it leads). Everything else (hosts, VMs, generations, tags, maintenance, events) is kept.
pub fn restored_state(
    mut state: ClusterState,
    backup_created_at_ms: u64,
    backup_log_index: Option<u64>,
    at_ms: u64,
) -> ClusterState {
    state.monitors.clear();
    state.restored = Some(Restored {
        at_ms,
        backup_created_at_ms,
        backup_log_index,
        adopted: false,
        silent: Default::default(),
    });
    state
}

/// The monitors of a backup's source cluster that a restore on node `own_id` must ask whether
/// they still run: every member but itself (the source node alone in an older backup).
pub fn members_to_ask(header: &BackupHeader, own_id: u64) -> Vec<(u64, String)> {
    let mut members = header.source_members.clone();
    members
        .entry(header.source_node)
        .or_insert_with(|| header.source_addr.clone());
    members
        .into_iter()
        .filter(|(id, _)| *id != own_id)
        .collect()
}

#[cfg(test)]
mod tests {
    use openraft::CommittedLeaderId;

    use super::*;
    use crate::state::{registration, StateCommand};

    fn sample() -> (BackupHeader, ClusterState) {
        let mut state = ClusterState::default();
        state.apply(&registration(1, "hv1"));
        state.apply(&StateCommand::AddTag {
            at_ms: 2,
            host: "hv1".into(),
            tag: "ha".into(),
        });
        let last = Some(LogId::new(CommittedLeaderId::new(3, 1), 42));
        let header = header_for(
            &state,
            last,
            1,
            "127.0.0.1:7001",
            vec![1, 2, 3],
            Default::default(),
            1_000,
        );
        (header, state)
    }

    fn encoded() -> Vec<u8> {
        let (header, state) = sample();
        encode(&header, &state).expect("encode")
    }

    #[test]
    fn round_trip() {
        let (header, state) = sample();
        let bytes = encode(&header, &state).expect("encode");
        assert_eq!(&bytes[..8], MAGIC);
        let back = decode(&bytes).expect("decode");
        assert_eq!(back.header, header);
        assert_eq!(back.state, state);
        assert_eq!(back.header.hosts, 1);
    }

    #[test]
    fn garbage_is_bad_magic() {
        for junk in [
            &b"hello world, this is not a backup"[..],
            b"X",
            b"{\"hosts\":{}}",
        ] {
            let e = decode(junk).expect_err("garbage");
            assert!(matches!(e, BackupError::BadMagic { .. }), "{e}");
            assert!(e.to_string().contains("not a Vigil backup"), "{e}");
        }
    }

    #[test]
    fn empty_and_short_files_are_truncated() {
        for len in [0, 4, 8, 12, 15] {
            let bytes = &encoded()[..len];
            let e = decode(bytes).expect_err("short");
            assert!(matches!(e, BackupError::Truncated { .. }), "{len}: {e}");
        }
    }

    #[test]
    fn every_truncation_is_named_truncated() {
        let bytes = encoded();
        for len in 16..bytes.len() {
            let e = decode(&bytes[..len]).expect_err("truncated");
            assert!(
                matches!(e, BackupError::Truncated { .. }),
                "cut at {len}: {e}"
            );
            assert!(e.to_string().starts_with("truncated"), "{e}");
        }
    }

    #[test]
    fn newer_format_is_unsupported_version() {
        let mut bytes = encoded();
        bytes[8..12].copy_from_slice(&2u32.to_be_bytes());
        let e = decode(&bytes).expect_err("version");
        assert!(
            matches!(
                e,
                BackupError::UnsupportedVersion {
                    found: 2,
                    supported: 1
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn any_flipped_bit_is_refused() {
        let bytes = encoded();
        // Every bit of the header, body and checksum (the prefix has its own checks).
        for at in 16..bytes.len() {
            for bit in [0u8, 3, 7] {
                let mut b = bytes.clone();
                b[at] ^= 1 << bit;
                let e = decode(&b).expect_err("flipped");
                // A flip in a length field reads as truncated or trailing bytes; anywhere
                // else the checksum catches it.
                assert!(
                    matches!(
                        e,
                        BackupError::ChecksumMismatch { .. }
                            | BackupError::Truncated { .. }
                            | BackupError::TrailingBytes { .. }
                            | BackupError::HeaderTooLarge { .. }
                    ),
                    "byte {at} bit {bit}: {e}"
                );
            }
        }
        let mut b = bytes.clone();
        let mid = b.len() / 2;
        b[mid] ^= 0x10;
        assert!(decode(&b)
            .expect_err("flipped")
            .to_string()
            .contains("checksum mismatch"));
    }

    #[test]
    fn trailing_bytes_and_huge_lengths_are_refused() {
        let mut bytes = encoded();
        bytes.extend_from_slice(b"more");
        assert!(matches!(
            decode(&bytes),
            Err(BackupError::TrailingBytes { extra: 4 })
        ));
        let mut bytes = encoded();
        bytes[12..16].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            decode(&bytes),
            Err(BackupError::HeaderTooLarge { .. })
        ));
        // A body length near u64::MAX must not overflow or allocate.
        let bytes = encoded();
        let head_len = u32::from_be_bytes(be(&bytes, 12)) as usize;
        let mut b = bytes.clone();
        b[16 + head_len..24 + head_len].copy_from_slice(&u64::MAX.to_be_bytes());
        assert!(matches!(decode(&b), Err(BackupError::Truncated { .. })));
    }

    #[test]
    fn a_valid_checksum_over_bad_json_names_the_part() {
        // Re-sealed by hand: the checksum matches, the body is not a state.
        let (header, _) = sample();
        let head = serde_json::to_vec(&header).expect("json");
        let body = b"{\"hosts\": 7}";
        let mut out = Vec::new();
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_be_bytes());
        out.extend_from_slice(&(head.len() as u32).to_be_bytes());
        out.extend_from_slice(&head);
        out.extend_from_slice(&(body.len() as u64).to_be_bytes());
        out.extend_from_slice(body);
        let d = sha256(&out);
        out.extend_from_slice(&d);
        let e = decode(&out).expect_err("bad body");
        assert!(matches!(e, BackupError::Body(_)), "{e}");
    }

    #[test]
    fn restored_state_keeps_everything_but_the_old_monitors() {
        let (_, mut state) = sample();
        state.monitors.insert(1, "10.0.0.1:7440".into());
        let restored = restored_state(state.clone(), 1_000, Some(42), 2_000);
        assert!(restored.monitors.is_empty());
        let r = restored.restored.clone().expect("marked");
        assert!(!r.adopted);
        assert_eq!(
            (r.at_ms, r.backup_created_at_ms, r.backup_log_index),
            (2_000, 1_000, Some(42))
        );
        let mut back = restored;
        back.restored = None;
        back.monitors = state.monitors.clone();
        assert_eq!(back, state);
    }

    #[test]
    fn a_restore_asks_every_other_member_and_the_source_of_an_older_backup() {
        let state = ClusterState::default();
        let members = std::collections::BTreeMap::from([
            (1, "10.0.0.1:7441".to_string()),
            (2, "10.0.0.2:7441".to_string()),
            (3, "10.0.0.3:7441".to_string()),
        ]);
        let h = header_for(&state, None, 2, "10.0.0.2:7441", vec![1, 2, 3], members, 1);
        assert_eq!(
            members_to_ask(&h, 1),
            vec![
                (2, "10.0.0.2:7441".to_string()),
                (3, "10.0.0.3:7441".to_string())
            ]
        );
        // Written before the members were kept: only the source node is known.
        let older = header_for(
            &state,
            None,
            2,
            "10.0.0.2:7441",
            vec![1, 2, 3],
            Default::default(),
            1,
        );
        assert_eq!(
            members_to_ask(&older, 1),
            vec![(2, "10.0.0.2:7441".to_string())]
        );
        assert!(members_to_ask(&older, 2).is_empty(), "never itself");
    }
}
