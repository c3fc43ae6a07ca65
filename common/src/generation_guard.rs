//! The agent's activation-generation guard, as pure decisions.
//!
//! "A VM never runs twice" rests on the agent's half of the generation protocol: a start
//! order older than the newest generation seen is refused, a generation activates at most
//! once on a host, no start happens while the host fences itself, and a domain found
//! running with a generation older than the newest seen is destroyed. These functions are
//! those decisions, and nothing else: the agent (`agent/src/executor.rs`, the watcher in
//! `agent/src/watch.rs`) and the monitor's simulator (`monitor/src/sim.rs`) both call them,
//! so the seeded simulator tests the guard that ships.
//!
//! A start is decided in two steps, because the agent acts between them:
//!
//! 1. [`admit_order`], before anything else: refused while fencing, refused if stale. An
//!    admitted order's generation is then recorded as the newest seen (durably, before the
//!    agent acts on it), and the domain is looked up (defined from the order if missing).
//! 2. [`start_verdict`], on what the host has: already running with this very generation
//!    (done), running with another (never a second copy), this generation already started
//!    here and stopped (a late duplicate), or start it. On [`StartVerdict::Start`] the agent
//!    records the generation as started (durably) *before* asking libvirt, so a start that
//!    libvirt then refuses has still used up its generation.

/// Why a start order is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartRefusal {
    /// This host is fencing itself: no start until the monitors grant it a lease again.
    Fencing,
    /// The order's generation is older than the newest this agent has seen for the VM: the
    /// VM moved on (a stale order, e.g. a late duplicate from an old leader).
    StaleOrder { newest: u64 },
    /// A copy already runs here with another generation (`None`: not stamped by Vigil):
    /// never a second copy.
    SecondCopy { running: Option<u64> },
    /// This generation (or a newer one) already started on this host and stopped: a late
    /// duplicate of an old order. Starting the VM again needs a new generation.
    AlreadyActivated { started: u64 },
}

impl StartRefusal {
    /// The agent's reason, as sent to the monitor in `CommandOutcome::Failed`.
    pub fn reason(&self, uuid: &str, generation: u64) -> String {
        match self {
            StartRefusal::Fencing => format!(
                "refusing to start {uuid}: this host is fencing itself (until the monitors grant it a lease again)"
            ),
            StartRefusal::StaleOrder { newest } => format!(
                "refusing to start {uuid} with generation {generation}: generation {newest} is newer (stale order)"
            ),
            StartRefusal::SecondCopy { running } => format!(
                "{uuid} is already running here with generation {running:?}; refusing a second start"
            ),
            StartRefusal::AlreadyActivated { .. } => format!(
                "generation {generation} of {uuid} already ran on this host and stopped; a new start needs a new generation"
            ),
        }
    }
}

/// What the host has of the VM when a start order is carried out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LocalCopy {
    /// Defined here and not running (shut off, crashed and gone: anything but running or
    /// paused).
    NotRunning,
    /// Running or paused here, stamped with this generation (`None`: no Vigil metadata).
    Running { generation: Option<u64> },
}

/// Step 2 of a start order (after [`admit_order`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartVerdict {
    /// Record the generation as started, stamp it into the domain, start it.
    Start,
    /// This very activation already runs here: done, nothing to do.
    AlreadyRunning,
    /// Refused; nothing to do.
    Refused(StartRefusal),
}

/// Step 1 of a start order: whether the agent may act on it at all. `fencing`: a fencing
/// episode is under way; `newest_seen`: the newest generation this agent has recorded for
/// the VM. An order of exactly the newest generation is admitted (a resend, or the order
/// that announced it).
pub fn admit_order(
    fencing: bool,
    newest_seen: Option<u64>,
    generation: u64,
) -> Result<(), StartRefusal> {
    if fencing {
        return Err(StartRefusal::Fencing);
    }
    match newest_seen {
        Some(newest) if generation < newest => Err(StartRefusal::StaleOrder { newest }),
        _ => Ok(()),
    }
}

/// Step 2 of a start order: `here` is what the host has of the VM, `started` the highest
/// generation this agent has started for it.
pub fn start_verdict(here: LocalCopy, started: Option<u64>, generation: u64) -> StartVerdict {
    match here {
        LocalCopy::Running { generation: g } if g == Some(generation) => {
            StartVerdict::AlreadyRunning
        }
        LocalCopy::Running { generation: g } => {
            StartVerdict::Refused(StartRefusal::SecondCopy { running: g })
        }
        LocalCopy::NotRunning => match started {
            Some(s) if s >= generation => {
                StartVerdict::Refused(StartRefusal::AlreadyActivated { started: s })
            }
            _ => StartVerdict::Start,
        },
    }
}

/// What to do with a copy found running (or paused) on this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StaleVerdict {
    /// Its generation is the newest seen (or none is known): leave it.
    Current,
    /// It runs with a generation older than the newest seen (`found: None`: not stamped,
    /// which counts as generation 0): the VM was activated again since, elsewhere or
    /// here. Destroy it and report it.
    Stale { found: Option<u64>, newest: u64 },
}

/// Whether a running copy stamped `running_generation` is stale, given the newest
/// generation seen for its VM. Only running or paused copies are asked about.
pub fn stale_verdict(running_generation: Option<u64>, newest_seen: Option<u64>) -> StaleVerdict {
    match newest_seen {
        Some(newest) if running_generation.unwrap_or(0) < newest => StaleVerdict::Stale {
            found: running_generation,
            newest,
        },
        _ => StaleVerdict::Current,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_first_order_is_admitted() {
        assert_eq!(admit_order(false, None, 1), Ok(()));
    }

    #[test]
    fn a_stale_order_is_refused() {
        assert_eq!(
            admit_order(false, Some(4), 3),
            Err(StartRefusal::StaleOrder { newest: 4 })
        );
    }

    #[test]
    fn an_order_of_the_newest_generation_or_newer_is_admitted() {
        assert_eq!(admit_order(false, Some(4), 4), Ok(()));
        assert_eq!(admit_order(false, Some(4), 5), Ok(()));
    }

    #[test]
    fn every_order_is_refused_while_fencing() {
        assert_eq!(admit_order(true, None, 1), Err(StartRefusal::Fencing));
        assert_eq!(admit_order(true, Some(4), 5), Err(StartRefusal::Fencing));
        // Fencing is checked first: a stale order on a fencing host says "fencing".
        assert_eq!(admit_order(true, Some(4), 3), Err(StartRefusal::Fencing));
    }

    #[test]
    fn a_vm_not_running_here_and_never_started_is_started() {
        assert_eq!(
            start_verdict(LocalCopy::NotRunning, None, 1),
            StartVerdict::Start
        );
    }

    #[test]
    fn a_newer_generation_than_the_last_started_is_started() {
        assert_eq!(
            start_verdict(LocalCopy::NotRunning, Some(2), 3),
            StartVerdict::Start
        );
    }

    #[test]
    fn the_same_generation_activates_once_only() {
        assert_eq!(
            start_verdict(LocalCopy::NotRunning, Some(3), 3),
            StartVerdict::Refused(StartRefusal::AlreadyActivated { started: 3 })
        );
    }

    #[test]
    fn an_older_generation_than_one_started_here_is_refused() {
        assert_eq!(
            start_verdict(LocalCopy::NotRunning, Some(5), 3),
            StartVerdict::Refused(StartRefusal::AlreadyActivated { started: 5 })
        );
    }

    #[test]
    fn the_same_activation_running_here_is_done() {
        let here = LocalCopy::Running {
            generation: Some(3),
        };
        // Even though it was started: this is a resend of the order that started it.
        assert_eq!(
            start_verdict(here, Some(3), 3),
            StartVerdict::AlreadyRunning
        );
    }

    #[test]
    fn a_copy_running_with_another_generation_is_never_doubled() {
        let older = LocalCopy::Running {
            generation: Some(2),
        };
        assert_eq!(
            start_verdict(older, Some(2), 3),
            StartVerdict::Refused(StartRefusal::SecondCopy { running: Some(2) })
        );
        let unstamped = LocalCopy::Running { generation: None };
        assert_eq!(
            start_verdict(unstamped, None, 1),
            StartVerdict::Refused(StartRefusal::SecondCopy { running: None })
        );
    }

    #[test]
    fn a_running_copy_older_than_the_newest_is_stale() {
        assert_eq!(
            stale_verdict(Some(2), Some(3)),
            StaleVerdict::Stale {
                found: Some(2),
                newest: 3
            }
        );
    }

    #[test]
    fn an_unstamped_running_copy_counts_as_generation_zero() {
        assert_eq!(
            stale_verdict(None, Some(1)),
            StaleVerdict::Stale {
                found: None,
                newest: 1
            }
        );
        assert_eq!(stale_verdict(None, Some(0)), StaleVerdict::Current);
    }

    #[test]
    fn a_running_copy_of_the_newest_generation_is_current() {
        assert_eq!(stale_verdict(Some(3), Some(3)), StaleVerdict::Current);
        // Newer than the newest recorded (the table lags): not stale.
        assert_eq!(stale_verdict(Some(4), Some(3)), StaleVerdict::Current);
    }

    #[test]
    fn without_a_known_generation_nothing_is_stale() {
        assert_eq!(stale_verdict(Some(1), None), StaleVerdict::Current);
        assert_eq!(stale_verdict(None, None), StaleVerdict::Current);
    }

    #[test]
    fn reasons_name_the_vm_and_the_generations() {
        let r = StartRefusal::StaleOrder { newest: 4 }.reason("u1", 3);
        assert_eq!(
            r,
            "refusing to start u1 with generation 3: generation 4 is newer (stale order)"
        );
        let r = StartRefusal::SecondCopy { running: Some(2) }.reason("u1", 3);
        assert_eq!(
            r,
            "u1 is already running here with generation Some(2); refusing a second start"
        );
        let r = StartRefusal::AlreadyActivated { started: 3 }.reason("u1", 3);
        assert!(r.contains("already ran on this host and stopped"), "{r}");
        assert!(StartRefusal::Fencing
            .reason("u1", 3)
            .contains("fencing itself"));
    }
}
