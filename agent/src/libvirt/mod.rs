//! The agent's libvirt backend.
//!
//! [`Hypervisor`] is a cheap, cloneable handle. Every libvirt call runs on one dedicated OS
//! thread (`vigil-libvirt`) that owns the `virt::connect::Connect`; async callers send it a
//! request and wait for the answer at most the handle's deadline. A hung libvirtd therefore never
//! stalls a caller beyond the deadline:
//! - a call that gets no answer in time returns [`HvError::Timeout`] and marks the hypervisor
//!   unhealthy;
//! - while the worker has been stuck on one call for longer than the deadline, new calls fail at
//!   once with [`HvError::Timeout`] instead of queueing behind it;
//! - requests whose caller has given up are skipped by the worker when it gets to them, so a
//!   late-unstuck worker does not replay stale orders.
//!
//! A timeout means the outcome is unknown: the worker may still carry the call out later (for
//! instance a `start` that libvirt was already processing). Reconcile with [`Hypervisor::get`].
//!
//! The worker connects as soon as the handle is opened, re-checks the connection (a local
//! `virConnectIsAlive`, no RPC) before every call and twice a second when idle, and reconnects
//! after a connection error, so a libvirtd restart is survived; lifecycle events are registered
//! again on every new connection ([`Hypervisor::connects`] counts connections: events between
//! the old and the new one are lost, so resynchronise with [`Hypervisor::list`] when it moves).

pub mod events;
pub mod xml;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::{mpsc, oneshot};
use vigil_common::domain::{
    DomainEvent, DomainInfo, DomainState, HypervisorHealth, StateReason, VigilMeta, METADATA_NS,
    METADATA_PREFIX,
};
use virt::connect::Connect;
use virt::domain::Domain;
use virt::error::{ErrorDomain, ErrorNumber};
use virt::sys;

/// Capacity of the lifecycle-event channel; when the receiver falls this far behind, further
/// events are dropped (counted by [`Hypervisor::events_dropped`]).
pub const EVENT_CHANNEL_CAPACITY: usize = 1024;
/// Requests that may wait for the worker at once; beyond that calls fail with `Unavailable`.
const QUEUE_CAPACITY: usize = 256;
/// How often an idle worker checks its connection (and retries connecting).
const IDLE_TICK: Duration = Duration::from_millis(500);
/// Longest pause between background reconnection attempts.
const RECONNECT_BACKOFF_MAX: Duration = Duration::from_secs(5);
/// libvirt keepalive for remote connections: a peer that stops answering is dropped after about
/// interval * (count + 1) seconds, which also unblocks a worker stuck on a hung daemon.
const KEEPALIVE_INTERVAL_S: i32 = 3;
const KEEPALIVE_COUNT: u32 = 3;

/// Errors of the libvirt backend. Every variant names the operation, including the domain it was
/// about (`op` reads like `"start 4dea22b3-..."`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HvError {
    /// No answer within the deadline (`after`), or the worker has been stuck on another call for
    /// `after` (longer than the deadline). The outcome of the operation is unknown.
    #[error("libvirt {op}: no answer after {after:?}")]
    Timeout { op: String, after: Duration },
    /// libvirt answered with an error (`code` is libvirt's `virErrorNumber`).
    #[error("libvirt {op}: {message} (code {code})")]
    Libvirt {
        op: String,
        code: i32,
        message: String,
    },
    /// No domain with that UUID on this host.
    #[error("libvirt {op}: no domain {uuid}")]
    NotFound { op: String, uuid: String },
    /// libvirt cannot be reached (connection refused or lost, worker gone, queue full).
    #[error("libvirt {op}: unavailable: {reason}")]
    Unavailable { op: String, reason: String },
    /// The request itself is malformed (not a UUID, a NUL byte in the XML); libvirt not called.
    #[error("libvirt {op}: invalid request: {reason}")]
    Invalid { op: String, reason: String },
}

impl HvError {
    /// The operation (and domain) the error is about.
    pub fn op(&self) -> &str {
        match self {
            HvError::Timeout { op, .. }
            | HvError::Libvirt { op, .. }
            | HvError::NotFound { op, .. }
            | HvError::Unavailable { op, .. }
            | HvError::Invalid { op, .. } => op,
        }
    }

    /// libvirt's error code, for `Libvirt` errors.
    pub fn libvirt_code(&self) -> Option<i32> {
        match self {
            HvError::Libvirt { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// Handle on one libvirt connection's worker. Clones share the worker; the worker stops (and
/// closes its connection) when the last clone is dropped.
#[derive(Clone)]
pub struct Hypervisor {
    shared: Arc<Shared>,
    tx: std_mpsc::SyncSender<Job>,
}

impl std::fmt::Debug for Hypervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hypervisor")
            .field("uri", &self.shared.uri)
            .field("deadline", &self.shared.deadline)
            .finish_non_exhaustive()
    }
}

type Job = Box<dyn FnOnce(&mut Worker) + Send>;

struct Shared {
    uri: String,
    deadline: Duration,
    /// What the worker is doing and since when (`None` while idle).
    busy: Mutex<Option<(Instant, String)>>,
    health: Mutex<HypervisorHealth>,
    events_rx: Mutex<Option<mpsc::Receiver<DomainEvent>>>,
    events_dropped: Arc<AtomicU64>,
    connects: AtomicU64,
    /// Storage pools (name, mount path on this host), to tell which pools a domain's disks
    /// are on.
    pools: Mutex<Vec<(String, std::path::PathBuf)>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Shared {
    fn mark_healthy(&self) {
        *lock(&self.health) = HypervisorHealth::Healthy;
    }

    /// Unhealthy with this reason; `since_ms` keeps the start of the current unhealthy spell.
    fn mark_unhealthy(&self, reason: String) {
        let mut h = lock(&self.health);
        let since_ms = match &*h {
            HypervisorHealth::Unhealthy { since_ms, .. } => *since_ms,
            _ => now_ms(),
        };
        *h = HypervisorHealth::Unhealthy { reason, since_ms };
    }

    fn set_busy(&self, op: &str) {
        *lock(&self.busy) = Some((Instant::now(), op.to_string()));
    }

    fn clear_busy(&self) {
        *lock(&self.busy) = None;
    }

    /// How long the worker has been on its current call, and which.
    fn busy_for(&self) -> Option<(Duration, String)> {
        lock(&self.busy)
            .as_ref()
            .map(|(since, op)| (since.elapsed(), op.clone()))
    }
}

/// What a worker-side operation can fail with.
enum OpErr {
    Lv(virt::error::Error),
    Hv(HvError),
}

impl From<virt::error::Error> for OpErr {
    fn from(e: virt::error::Error) -> Self {
        OpErr::Lv(e)
    }
}

impl Hypervisor {
    /// Starts the worker for `uri` (e.g. `qemu:///system`, `test:///default`) and returns at
    /// once; the worker connects in the background. Every call gets at most `deadline`; choose
    /// it above the slowest normal operation (a QEMU domain start took ~4.5 s in the lab).
    ///
    /// Registers libvirt's default event loop first if this process has not yet done so.
    pub fn open(uri: &str, deadline: Duration) -> Hypervisor {
        if let Err(e) = events::ensure_event_loop() {
            tracing::error!(error = %e, "libvirt event loop unavailable: no lifecycle events");
        }
        let (ev_tx, ev_rx) = mpsc::channel(EVENT_CHANNEL_CAPACITY);
        let (tx, rx) = std_mpsc::sync_channel::<Job>(QUEUE_CAPACITY);
        let shared = Arc::new(Shared {
            uri: uri.to_string(),
            deadline,
            busy: Mutex::new(None),
            health: Mutex::new(HypervisorHealth::Unhealthy {
                reason: format!("not yet connected to {uri}"),
                since_ms: now_ms(),
            }),
            events_rx: Mutex::new(Some(ev_rx)),
            events_dropped: Arc::new(AtomicU64::new(0)),
            connects: AtomicU64::new(0),
            pools: Mutex::new(Vec::new()),
        });
        let worker = Worker {
            shared: shared.clone(),
            conn: None,
            events_tx: ev_tx,
            next_attempt: Instant::now(),
            backoff: IDLE_TICK,
        };
        let spawned = std::thread::Builder::new()
            .name("vigil-libvirt".into())
            .spawn(move || worker.run_loop(rx));
        if let Err(e) = spawned {
            // `rx` is gone with the closure: every call will report the worker as unavailable.
            shared.mark_unhealthy(format!("cannot start the libvirt worker thread: {e}"));
            tracing::error!(error = %e, "cannot start the libvirt worker thread");
        }
        Hypervisor { shared, tx }
    }

    /// The primary storage pools this host mounts (name, mount path): every listed domain
    /// then says which of them its disks are on ([`DomainInfo::pools`]).
    pub fn set_pools(&self, pools: Vec<(String, std::path::PathBuf)>) {
        *lock(&self.shared.pools) = pools;
    }

    /// The URI this handle connects to.
    pub fn uri(&self) -> &str {
        &self.shared.uri
    }

    /// The per-call deadline.
    pub fn deadline(&self) -> Duration {
        self.shared.deadline
    }

    /// Healthy after a call that libvirt answered (an error about a domain, like "no such
    /// domain", still counts as an answer); unhealthy after a timeout, a failure to connect or a
    /// lost connection, until the next answered call. Unhealthy until the first connection.
    pub fn health(&self) -> HypervisorHealth {
        lock(&self.shared.health).clone()
    }

    /// The lifecycle-event receiver; `Some` only on the first call (across all clones).
    pub fn events(&self) -> Option<mpsc::Receiver<DomainEvent>> {
        lock(&self.shared.events_rx).take()
    }

    /// Events dropped because the receiver was full.
    pub fn events_dropped(&self) -> u64 {
        self.shared.events_dropped.load(Ordering::Relaxed)
    }

    /// Successful connections so far (1 after the first, +1 per reconnection). Events are lost
    /// between connections: resynchronise with [`Hypervisor::list`] when this changes.
    pub fn connects(&self) -> u64 {
        self.shared.connects.load(Ordering::Relaxed)
    }

    /// All domains, active and inactive. A domain that disappears while being listed is left out.
    pub async fn list(&self) -> Result<Vec<DomainInfo>, HvError> {
        let pools = lock(&self.shared.pools).clone();
        self.call("list domains".into(), None, true, move |conn| {
            let mut out = Vec::new();
            for dom in conn.list_all_domains(0)? {
                match domain_info(&dom, &pools) {
                    Ok(info) => out.push(info),
                    Err(OpErr::Lv(e)) if is_no_domain(&e) => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(out)
        })
        .await
    }

    /// One domain, `None` if this host has no domain with that UUID.
    pub async fn get(&self, uuid: &str) -> Result<Option<DomainInfo>, HvError> {
        let (op, uuid) = checked("get", uuid)?;
        let pools = lock(&self.shared.pools).clone();
        self.call(op, None, true, move |conn| {
            let found = Domain::lookup_by_uuid_string(conn, &uuid)
                .map_err(OpErr::Lv)
                .and_then(|dom| domain_info(&dom, &pools));
            match found {
                Ok(info) => Ok(Some(info)),
                Err(OpErr::Lv(e)) if is_no_domain(&e) => Ok(None),
                Err(e) => Err(e),
            }
        })
        .await
    }

    /// Starts a defined domain (`virDomainCreate`). Starting a running domain is a `Libvirt`
    /// error (code `VIR_ERR_OPERATION_INVALID` from the QEMU driver). Not retried after a lost connection: on
    /// `Timeout`/`Unavailable` the domain may or may not have started.
    pub async fn start(&self, uuid: &str) -> Result<(), HvError> {
        let (op, uuid) = checked("start", uuid)?;
        self.call(op, Some(uuid.clone()), false, move |conn| {
            let dom = Domain::lookup_by_uuid_string(conn, &uuid)?;
            dom.create()?;
            Ok(())
        })
        .await
    }

    /// [`Hypervisor::start`], unless `refuse` is set when the worker gets to it: a start
    /// queued behind other calls (or behind a hung one) is checked on the worker thread right
    /// before `virDomainCreate`, so once the flag is set no later start reaches libvirt, and
    /// a listing queued after setting it sees every start that did.
    pub async fn start_unless(
        &self,
        uuid: &str,
        refuse: Arc<std::sync::atomic::AtomicBool>,
    ) -> Result<(), HvError> {
        let (op, uuid) = checked("start", uuid)?;
        let op_refused = op.clone();
        self.call(op, Some(uuid.clone()), false, move |conn| {
            if refuse.load(Ordering::SeqCst) {
                return Err(OpErr::Hv(HvError::Invalid {
                    op: op_refused.clone(),
                    reason: "refused: this host is fencing itself".into(),
                }));
            }
            let dom = Domain::lookup_by_uuid_string(conn, &uuid)?;
            dom.create()?;
            Ok(())
        })
        .await
    }

    /// Hard power-off (`virDomainDestroy`). Ok if the domain is already shut off; `NotFound` if
    /// there is no such domain (a destroyed transient domain disappears).
    pub async fn destroy(&self, uuid: &str) -> Result<(), HvError> {
        let (op, uuid) = checked("destroy", uuid)?;
        self.call(op, Some(uuid.clone()), true, move |conn| {
            let dom = Domain::lookup_by_uuid_string(conn, &uuid)?;
            if !dom.is_active()? {
                return Ok(());
            }
            match dom.destroy() {
                Ok(()) => Ok(()),
                // Gone, or stopped between the check and the call: it is not running.
                Err(e) if is_no_domain(&e) => Ok(()),
                Err(e) if dom.is_active().ok() == Some(false) => {
                    tracing::debug!(error = %e, "destroy raced with the domain stopping");
                    Ok(())
                }
                Err(e) => Err(e.into()),
            }
        })
        .await
    }

    /// Defines (or redefines) a persistent domain from XML; returns its UUID.
    pub async fn define(&self, xml: String) -> Result<String, HvError> {
        let op = "define domain".to_string();
        if xml.contains('\0') {
            return Err(HvError::Invalid {
                op,
                reason: "XML contains a NUL byte".into(),
            });
        }
        self.call(op, None, true, move |conn| {
            let dom = Domain::define_xml(conn, &xml)?;
            Ok(dom.get_uuid_string()?.to_ascii_lowercase())
        })
        .await
    }

    /// The domain's inactive (persistent) XML, as shipped to other hosts. Without
    /// `VIR_DOMAIN_XML_SECURE`: secrets such as graphics passwords are not included.
    pub async fn inactive_xml(&self, uuid: &str) -> Result<String, HvError> {
        let (op, uuid) = checked("inactive_xml", uuid)?;
        self.call(op, Some(uuid.clone()), true, move |conn| {
            let dom = Domain::lookup_by_uuid_string(conn, &uuid)?;
            Ok(dom.get_xml_desc(sys::VIR_DOMAIN_XML_INACTIVE)?)
        })
        .await
    }

    /// Records the activation generation in Vigil's metadata element, keeping `ha`/`priority`.
    /// Written to the persistent config and, when the domain runs, to the live definition.
    pub async fn set_generation(&self, uuid: &str, generation: u64) -> Result<(), HvError> {
        let (op, uuid) = checked("set_generation", uuid)?;
        self.update_meta(op, uuid, move |m| m.generation = Some(generation))
            .await
    }

    /// Sets `ha` and `priority` in Vigil's metadata element to exactly these values (`None`
    /// removes the attribute), keeping `generation`. Same storage as [`Self::set_generation`].
    pub async fn set_ha_meta(
        &self,
        uuid: &str,
        ha: Option<bool>,
        priority: Option<i32>,
    ) -> Result<(), HvError> {
        let (op, uuid) = checked("set_ha_meta", uuid)?;
        self.update_meta(op, uuid, move |m| {
            m.ha = ha;
            m.priority = priority;
        })
        .await
    }

    async fn update_meta(
        &self,
        op: String,
        uuid: String,
        change: impl Fn(&mut VigilMeta) + Send + 'static,
    ) -> Result<(), HvError> {
        self.call(op, Some(uuid.clone()), true, move |conn| {
            let dom = Domain::lookup_by_uuid_string(conn, &uuid)?;
            let persistent = dom.is_persistent()?;
            let active = dom.is_active()?;
            // The persistent config holds the operator's intent; a transient domain has only
            // its live definition.
            let flags = if persistent {
                sys::VIR_DOMAIN_XML_INACTIVE
            } else {
                0
            };
            let mut meta = parse_xml(&dom.get_xml_desc(flags)?, &uuid)?.meta;
            change(&mut meta);
            let element = xml::meta_element(&meta);
            let mut impact = 0;
            if persistent {
                impact |= sys::VIR_DOMAIN_AFFECT_CONFIG;
            }
            if active {
                impact |= sys::VIR_DOMAIN_AFFECT_LIVE;
            }
            dom.set_metadata(
                sys::VIR_DOMAIN_METADATA_ELEMENT as i32,
                element.as_deref(),
                Some(METADATA_PREFIX),
                Some(METADATA_NS),
                impact,
            )?;
            Ok(())
        })
        .await
    }

    /// Test hook: occupies the worker for `d` (a stand-in for a hung libvirtd).
    #[cfg(test)]
    async fn stall_for_test(&self, d: Duration) -> Result<(), HvError> {
        self.call("test stall".into(), None, false, move |_| {
            std::thread::sleep(d);
            Ok(())
        })
        .await
    }

    /// Runs `f` on the worker with the handle's deadline. `retry`: whether `f` may run a second
    /// time on a fresh connection after a connection error (idempotent operations only).
    async fn call<T, F>(
        &self,
        op: String,
        uuid: Option<String>,
        retry: bool,
        f: F,
    ) -> Result<T, HvError>
    where
        T: Send + 'static,
        F: FnMut(&Connect) -> Result<T, OpErr> + Send + 'static,
    {
        let deadline = self.shared.deadline;
        if let Some((stuck, on)) = self.shared.busy_for() {
            if stuck >= deadline {
                self.shared.mark_unhealthy(format!(
                    "libvirt worker stuck on {on} for {stuck:?} (deadline {deadline:?})"
                ));
                return Err(HvError::Timeout { op, after: stuck });
            }
        }
        let (reply_tx, reply_rx) = oneshot::channel();
        let expires = Instant::now() + deadline;
        let job_op = op.clone();
        let job: Job = Box::new(move |w: &mut Worker| {
            if reply_tx.is_closed() {
                return; // The caller gave up: do not act on a stale order.
            }
            if Instant::now() >= expires {
                let _ = reply_tx.send(Err(HvError::Timeout {
                    op: job_op,
                    after: deadline,
                }));
                return;
            }
            let r = w.run(&job_op, uuid.as_deref(), retry, expires, f);
            let _ = reply_tx.send(r);
        });
        match self.tx.try_send(job) {
            Ok(()) => {}
            Err(std_mpsc::TrySendError::Full(_)) => {
                let reason = "too many requests waiting for the libvirt worker".to_string();
                self.shared.mark_unhealthy(reason.clone());
                return Err(HvError::Unavailable { op, reason });
            }
            Err(std_mpsc::TrySendError::Disconnected(_)) => {
                let reason = "the libvirt worker thread has exited".to_string();
                self.shared.mark_unhealthy(reason.clone());
                return Err(HvError::Unavailable { op, reason });
            }
        }
        match tokio::time::timeout(deadline, reply_rx).await {
            Ok(Ok(r)) => {
                if let Err(HvError::Timeout { op, after }) = &r {
                    self.shared
                        .mark_unhealthy(format!("libvirt {op}: no answer after {after:?}"));
                }
                r
            }
            Ok(Err(_)) => {
                let reason = "the libvirt worker dropped the request (it panicked)".to_string();
                self.shared.mark_unhealthy(reason.clone());
                Err(HvError::Unavailable { op, reason })
            }
            Err(_) => {
                self.shared
                    .mark_unhealthy(format!("libvirt {op}: no answer after {deadline:?}"));
                Err(HvError::Timeout {
                    op,
                    after: deadline,
                })
            }
        }
    }
}

/// Validates and normalises a UUID argument; returns the op label naming it.
fn checked(verb: &str, uuid: &str) -> Result<(String, String), HvError> {
    let norm = uuid.trim().to_ascii_lowercase();
    let ok = norm.len() == 36
        && norm.char_indices().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-',
            _ => c.is_ascii_hexdigit(),
        });
    let op = format!("{verb} {}", if ok { norm.as_str() } else { uuid });
    if !ok {
        return Err(HvError::Invalid {
            op,
            reason: format!("{uuid:?} is not a hyphenated UUID"),
        });
    }
    Ok((op, norm))
}

fn is_no_domain(e: &virt::error::Error) -> bool {
    e.code() == ErrorNumber::NoDomain
}

/// Whether an error means the connection itself is broken (as opposed to an answer about a
/// domain).
fn is_connection_error(e: &virt::error::Error) -> bool {
    matches!(e.domain(), ErrorDomain::Rpc | ErrorDomain::Remote)
        || matches!(
            e.code(),
            ErrorNumber::NoConnect
                | ErrorNumber::InvalidConn
                | ErrorNumber::SystemError
                | ErrorNumber::Rpc
                | ErrorNumber::AuthFailed
        )
}

fn parse_xml(text: &str, uuid: &str) -> Result<xml::ParsedDomain, OpErr> {
    xml::parse_domain(text).map_err(|e| {
        OpErr::Hv(HvError::Libvirt {
            op: format!("parse XML of {uuid}"),
            code: sys::VIR_ERR_XML_ERROR as i32,
            message: e.to_string(),
        })
    })
}

fn domain_info(dom: &Domain, pools: &[(String, std::path::PathBuf)]) -> Result<DomainInfo, OpErr> {
    let uuid = dom.get_uuid_string()?.to_ascii_lowercase();
    let name = dom.get_name()?;
    let (state, reason) = dom.get_state()?;
    let info = dom.get_info()?;
    let persistent = dom.is_persistent()?;
    // Disks from the live definition (hot-plugged disks count); Vigil's metadata from the
    // persistent config when there is one, as `update_meta` reads and writes it (an operator's
    // `virsh edit` changes only the config).
    let mut parsed = parse_xml(&dom.get_xml_desc(0)?, &uuid)?;
    if persistent && dom.is_active()? {
        parsed.meta = parse_xml(&dom.get_xml_desc(sys::VIR_DOMAIN_XML_INACTIVE)?, &uuid)?.meta;
    }
    let state_mapped = events::map_state(state);
    let mut reason_mapped = events::map_reason(state, reason);
    // SHUTOFF_UNKNOWN is also what libvirt reports for a domain that ran before libvirtd
    // restarted; a recorded Vigil generation proves it was started at least once.
    if state_mapped == DomainState::Shutoff
        && reason_mapped == StateReason::NeverStarted
        && parsed.meta.generation.is_some()
    {
        reason_mapped = StateReason::Other;
    }
    Ok(DomainInfo {
        uuid,
        name,
        state: state_mapped,
        reason: reason_mapped,
        vcpus: info.nr_virt_cpu,
        memory_kib: info.max_mem,
        pools: xml::pools_of_disks(&parsed.disks, pools),
        disks: parsed.disks,
        meta: parsed.meta,
        persistent,
    })
}

struct Conn {
    connect: Connect,
    /// `None` when the driver refused the event registration (calls still work).
    _events: Option<events::Registration>,
}

struct Worker {
    shared: Arc<Shared>,
    conn: Option<Conn>,
    events_tx: mpsc::Sender<DomainEvent>,
    /// Earliest next background connection attempt.
    next_attempt: Instant,
    backoff: Duration,
}

impl Worker {
    fn run_loop(mut self, rx: std_mpsc::Receiver<Job>) {
        self.maintain();
        let mut last_maintain = Instant::now();
        loop {
            match rx.recv_timeout(IDLE_TICK) {
                Ok(job) => {
                    if catch_unwind(AssertUnwindSafe(|| job(&mut self))).is_err() {
                        self.shared.clear_busy();
                        tracing::error!("a libvirt request panicked on the worker thread");
                    }
                }
                Err(std_mpsc::RecvTimeoutError::Timeout) => {}
                Err(std_mpsc::RecvTimeoutError::Disconnected) => break,
            }
            if last_maintain.elapsed() >= IDLE_TICK {
                self.maintain();
                last_maintain = Instant::now();
            }
        }
        self.disconnect("the last handle was dropped");
    }

    /// Background upkeep: notice a dead connection and (re)connect, with backoff.
    fn maintain(&mut self) {
        if let Some(c) = &self.conn {
            if c.connect.is_alive().unwrap_or(false) {
                return;
            }
            self.disconnect("the connection is no longer alive");
            self.next_attempt = Instant::now();
        }
        if Instant::now() < self.next_attempt {
            return;
        }
        self.shared.set_busy("connect");
        let r = self.connect();
        self.shared.clear_busy();
        match r {
            Ok(()) => {
                self.backoff = IDLE_TICK;
                self.shared.mark_healthy();
            }
            Err(reason) => {
                self.shared.mark_unhealthy(reason);
                self.next_attempt = Instant::now() + self.backoff;
                self.backoff = (self.backoff * 2).min(RECONNECT_BACKOFF_MAX);
            }
        }
    }

    fn connect(&mut self) -> Result<(), String> {
        let uri = self.shared.uri.clone();
        if uri.contains('\0') {
            return Err(format!(
                "cannot connect to {uri:?}: URI contains a NUL byte"
            ));
        }
        let connect =
            Connect::open(Some(&uri)).map_err(|e| format!("cannot connect to {uri}: {e}"))?;
        // Remote connections only; local drivers say "not supported", which is fine.
        let _ = connect.set_keep_alive(KEEPALIVE_INTERVAL_S, KEEPALIVE_COUNT);
        let sink =
            events::EventSink::new(self.events_tx.clone(), self.shared.events_dropped.clone());
        let registration = match events::register(&connect, sink) {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::warn!(%uri, error = %e, "no lifecycle events from libvirt (polling only)");
                None
            }
        };
        let n = self.shared.connects.fetch_add(1, Ordering::Relaxed) + 1;
        tracing::info!(%uri, connection = n, events = registration.is_some(), "connected to libvirt");
        self.conn = Some(Conn {
            connect,
            _events: registration,
        });
        Ok(())
    }

    fn disconnect(&mut self, why: &str) {
        if let Some(Conn {
            mut connect,
            _events,
        }) = self.conn.take()
        {
            tracing::info!(uri = %self.shared.uri, why, "dropping the libvirt connection");
            // Deregister first: the registration holds its own reference to the connection.
            drop(_events);
            if let Err(e) = connect.close() {
                tracing::debug!(error = %e, "closing the libvirt connection failed");
            }
        }
    }

    /// Runs one request: connects if needed, runs `f`, maps errors, keeps health up to date.
    fn run<T>(
        &mut self,
        op: &str,
        uuid: Option<&str>,
        retry: bool,
        expires: Instant,
        mut f: impl FnMut(&Connect) -> Result<T, OpErr>,
    ) -> Result<T, HvError> {
        self.shared.set_busy(op);
        let mut attempts_left: u32 = if retry { 2 } else { 1 };
        let result = loop {
            attempts_left = attempts_left.saturating_sub(1);
            if let Some(c) = &self.conn {
                if !c.connect.is_alive().unwrap_or(false) {
                    self.disconnect("the connection is no longer alive");
                }
            }
            if self.conn.is_none() {
                if let Err(reason) = self.connect() {
                    self.shared.mark_unhealthy(reason.clone());
                    break Err(HvError::Unavailable {
                        op: op.to_string(),
                        reason,
                    });
                }
            }
            let Some(conn) = &self.conn else {
                break Err(HvError::Unavailable {
                    op: op.to_string(),
                    reason: "not connected".into(),
                });
            };
            match f(&conn.connect) {
                Ok(v) => {
                    self.shared.mark_healthy();
                    break Ok(v);
                }
                Err(OpErr::Hv(e)) => {
                    self.shared.mark_healthy();
                    break Err(e);
                }
                Err(OpErr::Lv(e)) => {
                    let alive = conn.connect.is_alive().unwrap_or(false);
                    if is_connection_error(&e) || !alive {
                        let reason = format!("connection to {} failed: {e}", self.shared.uri);
                        self.disconnect(&reason);
                        self.shared.mark_unhealthy(reason.clone());
                        if attempts_left > 0 && Instant::now() < expires {
                            tracing::info!(op, error = %e, "libvirt connection lost; reconnecting and retrying once");
                            continue;
                        }
                        break Err(HvError::Unavailable {
                            op: op.to_string(),
                            reason,
                        });
                    }
                    self.shared.mark_healthy();
                    break Err(match uuid {
                        Some(u) if is_no_domain(&e) => HvError::NotFound {
                            op: op.to_string(),
                            uuid: u.to_string(),
                        },
                        _ => HvError::Libvirt {
                            op: op.to_string(),
                            code: e.code().to_raw() as i32,
                            message: e.message().to_string(),
                        },
                    });
                }
            }
        };
        self.shared.clear_busy();
        result
    }
}

#[cfg(test)]
mod tests;
