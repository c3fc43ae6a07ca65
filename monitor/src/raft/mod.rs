//! The monitor's Raft layer: openraft 0.9 over a redb file, replicating [`ClusterState`].
//!
//! One redb database, `<data_dir>/raft.redb`, holds both the Raft log (with the vote and the
//! committed log id) and the state machine's current snapshot, in separate tables. The applied
//! state lives in memory; on open it is rebuilt from the snapshot plus the committed log after
//! it. See [`log_store`] and [`state_machine`] for the layouts and durability rules.
//!
//! A monitor without peers is a one-node cluster ([`network`] refuses every RPC, and none is
//! ever made). Several monitors talk Raft over QUIC with mutual TLS ([`quic`], frames in
//! [`wire`]).

// openraft's storage traits fix the error type to `StorageError` (about 224 bytes); our
// helpers return it as is rather than boxing and unboxing it at every trait boundary.
#![allow(clippy::result_large_err)]

pub mod integrity;
pub mod leader_lease;
#[cfg(test)]
mod leader_lease_tests;
pub mod log_store;
pub mod network;
pub mod quic;
#[cfg(test)]
mod quic_tests;
pub mod reset;
pub mod reversion;
pub mod state_machine;
pub mod wire;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use openraft::error::{CheckIsLeaderError, ClientWriteError, Fatal, InitializeError, RaftError};
use openraft::network::RaftNetworkFactory;
use openraft::{
    BasicNode, ChangeMembers, ErrorSubject, ErrorVerb, Raft, RaftMetrics, ServerState,
    SnapshotPolicy, StorageError, StorageIOError,
};
use redb::Database;
use tokio::sync::watch;

pub use self::log_store::LogStore;
pub use self::network::{DisabledNetwork, DisabledNetworkFactory, NetworkDisabled};
pub use self::state_machine::{SnapshotBuilder, StateMachineStore};
use crate::state::{ClusterState, StateCommand, StateResponse};
pub use openraft::LogId;

openraft::declare_raft_types!(
    /// openraft type configuration of the monitor cluster.
    pub TypeConfig:
        D = StateCommand,
        R = StateResponse,
        NodeId = u64,
        Node = BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = std::io::Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

/// Name of the database file inside the data directory.
pub const DB_FILE_NAME: &str = "raft.redb";
/// Build a snapshot after this many applied entries since the last one.
pub const SNAPSHOT_EVERY_LOGS: u64 = 1000;
/// Entries kept in the log behind a snapshot (for slow followers, once there are some).
pub const LOGS_KEPT_AFTER_SNAPSHOT: u64 = 100;
/// How long [`RaftNode::shutdown`] waits for the database file to be released.
const SHUTDOWN_RELEASE_TIMEOUT: Duration = Duration::from_secs(10);

/// Raft timing knobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RaftTuning {
    pub heartbeat_interval_ms: u64,
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
}

impl Default for RaftTuning {
    fn default() -> Self {
        Self {
            heartbeat_interval_ms: 100,
            election_timeout_min_ms: 400,
            // openraft's vote lease (a follower keeps its leader this long after its last
            // message, then waits its election timeout on top): it must cover the leader
            // lease and its drift (`L + L/8` = 450 ms) for a new leader to act at once
            // (`leader_lease`), and each ms of it is a ms of every failover.
            election_timeout_max_ms: 550,
        }
    }
}

impl RaftTuning {
    /// The openraft configuration (not yet validated).
    pub fn to_config(self) -> openraft::Config {
        openraft::Config {
            cluster_name: "vigil-monitor".to_string(),
            heartbeat_interval: self.heartbeat_interval_ms,
            election_timeout_min: self.election_timeout_min_ms,
            election_timeout_max: self.election_timeout_max_ms,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(SNAPSHOT_EVERY_LOGS),
            max_in_snapshot_log_to_keep: LOGS_KEPT_AFTER_SNAPSHOT,
            // Chunks must fit the Raft wire's InstallSnapshot frame limit.
            snapshot_max_chunk_size: wire::SNAPSHOT_CHUNK_BYTES as u64,
            ..Default::default()
        }
    }
}

/// Failure to open or start the Raft node.
#[derive(Debug, thiserror::Error)]
pub enum RaftSetupError {
    #[error("cannot create Raft data directory {path}: {source}")]
    CreateDir { path: PathBuf, source: io::Error },
    #[error("cannot open Raft database {path}: {source}")]
    OpenDatabase {
        path: PathBuf,
        source: redb::DatabaseError,
    },
    /// The file exists but cannot be read whole (see [`integrity`]).
    #[error("the Raft database {path} is damaged: {detail}")]
    Damaged { path: PathBuf, detail: String },
    #[error("Raft storage error: {0}")]
    Storage(#[from] StorageError<u64>),
    #[error(
        "Raft data in {path} belongs to node {stored}, but this monitor is configured as node \
         {configured}"
    )]
    NodeIdMismatch {
        path: PathBuf,
        stored: u64,
        configured: u64,
    },
    #[error("invalid Raft configuration: {0}")]
    Config(#[from] openraft::ConfigError),
    #[error("cannot start Raft: {0}")]
    Start(#[from] Fatal<u64>),
}

/// Where the leader is, when this node is not it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotLeader {
    pub leader_id: Option<u64>,
    pub leader_addr: Option<String>,
}

impl fmt::Display for NotLeader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.leader_id, &self.leader_addr) {
            (Some(id), Some(addr)) => {
                write!(f, "not the Raft leader; leader is node {id} at {addr}")
            }
            (Some(id), None) => write!(f, "not the Raft leader; leader is node {id}"),
            (None, _) => f.write_str("not the Raft leader; no leader is known"),
        }
    }
}

/// Failure of [`RaftNode::write`].
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// This node is not the leader; retry there (or later, if no leader is known).
    #[error("{0}")]
    NotLeader(NotLeader),
    /// Raft stopped (shutdown, or a storage failure made it stop).
    #[error("Raft stopped: {0}")]
    Fatal(Fatal<u64>),
    /// Any other refusal by Raft.
    #[error("Raft refused the write: {0}")]
    Rejected(String),
    /// The command is too large to replicate ([`MAX_COMMAND_BYTES`]); nothing was proposed.
    #[error(
        "the command is {len} bytes encoded, above the {max} bytes one Raft entry may carry to \
         the other monitors; nothing was written"
    )]
    TooLarge { len: usize, max: usize },
}

/// The largest command [`RaftNode::write`] proposes, encoded as the log and the wire carry it
/// (JSON). One AppendEntries frame carries at most [`wire::APPEND_ENTRIES_MAX_BYTES`]; an
/// entry larger than that could never reach a follower, and since the log commits in order,
/// no later write would commit either: the cluster would stop.
pub const MAX_COMMAND_BYTES: usize = wire::APPEND_ENTRIES_MAX_BYTES / 2;

/// Failure of [`RaftNode::ensure_linearizable`].
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("{0}")]
    NotLeader(NotLeader),
    /// Leadership could not be confirmed by a quorum.
    #[error("leadership not confirmed by a quorum: {0}")]
    QuorumNotEnough(String),
    #[error("Raft stopped: {0}")]
    Fatal(Fatal<u64>),
}

/// Failure of [`RaftNode::initialize_single_if_new`].
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("Raft stopped: {0}")]
    Fatal(#[from] Fatal<u64>),
    #[error("Raft refused to initialize: {0}")]
    Rejected(String),
}

/// Failure of [`RaftNode::add_server`] or [`RaftNode::remove_server`].
#[derive(Debug, thiserror::Error)]
pub enum MembershipError {
    /// Only the leader changes the membership.
    #[error("{0}")]
    NotLeader(NotLeader),
    /// The request makes no sense for the current membership.
    #[error("{0}")]
    Invalid(String),
    /// Not done within the caller's timeout (what was done is said).
    #[error("{0}")]
    Timeout(String),
    #[error("Raft refused the membership change: {0}")]
    Rejected(String),
    #[error("Raft stopped: {0}")]
    Fatal(Fatal<u64>),
}

/// What a membership change did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MembershipChange {
    Done,
    /// It was so already.
    Unchanged,
}

/// Maps any error into an openraft [`StorageError`] about `subject`.
pub(crate) trait OrStorage<T> {
    fn or_sto(self, subject: &ErrorSubject<u64>, verb: ErrorVerb) -> Result<T, StorageError<u64>>;
}

impl<T, E: std::error::Error + 'static> OrStorage<T> for Result<T, E> {
    fn or_sto(self, subject: &ErrorSubject<u64>, verb: ErrorVerb) -> Result<T, StorageError<u64>> {
        self.map_err(|e| StorageIOError::new(subject.clone(), verb, &e).into())
    }
}

/// Runs blocking storage IO (redb commits fsync) on tokio's blocking pool.
pub(crate) async fn run_blocking<T, F>(
    subject: ErrorSubject<u64>,
    f: F,
) -> Result<T, StorageError<u64>>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, StorageError<u64>> + Send + 'static,
{
    match tokio::task::spawn_blocking(f).await {
        Ok(res) => res,
        Err(join) => Err(StorageIOError::new(subject, ErrorVerb::Write, &join).into()),
    }
}

/// The redb database shared by the log store and the state machine (derefs to
/// [`redb::Database`]).
pub struct RaftDb {
    db: Database,
    /// Declared after `db`, so it is dropped only once the database has closed its file (a
    /// redb close finishes with a commit, which takes a moment after the last handle goes).
    /// Receivers from [`RaftDb::released`] then see the channel closed.
    released: watch::Sender<()>,
}

impl RaftDb {
    /// Opens (creating if needed) the redb database at `path`.
    pub fn open(path: &Path) -> Result<Arc<RaftDb>, RaftSetupError> {
        let db = Database::create(path).map_err(|source| RaftSetupError::OpenDatabase {
            path: path.to_path_buf(),
            source,
        })?;
        let (released, _) = watch::channel(());
        Ok(Arc::new(RaftDb { db, released }))
    }

    /// A receiver whose `changed()` fails once this database is dropped and its file released.
    pub fn released(&self) -> watch::Receiver<()> {
        self.released.subscribe()
    }
}

impl std::ops::Deref for RaftDb {
    type Target = Database;

    fn deref(&self) -> &Database {
        &self.db
    }
}

/// Opens (creating if needed) the redb database at `path`.
pub(crate) fn open_database(path: &Path) -> Result<Arc<RaftDb>, RaftSetupError> {
    RaftDb::open(path)
}

/// Failure of [`RaftNode::seed_from_backup`].
#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    #[error(
        "{path} already exists: a restore builds a new cluster in an empty data directory and \
         never replaces what is stored there (move the directory away first if it really is \
         to go)"
    )]
    Exists { path: PathBuf },
    #[error(transparent)]
    Setup(Box<RaftSetupError>),
}

impl From<RaftSetupError> for SeedError {
    fn from(e: RaftSetupError) -> Self {
        SeedError::Setup(Box::new(e))
    }
}

/// A running Raft node with its applied [`ClusterState`]. Cloning is cheap.
#[derive(Clone)]
pub struct RaftNode {
    raft: Raft<TypeConfig>,
    state: Arc<RwLock<ClusterState>>,
    /// The log id of `state` (see [`StateMachineStore::applied_log_id`]).
    applied: Arc<RwLock<Option<openraft::LogId<u64>>>>,
    node_id: u64,
    addr: String,
    /// Lets `shutdown` wait until the storage tasks have released the database file.
    db_released: watch::Receiver<()>,
}

impl RaftNode {
    /// Opens `data_dir/raft.redb` (creating the directory and file if needed), loads the
    /// persisted state (the last snapshot, then the committed log after it, re-applied) and
    /// starts Raft. The node is not initialized; see [`Self::initialize_single_if_new`].
    pub async fn open(
        data_dir: &Path,
        node_id: u64,
        addr: String,
        config: RaftTuning,
    ) -> Result<RaftNode, RaftSetupError> {
        Self::open_with_network(
            data_dir,
            node_id,
            addr,
            config.to_config(),
            DisabledNetworkFactory,
        )
        .await
    }

    /// [`Self::open`] with a full openraft configuration and a network to reach the other
    /// monitors (a [`quic::QuicNetworkFactory`] for a multi-monitor cluster; `open` uses
    /// [`DisabledNetworkFactory`], which a one-node cluster never calls).
    pub async fn open_with_network<N: RaftNetworkFactory<TypeConfig>>(
        data_dir: &Path,
        node_id: u64,
        addr: String,
        config: openraft::Config,
        network: N,
    ) -> Result<RaftNode, RaftSetupError> {
        std::fs::create_dir_all(data_dir).map_err(|source| RaftSetupError::CreateDir {
            path: data_dir.to_path_buf(),
            source,
        })?;
        let path = data_dir.join(DB_FILE_NAME);
        let raft_config = Arc::new(config.validate()?);
        if path.exists() {
            integrity::verify(&path).map_err(|d| RaftSetupError::Damaged {
                path: path.clone(),
                detail: d.0,
            })?;
        }

        let db = open_database(&path)?;
        let log_store = LogStore::new(db.clone())?;
        match log_store.stored_node_id()? {
            Some(stored) if stored != node_id => {
                return Err(RaftSetupError::NodeIdMismatch {
                    path,
                    stored,
                    configured: node_id,
                })
            }
            Some(_) => {}
            None => log_store.store_node_id(node_id).await?,
        }
        let state = Arc::new(RwLock::new(ClusterState::default()));
        let state_machine = StateMachineStore::new(db.clone(), state.clone())?;
        let applied = state_machine.applied_log_id();
        let db_released = db.released();
        drop(db);

        let raft = Raft::new(node_id, raft_config, network, log_store, state_machine).await?;
        tracing::info!(node_id, %addr, path = %path.display(), "Raft node started");
        Ok(RaftNode {
            raft,
            state,
            applied,
            node_id,
            addr,
            db_released,
        })
    }

    /// Creates `data_dir/raft.redb` for node `node_id` (Raft address `addr`) holding a
    /// one-voter cluster whose state machine is `state` at log id `last_applied` (a backup's;
    /// `None`: index 0), for `vigil-monitor --restore`. Refuses if the database exists:
    /// nothing stored is ever replaced. [`Self::open`] then starts it: openraft finds the
    /// state machine ahead of an empty log and purges the log up to that id, as after a
    /// snapshot installed from a leader. The vote is that log id's term for this node (not
    /// committed), so the first election here is for a later term than any entry
    /// (a log id never goes backwards); the node elects itself, the only voter. Other
    /// monitors join as usual (`vigil-monitor --join`, `vigilctl server add`) and receive
    /// the state as a snapshot. Returns the log id the cluster starts from.
    pub async fn seed_from_backup(
        data_dir: &Path,
        node_id: u64,
        addr: &str,
        last_applied: Option<openraft::LogId<u64>>,
        state: &ClusterState,
    ) -> Result<openraft::LogId<u64>, SeedError> {
        use openraft::storage::RaftLogStorage;
        let path = data_dir.join(DB_FILE_NAME);
        if path.exists() {
            return Err(SeedError::Exists { path });
        }
        std::fs::create_dir_all(data_dir).map_err(|source| RaftSetupError::CreateDir {
            path: data_dir.to_path_buf(),
            source,
        })?;
        let db = open_database(&path)?;
        let mut log_store = LogStore::new(db.clone()).map_err(RaftSetupError::from)?;
        log_store
            .store_node_id(node_id)
            .await
            .map_err(RaftSetupError::from)?;
        let last = last_applied.unwrap_or_else(|| {
            openraft::LogId::new(openraft::CommittedLeaderId::new(0, node_id), 0)
        });
        log_store
            .save_vote(&openraft::Vote::new(last.leader_id.term, node_id))
            .await
            .map_err(RaftSetupError::from)?;
        let membership = openraft::StoredMembership::new(
            Some(last),
            openraft::Membership::new(
                vec![BTreeSet::from([node_id])],
                BTreeMap::from([(node_id, BasicNode::new(addr))]),
            ),
        );
        state_machine::write_seed_snapshot(&db, last, membership, state)
            .map_err(RaftSetupError::from)?;
        drop(log_store);
        // The only handle: dropping it closes the file before `open` reopens it.
        drop(db);
        tracing::info!(node_id, addr, path = %path.display(), ?last, "seeded a one-node cluster from a backup");
        Ok(last)
    }

    /// A linearizable copy of the applied state and the log id it is at (`vigilctl db
    /// backup`): confirmed leader first ([`Self::ensure_linearizable`]), then both read under
    /// the state's lock, so the log id is exactly the state's.
    pub async fn linearizable_snapshot(
        &self,
    ) -> Result<(Option<openraft::LogId<u64>>, ClusterState), ReadError> {
        self.ensure_linearizable().await?;
        let state = self.state.read().unwrap_or_else(PoisonError::into_inner);
        let applied = *self.applied.read().unwrap_or_else(PoisonError::into_inner);
        Ok((applied, state.clone()))
    }

    /// Every member (voters and learners) with its Raft address.
    pub fn member_addrs(&self) -> BTreeMap<u64, String> {
        let m = self.raft.metrics();
        let m = m.borrow();
        m.membership_config
            .membership()
            .nodes()
            .map(|(id, n)| (*id, n.addr.clone()))
            .collect()
    }

    /// The voters of the current membership.
    pub fn voter_ids(&self) -> Vec<u64> {
        let m = self.raft.metrics();
        let m = m.borrow();
        m.membership_config.membership().voter_ids().collect()
    }

    /// Whether this node belongs to a cluster (it has a vote or a log).
    pub async fn is_initialized(&self) -> Result<bool, InitError> {
        Ok(self.raft.is_initialized().await?)
    }

    /// Makes this node a one-voter cluster if it has never been initialized (no vote, no log).
    /// After a restart from existing data it does nothing. Idempotent.
    pub async fn initialize_single_if_new(&self) -> Result<(), InitError> {
        let members = BTreeMap::from([(self.node_id, BasicNode::new(&self.addr))]);
        if self.initialize_if_new(members).await? {
            tracing::info!(
                node_id = self.node_id,
                "initialized single-node Raft cluster"
            );
        }
        Ok(())
    }

    /// Makes this node the first member of a new cluster with `others` (id → Raft address)
    /// as voters too, if it has never been initialized. Only the bootstrap monitor calls
    /// this (`vigil-monitor --init`); the others start empty and are added by the leader.
    pub async fn initialize_with_if_new(
        &self,
        others: &BTreeMap<u64, String>,
    ) -> Result<(), InitError> {
        let mut members: BTreeMap<u64, BasicNode> = others
            .iter()
            .map(|(id, addr)| (*id, BasicNode::new(addr)))
            .collect();
        members.insert(self.node_id, BasicNode::new(&self.addr));
        let n = members.len();
        if self.initialize_if_new(members).await? {
            tracing::info!(
                node_id = self.node_id,
                voters = n,
                "initialized Raft cluster"
            );
        }
        Ok(())
    }

    /// Initializes the cluster with `members` as voters unless it already is: `Ok(true)` when
    /// this call did it, `Ok(false)` when the node was initialized before (or meanwhile).
    async fn initialize_if_new(
        &self,
        members: BTreeMap<u64, BasicNode>,
    ) -> Result<bool, InitError> {
        if self.raft.is_initialized().await? {
            tracing::debug!(node_id = self.node_id, "Raft already initialized");
            return Ok(false);
        }
        match self.raft.initialize(members).await {
            Ok(()) => Ok(true),
            // Initialized meanwhile (for example by a concurrent call): that is the goal.
            Err(RaftError::APIError(InitializeError::NotAllowed(_))) => Ok(false),
            Err(RaftError::APIError(e)) => Err(InitError::Rejected(e.to_string())),
            Err(RaftError::Fatal(f)) => Err(InitError::Fatal(f)),
        }
    }

    /// Adds node `id` at Raft address `addr` as a voter: first as a learner, waiting (at most
    /// `timeout` for everything) until it has caught up, then promoted. Leader only. A node
    /// that does not catch up in time stays a learner (the error says so): it takes no part
    /// in quorums, and [`Self::remove_server`] removes it.
    pub async fn add_server(
        &self,
        id: u64,
        addr: &str,
        timeout: Duration,
    ) -> Result<MembershipChange, MembershipError> {
        let deadline = tokio::time::Instant::now() + timeout;
        self.check_leader_for_membership()?;
        let (known, voter) = {
            let m = self.raft.metrics();
            let m = m.borrow();
            let membership = m.membership_config.membership();
            (
                membership.get_node(&id).map(|n| n.addr.clone()),
                membership.voter_ids().any(|v| v == id),
            )
        };
        match &known {
            Some(a) if a != addr => {
                return Err(MembershipError::Invalid(format!(
                    "node {id} is already a {} at {a}; remove it first (`vigilctl server del {id}`) to give it another address",
                    if voter { "voter" } else { "learner" }
                )))
            }
            Some(_) if voter => return Ok(MembershipChange::Unchanged),
            _ => {}
        }
        // Not `add_learner(.., blocking = true)`: it counts a learner within
        // `replication_lag_threshold` (5000 entries) as caught up, even one never reached, and
        // promoting an unreachable node makes a joint configuration that may never commit
        // (with one voter down, no write would commit again).
        let added = tokio::time::timeout_at(
            deadline,
            self.raft.add_learner(id, BasicNode::new(addr), false),
        )
        .await;
        let added = match added {
            Err(_) => {
                return Err(MembershipError::Timeout(format!(
                    "adding node {id} as a learner did not commit within {timeout:?} (no quorum?); `vigilctl server list` shows the membership now"
                )))
            }
            Ok(Err(e)) => return Err(self.membership_error(e)),
            Ok(Ok(resp)) => resp.log_id,
        };
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let caught_up = self
            .raft
            .wait(Some(left))
            .metrics(
                |m| {
                    m.replication
                        .as_ref()
                        .and_then(|r| r.get(&id).cloned().flatten())
                        .is_some_and(|matched| matched.index >= added.index)
                },
                "new learner caught up",
            )
            .await;
        if caught_up.is_err() {
            return Err(MembershipError::Timeout(format!(
                "node {id} at {addr} was added as a learner but did not catch up within {timeout:?}, so it stays a learner (no vote): check that it runs (`vigil-monitor --join`), that {addr} is its [raft] address and that its certificate is mon{id}; `vigilctl server del {id}` removes it"
            )));
        }
        let promote = tokio::time::timeout_at(
            deadline,
            self.raft
                .change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false),
        )
        .await;
        match promote {
            Err(_) => Err(MembershipError::Timeout(format!(
                "node {id} at {addr} caught up as a learner, but making it a voter did not finish within {timeout:?}; `vigilctl server list` shows what it is now"
            ))),
            Ok(Err(e)) => Err(self.membership_error(e)),
            Ok(Ok(_)) => {
                tracing::info!(id, addr, "Raft node added as a voter");
                Ok(MembershipChange::Done)
            }
        }
    }

    /// Removes node `id` (voter or learner) from the membership, not keeping it as a learner
    /// (`retain = false`: a removed leader steps down). Leader only; the last voter cannot go.
    pub async fn remove_server(
        &self,
        id: u64,
        timeout: Duration,
    ) -> Result<MembershipChange, MembershipError> {
        self.check_leader_for_membership()?;
        let (known, voters) = {
            let m = self.raft.metrics();
            let m = m.borrow();
            let membership = m.membership_config.membership();
            (
                membership.get_node(&id).is_some(),
                membership.voter_ids().collect::<BTreeSet<u64>>(),
            )
        };
        if !known {
            return Ok(MembershipChange::Unchanged);
        }
        let change = if voters.contains(&id) {
            if voters.len() == 1 {
                return Err(MembershipError::Invalid(format!(
                    "node {id} is the only voter; the cluster cannot remove its last voter"
                )));
            }
            ChangeMembers::RemoveVoters(BTreeSet::from([id]))
        } else {
            ChangeMembers::RemoveNodes(BTreeSet::from([id]))
        };
        match tokio::time::timeout(timeout, self.raft.change_membership(change, false)).await {
            Err(_) => Err(MembershipError::Timeout(format!(
                "removing node {id} did not finish within {timeout:?} (no quorum?); `vigilctl server list` shows the membership now"
            ))),
            Ok(Err(e)) => Err(self.membership_error(e)),
            Ok(Ok(_)) => {
                tracing::info!(id, "Raft node removed");
                Ok(MembershipChange::Done)
            }
        }
    }

    /// `vigilctl server reset ID`: brings back monitor `id`, which was started with
    /// `vigil-monitor --reset` (its database lost or damaged) and waits, silent, to be
    /// re-admitted ([`reset`] says why in this order). Leader only. Asks `id` whether it
    /// waits (nothing is changed if not), removes it from the membership if it is a member,
    /// re-admits it, then adds it back as a learner and makes it a voter once it has caught
    /// up ([`Self::add_server`]), all within `timeout`. `addr` (its Raft address) is needed
    /// only when `id` is no longer a member.
    pub async fn reset_server(
        &self,
        endpoint: &quic::RaftEndpoint,
        id: u64,
        addr: Option<&str>,
        timeout: Duration,
    ) -> Result<MembershipChange, MembershipError> {
        let deadline = tokio::time::Instant::now() + timeout;
        self.check_leader_for_membership()?;
        if id == self.node_id {
            return Err(MembershipError::Invalid(format!(
                "mon{id} leads: a leader is not reset (its database works). To reset it, stop \
                 it, start it with `vigil-monitor --reset`, and run this against the new leader"
            )));
        }
        let known = {
            let m = self.raft.metrics();
            let m = m.borrow();
            m.membership_config
                .membership()
                .get_node(&id)
                .map(|n| n.addr.clone())
        };
        let addr = match (&known, addr) {
            (Some(k), Some(a)) if k != a => {
                return Err(MembershipError::Invalid(format!(
                    "node {id} is a member at {k}, not {a}; leave out --addr, or remove it first \
                     (`vigilctl server del {id}`)"
                )))
            }
            (Some(k), _) => k.clone(),
            (None, Some(a)) => a.to_string(),
            (None, None) => {
                return Err(MembershipError::Invalid(format!(
                    "node {id} is not a member, so its address is unknown: give it \
                     (`vigilctl server reset {id} --addr HOST:PORT`, its [raft] address)"
                )))
            }
        };
        let left = || deadline.saturating_duration_since(tokio::time::Instant::now());
        let probe = endpoint
            .reset_step(id, &addr, reset::ResetStep::Probe, left())
            .await
            .map_err(|e| {
                MembershipError::Invalid(format!(
                    "mon{id} does not answer ({e}); nothing was changed. Start it with \
                     `vigil-monitor --reset` first"
                ))
            })?;
        if !probe.waiting {
            return Err(MembershipError::Invalid(format!(
                "mon{id} at {addr} is not waiting for a reset; nothing was changed. A reset is \
                 for a monitor whose database is lost or damaged: start it with `vigil-monitor \
                 --reset` (its old database is kept aside), then run this again"
            )));
        }
        if known.is_some() {
            // Committed before the re-admission: the leader drops its progress for `id`,
            // and the quorum that committed this holds every committed entry.
            self.remove_server(id, left()).await?;
        }
        endpoint.forget_progress(id);
        endpoint
            .reset_step(id, &addr, reset::ResetStep::Admit, left())
            .await
            .map_err(|e| {
                MembershipError::Invalid(format!(
                    "mon{id} was removed from the membership but did not take its \
                     re-admission ({e}); run `vigilctl server reset {id} --addr {addr}` again"
                ))
            })?;
        tracing::info!(id, addr, "reset monitor re-admitted; adding it back");
        self.add_server(id, &addr, left()).await?;
        Ok(MembershipChange::Done)
    }

    /// `vigilctl server add ID ADDR`, before [`Self::add_server`]: a monitor that is no
    /// member started with `--join` and waits, silent, to be admitted ([`reset`]). On the
    /// leader only (its membership is the newest) and for a non-member only (a member that
    /// waits needs [`Self::reset_server`], which removes it first): asks it, admits it if it
    /// waits, and says why not when it does not answer (nothing is changed then).
    pub async fn admit_new_monitor(
        &self,
        endpoint: &quic::RaftEndpoint,
        id: u64,
        addr: &str,
        timeout: Duration,
    ) -> Result<(), String> {
        if !self.is_leader() || self.is_member(id) {
            return Ok(());
        }
        // Its progress at this leader starts afresh (`reversion`).
        endpoint.forget_progress(id);
        let wait = timeout.min(Duration::from_secs(10));
        let probe = endpoint
            .reset_step(id, addr, reset::ResetStep::Probe, wait)
            .await
            .map_err(|e| {
                format!(
                    "mon{id} at {addr} does not answer ({e}); nothing was changed. Start it there \
                     with `vigil-monitor --join` ({addr} must be its [raft] address)"
                )
            })?;
        if probe.waiting {
            endpoint
                .reset_step(id, addr, reset::ResetStep::Admit, wait)
                .await
                .map_err(|e| {
                    format!("mon{id} at {addr} did not take its admission ({e}); nothing was changed, run this again")
                })?;
            tracing::info!(id, addr, "new monitor admitted; adding it as a learner");
        }
        Ok(())
    }

    fn check_leader_for_membership(&self) -> Result<(), MembershipError> {
        if self.is_leader() {
            return Ok(());
        }
        Err(MembershipError::NotLeader(
            self.not_leader(self.current_leader(), None),
        ))
    }

    fn membership_error(
        &self,
        e: RaftError<u64, ClientWriteError<u64, BasicNode>>,
    ) -> MembershipError {
        match e {
            RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => {
                MembershipError::NotLeader(self.not_leader(f.leader_id, f.leader_node))
            }
            RaftError::APIError(e) => MembershipError::Rejected(e.to_string()),
            RaftError::Fatal(f) => MembershipError::Fatal(f),
        }
    }

    /// Whether node `id` is in the membership (voter or learner).
    pub fn is_member(&self, id: u64) -> bool {
        let metrics = self.raft.metrics();
        let m = metrics.borrow();
        let known = m.membership_config.membership().get_node(&id).is_some();
        known
    }

    /// Whether the membership names any node other than this one (voter or learner).
    pub fn has_peers(&self) -> bool {
        let metrics = self.raft.metrics();
        let m = metrics.borrow();
        let any = m
            .membership_config
            .membership()
            .nodes()
            .any(|(id, _)| *id != self.node_id);
        any
    }

    /// Proposes `cmd` and waits until it is committed and applied here. A command that the
    /// state rejects (unknown host, invalid name) is still `Ok`: see
    /// [`StateResponse::into_result`].
    pub async fn write(&self, cmd: StateCommand) -> Result<StateResponse, WriteError> {
        let len = serde_json::to_vec(&cmd).map_or(usize::MAX, |v| v.len());
        if len > MAX_COMMAND_BYTES {
            tracing::warn!(
                len,
                max = MAX_COMMAND_BYTES,
                "a command too large to replicate was refused"
            );
            return Err(WriteError::TooLarge {
                len,
                max: MAX_COMMAND_BYTES,
            });
        }
        match self.raft.client_write(cmd).await {
            Ok(resp) => Ok(resp.data),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => Err(
                WriteError::NotLeader(self.not_leader(f.leader_id, f.leader_node)),
            ),
            Err(RaftError::APIError(e)) => Err(WriteError::Rejected(e.to_string())),
            Err(RaftError::Fatal(f)) => Err(WriteError::Fatal(f)),
        }
    }

    /// The applied state, updated by the state machine after each apply.
    pub fn state(&self) -> Arc<RwLock<ClusterState>> {
        self.state.clone()
    }

    /// Runs `f` on the applied state under a read lock. Keep `f` short: apply waits for it.
    pub fn read<T>(&self, f: impl FnOnce(&ClusterState) -> T) -> T {
        let guard = self.state.read().unwrap_or_else(PoisonError::into_inner);
        f(&guard)
    }

    /// Returns once this node has confirmed it is leader and has applied everything committed
    /// before the call, so a following [`Self::read`] is linearizable.
    pub async fn ensure_linearizable(&self) -> Result<(), ReadError> {
        match self.raft.ensure_linearizable().await {
            Ok(_) => Ok(()),
            Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f))) => Err(
                ReadError::NotLeader(self.not_leader(f.leader_id, f.leader_node)),
            ),
            Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(q))) => {
                Err(ReadError::QuorumNotEnough(q.to_string()))
            }
            Err(RaftError::Fatal(f)) => Err(ReadError::Fatal(f)),
        }
    }

    /// A copy of the current Raft metrics.
    pub fn metrics(&self) -> RaftMetrics<u64, BasicNode> {
        self.raft.metrics().borrow().clone()
    }

    /// A receiver that sees every metrics change (leader changes, applied index, ...).
    pub fn metrics_watch(&self) -> watch::Receiver<RaftMetrics<u64, BasicNode>> {
        self.raft.metrics()
    }

    /// Whether this node currently believes it is the leader (from metrics; use
    /// [`Self::ensure_linearizable`] before reads that must not be stale).
    pub fn is_leader(&self) -> bool {
        let metrics = self.raft.metrics();
        let m = metrics.borrow();
        m.state == ServerState::Leader && m.current_leader == Some(self.node_id)
    }

    /// The leader this node knows of, if any.
    pub fn current_leader(&self) -> Option<u64> {
        self.raft.metrics().borrow().current_leader
    }

    /// Waits up to `timeout` until some leader is known; returns it.
    pub async fn wait_for_leader(&self, timeout: Duration) -> Option<u64> {
        self.raft
            .wait(Some(timeout))
            .metrics(|m| m.current_leader.is_some(), "a leader is known")
            .await
            .ok()
            .and_then(|m| m.current_leader)
    }

    /// The shortest election timeout: a leader whose quorum acknowledged it longer ago than
    /// this may already have been replaced.
    pub fn election_timeout_min_ms(&self) -> u64 {
        self.raft.config().election_timeout_min
    }

    /// openraft's vote lease: a follower keeps its leader this long after its last message
    /// (`raft::leader_lease`).
    pub fn election_timeout_max_ms(&self) -> u64 {
        self.raft.config().election_timeout_max
    }

    /// Whether the membership has a single voter (a single monitor is its own quorum).
    pub fn is_single_node(&self) -> bool {
        let m = self.raft.metrics();
        let m = m.borrow();
        m.membership_config.membership().voter_ids().count() <= 1
    }

    /// This node's Raft id.
    pub fn node_id(&self) -> u64 {
        self.node_id
    }

    /// The address this node advertises in the membership.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The underlying openraft handle (for the future RPC server and for admin operations).
    pub fn raft(&self) -> &Raft<TypeConfig> {
        &self.raft
    }

    /// Stops Raft and waits (bounded) until the storage has released `raft.redb`, so the same
    /// directory can be reopened right away. Idempotent.
    pub async fn shutdown(&self) {
        if let Err(e) = self.raft.shutdown().await {
            tracing::warn!(error = %e, "Raft core task ended abnormally");
        }
        let mut released = self.db_released.clone();
        // `changed()` only fails once the sender, dropped right after the database, is gone.
        let wait = async move { while released.changed().await.is_ok() {} };
        if tokio::time::timeout(SHUTDOWN_RELEASE_TIMEOUT, wait)
            .await
            .is_err()
        {
            tracing::warn!("Raft storage still holds the database after shutdown");
        }
    }

    fn not_leader(&self, leader_id: Option<u64>, leader_node: Option<BasicNode>) -> NotLeader {
        let leader_addr = leader_node.map(|n| n.addr).or_else(|| {
            let id = leader_id?;
            let metrics = self.raft.metrics();
            let m = metrics.borrow();
            m.membership_config
                .membership()
                .get_node(&id)
                .map(|n| n.addr.clone())
        });
        NotLeader {
            leader_id,
            leader_addr,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::registration as register;
    use crate::state::{EventKind, Severity};
    use openraft::LogId;

    const WAIT: Duration = Duration::from_secs(10);

    fn liveness_event(i: u64, hosts: u64) -> StateCommand {
        StateCommand::RecordEvent {
            at_ms: 1_000_000 + i,
            severity: Severity::Warning,
            host: Some(format!("hv{:05}", i % hosts)),
            kind: EventKind::HostLiveness {
                from: "alive".into(),
                to: "suspect".into(),
            },
            message: format!("host hv{:05} missed heartbeats ({i})", i % hosts),
        }
    }

    /// The defect: a command whose encoding is larger than one AppendEntries frame (an
    /// event quoting a megabyte an agent sent as its pool's error) entered the log, could
    /// never be sent to a follower, and, the log committing in order, stopped every later
    /// write of a cluster of several monitors. Now it is refused before it is proposed.
    #[tokio::test]
    async fn a_command_too_large_to_replicate_is_refused_before_it_enters_the_log() {
        let dir = tempfile::tempdir().expect("tempdir");
        let node = open_leader(dir.path()).await;
        let before = node.metrics().last_log_index;
        // Quotes double in JSON: under the frame limit raw, over it encoded.
        let huge = StateCommand::RecordEvent {
            at_ms: 1,
            severity: Severity::Warning,
            host: Some("hv1".into()),
            kind: EventKind::HostRegistered,
            message: "\"".repeat(wire::APPEND_ENTRIES_MAX_BYTES * 3 / 4),
        };
        match node.write(huge).await {
            Err(WriteError::TooLarge { len, max }) => {
                assert!(len > max && max == MAX_COMMAND_BYTES, "{len} {max}")
            }
            other => panic!("not refused as too large: {other:?}"),
        }
        assert_eq!(
            node.metrics().last_log_index,
            before,
            "nothing entered the log"
        );
        write_all(&node, [liveness_event(1, 1)]).await;
        assert_eq!(node.read(|s| s.events.len()), 1);
        node.shutdown().await;
    }

    async fn open(dir: &Path) -> RaftNode {
        RaftNode::open(dir, 1, "127.0.0.1:7001".into(), RaftTuning::default())
            .await
            .expect("open raft node")
    }

    /// Writes `cmds` one by one, each to be accepted.
    async fn write_all(node: &RaftNode, cmds: impl IntoIterator<Item = StateCommand>) {
        for cmd in cmds {
            node.write(cmd).await.expect("write");
        }
    }

    /// Opens a fresh node in `dir`, makes it a one-voter cluster and waits until it leads.
    async fn open_leader(dir: &Path) -> RaftNode {
        let node = open(dir).await;
        node.initialize_single_if_new().await.expect("initialize");
        assert_eq!(node.wait_for_leader(WAIT).await, Some(1));
        node
    }

    /// Triggers a snapshot and waits until one covers at least what the metrics say is
    /// applied now; returns its log id.
    async fn snapshot_now(node: &RaftNode) -> LogId<u64> {
        // Metrics may trail the write responses a little; the snapshot covers at least this.
        let applied = node.metrics().last_applied.expect("applied");
        node.raft()
            .trigger()
            .snapshot()
            .await
            .expect("trigger snapshot");
        node.raft()
            .wait(Some(WAIT))
            .metrics(
                |m| m.snapshot.is_some_and(|s| s.index >= applied.index),
                "snapshot built",
            )
            .await
            .expect("snapshot")
            .snapshot
            .expect("snapshot log id")
    }

    /// Waits until the metrics show `index` applied.
    async fn metrics_caught_up(node: &RaftNode, index: u64) -> RaftMetrics<u64, BasicNode> {
        node.raft()
            .wait(Some(WAIT))
            .applied_index(Some(index), "metrics caught up")
            .await
            .expect("applied")
    }

    /// Waits, after a reopen, until the core has loaded the storage into the metrics.
    async fn storage_loaded(node: &RaftNode) -> RaftMetrics<u64, BasicNode> {
        node.raft()
            .wait(Some(WAIT))
            .metrics(|m| m.last_applied.is_some(), "storage loaded")
            .await
            .expect("loaded")
    }

    /// After a reopen: initializing again is a no-op, the node leads again, takes one more
    /// host (`late`, at `at_ms`) and then holds `hosts` hosts. Shuts the node down.
    async fn leads_again_and_writes(node: RaftNode, at_ms: u64, hosts: usize) {
        node.initialize_single_if_new().await.expect("no-op");
        assert_eq!(node.wait_for_leader(WAIT).await, Some(1));
        node.write(register(at_ms, "late")).await.expect("write");
        assert_eq!(node.read(|s| s.hosts.len()), hosts);
        node.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn single_node_state_survives_restart() {
        let dir = tempfile::tempdir().expect("tempdir");

        let node = open(dir.path()).await;
        // Not initialized yet: nobody leads.
        match node.write(register(1, "hv0")).await {
            Err(WriteError::NotLeader(NotLeader {
                leader_id: None, ..
            })) => {}
            other => panic!("expected NotLeader, got {other:?}"),
        }
        node.initialize_single_if_new().await.expect("initialize");
        assert_eq!(node.wait_for_leader(WAIT).await, Some(1));
        assert!(node.is_leader());

        assert_eq!(
            node.write(register(1, "hv1")).await.expect("write"),
            StateResponse::Ok
        );
        let tag = StateCommand::AddTag {
            at_ms: 2,
            host: "hv1".into(),
            tag: "ha".into(),
        };
        assert_eq!(
            node.write(tag.clone()).await.expect("write"),
            StateResponse::Ok
        );
        assert_eq!(
            node.write(tag).await.expect("write"),
            StateResponse::Unchanged
        );
        assert_eq!(
            node.write(StateCommand::AddTag {
                at_ms: 3,
                host: "nope".into(),
                tag: "ha".into(),
            })
            .await
            .expect("write"),
            StateResponse::UnknownHost {
                host: "nope".into()
            }
        );
        node.write(StateCommand::RecordEvent {
            at_ms: 4,
            severity: Severity::Warning,
            host: Some("hv1".into()),
            kind: EventKind::LeaderElected { term: 1, node: 1 },
            message: "hello".into(),
        })
        .await
        .expect("write");
        node.ensure_linearizable().await.expect("linearizable");
        let before = node.read(|s| s.clone());
        assert!(before.hosts["hv1"].tags.contains("ha"));
        assert_eq!(before.events.len(), 3);
        let membership_log_id = *node.metrics().membership_config.log_id();
        assert!(membership_log_id.is_some());
        node.shutdown().await;

        // Restart from the same directory.
        let node = open(dir.path()).await;
        // The applied state is there at once (openraft re-applied the committed log while
        // opening), before any election.
        assert_eq!(node.read(|s| s.clone()), before);
        assert_eq!(*node.state().read().expect("lock"), before);
        node.initialize_single_if_new()
            .await
            .expect("initialize is a no-op");
        assert_eq!(node.wait_for_leader(WAIT).await, Some(1));
        // No second membership entry was written.
        assert_eq!(
            *node.metrics().membership_config.log_id(),
            membership_log_id
        );
        assert_eq!(
            node.write(register(5, "hv2")).await.expect("write"),
            StateResponse::Ok
        );
        assert!(node.read(|s| s.hosts.contains_key("hv2")));
        node.ensure_linearizable().await.expect("linearizable");
        node.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn restart_after_snapshot_and_purge() {
        let dir = tempfile::tempdir().expect("tempdir");
        let node = open_leader(dir.path()).await;
        write_all(&node, (0..20).map(|i| register(i, &format!("hv{i}")))).await;
        let snapshot = snapshot_now(&node).await;
        node.raft()
            .trigger()
            .purge_log(snapshot.index)
            .await
            .expect("trigger purge");
        node.raft()
            .wait(Some(WAIT))
            .purged(Some(snapshot), "log purged")
            .await
            .expect("purged");
        let before = node.read(|s| s.clone());
        node.shutdown().await;

        let node = open(dir.path()).await;
        assert_eq!(node.read(|s| s.clone()), before);
        // Metrics start blank and are filled in once the core has loaded the storage.
        node.raft()
            .wait(Some(WAIT))
            .metrics(
                |m| m.purged == Some(snapshot) && m.snapshot == Some(snapshot),
                "purge point and snapshot reloaded",
            )
            .await
            .expect("reloaded");
        leads_again_and_writes(node, 99, 21).await;
    }

    /// Enough entries for several policy snapshots and purges, then restart: the state comes
    /// back from the last snapshot plus the log entries after it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn restart_across_snapshots_replays_the_log_after_the_last_one() {
        const N: u64 = 3_000;
        const AFTER_SNAPSHOT: u64 = 25;
        let dir = tempfile::tempdir().expect("tempdir");
        let node = open_leader(dir.path()).await;
        node.write(register(0, "hv0")).await.expect("write");
        write_all(&node, (1..N - AFTER_SNAPSHOT).map(|i| liveness_event(i, 1))).await;
        // Policy snapshots (every SNAPSHOT_EVERY_LOGS) were built and the log purged behind
        // them; take one more by hand so that exactly AFTER_SNAPSHOT entries follow it.
        let m = node.metrics();
        assert!(m
            .snapshot
            .is_some_and(|s| s.index >= 2 * SNAPSHOT_EVERY_LOGS - 2));
        assert!(m.purged.is_some());
        assert!(m.last_applied.is_some());
        let snapshot = snapshot_now(&node).await;
        let mut last_applied = None;
        for i in N - AFTER_SNAPSHOT..N {
            // Through openraft directly for the log id (metrics may trail the response).
            let resp = node
                .raft()
                .client_write(liveness_event(i, 1))
                .await
                .expect("write");
            last_applied = Some(resp.log_id);
        }
        let last_applied = last_applied.expect("written");
        let before = node.read(|s| s.clone());
        assert_eq!(before.events.len() as u64, N); // One HostRegistered, N - 1 recorded.
        assert_eq!(last_applied.index, snapshot.index + AFTER_SNAPSHOT);
        // No snapshot after the one taken by hand: the restart replays AFTER_SNAPSHOT entries.
        let m = metrics_caught_up(&node, last_applied.index).await;
        assert_eq!(m.snapshot, Some(snapshot));
        node.shutdown().await;

        let node = open(dir.path()).await;
        assert_eq!(node.read(|s| s.clone()), before);
        let m = storage_loaded(&node).await;
        assert_eq!(m.snapshot, Some(snapshot));
        assert_eq!(m.last_applied, Some(last_applied));
        leads_again_and_writes(node, N, 2).await;
    }

    /// A crash after writes and before any snapshot: nothing but the log is on disk, and it
    /// is enough. The "crash" is a copy of the database file taken while the node runs (what
    /// a power cut would leave: everything committed, no clean close), reopened elsewhere.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn crash_before_any_snapshot_loses_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let node = open_leader(dir.path()).await;
        write_all(&node, (0..50).map(|i| register(i, &format!("hv{i:05}")))).await;
        write_all(&node, (0..150).map(|i| liveness_event(i, 50))).await;
        // Through openraft directly for the log id (metrics may trail the response).
        let last_applied = node
            .raft()
            .client_write(StateCommand::AddTag {
                at_ms: 999,
                host: "hv00007".into(),
                tag: "ha".into(),
            })
            .await
            .expect("write")
            .log_id;
        let before = node.read(|s| s.clone());
        let m = metrics_caught_up(&node, last_applied.index).await;
        assert_eq!(m.snapshot, None);
        let last_applied = Some(last_applied);

        let crashed = tempfile::tempdir().expect("tempdir");
        std::fs::copy(
            dir.path().join(DB_FILE_NAME),
            crashed.path().join(DB_FILE_NAME),
        )
        .expect("copy database");
        // The process dies: no shutdown. Dropping every handle stops Raft in the background.
        drop(node);

        let node = open(crashed.path()).await;
        assert_eq!(node.read(|s| s.clone()), before);
        assert!(node.read(|s| s.hosts["hv00007"].tags.contains("ha")));
        let m = storage_loaded(&node).await;
        assert_eq!(m.last_applied, last_applied);
        assert_eq!(m.snapshot, None);
        leads_again_and_writes(node, 1_000, 51).await;
    }

    /// Write throughput with a large state: registers 10,000 hosts, then times 20,000
    /// `RecordEvent` writes (one entry per `write`), then a restart.
    ///
    /// `cargo test -p vigil-monitor --release -- --ignored --nocapture bench_write_large_state`
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "benchmark: run with --release --ignored --nocapture"]
    async fn bench_write_large_state() {
        write_large_state(10_000, 20_000).await;
    }

    /// The same benchmark at a tiny size, in every test run, so that it cannot stop working
    /// unnoticed (as engine_load's tiny run does).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn write_large_state_at_a_tiny_size() {
        write_large_state(50, 100).await;
    }

    async fn write_large_state(bench_hosts: u64, bench_events: u64) {
        let dir = tempfile::tempdir().expect("tempdir");
        let node = open_leader(dir.path()).await;

        let start = std::time::Instant::now();
        for i in 0..bench_hosts {
            node.write(register(i, &format!("hv{i:05}")))
                .await
                .expect("write");
            if (i + 1) % 2_000 == 0 {
                eprintln!("  registered {} hosts, {:?}", i + 1, start.elapsed());
            }
        }
        let registering = start.elapsed();

        let start = std::time::Instant::now();
        for i in 0..bench_events {
            node.write(liveness_event(i, bench_hosts))
                .await
                .expect("write");
            if (i + 1) % 5_000 == 0 {
                eprintln!("  wrote {} events, {:?}", i + 1, start.elapsed());
            }
        }
        let events = start.elapsed();
        let before = node.read(|s| s.clone());
        assert_eq!(before.hosts.len() as u64, bench_hosts);
        node.shutdown().await;

        let start = std::time::Instant::now();
        let node = open(dir.path()).await;
        let reopening = start.elapsed();
        assert_eq!(node.read(|s| s.clone()), before);
        node.shutdown().await;

        let per = |d: Duration, n: u64| d.as_secs_f64() * 1e6 / n as f64;
        println!(
            "bench_write_large_state: {bench_hosts} RegisterHost in {registering:?} \
             ({:.0} us/write); {bench_events} RecordEvent with {bench_hosts} hosts in \
             {events:?} ({:.0} us/write); reopen in {reopening:?}",
            per(registering, bench_hosts),
            per(events, bench_events),
        );
    }

    /// `--restore`: a backup's state seeded into a fresh directory comes back whole, at the
    /// backup's log id, in a one-voter cluster that elects itself for a later term, writes,
    /// and survives a restart; seeding over an existing database is refused and changes
    /// nothing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn seeded_from_a_backup_the_state_comes_back_and_the_log_moves_on() {
        let src = tempfile::tempdir().expect("tempdir");
        let node = open_leader(src.path()).await;
        write_all(&node, (0..5).map(|i| register(i, &format!("hv{i}")))).await;
        let (last, state) = node.linearizable_snapshot().await.expect("snapshot");
        let last = last.expect("applied");
        // The metrics follow the state machine a moment later (a loaded machine once saw
        // index 5 there while the snapshot was at 6).
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while node.metrics().last_applied != Some(last) && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(Some(last), node.metrics().last_applied);
        assert_eq!(state, node.read(|s| s.clone()));
        node.shutdown().await;
        // As if the source had been through elections (term 5, led by node 3): the restored
        // cluster's entries must still come after it.
        let last = LogId::new(openraft::CommittedLeaderId::new(5, 3), last.index + 10);

        let dst = tempfile::tempdir().expect("tempdir");
        let data = dst.path().join("data");
        let seeded = RaftNode::seed_from_backup(&data, 7, "127.0.0.1:7007", Some(last), &state)
            .await
            .expect("seed");
        assert_eq!(seeded, last);
        // Never over what is stored.
        match RaftNode::seed_from_backup(&data, 7, "x:1", None, &ClusterState::default()).await {
            Err(SeedError::Exists { .. }) => {}
            other => panic!("expected Exists, got {other:?}"),
        }
        let node = RaftNode::open(&data, 7, "127.0.0.1:7007".into(), RaftTuning::default())
            .await
            .expect("open");
        assert_eq!(node.read(|s| s.clone()), state);
        assert!(node.is_initialized().await.expect("initialized"));
        node.initialize_single_if_new().await.expect("no-op");
        assert_eq!(node.wait_for_leader(WAIT).await, Some(7));
        let m = node.metrics();
        assert!(m.current_term > last.leader_id.term, "{m:?}");
        assert_eq!(node.voter_ids(), vec![7]);
        let resp = node
            .raft()
            .client_write(register(99, "late"))
            .await
            .expect("write");
        assert!(resp.log_id > last);
        let after = node.read(|s| s.clone());
        node.shutdown().await;
        let node = RaftNode::open(&data, 7, "127.0.0.1:7007".into(), RaftTuning::default())
            .await
            .expect("reopen");
        assert_eq!(node.read(|s| s.clone()), after);
        assert_eq!(node.wait_for_leader(WAIT).await, Some(7));
        node.shutdown().await;
    }

    #[tokio::test]
    async fn refuses_data_of_another_node() {
        let dir = tempfile::tempdir().expect("tempdir");
        let node = open(dir.path()).await;
        node.shutdown().await;
        match RaftNode::open(dir.path(), 2, "x:1".into(), RaftTuning::default()).await {
            Err(RaftSetupError::NodeIdMismatch {
                stored: 1,
                configured: 2,
                ..
            }) => {}
            Err(e) => panic!("unexpected error {e}"),
            Ok(_) => panic!("opened another node's data"),
        }
    }

    #[test]
    fn default_tuning_is_valid() {
        assert!(RaftTuning::default().to_config().validate().is_ok());
        let bad = RaftTuning {
            heartbeat_interval_ms: 500,
            election_timeout_min_ms: 400,
            election_timeout_max_ms: 800,
        };
        assert!(bad.to_config().validate().is_err());
    }

    /// openraft's own storage conformance suite.
    #[test]
    fn openraft_storage_suite() {
        struct Builder;
        impl
            openraft::testing::StoreBuilder<
                TypeConfig,
                LogStore,
                StateMachineStore,
                tempfile::TempDir,
            > for Builder
        {
            async fn build(
                &self,
            ) -> Result<(tempfile::TempDir, LogStore, StateMachineStore), StorageError<u64>>
            {
                let dir = tempfile::tempdir().map_err(|e| StorageIOError::write(&e))?;
                let db = open_database(&dir.path().join(DB_FILE_NAME))
                    .map_err(|e| StorageIOError::write(&e))?;
                let log_store = LogStore::new(db.clone())?;
                let sm =
                    StateMachineStore::new(db, Arc::new(RwLock::new(ClusterState::default())))?;
                Ok((dir, log_store, sm))
            }
        }
        openraft::testing::Suite::test_all(Builder).expect("storage suite");
    }
}
