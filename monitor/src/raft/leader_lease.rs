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
//! - a new leader acts only once the old leader's lease has surely run out (below).
//!
//! Why that is enough: the quorum that elected the new leader and the quorum that answered the
//! old leader's last successful probe share a monitor `m`. `m` answered the probe (sent after
//! `t0`), so its openraft vote was refreshed after `t0`. openraft 0.9.25 then keeps that vote
//! for its own *vote lease* `V` (`election_timeout_max`): `m` refuses every vote request while
//! `now <= utime + V` (`Engine::handle_vote_req`), and if `m` is the candidate itself its
//! election timer waits `V` plus the election timeout (`RaftCore::handle_tick_election`). So
//! the election is later than `t0 + V`, as `m`'s clock counts. Two things could make `m`
//! forget `utime`, both covered:
//! - `m` restarted: a monitor grants no vote during its first `V` after it started
//!   ([`VoteGate`], asked by the Raft server before openraft sees a vote), and a monitor
//!   that leads acts no sooner than `L + L/8` after its lease clock started;
//! - `m` is the old leader itself: openraft does not refresh a leader's own vote, so it
//!   would grant a vote at once; a monitor grants none while it may act as leader
//!   ([`VoteRefusal::Leading`]), and its own clock then decides;
//! - Vigil never triggers an election by hand (`raft.trigger().elect()`), which would skip
//!   the candidate's own timer.
//!
//! The old leader acts until `t0 + L`. The new leader acts from `election + max(0, L + L/8 -
//! V)` ([`LeaseClock::after_election_ms`]): with the shipped timings (`L` = 400 ms, `V` =
//! 550 ms) that is at once; `L/8` is the rate drift allowed between two monotonic clocks.
//! "Act" is everything that reaches outside Raft: lease grants to agents, fence agents, fence
//! requests and the leader record on shared storage, and the VIP.
//! A sole voter cannot be outvoted: it holds the lease while Raft says it leads.

use std::sync::{Arc, Mutex, PoisonError};
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
    /// openraft's vote lease `V` (its `election_timeout_max`).
    vote_lease_ms: u64,
    /// The term Raft says this node leads, if it does.
    term: Option<u64>,
    /// Not before this (a new leader's wait).
    act_from_ms: u64,
    /// Not from this on, unless a probe extends it.
    valid_until_ms: u64,
    /// Not deposed before this: the wait is over and the first probe had its time (a new
    /// leader that acts at once is not deposed while its first probe is on its way).
    first_probe_by_ms: u64,
}

impl LeaseClock {
    /// `lease_ms`: `L`; `vote_lease_ms`: openraft's vote lease `V` (`election_timeout_max`).
    /// Times are ms since the clock's epoch, which must not be earlier than this process's
    /// start (see [`Self::leadership`]).
    pub fn new(lease_ms: u64, vote_lease_ms: u64) -> LeaseClock {
        LeaseClock {
            lease_ms: lease_ms.max(1),
            vote_lease_ms,
            term: None,
            act_from_ms: 0,
            valid_until_ms: 0,
            first_probe_by_ms: 0,
        }
    }

    /// `L`.
    pub fn lease_ms(&self) -> u64 {
        self.lease_ms
    }

    /// `L` and an eighth for clock drift: how long after `t0` an old leader may still act,
    /// as any other monitor's clock counts.
    pub fn wait_ms(&self) -> u64 {
        self.lease_ms + self.lease_ms.div_ceil(8)
    }

    /// How long a new leader waits after its election before it acts: what of
    /// [`Self::wait_ms`] the election itself (later than `t0 + V`) does not already cover.
    pub fn after_election_ms(&self) -> u64 {
        self.wait_ms().saturating_sub(self.vote_lease_ms)
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
            // Not before `L + L/8` from the epoch either: a monitor that restarted may have
            // been elected without the vote lease behind it (it forgot its `utime`).
            self.act_from_ms = if sole_voter {
                now_ms
            } else {
                now_ms
                    .saturating_add(self.after_election_ms())
                    .max(self.wait_ms())
            };
            self.first_probe_by_ms = self
                .act_from_ms
                .max(now_ms.saturating_add(self.probe_timeout_ms()));
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

    /// The next moment [`Self::serving`] or [`Self::deposed`] can change without an input
    /// (the wait ends, the lease runs out, the pause after it is over).
    pub fn next_change_ms(&self, now_ms: u64) -> Option<u64> {
        self.term?;
        if now_ms < self.act_from_ms {
            Some(self.act_from_ms)
        } else if now_ms < self.valid_until_ms && self.valid_until_ms != u64::MAX {
            Some(self.valid_until_ms)
        } else {
            self.deposed_from_ms().filter(|t| now_ms < *t)
        }
    }

    /// The term this node leads in, as Raft says (whether or not it may act).
    pub fn raft_term(&self) -> Option<u64> {
        self.term
    }

    /// How long a lease that ran out may stay out before this leader counts as deposed
    /// ([`Self::deposed`]): `V`, openraft's vote lease. A lapse this short is most often a
    /// slow probe (a loaded machine), not a lost quorum, and the lease comes back in the
    /// same term; nothing of it needs the agents to move. Moving them later costs nothing
    /// either: a new leader treats every host as freshly heard for a whole agent lease
    /// (5 s by default) after its election, which is itself later than `t0 + V`.
    pub fn pause_ms(&self) -> u64 {
        self.vote_lease_ms
    }

    /// From when this leader counts as deposed, if Raft says it leads and it is no sole
    /// voter: the end of its first probe's time when it never held the lease, else
    /// [`Self::pause_ms`] after the lease ran out.
    fn deposed_from_ms(&self) -> Option<u64> {
        self.term?;
        if self.valid_until_ms == u64::MAX {
            return None;
        }
        Some(if self.valid_until_ms == 0 {
            self.first_probe_by_ms
        } else {
            self.first_probe_by_ms
                .max(self.valid_until_ms.saturating_add(self.pause_ms()))
        })
    }

    /// Raft says this node leads, its new-leader wait is over, and no quorum has confirmed
    /// its lease for [`Self::pause_ms`] after it ran out (or ever): it is cut off from the
    /// majority, which may well have elected another leader already (openraft never steps
    /// it down). It must not hold on to agents then: it protects nobody (no grants, no
    /// decisions), and the agents it keeps are silent for the real leader. Never for a sole
    /// voter (its lease does not run out); not during the wait, while a new leader is still
    /// proving itself. It is also the moment the engine stops counting a lapse as a pause
    /// (`service::follow_lease`).
    pub fn deposed(&self, now_ms: u64) -> bool {
        self.deposed_from_ms().is_some_and(|t| now_ms >= t)
    }

    /// What the lease task publishes at `now_ms`: whether this monitor may act
    /// ([`Self::serving`]), the term Raft says it leads in, and whether it is deposed.
    pub fn view(&self, now_ms: u64) -> LeaseView {
        LeaseView {
            serving: self.serving(now_ms),
            raft_term: self.term,
            deposed: self.deposed(now_ms),
        }
    }
}

/// What the lease task publishes (`spawn_watching`), what the engine task follows
/// (`service::follow_lease`) and what decides whether this monitor takes agents
/// (`server::takes_agents`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LeaseView {
    /// Whether (and until when) this monitor may act as leader now.
    pub serving: Option<Serving>,
    /// The term Raft says this monitor leads in, whether or not it may act.
    pub raft_term: Option<u64>,
    /// [`LeaseClock::deposed`].
    pub deposed: bool,
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

/// Why this monitor grants no Raft vote now (module docs: each makes an election later than
/// an old leader's lease).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VoteRefusal {
    /// Started less than openraft's vote lease ago: it may have forgotten a leader it was
    /// keeping its vote for.
    JustStarted,
    /// It may act as leader itself (its own openraft vote is not refreshed by its probes, so
    /// openraft alone would grant it at once).
    Leading,
}

impl std::fmt::Display for VoteRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            VoteRefusal::JustStarted => {
                "this monitor started less than a vote lease ago and grants no vote yet (it may \
                 have forgotten a leader it heard from just before)"
            }
            VoteRefusal::Leading => "this monitor holds the leader lease and grants no vote",
        })
    }
}

/// The vote rules, pure: no vote before `quiet_until` (a vote lease after the start), none
/// while this monitor may act as leader (until `leading_until`).
pub fn vote_refusal(
    now: Instant,
    quiet_until: Instant,
    leading_until: Option<Instant>,
) -> Option<VoteRefusal> {
    if now < quiet_until {
        Some(VoteRefusal::JustStarted)
    } else if leading_until.is_some_and(|u| now < u) {
        Some(VoteRefusal::Leading)
    } else {
        None
    }
}

/// [`vote_refusal`]'s inputs, shared by the Raft server (which asks before a vote reaches
/// openraft) and the lease task (which says how long this monitor acts as leader, before it
/// publishes the lease).
#[derive(Debug, Clone)]
pub struct VoteGate(Arc<Mutex<GateState>>);

#[derive(Debug)]
struct GateState {
    quiet_until: Instant,
    leading_until: Option<Instant>,
}

impl VoteGate {
    /// For a monitor started at `started` whose openraft vote lease is `vote_lease`
    /// (`election_timeout_max`).
    pub fn new(started: Instant, vote_lease: Duration) -> VoteGate {
        VoteGate(Arc::new(Mutex::new(GateState {
            quiet_until: started + vote_lease,
            leading_until: None,
        })))
    }

    fn set_leading_until(&self, until: Option<Instant>) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .leading_until = until;
    }

    /// The end of the quiet time after the start.
    pub fn quiet_until(&self) -> Instant {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .quiet_until
    }

    /// Why a vote request arriving now must be refused, if it must.
    pub fn refusal(&self, now: Instant) -> Option<VoteRefusal> {
        let g = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        vote_refusal(now, g.quiet_until, g.leading_until)
    }
}

/// Holds this monitor's own elections during its quiet time. openraft elects at the first
/// tick after a start (it does not remember when it last heard its leader), before the
/// leader's heartbeats reach it: every restart of a follower bumped the term, deposed a
/// healthy leader, and left openraft's "greater log" penalty (2 x `election_timeout_max`)
/// on the next election (the slow runs of the VIP benchmark). After the quiet time it has
/// heard the leader, if there is one, and the normal timers apply.
pub fn hold_elections_while_quiet(raft: &openraft::Raft<super::TypeConfig>, gate: &VoteGate) {
    raft.runtime_config().elect(false);
    let (raft, until) = (raft.clone(), gate.quiet_until());
    tokio::spawn(async move {
        tokio::time::sleep_until(until.into()).await;
        raft.runtime_config().elect(true);
    });
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
    gate: VoteGate,
    stop: watch::Receiver<bool>,
) -> watch::Receiver<Option<Serving>> {
    spawn_watching(raft, lease_ms, epoch, gate, stop).0
}

/// [`spawn`], also publishing the whole [`LeaseView`] the moment it changes (what the engine
/// task follows, and what decides whether this monitor takes agents).
pub fn spawn_watching(
    raft: Arc<RaftNode>,
    lease_ms: u64,
    epoch: Instant,
    gate: VoteGate,
    mut stop: watch::Receiver<bool>,
) -> (watch::Receiver<Option<Serving>>, watch::Receiver<LeaseView>) {
    let (tx, rx) = watch::channel(None);
    let (view_tx, view_rx) = watch::channel(LeaseView::default());
    let vote_lease_ms = raft.election_timeout_max_ms();
    tokio::spawn(async move {
        let mut clock = LeaseClock::new(lease_ms, vote_lease_ms);
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
            // The gate first: no vote is granted for a moment this monitor may still act in.
            gate.set_leading_until(serving.map(|s| {
                let until = if s.until_ms == u64::MAX {
                    // A sole voter: until the next pass (the loop runs at every change).
                    now.saturating_add(3_600_000)
                } else {
                    s.until_ms
                };
                epoch + Duration::from_millis(until)
            }));
            tx.send_if_modified(|v| std::mem::replace(v, serving) != serving);
            let view = clock.view(now);
            view_tx.send_if_modified(|v| std::mem::replace(v, view) != view);
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
        view_tx.send_replace(LeaseView::default());
        gate.set_leading_until(None);
    });
    (rx, view_rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    const L: u64 = 400;
    /// The shipped vote lease (`RaftTuning::default`).
    const V: u64 = 550;

    /// A leader whose election is not known to cover anything (`V` = 0: the whole wait comes
    /// after the election).
    fn leader(term: u64, now: u64) -> LeaseClock {
        let mut c = LeaseClock::new(L, 0);
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
        let mut sole = LeaseClock::new(L, V);
        sole.leadership(Some(1), true, 0);
        assert!(!sole.deposed(1_000_000));
        // A leader that acts at once (the shipped timings) is not deposed while its first
        // probe may still be answered.
        let mut quick = LeaseClock::new(L, V);
        quick.leadership(Some(2), false, 5_000);
        assert!(!quick.deposed(5_000 + quick.probe_timeout_ms() - 1));
        assert!(quick.deposed(5_000 + quick.probe_timeout_ms()));
    }

    /// Defect A (issue 12): a lease that ran out under load sent every agent away at once,
    /// although no other leader can be elected before `V` after the last answered probe. A
    /// leader that held its lease is deposed only [`LeaseClock::pause_ms`] (`V`) after it ran
    /// out, and the lease task wakes up for that moment.
    #[test]
    fn a_leader_that_held_its_lease_is_deposed_only_v_after_it_ran_out() {
        let mut c = LeaseClock::new(L, V);
        c.leadership(Some(2), false, 5_000);
        c.confirmed(2, 5_000);
        assert_eq!(c.serving(5_399).map(|s| s.until_ms), Some(5_400));
        assert_eq!(c.serving(5_400), None, "the lease itself ends at t0 + L");
        assert_eq!(c.next_change_ms(5_400), Some(5_400 + V));
        assert!(!c.deposed(5_400 + V - 1));
        assert!(c.deposed(5_400 + V));
        assert_eq!(c.next_change_ms(5_400 + V), None);
        let v = c.view(5_500);
        assert_eq!((v.serving, v.raft_term, v.deposed), (None, Some(2), false));
        // Answered again within the pause: serving, in the same term, never deposed.
        c.confirmed(2, 5_600);
        assert!(c.serving(5_700).is_some());
        assert!(!c.deposed(5_700));
    }

    #[test]
    fn a_sole_voter_serves_at_once_until_other_voters_join() {
        let mut c = LeaseClock::new(L, V);
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

    /// Defect: the new leader waited `L + L/8` after its election although openraft's vote
    /// lease had already made the election later than the old leader's last probe plus `V`:
    /// 450 ms of every failover for nothing (the VIP benchmark's figures).
    #[test]
    fn with_the_shipped_timings_a_new_leader_acts_at_its_first_confirmed_probe() {
        let mut c = LeaseClock::new(L, V);
        assert_eq!(c.after_election_ms(), 0);
        c.leadership(Some(4), false, 5_000);
        c.confirmed(4, 5_000);
        assert_eq!(
            c.serving(5_000),
            Some(Serving {
                term: 4,
                until_ms: 5_400
            })
        );
        // A vote lease shorter than L + L/8 leaves the rest of the wait after the election.
        let mut short = LeaseClock::new(L, 300);
        assert_eq!(short.after_election_ms(), 150);
        short.leadership(Some(4), false, 5_000);
        short.confirmed(4, 5_100);
        assert_eq!(short.serving(5_149), None);
        assert!(short.serving(5_150).is_some());
    }

    /// A monitor that restarted forgot when it last heard its leader, so it may be elected
    /// without the vote lease behind the election: it acts no sooner than `L + L/8` after its
    /// clock's epoch (the process start).
    #[test]
    fn a_monitor_elected_right_after_it_started_waits_l_and_an_eighth_from_its_start() {
        let mut c = LeaseClock::new(L, V);
        c.leadership(Some(2), false, 30);
        c.confirmed(2, 30);
        assert_eq!(c.serving(449), None);
        assert_eq!(c.next_change_ms(100), Some(450));
        c.confirmed(2, 440);
        assert!(c.serving(450).is_some());
    }

    /// The safety argument, run: whatever the timings, an old leader whose last confirmed
    /// probe started at `t0` never serves once a new leader does, when the new one was
    /// elected later than `t0 + V` (openraft's vote lease, or a voter's start-up quiet time)
    /// or restarted after `t0`.
    #[test]
    fn an_old_and_a_new_leader_never_serve_at_the_same_moment() {
        for vote_lease in [0u64, 200, 449, 450, V, 2_000] {
            for last_probe in [0u64, 100, 399, 400, 1_000] {
                for election_after in [1u64, 50, 399, 401, 2_000] {
                    for started in [0u64, last_probe + 1] {
                        // Restarted after t0: elected at any moment after its start.
                        let election = if started == 0 {
                            last_probe + vote_lease + election_after
                        } else {
                            started + election_after - 1
                        };
                        let mut old = leader(1, 0);
                        old.confirmed(1, last_probe);
                        // The new leader's clock counts from its own start.
                        let mut new = LeaseClock::new(L, vote_lease);
                        let at = |t: u64| t - started;
                        new.leadership(Some(2), false, at(election));
                        for t in (election..election + 3_000).step_by(10) {
                            new.confirmed(2, at(t));
                            let both = old.serving(t).is_some() && new.serving(at(t)).is_some();
                            assert!(
                                !both,
                                "V {vote_lease}, probe {last_probe}, election {election}, \
                                 start {started}, t {t}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn no_vote_during_the_quiet_time_after_the_start_nor_while_acting_as_leader() {
        let t = Instant::now();
        let ms = Duration::from_millis;
        let quiet = t + ms(V);
        assert_eq!(vote_refusal(t, quiet, None), Some(VoteRefusal::JustStarted));
        assert_eq!(vote_refusal(t + ms(V), quiet, None), None);
        let leading = Some(t + ms(2_000));
        assert_eq!(
            vote_refusal(t + ms(1_000), quiet, leading),
            Some(VoteRefusal::Leading)
        );
        assert_eq!(vote_refusal(t + ms(2_000), quiet, leading), None);
        let gate = VoteGate::new(t, ms(V));
        assert_eq!(gate.refusal(t + ms(V - 1)), Some(VoteRefusal::JustStarted));
        gate.set_leading_until(leading);
        assert_eq!(gate.refusal(t + ms(V)), Some(VoteRefusal::Leading));
        gate.set_leading_until(None);
        assert_eq!(gate.refusal(t + ms(V)), None);
    }
}
