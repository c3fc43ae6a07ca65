//! Which monitor the agent dials next (issue 12 item 3): only the Raft leader takes agents,
//! a follower answers a hello with the leader's client address, and the agent follows it.
//!
//! The agent only ever dials addresses of its own `monitors` list (every monitor and the
//! VIP, from its configuration): a redirect naming any other address is treated like a
//! redirect naming none, and the agent tries its next monitor. A monitor's answer cannot
//! send agents anywhere an operator did not list, so a misconfigured or hostile redirect
//! cannot pull hosts away from the cluster, and an agent whose list is out of date still
//! finds the leader by trying the list in order. Nothing here touches the lease: a redirect
//! is not a grant.

use std::net::SocketAddr;
use std::time::Duration;

use crate::session::SessionError;

/// The largest random pause before dialling after a redirect or a lost session, so that
/// the agents of a cluster do not all reach the new leader in the same millisecond.
pub const JITTER_MAX: Duration = Duration::from_millis(250);

/// The index in `monitors` to dial after monitor `from` said it is not the leader and
/// named `leader` (its client address) or no one: the named leader when it is in the list
/// (and is not `from` itself), otherwise the next monitor after `from`.
pub fn after_redirect(monitors: &[SocketAddr], from: usize, leader: Option<&str>) -> usize {
    let named = leader
        .and_then(|l| l.parse::<SocketAddr>().ok())
        .and_then(|l| monitors.iter().position(|m| *m == l))
        .filter(|i| *i != from);
    named.unwrap_or_else(|| next(monitors.len(), from))
}

/// The index to dial after the session with monitor `from` ended with `error`. A monitor
/// that went silent (the connection timed out: killed, powered off, cut off) is likely
/// gone: the next one is tried first (a follower sends the agent to whichever leads now).
/// Any other loss (a restart, a closed session, a leader that stepped down) retries the
/// same monitor first: most losses are transient, and a monitor that stopped leading names
/// its successor.
pub fn after_loss(len: usize, from: usize, error: &SessionError) -> usize {
    match error {
        SessionError::Connection {
            source: quinn::ConnectionError::TimedOut,
            ..
        } => next(len, from),
        _ => from % len.max(1),
    }
}

/// The index after `from` in a list of `len` (wrapping).
pub fn next(len: usize, from: usize) -> usize {
    (from + 1) % len.max(1)
}

/// When and where the agent dials next, from the outcome of the last attempt: the
/// monitor (with [`after_redirect`], [`after_loss`] and [`next`]) and the pause before it
/// (a random one after a redirect or a lost session, doubling backoff after a whole round of
/// monitors without a welcome). The agent's runner and the failover benchmark's simulated
/// agents both dial by it.
#[derive(Debug, Clone)]
pub struct Dialer {
    len: usize,
    reconnect: Duration,
    backoff: Duration,
    current: usize,
    /// Attempts in a row that ended without a welcome (redirects included: monitors that all
    /// say "not the leader" are backed off from like unreachable ones).
    failed: usize,
}

impl Dialer {
    /// Dials monitor 0 of `len` first; `reconnect` is `reconnect_ms`, the backoff's start
    /// (it doubles up to eight times that).
    pub fn new(len: usize, reconnect: Duration) -> Dialer {
        Dialer {
            len: len.max(1),
            reconnect,
            backoff: reconnect,
            current: 0,
            failed: 0,
        }
    }

    /// The index of the monitor to dial now.
    pub fn current(&self) -> usize {
        self.current % self.len
    }

    /// A monitor welcomed the agent: the backoff starts afresh.
    pub fn welcomed(&mut self) {
        self.backoff = self.reconnect;
        self.failed = 0;
    }

    /// The welcomed session ended with `error`: the pause before the next dial. With one
    /// monitor, as before issue 12: `reconnect_ms`, then that monitor again.
    pub fn lost(&mut self, error: &SessionError) -> Duration {
        if self.len == 1 {
            return self.reconnect;
        }
        self.current = after_loss(self.len, self.current, error);
        self.pause(true)
    }

    /// Monitor [`Self::current`] said it is not the leader and named `leader` (or no one).
    pub fn redirected(&mut self, monitors: &[SocketAddr], leader: Option<&str>) -> Duration {
        self.failed += 1;
        self.current = after_redirect(monitors, self.current(), leader);
        self.pause(true)
    }

    /// The attempt failed otherwise (unreachable, refused): the next monitor.
    pub fn failed(&mut self) -> Duration {
        self.failed += 1;
        self.current = next(self.len, self.current);
        self.pause(false)
    }

    fn pause(&mut self, jittered: bool) -> Duration {
        if self.failed > 0 && (self.failed % self.len == 0 || self.backoff > self.reconnect) {
            // A whole round without a welcome: back off.
            let b = self.backoff;
            self.backoff = (self.backoff * 2).min(self.reconnect * 8);
            b
        } else if jittered {
            jitter(JITTER_MAX)
        } else {
            Duration::ZERO
        }
    }
}

/// A random pause in `0..=max`.
pub fn jitter(max: Duration) -> Duration {
    let ms = max.as_millis() as u64;
    Duration::from_millis(rand::random::<u64>() % (ms + 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list() -> Vec<SocketAddr> {
        ["10.0.0.1:7440", "10.0.0.2:7440", "10.0.0.3:7440"]
            .iter()
            .map(|a| a.parse().expect("addr"))
            .collect()
    }

    #[test]
    fn the_dialer_follows_a_redirect_and_backs_off_only_after_a_whole_round() {
        let m = list();
        let base = Duration::from_millis(200);
        let mut d = Dialer::new(m.len(), base);
        assert_eq!(d.current(), 0);
        // A follower names the leader: dial it after at most the jitter.
        let p = d.redirected(&m, Some("10.0.0.3:7440"));
        assert_eq!(d.current(), 2);
        assert!(p <= JITTER_MAX);
        // Unreachable twice more: a whole round without a welcome, then the backoff doubles.
        assert_eq!(d.failed(), Duration::ZERO);
        assert_eq!(d.current(), 0);
        assert_eq!(d.failed(), base);
        assert_eq!(d.failed(), base * 2);
        assert_eq!(d.failed(), base * 4);
        for _ in 0..10 {
            assert!(d.failed() <= base * 8);
        }
        // A welcome resets it; a lost session then pauses by the jitter only.
        d.welcomed();
        let gone = SessionError::Connection {
            addr: m[d.current()],
            source: quinn::ConnectionError::TimedOut,
        };
        let before = d.current();
        assert!(d.lost(&gone) <= JITTER_MAX);
        assert_eq!(d.current(), next(m.len(), before));
        // One monitor: reconnect_ms, the same monitor.
        let mut one = Dialer::new(1, base);
        one.welcomed();
        assert_eq!(one.lost(&gone), base);
        assert_eq!(one.current(), 0);
    }

    #[test]
    fn a_redirect_to_a_listed_leader_is_followed() {
        let m = list();
        assert_eq!(after_redirect(&m, 0, Some("10.0.0.3:7440")), 2);
        assert_eq!(after_redirect(&m, 2, Some("10.0.0.1:7440")), 0);
    }

    #[test]
    fn without_a_usable_leader_the_next_monitor_is_tried() {
        let m = list();
        // No leader known (election under way).
        assert_eq!(after_redirect(&m, 0, None), 1);
        assert_eq!(after_redirect(&m, 2, None), 0);
        // Not in the agent's list: never dialled.
        assert_eq!(after_redirect(&m, 0, Some("192.0.2.9:7440")), 1);
        // Garbage, an empty string, a name where an address belongs.
        for junk in ["", "not an address", "mon3:7440", "10.0.0.3"] {
            assert_eq!(after_redirect(&m, 1, Some(junk)), 2, "{junk:?}");
        }
        // A monitor naming itself (stale) does not keep the agent there.
        assert_eq!(after_redirect(&m, 1, Some("10.0.0.2:7440")), 2);
    }

    #[test]
    fn one_monitor_lists_stay_on_it() {
        let m = vec!["10.0.0.1:7440".parse().expect("addr")];
        assert_eq!(after_redirect(&m, 0, None), 0);
        assert_eq!(after_redirect(&m, 0, Some("10.0.0.1:7440")), 0);
        let lost = SessionError::Closed { addr: m[0] };
        assert_eq!(after_loss(1, 0, &lost), 0);
    }

    #[test]
    fn a_silent_monitor_is_left_for_the_next() {
        let a: SocketAddr = "10.0.0.1:7440".parse().expect("addr");
        let timed_out = SessionError::Connection {
            addr: a,
            source: quinn::ConnectionError::TimedOut,
        };
        assert_eq!(after_loss(3, 0, &timed_out), 1);
        assert_eq!(after_loss(3, 2, &timed_out), 0);
        // A leader that stepped down, a closed stream: the same monitor first.
        let stepped_down = SessionError::NotLeader {
            addr: a,
            leader: None,
        };
        assert_eq!(after_loss(3, 1, &stepped_down), 1);
        assert_eq!(after_loss(3, 1, &SessionError::Closed { addr: a }), 1);
    }

    #[test]
    fn jitter_stays_within_its_bound() {
        for _ in 0..1000 {
            assert!(jitter(JITTER_MAX) <= JITTER_MAX);
        }
        assert_eq!(jitter(Duration::ZERO), Duration::ZERO);
    }
}
