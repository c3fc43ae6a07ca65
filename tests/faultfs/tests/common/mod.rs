//! Shared fixture for the real-mount tests: temp dirs, servers as children, bounded waits.
#![allow(dead_code)]

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tempfile::TempDir;
use vigil_faultfs::{ServerOptions, ServerProcess};

pub const BIN: &str = env!("CARGO_BIN_EXE_vigil-faultfs");

/// One mounted instance ("lab host").
pub struct Host {
    pub server: ServerProcess,
    pub mnt: PathBuf,
    pub sock: PathBuf,
    pub log: PathBuf,
}

/// A backing dir and `n` instances mounting it. Drop: every server gets `ok`, `SIGTERM`,
/// `SIGKILL` if needed, is reaped, and its mountpoint cleaned; the temp dir is only removed
/// when nothing is mounted below it (never recurse into a live mount).
pub struct Lab {
    pub hosts: Vec<Host>,
    pub backing: PathBuf,
    pub root: PathBuf,
    /// `root` is bind-mounted on itself with shared propagation (see [`Lab::new_shared`]).
    shared: bool,
    tmp: Option<TempDir>,
}

impl Lab {
    pub fn new(n: usize) -> Lab {
        Lab::build(n, false)
    }

    /// Like `new`, but the lab root is first made a shared mount (bind-mounted on itself,
    /// `--make-shared`): faultfs mounts below it then propagate into mount namespaces created
    /// with slave propagation, in both directions of time (mounted later, unmounted later).
    pub fn new_shared(n: usize) -> Lab {
        Lab::build(n, true)
    }

    fn build(n: usize, shared: bool) -> Lab {
        assert!(
            nix::unistd::geteuid().is_root() && Path::new("/dev/fuse").exists(),
            "these tests mount FUSE filesystems: run them as root on a machine with /dev/fuse \
             (scripts/setup.sh installs fuse3)"
        );
        let tmp = tempfile::Builder::new()
            .prefix("faultfs-test-")
            .tempdir()
            .expect("tempdir");
        let root = tmp.path().canonicalize().expect("canonicalize");
        let backing = root.join("backing");
        std::fs::create_dir(&backing).expect("mkdir backing");
        let mut lab = Lab {
            hosts: Vec::new(),
            backing,
            root,
            shared: false,
            tmp: Some(tmp),
        };
        if shared {
            use nix::mount::{mount, MsFlags};
            mount(
                Some(&lab.root),
                &lab.root,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .expect("bind lab root");
            lab.shared = true;
            mount(
                None::<&str>,
                &lab.root,
                None::<&str>,
                MsFlags::MS_SHARED,
                None::<&str>,
            )
            .expect("make lab root shared");
        }
        for i in 0..n {
            lab.add_host(&format!("h{i}"));
        }
        lab
    }

    pub fn add_host(&mut self, name: &str) -> &Host {
        let mnt = self.root.join(format!("mnt-{name}"));
        std::fs::create_dir(&mnt).expect("mkdir mnt");
        let sock = self.root.join(format!("{name}.sock"));
        let log = self.root.join(format!("{name}.log"));
        let mut opts = ServerOptions::new(&self.backing, &mnt, &sock);
        opts.name = Some(name.to_owned());
        opts.log = Some(log.clone());
        let server = ServerProcess::spawn(Path::new(BIN), &opts).expect("start vigil-faultfs");
        self.hosts.push(Host {
            server,
            mnt,
            sock,
            log,
        });
        self.hosts.last().expect("just pushed")
    }

    pub fn h(&self, i: usize) -> &Host {
        &self.hosts[i]
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let panicking = std::thread::panicking();
        let mut still_mounted = false;
        for host in self.hosts.drain(..) {
            let Host {
                server, mnt, log, ..
            } = host;
            drop(server);
            if panicking {
                eprintln!(
                    "--- {} ---\n{}",
                    log.display(),
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            if vigil_faultfs::is_mounted(&mnt).unwrap_or(true) {
                eprintln!("{} is still mounted after teardown", mnt.display());
                still_mounted = true;
            }
        }
        if self.shared && !still_mounted {
            if let Err(e) = nix::mount::umount2(&self.root, nix::mount::MntFlags::MNT_DETACH) {
                eprintln!("unmounting the lab root bind: {e}");
                still_mounted = true;
            }
        }
        if let Some(tmp) = self.tmp.take() {
            if still_mounted {
                let kept = tmp.keep();
                eprintln!("leaving {} behind (mounted)", kept.display());
            }
        }
        if still_mounted && !panicking {
            panic!("a mount survived teardown");
        }
    }
}

/// Runs `f` on a thread; `None` if it has not finished after `timeout` (the thread is left
/// running: it unblocks when the fixture releases the mount).
pub fn within<T: Send + 'static>(
    timeout: Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> Option<T> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(timeout).ok()
}

/// A blocking call started on a thread, to be observed later.
pub struct Pending<T> {
    rx: mpsc::Receiver<(T, Instant)>,
}

pub fn start<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Pending<T> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let v = f();
        let _ = tx.send((v, Instant::now()));
    });
    Pending { rx }
}

impl<T> Pending<T> {
    /// The result and when it arrived, if it does within `timeout`.
    pub fn wait(&self, timeout: Duration) -> Option<(T, Instant)> {
        self.rx.recv_timeout(timeout).ok()
    }
}

pub fn errno<T: std::fmt::Debug>(res: io::Result<T>) -> i32 {
    match res {
        Ok(v) => panic!("expected an error, got Ok({v:?})"),
        Err(e) => e.raw_os_error().unwrap_or(-1),
    }
}

/// Runs a command with its output in files under `dir`, killed (by PID) after `timeout`.
pub fn run(dir: &Path, timeout: Duration, cmd: &mut Command) -> (ExitStatus, String) {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let out_path = dir.join(format!("cmd-{n}.out"));
    let out = File::create(&out_path).expect("create out");
    let err = out.try_clone().expect("clone out");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(st) = child.try_wait().expect("try_wait") {
            break st;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let text = std::fs::read_to_string(&out_path).unwrap_or_default();
    (status, text)
}

pub fn proc_mounts_mention(path: &Path) -> bool {
    std::fs::read_to_string("/proc/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(1) == Some(&*path.to_string_lossy()))
}

/// A shell in a new mount namespace (`unshare --mount ARGS`), running one command line at a
/// time. Dropping it closes its stdin and reaps it (killed after 10 s).
pub struct NsShell {
    child: std::process::Child,
    stdin: Option<std::process::ChildStdin>,
    rx: mpsc::Receiver<String>,
}

impl NsShell {
    pub fn spawn(unshare_args: &[&str]) -> NsShell {
        use std::io::BufRead;
        let script = "while IFS= read -r line; do eval \"$line\" 2>&1; echo __done; done";
        let mut child = Command::new("unshare")
            .arg("--mount")
            .args(unshare_args)
            .args(["sh", "-c", script])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("unshare");
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in io::BufReader::new(stdout).lines() {
                if tx.send(line.unwrap_or_default()).is_err() {
                    break;
                }
            }
        });
        NsShell { child, stdin, rx }
    }

    /// Runs `line` in the namespace and returns its output (stdout and stderr), bounded to 10 s.
    pub fn ask(&mut self, line: &str) -> String {
        use std::io::Write;
        let stdin = self.stdin.as_mut().expect("stdin open");
        stdin
            .write_all(format!("{line}\n").as_bytes())
            .expect("write to namespace shell");
        stdin.flush().expect("flush");
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut out = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(l) if l == "__done" => return out.join("\n"),
                Ok(l) => out.push(l),
                Err(_) => panic!("namespace shell did not answer {line:?} in time: {out:?}"),
            }
        }
    }
}

impl Drop for NsShell {
    fn drop(&mut self) {
        self.stdin.take();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) => return,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                _ => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    return;
                }
            }
        }
    }
}
