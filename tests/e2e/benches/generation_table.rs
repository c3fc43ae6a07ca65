//! Generation-table delivery at scale (issue 10 item 7): N HA VMs in one real
//! `vigil-monitor` (registered by seeder agents through real sessions and Raft), then a fresh
//! agent session (the real session code, real QUIC with mutual TLS, the table persisted in a
//! state directory like the agent's) connects. Prints session set-up time (connect to
//! welcome), table delivery time (connect to the whole table applied and persisted), the
//! table's size in bytes and frames, the persisted file's size, and how long a paged
//! `vigilctl --json vm list` of all N takes.
//!
//! Run: `cargo bench -p vigil-e2e --bench generation_table`
//! Env: VIGIL_BENCH_VMS (default 100000), VIGIL_BENCH_HOSTS (default 100; VMs are spread
//! evenly over them). VIGIL_BENCH_TINY=1: 200 VMs on 2 hosts (what CI runs).

#[path = "../harness.rs"]
mod harness;
#[path = "../scale_support.rs"]
mod scale_support;

use std::time::{Duration, Instant};

use harness::*;
use scale_support::*;
use vigil_agent::executor::Executor;
use vigil_agent::generations::Generations;
use vigil_agent::session::{Session, SessionIo};
use vigil_common::codec;
use vigil_common::tls::{self, Role, TransportTuning};
use vigil_common::wire::{self, HostFacts, MonitorToAgent};

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let tiny = bench_tiny();
    if !tiny && !std::env::args().any(|a| a == "--bench") {
        eprintln!("generation_table: run with `cargo bench -p vigil-e2e --bench generation_table` (or VIGIL_BENCH_TINY=1 for a smoke run)");
        return;
    }
    let vms = env_usize("VIGIL_BENCH_VMS", if tiny { 200 } else { 100_000 });
    let hosts = env_usize("VIGIL_BENCH_HOSTS", if tiny { 2 } else { 100 }).clamp(1, vms.max(1));
    let per_host = vms.div_ceil(hosts);
    let total = hosts * per_host;
    let pki = Pki::new();
    let dir = pki.dir.path().join("run");
    let mon = MonitorProc::start(
        &pki,
        &dir,
        "[detector]\nheartbeat_interval_ms = 500\nsuspect_after_ms = 2000\ndown_after_ms = 4000\n",
    );
    let ctl = Ctl::new(&pki, vec![mon.addr]);
    ctl.wait_ready(Duration::from_secs(120));

    let seeders = Seeders::start(
        &pki.ca_dir(),
        mon.addr,
        hosts,
        per_host,
        Duration::from_secs(1800),
    );
    let reg = seeders.took;
    println!(
        "{total} HA VMs on {hosts} seeder hosts registered in {:.1} s",
        reg.as_secs_f64()
    );

    // The measured agent: real session code, a persisted table like the agent's.
    let state = dir.join("bench-agent-state");
    let gens = Generations::load(&state).expect("state dir");
    let exec = Executor::new(None, gens);
    let t = pki.issue(Role::Agent, "bench-agent");
    let material = t.load().expect("tls");
    let cfg = tls::client_config(
        material,
        wire::ALPN_AGENT,
        TransportTuning {
            idle_timeout: Duration::from_secs(30),
            keep_alive: None,
        },
    )
    .expect("client config");
    let facts = HostFacts {
        hostname: "bench-agent".into(),
        cpus: 8,
        memory_total_bytes: 1 << 34,
        memory_available_bytes: 1 << 33,
        load_avg: [0.0; 3],
        uptime_s: 1,
        boot_id: "b".into(),
    };
    let hello = sim_hello("bench-agent", facts.clone());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let probe = exec.clone();
    let (setup, delivery) = seeders.rt.block_on(async move {
        let ep = quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("ep");
        let t0 = Instant::now();
        let session = Session::open(&ep, cfg, mon.addr, hello)
            .await
            .expect("session");
        let setup = t0.elapsed();
        let mut f = move || facts.clone();
        let io = SessionIo {
            executor: Some(exec),
            ..SessionIo::default()
        };
        let run = tokio::spawn(async move { session.run_with(&mut f, io, stop_rx).await });
        let end = Instant::now() + Duration::from_secs(600);
        let delivery = loop {
            let n = probe
                .gens
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .ha_vms()
                .count();
            if n >= total {
                break t0.elapsed();
            }
            assert!(Instant::now() < end, "only {n} of {total} applied");
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        let _ = stop_tx.send(true);
        let _ = run.await;
        ep.close(0u32.into(), b"done");
        (setup, delivery)
    });

    // What the monitor sent: the same table through the same framing.
    let entries: Vec<(String, u64)> = (0..hosts)
        .flat_map(|h| (0..per_host).map(move |i| (vm_uuid(h, i), 1)))
        .collect();
    let one = codec::encode_frame(&MonitorToAgent::Generations {
        entries: entries.clone(),
        full: true,
    })
    .map(|f| f.len());
    let frames = vigil_common::table::frames(
        MonitorToAgent::Generations {
            entries,
            full: true,
        },
        &mut 0,
    );
    let bytes: usize = frames
        .iter()
        .map(|f| codec::encode_frame(f).map(|b| b.len()).unwrap_or(0))
        .sum();
    let file = std::fs::metadata(state.join("generations.json"))
        .map(|m| m.len())
        .unwrap_or(0);

    let t_list = Instant::now();
    let listed = ctl
        .json(&["vm", "list"])
        .ok()
        .and_then(|v| v.as_array().map(|a| a.len()))
        .unwrap_or(0);
    let list_s = t_list.elapsed().as_secs_f64();

    println!("| HA VMs | session set-up | table delivered and applied | table bytes | frames | one frame would be | persisted file | vm list (--json, paged) |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    println!(
        "| {total} | {:.1} ms | {:.0} ms | {bytes} | {} | {} | {file} B | {listed} VMs in {list_s:.2} s |",
        setup.as_secs_f64() * 1000.0,
        delivery.as_secs_f64() * 1000.0,
        frames.len(),
        match one {
            Ok(n) => format!("{n} B"),
            Err(e) => format!("refused ({e})"),
        },
    );
    assert_eq!(listed, total, "vm list returned {listed} of {total}");
    drop(seeders);
}
