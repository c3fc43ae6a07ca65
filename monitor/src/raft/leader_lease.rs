//! The leader lease: how long this monitor may act as leader, proven by its quorum.
//!
//! openraft 0.9 never makes a leader step down when it loses its quorum: a leader cut off
//! from the other monitors goes on believing it leads while the majority elects another. So
//! Vigil does not act on "Raft says I lead". It acts only while it holds a *leader lease*:
//!
//! - every [`LeaseClock::probe_every_ms`] the leader takes `t0` from its monotonic clock and
//!   runs a linearizable probe (`ensure_linearizable`: a fresh AppendEntries to every voter,
//!   answered by a quorum in this term); on success it may act until `t0 + L`
//!   ([`LeaseClock::confirmed`]), checked against the clock at every use, never from a
//!   cached "fresh" flag (a stalled RaftCore publishes no metrics);
//! - a new leader acts only from `L + L/8` after it saw itself elected
//!   ([`LeaseClock::leadership`]).
//!
//! Why that is enough: the quorum that elected the new leader and the quorum that answered the
//! old leader's last successful probe share a monitor. That monitor answered the probe (sent
//! after `t0`) before it voted for the new leader (after voting it refuses the old term), so
//! `t0 < election`. The old leader acts until `t0 + L < election + L`, and the new one starts
//! at `election + L + L/8`: the two never act at the same time, with `L/8` for the rate drift
//! of two monotonic clocks. "Act" is everything that reaches outside Raft: lease grants to
//! agents, fence agents, fence requests and the leader record on shared storage, and the VIP.
//! A sole voter cannot be outvoted: it holds the lease while Raft says it leads.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};

use super::RaftNode;

/// This monitor may act as leader in `term` until `until_ms` (monotonic ms of the epoch the
/// clock was given; `u64::MAX`: a sole voter, no limit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Serving {
    pub term: u64,
    pub until_ms: u64,
}

/// The pure lease rules (no I/O, no clock of its own).
#[derive(Debug, Clone)]
pub struct LeaseClock {
    lease_ms: u64,
    /// The term Raft says this node leads, if it does.
    term: Option<u64>,
    /// Not before this (a new leader's wait).
    act_from_ms: u64,
    /// Not from this on, unless a probe extends it.
    valid_until_ms: u64,
}

impl LeaseClock {
    pub fn new(lease_ms: u64) -> LeaseClock {
        LeaseClock {
            lease_ms: lease_ms.max(1),
            term: None,
            act_from_ms: 0,
            valid_until_ms: 0,
        }
    }

    /// `L`.
    pub fn lease_ms(&self) -> u64 {
        self.lease_ms
    }

    /// How long a new leader waits before it acts: `L` and an eighth for clock drift.
    pub fn wait_ms(&self) -> u64 {
        self.lease_ms + self.lease_ms.div_ceil(8)
    }

    /// How often a leader probes its quorum: four times a lease, so one slow probe does not
    /// lapse it.
    pub fn probe_every_ms(&self) -> u64 {
        (self.lease_ms / 4).max(1)
    }

    /// How long one probe may take before it counts as failed.
    pub fn probe_timeout_ms(&self) -> u64 {
        (self.lease_ms / 2).max(1)
    }

    /// What Raft says now: `Some(term)` while this node leads in `term`; `sole_voter` when no
    /// other monitor votes (nobody can be elected against it).
    pub fn leadership(&mut self, leading: Option<u64>, sole_voter: bool, now_ms: u64) {
        if leading != self.term {
            self.term = leading;
            self.act_from_ms = if sole_voter {
                now_ms
            } else {
                now_ms.saturating_add(self.wait_ms())
            };
            self.valid_until_ms = 0;
        }
        match (self.term, sole_voter) {
            (Some(_), true) => self.valid_until_ms = u64::MAX,
            // A sole voter's unlimited lease ends the moment others can vote.
            (Some(_), false) if self.valid_until_ms == u64::MAX => self.valid_until_ms = now_ms,
            _ => {}
        }
    }

    /// A probe started at `started_ms` was answered by a quorum in `term`.
    pub fn confirmed(&mut self, term: u64, started_ms: u64) {
        if self.term == Some(term) && self.valid_until_ms != u64::MAX {
            let until = started_ms.saturating_add(self.lease_ms);
            self.valid_until_ms = self.valid_until_ms.max(until);
        }
    }

    /// Whether (and until when) this monitor may act as leader at `now_ms`.
    pub fn serving(&self, now_ms: u64) -> Option<Serving> {
        let term = self.term?;
        (now_ms >= self.act_from_ms && now_ms < self.valid_until_ms).then_some(Serving {
            term,
            until_ms: self.valid_until_ms,
        })
    }

    /// The next moment [`Self::serving`] can change without an input (the wait ends, the
    /// lease runs out).
    pub fn next_change_ms(&self, now_ms: u64) -> Option<u64> {
        self.term?;
        if now_ms < self.act_from_ms {
            Some(self.act_from_ms)
        } else if now_ms < self.valid_until_ms && self.valid_until_ms != u64::MAX {
            Some(self.valid_until_ms)
        } else {
            None
        }
    }

    /// The term this node leads in, as Raft says (whether or not it may act).
    pub fn raft_term(&self) -> Option<u64> {
        self.term
    }

    /// Raft says this node leads, its new-leader wait is over, and no quorum has confirmed
    /// its lease: it is cut off from the majority, which may well have elected another
    /// leader already (openraft never steps it down). It must not hold on to agents then:
    /// it protects nobody (no grants, no decisions), and the agents it keeps are silent for
    /// the real leader. Never for a sole voter (its lease does not run out); not during the
    /// wait, while a new leader is still proving itself.
    pub fn deposed(&self, now_ms: u64) -> bool {
        self.term.is_some() && now_ms >= self.act_from_ms && now_ms >= self.valid_until_ms
    }
}

/// Whether the lease task starts a probe at `now_ms`: while Raft says this node leads, one
/// probe at a time, every [`LeaseClock::probe_every_ms`] (`next_probe_ms`), never for a sole
/// voter (its lease needs none). Pure: the simulator's monitors probe by this rule too.
pub fn probe_due(
    clock: &LeaseClock,
    sole_voter: bool,
    probing: bool,
    now_ms: u64,
    next_probe_ms: u64,
) -> bool {
    clock.raft_term().is_some() && !probing && now_ms >= next_probe_ms && !sole_voter
}

/// Monotonic milliseconds since `epoch`.
fn mono_ms(epoch: Instant) -> u64 {
    epoch.elapsed().as_millis() as u64
}

/// Runs the lease for `raft` until `stop` turns true (or its sender goes): probes while Raft
/// says this node leads and publishes [`Serving`] the moment it changes, including the moment
/// a lease runs out with no probe answered. Times are monotonic ms since `epoch`.
pub fn spawn(
    raft: Arc<RaftNode>,
    lease_ms: u64,
    epoch: Instant,
    stop: watch::Receiver<bool>,
) -> watch::Receiver<Option<Serving>> {
    spawn_watching(raft, lease_ms, epoch, stop).0
}

/// [`spawn`], also publishing [`LeaseClock::deposed`] the moment it changes (what decides
/// whether this monitor takes agents, `server::takes_agents`).
pub fn spawn_watching(
    raft: Arc<RaftNode>,
    lease_ms: u64,
    epoch: Instant,
    mut stop: watch::Receiver<bool>,
) -> (watch::Receiver<Option<Serving>>, watch::Receiver<bool>) {
    let (tx, rx) = watch::channel(None);
    let (deposed_tx, deposed_rx) = watch::channel(false);
    tokio::spawn(async move {
        let mut clock = LeaseClock::new(lease_ms);
        let mut metrics = raft.metrics_watch();
        let me = raft.node_id();
        let (probe_tx, mut probe_rx) = mpsc::unbounded_channel::<(u64, u64, bool)>();
        let mut probing = false;
        let mut next_probe_ms = 0u64;
        loop {
            let now = mono_ms(epoch);
            let leading = {
                let m = metrics.borrow_and_update();
                (m.state == openraft::ServerState::Leader && m.current_leader == Some(me))
                    .then_some(m.current_term)
            };
            clock.leadership(leading, raft.is_single_node(), now);
            if let Some(term) = clock.raft_term() {
                if probe_due(&clock, raft.is_single_node(), probing, now, next_probe_ms) {
                    probing = true;
                    next_probe_ms = now + clock.probe_every_ms();
                    let (raft, probe_tx) = (raft.clone(), probe_tx.clone());
                    let timeout = Duration::from_millis(clock.probe_timeout_ms());
                    tokio::spawn(async move {
                        let started = mono_ms(epoch);
                        let ok = matches!(
                            tokio::time::timeout(timeout, raft.ensure_linearizable()).await,
                            Ok(Ok(()))
                        );
                        let _ = probe_tx.send((term, started, ok));
                    });
                }
            }
            let serving = clock.serving(now);
            tx.send_if_modified(|v| std::mem::replace(v, serving) != serving);
            let deposed = clock.deposed(now);
            deposed_tx.send_if_modified(|v| std::mem::replace(v, deposed) != deposed);
            let mut wake = clock.next_change_ms(now);
            if clock.raft_term().is_some() && !probing {
                wake = Some(wake.map_or(next_probe_ms, |w| w.min(next_probe_ms)));
            }
            let sleep = wake.map_or(Duration::from_secs(3600), |w| {
                Duration::from_millis(w.saturating_sub(now).max(1))
            });
            tokio::select! {
                r = metrics.changed() => if r.is_err() { break },
                Some((term, started, ok)) = probe_rx.recv() => {
                    probing = false;
                    if ok {
                        clock.confirmed(term, started);
                    } else {
                        tracing::debug!(term, "leader lease probe failed (no quorum answered in time)");
                    }
                }
                _ = tokio::time::sleep(sleep) => {}
                r = stop.changed() => if r.is_err() || *stop.borrow() { break },
            }
        }
        // Stopping: act no more.
        tx.send_replace(None);
    });
    (rx, deposed_rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    const L: u64 = 400;

    fn leader(term: u64, now: u64) -> LeaseClock {
        let mut c = LeaseClock::new(L);
        c.leadership(Some(term), false, now);
        c
    }

    #[test]
    fn a_new_leader_acts_only_after_its_wait_and_a_confirmed_probe() {
        let mut c = leader(3, 1_000);
        assert_eq!(c.serving(1_000), None, "not before a probe");
        c.confirmed(3, 1_000);
        assert_eq!(c.serving(1_000), None, "not during the wait");
        assert_eq!(c.next_change_ms(1_000), Some(1_000 + c.wait_ms()));
        // The wait (450 ms) outlasts the probe's lease (400 ms): a later probe is needed.
        assert_eq!(c.serving(1_450), None);
        c.confirmed(3, 1_400);
        assert_eq!(
            c.serving(1_450),
            Some(Serving {
                term: 3,
                until_ms: 1_800
            })
        );
    }

    #[test]
    fn the_lease_runs_out_at_probe_start_plus_l_without_a_new_confirmation() {
        let mut c = leader(3, 0);
        c.confirmed(3, 500);
        assert!(c.serving(899).is_some());
        assert_eq!(c.serving(900), None, "t0 + L is already out");
        assert_eq!(c.next_change_ms(600), Some(900));
        // A probe answered late counts from when it started, not from its answer.
        c.confirmed(3, 600);
        assert_eq!(c.serving(999).map(|s| s.until_ms), Some(1_000));
        // An older probe's answer never shortens it.
        c.confirmed(3, 100);
        assert_eq!(c.serving(999).map(|s| s.until_ms), Some(1_000));
    }

    #[test]
    fn a_probe_of_an_earlier_term_or_after_losing_leadership_counts_for_nothing() {
        let mut c = leader(3, 0);
        c.confirmed(2, 600);
        assert_eq!(c.serving(700), None);
        c.leadership(None, false, 700);
        c.confirmed(3, 700);
        assert_eq!(c.serving(800), None);
        // Elected again in a later term: the wait starts again.
        c.leadership(Some(5), false, 800);
        c.confirmed(5, 800);
        assert_eq!(c.serving(900), None);
        c.confirmed(5, 1_200);
        assert!(c.serving(800 + c.wait_ms()).is_some());
    }

    #[test]
    fn a_leader_is_deposed_once_its_wait_is_over_and_no_quorum_confirms_it() {
        let mut c = leader(3, 1_000);
        // During the new leader's wait it is not deposed, confirmed or not.
        assert!(!c.deposed(1_000));
        assert!(!c.deposed(1_000 + c.wait_ms() - 1));
        // After it, without a confirmed lease, it is.
        assert!(c.deposed(1_000 + c.wait_ms()));
        // Confirmed again: it serves, and is not deposed until the lease runs out.
        c.confirmed(3, 1_500);
        assert!(!c.deposed(1_500));
        assert!(c.serving(1_500).is_some());
        assert!(c.deposed(1_900));
        // Not leading at all, or a sole voter: never.
        c.leadership(None, false, 2_000);
        assert!(!c.deposed(5_000));
        let mut sole = LeaseClock::new(L);
        sole.leadership(Some(1), true, 0);
        assert!(!sole.deposed(1_000_000));
    }

    #[test]
    fn a_sole_voter_serves_at_once_until_other_voters_join() {
        let mut c = LeaseClock::new(L);
        c.leadership(Some(1), true, 10);
        assert_eq!(
            c.serving(10),
            Some(Serving {
                term: 1,
                until_ms: u64::MAX
            })
        );
        assert_eq!(c.next_change_ms(10), None);
        // Two more voters: from now on only probes extend it.
        c.leadership(Some(1), false, 5_000);
        assert_eq!(c.serving(5_000), None);
        c.confirmed(1, 5_000);
        assert_eq!(c.serving(5_100).map(|s| s.until_ms), Some(5_400));
    }

    /// The safety argument, run: whatever the timings, an old leader whose last confirmed
    /// probe started before the new leader's election never serves once the new one does.
    #[test]
    fn an_old_and_a_new_leader_never_serve_at_the_same_moment() {
        for last_probe in [0u64, 100, 399, 400, 1_000] {
            for election_after in [1u64, 50, 399, 401, 2_000] {
                let mut old = leader(1, 0);
                old.confirmed(1, last_probe);
                let election = last_probe + election_after;
                let mut new = leader(2, election);
                for t in (election..election + 3_000).step_by(20) {
                    new.confirmed(2, t);
                    let both = old.serving(t).is_some() && new.serving(t).is_some();
                    assert!(!both, "probe {last_probe}, election {election}, t {t}");
                }
            }
        }
    }
}
