//! The engine's unit tests: inputs in, actions and committed state out. Shared helpers (the
//! simulated agents in [`Sim`]) live here; the tests, by concern, in the files below.

use super::*;
use vigil_common::domain::VigilMeta;

mod claims;
mod recovery;
mod relocation;
mod sessions;

/// The next observation sequence number of the simulated agents (one counter for all:
/// increasing is all that matters).
fn obs() -> u64 {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    N.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1
}
fn cfg() -> DetectorConfig {
    DetectorConfig {
        heartbeat_interval_ms: 100,
        suspect_after_ms: 250,
        down_after_ms: 500,
    }
}
/// Drives the engine and applies its proposals, as Raft would.
struct Sim {
    engine: Engine,
    state: ClusterState,
    sent: Vec<Action>,
    /// Proposals not committed (yet): a leader whose writes do not reach a quorum.
    uncommitted: Option<Vec<StateCommand>>,
}
impl Sim {
    /// A leader of term 1.
    fn new() -> Self {
        let mut s = Sim::follower();
        s.input(Input::BecameLeader { term: 1, node: 1 }, 0);
        s
    }
    /// An engine that does not lead (yet).
    fn follower() -> Self {
        Sim {
            engine: Engine::new(cfg(), RecoveryConfig::default(), 0),
            state: ClusterState::default(),
            sent: Vec::new(),
            uncommitted: None,
        }
    }
    fn input(&mut self, input: Input, now: u64) {
        let mut queue = vec![input];
        while let Some(input) = queue.pop() {
            let mut applied = false;
            for a in self.engine.handle(input, now, 1_000_000 + now, &self.state) {
                match a {
                    Action::Propose(cmd) => match &mut self.uncommitted {
                        Some(held) => held.push(cmd),
                        None => {
                            self.state.apply(&cmd);
                            applied = true;
                        }
                    },
                    other => self.sent.push(other),
                }
            }
            if applied {
                queue.push(Input::Applied);
            }
        }
    }
    fn connect(&mut self, host: &str, now: u64) {
        self.input(
            Input::AgentConnected(Hello {
                host: host.into(),
                zone: "z".into(),
                cluster: "c".into(),
                agent_version: "1".into(),
                facts: HostFacts {
                    memory_available_bytes: 8 << 30,
                    ..HostFacts::default()
                },
                instance: 1,
                pools: vec![],
                addr: None,
            }),
            now,
        );
    }
    fn beat(&mut self, host: &str, now: u64) {
        self.input(
            Input::Heartbeat(Beat {
                host: host.into(),
                seq: 0,
                facts: HostFacts {
                    memory_available_bytes: 8 << 30,
                    ..HostFacts::default()
                },
                mono_ms: 0,
                pools: vec![],
                watchdog_ms: None,
            }),
            now,
        );
    }
    fn log(&self) -> Vec<String> {
        self.state
            .events
            .iter()
            .map(|e| e.message.clone())
            .collect()
    }

    /// Some event's message contains `text`.
    #[track_caller]
    fn assert_logged(&self, text: &str) {
        assert!(
            self.log().iter().any(|m| m.contains(text)),
            "no event says {text:?}: {:#?}",
            self.log()
        );
    }
}
fn domain(
    uuid: &str,
    state: DomainState,
    reason: StateReason,
    generation: Option<u64>,
    ha: bool,
) -> DomainInfo {
    DomainInfo {
        uuid: uuid.into(),
        name: format!("vm-{uuid}"),
        state,
        reason,
        vcpus: 1,
        memory_kib: 65536,
        disks: vec![],
        pools: None,
        meta: VigilMeta {
            ha: Some(ha),
            priority: None,
            generation,
        },
        persistent: true,
    }
}
/// A lifecycle event of `uuid` (`raw`: libvirt's event and detail codes) received at `at_ms`.
fn domain_event(uuid: &str, kind: LifecycleKind, raw: (i32, i32), at_ms: u64) -> DomainEvent {
    DomainEvent {
        uuid: uuid.into(),
        name: format!("vm-{uuid}"),
        kind,
        raw_event: raw.0,
        raw_detail: raw.1,
        at_ms,
    }
}
impl Sim {
    fn inventory(&mut self, host: &str, domains: Vec<DomainInfo>, now: u64) {
        self.input(
            Input::Inventory(Listing {
                host: host.into(),
                domains,
                health: HypervisorHealth::Healthy,
                seq: obs(),
            }),
            now,
        );
    }
    fn event(
        &mut self,
        host: &str,
        uuid: &str,
        kind: LifecycleKind,
        generation: Option<u64>,
        now: u64,
    ) {
        let event = domain_event(uuid, kind, (5, 5), now);
        self.lifecycle(host, event, generation, obs(), now);
    }
    /// `event` as `host`'s agent reports it (observation `seq`), delivered at `now`.
    fn lifecycle(
        &mut self,
        host: &str,
        event: DomainEvent,
        generation: Option<u64>,
        seq: u64,
        now: u64,
    ) {
        self.input(
            Input::DomainEvent(LifecycleReport {
                host: host.into(),
                event,
                generation,
                seq,
            }),
            now,
        );
    }
    /// Start orders sent so far, as (host, uuid, generation).
    fn starts(&self) -> Vec<(String, String, u64)> {
        self.sent
            .iter()
            .filter_map(|a| match a {
                Action::Send {
                    host,
                    command:
                        AgentCommand::StartDomain {
                            uuid, generation, ..
                        },
                } => Some((host.clone(), uuid.clone(), *generation)),
                _ => None,
            })
            .collect()
    }
    /// Whether every start order so far went to `host` (or none was sent).
    fn started_only_on(&self, host: &str) -> bool {
        self.starts().iter().all(|(h, _, _)| h == host)
    }
    fn answer_start(&mut self, host: &str, uuid: &str, generation: u64, ok: bool, now: u64) {
        self.input(
            Input::CommandDone(CommandAnswer {
                host: host.into(),
                command: AgentCommand::StartDomain {
                    uuid: uuid.into(),
                    generation,
                    definition: None,
                },
                result: Ok(if ok {
                    CommandOutcome::Done {
                        detail: "running".into(),
                    }
                } else {
                    CommandOutcome::Failed {
                        reason: "boom".into(),
                    }
                }),
                seq: Some(obs()),
            }),
            now,
        );
    }
    /// A tick with hv1 alive (it heartbeats).
    fn live_tick(&mut self, now: u64) {
        self.beat("hv1", now);
        self.input(Input::Tick, now);
    }
    fn phase(&self, uuid: &str) -> String {
        self.state
            .vms
            .get(uuid)
            .map(|v| v.phase.name().to_string())
            .unwrap_or_default()
    }
}
fn sim_with_ha_vm() -> Sim {
    let mut s = Sim::new();
    s.connect("hv1", 0);
    s.inventory("hv1", vec![running("u1", None)], 10);
    assert_eq!(s.phase("u1"), "running");
    s
}
fn running(uuid: &str, generation: Option<u64>) -> DomainInfo {
    let (state, reason) = (DomainState::Running, StateReason::Booted);
    domain(uuid, state, reason, generation, true)
}
fn shut_off(uuid: &str, generation: u64) -> DomainInfo {
    domain(
        uuid,
        DomainState::Shutoff,
        StateReason::Failed,
        Some(generation),
        true,
    )
}
/// hv1 runs HA VM u1, hv2 is empty; one restart in place, then relocation.
fn two_hosts_one_vm() -> Sim {
    let mut s = Sim::new();
    s.engine.policy.max_restarts_in_place = 1;
    s.connect("hv1", 0);
    s.connect("hv2", 0);
    s.inventory("hv2", vec![], 10);
    s.inventory("hv1", vec![running("u1", None)], 10);
    s
}
impl Sim {
    /// `host`'s agent ships the definition of `uuid` (a relocation needs it stored).
    fn store_definition(&mut self, host: &str, uuid: &str, now: u64) {
        self.input(
            Input::Definition(DefinitionReport {
                host: host.into(),
                uuid: uuid.into(),
                xml: "<domain/>".into(),
            }),
            now,
        );
    }

    /// Ticks every 100 ms over `range` with both hosts heartbeating.
    fn live_ticks_both(&mut self, range: std::ops::Range<u64>) {
        for t in range.step_by(100) {
            self.beat("hv2", t);
            self.live_tick(t);
        }
    }
}
fn kinds(s: &Sim, pred: impl Fn(&EventKind) -> bool) -> usize {
    s.state.events.iter().filter(|e| pred(&e.kind)).count()
}
fn conflicts(s: &Sim) -> usize {
    kinds(s, |k| matches!(k, EventKind::VmOwnershipConflict { .. }))
}
fn two_hosts_u1_on_hv1() -> Sim {
    let mut s = Sim::new();
    s.connect("hv1", 0);
    s.connect("hv2", 0);
    s.inventory("hv1", vec![running("u1", Some(0))], 10);
    assert_eq!(s.state.vms["u1"].host, "hv1");
    s
}
/// What the source of a live migration lists once the VM left it.
fn migrated_away(uuid: &str) -> DomainInfo {
    domain(
        uuid,
        DomainState::Shutoff,
        StateReason::Migrated,
        Some(0),
        true,
    )
}
