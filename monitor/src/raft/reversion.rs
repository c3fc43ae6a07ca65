//! The leader's guard against a follower whose Raft log went back.
//!
//! Within one leader's term a follower's log only grows: what it acknowledged is on its disk
//! (fsync'd before the answer). A follower whose database was deleted or replaced while it
//! stayed a member (started again with `--join` on an empty directory, a file copied back
//! from an old backup, a disk that lost writes) breaks that. openraft 0.9 asserts on it —
//! in a debug build the leader's Raft core panics and the cluster has no leader until it
//! restarts; in a release build the leader keeps believing the follower holds entries it
//! no longer has (shown by the e2e test `a_member_wiped_by_hand_…`).
//!
//! So the Raft client watches, per target and per leader vote, how far each follower has
//! acknowledged ([`Matched`]), and [`observe`] calls a `Conflict` answer below that point a
//! reversion. The client then reports the follower unreachable instead of handing the
//! answer to openraft, and says, once per term, what happened and what to do: the follower
//! is cut off from replication until it is brought back with `vigil-monitor --reset` and
//! `vigilctl server reset` ([`super::reset`]).

use openraft::raft::AppendEntriesResponse;
use openraft::{LogId, Vote};

/// How far one follower has acknowledged the log of one leader vote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Matched {
    vote: Vote<u64>,
    index: Option<u64>,
    reported: bool,
}

/// What an AppendEntries answer says about the follower's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Consistent with what it acknowledged before.
    Consistent,
    /// It no longer has the entry at `conflict` although it acknowledged up to `matched`
    /// under this leader vote. `first`: the first time this vote sees it.
    Reverted {
        matched: u64,
        conflict: u64,
        first: bool,
    },
}

/// Updates `slot` (this target's record, `None` at first) with one answer `resp` to an
/// AppendEntries sent under `vote` with `prev` and entries up to `last` (`prev` when it
/// carried none).
pub fn observe(
    slot: &mut Option<Matched>,
    vote: &Vote<u64>,
    prev: Option<LogId<u64>>,
    last: Option<LogId<u64>>,
    resp: &AppendEntriesResponse<u64>,
) -> Verdict {
    let m = match slot {
        Some(m) if m.vote == *vote => m,
        _ => slot.insert(Matched {
            vote: *vote,
            index: None,
            reported: false,
        }),
    };
    let grow = |m: &mut Matched, to: Option<LogId<u64>>| {
        if let Some(to) = to {
            m.index = Some(m.index.map_or(to.index, |i| i.max(to.index)));
        }
    };
    match resp {
        AppendEntriesResponse::Success => grow(m, last),
        AppendEntriesResponse::PartialSuccess(to) => grow(m, *to),
        AppendEntriesResponse::HigherVote(_) => {}
        AppendEntriesResponse::Conflict => {
            if let (Some(matched), Some(prev)) = (m.index, prev) {
                if prev.index <= matched {
                    let first = !m.reported;
                    m.reported = true;
                    return Verdict::Reverted {
                        matched,
                        conflict: prev.index,
                        first,
                    };
                }
            }
        }
    }
    Verdict::Consistent
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::CommittedLeaderId;

    fn lid(term: u64, index: u64) -> Option<LogId<u64>> {
        Some(LogId::new(CommittedLeaderId::new(term, 1), index))
    }

    #[test]
    fn a_follower_that_lags_or_diverges_is_consistent() {
        let v = Vote::new_committed(3, 1);
        let mut s = None;
        // Optimistic first probe, refused: nothing acknowledged yet.
        let c = AppendEntriesResponse::Conflict;
        assert_eq!(
            observe(&mut s, &v, lid(3, 40), lid(3, 40), &c),
            Verdict::Consistent
        );
        let ok = AppendEntriesResponse::Success;
        assert_eq!(
            observe(&mut s, &v, lid(2, 10), lid(3, 20), &ok),
            Verdict::Consistent
        );
        // Above what it acknowledged: an ordinary conflict.
        assert_eq!(
            observe(&mut s, &v, lid(3, 21), lid(3, 30), &c),
            Verdict::Consistent
        );
        let partial = AppendEntriesResponse::PartialSuccess(lid(3, 25));
        assert_eq!(
            observe(&mut s, &v, lid(3, 20), lid(3, 30), &partial),
            Verdict::Consistent
        );
        assert_eq!(
            observe(&mut s, &v, lid(3, 26), lid(3, 30), &c),
            Verdict::Consistent
        );
    }

    #[test]
    fn a_conflict_at_or_below_what_it_acknowledged_is_a_reversion_reported_once_per_vote() {
        let v = Vote::new_committed(3, 1);
        let mut s = None;
        let ok = AppendEntriesResponse::Success;
        let c = AppendEntriesResponse::Conflict;
        observe(&mut s, &v, lid(3, 10), lid(3, 20), &ok);
        assert_eq!(
            observe(&mut s, &v, lid(3, 20), lid(3, 25), &c),
            Verdict::Reverted {
                matched: 20,
                conflict: 20,
                first: true
            }
        );
        assert_eq!(
            observe(&mut s, &v, lid(3, 5), lid(3, 25), &c),
            Verdict::Reverted {
                matched: 20,
                conflict: 5,
                first: false
            }
        );
        // A new leader vote starts from nothing: its own progress starts from nothing too.
        let v2 = Vote::new_committed(4, 1);
        assert_eq!(
            observe(&mut s, &v2, lid(3, 5), lid(4, 26), &c),
            Verdict::Consistent
        );
    }
}
