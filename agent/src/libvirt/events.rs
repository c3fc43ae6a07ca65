//! libvirt domain lifecycle events, and the mapping of libvirt's codes into Vigil's vocabulary.
//!
//! The safe `virt` crate (0.4.3) has no wrapper for domain events, so this module calls the raw
//! `virConnectDomainEventRegisterAny` through `virt::sys`. It is the only place in the workspace
//! with `unsafe` code; every block states the invariant it relies on.
//!
//! How events flow:
//! - [`ensure_event_loop`] registers libvirt's default event loop implementation (once per
//!   process, before any connection is opened: libvirt only wires a connection to the event loop
//!   that was registered when it was opened) and runs it on the thread `vigil-libvirt-events`.
//! - [`register`] (called by the backend's worker on every (re)connect) hands libvirt a boxed
//!   [`EventSink`]; libvirt calls [`lifecycle_cb`] on the event-loop thread, which classifies
//!   the event and `try_send`s a [`DomainEvent`] into a tokio channel. It never blocks: when the
//!   channel is full the event is counted as dropped and logged.
//! - Dropping the [`Registration`] deregisters the callback; libvirt then frees the sink through
//!   the `freecb` we gave it.
#![allow(unsafe_code)]

use std::ffi::{c_char, c_int, c_void, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::mpsc;
use vigil_common::domain::{DomainEvent, DomainState, LifecycleKind, StateReason};
use virt::connect::Connect;
use virt::sys;

/// Registers libvirt's default event loop and starts the thread that runs it; later calls only
/// return the outcome of the first. Must run before the process opens any libvirt connection
/// ([`super::Hypervisor::open`] calls it first). Also silences libvirt's default error printer
/// (errors reach the caller as values and are logged there).
pub fn ensure_event_loop() -> Result<(), String> {
    static INIT: OnceLock<Result<(), String>> = OnceLock::new();
    INIT.get_or_init(|| {
        virt::error::clear_error_callback();
        virt::event::event_register_default_impl()
            .map_err(|e| format!("cannot register libvirt's default event loop: {e}"))?;
        std::thread::Builder::new()
            .name("vigil-libvirt-events".into())
            .spawn(|| loop {
                if let Err(e) = virt::event::event_run_default_impl() {
                    tracing::warn!(error = %e, "libvirt event loop iteration failed");
                    std::thread::sleep(Duration::from_millis(100));
                }
            })
            .map(|_| ())
            .map_err(|e| format!("cannot start the libvirt event thread: {e}"))
    })
    .clone()
}

/// Where the callback puts events. Owned by libvirt between [`register`] and its `freecb`.
pub(crate) struct EventSink {
    tx: mpsc::Sender<DomainEvent>,
    dropped: Arc<AtomicU64>,
}

impl EventSink {
    pub(crate) fn new(tx: mpsc::Sender<DomainEvent>, dropped: Arc<AtomicU64>) -> Self {
        EventSink { tx, dropped }
    }

    fn deliver(&self, ev: DomainEvent) {
        match self.tx.try_send(ev) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(ev)) => {
                let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                // Rate-limited: a receiver that is never taken fills up and stays full.
                if n == 1 || n % 1000 == 0 {
                    tracing::warn!(uuid = %ev.uuid, kind = ?ev.kind, dropped = n, "domain event channel full; events dropped");
                }
            }
            // Nobody listens (the receiver was never taken or was dropped): nothing to do.
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }
}

/// A live lifecycle-callback registration on one connection. Dropping it deregisters.
pub(crate) struct Registration {
    /// Our own reference to the connection (taken with `virConnectRef` by `Clone`), so the
    /// pointer stays valid for the deregistration even if the owner closes its reference first.
    conn: Connect,
    id: c_int,
}

/// Registers [`lifecycle_cb`] for every domain on `conn`, delivering into `sink`.
pub(crate) fn register(
    conn: &Connect,
    sink: EventSink,
) -> Result<Registration, virt::error::Error> {
    let opaque = Box::into_raw(Box::new(sink)).cast::<c_void>();
    type LifecycleFn = unsafe extern "C" fn(
        sys::virConnectPtr,
        sys::virDomainPtr,
        c_int,
        c_int,
        *mut c_void,
    ) -> c_int;
    type GenericFn = unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, *mut c_void);
    let lifecycle: LifecycleFn = lifecycle_cb;
    // SAFETY: this is C's VIR_DOMAIN_EVENT_CALLBACK() cast. Both are `extern "C"` function
    // pointers of the same size; libvirt stores the pointer as the generic type and, for
    // VIR_DOMAIN_EVENT_ID_LIFECYCLE, casts it back to virConnectDomainEventCallback (the exact
    // signature of `lifecycle_cb`) before calling it. It is never called through `GenericFn`.
    let generic: GenericFn = unsafe { std::mem::transmute::<LifecycleFn, GenericFn>(lifecycle) };
    // SAFETY: `conn.as_ptr()` is a valid, open connection borrowed for the duration of the call.
    // `opaque` is a leaked Box<EventSink>; on success libvirt owns it until it calls `free_sink`
    // (on deregistration, or when the connection's event state is disposed), and libvirt never
    // runs `free_sink` while a callback with this opaque is being dispatched (callbacks removed
    // during dispatch are only marked and purged afterwards). A null domain means "all domains".
    let id = unsafe {
        sys::virConnectDomainEventRegisterAny(
            conn.as_ptr(),
            std::ptr::null_mut(),
            sys::VIR_DOMAIN_EVENT_ID_LIFECYCLE as c_int,
            Some(generic),
            opaque,
            Some(free_sink),
        )
    };
    if id < 0 {
        let err = virt::error::Error::last_error();
        // SAFETY: registration failed, and libvirt's failed-registration paths deliberately do
        // not call `freecb` (virObjectEventStateDeregisterID(.., doFreeCb = false)), so the box
        // is still ours and nobody else holds the pointer: reclaim it exactly once.
        drop(unsafe { Box::from_raw(opaque.cast::<EventSink>()) });
        return Err(err);
    }
    Ok(Registration {
        conn: conn.clone(),
        id,
    })
}

impl Drop for Registration {
    fn drop(&mut self) {
        // SAFETY: `self.conn` holds its own reference, so the pointer is valid; `self.id` came from
        // a successful registration on this connection and is deregistered only here, once.
        // libvirt removes the callback locally before any RPC, so even when the RPC fails (a dead
        // connection) the sink is released through `free_sink`; we never free it ourselves.
        let rc = unsafe { sys::virConnectDomainEventDeregisterAny(self.conn.as_ptr(), self.id) };
        if rc < 0 {
            let e = virt::error::Error::last_error();
            tracing::debug!(error = %e, id = self.id, "libvirt event deregistration failed");
        }
        if let Err(e) = self.conn.close() {
            tracing::debug!(error = %e, "closing the event registration's connection reference failed");
        }
    }
}

/// `virFreeCallback` for the sink.
unsafe extern "C" fn free_sink(opaque: *mut c_void) {
    let _ = catch_unwind(AssertUnwindSafe(|| {
        if !opaque.is_null() {
            // SAFETY: `opaque` is the pointer produced by Box::into_raw in `register`; libvirt calls
            // this exactly once per successful registration and never afterwards dispatches a
            // callback with it, so we are its sole owner here.
            drop(unsafe { Box::from_raw(opaque.cast::<EventSink>()) });
        }
    }));
}

/// `virConnectDomainEventCallback`, run by libvirt on the event-loop thread.
unsafe extern "C" fn lifecycle_cb(
    _conn: sys::virConnectPtr,
    dom: sys::virDomainPtr,
    event: c_int,
    detail: c_int,
    opaque: *mut c_void,
) -> c_int {
    // No panic may cross the FFI boundary.
    let _ = catch_unwind(AssertUnwindSafe(|| {
        if opaque.is_null() {
            return;
        }
        // SAFETY: `opaque` is our Box<EventSink>, alive until `free_sink`, which libvirt never runs
        // concurrently with or before a dispatch of this callback; we only take a shared reference.
        let sink = unsafe { &*opaque.cast::<EventSink>() };
        // SAFETY: libvirt passes a domain handle valid for the duration of the callback (it owns
        // that reference: we must not free it, and do not keep it).
        let (uuid, name) = unsafe { domain_ids(dom) };
        sink.deliver(DomainEvent {
            uuid,
            name,
            kind: classify(event, detail),
            raw_event: event,
            raw_detail: detail,
            at_ms: now_ms(),
        });
    }));
    0
}

/// UUID (lower-case hyphenated) and name of a domain handle, via local accessors only (no RPC).
///
/// # Safety
/// `dom` must be null or a valid `virDomainPtr` for the duration of the call.
unsafe fn domain_ids(dom: sys::virDomainPtr) -> (String, String) {
    if dom.is_null() {
        return (String::new(), String::new());
    }
    let mut buf: [c_char; sys::VIR_UUID_STRING_BUFLEN as usize] =
        [0; sys::VIR_UUID_STRING_BUFLEN as usize];
    // SAFETY: `dom` is valid (caller's contract); `buf` has the VIR_UUID_STRING_BUFLEN bytes the
    // function writes, NUL-terminated on success.
    let uuid = if unsafe { sys::virDomainGetUUIDString(dom, buf.as_mut_ptr()) } == 0 {
        // SAFETY: on success `buf` holds a NUL-terminated string within its bounds.
        unsafe { CStr::from_ptr(buf.as_ptr()) }
            .to_string_lossy()
            .to_ascii_lowercase()
    } else {
        String::new()
    };
    // SAFETY: `dom` is valid; the returned name belongs to the domain object (not to be freed) and
    // stays valid while `dom` does: we copy it out immediately.
    let name_ptr = unsafe { sys::virDomainGetName(dom) };
    let name = if name_ptr.is_null() {
        String::new()
    } else {
        // SAFETY: non-null, NUL-terminated, valid for the duration of the callback (see above).
        unsafe { CStr::from_ptr(name_ptr) }
            .to_string_lossy()
            .into_owned()
    };
    (uuid, name)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Classifies a lifecycle event (`virDomainEventType`, detail) into what Vigil acts on.
///
/// Note: `VIR_DOMAIN_EVENT_CRASHED` (guest panic) is [`LifecycleKind::Crashed`] as well, but
/// unlike `STOPPED`+`CRASHED`/`FAILED` it does not mean qemu is gone (with `on_crash=preserve`
/// the process stays): `raw_event` tells them apart.
pub fn classify(event: c_int, detail: c_int) -> LifecycleKind {
    let (Ok(event), Ok(detail)) = (u32::try_from(event), u32::try_from(detail)) else {
        return LifecycleKind::Other;
    };
    match event {
        sys::VIR_DOMAIN_EVENT_DEFINED => LifecycleKind::Defined,
        sys::VIR_DOMAIN_EVENT_UNDEFINED => LifecycleKind::Undefined,
        sys::VIR_DOMAIN_EVENT_STARTED => LifecycleKind::Started,
        sys::VIR_DOMAIN_EVENT_SUSPENDED => match detail {
            sys::VIR_DOMAIN_EVENT_SUSPENDED_IOERROR => LifecycleKind::PausedIoError,
            _ => LifecycleKind::Paused,
        },
        sys::VIR_DOMAIN_EVENT_RESUMED => LifecycleKind::Resumed,
        sys::VIR_DOMAIN_EVENT_STOPPED => match detail {
            sys::VIR_DOMAIN_EVENT_STOPPED_SHUTDOWN => LifecycleKind::GuestShutdown,
            sys::VIR_DOMAIN_EVENT_STOPPED_DESTROYED => LifecycleKind::Destroyed,
            // `kill -9` of qemu reports STOPPED+FAILED.
            sys::VIR_DOMAIN_EVENT_STOPPED_CRASHED | sys::VIR_DOMAIN_EVENT_STOPPED_FAILED => {
                LifecycleKind::Crashed
            }
            sys::VIR_DOMAIN_EVENT_STOPPED_MIGRATED => LifecycleKind::MigratedAway,
            _ => LifecycleKind::Other,
        },
        // Guest-initiated shutdown in progress; the STOPPED+SHUTDOWN that follows is what counts.
        sys::VIR_DOMAIN_EVENT_SHUTDOWN => LifecycleKind::Other,
        sys::VIR_DOMAIN_EVENT_CRASHED => LifecycleKind::Crashed,
        _ => LifecycleKind::Other,
    }
}

/// Maps `virDomainState`.
pub fn map_state(state: sys::virDomainState) -> DomainState {
    match state {
        sys::VIR_DOMAIN_RUNNING => DomainState::Running,
        sys::VIR_DOMAIN_BLOCKED => DomainState::Blocked,
        sys::VIR_DOMAIN_PAUSED => DomainState::Paused,
        sys::VIR_DOMAIN_SHUTDOWN => DomainState::ShuttingDown,
        sys::VIR_DOMAIN_SHUTOFF => DomainState::Shutoff,
        sys::VIR_DOMAIN_CRASHED => DomainState::Crashed,
        sys::VIR_DOMAIN_PMSUSPENDED => DomainState::PmSuspended,
        _ => DomainState::NoState,
    }
}

/// Maps a state reason (`virDomainGetState`'s second value, interpreted per state).
///
/// `Crashed` is produced only for shut-off and crashed domains: `RUNNING_CRASHED` and
/// `PAUSED_CRASHED` (qemu alive, guest crashed) map to `Other`, so that no running qemu ever
/// carries the reason Vigil may treat as proof. `SHUTOFF_UNKNOWN` maps to `NeverStarted`, which
/// is best effort: libvirt also reports it for a domain that ran before libvirtd restarted (the
/// backend downgrades it to `Other` when the domain carries a Vigil generation).
pub fn map_reason(state: sys::virDomainState, reason: c_int) -> StateReason {
    let Ok(reason) = u32::try_from(reason) else {
        return StateReason::Other;
    };
    match state {
        sys::VIR_DOMAIN_RUNNING => match reason {
            sys::VIR_DOMAIN_RUNNING_BOOTED | sys::VIR_DOMAIN_RUNNING_RESTORED => {
                StateReason::Booted
            }
            _ => StateReason::Other,
        },
        sys::VIR_DOMAIN_PAUSED => match reason {
            sys::VIR_DOMAIN_PAUSED_IOERROR => StateReason::IoError,
            sys::VIR_DOMAIN_PAUSED_USER => StateReason::User,
            _ => StateReason::Other,
        },
        sys::VIR_DOMAIN_SHUTOFF => match reason {
            sys::VIR_DOMAIN_SHUTOFF_UNKNOWN => StateReason::NeverStarted,
            sys::VIR_DOMAIN_SHUTOFF_SHUTDOWN => StateReason::GuestShutdown,
            sys::VIR_DOMAIN_SHUTOFF_DESTROYED => StateReason::Destroyed,
            sys::VIR_DOMAIN_SHUTOFF_CRASHED => StateReason::Crashed,
            sys::VIR_DOMAIN_SHUTOFF_MIGRATED => StateReason::Migrated,
            sys::VIR_DOMAIN_SHUTOFF_SAVED => StateReason::Saved,
            sys::VIR_DOMAIN_SHUTOFF_FAILED => StateReason::Failed,
            _ => StateReason::Other,
        },
        sys::VIR_DOMAIN_CRASHED => StateReason::Crashed,
        _ => StateReason::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(v: u32) -> c_int {
        v as c_int
    }

    #[test]
    fn classification_table() {
        use LifecycleKind as K;
        let table: &[(u32, u32, LifecycleKind)] = &[
            (
                sys::VIR_DOMAIN_EVENT_DEFINED,
                sys::VIR_DOMAIN_EVENT_DEFINED_ADDED,
                K::Defined,
            ),
            (
                sys::VIR_DOMAIN_EVENT_DEFINED,
                sys::VIR_DOMAIN_EVENT_DEFINED_UPDATED,
                K::Defined,
            ),
            (
                sys::VIR_DOMAIN_EVENT_UNDEFINED,
                sys::VIR_DOMAIN_EVENT_UNDEFINED_REMOVED,
                K::Undefined,
            ),
            (
                sys::VIR_DOMAIN_EVENT_STARTED,
                sys::VIR_DOMAIN_EVENT_STARTED_BOOTED,
                K::Started,
            ),
            (
                sys::VIR_DOMAIN_EVENT_STARTED,
                sys::VIR_DOMAIN_EVENT_STARTED_MIGRATED,
                K::Started,
            ),
            (
                sys::VIR_DOMAIN_EVENT_STARTED,
                sys::VIR_DOMAIN_EVENT_STARTED_RESTORED,
                K::Started,
            ),
            (
                sys::VIR_DOMAIN_EVENT_SUSPENDED,
                sys::VIR_DOMAIN_EVENT_SUSPENDED_PAUSED,
                K::Paused,
            ),
            (
                sys::VIR_DOMAIN_EVENT_SUSPENDED,
                sys::VIR_DOMAIN_EVENT_SUSPENDED_MIGRATED,
                K::Paused,
            ),
            (
                sys::VIR_DOMAIN_EVENT_SUSPENDED,
                sys::VIR_DOMAIN_EVENT_SUSPENDED_IOERROR,
                K::PausedIoError,
            ),
            (
                sys::VIR_DOMAIN_EVENT_SUSPENDED,
                sys::VIR_DOMAIN_EVENT_SUSPENDED_API_ERROR,
                K::Paused,
            ),
            (
                sys::VIR_DOMAIN_EVENT_RESUMED,
                sys::VIR_DOMAIN_EVENT_RESUMED_UNPAUSED,
                K::Resumed,
            ),
            (
                sys::VIR_DOMAIN_EVENT_STOPPED,
                sys::VIR_DOMAIN_EVENT_STOPPED_SHUTDOWN,
                K::GuestShutdown,
            ),
            (
                sys::VIR_DOMAIN_EVENT_STOPPED,
                sys::VIR_DOMAIN_EVENT_STOPPED_DESTROYED,
                K::Destroyed,
            ),
            (
                sys::VIR_DOMAIN_EVENT_STOPPED,
                sys::VIR_DOMAIN_EVENT_STOPPED_CRASHED,
                K::Crashed,
            ),
            (
                sys::VIR_DOMAIN_EVENT_STOPPED,
                sys::VIR_DOMAIN_EVENT_STOPPED_FAILED,
                K::Crashed,
            ),
            (
                sys::VIR_DOMAIN_EVENT_STOPPED,
                sys::VIR_DOMAIN_EVENT_STOPPED_MIGRATED,
                K::MigratedAway,
            ),
            (
                sys::VIR_DOMAIN_EVENT_STOPPED,
                sys::VIR_DOMAIN_EVENT_STOPPED_SAVED,
                K::Other,
            ),
            (
                sys::VIR_DOMAIN_EVENT_STOPPED,
                sys::VIR_DOMAIN_EVENT_STOPPED_FROM_SNAPSHOT,
                K::Other,
            ),
            (
                sys::VIR_DOMAIN_EVENT_SHUTDOWN,
                sys::VIR_DOMAIN_EVENT_SHUTDOWN_GUEST,
                K::Other,
            ),
            (
                sys::VIR_DOMAIN_EVENT_SHUTDOWN,
                sys::VIR_DOMAIN_EVENT_SHUTDOWN_FINISHED,
                K::Other,
            ),
            (sys::VIR_DOMAIN_EVENT_PMSUSPENDED, 0, K::Other),
            (
                sys::VIR_DOMAIN_EVENT_CRASHED,
                sys::VIR_DOMAIN_EVENT_CRASHED_PANICKED,
                K::Crashed,
            ),
            (999, 0, K::Other),
        ];
        for &(event, detail, want) in table {
            assert_eq!(
                classify(c(event), c(detail)),
                want,
                "event {event} detail {detail}"
            );
        }
        assert_eq!(classify(-1, 0), K::Other);
        assert_eq!(classify(c(sys::VIR_DOMAIN_EVENT_STOPPED), -1), K::Other);
    }

    #[test]
    fn state_and_reason_table() {
        use StateReason as R;
        let table: &[(u32, u32, DomainState, StateReason)] = &[
            (
                sys::VIR_DOMAIN_RUNNING,
                sys::VIR_DOMAIN_RUNNING_BOOTED,
                DomainState::Running,
                R::Booted,
            ),
            (
                sys::VIR_DOMAIN_RUNNING,
                sys::VIR_DOMAIN_RUNNING_RESTORED,
                DomainState::Running,
                R::Booted,
            ),
            (
                sys::VIR_DOMAIN_RUNNING,
                sys::VIR_DOMAIN_RUNNING_UNKNOWN,
                DomainState::Running,
                R::Other,
            ),
            (
                sys::VIR_DOMAIN_RUNNING,
                sys::VIR_DOMAIN_RUNNING_CRASHED,
                DomainState::Running,
                R::Other,
            ),
            (
                sys::VIR_DOMAIN_PAUSED,
                sys::VIR_DOMAIN_PAUSED_IOERROR,
                DomainState::Paused,
                R::IoError,
            ),
            (
                sys::VIR_DOMAIN_PAUSED,
                sys::VIR_DOMAIN_PAUSED_USER,
                DomainState::Paused,
                R::User,
            ),
            (
                sys::VIR_DOMAIN_PAUSED,
                sys::VIR_DOMAIN_PAUSED_CRASHED,
                DomainState::Paused,
                R::Other,
            ),
            (
                sys::VIR_DOMAIN_SHUTOFF,
                sys::VIR_DOMAIN_SHUTOFF_UNKNOWN,
                DomainState::Shutoff,
                R::NeverStarted,
            ),
            (
                sys::VIR_DOMAIN_SHUTOFF,
                sys::VIR_DOMAIN_SHUTOFF_SHUTDOWN,
                DomainState::Shutoff,
                R::GuestShutdown,
            ),
            (
                sys::VIR_DOMAIN_SHUTOFF,
                sys::VIR_DOMAIN_SHUTOFF_DESTROYED,
                DomainState::Shutoff,
                R::Destroyed,
            ),
            (
                sys::VIR_DOMAIN_SHUTOFF,
                sys::VIR_DOMAIN_SHUTOFF_CRASHED,
                DomainState::Shutoff,
                R::Crashed,
            ),
            (
                sys::VIR_DOMAIN_SHUTOFF,
                sys::VIR_DOMAIN_SHUTOFF_MIGRATED,
                DomainState::Shutoff,
                R::Migrated,
            ),
            (
                sys::VIR_DOMAIN_SHUTOFF,
                sys::VIR_DOMAIN_SHUTOFF_SAVED,
                DomainState::Shutoff,
                R::Saved,
            ),
            (
                sys::VIR_DOMAIN_SHUTOFF,
                sys::VIR_DOMAIN_SHUTOFF_FAILED,
                DomainState::Shutoff,
                R::Failed,
            ),
            (
                sys::VIR_DOMAIN_SHUTOFF,
                sys::VIR_DOMAIN_SHUTOFF_FROM_SNAPSHOT,
                DomainState::Shutoff,
                R::Other,
            ),
            (
                sys::VIR_DOMAIN_SHUTOFF,
                sys::VIR_DOMAIN_SHUTOFF_DAEMON,
                DomainState::Shutoff,
                R::Other,
            ),
            (
                sys::VIR_DOMAIN_CRASHED,
                sys::VIR_DOMAIN_CRASHED_UNKNOWN,
                DomainState::Crashed,
                R::Crashed,
            ),
            (
                sys::VIR_DOMAIN_CRASHED,
                sys::VIR_DOMAIN_CRASHED_PANICKED,
                DomainState::Crashed,
                R::Crashed,
            ),
            (sys::VIR_DOMAIN_BLOCKED, 0, DomainState::Blocked, R::Other),
            (
                sys::VIR_DOMAIN_SHUTDOWN,
                0,
                DomainState::ShuttingDown,
                R::Other,
            ),
            (
                sys::VIR_DOMAIN_PMSUSPENDED,
                0,
                DomainState::PmSuspended,
                R::Other,
            ),
            (sys::VIR_DOMAIN_NOSTATE, 0, DomainState::NoState, R::Other),
            (42, 0, DomainState::NoState, R::Other),
        ];
        for &(state, reason, want_state, want_reason) in table {
            assert_eq!(map_state(state), want_state, "state {state}");
            assert_eq!(
                map_reason(state, c(reason)),
                want_reason,
                "state {state} reason {reason}"
            );
        }
        assert_eq!(map_reason(sys::VIR_DOMAIN_SHUTOFF, -1), R::Other);
    }

    #[test]
    fn event_loop_init_is_idempotent() {
        assert_eq!(ensure_event_loop(), Ok(()));
        assert_eq!(ensure_event_loop(), Ok(()));
    }
}
