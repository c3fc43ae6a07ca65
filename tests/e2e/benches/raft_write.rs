//! Raft write latency and throughput (issue 12): committed admin writes through the leader
//! of three real `vigil-monitor` processes on loopback (Raft over QUIC with mutual TLS, log
//! and state in redb), against the same on a one-node cluster (no `[raft] listen`), so that
//! the cost of replication shows.
//!
//! The write is a real one: `host tag add` / `host tag rm` of a host registered by a real
//! agent, sent with the admin client in this process (one QUIC connection per writer, kept
//! open: no vigilctl start-up in the figures). Each admin write is two Raft commits one after
//! the other — the tag, then its audit entry in the event log — and its answer comes after
//! both (monitor/src/admin.rs, `handle`). Latency: one write at a time, N writes. Throughput:
//! K writers, each on its own connection and its own tag, for S seconds; committed Raft
//! entries per second come from the leader's own commit index (`status`).
//!
//! Run: `cargo bench -p vigil-e2e --bench raft_write`
//! Env: VIGIL_BENCH_RUNS (default 10: a fresh cluster per run and size),
//!      VIGIL_BENCH_MONITORS (default "1,3"), VIGIL_BENCH_WRITES (default 300, one at a
//!      time), VIGIL_BENCH_WRITERS (default 8, concurrent), VIGIL_BENCH_SECONDS (default 5).
//!      VIGIL_BENCH_TINY=1: 1 run, 10 writes, 2 writers for 1 s (what CI runs).
//!
//! Prints figures, asserts none; exits nonzero if a cluster does not form, a write is not
//! answered "ok", or a write is not on every monitor afterwards.

#[path = "../harness.rs"]
mod harness;

#[path = "../cluster_support.rs"]
mod cluster_support;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use cluster_support::*;
use harness::*;
use vigil_common::tls::{Role, TlsPaths};
use vigil_common::wire::AdminRequest;
use vigil_monitor::api::StatusView;
use vigil_monitor::ctl::client::AdminClient;

const WAIT: Duration = Duration::from_secs(30);
const HOST: &str = "hv1";

fn env_num(name: &str, default: u64) -> u64 {
    env_or(name, &default.to_string())
        .parse()
        .unwrap_or(default)
}

/// One tag write through `c`: add (`on`) or remove `tag` on the host; `Err` unless the
/// monitor answers "ok" (committed and applied; "unchanged" would be no write at all).
async fn tag_write(c: &mut AdminClient, tag: &str, on: bool) -> Result<(), String> {
    let (host, tag) = (HOST.to_string(), tag.to_string());
    let req = if on {
        AdminRequest::HostTagAdd { host, tag }
    } else {
        AdminRequest::HostTagRemove { host, tag }
    };
    let (v, _) = c
        .call::<serde_json::Value>(&req)
        .await
        .map_err(|e| format!("tag write: {e:#}"))?;
    if v["result"] != "ok" {
        return Err(format!("tag write answered {v} (not \"ok\")"));
    }
    Ok(())
}

/// The leader's committed index, from its own `status`.
async fn commit_index(c: &mut AdminClient, leader: u64) -> Result<u64, String> {
    let (s, _) = c
        .call::<StatusView>(&AdminRequest::Status)
        .await
        .map_err(|e| format!("status: {e:#}"))?;
    s.servers
        .iter()
        .find(|v| v.id == leader)
        .and_then(|v| v.commit)
        .ok_or_else(|| format!("the leader's status names no commit index for node {leader}"))
}

/// Percentile `p` (0..=1) of sorted `v`, nearest rank.
fn pct(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let i = ((p * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
    v[i]
}

struct Sizes {
    writes: usize,
    writers: usize,
    seconds: u64,
}

/// The figures of one run.
struct RunFigures {
    /// One write at a time: p50, p99, max in ms.
    seq: (f64, f64, f64),
    /// K writers: admin writes/s, Raft entries committed/s, and latency p50, p99 in ms.
    writes_per_s: f64,
    entries_per_s: f64,
    conc: (f64, f64),
    /// During the writers' window: the leader's CPU (% of one core), every monitor's
    /// together, and the whole machine's busy share (% of all its cores; this process's
    /// writers included). A leader far from a core while the machine has room left is held
    /// by something else than CPU: fsync, the followers' answers.
    cpu: CpuFigures,
}

#[derive(Clone, Copy)]
struct CpuFigures {
    leader: f64,
    monitors: f64,
    machine: f64,
}

/// The machine's (busy, total) CPU time in ticks, from the first line of /proc/stat.
fn machine_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().sum();
    // idle and iowait are fields 4 and 5.
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total.saturating_sub(idle), total)
}

/// CPU seconds used so far by each of `pids` (leader first).
fn cpu_seconds(pids: &[u32]) -> Vec<f64> {
    pids.iter().map(|p| proc_usage(*p).0).collect()
}

fn admin(tls: &TlsPaths, addrs: Vec<SocketAddr>) -> Result<AdminClient, String> {
    AdminClient::new(tls, addrs, WAIT).map_err(|e| format!("admin client: {e:#}"))
}

async fn measure(
    tls: &TlsPaths,
    addrs: Vec<SocketAddr>,
    leader: u64,
    pids: &[u32],
    sz: &Sizes,
) -> Result<(RunFigures, BTreeSet<String>), String> {
    let mut c = admin(tls, addrs.clone())?;
    // Warm-up: connection, and the first writes after an election.
    for i in 0..10 {
        tag_write(&mut c, "seq", i % 2 == 0).await?;
    }
    let mut ms = Vec::with_capacity(sz.writes);
    for i in 0..sz.writes {
        let t = Instant::now();
        tag_write(&mut c, "seq", i % 2 == 0).await?;
        ms.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    ms.sort_by(|a, b| a.total_cmp(b));
    let seq = (pct(&ms, 0.5), pct(&ms, 0.99), pct(&ms, 1.0));
    // The tags that end up on the host: the expected state on every monitor.
    // The warm-up (10 writes) and the writes alternate add and remove, starting with add:
    // "seq" is left on the host after an odd number of measured writes.
    let mut present = BTreeSet::new();
    if sz.writes % 2 == 1 {
        present.insert("seq".to_string());
    }

    // K writers, each connected (and warmed up) before the window opens.
    let mut clients = Vec::with_capacity(sz.writers);
    for k in 0..sz.writers {
        let mut w = admin(tls, addrs.clone())?;
        let tag = format!("w{k}");
        tag_write(&mut w, &tag, true).await?;
        tag_write(&mut w, &tag, false).await?;
        clients.push((w, tag));
    }
    let index0 = commit_index(&mut c, leader).await?;
    let (cpu0, machine0) = (cpu_seconds(pids), machine_ticks());
    let t0 = Instant::now();
    let end = t0 + Duration::from_secs(sz.seconds);
    let mut tasks = Vec::with_capacity(sz.writers);
    for (mut w, tag) in clients {
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut on = true;
            while Instant::now() < end {
                let t = Instant::now();
                tag_write(&mut w, &tag, on).await?;
                lat.push(t.elapsed().as_secs_f64() * 1000.0);
                on = !on;
            }
            w.close();
            // `on` is what the next write would do: the tag is present iff it is "remove".
            Ok::<_, String>((lat, (!on).then_some(tag)))
        }));
    }
    let mut lat = Vec::new();
    for t in tasks {
        let (l, tag) = t.await.map_err(|e| format!("writer: {e}"))??;
        lat.extend(l);
        present.extend(tag);
    }
    let dt = t0.elapsed().as_secs_f64();
    let (cpu1, machine1) = (cpu_seconds(pids), machine_ticks());
    let used: Vec<f64> = cpu1.iter().zip(&cpu0).map(|(b, a)| b - a).collect();
    let busy = machine1.0.saturating_sub(machine0.0) as f64;
    let total = machine1.1.saturating_sub(machine0.1).max(1) as f64;
    let cpu = CpuFigures {
        leader: used.first().copied().unwrap_or(0.0) / dt * 100.0,
        monitors: used.iter().sum::<f64>() / dt * 100.0,
        machine: busy / total * 100.0,
    };
    let index1 = commit_index(&mut c, leader).await?;
    c.close();
    lat.sort_by(|a, b| a.total_cmp(b));
    Ok((
        RunFigures {
            seq,
            writes_per_s: lat.len() as f64 / dt,
            entries_per_s: (index1.saturating_sub(index0)) as f64 / dt,
            conc: (pct(&lat, 0.5), pct(&lat, 0.99)),
            cpu,
        },
        present,
    ))
}

/// The tags of the host as monitor `m` itself holds them (`host show` is answered by the
/// monitor asked, also a follower).
fn tags_on(m: &Member) -> Option<BTreeSet<String>> {
    let v = m.ctl.json(&["host", "show", HOST]).ok()?;
    Some(
        v["tags"]
            .as_array()?
            .iter()
            .filter_map(|t| t.as_str().map(String::from))
            .collect(),
    )
}

fn run_once(pki: &Pki, monitors: usize, run: usize, sz: &Sizes) -> Result<RunFigures, String> {
    let dir = pki.dir.path().join(format!("m{monitors}-run{run}"));
    let cluster = start_cluster(pki, &dir, monitors, "", WAIT)?;
    let addrs = cluster.addrs_leader_first();
    // The host whose tags are written: registered through Raft by a real agent.
    let agent = AgentProc::start_with_monitors(pki, &dir, HOST, &addrs, "");
    wait_for(WAIT, || {
        cluster
            .members
            .iter()
            .all(|m| tags_on(m).is_some())
            .then_some(())
    })
    .ok_or_else(|| {
        format!(
            "{HOST} was not registered on every monitor within {WAIT:?}; the agent's log ends:\n{}",
            log_tail(&agent.proc_.log_text(), 20)
        )
    })?;
    let tls = pki.issue(Role::Admin, "bench-writer");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("runtime: {e}"))?;
    // The leader first, then the others.
    let mut pids = vec![cluster.leader().mon.proc_.pid()];
    pids.extend(
        cluster
            .members
            .iter()
            .filter(|m| m.id != cluster.leader)
            .map(|m| m.mon.proc_.pid()),
    );
    let (figures, present) = rt.block_on(measure(&tls, addrs, cluster.leader, &pids, sz))?;
    // Every write is on every monitor: each holds exactly the tags the writers left.
    let mut last = Vec::new();
    wait_for(WAIT, || {
        last = cluster.members.iter().map(tags_on).collect();
        last.iter()
            .all(|t| t.as_ref() == Some(&present))
            .then_some(())
    })
    .ok_or_else(|| {
        format!("the writes are not on every monitor: expected tags {present:?}, found {last:?}")
    })?;
    Ok(figures)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        f64::NAN
    } else {
        v[(v.len() - 1) / 2]
    }
}

fn max(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::NAN, f64::max)
}

fn main() {
    let tiny = bench_tiny();
    // `cargo bench` passes --bench; `cargo test --bench raft_write` passes nothing, and runs
    // the tiny size only when asked to (VIGIL_BENCH_TINY=1, as CI does).
    if !tiny && !std::env::args().any(|a| a == "--bench") {
        eprintln!("raft_write: run with `cargo bench -p vigil-e2e --bench raft_write` (or VIGIL_BENCH_TINY=1 for a smoke run)");
        return;
    }
    if let Err(e) = run(tiny) {
        eprintln!("raft_write: FAILED: {e}");
        std::process::exit(1);
    }
}

fn run(tiny: bool) -> Result<(), String> {
    let runs = env_num("VIGIL_BENCH_RUNS", if tiny { 1 } else { 10 }).max(1) as usize;
    let sizes = Sizes {
        writes: env_num("VIGIL_BENCH_WRITES", if tiny { 10 } else { 300 }).max(1) as usize,
        writers: env_num("VIGIL_BENCH_WRITERS", if tiny { 2 } else { 8 }).max(1) as usize,
        seconds: env_num("VIGIL_BENCH_SECONDS", if tiny { 1 } else { 5 }).max(1),
    };
    let levels: Vec<usize> = env_or("VIGIL_BENCH_MONITORS", "1,3")
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    println!(
        "raft write: admin `host tag add/rm` through the leader (2 Raft commits each: the tag, then its audit entry), \
         {} one at a time, then {} writers for {} s; {runs} run(s) per cluster size, a fresh cluster each; {} cores",
        sizes.writes,
        sizes.writers,
        sizes.seconds,
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)
    );
    let pki = Pki::new();
    let mut summaries = Vec::new();
    for &monitors in &levels {
        println!();
        println!("| monitors | run | one at a time: p50 | p99 | max | {} writers: admin writes/s | Raft entries/s | p50 | p99 | leader CPU | monitors' CPU | machine busy |", sizes.writers);
        println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        let mut all = Vec::with_capacity(runs);
        for run in 1..=runs {
            eprintln!("{monitors} monitor(s), run {run}:");
            let f = run_once(&pki, monitors, run, &sizes)
                .map_err(|e| format!("{monitors} monitor(s), run {run}: {e}"))?;
            println!(
                "| {monitors} | {run} | {:.2} ms | {:.2} ms | {:.2} ms | {:.0} | {:.0} | {:.2} ms | {:.2} ms | {:.0} % | {:.0} % | {:.0} % |",
                f.seq.0, f.seq.1, f.seq.2, f.writes_per_s, f.entries_per_s, f.conc.0, f.conc.1,
                f.cpu.leader, f.cpu.monitors, f.cpu.machine
            );
            all.push(f);
        }
        summaries.push((monitors, all));
    }
    println!();
    println!("Over the runs, median / max of each run's figure:");
    println!();
    println!("| monitors | runs | one at a time: p50 | p99 | max | {} writers: admin writes/s | Raft entries/s | p50 | p99 | leader CPU | monitors' CPU | machine busy |", sizes.writers);
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (monitors, all) in &summaries {
        let col = |f: &dyn Fn(&RunFigures) -> f64| {
            let v: Vec<f64> = all.iter().map(f).collect();
            (median(v.clone()), max(&v))
        };
        let ms = |(m, x): (f64, f64)| format!("{m:.2} / {x:.2} ms");
        let n = |(m, x): (f64, f64)| format!("{m:.0} / {x:.0}");
        let pc = |(m, x): (f64, f64)| format!("{m:.0} / {x:.0} %");
        println!(
            "| {monitors} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            all.len(),
            ms(col(&|f| f.seq.0)),
            ms(col(&|f| f.seq.1)),
            ms(col(&|f| f.seq.2)),
            n(col(&|f| f.writes_per_s)),
            n(col(&|f| f.entries_per_s)),
            ms(col(&|f| f.conc.0)),
            ms(col(&|f| f.conc.1)),
            pc(col(&|f| f.cpu.leader)),
            pc(col(&|f| f.cpu.monitors)),
            pc(col(&|f| f.cpu.machine)),
        );
    }
    Ok(())
}
