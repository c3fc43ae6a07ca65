//! What every lab test needs: the prerequisites check, and a supervisor that the test owns
//! (its child, so nothing is left as a zombie) with a guard that tears the lab down on drop,
//! also on panic. Each test passes its own root and `vigil-lab` command builder, so tests
//! never share a lab.

#![allow(dead_code)]

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

pub fn which(prog: &str) -> bool {
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path
        .split(':')
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"])
        .any(|d| Path::new(d).join(prog).is_file());
    found
}

/// Why a lab test cannot run here (not root, or one of `progs` missing), if it cannot.
pub fn missing_prerequisite(progs: &[&str]) -> Option<String> {
    let uid = std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(1);
    if uid != 0 {
        return Some("not root".into());
    }
    progs
        .iter()
        .find(|p| !which(p))
        .map(|p| format!("{p} not found"))
}

/// `true` when the test should skip (outside CI); panics under `CI`.
pub fn skip(test: &str, progs: &[&str]) -> bool {
    let Some(why) = missing_prerequisite(progs) else {
        return false;
    };
    if std::env::var_os("CI").is_some() {
        panic!("{test} cannot run under CI: {why}");
    }
    eprintln!("skipping {test}: {why}");
    true
}

/// Runs `down` when dropped (also on panic), then waits for the supervisor this test owns.
pub struct Guard {
    pub supervisor: Option<Child>,
    down: Box<dyn Fn() -> Output>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        if !(self.down)().status.success() {
            eprintln!("guard: down failed");
        }
        if let Some(mut c) = self.supervisor.take() {
            let t0 = Instant::now();
            loop {
                match c.try_wait() {
                    Ok(Some(st)) => {
                        eprintln!("guard: supervisor exited: {st}");
                        break;
                    }
                    Ok(None) if t0.elapsed() < Duration::from_secs(60) => {
                        std::thread::sleep(Duration::from_millis(50))
                    }
                    _ => {
                        eprintln!("guard: the supervisor did not exit: killing it");
                        let _ = c.kill();
                        let _ = c.wait();
                        break;
                    }
                }
            }
        }
    }
}

/// Starts `vigil-lab supervise` as this test's child and waits for its socket under `root`.
pub fn start_supervisor(
    root: &str,
    lab_cmd: fn(&[&str]) -> Command,
    down: impl Fn() -> Output + 'static,
) -> Guard {
    std::fs::create_dir_all(root).expect("lab root");
    let log = std::fs::File::create(PathBuf::from(root).join("test-supervisor.log"))
        .expect("supervisor log");
    let sup = lab_cmd(&["supervise"])
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("start the supervisor");
    let guard = Guard {
        supervisor: Some(sup),
        down: Box::new(down),
    };
    let sock = PathBuf::from(root).join("supervisor.sock");
    let t0 = Instant::now();
    while !sock.exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "no supervisor socket"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    guard
}
