//! The Raft state machine: applies committed [`StateCommand`]s to the shared [`ClusterState`]
//! and persists the result in redb.
//!
//! Layout (table [`SM_TABLE`] in the shared `raft.redb`, values are JSON):
//! - `"last_applied"`: `Option<LogId>` of the last applied entry,
//! - `"membership"`: the last applied `StoredMembership`,
//! - `"state"`: the whole `ClusterState`,
//! - `"snapshot_meta"` / `"snapshot_data"`: the current snapshot.
//!
//! The first three are written in one transaction per `apply` batch, so they always agree on
//! disk and a restarted monitor has its state back without replaying the log. Snapshots are
//! built from that on-disk triple (one read transaction), never from the in-memory state, so a
//! snapshot can never be ahead of the persisted applied state.
//!
//! [`StateCommand`]: crate::state::StateCommand

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

/// State machine data and the current snapshot.
pub(crate) const SM_TABLE: TableDefinition<&str, &[u8]> = TableDefinition::new("state_machine");

const KEY_LAST_APPLIED: &str = "last_applied";
const KEY_MEMBERSHIP: &str = "membership";
const KEY_STATE: &str = "state";
const KEY_SNAPSHOT_META: &str = "snapshot_meta";
const KEY_SNAPSHOT_DATA: &str = "snapshot_data";

type Entry = openraft::Entry<TypeConfig>;
type StoreResult<T> = Result<T, StorageError<u64>>;
type Membership = StoredMembership<u64, BasicNode>;
type Meta = SnapshotMeta<u64, BasicNode>;

/// What a snapshot's bytes contain (JSON).
#[derive(Debug, Serialize, Deserialize)]
struct SnapshotPayload {
    last_applied: Option<LogId<u64>>,
    membership: Membership,
    state: ClusterState,
}

/// The applied-state triple as persisted.
struct Persisted {
    last_applied: Option<LogId<u64>>,
    membership: Membership,
    state: Option<ClusterState>,
}

fn sm_read_err(e: &(impl std::error::Error + 'static)) -> StorageError<u64> {
    StorageIOError::read_state_machine(e).into()
}

fn sm_write_err(e: &(impl std::error::Error + 'static)) -> StorageError<u64> {
    StorageIOError::write_state_machine(e).into()
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

fn read_persisted(db: &Database) -> StoreResult<Persisted> {
    let subject = ErrorSubject::StateMachine;
    let txn = db.begin_read().map_err(|e| sm_read_err(&e))?;
    let table = txn.open_table(SM_TABLE).map_err(|e| sm_read_err(&e))?;
    Ok(Persisted {
        last_applied: get_json::<Option<LogId<u64>>, _>(&table, KEY_LAST_APPLIED, &subject)?
            .flatten(),
        membership: get_json(&table, KEY_MEMBERSHIP, &subject)?.unwrap_or_default(),
        state: get_json(&table, KEY_STATE, &subject)?,
    })
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

fn decode_snapshot(meta: &Meta, data: &[u8]) -> StoreResult<SnapshotPayload> {
    serde_json::from_slice(data)
        .map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), &e).into())
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

/// Raft state machine over the shared [`ClusterState`].
pub struct StateMachineStore {
    db: Arc<RaftDb>,
    state: Arc<RwLock<ClusterState>>,
    last_applied: Option<LogId<u64>>,
    membership: Membership,
}

impl StateMachineStore {
    /// Wraps `db`, creating the tables if needed, and loads the persisted state into `state`
    /// (replacing what it held).
    pub fn new(db: Arc<RaftDb>, state: Arc<RwLock<ClusterState>>) -> StoreResult<Self> {
        let txn = db.begin_write().map_err(|e| sm_write_err(&e))?;
        txn.open_table(SM_TABLE).map_err(|e| sm_write_err(&e))?;
        txn.commit().map_err(|e| sm_write_err(&e))?;

        let mut persisted = read_persisted(&db)?;
        // Defensive: the snapshot is never written ahead of the applied state, but if it ever
        // is, start from it rather than lose data.
        if let Some((meta, data)) = read_snapshot(&db)? {
            if meta.last_log_id > persisted.last_applied {
                let payload = decode_snapshot(&meta, &data)?;
                persisted = Persisted {
                    last_applied: meta.last_log_id,
                    membership: meta.last_membership.clone(),
                    state: Some(payload.state),
                };
            }
        }
        *state.write().unwrap_or_else(PoisonError::into_inner) =
            persisted.state.unwrap_or_default();
        Ok(Self {
            db,
            state,
            last_applied: persisted.last_applied,
            membership: persisted.membership,
        })
    }

    /// The shared applied state.
    pub fn state(&self) -> Arc<RwLock<ClusterState>> {
        self.state.clone()
    }

    fn serialize_state(&self) -> StoreResult<Vec<u8>> {
        let guard = self.state.read().unwrap_or_else(PoisonError::into_inner);
        serde_json::to_vec(&*guard).map_err(|e| sm_write_err(&e))
    }
}

/// Writes the applied-state triple (and optionally a snapshot) in one durable transaction.
async fn persist(
    db: Arc<RaftDb>,
    last_applied: Option<LogId<u64>>,
    membership: &Membership,
    state: Vec<u8>,
    snapshot: Option<(&Meta, Vec<u8>)>,
) -> StoreResult<()> {
    let last_applied = serde_json::to_vec(&last_applied).map_err(|e| sm_write_err(&e))?;
    let membership = serde_json::to_vec(membership).map_err(|e| sm_write_err(&e))?;
    let snapshot = match snapshot {
        Some((meta, data)) => Some((
            serde_json::to_vec(meta).map_err(|e| sm_write_err(&e))?,
            data,
        )),
        None => None,
    };
    run_blocking(ErrorSubject::StateMachine, move || {
        let txn = db.begin_write().map_err(|e| sm_write_err(&e))?;
        {
            let mut table = txn.open_table(SM_TABLE).map_err(|e| sm_write_err(&e))?;
            table
                .insert(KEY_LAST_APPLIED, last_applied.as_slice())
                .map_err(|e| sm_write_err(&e))?;
            table
                .insert(KEY_MEMBERSHIP, membership.as_slice())
                .map_err(|e| sm_write_err(&e))?;
            table
                .insert(KEY_STATE, state.as_slice())
                .map_err(|e| sm_write_err(&e))?;
            if let Some((meta, data)) = &snapshot {
                table
                    .insert(KEY_SNAPSHOT_META, meta.as_slice())
                    .map_err(|e| sm_write_err(&e))?;
                table
                    .insert(KEY_SNAPSHOT_DATA, data.as_slice())
                    .map_err(|e| sm_write_err(&e))?;
            }
        }
        txn.commit().map_err(|e| sm_write_err(&e))
    })
    .await
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> StoreResult<(Option<LogId<u64>>, Membership)> {
        Ok((self.last_applied, self.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> StoreResult<Vec<StateResponse>>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut responses = Vec::new();
        {
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
        }
        if responses.is_empty() {
            return Ok(responses);
        }
        // Only this worker mutates the state, so serializing under a read lock (readers keep
        // going) captures exactly the state after this batch.
        let bytes = self.serialize_state()?;
        persist(
            self.db.clone(),
            self.last_applied,
            &self.membership,
            bytes,
            None,
        )
        .await?;
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder {
            db: self.db.clone(),
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
        let state_bytes = serde_json::to_vec(&payload.state)
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e))?;
        persist(
            self.db.clone(),
            meta.last_log_id,
            &meta.last_membership,
            state_bytes,
            Some((meta, data)),
        )
        .await?;
        *self.state.write().unwrap_or_else(PoisonError::into_inner) = payload.state;
        self.last_applied = meta.last_log_id;
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

/// Builds snapshots from the persisted applied state; runs concurrently with `apply`.
pub struct SnapshotBuilder {
    db: Arc<RaftDb>,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> StoreResult<Snapshot<TypeConfig>> {
        let persisted = read_persisted(&self.db)?;
        let payload = SnapshotPayload {
            last_applied: persisted.last_applied,
            membership: persisted.membership,
            state: persisted.state.unwrap_or_default(),
        };
        let meta = Meta {
            last_log_id: payload.last_applied,
            last_membership: payload.membership.clone(),
            snapshot_id: snapshot_id(payload.last_applied.as_ref()),
        };
        let data = serde_json::to_vec(&payload)
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e))?;
        let meta_bytes = serde_json::to_vec(&meta)
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e))?;

        let db = self.db.clone();
        let stored = data.clone();
        let new_last = meta.last_log_id;
        let subject = ErrorSubject::Snapshot(Some(meta.signature()));
        run_blocking(subject.clone(), move || {
            let verb = ErrorVerb::Write;
            let txn = db.begin_write().or_sto(&subject, verb)?;
            {
                let mut table = txn.open_table(SM_TABLE).or_sto(&subject, verb)?;
                // A snapshot installed from the leader meanwhile may be newer: keep it.
                let current: Option<Meta> = get_json(&table, KEY_SNAPSHOT_META, &subject)?;
                if current.is_none_or(|c| c.last_log_id <= new_last) {
                    table
                        .insert(KEY_SNAPSHOT_META, meta_bytes.as_slice())
                        .or_sto(&subject, verb)?;
                    table
                        .insert(KEY_SNAPSHOT_DATA, stored.as_slice())
                        .or_sto(&subject, verb)?;
                }
            }
            txn.commit().or_sto(&subject, verb)
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

    #[tokio::test]
    async fn applied_state_survives_reopen_and_snapshots_transfer() {
        let dir = tempfile::tempdir().expect("tempdir");
        let members = RaftMembership::new(
            vec![[1u64].into_iter().collect()],
            std::collections::BTreeMap::from([(1u64, BasicNode::new("a:1"))]),
        );
        let expected = {
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
            let state = sm.state();
            let snapshot = state.read().expect("lock").clone();
            assert!(snapshot.hosts.contains_key("hv1"));
            snapshot
        };

        let mut sm = open(dir.path()).await;
        assert_eq!(*sm.state().read().expect("lock"), expected);
        let (applied, membership) = sm.applied_state().await.expect("applied");
        assert_eq!(applied, Some(lid(1, 4)));
        assert_eq!(membership, StoredMembership::new(Some(lid(1, 1)), members));
        assert!(sm.get_current_snapshot().await.expect("snapshot").is_none());

        let built = sm
            .get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .expect("build");
        assert_eq!(built.meta.last_log_id, Some(lid(1, 4)));
        let current = sm
            .get_current_snapshot()
            .await
            .expect("snapshot")
            .expect("some snapshot");
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
            assert_eq!(*other.state().read().expect("lock"), expected);
        }
        let mut other = open(other_dir.path()).await;
        assert_eq!(*other.state().read().expect("lock"), expected);
        assert_eq!(
            other.applied_state().await.expect("applied"),
            sm.applied_state().await.expect("applied")
        );
        let installed = other
            .get_current_snapshot()
            .await
            .expect("snapshot")
            .expect("some snapshot");
        assert_eq!(installed.meta, built.meta);
    }
}
