//! The monitors' own HA in the lab (issue 12 item 7): three vigil-monitor processes in their
//! own namespaces form a Raft cluster, the leader holds the VIP 198.18.0.250, agents and
//! vigilctl (run from the `ops` namespace) reach it through the VIP. Losing the leader, by
//! SIGKILL or by a partition from the other monitors, moves the VIP to the new leader, and
//! no host is declared dead, fenced, or has a VM stopped or started because of it.
//!
//! Needs root, iproute2, libvirt, QEMU, ipmi_sim and fence_ipmilan. Skipped (with a message)
//! without them, except under `CI`.

use std::time::{Duration, Instant};

mod support;

/// Its own root and prefix: never another test's, nor a person's lab.
const LAB: support::LabCli = support::LabCli {
    root: "/var/lib/vigil-lab-monitors",
    prefix: "vlm",
};

const HOSTS: [&str; 3] = ["hv1", "hv2", "hv3"];
const VMS: [&str; 3] = ["hv1-vm1", "hv2-vm1", "hv3-vm1"];

use support::now_ms;

fn status() -> serde_json::Value {
    let o = LAB.run(&["status", "--json"]);
    assert!(o.status.success(), "vigil-lab status failed");
    serde_json::from_slice(&o.stdout).expect("status --json is JSON")
}

/// The monitors whose namespace holds the VIP, and whether each one's process is alive.
fn vip_holders() -> Vec<(String, bool)> {
    status()["monitors"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .filter(|m| m["holds_vip"] == true)
        .map(|m| {
            (
                m["name"].as_str().unwrap_or("?").to_string(),
                m["monitor"]["alive"] == true,
            )
        })
        .collect()
}

/// Waits until exactly one live monitor, other than `not`, holds the VIP; returns its name
/// and how long that took.
fn wait_live_holder_other_than(not: &str, within: Duration) -> (String, Duration) {
    let t0 = Instant::now();
    loop {
        let live: Vec<String> = vip_holders()
            .into_iter()
            .filter(|(n, alive)| *alive && n != not)
            .map(|(n, _)| n)
            .collect();
        if live.len() == 1 {
            return (live[0].clone(), t0.elapsed());
        }
        assert!(
            t0.elapsed() < within,
            "no single live VIP holder other than {not}: {live:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Waits until exactly one monitor holds the VIP, and it is alive.
fn wait_single_holder(within: Duration) -> String {
    let t0 = Instant::now();
    loop {
        let h = vip_holders();
        if h.len() == 1 && h[0].1 {
            return h[0].0.clone();
        }
        assert!(t0.elapsed() < within, "VIP holders {h:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// What a failover of the monitors must not do: no VM stopped or started anywhere, no host
/// fenced, every host up in the (new) leader's view, nothing ran twice.
fn assert_hosts_untouched(since_ms: u64) {
    for h in HOSTS {
        LAB.wait_host_up(h);
    }
    LAB.assert_not_stopped(&[], since_ms);
    let r = LAB.observer_report();
    for vm in VMS {
        let starts = r.starts_since(vm, since_ms);
        assert!(
            starts.is_empty(),
            "{vm} started again after a monitor failover: {starts:#?}"
        );
    }
    let events = LAB.event_messages();
    let fenced: Vec<&String> = events
        .iter()
        .filter(|m| m.to_lowercase().contains("fenc"))
        .collect();
    assert!(fenced.is_empty(), "a monitor failover fenced: {fenced:#?}");
    LAB.assert_no_duplicates();
}

#[test]
fn losing_the_leader_moves_the_vip_and_touches_no_host() {
    if support::skip("the monitors test", support::FENCED_LAB_PROGS) {
        return;
    }
    let _ = LAB.run(&["down"]);
    let _guard = support::start_supervisor(LAB.root, |a| LAB.cmd(a), || LAB.run(&["down"]));
    LAB.up_three_hosts_fenced_monitors("3", &[]);

    // 1. Three voters, one leader, and the VIP on exactly that monitor.
    let servers = LAB
        .ctl_json(&["server", "list"])
        .expect("vigilctl server list");
    let list = servers["servers"].as_array().cloned().unwrap_or_default();
    assert_eq!(list.len(), 3, "{servers:#}");
    let leaders: Vec<_> = list.iter().filter(|s| s["state"] == "leader").collect();
    assert_eq!(leaders.len(), 1, "{servers:#}");
    let first = wait_single_holder(Duration::from_secs(10));

    // 2. SIGKILL the leader: another monitor takes the VIP; hosts are not touched.
    let t_kill = now_ms();
    LAB.ok(&["kill-monitor", &first]);
    let (second, took) = wait_live_holder_other_than(&first, Duration::from_secs(30));
    eprintln!(
        "VIP moved from {first} to {second} {} ms after the SIGKILL",
        took.as_millis()
    );

    // 3. A SIGKILLed process cannot remove the VIP itself: kill-monitor does what the unit's
    //    `ExecStopPost=vigil-monitor --drop-vip` does after any exit, so the dead monitor's
    //    namespace no longer holds it (its kernel would go on answering ARP for it). Then it
    //    comes back as a follower.
    let holders = vip_holders();
    assert!(
        holders.iter().all(|(n, _)| *n != first),
        "the killed monitor {first} still holds the VIP: {holders:?}"
    );
    LAB.ok(&["restart-monitor", &first]);
    assert_eq!(wait_single_holder(Duration::from_secs(20)), second);
    assert_hosts_untouched(t_kill);

    // 4. Partition the leader from the other monitors: it steps down and drops the VIP, the
    //    majority elects a leader that takes it; healing leaves one holder.
    let t_part = now_ms();
    LAB.ok(&["partition", &second, "--from", "monitors"]);
    let (third, took) = wait_live_holder_other_than(&second, Duration::from_secs(30));
    eprintln!(
        "VIP moved from {second} to {third} {} ms after the partition",
        took.as_millis()
    );
    let holders = vip_holders();
    assert!(
        holders.iter().all(|(n, _)| *n != second),
        "the partitioned ex-leader {second} still holds the VIP: {holders:?}"
    );
    LAB.ok(&["heal", &second]);
    wait_single_holder(Duration::from_secs(20));
    assert_hosts_untouched(t_part.min(t_kill));
}
