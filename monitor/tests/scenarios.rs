//! Scenario files drive the real decision core through the simulator: timed faults in, the
//! replicated event log out, compared with a golden file (`VIGIL_BLESS=1` rewrites them).
//! A seeded random-fault runner checks the one rule on every simulated step.
//!
//! `VIGIL_SCENARIO=NAME` (a file stem, or a unique part of one) runs only that scenario and
//! skips the random runner; the file format is in `tests/scenarios/README.md`.

use std::path::{Path, PathBuf};

use vigil_monitor::sim::{Scenario, Sim};

fn scenario_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/scenarios")
}

fn render(sim: &Sim) -> String {
    let mut out = String::from("# faults\n");
    for f in sim.fault_log() {
        out.push_str(f);
        out.push('\n');
    }
    out.push_str("# replicated event log\n");
    out.push_str(&sim.event_log());
    out
}

/// `VIGIL_SCENARIO`, when set and not empty.
fn chosen_scenario() -> Option<String> {
    std::env::var("VIGIL_SCENARIO")
        .ok()
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

fn stem(p: &Path) -> String {
    p.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Edit distance from `query` to the closest part of `name` (a typo, a word left out).
fn distance_to_a_part(query: &str, name: &str) -> usize {
    let q: Vec<char> = query.chars().collect();
    let n: Vec<char> = name.chars().collect();
    // Sellers' algorithm: a match may start and end anywhere in `name`.
    let mut prev = vec![0usize; n.len() + 1];
    for (i, qc) in q.iter().enumerate() {
        let mut cur = vec![i + 1; n.len() + 1];
        for (j, nc) in n.iter().enumerate() {
            let subst = prev[j] + usize::from(qc != nc);
            cur[j + 1] = subst.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev.into_iter().min().unwrap_or(q.len())
}

/// The scenarios `query` names: the one whose stem it is (a trailing `.scn` is allowed), else
/// the only one whose stem contains it. Anything else is an error that lists close names.
fn select(files: &[PathBuf], query: &str) -> Result<Vec<PathBuf>, String> {
    let query = query.strip_suffix(".scn").unwrap_or(query);
    if let Some(f) = files.iter().find(|f| stem(f) == query) {
        return Ok(vec![f.clone()]);
    }
    let matching: Vec<&PathBuf> = files.iter().filter(|f| stem(f).contains(query)).collect();
    match matching.as_slice() {
        [one] => return Ok(vec![(*one).clone()]),
        [] => {}
        many => {
            let names: Vec<String> = many.iter().map(|f| stem(f)).collect();
            return Err(format!(
                "VIGIL_SCENARIO={query:?} matches {} scenarios; name one of:\n  {}",
                names.len(),
                names.join("\n  ")
            ));
        }
    }
    let limit = (query.chars().count() / 3).max(2);
    let mut close: Vec<(usize, String)> = files
        .iter()
        .map(|f| (distance_to_a_part(query, &stem(f)), stem(f)))
        .filter(|(d, _)| *d <= limit)
        .collect();
    close.sort();
    close.truncate(5);
    if close.is_empty() {
        let all: Vec<String> = files.iter().map(|f| stem(f)).collect();
        return Err(format!(
            "VIGIL_SCENARIO={query:?}: no such scenario, and none is close; the scenarios are:\n  {}",
            all.join("\n  ")
        ));
    }
    let names: Vec<String> = close.into_iter().map(|(_, n)| n).collect();
    Err(format!(
        "VIGIL_SCENARIO={query:?}: no such scenario; close names:\n  {}",
        names.join("\n  ")
    ))
}

#[test]
fn scenarios_match_their_golden_logs() {
    let mut files: Vec<PathBuf> = std::fs::read_dir(scenario_dir())
        .expect("scenario dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "scn"))
        .collect();
    files.sort();
    assert!(files.len() >= 8, "scenarios missing: {files:?}");
    if let Some(query) = chosen_scenario() {
        files = select(&files, &query).unwrap_or_else(|e| panic!("{e}"));
        eprintln!("VIGIL_SCENARIO: running only {}", stem(&files[0]));
    }
    let bless = std::env::var_os("VIGIL_BLESS").is_some();
    let mut failures = Vec::new();
    for f in &files {
        let text = std::fs::read_to_string(f).expect("read scenario");
        let sc = Scenario::parse(&text).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        let mut sim = Sim::new(&sc);
        if let Err(v) = sim.run(&sc) {
            failures.push(format!("{}: SAFETY VIOLATION: {v}", f.display()));
            continue;
        }
        let got = render(&sim);
        let golden = f.with_extension("expected");
        if bless {
            std::fs::write(&golden, &got).expect("write golden");
            continue;
        }
        match std::fs::read_to_string(&golden) {
            Ok(want) if want == got => {}
            Ok(want) => failures.push(format!(
                "{}: log differs from {}\n--- want\n{want}\n--- got\n{got}",
                f.display(),
                golden.display()
            )),
            Err(_) => failures.push(format!(
                "{}: no golden file {} (run with VIGIL_BLESS=1)\n{got}",
                f.display(),
                golden.display()
            )),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn bad_scenarios_name_the_line() {
    let err = Scenario::parse("host hv1\nat x crash-vm u1\n").expect_err("bad");
    assert_eq!(err.line, 2);
    let err = Scenario::parse("vm u1\n").expect_err("no host");
    assert!(err.to_string().contains("host="), "{err}");
    let err = Scenario::parse("at 10 explode hv1\n").expect_err("unknown fault");
    assert!(err.to_string().contains("explode"), "{err}");
    let err = Scenario::parse("host hv1\nat 10 reorder-reports hv1 on most\n")
        .expect_err("unknown reorder word");
    assert!(err.to_string().contains("most"), "{err}");
}

#[test]
fn late_events_and_answers_still_restart_a_crashed_vm_once() {
    // Every report of hv1 late by its own delay: the crash event, the start answers and the
    // listings overtake one another, and the VM is still restarted, once.
    let text = "host hv1\nhost hv2\nvm u1 host=hv1\nat 500 reorder-reports hv1 on all\nat 1000 crash-vm u1\nat 4000 crash-vm u1\nrun 9000\n";
    let sc = Scenario::parse(text).expect("parses");
    let mut sim = Sim::new(&sc);
    sim.run(&sc).expect("no violation");
    assert!(sim.settled().is_empty(), "{}", sim.event_log());
    let log = sim.event_log();
    assert_eq!(log.matches("VM vm-u1 running on").count(), 2, "{log}");
}

#[test]
fn vigil_scenario_takes_a_stem_or_a_unique_part_of_one() {
    let files: Vec<PathBuf> = [
        "01-vm-crash-restarts-in-place",
        "02-guest-shutdown-is-respected",
        "29-late-reconnect-after-monitor-restart-fences-nobody",
        "30-stale-listing-after-a-start-is-not-a-crash",
        "30-stale-listing-after-a-start-is-not-a-crash-2",
    ]
    .iter()
    .map(|n| PathBuf::from(format!("/s/{n}.scn")))
    .collect();
    let one = |q: &str| select(&files, q).map(|v| v.iter().map(|f| stem(f)).collect::<Vec<_>>());
    // A whole stem, also with its extension, and a unique part.
    assert_eq!(
        one("01-vm-crash-restarts-in-place"),
        Ok(vec![stem(&files[0])])
    );
    assert_eq!(
        one("02-guest-shutdown-is-respected.scn"),
        Ok(vec![stem(&files[1])])
    );
    assert_eq!(one("late-reconnect"), Ok(vec![stem(&files[2])]));
    // An exact stem wins over the longer names that contain it.
    assert_eq!(
        one("30-stale-listing-after-a-start-is-not-a-crash"),
        Ok(vec![stem(&files[3])])
    );
    // A part of several names is ambiguous: they are listed.
    let err = one("stale-listing").expect_err("ambiguous");
    assert!(err.contains("matches 2 scenarios"), "{err}");
    assert!(
        err.contains("30-stale-listing-after-a-start-is-not-a-crash-2"),
        "{err}"
    );
    // A typo: the close names are listed, the far ones are not.
    let err = one("guest-shutdwn").expect_err("typo");
    assert!(err.contains("no such scenario; close names:"), "{err}");
    assert!(err.contains("02-guest-shutdown-is-respected"), "{err}");
    assert!(!err.contains("01-vm-crash"), "{err}");
    // Nothing close: every scenario is listed.
    let err = one("zzzzzzzzzzzz").expect_err("unknown");
    assert!(err.contains("none is close"), "{err}");
    assert!(err.contains("01-vm-crash-restarts-in-place"), "{err}");
}

/// Runs a scenario given inline; panics on a safety violation.
fn run_inline(text: &str) -> Sim {
    let sc = Scenario::parse(text).expect("scenario");
    let mut sim = Sim::new(&sc);
    if let Err(v) = sim.run(&sc) {
        panic!("SAFETY VIOLATION: {v}\n{}", render(&sim));
    }
    sim
}

#[test]
fn a_fence_ack_that_does_not_cover_the_named_vms_is_not_proof() {
    // hv2's agent acknowledges from an empty cache: u1 still runs there. The leader must not
    // take that acknowledgement as proof (it names u1, the ack does not cover it); the lease
    // proves it later, once the agent fenced itself.
    let sim = run_inline(
        "storage pool=primary\nhost hv1 fence=no\nhost hv2 fence=no\nvm u1 host=hv2\n\
         at 900 stale-ack hv2 on\nat 1000 partition hv2\nrun 8000\n",
    );
    let log = sim.event_log();
    assert!(
        log.contains("is not proof"),
        "the refused acknowledgement is recorded:\n{}",
        render(&sim)
    );
    assert!(!log.contains("fenced: storage slot"), "{}", render(&sim));
}

#[test]
fn a_fence_request_never_uses_instance_zero() {
    // hv2 is cut off, then leadership moves: the new leader never heard hv2's agent, so it
    // does not know its instance and must not ask through the slot. Nor does it know hv2's
    // watchdog, so lease expiry proves nothing either: with no BMC the VM waits, and the
    // fencing event says why.
    let sim = run_inline(
        "storage pool=primary\nhost hv1 fence=no\nhost hv2 fence=no\nvm u1 host=hv2\n\
         at 1000 partition hv2\nat 1100 new-leader\nrun 8000\n",
    );
    assert!(
        !sim.fault_log().iter().any(|l| l.contains("fence request")),
        "{}",
        render(&sim)
    );
    assert!(
        !sim.event_log().contains("host hv2 fenced"),
        "{}",
        render(&sim)
    );
    assert!(
        sim.event_log().contains("reported no armed host watchdog"),
        "{}",
        render(&sim)
    );
}

#[test]
fn a_stale_leader_cut_from_the_monitors_does_not_keep_the_agents() {
    // Three monitors; hv2 dies, and while it is being fenced the leader is cut from the two
    // other monitors for 30 s (it still reaches every host). Its lease runs out and the
    // majority elects a new leader, which must be able to recover u1 long before the
    // partition heals: the agents must not stay with a leader that can no longer act.
    let sim = run_inline(
        "monitors 3\nstorage pool=primary\nhost hv1\nhost hv2\nhost hv3\nvm u1 host=hv2\n\
         at 1000 crash-host hv2\nat 1000 when fencing hv2 partition-leader on\n\
         at 40000 partition-leader off\nrun 15000\n",
    );
    assert!(sim.settled().is_empty(), "{}", render(&sim));
    assert_eq!(sim.acting_leaders(), vec![2], "{}", render(&sim));
    let log = sim.event_log();
    assert!(!log.contains("host hv1 is down"), "{}", render(&sim));
    assert!(!log.contains("host hv3 is down"), "{}", render(&sim));
}

#[test]
fn leader_crash_and_partition_heal_to_exactly_one_acting_leader() {
    for fault in [
        "leader-crash",
        "partition-leader on",
        "partition-leader on hosts",
    ] {
        let sim = run_inline(&format!(
            "monitors 3\nhost hv1\nhost hv2\nvm u1 host=hv1\nvm u2 host=hv2\n\
             at 1000 crash-vm u1\nat 1000 when recovering u1 {fault}\nat 3000 crash-vm u2\n\
             at 6000 partition-leader off\nrun 14000\n"
        ));
        assert!(sim.settled().is_empty(), "{fault}: {}", render(&sim));
        assert_eq!(sim.acting_leaders().len(), 1, "{fault}: {}", render(&sim));
    }
}

/// A tiny deterministic generator (splitmix64), so runs are reproducible from their seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// A random scenario: faults for 20 s, then everything healed for 40 s.
fn random_scenario(seed: u64) -> String {
    let mut r = Rng(seed);
    let hosts = 2 + r.below(3);
    let vms = 1 + r.below(4);
    let mut s = String::from(
        "policy max_restarts_in_place=2 max_relocations=2 window_ms=600000 backoff_initial_ms=200 backoff_max_ms=1000\n",
    );
    // Half the runs have shared storage (storage heartbeats, slot fencing, leases); some
    // without the slot, some with the keep-running isolation response.
    let storage = r.below(2) == 0;
    if storage {
        s.push_str("storage pool=primary\n");
        if r.below(3) == 0 {
            s.push_str("failover storage_slot=no\n");
        }
        if r.below(4) == 0 {
            s.push_str("lease response=keep-running\n");
        }
    }
    // A quarter of the runs have no host watchdog: lease expiry then never proves anything.
    if r.below(4) == 0 {
        s.push_str("watchdog none\n");
    }
    for h in 1..=hosts {
        s.push_str(&format!("host hv{h}\n"));
    }
    for v in 1..=vms {
        s.push_str(&format!(
            "vm u{v} host=hv{} priority={}{}\n",
            1 + r.below(hosts),
            r.below(3),
            if r.below(2) == 0 { " group=g1" } else { "" }
        ));
    }
    let mut t = 500;
    while t < 20_000 {
        t += 50 + r.below(1_500);
        let h = 1 + r.below(hosts);
        let v = 1 + r.below(vms);
        let onoff = if r.below(2) == 0 { "on" } else { "off" };
        // Issue 9's faults: late reconnects after a monitor restart (beyond down_after,
        // within a lease), reordered reports (older listings after newer events and
        // answers; in half of them, by the parity of their time so that every other draw
        // stays as it was, also lifecycle events and command answers, each late by its own
        // delay), quorum acknowledgements that stop for a while (no lease grants).
        let f = if r.below(6) == 0 {
            match r.below(3) {
                0 => {
                    let late = if r.below(2) == 0 {
                        format!(" hv{h}")
                    } else {
                        String::new()
                    };
                    format!("monitor-restart {}{late}", 700 + r.below(1_700))
                }
                1 => {
                    let all = if t % 2 == 0 { " all" } else { "" };
                    format!("reorder-reports hv{h} {onoff}{all}")
                }
                _ => {
                    let back = t + 200 + r.below(3_000);
                    s.push_str(&format!("at {back} quorum-stall off\n"));
                    "quorum-stall on".to_string()
                }
            }
        } else {
            // 16..=18 need storage; 19.. are for every run.
            let k = r.below(if storage { 22 } else { 19 });
            let k = if !storage && k >= 16 { k + 3 } else { k };
            match k {
                19 => format!("kill-agent-for-good hv{h}"),
                20 => format!("version-mismatch hv{h} {onoff}"),
                21 => format!("partition hv{h}"),
                14 => format!("maintenance hv{h} {onoff}"),
                15 => {
                    // Every monitor down for a while, then back.
                    let back = t + 500 + r.below(8_000);
                    s.push_str(&format!("at {back} monitors-up\n"));
                    "monitors-down".to_string()
                }
                16 | 17 => format!("storage-fault hv{h} {onoff}"),
                18 => format!("storage-outage {onoff}"),
                10 => format!("crash-host hv{h}"),
                11 => format!("power-on hv{h}"),
                12 => format!("partition hv{h}"),
                13 => format!("fence-fails hv{h} {onoff}"),
                0..=2 => format!("crash-vm u{v}"),
                3 => format!("crash-on-start u{v} {onoff}"),
                4 => format!("kill-agent hv{h}"),
                5 => format!("start-agent hv{h}"),
                6 => format!("start-fails hv{h} {onoff}"),
                7 => format!("drop-answers hv{h} {onoff}"),
                8 => "new-leader".to_string(),
                _ => format!("guest-shutdown u{v}"),
            }
        };
        s.push_str(&format!("at {t} {f}\n"));
    }
    // Issue 12 item 8: half the runs have three monitors, with faults of their own drawn
    // from a second generator (the draws above stay as they were for every seed): the
    // leader crashes, or is cut from the other monitors (and in half of those from the
    // hosts too) while it goes on running, at random times and the moment a fence or a
    // recovery is under way; clean handovers; lost quorum acknowledgements.
    let mut mr = Rng(seed ^ 0x0005_EED0_F4D0_1707);
    let multi = mr.below(2) == 0;
    if multi {
        s.push_str("monitors 3\n");
        let mut mt = 500;
        loop {
            mt += 300 + mr.below(4_000);
            // All of them before the healing below (where operators' commands must commit).
            if mt >= t {
                break;
            }
            let h = 1 + mr.below(hosts);
            let v = 1 + mr.below(vms);
            let hosts_too = if mr.below(2) == 0 { " hosts" } else { "" };
            let back = mt + 200 + mr.below(6_000);
            let f = match mr.below(8) {
                0 => "leader-crash".to_string(),
                1 => {
                    s.push_str(&format!("at {back} partition-leader off\n"));
                    format!("partition-leader on{hosts_too}")
                }
                2 => format!("when fencing hv{h} leader-crash"),
                3 => format!("when recovering u{v} leader-crash"),
                4 | 5 => {
                    // Healed some time after the condition can have held (a `when` waits
                    // at most 10 s).
                    let wait = if mr.below(2) == 0 {
                        format!("when fencing hv{h}")
                    } else {
                        format!("when recovering u{v}")
                    };
                    s.push_str(&format!("at {} partition-leader off\n", back + 10_000));
                    format!("{wait} partition-leader on{hosts_too}")
                }
                6 => "new-leader".to_string(),
                _ => {
                    s.push_str(&format!("at {back} quorum-stall off\n"));
                    "quorum-stall on".to_string()
                }
            };
            s.push_str(&format!("at {mt} {f}\n"));
        }
    }
    // Issue 12 item 9: a third of the runs change cluster settings while the faults happen,
    // as `vigilctl config set` does (drawn from a third generator, so the draws above stay
    // as they were): ha_tag set and unset (no host carries it: placement falls back to any
    // host, loudly), and the detector's down_after_ms. Those runs have a lease long enough
    // for the lease's check against the storage interval that every change passes.
    let mut cr = Rng(seed ^ 0x0C0F_16A7_5E77_1465);
    if cr.below(3) == 0 {
        s.insert_str(0, "lease duration_ms=3000\n");
        let mut ct = 500;
        loop {
            ct += 500 + cr.below(5_000);
            if ct >= t {
                break;
            }
            let f = match cr.below(3) {
                0 => "config-set recovery.ha_tag ha by=op".to_string(),
                1 => "config-unset recovery.ha_tag by=op".to_string(),
                _ => format!(
                    "config-set detector.down_after_ms {} by=op",
                    700 + cr.below(1_200)
                ),
            };
            s.push_str(&format!("at {ct} {f}\n"));
        }
    }
    // Heal everything (the monitors first: operators' commands need them). A partition a
    // `when` fault starts late (10 s at most after its time) is healed by the second line.
    t += 100;
    s.push_str(&format!(
        "at {t} monitors-up\nat {t} quorum-stall off\nat {t} partition-leader off\nat {} partition-leader off\n",
        t + 10_100
    ));
    t += 100;
    for h in 1..=hosts {
        s.push_str(&format!("at {t} start-agent hv{h}\nat {t} start-fails hv{h} off\nat {t} drop-answers hv{h} off\nat {t} heal hv{h}\nat {t} fence-fails hv{h} off\nat {t} power-on hv{h}\nat {t} maintenance hv{h} off\nat {t} version-mismatch hv{h} off\nat {t} reorder-reports hv{h} off\n"));
        if storage {
            s.push_str(&format!("at {t} storage-fault hv{h} off\n"));
        }
    }
    for v in 1..=vms {
        s.push_str(&format!("at {t} crash-on-start u{v} off\n"));
    }
    if storage {
        s.push_str(&format!("at {t} storage-outage off\n"));
    }
    s.push_str(&format!("run {}\n", t + 40_000));
    s
}

#[test]
fn seeded_random_faults_never_run_a_vm_twice() {
    if chosen_scenario().is_some() && std::env::var_os("VIGIL_SIM_RUNS").is_none() {
        eprintln!("VIGIL_SCENARIO is set: the seeded random runs are skipped (set VIGIL_SIM_RUNS to run them too)");
        return;
    }
    let runs: u64 = std::env::var("VIGIL_SIM_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let base: u64 = std::env::var("VIGIL_SIM_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let mut unsettled_runs = Vec::new();
    // Runs in which an operator's settings change committed (not every one is refused).
    let mut changed_settings = 0;
    for seed in base..base + runs {
        let text = random_scenario(seed);
        let sc = Scenario::parse(&text).expect("generated scenario parses");
        let mut sim = Sim::new(&sc);
        if let Err(v) = sim.run(&sc) {
            panic!(
                "seed {seed}: {v}\nreproduce: VIGIL_SIM_SEED={seed} VIGIL_SIM_RUNS=1 cargo test -p vigil-monitor --test scenarios seeded\n--- scenario\n{text}\n--- log\n{}",
                sim.event_log()
            );
        }
        if text.contains("config-") && sim.event_log().contains("admin:op changed") {
            changed_settings += 1;
        }
        let mut unsettled = sim.settled();
        // And exactly one monitor acts as leader.
        let acting = sim.acting_leaders();
        if acting.len() != 1 {
            unsettled.push(format!("monitors acting as leader at the end: {acting:?}"));
        }
        if !unsettled.is_empty() {
            if runs == 1 {
                eprintln!("--- scenario\n{text}\n--- log\n{}", sim.event_log());
            }
            unsettled_runs.push(format!("seed {seed}: {unsettled:?}"));
        }
    }
    eprintln!("{changed_settings} of {runs} runs committed a settings change");
    assert!(
        runs < 30 || changed_settings > 0,
        "no run of {runs} committed a settings change: the generator's `config-set` lines are all refused"
    );
    // Liveness: once every fault is healed, exactly one monitor acts as leader, and every HA
    // VM runs again or is deliberately left alone (stopped by its guest or an operator, or
    // given up after its budget).
    assert!(
        unsettled_runs.is_empty(),
        "{} of {runs} runs left VMs neither running nor deliberately stopped:\n{}",
        unsettled_runs.len(),
        unsettled_runs.join("\n")
    );
}

/// Issue 12 item 6: the seeded random runs again, each with a backup taken at a random moment
/// of its faults and restored at a later one (every monitor wiped, rebuilt from the backup),
/// so that the restored state is older than what the agents know in every way the faults
/// can make it (recoveries, moves, drains, fenced hosts, crash loops). The one rule must hold
/// throughout. Liveness is not asserted: a VM that a restore finds only defined, not
/// running, is left stopped on purpose, and a restored leader hears every silent host at
/// once, which the mass-failure guard may hold (about 5% of the runs end with a VM waiting
/// for the operator; `VIGIL_SIM_VERBOSE=1` lists them, with the log when `VIGIL_SIM_RUNS=1`).
/// Without the adoption (`engine::leadership::begin_adoption`) seed 84 runs a VM twice.
#[test]
fn seeded_random_restores_never_run_a_vm_twice() {
    if chosen_scenario().is_some() && std::env::var_os("VIGIL_SIM_RUNS").is_none() {
        return;
    }
    let runs: u64 = std::env::var("VIGIL_SIM_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let base: u64 = std::env::var("VIGIL_SIM_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let mut unsettled = 0;
    for seed in base..base + runs {
        // Its own draws, so that the fault list is the one the other test runs for `seed`.
        let mut r = Rng(seed ^ 0x5eed_bac0);
        let backup_at = 500 + r.below(10_000);
        let restore_at = backup_at + 200 + r.below(12_000);
        let text = format!(
            "{}at {backup_at} backup\nat {restore_at} restore\n",
            random_scenario(seed)
        );
        let sc = Scenario::parse(&text).expect("generated scenario parses");
        let mut sim = Sim::new(&sc);
        if let Err(v) = sim.run(&sc) {
            panic!(
                "seed {seed}: {v}\nreproduce: VIGIL_SIM_SEED={seed} VIGIL_SIM_RUNS=1 cargo test -p vigil-monitor --test scenarios seeded_random_restores\n--- scenario\n{text}\n--- log\n{}",
                sim.event_log()
            );
        }
        let left = sim.settled();
        if !left.is_empty() {
            unsettled += 1;
            if std::env::var_os("VIGIL_SIM_VERBOSE").is_some() {
                eprintln!("seed {seed}: {left:?}");
                if runs == 1 {
                    eprintln!("--- scenario\n{text}\n--- log\n{}", sim.event_log());
                }
            }
        }
    }
    eprintln!(
        "{unsettled} of {runs} restored runs left a VM neither running nor deliberately stopped"
    );
}
