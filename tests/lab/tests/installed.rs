//! What a package ships is what the lab tests (issue 13, item 5): the .debs are built with
//! cargo-deb from this test profile's binaries (as tests/packaging does), extracted with
//! `dpkg -x` into a temporary root, and `vigil-lab up --installed ROOT` runs 3 monitors and
//! 3 hosts from them: the installed binaries, the units' command lines, the shipped configs
//! with only the lab's declared keys changed (shipped detector and lease timings included).
//! Then the host-failover check of tests/failover.rs: power loss of hv2, fenced through its
//! BMC, its VM started exactly once on the ha_tag host, nothing on the other hosts stopped,
//! one event per state change; hv2 rejoins empty; hv3 partitioned from the monitors is fenced
//! through its storage slot and its VM moves, exactly once; the leader monitor SIGKILLed
//! gives up the VIP through the unit's ExecStopPost; the observer finds no VM that ran twice.
//!
//! Needs root, iproute2, libvirt, QEMU, ipmi_sim, fence_ipmilan, cargo-deb, dpkg-deb, strip.
//! Skipped (with a message) without them, except under `CI`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use vigil_lab::installed::changed_keys;

mod support;

/// Its own root and prefix: no other lab on this machine uses them.
const LAB: support::LabCli = support::LabCli {
    root: "/var/lib/vigil-lab-installed",
    prefix: "vi",
};

/// The binaries that go into the packages: built from the shipped entry points (this
/// crate's `lab-*` copies), named as the packages' assets expect.
const BINARIES: [(&str, &str); 3] = [
    ("vigil-agent", env!("CARGO_BIN_EXE_lab-vigil-agent")),
    ("vigil-monitor", env!("CARGO_BIN_EXE_lab-vigil-monitor")),
    ("vigilctl", env!("CARGO_BIN_EXE_lab-vigilctl")),
];

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("workspace root")
}

fn run(cmd: &mut Command) -> String {
    let shown = format!("{cmd:?}");
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{shown}: {e} (scripts/setup.sh installs it)"));
    assert!(
        out.status.success(),
        "{shown} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The two .debs, from stripped copies of the test profile's binaries (as
/// packaging/build.sh stages them), extracted into `root` as `dpkg -x` does.
fn build_and_extract(work: &Path, root: &Path) {
    let target = work.join("target");
    std::fs::create_dir_all(target.join("release")).expect("mkdir release");
    for (name, built) in BINARIES {
        run(Command::new("strip")
            .args(["--remove-section=.comment", "-o"])
            .arg(target.join("release").join(name))
            .arg(built));
    }
    for package in ["vigil-agent", "vigil-monitor"] {
        let deb = work.join(format!("{package}_0.1.0-1_amd64.deb"));
        run(Command::new("cargo")
            .args(["deb", "--no-build", "--fast", "-p", package])
            .args(["--deb-version", "0.1.0-1", "-o"])
            .arg(&deb)
            .env("CARGO_TARGET_DIR", &target)
            .current_dir(workspace()));
        run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(root));
    }
}

/// Why this test cannot run here beyond the lab's own prerequisites.
fn missing_packaging_tool() -> Option<String> {
    let cargo_deb = Command::new("cargo")
        .args(["deb", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !cargo_deb {
        return Some("cargo-deb not found (cargo install cargo-deb; scripts/setup.sh)".into());
    }
    ["dpkg-deb", "strip"]
        .into_iter()
        .find(|p| !support::which(p))
        .map(|p| format!("{p} not found"))
}

fn file(p: impl AsRef<Path>) -> String {
    std::fs::read_to_string(p.as_ref())
        .unwrap_or_else(|e| panic!("reading {}: {e}", p.as_ref().display()))
}

/// The keys in which the lab's config differs from the shipped one, checked against the
/// list written here (not the lab's own list): a key the lab starts to override fails this.
fn assert_changed(shipped: &Path, written: &Path, expected: &[&str]) {
    let changed = changed_keys(&file(shipped), &file(written)).expect("both are TOML");
    assert_eq!(
        changed,
        expected,
        "{} differs from the shipped {} in other keys than expected",
        written.display(),
        shipped.display()
    );
}

/// The supervisor's argv of `name` ends with the unit's `ExecStart=` line, its program
/// inside `root` and the shipped config replaced by the lab's, then `then` (a first start's
/// `--init` or `--join`); `ip netns exec NS` comes first.
fn assert_runs_unit_line(
    name: &str,
    root: &Path,
    unit: &str,
    shipped: &str,
    lab_cfg: &Path,
    then: &[&str],
) {
    let key = "ExecStart";
    let unit_text = file(root.join("lib/systemd/system").join(unit));
    let line = unit_text
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key}= in {unit}"));
    let expected: Vec<String> = line
        .split_whitespace()
        .enumerate()
        .map(|(n, w)| {
            if n == 0 {
                format!("{}{w}", root.display())
            } else if w == shipped {
                lab_cfg.display().to_string()
            } else {
                w.to_string()
            }
        })
        .chain(then.iter().map(|w| w.to_string()))
        .collect();
    let procs: serde_json::Value =
        serde_json::from_str(&file(Path::new(LAB.root).join("procs.json"))).expect("procs.json");
    let argv: Vec<String> = procs["procs"]
        .as_array()
        .and_then(|a| a.iter().find(|p| p["name"] == name))
        .and_then(|p| p["argv"].as_array())
        .unwrap_or_else(|| panic!("{name} not in procs.json: {procs:#}"))
        .iter()
        .filter_map(|w| w.as_str().map(String::from))
        .collect();
    assert!(
        argv.ends_with(&expected),
        "{name} runs {argv:?}, not {unit}'s {key}= {expected:?}"
    );
}

fn count(msgs: &[String], pred: impl Fn(&str) -> bool) -> usize {
    msgs.iter().filter(|m| pred(m)).count()
}

#[test]
fn the_installed_packages_fail_a_host_over() {
    if support::skip("the installed-packages test", support::FENCED_LAB_PROGS) {
        return;
    }
    if let Some(why) = missing_packaging_tool() {
        if std::env::var_os("CI").is_some() {
            panic!("the installed-packages test cannot run under CI: {why}");
        }
        eprintln!("skipping the installed-packages test: {why}");
        return;
    }
    let t0 = Instant::now();
    // Dropped last (declared first): the lab is down before its binaries go.
    let work = tempfile::Builder::new()
        .prefix("vigil-lab-installed-")
        .tempdir()
        .expect("tempdir");
    let root = work.path().join("root");
    build_and_extract(work.path(), &root);
    eprintln!(
        "FIGURE debs built and extracted: {} ms",
        t0.elapsed().as_millis()
    );

    let _ = LAB.run(&["down"]);
    let _guard = support::start_supervisor(LAB.root, |a| LAB.cmd(a), || LAB.run(&["down"]));
    let t_up = Instant::now();
    let root_arg = root.display().to_string();
    LAB.up_three_hosts_fenced_monitors("3", &["--installed", &root_arg]);
    eprintln!(
        "FIGURE up --installed (3 monitors, 3 hosts): {} ms",
        t_up.elapsed().as_millis()
    );

    // What runs is what the packages ship: the units' command lines, the shipped configs
    // with only the operator's keys changed.
    let lab_root = Path::new(LAB.root);
    let (agent_toml, monitor_toml) = (
        root.join("etc/vigil/agent.toml"),
        root.join("etc/vigil/monitor.toml"),
    );
    for h in ["hv1", "hv2", "hv3"] {
        let cfg = lab_root.join("hosts").join(h).join("agent.toml");
        assert_changed(
            &agent_toml,
            &cfg,
            &[
                "libvirt_uri",
                "monitors",
                "state_dir",
                "storage.pools",
                "tls.ca",
                "tls.cert",
                "tls.key",
                "watchdog.device",
            ],
        );
        let name = format!("{h}/agent");
        assert_runs_unit_line(
            &name,
            &root,
            "vigil-agent.service",
            "/etc/vigil/agent.toml",
            &cfg,
            &[],
        );
    }
    let common = [
        "advertise",
        "data_dir",
        "fencing.hosts",
        "raft.listen",
        "recovery.ha_tag",
        "storage.pools",
        "tls.ca",
        "tls.cert",
        "tls.key",
        "vip.address",
        "vip.interface",
    ];
    for (m, extra, flag) in [
        ("mon1", "raft.peers", "--init"),
        ("mon2", "node_id", "--join"),
        ("mon3", "node_id", "--join"),
    ] {
        let cfg = lab_root.join("monitors").join(m).join("monitor.toml");
        let mut expected: Vec<&str> = common.iter().copied().chain([extra]).collect();
        expected.sort();
        assert_changed(&monitor_toml, &cfg, &expected);
        assert_runs_unit_line(
            &format!("{m}/monitor"),
            &root,
            "vigil-monitor.service",
            "/etc/vigil/monitor.toml",
            &cfg,
            &[flag],
        );
    }

    // 1. Power loss of hv2: fenced through its BMC, its VM started exactly once on hv1 (the
    //    ha_tag host), nothing on hv1 or hv3 stopped; one event per state change.
    let t_crash = Instant::now();
    assert!(LAB.run(&["crash-host", "hv2"]).status.success());
    let took = LAB.wait_vm_on("hv2-vm1", "hv1", 1, t_crash);
    eprintln!(
        "FIGURE installed: crash-host hv2 -> hv2-vm1 running on hv1: {} ms",
        took.as_millis()
    );
    let crash_ms = LAB
        .last_event_ms("crash-host", "hv2")
        .expect("crash-host in the timeline");
    LAB.assert_started_exactly_once("hv2-vm1", Some("hv1"), crash_ms);
    LAB.assert_not_stopped(&["hv1", "hv3"], crash_ms);
    let msgs = LAB.event_messages();
    assert_eq!(
        count(&msgs, |m| m.contains("host hv2 fenced")
            && m.contains("fence_ipmilan")),
        1,
        "{msgs:#?}"
    );
    assert_eq!(
        count(&msgs, |m| m
            .contains("VM hv2-vm1 lost with its host on hv2")
            && m.contains("relocating to hv1")),
        1,
        "{msgs:#?}"
    );
    assert_eq!(
        count(&msgs, |m| m.contains(
            "ordered start of VM hv2-vm1 on hv1 with generation 1"
        )),
        1,
        "{msgs:#?}"
    );
    assert!(
        !msgs
            .iter()
            .any(|m| m.contains("VM hv1-vm1 lost") || m.contains("VM hv3-vm1 lost")),
        "a VM of an unaffected host was declared lost: {msgs:#?}"
    );

    // 2. hv2 powers on empty and rejoins (the agent's ExecStartPre and ExecStart again);
    //    nothing starts there.
    assert!(LAB.run(&["power-on", "hv2"]).status.success());
    LAB.wait_host_up("hv2");
    let msgs = LAB.wait_event("host hv2 rejoined");
    assert_eq!(
        count(&msgs, |m| m.contains("host hv2 rejoined")),
        1,
        "{msgs:#?}"
    );
    let v = LAB.ctl_json(&["vm", "show", "hv2-vm1"]).expect("vm");
    assert_eq!(
        (&v["host"], &v["state"]),
        (&"hv1".into(), &"running".into()),
        "{v:#}"
    );

    // 3. hv3 cut from the monitors but alive, on its storage heartbeat (the shipped storage
    //    cycle): isolated, fenced through its storage slot (no power fencing), its VM started
    //    exactly once on hv1, nothing on hv1 or hv2 stopped; healed, it rejoins and starts
    //    nothing.
    let t_part = Instant::now();
    assert!(LAB.run(&["partition", "hv3"]).status.success());
    let took = LAB.wait_vm_on("hv3-vm1", "hv1", 1, t_part);
    eprintln!(
        "FIGURE installed: partition hv3 -> hv3-vm1 running on hv1: {} ms",
        took.as_millis()
    );
    let part_ms = LAB
        .last_event_ms("partition", "hv3")
        .expect("partition in the timeline");
    LAB.assert_started_exactly_once("hv3-vm1", Some("hv1"), part_ms);
    LAB.assert_not_stopped(&["hv1", "hv2"], part_ms);
    let msgs = LAB.event_messages();
    assert_eq!(
        count(&msgs, |m| m
            .contains("host hv3: isolated: storage heartbeat")),
        1,
        "{msgs:#?}"
    );
    assert_eq!(
        count(&msgs, |m| m
            .contains("host hv3 fenced: storage slot: fence request")),
        1,
        "{msgs:#?}"
    );
    assert!(
        !msgs.iter().any(|m| m.contains("host hv3 fenced: power")),
        "hv3 was powered off although its storage slot answered: {msgs:#?}"
    );
    assert!(LAB.run(&["heal", "hv3"]).status.success());
    LAB.wait_host_up("hv3");
    let v = LAB.ctl_json(&["vm", "show", "hv3-vm1"]).expect("vm");
    assert_eq!(
        (&v["host"], &v["state"]),
        (&"hv1".into(), &"running".into()),
        "{v:#}"
    );

    // 4. The leader SIGKILLed: the unit's ExecStopPost (`--drop-vip`) removes the VIP it left,
    //    another monitor takes it, and the killed one restarts as a follower.
    let leader = LAB.vip_holder();
    let killed = LAB.run(&["kill-monitor", &leader]);
    assert!(killed.status.success());
    assert!(
        String::from_utf8_lossy(&killed.stdout).contains("--drop-vip removed the VIP"),
        "the unit's ExecStopPost did not run cleanly"
    );
    let status: serde_json::Value = serde_json::from_slice(
        &LAB.cmd(&["--json", "status"])
            .output()
            .expect("status")
            .stdout,
    )
    .expect("status JSON");
    let mon = status["monitors"]
        .as_array()
        .and_then(|a| a.iter().find(|m| m["name"] == leader.as_str()))
        .unwrap_or_else(|| panic!("{leader} not in {status:#}"));
    assert_eq!(
        mon["holds_vip"], false,
        "ExecStopPost left the VIP: {mon:#}"
    );
    let end = Instant::now() + Duration::from_secs(30);
    let next = loop {
        let h = LAB.vip_holder();
        if h != leader {
            break h;
        }
        assert!(
            Instant::now() < end,
            "the VIP stayed with the killed {leader}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    eprintln!("VIP: {leader} killed, now on {next}");
    assert!(LAB.run(&["restart-monitor", &leader]).status.success());
    assert_runs_unit_line(
        &format!("{leader}/monitor"),
        &root,
        "vigil-monitor.service",
        "/etc/vigil/monitor.toml",
        &lab_root.join("monitors").join(&leader).join("monitor.toml"),
        &[],
    );

    // 5. The independent observer: no VM ever ran on two hosts at once.
    LAB.assert_no_duplicates();
    eprintln!(
        "FIGURE installed test total: {} ms",
        t0.elapsed().as_millis()
    );
}
