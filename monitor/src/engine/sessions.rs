//! Agent sessions: hellos, heartbeats (and the lease grants they earn), disconnects, and the
//! liveness transitions they cause.

use super::*;

/// An incompatible agent's last attempt counts as a sign of life for this long (agents retry
/// every few seconds at most).
pub const INCOMPATIBLE_ALIVE_MS: u64 = 30_000;

impl Engine {
    /// An agent completed its handshake: register the host, end any fencing episode, send it the generation table.
    pub(super) fn on_agent_connected(&mut self, hello: Hello, cx: &mut Context<'_>) {
        let Hello {
            host,
            zone,
            cluster,
            agent_version,
            facts,
            instance,
            pools,
            addr,
        } = hello;
        if self.instances.insert(host.clone(), instance) != Some(instance) {
            // A new agent process counts its observations afresh.
            self.observed.retain(|(h, _), _| *h != host);
            self.seen_running.retain(|(h, _), _| *h != host);
            if let Some(inv) = self.inventory.get_mut(&host) {
                inv.seq = 0;
            }
        }
        self.host_pools.insert(host.clone(), pools);
        if let Some(ip) = addr {
            self.evidence.address(&host, ip);
        }
        self.evidence.beat(&host, instance, 0, cx.now_ms);
        let not_active = cx
            .state
            .hosts
            .get(&host)
            .is_some_and(|h| h.phase != HostPhase::Active);
        let own_fence = self.fencing.in_flight.contains(&host);
        let rejoin = self.may_rejoin(&host, cx.now_ms);
        if rejoin {
            if not_active || self.fencing.slot_requests.contains_key(&host) {
                self.end_fencing_episode(&host, &mut cx.out);
            }
            self.forget_fencing(&host);
        } else {
            record_event(
                &mut cx.out,
                cx.wall_ms,
                Severity::Warning,
                Some(host.clone()),
                EventKind::HostHeardWhileFenced,
                if own_fence {
                    format!("host {host} is heard again while its fence agent runs: the fence cannot be called back; the host rejoins if it fails, its HA VMs start elsewhere if it succeeds")
                } else {
                    format!("host {host} is heard again while it is being fenced, and a fence agent that a previous leader started may still run against it: it rejoins once that agent's time limit has passed, unless it is powered off first (its HA VMs then start elsewhere)")
                },
            );
        }
        self.identity.placement_refused.remove(&host);
        let hello = HelloClaims {
            zone,
            cluster,
            agent_version,
        };
        self.register_host(&host, &hello, cx);
        self.hellos.insert(host.clone(), hello);
        if not_active && rejoin {
            cx.out.push(Action::Propose(StateCommand::HostRejoined {
                at_ms: cx.wall_ms,
                host: host.clone(),
            }));
        }
        self.connected.insert(host.clone());
        self.awaiting_reconnect.remove(&host);
        self.fenced_before_election.remove(&host);
        self.facts.insert(host.clone(), facts);
        if let Some(t) = self.detector.heartbeat(&host, cx.now_ms) {
            self.transition_event(t, cx.wall_ms, &mut cx.out);
        }
        // A fresh session: it needs the whole generation table, and any start order
        // for this host that was in flight must be sent again.
        cx.out.push(Action::Notify {
            host: Some(host.clone()),
            message: generation_table(cx.state),
        });
        self.recovery
            .dispatched
            .retain(|uuid, _| cx.state.vms.get(uuid).is_none_or(|v| v.host != host));
    }

    /// An agent that cannot be managed (another protocol version) is alive: say so once.
    pub(super) fn on_agent_incompatible(
        &mut self,
        host: String,
        detail: String,
        cx: &mut Context<'_>,
    ) {
        let known = self
            .incompatible
            .get(&host)
            .is_some_and(|t| cx.now_ms.saturating_sub(*t) < INCOMPATIBLE_ALIVE_MS);
        self.incompatible.insert(host.clone(), cx.now_ms);
        if !known && self.leader {
            record_event(&mut cx.out, cx.wall_ms, Severity::Critical, Some(host.clone()), EventKind::HostIncompatible, format!(
                    "host {host}'s agent cannot be managed: {detail}. The host is alive, so it is not fenced and its guests keep running, unprotected, until its agent and the monitors run compatible versions"
                ));
        }
    }

    /// A session ended: not evidence of death by itself (the detector decides on silence).
    pub(super) fn on_agent_disconnected(&mut self, host: String, state: &ClusterState) {
        // Not evidence of death by itself: the detector decides on silence alone.
        self.connected.remove(&host);
        self.hellos.remove(&host);
        self.recovery
            .dispatched
            .retain(|uuid, _| state.vms.get(uuid).is_none_or(|v| v.host != host));
    }

    /// A heartbeat: facts, evidence, pool states, liveness, and a lease grant while leading.
    pub(super) fn on_heartbeat(&mut self, beat: Beat, cx: &mut Context<'_>) {
        let Beat {
            host,
            seq,
            facts,
            mono_ms,
            pools,
            watchdog_ms,
        } = beat;
        self.leases.watchdog(&host, watchdog_ms);
        // In place when known: a new key would cost a String on every heartbeat.
        match self.facts.get_mut(&host) {
            Some(f) => *f = facts,
            None => {
                self.facts.insert(host.clone(), facts);
            }
        }
        let instance = self.instances.get(&host).copied().unwrap_or(0);
        self.evidence.beat(&host, instance, mono_ms, cx.now_ms);
        for p in pools {
            let key = (host.clone(), p.name.clone());
            if self.pool_status.get(&key) != Some(&p) {
                if self.logged_pools.get(&key) != Some(&p.ok) {
                    self.logged_pools.insert(key.clone(), p.ok);
                    record_event(
                        &mut cx.out,
                        cx.wall_ms,
                        if p.ok {
                            Severity::Info
                        } else {
                            Severity::Warning
                        },
                        Some(host.clone()),
                        EventKind::PoolState {
                            pool: p.name.clone(),
                            ok: p.ok,
                        },
                        if p.ok {
                            format!("storage pool {} is up on {host}", p.name)
                        } else {
                            format!("storage pool {} is down on {host}: {}", p.name, p.detail)
                        },
                    );
                }
                if p.ok {
                    self.pool_down_since.remove(&key);
                } else {
                    self.pool_down_since.entry(key.clone()).or_insert(cx.now_ms);
                }
                self.pool_status.insert(key, p);
            }
        }
        self.fenced_before_election.remove(&host);
        if let Some(t) = self.detector.heartbeat(&host, cx.now_ms) {
            self.transition_event(t, cx.wall_ms, &mut cx.out);
        }
        // A host fenced through its storage slot or its lease keeps running, and its
        // session may outlive a short partition: heard again, it rejoins here (a new
        // session rejoins on connect).
        if self.not_active.contains(&host)
            && self.connected.contains(&host)
            && !self.rejoining.contains(&host)
            && self.may_rejoin(&host, cx.now_ms)
        {
            self.rejoining.insert(host.clone());
            cx.out.push(Action::Propose(StateCommand::HostRejoined {
                at_ms: cx.wall_ms,
                host: host.clone(),
            }));
            self.end_fencing_episode(&host, &mut cx.out);
            self.forget_fencing(&host);
        }
        // Only a leader grants leases (followers' output is dropped below), and only
        // while it holds its leader lease. A grant withheld is not recorded: the lease book
        // counts from the grants that went out.
        if self.leader && self.lease_holds(cx.now_ms) {
            self.leases.grant(&host, cx.now_ms);
            cx.out.push(Action::Notify {
                host: Some(host),
                message: MonitorToAgent::LeaseGrant {
                    seq,
                    lease_ms: self.leases.config().duration_ms,
                },
            });
        }
    }

    /// Registers the host (or updates its record) with what its agent's hello claims: zone and
    /// cluster are pinned in the host record (issue 10 item 3), so a hello never moves a
    /// registered host, only `vigilctl host place` does; then its pools and address.
    pub(super) fn register_host(&self, host: &str, hello: &HelloClaims, cx: &mut Context<'_>) {
        let known = cx.state.hosts.get(host);
        let (zone, cluster) =
            claims::pinned_placement(known, hello.zone.clone(), hello.cluster.clone());
        let changed = known.is_none_or(|h| {
            h.zone != zone || h.cluster != cluster || h.agent_version != hello.agent_version
        });
        if changed {
            cx.out.push(Action::Propose(StateCommand::RegisterHost {
                at_ms: cx.wall_ms,
                name: host.to_string(),
                zone,
                cluster,
                agent_version: hello.agent_version.clone(),
            }));
        }
        if let Some(cmd) = self.host_info_update(host, cx.wall_ms, cx.state) {
            cx.out.push(Action::Propose(cmd));
        }
    }

    /// The host's pools and address, as its agent's connection showed them, when the
    /// replicated record differs: replicated so that a new leader knows which hosts have
    /// storage (and so which proofs can exist) and where peers can check them, before their
    /// agents reconnect.
    pub(super) fn host_info_update(
        &self,
        host: &str,
        wall_ms: u64,
        state: &ClusterState,
    ) -> Option<StateCommand> {
        let pools = self.host_pools.get(host).cloned().unwrap_or_default();
        let addr = self.evidence.addr_of(host);
        state
            .hosts
            .get(host)
            .is_none_or(|h| h.pools != pools || (addr.is_some() && h.addr != addr))
            .then(|| StateCommand::SetHostInfo {
                at_ms: wall_ms,
                host: host.to_string(),
                pools,
                addr,
            })
    }

    pub(super) fn transition_event(&mut self, t: Transition, wall_ms: u64, out: &mut Vec<Action>) {
        if t.to != Liveness::Unknown {
            let to = t.to.to_string();
            if self.logged_liveness.get(&t.host) == Some(&to) {
                return;
            }
            self.logged_liveness.insert(t.host.clone(), to);
        }
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
        record_event(
            out,
            wall_ms,
            severity,
            Some(t.host.clone()),
            EventKind::HostLiveness {
                from: t.from.to_string(),
                to: t.to.to_string(),
            },
            message,
        );
    }

    /// The host's agent tried to connect with an incompatible protocol recently.
    pub(super) fn incompatible_alive(&self, host: &str, now_ms: u64) -> bool {
        self.incompatible
            .get(host)
            .is_some_and(|t| now_ms.saturating_sub(*t) < INCOMPATIBLE_ALIVE_MS)
    }
}

/// What an agent's hello claims about its host, kept while it is connected so that a monitor
/// that becomes leader later still registers the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct HelloClaims {
    pub(super) zone: String,
    pub(super) cluster: String,
    pub(super) agent_version: String,
}
