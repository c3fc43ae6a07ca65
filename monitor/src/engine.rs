//! The monitor's decision core: inputs in, actions out, no I/O.
//!
//! The edges (QUIC sessions, Raft, timers) turn what happens into [`Input`]s; [`Engine::handle`]
//! decides, reading the replicated [`ClusterState`], and returns [`Action`]s for the edges to
//! carry out. Everything that changes durable state leaves as [`Action::Propose`] and only
//! takes effect once Raft has committed it, so the engine's decisions are replayable and
//! testable without sockets (see the tests below and `tests/` for driving it in simulation).

use std::collections::{BTreeMap, BTreeSet};

use vigil_common::config::DetectorConfig;
use vigil_common::wire::HostFacts;

use crate::detector::{FailureDetector, Liveness, LivenessView, Transition};
use crate::state::{ClusterState, EventKind, Severity, StateCommand};

/// Something that happened, as seen by the edges.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// An agent completed the handshake. Its identity comes from its certificate.
    AgentConnected {
        host: String,
        zone: String,
        cluster: String,
        agent_version: String,
        facts: HostFacts,
    },
    AgentDisconnected {
        host: String,
    },
    Heartbeat {
        host: String,
        seq: u64,
        facts: HostFacts,
    },
    /// Time passed (the edge ticks several times per heartbeat interval).
    Tick,
    /// This monitor became the Raft leader.
    BecameLeader {
        term: u64,
        node: u64,
    },
    /// This monitor is no longer the leader.
    LostLeadership,
}

/// What the edges must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Replicate this command through Raft.
    Propose(StateCommand),
}

/// Leader-local soft state plus the decision logic.
#[derive(Debug, Clone)]
pub struct Engine {
    detector: FailureDetector,
    facts: BTreeMap<String, HostFacts>,
    connected: BTreeSet<String>,
    leader: bool,
}

impl Engine {
    pub fn new(cfg: DetectorConfig, now_ms: u64) -> Self {
        Engine {
            detector: FailureDetector::new(cfg, now_ms),
            facts: BTreeMap::new(),
            connected: BTreeSet::new(),
            leader: false,
        }
    }

    pub fn is_leader(&self) -> bool {
        self.leader
    }

    /// Decides what to do about `input`. `now_ms` is monotonic time, `wall_ms` Unix time
    /// (stamped into proposals so that applying them is deterministic).
    pub fn handle(
        &mut self,
        input: Input,
        now_ms: u64,
        wall_ms: u64,
        state: &ClusterState,
    ) -> Vec<Action> {
        let mut out = Vec::new();
        match input {
            Input::AgentConnected {
                host,
                zone,
                cluster,
                agent_version,
                facts,
            } => {
                let known = state.hosts.get(&host);
                let changed = known.is_none_or(|h| {
                    h.zone != zone || h.cluster != cluster || h.agent_version != agent_version
                });
                if changed {
                    out.push(Action::Propose(StateCommand::RegisterHost {
                        at_ms: wall_ms,
                        name: host.clone(),
                        zone,
                        cluster,
                        agent_version,
                    }));
                }
                self.connected.insert(host.clone());
                self.facts.insert(host.clone(), facts);
                if let Some(t) = self.detector.heartbeat(&host, now_ms) {
                    self.transition_event(t, wall_ms, &mut out);
                }
            }
            Input::AgentDisconnected { host } => {
                // Not evidence of death by itself: the detector decides on silence alone.
                self.connected.remove(&host);
            }
            Input::Heartbeat { host, facts, .. } => {
                self.facts.insert(host.clone(), facts);
                if let Some(t) = self.detector.heartbeat(&host, now_ms) {
                    self.transition_event(t, wall_ms, &mut out);
                }
            }
            Input::Tick => {
                for name in state.hosts.keys() {
                    self.detector.track(name);
                }
                for t in self.detector.tick(now_ms) {
                    self.transition_event(t, wall_ms, &mut out);
                }
            }
            Input::BecameLeader { term, node } => {
                self.leader = true;
                // A new leader knows nothing fresh: every host gets the full grace period
                // from now, and agents reconnecting will bring it up to date.
                let cfg = self.detector.config().clone();
                self.detector = FailureDetector::new(cfg, now_ms);
                for name in state.hosts.keys() {
                    self.detector.track(name);
                }
                for name in self.connected.clone() {
                    self.detector.heartbeat(&name, now_ms);
                }
                out.push(Action::Propose(StateCommand::RecordEvent {
                    at_ms: wall_ms,
                    severity: Severity::Info,
                    host: None,
                    kind: EventKind::LeaderElected { term, node },
                    message: format!("monitor node {node} became leader in term {term}"),
                }));
            }
            Input::LostLeadership => {
                self.leader = false;
            }
        }
        if !self.leader {
            // Only the leader records or acts; followers keep soft state for a fast takeover.
            out.retain(|a| !matches!(a, Action::Propose(_)));
        }
        out
    }

    fn transition_event(&self, t: Transition, wall_ms: u64, out: &mut Vec<Action>) {
        let (severity, message) = match t.to {
            Liveness::Up => (
                Severity::Info,
                format!("host {} is up (was {})", t.host, t.from),
            ),
            Liveness::Suspect => (
                Severity::Warning,
                format!(
                    "host {} is suspect: no heartbeat for {} ms",
                    t.host, t.silent_ms
                ),
            ),
            Liveness::Down => (
                Severity::Critical,
                format!(
                    "host {} is down: no heartbeat for {} ms",
                    t.host, t.silent_ms
                ),
            ),
            Liveness::Unknown => return,
        };
        out.push(Action::Propose(StateCommand::RecordEvent {
            at_ms: wall_ms,
            severity,
            host: Some(t.host.clone()),
            kind: EventKind::HostLiveness {
                from: t.from.to_string(),
                to: t.to.to_string(),
            },
            message,
        }));
    }

    pub fn liveness(&self, host: &str, now_ms: u64) -> Option<LivenessView> {
        self.detector.view(host, now_ms)
    }

    pub fn facts(&self, host: &str) -> Option<&HostFacts> {
        self.facts.get(host)
    }

    pub fn is_connected(&self, host: &str) -> bool {
        self.connected.contains(host)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    }

    impl Sim {
        fn new() -> Self {
            let mut s = Sim {
                engine: Engine::new(cfg(), 0),
                state: ClusterState::default(),
            };
            s.input(Input::BecameLeader { term: 1, node: 1 }, 0);
            s
        }
        fn input(&mut self, input: Input, now: u64) {
            for a in self.engine.handle(input, now, 1_000_000 + now, &self.state) {
                let Action::Propose(cmd) = a;
                self.state.apply(&cmd);
            }
        }
        fn connect(&mut self, host: &str, now: u64) {
            self.input(
                Input::AgentConnected {
                    host: host.into(),
                    zone: "z".into(),
                    cluster: "c".into(),
                    agent_version: "1".into(),
                    facts: HostFacts::default(),
                },
                now,
            );
        }
        fn beat(&mut self, host: &str, now: u64) {
            self.input(
                Input::Heartbeat {
                    host: host.into(),
                    seq: 0,
                    facts: HostFacts::default(),
                },
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
                "host hv1 is down: no heartbeat for 550 ms",
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
        let mut e = Engine::new(cfg(), 0);
        let state = ClusterState::default();
        let actions = e.handle(
            Input::AgentConnected {
                host: "hv1".into(),
                zone: "z".into(),
                cluster: "c".into(),
                agent_version: "1".into(),
                facts: HostFacts::default(),
            },
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
        assert_eq!(
            s.state.events.len(),
            n,
            "nobody condemned inside the grace period"
        );
        s.beat("hv1", 10_450);
        s.input(Input::Tick, 10_501);
        assert_eq!(
            s.log().last().map(String::as_str),
            Some("host hv2 is down: no heartbeat for 501 ms")
        );
    }
}
