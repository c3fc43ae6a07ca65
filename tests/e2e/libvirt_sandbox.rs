#![allow(dead_code)]
//! A private libvirtd for tests (included with `#[path = "../libvirt_sandbox.rs"] mod libvirt_sandbox;`).
//!
//! [`LibvirtSandbox::start`] runs `scripts/libvirt-sandbox.sh run DIR` as a child of the test
//! process: a virtlogd + libvirtd pair in a private mount namespace whose whole state lives in a
//! fresh temporary directory, reachable at `qemu+unix:///system?socket=DIR/run/libvirt/libvirt-sock`.
//! It needs no system libvirtd and leaves one alone. Dropping the sandbox (also when a test
//! panics) runs `libvirt-sandbox.sh stop DIR`, which destroys the domains and ends every process
//! of the sandbox; if the test process dies without dropping it, the script notices within about
//! a second that its parent is gone and stops the sandbox itself.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// How long `start` waits for libvirtd to answer (the script itself gives up after 180 s).
const START_TIMEOUT: Duration = Duration::from_secs(240);
/// How long `Drop` waits for the supervising script to exit after `stop`.
const EXIT_TIMEOUT: Duration = Duration::from_secs(30);

pub struct LibvirtSandbox {
    /// The sandbox's directory (its `run/`, `lib/`, `log/`, `cache/`, `etc/`, `pids`, `uri`).
    pub dir: PathBuf,
    /// `qemu+unix:///system?socket=DIR/run/libvirt/libvirt-sock`
    pub uri: String,
    runner: Option<Child>,
    tmp: Option<tempfile::TempDir>,
}

/// `scripts/libvirt-sandbox.sh` of this workspace.
pub fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/libvirt-sandbox.sh")
}

/// Finds a program on PATH or in the sbin directories (not always on a non-login PATH).
fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn effective_uid() -> Option<u32> {
    let status = fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

fn tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

impl LibvirtSandbox {
    /// Why a sandbox cannot run here, or `None` when it can.
    pub fn unavailable_reason() -> Option<String> {
        if effective_uid() != Some(0) {
            return Some("not root (a private libvirtd needs mount namespaces)".into());
        }
        for prog in [
            "libvirtd",
            "virtlogd",
            "virsh",
            "qemu-system-x86_64",
            "unshare",
            "perl",
        ] {
            if find_program(prog).is_none() {
                return Some(format!(
                    "{prog} is not installed (scripts/setup.sh installs it)"
                ));
            }
        }
        if !script().is_file() {
            return Some(format!("{} is missing", script().display()));
        }
        None
    }

    /// libvirtd and qemu-system-x86_64 are installed and we are root. Tests skip, with a printed
    /// reason, when this is false.
    pub fn available() -> bool {
        Self::unavailable_reason().is_none()
    }

    /// Starts a sandbox in a fresh temporary directory and waits until libvirtd answers.
    pub fn start() -> Result<LibvirtSandbox, String> {
        // The socket path DIR/run/libvirt/libvirt-sock must stay below 108 bytes.
        let mut base = std::env::temp_dir();
        if base.as_os_str().len() > 60 {
            base = PathBuf::from("/tmp");
        }
        let tmp = tempfile::Builder::new()
            .prefix("vigil-lv-")
            .tempdir_in(&base)
            .map_err(|e| format!("temporary directory in {}: {e}", base.display()))?;
        let dir = tmp.path().to_path_buf();
        let out_path = dir.join("runner.out");
        let err_path = dir.join("runner.err");
        let out = File::create(&out_path).map_err(|e| format!("{}: {e}", out_path.display()))?;
        let err = File::create(&err_path).map_err(|e| format!("{}: {e}", err_path.display()))?;
        let t0 = Instant::now();
        let runner = Command::new("bash")
            .arg(script())
            .arg("run")
            .arg(&dir)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("spawn {}: {e}", script().display()))?;
        let mut sb = LibvirtSandbox {
            dir,
            uri: String::new(),
            runner: Some(runner),
            tmp: Some(tmp),
        };
        loop {
            let uri = fs::read_to_string(sb.dir.join("uri")).unwrap_or_default();
            if !uri.trim().is_empty() {
                sb.uri = uri.trim().to_string();
                break;
            }
            let exited = match sb.runner.as_mut().map(|c| c.try_wait()) {
                Some(Ok(Some(status))) => Some(status.to_string()),
                Some(Err(e)) => Some(e.to_string()),
                _ => None,
            };
            if let Some(why) = exited {
                // Drop (which runs `stop`) cleans up whatever was started.
                return Err(format!(
                    "libvirt-sandbox.sh run {} failed ({why}):\n{}",
                    sb.dir.display(),
                    tail(&err_path, 120)
                ));
            }
            if t0.elapsed() > START_TIMEOUT {
                return Err(format!(
                    "libvirt-sandbox.sh run {} did not get ready within {START_TIMEOUT:?}:\n{}",
                    sb.dir.display(),
                    tail(&err_path, 120)
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        for line in fs::read_to_string(&err_path).unwrap_or_default().lines() {
            eprintln!("{line}");
        }
        Ok(sb)
    }

    /// A minimal diskless test domain (`type='qemu'`, 1 vCPU, serial console on a pty, no disk,
    /// network or graphics; destroyed on crash and power-off), from `libvirt-sandbox.sh domain-xml`.
    pub fn domain_xml(name: &str, mem_mib: u32) -> String {
        let out = Command::new("bash")
            .arg(script())
            .arg("domain-xml")
            .arg(name)
            .arg(mem_mib.to_string())
            .output()
            .expect("run libvirt-sandbox.sh domain-xml");
        assert!(
            out.status.success(),
            "libvirt-sandbox.sh domain-xml {name} {mem_mib}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `virsh -c URI ARGS...`, bounded to two minutes (exit status 124 on timeout).
    pub fn virsh(&self, args: &[&str]) -> Output {
        Command::new("timeout")
            .args(["--kill-after=5", "120", "virsh", "-c", &self.uri])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run virsh")
    }

    /// `virsh ARGS...` that must succeed; returns its trimmed stdout.
    pub fn virsh_ok(&self, args: &[&str]) -> String {
        let out = self.virsh(args);
        assert!(
            out.status.success(),
            "virsh {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// `virsh domstate --reason NAME`, e.g. "running (booted)" or "shut off (crashed)".
    pub fn domstate(&self, name: &str) -> String {
        let out = self.virsh(&["domstate", "--reason", name]);
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Polls `domstate --reason` every 50 ms until `pred` accepts it; the last state on timeout.
    pub fn wait_state(
        &self,
        name: &str,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Result<String, String> {
        let end = Instant::now() + timeout;
        loop {
            let state = self.domstate(name);
            if pred(&state) {
                return Ok(state);
            }
            if Instant::now() >= end {
                return Err(state);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The PID of a running domain's QEMU, from the pid file libvirt writes under the private
    /// /run/libvirt/qemu (DIR/run/libvirt/qemu/NAME.pid).
    pub fn qemu_pid(&self, domain_name: &str) -> Option<u32> {
        let path = self
            .dir
            .join("run/libvirt/qemu")
            .join(format!("{domain_name}.pid"));
        fs::read_to_string(path).ok()?.trim().parse().ok()
    }

    /// The processes the script recorded in DIR/pids: ("keeper"|"virtlogd"|"libvirtd", PID).
    pub fn recorded_pids(&self) -> Vec<(String, u32)> {
        fs::read_to_string(self.dir.join("pids"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let mut it = l.split_whitespace();
                let name = it.next()?.to_string();
                let pid = it.next()?.parse().ok()?;
                Some((name, pid))
            })
            .collect()
    }

    /// The PID of the supervising `libvirt-sandbox.sh run` (a child of this process).
    pub fn runner_pid(&self) -> Option<u32> {
        self.runner.as_ref().map(Child::id)
    }

    /// The tail of the private libvirtd log (for assertion messages).
    pub fn libvirtd_log_tail(&self, lines: usize) -> String {
        tail(&self.dir.join("log/libvirtd.log"), lines)
    }
}

/// Lines of /proc/mounts whose mount point is DIR or below it.
pub fn mounts_under(dir: &Path) -> Vec<String> {
    let d = dir.to_string_lossy().into_owned();
    fs::read_to_string("/proc/mounts")
        .unwrap_or_default()
        .lines()
        .filter(|l| {
            l.split_whitespace()
                .nth(1)
                .is_some_and(|m| m == d || m.starts_with(&format!("{d}/")))
        })
        .map(str::to_string)
        .collect()
}

impl Drop for LibvirtSandbox {
    fn drop(&mut self) {
        match Command::new("bash")
            .arg(script())
            .arg("stop")
            .arg(&self.dir)
            .stdin(Stdio::null())
            .output()
        {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!(
                "libvirt-sandbox.sh stop {} failed: {}",
                self.dir.display(),
                String::from_utf8_lossy(&out.stderr)
            ),
            Err(e) => eprintln!("libvirt-sandbox.sh stop {}: {e}", self.dir.display()),
        }
        if let Some(mut runner) = self.runner.take() {
            let end = Instant::now() + EXIT_TIMEOUT;
            loop {
                match runner.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() >= end => {
                        eprintln!("libvirt-sandbox.sh run did not exit after stop; killing it");
                        let _ = runner.kill();
                        let _ = runner.wait();
                        break;
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(50)),
                }
            }
        }
        // Never delete through a mount point: keep the directory if anything is still mounted.
        if let Some(tmp) = self.tmp.take() {
            let left = mounts_under(&self.dir);
            if left.is_empty() {
                drop(tmp);
            } else {
                eprintln!("keeping {} (still mounted: {left:?})", tmp.keep().display());
            }
        }
    }
}
