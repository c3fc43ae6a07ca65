//! Raft between monitors: openraft's network over QUIC with mutual TLS.
//!
//! Each monitor runs one [`RaftEndpoint`] on its own UDP address, separate from the agent and
//! admin endpoint, offering only the [`ALPN_RAFT`] protocol: a flood of agents cannot starve
//! Raft's heartbeats, and no agent or admin connection can reach Raft at all. The endpoint
//! both serves ([`RaftServer`]) and dials ([`QuicNetworkFactory`]).
//!
//! # Which certificate is which node
//!
//! **Raft node `N` is the monitor whose certificate has the role `vigil-monitor` (OU) and the
//! common name `monN`** (`mon1`, `mon2`, …; decimal, no leading zeros, `N ≥ 1`), issued by the
//! cluster CA. The rule is fixed rather than read from the membership because openraft's
//! [`BasicNode`] holds only an address, and a fixed rule cannot be bent by whoever edits the
//! membership: only the CA decides who may be node `N`. It also means a renumbered monitor
//! (the way back for a node whose log is gone) needs a new certificate, so the old one cannot
//! rejoin under the new number.
//!
//! - Server side: rustls refuses certificates from another CA during the handshake; then the
//!   connection is refused unless its certificate is a monitor's named `monN`. Every request
//!   names its sender in its vote (the leader for AppendEntries and InstallSnapshot, the
//!   candidate for Vote); a request whose sender is not `N` is refused before Raft sees it, so
//!   `mon2` cannot vote or lead as node 3.
//! - A vote request from a node that is not a voter of this node's membership is refused
//!   ([`vote_refusal_by_membership`]): a removed monitor's certificate stays valid until it
//!   expires or is revoked, and its higher term would otherwise depose the leader. Not for
//!   AppendEntries or InstallSnapshot: a follower that lags behind a membership change must
//!   still hear a leader it does not know yet. Revoke a removed monitor's certificate
//!   (`vigilctl cert revoke`, `[tls] crl`) to shut it out entirely.
//! - Client side: after the handshake the server's certificate must be `monN` for the node id
//!   dialled (every monitor certificate also names [`MONITOR_SERVER_NAME`], which is what
//!   rustls checks, so that check alone would accept any monitor).
//!
//! # Client: no dialling in RaftCore's loop
//!
//! openraft calls [`RaftNetworkFactory::new_client`] inside RaftCore's loop, so it only builds
//! a handle. The first RPC to a node starts a dial in a task of its own (bounded by
//! [`QuicTuning::connect_timeout`]) and the verified connection is pooled, one per node id, for
//! every later client of that node. A dial outlives the RPC that started it: with a heartbeat
//! interval shorter than a handshake on a loaded machine, a dial tied to one RPC would be
//! cancelled every time and never finish. An RPC that times out or breaks drops its
//! connection from the pool, so the next one dials afresh: a peer killed and started again
//! never closed the old connection, which would otherwise look alive until the QUIC idle
//! timeout while every vote on it is lost.
//!
//! Errors follow openraft's contract: no connection within the RPC's soft TTL (or a failed
//! dial, or a peer that is not the node dialled) is [`RPCError::Unreachable`] (openraft backs
//! off); a stream failure is [`RPCError::Network`]; the whole RPC past its hard TTL is
//! [`RPCError::Timeout`]; an error returned by the remote Raft is [`RPCError::RemoteError`].
//! A transport fault is never a `StorageError` (RaftCore would stop on it).
//!
//! # Server
//!
//! [`RaftServer`] accepts at most [`QuicTuning::max_connections`] connections; each carries at
//! most 4 concurrent streams (the QUIC limit set by `vigil_common::tls`), one RPC per stream.
//! A stream whose bytes do not parse is reset and Raft is not called (see [`super::wire`]).

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use openraft::error::{
    Fatal, InstallSnapshotError, NetworkError, PayloadTooLarge, RPCError, RaftError, RemoteError,
    Timeout, Unreachable,
};
use openraft::network::{RPCOption, RPCTypes, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{BasicNode, Raft};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};
use vigil_common::tls::{self, Role, TlsError, TlsMaterial, TransportTuning};
use vigil_common::wire::{close, MONITOR_SERVER_NAME};

use super::leader_lease::VoteGate;
use super::reset::{ResetGate, ResetReply, ResetRequest, ResetStep};
use super::wire::{self, FrameError, Reply, Request, RpcKind, ALPN_RAFT};
use super::TypeConfig;

/// Prefix of a monitor certificate's common name; the node id follows.
pub const CERT_NAME_PREFIX: &str = "mon";

/// The certificate common name of Raft node `node_id` (`mon2` for node 2).
pub fn cert_name_of_node(node_id: u64) -> String {
    format!("{CERT_NAME_PREFIX}{node_id}")
}

/// The Raft node id a certificate common name stands for: `monN` with `N` in canonical
/// decimal (no sign, no leading zero) and at least 1.
pub fn node_of_cert_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix(CERT_NAME_PREFIX)?;
    if digits.is_empty() || digits.starts_with('0') || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Timing and limits of the Raft transport.
#[derive(Debug, Clone, Copy)]
pub struct QuicTuning {
    /// Longest a dial (address lookup and handshake) may take.
    pub connect_timeout: Duration,
    /// Server side: longest a client may take to send one whole request.
    pub request_timeout: Duration,
    /// Server side: connections served at once (other monitors; a handful is normal).
    pub max_connections: usize,
    /// QUIC idle timeout and keep-alive.
    pub transport: TransportTuning,
}

impl Default for QuicTuning {
    fn default() -> Self {
        QuicTuning {
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(10),
            max_connections: 16,
            transport: TransportTuning::default(),
        }
    }
}

/// Failure to set up the Raft endpoint.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("Raft transport TLS: {0}")]
    Tls(#[from] TlsError),
    #[error("the certificate given for the Raft transport has no leaf certificate")]
    NoCertificate,
    #[error(
        "this monitor's certificate is {name:?} with role {role}; Raft node {node_id} needs a \
         monitor certificate named {expected:?}"
    )]
    OwnCertificate {
        name: String,
        role: Role,
        node_id: u64,
        expected: String,
    },
    #[error("cannot listen for Raft on udp {addr}: {source}")]
    Bind { addr: SocketAddr, source: io::Error },
}

/// Why a connection to a peer could not be made (the cause inside an `Unreachable`).
#[derive(Debug, Clone, thiserror::Error)]
pub enum DialError {
    #[error("cannot resolve the address {addr:?} of Raft node {target}: {reason}")]
    Resolve {
        target: u64,
        addr: String,
        reason: String,
    },
    #[error("cannot connect to Raft node {target} at {addr}: {reason}")]
    Connect {
        target: u64,
        addr: String,
        reason: String,
    },
    #[error("no connection to Raft node {target} at {addr} after {after:?}")]
    Timeout {
        target: u64,
        addr: String,
        after: Duration,
    },
    #[error("the server at {addr} is {found}, not Raft node {target} ({expected})")]
    WrongPeer {
        target: u64,
        addr: String,
        found: String,
        expected: String,
    },
    #[error("Raft node {target} refused the request: {reason}")]
    Refused { target: u64, reason: String },
    #[error("the dial to Raft node {target} was abandoned (transport shutting down)")]
    Abandoned { target: u64 },
}

/// A failure on an established connection (the cause inside a `Network` error).
#[derive(Debug, thiserror::Error)]
#[error("Raft {kind:?} RPC to node {target}: {detail}")]
pub struct StreamError {
    pub target: u64,
    pub kind: RpcKind,
    pub detail: String,
}

/// Checks that `material` is a monitor certificate for `node_id`.
fn check_own_certificate(material: &TlsMaterial, node_id: u64) -> Result<(), TransportError> {
    let leaf = material
        .chain
        .first()
        .ok_or(TransportError::NoCertificate)?;
    let own = tls::identity_from_der(leaf)?;
    let expected = cert_name_of_node(node_id);
    if own.role != Role::Monitor || own.name != expected {
        return Err(TransportError::OwnCertificate {
            name: own.name,
            role: own.role,
            node_id,
            expected,
        });
    }
    Ok(())
}

/// The Raft node id of a peer on an established connection, if its certificate makes it one.
fn peer_node_id(conn: &quinn::Connection) -> Result<u64, String> {
    let peer = tls::peer_identity(conn).map_err(|e| e.to_string())?;
    if peer.role != Role::Monitor {
        return Err(format!(
            "{} certificate {:?} is not a monitor's",
            peer.role, peer.name
        ));
    }
    node_of_cert_name(&peer.name).ok_or_else(|| {
        format!(
            "monitor certificate {:?} names no Raft node (expected {CERT_NAME_PREFIX}N)",
            peer.name
        )
    })
}

/// One monitor's Raft QUIC endpoint: listens for peers and dials them.
#[derive(Clone)]
pub struct RaftEndpoint {
    endpoint: quinn::Endpoint,
    /// The dialling side, shared with the network factory (its client config is replaced by
    /// [`RaftServer::reload_tls`]).
    pool: Arc<Pool>,
    /// Served connections by `stable_id`, with the peer certificate's serial (for closing
    /// revoked ones on reload).
    served: Served,
    node_id: u64,
    tuning: QuicTuning,
}

type Served = Arc<Mutex<HashMap<usize, (String, quinn::Connection)>>>;

impl RaftEndpoint {
    /// Binds `addr` (UDP) for Raft node `node_id`. `server_tls` and `client_tls` are the same
    /// monitor certificate loaded twice (the key is moved into each configuration); it must be
    /// a monitor certificate named `mon<node_id>`.
    pub fn bind(
        addr: SocketAddr,
        node_id: u64,
        server_tls: TlsMaterial,
        client_tls: TlsMaterial,
        tuning: QuicTuning,
    ) -> Result<RaftEndpoint, TransportError> {
        check_own_certificate(&server_tls, node_id)?;
        check_own_certificate(&client_tls, node_id)?;
        let server = tls::server_config(server_tls, &[ALPN_RAFT], tuning.transport)?;
        let client = tls::client_config(client_tls, ALPN_RAFT, tuning.transport)?;
        let endpoint = quinn::Endpoint::server(server, addr)
            .map_err(|source| TransportError::Bind { addr, source })?;
        Ok(RaftEndpoint {
            pool: Arc::new(Pool {
                endpoint: endpoint.clone(),
                client: Mutex::new(client),
                self_id: node_id,
                tuning,
                slots: Mutex::new(HashMap::new()),
                matched: Mutex::new(HashMap::new()),
            }),
            endpoint,
            served: Arc::default(),
            node_id,
            tuning,
        })
    }

    /// The bound address (with the port chosen, if `addr` asked for port 0).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// Sends one `server reset` step to monitor `target` at `addr` (dialled within `wait`)
    /// and returns its answer; the error says why there is none.
    pub async fn reset_step(
        &self,
        target: u64,
        addr: &str,
        step: ResetStep,
        wait: Duration,
    ) -> Result<ResetReply, String> {
        let kind = RpcKind::Reset;
        let request = wire::encode_request(
            kind,
            &ResetRequest {
                from: self.node_id,
                step,
            },
        )
        .map_err(|e| e.to_string())?;
        let name = cert_name_of_node(target);
        let once = || async {
            let conn = self
                .pool
                .connection(target, addr, wait)
                .await
                .map_err(|e| (None, format!("cannot reach {name} at {addr}: {e}")))?;
            let io = |e: &dyn std::fmt::Display| (Some(conn.clone()), format!("{name}: {e}"));
            let (mut send, mut recv) = conn.open_bi().await.map_err(|e| io(&e))?;
            send.write_all(&request).await.map_err(|e| io(&e))?;
            send.finish().map_err(|e| io(&e))?;
            let reply: Reply<ResetReply, String> =
                wire::read_frame(&mut recv, kind, kind.reply_limit())
                    .await
                    .map_err(|e| io(&e))?;
            match reply {
                Reply::Ok(r) => Ok(r),
                Reply::Raft(e) | Reply::Refused(e) => Err((None, format!("{name}: {e}"))),
            }
        };
        // The monitor being reset was just restarted (`--reset`) on an address the pool may
        // still hold a connection to, from its previous process: that connection is dead.
        // Drop it and dial once more (the e2e test saw "connection lost" at the first probe).
        let work = async {
            match once().await {
                Err((Some(stale), _)) => {
                    self.pool.evict(target, &stale);
                    once().await.map_err(|(_, e)| e)
                }
                other => other.map_err(|(_, e)| e),
            }
        };
        tokio::time::timeout(wait + self.tuning.request_timeout, work)
            .await
            .map_err(|_| {
                format!(
                    "{} at {addr} did not answer in time",
                    cert_name_of_node(target)
                )
            })?
    }

    /// Forgets how far `target` acknowledged ([`super::reversion`]): for a node that is
    /// added to the membership (again), whose progress at the leader starts afresh.
    pub fn forget_progress(&self, target: u64) {
        self.pool
            .matched
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&target);
    }

    /// The network for [`super::RaftNode::open_with_network`].
    pub fn network(&self) -> QuicNetworkFactory {
        QuicNetworkFactory {
            pool: self.pool.clone(),
        }
    }

    /// Starts serving peers' RPCs to `raft`.
    /// Votes pass `gate` first (`super::leader_lease::VoteGate`).
    pub fn serve(&self, raft: Raft<TypeConfig>, gate: VoteGate) -> RaftServer {
        self.serve_with_reset(raft, gate, ResetGate::open())
    }

    /// [`Self::serve`] for a monitor that may wait to be re-admitted after a reset: while
    /// `reset` waits, every Raft message is refused ([`super::reset`]).
    pub fn serve_with_reset(
        &self,
        raft: Raft<TypeConfig>,
        gate: VoteGate,
        reset: ResetGate,
    ) -> RaftServer {
        match self.local_addr() {
            Ok(addr) => info!(node_id = self.node_id, %addr, "serving Raft peers"),
            Err(e) => warn!(node_id = self.node_id, error = %e, "Raft endpoint has no address"),
        }
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(accept_loop(
            self.endpoint.clone(),
            raft,
            self.tuning,
            gate,
            reset,
            self.served.clone(),
            stop_rx,
        ));
        RaftServer {
            endpoint: self.endpoint.clone(),
            raft_endpoint: self.clone(),
            stop,
            task,
        }
    }
}

// ---- Client ----

/// Creates [`QuicPeer`] clients sharing one pooled connection per node id.
#[derive(Clone)]
pub struct QuicNetworkFactory {
    pool: Arc<Pool>,
}

type DialResult = Option<Result<quinn::Connection, DialError>>;

struct Pool {
    endpoint: quinn::Endpoint,
    client: Mutex<quinn::ClientConfig>,
    self_id: u64,
    tuning: QuicTuning,
    slots: Mutex<HashMap<u64, Slot>>,
    /// How far each follower acknowledged under the current leader vote
    /// ([`super::reversion`]).
    matched: Mutex<HashMap<u64, super::reversion::Matched>>,
}

/// The connection to one node, or the dial under way.
#[derive(Default)]
struct Slot {
    addr: String,
    /// Bumped whenever a dial starts or the address changes; a dial finishing under an older
    /// generation is stale and its connection is closed, not pooled.
    generation: u64,
    conn: Option<quinn::Connection>,
    /// The dial in flight, and when it started.
    dialing: Option<(watch::Receiver<DialResult>, Instant)>,
}

/// An RPC that finds a dial in flight for longer than this starts a fresh one beside it. A
/// dial sent while the peer was down waits for QUIC's Initial retransmit (about a second)
/// even once the peer is back: every RPC of a leader to a restarted follower then gave up
/// after its TTL, the follower heard nothing, elected itself and deposed the leader.
const DIAL_STALE_AFTER: Duration = Duration::from_millis(200);

impl Pool {
    /// The pooled connection to `target`, dialling it if there is none; waits at most `wait`.
    async fn connection(
        self: &Arc<Self>,
        target: u64,
        addr: &str,
        wait: Duration,
    ) -> Result<quinn::Connection, Unreachable> {
        let mut rx = {
            let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
            let slot = slots.entry(target).or_default();
            if slot.addr != addr {
                if let Some(old) = slot.conn.take() {
                    old.close(close::NORMAL.into(), b"peer address changed");
                }
                slot.dialing = None;
                slot.addr = addr.to_string();
                slot.generation += 1;
            }
            if let Some(c) = &slot.conn {
                if c.close_reason().is_none() {
                    return Ok(c.clone());
                }
                slot.conn = None;
            }
            match &slot.dialing {
                Some((rx, since)) if since.elapsed() < DIAL_STALE_AFTER => rx.clone(),
                _ => {
                    let (tx, rx) = watch::channel(None);
                    slot.generation += 1;
                    slot.dialing = Some((rx.clone(), Instant::now()));
                    let generation = slot.generation;
                    let pool = self.clone();
                    let addr = addr.to_string();
                    tokio::spawn(async move {
                        let res = pool.dial(target, &addr).await;
                        pool.finish_dial(target, generation, &addr, &res);
                        tx.send_replace(Some(res));
                    });
                    rx
                }
            }
        };
        let outcome = tokio::time::timeout(wait, rx.wait_for(Option::is_some)).await;
        match outcome {
            Err(_) => Err(Unreachable::new(&DialError::Timeout {
                target,
                addr: addr.to_string(),
                after: wait,
            })),
            Ok(Err(_)) => Err(Unreachable::new(&DialError::Abandoned { target })),
            Ok(Ok(res)) => match &*res {
                Some(Ok(conn)) => Ok(conn.clone()),
                Some(Err(e)) => Err(Unreachable::new(e)),
                None => Err(Unreachable::new(&DialError::Abandoned { target })),
            },
        }
    }

    /// Drops `conn` from `target`'s slot if it is still the pooled one, and closes it.
    fn evict(&self, target: u64, conn: &quinn::Connection) {
        let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(slot) = slots.get_mut(&target) {
            if slot
                .conn
                .as_ref()
                .is_some_and(|c| c.stable_id() == conn.stable_id())
            {
                slot.conn = None;
            }
        }
        conn.close(
            close::NORMAL.into(),
            b"an RPC timed out or broke on it: dialling afresh",
        );
    }

    fn finish_dial(
        &self,
        target: u64,
        generation: u64,
        addr: &str,
        res: &Result<quinn::Connection, DialError>,
    ) {
        let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(slot) = slots.get_mut(&target) else {
            if let Ok(c) = res {
                c.close(close::NORMAL.into(), b"stale dial");
            }
            return;
        };
        if slot.generation == generation {
            slot.dialing = None;
        }
        // Any dial to the current address may fill an empty slot (an older one that got
        // through while a fresh one is still in flight, too); an extra one is closed.
        match res {
            Ok(c)
                if slot.addr == addr
                    && slot
                        .conn
                        .as_ref()
                        .is_none_or(|p| p.close_reason().is_some()) =>
            {
                slot.conn = Some(c.clone());
            }
            Ok(c) => c.close(close::NORMAL.into(), b"stale dial"),
            Err(_) => {}
        }
    }

    async fn dial(&self, target: u64, addr: &str) -> Result<quinn::Connection, DialError> {
        let timeout = self.tuning.connect_timeout;
        let timed_out = || DialError::Timeout {
            target,
            addr: addr.to_string(),
            after: timeout,
        };
        let work = async {
            let sock = tokio::net::lookup_host(addr)
                .await
                .map_err(|e| DialError::Resolve {
                    target,
                    addr: addr.to_string(),
                    reason: e.to_string(),
                })?
                .next()
                .ok_or_else(|| DialError::Resolve {
                    target,
                    addr: addr.to_string(),
                    reason: "no address".into(),
                })?;
            let connect_err = |reason: String| DialError::Connect {
                target,
                addr: addr.to_string(),
                reason,
            };
            let client = self
                .client
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone();
            let conn = self
                .endpoint
                .connect_with(client, sock, MONITOR_SERVER_NAME)
                .map_err(|e| connect_err(e.to_string()))?
                .await
                .map_err(|e| connect_err(e.to_string()))?;
            let expected = cert_name_of_node(target);
            match peer_node_id(&conn) {
                Ok(id) if id == target => Ok(conn),
                found => {
                    let found = match found {
                        Ok(id) => cert_name_of_node(id),
                        Err(why) => why,
                    };
                    conn.close(close::UNAUTHORIZED.into(), b"not the Raft node dialled");
                    Err(DialError::WrongPeer {
                        target,
                        addr: addr.to_string(),
                        found,
                        expected,
                    })
                }
            }
        };
        let res = tokio::time::timeout(timeout, work)
            .await
            .unwrap_or_else(|_| Err(timed_out()));
        match &res {
            Ok(_) => debug!(target, addr, "connected to Raft peer"),
            Err(e) => debug!(target, addr, error = %e, "cannot connect to Raft peer"),
        }
        res
    }
}

impl RaftNetworkFactory<TypeConfig> for QuicNetworkFactory {
    type Network = QuicPeer;

    /// Builds a handle only: no I/O here (this runs inside RaftCore's loop).
    async fn new_client(&mut self, target: u64, node: &BasicNode) -> QuicPeer {
        QuicPeer {
            target,
            node: node.clone(),
            pool: self.pool.clone(),
        }
    }
}

/// openraft's client for one peer; the connection lives in the shared pool.
pub struct QuicPeer {
    target: u64,
    node: BasicNode,
    pool: Arc<Pool>,
}

/// An RPC failure before the remote's error type is known.
// openraft's RPCError is large; this lives only between `call` and its caller, unboxed like
// the RPCError it becomes.
#[allow(clippy::large_enum_variant)]
enum CallError<W> {
    Rpc(RPCError<u64, BasicNode, RaftError<u64>>),
    Remote(W),
}

impl QuicPeer {
    fn stream_error(&self, kind: RpcKind, detail: impl ToString) -> NetworkError {
        NetworkError::new(&StreamError {
            target: self.target,
            kind,
            detail: detail.to_string(),
        })
    }

    /// Sends one encoded request and reads its reply, all within the RPC's hard TTL; the
    /// connection is waited for at most the soft TTL.
    async fn call<Resp, W>(
        &self,
        kind: RpcKind,
        request: Vec<u8>,
        option: &RPCOption,
    ) -> Result<Resp, CallError<W>>
    where
        Resp: DeserializeOwned,
        W: DeserializeOwned,
    {
        let hard = option.hard_ttl();
        // The connection this call used, so that a call that timed out or broke on it can
        // drop it from the pool (see below).
        let used: Mutex<Option<quinn::Connection>> = Mutex::new(None);
        let work = async {
            let conn = self
                .pool
                .connection(self.target, &self.node.addr, option.soft_ttl())
                .await
                .map_err(|e| CallError::Rpc(RPCError::Unreachable(e)))?;
            *used.lock().unwrap_or_else(PoisonError::into_inner) = Some(conn.clone());
            let net = |e: &dyn std::fmt::Display| {
                CallError::Rpc(RPCError::Network(self.stream_error(kind, e)))
            };
            let (mut send, mut recv) = conn.open_bi().await.map_err(|e| net(&e))?;
            send.write_all(&request).await.map_err(|e| net(&e))?;
            send.finish().map_err(|e| net(&e))?;
            let reply: Reply<Resp, W> = wire::read_frame(&mut recv, kind, kind.reply_limit())
                .await
                .map_err(|e| net(&e))?;
            match reply {
                Reply::Ok(r) => Ok(r),
                Reply::Raft(e) => Err(CallError::Remote(e)),
                Reply::Refused(reason) => Err(CallError::Rpc(RPCError::Unreachable(
                    Unreachable::new(&DialError::Refused {
                        target: self.target,
                        reason,
                    }),
                ))),
            }
        };
        let result = tokio::time::timeout(hard, work).await;
        // A peer whose process was killed and started again does not know the old
        // connection, and its packets for it are dropped (no stateless reset across
        // processes): the connection looks alive until its idle timeout, and every RPC on it
        // times out meanwhile — each election round lost on it. So a call that timed out or
        // broke drops its connection, and the next one dials afresh (found in the lab: the
        // term climbed by 2-3 per leader failover after a monitor restart).
        if matches!(
            result,
            Err(_) | Ok(Err(CallError::Rpc(RPCError::Network(_))))
        ) {
            if let Some(conn) = used.lock().unwrap_or_else(PoisonError::into_inner).take() {
                self.pool.evict(self.target, &conn);
            }
        }
        match result {
            Ok(r) => r,
            Err(_) => Err(CallError::Rpc(RPCError::Timeout(Timeout {
                action: match kind {
                    RpcKind::AppendEntries => RPCTypes::AppendEntries,
                    // `call` carries openraft's RPCs only (reset steps: `reset_step`).
                    RpcKind::Vote | RpcKind::Reset => RPCTypes::Vote,
                    RpcKind::InstallSnapshot => RPCTypes::InstallSnapshot,
                },
                id: self.pool.self_id,
                target: self.target,
                timeout: hard,
            }))),
        }
    }

    /// Passes `resp` on unless it shows the follower's log went back
    /// ([`super::reversion`]); then the follower is reported unreachable, with why.
    fn check_reversion(
        &self,
        vote: &openraft::Vote<u64>,
        prev: Option<openraft::LogId<u64>>,
        last: Option<openraft::LogId<u64>>,
        resp: AppendEntriesResponse<u64>,
    ) -> Result<AppendEntriesResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        let verdict = {
            let mut matched = self
                .pool
                .matched
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let mut slot = matched.remove(&self.target);
            let v = super::reversion::observe(&mut slot, vote, prev, last, &resp);
            if let Some(s) = slot {
                matched.insert(self.target, s);
            }
            v
        };
        let super::reversion::Verdict::Reverted {
            matched,
            conflict,
            first,
        } = verdict
        else {
            return Ok(resp);
        };
        let name = cert_name_of_node(self.target);
        let reason = format!(
            "{name}'s Raft log went back: it acknowledged up to index {matched} and now lacks \
             index {conflict}. Its database was lost or replaced while it stayed a member, so \
             it is cut off from replication; bring it back with `vigil-monitor --reset` on \
             {name}, then `vigilctl server reset {}` here",
            self.target
        );
        if first {
            tracing::error!(target_node = self.target, "{reason}");
        }
        Err(RPCError::Unreachable(Unreachable::new(
            &DialError::Refused {
                target: self.target,
                reason,
            },
        )))
    }

    fn remote<E: std::error::Error>(
        &self,
        e: RaftError<u64, E>,
    ) -> RPCError<u64, BasicNode, RaftError<u64, E>> {
        RPCError::RemoteError(RemoteError::new_with_node(
            self.target,
            self.node.clone(),
            e,
        ))
    }
}

/// Re-types an RPC error that carries no remote error (every variant but `RemoteError`).
fn retype<E: std::error::Error>(
    e: RPCError<u64, BasicNode, RaftError<u64>>,
) -> RPCError<u64, BasicNode, RaftError<u64, E>> {
    match e {
        RPCError::Timeout(t) => RPCError::Timeout(t),
        RPCError::Unreachable(u) => RPCError::Unreachable(u),
        RPCError::PayloadTooLarge(p) => RPCError::PayloadTooLarge(p),
        RPCError::Network(n) => RPCError::Network(n),
        RPCError::RemoteError(r) => RPCError::RemoteError(RemoteError {
            target: r.target,
            target_node: r.target_node,
            source: match r.source {
                RaftError::Fatal(f) => RaftError::Fatal(f),
                RaftError::APIError(never) => match never {},
            },
        }),
    }
}

impl RaftNetwork<TypeConfig> for QuicPeer {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        let kind = RpcKind::AppendEntries;
        let entries = rpc.entries.len() as u64;
        let request = match wire::encode_append_entries(&rpc) {
            Ok(r) => r,
            // Too many entries for one frame: openraft retries at once with fewer. One entry
            // that alone is too large cannot be sent at all; say so (a hint of 1 again would
            // make openraft retry in a tight loop).
            Err(FrameError::TooLarge { .. } | FrameError::Codec(_)) if entries > 1 => {
                return Err(RPCError::PayloadTooLarge(
                    PayloadTooLarge::new_entries_hint(entries / 2),
                ))
            }
            Err(e) => return Err(RPCError::Network(self.stream_error(kind, e))),
        };
        let (vote, prev) = (rpc.vote, rpc.prev_log_id);
        let last = rpc.entries.last().map(|e| e.log_id).or(prev);
        match self.call::<_, Fatal<u64>>(kind, request, &option).await {
            Ok(r) => self.check_reversion(&vote, prev, last, r),
            Err(CallError::Rpc(e)) => Err(e),
            Err(CallError::Remote(f)) => Err(self.remote(RaftError::Fatal(f))),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<u64>,
        RPCError<u64, BasicNode, RaftError<u64, InstallSnapshotError>>,
    > {
        let kind = RpcKind::InstallSnapshot;
        let request = wire::encode_request(kind, &rpc)
            .map_err(|e| RPCError::Network(self.stream_error(kind, e)))?;
        match self
            .call::<_, RaftError<u64, InstallSnapshotError>>(kind, request, &option)
            .await
        {
            Ok(r) => Ok(r),
            Err(CallError::Rpc(e)) => Err(retype(e)),
            Err(CallError::Remote(e)) => Err(self.remote(e)),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        option: RPCOption,
    ) -> Result<VoteResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        let kind = RpcKind::Vote;
        let request = wire::encode_request(kind, &rpc)
            .map_err(|e| RPCError::Network(self.stream_error(kind, e)))?;
        match self.call::<_, Fatal<u64>>(kind, request, &option).await {
            Ok(r) => Ok(r),
            Err(CallError::Rpc(e)) => Err(e),
            Err(CallError::Remote(f)) => Err(self.remote(RaftError::Fatal(f))),
        }
    }
}

// ---- Server ----

/// Serves peers' Raft RPCs until [`RaftServer::shutdown`].
pub struct RaftServer {
    endpoint: quinn::Endpoint,
    raft_endpoint: RaftEndpoint,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl RaftServer {
    /// How many peer connections this server holds now.
    pub fn served_connections(&self) -> usize {
        self.raft_endpoint
            .served
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// SIGHUP: serves and dials with a renewed certificate and the current CRL from now on,
    /// and closes every Raft connection, served or dialled, whose peer certificate the CRL
    /// lists (a removed monitor's, revoked: shut out without a restart). `server_tls` and
    /// `client_tls` are the same material loaded twice; still `mon<node_id>`'s, or refused
    /// with nothing changed. Returns what it did, for the log.
    pub fn reload_tls(
        &self,
        server_tls: TlsMaterial,
        client_tls: TlsMaterial,
    ) -> Result<String, TransportError> {
        let ep = &self.raft_endpoint;
        check_own_certificate(&server_tls, ep.node_id)?;
        check_own_certificate(&client_tls, ep.node_id)?;
        let mut revoked = std::collections::BTreeSet::new();
        for crl in &server_tls.crls {
            revoked.extend(tls::crl_serials(crl)?);
        }
        let server = tls::server_config(server_tls, &[ALPN_RAFT], ep.tuning.transport)?;
        let client = tls::client_config(client_tls, ALPN_RAFT, ep.tuning.transport)?;
        ep.endpoint.set_server_config(Some(server));
        *ep.pool
            .client
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = client;
        let serial_of = |c: &quinn::Connection| tls::peer_cert_info(c).ok().map(|i| i.serial);
        let mut closed = Vec::new();
        for (serial, conn) in ep
            .served
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
        {
            if revoked.contains(serial) {
                conn.close(close::UNAUTHORIZED.into(), b"certificate revoked");
                closed.push(format!(
                    "served {} (serial {serial})",
                    conn.remote_address()
                ));
            }
        }
        for (node, slot) in ep
            .pool
            .slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter_mut()
        {
            if let Some(serial) = slot.conn.as_ref().and_then(serial_of) {
                if revoked.contains(&serial) {
                    if let Some(c) = slot.conn.take() {
                        c.close(close::UNAUTHORIZED.into(), b"certificate revoked");
                    }
                    closed.push(format!("to {} (serial {serial})", cert_name_of_node(*node)));
                }
            }
        }
        Ok(format!(
            "Raft transport reloaded: CRL lists {} serial(s){}",
            revoked.len(),
            if closed.is_empty() {
                String::new()
            } else {
                format!("; closed revoked connections: {}", closed.join(", "))
            }
        ))
    }

    /// Stops accepting, closes every connection of the endpoint (served and dialled) and
    /// waits for the accept loop to end.
    pub async fn shutdown(self) {
        self.stop.send_replace(true);
        self.endpoint
            .close(close::SHUTDOWN.into(), b"monitor shutting down");
        if let Err(e) = self.task.await {
            warn!(error = %e, "Raft server task failed");
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), self.endpoint.wait_idle()).await;
    }
}

async fn accept_loop(
    endpoint: quinn::Endpoint,
    raft: Raft<TypeConfig>,
    tuning: QuicTuning,
    gate: VoteGate,
    reset: ResetGate,
    served: Served,
    mut stop: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(tuning.max_connections));
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let incoming = tokio::select! {
            i = endpoint.accept() => match i { Some(i) => i, None => break },
            _ = stop.wait_for(|s| *s) => break,
        };
        // Reap finished connection tasks so the set does not grow.
        while conns.try_join_next().is_some() {}
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            warn!(remote = %incoming.remote_address(), "too many Raft connections; refusing");
            incoming.refuse();
            continue;
        };
        let (raft, gate, reset, served) =
            (raft.clone(), gate.clone(), reset.clone(), served.clone());
        conns.spawn(async move {
            serve_connection(incoming, raft, tuning, gate, reset, served).await;
            drop(permit);
        });
    }
    conns.shutdown().await;
}

async fn serve_connection(
    incoming: quinn::Incoming,
    raft: Raft<TypeConfig>,
    tuning: QuicTuning,
    gate: VoteGate,
    reset: ResetGate,
    served: Served,
) {
    let remote = incoming.remote_address();
    let conn = match tokio::time::timeout(tuning.connect_timeout, incoming).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            // Includes peers without a certificate or with one from another CA.
            warn!(%remote, error = %e, "Raft handshake failed");
            return;
        }
        Err(_) => {
            warn!(%remote, "Raft handshake timed out");
            return;
        }
    };
    if tls::negotiated_alpn(&conn).as_deref() != Some(ALPN_RAFT) {
        conn.close(
            close::PROTOCOL_ERROR.into(),
            b"Raft endpoint speaks only vigil-raft/1",
        );
        return;
    }
    let peer = match peer_node_id(&conn) {
        Ok(id) => id,
        Err(why) => {
            warn!(%remote, "Raft connection refused: {why}");
            conn.close(close::UNAUTHORIZED.into(), why.as_bytes());
            return;
        }
    };
    debug!(%remote, peer, "Raft peer connected");
    let id = conn.stable_id();
    let serial = tls::peer_cert_info(&conn)
        .map(|i| i.serial)
        .unwrap_or_default();
    served
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .insert(id, (serial, conn.clone()));
    let mut streams = tokio::task::JoinSet::new();
    loop {
        let (send, recv) = match conn.accept_bi().await {
            Ok(s) => s,
            Err(e) => {
                debug!(%remote, peer, error = %e, "Raft connection ended");
                break;
            }
        };
        while streams.try_join_next().is_some() {}
        // Concurrency is bounded by the connection's stream limit.
        streams.spawn(serve_stream(
            send,
            recv,
            raft.clone(),
            peer,
            tuning,
            gate.clone(),
            reset.clone(),
        ));
    }
    streams.shutdown().await;
    served
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .remove(&id);
}

async fn serve_stream(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    raft: Raft<TypeConfig>,
    peer: u64,
    tuning: QuicTuning,
    gate: VoteGate,
    reset: ResetGate,
) {
    let request =
        match tokio::time::timeout(tuning.request_timeout, wire::read_request(&mut recv)).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                warn!(peer, error = %e, "unreadable Raft request; stream dropped");
                let _ = recv.stop(close::PROTOCOL_ERROR.into());
                let _ = send.reset(close::PROTOCOL_ERROR.into());
                return;
            }
            Err(_) => {
                warn!(peer, "Raft request not received in time; stream dropped");
                let _ = recv.stop(close::PROTOCOL_ERROR.into());
                let _ = send.reset(close::PROTOCOL_ERROR.into());
                return;
            }
        };
    let claimed = request.claimed_sender();
    let reset_refusal = reset.refusal(raft.metrics().borrow().id);
    let frame = if claimed != Some(peer) {
        let reason = format!(
            "request claims to come from Raft node {claimed:?}, but the certificate is {}",
            cert_name_of_node(peer)
        );
        warn!(peer, "{reason}");
        refused_reply(&request, reason)
    } else if let Request::Reset(r) = &request {
        let reply = match reset.answer(r.step) {
            Ok(answer) => {
                info!(peer, step = ?r.step, waiting = answer.waiting, "reset request");
                Reply::Ok(answer)
            }
            Err(e) => {
                warn!(peer, error = %e, "cannot end the reset wait");
                Reply::Raft(format!("cannot remove the reset marker: {e}"))
            }
        };
        encode_reply(RpcKind::Reset, &reply)
    } else if let Some(why) = reset_refusal {
        debug!(peer, "Raft message refused: {why}");
        refused_reply(&request, why)
    } else if let Some(why) = matches!(request, Request::Vote(_))
        .then(|| {
            let metrics = raft.metrics();
            let voters = metrics.borrow().membership_config.voter_ids().collect();
            vote_refusal_by_membership(&voters, peer)
        })
        .flatten()
    {
        warn!(peer, "vote refused: {why}");
        refused_reply(&request, why)
    } else if let Some(why) = matches!(request, Request::Vote(_))
        .then(|| gate.refusal(Instant::now()))
        .flatten()
    {
        let reason = why.to_string();
        debug!(peer, "vote refused: {reason}");
        refused_reply(&request, reason)
    } else {
        match request {
            Request::AppendEntries(r) => encode_reply(
                RpcKind::AppendEntries,
                &fatal_only(raft.append_entries(r).await),
            ),
            Request::Vote(r) => encode_reply(RpcKind::Vote, &fatal_only(raft.vote(r).await)),
            Request::InstallSnapshot(r) => {
                let reply = match raft.install_snapshot(r).await {
                    Ok(resp) => Reply::Ok(resp),
                    Err(e) => Reply::Raft(e),
                };
                encode_reply(RpcKind::InstallSnapshot, &reply)
            }
            Request::Reset(_) => unreachable_reset(),
        }
    };
    match frame {
        Ok(bytes) => {
            if let Err(e) = send.write_all(&bytes).await {
                debug!(peer, error = %e, "cannot send Raft reply");
                return;
            }
            let _ = send.finish();
        }
        Err(e) => {
            warn!(peer, error = %e, "cannot encode Raft reply");
            let _ = send.reset(close::PROTOCOL_ERROR.into());
        }
    }
}

/// Why a vote request from node `peer` is refused, given this node's `voters` (of its
/// effective membership, both halves of a joint one): it is not one of them. None while this
/// node knows no membership yet (a fresh node, before the cluster's first entry reaches it).
/// A lagging node may thus refuse a voter added after what it has seen: harmless, the
/// candidate needs only a majority, and the lagging node catches up from the leader.
pub(super) fn vote_refusal_by_membership(
    voters: &std::collections::BTreeSet<u64>,
    peer: u64,
) -> Option<String> {
    (!voters.is_empty() && !voters.contains(&peer)).then(|| {
        format!(
            "{} is not a voter of this cluster (voters: {}): a removed monitor's certificate grants no vote",
            cert_name_of_node(peer),
            voters
                .iter()
                .map(|v| cert_name_of_node(*v))
                .collect::<Vec<_>>()
                .join(", ")
        )
    })
}

/// The reply of a request refused by the transport, typed as its kind's reply.
fn refused_reply(request: &Request, reason: String) -> Result<Vec<u8>, FrameError> {
    match request {
        Request::AppendEntries(_) => encode_reply(
            RpcKind::AppendEntries,
            &Reply::<AppendEntriesResponse<u64>, Fatal<u64>>::Refused(reason),
        ),
        Request::Vote(_) => encode_reply(
            RpcKind::Vote,
            &Reply::<VoteResponse<u64>, Fatal<u64>>::Refused(reason),
        ),
        Request::InstallSnapshot(_) => encode_reply(
            RpcKind::InstallSnapshot,
            &Reply::<InstallSnapshotResponse<u64>, RaftError<u64, InstallSnapshotError>>::Refused(
                reason,
            ),
        ),
        Request::Reset(_) => encode_reply(
            RpcKind::Reset,
            &Reply::<ResetReply, String>::Refused(reason),
        ),
    }
}

/// Reset requests are answered before openraft's are dispatched.
fn unreachable_reset() -> Result<Vec<u8>, FrameError> {
    Err(FrameError::Command(
        "internal error: a reset request reached the openraft dispatch".into(),
    ))
}

/// `RaftError<u64>` (API error `Infallible`) is always `Fatal`; only that goes on the wire
/// (serde has no impl for `Infallible`).
fn fatal_only<T>(res: Result<T, RaftError<u64>>) -> Reply<T, Fatal<u64>> {
    match res {
        Ok(r) => Reply::Ok(r),
        Err(RaftError::Fatal(f)) => Reply::Raft(f),
        Err(RaftError::APIError(never)) => match never {},
    }
}

fn encode_reply<T: Serialize>(kind: RpcKind, reply: &T) -> Result<Vec<u8>, FrameError> {
    wire::encode_frame(kind, kind.reply_limit(), reply)
}
