//! vigil-observer against two real libvirt sandboxes ("hvA", "hvB"): a VM moved from A to B
//! passes `check`; the same VM started on A again while it runs on B fails it, naming both hosts;
//! when B's libvirtd dies, B's domain stays "running" in the timeline until its qemu is gone.

#[path = "../../e2e/libvirt_sandbox.rs"]
mod libvirt_sandbox;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use libvirt_sandbox::LibvirtSandbox;
use serde_json::Value;

const UUID: &str = "5f0e7a2c-9a41-4c55-8d39-0b5e2d7c1a01";
const NAME: &str = "obs-vm";
const WAIT: Duration = Duration::from_secs(90);

fn observer_bin() -> &'static str {
    env!("CARGO_BIN_EXE_vigil-observer")
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A running `vigil-observer watch`, stopped with SIGTERM when dropped (also on panic).
struct Observer {
    child: Option<Child>,
    out: PathBuf,
}

impl Observer {
    fn start(out: &Path, hosts: &[(&str, &LibvirtSandbox)]) -> Observer {
        let mut cmd = Command::new(observer_bin());
        cmd.arg("watch")
            .arg("--out")
            .arg(out)
            .args(["--poll-ms", "100"]);
        for (name, sb) in hosts {
            let pid_dir = sb.dir.join("run/libvirt/qemu");
            cmd.arg("--host")
                .arg(format!("{name}={},{}", sb.uri, pid_dir.display()));
        }
        let child = cmd
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn vigil-observer watch");
        Observer {
            child: Some(child),
            out: out.to_path_buf(),
        }
    }

    fn lines(&self) -> Vec<Value> {
        fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Waits until at least `n` lines match `pred`; returns the n-th.
    fn wait_nth(&self, n: usize, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let end = Instant::now() + WAIT;
        loop {
            let hits: Vec<Value> = self.lines().into_iter().filter(|v| pred(v)).collect();
            if hits.len() >= n {
                return hits[n - 1].clone();
            }
            assert!(
                Instant::now() < end,
                "timed out waiting for {what}; timeline:\n{}",
                fs::read_to_string(&self.out).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM, then waits (SIGKILL after 10 s).
    fn stop(&mut self) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            match child.try_wait() {
                Ok(Some(st)) => return Some(st),
                Ok(None) if Instant::now() < end => std::thread::sleep(Duration::from_millis(20)),
                _ => {
                    let _ = child.kill();
                    return child.wait().ok();
                }
            }
        }
    }
}

impl Drop for Observer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A change of the VM on `host`. A "running" line from the pid source only completes an
/// instance already seen (its qemu pid, read late), so it is not a start.
fn is_vm(v: &Value, host: &str, event: &str) -> bool {
    v["host"] == host
        && v["uuid"] == UUID
        && v["event"] == event
        && !(event == "running" && v["source"] == "pid")
}

fn check(timeline: &Path, json: bool) -> Output {
    let mut cmd = Command::new(observer_bin());
    cmd.arg("check").arg(timeline);
    if json {
        cmd.arg("--json");
    }
    cmd.output().expect("run vigil-observer check")
}

fn mark(timeline: &Path, text: &str) {
    let st = Command::new(observer_bin())
        .args(["mark", "--kind", "fault", "--text", text, "--out"])
        .arg(timeline)
        .status()
        .expect("run vigil-observer mark");
    assert!(st.success());
}

/// The test domain with a fixed UUID, written to `dir/NAME.xml`.
fn domain_file(dir: &Path) -> PathBuf {
    let xml = LibvirtSandbox::domain_xml(NAME, 64).replacen(
        &format!("<name>{NAME}</name>"),
        &format!("<name>{NAME}</name>\n  <uuid>{UUID}</uuid>"),
        1,
    );
    assert!(xml.contains(UUID));
    let path = dir.join(format!("{NAME}.xml"));
    fs::write(&path, xml).expect("write domain XML");
    path
}

fn libvirtd_pid(sb: &LibvirtSandbox) -> u32 {
    sb.recorded_pids()
        .into_iter()
        .find(|(n, _)| n == "libvirtd")
        .map(|(_, p)| p)
        .expect("libvirtd pid recorded")
}

fn alive(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let rest = s[s.rfind(')')? + 1..].trim_start().to_string();
            rest.chars().next()
        })
        .is_some_and(|st| st != 'Z' && st != 'X')
}

#[test]
fn observer_catches_a_vm_running_on_two_hosts() {
    if let Some(why) = LibvirtSandbox::unavailable_reason() {
        eprintln!("SKIP observer_catches_a_vm_running_on_two_hosts: {why}");
        return;
    }
    // Both sandboxes at once (a cold QEMU capability probe takes ~20 s each).
    let a = std::thread::spawn(LibvirtSandbox::start);
    let b = std::thread::spawn(LibvirtSandbox::start);
    let (a, b) = (a.join().expect("thread A"), b.join().expect("thread B"));
    let a = a.expect("sandbox A");
    let b = b.expect("sandbox B");

    let work = tempfile::tempdir().expect("tempdir");
    let timeline = work.path().join("timeline.jsonl");
    let xml = domain_file(work.path());
    let xml = xml.to_str().expect("utf-8 path");
    let mut obs = Observer::start(&timeline, &[("hvA", &a), ("hvB", &b)]);
    obs.wait_nth(1, "observer-start", |v| v["event"] == "observer-start");

    // 1. Runs on A.
    a.virsh_ok(&["define", xml]);
    a.virsh_ok(&["start", NAME]);
    let run_a = obs.wait_nth(1, "running on hvA", |v| is_vm(v, "hvA", "running"));
    assert_eq!(run_a["name"], NAME);

    // 2. Gone from A, then started on B: a move, not a duplicate.
    mark(&timeline, "destroy obs-vm on hvA");
    a.virsh_ok(&["destroy", NAME]);
    obs.wait_nth(1, "stopped on hvA", |v| is_vm(v, "hvA", "stopped"));
    b.virsh_ok(&["define", xml]);
    b.virsh_ok(&["start", NAME]);
    let run_b = obs.wait_nth(1, "running on hvB", |v| is_vm(v, "hvB", "running"));
    let qemu_b = b.qemu_pid(NAME).expect("qemu pid on B");
    assert_eq!(
        run_b["pid"].as_u64(),
        Some(u64::from(qemu_b)),
        "pid recorded from B's pid file: {run_b}"
    );

    let out = check(&timeline, false);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!("check after the move:\n{text}");
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("duplicates: none"), "{text}");
    let out = check(&timeline, true);
    assert_eq!(out.status.code(), Some(0));
    let report: Value = serde_json::from_slice(&out.stdout).expect("check --json");
    let gap = &report["gaps"][0];
    assert_eq!(gap["uuid"], UUID);
    assert_eq!(gap["lost_host"], "hvA");
    assert_eq!(gap["back_host"], "hvB");
    assert!(gap["gap_ms"].as_u64().is_some(), "{gap}");
    assert_eq!(gap["marks"][0]["text"], "destroy obs-vm on hvA");

    // 3. Started on A again while it runs on B: a duplicate.
    a.virsh_ok(&["start", NAME]);
    obs.wait_nth(2, "running on hvA again", |v| is_vm(v, "hvA", "running"));
    let out = check(&timeline, false);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!("check after the duplicate start:\n{text}");
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("DUPLICATES: 1"), "{text}");
    assert!(
        text.contains("ran on hvA and hvB at once") && text.contains(UUID),
        "{text}"
    );
    let report: Value = serde_json::from_slice(&check(&timeline, true).stdout).expect("json");
    assert_eq!(report["ok"], false);
    assert_eq!(
        report["overlaps"][0]["hosts"],
        serde_json::json!(["hvA", "hvB"])
    );

    // 4. B's libvirtd dies; its qemu lives on for a while (the sandbox's keeper ends it about
    //    2 s later). B's domain must stay running in the timeline until that qemu is gone.
    a.virsh_ok(&["destroy", NAME]);
    obs.wait_nth(2, "stopped on hvA again", |v| is_vm(v, "hvA", "stopped"));
    let killed_ms = now_ms();
    let st = Command::new("kill")
        .args(["-KILL", &libvirtd_pid(&b).to_string()])
        .status()
        .expect("kill libvirtd");
    assert!(st.success());
    let mut last_alive_ms = 0;
    let end = Instant::now() + WAIT;
    loop {
        let t = now_ms();
        if !alive(qemu_b) {
            break;
        }
        last_alive_ms = t;
        assert!(Instant::now() < end, "qemu {qemu_b} of B never went away");
        std::thread::sleep(Duration::from_millis(10));
    }
    let unreachable = obs.wait_nth(1, "hvB unreachable", |v| {
        v["host"] == "hvB" && v["event"] == "host-unreachable"
    });
    let stopped_b = obs.wait_nth(1, "stopped on hvB", |v| is_vm(v, "hvB", "stopped"));
    eprintln!(
        "libvirtd of B killed at +0 ms; unreachable noted at +{} ms; qemu last seen alive at +{} ms; stop recorded at +{} ms ({stopped_b})",
        unreachable["t_ms"].as_u64().unwrap_or(0).saturating_sub(killed_ms),
        last_alive_ms.saturating_sub(killed_ms),
        stopped_b["t_ms"].as_u64().unwrap_or(0).saturating_sub(killed_ms),
    );
    assert_eq!(stopped_b["source"], "pid", "{stopped_b}");
    assert!(
        stopped_b["t_ms"].as_u64().unwrap_or(0) >= last_alive_ms,
        "stop recorded while qemu still lived: {stopped_b}, qemu alive at {last_alive_ms}"
    );

    let status = obs.stop().expect("observer exit status");
    assert!(
        status.success(),
        "vigil-observer watch exited with {status}"
    );
    let last = obs.lines().pop().expect("a last line");
    assert_eq!(last["event"], "observer-stop");
}
