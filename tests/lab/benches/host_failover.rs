//! Host failover in the lab, stage by stage: fault → suspected → verdict (investigation) →
//! proof → start order → domain running, for each proof path, repeated on a fresh lab.
//!
//! ```sh
//! sudo VIGIL_BENCH_RUNS=5 cargo bench -p vigil-lab --bench host_failover
//! ```
//!
//! `VIGIL_BENCH_TINY=1`: one run per path (what CI runs, also under `cargo test --bench
//! host_failover`), so that the benchmark cannot stop working unnoticed.
//!
//! Paths: `power` (crash-host: dead → fence_ipmilan against ipmi_sim), `slot` (partition from
//! the monitors, alive on storage → fence request acknowledged through the storage slot),
//! `lease` (partition from the monitors with the storage slot off and a BMC that refuses: the
//! agent fences itself, lease expiry is the proof). Times come from the replicated event log
//! (leader's wall clock) and the lab's timeline (the fault's own timestamp), on one machine.
//! Lab detector: heartbeat 500 ms, suspect 1250 ms, down 2500 ms; lease 5000 ms + 1000 ms.

use std::time::{Duration, Instant};

use serde_json::Value;

#[path = "../tests/support/mod.rs"]
mod support;

const LAB: support::LabCli = support::LabCli {
    root: "/var/lib/vigil-lab-bench",
    prefix: "vlb",
};

const STAGES: [&str; 5] = ["suspected", "verdict", "proof", "order", "running"];

fn events() -> Vec<(u64, String)> {
    LAB.ctl_json(&["events", "--limit", "1000"])
        .and_then(|v| v["events"].as_array().cloned())
        .unwrap_or_default()
        .iter()
        .map(|e| {
            (
                e["at_ms"].as_u64().unwrap_or(0),
                e["message"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

/// The timestamp of the lab's last fault.
fn last_fault_ms() -> u64 {
    let text = std::fs::read_to_string(std::path::Path::new(LAB.root).join("timeline.jsonl"))
        .unwrap_or_default();
    text.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["kind"] == "fault")
        .filter_map(|v| v["ts_ms"].as_u64())
        .next_back()
        .unwrap_or(0)
}

fn up() {
    let _ = LAB.run(&["down"]);
    LAB.up_three_hosts_fenced();
}

fn reconfigure(edit: impl Fn(String) -> String) {
    let path = std::path::Path::new(LAB.root).join("monitors/mon1/monitor.toml");
    let text = std::fs::read_to_string(&path).expect("monitor.toml");
    std::fs::write(&path, edit(text)).expect("write monitor.toml");
    LAB.ok(&["restart-monitor", "mon1"]);
    for h in ["hv1", "hv2", "hv3"] {
        LAB.wait_host_up(h);
    }
}

/// One run of a path: returns ms from the fault to each stage.
fn run(path: &str) -> Vec<u64> {
    up();
    if path == "lease" {
        reconfigure(|t| {
            t.replace("password = \"vigil\"", "password = \"wrong\"")
                .replace("[fencing]\n", "[fencing]\nstorage_slot = false\n")
        });
    }
    // The leader record must have been on storage for a lease before lease proofs count.
    std::thread::sleep(Duration::from_secs(7));
    let n = events().len();
    let t0 = Instant::now();
    match path {
        "power" => LAB.ok(&["crash-host", "hv2"]),
        _ => LAB.ok(&["partition", "hv2"]),
    }
    let fault = last_fault_ms();
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(v) = LAB.ctl_json(&["vm", "show", "hv2-vm1"]) {
            if v["host"] != "hv2" && v["state"] == "running" {
                break;
            }
        }
        assert!(Instant::now() < end, "hv2-vm1 never moved ({path})");
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = t0;
    std::thread::sleep(Duration::from_millis(500));
    let ev: Vec<(u64, String)> = events().into_iter().skip(n).collect();
    let at = |pred: &dyn Fn(&str) -> bool| -> u64 {
        ev.iter()
            .find(|(_, m)| pred(m))
            .map(|(t, _)| t.saturating_sub(fault))
            .unwrap_or(u64::MAX)
    };
    let times = vec![
        at(&|m| m.contains("host hv2 is suspect")),
        at(&|m| m.contains("host hv2: dead") || m.contains("host hv2: isolated")),
        at(&|m| m.contains("host hv2 fenced:")),
        at(&|m| m.contains("ordered start of VM hv2-vm1")),
        at(&|m| m.contains("VM hv2-vm1 running on")),
    ];
    let proof = ev
        .iter()
        .find(|(_, m)| m.contains("host hv2 fenced:"))
        .map(|(_, m)| m.split(": ").nth(1).unwrap_or("?").to_string())
        .unwrap_or_default();
    eprintln!("{path}: {times:?} ms (proof: {proof})");
    LAB.assert_no_duplicates();
    times
}

fn median(v: &mut [u64]) -> u64 {
    v.sort_unstable();
    v[v.len() / 2]
}

fn main() {
    let tiny = std::env::var("VIGIL_BENCH_TINY").is_ok_and(|v| v == "1");
    // `cargo bench` passes `--bench`; `cargo test --bench host_failover` passes nothing, and
    // runs the tiny size only when asked to (VIGIL_BENCH_TINY=1, as CI does).
    if !tiny && !std::env::args().any(|a| a == "--bench") {
        eprintln!("host_failover: run with `sudo cargo bench -p vigil-lab --bench host_failover` (or VIGIL_BENCH_TINY=1 for one run per path)");
        return;
    }
    // Skipped where the lab cannot run, like the lab tests (and, like them, fails under CI).
    if support::skip(
        "host_failover",
        &[
            "ip",
            "libvirtd",
            "qemu-system-x86_64",
            "ipmi_sim",
            "fence_ipmilan",
        ],
    ) {
        return;
    }
    let runs: usize = std::env::var("VIGIL_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if tiny { 1 } else { 5 });
    let _guard = support::start_supervisor(LAB.root, |a| LAB.cmd(a), || LAB.run(&["down"]));
    let mut table = Vec::new();
    for path in ["power", "slot", "lease"] {
        let mut per_stage: Vec<Vec<u64>> = vec![Vec::new(); STAGES.len()];
        for _ in 0..runs {
            for (i, t) in run(path).into_iter().enumerate() {
                per_stage[i].push(t);
            }
        }
        table.push((path, per_stage));
    }
    let _ = LAB.run(&["down"]);
    println!("\nhost failover in the lab, {runs} runs per path (ms after the fault; median / max)");
    println!(
        "{:<6} {:>17} {:>17} {:>17} {:>17} {:>17}",
        "path", STAGES[0], STAGES[1], STAGES[2], STAGES[3], STAGES[4]
    );
    for (path, mut stages) in table {
        let cells: Vec<String> = stages
            .iter_mut()
            .map(|v| {
                let max = v.iter().copied().max().unwrap_or(0);
                format!("{} / {}", median(v), max)
            })
            .collect();
        println!(
            "{:<6} {:>17} {:>17} {:>17} {:>17} {:>17}",
            path, cells[0], cells[1], cells[2], cells[3], cells[4]
        );
    }
}
