//! The leader lease with real openraft, real QUIC and mutual TLS between three in-process
//! monitors: the leader is cut off from the other two (every RPC between them fails, both
//! ways), and the test records, every 10 ms, which monitors hold the lease.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::BasicNode;
use tokio::sync::watch;
use vigil_common::tls::Role;

use super::leader_lease::{self, Serving};
use super::quic::{QuicNetworkFactory, QuicPeer, QuicTuning, RaftEndpoint, RaftServer};
use super::quic_tests::{register, temp_dirs, wait_until, Pki, WAIT};
use super::{RaftNode, RaftTuning, TypeConfig};

/// Links cut, as (from, to).
#[derive(Clone, Default)]
struct Cuts(Arc<Mutex<BTreeSet<(u64, u64)>>>);

impl Cuts {
    fn is_cut(&self, from: u64, to: u64) -> bool {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(&(from, to))
    }

    /// Cuts `node` off from every other node of `all`, both ways.
    fn isolate(&self, node: u64, all: &[u64]) {
        let mut c = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        for &other in all.iter().filter(|o| **o != node) {
            c.insert((node, other));
            c.insert((other, node));
        }
    }
}

/// The real QUIC network, with links that can be cut.
struct CutNetwork {
    me: u64,
    inner: QuicNetworkFactory,
    cuts: Cuts,
}

struct CutPeer {
    me: u64,
    target: u64,
    inner: QuicPeer,
    cuts: Cuts,
}

impl RaftNetworkFactory<TypeConfig> for CutNetwork {
    type Network = CutPeer;

    async fn new_client(&mut self, target: u64, node: &BasicNode) -> CutPeer {
        CutPeer {
            me: self.me,
            target,
            inner: self.inner.new_client(target, node).await,
            cuts: self.cuts.clone(),
        }
    }
}

impl CutPeer {
    fn cut<E: std::error::Error>(&self) -> Option<RPCError<u64, BasicNode, E>> {
        self.cuts.is_cut(self.me, self.target).then(|| {
            RPCError::Network(NetworkError::new(&std::io::Error::other(
                "link cut by the test",
            )))
        })
    }
}

impl RaftNetwork<TypeConfig> for CutPeer {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        match self.cut() {
            Some(e) => Err(e),
            None => self.inner.append_entries(rpc, option).await,
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
        match self.cut() {
            Some(e) => Err(e),
            None => self.inner.install_snapshot(rpc, option).await,
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        option: RPCOption,
    ) -> Result<VoteResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        match self.cut() {
            Some(e) => Err(e),
            None => self.inner.vote(rpc, option).await,
        }
    }
}

struct Member {
    id: u64,
    node: Arc<RaftNode>,
    lease: watch::Receiver<Option<Serving>>,
    _server: RaftServer,
    _endpoint: RaftEndpoint,
}

const LEASE_MS: u64 = 400;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_cut_off_from_its_quorum_stops_acting_before_the_new_leader_starts() {
    let pki = Pki::new("test");
    let dirs = temp_dirs(3);
    let cuts = Cuts::default();
    let epoch = Instant::now();
    let (_stop_tx, stop) = watch::channel(false);
    let config = RaftTuning {
        heartbeat_interval_ms: 100,
        election_timeout_min_ms: LEASE_MS,
        election_timeout_max_ms: 800,
    }
    .to_config();
    let any: SocketAddr = "127.0.0.1:0".parse().expect("addr");
    let mut members = Vec::new();
    for (i, dir) in dirs.iter().enumerate() {
        let id = i as u64 + 1;
        let (server, client) = pki.material(Role::Monitor, &format!("mon{id}"));
        let endpoint =
            RaftEndpoint::bind(any, id, server, client, QuicTuning::default()).expect("bind");
        let addr = endpoint.local_addr().expect("addr");
        let network = CutNetwork {
            me: id,
            inner: endpoint.network(),
            cuts: cuts.clone(),
        };
        let node =
            RaftNode::open_with_network(dir.path(), id, addr.to_string(), config.clone(), network)
                .await
                .expect("open");
        let gate = leader_lease::VoteGate::new(
            Instant::now(),
            Duration::from_millis(node.election_timeout_max_ms()),
        );
        let server = endpoint.serve(node.raft().clone(), gate.clone());
        let node = Arc::new(node);
        let lease = leader_lease::spawn(node.clone(), LEASE_MS, epoch, gate, stop.clone());
        members.push(Member {
            id,
            node,
            lease,
            _server: server,
            _endpoint: endpoint,
        });
    }
    let others: std::collections::BTreeMap<u64, String> = members[1..]
        .iter()
        .map(|m| (m.id, m.node.addr().to_string()))
        .collect();
    members[0]
        .node
        .initialize_with_if_new(&others)
        .await
        .expect("initialize");
    wait_until("one monitor holds the leader lease", || {
        members
            .iter()
            .filter(|m| m.lease.borrow().is_some())
            .count()
            == 1
    })
    .await;
    let old = members
        .iter()
        .find(|m| m.lease.borrow().is_some())
        .map(|m| m.id)
        .expect("a lease holder");
    members[0].node.write(register("hv1")).await.ok();

    // Every 10 ms: who holds the lease.
    let watch: Vec<(u64, watch::Receiver<Option<Serving>>)> =
        members.iter().map(|m| (m.id, m.lease.clone())).collect();
    let sampler = tokio::spawn(async move {
        let mut samples = Vec::new();
        let until = Instant::now() + Duration::from_secs(8);
        while Instant::now() < until {
            let holders: Vec<u64> = watch
                .iter()
                .filter(|(_, l)| l.borrow().is_some())
                .map(|(id, _)| *id)
                .collect();
            samples.push((Instant::now(), holders));
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        samples
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let cut_at = Instant::now();
    cuts.isolate(old, &[1, 2, 3]);
    let samples = sampler.await.expect("sampler");

    // Never two holders at once.
    for (at, holders) in &samples {
        assert!(
            holders.len() <= 1,
            "two monitors held the leader lease {:?} after the cut: {holders:?}",
            at.saturating_duration_since(cut_at)
        );
    }
    // The cut-off leader let go within a lease (and a probe period) of the cut...
    let old_gone = samples
        .iter()
        .find(|(at, h)| *at >= cut_at && !h.contains(&old))
        .map(|(at, _)| at.duration_since(cut_at))
        .expect("the old leader let go");
    assert!(
        old_gone <= Duration::from_millis(LEASE_MS + LEASE_MS / 4 + 300),
        "the cut-off leader held its lease {old_gone:?} after the cut"
    );
    // ... while Raft still told it that it leads (openraft never steps it down).
    let still_raft_leader = members
        .iter()
        .find(|m| m.id == old)
        .is_some_and(|m| m.node.is_leader());
    // ... and the majority has a new lease holder, one only.
    let (_, last) = samples.last().expect("samples");
    assert_eq!(last.len(), 1, "one new lease holder at the end: {last:?}");
    assert_ne!(last[0], old, "the majority's new leader holds it");
    let new_from = samples
        .iter()
        .find(|(_, h)| h.contains(&last[0]))
        .map(|(at, _)| at.saturating_duration_since(cut_at))
        .expect("new holder");
    eprintln!(
        "cut-off leader {old} let go after {old_gone:?} (still Raft leader: {still_raft_leader}); \
         monitor {} took over after {new_from:?}",
        last[0]
    );
    assert!(new_from > old_gone, "handover without overlap");
    // The new leader commits.
    let new = members.iter().find(|m| m.id == last[0]).expect("new");
    tokio::time::timeout(WAIT, new.node.write(register("hv2")))
        .await
        .expect("write in time")
        .expect("the new leader commits");
}
