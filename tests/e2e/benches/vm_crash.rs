//! VM crash → running again, over repeated runs, against a real (private) libvirtd with a
//! real QEMU domain, one monitor and one agent, all on this machine.
//!
//! For each run: kill -9 the domain's qemu (t0), then read
//! - agent noticed: when the agent received libvirt's STOPPED event (from the VM-failed event's
//!   `observed_at_ms`, stamped by the agent);
//! - monitor decided: when the monitor committed the failure and its decision (event time);
//! - start ordered: when the monitor committed the new generation and sent the start;
//! - running: when libvirt reported the domain started again (this benchmark's own libvirt
//!   event subscription, independent of Vigil).
//!
//! Run: `cargo bench -p vigil-e2e --bench vm_crash` (VIGIL_BENCH_RUNS, default 20).
//! VIGIL_BENCH_TINY=1: one run (what CI runs, also under `cargo test --bench vm_crash`).

#[path = "../harness.rs"]
mod harness;
#[path = "../libvirt_sandbox.rs"]
mod libvirt_sandbox;

use std::time::Duration;

use harness::*;
use libvirt_sandbox::LibvirtSandbox;
use vigil_agent::libvirt::Hypervisor;
use vigil_common::domain::LifecycleKind;

fn stats(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n == 0 {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    (v[0], median, v[n - 1])
}

fn main() {
    let tiny = bench_tiny();
    if !tiny && !std::env::args().any(|a| a == "--bench") {
        eprintln!("vm_crash: run with `cargo bench -p vigil-e2e --bench vm_crash` (or VIGIL_BENCH_TINY=1 for a smoke run)");
        return;
    }
    let runs: usize = std::env::var("VIGIL_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if tiny { 1 } else { 20 });
    // Skipped, like the libvirt tests, where a private libvirtd cannot run.
    if let Some(why) = LibvirtSandbox::unavailable_reason() {
        eprintln!("vm_crash: skipped: {why}");
        return;
    }
    let sb = LibvirtSandbox::start().unwrap_or_else(|e| {
        eprintln!("vm_crash: FAILED: the libvirt sandbox did not start: {e}");
        std::process::exit(1);
    });
    let pki = Pki::new();
    let dir = pki.dir.path().join("run");
    // Each crash is the VM's first within the budget window: the window is 1 s and runs are
    // spaced further apart, so no backoff applies (backoff is measured by the tests).
    let mut mon = MonitorProc::start(
        &pki,
        &dir,
        "[detector]\nheartbeat_interval_ms = 200\nsuspect_after_ms = 600\ndown_after_ms = 1000\n[recovery]\nwindow_ms = 1000\n",
    );
    let ctl = Ctl::new(&pki, vec![mon.addr]);
    if let Err(e) = ctl.wait_started(&mut mon, Duration::from_secs(30)) {
        eprintln!("vm_crash: FAILED: {e}");
        std::process::exit(1);
    }
    let _agent = AgentProc::start(
        &pki,
        &dir,
        "hv1",
        mon.addr,
        &format!("libvirt_uri = {:?}\nlibvirt_deadline_ms = 30000\n", sb.uri),
    );
    wait_for(Duration::from_secs(30), || {
        (ctl.liveness("hv1").as_deref() == Some("up")).then_some(())
    })
    .expect("agent up");

    let xml = LibvirtSandbox::domain_xml("bench1", 64);
    let path = dir.join("bench1.xml");
    std::fs::write(&path, xml).expect("xml");
    sb.virsh_ok(&["define", path.to_str().expect("path")]);
    sb.virsh_ok(&["start", "bench1"]);
    let uuid = sb.virsh_ok(&["domuuid", "bench1"]);
    wait_for(Duration::from_secs(30), || {
        let v = ctl.json(&["vm", "show", "bench1"]).ok()?;
        (v["state"] == "running").then_some(())
    })
    .expect("reported");
    ctl.json(&["vm", "ha", "enable", "bench1"]).expect("ha");

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("rt");
    let hv = Hypervisor::open(&sb.uri, Duration::from_secs(30));
    let mut events = hv.events().expect("events");
    let (mut notice, mut decide, mut order, mut running) = (vec![], vec![], vec![], vec![]);
    println!("VM crash → running again: {runs} runs, 1 monitor + 1 agent + private libvirtd on one 2-core machine, QEMU TCG, 64 MiB diskless domain");
    println!();
    println!("| run | agent noticed | monitor decided | start ordered | domain running |");
    println!("|---:|---:|---:|---:|---:|");
    for run in 1..=runs {
        std::thread::sleep(Duration::from_millis(1_500));
        let generation_before = ctl.json(&["vm", "show", "bench1"]).expect("vm")["generation"]
            .as_u64()
            .unwrap_or(0);
        let pid = wait_for(Duration::from_secs(30), || sb.qemu_pid("bench1")).expect("pid");
        // Drain old events.
        while events.try_recv().is_ok() {}
        let t0 = vigil_common::unix_ms();
        let _ = std::process::Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status();
        let t_running = rt.block_on(async {
            loop {
                match tokio::time::timeout(Duration::from_secs(60), events.recv()).await {
                    Ok(Some(ev)) if ev.uuid == uuid && ev.kind == LifecycleKind::Started => {
                        break ev.at_ms
                    }
                    Ok(Some(_)) => continue,
                    _ => panic!("no restart within 60 s"),
                }
            }
        });
        // Read the monitor's account of this run.
        let evs = wait_for(Duration::from_secs(10), || {
            let all = ctl.json(&["events", "--limit", "50"]).ok()?;
            let list = all["events"].as_array()?.clone();
            let mine: Vec<_> = list
                .into_iter()
                .filter(|e| e["vm"] == uuid.as_str())
                .collect();
            let failed = mine.iter().rev().find(|e| {
                e["kind"] == "vm_failed" && e["generation"].as_u64() == Some(generation_before)
            })?;
            let ordered = mine.iter().rev().find(|e| {
                e["kind"] == "vm_restart_ordered"
                    && e["generation"].as_u64() == Some(generation_before + 1)
            })?;
            Some((failed.clone(), ordered.clone()))
        })
        .expect("events of this run");
        let ms = |v: &serde_json::Value| v.as_u64().unwrap_or(0) as f64;
        // Without an agent timestamp the failure was caught by the inventory backstop.
        let n = evs.0["observed_at_ms"]
            .as_u64()
            .map(|v| v as f64 - t0 as f64)
            .unwrap_or(f64::NAN);
        let d = ms(&evs.0["at_ms"]) - t0 as f64;
        let o = ms(&evs.1["at_ms"]) - t0 as f64;
        let r = t_running as f64 - t0 as f64;
        let n_text = if n.is_finite() {
            format!("{n:.0} ms")
        } else {
            "– (inventory backstop)".to_string()
        };
        println!("| {run} | {n_text} | {d:.0} ms | {o:.0} ms | {r:.0} ms |");
        if n.is_finite() {
            notice.push(n);
        }
        decide.push(d);
        order.push(o);
        running.push(r);
    }
    let row = |name: &str, v: Vec<f64>| {
        let (min, med, max) = stats(v);
        println!("| {name} | {min:.0} ms | {med:.0} ms | {max:.0} ms |");
    };
    println!();
    println!("| stage (from kill -9) | min | median | max |");
    println!("|---|---:|---:|---:|");
    row("agent noticed", notice);
    row("monitor decided (committed)", decide);
    row("start ordered (generation committed)", order);
    row("domain running again", running);
}
