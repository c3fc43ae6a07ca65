//! Issue 10: an agent speaks only for its own host (claims, definitions, hellos).

use super::*;

#[test]
fn a_claim_on_another_hosts_running_vm_is_one_conflict_and_never_a_move() {
    let mut s = two_hosts_u1_on_hv1();
    for t in 0..3 {
        s.inventory("hv2", vec![running("u1", Some(7))], 20 + t);
    }
    s.event("hv2", "u1", LifecycleKind::Started, Some(7), 30);
    let vm = &s.state.vms["u1"];
    assert_eq!(
        (vm.host.as_str(), vm.generation),
        ("hv1", 0),
        "{:?}",
        s.log()
    );
    assert_eq!(conflicts(&s), 1, "{:?}", s.log());
    // Even with the current generation: hv1 still runs it.
    s.inventory("hv2", vec![running("u1", Some(0))], 40);
    assert_eq!(s.state.vms["u1"].host, "hv1");
    assert_eq!(conflicts(&s), 1);
    // The episode ends when hv2 stops claiming; a new claim is a new episode. With the
    // committed generation it could be a live migration whose source listing is late: a
    // conflict once hv1 lists the VM again, still running.
    s.inventory("hv2", vec![], 50);
    s.inventory("hv2", vec![running("u1", Some(0))], 60);
    assert_eq!(conflicts(&s), 1, "{:?}", s.log());
    s.inventory("hv1", vec![running("u1", Some(0))], 62);
    s.inventory("hv2", vec![running("u1", Some(0))], 64);
    assert_eq!(conflicts(&s), 2, "{:?}", s.log());
    assert_eq!(s.state.vms["u1"].host, "hv1");
    // A shut-off copy defined on another host is normal and says nothing.
    s.inventory(
        "hv2",
        vec![domain(
            "u1",
            DomainState::Shutoff,
            StateReason::Destroyed,
            Some(0),
            false,
        )],
        70,
    );
    assert_eq!(conflicts(&s), 2);
    assert_eq!(s.phase("u1"), "running");
}

#[test]
fn a_live_migration_its_own_host_corroborates_still_moves_the_vm() {
    let mut s = two_hosts_u1_on_hv1();
    // hv1 no longer runs it (migrated away), then hv2 reports it with the same generation.
    s.inventory("hv1", vec![migrated_away("u1")], 20);
    s.inventory("hv2", vec![running("u1", Some(0))], 30);
    assert_eq!(s.state.vms["u1"].host, "hv2", "{:?}", s.log());
    assert_eq!(conflicts(&s), 0, "{:?}", s.log());
    // The destination's listing first: no conflict, and the move once the source's
    // listing lets go.
    let mut s = two_hosts_u1_on_hv1();
    s.inventory("hv2", vec![running("u1", Some(0))], 20);
    assert_eq!(s.state.vms["u1"].host, "hv1");
    s.inventory("hv1", vec![migrated_away("u1")], 30);
    s.inventory("hv2", vec![running("u1", Some(0))], 40);
    assert_eq!(s.state.vms["u1"].host, "hv2", "{:?}", s.log());
    assert_eq!(conflicts(&s), 0, "{:?}", s.log());
}

#[test]
fn a_definition_is_taken_only_from_the_vms_host_and_only_within_the_policy() {
    let mut s = two_hosts_u1_on_hv1();
    let good = "<domain type='kvm'><name>vm-u1</name></domain>";
    let hostile = "<domain xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'><name>vm-u1</name><qemu:commandline><qemu:arg value='-x'/></qemu:commandline></domain>";
    let def = |s: &mut Sim, host: &str, xml: &str, now| {
        s.input(
            Input::Definition(DefinitionReport {
                host: host.into(),
                uuid: "u1".into(),
                xml: xml.into(),
            }),
            now,
        )
    };
    def(&mut s, "hv1", good, 20);
    assert_eq!(s.state.vms["u1"].definition.as_deref(), Some(good));
    def(
        &mut s,
        "hv2",
        "<domain type='kvm'><name>other</name></domain>",
        30,
    );
    assert_eq!(s.state.vms["u1"].definition.as_deref(), Some(good));
    // The VM's own host, resending a hostile definition: refused once, the old kept.
    def(&mut s, "hv1", hostile, 40);
    def(&mut s, "hv1", hostile, 50);
    assert_eq!(s.state.vms["u1"].definition.as_deref(), Some(good));
    let refused: Vec<&str> = s
        .state
        .events
        .iter()
        .filter(|e| e.kind == EventKind::VmDefinitionRefused)
        .map(|e| e.message.as_str())
        .collect();
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert!(refused[0].contains("qemu:commandline"), "{}", refused[0]);
    assert!(
        refused[0].contains("stored definition is kept"),
        "{}",
        refused[0]
    );
}

#[test]
fn a_hello_never_moves_a_registered_host() {
    let mut s = Sim::new();
    s.connect("hv1", 0);
    s.input(
        Input::AgentConnected(Hello {
            host: "hv1".into(),
            zone: "elsewhere".into(),
            cluster: "c2".into(),
            agent_version: "2".into(),
            facts: HostFacts::default(),
            instance: 2,
            pools: vec![],
            addr: None,
        }),
        10,
    );
    let h = &s.state.hosts["hv1"];
    assert_eq!((h.zone.as_str(), h.cluster.as_str()), ("z", "c"));
    assert_eq!(h.agent_version, "2", "the agent version still updates");
    // A refused hello is recorded once per episode.
    for t in [20, 30] {
        s.input(
            Input::HostPlacementRefused {
                host: "hv1".into(),
                detail: "zone z vs elsewhere".into(),
            },
            t,
        );
    }
    assert_eq!(kinds(&s, |k| *k == EventKind::HostPlacementRefused), 1);
}
