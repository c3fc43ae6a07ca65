//! The floating VIP after the leading monitor is SIGKILLed (issue 12's benchmark): three
//! monitors in their own namespaces, the leader (the namespace holding 198.18.0.250) is
//! killed, and from a hypervisor's namespace (hv1) `vigilctl status` is sent to the VIP alone
//! every 50 ms until another monitor answers it. The figure is the time from the SIGKILL to
//! the first answer from the new leader through the VIP. The killed monitor is then restarted
//! and the next run waits for a single holder again.
//!
//! ```sh
//! sudo VIGIL_BENCH_RUNS=10 cargo bench -p vigil-lab --bench vip_failover
//! ```
//!
//! `VIGIL_BENCH_TINY=1`: one run (what CI runs, also under `cargo test --bench vip_failover`).
//! Each probe is a new vigilctl process and a QUIC handshake (tens of ms here), so the figure
//! is an upper bound on when the VIP answered. Lab Raft timings: election timeout 400–800 ms,
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

/// The live monitor holding the VIP (`monN`), waiting for exactly one.
fn holder() -> String {
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let o = LAB.cmd(&["status", "--json"]).output().expect("status");
        let v: Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
        let h: Vec<String> = v["monitors"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .filter(|m| m["holds_vip"] == true && m["monitor"]["alive"] == true)
            .filter_map(|m| m["name"].as_str().map(String::from))
            .collect();
        if h.len() == 1 {
            return h[0].clone();
        }
        assert!(Instant::now() < end, "no single VIP holder: {h:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One run: ms from the SIGKILL of the leader to the new leader's first answer on the VIP.
fn run() -> u64 {
    let old = holder();
    let old_node: u64 = old.trim_start_matches("mon").parse().expect("monN");
    // The VIP answers from the leader before the fault.
    let end = Instant::now() + Duration::from_secs(20);
    while node_behind_vip() != Some(old_node) {
        assert!(Instant::now() < end, "the VIP does not answer from {old}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let t0 = Instant::now();
    LAB.ok(&["kill-monitor", &old]);
    let took = loop {
        if let Some(n) = node_behind_vip() {
            if n != old_node {
                break t0.elapsed();
            }
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "no new leader answered on the VIP within 30 s of killing {old}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    eprintln!(
        "killed {old}: the VIP answered from the new leader after {} ms",
        took.as_millis()
    );
    LAB.ok(&["restart-monitor", &old]);
    holder();
    took.as_millis() as u64
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
    let mut ms: Vec<u64> = (0..runs).map(|_| run()).collect();
    // A monitor failover touches no host: nothing stopped, nothing ran twice.
    LAB.assert_not_stopped(&[], t_start);
    LAB.assert_no_duplicates();
    let _ = LAB.run(&["down"]);
    ms.sort_unstable();
    println!(
        "\nVIP failover in the lab (SIGKILL of the leading monitor -> the new leader answers on the VIP, probed from hv1 every 50 ms), {runs} runs: median {} ms, max {} ms, min {} ms",
        ms[ms.len() / 2],
        ms[ms.len() - 1],
        ms[0]
    );
}
