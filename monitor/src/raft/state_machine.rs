//! The Raft state machine: applies committed [`StateCommand`]s to the shared in-memory
//! [`ClusterState`]; durability comes from the Raft log plus snapshots.
//!
//! Layout (table [`SM_TABLE`] in the shared `raft.redb`, values are JSON):
//! - `"snapshot_meta"` / `"snapshot_data"`: the current snapshot (JSON of `SnapshotPayload`),
//!   written in one transaction.
//!
//! `apply` only changes memory: the state, the last applied log id and the last membership.
//! Nothing about the state is written per entry, so an apply costs O(entry), not O(state).
//! The entries themselves are already durable in the log, and the log store persists the
//! committed log id before openraft applies anything.
//!
//! Snapshots (every [`SNAPSHOT_EVERY_LOGS`] entries, see [`super::RaftTuning::to_config`]):
//! [`RaftStateMachine::get_snapshot_builder`] runs on openraft's state machine worker between
//! two applies and clones the in-memory state there; openraft then runs
//! [`RaftSnapshotBuilder::build_snapshot`] in a separate task, concurrently with later
//! applies, which is why it works on that clone. It serializes the clone and persists it
//! before returning, and openraft purges only log entries covered by a snapshot it got from
//! `build_snapshot`, `install_snapshot` or `get_current_snapshot`, all persisted here first:
//! no entry is purged that the persisted snapshot does not cover.
//!
//! On open, the state is the persisted snapshot (or empty) and `applied_state` reports the
//! snapshot's last log id and membership. openraft's startup (`Raft::new`) then re-applies the
//! log from there up to the persisted committed log id, so the full committed state is back
//! when [`super::RaftNode::open`] returns. Entries that were appended but not known committed
//! are applied once a leader commits them again (a single node does so right after its
//! election). Startup work is therefore proportional to the log since the last snapshot.
//!
//! Earlier versions also wrote `"last_applied"`, `"membership"` and `"state"` (the whole
//! state) on every apply. Those keys are removed on open: the snapshot plus the log, which
//! that format kept as well, rebuild the same state.
//!
//! [`StateCommand`]: crate::state::StateCommand
//! [`SNAPSHOT_EVERY_LOGS`]: super::SNAPSHOT_EVERY_LOGS

use std::io::Cursor;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    BasicNode, EntryPayload, ErrorSubject, ErrorVerb, LogId, OptionalSend, RaftSnapshotBuilder,
    SnapshotMeta, StorageError, StorageIOError, StoredMembership,
};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use super::{run_blocking, OrStorage, RaftDb, TypeConfig};
use crate::state::{ClusterState, StateResponse};

/// The current snapshot (and, in old files, the applied state; see the module docs).
pub(crate) const SM_TABLE: TableDefinition<&str, &[u8]> = TableDefinition::new("state_machine");

const KEY_SNAPSHOT_META: &str = "snapshot_meta";
const KEY_SNAPSHOT_DATA: &str = "snapshot_data";
/// Keys of the old per-apply format, removed on open.
const LEGACY_KEYS: [&str; 3] = ["last_applied", "membership", "state"];

type Entry = openraft::Entry<TypeConfig>;
type StoreResult<T> = Result<T, StorageError<u64>>;
type Membership = StoredMembership<u64, BasicNode>;
type Meta = SnapshotMeta<u64, BasicNode>;

/// What a snapshot's bytes contain (JSON).
/// Its `membership` (see [`SnapshotPayloadRef`]) is not read back: the metadata has it.
#[derive(Debug, Deserialize)]
struct SnapshotPayload {
    last_applied: Option<LogId<u64>>,
    state: ClusterState,
}

/// What [`SnapshotPayload`] is written from, without copying the state.
#[derive(Serialize)]
struct SnapshotPayloadRef<'a> {
    last_applied: &'a Option<LogId<u64>>,
    membership: &'a Membership,
    state: &'a ClusterState,
}

fn sm_write_err(e: &(impl std::error::Error + 'static)) -> StorageError<u64> {
    StorageIOError::write_state_machine(e).into()
}

/// Stores `meta` and `data` (both serialized) as the current snapshot.
fn put_snapshot(
    table: &mut redb::Table<&str, &[u8]>,
    meta: &[u8],
    data: &[u8],
    subject: &ErrorSubject<u64>,
) -> StoreResult<()> {
    let verb = ErrorVerb::Write;
    table
        .insert(KEY_SNAPSHOT_META, meta)
        .or_sto(subject, verb)?;
    table
        .insert(KEY_SNAPSHOT_DATA, data)
        .or_sto(subject, verb)?;
    Ok(())
}

fn get_json<T, Tbl>(table: &Tbl, key: &str, subject: &ErrorSubject<u64>) -> StoreResult<Option<T>>
where
    T: for<'de> Deserialize<'de>,
    Tbl: ReadableTable<&'static str, &'static [u8]>,
{
    match table.get(key).or_sto(subject, ErrorVerb::Read)? {
        None => Ok(None),
        Some(raw) => Ok(Some(
            serde_json::from_slice(raw.value()).or_sto(subject, ErrorVerb::Read)?,
        )),
    }
}

fn read_snapshot(db: &Database) -> StoreResult<Option<(Meta, Vec<u8>)>> {
    let subject = ErrorSubject::Snapshot(None);
    let txn = db.begin_read().or_sto(&subject, ErrorVerb::Read)?;
    let table = txn.open_table(SM_TABLE).or_sto(&subject, ErrorVerb::Read)?;
    let Some(meta) = get_json::<Meta, _>(&table, KEY_SNAPSHOT_META, &subject)? else {
        return Ok(None);
    };
    let subject = ErrorSubject::Snapshot(Some(meta.signature()));
    let data = table
        .get(KEY_SNAPSHOT_DATA)
        .or_sto(&subject, ErrorVerb::Read)?
        .map(|raw| raw.value().to_vec());
    match data {
        Some(data) => Ok(Some((meta, data))),
        None => Err(StorageIOError::read_snapshot(
            Some(meta.signature()),
            openraft::AnyError::error("snapshot metadata present but snapshot data missing"),
        )
        .into()),
    }
}

/// Reads and decodes the stored snapshot, if any, as [`StateMachineStore::new`] will
/// ([`super::integrity`]).
pub(crate) fn verify_snapshot(db: &Database) -> StoreResult<()> {
    if let Some((meta, data)) = read_snapshot(db)? {
        decode_snapshot(&meta, &data)?;
    }
    Ok(())
}

/// Decodes snapshot bytes and checks they are at the log id their metadata says.
fn decode_snapshot(meta: &Meta, data: &[u8]) -> StoreResult<SnapshotPayload> {
    let payload: SnapshotPayload = serde_json::from_slice(data)
        .map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), &e))?;
    if payload.last_applied != meta.last_log_id {
        return Err(StorageIOError::read_snapshot(
            Some(meta.signature()),
            openraft::AnyError::error(format!(
                "snapshot data is at {:?} but its metadata says {:?}",
                payload.last_applied, meta.last_log_id
            )),
        )
        .into());
    }
    Ok(payload)
}

fn snapshot_id(last: Option<&LogId<u64>>) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    match last {
        Some(l) => format!(
            "{}-{}-{}-{nanos}",
            l.leader_id.term, l.leader_id.node_id, l.index
        ),
        None => format!("none-{nanos}"),
    }
}

/// Writes the snapshot a restored node starts from (`vigil-monitor --restore`): `state` at
/// log id `last`, with `membership`. openraft, opening the database, then finds the state
/// machine ahead of an empty log and purges the log up to `last` (its "snapshot installed
/// but logs not cleaned" path), exactly as after a snapshot installed from a leader.
pub(crate) fn write_seed_snapshot(
    db: &RaftDb,
    last: LogId<u64>,
    membership: Membership,
    state: &ClusterState,
) -> StoreResult<()> {
    let meta = Meta {
        last_log_id: Some(last),
        last_membership: membership.clone(),
        snapshot_id: format!("restore-{}", snapshot_id(Some(&last))),
    };
    let subject = ErrorSubject::Snapshot(Some(meta.signature()));
    let verb = ErrorVerb::Write;
    let meta_bytes = serde_json::to_vec(&meta).or_sto(&subject, verb)?;
    let data = serde_json::to_vec(&SnapshotPayloadRef {
        last_applied: &Some(last),
        membership: &membership,
        state,
    })
    .or_sto(&subject, verb)?;
    let txn = db.begin_write().or_sto(&subject, verb)?;
    {
        let mut table = txn.open_table(SM_TABLE).or_sto(&subject, verb)?;
        put_snapshot(&mut table, &meta_bytes, &data, &subject)?;
    }
    txn.commit().or_sto(&subject, verb)
}

/// Raft state machine over the shared [`ClusterState`].
pub struct StateMachineStore {
    db: Arc<RaftDb>,
    state: Arc<RwLock<ClusterState>>,
    last_applied: Option<LogId<u64>>,
    /// `last_applied`, shared: written only while the state's write lock is held, so a
    /// reader holding the state's read lock sees the log id of exactly that state.
    applied: Arc<RwLock<Option<LogId<u64>>>>,
    membership: Membership,
}

impl StateMachineStore {
    /// Wraps `db`, creating the table if needed (and dropping the old format's keys), and
    /// loads the persisted snapshot into `state` (replacing what it held; empty without a
    /// snapshot). openraft re-applies the committed log after it on startup.
    pub fn new(db: Arc<RaftDb>, state: Arc<RwLock<ClusterState>>) -> StoreResult<Self> {
        let txn = db.begin_write().map_err(|e| sm_write_err(&e))?;
        {
            let mut table = txn.open_table(SM_TABLE).map_err(|e| sm_write_err(&e))?;
            for key in LEGACY_KEYS {
                if table.remove(key).map_err(|e| sm_write_err(&e))?.is_some() {
                    tracing::info!(key, "removed the old state machine format's key");
                }
            }
        }
        txn.commit().map_err(|e| sm_write_err(&e))?;

        let (last_applied, membership, loaded) = match read_snapshot(&db)? {
            Some((meta, data)) => {
                let payload = decode_snapshot(&meta, &data)?;
                (meta.last_log_id, meta.last_membership, payload.state)
            }
            None => (None, Membership::default(), ClusterState::default()),
        };
        *state.write().unwrap_or_else(PoisonError::into_inner) = loaded;
        Ok(Self {
            db,
            state,
            last_applied,
            applied: Arc::new(RwLock::new(last_applied)),
            membership,
        })
    }

    /// The shared applied state.
    pub fn state(&self) -> Arc<RwLock<ClusterState>> {
        self.state.clone()
    }

    /// The log id of the shared state (see the field's docs for how to read both at once).
    pub fn applied_log_id(&self) -> Arc<RwLock<Option<LogId<u64>>>> {
        self.applied.clone()
    }

    fn publish_applied(&self) {
        *self.applied.write().unwrap_or_else(PoisonError::into_inner) = self.last_applied;
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> StoreResult<(Option<LogId<u64>>, Membership)> {
        Ok((self.last_applied, self.membership.clone()))
    }

    /// In memory only; see the module docs for durability.
    async fn apply<I>(&mut self, entries: I) -> StoreResult<Vec<StateResponse>>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut responses = Vec::new();
        let mut state = self.state.write().unwrap_or_else(PoisonError::into_inner);
        for entry in entries {
            self.last_applied = Some(entry.log_id);
            let response = match entry.payload {
                EntryPayload::Blank => StateResponse::Ok,
                EntryPayload::Normal(cmd) => state.apply(&cmd),
                EntryPayload::Membership(m) => {
                    self.membership = StoredMembership::new(Some(entry.log_id), m);
                    StateResponse::Ok
                }
            };
            responses.push(response);
        }
        // Still under the state's write lock.
        *self.applied.write().unwrap_or_else(PoisonError::into_inner) = self.last_applied;
        drop(state);
        Ok(responses)
    }

    /// Captures the state as of now (openraft calls this between applies, then builds the
    /// snapshot concurrently with later applies). Costs one in-memory copy of the state.
    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        let state = self
            .state
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        SnapshotBuilder {
            db: self.db.clone(),
            last_applied: self.last_applied,
            membership: self.membership.clone(),
            state: Arc::new(state),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> StoreResult<Box<Cursor<Vec<u8>>>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &Meta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> StoreResult<()> {
        let data = snapshot.into_inner();
        let payload = decode_snapshot(meta, &data)?;
        let meta_bytes = serde_json::to_vec(meta)
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e))?;
        let db = self.db.clone();
        let subject = ErrorSubject::Snapshot(Some(meta.signature()));
        run_blocking(subject.clone(), move || {
            let verb = ErrorVerb::Write;
            let txn = db.begin_write().or_sto(&subject, verb)?;
            {
                let mut table = txn.open_table(SM_TABLE).or_sto(&subject, verb)?;
                put_snapshot(&mut table, &meta_bytes, &data, &subject)?;
            }
            txn.commit().or_sto(&subject, verb)
        })
        .await?;
        let mut state = self.state.write().unwrap_or_else(PoisonError::into_inner);
        *state = payload.state;
        self.last_applied = meta.last_log_id;
        self.publish_applied();
        drop(state);
        self.membership = meta.last_membership.clone();
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> StoreResult<Option<Snapshot<TypeConfig>>> {
        Ok(read_snapshot(&self.db)?.map(|(meta, data)| Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        }))
    }
}

/// Builds a snapshot of the state as it was when the builder was made; runs concurrently
/// with `apply`.
pub struct SnapshotBuilder {
    db: Arc<RaftDb>,
    last_applied: Option<LogId<u64>>,
    membership: Membership,
    state: Arc<ClusterState>,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    /// Serializes the captured state and persists it as the current snapshot before
    /// returning, unless a newer snapshot was installed meanwhile.
    async fn build_snapshot(&mut self) -> StoreResult<Snapshot<TypeConfig>> {
        let meta = Meta {
            last_log_id: self.last_applied,
            last_membership: self.membership.clone(),
            snapshot_id: snapshot_id(self.last_applied.as_ref()),
        };
        let meta_bytes = serde_json::to_vec(&meta)
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e))?;

        let db = self.db.clone();
        let state = self.state.clone();
        let (last_applied, membership) = (self.last_applied, self.membership.clone());
        let subject = ErrorSubject::Snapshot(Some(meta.signature()));
        // Serializing a large state takes a while: keep it off the runtime's workers too.
        let data = run_blocking(subject.clone(), move || {
            let data = serde_json::to_vec(&SnapshotPayloadRef {
                last_applied: &last_applied,
                membership: &membership,
                state: &state,
            })
            .or_sto(&subject, ErrorVerb::Write)?;
            let verb = ErrorVerb::Write;
            let txn = db.begin_write().or_sto(&subject, verb)?;
            {
                let mut table = txn.open_table(SM_TABLE).or_sto(&subject, verb)?;
                // A snapshot installed from the leader meanwhile may be newer: keep it.
                let current: Option<Meta> = get_json(&table, KEY_SNAPSHOT_META, &subject)?;
                if current.is_none_or(|c| c.last_log_id <= last_applied) {
                    put_snapshot(&mut table, &meta_bytes, &data, &subject)?;
                }
            }
            txn.commit().or_sto(&subject, verb)?;
            Ok(data)
        })
        .await?;

        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

#[cfg(test)]
mod tests {
    use openraft::{CommittedLeaderId, Membership as RaftMembership};

    use super::*;
    use crate::raft::open_database;
    use crate::state::StateCommand;

    fn lid(term: u64, index: u64) -> LogId<u64> {
        LogId::new(CommittedLeaderId::new(term, 1), index)
    }

    fn register(index: u64, name: &str) -> Entry {
        Entry {
            log_id: lid(1, index),
            payload: EntryPayload::Normal(StateCommand::RegisterHost {
                at_ms: index,
                name: name.into(),
                zone: "z1".into(),
                cluster: "c1".into(),
                agent_version: "0.1.0".into(),
            }),
        }
    }

    async fn open(dir: &std::path::Path) -> StateMachineStore {
        let db = open_database(&dir.join("raft.redb")).expect("open database");
        StateMachineStore::new(db, Arc::new(RwLock::new(ClusterState::default())))
            .expect("state machine")
    }

    /// The snapshot the state machine holds now; there must be one.
    async fn current_snapshot(sm: &mut StateMachineStore) -> Snapshot<TypeConfig> {
        sm.get_current_snapshot()
            .await
            .expect("snapshot")
            .expect("some snapshot")
    }

    /// A copy of the state the state machine shares.
    fn state_of(sm: &StateMachineStore) -> ClusterState {
        sm.state().read().expect("lock").clone()
    }

    #[tokio::test]
    async fn snapshots_capture_their_moment_survive_reopen_and_transfer() {
        let dir = tempfile::tempdir().expect("tempdir");
        let members = RaftMembership::new(
            vec![[1u64].into_iter().collect()],
            std::collections::BTreeMap::from([(1u64, BasicNode::new("a:1"))]),
        );
        let (expected, built) = {
            let mut sm = open(dir.path()).await;
            let responses = sm
                .apply([
                    Entry {
                        log_id: lid(1, 1),
                        payload: EntryPayload::Membership(members.clone()),
                    },
                    register(2, "hv1"),
                    register(3, "hv1"),
                    register(4, "bad name"),
                ])
                .await
                .expect("apply");
            assert_eq!(responses[0], StateResponse::Ok);
            assert_eq!(responses[1], StateResponse::Ok);
            assert_eq!(responses[2], StateResponse::Unchanged);
            assert!(matches!(responses[3], StateResponse::Invalid { .. }));
            let expected = state_of(&sm);
            assert!(expected.hosts.contains_key("hv1"));
            // Applies are in memory only: nothing is persisted before a snapshot.
            assert!(sm.get_current_snapshot().await.expect("snapshot").is_none());

            // The builder captures the state now; applies that follow (openraft runs them
            // concurrently with the build) do not leak into the snapshot.
            let mut builder = sm.get_snapshot_builder().await;
            sm.apply([register(5, "hv2")]).await.expect("apply");
            assert!(sm.state().read().expect("lock").hosts.contains_key("hv2"));
            let built = builder.build_snapshot().await.expect("build");
            assert_eq!(built.meta.last_log_id, Some(lid(1, 4)));
            assert_eq!(
                built.meta.last_membership,
                StoredMembership::new(Some(lid(1, 1)), members.clone())
            );
            let payload = decode_snapshot(&built.meta, built.snapshot.get_ref()).expect("decode");
            assert_eq!(payload.state, expected);
            let current = current_snapshot(&mut sm).await;
            assert_eq!(current.meta, built.meta);
            assert_eq!(current.snapshot.get_ref(), built.snapshot.get_ref());
            (expected, built)
        };

        // Reopened: the snapshot's state and position (openraft re-applies the log after it).
        let mut sm = open(dir.path()).await;
        assert_eq!(state_of(&sm), expected);
        let (applied, membership) = sm.applied_state().await.expect("applied");
        assert_eq!(applied, Some(lid(1, 4)));
        assert_eq!(membership, StoredMembership::new(Some(lid(1, 1)), members));
        let current = current_snapshot(&mut sm).await;
        assert_eq!(current.meta, built.meta);

        // Install on a fresh state machine elsewhere, then reopen it.
        let other_dir = tempfile::tempdir().expect("tempdir");
        {
            let mut other = open(other_dir.path()).await;
            let mut rx = other.begin_receiving_snapshot().await.expect("begin");
            *rx = *current.snapshot;
            other
                .install_snapshot(&current.meta, rx)
                .await
                .expect("install");
            assert_eq!(state_of(&other), expected);
        }
        let mut other = open(other_dir.path()).await;
        assert_eq!(state_of(&other), expected);
        assert_eq!(
            other.applied_state().await.expect("applied"),
            sm.applied_state().await.expect("applied")
        );
        let installed = current_snapshot(&mut other).await;
        assert_eq!(installed.meta, built.meta);

        // A build older than the current snapshot does not replace it.
        let fresh_dir = tempfile::tempdir().expect("tempdir");
        let mut fresh = open(fresh_dir.path()).await;
        let mut stale = fresh.get_snapshot_builder().await;
        stale.db = other.db.clone();
        stale.build_snapshot().await.expect("build");
        let kept = current_snapshot(&mut other).await;
        assert_eq!(kept.meta, built.meta);
    }

    #[tokio::test]
    async fn old_format_keys_are_dropped_on_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let db = open_database(&dir.path().join("raft.redb")).expect("open database");
            let txn = db.begin_write().expect("write");
            {
                let mut table = txn.open_table(SM_TABLE).expect("table");
                let last = serde_json::to_vec(&Some(lid(1, 7))).expect("json");
                table
                    .insert("last_applied", last.as_slice())
                    .expect("insert");
                table
                    .insert("membership", b"{\"not\": \"a membership\"}".as_slice())
                    .expect("insert");
                table
                    .insert("state", b"\x00garbage".as_slice())
                    .expect("insert");
            }
            txn.commit().expect("commit");
        }
        let mut sm = open(dir.path()).await;
        assert_eq!(state_of(&sm), ClusterState::default());
        assert_eq!(
            sm.applied_state().await.expect("applied"),
            (None, Membership::default())
        );
        let txn = sm.db.begin_read().expect("read");
        let table = txn.open_table(SM_TABLE).expect("table");
        for key in LEGACY_KEYS {
            assert!(table.get(key).expect("get").is_none(), "{key} still there");
        }
    }
}
