//! Running the `vigil-faultfs mount` binary as a child process and driving it.
//!
//! [`ServerProcess`] keeps the server as a direct child (PID 1 on the lab machines does not
//! reap orphans) and guarantees on `Drop`: hung requests released (`ok`), `SIGTERM` (the server
//! then fails fast with `eio` and unmounts), `SIGKILL` after a grace period, the child reaped,
//! and [`cleanup()`](crate::cleanup()) of whatever is still mounted.

use std::ffi::OsString;
use std::fs::OpenOptions;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::control::{self, Status};
use crate::mode::Mode;

/// How to start a server.
#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// Backing directory.
    pub backing: PathBuf,
    /// Mountpoint (must exist).
    pub mountpoint: PathBuf,
    /// Control socket path.
    pub control: PathBuf,
    /// Instance name (`--name`).
    pub name: Option<String>,
    /// File that receives the server's stderr (appended); `None` inherits stderr.
    pub log: Option<PathBuf>,
    /// Further arguments for `vigil-faultfs mount` (e.g. `--page-cache`).
    pub extra_args: Vec<OsString>,
    /// How long to wait for the mount and control socket to come up.
    pub ready_timeout: Duration,
}

impl ServerOptions {
    /// Options with the given paths, no name, stderr inherited, 10 s to come up.
    pub fn new(
        backing: impl Into<PathBuf>,
        mountpoint: impl Into<PathBuf>,
        control: impl Into<PathBuf>,
    ) -> Self {
        ServerOptions {
            backing: backing.into(),
            mountpoint: mountpoint.into(),
            control: control.into(),
            name: None,
            log: None,
            extra_args: Vec::new(),
            ready_timeout: Duration::from_secs(10),
        }
    }
}

/// Control-socket timeout used by the convenience methods.
const CTL_TIMEOUT: Duration = Duration::from_secs(5);

/// A `vigil-faultfs mount` child process.
#[derive(Debug)]
pub struct ServerProcess {
    child: Option<Child>,
    pid: u32,
    control: PathBuf,
    mountpoint: PathBuf,
    log: Option<PathBuf>,
}

fn wait_deadline(child: &mut Child, timeout: Duration) -> io::Result<Option<ExitStatus>> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(st) = child.try_wait()? {
            return Ok(Some(st));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

impl ServerProcess {
    /// Starts `bin mount ...` and waits until the mount is listed in mountinfo and the control
    /// socket answers `status`. On failure the child is killed and reaped and the error names
    /// the tail of its log.
    pub fn spawn(bin: &Path, opts: &ServerOptions) -> io::Result<ServerProcess> {
        let mut cmd = Command::new(bin);
        cmd.arg("mount")
            .arg("--backing")
            .arg(&opts.backing)
            .arg("--mountpoint")
            .arg(&opts.mountpoint)
            .arg("--control")
            .arg(&opts.control);
        if let Some(name) = &opts.name {
            cmd.arg("--name").arg(name);
        }
        cmd.args(&opts.extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        match &opts.log {
            Some(log) => {
                let f = OpenOptions::new().create(true).append(true).open(log)?;
                cmd.stderr(f);
            }
            None => {
                cmd.stderr(Stdio::inherit());
            }
        }
        let child = cmd.spawn()?;
        let mut server = ServerProcess {
            pid: child.id(),
            child: Some(child),
            control: opts.control.clone(),
            mountpoint: opts.mountpoint.clone(),
            log: opts.log.clone(),
        };
        let deadline = Instant::now() + opts.ready_timeout;
        loop {
            if let Some(child) = server.child.as_mut() {
                if let Some(st) = child.try_wait()? {
                    server.child = None;
                    return Err(io::Error::other(format!(
                        "vigil-faultfs mount exited early ({st}){}",
                        server.log_tail()
                    )));
                }
            }
            let mounted = crate::cleanup::is_mounted(&opts.mountpoint).unwrap_or(false);
            if mounted && control::status(&opts.control, Duration::from_secs(1)).is_ok() {
                return Ok(server);
            }
            if Instant::now() >= deadline {
                let tail = server.log_tail();
                drop(server);
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("vigil-faultfs mount not ready in time{tail}"),
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log_tail(&self) -> String {
        let Some(log) = &self.log else {
            return String::new();
        };
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        format!(
            "; log {}: {}",
            log.display(),
            lines[lines.len().saturating_sub(5)..].join(" | ")
        )
    }

    /// The child's PID.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The control socket.
    pub fn control(&self) -> &Path {
        &self.control
    }

    /// The mountpoint.
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// Switches the server's mode over the control socket.
    pub fn set_mode(&self, mode: Mode) -> io::Result<Status> {
        control::set_mode(&self.control, mode, CTL_TIMEOUT)
    }

    /// Reads the server's status over the control socket.
    pub fn status(&self) -> io::Result<Status> {
        control::status(&self.control, CTL_TIMEOUT)
    }

    fn signal(&self, sig: Signal) -> io::Result<()> {
        let pid = i32::try_from(self.pid).map_err(io::Error::other)?;
        kill(Pid::from_raw(pid), sig).map_err(io::Error::from)
    }

    /// Graceful stop: `SIGTERM`, then waits up to `timeout` for the child to exit (it releases
    /// hung requests with `eio` and unmounts). Returns its exit status, or `None` if it did not
    /// exit in time (it is then still running; [`kill`](Self::kill) it).
    pub fn terminate(&mut self, timeout: Duration) -> io::Result<Option<ExitStatus>> {
        let Some(child) = self.child.as_mut() else {
            return Ok(None);
        };
        if let Some(st) = child.try_wait()? {
            self.child = None;
            return Ok(Some(st));
        }
        self.signal(Signal::SIGTERM)?;
        let st = match self.child.as_mut() {
            Some(child) => wait_deadline(child, timeout)?,
            None => None,
        };
        if st.is_some() {
            self.child = None;
        }
        Ok(st)
    }

    /// `SIGKILL` and reap, without any cleanup: the mount stays behind (dead, `ENOTCONN`) for
    /// [`cleanup()`](crate::cleanup()) to remove. Returns the exit status.
    pub fn kill(&mut self) -> io::Result<ExitStatus> {
        let Some(mut child) = self.child.take() else {
            return Err(io::Error::other("server already reaped"));
        };
        if let Some(st) = child.try_wait()? {
            return Ok(st);
        }
        child.kill()?;
        child.wait()
    }

    /// Whether the child is still running (not yet reaped).
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if self.is_running() {
            // Release anything hung before asking it to go, then insist.
            let _ = control::set_mode(&self.control, Mode::Ok, Duration::from_secs(1));
            match self.terminate(Duration::from_secs(5)) {
                Ok(Some(_)) => {}
                _ => {
                    let _ = self.kill();
                }
            }
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.wait();
        }
        if crate::cleanup::is_mounted(&self.mountpoint).unwrap_or(false) {
            if let Err(e) = crate::cleanup(&self.mountpoint) {
                eprintln!(
                    "vigil-faultfs: cleanup of {} failed: {e}",
                    self.mountpoint.display()
                );
            }
        }
    }
}
