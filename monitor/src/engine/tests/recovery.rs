//! VM crashes: restart in place, backoff, give-up, generations.

use super::*;

#[test]
fn crash_is_restarted_in_place_with_the_next_generation() {
    let mut s = sim_with_ha_vm();
    s.event("hv1", "u1", LifecycleKind::Crashed, Some(0), 100);
    assert_eq!(s.starts(), vec![("hv1".to_string(), "u1".to_string(), 1)]);
    assert_eq!(
        s.state.vms["u1"].generation, 1,
        "generation committed before the order"
    );
    assert_eq!(s.phase("u1"), "recovering");
    // The inventory that still shows the crashed copy (generation 0) changes nothing.
    s.inventory(
        "hv1",
        vec![domain(
            "u1",
            DomainState::Shutoff,
            StateReason::Failed,
            Some(0),
            true,
        )],
        120,
    );
    assert_eq!(s.starts().len(), 1);
    s.answer_start("hv1", "u1", 1, true, 900);
    assert_eq!(s.phase("u1"), "running");
    let rec = s.state.vms["u1"].last_recovery.clone().expect("recorded");
    assert_eq!(
        (rec.from_host.as_str(), rec.to_host.as_str(), rec.generation),
        ("hv1", "hv1", 1)
    );
    assert!(
        matches!(&rec.proof, Proof::AgentReportedStopped { host, .. } if host == "hv1"),
        "{rec:?}"
    );
    assert!(
        rec.proof
            .to_string()
            .contains("the agent of hv1 reported it stopped"),
        "{rec:?}"
    );
    let log = s.log();
    assert!(
        log.iter()
            .any(|m| m.contains("crashed on hv1 (generation 0)")
                && m.contains("restarting in place")),
        "{log:#?}"
    );
    assert!(
        log.iter()
            .any(|m| m.contains("ordered start of VM vm-u1 on hv1 with generation 1")),
        "{log:#?}"
    );
    assert!(
        log.iter()
            .any(|m| m.contains("running on hv1 with generation 1")),
        "{log:#?}"
    );
}

#[test]
fn guest_shutdown_and_operator_destroy_are_respected() {
    for kind in [LifecycleKind::GuestShutdown, LifecycleKind::Destroyed] {
        let mut s = sim_with_ha_vm();
        s.event("hv1", "u1", kind, Some(0), 100);
        assert_eq!(s.phase("u1"), "stopped");
        for t in (200..5_000).step_by(100) {
            s.input(Input::Tick, t);
        }
        assert!(s.starts().is_empty(), "{kind:?} must not be restarted");
        // Seen running again (an operator started it): protected again.
        s.inventory("hv1", vec![running("u1", Some(0))], 6_000);
        assert_eq!(s.phase("u1"), "running");
    }
}

#[test]
fn events_of_another_generation_or_host_are_not_proof() {
    let mut s = sim_with_ha_vm();
    s.event("hv1", "u1", LifecycleKind::Crashed, Some(7), 100);
    s.event("hv2", "u1", LifecycleKind::Crashed, Some(0), 100);
    assert!(s.starts().is_empty());
    assert_eq!(s.phase("u1"), "running");
}

#[test]
fn a_vm_that_crashes_on_every_start_backs_off_then_gives_up() {
    let mut s = sim_with_ha_vm();
    let mut now = 100;
    s.event("hv1", "u1", LifecycleKind::Crashed, Some(0), now);
    let mut times = vec![];
    for _ in 0..20 {
        let Some((_, _, g)) = s.starts().last().cloned() else {
            break;
        };
        if s.phase("u1") != "recovering" {
            break;
        }
        times.push(now);
        s.answer_start("hv1", "u1", g, true, now + 50);
        s.event("hv1", "u1", LifecycleKind::Crashed, Some(g), now + 100);
        // Let backoff timers run.
        for _ in 0..1000 {
            now += 100;
            s.live_tick(now);
            if s.phase("u1") != "backoff" {
                break;
            }
        }
    }
    let budget = RecoveryConfig::default().budget() as usize;
    assert_eq!(s.starts().len(), budget, "exactly the budget of restarts");
    assert_eq!(s.phase("u1"), "gave-up");
    s.assert_logged("giving up");
    // Gaps between attempts grow (backoff).
    let gaps: Vec<u64> = times.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(gaps.windows(2).all(|w| w[1] >= w[0]), "{gaps:?}");
    // And nothing more happens afterwards.
    for t in 0..100 {
        s.live_tick(now + 100 * t);
    }
    assert_eq!(s.starts().len(), budget);
}

#[test]
fn a_failed_start_is_retried_and_no_answer_is_not_a_failure() {
    let mut s = sim_with_ha_vm();
    s.event("hv1", "u1", LifecycleKind::Crashed, Some(0), 100);
    s.input(
        Input::CommandDone(CommandAnswer {
            host: "hv1".into(),
            command: AgentCommand::StartDomain {
                uuid: "u1".into(),
                generation: 1,
                definition: None,
            },
            result: Err(CommandError::Timeout(
                "hv1".into(),
                std::time::Duration::from_secs(60),
            )),
            seq: None,
        }),
        200,
    );
    assert_eq!(s.phase("u1"), "recovering", "no answer proves nothing");
    s.live_tick(300);
    assert_eq!(
        s.starts(),
        vec![
            ("hv1".into(), "u1".into(), 1),
            ("hv1".into(), "u1".into(), 1)
        ],
        "same order again"
    );
    s.answer_start("hv1", "u1", 1, false, 400);
    assert_eq!(s.phase("u1"), "backoff");
    for t in (500..3_000).step_by(100) {
        s.live_tick(t);
    }
    assert_eq!(
        s.starts().last(),
        Some(&("hv1".to_string(), "u1".to_string(), 2))
    );
}

#[test]
fn generations_are_announced_before_the_start_is_sent() {
    let mut s = sim_with_ha_vm();
    s.sent.clear();
    s.event("hv1", "u1", LifecycleKind::Crashed, Some(0), 100);
    let notify = s.sent.iter().position(|a| matches!(a, Action::Notify { host: None, message: MonitorToAgent::Generations { entries, .. } } if entries.contains(&("u1".to_string(), 1))));
    let start = s.sent.iter().position(|a| matches!(a, Action::Send { .. }));
    assert!(
        notify.is_some() && start.is_some() && notify < start,
        "{:#?}",
        s.sent
    );
}

#[test]
fn a_guest_panic_that_leaves_qemu_running_is_not_proof() {
    let mut s = sim_with_ha_vm();
    // VIR_DOMAIN_EVENT_CRASHED (8): the guest panicked, qemu may still be there.
    let panic = domain_event("u1", LifecycleKind::Crashed, (8, 0), 100);
    s.lifecycle("hv1", panic, Some(0), obs(), 100);
    // Nor is a "crashed" state with qemu preserved.
    s.inventory(
        "hv1",
        vec![domain(
            "u1",
            DomainState::Crashed,
            StateReason::Crashed,
            Some(0),
            true,
        )],
        150,
    );
    assert!(s.starts().is_empty());
    assert_eq!(s.phase("u1"), "running");
}
