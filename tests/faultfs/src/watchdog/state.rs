//! The watchdog's state machine, without FUSE or threads: what `open`, `write`, the ioctls,
//! `release` and the passing of time do, as the Linux watchdog core (`watchdog_dev.c`) does them.
//!
//! * `open` arms it (timer started, fed) with the current timeout; only one opener at a time.
//! * Any non-empty `write` feeds it; a write that contains `'V'` allows the next release to stop
//!   it (magic close), a later write without `'V'` takes that back.
//! * `release` after a `'V'` disarms it (unless `nowayout`); a release without one leaves it
//!   armed: a killed opener does not stop it.
//! * Not fed for `timeout` while armed: it expires, once; until [`Dog::reset`] (the host's
//!   power-on) it neither re-arms nor expires again.
//! * [`Dog::power_off`]: the host lost power (crash-host): the watchdog stops acting.

use std::fmt;
use std::time::{Duration, Instant};

/// Largest timeout accepted by `WDIOC_SETTIMEOUT` (softdog allows 65535 s; one hour is plenty
/// for a lab).
pub const MAX_TIMEOUT_SECS: u32 = 3600;

/// What the watchdog is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Not running: nobody opened it, or the last opener closed it with the magic `'V'`.
    Disarmed,
    /// Running: it expires unless fed before the deadline.
    Armed,
    /// It expired and reset the host; it does nothing until [`Dog::reset`].
    Fired,
    /// The host is powered off (crash-host): nothing until [`Dog::reset`].
    Off,
}

impl State {
    /// The word used in status lines.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Disarmed => "disarmed",
            State::Armed => "armed",
            State::Fired => "fired",
            State::Off => "off",
        }
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why an operation on the device failed (mapped to an errno by the filesystem).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DogError {
    /// Another opener holds it (`EBUSY`).
    Busy,
    /// The host is off or was reset (`EIO`): a powered-off machine runs nothing.
    HostDown,
    /// A timeout of 0 or above [`MAX_TIMEOUT_SECS`] (`EINVAL`).
    BadTimeout,
    /// Not the handle that opened it (`EBADF`).
    NotOpener,
}

/// The expiry that just happened: what the action and the timeline get.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expiry {
    /// Unix ms when it expired (deadline passed).
    pub at_ms: u64,
    pub timeout_secs: u32,
    /// Unix ms of the last feed (or of the arming open).
    pub last_feed_ms: u64,
    /// Unix ms of the arming.
    pub armed_ms: u64,
    /// Whether an opener still held it (a hung feeder) or nobody did (a dead one).
    pub open: bool,
}

/// A snapshot for `status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub name: String,
    pub state: State,
    pub timeout_secs: u32,
    pub open: bool,
    /// The last write contained the magic `'V'`.
    pub magic: bool,
    pub armed_ms: Option<u64>,
    pub last_feed_ms: Option<u64>,
    /// Time left before expiry while armed.
    pub left_ms: Option<u64>,
    pub fired_ms: Option<u64>,
    pub opens: u64,
    pub feeds: u64,
    pub expiries: u64,
    pub resets: u64,
}

impl Status {
    /// `name=hv1 state=armed timeout_secs=2 ...` (the control protocol's fields; `-` = none).
    pub fn to_fields(&self) -> String {
        let opt = |v: Option<u64>| v.map(|v| v.to_string()).unwrap_or_else(|| "-".into());
        format!(
            "name={} state={} timeout_secs={} open={} magic={} armed_ms={} last_feed_ms={} left_ms={} fired_ms={} opens={} feeds={} expiries={} resets={}",
            self.name.replace(char::is_whitespace, "_"),
            self.state,
            self.timeout_secs,
            u8::from(self.open),
            u8::from(self.magic),
            opt(self.armed_ms),
            opt(self.last_feed_ms),
            opt(self.left_ms),
            opt(self.fired_ms),
            self.opens,
            self.feeds,
            self.expiries,
            self.resets,
        )
    }
}

/// One watchdog.
#[derive(Debug)]
pub struct Dog {
    name: String,
    default_timeout: u32,
    timeout: u32,
    nowayout: bool,
    state: State,
    /// The handle of the current opener.
    opener: Option<u64>,
    expect_close: bool,
    deadline: Option<Instant>,
    armed_ms: Option<u64>,
    last_feed_ms: Option<u64>,
    fired_ms: Option<u64>,
    opens: u64,
    feeds: u64,
    expiries: u64,
    resets: u64,
}

impl Dog {
    /// A disarmed watchdog with `timeout_secs` (clamped to 1..=[`MAX_TIMEOUT_SECS`]);
    /// `nowayout`: the magic close does not stop it.
    pub fn new(name: &str, timeout_secs: u32, nowayout: bool) -> Dog {
        let t = timeout_secs.clamp(1, MAX_TIMEOUT_SECS);
        Dog {
            name: name.to_string(),
            default_timeout: t,
            timeout: t,
            nowayout,
            state: State::Disarmed,
            opener: None,
            expect_close: false,
            deadline: None,
            armed_ms: None,
            last_feed_ms: None,
            fired_ms: None,
            opens: 0,
            feeds: 0,
            expiries: 0,
            resets: 0,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn state(&self) -> State {
        self.state
    }

    /// Whether a handle holds it open.
    pub fn is_open(&self) -> bool {
        self.opener.is_some()
    }

    fn live(&self) -> Result<(), DogError> {
        match self.state {
            State::Fired | State::Off => Err(DogError::HostDown),
            State::Disarmed | State::Armed => Ok(()),
        }
    }

    fn feed(&mut self, now: Instant, now_ms: u64) {
        if self.state == State::Armed {
            self.deadline = Some(now + Duration::from_secs(u64::from(self.timeout)));
            self.last_feed_ms = Some(now_ms);
            self.feeds += 1;
        }
    }

    /// `open(2)` by handle `fh`: arms it (or feeds it, if a previous opener left it armed).
    pub fn open(&mut self, fh: u64, now: Instant, now_ms: u64) -> Result<(), DogError> {
        self.live()?;
        if self.opener.is_some() {
            return Err(DogError::Busy);
        }
        self.opener = Some(fh);
        self.expect_close = false;
        self.opens += 1;
        if self.state == State::Disarmed {
            self.state = State::Armed;
            self.armed_ms = Some(now_ms);
        }
        self.feed(now, now_ms);
        Ok(())
    }

    fn opener_is(&self, fh: u64) -> Result<(), DogError> {
        if self.opener == Some(fh) {
            Ok(())
        } else {
            Err(DogError::NotOpener)
        }
    }

    /// `write(2)`: feeds it; the magic `'V'` anywhere in a write allows the next release to stop
    /// it. Returns the number of bytes taken (all).
    pub fn write(
        &mut self,
        fh: u64,
        data: &[u8],
        now: Instant,
        now_ms: u64,
    ) -> Result<usize, DogError> {
        self.opener_is(fh)?;
        self.live()?;
        if !data.is_empty() {
            self.expect_close = data.contains(&b'V');
            self.feed(now, now_ms);
        }
        Ok(data.len())
    }

    /// `WDIOC_KEEPALIVE`.
    pub fn keepalive(&mut self, fh: u64, now: Instant, now_ms: u64) -> Result<(), DogError> {
        self.opener_is(fh)?;
        self.live()?;
        self.feed(now, now_ms);
        Ok(())
    }

    /// `WDIOC_SETTIMEOUT`: sets and returns the accepted timeout, and feeds it (as Linux does).
    pub fn set_timeout(
        &mut self,
        fh: u64,
        secs: i64,
        now: Instant,
        now_ms: u64,
    ) -> Result<u32, DogError> {
        self.opener_is(fh)?;
        self.live()?;
        let secs = u32::try_from(secs).map_err(|_| DogError::BadTimeout)?;
        if secs == 0 || secs > MAX_TIMEOUT_SECS {
            return Err(DogError::BadTimeout);
        }
        self.timeout = secs;
        self.feed(now, now_ms);
        Ok(secs)
    }

    /// The current timeout (`WDIOC_GETTIMEOUT`).
    pub fn timeout_secs(&self) -> u32 {
        self.timeout
    }

    /// Whole seconds left before expiry (`WDIOC_GETTIMELEFT`), 0 when not armed.
    pub fn time_left_secs(&self, now: Instant) -> u32 {
        match (self.state, self.deadline) {
            (State::Armed, Some(d)) => {
                u32::try_from(d.saturating_duration_since(now).as_secs()).unwrap_or(u32::MAX)
            }
            _ => 0,
        }
    }

    /// The last close of handle `fh`. Returns whether that disarmed it.
    pub fn release(&mut self, fh: u64) -> bool {
        if self.opener != Some(fh) {
            return false;
        }
        self.opener = None;
        let magic = std::mem::take(&mut self.expect_close);
        if self.state == State::Armed && magic && !self.nowayout {
            self.state = State::Disarmed;
            self.deadline = None;
            return true;
        }
        false
    }

    /// The passing of time: `Some` exactly once when the deadline passed while armed.
    pub fn tick(&mut self, now: Instant, now_ms: u64) -> Option<Expiry> {
        if self.state != State::Armed {
            return None;
        }
        let deadline = self.deadline?;
        if now < deadline {
            return None;
        }
        self.state = State::Fired;
        self.deadline = None;
        self.fired_ms = Some(now_ms);
        self.expiries += 1;
        Some(Expiry {
            at_ms: now_ms,
            timeout_secs: self.timeout,
            last_feed_ms: self.last_feed_ms.unwrap_or(now_ms),
            armed_ms: self.armed_ms.unwrap_or(now_ms),
            open: self.opener.is_some(),
        })
    }

    /// How long until the next thing can happen (the deadline), if armed.
    pub fn until_deadline(&self, now: Instant) -> Option<Duration> {
        match (self.state, self.deadline) {
            (State::Armed, Some(d)) => Some(d.saturating_duration_since(now)),
            _ => None,
        }
    }

    /// The host lost power: the watchdog stops (it will not expire for a host that is off).
    pub fn power_off(&mut self) {
        self.state = State::Off;
        self.deadline = None;
        self.opener = None;
        self.expect_close = false;
    }

    /// The host powers on: disarmed, back to the default timeout, ready for a new opener.
    pub fn reset(&mut self) {
        self.state = State::Disarmed;
        self.timeout = self.default_timeout;
        self.deadline = None;
        self.opener = None;
        self.expect_close = false;
        self.armed_ms = None;
        self.last_feed_ms = None;
        self.resets += 1;
    }

    pub fn status(&self, now: Instant) -> Status {
        Status {
            name: self.name.clone(),
            state: self.state,
            timeout_secs: self.timeout,
            open: self.opener.is_some(),
            magic: self.expect_close,
            armed_ms: self.armed_ms,
            last_feed_ms: self.last_feed_ms,
            left_ms: self
                .until_deadline(now)
                .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            fired_ms: self.fired_ms,
            opens: self.opens,
            feeds: self.feeds,
            expiries: self.expiries,
            resets: self.resets,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(t0: Instant, ms: u64) -> Instant {
        t0 + Duration::from_millis(ms)
    }

    #[test]
    fn open_arms_and_feeding_keeps_it_quiet() {
        let t0 = Instant::now();
        let mut d = Dog::new("hv1", 2, false);
        assert_eq!(d.state(), State::Disarmed);
        assert_eq!(
            d.tick(at(t0, 10_000), 10_000),
            None,
            "disarmed never expires"
        );
        d.open(1, t0, 0).expect("open");
        assert_eq!(d.state(), State::Armed);
        for ms in (500..=6000).step_by(500) {
            d.write(1, b"\0", at(t0, ms), ms).expect("feed");
            assert_eq!(d.tick(at(t0, ms), ms), None);
        }
        d.keepalive(1, at(t0, 6500), 6500).expect("keepalive");
        assert_eq!(d.tick(at(t0, 8400), 8400), None);
        let e = d
            .tick(at(t0, 8500), 8500)
            .expect("expires 2 s after the last feed");
        assert_eq!((e.last_feed_ms, e.timeout_secs, e.open), (6500, 2, true));
        assert_eq!(d.state(), State::Fired);
    }

    #[test]
    fn an_expiry_happens_once_until_reset() {
        let t0 = Instant::now();
        let mut d = Dog::new("hv1", 1, false);
        d.open(7, t0, 0).expect("open");
        assert!(d.tick(at(t0, 1000), 1000).is_some());
        assert_eq!(d.tick(at(t0, 5000), 5000), None);
        assert_eq!(
            d.write(7, b"x", at(t0, 5000), 5000),
            Err(DogError::HostDown)
        );
        assert_eq!(d.open(8, at(t0, 5000), 5000), Err(DogError::HostDown));
        d.reset();
        assert_eq!(d.state(), State::Disarmed);
        d.open(8, at(t0, 6000), 6000).expect("open after power-on");
        assert!(d.tick(at(t0, 7000), 7000).is_some());
        assert_eq!(d.status(at(t0, 7000)).expiries, 2);
    }

    #[test]
    fn magic_close_disarms_and_a_plain_close_does_not() {
        let t0 = Instant::now();
        let mut d = Dog::new("hv1", 2, false);
        d.open(1, t0, 0).expect("open");
        d.write(1, b"V", at(t0, 100), 100).expect("magic");
        assert!(d.release(1));
        assert_eq!(d.state(), State::Disarmed);
        assert_eq!(d.tick(at(t0, 60_000), 60_000), None);

        // A 'V' taken back by a later write, then close: still armed.
        d.open(2, at(t0, 61_000), 61_000).expect("open");
        d.write(2, b"V", at(t0, 61_100), 61_100).expect("magic");
        d.write(2, b"x", at(t0, 61_200), 61_200).expect("feed");
        assert!(!d.release(2));
        assert_eq!(d.state(), State::Armed);
        assert!(d.tick(at(t0, 63_200), 63_200).is_some());
    }

    #[test]
    fn nowayout_ignores_the_magic_close() {
        let t0 = Instant::now();
        let mut d = Dog::new("hv1", 2, true);
        d.open(1, t0, 0).expect("open");
        d.write(1, b"V", t0, 0).expect("magic");
        assert!(!d.release(1));
        assert_eq!(d.state(), State::Armed);
    }

    #[test]
    fn one_opener_and_timeouts_are_checked() {
        let t0 = Instant::now();
        let mut d = Dog::new("hv1", 10, false);
        d.open(1, t0, 0).expect("open");
        assert_eq!(d.open(2, t0, 0), Err(DogError::Busy));
        assert_eq!(d.write(2, b"x", t0, 0), Err(DogError::NotOpener));
        assert_eq!(d.set_timeout(1, 0, t0, 0), Err(DogError::BadTimeout));
        assert_eq!(d.set_timeout(1, -3, t0, 0), Err(DogError::BadTimeout));
        assert_eq!(
            d.set_timeout(1, i64::from(MAX_TIMEOUT_SECS) + 1, t0, 0),
            Err(DogError::BadTimeout)
        );
        assert_eq!(d.set_timeout(1, 3, t0, 0), Ok(3));
        assert_eq!(d.timeout_secs(), 3);
        assert_eq!(d.time_left_secs(at(t0, 1500)), 1);
        // A re-open after a plain close feeds the still armed watchdog.
        assert!(!d.release(1));
        d.open(3, at(t0, 2900), 2900).expect("reopen");
        assert_eq!(d.tick(at(t0, 3500), 3500), None);
        // Power-on puts the default timeout back.
        d.reset();
        assert_eq!(d.timeout_secs(), 10);
    }

    #[test]
    fn power_off_stops_it_for_good_until_reset() {
        let t0 = Instant::now();
        let mut d = Dog::new("hv1", 1, false);
        d.open(1, t0, 0).expect("open");
        d.power_off();
        assert_eq!(d.tick(at(t0, 10_000), 10_000), None);
        assert_eq!(d.state(), State::Off);
        let s = d.status(t0).to_fields();
        assert!(s.contains("state=off") && s.contains("left_ms=-"), "{s}");
    }
}
