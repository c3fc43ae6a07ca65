//! The host watchdog: what makes lease expiry a proof (proof 3 of "The one rule",
//! docs/architecture.md).
//!
//! A lease only proves a host's guests gone if something acts when the agent cannot: the
//! agent feeds a watchdog device (hardware, or softdog) from a dedicated thread while the
//! isolation guard says the host would not fence itself now ([`feeds_watchdog`]); when the
//! guard decides to self-fence, or the agent dies, hangs or crash-loops, feeding stops and the
//! device resets the host within its timeout W. This is ClusterLabs sbd's watchdog fencing and
//! Proxmox's watchdog-mux, applied to one lease.
//!
//! - The device is opened (armed) on the first "keep" verdict of this process: a restarted
//!   agent feeds again only once it has made that decision afresh. Until then, a device left
//!   armed by the previous process (closed without the magic character, as on `kill -9`)
//!   keeps counting down.
//! - The guard's permission expires after [`PERMIT`]: a guard loop that stalls (a wedged
//!   runtime) stops the feeding within a second, without anybody deciding so.
//! - Disarmed (magic close, `'V'`) only once a fresh libvirt listing shows no HA domain
//!   running after a self-fence: then there is nothing left to reset the host for. It is armed
//!   again on the next "keep" verdict.
//! - The armed timeout, read back from the device, rides every heartbeat
//!   (`Heartbeat::watchdog_ms`). A monitor takes lease expiry as proof only for a host whose
//!   agent reported one, and only once `lease + W` have passed.
//!
//! All device I/O happens on the feeding thread: a device that hangs (a stuck driver, or the
//! lab's FUSE stand-in) stalls only that thread, and a stalled feeder resets the host, which
//! is the safe direction.
//!
//! [`feeds_watchdog`]: vigil_common::isolation::feeds_watchdog

use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tracing::{error, info, warn};
use vigil_common::config::WatchdogConfig;

/// How long one "keep" verdict allows feeding (the guard renews it every 100 ms).
pub const PERMIT: Duration = Duration::from_millis(1_000);

#[derive(Debug, Default)]
struct State {
    /// Feeding allowed until then (the guard's latest "keep").
    permit_until: Option<Instant>,
    /// The guard asked for a magic close (no HA domain runs after a self-fence).
    disarm: bool,
    /// Armed timeout in ms, once the device is open.
    armed_ms: Option<u64>,
    stopped: bool,
}

#[derive(Debug)]
struct Inner {
    cfg: WatchdogConfig,
    state: Mutex<State>,
}

/// Handle on the host watchdog. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Watchdog {
    inner: Arc<Inner>,
}

impl Watchdog {
    /// Starts the feeding thread if a device is configured (never opens it yet).
    pub fn spawn(cfg: &WatchdogConfig) -> Watchdog {
        let w = Watchdog {
            inner: Arc::new(Inner {
                cfg: cfg.clone(),
                state: Mutex::new(State::default()),
            }),
        };
        if let Some(device) = cfg.device.clone() {
            let inner = w.inner.clone();
            let spawned = std::thread::Builder::new()
                .name("vigil-watchdog".into())
                .spawn(move || feeder(inner, device));
            if let Err(e) = spawned {
                error!("cannot start the watchdog thread: {e}; lease expiry will not prove this host off");
            }
        } else {
            warn!("no host watchdog configured ([watchdog] device): the monitors will never take lease expiry as proof that this host's guests are gone, only power fencing or a storage-slot acknowledgement");
        }
        w
    }

    /// No device: what tests and load generators use.
    pub fn none() -> Watchdog {
        Watchdog {
            inner: Arc::new(Inner {
                cfg: WatchdogConfig::default(),
                state: Mutex::new(State::default()),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The guard's verdict is "keep": the watchdog may be fed (and armed) for [`PERMIT`].
    pub fn keep(&self, now: Instant) {
        let mut s = self.lock();
        s.permit_until = Some(now + PERMIT);
        s.disarm = false;
    }

    /// The guard decided to fence this host: stop feeding at once.
    pub fn fence(&self) {
        self.lock().permit_until = None;
    }

    /// A fresh listing shows no HA domain running after a self-fence: disarm (magic close).
    pub fn disarm(&self) {
        let mut s = self.lock();
        s.permit_until = None;
        s.disarm = true;
    }

    /// The armed timeout, for the wire.
    pub fn armed_ms(&self) -> Option<u64> {
        self.lock().armed_ms
    }

    /// Ends the feeding thread without disarming (the device, if armed, keeps counting: a
    /// stopped agent whose HA domains run must not leave them unguarded).
    pub fn stop(&self) {
        self.lock().stopped = true;
    }
}

fn feeder(inner: Arc<Inner>, path: PathBuf) {
    let lock = || inner.state.lock().unwrap_or_else(|e| e.into_inner());
    let mut dev: Option<File> = None;
    let mut complained = false;
    // Feed four times per timeout, at least every 500 ms once known.
    let mut every = Duration::from_millis(250);
    loop {
        let (permit, disarm, stopped) = {
            let s = lock();
            (
                s.permit_until.is_some_and(|t| Instant::now() < t),
                s.disarm,
                s.stopped,
            )
        };
        if stopped {
            return;
        }
        if disarm {
            if let Some(mut f) = dev.take() {
                match f.write_all(b"V").and_then(|_| f.flush()) {
                    Ok(()) => {
                        info!(device = %path.display(), "host watchdog disarmed (magic close): no HA domain runs here")
                    }
                    Err(e) => {
                        error!(device = %path.display(), "cannot disarm the host watchdog: {e}; it will reset the host")
                    }
                }
                drop(f);
            }
            let mut s = lock();
            s.armed_ms = None;
            s.disarm = false;
        } else if permit {
            if dev.is_none() {
                match arm(&path, inner.cfg.timeout_secs) {
                    Ok((f, secs)) => {
                        info!(device = %path.display(), timeout_s = secs, "host watchdog armed");
                        every = Duration::from_millis((u64::from(secs) * 1000 / 4).clamp(50, 500));
                        lock().armed_ms = Some(u64::from(secs) * 1000);
                        dev = Some(f);
                        complained = false;
                    }
                    Err(e) => {
                        if !complained {
                            error!(device = %path.display(), "cannot arm the host watchdog: {e}; lease expiry will not prove this host off");
                            complained = true;
                        }
                    }
                }
            }
            if let Some(f) = dev.as_mut() {
                if let Err(e) = f.write_all(b"\0").and_then(|_| f.flush()) {
                    error!(device = %path.display(), "cannot feed the host watchdog: {e}");
                }
            }
        }
        std::thread::sleep(every);
    }
}

/// Opens the device (which arms it), programs the timeout and reads back what it accepted.
fn arm(path: &std::path::Path, secs: u32) -> std::io::Result<(File, u32)> {
    use std::os::fd::AsRawFd;
    let f = std::fs::OpenOptions::new().write(true).open(path)?;
    let fd = f.as_raw_fd();
    if let Err(e) = ioctl::set_timeout(fd, secs) {
        warn!(device = %path.display(), "WDIOC_SETTIMEOUT {secs} s failed: {e}; using the device's own timeout");
    }
    let got = ioctl::get_timeout(fd).map_err(|e| {
        std::io::Error::other(format!(
            "WDIOC_GETTIMEOUT failed ({e}): the timeout is unknown, so it cannot back a lease"
        ))
    })?;
    if got == 0 {
        return Err(std::io::Error::other("the device reports a timeout of 0 s"));
    }
    Ok((f, got))
}

/// The Linux watchdog ioctls (`linux/watchdog.h`).
#[allow(unsafe_code)]
mod ioctl {
    use std::os::fd::RawFd;

    nix::ioctl_readwrite!(wdioc_settimeout, b'W', 6, libc::c_int);
    nix::ioctl_read!(wdioc_gettimeout, b'W', 7, libc::c_int);

    pub fn set_timeout(fd: RawFd, secs: u32) -> nix::Result<u32> {
        let mut v: libc::c_int = libc::c_int::try_from(secs).unwrap_or(libc::c_int::MAX);
        // SAFETY: `fd` is an open file descriptor owned by the caller for the duration of the
        // call, and `v` is a valid, aligned c_int that the kernel reads and writes.
        unsafe { wdioc_settimeout(fd, &mut v) }?;
        Ok(u32::try_from(v).unwrap_or(0))
    }

    pub fn get_timeout(fd: RawFd) -> nix::Result<u32> {
        let mut v: libc::c_int = 0;
        // SAFETY: as above; the kernel writes one c_int into `v`.
        unsafe { wdioc_gettimeout(fd, &mut v) }?;
        Ok(u32::try_from(v).unwrap_or(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without a device nothing is armed, whatever the guard says.
    #[test]
    fn no_device_reports_no_watchdog() {
        let w = Watchdog::none();
        w.keep(Instant::now());
        assert_eq!(w.armed_ms(), None);
    }

    /// A plain file stands in for a device without the ioctls: arming fails (the timeout
    /// cannot be read back), so nothing is reported as armed.
    #[test]
    fn a_device_whose_timeout_cannot_be_read_is_not_armed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("watchdog");
        std::fs::write(&path, b"").expect("file");
        let w = Watchdog::spawn(&WatchdogConfig {
            device: Some(path),
            timeout_secs: 2,
        });
        w.keep(Instant::now());
        std::thread::sleep(Duration::from_millis(400));
        assert_eq!(w.armed_ms(), None);
        w.stop();
    }
}
