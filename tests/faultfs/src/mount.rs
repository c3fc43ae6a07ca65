//! Mounting an instance in this process.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use std::sync::mpsc;
use std::time::Duration;

use fuser::{Config, MountOption, SessionACL, SessionUnmounter};

use crate::fs::FaultFs;
use crate::mode::{now_ms, Controller, Mode};

/// What to mount where.
#[derive(Clone, Debug)]
pub struct MountOptions {
    /// Directory to mirror (the "NFS export"). Several instances may share it.
    pub backing: PathBuf,
    /// Empty directory to mount on.
    pub mountpoint: PathBuf,
    /// Instance name, for logs and `status` (e.g. the lab host it serves).
    pub name: String,
    /// Open files with `FOPEN_DIRECT_IO` (default): every read and write reaches the
    /// filesystem, so page-cache hits cannot hide a fault. Shared `mmap` still works on
    /// kernels with `FUSE_DIRECT_IO_ALLOW_MMAP` (6.6+).
    pub direct_io: bool,
    /// FUSE dispatch threads (`hang` parks requests, so even 1 never blocks). Default 2.
    pub threads: usize,
}

impl MountOptions {
    /// Defaults for `backing` → `mountpoint`: name from the mountpoint, direct I/O, 2 threads.
    pub fn new(backing: impl Into<PathBuf>, mountpoint: impl Into<PathBuf>) -> Self {
        let mountpoint = mountpoint.into();
        let name = mountpoint
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "faultfs".into());
        MountOptions {
            backing: backing.into(),
            mountpoint,
            name,
            direct_io: true,
            threads: 2,
        }
    }
}

/// A mounted instance. Dropping it fails pending requests (`eio`) and unmounts.
pub struct Mounted {
    unmounter: Option<SessionUnmounter>,
    /// Signals when the session loop has ended (the FUSE connection is gone).
    ended: mpsc::Receiver<io::Result<()>>,
    controller: Controller,
    mountpoint: PathBuf,
}

impl std::fmt::Debug for Mounted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mounted")
            .field("mountpoint", &self.mountpoint)
            .field("controller", &self.controller)
            .finish()
    }
}

/// How long `unmount` waits for the session threads after the unmount itself.
const JOIN_GRACE: Duration = Duration::from_secs(1);

/// Mounts `opts.backing` on `opts.mountpoint` (needs root, or a `fuse.conf` with
/// `user_allow_other`; falls back to `fusermount3` when `mount(2)` is not permitted), with
/// `allow_other`, without `default_permissions`, in mode `ok`. Returns once the kernel has
/// completed the FUSE handshake, i.e. the mount is usable.
pub fn mount(opts: &MountOptions) -> io::Result<Mounted> {
    if crate::cleanup::is_mounted(&opts.mountpoint)? {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!(
                "something is already mounted on {} (a dead faultfs? `vigil-faultfs cleanup --mountpoint {}`)",
                opts.mountpoint.display(),
                opts.mountpoint.display()
            ),
        ));
    }
    let mountpoint = opts.mountpoint.canonicalize()?;
    let controller = Controller::new(&opts.name);
    let fs = FaultFs::new(
        &opts.backing,
        Arc::clone(&controller.switch),
        opts.direct_io,
    )?;
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName(format!("vigil-faultfs:{}", opts.name)),
        // Kernel option (fuser only passes `Subtype` to fusermount): fstype `fuse.vigil-faultfs`.
        MountOption::CUSTOM("subtype=vigil-faultfs".into()),
        MountOption::RW,
    ];
    config.acl = SessionACL::All;
    config.n_threads = Some(opts.threads.max(1));
    let mut session = fuser::Session::new(fs, &mountpoint, &config)?;
    let unmounter = session.unmount_callable();
    let (done, ended) = mpsc::channel();
    std::thread::Builder::new()
        .name("faultfs-session".into())
        .spawn(move || {
            let _ = done.send(session.run());
        })?;
    eprintln!(
        "{} vigil-faultfs[{}]: mounted {} on {} (mode ok)",
        now_ms(),
        opts.name,
        opts.backing.display(),
        mountpoint.display()
    );
    Ok(Mounted {
        unmounter: Some(unmounter),
        ended,
        controller,
        mountpoint,
    })
}

impl Mounted {
    /// A handle to read and flip the mode (cloneable, usable from any thread).
    pub fn controller(&self) -> Controller {
        self.controller.clone()
    }

    /// Switches the mode; returns the previous one.
    pub fn set_mode(&self, mode: Mode) -> Mode {
        self.controller.set_mode(mode)
    }

    /// The current mode.
    pub fn mode(&self) -> Mode {
        self.controller.mode()
    }

    /// Where it is mounted (canonical path).
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// Fails every pending and future request (`eio`), then unmounts: a plain `umount(2)`
    /// first, a lazy detach (`MNT_DETACH`) when the mount is busy. After a lazy detach the
    /// remaining users are served `EIO` until they let go (or until this process exits,
    /// which aborts the connection). Returns whether the unmount had to be lazy.
    pub fn unmount(mut self) -> io::Result<bool> {
        self.unmount_inner()
    }

    fn unmount_inner(&mut self) -> io::Result<bool> {
        let Some(mut unmounter) = self.unmounter.take() else {
            return Ok(false);
        };
        if self.controller.mode() != Mode::Eio {
            self.controller.set_mode(Mode::Eio);
        }
        let lazy = match unmounter.unmount() {
            Ok(()) => false,
            Err(e) => {
                if !crate::cleanup::is_mounted(&self.mountpoint)? {
                    return Ok(false);
                }
                eprintln!(
                    "{} vigil-faultfs[{}]: umount {}: {e}; detaching lazily",
                    now_ms(),
                    self.controller.name(),
                    self.mountpoint.display()
                );
                nix::mount::umount2(&self.mountpoint, nix::mount::MntFlags::MNT_DETACH)
                    .map_err(io::Error::from)?;
                true
            }
        };
        // The session loop ends when the kernel drops the connection. A copy of the mount in
        // another mount namespace (or a lazy detach) keeps it alive: do not wait for that; the
        // connection is aborted when this process exits.
        if self.ended.recv_timeout(JOIN_GRACE).is_err() {
            eprintln!(
                "{} vigil-faultfs[{}]: connection still referenced (other mount namespaces or \
                 open files); its users get EIO until this process exits",
                now_ms(),
                self.controller.name()
            );
        }
        Ok(lazy)
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Err(e) = self.unmount_inner() {
            eprintln!(
                "{} vigil-faultfs[{}]: unmount on drop failed: {e}",
                now_ms(),
                self.controller.name()
            );
        }
    }
}
