//! The lab end to end: 3 hosts + 1 monitor with real libvirtds, QEMU domains, agents and a
//! monitor in network namespaces; every fault verb; `down` leaves nothing behind.
//!
//! Needs root, iproute2, libvirt and QEMU. Skipped (with a message) without them, except under
//! `CI`, where a missing prerequisite is a failure.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

mod support;

const LAB: &str = env!("CARGO_BIN_EXE_vigil-lab");
/// Not the default root or prefix: a person's lab on the same machine is left alone.
const ROOT: &str = "/var/lib/vigil-lab-test";
const PREFIX: &str = "vlt";

fn lab_cmd(args: &[&str]) -> Command {
    let mut c = Command::new(LAB);
    c.args(args)
        .env("VIGIL_LAB_DIR", ROOT)
        .env("VIGIL_LAB_PREFIX", PREFIX)
        .env("VIGIL_AGENT_BIN", env!("CARGO_BIN_EXE_lab-vigil-agent"))
        .env("VIGIL_MONITOR_BIN", env!("CARGO_BIN_EXE_lab-vigil-monitor"))
        .env("VIGILCTL_BIN", env!("CARGO_BIN_EXE_lab-vigilctl"))
        .stdin(Stdio::null());
    c
}

fn lab(args: &[&str]) -> Output {
    let t0 = Instant::now();
    let o = lab_cmd(args).output().expect("run vigil-lab");
    support::echo(args, &o, t0.elapsed());
    o
}

/// `vigil-lab --json ARGS`, which must succeed; its JSON.
fn lab_json(args: &[&str]) -> Value {
    let mut a = vec!["--json"];
    a.extend_from_slice(args);
    let o = lab(&a);
    assert!(o.status.success(), "vigil-lab {args:?} failed");
    serde_json::from_slice(&o.stdout).expect("JSON from vigil-lab")
}

fn status() -> Value {
    lab_json(&["status"])
}

fn host<'a>(st: &'a Value, name: &str) -> &'a Value {
    st["hosts"]
        .as_array()
        .and_then(|a| a.iter().find(|h| h["name"] == name))
        .unwrap_or_else(|| panic!("no host {name} in status"))
}

/// The monitor's view of a host's liveness.
fn liveness(name: &str) -> Option<String> {
    let o = lab_cmd(&[
        "ctl",
        "--",
        "--json",
        "--timeout",
        "2",
        "host",
        "show",
        name,
    ])
    .output()
    .ok()?;
    if !o.status.success() {
        return None;
    }
    let v: Value = serde_json::from_slice(&o.stdout).ok()?;
    v["liveness"].as_str().map(String::from)
}

fn wait_liveness(name: &str, want: &[&str], timeout: Duration) -> Duration {
    let t0 = Instant::now();
    loop {
        let l = liveness(name);
        if l.as_deref().is_some_and(|l| want.contains(&l)) {
            eprintln!("{name} is {l:?} after {} ms", t0.elapsed().as_millis());
            return t0.elapsed();
        }
        assert!(
            t0.elapsed() < timeout,
            "{name} not {want:?} within {timeout:?} (last: {l:?})"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn reach(from: &str, to: &str) -> bool {
    lab(&["reach", from, to, "--timeout-ms", "1000"])
        .status
        .success()
}

fn pid_alive(pid: i64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            let st = s.rsplit(')').next().unwrap_or("").trim_start();
            !st.starts_with('Z') && !st.starts_with('X')
        })
        .unwrap_or(false)
}

fn lab_namespaces() -> Vec<String> {
    std::fs::read_dir("/run/netns")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&format!("{PREFIX}-")))
                .collect()
        })
        .unwrap_or_default()
}

/// Live processes whose environment carries this lab's id.
fn processes_of_lab(id: &str) -> Vec<i32> {
    let want = format!("VIGIL_LAB_ID={id}");
    std::fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
                .filter(|p| {
                    std::fs::read(format!("/proc/{p}/environ"))
                        .map(|b| b.split(|&c| c == 0).any(|e| e == want.as_bytes()))
                        .unwrap_or(false)
                        && pid_alive(i64::from(*p))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// `virsh -c URI ARGS` (of host `h` in up's JSON); its stdout, or None on failure.
fn virsh(up: &Value, h: &str, args: &[&str]) -> Option<String> {
    let uri = up["hosts"].as_array()?.iter().find(|x| x["name"] == h)?["libvirt_uri"]
        .as_str()?
        .to_string();
    let o = Command::new("virsh")
        .args(["-q", "-c", &uri])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .ok()?;
    o.status
        .success()
        .then(|| String::from_utf8_lossy(&o.stdout).into_owned())
}

fn mounts_under_root() -> Vec<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| Path::new(m).starts_with(ROOT))
        .map(String::from)
        .collect()
}

#[test]
fn lab_up_faults_down() {
    if support::skip(
        "the lab test",
        &["ip", "libvirtd", "virtlogd", "virsh", "qemu-system-x86_64"],
    ) {
        return;
    }
    let t_test = Instant::now();
    // Leftovers of an earlier, interrupted run of this test.
    let _ = lab(&["down"]);
    assert!(
        lab_namespaces().is_empty(),
        "namespaces {PREFIX}-* exist before the test: {:?}",
        lab_namespaces()
    );

    // This test owns the supervisor (its child), so nothing is left as a zombie.
    let mut guard = support::start_supervisor(ROOT, lab_cmd, || lab(&["down"]));

    // up: 3 hosts, 1 monitor, 1 VM per host, hv1 tagged.
    let up = lab_json(&[
        "up",
        "--hosts",
        "3",
        "--monitors",
        "1",
        "--vms-per-host",
        "1",
        "--ha-tag",
        "ha",
        "--tagged-hosts",
        "1",
    ]);
    let lab_id = up["id"].as_str().expect("lab id").to_string();
    eprintln!(
        "up took {} ms (caps cache {})",
        up["elapsed_ms"], up["caps_cache"]
    );
    let sup_pid = guard.supervisor.as_ref().map(|c| c.id()).unwrap_or(0);
    assert_eq!(
        status()["supervisor"]["pid"].as_u64(),
        Some(u64::from(sup_pid)),
        "up must use the supervisor that was already running"
    );

    // The monitor sees every host up and every VM running, HA, on its host.
    let hosts = lab_json(&["ctl", "--", "host", "list"]);
    let hosts = hosts.as_array().expect("host list");
    assert_eq!(hosts.len(), 3, "{hosts:?}");
    for h in hosts {
        assert_eq!(h["liveness"], "up", "{h}");
        let tagged = h["tags"]
            .as_array()
            .is_some_and(|t| t.iter().any(|x| x == "ha"));
        assert_eq!(tagged, h["name"] == "hv1", "only hv1 carries the tag: {h}");
    }
    let vms = lab_json(&["ctl", "--", "vm", "list"]);
    let vms = vms.as_array().expect("vm list");
    assert_eq!(vms.len(), 3, "{vms:?}");
    for v in vms {
        assert_eq!(v["state"], "running", "{v}");
        assert_eq!(v["ha"], true, "{v}");
        let name = v["name"].as_str().unwrap_or("");
        assert!(
            name.starts_with(&format!("{}-", v["host"].as_str().unwrap_or("?"))),
            "{v}"
        );
    }
    let st = status();
    for h in ["hv1", "hv2", "hv3"] {
        let hs = host(&st, h);
        assert_eq!(hs["agent"]["alive"], true, "{hs}");
        assert_eq!(hs["libvirt"]["answers"], true, "{hs}");
        assert_eq!(
            hs["domains_running"],
            serde_json::json!([format!("{h}-vm1")])
        );
    }

    // With the shared storage, each VM's qcow2 disk has the same path on every host (each host's
    // own faultfs view is bound there inside its sandbox only).
    let shared = PathBuf::from(ROOT).join("storage/shared");
    if up["components"]["faultfs"] == true {
        for h in ["hv1", "hv2", "hv3"] {
            let vm = format!("{h}-vm1");
            let blk = virsh(&up, h, &["domblklist", &vm]).expect("domblklist");
            let disk = shared.join(format!("{vm}.qcow2"));
            assert!(
                blk.split_whitespace()
                    .any(|w| Path::new(w) == disk.as_path()),
                "{vm}'s disk must be {}: {blk}",
                disk.display()
            );
            let state = virsh(&up, h, &["domstate", &vm]).expect("domstate");
            assert_eq!(state.trim(), "running", "{vm}");
        }
        let shared_s = shared.to_string_lossy().into_owned();
        assert!(
            !mounts_under_root().contains(&shared_s),
            "the common path is bound only inside the sandboxes"
        );
    }

    // partition hv2 from the monitors: unreachable from mon1, still reachable from hv1, its
    // agent still runs, and the monitor stops hearing it.
    lab_json(&["partition", "hv2"]);
    assert!(!reach("mon1", "hv2"), "hv2 must be unreachable from mon1");
    assert!(!reach("hv2", "mon1"), "mon1 must be unreachable from hv2");
    assert!(reach("hv1", "hv2"), "hv2 must still reach the other hosts");
    let st = status();
    assert_eq!(host(&st, "hv2")["partition"], "from_monitors");
    assert_eq!(host(&st, "hv2")["agent"]["alive"], true);
    let hv2_agent = host(&st, "hv2")["agent"]["pid"].as_i64().expect("pid");
    wait_liveness("hv2", &["suspect", "down"], Duration::from_secs(10));
    assert!(pid_alive(hv2_agent), "the partitioned agent keeps running");
    lab_json(&["heal", "hv2"]);
    assert!(reach("mon1", "hv2"));
    assert_eq!(host(&status(), "hv2")["partition"], "none");
    wait_liveness("hv2", &["up"], Duration::from_secs(20));

    // partition --from all: not even the other hosts reach it.
    lab_json(&["partition", "hv2", "--from", "all"]);
    assert!(!reach("hv1", "hv2"));
    assert_eq!(host(&status(), "hv2")["partition"], "from_all");
    lab_json(&["heal", "hv2"]);
    assert!(reach("hv1", "hv2"));

    // kill-agent / start-agent.
    let hv1_agent = host(&status(), "hv1")["agent"]["pid"]
        .as_i64()
        .expect("pid");
    lab_json(&["kill-agent", "hv1"]);
    assert!(!pid_alive(hv1_agent), "the agent is gone");
    let st = status();
    assert_eq!(host(&st, "hv1")["agent"]["alive"], false);
    // Its VM keeps running (Vigil may have moved hv2's VM here meanwhile: hv2 was cut off
    // above, and a host alive on storage is fenced through its slot).
    let running = host(&st, "hv1")["domains_running"].clone();
    assert!(
        running
            .as_array()
            .is_some_and(|d| d.iter().any(|v| v == "hv1-vm1")),
        "its VM keeps running: {running}"
    );
    lab_json(&["start-agent", "hv1"]);
    assert_eq!(host(&status(), "hv1")["agent"]["alive"], true);
    wait_liveness("hv1", &["up"], Duration::from_secs(20));

    // Shared storage, when vigil-faultfs exists.
    if up["components"]["faultfs"] == true {
        let mp = PathBuf::from(ROOT).join("hosts/hv1/storage");
        let other = PathBuf::from(ROOT).join("hosts/hv2/storage");
        std::fs::write(other.join("probe"), b"x").expect("write through hv2's mount");
        lab_json(&["storage", "fail", "--host", "hv1"]);
        let err = std::fs::read(mp.join("probe")).expect_err("EIO on hv1");
        assert_eq!(
            err.raw_os_error(),
            Some(nix::errno::Errno::EIO as i32),
            "{err}"
        );
        assert!(std::fs::read(other.join("probe")).is_ok(), "hv2 unaffected");
        lab_json(&["storage", "heal"]);
        assert_eq!(std::fs::read(mp.join("probe")).expect("healed"), b"x");
        let names = virsh(&up, "hv1", &["list", "--all", "--name"]).expect("virsh list");
        assert!(
            names.lines().any(|l| l.trim() == "hv1-vm1"),
            "hv1's VM is still defined after the storage fault: {names:?}"
        );
    } else {
        let o = lab(&["storage", "fail"]);
        assert!(!o.status.success());
        assert!(String::from_utf8_lossy(&o.stderr).contains("not available"));
    }

    // crash-host hv3: nothing of it is left, its QEMU included.
    // Vigil restarts an HA VM whose own host reports it not running once the host is back
    // (that is HA working); this test checks the lab's power-on, so hv3's VM is not HA here.
    let o = lab(&["ctl", "--", "vm", "ha", "disable", "hv3-vm1"]);
    assert!(o.status.success(), "vm ha disable");
    let crash = lab_json(&["crash-host", "hv3"]);
    let qemu = crash["event"]["detail"]["qemu"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    // hv3's own QEMU, and any of a VM Vigil moved there after fencing hv2 (see power-on
    // below; if hv1's agent was the one killed just then, hv3 is where it goes): one each.
    let names: Vec<&str> = qemu.iter().filter_map(|q| q[0].as_str()).collect();
    assert!(names.contains(&"hv3-vm1"), "hv3's own QEMU: {crash}");
    assert!(
        names.iter().all(|n| *n == "hv3-vm1" || *n == "hv2-vm1"),
        "only hv3's VM and hv2's (moved by Vigil) can run on hv3: {crash}"
    );
    let mut unique = names.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(unique.len(), names.len(), "one QEMU per VM: {crash}");
    for q in &qemu {
        let pid = q[1].as_i64().expect("qemu pid");
        assert!(!pid_alive(pid), "QEMU {pid} of hv3 survived");
    }
    for p in crash["event"]["detail"]["pids"]
        .as_array()
        .cloned()
        .unwrap_or_default()
    {
        assert!(!pid_alive(p.as_i64().unwrap_or(0)), "{p} survived");
    }
    let st = status();
    let hv3 = host(&st, "hv3");
    assert_eq!(hv3["processes"], 0, "{hv3}");
    assert_eq!(hv3["agent"]["alive"], false);
    assert_eq!(hv3["libvirt"]["alive"], false);
    assert_eq!(hv3["power"], "off");
    if up["components"]["watchdog"] == true {
        // A host without power has a watchdog that resets nothing later.
        assert_eq!(crash["event"]["detail"]["watchdog"], "off", "{crash}");
        assert_eq!(hv3["watchdog"]["state"], "off", "{hv3}");
    }
    wait_liveness("hv3", &["down"], Duration::from_secs(15));
    lab_json(&["power-on", "hv3"]);
    let st = status();
    let hv3 = host(&st, "hv3");
    assert_eq!(hv3["libvirt"]["answers"], true, "{hv3}");
    if up["components"]["watchdog"] == true {
        // Powered on: reset (disarmed, the lab's timeout) or already armed by the new agent.
        let w = &hv3["watchdog"];
        assert!(w["state"] == "disarmed" || w["state"] == "armed", "{hv3}");
        assert!(
            w["device"]
                .as_str()
                .is_some_and(|d| d.ends_with("hosts/hv3/watchdog/watchdog")),
            "{hv3}"
        );
        assert_eq!(w["resets"], 1, "{hv3}");
    }
    // Power-on starts no domain by itself: hv3's own VM (not HA) stays off. The earlier
    // partitions of hv2 can outlast its lease (the reach probes take a second each), and then
    // Vigil rightly fences hv2 and restarts its HA VM, possibly on hv3 the moment it is back.
    // Such a domain is allowed only when the monitor placed it there.
    let running: Vec<String> = hv3["domains_running"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .filter_map(|d| d.as_str().map(String::from))
        .collect();
    assert!(
        !running.iter().any(|d| d == "hv3-vm1"),
        "powered on with its own VM running: {hv3}"
    );
    if !running.is_empty() {
        let vms = lab_json(&["ctl", "--", "vm", "list"]);
        for d in &running {
            let placed = vms.as_array().is_some_and(|vs| {
                vs.iter()
                    .any(|v| v["name"] == d.as_str() && v["host"] == "hv3" && v["ha"] == true)
            });
            assert!(
                placed,
                "{d} runs on hv3 after power-on, not placed there by the monitor: {vms}"
            );
        }
    }
    wait_liveness("hv3", &["up"], Duration::from_secs(20));

    // The BMC, when lab-bmc.sh, ipmi_sim and fence_ipmilan exist: power off crashes the host.
    if up["components"]["bmc"] == true {
        let off = lab_json(&["bmc", "hv2", "off", "power_wait=0"]);
        assert_eq!(off["event"]["detail"]["exit"], 0, "{off}");
        let st = status();
        assert_eq!(host(&st, "hv2")["processes"], 0);
        assert_eq!(host(&st, "hv2")["power"], "off");
        let s = lab_json(&["bmc", "hv2", "status"]);
        assert_eq!(s["result"]["exit"], 2, "status of a powered-off host: {s}");
        lab_json(&["bmc", "hv2", "on", "power_wait=0"]);
        assert_eq!(host(&status(), "hv2")["libvirt"]["answers"], true);
        wait_liveness("hv2", &["up"], Duration::from_secs(20));
    } else {
        assert!(!lab(&["bmc", "hv2", "status"]).status.success());
    }

    // kill-monitor / restart-monitor.
    let mon_pid = status()["monitors"][0]["monitor"]["pid"]
        .as_i64()
        .expect("monitor pid");
    lab_json(&["kill-monitor", "mon1"]);
    assert!(!pid_alive(mon_pid));
    assert_eq!(status()["monitors"][0]["monitor"]["alive"], false);
    assert!(
        !lab(&["ctl", "--", "--timeout", "1", "status"])
            .status
            .success(),
        "nobody answers while the monitor is dead"
    );
    lab_json(&["restart-monitor", "mon1"]);
    assert_eq!(status()["monitors"][0]["monitor"]["alive"], true);
    for h in ["hv1", "hv2", "hv3"] {
        wait_liveness(h, &["up"], Duration::from_secs(30));
    }

    // The independent checker, when the observer exists: no VM ran twice.
    if up["components"]["observer"] == true {
        assert!(lab(&["check"]).status.success(), "vigil-lab check failed");
    }

    // The timeline holds every fault, in order of the verbs.
    let tl = lab_json(&["timeline"]);
    let verbs: Vec<&str> = tl["events"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|e| e["kind"] == "fault")
                .filter_map(|e| e["verb"].as_str())
                .collect()
        })
        .unwrap_or_default();
    for v in [
        "partition",
        "heal",
        "kill-agent",
        "start-agent",
        "crash-host",
        "power-on",
        "kill-monitor",
        "restart-monitor",
    ] {
        assert!(
            verbs.contains(&v),
            "{v} missing from the timeline: {verbs:?}"
        );
    }

    // down leaves nothing: no namespace, no process, no mount; and it is idempotent.
    let down = lab_json(&["down"]);
    assert_eq!(down["ok"], true);
    assert!(lab_namespaces().is_empty(), "{:?}", lab_namespaces());
    assert!(
        processes_of_lab(&lab_id).is_empty(),
        "{:?}",
        processes_of_lab(&lab_id)
    );
    assert!(mounts_under_root().is_empty(), "{:?}", mounts_under_root());
    let again = lab_json(&["down"]);
    assert_eq!(again["ok"], true);
    // The supervisor exits after down; this test reaps it (no zombie).
    if let Some(mut c) = guard.supervisor.take() {
        let t0 = Instant::now();
        loop {
            if let Some(st) = c.try_wait().expect("wait") {
                assert!(st.success(), "supervisor: {st}");
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "supervisor still runs"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    eprintln!("lab test done in {:.1} s", t_test.elapsed().as_secs_f64());
}
