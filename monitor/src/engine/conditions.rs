//! Investigating a silent host: peer probes and the condition (dead, isolated, agent down)
//! its evidence adds up to.

use super::*;

impl Engine {
    /// Asks up to three live peers of the same cluster whether `host`'s kernel answers.
    pub(super) fn probe(&mut self, host: &str, cluster: &str, cx: &mut Context<'_>) {
        // Learned from its connection; a new leader that has not seen it connect yet uses
        // the replicated address.
        let Some(ip) = self
            .evidence
            .addr_of(host)
            .or_else(|| cx.state.hosts.get(host).and_then(|h| h.addr))
        else {
            return;
        };
        self.evidence.address(host, ip);
        // This runs on every tick for every silent host: a probe under way asks nobody new,
        // and a new one asks the first PROBE_PEERS usable peers, so neither lists them all
        // (a pass over every host per silent host per tick saturated the monitor when
        // thousands of hosts were silent; BENCHMARKS.md, "Heartbeat load").
        if self.evidence.probing(host) {
            return;
        }
        let peers: Vec<String> = cx
            .state
            .hosts
            .iter()
            .filter(|(n, h)| *n != host && h.cluster == cluster && self.host_usable(n))
            .map(|(n, _)| n.clone())
            .take(investigation::PROBE_PEERS)
            .collect();
        for peer in self.evidence.start_probe(host, peers, cx.now_ms) {
            cx.out.push(Action::Send {
                host: peer,
                command: AgentCommand::ProbeHost {
                    host: host.to_string(),
                    addr: SocketAddr::new(ip, self.failover.probe_port),
                    timeout_ms: investigation::PROBE_TIMEOUT_MS,
                },
            });
        }
    }

    /// Records a change of a host's condition (a replicated event).
    pub(super) fn record_condition(
        &mut self,
        host: &str,
        condition: &Condition,
        wall_ms: u64,
        out: &mut Vec<Action>,
    ) {
        let before = self.fencing.conditions.get(host).map(Condition::name);
        if before == Some(condition.name()) || (before.is_none() && *condition == Condition::Alive)
        {
            return;
        }
        self.fencing
            .conditions
            .insert(host.to_string(), condition.clone());
        let (severity, message) = match condition {
            Condition::Alive => (Severity::Info, format!("host {host}: alive again")),
            Condition::Investigating => (
                Severity::Warning,
                format!("host {host}: silent; investigating (storage heartbeat, peers)"),
            ),
            other => (
                Severity::Critical,
                format!(
                    "host {host}: {}: {}",
                    other.name(),
                    condition_evidence(other)
                ),
            ),
        };
        record_event(
            out,
            wall_ms,
            severity,
            Some(host.to_string()),
            EventKind::HostCondition {
                condition: condition.name().to_string(),
            },
            message,
        );
    }
}

pub(super) fn condition_evidence(c: &Condition) -> &str {
    match c {
        Condition::Isolated { evidence }
        | Condition::AgentDown { evidence }
        | Condition::Dead { evidence, .. } => evidence,
        Condition::Alive => "heartbeats arrive",
        Condition::Investigating => "evidence still coming in",
    }
}
