//! Scale (issue 10 item 7): a cluster with 100,000 HA VMs, real processes, real QUIC with
//! mutual TLS.
//!
//! The whole generation table went to each fresh agent session as one frame; past about
//! 27,500 HA VMs it no longer fit the 1 MiB frame limit, the monitor's session writer failed,
//! and no grant reached the agent again (every lease in the cluster would lapse). `vm list`
//! and `events` answers had the same limit.

#[path = "../harness.rs"]
mod harness;
#[path = "../scale_support.rs"]
mod scale_support;

use std::time::{Duration, Instant};

use harness::*;
use scale_support::*;

const HOSTS: usize = 100;
const PER_HOST: usize = 1_000;

#[test]
fn a_fresh_agent_gets_a_100k_generation_table_and_keeps_its_lease() {
    let total = HOSTS * PER_HOST;
    let pki = Pki::new();
    let dir = pki.dir.path().join("run");
    let mon = MonitorProc::start(
        &pki,
        &dir,
        "[detector]\nheartbeat_interval_ms = 500\nsuspect_after_ms = 2000\ndown_after_ms = 4000\n",
    );
    let ctl = Ctl::new(&pki, vec![mon.addr]);
    if wait_for(Duration::from_secs(120), || ctl.json(&["status"]).ok()).is_none() {
        panic!("monitor not ready; log:\n{}", mon.proc_.log_text());
    }

    let seeders = Seeders::start(
        &pki.ca_dir(),
        mon.addr,
        HOSTS,
        PER_HOST,
        Duration::from_secs(900),
    );
    let took = seeders.took;
    eprintln!("{total} HA VMs registered in {:.1} s", took.as_secs_f64());

    // A fresh agent: its first table is the whole one.
    let t0 = Instant::now();
    let agent = AgentProc::start(&pki, &dir, "probe", mon.addr, "");
    let state = dir.join("agent-probe-state");
    let got = wait_for(Duration::from_secs(120), || {
        persisted_ha(&state).filter(|n| *n == total)
    });
    assert_eq!(
        got,
        Some(total),
        "the agent's persisted table does not hold all {total} HA VMs (has {:?}); agent log:\n{}\nmonitor log tail:\n{}",
        persisted_ha(&state),
        agent.proc_.log_text(),
        tail(&mon.proc_.log_text(), 40)
    );
    eprintln!(
        "table of {total} applied {:.1} s after the agent process started; persisted file {} bytes",
        t0.elapsed().as_secs_f64(),
        std::fs::metadata(state.join("generations.json"))
            .map(|m| m.len())
            .unwrap_or(0)
    );

    // Grants keep coming: the persisted lease is renewed (at most once a second).
    let first = wait_for(Duration::from_secs(20), || lease_written(&state))
        .expect("the agent was never granted a lease");
    let renewed = wait_for(Duration::from_secs(20), || {
        lease_written(&state).filter(|t| *t > first)
    });
    assert!(
        renewed.is_some(),
        "the lease was not renewed after the table"
    );
    assert_eq!(ctl.liveness("probe").as_deref(), Some("up"));

    // `vm list` pages: all of them, `--json` still one array.
    let t_list = Instant::now();
    let list = ctl.json(&["vm", "list"]).expect("vm list");
    eprintln!("vm list --json: {:.1} s", t_list.elapsed().as_secs_f64());
    let arr = list.as_array().expect("one array");
    assert_eq!(arr.len(), total);
    assert_eq!(
        arr.last()
            .and_then(|v| v.get("uuid"))
            .and_then(|u| u.as_str()),
        Some(vm_uuid(HOSTS - 1, PER_HOST - 1).as_str())
    );

    // `host list` pages as well (a host is ~700 bytes of JSON: past ~1,500 hosts one answer
    // outgrows a frame). Small pages here, so the cursor is followed across many of them.
    let hosts = ctl
        .json_env(&["host", "list"], &[("VIGILCTL_PAGE_SIZE", "7")])
        .expect("host list");
    let names: Vec<&str> = hosts
        .as_array()
        .expect("one array")
        .iter()
        .filter_map(|h| h.get("name").and_then(|n| n.as_str()))
        .collect();
    assert_eq!(names.len(), HOSTS + 1, "every seeder host and the probe");
    assert!(
        names.windows(2).all(|w| w[0] < w[1]),
        "in name order, each once"
    );

    // `events` pages too: the log is full (a registration event per VM).
    let ev = ctl.json(&["events", "--limit", "10000"]).expect("events");
    let events = ev.get("events").and_then(|e| e.as_array()).expect("events");
    assert_eq!(events.len(), 10_000);
    let ids: Vec<u64> = events
        .iter()
        .filter_map(|e| e.get("id").and_then(|i| i.as_u64()))
        .collect();
    assert!(
        ids.windows(2).all(|w| w[1] == w[0] + 1),
        "oldest first, no gap"
    );

    drop(agent);
    drop(seeders);
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
