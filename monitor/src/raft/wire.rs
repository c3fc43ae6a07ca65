//! The byte format of Raft RPCs between monitors.
//!
//! Each RPC is one bidirectional QUIC stream on a connection negotiated with [`ALPN_RAFT`]. The
//! client writes one byte naming the [`RpcKind`], then one request frame, and finishes its
//! side; the server answers with one [`Reply`] frame. A frame is the workspace's usual one
//! (see [`vigil_common::codec`]: a 4-byte big-endian length, then the message in bincode), so
//! the encoding stays in one place; what this module adds is a *per-kind* size limit, checked
//! on the announced length before anything is allocated:
//!
//! - a Vote is a few dozen bytes, so a "vote" announcing more than [`VOTE_MAX_BYTES`] is
//!   garbage, not a slow request to wait for;
//! - AppendEntries may carry up to the codec's [`MAX_FRAME_LEN`] (the sender splits batches
//!   that would exceed it, see [`super::quic`]);
//! - an InstallSnapshot request carries one chunk of [`SNAPSHOT_CHUNK_BYTES`] (openraft's
//!   `snapshot_max_chunk_size` is set to it) plus the snapshot's metadata.
//!
//! The replicated commands themselves ([`StateCommand`]) use internally tagged enums, which
//! bincode cannot decode (it has no self-describing `deserialize_any`); an AppendEntries
//! therefore travels as a [`WireAppendEntries`], whose entries carry each command as the JSON
//! bytes the log store already writes for it. Everything else (votes, log ids, memberships,
//! snapshot chunks, which are raw bytes) is openraft's own type, in bincode.
//!
//! Anything that does not parse — an unknown kind byte, a length over the limit, a truncated
//! or malformed frame — fails that stream only; the receiver drops it without touching Raft.

use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};
use openraft::{BasicNode, Entry, EntryPayload, LogId, Membership, Vote};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt};
use vigil_common::codec::{self, CodecError, FRAME_HEADER_LEN, MAX_FRAME_LEN};

use super::TypeConfig;
use crate::state::StateCommand;

/// ALPN token of the monitor-to-monitor Raft protocol. Only the Raft endpoint offers it, and
/// it offers nothing else, so agent and admin connections can never reach Raft (and the other
/// way round).
pub const ALPN_RAFT: &[u8] = b"vigil-raft/1";

/// Bytes of snapshot data per InstallSnapshot chunk.
pub const SNAPSHOT_CHUNK_BYTES: usize = 256 * 1024;
/// Largest Vote request.
pub const VOTE_MAX_BYTES: usize = 4 * 1024;
/// Largest AppendEntries request.
pub const APPEND_ENTRIES_MAX_BYTES: usize = MAX_FRAME_LEN;
/// Largest InstallSnapshot request: a chunk plus room for the metadata (membership).
pub const INSTALL_SNAPSHOT_MAX_BYTES: usize = SNAPSHOT_CHUNK_BYTES + 64 * 1024;
/// Largest reply of any kind (a response or a Raft error: small, fixed-shape messages).
pub const REPLY_MAX_BYTES: usize = 64 * 1024;

/// Which RPC a stream carries (its first byte).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RpcKind {
    AppendEntries,
    Vote,
    InstallSnapshot,
    /// `vigilctl server reset` between the leader and the monitor being reset
    /// ([`super::reset`]); not an openraft RPC.
    Reset,
}

impl RpcKind {
    pub fn as_byte(self) -> u8 {
        match self {
            RpcKind::AppendEntries => 1,
            RpcKind::Vote => 2,
            RpcKind::InstallSnapshot => 3,
            RpcKind::Reset => 4,
        }
    }

    pub fn from_byte(b: u8) -> Option<RpcKind> {
        match b {
            1 => Some(RpcKind::AppendEntries),
            2 => Some(RpcKind::Vote),
            3 => Some(RpcKind::InstallSnapshot),
            4 => Some(RpcKind::Reset),
            _ => None,
        }
    }

    /// Largest request payload of this kind.
    pub fn request_limit(self) -> usize {
        match self {
            RpcKind::AppendEntries => APPEND_ENTRIES_MAX_BYTES,
            RpcKind::Vote => VOTE_MAX_BYTES,
            RpcKind::InstallSnapshot => INSTALL_SNAPSHOT_MAX_BYTES,
            RpcKind::Reset => VOTE_MAX_BYTES,
        }
    }

    /// Largest reply payload of this kind.
    pub fn reply_limit(self) -> usize {
        REPLY_MAX_BYTES
    }
}

/// The server's answer to one RPC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply<T, E> {
    /// Raft handled the request.
    Ok(T),
    /// Raft refused it (for example, it is shutting down); the client reports a remote error.
    Raft(E),
    /// The transport refused it before Raft saw it: the request claims to come from another
    /// node than the caller's certificate names.
    Refused(String),
}

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("{kind:?} frame of {len} bytes exceeds its limit of {max} bytes")]
    TooLarge {
        kind: RpcKind,
        len: usize,
        max: usize,
    },
    #[error("unknown RPC kind byte {0}")]
    UnknownKind(u8),
    #[error("stream ended {0}")]
    Truncated(&'static str),
    #[error(transparent)]
    Codec(#[from] CodecError),
    #[error("malformed replicated command: {0}")]
    Command(String),
    #[error("i/o error on stream: {0}")]
    Io(#[from] std::io::Error),
}

/// Encodes `msg` as one frame, refused if its payload is over `kind`'s `limit`.
pub fn encode_frame<T: Serialize>(
    kind: RpcKind,
    limit: usize,
    msg: &T,
) -> Result<Vec<u8>, FrameError> {
    let payload = codec::encode_payload(msg)?;
    if payload.len() > limit {
        return Err(FrameError::TooLarge {
            kind,
            len: payload.len(),
            max: limit,
        });
    }
    let mut frame = Vec::with_capacity(FRAME_HEADER_LEN + payload.len());
    // Fits in u32: every limit is at most MAX_FRAME_LEN.
    frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    frame.extend_from_slice(&payload);
    Ok(frame)
}

/// The bytes a client writes for one request: the kind byte, then the frame.
pub fn encode_request<T: Serialize>(kind: RpcKind, msg: &T) -> Result<Vec<u8>, FrameError> {
    let frame = encode_frame(kind, kind.request_limit(), msg)?;
    let mut out = Vec::with_capacity(1 + frame.len());
    out.push(kind.as_byte());
    out.extend_from_slice(&frame);
    Ok(out)
}

/// Reads the kind byte that opens a request stream.
pub async fn read_kind<R: AsyncRead + Unpin>(r: &mut R) -> Result<RpcKind, FrameError> {
    let mut b = [0u8; 1];
    if r.read(&mut b).await? == 0 {
        return Err(FrameError::Truncated("before the RPC kind"));
    }
    RpcKind::from_byte(b[0]).ok_or(FrameError::UnknownKind(b[0]))
}

/// Reads one frame of at most `limit` payload bytes; the length is checked before the payload
/// is allocated or read.
pub async fn read_frame<R, T>(r: &mut R, kind: RpcKind, limit: usize) -> Result<T, FrameError>
where
    R: AsyncRead + Unpin,
    T: DeserializeOwned,
{
    let mut header = [0u8; FRAME_HEADER_LEN];
    read_full(r, &mut header, "inside a frame header").await?;
    let len = u32::from_be_bytes(header) as usize;
    if len > limit {
        return Err(FrameError::TooLarge {
            kind,
            len,
            max: limit,
        });
    }
    let mut payload = vec![0u8; len];
    read_full(r, &mut payload, "inside a frame").await?;
    Ok(codec::decode_payload(&payload)?)
}

async fn read_full<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut [u8],
    what: &'static str,
) -> Result<(), FrameError> {
    let mut got = 0;
    while got < buf.len() {
        let n = r.read(&mut buf[got..]).await?;
        if n == 0 {
            return Err(FrameError::Truncated(what));
        }
        got += n;
    }
    Ok(())
}

/// An AppendEntries request as it travels: each command as JSON bytes inside a bincode
/// envelope (see the module documentation).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WireAppendEntries {
    pub vote: Vote<u64>,
    pub prev_log_id: Option<LogId<u64>>,
    pub entries: Vec<WireEntry>,
    pub leader_commit: Option<LogId<u64>>,
}

/// One log entry of a [`WireAppendEntries`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WireEntry {
    pub log_id: LogId<u64>,
    pub payload: WirePayload,
}

/// The payload of a [`WireEntry`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum WirePayload {
    Blank,
    /// A [`StateCommand`], as JSON.
    Normal(Vec<u8>),
    Membership(Membership<u64, BasicNode>),
}

impl WireAppendEntries {
    pub fn from_request(req: &AppendEntriesRequest<TypeConfig>) -> Result<Self, FrameError> {
        let entries = req
            .entries
            .iter()
            .map(|e| {
                let payload = match &e.payload {
                    EntryPayload::Blank => WirePayload::Blank,
                    EntryPayload::Normal(cmd) => WirePayload::Normal(
                        serde_json::to_vec(cmd).map_err(|e| FrameError::Command(e.to_string()))?,
                    ),
                    EntryPayload::Membership(m) => WirePayload::Membership(m.clone()),
                };
                Ok(WireEntry {
                    log_id: e.log_id,
                    payload,
                })
            })
            .collect::<Result<Vec<_>, FrameError>>()?;
        Ok(WireAppendEntries {
            vote: req.vote,
            prev_log_id: req.prev_log_id,
            entries,
            leader_commit: req.leader_commit,
        })
    }

    pub fn into_request(self) -> Result<AppendEntriesRequest<TypeConfig>, FrameError> {
        let entries = self
            .entries
            .into_iter()
            .map(|e| {
                let payload = match e.payload {
                    WirePayload::Blank => EntryPayload::Blank,
                    WirePayload::Normal(json) => EntryPayload::Normal(
                        serde_json::from_slice::<StateCommand>(&json)
                            .map_err(|e| FrameError::Command(e.to_string()))?,
                    ),
                    WirePayload::Membership(m) => EntryPayload::Membership(m),
                };
                Ok(Entry {
                    log_id: e.log_id,
                    payload,
                })
            })
            .collect::<Result<Vec<_>, FrameError>>()?;
        Ok(AppendEntriesRequest {
            vote: self.vote,
            prev_log_id: self.prev_log_id,
            entries,
            leader_commit: self.leader_commit,
        })
    }
}

/// The bytes a client writes for one AppendEntries.
pub fn encode_append_entries(
    req: &AppendEntriesRequest<TypeConfig>,
) -> Result<Vec<u8>, FrameError> {
    encode_request(
        RpcKind::AppendEntries,
        &WireAppendEntries::from_request(req)?,
    )
}

/// A decoded request.
#[derive(Debug)]
pub enum Request {
    AppendEntries(AppendEntriesRequest<TypeConfig>),
    Vote(VoteRequest<u64>),
    InstallSnapshot(InstallSnapshotRequest<TypeConfig>),
    Reset(super::reset::ResetRequest),
}

impl Request {
    /// The node the request claims to come from: the leader (AppendEntries,
    /// InstallSnapshot) or the candidate (Vote) named in its vote.
    pub fn claimed_sender(&self) -> Option<u64> {
        let vote = match self {
            Request::AppendEntries(r) => &r.vote,
            Request::Vote(r) => &r.vote,
            Request::InstallSnapshot(r) => &r.vote,
            Request::Reset(r) => return Some(r.from),
        };
        vote.leader_id().voted_for()
    }
}

/// Reads a whole request: the kind byte, then one frame within that kind's limit.
pub async fn read_request<R: AsyncRead + Unpin>(r: &mut R) -> Result<Request, FrameError> {
    let kind = read_kind(r).await?;
    let limit = kind.request_limit();
    Ok(match kind {
        RpcKind::AppendEntries => Request::AppendEntries(
            read_frame::<_, WireAppendEntries>(r, kind, limit)
                .await?
                .into_request()?,
        ),
        RpcKind::Vote => Request::Vote(read_frame(r, kind, limit).await?),
        RpcKind::InstallSnapshot => Request::InstallSnapshot(read_frame(r, kind, limit).await?),
        RpcKind::Reset => Request::Reset(read_frame(r, kind, limit).await?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::CommittedLeaderId;
    use proptest::prelude::*;
    use std::io::Cursor;

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
    }

    fn append(n: u64) -> AppendEntriesRequest<TypeConfig> {
        let entries = (1..=n)
            .map(|i| Entry::<TypeConfig> {
                log_id: LogId::new(CommittedLeaderId::new(1, 1), i),
                payload: EntryPayload::Normal(crate::state::StateCommand::AddTag {
                    at_ms: i,
                    host: format!("hv{i}"),
                    tag: "ha".into(),
                }),
            })
            .collect();
        AppendEntriesRequest {
            vote: Vote::new_committed(1, 1),
            prev_log_id: None,
            entries,
            leader_commit: None,
        }
    }

    fn decode(bytes: &[u8]) -> Result<Request, FrameError> {
        rt().block_on(read_request(&mut Cursor::new(bytes.to_vec())))
    }

    #[test]
    fn every_request_kind_roundtrips_and_names_its_sender() {
        let bytes = encode_append_entries(&append(3)).expect("encode");
        match decode(&bytes).expect("decode") {
            r @ Request::AppendEntries(_) => {
                assert_eq!(r.claimed_sender(), Some(1));
                let Request::AppendEntries(a) = r else {
                    unreachable!()
                };
                assert_eq!(a.entries.len(), 3);
            }
            other => panic!("decoded {other:?}"),
        }
        let vote = VoteRequest::<u64>::new(Vote::new(4, 3), None);
        let bytes = encode_request(RpcKind::Vote, &vote).expect("encode");
        let r = decode(&bytes).expect("decode");
        assert!(matches!(r, Request::Vote(ref v) if *v == vote));
        assert_eq!(r.claimed_sender(), Some(3));
    }

    #[test]
    fn snapshot_chunks_and_every_reply_shape_roundtrip_in_bincode() {
        use openraft::error::{Fatal, InstallSnapshotError, RaftError, SnapshotMismatch};
        use openraft::raft::{AppendEntriesResponse, InstallSnapshotResponse};
        use openraft::{SnapshotMeta, SnapshotSegmentId, StoredMembership};
        let chunk = InstallSnapshotRequest::<TypeConfig> {
            vote: Vote::new_committed(2, 2),
            meta: SnapshotMeta {
                last_log_id: Some(LogId::new(CommittedLeaderId::new(2, 2), 40)),
                last_membership: StoredMembership::new(
                    Some(LogId::new(CommittedLeaderId::new(1, 1), 1)),
                    Membership::new(vec![[1, 2, 3].into()], None),
                ),
                snapshot_id: "2-40".into(),
            },
            offset: 0,
            data: vec![7u8; SNAPSHOT_CHUNK_BYTES],
            done: false,
        };
        let bytes = encode_request(RpcKind::InstallSnapshot, &chunk).expect("encode");
        match decode(&bytes).expect("decode") {
            Request::InstallSnapshot(c) => {
                assert_eq!(c.data.len(), SNAPSHOT_CHUNK_BYTES);
                assert_eq!(c.meta, chunk.meta);
            }
            other => panic!("decoded {other:?}"),
        }

        type AppendReply = Reply<AppendEntriesResponse<u64>, Fatal<u64>>;
        type SnapReply = Reply<InstallSnapshotResponse<u64>, RaftError<u64, InstallSnapshotError>>;
        let replies: Vec<AppendReply> = vec![
            Reply::Ok(AppendEntriesResponse::Success),
            Reply::Ok(AppendEntriesResponse::Conflict),
            Reply::Ok(AppendEntriesResponse::HigherVote(Vote::new(9, 3))),
            Reply::Raft(Fatal::Stopped),
            Reply::Refused("no".into()),
        ];
        for r in replies {
            assert_reply_roundtrips(RpcKind::AppendEntries, &r);
        }
        let r: SnapReply = Reply::Raft(RaftError::APIError(
            InstallSnapshotError::SnapshotMismatch(SnapshotMismatch {
                expect: SnapshotSegmentId {
                    id: "a".into(),
                    offset: 0,
                },
                got: SnapshotSegmentId {
                    id: "b".into(),
                    offset: 5,
                },
            }),
        ));
        assert_reply_roundtrips(RpcKind::InstallSnapshot, &r);
    }

    /// A reply to a `kind` request comes back equal through a frame within the reply limit.
    fn assert_reply_roundtrips<T>(kind: RpcKind, r: &T)
    where
        T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug,
    {
        let frame = encode_frame(kind, kind.reply_limit(), r).expect("encode");
        let back: T = rt()
            .block_on(read_frame(
                &mut Cursor::new(frame),
                kind,
                kind.reply_limit(),
            ))
            .expect("decode");
        assert_eq!(&back, r);
    }

    #[test]
    fn a_vote_announcing_more_than_a_vote_can_hold_is_refused_before_reading_it() {
        let mut bytes = vec![RpcKind::Vote.as_byte()];
        bytes.extend_from_slice(&((VOTE_MAX_BYTES + 1) as u32).to_be_bytes());
        // No payload at all: the length alone must be enough to refuse.
        match decode(&bytes) {
            Err(FrameError::TooLarge {
                kind: RpcKind::Vote,
                ..
            }) => {}
            other => panic!("expected TooLarge, got {other:?}"),
        }
        let mut bytes = vec![RpcKind::AppendEntries.as_byte()];
        bytes.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(decode(&bytes), Err(FrameError::TooLarge { .. })));
    }

    #[test]
    fn an_append_entries_over_the_limit_cannot_be_encoded() {
        // ~30 bytes an entry: 100,000 entries are well over 1 MiB.
        match encode_append_entries(&append(100_000)) {
            Err(FrameError::TooLarge { .. } | FrameError::Codec(_)) => {}
            Err(e) => panic!("unexpected error {e}"),
            Ok(bytes) => panic!("encoded {} bytes", bytes.len()),
        }
    }

    #[test]
    fn truncated_requests_are_errors() {
        let bytes = encode_append_entries(&append(2)).expect("encode");
        for cut in 0..bytes.len() {
            assert!(decode(&bytes[..cut]).is_err(), "cut at {cut} decoded");
        }
    }

    #[test]
    fn an_unknown_kind_byte_is_refused() {
        assert!(matches!(
            decode(&[0, 0, 0, 0, 0]),
            Err(FrameError::UnknownKind(0))
        ));
        assert!(matches!(decode(&[9]), Err(FrameError::UnknownKind(9))));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1024))]

        #[test]
        fn random_garbage_never_panics_and_never_decodes_as_more_than_its_limit(
            bytes in proptest::collection::vec(any::<u8>(), 0..4096)
        ) {
            // Whatever it decodes to (random bytes can form a valid tiny vote), it never
            // panics and never allocates past the announced, bounded length.
            let _ = decode(&bytes);
        }

        #[test]
        fn mutated_requests_never_panic(idx in any::<usize>(), val in any::<u8>(), cut in any::<usize>()) {
            let mut bytes = encode_append_entries(&append(3)).expect("encode");
            let i = idx % bytes.len();
            bytes[i] = val;
            let end = cut % (bytes.len() + 1);
            let _ = decode(&bytes[..end]);
        }
    }
}
