//! The FUSE filesystem: a path-based passthrough to a backing directory, with every request
//! gated by the current [`Mode`].
//!
//! Gating: in `ok` the request runs at once; in `eio` it is answered with `EIO`; in `hang` the
//! request (with its `Reply*` object) is parked in the switch and re-gated when the mode leaves
//! `hang`, from the release thread. The FUSE dispatch threads are therefore never blocked by
//! `hang`, and the kernel simply sees no answer, as with a dead NFS server.
//!
//! Not gated (always served): `forget`, `release` and `releasedir` (nobody waits for them and they
//! free our file descriptors), and the operations we do not implement (xattrs, locks handled by
//! the kernel locally, `copy_file_range`): those answer `ENOSYS` once and the kernel stops asking.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs::{self, File, FileTimes, OpenOptions, Permissions};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, InitFlags, KernelConfig, LockOwner, OpenAccMode, OpenFlags, RenameFlags, ReplyAttr,
    ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen,
    ReplyStatfs, ReplyWrite, Request, TimeOrNow, WriteFlags,
};

use crate::mode::{Mode, Switch};

/// Attribute and entry TTL: zero, so that every `stat`/path walk reaches the filesystem and
/// sees the current mode (and changes made through other instances).
const TTL: Duration = Duration::ZERO;
/// Node ids handed out when a backing inode number cannot be used as the node id.
const SYNTH_BASE: u64 = 1 << 62;
const ROOT: u64 = 1;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn nix_errno(e: nix::errno::Errno) -> Errno {
    Errno::from_i32(e as i32)
}

fn io_errno(e: io::Error) -> Errno {
    Errno::from(e)
}

/// Replies that can carry an error: what `eio` needs.
pub(crate) trait FailReply: Send + 'static {
    fn fail(self, err: Errno);
}

macro_rules! fail_reply {
    ($($t:ty),* $(,)?) => {$(
        impl FailReply for $t {
            fn fail(self, err: Errno) {
                self.error(err);
            }
        }
    )*};
}
fail_reply!(
    ReplyEntry,
    ReplyAttr,
    ReplyData,
    ReplyEmpty,
    ReplyOpen,
    ReplyWrite,
    ReplyDirectory,
    ReplyStatfs,
    ReplyCreate,
    ReplyLseek,
);

struct Node {
    path: PathBuf,
    key: (u64, u64),
    lookups: u64,
}

struct Inodes {
    nodes: HashMap<u64, Node>,
    by_key: HashMap<(u64, u64), u64>,
    next_synth: u64,
}

impl Inodes {
    fn path(&self, ino: u64) -> Result<PathBuf, Errno> {
        self.nodes
            .get(&ino)
            .map(|n| n.path.clone())
            .ok_or(Errno::ESTALE)
    }

    /// Records one kernel lookup of `path` and returns its node id: the backing inode number
    /// when it is free (so `st_ino` matches across instances), else a synthetic one.
    fn remember(&mut self, path: PathBuf, md: &fs::Metadata) -> u64 {
        let key = (md.dev(), md.ino());
        if let Some(&id) = self.by_key.get(&key) {
            if let Some(node) = self.nodes.get_mut(&id) {
                node.path = path;
                node.lookups = node.lookups.saturating_add(1);
                return id;
            }
        }
        let mut id = md.ino();
        if id <= ROOT || id >= SYNTH_BASE || self.nodes.contains_key(&id) {
            id = self.next_synth;
            self.next_synth += 1;
        }
        self.nodes.insert(
            id,
            Node {
                path,
                key,
                lookups: 1,
            },
        );
        self.by_key.insert(key, id);
        id
    }

    fn forget(&mut self, ino: u64, n: u64) {
        if ino == ROOT {
            return;
        }
        let remove = match self.nodes.get_mut(&ino) {
            Some(node) => {
                node.lookups = node.lookups.saturating_sub(n);
                node.lookups == 0
            }
            None => false,
        };
        if remove {
            if let Some(node) = self.nodes.remove(&ino) {
                if self.by_key.get(&node.key) == Some(&ino) {
                    self.by_key.remove(&node.key);
                }
            }
        }
    }

    /// Keeps cached paths right after a rename through this instance (`exchange`: both ways).
    fn renamed(&mut self, from: &Path, to: &Path, exchange: bool) {
        for node in self.nodes.values_mut() {
            if let Ok(rest) = node.path.strip_prefix(from) {
                node.path = if rest.as_os_str().is_empty() {
                    to.to_path_buf()
                } else {
                    to.join(rest)
                };
            } else if exchange {
                if let Ok(rest) = node.path.strip_prefix(to) {
                    node.path = if rest.as_os_str().is_empty() {
                        from.to_path_buf()
                    } else {
                        from.join(rest)
                    };
                }
            }
        }
    }

    /// Node id for a directory entry's `d_ino`, without taking a lookup reference.
    fn d_ino(&self, dev: u64, ino: u64) -> u64 {
        self.by_key.get(&(dev, ino)).copied().unwrap_or(ino)
    }
}

struct DirHandle {
    path: PathBuf,
    dev: u64,
    entries: Mutex<Vec<(u64, FileType, OsString)>>,
}

pub(crate) struct Core {
    switch: Arc<Switch>,
    root: PathBuf,
    direct_io: bool,
    inodes: Mutex<Inodes>,
    files: Mutex<HashMap<u64, Arc<File>>>,
    dirs: Mutex<HashMap<u64, Arc<DirHandle>>>,
    next_fh: AtomicU64,
}

/// The `fuser::Filesystem` implementation.
pub(crate) struct FaultFs {
    core: Arc<Core>,
}

impl FaultFs {
    pub(crate) fn new(root: &Path, switch: Arc<Switch>, direct_io: bool) -> io::Result<Self> {
        let root = root.canonicalize()?;
        let md = fs::metadata(&root)?;
        if !md.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("backing {} is not a directory", root.display()),
            ));
        }
        let key = (md.dev(), md.ino());
        let mut nodes = HashMap::new();
        nodes.insert(
            ROOT,
            Node {
                path: root.clone(),
                key,
                lookups: 1,
            },
        );
        let mut by_key = HashMap::new();
        by_key.insert(key, ROOT);
        Ok(FaultFs {
            core: Arc::new(Core {
                switch,
                root,
                direct_io,
                inodes: Mutex::new(Inodes {
                    nodes,
                    by_key,
                    next_synth: SYNTH_BASE,
                }),
                files: Mutex::new(HashMap::new()),
                dirs: Mutex::new(HashMap::new()),
                next_fh: AtomicU64::new(1),
            }),
        })
    }

    fn gate<R, F>(&self, reply: R, op: F)
    where
        R: FailReply,
        F: FnOnce(&Core, R) + Send + 'static,
    {
        gate(&self.core, reply, op);
    }
}

/// Runs `op` now (`ok`), fails it (`eio`) or parks it until the mode leaves `hang`.
fn gate<R, F>(core: &Arc<Core>, reply: R, op: F)
where
    R: FailReply,
    F: FnOnce(&Core, R) + Send + 'static,
{
    let mut st = core.switch.lock();
    match st.mode {
        Mode::Ok => {
            drop(st);
            op(core, reply);
        }
        Mode::Eio => {
            drop(st);
            core.switch.eio_replies.fetch_add(1, Ordering::Relaxed);
            reply.fail(Errno::EIO);
        }
        Mode::Hang => {
            core.switch.parked_total.fetch_add(1, Ordering::Relaxed);
            let again = Arc::clone(core);
            st.parked.push(Box::new(move || gate(&again, reply, op)));
        }
    }
}

fn time(sec: i64, nsec: i64) -> SystemTime {
    let nsec = u32::try_from(nsec.clamp(0, 999_999_999)).unwrap_or(0);
    if sec >= 0 {
        UNIX_EPOCH + Duration::new(sec.unsigned_abs(), nsec)
    } else {
        UNIX_EPOCH - Duration::from_secs(sec.unsigned_abs()) + Duration::from_nanos(nsec.into())
    }
}

/// Linux `new_encode_dev`: the 32-bit device encoding FUSE carries in `rdev`.
fn encode_dev(dev: u64) -> u32 {
    let major = nix::sys::stat::major(dev);
    let minor = nix::sys::stat::minor(dev);
    u32::try_from((minor & 0xff) | (major << 8) | ((minor & !0xff) << 12)).unwrap_or(0)
}

fn decode_dev(rdev: u32) -> libc::dev_t {
    let rdev = u64::from(rdev);
    let major = (rdev & 0xfff00) >> 8;
    let minor = (rdev & 0xff) | ((rdev >> 12) & 0xfff00);
    nix::sys::stat::makedev(major, minor)
}

fn attr_of(ino: u64, md: &fs::Metadata) -> FileAttr {
    FileAttr {
        ino: INodeNo(ino),
        size: md.size(),
        blocks: md.blocks(),
        atime: time(md.atime(), md.atime_nsec()),
        mtime: time(md.mtime(), md.mtime_nsec()),
        ctime: time(md.ctime(), md.ctime_nsec()),
        crtime: time(md.ctime(), md.ctime_nsec()),
        kind: FileType::from_std(md.file_type()).unwrap_or(FileType::RegularFile),
        perm: u16::try_from(md.mode() & 0o7777).unwrap_or(0),
        nlink: u32::try_from(md.nlink()).unwrap_or(u32::MAX),
        uid: md.uid(),
        gid: md.gid(),
        rdev: encode_dev(md.rdev()),
        blksize: u32::try_from(md.blksize()).unwrap_or(4096),
        flags: 0,
    }
}

/// Flags we never pass to the backing `open`: the access mode (set separately), creation
/// flags handled by FUSE itself, and `O_DIRECT` (our buffers are not aligned).
fn backing_flags(flags: i32, keep_trunc: bool) -> i32 {
    let mut strip =
        libc::O_ACCMODE | libc::O_CREAT | libc::O_EXCL | libc::O_NOCTTY | libc::O_DIRECT;
    if !keep_trunc {
        strip |= libc::O_TRUNC;
    }
    flags & !strip
}

fn open_options(flags: i32) -> OpenOptions {
    let mut oo = OpenOptions::new();
    match OpenFlags(flags).acc_mode() {
        OpenAccMode::O_RDONLY => oo.read(true),
        OpenAccMode::O_WRONLY => oo.write(true),
        OpenAccMode::O_RDWR => oo.read(true).write(true),
    };
    oo
}

impl Core {
    fn path(&self, ino: INodeNo) -> Result<PathBuf, Errno> {
        lock(&self.inodes).path(ino.0)
    }

    fn child(&self, parent: INodeNo, name: &OsStr) -> Result<PathBuf, Errno> {
        let dir = self.path(parent)?;
        if name == "." {
            return Ok(dir);
        }
        if name == ".." {
            if dir == self.root {
                return Ok(dir);
            }
            return Ok(dir.parent().map(Path::to_path_buf).unwrap_or(dir));
        }
        Ok(dir.join(name))
    }

    fn file(&self, fh: FileHandle) -> Result<Arc<File>, Errno> {
        lock(&self.files).get(&fh.0).cloned().ok_or(Errno::EBADF)
    }

    fn new_fh(&self) -> u64 {
        self.next_fh.fetch_add(1, Ordering::Relaxed)
    }

    /// Looks `path` up on the backing side and takes one kernel lookup reference.
    fn entry(&self, path: PathBuf) -> Result<FileAttr, Errno> {
        let md = fs::symlink_metadata(&path).map_err(io_errno)?;
        let ino = lock(&self.inodes).remember(path, &md);
        Ok(attr_of(ino, &md))
    }

    fn give_to(&self, path: &Path, req_uid: u32, req_gid: u32) {
        if req_uid != nix::unistd::geteuid().as_raw() || req_gid != nix::unistd::getegid().as_raw()
        {
            if let Err(e) = std::os::unix::fs::lchown(path, Some(req_uid), Some(req_gid)) {
                eprintln!(
                    "vigil-faultfs[{}]: chown {} to {req_uid}:{req_gid}: {e}",
                    self.switch.name,
                    path.display()
                );
            }
        }
    }

    fn getattr(&self, ino: INodeNo, fh: Option<FileHandle>) -> Result<FileAttr, Errno> {
        let md = match fh.map(|fh| self.file(fh)) {
            Some(Ok(file)) => file.metadata().map_err(io_errno)?,
            _ => fs::symlink_metadata(self.path(ino)?).map_err(io_errno)?,
        };
        Ok(attr_of(ino.0, &md))
    }

    #[allow(clippy::too_many_arguments)]
    fn setattr(
        &self,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        fh: Option<FileHandle>,
    ) -> Result<FileAttr, Errno> {
        let path = self.path(ino)?;
        let open = fh.and_then(|fh| self.file(fh).ok());
        if let Some(mode) = mode {
            fs::set_permissions(&path, Permissions::from_mode(mode & 0o7777)).map_err(io_errno)?;
        }
        if uid.is_some() || gid.is_some() {
            std::os::unix::fs::lchown(&path, uid, gid).map_err(io_errno)?;
        }
        if let Some(size) = size {
            match &open {
                Some(file) => file.set_len(size).map_err(io_errno)?,
                None => OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .and_then(|f| f.set_len(size))
                    .map_err(io_errno)?,
            }
        }
        if atime.is_some() || mtime.is_some() {
            let resolve = |t: TimeOrNow| match t {
                TimeOrNow::SpecificTime(t) => t,
                TimeOrNow::Now => SystemTime::now(),
            };
            let mut times = FileTimes::new();
            if let Some(t) = atime {
                times = times.set_accessed(resolve(t));
            }
            if let Some(t) = mtime {
                times = times.set_modified(resolve(t));
            }
            let is_link = fs::symlink_metadata(&path)
                .map(|m| m.file_type().is_symlink())
                .unwrap_or(false);
            if !is_link {
                match &open {
                    Some(file) => file.set_times(times).map_err(io_errno)?,
                    None => File::open(&path)
                        .and_then(|f| f.set_times(times))
                        .map_err(io_errno)?,
                }
            }
        }
        self.getattr(ino, fh)
    }

    fn read(&self, fh: FileHandle, offset: u64, size: u32) -> Result<Vec<u8>, Errno> {
        let file = self.file(fh)?;
        let mut buf = vec![0u8; size as usize];
        let mut done = 0;
        while done < buf.len() {
            match file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io_errno(e)),
            }
        }
        buf.truncate(done);
        Ok(buf)
    }

    fn read_dir(&self, path: &Path, dev: u64) -> Result<Vec<(u64, FileType, OsString)>, Errno> {
        use std::os::unix::fs::DirEntryExt;
        let mut out = Vec::new();
        let own = fs::symlink_metadata(path).map_err(io_errno)?;
        let parent = path
            .parent()
            .filter(|_| path != self.root)
            .and_then(|p| fs::symlink_metadata(p).ok())
            .map(|m| m.ino())
            .unwrap_or(own.ino());
        {
            let inodes = lock(&self.inodes);
            out.push((
                inodes.d_ino(dev, own.ino()),
                FileType::Directory,
                ".".into(),
            ));
            out.push((inodes.d_ino(dev, parent), FileType::Directory, "..".into()));
        }
        let mut children = Vec::new();
        for ent in fs::read_dir(path).map_err(io_errno)? {
            let ent = ent.map_err(io_errno)?;
            let kind = ent
                .file_type()
                .ok()
                .and_then(FileType::from_std)
                .unwrap_or(FileType::RegularFile);
            children.push((ent.ino(), kind, ent.file_name()));
        }
        let inodes = lock(&self.inodes);
        out.extend(
            children
                .into_iter()
                .map(|(ino, kind, name)| (inodes.d_ino(dev, ino), kind, name)),
        );
        Ok(out)
    }

    fn opendir(&self, ino: INodeNo) -> Result<u64, Errno> {
        let path = self.path(ino)?;
        let dev = fs::symlink_metadata(&path).map_err(io_errno)?.dev();
        let entries = self.read_dir(&path, dev)?;
        let fh = self.new_fh();
        lock(&self.dirs).insert(
            fh,
            Arc::new(DirHandle {
                path,
                dev,
                entries: Mutex::new(entries),
            }),
        );
        Ok(fh)
    }

    fn readdir(&self, fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let Some(dir) = lock(&self.dirs).get(&fh.0).cloned() else {
            reply.error(Errno::EBADF);
            return;
        };
        if offset == 0 {
            // rewinddir(): take a fresh snapshot.
            match self.read_dir(&dir.path, dir.dev) {
                Ok(fresh) => *lock(&dir.entries) = fresh,
                Err(e) => {
                    reply.error(e);
                    return;
                }
            }
        }
        let entries = lock(&dir.entries);
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(*ino), (i + 1) as u64, *kind, name) {
                break;
            }
        }
        drop(entries);
        reply.ok();
    }

    #[allow(clippy::too_many_arguments)]
    fn create(
        &self,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        uid: u32,
        gid: u32,
    ) -> Result<(FileAttr, u64), Errno> {
        let path = self.child(parent, name)?;
        let mut oo = open_options(flags);
        if flags & libc::O_EXCL != 0 {
            oo.create_new(true);
        } else {
            oo.create(true);
        }
        oo.mode(mode & !umask & 0o7777)
            .custom_flags(backing_flags(flags, true));
        let file = oo.open(&path).map_err(io_errno)?;
        self.give_to(&path, uid, gid);
        let attr = self.entry(path)?;
        let fh = self.new_fh();
        lock(&self.files).insert(fh, Arc::new(file));
        Ok((attr, fh))
    }

    fn open_flags(&self) -> FopenFlags {
        if self.direct_io {
            FopenFlags::FOPEN_DIRECT_IO
        } else {
            FopenFlags::empty()
        }
    }
}

fn reply_entry(reply: ReplyEntry, res: Result<FileAttr, Errno>) {
    match res {
        Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
        Err(e) => reply.error(e),
    }
}

fn reply_attr(reply: ReplyAttr, res: Result<FileAttr, Errno>) {
    match res {
        Ok(attr) => reply.attr(&TTL, &attr),
        Err(e) => reply.error(e),
    }
}

fn reply_empty(reply: ReplyEmpty, res: Result<(), Errno>) {
    match res {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(e),
    }
}

impl Filesystem for FaultFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        // Shared mmap stays possible on direct-I/O files where the kernel supports it.
        let _ = config.add_capabilities(InitFlags::FUSE_DIRECT_IO_ALLOW_MMAP);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let name = name.to_os_string();
        self.gate(reply, move |core, reply| {
            reply_entry(reply, core.child(parent, &name).and_then(|p| core.entry(p)));
        });
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        lock(&self.core.inodes).forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        self.gate(reply, move |core, reply| {
            reply_attr(reply, core.getattr(ino, fh))
        });
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        self.gate(reply, move |core, reply| {
            reply_attr(
                reply,
                core.setattr(ino, mode, uid, gid, size, atime, mtime, fh),
            );
        });
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        self.gate(reply, move |core, reply| {
            match core
                .path(ino)
                .and_then(|p| fs::read_link(p).map_err(io_errno))
            {
                Ok(target) => reply.data(target.as_os_str().as_bytes()),
                Err(e) => reply.error(e),
            }
        });
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let name = name.to_os_string();
        let (uid, gid) = (req.uid(), req.gid());
        self.gate(reply, move |core, reply| {
            let res = core.child(parent, &name).and_then(|path| {
                let kind = nix::sys::stat::SFlag::from_bits_truncate(mode & libc::S_IFMT);
                let perm = nix::sys::stat::Mode::from_bits_truncate(mode & !umask & 0o7777);
                if kind == nix::sys::stat::SFlag::S_IFREG || kind.is_empty() {
                    OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .mode(perm.bits())
                        .open(&path)
                        .map_err(io_errno)?;
                } else {
                    nix::sys::stat::mknod(&path, kind, perm, decode_dev(rdev))
                        .map_err(nix_errno)?;
                }
                core.give_to(&path, uid, gid);
                core.entry(path)
            });
            reply_entry(reply, res);
        });
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let name = name.to_os_string();
        let (uid, gid) = (req.uid(), req.gid());
        self.gate(reply, move |core, reply| {
            let res = core.child(parent, &name).and_then(|path| {
                fs::DirBuilder::new()
                    .mode(mode & !umask & 0o7777)
                    .create(&path)
                    .map_err(io_errno)?;
                core.give_to(&path, uid, gid);
                core.entry(path)
            });
            reply_entry(reply, res);
        });
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let name = name.to_os_string();
        self.gate(reply, move |core, reply| {
            let res = core
                .child(parent, &name)
                .and_then(|p| fs::remove_file(p).map_err(io_errno));
            reply_empty(reply, res);
        });
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let name = name.to_os_string();
        self.gate(reply, move |core, reply| {
            let res = core
                .child(parent, &name)
                .and_then(|p| fs::remove_dir(p).map_err(io_errno));
            reply_empty(reply, res);
        });
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let name = link_name.to_os_string();
        let target = target.to_path_buf();
        let (uid, gid) = (req.uid(), req.gid());
        self.gate(reply, move |core, reply| {
            let res = core.child(parent, &name).and_then(|path| {
                std::os::unix::fs::symlink(&target, &path).map_err(io_errno)?;
                core.give_to(&path, uid, gid);
                core.entry(path)
            });
            reply_entry(reply, res);
        });
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let name = name.to_os_string();
        let newname = newname.to_os_string();
        self.gate(reply, move |core, reply| {
            let res = (|| {
                let from = core.child(parent, &name)?;
                let to = core.child(newparent, &newname)?;
                if flags.is_empty() {
                    fs::rename(&from, &to).map_err(io_errno)?;
                } else {
                    nix::fcntl::renameat2(
                        nix::fcntl::AT_FDCWD,
                        &from,
                        nix::fcntl::AT_FDCWD,
                        &to,
                        nix::fcntl::RenameFlags::from_bits_truncate(flags.bits()),
                    )
                    .map_err(nix_errno)?;
                }
                let exchange = flags.contains(RenameFlags::RENAME_EXCHANGE);
                lock(&core.inodes).renamed(&from, &to, exchange);
                Ok(())
            })();
            reply_empty(reply, res);
        });
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let newname = newname.to_os_string();
        self.gate(reply, move |core, reply| {
            let res = (|| {
                let from = core.path(ino)?;
                let to = core.child(newparent, &newname)?;
                fs::hard_link(&from, &to).map_err(io_errno)?;
                core.entry(to)
            })();
            reply_entry(reply, res);
        });
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        self.gate(reply, move |core, reply| {
            let res = core.path(ino).and_then(|path| {
                let mut oo = open_options(flags.0);
                oo.custom_flags(backing_flags(flags.0, false));
                oo.open(path).map_err(io_errno)
            });
            match res {
                Ok(file) => {
                    let fh = core.new_fh();
                    lock(&core.files).insert(fh, Arc::new(file));
                    reply.opened(FileHandle(fh), core.open_flags());
                }
                Err(e) => reply.error(e),
            }
        });
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        self.gate(reply, move |core, reply| {
            match core.read(fh, offset, size) {
                Ok(buf) => reply.data(&buf),
                Err(e) => reply.error(e),
            }
        });
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let data = data.to_vec();
        self.gate(reply, move |core, reply| {
            let res = core
                .file(fh)
                .and_then(|f| f.write_all_at(&data, offset).map_err(io_errno));
            match res {
                Ok(()) => reply.written(u32::try_from(data.len()).unwrap_or(u32::MAX)),
                Err(e) => reply.error(e),
            }
        });
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        self.gate(reply, move |core, reply| {
            reply_empty(reply, core.file(fh).map(drop));
        });
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        lock(&self.core.files).remove(&fh.0);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.gate(reply, move |core, reply| {
            let res = core.file(fh).and_then(|f| {
                if datasync {
                    f.sync_data().map_err(io_errno)
                } else {
                    f.sync_all().map_err(io_errno)
                }
            });
            reply_empty(reply, res);
        });
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        self.gate(reply, move |core, reply| match core.opendir(ino) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(e),
        });
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        reply: ReplyDirectory,
    ) {
        self.gate(reply, move |core, reply| core.readdir(fh, offset, reply));
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        lock(&self.core.dirs).remove(&fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.gate(reply, move |core, reply| {
            let res = core
                .path(ino)
                .and_then(|p| File::open(p).and_then(|d| d.sync_all()).map_err(io_errno));
            reply_empty(reply, res);
        });
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        self.gate(reply, move |core, reply| {
            match nix::sys::statvfs::statvfs(&core.root) {
                Ok(s) => reply.statfs(
                    s.blocks(),
                    s.blocks_free(),
                    s.blocks_available(),
                    s.files(),
                    s.files_free(),
                    u32::try_from(s.block_size()).unwrap_or(4096),
                    u32::try_from(s.name_max()).unwrap_or(255),
                    u32::try_from(s.fragment_size()).unwrap_or(4096),
                ),
                Err(e) => reply.error(nix_errno(e)),
            }
        });
    }

    fn access(&self, _req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        self.gate(reply, move |core, reply| {
            let res = core.path(ino).and_then(|p| {
                let flags = nix::unistd::AccessFlags::from_bits_truncate(mask.bits());
                nix::unistd::access(&p, flags).map_err(nix_errno)
            });
            reply_empty(reply, res);
        });
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let name = name.to_os_string();
        let (uid, gid) = (req.uid(), req.gid());
        self.gate(reply, move |core, reply| {
            match core.create(parent, &name, mode, umask, flags, uid, gid) {
                Ok((attr, fh)) => reply.created(
                    &TTL,
                    &attr,
                    Generation(0),
                    FileHandle(fh),
                    core.open_flags(),
                ),
                Err(e) => reply.error(e),
            }
        });
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        self.gate(reply, move |core, reply| {
            let res = core.file(fh).and_then(|f| {
                let offset = i64::try_from(offset).map_err(|_| Errno::EINVAL)?;
                let length = i64::try_from(length).map_err(|_| Errno::EINVAL)?;
                nix::fcntl::fallocate(
                    &*f,
                    nix::fcntl::FallocateFlags::from_bits_truncate(mode),
                    offset,
                    length,
                )
                .map_err(nix_errno)
            });
            reply_empty(reply, res);
        });
    }

    fn lseek(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        self.gate(reply, move |core, reply| {
            use nix::unistd::Whence;
            let whence = match whence {
                libc::SEEK_SET => Whence::SeekSet,
                libc::SEEK_CUR => Whence::SeekCur,
                libc::SEEK_END => Whence::SeekEnd,
                libc::SEEK_DATA => Whence::SeekData,
                libc::SEEK_HOLE => Whence::SeekHole,
                _ => {
                    reply.error(Errno::EINVAL);
                    return;
                }
            };
            match core
                .file(fh)
                .and_then(|f| nix::unistd::lseek(&*f, offset, whence).map_err(nix_errno))
            {
                Ok(off) => reply.offset(off),
                Err(e) => reply.error(e),
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_encoding_round_trips() {
        for (ma, mi) in [(0u64, 0u64), (8, 1), (259, 3), (4095, 1_048_575)] {
            let dev = nix::sys::stat::makedev(ma, mi);
            assert_eq!(decode_dev(encode_dev(dev)), dev, "{ma}:{mi}");
        }
    }

    #[test]
    fn renamed_moves_descendants() {
        let mut inodes = Inodes {
            nodes: HashMap::new(),
            by_key: HashMap::new(),
            next_synth: SYNTH_BASE,
        };
        for (id, p) in [(2, "/b/a"), (3, "/b/a/x"), (4, "/b/ab"), (5, "/b/c")] {
            inodes.nodes.insert(
                id,
                Node {
                    path: p.into(),
                    key: (0, id),
                    lookups: 1,
                },
            );
        }
        inodes.renamed(Path::new("/b/a"), Path::new("/b/c"), true);
        let path = |id| inodes.path(id).ok();
        assert_eq!(path(2), Some("/b/c".into()));
        assert_eq!(path(3), Some("/b/c/x".into()));
        assert_eq!(path(4), Some("/b/ab".into()));
        assert_eq!(path(5), Some("/b/a".into()));
    }

    #[test]
    fn times_before_epoch() {
        assert_eq!(
            time(-1, 500_000_000),
            UNIX_EPOCH - Duration::from_millis(500)
        );
        assert_eq!(time(1, 0), UNIX_EPOCH + Duration::from_secs(1));
    }
}
