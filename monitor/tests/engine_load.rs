//! The engine's own cost under heartbeat load, without QUIC or Raft: what one heartbeat and
//! one timer tick cost the engine task with many hosts connected (the monitor ticks every
//! `heartbeat_interval_ms / 5`, at most every 100 ms, and takes every agent's beats).
//!
//! ```sh
//! cargo test -p vigil-monitor --release --test engine_load -- --ignored --nocapture
//! # VIGIL_BENCH_HOSTS=10000 (default)
//! ```
//!
//! The heartbeat-load benchmark (tests/e2e/benches/heartbeat_load.rs) measures the whole
//! monitor process; this one isolates the engine, so that a per-beat or per-tick cost added
//! there shows up as a figure of its own (BENCHMARKS.md, "Heartbeat load").

use std::time::Instant;

use vigil_common::config::{DetectorConfig, LeaseConfig, RecoveryConfig};
use vigil_common::wire::HostFacts;
use vigil_monitor::engine::{Action, Beat, Engine, Hello, Input};
use vigil_monitor::state::ClusterState;

fn facts(name: &str) -> HostFacts {
    HostFacts {
        hostname: name.to_string(),
        cpus: 64,
        memory_total_bytes: 512 << 30,
        memory_available_bytes: 300 << 30,
        load_avg: [1.0, 1.0, 1.0],
        uptime_s: 100_000,
        boot_id: "00000000-0000-0000-0000-000000000000".into(),
    }
}

/// Runs `input` and applies what it proposes, as Raft would (then `Applied`).
fn drive(engine: &mut Engine, state: &mut ClusterState, input: Input, now: u64) -> usize {
    let mut queue = vec![input];
    let mut sent = 0;
    while let Some(input) = queue.pop() {
        let mut applied = false;
        for a in engine.handle(input, now, 1_800_000_000_000 + now, state) {
            match a {
                Action::Propose(cmd) => {
                    state.apply(&cmd);
                    applied = true;
                }
                _ => sent += 1,
            }
        }
        if applied {
            queue.push(Input::Applied);
        }
    }
    sent
}

/// Per-beat and per-tick engine time (us) with `hosts` connected, of which every
/// `silent_every`-th (none if 0) stopped beating long enough ago to be Down.
fn measure(hosts: usize, silent_every: usize) -> (f64, f64) {
    let cfg = DetectorConfig {
        heartbeat_interval_ms: 500,
        suspect_after_ms: 3_000,
        down_after_ms: 6_000,
    };
    let lease = LeaseConfig {
        duration_ms: 8_000,
        ..LeaseConfig::default()
    };
    let mut engine = Engine::new(cfg, RecoveryConfig::default(), 0)
        .with_leases(lease, 500)
        .with_leader_lease();
    let mut state = ClusterState::default();
    let names: Vec<String> = (0..hosts).map(|i| format!("sim{i:05}")).collect();
    let silent = |i: usize| silent_every > 0 && i % silent_every == 0;
    let mut now = 0;
    drive(
        &mut engine,
        &mut state,
        Input::BecameLeader { term: 1, node: 1 },
        now,
    );
    for (i, n) in names.iter().enumerate() {
        drive(
            &mut engine,
            &mut state,
            Input::AgentConnected(Hello {
                host: n.clone(),
                zone: "z".into(),
                cluster: "c".into(),
                agent_version: "bench".into(),
                facts: facts(n),
                instance: i as u64 + 1,
                pools: vec![],
                addr: Some([127, 0, 0, 1].into()),
            }),
            now,
        );
    }
    assert_eq!(state.hosts.len(), hosts);

    let beat = |engine: &mut Engine, state: &mut ClusterState, n: &String, seq, now| {
        drive(
            engine,
            state,
            Input::Heartbeat(Beat {
                host: n.clone(),
                seq,
                facts: facts(n),
                mono_ms: now,
                pools: vec![],
                watchdog_ms: Some(10_000),
            }),
            now,
        )
    };
    let quorum = |engine: &mut Engine, state: &mut ClusterState, now| {
        drive(
            engine,
            state,
            Input::LeaderLease {
                until_ms: Some(now + 150),
            },
            now,
        );
    };
    // Past the first lease after the election, with the silent hosts Down by then.
    while now < 10_000 {
        now += 100;
        quorum(&mut engine, &mut state, now);
        for (i, n) in names.iter().enumerate() {
            if !silent(i) && (i as u64 + now / 100) % 5 == 0 {
                beat(&mut engine, &mut state, n, now, now);
            }
        }
        drive(&mut engine, &mut state, Input::Tick, now);
    }

    // Two simulated seconds at 2 beats/s per host and a tick every 100 ms, as the monitor
    // runs them; beats and ticks are timed separately.
    let (mut beat_ns, mut tick_ns, mut beats, mut ticks, mut sent) = (0u128, 0u128, 0u64, 0u64, 0);
    for _ in 0..20 {
        now += 100;
        quorum(&mut engine, &mut state, now);
        let t = Instant::now();
        for (i, n) in names.iter().enumerate() {
            if !silent(i) && (i as u64 + now / 100) % 5 == 0 {
                sent += beat(&mut engine, &mut state, n, now, now);
                beats += 1;
            }
        }
        beat_ns += t.elapsed().as_nanos();
        let t = Instant::now();
        drive(&mut engine, &mut state, Input::Tick, now);
        tick_ns += t.elapsed().as_nanos();
        ticks += 1;
    }
    assert!(sent as u64 >= beats, "every beat is granted a lease");
    let up = names
        .iter()
        .filter(|n| {
            engine.liveness(n, now).map(|l| l.state) == Some(vigil_monitor::detector::Liveness::Up)
        })
        .count();
    let expected_up = (0..hosts).filter(|i| !silent(*i)).count();
    assert_eq!(up, expected_up, "every beating host is Up");
    (
        beat_ns as f64 / beats as f64 / 1000.0,
        tick_ns as f64 / ticks as f64 / 1000.0,
    )
}

#[test]
#[ignore = "benchmark: run with --release --ignored --nocapture"]
fn bench_engine_heartbeat_and_tick() {
    let hosts: usize = std::env::var("VIGIL_BENCH_HOSTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    for (what, silent_every) in [("every host Up", 0), ("one host in 10 down", 10)] {
        let (per_beat_us, per_tick_us) = measure(hosts, silent_every);
        // At 2 beats/s per host and 10 ticks/s: the engine's share of one core.
        let core = (per_beat_us * 2.0 * hosts as f64 + per_tick_us * 10.0) / 1e6 * 100.0;
        println!(
            "bench_engine_heartbeat_and_tick: {hosts} hosts, {what}: {per_beat_us:.2} us per \
             heartbeat, {per_tick_us:.0} us per tick; at 2 beats/s and 10 ticks/s the engine \
             alone needs {core:.1} % of a core"
        );
    }
}

/// The benchmark above at a tiny size, in every test run (so it cannot rot unseen): 50 hosts,
/// both shapes; `measure` itself asserts that every beat is granted and every beating host Up.
#[test]
fn engine_load_at_a_tiny_size() {
    for silent_every in [0, 10] {
        let (per_beat_us, per_tick_us) = measure(50, silent_every);
        println!("engine_load tiny: 50 hosts, 1 in {silent_every} silent: {per_beat_us:.2} us per heartbeat, {per_tick_us:.0} us per tick");
    }
}
