//! Heartbeat load: N simulated agents, each with its own certificate and its own QUIC
//! connection with mutual TLS, heartbeat against one real `vigil-monitor` process on loopback.
//! Prints heartbeats/s ingested by the monitor, the monitor's CPU and RSS, and then the real
//! agent binary's own RSS and CPU at idle heartbeat.
//!
//! Run: `cargo bench -p vigil-e2e --bench heartbeat_load`
//! Env: VIGIL_BENCH_AGENTS (default "100,1000,5000,10000"), VIGIL_BENCH_SECONDS (default 20),
//!      VIGIL_BENCH_INTERVAL_MS (default 500, i.e. 2 beats/s per agent).
//!      VIGIL_BENCH_TINY=1: 5 agents for 2 s (what CI runs, also under `cargo test --bench`).
//!      VIGIL_BENCH_MONITORS=3: the same against three monitors as one Raft cluster (formed
//!      with `--init`, `--join` and `vigilctl server add`); the agents connect to the leader,
//!      the followers get nothing but Raft. The table then also has the followers' CPU.
//!      VIGIL_BENCH_AGENTS may repeat a level (1000,1000,...): a summary line then gives the
//!      median and max over the repeats.
//!
//! Exits nonzero, after the table, if the monitor does not start or a level ends with an
//! agent not connected or a host not Up: a figure measured on a monitor that refused its
//! config, or on hosts that were never Up, is no figure.

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
use vigil_agent::session::Session;
use vigil_common::config::MonitorConfig;
use vigil_common::tls::{CaSigner, Role};
use vigil_common::wire::AdminRequest;
use vigil_monitor::api::StatusView;
use vigil_monitor::ctl::client::AdminClient;

async fn status(c: &mut AdminClient) -> Result<StatusView, String> {
    c.call::<StatusView>(&AdminRequest::Status)
        .await
        .map(|(v, _)| v)
        .map_err(|e| format!("status: {e:#}"))
}

/// The monitor's config for a level. Generous detector thresholds: the load generator
/// shares the 2 cores with the monitor, and we measure ingestion here, not detection. The
/// lease must outlast detection (the monitor refuses a lease shorter than `down_after_ms`:
/// it would fence hosts it still counts as alive), so it is sized from `down_after_ms`.
fn monitor_toml(interval_ms: u64) -> Result<String, String> {
    let down_after_ms = interval_ms * 12;
    let text = format!(
        "[detector]\nheartbeat_interval_ms = {interval_ms}\nsuspect_after_ms = {}\ndown_after_ms = {down_after_ms}\n[lease]\nduration_ms = {}\n",
        interval_ms * 6,
        down_after_ms + 2_000,
    );
    // The monitor's own check, here, so that a refused config is named before anything runs.
    MonitorConfig::from_toml_str(&text, std::path::Path::new("heartbeat_load's monitor.toml"))
        .map_err(|e| format!("the benchmark's monitor config is refused: {e}"))?;
    Ok(text)
}

/// Starts a monitor and waits until it answers, or says why it did not.
fn start_monitor(
    pki: &Pki,
    dir: &std::path::Path,
    toml: &str,
) -> Result<(MonitorProc, Ctl), String> {
    let mut mon = MonitorProc::start(pki, dir, toml);
    let ctl = Ctl::new(pki, vec![mon.addr]);
    ctl.wait_started(&mut mon, Duration::from_secs(30))?;
    Ok((mon, ctl))
}

/// Wall time of `samples` runs of the real `vigilctl status` (a new process, QUIC handshake
/// and all, as an operator runs it), 100 ms apart: (median, max) in ms, or the first error.
fn status_latency(ctl: &Ctl, samples: usize) -> Result<(f64, f64), String> {
    let mut ms = Vec::with_capacity(samples);
    for _ in 0..samples {
        let t = Instant::now();
        let out = ctl.run(&["status"]);
        let took = t.elapsed().as_secs_f64() * 1000.0;
        if !out.status.success() {
            return Err(format!(
                "vigilctl status failed after {took:.0} ms: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        ms.push(took);
        std::thread::sleep(Duration::from_millis(100));
    }
    ms.sort_by(|a, b| a.total_cmp(b));
    Ok((ms[ms.len() / 2], ms[ms.len() - 1]))
}

/// How long a simulated agent waits before opening its session again.
const RECONNECT: Duration = Duration::from_millis(200);

/// Levels run so far: each gets its own directory (a level may be repeated).
static LEVEL: AtomicU64 = AtomicU64::new(0);

struct Row {
    agents: usize,
    connected: usize,
    /// Sessions opened again after one was lost (agents already counted in `connected`).
    reconnects: u64,
    up: usize,
    beats_per_s: f64,
    expected_per_s: f64,
    cpu_pct: f64,
    /// The load generator's own CPU (this process: every simulated agent's QUIC and TLS).
    generator_cpu_pct: f64,
    rss_mib: f64,
    /// Each follower's CPU over the window, % of a core (none with one monitor).
    followers_cpu_pct: Vec<f64>,
    connect_s: f64,
    /// `vigilctl status` wall time (median, max) in ms, or why it did not answer.
    status_ms: Result<(f64, f64), String>,
    /// What `vigilctl --json host list` shows (hosts listed, of them Up, wall ms), or why it
    /// failed: the operator's own view of "every host Up" (an unpaged list of 10,000 hosts
    /// no longer fitted in a frame).
    host_list: Result<(usize, usize, f64), String>,
}

/// `vigilctl --json host list`: (hosts, of them Up, wall ms).
fn host_list(ctl: &Ctl) -> Result<(usize, usize, f64), String> {
    let t0 = Instant::now();
    let v = ctl
        .json(&["host", "list"])
        .map_err(|e| format!("host list: {e}"))?;
    let ms = t0.elapsed().as_secs_f64() * 1000.0;
    let hosts = v.as_array().ok_or("host list: not an array")?;
    let up = hosts.iter().filter(|h| h["liveness"] == "up").count();
    Ok((hosts.len(), up, ms))
}

/// Sizes of a run: `settle` after the ramp, `status_samples` runs of vigilctl status.
struct Sizes {
    seconds: u64,
    interval_ms: u64,
    settle: Duration,
    status_samples: usize,
    /// Monitors: 1, or a Raft cluster whose leader the agents connect to.
    monitors: usize,
}

fn run_level(pki: &Pki, n: usize, sz: &Sizes) -> Result<Row, String> {
    let (seconds, interval_ms) = (sz.seconds, sz.interval_ms);
    let dir = pki.dir.path().join(format!(
        "level-{n}-{}",
        LEVEL.fetch_add(1, Ordering::Relaxed)
    ));
    let cluster = start_cluster(
        pki,
        &dir,
        sz.monitors,
        &monitor_toml(interval_ms)?,
        Duration::from_secs(30),
    )?;
    let mon = cluster.leader();
    let ctl = Ctl::new(pki, vec![mon.mon.addr]);
    let pid = mon.mon.proc_.pid();
    let follower_pids: Vec<u32> = cluster.followers().map(|m| m.mon.proc_.pid()).collect();

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let ca = CaSigner::load(&pki.ca_dir()).expect("ca");
        let t0 = Instant::now();
        let mut configs = Vec::with_capacity(n);
        for i in 0..n {
            let name = format!("sim{i:05}");
            let cfg = agent_client_config(&ca, &name, None);
            configs.push((name, cfg));
        }
        eprintln!(
            "  issued {n} certificates in {:.1}s",
            t0.elapsed().as_secs_f64()
        );

        // Spread agents over several UDP sockets, like separate hosts would be.
        let endpoints: Vec<quinn::Endpoint> = (0..16)
            .map(|_| quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("ep"))
            .collect();
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let connected = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let reconnected = Arc::new(AtomicU64::new(0));
        let sem = Arc::new(tokio::sync::Semaphore::new(64));
        let t_connect = Instant::now();
        let addr: SocketAddr = mon.mon.addr;
        for (i, (name, cfg)) in configs.into_iter().enumerate() {
            let ep = endpoints[i % endpoints.len()].clone();
            let stop = stop_rx.clone();
            let connected = connected.clone();
            let failed = failed.clone();
            let reconnected = reconnected.clone();
            let sem = sem.clone();
            tokio::spawn(async move {
                let facts = sim_facts(&name);
                let hello = sim_hello(&name, facts.clone());
                // As the real agent does: a refused or lost session is opened again (a
                // leader that steps down, even for a moment, drops its sessions and refuses
                // new ones), until the benchmark stops.
                let mut first = true;
                while !*stop.borrow() {
                    let opened = {
                        let _permit = sem.acquire().await;
                        Session::open(&ep, cfg.clone(), addr, hello.clone()).await
                    };
                    match opened {
                        Ok(session) => {
                            if first {
                                connected.fetch_add(1, Ordering::Relaxed);
                                first = false;
                            } else {
                                reconnected.fetch_add(1, Ordering::Relaxed);
                            }
                            let facts = facts.clone();
                            let mut f = move || facts.clone();
                            let _ = session
                                .run_with(
                                    &mut f,
                                    vigil_agent::session::SessionIo::default(),
                                    stop.clone(),
                                )
                                .await;
                        }
                        Err(e) => {
                            // The first few only: a saturated monitor fails thousands.
                            if failed.fetch_add(1, Ordering::Relaxed) < 5 {
                                eprintln!("  {name}: {e}");
                            }
                        }
                    }
                    tokio::time::sleep(RECONNECT).await;
                }
            });
        }
        // Wait for the ramp to finish (or stall).
        let mut last = 0;
        let mut stalled = Instant::now();
        loop {
            tokio::time::sleep(Duration::from_millis(250)).await;
            let c = connected.load(Ordering::Relaxed) as usize;
            if c >= n {
                break;
            }
            if c != last {
                last = c;
                stalled = Instant::now();
            } else if stalled.elapsed() > Duration::from_secs(15) {
                eprintln!("  ramp stalled at {c}/{n}");
                break;
            }
        }
        let connect_s = t_connect.elapsed().as_secs_f64();
        eprintln!(
            "  {} agents connected in {connect_s:.1}s ({} attempts failed)",
            connected.load(Ordering::Relaxed),
            failed.load(Ordering::Relaxed)
        );
        tokio::time::sleep(sz.settle).await;

        let mut admin = AdminClient::new(
            &pki.issue(Role::Admin, "bench-admin"),
            vec![addr],
            Duration::from_secs(30),
        )
        .expect("admin");
        let s0 = status(&mut admin).await?;
        let (cpu0, _) = proc_usage(pid);
        let f0: Vec<f64> = follower_pids.iter().map(|p| proc_usage(*p).0).collect();
        let (gen0, _) = proc_usage(std::process::id());
        let w0 = Instant::now();
        tokio::time::sleep(Duration::from_secs(seconds)).await;
        let s1 = status(&mut admin).await?;
        let (cpu1, rss) = proc_usage(pid);
        let f1: Vec<f64> = follower_pids.iter().map(|p| proc_usage(*p).0).collect();
        let (gen1, _) = proc_usage(std::process::id());
        let dt = w0.elapsed().as_secs_f64();
        admin.close();
        // After the CPU window, so that the probes do not count in the monitor's CPU.
        let samples = sz.status_samples;
        let (status_ms, listed) =
            tokio::task::spawn_blocking(move || (status_latency(&ctl, samples), host_list(&ctl)))
                .await
                .map_err(|e| format!("status probe: {e}"))?;
        let _ = stop_tx.send(true);
        tokio::time::sleep(Duration::from_millis(300)).await;
        for ep in &endpoints {
            ep.close(0u32.into(), b"bench done");
        }
        let c = connected.load(Ordering::Relaxed) as usize;
        let reconnects = reconnected.load(Ordering::Relaxed);
        if reconnects > 0 {
            eprintln!("  {reconnects} sessions opened again after one was lost or refused");
        }
        Ok(Row {
            reconnects,
            agents: n,
            connected: c,
            up: s1.hosts_up,
            beats_per_s: (s1.heartbeats_total - s0.heartbeats_total) as f64 / dt,
            expected_per_s: c as f64 * 1000.0 / interval_ms as f64,
            cpu_pct: (cpu1 - cpu0) / dt * 100.0,
            generator_cpu_pct: (gen1 - gen0) / dt * 100.0,
            rss_mib: rss as f64 / (1024.0 * 1024.0),
            followers_cpu_pct: f0
                .iter()
                .zip(&f1)
                .map(|(a, b)| (b - a) / dt * 100.0)
                .collect(),
            connect_s,
            status_ms,
            host_list: listed,
        })
    })
}

/// For each level run more than once: median and max over its runs.
fn summarize(seen: &[(usize, Vec<[f64; 4]>)]) {
    let repeated: Vec<_> = seen.iter().filter(|(_, v)| v.len() > 1).collect();
    if repeated.is_empty() {
        return;
    }
    println!();
    println!("| agents | runs | heartbeats/s ingested (median / max) | monitor CPU (median / max) | monitor CPU per beat (median / max) | `vigilctl status` median (median / max) |");
    println!("|---:|---:|---:|---:|---:|---:|");
    for (n, v) in repeated {
        let col = |i: usize| {
            let mut c: Vec<f64> = v.iter().map(|f| f[i]).collect();
            c.sort_by(|a, b| a.total_cmp(b));
            (c[(c.len() - 1) / 2], c[c.len() - 1])
        };
        let (b, bx) = col(0);
        let (c, cx) = col(1);
        let (p, px) = col(2);
        let (s, sx) = col(3);
        println!(
            "| {n} | {} | {b:.0} / {bx:.0} | {c:.0} / {cx:.0} % of a core | {p:.0} / {px:.0} µs | {s:.0} / {sx:.0} ms |",
            v.len()
        );
    }
}

/// (PSS, anonymous RSS) in bytes, from /proc/PID/smaps_rollup and status.
fn proc_memory_detail(pid: u32) -> (u64, u64) {
    let kb = |text: &str, key: &str| {
        text.lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    (kb(&rollup, "Pss:"), kb(&status, "RssAnon:"))
}

fn agent_footprint(
    pki: &Pki,
    seconds: u64,
    settle: Duration,
) -> Result<(f64, f64, f64, f64), String> {
    let dir = pki.dir.path().join("footprint");
    let (mon, ctl) = start_monitor(pki, &dir, "")?;
    let agent = AgentProc::start(pki, &dir, "real-agent", mon.addr, "");
    wait_for(Duration::from_secs(20), || {
        (ctl.liveness("real-agent").as_deref() == Some("up")).then_some(())
    })
    .ok_or_else(|| {
        format!(
            "the real agent was not Up within 20 s; its log ends:\n{}",
            log_tail(&agent.proc_.log_text(), 20)
        )
    })?;
    std::thread::sleep(settle);
    let pid = agent.proc_.pid();
    let (c0, _) = proc_usage(pid);
    let t = Instant::now();
    std::thread::sleep(Duration::from_secs(seconds));
    let (c1, rss) = proc_usage(pid);
    let (pss, anon) = proc_memory_detail(pid);
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    Ok((
        (c1 - c0) / t.elapsed().as_secs_f64() * 100.0,
        mib(rss),
        mib(pss),
        mib(anon),
    ))
}

fn main() {
    let tiny = bench_tiny();
    // `cargo bench` passes --bench; `cargo test --bench heartbeat_load` passes nothing, and
    // runs the tiny size only when asked to (VIGIL_BENCH_TINY=1, as CI does).
    if !tiny && !std::env::args().any(|a| a == "--bench") {
        eprintln!("heartbeat_load: run with `cargo bench -p vigil-e2e --bench heartbeat_load` (or VIGIL_BENCH_TINY=1 for a smoke run)");
        return;
    }
    if let Err(e) = run(tiny) {
        eprintln!("heartbeat_load: FAILED: {e}");
        std::process::exit(1);
    }
}

fn run(tiny: bool) -> Result<(), String> {
    let levels: Vec<usize> = env_or(
        "VIGIL_BENCH_AGENTS",
        if tiny { "5" } else { "100,1000,5000,10000" },
    )
    .split(',')
    .filter_map(|s| s.trim().parse().ok())
    .collect();
    let default_seconds = if tiny { 2 } else { 20 };
    let seconds: u64 = env_or("VIGIL_BENCH_SECONDS", &default_seconds.to_string())
        .parse()
        .unwrap_or(default_seconds);
    let interval: u64 = env_or("VIGIL_BENCH_INTERVAL_MS", "500")
        .parse()
        .unwrap_or(500);
    let sizes = Sizes {
        seconds,
        interval_ms: interval,
        settle: Duration::from_secs(if tiny { 1 } else { 3 }),
        status_samples: if tiny { 3 } else { 10 },
        monitors: env_or("VIGIL_BENCH_MONITORS", "1")
            .parse()
            .unwrap_or(1)
            .max(1),
    };
    let monitors = sizes.monitors;
    let pki = Pki::new();
    let cluster = if monitors == 1 {
        "1 monitor".to_string()
    } else {
        format!("{monitors} monitors (one Raft cluster; the agents connect to the leader, whose figures these are)")
    };
    println!("heartbeat load: {cluster}, N agents on loopback, one QUIC+mTLS connection each, a beat every {interval} ms, {seconds} s window, {} cores", std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0));
    println!();
    let (extra_head, extra_rule) = if monitors > 1 {
        (" followers' CPU (each) |", "---:|")
    } else {
        ("", "")
    };
    println!("| agents | connected | up at end | connect time | heartbeats/s ingested | expected | monitor CPU | monitor RSS | `vigilctl status` (median / max) | `host list`: Up / listed (time) | monitor CPU per beat | load generator CPU |{extra_head}");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|{extra_rule}");
    let mut failures = Vec::new();
    // Per level: (heartbeats/s, monitor CPU %, CPU per beat µs, status median ms), for the
    // summary over repeated levels.
    let mut seen: Vec<(usize, Vec<[f64; 4]>)> = Vec::new();
    for n in levels {
        eprintln!("level {n}:");
        let r = run_level(&pki, n, &sizes).map_err(|e| format!("{n} agents: {e}"))?;
        let status = match &r.status_ms {
            Ok((median, max)) => format!("{median:.0} ms / {max:.0} ms"),
            Err(e) => {
                failures.push(format!("{n} agents: {e}"));
                "no answer".to_string()
            }
        };
        let listed = match &r.host_list {
            Ok((all, up, ms)) => {
                if *up < n {
                    failures.push(format!("{n} agents: host list shows {up} of {all} Up"));
                }
                format!("{up} / {all} ({ms:.0} ms)")
            }
            Err(e) => {
                failures.push(format!("{n} agents: {e}"));
                "failed".to_string()
            }
        };
        // CPU seconds per ingested beat: the figure to compare across machines and levels.
        let per_beat = if r.beats_per_s > 0.0 {
            format!("{:.0} µs", r.cpu_pct / 100.0 / r.beats_per_s * 1e6)
        } else {
            "–".to_string()
        };
        let followers = if monitors > 1 {
            let each: Vec<String> = r
                .followers_cpu_pct
                .iter()
                .map(|c| format!("{c:.1} %"))
                .collect();
            format!(" {} |", each.join(", "))
        } else {
            String::new()
        };
        println!(
            "| {} | {}{} | {} | {:.1} s | {:.0} | {:.0} | {:.0} % of a core | {:.0} MiB | {status} | {listed} | {per_beat} | {:.0} % of a core |{followers}",
            r.agents,
            r.connected,
            if r.reconnects > 0 {
                format!(" ({} reconnects)", r.reconnects)
            } else {
                String::new()
            },
            r.up,
            r.connect_s,
            r.beats_per_s,
            r.expected_per_s,
            r.cpu_pct,
            r.rss_mib,
            r.generator_cpu_pct
        );
        if r.connected < n || r.up < n {
            failures.push(format!(
                "{n} agents: {} connected, {} Up at the end",
                r.connected, r.up
            ));
        }
        if r.beats_per_s <= 0.0 {
            failures.push(format!("{n} agents: no heartbeat ingested"));
        }
        let fig = [
            r.beats_per_s,
            r.cpu_pct,
            if r.beats_per_s > 0.0 {
                r.cpu_pct / 100.0 / r.beats_per_s * 1e6
            } else {
                f64::NAN
            },
            r.status_ms.as_ref().map(|(m, _)| *m).unwrap_or(f64::NAN),
        ];
        match seen.iter_mut().find(|(a, _)| *a == n) {
            Some((_, v)) => v.push(fig),
            None => seen.push((n, vec![fig])),
        }
    }
    summarize(&seen);
    if monitors > 1 {
        // The agent's footprint does not depend on the monitors behind it: measured with one.
        return if failures.is_empty() {
            Ok(())
        } else {
            Err(failures.join("; "))
        };
    }
    let (cpu, rss, pss, anon) =
        agent_footprint(&pki, if tiny { 2 } else { seconds.max(10) }, sizes.settle)?;
    println!();
    println!(
        "agent at idle heartbeat (real vigil-agent binary, 500 ms interval, libvirt backend off): \
         CPU {cpu:.2} % of a core; RSS {rss:.1} MiB (PSS {pss:.1} MiB, anonymous {anon:.1} MiB; \
         the rest is file-backed pages of libvirt's client library and its dependencies)"
    );
    if failures.is_empty() {
        Ok(())
    } else {
        Err(failures.join("; "))
    }
}
