//! Sessions, leadership, and the ordering of observations.

use super::*;

/// An HA domain listed to a monitor before it became leader was never registered: the
/// follower's proposals are dropped, and the new leader registered the host but not what
/// it listed (seen as a tiny benchmark waiting 30 minutes for 200 VMs).
#[test]
fn ha_domains_listed_before_this_monitor_led_are_registered_when_it_leads() {
    let mut s = Sim::follower();
    s.connect("hv1", 0);
    s.input(
        Input::Inventory(Listing {
            host: "hv1".into(),
            domains: vec![
                running("u1", None),
                domain(
                    "u2",
                    DomainState::Shutoff,
                    StateReason::NeverStarted,
                    None,
                    true,
                ),
                domain(
                    "plain",
                    DomainState::Running,
                    StateReason::Booted,
                    None,
                    false,
                ),
            ],
            health: HypervisorHealth::Healthy,
            seq: obs(),
        }),
        10,
    );
    assert!(s.state.vms.is_empty(), "a follower records nothing");
    s.input(Input::BecameLeader { term: 1, node: 1 }, 20);
    assert_eq!(s.state.vms.get("u1").map(|v| v.host.as_str()), Some("hv1"));
    assert_eq!(s.state.vms.get("u1").map(|v| v.ha), Some(true));
    assert!(s.state.vms.contains_key("u2"));
    assert!(!s.state.vms.contains_key("plain"), "not HA: not registered");
}

/// `vm list` pages walked every reported domain of the cluster for each page (43 s for
/// 100,000 VMs; one page over vigilctl's 3 s under load failed the scale test). The
/// merge must give what the walk gave: every copy of the first `take` uuids after the
/// cursor, on connected hosts only.
#[test]
fn a_vm_list_page_is_a_merge_of_the_connected_hosts_listings() {
    let mut s = Sim::new();
    let listing = |uuids: &[&str]| -> Vec<DomainInfo> {
        uuids
            .iter()
            .map(|u| domain(u, DomainState::Running, StateReason::Booted, Some(1), false))
            .collect()
    };
    for (h, uuids) in [
        ("hv1", &["a", "c", "e", "g"][..]),
        ("hv2", &["b", "c", "f"][..]),
        ("hv3", &["d", "h"][..]),
    ] {
        s.connect(h, 0);
        s.input(
            Input::Inventory(Listing {
                host: h.into(),
                domains: listing(uuids),
                health: HypervisorHealth::Healthy,
                seq: obs(),
            }),
            1,
        );
    }
    s.input(Input::AgentDisconnected { host: "hv3".into() }, 2);
    let walk = |after: Option<&str>, take: usize| -> Vec<(String, String)> {
        let mut v: Vec<(String, String)> = s
            .engine
            .domains()
            .filter(|(h, _)| s.engine.is_connected(h))
            .filter(|(_, d)| after.is_none_or(|a| d.uuid.as_str() > a))
            .map(|(h, d)| (d.uuid.clone(), h.to_string()))
            .collect();
        v.sort();
        let mut keep: Vec<&String> = v.iter().map(|(u, _)| u).collect();
        keep.dedup();
        let keep: Vec<String> = keep.into_iter().take(take).cloned().collect();
        v.into_iter().filter(|(u, _)| keep.contains(u)).collect()
    };
    for after in [
        None,
        Some("a"),
        Some("b"),
        Some("c"),
        Some("f"),
        Some("g"),
        Some("z"),
    ] {
        for take in 1..=4 {
            let mut got: Vec<(String, String)> = s
                .engine
                .connected_domains_after(after, take)
                .into_iter()
                .map(|(h, d)| (d.uuid, h))
                .collect();
            got.sort();
            assert_eq!(got, walk(after, take), "after {after:?}, take {take}");
        }
    }
    // Both copies of "c", and nothing of the disconnected hv3.
    let first = s.engine.connected_domains_after(Some("b"), 1);
    assert_eq!(first.len(), 2, "{first:?}");
    assert!(s
        .engine
        .connected_domains_after(None, 100)
        .iter()
        .all(|(h, _)| h != "hv3"));
}

#[test]
fn connect_registers_and_silence_goes_down() {
    let mut s = Sim::new();
    s.connect("hv1", 10);
    assert!(s.state.hosts.contains_key("hv1"));
    for t in (100..=400).step_by(100) {
        s.beat("hv1", t);
        s.input(Input::Tick, t + 50);
    }
    for t in (500..=1_000).step_by(50) {
        s.input(Input::Tick, t);
    }
    assert_eq!(
        s.log(),
        vec![
            "monitor node 1 became leader in term 1",
            "host hv1 registered in zone z, cluster c",
            "host hv1 is up (was unknown)",
            "host hv1 is suspect: no heartbeat for 300 ms",
            "host hv1: silent; investigating (storage heartbeat, peers)",
            "host hv1 is down: no heartbeat for 550 ms",
            "host hv1: dead: no storage heartbeat; its address is unknown, so no peer could check it",
        ]
    );
    s.beat("hv1", 1_100);
    assert_eq!(
        s.log().last().map(String::as_str),
        Some("host hv1 is up (was down)")
    );
}

#[test]
fn reconnecting_agent_does_not_reregister() {
    let mut s = Sim::new();
    s.connect("hv1", 0);
    let n = s.state.events.len();
    s.input(Input::AgentDisconnected { host: "hv1".into() }, 50);
    s.connect("hv1", 60);
    assert_eq!(s.state.events.len(), n, "no new events: {:?}", s.log());
}

#[test]
fn followers_propose_nothing() {
    let mut e = Engine::new(cfg(), RecoveryConfig::default(), 0);
    let state = ClusterState::default();
    let actions = e.handle(
        Input::AgentConnected(Hello {
            host: "hv1".into(),
            zone: "z".into(),
            cluster: "c".into(),
            agent_version: "1".into(),
            facts: HostFacts::default(),
            instance: 1,
            pools: vec![],
            addr: None,
        }),
        0,
        0,
        &state,
    );
    assert!(actions.is_empty());
    assert!(e.is_connected("hv1"));
}

#[test]
fn a_new_leader_grants_grace_to_known_hosts() {
    let mut s = Sim::new();
    s.connect("hv1", 0);
    s.connect("hv2", 0);
    s.input(Input::AgentDisconnected { host: "hv2".into() }, 10);
    s.input(Input::LostLeadership, 20);
    s.input(Input::BecameLeader { term: 2, node: 1 }, 10_000);
    let n = s.state.events.len();
    s.input(Input::Tick, 10_400);
    assert!(
        !s.log()[n..].iter().any(|m| m.contains("is down")),
        "nobody condemned inside the grace period: {:#?}",
        s.log()
    );
    s.beat("hv1", 10_450);
    s.input(Input::Tick, 10_501);
    // Not heard since the election: Unknown, not Down, for a full lease plus the drift
    // margin (5 s + 1 s by default), however long down_after is.
    s.input(Input::Tick, 15_999);
    assert!(
        !s.log()[n..].iter().any(|m| m.contains("host hv2 is down")),
        "{:#?}",
        s.log()
    );
    s.input(Input::Tick, 16_001);
    let log = s.log();
    assert!(
        log[n..]
            .iter()
            .any(|m| m == "host hv2 is down: no heartbeat for 6001 ms"),
        "{log:#?}"
    );
}

/// hv1 (with a fence agent) runs HA VM u1; hv2 is empty; both connected at 0.
fn fenceable_hv1_with_an_ha_vm() -> Sim {
    let mut s = Sim::new();
    s.engine = s.engine.clone().with_failover(FailoverConfig {
        fence_hosts: ["hv1".to_string()].into(),
        mass_failure_percent: 100,
        ..FailoverConfig::default()
    });
    s.connect("hv1", 0);
    s.connect("hv2", 0);
    s.inventory("hv1", vec![running("u1", None)], 10);
    s
}

#[test]
fn no_host_is_fenced_in_the_first_full_lease_after_an_election() {
    let mut s = fenceable_hv1_with_an_ha_vm();
    s.input(Input::LostLeadership, 20);
    // hv1 was heard once after the election, then its agent went quiet (reconnecting
    // slowly after the monitor restart); hv2 beats on.
    s.input(Input::BecameLeader { term: 2, node: 1 }, 1_000);
    s.beat("hv1", 1_050);
    for t in (1_100..6_950).step_by(100) {
        s.beat("hv2", t);
        s.input(Input::Tick, t);
    }
    let fenced = |s: &Sim| {
        s.sent
            .iter()
            .any(|a| matches!(a, Action::Fence { host } if host == "hv1"))
    };
    assert!(
        !fenced(&s),
        "fenced within a lease of the election: {:#?}",
        s.log()
    );
    assert!(
        !s.log().iter().any(|m| m.contains("fencing")),
        "{:#?}",
        s.log()
    );
    // A full lease plus margin (6 s) after the election, it may be.
    for t in (7_000..8_000).step_by(100) {
        s.beat("hv2", t);
        s.input(Input::Tick, t);
    }
    assert!(fenced(&s), "{:#?}", s.log());
}

#[test]
fn a_fence_agent_runs_only_once_its_fence_attempt_is_committed() {
    let mut s = fenceable_hv1_with_an_ha_vm();
    s.beat("hv1", 50);
    // From here on nothing this leader proposes commits (cut off from its quorum, its
    // lease not yet run out): hv1 goes quiet and is due for fencing after the first lease.
    s.uncommitted = Some(Vec::new());
    let fenced = |s: &Sim| {
        s.sent
            .iter()
            .filter(|a| matches!(a, Action::Fence { host } if host == "hv1"))
            .count()
    };
    for t in (100..12_000).step_by(100) {
        s.beat("hv2", t);
        s.input(Input::Tick, t);
    }
    let proposed = s.uncommitted.clone().unwrap_or_default();
    assert!(
        proposed
            .iter()
            .any(|c| matches!(c, StateCommand::FenceStarted { host, .. } if host == "hv1")),
        "fencing was proposed: {proposed:#?}"
    );
    assert_eq!(
        fenced(&s),
        0,
        "the fence agent ran before its attempt committed"
    );
    // The proposals commit: the fence agent runs, once.
    for cmd in s.uncommitted.take().unwrap_or_default() {
        s.state.apply(&cmd);
    }
    s.input(Input::Applied, 12_000);
    s.input(Input::Tick, 12_100);
    assert_eq!(fenced(&s), 1, "{:#?}", s.log());
}

#[test]
fn a_listing_taken_before_a_start_completed_is_not_proof_of_a_crash() {
    let mut s = sim_with_ha_vm();
    s.event("hv1", "u1", LifecycleKind::Crashed, Some(0), 100);
    assert_eq!(s.starts(), vec![("hv1".to_string(), "u1".to_string(), 1)]);
    // The agent lists its domains while the start is under way: defined, shut off,
    // generation 1 already in its metadata. That listing reaches the monitor only after
    // the start's "running" answer.
    let taken = obs();
    s.answer_start("hv1", "u1", 1, true, 900);
    assert_eq!(s.phase("u1"), "running");
    s.input(
        Input::Inventory(Listing {
            host: "hv1".into(),
            domains: vec![domain(
                "u1",
                DomainState::Shutoff,
                StateReason::NeverStarted,
                Some(1),
                true,
            )],
            health: HypervisorHealth::Healthy,
            seq: taken,
        }),
        950,
    );
    assert_eq!(s.phase("u1"), "running", "{:#?}", s.log());
    assert_eq!(s.starts().len(), 1, "a second start: {:#?}", s.log());
    // Nor does it count as proof that the domain is gone from hv1.
    assert!(!s.engine.shut_off_on("hv1", "u1"));
    // A newer listing that shows it shut off is believed.
    s.inventory("hv1", vec![shut_off("u1", 1)], 1_500);
    s.assert_logged("crashed on hv1 (generation 1)");
}

#[test]
fn an_event_older_than_the_newest_observation_of_the_vm_is_ignored() {
    let mut s = sim_with_ha_vm();
    let old = obs();
    // A newer listing shows it running...
    s.inventory("hv1", vec![running("u1", Some(0))], 100);
    // ...then a stop event that was taken before it arrives.
    let stop = domain_event("u1", LifecycleKind::Destroyed, (5, 1), 50);
    s.lifecycle("hv1", stop, Some(0), old, 150);
    assert_eq!(s.phase("u1"), "running", "{:#?}", s.log());
}

#[test]
fn a_failed_destroy_does_not_leave_an_expected_stop_behind() {
    let mut s = two_hosts_one_vm();
    s.store_definition("hv1", "u1", 20);
    s.state.apply(&StateCommand::SetMaintenance {
        at_ms: 1_000_030,
        host: "hv1".into(),
        on: true,
    });
    s.live_ticks_both(100..200);
    let destroys = |s: &Sim| {
        s.sent
            .iter()
            .filter(|a| {
                matches!(
                    a,
                    Action::Send {
                        command: AgentCommand::DestroyDomain { .. },
                        ..
                    }
                )
            })
            .count()
    };
    assert_eq!(destroys(&s), 1, "{:#?}", s.log());
    // QEMU is stuck in uninterruptible I/O: the agent cannot destroy it.
    s.input(
        Input::CommandDone(CommandAnswer {
            host: "hv1".into(),
            command: AgentCommand::DestroyDomain { uuid: "u1".into() },
            result: Ok(CommandOutcome::Failed {
                reason: "timed out waiting for qemu to exit".into(),
            }),
            seq: Some(obs()),
        }),
        300,
    );
    s.assert_logged("could not stop VM vm-u1 on hv1");
    s.live_ticks_both(400..2_000);
    assert_eq!(destroys(&s), 1, "retried only after a while");
    // Later an operator destroys it on purpose: that is respected, not read as the
    // drain's stop.
    s.event("hv1", "u1", LifecycleKind::Destroyed, Some(0), 2_100);
    assert_eq!(s.phase("u1"), "stopped", "{:#?}", s.log());
    s.live_ticks_both(2_200..5_000);
    assert!(s.starts().is_empty(), "{:?}", s.starts());
}

#[test]
fn an_expected_stop_whose_destroy_never_answers_expires() {
    let mut s = two_hosts_one_vm();
    s.state.apply(&StateCommand::SetMaintenance {
        at_ms: 1_000_030,
        host: "hv1".into(),
        on: true,
    });
    s.live_ticks_both(100..200);
    assert!(s.engine.expected_stops.contains_key("u1"));
    // The destroy hangs (no answer, no stop), and the operator ends the maintenance.
    s.state.apply(&StateCommand::SetMaintenance {
        at_ms: 1_001_000,
        host: "hv1".into(),
        on: false,
    });
    s.live_ticks_both(1_000..1_100);
    s.live_ticks_both(EXPECTED_STOP_TTL_MS + 200..EXPECTED_STOP_TTL_MS + 300);
    assert!(
        !s.engine.expected_stops.contains_key("u1"),
        "still expected after {EXPECTED_STOP_TTL_MS} ms"
    );
    // Much later an operator destroys it: respected, not read as the drain's stop.
    s.event(
        "hv1",
        "u1",
        LifecycleKind::Destroyed,
        Some(0),
        EXPECTED_STOP_TTL_MS + 400,
    );
    assert_eq!(s.phase("u1"), "stopped", "{:#?}", s.log());
}

#[test]
fn no_lease_grant_fence_or_leader_record_without_the_leader_lease() {
    let mut s = Sim::new();
    s.engine = s.engine.clone().with_leader_lease();
    s.connect("hv1", 0);
    let grants = |s: &Sim| {
        s.sent
            .iter()
            .filter(|a| {
                matches!(
                    a,
                    Action::Notify {
                        message: MonitorToAgent::LeaseGrant { .. },
                        ..
                    }
                )
            })
            .count()
    };
    let records = |s: &Sim| {
        s.sent
            .iter()
            .filter(|a| matches!(a, Action::LeaderRecord { .. }))
            .count()
    };
    s.beat("hv1", 100);
    s.input(Input::Tick, 110);
    assert_eq!(grants(&s), 0, "no leader lease yet");
    assert_eq!(records(&s), 0, "no leader record without a lease");
    s.input(
        Input::LeaderLease {
            until_ms: Some(450),
        },
        200,
    );
    s.beat("hv1", 300);
    assert_eq!(grants(&s), 1);
    s.input(Input::Tick, 310);
    assert_eq!(records(&s), 1);
    // No probe answered since (a leader cut off from its quorum, or a stalled core): at 450
    // the lease is out, checked against the clock, with no input saying so.
    s.beat("hv1", 449);
    assert_eq!(grants(&s), 2);
    s.beat("hv1", 450);
    s.input(Input::Tick, 460);
    assert_eq!(grants(&s), 2, "no grant once the lease ran out");
    assert_eq!(records(&s), 1, "no leader record once the lease ran out");
    // The lease book counts from the last grant that went out.
    let l = s.engine.lease_config().clone();
    assert_eq!(
        s.engine.leases.expires_at("hv1"),
        Some(449 + l.duration_ms + l.drift_margin_ms)
    );
    // Still proposing (a proposal cannot commit without a quorum): only effects stop.
    s.input(Input::LeaderLease { until_ms: None }, 500);
    s.beat("hv1", 600);
    assert_eq!(grants(&s), 2);
}

/// Issue 9 item 4: this monitor's own certificate expired. Agents refuse it, so every host
/// falls silent at once; that silence is no proof, and nothing is fenced until the
/// certificate is renewed, and then only a full lease later (the agents reconnect first).
#[test]
fn an_expired_monitor_certificate_fences_nobody() {
    let mut s = fenceable_hv1_with_an_ha_vm();
    s.beat("hv1", 50);
    s.input(
        Input::OwnCertificate {
            expired: Some("monitor certificate mon1".into()),
        },
        100,
    );
    // Ticks from `from` to `to` (ms); whether hv1 has been power-fenced by then.
    let fenced_after_ticks = |s: &mut Sim, from: u64, to: u64| {
        for t in (from..to).step_by(100) {
            s.input(Input::Tick, t);
        }
        s.sent
            .iter()
            .any(|a| matches!(a, Action::Fence { host } if host == "hv1"))
    };
    assert!(
        !fenced_after_ticks(&mut s, 100, 20_000),
        "fenced while its own certificate was expired: {:#?}",
        s.log()
    );
    assert!(
        s.log()
            .iter()
            .any(|m| m.contains("this monitor's certificate expired")
                && m.contains("no host is fenced")),
        "{:#?}",
        s.log()
    );
    // Renewed at 20 s: hv1 stays silent, so a full lease (plus margin) later it is fenced.
    s.input(Input::OwnCertificate { expired: None }, 20_000);
    assert!(
        !fenced_after_ticks(&mut s, 20_000, 25_900),
        "fenced within a lease of the renewal: {:#?}",
        s.log()
    );
    assert!(fenced_after_ticks(&mut s, 26_000, 28_000), "{:#?}", s.log());
}

/// hv1 goes quiet and is power-fenced; its fence agent is running (sent, no answer yet).
fn hv1_with_its_fence_agent_running() -> Sim {
    let mut s = fenceable_hv1_with_an_ha_vm();
    s.beat("hv1", 50);
    let mut t = 100;
    while !s
        .sent
        .iter()
        .any(|a| matches!(a, Action::Fence { host } if host == "hv1"))
    {
        assert!(t < 20_000, "hv1 was never fenced: {:#?}", s.log());
        s.beat("hv2", t);
        s.input(Input::Tick, t);
        t += 100;
    }
    s
}

fn phase_of(s: &Sim, host: &str) -> &'static str {
    s.state.hosts.get(host).map_or("", |h| h.phase.name())
}

/// Seed 3589: a host whose agent connected while its fence agent ran rejoined at once; the
/// fence then powered it off anyway, unrecorded (the proof was refused as stale), so its VMs
/// were never restarted (and a restart ordered on it in between was killed by the fence).
#[test]
fn a_host_heard_while_its_fence_agent_runs_rejoins_only_if_the_fence_fails() {
    // The fence succeeds: the host is fenced (the proof it always was) and u1 moves to hv2.
    let mut s = hv1_with_its_fence_agent_running();
    let t = 20_000;
    s.connect("hv1", t);
    s.beat("hv1", t + 10);
    assert_eq!(phase_of(&s, "hv1"), "fencing", "{:#?}", s.log());
    s.assert_logged("host hv1 is heard again while its fence agent runs");
    assert!(
        s.started_only_on("hv2"),
        "a start on the host being fenced: {:?}",
        s.starts()
    );
    s.input(
        Input::FenceDone {
            host: "hv1".into(),
            result: Ok("power off confirmed".into()),
        },
        t + 300,
    );
    assert_eq!(phase_of(&s, "hv1"), "fenced", "{:#?}", s.log());
    // hv1 is off now: silent.
    for k in 1..30 {
        s.beat("hv2", t + 300 + k * 100);
        s.input(Input::Tick, t + 300 + k * 100);
    }
    // (This fixture stores no definition, so the start itself stays queued.)
    s.assert_logged(
        "VM vm-u1 lost with its host on hv1 (generation 0); proof: host hv1 was fenced",
    );
    s.assert_logged("relocating to hv2");
    assert!(s.started_only_on("hv2"), "{:?}", s.starts());
    assert_eq!(
        s.log().iter().filter(|m| m.contains("rejoined")).count(),
        0,
        "{:#?}",
        s.log()
    );

    // The fence fails: the host, heard all along, rejoins; nothing starts anywhere.
    let mut s = hv1_with_its_fence_agent_running();
    s.connect("hv1", t);
    s.beat("hv1", t + 10);
    s.input(
        Input::FenceDone {
            host: "hv1".into(),
            result: Err(crate::fencing::FenceFailure::NotConfigured { host: "hv1".into() }),
        },
        t + 300,
    );
    s.beat("hv1", t + 400);
    assert_eq!(phase_of(&s, "hv1"), "active", "{:#?}", s.log());
    s.assert_logged("host hv1 rejoined (was fencing)");
    assert!(s.starts().is_empty(), "{:?}", s.starts());
}

/// The same for a fence agent that a previous leader started: this leader cannot know
/// whether it still runs (a deposed or killed monitor's agent runs on until its time limit),
/// so a host being fenced at its election does not rejoin before that limit has passed.
/// (Before the fix, a new leader's empty bookkeeping let it rejoin at once, a VM was
/// restarted on it, and the old leader's fence then killed it: scenario 58.)
#[test]
fn a_new_leader_lets_a_host_being_fenced_rejoin_only_after_a_predecessors_fence_limit() {
    let mut s = hv1_with_its_fence_agent_running();
    s.engine = s.engine.clone().with_failover(FailoverConfig {
        fence_hosts: ["hv1".to_string()].into(),
        mass_failure_percent: 100,
        fence_agent_limit_ms: 20_000,
        ..FailoverConfig::default()
    });
    // Leadership moves while the fence agent runs; this monitor leads again later, its own
    // fence forgotten like any predecessor's.
    s.input(Input::LostLeadership, 20_000);
    let elected = 21_000;
    s.input(Input::BecameLeader { term: 2, node: 1 }, elected);
    s.connect("hv1", elected + 100);
    s.beat("hv1", elected + 110);
    assert_eq!(phase_of(&s, "hv1"), "fencing", "{:#?}", s.log());
    s.assert_logged("a fence agent that a previous leader started may still run against it");
    let limit = elected + 20_000 + crate::engine::PREDECESSOR_FENCE_MARGIN_MS;
    let mut t = elected + 200;
    while t < limit {
        s.beat("hv1", t);
        s.beat("hv2", t);
        s.input(Input::Tick, t);
        t += 500;
    }
    assert_eq!(
        phase_of(&s, "hv1"),
        "fencing",
        "rejoined before the limit: {:#?}",
        s.log()
    );
    assert!(s.started_only_on("hv2"), "{:?}", s.starts());
    // Past the limit, heard again: it rejoins, once.
    s.beat("hv1", limit + 100);
    assert_eq!(phase_of(&s, "hv1"), "active", "{:#?}", s.log());
    assert_eq!(
        s.log().iter().filter(|m| m.contains("rejoined")).count(),
        1,
        "{:#?}",
        s.log()
    );
}

/// A power fence proposed but not yet committed when the host is heard again is called
/// off: its fence agent never runs, and the host rejoins.
#[test]
fn a_host_heard_before_its_fence_attempt_commits_is_not_powered_off() {
    let mut s = fenceable_hv1_with_an_ha_vm();
    s.beat("hv1", 50);
    s.uncommitted = Some(Vec::new());
    let mut t = 100;
    while !s.uncommitted.as_ref().is_some_and(|p| {
        p.iter()
            .any(|c| matches!(c, StateCommand::FenceStarted { host, .. } if host == "hv1"))
    }) {
        assert!(t < 20_000, "hv1 was never fenced: {:#?}", s.log());
        s.beat("hv2", t);
        s.input(Input::Tick, t);
        t += 100;
    }
    // Heard again before the attempt commits; then everything commits.
    s.connect("hv1", t);
    for cmd in s.uncommitted.take().unwrap_or_default() {
        s.state.apply(&cmd);
    }
    s.input(Input::Applied, t + 10);
    for k in 1..20 {
        s.beat("hv1", t + k * 100);
        s.beat("hv2", t + k * 100);
        s.input(Input::Tick, t + k * 100);
    }
    assert!(
        !s.sent
            .iter()
            .any(|a| matches!(a, Action::Fence { host } if host == "hv1")),
        "the fence agent ran against a host heard before its attempt committed: {:#?}",
        s.log()
    );
    assert_eq!(phase_of(&s, "hv1"), "active", "{:#?}", s.log());
}

/// Defect A (issue 12): a fence agent run decided while the leader lease was out (a lease
/// that lapsed under load and came back in the same term) was dropped while the engine's
/// books said it ran: nothing fenced the host, and it never rejoined either. Now the
/// committed attempt waits for the lease and runs once when it is back.
#[test]
fn a_fence_decided_while_the_lease_is_out_runs_once_when_it_is_back() {
    let fences = |s: &Sim| {
        s.sent
            .iter()
            .filter(|a| matches!(a, Action::Fence { host } if host == "hv1"))
            .count()
    };
    // The tick at which the fence agent runs with no leader lease checked.
    let mut probe = fenceable_hv1_with_an_ha_vm();
    probe.beat("hv1", 50);
    let mut t_fence = 100;
    while fences(&probe) == 0 {
        assert!(t_fence < 20_000, "{:#?}", probe.log());
        probe.beat("hv2", t_fence);
        probe.input(Input::Tick, t_fence);
        t_fence += 100;
    }
    let t_fence = t_fence - 100;
    // The same run under a leader lease that runs out just before that tick.
    let mut s = fenceable_hv1_with_an_ha_vm();
    s.engine = s.engine.clone().with_leader_lease();
    s.input(
        Input::LeaderLease {
            until_ms: Some(t_fence - 50),
        },
        40,
    );
    s.beat("hv1", 50);
    let mut t = 100;
    while t < t_fence + 1_000 {
        s.beat("hv2", t);
        s.input(Input::Tick, t);
        t += 100;
    }
    assert_eq!(fences(&s), 0, "fenced without the lease: {:#?}", s.log());
    assert_eq!(phase_of(&s, "hv1"), "fencing", "{:#?}", s.log());
    // Back in the same term: the committed attempt runs, once.
    s.input(
        Input::LeaderLease {
            until_ms: Some(u64::MAX),
        },
        t,
    );
    for _ in 0..5 {
        s.beat("hv2", t);
        s.input(Input::Tick, t);
        t += 100;
    }
    assert_eq!(fences(&s), 1, "{:#?}", s.log());
}
