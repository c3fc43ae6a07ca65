//! The Raft log and vote, stored in redb.
//!
//! Layout (tables in the shared `raft.redb`):
//! - [`LOG_TABLE`]: log index → JSON-encoded [`Entry`].
//! - [`LOG_META_TABLE`]: `"vote"`, `"committed"`, `"last_purged"`, `"node_id"` → JSON.
//!
//! Every mutation is one redb write transaction, committed with redb's default
//! `Durability::Immediate` (fsync'd when `commit` returns) before the method returns or the
//! append callback is fired. Commits run on tokio's blocking pool so an fsync does not stall a
//! runtime worker. openraft serializes log IO (it awaits each call), so ordering is kept.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::Arc;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{
    ErrorSubject, ErrorVerb, LogId, OptionalSend, RaftLogReader, StorageError, StorageIOError, Vote,
};
use redb::{ReadOnlyTable, ReadableDatabase, ReadableTable, TableDefinition};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::{run_blocking, OrStorage, RaftDb, TypeConfig};

/// Log entries by index.
pub(crate) const LOG_TABLE: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_log");
/// Vote, committed log id, last purged log id, owning node id.
pub(crate) const LOG_META_TABLE: TableDefinition<&str, &[u8]> =
    TableDefinition::new("raft_log_meta");

const KEY_VOTE: &str = "vote";
const KEY_COMMITTED: &str = "committed";
const KEY_LAST_PURGED: &str = "last_purged";
const KEY_NODE_ID: &str = "node_id";

type Entry = openraft::Entry<TypeConfig>;
type StoreResult<T> = Result<T, StorageError<u64>>;

/// Raft log storage on a shared redb database. Cloning is cheap (the clone is the log reader).
#[derive(Clone)]
pub struct LogStore {
    db: Arc<RaftDb>,
}

impl LogStore {
    /// Wraps `db`, creating the log tables if they do not exist yet.
    pub fn new(db: Arc<RaftDb>) -> StoreResult<Self> {
        let txn = db
            .begin_write()
            .map_err(|e| StorageIOError::write_logs(&e))?;
        {
            txn.open_table(LOG_TABLE)
                .map_err(|e| StorageIOError::write_logs(&e))?;
            txn.open_table(LOG_META_TABLE)
                .map_err(|e| StorageIOError::write_logs(&e))?;
        }
        txn.commit().map_err(|e| StorageIOError::write_logs(&e))?;
        Ok(Self { db })
    }

    /// The node id this log belongs to, if one was recorded.
    pub fn stored_node_id(&self) -> StoreResult<Option<u64>> {
        self.read_meta(KEY_NODE_ID, ErrorSubject::Store)
    }

    /// Records the node id this log belongs to (once, at first start).
    pub async fn store_node_id(&self, node_id: u64) -> StoreResult<()> {
        self.write_meta(KEY_NODE_ID, Some(&node_id), ErrorSubject::Store)
            .await
    }

    /// The log table, for reading.
    fn read_log_table(&self) -> StoreResult<ReadOnlyTable<u64, &'static [u8]>> {
        let txn = self
            .db
            .begin_read()
            .map_err(|e| StorageIOError::read_logs(&e))?;
        let table = txn
            .open_table(LOG_TABLE)
            .map_err(|e| StorageIOError::read_logs(&e))?;
        Ok(table)
    }

    fn read_meta<T: DeserializeOwned>(
        &self,
        key: &str,
        subject: ErrorSubject<u64>,
    ) -> StoreResult<Option<T>> {
        let verb = ErrorVerb::Read;
        let txn = self.db.begin_read().or_sto(&subject, verb)?;
        let table = txn.open_table(LOG_META_TABLE).or_sto(&subject, verb)?;
        let Some(raw) = table.get(key).or_sto(&subject, verb)? else {
            return Ok(None);
        };
        let value = serde_json::from_slice(raw.value()).or_sto(&subject, verb)?;
        Ok(Some(value))
    }

    /// Writes (or with `None`, removes) one metadata key in its own durable transaction.
    async fn write_meta<T: Serialize>(
        &self,
        key: &'static str,
        value: Option<&T>,
        subject: ErrorSubject<u64>,
    ) -> StoreResult<()> {
        let verb = ErrorVerb::Write;
        let bytes = match value {
            Some(v) => Some(serde_json::to_vec(v).or_sto(&subject, verb)?),
            None => None,
        };
        let db = self.db.clone();
        run_blocking(subject.clone(), move || {
            let txn = db.begin_write().or_sto(&subject, verb)?;
            {
                let mut table = txn.open_table(LOG_META_TABLE).or_sto(&subject, verb)?;
                match &bytes {
                    Some(b) => {
                        table.insert(key, b.as_slice()).or_sto(&subject, verb)?;
                    }
                    None => {
                        table.remove(key).or_sto(&subject, verb)?;
                    }
                }
            }
            txn.commit().or_sto(&subject, verb)
        })
        .await
    }
}

pub(crate) fn decode_entry(index: u64, raw: &[u8]) -> StoreResult<Entry> {
    let entry: Entry =
        serde_json::from_slice(raw).map_err(|e| StorageIOError::read_log_at_index(index, &e))?;
    if entry.log_id.index != index {
        return Err(StorageIOError::read_log_at_index(
            index,
            openraft::AnyError::error(format!(
                "log entry stored under index {index} has log id {}",
                entry.log_id
            )),
        )
        .into());
    }
    Ok(entry)
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> StoreResult<Vec<Entry>> {
        let bounds: (Bound<u64>, Bound<u64>) =
            (range.start_bound().cloned(), range.end_bound().cloned());
        let table = self.read_log_table()?;
        let mut entries = Vec::new();
        for item in table
            .range::<u64>(bounds)
            .map_err(|e| StorageIOError::read_logs(&e))?
        {
            let (key, value) = item.map_err(|e| StorageIOError::read_logs(&e))?;
            entries.push(decode_entry(key.value(), value.value())?);
        }
        Ok(entries)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> StoreResult<LogState<TypeConfig>> {
        let last_purged_log_id: Option<LogId<u64>> =
            self.read_meta(KEY_LAST_PURGED, ErrorSubject::Logs)?;
        let table = self.read_log_table()?;
        let last_entry = match table.last().map_err(|e| StorageIOError::read_logs(&e))? {
            Some((key, value)) => Some(decode_entry(key.value(), value.value())?.log_id),
            None => None,
        };
        Ok(LogState {
            last_log_id: last_entry.or(last_purged_log_id),
            last_purged_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<u64>) -> StoreResult<()> {
        self.write_meta(KEY_VOTE, Some(vote), ErrorSubject::Vote)
            .await
    }

    async fn read_vote(&mut self) -> StoreResult<Option<Vote<u64>>> {
        self.read_meta(KEY_VOTE, ErrorSubject::Vote)
    }

    async fn save_committed(&mut self, committed: Option<LogId<u64>>) -> StoreResult<()> {
        self.write_meta(KEY_COMMITTED, committed.as_ref(), ErrorSubject::Store)
            .await
    }

    async fn read_committed(&mut self) -> StoreResult<Option<LogId<u64>>> {
        self.read_meta(KEY_COMMITTED, ErrorSubject::Store)
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> StoreResult<()>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut encoded = Vec::new();
        for entry in entries {
            let bytes = serde_json::to_vec(&entry)
                .map_err(|e| StorageIOError::write_log_entry(entry.log_id, &e))?;
            encoded.push((entry.log_id.index, bytes));
        }
        let db = self.db.clone();
        run_blocking(ErrorSubject::Logs, move || {
            let txn = db
                .begin_write()
                .map_err(|e| StorageIOError::write_logs(&e))?;
            {
                let mut table = txn
                    .open_table(LOG_TABLE)
                    .map_err(|e| StorageIOError::write_logs(&e))?;
                for (index, bytes) in &encoded {
                    table
                        .insert(*index, bytes.as_slice())
                        .map_err(|e| StorageIOError::write_logs(&e))?;
                }
            }
            // Durability::Immediate (the default): durable once commit returns.
            txn.commit().map_err(|e| StorageIOError::write_logs(&e))?;
            Ok(())
        })
        .await?;
        callback.log_io_completed(Ok(()));
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<u64>) -> StoreResult<()> {
        let db = self.db.clone();
        run_blocking(ErrorSubject::Logs, move || {
            let (subject, verb) = (ErrorSubject::Log(log_id), ErrorVerb::Delete);
            let txn = db.begin_write().or_sto(&subject, verb)?;
            {
                let mut table = txn.open_table(LOG_TABLE).or_sto(&subject, verb)?;
                table
                    .retain_in::<u64, _>(log_id.index.., |_, _| false)
                    .or_sto(&subject, verb)?;
            }
            txn.commit().or_sto(&subject, verb)
        })
        .await
    }

    async fn purge(&mut self, log_id: LogId<u64>) -> StoreResult<()> {
        let db = self.db.clone();
        let purged =
            serde_json::to_vec(&log_id).map_err(|e| StorageIOError::write_log_entry(log_id, &e))?;
        run_blocking(ErrorSubject::Logs, move || {
            let (subject, verb) = (ErrorSubject::Log(log_id), ErrorVerb::Delete);
            let txn = db.begin_write().or_sto(&subject, verb)?;
            {
                // Record the purge point and drop the entries in the same transaction, so the
                // log never looks as if it had a hole.
                let mut meta = txn.open_table(LOG_META_TABLE).or_sto(&subject, verb)?;
                meta.insert(KEY_LAST_PURGED, purged.as_slice())
                    .or_sto(&subject, verb)?;
                let mut table = txn.open_table(LOG_TABLE).or_sto(&subject, verb)?;
                table
                    .retain_in::<u64, _>(..=log_id.index, |_, _| false)
                    .or_sto(&subject, verb)?;
            }
            txn.commit().or_sto(&subject, verb)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use openraft::storage::RaftLogStorageExt;
    use openraft::{BasicNode, CommittedLeaderId, EntryPayload, Membership};

    use super::*;
    use crate::raft::open_database;
    use crate::state::{Severity, StateCommand};

    fn lid(term: u64, index: u64) -> LogId<u64> {
        LogId::new(CommittedLeaderId::new(term, 1), index)
    }

    fn normal(term: u64, index: u64) -> Entry {
        Entry {
            log_id: lid(term, index),
            payload: EntryPayload::Normal(StateCommand::RecordEvent {
                at_ms: index,
                severity: Severity::Info,
                host: None,
                kind: crate::state::EventKind::LeaderElected { term, node: 1 },
                message: format!("entry {index}"),
            }),
        }
    }

    async fn open(dir: &std::path::Path) -> LogStore {
        let db = open_database(&dir.join("raft.redb")).expect("open database");
        LogStore::new(db).expect("log store")
    }

    /// Opens the store in `dir` again and checks the log state read back from disk.
    async fn reopen(dir: &std::path::Path, last_purged: LogId<u64>, last: LogId<u64>) -> LogStore {
        let mut store = open(dir).await;
        assert_eq!(
            store.get_log_state().await.expect("state"),
            LogState {
                last_purged_log_id: Some(last_purged),
                last_log_id: Some(last),
            }
        );
        store
    }

    #[tokio::test]
    async fn log_store_round_trips_across_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let mut store = open(dir.path()).await;
            assert_eq!(
                store.get_log_state().await.expect("state"),
                LogState::default()
            );
            assert_eq!(store.read_vote().await.expect("vote"), None);
            assert_eq!(store.read_committed().await.expect("committed"), None);

            let membership = Entry {
                log_id: lid(1, 1),
                payload: EntryPayload::Membership(Membership::new(
                    vec![[1u64].into_iter().collect()],
                    BTreeMap::from([(1u64, BasicNode::new("127.0.0.1:1"))]),
                )),
            };
            let blank = Entry {
                log_id: lid(1, 2),
                payload: EntryPayload::Blank,
            };
            store
                .blocking_append([membership, blank])
                .await
                .expect("append");
            store
                .blocking_append((3..=10).map(|i| normal(2, i)))
                .await
                .expect("append");
            store
                .save_vote(&Vote::new_committed(2, 1))
                .await
                .expect("vote");
            store
                .save_committed(Some(lid(2, 8)))
                .await
                .expect("committed");

            // Conflicting tail replaced: drop 9.., append a new 9 in term 3.
            store.truncate(lid(2, 9)).await.expect("truncate");
            assert_eq!(
                store.get_log_state().await.expect("state").last_log_id,
                Some(lid(2, 8))
            );
            store.blocking_append([normal(3, 9)]).await.expect("append");

            store.purge(lid(2, 4)).await.expect("purge");
        }
        // Reopen from disk.
        let mut store = reopen(dir.path(), lid(2, 4), lid(3, 9)).await;
        assert_eq!(
            store.read_vote().await.expect("vote"),
            Some(Vote::new_committed(2, 1))
        );
        assert_eq!(
            store.read_committed().await.expect("committed"),
            Some(lid(2, 8))
        );
        let entries = store.try_get_log_entries(0..100).await.expect("entries");
        let ids: Vec<_> = entries.iter().map(|e| e.log_id).collect();
        assert_eq!(
            ids,
            vec![lid(2, 5), lid(2, 6), lid(2, 7), lid(2, 8), lid(3, 9)]
        );
        assert_eq!(entries[4], normal(3, 9));
        let some = store.try_get_log_entries(6..=7).await.expect("entries");
        assert_eq!(
            some.iter().map(|e| e.log_id).collect::<Vec<_>>(),
            [lid(2, 6), lid(2, 7)]
        );

        // Purging past the end leaves an empty log whose last id is the purge point.
        store.purge(lid(3, 9)).await.expect("purge");
        store.save_committed(None).await.expect("committed");
        drop(store);
        let mut store = reopen(dir.path(), lid(3, 9), lid(3, 9)).await;
        assert!(store
            .try_get_log_entries(..)
            .await
            .expect("entries")
            .is_empty());
        assert_eq!(store.read_committed().await.expect("committed"), None);
    }

    #[tokio::test]
    async fn node_id_is_recorded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(dir.path()).await;
        assert_eq!(store.stored_node_id().expect("read"), None);
        store.store_node_id(7).await.expect("write");
        drop(store);
        let store = open(dir.path()).await;
        assert_eq!(store.stored_node_id().expect("read"), Some(7));
    }
}
