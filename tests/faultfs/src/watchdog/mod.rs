//! The lab's per-host fake watchdog: a FUSE filesystem with one file, `watchdog`, that behaves
//! like Linux's `/dev/watchdog` for unchanged production code, and whose expiry runs a command
//! (the lab passes `vigil-lab ... crash-host H --source watchdog`: that host's power loss).
//!
//! Layout of a mount: `watchdog` (mode 0600, the device) and `status` (0444, one line, the
//! same fields as the control socket's `status`). See [`state`] for the semantics and
//! [`client`] for the ioctls as a program issues them.
//!
//! FUSE gives regular files only "restricted" ioctls: the kernel takes the argument's size and
//! direction from the command number. So `WDIOC_SETTIMEOUT` (`_IOWR`), `WDIOC_GETTIMEOUT`,
//! `WDIOC_GETTIMELEFT`, `WDIOC_KEEPALIVE`, `WDIOC_GETSTATUS`, `WDIOC_GETBOOTSTATUS` and
//! `WDIOC_GETSUPPORT` (all `_IOR`) work as on a real device, but `WDIOC_SETOPTIONS` (declared
//! `_IOR` while the driver reads its argument) cannot carry its value here: it answers
//! `ENOTTY`, as does every other command. Use the magic close to stop it.

pub mod client;
pub mod state;

use std::ffi::{OsStr, OsString};
use std::fs::OpenOptions;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use fuser::{
    Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    IoctlFlags, LockOwner, MountOption, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyIoctl, ReplyOpen, ReplyWrite, Request, SessionUnmounter,
    TimeOrNow, WriteFlags,
};

/// Unix ms now, as the timelines use it.
pub fn now_ms() -> u64 {
    u64::try_from(crate::mode::now_ms()).unwrap_or(u64::MAX)
}
pub use state::{Dog, DogError, Expiry, State, Status, MAX_TIMEOUT_SECS};

/// Linux `<linux/watchdog.h>` ioctl numbers (`_IOR`/`_IOWR('W', nr, ...)`).
pub mod wdioc {
    const fn ioc(dir: u32, nr: u32, size: u32) -> u32 {
        (dir << 30) | (size << 16) | ((b'W' as u32) << 8) | nr
    }
    const READ: u32 = 2;
    const READ_WRITE: u32 = 3;
    /// `struct watchdog_info`: u32 options, u32 firmware_version, u8 identity[32].
    pub const INFO_SIZE: u32 = 40;
    pub const GETSUPPORT: u32 = ioc(READ, 0, INFO_SIZE);
    pub const GETSTATUS: u32 = ioc(READ, 1, 4);
    pub const GETBOOTSTATUS: u32 = ioc(READ, 2, 4);
    pub const SETOPTIONS: u32 = ioc(READ, 4, 4);
    pub const KEEPALIVE: u32 = ioc(READ, 5, 4);
    pub const SETTIMEOUT: u32 = ioc(READ_WRITE, 6, 4);
    pub const GETTIMEOUT: u32 = ioc(READ, 7, 4);
    pub const GETTIMELEFT: u32 = ioc(READ, 10, 4);
    /// `WDIOF_SETTIMEOUT | WDIOF_MAGICCLOSE | WDIOF_KEEPALIVEPING`.
    pub const SUPPORT_OPTIONS: u32 = 0x0080 | 0x0100 | 0x8000;
    /// `identity` of `WDIOC_GETSUPPORT`.
    pub const IDENTITY: &str = "vigil-lab-watchdog";
}

const ROOT: u64 = 1;
const DEV: u64 = 2;
const STATUS: u64 = 3;
/// The device's file name in the mount.
pub const DEVICE_FILE: &str = "watchdog";
/// The status file's name in the mount.
pub const STATUS_FILE: &str = "status";
/// How long an `open` waits for the previous opener's release (FUSE sends `release`
/// asynchronously after `close(2)` returns) before it answers `EBUSY`.
const OPEN_WAIT: Duration = Duration::from_millis(500);

/// How to run one watchdog.
#[derive(Clone, Debug)]
pub struct WatchdogOptions {
    /// Empty directory to mount on; the device is `MOUNTPOINT/watchdog`.
    pub mountpoint: PathBuf,
    /// The host it belongs to (logs, status, timeline target).
    pub name: String,
    /// Timeout until `WDIOC_SETTIMEOUT` (and again after each reset).
    pub timeout_secs: u32,
    /// The magic close does not disarm it.
    pub nowayout: bool,
    /// Run on expiry (argv), once per expiry; empty: only log and record.
    pub action: Vec<OsString>,
    /// The lab's timeline (`ROOT/timeline.jsonl`): an expiry appends one event.
    pub timeline: Option<PathBuf>,
    /// The observer's timeline: an expiry appends a `fault` mark.
    pub mark: Option<PathBuf>,
    /// FUSE dispatch threads (at least 2: an `open` may wait for a `release`).
    pub threads: usize,
}

impl WatchdogOptions {
    /// Defaults: name from the mountpoint, 10 s, magic close allowed, no action, 3 threads.
    pub fn new(mountpoint: impl Into<PathBuf>) -> WatchdogOptions {
        let mountpoint = mountpoint.into();
        let name = mountpoint
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "watchdog".into());
        WatchdogOptions {
            mountpoint,
            name,
            timeout_secs: 10,
            nowayout: false,
            action: Vec::new(),
            timeline: None,
            mark: None,
            threads: 3,
        }
    }
}

struct Shared {
    dog: Mutex<Dog>,
    cv: Condvar,
    stop: AtomicBool,
    opts: WatchdogOptions,
    /// Actions started and finished (for status and tests).
    actions_started: AtomicU64,
    actions_done: AtomicU64,
}

impl Shared {
    fn dog(&self) -> MutexGuard<'_, Dog> {
        self.dog.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A handle on a running watchdog: status and the lab's power commands.
#[derive(Clone)]
pub struct Handle(Arc<Shared>);

impl std::fmt::Debug for Handle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Handle").field(&self.0.opts.name).finish()
    }
}

impl Handle {
    pub fn status(&self) -> Status {
        self.0.dog().status(Instant::now())
    }

    /// The host lost power: stop acting (no expiry for a host that is off).
    pub fn power_off(&self) {
        self.0.dog().power_off();
        self.0.cv.notify_all();
        log(
            &self.0.opts.name,
            "host powered off: stopped (no expiry until reset)",
        );
    }

    /// The host powers on: disarmed, default timeout, ready for a new opener.
    pub fn reset(&self) {
        self.0.dog().reset();
        self.0.cv.notify_all();
        log(&self.0.opts.name, "reset (host powered on): disarmed");
    }

    /// Expiry actions started / finished so far.
    pub fn actions(&self) -> (u64, u64) {
        (
            self.0.actions_started.load(Ordering::SeqCst),
            self.0.actions_done.load(Ordering::SeqCst),
        )
    }

    /// The control protocol: `status`, `off`, `reset`; one answer line `ok FIELDS` or
    /// `error: ...`.
    pub fn command(&self, line: &str) -> String {
        match line.trim() {
            "status" => {}
            "off" => self.power_off(),
            "reset" => self.reset(),
            other => {
                return format!("error: unknown command {other:?} (expected status|off|reset)")
            }
        }
        let (started, done) = self.actions();
        format!(
            "ok {} actions={started} actions_done={done}",
            self.status().to_fields()
        )
    }
}

fn log(name: &str, msg: &str) {
    eprintln!("{} vigil-lab-watchdog[{name}]: {msg}", now_ms());
}

/// Parses a control answer (`ok name=... state=...`) into its fields; `error: ...` is `Err`.
pub fn parse_answer(line: &str) -> io::Result<Vec<(String, String)>> {
    let line = line.trim();
    let Some(rest) = line.strip_prefix("ok ") else {
        return Err(io::Error::other(format!("watchdog control: {line}")));
    };
    Ok(rest
        .split_whitespace()
        .filter_map(|f| f.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect())
}

/// A mounted watchdog. Dropping it stops the timer and unmounts.
pub struct MountedWatchdog {
    unmounter: Option<SessionUnmounter>,
    ended: mpsc::Receiver<io::Result<()>>,
    handle: Handle,
    timer: Option<JoinHandle<()>>,
    mountpoint: PathBuf,
}

impl std::fmt::Debug for MountedWatchdog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MountedWatchdog")
            .field("mountpoint", &self.mountpoint)
            .finish()
    }
}

/// Mounts a watchdog on `opts.mountpoint` (root, `/dev/fuse`), disarmed, and starts its timer.
pub fn mount(opts: &WatchdogOptions) -> io::Result<MountedWatchdog> {
    if crate::cleanup::is_mounted(&opts.mountpoint)? {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!(
                "something is already mounted on {} (a dead watchdog? `vigil-lab-watchdog cleanup --mountpoint {}`)",
                opts.mountpoint.display(),
                opts.mountpoint.display()
            ),
        ));
    }
    let mountpoint = opts.mountpoint.canonicalize()?;
    let shared = Arc::new(Shared {
        dog: Mutex::new(Dog::new(&opts.name, opts.timeout_secs, opts.nowayout)),
        cv: Condvar::new(),
        stop: AtomicBool::new(false),
        opts: opts.clone(),
        actions_started: AtomicU64::new(0),
        actions_done: AtomicU64::new(0),
    });
    let fs = WdFs {
        shared: Arc::clone(&shared),
        next_fh: AtomicU64::new(1),
        status_snaps: Mutex::new(std::collections::HashMap::new()),
        born: SystemTime::now(),
    };
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName(format!("vigil-lab-watchdog:{}", opts.name)),
        MountOption::CUSTOM("subtype=vigil-lab-watchdog".into()),
        MountOption::RW,
    ];
    config.n_threads = Some(opts.threads.max(2));
    let mut session = fuser::Session::new(fs, &mountpoint, &config)?;
    let unmounter = session.unmount_callable();
    let (done, ended) = mpsc::channel();
    std::thread::Builder::new()
        .name("watchdog-session".into())
        .spawn(move || {
            let _ = done.send(session.run());
        })?;
    let sh = Arc::clone(&shared);
    let timer = std::thread::Builder::new()
        .name("watchdog-timer".into())
        .spawn(move || timer(sh))?;
    log(
        &opts.name,
        &format!(
            "mounted on {} (device {}, timeout {} s{}, disarmed)",
            mountpoint.display(),
            mountpoint.join(DEVICE_FILE).display(),
            opts.timeout_secs,
            if opts.nowayout { ", nowayout" } else { "" }
        ),
    );
    Ok(MountedWatchdog {
        unmounter: Some(unmounter),
        ended,
        handle: Handle(shared),
        timer: Some(timer),
        mountpoint,
    })
}

impl MountedWatchdog {
    pub fn handle(&self) -> Handle {
        self.handle.clone()
    }

    /// The device's path.
    pub fn device(&self) -> PathBuf {
        self.mountpoint.join(DEVICE_FILE)
    }

    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// Stops the timer (no expiry from now on) and unmounts (lazily if busy).
    pub fn unmount(mut self) -> io::Result<()> {
        self.unmount_inner()
    }

    fn unmount_inner(&mut self) -> io::Result<()> {
        self.handle.0.stop.store(true, Ordering::SeqCst);
        self.handle.0.cv.notify_all();
        if let Some(t) = self.timer.take() {
            let _ = t.join();
        }
        let Some(mut unmounter) = self.unmounter.take() else {
            return Ok(());
        };
        if unmounter.unmount().is_err() && crate::cleanup::is_mounted(&self.mountpoint)? {
            nix::mount::umount2(&self.mountpoint, nix::mount::MntFlags::MNT_DETACH)
                .map_err(io::Error::from)?;
        }
        let _ = self.ended.recv_timeout(Duration::from_secs(1));
        Ok(())
    }
}

impl Drop for MountedWatchdog {
    fn drop(&mut self) {
        if let Err(e) = self.unmount_inner() {
            log(
                &self.handle.0.opts.name,
                &format!("unmount on drop failed: {e}"),
            );
        }
    }
}

fn timer(shared: Arc<Shared>) {
    while !shared.stop.load(Ordering::SeqCst) {
        let mut dog = shared.dog();
        let expiry = dog.tick(Instant::now(), now_ms());
        if let Some(e) = expiry {
            drop(dog);
            let sh = Arc::clone(&shared);
            let spawned = std::thread::Builder::new()
                .name("watchdog-action".into())
                .spawn(move || expire(&sh, &e));
            if let Err(e) = spawned {
                log(
                    &shared.opts.name,
                    &format!("cannot start the expiry action: {e}"),
                );
            }
            continue;
        }
        // Wake at the deadline (or every 100 ms: a feed moves it later, never earlier).
        let wait = dog
            .until_deadline(Instant::now())
            .unwrap_or(Duration::from_millis(100))
            .min(Duration::from_millis(100));
        let _ = shared
            .cv
            .wait_timeout(dog, wait.max(Duration::from_millis(1)));
    }
}

/// The expiry: log, record in the timelines, run the action once and wait for it.
fn expire(shared: &Shared, e: &Expiry) {
    let o = &shared.opts;
    let text = format!(
        "watchdog reset {}: not fed for {} s (last feed at {} ms, {}): power loss",
        o.name,
        e.timeout_secs,
        e.last_feed_ms,
        if e.open {
            "its opener still holds it (hung)"
        } else {
            "nobody holds it (the opener died or closed it without the magic 'V')"
        }
    );
    log(&o.name, &format!("EXPIRED: {text}"));
    if let Some(path) = &o.timeline {
        let ev = serde_json::json!({
            "ts_ms": e.at_ms,
            "kind": "fault",
            "verb": "watchdog-reset",
            "target": o.name,
            "text": text,
            "detail": {
                "timeout_secs": e.timeout_secs,
                "last_feed_ms": e.last_feed_ms,
                "armed_ms": e.armed_ms,
                "held_open": e.open,
            },
        });
        if let Err(err) = append_line(path, &ev.to_string()) {
            log(&o.name, &format!("cannot write {}: {err}", path.display()));
        }
    }
    if let Some(path) = &o.mark {
        let m = serde_json::json!({"t_ms": e.at_ms, "fault": format!("watchdog-reset {}: {text}", o.name)});
        if let Err(err) = append_line(path, &m.to_string()) {
            log(&o.name, &format!("cannot write {}: {err}", path.display()));
        }
    }
    let Some((prog, args)) = o.action.split_first() else {
        return;
    };
    shared.actions_started.fetch_add(1, Ordering::SeqCst);
    let status = Command::new(prog)
        .args(args)
        .env("VIGIL_WATCHDOG_NAME", &o.name)
        .env("VIGIL_WATCHDOG_EXPIRED_MS", e.at_ms.to_string())
        .stdin(Stdio::null())
        .status();
    shared.actions_done.fetch_add(1, Ordering::SeqCst);
    let shown = o
        .action
        .iter()
        .map(|a| a.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ");
    match status {
        Ok(st) if st.success() => log(&o.name, &format!("action done: {shown}")),
        Ok(st) => log(&o.name, &format!("action FAILED ({st}): {shown}")),
        Err(err) => log(&o.name, &format!("action could not run ({err}): {shown}")),
    }
}

/// Appends one line with one `write` (safe with the lab's other writers).
fn append_line(path: &Path, line: &str) -> io::Result<()> {
    let mut f = OpenOptions::new().create(true).append(true).open(path)?;
    f.write_all(format!("{line}\n").as_bytes())
}

struct WdFs {
    shared: Arc<Shared>,
    next_fh: AtomicU64,
    /// The status text each open handle of `status` reads (taken at open).
    status_snaps: Mutex<std::collections::HashMap<u64, Vec<u8>>>,
    born: SystemTime,
}

fn errno(e: DogError) -> Errno {
    match e {
        DogError::Busy => Errno::EBUSY,
        DogError::HostDown => Errno::EIO,
        DogError::BadTimeout => Errno::EINVAL,
        DogError::NotOpener => Errno::EBADF,
    }
}

impl WdFs {
    fn attr(&self, ino: u64) -> Option<FileAttr> {
        let (kind, perm, nlink) = match ino {
            ROOT => (FileType::Directory, 0o755, 2),
            DEV => (FileType::RegularFile, 0o600, 1),
            STATUS => (FileType::RegularFile, 0o444, 1),
            _ => return None,
        };
        Some(FileAttr {
            ino: INodeNo(ino),
            size: 0,
            blocks: 0,
            atime: self.born,
            mtime: self.born,
            ctime: self.born,
            crtime: self.born,
            kind,
            perm,
            nlink,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        })
    }

    fn name(&self) -> &str {
        &self.shared.opts.name
    }

    fn open_dev(&self) -> Result<u64, Errno> {
        let fh = self.next_fh.fetch_add(1, Ordering::SeqCst);
        let deadline = Instant::now() + OPEN_WAIT;
        let mut dog = self.shared.dog();
        loop {
            match dog.open(fh, Instant::now(), now_ms()) {
                Ok(()) => {
                    let t = dog.timeout_secs();
                    drop(dog);
                    self.shared.cv.notify_all();
                    log(
                        self.name(),
                        &format!("opened (fh {fh}): armed, timeout {t} s"),
                    );
                    return Ok(fh);
                }
                Err(DogError::Busy) if Instant::now() < deadline => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    dog = self
                        .shared
                        .cv
                        .wait_timeout(dog, left)
                        .map(|(g, _)| g)
                        .unwrap_or_else(|e| e.into_inner().0);
                }
                Err(e) => {
                    drop(dog);
                    log(self.name(), &format!("open refused: {e:?}"));
                    return Err(errno(e));
                }
            }
        }
    }

    fn ioctl_dev(&self, fh: u64, cmd: u32, in_data: &[u8]) -> Result<Vec<u8>, Errno> {
        let now = Instant::now();
        let mut dog = self.shared.dog();
        let int = |v: u32| i32::try_from(v).unwrap_or(i32::MAX).to_ne_bytes().to_vec();
        match cmd {
            wdioc::GETSUPPORT => {
                let mut info = Vec::with_capacity(wdioc::INFO_SIZE as usize);
                info.extend_from_slice(&wdioc::SUPPORT_OPTIONS.to_ne_bytes());
                info.extend_from_slice(&1u32.to_ne_bytes());
                let mut identity = [0u8; 32];
                let id = wdioc::IDENTITY.as_bytes();
                identity[..id.len()].copy_from_slice(id);
                info.extend_from_slice(&identity);
                Ok(info)
            }
            wdioc::GETSTATUS | wdioc::GETBOOTSTATUS => Ok(int(0)),
            wdioc::KEEPALIVE => {
                dog.keepalive(fh, now, now_ms()).map_err(errno)?;
                Ok(Vec::new())
            }
            wdioc::SETTIMEOUT => {
                let raw: [u8; 4] = in_data
                    .get(..4)
                    .and_then(|b| b.try_into().ok())
                    .ok_or(Errno::EINVAL)?;
                let asked = i32::from_ne_bytes(raw);
                let got = dog
                    .set_timeout(fh, i64::from(asked), now, now_ms())
                    .map_err(errno)?;
                drop(dog);
                self.shared.cv.notify_all();
                log(self.name(), &format!("timeout set to {got} s"));
                Ok(int(got))
            }
            wdioc::GETTIMEOUT => Ok(int(dog.timeout_secs())),
            wdioc::GETTIMELEFT => Ok(int(dog.time_left_secs(now))),
            _ => Err(Errno::ENOTTY),
        }
    }
}

impl Filesystem for WdFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let ino = match (parent.0, name.to_str()) {
            (ROOT, Some(DEVICE_FILE)) => DEV,
            (ROOT, Some(STATUS_FILE)) => STATUS,
            _ => {
                reply.error(Errno::ENOENT);
                return;
            }
        };
        match self.attr(ino) {
            Some(a) => reply.entry(&Duration::from_secs(1), &a, Generation(0)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr(ino.0) {
            Some(a) => reply.attr(&Duration::from_secs(1), &a),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        _size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        // O_TRUNC and the like: a device has no size; answer with what it is.
        match self.attr(ino.0) {
            Some(a) => reply.attr(&Duration::from_secs(1), &a),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let flags = FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_NONSEEKABLE;
        match ino.0 {
            DEV => match self.open_dev() {
                Ok(fh) => reply.opened(FileHandle(fh), flags),
                Err(e) => reply.error(e),
            },
            STATUS => {
                let fh = self.next_fh.fetch_add(1, Ordering::SeqCst);
                let line = format!(
                    "{}\n",
                    Handle(Arc::clone(&self.shared))
                        .command("status")
                        .trim_start_matches("ok ")
                );
                self.status_snaps
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(fh, line.into_bytes());
                reply.opened(FileHandle(fh), FopenFlags::FOPEN_DIRECT_IO);
            }
            ROOT => reply.error(Errno::EISDIR),
            _ => reply.error(Errno::ENOENT),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        if ino.0 != STATUS {
            // The Linux watchdog device has no read.
            reply.error(Errno::EINVAL);
            return;
        }
        let snaps = self.status_snaps.lock().unwrap_or_else(|e| e.into_inner());
        let Some(text) = snaps.get(&fh.0) else {
            reply.error(Errno::EBADF);
            return;
        };
        let start = usize::try_from(offset)
            .unwrap_or(usize::MAX)
            .min(text.len());
        let end = start.saturating_add(size as usize).min(text.len());
        reply.data(&text[start..end]);
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        if ino.0 != DEV {
            reply.error(Errno::EBADF);
            return;
        }
        let res = self
            .shared
            .dog()
            .write(fh.0, data, Instant::now(), now_ms());
        match res {
            Ok(n) => {
                self.shared.cv.notify_all();
                reply.written(u32::try_from(n).unwrap_or(u32::MAX));
            }
            Err(e) => reply.error(errno(e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        match ino.0 {
            DEV => {
                let mut dog = self.shared.dog();
                let was_opener = dog.is_open();
                let disarmed = dog.release(fh.0);
                let state = dog.state();
                drop(dog);
                self.shared.cv.notify_all();
                if was_opener {
                    log(
                        self.name(),
                        &if disarmed {
                            format!("closed (fh {}) with the magic 'V': disarmed", fh.0)
                        } else {
                            format!("closed (fh {}) without the magic 'V': still {state}", fh.0)
                        },
                    );
                }
            }
            STATUS => {
                self.status_snaps
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&fh.0);
            }
            _ => {}
        }
        reply.ok();
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if ino.0 != ROOT {
            reply.error(Errno::ENOTDIR);
            return;
        }
        let entries = [
            (ROOT, FileType::Directory, "."),
            (ROOT, FileType::Directory, ".."),
            (DEV, FileType::RegularFile, DEVICE_FILE),
            (STATUS, FileType::RegularFile, STATUS_FILE),
        ];
        for (i, (ino, kind, name)) in entries
            .iter()
            .enumerate()
            .skip(usize::try_from(offset).unwrap_or(usize::MAX))
        {
            if reply.add(INodeNo(*ino), (i + 1) as u64, *kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn ioctl(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: IoctlFlags,
        cmd: u32,
        in_data: &[u8],
        out_size: u32,
        reply: ReplyIoctl,
    ) {
        if ino.0 != DEV {
            reply.error(Errno::ENOTTY);
            return;
        }
        match self.ioctl_dev(fh.0, cmd, in_data) {
            Ok(out) if out.len() <= out_size as usize => reply.ioctl(0, &out),
            Ok(_) => reply.error(Errno::EINVAL),
            Err(e) => reply.error(e),
        }
    }
}
