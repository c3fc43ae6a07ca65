//! Leader killed → every agent reconnected and heartbeating to the new leader (issue 12,
//! "What it must show"). Three real `vigil-monitor` processes on loopback as one Raft
//! cluster, with the shipped detector and lease settings; N simulated agents as in
//! `heartbeat_load` (each its own certificate and QUIC+mTLS connection, the agent library's
//! `Session`), each listing every monitor and dialling by the agent's own rules
//! (`vigil_agent::follow::Dialer`: follow a follower's redirect, jitter after a loss, back off
//! after a whole round). Once every host is Up on the leader, the leader gets SIGKILL.
//!
//! Per run: when the survivors agree on a new leader; when every agent has been welcomed
//! again (only a leader welcomes) and when the new leader counts every host Up; the hosts the
//! event log calls suspect or down after the kill (target 0: a leader change is not a host
//! failure); the new leader's peak CPU (per 500 ms) and RSS until every host is Up. Then the
//! median and max over the runs.
//!
//! Run: `cargo bench -p vigil-e2e --bench leader_failover`
//! Env: VIGIL_BENCH_AGENTS (default 1000), VIGIL_BENCH_RUNS (default 10).
//!      VIGIL_BENCH_TINY=1: 5 agents, one run (what CI runs, also under `cargo test --bench`).
//!
//! Exits nonzero, after the table, when a run ends with an agent not back or a host not Up on
//! the new leader: a failover that did not finish has no time.

#[path = "../harness.rs"]
mod harness;

#[path = "../cluster_support.rs"]
mod cluster_support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cluster_support::*;
use harness::*;
use vigil_agent::follow::Dialer;
use vigil_agent::session::{Session, SessionError};
use vigil_common::config::AgentConfig;
use vigil_common::tls::{CaSigner, Role};
use vigil_common::wire::AdminRequest;
use vigil_monitor::api::StatusView;
use vigil_monitor::ctl::client::AdminClient;

/// Longest a failover may take before the run counts as failed.
const FAILOVER_LIMIT: Duration = Duration::from_secs(90);

/// One run's figures (seconds after the SIGKILL).
struct Run {
    agents: usize,
    /// The survivors agree on a new leader.
    elected_s: Option<f64>,
    /// Every agent welcomed again (by the new leader: only a leader welcomes).
    reconnected_s: Option<f64>,
    /// The new leader counts every host Up.
    all_up_s: Option<f64>,
    back: usize,
    up: usize,
    /// Hosts called suspect / down in the event log after the kill.
    suspected: usize,
    down: usize,
    peak_cpu_pct: f64,
    peak_rss_mib: f64,
}

async fn status(c: &mut AdminClient) -> Option<StatusView> {
    c.call::<StatusView>(&AdminRequest::Status)
        .await
        .ok()
        .map(|(v, _)| v)
}

/// Milliseconds since `t0`, as kept per agent (0: never welcomed).
fn ms_since(t0: Instant) -> u64 {
    t0.elapsed().as_millis() as u64 + 1
}

fn one_run(pki: &Pki, run: usize, n: usize) -> Result<Run, String> {
    let dir = pki.dir.path().join(format!("run-{run}"));
    // The shipped detector, lease and Raft timings: what an operator runs.
    let mut cluster = start_cluster(pki, &dir, 3, "", Duration::from_secs(30))?;
    let old = cluster.leader;
    let monitors: Vec<SocketAddr> = cluster.addrs_leader_first();
    let survivors: Vec<(u64, u32, Ctl)> = cluster
        .followers()
        .map(|m| (m.id, m.mon.proc_.pid(), Ctl::new(pki, vec![m.mon.addr])))
        .collect();
    let reconnect = Duration::from_millis(AgentConfig::default().reconnect_ms);

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("runtime: {e}"))?;
    let result = rt.block_on(async {
        let ca = CaSigner::load(&pki.ca_dir()).map_err(|e| format!("ca: {e}"))?;
        let configs: Vec<_> = (0..n)
            .map(|i| {
                let name = format!("fo{i:05}");
                let cfg = agent_client_config(&ca, &name, None);
                (name, cfg)
            })
            .collect();
        let endpoints: Vec<quinn::Endpoint> = (0..16)
            .map(|_| quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("ep"))
            .collect();
        let t0 = Instant::now();
        // Per agent: when (ms since t0, +1) a monitor last welcomed it.
        let welcomed: Arc<Vec<AtomicU64>> = Arc::new((0..n).map(|_| AtomicU64::new(0)).collect());
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let sem = Arc::new(tokio::sync::Semaphore::new(64));
        for (i, (name, cfg)) in configs.into_iter().enumerate() {
            let ep = endpoints[i % endpoints.len()].clone();
            let stop = stop_rx.clone();
            let welcomed = welcomed.clone();
            let sem = sem.clone();
            let monitors = monitors.clone();
            tokio::spawn(async move {
                let facts = sim_facts(&name);
                let hello = sim_hello(&name, facts.clone());
                let mut dial = Dialer::new(monitors.len(), reconnect);
                while !*stop.borrow() {
                    let addr = monitors[dial.current()];
                    let opened = {
                        let _permit = sem.acquire().await;
                        Session::open(&ep, cfg.clone(), addr, hello.clone()).await
                    };
                    let pause = match opened {
                        Ok(session) => {
                            dial.welcomed();
                            welcomed[i].store(ms_since(t0), Ordering::Relaxed);
                            let facts = facts.clone();
                            let mut f = move || facts.clone();
                            match session
                                .run_with(
                                    &mut f,
                                    vigil_agent::session::SessionIo::default(),
                                    stop.clone(),
                                )
                                .await
                            {
                                Ok(()) => break,
                                Err(e) => dial.lost(&e),
                            }
                        }
                        Err(SessionError::NotLeader { leader, .. }) => {
                            dial.redirected(&monitors, leader.as_deref())
                        }
                        Err(_) => dial.failed(),
                    };
                    tokio::time::sleep(pause).await;
                }
            });
        }
        let mut admin = AdminClient::new(
            &pki.issue(Role::Admin, "bench-admin"),
            vec![monitors[0]],
            Duration::from_secs(10),
        )
        .map_err(|e| format!("admin: {e:#}"))?;
        // Every agent connected and every host Up on the leader, then a moment to settle.
        // (Registering 10,000 hosts through Raft takes minutes on 2 cores.)
        let ramp = Duration::from_secs(120).max(Duration::from_millis(40 * n as u64));
        let ramp_until = Instant::now() + ramp;
        loop {
            tokio::time::sleep(Duration::from_millis(250)).await;
            let all_in = welcomed.iter().all(|w| w.load(Ordering::Relaxed) > 0);
            let (up, last_error) = match admin.call::<StatusView>(&AdminRequest::Status).await {
                Ok((s, _)) => (s.hosts_up, None),
                Err(e) => (0, Some(format!("{e:#}"))),
            };
            if all_in && up == n {
                break;
            }
            if Instant::now() > ramp_until {
                let in_ = welcomed
                    .iter()
                    .filter(|w| w.load(Ordering::Relaxed) > 0)
                    .count();
                return Err(format!(
                    "before the kill: {up} of {n} hosts Up on the leader, {in_} of {n} agents welcomed{}",
                    last_error.map_or(String::new(), |e| format!("; the status call failed: {e}"))
                ));
            }
        }
        admin.close();
        tokio::time::sleep(Duration::from_secs(2)).await;
        eprintln!("  run {run}: {n} agents Up on mon{old}; SIGKILL to it");

        let kill_wall = vigil_common::unix_ms();
        let kill_ms = ms_since(t0);
        let t_kill = Instant::now();
        if let Some(m) = cluster.members.iter_mut().find(|m| m.id == old) {
            m.mon.proc_.kill();
        }
        let mut admins: Vec<(u64, u32, AdminClient)> = Vec::new();
        for (id, pid, ctl) in &survivors {
            let c = AdminClient::new(&ctl.tls, ctl.monitors.clone(), Duration::from_secs(5))
                .map_err(|e| format!("admin: {e:#}"))?;
            admins.push((*id, *pid, c));
        }
        let mut r = Run {
            agents: n,
            elected_s: None,
            reconnected_s: None,
            all_up_s: None,
            back: 0,
            up: 0,
            suspected: 0,
            down: 0,
            peak_cpu_pct: 0.0,
            peak_rss_mib: 0.0,
        };
        let mut new_leader: Option<(u64, u32)> = None;
        let mut cpu_mark: Option<(f64, Instant)> = None;
        while t_kill.elapsed() < FAILOVER_LIMIT {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let s = t_kill.elapsed().as_secs_f64();
            if new_leader.is_none() {
                let mut views = Vec::new();
                for (id, pid, c) in admins.iter_mut() {
                    views.push((*id, *pid, status(c).await.and_then(|v| v.leader)));
                }
                let agreed = views
                    .iter()
                    .all(|(_, _, l)| l.is_some() && *l == views[0].2 && *l != Some(old));
                if agreed {
                    let id = views[0].2.unwrap_or(0);
                    new_leader = views.iter().find(|v| v.0 == id).map(|v| (v.0, v.1));
                    r.elected_s = Some(s);
                }
            }
            r.back = welcomed
                .iter()
                .filter(|w| w.load(Ordering::Relaxed) > kill_ms)
                .count();
            if r.back == n && r.reconnected_s.is_none() {
                r.reconnected_s = Some(s);
            }
            if let Some((id, pid)) = new_leader {
                let (cpu, rss) = proc_usage(pid);
                if let Some((c0, at)) = cpu_mark {
                    let dt = at.elapsed().as_secs_f64();
                    if dt >= 0.5 {
                        r.peak_cpu_pct = r.peak_cpu_pct.max((cpu - c0) / dt * 100.0);
                        cpu_mark = Some((cpu, Instant::now()));
                    }
                } else {
                    cpu_mark = Some((cpu, Instant::now()));
                }
                r.peak_rss_mib = r.peak_rss_mib.max(rss as f64 / (1024.0 * 1024.0));
                if let Some((_, _, c)) = admins.iter_mut().find(|a| a.0 == id) {
                    r.up = status(c).await.map_or(0, |v| v.hosts_up);
                }
                if r.up == n && r.all_up_s.is_none() && r.reconnected_s.is_some() {
                    r.all_up_s = Some(s);
                    break;
                }
            }
        }
        // What the log says of the hosts after the kill, a little later (a suspicion would
        // come after the agents' sessions ended).
        tokio::time::sleep(Duration::from_secs(3)).await;
        for (_, _, c) in admins.iter_mut() {
            c.close();
        }
        let _ = stop_tx.send(true);
        tokio::time::sleep(Duration::from_millis(300)).await;
        for ep in &endpoints {
            ep.close(0u32.into(), b"bench done");
        }
        if let Some((id, _, ctl)) = survivors
            .iter()
            .find(|s| Some(s.0) == new_leader.map(|l| l.0))
        {
            let events = ctl
                .json(&["events", "--limit", "10000"])
                .map_err(|e| format!("events on mon{id}: {e}"))?;
            let mut suspect = std::collections::BTreeSet::new();
            let mut down = std::collections::BTreeSet::new();
            for e in events["events"].as_array().into_iter().flatten() {
                if e["kind"] != "host_liveness" || e["at_ms"].as_u64().unwrap_or(0) < kill_wall {
                    continue;
                }
                let host = e["host"].as_str().unwrap_or("").to_string();
                match e["to"].as_str() {
                    Some("suspect") => {
                        suspect.insert(host);
                    }
                    Some("down") => {
                        down.insert(host);
                    }
                    _ => {}
                }
            }
            r.suspected = suspect.len();
            r.down = down.len();
        }
        Ok(r)
    });
    drop(cluster);
    result
}

fn median_max(mut v: Vec<f64>) -> String {
    if v.is_empty() {
        return "–".into();
    }
    v.sort_by(|a, b| a.total_cmp(b));
    format!("{:.2} / {:.2}", v[(v.len() - 1) / 2], v[v.len() - 1])
}

fn secs(v: Option<f64>) -> String {
    v.map_or("never".into(), |s| format!("{s:.2} s"))
}

fn main() {
    let tiny = bench_tiny();
    if !tiny && !std::env::args().any(|a| a == "--bench") {
        eprintln!("leader_failover: run with `cargo bench -p vigil-e2e --bench leader_failover` (or VIGIL_BENCH_TINY=1 for a smoke run)");
        return;
    }
    if let Err(e) = run(tiny) {
        eprintln!("leader_failover: FAILED: {e}");
        std::process::exit(1);
    }
}

fn run(tiny: bool) -> Result<(), String> {
    let n: usize = env_or("VIGIL_BENCH_AGENTS", if tiny { "5" } else { "1000" })
        .parse()
        .map_err(|e| format!("VIGIL_BENCH_AGENTS: {e}"))?;
    let runs: usize = env_or("VIGIL_BENCH_RUNS", if tiny { "1" } else { "10" })
        .parse()
        .map_err(|e| format!("VIGIL_BENCH_RUNS: {e}"))?;
    let pki = Pki::new();
    println!(
        "leader failover: 3 monitors on loopback (shipped detector, lease and Raft timings), {n} agents listing all three, leader SIGKILLed once every host is Up, {} cores",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)
    );
    println!();
    println!("| run | agents | new leader agreed | every agent back | every host Up on it | back / Up | hosts suspect after the kill | hosts down | new leader's peak CPU | its peak RSS |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut failures = Vec::new();
    let (mut elected, mut back, mut up, mut cpu, mut rss) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut wrongly = 0;
    for i in 1..=runs {
        let r = one_run(&pki, i, n).map_err(|e| format!("run {i}: {e}"))?;
        println!(
            "| {i} | {} | {} | {} | {} | {} / {} | {} | {} | {:.0} % of a core | {:.0} MiB |",
            r.agents,
            secs(r.elected_s),
            secs(r.reconnected_s),
            secs(r.all_up_s),
            r.back,
            r.up,
            r.suspected,
            r.down,
            r.peak_cpu_pct,
            r.peak_rss_mib
        );
        if r.all_up_s.is_none() {
            failures.push(format!(
                "run {i}: {} of {n} agents back, {} Up on the new leader",
                r.back, r.up
            ));
        }
        wrongly += r.suspected + r.down;
        elected.extend(r.elected_s);
        back.extend(r.reconnected_s);
        up.extend(r.all_up_s);
        cpu.push(r.peak_cpu_pct);
        rss.push(r.peak_rss_mib);
    }
    println!();
    println!(
        "median / max over {runs} run(s): new leader agreed {} s; every agent back {} s; every host Up {} s; peak CPU {} % of a core; peak RSS {} MiB; hosts suspect or down after a kill, all runs: {wrongly}",
        median_max(elected),
        median_max(back),
        median_max(up),
        median_max(cpu),
        median_max(rss)
    );
    if failures.is_empty() {
        Ok(())
    } else {
        Err(failures.join("; "))
    }
}
