//! The hosts' watchdogs in the lab (issue 9 item 3, proof 3 of the one rule in
//! docs/architecture.md): lease expiry is proof only because a watchdog resets a host whose
//! agent no longer feeds it.
//!
//! 1. Every monitor down for longer than W (and a lease): no watchdog resets anything, no VM
//!    stops (an outage of all monitors is not isolation).
//! 2. The agent of hv2 dead for good and hv2 cut off from everything (no BMC fencing, the
//!    storage slot unanswered): hv2's watchdog resets it (the lab's power loss) **before**
//!    hv2-vm1 starts anywhere else, and hv2-vm1 then starts exactly once, on hv1 (ha_tag);
//!    nothing on hv1 or hv3 stops; the observer sees no VM twice.
//!
//! Needs the agent's watchdog support (it arms `[watchdog] device` and feeds it) and
//! `vigil-lab-watchdog` next to `vigil-lab` (`cargo build --bins`). Needs root, iproute2,
//! libvirt, QEMU. Skipped (with a message) without them, except under `CI`.

use std::time::{Duration, Instant};

mod support;

const LAB: support::LabCli = support::LabCli {
    root: "/var/lib/vigil-lab-watchdog",
    prefix: "vlw",
};

/// `--watchdog-secs` of this lab.
const W: u64 = 2;
const MONITORS: [&str; 3] = ["mon1", "mon2", "mon3"];
const HOSTS: [&str; 3] = ["hv1", "hv2", "hv3"];

use support::now_ms;

fn no_watchdog_reset_anywhere(what: &str) {
    for h in HOSTS {
        let resets = LAB.watchdog_resets(h);
        assert!(
            resets.is_empty(),
            "{what}: the watchdog reset {h} at {resets:?}"
        );
    }
}

#[test]
fn watchdogs_reset_a_dead_agents_cut_off_host_before_its_vm_moves_and_nothing_while_monitors_are_down(
) {
    if support::skip(
        "the watchdog test",
        &["ip", "libvirtd", "virsh", "qemu-system-x86_64"],
    ) {
        return;
    }
    let _ = LAB.run(&["down"]);
    let _guard = support::start_supervisor(LAB.root, |a| LAB.cmd(a), || LAB.run(&["down"]));
    // No --fencing: no power proof; hv2's only way out is lease expiry backed by its watchdog.
    LAB.ok(&[
        "up",
        "--hosts",
        "3",
        "--monitors",
        "3",
        "--vms-per-host",
        "1",
        "--ha-tag",
        "ha",
        "--tagged-hosts",
        "1",
        "--watchdog-secs",
        &W.to_string(),
    ]);
    let status: serde_json::Value = serde_json::from_slice(
        &LAB.cmd(&["--json", "status"])
            .output()
            .expect("status")
            .stdout,
    )
    .expect("status --json");
    assert_eq!(
        status["components"]["watchdog"], true,
        "this lab needs vigil-lab-watchdog (cargo build --bins): {status}"
    );
    LAB.wait_definitions(&["hv1-vm1", "hv2-vm1", "hv3-vm1"]);
    for h in HOSTS {
        LAB.wait_watchdog(h, "armed", Duration::from_secs(30));
        assert_eq!(LAB.watchdog_status(h)["timeout_secs"], W, "{h}");
    }

    // 1. Every monitor down for well over W and a lease: nothing is reset, nothing stops.
    let t_mon = now_ms();
    for m in MONITORS {
        LAB.ok(&["kill-monitor", m]);
    }
    std::thread::sleep(Duration::from_secs(6 * W + 10));
    no_watchdog_reset_anywhere("monitors down");
    LAB.assert_not_stopped(&[], t_mon);
    for h in HOSTS {
        LAB.wait_watchdog(h, "armed", Duration::from_secs(1));
    }
    for m in MONITORS {
        LAB.ok(&["restart-monitor", m]);
    }
    for h in HOSTS {
        LAB.wait_host_up(h);
    }
    std::thread::sleep(Duration::from_secs(3 * W));
    no_watchdog_reset_anywhere("after the monitors came back");
    LAB.assert_not_stopped(&[], t_mon);

    // 2. hv2's agent dead for good, hv2 cut off from everything.
    LAB.ok(&["kill-agent", "hv2"]);
    LAB.ok(&["partition", "hv2", "--from", "all"]);
    let t_fault = LAB
        .last_event_ms("kill-agent", "hv2")
        .expect("kill-agent in the timeline");
    let end = Instant::now() + Duration::from_secs(W + 10);
    let reset_ms = loop {
        if let Some(t) = LAB.watchdog_resets("hv2").first() {
            break *t;
        }
        assert!(
            Instant::now() < end,
            "hv2's watchdog never reset it: {:#?}",
            LAB.watchdog_status("hv2")
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    eprintln!(
        "FIGURE kill-agent hv2 -> watchdog reset of hv2: {} ms (W = {W} s)",
        reset_ms.saturating_sub(t_fault)
    );
    // The watchdog counts from the agent's last feed, which is up to one feeding interval
    // (W/4, at most 500 ms) before the kill.
    assert!(
        reset_ms + 600 >= t_fault + W * 1000,
        "reset {} ms after the kill: too early for W = {W} s",
        reset_ms - t_fault
    );
    // The reset was the lab's power loss. The expiry is logged first and its action (the
    // lab's crash-host, which waits until every process of hv2 is gone) logs when done.
    let crash_end = Instant::now() + Duration::from_secs(15);
    let crash = loop {
        if let Some(e) = LAB
            .lab_events()
            .into_iter()
            .rfind(|e| e["verb"] == "crash-host" && e["target"] == "hv2")
        {
            break e;
        }
        assert!(
            Instant::now() < crash_end,
            "no crash-host hv2 after the watchdog reset: {:#?}",
            LAB.watchdog_status("hv2")
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(crash["detail"]["source"], "watchdog", "{crash}");

    LAB.wait_vm_on("hv2-vm1", "hv1", 1, Instant::now());
    let started = LAB.assert_started_exactly_once("hv2-vm1", Some("hv1"), t_fault);
    eprintln!(
        "FIGURE kill-agent hv2 -> hv2-vm1 running on hv1 (lease path, watchdog included): {} ms",
        started.start_ms.saturating_sub(t_fault)
    );
    assert!(
        started.start_ms > reset_ms,
        "hv2-vm1 started on hv1 at {} before hv2's watchdog reset at {reset_ms}",
        started.start_ms
    );
    let r = LAB.observer_report();
    let old = r
        .vm("hv2-vm1")
        .and_then(|v| v.intervals.iter().find(|i| i.host == "hv2").cloned())
        .expect("hv2-vm1's instance on hv2");
    assert!(
        old.stop_ms.is_some_and(|s| s <= started.start_ms),
        "the old copy on hv2 must be gone before the new one starts: {old:#?} / {started:#?}"
    );
    LAB.assert_not_stopped(&["hv1", "hv3"], t_fault);
    LAB.assert_no_duplicates();
    assert_eq!(LAB.watchdog_status("hv2")["state"], "off");

    // hv2 comes back: heal, power on; its new agent arms a fresh watchdog; no VM runs twice.
    LAB.ok(&["heal", "hv2"]);
    LAB.ok(&["power-on", "hv2"]);
    LAB.wait_host_up("hv2");
    LAB.wait_watchdog("hv2", "armed", Duration::from_secs(30));
    assert_eq!(
        LAB.watchdog_resets("hv2").len(),
        1,
        "one reset for one fault"
    );
    std::thread::sleep(Duration::from_secs(2));
    LAB.assert_no_duplicates();

    // 3. `systemctl stop` of an agent (SIGTERM). hv2 runs no HA domain now: its agent
    //    disarms the watchdog on the way out, and nothing resets the host (before, every
    //    clean stop — a package removal, a host shutdown after its guests stopped — reset
    //    it). hv3 runs one: its watchdog stays armed, so lease expiry stays a proof.
    assert!(
        running_on("hv2").is_empty(),
        "hv2 came back empty: {:?}",
        running_on("hv2")
    );
    LAB.ok(&["stop-agent", "hv2"]);
    LAB.wait_watchdog("hv2", "disarmed", Duration::from_secs(5));
    std::thread::sleep(Duration::from_secs(W + 2));
    assert_eq!(
        LAB.watchdog_resets("hv2").len(),
        1,
        "a clean stop of an agent with no HA domain reset hv2"
    );
    LAB.ok(&["start-agent", "hv2"]);
    LAB.wait_host_up("hv2");
    assert!(!running_on("hv3").is_empty(), "hv3 runs its VM");
    let t_stop = now_ms();
    LAB.ok(&["stop-agent", "hv3"]);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        LAB.watchdog_status("hv3")["state"],
        "armed",
        "hv3 runs an HA domain: its watchdog must stay armed after a clean stop"
    );
    LAB.ok(&["start-agent", "hv3"]);
    LAB.wait_host_up("hv3");
    assert!(
        LAB.watchdog_resets("hv3").is_empty(),
        "restarted within W: no reset"
    );
    LAB.assert_not_stopped(&["hv3"], t_stop);
    LAB.assert_no_duplicates();
}

/// The domains `host` runs, as the lab sees them.
fn running_on(host: &str) -> Vec<String> {
    LAB.host_status(host)["domains_running"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .filter_map(|d| d.as_str().map(String::from))
        .collect()
}
