//! Raft over the real transport: quinn + rustls mutual TLS on 127.0.0.1, redb in temporary
//! directories, openraft itself, certificates from the crate's own CA code.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use openraft::error::{Fatal, RPCError};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{VoteRequest, VoteResponse};
use openraft::{BasicNode, CommittedLeaderId, LogId, ServerState, Vote};
use vigil_common::tls::{self, init_ca, CaSigner, Role, TlsMaterial, TransportTuning};
use vigil_common::wire::MONITOR_SERVER_NAME;

use super::leader_lease::VoteGate;
use super::quic::{QuicTuning, RaftEndpoint, RaftServer};
use super::wire::{self, Reply, RpcKind, ALPN_RAFT};
use super::{RaftNode, RaftTuning, WriteError};
use crate::state::StateCommand;

/// Generous: CI is a loaded 2-core machine.
pub(super) const WAIT: Duration = Duration::from_secs(30);

pub(super) struct Pki {
    _dir: tempfile::TempDir,
    ca: CaSigner,
}

impl Pki {
    pub(super) fn new(name: &str) -> Pki {
        let dir = tempfile::tempdir().expect("tempdir");
        init_ca(dir.path(), name).expect("init ca");
        let ca = CaSigner::load(dir.path()).expect("load ca");
        Pki { _dir: dir, ca }
    }

    /// The same certificate loaded twice (server side, client side).
    pub(super) fn material(&self, role: Role, name: &str) -> (TlsMaterial, TlsMaterial) {
        let (cert, key) = self.ca.issue(role, name, &[], 30).expect("issue");
        let load = || TlsMaterial::from_pem(&self.ca.cert_pem, &cert, &key).expect("material");
        (load(), load())
    }
}

fn tuning() -> openraft::Config {
    RaftTuning {
        heartbeat_interval_ms: 300,
        election_timeout_min_ms: 1500,
        election_timeout_max_ms: 3000,
    }
    .to_config()
}

/// For nodes that never elect (one voter, or none): a short vote lease, so that they answer
/// votes `QUICK_VOTE_LEASE` after they started (`leader_lease::VoteGate`).
fn quick_votes() -> openraft::Config {
    RaftTuning {
        heartbeat_interval_ms: 100,
        election_timeout_min_ms: 200,
        election_timeout_max_ms: QUICK_VOTE_LEASE.as_millis() as u64,
    }
    .to_config()
}

const QUICK_VOTE_LEASE: Duration = Duration::from_millis(300);

struct TestNode {
    id: u64,
    addr: SocketAddr,
    dir: PathBuf,
    node: RaftNode,
    endpoint: RaftEndpoint,
    server: RaftServer,
}

impl TestNode {
    /// Binds `addr` (retrying while a previous incarnation's socket is being released), then
    /// opens the node's Raft data in `dir` and serves it.
    async fn start(
        pki: &Pki,
        id: u64,
        dir: &Path,
        addr: SocketAddr,
        config: openraft::Config,
    ) -> TestNode {
        let deadline = tokio::time::Instant::now() + WAIT;
        let endpoint = loop {
            let (server, client) = pki.material(Role::Monitor, &format!("mon{id}"));
            match RaftEndpoint::bind(addr, id, server, client, QuicTuning::default()) {
                Ok(e) => break e,
                Err(e) if tokio::time::Instant::now() < deadline => {
                    eprintln!("bind {addr}: {e}; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("cannot bind {addr}: {e}"),
            }
        };
        let addr = endpoint.local_addr().expect("local addr");
        let node =
            RaftNode::open_with_network(dir, id, addr.to_string(), config, endpoint.network())
                .await
                .expect("open raft node");
        let gate = VoteGate::new(
            std::time::Instant::now(),
            Duration::from_millis(node.election_timeout_max_ms()),
        );
        let server = endpoint.serve(node.raft().clone(), gate);
        TestNode {
            id,
            addr,
            dir: dir.to_path_buf(),
            node,
            endpoint,
            server,
        }
    }

    async fn stop(self) {
        self.server.shutdown().await;
        self.node.shutdown().await;
        drop(self.endpoint);
    }

    fn has_host(&self, name: &str) -> bool {
        self.node.read(|s| s.hosts.contains_key(name))
    }
}

pub(super) fn register(name: &str) -> StateCommand {
    crate::state::registration(1, name)
}

/// `n` fresh temporary directories, one per node's store.
pub(super) fn temp_dirs(n: usize) -> Vec<tempfile::TempDir> {
    (0..n)
        .map(|_| tempfile::tempdir().expect("tempdir"))
        .collect()
}

pub(super) async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {WAIT:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Writes through whichever of `nodes` leads, retrying while leadership settles.
async fn write_on_leader(nodes: &[&TestNode], cmd: StateCommand) -> u64 {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        for n in nodes {
            if n.node.is_leader() {
                match n.node.write(cmd.clone()).await {
                    Ok(_) => return n.id,
                    Err(WriteError::NotLeader(_)) => {}
                    Err(e) => eprintln!("write on node {}: {e}", n.id),
                }
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no leader accepted the write within {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Node 1 bootstraps; the others join as learners, then all become voters.
async fn form_cluster(pki: &Pki, dirs: &[&Path], config: openraft::Config) -> Vec<TestNode> {
    let any: SocketAddr = "127.0.0.1:0".parse().expect("addr");
    let mut nodes = Vec::new();
    for (i, dir) in dirs.iter().enumerate() {
        nodes.push(TestNode::start(pki, i as u64 + 1, dir, any, config.clone()).await);
    }
    let first = &nodes[0].node;
    first.initialize_single_if_new().await.expect("initialize");
    assert_eq!(first.wait_for_leader(WAIT).await, Some(1));
    for n in &nodes[1..] {
        // The blocking form waits for the learner to catch up, forever if it never does.
        tokio::time::timeout(
            WAIT,
            first
                .raft()
                .add_learner(n.id, BasicNode::new(n.addr.to_string()), true),
        )
        .await
        .expect("add_learner in time")
        .expect("add_learner");
    }
    let voters: BTreeSet<u64> = nodes.iter().map(|n| n.id).collect();
    tokio::time::timeout(WAIT, first.raft().change_membership(voters.clone(), false))
        .await
        .expect("change_membership in time")
        .expect("change_membership");
    for n in &nodes {
        let want = voters.clone();
        wait_until(&format!("node {} sees all voters", n.id), || {
            let m = n.node.metrics();
            m.membership_config
                .membership()
                .voter_ids()
                .collect::<BTreeSet<_>>()
                == want
        })
        .await;
    }
    nodes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_monitors_replicate_a_write_and_elect_a_new_leader_when_the_leader_stops() {
    let pki = Pki::new("test");
    let dirs = temp_dirs(3);
    let paths: Vec<&Path> = dirs.iter().map(|d| d.path()).collect();
    let mut nodes = form_cluster(&pki, &paths, tuning()).await;

    let leader = write_on_leader(&nodes.iter().collect::<Vec<_>>(), register("hv1")).await;
    for n in &nodes {
        wait_until(&format!("node {} has hv1", n.id), || n.has_host("hv1")).await;
    }

    let at = nodes
        .iter()
        .position(|n| n.id == leader)
        .expect("leader is a node");
    let old = nodes.remove(at);
    let old_term = old.node.metrics().current_term;
    old.stop().await;

    let rest: Vec<&TestNode> = nodes.iter().collect();
    wait_until("a new leader among the survivors", || {
        rest.iter().any(|n| {
            let m = n.node.metrics();
            m.state == ServerState::Leader && m.current_term > old_term
        })
    })
    .await;
    let new_leader = write_on_leader(&rest, register("hv2")).await;
    assert_ne!(new_leader, leader);
    for n in &rest {
        wait_until(&format!("node {} has hv2", n.id), || {
            n.has_host("hv1") && n.has_host("hv2")
        })
        .await;
    }
    for n in nodes {
        n.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_that_was_down_while_the_log_was_purged_catches_up_through_a_snapshot() {
    let pki = Pki::new("test");
    let mut config = tuning();
    config.snapshot_policy = openraft::SnapshotPolicy::LogsSinceLast(20);
    config.max_in_snapshot_log_to_keep = 0;
    let dirs = temp_dirs(3);
    let paths: Vec<&Path> = dirs.iter().map(|d| d.path()).collect();
    let mut nodes = form_cluster(&pki, &paths, config.clone()).await;
    write_on_leader(&nodes.iter().collect::<Vec<_>>(), register("before")).await;
    for n in &nodes {
        wait_until(&format!("node {} has the first write", n.id), || {
            n.has_host("before")
        })
        .await;
    }

    // Stop a follower.
    let at = nodes
        .iter()
        .position(|n| !n.node.is_leader())
        .expect("a follower");
    let down = nodes.remove(at);
    let (down_id, down_addr, down_dir) = (down.id, down.addr, down.dir.clone());
    let down_last = down.node.metrics().last_log_index.expect("has a log");
    down.stop().await;

    // Enough writes for several snapshots; the leader purges its log behind them. Each host
    // carries 8 KiB, so the snapshot needs several InstallSnapshot chunks.
    let up: Vec<&TestNode> = nodes.iter().collect();
    for i in 0..60 {
        let cmd = StateCommand::RegisterHost {
            at_ms: 2,
            name: format!("hv{i:02}"),
            zone: "z1".into(),
            cluster: "c1".into(),
            agent_version: "v".repeat(8 * 1024),
        };
        write_on_leader(&up, cmd).await;
    }
    wait_until(
        "the leader purged the entries the stopped follower lacks",
        || {
            up.iter().any(|n| {
                let m = n.node.metrics();
                m.state == ServerState::Leader
                    && m.purged.is_some_and(|p| p.index > down_last)
                    && m.snapshot.is_some()
            })
        },
    )
    .await;

    let leader = up.iter().find(|n| n.node.is_leader()).expect("a leader");
    let snapshot = leader
        .node
        .raft()
        .get_snapshot()
        .await
        .expect("get snapshot")
        .expect("a snapshot");
    let size = snapshot.snapshot.get_ref().len();
    assert!(
        size > wire::SNAPSHOT_CHUNK_BYTES,
        "snapshot of {size} bytes fits one chunk"
    );

    // The follower returns on the same address with its old data.
    let back = TestNode::start(&pki, down_id, &down_dir, down_addr, config).await;
    wait_until("the returning follower has every write", || {
        back.has_host("before") && (0..60).all(|i| back.has_host(&format!("hv{i:02}")))
    })
    .await;
    let m = back.node.metrics();
    // The entries it lacked are gone from every log: only a snapshot could bring them.
    assert!(
        m.snapshot.is_some_and(|s| s.index > down_last),
        "follower snapshot {:?}, it stopped at {down_last}",
        m.snapshot
    );
    back.stop().await;
    for n in nodes {
        n.stop().await;
    }
}

// ---- Security and robustness: a one-node cluster attacked through its Raft port. ----

/// A bare Raft client with `material`, sending one Vote.
async fn raw_vote(
    material: TlsMaterial,
    server: SocketAddr,
    vote: &VoteRequest<u64>,
) -> Result<Reply<VoteResponse<u64>, Fatal<u64>>, String> {
    let work = async {
        let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().map_err(|e| format!("{e}"))?)
            .map_err(|e| e.to_string())?;
        let cfg = tls::client_config(material, ALPN_RAFT, TransportTuning::default())
            .map_err(|e| e.to_string())?;
        let conn = endpoint
            .connect_with(cfg, server, MONITOR_SERVER_NAME)
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| e.to_string())?;
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        let bytes = wire::encode_request(RpcKind::Vote, vote).map_err(|e| e.to_string())?;
        send.write_all(&bytes).await.map_err(|e| e.to_string())?;
        send.finish().map_err(|e| e.to_string())?;
        wire::read_frame(&mut recv, RpcKind::Vote, RpcKind::Vote.reply_limit())
            .await
            .map_err(|e| e.to_string())
    };
    tokio::time::timeout(Duration::from_secs(10), work)
        .await
        .unwrap_or_else(|_| Err("timed out".into()))
}

/// A vote that node 1 would grant if it believed it (higher term, longer log).
fn tempting_vote(candidate: u64, term: u64) -> VoteRequest<u64> {
    VoteRequest::new(
        Vote::new(term + 5, candidate),
        Some(LogId::new(
            CommittedLeaderId::new(term + 5, candidate),
            1_000,
        )),
    )
}

async fn one_node_leader(pki: &Pki, dir: &Path) -> TestNode {
    let n = TestNode::start(
        pki,
        1,
        dir,
        "127.0.0.1:0".parse().expect("addr"),
        quick_votes(),
    )
    .await;
    n.node.initialize_single_if_new().await.expect("initialize");
    assert_eq!(n.node.wait_for_leader(WAIT).await, Some(1));
    n.node.write(register("hv1")).await.expect("write");
    n
}

/// Node 1 still leads in the same term with the same vote, and accepts writes.
async fn assert_unchanged(n: &TestNode, before: &openraft::RaftMetrics<u64, BasicNode>) {
    let m = n.node.metrics();
    assert_eq!(m.current_term, before.current_term);
    assert_eq!(m.vote, before.vote);
    assert_eq!(m.state, ServerState::Leader);
    n.node
        .write(register("after"))
        .await
        .expect("still accepts writes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_or_admin_certificate_is_refused_on_the_raft_port() {
    let pki = Pki::new("test");
    let dir = tempfile::tempdir().expect("tempdir");
    let n = one_node_leader(&pki, dir.path()).await;
    let before = n.node.metrics();
    for (role, name) in [
        (Role::Agent, "hv1"),
        (Role::Admin, "mon2"),
        (Role::Viewer, "mon2"),
    ] {
        let (m, _) = pki.material(role, name);
        let res = raw_vote(m, n.addr, &tempting_vote(2, before.current_term)).await;
        assert!(res.is_err(), "{role} certificate {name} got {res:?}");
    }
    assert_unchanged(&n, &before).await;
    n.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_monitor_certificate_from_another_ca_is_refused_on_the_raft_port() {
    let pki = Pki::new("test");
    let other = Pki::new("other");
    let dir = tempfile::tempdir().expect("tempdir");
    let n = one_node_leader(&pki, dir.path()).await;
    let before = n.node.metrics();
    let (m, _) = other.material(Role::Monitor, "mon2");
    let res = raw_vote(m, n.addr, &tempting_vote(2, before.current_term)).await;
    assert!(res.is_err(), "foreign monitor got {res:?}");
    assert_unchanged(&n, &before).await;
    n.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_monitor_certificate_cannot_act_as_another_node() {
    let pki = Pki::new("test");
    let dir = tempfile::tempdir().expect("tempdir");
    let n = one_node_leader(&pki, dir.path()).await;
    let before = n.node.metrics();
    // mon2 asking for a vote as candidate 3: refused before Raft sees it.
    let (m, _) = pki.material(Role::Monitor, "mon2");
    match raw_vote(m, n.addr, &tempting_vote(3, before.current_term)).await {
        Ok(Reply::Refused(why)) => assert!(why.contains("mon2"), "{why}"),
        other => panic!("mon2 acting as node 3 got {other:?}"),
    }
    // A monitor certificate that names no node at all is refused at the connection.
    let (m, _) = pki.material(Role::Monitor, "monitor-a");
    let res = raw_vote(m, n.addr, &tempting_vote(3, before.current_term)).await;
    assert!(res.is_err(), "unnumbered monitor got {res:?}");
    assert_unchanged(&n, &before).await;
    n.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_monitor_dialling_node_2_refuses_a_server_that_is_node_3() {
    let pki = Pki::new("test");
    let (d1, d3) = (
        tempfile::tempdir().expect("tempdir"),
        tempfile::tempdir().expect("tempdir"),
    );
    let n1 = one_node_leader(&pki, d1.path()).await;
    let any = "127.0.0.1:0".parse().expect("addr");
    let n3 = TestNode::start(&pki, 3, d3.path(), any, tuning()).await;
    // The membership (wrongly) puts node 2 at node 3's address.
    let mut client = n1
        .endpoint
        .network()
        .new_client(2, &BasicNode::new(n3.addr.to_string()))
        .await;
    let err = client
        .vote(
            VoteRequest::new(Vote::new(1, 1), None),
            RPCOption::new(Duration::from_secs(10)),
        )
        .await
        .expect_err("wrong peer");
    match err {
        RPCError::Unreachable(u) => {
            assert!(u.to_string().contains("not Raft node 2"), "{u}")
        }
        other => panic!("expected Unreachable, got {other}"),
    }
    // Nobody listening: also unreachable (openraft backs off), not a storage error.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp");
    let mut client = n1
        .endpoint
        .network()
        .new_client(
            2,
            &BasicNode::new(silent.local_addr().expect("addr").to_string()),
        )
        .await;
    let err = client
        .vote(
            VoteRequest::new(Vote::new(1, 1), None),
            RPCOption::new(Duration::from_secs(2)),
        )
        .await
        .expect_err("nobody there");
    assert!(matches!(err, RPCError::Unreachable(_)), "{err}");
    n3.stop().await;
    n1.stop().await;
}

/// A UDP relay standing for a node's address: datagrams go to whichever backend it points
/// at now. Pointing it at another process is a peer killed and started again on the same
/// address: the new process knows nothing of the old connection, and nobody closed it.
struct Relay {
    addr: SocketAddr,
    backend: std::sync::Arc<std::sync::Mutex<SocketAddr>>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    async fn start(backend: SocketAddr) -> Relay {
        let front = tokio::net::UdpSocket::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let back = tokio::net::UdpSocket::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = front.local_addr().expect("addr");
        let target = std::sync::Arc::new(std::sync::Mutex::new(backend));
        let shared = target.clone();
        let task = tokio::spawn(async move {
            let (mut a, mut b) = (vec![0u8; 65_536], vec![0u8; 65_536]);
            let mut client: Option<SocketAddr> = None;
            loop {
                tokio::select! {
                    Ok((n, from)) = front.recv_from(&mut a) => {
                        client = Some(from);
                        let to = *shared.lock().expect("lock");
                        let _ = back.send_to(&a[..n], to).await;
                    }
                    Ok((n, _)) = back.recv_from(&mut b) => {
                        if let Some(c) = client {
                            let _ = front.send_to(&b[..n], c).await;
                        }
                    }
                }
            }
        });
        Relay {
            addr,
            backend: target,
            task,
        }
    }

    fn point_at(&self, backend: SocketAddr) {
        *self.backend.lock().expect("lock") = backend;
    }
}

/// Which of three votes through `client` (`pause` apart, each with `option`) is the first
/// answered.
async fn first_answered(
    client: &mut super::quic::QuicPeer,
    option: RPCOption,
    pause: Duration,
) -> Option<u32> {
    for attempt in 1..=3 {
        let vote = VoteRequest::new(Vote::new(1, 1), None);
        if client.vote(vote, option.clone()).await.is_ok() {
            return Some(attempt);
        }
        tokio::time::sleep(pause).await;
    }
    None
}

/// A peer whose process was killed (its connections never closed) and started again on the
/// same address is reached again at the next RPC after one fails, not only after the QUIC
/// idle timeout (3 s): every vote sent on the dead connection meanwhile was a lost election
/// round (found in the lab, where the term climbed by 2-3 per leader failover).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_restarted_on_the_same_address_is_reached_at_the_next_rpc() {
    let pki = Pki::new("test");
    let (d1, d3a, d3b) = (
        tempfile::tempdir().expect("tempdir"),
        tempfile::tempdir().expect("tempdir"),
        tempfile::tempdir().expect("tempdir"),
    );
    let n1 = one_node_leader(&pki, d1.path()).await;
    let any = "127.0.0.1:0".parse().expect("addr");
    let old = TestNode::start(&pki, 3, d3a.path(), any, quick_votes()).await;
    tokio::time::sleep(QUICK_VOTE_LEASE).await;
    let relay = Relay::start(old.addr).await;
    let mut client = n1
        .endpoint
        .network()
        .new_client(3, &BasicNode::new(relay.addr.to_string()))
        .await;
    let vote = || VoteRequest::new(Vote::new(1, 1), None);
    let short = || RPCOption::new(Duration::from_millis(400));
    client
        .vote(vote(), short())
        .await
        .expect("the first process answers");
    // "Killed" without a word to n1, and a new process behind the same address.
    let new = TestNode::start(&pki, 3, d3b.path(), any, quick_votes()).await;
    tokio::time::sleep(QUICK_VOTE_LEASE).await;
    relay.point_at(new.addr);
    // The first RPC goes out on the dead connection and times out; the next ones must reach
    // the new process, well within the 3 s idle timeout (3 x 400 ms).
    let t0 = std::time::Instant::now();
    let answered = first_answered(&mut client, short(), Duration::ZERO).await;
    assert!(
        answered.is_some(),
        "the restarted peer was not reached within three RPCs ({:?})",
        t0.elapsed()
    );
    relay.task.abort();
    new.stop().await;
    old.stop().await;
    n1.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_oversized_frames_on_the_raft_port_leave_the_node_working() {
    let pki = Pki::new("test");
    let dir = tempfile::tempdir().expect("tempdir");
    let n = one_node_leader(&pki, dir.path()).await;
    let before = n.node.metrics();

    // Raw UDP garbage at the port.
    let udp = tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("udp");
    for i in 0..50u8 {
        let junk: Vec<u8> = (0..1200).map(|j| (j as u8).wrapping_mul(31) ^ i).collect();
        udp.send_to(&junk, n.addr).await.expect("send");
    }

    // A genuine mon2 connection sending garbage, an oversized frame, a truncated frame.
    let (m, _) = pki.material(Role::Monitor, "mon2");
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("client");
    let cfg = tls::client_config(m, ALPN_RAFT, TransportTuning::default()).expect("cfg");
    let conn = endpoint
        .connect_with(cfg, n.addr, MONITOR_SERVER_NAME)
        .expect("connect")
        .await
        .expect("handshake");
    let mut oversized = vec![RpcKind::Vote.as_byte()];
    oversized.extend_from_slice(&(64u32 * 1024 * 1024).to_be_bytes());
    oversized.extend_from_slice(&[0u8; 1024]);
    let mut truncated = wire::encode_request(
        RpcKind::Vote,
        &VoteRequest::<u64>::new(Vote::new(0, 2), None),
    )
    .expect("encode");
    truncated.truncate(truncated.len() - 2);
    let garbage: Vec<u8> = (0..5000u32).map(|i| (i * 7919 % 251) as u8).collect();
    for bytes in [
        garbage,
        oversized,
        truncated,
        vec![
            RpcKind::AppendEntries.as_byte(),
            0,
            0,
            0,
            9,
            1,
            2,
            3,
            4,
            5,
            6,
            7,
            8,
            9,
        ],
    ] {
        let (mut send, mut recv) = conn.open_bi().await.expect("stream");
        let _ = send.write_all(&bytes).await;
        let _ = send.finish();
        let reply = tokio::time::timeout(WAIT, recv.read_to_end(1024))
            .await
            .expect("server answers in time");
        assert!(
            reply.as_ref().map_or(true, |b| b.is_empty()),
            "garbage got a reply: {reply:?}"
        );
    }
    // The same connection still serves well-formed requests (a stale vote: refused by Raft,
    // which changes nothing), once the node's start-up vote quiet time is over.
    tokio::time::sleep(QUICK_VOTE_LEASE).await;
    let (mut send, mut recv) = conn.open_bi().await.expect("stream");
    let stale = VoteRequest::<u64>::new(Vote::new(0, 2), None);
    send.write_all(&wire::encode_request(RpcKind::Vote, &stale).expect("encode"))
        .await
        .expect("write");
    send.finish().expect("finish");
    let reply: Reply<VoteResponse<u64>, Fatal<u64>> =
        wire::read_frame(&mut recv, RpcKind::Vote, RpcKind::Vote.reply_limit())
            .await
            .expect("reply");
    // Answered: by the transport (mon2 is no voter of this one-node cluster).
    match reply {
        Reply::Refused(why) => assert!(why.contains("not a voter"), "{why}"),
        other => panic!("stale vote got {other:?}"),
    }
    assert_unchanged(&n, &before).await;
    n.stop().await;
}

/// A monitor that just (re)started may have forgotten a leader it was keeping its vote for,
/// so it grants no vote during its first vote lease (`leader_lease::VoteGate`); that is
/// what lets a new leader act at once after its election. Afterwards the same vote reaches
/// Raft and is granted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_monitor_grants_no_vote_during_its_first_vote_lease() {
    let pki = Pki::new("test");
    let dir = tempfile::tempdir().expect("tempdir");
    let config = RaftTuning {
        heartbeat_interval_ms: 100,
        election_timeout_min_ms: 300,
        election_timeout_max_ms: 1_000,
    }
    .to_config();
    let n = TestNode::start(
        &pki,
        1,
        dir.path(),
        "127.0.0.1:0".parse().expect("addr"),
        config,
    )
    .await;
    let (m, _) = pki.material(Role::Monitor, "mon2");
    match raw_vote(m, n.addr, &tempting_vote(2, 1)).await {
        Ok(Reply::Refused(why)) => assert!(why.contains("grants no vote yet"), "{why}"),
        other => panic!("a vote right after the start got {other:?}"),
    }
    assert_eq!(
        n.node.metrics().vote,
        Vote::default(),
        "the refused vote reached Raft"
    );
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let (m, _) = pki.material(Role::Monitor, "mon2");
    match raw_vote(m, n.addr, &tempting_vote(2, 1)).await {
        Ok(Reply::Ok(resp)) => assert!(resp.vote_granted, "{resp:?}"),
        other => panic!("a vote after the vote lease got {other:?}"),
    }
    n.stop().await;
}

/// Defect: a dial sent while the peer was down waited for QUIC's Initial retransmit (about
/// a second) after the peer came back, and every RPC meanwhile joined that dial and gave up
/// after its short TTL: a leader never reached a restarted follower, which then elected
/// itself and deposed the leader (the slow runs of the VIP benchmark). An RPC now starts a
/// fresh dial beside one that is stale.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_that_comes_back_while_a_dial_to_it_is_pending_is_reached_at_once() {
    let pki = Pki::new("test");
    let (d1, d3) = (
        tempfile::tempdir().expect("tempdir"),
        tempfile::tempdir().expect("tempdir"),
    );
    let n1 = one_node_leader(&pki, d1.path()).await;
    // Nothing answers behind the relay yet: a port nobody serves.
    let dead = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    let relay = Relay::start(dead.local_addr().expect("addr")).await;
    drop(dead);
    let mut client = n1
        .endpoint
        .network()
        .new_client(3, &BasicNode::new(relay.addr.to_string()))
        .await;
    let vote = || VoteRequest::new(Vote::new(1, 1), None);
    let short = || RPCOption::new(Duration::from_millis(100));
    assert!(
        client.vote(vote(), short()).await.is_err(),
        "nobody serves yet"
    );
    let any = "127.0.0.1:0".parse().expect("addr");
    let back = TestNode::start(&pki, 3, d3.path(), any, quick_votes()).await;
    tokio::time::sleep(QUICK_VOTE_LEASE).await;
    relay.point_at(back.addr);
    // Well before the pending dial's Initial retransmit.
    let t0 = std::time::Instant::now();
    let answered = first_answered(&mut client, short(), Duration::from_millis(100)).await;
    assert!(
        answered.is_some(),
        "the peer was not reached within three RPCs ({:?})",
        t0.elapsed()
    );
    relay.task.abort();
    back.stop().await;
    n1.stop().await;
}

/// Defect: a removed monitor's certificate (valid until it expires or is revoked) still got
/// votes: a vote request with a higher term and a longer log from a node outside the
/// membership was granted, and the leader stepped down. Now the transport refuses a vote
/// from anyone not a voter, before Raft sees it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_monitor_outside_the_membership_gets_no_vote() {
    let pki = Pki::new("test");
    let dir = tempfile::tempdir().expect("tempdir");
    let n = one_node_leader(&pki, dir.path()).await;
    // Past the start's quiet time: only the membership stands between mon2 and the vote.
    tokio::time::sleep(QUICK_VOTE_LEASE + Duration::from_millis(100)).await;
    let before = n.node.metrics();
    let (m, _) = pki.material(Role::Monitor, "mon2");
    match raw_vote(m, n.addr, &tempting_vote(2, before.current_term)).await {
        Ok(Reply::Refused(why)) => assert!(
            why.contains("mon2 is not a voter of this cluster (voters: mon1)"),
            "{why}"
        ),
        other => panic!("mon2, outside the membership, got {other:?}"),
    }
    assert_unchanged(&n, &before).await;
    n.stop().await;
}

#[test]
fn a_vote_is_refused_only_from_outside_a_known_membership() {
    use super::quic::vote_refusal_by_membership as refusal;
    let voters: std::collections::BTreeSet<u64> = [1, 2, 3].into();
    assert_eq!(refusal(&voters, 2), None);
    let why = refusal(&voters, 4).expect("node 4 is no voter");
    assert!(
        why.contains("mon4 is not a voter of this cluster (voters: mon1, mon2, mon3)"),
        "{why}"
    );
    // A fresh node knows no membership yet: the first election must reach it.
    assert_eq!(refusal(&Default::default(), 4), None);
}

/// `name`'s monitor certificate and key written to `dir`; returns (cert, key, serial).
fn monitor_files(pki: &Pki, dir: &Path, name: &str) -> (PathBuf, PathBuf, String) {
    let (cert, key) = pki.ca.issue(Role::Monitor, name, &[], 30).expect("issue");
    let (c, k) = (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
    );
    std::fs::write(&c, cert).expect("write cert");
    std::fs::write(&k, key).expect("write key");
    let serial = tls::cert_info_file(&c).expect("cert info").serial;
    (c, k, serial)
}

/// The material of files written by [`monitor_files`], with the CA's `crl` if given.
fn load_files(pki: &Pki, cert: &Path, key: &Path, crl: Option<PathBuf>) -> TlsMaterial {
    tls::TlsPaths {
        ca: pki._dir.path().join("ca.crt"),
        cert: cert.to_path_buf(),
        key: key.to_path_buf(),
        crl,
    }
    .load()
    .expect("material")
}

/// Open issue 12 ("Raft cert reload"): the Raft port read its CRL only at start, so a removed
/// monitor's revoked certificate kept its Raft connections (and could open new ones) until
/// every monitor restarted. A reload with the CRL now refuses its handshakes and closes the
/// connection it holds, and nobody else's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_with_a_crl_shuts_a_revoked_monitor_out_of_the_raft_port() {
    let pki = Pki::new("test");
    let dir = tempfile::tempdir().expect("tempdir");
    let files = tempfile::tempdir().expect("tempdir");
    let n = one_node_leader(&pki, dir.path()).await;
    let before = n.node.metrics();
    // mon2 holds a connection to node 1's Raft port.
    let (c2, k2, serial2) = monitor_files(&pki, files.path(), "mon2");
    let mon2 = || load_files(&pki, &c2, &k2, None);
    let client = quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("endpoint");
    let cfg = tls::client_config(mon2(), ALPN_RAFT, TransportTuning::default()).expect("cfg");
    let held = client
        .connect_with(cfg, n.addr, MONITOR_SERVER_NAME)
        .expect("connect")
        .await
        .expect("handshake");
    wait_until("node 1 to serve mon2's connection", || {
        n.server.served_connections() == 1
    })
    .await;
    // The operator revokes mon2 and reloads node 1 (SIGHUP) with the CRL.
    let revoked = tls::revoke(pki._dir.path(), std::slice::from_ref(&serial2)).expect("revoke");
    let (c1, k1, _) = monitor_files(&pki, files.path(), "mon1");
    let mon1 = || load_files(&pki, &c1, &k1, Some(revoked.crl.clone()));
    let said = n.server.reload_tls(mon1(), mon1()).expect("reload");
    assert!(
        said.contains("CRL lists 1 serial(s)") && said.contains(&format!("serial {serial2}")),
        "{said}"
    );
    let reason = tokio::time::timeout(WAIT, held.closed())
        .await
        .expect("the revoked connection is closed");
    assert!(
        format!("{reason}").contains("certificate revoked"),
        "{reason}"
    );
    // A new handshake with mon2's certificate is refused; mon3's (not revoked) still gets
    // an answer (a refusal: it is no voter), and node 1 leads on, unchanged.
    let res = raw_vote(mon2(), n.addr, &tempting_vote(2, before.current_term)).await;
    assert!(res.is_err(), "revoked mon2 got {res:?}");
    let (m3, _) = pki.material(Role::Monitor, "mon3");
    match raw_vote(m3, n.addr, &tempting_vote(3, before.current_term)).await {
        Ok(Reply::Refused(why)) => assert!(why.contains("not a voter"), "{why}"),
        other => panic!("mon3 got {other:?}"),
    }
    assert_unchanged(&n, &before).await;
    // A certificate of another node is refused, and changes nothing.
    let (c4, k4, _) = monitor_files(&pki, files.path(), "mon4");
    let mon4 = || load_files(&pki, &c4, &k4, None);
    let err = n
        .server
        .reload_tls(mon4(), mon4())
        .expect_err("mon4's certificate for node 1");
    assert!(err.to_string().contains("mon1"), "{err}");
    let res = raw_vote(mon2(), n.addr, &tempting_vote(2, before.current_term)).await;
    assert!(
        res.is_err(),
        "after a refused reload, revoked mon2 got {res:?}"
    );
    n.stop().await;
}
