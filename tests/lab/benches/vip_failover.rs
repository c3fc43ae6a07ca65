//! The floating VIP after the leading monitor is SIGKILLed (issue 12's benchmark): three
//! monitors in their own namespaces, the leader (the namespace holding 198.18.0.250) is
//! killed, and from a hypervisor's namespace (hv1) two figures are taken: when hv1's ARP entry
//! for the VIP moves to the new leader's MAC (the new leader's gratuitous ARP; polled every
//! 20 ms), and when `vigilctl status` sent to the VIP alone is first answered by the new leader
//! (probed from then on). The killed monitor is then restarted and the next run waits for a
//! single holder again.
//!
//! ```sh
//! sudo VIGIL_BENCH_RUNS=10 cargo bench -p vigil-lab --bench vip_failover
//! ```
//!
//! `VIGIL_BENCH_TINY=1`: one run (what CI runs, also under `cargo test --bench vip_failover`).
//! Each vigilctl probe is a new process and a QUIC handshake (150–300 ms in the lab's debug
//! build), and one sent while the VIP is still on the dead monitor waits out vigilctl's 1 s
//! timeout: hence the ARP figure, and vigilctl probes only once the ARP entry moved. Lab Raft timings: election timeout 400–800 ms,
//! leader lease L = 400 ms (docs/architecture.md, "The monitors' leader lease").

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

#[path = "../tests/support/mod.rs"]
mod support;

const LAB: support::LabCli = support::LabCli {
    root: "/var/lib/vigil-lab-vipbench",
    prefix: "vlv",
};

const VIP: &str = "198.18.0.250:7440";

/// `vigilctl --json status` sent to the VIP only, from hv1's namespace: the answering node.
fn node_behind_vip() -> Option<u64> {
    let tls = std::path::Path::new(LAB.root).join("tls");
    let out = Command::new("ip")
        .args(["netns", "exec", &format!("{}-hv1", LAB.prefix)])
        .arg(env!("CARGO_BIN_EXE_lab-vigilctl"))
        .args(["--monitor", VIP, "--timeout", "1", "--ca"])
        .arg(tls.join("ca.crt"))
        .arg("--cert")
        .arg(tls.join("admin.crt"))
        .arg("--key")
        .arg(tls.join("admin.key"))
        .args(["--json", "status"])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let v: Value = serde_json::from_slice(&out.stdout).ok()?;
    v["node"].as_u64()
}

/// The MAC address of `ns`'s eth0.
fn mac_of(ns: &str) -> String {
    let o = Command::new("ip")
        .args(["netns", "exec", ns, "cat", "/sys/class/net/eth0/address"])
        .output()
        .expect("ip netns exec");
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

/// The MAC hv1's neighbour table has for the VIP, if any.
fn vip_mac_seen_from_hv1() -> Option<String> {
    let o = Command::new("ip")
        .args(["netns", "exec", &format!("{}-hv1", LAB.prefix)])
        .args([
            "ip",
            "neigh",
            "show",
            VIP.split(':').next().unwrap_or_default(),
        ])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    let mut words = text.split_whitespace();
    words.find(|w| *w == "lladdr")?;
    words.next().map(String::from)
}

/// The live monitor holding the VIP (`monN`), waiting for exactly one.
fn holder() -> String {
    LAB.vip_holder()
}

/// One run: ms from the SIGKILL of the leader to (hv1's ARP entry for the VIP on the new
/// leader, the new leader's first answer on the VIP).
fn run() -> (u64, u64) {
    let old = holder();
    let old_node: u64 = old.trim_start_matches("mon").parse().expect("monN");
    let old_mac = mac_of(&format!("{}-{old}", LAB.prefix));
    // The VIP answers from the leader before the fault.
    let end = Instant::now() + Duration::from_secs(20);
    while node_behind_vip() != Some(old_node) {
        assert!(Instant::now() < end, "the VIP does not answer from {old}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let t0 = Instant::now();
    LAB.ok(&["kill-monitor", &old]);
    let arp = loop {
        if vip_mac_seen_from_hv1().is_some_and(|m| m != old_mac) {
            break t0.elapsed();
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "hv1's ARP entry for the VIP never left {old} within 30 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let answered = loop {
        if node_behind_vip().is_some_and(|n| n != old_node) {
            break t0.elapsed();
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "no new leader answered on the VIP within 30 s of killing {old}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    eprintln!(
        "killed {old}: hv1's ARP entry for the VIP moved after {} ms, the new leader answered on it after {} ms",
        arp.as_millis(),
        answered.as_millis()
    );
    LAB.ok(&["restart-monitor", &old]);
    holder();
    (arp.as_millis() as u64, answered.as_millis() as u64)
}

fn median_max(v: &mut [u64]) -> (u64, u64) {
    v.sort_unstable();
    (v[v.len() / 2], v[v.len() - 1])
}

fn main() {
    let tiny = std::env::var("VIGIL_BENCH_TINY").is_ok_and(|v| v == "1");
    if !tiny && !std::env::args().any(|a| a == "--bench") {
        eprintln!("vip_failover: run with `sudo cargo bench -p vigil-lab --bench vip_failover` (or VIGIL_BENCH_TINY=1 for one run)");
        return;
    }
    if support::skip("vip_failover", support::FENCED_LAB_PROGS) {
        return;
    }
    let runs: usize = std::env::var("VIGIL_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if tiny { 1 } else { 10 });
    let _ = LAB.run(&["down"]);
    let _guard = support::start_supervisor(LAB.root, |a| LAB.cmd(a), || LAB.run(&["down"]));
    LAB.up_three_hosts_fenced_monitors("3", &[]);
    let t_start = support::now_ms();
    let (mut arp, mut answered): (Vec<u64>, Vec<u64>) = (0..runs).map(|_| run()).unzip();
    // A monitor failover touches no host: nothing stopped, nothing ran twice.
    LAB.assert_not_stopped(&[], t_start);
    LAB.assert_no_duplicates();
    let _ = LAB.run(&["down"]);
    let (arp_med, arp_max) = median_max(&mut arp);
    let (ans_med, ans_max) = median_max(&mut answered);
    println!("\nVIP failover in the lab (SIGKILL of the leading monitor; seen from hv1), {runs} runs, median / max:");
    println!("  ARP entry for the VIP on the new leader: {arp_med} / {arp_max} ms");
    println!(
        "  vigilctl status through the VIP answered by the new leader: {ans_med} / {ans_max} ms"
    );
}
