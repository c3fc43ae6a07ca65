//! Moving VMs off hosts, new leaders clearing slots, self-fence reports.

use super::*;

#[test]
fn never_relocates_while_the_old_host_may_still_run_it() {
    let mut s = two_hosts_one_vm();
    // Another host can only start it from its stored definition.
    s.store_definition("hv1", "u1", 20);
    s.event("hv1", "u1", LifecycleKind::Crashed, Some(0), 100);
    assert_eq!(s.starts(), vec![("hv1".to_string(), "u1".to_string(), 1)]);
    // The in-place start is refused because, as far as hv1 knows, it runs again.
    s.inventory("hv1", vec![running("u1", Some(0))], 150);
    s.answer_start("hv1", "u1", 1, false, 200);
    s.live_ticks_both(300..5_000);
    assert!(
        s.started_only_on("hv1"),
        "relocated without proof: {:?}",
        s.starts()
    );
    // Once hv1 reports it shut off, relocation to hv2 may proceed.
    s.inventory("hv1", vec![shut_off("u1", 1)], 5_000);
    s.answer_start("hv1", "u1", 2, false, 5_050);
    s.live_ticks_both(5_100..20_000);
    assert!(
        s.starts().iter().any(|(h, _, _)| h == "hv2"),
        "{:?} {:#?}",
        s.starts(),
        s.log()
    );
}

#[test]
fn a_relocation_without_a_stored_definition_waits_loudly() {
    let mut s = two_hosts_one_vm();
    s.event("hv1", "u1", LifecycleKind::Crashed, Some(0), 100);
    s.inventory("hv1", vec![shut_off("u1", 1)], 150);
    s.answer_start("hv1", "u1", 1, false, 200);
    s.live_ticks_both(300..10_000);
    assert!(s.started_only_on("hv1"), "{:?}", s.starts());
    s.assert_logged("its definition never reached the monitor");
}

#[test]
fn an_agent_connected_before_leadership_is_registered_when_it_comes() {
    let mut s = Sim::follower();
    s.connect("hv1", 0);
    assert!(s.state.hosts.is_empty(), "a follower registers nothing");
    s.input(Input::BecameLeader { term: 1, node: 1 }, 50);
    assert!(s.state.hosts.contains_key("hv1"), "{:#?}", s.log());
}

#[test]
fn a_new_leader_clears_the_slots_of_active_hosts() {
    let mut s = Sim::new();
    s.connect("hv1", 0);
    s.input(Input::LostLeadership, 20);
    s.sent.clear();
    s.input(Input::BecameLeader { term: 2, node: 1 }, 10_000);
    assert!(
        s.sent
            .iter()
            .any(|a| *a == Action::ClearFence { host: "hv1".into() }),
        "a request left by the previous leader must go: {:?}",
        s.sent
    );
}

#[test]
fn one_isolation_episode_records_one_self_fenced_event() {
    let mut s = Sim::new();
    s.connect("hv1", 0);
    // The agent resends its report on every reconnect until the monitor notes it.
    for t in 1..=5 {
        s.input(
            Input::SelfFenced(SelfFenceReport {
                host: "hv1".into(),
                id: 9,
                reason: "lease expired and no storage pool is reachable".into(),
                destroyed: vec![],
            }),
            t * 100,
        );
    }
    assert_eq!(self_fenced_events(&s), 1, "{:#?}", s.log());
    // Every delivery is answered, so the agent stops resending.
    let noted = s
        .sent
        .iter()
        .filter(|a| {
            **a == Action::Notify {
                host: Some("hv1".into()),
                message: MonitorToAgent::SelfFenceNoted { id: 9 },
            }
        })
        .count();
    assert_eq!(noted, 5, "{:?}", s.sent);
}

/// How many "fenced itself" events the replicated log holds.
fn self_fenced_events(s: &Sim) -> usize {
    s.log()
        .iter()
        .filter(|m| m.contains("fenced itself"))
        .count()
}

/// Issue 9 item 12 (a gap a review found): the agent resends its report until noted, also
/// to a new leader whose in-memory notes are empty. The episode is in the replicated log, so
/// the new leader records nothing more, and still answers so that the agent stops.
#[test]
fn a_self_fence_report_resent_to_a_new_leader_is_still_one_event() {
    let report = || {
        Input::SelfFenced(SelfFenceReport {
            host: "hv1".into(),
            id: 9,
            reason: "lease expired and no storage pool is reachable".into(),
            destroyed: vec![],
        })
    };
    let mut s = Sim::new();
    s.connect("hv1", 0);
    s.input(report(), 100);
    // Another monitor takes over with the same committed state and nothing in memory.
    s.engine = Engine::new(cfg(), RecoveryConfig::default(), 200);
    s.input(Input::BecameLeader { term: 2, node: 2 }, 200);
    s.connect("hv1", 300);
    s.input(report(), 400);
    assert_eq!(self_fenced_events(&s), 1, "{:#?}", s.log());
    assert!(
        s.sent
            .iter()
            .filter(|a| matches!(
                a,
                Action::Notify {
                    message: MonitorToAgent::SelfFenceNoted { id: 9 },
                    ..
                }
            ))
            .count()
            >= 2
    );
}

// ---- Issue 10: a host speaks only for itself ----
