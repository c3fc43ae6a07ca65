//! Investigation: what a silent host's silence means.
//!
//! Pure and leader-local (times in the engine's monotonic ms). When heartbeats stop, the
//! detector says *Suspect* then *Down*; this module gathers the other evidence and names the
//! host's [`Condition`]:
//!
//! - **storage**: the host's storage heartbeat on shared pools. A heartbeat of the same agent
//!   process written well after its last network heartbeat (compared on the *agent's* clock,
//!   never across machines), or one of a newer agent process seen to change after the host
//!   went silent, proves the host alive: it is **isolated**, not dead (vSphere's datastore
//!   heartbeating, CloudStack's NFS heartbeat);
//! - **peers**: agents of the same cluster are asked whether the host's kernel answers at its
//!   address. If it does while storage shows nothing, the host lives but its agent does not
//!   (killed, hung): **agent down**; the guests may still run;
//! - neither: **dead**.
//!
//! Fencing follows the condition (see [`crate::engine`]): a dead host is power-fenced at
//! once; an isolated one is asked to fence itself through its storage slot and otherwise
//! waits for its lease; a host whose agent is down is given one lease to come back (systemd
//! restarts agents) before it is power-fenced.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use vigil_common::storage::StorageHeartbeat;

/// How long peers get to answer a probe.
pub const PROBE_TIMEOUT_MS: u64 = 500;
/// How many peers are asked.
pub const PROBE_PEERS: usize = 3;

/// What the leader concludes about a host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "condition")]
pub enum Condition {
    /// Heartbeats arrive.
    Alive,
    /// Silent, evidence still coming in.
    Investigating,
    /// Cut from the monitors, alive on storage.
    Isolated { evidence: String },
    /// Its kernel answers peers, but neither its agent nor its storage heartbeat does.
    AgentDown { evidence: String },
    /// No sign of life anywhere. `confirmed`: peers were asked and none reaches it; without
    /// that (no peer, no known address) an agent that died on a live host looks the same. For
    /// fencing it makes no difference since the host watchdog (issue 9): lease expiry proves
    /// the host off only where an armed watchdog backs it, and that resets a live host whose
    /// agent died just as it does a cut-off one. Kept for the operator (events, `host show`).
    Dead { evidence: String, confirmed: bool },
}

impl Condition {
    pub fn name(&self) -> &'static str {
        match self {
            Condition::Alive => "alive",
            Condition::Investigating => "investigating",
            Condition::Isolated { .. } => "isolated",
            Condition::AgentDown { .. } => "agent-down",
            Condition::Dead { .. } => "dead",
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Beat {
    instance: u64,
    agent_mono_ms: u64,
    at_ms: u64,
}

#[derive(Debug, Clone)]
struct StorageSeen {
    hb: StorageHeartbeat,
    changed_at_ms: u64,
}

#[derive(Debug, Clone, Default)]
struct Probe {
    started_ms: u64,
    asked: BTreeSet<String>,
    /// Peer → reachable.
    answers: BTreeMap<String, bool>,
}

/// Evidence about every host.
#[derive(Debug, Clone)]
pub struct Evidence {
    /// A storage heartbeat written this long (agent clock) after the agent's last network
    /// heartbeat proves the host alive after it went silent: two heartbeat intervals (a
    /// storage write that was in flight when a host died lands at most one interval after
    /// its last network beat).
    alive_margin_ms: u64,
    /// How often agents write storage heartbeats and the leader reads them.
    storage_interval_ms: u64,
    beats: BTreeMap<String, Beat>,
    /// (host, pool) → the latest storage heartbeat and when it last changed.
    storage: BTreeMap<(String, String), StorageSeen>,
    addrs: BTreeMap<String, IpAddr>,
    probes: BTreeMap<String, Probe>,
    /// Hosts seen alive on storage during their current silence.
    seen_isolated: BTreeSet<String>,
}

impl Default for Evidence {
    fn default() -> Self {
        Evidence::new(200, 500)
    }
}

impl Evidence {
    /// The agents' heartbeat interval is the cluster's (its committed settings), which may
    /// differ from this monitor's file.
    pub fn set_heartbeat_interval(&mut self, heartbeat_interval_ms: u64) {
        self.alive_margin_ms = heartbeat_interval_ms * 2;
    }

    pub fn new(heartbeat_interval_ms: u64, storage_interval_ms: u64) -> Self {
        Evidence {
            alive_margin_ms: heartbeat_interval_ms * 2,
            storage_interval_ms,
            beats: BTreeMap::new(),
            storage: BTreeMap::new(),
            addrs: BTreeMap::new(),
            probes: BTreeMap::new(),
            seen_isolated: BTreeSet::new(),
        }
    }

    /// How long after its last network beat a host with storage pools must stay silent
    /// before it can be called dead: long enough for an isolated host's storage heartbeat
    /// to be written and read.
    pub fn storage_wait_ms(&self) -> u64 {
        self.alive_margin_ms + 2 * self.storage_interval_ms
    }

    /// A network heartbeat (or a hello) from `host`'s agent `instance`.
    pub fn beat(&mut self, host: &str, instance: u64, agent_mono_ms: u64, now_ms: u64) {
        let beat = Beat {
            instance,
            agent_mono_ms,
            at_ms: now_ms,
        };
        // In place when known: this runs on every heartbeat, and a new key costs a String.
        match self.beats.get_mut(host) {
            Some(b) => *b = beat,
            None => {
                self.beats.insert(host.to_string(), beat);
            }
        }
        self.probes.remove(host);
        self.seen_isolated.remove(host);
    }

    /// The address the host's agent connects from (peers probe it).
    pub fn address(&mut self, host: &str, ip: IpAddr) {
        // In place when known: the engine sets it on every tick for every silent host.
        match self.addrs.get_mut(host) {
            Some(a) => *a = ip,
            None => {
                self.addrs.insert(host.to_string(), ip);
            }
        }
    }

    pub fn addr_of(&self, host: &str) -> Option<IpAddr> {
        self.addrs.get(host).copied()
    }

    /// A storage heartbeat read from `pool`.
    pub fn storage_beat(&mut self, pool: &str, hb: StorageHeartbeat, now_ms: u64) {
        let key = (hb.host.clone(), pool.to_string());
        match self.storage.get_mut(&key) {
            Some(seen) if seen.hb == hb => {}
            Some(seen) => {
                seen.hb = hb;
                seen.changed_at_ms = now_ms;
            }
            None => {
                self.storage.insert(
                    key,
                    StorageSeen {
                        hb,
                        // First sight: we cannot tell when it was written.
                        changed_at_ms: 0,
                    },
                );
            }
        }
    }

    /// Starts probing `host` through `peers` (returns the peers to ask now; empty if a probe
    /// is already running or there is no address).
    pub fn start_probe(&mut self, host: &str, peers: Vec<String>, now_ms: u64) -> Vec<String> {
        if self.probes.contains_key(host) || !self.addrs.contains_key(host) {
            return Vec::new();
        }
        let asked: Vec<String> = peers.into_iter().take(PROBE_PEERS).collect();
        self.probes.insert(
            host.to_string(),
            Probe {
                started_ms: now_ms,
                asked: asked.iter().cloned().collect(),
                answers: BTreeMap::new(),
            },
        );
        asked
    }

    /// Whether a probe of `host` is under way (started and not ended by a beat since).
    pub fn probing(&self, host: &str) -> bool {
        self.probes.contains_key(host)
    }

    /// A peer's answer about `host`.
    pub fn probe_answer(&mut self, host: &str, peer: &str, reachable: bool) {
        if let Some(p) = self.probes.get_mut(host) {
            if p.asked.contains(peer) {
                p.answers.insert(peer.to_string(), reachable);
            }
        }
    }

    /// Whether the host's agent says on storage, in a heartbeat that is still advancing, that
    /// it has fenced itself (every HA domain destroyed).
    pub fn storage_fenced(&self, host: &str, now_ms: u64) -> Option<String> {
        let recent = self.storage_wait_ms();
        self.storage
            .iter()
            .filter(|((h, _), s)| {
                h == host && s.hb.fenced && now_ms.saturating_sub(s.changed_at_ms) <= recent
            })
            .map(|((_, pool), s)| {
                format!(
                    "its agent (instance {}) says on pool {pool} that it has destroyed its HA domains",
                    s.hb.instance
                )
            })
            .next()
    }

    /// Evidence that the host lives on storage after it went silent.
    fn storage_alive(&self, host: &str, now_ms: u64) -> Option<String> {
        let beat = self.beats.get(host);
        let recent = self.storage_wait_ms();
        self.storage
            .iter()
            .filter(|((h, _), _)| h == host)
            .find_map(|((_, pool), seen)| {
                let alive = match beat {
                    Some(b) if b.instance == seen.hb.instance => {
                        seen.hb.agent_mono_ms > b.agent_mono_ms + self.alive_margin_ms
                    }
                    // A different agent process: alive if its heartbeat changes after the
                    // host went silent.
                    Some(b) => seen.changed_at_ms > b.at_ms,
                    None => seen.changed_at_ms > 0,
                } && now_ms.saturating_sub(seen.changed_at_ms) <= recent;
                alive.then(|| {
                    format!(
                        "storage heartbeat on pool {pool} still advancing (seq {})",
                        seen.hb.seq
                    )
                })
            })
    }

    /// The host's condition, given the detector's verdict (`down`: silent past the limit) and
    /// whether it mounts storage pools (then "dead" waits until its storage heartbeat would
    /// have shown it alive).
    pub fn condition(
        &mut self,
        host: &str,
        silent: bool,
        down: bool,
        has_pools: bool,
        now_ms: u64,
    ) -> Condition {
        if !silent {
            return Condition::Alive;
        }
        if let Some(e) = self.storage_alive(host, now_ms) {
            self.seen_isolated.insert(host.to_string());
            return Condition::Isolated { evidence: e };
        }
        if self.seen_isolated.contains(host) {
            // Alive on storage a moment ago, silent everywhere now: it may have died, but
            // its agent may just as well have died with its guests still running, and a dead
            // agent fences nothing. Only power fencing proves anything now.
            return Condition::Dead {
                evidence: "its storage heartbeat stopped after it was seen isolated: the host or only its agent died".to_string(),
                confirmed: false,
            };
        }
        let probe = self.probes.get(host);
        if let Some(p) = probe {
            if let Some((peer, _)) = p.answers.iter().find(|(_, r)| **r) {
                return Condition::AgentDown {
                    evidence: format!(
                        "peer {peer} reaches it, but neither its agent nor its storage heartbeat answers"
                    ),
                };
            }
        }
        let storage_pending = has_pools
            && self
                .beats
                .get(host)
                .is_some_and(|b| now_ms.saturating_sub(b.at_ms) < self.storage_wait_ms());
        if !down || storage_pending {
            return Condition::Investigating;
        }
        let (evidence, confirmed) = match probe {
            Some(p) if p.asked.is_empty() => {
                ("no storage heartbeat and no peer to ask".to_string(), false)
            }
            Some(p) if p.answers.len() == p.asked.len() => (
                format!(
                    "no storage heartbeat, and no peer reaches it ({} asked)",
                    p.asked.len()
                ),
                true,
            ),
            Some(p) if now_ms.saturating_sub(p.started_ms) >= PROBE_TIMEOUT_MS * 2 => (
                format!(
                    "no storage heartbeat; {} of {} peers answered, none reaches it",
                    p.answers.len(),
                    p.asked.len()
                ),
                !p.answers.is_empty(),
            ),
            Some(_) => return Condition::Investigating,
            None => (
                "no storage heartbeat; its address is unknown, so no peer could check it"
                    .to_string(),
                false,
            ),
        };
        Condition::Dead {
            evidence,
            confirmed,
        }
    }

    /// Forgets a host (removed).
    pub fn forget(&mut self, host: &str) {
        self.beats.remove(host);
        self.addrs.remove(host);
        self.probes.remove(host);
        self.seen_isolated.remove(host);
        self.storage.retain(|(h, _), _| h != host);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hb(instance: u64, mono: u64, seq: u64) -> StorageHeartbeat {
        StorageHeartbeat {
            host: "hv1".into(),
            instance,
            agent_mono_ms: mono,
            seq,
            wall_ms: 0,
            fenced: false,
        }
    }

    #[test]
    fn a_crashed_host_is_dead_even_with_a_recent_storage_heartbeat() {
        let mut e = Evidence::default();
        e.beat("hv1", 7, 10_000, 50_000);
        // Written 300 ms after its last network beat, then nothing: it died.
        e.storage_beat("p", hb(7, 10_300, 20), 50_400);
        assert_eq!(
            e.condition("hv1", true, true, false, 51_000).name(),
            "dead",
            "no peer, no storage life"
        );
    }

    #[test]
    fn a_storage_heartbeat_well_after_the_last_beat_means_isolated() {
        let mut e = Evidence::default();
        e.beat("hv1", 7, 10_000, 50_000);
        e.storage_beat("p", hb(7, 10_300, 21), 50_400);
        // With pools, "dead" waits for the storage heartbeat to have a chance.
        assert_eq!(
            e.condition("hv1", true, true, true, 51_000).name(),
            "investigating"
        );
        e.storage_beat("p", hb(7, 11_200, 22), 51_300);
        let c = e.condition("hv1", true, true, false, 51_300);
        assert_eq!(c.name(), "isolated", "{c:?}");
    }

    #[test]
    fn a_restarted_agent_writing_storage_counts_as_alive() {
        let mut e = Evidence::default();
        e.beat("hv1", 7, 10_000, 50_000);
        e.storage_beat("p", hb(9, 100, 1), 50_100);
        assert_eq!(e.condition("hv1", true, true, false, 50_200).name(), "dead");
        e.storage_beat("p", hb(9, 600, 2), 50_600);
        assert_eq!(
            e.condition("hv1", true, true, false, 50_700).name(),
            "isolated"
        );
    }

    #[test]
    fn a_peer_that_reaches_the_host_means_agent_down() {
        let mut e = Evidence::default();
        e.beat("hv1", 7, 10_000, 50_000);
        e.address("hv1", IpAddr::from([198, 18, 0, 11]));
        let asked = e.start_probe("hv1", vec!["hv2".into(), "hv3".into()], 50_600);
        assert_eq!(asked.len(), 2);
        assert_eq!(
            e.condition("hv1", true, false, false, 50_700).name(),
            "investigating"
        );
        e.probe_answer("hv1", "hv2", false);
        e.probe_answer("hv1", "hv3", true);
        assert_eq!(
            e.condition("hv1", true, true, false, 51_000).name(),
            "agent-down"
        );
    }

    #[test]
    fn unanswered_probes_end_as_dead_after_their_timeout() {
        let mut e = Evidence::default();
        e.beat("hv1", 7, 10_000, 50_000);
        e.address("hv1", IpAddr::from([198, 18, 0, 11]));
        e.start_probe("hv1", vec!["hv2".into()], 50_600);
        assert_eq!(
            e.condition("hv1", true, true, false, 51_000).name(),
            "investigating"
        );
        assert_eq!(e.condition("hv1", true, true, false, 51_700).name(), "dead");
        // A heartbeat ends the episode.
        e.beat("hv1", 7, 12_000, 52_000);
        assert_eq!(
            e.condition("hv1", false, false, false, 52_000).name(),
            "alive"
        );
    }
}
