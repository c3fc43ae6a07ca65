//! The fault mode and the switch that holds it, with the queue of parked (hung) requests.

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

/// How the filesystem answers requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Normal passthrough to the backing directory.
    Ok,
    /// Every operation fails with `EIO`.
    Eio,
    /// Every operation blocks (the FUSE request is not answered) until the mode changes.
    Hang,
}

impl Mode {
    /// The wire / CLI name: `ok`, `eio` or `hang`.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Ok => "ok",
            Mode::Eio => "eio",
            Mode::Hang => "hang",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Mode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "ok" => Ok(Mode::Ok),
            "eio" => Ok(Mode::Eio),
            "hang" => Ok(Mode::Hang),
            other => Err(format!("unknown mode {other:?} (expected ok|eio|hang)")),
        }
    }
}

/// Milliseconds since the Unix epoch (0 if the clock is before 1970).
pub fn now_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}

/// A request parked while the mode is `hang`: re-dispatched when the mode changes away from it.
pub(crate) type Parked = Box<dyn FnOnce() + Send + 'static>;

pub(crate) struct SwitchState {
    pub(crate) mode: Mode,
    pub(crate) parked: Vec<Parked>,
    pub(crate) since_ms: u128,
}

pub(crate) struct Switch {
    pub(crate) name: String,
    pub(crate) state: Mutex<SwitchState>,
    pub(crate) eio_replies: AtomicU64,
    pub(crate) parked_total: AtomicU64,
}

impl Switch {
    pub(crate) fn lock(&self) -> MutexGuard<'_, SwitchState> {
        // A panic while holding the lock cannot leave the state inconsistent (plain fields).
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Cheap, cloneable handle that reads and changes the mode of one mounted instance.
#[derive(Clone)]
pub struct Controller {
    pub(crate) switch: Arc<Switch>,
}

impl fmt::Debug for Controller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Controller")
            .field("name", &self.switch.name)
            .field("mode", &self.mode())
            .finish()
    }
}

impl Controller {
    pub(crate) fn new(name: &str) -> Self {
        Controller {
            switch: Arc::new(Switch {
                name: name.to_owned(),
                state: Mutex::new(SwitchState {
                    mode: Mode::Ok,
                    parked: Vec::new(),
                    since_ms: now_ms(),
                }),
                eio_replies: AtomicU64::new(0),
                parked_total: AtomicU64::new(0),
            }),
        }
    }

    /// The instance's name (used in logs and `status`).
    pub fn name(&self) -> &str {
        &self.switch.name
    }

    /// The current mode.
    pub fn mode(&self) -> Mode {
        self.switch.lock().mode
    }

    /// Requests currently parked by `hang`.
    pub fn parked(&self) -> usize {
        self.switch.lock().parked.len()
    }

    /// Counters: (`EIO` replies sent because of `eio`, requests ever parked by `hang`).
    pub fn counters(&self) -> (u64, u64) {
        (
            self.switch.eio_replies.load(Ordering::Relaxed),
            self.switch.parked_total.load(Ordering::Relaxed),
        )
    }

    /// Unix-ms time of the last mode change (or of the mount).
    pub fn since_ms(&self) -> u128 {
        self.switch.lock().since_ms
    }

    /// Switches to `mode` and returns the previous one. Logs the change with a Unix-ms
    /// timestamp to stderr. Leaving `hang` re-dispatches every parked request on a helper
    /// thread, where it is answered according to the new mode.
    pub fn set_mode(&self, mode: Mode) -> Mode {
        let (old, released) = {
            let mut st = self.switch.lock();
            let old = st.mode;
            st.mode = mode;
            if old != mode {
                st.since_ms = now_ms();
            }
            let released = if mode == Mode::Hang {
                Vec::new()
            } else {
                std::mem::take(&mut st.parked)
            };
            (old, released)
        };
        eprintln!(
            "{} vigil-faultfs[{}]: mode {} -> {}{}",
            now_ms(),
            self.switch.name,
            old,
            mode,
            if released.is_empty() {
                String::new()
            } else {
                format!(" (releasing {} parked requests)", released.len())
            }
        );
        if !released.is_empty() {
            let spawned = std::thread::Builder::new()
                .name("faultfs-release".into())
                .spawn(move || released.into_iter().for_each(|parked| parked()));
            if let Err(e) = spawned {
                // Dropping the parked replies answers them with EIO (fuser's Drop), so nothing
                // stays hung even then.
                eprintln!(
                    "{} vigil-faultfs[{}]: cannot spawn release thread: {e}",
                    now_ms(),
                    self.switch.name
                );
            }
        }
        old
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mode_round_trips() {
        for m in [Mode::Ok, Mode::Eio, Mode::Hang] {
            assert_eq!(m.as_str().parse::<Mode>(), Ok(m));
        }
        assert!("nope".parse::<Mode>().is_err());
        assert_eq!(" eio\n".parse::<Mode>(), Ok(Mode::Eio));
    }

    #[test]
    fn leaving_hang_releases_parked() {
        let c = Controller::new("t");
        c.set_mode(Mode::Hang);
        let (tx, rx) = std::sync::mpsc::channel();
        c.switch
            .lock()
            .parked
            .push(Box::new(move || tx.send(()).unwrap_or(())));
        assert_eq!(c.parked(), 1);
        assert_eq!(c.set_mode(Mode::Hang), Mode::Hang);
        assert_eq!(c.parked(), 1);
        assert_eq!(c.set_mode(Mode::Ok), Mode::Hang);
        assert!(rx.recv_timeout(std::time::Duration::from_secs(5)).is_ok());
        assert_eq!(c.parked(), 0);
    }
}
