//! The monitor's storage worker: the Raft leader's I/O on shared primary storage.
//!
//! Every pool carries the `.vigil/` directory described in [`vigil_common::storage`]. While this
//! monitor is the leader, on every pool and every `storage.interval_ms`, the worker:
//!
//! - **writes the leader record** (`leader.json`, with a `seq` that increases per write). An
//!   agent that lost its lease reads it to tell "the monitors are alive without me" (the record
//!   keeps changing: isolate, self-fence) from "every monitor is down" (it stops changing: keep
//!   the guests running, nobody will restart them elsewhere);
//! - **writes fence requests** (`hosts/<host>/fence-request.json`), sbd's poison pill: a host
//!   cut off from the network but still on storage destroys its HA domains and answers with a
//!   fence ack, which the worker reads back and reports; cleared requests are removed together
//!   with their ack, so that a later request starts clean;
//! - **reads every host's storage heartbeat** (`hosts/<host>/heartbeat.json`): a host that
//!   stopped answering on the network but still writes to storage is isolated, not dead, and
//!   may still run its guests.
//!
//! Everything it sees goes to the service as one [`PoolReport`] per pool and cycle; the engine
//! (pure, no I/O) decides what it means.
//!
//! Why one thread per pool: shared storage (NFS) fails by returning `EIO` or by **hanging**: a
//! syscall that never returns, and cannot be cancelled. Blocking I/O must therefore never run
//! on the tokio runtime (a hung `spawn_blocking` task would also hold a blocking-pool thread
//! forever), and one hung pool must not stall the others: each pool gets its own dedicated
//! `std::thread` ("vigil-mstorage-<pool>") that nobody ever waits for. Because a hung thread
//! cannot report anything, one more lightweight thread (the watchdog, "vigil-mstorage-watchdog")
//! notices a cycle running longer than `storage.deadline_ms` and reports the pool as stuck, once
//! per interval while it stays stuck.
//!
//! Shared state lives behind one std `Mutex` that is never held across I/O: each cycle takes a
//! snapshot of its inputs (leadership, pending and cleared fence requests) and works from that.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::mpsc::UnboundedSender;
use vigil_common::config::StorageConfig;
use vigil_common::storage::{
    self as records, FenceAck, FenceRequest, LeaderRecord, RecordError, StorageHeartbeat,
};

/// What one pool's cycle found, sent to the service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolReport {
    pub pool: String,
    /// When the cycle finished (or, for a stuck cycle, when the watchdog noticed): the engine
    /// converts it to its own clock.
    pub at: Instant,
    /// `Err` if any I/O of this cycle failed, if the cycle took longer than `deadline_ms`, or
    /// if it is still running past it (stuck).
    pub result: Result<PoolCycle, PoolFault>,
}

/// Why a storage cycle of the monitor on a pool failed: the pool counts as failing for this
/// monitor (its leader record and fence requests may not have been written).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PoolFault {
    /// A file operation failed (the message names the file and the error).
    #[error("{0}")]
    Io(String),
    /// The cycle finished, past its deadline.
    #[error("I/O on pool {pool} took {took_ms} ms (deadline {deadline_ms} ms)")]
    Slow {
        pool: String,
        took_ms: u64,
        deadline_ms: u64,
    },
    /// The cycle is still running past its deadline (a hung mount).
    #[error("I/O on pool {pool} stuck for {running_ms} ms (deadline {deadline_ms} ms)")]
    Stuck {
        pool: String,
        running_ms: u64,
        deadline_ms: u64,
    },
    /// The pool's I/O thread could not be started.
    #[error("cannot start the storage thread of pool {pool}: {detail}")]
    NoThread { pool: String, detail: String },
}

/// The findings of one successful cycle on one pool.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PoolCycle {
    /// `Some(seq)` if the leader record was written in this cycle.
    pub leader_written: Option<u64>,
    /// The hosts that record condemned.
    pub condemned: Vec<String>,
    /// Every valid heartbeat on the pool, sorted by host.
    pub heartbeats: Vec<StorageHeartbeat>,
    /// Acks that answer a pending fence request (same host and same `id`); an ack left over
    /// from an earlier request is not reported.
    pub acks: Vec<FenceAck>,
}

/// Handle on the storage threads. Cheap to clone; every clone controls the same threads.
#[derive(Clone)]
pub struct StorageWorker {
    shared: Arc<Shared>,
}

struct Shared {
    /// Pool names, in configuration order (index = slot in [`State::busy_since`]).
    pools: Vec<String>,
    state: Mutex<State>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[derive(Default)]
struct State {
    leader: Option<(u64, u64)>,
    /// The record's content as the engine last published it, and when.
    record: Option<(Instant, Vec<String>, bool)>,
    /// Pending fence requests, by host.
    fences: BTreeMap<String, FenceRequest>,
    /// Hosts whose fence files must be removed, with the generation of their latest clear.
    clears: BTreeMap<String, u64>,
    /// Increases with every `clear_fence`.
    generation: u64,
    /// Per pool: when its running cycle started; `None` while it sleeps.
    busy_since: Vec<Option<Instant>>,
    stopped: bool,
}

/// The inputs of one cycle, copied out of [`State`] so that no lock is held across I/O.
#[derive(Debug, Clone, Default)]
struct Inputs {
    /// Leader and the record's content (condemned hosts, hold): `None` when not leading or
    /// when the engine stopped publishing.
    leader: Option<(u64, u64)>,
    condemned: Vec<String>,
    hold: bool,
    fences: Vec<FenceRequest>,
    clears: Vec<(String, u64)>,
}

/// One pool's own state, owned by its thread.
struct PoolIo {
    name: String,
    path: PathBuf,
    /// `seq` of the last leader record written on this pool.
    seq: u64,
    /// Fence requests this process has written on this pool and not removed since.
    written: HashMap<String, FenceRequest>,
    /// Per host: the latest clear generation carried out on this pool.
    cleared: HashMap<String, u64>,
    /// Per garbage file: the last complaint logged (a warning is logged only when it changes).
    complaints: HashMap<PathBuf, String>,
}

/// The I/O of one cycle; substitutable so tests can simulate a hung pool.
type CycleFn = Arc<dyn Fn(&mut PoolIo, &Inputs) -> Result<PoolCycle, String> + Send + Sync>;

impl StorageWorker {
    /// Starts one thread per configured pool, plus the watchdog (no pools: no threads).
    ///
    /// The report channel is unbounded on purpose: each pool sends at most one report per
    /// interval (plus one per interval from the watchdog while stuck), a bounded rate, and a
    /// bounded channel would force a storage thread either to block on a slow receiver or to
    /// drop reports.
    pub fn spawn(cfg: &StorageConfig, reports: UnboundedSender<PoolReport>) -> StorageWorker {
        Self::spawn_with(cfg, reports, Arc::new(run_cycle))
    }

    fn spawn_with(
        cfg: &StorageConfig,
        reports: UnboundedSender<PoolReport>,
        cycle: CycleFn,
    ) -> StorageWorker {
        let shared = Arc::new(Shared {
            pools: cfg.pools.iter().map(|p| p.name.clone()).collect(),
            state: Mutex::new(State {
                busy_since: vec![None; cfg.pools.len()],
                ..State::default()
            }),
        });
        let worker = StorageWorker {
            shared: shared.clone(),
        };
        if cfg.pools.is_empty() {
            return worker;
        }
        let interval = Duration::from_millis(cfg.interval_ms.max(1));
        let deadline = Duration::from_millis(cfg.deadline_ms);
        for (index, pool) in cfg.pools.iter().enumerate() {
            let io = PoolIo {
                name: pool.name.clone(),
                path: pool.path.clone(),
                seq: 0,
                written: HashMap::new(),
                cleared: HashMap::new(),
                complaints: HashMap::new(),
            };
            let (shared, sender, cycle) = (shared.clone(), reports.clone(), cycle.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("vigil-mstorage-{}", pool.name))
                .spawn(move || pool_thread(shared, index, io, interval, deadline, sender, cycle));
            if let Err(e) = spawned {
                tracing::error!(pool = %pool.name, "cannot start the storage thread: {e}");
                let _ = reports.send(PoolReport {
                    pool: pool.name.clone(),
                    at: Instant::now(),
                    result: Err(PoolFault::NoThread {
                        pool: pool.name.clone(),
                        detail: e.to_string(),
                    }),
                });
            }
        }
        let spawned = std::thread::Builder::new()
            .name("vigil-mstorage-watchdog".into())
            .spawn(move || watchdog_thread(shared, interval, deadline, reports));
        if let Err(e) = spawned {
            tracing::error!("cannot start the storage watchdog thread: {e}");
        }
        worker
    }

    /// Leadership as the service knows it: `Some((term, node))` while leader, `None` otherwise
    /// (no cycle started afterwards writes the leader record).
    pub fn set_leader(&self, leader: Option<(u64, u64)>) {
        let mut state = self.shared.lock();
        state.leader = leader;
        if leader.is_none() {
            state.record = None;
        }
    }

    /// The engine's latest leader record content ([`crate::engine::Action::LeaderRecord`]).
    /// The record is written only while this keeps being called: a cycle that finds the
    /// last publication older than [`RECORD_FRESH`] writes nothing, so a stalled engine
    /// leaves the record stale and makes no agent fence itself.
    pub fn publish_record(&self, condemned: Vec<String>, hold: bool) {
        self.shared.lock().record = Some((Instant::now(), condemned, hold));
    }

    /// Asks every pool to carry `request` (keyed by `request.host`; replaces an older request
    /// for the same host). Each pool writes it once, retrying every cycle until it succeeds.
    pub fn request_fence(&self, request: FenceRequest) {
        if let Err(e) = valid_host(&request.host) {
            tracing::error!("fence request ignored: {e}");
            return;
        }
        let mut state = self.shared.lock();
        // Asked again: the slot no longer has to stay empty.
        state.clears.remove(&request.host);
        state.fences.insert(request.host.clone(), request);
    }

    /// Withdraws the fence request for `host`: every pool removes its fence request and its
    /// fence ack (also files left by an earlier leader), checks that the request is gone,
    /// and keeps it gone (a deposed leader's late write, say) until the host is asked again:
    /// each cycle that cannot make sure of it fails, so it is retried on the next.
    pub fn clear_fence(&self, host: &str) {
        if let Err(e) = valid_host(host) {
            tracing::error!("fence clear ignored: {e}");
            return;
        }
        let mut state = self.shared.lock();
        state.fences.remove(host);
        state.generation += 1;
        let generation = state.generation;
        state.clears.insert(host.to_string(), generation);
    }

    /// The configured pool names.
    pub fn pools(&self) -> Vec<String> {
        self.shared.pools.clone()
    }

    /// Stops the threads: no cycle starts afterwards and no report is sent. A thread hung in
    /// I/O exits once that I/O returns (if ever); nobody waits for it.
    pub fn stop(&self) {
        self.shared.lock().stopped = true;
    }
}

/// A host name usable as a directory name under `hosts/`: a valid name, and not `.` or `..`
/// (which the name rules allow but which would leave `hosts/`).
/// How recent the engine's last publication must be for a cycle to write the leader record
/// (the engine ticks every 100 ms or so).
pub const RECORD_FRESH: Duration = Duration::from_millis(1_000);

fn valid_host(host: &str) -> Result<(), String> {
    vigil_common::names::validate("host", host)?;
    if host == "." || host == ".." {
        return Err(format!("host {host:?} is not a usable name"));
    }
    Ok(())
}

fn pool_thread(
    shared: Arc<Shared>,
    index: usize,
    mut io: PoolIo,
    interval: Duration,
    deadline: Duration,
    reports: UnboundedSender<PoolReport>,
    cycle: CycleFn,
) {
    let mut next = Instant::now();
    let mut failing = false;
    loop {
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        }
        if reports.is_closed() {
            break;
        }
        let start = Instant::now();
        next = start + interval;
        let inputs = {
            let mut state = shared.lock();
            if state.stopped {
                break;
            }
            if let Some(slot) = state.busy_since.get_mut(index) {
                *slot = Some(start);
            }
            let record = state
                .record
                .as_ref()
                .filter(|(at, _, _)| start.saturating_duration_since(*at) <= RECORD_FRESH);
            Inputs {
                leader: state.leader.filter(|_| record.is_some()),
                condemned: record.map(|r| r.1.clone()).unwrap_or_default(),
                hold: record.is_some_and(|r| r.2),
                fences: state.fences.values().cloned().collect(),
                clears: state.clears.iter().map(|(h, g)| (h.clone(), *g)).collect(),
            }
        };
        let result = cycle(&mut io, &inputs).map_err(PoolFault::Io);
        let at = Instant::now();
        let stopped = {
            let mut state = shared.lock();
            if let Some(slot) = state.busy_since.get_mut(index) {
                *slot = None;
            }
            state.stopped
        };
        if stopped {
            break;
        }
        let took = at.saturating_duration_since(start);
        let result = match result {
            Ok(_) if took > deadline => Err(PoolFault::Slow {
                pool: io.name.clone(),
                took_ms: took.as_millis() as u64,
                deadline_ms: deadline.as_millis() as u64,
            }),
            other => other,
        };
        match (&result, failing) {
            (Err(e), false) => tracing::warn!(pool = %io.name, "storage pool failing: {e}"),
            (Ok(_), true) => tracing::info!(pool = %io.name, "storage pool working again"),
            _ => {}
        }
        failing = result.is_err();
        let report = PoolReport {
            pool: io.name.clone(),
            at,
            result,
        };
        if reports.send(report).is_err() {
            break;
        }
    }
    tracing::debug!(pool = %io.name, "storage thread exits");
}

fn watchdog_thread(
    shared: Arc<Shared>,
    interval: Duration,
    deadline: Duration,
    reports: UnboundedSender<PoolReport>,
) {
    loop {
        std::thread::sleep(interval);
        if reports.is_closed() {
            break;
        }
        let now = Instant::now();
        let stuck: Vec<(String, Duration)> = {
            let state = shared.lock();
            if state.stopped {
                break;
            }
            state
                .busy_since
                .iter()
                .zip(&shared.pools)
                .filter_map(|(since, pool)| {
                    let running = now.saturating_duration_since((*since)?);
                    (running > deadline).then(|| (pool.clone(), running))
                })
                .collect()
        };
        for (pool, running) in stuck {
            let result = Err(PoolFault::Stuck {
                pool: pool.clone(),
                running_ms: running.as_millis() as u64,
                deadline_ms: deadline.as_millis() as u64,
            });
            let report = PoolReport {
                pool,
                at: now,
                result,
            };
            if reports.send(report).is_err() {
                return;
            }
        }
    }
}

/// The real I/O of one cycle. Stops at the first I/O error: on a sick pool every further
/// syscall risks another hang, and the report is an error anyway.
fn run_cycle(io: &mut PoolIo, inputs: &Inputs) -> Result<PoolCycle, String> {
    let pool = io.path.clone();
    let mut cycle = PoolCycle::default();
    let mut complained = HashSet::new();

    // 1. The leader record.
    if let Some((term, node)) = inputs.leader {
        io.seq += 1;
        let record = LeaderRecord {
            term,
            node,
            seq: io.seq,
            wall_ms: vigil_common::unix_ms(),
            condemned: inputs.condemned.clone(),
            hold: inputs.hold,
        };
        records::write_record(&records::leader_path(&pool), &record).map_err(|e| e.to_string())?;
        cycle.leader_written = Some(io.seq);
        // What agents obey: a held record condemns nobody, so the lease book must not count
        // it as a condemnation (defect: a_hold_that_starts_while_a_host_is_condemned_is_no_lease_proof).
        cycle.condemned = record.condemned_hosts();
    }

    // 2. Fence requests: first the clears (request and ack), then the pending requests not yet
    // on this pool. A host cleared and requested again gets its new request written after the
    // removal.
    for (host, generation) in &inputs.clears {
        let request_path = records::fence_request_path(&pool, host);
        let done = io.cleared.get(host).is_some_and(|done| done >= generation);
        if done && !exists(&request_path)? {
            continue;
        }
        records::remove_record(&request_path).map_err(|e| e.to_string())?;
        if !done {
            records::remove_record(&records::fence_ack_path(&pool, host))
                .map_err(|e| e.to_string())?;
        }
        sync_dir(&request_path);
        if exists(&request_path)? {
            return Err(format!(
                "{}: still there after removing it",
                request_path.display()
            ));
        }
        io.written.remove(host);
        io.cleared.insert(host.clone(), *generation);
    }
    for request in &inputs.fences {
        if io.written.get(&request.host) == Some(request) {
            continue;
        }
        records::write_record(&records::fence_request_path(&pool, &request.host), request)
            .map_err(|e| e.to_string())?;
        io.written.insert(request.host.clone(), request.clone());
    }

    // 3. Heartbeats.
    let dir = records::hosts_dir(&pool);
    let entries = match std::fs::read_dir(&dir) {
        Ok(entries) => Some(entries),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(format!("{}: {e}", dir.display())),
    };
    for entry in entries.into_iter().flatten() {
        let entry = entry.map_err(|e| format!("{}: {e}", dir.display()))?;
        let name = entry.file_name();
        let Some(host) = name.to_str() else {
            continue;
        };
        if valid_host(host).is_err() {
            continue;
        }
        let path = records::heartbeat_path(&pool, host);
        match records::read_record::<StorageHeartbeat>(&path) {
            Ok(None) => {}
            Ok(Some(hb)) if hb.host == host => cycle.heartbeats.push(hb),
            Ok(Some(hb)) => io.complain(
                &path,
                format!("{}: names host {:?}", path.display(), hb.host),
                &mut complained,
            ),
            // A stray regular file under hosts/ (an NFS `.nfsXXXX` file, say): not a host.
            Err(RecordError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotADirectory => {}
            Err(e @ RecordError::Io { .. }) => return Err(e.to_string()),
            Err(e) => io.complain(&path, e.to_string(), &mut complained),
        }
    }
    cycle.heartbeats.sort_by(|a, b| a.host.cmp(&b.host));

    // 4. Acks of the pending fence requests.
    for request in &inputs.fences {
        let path = records::fence_ack_path(&pool, &request.host);
        match records::read_record::<FenceAck>(&path) {
            Ok(None) => {}
            Ok(Some(ack)) if ack.host != request.host => io.complain(
                &path,
                format!("{}: names host {:?}", path.display(), ack.host),
                &mut complained,
            ),
            Ok(Some(ack)) if ack.id == request.id => cycle.acks.push(ack),
            Ok(Some(_)) => {} // the answer to an earlier request
            Err(e @ RecordError::Io { .. }) => return Err(e.to_string()),
            Err(e) => io.complain(&path, e.to_string(), &mut complained),
        }
    }

    // Forget complaints about files that are fine (or gone) now.
    io.complaints.retain(|path, _| complained.contains(path));
    Ok(cycle)
}

/// Whether `path` exists (an I/O error other than "not found" fails the cycle).
fn exists(path: &Path) -> Result<bool, String> {
    match std::fs::symlink_metadata(path) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// Makes a removal in `path`'s directory durable where the file system supports it.
fn sync_dir(path: &Path) {
    if let Some(dir) = path.parent() {
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
}

impl PoolIo {
    /// A garbage record: skipped, with a warning only when its error text changes.
    fn complain(&mut self, path: &Path, text: String, complained: &mut HashSet<PathBuf>) {
        complained.insert(path.to_path_buf());
        if self.complaints.get(path) != Some(&text) {
            tracing::warn!(pool = %self.name, "skipping an invalid record: {text}");
            self.complaints.insert(path.to_path_buf(), text);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};
    use vigil_common::config::PoolConfig;

    fn config(pools: &[(&str, &Path)]) -> StorageConfig {
        StorageConfig {
            pools: pools
                .iter()
                .map(|(name, path)| PoolConfig {
                    name: name.to_string(),
                    path: path.to_path_buf(),
                })
                .collect(),
            interval_ms: 50,
            deadline_ms: 300,
        }
    }

    /// The first report (within `timeout`) that satisfies `want`; earlier ones are dropped.
    fn wait_report(
        rx: &mut UnboundedReceiver<PoolReport>,
        timeout: Duration,
        want: impl Fn(&PoolReport) -> bool,
    ) -> Option<PoolReport> {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            while let Ok(report) = rx.try_recv() {
                if want(&report) {
                    return Some(report);
                }
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        None
    }

    fn wait_until(timeout: Duration, cond: impl Fn() -> bool) -> bool {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if cond() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        cond()
    }

    fn ok(report: &PoolReport) -> Option<&PoolCycle> {
        report.result.as_ref().ok()
    }

    /// Stops the worker and waits until no cycle runs (none starts after `stop`), so the
    /// temporary directories can go.
    fn stop(worker: &StorageWorker) {
        worker.stop();
        let idle = wait_until(Duration::from_secs(5), || {
            worker.shared.lock().busy_since.iter().all(Option::is_none)
        });
        assert!(idle, "a storage thread is still busy after stop");
    }

    /// Publishes the engine's record content every 50 ms until dropped, like a live engine.
    struct Publisher(Arc<std::sync::atomic::AtomicBool>);

    impl Drop for Publisher {
        fn drop(&mut self) {
            self.0.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }

    fn publishing(worker: &StorageWorker, condemned: &[&str]) -> Publisher {
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (w, d) = (worker.clone(), done.clone());
        let condemned: Vec<String> = condemned.iter().map(|h| h.to_string()).collect();
        std::thread::spawn(move || {
            while !d.load(std::sync::atomic::Ordering::SeqCst) {
                w.publish_record(condemned.clone(), false);
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        Publisher(done)
    }

    fn leader_seq(pool: &Path) -> Option<LeaderRecord> {
        records::read_record::<LeaderRecord>(&records::leader_path(pool)).expect("leader.json")
    }

    #[test]
    fn the_leader_record_is_written_only_while_leader() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (tx, mut rx) = unbounded_channel();
        let worker = StorageWorker::spawn(&config(&[("p1", dir.path())]), tx);
        assert_eq!(worker.pools(), vec!["p1".to_string()]);
        let first =
            wait_report(&mut rx, Duration::from_secs(5), |r| ok(r).is_some()).expect("a report");
        assert_eq!(first.pool, "p1");
        assert_eq!(ok(&first).expect("ok").leader_written, None);
        assert_eq!(leader_seq(dir.path()), None);

        worker.set_leader(Some((3, 1)));
        let engine = publishing(&worker, &["hv9"]);
        let written = wait_report(&mut rx, Duration::from_secs(5), |r| {
            ok(r).is_some_and(|c| c.leader_written.is_some())
        })
        .expect("leader written");
        let seq = ok(&written).and_then(|c| c.leader_written).expect("seq");
        let record = leader_seq(dir.path()).expect("leader.json exists");
        assert_eq!((record.term, record.node), (3, 1));
        assert_eq!(record.condemned, vec!["hv9".to_string()]);
        assert!(record.condemns("hv9") && !record.condemns("hv1"));
        assert_eq!(ok(&written).expect("ok").condemned, vec!["hv9".to_string()]);
        assert!(record.seq >= seq);
        // The record keeps being rewritten. (Not "the next report's seq is above what the file
        // held": the file may already hold that write when it was read above, which made this
        // test fail on a loaded machine.)
        let rewritten_at = Instant::now() + Duration::from_secs(5);
        let later = loop {
            let later = leader_seq(dir.path()).expect("leader.json");
            if later.seq > record.seq || Instant::now() > rewritten_at {
                break later;
            }
            let _ = wait_report(&mut rx, Duration::from_secs(1), |r| ok(r).is_some());
        };
        assert!(later.seq > record.seq, "{later:?} vs {record:?}");

        // Issue 9 item 4: a stalled engine (still leader, but deciding nothing) must leave
        // the record stale, so that no agent fences itself on it.
        drop(engine);
        std::thread::sleep(RECORD_FRESH + Duration::from_millis(200));
        let stalled = leader_seq(dir.path()).expect("leader.json").seq;
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(
            leader_seq(dir.path()).expect("leader.json").seq,
            stalled,
            "the record kept changing while the engine published nothing"
        );
        let _engine = publishing(&worker, &[]);

        worker.set_leader(None);
        wait_report(&mut rx, Duration::from_secs(5), |r| {
            ok(r).is_some_and(|c| c.leader_written.is_none())
        })
        .expect("a cycle without leadership");
        let stopped_at = leader_seq(dir.path()).expect("leader.json");
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(
            leader_seq(dir.path()).expect("leader.json").seq,
            stopped_at.seq
        );
        stop(&worker);
    }

    fn heartbeat(host: &str, seq: u64) -> StorageHeartbeat {
        StorageHeartbeat {
            host: host.into(),
            instance: 7,
            agent_mono_ms: 1000 + seq,
            seq,
            wall_ms: 1,
            fenced: false,
        }
    }

    #[test]
    fn heartbeats_of_valid_hosts_are_reported_and_garbage_is_skipped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pool = dir.path();
        for (host, seq) in [("hv1", 5), ("hv2", 9)] {
            records::write_record(&records::heartbeat_path(pool, host), &heartbeat(host, seq))
                .expect("write");
        }
        let hv3 = records::heartbeat_path(pool, "hv3");
        std::fs::create_dir_all(hv3.parent().expect("parent")).expect("mkdir");
        std::fs::write(&hv3, b"{garbage").expect("garbage");
        std::fs::create_dir_all(records::hosts_dir(pool).join("..bad")).expect("mkdir");
        // An invalid host name, even with a well-formed record inside.
        records::write_record(
            &records::hosts_dir(pool).join("a b/heartbeat.json"),
            &heartbeat("a b", 1),
        )
        .expect("write");
        // A record naming another host than its directory.
        records::write_record(&records::heartbeat_path(pool, "hv4"), &heartbeat("hv1", 1))
            .expect("write");
        // A stray file directly under hosts/.
        std::fs::write(records::hosts_dir(pool).join(".nfs0001"), b"x").expect("stray");

        let (tx, mut rx) = unbounded_channel();
        let worker = StorageWorker::spawn(&config(&[("p1", pool)]), tx);
        for _ in 0..3 {
            let report = wait_report(&mut rx, Duration::from_secs(5), |_| true).expect("report");
            let cycle = report.result.expect("garbage is not a pool failure");
            assert_eq!(
                cycle.heartbeats,
                vec![heartbeat("hv1", 5), heartbeat("hv2", 9)]
            );
        }
        stop(&worker);
    }

    /// Request 42 to fence agent instance 7 of hv1.
    fn fence_request_for_hv1() -> FenceRequest {
        FenceRequest {
            id: 42,
            host: "hv1".into(),
            instance: 7,
            term: 3,
            node: 1,
            wall_ms: 1,
            reason: "test".into(),
            vms: vec![],
        }
    }

    /// Whether the fence slot at `path` holds `request`.
    fn slot_holds(path: &Path, request: &FenceRequest) -> bool {
        records::read_record::<FenceRequest>(path)
            .ok()
            .flatten()
            .as_ref()
            == Some(request)
    }

    #[test]
    fn fence_requests_are_written_acked_and_cleared() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pool = dir.path().to_path_buf();
        let (tx, mut rx) = unbounded_channel();
        let worker = StorageWorker::spawn(&config(&[("p1", &pool)]), tx);
        let request = fence_request_for_hv1();
        worker.request_fence(request.clone());
        let request_path = records::fence_request_path(&pool, "hv1");
        let ack_path = records::fence_ack_path(&pool, "hv1");
        assert!(wait_until(Duration::from_secs(5), || {
            slot_holds(&request_path, &request)
        }));

        let ack = |id| FenceAck {
            id,
            host: "hv1".into(),
            instance: 7,
            destroyed: vec!["uuid-1".into()],
            wall_ms: 2,
            verified_off: vec!["uuid-1".into()],
        };
        // An ack of an earlier request is not reported.
        records::write_record(&ack_path, &ack(41)).expect("stale ack");
        wait_report(&mut rx, Duration::from_secs(1), |_| true).expect("report");
        let report = wait_report(&mut rx, Duration::from_secs(5), |_| true).expect("report");
        assert_eq!(report.result.expect("ok").acks, vec![]);

        records::write_record(&ack_path, &ack(42)).expect("ack");
        let report = wait_report(&mut rx, Duration::from_secs(5), |r| {
            ok(r).is_some_and(|c| !c.acks.is_empty())
        })
        .expect("the ack is reported");
        assert_eq!(report.result.expect("ok").acks, vec![ack(42)]);

        worker.clear_fence("hv1");
        assert!(wait_until(Duration::from_secs(5), || {
            !request_path.exists() && !ack_path.exists()
        }));
        // No longer pending: its acks are not read any more.
        wait_report(&mut rx, Duration::from_secs(1), |_| true).expect("report");
        let report = wait_report(&mut rx, Duration::from_secs(5), |_| true).expect("report");
        assert_eq!(report.result.expect("ok").acks, vec![]);
        stop(&worker);
        assert!(!request_path.exists() && !ack_path.exists());
    }

    #[test]
    fn a_fence_clear_is_verified_and_kept_until_the_slot_is_empty() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pool = dir.path().to_path_buf();
        let (tx, _rx) = unbounded_channel();
        let worker = StorageWorker::spawn(&config(&[("p1", &pool)]), tx);
        let request = fence_request_for_hv1();
        let request_path = records::fence_request_path(&pool, "hv1");
        // Left by an earlier leader: this monitor never wrote it.
        records::write_record(&request_path, &request).expect("left-over request");
        worker.clear_fence("hv1");
        assert!(wait_until(Duration::from_secs(5), || !request_path.exists()));
        // A deposed leader's late write (or a cache that showed the file again): the clear
        // holds until the host is asked again, so it goes again.
        records::write_record(&request_path, &request).expect("late write");
        assert!(
            wait_until(Duration::from_secs(5), || !request_path.exists()),
            "a cleared slot must stay clear"
        );
        // Asked again: the new request stays.
        let mut again = request.clone();
        again.id = 43;
        worker.request_fence(again.clone());
        assert!(wait_until(Duration::from_secs(5), || {
            slot_holds(&request_path, &again)
        }));
        std::thread::sleep(Duration::from_millis(200));
        assert!(request_path.exists());
        stop(&worker);
    }

    #[test]
    fn a_failing_pool_does_not_stop_a_good_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let bad = dir.path().join("not-a-dir");
        std::fs::write(&bad, b"regular file").expect("file");
        let good = dir.path().join("good");
        std::fs::create_dir(&good).expect("mkdir");
        let (tx, mut rx) = unbounded_channel();
        let worker = StorageWorker::spawn(&config(&[("bad", &bad), ("good", &good)]), tx);
        worker.set_leader(Some((1, 1)));
        let _engine = publishing(&worker, &[]);
        let (mut oks, mut errs) = (0, 0);
        let end = Instant::now() + Duration::from_secs(10);
        while (oks < 3 || errs < 3) && Instant::now() < end {
            let Some(report) = wait_report(&mut rx, Duration::from_secs(1), |_| true) else {
                continue;
            };
            match (report.pool.as_str(), &report.result) {
                // (The first cycle may start before `set_leader`.)
                ("good", Ok(cycle)) => oks += usize::from(cycle.leader_written.is_some()),
                ("bad", Err(e @ PoolFault::Io(text))) => {
                    assert!(text.contains(&bad.display().to_string()), "{e}");
                    errs += 1;
                }
                other => panic!("unexpected report {other:?}"),
            }
        }
        assert!(
            oks >= 3 && errs >= 3,
            "ok reports {oks}, error reports {errs}"
        );
        assert!(leader_seq(&good).is_some());
        stop(&worker);
    }

    #[test]
    fn a_stuck_cycle_is_reported_by_the_watchdog() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (tx, mut rx) = unbounded_channel();
        let hang: CycleFn = Arc::new(|_io: &mut PoolIo, _inputs: &Inputs| {
            std::thread::sleep(Duration::from_secs(2));
            Ok(PoolCycle::default())
        });
        let started = Instant::now();
        let worker = StorageWorker::spawn_with(&config(&[("p1", dir.path())]), tx, hang);
        let report = wait_report(&mut rx, Duration::from_millis(1200), |_| true)
            .expect("a report while the cycle hangs");
        assert!(started.elapsed() < Duration::from_millis(1200));
        assert_eq!(report.pool, "p1");
        let reason = report.result.expect_err("stuck");
        assert!(
            matches!(&reason, PoolFault::Stuck { pool, deadline_ms: 300, .. } if pool == "p1"),
            "{reason:?}"
        );
        assert!(reason.to_string().contains("stuck"), "{reason}");
        // Never joined: the hung thread exits on its own once its I/O returns.
        worker.stop();
    }
}
