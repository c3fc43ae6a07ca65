//! Leases, isolation, storage and the guards, end to end in the lab (issue 5): real agents,
//! three real monitors (a Raft cluster; the leader holds the VIP, issue 12), real QEMU
//! domains, shared storage through faultfs, BMCs through ipmi_sim, and the lab's independent
//! observer checking that no VM ever runs twice. Events are read from the current leader
//! itself (a follower's engine decides nothing), vigilctl otherwise goes through the VIP.
//!
//! One lab, one fault after the other (each leaves the lab as it found it):
//! 1. an agent killed and back within its lease: nothing moves, it adopts its domain;
//! 2. every monitor (all three) down for a minute: no guest stops; back: one leader holds
//!    the VIP, every agent is connected to it, no spurious recovery;
//! 3. a pool-wide storage outage: nobody fenced; a VM it stopped waits, restarts after heal;
//! 4. one host's storage fault: VMs without a disk on that pool stay, nothing is stopped;
//! 5. BMC dead and storage slot unreachable: lease expiry is the proof, no host stuck;
//! 6. isolated, alive on storage, storage slot off: the agent fences itself on lease expiry,
//!    the VM comes back elsewhere only after the lease; healed, the host starts nothing;
//! 7. a restart storm: a VM that cannot start does not loop forever;
//! 8. a mass failure: fencing is held and the alarm raised;
//! 9. the operator's `vigilctl fencing release`: the hosts fenced, their VMs start once.
//!
//! Needs root, iproute2, libvirt, QEMU, /dev/fuse, ipmi_sim and fence_ipmilan. Skipped (with a
//! message) without them, except under `CI`.

use std::time::{Duration, Instant};

use serde_json::Value;

mod support;

const LAB: support::LabCli = support::LabCli {
    root: "/var/lib/vigil-lab-isolation",
    prefix: "vli",
};

const MONITORS: [&str; 3] = ["mon1", "mon2", "mon3"];
const HOSTS: [&str; 3] = ["hv1", "hv2", "hv3"];

/// The leader: the one live monitor that holds the VIP, and says itself that it leads
/// (`status` asked of it alone). Waits up to 30 s for that.
fn leader() -> String {
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let holder = LAB.vip_holder();
        let st = LAB.ctl_json_at(&holder, &["status"]);
        if let Some(st) = &st {
            if st["leader"].as_u64().is_some() && st["leader"] == st["node"] {
                return holder;
            }
        }
        assert!(
            Instant::now() < end,
            "the VIP holder {holder} does not lead: {st:#?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The replicated event log's messages as the current leader has them, oldest first. Fails
/// the test rather than return a short list (a count taken from a failed read would make old
/// events look new).
fn leader_events() -> Vec<String> {
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let lead = leader();
        if let Some(v) = LAB.ctl_json_at(&lead, &["events", "--limit", "1000"]) {
            let msgs: Vec<String> = v["events"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .iter()
                .filter_map(|e| e["message"].as_str().map(String::from))
                .collect();
            assert!(
                msgs.len() < 1000,
                "the event log outgrew the window this test reads"
            );
            return msgs;
        }
        assert!(Instant::now() < end, "the leader {lead} gives no events");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Waits until `monitor` follows the current leader: its own `status` names as leader the
/// node that holds the VIP and leads (it is back in the cluster, not merely answering).
fn wait_in_cluster(monitor: &str) {
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        let lead = leader();
        let id: u64 = lead.trim_start_matches("mon").parse().expect("monN");
        let st = LAB.ctl_json_at(monitor, &["status"]);
        if st.as_ref().is_some_and(|s| s["leader"] == id) {
            return;
        }
        assert!(
            Instant::now() < end,
            "{monitor} does not follow the leader {lead}: {st:#?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Waits until every host is up and its agent connected in the view of the leader itself;
/// returns the leader.
fn wait_hosts_on_leader() -> String {
    let end = Instant::now() + Duration::from_secs(60);
    'again: loop {
        let lead = leader();
        for h in HOSTS {
            let v = LAB.ctl_json_at(&lead, &["host", "show", h]);
            if !v
                .as_ref()
                .is_some_and(|v| v["liveness"] == "up" && v["connected"] == true)
            {
                assert!(
                    Instant::now() < end,
                    "{h} is not up and connected at the leader {lead}: {v:#?}"
                );
                std::thread::sleep(Duration::from_millis(200));
                continue 'again;
            }
        }
        return lead;
    }
}

fn vm(name: &str) -> Value {
    LAB.ctl_json(&["vm", "show", name])
        .unwrap_or_else(|| panic!("vm show {name}"))
}

/// (host, generation) of a VM.
fn placement(name: &str) -> (String, u64) {
    let v = vm(name);
    (
        v["host"].as_str().unwrap_or_default().to_string(),
        v["generation"].as_u64().unwrap_or(u64::MAX),
    )
}

/// Events logged after the first `from` ones, as the leader has them.
fn events_since(from: usize) -> Vec<String> {
    leader_events().into_iter().skip(from).collect()
}

/// Domains running per host, as the lab (not Vigil) sees them.
fn running_domains() -> Vec<(String, Vec<String>)> {
    let o = LAB.cmd(&["status", "--json"]).output().expect("status");
    let v: Value = serde_json::from_slice(&o.stdout).expect("status json");
    v["hosts"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|h| {
            (
                h["name"].as_str().unwrap_or_default().to_string(),
                h["domains_running"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
                    .iter()
                    .filter_map(|d| d.as_str().map(String::from))
                    .collect(),
            )
        })
        .collect()
}

fn all_running(names: &[&str]) -> bool {
    let running: Vec<String> = running_domains().into_iter().flat_map(|(_, d)| d).collect();
    names.iter().all(|n| running.iter().any(|r| r == n))
}

/// The QEMU pid of a domain on a host.
fn qemu_pid(host: &str, domain: &str) -> i32 {
    let o = LAB.cmd(&["status", "--json"]).output().expect("status");
    let v: Value = serde_json::from_slice(&o.stdout).expect("status json");
    v["hosts"]
        .as_array()
        .and_then(|hs| hs.iter().find(|h| h["name"] == host).cloned())
        .and_then(|h| {
            h["qemu"]
                .as_array()
                .and_then(|q| q.iter().find(|e| e["domain"] == domain).cloned())
        })
        .and_then(|e| e["pid"].as_i64())
        .unwrap_or_else(|| panic!("no QEMU pid for {domain} on {host}")) as i32
}

/// Changes one cluster setting the operator's way, `vigilctl config get`, edit, `config
/// set`, through the VIP: the cluster-wide sections of the monitors' files only seed a new
/// cluster (issue 12 item 9), so editing them would change nothing here. It holds on the
/// leader as soon as it commits; no monitor restarts.
fn change_cluster_setting(key: &str, edit: impl Fn(String) -> String) {
    let get = |what: &str| {
        LAB.ctl_json(&["config", "get", key])
            .unwrap_or_else(|| panic!("vigilctl config get {key} failed ({what})"))
    };
    let before = get("before");
    let current = before["value"].as_str().expect("a value").to_string();
    let changed = edit(current.clone());
    assert_ne!(changed, current, "the edit changed nothing in {key}");
    LAB.ok(&["ctl", "--", "config", "set", key, &changed]);
    let after = get("after");
    assert_eq!(
        after["revision"].as_u64(),
        before["revision"].as_u64().map(|r| r + 1),
        "{key}: {before} -> {after}"
    );
    eprintln!(
        "cluster setting {key} changed (revision {})",
        after["revision"]
    );
}

/// "monitor node N became leader in term T" at most once per term: one event per state
/// change, not one per check.
fn assert_one_leader_event_per_term(ev: &[String]) {
    let mut terms: Vec<&str> = ev
        .iter()
        .filter(|m| m.contains("became leader in term"))
        .filter_map(|m| m.rsplit(' ').next())
        .collect();
    let n = terms.len();
    terms.sort();
    terms.dedup();
    assert_eq!(terms.len(), n, "a leader change logged twice: {ev:#?}");
}

fn wait_event(from: usize, what: &str, within: Duration) -> Vec<String> {
    let end = Instant::now() + within;
    loop {
        let ev = events_since(from);
        if ev.iter().any(|m| m.contains(what)) {
            return ev;
        }
        assert!(
            Instant::now() < end,
            "no event containing {what:?}: {ev:#?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn assert_no_fencing(ev: &[String]) {
    assert!(
        !ev.iter()
            .any(|m| m.contains("fencing host") || m.contains(" fenced: ")),
        "nobody may be fenced here: {ev:#?}"
    );
}

#[test]
fn leases_isolation_and_storage_faults_never_run_a_vm_twice() {
    if support::skip(
        "the isolation test",
        &[
            "ip",
            "libvirtd",
            "virsh",
            "qemu-system-x86_64",
            "qemu-img",
            "ipmi_sim",
            "fence_ipmilan",
        ],
    ) {
        return;
    }
    let _ = LAB.run(&["down"]);
    let _guard = support::start_supervisor(LAB.root, |a| LAB.cmd(a), || LAB.run(&["down"]));
    // Step 1 keeps an agent dead for 4 s: the host watchdog must outlast that.
    LAB.up_three_hosts_fenced_monitors("3", &["--watchdog-secs", "6"]);
    let first = wait_hosts_on_leader();
    eprintln!("{first} leads");
    let vms = ["hv1-vm1", "hv2-vm1", "hv3-vm1"];
    // Leader record on storage for a lease and more: lease proofs are possible from here.
    std::thread::sleep(Duration::from_secs(6));

    // 1. The agent of hv2 is killed (systemd would restart it) and comes back within its
    //    lease: its guest keeps running, nothing moves, the new agent adopts the domain.
    let before = placement("hv2-vm1");
    let n = leader_events().len();
    LAB.ok(&["kill-agent", "hv2"]);
    std::thread::sleep(Duration::from_secs(4));
    assert!(all_running(&["hv2-vm1"]), "the guest must keep running");
    LAB.ok(&["start-agent", "hv2"]);
    LAB.wait_host_up("hv2");
    std::thread::sleep(Duration::from_secs(3));
    let ev = events_since(n);
    assert!(
        ev.iter().any(|m| m.contains("host hv2: agent-down")),
        "investigation must find hv2 alive with its agent down: {ev:#?}"
    );
    assert_no_fencing(&ev);
    assert_eq!(placement("hv2-vm1"), before, "{ev:#?}");
    assert_eq!(vm("hv2-vm1")["state"], "running");

    // 2. Every monitor (all three) down for a minute: leases run out, but the leader record
    //    goes stale too, so no agent stops a guest. Back: one leader holds the VIP, every
    //    agent is connected to it, nothing is recovered, stopped, started or moved.
    let before: Vec<(String, u64)> = vms.iter().map(|v| placement(v)).collect();
    let n = leader_events().len();
    let t_kill = support::now_ms();
    for m in MONITORS {
        LAB.ok(&["kill-monitor", m]);
    }
    for _ in 0..6 {
        std::thread::sleep(Duration::from_secs(10));
        assert!(
            all_running(&vms),
            "a guest stopped while every monitor was down: {:?}",
            running_domains()
        );
    }
    for m in MONITORS {
        LAB.ok(&["restart-monitor", m]);
    }
    let lead = wait_hosts_on_leader();
    for m in MONITORS {
        wait_in_cluster(m);
    }
    eprintln!("every monitor back; {lead} leads");
    std::thread::sleep(Duration::from_secs(8));
    assert_eq!(leader(), lead, "the leadership moved with nothing wrong");
    let ev = events_since(n);
    assert!(
        !ev.iter().any(|m| m.contains("crashed")
            || m.contains("lost")
            || m.contains("fenced")
            || m.contains("ordered start")),
        "spurious recovery or self-fence after the monitors came back: {ev:#?}"
    );
    assert_one_leader_event_per_term(&ev);
    let after: Vec<(String, u64)> = vms.iter().map(|v| placement(v)).collect();
    assert_eq!(after, before);
    assert!(all_running(&vms));
    // The observer's view (QEMU instances): no guest stopped, none started again.
    LAB.assert_not_stopped(&[], t_kill);
    let r = LAB.observer_report();
    for v in vms {
        let starts = r.starts_since(v, t_kill);
        assert!(
            starts.is_empty(),
            "{v} started again after every monitor was down: {starts:#?}"
        );
    }
    std::thread::sleep(Duration::from_secs(6));

    // 3. Pool-wide storage outage: nobody is fenced. A guest it stopped (its QEMU dies) waits
    //    (nothing is placed on a pool that is down) and restarts once the storage heals.
    let n = leader_events().len();
    let (h1, g1) = placement("hv1-vm1");
    LAB.ok(&["storage", "fail"]);
    wait_event(n, "pool-wide outage", Duration::from_secs(10));
    let pid = qemu_pid(&h1, "hv1-vm1");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill QEMU");
    wait_event(n, "VM hv1-vm1 crashed", Duration::from_secs(10));
    std::thread::sleep(Duration::from_secs(5));
    assert_ne!(
        vm("hv1-vm1")["state"],
        "running",
        "started on a pool that is down"
    );
    let t_heal = Instant::now();
    LAB.ok(&["storage", "heal"]);
    let took = LAB.wait_vm_on("hv1-vm1", &h1, g1 + 1, t_heal);
    eprintln!(
        "FIGURE storage heal -> hv1-vm1 running again: {} ms",
        took.as_millis()
    );
    assert_no_fencing(&events_since(n));
    std::thread::sleep(Duration::from_secs(3));

    // 4. One host's storage fault (issue 9 item 10): only VMs with a disk on the failed pool
    //    move. The lab's guests are diskless, so none of hv3's VMs depends on the pool: past
    //    the 5 s grace nothing is destroyed, nothing moves, and hv3 is not fenced. (The move
    //    of VMs whose disks are on the pool is scenario 31 and the engine's unit tests; lab
    //    guests with disks on the shared pool are still to come.)
    let n = leader_events().len();
    let before: Vec<(String, u64)> = vms.iter().map(|v| placement(v)).collect();
    assert!(
        before.iter().any(|(h, _)| h == "hv3"),
        "hv3 runs a VM: {before:?}"
    );
    LAB.ok(&["storage", "fail", "--host", "hv3"]);
    std::thread::sleep(Duration::from_secs(9));
    for (v, p0) in vms.iter().zip(&before) {
        assert_eq!(
            &placement(v),
            p0,
            "{v} must be untouched: no disk on the failed pool; {:#?}",
            events_since(n)
        );
        assert_eq!(vm(v)["state"], "running", "{v}");
    }
    let ev = events_since(n);
    assert!(ev.iter().any(|m| m.contains("down on hv3 only")), "{ev:#?}");
    assert_no_fencing(&ev);
    LAB.ok(&["storage", "heal", "--host", "hv3"]);
    std::thread::sleep(Duration::from_secs(3));

    // 5. BMC dead and storage slot unreachable: hv2 loses its network and its storage, and
    //    its BMC refuses the monitor. Power fencing fails, the slot cannot reach it; its
    //    agent fences itself when the lease runs out, and lease expiry is the proof.
    change_cluster_setting("fencing.hosts", |t| {
        t.replace("password = \"(hidden)\"", "password = \"wrong\"")
    });
    let n = leader_events().len();
    let vm_on_hv2: Vec<String> = running_domains()
        .into_iter()
        .find(|(h, _)| h == "hv2")
        .map(|(_, d)| d)
        .unwrap_or_default();
    assert!(!vm_on_hv2.is_empty(), "hv2 runs a VM");
    let name = vm_on_hv2[0].clone();
    let (_, g) = placement(&name);
    let t_cut = Instant::now();
    LAB.ok(&["partition", "hv2", "--from", "all"]);
    LAB.ok(&["storage", "fail", "--host", "hv2"]);
    LAB.wait_moved(&name, "hv2", g + 1, t_cut);
    eprintln!(
        "FIGURE BMC dead + storage cut -> {name} running elsewhere (lease path): {} ms",
        t_cut.elapsed().as_millis()
    );
    let ev = events_since(n);
    assert!(
        ev.iter().any(|m| m.contains("fencing host hv2 failed")),
        "{ev:#?}"
    );
    assert!(
        ev.iter()
            .any(|m| m.contains("host hv2 fenced: lease expired")),
        "{ev:#?}"
    );
    assert_ne!(
        LAB.ctl_json(&["host", "show", "hv2"]).expect("host")["phase"]["phase"],
        "fencing",
        "hv2 stuck in fencing"
    );
    LAB.ok(&["storage", "heal", "--host", "hv2"]);
    LAB.ok(&["heal", "hv2"]);
    LAB.wait_host_up("hv2");
    std::thread::sleep(Duration::from_secs(3));
    assert_ne!(
        placement(&name).0,
        "hv2",
        "healed hv2 must not take its VM back"
    );

    // 6. Isolated but alive on storage, with the storage slot off (and the BMC still
    //    refusing): hv1 keeps its VM until its lease runs out, then destroys it itself; the VM
    //    comes back elsewhere only after the lease. Healed, hv1 starts nothing.
    change_cluster_setting("fencing.storage_slot", |t| t.replace("true", "false"));
    let n = leader_events().len();
    let on_hv1: Vec<String> = running_domains()
        .into_iter()
        .find(|(h, _)| h == "hv1")
        .map(|(_, d)| d)
        .unwrap_or_default();
    assert!(!on_hv1.is_empty(), "hv1 runs a VM");
    let name = on_hv1[0].clone();
    let (_, g) = placement(&name);
    let t_part = Instant::now();
    LAB.ok(&["partition", "hv1"]);
    LAB.wait_moved(&name, "hv1", g + 1, t_part);
    let took = t_part.elapsed();
    eprintln!(
        "FIGURE isolated hv1 (lease path) -> {name} running elsewhere: {} ms",
        took.as_millis()
    );
    assert!(
        took >= Duration::from_secs(5),
        "moved before the lease (5 s) could have run out: {took:?}"
    );
    let ev = events_since(n);
    assert!(
        ev.iter().any(|m| m.contains("host hv1: isolated")),
        "{ev:#?}"
    );
    assert!(
        ev.iter()
            .any(|m| m.contains("host hv1 fenced: lease expired")),
        "{ev:#?}"
    );
    LAB.ok(&["heal", "hv1"]);
    LAB.wait_host_up("hv1");
    wait_event(n, "host hv1 fenced itself", Duration::from_secs(10));
    std::thread::sleep(Duration::from_secs(3));
    // One isolation episode, one event (issue 9 item 12: it used to be one per check),
    // however often the agent resent its report.
    let reports = events_since(n)
        .iter()
        .filter(|m| m.contains("host hv1 fenced itself"))
        .count();
    assert_eq!(reports, 1, "{:#?}", events_since(n));
    assert_ne!(placement(&name).0, "hv1", "healed hv1 must not start it");
    let doms: Vec<String> = running_domains()
        .into_iter()
        .find(|(h, _)| h == "hv1")
        .map(|(_, d)| d)
        .unwrap_or_default();
    assert!(!doms.contains(&name), "{name} runs on hv1 again: {doms:?}");
    LAB.assert_no_duplicates();

    // 7. Restart storm: a VM whose disk is gone cannot start; its restarts back off and
    //    stop at the budget instead of looping for ever.
    let n = leader_events().len();
    let (h, _) = placement("hv2-vm1");
    std::fs::remove_file(std::path::Path::new(LAB.root).join("storage/backing/hv2-vm1.qcow2"))
        .expect("remove the disk");
    let pid = qemu_pid(&h, "hv2-vm1");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill QEMU");
    let ev = wait_event(n, "giving up", Duration::from_secs(120));
    let attempts = ev
        .iter()
        .filter(|m| m.contains("ordered start of VM hv2-vm1"))
        .count();
    assert!(
        (1..=5).contains(&attempts),
        "{attempts} start orders: {ev:#?}"
    );
    std::thread::sleep(Duration::from_secs(5));
    let later = events_since(n)
        .iter()
        .filter(|m| m.contains("ordered start of VM hv2-vm1"))
        .count();
    assert_eq!(later, attempts, "it kept restarting after giving up");

    // 8. Mass failure: two of three hosts lose power at once. More likely the monitors' own
    //    network: automatic fencing is held and the alarm raised.
    let n = leader_events().len();
    // The hosts that run VMs now (the steps before moved some), and those VMs.
    let lost_with: Vec<(String, Vec<String>)> = running_domains()
        .into_iter()
        .filter(|(h, d)| (h == "hv2" || h == "hv3") && !d.is_empty())
        .collect();
    let lost: Vec<String> = lost_with.iter().flat_map(|(_, d)| d.clone()).collect();
    assert!(
        !lost.is_empty(),
        "hv2 or hv3 runs a VM before the mass failure"
    );
    LAB.ok(&["crash-host", "hv2"]);
    LAB.ok(&["crash-host", "hv3"]);
    let ev = wait_event(n, "mass failure", Duration::from_secs(20));
    std::thread::sleep(Duration::from_secs(3));
    assert_no_fencing(&events_since(n));
    drop(ev);

    // 9. The operator checked and lifts the hold (`vigilctl fencing release`, shaped like
    //    Pacemaker's stonith_admin --confirm): recorded with the admin's name, each host that
    //    ran a VM is fenced (by its lease here: step 5 left the BMC password wrong), and each
    //    of those VMs starts once, on hv1.
    let t_release = support::now_ms();
    let released = LAB.ctl_json(&["fencing", "release"]);
    assert!(released.is_some(), "vigilctl fencing release failed");
    let ev = wait_event(n, "released the mass-failure hold", Duration::from_secs(10));
    assert!(
        ev.iter()
            .any(|m| m.contains("released the mass-failure hold") && m.contains("admin")),
        "{ev:#?}"
    );
    for (host, _) in &lost_with {
        wait_event(n, &format!("host {host} fenced: "), Duration::from_secs(60));
    }
    for vm in &lost {
        LAB.assert_started_exactly_once(vm, Some("hv1"), t_release);
    }
    LAB.assert_not_stopped(&["hv1"], t_release);

    LAB.assert_no_duplicates();
}
