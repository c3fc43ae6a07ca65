//! The private libvirtd sandbox works end to end: a diskless domain starts, `kill -9` of its QEMU
//! turns it "shut off (crashed)", and dropping the sandbox leaves no process, mount or zombie.

#[path = "../libvirt_sandbox.rs"]
mod libvirt_sandbox;

use std::fs;
use std::process::Command;
use std::time::{Duration, Instant};

use libvirt_sandbox::{mounts_under, LibvirtSandbox};

/// True while PID names a live (non-zombie) process that still looks like one of the sandbox's
/// (a recycled PID of some unrelated process does not count).
fn sandbox_process_alive(pid: u32) -> bool {
    let Ok(status) = fs::read_to_string(format!("/proc/{pid}/status")) else {
        return false;
    };
    if status
        .lines()
        .any(|l| l.starts_with("State:") && l.contains('Z'))
    {
        return false;
    }
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let cmdline = String::from_utf8_lossy(&cmdline);
    ["libvirtd", "virtlogd", "qemu-system", "libvirt-sandbox"]
        .iter()
        .any(|p| cmdline.contains(p))
}

/// Our own children that are zombies.
fn zombie_children() -> Vec<u32> {
    let me = std::process::id().to_string();
    let mut out = Vec::new();
    for entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(status) = fs::read_to_string(entry.path().join("status")) else {
            continue;
        };
        let field = |k: &str| {
            status
                .lines()
                .find(|l| l.starts_with(k))
                .and_then(|l| l.split_whitespace().nth(1))
                .map(str::to_string)
        };
        if field("PPid:").as_deref() == Some(me.as_str()) && field("State:").as_deref() == Some("Z")
        {
            out.push(pid);
        }
    }
    out
}

#[test]
fn sandbox_domain_crashes_on_qemu_kill_and_cleans_up() {
    if let Some(why) = LibvirtSandbox::unavailable_reason() {
        eprintln!("skipped: no private libvirtd possible here: {why}");
        return;
    }
    let t0 = Instant::now();
    let sb = LibvirtSandbox::start().expect("start the libvirt sandbox");
    eprintln!(
        "sandbox {} ready in {:?}: {}",
        sb.dir.display(),
        t0.elapsed(),
        sb.uri
    );
    let dir = sb.dir.clone();
    assert_eq!(
        sb.uri,
        format!(
            "qemu+unix:///system?socket={}/run/libvirt/libvirt-sock",
            dir.display()
        )
    );
    let mut pids: Vec<u32> = sb.recorded_pids().iter().map(|(_, p)| *p).collect();
    let names: Vec<String> = sb.recorded_pids().into_iter().map(|(n, _)| n).collect();
    for want in ["keeper", "virtlogd", "libvirtd"] {
        assert!(
            names.iter().any(|n| n == want),
            "{want} missing in DIR/pids: {names:?}"
        );
    }
    assert!(pids.iter().all(|p| sandbox_process_alive(*p)), "{pids:?}");
    pids.extend(sb.runner_pid());

    let xml = LibvirtSandbox::domain_xml("smoke", 64);
    assert!(xml.contains("\n  <name>smoke</name>\n"), "{xml}");
    let xml_path = dir.join("smoke.xml");
    fs::write(&xml_path, &xml).expect("write domain XML");
    sb.virsh_ok(&["define", &xml_path.to_string_lossy()]);

    let t_start = Instant::now();
    sb.virsh_ok(&["start", "smoke"]);
    let state = sb
        .wait_state("smoke", Duration::from_secs(60), |s| {
            s.starts_with("running")
        })
        .unwrap_or_else(|s| panic!("domain not running after 60 s: {s}"));
    eprintln!("virsh start -> {state:?} in {:?}", t_start.elapsed());

    let qemu = sb.qemu_pid("smoke").expect("pid file of the domain's QEMU");
    assert!(sandbox_process_alive(qemu), "QEMU {qemu} not alive");
    pids.push(qemu);
    let t_kill = Instant::now();
    let killed = Command::new("kill")
        .args(["-9", &qemu.to_string()])
        .status()
        .expect("run kill");
    assert!(killed.success(), "kill -9 {qemu}");
    let state = sb
        .wait_state("smoke", Duration::from_secs(30), |s| {
            s.contains("crashed") || s.contains("failed")
        })
        .unwrap_or_else(|s| {
            panic!(
                "no crashed/failed state 30 s after kill -9: {s}\n{}",
                sb.libvirtd_log_tail(20)
            )
        });
    eprintln!("kill -9 -> {state:?} in {:?}", t_kill.elapsed());
    assert!(state.starts_with("shut off"), "{state}");

    let t_stop = Instant::now();
    drop(sb);
    eprintln!("sandbox stopped in {:?}", t_stop.elapsed());
    let alive: Vec<u32> = pids
        .iter()
        .copied()
        .filter(|p| sandbox_process_alive(*p))
        .collect();
    assert!(alive.is_empty(), "still running after drop: {alive:?}");
    assert!(
        mounts_under(&dir).is_empty(),
        "still mounted: {:?}",
        mounts_under(&dir)
    );
    assert!(!dir.exists(), "{} not removed", dir.display());
    assert_eq!(zombie_children(), Vec::<u32>::new(), "zombie children");
}
