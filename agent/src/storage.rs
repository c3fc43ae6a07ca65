//! The agent's storage heartbeat: proof of life written to shared primary storage, and the
//! records the monitors leave there for this host (the leader record, fence requests).
//!
//! Every cycle (`[storage] interval_ms`), for every pool, the agent
//! 1. writes any fence acknowledgement queued by [`StorageWorker::acknowledge`] to
//!    `fence-ack.json` (retried every cycle until written once on that pool);
//! 2. writes its [`StorageHeartbeat`] to `heartbeat.json`;
//! 3. reads `leader.json`, `fence-request.json` and `fence-ack.json`.
//!
//! # One OS thread per pool
//!
//! Shared storage does not only fail cleanly: an NFS server that goes away can leave a `write`,
//! `fsync`, `rename` or even `open` blocked in the kernel forever (a hard mount), and nothing in
//! user space can cancel that syscall. So every pool gets its own dedicated thread
//! (`vigil-storage-<pool>`), and no one ever waits for one: the thread publishes what it is doing
//! (`cycle_started` is set before the I/O and cleared after it) in a small mutex-protected record
//! that is never held across I/O, and [`StorageWorker::view`] judges each pool *at call time*. A
//! thread stuck in a syscall never reports anything, yet its pool shows as down as soon as its
//! cycle has run for longer than `deadline_ms`. A hung pool therefore never stalls the rest of
//! the agent, nor the other pools (tokio's blocking pool would not do: a hung task holds its
//! worker forever and the pool's threads are shared with everything else). [`StorageWorker::stop`]
//! never joins: a thread hung in the kernel is simply left behind.
//!
//! # Freshness on our own monotonic clock
//!
//! Records carry the writer's wall clock for humans only. Comparing it with ours would make every
//! decision depend on two machines' clocks agreeing (NTP steps, drift, a wrong clock on a
//! rebooted host). Instead the agent remembers when *it* saw the leader record's
//! `(term, node, seq)` change, on its own [`Instant`] clock: "the leader wrote within the last N
//! ms" becomes "I saw it change within the last N ms", which needs no clock agreement at all. One
//! read alone proves nothing (a record left by a leader that died an hour ago looks the same as
//! one written a moment ago), so the first record read has no change time.
//!
//! Only I/O errors and deadline overruns make a pool down. A record that does not parse or is
//! too large is the pool answering with garbage: it is logged (once per distinct error) and
//! treated as absent, since the storage itself works.

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use vigil_common::config::{PoolConfig, StorageConfig};
use vigil_common::storage::{
    encode, fence_ack_path, fence_request_path, heartbeat_path, leader_path, read_record,
    write_record, FenceAck, FenceRequest, LeaderRecord, RecordError, StorageHeartbeat,
    MAX_RECORD_BYTES,
};

/// How many acknowledged request ids each pool remembers having written.
const ACKS_REMEMBERED: usize = 16;

/// The detail of a pool whose first I/O cycle has not finished yet.
const NOT_CHECKED: &str = "not checked yet";

/// What one pool looks like right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolView {
    pub name: String,
    /// Whether anything is known yet: false until the first I/O cycle completed or overran
    /// its deadline (an agent that just started must not take "not checked yet" for "down").
    pub checked: bool,
    /// Up: the last I/O cycle succeeded and finished within `deadline_ms`, it finished within
    /// the last `deadline_ms + interval_ms`, and no cycle has been running longer than
    /// `deadline_ms`.
    pub ok: bool,
    /// Why the pool is not ok (for instance `write /…/heartbeat.json: Input/output error` or
    /// `I/O cycle stuck for 2300 ms (deadline 2000 ms)`); empty when ok.
    pub detail: String,
    /// The latest leader record read from this pool, and when (on this agent's monotonic clock)
    /// its `(term, node, seq)` was last seen to change: `None` if it has not changed since we
    /// started watching. `None` until a record was read once. A missing or unreadable
    /// `leader.json` keeps the last record read (whose change time then only ages).
    pub leader: Option<(LeaderRecord, Option<Instant>)>,
    /// A fence request for this host naming our instance (never instance 0) that has no
    /// acknowledgement with the same id on this pool yet.
    pub fence_request: Option<FenceRequest>,
}

/// Every pool, in configuration order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StorageView {
    pub pools: Vec<PoolView>,
}

/// Handle on the storage heartbeat threads. Cheap to clone; every clone drives the same
/// threads.
#[derive(Debug, Clone)]
pub struct StorageWorker {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    host: String,
    instance: u64,
    interval: Duration,
    deadline: Duration,
    pools: Vec<PoolShared>,
    /// Set by `stop`; the condition variable wakes sleeping threads.
    stopped: Mutex<bool>,
    wake: Condvar,
    /// Counts completed cycles (of every pool).
    changes: watch::Sender<u64>,
    /// Pool threads that have not exited (a hung one never does).
    alive: AtomicUsize,
    /// Written into every heartbeat: this agent has fenced itself (see `set_fenced`).
    fenced: std::sync::atomic::AtomicBool,
}

#[derive(Debug)]
struct PoolShared {
    name: String,
    path: PathBuf,
    state: Mutex<PoolState>,
}

/// What a pool thread publishes. Locked only briefly, never across I/O.
#[derive(Debug, Default)]
struct PoolState {
    /// Set just before a cycle's I/O, cleared after it.
    cycle_started: Option<Instant>,
    /// Outcome of the last completed cycle: `None` before the first, `Some(Ok(()))` if it
    /// succeeded in time, `Some(Err(why))` otherwise.
    last: Option<Result<(), String>>,
    /// When the last successful cycle finished.
    last_ok_at: Option<Instant>,
    leader: Option<(LeaderRecord, Option<Instant>)>,
    /// The last fence request read (any host or instance; filtered by `view`).
    fence_request: Option<FenceRequest>,
    /// The id in `fence-ack.json` at the last read.
    ack_on_disk: Option<u64>,
    /// Ids of the acknowledgements this thread wrote successfully (most recent last).
    acks_written: VecDeque<u64>,
    /// The acknowledgement still to write on this pool.
    pending_ack: Option<FenceAck>,
}

/// The work of one cycle on one pool, handed to the I/O function.
#[derive(Debug, Clone)]
struct PoolJob {
    path: PathBuf,
    host: String,
    heartbeat: StorageHeartbeat,
    /// Written first, when present.
    ack: Option<FenceAck>,
}

/// What one successful cycle read from a pool.
#[derive(Debug, Clone, Default)]
struct CycleResult {
    /// The leader record, `None` if absent or unreadable garbage.
    leader: Option<LeaderRecord>,
    /// The fence request in this host's directory, `None` if absent or garbage.
    fence_request: Option<FenceRequest>,
    /// The id in `fence-ack.json`, if any.
    ack_on_disk: Option<u64>,
    /// The id of the acknowledgement this cycle wrote.
    ack_written: Option<u64>,
    /// Records that did not parse (the pool answered, so not a failure).
    warnings: Vec<String>,
}

/// The I/O of one cycle; `Err` carries why the pool is down.
type IoFn = Box<dyn FnMut(&PoolJob) -> Result<CycleResult, String> + Send>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn ms(d: Duration) -> u128 {
    d.as_millis()
}

impl StorageWorker {
    /// Starts one dedicated OS thread per pool (`vigil-storage-<pool>`). Each writes this host's
    /// heartbeat and reads the leader record and this host's fence request and acknowledgement
    /// every `cfg.interval_ms`. `started` is when the agent process started (the heartbeat's
    /// `agent_mono_ms` counts from it).
    pub fn spawn(
        cfg: &StorageConfig,
        host: &str,
        instance: u64,
        started: Instant,
    ) -> StorageWorker {
        Self::spawn_with(cfg, host, instance, started, |_| Box::new(real_cycle))
    }

    /// [`StorageWorker::spawn`] with the I/O of a cycle supplied by `make_io` (one function per
    /// pool), so tests can stand in for a failing or hanging pool.
    fn spawn_with(
        cfg: &StorageConfig,
        host: &str,
        instance: u64,
        started: Instant,
        make_io: impl Fn(&PoolConfig) -> IoFn,
    ) -> StorageWorker {
        let (changes, _) = watch::channel(0u64);
        let inner = Arc::new(Inner {
            host: host.to_string(),
            instance,
            interval: Duration::from_millis(cfg.interval_ms.max(1)),
            deadline: Duration::from_millis(cfg.deadline_ms.max(1)),
            pools: cfg
                .pools
                .iter()
                .map(|p| PoolShared {
                    name: p.name.clone(),
                    path: p.path.clone(),
                    state: Mutex::new(PoolState::default()),
                })
                .collect(),
            stopped: Mutex::new(false),
            wake: Condvar::new(),
            changes,
            alive: AtomicUsize::new(0),
            fenced: std::sync::atomic::AtomicBool::new(false),
        });
        for (index, pool) in cfg.pools.iter().enumerate() {
            let io = make_io(pool);
            let thread_inner = Arc::clone(&inner);
            inner.alive.fetch_add(1, Ordering::SeqCst);
            let spawned = std::thread::Builder::new()
                .name(format!("vigil-storage-{}", pool.name))
                .spawn(move || pool_loop(thread_inner, index, io, started));
            if let Err(e) = spawned {
                inner.alive.fetch_sub(1, Ordering::SeqCst);
                tracing::error!(pool = %pool.name, error = %e, "cannot start the storage thread");
                let mut st = lock(&inner.pools[index].state);
                st.last = Some(Err(format!("cannot start the storage thread: {e}")));
            }
        }
        StorageWorker { inner }
    }

    /// The state of every pool, judged now: a pool whose thread has been inside one cycle for
    /// longer than `deadline_ms` shows as down even though that thread cannot report. Never
    /// waits for I/O.
    pub fn view(&self) -> StorageView {
        let inner = &*self.inner;
        let now = Instant::now();
        let pools = inner
            .pools
            .iter()
            .map(|pool| {
                let st = lock(&pool.state);
                let (ok, detail) = judge(&st, now, inner.interval, inner.deadline);
                let fence_request = st
                    .fence_request
                    .as_ref()
                    .filter(|r| {
                        r.host == inner.host
                            && r.instance != 0
                            && r.instance == inner.instance
                            && st.ack_on_disk != Some(r.id)
                            && !st.acks_written.contains(&r.id)
                    })
                    .cloned();
                PoolView {
                    name: pool.name.clone(),
                    checked: ok || st.last.is_some() || detail != NOT_CHECKED,
                    ok,
                    detail,
                    leader: st.leader.clone(),
                    fence_request,
                }
            })
            .collect();
        StorageView { pools }
    }

    /// A receiver whose value (a counter) moves after every completed cycle of any pool.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.inner.changes.subscribe()
    }

    /// Queues `ack` for every pool: each pool thread writes it to this host's `fence-ack.json`
    /// at the start of its next cycle, and again every cycle until it was written once on that
    /// pool. A newer acknowledgement replaces one still queued (the file holds one record).
    /// Never blocks on I/O. A `destroyed` list too long for a record is cut short (it only
    /// feeds the event log).
    pub fn acknowledge(&self, mut ack: FenceAck) {
        let mut cut = 0usize;
        while encode(&ack).len() > MAX_RECORD_BYTES && ack.destroyed.pop().is_some() {
            cut += 1;
        }
        if cut > 0 {
            tracing::warn!(
                id = ack.id,
                left_out = cut,
                "fence acknowledgement too large: left some destroyed domains out of it"
            );
        }
        for pool in &self.inner.pools {
            lock(&pool.state).pending_ack = Some(ack.clone());
        }
    }

    /// Says in every following heartbeat whether this agent has fenced itself (its HA domains
    /// are destroyed because its lease ran out while isolated).
    pub fn set_fenced(&self, fenced: bool) {
        self.inner
            .fenced
            .store(fenced, std::sync::atomic::Ordering::SeqCst);
    }

    /// Stops the pool threads at their next cycle. Does not wait: a thread hung in a syscall is
    /// left behind.
    pub fn stop(&self) {
        *lock(&self.inner.stopped) = true;
        self.inner.wake.notify_all();
    }

    /// Pool threads that have not exited yet.
    #[cfg(test)]
    fn threads_alive(&self) -> usize {
        self.inner.alive.load(Ordering::SeqCst)
    }
}

/// Whether a pool is up at `now`, and why not.
fn judge(st: &PoolState, now: Instant, interval: Duration, deadline: Duration) -> (bool, String) {
    if let Some(started) = st.cycle_started {
        let running = now.saturating_duration_since(started);
        if running > deadline {
            return (
                false,
                format!(
                    "I/O cycle stuck for {} ms (deadline {} ms)",
                    ms(running),
                    ms(deadline)
                ),
            );
        }
    }
    match &st.last {
        None => (false, NOT_CHECKED.to_string()),
        Some(Err(why)) => (false, why.clone()),
        Some(Ok(())) => {
            let since = st
                .last_ok_at
                .map(|t| now.saturating_duration_since(t))
                .unwrap_or(Duration::MAX);
            if since > deadline + interval {
                (
                    false,
                    format!(
                        "no I/O cycle completed for {} ms (interval {} ms, deadline {} ms)",
                        ms(since),
                        ms(interval),
                        ms(deadline)
                    ),
                )
            } else {
                (true, String::new())
            }
        }
    }
}

impl Inner {
    /// Sleeps until `at` or until stopped; true if stopped.
    fn sleep_until(&self, at: Instant) -> bool {
        let mut stopped = lock(&self.stopped);
        loop {
            if *stopped {
                return true;
            }
            let now = Instant::now();
            if now >= at {
                return false;
            }
            stopped = self
                .wake
                .wait_timeout(stopped, at - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// Counts a pool thread out when it ends, even by a panic.
struct AliveGuard<'a>(&'a AtomicUsize);

impl Drop for AliveGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The body of a pool thread.
fn pool_loop(inner: Arc<Inner>, index: usize, mut io: IoFn, started: Instant) {
    let _alive = AliveGuard(&inner.alive);
    let pool = &inner.pools[index];
    let mut seq = 0u64;
    let mut last_warning = String::new();
    let mut was_ok: Option<bool> = None;
    let mut next = Instant::now();
    loop {
        if inner.sleep_until(next) {
            tracing::debug!(pool = %pool.name, "storage thread stopped");
            return;
        }
        let cycle_start = Instant::now();
        // A cycle slower than the interval is followed by the next one at once.
        next = cycle_start + inner.interval;
        seq += 1;
        let ack = {
            let mut st = lock(&pool.state);
            st.cycle_started = Some(cycle_start);
            st.pending_ack.clone()
        };
        let job = PoolJob {
            path: pool.path.clone(),
            host: inner.host.clone(),
            heartbeat: StorageHeartbeat {
                host: inner.host.clone(),
                instance: inner.instance,
                agent_mono_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
                seq,
                wall_ms: vigil_common::unix_ms(),
                fenced: inner.fenced.load(std::sync::atomic::Ordering::SeqCst),
            },
            ack,
        };
        let result = catch_unwind(AssertUnwindSafe(|| io(&job)))
            .unwrap_or_else(|_| Err("the I/O cycle panicked".to_string()));
        let end = Instant::now();
        let took = end.saturating_duration_since(cycle_start);

        let outcome = match result {
            Ok(cycle) => {
                let warning = cycle.warnings.join("; ");
                if warning != last_warning {
                    if !warning.is_empty() {
                        tracing::warn!(pool = %pool.name, "{warning}");
                    }
                    last_warning = warning;
                }
                let mut st = lock(&pool.state);
                apply(&mut st, cycle, end);
                if took > inner.deadline {
                    Err(format!(
                        "I/O took {} ms, deadline {} ms",
                        ms(took),
                        ms(inner.deadline)
                    ))
                } else {
                    st.last_ok_at = Some(end);
                    Ok(())
                }
            }
            Err(why) => Err(why),
        };
        let ok = outcome.is_ok();
        match (&outcome, was_ok) {
            (Err(why), Some(true) | None) => {
                tracing::warn!(pool = %pool.name, path = %pool.path.display(), "storage pool down: {why}");
            }
            (Ok(()), Some(false)) => {
                tracing::info!(pool = %pool.name, "storage pool up again");
            }
            _ => {}
        }
        was_ok = Some(ok);
        {
            let mut st = lock(&pool.state);
            st.cycle_started = None;
            st.last = Some(outcome);
        }
        inner.changes.send_modify(|n| *n = n.wrapping_add(1));
    }
}

/// Records what a cycle read (under the pool's lock; no I/O here).
fn apply(st: &mut PoolState, cycle: CycleResult, at: Instant) {
    if let Some(id) = cycle.ack_written {
        if st.pending_ack.as_ref().is_some_and(|a| a.id == id) {
            st.pending_ack = None;
        }
        if !st.acks_written.contains(&id) {
            st.acks_written.push_back(id);
            while st.acks_written.len() > ACKS_REMEMBERED {
                st.acks_written.pop_front();
            }
        }
    }
    if let Some(record) = cycle.leader {
        st.leader = match st.leader.take() {
            None => Some((record, None)),
            Some((old, changed_at)) => {
                let changed =
                    (old.term, old.node, old.seq) != (record.term, record.node, record.seq);
                Some((record, if changed { Some(at) } else { changed_at }))
            }
        };
    }
    st.fence_request = cycle.fence_request;
    st.ack_on_disk = cycle.ack_on_disk;
}

/// Reads a record: an I/O error fails the cycle, garbage becomes a warning and `None`.
fn read_soft<T: serde::de::DeserializeOwned>(
    path: &Path,
    warnings: &mut Vec<String>,
) -> Result<Option<T>, String> {
    match read_record::<T>(path) {
        Ok(r) => Ok(r),
        Err(e @ RecordError::Io { .. }) => Err(format!("read {e}")),
        Err(e) => {
            warnings.push(e.to_string());
            Ok(None)
        }
    }
}

fn write_hard<T: serde::Serialize>(path: &Path, record: &T) -> Result<(), String> {
    write_record(path, record).map_err(|e| format!("write {e}"))
}

/// The real I/O of a cycle (blocking, may hang forever on a dead NFS server).
fn real_cycle(job: &PoolJob) -> Result<CycleResult, String> {
    let mut out = CycleResult::default();
    if let Some(ack) = &job.ack {
        write_hard(&fence_ack_path(&job.path, &job.host), ack)?;
        out.ack_written = Some(ack.id);
    }
    write_hard(&heartbeat_path(&job.path, &job.host), &job.heartbeat)?;
    out.leader = read_soft(&leader_path(&job.path), &mut out.warnings)?;
    let request: Option<FenceRequest> =
        read_soft(&fence_request_path(&job.path, &job.host), &mut out.warnings)?;
    out.fence_request = match request {
        Some(r) if r.host != job.host => {
            out.warnings.push(format!(
                "{}: names host {:?}, not {:?}: ignored",
                fence_request_path(&job.path, &job.host).display(),
                r.host,
                job.host
            ));
            None
        }
        other => other,
    };
    let ack: Option<FenceAck> =
        read_soft(&fence_ack_path(&job.path, &job.host), &mut out.warnings)?;
    out.ack_on_disk = ack.map(|a| a.id);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOST: &str = "hv1";
    const INSTANCE: u64 = 42;

    /// The deadline for tests that do real I/O but are not about the deadline: a loaded CI
    /// machine has taken 436 ms for one fsync'd cycle (`leader_changes_are_timed_on_our_clock`
    /// failed there with 300 ms). The deadline itself is tested with injected cycles.
    const REAL_IO_DEADLINE_MS: u64 = 5_000;

    fn config(pools: &[(&str, &Path)], interval_ms: u64, deadline_ms: u64) -> StorageConfig {
        StorageConfig {
            pools: pools
                .iter()
                .map(|(name, path)| PoolConfig {
                    name: name.to_string(),
                    path: path.to_path_buf(),
                })
                .collect(),
            interval_ms,
            deadline_ms,
        }
    }

    /// Polls `cond` every 10 ms for up to `timeout`.
    fn wait_for(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
        let until = Instant::now() + timeout;
        loop {
            if cond() {
                return true;
            }
            if Instant::now() >= until {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits until the change counter moved by `n` times the number of pools (with pools that
    /// all cycle at the same pace: each completed about `n` more cycles).
    fn wait_cycles(w: &StorageWorker, n: u64) {
        let rx = w.changes();
        let from = *rx.borrow();
        let want = n * w.inner.pools.len() as u64;
        assert!(
            wait_for(Duration::from_secs(5), || rx.borrow().wrapping_sub(from)
                >= want),
            "the pools did not complete {n} cycles"
        );
    }

    /// Stops the worker and waits for its threads to exit (before the tempdirs go away).
    fn stop_and_wait(w: &StorageWorker) {
        w.stop();
        assert!(
            wait_for(Duration::from_secs(5), || w.threads_alive() == 0),
            "storage threads did not stop"
        );
    }

    fn pool_view(w: &StorageWorker, name: &str) -> PoolView {
        w.view()
            .pools
            .into_iter()
            .find(|p| p.name == name)
            .expect("pool in view")
    }

    fn request(id: u64, instance: u64) -> FenceRequest {
        FenceRequest {
            id,
            host: HOST.into(),
            instance,
            term: 3,
            node: 1,
            wall_ms: 1,
            reason: "test".into(),
            vms: vec![],
        }
    }

    #[test]
    fn a_good_pool_comes_up_and_heartbeats() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = config(&[("p1", dir.path())], 50, REAL_IO_DEADLINE_MS);
        let w = StorageWorker::spawn(&cfg, HOST, INSTANCE, Instant::now());
        assert!(
            wait_for(Duration::from_secs(2), || pool_view(&w, "p1").ok),
            "pool not ok: {:?}",
            w.view()
        );
        let v = pool_view(&w, "p1");
        assert!(v.detail.is_empty(), "{v:?}");
        assert_eq!(v.leader, None);
        assert_eq!(v.fence_request, None);

        let path = heartbeat_path(dir.path(), HOST);
        let first: StorageHeartbeat = read_record(&path).expect("read").expect("heartbeat");
        assert_eq!(first.host, HOST);
        assert_eq!(first.instance, INSTANCE);
        wait_cycles(&w, 2);
        let second: StorageHeartbeat = read_record(&path).expect("read").expect("heartbeat");
        assert_eq!(second.host, HOST);
        assert_eq!(second.instance, INSTANCE);
        assert!(second.seq > first.seq, "{first:?} then {second:?}");
        assert!(second.agent_mono_ms >= first.agent_mono_ms);
        stop_and_wait(&w);
    }

    #[test]
    fn leader_changes_are_timed_on_our_clock() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut leader = LeaderRecord {
            term: 2,
            node: 1,
            seq: 10,
            wall_ms: 5,
            condemned: Vec::new(),
            hold: false,
        };
        write_record(&leader_path(dir.path()), &leader).expect("write leader");
        let cfg = config(&[("p1", dir.path())], 50, REAL_IO_DEADLINE_MS);
        let w = StorageWorker::spawn(&cfg, HOST, INSTANCE, Instant::now());
        assert!(
            wait_for(Duration::from_secs(2), || pool_view(&w, "p1")
                .leader
                .is_some()),
            "{:?}",
            w.view()
        );
        // Several reads of the same record: still no change time.
        wait_cycles(&w, 2);
        let v = pool_view(&w, "p1");
        assert_eq!(v.leader, Some((leader.clone(), None)));

        let before = Instant::now();
        leader.seq += 1;
        write_record(&leader_path(dir.path()), &leader).expect("write leader");
        assert!(
            wait_for(Duration::from_millis(500), || pool_view(&w, "p1")
                .leader
                .is_some_and(|(_, at)| at.is_some())),
            "{:?}",
            w.view()
        );
        let (seen, changed_at) = pool_view(&w, "p1").leader.expect("leader");
        assert_eq!(seen, leader);
        assert!(changed_at.expect("changed") >= before);

        // Garbage is not a pool failure; the last record read stays.
        std::fs::write(leader_path(dir.path()), b"{garbage").expect("garbage");
        wait_cycles(&w, 2);
        let v = pool_view(&w, "p1");
        assert!(v.ok, "{v:?}");
        assert_eq!(v.leader.map(|(r, _)| r), Some(leader));
        stop_and_wait(&w);
    }

    #[test]
    fn fence_requests_are_filtered_and_acknowledged() {
        let dir = tempfile::tempdir().expect("tempdir");
        let req_path = fence_request_path(dir.path(), HOST);
        let ack_path = fence_ack_path(dir.path(), HOST);
        let cfg = config(&[("p1", dir.path())], 50, REAL_IO_DEADLINE_MS);
        let w = StorageWorker::spawn(&cfg, HOST, INSTANCE, Instant::now());
        assert!(wait_for(Duration::from_secs(2), || pool_view(&w, "p1").ok));

        // For our instance: reported.
        write_record(&req_path, &request(7, INSTANCE)).expect("write");
        assert!(
            wait_for(Duration::from_secs(1), || pool_view(&w, "p1").fence_request
                == Some(request(7, INSTANCE))),
            "{:?}",
            w.view()
        );

        // For an earlier instance: ignored.
        write_record(&req_path, &request(8, INSTANCE + 1)).expect("write");
        wait_cycles(&w, 2);
        assert_eq!(pool_view(&w, "p1").fence_request, None);

        // For another host (in our directory): ignored, the pool stays ok.
        let mut other = request(9, INSTANCE);
        other.host = "hv2".into();
        write_record(&req_path, &other).expect("write");
        wait_cycles(&w, 2);
        let v = pool_view(&w, "p1");
        assert_eq!(v.fence_request, None);
        assert!(v.ok, "{v:?}");

        // For "any instance" (0): ignored, a request must name this agent process.
        write_record(&req_path, &request(11, 0)).expect("write");
        wait_cycles(&w, 2);
        assert_eq!(pool_view(&w, "p1").fence_request, None);

        // For this instance: reported.
        write_record(&req_path, &request(10, INSTANCE)).expect("write");
        assert!(
            wait_for(Duration::from_secs(1), || pool_view(&w, "p1").fence_request
                == Some(request(10, INSTANCE))),
            "{:?}",
            w.view()
        );

        // Acknowledged: written to the pool, no longer reported.
        let ack = FenceAck {
            id: 10,
            host: HOST.into(),
            instance: INSTANCE,
            destroyed: vec!["4dea22b3-1d52-d8f3-2516-782e98ab3fa0".into()],
            wall_ms: 2,
            verified_off: vec![],
        };
        w.acknowledge(ack.clone());
        assert!(
            wait_for(Duration::from_secs(1), || read_record::<FenceAck>(
                &ack_path
            )
            .ok()
            .flatten()
                == Some(ack.clone())),
            "no acknowledgement written"
        );
        assert!(
            wait_for(Duration::from_secs(1), || pool_view(&w, "p1")
                .fence_request
                .is_none()),
            "{:?}",
            w.view()
        );
        // Written once, not rewritten every cycle.
        std::fs::remove_file(&ack_path).expect("remove ack");
        wait_cycles(&w, 2);
        assert!(!ack_path.exists());
        // Still not reported: we remember having written it.
        assert_eq!(pool_view(&w, "p1").fence_request, None);
        stop_and_wait(&w);
    }

    #[test]
    fn a_failing_pool_does_not_affect_a_good_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let good = dir.path().join("good");
        std::fs::create_dir(&good).expect("mkdir");
        let bad = dir.path().join("bad");
        std::fs::write(&bad, b"a file, not a directory").expect("file");
        let cfg = config(&[("bad", &bad), ("good", &good)], 50, REAL_IO_DEADLINE_MS);
        let w = StorageWorker::spawn(&cfg, HOST, INSTANCE, Instant::now());
        assert!(
            wait_for(Duration::from_secs(2), || {
                let v = w.view();
                v.pools[0].detail != "not checked yet" && v.pools[1].ok
            }),
            "{:?}",
            w.view()
        );
        wait_cycles(&w, 2);
        let v = w.view();
        assert_eq!(v.pools.len(), 2);
        assert_eq!(v.pools[0].name, "bad");
        assert!(!v.pools[0].ok, "{v:?}");
        assert!(
            v.pools[0].detail.contains(&*bad.to_string_lossy()),
            "{:?}",
            v.pools[0]
        );
        assert!(v.pools[0].detail.starts_with("write "), "{:?}", v.pools[0]);
        assert_eq!(v.pools[1].name, "good");
        assert!(v.pools[1].ok, "{v:?}");
        assert!(heartbeat_path(&good, HOST).exists());

        // An acknowledgement is written on the good pool even though the bad one fails.
        let ack = FenceAck {
            id: 3,
            host: HOST.into(),
            instance: INSTANCE,
            destroyed: vec![],
            wall_ms: 0,
            verified_off: vec![],
        };
        w.acknowledge(ack.clone());
        assert!(wait_for(
            Duration::from_secs(1),
            || read_record::<FenceAck>(&fence_ack_path(&good, HOST))
                .ok()
                .flatten()
                == Some(ack.clone())
        ));
        stop_and_wait(&w);
    }

    #[test]
    fn a_hung_pool_shows_as_stuck_without_blocking_anyone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = config(
            &[
                ("hung", Path::new("/nonexistent/hung")),
                ("good", dir.path()),
            ],
            50,
            200,
        );
        let w = StorageWorker::spawn_with(&cfg, HOST, INSTANCE, Instant::now(), |pool| {
            if pool.name == "hung" {
                let mut calls = 0u32;
                Box::new(move |_job: &PoolJob| {
                    calls += 1;
                    if calls > 2 {
                        // A syscall on a dead NFS server.
                        std::thread::sleep(Duration::from_secs(2));
                    }
                    Ok(CycleResult::default())
                })
            } else {
                Box::new(real_cycle)
            }
        });
        // The first cycles succeed.
        assert!(
            wait_for(Duration::from_secs(1), || w.view().pools[0].ok),
            "{:?}",
            w.view()
        );
        // Then the third hangs: down once it runs past the deadline.
        assert!(
            wait_for(Duration::from_secs(1), || w.view().pools[0]
                .detail
                .contains("stuck")),
            "{:?}",
            w.view()
        );
        let t = Instant::now();
        let v = w.view();
        assert!(t.elapsed() < Duration::from_millis(50), "view() blocked");
        assert!(!v.pools[0].ok, "{v:?}");
        assert!(v.pools[0].detail.contains("deadline 200 ms"), "{v:?}");
        // The other pool carries on.
        assert!(v.pools[1].ok, "{v:?}");
        // acknowledge() and stop() do not wait for the hung thread either.
        let t = Instant::now();
        w.acknowledge(FenceAck {
            id: 1,
            host: HOST.into(),
            instance: INSTANCE,
            destroyed: vec![],
            wall_ms: 0,
            verified_off: vec![],
        });
        w.stop();
        assert!(t.elapsed() < Duration::from_millis(50));
        // The good pool's thread exits; the hung one is left behind.
        assert!(wait_for(Duration::from_secs(1), || w.threads_alive() == 1));
    }

    #[test]
    fn slow_cycles_and_staleness_count_as_failures() {
        let interval = Duration::from_millis(50);
        let deadline = Duration::from_millis(300);
        let t0 = Instant::now();
        let mut st = PoolState::default();
        assert_eq!(
            judge(&st, t0, interval, deadline),
            (false, "not checked yet".to_string())
        );
        st.last = Some(Ok(()));
        st.last_ok_at = Some(t0);
        assert!(judge(&st, t0 + Duration::from_millis(100), interval, deadline).0);
        let (ok, why) = judge(&st, t0 + Duration::from_millis(400), interval, deadline);
        assert!(!ok);
        assert!(why.contains("no I/O cycle completed"), "{why}");

        // A cycle that completes late is a failure.
        let cfg = config(&[("slow", Path::new("/nonexistent/slow"))], 50, 100);
        let w = StorageWorker::spawn_with(&cfg, HOST, INSTANCE, Instant::now(), |_| {
            Box::new(|_job: &PoolJob| {
                std::thread::sleep(Duration::from_millis(150));
                Ok(CycleResult::default())
            })
        });
        assert!(
            wait_for(Duration::from_secs(2), || w.view().pools[0]
                .detail
                .starts_with("I/O took")),
            "{:?}",
            w.view()
        );
        assert!(!w.view().pools[0].ok);
        stop_and_wait(&w);
    }

    #[test]
    fn oversized_acknowledgements_are_cut_to_fit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = config(&[("p1", dir.path())], 50, REAL_IO_DEADLINE_MS);
        let w = StorageWorker::spawn(&cfg, HOST, INSTANCE, Instant::now());
        let ack = FenceAck {
            id: 5,
            host: HOST.into(),
            instance: INSTANCE,
            destroyed: (0..500)
                .map(|i| format!("00000000-0000-0000-0000-{i:012}"))
                .collect(),
            wall_ms: 0,
            verified_off: vec![],
        };
        w.acknowledge(ack);
        let path = fence_ack_path(dir.path(), HOST);
        assert!(wait_for(Duration::from_secs(2), || {
            read_record::<FenceAck>(&path)
                .ok()
                .flatten()
                .is_some_and(|a| a.id == 5 && !a.destroyed.is_empty())
        }));
        assert!(pool_view(&w, "p1").ok);
        stop_and_wait(&w);
    }
}
